"""Links, addresses, routes and neighbours through pyroute2, in the current namespace.

The node's own traffic (health checks, the tunnel's outer source) must never
come from a VIP: the reals hold the VIP on lo, so what they answer to it never
leaves them.  Hence IPv6 VIPs are added deprecated (preferred_lft 0: the kernel
never picks a deprecated address as a source when another one exists, RFC 6724
rule 3), and `own_address` / `SourcePicker` name the address to bind to
explicitly (IPv4 has no such rule: a VIP in the node's subnet is only a
secondary address, but a VIP of another subnet would be its primary).

Blocking calls (one IPRoute each) for the daemon, run in threads where they
could stall the loop; `AsyncNetlink` (one AsyncIPRoute) for the VRRP agent,
whose VIPs may also carry a lifetime. Both add VIPs with `_vip_attrs`.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

IFA_F_SECONDARY = 0x01
IFA_F_NODAD = 0x02
IFA_F_DADFAILED = 0x08
IFA_F_DEPRECATED = 0x20
IFA_F_TENTATIVE = 0x40
IFA_F_NOPREFIXROUTE = 0x200
INFINITY_LFT = 0xFFFFFFFF
IFF_UP = 0x1
IFF_RUNNING = 0x40
log = logging.getLogger("l4lb.netutil")
SOURCE_REFRESH_S = 10.0  # SourcePicker re-reads the addresses this often
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
NUD_USABLE = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80  # reachable/stale/delay/probe/noarp/perm


def ifindex(ifname: str) -> int:
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        raise LookupError(f"interface {ifname} does not exist") from None


def link_mac(ifname: str) -> str:
    with IPRoute() as ipr:
        return ipr.get_links(ifindex(ifname))[0].get_attr("IFLA_ADDRESS")


def _flags(msg) -> int:
    return msg.get_attr("IFA_FLAGS") or msg["flags"]


def iface_addresses(ifname: str, avoid: Iterable = ()) -> list[ipaddress.IPv4Address |
                                                            ipaddress.IPv6Address]:
    """The interface's own global addresses, primary first: no link-local, no host
    routes or deprecated addresses (VIPs we added ourselves), nothing in `avoid`
    (the VIPs), nothing tentative."""
    idx = ifindex(ifname)
    skip = {ipaddress.ip_address(a) for a in avoid}
    out = []
    with IPRoute() as ipr:
        for a in ipr.get_addr(index=idx):
            ip = ipaddress.ip_address(a.get_attr("IFA_ADDRESS"))
            f = _flags(a)
            if ip.is_link_local or a["prefixlen"] == ip.max_prefixlen or ip in skip or \
                    f & (IFA_F_DEPRECATED | IFA_F_TENTATIVE | IFA_F_DADFAILED):
                continue
            out.append((bool(f & IFA_F_SECONDARY), ip))
    return [ip for _sec, ip in sorted(out, key=lambda t: t[0])]  # stable: kernel order kept


def own_address(ifnames: Iterable[str], family: int, avoid: Iterable = ()) -> str | None:
    """The first of the interfaces' own addresses of `family` (4/6) that is no VIP."""
    avoid = list(avoid)
    for ifname in ifnames:
        try:
            addrs = iface_addresses(ifname, avoid)
        except LookupError:
            continue
        for ip in addrs:
            if ip.version == family:
                return str(ip)
    return None


def route_source(dst) -> str | None:
    """The source address the kernel would pick for traffic to `dst` (RTA_PREFSRC)."""
    with IPRoute() as ipr:
        return ipr.route("get", dst=str(ipaddress.ip_address(dst)))[0].get_attr("RTA_PREFSRC")


class SourcePicker:
    """The address health checks bind to, per family: `own_address` of the node's
    interfaces, re-read every SOURCE_REFRESH_S (in a thread: netlink is blocking)
    or after `invalidate()`. `avoid()` returns the VIPs of the current config."""

    def __init__(self, ifnames: Iterable[str], avoid: Callable[[], Iterable] = lambda: ()):
        self.ifnames = tuple(ifnames)
        self.avoid = avoid
        self._cache: dict[int, tuple[float, str | None]] = {}
        self._said: dict[int, str | None] = {}
        self._lock: asyncio.Lock | None = None

    def invalidate(self) -> None:
        self._cache.clear()

    async def pick(self, family: int) -> str | None:
        hit = self._cache.get(family)
        if hit and time.monotonic() - hit[0] < SOURCE_REFRESH_S:
            return hit[1]
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # one lookup for all the probes that wait for it
            hit = self._cache.get(family)
            if hit and time.monotonic() - hit[0] < SOURCE_REFRESH_S:
                return hit[1]
            addr = await asyncio.to_thread(own_address, self.ifnames, family, list(self.avoid()))
            if self._said.get(family, "") != addr:  # say it when it changes
                self._said[family] = addr
                if addr is None:
                    log.warning("no IPv%d address of %s other than a VIP: health checks of "
                                "IPv%d reals go unbound (the kernel picks their source)",
                                family, ",".join(self.ifnames), family)
                else:
                    log.info("health checks of IPv%d reals come from %s", family, addr)
            self._cache[family] = (time.monotonic(), addr)
            return addr


