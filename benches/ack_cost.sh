#!/usr/bin/env bash
# Throughput cost of durable acknowledgements: the quickstart pipeline fed over HTTP with
# 'ack' 'durable' (fsync before 200, the default) and 'ack' 'written' (200 before fsync),
# alternating runs in one invocation so both see the same machine state.
#   benches/ack_cost.sh [EVENTS] [ROUNDS] [CONNECTIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
EVENTS="${1:-1000000}"; ROUNDS="${2:-3}"; CONNS="${3:-8}"
cargo build --release --bin sluice >/dev/null 2>&1
SLUICE="$CARGO_TARGET_DIR/release/sluice"
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/examples/quickstart/data"
cp examples/quickstart/data/fx.csv "$WORK/examples/quickstart/data/"
run() {
  local mode=$1
  rm -rf "$WORK/examples/quickstart/lake" "$WORK/.sluice"
  sed "s/OPTIONS ('batch.interval' '500ms', 'batch.max_rows' '50000')/OPTIONS ('batch.interval' '500ms', 'batch.max_rows' '50000', 'ack' '$mode', 'buffer.max_bytes' '256MB')/" \
    examples/quickstart/pipeline.sql > "$WORK/p.sql"
  (cd "$WORK" && exec "$SLUICE" run p.sql --listen 127.0.0.1:0 --max-buffer-bytes 1073741824 > out.txt 2>/dev/null) &
  local pid=$!
  for _ in $(seq 1 300); do grep -q listening "$WORK/out.txt" 2>/dev/null && break; sleep 0.1; done
  local url; url=$(sed -n 's/^sluice listening on //p' "$WORK/out.txt")
  local line; line=$(python3 examples/quickstart/generate.py --url "$url" --events "$EVENTS" --connections "$CONNS" --batch 2000)
  kill -TERM $pid; wait $pid
  echo "$mode: $line"
}
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
for r in $(seq 1 "$ROUNDS"); do run durable; run written; done
