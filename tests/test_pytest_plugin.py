"""The pytest plugin, run through pytester on real test files."""

from __future__ import annotations

import importlib.util
import textwrap

import pytest

# These tests run inner sessions that stall and block loops on purpose.
pytestmark = pytest.mark.loopguard(enabled=False)

ASYNCIO_HEADER = """\
import asyncio, time, threading, os
import pytest

def spin(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:  # SPIN
        pass
"""


INI = "[pytest]\nasyncio_default_fixture_loop_scope = function\n"


def write(pytester: pytest.Pytester, body: str, name: str = "test_it") -> None:
    pytester.makepyfile(**{name: ASYNCIO_HEADER + textwrap.dedent(body)})
    if not (pytester.path / "tox.ini").exists():
        pytester.makeini(INI)


def line_in(pytester: pytest.Pytester, marker: str, name: str = "test_it.py") -> int:
    text = (pytester.path / name).read_text()
    return next(i for i, line in enumerate(text.splitlines(), 1) if marker in line)


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest("-p", "no:cacheprovider", "-p", "no:randomly", *args)


def test_inert_unless_enabled(pytester: pytest.Pytester) -> None:
    write(
        pytester,
        """
        original = time.sleep

        @pytest.mark.asyncio
        async def test_blocks():
            assert time.sleep is original
            time.sleep(0.01)
            spin(0.2)
        """,
    )
    run(pytester).assert_outcomes(passed=1)


def test_blocking_call_fails_the_test_at_the_line(pytester: pytest.Pytester) -> None:
    write(
        pytester,
        """
        @pytest.mark.asyncio
        async def test_sleeps():
            time.sleep(0.01)  # THE LINE

        @pytest.mark.asyncio
        async def test_fine():
            await asyncio.sleep(0.01)
        """,
    )
    result = run(pytester, "--loopguard")
    result.assert_outcomes(passed=1, failed=1)
    line = line_in(pytester, "# THE LINE")
    result.stdout.fnmatch_lines(
        [
            "*BlockingCallError: blocking call time.sleep() on the asyncio event loop*",
            f"*blocking call time.sleep() on the event loop*test_it.py:{line} in test_sleeps*",
            "*stack, innermost last*",
        ]
    )


def test_caught_blocking_call_error_still_fails(pytester: pytest.Pytester) -> None:
    write(
        pytester,
        """
        @pytest.mark.asyncio
        async def test_swallows():
            try:
                time.sleep(0.01)
            except Exception:
                pass
        """,
    )
    result = run(pytester, "--loopguard")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*loopguard: the event loop was blocked:*", "*time.sleep()*"])


SPINS = """
@pytest.mark.asyncio
async def test_spins():
    await asyncio.sleep(0.01)
    spin(0.4)
    await asyncio.sleep(0.01)
"""


def test_stall_fails_with_culprit_and_stack(pytester: pytest.Pytester) -> None:
    write(pytester, SPINS)
    result = run(pytester, "--loopguard")
    result.assert_outcomes(failed=1)
    spin_line = line_in(pytester, "# SPIN")
    result.stdout.fnmatch_lines(
        [
            "*loopguard: the event loop was blocked (stall threshold 100 ms):*",
            "*event loop blocked for * ms in task*",
            "*stack (*), innermost last:*",
        ]
    )
    out = result.stdout.str()
    assert f"test_it.py:{spin_line} in spin" in out or f"test_it.py:{spin_line + 1} in spin" in out
    assert "<-- culprit" in out


def test_dash_vv_shows_every_frame_of_a_stall(pytester: pytest.Pytester) -> None:
    write(pytester, SPINS)
    folded = run(pytester, "--loopguard").stdout.str()
    assert "<-- culprit" in folded
    assert "frame(s) in asyncio" in folded  # the loop's frames are folded by default
    full = run(pytester, "--loopguard", "-vv").stdout.str()
    assert "<-- culprit" in full
    assert "frame(s) in" not in full
    assert "asyncio/events.py:" in full  # the loop's own frames, shown one by one


def test_stall_at_the_very_end_of_the_test_is_caught(pytester: pytest.Pytester) -> None:
    write(
        pytester,
        """
        @pytest.mark.asyncio
        async def test_spins_last():
            spin(0.3)
        """,
    )
    run(pytester, "--loopguard").assert_outcomes(failed=1)