def _vip_attrs(version: int, lifetime: int = 0) -> dict[str, Any]:
    """Netlink attributes of a VIP address. IPv6: no DAD, and deprecated (preferred_lft
    0): the kernel never picks the VIP as the source of our own traffic, or health checks
    would be answered to the reals themselves. ``lifetime`` > 0: the kernel deletes the
    address after that many seconds unless it is renewed; 0: forever."""
    valid = lifetime if lifetime > 0 else INFINITY_LFT
    if version == 6:
        return {"flags": IFA_F_NODAD, "IFA_CACHEINFO": {"ifa_preferred": 0, "ifa_valid": valid}}
    if lifetime > 0:
        return {"IFA_CACHEINFO": {"ifa_preferred": lifetime, "ifa_valid": lifetime}}
    return {}


def add_address(ifname: str, addr) -> bool:
    """Add a VIP as a host address (IPv6: deprecated, never a source); False when it
    was already there."""
    ip = ipaddress.ip_address(addr)
    kw = _vip_attrs(ip.version)
    with IPRoute() as ipr:
        try:
            ipr.addr("add", index=ifindex(ifname), address=str(ip), prefixlen=ip.max_prefixlen,
                     **kw)
            return True
        except NetlinkError as e:
            if e.code == 17:  # EEXIST
                return False
            raise


def del_address(ifname: str, addr) -> bool:
    ip = ipaddress.ip_address(addr)
    with IPRoute() as ipr:
        try:
            ipr.addr("del", index=ifindex(ifname), address=str(ip), prefixlen=ip.max_prefixlen)
            return True
        except NetlinkError as e:
            if e.code in (99, 19, 22):  # EADDRNOTAVAIL, ENODEV, EINVAL: not there
                return False
            raise
        except LookupError:
            return False


def next_hop(addr) -> tuple[str, int]:
    """(next-hop address, ifindex) the kernel would use to reach `addr`."""
    ip = ipaddress.ip_address(addr)
    with IPRoute() as ipr:
        r = ipr.route("get", dst=str(ip))[0]
        gw = r.get_attr("RTA_GATEWAY")
        return (gw or str(ip)), r.get_attr("RTA_OIF")


def lookup_mac(addr, idx: int) -> str | None:
    ip = ipaddress.ip_address(addr)
    fam = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    with IPRoute() as ipr:
        for n in ipr.get_neighbours(family=fam, ifindex=idx):
            if ipaddress.ip_address(n.get_attr("NDA_DST")) == ip and n["state"] & NUD_USABLE:
                mac = n.get_attr("NDA_LLADDR")
                if mac and mac != "00:00:00:00:00:00":
                    return mac
    return None


def resolve_mac(addr, timeout: float = 2.0) -> str | None:
    """The MAC of `addr`'s next hop, asking the kernel to resolve it when unknown."""
    hop, idx = next_hop(addr)
    mac = lookup_mac(hop, idx)
    if mac:
        return mac
    ip = ipaddress.ip_address(hop)
    fam = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # A datagram to the discard port makes the kernel send ARP / NS for us.
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            try:
                s.sendto(b"", (str(ip), 9))
            except OSError:
                pass
        for _ in range(10):
            time.sleep(0.02)
            mac = lookup_mac(hop, idx)
            if mac:
                return mac
    return None


# --------------------------------------------------------------------------
# asyncio (the VRRP agent): one AsyncIPRoute
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class LinkInfo:
    index: int
    up: bool
    mac: str


class AsyncNetlink:
    """The few rtnetlink operations the VRRP agent needs, over one AsyncIPRoute."""

    def __init__(self) -> None:
        self._ipr = None

    def _get(self):
        if self._ipr is None:
            from pyroute2 import AsyncIPRoute  # noqa: PLC0415 - only the agent needs it

            self._ipr = AsyncIPRoute()
        return self._ipr

    async def link(self, ifname: str) -> LinkInfo | None:
        try:
            msgs = await self._get().link("get", ifname=ifname)
        except NetlinkError as e:
            if e.code in (errno.ENODEV, errno.ENOENT):
                return None
            raise
        for m in msgs:
            flags = m["flags"]
            return LinkInfo(m["index"], bool(flags & IFF_UP and flags & IFF_RUNNING),
                            m.get("address") or "00:00:00:00:00:00")
        return None

    async def addresses(self, index: int, family: int) -> list[tuple[IPAddress, int, int, int]]:
        """(address, prefixlen, flags, scope) of the interface, one family."""
        af = socket.AF_INET if family == 4 else socket.AF_INET6
        out = []
        async for m in await self._get().addr("dump"):
            if m["index"] != index or m["family"] != af:
                continue
            flags = m.get("IFA_FLAGS") or m["flags"]
            out.append((ipaddress.ip_address(m.get("address")), m["prefixlen"], flags,
                        m["scope"]))
        return out

    async def add_address(self, index: int, iface: ipaddress.IPv4Interface |
                          ipaddress.IPv6Interface, lifetime: int) -> None:
        """Add or renew (replace) a VIP; ``lifetime`` as in `_vip_attrs`."""
        await self._get().addr("replace", index=index, address=str(iface.ip),
                               prefixlen=iface.network.prefixlen,
                               **_vip_attrs(iface.version, lifetime))

    async def del_address(self, index: int, iface: ipaddress.IPv4Interface |
                          ipaddress.IPv6Interface) -> bool:
        """Delete; False if it was not there."""
        try:
            await self._get().addr("del", index=index, address=str(iface.ip),
                                   prefixlen=iface.network.prefixlen)
        except NetlinkError as e:
            if e.code in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ENODEV, errno.ESRCH):
                return False
            raise
        return True

    async def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
