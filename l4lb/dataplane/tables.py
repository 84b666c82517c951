"""Service tables: VIPs, reals and Maglev rings as the XDP program sees them.

The id spaces (VIP ids, ring slots, real ids) and every decision about them are
the planner's (plan.py: pure, no maps, unit-tested without root); ServiceTables is
the thin writer that carries its plans out on the maps of the loaded Program, and
reads the maps back (restart, counters, the conn table). Real ids are per (VIP, real address) and stable for the life
of that real, because the conn table records them. The id assignment is kept in
a JSON file beside the pinned maps, so a restarted control plane reattaches
with the same ids and existing flows keep their reals.

Crash consistency: tables.json always names at least every id the maps use. Ids
are saved before the maps refer to them and freed in the maps before they leave
the file; a new ring is written to the idle slot, saved, then flipped live. A
restart reads the live slot from the maps themselves (and completes a flip cut
in half), and maps that tables.json does not describe are reset (clean start).

Conn-table walks (conn_entries, referenced_real_ids, conn_batches) block: they
are for a thread, go a bounded slice per bpf(2) call, and stop early when they can.
"""

from __future__ import annotations

import ctypes as ct
import functools
import ipaddress
import json
import logging
import os
import socket
import struct
import time
from array import array
from pathlib import Path

import numpy as np

from l4lb import maglev
from l4lb.dataplane import bpfsys
from l4lb.dataplane import maps as M
from l4lb.dataplane.loader import BuildOptions, Program
from l4lb.dataplane.plan import Plan, Planner, RealState, TablesError, TableState, VipState, canon

log = logging.getLogger("l4lb.tables")

WALK_BATCH = 4096  # conn entries per bpf(2) call of a walk (~1 ms each)
_FLOW_FIELDS = ("packets", "bytes", "new_flows")
_REAL_FIELDS = tuple(f for f, _ in M.RealCounters._fields_)
STATE_SIZES = ("max_vips", "max_reals", "ring_max", "conn_table_size", "per_cpu_lru")
# enum bpf_map_type values of the maps a clean start knows how to empty.
_BPF_HASH, _BPF_ARRAY, _BPF_PERCPU_HASH, _BPF_PERCPU_ARRAY = 1, 2, 5, 6
_BPF_LRU_HASH, _BPF_LRU_PERCPU_HASH = 9, 10