def test_threshold_option_and_marker(pytester: pytest.Pytester) -> None:
    write(
        pytester,
        """
        @pytest.mark.asyncio
        async def test_short():
            spin(0.2)

        @pytest.mark.loopguard(threshold=5)
        @pytest.mark.asyncio
        async def test_lenient():
            spin(0.3)

        @pytest.mark.loopguard(threshold=0.05)
        @pytest.mark.asyncio
        async def test_strict():
            spin(0.12)
        """,
    )
    result = run(pytester, "--loopguard", "--loopguard-threshold", "0.5")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["FAILED *test_strict*"])


def test_sync_tests_that_run_no_loop_never_fail(pytester: pytest.Pytester) -> None:
    write(
        pytester,
        """
        def test_sync_blocking():
            time.sleep(0.3)
            spin(0.3)
            with open(__file__) as fh:
                fh.read()

        def test_sync_test_running_a_loop_is_checked():
            async def main():
                time.sleep(0.001)
            asyncio.run(main())
        """,
    )
    result = run(pytester, "--loopguard")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["FAILED *test_sync_test_running_a_loop_is_checked*"])


def test_blocking_warn_and_off(pytester: pytest.Pytester) -> None:
    write(
        pytester,
        """
        @pytest.mark.asyncio
        async def test_sleeps():
            time.sleep(0.01)
        """,
    )
    warn = run(pytester, "--loopguard", "--loopguard-blocking=warn")
    warn.assert_outcomes(passed=1)
    warn.stdout.fnmatch_lines(
        [
            "*loopguard: reported, not failed*",
            "*test_it.py::test_sleeps: [[]warn[]] blocking call time.sleep() on the event loop*",
        ]
    )
    run(pytester, "--loopguard", "--loopguard-blocking=off").assert_outcomes(passed=1)


def test_markers_disable_and_enable(pytester: pytest.Pytester) -> None:
    write(
        pytester,
        """
        @pytest.mark.loopguard(enabled=False)
        @pytest.mark.asyncio
        async def test_disabled():
            time.sleep(0.01)
            spin(0.3)

        @pytest.mark.loopguard(blocking="off")
        @pytest.mark.asyncio
        async def test_blocking_off():
            time.sleep(0.01)

        @pytest.mark.loopguard
        @pytest.mark.asyncio
        async def test_opted_in():
            time.sleep(0.01)

        @pytest.mark.asyncio
        async def test_unmarked():
            time.sleep(0.01)
        """,
    )
    # Without --loopguard only the bare marker turns checks on (for its test).
    result = run(pytester)
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["FAILED *test_opted_in*"])
    result = run(pytester, "--loopguard")
    result.assert_outcomes(passed=2, failed=2)


def test_class_and_module_markers(pytester: pytest.Pytester) -> None:
    write(
        pytester,
        """
        pytestmark = pytest.mark.loopguard(blocking="off")

        @pytest.mark.asyncio
        async def test_module_level():
            time.sleep(0.01)

        @pytest.mark.loopguard(blocking="raise")
        class TestStrict:
            @pytest.mark.asyncio
            async def test_closest_wins(self):
                time.sleep(0.01)
        """,
    )
    result = run(pytester, "--loopguard")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["FAILED *TestStrict::test_closest_wins*"])


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        ("loopguard(treshold=1)", "unknown loopguard marker option 'treshold'"),
        ("loopguard(blocking='loud')", "loopguard blocking must be one of"),
        ("loopguard(threshold=-1)", "threshold must be > 0"),
        ("loopguard(False)", "keyword options only"),
        ("loopguard(allow=[':x'])", "loopguard allow"),
    ],
)
def test_bad_markers_are_usage_errors(pytester: pytest.Pytester, marker: str, message: str) -> None:
    write(
        pytester,
        f"""
        @pytest.mark.{marker}
        def test_x():
            pass
        """,
    )
    result = run(pytester)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{message}*"])


def test_bad_options_are_usage_errors(pytester: pytest.Pytester) -> None:
    write(pytester, "def test_x():\n    pass\n")
    result = run(pytester, "--loopguard", "--loopguard-threshold", "0")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    pytester.makeini(INI + "loopguard_blocking = loud\n")
    assert run(pytester).ret == pytest.ExitCode.USAGE_ERROR


