"""No false failover under load: 20 s of iperf3 through the master causes no state
transition on either node, at the shortest advert interval that holds here under
saturating load: 0.1 s (VRRPv3; the backup's Master_Down_Interval is 361 ms).

Both daemons run their VRRP process with `node.vrrp_rt_priority = 10` (SCHED_RR), as a
pair at short intervals on saturated CPUs should: the test checks it took effect, and
that the backup's kernel never received two of the master's adverts further apart than
the Master_Down_Interval (a raw-socket capture in lb2's namespace, bench/loop.py's).

iperf3's server runs on real1; the client sends to VIP:5201, DR through lb1 with
generic XDP (the forwarding runs in the softirq of the sending CPU, so the client,
the real and the balancers share the machine's two cores with the VRRP daemons). The
status JSON's transition counters of both nodes must be the same before and after,
and the backup must have accepted an advert about every 100 ms all along.

Why not 0.02 s (measured with tcpdump on the master, 45-60 s iperf3 runs, 2 vCPUs,
PREEMPT_NONE kernel): a backup at 0.02 s takes over when the master is silent for
72 ms, i.e. 52 ms after the last advert was due. Two things silenced the master longer:
  * full garbage collections over the ~50k objects bcc, pyroute2 and the tables make
    at start-up: 46-156 ms each, about every 30 s on a busy machine; fixed in
    l4lb/vrrp/agent.py (gc.collect() + gc.freeze() when the agent starts);
  * CPU: with iperf3 saturating both cores, the master's daemon (normal scheduling)
    waited up to 190 ms to run: false failovers in about half of the runs, up to 5
    in one. Real-time priority for the daemon (chrt -f) removed that in two runs of
    four; in the other two the master was still silent for 100-150 ms, once while a
    SCHED_FIFO sleeper on the host was late by 0.5 s: stalls of the whole VM.
So 0.02 s fails over in ~70 ms on a pair that is not starved of CPU (bench/failover.py)
but is not safe under saturating load here; 0.1 s leaves 261 ms of slack.
Since then VRRP left the daemon's loop and process (l4lb/vrrp/runner.py) and can run
SCHED_RR. bench/loop.py measured 0.02 s under the same iperf3 load, 3 runs of 60 s each
(bench/results/loop.md): with SCHED_RR the VRRP loop's lag p99 fell from ~10 ms to 2-3
ms and 2 runs of 3 were clean, yet one still had a false failover (two stalls of 87 ms);
at normal priority all 3 had some. Those stalls are below Python: a SCHED_RR sleeper
process with no Python in it was once 89 ms late during iperf3 here (PREEMPT_NONE
kernel, 2 vCPUs). So this test keeps 0.1 s, with SCHED_RR as a pair under such load
should run.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from bench.loop import Capture
from l4lb import api
from l4lb.lab import Lab, wait_for

pytestmark = pytest.mark.timeout(180)

VIP = "10.99.0.100"
VIP_KEY = f"{VIP}:5201/tcp"
INTERVAL = 0.1
SECONDS = 20  # bench/loop.py runs the 60 s version
RT_PRIORITY = 10


def lb_config(lab: Lab, node: str) -> dict:
    vrrp = {"name": "VI_1", "interface": "eth0", "vrid": 51, "version": 3,
            "priority": 150 if node == "lb1" else 100, "advert_interval_s": INTERVAL,
            "preempt": True, "vips": [f"{VIP}/24"]}
    cfg = lab.balancer_config(node, [{"address": VIP, "port": 5201, "mode": "dr",
                                      "real": [{"address": lab.node("real1").ipv4}]}],
                              vrrp=[vrrp])
    cfg["node"]["vrrp_rt_priority"] = RT_PRIORITY
    return cfg


def status(lab: Lab, node: str) -> dict:
    return api.request(lab.api_socket(node), "status", timeout=5.0)


def vrrp(lab: Lab, node: str) -> dict:
    return status(lab, node)["vrrp"][0]


def vip_packets(lab: Lab, node: str) -> int:
    st = api.request(lab.api_socket(node), "stats", timeout=5.0)
    return next(v["packets"] for v in st["vips"] if v["vip"] == VIP_KEY)


def transitions_logged(lab: Lab) -> list[str]:
    """The daemons' log lines about VRRP transitions (for the failure message)."""
    return [f"{s.node}: {ln}" for s in lab.services if "l4lb.cli" in " ".join(s.argv)
            for ln in s.output().splitlines() if " -> " in ln and "vrrp" in ln]


def test_no_false_failover_under_iperf3():
    with Lab("tvload", clients=1, balancers=2, reals=1) as lab:
        lab.start_iperf3("real1")
        with ThreadPoolExecutor(2) as ex:  # the two compile in parallel
            for f in [ex.submit(lab.start_l4lb, n, lb_config(lab, n)) for n in ("lb1", "lb2")]:
                f.result()
        wait_for(lambda: vrrp(lab, "lb1")["state"] == "master"
                 and vrrp(lab, "lb2")["state"] == "backup", 10, 0.05, "lb1 master, lb2 backup")
        wait_for(lambda: all(r["in_ring"] for r in status(lab, "lb1")["vips"][0]["reals"]),
                 10, 0.1, "real1 in lb1's ring")
        before = {n: vrrp(lab, n) for n in ("lb1", "lb2")}
        pkts = {n: vip_packets(lab, n) for n in ("lb1", "lb2")}

        cap = Capture(lab, "lb2", lab.node("lb1").ipv4, SECONDS + 2)
        r = lab.run("client1", ["iperf3", "-c", VIP, "-p", "5201", "-t", str(SECONDS), "-J",
                                "--connect-timeout", "3000"], timeout=SECONDS + 30)
        adverts = cap.result()
        gbps = json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9

        after = {n: vrrp(lab, n) for n in ("lb1", "lb2")}
        fwd = {n: vip_packets(lab, n) - pkts[n] for n in ("lb1", "lb2")}
        accepted = (after["lb2"]["counters"]["adverts_accepted"]
                    - before["lb2"]["counters"]["adverts_accepted"])
        print(f"\n[vrrp load] iperf3 {gbps:.2f} Gbit/s for {SECONDS}s through lb1 "
              f"({fwd['lb1']} packets); lb2 accepted {accepted} adverts "
              f"(one per {SECONDS / max(accepted, 1) * 1000:.1f} ms); longest gap between "
              f"two at lb2 {adverts['longest_gap_ms']} ms (worst {adverts['worst_gaps_ms']})")
        for n in ("lb1", "lb2"):
            b, a = before[n], after[n]
            assert a["counters"]["transitions"] == b["counters"]["transitions"], \
                (n, b["counters"]["transitions"], a["counters"]["transitions"],
                 a["last_transition"], transitions_logged(lab))
            assert a["last_transition"] == b["last_transition"]
        assert gbps > 0.1 and fwd["lb1"] > 10000 and fwd["lb2"] == 0, (gbps, fwd)
        assert after["lb1"]["state"] == "master" and after["lb2"]["state"] == "backup"
        # an advert every interval arrived and was accepted (a few may be late, none lost)
        assert accepted >= 0.95 * SECONDS / INTERVAL, accepted
        assert after["lb2"]["counters"]["rejected"] == {}
        mdi_ms = after["lb2"]["master_down_interval_s"] * 1000
        assert adverts["longest_gap_ms"] < mdi_ms, (adverts, mdi_ms)
        for n in ("lb1", "lb2"):
            rs = after[n]["runner"]
            assert rs["mode"] == "process" and rs["rt_active"] and rs["rt_priority"] == RT_PRIORITY
