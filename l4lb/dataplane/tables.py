"""Service tables: VIPs, reals and Maglev rings as the XDP program sees them.

Owns the id spaces (VIP ids, ring slots, real ids) and writes the maps through
the loaded Program. Real ids are per (VIP, real address) and stable for the life
of that real, because the conn table records them. The id assignment is kept in
a JSON file beside the pinned maps, so a restarted control plane reattaches
with the same ids and existing flows keep their reals.
"""

from __future__ import annotations

import ctypes as ct
import errno
import functools
import ipaddress
import json
import os
import socket
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from l4lb import maglev
from l4lb.dataplane import maps as M
from l4lb.dataplane.loader import BuildOptions, Program


class TablesError(Exception):
    pass


@dataclass
class RealState:
    address: str
    real_id: int
    mac: str
    weight: int
    down: bool = False


@dataclass
class VipState:
    address: str
    port: int
    proto: str
    vip_id: int
    mode: str = "dr"          # dr | tun
    hash: str = "5tuple"      # 5tuple | source
    ring_size: int = maglev.DEFAULT_RING_SIZE
    all_down: str = "keep"    # keep | drop
    slot: int = 0             # 0/1: which of the VIP's two ring slots is live
    reals: dict[str, RealState] = field(default_factory=dict)
    # Reals deleted while flows may still use them: out of the ring, but their id
    # stays programmed so open connections carry on (like IPVS's trash list)
    # until collect_retired() finds no conn entry naming them.
    retired: dict[str, RealState] = field(default_factory=dict)

    @property
    def key(self) -> str:
        a = ipaddress.ip_address(self.address)
        host = f"[{a}]" if a.version == 6 else str(a)
        return f"{host}:{self.port}/{self.proto}"

    @property
    def flags(self) -> int:
        return (M.VIP_F_TUN if self.mode == "tun" else 0) | \
            (M.VIP_F_HASH_SRC if self.hash == "source" else 0)


@functools.lru_cache(maxsize=65536)
def canon(addr) -> str:
    return str(ipaddress.ip_address(addr))


