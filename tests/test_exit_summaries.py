"""Every process's summary, however it ends: servers on Ctrl-C, and ``loopguard report``.

Servers are real (gunicorn with uvicorn's worker class, uvicorn with ``--workers``)
and are stopped as a terminal's Ctrl-C stops them: SIGINT to the whole process group.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import SLOW_ASGI_APP as ASGI_APP

BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    # The child imports this checkout's loopguard, as the test does.
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


def _loopguard_run(*cmd: str) -> list[str]:
    return [sys.executable, "-m", "loopguard", "run", "--", *cmd]


def _loopguard(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loopguard", *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve_then_ctrl_c(cmd: list[str], cwd: Path, port: int, requests: int = 2) -> str:
    """Start a server in its own process group, call it, Ctrl-C it; return its stderr."""
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        answered = 0
        while answered < requests:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as resp:
                    assert resp.read() == b"ok"
                answered += 1
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        time.sleep(1.0)  # let every worker finish booting
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal does on Ctrl-C
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
    return err


def _summaries(err: str) -> dict[int, str]:
    """Each process's summary, by pid."""
    found: dict[int, str] = {}
    for match in re.finditer(r"loopguard summary \(pid (\d+)\):[^\n]*", err):
        found[int(match.group(1))] = match.group(0)
    return found


def _ctrl_c_server(tmp_path: Path, program: str, *args: str) -> str:
    """Serve the ASGI app with ``program`` under ``loopguard run``; Ctrl-C; its stderr."""
    pytest.importorskip(program)
    (tmp_path / "asgi.py").write_text(ASGI_APP)
    port = _free_port()
    cmd = _loopguard_run(str(BIN / program), *[a.format(port=port) for a in args], "asgi:app")
    return _serve_then_ctrl_c(cmd, tmp_path, port)


@pytest.mark.loopguard(enabled=False)  # waits for servers from the test thread
def test_gunicorn_workers_print_their_summary_on_ctrl_c(tmp_path: Path) -> None:
    err = _ctrl_c_server(
        tmp_path,
        "gunicorn",
        "-w",
        "2",
        "-k",
        "uvicorn.workers.UvicornWorker",
        "-b",
        "127.0.0.1:{port}",
    )
    workers = {int(pid) for pid in re.findall(r"Booting worker with pid: (\d+)", err)}
    assert len(workers) == 2, err
    summaries = _summaries(err)
    missing = workers - set(summaries)
    assert not missing, f"no summary from worker(s) {sorted(missing)}:\n{err}"
    # The requests' stalls are counted in the summaries of the workers that served them.
    stalled = 0
    for pid in workers:
        count = re.search(r"(\d+) stall", summaries[pid])
        assert count is not None
        stalled += int(count.group(1))
    assert stalled >= 2, err


@pytest.mark.loopguard(enabled=False)  # waits for servers from the test thread
def test_uvicorn_workers_print_their_summary_on_ctrl_c(tmp_path: Path) -> None:
    err = _ctrl_c_server(tmp_path, "uvicorn", "--workers", "2", "--port", "{port}")
    workers = {int(pid) for pid in re.findall(r"Started server process \[(\d+)\]", err)}
    assert len(workers) == 2, err
    missing = workers - set(_summaries(err))
    assert not missing, f"no summary from worker(s) {sorted(missing)}:\n{err}"


RERAISE = textwrap.dedent(
    """
    import asyncio, os, signal, sys, time

    async def main():
        time.sleep(0.3)

    asyncio.run(main())
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.stderr.write("re-raising\\n")
    if sys.argv[1] == "raise_signal":
        signal.raise_signal(signal.SIGINT)
    else:
        os.kill(os.getpid(), signal.SIGINT)
    """
)


