"""Maglev fills run by the kernel: bpf/maglev_fill.c through BPF_PROG_TEST_RUN.

l4lb.maglev fills a ring with numpy in ~10-15 ms at 1,000 reals and M = 65537 on
the test VM (most of a ring update). The same algorithm compiled to BPF and run
by the JIT takes about half (bench/control.py). The fill state is one map value
the program and this module share through mmap: the inputs are written in place,
the program advances the fill a bounded number of steps per run (``repeat`` runs
per syscall), and the owners are read in place. No copies through bpf(2).

The tables must be the ones numpy makes, on every node, or a pair splits its
flows: tests/bpf/test_maglev_fill.py compares them, and every fill here is
checked before use (each real's share must equal its turns; otherwise the error
is logged and numpy fills instead).

This file holds the one Python mirror of ``struct fill``.
"""

from __future__ import annotations

import ctypes as ct
import logging
import mmap
import threading

import numpy as np

from l4lb import maglev
from l4lb.dataplane import loader
from l4lb.dataplane.testrun import test_run

log = logging.getLogger("l4lb.fill")

# struct fill: the header's u32 fields, then `steps` (u64) at 48.
_HEADER = ("m", "n", "phase", "cur", "npending", "ntouched", "kept", "real", "slot",
           "found", "need", "pos")
_HEADER_BYTES = 56
_STEPS_AT = 48
_PER_REAL = ("offset", "skip", "row", "tcount", "served", "nxt", "pending")
_DONE, _RUNNING = 0, 1  # the program's return values (2: inconsistent inputs)
UNSET = (1 << 63) - 1
# Values of this size fit in one kmalloc'd array element (KMALLOC_MAX_SIZE, 4 MiB).
_MAX_BYTES = 4 << 20
_STEPS_PER_RUN, _BURST = 8, 64  # FILL_STEPS and BURST in bpf/maglev_fill.c


def _pow2_above(x: int) -> int:
    return 1 << max(1, x.bit_length())


class Layout:
    """Byte offsets of struct fill for FILL_SLOTS = ``slots``, FILL_REALS = ``reals``."""

    def __init__(self, slots: int, reals: int):
        self.slots, self.reals = slots, reals
        self.per_real = _HEADER_BYTES
        self.touched = self.per_real + 4 * len(_PER_REAL) * reals
        self.owner = self.touched + 4 * slots
        self.keyn = self.owner + 4 * slots
        self.cell = self.keyn + 8 * slots
        self.size = self.cell + 8 * slots

    @classmethod
    def for_limits(cls, ring_max: int, max_reals: int) -> Layout:
        # strictly above ring_max: slot indices are masked with slots - 1
        return cls(_pow2_above(ring_max), _pow2_above(max_reals - 1))

    def cflags(self) -> list[str]:
        # the program checks every offset (_Static_assert): a mirror out of step
        # with the C struct does not compile
        return [f"-DFILL_SLOTS={self.slots}", f"-DFILL_REALS={self.reals}",
                f"-DFILL_BYTES={self.size}", f"-DFILL_TOUCHED_AT={self.touched}",
                f"-DFILL_OWNER_AT={self.owner}", f"-DFILL_KEYN_AT={self.keyn}",
                f"-DFILL_CELL_AT={self.cell}"]