class ServiceTables:
    """Desired VIP/real state in, map updates out."""

    def __init__(self, prog: Program, opts: BuildOptions, state_file: str | None = None):
        self.prog = prog
        self.opts = opts
        self.state_file = Path(state_file) if state_file else None
        self.vips: dict[str, VipState] = {}
        self._vips_map = prog.map("vips")
        self._vip_by_id = prog.map("vip_by_id")
        self._addrs_map = prog.map("vip_addrs")
        self._reals_map = prog.map("reals")
        self._rings_map = prog.map("rings")
        self._config_map = prog.map("config")
        self._stats_vip = prog.map("stats_vip")
        self._stats_real = prog.map("stats_real")
        self._stats_global = prog.map("stats_global")
        self.conns = prog.map("conns")
        self._free_vip_ids = deque(range(opts.max_vips))
        self._free_real_ids = deque(range(1, opts.max_reals))  # 0 = "no real"
        self._last_ring: dict[str, object] = {}
        self._written: set[int] = set()  # real ids whose map entry this process wrote
        self._published: set[int] = set()  # VIP ids whose ring this process wrote
        self._slot_rings: dict[int, np.ndarray] = {}  # what each ring slot holds
        self._filter_slots: set[int] = set()  # vip_filter slots set to 1
        if self.state_file and self.state_file.exists():
            self._restore()

    # ----------------------------------------------------------- persistence
    def _restore(self) -> None:
        """Take over ids from a previous run whose pinned maps we reopened."""
        data = json.loads(self.state_file.read_text())
        for v in data.get("vips", []):
            reals = {r["address"]: RealState(**r) for r in v.pop("reals")}
            retired = {r["address"]: RealState(**r) for r in v.pop("retired", [])}
            vs = VipState(**v, reals=reals, retired=retired)
            self.vips[vs.key] = vs
            self._free_vip_ids.remove(vs.vip_id)
            for r in [*reals.values(), *retired.values()]:
                self._free_real_ids.remove(r.real_id)
        self._sync_vip_addrs()

    def _save(self) -> None:
        if not self.state_file:
            return
        data = {"layout": M.LAYOUT_VERSION,
                "vips": [dict(v.__dict__, reals=[r.__dict__ for r in v.reals.values()],
                              retired=[r.__dict__ for r in v.retired.values()])
                         for v in self.vips.values()]}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.state_file)

    # --------------------------------------------------------------- config
    def set_config(self, tun_src4: str | None = None, tun_src6: str | None = None,
                   flow_events: bool = False, conn_timeout_s: float = 0) -> None:
        c = M.LbConfig()
        if tun_src4:
            c.tun_src4[:] = ipaddress.IPv4Address(tun_src4).packed
        if tun_src6:
            c.tun_src6[:] = ipaddress.IPv6Address(tun_src6).packed
        c.flags = M.CFG_F_FLOW_EVENTS if flow_events else 0
        c.conn_timeout_ns = int(conn_timeout_s * 1e9)
        self._config_map[ct.c_uint32(0)] = c

    def set_own_macs(self, macs: dict[int, str]) -> None:
        """Our MAC per ifindex: VIP frames for other MACs are left alone (XDP_PASS)."""
        table = self.prog.map("own_macs")
        for idx in range(M.MAX_IFINDEX):  # arrays cannot be cleared: zero every slot
            if table[ct.c_uint32(idx)].valid and idx not in macs:
                table[ct.c_uint32(idx)] = M.OwnMac()
        for idx, mac in macs.items():
            if idx >= M.MAX_IFINDEX:
                continue  # the program skips the check for such interfaces
            v = M.OwnMac(valid=1)
            v.mac[:] = M.mac_bytes(mac)
            table[ct.c_uint32(idx)] = v

    # ----------------------------------------------------------------- VIPs
    def upsert_vip(self, address, port: int, proto: str = "tcp", mode: str = "dr",
                   hash: str = "5tuple", ring_size: int = maglev.DEFAULT_RING_SIZE,
                   all_down: str = "keep") -> VipState:
        if ring_size > self.opts.ring_max:
            raise TablesError(f"ring_size {ring_size} exceeds the compiled maximum "
                              f"{self.opts.ring_max}")
        probe = VipState(canon(address), port, proto, -1)
        vs = self.vips.get(probe.key)
        if vs is None:
            if not self._free_vip_ids:
                raise TablesError(f"no free VIP slot (max {self.opts.max_vips})")
            vs = probe
            vs.vip_id = self._free_vip_ids.popleft()
            self._zero_counters(self._stats_vip, vs.vip_id)
            self.vips[vs.key] = vs
            self._sync_vip_addrs()
        params = (mode, hash, all_down, ring_size)
        if vs.vip_id in self._published and (vs.mode, vs.hash, vs.all_down,
                                               vs.ring_size) == params:
            return vs  # nothing but reals can have changed: set_reals publishes
        vs.mode, vs.hash, vs.all_down, vs.ring_size = params
        self._publish_ring(vs)
        self._save()
        return vs

    def delete_vip(self, key: str) -> None:
        vs = self.vips.pop(key, None)
        if vs is None:
            raise TablesError(f"no VIP {key}")
        del self._vips_map[M.vip_key(vs.address, vs.port, vs.proto)]
        self._vip_by_id[ct.c_uint32(vs.vip_id)] = M.VipEntry()  # family 0: unused
        for r in [*vs.reals.values(), *vs.retired.values()]:
            self._free_real(r)
        self._free_vip_ids.append(vs.vip_id)
        self._published.discard(vs.vip_id)
        self._last_ring.pop(key, None)
        self._sync_vip_addrs()
        self._save()

    def _sync_vip_addrs(self) -> None:
        want = {canon(v.address) for v in self.vips.values()}
        # The pre-filter first, so that a new address is never filtered out.
        filt = self.prog.map("vip_filter")
        slots = {M.vip_filter_index(a) for a in want}
        for i in slots:
            filt[ct.c_uint32(i)] = ct.c_uint32(1)
        have = set()
        for k, _ in list(self._addrs_map.items()):
            have.add(str(M.addr_from16(k.addr, k.family)))
        for a in want - have:
            self._addrs_map[M.vip_addr_key(a)] = ct.c_uint32(1)
        for a in have - want:
            del self._addrs_map[M.vip_addr_key(a)]
        for i in self._filter_slots - slots:
            filt[ct.c_uint32(i)] = ct.c_uint32(0)
        self._filter_slots = slots

    # ---------------------------------------------------------------- reals
    def set_reals(self, key: str, reals: list[tuple[str, str, int]]) -> VipState:
        """Make the VIP's reals exactly `reals` = [(address, mac, weight)]; health state of
        reals that stay is kept. New rings are published atomically."""
        vs = self._vip(key)
        want = {canon(a): (mac, w) for a, mac, w in reals}
        for addr in list(vs.reals):
            if addr not in want:
                vs.retired[addr] = vs.reals.pop(addr)
        for addr, (mac, w) in want.items():
            r = vs.reals.get(addr) or vs.retired.pop(addr, None)
            if r is not None:
                vs.reals[addr] = r
            else:
                if not self._free_real_ids:
                    raise TablesError(f"no free real id (max {self.opts.max_reals - 1})")
                r = RealState(addr, self._free_real_ids.popleft(), mac, w)
                self._zero_counters(self._stats_real, r.real_id)
                vs.reals[addr] = r
            if r.mac != mac or r.real_id not in self._written:
                r.mac = mac
                self._write_real(r)
            r.weight = w
        self._publish_ring(vs)
        self._save()
        return vs

    def collect_retired(self) -> int:
        """Free the ids of deleted reals that no conn entry names any more."""
        if not any(v.retired for v in self.vips.values()):
            return 0
        used = {v.real_id for _, v in self.conns.items()}
        freed = 0
        for vs in self.vips.values():
            for addr in [a for a, r in vs.retired.items() if r.real_id not in used]:
                self._free_real(vs.retired.pop(addr))
                freed += 1
        if freed:
            self._save()
        return freed

    def set_weight(self, key: str, address, weight: int) -> None:
        r = self._real(key, address)
        r.weight = weight
        self._publish_ring(self.vips[key])
        self._save()

    def set_down(self, key: str, address, down: bool) -> bool:
        """Health state of one real; True when it changed. A down real leaves the ring and
        the data plane moves its flows (REAL_F_DOWN)."""
        r = self._real(key, address)
        if r.down == down:
            return False
        r.down = down
        self._write_real(r)
        self._publish_ring(self.vips[key])
        self._save()
        return True

    def _vip(self, key: str) -> VipState:
        try:
            return self.vips[key]
        except KeyError:
            raise TablesError(f"no VIP {key} (VIPs: {', '.join(self.vips) or 'none'})") from None

    def _real(self, key: str, address) -> RealState:
        vs = self._vip(key)
        try:
            return vs.reals[canon(address)]
        except KeyError:
            raise TablesError(f"VIP {key} has no real {address}") from None

    def _write_real(self, r: RealState) -> None:
        self._reals_map[ct.c_uint32(r.real_id)] = M.real_def(r.address, r.mac, r.down)
        self._written.add(r.real_id)

    def _free_real(self, r: RealState) -> None:
        # family 0 marks the id unused: flows still naming it are rescheduled.
        self._reals_map[ct.c_uint32(r.real_id)] = M.RealDef()
        self._written.discard(r.real_id)
        self._free_real_ids.append(r.real_id)  # FIFO: an id is reused as late as possible

    # ---------------------------------------------------------------- rings
    def ring_for(self, vs: VipState):
        live = [maglev.Backend(r.real_id, r.address, r.weight)
                for r in vs.reals.values() if not r.down]
        ring = maglev.build_ring(live, vs.ring_size)
        if vs.all_down == "keep" and vs.reals and not any(b.weight for b in live) \
                and vs.key in self._last_ring:
            # Every real down (not merely drained): keep serving from the last ring
            # rather than dropping everything, like keepalived's quorum-less default.
            if any(r.down for r in vs.reals.values()):
                return self._last_ring[vs.key]
        return ring

    def _publish_ring(self, vs: VipState) -> None:
        ring = self.ring_for(vs)
        new_slot = vs.slot ^ 1 if self._vip_present(vs) else vs.slot
        slot_index = 2 * vs.vip_id + new_slot
        base = slot_index * self.opts.ring_max
        n = len(ring)
        new = np.frombuffer(ring, dtype=np.uint32)
        old = self._slot_rings.get(slot_index)
        if old is not None and len(old) == n:
            # The idle slot holds the ring from two changes ago: rewrite only the
            # entries that differ (a weight change moves ~1-2% of them).
            idx = np.nonzero(new != old)[0].astype(np.uint32)
        else:
            idx = np.arange(n, dtype=np.uint32)
        if len(idx):
            keys = np.ascontiguousarray(idx + np.uint32(base))
            vals = np.ascontiguousarray(new[idx])
            self._rings_map.items_update_batch(
                (ct.c_uint32 * len(idx)).from_buffer(keys),
                (ct.c_uint32 * len(idx)).from_buffer(vals))
        self._slot_rings[slot_index] = new.copy()
        meta = M.VipMeta(vip_id=vs.vip_id, flags=vs.flags, ring_slot=slot_index, ring_size=n)
        key = M.vip_key(vs.address, vs.port, vs.proto)
        # One map update each flips the VIP to the complete new ring: by id
        # (established flows) and by key (new flows).
        self._vip_by_id[ct.c_uint32(vs.vip_id)] = M.VipEntry(key=key, meta=meta)
        self._vips_map[key] = meta
        vs.slot = new_slot
        self._last_ring[vs.key] = ring
        self._published.add(vs.vip_id)

    def _vip_present(self, vs: VipState) -> bool:
        try:
            self._vips_map[M.vip_key(vs.address, vs.port, vs.proto)]
            return True
        except KeyError:
            return False

    def live_ring(self, key: str) -> list[int]:
        vs = self._vip(key)
        meta = self._vips_map[M.vip_key(vs.address, vs.port, vs.proto)]
        base = meta.ring_slot * self.opts.ring_max
        return [self._rings_map[ct.c_uint32(base + i)].value for i in range(meta.ring_size)]

    # ---------------------------------------------------------------- stats
    def _zero_counters(self, table, idx: int) -> None:
        zero = table.Leaf()
        table[ct.c_uint32(idx)] = (type(zero) * len(table[ct.c_uint32(idx)]))()

    @staticmethod
    def _sum(table, idx: int) -> dict[str, int]:
        vals = table[ct.c_uint32(idx)]
        return {f: sum(getattr(v, f) for v in vals) for f in ("packets", "bytes", "new_flows")}

    def vip_counters(self, key: str) -> dict[str, int]:
        return self._sum(self._stats_vip, self._vip(key).vip_id)

    def real_counters(self, key: str, address) -> dict[str, int]:
        return self._sum(self._stats_real, self._real(key, address).real_id)

    def reset_global_counters(self) -> None:
        for reason in M.StatReason:
            self._zero_counters(self._stats_global, int(reason))

    def global_counters(self) -> dict[str, int]:
        out = {}
        for reason in M.StatReason:
            vals = self._stats_global[ct.c_uint32(reason)]
            out[reason.name.lower()] = sum(int(v) for v in vals)
        return out

    # ----------------------------------------------------------- conn table
    def real_by_id(self) -> dict[int, tuple[str, str]]:
        """real id -> (VIP key, real address)."""
        return {r.real_id: (v.key, r.address) for v in self.vips.values()
                for r in [*v.reals.values(), *v.retired.values()]}

    def conn_entries(self, limit: int | None = None):
        """Yield (client, cport, vip, vport, proto, real id) from the conn table."""
        n = 0
        for k, v in self.conns.items():
            src, sport, dst, dport, proto = M.flow_tuple(k)
            yield (str(src), sport, str(dst), dport, M.PROTO_NAME.get(proto, str(proto)),
                   v.real_id)
            n += 1
            if limit is not None and n >= limit:
                return

    def install_conn(self, src, sport, dst, dport, proto, real_id: int, vip_id: int,
                     now_ns: int) -> None:
        self.conns[M.flow_key(src, sport, dst, dport, proto)] = M.ConnVal(
            real_id=real_id, vip_id=vip_id, last_seen_ns=now_ns)

    def conn_count(self) -> int:
        return sum(1 for _ in self.conns.keys())

    # The conn table in bulk (sync): raw FlowKey / ConnVal records, CONN_KEY and
    # CONN_VAL below, one bpf(2) call per batch instead of one per entry.
    def conn_batches(self, batch: int = 1024):
        """Walk the conn table with BPF_MAP_LOOKUP_BATCH, ``batch`` entries per call.

        Yields ``(keys, values, n)``: n packed FlowKey records and n ConnVal records
        (bytes). Lazy: the caller may stop any time. Entries added or removed while
        the walk runs may be missed or seen twice (a hash walk, by bucket).
        """
        yield from _lookup_batches(self.conns.map_fd, CONN_KEY.size, CONN_VAL.size, batch)

    def install_conns(self, keys: bytes, values: bytes, overwrite: bool = True) -> int:
        """Write packed FlowKey/ConnVal records (as conn_batches yields them) to the
        conn table; returns how many were written. ``overwrite`` False leaves existing
        entries alone (BPF_NOEXIST, one call per entry: for small batches only)."""
        n = len(keys) // CONN_KEY.size
        if n * CONN_KEY.size != len(keys) or n * CONN_VAL.size != len(values):
            raise ValueError("keys/values are not whole FlowKey/ConnVal records")
        if n == 0:
            return 0
        fd = self.conns.map_fd
        if overwrite:
            _update_batch(fd, keys, values, n)
            return n
        return _update_noexist(fd, keys, values, CONN_KEY.size, CONN_VAL.size)


