"""A full walk of the conn table made in a thread, handed to the loop chunk by chunk."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from l4lb.sync.codec import PackedEntries

WALK_AHEAD = 256  # full-walk chunks the walk thread may have ready ahead of sending


class _WalkClosed(Exception):
    pass


class _WalkFeed:
    """A full walk made in a thread: BPF batch lookups, translation to wire
    records and cutting into datagram-sized chunks all run there; the loop only
    takes ready chunks (``get``, never blocks) to frame, sign and send them at
    the walk's pace. At most ``ahead`` chunks wait; the thread wakes the loop
    (``wake``, thread-safe) when the loop found none ready."""

    def __init__(self, produce: Callable[[_WalkFeed], None], wake: Callable[[], None],
                 ahead: int = WALK_AHEAD) -> None:
        self._q: deque = deque()
        self._cv = threading.Condition()
        self._ahead = ahead
        self._wake = wake
        self._want = False
        self._blocked = False  # the producer waits for room
        self._closed = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, args=(produce,),
                                        name="sync-walk", daemon=True)
        self._thread.start()

    def _main(self, produce) -> None:
        try:
            produce(self)
        except _WalkClosed:
            return
        except Exception as e:  # noqa: BLE001 - handed to the sender (full_failed)
            with self._cv:
                self._error = e
                self._want = False
            self._wake()

    def put(self, chunk: PackedEntries, last: bool) -> None:
        """(walk thread) Queue one chunk; blocks while ``ahead`` are waiting."""
        self.put_many([(chunk, last)])

    def put_many(self, items: list) -> None:
        """(walk thread) Queue ``(chunk, last)`` items together (one lock, one wake-up
        for a BPF batch's worth of chunks); blocks while ``ahead`` are waiting, so at
        most ``ahead`` + len(items) are ever queued."""
        if not items:
            return
        with self._cv:
            while len(self._q) >= self._ahead and not self._closed:
                self._blocked = True
                self._cv.wait(0.5)
            self._blocked = False
            if self._closed:
                raise _WalkClosed
            self._q.extend(items)
            want, self._want = self._want, False
        if want:
            self._wake()

    def get(self):
        """(loop) The next (chunk, last), or None if none is ready yet."""
        with self._cv:
            q = self._q
            if q:
                item = q.popleft()
                # (the producer waits for room: wake it once, as soon as there is some)
                if self._blocked and len(q) < self._ahead:
                    self._blocked = False
                    self._cv.notify()
                return item
            if self._error is not None:
                raise self._error
            self._want = True
            return None

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._q.clear()
            self._cv.notify_all()
