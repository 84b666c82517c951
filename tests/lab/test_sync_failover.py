"""Conn-table sync through a real VRRP failover and failback (README: High availability).

lb1 (VRRP master, priority 150) and lb2 (backup, priority 100) balance one DR
VIP over four reals, each with its own Maglev ring: lb2 gives real4 nine times
the weight of the others, lb1 knows real4 but gives it weight 0 (no new flows). So the rings disagree on
about three flows in four, and a flow survives a takeover only if the new
master knows where the old one put it.

With sync: 200 long-lived echo connections through lb1; lb1's daemon is killed
(-9) and its link taken down; lb2 takes over and every connection carries on
(200/200, no reset). Then lb1 comes back as if rebooted (XDP, pins and state
gone), 200 new connections opened through lb2 meanwhile; lb1 gets lb2's table
by a full walk during its preempt delay, takes over, and again every
connection carries on. Without sync, the same failover resets most connections.
"""

from __future__ import annotations

import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import halab  # tests/lab/halab.py: helpers shared with test_vip_source.py
import pytest
from halab import broken, end_hold, kill_and_unplug, wait_state

from l4lb.lab import PIN_ROOT, Lab, wait_for

pytestmark = pytest.mark.timeout(240)

VIP = "10.99.0.100"
PORT = 9000
VIP_KEY = f"{VIP}:{PORT}/tcp"
KEY = "lab-sync-key-0123456789abcdef"
SYNC_PORT = 9542
CONNS = 200
PREEMPT_DELAY = 3.0  # lb1 waits this long in backup before it takes over again


def lb_config(lab: Lab, name: str, sync: bool) -> dict:
    r = [lab.node(f"real{i}").ipv4 for i in (1, 2, 3, 4)]
    real4_weight = 0 if name == "lb1" else 900  # the others: the default, 100
    vip = {"address": VIP, "port": PORT, "mode": "dr",
           "real": [{"address": a} for a in r[:3]] + [{"address": r[3],
                                                       "weight": real4_weight}]}
    vrrp = {"name": "VI_1", "interface": "eth0", "vrid": 51, "version": 3,
            "priority": 150 if name == "lb1" else 100, "advert_interval_s": 0.1,
            "preempt": True, "preempt_delay_s": PREEMPT_DELAY, "vips": [f"{VIP}/24"]}
    peer = "lb2" if name == "lb1" else "lb1"
    sections: dict = {"vrrp": [vrrp]}
    if sync:
        sections["sync"] = {"enabled": True, "listen": f"{lab.node(name).ipv4}:{SYNC_PORT}",
                            "peers": [f"{lab.node(peer).ipv4}:{SYNC_PORT}"], "key": KEY,
                            "vrrp_instance": "VI_1", "full_sync_interval_s": 30}
    return lab.balancer_config(name, [vip], **sections)


def status(lab: Lab, node: str) -> dict:
    return lab.l4lb_json(node, ["status"])


def conns(lab: Lab, node: str) -> dict[int, str]:
    return halab.conns(lab, node, VIP_KEY)


def start_pair(lab: Lab, sync: bool) -> None:
    lab.daemons = {}
    with ThreadPoolExecutor(2) as ex:  # the two compile in parallel
        futs = {n: ex.submit(lab.start_l4lb, n, lb_config(lab, n, sync)) for n in ("lb1", "lb2")}
        for n, f in futs.items():
            lab.daemons[n] = f.result()
    wait_state(lab, "lb1", "master", PREEMPT_DELAY + 10)
    wait_state(lab, "lb2", "backup", 5)


def start_hold(lab: Lab, tag: str):
    return halab.start_hold(lab, tag, f"{VIP}:{PORT}", CONNS)


def real_names(report: dict) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in report["detail"]:
        if d["reals"]:
            out[d["reals"][0]] = out.get(d["reals"][0], 0) + 1
    return out


def reboot_wipe(lab: Lab, node: str) -> None:
    """What a reboot leaves of a balancer: no XDP, no pinned maps, no state, no VIP."""
    for mode in ("xdpgeneric", "xdp"):
        lab.run(node, ["ip", "link", "set", "dev", "eth0", mode, "off"], check=False)
    lab.run(node, ["ip", "addr", "del", f"{VIP}/24", "dev", "eth0"], check=False)
    name = lab.l4lb_name(node)
    shutil.rmtree(f"{PIN_ROOT}/{name}", ignore_errors=True)
    shutil.rmtree(f"/run/l4lb/{name}", ignore_errors=True)


def metrics(lab: Lab, node: str) -> dict[str, float]:
    """The node's Prometheus metrics, sample name (with labels) -> value."""
    out = lab.run(node, [sys.executable, "-c", "import urllib.request; print(urllib.request"
                         ".urlopen('http://127.0.0.1:9541/metrics', timeout=5).read().decode())"]
                  ).stdout
    samples = {}
    for line in out.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def vip_packets(lab: Lab, node: str) -> int:
    st = lab.l4lb_json(node, ["stats"])
    return next(v["packets"] for v in st["vips"] if v["vip"] == VIP_KEY)


