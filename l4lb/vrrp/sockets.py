"""The VRRP agent's sockets: the raw protocol-112 socket of one instance
(VrrpSocket) and the AF_PACKET sender of gratuitous ARP / NA frames."""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Any

from .frames import parse_ipv4
from .packet import IPPROTO_VRRP, VRRP_MCAST_V4, VRRP_MCAST_V6, VRRP_TTL, Address

# Linux constants the socket module lacks.
IP_PKTINFO = 8
IP_MULTICAST_ALL = 49
IPV6_MULTICAST_ALL = 29
VRRP_TOS = 0xC0  # precedence "internetwork control", as keepalived

__all__ = ["VrrpSocket", "hop_limit"]


def hop_limit(ancdata: list[tuple[int, int, bytes]]) -> int | None:
    """The IPV6_HOPLIMIT value in recvmsg ancillary data, None if absent."""
    for level, typ, data in ancdata:
        if level == socket.IPPROTO_IPV6 and typ == socket.IPV6_HOPLIMIT and len(data) >= 4:
            return struct.unpack("@i", data[:4])[0]
    return None


def _pktinfo6_dst(ancdata: list[tuple[int, int, bytes]]) -> ipaddress.IPv6Address | None:
    for level, typ, data in ancdata:
        if level == socket.IPPROTO_IPV6 and typ == socket.IPV6_PKTINFO and len(data) >= 16:
            return ipaddress.IPv6Address(data[:16])
    return None


class VrrpSocket:
    """The raw protocol-112 socket of one instance (one family, one interface).

    ``recv()`` returns ``(payload, src, dst, ttl)`` or None when nothing is
    waiting; a malformed IPv4 header raises :class:`VrrpDecodeError`.
    ``sock`` may be given (tests); otherwise :meth:`open` makes it.
    """

    def __init__(self, family: int, ifname: str, ifindex: int, src: Address,
                 peers: tuple[Address, ...] = (), sock: Any = None) -> None:
        self.family = family
        self.ifname = ifname
        self.ifindex = ifindex
        self.src = src
        self.peers = tuple(peers)
        self.sock = sock

    @property
    def group(self) -> Address:
        return VRRP_MCAST_V4 if self.family == 4 else VRRP_MCAST_V6

    @property
    def destinations(self) -> tuple[Address, ...]:
        return self.peers or (self.group,)

    def open(self) -> VrrpSocket:
        af = socket.AF_INET if self.family == 4 else socket.AF_INET6
        s = socket.socket(af, socket.SOCK_RAW, IPPROTO_VRRP)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.ifname.encode())
            if self.family == 4:
                ip = socket.IPPROTO_IP
                s.setsockopt(ip, socket.IP_TTL, VRRP_TTL)
                s.setsockopt(ip, socket.IP_MULTICAST_TTL, VRRP_TTL)
                s.setsockopt(ip, socket.IP_MULTICAST_LOOP, 0)
                s.setsockopt(ip, socket.IP_TOS, VRRP_TOS)
                _try_setsockopt(s, ip, IP_MULTICAST_ALL, 0)
                s.setsockopt(ip, socket.IP_MULTICAST_IF,
                             struct.pack("4s4si", b"\0" * 4, self.src.packed, self.ifindex))
                if not self.peers:
                    s.setsockopt(ip, socket.IP_ADD_MEMBERSHIP,
                                 struct.pack("4s4si", VRRP_MCAST_V4.packed, b"\0" * 4,
                                             self.ifindex))
            else:
                ip6 = socket.IPPROTO_IPV6
                s.setsockopt(ip6, socket.IPV6_UNICAST_HOPS, VRRP_TTL)
                s.setsockopt(ip6, socket.IPV6_MULTICAST_HOPS, VRRP_TTL)
                s.setsockopt(ip6, socket.IPV6_MULTICAST_LOOP, 0)
                s.setsockopt(ip6, socket.IPV6_MULTICAST_IF, self.ifindex)
                s.setsockopt(ip6, socket.IPV6_RECVHOPLIMIT, 1)
                s.setsockopt(ip6, socket.IPV6_RECVPKTINFO, 1)
                s.setsockopt(ip6, socket.IPV6_TCLASS, VRRP_TOS)
                _try_setsockopt(s, ip6, IPV6_MULTICAST_ALL, 0)
                if not self.peers:
                    s.setsockopt(ip6, socket.IPV6_JOIN_GROUP,
                                 struct.pack("16sI", VRRP_MCAST_V6.packed, self.ifindex))
            s.setblocking(False)
        except BaseException:
            s.close()
            raise
        self.sock = s
        return self

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()

    def send(self, payload: bytes, dst: Address) -> None:
        """Send one advert from ``self.src`` out of the interface."""
        if self.family == 4:
            info = struct.pack("I4s4s", self.ifindex, self.src.packed, b"\0" * 4)
            self.sock.sendmsg([payload], [(socket.IPPROTO_IP, IP_PKTINFO, info)], 0,
                              (str(dst), 0))
        else:
            info = struct.pack("16sI", self.src.packed, self.ifindex)
            scope = self.ifindex if dst.is_link_local or dst.is_multicast else 0
            self.sock.sendmsg([payload], [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, info)], 0,
                              (str(dst), 0, 0, scope))

    def recv(self) -> tuple[bytes, Address, Address, int | None] | None:
        try:
            if self.family == 4:
                data = self.sock.recv(65535)
                src, dst, ttl, payload = parse_ipv4(data)
                return payload, src, dst, ttl
            data, anc, _flags, addr = self.sock.recvmsg(65535, 256)
        except (BlockingIOError, InterruptedError):
            return None
        src6 = ipaddress.IPv6Address(addr[0].split("%", 1)[0])
        dst6 = _pktinfo6_dst(anc) or self.group
        return bytes(data), src6, dst6, hop_limit(anc)


def _try_setsockopt(s: socket.socket, level: int, opt: int, value: int) -> None:
    try:
        s.setsockopt(level, opt, value)
    except OSError:  # older kernels
        pass


class _L2Sender:
    """Sends whole Ethernet frames out of an interface (AF_PACKET)."""

    def __init__(self, ifname: str) -> None:
        self.ifname = ifname

    def send(self, frames: list[bytes]) -> int:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) as s:
            s.bind((self.ifname, 0))
            for f in frames:
                s.send(f)
        return len(frames)
