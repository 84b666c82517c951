"""The XDP balancer on crafted packets (BPF_PROG_TEST_RUN), decoded with scapy."""

import ipaddress
import time

import pytest
from scapy.all import ICMP, IP, TCP, UDP, Dot1Q, Ether, ICMPv6PacketTooBig, IPv6, Raw, raw

from l4lb.dataplane import loader, testrun

LB_MAC = "02:99:00:00:14:15"
CLIENT_MAC = "02:99:00:00:0a:0b"
REALS4 = [("10.99.0.31", "02:99:00:00:1e:1f"), ("10.99.0.32", "02:99:00:00:1e:20"),
          ("10.99.0.33", "02:99:00:00:1e:21")]
REALS6 = [("fd99::31", "02:99:00:00:1e:1f"), ("fd99::32", "02:99:00:00:1e:20"),
          ("fd99::33", "02:99:00:00:1e:21")]
MAC_OF = {a: m for a, m in REALS4 + REALS6}
REAL_OF_MAC = {m: a.split(".")[-1] if "." in a else a for a, m in REALS4}


def run(prog, pkt):
    return testrun.test_run(prog.fd, raw(pkt))


def eth(vlan=None):
    e = Ether(src=CLIENT_MAC, dst=LB_MAC)
    return e / Dot1Q(vlan=vlan) if vlan else e


def l4(proto, sport, dport, flags):
    # scapy's TCP() is a SYN unless told otherwise
    return proto(sport=sport, dport=dport, flags=flags) if proto is TCP and flags else \
        proto(sport=sport, dport=dport)


def v4(sport=40000, dport=80, proto=TCP, src="10.99.0.11", dst="10.99.0.100", vlan=None,
       payload=b"hello", flags=None):
    return eth(vlan) / IP(src=src, dst=dst) / l4(proto, sport, dport, flags) / Raw(payload)


def v6(sport=40000, dport=80, proto=TCP, src="fd99::11", dst="fd99::100", vlan=None,
       payload=b"hello", flags=None):
    return eth(vlan) / IPv6(src=src, dst=dst) / l4(proto, sport, dport, flags) / Raw(payload)


def dr_real(res, sent):
    """Check a DR rewrite: only the MACs changed; return the chosen real's MAC."""
    assert res.verdict == "TX"
    out = Ether(res.data)
    assert out.src == LB_MAC  # never the client's MAC: the bridge must not learn it
    assert raw(out)[12:] == raw(sent)[12:]  # everything past the MACs untouched
    return out.dst


def tun_real(res, sent, outer=IP):
    assert res.verdict == "TX"
    out = Ether(res.data)
    assert out.src == LB_MAC
    o = out[outer]
    inner_bytes = raw(sent)[14 + (4 if sent.haslayer(Dot1Q) else 0):]
    if outer is IP:
        assert o.proto == (4 if sent.haslayer(IP) else 41)
        assert o.len == 20 + len(inner_bytes) and o.ttl == 64
        hdr = raw(o)[:20]  # RFC 1071: a right header checksum makes the header sum 0xffff
        s = sum(int.from_bytes(hdr[i:i + 2], "big") for i in range(0, 20, 2))
        assert (s & 0xFFFF) + (s >> 16) == 0xFFFF and o.chksum != 0
        again = IP(bytes(raw(o)))
        del again.chksum
        assert IP(raw(again)).chksum == o.chksum  # outer header checksum is right
        assert raw(o.payload) == inner_bytes
        return str(o.dst)
    assert o.nh == (4 if sent.haslayer(IP) else 41)
    assert o.plen == len(inner_bytes) and o.hlim == 64
    assert raw(o.payload) == inner_bytes
    return str(o.dst)


def add_vip(st, addr="10.99.0.100", port=80, proto="tcp", mode="dr", hash="5tuple",
            reals=None, ring_size=65537):
    vs = st.upsert_vip(addr, port, proto, mode=mode, hash=hash, ring_size=ring_size)
    fam = ipaddress.ip_address(addr).version
    reals = reals if reals is not None else (REALS4 if fam == 4 else REALS6)
    st.set_reals(vs.key, [(a, m, 100) for a, m in reals])
    return vs


