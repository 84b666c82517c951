"""VRRP advert codec: real keepalived captures, scapy cross-checks, bad input, fuzz."""

from __future__ import annotations

import ipaddress
import socket
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP
from scapy.layers.inet6 import IPv6
from scapy.layers.vrrp import VRRP, VRRPv3
from scapy.packet import Raw
from scapy.utils import rdpcap

from l4lb.vrrp.packet import (
    DECODE_REASONS,
    IPPROTO_VRRP,
    VRRP_MCAST_V4,
    VRRP_MCAST_V6,
    Advert,
    VrrpDecodeError,
    decode,
    encode,
    inet_checksum,
)

# keepalived's own adverts, captured on the wire (see tests/vectors/vrrp/README.md)
VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "vrrp"
V2_PCAP = VECTORS / "v2-adv1-stop.pcap"
V3_PCAP = VECTORS / "v3-adv0.1-stop.pcap"

A4 = ipaddress.IPv4Address
A6 = ipaddress.IPv6Address
SRC4, DST4 = A4("10.77.0.11"), VRRP_MCAST_V4
SRC6, DST6 = A6("fe80::11"), VRRP_MCAST_V6
VIP4 = A4("10.77.0.100")


def _vrrp_packets(path: Path) -> list[tuple[float, A4, A4, int, bytes]]:
    out = []
    for p in rdpcap(str(path)):
        if IP in p and p[IP].proto == IPPROTO_VRRP:
            ip = p[IP]
            out.append((float(p.time), A4(ip.src), A4(ip.dst), ip.ttl, bytes(ip.payload)))
    return out


def _pseudo4(src: A4, dst: A4, n: int) -> bytes:
    return src.packed + dst.packed + struct.pack("!BBH", 0, IPPROTO_VRRP, n)


# ---- real captures --------------------------------------------------------


@pytest.mark.parametrize(
    "path, version, interval_cs",
    [(V2_PCAP, 2, 100), (V3_PCAP, 3, 10)],
    ids=["v2", "v3"],
)
def test_pcap_vectors_decode_verify_and_reencode(path: Path, version: int, interval_cs: int):
    pkts = _vrrp_packets(path)
    assert len(pkts) >= 15
    priorities = set()
    for _t, src, dst, ttl, payload in pkts:
        assert ttl == 255
        adv = decode(payload, src, dst, socket.AF_INET, ttl=ttl)
        # checksum as keepalived computed it verifies with our own sum
        if version == 2:
            assert inet_checksum(payload) == 0
        else:
            assert inet_checksum(_pseudo4(src, dst, len(payload)) + payload) == 0
            # and v3 really covers the pseudo-header: the bare message does not verify
            assert inet_checksum(payload) != 0
        assert adv.checksum == struct.unpack("!H", payload[6:8])[0]
        assert (adv.version, adv.vrid, adv.type) == (version, 77, 1)
        assert adv.interval_cs == interval_cs
        assert adv.addresses == [VIP4]
        assert adv.auth_type == 0
        assert adv.auth_data == (b"\0" * 8 if version == 2 else b"")
        priorities.add((str(src), adv.priority))
        assert encode(adv, src, dst) == payload
    assert priorities == {
        ("10.77.0.11", 101),
        ("10.77.0.11", 0),
        ("10.77.0.12", 100),
        ("10.77.0.12", 0),
    }


def test_v3_checksum_depends_on_addresses():
    _t, src, dst, _ttl, payload = _vrrp_packets(V3_PCAP)[0]
    with pytest.raises(VrrpDecodeError) as ei:
        decode(payload, A4("10.77.0.12"), dst)
    assert ei.value.reason == "checksum"
    with pytest.raises(VrrpDecodeError) as ei:
        decode(payload, src, A4("10.77.0.12"))  # unicast peer instead of the group
    assert ei.value.reason == "checksum"


# ---- scapy cross-checks ----------------------------------------------------


