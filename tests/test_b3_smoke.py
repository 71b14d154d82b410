"""Keep B3 (detection quality) runnable: one tiny run per loop, no rates asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "b3_detection.py"
KIND_LABELS = (
    "GIL-releasing C call",
    "pure-Python loop",
    "GIL-holding C call (regex)",
    "GIL hog in another thread",
)


def test_b3_smallest_run_has_a_row_for_every_kind(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--lengths",
            "0.05",
            "--configs",
            "loopguard-fast,aiodebug",
            "--out",
            str(tmp_path),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for loop in ("asyncio", "uvloop"):
        table = proc.stdout.split(f"### {loop}", 1)[1].split("###", 1)[0]
        rows = [line for line in table.splitlines() if line.startswith("| ")]
        for label in KIND_LABELS:
            assert any(label in row and "50 ms" in row for row in rows), (loop, label)
    assert "n/a" in proc.stdout.split("### uvloop", 1)[1]  # aiodebug: no effect on uvloop
    data = json.loads((tmp_path / "b3.json").read_text())
    cells = {(c["loop"], c["tool"], c["kind"]) for c in data["cells"]}
    for loop in ("asyncio", "uvloop"):
        for kind in ("sleep", "python", "regex", "hog"):
            assert (loop, "loopguard-fast", kind) in cells
    assert data["summary"]["uvloop/aiodebug"]["na"] is True
