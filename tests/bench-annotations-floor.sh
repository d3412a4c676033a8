#!/usr/bin/env bash
# The database's own floor for annotation saves: pgbench, 64 connections
# (as `bench annotations` has 64 clients), each save being what the API's
# save costs Postgres at the least: the annotation, its outbox row and its
# audit row in one statement, then the look for the target's live export
# run; on a freshly migrated database with 1,000 tasks and one S3 target.
#   tests/bench-annotations-floor.sh [SECONDS] [SCHEDULER_BINARY]
set -euo pipefail
SECONDS_=${1:-20}
BIN=${2:-target/release/labelsync-scheduler}
source "$(dirname "$0")/bench-floor-db.sh"
fresh_migrated_db bench_annotations_floor "$BIN"
psql "$URL" -q -v ON_ERROR_STOP=1 <<'SQL'
INSERT INTO projects (title, data_key, created_at, updated_at) VALUES ('floor', 'text', now(), now());
INSERT INTO storages (project_id, role, backend, title, config, secrets_set, prefix, import_method, created_at, updated_at)
  VALUES (1, 'target', 's3', 'floor', '{}', '[]', 'ann', 'files', now(), now());
INSERT INTO tasks (project_id, data, created_at, updated_at)
  SELECT 1, jsonb_build_object('text', 'task ' || i), now(), now() FROM generate_series(1, 1000) AS i;
SQL
SAVE=$(cat <<'SQL'
\set task random(1, 1000)
WITH a AS (
  INSERT INTO annotations (task_id, project_id, result, completed_by, lead_time, was_cancelled, ground_truth, created_at, updated_at)
  SELECT id, project_id, '[{"type": "choices", "value": {"choices": ["cat"]}}]', '{"id": 7}', 2.5, false, false, now(), now()
  FROM tasks WHERE id = :task RETURNING *),
o AS (
  INSERT INTO export_outbox (storage_id, annotation_id, action, version, created_at)
  SELECT s.id, a.id, 'upsert', 1, now() FROM storages s JOIN a ON s.project_id = a.project_id WHERE s.role = 'target'
  ON CONFLICT (storage_id, annotation_id) DO UPDATE SET action = excluded.action, version = export_outbox.version + 1
  RETURNING storage_id),
au AS (
  INSERT INTO audit_events (at, token_id, token_name, method, route, path, project_id, resource, status, request_id, client)
  SELECT now(), NULL, 'bench', 'POST', '/api/v1/tasks/{id}/annotations', '/api/v1/tasks/1/annotations', a.project_id,
    jsonb_build_object('tasks', a.task_id, 'annotation_id', a.id)::text, 201, 'req', '127.0.0.1' FROM a)
SELECT a.*, ARRAY(SELECT storage_id FROM o) AS targets FROM a;
SELECT * FROM sync_runs WHERE storage_id = 1 AND status IN ('queued', 'running') ORDER BY id DESC LIMIT 1;
SQL
)
pgbench "$URL" -n -M prepared -c 64 -j 2 -T "$SECONDS_" -f <(printf '%s\n' "$SAVE") 2>&1 \
  | grep -E "^(tps|latency average|number of transactions actually processed)"