@pytest.mark.parametrize("how", ["raise_signal", "kill"])
def test_a_process_that_re_raises_a_fatal_signal_prints_its_summary_first(
    tmp_path: Path, how: str
) -> None:
    (tmp_path / "reraise.py").write_text(RERAISE)
    result = _loopguard("run", "--", sys.executable, "reraise.py", how, cwd=tmp_path)
    assert result.returncode == -signal.SIGINT  # it still dies of the signal
    assert result.stderr.count("loopguard summary") == 1, result.stderr
    assert "1 stall(s)" in result.stderr
    assert result.stderr.index("re-raising") < result.stderr.index("loopguard summary")


TERMINATED = textwrap.dedent(
    """
    import asyncio, sys, time

    async def main():
        time.sleep(0.3)

    asyncio.run(main())
    sys.stderr.write("ready\\n")
    sys.stderr.flush()
    time.sleep(60)
    """
)


def _sigterm_when_ready(tmp_path: Path, name: str, script: str) -> tuple[int, str]:
    """Run ``script`` under ``loopguard run``; SIGTERM it once it says ready; status, stderr."""
    (tmp_path / name).write_text(script)
    proc = subprocess.Popen(
        _loopguard_run(sys.executable, name),
        cwd=tmp_path,
        env=_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if line == "ready\n":
                break
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=30)
    finally:
        proc.kill()
    return proc.returncode, "".join(lines) + rest


def test_a_process_terminated_by_sigterm_prints_its_summary_and_still_dies_of_it(
    tmp_path: Path,
) -> None:
    # uvicorn's supervisor sends SIGTERM to workers that may already have restored
    # SIGTERM's default action: the summary must come out all the same.
    status, err = _sigterm_when_ready(tmp_path, "terminated.py", TERMINATED)
    assert status == -signal.SIGTERM, err  # it still dies of the signal
    assert err.count("loopguard summary") == 1, err
    assert "1 stall(s)" in err


OWN_HANDLER = textwrap.dedent(
    """
    import signal, sys, time

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))
    sys.stderr.write("ready\\n")
    sys.stderr.flush()
    time.sleep(60)
    """
)


def test_a_programs_own_sigterm_handler_decides_what_sigterm_does(tmp_path: Path) -> None:
    status, err = _sigterm_when_ready(tmp_path, "own.py", OWN_HANDLER)
    assert status == 7, err
    assert err.count("loopguard summary") == 1, err  # printed at exit, as always


CALLS = textwrap.dedent(
    """
    import asyncio, time

    async def main():
        for _ in range(3):
            time.sleep(0.001)  # MARK:sleep
            await asyncio.sleep(0)
        for _ in range(2):
            time.sleep(0.002)  # MARK:again
            await asyncio.sleep(0)
        time.sleep(0.3)  # MARK:stall

    asyncio.run(main())
    """
)


def test_report_groups_blocking_calls_by_site_as_the_exit_summary_does(tmp_path: Path) -> None:
    (tmp_path / "calls.py").write_text(CALLS)
    out = tmp_path / "events.jsonl"
    run = _loopguard(
        "run",
        "--blocking",
        "record",
        "--json",
        str(out),
        "--",
        sys.executable,
        "calls.py",
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    report = _loopguard("report", str(out), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    summary = run.stderr[run.stderr.index("loopguard summary") :].splitlines()
    tables = [line for line in summary[1:] if not line.startswith("  loop delay")]
    assert "  6 blocking call(s) on the loop thread" in tables
    # Same rows, same order, same text: one formatter serves both.
    assert report.stdout.splitlines()[1:] == tables
    kinds = [json.loads(line)["kind"] for line in out.read_text().splitlines()]
    assert kinds.count("blocking_call") >= 2


def test_report_refuses_a_line_that_is_not_loopguards(tmp_path: Path) -> None:
    bad = tmp_path / "events.jsonl"
    bad.write_text('{"kind": "stall", "duration": 0.2}\n{"kind": "blocking_call"}\n')
    result = _loopguard("report", str(bad))
    assert result.returncode == 2
    assert "events.jsonl:2 is not a loopguard JSON line" in result.stderr
