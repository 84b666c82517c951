"""Conn-table entries between this node's ids and the wire's addresses (no I/O).

The wire names a flow's VIP by address/port/protocol and its real by address
(codec.py); each node's conn table names them by its own ids. The master turns
conn-table records and flow events into entries, the standby entries into
conn-table records. Two ways each: per entry with struct (few entries: new
flows), and in bulk with numpy on the packed records as they are (full walks:
no Python object per entry). Byte layouts come from the ctypes mirrors in
dataplane/maps.py.
"""

from __future__ import annotations

import ctypes as ct
import ipaddress
import operator
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterable

import numpy as np

from l4lb.dataplane import maps as M
from l4lb.dataplane.tables import CONN_KEY, CONN_VAL
from l4lb.sync.codec import MAX_AGE_S, SHAPE_LENS, SyncEntry

__all__ = ["Translator", "decode_events", "NUMPY_MIN"]

_RID = operator.itemgetter(5)
TRANSLATE_TTL_S = 1.0  # rebuild the id <-> address maps at least this often
TRANSLATE_MISS_S = 0.05  # ... and on a miss, at most this often

# Byte layouts come from the ctypes mirrors (maps.py): offsets of struct flow_key,
# struct conn_val and struct flow_event fields.
_KS, _VS = ct.sizeof(M.FlowKey), ct.sizeof(M.ConnVal)
_K_SRC, _K_DST = M.FlowKey.src.offset, M.FlowKey.dst.offset
_K_SPORT, _K_DPORT = M.FlowKey.sport.offset, M.FlowKey.dport.offset
_K_PROTO, _FAM_OFF = M.FlowKey.proto.offset, M.FlowKey.family.offset
_EV_KEY, _EV_RID = M.FlowEvent.key.offset, M.FlowEvent.real_id.offset
_EV_SIZE = ct.sizeof(M.FlowEvent)
_VAL_DT = np.dtype({"names": ["real_id", "vip_id", "last_seen_ns"],
                    "formats": ["=u4", "=u4", "=u8"],
                    "offsets": [M.ConnVal.real_id.offset, M.ConnVal.vip_id.offset,
                                M.ConnVal.last_seen_ns.offset], "itemsize": _VS})
assert CONN_KEY.size == _KS and CONN_VAL.size == _VS


def _layout(fields: list[tuple[int, str]], size: int, order: str = "!") -> struct.Struct:
    """A struct over some fields of a C struct: (offset, format) pairs, gaps padded."""
    fmt, pos = order, 0
    for off, f in sorted(fields):
        if off < pos:
            raise AssertionError("overlapping fields")
        fmt += f"{off - pos}x{f}" if off > pos else f
        pos = off + struct.calcsize("=" + f)
    return struct.Struct(f"{fmt}{size - pos}x" if size > pos else fmt)


# struct flow_event = flow_key | real_id u32 | vip_id u32 | ts_ns u64 (host order)
_EVENT = _layout([(_EV_KEY, f"{_KS}s"), (_EV_RID, "I")], _EV_SIZE, "=")
# Walk fast paths: a flow_key of one family as (src, dst, sport, dport, proto), and
# a conn_val as (real_id, last_seen_ns).
_PORTS = [(_K_SPORT, "H"), (_K_DPORT, "H"), (_K_PROTO, "B")]
_KEY4 = _layout([(_K_SRC, "4s"), (_K_DST, "4s"), *_PORTS], _KS)
_KEY6 = _layout([(_K_SRC, "16s"), (_K_DST, "16s"), *_PORTS], _KS)
_VAL_RS = _layout([(M.ConnVal.real_id.offset, "I"), (M.ConnVal.last_seen_ns.offset, "Q")],
                  _VS, "=")
_VAL_ID_NOW = _layout([(M.ConnVal.real_id.offset, "I"), (M.ConnVal.vip_id.offset, "I"),
                       (M.ConnVal.last_seen_ns.offset, "Q")], _VS, "=")
assert _KEY4.size == _KEY6.size == CONN_KEY.size and _VAL_RS.size == CONN_VAL.size
_LENS_BY_CODE = {code: (lens, size) for lens, (code, size) in SHAPE_LENS.items()}
NUMPY_MIN = 64  # entries: below, plain struct code is faster than numpy's set-up
_NS = 1_000_000_000


