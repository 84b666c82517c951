"""Conn-table sync wire format: round trips, sizing, rejects, fuzz."""

from __future__ import annotations

import hmac
import struct

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from l4lb.sync import codec
from l4lb.sync.codec import (
    DEFAULT_MAX_PAYLOAD,
    MAX_SENDER_LEN,
    PREFIX_LEN,
    TAG_LEN,
    VERSION,
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
    entry_capacity,
    pack_entries,
)

KEY = b"0123456789abcdef0123456789abcdef"
V4 = bytes([10, 0, 0, 1])
V6 = bytes.fromhex("20010db8000000000000000000000001")


def e4(i: int, real: bytes = bytes([10, 1, 0, 2]), proto: int = 6) -> SyncEntry:
    return SyncEntry(
        bytes([192, 168, (i >> 8) & 255, i & 255]), 1024 + i % 60000, V4, 80, proto, real
    )


def e6(i: int, real: bytes = V6[:-1] + b"\x09", proto: int = 17) -> SyncEntry:
    return SyncEntry(V6[:-4] + i.to_bytes(4, "big"), 40000 + i % 20000, V6, 443, proto, real)


def mac(head: bytes, key: bytes = KEY) -> bytes:
    return head + hmac.digest(key, head, "sha256")


def raw(body, version: int = VERSION, key: bytes = KEY) -> bytes:
    """A correctly MACed datagram around an arbitrary msgpack body."""
    packed = msgpack.packb(body, use_bin_type=True)
    return mac(struct.pack("!3sBI", b"L4S", version, len(packed)) + packed, key)


def reason(data, max_size: int = 65507, key: bytes = KEY) -> str:
    with pytest.raises(SyncDecodeError) as ei:
        decode(data, key, max_size)
    return ei.value.reason


# --------------------------------------------------------------------------- round trips

MIXED = [
    e4(1),
    e6(2),
    e4(3, real=V6),  # tunnel mode: IPv4 flow, IPv6 real
    e6(4, real=bytes([10, 1, 0, 7])),  # IPv6 flow, IPv4 real
    e4(5, proto=17),
    SyncEntry(V4, 0, V4, 65535, 6, V4),  # port extremes
]


@pytest.mark.parametrize(
    "msg",
    [
        Entries("lb1", 1, 1, 1700000000.25, [e4(i) for i in range(10)]),
        Entries("lb1", 2**64 - 1, 2**64 - 1, 0.0, [e6(i) for i in range(5)]),
        Entries("lb-ü", 5, 9, 1.5, []),
        Entries("x" * MAX_SENDER_LEN, 5, 9, 1.5, MIXED),
        FullChunk("lb2", 7, 3, 2.0, 11, 0, False, [e4(i) for i in range(3)]),
        FullChunk("lb2", 7, 4, 2.0, 2**64 - 1, 2**32 - 1, True, []),
        Hello("lb1", 3, 1, 5.0, "master"),
        Heartbeat("lb1", 3, 2, 6.0, "backup"),
        Challenge("lb1", 3, 3, 7.0, bytes(range(16))),
        Response("lb2", 2**64 - 1, 4, 8.0, "master", b"\xff" * 16),
    ],
    ids=lambda m: type(m).__name__,
)
def test_round_trip(msg) -> None:
    data = encode(msg, KEY)
    got = decode(data, KEY, 65507)
    assert type(got) is type(msg)
    assert got.kind == msg.kind
    for f in ("sender", "session", "seq", "ts"):
        assert getattr(got, f) == getattr(msg, f)
    if hasattr(msg, "entries"):
        # Entries are grouped by address shape on the wire: same set, any order.
        assert sorted(got.entries) == sorted(msg.entries)
        assert all(type(e) is SyncEntry for e in got.entries)
    if isinstance(msg, FullChunk):
        assert (got.full_id, got.chunk, got.last) == (msg.full_id, msg.chunk, msg.last)
    if isinstance(msg, (Hello, Heartbeat)):
        assert got.role == msg.role


def test_single_shape_keeps_order_and_fields() -> None:
    ents = [e4(i) for i in range(50)]
    got = decode(encode(Entries("a", 1, 1, 0.0, ents), KEY), KEY, 65507).entries
    assert got == ents
    assert got[3].src == ents[3].src and got[3].real == ents[3].real and got[3].proto == 6


