"""Run the test suite on every supported CPython (the interpreters must be on PATH)."""

import nox

nox.options.error_on_missing_interpreters = True
nox.options.default_venv_backend = "venv"


@nox.session(python=["3.10", "3.12", "3.13"])
def tests(session: nox.Session) -> None:
    session.install("-e", ".[dev]")
    session.run("python", "-m", "pytest", *session.posargs)
