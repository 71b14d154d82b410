"""What a user gets from ``pip install loopguard[extra] pytest``, with nothing else.

Run by ``scripts/user_smoke.sh`` in fresh virtual environments: the runtime
dependencies only, then each optional extra alone. No xdist, no pytest-asyncio.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import pytest

SUITE = """
import asyncio, time

def spin(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:  # SPINS
        pass

def test_plain():
    assert sum([1, 2]) == 3

def test_blocks_the_loop():
    async def main():
        time.sleep(0.01)  # BLOCKS
    asyncio.run(main())

def test_stalls_the_loop():
    async def main():
        spin(0.4)
    asyncio.run(main())

def test_healthy_loop():
    async def main():
        await asyncio.gather(*(asyncio.sleep(0.01) for _ in range(100)))
    asyncio.run(main())
"""

EXTRA_LOOPS = {
    "uvloop": """
import uvloop

def test_uvloop_blocks():
    async def main():
        time.sleep(0.01)  # BLOCKS-UVLOOP
    uvloop.run(main())
""",
    "trio": """
import trio

def test_trio_blocks():
    async def main():
        time.sleep(0.01)  # BLOCKS-TRIO
    trio.run(main)
""",
}


def _line(pytester: pytest.Pytester, marker: str) -> int:
    text = (pytester.path / "test_suite.py").read_text()
    return next(i for i, line in enumerate(text.splitlines(), 1) if marker in line)


def _suite(pytester: pytest.Pytester) -> list[str]:
    body = SUITE
    extras = [name for name in EXTRA_LOOPS if importlib.util.find_spec(name) is not None]
    for name in extras:
        body += EXTRA_LOOPS[name]
    pytester.makepyfile(test_suite=textwrap.dedent(body))
    return extras


def test_installed_but_not_enabled_changes_nothing(pytester: pytest.Pytester) -> None:
    extras = _suite(pytester)
    result = pytester.runpytest_subprocess()
    assert result.ret == 0, result.stdout.str()
    result.assert_outcomes(passed=4 + len(extras))
    assert "loopguard" not in result.stdout.str().replace("loopguard-", "")


def test_enabled_fails_what_blocks_and_names_the_line(pytester: pytest.Pytester) -> None:
    extras = _suite(pytester)
    result = pytester.runpytest_subprocess("--loopguard")
    result.assert_outcomes(passed=2, failed=2 + len(extras))
    result.stdout.fnmatch_lines(
        [f"*blocking call time.sleep() on the event loop*:{_line(pytester, '# BLOCKS')} in *main*"]
    )
    result.stdout.fnmatch_lines(
        [f"*event loop blocked for *test_suite.py:{_line(pytester, '# SPINS')} in spin*"]
    )
    for name in extras:
        marker = f"# BLOCKS-{name.upper()}"
        result.stdout.fnmatch_lines([f"*time.sleep()*test_suite.py:{_line(pytester, marker)}*"])


def test_cli_runs_a_program_and_names_the_line(tmp_path: pytest.TempPathFactory) -> None:
    app = tmp_path / "app.py"  # type: ignore[operator]
    app.write_text(
        textwrap.dedent(
            """
            import asyncio, time

            async def main():
                await asyncio.sleep(0.05)
                time.sleep(0.3)  # HOLDS
                await asyncio.sleep(0.05)

            asyncio.run(main())
            """
        )
    )
    cli = [sys.executable, "-m", "loopguard"]
    helped = subprocess.run([*cli, "--help"], capture_output=True, text=True, check=True)
    assert "run" in helped.stdout and "demo" in helped.stdout
    ran = subprocess.run(
        [*cli, "run", "--", sys.executable, str(app)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    assert "app.py:6 in main" in ran.stderr, ran.stderr
    assert "loopguard summary" in ran.stderr