def test_entries_are_compact() -> None:
    one = len(encode(Entries("lb1", 1, 1, 0.0, [e4(0)]), KEY))
    hundred = len(encode(Entries("lb1", 1, 1, 0.0, [e4(i) for i in range(100)]), KEY))
    assert (hundred - one) / 99 <= 19.1  # 19-byte IPv4 records (with age), no per-entry framing


# --------------------------------------------------------------------------- sizing


@pytest.mark.parametrize("max_payload", [256, 512, DEFAULT_MAX_PAYLOAD, 9000, 60000])
@pytest.mark.parametrize("sender", ["a", "x" * MAX_SENDER_LEN, None])
@pytest.mark.parametrize("shape", ["v4", "v6", "mixed"])
def test_pack_entries_fits(max_payload: int, sender, shape: str) -> None:
    n = 3000
    if shape == "v4":
        ents = [e4(i) for i in range(n)]
    elif shape == "v6":
        ents = [e6(i) for i in range(n)]
    else:
        ents = [MIXED[i % len(MIXED)] for i in range(n)]
    batches = pack_entries(ents, max_payload, sender)
    assert [e for b in batches for e in b] == ents  # consecutive slices, nothing lost
    name = sender or "x" * MAX_SENDER_LEN
    worst = [2**64 - 1] * 3
    for b in batches:
        assert b
        for msg in (
            Entries(name, worst[0], worst[1], 1e300, b),
            FullChunk(name, worst[0], worst[1], 1e300, worst[2], 2**32 - 1, True, b),
        ):
            assert len(encode(msg, KEY)) <= max_payload
    if shape != "mixed" and len(batches) > 1:  # tight: a full batch leaves < one record free
        used = len(encode(Entries(name, 1, 1, 0.0, batches[0]), KEY))
        assert max_payload - used < 53 + 40


def test_entry_capacity() -> None:
    assert entry_capacity(1400, "lb1") == len(
        pack_entries([e4(i) for i in range(500)], 1400, "lb1")[0]
    )
    assert entry_capacity(1400, "lb1", (16, 16, 16)) == len(
        pack_entries([e6(i) for i in range(500)], 1400, "lb1")[0]
    )
    assert entry_capacity(1400, "lb1") >= 68  # 68 IPv4 entries (19 bytes) per 1400-byte datagram


def test_pack_entries_empty_and_too_small() -> None:
    assert pack_entries([], 1400) == []
    with pytest.raises(ValueError):
        pack_entries([e4(1)], 100)


BAD_ENTRIES = [
    SyncEntry(V4, 1, V6, 80, 6, V4),  # src/dst families differ
    SyncEntry(b"\x01\x02\x03", 1, V4, 80, 6, V4),  # 3-byte address
    SyncEntry(V4, 1, V4, 80, 6, b"\x00" * 5),  # 5-byte real
    SyncEntry(V4, 70000, V4, 80, 6, V4),  # port out of range
    SyncEntry(V4, -1, V4, 80, 6, V4),
    SyncEntry(V4, 1, V4, 80, 1, V4),  # ICMP
    SyncEntry(V4, 1, V4, 80, 300, V4),
    SyncEntry("abcd", 1, V4, 80, 6, V4),  # str, not bytes
    SyncEntry(V4, "1", V4, 80, 6, V4),
    (V4, 1, V4),  # not six fields
]


@pytest.mark.parametrize("bad", BAD_ENTRIES, ids=range(len(BAD_ENTRIES)))
def test_encode_rejects_bad_entries(bad) -> None:
    assert not check_entry(bad)
    for ents in ([bad], [e4(1), bad, e4(2)], [e6(1), bad]):
        with pytest.raises(ValueError):
            encode(Entries("lb1", 1, 1, 0.0, ents), KEY)


def test_check_entry_accepts_good() -> None:
    assert all(check_entry(e) for e in MIXED)


