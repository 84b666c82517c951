"""The sync socket's datagrams, a run of them a system call where the kernel offers it.

UDP segmentation offload (Linux >= 4.18 send, 5.0 receive): the sender hands the
kernel a run of equal-sized datagrams in one sendmsg (UDP_SEGMENT: each still a
datagram of its own on the wire, each authenticated on its own), the receiver gets
runs of them back in one recvmsg (UDP_GRO; cmsg: the segment size). On loopback
(bench/sync.py) this took a datagram's send from 1.9 to 0.18 us and its receive from
1.1 to 0.15 us, and wakes the receiving loop once a run. Where the kernel or the
device refuses (a device without checksum offload: EIO), the socket falls back to a
datagram a call for good (counted: gso_fallbacks). What the datagrams say is the
agent's and machine.py's business; this only moves bytes.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections import Counter

from l4lb.sync.codec import MAX_DATAGRAM

log = logging.getLogger("l4lb.sync")

SOL_UDP = getattr(socket, "SOL_UDP", 17)
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
UDP_GRO = getattr(socket, "UDP_GRO", 104)
USE_GSO = True  # (tests turn these off to check the plain path)
USE_GRO = True
GSO_SEGMENTS = 64  # datagrams per sendmsg, at most (the kernel's UDP_MAX_SEGMENTS)
GSO_BYTES = 65000  # ... and bytes: one IP packet's worth
_GSO_REFUSED = {errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.EMSGSIZE}
_CMSG_SPACE = socket.CMSG_SPACE(4)
_QUIET_RECV_ERRORS = (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH)


class DatagramSocket:
    """A bound, non-blocking UDP socket: ``send`` datagrams to peers, ``recv`` runs.

    ``counters`` (the agent's) gets gso_sends, gso_fallbacks, send_dropped (the
    socket buffer was full) and send_errors."""

    def __init__(self, sock: socket.socket, counters: Counter):
        self.sock = sock
        self.counters = counters
        self.gso = USE_GSO  # sending runs of datagrams in one call (UDP_SEGMENT)
        self.gro = False  # receiving them so (UDP_GRO)
        if USE_GRO:
            try:
                sock.setsockopt(SOL_UDP, UDP_GRO, 1)
                self.gro = True
            except OSError as e:
                log.info("sync: no UDP GRO (%s): one datagram per read", e.strerror)
        self.buf = bytearray(65536 if self.gro else MAX_DATAGRAM + 1)
        self._last_send_error = 0.0

    # ----------------------------------------------------------------- sending
    def send(self, datagrams: list[bytes], peers) -> None:
        """Every datagram to every peer, in order; runs of equal-sized ones (the last
        of a run may be shorter) in one call each while GSO works."""
        if not datagrams:
            return
        if not self.gso or len(datagrams) < 2:
            for d in datagrams:
                for peer in peers:
                    self.sendto(d, peer)
            return
        i, n = 0, len(datagrams)
        while i < n:
            size = len(datagrams[i])
            j = i + 1
            limit = min(n, i + GSO_SEGMENTS, i + max(1, GSO_BYTES // size))
            while j < limit and len(datagrams[j]) == size:
                j += 1
            if j < limit and len(datagrams[j]) < size:
                j += 1  # a shorter one may end the run
            run = datagrams[i:j]
            for peer in peers:
                if len(run) == 1 or not self.gso:
                    for d in run:
                        self.sendto(d, peer)
                else:
                    self._send_run(run, size, peer)
            i = j

    def _send_run(self, run: list[bytes], size: int, peer) -> None:
        """Datagrams of ``size`` bytes (the last maybe shorter) in one sendmsg (GSO)."""
        try:
            self.sock.sendmsg([b"".join(run)],
                              [(SOL_UDP, UDP_SEGMENT, size.to_bytes(2, "little"))], 0, peer)
            self.counters["gso_sends"] += 1
            return
        except BlockingIOError:
            self.counters["send_dropped"] += len(run)
            return
        except OSError as e:
            if e.errno not in _GSO_REFUSED:
                self._send_failed(peer, e, len(run))
                return
            self.gso = False  # refused here (no checksum offload, an old kernel): for good
            self.counters["gso_fallbacks"] += 1
            log.info("sync: UDP GSO refused (%s): one datagram per send", e.strerror)
        for d in run:
            self.sendto(d, peer)

    def sendto(self, d: bytes, peer) -> None:
        try:
            self.sock.sendto(d, peer)
        except BlockingIOError:
            self.counters["send_dropped"] += 1
        except OSError as e:
            self._send_failed(peer, e, 1)

    def _send_failed(self, peer, e: OSError, n: int) -> None:
        self.counters["send_errors"] += n
        now = time.monotonic()
        if now - self._last_send_error > 10:
            self._last_send_error = now
            log.warning("sync: send to %s:%d failed: %s", *peer[:2], e.strerror)

    # ----------------------------------------------------------------- reading
    def recv(self) -> tuple[int, int, object] | None:
        """One read into ``self.buf``: (n bytes, segment size, source address), the
        datagrams being the buffer's consecutive seg-byte pieces (the last maybe
        shorter); None when nothing waits (or the read failed: logged unless it is an
        ICMP error reported on the socket)."""
        try:
            if self.gro:  # a run of datagrams of one size (the last maybe shorter)
                n, anc, _flags, addr = self.sock.recvmsg_into((self.buf,), _CMSG_SPACE)
                seg = n
                for level, kind, data in anc:
                    if level == SOL_UDP and kind == UDP_GRO and len(data) >= 2:
                        seg = int.from_bytes(data[:4] if len(data) >= 4 else data[:2],
                                             "little") or n
                return n, seg, addr
            n, addr = self.sock.recvfrom_into(self.buf)
            return n, n, addr
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            if e.errno not in _QUIET_RECV_ERRORS:
                log.warning("sync: receive failed: %s", e)
            return None


__all__ = ["DatagramSocket", "SOL_UDP", "UDP_SEGMENT", "UDP_GRO", "GSO_SEGMENTS", "GSO_BYTES"]
