"""A spoofed flood through the VIP (400,000 frames, 5-tuples never seen: lone SYNs,
SYN-then-ACK pairs, stray ACKs) while 60 held connections echo through the master
of a synced pair, a real added just before: no held connection is reset, the
backup's conn table grows by no more than the admission guard lets through, and
new connections keep being served. The scenario is bench/flood.py's."""

from __future__ import annotations

import pytest

from bench import flood
from l4lb.lab import Lab

pytestmark = pytest.mark.timeout(180)

GUARD = 200  # admissions per CPU and second on both balancers


def test_flood_leaves_held_connections_and_the_backup_alone():
    with Lab("tflood", clients=1, balancers=2, reals=4) as lab:
        r = flood.scenario(lab, packets=400_000, guard=GUARD, flood_seconds=30)
    print(f"\n[flood] {r}")
    assert r["flood_packets"] == 400_000
    assert r["held_lost"] == 0, r["held_lost_detail"]
    d = r["lb1_counters_delta"]
    # every flood tuple was new: lone SYNs and pairs' SYNs made embryos, stray ACKs none
    assert d["conn_miss"] >= 200_000 and d["conn_miss_non_syn"] >= 100_000, d
    # the pairs' ACKs asked for 100,000 admissions; the guard let through at most
    # GUARD per CPU and started second (+1 window of slack at each end)
    bound = GUARD * 2 * (int(r["flood_seconds"]) + 3)
    assert d["conn_promoted"] <= bound + 400, d  # + the new connections opened meanwhile
    assert d["conn_guard_limited"] >= 100_000 - bound, d
    assert r["backup_conn_growth"] <= bound + 400, r
    assert r["new_conns_ok"] == 300 and not r["new_conns_errors"], r
