"""Keep B2 and B4 runnable: one short configuration each, no timing asserted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "integrations")])}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_b2_quick_prints_every_server() -> None:
    out = _run("b2_websocket.py", "--quick", "--configs", "none,guard")
    for server in (
        "uvicorn-websockets ",
        "uvicorn-websockets-sansio",
        "uvicorn-wsproto",
        "| websockets",
    ):
        assert server in out
    assert "| guard " in out


def test_b4_quick_accounts_for_every_message() -> None:
    out = _run("b4_overload.py", "--quick", "--configs", "guard-drop_newest")
    (row,) = [line for line in out.splitlines() if line.startswith("| guard-drop_newest")]
    cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
    assert cells[6] == "yes"  # delivered + dropped = received
