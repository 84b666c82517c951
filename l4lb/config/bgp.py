"""The [bgp] section: ECMP scale-out, VIPs announced over BGP by FRR (README: VRRP or ECMP).

With [bgp] every node is active: it announces each VIP it can serve as a host
route, FRR's bgpd tells the upstream router, and the router spreads flows over
the nodes by ECMP. l4lb never speaks BGP itself; see l4lb/routing/.

    [bgp]
    asn = 65001                    # this node's AS
    router_id = "10.99.0.21"       # IPv4, unique per node
    drain_s = 10                   # `l4lb drain` / SIGTERM: withdraw, forward this long, stop
    [[bgp.neighbor]]
    address = "10.99.0.1"
    asn = 65000
    password = "secret"            # optional: TCP MD5
    [[bgp.vip]]                    # optional: per-VIP route attributes
    address = "10.99.200.100"
    communities = ["65001:100"]
    med = 10

Parsed by config/parse.py (config_from_dict calls parse_bgp; the validation
helpers are convert.py's); every error names its field, like the rest of the config.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
from dataclasses import dataclass
from typing import Any

from l4lb.config.convert import (
    Conv,
    _bool,
    _float,
    _get,
    _int,
    _ip,
    _list,
    _q,
    _str,
    _table,
    _tables,
    _type_msg,
)
from l4lb.config.model import IPAddress, _default

ASN_MAX = 4294967294  # 0 and 4294967295 are reserved (RFC 7607, RFC 7300)
# FRR's bfdd ranges (bfd profile: receive-interval/transmit-interval 10-60000 ms,
# detect-multiplier 2-255).
BFD_MS = (10, 60000)
BFD_MULT = (2, 255)
ROUTE_PROTO = 250  # rtnetlink protocol of the host routes l4lb installs (not one of FRR's)
_COMMUNITY = re.compile(r"(\d{1,5}):(\d{1,5})")
_WELL_KNOWN = ("no-export", "no-advertise", "local-AS", "graceful-shutdown", "blackhole")
_PATHSPACE = re.compile(r"[A-Za-z0-9_-]{1,32}")


@dataclass(frozen=True)
class BgpNeighbor:
    address: IPAddress
    asn: int
    password: str | None = None
    bfd: bool = True


@dataclass(frozen=True)
class BgpVip:
    """Route attributes of one VIP address (all its ports share the host route)."""

    address: IPAddress
    communities: tuple[str, ...] = ()
    med: int | None = None


@dataclass(frozen=True)
class BgpConfig:
    asn: int
    router_id: ipaddress.IPv4Address
    neighbor: tuple[BgpNeighbor, ...] = ()
    vip: tuple[BgpVip, ...] = ()
    communities: tuple[str, ...] = ()  # on every VIP's route (plus the VIP's own)
    med: int | None = None  # default MED of every VIP's route
    hold_s: int = 9
    keepalive_s: int = 3
    bfd: bool = True
    bfd_rx_ms: int = 300
    bfd_tx_ms: int = 300
    bfd_multiplier: int = 3
    drain_s: float = 10.0
    join_timeout_s: float = 15.0  # wait at most this long for the peers' full walks
    frr_pathspace: str | None = None  # `vtysh -N NAME` (FRR started with -N NAME)
    vtysh: str = "vtysh"

    def attrs(self, address) -> tuple[tuple[str, ...], int | None]:
        """(communities, med) of the route of VIP `address`."""
        for v in self.vip:
            if v.address == ipaddress.ip_address(address):
                comms = tuple(dict.fromkeys(self.communities + v.communities))
                return comms, v.med if v.med is not None else self.med
        return self.communities, self.med


def _community(ctx, path: str, v: Any) -> str | None:
    if not isinstance(v, str):
        ctx.err(path, _type_msg('a community string ("65001:100" or "no-export")', v))
        return None
    if v in _WELL_KNOWN:
        return v
    m = _COMMUNITY.fullmatch(v)
    if not m or int(m.group(1)) > 65535 or int(m.group(2)) > 65535:
        ctx.err(path, f'{_q(v)} is not a community: write "AS:N" with both parts 0..65535, '
                      f"or one of {', '.join(_WELL_KNOWN)}")
        return None
    return v


def _router_id(ctx, path: str, v: Any) -> ipaddress.IPv4Address | None:
    if not isinstance(v, str):
        ctx.err(path, _type_msg('an IPv4 address string (e.g. "10.99.0.21")', v))
        return None
    try:
        rid = ipaddress.ip_address(v.strip())
    except ValueError:
        rid = None
    if not isinstance(rid, ipaddress.IPv4Address) or rid.is_unspecified or rid.is_multicast:
        ctx.err(path, f"{_q(v)} is not an IPv4 address; a BGP router id is a 32-bit "
                      'dotted quad, e.g. "10.99.0.21" (also on IPv6-only nodes)')
        return None
    return rid


def _password(ctx, path: str, v: Any) -> str | None:
    if not isinstance(v, str):
        ctx.err(path, _type_msg("a string", v))
        return None
    if not 1 <= len(v) <= 80 or any(c.isspace() or not c.isprintable() for c in v):
        ctx.err(path, "must be 1..80 printable characters without spaces (a TCP MD5 key)")
        return None
    return v


def _pathspace(ctx, path: str, v: Any) -> str | None:
    if not isinstance(v, str) or not _PATHSPACE.fullmatch(v):
        ctx.err(path, "expected 1-32 characters from A-Z a-z 0-9 _ - (FRR's -N pathspace)")
        return None
    return v


_COMMS = _list(_community, what="communities", unique=True)
_NEIGHBOR: dict[str, Conv] = {
    "address": _ip(), "asn": _int(1, ASN_MAX), "password": _password, "bfd": _bool,
}
_VIP: dict[str, Conv] = {
    "address": _ip(), "communities": _COMMS, "med": _int(0, 4294967295),
}
_BGP: dict[str, Conv] = {
    "asn": _int(1, ASN_MAX),
    "router_id": _router_id,
    "communities": _COMMS,
    "med": _int(0, 4294967295),
    "hold_s": _int(0, 65535),
    "keepalive_s": _int(0, 65535),
    "bfd": _bool,
    "bfd_rx_ms": _int(*BFD_MS),
    "bfd_tx_ms": _int(*BFD_MS),
    "bfd_multiplier": _int(*BFD_MULT),
    "drain_s": _float(0, 3600),
    "join_timeout_s": _float(0, 600),
    "frr_pathspace": _pathspace,
    "vtysh": _str(),
}
_KEYS = (*_BGP, "neighbor", "vip")


def parse_bgp(ctx, raw: Any, vip_addresses: set, has_vrrp: bool) -> BgpConfig | None:
    """The [bgp] table (`ctx` collects every error); None when invalid."""
    tbl = _table(ctx, "bgp", raw, _KEYS)
    if tbl is None:
        return None
    ok = True
    v: dict[str, Any] = {}
    required = {"asn": "add asn = 65001 (this node's AS)",
                "router_id": 'add router_id = "10.99.0.21" (IPv4)'}
    for k, conv in _BGP.items():
        default = None if k in required else _default(BgpConfig, k)
        v[k] = _get(ctx, tbl, "bgp", k, conv, default, required=required.get(k))
        if v[k] is None and (k in tbl or k in required):
            ok = False
    neighbors: list[BgpNeighbor] = []
    seen: dict[Any, str] = {}
    items = _tables(ctx, "bgp.neighbor", tbl.get("neighbor", []), "bgp.neighbor")
    if "neighbor" not in tbl or not items:
        ctx.err("bgp.neighbor", "required; add at least one [[bgp.neighbor]] with address and "
                                "asn (the router this node peers with)")
        ok = False
    for p, t in items:
        if _table(ctx, p, t, _NEIGHBOR) is None:
            ok = False
            continue
        n = {k: _get(ctx, t, p, k, conv, _default(BgpNeighbor, k),
                       required={"address": 'add address = "10.99.0.1"',
                                 "asn": "add asn = 65000 (the neighbour's AS)"}.get(k))
             for k, conv in _NEIGHBOR.items()}
        if n["address"] is None or n["asn"] is None or any(
                n[k] is None and k in t for k in _NEIGHBOR):
            ok = False
            continue
        if n["address"] in seen:
            ctx.err(f"{p}.address", f"{n['address']} duplicates {seen[n['address']]}; "
                                    "list each neighbour once")
            ok = False
            continue
        seen[n["address"]] = p
        neighbors.append(BgpNeighbor(**n))
    vips: list[BgpVip] = []
    seen_vip: dict[Any, str] = {}
    for p, t in _tables(ctx, "bgp.vip", tbl.get("vip", []), "bgp.vip"):
        if _table(ctx, p, t, _VIP) is None:
            ok = False
            continue
        a = {k: _get(ctx, t, p, k, conv, _default(BgpVip, k),
                       required="add the address of a [[vip]]" if k == "address" else None)
             for k, conv in _VIP.items()}
        if a["address"] is None or any(a[k] is None and k in t for k in _VIP):
            ok = False
            continue
        if a["address"] not in vip_addresses:
            ctx.err(f"{p}.address", f"{a['address']} is not the address of any [[vip]]; "
                                    "route attributes apply to configured VIPs")
            ok = False
            continue
        if a["address"] in seen_vip:
            ctx.err(f"{p}.address", f"{a['address']} duplicates {seen_vip[a['address']]}")
            ok = False
            continue
        seen_vip[a["address"]] = p
        vips.append(BgpVip(**a))
    hold, ka = v["hold_s"], v["keepalive_s"]
    if hold is not None and 0 < hold < 3:
        ctx.err("bgp.hold_s", f"{hold} is out of range: 0 (no hold timer) or 3..65535 (RFC 4271)")
        ok = False
    elif hold and ka is not None and ka >= hold:
        ctx.err("bgp.keepalive_s", f"{ka} must be below hold_s ({hold}); usually hold_s / 3")
        ok = False
    if has_vrrp:
        ctx.err("bgp", "ECMP mode ([bgp]: every node active) and [[vrrp]] (one active node) "
                       "exclude each other; remove one (README: VRRP or ECMP)")
        ok = False
    if not ok:
        return None
    v["neighbor"], v["vip"] = tuple(neighbors), tuple(vips)
    return BgpConfig(**v)


def check_bgp_system(bgp: BgpConfig) -> list[str]:
    """Cheap machine checks (no process started): FRR's vtysh is installed."""
    if shutil.which(bgp.vtysh) is None:
        return [f"bgp: FRR is not installed here ({bgp.vtysh} not found); install it with "
                "`apt-get install frr` (Debian package frr: zebra, bgpd, bfdd) and enable "
                "bgpd=yes and bfdd=yes in /etc/frr/daemons"]
    return []


__all__ = ["BgpConfig", "BgpNeighbor", "BgpVip", "ROUTE_PROTO", "check_bgp_system", "parse_bgp"]