@pytest.mark.parametrize("proto, pname", [(TCP, "tcp"), (UDP, "udp")])
@pytest.mark.parametrize("family", [4, 6])
def test_dr_spreads_flows_and_sticks(prog, st, proto, pname, family):
    vip = "10.99.0.100" if family == 4 else "fd99::100"
    add_vip(st, vip, 80, pname)
    mk = v4 if family == 4 else v6
    chosen = {}
    for sport in range(41000, 41060):
        pkt = mk(sport=sport, proto=proto, dst=vip)
        chosen[sport] = dr_real(run(prog, pkt), pkt)
    assert set(chosen.values()) == {m for _, m in REALS4}  # all three reals used
    for sport, mac in chosen.items():  # the same flow, the same real
        pkt = mk(sport=sport, proto=proto, dst=vip, flags="A")
        assert dr_real(run(prog, pkt), pkt) == mac
    g = st.global_counters()
    assert g["conn_miss"] == 60 and g["conn_hit"] == 60 and g["tx_dr"] == 120


@pytest.mark.parametrize("family, real_family", [(4, 4), (6, 6), (4, 6), (6, 4)])
def test_tunnel_encapsulation(prog, st, family, real_family):
    vip = "10.99.0.100" if family == 4 else "fd99::100"
    reals = REALS4 if real_family == 4 else REALS6
    add_vip(st, vip, 443, "tcp", mode="tun", reals=reals)
    mk = v4 if family == 4 else v6
    outer = IP if real_family == 4 else IPv6
    seen = set()
    for sport in range(42000, 42030):
        pkt = mk(sport=sport, dport=443, dst=vip)
        res = run(prog, pkt)
        dst = tun_real(res, pkt, outer)
        assert Ether(res.data).dst == MAC_OF[dst]
        src = Ether(res.data)[outer].src
        assert src == ("10.99.0.21" if real_family == 4 else "fd99::21")
        seen.add(dst)
    assert seen == {a for a, _ in reals}
    assert st.global_counters()["tx_tun"] == 30


def test_vlan_tag_kept(prog, st):
    add_vip(st)
    pkt = v4(vlan=42)
    res = run(prog, pkt)
    assert res.verdict == "TX"
    out = Ether(res.data)
    assert out[Dot1Q].vlan == 42 and out.src == LB_MAC
    assert raw(out)[12:] == raw(pkt)[12:]
    # tunnel mode under a VLAN tag: the tag stays in front of the outer header
    add_vip(st, port=8443, mode="tun")
    pkt = v4(dport=8443, vlan=7)
    out = Ether(run(prog, pkt).data)
    assert out[Dot1Q].vlan == 7 and out[Dot1Q].type == 0x0800
    assert out[IP].proto == 4 and raw(out[IP].payload) == raw(pkt[IP])


@pytest.mark.parametrize("pkt", [
    v4(dst="10.99.0.200"),                  # another address
    v6(dst="fd99::200"),
    Ether(src=CLIENT_MAC, dst="ff:ff:ff:ff:ff:ff", type=0x0806) / Raw(b"\x00" * 28),  # ARP
    eth() / IP(src="10.99.0.11", dst="10.99.0.100") / ICMP(),  # ping the VIP: the LB answers
])
def test_not_for_a_vip_passes_untouched(prog, st, pkt):
    add_vip(st)
    res = run(prog, pkt)
    assert res.verdict == "PASS"
    assert res.data == raw(pkt)


def test_port_zero_vip_serves_every_port(prog, st):
    add_vip(st, port=0)
    for dport in (22, 80, 65535):
        pkt = v4(dport=dport)
        dr_real(run(prog, pkt), pkt)
    # a port-specific VIP on the same address wins over the port-0 one
    add_vip(st, port=25, reals=REALS4[:1])
    for sport in range(100):
        pkt = v4(sport=30000 + sport, dport=25)
        assert dr_real(run(prog, pkt), pkt) == REALS4[0][1]


def test_source_hash_keeps_a_client_on_one_real(prog, st):
    add_vip(st, hash="source")
    for client in range(1, 30):
        src = f"10.99.1.{client}"
        macs = {dr_real(run(prog, p), p) for p in (v4(src=src, sport=s) for s in range(5000, 5020))}
        assert len(macs) == 1  # control and data connections meet on one real
    # ...while clients still spread over the reals
    macs = {dr_real(run(prog, p), p) for p in (v4(src=f"10.99.2.{c}") for c in range(1, 60))}
    assert len(macs) == 3


