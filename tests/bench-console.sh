#!/usr/bin/env bash
# How fast the ops console's pages answer on a big installation: a fresh
# Postgres database with 1,000,000 tasks, 10,000 ended runs over the last
# day (100 storages of 10 projects) and 100,000 per-object errors, a
# scheduler on it (no Redis: the embedded queue), and N sequential
# requests per page; /healthz on the same server is the floor.
#   tests/bench-console.sh [debug|release] [N]
# Prints one line per page: median and p95 in ms, and their ratio to the
# floor's median. Leaves nothing behind (database dropped, server stopped).
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${1:-release}
N=${2:-50}
BIN=target/$PROFILE/labelsync-scheduler
ADMIN=${TEST_POSTGRES_URL:-postgres://postgres:postgres@127.0.0.1:5432/test}
DB=labelsync_bench_console
URL=${ADMIN%/*}/$DB
PORT=18181
WORK=$(mktemp -d)
psql "$ADMIN" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
cleanup() {
  [ -n "${SERVER:-}" ] && kill "$SERVER" 2>/dev/null || true
  psql "$ADMIN" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" || true
  rm -rf "$WORK"
}
trap cleanup EXIT
DATABASE_URL=$URL "$BIN" migrate 2>/dev/null
psql "$URL" -q -v ON_ERROR_STOP=1 <<'SQL'
INSERT INTO projects (title, data_key, created_at, updated_at)
  SELECT 'project ' || p, 'image', now(), now() FROM generate_series(1, 10) p;
INSERT INTO storages (project_id, role, backend, title, config, secrets_set, prefix, recursive,
    import_method, presign, presign_ttl_seconds, can_delete_objects, reimport_changed, on_missing,
    created_at, updated_at)
  SELECT 1 + s % 10, 'source', 'local', 'storage ' || s, '{"path": "data"}', '[]', '', true,
    'files', false, 3600, false, false, 'flag', now(), now() FROM generate_series(1, 100) s;
INSERT INTO tasks (project_id, data, created_at, updated_at)
  SELECT 1 + t % 10, jsonb_build_object('image', '/data/local-files/?d=data/' || t || '.jpg'), now(), now()
  FROM generate_series(1, 1000000) t;
INSERT INTO sync_runs (id, storage_id, project_id, kind, scope, status, listed, matched, created, existed,
    failed, exported, unchanged, deleted, bytes, missing, changed, kept, listing_incomplete, attempts,
    queued_at, started_at, heartbeat_at, finished_at, admitted_at)
  SELECT '01BENCH' || lpad(r::text, 19, '0'), 1 + r % 100, 1 + (r % 100) % 10, 'import', 'full',
    (ARRAY['completed','completed','completed','completed_with_errors','failed','cancelled'])[1 + r % 6],
    100, 100, 100, 0, r % 3, 0, 0, 0, 0, 0, 0, 0, false, 1,
    now() - interval '1 day' * (r / 10000.0), now() - interval '1 day' * (r / 10000.0),
    now() - interval '1 day' * (r / 10000.0), now() - interval '1 day' * (r / 10000.0) + interval '30 seconds',
    now() - interval '1 day' * (r / 10000.0)
  FROM generate_series(1, 10000) r;
INSERT INTO object_errors (run_id, object_key, row_index, error, created_at)
  SELECT '01BENCH' || lpad((1 + e % 10000)::text, 19, '0'), 'data/broken-' || e || '.json', NULL,
    'invalid JSON at line 1 column 3', now() FROM generate_series(1, 100000) e;
ANALYZE;
SQL
psql "$URL" -qAtc "SELECT 'rows: tasks ' || (SELECT count(*) FROM tasks) || ', runs ' || (SELECT count(*) FROM sync_runs) || ', object errors ' || (SELECT count(*) FROM object_errors)"
DATABASE_URL=$URL LABELSYNC_BIND=127.0.0.1:$PORT LABELSYNC_EMBEDDED_QUEUE_PATH=$WORK/queue.db \
  LABELSYNC_RUN_MIGRATIONS=false "$BIN" serve >"$WORK/server.log" 2>&1 &
SERVER=$!
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break; sleep 0.1; done
RUN=01BENCH$(printf '%019d' 5000)
measure() {
  for _ in $(seq 1 "$N"); do
    curl -s -o /dev/null -w '%{http_code} %{time_total}\n' "http://127.0.0.1:$PORT$1"
  done
}
FLOOR=$(measure /healthz | python3 -c 'import sys, statistics; t=[float(l.split()[1]) for l in sys.stdin]; print(statistics.median(t))')
echo "profile $PROFILE, $N requests per page, cores $(nproc); /healthz median $(python3 -c "print(round($FLOOR*1000, 2))") ms"
for page in /ui/ /ui/runs /ui/storages "/ui/runs/$RUN" /ui/storages/7; do
  measure "$page" | python3 -c "
import sys, statistics
rows = [l.split() for l in sys.stdin]
bad = [r for r in rows if r[0] != '200']
assert not bad, f'$page answered {bad[:3]}'
t = sorted(float(r[1]) * 1000 for r in rows)
med, p95 = statistics.median(t), t[int(len(t) * 0.95) - 1]
print(f'$page: median {med:.1f} ms, p95 {p95:.1f} ms, median / floor {med / ($FLOOR * 1000):.0f}x')
"
done