def test_ini_enables(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI + "loopguard = true\nloopguard_threshold = 0.2\n")
    write(
        pytester,
        """
        @pytest.mark.asyncio
        async def test_below_threshold():
            spin(0.1)

        @pytest.mark.asyncio
        async def test_sleeps():
            time.sleep(0.01)
        """,
    )
    run(pytester).assert_outcomes(passed=1, failed=1)


def test_uvloop_under_pytest_asyncio(pytester: pytest.Pytester) -> None:
    pytest.importorskip("uvloop")
    plugin = pytest.importorskip("pytest_asyncio.plugin")
    if not hasattr(plugin, "PytestAsyncioSpecs"):
        pytest.skip("this pytest-asyncio has no loop-factory hook")
    pytester.makeconftest(
        """
        import uvloop

        def pytest_asyncio_loop_factories(config, item):
            return {"uvloop": uvloop.new_event_loop}
        """
    )
    write(
        pytester,
        """
        @pytest.mark.asyncio
        async def test_loop_is_uvloop():
            assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")

        @pytest.mark.asyncio
        async def test_sleeps():
            time.sleep(0.01)

        @pytest.mark.asyncio
        async def test_spins():
            spin(0.3)
        """,
    )
    result = run(pytester, "--loopguard", "--loopguard-blocking=raise")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(["*uvloop*"])


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_anyio_plugin(pytester: pytest.Pytester, backend: str) -> None:
    pytest.importorskip("anyio")
    if backend == "trio":
        pytest.importorskip("trio")
    pytester.makeconftest(
        f"""
        import pytest

        @pytest.fixture
        def anyio_backend():
            return {backend!r}
        """
    )
    write(
        pytester,
        """
        import anyio

        @pytest.mark.anyio
        async def test_sleeps():
            time.sleep(0.01)

        @pytest.mark.anyio
        async def test_spins():
            await anyio.sleep(0.01)
            spin(0.3)
            await anyio.sleep(0.01)

        @pytest.mark.anyio
        async def test_fine():
            await anyio.sleep(0.05)
            await anyio.to_thread.run_sync(time.sleep, 0.2)

        def test_sync_between():
            time.sleep(0.2)
        """,
    )
    result = run(pytester, "--loopguard")
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines(
        [
            f"*blocking call time.sleep() on the {backend} event loop*",
            f"*event loop blocked for * ms*[[]*{backend}*",
        ]
    )


def test_isolated_asyncio_test_case(pytester: pytest.Pytester) -> None:
    write(
        pytester,
        """
        import unittest

        class TestCase(unittest.IsolatedAsyncioTestCase):
            async def test_sleeps(self):
                time.sleep(0.01)

            async def test_spins(self):
                spin(0.3)

            async def test_fine(self):
                await asyncio.sleep(0.01)
        """,
    )
    result = run(pytester, "--loopguard")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(["*BlockingCallError*", "*event loop blocked for*"])


def test_blocking_in_an_async_fixture_fails_setup(pytester: pytest.Pytester) -> None:
    write(
        pytester,
        """
        import pytest_asyncio

        @pytest_asyncio.fixture
        async def slow_resource():
            time.sleep(0.01)
            yield 1

        @pytest.mark.asyncio
        async def test_uses_it(slow_resource):
            pass
        """,
    )
    result = run(pytester, "--loopguard")
    result.assert_outcomes(errors=1)


def test_xfail_that_blocks_stays_xfailed(pytester: pytest.Pytester) -> None:
    write(
        pytester,
        """
        @pytest.mark.xfail(strict=True)
        @pytest.mark.asyncio
        async def test_known_bad():
            spin(0.3)
            assert False
        """,
    )
    run(pytester, "--loopguard").assert_outcomes(xfailed=1)


def test_pending_tasks(pytester: pytest.Pytester) -> None:
    write(
        pytester,
        """
        @pytest.mark.asyncio
        async def test_leaves_a_task():
            asyncio.create_task(asyncio.sleep(10), name="forgotten")

        @pytest.mark.asyncio
        async def test_cleans_up():
            task = asyncio.create_task(asyncio.sleep(10))
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        """,
    )
    run(pytester, "--loopguard").assert_outcomes(passed=2)
    result = run(pytester, "--loopguard", "--loopguard-pending-tasks")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        ["*1 task(s) still pending when the test ended*", "*task 'forgotten'*"]
    )


