"""The capture helper: C code holding the GIL named by default, and every way it can fail.

Each fault (py-spy missing, refused by the kernel, killed, slow) leaves the watchdog
working: the stall is still reported with its cause, the reason is logged once and
carried by the stall, and no process is left behind (no zombie, nothing after exit,
a fresh helper in a forked child).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import REGEX_LINE, regex_hold

import loopguard
from loopguard import Stall
from loopguard._watchdog.capture import CAPTURE, find_py_spy

# These tests block event loops on purpose: the plugin must not fail them.
pytestmark = [
    pytest.mark.loopguard(enabled=False),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="captures run on Linux"),
]

THRESHOLD = 0.1
PY_SPY = find_py_spy()
needs_py_spy = pytest.mark.skipif(PY_SPY is None, reason="py-spy is not installed")


async def _regex_in_callback(n: int = 24) -> None:
    await asyncio.sleep(0.05)
    regex_hold(n)
    await asyncio.sleep(0.05)


def _stalls(wd: loopguard.Watchdog) -> list[Stall]:
    assert wd.flush(3.0)
    return wd.stalls


def _state(pid: int) -> str | None:
    """The process's state letter (``Z``: zombie), ``None`` once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _no_zombies() -> None:
    zombies = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] == "Z" and int(fields[1]) == os.getpid():
                zombies.append(entry)
    assert zombies == []


def _two_regex_stalls(caplog: pytest.LogCaptureFixture) -> list[Stall]:
    with (
        caplog.at_level(logging.WARNING, logger="loopguard"),
        loopguard.watch(threshold=THRESHOLD, log=False) as wd,
    ):
        asyncio.run(_regex_in_callback())
        asyncio.run(_regex_in_callback())
        # A loaded machine may add short stalls of its own: keep the two regex ones.
        stalls = [s for s in _stalls(wd) if s.duration >= 0.25]
    assert [s.cause for s in stalls] == ["c-held-gil", "c-held-gil"], stalls
    assert all(s.culprit is None for s in stalls)
    return stalls


@pytest.fixture
def fake_binary(tmp_path: Path) -> Iterator[Any]:
    """Point the capture at another executable for one test (then restore it)."""
    original = CAPTURE.find

    def use(script: str) -> None:
        path = tmp_path / "py-spy"
        path.write_text("#!/bin/sh\n" + script)
        path.chmod(0o755)
        CAPTURE.find = lambda: str(path)

    yield use
    CAPTURE.find = original


@needs_py_spy
@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_c_call_holding_the_gil_is_named_by_default(loop_kind: str) -> None:
    with loopguard.watch(threshold=THRESHOLD, log=False) as wd:
        if loop_kind == "uvloop":
            import uvloop

            uvloop.run(_regex_in_callback())
        else:
            asyncio.run(_regex_in_callback())
        stalls = _stalls(wd)
    stall = max(stalls, key=lambda s: s.duration)
    assert stall.cause == "c-held-gil"
    assert stall.culprit is not None and stall.culprit.line == REGEX_LINE
    assert stall.capture_error is None
    _no_zombies()


def test_missing_py_spy_keeps_the_cause_and_says_why_once(
    fake_binary: Any, caplog: pytest.LogCaptureFixture
) -> None:
    CAPTURE.find = lambda: None
    for _ in range(2):
        stalls = _two_regex_stalls(caplog)
        assert all("py-spy is not installed" in (s.capture_error or "") for s in stalls)
    said = [r.getMessage() for r in caplog.records if "py-spy" in r.getMessage()]
    assert len(said) == 1, said


