"""One way to make each catalogued blocking call, for the per-entry guard tests.

``CASES[name](ctx)`` prepares what the call needs (off the loop, while a guard runs,
so locks and connections are the guarded kind) and returns a function that makes
exactly that blocking call once.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.server
import io
import itertools
import os
import queue
import select
import shutil
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import services

Call = Callable[[], object]
Prepare = Callable[["Ctx"], Call]

CASES: dict[str, Prepare] = {}
# Third-party modules an entry needs (skipped when missing).
NEEDS = {
    "requests.": "requests",
    "urllib3.": "urllib3",
    "httpx.": "httpx",
    "redis.": "redis",
    "psycopg2.": "psycopg2",
}


_names = itertools.count()


class Ctx:
    """Resources for one case; closed by :meth:`close`."""

    def __init__(self, tmp: Path, servers: Servers, name: str) -> None:
        self.name = name  # the entry being made
        self.tmp = tmp
        self.servers = servers
        self._cleanups: list[Callable[[], object]] = []

    def later(self, fn: Callable[[], object]) -> None:
        self._cleanups.append(fn)

    def after(self, delay: float, fn: Callable[[], object]) -> None:
        """Run ``fn`` in a helper thread after ``delay`` seconds."""
        timer = threading.Timer(delay, fn)
        timer.start()
        self.later(timer.join)

    def path(self, text: str = "data") -> Path:
        path = self.tmp / f"f{next(_names)}"
        path.write_text(text)
        return path

    def fresh(self) -> Path:
        return self.tmp / f"new{next(_names)}"

    def close(self) -> None:
        for fn in reversed(self._cleanups):
            with contextlib.suppress(Exception):
                fn()


def case(*names: str) -> Callable[[Prepare], Prepare]:
    def register(fn: Prepare) -> Prepare:
        for name in names:
            CASES[name] = fn
        return fn

    return register


# -- servers shared by the cases ----------------------------------------------------------


class _Quiet(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients of these tests hang up early on purpose (a refused call, a close)


class Servers:
    """A TCP echo server, an HTTP server, (if openssl is there) a TLS echo server, and
    real PostgreSQL and Redis servers, started on first use."""

    def __init__(self, tmp: Path) -> None:
        self._tmp = tmp
        self._services = contextlib.ExitStack()
        self._pg: str | None = None
        self._redis: int | None = None
        self.http = _QuietServer(("127.0.0.1", 0), _Quiet)
        self._threads = [threading.Thread(target=self.http.serve_forever, daemon=True)]
        self.echo = socket.create_server(("127.0.0.1", 0))
        self._threads.append(threading.Thread(target=self._serve_echo, daemon=True))
        self.tls: tuple[str, int] | None = None
        self.client_tls: ssl.SSLContext | None = None
        self._tls_server: socket.socket | None = None
        if shutil.which("openssl"):
            self._start_tls(tmp)
        for t in self._threads:
            t.start()

    @property
    def url(self) -> str:
        host, port = self.http.server_address[:2]
        return f"http://{host!s}:{port}/"

    @property
    def echo_address(self) -> tuple[str, int]:
        host, port = self.echo.getsockname()[:2]
        return host, port

    @property
    def http_address(self) -> tuple[str, int]:
        host, port = self.http.server_address[:2]
        return str(host), int(port)

    def _serve_echo(
        self, server: socket.socket | None = None, tls: ssl.SSLContext | None = None
    ) -> None:
        listener = server or self.echo
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn, tls), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket, tls: ssl.SSLContext | None) -> None:
        try:
            if tls is not None:
                conn = tls.wrap_socket(conn, server_side=True)
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass
        finally:
            conn.close()

    def _start_tls(self, tmp: Path) -> None:
        cert, key = tmp / "cert.pem", tmp / "key.pem"
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                str(key),
                "-out",
                str(cert),
                "-days",
                "1",
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=DNS:localhost",
            ],
            check=True,
            capture_output=True,
        )
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(cert, key)
        self._tls_server = socket.create_server(("127.0.0.1", 0))
        self.tls = self._tls_server.getsockname()[:2]
        self.client_tls = ssl.create_default_context(cafile=str(cert))
        self._threads.append(
            threading.Thread(
                target=self._serve_echo, args=(self._tls_server, server_ctx), daemon=True
            )
        )

    def postgres(self) -> str:
        """The DSN of a PostgreSQL server (skips or fails the test where there is none)."""
        if self._pg is None:
            self._pg = self._services.enter_context(services.postgres())
        return self._pg

    def redis(self) -> int:
        """The port of a Redis server (skips or fails the test where there is none)."""
        if self._redis is None:
            self._redis = self._services.enter_context(services.redis(self._tmp))
        return self._redis

    def close(self) -> None:
        self._services.close()
        self.http.shutdown()
        self.http.server_close()
        for server in (self.echo, self._tls_server):
            if server is not None:
                with contextlib.suppress(OSError):
                    server.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
                server.close()
        for t in self._threads:
            t.join(timeout=5)


# -- time, builtins ----------------------------------------------------------------------


@case("time.sleep")
def _sleep(ctx: Ctx) -> Call:
    return lambda: time.sleep(0.001)


@case("builtins.input")
def _input(ctx: Ctx) -> Call:
    def call() -> object:
        stdin, sys.stdin = sys.stdin, io.StringIO("typed\n")
        try:
            return input()
        finally:
            sys.stdin = stdin

    return call


@case("builtins.open")
def _open(ctx: Ctx) -> Call:
    path = ctx.path()
    return lambda: open(path).close()


@case("io.open")
def _io_open(ctx: Ctx) -> Call:
    path = ctx.path()
    return lambda: io.open(path).close()  # noqa: UP020


# -- socket ------------------------------------------------------------------------------


def _pair(ctx: Ctx) -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    ctx.later(a.close)
    ctx.later(b.close)
    return a, b


def _udp(ctx: Ctx) -> tuple[socket.socket, socket.socket]:
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    a.bind(("127.0.0.1", 0))
    b.bind(("127.0.0.1", 0))
    ctx.later(a.close)
    ctx.later(b.close)
    return a, b


@case("socket.socket.connect")
def _connect(ctx: Ctx) -> Call:
    sock = socket.socket()
    ctx.later(sock.close)
    return lambda: sock.connect(ctx.servers.echo_address)


@case("socket.socket.connect_ex")
def _connect_ex(ctx: Ctx) -> Call:
    sock = socket.socket()
    ctx.later(sock.close)
    return lambda: sock.connect_ex(ctx.servers.echo_address)


@case("socket.socket.accept")
def _accept(ctx: Ctx) -> Call:
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname()[:2])
    ctx.later(server.close)
    ctx.later(client.close)

    def call() -> object:
        conn, _ = server.accept()
        conn.close()
        return None

    return call


@case("socket.socket.recv")
def _recv(ctx: Ctx) -> Call:
    a, b = _pair(ctx)
    a.sendall(b"x")
    return lambda: b.recv(1)


@case("socket.socket.recv_into")
def _recv_into(ctx: Ctx) -> Call:
    a, b = _pair(ctx)
    a.sendall(b"x")
    return lambda: b.recv_into(bytearray(1))


@case("socket.socket.recvfrom")
def _recvfrom(ctx: Ctx) -> Call:
    a, b = _udp(ctx)
    a.sendto(b"x", b.getsockname())
    return lambda: b.recvfrom(1)


@case("socket.socket.recvfrom_into")
def _recvfrom_into(ctx: Ctx) -> Call:
    a, b = _udp(ctx)
    a.sendto(b"x", b.getsockname())
    return lambda: b.recvfrom_into(bytearray(1))


@case("socket.socket.recvmsg")
def _recvmsg(ctx: Ctx) -> Call:
    a, b = _pair(ctx)
    a.sendall(b"x")
    return lambda: b.recvmsg(1)


@case("socket.socket.recvmsg_into")
def _recvmsg_into(ctx: Ctx) -> Call:
    a, b = _pair(ctx)
    a.sendall(b"x")
    return lambda: b.recvmsg_into([bytearray(1)])


@case("socket.socket.send")
def _send(ctx: Ctx) -> Call:
    a, _ = _pair(ctx)
    return lambda: a.send(b"x")


@case("socket.socket.sendall")
def _sendall(ctx: Ctx) -> Call:
    a, _ = _pair(ctx)
    return lambda: a.sendall(b"x")


@case("socket.socket.sendto")
def _sendto(ctx: Ctx) -> Call:
    a, b = _udp(ctx)
    return lambda: a.sendto(b"x", b.getsockname())


@case("socket.socket.sendmsg")
def _sendmsg(ctx: Ctx) -> Call:
    a, _ = _pair(ctx)
    return lambda: a.sendmsg([b"x"])


@case("socket.socket.sendfile")
def _sock_sendfile(ctx: Ctx) -> Call:
    a, _ = _pair(ctx)
    fh = open(ctx.path("x" * 100), "rb")  # noqa: SIM115
    ctx.later(fh.close)
    return lambda: a.sendfile(fh)


@case("socket.getaddrinfo")
def _getaddrinfo(ctx: Ctx) -> Call:
    return lambda: socket.getaddrinfo("localhost", 80)


@case("socket.gethostbyname")
def _gethostbyname(ctx: Ctx) -> Call:
    return lambda: socket.gethostbyname("localhost")


@case("socket.gethostbyname_ex")
def _gethostbyname_ex(ctx: Ctx) -> Call:
    return lambda: socket.gethostbyname_ex("localhost")


@case("socket.gethostbyaddr")
def _gethostbyaddr(ctx: Ctx) -> Call:
    def call() -> object:
        with contextlib.suppress(OSError):
            return socket.gethostbyaddr("127.0.0.1")
        return None

    return call


@case("socket.getnameinfo")
def _getnameinfo(ctx: Ctx) -> Call:
    return lambda: socket.getnameinfo(("127.0.0.1", 80), 0)


@case("socket.getfqdn")
def _getfqdn(ctx: Ctx) -> Call:
    return lambda: socket.getfqdn("localhost")


@case("socket.create_connection")
def _create_connection(ctx: Ctx) -> Call:
    def call() -> object:
        socket.create_connection(ctx.servers.echo_address).close()
        return None

    return call


# -- ssl ---------------------------------------------------------------------------------


def _tls(ctx: Ctx, *, handshake: bool = True) -> ssl.SSLSocket:
    if ctx.servers.tls is None or ctx.servers.client_tls is None:
        raise _Skip("openssl is needed to make a certificate")
    raw = socket.create_connection(ctx.servers.tls)
    sock = ctx.servers.client_tls.wrap_socket(
        raw, server_hostname="localhost", do_handshake_on_connect=handshake
    )
    ctx.later(sock.close)
    return sock


class _Skip(Exception):
    pass


@case("ssl.SSLSocket.do_handshake")
def _handshake(ctx: Ctx) -> Call:
    sock = _tls(ctx, handshake=False)
    return sock.do_handshake


@case("ssl.SSLSocket.connect")
def _tls_connect(ctx: Ctx) -> Call:
    if ctx.servers.tls is None or ctx.servers.client_tls is None:
        raise _Skip("openssl is needed to make a certificate")
    sock = ctx.servers.client_tls.wrap_socket(socket.socket(), server_hostname="localhost")
    ctx.later(sock.close)
    address = ctx.servers.tls
    return lambda: sock.connect(address)


@case("ssl.SSLSocket.write")
def _tls_write(ctx: Ctx) -> Call:
    sock = _tls(ctx)
    return lambda: sock.write(b"x")


@case("ssl.SSLSocket.send")
def _tls_send(ctx: Ctx) -> Call:
    sock = _tls(ctx)
    return lambda: sock.send(b"x")


@case("ssl.SSLSocket.sendall")
def _tls_sendall(ctx: Ctx) -> Call:
    sock = _tls(ctx)
    return lambda: sock.sendall(b"x")


@case("ssl.SSLSocket.read")
def _tls_read(ctx: Ctx) -> Call:
    sock = _tls(ctx)
    sock.sendall(b"x")
    return lambda: sock.read(1)


@case("ssl.SSLSocket.recv")
def _tls_recv(ctx: Ctx) -> Call:
    sock = _tls(ctx)
    sock.sendall(b"x")
    return lambda: sock.recv(1)


@case("ssl.SSLSocket.recv_into")
def _tls_recv_into(ctx: Ctx) -> Call:
    sock = _tls(ctx)
    sock.sendall(b"x")
    return lambda: sock.recv_into(bytearray(1))


# -- os ----------------------------------------------------------------------------------


@case("os.open")
def _os_open(ctx: Ctx) -> Call:
    path = ctx.path()
    return lambda: os.close(os.open(path, os.O_RDONLY))


@case("os.read")
def _os_read(ctx: Ctx) -> Call:
    fd = os.open(ctx.path(), os.O_RDONLY)
    ctx.later(lambda: os.close(fd))
    return lambda: os.read(fd, 1)


@case("os.write")
def _os_write(ctx: Ctx) -> Call:
    fd = os.open(ctx.path(), os.O_WRONLY)
    ctx.later(lambda: os.close(fd))
    return lambda: os.write(fd, b"x")


@case("os.sendfile")
def _os_sendfile(ctx: Ctx) -> Call:
    a, _ = _pair(ctx)
    fd = os.open(ctx.path("x" * 10), os.O_RDONLY)
    ctx.later(lambda: os.close(fd))
    return lambda: os.sendfile(a.fileno(), fd, 0, 10)


def _path_call(fn: Callable[[Path], object]) -> Prepare:
    def prepare(ctx: Ctx) -> Call:
        path = ctx.path()
        return lambda: fn(path)

    return prepare


# Looked up at call time: a reference taken before the guard started is the original.
CASES["os.stat"] = _path_call(lambda p: os.stat(p))
CASES["os.lstat"] = _path_call(lambda p: os.lstat(p))
CASES["os.access"] = _path_call(lambda p: os.access(p, os.R_OK))
CASES["os.remove"] = _path_call(lambda p: os.remove(p))
CASES["os.unlink"] = _path_call(lambda p: os.unlink(p))


@case("os.listdir")
def _listdir(ctx: Ctx) -> Call:
    return lambda: os.listdir(ctx.tmp)


@case("os.scandir")
def _scandir(ctx: Ctx) -> Call:
    def call() -> object:
        with os.scandir(ctx.tmp) as it:
            return list(it)

    return call


@case("os.statvfs")
def _statvfs(ctx: Ctx) -> Call:
    return lambda: os.statvfs(ctx.tmp)


@case("os.getcwd")
def _getcwd(ctx: Ctx) -> Call:
    return lambda: os.getcwd()


@case("os.readlink")
def _readlink(ctx: Ctx) -> Call:
    link = ctx.fresh()
    os.symlink(ctx.path(), link)
    return lambda: os.readlink(link)


@case("os.mkdir")
def _mkdir(ctx: Ctx) -> Call:
    path = ctx.fresh()
    return lambda: os.mkdir(path)


@case("os.makedirs")
def _makedirs(ctx: Ctx) -> Call:
    path = ctx.fresh() / "a" / "b"
    return lambda: os.makedirs(path)


@case("os.rmdir")
def _rmdir(ctx: Ctx) -> Call:
    path = ctx.fresh()
    path.mkdir()
    return lambda: os.rmdir(path)


@case("os.rename")
def _rename(ctx: Ctx) -> Call:
    src = ctx.path()
    dst = ctx.fresh()
    return lambda: os.rename(src, dst)


@case("os.replace")
def _replace(ctx: Ctx) -> Call:
    src = ctx.path()
    dst = ctx.fresh()
    return lambda: os.replace(src, dst)


@case("os.link")
def _link(ctx: Ctx) -> Call:
    src = ctx.path()
    dst = ctx.fresh()
    return lambda: os.link(src, dst)


@case("os.symlink")
def _symlink(ctx: Ctx) -> Call:
    src = ctx.path()
    dst = ctx.fresh()
    return lambda: os.symlink(src, dst)


@case("os.fsync")
def _fsync(ctx: Ctx) -> Call:
    fd = os.open(ctx.path(), os.O_RDWR)
    ctx.later(lambda: os.close(fd))
    return lambda: os.fsync(fd)


@case("os.system")
def _system(ctx: Ctx) -> Call:
    return lambda: os.system("true")


@case("os.waitpid")
def _waitpid(ctx: Ctx) -> Call:
    pid = os.posix_spawnp("true", ["true"], dict(os.environ))
    return lambda: os.waitpid(pid, 0)


# -- subprocess --------------------------------------------------------------------------


@case("subprocess.run")
def _run(ctx: Ctx) -> Call:
    return lambda: subprocess.run(["true"], check=True)


@case("subprocess.call")
def _call(ctx: Ctx) -> Call:
    return lambda: subprocess.call(["true"])


@case("subprocess.check_call")
def _check_call(ctx: Ctx) -> Call:
    return lambda: subprocess.check_call(["true"])


@case("subprocess.check_output")
def _check_output(ctx: Ctx) -> Call:
    return lambda: subprocess.check_output(["echo", "x"])


@case("subprocess.getoutput")
def _getoutput(ctx: Ctx) -> Call:
    return lambda: subprocess.getoutput("true")


@case("subprocess.getstatusoutput")
def _getstatusoutput(ctx: Ctx) -> Call:
    return lambda: subprocess.getstatusoutput("true")


@case("subprocess.Popen.wait")
def _popen_wait(ctx: Ctx) -> Call:
    proc = subprocess.Popen(["sleep", "0.05"])
    ctx.later(proc.kill)
    return proc.wait


@case("subprocess.Popen.communicate")
def _communicate(ctx: Ctx) -> Call:
    proc = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    ctx.later(proc.kill)
    return lambda: proc.communicate(b"x")


# -- threading, queue, futures -------------------------------------------------------------


def _held(ctx: Ctx, lock: Any, seconds: float = 0.15) -> None:
    """Hold ``lock`` in a helper thread for a while (until then, acquiring it waits)."""
    ready = threading.Event()

    def hold() -> None:
        with lock:
            ready.set()
            time.sleep(seconds)

    t = threading.Thread(target=hold)
    t.start()
    ctx.later(t.join)
    ready.wait()


@case("threading.Lock.acquire")
def _lock(ctx: Ctx) -> Call:
    lock = threading.Lock()
    _held(ctx, lock)

    def call() -> object:
        lock.acquire()
        lock.release()
        return None

    return call


@case("threading.RLock.acquire")
def _rlock(ctx: Ctx) -> Call:
    lock = threading.RLock()
    _held(ctx, lock)

    def call() -> object:
        with lock:
            return None

    return call


@case("threading.Condition.__enter__")
def _cond_enter(ctx: Ctx) -> Call:
    cond = threading.Condition()
    _held(ctx, cond)

    def call() -> object:
        with cond:
            return None

    return call


@case("threading.Condition.wait")
def _cond_wait(ctx: Ctx) -> Call:
    cond = threading.Condition()

    def call() -> object:
        with cond:
            return cond.wait(0.01)

    return call


@case("threading.Event.wait")
def _event_wait(ctx: Ctx) -> Call:
    event = threading.Event()
    ctx.after(0.02, event.set)
    return event.wait


@case("threading.Semaphore.acquire")
def _sem_acquire(ctx: Ctx) -> Call:
    sem = threading.Semaphore(0)
    ctx.after(0.02, sem.release)
    return sem.acquire


@case("threading.Semaphore.__enter__")
def _sem_enter(ctx: Ctx) -> Call:
    sem = threading.BoundedSemaphore(1)
    sem.acquire()
    ctx.after(0.02, sem.release)

    def call() -> object:
        with sem:
            return None

    return call


@case("threading.Barrier.wait")
def _barrier(ctx: Ctx) -> Call:
    barrier = threading.Barrier(2)
    ctx.after(0.02, barrier.wait)
    return barrier.wait


@case("threading.Thread.join")
def _join(ctx: Ctx) -> Call:
    thread = threading.Thread(target=time.sleep, args=(0.02,))
    thread.start()
    return thread.join


@case("queue.Queue.get")
def _queue_get(ctx: Ctx) -> Call:
    q: queue.Queue[int] = queue.Queue()
    ctx.after(0.02, lambda: q.put(1))
    return q.get


@case("queue.Queue.put")
def _queue_put(ctx: Ctx) -> Call:
    q: queue.Queue[int] = queue.Queue(1)
    q.put(0)
    ctx.after(0.02, q.get)
    return lambda: q.put(1)


def _pending_future(ctx: Ctx) -> concurrent.futures.Future[int]:
    fut: concurrent.futures.Future[int] = concurrent.futures.Future()
    ctx.after(0.02, lambda: fut.set_result(1))
    return fut


@case("concurrent.futures.Future.result")
def _fut_result(ctx: Ctx) -> Call:
    return _pending_future(ctx).result


@case("concurrent.futures.Future.exception")
def _fut_exception(ctx: Ctx) -> Call:
    return _pending_future(ctx).exception


# -- select ------------------------------------------------------------------------------


@case("select.select")
def _select(ctx: Ctx) -> Call:
    a, _ = _pair(ctx)
    return lambda: select.select([a], [], [], 0.005)


@case("select.poll.poll")
def _poll(ctx: Ctx) -> Call:
    a, _ = _pair(ctx)
    poller = select.poll()
    poller.register(a, select.POLLIN)
    return lambda: poller.poll(5)


# -- sqlite3 -----------------------------------------------------------------------------


def _db(ctx: Ctx) -> sqlite3.Connection:
    conn = sqlite3.connect(ctx.fresh(), check_same_thread=False)
    ctx.later(conn.close)
    conn.execute("create table t (x)")
    conn.commit()
    return conn


@case("sqlite3.connect")
def _sqlite_connect(ctx: Ctx) -> Call:
    path = ctx.fresh()
    return lambda: sqlite3.connect(path).close()


@case("sqlite3.Connection.execute")
def _conn_execute(ctx: Ctx) -> Call:
    conn = _db(ctx)
    return lambda: conn.execute("select 1")


@case("sqlite3.Connection.executemany")
def _conn_executemany(ctx: Ctx) -> Call:
    conn = _db(ctx)
    return lambda: conn.executemany("insert into t values (?)", [(1,), (2,)])


@case("sqlite3.Connection.executescript")
def _conn_executescript(ctx: Ctx) -> Call:
    conn = _db(ctx)
    return lambda: conn.executescript("select 1;")


@case("sqlite3.Connection.commit")
def _conn_commit(ctx: Ctx) -> Call:
    conn = _db(ctx)
    conn.execute("insert into t values (1)")
    return conn.commit


@case("sqlite3.Connection.rollback")
def _conn_rollback(ctx: Ctx) -> Call:
    conn = _db(ctx)
    conn.execute("insert into t values (1)")
    return conn.rollback


@case("sqlite3.Cursor.execute")
def _cur_execute(ctx: Ctx) -> Call:
    cur = _db(ctx).cursor()
    return lambda: cur.execute("select 1")


@case("sqlite3.Cursor.executemany")
def _cur_executemany(ctx: Ctx) -> Call:
    cur = _db(ctx).cursor()
    return lambda: cur.executemany("insert into t values (?)", [(1,)])


@case("sqlite3.Cursor.executescript")
def _cur_executescript(ctx: Ctx) -> Call:
    cur = _db(ctx).cursor()
    return lambda: cur.executescript("select 1;")


def _selected(ctx: Ctx) -> sqlite3.Cursor:
    conn = _db(ctx)
    conn.executemany("insert into t values (?)", [(1,), (2,), (3,)])
    return conn.execute("select x from t")


@case("sqlite3.Cursor.fetchone")
def _fetchone(ctx: Ctx) -> Call:
    return _selected(ctx).fetchone


@case("sqlite3.Cursor.fetchmany")
def _fetchmany(ctx: Ctx) -> Call:
    cur = _selected(ctx)
    return lambda: cur.fetchmany(2)


@case("sqlite3.Cursor.fetchall")
def _fetchall(ctx: Ctx) -> Call:
    return _selected(ctx).fetchall


# -- http --------------------------------------------------------------------------------


def _http_conn(ctx: Ctx) -> Any:
    import http.client

    conn = http.client.HTTPConnection(*ctx.servers.http_address)
    ctx.later(conn.close)
    return conn


@case("http.client.HTTPConnection.connect")
def _http_connect(ctx: Ctx) -> Call:
    return _http_conn(ctx).connect  # type: ignore[no-any-return]


@case("http.client.HTTPConnection.request")
def _http_request(ctx: Ctx) -> Call:
    conn = _http_conn(ctx)
    conn.connect()
    return lambda: conn.request("GET", "/")


@case("http.client.HTTPConnection.getresponse")
def _http_getresponse(ctx: Ctx) -> Call:
    conn = _http_conn(ctx)
    conn.request("GET", "/")
    return conn.getresponse  # type: ignore[no-any-return]


@case("http.client.HTTPResponse.read")
def _http_read(ctx: Ctx) -> Call:
    conn = _http_conn(ctx)
    conn.request("GET", "/")
    response = conn.getresponse()
    return response.read  # type: ignore[no-any-return]


@case("urllib.request.urlopen")
def _urlopen(ctx: Ctx) -> Call:
    def call() -> object:
        with urllib.request.urlopen(ctx.servers.url) as response:
            return response.status

    return call


@case("urllib.request.urlretrieve")
def _urlretrieve(ctx: Ctx) -> Call:
    target = ctx.fresh()
    return lambda: urllib.request.urlretrieve(ctx.servers.url, target)


@case("urllib.request.OpenerDirector.open")
def _opener(ctx: Ctx) -> Call:
    opener = urllib.request.build_opener()

    def call() -> object:
        with opener.open(ctx.servers.url) as response:
            return response.status

    return call


# -- third-party clients -------------------------------------------------------------------


@case("requests.Session.request")
def _requests(ctx: Ctx) -> Call:
    import requests

    return lambda: requests.get(ctx.servers.url, timeout=5)


@case("urllib3.PoolManager.urlopen")
def _urllib3_pool_manager(ctx: Ctx) -> Call:
    import urllib3

    manager = urllib3.PoolManager()
    ctx.later(manager.clear)
    return lambda: manager.urlopen("GET", ctx.servers.url)


@case("urllib3.HTTPConnectionPool.urlopen")
def _urllib3_pool(ctx: Ctx) -> Call:
    import urllib3

    pool = urllib3.HTTPConnectionPool(*ctx.servers.http_address)
    ctx.later(pool.close)
    return lambda: pool.urlopen("GET", "/")


@case("httpx.Client.send")
def _httpx(ctx: Ctx) -> Call:
    import httpx

    client = httpx.Client()
    ctx.later(client.close)
    return lambda: client.get(ctx.servers.url)


def _redis_client(ctx: Ctx) -> Any:
    import redis

    client = redis.Redis(port=ctx.servers.redis(), socket_timeout=5)
    client.ping()  # connected here, off the loop: the case's call is the only one
    ctx.later(client.close)
    return client


@case("redis.Redis.execute_command")
def _redis(ctx: Ctx) -> Call:
    client = _redis_client(ctx)
    return lambda: client.set("loopguard", "1")


@case("redis.Pipeline.execute")
def _redis_pipeline(ctx: Ctx) -> Call:
    client = _redis_client(ctx)

    def call() -> object:
        pipe = client.pipeline()
        pipe.incr("loopguard:n")  # queued, not sent
        pipe.get("loopguard:n")
        return pipe.execute()

    return call


def _pg(ctx: Ctx) -> Any:
    import psycopg2

    conn = psycopg2.connect(ctx.servers.postgres())
    ctx.later(conn.close)
    return conn


def _pg_table(ctx: Ctx) -> tuple[Any, str]:
    """A connection (made while the guard runs, so guarded) and a fresh table of 3 rows."""
    conn = _pg(ctx)
    table = f"t{next(_names)}"
    with conn.cursor() as cur:
        cur.execute(f"CREATE TABLE {table} (n int, word text)")
        cur.execute(f"INSERT INTO {table} VALUES (1, 'one'), (2, 'two'), (3, 'three')")
    conn.commit()
    return conn, table


@case("psycopg2.connect")
def _psycopg2(ctx: Ctx) -> Call:
    dsn = ctx.servers.postgres()

    def call() -> object:
        import psycopg2

        conn = psycopg2.connect(dsn)
        ctx.later(conn.close)
        return conn

    return call


@case("psycopg2.connection.commit", "psycopg2.connection.rollback")
def _pg_transaction(ctx: Ctx) -> Call:
    conn, table = _pg_table(ctx)
    with conn.cursor() as cur:
        cur.execute(f"DELETE FROM {table}")  # opens a transaction for the call to end
    end: Call = conn.commit if ctx.name.endswith("commit") else conn.rollback
    return end


@case("psycopg2.cursor.execute")
def _pg_execute(ctx: Ctx) -> Call:
    cur = _pg(ctx).cursor()
    return lambda: cur.execute("SELECT pg_sleep(0.01)")


@case("psycopg2.cursor.executemany")
def _pg_executemany(ctx: Ctx) -> Call:
    conn, table = _pg_table(ctx)
    cur = conn.cursor()
    return lambda: cur.executemany(f"INSERT INTO {table} VALUES (%s, %s)", [(4, "a"), (5, "b")])


@case("psycopg2.cursor.callproc")
def _pg_callproc(ctx: Ctx) -> Call:
    cur = _pg(ctx).cursor()
    return lambda: cur.callproc("pg_sleep", (0.01,))


@case("psycopg2.cursor.fetchone", "psycopg2.cursor.fetchmany", "psycopg2.cursor.fetchall")
def _pg_fetch(ctx: Ctx) -> Call:
    # A named (server-side) cursor: each fetch is a round trip to the server.
    conn, table = _pg_table(ctx)
    cur = conn.cursor(name=f"c{next(_names)}")
    cur.execute(f"SELECT n, word FROM {table} ORDER BY n")
    fetch: Call = getattr(cur, ctx.name.rsplit(".", 1)[1])
    return fetch


@case("psycopg2.cursor.copy_from", "psycopg2.cursor.copy_to", "psycopg2.cursor.copy_expert")
def _pg_copy(ctx: Ctx) -> Call:
    conn, table = _pg_table(ctx)
    cur = conn.cursor()
    method = ctx.name.rsplit(".", 1)[1]
    if method == "copy_from":
        return lambda: cur.copy_from(io.StringIO("7\tseven\n"), table)
    if method == "copy_to":
        return lambda: cur.copy_to(io.StringIO(), table)
    return lambda: cur.copy_expert(f"COPY {table} TO STDOUT", io.StringIO())


@contextlib.contextmanager
def prepared(name: str, tmp: Path, servers: Servers) -> Iterator[Call]:
    """Prepare the case for ``name``; skip (by raising ``_Skip``) when it cannot run."""
    ctx = Ctx(tmp, servers, name)
    try:
        yield CASES[name](ctx)
    finally:
        ctx.close()


Skip = _Skip