def test_events_fixture_hands_the_test_its_events(pytester: pytest.Pytester) -> None:
    write(
        pytester,
        """
        def test_own_events(loopguard_events):
            async def main():
                time.sleep(0.01)
                spin(0.3)
            asyncio.run(main())
            assert [c.function for c in loopguard_events.blocking_calls] == ["time.sleep"]
            assert len(loopguard_events.stalls) == 1
            assert loopguard_events.stalls[0].culprit.function == "spin"

        def test_clean(loopguard_events):
            asyncio.run(asyncio.sleep(0.01))
            loopguard_events.assert_clean()
        """,
    )
    run(pytester, "--loopguard").assert_outcomes(passed=2)
    run(pytester).assert_outcomes(passed=2)


def test_allow_rules_and_their_report(pytester: pytest.Pytester) -> None:
    write(
        pytester,
        """
        def legacy():
            time.sleep(0.01)

        @pytest.mark.asyncio
        async def test_allowed():
            legacy()

        @pytest.mark.loopguard(allow=["test_it:test_marker_allowed"])
        @pytest.mark.asyncio
        async def test_marker_allowed():
            time.sleep(0.01)
        """,
    )
    result = run(
        pytester, "--loopguard", "--loopguard-allow", "test_it:legacy", "--loopguard-allow", "nope"
    )
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "*loopguard: allow rules*",
            "*1 call(s) allowed  test_it:legacy*",
            "*never fired  nope*",
            "*1 call(s) allowed  test_it:test_marker_allowed*",
        ]
    )


@pytest.mark.skipif(importlib.util.find_spec("xdist") is None, reason="needs pytest-xdist")
def test_xdist(pytester: pytest.Pytester) -> None:
    write(
        pytester,
        """
        import pytest

        @pytest.mark.parametrize("n", range(4))
        @pytest.mark.asyncio
        async def test_sleeps(n):
            time.sleep(0.001)

        @pytest.mark.parametrize("n", range(4))
        @pytest.mark.asyncio
        async def test_fine(n):
            await asyncio.sleep(0.001)

        def legacy():
            time.sleep(0.001)

        @pytest.mark.asyncio
        async def test_allowed():
            legacy()
        """,
    )
    result = pytester.runpytest_subprocess(
        "-p", "xdist", "-n", "2", "--loopguard", "--loopguard-allow", "test_it:legacy"
    )
    result.assert_outcomes(passed=5, failed=4)
    result.stdout.fnmatch_lines(["*1 call(s) allowed  test_it:legacy*"])


def test_without_xdist_the_plugin_loads(pytester: pytest.Pytester) -> None:
    """xdist-only hooks are optional: a suite without xdist runs, enabled or not."""
    write(
        pytester,
        """
        def test_plain():
            assert True

        def test_blocks():
            async def main():
                time.sleep(0.01)  # BLOCKS
            asyncio.run(main())
        """,
    )
    plain = run(pytester, "-p", "no:xdist")
    assert plain.ret == 0, plain.stdout.str()
    plain.assert_outcomes(passed=2)
    checked = run(pytester, "-p", "no:xdist", "--loopguard")
    checked.assert_outcomes(passed=1, failed=1)
    checked.stdout.fnmatch_lines([f"*test_it.py:{line_in(pytester, '# BLOCKS')} in *main*"])


def _package_under_test(pytester: pytest.Pytester) -> None:
    pkg = pytester.mkpydir("mypkg")
    (pkg / "__init__.py").write_text(
        textwrap.dedent(
            """
            import time

            def load():
                time.sleep(0.01)  # PKG BLOCKS

            def crunch(seconds):
                end = time.perf_counter() + seconds
                while time.perf_counter() < end:  # PKG SPINS
                    pass
            """
        )
    )


