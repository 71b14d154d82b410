"""Allow rules: where blocking calls are never reported, and the report of how often each fired.

Owns :class:`Allow` (a module, optionally a function, optionally some calls),
:data:`DEFAULT_ALLOW` (loopguard's own rules for imports, logging and the loops'
plumbing), :class:`RuleHits` and :func:`format_rules`. Nothing here knows about
patching or loops: the guard asks a rule whether it covers a call and a frame.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = ["DEFAULT_ALLOW", "Allow", "RuleHits", "format_rules"]


@dataclass(frozen=True)
class Allow:
    """A place where blocking calls are allowed (never reported).

    A rule matches a call when a frame on the caller's stack belongs to ``module``
    (or a submodule) and, if given, runs ``function``. By default any frame down the
    stack counts: ``Allow("logging")`` allows whatever a logging handler does. With
    ``direct=True`` only the frame that made the call counts.

    Args:
        module: Dotted module name; submodules match too.
        function: Function name, or qualified name such as ``"Thread.start"``
            (``None``: any function of the module).
        calls: Catalogue names the rule applies to, or prefixes (``"socket"``) or
            last parts (``"open"``) of them; empty: every call.
        direct: Match only the frame that made the call, not its callers.
        reason: Why the rule exists, shown in the rule report.
    """

    module: str
    function: str | None = None
    calls: tuple[str, ...] = ()
    direct: bool = False
    reason: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.module, str) or not self.module.strip(". "):
            raise ValueError(f"Allow: module must be a dotted module name, got {self.module!r}")
        calls: Any = self.calls  # a lone string is one call, not its characters
        object.__setattr__(self, "calls", (calls,) if isinstance(calls, str) else tuple(calls))

    @classmethod
    def parse(cls, rule: str | Allow) -> Allow:
        """Build a rule from its text form ``module[:function][@call,call...]``.

        Examples: ``"logging"``, ``"myapp.cache:warm_up"``,
        ``"myapp.db:Repo.load@sqlite3,open"``.

        Raises:
            ValueError: The text is not a valid rule.
        """
        if isinstance(rule, Allow):
            return rule
        if not isinstance(rule, str):
            raise ValueError(f"an allow rule is a string or Allow, got {rule!r}")
        text, _, calls = rule.strip().partition("@")
        module, _, function = text.partition(":")
        return cls(
            module.strip(),
            function.strip() or None,
            tuple(c.strip() for c in calls.split(",") if c.strip()),
        )

    def __str__(self) -> str:
        text = self.module + (f":{self.function}" if self.function else "")
        if self.calls:
            text += "@" + ",".join(self.calls)
        return text + (" (direct caller)" if self.direct else "")

    def applies_to(self, call: str) -> bool:
        """True when the rule covers the catalogue name ``call``.

        A name in :attr:`calls` covers itself, the names it is a prefix of
        (``"socket"``: every ``socket.*`` call) and the names it ends (``"open"``:
        ``builtins.open`` and ``io.open``).
        """
        return not self.calls or any(
            call == c or call.startswith(c + ".") or call.endswith("." + c) for c in self.calls
        )

    def matches(self, module: str, qualname: str) -> bool:
        """True when a frame of ``module`` running ``qualname`` is covered."""
        if module != self.module and not module.startswith(self.module + "."):
            return False
        function = self.function
        if function is None or function == qualname or qualname.startswith(function + "."):
            return True
        # A bare rule matches that function in any class; on Python 3.10 frames only
        # know the bare name, so "Class.method" matches any method of that name.
        if "." in qualname and "." in function:
            return False
        return function.rsplit(".", 1)[-1] == qualname.rsplit(".", 1)[-1]


DEFAULT_ALLOW: tuple[Allow, ...] = (
    Allow("importlib._bootstrap", "_find_and_load", reason="module code run while importing"),
    Allow("logging", reason="logging handlers: their locks and writes"),
    Allow("linecache", reason="source lines read for tracebacks"),
    Allow("coverage", reason="coverage.py's tracer"),
    Allow("_pydevd_bundle", reason="the debugger"),
    Allow("pydevd", reason="the debugger"),
    Allow("threading", "Thread.start", direct=True, reason="waiting for a new thread to start"),
    Allow(
        "selectors",
        calls=("select.select", "select.poll"),
        direct=True,
        reason="the event loop's own selector",
    ),
    Allow(
        "subprocess",
        "Popen._execute_child",
        direct=True,
        reason="a new child process reporting exec",
    ),
    Allow("asyncio.unix_events", direct=True, reason="asyncio's child watchers and unix servers"),
    Allow(
        "asyncio.base_events",
        "BaseEventLoop.shutdown_default_executor",
        direct=True,
        reason="asyncio joining its executor's shutdown thread",
    ),
    Allow(
        "concurrent.futures.thread",
        "ThreadPoolExecutor.submit",
        direct=True,
        reason="handing work to a thread pool",
    ),
    *(
        Allow(
            module,
            calls=(
                "threading.Condition.__enter__",
                "threading.RLock.acquire",
                "threading.Lock.acquire",
            ),
            direct=True,
            reason="a synchronisation object's own short critical section (a future's, an "
            "event's, a queue's); its waits are checked on their own. Refused, a future "
            "stayed unset and its waiter hung",
        )
        for module in ("concurrent.futures", "threading", "queue")
    ),
    Allow(
        "fastapi.routing",
        "_extract_endpoint_context",
        calls=("os.stat", "os.lstat", "open"),
        reason="FastAPI looks up an endpoint's source file once per endpoint, for error text",
    ),
)


class RuleHits(NamedTuple):
    """How often an allow rule let a blocking call through.

    Attributes:
        rule: The rule.
        hits: Calls it allowed since the guard started.
        default: Whether it is one of loopguard's default rules.
    """

    rule: Allow
    hits: int
    default: bool


def format_rules(rules: Iterable[RuleHits], *, defaults: bool = False) -> str:
    """Render a rule report: which rules fired (and how often) and which never did.

    Args:
        rules: From :meth:`BlockingGuard.rules`.
        defaults: Also list loopguard's default rules.

    Returns:
        A multi-line string without a trailing newline.
    """
    rows = [r for r in rules if defaults or not r.default]
    if not rows:
        return "loopguard allow rules: none configured"
    lines = ["loopguard allow rules:"]
    for r in rows:
        status = f"{r.hits} call(s) allowed" if r.hits else "never fired"
        reason = f" - {r.rule.reason}" if r.rule.reason else ""
        tag = " [default]" if r.default else ""
        lines.append(f"  {status:>20}  {r.rule}{tag}{reason}")
    return "\n".join(lines)
