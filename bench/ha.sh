#!/usr/bin/env bash
# ha.sh: durable grants on the embedded store against PostgreSQL with one
# broker and with two brokers on one database, back to back, ROUNDS times
# (this machine's throughput moves by tens of percent between hours; only
# runs made side by side compare). Not run by CI.
#
#   bench/ha.sh [BIN] [ROUNDS]      env: CLIENTS (64), DURATION (10s)
#
# BIN defaults to ./target/release/portcullis. PostgreSQL is a throwaway
# cluster of its own (.ci/postgres, /tmp/portcullis-pg-bench, port 54331,
# fsync on, default settings), with a fresh database per run. With two
# brokers, two bench processes run at once, each with half the clients on
# its own broker; the line sums their rates and shows each one's latencies.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-./target/release/portcullis}
ROUNDS=${2:-1}
CLIENTS=${CLIENTS:-64}
DURATION=${DURATION:-10s}
export PORTCULLIS_PG_DIR=/tmp/portcullis-pg-bench PORTCULLIS_PG_PORT=54331
BASE=$(.ci/postgres start)
trap '.ci/postgres stop >/dev/null 2>&1 || true' EXIT
PSQL=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)/psql

fresh_db() {
  local name="bench_$RANDOM$RANDOM"
  "$PSQL" -q "$BASE" -c "CREATE DATABASE $name" >/dev/null
  echo "${BASE%/*}/$name"
}

# broker DIR [serve flags...] -> prints "PID ADDR"
broker() {
  local d=$1 before=""
  shift
  [ -f "$d/endpoints.json" ] && before=$(cat "$d/endpoints.json")
  RUST_LOG=warn "$BIN" serve --dev --data-dir "$d" --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 "$@" >/dev/null 2>&1 &
  local p=$!
  for _ in $(seq 400); do
    [ -f "$d/endpoints.json" ] && [ "$(cat "$d/endpoints.json")" != "$before" ] && break
    sleep 0.05
  done
  sleep 0.5
  echo "$p $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["grpc"])' "$d/endpoints.json")"
}

bench() { # DIR ADDR CLIENTS
  "$BIN" bench --dev-dir "$1" --server "$2" --scope orders.read --clients "$3" \
    --duration "$DURATION" --output json
}

report() { # label json...
  python3 - "$@" <<'PY'
import json, sys
label, outs = sys.argv[1], [json.loads(o) for o in sys.argv[2:]]
rate = sum(o["calls_per_sec"] for o in outs)
lat = "; ".join(f"p50 {o['p50_ms']:.2f} p99 {o['p99_ms']:.2f} ms" for o in outs)
errors = sum(o["errors"] for o in outs)
print(f"{label:22} {rate:8.0f} grants/s  {lat}  errors {errors}")
PY
}

run_sled() {
  local d p a out
  d=$(mktemp -d)
  read -r p a < <(broker "$d")
  out=$(bench "$d" "$a" "$CLIENTS")
  kill "$p"; wait "$p" 2>/dev/null || true
  rm -rf "$d"
  report "sled" "$out"
}

run_pg() { # BROKERS
  local d url p1 a1 p2 a2 o1 o2
  d=$(mktemp -d)
  url=$(fresh_db)
  read -r p1 a1 < <(broker "$d" --database-url "$url")
  if [ "$1" = 1 ]; then
    o1=$(bench "$d" "$a1" "$CLIENTS")
    kill "$p1"; wait "$p1" 2>/dev/null || true
    report "postgres, 1 broker" "$o1"
  else
    read -r p2 a2 < <(broker "$d" --database-url "$url" )
    bench "$d" "$a1" $((CLIENTS / 2 > 0 ? CLIENTS / 2 : 1)) >"$d/o1" &
    local b1=$!
    o2=$(bench "$d" "$a2" $((CLIENTS / 2 > 0 ? CLIENTS / 2 : 1)))
    wait "$b1"
    o1=$(cat "$d/o1")
    kill "$p1" "$p2"; wait "$p1" "$p2" 2>/dev/null || true
    report "postgres, 2 brokers" "$o1" "$o2"
  fi
  rm -rf "$d"
}

echo "bench --clients $CLIENTS --duration $DURATION, $(nproc) cores"
for _ in $(seq "$ROUNDS"); do
  run_sled
  run_pg 1
  run_pg 2
done
