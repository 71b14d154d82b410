"""Every catalogue entry is reported on a loop thread and silent off it."""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from blocking_cases import CASES, NEEDS, Servers, Skip, prepared

import loopguard
from loopguard._blocking import catalogue

# These tests make blocking calls on the loop on purpose (some take a while).
pytestmark = pytest.mark.loopguard(blocking="off", threshold=1)

NAMES = [entry.name for entry in catalogue()]


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    s = Servers(tmp_path_factory.mktemp("servers"))
    yield s
    s.close()


def _needs(name: str) -> None:
    for prefix, module in NEEDS.items():
        if name.startswith(prefix):
            pytest.importorskip(module)
    if name not in CASES:
        pytest.fail(f"no test case makes the blocking call {name}")


def test_every_entry_has_a_case() -> None:
    missing = [n for n in NAMES if n not in CASES]
    assert missing == []
    assert set(CASES) <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_reported_on_the_loop_thread(name: str, tmp_path: Path, servers: Servers) -> None:
    _needs(name)
    with loopguard.BlockingGuard("record", rate_limit=None) as guard:
        try:
            with prepared(name, tmp_path, servers) as call:
                guard.clear()

                async def main() -> None:
                    call()

                asyncio.run(main())
                reported = [e.function for e in guard.events]
        except Skip as exc:
            pytest.skip(str(exc))
    assert reported == [name]
    event = guard.events[0]
    assert event.task is not None and event.task.startswith("Task-")
    assert (event.culprit is not None and event.culprit.function.endswith("main")) or (
        event.culprit is not None and event.culprit.file.endswith("blocking_cases.py")
    )
    assert event.action == "record"
    assert 0 < event.duration < 5  # the call ran (record mode) and was timed


@pytest.mark.parametrize("name", NAMES)
def test_silent_off_the_loop_thread(name: str, tmp_path: Path, servers: Servers) -> None:
    _needs(name)
    with loopguard.BlockingGuard("raise") as guard:
        try:
            # No loop in this thread.
            with prepared(name, tmp_path, servers) as call:
                call()
            # A worker thread of a running loop.
            with prepared(name, tmp_path, servers) as call:

                async def main() -> None:
                    await asyncio.to_thread(call)

                asyncio.run(main())
        except Skip as exc:
            pytest.skip(str(exc))
    assert guard.events == []


def test_after_stop_every_target_is_the_original_again() -> None:
    for module in {e.module for e in catalogue()} | {"trio"}:
        try:
            importlib.import_module(module)
        except ImportError:
            continue

    def targets() -> dict[str, object]:
        out: dict[str, object] = {}
        for entry in catalogue():
            owner: object = importlib.import_module(entry.module)
            path = entry.target.split(".")
            try:
                for part in path[:-1]:
                    owner = getattr(owner, part)
                out[entry.name] = vars(owner).get(path[-1], getattr(owner, path[-1], None))
            except (AttributeError, TypeError):
                continue
        trio = importlib.import_module("trio")
        out["trio.run"] = trio.run
        out["trio.lowlevel.start_guest_run"] = trio.lowlevel.start_guest_run
        return out

    before = targets()
    with loopguard.BlockingGuard("warn"):
        during = targets()
    after = targets()
    changed = {n for n in before if during[n] is not before[n]}
    for name in ("time.sleep", "socket.socket.recv", "threading.Lock.acquire", "sqlite3.connect"):
        assert name in changed
    assert {"trio.run", "trio.lowlevel.start_guest_run", "builtins.open"} <= changed
    assert len(changed) > 80
    # Every target is the very same object again afterwards.
    assert [n for n in before if after[n] is not before[n]] == []
