"""Conn-table sync wire format (sans-I/O): msgpack body + HMAC-SHA256.

One message is one UDP datagram::

    prefix (8 bytes)   b"L4S" | version (u8) | body length (u32, network order)
    body               msgpack array, see below
    tag (32 bytes)     HMAC-SHA256(key, prefix + body)

The prefix is read before the MAC only to give stable reject reasons
(``version`` for a peer running another protocol version, which may also use
another MAC; ``truncated`` for a datagram cut short, e.g. by a small receive
buffer). Nothing in the body is looked at before ``hmac.compare_digest``.

Body: ``[kind, sender, session, seq, ts, *kind fields]``

    kind 1 "entries"   [..., groups]                      new flows (incremental)
    kind 2 "full"      [..., full_id, chunk, last, groups] a chunk of a full-table walk
    kind 3 "hello"     [..., role]                        sent at start and on role change
    kind 4 "heartbeat" [..., role]                        sent periodically
    kind 5 "challenge" [..., nonce]                       "prove your session is live"
    kind 6 "response"  [..., role, nonce]                 the answer, in the sender's session

``sender`` is the node name (str, 1..64 UTF-8 bytes); ``session`` is a uint64
that grows with every start of the sender (machine.new_session: the wall clock
in ns, or one more than the last one, whichever is higher); ``nonce`` is 16
random bytes (see machine.Receiver); ``seq`` (uint64) increases by one per
message of a session, whatever its kind; ``ts`` (float seconds, the sender's
clock) is when the batch was created (``entries``: when its oldest entry was
handed to the sender; other kinds: when the message was built).

Entries are not encoded one msgpack object each: ``groups`` is a flat list
``[shape, blob, shape, blob, ...]`` where ``blob`` is fixed-size records packed
with one ``struct`` format per address shape (IPv4/IPv6 client+VIP, IPv4/IPv6
real), so that packing and unpacking run in C (``Struct.iter_unpack``) and
the record layout itself enforces address lengths and port ranges::

    src (4|16) | sport (u16) | dst (4|16) | dport (u16) | proto (u8) | real (4|16) | age (u16)

``age`` is whole seconds (rounded down; at most MAX_AGE_S) since the sender's data
plane last saw a packet of the flow, as of when the record was built: an age, not
a time, so that the clocks of the two nodes need not agree. The receiver sets its
last-seen to its own now minus the age, so a UDP flow's idle timeout on the new
master counts from the last packet the old master saw. Seconds are the data
plane's own grain (it refreshes last-seen at most once a second) and cost 2 bytes
a record.

Decoded entries are a PackedEntries: a sequence of SyncEntry over the blobs
(unpacked only when read as tuples), so bulk consumers can work on the blobs.
Version 2: sessions ordered (version 1's were random), challenge and response.
Version 3: each entry carries its age.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from itertools import starmap
from operator import itemgetter
from typing import NamedTuple

import msgpack

__all__ = [
    "VERSION",
    "MAGIC",
    "TAG_LEN",
    "PREFIX_LEN",
    "DEFAULT_MAX_PAYLOAD",
    "MAX_DATAGRAM",
    "MAX_SENDER_LEN",
    "ROLES",
    "REASONS",
    "SyncEntry",
    "SyncDecodeError",
    "Entries",
    "FullChunk",
    "Hello",
    "Heartbeat",
    "Challenge",
    "Response",
    "PackedEntries",
    "NONCE_LEN",
    "MAX_AGE_S",
    "SHAPE_LENS",
    "Message",
    "encode",
    "encode_full",
    "decode",
    "mac",
    "pack_entries",
    "entry_capacity",
    "check_entry",
]

VERSION = 3
MAGIC = b"L4S"
TAG_LEN = 32
_PREFIX = struct.Struct("!3sBI")
PREFIX_LEN = _PREFIX.size  # 8
DEFAULT_MAX_PAYLOAD = 1400  # bytes of UDP payload per message (MTU-safe)
MAX_DATAGRAM = 65507  # largest UDP payload over IPv4
MAX_SENDER_LEN = 64  # bytes, UTF-8
NONCE_LEN = 16
ROLES = ("master", "backup")
#: Every reason SyncDecodeError can carry (stable strings, used as counter keys).
REASONS = ("truncated", "oversize", "bad_mac", "version", "malformed")

_U64 = 1 << 64
MAX_AGE_S = 0xFFFF  # older entries are sent as this (18 h; conn_timeout_s may be 24 h)
_U32 = 1 << 32
_PROTOS = frozenset((6, 17))
_PROTO_BYTES = bytes((6, 17))


class SyncEntry(NamedTuple):
    """One conn-table entry: the flow's 5-tuple and the real's address."""

    src: bytes  # client address, 4 or 16 bytes
    sport: int
    dst: bytes  # VIP address, same length as src
    dport: int
    proto: int  # 6 (TCP) or 17 (UDP)
    real: bytes  # real server address, 4 or 16 bytes (any family: tunnel mode)
    age_s: int = 0  # since the sender last saw a packet of the flow (0..MAX_AGE_S)


class SyncDecodeError(Exception):
    """A datagram was rejected; ``reason`` is one of REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Entries:
    """Incremental batch of new flows."""

    sender: str
    session: int
    seq: int
    ts: float
    entries: Sequence[SyncEntry]
    kind = "entries"


