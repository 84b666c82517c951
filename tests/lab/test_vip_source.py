"""A VIP is never the source of a balancer's own traffic (issue 12; README: Hostile input).

The reals hold the VIP on lo, so anything a balancer sends them from the VIP is
answered to the real itself. Linux picks an IPv6 VIP on the node's prefix as the
source for the reals (`ip -6 route get fd99::31` -> `src fd99::100`): every TCP
health check timed out and the master marked every real DOWN ~5 s after it took
over. Now IPv6 VIPs are added deprecated (preferred_lft 0) and health checks bind
to the node's own address.

The pair: VRRP v3, an IPv6 instance holding fd99::100/64 and an IPv4 one holding
10.99.0.100/24 (the subnet's own prefix lengths), tunnel mode with the decapsulator
on the reals, the lab's default TCP health checks, conn sync over IPv6, and rings
that differ (lb2 gives real4 weight 900, lb1 gives it 0). The master's checks stay
UP before and after a takeover by kill -9 and link down, and 200 held connections
per family all survive it.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from halab import broken, conns, end_hold, kill_and_unplug, start_hold, wait_state

from l4lb.lab import Lab, wait_for

pytestmark = pytest.mark.timeout(240)

VIP6, VIP4 = "fd99::100", "10.99.0.100"
PORT = 9000
KEYS = {6: f"[{VIP6}]:{PORT}/tcp", 4: f"{VIP4}:{PORT}/tcp"}
TARGETS = {6: f"[{VIP6}]:{PORT}", 4: f"{VIP4}:{PORT}"}
CONNS = 200
SYNC_PORT = 9542
KEY = "lab-vip-source-key-0123456789abcdef"
# Lab default checks: interval 1 s, timeout 1 s, fall 3. Checks sent from the VIP
# would take a real DOWN within ~5 s of holding the VIP; watch longer than that.
HOLD_WATCH_S = 7.0

# What the kernel would use as the source towards a real, and the VIP's flags,
# read in the node's namespace with pyroute2.
PROBE = """
import asyncio, json, sys
from pyroute2 import IPRoute
from l4lb import netutil
picker = netutil.SourcePicker(["eth0"], avoid=lambda: ["%s", "%s"])
out = {"src": {d: netutil.route_source(d) for d in sys.argv[1:]},
       "own": {f: netutil.own_address(["eth0"], f) for f in (4, 6)},
       "picked": {f: asyncio.run(picker.pick(f)) for f in (4, 6)}, "deprecated": []}
with IPRoute() as ipr:
    for a in ipr.get_addr(label=None):
        if netutil._flags(a) & netutil.IFA_F_DEPRECATED:
            out["deprecated"].append(a.get_attr("IFA_ADDRESS"))
