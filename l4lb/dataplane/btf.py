"""Struct layouts as the compiler laid them out, read back from the kernel's BTF.

bcc loads the program's BTF with its maps, so a map fd leads to the key and value
types the compiler produced. Comparing them with the ctypes mirrors of maps.py
(names, offsets, sizes, field by field) is what Cilium's alignchecker does for its
Go mirrors: a field reordered on one side only fails the check instead of
corrupting the conn table.
"""

from __future__ import annotations

import ctypes as ct
import os
import struct
from dataclasses import dataclass

from l4lb.dataplane import bpfsys
from l4lb.errors import L4lbError

BTF_MAGIC = 0xEB9F

# BTF kinds (linux/btf.h) and the bytes each carries after struct btf_type.
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)
_QUALIFIERS = (TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG)


class _MapInfo(ct.Structure):
    """struct bpf_map_info, up to the BTF ids."""
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("key_size", ct.c_uint32),
                ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32),
                ("map_flags", ct.c_uint32), ("name", ct.c_char * 16), ("ifindex", ct.c_uint32),
                ("btf_vmlinux_value_type_id", ct.c_uint32), ("netns_dev", ct.c_uint64),
                ("netns_ino", ct.c_uint64), ("btf_id", ct.c_uint32),
                ("btf_key_type_id", ct.c_uint32), ("btf_value_type_id", ct.c_uint32)]


class _BtfInfo(ct.Structure):
    """struct bpf_btf_info."""
    _fields_ = [("btf", ct.c_uint64), ("btf_size", ct.c_uint32), ("id", ct.c_uint32),
                ("name", ct.c_uint64), ("name_len", ct.c_uint32), ("kernel_btf", ct.c_uint32)]


class BtfError(L4lbError):
    """No BTF to read, or BTF this reader does not understand."""


def _get_info(fd: int, info) -> None:
    try:
        bpfsys.obj_info(fd, info)
    except OSError as e:
        raise BtfError(f"BPF_OBJ_GET_INFO_BY_FD: {e.strerror}") from e


@dataclass(frozen=True)
class BtfType:
    kind: int
    name: str
    size: int  # bytes for INT/STRUCT/UNION/ENUM/FLOAT; the target type id for the others
    members: tuple = ()  # STRUCT/UNION: (name, type id, bit offset); ARRAY: (elem, nelems)


@dataclass(frozen=True)
class Field:
    name: str
    offset: int  # bytes
    size: int  # bytes
    sub: tuple = ()  # nested struct: its fields