@dataclass(frozen=True, slots=True)
class FullChunk:
    """Chunk ``chunk`` (0, 1, ...) of full walk ``full_id``; ``last`` ends the walk."""

    sender: str
    session: int
    seq: int
    ts: float
    full_id: int
    chunk: int
    last: bool
    entries: Sequence[SyncEntry]
    kind = "full"


@dataclass(frozen=True, slots=True)
class Hello:
    sender: str
    session: int
    seq: int
    ts: float
    role: str
    kind = "hello"


@dataclass(frozen=True, slots=True)
class Heartbeat:
    sender: str
    session: int
    seq: int
    ts: float
    role: str
    kind = "heartbeat"


@dataclass(frozen=True, slots=True)
class Challenge:
    """Asks the peer to prove that its session is live (machine.Receiver)."""

    sender: str
    session: int
    seq: int
    ts: float
    nonce: bytes
    kind = "challenge"


@dataclass(frozen=True, slots=True)
class Response:
    """Answers a Challenge: the nonce, authenticated in the sender's session."""

    sender: str
    session: int
    seq: int
    ts: float
    role: str
    nonce: bytes
    kind = "response"


Message = Entries | FullChunk | Hello | Heartbeat | Challenge | Response

_K_ENTRIES, _K_FULL, _K_HELLO, _K_HEARTBEAT, _K_CHALLENGE, _K_RESPONSE = 1, 2, 3, 4, 5, 6

# --------------------------------------------------------------------------- entry records


class _Shape(NamedTuple):
    code: int
    st: struct.Struct
    size: int
    proto_off: int


def _mk_shape(code: int, alen: int, rlen: int) -> _Shape:
    st = struct.Struct(f"!{alen}sH{alen}sHB{rlen}sH")
    return _Shape(code, st, st.size, 2 * alen + 4)


# (len(src), len(dst), len(real)) -> shape; the wire carries the code.
_SHAPE_BY_LENS = {
    (4, 4, 4): _mk_shape(0, 4, 4),
    (4, 4, 16): _mk_shape(1, 4, 16),
    (16, 16, 4): _mk_shape(2, 16, 4),
    (16, 16, 16): _mk_shape(3, 16, 16),
}
_SHAPES = {s.code: s for s in _SHAPE_BY_LENS.values()}
_MIN_RECORD = min(s.size for s in _SHAPES.values())
_GROUP_OVERHEAD = 1 + 5  # shape code (fixint) + worst-case bin header (bin32)

_g_src, _g_dst, _g_real = itemgetter(0), itemgetter(2), itemgetter(5)
_make_entry = partial(tuple.__new__, SyncEntry)
#: (len(src), len(dst), len(real)) -> (shape code, record size): for bulk encoders.
SHAPE_LENS = {lens: (s.code, s.size) for lens, s in _SHAPE_BY_LENS.items()}


