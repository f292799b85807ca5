#!/usr/bin/env bash
# Sets up, builds and runs the quickstart end to end on local disk: validate the pipeline,
# start the server, post generated orders over HTTP, drain, and query the Parquet written.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
scripts/setup.sh

EVENTS="${EVENTS:-200000}"
cargo build --release --bin sluice
SLUICE="$CARGO_TARGET_DIR/release/sluice"
LAKE=examples/quickstart/lake
STATE=examples/quickstart/state
# A fresh demo: the committed lake and the server's ingest logs go together.
rm -rf "$LAKE" "$STATE"

echo "== sluice validate examples/quickstart/pipeline.sql"
"$SLUICE" validate examples/quickstart/pipeline.sql

echo "== sluice run examples/quickstart/pipeline.sql"
OUT=$(mktemp)
"$SLUICE" run examples/quickstart/pipeline.sql --listen 127.0.0.1:0 --state-dir "$STATE" >"$OUT" &
PID=$!
trap 'kill $PID 2>/dev/null || true; rm -f "$OUT"' EXIT
for _ in $(seq 1 600); do
  grep -q "listening on" "$OUT" && break
  kill -0 $PID 2>/dev/null || { echo "sluice exited early" >&2; exit 1; }
  sleep 0.1
done
URL=$(sed -n 's/^sluice listening on //p' "$OUT")
echo "server at $URL"

echo "== posting $EVENTS orders"
python3 examples/quickstart/generate.py --url "$URL" --events "$EVENTS"

echo "== SIGTERM: drain, commit, exit"
kill -TERM $PID
wait $PID
trap - EXIT
rm -f "$OUT"

echo
echo "Parquet written under $LAKE/orders_usd/:"
find "$LAKE/orders_usd" -name '*.parquet' -not -path '*/_sluice/*' | sort | head -n 10
echo "($(find "$LAKE/orders_usd/_sluice/log" -name '*.json' | wc -l) commits in $LAKE/orders_usd/_sluice/log/)"
echo
echo "== sluice query"
"$SLUICE" query \
  "SELECT order_date, status, count(*) AS orders, round(sum(amount_usd), 2) AS usd
   FROM orders_usd GROUP BY order_date, status ORDER BY order_date, status" \
  --table orders_usd="$LAKE/orders_usd/"

echo
echo "== sluice quality report"
"$SLUICE" quality report "$LAKE/orders_usd/" --html "$LAKE/quality-report.html"
