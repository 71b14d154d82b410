"""``python -m loopguard``: the same as the ``loopguard`` command."""

import sys

from .cli import main

sys.exit(main())
