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
# /usr/bin/time: wall seconds and peak RSS (KB) of each sync process.
sync() {
  /usr/bin/time -f "%e %M" -o "$root/$1.time" env DATABASE_URL="$db" LOCAL_FILES_DOCUMENT_ROOT="$root" \
    "$bin" sync --spec "$root/spec.json" --quiet > "$root/$1.json"
}
sync run
# The same storage again, nothing changed: every object is found linked.
sync resync
python3 - "$root" "$listing" <<'PY'
import json, sys
root, listing = sys.argv[1], json.loads(sys.argv[2])
def load(name):
    secs, rss_kb = open(f"{root}/{name}.time").read().split()
    return json.load(open(f"{root}/{name}.json")), float(secs), int(rss_kb) / 1024
run, secs, rss = load("run")
c = run["counters"]
print(f"status={run['status']} listed={c['listed']} created={c['created']} seconds={secs:.2f} "
      f"objects_per_s={c['created'] / secs:.0f} listing_only_s={listing['seconds']:.2f} "
      f"ratio_to_listing={secs / listing['seconds']:.1f} peak_rss_mb={rss:.0f}")
resync, secs, rss = load("resync")
r = resync["counters"]
print(f"resync: status={resync['status']} listed={r['listed']} created={r['created']} existed={r['existed']} "
      f"seconds={secs:.2f} objects_per_s={r['listed'] / secs:.0f} peak_rss_mb={rss:.0f}")
PY