class ServiceTables:
    """Desired VIP/real state in, map updates out (planned by self.planner)."""

    def __init__(self, prog: Program, opts: BuildOptions, state_file: str | None = None):
        self.prog = prog
        self.opts = opts
        self.state_file = Path(state_file) if state_file else None
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
        # ids, slots, retired reals, the ring memo: the planner's (no maps in it)
        self.state = TableState.empty(opts.max_vips, opts.max_reals, opts.ring_max)
        self.planner = Planner(self.state)
        self.vips: dict[str, VipState] = self.state.vips
        self._slot_rings: dict[int, np.ndarray] = {}  # what each ring slot holds
        self._global_base: dict[str, int] = {}  # real-derived reasons at the last reset
        self._real_json: dict[tuple, str] = {}  # a real's fields -> its tables.json record
        # Why this start reset the maps (None: restored, or a first start).
        self.clean_start_reason: str | None = None
        self._restore_or_reset()

    # ----------------------------------------------------------- persistence
    def _restore_or_reset(self) -> None:
        """Take over ids from a previous run whose pinned maps we reopened; maps that
        tables.json does not describe are reset rather than reused with other ids."""
        vips, why = self._load_state()
        if vips is not None:
            try:
                why = self._mismatch(vips)
            except (ValueError, KeyError, TypeError, OverflowError) as e:  # a bad value in it
                why = f"{self.state_file} is unreadable ({type(e).__name__}: {e})"
            else:
                if why is None:
                    self._adopt(vips)
                    return
                why = f"{self.state_file} does not match the maps: {why}"
        if self._maps_in_use():
            self._start_clean(why)
        elif why and self.state_file and self.state_file.exists():
            log.warning("ignoring %s (the maps are empty anyway)", why)

    def _load_state(self) -> tuple[list[VipState] | None, str]:
        """The VIPs of tables.json, or None and why not."""
        if not self.state_file or not self.state_file.exists():
            return None, f"{self.state_file or 'tables.json'} is missing"
        try:
            data = json.loads(self.state_file.read_text())
            if data.get("layout") != M.LAYOUT_VERSION:
                return None, (f"{self.state_file} is for layout {data.get('layout')}, "
                              f"the maps are layout {M.LAYOUT_VERSION}")
            sizes = data.get("sizes")
            if sizes is not None:  # files of older versions have no sizes
                want = {k: getattr(self.opts, k) for k in STATE_SIZES}
                if sizes != want:
                    return None, f"{self.state_file} is for sizes {sizes}, the maps have {want}"
            vips = []
            for v in data["vips"]:
                reals = {r["address"]: RealState(**r) for r in v.pop("reals")}
                retired = {r["address"]: RealState(**r) for r in v.pop("retired", [])}
                vips.append(VipState(**v, reals=reals, retired=retired))
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            return None, f"{self.state_file} is unreadable ({type(e).__name__}: {e})"
        return vips, ""

    def _mismatch(self, vips: list[VipState]) -> str | None:
        """Why these VIPs cannot be what the maps hold, or None. The file may name more
        than the maps (saved before a write that never happened), never less."""
        by_id: dict[int, VipState] = {}
        real_addr: dict[int, str] = {}
        for vs in vips:
            if not 0 <= vs.vip_id < self.opts.max_vips or vs.vip_id in by_id:
                return f"VIP {vs.key}: id {vs.vip_id} out of range or used twice"
            if vs.slot not in (0, 1):
                return f"VIP {vs.key}: ring slot {vs.slot} is not 0 or 1"
            by_id[vs.vip_id] = vs
            for r in [*vs.reals.values(), *vs.retired.values()]:
                if not 1 <= r.real_id < self.opts.max_reals or r.real_id in real_addr:
                    return f"real {r.address} of {vs.key}: id {r.real_id} out of range or used twice"
                real_addr[r.real_id] = canon(r.address)
        for i in range(self.opts.max_vips):
            e = self._vip_by_id[ct.c_uint32(i)]
            if not e.key.family:
                continue
            vs = by_id.get(i)
            if vs is None or bytes(e.key) != bytes(M.vip_key(vs.address, vs.port, vs.proto)):
                return f"vip_by_id[{i}] holds a VIP that the file does not give id {i}"
            if e.meta.ring_slot - 2 * i not in (0, 1):
                return f"vip_by_id[{i}] points at ring slot {e.meta.ring_slot}, not its own"
        keys = {bytes(M.vip_key(v.address, v.port, v.proto)): v for v in vips}
        for k, meta in self._vips_map.items():
            vs = keys.get(bytes(k))
            if vs is None or meta.vip_id != vs.vip_id or meta.ring_slot - 2 * vs.vip_id not in (0, 1):
                return f"the vips map holds {M.addr_from16(k.addr, k.family)} port " \
                       f"{socket.ntohs(k.port)} as id {meta.vip_id}, unlike the file"
        rsize = ct.sizeof(M.RealDef)
        for keys_b, vals_b, n in bpfsys.lookup_batches(self._reals_map.map_fd, 4, rsize, 4096):
            for (rid,), off in zip(struct.iter_unpack("=I", keys_b), range(0, n * rsize, rsize),
                                   strict=True):
                r = M.RealDef.from_buffer_copy(vals_b, off)
                if r.family and real_addr.get(rid) != canon(M.addr_from16(r.addr, r.family)):
                    return (f"reals[{rid}] is {M.addr_from16(r.addr, r.family)}, the file says "
                            f"{real_addr.get(rid, 'nothing')}")
        return None

    def _adopt(self, vips: list[VipState]) -> None:
        self.state.adopt(vips)
        for vs in vips:
            if self._live_slot_from_maps(vs):
                # what "all_down = keep" serves from, as the previous run did
                self.state.last_ring[vs.key] = array("I", self.live_ring(vs.key))
        self.state.addrs = {str(M.addr_from16(k.addr, k.family))
                            for k, _ in list(self._addrs_map.items())}
        self._apply(self.planner.sync_addrs())

    @property
    def _last_ring(self) -> dict:
        return self.state.last_ring

    @_last_ring.setter
    def _last_ring(self, rings: dict) -> None:
        self.state.last_ring = rings

    def _live_slot_from_maps(self, vs: VipState) -> bool:
        """The live ring slot is the one the maps name, whatever the file says (a crash
        may have come between saving and flipping). A flip cut in half (vip_by_id
        written, the vips map not yet) is completed: both slots hold whole rings."""
        by_id = self._vip_by_id[ct.c_uint32(vs.vip_id)]
        key = M.vip_key(vs.address, vs.port, vs.proto)
        try:
            meta = self._vips_map[key]
        except KeyError:
            meta = None
        if by_id.key.family:
            live = by_id.meta
            if meta is None or bytes(meta) != bytes(live):
                # a flip (or a delete) cut between its two map writes
                log.info("VIP %s: completing a ring flip a stop interrupted", vs.key)
                self._vips_map[key] = live
        elif meta is not None:  # a publish never gets here; a delete removes vips first
            live = meta
            self._vip_by_id[ct.c_uint32(vs.vip_id)] = M.VipEntry(key=key, meta=meta)
        else:
            return False  # never published: no slot is live
        vs.slot = live.ring_slot - 2 * vs.vip_id
        return True

    def _maps_in_use(self) -> bool:
        if len(self._vips_map.items()):
            return True
        if any(self._vip_by_id[ct.c_uint32(i)].key.family for i in range(self.opts.max_vips)):
            return True
        rsize = ct.sizeof(M.RealDef)
        for _, vals, n in bpfsys.lookup_batches(self._reals_map.map_fd, 4, rsize, 4096):
            fam = M.RealDef.family.offset
            if any(vals[o + fam] for o in range(0, n * rsize, rsize)):
                return True
        for _ in bpfsys.lookup_batches(self.conns.map_fd, CONN_KEY.size, CONN_VAL.size, 8):
            return True
        return False

    def _start_clean(self, why: str) -> None:
        log.warning("starting with empty maps (conn table included): %s", why)
        self.clean_start_reason = why
        names = (sorted(os.listdir(self.opts.pin_dir)) if self.opts.pin_dir
                 and os.path.isdir(self.opts.pin_dir) else _RESET_MAPS)
        for name in names:
            # Ring slots are skipped (33 MB by default): lookups reach a slot only
            # through a VIP naming it, and a slot is written whole before that.
            if name != "rings":
                _empty_map(self.prog.map(name))
        self._save()

    def _save(self) -> None:
        """Write tables.json atomically (a whole file renamed into place).

        Not fsynced: the file must outlive the process, not the machine. A killed
        process leaves its writes in the page cache; a machine that goes down takes
        the pinned maps the file describes with it (bpffs lives in memory), and the
        next start finds no maps to match. (fsync cost 2-8 ms of every change.)"""
        if not self.state_file:
            return
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        with open(tmp, "w") as f:
            f.write(self._state_json())
        os.replace(tmp, self.state_file)

    def _state_json(self) -> str:
        """tables.json's text: what json.dumps(compact) makes of the VIPs, reals and
        retired reals, each real's record kept from the last save while its fields are
        the same (a change rewrites one real of 1,000: ~0.3 ms instead of ~1)."""
        enc, cache = _JSON, self._real_json
        if len(cache) > 2 * sum(len(v.reals) + len(v.retired) for v in self.vips.values()) + 4096:
            cache.clear()

        def real(r) -> str:
            k = (r.address, r.real_id, r.mac, r.weight, r.down)
            text = cache.get(k)
            if text is None:
                text = cache[k] = enc(r.__dict__)
            return text

        vips = []
        for v in self.vips.values():
            head = enc({k: x for k, x in v.__dict__.items() if k not in ("reals", "retired")})
            vips.append(head[:-1] + ',"reals":[' + ",".join([real(r) for r in v.reals.values()])
                        + '],"retired":[' + ",".join([real(r) for r in v.retired.values()])
                        + "]}")
        return ('{"layout":' + enc(M.LAYOUT_VERSION) + ',"sizes":'
                + enc({k: getattr(self.opts, k) for k in STATE_SIZES})
                + ',"vips":[' + ",".join(vips) + "]}")

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
    # The planner (plan.py) decides every id, slot and write; these carry its plans out.
    def upsert_vip(self, address, port: int, proto: str = "tcp", mode: str = "dr",
                   hash: str = "5tuple", ring_size: int = maglev.DEFAULT_RING_SIZE,
                   all_down: str = "keep") -> VipState:
        return self._apply(self.planner.upsert_vip(address, port, proto, mode=mode, hash=hash,
                                                   ring_size=ring_size, all_down=all_down))

    def delete_vip(self, key: str) -> None:
        self._apply(self.planner.delete_vip(key))

    # ---------------------------------------------------------------- reals
    def set_reals(self, key: str, reals: list[tuple[str, str, int]]) -> VipState:
        """Make the VIP's reals exactly `reals` = [(address, mac, weight)]; health state of
        reals that stay is kept. New rings are published atomically. Too few free real
        ids: refused before anything changes."""
        return self._apply(self.planner.set_reals(key, reals, time.monotonic()))

    def referenced_real_ids(self, batch: int = WALK_BATCH) -> RealIds:
        """The real ids the conn table names. Blocking, a walk of the whole table: run it
        in a thread, without the daemon's lock, and pass the result to collect_retired."""
        ids = RealIds()
        ids.started = time.monotonic()
        for _, vals, n in self.conn_batches(batch):
            ids.update(np.unique(np.frombuffer(vals, CONN_VAL_DTYPE, n)["real_id"]).tolist())
        # A TCP flow between its SYN and its ACK waits in embryos with its real id: a
        # freed id reused meanwhile would send the flow's ACK to another real.
        embryos = self.prog.map("embryos")
        for _, vals, n in bpfsys.lookup_batches(embryos.map_fd, 4, EMBRYO_DTYPE.itemsize, batch):
            rec = np.frombuffer(vals, EMBRYO_DTYPE, n)
            ids.update(np.unique(rec["real_id"][rec["family"] != 0]).tolist())
        return ids

    def collect_retired(self, referenced: set[int] | None = None) -> int:
        """Free the ids of deleted reals that no conn entry names any more. Quick when
        ``referenced`` (from referenced_real_ids) is given; else it walks the table.
        A real retired after that walk began is kept for the next round: the walk
        may have passed its newest flows."""
        if not any(v.retired for v in self.vips.values()):
            return 0
        if referenced is None:
            referenced = self.referenced_real_ids()
        return self._apply(self.planner.collect_retired(
            referenced, getattr(referenced, "started", None)))

    def set_weight(self, key: str, address, weight: int) -> None:
        self._apply(self.planner.set_weight(key, address, weight))

    def set_down(self, key: str, address, down: bool) -> bool:
        """Health state of one real; True when it changed. A down real leaves the ring and
        the data plane moves its flows (REAL_F_DOWN)."""
        return self._apply(self.planner.set_down(key, address, down))

    def _vip(self, key: str) -> VipState:
        return self.planner.vip(key)

    def _real(self, key: str, address) -> RealState:
        return self.planner.real(key, address)

    def ring_for(self, vs: VipState):
        return self.planner.ring_for(vs)

    # ------------------------------------------------------------ the writer
    def _apply(self, plan: Plan):
        """Carry out a plan's writes in order; its result when all succeeded."""
        try:
            for w in plan.writes:
                getattr(self, "_w_" + w.op)(*w.args)
        except BaseException:
            for f in plan.abort:
                f()
            raise
        for f in plan.commit:
            f()
        return plan.result

    def _w_filter(self, index: int, value: int) -> None:
        self.prog.map("vip_filter")[ct.c_uint32(index)] = ct.c_uint32(value)

    def _w_addr_add(self, addr: str) -> None:
        self._addrs_map[M.vip_addr_key(addr)] = ct.c_uint32(1)

    def _w_addr_del(self, addr: str) -> None:
        try:
            del self._addrs_map[M.vip_addr_key(addr)]
        except KeyError:
            pass  # already gone: what the plan wants

    def _w_zero_vip_stats(self, vip_id: int) -> None:
        self._zero_counters(self._stats_vip, vip_id)

    def _w_zero_real_stats(self, real_id: int) -> None:
        self._zero_counters(self._stats_real, real_id)

    def _w_ring(self, slot_index: int, ring) -> None:
        self._write_slot(slot_index, ring)

    def _w_save(self) -> None:
        self._save()

    def _w_real(self, r: RealState) -> None:
        self._write_real(r)

    def _w_flip(self, vs: VipState, ring_size: int) -> None:
        self._flip(vs, ring_size)

    def _w_vip_del(self, vs: VipState) -> None:
        del self._vips_map[M.vip_key(vs.address, vs.port, vs.proto)]
        self._vip_by_id[ct.c_uint32(vs.vip_id)] = M.VipEntry()  # family 0: unused

    def _w_free_real(self, real_id: int, vip_id: int) -> None:
        # family 0 marks the id unused: flows still naming it are rescheduled.
        self._reals_map[ct.c_uint32(real_id)] = M.RealDef()
        self._fold_real_counters(real_id, vip_id)

    def _write_real(self, r: RealState) -> None:
        self._reals_map[ct.c_uint32(r.real_id)] = M.real_def(r.address, r.mac, r.down)
        self.state.written.add(r.real_id)

    # ---------------------------------------------------------------- rings

    def _write_slot(self, slot_index: int, ring) -> None:
        """Fill one ring slot; only ever called for a slot no lookup reads."""
        base = slot_index * self.opts.ring_max
        new = np.frombuffer(ring, dtype=np.uint32)
        n = len(new)
        old = self._slot_rings.get(slot_index)
        self._slot_rings.pop(slot_index, None)  # unknown until the write completes
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

    def _flip(self, vs: VipState, ring_size: int) -> None:
        """One map update each flips the VIP to the complete new ring: by id
        (established flows) first, then by key (new flows)."""
        meta = M.VipMeta(vip_id=vs.vip_id, flags=vs.flags, ring_slot=2 * vs.vip_id + vs.slot,
                         ring_size=ring_size)
        key = M.vip_key(vs.address, vs.port, vs.proto)
        self._vip_by_id[ct.c_uint32(vs.vip_id)] = M.VipEntry(key=key, meta=meta)
        self._vips_map[key] = meta

    def live_ring(self, key: str) -> list[int]:
        """The ring the data plane uses for the VIP, read from the maps (one syscall)."""
        vs = self._vip(key)
        meta = self._vips_map[M.vip_key(vs.address, vs.port, vs.proto)]
        base = meta.ring_slot * self.opts.ring_max
        out: list[int] = []
        if not meta.ring_size:
            return out
        for _, vals, n in bpfsys.lookup_batches(self._rings_map.map_fd, 4, 4, meta.ring_size,
                                                start=base):
            out.extend(np.frombuffer(vals, "=u4", n).tolist())
            break
        return out[:meta.ring_size]

    # ---------------------------------------------------------------- stats
    # The data plane touches one per-CPU record per packet, the real's (RealCounters).
    # A VIP's counters are the sum of its reals' (live and retired: a real id belongs to
    # one VIP for its life) plus stats_vip, which keeps what its freed reals had counted;
    # the global conn_hit / tx_dr / tx_tun likewise (stats_global keeps the freed part).
    # Only user space writes those stats_vip and stats_global entries: no update races.
    def _zero_counters(self, table, idx: int) -> None:
        zero = table.Leaf()
        table[ct.c_uint32(idx)] = (type(zero) * len(table[ct.c_uint32(idx)]))()

    @staticmethod
    def _sum(table, idx: int, fields=_FLOW_FIELDS) -> dict[str, int]:
        vals = table[ct.c_uint32(idx)]
        return {f: sum(getattr(v, f) for v in vals) for f in fields}

    def _real_sums(self, ids) -> np.ndarray:
        """Per-CPU-summed RealCounters of `ids`, one row each (fields as in the struct)."""
        ids = list(ids)
        if len(ids) <= 64:  # a lookup each: a small footprint (bench/pps checks per chunk)
            rows = [[sum(getattr(v, f) for v in self._stats_real[ct.c_uint32(i)])
                     for f in _REAL_FIELDS] for i in ids]
            return np.array(rows, dtype=np.uint64).reshape(len(ids), len(_REAL_FIELDS))
        per_cpu = ct.sizeof(self._stats_real.Leaf) // ct.sizeof(M.RealCounters)
        everything = np.zeros((self._stats_real.max_entries, len(_REAL_FIELDS)), np.uint64)
        for keys, vals, n in bpfsys.lookup_batches(self._stats_real.map_fd, 4,
                                                   ct.sizeof(self._stats_real.Leaf), 1024):
            idx = np.frombuffer(keys, np.uint32, n)
            rec = np.frombuffer(vals, np.uint64).reshape(n, per_cpu, len(_REAL_FIELDS))
            everything[idx] = rec.sum(axis=1)
        return everything[np.array(ids, dtype=np.int64)]

    def _fold_real_counters(self, real_id: int, vip_id: int) -> None:
        """Before an id is freed (and later zeroed for its next real): what it counted
        moves to its VIP's stats_vip entry and to the global reasons it stands for."""
        got = dict(zip(_REAL_FIELDS, self._real_sums([real_id])[0].tolist(), strict=True))
        if not any(got.values()):
            return
        vals = self._stats_vip[ct.c_uint32(vip_id)]
        for f in _FLOW_FIELDS:
            setattr(vals[0], f, getattr(vals[0], f) + got[f])
        self._stats_vip[ct.c_uint32(vip_id)] = vals
        for name in M.REAL_REASONS:
            k = ct.c_uint32(int(M.StatReason[name.upper()]))
            g = self._stats_global[k]
            g[0] += got[name]
            self._stats_global[k] = g

    def _vip_real_ids(self, vs: VipState) -> list[int]:
        return [r.real_id for r in [*vs.reals.values(), *vs.retired.values()]]

    def vip_counters(self, key: str) -> dict[str, int]:
        vs = self._vip(key)
        out = self._sum(self._stats_vip, vs.vip_id)
        ids = self._vip_real_ids(vs)
        if ids:
            sums = self._real_sums(ids).sum(axis=0)
            for j, f in enumerate(_REAL_FIELDS):
                if f in out:
                    out[f] += int(sums[j])
        return out

    def real_counters(self, key: str, address) -> dict[str, int]:
        return self._sum(self._stats_real, self._real(key, address).real_id)

    def _real_reason_sums(self) -> dict[str, int]:
        ids = [i for vs in self.vips.values() for i in self._vip_real_ids(vs)]
        sums = self._real_sums(ids).sum(axis=0) if ids else np.zeros(len(_REAL_FIELDS))
        return {f: int(sums[_REAL_FIELDS.index(f)]) for f in M.REAL_REASONS}

    def reset_global_counters(self) -> None:
        """Zero the global counters (as seen by global_counters(); per-real and per-VIP
        counters stay)."""
        for reason in M.StatReason:
            self._zero_counters(self._stats_global, int(reason))
        self._global_base = self._real_reason_sums()

    def global_counters(self) -> dict[str, int]:
        out = {}
        for reason in M.StatReason:
            vals = self._stats_global[ct.c_uint32(reason)]
            out[reason.name.lower()] = sum(int(v) for v in vals)
        for f, v in self._real_reason_sums().items():
            out[f] += v - self._global_base.get(f, 0)
        return out

    # ----------------------------------------------------------- conn table
    def real_by_id(self) -> dict[int, tuple[str, str]]:
        """real id -> (VIP key, real address)."""
        return {r.real_id: (v.key, r.address) for v in self.vips.values()
                for r in [*v.reals.values(), *v.retired.values()]}

    def conn_entries(self, limit: int | None = None, want=None, batch: int = WALK_BATCH,
                     stats: dict | None = None) -> list[tuple]:
        """(client, cport, vip, vport, proto, real id) of the conn table's entries.

        At most ``limit`` of them (None: all); only the flows of ``want`` = (VIP address,
        port, proto) when given, port 0 matching every port. Blocking: run it in a thread.
        Reads ``batch`` entries per bpf(2) call and stops as soon as ``limit`` matched;
        ``stats``, a dict, gets how many slices and entries were read.
        """
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                  or limit < 0):
            raise ValueError(f"limit must be a whole number >= 0, not {limit!r}")
        match = _flow_filter(want)
        out: list[tuple] = []
        slices = read = 0
        if limit != 0:
            for keys, vals, n in self.conn_batches(batch):
                slices, read = slices + 1, read + n
                idx = None if match is None else \
                    np.flatnonzero(match(np.frombuffer(keys, FLOW_KEY_DTYPE, n))).tolist()
                if limit is not None and (n if idx is None else len(idx)) > limit - len(out):
                    idx = (range(n) if idx is None else idx)[:limit - len(out)]
                out.extend(_conn_rows(keys, vals, n, idx))
                if limit is not None and len(out) >= limit:
                    break
        if stats is not None:
            stats.update(slices=slices, entries=read)
        return out

    def install_conn(self, src, sport, dst, dport, proto, real_id: int, vip_id: int,
                     now_ns: int) -> None:
        self.conns[M.flow_key(src, sport, dst, dport, proto)] = M.ConnVal(
            real_id=real_id, vip_id=vip_id, last_seen_ns=now_ns)

    def conn_count(self) -> int:
        """Entries in the conn table (a batch walk: blocking, for a thread)."""
        try:
            return sum(n for _, _, n in self.conn_batches())
        except OSError:  # a kernel without batch lookups (before 5.6): key by key
            return sum(1 for _ in self.conns.keys())

    # The conn table in bulk (sync, census): raw FlowKey / ConnVal records, CONN_KEY
    # and CONN_VAL below, one bpf(2) call per batch instead of one per entry.
    def conn_batches(self, batch: int = WALK_BATCH):
        """Walk the conn table with BPF_MAP_LOOKUP_BATCH, ``batch`` entries per call.

        Yields ``(keys, values, n)``: n packed FlowKey records and n ConnVal records
        (bytes, copies). Lazy: the caller may stop any time. Each slice is one bpf(2)
        call, made with the GIL released, so a walk in a thread leaves the event loop
        running. Entries added or removed while the walk runs may be missed or seen
        twice (a hash walk, by bucket).
        """
        yield from bpfsys.lookup_batches(self.conns.map_fd, CONN_KEY.size, CONN_VAL.size, batch)

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
            bpfsys.update_batch(fd, keys, values, n)
            return n
        return bpfsys.update_noexist(fd, keys, values, CONN_KEY.size, CONN_VAL.size)


