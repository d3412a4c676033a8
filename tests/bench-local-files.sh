#!/usr/bin/env bash
# Times a Files-mode sync of N local files through the one-shot CLI, and the
# bare listing of the same files (`labelsync-scheduler list`) for comparison,
# then a second sync of the same storage with nothing changed (a re-sync).
#   tests/bench-local-files.sh [N] [DATABASE_URL]
# Default: 20,000 files into a fresh embedded SQLite database. Pass a Postgres
# URL (an empty database) to measure Postgres instead. Uses the binary in
# target/${PROFILE:-debug}; build it first.
set -euo pipefail
n=${1:-20000}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
db=${2:-sqlite://$root/bench.db?mode=rwc}
bin=${BIN:-$(cd "$(dirname "$0")/.." && pwd)/target/${PROFILE:-debug}/labelsync-scheduler}
python3 - "$root/files" "$n" <<'PY'
import os, sys
base, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    d = os.path.join(base, f"part-{i // 1000:04}")
    if i % 1000 == 0:
        os.makedirs(d)
    with open(os.path.join(d, f"img-{i:07}.jpg"), "wb") as f:
        f.write(b"x")
PY
cat > "$root/spec.json" <<JSON
{"project": {"title": "bench", "data_key": "image"}, "role": "source", "backend": "local",
 "title": "bench", "regex_filter": ".*\\\\.jpg$", "config": {"path": "files"}}
JSON
listing=$(LOCAL_FILES_DOCUMENT_ROOT=$root "$bin" list --spec "$root/spec.json")
start=$(date +%s.%N)
DATABASE_URL=$db LOCAL_FILES_DOCUMENT_ROOT=$root "$bin" sync --spec "$root/spec.json" --quiet > "$root/run.json"
end=$(date +%s.%N)
# The same storage again, nothing changed: every object is found linked.
DATABASE_URL=$db LOCAL_FILES_DOCUMENT_ROOT=$root "$bin" sync --spec "$root/spec.json" --quiet > "$root/resync.json"
end2=$(date +%s.%N)
python3 - "$root/run.json" "$start" "$end" "$listing" "$root/resync.json" "$end2" <<'PY'
import json, sys
run = json.load(open(sys.argv[1]))
secs = float(sys.argv[3]) - float(sys.argv[2])
listing = json.loads(sys.argv[4])
resync = json.load(open(sys.argv[5]))
resync_secs = float(sys.argv[6]) - float(sys.argv[3])
c = run["counters"]
print(f"status={run['status']} listed={c['listed']} created={c['created']} seconds={secs:.2f} "
      f"objects_per_s={c['created'] / secs:.0f} listing_only_s={listing['seconds']:.2f} "
      f"ratio_to_listing={secs / listing['seconds']:.1f}")
r = resync["counters"]
print(f"resync: status={resync['status']} listed={r['listed']} created={r['created']} existed={r['existed']} "
      f"seconds={resync_secs:.2f} objects_per_s={r['listed'] / resync_secs:.0f}")
PY