print(json.dumps(out))
""" % (VIP6, VIP4)


def lb_config(lab: Lab, name: str) -> dict:
    reals = [lab.node(f"real{i}") for i in (1, 2, 3, 4)]
    w4 = 0 if name == "lb1" else 900  # the rings differ: only sync keeps flows on their real
    vips = []
    for addr, attr in ((VIP6, "ipv6"), (VIP4, "ipv4")):
        vips.append({"address": addr, "port": PORT, "mode": "tun",
                     "real": [{"address": getattr(r, attr)} for r in reals[:3]] +
                             [{"address": getattr(reals[3], attr), "weight": w4}]})
    common = {"interface": "eth0", "version": 3, "priority": 150 if name == "lb1" else 100,
              "advert_interval_s": 0.1, "preempt": True}
    vrrp = [{"name": "VI_6", "vrid": 61, "vips": [f"{VIP6}/64"], **common},
            {"name": "VI_4", "vrid": 41, "vips": [f"{VIP4}/24"], **common}]
    peer = "lb2" if name == "lb1" else "lb1"
    sync = {"enabled": True, "listen": f"[{lab.node(name).ipv6}]:{SYNC_PORT}",
            "peers": [f"[{lab.node(peer).ipv6}]:{SYNC_PORT}"], "key": KEY,
            "vrrp_instance": "VI_6", "full_sync_interval_s": 30}
    return lab.balancer_config(name, vips, vrrp=vrrp, sync=sync)


def probe(lab: Lab, node: str) -> dict:
    reals = [lab.node("real1").ipv6, lab.node("real1").ipv4]
    return json.loads(lab.run(node, [sys.executable, "-c", PROBE, *reals]).stdout)


def health(lab: Lab, node: str) -> dict[str, tuple[bool, str | None]]:
    """real address -> (up, last check) for both VIPs."""
    st = lab.l4lb_json(node, ["status"])
    return {r["address"]: (r["up"], r["last_check"]) for v in st["vips"] for r in v["reals"]}


def checks_done(lab: Lab, node: str) -> dict[str, float]:
    """real address -> health checks run (l4lb_healthcheck_checks_total)."""
    out = lab.run(node, [sys.executable, "-c", "import urllib.request; print(urllib.request"
                         ".urlopen('http://127.0.0.1:9541/metrics', timeout=5).read().decode())"]
                  ).stdout
    res = {}
    for line in out.splitlines():
        if line.startswith("l4lb_healthcheck_checks_total{"):
            real = line.split('real="', 1)[1].split('"', 1)[0]
            res[real] = float(line.rsplit(" ", 1)[1])
    return res


def assert_sources(lab: Lab, node: str) -> dict:
    n = lab.node(node)
    p = probe(lab, node)
    assert p["src"] == {lab.node("real1").ipv6: n.ipv6, lab.node("real1").ipv4: n.ipv4}, p
    assert p["own"] == p["picked"] == {"4": n.ipv4, "6": n.ipv6}, p
    assert VIP6 in p["deprecated"], p
    return p


def assert_all_up_while_master(lab: Lab, node: str) -> None:
    """Watch the node's checks for HOLD_WATCH_S while it holds the VIPs: every real
    stays UP, each was checked again meanwhile, and the last check passed."""
    before = checks_done(lab, node)
    deadline = time.monotonic() + HOLD_WATCH_S
    while time.monotonic() < deadline:
        h = health(lab, node)
        assert all(up for up, _ in h.values()), (node, h)
        time.sleep(0.5)
    after = checks_done(lab, node)
    assert len(after) == 8 and all(after[r] >= before.get(r, 0) + 3 for r in after), \
        (before, after)
    h = health(lab, node)
    assert all(up and last == "ok" for up, last in h.values()), (node, h)


def test_own_traffic_never_from_the_vip_and_connections_survive_failover():
    with Lab("tvipsrc", clients=1, balancers=2, reals=4) as lab:
        for r in lab.by_role("real"):
            lab.start_echo(r.name, PORT)
            lab.decap(r.name)
        lab.daemons = {}
        with ThreadPoolExecutor(2) as ex:  # the two compile in parallel
            futs = {n: ex.submit(lab.start_l4lb, n, lb_config(lab, n)) for n in ("lb1", "lb2")}
            for n, f in futs.items():
                lab.daemons[n] = f.result()
        for inst in ("VI_6", "VI_4"):
            wait_state(lab, "lb1", "master", 15, inst)
            wait_state(lab, "lb2", "backup", 5, inst)

        # ---- lb1 holds both VIPs: the kernel still sources from the node's address,
        # and the checks stay UP
        p1 = assert_sources(lab, "lb1")
        assert_all_up_while_master(lab, "lb1")

        # ---- 200 connections per family through lb1; lb2 learns them by sync
        holds = {f: start_hold(lab, f"hold{f}", TARGETS[f], CONNS) for f in (6, 4)}
        for f in (6, 4):
            wait_for(lambda f=f: len(conns(lab, "lb2", KEYS[f])) >= CONNS, 10,
                     what=f"lb2 has every IPv{f} flow")

        # ---- lb1 dies the hard way; lb2 takes over and keeps its checks UP
        t0 = time.monotonic()
        kill_and_unplug(lab, "lb1")
        for inst in ("VI_6", "VI_4"):  # generous: each poll is a CLI run on a loaded box
            wait_state(lab, "lb2", "master", 10, inst)
        takeover = time.monotonic() - t0  # up to lb2's CLI saying so, polling included
        p2 = assert_sources(lab, "lb2")
        assert_all_up_while_master(lab, "lb2")

        reports = {f: end_hold(holds[f]) for f in (6, 4)}
        for f, rep in reports.items():
            assert rep["alive"] == CONNS and rep["errors"] == 0 and rep["moved"] == 0, \
                (f, broken(rep)[:10])
        print(f"\n[vip-source] sources lb1 {p1['src']}, lb2 {p2['src']}; kill to lb2 "
              f"master (as polled) {takeover:.2f}s; IPv6 {reports[6]['alive']}/{CONNS}, IPv4 "
              f"{reports[4]['alive']}/{CONNS} connections alive; health UP on both masters")


def test_daemon_held_vips_are_never_a_source():
    """netutil.add_address (VIPs of a node without VRRP, as host addresses)."""
    with Lab("tvipown", clients=0, balancers=1, reals=1) as lab:
        add = "from l4lb import netutil; import sys; netutil.add_address('eth0', sys.argv[1])"
        for vip in (VIP6, VIP4):
            lab.run("lb1", [sys.executable, "-c", add, vip])
        p = assert_sources(lab, "lb1")
        assert VIP4 not in p["deprecated"]  # IPv4 has no preferred lifetime rule
        # the lab's own view: plain `ip` agrees with pyroute2
        out = lab.run("lb1", ["ip", "-6", "route", "get", lab.node("real1").ipv6]).stdout
        assert f"src {lab.node('lb1').ipv6} " in out, out
