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
        self._tcache: _TargetCache | None = None  # groups_to_records' known targets
        self._rrows: dict[int, tuple] = {}  # _real_rows' cache
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

    def _real_rows(self, rl: int) -> np.ndarray:
        """Real addresses of length ``rl`` by real id, as the wire's ``real`` field."""
        _lens, addrs = self._real_table()
        cached = self._rrows.get(rl)
        if cached is None or cached[0] is not addrs:
            rows = np.ascontiguousarray(addrs[:, :rl]).view(_ADDR_DT[rl]).ravel()
            cached = self._rrows[rl] = (addrs, rows)
        return cached[1]

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
        nkeep = int(np.count_nonzero(keep))
        if nkeep < n:
            skipped["bad"] = n - nkeep
        seen = V["last_seen_ns"].astype(np.int64)  # (a last-seen ahead of now_ns: age 0)
        if timeout_ns:
            fresh = seen >= now_ns - timeout_ns
            idle = int(np.count_nonzero(keep & ~fresh))
            if idle:
                skipped["idle"] = idle
                keep &= fresh
        rid = V["real_id"].astype(np.intp)
        lens, addrs = self._real_table()
        inrange = rid < len(lens)
        if not inrange[keep].all() or not lens[rid[keep & inrange]].all():  # a miss
            if self.maybe_refresh(missed=True):
                lens, addrs = self._real_table()
            inrange = rid < len(lens)
        rlen = np.zeros(n, np.uint8)
        rlen[inrange] = lens[rid[inrange]]
        unknown = keep & (rlen == 0)
        if unknown.any():
            skipped["unknown_real"] = int(np.count_nonzero(unknown))
            keep &= ~unknown
        ages = np.clip((now_ns - seen) // _NS, 0, MAX_AGE_S)  # age_s() in bulk
        out: dict[tuple[int, int, int], np.ndarray] = {}
        v4 = fam == M.FAMILY_V4
        for f, alen in ((M.FAMILY_V4, 4), (M.FAMILY_V6, 16)):
            for rl in (4, 16):
                m = keep & (v4 if f == M.FAMILY_V4 else ~v4) & (rlen == rl)
                cnt = int(np.count_nonzero(m))
                if not cnt:
                    continue
                # field by field (whole addresses, ports as they are: network order)
                Kf = np.frombuffer(keys, _KEY_DT[alen], n)
                rows = np.empty(cnt, _ROW_DT[(alen, rl)])
                if cnt == n:
                    sel, r, a = Kf, rid, ages
                else:
                    idx = np.flatnonzero(m)
                    sel, r, a = Kf[idx], rid[idx], ages[idx]
                for name in _FLOW_FIELDS:
                    rows[name] = sel[name]
                rows["real"] = self._real_rows(rl)[r]
                rows["age"] = a
                out[(alen, alen, rl)] = rows.view(np.uint8).reshape(cnt, rows.itemsize)
        return out, skipped

    def groups_to_records(self, groups: Iterable[tuple[int, bytes]], now_ns: int
                          ) -> tuple[bytes, bytes, Counter]:
        """Wire records (codec groups: (shape code, blob)) -> packed FlowKey/ConnVal
        records with local ids, like entries_to_records but without a Python
        object per entry: each distinct (VIP, port, protocol, real) is looked up
        once (and remembered, see _TargetCache)."""
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
            Rf = np.frombuffer(blob, _ROW_DT[(alen, rl)], m)
            rid, vid, ok = self._targets_of(code, R[:, alen + 2:size - 2], alen, skipped)
            if ok is not None:  # some skipped: drop their rows
                Rf, rid, vid = Rf[ok], rid[ok], vid[ok]
                m = len(Rf)
                if not m:
                    continue
            k = np.zeros(m, _KEY_DT[alen])  # (zeros: the address and struct padding)
            for name in _FLOW_FIELDS:
                k[name] = Rf[name]
            k["family"] = M.FAMILY_V4 if alen == 4 else M.FAMILY_V6
            v = np.empty(m, _VAL_DT)  # (its three fields fill all 16 bytes)
            v["real_id"] = rid
            v["vip_id"] = vid
            v["last_seen_ns"] = np.maximum(now_ns - Rf["age"].astype(np.int64) * _NS, 0)
            keys_out.append(k.tobytes())
            vals_out.append(v.tobytes())
        return b"".join(keys_out), b"".join(vals_out), skipped

    def _targets_of(self, code: int, cols: np.ndarray, alen: int, skipped: Counter):
        """(real ids, VIP ids, rows to keep or None for all) for wire records'
        dst|dport|proto|real columns; skips counted in ``skipped``."""
        tc = self._tcache
        if tc is None or tc.vips is not self.vips:
            tc = self._tcache = _TargetCache(self.vips)
        got = tc.lookup(code, cols)
        if got is not None:
            return got[0], got[1], None
        uniq, inv = _distinct(cols)
        ids = self._ids_of(uniq, alen)
        if any(type(t) is str for t in ids) and self.maybe_refresh(missed=True):
            ids = self._ids_of(uniq, alen)
            tc = self._tcache = _TargetCache(self.vips)
        ok_u = np.array([type(t) is not str for t in ids], bool)
        if not ok_u.all():
            counts = np.bincount(inv, minlength=len(uniq))
            for t, c in zip(ids, counts.tolist(), strict=True):
                if type(t) is str:
                    skipped[t] += c
        rid_u = np.array([0 if type(t) is str else t[0] for t in ids], np.uint32)
        vid_u = np.array([0 if type(t) is str else t[1] for t in ids], np.uint32)
        tc.learn(code, [u for u, o in zip(uniq, ok_u.tolist(), strict=True) if o],
                 rid_u[ok_u], vid_u[ok_u])
        return rid_u[inv], vid_u[inv], (None if ok_u.all() else ok_u[inv])

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
_ADDR_DT = {4: np.dtype("<u4"), 16: np.dtype("V16")}  # whole addresses, copied as bytes
_FLOW_FIELDS = ("src", "sport", "dst", "dport", "proto")
# A flow_key of one family, field by field (the family too; the rest is padding).
_KEY_DT = {a: np.dtype({"names": [*_FLOW_FIELDS, "family"],
                        "formats": [_ADDR_DT[a], "<u2", _ADDR_DT[a], "<u2", "u1", "u1"],
                        "offsets": [_K_SRC, _K_SPORT, _K_DST, _K_DPORT, _K_PROTO, _FAM_OFF],
                        "itemsize": _KS}) for a in (4, 16)}
# A wire record (codec.py): src | sport | dst | dport | proto | real | age (big-endian)
_ROW_DT = {(a, rl): np.dtype({"names": [*_FLOW_FIELDS, "real", "age"],
                              "formats": [_ADDR_DT[a], "<u2", _ADDR_DT[a], "<u2", "u1",
                                          _ADDR_DT[rl], ">u2"],
                              "offsets": [0, a, a + 2, 2 * a + 2, 2 * a + 4, 2 * a + 5,
                                          2 * a + 5 + rl],
                              "itemsize": 2 * a + 7 + rl}) for a in (4, 16) for rl in (4, 16)}
assert all(SHAPE_LENS[(a, a, rl)][1] == dt.itemsize for (a, rl), dt in _ROW_DT.items())


def _row_hashes(cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One 64-bit hash per row of a uint8 matrix, and the rows as 64-bit words."""
    m, w = cols.shape
    words = -(-w // 8)
    padded = np.zeros((m, words * 8), np.uint8)
    padded[:, :w] = cols
    W = padded.view(np.uint64)
    h = W[:, 0].copy()
    with np.errstate(over="ignore"):
        for j in range(1, words):
            h = h * _MIX + W[:, j]
    return h, W


class _TargetCache:
    """groups_to_records' memory of (dst|dport|proto|real) -> (real id, VIP id), for
    one translation table (``vips``): a full walk names a few targets a million
    times, so each record is found by its hash (searchsorted) instead of sorting
    every slice for its distinct targets. A hit is checked against the whole
    record, never trusted on the hash alone."""

    MAX = 4096  # targets remembered per shape (more: start over)

    def __init__(self, vips) -> None:
        self.vips = vips
        self._by_code: dict[int, tuple] = {}  # code -> (sorted hashes, words, rids, vids)

    def lookup(self, code: int, cols: np.ndarray):
        t = self._by_code.get(code)
        if t is None:
            return None
        hs, words, rids, vids = t
        h, W = _row_hashes(cols)
        pos = np.searchsorted(hs, h)
        pos[pos == len(hs)] = 0
        if not (hs[pos] == h).all() or not (words[pos] == W).all():
            return None  # a target not seen yet (or a collision): the slow way
        return rids[pos], vids[pos]

    def learn(self, code: int, uniq: list[bytes], rids: np.ndarray, vids: np.ndarray) -> None:
        if not uniq:
            return
        w = len(uniq[0])
        rows = np.frombuffer(b"".join(uniq), np.uint8).reshape(len(uniq), w)
        h, W = _row_hashes(rows)
        old = self._by_code.get(code)
        if old is not None and len(old[0]) + len(h) <= self.MAX:
            keep = ~np.isin(h, old[0])
            h = np.concatenate((old[0], h[keep]))
            W = np.concatenate((old[1], W[keep]))
            rids = np.concatenate((old[2], rids[keep]))
            vids = np.concatenate((old[3], vids[keep]))
        if len(np.unique(h)) < len(h):
            return  # two targets share a hash: keep looking these up the slow way
        order = np.argsort(h)
        self._by_code[code] = (h[order], W[order], rids[order], vids[order])


def _distinct(cols: np.ndarray) -> tuple[list[bytes], np.ndarray]:
    """The distinct rows of a uint8 matrix (as bytes) and, per row, the index of its
    own. Sorts one 64-bit hash per row rather than the rows themselves (several
    times faster than np.unique on a void view); a hash collision, checked for,
    falls back to that."""
    w = cols.shape[1]
    h, W = _row_hashes(cols)
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
