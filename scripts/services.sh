#!/usr/bin/env bash
# Install the servers some tests run against (PostgreSQL, Redis, Prometheus) when missing.
# Needs root and apt-get; elsewhere it says what is missing and the tests needing it skip.
set -euo pipefail

have_pg() {
  command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}
have_redis() { command -v redis-server >/dev/null 2>&1; }
have_prometheus() { command -v prometheus >/dev/null 2>&1; }

have_pg && have_redis && have_prometheus && exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing PostgreSQL, Redis and Prometheus servers for the tests (apt-get)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    postgresql redis-server prometheus >/dev/null
  have_pg && have_redis && have_prometheus && exit 0
  echo "error: PostgreSQL, Redis or Prometheus still missing after apt-get install" >&2
  exit 1
fi
echo "note: PostgreSQL, Redis and/or Prometheus servers not found (install postgresql," \
  "redis-server and prometheus);" \
  "the tests that need them will be skipped" >&2