def test_connections_survive_failover_and_failback_with_sync():
    with Lab("tsync", clients=1, balancers=2, reals=4) as lab:
        for r in lab.by_role("real"):
            lab.start_echo(r.name, PORT)
        start_pair(lab, sync=True)
        wait_for(lambda: status(lab, "lb2")["sync"]["peer_detail"][0]["state"] == "up", 5,
                 what="lb2 sees lb1 over sync")

        # ---- 200 connections through lb1; lb2 learns every one, real by real
        hold1 = start_hold(lab, "hold1")
        on_lb1 = conns(lab, "lb1")
        assert len(on_lb1) == CONNS
        wait_for(lambda: len(conns(lab, "lb2")) >= CONNS, 5, what="lb2 has every flow")
        on_lb2 = conns(lab, "lb2")
        assert {p: on_lb2.get(p) for p in on_lb1} == on_lb1  # same real, by address
        s2 = status(lab, "lb2")["sync"]
        assert s2["role"] == "backup" and s2["entries_installed"] >= CONNS
        assert s2["lag_ms"] is not None and s2["lag_ms"] < 200, s2
        assert status(lab, "lb1")["sync"]["role"] == "master"
        text = lab.l4lb("lb2", ["status"]).stdout
        assert "sync: backup" in text and "lb1: up, master" in text, text
        m = metrics(lab, "lb2")
        assert m["l4lb_sync_entries_installed_total"] >= CONNS, m
        assert m['l4lb_sync_role{role="backup"}'] == 1, m

        # ---- lb1 dies: kill -9 and link down; lb2 takes over by VRRP
        before = vip_packets(lab, "lb2")
        t0 = time.monotonic()
        kill_and_unplug(lab, "lb1")
        wait_state(lab, "lb2", "master", 5)
        takeover = time.monotonic() - t0
        assert status(lab, "lb2")["sync"]["role"] == "master"
        time.sleep(3.0)  # ~30 exchanges per connection, all through lb2
        rep1 = end_hold(hold1)
        assert rep1["alive"] == CONNS and rep1["errors"] == 0 and rep1["moved"] == 0, \
            broken(rep1)[:10]
        assert vip_packets(lab, "lb2") - before >= CONNS * 10
        print(f"\n[sync] failover: VRRP takeover {takeover:.2f}s, longest exchange gap "
              f"{rep1['max_gap_s']:.2f}s, {CONNS}/{CONNS} connections alive")

        # ---- 200 new connections while lb2 is master: lb2's ring (most on real4)
        hold2 = start_hold(lab, "hold2")
        on_lb2 = conns(lab, "lb2")

        # ---- lb1 comes back as if rebooted; the full walk fills it in its preempt delay
        reboot_wipe(lab, "lb1")
        lab.run("lb1", ["ip", "link", "set", "dev", "eth0", "up"])
        t0 = time.monotonic()
        lab.daemons["lb1"] = lab.start_l4lb("lb1", lb_config(lab, "lb1", sync=True))
        wait_state(lab, "lb1", "master", PREEMPT_DELAY + 10)
        back = time.monotonic() - t0
        wait_state(lab, "lb2", "backup", 5)
        s1 = status(lab, "lb1")["sync"]
        assert s1["full_walks"]["received_complete"] >= 1, s1
        on_lb1 = conns(lab, "lb1")
        missing = {p: r for p, r in on_lb2.items() if on_lb1.get(p) != r}
        assert not missing, list(missing.items())[:10]
        time.sleep(3.0)
        rep2 = end_hold(hold2)
        assert rep2["alive"] == CONNS and rep2["errors"] == 0 and rep2["moved"] == 0, \
            broken(rep2)[:10]
        # the rings disagree: lb1 alone would have sent these elsewhere
        assert real_names(rep2).get("real4", 0) >= CONNS // 2, real_names(rep2)
        # and the direction swapped: lb1 streams to lb2 again
        rep3 = end_hold(start_hold(lab, "hold3"))
        ports = {d["cport"] for d in rep3["detail"] if "cport" in d}
        assert len(ports) == CONNS
        c1 = conns(lab, "lb1")
        assert ports <= set(c1)

        def lb2_has_them():
            c2 = conns(lab, "lb2")
            return all(c2.get(p) == c1[p] for p in ports)

        wait_for(lb2_has_them, 5, what="lb2 has lb1's new flows")
        print(f"[sync] failback: lb1 start to master {back:.2f}s, longest exchange gap "
              f"{rep2['max_gap_s']:.2f}s, {CONNS}/{CONNS} connections alive "
              f"({real_names(rep2)})")


def test_without_sync_failover_resets_most_connections():
    with Lab("tnosync", clients=1, balancers=2, reals=4) as lab:
        for r in lab.by_role("real"):
            lab.start_echo(r.name, PORT)
        start_pair(lab, sync=False)
        assert status(lab, "lb2")["sync"] is None
        hold1 = start_hold(lab, "hold1")
        assert not conns(lab, "lb2")
        kill_and_unplug(lab, "lb1")
        wait_state(lab, "lb2", "master", 5)
        time.sleep(3.0)
        rep = end_hold(hold1)
        lost = rep["errors"] + sum(1 for d in rep["detail"] if not d["error"]
                                   and len(d["reals"]) > 1)
        print(f"\n[sync] without sync: {lost}/{CONNS} connections broken by the failover")
        assert lost >= CONNS // 2, rep
        resets = sum(1 for d in rep["detail"] if d["error"] and
                     ("Reset" in d["error"] or "closed" in d["error"]))
        assert resets >= CONNS // 2, [d["error"] for d in rep["detail"] if d["error"]][:10]
