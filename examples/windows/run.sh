#!/usr/bin/env bash
# Windows over a click stream, end to end on local disk: generate 30 minutes of clicks (out of
# order, some twice, a few late), run the two windowed pipelines until every file is
# committed, then query the windows and show the late clicks and the dropped repeats.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
cargo build --release --bin sluice
SLUICE="$CARGO_TARGET_DIR/release/sluice"
EX=examples/windows
rm -rf "$EX/lake" "$EX/incoming"
python3 "$EX/generate.py" "$EX/incoming"
FILES=$(ls "$EX/incoming" | wc -l)

OUT=$(mktemp)
"$SLUICE" run "$EX/pipeline.sql" --listen 127.0.0.1:0 >"$OUT" &
PID=$!
trap 'kill $PID 2>/dev/null || true; rm -f "$OUT"' EXIT
# Done when both pipelines' newest entries cover the last file.
LAST=$(ls "$EX/incoming" | sort | tail -1)
for _ in $(seq 1 1200); do
  done=0
  for p in clicks_per_minute active_users_5m; do
    newest=$(ls "$EX/lake/$p/_sluice/log/" 2>/dev/null | grep json | sort | tail -1 || true)
    [ -n "$newest" ] && grep -q "\"$LAST\"" "$EX/lake/$p/_sluice/log/$newest" && grep -q '"complete": true' "$EX/lake/$p/_sluice/log/$newest" && done=$((done + 1))
  done
  [ "$done" = 2 ] && break
  kill -0 $PID 2>/dev/null || { echo "sluice exited early" >&2; exit 1; }
  sleep 0.1
done
python3 - "$(sed -n 's/^sluice listening on //p' "$OUT")/v1/pipelines" <<'PY'
import json, sys, urllib.request
for p in json.load(urllib.request.urlopen(sys.argv[1])):
    print(f"{p['name']}: watermark {p['watermark']}, {p['open_windows']} open windows, "
          f"{p['state_bytes']} state bytes, {p['late_rows']} late, {p['duplicates_dropped']} repeats dropped")
PY
kill -TERM $PID
wait $PID
trap - EXIT
rm -f "$OUT"

echo "== the first minutes per page"
"$SLUICE" query --table m="$EX/lake/clicks_per_minute/" \
  "SELECT window_start, page, clicks, users, round(avg_ms) AS avg_ms, p90_ms FROM m ORDER BY window_start, page LIMIT 10"
echo "== active users over 5 minutes"
"$SLUICE" query --table a="$EX/lake/active_users_5m/" \
  "SELECT window_start, window_end, users, clicks FROM a ORDER BY window_start LIMIT 8"
