#!/usr/bin/env bash
# console.sh: how fast the approver console answers an approver, with N
# requests waiting and a trail of decisions behind them. Not run by CI.
#
#   bench/console.sh [BINARY] [PENDING] [GETS]
#
# Starts `BINARY serve --dev` (default ./target/release/portcullis) on a
# fresh data dir, parks PENDING (default 200) approval requests from the dev
# workload, approves half of them through the console (so History has
# decisions to show), signs in with a one-time link as the dev approver and
# times GETS (default 200) sequential fetches of each page with curl.
# Prints p50/p99/max per page in milliseconds.
set -euo pipefail
BIN=${1:-./target/release/portcullis}
PENDING=${2:-200}
GETS=${3:-200}
dir=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$dir"' EXIT
"$BIN" serve --dev --data-dir "$dir" --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 \
    --max-open-requests 1000000 \
    >/dev/null 2>"$dir/log" &
pid=$!
until [ -s "$dir/endpoints.json" ]; do sleep 0.1; done
http=$(sed -n 's/.*"http": *"\([^"]*\)".*/\1/p' "$dir/endpoints.json")
base="http://$http"
export PORTCULLIS_DEV_DIR=$dir
for i in $(seq "$PENDING"); do
    "$BIN" token request --scope orders.admin --reason "bench $i" >/dev/null 2>&1 || true
done
jar="$dir/jar"
link=$("$BIN" --as approver ui login 2>/dev/null)
t=${link#*t=}
curl -s -o /dev/null -c "$jar" -b "$jar" -H "Origin: $base" --data-urlencode "t=$t" "$base/ui/login/link"
csrf=$(curl -s -b "$jar" "$base/ui/pending" | sed -n 's/.*name="csrf" value="\([^"]*\)".*/\1/p' | head -1)
ids=$(curl -s -b "$jar" "$base/ui/pending" | grep -o 'data-request="r_[0-9a-f]*"' | cut -d'"' -f2)
n=0
for id in $ids; do
    n=$((n + 1)); [ $n -gt $((PENDING / 2)) ] && break
    curl -s -o /dev/null -b "$jar" -H "Origin: $base" \
        --data-urlencode "csrf=$csrf" --data-urlencode "reason=bench" "$base/ui/requests/$id/approve"
done
first=$(echo "$ids" | tail -1)
for page in /ui/pending "/ui/requests/$first" /ui/history; do
    for _ in $(seq "$GETS"); do
        curl -s -o /dev/null -w '%{time_total}\n' -b "$jar" "$base$page"
    done | sort -n | awk -v page="$page" '{ t[NR] = $1 * 1000 }
        END { printf "%-40s p50 %6.2f ms  p99 %6.2f ms  max %6.2f ms  (%d GETs)\n", page, t[int(NR * 0.5)], t[int(NR * 0.99)], t[NR], NR }'
done
echo "($PENDING requests parked, $((PENDING / 2)) approved through the console)"