class Btf:
    """The types of one BTF object (raw bytes as the kernel hands them out)."""

    def __init__(self, raw: bytes):
        magic, _ver, _flags, hdr_len, type_off, type_len, str_off, str_len = \
            struct.unpack_from("=HBBIIIII", raw)
        if magic != BTF_MAGIC:
            raise BtfError(f"BTF magic {magic:#x}, expected {BTF_MAGIC:#x}")
        strs = raw[hdr_len + str_off: hdr_len + str_off + str_len]
        self.types: list[BtfType | None] = [None]  # type id 0 is void
        pos, end = hdr_len + type_off, hdr_len + type_off + type_len
        while pos < end:
            name_off, info, size = struct.unpack_from("=III", raw, pos)
            pos += 12
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            name = strs[name_off: strs.index(b"\0", name_off)].decode()
            members: tuple = ()
            if kind in (INT, VAR, DECL_TAG):
                pos += 4
            elif kind == ARRAY:
                elem, _index, nelems = struct.unpack_from("=III", raw, pos)
                members, pos = (elem, nelems), pos + 12
            elif kind in (STRUCT, UNION):
                ms = []
                for _ in range(vlen):
                    m_name, m_type, m_off = struct.unpack_from("=III", raw, pos)
                    if info >> 31:  # kind_flag: bitfield size in the top 8 bits
                        m_off &= 0xFFFFFF
                    ms.append((strs[m_name: strs.index(b"\0", m_name)].decode(), m_type, m_off))
                    pos += 12
                members = tuple(ms)
            elif kind in (ENUM, FUNC_PROTO):
                pos += 8 * vlen
            elif kind in (DATASEC, ENUM64):
                pos += 12 * vlen
            elif kind not in (PTR, FWD, *_QUALIFIERS, FUNC, FLOAT):
                raise BtfError(f"unknown BTF kind {kind} at byte {pos - 12}")
            self.types.append(BtfType(kind, name, size, members))

    @classmethod
    def of_map(cls, map_fd: int) -> tuple[Btf, int, int]:
        """The BTF a map was created with, and its key and value type ids."""
        mi = _MapInfo()
        _get_info(map_fd, mi)
        if not mi.btf_id:
            raise BtfError(f"map {mi.name.decode()} carries no BTF")
        try:
            fd = bpfsys.fd_by_id(bpfsys.BPF_BTF_GET_FD_BY_ID, mi.btf_id)
        except OSError as e:
            raise BtfError(f"BPF_BTF_GET_FD_BY_ID {mi.btf_id}: {e.strerror}") from e
        try:
            bi = _BtfInfo()
            _get_info(fd, bi)
            buf = ct.create_string_buffer(bi.btf_size)
            bi = _BtfInfo(btf=ct.addressof(buf), btf_size=bi.btf_size)
            _get_info(fd, bi)
        finally:
            os.close(fd)
        return cls(buf.raw), mi.btf_key_type_id, mi.btf_value_type_id

    def resolve(self, tid: int) -> int:
        """Through typedefs and qualifiers to the type itself."""
        while self.types[tid] is not None and self.types[tid].kind in _QUALIFIERS:
            tid = self.types[tid].size
        return tid

    def sizeof(self, tid: int) -> int:
        t = self.types[self.resolve(tid)]
        if t is None:
            raise BtfError("sizeof(void)")
        if t.kind == ARRAY:
            return self.sizeof(t.members[0]) * t.members[1]
        if t.kind == PTR:
            return 8
        return t.size

    def name(self, tid: int) -> str:
        t = self.types[self.resolve(tid)]
        return "void" if t is None else f"{'struct ' if t.kind == STRUCT else ''}{t.name}"

    def layout(self, tid: int) -> tuple[Field, ...]:
        """A struct's fields (nested structs expanded); () for a scalar or array."""
        t = self.types[self.resolve(tid)]
        if t is None or t.kind not in (STRUCT, UNION):
            return ()
        return tuple(Field(n, off // 8, self.sizeof(m), self.layout(m)) for n, m, off in t.members)


def ctypes_layout(cls) -> tuple[Field, ...]:
    """The same description of a ctypes mirror."""
    if not (isinstance(cls, type) and issubclass(cls, (ct.Structure, ct.Union))):
        return ()
    return tuple(Field(name, getattr(cls, name).offset, ct.sizeof(typ), ctypes_layout(typ))
                 for name, typ, *_ in cls._fields_)


def diff(want: tuple[Field, ...], got: tuple[Field, ...], where: str = "") -> list[str]:
    """How the mirror's fields (`want`) differ from the compiled ones (`got`)."""
    out = []
    if [f.name for f in want] != [f.name for f in got]:
        out.append(f"{where or 'struct'}: fields {[f.name for f in want]} (mirror) vs "
                   f"{[f.name for f in got]} (compiled)")
    compiled = {f.name: f for f in got}
    for f in want:
        g = compiled.get(f.name)
        if g is None:
            continue
        path = f"{where}.{f.name}" if where else f.name
        if (f.offset, f.size) != (g.offset, g.size):
            out.append(f"{path}: offset {f.offset} size {f.size} (mirror) vs offset "
                       f"{g.offset} size {g.size} (compiled)")
        out += diff(f.sub, g.sub, path) if f.sub or g.sub else []
    return out