class RealIds(set):
    """Real ids named by the conn table, and when the walk that found them began."""

    started: float = 0.0


def coarse_now_ns() -> int:
    """The clock bpf_ktime_get_coarse_ns reads (CLOCK_MONOTONIC_COARSE)."""
    return time.clock_gettime_ns(6)  # CLOCK_MONOTONIC_COARSE (not in the time module)


# compact: the C encoder (indent= falls back to pure Python, ~50x slower)
_JSON = json.JSONEncoder(separators=(",", ":")).encode

# --------------------------------------------------------------- bulk conn-table I/O
# struct flow_key and struct conn_val as bytes: addresses zero-padded to 16 bytes,
# ports in network order (as the data plane stores them), family 4/6.
CONN_KEY = struct.Struct("!16s16sHHBB2x")
CONN_VAL = struct.Struct("=IIQ")  # real_id, vip_id, last_seen_ns (host order)
# The same records as numpy sees them (the destination as two words, to compare fast).
FLOW_KEY_DTYPE = np.dtype([("src", "V16"), ("dst_hi", "<u8"), ("dst_lo", "<u8"),
                           ("sport", ">u2"), ("dport", ">u2"), ("proto", "u1"),
                           ("family", "u1"), ("pad", "V2")])
CONN_VAL_DTYPE = np.dtype(M.ConnVal)  # numpy reads the ctypes mirror's fields and offsets
# An embryos slot as numpy sees it: only the fields a walk for real ids reads.
EMBRYO_DTYPE = np.dtype({"names": ["family", "real_id"], "formats": ["=u1", "=u4"],
                         "offsets": [M.Embryo.key.offset + M.FlowKey.family.offset,
                                     M.Embryo.val.offset + M.ConnVal.real_id.offset],
                         "itemsize": ct.sizeof(M.Embryo)})