@needs_py_spy
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root")
def test_refused_read_keeps_the_cause_and_says_why_once(
    fake_binary: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # The real py-spy, without CAP_SYS_PTRACE, reading a process that has it: the
    # kernel refuses (EACCES), as it does under Yama or in a locked-down container.
    fake_binary(f'exec setpriv --inh-caps=-sys_ptrace --bounding-set=-sys_ptrace {PY_SPY} "$@"\n')
    stalls = _two_regex_stalls(caplog)
    assert all("refused" in (s.capture_error or "") for s in stalls), stalls
    said = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(said) == 1, said
    assert "Permission denied" in said[0]
    _no_zombies()


def test_slow_capture_never_holds_the_report_long(
    fake_binary: Any, caplog: pytest.LogCaptureFixture
) -> None:
    fake_binary("sleep 30\n")  # a capture that never finishes in time
    with (
        caplog.at_level(logging.WARNING, logger="loopguard"),
        loopguard.watch(threshold=THRESHOLD, log=False) as wd,
    ):
        asyncio.run(_regex_in_callback())
        started = time.monotonic()
        stalls = _stalls(wd)
        waited = time.monotonic() - started
        asyncio.run(asyncio.sleep(2.5))  # the helper gives up on it meanwhile
    assert [s.cause for s in stalls] == ["c-held-gil"]
    assert stalls[0].capture_error is not None
    assert waited < 2.5  # reported after at most the capture wait, not the 30 s
    assert any("longer than" in r.getMessage() for r in caplog.records)
    _no_zombies()


@needs_py_spy
def test_killed_helper_is_reaped_said_once_and_replaced(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="loopguard"),
        loopguard.watch(threshold=THRESHOLD, log=False) as wd,
    ):
        asyncio.run(asyncio.sleep(0.2))  # the sampler starts the helper
        proc = CAPTURE._proc
        assert proc is not None
        os.kill(proc.pid, signal.SIGKILL)
        asyncio.run(_regex_in_callback())  # noticed at the next wake; stall still reported
        asyncio.run(asyncio.sleep(0.3))
        asyncio.run(_regex_in_callback())
        stalls = _stalls(wd)
        _no_zombies()
        assert CAPTURE._proc is not None and CAPTURE._proc.pid != proc.pid  # replaced
    assert [s.cause for s in stalls][-1] == "c-held-gil"
    assert stalls[-1].culprit is not None and stalls[-1].culprit.line == REGEX_LINE
    said = [r.getMessage() for r in caplog.records if "killed by signal 9" in r.getMessage()]
    assert len(said) == 1, said
    assert _state(proc.pid) is None  # reaped, not a zombie


_SCRIPT = """
import asyncio, os, re, sys, time
import loopguard

def regex():
    re.match(r"^(a+)+$", "a" * 24 + "!")  # MARK:regex

async def main():
    await asyncio.sleep(0.1)
    regex()
    await asyncio.sleep(0.1)

wd = loopguard.install(threshold=0.1, log=False)
asyncio.run(main())
from loopguard._watchdog.capture import CAPTURE
print("helper", CAPTURE._proc.pid if CAPTURE._proc else 0, flush=True)
if sys.argv[1] == "fork":
    pid = os.fork()
    if pid == 0:  # a prefork server's worker: its own loop, its own helper
        asyncio.run(main())
        wd.flush(3)
        s = wd.stalls[-1]
        print("child", s.cause, s.culprit.line if s.culprit else None,
              CAPTURE._proc.pid if CAPTURE._proc else 0, flush=True)
        os._exit(0)
    os.waitpid(pid, 0)
wd.flush(3)
s = wd.stalls[-1]
print("parent", s.cause, s.culprit.line if s.culprit else None, flush=True)
"""


