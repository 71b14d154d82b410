"""Throwaway PostgreSQL, Redis and Prometheus servers for the tests, each in a temp dir.

``make test`` installs the servers (Debian's ``postgresql``, ``redis-server`` and
``prometheus``) when
it can. Where a server cannot be found the tests that need it are skipped, unless
``TESTS_REQUIRE_SERVICES=1`` (set by CI), which turns the skip into a failure so
a missing install step cannot hide behind a green run.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


def missing(what: str) -> None:
    """Skip the test, or fail it where CI says the service must be there."""
    if os.environ.get("TESTS_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{what} (TESTS_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(what)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {log.read_text()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within 30 s")


def _wait_until_accepting(dsn: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """PostgreSQL listens before it accepts sessions ("the database system is starting up")."""
    psycopg2 = pytest.importorskip("psycopg2")
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"postgres exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            psycopg2.connect(dsn).close()
            return
        except psycopg2.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    # Debian keeps the server binaries off PATH, one directory per major version.
    for path in sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True):
        return path
    return None


@contextlib.contextmanager
def postgres() -> Iterator[str]:
    """Run a PostgreSQL server on a free loopback port; yield its DSN."""
    initdb, server = _pg_bin("initdb"), _pg_bin("postgres")
    if initdb is None or server is None:
        missing("needs a PostgreSQL server (initdb and postgres not found)")
    assert initdb is not None and server is not None
    # Its own directory outside pytest's (which only root may enter).
    with tempfile.TemporaryDirectory(prefix="loopguard-pg-") as where:
        yield from _postgres(Path(where), initdb, server)


def _postgres(tmp: Path, initdb: str, server: str) -> Iterator[str]:
    data, log = tmp / "pgdata", tmp / "postgres.log"
    # PostgreSQL refuses to run as root: where we are root, run it as the postgres user.
    user: dict[str, Any] = {}
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            missing("needs a 'postgres' user to run PostgreSQL as (we are root)")
        user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        os.chown(tmp, pw.pw_uid, pw.pw_gid)
    subprocess.run(
        [initdb, "-D", str(data), "-A", "trust", "-U", "loopguard", "--no-sync"],
        check=True,
        capture_output=True,
        **user,
    )
    port = _free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [server, "-D", str(data), "-p", str(port), "-h", "127.0.0.1", "-k", str(tmp)],
            stdout=out,
            stderr=subprocess.STDOUT,
            **user,
        )
    try:
        _wait_for_port(port, proc, "postgres", log)
        dsn = f"host=127.0.0.1 port={port} user=loopguard dbname=postgres connect_timeout=5"
        _wait_until_accepting(dsn, proc, log)
        yield dsn
    finally:
        _stop(proc)


@contextlib.contextmanager
def redis(tmp: Path) -> Iterator[int]:
    """Run a Redis server on a free loopback port; yield the port."""
    server = shutil.which("redis-server")
    if server is None:
        missing("needs a Redis server (redis-server not found)")
    assert server is not None
    port, log = _free_port(), tmp / "redis.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_for_port(port, proc, "redis-server", log)
        yield port
    finally:
        _stop(proc)


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    return _free_port()


@contextlib.contextmanager
def prometheus(tmp: Path, targets: list[str], interval: str = "1s") -> Iterator[str]:
    """Run a Prometheus server scraping ``targets`` (``host:port``); yield its base URL.

    The server keeps its data in ``tmp``, scrapes every ``interval`` and loads the
    alert rules of ``dashboards/alerts.yml`` so that they are evaluated too.
    """
    server = shutil.which("prometheus")
    if server is None:
        missing("needs a Prometheus server (prometheus not found)")
    assert server is not None
    rules = Path(__file__).parent.parent / "dashboards" / "alerts.yml"
    config = tmp / "prometheus.yml"
    config.write_text(
        "global:\n"
        f"  scrape_interval: {interval}\n"
        f"  evaluation_interval: {interval}\n"
        + (f"rule_files: ['{rules}']\n" if rules.exists() else "")
        + "scrape_configs:\n"
        "  - job_name: app\n"
        "    static_configs:\n"
        f"      - targets: {targets!r}\n"
    )
    port, log = _free_port(), tmp / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                server,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp / 'prometheus-data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_for_port(port, proc, "prometheus", log)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate a server process, killing it if it does not exit within 10 s."""
    _stop(proc)


# Runs in its own process and starts/kills redis-server on command, so a test's process
# never forks while its event loop runs (a fork holds the GIL until the child execs:
# on a busy machine, long enough to stall the loop).
_SUPERVISOR = """
import contextlib, socket, subprocess, sys, time
port, log, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
proc = None
for line in sys.stdin:
    command = line.strip()
    if command == "start":
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                print("failed", flush=True)
                break
            time.sleep(0.02)
        else:
            continue
        if proc.poll() is None:
            print("ok", flush=True)
    elif command in ("kill", "stop") and proc is not None:
        proc.kill() if command == "kill" else proc.terminate()
        proc.wait()
        proc = None
        print("ok", flush=True)
    else:
        print("ok", flush=True)
"""


class RedisServer:
    """A Redis server a test can kill and start again on the same port.

    A small supervisor process does the starting and killing; :meth:`start` and
    :meth:`kill` block until it is done (call them from a worker thread in async
    tests: ``await asyncio.to_thread(server.kill)``).
    """

    def __init__(self, tmp: Path) -> None:
        server = shutil.which("redis-server")
        if server is None:
            missing("needs a Redis server (redis-server not found)")
        assert server is not None
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._log = tmp / "redis.log"
        argv = [
            server,
            *("--port", str(self.port), "--bind", "127.0.0.1"),
            *("--save", "", "--appendonly", "no", "--dir", str(tmp)),
        ]
        self._supervisor = subprocess.Popen(
            [sys.executable, "-c", _SUPERVISOR, str(self.port), str(self._log), *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def _ask(self, command: str) -> None:
        sup = self._supervisor
        assert sup.stdin is not None and sup.stdout is not None
        sup.stdin.write(command + "\n")
        sup.stdin.flush()
        answer = sup.stdout.readline().strip()
        if answer != "ok":
            log = self._log.read_text() if self._log.exists() else ""
            raise RuntimeError(f"redis-server {command}: {answer or 'no answer'}: {log[-2000:]}")

    def start(self) -> None:
        """Start it (again) on its port and wait until it listens."""
        self._ask("start")

    def kill(self) -> None:
        """Kill it with SIGKILL (no goodbye to its clients) and wait until it is gone."""
        self._ask("kill")

    def stop(self) -> None:
        """Stop it if it runs, and the supervisor."""
        with contextlib.suppress(Exception):
            self._ask("stop")
        sup = self._supervisor
        if sup.stdin is not None:
            sup.stdin.close()  # the supervisor ends with its input
        try:
            sup.wait(10)
        except subprocess.TimeoutExpired:
            sup.kill()
            sup.wait()
        if sup.stdout is not None:
            sup.stdout.close()


@contextlib.contextmanager
def restartable_redis(tmp: Path) -> Iterator[RedisServer]:
    """Run a Redis server that the test may kill and restart; yield it."""
    server = RedisServer(tmp)
    try:
        server.start()
        yield server
    finally:
        server.stop()
