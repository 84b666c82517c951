"""One counter record per packet (the real's): per-VIP sums and the global conn_hit /
tx_dr / tx_tun are derived in user space, and survive a real's id being freed."""

from scapy.all import IP, TCP, UDP, Ether, Raw, raw

from l4lb.dataplane import testrun

LB_MAC, CLIENT_MAC = "02:99:00:00:14:15", "02:99:00:00:0a:0b"
REALS = [("10.99.0.31", "02:99:00:00:1e:1f"), ("10.99.0.32", "02:99:00:00:1e:20")]


def udp(sport, dport=53, dst="10.99.0.100", payload=b"q"):
    return raw(Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src="10.99.0.11", dst=dst)
               / UDP(sport=sport, dport=dport) / Raw(payload))


def test_vip_and_global_counts_survive_a_freed_real(prog, st):
    vs = st.upsert_vip("10.99.0.100", 53, "udp", mode="dr")
    st.set_reals(vs.key, [(a, m, 100) for a, m in REALS])
    frames = [udp(41000 + i) for i in range(40)]
    for f in frames * 2:  # 40 new flows, then 40 hits
        assert testrun.test_run(prog.fd, f).verdict == "TX"
    per_real = {a: st.real_counters(vs.key, a) for a, _ in REALS}
    assert sum(c["packets"] for c in per_real.values()) == 80
    assert all(c["packets"] > 0 for c in per_real.values())  # both reals took flows
    vip_before = st.vip_counters(vs.key)
    assert vip_before == {"packets": 80, "bytes": 80 * len(frames[0]), "new_flows": 40}
    g = st.global_counters()
    assert (g["conn_hit"], g["conn_miss"], g["tx_dr"], g["tx_tun"]) == (40, 40, 80, 0)

    # The second real is deleted, then freed once no conn entry names it: what it
    # counted stays in its VIP's and the global figures.
    st.set_reals(vs.key, [(a, m, 100) for a, m in REALS[:1]])
    st.conns.clear()
    assert st.collect_retired() == 1
    assert st.vip_counters(vs.key) == vip_before
    g = st.global_counters()
    assert (g["conn_hit"], g["tx_dr"]) == (40, 80)

    # Its id, reused by a new real of another VIP, starts from zero and counts for that
    # VIP only.
    other = st.upsert_vip("10.99.0.101", 53, "udp", mode="tun")
    st.set_reals(other.key, [("10.99.0.40", "02:99:00:00:1e:28", 100)])
    assert st.real_counters(other.key, "10.99.0.40") == {"packets": 0, "bytes": 0,
                                                          "new_flows": 0}
    assert testrun.test_run(prog.fd, udp(42000, dst="10.99.0.101")).verdict == "TX"
    assert st.vip_counters(vs.key) == vip_before
    assert st.vip_counters(other.key)["packets"] == 1
    g = st.global_counters()
    assert (g["conn_hit"], g["tx_dr"], g["tx_tun"]) == (40, 80, 1)

    # reset_global_counters zeroes what global_counters shows, not the per-real figures.
    st.reset_global_counters()
    assert {k: v for k, v in st.global_counters().items() if v} == {}
    assert st.vip_counters(vs.key) == vip_before
    # and a VIP deleted with its reals gives them back (the fold reaches a freed VIP id).
    st.delete_vip(other.key)
    assert {k: v for k, v in st.global_counters().items() if v} == {}


def test_tcp_hit_counts_one_record(prog, st):
    vs = st.upsert_vip("10.99.0.100", 80, "tcp", mode="dr")
    st.set_reals(vs.key, [(REALS[0][0], REALS[0][1], 100)])
    syn = raw(Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src="10.99.0.11", dst="10.99.0.100")
              / TCP(sport=40000, dport=80, flags="S"))
    ack = raw(Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src="10.99.0.11", dst="10.99.0.100")
              / TCP(sport=40000, dport=80, flags="A"))
    for f in (syn, ack, ack, ack):
        assert testrun.test_run(prog.fd, f).verdict == "TX"
    g = st.global_counters()
    # SYN: a new flow (embryo); the first ACK finds its embryo (a hit) and is promoted;
    # then two hits in conns. As before the one-record change.
    assert (g["conn_miss"], g["conn_promoted"], g["conn_hit"], g["tx_dr"]) == (1, 1, 3, 4)
    assert st.real_counters(vs.key, REALS[0][0]) == {
        "packets": 4, "bytes": len(syn) + 3 * len(ack), "new_flows": 1}
