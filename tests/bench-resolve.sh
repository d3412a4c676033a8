#!/usr/bin/env bash
# How fast GET /api/v1/resolve answers under load: a scheduler (no Redis: the
# embedded queue, on a fresh Postgres database; callers use a token of
# LABELSYNC_API_TOKENS) with S3 sources on s3s-fs
# (:19001, which checks signatures; one presigning, one proxied) and a local one,
# and `wrk -t2 -c64` for D seconds against each of:
#   /healthz                          the server's floor
#   presigned S3 redirect             303 to a signed URL (no storage request)
#   S3 proxied 200 KB object          the bytes through labelsync
#   local proxied 200 KB object
#   direct S3 200 KB object           the same object straight from s3s-fs
#                                     (a presigned URL): the proxy's floor
#   tests/bench-resolve.sh [BIN_DIR] [D] [RTT_MS]
# BIN_DIR defaults to target/release (A/B: give another build's folder).
# With RTT_MS, the S3 bucket is the synthetic S3 server instead
# (`$BIN_DIR/examples/bench s3-server RTT_MS`: in memory, no signature
# check, every answer RTT_MS late): a distant bucket, as a cloud deployment
# sees it, where the storage and not the machine's cores is the limit.
# Needs the emulators running (tests/emulators.sh) and wrk (apt install wrk).
# Prints wrk's requests/s and p50 / p99 for each, the scheduler's CPU time
# per request (user + system, from /proc), and the ratios.
set -euo pipefail
command -v wrk >/dev/null || { echo "bench-resolve: wrk not found (apt-get install wrk)" >&2; exit 2; }
cd "$(dirname "$0")/.."
BIN_DIR=${1:-target/release}
D=${2:-10}
RTT_MS=${3:-}
BIN=$BIN_DIR/labelsync-scheduler
ADMIN=${TEST_POSTGRES_URL:-postgres://postgres:postgres@127.0.0.1:5432/test}
S3=${TEST_S3S_ENDPOINT:-http://127.0.0.1:19001}
KEY=${TEST_S3S_ACCESS_KEY:-labelsync-test}
SECRET=${TEST_S3S_SECRET_KEY:-labelsync-test-secret}
TOKEN=bench-resolve-token-0123456789abcdef
DB=labelsync_bench_resolve
URL=${ADMIN%/*}/$DB
PORT=18182
WORK=$(mktemp -d)
API=http://127.0.0.1:$PORT/api/v1
BUCKET=bench-resolve-$$
psql "$ADMIN" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
cleanup() {
  [ -n "${SERVER:-}" ] && kill "$SERVER" 2>/dev/null || true
  [ -n "${STORAGE:-}" ] && kill "$STORAGE" 2>/dev/null || true
  psql "$ADMIN" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" || true
  rm -rf "$WORK"
}
trap cleanup EXIT
if [ -n "$RTT_MS" ]; then
  "$BIN_DIR/examples/bench" s3-server "$RTT_MS" >"$WORK/storage" &
  STORAGE=$!
  for _ in $(seq 1 100); do [ -s "$WORK/storage" ] && break; sleep 0.1; done
  S3=$(head -1 "$WORK/storage")
fi

s3() { curl -sf --aws-sigv4 "aws:amz:us-east-1:s3" --user "$KEY:$SECRET" -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" "$@"; }
head -c 200000 /dev/urandom >"$WORK/img.jpg"
s3 -X PUT "$S3/$BUCKET" >/dev/null
s3 -X PUT --data-binary @"$WORK/img.jpg" "$S3/$BUCKET/img/a.jpg" >/dev/null
mkdir -p "$WORK/root/media"
cp "$WORK/img.jpg" "$WORK/root/media/a.jpg"

DATABASE_URL=$URL LABELSYNC_BIND=127.0.0.1:$PORT LABELSYNC_EMBEDDED_QUEUE_PATH=$WORK/queue.db \
  LABELSYNC_ALLOW_PRIVATE_ENDPOINTS=true LABELSYNC_SECRET_KEY=MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY= \
  LOCAL_FILES_SERVING_ENABLED=true LOCAL_FILES_DOCUMENT_ROOT=$WORK/root RUST_LOG=warn \
  LABELSYNC_API_TOKENS=$TOKEN \
  "$BIN" serve >"$WORK/server.log" 2>&1 &
SERVER=$!
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break; sleep 0.1; done

AUTH="Authorization: Bearer $TOKEN"
post() { curl -sf -H "$AUTH" -H 'content-type: application/json' -d "$2" "$API$1"; }
PROJECT=$(post /projects '{"title": "bench"}' | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')
s3_source() { # project, presign
  post /storages "{\"project_id\": $1, \"role\": \"source\", \"backend\": \"s3\", \"prefix\": \"img/\",
    \"config\": {\"bucket\": \"$BUCKET\", \"endpoint_url\": \"$S3\"}, \"presign\": $2, \"presign_ttl_seconds\": 3600,
    \"secrets\": {\"access_key_id\": \"$KEY\", \"secret_access_key\": \"$SECRET\"}}" >/dev/null
}
s3_source "$PROJECT" true
post /storages "{\"project_id\": $PROJECT, \"role\": \"source\", \"backend\": \"local\", \"config\": {\"path\": \"media\"}}" >/dev/null
REDIRECT="$API/resolve?project_id=$PROJECT&uri=s3://$BUCKET/img/a.jpg"
DIRECT=$(curl -s -H "$AUTH" -o /dev/null -w '%{redirect_url}' "$REDIRECT")
[ -n "$DIRECT" ] || { echo "no redirect from $REDIRECT" >&2; exit 1; }
curl -sf -o /dev/null "$DIRECT" || { echo "the signed URL does not fetch: $DIRECT" >&2; exit 1; }
# A second project with the same bucket, not presigning: proxied.
PROJECT_PROXY=$(post /projects '{"title": "bench proxied"}' | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')
s3_source "$PROJECT_PROXY" false
PROXIED="$API/resolve?project_id=$PROJECT_PROXY&uri=s3://$BUCKET/img/a.jpg"
LOCAL="$API/resolve?project_id=$PROJECT&uri=/data/local-files/?d=media/a.jpg"
for url in "$PROXIED" "$LOCAL"; do
  [ "$(curl -s -H "$AUTH" -o /dev/null -w '%{http_code}' "$url")" = 200 ] || { echo "not 200: $url" >&2; exit 1; }
done

cpu_ticks() { awk '{print $14 + $15}' "/proc/$SERVER/stat"; }
load() { # name, url
  local before; before=$(cpu_ticks)
  wrk -t2 -c64 -d"${D}s" --latency -H "$AUTH" "$2" >"$WORK/wrk"
  CPU_TICKS=$(($(cpu_ticks) - before)) python3 -c "
import os, re, sys
out = open('$WORK/wrk').read()
rps = float(re.search(r'Requests/sec:\s+([\d.]+)', out).group(1))
def pct(p):
    m = re.search(r'\s' + p + r'%\s+([\d.]+)(us|ms|s)\b', out)
    return float(m.group(1)) * {'us': 0.001, 'ms': 1, 's': 1000}[m.group(2)]
bad = re.search(r'Non-2xx or 3xx responses: (\d+)', out)
errors = re.search(r'Socket errors: .*', out)
note = (f', non-2xx/3xx {bad.group(1)}' if bad else '') + (f', {errors.group(0)}' if errors else '')
requests = int(re.search(r'(\d+) requests in', out).group(1))
cpu_us = int(os.environ['CPU_TICKS']) / os.sysconf('SC_CLK_TCK') * 1e6 / max(requests, 1)
print(f'{\"$1\":<22} {rps:>9.0f} req/s  p50 {pct(\"50\"):6.2f} ms  p99 {pct(\"99\"):6.2f} ms  scheduler {cpu_us:5.0f} us CPU/request{note}')
open('$WORK/$1', 'w').write(str(rps))
"
}
echo "binary $BIN, cores $(nproc), wrk -t2 -c64 -d${D}s, storage $S3${RTT_MS:+ (synthetic, $RTT_MS ms a request)}"
load healthz "http://127.0.0.1:$PORT/healthz"
load presign-redirect "$REDIRECT"
load s3-proxied-200k "$PROXIED"
load s3-direct-200k "$DIRECT"
load local-proxied-200k "$LOCAL"
python3 -c "
r = {n: float(open('$WORK/' + n).read()) for n in ['healthz', 'presign-redirect', 's3-proxied-200k', 's3-direct-200k']}
print(f'redirects / healthz: {r[\"presign-redirect\"] / r[\"healthz\"]:.3f}; direct / proxied S3: {r[\"s3-direct-200k\"] / r[\"s3-proxied-200k\"]:.2f}x')
"
