"""VRRP is not delayed by the rest of the daemon (issue 11): a pair at 0.1 s adverts,
1,000,000 conn entries on the master, and 30 s of `status`, `stats`, `conns`, metrics
scrapes and full sync walks of the whole table running over and over on the master,
plus one `conns --limit 200000` (a long walk, and a JSON answer whose encoding holds
the GIL for most of a second: a VRRP thread in the daemon would have stalled with it;
the VRRP process does not).

Before the VRRP thread, one `conns` on such a table held the daemon's loop 10.9 s and
both nodes were master for ~7 s. Now: no VRRP transition on either node, and the
backup's kernel never receives two adverts of the master further apart than its
Master_Down_Interval (361 ms). The lab, the fill and the load are bench/loop.py's
(its `stall` case, at full size here).
"""

from __future__ import annotations

import pytest

from bench import loop as B
from l4lb.lab import Lab

pytestmark = pytest.mark.timeout(240)

ENTRIES = 1_000_000
SECONDS = 30
INTERVAL = 0.1
BIG = 200_000  # one `conns --limit BIG` in the load: its JSON encoding holds the GIL ~0.7 s


def test_no_transition_and_no_late_advert_while_the_daemon_is_busy():
    with Lab("tloopst", clients=1, balancers=2, reals=1) as lab:
        B.start_pair(lab, INTERVAL, 2 * ENTRIES)  # LRU: room, so nothing is evicted
        B.fill_conns(lab, "lb1", ENTRIES)
        load = B.Load(lab, big_conns=BIG)
        r = B.measure(lab, SECONDS, load, INTERVAL)
        entries = B.metric(lab, "lb1", "l4lb_conn_table_entries")
        walks = B.status(lab, "lb1")["sync"]["full_walks"]
        print(f"\n[loop stall] {entries:.0f} entries; longest advert gap at lb2 "
              f"{r['longest_advert_gap_ms']} ms (worst {r['worst_advert_gaps_ms']}, MDI "
              f"{r['master_down_interval_ms']} ms); daemon loop lag p99 {r['loop_lag_p99_ms']} "
              f"max {r['loop_lag_max_ms']} ms; VRRP loop lag max {r['vrrp_lag_max_ms']} ms; "
              f"ops {r['ops']}; big conns {r['big_conns']}; sync walks {walks['sent_completed']} done, "
              f"{walks['entries_sent']} entries sent")
        assert entries >= ENTRIES
        # the load really ran: every kind of call, and the sync master walked the table
        assert not r["load_errors"], r["load_errors"]
        assert all(r["ops"].get(k, 0) >= 3 for k in ("status", "stats", "conns", "metrics")), \
            r["ops"]
        assert walks["entries_sent"] >= ENTRIES / 2, walks
        assert r["big_conns"]["rows"] == BIG, r["big_conns"]
        # ...and VRRP did not notice
        assert r["false_failovers"] == 0 and r["transitions"] == 0, r
        assert r["states_after"] == {"lb1": "master", "lb2": "backup"}, r
        assert r["longest_advert_gap_ms"] < r["master_down_interval_ms"], r
        assert r["adverts_seen"] >= 0.9 * SECONDS / INTERVAL, r
