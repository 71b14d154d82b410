"""A real third-party suite under the pytest plugin: Starlette's own tests, from its sdist.

    python benchmarks/b_starlette_suite.py [--version 1.10.0] [--runs 20] [--rounds 5]
                                            [--workdir DIR] [--busy]

Sets up one virtual environment (Starlette from its PyPI sdist with its ``full`` extra
and its test dependencies, blockbuster included, plus loopguard built from this
checkout, no xdist), then runs Starlette's suite in interleaved rounds three ways:

* ``plain``: ``-p no:loopguard`` (as if loopguard were not installed);
* ``installed``: loopguard installed, plugin not enabled;
* ``--loopguard``: the plugin on with its defaults (scope: the rootdir's package,
  ``starlette``; GC pauses reported, not failed).

It prints the outcomes and wall times side by side (medians; the run-to-run noise of
a shared 2-core machine is ±15 %), counts hangs (runs killed at ``--timeout``),
failures that move between ``--loopguard`` runs, and lists every failure the plugin
adds with the line it names. ``--busy`` runs two CPU-bound processes beside it.
Results go to ``<workdir>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import tomllib

REPO = Path(__file__).resolve().parent.parent
# Starlette's dev dependency group holds tools too; these are what its tests import.
TOOLS = ("mypy", "ruff", "twine", "coverage", "pytest-codspeed", "types-")
VARIANTS = {"plain": ["-p", "no:loopguard"], "installed": [], "loopguard": ["--loopguard"]}


def sh(*cmd: str | Path, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], check=True, text=True, **kw)


def setup(workdir: Path, version: str) -> tuple[Path, Path]:
    """Return (python of the venv, the unpacked sdist)."""
    src = workdir / f"starlette-{version}"
    if not src.exists():
        dl = workdir / "dl"
        sh(
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary",
            ":all:",
            f"starlette=={version}",
            "-d",
            dl,
        )
        with tarfile.open(next(dl.glob("starlette-*.tar.gz"))) as tar:
            tar.extractall(workdir, filter="data")
    venv = workdir / "venv"
    python = venv / "bin" / "python"
    if not python.exists():
        sh(sys.executable, "-m", "venv", venv)
        groups = tomllib.loads((src / "pyproject.toml").read_text())["dependency-groups"]
        deps = [d for d in groups["dev"] if not d.startswith(("starlette", *TOOLS))]
        sh(python, "-m", "pip", "install", "--quiet", f"{src}[full]", *deps)
    wheels = workdir / "wheel"
    shutil.rmtree(wheels, ignore_errors=True)
    sh(python, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", wheels, REPO)
    sh(
        python,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--force-reinstall",
        "--no-deps",
        next(wheels.glob("loopguard-*.whl")),
    )
    sh(python, "-m", "pip", "install", "--quiet", next(wheels.glob("loopguard-*.whl")))
    for forbidden in ("xdist", "pytest_asyncio"):
        probe = subprocess.run([python, "-c", f"import {forbidden}"], capture_output=True)
        if probe.returncode == 0:
            sys.exit(f"{forbidden} is installed in {venv}: the run must go without it")
    return python, src


def run_once(python: Path, src: Path, variant: str, timeout: float, out: Path) -> dict[str, Any]:
    xml = out / f"{variant}-{time.monotonic_ns()}.xml"
    cmd = [
        str(python),
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-q",
        f"--junitxml={xml}",
        *VARIANTS[variant],
    ]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=src, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "hung": True, "wall": timeout}
    wall = time.perf_counter() - start
    if not xml.exists():
        sys.exit(
            f"{variant}: pytest wrote no report (exit {proc.returncode}):\n{proc.stdout[-3000:]}"
        )
    failed: dict[str, str] = {}
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for case in ET.parse(xml).getroot().iter("testcase"):
        test = f"{case.get('classname')}::{case.get('name')}"
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        if bad is not None:
            counts["failed"] += 1
            failed[test] = _reason(bad.get("message", "") + "\n" + (bad.text or ""))
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    return {
        "variant": variant,
        "hung": False,
        "wall": wall,
        "rc": proc.returncode,
        "counts": counts,
        "failed": failed,
        "summary": summary,
    }


def _reason(text: str) -> str:
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(("event loop blocked", "blocking call", "loopguard.BlockingCallError")):
            return line[:200]
    return (text.strip().splitlines() or ["?"])[0][:200]


def burn() -> None:
    while True:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default="1.10.0")
    parser.add_argument("--runs", type=int, default=20, help="runs with --loopguard")
    parser.add_argument("--rounds", type=int, default=5, help="runs of plain and installed")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--busy", action="store_true", help="two CPU-bound processes beside it")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lg-starlette-"))
    workdir.mkdir(parents=True, exist_ok=True)
    python, src = setup(workdir.resolve(), args.version)
    out = workdir / "runs"
    out.mkdir(exist_ok=True)
    burners = [multiprocessing.Process(target=burn, daemon=True) for _ in range(2 * args.busy)]
    for b in burners:
        b.start()
    results: list[dict[str, Any]] = []
    try:
        # Interleaved: each round runs every variant once; --loopguard gets the extra runs.
        order: list[str] = []
        for i in range(max(args.runs, args.rounds)):
            if i < args.rounds:
                order += ["plain", "installed"]
            if i < args.runs:
                order.append("loopguard")
        for n, variant in enumerate(order, 1):
            r = run_once(python, src, variant, args.timeout, out)
            results.append(r)
            status = "HUNG" if r["hung"] else r["summary"]
            print(
                f"[{n}/{len(order)}] {variant:>9}: {r['wall']:6.1f} s  {status}",
                file=sys.stderr,
                flush=True,
            )
    finally:
        for b in burners:
            b.terminate()
    report = summarise(results, args)
    (workdir / "results.json").write_text(json.dumps({"runs": results, **report}, indent=1))
    return 0


def summarise(results: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    by: dict[str, list[dict[str, Any]]] = {
        v: [r for r in results if r["variant"] == v] for v in VARIANTS
    }
    plain_failed = set().union(*(r["failed"] for r in by["plain"] if not r["hung"]))
    median_plain = statistics.median(r["wall"] for r in by["plain"] if not r["hung"])
    busy = ", two CPU-bound processes beside it" if args.busy else ""
    print(f"\nStarlette {args.version} test suite, no xdist{busy}; wall time median of runs\n")
    print("| variant | runs | hangs | passed | failed | skipped | wall (median) | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    table = {}
    for variant, runs in by.items():
        ok = [r for r in runs if not r["hung"]]
        if not ok:
            continue
        wall = statistics.median(r["wall"] for r in ok)
        c = {
            k: statistics.median(r["counts"][k] for r in ok)
            for k in ("passed", "failed", "skipped")
        }
        hangs = len(runs) - len(ok)
        name = "--loopguard" if variant == "loopguard" else variant
        print(
            f"| {name} | {len(runs)} | {hangs} | {c['passed']:.0f} | {c['failed']:.0f} | "
            f"{c['skipped']:.0f} | {wall:.1f} s | {wall / median_plain:.3f} |"
        )
        table[variant] = {"runs": len(runs), "hangs": hangs, "wall": wall, **c}
    same = {frozenset(r["failed"]) for r in by["plain"] + by["installed"] if not r["hung"]}
    print(f"\nplain and installed-not-enabled fail the same tests in every run: {len(same) == 1}")
    lg = [r for r in by["loopguard"] if not r["hung"]]
    added = [set(r["failed"]) - plain_failed for r in lg]
    always = set.intersection(*added) if added else set()
    moving = set.union(*added) - always if added else set()
    print(f"--loopguard: {len(always)} failure(s) in every run, {len(moving)} moving between runs")
    reasons: dict[str, str] = {}
    for r in lg:
        for test in set(r["failed"]) - plain_failed:
            reasons.setdefault(test, r["failed"][test])
    for test in sorted(always | moving):
        tag = "" if test in always else " (not every run)"
        print(f"- `{test}`{tag}: {reasons[test]}")
    return {
        "table": table,
        "always": sorted(always),
        "moving": sorted(moving),
        "reasons": reasons,
        "plain_failed": sorted(plain_failed),
    }


if __name__ == "__main__":
    sys.exit(main())