def test_default_scope_is_the_package_under_test(pytester: pytest.Pytester) -> None:
    """Blocking in the rootdir's package fails; in test scaffolding it is only reported."""
    _package_under_test(pytester)
    write(
        pytester,
        """
        import mypkg

        @pytest.mark.asyncio
        async def test_package_blocks():
            mypkg.load()

        @pytest.mark.asyncio
        async def test_package_stalls():
            mypkg.crunch(0.3)

        @pytest.mark.asyncio
        async def test_scaffolding_blocks():
            with open(__file__) as fh:  # SCAFFOLDING
                fh.read()

        @pytest.mark.asyncio
        async def test_scaffolding_stalls():
            spin(0.3)
        """,
    )
    result = run(pytester, "--loopguard")
    result.assert_outcomes(passed=2, failed=2)
    pkg_file = pytester.path / "mypkg" / "__init__.py"
    blocks = next(
        i for i, line in enumerate(pkg_file.read_text().splitlines(), 1) if "PKG BLOCKS" in line
    )
    result.stdout.fnmatch_lines(
        [
            f"*blocking call time.sleep() on the event loop*mypkg/__init__.py:{blocks} in load*",
            "*FAILED test_it.py::test_package_blocks*",
            "*FAILED test_it.py::test_package_stalls*",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*loopguard: reported, not failed*",
            f"*test_scaffolding_blocks: [[]outside scope[]] blocking call builtins.open()*"
            f"test_it.py:{line_in(pytester, '# SCAFFOLDING')}*",
            "*test_scaffolding_stalls: [[]outside scope[]] event loop blocked*",
            "loopguard scope: mypkg (packages found in the rootdir)",
        ]
    )
    everything = run(pytester, "--loopguard", "--loopguard-scope=*")
    everything.assert_outcomes(failed=4)


def test_scope_option_names_packages(pytester: pytest.Pytester) -> None:
    _package_under_test(pytester)
    write(
        pytester,
        """
        import mypkg

        @pytest.mark.asyncio
        async def test_package_blocks():
            mypkg.load()
        """,
    )
    pytester.makeini(INI + "loopguard_scope =\n    otherpkg\n")
    run(pytester, "--loopguard").assert_outcomes(passed=1)
    run(pytester, "--loopguard", "--loopguard-scope=mypkg").assert_outcomes(failed=1)
    pytester.makeini(INI + "loopguard_scope =\n    mypkg\n")
    run(pytester, "--loopguard").assert_outcomes(failed=1)
    # The command line wins over the ini key.
    run(pytester, "--loopguard", "--loopguard-scope=otherpkg").assert_outcomes(passed=1)
    bad = run(pytester, "--loopguard", "--loopguard-scope=not a module")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*loopguard_scope: not a module name: 'not a module'*"])


GC_TEST = """
import gc

class Node:
    __slots__ = ("other",)

heap = []
for _ in range(2_000_000):
    heap.append(Node())

@pytest.mark.asyncio
async def test_trivial_but_collects():
    await asyncio.sleep(0.05)
    gc.collect()  # a full collection over two million objects
    await asyncio.sleep(0.05)
"""


def test_gc_pause_is_reported_not_failed(pytester: pytest.Pytester) -> None:
    """A garbage-collection pause is no fault of the test that triggered it (by default)."""
    write(pytester, GC_TEST)
    # In a subprocess: the inner session's two-million-object heap must not outlive it.
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--loopguard", "--loopguard-threshold=0.05"
    )
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        ["*test_trivial_but_collects: [[]gc[]] event loop blocked for * by garbage collection*"]
    )
    strict = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--loopguard", "--loopguard-threshold=0.05", "--loopguard-gc=fail"
    )
    strict.assert_outcomes(failed=1)
    strict.stdout.fnmatch_lines(["*by garbage collection (generation 2*"])
    bad = run(pytester, "--loopguard", "--loopguard-gc=maybe")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR


def test_framework_internals_allowed_by_default(pytester: pytest.Pytester) -> None:
    """FastAPI's once-per-endpoint source lookup is allowed; the rule can be switched off."""
    pkg = pytester.mkpydir("fastapi")
    (pkg / "routing.py").write_text(
        "import os\n\ndef _extract_endpoint_context(func):\n    return os.stat(__file__)\n"
    )
    write(
        pytester,
        """
        from fastapi.routing import _extract_endpoint_context

        @pytest.mark.asyncio
        async def test_route_setup():
            _extract_endpoint_context(test_route_setup)
        """,
    )
    run(pytester, "--loopguard", "--loopguard-scope=*").assert_outcomes(passed=1)
    pytester.makeini(INI + "loopguard_default_allow = false\n")
    run(pytester, "--loopguard", "--loopguard-scope=*").assert_outcomes(failed=1)


