"""Keep the benchmarks runnable: one tiny B1 round, no timing asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

RUN = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"
# The default set but loopguard-nocapture.
EXPECTED_CONFIGS = {
    "vanilla",
    "loopguard",
    "loopguard-precise",
    "loopguard-stats",
    "loopguard-otel",
    "loopguard-instrumentor",
    "asyncio-debug",
    "aiodebug",
    "pyleak",
    "blockbuster",
}


def test_b1_quick_round_prints_every_configuration(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(RUN),
            "--quick",
            "--only",
            "b1",
            "--rounds",
            "1",
            "--scale",
            "0.05",
            "--configs",
            ",".join(sorted(EXPECTED_CONFIGS)),
            "--out",
            str(tmp_path),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "b1.json").read_text())
    variants = data["variants"]
    configs = {v["config"] for v in variants.values()}
    assert configs == EXPECTED_CONFIGS
    assert {v["loop"] for v in variants.values()} == {"asyncio", "uvloop"}
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    for variant in variants.values():
        assert variant["rounds_measured"] == 1, variant
        assert any(row.startswith(f"| {variant['label']} ") for row in rows), variant["label"]
    # The probe (a 250 ms time.sleep on the loop) is seen by loopguard on both loops.
    assert variants["asyncio/loopguard"]["probe_seen"] == "yes"
    assert variants["uvloop/loopguard"]["probe_seen"] == "yes"
    # The OpenTelemetry SDK configuration really aggregated loopguard's metrics.
    otel = [s["info"] for s in data["samples"] if s["key"].endswith("/loopguard-otel") and s["ok"]]
    assert otel and all("asyncio.eventloop.delay" in i["otel_metrics"] for i in otel)
    # The instrumentor turned loopguard on, and a scrape would get its metrics.
    via = [s["info"] for s in data["samples"] if s["key"].endswith("/loopguard-instrumentor")]
    assert via and all(
        "asyncio_eventloop_delay_seconds_bucket" in i["prometheus_series"] for i in via
    )
    assert variants["asyncio/loopguard-instrumentor"]["probe_seen"] == "yes"


def test_b7_quick_prints_both_tables(tmp_path: Path) -> None:
    """B7 end to end in its smoke mode: real uvicorn servers and load processes."""
    out = tmp_path / "b7.json"
    script = RUN.parent / "b7_asgi.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert set(data["throughput"]) >= {"plain", "middleware", "middleware+shed"}
    assert set(data["shedding"]) == {"no-shedding", "shedding", "shedding, /hello exempt"}
    for name in ("plain", "middleware", "middleware+shed"):
        assert any(line.startswith(f"| {name} |") for line in proc.stdout.splitlines())
    # Without shedding the saturated loop served every probe, late; the exempt probe too.
    assert data["shedding"]["no-shedding"]["loaded"]["served"] == 1.0
    assert data["shedding"]["shedding, /hello exempt"]["loaded"]["served"] == 1.0
