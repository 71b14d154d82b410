"""Serve ``asgi_app`` under uvicorn with loopguard installed (run as a subprocess).

Usage: ``python asgi_server.py PORT EVENTS_JSON [middleware options as JSON]``. The
options are passed to ``LoopguardMiddleware``; ``"none"`` serves without it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import uvicorn

sys.path.insert(0, str(Path(__file__).parent))

from asgi_app import make_app
from loopguard_integrations.asgi import LoopguardMiddleware

import loopguard


def main() -> None:
    port, events = int(sys.argv[1]), sys.argv[2]
    options = sys.argv[3] if len(sys.argv) > 3 else "{}"
    loopguard.install(threshold=0.1, json=events, log=False, stats=True, blocking="record")
    app = make_app()
    if options != "none":
        app.add_middleware(LoopguardMiddleware, **json.loads(options))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", loop="asyncio")


if __name__ == "__main__":
    main()
