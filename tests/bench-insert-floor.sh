#!/usr/bin/env bash
# The database's own floor for a Files-mode import of N objects: N tasks
# and their links written by psql alone (no client, one backend), in
# statements of 1,000 rows shaped like the import's (links first, then
# their tasks), into a freshly migrated database.
#   tests/bench-insert-floor.sh [N] [SCHEDULER_BINARY]
set -euo pipefail
N=${1:-1000000}
BIN=${2:-target/release/labelsync-scheduler}
source "$(dirname "$0")/bench-floor-db.sh"
fresh_migrated_db bench_floor "$BIN"
psql "$URL" -q -v ON_ERROR_STOP=1 <<'SQL'
INSERT INTO projects (title, data_key, created_at, updated_at) VALUES ('floor', 'image', now(), now());
INSERT INTO storages (project_id, role, backend, title, config, secrets_set, prefix, import_method, created_at, updated_at)
  VALUES (1, 'source', 's3', 'floor', '{}', '[]', '', 'files', now(), now());
SQL
start=$(date +%s.%N)
PGOPTIONS="-c bench.n=$N" psql "$URL" -q -v ON_ERROR_STOP=1 <<'SQL'
DO $$
DECLARE lo bigint := 0;
BEGIN
  WHILE lo < current_setting('bench.n')::bigint LOOP
    WITH ids AS (
      SELECT nextval(pg_get_serial_sequence('tasks', 'id')) AS task_id, i
      FROM generate_series(lo, lo + 999) AS i
    ), links AS (
      INSERT INTO import_links (storage_id, object_key, row_index, task_id, created_at, updated_at)
      SELECT 1, 'p' || (i % 16) || '/f-' || lpad(i::text, 8, '0') || '.jpg', 0, task_id, now(), now() FROM ids
      RETURNING task_id, object_key
    )
    INSERT INTO tasks (id, project_id, data, created_at, updated_at)
    SELECT task_id, 1, jsonb_build_object('image', 's3://bench/' || object_key), now(), now() FROM links;
    lo := lo + 1000;
    COMMIT;
  END LOOP;
END $$;
SQL
end=$(date +%s.%N)
echo "{\"bench\":\"insert-floor\",\"rows\":$N,\"seconds\":$(echo "$end - $start" | bc)}"
