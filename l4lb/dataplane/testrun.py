"""BPF_PROG_TEST_RUN: run an XDP program on a crafted packet, in the kernel.

bcc has no wrapper for it, so this calls bpf(2) (bpfsys) with the test-run attribute.
"""

from __future__ import annotations

import ctypes as ct
import os
from dataclasses import dataclass

from l4lb.dataplane import bpfsys

XDP_VERDICT = {0: "ABORTED", 1: "DROP", 2: "PASS", 3: "TX", 4: "REDIRECT"}


class _TestAttr(ct.Structure):
    _fields_ = [("prog_fd", ct.c_uint32), ("retval", ct.c_uint32),
                ("data_size_in", ct.c_uint32), ("data_size_out", ct.c_uint32),
                ("data_in", ct.c_uint64), ("data_out", ct.c_uint64),
                ("repeat", ct.c_uint32), ("duration", ct.c_uint32),
                ("ctx_size_in", ct.c_uint32), ("ctx_size_out", ct.c_uint32),
                ("ctx_in", ct.c_uint64), ("ctx_out", ct.c_uint64),
                ("flags", ct.c_uint32), ("cpu", ct.c_uint32), ("batch_size", ct.c_uint32),
                ("_pad", ct.c_uint32)]


@dataclass
class RunResult:
    verdict: str   # "PASS", "TX", "DROP", ...
    retval: int
    data: bytes    # the packet after the program ran
    duration_ns: int  # the kernel's average per repeat


def test_run(prog_fd: int, packet: bytes, repeat: int = 1, headroom: int = 256,
             ctx: bytes | None = None) -> RunResult:
    """Run the program once (or `repeat` times) on `packet` and return what it made of it.
    `ctx`: the start of a struct __sk_buff for tc programs (e.g. its mark)."""
    inbuf = ct.create_string_buffer(bytes(packet), len(packet))
    outlen = len(packet) + headroom
    outbuf = ct.create_string_buffer(outlen)
    attr = _TestAttr(prog_fd=prog_fd, data_size_in=len(packet), data_size_out=outlen,
                     data_in=ct.addressof(inbuf), data_out=ct.addressof(outbuf), repeat=repeat)
    if ctx is not None:
        cbuf = ct.create_string_buffer(bytes(ctx), len(ctx))
        attr.ctx_in, attr.ctx_size_in = ct.addressof(cbuf), len(ctx)
    err = bpfsys.bpf(bpfsys.BPF_PROG_TEST_RUN, attr)
    if err:
        raise OSError(err, f"BPF_PROG_TEST_RUN failed: {os.strerror(err)}")
    return RunResult(verdict=XDP_VERDICT.get(attr.retval, str(attr.retval)), retval=attr.retval,
                     data=outbuf.raw[:attr.data_size_out], duration_ns=attr.duration)