def test_conn_table_hit_survives_ring_change_and_drain(prog, st):
    vs = add_vip(st)
    first = {}
    for sport in range(43000, 43100):
        p = v4(sport=sport)
        first[sport] = dr_real(run(prog, p), p)
        p = v4(sport=sport, flags="A")  # established
        assert dr_real(run(prog, p), p) == first[sport]
    # add a fourth real: the ring changes, existing flows stay put
    st.set_reals(vs.key, [(a, m, 100) for a, m in REALS4] + [("10.99.0.34",
                                                                "02:99:00:00:1e:22", 100)])
    for sport, mac in first.items():
        p = v4(sport=sport, flags="PA")
        assert dr_real(run(prog, p), p) == mac
    # drain real1 (weight 0): its flows continue, it gets no new ones
    st.set_weight(vs.key, "10.99.0.31", 0)
    for sport, mac in first.items():
        p = v4(sport=sport, flags="PA")
        assert dr_real(run(prog, p), p) == mac
    new = {dr_real(run(prog, p), p) for p in (v4(sport=s) for s in range(44000, 44200))}
    assert REALS4[0][1] not in new and len(new) == 3


def test_down_real_flows_are_rescheduled(prog, st):
    vs = add_vip(st)
    flows = {}
    for sport in range(45000, 45100):
        p = v4(sport=sport)
        flows[sport] = dr_real(run(prog, p), p)
        run(prog, v4(sport=sport, flags="A"))  # established
    st.set_down(vs.key, "10.99.0.32", True)
    for sport, mac in flows.items():
        p = v4(sport=sport, flags="A")
        now = dr_real(run(prog, p), p)
        assert now != REALS4[1][1]
        if mac != REALS4[1][1]:
            assert now == mac  # flows of healthy reals do not move
    assert st.global_counters()["conn_rescheduled"] == sum(
        1 for m in flows.values() if m == REALS4[1][1])


def test_all_reals_drained_drops_new_flows(prog, st):
    vs = add_vip(st)
    for a, _ in REALS4:
        st.set_weight(vs.key, a, 0)
    res = run(prog, v4())
    assert res.verdict == "DROP"
    assert st.global_counters()["drop_no_real"] == 1


def test_all_reals_down_keeps_last_ring(prog, st):
    vs = add_vip(st)
    for a, _ in REALS4:
        st.set_down(vs.key, a, True)
    p = v4()
    # all_down = "keep": still served from the last ring
    assert dr_real(run(prog, p), p) in {m for _, m in REALS4}


def test_icmp_frag_needed_follows_its_flow(prog, st):
    add_vip(st, mode="tun")
    p = v4(sport=46000)
    real = tun_real(run(prog, p), p)
    # a router on the client's path reports that the VIP's reply was too big
    inner = IP(src="10.99.0.100", dst="10.99.0.11") / TCP(sport=80, dport=46000)
    icmp = eth() / IP(src="10.99.0.1", dst="10.99.0.100") / ICMP(type=3, code=4, nexthopmtu=1400) \
        / raw(inner)[:28]
    res = run(prog, icmp)
    assert res.verdict == "TX"
    assert str(Ether(res.data)[IP].dst) == real
    assert raw(Ether(res.data)[IP].payload) == raw(icmp[IP])
    assert st.global_counters()["icmp_forwarded"] == 1


def test_icmpv6_packet_too_big_follows_its_flow(prog, st):
    add_vip(st, "fd99::100", 80, "tcp")
    p = v6(sport=46001)
    mac = dr_real(run(prog, p), p)
    inner = IPv6(src="fd99::100", dst="fd99::11") / TCP(sport=80, dport=46001)
    icmp = eth() / IPv6(src="fd99::1", dst="fd99::100") / ICMPv6PacketTooBig(mtu=1280) / raw(inner)
    assert dr_real(run(prog, icmp), icmp) == mac


