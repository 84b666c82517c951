"""UDP flows through a VRRP failover with conn-table sync (issue 17).

lb1 and lb2 balance a TCP and a UDP VIP on the same address over four reals with
different Maglev rings (real4: weight 0 on lb1, 900 on lb2), `conn_timeout_s = 6`.
100 UDP flows (connected sockets, a datagram every 100 ms, each reply checked for
its real) and 100 TCP connections run through lb1 for longer than the UDP timeout,
so lb2's copies of the UDP flows are older than the timeout unless sync keeps
them current: walks every 2 s, each entry carrying its age. lb1 is killed (-9)
and unplugged: every UDP flow keeps its real on lb2, every TCP connection lives.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import halab
import pytest
from halab import broken, end_hold, kill_and_unplug, wait_state

from l4lb.config import config_warnings, parse_config
from l4lb.lab import Lab, wait_for

pytestmark = pytest.mark.timeout(180)

VIP = "10.99.0.100"
PORT = 9000
KEY = "lab-sync-key-0123456789abcdef"
SYNC_PORT = 9542
FLOWS = 100
TIMEOUT_S = 6  # a copy is at most 2 s walk + 1 s grain + 0.4 s takeover old: 2.6 s margin
WALK_S = 2


def lb_config(lab: Lab, name: str) -> dict:
    r = [lab.node(f"real{i}").ipv4 for i in (1, 2, 3, 4)]
    w4 = 0 if name == "lb1" else 900
    reals = [{"address": a} for a in r[:3]] + [{"address": r[3], "weight": w4}]
    vips = [{"address": VIP, "port": PORT, "protocol": p, "real": reals} for p in ("tcp", "udp")]
    peer = "lb2" if name == "lb1" else "lb1"
    cfg = lab.balancer_config(name, vips, vrrp=[{
        "name": "VI_1", "interface": "eth0", "vrid": 51, "version": 3,
        "priority": 150 if name == "lb1" else 100, "advert_interval_s": 0.1,
        "vips": [f"{VIP}/24"]}], sync={
        "enabled": True, "listen": f"{lab.node(name).ipv4}:{SYNC_PORT}",
        "peers": [f"{lab.node(peer).ipv4}:{SYNC_PORT}"], "key": KEY, "vrrp_instance": "VI_1",
        "full_sync_interval_s": WALK_S})
    cfg["node"]["conn_timeout_s"] = TIMEOUT_S
    return cfg


def test_udp_flows_keep_their_real_through_a_failover():
    with Lab("tsudp", clients=1, balancers=2, reals=4) as lab:
        from l4lb.config import dumps_toml  # noqa: PLC0415

        assert config_warnings(parse_config(dumps_toml(lb_config(lab, "lb1")))) == []
        for r in lab.by_role("real"):
            lab.start_echo(r.name, PORT)  # TCP and UDP
        lab.daemons = {}
        with ThreadPoolExecutor(2) as ex:
            futs = {n: ex.submit(lab.start_l4lb, n, lb_config(lab, n)) for n in ("lb1", "lb2")}
            for n, f in futs.items():
                lab.daemons[n] = f.result()
        wait_state(lab, "lb1", "master", 15)
        wait_state(lab, "lb2", "backup", 5)
        udp = halab.start_hold(lab, "udp", f"{VIP}:{PORT}", FLOWS, udp=True)
        tcp = halab.start_hold(lab, "tcp", f"{VIP}:{PORT}", FLOWS)
        udp_key, tcp_key = f"{VIP}:{PORT}/udp", f"{VIP}:{PORT}/tcp"
        on_lb1 = halab.conns(lab, "lb1", udp_key)
        assert len(on_lb1) == FLOWS
        wait_for(lambda: len(halab.conns(lab, "lb2", udp_key)) >= FLOWS
                 and len(halab.conns(lab, "lb2", tcp_key)) >= FLOWS, 10,
                 what="lb2 has every flow")
        # The rings differ: lb2 alone would put many of these flows elsewhere.
        assert sum(1 for r in on_lb1.values() if r != lab.node("real4").ipv4) == FLOWS
        time.sleep(TIMEOUT_S + 1.5)  # lb2's first copies are now older than the timeout
        kill_and_unplug(lab, "lb1")
        wait_state(lab, "lb2", "master", 5)
        time.sleep(3.0)  # ~30 datagrams per flow, all through lb2
        rep_u, rep_t = end_hold(udp), end_hold(tcp)
        assert rep_u["alive"] == FLOWS and rep_u["moved"] == 0, broken(rep_u)[:10]
        assert rep_t["alive"] == FLOWS and rep_t["errors"] == 0 and rep_t["moved"] == 0, \
            broken(rep_t)[:10]
        after = sum(d["exchanges"] for d in rep_u["detail"])
        print(f"\n[sync udp] {FLOWS}/{FLOWS} UDP flows kept their real ({after} replies, "
              f"{rep_u['lost']} datagrams lost), {FLOWS}/{FLOWS} TCP alive; longest UDP gap "
              f"{rep_u['max_gap_s']:.2f}s")
