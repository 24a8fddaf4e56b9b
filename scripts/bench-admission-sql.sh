#!/usr/bin/env bash
# The admission functions alone, measured with pgbench against a scratch database that has the
# project's migrations (issue #9). Prints, per script, the mean latency of one transaction and
# its ratio to the reference line measured in the same run (one prepared `SELECT 1`).
#
#   scripts/bench-admission-sql.sh                # 1-day windows, 8 s per script
#   WINDOW_MS=2000 SECONDS_EACH=5 scripts/bench-admission-sql.sh   # 2 s windows: retirement at every batch
#
# Needs psql and pgbench (Debian: postgresql-client) and PGHOST/PGUSER for a server that lets
# the user create databases (default 127.0.0.1, postgres). Commits without waiting for the WAL
# flush (synchronous_commit = off) so that the figures are CPU, not the disk.
set -euo pipefail
cd "$(dirname "$0")/.."
export PGHOST="${PGHOST:-127.0.0.1}" PGUSER="${PGUSER:-postgres}"
window_ms="${WINDOW_MS:-86400000}"
seconds="${SECONDS_EACH:-8}"
db="fw_pgbench_$$"
psql -X -q -d postgres -c "CREATE DATABASE $db"
trap 'psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $db"' EXIT
for migration in migrations/*.sql; do
    psql -X -q -v ON_ERROR_STOP=1 -d "$db" -f "$migration" > /dev/null
done

mean_ms() {
    PGOPTIONS="-c synchronous_commit=off" pgbench -n -M prepared -D ids='{}' -D window_ms="$window_ms" \
        -f "benches/sql/$1.pgb" -T "$seconds" "$db" 2>&1 | sed -n 's/^latency average = \([0-9.]*\) ms$/\1/p'
}

reference=$(mean_ms round_trip)
printf '%-18s %10s %8s\n' script "ms/txn" "ratio"
printf '%-18s %10s %8s\n' round_trip "$reference" "1.00"
# Asks first: the answers alone need calls to answer.
for script in finish_and_admit admit finish; do
    ms=$(mean_ms "$script")
    awk -v s="$script" -v ms="$ms" -v ref="$reference" 'BEGIN { printf "%-18s %10s %8.2f\n", s, ms, ms / ref }'
done