def age_s(now_ns: int, seen_ns: int) -> int:
    """A conn-table last-seen as the wire's age: whole seconds, 0..MAX_AGE_S.

    Rounded down: a copy may be up to 1 s younger than the flow, never older, so
    an active flow's copy does not expire on the standby before the flow does."""
    return min(max((now_ns - seen_ns) // _NS, 0), MAX_AGE_S)


def seen_ns(now_ns: int, age: int) -> int:
    """The wire's age as this node's last-seen (never below 0: a young clock)."""
    return max(now_ns - age * _NS, 0)


def _packed(addr: str, _cache: dict[str, bytes] = {}) -> bytes:  # noqa: B006 - a cache
    b = _cache.get(addr)
    if b is None:
        b = _cache[addr] = ipaddress.ip_address(addr).packed
        if len(_cache) > 100_000:
            _cache.clear()
    return b


# =========================================================================== translation


class Translator:
    """Local ids <-> addresses, from ServiceTables (no BPF: unit-testable).

    Master side: real id -> real address (events and walks name reals by id).
    Standby side: (VIP address, port, protocol) -> (VIP id, {real address: real id}).
    Both come from ``tables.vips`` (reals and, where the tables have them,
    retired reals, which keep their ids while flows use them); ``refresh``
    rebuilds them, ``maybe_refresh`` when they are old or after a miss.
    """

    def __init__(self, tables, clock: Callable[[], float] = time.monotonic) -> None:
        self.tables = tables
        self._clock = clock
        self.vips: dict[tuple[bytes, int, int], tuple[int, dict[bytes, int]]] = {}
        self.real_addr: dict[int, bytes] = {}
        self.refreshed_at = float("-inf")
        self.refreshes = 0
        self._rtab = None  # (real_addr it was built from, lengths, addresses)
        self.refresh()

    def refresh(self) -> None:
        vips: dict[tuple[bytes, int, int], tuple[int, dict[bytes, int]]] = {}
        real_addr: dict[int, bytes] = {}
        for vs in list(self.tables.vips.values()):
            reals: dict[bytes, int] = {}
            for r in (*vs.reals.values(), *getattr(vs, "retired", {}).values()):
                a = _packed(r.address)
                reals[a] = r.real_id
                real_addr[r.real_id] = a
            proto = M.PROTO.get(vs.proto, vs.proto)
            vips[(_packed(vs.address), int(vs.port), proto)] = (vs.vip_id, reals)
        self.vips, self.real_addr = vips, real_addr
        self.refreshed_at = self._clock()
        self.refreshes += 1

    def maybe_refresh(self, missed: bool = False) -> bool:
        age = self._clock() - self.refreshed_at
        if age >= TRANSLATE_TTL_S or (missed and age >= TRANSLATE_MISS_S):
            try:
                self.refresh()
            except RuntimeError:  # tables changed under us (a thread): next time
                return False
            return True
        return False

    # ----------------------------------------------------------------- master side

    def events_to_entries(self, raws: Iterable[bytes]) -> tuple[list[SyncEntry], Counter]:
        """Raw ``struct flow_event`` records -> entries; ``bad``/``unknown_real`` counted."""
        events, bad = decode_events(raws)
        return self._with_addresses(events, bad)

    def _with_addresses(self, events, bad: int) -> tuple[list[SyncEntry], Counter]:
        out: list[SyncEntry] = []
        skipped: Counter = Counter()
        if bad:
            skipped["bad"] = bad
        ra = self.real_addr
        missing = []
        for ev in events:
            real = ra.get(ev[5])
            if real is None:
                missing.append(ev)
            else:
                out.append((*ev[:5], real, *(ev[6:7] or (0,))))
        if missing and self.maybe_refresh(missed=True):
            ra = self.real_addr
            for ev in missing:
                real = ra.get(ev[5])
                if real is None:
                    skipped["unknown_real"] += 1
                else:
                    out.append((*ev[:5], real, *(ev[6:7] or (0,))))
        elif missing:
            skipped["unknown_real"] += len(missing)
        return out, skipped

    def records_to_entries(self, keys: bytes, vals: bytes, now_ns: int = 0,
                           timeout_ns: int = 0) -> tuple[list[SyncEntry], Counter]:
        """Conn-table records (as ServiceTables.conn_batches yields them) -> entries.
        With ``timeout_ns``, entries idle for longer (the data plane would
        reschedule them) are left out and counted as ``idle``."""
        n = len(vals) // CONN_VAL.size
        fams = keys[_FAM_OFF::CONN_KEY.size]
        if fams.count(M.FAMILY_V4) == n:  # the usual case: one family, unpacked in C
            flows = _KEY4.iter_unpack(keys)
        elif fams.count(M.FAMILY_V6) == n:
            flows = _KEY6.iter_unpack(keys)
        else:
            flows = ((s[:4], d[:4], sp, dp, pr) if f == M.FAMILY_V4 else (s, d, sp, dp, pr)
                     for s, d, sp, dp, pr, f in CONN_KEY.iter_unpack(keys))
        ids = _VAL_RS.iter_unpack(vals)
        cutoff = now_ns - timeout_ns if timeout_ns else -1
        # (src, sport, dst, dport, proto, real id, age): the real's address comes next
        recs = [(s, sp, d, dp, pr, rid, age_s(now_ns, seen)) for (s, d, sp, dp, pr), (rid, seen)
                in zip(flows, ids, strict=True) if seen >= cutoff]
        skipped: Counter = Counter()
        if len(recs) < n:
            skipped["idle"] = n - len(recs)
        ra = self.real_addr
        if set(map(_RID, recs)) <= ra.keys():
            get = ra.__getitem__
            return [(s, sp, d, dp, pr, get(rid), a) for s, sp, d, dp, pr, rid, a in recs], skipped
        out, more = self._with_addresses(recs, 0)
        skipped.update(more)
        return out, skipped

    # ----------------------------------------------------------------- bulk (numpy)

    def _real_table(self):
        """(address length by real id, 16-byte address rows by real id) as arrays."""
        ra = self.real_addr
        cached = self._rtab
        if cached is not None and cached[0] is ra:
            return cached[1], cached[2]
        size = max(ra, default=-1) + 1
        lens = np.zeros(size, np.uint8)
        addrs = np.zeros((size, 16), np.uint8)
        for rid, a in ra.items():
            lens[rid] = len(a)
            addrs[rid, :len(a)] = np.frombuffer(a, np.uint8)
        self._rtab = (ra, lens, addrs)
        return lens, addrs

    def records_to_rows(self, keys: bytes, vals: bytes, now_ns: int = 0, timeout_ns: int = 0
                        ) -> tuple[dict[tuple[int, int, int], np.ndarray], Counter]:
        """Conn-table records -> wire records (codec layout), as uint8 arrays by
        address shape (len(src), len(dst), len(real)); no Python object per entry.
        Idle entries (``timeout_ns``), unknown real ids and records the data
        plane never writes (family, protocol) are left out and counted."""
        n = len(vals) // _VS
        skipped: Counter = Counter()
        if not n:
            return {}, skipped
        K = np.frombuffer(keys, np.uint8, n * _KS).reshape(n, _KS)
        V = np.frombuffer(vals, _VAL_DT, n)
        fam, proto = K[:, _FAM_OFF], K[:, _K_PROTO]
        keep = ((fam == M.FAMILY_V4) | (fam == M.FAMILY_V6)) & ((proto == 6) | (proto == 17))
        if not keep.all():
            skipped["bad"] = int(n - keep.sum())
        if timeout_ns:
            fresh = V["last_seen_ns"] >= now_ns - timeout_ns
            skipped["idle"] = int((keep & ~fresh).sum())
            keep &= fresh
        rid = V["real_id"].astype(np.int64)
        lens, addrs = self._real_table()
        if (rid[keep] >= len(lens)).any() or not lens[rid[keep & (rid < len(lens))]].all():
            if self.maybe_refresh(missed=True):
                lens, addrs = self._real_table()
        inrange = rid < len(lens)
        rlen = np.zeros(n, np.uint8)
        rlen[inrange] = lens[rid[inrange]]
        unknown = keep & (rlen == 0)
        if unknown.any():
            skipped["unknown_real"] = int(unknown.sum())
            keep &= ~unknown
        # age_s() in bulk (int64: a last-seen ahead of now_ns, another CPU's, is age 0)
        idle = now_ns - V["last_seen_ns"].astype(np.int64)
        ages = np.clip(idle // _NS, 0, MAX_AGE_S)
        out: dict[tuple[int, int, int], np.ndarray] = {}
        for f, alen in ((M.FAMILY_V4, 4), (M.FAMILY_V6, 16)):
            for rl in (4, 16):
                m = keep & (fam == f) & (rlen == rl)
                if not m.any():
                    continue
                sel = K[m]
                rows = np.empty((len(sel), 2 * alen + 7 + rl), np.uint8)
                rows[:, 0:alen] = sel[:, _K_SRC:_K_SRC + alen]
                rows[:, alen:alen + 2] = sel[:, _K_SPORT:_K_SPORT + 2]  # network order both
                rows[:, alen + 2:2 * alen + 2] = sel[:, _K_DST:_K_DST + alen]
                rows[:, 2 * alen + 2:2 * alen + 4] = sel[:, _K_DPORT:_K_DPORT + 2]
                rows[:, 2 * alen + 4] = sel[:, _K_PROTO]
                rows[:, 2 * alen + 5:2 * alen + 5 + rl] = addrs[rid[m], :rl]
                rows[:, -2:] = ages[m].astype(">u2").view(np.uint8).reshape(-1, 2)
                out[(alen, alen, rl)] = rows
        return out, skipped

    def groups_to_records(self, groups: Iterable[tuple[int, bytes]], now_ns: int
                          ) -> tuple[bytes, bytes, Counter]:
        """Wire records (codec groups: (shape code, blob)) -> packed FlowKey/ConnVal
        records with local ids, like entries_to_records but without a Python
        object per entry: each distinct (VIP, port, protocol, real) is looked up once."""
        by_code: dict[int, list[bytes]] = {}
        for code, blob in groups:
            by_code.setdefault(code, []).append(blob)
        skipped: Counter = Counter()
        keys_out, vals_out = [], []
        for code, blobs in by_code.items():
            (alen, _, rl), size = _LENS_BY_CODE[code]
            blob = b"".join(blobs)
            m = len(blob) // size
            if not m:
                continue
            R = np.frombuffer(blob, np.uint8, m * size).reshape(m, size)
            uniq, inv = _distinct(R[:, alen + 2:size - 2])  # dst|dport|proto|real
            ids = self._ids_of(uniq, alen)
            if any(type(t) is str for t in ids) and self.maybe_refresh(missed=True):
                ids = self._ids_of(uniq, alen)
            ok_u = np.array([type(t) is not str for t in ids], bool)
            if not ok_u.all():
                counts = np.bincount(inv, minlength=len(uniq))
                for t, c in zip(ids, counts.tolist(), strict=True):
                    if type(t) is str:
                        skipped[t] += c
            rid_u = np.array([0 if type(t) is str else t[0] for t in ids], np.uint32)
            vid_u = np.array([0 if type(t) is str else t[1] for t in ids], np.uint32)
            if ok_u.all():  # the usual case: no copies to drop the skipped rows
                sel, inv_ok = R, inv
            else:
                ok = ok_u[inv]
                sel, inv_ok = R[ok], inv[ok]
            k = np.zeros((len(sel), _KS), np.uint8)
            k[:, _K_SRC:_K_SRC + alen] = sel[:, 0:alen]
            k[:, _K_SPORT:_K_SPORT + 2] = sel[:, alen:alen + 2]
            k[:, _K_DST:_K_DST + alen] = sel[:, alen + 2:2 * alen + 2]
            k[:, _K_DPORT:_K_DPORT + 2] = sel[:, 2 * alen + 2:2 * alen + 4]
            k[:, _K_PROTO] = sel[:, 2 * alen + 4]
            k[:, _FAM_OFF] = M.FAMILY_V4 if alen == 4 else M.FAMILY_V6
            v = np.zeros(len(sel), _VAL_DT)
            v["real_id"] = rid_u[inv_ok]
            v["vip_id"] = vid_u[inv_ok]
            age = sel[:, size - 2:].copy().view(">u2").ravel().astype(np.int64)
            v["last_seen_ns"] = np.maximum(now_ns - age * _NS, 0)
            keys_out.append(k.tobytes())
            vals_out.append(v.tobytes())
        return b"".join(keys_out), b"".join(vals_out), skipped

    def _ids_of(self, uniq: list[bytes], alen: int) -> list:
        """(real id, VIP id) or the skip reason, for each distinct dst|dport|proto|real."""
        out = []
        for u in uniq:
            t = self._target(u[:alen], int.from_bytes(u[alen:alen + 2], "big"), u[alen + 2],
                             u[alen + 3:], 0)
            out.append(t if type(t) is str else t[2])
        return out

    # ----------------------------------------------------------------- standby side

    def entries_to_records(self, entries: Iterable[SyncEntry], now_ns: int
                           ) -> tuple[bytes, bytes, Counter]:
        """Entries -> packed FlowKey/ConnVal records with local ids, for
        ServiceTables.install_conns; unknown VIPs and reals are counted and left out."""
        entries = entries if isinstance(entries, list) else list(entries)
        keys, vals, skipped, missed = self._records(entries, now_ns)
        if missed and self.maybe_refresh(missed=True):
            keys, vals, skipped, _ = self._records(entries, now_ns)
        return b"".join(keys), b"".join(vals), skipped

    def _target(self, dst: bytes, dport: int, proto: int, real: bytes, now_ns: int):
        """(family, packed conn_val) for a flow to this VIP and real, or the skip reason."""
        v = self.vips.get((dst, dport, proto)) or self.vips.get((dst, 0, proto))
        if v is None:
            return "unknown_vip"
        rid = v[1].get(real)
        if rid is None:
            return "unknown_real"
        return (M.FAMILY_V4 if len(dst) == 4 else M.FAMILY_V6,
                _VAL_ID_NOW.pack(rid, v[0], now_ns), (rid, v[0]))

    def _records(self, entries: list, now_ns: int):
        kpack = CONN_KEY.pack
        keys: list[bytes] = []
        vals: list[bytes] = []
        skipped: Counter = Counter()
        # Entries of one message mostly share a VIP and a few reals: look each
        # (VIP, real) up once per call.
        cache: dict = {}
        target = self._target
        vpack = _VAL_ID_NOW.pack
        for src, sport, dst, dport, proto, real, age in entries:
            ck = (dst, dport, proto, real)
            t = cache.get(ck)
            if t is None:
                t = cache[ck] = target(dst, dport, proto, real, now_ns)
            if type(t) is str:
                skipped[t] += 1
                continue
            keys.append(kpack(src, dst, sport, dport, proto, t[0]))
            # last-seen from the sender's age: its idle time, not our install time
            vals.append(vpack(*t[2], seen_ns(now_ns, age)) if age else t[1])
        return keys, vals, skipped, bool(skipped)


_MIX = np.uint64(0x9E3779B97F4A7C15)


def _distinct(cols: np.ndarray) -> tuple[list[bytes], np.ndarray]:
    """The distinct rows of a uint8 matrix (as bytes) and, per row, the index of its
    own. Sorts one 64-bit hash per row rather than the rows themselves (several
    times faster than np.unique on a void view); a hash collision, checked for,
    falls back to that."""
    m, w = cols.shape
    words = -(-w // 8)
    padded = np.zeros((m, words * 8), np.uint8)
    padded[:, :w] = cols
    W = padded.view(np.uint64)
    h = W[:, 0].copy()
    with np.errstate(over="ignore"):
        for j in range(1, words):
            h = h * _MIX + W[:, j]
    _u, first, inv = np.unique(h, return_index=True, return_inverse=True)
    inv = inv.ravel()
    if not (W == W[first][inv]).all():  # a collision: two rows share a hash
        voids = np.ascontiguousarray(cols).view(f"V{w}").ravel()
        _u, first, inv = np.unique(voids, return_index=True, return_inverse=True)
        inv = inv.ravel()
    return [bytes(r) for r in cols[first]], inv


def decode_events(raws: Iterable[bytes]) -> tuple[list[tuple], int]:
    """Raw ``struct flow_event`` records -> ``(src, sport, dst, dport, proto, real_id)``
    tuples (addresses 4 or 16 bytes by family, ports in host order); returns them
    and the number of records too short or of an unknown family/protocol."""
    out = []
    bad = 0
    unpack_ev, unpack_key = _EVENT.unpack_from, CONN_KEY.unpack
    for raw in raws:
        try:
            key, rid = unpack_ev(raw)
        except struct.error:
            bad += 1
            continue
        src, dst, sport, dport, proto, fam = unpack_key(key)
        if fam == M.FAMILY_V4:
            src, dst = src[:4], dst[:4]
        elif fam != M.FAMILY_V6:
            bad += 1
            continue
        if proto not in (6, 17):
            bad += 1
            continue
        out.append((src, sport, dst, dport, proto, rid))
    return out, bad
