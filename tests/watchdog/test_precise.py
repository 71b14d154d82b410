"""Precise mode: every callback timed on asyncio loops; no stall reported twice."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import sleepy

import loopguard
from loopguard import SlowCallback, Stall

# These tests block event loops on purpose: the plugin must not fail them.
pytestmark = pytest.mark.loopguard(enabled=False)

ORIGINAL_RUN = asyncio.events.Handle.__dict__["_run"]


async def scenario() -> None:
    async def request() -> None:
        await asyncio.sleep(0.01)
        sleepy(0.06)  # shorter than the threshold: only precise mode sees it

    await asyncio.sleep(0.05)
    await asyncio.create_task(request(), name="req-1")
    asyncio.get_running_loop().call_soon(sleepy, 0.06)
    await asyncio.sleep(0.1)
    sleepy(0.3)  # a stall: reported once, as a Stall
    await asyncio.sleep(0.1)


def events_of(wd: loopguard.Watchdog) -> list[loopguard.Event]:
    time.sleep(0.3)
    return wd.events


def test_slow_callbacks_are_named_and_stalls_not_doubled() -> None:
    wd = loopguard.install(threshold=0.1, precise=True, slow_callback=0.04, log=False)
    asyncio.run(scenario())
    events = events_of(wd)
    slow = [e for e in events if isinstance(e, SlowCallback)]
    stalls = [e for e in events if isinstance(e, Stall)]
    assert len(stalls) == 1 and abs(stalls[0].duration - 0.3) < 0.1
    assert len(slow) == 2, slow
    by_task = {e.task: e for e in slow}
    step = by_task["req-1"]
    assert step.callback.endswith("request") and step.culprit is not None
    assert step.culprit.function.endswith("request")
    plain = by_task[None]
    assert plain.callback == "sleepy" and plain.culprit is not None
    assert plain.culprit.file.endswith("helpers.py")
    assert all(0.05 <= e.duration < 0.1 for e in slow)
    assert all(e.duration < 0.1 for e in slow)  # the 0.3 s one is not among them


def test_not_precise_by_default_and_hook_removed_after() -> None:
    wd = loopguard.install(threshold=0.1, log=False)
    assert asyncio.events.Handle.__dict__["_run"] is ORIGINAL_RUN
    asyncio.run(scenario())
    assert not [e for e in events_of(wd) if isinstance(e, SlowCallback)]
    loopguard.uninstall()
    loopguard.install(precise=True, log=False)
    assert asyncio.events.Handle.__dict__["_run"] is not ORIGINAL_RUN
    loopguard.uninstall()
    assert asyncio.events.Handle.__dict__["_run"] is ORIGINAL_RUN


def test_uvloop_says_so_once_and_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    import uvloop

    with caplog.at_level(logging.WARNING, "loopguard"):
        wd = loopguard.install(threshold=0.1, precise=True, log=False)
        uvloop.run(scenario())
        uvloop.run(scenario())
        events = events_of(wd)
    notices = [r for r in caplog.records if "precise mode" in r.getMessage()]
    assert len(notices) == 1 and "uvloop" in notices[0].getMessage()
    assert not [e for e in events if isinstance(e, SlowCallback)]
    assert len([e for e in events if isinstance(e, Stall)]) == 2


@pytest.mark.parametrize("slow", [0.0, 0.1, 0.5, -1])
def test_slow_callback_must_be_below_threshold(slow: float) -> None:
    with pytest.raises(ValueError, match="slow_callback"):
        loopguard.install(threshold=0.1, precise=True, slow_callback=slow)


def test_cli_precise_writes_slow_callback_events(tmp_path: Path) -> None:
    app = tmp_path / "app.py"
    app.write_text(
        "import asyncio, time\n"
        "def parse():\n"
        "    time.sleep(0.07)\n"
        "async def main():\n"
        "    await asyncio.sleep(0.05)\n"
        "    parse()\n"
        "    await asyncio.sleep(0.05)\n"
        "asyncio.run(main())\n"
    )
    out = tmp_path / "events.jsonl"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "loopguard",
            "run",
            "--precise",
            "--slow-callback",
            "0.05",
            "--json",
            str(out),
            "--",
            sys.executable,
            str(app),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["kind"] for r in records] == ["slow_callback"]
    assert records[0]["callback"] == "main" and records[0]["task"] == "Task-1"
    assert "slow callback: main" in result.stderr


def test_callbacks_near_the_threshold_are_reported_once() -> None:
    async def busy(seconds: float) -> None:
        await asyncio.sleep(0.01)
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    async def main() -> None:
        for seconds in (0.092, 0.096, 0.1, 0.104, 0.108):
            await asyncio.create_task(busy(seconds))
            await asyncio.sleep(0.05)

    with loopguard.watch(threshold=0.1, precise=True) as wd:
        asyncio.run(main())
    reported = [e for e in wd.events if isinstance(e, (Stall, SlowCallback))]
    assert len(reported) == 5, reported  # each callback once: as a stall or as slow


def _exception_contexts(precise: bool) -> list[dict[str, object]]:
    seen: list[dict[str, object]] = []

    def boom(n: int) -> None:
        raise ValueError(f"boom {n}")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, context: seen.append(context))
        loop.call_soon(boom, 1)
        await asyncio.sleep(0.01)

    with loopguard.watch(precise=precise, log=False):
        asyncio.run(main())
    return seen


def test_a_raising_callback_is_reported_by_asyncio_exactly_as_without_precise_mode() -> None:
    plain, precise = _exception_contexts(False), _exception_contexts(True)
    assert len(plain) == len(precise) == 1
    assert precise[0]["message"] == plain[0]["message"]
    assert str(precise[0]["message"]).startswith("Exception in callback ")
    assert "boom" in str(precise[0]["message"])
    exc = precise[0]["exception"]
    assert isinstance(exc, ValueError) and str(exc) == "boom 1"
    assert isinstance(precise[0]["handle"], asyncio.Handle)  # the very handle, not a stand-in
    assert precise[0]["handle"]._callback.__name__ == "boom"  # type: ignore[attr-defined]


def test_keyboard_interrupt_in_a_callback_still_stops_the_loop() -> None:
    def interrupt() -> None:
        raise KeyboardInterrupt

    async def main() -> None:
        asyncio.get_running_loop().call_soon(interrupt)
        await asyncio.sleep(1)

    with loopguard.watch(precise=True, log=False), pytest.raises(KeyboardInterrupt):
        asyncio.run(main())


def test_the_slow_limit_follows_the_precise_watchdogs_running() -> None:
    async def main() -> None:
        asyncio.get_running_loop().call_soon(sleepy, 0.05)
        await asyncio.sleep(0.1)

    def slow_events(*wds: loopguard.Watchdog) -> list[SlowCallback]:
        time.sleep(0.3)
        return [e for wd in wds for e in wd.events if isinstance(e, SlowCallback)]

    with loopguard.watch(threshold=0.5, precise=True, slow_callback=0.2, log=False) as coarse:
        asyncio.run(main())
        assert slow_events(coarse) == []
        with loopguard.watch(threshold=0.5, precise=True, slow_callback=0.02, log=False) as fine:
            asyncio.run(main())
            assert len(slow_events(coarse, fine)) == 1  # the finer limit applies
        asyncio.run(main())  # the finer watchdog stopped: back to 0.2 s
        assert len(slow_events(coarse, fine)) == 1
    assert asyncio.events.Handle.__dict__["_run"] is ORIGINAL_RUN


def test_slow_callback_text_shows_paths_relative_to_the_current_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    inside = SlowCallback(
        0.05, "handler", "req-1", loopguard.Frame(str(tmp_path / "app.py"), 7, "h")
    )
    outside = SlowCallback(0.05, "handler", None, loopguard.Frame("/elsewhere/lib.py", 3, "h"))
    assert str(inside) == "slow callback: handler (app.py:7) ran 50 ms in task 'req-1'"
    assert "(/elsewhere/lib.py:3)" in str(outside)
