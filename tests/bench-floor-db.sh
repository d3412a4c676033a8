# Sourced by the database floor benches (tests/bench-*-floor.sh).
#   fresh_migrated_db NAME SCHEDULER_BINARY
# Creates database NAME_<pid> on $ADMIN's server, migrates it with the
# binary, drops it when the script exits, and sets URL to it.
fresh_migrated_db() {
  ADMIN=${ADMIN:-postgres://postgres@127.0.0.1:5432/postgres}
  DB=$1_$$
  URL="postgres://postgres@127.0.0.1:5432/$DB"
  psql "$ADMIN" -qc "CREATE DATABASE $DB"
  trap 'psql "$ADMIN" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)"' EXIT
  DATABASE_URL="$URL" RUST_LOG=warn "$2" migrate
}