assert CONN_KEY.size == ct.sizeof(M.FlowKey) == FLOW_KEY_DTYPE.itemsize
assert CONN_VAL.size == ct.sizeof(M.ConnVal) == CONN_VAL_DTYPE.itemsize
assert FLOW_KEY_DTYPE.fields["dport"][1] == M.FlowKey.dport.offset
assert CONN_VAL_DTYPE.fields["vip_id"][1] == M.ConnVal.vip_id.offset


def _flow_filter(want):
    """A vectorised test of FLOW_KEY_DTYPE records for ``want`` = (address, port, proto)."""
    if want is None:
        return None
    try:
        addr, port, proto = want
    except (TypeError, ValueError):
        raise ValueError(f"want must be (VIP address, port, protocol), not {want!r}") from None
    try:
        raw, fam = M.addr16(addr)
    except ValueError as e:
        raise ValueError(f"want address: {e}") from None
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"want port must be 0..65535 (0: every port), not {port!r}")
    p = M.PROTO.get(proto) if isinstance(proto, str) else proto
    if p not in M.PROTO.values():
        raise ValueError(f"want protocol must be one of {', '.join(M.PROTO)}, not {proto!r}")
    hi, lo = struct.unpack("<QQ", raw)

    def match(k):
        m = (k["dst_hi"] == hi) & (k["dst_lo"] == lo) & (k["family"] == fam) & (k["proto"] == p)
        return m & (k["dport"] == port) if port else m
    return match