class PackedEntries(Sequence):
    """Entries still packed as wire records: ``groups`` is ``((code, blob), ...)``.

    Reads as a sequence of SyncEntry (unpacked on demand); encode and bulk
    consumers use the blobs as they are. Build with ``from_groups`` (checks
    codes, record sizes and protocols)."""

    __slots__ = ("groups", "_n", "_list")

    def __init__(self, groups: tuple = (), n: int | None = None) -> None:
        self.groups = groups
        self._n = sum(len(b) // _SHAPES[c].size for c, b in groups) if n is None else n
        self._list: list | None = None

    @classmethod
    def from_groups(cls, groups) -> PackedEntries:
        """Raises ValueError on an unknown shape, a partial record or a bad proto."""
        out = []
        n = 0
        for code, blob in groups:
            shape = _SHAPES.get(code) if type(code) is int else None
            if shape is None or type(blob) is not bytes or len(blob) % shape.size:
                raise ValueError("bad sync entry records")
            if blob[shape.proto_off :: shape.size].translate(None, _PROTO_BYTES):
                raise ValueError("bad sync entry: proto not 6/17")
            if blob:
                out.append((code, blob))
                n += len(blob) // shape.size
        return cls(tuple(out), n)

    def _entries(self) -> list:
        if self._list is None:
            out: list = []
            for code, blob in self.groups:
                out += map(_make_entry, _SHAPES[code].st.iter_unpack(blob))
            self._list = out
        return self._list

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        return self._entries()[i]

    def __iter__(self):
        return iter(self._entries())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PackedEntries):
            return self._entries() == other._entries()
        if isinstance(other, (list, tuple)):
            return self._entries() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"PackedEntries({self._n} entries in {len(self.groups)} groups)"


def check_entry(e: object) -> bool:
    """True if ``e`` is a well-formed entry (slow, per entry: for filtering)."""
    try:
        src, sport, dst, dport, proto, real, age = e  # type: ignore[misc]
    except (TypeError, ValueError):
        return False
    return (
        type(src) is bytes
        and type(dst) is bytes
        and type(real) is bytes
        and (len(src), len(dst), len(real)) in _SHAPE_BY_LENS
        and type(sport) is int
        and type(dport) is int
        and 0 <= sport <= 0xFFFF
        and 0 <= dport <= 0xFFFF
        and type(proto) is int
        and proto in _PROTOS
        and type(age) is int
        and 0 <= age <= MAX_AGE_S
    )


def _single_shape(entries: Sequence) -> _Shape | None:
    """The shape shared by all entries, found at C speed; None if mixed or invalid."""
    try:
        ls = set(map(len, map(_g_src, entries)))
        if len(ls) != 1:
            return None
        ld = set(map(len, map(_g_dst, entries)))
        lr = set(map(len, map(_g_real, entries)))
    except (TypeError, IndexError, KeyError):
        return None
    if len(ld) != 1 or len(lr) != 1:
        return None
    return _SHAPE_BY_LENS.get((ls.pop(), ld.pop(), lr.pop()))


def _shape_of(e) -> _Shape:
    try:
        return _SHAPE_BY_LENS[(len(e[0]), len(e[2]), len(e[5]))]
    except (KeyError, TypeError, IndexError):
        raise ValueError(f"bad sync entry {e!r}: address lengths") from None


def _pack_blob(shape: _Shape, entries: Sequence) -> bytes:
    try:
        blob = b"".join(starmap(shape.st.pack, entries))
    except (struct.error, TypeError) as exc:
        raise ValueError(f"bad sync entry: {exc}") from None
    if blob[shape.proto_off :: shape.size].translate(None, _PROTO_BYTES):
        raise ValueError("bad sync entry: proto not 6/17")
    return blob


def _pack_groups(entries: Sequence) -> list:
    if type(entries) is PackedEntries:  # already wire records (checked when built)
        return [x for g in entries.groups for x in g]
    if not entries:
        return []
    shape = _single_shape(entries)
    if shape is not None:
        return [shape.code, _pack_blob(shape, entries)]
    by_shape: dict[_Shape, list] = {}
    for e in entries:
        s = _shape_of(e)
        lst = by_shape.get(s)
        if lst is None:
            by_shape[s] = [e]
        else:
            lst.append(e)
    out: list = []
    for s, lst in by_shape.items():
        out += (s.code, _pack_blob(s, lst))
    return out


