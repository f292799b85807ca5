#!/usr/bin/env python3
"""Writes the golden event-time cases under tests/golden/: each case's input.ndjson and the
expected output, computed here by a reference model written from the rules in README's
"Event time" section (not from Sluice's code):

- the watermark before a row is (newest event time of the rows before it) - watermark.delay;
  a row below it is late;
- a row whose dedup key was kept at t0 is a repeat when |t - t0| < dedup.ttl;
- a window [start, start + width) is emitted once the watermark reaches its end.

Run it again only to change a case; the files it writes are reviewed and committed.
"""
import json
import os
import random
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
BASE = int(datetime(2026, 1, 1, tzinfo=timezone.utc).timestamp())


def iso(t):
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def shown(t):
    # How arrow displays a TIMESTAMP without time zone.
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


def num(x):
    # How arrow displays a Float64: the shortest text that reads back the same, as Python's.
    return repr(float(x))


def split_late(events, delay):
    """(on time, late) in input order."""
    newest, on_time, late = None, [], []
    for e in events:
        if newest is not None and e["ts"] < newest - delay:
            late.append(e)
            continue
        newest = e["ts"] if newest is None else max(newest, e["ts"])
        on_time.append(e)
    return on_time, late, newest - delay


def windows(rows, width, watermark, slide=None):
    """amounts per (window, user) for windows that end by the watermark: tumbling, or hopping
    every `slide` seconds (a row is in every window that contains it)."""
    groups = {}
    for e in rows:
        step = slide or width
        newest = e["ts"] - e["ts"] % step
        starts = [newest - k * step for k in range(width // step)]
        for start in starts:
            g = groups.setdefault((start, e["user_id"]), [])
            g.append(e["amount"])
    out = []
    for (start, user), amounts in groups.items():
        if start + width <= watermark:
            out.append((start, user, amounts))
    return out


def write(case, events, header, rows, late_ids=None):
    d = os.path.join(HERE, case)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "input.ndjson"), "w") as f:
        for e in events:
            f.write(json.dumps({**e, "ts": iso(e["ts"])}) + "\n")
    with open(os.path.join(d, "expected.csv"), "w") as f:
        f.write(header + "\n")
        for r in sorted(rows):
            f.write(r + "\n")
    if late_ids is not None:
        with open(os.path.join(d, "expected_late.txt"), "w") as f:
            for i in sorted(late_ids):
                f.write(f"{i}\n")


def disordered(seed, n, step, users, amounts):
    """n events `step` seconds apart, each moved at most 10 s (the watermark delay) from its
    place, then one an hour later that closes every window: (input, rows on time, watermark)."""
    rng = random.Random(seed)
    events = []
    for i in range(n):
        events.append({"id": i, "user_id": f"u{rng.randrange(users)}", "amount": rng.randrange(1, amounts), "ts": BASE + i * step})
    shuffled = sorted(events, key=lambda e: e["ts"] + rng.uniform(0, 9.9))
    shuffled.append({"id": 1000, "user_id": "zz", "amount": 1, "ts": BASE + 3600})
    on_time, late, wm = split_late(shuffled, 10)
    assert not late, "bounded disorder makes no late row"
    return shuffled, on_time, wm


def tumbling():
    shuffled, on_time, wm = disordered(16, 90, 4, 3, 100)
    rows = [
        f"{shown(s)},{shown(s + 60)},{u},{len(a)},{sum(a)},{num(sum(a) / len(a))}"
        for s, u, a in windows(on_time, 60, wm)
    ]
    write("tumbling", shuffled, "window_start,window_end,user_id,clicks,total,mean", rows)
    # The same input through SELECT DISTINCT window, user: the windows' (start, user) pairs.
    pairs = [f"{shown(s)},{u}" for s, u, a in windows(on_time, 60, wm)]
    write("distinct", shuffled, "w,user_id", pairs)


def late_events():
    rng = random.Random(17)
    events = []
    for i in range(80):
        t = BASE + i * 3
        if i % 9 == 5 and i > 20:
            t -= rng.randrange(30, 90)  # arrives far behind: late
        events.append({"id": i, "user_id": f"u{rng.randrange(2)}", "amount": rng.randrange(1, 50), "ts": t})
    events.append({"id": 1000, "user_id": "zz", "amount": 1, "ts": BASE + 3600})
    return events


def late(case):
    events = late_events()
    on_time, late_rows, wm = split_late(events, 5)
    assert late_rows
    rows = [f"{shown(s)},{u},{len(a)},{sum(a)}" for s, u, a in windows(on_time, 60, wm)]
    write(case, events, "window_start,user_id,clicks,total", rows, [e["id"] for e in late_rows])


def dedup():
    rng = random.Random(18)
    events = []
    t = BASE
    for i in range(120):
        t += rng.randrange(0, 4)
        key = rng.randrange(40)  # repeats, some within a minute of the kept row, some after
        events.append({"id": key, "user_id": f"u{i}", "amount": i, "ts": t})
    on_time, late_rows, _ = split_late(events, 30)
    kept, seen = [], {}
    for e in on_time:
        t0 = seen.get(e["id"])
        if t0 is not None and abs(e["ts"] - t0) < 60:
            continue
        seen[e["id"]] = e["ts"]
        kept.append(e)
    assert len(kept) < len(on_time)
    rows = [f"{e['id']},{e['user_id']},{shown(e['ts'])}" for e in kept]
    assert not late_rows
    write("dedup", events, "id,user_id,ts", rows)


def hopping():
    shuffled, on_time, wm = disordered(19, 70, 5, 2, 20)
    rows = [
        f"{shown(s)},{shown(s + 180)},{u},{len(a)},{sum(a)}"
        for s, u, a in windows(on_time, 180, wm, slide=60)
    ]
    write("hopping", shuffled, "window_start,window_end,user_id,clicks,total", rows)


tumbling()
hopping()
late("late_drop")
late("late_dead_letter")
dedup()
