"""An ECMP lab (README: VRRP or ECMP), shared by tests/lab/test_scaleout.py, bench/scaleout.py
and `make demo-ecmp` (l4lb.lab.demo_ecmp):
a router running FRR with multipath, clients behind it, N balancers each running FRR
and l4lb in ECMP mode ([bgp], sync to every other node), reals with an echo server.

Two VIPs on the same nodes: VIP_DR (mode dr) and VIP_TUN (mode tun), port PORT.
"""

from __future__ import annotations

import ipaddress
import json
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from l4lb.lab import ROUTER4, ROUTER6, Lab, broken, end_hold, wait_for  # noqa: F401 - E.broken, E.end_hold
from l4lb.routing import frr

VIP_DR, VIP_TUN = "10.99.200.100", "10.99.200.101"
VIP6 = "fd99:200::100"  # with v6=True: DR, announced over the IPv6 sessions
PORT = 9000
HTTP = 80
ROUTER_AS, NODE_AS = 65000, 65001
KEY = "lab-ecmp-sync-key-0123456789"
SYNC_PORT = 9542
DRAIN_S = 4.0


def vip_key(vip: str) -> str:
    return f"{vip}:{PORT}/tcp"


def make_lab(prefix: str, balancers: int = 3, reals: int = 4) -> Lab:
    lab = Lab(prefix, clients=1, balancers=balancers, reals=reals, router=True,
              vips=(VIP_DR, VIP_TUN, VIP6))
    lab.daemons = {}
    lab.frrs = {}
    return lab


def start_router(lab: Lab, node_as: int = NODE_AS, password: str | None = None,
                 v6: bool = False) -> None:
    """`v6`: IPv6 sessions too (they carry the IPv6 VIPs)."""
    peers = [frr.RouterPeer(n.ipv4, node_as, password) for n in lab.by_role("balancer")]
    if v6:
        peers += [frr.RouterPeer(n.ipv6, node_as, password) for n in lab.by_role("balancer")]
    lab.frrs["router"] = lab.start_frr("router", frr.router_config(ROUTER_AS, ROUTER4, peers))


def start_reals(lab: Lab) -> None:
    for n in lab.by_role("real"):
        lab.start_echo(n.name, PORT)
        lab.decap(n.name)  # tunnel mode: IPIP in, the VIP's flow out (DR frames pass)


def bgp_section(lab: Lab, name: str, **over) -> dict:
    b = {"asn": NODE_AS, "router_id": lab.node(name).ipv4, "drain_s": DRAIN_S,
         "join_timeout_s": 10.0, "frr_pathspace": lab.node(name).netns,
         "neighbor": [{"address": ROUTER4, "asn": ROUTER_AS}]}
    b.update(over)
    return b


def node_config(lab: Lab, name: str, sync: bool = True, weights: dict | None = None,
                http: bool = False, v6: bool = False, **bgp_over) -> dict:
    """`http`: also VIP_DR:HTTP (DR) to nginx on the reals (wrk). `v6`: also VIP6 (DR)
    to the reals' IPv6 addresses, announced over an IPv6 session to the router."""
    weights = weights or {}
    reals = [{"address": n.ipv4, "weight": weights.get(n.name, 100)}
             for n in lab.by_role("real")]
    vips = [{"address": VIP_DR, "port": PORT, "mode": "dr", "real": reals},
            {"address": VIP_TUN, "port": PORT, "mode": "tun", "real": reals}]
    if http:
        vips.append({"address": VIP_DR, "port": HTTP, "mode": "dr", "real": reals})
    if v6:
        vips.append({"address": VIP6, "port": PORT, "mode": "dr",
                     "real": [{"address": n.ipv6} for n in lab.by_role("real")]})
        bgp_over.setdefault("neighbor", [{"address": ROUTER4, "asn": ROUTER_AS},
                                         {"address": ROUTER6, "asn": ROUTER_AS}])
    sections: dict = {"bgp": bgp_section(lab, name, **bgp_over)}
    if sync:
        me = lab.node(name).ipv4
        sections["sync"] = {"enabled": True, "listen": f"{me}:{SYNC_PORT}", "key": KEY,
                            "full_sync_interval_s": 30,
                            "peers": [f"{n.ipv4}:{SYNC_PORT}" for n in lab.by_role("balancer")
                                      if n.ipv4 != me]}
    return lab.balancer_config(name, vips, **sections)


def start_node_frr(lab: Lab, name: str, cfg: dict) -> None:
    from l4lb.config import config_from_dict  # noqa: PLC0415

    c = config_from_dict(cfg)
    lab.frrs[name] = lab.start_frr(name, frr.node_config(c.bgp, name))