@pytest.mark.parametrize(
    "msg",
    [
        Entries("", 1, 1, 0.0, []),
        Entries("x" * (MAX_SENDER_LEN + 1), 1, 1, 0.0, []),
        Entries("a", -1, 1, 0.0, []),
        Entries("a", 1, 2**64, 0.0, []),
        Entries("a", 1, 1, float("nan"), []),
        FullChunk("a", 1, 1, 0.0, 1, 2**32, False, []),
        Hello("a", 1, 1, 0.0, "leader"),
    ],
)
def test_encode_rejects_bad_header(msg) -> None:
    with pytest.raises(ValueError):
        encode(msg, KEY)


# --------------------------------------------------------------------------- rejects

GOOD = encode(Entries("lb1", 1, 1, 0.0, [e4(i) for i in range(20)]), KEY)


def test_reject_truncated() -> None:
    for n in (0, 1, PREFIX_LEN - 1, PREFIX_LEN, PREFIX_LEN + 5, len(GOOD) - 1):
        assert reason(GOOD[:n]) == "truncated"


def test_reject_oversize() -> None:
    assert reason(GOOD, max_size=len(GOOD) - 1) == "oversize"
    decode(GOOD, KEY, len(GOOD))  # exactly max_size is fine
    # A length field claiming more than max_size, too (even if cut short).
    assert reason(GOOD[:40], max_size=len(GOOD) - 1) == "oversize"


def test_reject_bad_mac() -> None:
    assert reason(GOOD, key=b"another key, 32 bytes long......") == "bad_mac"
    for i in (PREFIX_LEN + 3, len(GOOD) // 2, len(GOOD) - 1):  # body and tag bit flips
        bad = bytearray(GOOD)
        bad[i] ^= 0x01
        assert reason(bytes(bad)) == "bad_mac"


def test_mac_checked_before_unpacking(monkeypatch) -> None:
    def boom(*a, **k):
        raise AssertionError("msgpack touched before the MAC was checked")

    monkeypatch.setattr(codec.msgpack, "unpackb", boom)
    bad = bytearray(GOOD)
    bad[PREFIX_LEN] ^= 0xFF
    assert reason(bytes(bad)) == "bad_mac"


def test_reject_version() -> None:
    body = [1, "lb1", 1, 1, 0.0, []]
    assert reason(raw(body, version=VERSION + 1)) == "version"
    assert reason(raw(body, version=0)) == "version"
    bad = bytearray(GOOD)
    bad[3] = VERSION + 1  # not re-MACed: still "version", the peer's scheme may differ
    assert reason(bytes(bad)) == "version"
    assert decode(raw(body), KEY, 65507).sender == "lb1"  # the helper itself is right


def test_reject_bad_magic_and_trailing() -> None:
    assert reason(b"XYZ" + GOOD[3:]) == "malformed"
    assert reason(GOOD + b"\x00") == "malformed"


def _rec4(proto: int = 6) -> bytes:
    return struct.pack("!4sH4sHB4s", V4, 1, V4, 2, proto, V4)


MALFORMED_BODIES = {
    "not a list": {"kind": 1},
    "short": [1, "lb1", 1, 1, 0.0],
    "unknown kind": [9, "lb1", 1, 1, 0.0, []],
    "kind bool": [True, "lb1", 1, 1, 0.0, []],
    "kind float": [1.0, "lb1", 1, 1, 0.0, []],
    "entries extra field": [1, "lb1", 1, 1, 0.0, [], 5],
    "sender bytes": [1, b"lb1", 1, 1, 0.0, []],
    "sender empty": [1, "", 1, 1, 0.0, []],
    "sender long": [1, "x" * 65, 1, 1, 0.0, []],
    "session negative": [1, "lb1", -1, 1, 0.0, []],
    "session str": [1, "lb1", "1", 1, 0.0, []],
    "seq bool": [1, "lb1", 1, True, 0.0, []],
    "seq float": [1, "lb1", 1, 1.0, 0.0, []],
    "ts int": [1, "lb1", 1, 1, 0, []],
    "ts nan": [1, "lb1", 1, 1, float("nan"), []],
    "ts inf": [1, "lb1", 1, 1, float("inf"), []],
    "groups not list": [1, "lb1", 1, 1, 0.0, b"x"],
    "groups odd": [1, "lb1", 1, 1, 0.0, [0]],
    "unknown shape": [1, "lb1", 1, 1, 0.0, [4, _rec4()]],
    "shape bool": [1, "lb1", 1, 1, 0.0, [False, _rec4()]],
    "blob str": [1, "lb1", 1, 1, 0.0, [0, "abc"]],
    "blob partial record": [1, "lb1", 1, 1, 0.0, [0, _rec4() + b"\x00"]],
    "address lengths": [1, "lb1", 1, 1, 0.0, [3, _rec4()]],  # v6 shape, v4-sized record
    "proto 1": [1, "lb1", 1, 1, 0.0, [0, _rec4() + _rec4(1)]],
    "proto 0 in second group": [1, "lb1", 1, 1, 0.0, [0, _rec4(), 0, _rec4(0)]],
    "full short": [2, "lb1", 1, 1, 0.0, 1, 0, []],
    "full last int": [2, "lb1", 1, 1, 0.0, 1, 0, 1, []],
    "full chunk u64": [2, "lb1", 1, 1, 0.0, 1, 2**32, True, []],
    "full id negative": [2, "lb1", 1, 1, 0.0, -1, 0, True, []],
    "hello bad role": [3, "lb1", 1, 1, 0.0, "leader"],
    "hello role list": [3, "lb1", 1, 1, 0.0, ["master"]],
    "heartbeat no role": [4, "lb1", 1, 1, 0.0],
    "challenge short nonce": [5, "lb1", 1, 1, 0.0, b"\x00" * 15],
    "challenge str nonce": [5, "lb1", 1, 1, 0.0, "x" * 16],
    "response no nonce": [6, "lb1", 1, 1, 0.0, "master"],
    "response bad role": [6, "lb1", 1, 1, 0.0, "boss", b"\x00" * 16],
    "response long nonce": [6, "lb1", 1, 1, 0.0, "backup", b"\x00" * 17],
}


@pytest.mark.parametrize("body", MALFORMED_BODIES.values(), ids=MALFORMED_BODIES.keys())
def test_reject_malformed(body) -> None:
    assert reason(raw(body)) == "malformed"


def test_reject_malformed_msgpack() -> None:
    for junk in (b"\xc1", b"\x92\x01", b"\x91\x01\x02", b"\xd9\x02\xff\xfe", b""):
        head = struct.pack("!3sBI", b"L4S", VERSION, len(junk)) + junk
        assert reason(mac(head)) == "malformed"


def test_decode_accepts_bytearray_and_memoryview() -> None:
    assert decode(bytearray(GOOD), KEY, 1400).seq == 1
    assert decode(memoryview(GOOD), KEY, 1400).seq == 1


# --------------------------------------------------------------------------- fuzz

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=2000))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    try:
        decode(data, KEY, 1400)
    except SyncDecodeError as exc:
        assert exc.reason in codec.REASONS


