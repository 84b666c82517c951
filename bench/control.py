#!/usr/bin/env python3
"""Control-plane latency: time from an API call to the new ring in the maps.

A real `l4lb start` runs in a lab balancer node with one VIP of N reals (default
1,000) at M = 65537. The bench calls the daemon's unix-socket API from the host
(`real add`, `real del`, `real weight`); each call returns after the new ring is
written to the idle slot and the VIP flipped to it, so the call's round trip is
the figure. `add` and `weight` need a fresh Maglev fill each time (made in a thread,
then published on the event loop); `remove` undoes the `add` before it, so its ring
is the one from two changes ago, which the tables keep (a flap back costs no fill).
The machine's load average before and after is recorded: on a shared 2-CPU VM the
figures scale with it.

    .venv/bin/python -m bench.control [--quick] [--reals N] [--repeats K] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from bench.common import markdown_table, run_meta, text_table, write_json, write_text
from l4lb import api
from l4lb.lab import Lab

RING = 65537


def real_addr(i: int) -> str:
    return f"10.98.{i // 250}.{i % 250 + 1}"


def real_mac(i: int) -> str:
    return f"02:98:00:00:{i // 256:02x}:{i % 256:02x}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats (well under a minute)")
    ap.add_argument("--reals", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--json", help="write results as JSON here")
    ap.add_argument("--md", help="write a Markdown report here")
    a = ap.parse_args(argv)
    repeats = a.repeats or (5 if a.quick else 20)

    load_before = os.getloadavg()[0]
    with Lab("bctl", clients=0, balancers=1, reals=0) as lab:
        reals = [{"address": real_addr(i), "mac": real_mac(i)} for i in range(a.reals)]
        cfg = lab.balancer_config("lb1", [{"address": "10.99.0.100", "port": 80,
                                           "ring_size": RING, "real": reals}],
                                  healthcheck={"type": "none"})
        cfg["metrics"] = {"enabled": False}
        t0 = time.monotonic()
        lab.start_l4lb("lb1", cfg, timeout=120)
        print(f"daemon up with {a.reals} reals in {time.monotonic() - t0:.1f}s", flush=True)
        sock = lab.api_socket("lb1")
        vip = "10.99.0.100:80/tcp"
        extra = real_addr(a.reals)
        times = {"add": [], "remove": [], "weight": []}
        for i in range(repeats):
            t = time.perf_counter()
            api.request(sock, "real_add", vip=vip, address=extra, mac=real_mac(a.reals))
            times["add"].append(time.perf_counter() - t)
            t = time.perf_counter()
            api.request(sock, "real_del", vip=vip, address=extra)
            times["remove"].append(time.perf_counter() - t)
            t = time.perf_counter()
            # a real change every time: another real each round, 100 <-> 50
            api.request(sock, "real_weight", vip=vip, address=real_addr(i % a.reals),
                        weight=50 if (i // a.reals) % 2 == 0 else 100)
            times["weight"].append(time.perf_counter() - t)
        st = api.request(sock, "status")
        n = len(st["vips"][0]["reals"])
        assert n == a.reals, n

    load_after = os.getloadavg()[0]
    rows = []
    out = {"reals": a.reals, "ring_size": RING, "repeats": repeats, "ops": {},
           "loadavg_1m": [round(load_before, 2), round(load_after, 2)]}
    for op, ts in times.items():
        ms = sorted(x * 1000 for x in ts)
        med = statistics.median(ms)
        out[f"{op}_ms"] = round(med, 2)
        out["ops"][op] = {"min_ms": round(ms[0], 2), "median_ms": round(med, 2),
                          "max_ms": round(ms[-1], 2)}
        rows.append([op, f"{ms[0]:.1f}", f"{med:.1f}", f"{ms[-1]:.1f}", "<= 20 (issue 16)"])
    out.update(run_meta(a.quick, argv))
    headers = ["operation", "min ms", "median ms", "max ms", "aim"]
    print(f"\nAPI call -> new ring live in the maps, {a.reals} reals, M = {RING}, "
          f"{repeats} repeats, load average {load_before:.2f} -> {load_after:.2f}")
    print(text_table(headers, rows, right={1, 2, 3}))
    if a.json:
        write_json(a.json, out)
    if a.md:
        write_text(a.md, f"# Control-plane latency\n\n`{out['command']}`\n\n"
                   + markdown_table(headers, rows, right={1, 2, 3}) + "\n\n"
                   f"{a.reals} reals, M = {RING}, {repeats} repeats, {out['timestamp']}, "
                   f"1-minute load average {load_before:.2f} before and {load_after:.2f} "
                   "after (2 CPUs). `add` and `weight` fill a new Maglev ring each call (in "
                   "a thread); `remove` undoes the `add` before it and reuses the ring from "
                   "two changes ago.\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

