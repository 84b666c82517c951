"""ECMP scale-out (README: VRRP or ECMP; issue 14): 3 balancers announce two VIPs (DR and tun)
over BGP through FRR to a router that spreads flows by an L4 multipath hash.

test_ecmp_sync: 300 long-lived connections per VIP spread over all three nodes;
(a) lb1 drained gracefully: all survive; (c) lb1 added back as if rebooted (it
gets its peers' full walks before it announces): all survive the rehash onto it;
(d) a real's weight changed on all nodes, then (b) lb2 killed (-9, FRR too, link
down), BFD drops its path: all survive on lb1 and lb3, which hold lb2's flows by
sync although their rings changed since the flows began.
test_ecmp_without_sync: the same (d)+(b) with sync off loses connections: the
test above proves sync, not hashing, carries them.
"""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from l4lb.lab import ecmp as E

pytestmark = pytest.mark.timeout(300)

CONNS = 300
ALL = ["lb1", "lb2", "lb3"]


def holds(lab, tag: str) -> dict:
    return {vip: E.start_hold(lab, f"{tag}-{mode}", vip, CONNS)
            for vip, mode in ((E.VIP_DR, "dr"), (E.VIP_TUN, "tun"))}


def check(lab, svcs: dict, what: str) -> None:
    for vip, svc in svcs.items():
        rep = E.end_hold(svc)
        bad = E.broken(rep)
        assert rep["conns"] == CONNS and not bad, (
            f"{what}, {vip}: {len(bad)}/{CONNS} lost: {bad[:5]}\n"
            + "\n".join(f"{n}: {s.output()[-1500:]}" for n, s in lab.daemons.items()))


def up(prefix: str, sync: bool, nodes: list[str] = ALL):
    lab = E.make_lab(prefix, balancers=len(nodes))
    lab.up()
    E.start_router(lab)
    E.start_reals(lab)
    cfgs = {n: E.node_config(lab, n, sync=sync) for n in nodes}
    E.start_nodes(lab, nodes, cfgs)
    E.wait_paths(lab, nodes)
    return lab, cfgs


def test_ecmp_sync():
    lab, cfgs = up("ecmps", sync=True)
    try:
        # spread: every node carries some of the 2 x 300 connections
        before = {n: E.packets(lab, n) for n in ALL}
        svcs = holds(lab, "spread")
        time.sleep(1.0)
        for n in ALL:
            after = E.packets(lab, n)
            for vip in (E.VIP_DR, E.VIP_TUN):
                k = E.vip_key(vip)
                assert after[k] - before[n][k] > 100, f"{n} carries nothing of {k}"
            st = lab.l4lb_json(n, ["status"])["bgp"]
            assert st["joined"] and sorted(st["announced"]) == [E.VIP_DR, E.VIP_TUN]
            # sessions as l4lb last polled them (every 2 s)
            def sessions_up(n=n):
                ss = lab.l4lb_json(n, ["status"])["bgp"]["sessions"]
                return ss and all(s["state"] == "Established" and s["bfd"] == "up" for s in ss)
            try:
                E.wait_for(sessions_up, 30, 0.5, f"{n}: session and BFD up in l4lb status")
            except TimeoutError:
                raise AssertionError(f"{n}: {lab.l4lb_json(n, ['status'])['bgp']}\n"
                                     f"{lab.vtysh(n, 'show bfd peers')}") from None

        # (a) graceful drain of lb1: withdrawn at once, forwards drain_s, stops
        lab.l4lb("lb1", ["drain"])
        E.wait_paths(lab, ["lb2", "lb3"], timeout=40)
        E.drain(lab, "lb1")
        assert "drained" in lab.daemons["lb1"].output()
        check(lab, svcs, "(a) drain")

        # (c) lb1 back as if rebooted: its peers' full walks come before its announcement
        svcs = holds(lab, "add")
        E.wipe(lab, "lb1", cfgs["lb1"])
        lab.daemons["lb1"] = lab.start_l4lb("lb1", cfgs["lb1"], 120)
        E.wait_paths(lab, ALL, timeout=60)
        log = lab.daemons["lb1"].output()
        assert "joined: full walks received from" in log, log[-2000:]
        time.sleep(2.0)
        check(lab, svcs, "(c) add")

        # (d) weight change on all nodes, then (b) lb2 dies; BFD takes its path away
        svcs = holds(lab, "kill")
        E.set_weight(lab, ALL, "real1", 1000)
        time.sleep(1.0)
        E.kill(lab, "lb2")
        E.wait_paths(lab, ["lb1", "lb3"], timeout=40)
        time.sleep(2.0)
        check(lab, svcs, "(d)+(b) weight change and kill")
    finally:
        lab.down()


def test_ecmp_without_sync():
    """Two nodes are enough to show it (and compile faster than three)."""
    lab, cfgs = up("ecmpn", sync=False, nodes=["lb1", "lb2"])
    try:
        svcs = holds(lab, "kill")
        E.set_weight(lab, ["lb1", "lb2"], "real1", 1000)
        time.sleep(1.0)
        E.kill(lab, "lb2")
        E.wait_paths(lab, ["lb1"], timeout=40)
        time.sleep(2.0)
        lost = {vip: len(E.broken(E.end_hold(s))) for vip, s in svcs.items()}
        assert all(n > 0 for n in lost.values()), f"no sync, yet nothing lost: {lost}"
    finally:
        lab.down()


