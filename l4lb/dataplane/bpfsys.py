"""bpf(2) itself, for what bcc does not do well: batch walks and writes of whole maps.

bcc's batch helpers read a whole map in one go (and share one variable between the
batch token and the count); the walks here go a bounded slice per syscall, so a
caller in a thread can stop early and the GIL is released during every call
(ctypes drops it around foreign calls).
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
import platform

# The bpf(2) syscall number differs per architecture (asm/unistd.h).
_SYS_BPF_BY_ARCH = {
    "x86_64": 321, "amd64": 321, "i386": 357, "i686": 357,
    "aarch64": 280, "arm64": 280, "riscv64": 280, "loongarch64": 280,
    "armv7l": 386, "armv6l": 386, "ppc64le": 361, "ppc64": 361, "s390x": 351,
    "mips64": 5315,
}

BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_OBJ_GET = 1, 2, 7
BPF_PROG_TEST_RUN, BPF_PROG_GET_FD_BY_ID, BPF_OBJ_GET_INFO_BY_FD = 10, 13, 15
BPF_BTF_GET_FD_BY_ID = 19
BPF_MAP_LOOKUP_BATCH, BPF_MAP_LOOKUP_AND_DELETE_BATCH = 24, 25
BPF_MAP_UPDATE_BATCH, BPF_MAP_DELETE_BATCH = 26, 27
BPF_NOEXIST = 1

_libc = ct.CDLL(None, use_errno=True)
_libc.syscall.restype = ct.c_long
# syscall(SYS_BPF, cmd, attr_ref, size) for hot loops (bench/pps.py): -1 and errno on failure.
raw_syscall = _libc.syscall


def sys_bpf_number(machine: str | None = None) -> int:
    m = machine or platform.machine()
    try:
        return _SYS_BPF_BY_ARCH[m]
    except KeyError:
        raise OSError(errno.ENOSYS, f"bpf(2): syscall number unknown for architecture {m!r} "
                      f"(known: {', '.join(sorted(_SYS_BPF_BY_ARCH))})") from None


SYS_BPF = sys_bpf_number()


class BatchAttr(ct.Structure):
    """union bpf_attr, the `batch` member."""
    _fields_ = [("in_batch", ct.c_uint64), ("out_batch", ct.c_uint64), ("keys", ct.c_uint64),
                ("values", ct.c_uint64), ("count", ct.c_uint32), ("map_fd", ct.c_uint32),
                ("elem_flags", ct.c_uint64), ("flags", ct.c_uint64)]


class ElemAttr(ct.Structure):
    """union bpf_attr, the map element member."""
    _fields_ = [("map_fd", ct.c_uint32), ("_pad", ct.c_uint32), ("key", ct.c_uint64),
                ("value", ct.c_uint64), ("flags", ct.c_uint64)]


class ObjAttr(ct.Structure):
    """union bpf_attr, the BPF_OBJ_* member."""
    _fields_ = [("pathname", ct.c_uint64), ("bpf_fd", ct.c_uint32), ("file_flags", ct.c_uint32)]


def bpf(cmd: int, attr) -> int:
    """bpf(2); returns 0 or the errno."""
    if _libc.syscall(SYS_BPF, cmd, ct.byref(attr), ct.sizeof(attr)) == 0:
        return 0
    return ct.get_errno()


def call(cmd: int, attr) -> int:
    """bpf(2) for commands that return something (an fd, an id): the result, or OSError."""
    r = _libc.syscall(SYS_BPF, cmd, ct.byref(attr), ct.sizeof(attr))
    if r < 0:
        err = ct.get_errno()
        raise OSError(err, f"bpf(2) command {cmd}: {os.strerror(err)}")
    return r


class InfoAttr(ct.Structure):
    """union bpf_attr, the `info` member (BPF_OBJ_GET_INFO_BY_FD)."""
    _fields_ = [("bpf_fd", ct.c_uint32), ("info_len", ct.c_uint32), ("info", ct.c_uint64)]


class IdAttr(ct.Structure):
    """union bpf_attr, the BPF_*_GET_FD_BY_ID member."""
    _fields_ = [("id", ct.c_uint32), ("next_id", ct.c_uint32), ("open_flags", ct.c_uint32)]


def obj_info(fd: int, info) -> None:
    """Fill ``info`` (a ctypes struct bpf_{prog,map,btf}_info, or a prefix of one)."""
    call(BPF_OBJ_GET_INFO_BY_FD, InfoAttr(bpf_fd=fd, info_len=ct.sizeof(info),
                                          info=ct.addressof(info)))


def prog_id(fd: int) -> int:
    """The kernel's id of the program behind ``fd`` (bpf_prog_info.id)."""
    info = (ct.c_uint32 * 2)()  # struct bpf_prog_info: type, id, ...
    obj_info(fd, info)
    return info[1]


