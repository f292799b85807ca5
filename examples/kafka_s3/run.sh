#!/usr/bin/env bash
# Kafka → S3 end to end on loopback: start a Kafka-protocol broker (tansu) and an S3-compatible
# server (moto) on free ports, create the topic and the bucket, produce orders into 3 partitions,
# run the pipeline into s3://lake/orders_usd/, and query the committed table on S3.
#
# Needs the two servers that `scripts/setup.sh --test` installs under ~/.cache/sluice-tools.
# EVENTS (default 30000) sets how many orders are produced; SLUICE names another binary.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
EX=examples/kafka_s3
TOOLS="${SLUICE_TOOLS:-$HOME/.cache/sluice-tools}"
TANSU="$TOOLS/tansu/bin/tansu"
PY="$TOOLS/venv/bin/python"
[[ -x "$TANSU" && -x "$TOOLS/venv/bin/moto_server" ]] || scripts/setup.sh --test
if [[ -z "${SLUICE:-}" ]]; then
  cargo build --release --bin sluice
  SLUICE="$CARGO_TARGET_DIR/release/sluice"
fi
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_for() { # wait_for WHAT COMMAND...: up to 60 s
  local what=$1; shift
  for _ in $(seq 1 600); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "$what did not come up" >&2; exit 1
}

echo "== starting tansu (Kafka protocol) and moto (S3) on loopback"
KPORT=$(free_port); SPORT=$(free_port)
"$TANSU" broker --storage-engine memory://tansu/ --listener-url "tcp://127.0.0.1:$KPORT" \
  --advertised-listener-url "tcp://127.0.0.1:$KPORT" >"$WORK/tansu.log" 2>&1 &
PIDS+=($!)
"$PY" scripts/moto_server.py -H 127.0.0.1 -p "$SPORT" >"$WORK/moto.log" 2>&1 &
PIDS+=($!)
http() { python3 -c 'import sys, urllib.request as u; u.urlopen(u.Request(sys.argv[2], method=sys.argv[1]), timeout=5)' "$@"; }
wait_for "moto" http GET "http://127.0.0.1:$SPORT/"
wait_for "tansu" "$TANSU" topic list --broker "tcp://127.0.0.1:$KPORT"
http PUT "http://127.0.0.1:$SPORT/lake"
"$TANSU" topic create orders --broker "tcp://127.0.0.1:$KPORT" --partitions 3 >/dev/null

export KAFKA_BROKERS="127.0.0.1:$KPORT" S3_ENDPOINT="http://127.0.0.1:$SPORT"
export AWS_ACCESS_KEY_ID=demo AWS_SECRET_ACCESS_KEY=demo-secret AWS_REGION=us-east-1
export AWS_ENDPOINT="$S3_ENDPOINT" AWS_ALLOW_HTTP=true

echo "== producing ${EVENTS:=30000} orders into 3 partitions"
python3 - "$EVENTS" "$WORK" <<'PY'
import json, random, sys
n, work = int(sys.argv[1]), sys.argv[2]
rng = random.Random(7)
for p in range(3):
    msgs = []
    for i in range(p, n, 3):
        cur = "XXX" if i % 1000 == 999 else rng.choice(["USD", "EUR", "GBP"])
        msgs.append({"key": None, "value": {
            "order_id": i, "customer_id": rng.randrange(1000), "amount": round(rng.uniform(1, 500), 2),
            "currency": cur, "ts": f"2026-11-{20 + i % 5:02d}T{i % 24:02d}:00:00Z"}})
    json.dump(msgs, open(f"{work}/p{p}.json", "w"))
PY
for p in 0 1 2; do
  "$TANSU" cat produce orders "$WORK/p$p.json" --broker "tcp://127.0.0.1:$KPORT" --partition "$p"
done

echo "== sluice validate $EX/pipeline.sql"
"$SLUICE" validate "$EX/pipeline.sql" >/dev/null
echo "== sluice run $EX/pipeline.sql (until every order is committed)"
"$SLUICE" run "$EX/pipeline.sql" --listen 127.0.0.1:0 --state-dir "$WORK/state" >"$WORK/run.out" 2>"$WORK/run.err" &
SPID=$!
PIDS+=($SPID)
committed() {
  "$SLUICE" query "SELECT count(*) + 0 FROM t" --table "t=s3://lake/orders_usd/" --format csv 2>/dev/null | tail -1
}
DEAD=$(( EVENTS / 1000 ))
for _ in $(seq 1 1200); do
  n=$(committed || echo 0)
  [[ "$n" =~ ^[0-9]+$ ]] && (( n >= EVENTS - DEAD )) && break
  kill -0 $SPID 2>/dev/null || { cat "$WORK/run.err" >&2; exit 1; }
  sleep 0.25
done
kill -TERM $SPID
wait $SPID

echo "== sluice query over s3://lake/orders_usd/"
"$SLUICE" query "SELECT order_date, count(*) AS orders, round(sum(amount_usd), 2) AS usd,
                        count(DISTINCT kafka_partition) AS partitions
                 FROM t GROUP BY order_date ORDER BY order_date" --table "t=s3://lake/orders_usd/"
echo "== objects in the bucket"
"$PY" - "$S3_ENDPOINT" <<'PY'
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], aws_access_key_id="demo",
                  aws_secret_access_key="demo-secret", region_name="us-east-1")
keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="lake") for o in page.get("Contents", [])]
data = [k for k in keys if "/_sluice/" not in k]
dead = [k for k in keys if "/_sluice/dead_letter/" in k]
print(f"{len(data)} Parquet files in date partitions, {len(keys) - len(data)} Sluice objects "
      f"(log, archive, profiles), {len(dead)} dead-letter file(s) (the XXX currency orders)")
for k in sorted(data)[:3]: print("  s3://lake/" + k)
PY