def start_nodes(lab: Lab, names: list[str], cfgs: dict[str, dict]) -> None:
    """FRR, then l4lb, on each node (l4lb refuses to start without FRR); compiles in
    parallel."""
    for n in names:
        if n not in lab.frrs:
            start_node_frr(lab, n, cfgs[n])
    with ThreadPoolExecutor(len(names)) as ex:
        futs = {n: ex.submit(lab.start_l4lb, n, cfgs[n], 120) for n in names}
        for n, f in futs.items():
            lab.daemons[n] = f.result()


def nexthops(lab: Lab, vip: str) -> set[str]:
    """Gateways of the router's kernel route to `vip` (what ECMP spreads over; IPv6:
    the nodes' link-local addresses)."""
    fam, plen = ("-6", 128) if ":" in vip else ("-4", 32)
    r = lab.run("router", ["ip", fam, "-j", "route", "show", f"{vip}/{plen}"], check=False)
    out = set()
    for route in json.loads(r.stdout or "[]"):
        if route.get("gateway"):
            out.add(route["gateway"])
        for nh in route.get("nexthops", []):
            out.add(nh["gateway"])
    return out


def wait_paths(lab: Lab, names: list[str], timeout: float = 60.0,
               vips: tuple[str, ...] = (VIP_DR, VIP_TUN)) -> None:
    want = {lab.node(n).ipv4 for n in names}
    for vip in vips:
        try:
            wait_for(lambda v=vip: nexthops(lab, v) == want, timeout, 0.05,
                     f"router: {vip} via {sorted(want)}")
        except TimeoutError:
            raise AssertionError(f"router: {vip} via {sorted(nexthops(lab, vip))}, want "
                                 f"{sorted(want)}\n{lab.vtysh('router', 'show bgp summary')}"
                                 ) from None


def packets(lab: Lab, name: str) -> dict[str, int]:
    """Packets the node forwarded, by VIP key."""
    st = lab.l4lb_json(name, ["stats"])
    return {v["vip"]: v.get("packets", 0) for v in st["vips"]}


def start_hold(lab: Lab, tag: str, vip: str, count: int, seconds: float = 150):
    ready = lab.workdir / f"{tag}-ready.json"
    svc = lab.popen("client1", [sys.executable, "-m", "l4lb.lab.client", "hold",
                                f"{vip}:{PORT}", "--conns", str(count), "--every", "0.1",
                                "--seconds", str(seconds), "--ready-file", str(ready)],
                    log_name=f"{tag}.log")
    wait_for(ready.exists, 40, what=f"{tag}: {count} connections")
    assert json.loads(ready.read_text())["connected"] == count, svc.output()[-2000:]
    return svc


def drain(lab: Lab, name: str, timeout: float = 60.0) -> None:
    """`l4lb drain` and wait for the daemon to exit after the drain time."""
    lab.l4lb(name, ["drain"])
    svc = lab.daemons[name]
    try:
        svc.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{name} did not stop after draining: {svc.output()[-2000:]}"
                             ) from None


def kill(lab: Lab, name: str) -> None:
    """What a dead machine looks like: link down first (no FIN from the dying bgpd may
    tell the router: BFD has to notice), then kill -9 of l4lb and its FRR."""
    lab.run(name, ["ip", "link", "set", "dev", "eth0", "down"])
    lab.daemons[name].stop(signal.SIGKILL)
    for svc in lab.frrs.pop(name, []):
        svc.stop(signal.SIGKILL)


def wipe(lab: Lab, name: str, cfg: dict) -> None:
    """The node as if rebooted: XDP, pins, routes and state gone (`l4lb stop` offline)."""
    path = lab.write_config(name, cfg)
    lab.run(name, [sys.executable, "-m", "l4lb.cli", "stop", "-c", str(path)])


def set_weight(lab: Lab, names: list[str], real: str, weight: int) -> None:
    addr = lab.node(real).ipv4
    for n in names:
        for vip in (VIP_DR, VIP_TUN):
            lab.l4lb(n, ["real", "weight", vip_key(vip), addr, str(weight)])


def announced(lab: Lab, name: str) -> list[str]:
    return lab.l4lb_json(name, ["status"])["bgp"]["announced"]


def host_routes(lab: Lab, name: str) -> set[str]:
    """The announcing host routes l4lb holds on the node (both families)."""
    out = set()
    for fam in ("-4", "-6"):
        r = lab.run(name, ["ip", fam, "-j", "route", "show", "proto", "250"], check=False)
        out |= {str(ipaddress.ip_address(x["dst"])) for x in json.loads(r.stdout or "[]")}
    return out
