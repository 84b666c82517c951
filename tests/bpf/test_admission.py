"""Which packets may create state: TCP flows wait in `embryos` from their SYN until
their next packet promotes them into `conns` (and only then are synced); a non-SYN
of no known flow is forwarded by the ring with no entry; the admission guard bounds
new conns entries per CPU and second; a VIP address answers only its services."""

import ctypes
import os
import socket
import struct
import time

import pytest
from scapy.all import ICMP, IP, UDP, IPv6, raw
from test_balancer import add_vip, dr_real, eth, run, v4, v6

from l4lb.dataplane import loader, testrun
from l4lb.dataplane import maps as M


def entries(prog, name):
    if name == "embryos":
        return loader.embryos_waiting(prog.map(name))
    return sum(1 for _ in prog.map(name).keys())


def key(sport, dport=80, proto="tcp", src="10.99.0.11", dst="10.99.0.100"):
    return M.flow_key(src, sport, dst, dport, proto)


def frames(pkt, count, first_sport=1024):
    """`count` copies of an IPv4 TCP frame, each with a source address and port never
    used before (patched bytes: the program does not check checksums)."""
    b = bytearray(raw(pkt))
    out = []
    for i in range(count):
        b[26:30] = struct.pack("!I", 0x0A630000 + 0x100 + (i >> 14))  # 10.99.x.y
        b[34:36] = struct.pack("!H", first_sport + (i & 0x3FFF))
        out.append(bytes(b))
    return out


