#!/usr/bin/env bash
# The nightly reconciliation, end to end on local disk: stream orders with a wrong EUR rate,
# correct the rate table, reconcile (exit 1: the EUR rows differ), repair in one commit,
# reconcile again (exit 0).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
cargo build --release --bin sluice
SLUICE="$CARGO_TARGET_DIR/release/sluice"
EX=examples/reconcile
rm -rf "$EX/lake" "$EX/state"
cp "$EX/data/fx-original.csv" "$EX/data/fx.csv"

echo "== streaming ${EVENTS:=20000} orders (EUR at the original rate)"
OUT=$(mktemp)
"$SLUICE" run "$EX/pipeline.sql" --listen 127.0.0.1:0 --state-dir "$EX/state" >"$OUT" &
PID=$!
trap 'kill $PID 2>/dev/null || true; rm -f "$OUT"' EXIT
for _ in $(seq 1 600); do
  grep -q "listening on" "$OUT" && break
  kill -0 $PID 2>/dev/null || { echo "sluice exited early" >&2; exit 1; }
  sleep 0.1
done
python3 examples/quickstart/generate.py --url "$(sed -n 's/^sluice listening on //p' "$OUT")" --events "$EVENTS"
kill -TERM $PID
wait $PID
trap - EXIT
rm -f "$OUT"

echo "== the EUR rate is corrected the next morning"
cp "$EX/data/fx-corrected.csv" "$EX/data/fx.csv"

echo "== sluice reconcile (report only)"
set +e
"$SLUICE" reconcile "$EX/pipeline.sql" --pipeline orders_usd --report "$EX/lake/report.json"
echo "exit $?"
echo "== sluice reconcile --repair"
"$SLUICE" reconcile "$EX/pipeline.sql" --pipeline orders_usd --repair
echo "exit $?"
echo "== sluice reconcile (again)"
"$SLUICE" reconcile "$EX/pipeline.sql" --pipeline orders_usd
echo "exit $?"
