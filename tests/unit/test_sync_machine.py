"""Conn-table sync sender/receiver state machines (sans-I/O)."""

from __future__ import annotations

import hmac
import struct

import msgpack
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from l4lb.sync import machine
from l4lb.sync.codec import (
    VERSION,
    Entries,
    FullChunk,
    Heartbeat,
    Hello,
    SyncEntry,
    decode,
    encode,
    entry_capacity,
)
from l4lb.sync.machine import (
    REJECT_REASONS,
    Backlog,
    InstallEntries,
    PeerDown,
    PeerRole,
    PeerUp,
    Receiver,
    SendChallenge,
    Sender,
    SendResponse,
    new_session,
)

KEY = b"0123456789abcdef0123456789abcdef"
T0 = 1_700_000_000.0
V4 = bytes([10, 0, 0, 1])
REAL = bytes([10, 1, 0, 2])


def ent(i: int) -> SyncEntry:
    return SyncEntry(i.to_bytes(4, "big"), 1024 + i % 60000, V4, 80, 6, REAL)


def ents(a: int, b: int) -> list[SyncEntry]:
    return [ent(i) for i in range(a, b)]


def master(now: float = T0, **kw) -> Sender:
    kw.setdefault("full_interval_s", None)
    kw.setdefault("heartbeat_interval_s", 3600.0)  # tests that want heartbeats say so
    s = Sender("lb1", KEY, now, role="master", **kw)
    if s.full_due(now):  # becoming master makes a walk due: start with an empty table
        s.start_full([], now)
    s.poll(now)  # hello + the empty walk
    return s


def receiver(**kw) -> Receiver:
    return Receiver(KEY, {"lb1", "lb2"}, max_size=65507, **kw)


def kinds(datagrams: list[bytes]) -> list[str]:
    return [decode(d, KEY, 65507).kind for d in datagrams]


class Standby:
    """A receiver plus the conn table it keeps (what the agent would do)."""

    def __init__(self, **kw) -> None:
        self.rx = receiver(**kw)
        self.installed: dict[tuple, bytes] = {}
        self.actions: list = []

    def feed(self, datagrams, now: float = T0, addr=("192.0.2.1", 7777)) -> list:
        out = []
        for d in datagrams:
            acts = self.rx.on_datagram(d, addr, now)
            for a in acts:
                if isinstance(a, InstallEntries):
                    for e in a.entries:
                        self.installed[e[:5]] = e.real
            out += acts
        self.actions += out
        return out


def handshake(s: Sender, sb, now: float = T0, addr=("192.0.2.1", 7777)) -> PeerUp:
    """The round trip a receiver asks of a session before adopting it (no trust
    on first use): the sender's challenge is answered and, its session being
    new, challenged back; the sender's Response proves the session live."""
    rx = sb.rx if isinstance(sb, Standby) else sb
    acts = rx.on_datagram(s.challenge(b"\x5a" * 16, now), addr, now)
    (ch,) = [a for a in acts if isinstance(a, SendChallenge)]
    assert acts[-1] == SendResponse(s.node_id, addr, b"\x5a" * 16, False)
    acts = rx.on_datagram(s.respond(ch.nonce, now), addr, now)
    assert len(acts) == 1 and isinstance(acts[0], PeerUp) and acts[0].session == s.session
    return acts[0]


def entries_of(datagrams) -> list[SyncEntry]:
    out = []
    for d in datagrams:
        m = decode(d, KEY, 65507)
        out += getattr(m, "entries", [])
    return out


# =========================================================================== sender


def test_round_trip_incremental() -> None:
    s, sb = master(), Standby()
    up = handshake(s, sb)
    assert up.sender == "lb1" and up.role == "master" and not up.restarted
    s.add_new_flows(ents(0, 10), T0)
    dgs = s.poll(T0 + 0.01)
    assert kinds(dgs) == ["entries"]
    acts = sb.feed(dgs, T0 + 0.012)
    assert acts == [InstallEntries("lb1", ents(0, 10))]  # unchanged, full_id None
    assert sb.rx.stats["entries"] == 10 and sb.rx.stats["lag_s"] == pytest.approx(0.012, abs=1e-6)
    assert sb.rx.counters == dict.fromkeys(REJECT_REASONS, 0)


def test_batch_by_count() -> None:
    s = master(max_batch_entries=8, max_delay_s=1.0)
    s.add_new_flows(ents(0, 7), T0)
    assert s.poll(T0) == []
    assert s.next_deadline(T0) == pytest.approx(T0 + 1.0)
    s.add_new_flows([ent(7)], T0)
    assert s.next_deadline(T0) == T0
    dgs = s.poll(T0)
    assert kinds(dgs) == ["entries"] and entries_of(dgs) == ents(0, 8)
    assert s.pending_entries == 0 and s.poll(T0) == []


def test_batch_by_time() -> None:
    s = master(max_batch_entries=1000, max_delay_s=0.005)
    s.add_new_flows([ent(1)], T0)
    s.add_new_flows([ent(2)], T0 + 0.003)  # the batch's age counts from its oldest entry
    assert s.poll(T0 + 0.004) == []
    assert s.next_deadline(T0 + 0.004) == pytest.approx(T0 + 0.005)
    dgs = s.poll(T0 + 0.005)
    assert entries_of(dgs) == [ent(1), ent(2)]
    assert decode(dgs[0], KEY, 65507).ts == T0  # carries creation time, for the lag