@pytest.fixture
def one_cpu():
    """BPF_PROG_TEST_RUN runs on the caller's CPU: stay on one, so per-CPU state
    (the guard's window) is one CPU's."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    yield
    os.sched_setaffinity(0, before)


@pytest.mark.parametrize("mk", [v4, v6])
def test_syn_waits_in_embryos_and_its_ack_promotes_it(prog, st, mk):
    vs = add_vip(st, "10.99.0.100" if mk is v4 else "fd99::100")
    syn = mk(sport=40100)
    real = dr_real(run(prog, syn), syn)
    assert entries(prog, "embryos") == 1 and entries(prog, "conns") == 0
    again = mk(sport=40100)  # a retransmitted SYN: picked again, the same real
    assert dr_real(run(prog, again), again) == real
    assert entries(prog, "embryos") == 1 and entries(prog, "conns") == 0
    ack = mk(sport=40100, flags="A")
    assert dr_real(run(prog, ack), ack) == real
    assert entries(prog, "embryos") == 0 and entries(prog, "conns") == 1
    psh = mk(sport=40100, flags="PA")
    assert dr_real(run(prog, psh), psh) == real
    g = st.global_counters()
    assert (g["conn_miss"], g["conn_promoted"], g["conn_hit"]) == (2, 1, 2)
    assert st.vip_counters(vs.key)["new_flows"] == 2


@pytest.mark.parametrize("flags", ["A", "PA", "FA", "R", "SA"])
def test_non_syn_miss_goes_by_the_ring_without_an_entry(prog, st, flags):
    add_vip(st)
    real = {}
    for sport in range(40200, 40260):
        p = v4(sport=sport, flags=flags)
        real[sport] = dr_real(run(prog, p), p)
    assert entries(prog, "embryos") == 0 and entries(prog, "conns") == 0
    assert len(set(real.values())) == 3  # spread by the ring as new flows are
    g = st.global_counters()
    assert g["conn_miss_non_syn"] == 60 and g["conn_miss"] == 0 and g["tx_dr"] == 60
    for sport, mac in real.items():  # the ring gives a SYN of the same tuple the same real
        p = v4(sport=sport)
        assert dr_real(run(prog, p), p) == mac


def test_flow_event_only_once_established(prog, st, flow_events):
    add_vip(st)
    add_vip(st, port=53, proto="udp")
    st.set_config(tun_src4="10.99.0.21", flow_events=True)
    flow_events()
    run(prog, v4(sport=40300))
    run(prog, v4(sport=40300))
    run(prog, v4(sport=40301, flags="A"))  # a stray ACK: no flow, no event
    assert flow_events() == []
    run(prog, v4(sport=40300, flags="A"))  # established
    run(prog, v4(sport=40300, flags="PA"))
    run(prog, v4(sport=40302, dport=53, proto=UDP))  # UDP: its first packet is the flow
    got = flow_events()
    assert [(M.flow_tuple(e.key)[1], e.key.proto) for e in got] == [(40300, 6), (40302, 17)]
    assert got[0].real_id == st.conns[key(40300)].real_id


def test_syn_flood_does_not_evict_established_flows(prog, st):
    add_vip(st)
    held = {}
    for sport in range(40400, 40450):
        for flags in (None, "A"):
            p = v4(sport=sport, flags=flags)
            held[sport] = dr_real(run(prog, p), p)
    assert entries(prog, "conns") == 50
    size = loader.BuildOptions(conn_table_size=65536).embryos()
    flood = frames(v4(), 3 * size)  # three times the embryo table, all fresh tuples
    for f in flood:
        assert testrun.test_run(prog.fd, f).verdict == "TX"
    assert entries(prog, "conns") == 50  # not one established flow evicted
    assert entries(prog, "embryos") <= size
    for sport, mac in held.items():
        p = v4(sport=sport, flags="A")
        assert dr_real(run(prog, p), p) == mac
    g = st.global_counters()
    # hits: each held flow's promoting ACK (an embryo hit) and its ACK after the flood
    assert g["conn_miss"] == 50 + len(flood) and g["conn_hit"] == 100 and g["conn_promoted"] == 50


def test_guard_bounds_admissions_per_cpu_second(prog, st, one_cpu, flow_events):
    add_vip(st)
    add_vip(st, port=53, proto="udp")
    loader.set_flow_guard(prog.map("flow_guard_cfg"), 5)
    st.set_config(tun_src4="10.99.0.21", flow_events=True)
    flow_events()
    real = {}
    for sport in range(40500, 40520):
        p = v4(sport=sport)
        real[sport] = dr_real(run(prog, p), p)  # SYNs: embryos are not admissions
    for sport in range(40500, 40520):
        p = v4(sport=sport, flags="A")
        assert dr_real(run(prog, p), p) == real[sport]  # refused or not, same real
    for sport in range(40600, 40610):
        p = v4(sport=sport, dport=53, proto=UDP)
        dr_real(run(prog, p), p)
    got = flow_events()
    g = st.global_counters()
    assert entries(prog, "conns") == 5 and g["conn_promoted"] == 5 and len(got) == 5
    assert g["conn_guard_limited"] == 15 + 10
    assert entries(prog, "embryos") == 15  # refused ones wait for a later window
    g0 = g["conn_promoted"]
    prog.map("flow_guard")[ctypes.c_int(0)] = prog.map("flow_guard").Leaf()  # next window
    p = v4(sport=40519, flags="A")
    dr_real(run(prog, p), p)
    assert st.global_counters()["conn_promoted"] == g0 + 1


@pytest.mark.parametrize("pkt", [
    v4(dport=8080),                     # the VIP's address, another port
    v4(proto=UDP),                      # the VIP's address and port, another protocol
    v4(dport=22, flags="A"),
    v6(dport=9100, dst="fd99::100"),    # e.g. a metrics port listening on 0.0.0.0 / ::
    v6(proto=UDP, dport=8400, dst="fd99::100"),
])
def test_vip_address_answers_only_its_services(prog, st, pkt):
    add_vip(st)
    add_vip(st, "fd99::100")
    res = run(prog, pkt)
    assert res.verdict == "DROP"
    g = st.global_counters()
    assert g["drop_no_service"] == 1 and g["pass_non_vip"] == 0
    assert entries(prog, "embryos") == 0 and entries(prog, "conns") == 0


@pytest.mark.parametrize("pkt", [
    eth() / IP(src="10.99.0.11", dst="10.99.0.100") / ICMP(),  # ping the VIP: the LB answers
    eth() / IPv6(src="fd99::11", dst="fd99::100") / UDP(sport=1, dport=2) / b"x",  # no VIP here
    v4(dst="10.99.0.200", dport=8080),  # another address altogether
])
def test_what_is_no_vip_service_traffic_still_passes(prog, st, pkt):
    add_vip(st)
    res = run(prog, pkt)
    assert res.verdict == "PASS" and res.data == raw(pkt)
    assert st.global_counters()["drop_no_service"] == 0


def test_port_zero_vip_still_serves_every_port_and_protocol_it_names(prog, st):
    add_vip(st, port=0)
    for dport in (1, 22, 80, 9100, 65535):
        p = v4(dport=dport)
        dr_real(run(prog, p), p)
    res = run(prog, v4(dport=80, proto=UDP))  # port 0 of TCP is not UDP
    assert res.verdict == "DROP"
    g = st.global_counters()
    assert g["tx_dr"] == 5 and g["drop_no_service"] == 1


def test_stat_reasons_come_from_maps_h():
    text = (loader.BPF_DIR / "maps.h").read_text()
    body = text[text.index("enum stat_reason {"):text.index("ST_MAX,")]
    names = [line.split(",")[0].split("=")[0].strip()
             for line in body.splitlines() if line.strip().startswith("ST_")]
    assert [f"ST_{r.name}" for r in M.StatReason] == names
    assert [r.value for r in M.StatReason] == list(range(len(names))) and M.ST_MAX == len(names)


def flow_hash4(sport, src="10.99.0.11", dst="10.99.0.100", dport=80, proto=6):
    """flow_hash() of balancer.c for an IPv4 flow (words read in host order, as the
    program reads them)."""
    s0, d0 = (struct.unpack("=I", socket.inet_aton(a))[0] for a in (src, dst))
    sp, dp = (struct.unpack("=H", struct.pack("!H", p))[0] for p in (sport, dport))
    h = M._mix32(M._mix32(0x9e3779b9 ^ s0) ^ d0)
    return M._mix32(h ^ ((sp << 16) | dp) ^ (proto << 24))


def test_embryo_pairs_keep_a_handshake_until_two_younger_ones_share_its_pair(prog, st):
    add_vip(st)
    emb = prog.map("embryos")
    pairs = emb.max_entries // 2
    a = 41000
    pair = flow_hash4(a) % pairs * 2
    b, c = [s for s in range(41001, 65536) if flow_hash4(s) % pairs * 2 == pair][:2]
    real = {}
    for sport in (a, b):
        p = v4(sport=sport)
        real[sport] = dr_real(run(prog, p), p)
        time.sleep(0.01)  # (the coarse clock orders them)
    assert {M.flow_tuple(emb[ctypes.c_uint32(pair + i)].key)[1] for i in (0, 1)} == {a, b}
    p = v4(sport=c)  # a third handshake in the pair: the oldest (a) gives way
    dr_real(run(prog, p), p)
    for sport, counts in ((b, (1, 0)), (a, (1, 1))):  # (promoted, non-SYN misses) after
        p = v4(sport=sport, flags="A")
        assert dr_real(run(prog, p), p) == real[sport]  # promoted or not: the same real
        g = st.global_counters()
        assert (g["conn_promoted"], g["conn_miss_non_syn"]) == counts
    assert entries(prog, "conns") == 1 and st.conns[key(b)].real_id


def test_torn_embryo_reads_as_empty(prog, st):
    add_vip(st)
    emb = prog.map("embryos")
    p = v4(sport=41500)
    real = dr_real(run(prog, p), p)
    slot = next(k for k, v in emb.items_lookup_batch() if v.key.family)
    torn = emb[slot]
    torn.val.real_id ^= 1  # as if another CPU's write had half landed
    emb[slot] = torn
    p = v4(sport=41500, flags="A")
    assert dr_real(run(prog, p), p) == real  # the ring's choice, no entry
    g = st.global_counters()
    assert g["conn_miss_non_syn"] == 1 and g["conn_promoted"] == 0
    assert entries(prog, "conns") == 0


def test_guard_settings_out_of_range_are_refused_by_name(prog):
    with pytest.raises(ValueError, match="max_per_s: -1 is out of range"):
        loader.set_flow_guard(prog.map("flow_guard_cfg"), -1)
    with pytest.raises(ValueError, match="max_per_s: 4294967296 is out of range"):
        loader.set_flow_guard(prog.map("flow_guard_cfg"), 1 << 32)
    with pytest.raises(loader.DataplaneError, match="flow_guard_rate: 0 is out of range"):
        loader.BuildOptions(flow_guard_rate=0).cflags()
    with pytest.raises(loader.DataplaneError, match="cannot open pinned map /nonexistent"):
        loader.set_flow_guard("/nonexistent/flow_guard_cfg", 5)
