#!/usr/bin/env bash
# Profiles one round of the directory-source and HTTP runs with perf (DWARF call graphs) and
# writes a flamegraph of each sluice server, plus its hottest functions, to benches/profiles/.
# Needs perf (Debian: linux-perf); installs inferno (flamegraphs) with cargo when missing.
#   benches/profile.sh [--events N]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
command -v perf >/dev/null || { echo "profile: perf is required (Debian: apt-get install linux-perf)" >&2; exit 1; }
command -v inferno-flamegraph >/dev/null || cargo install inferno --locked
BIN=$(cargo bench --bench pipeline --no-run --locked --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("target", {}).get("name") == "pipeline" and m.get("executable"):
        print(m["executable"])')
OUT=benches/profiles
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
perf record -q -F 499 --call-graph dwarf,16384 -o "$WORK/perf.data" -- \
  "$BIN" --bench --rounds 1 --no-duckdb --no-nexmark --freshness-secs 0 --out "$WORK/bench.md" "$@" 2> "$WORK/log"
for run in dir http; do
  pid=$(sed -n "s/^server $run: pid //p" "$WORK/log" | head -1)
  perf script -i "$WORK/perf.data" --pid "$pid" 2>/dev/null | inferno-collapse-perf > "$WORK/$run.folded"
  inferno-flamegraph --title "sluice server, $run run ($(date -u +%F), $(nproc) cores)" \
    < "$WORK/$run.folded" > "$OUT/$run.svg"
  python3 - "$WORK/$run.folded" > "$OUT/$run.txt" <<'PY'
import collections, sys
self_time, total = collections.Counter(), 0
for line in open(sys.argv[1]):
    stack, n = line.rsplit(" ", 1)
    total += int(n)
    self_time[stack.split(";")[-1]] += int(n)
print(f"hottest functions (self time) of {total} sampled events")
for f, n in self_time.most_common(25):
    print(f"{100 * n / total:5.1f}%  {f[:140]}")
PY
  echo "profile: $OUT/$run.svg, $OUT/$run.txt"
done
grep '^| sluice' "$WORK/bench.md" | cut -d'|' -f2,4,7 | sed 's/^/profiled run (wall s, CPU-s):/'
