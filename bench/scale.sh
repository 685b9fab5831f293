#!/usr/bin/env bash
# scale.sh: a broker with many active leases (issue 10, target 3). Not run by CI.
#
#   bench/scale.sh BIN [LEASES]     (default 1000000; BIN drives its own load)
#
# Prints, for a fresh `serve --dev` data dir: the grant rate of the empty
# store; the fill of LEASES active leases (TTL 1h) and the grant rate right
# after it; RSS and disk use; introspection at that size; restart-to-ready
# (until endpoints.json is written) and RSS after a restart, idle and after
# 60 s of grants; then, on a second fresh store, `lease revoke-all` of about
# 100k leases. Takes ~6 minutes for a million leases on 2 cores.
set -euo pipefail
[ $# -ge 1 ] || { sed -n '2,13p' "$0"; exit 64; }
BIN=$1; N=${2:-1000000}
D=$(mktemp -d); P=
trap '[ -n "$P" ] && kill "$P" 2>/dev/null; rm -rf "$D" "$D.2" "$D.log" "$D.2.log"' EXIT
start() { # data dir
  rm -f "$1/endpoints.json"
  local t0; t0=$(date +%s.%N)
  RUST_LOG=warn "$BIN" serve --dev --data-dir "$1" --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 >>"$1.log" 2>&1 &
  P=$!
  for _ in $(seq 1200); do [ -f "$1/endpoints.json" ] && break; sleep 0.01; done
  READY=$(echo "$(date +%s.%N) - $t0" | bc)
}
stop() { kill "$P"; wait "$P" 2>/dev/null || true; P=; }
rss() { awk '/VmRSS/{printf "%d MB", $2/1024}' "/proc/$P/status"; }
bench() { "$BIN" bench --dev-dir "$D" --scope orders.read --clients 64 --ttl 1h "$@" | tail -1; }

start "$D"; sleep 0.5
echo "empty store, grants:      $(bench --duration 10s)"
echo "fill + grants at $N:      $("$BIN" bench --dev-dir "$D" --scope orders.read --clients 64 --ttl 1h --duration 10s --leases "$N" | tr '\n' ' ')"
echo "after the fill:           rss $(rss), disk $(du -sm "$D" | cut -f1) MB"
echo "introspect at that size:  $(bench --duration 10s --rpc introspect)"
stop
start "$D"
echo "restart to ready:         ${READY} s, rss $(rss)"
sleep 3
echo "restarted, idle 3 s:      rss $(rss)"
echo "grants after restart:     $(bench --duration 60s)"
echo "after 60 s of grants:     rss $(rss), disk $(du -sm "$D" | cut -f1) MB"
stop
mkdir -p "$D.2"; D2=$D; D=$D.2
start "$D"
"$BIN" bench --dev-dir "$D" --scope orders.read --clients 64 --ttl 1h --duration 1s --leases 100000 >/dev/null
t0=$(date +%s.%N)
out=$("$BIN" lease revoke-all --dev-dir "$D" --as admin --subject spiffe://portcullis.dev/ns/demo/sa/app --reason bench 2>&1 | tail -1)
echo "revoke-all:               $(echo "$(date +%s.%N) - $t0" | bc) s ($out)"
stop
D=$D2
