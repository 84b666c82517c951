"""ctypes mirrors of bpf/maps.h: the one place in Python that knows byte layouts.

Change a struct here and in maps.h together, and bump LAYOUT_VERSION: pinned maps
live under <pin_path>/<node>/v<LAYOUT_VERSION>/ because bcc reopens a pinned map
without checking that its layout still matches.
"""

from __future__ import annotations

import ctypes as ct
import ipaddress
import re
import socket
import struct
from enum import IntEnum
from pathlib import Path

LAYOUT_VERSION = 7  # 7: stats_real holds RealCounters (one record per packet)

FAMILY_V4 = 4
FAMILY_V6 = 6
PROTO = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
PROTO_NAME = {v: k for k, v in PROTO.items()}

VIP_F_HASH_SRC = 0x1
VIP_F_TUN = 0x2
REAL_F_DOWN = 0x1
CFG_F_FLOW_EVENTS = 0x1

# Compile-time sizes (passed to the compiler as -D; the defaults match maps.h).
DEFAULT_MAX_VIPS = 64
DEFAULT_MAX_REALS = 4096
DEFAULT_RING_MAX = 65537
DEFAULT_CONN_TABLE_SIZE = 1 << 20
DEFAULT_FLOW_GUARD_RATE = 10000  # conns admissions per CPU and second (FLOW_GUARD_RATE)