def test_ours_v2_parsed_by_scapy():
    adv = Advert(2, 42, 150, 300, [A4("192.0.2.1"), A4("192.0.2.2")], 1, b"secret")
    raw = encode(adv, SRC4, DST4)
    pkt = IP(bytes(IP(src=str(SRC4), dst=str(DST4), proto=112, ttl=255) / Raw(raw)))
    v = pkt[VRRP]
    assert type(v) is VRRP
    assert (v.version, v.type, v.vrid, v.priority, v.ipcount) == (2, 1, 42, 150, 2)
    assert (v.authtype, v.adv) == (1, 3)
    assert v.addrlist == ["192.0.2.1", "192.0.2.2"]
    assert struct.pack("!II", v.auth1, v.auth2) == b"secret\0\0"
    # scapy computes the same checksum for the same fields
    v2 = v.copy()
    v2.chksum = None
    assert VRRP(bytes(v2)).chksum == v.chksum


@pytest.mark.parametrize("fam", [4, 6])
def test_ours_v3_parsed_by_scapy(fam: int):
    if fam == 4:
        src, dst, addrs = SRC4, DST4, [A4("198.51.100.7")]
        outer = IP(src=str(src), dst=str(dst), proto=112, ttl=255)
        parse = IP
    else:
        src, dst, addrs = SRC6, DST6, [A6("2001:db8::7"), A6("fe80::1")]
        outer = IPv6(src=str(src), dst=str(dst), nh=112, hlim=255)
        parse = IPv6
    adv = Advert(3, 9, 200, 4095, addrs)
    raw = encode(adv, src, dst)
    pkt = parse(bytes(outer / Raw(raw)))
    v = pkt[VRRPv3]
    assert (v.version, v.type, v.vrid, v.priority, v.ipcount, v.res, v.adv) == (
        3,
        1,
        9,
        200,
        len(addrs),
        0,
        4095,
    )
    assert v.addrlist == [str(a) for a in addrs]
    # scapy's pseudo-header checksum agrees with ours
    v.chksum = None
    rebuilt = parse(bytes(pkt))
    assert rebuilt[VRRPv3].chksum == struct.unpack("!H", raw[6:8])[0]


def test_scapy_built_adverts_decode_in_ours():
    p4 = IP(src=str(SRC4), dst=str(DST4), ttl=255) / VRRPv3(
        vrid=77, priority=120, adv=25, addrlist=["10.0.0.1", "10.0.0.2"]
    )
    p4 = IP(bytes(p4))
    a = decode(bytes(p4[IP].payload), p4[IP].src, p4[IP].dst, socket.AF_INET)
    assert (a.version, a.vrid, a.priority, a.interval_cs) == (3, 77, 120, 25)
    assert a.addresses == [A4("10.0.0.1"), A4("10.0.0.2")]

    p6 = IPv6(src=str(SRC6), dst=str(DST6), hlim=255) / VRRPv3(
        vrid=5, priority=255, adv=100, addrlist=["2001:db8::1"]
    )
    p6 = IPv6(bytes(p6))
    a = decode(bytes(p6[IPv6].payload), p6[IPv6].src, p6[IPv6].dst, socket.AF_INET6)
    assert (a.version, a.vrid, a.priority, a.interval_cs) == (3, 5, 255, 100)
    assert a.addresses == [A6("2001:db8::1")]
    assert encode(a, SRC6, DST6) == bytes(p6[IPv6].payload)

    p2 = IP(src=str(SRC4), dst=str(DST4), ttl=255) / VRRP(
        vrid=3,
        priority=100,
        adv=2,
        authtype=1,
        addrlist=["10.0.0.9"],
        auth1=int.from_bytes(b"pass"),
        auth2=int.from_bytes(b"word"),
    )
    p2 = IP(bytes(p2))
    a = decode(bytes(p2[IP].payload), p2[IP].src, p2[IP].dst, auth_type=1, auth_data=b"password")
    assert (a.version, a.vrid, a.priority, a.interval_cs) == (2, 3, 100, 200)
    assert (a.auth_type, a.auth_data) == (1, b"password")
    assert encode(a, SRC4, DST4) == bytes(p2[IP].payload)


# ---- round trips -----------------------------------------------------------

_addr4 = st.builds(A4, st.integers(0, 2**32 - 1))
_addr6 = st.builds(A6, st.integers(0, 2**128 - 1))


