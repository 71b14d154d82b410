"""Culprit rules: the deepest user frame of the most sampled stack."""

from __future__ import annotations

import asyncio
import json
import os
import sysconfig

from loopguard import Frame, Stall
from loopguard._core.frames import LIBRARY, PLUMBING, USER, classify, culprit_of
from loopguard._watchdog.sampling import MAX_STACKS, StackFolder
from loopguard.sinks import format_stall

STDLIB = sysconfig.get_paths()["stdlib"]
SITE = sysconfig.get_paths()["purelib"]


def test_classify() -> None:
    assert classify(asyncio.__file__) == PLUMBING
    assert classify(json.__file__) == PLUMBING
    assert classify(os.path.join(SITE, "requests", "api.py")) == LIBRARY
    assert classify(os.path.join(SITE, "anyio", "_core", "_eventloop.py")) == PLUMBING
    assert classify("/srv/app/handlers.py") == USER
    assert classify("<frozen runpy>") == PLUMBING
    assert classify("<string>") == USER


def test_culprit_is_deepest_user_frame_not_the_library_below_it() -> None:
    stack = (
        Frame(os.path.join(STDLIB, "asyncio", "events.py"), 80, "Handle._run"),
        Frame("/srv/app/handlers.py", 12, "handler"),
        Frame("/srv/app/handlers.py", 30, "parse"),
        Frame(os.path.join(SITE, "requests", "api.py"), 59, "get"),
        Frame(os.path.join(STDLIB, "socket.py"), 700, "recv_into"),
    )
    assert culprit_of(stack) == Frame("/srv/app/handlers.py", 30, "parse")


def test_culprit_falls_back_to_library_then_anything() -> None:
    lib = Frame(os.path.join(SITE, "pydantic", "main.py"), 5, "validate")
    plumbing = Frame(os.path.join(STDLIB, "asyncio", "events.py"), 80, "Handle._run")
    assert culprit_of((plumbing, lib)) == lib
    assert culprit_of((plumbing,)) == plumbing
    assert culprit_of(()) is None


def test_folder_keeps_most_common_stack_and_is_bounded() -> None:
    folder = StackFolder()
    hot = (Frame("/app/a.py", 1, "f"),)
    for _ in range(5):
        folder.add(hot)
    for i in range(MAX_STACKS * 3):
        folder.add((Frame("/app/b.py", i, "g"),))
    assert folder.total == 5 + MAX_STACKS * 3
    folded = folder.folded()
    assert len(folded) == MAX_STACKS
    assert folded[0].frames == hot
    assert folded[0].count == 5
    assert folder.overflow == MAX_STACKS * 3 - (MAX_STACKS - 1)
    assert folder.culprit() == hot[0]


def test_format_stall_puts_culprit_first_and_folds_plumbing() -> None:
    culprit = Frame("/srv/app/handlers.py", 30, "parse")
    stack = (
        Frame(os.path.join(STDLIB, "asyncio", "base_events.py"), 1, "run_forever"),
        Frame(os.path.join(STDLIB, "asyncio", "events.py"), 80, "Handle._run"),
        Frame("/srv/app/handlers.py", 12, "handler"),
        culprit,
    )
    from loopguard import StackSample

    stall = Stall(0.0, 0.25, "blocked", "Task-7", culprit, (StackSample(3, stack),), 3)
    text = format_stall(stall)
    first = text.splitlines()[0]
    assert "250 ms" in first
    assert "Task-7" in first
    assert "/srv/app/handlers.py:30 in parse" in first
    assert "... 2 frame(s) in asyncio" in text
    assert text.splitlines()[-1].endswith("<-- culprit")


def test_stall_to_dict_is_json() -> None:
    culprit = Frame("/a.py", 3, "f")
    stall = Stall(1.5, 0.2, "blocked", None, culprit, attributes={"route": "/x"})
    data = json.loads(json.dumps(stall.to_dict()))
    assert data["kind"] == "stall"
    assert data["culprit"] == {"file": "/a.py", "line": 3, "function": "f"}
    assert data["attributes"] == {"route": "/x"}
