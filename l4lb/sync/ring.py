"""The new-flow ring buffer (flow_events): consumed on the loop, in a thread, or polled.

``RING_MODES``: "epoll" (the default) reads on the event loop: the loop
watches libbpf's epoll fd for the ring and consumes what is there when it
becomes readable, so an event costs no thread hop and no polling. "thread"
(``ring_buffer_poll`` in a thread, events handed over with
``call_soon_threadsafe``) and "poll" (``ring_buffer_consume`` every
millisecond) are kept for comparison; bench/sync.py measures them.
"""

from __future__ import annotations

import asyncio
import ctypes as ct
import logging
import threading
import weakref
from collections.abc import Callable

log = logging.getLogger("l4lb.sync")

RING_MODES = ("epoll", "thread", "poll")

# One bcc ring-buffer callback per Program, opened once (bcc cannot close one;
# opening the same map twice would give two consumers of one ring): agents
# come and go by swapping the sink it calls.
_ring_sinks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_libbpf = None


def _open_ring(prog, sink: Callable[[bytes], None]) -> None:
    holder = _ring_sinks.get(prog)
    if holder is None:
        holder = _ring_sinks[prog] = [sink]

        def cb(_ctx, data, size, _h=holder):
            _h[0](ct.string_at(data, size))
            return 0

        prog.bpf[b"flow_events"].open_ring_buffer(cb)
    else:
        holder[0] = sink


def _close_ring(prog) -> None:
    holder = _ring_sinks.get(prog)
    if holder is not None:
        holder[0] = _drop_event


def _drop_event(_raw: bytes) -> None:
    pass


def _ring_epoll_fd(prog) -> int:
    """libbpf's epoll fd for the program's ring buffers (readable when one has data)."""
    global _libbpf
    mgr = getattr(prog.bpf, "_ringbuf_manager", None)
    if not mgr:
        raise RuntimeError("no ring buffer open")
    if _libbpf is None:
        lib = ct.CDLL("libbpf.so.1", use_errno=True)
        lib.ring_buffer__epoll_fd.argtypes = [ct.c_void_p]
        lib.ring_buffer__epoll_fd.restype = ct.c_int
        _libbpf = lib
    fd = _libbpf.ring_buffer__epoll_fd(mgr)
    if fd < 0:
        raise RuntimeError("ring_buffer__epoll_fd failed")
    return fd


class RingConsumer:
    """Hands batches of raw flow events to ``on_events`` (always on the loop).

    ``on_error`` is called (on the loop) when consuming fails; the consumer goes on.
    """

    def __init__(self, prog, mode: str, on_events: Callable[[list[bytes]], None],
                 on_error: Callable[[Exception], None]) -> None:
        if mode not in RING_MODES:
            raise ValueError(f"ring_mode must be one of {RING_MODES}")
        self.prog = prog
        self.mode = mode
        self._on_events = on_events
        self._on_error = on_error
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ring_fd: int | None = None
        self._ring_thread: threading.Thread | None = None
        self._ring_task: asyncio.Task | None = None
        self._ring_stop = threading.Event()
        self._events: list[bytes] = []

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._ring_stop.clear()
        if self.mode == "thread":
            # The bcc callback runs in the polling thread: it gets its own list.
            buf: list[bytes] = []
            _open_ring(self.prog, buf.append)
            t = threading.Thread(target=self._ring_thread_main, args=(loop, buf),
                                 name="sync-ring", daemon=True)
            self._ring_thread = t
            t.start()
            return
        _open_ring(self.prog, self._events.append)
        if self.mode == "epoll":
            self._ring_fd = _ring_epoll_fd(self.prog)
            loop.add_reader(self._ring_fd, self.drain)
        else:
            self._ring_task = loop.create_task(self._ring_poll_main(), name="sync-ring")

    def _ring_thread_main(self, loop: asyncio.AbstractEventLoop, buf: list[bytes]) -> None:
        bpf = self.prog.bpf
        while not self._ring_stop.is_set():
            try:
                bpf.ring_buffer_poll(100)
            except Exception:  # noqa: BLE001
                log.exception("sync: ring buffer poll failed")
                self._ring_stop.wait(1.0)
            if buf:
                batch = buf[:]
                del buf[:]
                try:
                    loop.call_soon_threadsafe(self._on_events, batch)
                except RuntimeError:  # the loop is closed
                    return

    async def _ring_poll_main(self) -> None:
        while True:
            self.drain()
            await asyncio.sleep(0.001)

    async def stop(self) -> None:
        self._ring_stop.set()
        if self._ring_fd is not None and self._loop is not None:
            self._loop.remove_reader(self._ring_fd)
            self._ring_fd = None
        if self._ring_thread is not None:
            await asyncio.to_thread(self._ring_thread.join, 2.0)
            self._ring_thread = None
        if self._ring_task is not None:
            self._ring_task.cancel()
            self._ring_task = None
        _close_ring(self.prog)

    def drain(self) -> None:
        """Consume what the ring holds (on the loop) and hand it over."""
        if self.mode == "thread" or self._loop is None:
            return
        try:
            self.prog.bpf.ring_buffer_consume()
        except Exception as e:  # noqa: BLE001
            self._on_error(e)
        if self._events:
            batch = self._events[:]
            del self._events[:]
            self._on_events(batch)