@st.composite
def _adverts(draw):
    version = draw(st.sampled_from([2, 3]))
    fam = 4 if version == 2 else draw(st.sampled_from([4, 6]))
    addrs = draw(st.lists(_addr4 if fam == 4 else _addr6, min_size=1, max_size=20))
    if version == 2:
        interval = draw(st.integers(1, 255)) * 100
        auth_type = draw(st.sampled_from([0, 1]))
        auth = draw(st.binary(min_size=8, max_size=8)) if auth_type else b"\0" * 8
    else:
        interval, auth_type, auth = draw(st.integers(1, 4095)), 0, b""
    adv = Advert(
        version,
        draw(st.integers(1, 255)),
        draw(st.integers(0, 255)),
        interval,
        addrs,
        auth_type,
        auth,
    )
    src, dst = (SRC4, DST4) if fam == 4 else (SRC6, DST6)
    return adv, src, dst


@settings(max_examples=300, deadline=None)
@given(_adverts())
def test_roundtrip(case):
    adv, src, dst = case
    raw = encode(adv, src, dst)
    back = decode(raw, src, dst)
    adv.checksum = back.checksum
    assert back == adv
    assert encode(back, src, dst) == raw


def test_v2_auth_padding_and_v2_ignores_ip_addresses():
    adv = Advert(2, 1, 100, 100, [VIP4], auth_type=1, auth_data=b"pw")
    raw = encode(adv)  # v2: checksum does not depend on src/dst
    assert raw[-8:] == b"pw\0\0\0\0\0\0"
    assert encode(adv, SRC4, DST4) == raw
    assert decode(raw, "10.9.9.9", "10.8.8.8", auth_type=1, auth_data=b"pw").auth_data == (
        b"pw" + b"\0" * 6
    )


@pytest.mark.parametrize(
    "adv",
    [
        Advert(2, 1, 100, 150, [VIP4]),  # v2 interval not whole seconds
        Advert(2, 1, 100, 100, [A6("::1")]),  # v2 over IPv6
        Advert(2, 1, 100, 100, [VIP4], auth_type=2),
        Advert(2, 1, 100, 100, [VIP4], auth_type=1, auth_data=b"123456789"),
        Advert(3, 1, 100, 0, [VIP4]),
        Advert(3, 1, 100, 4096, [VIP4]),
        Advert(3, 1, 100, 100, []),
        Advert(3, 1, 100, 100, [VIP4, A6("::1")]),
        Advert(4, 1, 100, 100, [VIP4]),
        Advert(3, 256, 100, 100, [VIP4]),
    ],
)
def test_encode_rejects_unrepresentable(adv):
    with pytest.raises(ValueError):
        encode(adv, SRC4, DST4)


def test_encode_v3_needs_addresses_for_checksum():
    with pytest.raises(ValueError):
        encode(Advert(3, 1, 100, 100, [VIP4]))


# ---- bad input ---------------------------------------------------------------


def _v3(**kw) -> bytes:
    return encode(Advert(3, 7, 100, 100, [VIP4, A4("10.77.0.101")], **kw), SRC4, DST4)


def _refix_v3(b: bytes) -> bytes:
    b = b[:6] + b"\0\0" + b[8:]
    ck = inet_checksum(_pseudo4(SRC4, DST4, len(b)) + b)
    return b[:6] + struct.pack("!H", ck) + b[8:]


def _refix_v2(b: bytes) -> bytes:
    b = b[:6] + b"\0\0" + b[8:]
    return b[:6] + struct.pack("!H", inet_checksum(b)) + b[8:]


def _reason(payload: bytes, src=SRC4, dst=DST4, **kw) -> str:
    with pytest.raises(VrrpDecodeError) as ei:
        decode(payload, src, dst, **kw)
    assert ei.value.reason in DECODE_REASONS
    return ei.value.reason