@functools.lru_cache(maxsize=4096)
def _addr_str(raw: bytes, family: int) -> str:
    if family == M.FAMILY_V4:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    if family == M.FAMILY_V6:
        return str(ipaddress.IPv6Address(raw))
    return f"family {family}: {raw.hex()}"  # never written by the data plane or sync


def _conn_rows(keys: bytes, vals: bytes, n: int, idx=None) -> list[tuple]:
    """(client, cport, vip, vport, proto, real id) of records ``idx`` (None: all n)."""
    ntop, af4, v4, name, addr = socket.inet_ntop, socket.AF_INET, M.FAMILY_V4, \
        M.PROTO_NAME, _addr_str
    rids = np.frombuffer(vals, CONN_VAL_DTYPE, n)["real_id"].tolist()
    if idx is None:
        recs = zip(CONN_KEY.iter_unpack(keys), rids, strict=True)
    else:
        recs = ((CONN_KEY.unpack_from(keys, i * CONN_KEY.size), rids[i]) for i in idx)
    return [(ntop(af4, src[:4]) if fam == v4 else addr(src, fam), sport, addr(dst, fam), dport,
             name.get(proto) or str(proto), rid)
            for (src, dst, sport, dport, proto, fam), rid in recs]


# Maps a clean start empties when they are private (pinned ones: every file of the pin dir).
_RESET_MAPS = ("vips", "vip_addrs", "vip_by_id", "reals", "conns", "vip_filter", "stats_vip",
               "stats_real")


