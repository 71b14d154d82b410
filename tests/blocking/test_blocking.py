"""The blocking-call guard: modes, what does not count, loops, allow rules, reporting."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import queue
import re
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, SupportsIndex

import pytest
from helpers import line_of

import loopguard
from loopguard import Allow, BlockingCall, BlockingCallError, BlockingGuard, RecordingSink
from loopguard._blocking import DEFAULT_ALLOW, format_rules, running_guards

pytestmark = pytest.mark.loopguard(blocking="off")  # these tests block loops on purpose

HERE = __file__


def on_loop(fn: Callable[[], object], kind: str = "asyncio") -> Any:
    """Run ``fn`` inside a coroutine on a fresh loop of the given kind."""

    async def main() -> object:
        return fn()

    if kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.run(main())
    if kind == "trio":
        trio = pytest.importorskip("trio")
        return trio.run(main)
    if kind == "anyio-trio":
        anyio = pytest.importorskip("anyio")
        pytest.importorskip("trio")
        return anyio.run(main, backend="trio")
    return asyncio.run(main())


def functions(guard: BlockingGuard) -> list[str]:
    return [e.function for e in guard.events]


@pytest.fixture
def recording() -> Iterator[BlockingGuard]:
    with BlockingGuard("record", rate_limit=None) as guard:
        yield guard


# -- modes ---------------------------------------------------------------------------


def test_raise_refuses_the_call_before_it_runs(tmp_path: Path) -> None:
    target = tmp_path / "made"
    with BlockingGuard("raise") as guard, pytest.raises(BlockingCallError) as info:
        on_loop(lambda: os.mkdir(target))  # MARK:raise
    assert not target.exists()
    err = info.value
    assert err.function == "os.mkdir"
    assert err.event.action == "raise" and err.event.duration == 0.0
    assert err.event.culprit is not None
    assert err.event.culprit.line == line_of("MARK:raise", HERE)
    assert "os.mkdir()" in str(err) and "Task-" in str(err) and "to_thread" in str(err)
    assert functions(guard) == ["os.mkdir"]


def test_blocking_call_error_pickles() -> None:
    import pickle

    with BlockingGuard("raise"), pytest.raises(BlockingCallError) as info:
        on_loop(lambda: time.sleep(0.001))
    copy = pickle.loads(pickle.dumps(info.value))
    assert copy.event == info.value.event and str(copy) == str(info.value)


def test_warn_logs_with_stack_and_measured_duration(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "loopguard")
    with BlockingGuard("warn", log=True) as guard:
        on_loop(lambda: time.sleep(0.05))  # MARK:warn
        assert guard.flush()
    (event,) = guard.events
    assert event.function == "time.sleep" and event.action == "warn"
    assert 0.045 <= event.duration < 1.0
    assert event.loop == "asyncio" and event.thread == threading.current_thread().name
    assert event.stack[-1].line == line_of("MARK:warn", HERE)
    (record,) = [r for r in caplog.records if "blocking call" in r.getMessage()]
    text = record.getMessage()
    assert "time.sleep()" in text and "took 5" in text
    assert f"test_blocking.py:{line_of('MARK:warn', HERE)}" in text and "<-- culprit" in text


def test_record_reports_without_logging(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "loopguard")
    with BlockingGuard("record", log=True) as guard:
        on_loop(lambda: time.sleep(0.001))
        guard.flush()
    assert functions(guard) == ["time.sleep"]
    assert guard.events[0].action == "record"
    assert not [r for r in caplog.records if "blocking call" in r.getMessage()]


def test_off_reports_nothing_but_keeps_patches() -> None:
    with BlockingGuard("off") as guard:
        on_loop(lambda: time.sleep(0.001))
        assert guard in running_guards()
    assert guard.events == []


def test_mode_can_change_while_running_and_is_validated() -> None:
    with BlockingGuard("off") as guard:
        guard.mode = "raise"
        with pytest.raises(BlockingCallError):
            on_loop(lambda: time.sleep(0.001))
        with pytest.raises(ValueError, match="blocking must be one of"):
            guard.mode = "loud"  # type: ignore[assignment]


def test_the_call_s_own_exception_passes_through_and_is_still_reported(
    recording: BlockingGuard,
) -> None:
    with pytest.raises(FileNotFoundError):
        on_loop(lambda: os.stat("/nonexistent/loopguard"))
    assert functions(recording) == ["os.stat"]


# -- what does not count ---------------------------------------------------------------


def _nonblocking_socket() -> object:
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        b.setblocking(False)
        a.send(b"x")
        return b.recv(1)


def _uncontended_lock() -> object:
    lock, rlock = threading.Lock(), threading.RLock()
    with lock, rlock, rlock:
        pass
    return lock.acquire(timeout=1)


def _done_future() -> object:
    fut: concurrent.futures.Future[int] = concurrent.futures.Future()
    fut.set_result(1)
    return fut.result(), fut.exception()


def _set_event() -> object:
    event = threading.Event()
    event.set()
    return event.wait()


def _queue_with_room_and_items() -> object:
    q: queue.Queue[int] = queue.Queue()
    q.put(1)
    bounded: queue.Queue[int] = queue.Queue(2)
    bounded.put(1)
    return q.get(), bounded.get(), q.get(block=False) if not q.empty() else None


def _finished_thread() -> object:
    t = threading.Thread(target=lambda: None)
    t.start()
    while t.is_alive():
        time.sleep(0)
    t.join()
    return t.is_alive()


def _nonblocking_pipe() -> object:
    r, w = os.pipe()
    try:
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        os.write(w, b"x")
        return os.read(r, 1)
    finally:
        os.close(r)
        os.close(w)


def _zero_timeouts() -> object:
    a, b = socket.socketpair()
    with a, b:
        poller = select.poll()
        poller.register(a, select.POLLIN)
        cond = threading.Condition()
        with cond:
            cond.wait(0)
        time.sleep(0)
        return select.select([a], [], [], 0), poller.poll(0)


def _open_existing_fd() -> object:
    r, w = os.pipe()
    os.close(w)
    with open(r, "rb") as fh:
        return fh.read()


def _free_semaphore() -> object:
    sem = threading.Semaphore(1)
    with sem:
        pass
    return sem.acquire()


@pytest.mark.parametrize(
    "fn",
    [
        _nonblocking_socket,
        _uncontended_lock,
        _done_future,
        _set_event,
        _queue_with_room_and_items,
        _finished_thread,
        _nonblocking_pipe,
        _zero_timeouts,
        _open_existing_fd,
        _free_semaphore,
    ],
)
def test_calls_that_do_not_block_are_not_reported(fn: Callable[[], object]) -> None:
    with BlockingGuard("raise") as guard:
        on_loop(fn)
    assert guard.events == []


def test_finished_process_wait_is_not_reported() -> None:
    with BlockingGuard("raise") as guard:
        proc = subprocess.Popen(["true"])
        while proc.poll() is None:
            time.sleep(0.005)
        on_loop(proc.wait)
    assert guard.events == []


def test_nested_catalogue_calls_are_one_report(recording: BlockingGuard) -> None:
    on_loop(lambda: subprocess.run(["true"], check=True))
    assert functions(recording) == ["subprocess.run"]


def test_asyncio_s_own_subprocess_and_executor_plumbing_is_not_reported() -> None:
    async def main() -> None:
        proc = await asyncio.create_subprocess_exec("true")
        await proc.wait()
        await asyncio.get_running_loop().run_in_executor(None, time.sleep, 0.001)
        await asyncio.to_thread(time.sleep, 0.001)

    with BlockingGuard("raise") as guard:
        asyncio.run(main())
    assert guard.events == []


# -- loops ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["asyncio", "uvloop", "trio", "anyio-trio"])
def test_every_loop_kind_is_seen(kind: str, recording: BlockingGuard) -> None:
    def blocking() -> None:
        time.sleep(0.001)
        lock = threading.Lock()

        def hold() -> None:
            with lock:
                time.sleep(0.02)

        holder = threading.Thread(target=hold)
        holder.start()
        while not lock.locked():
            time.sleep(0)
        with lock:
            pass
        threading.Thread.join(holder, 0)  # zero timeout: never waits

    on_loop(blocking, kind)
    assert functions(recording) == ["time.sleep", "threading.Lock.acquire"]
    loop = {"anyio-trio": "trio"}.get(kind, kind)
    assert {e.loop for e in recording.events} == {loop}
    assert recording.events[0].task


def test_trio_guest_run_on_anyio_test_runner_is_seen(recording: BlockingGuard) -> None:
    pytest.importorskip("trio")
    from anyio._backends._trio import TestRunner

    async def test() -> None:
        time.sleep(0.001)

    with TestRunner() as runner:
        runner.run_test(test, {})
    assert functions(recording) == ["time.sleep"]
    assert recording.events[0].loop == "trio"


def test_loop_in_a_thread_is_seen_and_its_caller_thread_is_not(recording: BlockingGuard) -> None:
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(on_loop(lambda: time.sleep(0.001))))
    t.start()
    t.join()
    time.sleep(0.001)
    assert functions(recording) == ["time.sleep"]
    assert recording.events[0].thread == t.name


@pytest.mark.loopguard(threshold=5)  # a thousand connections may hold a loaded box's loop
def test_a_thousand_loopback_connections_report_nothing_from_asyncio_s_own_io() -> None:
    async def exchange(n: int) -> int:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(await reader.readexactly(1024))
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        sem = asyncio.Semaphore(100)

        async def client() -> int:
            async with sem:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"x" * 1024)
                await writer.drain()
                data = await reader.readexactly(1024)
                writer.close()
                await writer.wait_closed()
                return len(data)

        total = sum(await asyncio.gather(*(client() for _ in range(n))))
        server.close()
        await server.wait_closed()
        return total

    with BlockingGuard("raise") as guard:
        assert asyncio.run(exchange(1000)) == 1000 * 1024
    assert guard.events == []


def test_uvloop_loopback_exchange_reports_nothing() -> None:
    uvloop = pytest.importorskip("uvloop")

    async def exchange() -> bytes:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(await reader.readexactly(3))
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
        writer.write(b"abc")
        data = await reader.readexactly(3)
        writer.close()
        server.close()
        return data

    with BlockingGuard("raise") as guard:
        assert uvloop.run(exchange()) == b"abc"
    assert guard.events == []


# -- allow rules -----------------------------------------------------------------------


def allowed_helper() -> None:
    time.sleep(0.001)


def outer_helper() -> None:
    allowed_helper()


def test_rule_anywhere_down_the_stack() -> None:
    with BlockingGuard("raise", allow=[f"{__name__}:outer_helper"]) as guard:
        on_loop(outer_helper)
        with pytest.raises(BlockingCallError):
            on_loop(allowed_helper)  # not under outer_helper: reported
    hits = {str(r.rule): r.hits for r in guard.rules() if not r.default}
    assert hits == {f"{__name__}:outer_helper": 1}


def test_direct_rule_matches_only_the_calling_frame() -> None:
    direct = Allow(__name__, "outer_helper", direct=True)
    with BlockingGuard("record", allow=[direct]) as guard:
        on_loop(outer_helper)  # the call is made by allowed_helper, not outer_helper
    assert functions(guard) == ["time.sleep"]
    with BlockingGuard("record", allow=[Allow(__name__, "allowed_helper", direct=True)]) as g2:
        on_loop(outer_helper)
    assert g2.events == []


def test_rule_limited_to_some_calls() -> None:
    def both() -> None:
        allowed_helper()
        os.stat(HERE)

    with BlockingGuard("record", allow=[f"{__name__}@time"]) as guard:
        on_loop(both)
    assert functions(guard) == ["os.stat"]


def test_rule_report_names_rules_that_never_fired() -> None:
    with BlockingGuard("record", allow=["myapp.cache:warm_up", f"{__name__}"]) as guard:
        on_loop(allowed_helper)
    report = format_rules(guard.rules())
    assert "never fired  myapp.cache:warm_up" in report
    assert f"1 call(s) allowed  {__name__}" in report
    assert "[default]" not in report
    assert "[default]" in format_rules(guard.rules(), defaults=True)
    assert format_rules([]) == "loopguard allow rules: none configured"


def test_default_rules_let_logging_handlers_block() -> None:
    class SlowHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            time.sleep(0.001)

    log = logging.getLogger("loopguard-test-slow")
    handler = SlowHandler()
    log.addHandler(handler)
    log.propagate = False
    try:
        with BlockingGuard("raise") as guard:
            on_loop(lambda: log.warning("hello"))
    finally:
        log.removeHandler(handler)
    assert guard.events == []
    (logging_rule,) = [r for r in guard.rules() if r.rule.module == "logging"]
    assert logging_rule.hits == 1 and logging_rule.default
    with BlockingGuard("record", defaults=False) as bare:
        log.addHandler(handler)
        try:
            on_loop(lambda: log.warning("hello"))
        finally:
            log.removeHandler(handler)
    assert functions(bare) == ["time.sleep"]


def test_imports_on_the_loop_are_allowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "reads_at_import.py").write_text(
        "import os\nSIZE = os.stat(__file__).st_size\n", encoding="utf-8"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with BlockingGuard("raise") as guard:
        on_loop(lambda: __import__("reads_at_import"))
    assert guard.events == []
    sys.modules.pop("reads_at_import", None)


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("logging", Allow("logging")),
        ("a.b:f", Allow("a.b", "f")),
        ("a.b:C.m@time.sleep, open", Allow("a.b", "C.m", ("time.sleep", "open"))),
        (" a@socket ", Allow("a", calls=("socket",))),
    ],
)
def test_allow_parse(text: str, rule: Allow) -> None:
    assert Allow.parse(text) == rule
    assert Allow.parse(rule) is rule


@pytest.mark.parametrize("bad", ["", ":f", "  ", 3])
def test_bad_allow_rules_are_value_errors(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"module|rule"):
        Allow.parse(bad)
    with pytest.raises(ValueError, match="blocking_allow"):
        loopguard.Config(blocking_allow=[bad])


def test_allow_matching_by_qualname_and_prefix() -> None:
    rule = Allow("pkg.mod", "Repo.load")
    assert rule.matches("pkg.mod", "Repo.load")
    assert rule.matches("pkg.mod.sub", "Repo.load")
    assert rule.matches("pkg.mod", "Repo.load.<locals>.inner")
    assert rule.matches("pkg.mod", "load")  # Python 3.10 frames know only the name
    assert not rule.matches("pkg.mod", "Other.load")
    assert not rule.matches("pkg.module", "Repo.load")
    assert Allow("pkg", "load").matches("pkg", "Repo.load")
    assert Allow("a", calls=("socket",)).applies_to("socket.socket.recv")
    assert not Allow("a", calls=("socket",)).applies_to("socketserver.x")
    assert Allow("a", calls=("open",)).applies_to("builtins.open")
    assert Allow("a", calls=("open",)).applies_to("io.open")
    assert not Allow("a", calls=("open",)).applies_to("os.open_x")


def test_defaults_are_documented_rules() -> None:
    assert BlockingGuard.DEFAULT_ALLOW == DEFAULT_ALLOW
    assert all(rule.reason for rule in DEFAULT_ALLOW)


# -- reporting -------------------------------------------------------------------------


def test_listener_sees_every_call_and_sinks_are_rate_limited() -> None:
    seen: list[BlockingCall] = []
    sink = RecordingSink()
    with BlockingGuard(
        "record", sinks=[sink], listeners=[seen.append], rate_limit=(0.2, 2)
    ) as guard:

        def five() -> None:
            for _ in range(5):
                time.sleep(0)  # not blocking: never counted
                time.sleep(0.0001)  # MARK:five

        on_loop(five)
        guard.flush()
        assert len(seen) == 5 and len(guard.events) == 5
        assert [e.suppressed for e in sink.blocking_calls] == [0, 0]
        time.sleep(0.25)
        on_loop(lambda: time.sleep(0.0001))  # another line: its own budget
        on_loop(five)
        guard.flush()
    assert [e.suppressed for e in sink.blocking_calls] == [0, 0, 0, 3, 0]


def test_listener_that_raises_is_logged_and_the_call_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def bad(event: BlockingCall) -> None:
        raise RuntimeError("listener bug")

    with BlockingGuard("record", listeners=[bad]) as guard:
        on_loop(lambda: time.sleep(0.001))
    assert functions(guard) == ["time.sleep"]
    assert "listener" in caplog.text and "listener bug" in caplog.text


def test_guard_internal_failure_lets_the_call_through(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import loopguard._blocking.check as blocking

    def broken(*args: object) -> object:
        raise RuntimeError("internal bug")

    monkeypatch.setattr(blocking, "capture", broken)
    monkeypatch.setattr(blocking, "_failed_once", False)
    with BlockingGuard("raise"):

        def sleep_then_done() -> str:
            time.sleep(0.001)
            return "done"

        assert on_loop(sleep_then_done) == "done"
        on_loop(lambda: time.sleep(0.001))
    failures = [r for r in caplog.records if "guard failed" in r.getMessage()]
    assert len(failures) == 1 and "internal bug" in caplog.text


def test_a_sink_that_blocks_is_never_reported_itself(tmp_path: Path) -> None:
    calls: list[str] = []

    class SlowSink:
        def emit(self, event: object) -> None:
            time.sleep(0.001)
            calls.append(type(event).__name__)

    def quick_listener(event: BlockingCall) -> None:
        os.stat(HERE)  # on the loop thread, inside the guard: not a finding

    with BlockingGuard(
        "record", sinks=[SlowSink()], listeners=[quick_listener], rate_limit=None
    ) as guard:
        on_loop(lambda: time.sleep(0.001))
        guard.flush()
    assert functions(guard) == ["time.sleep"]
    assert calls == ["BlockingCall"]


def test_several_guards_each_get_their_event_and_raise_wins() -> None:
    with BlockingGuard("record") as quiet, BlockingGuard("raise") as strict:
        with pytest.raises(BlockingCallError):
            on_loop(lambda: time.sleep(0.001))
        assert [e.action for e in quiet.events] == ["record"]
        assert [e.action for e in strict.events] == ["raise"]
    assert running_guards() == ()


def test_event_to_dict_is_json() -> None:
    with BlockingGuard("record") as guard:
        on_loop(lambda: time.sleep(0.001))
    data = json.loads(json.dumps(guard.events[0].to_dict()))
    assert data["kind"] == "blocking_call" and data["function"] == "time.sleep"
    assert data["stack"][-1]["function"].endswith("<lambda>")
    assert set(data) >= {"duration", "task", "stack", "action", "culprit", "thread", "loop"}


def test_logging_sink_deduplicates_repeats(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "loopguard")
    sink = loopguard.LoggingSink(repeats=2)
    with BlockingGuard("warn", sinks=[sink], rate_limit=None) as guard:

        def many() -> None:
            for _ in range(6):
                time.sleep(0.0001)

        on_loop(many)
        guard.flush()
    messages = [r.getMessage() for r in caplog.records if "blocking call" in r.getMessage()]
    assert len(messages) == 3
    assert "stack, innermost last" in messages[0]
    assert "(repeat 1)" in messages[1] and "(repeat 2)" in messages[2]
    assert "counted, not logged" in messages[2]


# -- install() and the watchdog ----------------------------------------------------------


def test_install_runs_the_guard_and_uninstall_restores(tmp_path: Path) -> None:
    original = time.sleep
    path = tmp_path / "events.jsonl"
    wd = loopguard.install(blocking="record", json=path, log=False, blocking_allow=["x.y"])
    assert time.sleep is not original
    guard = wd.blocking_guard
    assert guard is not None and guard.mode == "record"
    assert [str(r.rule) for r in guard.rules() if not r.default] == ["x.y"]
    on_loop(lambda: time.sleep(0.001))
    assert guard.flush()
    assert [type(e).__name__ for e in wd.events] == ["BlockingCall"]
    loopguard.uninstall()
    assert time.sleep is original and wd.blocking_guard is None
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [d["kind"] for d in lines] == ["blocking_call"]


def test_install_without_blocking_patches_nothing() -> None:
    original = time.sleep
    wd = loopguard.install()
    assert time.sleep is original and wd.blocking_guard is None


def test_environment_sets_mode_and_rules() -> None:
    config = loopguard.Config.from_env(
        {"LOOPGUARD_BLOCKING": "raise", "LOOPGUARD_BLOCKING_ALLOW": "a.b c:d@time"}
    )
    assert config.blocking == "raise"
    assert config.blocking_allow == (Allow("a.b"), Allow("c", "d", ("time",)))


def test_stop_leaves_a_later_wrapper_working() -> None:
    original = time.sleep
    seen: list[float | SupportsIndex] = []
    with BlockingGuard("record") as guard:
        guarded = time.sleep

        def theirs(seconds: float | SupportsIndex) -> None:
            seen.append(seconds)
            guarded(seconds)

        time.sleep = theirs
    try:
        on_loop(lambda: time.sleep(0.001))
        assert seen == [0.001] and guard.events == []
        with BlockingGuard("record") as again:  # re-activation wraps on top of theirs
            on_loop(lambda: time.sleep(0.001))
        assert functions(again) == ["time.sleep"]
        assert time.sleep is theirs
    finally:
        time.sleep = original


def test_objects_made_while_guarded_work_after_stop() -> None:
    import sqlite3

    with BlockingGuard("raise"):
        lock = threading.Lock()
        rlock = threading.RLock()
        cond = threading.Condition(lock)
        conn = sqlite3.connect(":memory:")
    assert "guarded" in repr(lock)
    assert isinstance(rlock, type(threading.RLock()))

    def use() -> object:
        with lock:
            pass
        with rlock, rlock:
            pass
        with cond:
            cond.notify_all()
        return conn.execute("select 1").fetchall()

    assert on_loop(use) == [(1,)]
    conn.close()


@pytest.mark.skipif(
    not isinstance(threading.Lock, type), reason="threading.Lock is a function before Python 3.13"
)
def test_isinstance_threading_lock_still_works() -> None:
    plain = threading.Lock()
    with BlockingGuard("record"):
        guarded = threading.Lock()
        assert isinstance(guarded, threading.Lock)
        assert isinstance(plain, threading.Lock)


def test_reference_page_names_every_catalogue_entry() -> None:
    page = Path(__file__).parents[2] / "docs" / "reference" / "blocking.md"
    lines = page.read_text(encoding="utf-8").splitlines()

    rows = [line.split("|")[1] for line in lines if line.startswith("| `")]
    names = [entry.name for entry in BlockingGuard.catalogue()]
    roots = {n.split(".")[0] for n in names}

    def named_in(row: str) -> set[str]:
        # Full names, and names relative to the last full one before them:
        # "`socket.socket.recv`, `recv_into`", "`concurrent.futures.Future.result`,
        # `Future.exception`".
        out: set[str] = set()
        last = ""
        for token in re.findall(r"`([^`]+)`", row):
            if token.split(".")[0] in roots and "." in token:
                last = token
                out.add(token)
                continue
            parts = last.split(".")
            out.update(".".join([*parts[:i], token]) for i in range(1, len(parts)))
        return out

    documented = set().union(*(named_in(row) for row in rows))
    assert len(names) > 100
    assert [n for n in names if n not in documented] == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_forked_child_keeps_guarding() -> None:
    with BlockingGuard("record") as guard:
        on_loop(lambda: time.sleep(0.001))
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report what its own loop's blocking call gave
            try:
                guard.clear()
                on_loop(lambda: os.stat(HERE))
                os.write(w, ",".join(functions(guard)).encode())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as fh:
            seen = fh.read().decode()
        os.waitpid(pid, 0)
    assert seen == "os.stat"
    assert functions(guard) == ["time.sleep"]


@pytest.mark.loopguard(enabled=False)  # it stalls its loop on purpose
def test_a_blocking_call_that_stalls_the_loop_is_one_report(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The stall a warned call caused names the call and is not logged a second time."""
    from loopguard.testing import settle

    async def main() -> None:
        await asyncio.sleep(0.05)
        time.sleep(0.3)  # MARK:one-incident
        await asyncio.sleep(0.05)

    config = loopguard.Config(threshold=0.1, blocking="warn", log=True, record=100)
    with caplog.at_level(logging.WARNING, logger="loopguard"), loopguard.Watchdog(config) as wd:
        asyncio.run(main())
        settle(wd)
        assert wd.blocking_guard is not None
        wd.blocking_guard.flush()
        events = list(wd.events)
    calls = [e for e in events if isinstance(e, BlockingCall)]
    stalls = [e for e in events if isinstance(e, loopguard.Stall)]
    assert [c.function for c in calls] == ["time.sleep"]
    assert calls[0].duration >= 0.29
    assert len(stalls) == 1 and stalls[0].blocking_call == "time.sleep"
    assert stalls[0].culprit is not None
    assert stalls[0].culprit.line == line_of("MARK:one-incident", HERE)
    logged = [r.getMessage() for r in caplog.records]
    assert len([m for m in logged if "time.sleep" in m]) == 1, logged
    assert not [m for m in logged if m.startswith("event loop blocked")], logged


def test_a_call_that_does_not_block_is_not_checked_inside() -> None:
    """``acquire(timeout=0)`` takes the semaphore's condition for a few instructions.

    Its probe says it does not block; the condition it enters inside, held for a
    moment by another thread, must not be refused (as ``run_in_executor`` does it:
    ``ThreadPoolExecutor._adjust_thread_count`` calls ``_idle_semaphore.acquire(timeout=0)``).
    """
    sem = threading.Semaphore(0)
    held = threading.Event()

    def hold() -> None:
        with sem._cond:  # type: ignore[attr-defined]
            held.set()
            time.sleep(0.02)

    with BlockingGuard("raise") as guard:
        holder = threading.Thread(target=hold)
        holder.start()
        held.wait()
        assert on_loop(lambda: sem.acquire(timeout=0)) is False
        holder.join()
    assert guard.events == []
