#!/usr/bin/env bash
# Redis CPU per confirmed reservation: the in-memory core with group commit against the
# one-Lua-script-per-request baseline, same clients, same payloads, same machine, same run.
# Each mode gets a fresh redis-server and gateway on loopback ports; the rush is the
# loadtest's `rush` scenario. Usage: loadtest/scripts/redis-cost.sh [VIEWERS] [STOCK]
set -euo pipefail
cd "$(dirname "$0")/../.."
VIEWERS=${1:-5000}
STOCK=${2:-2500}
BIN=target/release/livegate
LT=target/release/livegate-loadtest
[ -x "$BIN" ] && [ -x "$LT" ] || cargo build --release -p livegate -p livegate-loadtest
export LIVEGATE_JWT_SECRET=redis-cost-secret-0123456789
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; for p in 6395 6396; do redis-cli -p $p shutdown nosave >/dev/null 2>&1 || true; done; rm -rf "$WORK"' EXIT

cpu() { redis-cli -p "$1" info cpu | awk -F: '/used_cpu_(user|sys):/ {s+=$2} END {printf "%.3f", s}'; }
calls() { redis-cli -p "$1" info commandstats | awk -F'[:=,]' '{c+=$3} END {print c}'; }

run() {
  local mode=$1 rport=$2 gport=$3
  redis-server --port "$rport" --save "" --appendonly no --daemonize yes --dir "$WORK" \
    --logfile "$WORK/redis-$mode.log" >/dev/null
  sleep 0.3
  LIVEGATE_LISTEN=127.0.0.1:$gport LIVEGATE_REDIS_URL=redis://127.0.0.1:$rport \
    LIVEGATE_RESERVE_MODE=$mode LIVEGATE_LOG=warn LIVEGATE_ORDER_STORE="sqlite://$WORK/$mode.db" \
    "$BIN" serve --no-order-writer >"$WORK/gw-$mode.log" 2>&1 &
  for _ in $(seq 100); do curl -sf "127.0.0.1:$gport/readyz" >/dev/null && break; sleep 0.1; done
  local c0 n0 c1 n1 out
  c0=$(cpu "$rport"); n0=$(calls "$rport")
  out=$("$LT" rush --url "ws://127.0.0.1:$gport/ws" --secret "$LIVEGATE_JWT_SECRET" \
    --redis-url "redis://127.0.0.1:$rport" --viewers "$VIEWERS" --stock "$STOCK" --quiet 2>&1)
  c1=$(cpu "$rport"); n1=$(calls "$rport")
  local reserved rps
  reserved=$(echo "$out" | awk '/ reserved  / && !/\/s/ {print $NF; exit}')
  rps=$(echo "$out" | awk '/reserved\/s/ {print $NF; exit}')
  echo "$out" | grep -q "RESULT: ok" || { echo "$out"; echo "rush failed in mode $mode"; exit 1; }
  awk -v m="$mode" -v c="$(echo "$c1 - $c0" | bc)" -v n="$((n1 - n0))" -v r="$reserved" -v rps="$rps" \
    'BEGIN {printf "%-5s reserved=%d  reserved/s=%s  redis_cpu_s=%.3f  redis_cmds=%d  redis_us_per_reservation=%.1f  cmds_per_reservation=%.1f\n", m, r, rps, c, n, c*1e6/r, n/r}'
  kill %1 2>/dev/null || true; wait 2>/dev/null || true
}
run core 6395 8195
run lua 6396 8196
