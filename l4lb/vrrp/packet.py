"""VRRP advertisement codec (sans-I/O).

Encodes and decodes the VRRP message carried in IP protocol 112, i.e. the bytes
that follow the IPv4/IPv6 header:

* VRRPv2 (RFC 3768), IPv4 only::

    0                   1                   2                   3
    |Version| Type  | Virtual Rtr ID|   Priority    | Count IP Addrs|
    |   Auth Type   |   Adver Int   |          Checksum             |
    |                   IP Address (1..n)                           |
    |                 Authentication Data (1)                       |
    |                 Authentication Data (2)                       |

  The checksum covers the VRRP message only.

* VRRPv3 (RFC 5798), IPv4 or IPv6::

    |Version| Type  | Virtual Rtr ID|   Priority    |Count IPvX Addr|
    |(rsvd) |     Max Adver Int     |          Checksum             |
    |                 IPvX Address(es) (1..n)                       |

  The checksum covers an IPv4/IPv6 pseudo-header (src, dst, zero, protocol
  112, VRRP length) followed by the VRRP message.

Intervals are kept in centiseconds in :attr:`Advert.interval_cs` for both
versions; v2's 8-bit Adver Int (seconds) is converted on the way in and out.

No I/O happens here: :func:`decode` and :func:`encode` are pure functions.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass, field

__all__ = [
    "IPPROTO_VRRP",
    "VRRP_MCAST_V4",
    "VRRP_MCAST_V6",
    "VRRP_TTL",
    "ADVERT_TYPE",
    "AUTH_NONE",
    "AUTH_SIMPLE",
    "AUTH_DATA_LEN",
    "Address",
    "Advert",
    "VrrpDecodeError",
    "DECODE_REASONS",
    "decode",
    "encode",
    "inet_checksum",
]

IPPROTO_VRRP = 112
VRRP_MCAST_V4 = ipaddress.IPv4Address("224.0.0.18")
VRRP_MCAST_V6 = ipaddress.IPv6Address("ff02::12")
#: IP TTL / IPv6 hop limit a VRRP advert must carry (checked by the receiver).
VRRP_TTL = 255

ADVERT_TYPE = 1
AUTH_NONE = 0
AUTH_SIMPLE = 1  # RFC 2338 simple text password, kept by RFC 3768 for compatibility
AUTH_DATA_LEN = 8

_HDR = struct.Struct("!BBBBBBH")  # first 8 bytes, both versions
_HDR_LEN = _HDR.size

#: Every reason a :class:`VrrpDecodeError` may carry (stable strings, for counters).
DECODE_REASONS = (
    "truncated",  # shorter than the fixed part of the message
    "version",  # version nibble is not 2 or 3, or v2 over IPv6
    "type",  # type nibble is not 1 (advertisement)
    "length",  # bytes after the fixed part are not a whole number of addresses
    "addr_count",  # Count IP Addrs is 0 or disagrees with the message length
    "interval",  # advertisement interval is 0
    "checksum",  # checksum does not verify
    "auth",  # v2 auth type unknown, or differs from what the caller expects
    "ttl",  # IP TTL / hop limit is not 255 (only if the caller passes ttl)
    "family",  # src/dst/family arguments disagree (caller error)
)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class VrrpDecodeError(ValueError):
    """Raised by :func:`decode` for any malformed or unacceptable message.

    ``reason`` is one of :data:`DECODE_REASONS`.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass
class Advert:
    """One VRRP advertisement.

    ``interval_cs`` is the advertisement interval in centiseconds (v3: the
    12-bit Max Adver Int; v2: Adver Int seconds * 100).  ``auth_type`` and
    ``auth_data`` are only meaningful for v2 (``auth_data`` is padded with
    zeros to 8 bytes on the wire; :func:`decode` returns the 8 raw bytes).
    ``checksum`` is the value found on the wire by :func:`decode`; :func:`encode`
    ignores it and always computes a fresh one.
    """

    version: int
    vrid: int
    priority: int
    interval_cs: int
    addresses: list[Address] = field(default_factory=list)
    auth_type: int = AUTH_NONE
    auth_data: bytes = b""
    type: int = ADVERT_TYPE
    checksum: int | None = None


