#!/usr/bin/env bash
# Times Tasks-mode imports through the one-shot CLI, with peak RSS.
#   tests/bench-tasks.sh json|jsonl|parquet|bigjsonl [DATABASE_URL]
#     json      2,000 one-task JSON files
#     jsonl     one 100,000-line JSONL file
#     parquet   one 1,000,000-row Parquet file (row groups of 100,000)
#     bigjsonl  one ~1 GB JSONL file (memory bound check)
# DATABASE_URL: an empty database (default: a fresh SQLite file). Uses the
# binary in target/${PROFILE:-release} (or $BIN); build it first, with
# labelsync-worker beside it (it reads Parquet files in child processes).
set -euo pipefail
kind=${1:?json|jsonl|parquet|bigjsonl}
repo=$(cd "$(dirname "$0")/.." && pwd)
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
db=${2:-sqlite://$root/bench.db?mode=rwc}
bin=${BIN:-$repo/target/${PROFILE:-release}/labelsync-scheduler}
mkdir -p "$root/files"
case $kind in
  json) python3 -c "
import json
for i in range(2000):
    json.dump({'text': f'task {i}', 'image': f's3://bucket/img-{i}.jpg'}, open(f'$root/files/t-{i:05}.json', 'w'))" ;;
  jsonl) python3 -c "
import json
with open('$root/files/tasks.jsonl', 'w') as f:
    for i in range(100000):
        f.write(json.dumps({'text': f'task {i}', 'image': f's3://bucket/img-{i}.jpg'}) + '\n')" ;;
  bigjsonl) python3 -c "
pad = 'x' * 900
with open('$root/files/big.jsonl', 'w') as f:
    for i in range(1_100_000):
        f.write('{\"text\": \"task %d\", \"pad\": \"%s\"}\n' % (i, pad))" ;;
  parquet) (cd "$repo" && cargo run -q --release -p labelsync-tests --example gen_parquet -- "$root/files/tasks.parquet" 1000000 100000) ;;
  *) echo "unknown kind $kind" >&2; exit 2 ;;
esac
bytes=$(du -sb "$root/files" | cut -f1)
cat > "$root/spec.json" <<JSON
{"project": {"title": "bench", "data_key": "text"}, "role": "source", "backend": "local",
 "title": "bench", "import_method": "tasks", "config": {"path": "files"}}
JSON
/usr/bin/time -f "%e %M %U %S" -o "$root/time" env DATABASE_URL="$db" LOCAL_FILES_DOCUMENT_ROOT="$root" \
  "$bin" sync --spec "$root/spec.json" --quiet > "$root/run.json"
read -r secs rss_kb user_s sys_s < "$root/time"; echo "client cpu: user ${user_s}s sys ${sys_s}s" >&2
python3 - "$root/run.json" "$secs" "$rss_kb" "$bytes" "$kind" <<'PY'
import json, sys
run = json.load(open(sys.argv[1]))
secs, rss_kb, size, kind = float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
c = run["counters"]
print(f"{kind}: status={run['status']} objects={c['listed']} tasks={c['created']} failed={c['failed']} "
      f"input_mb={size / 1e6:.0f} seconds={secs:.2f} tasks_per_s={c['created'] / secs:.0f} peak_rss_mb={rss_kb / 1024:.0f}")
PY
