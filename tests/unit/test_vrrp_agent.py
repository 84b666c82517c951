"""VRRP agent without the network: frames (checked with scapy), the receive path
(TTL / hop limit, decode errors counted, never raised), and the whole asyncio
agent driven with a fake socket, fake netlink and fake AF_PACKET sender."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
import sys
import time

import pytest
from scapy.layers.inet import IP
from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6NDOptDstLLAddr, IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from l4lb.config import TrackInterface, TrackScript, VrrpConfig, parse_config
from l4lb.netutil import LinkInfo
from l4lb.vrrp import agent as agent_mod
from l4lb.vrrp import sockets as sockets_mod
from l4lb.vrrp.agent import VrrpAgent, default_vip_lifetime, machine_config
from l4lb.vrrp.frames import build_garp, build_unsolicited_na, parse_ipv4
from l4lb.vrrp.packet import (
    AUTH_SIMPLE,
    VRRP_MCAST_V4,
    VRRP_MCAST_V6,
    Advert,
    VrrpDecodeError,
    decode,
    encode,
)
from l4lb.vrrp.sockets import VrrpSocket, hop_limit

A4 = ipaddress.IPv4Address
A6 = ipaddress.IPv6Address
MAC = "02:99:00:00:14:15"
ME4, PEER4 = A4("10.99.0.21"), A4("10.99.0.22")
VIP4 = ipaddress.IPv4Interface("10.99.0.100/24")
LL_ME, LL_PEER = A6("fe80::99:ff:fe00:1415"), A6("fe80::99:ff:fe00:1416")
VIP6 = ipaddress.IPv6Interface("fd99::100/64")


# ---- frames ---------------------------------------------------------------------


def test_garp_frame_is_a_gratuitous_arp_request():
    f = build_garp(MAC, VIP4.ip)
    assert len(f) == 60  # padded to the Ethernet minimum
    p = Ether(f)
    assert p.dst == "ff:ff:ff:ff:ff:ff" and p.src == MAC and p.type == 0x0806
    a = p[ARP]
    assert a.op == 1  # request ("who-has"), what Linux and arping -U send
    assert a.hwsrc == MAC and a.psrc == a.pdst == "10.99.0.100"
    assert a.hwdst == "00:00:00:00:00:00"
    assert (a.hwtype, a.ptype, a.hwlen, a.plen) == (1, 0x0800, 6, 4)


def test_unsolicited_na_frame():
    f = build_unsolicited_na(MAC, LL_ME, VIP6.ip)
    p = Ether(f)
    assert p.dst == "33:33:00:00:00:01" and p.src == MAC and p.type == 0x86DD
    ip6 = p[IPv6]
    assert ip6.hlim == 255 and ip6.dst == "ff02::1" and ip6.src == str(LL_ME)
    assert ip6.nh == 58 and ip6.plen == 32
    na = p[ICMPv6ND_NA]
    assert na.type == 136 and na.code == 0
    assert (na.R, na.S, na.O) == (0, 0, 1)
    assert na.tgt == "fd99::100"
    opt = p[ICMPv6NDOptDstLLAddr]  # option type 2: target link-layer address
    assert opt.type == 2 and opt.len == 1 and opt.lladdr == MAC
    # checksum: scapy recomputes it when the field is cleared
    wire = na.cksum
    na2 = IPv6(bytes(ip6))
    del na2[ICMPv6ND_NA].cksum
    assert IPv6(bytes(na2))[ICMPv6ND_NA].cksum == wire


def test_bad_mac_is_refused():
    with pytest.raises(ValueError):
        build_garp("02:99:00:00:14", VIP4.ip)


# ---- receive path: IPv4 header, hop limit ------------------------------------------


def _v3(src, dst, priority=100, vrid=51, addrs=(VIP4.ip,), interval_cs=10):
    return encode(Advert(version=3, vrid=vrid, priority=priority, interval_cs=interval_cs,
                         addresses=list(addrs)), src, dst)


def test_parse_ipv4_gives_ttl_and_payload():
    payload = _v3(PEER4, VRRP_MCAST_V4)
    pkt = bytes(IP(src=str(PEER4), dst=str(VRRP_MCAST_V4), ttl=255, proto=112) / Raw(payload))
    src, dst, ttl, got = parse_ipv4(pkt + b"\0" * 6)  # trailing padding is cut off
    assert (src, dst, ttl, got) == (PEER4, VRRP_MCAST_V4, 255, payload)
    # with IP options (ihl 6)
    pkt = bytes(IP(src=str(PEER4), dst=str(VRRP_MCAST_V4), ttl=64, proto=112,
                   options=b"\x01\x01\x01\x00") / Raw(payload))
    assert parse_ipv4(pkt)[2:] == (64, payload)
    for bad in (b"", b"\x45" + b"\0" * 10, b"\x60" + b"\0" * 39, b"\x4f" + b"\0" * 30):
        with pytest.raises(VrrpDecodeError) as ei:
            parse_ipv4(bad)
        assert ei.value.reason == "truncated"


def test_hop_limit_from_ancillary_data():
    anc = [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, LL_ME.packed + struct.pack("I", 2)),
           (socket.IPPROTO_IPV6, socket.IPV6_HOPLIMIT, struct.pack("@i", 255))]
    assert hop_limit(anc) == 255
    assert hop_limit(anc[:1]) is None
    assert hop_limit([]) is None


class _FakeRaw:
    """Stands for the kernel socket under a VrrpSocket."""

    def __init__(self, items):
        self.items = list(items)
        self.sent = []

    def recv(self, n):
        if not self.items:
            raise BlockingIOError
        return self.items.pop(0)

    def recvmsg(self, n, anc):
        if not self.items:
            raise BlockingIOError
        return self.items.pop(0)

    def sendmsg(self, bufs, anc, flags, addr):
        self.sent.append((b"".join(bufs), anc, addr))

    def close(self):
        pass


def test_vrrp_socket_v4_recv_and_send():
    payload = _v3(PEER4, VRRP_MCAST_V4)
    pkt = bytes(IP(src=str(PEER4), dst=str(VRRP_MCAST_V4), ttl=255, proto=112) / Raw(payload))
    raw = _FakeRaw([pkt, b"\x45\x00"])
    s = VrrpSocket(4, "eth0", 2, ME4, sock=raw)
    assert s.destinations == (VRRP_MCAST_V4,)
    assert s.recv() == (payload, PEER4, VRRP_MCAST_V4, 255)
    with pytest.raises(VrrpDecodeError):
        s.recv()
    assert s.recv() is None
    s.send(b"abc", VRRP_MCAST_V4)
    data, anc, addr = raw.sent[0]
    assert data == b"abc" and addr == ("224.0.0.18", 0)
    (level, typ, info), = anc
    assert (level, typ) == (socket.IPPROTO_IP, sockets_mod.IP_PKTINFO)
    ifindex, spec_dst, _ = struct.unpack("I4s4s", info)
    assert ifindex == 2 and A4(spec_dst) == ME4  # sent from the primary address
    # unicast: the peers are the destinations
    assert VrrpSocket(4, "eth0", 2, ME4, (PEER4,), sock=raw).destinations == (PEER4,)


def test_vrrp_socket_v6_recv_and_send():
    payload = _v3(LL_PEER, VRRP_MCAST_V6, addrs=(VIP6.ip,))
    anc = [(socket.IPPROTO_IPV6, socket.IPV6_HOPLIMIT, struct.pack("@i", 255)),
           (socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, VRRP_MCAST_V6.packed + struct.pack("I", 2))]
    raw = _FakeRaw([(payload, anc, 0, (f"{LL_PEER}%eth0", 0, 0, 2)),
                    (payload, anc[1:], 0, (str(LL_PEER), 0, 0, 2))])
    s = VrrpSocket(6, "eth0", 2, LL_ME, sock=raw)
    assert s.recv() == (payload, LL_PEER, VRRP_MCAST_V6, 255)
    assert s.recv() == (payload, LL_PEER, VRRP_MCAST_V6, None)  # no hop limit: rejected later
    s.send(b"x", VRRP_MCAST_V6)
    _data, anc_out, addr = raw.sent[0]
    assert addr == ("ff02::12", 0, 0, 2)
    assert anc_out[0][2][:16] == LL_ME.packed


# ---- config mapping ------------------------------------------------------------------


def _cfg(**kw) -> VrrpConfig:
    kw.setdefault("name", "VI_1")
    kw.setdefault("interface", "eth0")
    kw.setdefault("vrid", 51)
    kw.setdefault("vips", (VIP4,))
    kw.setdefault("advert_interval_s", 0.1)
    return VrrpConfig(**kw)


def test_machine_config_and_vip_lifetime():
    m = machine_config(_cfg(priority=150), ME4)
    assert (m.vrid, m.priority, m.interval_cs, m.version, m.vips) == (51, 150, 10, 3, (VIP4.ip,))
    assert default_vip_lifetime(m) == 3  # 3 * 0.36 s is under the 3 s floor
    m2 = machine_config(_cfg(version=2, advert_interval_s=1.0, auth_pass="secret"), ME4)
    assert (m2.interval_cs, m2.auth_type, m2.auth_data) == (100, AUTH_SIMPLE, b"secret")
    assert default_vip_lifetime(m2) == 11  # 3 * (3 + 156/256) = 10.8 -> 11
    m3 = machine_config(_cfg(advert_interval_s=1.0), ME4)
    assert default_vip_lifetime(m3) == 11


# ---- the whole agent with fakes ---------------------------------------------------------


class FakeNetlink:
    def __init__(self, links=None, addrs=None):
        self.links = links if links is not None else {"eth0": LinkInfo(2, True, MAC)}
        self.addrs = addrs if addrs is not None else {
            2: [(ME4, 24, 0x80, 0), (LL_ME, 64, 0x80, 253)]}
        self.calls = []

    async def link(self, name):
        return self.links.get(name)

    async def addresses(self, index, family):
        return [a for a in self.addrs.get(index, []) if a[0].version == family]

    async def add_address(self, index, iface, lifetime):
        self.calls.append(("add", str(iface), lifetime))
        lst = self.addrs.setdefault(index, [])
        if not any(a[0] == iface.ip for a in lst):
            lst.append((iface.ip, iface.network.prefixlen, 0, 0))

    async def del_address(self, index, iface):
        self.calls.append(("del", str(iface)))
        lst = self.addrs.get(index, [])
        before = len(lst)
        lst[:] = [a for a in lst if a[0] != iface.ip]
        return len(lst) != before

    def has(self, iface, index=2):
        return any(a[0] == iface.ip for a in self.addrs.get(index, []))

    async def close(self):
        pass


class FakeTransport:
    """A VrrpSocket stand-in: inject() queues received packets, sent holds what went out."""

    def __init__(self, family=4, src=ME4, peers=()):
        self.family = family
        self.src = src
        self.peers = tuple(peers)
        self.r, self.w = socket.socketpair()
        self.r.setblocking(False)
        self.items = []
        self.sent = []
        self.closed = False

    @property
    def destinations(self):
        return self.peers or ((VRRP_MCAST_V4,) if self.family == 4 else (VRRP_MCAST_V6,))

    def inject(self, item):
        self.items.append(item)
        self.w.send(b"x")

    def fileno(self):
        return self.r.fileno()

    def recv(self):
        try:
            self.r.recv(1)
        except BlockingIOError:
            return None
        item = self.items.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    def send(self, payload, dst):
        self.sent.append((time.monotonic(), payload, dst))

    def adverts(self):
        return [decode(p, self.src, d, self.family, ttl=255) for _t, p, d in self.sent]

    def close(self):
        self.closed = True


class FakeL2:
    def __init__(self):
        self.frames = []

    def send(self, frames):
        self.frames.extend(frames)
        return len(frames)


def make_agent(cfg=None, nl=None, tr=None, **kw):
    cfg = cfg or _cfg(priority=100)
    nl = nl or FakeNetlink()
    tr = tr or FakeTransport(cfg.family, ME4 if cfg.family == 4 else LL_ME)
    l2 = FakeL2()
    events = []
    a = VrrpAgent(cfg, on_state=kw.pop("on_state", lambda o, n: events.append((o, n))),
                  netlink=nl, transport=tr, l2=l2, **kw)
    return a, nl, tr, l2, events


async def wait_state(a, state, timeout=3.0):
    t0 = time.monotonic()
    while a.state != state:
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{a.name} stayed {a.state}, wanted {state}")
        await asyncio.sleep(0.005)
    return time.monotonic() - t0


def test_agent_backup_then_master_with_vips_garp_and_callbacks():
    async def run():
        a, nl, tr, l2, events = make_agent()
        t0 = time.monotonic()
        await a.start()
        assert a.state == "backup" and not nl.has(VIP4)
        await wait_state(a, "master")
        took = time.monotonic() - t0
        assert 0.3 <= took < 1.0  # Master_Down_Interval = 3 * 0.1 + 156/256 * 0.1 = 0.36 s
        assert nl.has(VIP4) and ("add", "10.99.0.100/24", 3) in nl.calls
        await asyncio.sleep(0.35)
        advs = tr.adverts()
        assert len(advs) >= 3 and all(x.priority == 100 and x.vrid == 51 for x in advs)
        gaps = [b[0] - a_[0] for a_, b in zip(tr.sent, tr.sent[1:], strict=False)]
        assert min(gaps) > 0.05 and 0.08 < sum(gaps) / len(gaps) < 0.13, gaps
        assert len(l2.frames) == 5  # garp_count, 10 ms apart
        assert all(f == build_garp(MAC, VIP4.ip) for f in l2.frames)
        st = a.status()
        assert st["state"] == "master" and st["master_address"] == str(ME4)
        assert st["priority"] == 100 and st["vips_held"] and st["vip_lifetime_s"] == 3
        assert st["counters"]["transitions"] == {"initialize->backup": 1, "backup->master": 1}
        assert st["last_transition"]["reason"] == "master_down"
        await a.stop()
        assert a.state == "initialize" and not nl.has(VIP4) and tr.closed
        assert tr.adverts()[-1].priority == 0  # graceful: priority 0
        assert events == [("initialize", "backup"), ("backup", "master"),
                          ("master", "initialize")]

    asyncio.run(run())


def test_agent_stays_backup_under_a_better_master_and_takes_over_on_priority_zero():
    async def run():
        calls = []

        async def on_state(old, new):  # async callbacks are awaited, in order
            await asyncio.sleep(0)
            calls.append((old, new))

        a, nl, tr, l2, _ = make_agent(on_state=on_state)
        await a.start()
        for _ in range(8):
            tr.inject((_v3(PEER4, VRRP_MCAST_V4, priority=150), PEER4, VRRP_MCAST_V4, 255))
            await asyncio.sleep(0.1)
        assert a.state == "backup" and a.status()["master_address"] == str(PEER4)
        assert a.status()["master_priority"] == 150
        t0 = time.monotonic()
        tr.inject((_v3(PEER4, VRRP_MCAST_V4, priority=0), PEER4, VRRP_MCAST_V4, 255))
        took = await wait_state(a, "master")
        assert took < 0.2  # Skew_Time = 156/256 * 0.1 s = 61 ms, not Master_Down_Interval
        assert a.last_transition["reason"] == "master_released"
        assert time.monotonic() - t0 < 0.3
        await a.stop()
        assert calls == [("initialize", "backup"), ("backup", "master"),
                         ("master", "initialize")]

    asyncio.run(run())


def test_bad_adverts_are_counted_never_raised_and_do_not_disturb_timers():
    async def run():
        a, nl, tr, l2, _ = make_agent()
        t0 = time.monotonic()
        await a.start()
        good = _v3(PEER4, VRRP_MCAST_V4, priority=150)
        bad_ck = bytearray(good)
        bad_ck[7] ^= 0xFF
        floods = [
            (good, PEER4, VRRP_MCAST_V4, 64),  # TTL not 255 (e.g. from a routed sender)
            (good, PEER4, VRRP_MCAST_V4, None),  # no hop limit known
            (bytes(bad_ck), PEER4, VRRP_MCAST_V4, 255),
            (b"\x31\x33", PEER4, VRRP_MCAST_V4, 255),
            (good[:4] + b"\x00\x00" + good[6:], PEER4, VRRP_MCAST_V4, 255),  # interval 0
            (_v3(ME4, VRRP_MCAST_V4, priority=200), ME4, VRRP_MCAST_V4, 255),  # our own
            (_v3(PEER4, VRRP_MCAST_V4, priority=150, vrid=52), PEER4, VRRP_MCAST_V4, 255),
            VrrpDecodeError("truncated", "no IPv4 header"),
        ]
        for _ in range(40):  # a flood, for longer than Master_Down_Interval
            for item in floods:
                tr.inject(item)
            await asyncio.sleep(0.01)
        await wait_state(a, "master")
        assert time.monotonic() - t0 < 1.0  # none of that held the Master_Down_Timer back
        c = a.status()["counters"]
        assert c["decode_errors"] == {"ttl": 80, "checksum": 40, "truncated": 80,
                                      "interval": 40}
        assert c["dropped"] == {"own": 40}
        assert c["rejected"]["vrid"] == 40 and c["rejected"]["ttl"] == 80
        assert c["adverts_received"] == 320 and c["adverts_accepted"] == 0
        await a.stop()

    asyncio.run(run())


def test_stale_vip_is_removed_at_start_and_owner_keeps_it():
    async def run():
        nl = FakeNetlink()
        nl.addrs[2].append((VIP4.ip, 24, 0x80, 0))  # left behind by a killed agent
        a, *_ = make_agent(nl=nl)
        await a.start()
        assert not nl.has(VIP4) and a.status()["counters"]["stale_vips_removed"] == 1
        await a.stop()
        # the owner (priority 255) goes straight to master and holds it
        nl2 = FakeNetlink()
        nl2.addrs[2].append((VIP4.ip, 24, 0x80, 0))
        b, *_ = make_agent(_cfg(priority=255), nl=nl2)
        await b.start()
        assert b.state == "master" and nl2.has(VIP4)
        assert ("del", "10.99.0.100/24") not in nl2.calls
        await b.stop()

    asyncio.run(run())


def test_non_graceful_stop_sends_nothing_and_leaves_the_vips():
    async def run():
        a, nl, tr, *_ = make_agent(_cfg(priority=255), vip_lifetime_s=0)
        await a.start()
        assert ("add", "10.99.0.100/24", 0) in nl.calls  # permanent when asked
        n = len(tr.sent)
        await a.stop(graceful=False)
        assert len(tr.sent) == n and nl.has(VIP4) and a.state == "initialize"

    asyncio.run(run())


def test_track_interfaces_weights_and_fault():
    async def run():
        links = {"eth0": LinkInfo(2, True, MAC), "eth1": LinkInfo(3, True, MAC),
                 "eth2": LinkInfo(4, True, MAC)}
        nl = FakeNetlink(links=links)
        cfg = _cfg(priority=100, track_interfaces=(TrackInterface("eth1", -60),
                                                   TrackInterface("eth2", 0)))
        a, nl, tr, *_ = make_agent(cfg, nl=nl)
        await a.start()
        assert a.status()["priority"] == 100
        links["eth1"] = LinkInfo(3, False, MAC)
        await asyncio.sleep(0.25)
        assert a.status()["priority"] == 40 and a.status()["priority_offset"] == -60
        await wait_state(a, "master")
        links["eth2"] = LinkInfo(4, False, MAC)  # weight 0: FAULT
        await wait_state(a, "fault", 1.0)
        st = a.status()
        assert "track interface eth2 down" in st["fault_reasons"] and not nl.has(VIP4)
        links["eth2"] = LinkInfo(4, True, MAC)
        await wait_state(a, "backup", 1.0)
        links["eth0"] = LinkInfo(2, False, MAC)  # the VRRP interface itself
        await wait_state(a, "fault", 1.0)
        links["eth0"] = LinkInfo(2, True, MAC)
        await wait_state(a, "backup", 1.0)
        await a.stop()
        t = a.status()["counters"]["transitions"]
        assert t["master->fault"] == 1 and t["backup->fault"] == 1 and t["fault->backup"] == 2

    asyncio.run(run())


def test_track_scripts_and_notify_scripts(tmp_path):
    out = tmp_path / "notify.log"
    rec = tmp_path / "rec.py"
    rec.write_text("import sys\nopen(sys.argv[1], 'a').write(' '.join(sys.argv[2:]) + '\\n')\n")
    flag = tmp_path / "healthy"
    chk = [sys.executable, "-c", f"import os,sys; sys.exit(0 if os.path.exists({str(flag)!r}) else 1)"]

    async def run():
        cfg = _cfg(priority=100,
                   track_scripts=(TrackScript(tuple(chk), interval_s=0.1, weight=0, rise=2,
                                              fall=1),),
                   notify=(sys.executable, str(rec), str(out), "ALL"),
                   notify_master=(sys.executable, str(rec), str(out), "M"),
                   notify_fault=(sys.executable, str(rec), str(out), "F"))
        a, nl, *_ = make_agent(cfg)
        await a.start()  # the check fails: FAULT from the start
        assert a.state == "fault"
        flag.write_text("")
        await wait_state(a, "master", 3.0)
        flag.unlink()
        await wait_state(a, "fault", 3.0)
        await a.stop()
        assert a.state == "initialize"
        await asyncio.sleep(0.5)  # notify scripts run detached

    asyncio.run(run())
    lines = out.read_text().splitlines()
    assert "F INSTANCE VI_1 FAULT" in lines
    assert "ALL INSTANCE VI_1 FAULT 100" in lines
    assert "M INSTANCE VI_1 MASTER" in lines
    assert "ALL INSTANCE VI_1 MASTER 100" in lines
    assert "ALL INSTANCE VI_1 BACKUP 100" in lines
    assert "ALL INSTANCE VI_1 STOP 100" in lines  # scripts run concurrently: any order


def test_ipv6_agent_uses_link_local_and_sends_unsolicited_na():
    async def run():
        cfg = _cfg(priority=200, vips=(VIP6,))
        a, nl, tr, l2, _ = make_agent(cfg)
        await a.start()
        assert a.status()["primary_address"] == str(LL_ME)
        await wait_state(a, "master")
        assert nl.has(VIP6)
        await asyncio.sleep(0.1)
        assert l2.frames and l2.frames[0] == build_unsolicited_na(MAC, LL_ME, VIP6.ip)
        assert tr.adverts()[0].addresses == [VIP6.ip]
        await a.stop()

    asyncio.run(run())


def test_unicast_peers_only():
    async def run():
        cfg = _cfg(priority=100, unicast_src=ME4, unicast_peers=(PEER4,))
        a, nl, tr, *_ = make_agent(cfg, tr=FakeTransport(4, ME4, (PEER4,)))
        await a.start()
        stranger = A4("10.99.0.23")
        tr.inject((_v3(stranger, PEER4, priority=200), stranger, ME4, 255))
        await asyncio.sleep(0.05)
        assert a.status()["counters"]["dropped"] == {"unknown_peer": 1}
        await wait_state(a, "master")
        assert {d for _t, _p, d in tr.sent} == {PEER4}
        await a.stop()

    asyncio.run(run())


def test_missing_interface_or_address_is_a_clear_error():
    async def run():
        a, *_ = make_agent(nl=FakeNetlink(links={}))
        with pytest.raises(agent_mod.AgentError, match="interface eth0 not found"):
            await a.start()
        b, *_ = make_agent(nl=FakeNetlink(addrs={2: [(LL_ME, 64, 0x80, 253)]}))
        with pytest.raises(agent_mod.AgentError, match="no IPv4 address"):
            await b.start()

    asyncio.run(run())


# ---- the standalone runner's argument handling --------------------------------------


def test_runner_refuses_unknown_instance_and_empty_config(tmp_path, capsys):
    conf = tmp_path / "c.toml"
    conf.write_text('[node]\nname = "lb1"\ninterfaces = ["eth0"]\n')
    assert agent_mod.main(["-c", str(conf)]) == 2
    assert "no [[vrrp]] instance" in capsys.readouterr().err
    conf.write_text('[node]\nname = "lb1"\ninterfaces = ["eth0"]\n[[vrrp]]\nname = "VI_1"\n'
                    'interface = "eth0"\nvrid = 51\nvips = ["10.99.0.100/24"]\n')
    parse_config(conf.read_text())
    assert agent_mod.main(["-c", str(conf), "--instance", "VI_9"]) == 2
    assert "VI_9" in capsys.readouterr().err