def coarse_now_ns() -> int:
    """The clock bpf_ktime_get_coarse_ns reads (CLOCK_MONOTONIC_COARSE)."""
    return time.clock_gettime_ns(6)  # CLOCK_MONOTONIC_COARSE (not in the time module)


# --------------------------------------------------------------- bulk conn-table I/O
# struct flow_key and struct conn_val as bytes: addresses zero-padded to 16 bytes,
# ports in network order (as the data plane stores them), family 4/6.
CONN_KEY = struct.Struct("!16s16sHHBB2x")
CONN_VAL = struct.Struct("=IIQ")  # real_id, vip_id, last_seen_ns (host order)
assert CONN_KEY.size == ct.sizeof(M.FlowKey) and CONN_VAL.size == ct.sizeof(M.ConnVal)

# bcc's own batch helpers read the whole map in one go and share one variable
# between the batch token and the count; these call bpf(2) directly.
_SYS_BPF = 321  # x86_64
_BPF_MAP_UPDATE_ELEM, _BPF_MAP_LOOKUP_BATCH, _BPF_MAP_UPDATE_BATCH = 2, 24, 26
_BPF_NOEXIST = 1
_libc = ct.CDLL(None, use_errno=True)
_libc.syscall.restype = ct.c_long


class _BatchAttr(ct.Structure):
    _fields_ = [("in_batch", ct.c_uint64), ("out_batch", ct.c_uint64), ("keys", ct.c_uint64),
                ("values", ct.c_uint64), ("count", ct.c_uint32), ("map_fd", ct.c_uint32),
                ("elem_flags", ct.c_uint64), ("flags", ct.c_uint64)]


