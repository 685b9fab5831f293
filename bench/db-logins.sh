#!/usr/bin/env bash
# db-logins.sh: issue 23's targets against the throwaway PostgreSQL. Not run by CI.
#
#   bench/db-logins.sh BIN
#
# Starts `.ci/postgres` (PostgreSQL on 127.0.0.1:54329), makes a database
# `bench23` with a group role, starts `BIN serve --dev` on a fresh data dir
# whose policy makes logins there (scope db.orders.read), and prints:
# issue + revoke cycles with 16 clients for 10 s; a fill of 1,000 logins;
# `lease revoke-all` of them and how long until every role is gone.
set -euo pipefail
[ $# -ge 1 ] || { sed -n '2,10p' "$0"; exit 64; }
BIN=$(realpath "$1")
cd "$(dirname "$0")/.."
PG=$(.ci/postgres start)
BASE=${PG%/*}
psql "$PG" -qc "DROP DATABASE IF EXISTS bench23" >/dev/null 2>&1 || true
psql "$PG" -qc "CREATE DATABASE bench23"
DB=$BASE/bench23
psql "$DB" -qc "DO \$\$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname='bench_reader') THEN CREATE ROLE bench_reader NOLOGIN; END IF; END \$\$; CREATE TABLE orders (id int); GRANT SELECT ON orders TO bench_reader"
D=$(mktemp -d)
"$BIN" serve --dev --data-dir "$D" --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 > "$D.log" 2>&1 & P=$!
for _ in $(seq 500); do [ -f "$D/endpoints.json" ] && break; sleep 0.02; done
kill $P; wait $P 2>/dev/null || true
echo unused > "$D/admin.password"
cat >> "$D/policy.toml" <<EOF

[[database]]
name = "orders"
url = "$DB"
password_file = "$D/admin.password"
max_logins_per_identity = 5000

[[scope]]
name = "db.orders.read"
tier = "auto"
workloads = ["spiffe://portcullis.dev/ns/demo/*"]
max_ttl = "1h"
login = { database = "orders", member_of = "bench_reader" }
EOF
rm -f "$D/endpoints.json"
RUST_LOG=warn "$BIN" serve --dev --data-dir "$D" --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 >> "$D.log" 2>&1 & P=$!
for _ in $(seq 500); do [ -f "$D/endpoints.json" ] && break; sleep 0.02; done
roles() { psql "$PG" -tAc "SELECT count(*) FROM pg_roles WHERE rolname LIKE 'pc\_%'"; }
echo "cycle, 16 clients: $("$BIN" bench --dev-dir "$D" --scope db.orders.read --rpc cycle --clients 16 --duration 10s | tail -1)"
sleep 2; echo "roles left after the cycles: $(roles)"
R0=$(roles); "$BIN" bench --dev-dir "$D" --scope db.orders.read --clients 16 --duration 1s --leases 1000 | tail -1
echo "roles before revoke-all: $(roles)"
t0=$(date +%s.%N)
"$BIN" lease revoke-all --dev-dir "$D" --as admin --subject spiffe://portcullis.dev/ns/demo/sa/app --reason bench 2>&1 | tail -1
t1=$(date +%s.%N)
while [ "$(roles)" -gt "$R0" ]; do sleep 0.05; done
t2=$(date +%s.%N)
echo "revoke-all answered in $(echo "$t1 - $t0" | bc) s; every role gone $(echo "$t2 - $t0" | bc) s after it started"
kill $P; wait $P 2>/dev/null || true
rm -rf "$D" "$D.log"
