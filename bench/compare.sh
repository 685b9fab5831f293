#!/usr/bin/env bash
# compare.sh: run the same benchmark against two broker binaries, alternating,
# so a before/after is measured back to back on the same machine (this
# machine's throughput moves by tens of percent between hours; only
# alternating runs compare). Not run by CI.
#
#   bench/compare.sh BEFORE_BIN AFTER_BIN [ROUNDS] -- [serve flags] -- [bench flags]
#
# e.g. bench/compare.sh /tmp/portcullis-0a36659 ./target/release/portcullis 2 -- --in-memory -- --rpc introspect
#
# Each run: a fresh `serve --dev` data dir on 127.0.0.1:0, `bench --clients
# ${CLIENTS:-64} --duration ${DURATION:-10s} --output json`, one line with
# calls/s, p50/p99/p999/max, errors, and the broker's own CPU per call (user +
# sys from /proc/PID/stat over the run, warm-up included). The AFTER binary
# drives the load for both, so only the broker differs. With PG_BASE set (a
# PostgreSQL URL, e.g. `.ci/postgres url`), each run gets a new database next
# to it (`CREATE DATABASE` through psql) and the broker is started on it.
set -euo pipefail
[ $# -ge 2 ] || { sed -n '2,16p' "$0"; exit 64; }
BEFORE=$1; AFTER=$2; shift 2
ROUNDS=1
if [ $# -gt 0 ] && [ "$1" != "--" ]; then ROUNDS=$1; shift; fi
[ "${1:-}" = "--" ] && shift
SERVE=(); BENCH=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do SERVE+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
BENCH=("$@")
CLIENT=$AFTER
TICK=$(getconf CLK_TCK)

run() { # label binary
  local d p c0 c1 u0 s0 u1 s1 out
  d=$(mktemp -d)
  local db=()
  if [ -n "${PG_BASE:-}" ]; then
    local name="bench_$(date +%s%N)"
    psql -q "$PG_BASE" -c "CREATE DATABASE $name" >/dev/null
    db=(--database-url "${PG_BASE%/*}/$name")
  fi
  RUST_LOG=warn "$2" serve --dev --data-dir "$d" --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 "${db[@]}" "${SERVE[@]}" >/dev/null 2>&1 &
  p=$!
  for _ in $(seq 200); do [ -f "$d/endpoints.json" ] && break; sleep 0.05; done
  sleep 0.5
  read -r u0 s0 < <(awk '{print $14, $15}' "/proc/$p/stat")
  out=$("$CLIENT" bench --dev-dir "$d" --scope orders.read --clients "${CLIENTS:-64}" \
        --duration "${DURATION:-10s}" --output json "${BENCH[@]}")
  read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$p/stat")
  kill "$p"; wait "$p" 2>/dev/null || true
  rm -rf "$d"
  python3 - "$1" "$out" "$u0" "$s0" "$u1" "$s1" "$TICK" <<'PY'
import json, sys
label, out, u0, s0, u1, s1, tick = sys.argv[1], json.loads(sys.argv[2]), *map(int, sys.argv[3:])
n = max(1, out["calls"] + out.get("filled", 0))
us = lambda t: t * 1e6 / tick / n
print(f"{label:7} {out['rpc']:10} {out['calls_per_sec']:9.0f}/s  p50 {out['p50_ms']:.2f}  p99 {out['p99_ms']:.2f}"
      f"  p999 {out['p999_ms']:.2f}  max {out['max_ms']:.2f} ms  errors {out['errors']}"
      f"  broker CPU/call {us(u1 - u0 + s1 - s0):.0f} µs (user {us(u1 - u0):.0f}, sys {us(s1 - s0):.0f})"
      + (f"  disk p50 {out['disk_sync_p50_ms']:.3f} ms" if "disk_sync_p50_ms" in out else ""))
PY
}

echo "serve ${SERVE[*]:-} | bench --clients ${CLIENTS:-64} --duration ${DURATION:-10s} ${BENCH[*]:-}"
for r in $(seq "$ROUNDS"); do
  run before "$BEFORE"
  run after "$AFTER"
done
