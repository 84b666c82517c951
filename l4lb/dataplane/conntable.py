"""The conn table as one table over its two BPF maps (README: Data plane).

The data plane keeps IPv4 flows in ``conns4`` under a 16-byte key (struct
flow_key4) and IPv6 flows in ``conns`` under the 40-byte struct flow_key: an
LRU hash lookup hashes and compares its whole key, and the short key makes an
IPv4 hit ~15 ns cheaper (bench/results/pps.md). Everything above this module
(sync, ``l4lb conns``, census walks, tests) still sees one table of 40-byte
FlowKey records: IPv4 keys are widened on the way out and narrowed on the way
in, a numpy copy per batch.
"""

from __future__ import annotations

import ctypes as ct

import numpy as np

from l4lb.dataplane import bpfsys
from l4lb.dataplane import maps as M

# struct flow_key4 and struct flow_key as numpy sees them: the fields they share, as
# plain integers (bytes copied as they are; numpy copies <u4 ~5x faster than V4).
KEY4_DTYPE = np.dtype({"names": ["src", "dst", "ports", "proto"],
                       "formats": ["<u4", "<u4", "<u4", "u1"],
                       "offsets": [0, 4, 8, 12], "itemsize": ct.sizeof(M.FlowKey4)})
KEY_DTYPE = np.dtype({"names": ["src", "dst", "ports", "proto", "family"],
                      "formats": ["<u4", "<u4", "<u4", "u1", "u1"],
                      "offsets": [M.FlowKey.src.offset, M.FlowKey.dst.offset,
                                  M.FlowKey.sport.offset, M.FlowKey.proto.offset,
                                  M.FlowKey.family.offset],
                      "itemsize": ct.sizeof(M.FlowKey)})
KEY_SIZE, KEY4_SIZE = ct.sizeof(M.FlowKey), ct.sizeof(M.FlowKey4)
VAL_SIZE = ct.sizeof(M.ConnVal)
_FAMILY_OFF = M.FlowKey.family.offset
assert M.FlowKey.dport.offset == M.FlowKey.sport.offset + 2
assert M.FlowKey4.dport.offset == M.FlowKey4.sport.offset + 2 == 10


def widen(keys4: bytes, n: int) -> bytes:
    """n packed flow_key4 records -> n FlowKey records (family 4, addresses padded)."""
    k4 = np.frombuffer(keys4, KEY4_DTYPE, n)
    out = np.zeros(n, KEY_DTYPE)
    for f in ("src", "dst", "ports", "proto"):
        out[f] = k4[f]
    out["family"] = M.FAMILY_V4
    return out.tobytes()


def narrow(keys: bytes, n: int) -> bytes:
    """n packed IPv4 FlowKey records -> n flow_key4 records."""
    k = np.frombuffer(keys, KEY_DTYPE, n)
    out = np.zeros(n, KEY4_DTYPE)
    for f in ("src", "dst", "ports", "proto"):
        out[f] = k[f]
    return out.tobytes()


def key4_of(k: M.FlowKey) -> M.FlowKey4:
    return M.FlowKey4.from_buffer_copy(narrow(bytes(k), 1))


class ConnTable:
    """``conns4`` and ``conns`` (bcc tables) as one table of FlowKey -> ConnVal."""

    def __init__(self, v4, v6):
        self.v4, self.v6 = v4, v6

    # bulk, for walks in a thread (each slice one bpf(2) call, the GIL released)
    def batches(self, batch: int):
        """Yields (keys, values, n): packed FlowKey and ConnVal records, IPv4 then IPv6.
        Entries added or removed during the walk may be missed or seen twice."""
        for keys, vals, n in bpfsys.lookup_batches(self.v4.map_fd, KEY4_SIZE, VAL_SIZE, batch):
            yield widen(keys, n), vals, n
        yield from bpfsys.lookup_batches(self.v6.map_fd, KEY_SIZE, VAL_SIZE, batch)

    def install(self, keys: bytes, values: bytes, overwrite: bool = True) -> int:
        """Write packed FlowKey/ConnVal records, each into its family's map; returns how
        many were written (records of neither family are no flow and are left out)."""
        n = len(keys) // KEY_SIZE
        if n * KEY_SIZE != len(keys) or n * VAL_SIZE != len(values):
            raise ValueError("keys/values are not whole FlowKey/ConnVal records")
        if n == 0:
            return 0
        fam = np.frombuffer(keys, np.uint8)[_FAMILY_OFF::KEY_SIZE]
        is4 = fam == M.FAMILY_V4
        written = 0
        if is4.all():
            return self._write(self.v4, narrow(keys, n), values, n, KEY4_SIZE, overwrite)
        vals = np.frombuffer(values, np.uint8).reshape(n, VAL_SIZE)
        rows = np.frombuffer(keys, np.uint8).reshape(n, KEY_SIZE)
        for mask, table in ((is4, self.v4), (fam == M.FAMILY_V6, self.v6)):
            m = int(mask.sum())
            if not m:
                continue
            k = rows[mask].tobytes()
            if table is self.v4:
                k, ksize = narrow(k, m), KEY4_SIZE
            else:
                ksize = KEY_SIZE
            written += self._write(table, k, vals[mask].tobytes(), m, ksize, overwrite)
        return written

    @staticmethod
    def _write(table, keys: bytes, values: bytes, n: int, ksize: int, overwrite: bool) -> int:
        if overwrite:
            bpfsys.update_batch(table.map_fd, keys, values, n)
            return n
        return bpfsys.update_noexist(table.map_fd, keys, values, ksize, VAL_SIZE)

    def clear(self) -> None:
        """Empty both maps, a bounded batch per bpf(2) call."""
        for table, ksize in ((self.v4, KEY4_SIZE), (self.v6, KEY_SIZE)):
            for _ in bpfsys.lookup_batches(table.map_fd, ksize, VAL_SIZE, 16384, delete=True):
                pass

    # one entry at a time (tests, tools): bcc's table interface, keyed by FlowKey
    def _table_key(self, k: M.FlowKey):
        if k.family == M.FAMILY_V4:
            return self.v4, self.v4.Key.from_buffer_copy(bytes(key4_of(k)))
        return self.v6, k

    def __getitem__(self, k: M.FlowKey) -> M.ConnVal:
        table, tk = self._table_key(k)
        return M.ConnVal.from_buffer_copy(bytes(table[tk]))

    def __setitem__(self, k: M.FlowKey, v: M.ConnVal) -> None:
        table, tk = self._table_key(k)
        table[tk] = table.Leaf.from_buffer_copy(bytes(v))

    def __delitem__(self, k: M.FlowKey) -> None:
        table, tk = self._table_key(k)
        del table[tk]

    def items(self) -> list[tuple[M.FlowKey, M.ConnVal]]:
        out = []
        for keys, vals, n in self.batches(4096):
            out.extend((M.FlowKey.from_buffer_copy(keys, i * KEY_SIZE),
                        M.ConnVal.from_buffer_copy(vals, i * VAL_SIZE)) for i in range(n))
        return out

    def keys(self) -> list[M.FlowKey]:
        return [k for k, _ in self.items()]

    def __len__(self) -> int:
        return sum(n for _, _, n in self.batches(4096))


__all__ = ["ConnTable", "KEY4_DTYPE", "KEY_DTYPE", "widen", "narrow", "key4_of"]
