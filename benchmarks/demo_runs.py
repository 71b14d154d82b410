"""``loopguard demo`` many times in a row beside CPU-bound processes: crashes and culprits.

Runs ``loopguard demo --json FILE`` ``--runs`` times (default 20) while ``--burners``
CPU-bound processes (default 2) run beside it, and counts per run: a crash (the demo
killed by a signal or exiting non-zero), a crash warning in its output, and each demo
culprit named with its cause. Prints a Markdown table; exit status 1 if any run missed.

    python benchmarks/demo_runs.py [--runs 20] [--burners 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

#: Function of each demo culprit, and the cause it must be reported with.
EXPECTED = {
    "fetch_profile_sync": "blocked",
    "score_documents": "blocked",
    "hash_password": "blocked",
    "validate_username": "c-held-gil",
    "build_report": "gil",
}
CRASH_WORDS = ("Segmentation fault", "SIGSEGV", "Fatal Python error", "can crash")


def one_run(folder: Path, number: int) -> dict[str, object]:
    out = folder / f"demo-{number}.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "loopguard", "demo", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    named = set()
    if out.exists():
        for line in out.read_text().splitlines():
            event = json.loads(line)
            culprit = event.get("culprit") or {}
            function = culprit.get("function")
            if event.get("kind") == "stall" and EXPECTED.get(function) == event.get("cause"):
                named.add(function)
    return {
        "returncode": done.returncode,
        "warnings": sum((done.stdout + done.stderr).count(w) for w in CRASH_WORDS),
        "named": named,
    }


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/demo_runs.py", description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--burners", type=int, default=2)
    args = parser.parse_args(argv)
    burners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.burners)
    ]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            runs = []
            for number in range(args.runs):
                runs.append(one_run(Path(tmp), number))
                print(f"[demo runs] {number + 1}/{args.runs}", file=sys.stderr, flush=True)
    finally:
        for p in burners:
            p.kill()
            p.wait()
    crashes = sum(r["returncode"] != 0 for r in runs)
    warnings = sum(int(str(r["warnings"])) for r in runs)
    print(f"### `loopguard demo`, {args.runs} runs beside {args.burners} CPU-bound processes\n")
    print("| culprit | cause | runs that named it |")
    print("|---|---|---|")
    for function, cause in EXPECTED.items():
        hits = sum(function in r["named"] for r in runs)  # type: ignore[operator]
        print(f"| `{function}` | `{cause}` | {hits}/{len(runs)} |")
    print(f"\ncrashes: {crashes}; crash warnings: {warnings}")
    missed = [r for r in runs if r["named"] != set(EXPECTED) or r["returncode"] != 0]
    return 1 if missed or warnings else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
