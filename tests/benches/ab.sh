#!/usr/bin/env bash
# Paired, alternating runs of two builds of the inventory bench in fixed-count mode, for a
# noisy machine: A then B, N times; prints each side's median and best (wall, and the
# slowest thread's CPU time), the median of the N per-pair ratios B/A and how many pairs B
# won. Used for the figures in docs/inventory.md (ninth round on).
#
#   bash tests/benches/ab.sh <bench-binary-A> <bench-binary-B> <rounds> [VAR=value ...]
#   e.g. bash tests/benches/ab.sh /tmp/inv_before target/release/deps/inventory-<hash> 30 \
#          INV_CYCLES=4000000 INV_THREADS=2
#
# Build each side with `cargo bench --bench inventory --no-run` and copy the binary it
# names aside before building the other.
set -euo pipefail
if [ "$#" -lt 3 ]; then
  sed -n '2,11p' "$0"
  exit 2
fi
a=$1 b=$2 rounds=$3
shift 3
rate() { env "$@" 2>&1 | sed -nE 's/.*wall [^(]*\(([0-9.]+) M\/s\).*CPU [^(]*\(([0-9.]+) M\/s\).*/\1 \2/p'; }
for _ in $(seq 1 "$rounds"); do
  echo "$(rate "$@" "$a") $(rate "$@" "$b")"
done | python3 -c '
import statistics as st, sys
rows = [list(map(float, l.split())) for l in sys.stdin if len(l.split()) == 4]
if not rows:
    sys.exit("no runs parsed")
aw, ac, bw, bc = (list(c) for c in zip(*rows))
print("A wall median %.2f best %.2f M/s | CPU best %.2f" % (st.median(aw), max(aw), max(ac)))
print("B wall median %.2f best %.2f M/s | CPU best %.2f" % (st.median(bw), max(bw), max(bc)))
print("pair ratio B/A median %.3f; best %.3f; CPU best %.3f; B faster in %d of %d"
      % (st.median(b / a for a, b in zip(aw, bw)), max(bw) / max(aw), max(bc) / max(ac),
         sum(b > a for a, b in zip(aw, bw)), len(rows)))
'