def _empty_map(t) -> None:
    """Empty a hash map or zero an array, a bounded batch per bpf(2) call."""
    ksize, vsize = ct.sizeof(t.Key), ct.sizeof(t.Leaf)  # per-CPU: bcc's Leaf is per CPU
    if t.ttype in (_BPF_HASH, _BPF_LRU_HASH, _BPF_PERCPU_HASH, _BPF_LRU_PERCPU_HASH):
        for _ in bpfsys.lookup_batches(t.map_fd, ksize, vsize, WALK_BATCH, delete=True):
            pass
    elif t.ttype in (_BPF_ARRAY, _BPF_PERCPU_ARRAY):
        step = max(1, min(65536, (1 << 22) // vsize))
        zero = bytes(vsize * step)
        for lo in range(0, t.max_entries, step):
            n = min(step, t.max_entries - lo)
            keys = np.arange(lo, lo + n, dtype=np.uint32).tobytes()
            bpfsys.update_batch(t.map_fd, keys, zero[:n * vsize], n)
    else:
        raise TablesError(f"cannot empty a map of type {t.ttype}: stop l4lb, remove the "
                          "node's pin directory and start again")


__all__ = ["ServiceTables", "TablesError", "VipState", "RealState", "RealIds", "coarse_now_ns",
           "CONN_KEY", "CONN_VAL", "FLOW_KEY_DTYPE", "CONN_VAL_DTYPE", "WALK_BATCH"]
