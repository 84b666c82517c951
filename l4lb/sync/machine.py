"""Conn-table sync state machines (sans-I/O): no sockets, no asyncio, no clock.

Every method takes ``now`` (float seconds) from the caller. Pass the same clock
on both nodes, wall time (``time.time()``), so that the receiver's lag
(``now`` minus the batch's creation time carried in the message) means
something; timers here survive the clock stepping backwards (they fire early
instead of stalling).

Sender (one per node, whatever its role)::

    s = Sender("lb1", key, now, session=new_session(last, now_ns))  # hello + heartbeats
    s.set_role("master", now)            # from VRRP; makes a full walk due
    s.add_new_flows(entries, now)        # from the data plane's new-flow ring buffer
    if s.full_due(now):
        s.start_full(table_walk(), now)  # lazy iterable, pulled a few chunks per poll
        # (or packed=True with a feed of ready chunks: see _PackedWalk)
    for datagram in s.poll(now):
        sock.sendto(datagram, peer)
    # sleep until s.next_deadline(now), or until new flows arrive

Receiver (one per node)::

    r = Receiver(key, None, max_size, peer_addrs=[("10.0.0.2", 9542)], known_sessions=saved)
    if r.addr_allowed(addr):             # (on_datagram checks it too, before the MAC)
        for action in r.on_datagram(data, addr, now):
            InstallEntries -> translate real addresses to local ids, update the conn table
            PeerUp / PeerRole(role="backup") while master -> s.request_full()
            SendChallenge -> sock.sendto(s.challenge(nonce, now), addr)
            SendResponse -> sock.sendto(s.respond(nonce, now), addr); if current and master:
                            s.request_full() (the peer dropped what we sent until now)
    for action in r.poll(now):           # PeerDown
        ...

Rejected datagrams give no action (but SendChallenge, below); ``r.counters[reason]``
counts them.

Sessions, replays and restarts. A sender's session number grows with each of
its starts: ``new_session(last, now_ns)`` is the wall clock in ns or one more
than the last session (persisted by the agent in the node's state dir),
whichever is higher. No session is trusted on first use: a receiver adopts a
session of a peer other than the current one only once it is proven live now.
Its first datagram is answered with a challenge (SendChallenge: a fresh random
nonce, at most one per ``challenge_interval_s`` and peer), and a Response
carrying that nonce (or the one before it, for a slow answer), authenticated
in that session, proves it; then it is adopted (PeerUp). Until then nothing
of it is installed nor tracked: its datagrams are dropped and counted
(``unproven``, or ``replay`` for a session not newer than one accepted
before). This holds for every session, newer ones included: a recorded session
higher than the highest we know exists whenever the peer ran sessions we never
saw (we were down, wiped or cut off while it restarted), and a node whose state
dir was wiped (/run after a reboot) knows none at all; ordering alone would
adopt such a replay, install its stale entries and lock out the live session.
The live peer, challenged because of a replay, simply answers in its current
session, which is what gets adopted. A proof also marks every earlier seq of
the session as seen: datagrams the peer sent before its Response (recorded
ones included: our replay window was lost with our state) are never
installed. They are dropped, not buffered: the peer's next full walk repairs
them, and the round trip is asked for again when they keep coming (a walk
started before our proof: our next challenge arrives in a session the peer
already accepted, SendResponse ``current``, and its master walks again).
The cost: one round trip per peer start, and per own start for each peer,
before the first entries are installed. This is IKE's answer to replays
across restarts (fresh nonces), not keepalived's (VRRP's AH sequence numbers
lock a restarted peer out until the counters are reset by hand): a clock- or
state-reset peer costs one round trip, never a manual intervention.
Challenges themselves are answered whatever session they come in
(rate-limited: a replayed one only costs a Response), in any role, and a
challenge in a session we have not adopted is challenged back.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

from .codec import (
    DEFAULT_MAX_PAYLOAD,
    MAX_DATAGRAM,
    MAX_SENDER_LEN,
    NONCE_LEN,
    REASONS,
    ROLES,
    Challenge,
    Entries,
    FullChunk,
    Heartbeat,
    Hello,
    PackedEntries,
    Response,
    SyncDecodeError,
    SyncEntry,
    check_entry,
    decode,
    encode,
    encode_full,
    entry_capacity,
    pack_entries,
)

__all__ = [
    "MIN_KEY_LEN",
    "REJECT_REASONS",
    "Sender",
    "Receiver",
    "InstallEntries",
    "PeerUp",
    "PeerRole",
    "PeerDown",
    "SendChallenge",
    "SendResponse",
    "Action",
    "Backlog",
    "new_session",
]

MIN_KEY_LEN = 16
#: Every key of Receiver.counters (reasons a datagram was rejected):
#: foreign_addr (not from a configured peer address: dropped before any MAC
#: work), backlog_full (set aside unauthenticated, no room: see Backlog),
#: unproven (a session newer than any accepted, not proven live yet: see the
#: module doc).
REJECT_REASONS = (*REASONS, "unknown_peer", "replay", "foreign_addr", "backlog_full", "unproven")
_U64 = 1 << 64


def new_session(last: int | None, now_ns: int) -> int:
    """The session number of a sender starting now: higher than ``last`` (the
    previous start's, if known) and than any earlier start while the clock is
    right (wall clock in ns: good until 2554)."""
    s = max(int(now_ns), 1 if last is None else last + 1)
    if s >= _U64:
        raise ValueError("session number out of uint64 range")
    return s


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, (bytes, bytearray)) or len(key) < MIN_KEY_LEN:
        raise ValueError(f"sync key must be at least {MIN_KEY_LEN} bytes")
    return bytes(key)


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")
    return role


# =========================================================================== sender


class _FullWalk:
    """A full-table walk in progress: pulls from the table iterator lazily."""

    def __init__(self, full_id: int, it: Iterator, cap: int) -> None:
        self.full_id = full_id
        self.it = it
        self.cap = cap  # most entries one chunk can hold (smallest record shape)
        self.pending: list = []
        self.exhausted = False
        self.chunk = 0
        self.entries = 0

    def fill(self) -> None:
        # One entry of lookahead so that the chunk carrying the table's last
        # entry is flagged ``last`` (no empty trailing chunk).
        need = self.cap + 1 - len(self.pending)
        if need > 0 and not self.exhausted:
            got = list(islice(self.it, need))
            if len(got) < need:
                self.exhausted = True
            self.pending += got

    def close(self) -> None:
        close = getattr(self.it, "close", None)
        if close is not None:
            close()


class _PackedWalk:
    """A full walk whose chunks are made elsewhere (the agent's walk thread).

    ``feed.get()`` returns ``(PackedEntries, last)`` (one chunk, sized to fit a
    datagram), or None when nothing is ready yet (the feed wakes the agent when
    it has more); ``feed.close()`` stops the producer."""

    def __init__(self, full_id: int, feed) -> None:
        self.full_id = full_id
        self.feed = feed
        self.chunk = 0
        self.entries = 0
        self.starved = False  # the feed had nothing at the last poll

    def close(self) -> None:
        self.feed.close()


class Sender:
    """Builds the datagrams a node sends: hello, heartbeats and (master) entries.

    Incremental batches go out when ``max_batch_entries`` are buffered or the
    oldest buffered entry is ``max_delay_s`` old. A full walk is sent in chunks,
    at most ``full_chunks_per_poll`` per poll and ``full_rate`` chunks/s, always
    after the poll's incremental batch, so the walk never delays new flows.
    """

    def __init__(
        self,
        node_id: str,
        key: bytes,
        now: float,
        max_batch_entries: int = 64,
        max_delay_s: float = 0.005,
        full_interval_s: float | None = 300.0,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        *,
        heartbeat_interval_s: float = 1.0,
        full_chunks_per_poll: int = 16,
        full_rate: float | None = 2000.0,
        role: str = "backup",
        session: int | None = None,
    ) -> None:
        if type(node_id) is not str or not 0 < len(node_id.encode()) <= MAX_SENDER_LEN:
            raise ValueError(f"node_id must be 1..{MAX_SENDER_LEN} UTF-8 bytes")
        if not 256 <= max_payload <= MAX_DATAGRAM:
            raise ValueError(f"max_payload must be 256..{MAX_DATAGRAM}")
        if max_batch_entries < 1 or max_delay_s < 0 or heartbeat_interval_s <= 0:
            raise ValueError("bad batching/heartbeat parameters")
        if full_chunks_per_poll < 1 or (full_rate is not None and full_rate <= 0):
            raise ValueError("bad full-walk pacing parameters")
        self.node_id = node_id
        self._key = _check_key(key)
        self.max_batch_entries = max_batch_entries
        self.max_delay_s = max_delay_s
        self.full_interval_s = full_interval_s or None  # None/0: only when requested
        self.max_payload = max_payload
        self.heartbeat_interval_s = heartbeat_interval_s
        self.full_chunks_per_poll = full_chunks_per_poll
        self.full_rate = full_rate
        self._role = _check_role(role)
        self.session = new_session(None, int(now * 1e9)) if session is None else session
        if not 0 <= self.session < _U64:
            raise ValueError("session must be a uint64")
        self._seq = 0
        self._buf: list = []
        self._buf_since: float | None = None
        self._hello_pending = True
        self._last_hb = now
        self._walk: _FullWalk | None = None
        self._full_id = 0
        self._last_full_start: float | None = now if role == "master" else None
        self._full_requested = role == "master"
        self._tokens = float(full_chunks_per_poll)
        self._tokens_at = now
        self._cap = entry_capacity(max_payload, node_id)
        self.stats = {
            "messages": 0,
            "bytes": 0,
            "entries_messages": 0,
            "entries": 0,
            "full_messages": 0,
            "full_entries": 0,
            "full_started": 0,
            "full_completed": 0,
            "full_aborted": 0,
            "hello": 0,
            "heartbeat": 0,
            "dropped_not_master": 0,
            "invalid_entries": 0,
            "full_failed": 0,
        }
        self.last_full_error: BaseException | None = None

    # ----------------------------------------------------------------- role

    @property
    def role(self) -> str:
        return self._role

    def set_role(self, role: str, now: float) -> None:
        """Follow VRRP. Becoming master makes a full walk due at once; becoming
        backup drops buffered entries and aborts a walk in progress."""
        role = _check_role(role)
        if role == self._role:
            return
        self._role = role
        self._hello_pending = True
        if role == "master":
            self._full_requested = True
        else:
            self.stats["dropped_not_master"] += len(self._buf)
            self._buf = []
            self._buf_since = None
            self._full_requested = False
            self._abort_walk()

    # ----------------------------------------------------------------- incremental

    def add_new_flows(self, entries: Iterable[SyncEntry], now: float) -> None:
        """Buffer new flows (validated at send time; bad ones are counted and
        dropped). Ignored unless master."""
        if self._role != "master":
            if not isinstance(entries, list):
                entries = list(entries)
            self.stats["dropped_not_master"] += len(entries)
            return
        before = len(self._buf)
        self._buf.extend(entries)
        if self._buf_since is None and len(self._buf) > before:
            self._buf_since = now

    @property
    def pending_entries(self) -> int:
        return len(self._buf)

    # ----------------------------------------------------------------- full walk

    def request_full(self) -> None:
        """Make a full walk due now (e.g. the peer restarted or became backup).
        A walk already in progress will be replaced by the next start_full."""
        self._full_requested = True

    def full_due(self, now: float) -> bool:
        """True when the agent should call start_full (master only)."""
        if self._role != "master":
            return False
        if self._full_requested:
            return True
        if self._walk is not None or self.full_interval_s is None:
            return False
        last = self._last_full_start
        return last is None or now - last >= self.full_interval_s or now < last

    @property
    def full_in_progress(self) -> bool:
        return self._walk is not None

    def start_full(self, entries: Iterable[SyncEntry], now: float, *, packed: bool = False) -> int:
        """Begin a full walk over ``entries`` (consumed lazily by poll, a few
        chunks at a time: a generator over BPF batch lookups is fine). With
        ``packed``, ``entries`` is a feed of ready chunks instead (see
        _PackedWalk): the walk and packing run elsewhere, poll only frames and
        signs them. Replaces a walk in progress. Returns the walk's full_id."""
        if self._role != "master":
            raise RuntimeError("start_full while not master")
        self._abort_walk()
        self._full_id = (self._full_id + 1) % _U64
        if packed:
            self._walk = _PackedWalk(self._full_id, entries)
        else:
            self._walk = _FullWalk(self._full_id, iter(entries), self._cap)
        self._full_requested = False
        self._last_full_start = now
        self.stats["full_started"] += 1
        return self._full_id

    def _abort_walk(self) -> None:
        if self._walk is not None:
            self._walk.close()
            self._walk = None
            self.stats["full_aborted"] += 1

    # ----------------------------------------------------------------- output

    def _next_seq(self) -> int:
        self._seq += 1  # uint64: 584,000 years at a million messages/s
        return self._seq

    def _account(self, data: bytes, out: list[bytes]) -> None:
        if len(data) > self.max_payload:  # a sizing bug, never expected
            raise AssertionError(f"sync datagram {len(data)} > {self.max_payload}")
        self.stats["messages"] += 1
        self.stats["bytes"] += len(data)
        out.append(data)

    def _encode_batches(self, entries: list, make) -> list[bytes]:
        """Encode ``entries`` split to fit, one ``make(batch)`` message each.
        On an invalid entry, drops (and counts) the invalid ones and retries,
        reusing the sequence numbers so the peer sees no gap."""
        seq0 = self._seq
        try:
            return [
                encode(make(b), self._key)
                for b in pack_entries(entries, self.max_payload, self.node_id)
            ]
        except ValueError:
            self._seq = seq0
            good = [e for e in entries if check_entry(e)]
            self.stats["invalid_entries"] += len(entries) - len(good)
            entries[:] = good
            return [
                encode(make(b), self._key)
                for b in pack_entries(entries, self.max_payload, self.node_id)
            ]

    def _flush_due(self, now: float) -> bool:
        since = self._buf_since
        return bool(self._buf) and (
            len(self._buf) >= self.max_batch_entries
            or now - since >= self.max_delay_s
            or now < since
        )

    def _flush(self, out: list[bytes]) -> None:
        buf, since = self._buf, self._buf_since
        self._buf, self._buf_since = [], None
        nid, sess = self.node_id, self.session
        msgs = self._encode_batches(
            buf, lambda b: Entries(nid, sess, self._next_seq(), since, b)
        )  # drops invalid entries from buf
        for data in msgs:
            self._account(data, out)
        self.stats["entries_messages"] += len(msgs)
        self.stats["entries"] += len(buf)

    def _refill_tokens(self, now: float) -> None:
        burst = float(self.full_chunks_per_poll)
        if self.full_rate is None:
            self._tokens = burst
        else:
            # The bucket holds two polls' worth: a poll that comes late (the loop's
            # timers have a 1 ms grain, and it may be busy) keeps what accrued
            # beyond one poll for the next, which comes at once (next_deadline),
            # so the walk holds its pace; one poll still sends at most a burst.
            dt = max(0.0, now - self._tokens_at)
            self._tokens = min(2 * burst, self._tokens + dt * self.full_rate)
        self._tokens_at = now

    def _full_chunks(self, now: float, out: list[bytes]) -> None:
        self._refill_tokens(now)
        nid, sess, mp = self.node_id, self.session, self.max_payload
        floor = self._tokens - self.full_chunks_per_poll  # this poll's burst, at most
        while self._walk is not None and self._tokens >= 1.0 and self._tokens > floor:
            walk = self._walk
            if type(walk) is _PackedWalk:
                if not self._packed_chunk(walk, now, out):
                    break
                continue
            try:
                walk.fill()
            except Exception as exc:  # the table walk broke (BPF error...): drop
                # this walk, keep the incremental stream going; retried when due.
                self.last_full_error = exc
                self.stats["full_failed"] += 1
                self._walk = None
                walk.close()
                break
            head = walk.pending[: walk.cap]
            seq0 = self._seq
            try:
                batch = pack_entries(head, mp, nid)[0] if head else head
                last = walk.exhausted and len(walk.pending) == len(batch)
                seq = self._next_seq()
                msg = FullChunk(nid, sess, seq, now, walk.full_id, walk.chunk, last, batch)
                data = encode(msg, self._key)
            except ValueError:  # an invalid entry: drop those in head, try again
                self._seq = seq0
                good = [e for e in head if check_entry(e)]
                if len(good) == len(head):
                    raise
                self.stats["invalid_entries"] += len(head) - len(good)
                walk.pending[: len(head)] = good
                continue
            self._account(data, out)
            del walk.pending[: len(batch)]
            walk.chunk += 1
            walk.entries += len(batch)
            self.stats["full_messages"] += 1
            self.stats["full_entries"] += len(batch)
            self._tokens -= 1.0
            if last:
                self._walk = None
                self.stats["full_completed"] += 1

    def _packed_chunk(self, walk: _PackedWalk, now: float, out: list[bytes]) -> bool:
        """Frame and sign the feed's next chunk; False when there is none yet."""
        try:
            item = walk.feed.get()
        except Exception as exc:  # the walk thread broke: as in _full_chunks
            self.last_full_error = exc
            self.stats["full_failed"] += 1
            self._walk = None
            walk.close()
            return False
        if item is None:
            walk.starved = True
            return False
        walk.starved = False
        batch, last = item
        if type(batch) is PackedEntries:  # the usual case: no message object
            data = encode_full(self.node_id, self.session, self._next_seq(), now, walk.full_id,
                               walk.chunk, last, batch, self._key)
        else:
            data = encode(FullChunk(self.node_id, self.session, self._next_seq(), now,
                                    walk.full_id, walk.chunk, bool(last), batch), self._key)
        self._account(data, out)
        n = len(batch)
        walk.chunk += 1
        walk.entries += n
        self.stats["full_messages"] += 1
        self.stats["full_entries"] += n
        self._tokens -= 1.0
        if last:
            self._walk = None
            self.stats["full_completed"] += 1
        return True

    def challenge(self, nonce: bytes, now: float) -> bytes:
        """A Challenge datagram (for the Receiver's SendChallenge action)."""
        data = encode(Challenge(self.node_id, self.session, self._next_seq(), now, nonce),
                      self._key)
        self.stats["messages"] += 1
        self.stats["bytes"] += len(data)
        return data

    def respond(self, nonce: bytes, now: float) -> bytes:
        """The Response to a peer's challenge (for SendResponse)."""
        msg = Response(self.node_id, self.session, self._next_seq(), now, self._role, nonce)
        data = encode(msg, self._key)
        self.stats["messages"] += 1
        self.stats["bytes"] += len(data)
        return data

    def _status_msg(self, cls, now: float, out: list[bytes]) -> None:
        msg = cls(self.node_id, self.session, self._next_seq(), now, self._role)
        self._account(encode(msg, self._key), out)
        self._last_hb = now

    def poll(self, now: float) -> list[bytes]:
        """Datagrams to send now, in order: hello (start, role change), the
        pending incremental batch, up to ``full_chunks_per_poll`` full-walk
        chunks, heartbeat."""
        out: list[bytes] = []
        if self._hello_pending:
            self._hello_pending = False
            self._status_msg(Hello, now, out)
            self.stats["hello"] += 1
        if self._role == "master":
            if self._flush_due(now):
                self._flush(out)
            if self._walk is not None:
                self._full_chunks(now, out)
        last = self._last_hb
        if now - last >= self.heartbeat_interval_s or now < last:
            self._status_msg(Heartbeat, now, out)
            self.stats["heartbeat"] += 1
        return out

    def flush(self, now: float) -> list[bytes]:
        """Send the buffered incremental entries now, whatever their age."""
        out: list[bytes] = []
        if self._role == "master" and self._buf:
            self._flush(out)
        return out

    def next_deadline(self, now: float) -> float:
        """When poll (or full_due) next has something to do: the agent sleeps
        until then, or until new flows arrive. May be <= now."""
        t = self._last_hb + self.heartbeat_interval_s
        if self._hello_pending or now < self._last_hb:
            return now
        if self._role == "master":
            if self._buf:
                if len(self._buf) >= self.max_batch_entries or now < self._buf_since:
                    return now
                t = min(t, self._buf_since + self.max_delay_s)
            if self._full_requested:
                return now
            if self._walk is not None:
                if getattr(self._walk, "starved", False):
                    return t  # the feed wakes the agent when it has chunks
                if self.full_rate is None:
                    return now
                # Wake for a burst's worth of chunks, or after 10 ms, but not
                # before one chunk may go.
                self._refill_tokens(now)
                rate, tokens = self.full_rate, self._tokens
                one = max(0.0, 1.0 - tokens) / rate
                burst = max(0.0, self.full_chunks_per_poll - tokens) / rate
                t = min(t, now + max(one, min(burst, 0.01)))
            elif self.full_interval_s is not None and self._last_full_start is not None:
                t = min(t, self._last_full_start + self.full_interval_s)
        return t

    def status(self) -> dict:
        return {
            "node_id": self.node_id,
            "role": self._role,
            "session": self.session,
            "seq": self._seq,
            "pending_entries": len(self._buf),
            "full_in_progress": self._walk is not None,
            "full_id": self._full_id,
            "last_full_start": self._last_full_start,
            **self.stats,
        }


# =========================================================================== receiver


@dataclass(frozen=True, slots=True)
class InstallEntries:
    """Entries to install, unchanged from the wire (real by address: the agent
    translates to local real ids and counts unknown reals). ``full_id`` is None
    for incremental batches; for a full-walk chunk, ``last`` marks its end.
    ``entries`` is a codec.PackedEntries (a sequence of SyncEntry)."""

    sender: str
    entries: PackedEntries | list[SyncEntry]
    full_id: int | None = None
    chunk: int | None = None
    last: bool = False


@dataclass(frozen=True, slots=True)
class PeerUp:
    """A peer's session was proven live and adopted (its Response to our
    challenge: it appeared, or restarted, ``restarted``: a new session replaced
    one we knew), or its adopted session was heard again after PeerDown. A
    master should then request a full walk (Sender.request_full)."""

    sender: str
    session: int
    role: str
    addr: object
    restarted: bool


@dataclass(frozen=True, slots=True)
class PeerRole:
    """A live peer announced another role (hello/heartbeat)."""

    sender: str
    role: str


@dataclass(frozen=True, slots=True)
class PeerDown:
    """No valid message from the peer for ``peer_timeout_s`` (from Receiver.poll)."""

    sender: str
    last_seen: float


@dataclass(frozen=True, slots=True)
class SendChallenge:
    """Send ``Sender.challenge(nonce)`` to ``addr``: the peer ``sender`` speaks
    in a session we have not adopted (its first contact, a restart of it or of
    us, or a replay); a Response in that session carrying ``nonce`` proves it
    live. (A replay's session cannot answer: the live session answers instead.)"""

    sender: str
    addr: object
    nonce: bytes


@dataclass(frozen=True, slots=True)
class SendResponse:
    """Send ``Sender.respond(nonce)`` to ``addr``. ``current``: the challenge
    came in the peer's current session (fresh, not a replay): the peer has been
    dropping our messages until now, so a master should walk its table again."""

    sender: str
    addr: object
    nonce: bytes
    current: bool


Action = InstallEntries | PeerUp | PeerRole | PeerDown | SendChallenge | SendResponse


class _Peer:
    __slots__ = (
        "name", "session", "max_session", "top", "window", "role", "alive", "addr",
        "last_seen", "messages", "entries", "lost", "lag_s",
        "full_id", "full_chunks", "full_complete", "full_incomplete", "last_full_complete",
        "nonce", "prev_nonce", "challenged_at", "answered_at", "challenges", "proofs",
    )  # fmt: skip

    def __init__(self, name: str, max_session: int | None = None) -> None:
        self.name = name
        self.session: int | None = None
        self.max_session = max_session  # highest session ever accepted (None: none known)
        self.top = 0  # highest seq seen in this session
        self.window = bytearray()  # seqs seen (Receiver._seq_ok; sized on adoption)
        self.role: str | None = None
        self.alive = False
        self.addr: object = None
        self.last_seen: float | None = None
        self.messages = 0
        self.entries = 0
        self.lost = 0  # sequence gaps (estimate; reordered arrivals give back)
        self.lag_s: float | None = None
        self.full_id: int | None = None
        self.full_chunks = 0
        self.full_complete = 0
        self.full_incomplete = 0
        self.last_full_complete: float | None = None
        self.nonce: bytes | None = None  # our outstanding challenge
        self.prev_nonce: bytes | None = None  # the one before (answer still in flight)
        self.challenged_at = float("-inf")
        self.answered_at = float("-inf")
        self.challenges = 0  # challenges sent
        self.proofs = 0  # sessions not newer than max_session adopted on proof


def _addr_key(addr: object) -> tuple | None:
    """(host, port) of a socket address, the host normalised (no IPv6 scope)."""
    if not isinstance(addr, tuple) or len(addr) < 2:
        return None
    host = addr[0]
    if isinstance(host, str) and "%" in host:
        host = host.split("%", 1)[0]
    try:
        return str(ipaddress.ip_address(host)), int(addr[1])
    except ValueError:
        return None


class Receiver:
    """Checks and parses datagrams from the peer(s); returns actions.

    Rejects (counted in ``counters`` by reason, see REJECT_REASONS): foreign_addr
    (not from one of ``peer_addrs``: checked before any MAC work), truncated,
    oversize, version, malformed, bad_mac, unknown_peer (sender not in
    allowed_peers, or our own node_id), replay (seq already seen or older than
    the window; a session not newer than one accepted, until proven live),
    unproven (any other session not proven live yet: see the module doc). A
    rejected datagram yields no action and changes no state except its counter
    (and, rate-limited, a SendChallenge). ``known_sessions`` (name -> highest
    session accepted) carries what an earlier run of this node accepted, so that
    a restart is no chance to replay older sessions.
    """

    def __init__(
        self,
        key: bytes,
        allowed_peers: Iterable[str] | None,
        max_size: int = DEFAULT_MAX_PAYLOAD,
        replay_window: int = 64,
        *,
        node_id: str | None = None,
        peer_timeout_s: float = 3.5,
        max_peers: int = 16,
        peer_addrs: Iterable[tuple] | None = None,
        known_sessions: dict[str, int] | None = None,
        challenge_interval_s: float = 1.0,
        nonce: Callable[[], bytes] | None = None,
    ) -> None:
        if replay_window < 1:
            raise ValueError("replay_window must be >= 1 (1: strictly increasing)")
        if challenge_interval_s <= 0:
            raise ValueError("challenge_interval_s must be > 0")
        self._key = _check_key(key)
        # None: any sender id (the key alone authenticates), at most max_peers
        # of them; our own node_id is refused either way (reflected datagrams).
        self.allowed_peers = None if allowed_peers is None else frozenset(allowed_peers)
        # None: any source address (tests); else only these (host, port) are heard.
        self.peer_addrs: frozenset | None = None
        if peer_addrs is not None:
            keys = {_addr_key(a) for a in peer_addrs}
            if None in keys:
                raise ValueError("peer_addrs must be (host, port) pairs")
            self.peer_addrs = frozenset(keys)
        self.node_id = node_id
        self.max_peers = max_peers
        self.max_size = max_size
        self.replay_window = replay_window
        self.peer_timeout_s = peer_timeout_s
        self.challenge_interval_s = challenge_interval_s
        self._nonce = nonce or (lambda: secrets.token_bytes(NONCE_LEN))
        self.counters: dict[str, int] = dict.fromkeys(REJECT_REASONS, 0)
        self.stats = {
            "messages": 0,
            "entries": 0,
            "entries_messages": 0,
            "full_messages": 0,
            "full_entries": 0,
            "last_message_at": None,
            "lag_s": None,  # now - ts of the last incremental batch
            "max_lag_s": 0.0,
            "challenges_sent": 0,
            "challenges_answered": 0,
            "sessions_proven": 0,
        }
        self.last_reject: tuple[str, object, float] | None = None
        self._peers: dict[str, _Peer] = {}
        for name, sess in (known_sessions or {}).items():
            if type(sess) is int and 0 <= sess < _U64 and len(self._peers) < max_peers:
                self._peers[name] = _Peer(name, sess)

    def _reject(self, reason: str, addr: object, now: float) -> list:
        self.counters[reason] += 1
        self.last_reject = (reason, addr, now)
        return []

    def reject(self, reason: str, addr: object, now: float) -> None:
        """Count a datagram the agent dropped itself (e.g. ``backlog_full``)."""
        self._reject(reason, addr, now)

    def addr_allowed(self, addr: object) -> bool:
        """Whether a datagram from ``addr`` is heard at all (cheap: before the MAC)."""
        pa = self.peer_addrs
        if pa is None:
            return True
        if type(addr) is tuple and addr[:2] in pa:  # the usual case: exact match
            return True
        return _addr_key(addr) in pa

    def known_sessions(self) -> dict[str, int]:
        """Name -> highest session accepted, for the next run (see __init__)."""
        return {n: p.max_session for n, p in self._peers.items() if p.max_session is not None}

    def _seq_ok(self, peer: _Peer, seq: int) -> bool:
        """Sliding-window check of ``seq`` in the peer's current session; records it.

        The window is a ring of one byte per seq (slot seq % replay_window holds
        the mark of the one seq in (top - replay_window, top] it stands for): a
        message costs O(1), however wide the window (a big int shifted per
        message costs O(window): 16 kB of copying at the agent's 2**17)."""
        top, w, marks = peer.top, self.replay_window, peer.window
        if seq > top:
            shift = seq - top
            peer.lost += shift - 1
            if shift >= w:  # (no giant clears on a seq jump: a fresh ring)
                marks = peer.window = bytearray(w)
            elif shift > 1:  # the seqs skipped leave their slots unmarked
                a, n = (top + 1) % w, shift - 1
                if a + n <= w:
                    marks[a:a + n] = bytes(n)
                else:
                    marks[a:] = bytes(w - a)
                    marks[:n - (w - a)] = bytes(n - (w - a))
            marks[seq % w] = 1
            peer.top = seq
            return True
        if top - seq >= w or marks[seq % w]:
            return False
        marks[seq % w] = 1
        if peer.lost:
            peer.lost -= 1  # a reordered message, not a lost one
        return True

    def _challenge(self, peer: _Peer, addr: object, now: float) -> list[Action]:
        if now - peer.challenged_at < self.challenge_interval_s and now >= peer.challenged_at:
            return []
        peer.prev_nonce = peer.nonce  # still good: its answer may be on its way
        peer.nonce = self._nonce()
        peer.challenged_at = now
        peer.challenges += 1
        self.stats["challenges_sent"] += 1
        return [SendChallenge(peer.name, addr, peer.nonce)]

    def _adopt(self, peer: _Peer, msg: Response, addr: object) -> PeerUp:
        """Adopt the session ``msg`` (a Response to our nonce) proved live."""
        restarted = peer.session is not None
        peer.session, peer.top = msg.session, msg.seq
        # Every seq up to the proof counts as seen: what the peer sent before it
        # (or a recording of it) is never installed; the next walk repairs it.
        peer.window = bytearray(b"\x01" * self.replay_window)
        if peer.max_session is None or msg.session > peer.max_session:
            peer.max_session = msg.session
        peer.full_id = None
        peer.alive = True
        peer.nonce = peer.prev_nonce = None
        role = msg.role
        peer.role = role
        return PeerUp(peer.name, msg.session, role, addr, restarted)

    def on_datagram(self, data: bytes, src_addr: object, now: float) -> list[Action]:
        if self.peer_addrs is not None and not self.addr_allowed(src_addr):
            return self._reject("foreign_addr", src_addr, now)
        try:
            msg = decode(data, self._key, self.max_size)
        except SyncDecodeError as exc:
            return self._reject(exc.reason, src_addr, now)
        name = msg.sender
        peer = self._peers.get(name)
        if peer is None:
            if (
                name == self.node_id
                or (self.allowed_peers is not None and name not in self.allowed_peers)
                or len(self._peers) >= self.max_peers
            ):
                return self._reject("unknown_peer", src_addr, now)
            peer = self._peers[name] = _Peer(name)
        kind = msg.kind
        actions: list[Action] = []
        if kind == "challenge":
            return self._on_challenge(peer, msg, src_addr, now)
        if msg.session != peer.session:
            if kind == "response" and msg.nonce is not None and (
                    msg.nonce == peer.nonce or msg.nonce == peer.prev_nonce):
                # proven live now, whatever its number: adopt it
                if peer.max_session is not None and msg.session <= peer.max_session:
                    peer.proofs += 1
                    self.stats["sessions_proven"] += 1
                actions.append(self._adopt(peer, msg, src_addr))
            else:  # not proven live (module doc: no trust on first use): ask for it
                old = peer.max_session is not None and msg.session <= peer.max_session
                self._reject("replay" if old else "unproven", src_addr, now)
                return self._challenge(peer, src_addr, now)
        else:
            if not self._seq_ok(peer, msg.seq):
                return self._reject("replay", src_addr, now)
            if kind == "response" and msg.nonce in (peer.nonce, peer.prev_nonce):
                peer.nonce = peer.prev_nonce = None
            if not peer.alive:
                peer.alive = True
                role = getattr(msg, "role", None) or peer.role or "master"
                peer.role = role
                actions.append(PeerUp(name, msg.session, role, src_addr, False))
        peer.addr = src_addr
        peer.last_seen = now
        peer.messages += 1
        st = self.stats
        st["messages"] += 1
        st["last_message_at"] = now
        if kind == "entries":
            lag = now - msg.ts
            st["lag_s"] = peer.lag_s = lag
            if lag > st["max_lag_s"]:
                st["max_lag_s"] = lag
            st["entries_messages"] += 1
            st["entries"] += len(msg.entries)
            peer.entries += len(msg.entries)
            if msg.entries:
                actions.append(InstallEntries(name, msg.entries))
        elif kind == "full":
            n = len(msg.entries)
            st["full_messages"] += 1
            st["full_entries"] += n
            st["entries"] += n
            peer.entries += n
            self._track_full(peer, msg, now)
            actions.append(InstallEntries(name, msg.entries, msg.full_id, msg.chunk, msg.last))
        else:  # hello / heartbeat / response
            if msg.role != peer.role:
                peer.role = msg.role
                if not actions:
                    actions.append(PeerRole(name, msg.role))
        return actions

    def _on_challenge(self, peer: _Peer, msg: Challenge, addr: object, now: float) -> list:
        """Answer (rate-limited unless fresh), in any role; challenge back a
        session we have not adopted (first contact, restart or replay)."""
        current = msg.session == peer.session
        if current:
            if not self._seq_ok(peer, msg.seq):
                return self._reject("replay", addr, now)
            peer.last_seen = now
        elif now - peer.answered_at < self.challenge_interval_s / 4 and now >= peer.answered_at:
            return self._reject("replay", addr, now)  # too many: some are replays
        peer.answered_at = now
        self.stats["challenges_answered"] += 1
        out: list[Action] = [SendResponse(peer.name, addr, msg.nonce, current)]
        if not current:
            # Our challenge goes first: the peer that adopts us on our Response
            # starts its walk at once, and should find its own session adopted.
            out[:0] = self._challenge(peer, addr, now)
        return out

    @staticmethod
    def _track_full(peer: _Peer, msg: FullChunk, now: float) -> None:
        if msg.full_id != peer.full_id:
            peer.full_id = msg.full_id
            peer.full_chunks = 0
        peer.full_chunks += 1
        if msg.last:
            if peer.full_chunks == msg.chunk + 1:
                peer.full_complete += 1
                peer.last_full_complete = now
            else:
                peer.full_incomplete += 1
            peer.full_id = None

    def poll(self, now: float) -> list[Action]:
        """PeerDown for each live peer silent for more than peer_timeout_s."""
        out: list[Action] = []
        for p in self._peers.values():
            if p.alive and p.last_seen is not None and now - p.last_seen > self.peer_timeout_s:
                p.alive = False
                out.append(PeerDown(p.name, p.last_seen))
        return out

    def next_deadline(self, now: float) -> float | None:
        """When poll may next report a PeerDown (None: no live peer)."""
        times = [p.last_seen for p in self._peers.values() if p.alive and p.last_seen is not None]
        return min(times) + self.peer_timeout_s if times else None

    def peer(self, name: str) -> dict | None:
        p = self._peers.get(name)
        if p is None:
            return None
        return {
            "session": p.session,
            "seq": p.top,
            "role": p.role,
            "alive": p.alive,
            "addr": p.addr,
            "last_seen": p.last_seen,
            "messages": p.messages,
            "entries": p.entries,
            "lost": p.lost,
            "lag_s": p.lag_s,
            "full_complete": p.full_complete,
            "full_incomplete": p.full_incomplete,
            "last_full_complete": p.last_full_complete,
            "max_session": p.max_session,
            "challenges": p.challenges,
            "sessions_proven": p.proofs,
        }

    def status(self) -> dict:
        return {
            **self.stats,
            "rejects": dict(self.counters),
            "last_reject": self.last_reject,
            # (peers only remembered from an earlier run, not heard yet: left out)
            "peers": {n: self.peer(n) for n, p in self._peers.items()
                      if p.session is not None or p.messages},
        }


# =========================================================================== pre-auth backlog


class Backlog:
    """Datagrams read off the socket but not yet authenticated (full-walk
    chunks set aside so that new flows go first).

    Bounded twice: at most ``max_bytes`` held (``offer`` refuses more: the
    caller counts the drop, the next walk repairs it), and ``take`` hands out at
    most ``turn_bytes`` per call (one loop turn's worth of MAC checks, whatever
    the datagrams hold: a flood of garbage costs bounded work per turn).
    """

    def __init__(self, max_bytes: int, turn_bytes: int) -> None:
        if max_bytes < 1 or turn_bytes < 1:
            raise ValueError("backlog bounds must be >= 1 byte")
        self.max_bytes = max_bytes
        self.turn_bytes = turn_bytes
        self._q: deque[tuple[bytes, object]] = deque()
        self.bytes = 0
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._q)

    def offer(self, data: bytes, addr: object) -> bool:
        if self.bytes + len(data) > self.max_bytes:
            self.dropped += 1
            return False
        self._q.append((data, addr))
        self.bytes += len(data)
        return True

    def take(self) -> list[tuple[bytes, object]]:
        """The oldest datagrams, at most turn_bytes together (at least one)."""
        q = self._q
        out = []
        n = 0
        while q and (not out or n + len(q[0][0]) <= self.turn_bytes):
            item = q.popleft()
            n += len(item[0])
            out.append(item)
        self.bytes -= n
        return out

    def clear(self) -> None:
        self._q.clear()
        self.bytes = 0