class _ElemAttr(ct.Structure):
    _fields_ = [("map_fd", ct.c_uint32), ("_pad", ct.c_uint32), ("key", ct.c_uint64),
                ("value", ct.c_uint64), ("flags", ct.c_uint64)]


def _bpf(cmd: int, attr) -> int:
    """bpf(2); returns 0 or the errno."""
    if _libc.syscall(_SYS_BPF, cmd, ct.byref(attr), ct.sizeof(attr)) == 0:
        return 0
    return ct.get_errno()


def _lookup_batches(fd: int, ksize: int, vsize: int, batch: int):
    keys = ct.create_string_buffer(ksize * batch)
    vals = ct.create_string_buffer(vsize * batch)
    tok_in, tok_out = ct.c_uint64(0), ct.c_uint64(0)  # hash maps: a u32 bucket index
    first = True
    while True:
        attr = _BatchAttr(in_batch=0 if first else ct.addressof(tok_in),
                          out_batch=ct.addressof(tok_out), keys=ct.addressof(keys),
                          values=ct.addressof(vals), count=batch, map_fd=fd)
        err = _bpf(_BPF_MAP_LOOKUP_BATCH, attr)
        n = attr.count
        if err == errno.ENOSPC and n == 0:  # one bucket holds more than `batch` entries
            batch *= 2
            keys = ct.create_string_buffer(ksize * batch)
            vals = ct.create_string_buffer(vsize * batch)
            continue
        if err not in (0, errno.ENOENT):
            raise OSError(err, f"BPF_MAP_LOOKUP_BATCH: {os.strerror(err)}")
        if n:
            yield ct.string_at(keys, ksize * n), ct.string_at(vals, vsize * n), n
        if err == errno.ENOENT:  # the walk is complete
            return
        tok_in.value = tok_out.value
        first = False


