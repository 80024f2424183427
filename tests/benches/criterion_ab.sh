#!/usr/bin/env bash
# Paired criterion runs of two builds of the inventory bench, for a noisy machine: each pair
# first reads the cross-core probe (`INV_PINGPONG=200000`, one cache line's round trip
# between the two threads), then runs one benchmark on A and on B, A first in odd pairs and
# B first in even ones. Prints one line a pair (time, probe, each side's criterion
# throughput estimate, B/A), then the median ratio and how many pairs B won. Used for the
# seventeenth session's figures in docs/inventory.md.
#
#   bash tests/benches/criterion_ab.sh <bench-binary-A> <bench-binary-B> <pairs> [filter]
#   e.g. bash tests/benches/criterion_ab.sh /tmp/inv_before target/release/deps/inventory-<hash> \
#          16 'cycle_many_skus/sharded_2t$'
#
# Build each side with `cargo bench --bench inventory --no-run` and copy the binary it
# names aside before building the other. Each run is 1 s of warm-up and 3 s of measurement.
set -euo pipefail
if [ "$#" -lt 3 ]; then
  sed -n '2,14p' "$0"
  exit 2
fi
a=$1 b=$2 pairs=$3 filter=${4:-'cycle_many_skus/sharded_2t$'}
# Criterion's middle throughput estimate, in M elements/s.
rate() {
  "$1" --bench --warm-up-time 1 --measurement-time 3 "$filter" 2>&1 |
    awk '!done && /thrpt:/ { v = $4; u = $5; if (u ~ /^Kelem/) v /= 1000; if (u ~ /^Gelem/) v *= 1000; print v; done = 1 }'
}
for i in $(seq 1 "$pairs"); do
  probe=$(INV_PINGPONG=200000 "$a" 2>&1 | sed -nE 's/.*: ([0-9]+) ns each.*/\1/p')
  if [ $((i % 2)) = 1 ]; then
    ra=$(rate "$a")
    rb=$(rate "$b")
  else
    rb=$(rate "$b")
    ra=$(rate "$a")
  fi
  echo "$(date -u +%H:%M:%S) probe ${probe:-?} ns A $ra B $rb"
done | python3 -c '
import statistics as st, sys
ratios = []
for line in sys.stdin:
    f = line.split()
    try:
        ra, rb = float(f[5]), float(f[7])
    except (IndexError, ValueError):
        print(line.rstrip(), "(not parsed)")
        continue
    ratios.append(rb / ra)
    print("%s  B/A %.3f" % (line.rstrip(), rb / ra))
if not ratios:
    sys.exit("no runs parsed")
print("median B/A %.3f; B faster in %d of %d pairs" % (
    st.median(ratios), sum(r > 1 for r in ratios), len(ratios)))
'
