#!/usr/bin/env bash
# The whole test suite, on a fresh machine or this one:
#   1. makes sure Postgres and Redis run on 127.0.0.1 (installs them with apt
#      and starts them when they do not);
#      starts the storage emulators (tests/emulators.sh);
#   2. builds the workspace (binaries included: the fleet tests run them);
#   3. runs every test: unit tests and the integration tests in tests/.
# Nothing is skipped: a test whose server is missing fails.
set -euo pipefail
cd "$(dirname "$0")/.."

export TEST_POSTGRES_URL=${TEST_POSTGRES_URL:-postgres://postgres:postgres@127.0.0.1:5432/test}
export TEST_REDIS_URL=${TEST_REDIS_URL:-redis://127.0.0.1:6379}

log() { printf '\n==> %s\n' "$*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_install() {
  log "installing $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

pg_up() { command -v pg_isready >/dev/null && pg_isready -h 127.0.0.1 -p 5432 -q; }
redis_up() { command -v redis-cli >/dev/null && [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = PONG ]; }

ensure_postgres() {
  if ! pg_up; then
    if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
      apt_install postgresql postgresql-client
    fi
    local version
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    log "starting PostgreSQL $version"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    for _ in $(seq 1 30); do pg_up && break; sleep 1; done
    pg_up || { echo "PostgreSQL did not start on 127.0.0.1:5432" >&2; exit 1; }
  fi
  # The tests log in as postgres/postgres over TCP (trust auth ignores the
  # password) and create one database per test from the `test` database.
  if ! psql "$TEST_POSTGRES_URL" -qtc 'SELECT 1' >/dev/null 2>&1; then
    log "preparing the postgres role and the test database"
    as_root runuser -u postgres -- psql -qc "ALTER USER postgres PASSWORD 'postgres'"
    as_root runuser -u postgres -- psql -qtc "SELECT 1 FROM pg_database WHERE datname = 'test'" | grep -q 1 \
      || as_root runuser -u postgres -- createdb test
  fi
  psql "$TEST_POSTGRES_URL" -qtc 'SELECT 1' >/dev/null
  # Databases left by earlier runs (one per test).
  psql "$TEST_POSTGRES_URL" -qAtc "SELECT datname FROM pg_database WHERE datname LIKE 'labelsync_test_%'" |
    while read -r db; do psql "$TEST_POSTGRES_URL" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null || true; done
}

ensure_redis() {
  if ! redis_up; then
    command -v redis-server >/dev/null || apt_install redis-server
    log "starting Redis"
    mkdir -p /tmp/labelsync-redis
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
      --dir /tmp/labelsync-redis --logfile /tmp/labelsync-redis/redis.log
    for _ in $(seq 1 30); do redis_up && break; sleep 1; done
    redis_up || { echo "Redis did not start on 127.0.0.1:6379" >&2; exit 1; }
  fi
}

command -v psql >/dev/null || apt_install postgresql-client
command -v curl >/dev/null || apt_install curl
# A TLS server with a certificate nobody trusts (security::net's unit tests).
command -v openssl >/dev/null || apt_install openssl
# A worker whose clock is off (tests/fleet.rs), with libfaketime preloaded.
command -v faketime >/dev/null || apt_install faketime
ensure_postgres
ensure_redis
# S3 (moto, s3s-fs), GCS (fake-gcs-server) and Azure (Azurite) emulators.
source tests/emulators.sh
ensure_emulators
# kubectl, kubernetes-validate, pyyaml and docker-compose for tests/deploy.rs.
source tests/deploy/tools.sh
ensure_deploy_tools
# standardwebhooks, schemathesis, openapi-spec-validator and openapi-python-client
# for the API tests.
source tests/api-tools.sh
ensure_api_tools
source tests/browser-tools.sh
ensure_browser_tools

log "building"
cargo build --workspace --bins --tests --locked

log "testing"
if cargo nextest --version >/dev/null 2>&1; then
  # One process per test, two at a time on these 2-core machines; a final
  # summary line counts every test run.
  cargo nextest run --workspace --locked --no-fail-fast --test-threads 2
else
  cargo test --workspace --locked --no-fail-fast --lib --bins --tests
fi
