"""The package exports exactly its public API and patches nothing on import."""

from __future__ import annotations

import subprocess
import sys

import loopguard


def test_all_names_exist_and_are_public() -> None:
    for name in loopguard.__all__:
        assert hasattr(loopguard, name), name
    public = {n for n in vars(loopguard) if not n.startswith("_")}
    modules = {n for n in public if type(getattr(loopguard, n)).__name__ == "module"}
    assert public - modules <= set(loopguard.__all__)


def test_import_patches_nothing() -> None:
    code = (
        "import asyncio, sys; before = dict(vars(asyncio.BaseEventLoop)); mp = list(sys.meta_path);"
        "import loopguard; assert dict(vars(asyncio.BaseEventLoop)) == before;"
        "assert sys.meta_path == mp; import threading; assert threading.active_count() == 1"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