def _norm_family(family: int | None, src: Address) -> int:
    if family is None:
        return src.version
    if family in (4, socket.AF_INET):
        return 4
    if family in (6, socket.AF_INET6):
        return 6
    raise ValueError(f"unknown address family {family!r}")


def inet_checksum(data: bytes) -> int:
    """RFC 1071 Internet checksum (one's complement of the one's complement sum)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _pseudo_header(src: Address, dst: Address, length: int) -> bytes:
    if src.version != dst.version:
        raise ValueError("src and dst are of different address families")
    if src.version == 4:
        return src.packed + dst.packed + struct.pack("!BBH", 0, IPPROTO_VRRP, length)
    return src.packed + dst.packed + struct.pack("!I3xB", length, IPPROTO_VRRP)


def _checksum_input(version: int, msg: bytes, src: Address | None, dst: Address | None) -> bytes:
    if version == 2:
        return msg
    if src is None or dst is None:
        raise ValueError("VRRPv3 checksum needs the IP src and dst")
    return _pseudo_header(src, dst, len(msg)) + msg


def _pad_auth(data: bytes) -> bytes:
    if len(data) > AUTH_DATA_LEN:
        raise ValueError(f"auth_data longer than {AUTH_DATA_LEN} bytes")
    return data.ljust(AUTH_DATA_LEN, b"\0")


def decode(
    payload: bytes,
    src: Address | str,
    dst: Address | str,
    family: int | None = None,
    *,
    ttl: int | None = None,
    auth_type: int | None = None,
    auth_data: bytes | None = None,
) -> Advert:
    """Decode and validate the VRRP message ``payload`` (the IP payload).

    ``src``/``dst`` are the IP header addresses (needed for the v3 pseudo-header
    checksum).  ``family`` is 4/6 or ``socket.AF_INET``/``AF_INET6``; by default
    it is taken from ``src``.  Optional checks: ``ttl`` (must be 255 when
    given); ``auth_type``/``auth_data`` (v2: must match when ``auth_type`` is
    given).  Raises :class:`VrrpDecodeError` and nothing else.
    """
    try:
        src_a = ipaddress.ip_address(src)
        dst_a = ipaddress.ip_address(dst)
        fam = _norm_family(family, src_a)
    except ValueError as e:  # caller error, but keep the "only VrrpDecodeError" promise
        raise VrrpDecodeError("family", str(e)) from e
    if src_a.version != fam or dst_a.version != fam:
        raise VrrpDecodeError("family", "src/dst do not match the address family")

    expect_auth = _pad_auth(auth_data or b"")  # ValueError here is a caller error
    payload = bytes(payload)
    if ttl is not None and ttl != VRRP_TTL:
        raise VrrpDecodeError("ttl", f"ttl {ttl}")
    if len(payload) < _HDR_LEN:
        raise VrrpDecodeError("truncated", f"{len(payload)} bytes")

    ver_type, vrid, priority, count, b4, b5, cksum = _HDR.unpack_from(payload)
    version, typ = ver_type >> 4, ver_type & 0x0F
    if version not in (2, 3):
        raise VrrpDecodeError("version", f"version {version}")
    if version == 2 and fam != 4:
        raise VrrpDecodeError("version", "VRRPv2 is IPv4 only")
    if typ != ADVERT_TYPE:
        raise VrrpDecodeError("type", f"type {typ}")

    alen = 4 if fam == 4 else 16
    trailer = AUTH_DATA_LEN if version == 2 else 0
    fixed = _HDR_LEN + trailer
    if len(payload) < fixed:
        raise VrrpDecodeError("truncated", f"{len(payload)} bytes")
    body = len(payload) - fixed
    if body % alen:
        raise VrrpDecodeError("length", f"{body} address bytes for IPv{fam}")
    if count == 0 or body // alen != count:
        raise VrrpDecodeError("addr_count", f"count {count}, room for {body // alen}")

    if version == 2:
        interval_cs = b5 * 100
        a_type = b4
    else:
        interval_cs = ((b4 << 8) | b5) & 0x0FFF
        a_type = AUTH_NONE
    if interval_cs == 0:
        raise VrrpDecodeError("interval", "advertisement interval 0")

    if inet_checksum(_checksum_input(version, payload, src_a, dst_a)) != 0:
        raise VrrpDecodeError("checksum", f"checksum {cksum:#06x}")

    addrs: list[Address] = []
    cls = ipaddress.IPv4Address if fam == 4 else ipaddress.IPv6Address
    for i in range(count):
        off = _HDR_LEN + i * alen
        addrs.append(cls(payload[off : off + alen]))

    a_data = b""
    if version == 2:
        a_data = payload[_HDR_LEN + count * alen :]
        if a_type not in (AUTH_NONE, AUTH_SIMPLE):
            raise VrrpDecodeError("auth", f"auth type {a_type}")
        if auth_type is not None:
            if a_type != auth_type:
                raise VrrpDecodeError("auth", f"auth type {a_type}, expected {auth_type}")
            if auth_type == AUTH_SIMPLE and a_data != expect_auth:
                raise VrrpDecodeError("auth", "auth data mismatch")

    return Advert(
        version=version,
        vrid=vrid,
        priority=priority,
        interval_cs=interval_cs,
        addresses=addrs,
        auth_type=a_type,
        auth_data=a_data,
        type=typ,
        checksum=cksum,
    )


def encode(
    advert: Advert, src: Address | str | None = None, dst: Address | str | None = None
) -> bytes:
    """Encode ``advert`` with a correct checksum.

    ``src``/``dst`` (the IP header addresses the message will be sent with) are
    required for v3 (pseudo-header checksum) and ignored for v2.  Raises
    ``ValueError`` for fields that cannot be represented.
    """
    a = advert
    if a.version not in (2, 3):
        raise ValueError(f"version {a.version}")
    if not 0 <= a.type <= 15:
        raise ValueError(f"type {a.type}")
    if not 0 <= a.vrid <= 255 or not 0 <= a.priority <= 255:
        raise ValueError("vrid and priority must fit in a byte")
    if not 1 <= len(a.addresses) <= 255:
        raise ValueError("1..255 addresses required")
    addrs = [ipaddress.ip_address(x) for x in a.addresses]
    fam = addrs[0].version
    if any(x.version != fam for x in addrs):
        raise ValueError("mixed address families")
    if a.version == 2 and fam != 4:
        raise ValueError("VRRPv2 is IPv4 only")

    if a.version == 2:
        if a.interval_cs % 100 or not 1 <= a.interval_cs // 100 <= 255:
            raise ValueError("v2 interval must be 1..255 whole seconds")
        if a.auth_type not in (AUTH_NONE, AUTH_SIMPLE):
            raise ValueError(f"unsupported v2 auth type {a.auth_type}")
        b4, b5 = a.auth_type, a.interval_cs // 100
        trailer = _pad_auth(a.auth_data)
    else:
        if not 1 <= a.interval_cs <= 0x0FFF:
            raise ValueError("v3 interval must be 1..4095 centiseconds")
        b4, b5 = a.interval_cs >> 8, a.interval_cs & 0xFF
        trailer = b""

    head = _HDR.pack((a.version << 4) | a.type, a.vrid, a.priority, len(addrs), b4, b5, 0)
    msg = head + b"".join(x.packed for x in addrs) + trailer

    src_a = ipaddress.ip_address(src) if src is not None else None
    dst_a = ipaddress.ip_address(dst) if dst is not None else None
    ck = inet_checksum(_checksum_input(a.version, msg, src_a, dst_a))
    return msg[:6] + struct.pack("!H", ck) + msg[8:]
