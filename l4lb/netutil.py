"""Links, addresses, routes and neighbours through pyroute2, in the current namespace."""

from __future__ import annotations

import ipaddress
import socket
import time

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

IFA_F_NODAD = 0x02
NUD_USABLE = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80  # reachable/stale/delay/probe/noarp/perm


def ifindex(ifname: str) -> int:
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        raise LookupError(f"interface {ifname} does not exist") from None


def link_mac(ifname: str) -> str:
    with IPRoute() as ipr:
        return ipr.get_links(ifindex(ifname))[0].get_attr("IFLA_ADDRESS")


def iface_addresses(ifname: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The interface's global addresses, primary first."""
    idx = ifindex(ifname)
    out = []
    with IPRoute() as ipr:
        for a in ipr.get_addr(index=idx):
            ip = ipaddress.ip_address(a.get_attr("IFA_ADDRESS"))
            if ip.is_link_local or a["prefixlen"] == ip.max_prefixlen:
                continue  # skip fe80:: and host routes (VIPs we added ourselves)
            out.append(ip)
    return out


def add_address(ifname: str, addr) -> bool:
    """Add a VIP as a host address; False when it was already there."""
    ip = ipaddress.ip_address(addr)
    with IPRoute() as ipr:
        try:
            ipr.addr("add", index=ifindex(ifname), address=str(ip), prefixlen=ip.max_prefixlen,
                     **({"flags": IFA_F_NODAD} if ip.version == 6 else {}))
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


def has_address(ifname: str, addr) -> bool:
    ip = ipaddress.ip_address(addr)
    try:
        idx = ifindex(ifname)
    except LookupError:
        return False
    with IPRoute() as ipr:
        return any(ipaddress.ip_address(a.get_attr("IFA_ADDRESS")) == ip
                   for a in ipr.get_addr(index=idx))


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