@FUZZ
@given(st.binary(max_size=600))
def test_fuzz_arbitrary_bytes_behind_valid_prefix_and_mac(body: bytes) -> None:
    head = struct.pack("!3sBI", b"L4S", VERSION, len(body)) + body
    try:
        decode(mac(head), KEY, 65507)
    except SyncDecodeError as exc:
        assert exc.reason in codec.REASONS


_leaf = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=70)
    | st.binary(max_size=80)
    | st.sampled_from([0, 1, 2, 3, 4, "master", "backup", "lb1", _rec4(), _rec4(9)])
)
_msgpack_values = st.recursive(
    _leaf,
    lambda kids: (
        st.lists(kids, max_size=10)
        | st.dictionaries(st.text(max_size=5) | st.binary(max_size=5), kids, max_size=4)
    ),
    max_leaves=30,
)


@FUZZ
@given(_msgpack_values)
def test_fuzz_valid_mac_arbitrary_msgpack(body) -> None:
    try:
        decode(raw(body), KEY, 65507)
    except SyncDecodeError as exc:
        assert exc.reason in codec.REASONS


@FUZZ
@given(
    st.sampled_from([1, 2, 3, 4]),
    st.lists(_leaf | st.lists(_leaf, max_size=4), min_size=1, max_size=4),
)
def test_fuzz_valid_mac_plausible_headers(kind: int, rest: list) -> None:
    # Bodies that start like ours, so the fuzz reaches the per-kind checks.
    body = [kind, "lb1", 1, 1, 0.5, *rest]
    try:
        msg = decode(raw(body), KEY, 65507)
    except SyncDecodeError as exc:
        assert exc.reason in codec.REASONS
    else:
        assert msg.sender == "lb1"


