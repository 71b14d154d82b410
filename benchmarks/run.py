"""Run loopguard's benchmarks: ``python benchmarks/run.py`` (what ``make bench`` does).

Every module ``bNN_<what>.py`` next to this file is a benchmark named ``bNN``: it
exposes ``NAME`` and ``run(options) -> report``, the options being
:class:`_harness.Options` and the report anything with ``name``, ``markdown``,
``data`` and ``ok`` (:class:`_harness.Report`). This runner imports only the ones
asked for (``--only``; default: all, in order), prints each Markdown table to stdout
(progress goes to stderr) and writes each JSON document to
``benchmarks/results/<name>.json``. It exits 1 if a benchmark reports that some
configuration could not be measured at all.

The default run is the full one (minutes); ``--quick`` trades precision for time
(fewer rounds, a smaller workload) and finishes in under a minute.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import _harness as h

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # imported as a module rather than run as a script
    sys.path.insert(0, str(HERE))


def discover() -> dict[str, str]:
    """Benchmark name -> module name, for every ``bNN_*.py`` here, in order."""
    found = {}
    for path in sorted(HERE.glob("b[0-9]*_*.py")):
        match = re.fullmatch(r"(b\d+)_\w+", path.stem)
        if match:
            found[match.group(1)] = path.stem
    return dict(sorted(found.items(), key=lambda item: int(item[0][1:])))


BENCHMARKS = discover()
BENCHMARKS["blocking"] = "b_blocking"  # blocking-call guard vs blockbuster (b_blocking.py)

FULL = {"rounds": 10, "scale": 1.0, "reps": 3}
QUICK = {"rounds": 3, "scale": 0.2, "reps": 3}


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmarks/run.py",
        description="Run loopguard's benchmarks and print one Markdown table per benchmark.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer rounds, smaller workload (B1: under a minute)"
    )
    parser.add_argument(
        "--only",
        default=",".join(BENCHMARKS),
        help=f"comma-separated benchmarks to run (default: all of {', '.join(BENCHMARKS)})",
    )
    parser.add_argument("--rounds", type=int, help="rounds (default 10, or 3 with --quick)")
    parser.add_argument(
        "--scale", type=float, help="workload size factor (default 1, or 0.2 with --quick)"
    )
    parser.add_argument(
        "--reps", type=int, help="workload repetitions per process, median kept (default 3)"
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each process (and, in B1, each timed run) wait up to SECONDS for a "
        "quiet machine: other processes under 10%% of the CPUs, CPU at its best speed "
        "(default 0: do not wait)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-round shuffles")
    parser.add_argument(
        "--configs",
        default="",
        help="comma-separated configurations (benchmark-specific; default: the standard set)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=HERE / "results",
        help="directory for the JSON results (default: benchmarks/results)",
    )
    parser.add_argument("--no-json", action="store_true", help="do not write JSON")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected benchmarks; return the process exit status."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    preset = QUICK if args.quick else FULL
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}", file=sys.stderr)
        return 2
    opts = h.Options(
        rounds=args.rounds if args.rounds is not None else int(preset["rounds"]),
        quick=args.quick,
        scale=args.scale if args.scale is not None else float(preset["scale"]),
        reps=args.reps if args.reps is not None else int(preset["reps"]),
        seed=args.seed,
        wait_quiet=args.wait_quiet,
        configs=tuple(c.strip() for c in args.configs.split(",") if c.strip()),
        out_dir=None if args.no_json else args.out,
        verbose=not args.quiet,
    )
    if opts.rounds < 1 or opts.reps < 1 or opts.scale <= 0:
        print("--rounds and --reps must be >= 1, --scale > 0", file=sys.stderr)
        return 2
    status = 0
    for name in names:
        started = time.monotonic()
        module = importlib.import_module(BENCHMARKS[name])
        report: Any = module.run(opts)
        print(report.markdown)
        print()
        sys.stdout.flush()
        if opts.out_dir is not None:
            path = opts.out_dir / f"{report.name}.json"
            h.write_json(path, report.data)
            if opts.verbose:
                print(f"[{name}] wrote {path}", file=sys.stderr)
        if opts.verbose:
            print(f"[{name}] took {time.monotonic() - started:.0f} s", file=sys.stderr)
        if not report.ok:
            print(f"[{name}] some configurations could not be measured", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
