"""bpf/hc_tunnel.c through BPF_PROG_TEST_RUN: a marked probe packet leaves addressed
to the VIP inside an outer header to the real (checksums valid), the real's reply
from the VIP comes back with the real's address; unmarked traffic is untouched."""

import ctypes
import struct

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from l4lb.dataplane import loader
from l4lb.dataplane import maps as M
from l4lb.dataplane.testrun import test_run as run

NODE4, REAL4, VIP4 = "10.99.0.21", "10.99.0.31", "10.99.0.100"
NODE6, REAL6, VIP6 = "fd99::21", "fd99::31", "fd99::100"
TC_ACT_OK, TC_ACT_SHOT = 0, 2


@pytest.fixture(scope="module")
def hc():
    h = loader.HcTunnel()
    yield h
    h.bpf.cleanup()


def ctx(mark: int) -> bytes:
    return struct.pack("=III", 0, 0, mark)  # struct __sk_buff: len, pkt_type, mark


def syn(src, dst, v6=False):
    ip = IPv6(src=src, dst=dst) if v6 else IP(src=src, dst=dst)
    return Ether(src="02:00:00:00:00:21", dst="02:00:00:00:00:31") / ip / \
        TCP(sport=40001, dport=9001, flags="S", seq=1)


def test_map_layout_matches_the_mirror(hc):
    leaf = hc.tunnels.Leaf
    assert ctypes.sizeof(leaf) == ctypes.sizeof(M.HcTunnelDef)
    assert [f[0] for f in leaf._fields_] == [f[0] for f in M.HcTunnelDef._fields_]


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_a_marked_probe_is_encapsulated_and_its_reply_renamed(hc, v6):
    node, real, vip = (NODE6, REAL6, VIP6) if v6 else (NODE4, REAL4, VIP4)
    mark = M.hc_mark(7)
    hc.tunnels[hc.tunnels.Key(mark)] = M.hc_tunnel_def(vip)
    eg, ing = hc.fns["egress"].fd, hc.fns["ingress"].fd

    out = run(eg, bytes(syn(node, real, v6)), ctx=ctx(mark))
    assert out.retval == TC_ACT_OK
    p = Ether(out.data)
    Outer, Inner = (IPv6, IPv6) if v6 else (IP, IP)
    outer = p[Outer]
    inner = outer.payload
    assert (outer.src, outer.dst) == (node, real)
    assert (outer.nh if v6 else outer.proto) == (41 if v6 else 4)
    assert isinstance(inner, Inner) and (inner.src, inner.dst) == (node, vip)
    assert inner[TCP].dport == 9001 and inner[TCP].flags == "S"
    # checksums: what scapy computes for the same headers
    want_tcp = Inner(bytes(inner))
    del want_tcp[TCP].chksum
    assert inner[TCP].chksum == Inner(bytes(want_tcp))[TCP].chksum
    if not v6:
        for hdr in (outer, inner):
            h = IP(bytes(hdr))
            c = h.chksum
            del h.chksum
            assert IP(bytes(h)).chksum == c

    # The real's reply, from the VIP to us (DSR): renamed to come from the real.
    ip = IPv6(src=vip, dst=node) if v6 else IP(src=vip, dst=node)
    reply = Ether() / ip / TCP(sport=9001, dport=40001, flags="SA", ack=2)
    back = run(ing, bytes(reply))
    assert back.retval == TC_ACT_OK
    q = Ether(back.data)
    L = IPv6 if v6 else IP
    assert (q[L].src, q[L].dst) == (real, node)
    t = L(bytes(q[L]))
    c = t[TCP].chksum
    del t[TCP].chksum
    assert L(bytes(t))[TCP].chksum == c
    # Other traffic from the VIP (another port) is left alone.
    other = Ether() / (IPv6(src=vip, dst=node) if v6 else IP(src=vip, dst=node)) / \
        TCP(sport=9002, dport=40001, flags="SA")
    assert Ether(run(ing, bytes(other)).data)[L].src == vip


def test_unmarked_passes_and_an_unknown_mark_is_dropped(hc):
    pkt = bytes(syn(NODE4, REAL4))
    out = run(hc.fns["egress"].fd, pkt, ctx=ctx(0))
    assert out.retval == TC_ACT_OK and out.data == pkt
    out = run(hc.fns["egress"].fd, pkt, ctx=ctx(M.hc_mark(999)))
    assert out.retval == TC_ACT_SHOT  # never sent in the clear to the real
