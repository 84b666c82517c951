"""The conn table over its two maps: IPv4 flows in conns4 (16-byte keys), IPv6 in conns.

Everything above it sees one table of 40-byte FlowKey records: what goes in comes
out byte for byte, whichever map holds it, and the data plane finds what user space
installed (and the other way round).
"""

import random

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from l4lb.dataplane import conntable, testrun
from l4lb.dataplane import maps as M
from l4lb.dataplane.tables import CONN_KEY, CONN_VAL, coarse_now_ns

LB_MAC = "02:99:00:00:00:01"
REALS = [("10.99.0.31", "02:99:00:00:1e:1f"), ("10.99.0.32", "02:99:00:00:1e:20")]


def rec(src, dst, sport, dport, proto, real_id, ts=123):
    raw_s, fam = M.addr16(src)
    raw_d, _ = M.addr16(dst)
    return CONN_KEY.pack(raw_s, raw_d, sport, dport, proto, fam), CONN_VAL.pack(real_id, 1, ts)


def mixed(n, seed=1):
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        if rnd.random() < 0.5:
            out.append(rec(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", "10.99.0.100",
                           1024 + i % 60000, 80, rnd.choice((6, 17)), 1 + i % 7, ts=i))
        else:
            out.append(rec(f"fd00::{i:x}", "fd99::100", 1024 + i % 60000, 443,
                           rnd.choice((6, 17)), 1 + i % 7, ts=i))
    return out


def test_widen_narrow_round_trip():
    recs = [rec(f"192.0.2.{i}", "198.51.100.7", 1000 + i, 65535 - i, 6 + 11 * (i & 1), i)[0]
            for i in range(1, 200)]
    keys = b"".join(recs)
    k4 = conntable.narrow(keys, len(recs))
    assert len(k4) == 16 * len(recs)
    assert conntable.widen(k4, len(recs)) == keys
    one = M.FlowKey4.from_buffer_copy(k4, 0)
    assert bytes(one.src) == bytes([192, 0, 2, 1]) and bytes(one.dst) == bytes([198, 51, 100, 7])
    assert bytes(one)[8:12] == (1001).to_bytes(2, "big") + (65534).to_bytes(2, "big")
    assert one.proto == 17 and bytes(one.pad) == bytes(3)  # network-order ports: byte copies


def test_install_mixed_families_walks_back_byte_identical(st, prog):
    recs = mixed(5000)
    keys, vals = b"".join(k for k, _ in recs), b"".join(v for _, v in recs)
    assert st.install_conns(keys, vals) == 5000
    n4 = sum(1 for k, _ in recs if k[37] == 4)
    assert sum(1 for _ in prog.map("conns4").keys()) == n4
    assert sum(1 for _ in prog.map("conns").keys()) == 5000 - n4
    got = {}
    for ks, vs, n in st.conn_batches(333):
        for i in range(n):
            got[ks[i * 40:(i + 1) * 40]] = vs[i * 16:(i + 1) * 16]
    assert got == dict(recs)
    assert st.conn_count() == 5000 == len(st.conns)


def test_install_keeps_existing_when_asked_and_skips_unknown_families(st):
    k, v = rec("10.1.2.3", "10.99.0.100", 5555, 80, 6, 3)
    k6, v6 = rec("fd00::5", "fd99::100", 5555, 80, 6, 4)
    assert st.install_conns(k + k6, v + v6) == 2
    newer = CONN_VAL.pack(5, 1, 999)
    assert st.install_conns(k + k6, newer + newer, overwrite=False) == 0
    assert {bytes(a): bytes(b) for a, b in st.conns.items()} == {k: v, k6: v6}
    bogus = bytearray(k)
    bogus[37] = 9  # family 9: no flow of either map
    assert st.install_conns(bytes(bogus) + k, newer + newer) == 1
    assert st.conns[M.FlowKey.from_buffer_copy(k)].real_id == 5
    with pytest.raises(ValueError, match="whole FlowKey/ConnVal"):
        st.install_conns(k[:-1], v)


def test_entry_interface_by_flow_key(st):
    k4 = M.flow_key("10.1.2.3", 4000, "10.99.0.100", 80, "tcp")
    k6 = M.flow_key("fd00::1", 4000, "fd99::100", 80, "udp")
    st.conns[k4] = M.ConnVal(real_id=7, vip_id=2, last_seen_ns=5)
    st.conns[k6] = M.ConnVal(real_id=8, vip_id=3, last_seen_ns=6)
    assert st.conns[k4].real_id == 7 and st.conns[k6].vip_id == 3
    del st.conns[k4]
    with pytest.raises(KeyError):
        st.conns[k4]
    assert [M.flow_tuple(k) for k in st.conns.keys()] == [M.flow_tuple(k6)]
    st.conns.clear()
    assert not st.conns.items()


@pytest.mark.parametrize("family", [4, 6])
def test_data_plane_uses_what_user_space_installed(st, prog, family):
    """An entry installed by user space (sync) steers the flow, in either family's map;
    the ring would pick otherwise for at least one of the sources tried."""
    vip, src = ("10.99.0.100", "10.1.1.{}") if family == 4 else ("fd99::100", "fd00::{}")
    vs = st.upsert_vip(vip, 80, "tcp", mode="dr")
    st.set_reals(vs.key, [(a, m, 100) for a, m in REALS])
    ids = {r.address: r.real_id for r in st.vips[vs.key].reals.values()}
    macs = {ids[a]: m for a, m in REALS}
    vip_id = st.vips[vs.key].vip_id
    l3 = IP if family == 4 else IPv6
    for i in range(1, 9):
        s = src.format(i)
        frame = bytes(Ether(dst=LB_MAC) / l3(src=s, dst=vip) / TCP(sport=3000 + i, dport=80,
                                                                     flags="A"))
        ring = Ether(testrun.test_run(prog.fd, frame).data).dst  # no entry: the ring's pick
        other = next(r for r, m in macs.items() if m != ring)
        key, _ = rec(s, vip, 3000 + i, 80, 6, other)
        st.install_conns(key, CONN_VAL.pack(other, vip_id, coarse_now_ns()))
        assert Ether(testrun.test_run(prog.fd, frame).data).dst == macs[other]
    # and what the data plane creates, user space reads back as FlowKey records
    syn = bytes(Ether(dst=LB_MAC) / l3(src=src.format(99), dst=vip) / TCP(sport=7, dport=80,
                                                                          flags="S"))
    ack = bytes(Ether(dst=LB_MAC) / l3(src=src.format(99), dst=vip) / TCP(sport=7, dport=80,
                                                                          flags="A"))
    testrun.test_run(prog.fd, syn)
    testrun.test_run(prog.fd, ack)
    rows = [r for r in st.conn_entries() if r[1] == 7]
    assert len(rows) == 1 and rows[0][0] == src.format(99) and rows[0][2] == vip