def _update_batch(fd: int, keys: bytes, values: bytes, n: int) -> None:
    kbuf = ct.create_string_buffer(keys, len(keys))
    vbuf = ct.create_string_buffer(values, len(values))
    attr = _BatchAttr(keys=ct.addressof(kbuf), values=ct.addressof(vbuf), count=n, map_fd=fd)
    err = _bpf(_BPF_MAP_UPDATE_BATCH, attr)
    if err:
        raise OSError(err, f"BPF_MAP_UPDATE_BATCH: {os.strerror(err)} after {attr.count} of {n}")


def _update_noexist(fd: int, keys: bytes, values: bytes, ksize: int, vsize: int) -> int:
    kbuf = ct.create_string_buffer(keys, len(keys))
    vbuf = ct.create_string_buffer(values, len(values))
    kbase, vbase = ct.addressof(kbuf), ct.addressof(vbuf)
    written = 0
    for i in range(len(keys) // ksize):
        attr = _ElemAttr(map_fd=fd, key=kbase + i * ksize, value=vbase + i * vsize,
                         flags=_BPF_NOEXIST)
        err = _bpf(_BPF_MAP_UPDATE_ELEM, attr)
        if err == 0:
            written += 1
        elif err != errno.EEXIST:
            raise OSError(err, f"BPF_MAP_UPDATE_ELEM: {os.strerror(err)}")
    return written


__all__ = ["ServiceTables", "TablesError", "VipState", "RealState", "coarse_now_ns", "socket",
           "CONN_KEY", "CONN_VAL"]
