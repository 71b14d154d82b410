"""End-to-end: drive the ``loopguard`` command in a subprocess, as a user would."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import SLOW_ASGI_APP

BIN = Path(sys.executable).parent
LOOPGUARD = str(BIN / "loopguard") if (BIN / "loopguard").exists() else shutil.which("loopguard")

APP = textwrap.dedent(
    """
    import asyncio, sys, time

    def fetch_sync():
        time.sleep(0.3)  # MARK:fetch

    def crunch():
        end = time.perf_counter() + 0.25
        while time.perf_counter() < end:  # MARK:crunch
            pass

    async def handler():
        await asyncio.sleep(0.05)
        fetch_sync()
        await asyncio.sleep(0.05)
        crunch()
        await asyncio.sleep(0.05)

    if __name__ == "__main__":
        print("app output")
        asyncio.run(handler())
        sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    """
)


def line_with(text: str, marker: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if marker in line)


def loopguard(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    assert LOOPGUARD, "the loopguard console script is not installed"
    return subprocess.run(
        [LOOPGUARD, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def app(tmp_path: Path) -> Path:
    path = tmp_path / "app.py"
    path.write_text(APP)
    return path


def test_run_python_app_reports_each_stall_and_a_summary(app: Path, tmp_path: Path) -> None:
    result = loopguard("run", "--", sys.executable, "app.py", "3", cwd=tmp_path)
    assert result.returncode == 3  # the program's own exit status passes through
    assert result.stdout == "app output\n"
    err = result.stderr
    fetch, crunch = line_with(APP, "MARK:fetch"), line_with(APP, "MARK:crunch")
    assert f"app.py:{fetch} in fetch_sync" in err
    assert f"app.py:{crunch} in crunch" in err
    assert "event loop blocked for" in err
    summary = err[err.index("loopguard summary") :]
    assert "2 stall(s)" in summary
    assert "loop delay: p50" in summary


def test_run_writes_json_lines(app: Path, tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    result = loopguard(
        "run",
        "--json",
        str(out),
        "--threshold",
        "0.15",
        "--",
        sys.executable,
        str(app),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["kind"] for r in records] == ["stall", "stall"]
    assert [r["culprit"]["function"] for r in records] == ["fetch_sync", "crunch"]
    assert all(r["duration"] >= 0.15 for r in records)
    report = loopguard("report", str(out))
    assert report.returncode == 0
    assert "2 stall" in report.stdout
    assert "fetch_sync" in report.stdout


def test_run_python_dash_m_on_uvloop_and_user_sitecustomize_still_runs(tmp_path: Path) -> None:
    pkg = tmp_path / "svc"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(
        textwrap.dedent(
            """
        import time, uvloop
        async def main():
            time.sleep(0.3)  # MARK
        uvloop.run(main())
        """
        )
    )
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text("import sys; sys.stderr.write('user hook ran\\n')\n")
    env = {**os.environ, "PYTHONPATH": str(hooks)}
    result = loopguard("run", "--", sys.executable, "-m", "svc", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert "user hook ran" in result.stderr
    assert "uvloop" in result.stderr
    assert "__main__.py:4 in main" in result.stderr


def test_healthy_program_prints_nothing_but_the_summary(tmp_path: Path) -> None:
    (tmp_path / "ok.py").write_text(
        "import asyncio\nasync def main():\n    for _ in range(20):\n"
        "        await asyncio.sleep(0.01)\nasyncio.run(main())\n"
    )
    result = loopguard("run", "--", sys.executable, "ok.py", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stderr.startswith("loopguard summary")
    assert "0 stall(s)" in result.stderr
    quiet = loopguard("run", "--no-summary", "--", sys.executable, "ok.py", cwd=tmp_path)
    assert quiet.returncode == 0
    assert quiet.stderr == ""
    assert quiet.stdout == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run"], "missing the command"),
        (["run", "--"], "missing the command"),
        (["run", "--threshold", "-1", "--", "python"], "threshold"),
        (["run", "--threshold", "abc", "--", "python"], "threshold"),
        (["run", "--threshold", "0.1", "--interval", "0.2", "--", "python"], "interval"),
        (["run", "--blocking", "loud", "--", "python"], "blocking"),
        (["run", "--json", "/nonexistent-dir/x/events.jsonl", "--", "python"], "--json"),
        (["frobnicate"], "invalid choice"),
        ([], "required"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(args: list[str], message: str) -> None:
    result = loopguard(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_environment_variable_exits_2(tmp_path: Path) -> None:
    env = {**os.environ, "LOOPGUARD_TRESHOLD": "0.2"}
    result = loopguard("run", "--", sys.executable, "-c", "pass", env=env)
    assert result.returncode == 2
    assert "LOOPGUARD_TRESHOLD" in result.stderr


def test_command_not_found_exits_127() -> None:
    result = loopguard("run", "--", "no-such-command-loopguard")
    assert result.returncode == 127
    assert "command not found" in result.stderr


@pytest.mark.parametrize("command", [[], ["run"], ["demo"], ["report"]])
def test_help_everywhere(command: list[str]) -> None:
    result = loopguard(*command, "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: loopguard")


def test_demo_shows_culprits_and_summary() -> None:
    started = time.monotonic()
    result = loopguard("demo", timeout=90)
    assert time.monotonic() - started < 60
    assert result.returncode == 0, result.stderr
    assert "fetch_profile_sync" in result.stderr
    assert "score_documents" in result.stderr
    assert "loopguard summary" in result.stderr
    assert "healthy" in result.stdout
    assert "LATE" in result.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_uvicorn_app_is_watched_without_code_change(tmp_path: Path) -> None:
    pytest.importorskip("uvicorn")
    (tmp_path / "asgi.py").write_text(SLOW_ASGI_APP)
    port = _free_port()
    out = tmp_path / "events.jsonl"
    proc = subprocess.Popen(
        [
            LOOPGUARD or "loopguard",
            "run",
            "--json",
            str(out),
            "--",
            str(BIN / "uvicorn"),
            "asgi:app",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
                    assert resp.read() == b"ok"
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
            resp.read()
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    records = [r for r in records if r["cause"] != "import"]  # uvicorn importing the app
    assert len(records) >= 2
    assert all(r["culprit"]["file"].endswith("asgi.py") for r in records)
    assert all(r["culprit"]["function"] == "app" for r in records)
    assert "loopguard summary" in err


def test_summary_counts_a_stall_that_ends_at_exit(tmp_path: Path) -> None:
    (tmp_path / "end.py").write_text(
        "import asyncio, time\nasync def main():\n    time.sleep(0.3)\nasyncio.run(main())\n"
    )
    out = tmp_path / "events.jsonl"
    for _ in range(3):
        result = loopguard("run", "--json", str(out), "--", sys.executable, "end.py", cwd=tmp_path)
        assert result.returncode == 0
        summary = result.stderr[result.stderr.index("loopguard summary") :]
        assert "1 stall(s)" in summary, result.stderr
        assert result.stderr.index("event loop blocked") < result.stderr.index("summary")
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 3
    assert all(isinstance(r["pid"], int) for r in records)


def test_summary_lists_blocking_calls_by_site(tmp_path: Path) -> None:
    program = tmp_path / "calls.py"
    program.write_text(
        textwrap.dedent(
            """
            import asyncio, time

            async def main():
                for _ in range(3):
                    time.sleep(0.001)  # MARK:sleep
                    await asyncio.sleep(0)

            asyncio.run(main())
            """
        )
    )
    result = loopguard(
        "run", "--blocking", "record", "--", sys.executable, "calls.py", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    summary = result.stderr[result.stderr.index("loopguard summary") :]
    assert "3 blocking call(s) on the loop thread" in summary
    line = line_with(program.read_text(), "MARK:sleep")
    row = next(r for r in summary.splitlines() if "time.sleep" in r)
    assert row.split()[0] == "3"
    assert row.endswith(f"calls.py:{line} in main")
