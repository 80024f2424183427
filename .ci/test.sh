#!/usr/bin/env bash
# The project's test command (README "Run the tests"). On a fresh Debian machine with Rust
# it installs what the tests need (redis-server; nats-server for the loadtest baseline is
# optional), then runs every test of the workspace and the loadtest smoke runs.
# PostgreSQL tests run when a server answers on 127.0.0.1:5432 (or LIVEGATE_TEST_POSTGRES)
# and print a notice and skip otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  echo "installing: ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
log=$(mktemp)

# A hung test must fail the run at once, with its threads' stacks, not hold CI until its
# time limit. Every test binary (target/debug/deps/*) and load-test smoke run here finishes
# in well under a minute; one still running after LIVEGATE_TEST_HANG_SECS (default 300) has
# every thread's stack printed (with gdb, when it is installed) and is killed, which fails
# the run.
hang_secs=${LIVEGATE_TEST_HANG_SECS:-300}
watchdog() {
  while sleep 10; do
    for pid in $(pgrep -f "target/debug/" || true); do
      case "$(readlink "/proc/$pid/exe" 2>/dev/null)" in
        "$PWD/target/debug/deps/"* | "$PWD/target/debug/livegate-loadtest") ;;
        *) continue ;;
      esac
      age=$(ps -o etimes= -p "$pid" 2>/dev/null | tr -d ' ')
      [ -n "$age" ] && [ "$age" -gt "$hang_secs" ] || continue
      echo "WATCHDOG: test process $pid ran ${age}s (limit ${hang_secs}s): $(ps -o args= -p "$pid")"
      if command -v gdb >/dev/null 2>&1; then
        timeout 60 gdb -p "$pid" -batch -ex 'thread apply all bt' 2>&1 | grep -E '^(Thread|#)' | head -n 600
      else
        echo "WATCHDOG: gdb is not installed; no stacks"
      fi
      kill -9 "$pid" 2>/dev/null || true
    done
  done
}
watchdog >&2 &
watchdog_pid=$!
trap 'kill "$watchdog_pid" 2>/dev/null; rm -f "$log"' EXIT
# Unit, integration and CLI tests of every crate (the crates have no doc examples).
cargo test --workspace --locked --lib --bins --tests -- --test-threads=2 2>&1 | tee "$log"

# Smoke runs of the load-test harness against a real gateway and a real Redis it starts
# itself: they fail on a broken invariant (oversell, lost confirmation, missing delivery),
# never on a timing.
cargo build --locked -p livegate --bin livegate
for scenario in fanout rush checkout; do
  cargo run --locked -q -p livegate-loadtest -- "$scenario" --smoke --spawn --quiet \
    --gateway-bin target/debug/livegate
done
# The sustained rush, both designs, oversubscribed crowd with restocks (~10 s).
cargo run --locked -q -p livegate-loadtest -- rush --smoke --spawn --quiet \
  --gateway-bin target/debug/livegate --sustain-secs 2 --compare-lua --restock-per-sec 500

# One closing line over every test binary: `N passed, N failed`.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