def default_embryo_table_size(conn_table_size: int) -> int:
    """EMBRYO_TABLE_SIZE's default in maps.h."""
    return max(conn_table_size // 8, 1024)


def _maps_h() -> str:
    """bpf/maps.h: inside the package (l4lb/bpf) or beside it in a checkout."""
    here = Path(__file__).resolve().parent.parent
    for d in (here / "bpf", here.parent / "bpf"):
        if (d / "maps.h").is_file():
            return (d / "maps.h").read_text()
    raise ImportError(f"bpf/maps.h not found under {here} or {here.parent}")


_MAPS_H = _maps_h()


def _enum(name: str) -> list[str]:
    """The member names of `enum name { ... }` in maps.h, in order (no explicit values
    after the first member, which must be 0: checked)."""
    m = re.search(r"enum\s+" + name + r"\s*\{(.*?)\};", _MAPS_H, re.S)
    if not m:
        raise ImportError(f"enum {name} not found in bpf/maps.h")
    body = re.sub(r"/\*.*?\*/|//[^\n]*", "", m.group(1), flags=re.S)
    out = []
    for item in (i.strip() for i in body.split(",")):
        if not item:
            continue
        ident, _, value = (x.strip() for x in item.partition("="))
        if value and not (value == "0" and not out):
            raise ImportError(f"enum {name}: explicit value {item!r} is not supported")
        out.append(ident)
    return out


def _define(name: str) -> int:
    m = re.search(r"^#define\s+" + name + r"\s+(\d+)", _MAPS_H, re.M)
    if not m:
        raise ImportError(f"#define {name} not found in bpf/maps.h")
    return int(m.group(1))


# enum stat_reason of maps.h, ST_ prefix dropped: PASS_NON_IP = 0, ... (ST_MAX excluded).
StatReason = IntEnum("StatReason", [(n.removeprefix("ST_"), i)
                                    for i, n in enumerate(_enum("stat_reason")) if n != "ST_MAX"])
StatReason.__doc__ = "enum stat_reason in bpf/maps.h (read from it at import)."
ST_MAX = len(StatReason)


class VipKey(ct.Structure):
    _fields_ = [("addr", ct.c_ubyte * 16), ("port", ct.c_uint16), ("proto", ct.c_uint8),
                ("family", ct.c_uint8)]


class VipMeta(ct.Structure):
    _fields_ = [("vip_id", ct.c_uint32), ("flags", ct.c_uint32), ("ring_slot", ct.c_uint32),
                ("ring_size", ct.c_uint32)]


class VipEntry(ct.Structure):
    _fields_ = [("key", VipKey), ("meta", VipMeta)]


class RealDef(ct.Structure):
    _fields_ = [("addr", ct.c_ubyte * 16), ("mac", ct.c_ubyte * 6), ("family", ct.c_uint8),
                ("flags", ct.c_uint8)]


class FlowKey(ct.Structure):
    _fields_ = [("src", ct.c_ubyte * 16), ("dst", ct.c_ubyte * 16), ("sport", ct.c_uint16),
                ("dport", ct.c_uint16), ("proto", ct.c_uint8), ("family", ct.c_uint8),
                ("pad", ct.c_uint8 * 2)]


class ConnVal(ct.Structure):
    _fields_ = [("real_id", ct.c_uint32), ("vip_id", ct.c_uint32), ("last_seen_ns", ct.c_uint64)]


class LbConfig(ct.Structure):
    _fields_ = [("tun_src6", ct.c_ubyte * 16), ("tun_src4", ct.c_ubyte * 4),
                ("flags", ct.c_uint32), ("conn_timeout_ns", ct.c_uint64)]


class OwnMac(ct.Structure):
    _fields_ = [("mac", ct.c_ubyte * 6), ("valid", ct.c_uint8), ("pad", ct.c_uint8)]


class Embryo(ct.Structure):
    """A slot of embryos (a TCP flow between its SYN and its next packet); key.family 0
    is an empty slot."""

    _fields_ = [("key", FlowKey), ("val", ConnVal), ("check", ct.c_uint32), ("pad", ct.c_uint32)]


class FlowGuardCfg(ct.Structure):
    _fields_ = [("max_per_s", ct.c_uint32), ("pad", ct.c_uint32)]


class FlowGuardState(ct.Structure):
    _fields_ = [("window_start_ns", ct.c_uint64), ("admitted", ct.c_uint64)]


MAX_IFINDEX = _define("MAX_IFINDEX")
VIP_FILTER_SIZE = _define("VIP_FILTER_SIZE")


def _mix32(h: int) -> int:
    """mix32() in balancer.c."""
    h &= 0xFFFFFFFF
    h ^= h >> 16
    h = (h * 0x7FEB352D) & 0xFFFFFFFF
    h ^= h >> 15
    h = (h * 0x846CA68B) & 0xFFFFFFFF
    h ^= h >> 16
    return h


def vip_filter_index(addr) -> int:
    """vip_filter_index() in balancer.c: the VIP pre-filter slot of an address."""
    raw, fam = addr16(addr)
    w = struct.unpack("=4I", raw)  # the program reads the words in host order
    return _mix32(w[0] ^ w[1] ^ w[2] ^ w[3] ^ fam) & (VIP_FILTER_SIZE - 1)


class Counters(ct.Structure):
    _fields_ = [("packets", ct.c_uint64), ("bytes", ct.c_uint64), ("new_flows", ct.c_uint64)]


class RealCounters(ct.Structure):
    """stats_real's record: the real's counters and the per-packet global reasons it
    stands for (user space derives per-VIP sums and conn_hit/tx_dr/tx_tun from it)."""
    _fields_ = [("packets", ct.c_uint64), ("bytes", ct.c_uint64), ("new_flows", ct.c_uint64),
                ("conn_hit", ct.c_uint64), ("tx_dr", ct.c_uint64), ("tx_tun", ct.c_uint64)]


#: The global reasons the data plane counts in RealCounters instead of stats_global.
REAL_REASONS = ("conn_hit", "tx_dr", "tx_tun")


class FlowEvent(ct.Structure):
    _fields_ = [("key", FlowKey), ("real_id", ct.c_uint32), ("vip_id", ct.c_uint32),
                ("ts_ns", ct.c_uint64)]


# Sizes must match the C side exactly; a mismatch is a bug caught at import.
for _s, _n in ((VipKey, 20), (VipMeta, 16), (VipEntry, 36), (RealDef, 24), (FlowKey, 40), (ConnVal, 16),
               (LbConfig, 32), (Counters, 24), (RealCounters, 48), (FlowEvent, 56), (Embryo, 64), (FlowGuardCfg, 8),
               (FlowGuardState, 16)):
    assert ct.sizeof(_s) == _n, (_s.__name__, ct.sizeof(_s))

# Every map of maps.h: its key and value as user space reads them (per-CPU maps: one
# CPU's value). tests/bpf/test_layout.py checks each against the BTF bcc compiled.
MAP_TYPES = {
    "vips": (VipKey, VipMeta), "vip_addrs": (VipKey, ct.c_uint32),
    "vip_by_id": (ct.c_uint32, VipEntry), "reals": (ct.c_uint32, RealDef),
    "rings": (ct.c_uint32, ct.c_uint32), "conns": (FlowKey, ConnVal),
    "embryos": (ct.c_uint32, Embryo), "config": (ct.c_uint32, LbConfig),
    "flow_guard_cfg": (ct.c_uint32, FlowGuardCfg), "flow_guard": (ct.c_uint32, FlowGuardState),
    "own_macs": (ct.c_uint32, OwnMac), "vip_filter": (ct.c_uint32, ct.c_uint32),
    "stats_vip": (ct.c_uint32, Counters), "stats_real": (ct.c_uint32, RealCounters),
    "stats_global": (ct.c_uint32, ct.c_uint64),
}
# Structs user space reads that no map names as key or value (ring buffer records).
RECORD_TYPES = {"flow_event": FlowEvent}


def addr16(addr) -> tuple[bytes, int]:
    """An address as the 16 bytes the maps hold (IPv4 first, zero-padded), and its family."""
    ip = ipaddress.ip_address(addr)
    if ip.version == 4:
        return ip.packed + bytes(12), FAMILY_V4
    return ip.packed, FAMILY_V6


def addr_from16(raw, family: int):
    b = bytes(raw)
    return ipaddress.ip_address(b[:4] if family == FAMILY_V4 else b)


def mac_bytes(mac: str) -> bytes:
    parts = mac.split(":")
    if len(parts) != 6:
        raise ValueError(f"bad MAC address {mac!r}")
    return bytes(int(p, 16) for p in parts)


def vip_key(addr, port: int, proto: str | int) -> VipKey:
    raw, fam = addr16(addr)
    k = VipKey()
    k.addr[:] = raw
    k.port = socket.htons(port)
    k.proto = PROTO[proto] if isinstance(proto, str) else proto
    k.family = fam
    return k


def vip_addr_key(addr) -> VipKey:
    raw, fam = addr16(addr)
    k = VipKey()
    k.addr[:] = raw
    k.family = fam
    return k


def real_def(addr, mac: str | bytes, down: bool = False) -> RealDef:
    raw, fam = addr16(addr)
    r = RealDef()
    r.addr[:] = raw
    r.mac[:] = mac if isinstance(mac, bytes) else mac_bytes(mac)
    r.family = fam
    r.flags = REAL_F_DOWN if down else 0
    return r


def flow_key(src, sport: int, dst, dport: int, proto: str | int) -> FlowKey:
    s, fam = addr16(src)
    d, _ = addr16(dst)
    k = FlowKey()
    k.src[:] = s
    k.dst[:] = d
    k.sport = socket.htons(sport)
    k.dport = socket.htons(dport)
    k.proto = PROTO[proto] if isinstance(proto, str) else proto
    k.family = fam
    return k


def flow_tuple(k: FlowKey) -> tuple:
    """(src, sport, dst, dport, proto) of a conn-table key, addresses as ipaddress objects."""
    return (addr_from16(k.src, k.family), socket.ntohs(k.sport), addr_from16(k.dst, k.family),
            socket.ntohs(k.dport), k.proto)


# bpf/hc_tunnel.c (tunnel health checks): probe sockets carry SO_MARK
# HC_MARK_TAG | real id; hc_tunnels maps that mark to the VIP the probe is for.
HC_MARK_TAG = 0x4C000000
HC_MARK_MASK = 0xFF000000


class HcTunnelDef(ct.Structure):
    _fields_ = [("vip", ct.c_ubyte * 16), ("family", ct.c_uint8), ("pad", ct.c_uint8 * 3)]


HC_MAP_TYPES = {"hc_tunnels": (ct.c_uint32, HcTunnelDef)}  # user space writes only this one


def hc_mark(real_id: int) -> int:
    if not 0 < real_id <= 0xFFFFFF:
        raise ValueError(f"real id {real_id} does not fit a health-check mark")
    return HC_MARK_TAG | real_id


def hc_tunnel_def(vip) -> HcTunnelDef:
    raw, fam = addr16(vip)
    t = HcTunnelDef()
    t.vip[:] = raw
    t.family = fam
    return t
