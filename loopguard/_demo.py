"""The service ``loopguard demo`` runs: a healthy ticker and handlers that stall the loop.

Run it under ``loopguard run`` (as ``loopguard demo`` does) to see each stall reported
with its culprit line while the ticker shows how late the loop was, then the summary.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time

_PAYLOAD = json.dumps([{"id": i, "tags": ["x"] * 20, "score": i / 7} for i in range(4000)])


def fetch_profile_sync(user: int) -> dict[str, int]:
    """A blocking HTTP client call, as a sync SDK would make it."""
    time.sleep(0.3)  # stands in for requests.get(...)
    return {"user": user}


def score_documents(payload: str) -> float:
    """CPU-heavy parsing and scoring in pure Python."""
    total = 0.0
    deadline = time.perf_counter() + 0.25
    while time.perf_counter() < deadline:
        for doc in json.loads(payload)[:200]:
            total += sum(len(t) for t in doc["tags"]) * doc["score"]
    return total


def hash_password(password: bytes) -> bytes:
    """Key derivation on the loop: C code that releases the GIL, yet blocks the loop."""
    return hashlib.pbkdf2_hmac("sha256", password, b"salt", 400_000)


def validate_username(name: str) -> bool:
    """A catastrophic regex: C code that holds the GIL for the whole match."""
    return re.match(r"^(a+)+$", name) is not None


def build_report() -> None:
    """A background job in a worker thread: its C code holds the GIL, so the loop waits."""
    re.match(r"^(a+)+$", "a" * 23 + "!")


async def ticker(stop: asyncio.Event) -> None:
    """A healthy periodic task: it notices every stall as lateness."""
    period = 0.05
    worst = 0.0
    last_report = time.perf_counter()
    while not stop.is_set():
        before = time.perf_counter()
        await asyncio.sleep(period)
        worst = max(worst, time.perf_counter() - before - period)
        if time.perf_counter() - last_report >= 1.0:
            state = "healthy" if worst < 0.05 else "LATE"
            print(
                f"[ticker] worst lateness in the last second: {worst * 1e3:6.1f} ms  {state}",
                flush=True,
            )
            worst, last_report = 0.0, time.perf_counter()


async def handle_request(kind: str) -> None:
    """A request handler that does its slow work on the loop (the bug)."""
    if kind == "profile":
        fetch_profile_sync(42)
    elif kind == "score":
        score_documents(_PAYLOAD)
    elif kind == "password":
        hash_password(b"hunter2")
    elif kind == "username":
        validate_username("a" * 24 + "!")
    elif kind == "report":  # the loop is idle while it awaits, yet held
        await asyncio.to_thread(build_report)
    await asyncio.sleep(0)


async def handle_request_fixed(kind: str) -> None:
    """The same handler with the slow work moved to a worker thread."""
    if kind == "profile":
        await asyncio.to_thread(fetch_profile_sync, 42)
    elif kind == "score":
        await asyncio.to_thread(score_documents, _PAYLOAD)


async def main() -> None:
    """Run the demo scenario (about 10 seconds)."""
    stop = asyncio.Event()
    tick = asyncio.create_task(ticker(stop), name="ticker")
    steps = [
        ("a sync HTTP call (time.sleep) inside a handler", "profile"),
        ("CPU-heavy JSON scoring in pure Python", "score"),
        ("password hashing (C code that releases the GIL)", "password"),
        ("a catastrophic regex (C code that holds the GIL)", "username"),
        ("a report built in asyncio.to_thread (its C code holds the GIL)", "report"),
        ("the sync HTTP call again, three times (reports are rate-limited)", "profile"),
    ]
    print(
        "loopguard demo: a service with a ticker; handlers stall the loop on purpose.\n", flush=True
    )
    await asyncio.sleep(1.0)
    for title, kind in steps:
        print(f"--> request: {title}", flush=True)
        repeats = 3 if "three" in title else 1
        for _ in range(repeats):
            await asyncio.create_task(handle_request(kind), name=f"request-{kind}")
            await asyncio.sleep(0.3)
        await asyncio.sleep(0.6)
    print(
        "--> the fix: the same work in a worker thread (await asyncio.to_thread(...))", flush=True
    )
    for kind in ("profile", "score"):
        await asyncio.create_task(handle_request_fixed(kind), name=f"request-{kind}-fixed")
    await asyncio.sleep(1.2)
    stop.set()
    await tick
    print("\ndemo finished; the summary below groups stalls by culprit line.", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