def test_bgp_sessions():
    """Wrong AS and wrong password are refused with a clear log line; an IPv6 VIP is
    announced over an IPv6 session and served; a VIP whose reals are all down is
    withdrawn and comes back with them; FRR restarted under a running l4lb finds the
    announcements again (they live in the kernel); SIGTERM is a graceful leave."""
    from l4lb.routing import frr

    lab = E.make_lab("ecmpb", balancers=2, reals=1)
    lab.up()
    try:
        peers = [frr.RouterPeer(lab.node("lb1").ipv4, E.NODE_AS),
                 frr.RouterPeer(lab.node("lb1").ipv6, E.NODE_AS),
                 frr.RouterPeer(lab.node("lb2").ipv4, E.NODE_AS)]  # no password
        lab.frrs["router"] = lab.start_frr("router", frr.router_config(E.ROUTER_AS, E.ROUTER4,
                                                                       peers))
        E.start_reals(lab)
        wrong_as = E.node_config(lab, "lb2", sync=False, asn=65099)
        cfgs = {"lb1": E.node_config(lab, "lb1", sync=False, v6=True), "lb2": wrong_as}
        E.start_nodes(lab, ["lb1", "lb2"], cfgs)
        E.wait_paths(lab, ["lb1"])
        lb2 = lab.daemons["lb2"]
        E.wait_for(lambda: "Bad Peer AS" in lb2.output(), 60, 0.2, "lb2: wrong AS logged")
        line = next(ln for ln in lb2.output().splitlines() if "Bad Peer AS" in ln)
        assert "not established" in line and "check bgp.asn (65099)" in line, line

        # IPv6: announced over the IPv6 session (next hop lb1's link-local), served
        E.wait_for(lambda: len(E.nexthops(lab, E.VIP6)) == 1, 60, 0.1, "router: VIP6 route")
        r = lab.client("client1", ["spread", f"[{E.VIP6}]:{E.PORT}", "--count", "40"])
        assert r["ok"] == 40 and not r["errors"], r

        # a password the router does not share (TCP MD5 on one side): no session at all
        for svc in lab.frrs.pop("lb2"):
            svc.stop()
        wrong_pw = E.node_config(lab, "lb2", sync=False, neighbor=[
            {"address": E.ROUTER4, "asn": E.ROUTER_AS, "password": "wrong-password-2"}])
        E.start_node_frr(lab, "lb2", wrong_pw)
        E.wait_for(lambda: "password" in lb2.output().split("Bad Peer AS")[-1], 60, 0.2,
                   "lb2: no session logged with the password hint")
        assert E.nexthops(lab, E.VIP_DR) == {lab.node("lb1").ipv4}

        # every real of lb1 down: both VIPs withdrawn; back up: announced again
        echo = next(s for s in lab.services if s.node == "real1" and "echoserver" in
                    " ".join(s.argv))
        echo.stop()
        E.wait_for(lambda: not E.nexthops(lab, E.VIP_DR) and not E.nexthops(lab, E.VIP_TUN),
                   30, 0.1, "router: VIPs withdrawn when their reals are down")
        assert E.announced(lab, "lb1") == [] and E.host_routes(lab, "lb1") == set()
        lab.start_echo("real1", E.PORT)
        E.wait_paths(lab, ["lb1"], timeout=60)

        # FRR restarted under l4lb: the routes are in the kernel; FRR announces them again
        for svc in lab.frrs.pop("lb1"):
            svc.stop()
        E.wait_for(lambda: not E.nexthops(lab, E.VIP_DR), 30, 0.1, "router: lb1 gone")
        E.start_node_frr(lab, "lb1", cfgs["lb1"])
        E.wait_paths(lab, ["lb1"], timeout=60)
        E.wait_for(lambda: all(s["state"] == "Established" for s in
                               lab.l4lb_json("lb1", ["status"])["bgp"]["sessions"]),
                   30, 0.2, "lb1: l4lb sees the session again")
        assert lab.l4lb_json("lb1", ["status"])["bgp"]["frr_up"]
        assert E.announced(lab, "lb1") == [E.VIP_DR, E.VIP_TUN, E.VIP6]
        text = lab.l4lb("lb1", ["status"]).stdout
        assert "bgp: AS 65001 router id 10.99.0.21, FRRouting" in text, text
        assert "neighbour 10.99.0.1" in text and "Established" in text
        metrics = lab.run("lb1", ["curl", "-s", "http://127.0.0.1:9541/metrics"]).stdout
        assert 'l4lb_bgp_session_up{neighbor="10.99.0.1"} 1.0' in metrics
        assert 'l4lb_bgp_announced{vip="10.99.200.100"} 1.0' in metrics
        assert "l4lb_bgp_withdrawals_total 3.0" in metrics  # the three withdrawn with real1
        check = subprocess.run(["promtool", "check", "metrics"], input=metrics,
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr

        # SIGTERM in ECMP mode is a graceful leave: withdrawn at once, stopped after drain_s
        lab.daemons["lb1"].proc.send_signal(signal.SIGTERM)
        E.wait_for(lambda: not E.nexthops(lab, E.VIP_DR), 20, 0.05, "withdrawn on SIGTERM")
        lab.daemons["lb1"].proc.wait(E.DRAIN_S + 20)
        out = lab.daemons["lb1"].output()
        # withdrawn first, then forwarding for drain_s, then stopped
        assert 0 <= out.index("draining: withdrawing 3 VIPs") < out.index("drained for 4s")
        assert E.host_routes(lab, "lb1") == set()
    finally:
        lab.down()