def test_big_batch_splits_into_datagrams() -> None:
    for payload in (512, 1400, 9000):
        s = master(max_payload=payload)
        s.add_new_flows(ents(0, 5000), T0)
        dgs = s.poll(T0)
        assert max(map(len, dgs)) <= payload
        assert len(dgs) == -(-5000 // entry_capacity(payload, "lb1"))
        assert entries_of(dgs) == ents(0, 5000)
        seqs = [decode(d, KEY, 65507).seq for d in dgs]
        assert seqs == list(range(seqs[0], seqs[0] + len(dgs)))


def test_backup_sends_no_entries() -> None:
    s = Sender("lb2", KEY, T0)  # backup by default
    assert s.role == "backup" and not s.full_due(T0)
    s.add_new_flows(ents(0, 100), T0)
    assert kinds(s.poll(T0)) == ["hello"]
    assert s.poll(T0 + 0.5) == []
    assert kinds(s.poll(T0 + 1.0)) == ["heartbeat"]
    assert s.stats["dropped_not_master"] == 100 and s.stats["entries"] == 0
    with pytest.raises(RuntimeError):
        s.start_full([], T0)


def test_role_changes() -> None:
    s = Sender("lb1", KEY, T0)
    s.poll(T0)
    s.set_role("master", T0 + 1)
    assert s.full_due(T0 + 1)  # the peer may have missed anything: walk now
    dgs = s.poll(T0 + 1)
    m = decode(dgs[0], KEY, 65507)
    assert isinstance(m, Hello) and m.role == "master"
    s.start_full(ents(0, 1000), T0 + 1)
    s.add_new_flows(ents(5000, 5010), T0 + 1)
    s.set_role("backup", T0 + 1)  # demoted: stop sending, drop what is queued
    assert not s.full_in_progress and s.pending_entries == 0
    assert s.stats["dropped_not_master"] == 10 and s.stats["full_aborted"] == 1
    assert kinds(s.poll(T0 + 1)) == ["hello"]
    with pytest.raises(ValueError):
        s.set_role("leader", T0)


def test_heartbeat_interval_and_clock_step_back() -> None:
    s = master(heartbeat_interval_s=1.0)
    assert s.next_deadline(T0) == pytest.approx(T0 + 1.0)
    assert kinds(s.poll(T0 + 1.0)) == ["heartbeat"]
    assert s.poll(T0 + 1.5) == []
    # Wall clock steps back an hour: timers fire rather than stall for an hour.
    s.add_new_flows([ent(1)], T0 + 1.6)
    back = T0 - 3600
    assert s.next_deadline(back) == back
    assert kinds(s.poll(back)) == ["entries", "heartbeat"]
    assert kinds(s.poll(back + 1.0)) == ["heartbeat"]


def test_invalid_entries_dropped_without_seq_gap() -> None:
    s, sb = master(), Standby()
    bad = [SyncEntry(V4, 1, V4, 80, 1, REAL), SyncEntry(b"\x01", 1, V4, 80, 6, REAL)]
    s.add_new_flows([ent(1), bad[0], ent(2), bad[1], ent(3)], T0)
    dgs = s.poll(T0 + 1)
    assert entries_of(dgs) == [ent(1), ent(2), ent(3)]
    assert s.stats["invalid_entries"] == 2 and s.stats["entries"] == 3
    sb.feed(s.poll(T0 + 0.5) + dgs)
    s.add_new_flows([ent(4)], T0 + 1)
    sb.feed(s.poll(T0 + 1.1))
    assert sb.rx.peer("lb1")["lost"] == 0


# =========================================================================== full walk


def test_full_walk_complete_and_lazy() -> None:
    s, sb = master(full_chunks_per_poll=4, full_rate=None), Standby()
    handshake(s, sb)
    pulled = 0

    def table():
        nonlocal pulled
        for i in range(1000):
            pulled += 1
            yield ent(i)

    fid = s.start_full(table(), T0)
    cap = entry_capacity(1400, "lb1")
    dgs = s.poll(T0)
    assert kinds(dgs) == ["full"] * 4
    assert pulled <= 4 * cap + 1  # pulled a few chunks' worth, not the whole table
    all_dgs = list(dgs)
    t = T0
    while s.full_in_progress:
        t += 0.001
        all_dgs += s.poll(t)
    chunks = [decode(d, KEY, 65507) for d in all_dgs if decode(d, KEY, 65507).kind == "full"]
    assert [c.chunk for c in chunks] == list(range(len(chunks)))
    assert [c.last for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert {c.full_id for c in chunks} == {fid}
    assert len(chunks) == -(-1000 // cap)  # no empty trailing chunk
    sb.feed(all_dgs, t)
    assert len(sb.installed) == 1000
    assert sb.rx.peer("lb1")["full_complete"] == 1
    assert s.stats["full_completed"] == 2  # with master()'s walk of an empty table
    assert s.stats["full_entries"] == 1000


def test_full_walk_of_empty_table() -> None:
    s = master()
    s.start_full(iter(()), T0)
    (d,) = s.poll(T0)
    m = decode(d, KEY, 65507)
    assert isinstance(m, FullChunk) and m.chunk == 0 and m.last and m.entries == []
    assert not s.full_in_progress


def test_full_walk_interleaved_never_delays_incremental() -> None:
    s = master(max_batch_entries=1000, max_delay_s=0.005, full_chunks_per_poll=3, full_rate=None)
    sb = Standby()
    handshake(s, sb)
    s.start_full((ent(i) for i in range(100_000, 105_000)), T0)
    t, n, polls = T0, 0, 0
    while s.full_in_progress:
        t += 0.005
        new = ents(n, n + 5)
        n += 5
        s.add_new_flows(new, t - 0.005)  # due at this poll
        dgs = s.poll(t)
        polls += 1
        ks = kinds(dgs)
        # Every poll sends the new flows first, then at most 3 walk chunks.
        assert ks[0] == "entries" and entries_of(dgs[:1]) == new
        assert set(ks[1:]) <= {"full"} and len(ks[1:]) <= 3
        sb.feed(dgs, t)
        assert all(e[:5] in sb.installed for e in new)  # installed at once, mid-walk
    assert polls > 5
    assert len(sb.installed) == 5000 + n
    assert sb.rx.peer("lb1")["lost"] == 0


def test_full_walk_pacing() -> None:
    s = master(full_chunks_per_poll=8, full_rate=100.0)
    t = T0 + 1
    s.start_full(ents(0, 100_000), t)
    assert kinds(s.poll(t)).count("full") == 8  # a burst
    assert s.next_deadline(t) == t  # (idle before: the bucket holds a second one)
    assert kinds(s.poll(t)).count("full") == 8
    assert s.poll(t) == []
    assert s.next_deadline(t) == pytest.approx(t + 0.01)
    assert kinds(s.poll(t + 0.0505)).count("full") == 5  # 100 chunks/s
    assert kinds(s.poll(t + 10)).count("full") == 8  # never more than a burst per poll


def test_full_walk_pace_holds_when_polls_come_late() -> None:
    """Polls that come later than a burst's worth (a busy loop, the timers' 1 ms
    grain) lose no pace: what accrued beyond a burst goes in the polls right after
    (next_deadline says now), never more than a burst in one poll."""
    s = master(full_chunks_per_poll=8, full_rate=100.0)
    t = T0 + 1
    s.start_full(ents(0, 100_000), t)
    sent, per_poll = 0, []
    for k in range(1, 41):  # every 100 ms: 10 chunks accrue, a burst is 8
        now = t + 0.1 * k
        while True:
            n = kinds(s.poll(now)).count("full")
            per_poll.append(n)
            sent += n
            if s.next_deadline(now) > now or not n:
                break
    assert max(per_poll) == 8
    assert 390 <= sent <= 416  # 100 chunks/s over 4 s (+ the first poll's burst)


def test_full_due_periodic_and_on_request() -> None:
    s = Sender("lb1", KEY, T0, full_interval_s=60.0)
    assert not s.full_due(T0)  # backup
    s.set_role("master", T0)
    assert s.full_due(T0) and s.next_deadline(T0) == T0
    s.start_full(ents(0, 10), T0)
    assert not s.full_due(T0)
    s.poll(T0)
    assert not s.full_in_progress and not s.full_due(T0 + 59)
    assert s.next_deadline(T0 + 59) == pytest.approx(T0 + 60)
    assert s.full_due(T0 + 60)
    s.start_full(ents(0, 5000), T0 + 60)
    s.request_full()  # the peer restarted mid-walk: start over
    assert s.full_due(T0 + 60.1)
    fid = s.start_full(ents(0, 5000), T0 + 60.1)
    assert s.stats["full_aborted"] == 1
    ids = {decode(d, KEY, 65507).full_id for d in s.poll(T0 + 61) if len(d) > 200}
    assert ids == {fid}


def test_full_walk_failure_keeps_incremental_stream() -> None:
    s, sb = master(full_rate=None, full_interval_s=30.0), Standby()
    handshake(s, sb)

    def broken_table():
        yield from ents(1000, 1100)
        raise OSError("bpf batch lookup failed")

    s.start_full(broken_table(), T0)
    s.add_new_flows(ents(0, 3), T0)
    dgs = s.poll(T0 + 1)  # walk breaks inside this poll
    assert entries_of(dgs[:1]) == ents(0, 3)
    sb.feed(dgs)
    assert all(e[:5] in sb.installed for e in ents(0, 3))
    assert not s.full_in_progress and s.stats["full_failed"] == 1
    assert isinstance(s.last_full_error, OSError)
    assert not s.full_due(T0 + 29) and s.full_due(T0 + 30)  # retried at the next interval


def test_pacing_wakeups_are_batched() -> None:
    s = master(full_chunks_per_poll=16, full_rate=2000.0)
    t = T0 + 1
    s.start_full(ents(0, 100_000), t)
    assert kinds(s.poll(t)).count("full") == 16
    assert kinds(s.poll(t)).count("full") == 16  # (idle before: a second burst is there)
    # Sleep until a burst (16 chunks at 2000/s = 8 ms) is ready, not 0.5 ms.
    assert s.next_deadline(t) == pytest.approx(t + 0.008)
    assert kinds(s.poll(t + 0.0081)).count("full") == 16


def test_full_walk_skips_invalid_entries() -> None:
    s, sb = master(full_rate=None), Standby()
    handshake(s, sb)
    table = ents(0, 200) + [SyncEntry(V4, 1, V4, 80, 99, REAL)] + ents(200, 300)
    s.start_full(table, T0)
    dgs = []
    while s.full_in_progress:
        dgs += s.poll(T0)
    sb.feed(dgs)
    assert len(sb.installed) == 300 and s.stats["invalid_entries"] == 1
    assert sb.rx.peer("lb1")["full_complete"] == 1


# =========================================================================== receiver rejects


def test_replay_rejected() -> None:
    s, sb = master(), Standby()
    handshake(s, sb)
    s.add_new_flows([ent(1)], T0)
    (d,) = s.poll(T0 + 1)
    sb.feed([d])
    sb.installed.clear()
    assert sb.feed([d]) == []
    assert sb.rx.counters["replay"] == 1 and sb.installed == {}


def test_reordering_within_window_accepted() -> None:
    s, sb = master(), Standby(replay_window=8)
    handshake(s, sb)
    dgs = []
    for i in range(12):
        s.add_new_flows([ent(i)], T0)
        dgs += s.poll(T0 + 1)
    sb.feed([dgs[0]])
    sb.feed(dgs[3:12])  # top = seq of dgs[11]
    assert sb.rx.peer("lb1")["lost"] == 2
    sb.feed([dgs[2], dgs[1]])  # late but inside the window (8)
    assert sb.rx.counters["replay"] == 2  # dgs[1], dgs[2] are 10 and 9 behind: too old
    assert sb.rx.peer("lb1")["lost"] == 2
    s2, sb2 = master(), Standby(replay_window=8)
    handshake(s2, sb2)
    d2 = []
    for i in range(6):
        s2.add_new_flows([ent(i)], T0)
        d2 += s2.poll(T0 + 1)
    sb2.feed([d2[0], d2[3], d2[5], d2[1], d2[4], d2[2]])
    assert sb2.rx.counters["replay"] == 0 and len(sb2.installed) == 6
    assert sb2.rx.peer("lb1")["lost"] == 0
    sb2.feed([d2[4]])
    assert sb2.rx.counters["replay"] == 1


def test_seq_jump_is_cheap_and_safe() -> None:
    s = master(session=42)
    sb = Standby(replay_window=64)
    handshake(s, sb)
    s.add_new_flows([ent(1)], T0)
    old = s.poll(T0 + 1)
    sb.feed(old)
    s._seq = 2**63  # a peer's seq jumps far ahead (bug, or a long-lived session)
    s.add_new_flows([ent(2)], T0)
    sb.feed(s.poll(T0 + 1))
    assert ent(2)[:5] in sb.installed and sb.rx.peer("lb1")["seq"] == 2**63 + 1
    assert sb.feed(old) == [] and sb.rx.counters["replay"] == 1


def test_replay_window_one_is_strict() -> None:
    s, sb = master(), Standby(replay_window=1)
    handshake(s, sb)
    dgs = []
    for i in range(3):
        s.add_new_flows([ent(i)], T0)
        dgs += s.poll(T0 + 1)
    sb.feed([dgs[0], dgs[2], dgs[1]])
    assert sb.rx.counters["replay"] == 1 and ent(1)[:5] not in sb.installed


def _reject_cases(sb: Standby):
    """(name, datagram) pairs that must each be rejected with that reason (the
    sender's session proven to ``sb`` first)."""
    s = master()
    handshake(s, sb)
    s.add_new_flows(ents(0, 20), T0)
    (good,) = s.poll(T0 + 1)
    body = good[8:-32]
    forged = bytearray(good)
    forged[20] ^= 1
    other_key = Sender("lb1", b"K" * 32, T0, role="master", full_interval_s=None)
    other_key.add_new_flows(ents(0, 5), T0)
    version = struct.pack("!3sBI", b"L4S", VERSION + 1, len(body)) + body
    intruder = Sender("mallory", KEY, T0, role="master", full_interval_s=None)
    intruder.add_new_flows(ents(100, 105), T0)
    bad_body = msgpack.packb([1, "lb1", s.session, 99, 0.0, [0, b"\x00" * 16 + b"\x06"]])
    bad_head = struct.pack("!3sBI", b"L4S", VERSION, len(bad_body)) + bad_body
    return [
        ("bad_mac", bytes(forged)),
        ("bad_mac", other_key.poll(T0 + 1)[-1]),
        ("version", version + hmac.digest(KEY, version, "sha256")),
        ("truncated", good[:-1]),
        ("truncated", good[:5]),
        ("oversize", good + bytes(70000)),
        ("malformed", bad_head + hmac.digest(KEY, bad_head, "sha256")),
        ("unknown_peer", intruder.poll(T0 + 1)[-1]),
    ], good


def test_each_reject_counted_and_conn_table_untouched() -> None:
    sb = Standby()
    cases, good = _reject_cases(sb)
    seen = sb.rx.stats["messages"]
    for reason, data in cases:
        before = dict(sb.rx.counters)
        assert sb.feed([data]) == [], reason
        assert sb.installed == {}, reason
        assert sb.rx.counters[reason] == before[reason] + 1, reason
        assert sb.rx.last_reject[0] == reason
    assert sb.rx.stats["messages"] == seen and sb.rx.peer("lb1")["messages"] == seen
    assert sb.rx.peer("mallory") is None  # no state for unknown peers
    # The genuine message is still accepted afterwards: no reject consumed its seq.
    sb.feed([good])
    assert len(sb.installed) == 20


def test_oversize_by_receiver_max_size() -> None:
    s = master(max_payload=9000)
    s.add_new_flows(ents(0, 300), T0)
    dgs = s.poll(T0 + 1)
    rx = Receiver(KEY, {"lb1"}, max_size=1400)
    assert all(rx.on_datagram(d, None, T0) == [] for d in dgs)
    assert rx.counters["oversize"] == len(dgs)


# =========================================================================== sessions & peers


def test_any_peer_mode_refuses_self_and_caps_peers() -> None:
    rx = Receiver(KEY, None, node_id="lb1", max_peers=2)
    for name in ("lb1", "lb2", "lb3", "lb4"):
        for d in Sender(name, KEY, T0).poll(T0):
            rx.on_datagram(d, None, T0)
    assert rx.peer("lb1") is None  # our own datagrams, reflected
    assert rx.peer("lb2") and rx.peer("lb3") and rx.peer("lb4") is None
    assert rx.counters["unknown_peer"] == 2


def test_full_interval_zero_means_on_request_only() -> None:
    s = master(full_interval_s=0)
    assert not s.full_due(T0 + 10_000)
    s.request_full()
    assert s.full_due(T0 + 10_000)


def test_sender_restart_new_session_proves_itself_and_is_adopted() -> None:
    s1, sb = master(), Standby()
    handshake(s1, sb)
    s1.add_new_flows(ents(0, 3), T0)
    old = s1.poll(T0 + 1)
    for _ in range(5):
        s1.add_new_flows([ent(9)], T0)
        old += s1.poll(T0 + 1)
    sb.feed(old)
    s2 = master(T0 + 10)  # restarted process: seq starts again at 1, new session
    assert s2.session != s1.session
    s2.add_new_flows(ents(10, 13), T0 + 10)
    new = s2.poll(T0 + 11)
    assert decode(new[0], KEY, 65507).seq < decode(old[-1], KEY, 65507).seq
    # Newer, but not proven live: nothing installed, one challenge.
    acts = sb.feed(new, T0 + 11)
    (ch,) = acts
    assert isinstance(ch, SendChallenge) and sb.rx.counters["unproven"] == len(new)
    assert not any(e[:5] in sb.installed for e in ents(10, 13))
    assert sb.rx.peer("lb1")["session"] == s1.session
    acts = sb.feed([s2.respond(ch.nonce, T0 + 11.1)], T0 + 11.1)
    assert acts == [PeerUp("lb1", s2.session, "master", ("192.0.2.1", 7777), True)]
    s2.add_new_flows(ents(10, 13), T0 + 11.1)  # (the next walk would resend the dropped ones)
    sb.feed(s2.poll(T0 + 12), T0 + 12)
    assert all(e[:5] in sb.installed for e in ents(10, 13))
    # Replaying the old session now must not roll the tracking back: nothing is
    # installed, and the only answer is one challenge (which it cannot meet).
    sb.installed.clear()
    acts = sb.feed(old, T0 + 13)
    assert [type(a) for a in acts] == [SendChallenge] and sb.installed == {}
    assert sb.rx.counters["replay"] == len(old)
    assert sb.rx.peer("lb1")["session"] == s2.session


def test_forged_new_session_does_not_reset_tracking() -> None:
    s, sb = master(), Standby()
    handshake(s, sb)
    s.add_new_flows([ent(1)], T0)
    (d,) = s.poll(T0 + 1)
    sb.feed([d])
    fake = Sender("lb1", b"not the key, but 32 bytes long..", T0, role="master")
    fake.add_new_flows([ent(666)], T0)
    sb.feed(fake.poll(T0 + 1))
    assert sb.rx.counters["bad_mac"] >= 1 and sb.rx.peer("lb1")["session"] == s.session
    assert sb.feed([d]) == [] and sb.rx.counters["replay"] == 1
    assert ent(666)[:5] not in sb.installed


def test_peer_role_hello_and_down_up() -> None:
    peer = Sender("lb2", KEY, T0, heartbeat_interval_s=1.0)  # a backup
    rx = Receiver(KEY, {"lb2"}, peer_timeout_s=3.0)
    (ch,) = [a for d in peer.poll(T0) for a in rx.on_datagram(d, "a", T0)]  # the hello
    acts = rx.on_datagram(peer.respond(ch.nonce, T0), "a", T0)
    assert acts == [PeerUp("lb2", peer.session, "backup", "a", False)]
    assert [a for d in peer.poll(T0 + 1) for a in rx.on_datagram(d, "a", T0 + 1)] == []
    peer.set_role("master", T0 + 1.5)
    acts = [a for d in peer.poll(T0 + 1.5) for a in rx.on_datagram(d, "a", T0 + 1.5)]
    assert acts == [PeerRole("lb2", "master")]
    assert rx.poll(T0 + 4) == [] and rx.next_deadline(T0 + 4) == pytest.approx(T0 + 4.5)
    assert rx.poll(T0 + 4.6) == [PeerDown("lb2", T0 + 1.5)]
    assert rx.poll(T0 + 5) == [] and rx.next_deadline(T0 + 5) is None
    hb = peer.poll(T0 + 6)
    assert isinstance(decode(hb[-1], KEY, 65507), Heartbeat)
    acts = [a for d in hb for a in rx.on_datagram(d, "b", T0 + 6)]
    assert acts == [PeerUp("lb2", peer.session, "master", "b", False)]
    st_ = rx.status()
    assert st_["peers"]["lb2"]["addr"] == "b" and st_["peers"]["lb2"]["alive"]


def test_status_and_counters_shape() -> None:
    s, sb = master(), Standby()
    handshake(s, sb)
    s.add_new_flows(ents(0, 5), T0)
    sb.feed(s.poll(T0 + 0.01), T0 + 0.02)
    st_ = sb.rx.status()
    assert set(st_["rejects"]) == set(REJECT_REASONS)
    assert st_["entries"] == 5 and st_["last_message_at"] == T0 + 0.02
    assert st_["lag_s"] == pytest.approx(0.02, abs=1e-6)
    assert st_["max_lag_s"] == pytest.approx(0.02, abs=1e-6)
    ss = s.status()
    assert ss["role"] == "master" and ss["entries"] == 5 and ss["session"] == s.session


def test_constructor_checks() -> None:
    with pytest.raises(ValueError):
        Sender("lb1", b"short", T0)
    with pytest.raises(ValueError):
        Sender("", KEY, T0)
    with pytest.raises(ValueError):
        Sender("lb1", KEY, T0, max_payload=100)
    with pytest.raises(ValueError):
        Receiver(b"short", {"lb1"})
    with pytest.raises(ValueError):
        Receiver(KEY, {"lb1"}, replay_window=0)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_fuzz_shuffled_duplicated_stream(data) -> None:
    """Any order and duplication of a session's datagrams (within the window):
    each is accepted once, every entry is installed, nothing else."""
    s = master(max_batch_entries=3)
    sb = Standby(replay_window=64)
    handshake(s, sb)
    seen = sb.rx.stats["messages"]
    dgs = []
    n = data.draw(st.integers(1, 40))
    for i in range(n):
        s.add_new_flows([ent(i)], T0)
        dgs += s.poll(T0 + 1)
    stream = data.draw(st.permutations(dgs + data.draw(st.lists(st.sampled_from(dgs)))))
    noise = data.draw(st.lists(st.binary(max_size=60), max_size=5))
    sb.feed(list(stream) + noise)
    assert set(sb.installed) == {e[:5] for e in ents(0, n)}
    assert sb.rx.stats["messages"] == seen + len(dgs)
    assert sb.rx.counters["replay"] == len(stream) - len(dgs)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 9), st.lists(st.integers(1, 40), min_size=1, max_size=60))
@example(4, [1, 2, 3, 4, 6, 5])  # 6 skips 5: slot 1 must forget seq 1
@example(4, [1, 2, 3, 4, 5, 6, 9, 8])  # 9 skips 7 and 8: slots 3, 0 (the ring wraps)
def test_replay_ring_matches_a_reference_window(w, seqs) -> None:
    """The seq window (a ring of marks) accepts exactly what the definition does:
    a seq above the highest, or within ``w`` below it and not seen yet; lost counts
    the gaps, less the late arrivals that fill them."""
    rx = Receiver(KEY, None, replay_window=w)
    peer = machine._Peer("lb1")
    peer.top, peer.window = seqs[0], bytearray(w)
    peer.window[seqs[0] % w] = 1
    seen, top, lost = {seqs[0]}, seqs[0], 0
    for q in seqs[1:]:
        want = q > top or (top - q < w and q not in seen)
        assert rx._seq_ok(peer, q) is want, (q, top, sorted(seen))
        if want:
            if q > top:
                lost += q - top - 1
                top = q
            elif lost:
                lost -= 1
            seen.add(q)
        assert peer.top == top and peer.lost == lost


def test_messages_are_hello_first_then_typed() -> None:
    s = Sender("lb1", KEY, T0, role="master")
    msgs = [decode(d, KEY, 65507) for d in s.poll(T0)]
    assert isinstance(msgs[0], Hello) and msgs[0].seq == 1
    s.start_full([], T0)
    s.add_new_flows([ent(1)], T0)
    msgs = [decode(d, KEY, 65507) for d in s.poll(T0 + 1)]
    assert [type(m) for m in msgs] == [Entries, FullChunk, Heartbeat]
    assert [m.seq for m in msgs] == [2, 3, 4]
    assert all(m.session == s.session for m in msgs)
    assert decode(encode(msgs[0], KEY), KEY, 1400) == msgs[0]  # decoded messages re-encode


# =========================================================================== sessions: replay, restart

PEER = ("192.0.2.1", 7777)


def test_new_session_grows_whatever_the_clock() -> None:
    assert new_session(None, 5) == 5
    assert new_session(3, 5) == 5  # the clock is ahead of the last start
    assert new_session(10, 5) == 11  # the clock went back: still newer than the last
    with pytest.raises(ValueError):
        new_session(2**64 - 1, 5)
    a = Sender("lb1", KEY, T0)
    b = Sender("lb1", KEY, T0 + 0.001)  # a later start without a state file
    assert b.session > a.session


def test_foreign_address_dropped_before_the_mac(monkeypatch) -> None:
    """A recorded datagram replayed from elsewhere costs no MAC work and changes nothing."""
    s, sb = master(), Standby()
    sb.rx = Receiver(KEY, None, 65507, peer_addrs=[PEER])
    handshake(s, sb, addr=PEER)
    seen = sb.rx.peer("lb1")["messages"]
    s.add_new_flows([ent(1)], T0)
    (d,) = s.poll(T0 + 1)
    calls = []
    real_decode = machine.decode
    monkeypatch.setattr(machine, "decode", lambda *a: calls.append(1) or real_decode(*a))
    assert sb.feed([d], addr=("203.0.113.9", 7777)) == []
    assert sb.feed([d], addr=("192.0.2.1", 7778)) == []  # the peer's host, another port
    assert calls == [] and sb.installed == {} and sb.rx.counters["foreign_addr"] == 2
    assert sb.rx.peer("lb1")["messages"] == seen
    sb.feed([d], addr=PEER)  # the same datagram from the peer: heard
    assert calls == [1] and ent(1)[:5] in sb.installed
    # an IPv6 peer given in another spelling, and a scoped source address
    rx6 = Receiver(KEY, None, peer_addrs=[("FD00:0::1", 9542)])
    assert rx6.addr_allowed(("fd00::1", 9542, 0, 0)) and rx6.addr_allowed(("fd00::1%eth0", 9542))
    assert not rx6.addr_allowed(("fd00::2", 9542, 0, 0)) and not rx6.addr_allowed("junk")


def test_replayed_older_session_from_the_peer_installs_nothing() -> None:
    """The issue: a datagram of an older session, replayed, was adopted as a restart
    and locked out the live session. Now: refused, and the live one goes on."""
    old = master(session=1_000)
    old.add_new_flows([ent(666)], T0)
    recorded = old.poll(T0 + 1)
    live, sb = master(session=2_000), Standby()
    handshake(live, sb)
    live.add_new_flows([ent(1)], T0)
    sb.feed(live.poll(T0 + 1))
    sb.installed.clear()
    acts = sb.feed(recorded, T0 + 2)
    assert not [a for a in acts if isinstance(a, (InstallEntries, PeerUp))]
    assert sb.installed == {} and sb.rx.counters["replay"] == len(recorded)
    assert sb.rx.peer("lb1")["session"] == live.session
    live.add_new_flows([ent(2)], T0 + 2)
    sb.feed(live.poll(T0 + 3), T0 + 3)  # genuine traffic: still accepted
    assert ent(2)[:5] in sb.installed and ent(666)[:5] not in sb.installed
    # a challenge the replayer cannot answer: the nonce is fresh
    (ch,) = [a for a in acts if isinstance(a, SendChallenge)]
    stale = old.respond(b"\x00" * 16, T0 + 2)  # a guess at the nonce
    assert not [a for a in sb.feed([stale], T0 + 2) if isinstance(a, (PeerUp, InstallEntries))]
    assert sb.rx.peer("lb1")["session"] == live.session and ch.nonce != b"\x00" * 16


def test_restarted_sender_with_a_newer_session_is_adopted_after_one_round_trip() -> None:
    s1, sb = master(), Standby()
    handshake(s1, sb)
    s1.add_new_flows([ent(1)], T0)
    sb.feed(s1.poll(T0 + 1))
    s2 = master(T0 - 50, session=new_session(s1.session, int((T0 - 50) * 1e9)))  # clock back
    assert s2.session == s1.session + 1
    s2.add_new_flows([ent(2)], T0)
    (ch,) = sb.feed(s2.poll(T0 + 2), T0 + 2)
    assert ent(2)[:5] not in sb.installed and sb.rx.counters["unproven"] == 1
    (up,) = sb.feed([s2.respond(ch.nonce, T0 + 2.01)], T0 + 2.01)
    assert up.restarted and up.session == s2.session
    s2.add_new_flows([ent(2)], T0 + 2)  # what the walk after PeerUp resends
    sb.feed(s2.poll(T0 + 3), T0 + 3)
    assert ent(2)[:5] in sb.installed and sb.rx.counters["replay"] == 0


def test_reset_peer_with_a_lower_session_proves_it_and_is_not_locked_out() -> None:
    """Clock set back and state file lost: its sessions are lower than one we
    accepted. One challenge round trip, and its live session is adopted."""
    s1, sb = master(session=5_000), Standby()
    handshake(s1, sb)
    s1.add_new_flows([ent(0)], T0)
    sb.feed(s1.poll(T0 + 1))
    assert sb.rx.peer("lb1")["session"] == 5_000
    reset = Sender("lb1", KEY, T0, role="master", full_interval_s=None, session=10)
    reset.start_full([], T0)
    first = reset.poll(T0 + 2)
    acts = sb.feed(first, T0 + 2)
    (ch,) = [a for a in acts if isinstance(a, SendChallenge)]
    assert ch.addr == PEER and sb.rx.peer("lb1")["session"] == s1.session
    assert sb.feed(first, T0 + 2.1) == []  # one challenge per challenge_interval_s
    forged = reset.respond(b"\x11" * 16, T0 + 2.2)  # a wrong nonce proves nothing
    assert not [a for a in sb.feed([forged], T0 + 2.2) if isinstance(a, PeerUp)]
    acts = sb.feed([reset.respond(ch.nonce, T0 + 2.3)], T0 + 2.3)
    assert acts == [PeerUp("lb1", 10, "master", PEER, True)]
    reset.add_new_flows([ent(3)], T0 + 2.3)
    sb.feed(reset.poll(T0 + 2.4), T0 + 2.4)
    assert ent(3)[:5] in sb.installed and sb.rx.status()["sessions_proven"] == 1
    # the nonce is spent: replaying the response does not reopen anything
    assert sb.feed([reset.respond(ch.nonce, T0 + 3)], T0 + 3) == []
    # and s1's old datagrams stay refused (not newer than the highest seen)
    s1.add_new_flows([ent(4)], T0)
    sb.feed(s1.poll(T0 + 5), T0 + 5)
    assert ent(4)[:5] not in sb.installed and sb.rx.peer("lb1")["session"] == 10


def test_challenges_are_answered_and_replayed_ones_cost_little() -> None:
    a, b = Sender("lb1", KEY, T0, session=100), Sender("lb2", KEY, T0, session=200)
    rx_b = Receiver(KEY, None, node_id="lb2")
    handshake(a, rx_b, T0, PEER)  # lb1's session is current
    ch = a.challenge(b"\x07" * 16, T0 + 1)
    assert rx_b.on_datagram(ch, PEER, T0 + 1) == [SendResponse("lb1", PEER, b"\x07" * 16, True)]
    assert rx_b.on_datagram(ch, PEER, T0 + 1.5) == []  # the same again: a replay
    old = Sender("lb1", KEY, T0, session=50).challenge(b"\x08" * 16, T0)  # another session
    got = rx_b.on_datagram(old, PEER, T0 + 2)
    assert got[-1] == SendResponse("lb1", PEER, b"\x08" * 16, False)
    assert [type(x) for x in got[:-1]] == [SendChallenge]  # and it is challenged in turn
    assert rx_b.on_datagram(old, PEER, T0 + 2.01) == []  # rate-limited
    resp = decode(b.respond(b"\x07" * 16, T0), KEY, 1400)
    assert resp.kind == "response" and resp.nonce == b"\x07" * 16 and resp.role == "backup"


def test_both_reset_challenge_each_other_and_recover() -> None:
    """Both nodes remember higher sessions of each other than they now use."""
    a = Sender("lb1", KEY, T0, session=10, role="master", full_interval_s=None)
    b = Sender("lb2", KEY, T0, session=20)
    rx_a = Receiver(KEY, None, node_id="lb1", known_sessions={"lb2": 900})
    rx_b = Receiver(KEY, None, node_id="lb2", known_sessions={"lb1": 800})
    pa, pb = ("10.0.0.1", 1), ("10.0.0.2", 1)
    wire = [(rx_b, d, pa) for d in a.poll(T0)] + [(rx_a, d, pb) for d in b.poll(T0)]
    ups = []
    for _ in range(6):  # deliver, act, repeat
        out = []
        for rx, d, src in wire:
            for act in rx.on_datagram(d, src, T0 + 1):
                me = a if rx is rx_a else b
                back = pa if me is a else pb
                if isinstance(act, SendChallenge):
                    out.append((rx_b if me is a else rx_a, me.challenge(act.nonce, T0), back))
                elif isinstance(act, SendResponse):
                    out.append((rx_b if me is a else rx_a, me.respond(act.nonce, T0), back))
                elif isinstance(act, PeerUp):
                    ups.append(act.sender)
        wire = out
    assert sorted(ups) == ["lb1", "lb2"]
    assert rx_a.peer("lb2")["session"] == 20 and rx_b.peer("lb1")["session"] == 10


def test_known_sessions_carry_over_a_restart_of_the_receiver() -> None:
    s, sb = master(session=777), Standby()
    handshake(s, sb)
    s.add_new_flows([ent(1)], T0)
    recorded = s.poll(T0 + 1)
    sb.feed(recorded)
    known = sb.rx.known_sessions()
    assert known == {"lb1": 777}
    again = Standby()
    again.rx = Receiver(KEY, None, 65507, known_sessions=known)
    assert again.rx.status()["peers"] == {}  # remembered, not yet heard
    acts = again.feed(recorded)  # replayed to the restarted receiver: refused
    assert again.installed == {} and [type(a) for a in acts] == [SendChallenge]
    acts = again.feed([s.respond(acts[0].nonce, T0 + 2)], T0 + 2)  # the live session proves it
    assert [type(a) for a in acts] == [PeerUp]
    s.add_new_flows([ent(2)], T0 + 2)
    again.feed(s.poll(T0 + 3), T0 + 3)
    assert ent(2)[:5] in again.installed


# =========================================================================== no trust on first use


def test_replayed_old_session_to_a_fresh_receiver_is_never_adopted() -> None:
    """The hole: a node that lost its state (no known_sessions) adopted the first
    authenticated session it heard. A recording of an older session replayed to
    it now installs nothing and is only challenged; that session cannot answer
    (the peer runs a newer one): the live session answers and is adopted."""
    old = master(session=1_000)
    old.add_new_flows([ent(666)], T0)
    old.start_full([ent(667)], T0)
    recorded = old.poll(T0 + 1) + [old.respond(b"\x01" * 16, T0 + 1)]  # any kind
    assert kinds(recorded) == ["entries", "full", "response"]
    live, sb = master(session=2_000), Standby()  # sb: its state dir was wiped
    (ch,) = sb.feed(recorded, T0 + 10)
    assert isinstance(ch, SendChallenge) and ch.addr == PEER
    assert sb.installed == {} and sb.rx.counters["unproven"] == len(recorded)
    assert sb.rx.peer("lb1")["session"] is None and sb.rx.known_sessions() == {}
    assert sb.rx.status()["peers"] == {} and sb.rx.stats["messages"] == 0
    assert sb.feed(recorded, T0 + 10.5) == []  # replayed again: no new challenge yet
    # The challenge reaches the live peer, which answers in its own session.
    assert sb.feed([live.respond(ch.nonce, T0 + 10.6)], T0 + 10.6) == [
        PeerUp("lb1", 2_000, "master", PEER, False)]
    assert sb.rx.known_sessions() == {"lb1": 2_000}
    live.add_new_flows([ent(1)], T0 + 10.6)
    sb.feed(live.poll(T0 + 10.7), T0 + 10.7)
    assert set(sb.installed) == {ent(1)[:5]}
    # The recording stays refused for good: not newer than the live session.
    assert [type(a) for a in sb.feed(recorded, T0 + 12)] == [SendChallenge]
    assert set(sb.installed) == {ent(1)[:5]} and sb.rx.peer("lb1")["session"] == 2_000
    assert sb.rx.counters["replay"] == len(recorded)


def test_a_recorded_session_newer_than_any_known_is_not_adopted_either() -> None:
    """We knew session 100; while we were away the peer ran 200 (recorded) and now
    runs 300. Ordering alone would adopt 200: it has to prove itself, and cannot."""
    rec = master(session=200)
    rec.add_new_flows([ent(666)], T0)
    recorded = rec.poll(T0 + 1)
    live = master(session=300)
    sb = Standby(known_sessions={"lb1": 100})
    (ch,) = sb.feed(recorded, T0 + 5)
    assert sb.installed == {} and sb.rx.counters["unproven"] == 1
    assert sb.rx.known_sessions() == {"lb1": 100}
    (up,) = sb.feed([live.respond(ch.nonce, T0 + 5.01)], T0 + 5.01)
    assert up.session == 300 and sb.rx.known_sessions() == {"lb1": 300}
    assert [type(a) for a in sb.feed(recorded, T0 + 7)] == [SendChallenge]
    assert sb.rx.counters["replay"] == 1 and sb.installed == {}


def test_recordings_of_the_live_session_are_not_installed_after_its_proof() -> None:
    """A receiver restarted without state lost its replay window too: datagrams
    of the live session sent before its proof (recorded) stay out for good."""
    live = master(session=5)
    live.add_new_flows([ent(666)], T0)
    recorded = live.poll(T0 + 1)
    sb = Standby()
    handshake(live, sb, T0 + 2)
    assert sb.feed(recorded, T0 + 3) == [] and sb.installed == {}
    assert sb.rx.counters["replay"] == 1
    live.add_new_flows([ent(1)], T0 + 3)
    sb.feed(live.poll(T0 + 3.1), T0 + 3.1)
    assert set(sb.installed) == {ent(1)[:5]} and sb.rx.peer("lb1")["lost"] == 0


def test_challenges_of_unproven_sessions_are_rate_limited_and_a_slow_answer_counts() -> None:
    s, sb = master(), Standby(challenge_interval_s=1.0)
    flood = []
    for i in range(50):
        s.add_new_flows([ent(i)], T0)
        flood += s.poll(T0 + 1)
    (ch1,) = sb.feed(flood[:25], T0 + 1)
    assert sb.feed(flood[25:], T0 + 1.5) == []  # one challenge per interval
    (ch2,) = sb.feed(flood[:1], T0 + 2)
    assert ch2.nonce != ch1.nonce and sb.rx.stats["challenges_sent"] == 2
    assert sb.rx.peer("lb1")["challenges"] == 2 and sb.rx.counters["unproven"] == 51
    (ch3,) = sb.feed(flood[:1], T0 + 3)
    # Two nonces are good at a time (an answer may be on its way), not three.
    assert sb.feed([s.respond(ch1.nonce, T0 + 3)], T0 + 3) == []
    (up,) = sb.feed([s.respond(ch2.nonce, T0 + 3.01)], T0 + 3.01)
    assert up.session == s.session and sb.installed == {}  # the flood came before it
    assert sb.feed([s.respond(ch3.nonce, T0 + 3.02)], T0 + 3.02) == []  # spent: no news
    assert sb.feed(flood, T0 + 3.03) == [] and sb.installed == {}
    assert sb.rx.peer("lb1")["session"] == s.session


def test_forged_or_garbled_responses_prove_nothing() -> None:
    s, sb = master(), Standby()
    s.add_new_flows([ent(1)], T0)
    (ch,) = sb.feed(s.poll(T0 + 0.01), T0 + 0.01)
    good = s.respond(ch.nonce, T0 + 0.02)
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x40
    forger = Sender("lb1", b"K" * 32, T0, session=s.session, role="master")
    tries = [
        ("bad_mac", forger.respond(ch.nonce, T0)),  # the nonce seen, not the key
        ("bad_mac", bytes(flipped)),
        ("truncated", good[:-1]),
        ("unproven", s.respond(b"\x00" * 16, T0)),  # a guess at the nonce
    ]
    for reason, data in tries:
        before = sb.rx.counters[reason]
        assert sb.feed([data], T0 + 0.03) == [], reason
        assert sb.rx.counters[reason] == before + 1, reason
    # the nonce in a Challenge, or from another peer, is no proof either
    acts = sb.feed([s.challenge(ch.nonce, T0)], T0 + 0.04)
    assert not [a for a in acts if isinstance(a, PeerUp)]
    other = Sender("lb2", KEY, T0, session=s.session)
    acts = sb.feed([other.respond(ch.nonce, T0)], T0 + 0.05)
    assert [type(a) for a in acts] == [SendChallenge] and acts[0].sender == "lb2"
    assert sb.rx.peer("lb1")["session"] is None and sb.rx.peer("lb2")["session"] is None
    assert sb.installed == {}
    (up,) = sb.feed([good], T0 + 0.06)  # the genuine answer still proves it
    assert up == PeerUp("lb1", s.session, "master", PEER, False)
    assert sb.feed([good], T0 + 0.07) == [] and sb.installed == {}


class Node:
    """A sync node as the agent drives it: Sender + Receiver + its conn table."""

    def __init__(self, name: str, role: str, now: float, table=(), **rx) -> None:
        self.name = name
        self.addr = ("10.0.0.1" if name == "lb1" else "10.0.0.2", 9542)
        self.tx = Sender(name, KEY, now, role=role, full_interval_s=None,
                         heartbeat_interval_s=1.0, full_rate=None, session=rx.pop("session", None))
        self.rx = Receiver(KEY, None, 65507, node_id=name, **rx)
        self.table = {e[:5]: e for e in table}
        self.ups: list[PeerUp] = []


def run_pair(a: Node, b: Node, t0: float, seconds: float, lose: bool = False) -> float | None:
    """Both nodes' datagrams delivered in order after 1 ms, acted on as
    l4lb/sync/agent.py does (PeerUp / a challenge in our current session -> a
    master walks its table); with ``lose``, a's first Response is lost. Returns
    when b's table came to equal a's for good (None: it did not)."""
    wire: list = []  # (deliver at, to, datagram, from address)
    t, same_at = t0, None
    lost: list[bytes] = []

    def send(src: Node, dst: Node, data: bytes) -> None:
        if lose and not lost and src is a and decode(data, KEY, 65507).kind == "response":
            lost.append(data)
            return
        wire.append((t + 0.001, dst, data, src.addr))

    while t < t0 + seconds:
        for n, peer in ((a, b), (b, a)):
            if n.tx.full_due(t):
                n.tx.start_full(list(n.table.values()), t)
            for d in n.tx.poll(t):
                send(n, peer, d)
        while wire and wire[0][0] <= t:
            _, dst, data, src = wire.pop(0)
            other = a if dst is b else b
            for act in dst.rx.on_datagram(data, src, t):
                if isinstance(act, InstallEntries):
                    dst.table.update((e[:5], e) for e in act.entries)
                elif isinstance(act, PeerUp):
                    dst.ups.append(act)
                    if dst.tx.role == "master":
                        dst.tx.request_full()
                elif isinstance(act, SendChallenge):
                    send(dst, other, dst.tx.challenge(act.nonce, t))
                elif isinstance(act, SendResponse):
                    send(dst, other, dst.tx.respond(act.nonce, t))
                    if act.current and dst.tx.role == "master":
                        dst.tx.request_full()
        if same_at is None and b.table == a.table:
            same_at = t
        elif b.table != a.table:
            same_at = None
        t += 0.005
    assert lost or not lose
    return same_at


@pytest.mark.parametrize("lose_a_response", [False, True])
def test_pair_converges_through_starts_and_restarts(lose_a_response) -> None:
    """Normal start of both, a restart of the standby without and with its state,
    a restart of the master (its conn table kept, as pinned maps keep it): each
    time the standby ends up with the master's whole table, its peer's session
    adopted once. With the master's first Response lost, the standby drops the
    walk that the master starts on adopting it; its next challenge (rate-limited)
    comes in a session the master already adopted, and makes it walk again."""
    t = T0
    a = Node("lb1", "master", t, ents(0, 1000))
    b = Node("lb2", "backup", t)
    assert run_pair(a, b, t, 4.0, lose_a_response) is not None and len(b.table) == 1000
    assert [u.session for u in b.ups] == [a.tx.session] and len(a.ups) == 1
    assert a.rx.counters["bad_mac"] == b.rx.counters["bad_mac"] == 0
    for keep_state in (False, True):  # the standby restarts
        t += 5
        known = b.rx.known_sessions() if keep_state else None
        b = Node("lb2", "backup", t, known_sessions=known)
        assert run_pair(a, b, t, 4.0, lose_a_response) is not None and len(b.table) == 1000
        assert [u.session for u in b.ups] == [a.tx.session]
        assert a.ups[-1].session == b.tx.session and a.ups[-1].restarted
    for keep_state in (False, True):  # the master restarts, with new flows meanwhile
        t += 5
        known = a.rx.known_sessions() if keep_state else None
        more = ents(0, 1000 + 100 * (2 + keep_state))
        a = Node("lb1", "master", t, more, known_sessions=known)
        assert run_pair(a, b, t, 4.0, lose_a_response) is not None and len(b.table) == len(more)
        assert b.ups[-1].session == a.tx.session and b.ups[-1].restarted


# =========================================================================== pre-auth backlog


def test_backlog_bounds_bytes_held_and_per_turn() -> None:
    b = Backlog(max_bytes=10_000, turn_bytes=3_000)
    garbage = [bytes(1000)] * 15
    took = [b.offer(g, PEER) for g in garbage]
    assert took == [True] * 10 + [False] * 5 and b.dropped == 5 and b.bytes == 10_000
    turns = []
    while b:
        turns.append(sum(len(d) for d, _ in b.take()))
    assert turns == [3000, 3000, 3000, 1000] and b.bytes == 0
    b.offer(bytes(5000), PEER)  # bigger than a turn: still goes, alone
    assert [len(d) for d, _ in b.take()] == [5000]
    with pytest.raises(ValueError):
        Backlog(0, 1)
