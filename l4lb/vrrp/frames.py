"""Frames the VRRP agent builds and parses: gratuitous ARP and unsolicited NA
(Ethernet frames sent through AF_PACKET), and the IPv4 header an IPv4 raw socket
delivers. Pure functions, unit tested without the network."""

from __future__ import annotations

import ipaddress
import struct

from .packet import VrrpDecodeError, inet_checksum

ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
IPPROTO_ICMPV6 = 58
ND_NEIGHBOR_ADVERT = 136
ND_NA_FLAG_OVERRIDE = 0x20000000
ND_OPT_TARGET_LLADDR = 2
ALL_NODES_V6 = ipaddress.IPv6Address("ff02::1")

__all__ = ["build_garp", "build_unsolicited_na", "parse_ipv4"]


def _mac_bytes(mac: str) -> bytes:
    b = bytes(int(x, 16) for x in mac.split(":"))
    if len(b) != 6:
        raise ValueError(f"not a MAC address: {mac!r}")
    return b


def build_garp(mac: str, vip: ipaddress.IPv4Address | str) -> bytes:
    """A gratuitous ARP request frame: broadcast, sender = target = ``vip``."""
    m = _mac_bytes(mac)
    ip = ipaddress.IPv4Address(vip).packed
    eth = b"\xff" * 6 + m + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + m + ip + b"\0" * 6 + ip
    return (eth + arp).ljust(60, b"\0")


def build_unsolicited_na(mac: str, src: ipaddress.IPv6Address | str,
                         target: ipaddress.IPv6Address | str) -> bytes:
    """An unsolicited neighbour advertisement frame for ``target`` to ff02::1.

    Override flag set, solicited flag clear, target link-layer address option
    ``mac``, hop limit 255, source ``src`` (an address of the interface).
    """
    m = _mac_bytes(mac)
    s = ipaddress.IPv6Address(src)
    t = ipaddress.IPv6Address(target)
    dst = ALL_NODES_V6
    icmp = (struct.pack("!BBHI", ND_NEIGHBOR_ADVERT, 0, 0, ND_NA_FLAG_OVERRIDE) + t.packed
            + struct.pack("!BB", ND_OPT_TARGET_LLADDR, 1) + m)
    pseudo = s.packed + dst.packed + struct.pack("!I3xB", len(icmp), IPPROTO_ICMPV6)
    icmp = icmp[:2] + struct.pack("!H", inet_checksum(pseudo + icmp)) + icmp[4:]
    ip6 = struct.pack("!IHBB", 6 << 28, len(icmp), IPPROTO_ICMPV6, 255) + s.packed + dst.packed
    eth = b"\x33\x33" + dst.packed[-4:] + m + struct.pack("!H", ETH_P_IPV6)
    return eth + ip6 + icmp


def parse_ipv4(packet: bytes) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address, int, bytes]:
    """Split what an IPv4 raw socket delivers: (src, dst, ttl, payload).

    Raises :class:`VrrpDecodeError` ("truncated") for a short or bad header.
    """
    if len(packet) < 20 or packet[0] >> 4 != 4:
        raise VrrpDecodeError("truncated", "no IPv4 header")
    ihl = (packet[0] & 0x0F) * 4
    total = struct.unpack_from("!H", packet, 2)[0]
    if ihl < 20 or len(packet) < ihl:
        raise VrrpDecodeError("truncated", "bad IPv4 header length")
    end = total if ihl <= total <= len(packet) else len(packet)
    return (ipaddress.IPv4Address(packet[12:16]), ipaddress.IPv4Address(packet[16:20]),
            packet[8], bytes(packet[ihl:end]))