@pytest.mark.parametrize("make, verdict, reason", [
    (lambda: eth() / IP(src="10.99.0.11", dst="10.99.0.100", flags="MF") / TCP(dport=80),
     "DROP", "drop_fragment"),
    (lambda: eth() / IP(src="10.99.0.11", dst="10.99.0.100", frag=10, proto=6) / Raw(b"x" * 20),
     "DROP", "drop_fragment"),
    (lambda: eth() / IP(src="10.99.0.11", dst="10.99.0.100", options=b"\x01\x01\x01\x00")
     / TCP(dport=80), "DROP", "drop_ip_options"),
    (lambda: eth() / IPv6(src="fd99::11", dst="fd99::100", nh=44) / Raw(b"\x06" + b"\x00" * 7),
     "DROP", "drop_ipv6_ext"),
    # truncated transport header for a VIP address
    (lambda: eth() / IP(src="10.99.0.11", dst="10.99.0.100", proto=6) / Raw(b"x" * 10),
     "DROP", "drop_malformed_l4"),
    (lambda: eth() / IPv6(src="fd99::11", dst="fd99::100", nh=17) / Raw(b"x" * 6),
     "DROP", "drop_malformed_l4"),
    # truncated IP header / lying lengths: the kernel's business, untouched
    (lambda: Ether(raw(v4())[:14 + 12]), "PASS", "pass_malformed_l3"),
    (lambda: eth() / IP(src="10.99.0.11", dst="10.99.0.100", len=2000) / TCP(dport=80),
     "PASS", "pass_malformed_l3"),
    (lambda: eth() / IP(src="10.99.0.11", dst="10.99.0.100", ihl=3) / TCP(dport=80),
     "PASS", "pass_malformed_l3"),
    (lambda: Ether(src=CLIENT_MAC, dst=LB_MAC, type=0x88cc), "PASS", "pass_non_ip"),
    (lambda: Ether(src=CLIENT_MAC, dst=LB_MAC, type=0x8100) / Raw(b"\x00"), "PASS",
     "pass_non_ip"),
])
def test_bad_packets_get_a_defined_verdict(prog, st, make, verdict, reason):
    add_vip(st)
    add_vip(st, "fd99::100")
    pkt = make()
    data = pkt if isinstance(pkt, bytes) else raw(pkt)
    res = testrun.test_run(prog.fd, data)
    assert res.verdict == verdict
    if verdict == "PASS":
        assert res.data == data  # never a rewrite
    counts = st.global_counters()
    assert counts[reason] == 1
    assert {k: v for k, v in counts.items() if v and k != reason} == {}  # nothing else counted


def test_counters_per_vip_and_real(prog, st):
    vs = add_vip(st, reals=REALS4[:1])
    sizes = []
    for i in range(10):
        p = v4(sport=47000 + (i % 2), payload=b"x" * (10 + i), flags=None if i < 2 else "A")
        sizes.append(len(raw(p)))
        run(prog, p)
    assert st.vip_counters(vs.key) == {"packets": 10, "bytes": sum(sizes), "new_flows": 2}
    assert st.real_counters(vs.key, "10.99.0.31") == {"packets": 10, "bytes": sum(sizes),
                                                      "new_flows": 2}


def test_flow_events_for_sync(prog, st, flow_events):
    add_vip(st)
    st.set_config(tun_src4="10.99.0.21", flow_events=True)
    flow_events()
    for sport in range(48000, 48005):
        run(prog, v4(sport=sport))  # SYN: not established yet, nothing to sync
    run(prog, v4(sport=48000))  # a retransmitted SYN: no event either
    assert flow_events() == []
    for sport in range(48000, 48005):
        run(prog, v4(sport=sport, flags="A"))  # the handshake's ACK: established, synced
    run(prog, v4(sport=48000, flags="A"))  # a hit: no event
    from l4lb.dataplane import maps as M
    evs = flow_events()
    assert sorted(M.flow_tuple(e.key)[1] for e in evs) == list(range(48000, 48005))
    st.set_config(tun_src4="10.99.0.21", flow_events=False)


def test_deleted_real_keeps_its_open_flows_until_collected(prog, st):
    vs = add_vip(st)
    flows = {}
    for sport in range(49000, 49060):
        p = v4(sport=sport)
        flows[sport] = dr_real(run(prog, p), p)
        p = v4(sport=sport, flags="A")  # established: in conns
        assert dr_real(run(prog, p), p) == flows[sport]
    st.set_reals(vs.key, [(a, m, 100) for a, m in REALS4[:2]])  # real3 deleted
    for sport, mac in flows.items():  # open flows, real3's included, carry on
        p = v4(sport=sport, flags="A")
        assert dr_real(run(prog, p), p) == mac
    new = {dr_real(run(prog, p), p) for p in (v4(sport=s) for s in range(50000, 50100))}
    assert REALS4[2][1] not in new
    loader.clear_embryos(prog.map("embryos"))  # (the new flows' SYNs above)
    assert st.collect_retired() == 0  # still named by conn entries
    st.conns.clear()
    assert st.collect_retired() == 1
    assert not st.vips[vs.key].retired