def _unpack_groups(groups: object) -> PackedEntries:
    if type(groups) is list and len(groups) == 2:  # the usual case: one shape, checked inline
        code, blob = groups
        shape = _SHAPES.get(code) if type(code) is int else None
        if (shape is not None and type(blob) is bytes and blob and not len(blob) % shape.size
                and not blob[shape.proto_off::shape.size].translate(None, _PROTO_BYTES)):
            return PackedEntries(((code, blob),), len(blob) // shape.size)
    if type(groups) is not list or len(groups) % 2:
        raise SyncDecodeError("malformed", "entry groups")
    try:
        if len(groups) == 2:  # the usual case: one shape per message
            return PackedEntries.from_groups((groups,))
        return PackedEntries.from_groups(zip(groups[::2], groups[1::2], strict=True))
    except ValueError as exc:
        raise SyncDecodeError("malformed", str(exc)) from None


# --------------------------------------------------------------------------- sizing


@lru_cache(maxsize=64)
def _overhead(sender: str | None) -> int:
    """Worst-case bytes of a datagram that are not entry records (one group)."""
    name = "x" * MAX_SENDER_LEN if sender is None else sender
    worst = FullChunk(name, _U64 - 1, _U64 - 1, 0.0, _U64 - 1, _U32 - 1, False, ())
    return len(encode(worst, b"k")) + _GROUP_OVERHEAD


def entry_capacity(max_payload: int, sender: str | None = None, shape_lens=(4, 4, 4)) -> int:
    """How many entries of one shape (lengths of src, dst, real) fit one datagram."""
    return (max_payload - _overhead(sender)) // _SHAPE_BY_LENS[tuple(shape_lens)].size


def pack_entries(
    entries: Sequence[SyncEntry], max_payload: int = DEFAULT_MAX_PAYLOAD, sender: str | None = None
) -> list[Sequence[SyncEntry]]:
    """Split ``entries`` into consecutive slices, each fitting one datagram.

    Any message kind (``Entries`` or ``FullChunk``) built from ``sender`` (None:
    assume the longest allowed name) with one slice encodes to at most
    ``max_payload`` bytes. Raises ValueError for an entry with bad address lengths.
    """
    n = len(entries)
    if n == 0:
        return []
    budget = max_payload - _overhead(sender)
    if budget < _GROUP_OVERHEAD + max(s.size for s in _SHAPES.values()):
        raise ValueError(f"max_payload {max_payload} too small")
    shape = _single_shape(entries)
    if shape is not None:
        cap = budget // shape.size
        return [entries[i : i + cap] for i in range(0, n, cap)]
    # Mixed shapes: greedy, in order; each new shape in a datagram costs a group header.
    out: list[Sequence[SyncEntry]] = []
    start = used = 0
    seen: set[int] = set()
    for i, e in enumerate(entries):
        s = _shape_of(e)
        need = s.size if s.code in seen else s.size + _GROUP_OVERHEAD
        if used + need > budget:
            out.append(entries[start:i])
            start, used, seen = i, 0, set()
            need = s.size + _GROUP_OVERHEAD
        seen.add(s.code)
        used += need
    out.append(entries[start:])
    return out


# --------------------------------------------------------------------------- MAC

_TRANS_36 = bytes(x ^ 0x36 for x in range(256))
_TRANS_5C = bytes(x ^ 0x5C for x in range(256))


@lru_cache(maxsize=8)
def _pads(key: bytes) -> tuple:
    """HMAC-SHA256's inner and outer states after the key's pads (RFC 2104), made
    once per key: hmac.digest derives them again for every message, half its time
    on a 1400-byte datagram."""
    if len(key) > 64:
        key = hashlib.sha256(key).digest()
    key = key.ljust(64, b"\0")
    return hashlib.sha256(key.translate(_TRANS_36)), hashlib.sha256(key.translate(_TRANS_5C))


def mac(key: bytes, *parts) -> bytes:
    """HMAC-SHA256(key, concatenation of ``parts``), equal to hmac.digest's."""
    inner, outer = _pads(key if type(key) is bytes else bytes(key))
    h = inner.copy()
    for p in parts:
        h.update(p)
    o = outer.copy()
    o.update(h.digest())
    return o.digest()


# --------------------------------------------------------------------------- encode

_packer = msgpack.Packer(use_bin_type=True)  # (packb makes a Packer per call)
_packer_lock = threading.Lock()  # a Packer keeps a buffer: one user at a time


def _pack(body: list) -> bytes:
    with _packer_lock:
        return _packer.pack(body)


@lru_cache(maxsize=64)
def _sender_ok(s: str) -> bool:
    return type(s) is str and 0 < len(s.encode()) <= MAX_SENDER_LEN


def encode_full(sender: str, session: int, seq: int, ts: float, full_id: int, chunk: int,
                last: bool, entries: PackedEntries, key: bytes) -> bytes:
    """encode(FullChunk(...), key) for entries already packed (a full walk's
    chunk), without building the message object: the same bytes, checked alike."""
    if not _sender_ok(sender) or not (0 <= session < _U64 and 0 <= seq < _U64):
        raise ValueError(f"bad sender id {sender!r} or session/seq out of uint64 range")
    ts = float(ts)
    if not math.isfinite(ts):
        raise ValueError("ts not finite")
    if not (0 <= full_id < _U64 and 0 <= chunk < _U32):
        raise ValueError("full_id/chunk out of range")
    body = [_K_FULL, sender, session, seq, ts, full_id, chunk, bool(last),
            [x for g in entries.groups for x in g]]
    packed = _pack(body)
    head = _PREFIX.pack(MAGIC, VERSION, len(packed))
    return b"".join((head, packed, mac(key, head, packed)))


def _check_header(msg) -> None:
    s = msg.sender
    if type(s) is not str or not 0 < len(s.encode()) <= MAX_SENDER_LEN:
        raise ValueError(f"bad sender id {s!r}")
    if not (0 <= msg.session < _U64 and 0 <= msg.seq < _U64):
        raise ValueError("session/seq out of uint64 range")


def encode(msg: Message, key: bytes) -> bytes:
    """Serialize and authenticate ``msg``. Raises ValueError on invalid content."""
    _check_header(msg)
    ts = float(msg.ts)
    if not math.isfinite(ts):
        raise ValueError("ts not finite")
    if isinstance(msg, Entries):
        body = [_K_ENTRIES, msg.sender, msg.session, msg.seq, ts, _pack_groups(msg.entries)]
    elif isinstance(msg, FullChunk):
        if not (0 <= msg.full_id < _U64 and 0 <= msg.chunk < _U32):
            raise ValueError("full_id/chunk out of range")
        body = [
            _K_FULL, msg.sender, msg.session, msg.seq, ts,
            msg.full_id, msg.chunk, bool(msg.last), _pack_groups(msg.entries),
        ]  # fmt: skip
    elif isinstance(msg, (Hello, Heartbeat)):
        if msg.role not in ROLES:
            raise ValueError(f"bad role {msg.role!r}")
        kind = _K_HELLO if isinstance(msg, Hello) else _K_HEARTBEAT
        body = [kind, msg.sender, msg.session, msg.seq, ts, msg.role]
    elif isinstance(msg, Challenge):
        if type(msg.nonce) is not bytes or len(msg.nonce) != NONCE_LEN:
            raise ValueError(f"nonce must be {NONCE_LEN} bytes")
        body = [_K_CHALLENGE, msg.sender, msg.session, msg.seq, ts, msg.nonce]
    elif isinstance(msg, Response):
        if msg.role not in ROLES:
            raise ValueError(f"bad role {msg.role!r}")
        if type(msg.nonce) is not bytes or len(msg.nonce) != NONCE_LEN:
            raise ValueError(f"nonce must be {NONCE_LEN} bytes")
        body = [_K_RESPONSE, msg.sender, msg.session, msg.seq, ts, msg.role, msg.nonce]
    else:
        raise TypeError(f"not a sync message: {type(msg).__name__}")
    packed = _pack(body)
    head = _PREFIX.pack(MAGIC, VERSION, len(packed))
    return b"".join((head, packed, mac(key, head, packed)))


# --------------------------------------------------------------------------- decode


def _u(v: object, limit: int) -> bool:
    return type(v) is int and 0 <= v < limit


def decode(data: bytes, key: bytes, max_size: int = DEFAULT_MAX_PAYLOAD) -> Message:
    """Verify and parse one datagram. Raises only SyncDecodeError(reason)."""
    if type(data) is not bytes:
        data = bytes(data)
    n = len(data)
    if n > max_size:
        raise SyncDecodeError("oversize", f"{n} > {max_size}")
    if n < PREFIX_LEN:
        raise SyncDecodeError("truncated", f"{n} bytes")
    magic, version, blen = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise SyncDecodeError("malformed", "bad magic")
    if version != VERSION:
        raise SyncDecodeError("version", f"version {version}, want {VERSION}")
    total = PREFIX_LEN + blen + TAG_LEN
    if total > max_size:
        raise SyncDecodeError("oversize", f"declared {total} > {max_size}")
    if n < total:
        raise SyncDecodeError("truncated", f"{n} < {total} bytes")
    if n > total:
        raise SyncDecodeError("malformed", "trailing bytes")
    view = memoryview(data)  # (no copies of the body)
    if not hmac.compare_digest(mac(key, view[:-TAG_LEN]), data[-TAG_LEN:]):
        raise SyncDecodeError("bad_mac")
    # Authenticated from here on; still validate everything (peer bugs, skew).
    try:
        obj = msgpack.unpackb(view[PREFIX_LEN:-TAG_LEN], raw=False, use_list=True,
                              strict_map_key=True)
    except Exception as exc:  # msgpack raises many types on garbage
        raise SyncDecodeError("malformed", f"msgpack: {type(exc).__name__}") from None
    if type(obj) is not list or len(obj) < 6:
        raise SyncDecodeError("malformed", "body")
    kind, sender, session, seq, ts = obj[:5]
    if type(sender) is not str or not _sender_ok(sender):
        raise SyncDecodeError("malformed", "sender")
    if not (type(session) is int and 0 <= session < _U64 and type(seq) is int
            and 0 <= seq < _U64):
        raise SyncDecodeError("malformed", "session/seq")
    if type(ts) is not float or not math.isfinite(ts):
        raise SyncDecodeError("malformed", "ts")
    if kind == _K_FULL and type(kind) is int and len(obj) == 9:  # (the bulk: first)
        full_id, chunk, last, groups = obj[5:]
        if not (type(full_id) is int and 0 <= full_id < _U64 and type(chunk) is int
                and 0 <= chunk < _U32 and type(last) is bool):
            raise SyncDecodeError("malformed", "full header")
        return FullChunk(sender, session, seq, ts, full_id, chunk, last, _unpack_groups(groups))
    if kind == _K_ENTRIES and type(kind) is int and len(obj) == 6:
        return Entries(sender, session, seq, ts, _unpack_groups(obj[5]))
    if kind in (_K_HELLO, _K_HEARTBEAT) and type(kind) is int and len(obj) == 6:
        role = obj[5]
        if type(role) is not str or role not in ROLES:
            raise SyncDecodeError("malformed", "role")
        cls = Hello if kind == _K_HELLO else Heartbeat
        return cls(sender, session, seq, ts, role)
    if kind == _K_CHALLENGE and type(kind) is int and len(obj) == 6:
        nonce = obj[5]
        if type(nonce) is not bytes or len(nonce) != NONCE_LEN:
            raise SyncDecodeError("malformed", "nonce")
        return Challenge(sender, session, seq, ts, nonce)
    if kind == _K_RESPONSE and type(kind) is int and len(obj) == 7:
        role, nonce = obj[5:]
        if type(role) is not str or role not in ROLES:
            raise SyncDecodeError("malformed", "role")
        if type(nonce) is not bytes or len(nonce) != NONCE_LEN:
            raise SyncDecodeError("malformed", "nonce")
        return Response(sender, session, seq, ts, role, nonce)
    raise SyncDecodeError("malformed", "kind")


def _bench(n: int = 1_000_000, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:  # pragma: no cover
    """``python -m l4lb.sync.codec [N] [MAX_PAYLOAD]``: encode/decode rate, IPv4 and IPv6."""
    import gc
    import random
    import time

    rnd = random.Random(1)
    key = b"k" * 32
    for fam, alen in (("ipv4", 4), ("ipv6", 16)):
        vip = bytes(alen - 1) + b"\x01"
        reals = [bytes(alen - 1) + bytes([i]) for i in range(1, 9)]
        ents = [
            SyncEntry(rnd.randbytes(alen), rnd.randrange(1024, 65536), vip, 80, 6, reals[i % 8])
            for i in range(n)
        ]
        gc.collect()
        gc.freeze()  # like the agent: the table lives in BPF, not in Python objects
        best_enc = best_dec = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            dgs = [
                encode(Entries("lb1", 7, i, 1.0, b), key)
                for i, b in enumerate(pack_entries(ents, max_payload, "lb1"))
            ]
            t1 = time.perf_counter()
            got = 0
            for d in dgs:
                got += len(decode(d, key, max_payload).entries)
            t2 = time.perf_counter()
            assert got == n
            best_enc, best_dec = min(best_enc, t1 - t0), min(best_dec, t2 - t1)
        print(
            f"{fam} {n} entries, {len(dgs)} datagrams of <= {max_payload} B: "
            f"encode {n / best_enc:,.0f}/s  decode {n / best_dec:,.0f}/s  "
            f"encode+decode {n / (best_enc + best_dec):,.0f}/s"
        )
        del ents, dgs
        gc.unfreeze()


if __name__ == "__main__":  # pragma: no cover
    import sys

    _bench(*(int(a) for a in sys.argv[1:3]))