@FUZZ
@given(st.data())
def test_fuzz_mutated_valid_messages(data) -> None:
    # Bit flips inside a real message's body, re-MACed (i.e. a buggy peer).
    msg = data.draw(
        st.sampled_from([GOOD, encode(FullChunk("a", 1, 2, 0.0, 3, 4, True, MIXED), KEY)])
    )
    body = bytearray(msg[PREFIX_LEN:-TAG_LEN])
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(body) - 1))
        body[i] = data.draw(st.integers(0, 255))
    head = struct.pack("!3sBI", b"L4S", VERSION, len(body)) + bytes(body)
    try:
        got = decode(mac(head), KEY, 65507)
    except SyncDecodeError as exc:
        assert exc.reason in codec.REASONS
    else:
        for e in getattr(got, "entries", ()):
            assert check_entry(e)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.builds(
            SyncEntry,
            st.sampled_from([4, 16]).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
            st.integers(0, 65535),
            st.just(V4),
            st.integers(0, 65535),
            st.sampled_from([6, 17]),
            st.sampled_from([4, 16]).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
            st.integers(0, 0xFFFF),
        ).map(lambda e: e._replace(dst=V4 if len(e.src) == 4 else V6)),
        max_size=200,
    )
)
def test_fuzz_round_trip_entries(ents) -> None:
    got = []
    for b in pack_entries(ents, 1400, "lb1"):
        data = encode(Entries("lb1", 1, 1, 0.0, b), KEY)
        assert len(data) <= 1400
        got += decode(data, KEY, 1400).entries
    assert sorted(got) == sorted(ents)


# --------------------------------------------------------------------------- packed entries


def test_packed_entries_pass_through_encode_unchanged() -> None:
    """Pre-packed records (the walk thread's) encode to the very datagram the same
    entries as tuples give, and decode back to a PackedEntries equal to them."""
    ents = [e4(i) for i in range(40)]
    blob = b"".join(struct.pack("!4sH4sHB4sH", *e) for e in ents)
    packed = PackedEntries.from_groups([(0, blob)])
    assert len(packed) == 40 and packed == ents and list(packed) == ents and packed[3] == ents[3]
    a = encode(FullChunk("lb1", 1, 2, 3.0, 4, 0, True, packed), KEY)
    b = encode(FullChunk("lb1", 1, 2, 3.0, 4, 0, True, ents), KEY)
    assert a == b
    got = decode(a, KEY, 65507).entries
    assert type(got) is PackedEntries and got.groups == ((0, blob),) and got == packed


@pytest.mark.parametrize("groups", [[(9, b"")], [(0, b"\x00" * 16)], [("0", b"")],
                                    [(0, b"\x00" * 12 + b"\x07" + b"\x00" * 6)]],
                         ids=["shape", "partial record", "code type", "proto"])
def test_packed_entries_checked_when_built(groups) -> None:
    with pytest.raises(ValueError):
        PackedEntries.from_groups(groups)


def test_challenge_and_response_checked_when_encoded() -> None:
    with pytest.raises(ValueError):
        encode(Challenge("lb1", 1, 1, 0.0, b"short"), KEY)
    with pytest.raises(ValueError):
        encode(Response("lb1", 1, 1, 0.0, "boss", bytes(16)), KEY)


def test_entries_carry_their_age() -> None:
    """Version 3: each record ends in its age (u16 seconds); out of range is refused."""
    ents = [e4(1)._replace(age_s=0), e4(2)._replace(age_s=4), e6(3)._replace(age_s=0xFFFF)]
    got = decode(encode(Entries("lb1", 1, 1, 0.0, ents), KEY), KEY).entries
    assert [e.age_s for e in got] == [0, 4, 0xFFFF] and list(got) == ents
    assert VERSION == 3 and codec.MAX_AGE_S == 0xFFFF
    for bad in (-1, 0x10000, 1.5):
        assert not check_entry(e4(1)._replace(age_s=bad))
        with pytest.raises(ValueError):
            encode(Entries("lb1", 1, 1, 0.0, [e4(1)._replace(age_s=bad)]), KEY)
