#!/usr/bin/env python3
"""Writes a click stream for examples/windows as NDJSON files: 30 minutes of clicks, up to 10 s
out of order, 2% sent twice, and a few arriving minutes late."""
import json
import os
import random
import sys
from datetime import datetime, timedelta, timezone

out = sys.argv[1] if len(sys.argv) > 1 else "examples/windows/incoming"
os.makedirs(out, exist_ok=True)
rng = random.Random(7)
start = datetime(2026, 11, 26, 9, 0, tzinfo=timezone.utc)
pages = ["/", "/pricing", "/docs", "/blog", "/signup"]
clicks = []
for i in range(30 * 60 * 5):  # five clicks a second for 30 minutes
    t = start + timedelta(milliseconds=200 * i)
    c = {"click_id": i, "user_id": rng.randrange(500), "page": rng.choice(pages), "ms": rng.randrange(100, 60000),
         "ts": t.isoformat().replace("+00:00", "Z")}
    clicks.append((t + timedelta(seconds=rng.uniform(0, 10)), c))
    if rng.random() < 0.02:
        clicks.append((t + timedelta(seconds=rng.uniform(0, 30)), c))  # sent twice
    if rng.random() < 0.002:
        clicks.append((t + timedelta(minutes=3), dict(c, click_id=10_000_000 + i)))  # minutes late
clicks.sort(key=lambda x: x[0])
per_file = 1000
for n in range(0, len(clicks), per_file):
    path = os.path.join(out, f"clicks-{n // per_file:04}.ndjson")
    with open(path + ".tmp", "w") as f:
        for _, c in clicks[n:n + per_file]:
            f.write(json.dumps(c) + "\n")
    os.rename(path + ".tmp", path)
print(f"{len(clicks)} clicks in {out}")