def test_bad_input_reasons():
    good = _v3()
    decode(good, SRC4, DST4)
    assert _reason(b"") == "truncated"
    assert _reason(good[:7]) == "truncated"
    assert _reason(_refix_v3(bytes([0x41]) + good[1:])) == "version"
    assert _reason(_refix_v3(bytes([0x11]) + good[1:])) == "version"
    assert _reason(_refix_v3(bytes([0x32]) + good[1:])) == "type"
    assert _reason(_refix_v3(good + b"\0\0")) == "length"  # not a whole address
    assert _reason(_refix_v3(good[:-4])) == "addr_count"  # one address short
    assert _reason(_refix_v3(good + b"\0\0\0\0")) == "addr_count"  # one too many
    assert _reason(_refix_v3(good[:3] + b"\x03" + good[4:])) == "addr_count"
    zero_count = _refix_v3(good[:3] + b"\x00" + good[4:8])
    assert _reason(zero_count) == "addr_count"
    assert _reason(_refix_v3(good[:4] + b"\xf0\x00" + good[6:])) == "interval"
    assert _reason(good[:6] + bytes([good[6] ^ 1]) + good[7:]) == "checksum"
    assert _reason(good[:-1] + bytes([good[-1] ^ 0x80])) == "checksum"
    assert _reason(good, ttl=64) == "ttl"
    assert _reason(good, src=SRC6, dst=DST6) == "length"  # 8 bytes is not an IPv6 address


def test_bad_v2_input_reasons():
    good = encode(Advert(2, 7, 100, 100, [VIP4], auth_type=1, auth_data=b"sesame"))
    decode(good, SRC4, DST4, auth_type=1, auth_data=b"sesame")
    assert _reason(good[:15]) == "truncated"  # header + auth data needs 16
    assert _reason(good[:-8]) == "truncated"  # auth data missing
    two = encode(Advert(2, 7, 100, 100, [VIP4, VIP4]))
    assert _reason(_refix_v2(two[:-8])) == "addr_count"  # auth data missing: room for 0
    assert _reason(_refix_v2(good[:4] + b"\x02" + good[5:])) == "auth"  # IP AH: unsupported
    assert _reason(_refix_v2(good[:5] + b"\x00" + good[6:])) == "interval"
    assert _reason(good, auth_type=0) == "auth"
    assert _reason(good, auth_type=1, auth_data=b"sesamE") == "auth"
    assert _reason(good, auth_type=1) == "auth"
    assert _reason(good, src=SRC6, dst=DST6) == "version"  # v2 is IPv4 only
    assert _reason(good[:6] + b"\0\0" + good[8:]) == "checksum"


def test_family_argument_mismatch_is_a_decode_error():
    assert _reason(_v3(), SRC4, DST6) == "family"
    with pytest.raises(VrrpDecodeError) as ei:
        decode(_v3(), SRC4, DST4, 6)
    assert ei.value.reason == "family"


# ---- fuzz ------------------------------------------------------------------


def _assert_reencodes(adv: Advert, src, dst) -> None:
    again = decode(encode(adv, src, dst), src, dst)
    again.checksum = adv.checksum
    assert again == adv


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([4, 6]))
def test_fuzz_arbitrary_bytes(data: bytes, fam: int):
    src, dst = (SRC4, DST4) if fam == 4 else (SRC6, DST6)
    try:
        adv = decode(data, src, dst, fam)
    except VrrpDecodeError as e:
        assert e.reason in DECODE_REASONS
    else:
        _assert_reencodes(adv, src, dst)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([0x21, 0x31, 0x22, 0x32, 0x11]),
    st.integers(0, 255),
    st.binary(min_size=4, max_size=4),
    st.binary(max_size=80),
    st.sampled_from([4, 6]),
)
def test_fuzz_checksummed_headers(vt: int, count: int, b4567: bytes, rest: bytes, fam: int):
    """Valid checksums so that decode gets past the checksum to every later check."""
    src, dst = (SRC4, DST4) if fam == 4 else (SRC6, DST6)
    msg = bytes([vt, 77, 100, count]) + b4567[:2] + b"\0\0" + rest
    if vt >> 4 == 3:
        if fam == 4:
            pseudo = _pseudo4(src, dst, len(msg))
        else:
            pseudo = src.packed + dst.packed + struct.pack("!I3xB", len(msg), 112)
        ck = inet_checksum(pseudo + msg)
    else:
        ck = inet_checksum(msg)
    msg = msg[:6] + struct.pack("!H", ck) + msg[8:]
    try:
        adv = decode(msg, src, dst)
    except VrrpDecodeError as e:
        assert e.reason in DECODE_REASONS
    else:
        _assert_reencodes(adv, src, dst)
        if vt >> 4 == 2 or b4567[0] & 0xF0 == 0:  # v3 reserved bits are not kept
            assert encode(adv, src, dst) == msg
