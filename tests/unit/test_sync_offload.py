"""UDP segmentation offload of the sync socket (udp.py: UDP_SEGMENT / UDP_GRO):
runs of datagrams in one send and one read, each datagram still authenticated on
its own, and the plain path where the kernel or the device refuses."""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from collections import Counter

from test_sync_agent import (
    BACKUP_VIPS,
    CLIENT,
    MASTER_VIPS,
    VIP,
    FakeProg,
    FakeTables,
    free_port,
    make_agent,
    prove,
    started_backup,
    sync_cfg,
    until,
    walk_entries,
)

from l4lb.sync import agent as sync_agent
from l4lb.sync import udp
from l4lb.sync.codec import MAX_DATAGRAM, PREFIX_LEN, decode

KEY = b"0123456789abcdef0123"
FULL_HEAD = sync_agent._FULL_HEAD  # a full-walk chunk's first body bytes


def walk_between_two_agents(n: int) -> tuple[dict, dict]:
    """A master's table of n flows walked to a fresh backup; both agents' status."""
    async def main():
        pa, pb = free_port(), free_port()
        ta, tb = FakeTables(MASTER_VIPS), FakeTables(BACKUP_VIPS)
        now = time.monotonic_ns()
        for i in range(n):
            ta.add(CLIENT, 1024 + i, VIP, 80, 1 + i % 2, 0, now)
        a = make_agent(sync_cfg(pa, pb), "lb1", ta, FakeProg(), role="master", ring_mode="poll")
        b = make_agent(sync_cfg(pb, pa), "lb2", tb, FakeProg(), role="backup", ring_mode="poll")
        await a.start()
        await b.start()
        try:
            await until(lambda: len(tb.conns) == n, 10)
            assert tb.entry(CLIENT, 1024, VIP, 80)[:2] == (41, 6)  # .31, translated
            assert tb.entry(CLIENT, 1025, VIP, 80)[:2] == (40, 6)  # .32
            await until(lambda: b.status()["full_walks"]["received_complete"] >= 1)
            return a.status(), b.status()
        finally:
            await a.stop()
            await b.stop()

    return asyncio.run(main())


def test_walk_goes_in_runs_and_arrives_whole():
    sa, sb = walk_between_two_agents(3000)  # ~45 datagrams: a few runs
    assert sa["offload"]["gso"] and sb["offload"]["gro"]
    assert sa["offload"]["gso_sends"] >= 1 and sa["offload"]["gso_fallbacks"] == 0
    # (a walk that came before the backup had proven the master's session is
    # refused, "unproven", and walked again once it has: machine.py)
    assert set(sb["rejected"]) <= {"unproven"} and sb["full_walks"]["received_complete"] >= 1


def test_plain_path_when_offload_is_off(monkeypatch):
    monkeypatch.setattr(udp, "USE_GSO", False)
    monkeypatch.setattr(udp, "USE_GRO", False)
    sa, sb = walk_between_two_agents(3000)
    assert not sa["offload"]["gso"] and not sb["offload"]["gro"]
    assert sa["offload"]["gso_sends"] == 0
    assert set(sb["rejected"]) <= {"unproven"} and sb["full_walks"]["received_complete"] >= 1


class RefusingSocket:
    """A socket whose kernel refuses UDP GSO (sendmsg: EIO, as for a device without
    checksum offload) and GRO (setsockopt: ENOPROTOOPT); records what was sent."""

    def __init__(self):
        self.sent: list[tuple[bytes, tuple]] = []
        self.sendmsg_calls = 0

    def sendmsg(self, bufs, anc, flags, addr):
        self.sendmsg_calls += 1
        raise OSError(errno.EIO, "Input/output error")

    def sendto(self, data, addr):
        self.sent.append((data, addr))

    def setsockopt(self, level, opt, value):
        raise OSError(errno.ENOPROTOOPT, "Protocol not available")


def test_gso_refused_falls_back_to_a_datagram_per_send_for_good():
    sock, counters = RefusingSocket(), Counter()
    io = udp.DatagramSocket(sock, counters)
    assert io.gso and not io.gro and len(io.buf) == MAX_DATAGRAM + 1  # GRO refused: plain reads
    run = [bytes([i]) * 100 for i in range(5)] + [b"\xff" * 40]  # equal sizes, a shorter last
    peer = ("127.0.0.1", 9542)
    io.send(run, [peer])
    assert sock.sendmsg_calls == 1 and sock.sent == [(d, peer) for d in run]  # all, in order
    assert not io.gso and counters["gso_fallbacks"] == 1 and counters["send_errors"] == 0
    io.send(run, [peer])  # from now on one datagram per call: no more tries
    assert sock.sendmsg_calls == 1 and len(sock.sent) == 12


def test_runs_are_cut_by_size_and_limits():
    class Recorder(RefusingSocket):
        def sendmsg(self, bufs, anc, flags, addr):
            (level, opt, size), = anc
            self.sent.append((("run", int.from_bytes(size, "little"), len(bufs[0])), addr))

    sock = Recorder()
    io = udp.DatagramSocket(sock, Counter())
    assert io.gso and not io.gro
    grams = [b"a" * 1000] * 3 + [b"b" * 500] + [b"c" * 500] * 2 + [b"d" * 600] + [b"e" * 1000] * 70
    io.send(grams, [("127.0.0.1", 9542)])
    got = [x for x, _ in sock.sent]
    # a shorter datagram ends a run, a longer one starts the next, a lone one goes
    # plain; at most GSO_SEGMENTS (64) a run
    assert got == [("run", 1000, 3500), ("run", 500, 1000), b"d" * 600,
                   ("run", 1000, 64_000), ("run", 1000, 6000)]


def test_a_read_run_is_checked_datagram_by_datagram():
    """One tampered datagram in a coalesced run is rejected alone; the others install."""
    from l4lb.sync.machine import Sender  # noqa: PLC0415

    async def main():
        pb, peer = free_port(), free_port()
        b, tb = await started_backup(pb, peer)
        try:
            assert b.gro
            now = time.time()
            s = Sender("lb1", KEY, now, role="master", full_rate=None)
            walk = walk_entries(600)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out:
                out.bind(("127.0.0.1", peer))
                await prove(b, s, out, pb)
                s.start_full(walk, now)
                grams = []
                while s.full_in_progress:
                    grams += s.poll(now)
                grams = [g for g in grams if g[PREFIX_LEN:PREFIX_LEN + 2] == FULL_HEAD]
                size = len(grams[0])
                assert len(grams) >= 5 and all(len(g) == size for g in grams[:-1])
                assert len(grams[-1]) <= size
                per_chunk = len(decode(grams[2], KEY, 2048).entries)  # what it carries
                bad = bytearray(grams[2])
                bad[-1] ^= 1  # its MAC no longer matches
                grams[2] = bytes(bad)
                out.sendmsg([b"".join(grams)], [(udp.SOL_UDP, udp.UDP_SEGMENT,
                                                 size.to_bytes(2, "little"))],
                            0, ("127.0.0.1", pb))
                await until(lambda: b.status()["rejected"].get("bad_mac", 0) == 1)
                await until(lambda: len(tb.conns) >= len(walk) - per_chunk)
                await asyncio.sleep(0.05)
            assert len(tb.conns) == len(walk) - per_chunk
            assert tb.entry(CLIENT, 20000, VIP, 80)[:2] == (41, 6)
            assert b.status()["rejected"] == {"bad_mac": 1}
        finally:
            await b.stop()

    asyncio.run(main())
