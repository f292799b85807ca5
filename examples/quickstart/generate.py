#!/usr/bin/env python3
"""Quickstart event generator: posts deterministic orders (NDJSON) to a Sluice HTTP source,
waits until the pipeline has committed all of them, and reports events per second.

Usage: generate.py --url http://127.0.0.1:7878 [--events 200000] [--batch 1000] [--connections 4]
"""
import argparse
import http.client
import json
import random
import sys
import threading
import time
import urllib.parse
import urllib.request

CURRENCIES = ["USD", "EUR", "GBP", "JPY", "CHF"]
STATUSES = ["new", "paid", "shipped", "test"]
BASE_MS = 1_795_132_800_000  # 2026-11-20T00:00:00Z


def make_bodies(n, batch, bad_every, seed):
    rng = random.Random(seed)
    bodies, lines = [], []
    for i in range(n):
        if bad_every and i % bad_every == bad_every - 1:
            lines.append('{"order_id": %d, "amount": "not-a-number", "ts": 0}' % i)
        else:
            ts = BASE_MS + i * 1_500 + rng.randrange(1000)
            lines.append(json.dumps({
                "order_id": i,
                "customer_id": None if rng.random() < 0.05 else rng.randrange(10_000),
                "amount": round(rng.uniform(1, 500), 2),
                "currency": rng.choice(CURRENCIES),
                "status": rng.choice(STATUSES),
                "ts": ts if i % 2 else time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts / 1000)) + "Z",
            }, separators=(",", ":")))
        if len(lines) == batch:
            bodies.append("\n".join(lines).encode())
            lines = []
    if lines:
        bodies.append("\n".join(lines).encode())
    return bodies


def post_all(base, source, bodies, connections):
    u = urllib.parse.urlparse(base)
    errors = []
    idx = iter(range(len(bodies)))
    lock = threading.Lock()

    def worker():
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        while True:
            with lock:
                i = next(idx, None)
            if i is None:
                return
            while True:
                conn.request("POST", f"/v1/sources/{source}", body=bodies[i],
                             headers={"content-type": "application/x-ndjson"})
                r = conn.getresponse()
                r.read()
                if r.status == 200:
                    break
                if r.status == 429:  # back-pressure: wait as told, then retry
                    time.sleep(float(r.getheader("retry-after", "1")) / 10)
                    continue
                errors.append(f"HTTP {r.status}")
                break

    threads = [threading.Thread(target=worker) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        sys.exit(f"{len(errors)} requests failed, first: {errors[0]}")


def processed(base):
    with urllib.request.urlopen(f"{base}/v1/pipelines", timeout=10) as r:
        p = json.load(r)
    return sum(x["events_received"] for x in p), p


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--url", required=True)
    ap.add_argument("--source", default="orders")
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--bad-every", type=int, default=1000, help="one malformed line per N (0 = none)")
    ap.add_argument("--seed", type=int, default=42)
    a = ap.parse_args()
    bodies = make_bodies(a.events, a.batch, a.bad_every, a.seed)
    size = sum(len(b) for b in bodies)
    t0 = time.monotonic()
    post_all(a.url, a.source, bodies, a.connections)
    acked = time.monotonic()
    deadline = acked + 300
    while True:
        _, p = processed(a.url)
        done = all(x["buffered_records"] == 0 for x in p) and \
            sum(x["events_written"] + x["events_dead_lettered"] for x in p) > 0 and \
            sum(x["events_received"] for x in p) >= a.events
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    t1 = time.monotonic()
    w = sum(x["events_written"] for x in p)
    d = sum(x["events_dead_lettered"] for x in p)
    print(f"sent {a.events} events ({size / 1e6:.1f} MB) in {acked - t0:.2f}s; "
          f"committed after {t1 - t0:.2f}s: {a.events / (t1 - t0):,.0f} events/s "
          f"({w} rows written, {d} dead letters, {a.events - w - d} filtered)")


if __name__ == "__main__":
    main()