PORTAL_TEST = """
import threading, time
import anyio
from anyio.from_thread import start_blocking_portal

async def short():
    await anyio.sleep(0.02)
    return 1

def in_thread(body):
    box = {}
    def worker():
        try:
            body(box)
        except BaseException as exc:
            box["exc"] = exc
    t = threading.Thread(target=worker, daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), "hung: the future was never completed"
    if "exc" in box:
        raise box["exc"]
    return box

def portal_round_trip(box):
    with start_blocking_portal() as portal:
        fut = portal.start_task_soon(short)
        # Held by the waiting side, as Future.result() and concurrent.futures.wait()
        # hold it: the loop thread completes the future meanwhile.
        with fut._condition:
            time.sleep(0.06)  # the task ends meanwhile (its loop waits < the threshold)
        box["result"] = fut.result()

def test_portal_future_completes():
    assert in_thread(portal_round_trip)["result"] == 1

def test_portal_future_completes_under_blockbuster():
    blockbuster = pytest.importorskip("blockbuster")
    bb = blockbuster.BlockBuster()
    bb.activate()
    try:
        assert in_thread(portal_round_trip)["result"] == 1
    finally:
        bb.deactivate()

def test_short_critical_section_is_not_blocking():
    async def main():
        event = threading.Event()
        holder_in = threading.Event()
        def holder():
            with event._cond:
                holder_in.set()
                time.sleep(0.002)  # a short critical section in another thread
        t = threading.Thread(target=holder)
        t.start()
        holder_in.wait()
        event.set()  # the loop thread takes the condition the holder has for 2 ms
        await asyncio.to_thread(t.join)
        assert event.is_set()
    asyncio.run(main())
"""


def test_no_deadlock_completing_a_future_from_the_loop(pytester: pytest.Pytester) -> None:
    """A future's condition held by its waiter never makes the loop's set_result fail.

    The guard used to refuse the loop thread's ``with self._condition`` in
    ``Future.set_result`` while the waiting thread held it: the future was never
    completed and the waiter (anyio's ``BlockingPortal.call``, Starlette's
    ``TestClient``) hung for ever.
    """
    write(pytester, PORTAL_TEST)
    result = run(pytester, "--loopguard", "-p", "no:randomly")
    result.assert_outcomes(passed=3)


def test_gil_held_by_the_test_thread_is_not_the_loops_fault(pytester: pytest.Pytester) -> None:
    """A portal loop waiting for the GIL the test's own thread holds is only reported."""
    write(
        pytester,
        """
        import re
        from anyio.from_thread import start_blocking_portal

        def test_client_side_work():
            with start_blocking_portal() as portal:
                portal.call(asyncio.sleep, 0.05)
                # The test thread holds the GIL in C while the portal's loop idles.
                re.match(r"^(a+)+$", "a" * 24 + "!")
                portal.call(asyncio.sleep, 0.05)
        """,
    )
    result = run(pytester, "--loopguard")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        ["*test_client_side_work: [[]test thread[]] event loop blocked for * waiting for the GIL*"]
    )


def test_one_incident_keeps_other_calls_of_the_same_function(pytester: pytest.Pytester) -> None:
    """The stall names the long sleep; the short sleep elsewhere is still reported."""
    write(
        pytester,
        """
        @pytest.mark.asyncio
        async def test_two_sleeps():
            time.sleep(0.01)  # SHORT
            await asyncio.sleep(0.05)
            time.sleep(0.4)  # LONG
            await asyncio.sleep(0.05)
        """,
    )
    result = run(pytester, "--loopguard", "--loopguard-blocking=warn")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            f"*in blocking call time.sleep()*test_it.py:{line_in(pytester, '# LONG')}*",
            f"*[[]warn[]] blocking call time.sleep()*test_it.py:{line_in(pytester, '# SHORT')}*",
        ]
    )
