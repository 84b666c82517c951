"""What to announce (sans-I/O) and the host routes that tell FRR (pyroute2).

A VIP address is announced while this node can serve it: the data plane is
attached, at least one of the address's services has a real that is up, has
weight and a known MAC, the node has joined (received its peers' full walks),
and it is not draining. The decision is the kernel route "VIP dev lo proto 250"
in the main table, which the node's FRR redistributes (frr.node_config).
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterable

from l4lb.config.bgp import ROUTE_PROTO

MAIN_TABLE = 254


def servable(vips: Iterable, is_up, attached: bool) -> set[str]:
    """Addresses with at least one real that can take traffic. `vips`: VipConfig;
    `is_up(vip_key, real_address) -> bool` (health and MAC)."""
    if not attached:
        return set()
    out = set()
    for v in vips:
        if any(r.weight > 0 and is_up(v.key, str(r.address)) for r in v.reals):
            out.add(str(ipaddress.ip_address(v.address)))
    return out


class Announcer:
    """The announced set and its changes; counts what it did."""

    def __init__(self, announced: Iterable[str] = ()) -> None:
        self.announced: set[str] = {str(ipaddress.ip_address(a)) for a in announced}
        self.counters: Counter = Counter(announcements=0, withdrawals=0)

    def plan(self, want: set[str], *, joined: bool, draining: bool) -> tuple[list[str], list[str]]:
        """(addresses to announce, addresses to withdraw) to reach `want` under the
        gates: nothing new before the join, nothing at all while draining."""
        if draining:
            want = set()
        elif not joined:
            want = want & self.announced  # keep what a restarted daemon found announced
        return sorted(want - self.announced), sorted(self.announced - want)

    def done(self, added: Iterable[str], removed: Iterable[str]) -> None:
        for a in added:
            self.announced.add(a)
            self.counters["announcements"] += 1
        for a in removed:
            self.announced.discard(a)
            self.counters["withdrawals"] += 1


# ------------------------------------------------------------------ I/O (blocking)

def _route_kw(addr: str, lo: int) -> dict:
    ip = ipaddress.ip_address(addr)
    return {"dst": f"{ip}/{ip.max_prefixlen}", "oif": lo, "proto": ROUTE_PROTO,
            "table": MAIN_TABLE, "family": 2 if ip.version == 4 else 10}


def installed_routes() -> set[str]:
    """Host routes l4lb holds now (a restarted daemon starts from these)."""
    from pyroute2 import IPRoute  # noqa: PLC0415

    out = set()
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        for fam in (2, 10):
            for r in ipr.get_routes(family=fam, table=MAIN_TABLE, proto=ROUTE_PROTO):
                if r.get_attr("RTA_OIF") == lo and r["dst_len"] in (32, 128):
                    out.add(str(ipaddress.ip_address(r.get_attr("RTA_DST"))))
    return out


def set_route(addr: str, present: bool) -> None:
    """Add (replace) or remove the host route of `addr`; removing a missing one is fine."""
    from pyroute2 import IPRoute  # noqa: PLC0415
    from pyroute2.netlink.exceptions import NetlinkError  # noqa: PLC0415

    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        kw = _route_kw(addr, lo)
        if present:
            ipr.route("replace", **kw)
        else:
            try:
                ipr.route("del", **kw)
            except NetlinkError as e:
                if e.code != 3:  # ESRCH: not there
                    raise


__all__ = ["Announcer", "installed_routes", "servable", "set_route"]