class KernelFill:
    """A loaded fill program; call it like maglev's fill engines (thread-safe)."""

    def __init__(self, ring_max: int = maglev.DEFAULT_RING_SIZE, max_reals: int = 4096):
        self.layout = lay = Layout.for_limits(ring_max, max_reals)
        if lay.size > _MAX_BYTES:
            raise loader.DataplaneError(
                f"a kernel Maglev fill for rings of {ring_max} slots needs {lay.size} bytes "
                f"in one map value (at most {_MAX_BYTES}): numpy fills these rings")
        bcc = loader._bcc()
        try:
            self._bpf = bcc.BPF(src_file=str(loader.BPF_DIR / "maglev_fill.c").encode(),
                                cflags=lay.cflags())
            self._fn = self._bpf.load_func(b"maglev_fill", bcc.BPF.SCHED_CLS)
            # Explicit types: bcc would otherwise build a ctypes struct of the
            # multi-megabyte value, which takes seconds.
            table = self._bpf.get_table(b"fill_state", keytype=ct.c_uint32,
                                        leaftype=ct.c_ubyte * 8)
            self._mm = mmap.mmap(table.map_fd, (lay.size + mmap.PAGESIZE - 1)
                                 // mmap.PAGESIZE * mmap.PAGESIZE,
                                 mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except Exception as e:  # bcc raises bare Exception
            raise loader.DataplaneError(f"loading bpf/maglev_fill.c failed: {e}") from e
        buf = np.frombuffer(self._mm, dtype=np.uint8)
        self._head = buf[:_HEADER_BYTES].view(np.uint32)
        self._steps = buf[_STEPS_AT:_HEADER_BYTES].view(np.uint64)
        self._real = buf[lay.per_real:lay.touched].view(np.uint32).reshape(len(_PER_REAL),
                                                                          lay.reals)
        self._owner = buf[lay.owner:lay.keyn].view(np.uint32)
        self._keyn = buf[lay.keyn:lay.cell].view(np.uint64)
        self._cell = buf[lay.cell:lay.size].view(np.uint64)
        self._lock = threading.Lock()
        self._packet = bytes(64)  # a test run needs a packet; the program ignores it
        self.last_steps = 0

    def fits(self, n: int, size: int) -> bool:
        return 0 < n < self.layout.reals and size < self.layout.slots

    def __call__(self, perms, weights, size: int):
        """The owner rank per slot (np.int32), as maglev._fill_numpy returns it, or
        None when this ring does not fit or the fill failed (numpy fills then)."""
        n = len(perms)
        if not self.fits(n, size):
            return None
        turns, keyn, row = maglev.turn_order(weights, size)
        if keyn.size > self.layout.slots:
            return None
        with self._lock:
            if self._head is None:  # closed (the daemon is stopping): numpy fills
                return None
            self._load(perms, turns, keyn, row, size)
            try:
                done = self._run(size)
            except OSError as e:  # bpf(2) refused the test run: numpy still can
                log.error("the kernel's Maglev fill failed (%s); numpy fills instead", e)
                return None
            if not done:
                return None
            owner = self._owner[:size].astype(np.int32)
            self.last_steps = int(self._steps[0])
        # Every real must hold exactly its turns: a wrong fill never reaches a map.
        if owner.max(initial=0) >= n or not np.array_equal(
                np.bincount(owner, minlength=n), turns):
            log.error("the kernel's Maglev fill of %d reals (M=%d) does not match its "
                      "turns; numpy fills instead", n, size)
            return None
        return owner

    def _load(self, perms, turns, keyn, row, size: int) -> None:
        n = len(perms)
        head = self._head
        head[:] = 0
        head[_HEADER.index("m")], head[_HEADER.index("n")] = size, n
        p = np.asarray(perms, dtype=np.int64).reshape(n, -1)
        real = self._real
        real[0, :n], real[1, :n] = p[:, 0], p[:, 1]  # offset, skip
        real[2, :n], real[3, :n] = row, turns
        real[4:6, :n] = 0  # served, nxt
        pending = np.flatnonzero(turns)
        real[6, :pending.size] = pending
        head[_HEADER.index("npending")] = pending.size
        # real i's k-th turn has priority keyn[row[i] + k] + i (maglev._fill_numpy)
        self._keyn[:keyn.size] = keyn
        self._cell[:size] = UNSET
        self._steps[0] = 0

    def _run(self, size: int) -> bool:
        # Runs needed: about 20 * M steps of work; runs past the end return at once.
        repeat = max(64, 20 * size // (_STEPS_PER_RUN * _BURST))
        budget = 64 * size  # runs; a fill never needs more (each run makes progress)
        while budget > 0:
            r = test_run(self._fn.fd, self._packet, repeat=repeat, headroom=0)
            budget -= repeat
            if r.retval == _DONE:
                return True
            if r.retval != _RUNNING:
                break
            repeat = max(64, repeat // 4)
        log.error("the kernel's Maglev fill stopped (phase %d, %d steps) for M=%d; numpy "
                  "fills instead", self._head[_HEADER.index("phase")], int(self._steps[0]), size)
        return False

    def close(self) -> None:
        """Free the program and its 3 MiB map (the numpy views must go before the mmap)."""
        with self._lock:
            self._head = self._steps = self._real = self._owner = self._keyn = None
            self._cell = None
            try:
                self._mm.close()
            except BufferError:  # a caller still holds a view: the mapping goes with it
                pass
            self._bpf.cleanup()


def enable(ring_max: int, max_reals: int) -> KernelFill | None:
    """Load the kernel fill and make maglev use it; None (numpy stays) if it cannot load."""
    try:
        engine = KernelFill(ring_max, max_reals)
    except loader.DataplaneError as e:
        log.warning("%s; Maglev rings are filled by numpy", e)
        return None
    maglev.set_fill_engine(engine)
    log.info("Maglev rings are filled by the kernel (bpf/maglev_fill.c: rings up to %d "
             "slots, %d reals)", engine.layout.slots - 1, engine.layout.reals - 1)
    return engine