def _run_script(tmp_path: Path, mode: str) -> tuple[dict[str, list[str]], int]:
    script = tmp_path / "app.py"
    script.write_text(textwrap.dedent(_SCRIPT))
    line = next(i for i, t in enumerate(_SCRIPT.splitlines(), 1) if "MARK:regex" in t)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    done = subprocess.run(
        [sys.executable, str(script), mode],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    out = {w[0]: w[1:] for w in (ln.split() for ln in done.stdout.splitlines())}
    return out, line


@needs_py_spy
def test_interpreter_exit_leaves_no_helper_running(tmp_path: Path) -> None:
    out, line = _run_script(tmp_path, "plain")
    assert out["parent"] == ["c-held-gil", str(line)]
    helper = int(out["helper"][0])
    assert helper
    deadline = time.monotonic() + 5
    while _state(helper) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _state(helper) is None


@needs_py_spy
def test_forked_child_gets_its_own_helper(tmp_path: Path) -> None:
    out, line = _run_script(tmp_path, "fork")
    assert out["child"][:2] == ["c-held-gil", str(line)]
    assert out["child"][2] not in ("0", out["helper"][0])  # a helper reading the child
    assert out["parent"] == ["c-held-gil", str(line)]


def test_stall_in_which_two_tasks_ran_names_no_single_task() -> None:
    def spin(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    async def first() -> None:
        spin(0.15)

    async def second() -> None:
        spin(0.15)

    async def main() -> None:
        await asyncio.sleep(0.05)
        # Both steps run in one loop iteration: the heartbeat sees one stall of ~0.3 s.
        a = asyncio.create_task(first(), name="first")
        b = asyncio.create_task(second(), name="second")
        await asyncio.gather(a, b)
        await asyncio.sleep(0.05)

    with loopguard.watch(threshold=THRESHOLD, log=False) as wd:
        asyncio.run(main())
        stalls = _stalls(wd)
    stall = max(stalls, key=lambda s: s.duration)
    assert set(stall.tasks) == {"first", "second"}, stall.tasks
    assert stall.task is None
    assert json.loads(json.dumps(stall.to_dict()))["tasks"] == list(stall.tasks)


def test_stall_in_one_task_names_it() -> None:
    async def work() -> None:
        end = time.perf_counter() + 0.3
        while time.perf_counter() < end:
            pass

    async def main() -> None:
        await asyncio.sleep(0.05)
        await asyncio.create_task(work(), name="only")
        await asyncio.sleep(0.05)

    with loopguard.watch(threshold=THRESHOLD, log=False) as wd:
        asyncio.run(main())
        stalls = _stalls(wd)
    stall = max(stalls, key=lambda s: s.duration)
    assert stall.task == "only" and stall.tasks == ("only",)


def test_capture_costs_no_helper_while_no_loop_is_watched() -> None:
    with loopguard.watch(threshold=THRESHOLD, log=False):
        time.sleep(0.3)  # no loop: the sampler never wakes, the helper never starts
        assert CAPTURE._proc is None
    assert threading.active_count() >= 1


async def _busy_but_healthy(seconds: float) -> None:
    """200 tasks that only yield: thousands of short iterations, no stall.

    On uvloop each iteration releases the GIL for a moment and takes it back before a
    waiting sampler thread is scheduled, so the sampler misses its deadline now and
    then while the loop ticks on time.
    """
    end = time.monotonic() + seconds

    async def stepper() -> None:
        while time.monotonic() < end:
            await asyncio.sleep(0)

    await asyncio.gather(*(stepper() for _ in range(200)))


@needs_py_spy
@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_busy_healthy_loop_takes_no_capture(loop_kind: str) -> None:
    runner: Any = asyncio.run
    if loop_kind == "uvloop":
        runner = pytest.importorskip("uvloop").run
    # The heap this test inherits from the suite is large: a full collection of it is
    # a real stall (cause "gc", seen once at 170 ms) that is not what this test is about.
    gc.collect()
    gc.freeze()
    try:
        with loopguard.watch(threshold=THRESHOLD, log=False) as wd:
            runner(_busy_but_healthy(3.0))
            assert _stalls(wd) == [] or all(s.cause == "scheduler" for s in wd.stalls)
            assert CAPTURE._proc is not None  # the helper ran, armed, throughout
            assert [d for d in CAPTURE._dumps] == []  # and never read the process
    finally:
        gc.unfreeze()
    # Every heartbeat slot is free again.
    assert sorted(CAPTURE.board._free) == list(range(CAPTURE.board.STALE))
