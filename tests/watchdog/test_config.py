"""Bad configuration fails at install with a ValueError naming the field."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

import loopguard
from loopguard import Config

# Tests here install their own watchdogs: the plugin's would double-watch.
pytestmark = pytest.mark.loopguard(enabled=False)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"threshold": 0}, "threshold"),
        ({"threshold": -1.0}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
        ({"threshold": "0.1"}, "threshold"),
        ({"threshold": 0.1, "interval": 0.1}, "interval"),
        ({"threshold": 0.1, "interval": 0.5}, "interval"),
        ({"interval": 0}, "interval"),
        ({"blocking": "sometimes"}, "blocking"),
        ({"record": -1}, "record"),
        ({"callback": 42}, "callback"),
    ],
)
def test_invalid_value_names_the_field(options: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        loopguard.install(**options)
    assert loopguard.current() is None


def test_unknown_option_is_a_value_error_naming_it() -> None:
    options: dict[str, Any] = {"treshold": 0.2}
    with pytest.raises(ValueError, match="treshold"):
        loopguard.install(**options)
    with pytest.raises(ValueError, match="treshold"):
        loopguard.watch(**options)


def test_default_interval_follows_threshold() -> None:
    assert Config().interval == 0.02
    assert Config(threshold=0.04).interval == pytest.approx(0.01)


def test_unwritable_json_path_fails_at_install(tmp_path: Any) -> None:
    with pytest.raises(OSError):
        loopguard.install(json=tmp_path / "missing-dir" / "events.jsonl")
    assert loopguard.current() is None
    # nothing was patched by the failed install
    assert "run_forever" in vars(asyncio.BaseEventLoop)
    assert not hasattr(vars(asyncio.BaseEventLoop)["run_forever"], "__wrapped__")


def test_install_twice_returns_the_same_watchdog(caplog: pytest.LogCaptureFixture) -> None:
    first = loopguard.install(log=False)
    assert loopguard.install(log=False) is first
    with caplog.at_level(logging.WARNING, "loopguard"):
        assert loopguard.install(threshold=0.5, log=False) is first
    assert "different options" in caplog.text
    assert first.config.threshold == 0.1


def test_uninstall_without_install_is_a_noop() -> None:
    loopguard.uninstall()
    loopguard.uninstall()
    assert loopguard.current() is None


def test_reinstall_after_uninstall_gives_a_new_watchdog() -> None:
    first = loopguard.install(log=False)
    loopguard.uninstall()
    second = loopguard.install(log=False)
    assert second is not first
    assert second.running
    assert not first.running


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LOOPGUARD_TRESHOLD": "1"}, "LOOPGUARD_TRESHOLD"),
        ({"LOOPGUARD_THRESHOLD": "abc"}, "LOOPGUARD_THRESHOLD"),
        ({"LOOPGUARD_THRESHOLD": "0.1", "LOOPGUARD_INTERVAL": "0.2"}, "interval"),
        ({"LOOPGUARD_PRECISE": "maybe"}, "LOOPGUARD_PRECISE"),
    ],
)
def test_environment_errors_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Config.from_env(env)


def test_environment_parses_every_setting(tmp_path: Any) -> None:
    config = Config.from_env(
        {
            "LOOPGUARD_THRESHOLD": "0.25",
            "LOOPGUARD_INTERVAL": "0.05",
            "LOOPGUARD_JSON": str(tmp_path / "x.jsonl"),
            "LOOPGUARD_LOG": "0",
            "LOOPGUARD_BLOCKING": "warn",
            "LOOPGUARD_PRECISE": "1",
            "LOOPGUARD_SUMMARY": "0",
            "UNRELATED": "x",
        }
    )
    assert config.threshold == 0.25
    assert config.interval == 0.05
    assert config.log is False
    assert config.blocking == "warn"
    assert config.precise is True


def test_every_option_is_declared_once() -> None:
    """install(), watch(), the environment and the CLI all follow Config's fields."""
    import dataclasses
    import inspect

    from loopguard._watchdog import env_options

    fields = {f.name: f.default for f in dataclasses.fields(Config)}
    install = inspect.signature(loopguard.install).parameters
    named = {n: p.default for n, p in install.items() if n != "unknown"}
    assert list(named) == list(fields)
    for name, default in named.items():
        if not isinstance(fields[name], type(dataclasses.MISSING)):
            assert default == fields[name], name
    watch = inspect.signature(loopguard.watch).parameters
    assert set(watch) - {"unknown"} <= set(fields)
    assert watch["log"].default is False  # the scoped form is quiet unless asked
    variables = {o.variable for o in env_options()}
    in_code_only = ("callback", "sinks", "record")
    assert {f"LOOPGUARD_{n.upper()}" for n in fields if n not in in_code_only} == variables
    help_text = _run_help()
    for option in env_options():
        if option.cli is not None:
            assert "--" + option.name.replace("_", "-") in help_text
        assert option.variable in help_text


def _run_help() -> str:
    import contextlib
    import io

    from loopguard.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main(["run", "--help"])
    return out.getvalue()
