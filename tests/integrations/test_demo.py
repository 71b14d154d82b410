"""`loopguard demo websocket`: the naive loop is named, the guarded one reports its queue."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_websocket_demo_names_the_line_then_shows_the_guarded_queue() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "integrations")])}
    proc = subprocess.run(
        [sys.executable, "-m", "loopguard", "demo", "websocket"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # loopguard's reports interleaved with the demo's output
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:]
    naive, guarded = out.split("--> guarded", 1)
    assert "event loop blocked" in naive
    assert "demo_websocket.py" in naive and "in score" in naive  # the blocking line
    assert "FALLING BEHIND" in naive
    assert "[server] queue" in guarded and "dropped" in guarded
    assert "demo finished" in out