def fd_by_id(cmd: int, obj_id: int) -> int:
    """A new fd for a program (BPF_PROG_GET_FD_BY_ID) or BTF object by id; caller closes it."""
    return call(cmd, IdAttr(id=obj_id))


def obj_get(path: str) -> int:
    """A new fd for the map (or program) pinned at ``path``; the caller closes it."""
    buf = ct.create_string_buffer(os.fsencode(path))
    attr = ObjAttr(pathname=ct.addressof(buf))
    fd = _libc.syscall(SYS_BPF, BPF_OBJ_GET, ct.byref(attr), ct.sizeof(attr))
    if fd < 0:
        err = ct.get_errno()
        raise OSError(err, f"BPF_OBJ_GET {path}: {os.strerror(err)}")
    return fd


def lookup_batches(fd: int, ksize: int, vsize: int, batch: int, delete: bool = False,
                   start: int = 0):
    """Walk a map ``batch`` entries per syscall; yields (keys, values, n) as bytes.

    Hash maps are walked by bucket: entries added or removed meanwhile may be missed
    or seen twice. ``delete`` empties a hash map as it goes (LOOKUP_AND_DELETE).
    ``start``: the first index of an array map to read. The caller may stop at any
    time; each slice is one bounded syscall.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, not {batch}")
    cmd = BPF_MAP_LOOKUP_AND_DELETE_BATCH if delete else BPF_MAP_LOOKUP_BATCH
    keys = ct.create_string_buffer(ksize * batch)
    vals = ct.create_string_buffer(vsize * batch)
    # The token is a bucket index (hash) or a key (array): 8 bytes hold either here.
    tok_in, tok_out = ct.c_uint64(0), ct.c_uint64(0)
    first = True
    if start:  # arrays: the token is the last key read; the walk goes on after it
        tok_in.value, first = start - 1, False
    while True:
        attr = BatchAttr(in_batch=0 if first else ct.addressof(tok_in),
                         out_batch=ct.addressof(tok_out), keys=ct.addressof(keys),
                         values=ct.addressof(vals), count=batch, map_fd=fd)
        err = bpf(cmd, attr)
        n = attr.count
        if err == errno.ENOSPC and n == 0:  # one bucket holds more than `batch` entries
            batch *= 2
            keys = ct.create_string_buffer(ksize * batch)
            vals = ct.create_string_buffer(vsize * batch)
            continue
        if err not in (0, errno.ENOENT):
            raise OSError(err, f"BPF_MAP_LOOKUP{'_AND_DELETE' if delete else ''}_BATCH: "
                               f"{os.strerror(err)}")
        if n:
            yield ct.string_at(keys, ksize * n), ct.string_at(vals, vsize * n), n
        if err == errno.ENOENT:  # the walk is complete
            return
        tok_in.value = tok_out.value
        first = False


def update_batch(fd: int, keys: bytes, values: bytes, n: int) -> None:
    kbuf = ct.create_string_buffer(keys, len(keys))
    vbuf = ct.create_string_buffer(values, len(values))
    attr = BatchAttr(keys=ct.addressof(kbuf), values=ct.addressof(vbuf), count=n, map_fd=fd)
    err = bpf(BPF_MAP_UPDATE_BATCH, attr)
    if err:
        raise OSError(err, f"BPF_MAP_UPDATE_BATCH: {os.strerror(err)} after {attr.count} of {n}")


def update_noexist(fd: int, keys: bytes, values: bytes, ksize: int, vsize: int) -> int:
    """Insert records one syscall each, leaving existing keys alone; returns how many."""
    kbuf = ct.create_string_buffer(keys, len(keys))
    vbuf = ct.create_string_buffer(values, len(values))
    kbase, vbase = ct.addressof(kbuf), ct.addressof(vbuf)
    written = 0
    for i in range(len(keys) // ksize):
        attr = ElemAttr(map_fd=fd, key=kbase + i * ksize, value=vbase + i * vsize,
                        flags=BPF_NOEXIST)
        err = bpf(BPF_MAP_UPDATE_ELEM, attr)
        if err == 0:
            written += 1
        elif err != errno.EEXIST:
            raise OSError(err, f"BPF_MAP_UPDATE_ELEM: {os.strerror(err)}")
    return written
