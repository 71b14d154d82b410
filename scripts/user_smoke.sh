#!/usr/bin/env bash
# What a user gets: fresh virtual environments holding loopguard's runtime dependencies
# and pytest only (then each optional extra alone), the import, the CLI and the pytest
# plugin exercised there. No dev tools, no xdist, no pytest-asyncio.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
# Build the wheel once; every venv installs it (a user installs a wheel, not a checkout).
"$python" -m pip wheel --quiet --no-deps --wheel-dir "$root/dist" .
wheel="$(ls "$root"/dist/loopguard-*.whl)"
for extra in "" otel uvloop trio fastapi websockets redis; do
  name="${extra:-runtime}"
  echo "== user smoke: loopguard${extra:+[$extra]} + pytest"
  "$python" -m venv "$root/$name"
  "$root/$name/bin/python" -m pip install --quiet "${wheel}${extra:+[$extra]}" pytest
  for forbidden in xdist pytest_asyncio; do
    if "$root/$name/bin/python" -c "import $forbidden" 2>/dev/null; then
      echo "user smoke: $forbidden is installed in the $name venv; the smoke must run without it" >&2
      exit 1
    fi
  done
  "$root/$name/bin/python" -c "import loopguard, loopguard_integrations; print('import ok', loopguard.__version__)"
  # The integration each extra is for imports with that extra alone.
  "$root/$name/bin/python" - "$name" <<'PY'
import asyncio
import sys
from importlib.metadata import entry_points

from loopguard_integrations.broadcast import Broadcast


async def memory_round_trip() -> None:
    async with Broadcast("memory://") as b, b.subscribe("c") as sub:
        await b.publish("c", "hello")
        async for event in sub:
            assert event.message == "hello"
            return


asyncio.run(memory_round_trip())
extra = sys.argv[1]
if extra == "otel":
    import loopguard.otel

    found = entry_points(group="opentelemetry_instrumentor")
    assert any(e.name == "loopguard" for e in found), "instrumentor entry point missing"
if extra == "fastapi":
    import loopguard_integrations.asgi
    import loopguard_integrations.starlette
if extra == "websockets":
    import loopguard_integrations.websockets
if extra == "redis":
    Broadcast("redis://127.0.0.1:6379/0")
print("integrations ok:", extra)
PY
  (cd smoke && "$root/$name/bin/python" -m pytest -q)
done
