"""Stall and blocking-call text a user acts on: the culprit always shown, the rest folded.

A stall deep inside a library (a synchronous HTTP client on the loop) must still show
the user's line marked as the culprit, with the library's frames folded into a line
that names the packages, and paths short enough to read.
"""

from __future__ import annotations

import asyncio
import http.server
import os
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator

import pytest
import requests
from helpers import line_of

import loopguard
import loopguard.testing
from loopguard import StackSample
from loopguard._core.frames import display_path
from loopguard.events import Frame, Stall
from loopguard.sinks import format_stall

SITE = sysconfig.get_paths()["purelib"]
STDLIB = sysconfig.get_paths()["stdlib"]
GET_LINE = line_of("MARK:get", __file__)


class _SlowHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        time.sleep(0.4)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def slow_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def fetch(url: str) -> int:
    return requests.get(url, timeout=10).status_code  # MARK:get


def _in_handler(url: str, depth: int) -> int:
    # A few user frames above the call, as a web framework's handler would have.
    return fetch(url) if depth == 0 else _in_handler(url, depth - 1)


@pytest.mark.loopguard(enabled=False)  # blocks the loop on purpose
def test_a_requests_get_stall_shows_the_users_line_and_folds_the_library(
    slow_server: str,
) -> None:
    async def main() -> None:
        _in_handler(slow_server, 3)

    with loopguard.watch(threshold=0.15, interval=0.01, log=False) as wd:
        asyncio.run(main())
        loopguard.testing.settle(wd)
    stalls = [s for s in wd.stalls if s.culprit is not None]
    assert stalls, wd.stalls
    stall = stalls[0]
    assert stall.culprit is not None
    assert (stall.culprit.file, stall.culprit.line) == (__file__, GET_LINE)
    frames = stall.stacks[0].frames
    inner = frames[frames.index(stall.culprit) + 1 :]
    assert len(inner) >= 12  # as deep as a report used to show: the culprit fell off

    text = format_stall(stall)
    lines = text.splitlines()
    marked = [line for line in lines if line.endswith("<-- culprit")]
    assert len(marked) == 1
    assert f"test_report_text.py:{GET_LINE} in fetch" in marked[0]
    assert SITE not in text and STDLIB not in text  # no absolute library paths
    assert "requests/api.py" in text  # the call the culprit made, from its package
    folded = [line for line in lines if line.strip().startswith("... ")]
    assert any("urllib3" in line for line in folded), text
    assert len(lines) <= 2 + 12

    full = format_stall(stall, full_stacks=True)
    assert len(full.splitlines()) == 2 + len(frames)
    assert "... " not in full.split("\n", 1)[1]


def _user(n: int) -> Frame:
    return Frame("/srv/app/views.py", n, f"view{n}")


def test_the_culprit_line_survives_any_depth_of_user_frames() -> None:
    # Fifty frames of user code above the culprit, twenty of a library below it.
    above = tuple(_user(n) for n in range(1, 51))
    culprit = Frame("/srv/app/views.py", 99, "leaf")
    below = tuple(Frame(os.path.join(SITE, "lib", f"m{n}.py"), n, f"deep{n}") for n in range(1, 21))
    stack = (*above, culprit, *below)
    stall = Stall(0.0, 0.3, "blocked", None, culprit, (StackSample(5, stack),), 5)
    lines = [line.strip() for line in format_stall(stall, max_frames=8).splitlines()[2:]]
    assert len(lines) == 8
    assert sum(line.endswith("/srv/app/views.py:99 in leaf   <-- culprit") for line in lines) == 1
    assert lines[0].startswith("... ") and "more line(s)" in lines[0]
    assert lines[-1] == "lib/m20.py:20 in deep20"  # the innermost frame
    assert "lib/m1.py:1 in deep1" in lines  # what the culprit called


def test_library_and_stdlib_frames_above_the_culprit_are_folded_by_package() -> None:
    culprit = Frame("/srv/app/views.py", 7, "view")
    stack = (
        Frame(os.path.join(STDLIB, "asyncio", "events.py"), 80, "Handle._run"),
        Frame(os.path.join(SITE, "starlette", "routing.py"), 70, "app"),
        Frame(os.path.join(SITE, "starlette", "routing.py"), 90, "handle"),
        Frame(os.path.join(SITE, "fastapi", "routing.py"), 300, "run_endpoint"),
        culprit,
    )
    stall = Stall(0.0, 0.3, "blocked", None, culprit, (StackSample(5, stack),), 5)
    lines = [line.strip() for line in format_stall(stall).splitlines()[2:]]
    assert lines[0] == "... 4 frame(s) in asyncio, starlette, fastapi"
    assert lines[1] == "/srv/app/views.py:7 in view   <-- culprit"


def test_paths_are_shown_from_their_package_or_the_current_directory(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert display_path(os.path.join(SITE, "requests", "api.py")) == os.path.join(
        "requests", "api.py"
    )
    assert display_path(os.path.join(STDLIB, "http", "client.py")) == os.path.join(
        "http", "client.py"
    )
    monkeypatch.chdir(tmp_path)
    here = os.path.join(os.fspath(tmp_path), "app", "main.py")
    assert display_path(here) == os.path.join("app", "main.py")
    monkeypatch.setattr(sys, "path", [*sys.path, "/opt/service/src"])
    assert display_path("/opt/service/src/pkg/mod.py") == os.path.join("pkg", "mod.py")
    assert display_path("/elsewhere/x.py") == "/elsewhere/x.py"
    assert display_path("<string>") == "<string>"


DEEP_IN_STDLIB = """
import asyncio, json, time

def slow_hook(obj):
    time.sleep(0.3)  # MARK:hook
    return obj

async def main():
    json.loads('{"a": 1}', object_hook=slow_hook)

asyncio.run(main())
"""


@pytest.mark.parametrize("flag", [[], ["--full-stacks"]], ids=["folded", "full"])
def test_loopguard_run_folds_frames_unless_asked_for_all(
    tmp_path: os.PathLike[str], flag: list[str]
) -> None:
    program = os.path.join(os.fspath(tmp_path), "deep.py")
    with open(program, "w", encoding="utf-8") as fh:
        fh.write(DEEP_IN_STDLIB)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    result = subprocess.run(
        [sys.executable, "-m", "loopguard", "run", *flag, "--", sys.executable, "deep.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    report = result.stderr[: result.stderr.index("loopguard summary")]
    assert f"deep.py:{line_of('MARK:hook', program)} in slow_hook   <-- culprit" in report
    decoder = os.path.join("json", "decoder.py") + ":"
    if flag:
        assert decoder in report  # every frame, from the standard library's root
        assert "frame(s) in" not in report
    else:
        assert decoder not in report
        assert "frame(s) in asyncio" in report and "json" in report