def test_retired_real_named_only_by_a_waiting_syn_is_kept(prog, st):
    """A SYN waits in embryos with its real's id: that id is not freed (and reused by
    another real) before the handshake's ACK has followed the SYN."""
    vs = add_vip(st)
    syns = {}
    for sport in range(51000, 51060):
        p = v4(sport=sport)
        syns[sport] = dr_real(run(prog, p), p)
    waiting = [s for s, mac in syns.items() if mac == REALS4[2][1]]
    assert waiting
    st.set_reals(vs.key, [(a, m, 100) for a, m in REALS4[:2]])  # real3 deleted
    assert not st.conns.items()  # nothing established: only embryos name real3
    assert st.collect_retired() == 0
    p = v4(sport=waiting[0], flags="A")  # its ACK: still real3's
    assert dr_real(run(prog, p), p) == REALS4[2][1]
    st.conns.clear()
    loader.clear_embryos(prog.map("embryos"))
    assert st.collect_retired() == 1


def test_vip_frame_for_another_mac_is_left_alone(prog, st):
    # A switch floods a frame for the master's MAC to the backup too: the backup
    # must not forward it (its rewrite would teach the switch the wrong port).
    add_vip(st)
    st.set_own_macs({1: "02:99:00:00:14:16"})  # BPF_PROG_TEST_RUN: ingress is lo (1)
    try:
        pkt = v4()
        res = run(prog, pkt)
        assert res.verdict == "PASS" and res.data == raw(pkt)
        assert st.global_counters()["pass_not_ours"] == 1
        st.set_own_macs({1: LB_MAC})
        dr_real(run(prog, pkt), pkt)
    finally:
        st.set_own_macs({})


def test_udp_flows_idle_out_tcp_flows_do_not(prog, st):
    add_vip(st, port=53, proto="udp")
    add_vip(st, port=80, proto="tcp")
    st.set_config(tun_src4="10.99.0.21", conn_timeout_s=1e-9)  # every UDP hit is idle
    try:
        for first, then in ((v4(dport=53, proto=UDP), v4(dport=53, proto=UDP)),
                            (v4(dport=80), v4(dport=80, flags="A"))):
            run(prog, first)
            time.sleep(0.05)  # the coarse clock ticks every few ms
            run(prog, then)
        g = st.global_counters()
        assert g["conn_rescheduled"] == 1  # the UDP flow, not the TCP one
        assert g["conn_hit"] == 1
    finally:
        st.set_config(tun_src4="10.99.0.21", tun_src6="fd99::21")


def test_vip_prefilter_agrees_with_the_program(prog, st):
    import ctypes

    from l4lb.dataplane import maps as M
    add_vip(st)
    filt = prog.map("vip_filter")
    idx = ctypes.c_uint32(M.vip_filter_index("10.99.0.100"))
    assert filt[idx].value == 1
    filt[idx] = ctypes.c_uint32(0)  # hide the address: the program must pass it
    try:
        pkt = v4()
        res = run(prog, pkt)
        assert res.verdict == "PASS" and res.data == raw(pkt)
    finally:
        filt[idx] = ctypes.c_uint32(1)
    pkt = v4()
    dr_real(run(prog, pkt), pkt)


def test_flows_of_a_deleted_vip_do_not_follow_its_reused_id(prog, st):
    vs = add_vip(st, port=80)
    p = v4(sport=51000)
    dr_real(run(prog, p), p)
    old_id = vs.vip_id
    st.delete_vip(vs.key)
    res = run(prog, p)  # the VIP is gone: the flow's conn entry must not be used
    assert res.verdict == "PASS" and res.data == raw(p)
    # another VIP takes the old id (as id reuse would): the old flow must not follow it
    other = add_vip(st, port=8080, reals=REALS4[:1])
    import ctypes
    by_id = prog.map("vip_by_id")
    by_id[ctypes.c_uint32(old_id)] = by_id[ctypes.c_uint32(other.vip_id)]
    res = run(prog, p)  # the address is a VIP again, but port 80 is no service of it
    assert res.verdict == "DROP"
    assert st.global_counters()["drop_no_service"] == 1
