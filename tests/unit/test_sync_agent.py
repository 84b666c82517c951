"""The sync agent without BPF: translation by real address, flow-event decoding,
conn-table records, and two agents talking over UDP on loopback with fake tables."""

from __future__ import annotations

import asyncio
import ctypes as ct
import ipaddress
import json
import socket
import time
from collections import Counter

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from l4lb.config import Endpoint, SyncConfig
from l4lb.dataplane import maps as M
from l4lb.dataplane.tables import CONN_KEY, CONN_VAL, RealState, VipState
from l4lb.sync import agent as sync_agent
from l4lb.sync import translate
from l4lb.sync.agent import Translator, decode_events
from l4lb.sync.codec import VERSION, SyncEntry, decode

VIP = "10.99.0.100"
CLIENT = "10.99.0.11"


def p(a: str) -> bytes:
    return ipaddress.ip_address(a).packed


def vip(address, port, proto, vip_id, reals, retired=()):
    vs = VipState(address, port, proto, vip_id)
    for addr, rid in reals:
        vs.reals[addr] = RealState(addr, rid, "02:00:00:00:00:01", 1)
    for addr, rid in retired:
        vs.retired[addr] = RealState(addr, rid, "02:00:00:00:00:01", 1)
    return vs


class FakeTables:
    """What the agent uses of ServiceTables: vips, conn_batches, install_conns."""

    def __init__(self, vips):
        self.vips = {v.key: v for v in vips}
        self.conns: dict[bytes, bytes] = {}  # packed FlowKey -> packed ConnVal
        self.installs: list[tuple[bool, int]] = []

    def conn_batches(self, batch=1024):
        items = list(self.conns.items())
        for i in range(0, len(items), batch):
            part = items[i:i + batch]
            yield b"".join(k for k, _ in part), b"".join(v for _, v in part), len(part)

    def install_conns(self, keys, values, overwrite=True):
        n = len(keys) // CONN_KEY.size
        written = 0
        for i in range(n):
            k = keys[i * CONN_KEY.size:(i + 1) * CONN_KEY.size]
            if not overwrite and k in self.conns:
                continue
            self.conns[k] = values[i * CONN_VAL.size:(i + 1) * CONN_VAL.size]
            written += 1
        self.installs.append((overwrite, n))
        return written

    def entry(self, src, sport, dst, dport, proto=6):
        """(real_id, vip_id, last_seen_ns) of a flow, or None."""
        fam = M.FAMILY_V4 if ipaddress.ip_address(src).version == 4 else M.FAMILY_V6
        k = CONN_KEY.pack(p(src), p(dst), sport, dport, proto, fam)
        v = self.conns.get(k)
        return None if v is None else CONN_VAL.unpack(v)

    def add(self, src, sport, dst, dport, real_id, vip_id, seen_ns, proto=6):
        fam = M.FAMILY_V4 if ipaddress.ip_address(src).version == 4 else M.FAMILY_V6
        self.conns[CONN_KEY.pack(p(src), p(dst), sport, dport, proto, fam)] = \
            CONN_VAL.pack(real_id, vip_id, seen_ns)


def flow_event(src, sport, dst, dport, real_id, vip_id=0, proto="tcp") -> bytes:
    ev = M.FlowEvent()
    ev.key = M.flow_key(src, sport, dst, dport, proto)
    ev.real_id, ev.vip_id, ev.ts_ns = real_id, vip_id, 123
    return bytes(ev)


# --------------------------------------------------------------------------- translation

STANDBY_VIPS = [
    vip(VIP, 80, "tcp", 3, [("10.99.0.31", 7), ("10.99.0.32", 8)], retired=[("10.99.0.39", 9)]),
    vip(VIP, 0, "udp", 4, [("10.99.0.33", 11)]),  # port 0: every UDP port
    vip("fd99::100", 443, "tcp", 5, [("fd99::31", 12), ("10.99.0.34", 13)]),  # tun: v4 real
]


def records(keys, vals):
    return list(zip(CONN_KEY.iter_unpack(keys), CONN_VAL.iter_unpack(vals), strict=True))


def test_known_vip_translates_real_address_to_local_ids():
    tr = Translator(FakeTables(STANDBY_VIPS))
    ents = [SyncEntry(p(CLIENT), 40000, p(VIP), 80, 6, p("10.99.0.32")),
            SyncEntry(p(CLIENT), 40001, p(VIP), 80, 6, p("10.99.0.39")),  # retired real
            SyncEntry(p(CLIENT), 40002, p(VIP), 5353, 17, p("10.99.0.33")),  # port-0 VIP
            SyncEntry(p("fd99::11"), 40003, p("fd99::100"), 443, 6, p("10.99.0.34"))]
    keys, vals, skipped = tr.entries_to_records(ents, now_ns=555)
    assert not +skipped
    got = records(keys, vals)
    assert [(k[2], v[0], v[1], v[2]) for k, v in got] == [
        (40000, 8, 3, 555), (40001, 9, 3, 555), (40002, 11, 4, 555), (40003, 13, 5, 555)]
    # the key is the data plane's struct flow_key, byte for byte
    assert keys[:CONN_KEY.size] == bytes(M.flow_key(CLIENT, 40000, VIP, 80, "tcp"))
    assert keys[-CONN_KEY.size:] == bytes(M.flow_key("fd99::11", 40003, "fd99::100", 443, "tcp"))
    assert vals[:CONN_VAL.size] == bytes(M.ConnVal(real_id=8, vip_id=3, last_seen_ns=555))


def test_unknown_vip_and_unknown_real_are_counted_and_skipped():
    tr = Translator(FakeTables(STANDBY_VIPS))
    ents = [SyncEntry(p(CLIENT), 1, p("10.99.0.200"), 80, 6, p("10.99.0.31")),  # no such VIP
            SyncEntry(p(CLIENT), 2, p(VIP), 81, 6, p("10.99.0.31")),  # no VIP on port 81/tcp
            SyncEntry(p(CLIENT), 3, p(VIP), 80, 17, p("10.99.0.31")),  # udp/80: port-0 VIP...
            SyncEntry(p(CLIENT), 4, p(VIP), 80, 6, p("10.99.0.35")),  # real not in this VIP
            SyncEntry(p(CLIENT), 5, p(VIP), 80, 6, p("10.99.0.31"))]  # fine
    keys, vals, skipped = tr.entries_to_records(ents, now_ns=1)
    assert dict(skipped) == {"unknown_vip": 2, "unknown_real": 2}  # (3: .31 not in port-0 VIP)
    assert [(k[2], v[0]) for k, v in records(keys, vals)] == [(5, 7)]


def test_translation_follows_table_changes_after_a_miss():
    t = FakeTables(STANDBY_VIPS[:1])
    tr = Translator(t)
    e = SyncEntry(p(CLIENT), 1, p(VIP), 80, 6, p("10.99.0.36"))
    _, _, skipped = tr.entries_to_records([e], 1)
    assert skipped["unknown_real"] == 1
    t.vips[f"{VIP}:80/tcp"].reals["10.99.0.36"] = RealState("10.99.0.36", 20, "x", 1)
    tr.refreshed_at -= 1.0  # a miss refreshes at most every TRANSLATE_MISS_S
    keys, vals, skipped = tr.entries_to_records([e], 1)
    assert not +skipped and records(keys, vals)[0][1][0] == 20


def test_flow_events_decode_from_raw_bytes():
    raws = [flow_event(CLIENT, 40000, VIP, 80, 7, 3),
            flow_event("fd99::11", 40001, "fd99::100", 443, 12, 5),
            flow_event(CLIENT, 40002, VIP, 53, 11, 4, proto="udp"),
            b"\x00" * 10]  # short: bad
    flows, bad = decode_events(raws)
    assert bad == 1
    assert flows == [(p(CLIENT), 40000, p(VIP), 80, 6, 7),
                     (p("fd99::11"), 40001, p("fd99::100"), 443, 6, 12),
                     (p(CLIENT), 40002, p(VIP), 53, 17, 11)]
    ev = M.FlowEvent()  # family 0 (never written by the data plane): bad
    assert decode_events([bytes(ev)]) == ([], 1)


def test_events_name_their_real_by_address():
    tr = Translator(FakeTables(STANDBY_VIPS))
    raws = [flow_event(CLIENT, 40000, VIP, 80, 8), flow_event(CLIENT, 40001, VIP, 80, 99),
            flow_event("fd99::11", 40002, "fd99::100", 443, 13)]
    entries, skipped = tr.events_to_entries(raws)
    assert dict(skipped) == {"unknown_real": 1}
    assert entries == [SyncEntry(p(CLIENT), 40000, p(VIP), 80, 6, p("10.99.0.32")),
                       SyncEntry(p("fd99::11"), 40002, p("fd99::100"), 443, 6, p("10.99.0.34"))]


def test_walk_records_skip_idle_flows():
    t = FakeTables(STANDBY_VIPS)
    now = 1_000_000_000_000
    t.add(CLIENT, 1, VIP, 80, 7, 3, now - 10 * 10**9)
    t.add(CLIENT, 2, VIP, 80, 8, 3, now - 400 * 10**9)  # idle longer than the timeout
    t.add(CLIENT, 3, VIP, 80, 98, 3, now)  # its real id is unknown
    tr = Translator(t)
    (keys, vals, _), = t.conn_batches()
    entries, skipped = tr.records_to_entries(keys, vals, now, 300 * 10**9)
    assert entries == [SyncEntry(p(CLIENT), 1, p(VIP), 80, 6, p("10.99.0.31"), 10)]  # age 10 s
    assert dict(skipped) == {"idle": 1, "unknown_real": 1}
    entries, _ = tr.records_to_entries(keys, vals, now, 0)  # no timeout: all known ones
    assert [e[1] for e in entries] == [1, 2]  # (src, sport, ...) tuples


# --------------------------------------------------------------------------- two agents


class FakeBpf:
    """The ring buffer of a bcc BPF object: events pushed by the test."""

    def __init__(self):
        self.cb = None
        self.queue: list[bytes] = []

    def __getitem__(self, name):
        assert name == b"flow_events"
        return self

    def open_ring_buffer(self, cb):
        self.cb = cb

    def ring_buffer_consume(self):
        q, self.queue = self.queue, []
        for raw in q:
            buf = ct.create_string_buffer(raw, len(raw))
            self.cb(None, ct.addressof(buf), len(raw))


class FakeProg:
    def __init__(self):
        self.bpf = FakeBpf()

    def map(self, name):
        raise KeyError(name)  # no config map: walks keep every flow


def make_agent(*args, **kw):
    """A SyncAgent that keeps no state file unless the test gives it a directory."""
    kw.setdefault("state_dir", None)
    return sync_agent.SyncAgent(*args, **kw)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sync_cfg(port, peer_port, **kw):
    return SyncConfig(enabled=True, listen=Endpoint(ipaddress.ip_address("127.0.0.1"), port),
                      peers=(Endpoint(ipaddress.ip_address("127.0.0.1"), peer_port),),
                      key="0123456789abcdef0123", vrrp_instance="VI_1", batch_max=50,
                      batch_delay_ms=1.0, full_sync_interval_s=0, **kw)


async def until(pred, timeout=3.0):
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError("timed out")
        await asyncio.sleep(0.005)


async def prove(agent, sender, sock, port):
    """Have ``agent`` (listening on ``port``) adopt a hand-made peer's session: it
    adopts none before a challenge round trip (machine.py: sessions). ``sock`` is
    bound to the configured peer address."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    sock.sendto(sender.challenge(bytes(16), time.time()), ("127.0.0.1", port))
    while True:  # (the agent's hello and heartbeats come here too)
        data = await asyncio.wait_for(loop.sock_recv(sock, 2048), 3.0)
        msg = decode(data, b"0123456789abcdef0123", 2048)
        if msg.kind == "challenge":
            break
    sock.sendto(sender.respond(msg.nonce, time.time()), ("127.0.0.1", port))
    await until(lambda: (agent.receiver.peer(sender.node_id) or {}).get("session")
                == sender.session)


# The two nodes number their VIPs and reals differently.
MASTER_VIPS = [vip(VIP, 80, "tcp", 0, [("10.99.0.31", 1), ("10.99.0.32", 2)])]
BACKUP_VIPS = [vip(VIP, 80, "tcp", 6, [("10.99.0.32", 40), ("10.99.0.31", 41),
                                       ("10.99.0.33", 42)])]


def test_two_agents_stream_walk_and_swap_roles():
    async def main():
        pa, pb = free_port(), free_port()
        ta, tb = FakeTables(MASTER_VIPS), FakeTables(BACKUP_VIPS)
        ta.add(CLIENT, 30000, VIP, 80, 1, 0, time.monotonic_ns())  # before the peer came
        a = make_agent(sync_cfg(pa, pb), "lb1", ta, FakeProg(), role="master", ring_mode="poll")
        b = make_agent(sync_cfg(pb, pa), "lb2", tb, FakeProg(), role="backup", ring_mode="poll")
        await a.start()
        await b.start()
        try:
            # b appears: a walks its table to b
            await until(lambda: tb.entry(CLIENT, 30000, VIP, 80) is not None)
            assert tb.entry(CLIENT, 30000, VIP, 80)[:2] == (41, 6)
            # new flows from a's data plane stream to b, translated by real address
            a.prog.bpf.queue += [flow_event(CLIENT, 30001 + i, VIP, 80, 1 + i % 2)
                                 for i in range(120)]
            a.prog.bpf.queue.append(flow_event(CLIENT, 31000, VIP, 80, 77))  # unknown id
            await until(lambda: len(tb.conns) == 121)
            assert tb.entry(CLIENT, 30001, VIP, 80)[:2] == (41, 6)  # .31
            assert tb.entry(CLIENT, 30002, VIP, 80)[:2] == (40, 6)  # .32
            assert all(ow for ow, _ in tb.installs)  # a backup overwrites
            sa, sb = a.status(), b.status()
            assert sa["role"] == "master" and sb["role"] == "backup"
            assert sa["entries_sent"] >= 121 and sb["entries_received"] >= 121
            assert sb["entries_installed"] >= 121 and sb["lag_ms"] is not None
            assert sa["new_flows"]["unknown_real"] == 1
            assert sb["peer_detail"][0]["name"] == "lb1"
            assert sb["peer_detail"][0]["state"] == "up"
            assert "lb1: up, master" in sb["peers"]

            # an entry b cannot place is counted
            ta.vips[f"{VIP}:80/tcp"].reals["10.99.0.38"] = RealState("10.99.0.38", 3, "x", 1)
            a.translator.refreshed_at -= 5
            a.prog.bpf.queue.append(flow_event(CLIENT, 32000, VIP, 80, 3))
            await until(lambda: b.status()["entries_skipped"]["unknown_real"] == 1)

            # failover and failback: roles swap, and so does the direction
            b.set_role("master")
            a.set_role("backup")
            b.prog.bpf.queue.append(flow_event(CLIENT, 33000, VIP, 80, 42))  # .33: a lacks it
            b.prog.bpf.queue.append(flow_event(CLIENT, 33001, VIP, 80, 40))
            await until(lambda: ta.entry(CLIENT, 33001, VIP, 80) is not None)
            assert ta.entry(CLIENT, 33001, VIP, 80)[:2] == (2, 0)
            assert a.status()["entries_skipped"]["unknown_real"] >= 1
            # b's walk (on becoming master) brought a everything b has
            await until(lambda: b.status()["full_walks"]["sent_completed"] >= 1)
            await until(lambda: all(ta.entry(CLIENT, 30001 + i, VIP, 80) is not None
                                    for i in range(120)))

            # a master installs only what it does not have (BPF_NOEXIST)
            ta.installs.clear()
            a.set_role("master")
            b.set_role("backup")
            b.prog.bpf.queue.append(flow_event(CLIENT, 30001, VIP, 80, 40))  # stray, late
            a_real = ta.entry(CLIENT, 30001, VIP, 80)[0]
            await asyncio.sleep(0.05)
            assert ta.entry(CLIENT, 30001, VIP, 80)[0] == a_real

            # metrics: every family the issue names, with values
            reg = CollectorRegistry(auto_describe=False)

            class C:
                def collect(self):
                    yield from b.metrics()

            reg.register(C())
            text = generate_latest(reg).decode()
            for name in ("l4lb_sync_messages_sent_total", "l4lb_sync_messages_received_total",
                         "l4lb_sync_entries_sent_total", "l4lb_sync_entries_received_total",
                         "l4lb_sync_entries_installed_total", "l4lb_sync_entries_skipped_total",
                         'l4lb_sync_rejected_total{reason="bad_mac"}',
                         "l4lb_sync_lag_seconds", 'l4lb_sync_role{role="backup"} 1.0'):
                assert name in text, name
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(main())


def test_wrong_key_is_rejected_and_counted():
    async def main():
        pa, pb = free_port(), free_port()
        ta, tb = FakeTables(MASTER_VIPS), FakeTables(BACKUP_VIPS)
        a = make_agent(sync_cfg(pa, pb), "lb1", ta, FakeProg(), role="master", ring_mode="poll")
        cfg_b = sync_cfg(pb, pa)
        cfg_b = SyncConfig(**{**cfg_b.__dict__, "key": "another key, 16+ chars"})
        b = make_agent(cfg_b, "lb2", tb, FakeProg(), role="backup", ring_mode="poll")
        await a.start()
        await b.start()
        try:
            a.prog.bpf.queue.append(flow_event(CLIENT, 30001, VIP, 80, 1))
            await until(lambda: b.status()["rejected"].get("bad_mac", 0) >= 1)
            await asyncio.sleep(0.05)
            assert not tb.conns
            assert b.status()["peer_detail"][0]["state"] == "unknown"
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(main())


def test_bad_config_is_refused():
    with pytest.raises(ValueError):
        make_agent(SyncConfig(enabled=True, key="0123456789abcdef"), "lb1",
                  FakeTables([]), FakeProg())


def test_walk_pace_urgent_for_a_waiting_peer_slow_for_the_periodic_repair():
    a = make_agent(sync_cfg(free_port(), free_port()), "lb1", FakeTables(MASTER_VIPS), FakeProg(),
                  role="backup", full_entries_per_s=400_000, periodic_entries_per_s=50_000)
    now = time.time()
    a.set_role("master")  # becoming master: the peer waits for our table
    a._tick(now)
    assert a.sender.stats["full_started"] == 1
    urgent = a.sender.full_rate
    a.request_full(urgent=False)
    a._tick(now + 1)
    assert a.sender.full_rate == pytest.approx(urgent / 8)
    a.request_full()  # a peer appeared or restarted
    a._tick(now + 2)
    assert a.sender.full_rate == urgent


def walk_entries(n: int) -> list:
    """n flows of the master's table as a full walk sends them (clients' ports 20000...)."""
    return [SyncEntry(p(CLIENT), 20000 + i, p(VIP), 80, 6, p("10.99.0.31")) for i in range(n)]


async def started_backup(pb: int, peer: int):
    """A started backup agent on port pb hearing `peer`, and its table."""
    tb = FakeTables(BACKUP_VIPS)
    b = make_agent(sync_cfg(pb, peer), "lb2", tb, FakeProg(), role="backup", ring_mode="poll")
    await b.start()
    return b, tb


def test_standby_installs_new_flows_before_a_full_walk_backlog(monkeypatch):
    """Full-walk chunks already queued in the socket do not hold back a new flow."""
    from l4lb.sync.machine import Sender  # noqa: PLC0415

    monkeypatch.setattr(sync_agent, "FULL_TURN_BYTES", 8192)  # slices of ~6 datagrams

    async def main():
        pb, peer = free_port(), free_port()
        b, tb = await started_backup(pb, peer)
        try:
            now = time.time()
            s = Sender("lb1", b"0123456789abcdef0123", now, role="master", full_rate=None)
            walk = walk_entries(3000)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out:
                out.bind(("127.0.0.1", peer))  # the configured peer: only it is heard
                await prove(b, s, out, pb)
                s.start_full(walk, now)
                grams = []
                while s.full_in_progress:
                    grams += s.poll(now)
                s.add_new_flows([SyncEntry(p(CLIENT), 9, p(VIP), 80, 6, p("10.99.0.32"))], now)
                grams += s.flush(now)  # the new flow's batch: sent last
                for g in grams:
                    out.sendto(g, ("127.0.0.1", pb))
            await until(lambda: len(tb.conns) == 3001)
            assert tb.installs[0] == (True, 1)  # the new flow first...
            full_bytes = sum(len(g) for g in grams[:-1])
            assert len(tb.installs) >= 1 + full_bytes // 8192  # ...then the walk, by slices
            st = b.status()
            assert st["full_backlog"] == 0 and st["rejected"] == {}
            assert st["full_walks"]["received_complete"] == 1
        finally:
            await b.stop()

    asyncio.run(main())


# --------------------------------------------------------------------------- hardening


def mixed_table(now):
    """Conn-table records of every shape, some idle, some naming unknown reals."""
    t = FakeTables(STANDBY_VIPS)
    for i in range(300):
        t.add(CLIENT, 1000 + i, VIP, 80, (7, 8, 9)[i % 3], 3, now - (i % 7) * 10**9)  # ages
        t.add("fd99::11", 1000 + i, "fd99::100", 443, (12, 13)[i % 2], 5, now)
        t.add(CLIENT, 5000 + i, VIP, 53, 11, 4, now - (400 * 10**9 if i % 5 == 0 else 0),
              proto=17)
    t.add(CLIENT, 9, VIP, 80, 99, 3, now)  # real id unknown here
    return t


def test_bulk_paths_give_what_the_per_entry_paths_give():
    """The walk (records -> wire rows) and the install (groups -> records) in numpy
    agree with the per-entry struct code, skips and all."""
    from l4lb.sync.codec import SHAPE_LENS, PackedEntries  # noqa: PLC0415

    now = 1_000_000_000_000
    t = mixed_table(now)
    tr = Translator(t)
    keys = b"".join(t.conns)
    vals = b"".join(t.conns.values())
    rows, skipped = tr.records_to_rows(keys, vals, now, 300 * 10**9)
    want, want_skipped = tr.records_to_entries(keys, vals, now, 300 * 10**9)
    assert skipped == want_skipped == Counter(idle=60, unknown_real=1)
    packed = PackedEntries(tuple((SHAPE_LENS[lens][0], r.tobytes()) for lens, r in rows.items()))
    assert sorted(packed) == sorted(want)
    assert set(rows) == {(4, 4, 4), (16, 16, 16), (16, 16, 4)}
    # ...and back, on the other node: an unknown VIP and an unknown real among them
    extra = PackedEntries.from_groups([(0, b"".join(
        codec_pack(e) for e in (SyncEntry(p(CLIENT), 1, p("10.99.0.200"), 80, 6, p("10.99.0.31")),
                                SyncEntry(p(CLIENT), 2, p(VIP), 80, 6, p("10.99.0.35")))))])
    groups = packed.groups + extra.groups
    k1, v1, s1 = tr.groups_to_records(groups, now + 77)
    k2, v2, s2 = tr.entries_to_records([*packed, *extra], now + 77)
    assert s1 == s2 == Counter(unknown_vip=1, unknown_real=1)
    assert sorted(records(k1, v1)) == sorted(records(k2, v2)) and len(records(k1, v1)) == 840
    # again: every target is known now, found by its hash (the target cache), same records
    assert tr._tcache is not None and tr._tcache._by_code
    k3, v3, s3 = tr.groups_to_records(packed.groups, now + 77)
    assert not s3 and sorted(records(k3, v3)) == sorted(records(k1, v1))


def test_walk_and_install_threads_count_their_cpu_by_part(monkeypatch):
    ticks = iter(range(1, 1000))
    monkeypatch.setattr(sync_agent, "_thread_cpu", lambda: (next(ticks) * 1.0, 0.0))
    t = FakeTables(STANDBY_VIPS)
    now = time.monotonic_ns()
    for i in range(50):
        t.add(CLIENT, 7000 + i, VIP, 53, 11, 4, now, proto=17)
    a = make_agent(sync_cfg(free_port(), free_port()), "lb1", t, FakeProg(), role="master",
                   ring_mode="poll")

    class Feed:
        got: list = []

        def put(self, chunk, last):
            self.got.append((len(chunk), last))

        def put_many(self, items):
            for chunk, last in items:
                self.put(chunk, last)

    a._produce_walk(Feed())  # (in the test's thread: the walk's two readings, 1 s apart)
    assert sum(n for n, _ in Feed.got) == 50 and Feed.got[-1][1]
    a._install_job([], True, 0.0, True)  # translate 1 s, then write 1 s
    a._install_job([], True, 0.0, False)
    cpu = a.status()["cpu_s"]
    assert cpu == {**dict.fromkeys(cpu, 0.0), "walk_user": 1.0, "translate_full_user": 1.0,
                   "write_full_user": 1.0, "translate_new_user": 1.0, "write_new_user": 1.0}


def codec_pack(e: SyncEntry) -> bytes:
    import struct  # noqa: PLC0415

    return struct.pack("!4sH4sHB4sH", *e)


def test_garbage_flood_costs_bounded_work_per_turn_and_is_counted(monkeypatch):
    """Datagrams from elsewhere are dropped unread (no MAC); from the peer's address,
    full-walk lookalikes wait in a bounded backlog and are checked a bounded number
    of bytes per loop turn; genuine traffic still gets through afterwards."""
    from l4lb.sync.codec import PREFIX_LEN  # noqa: PLC0415
    from l4lb.sync.machine import Sender  # noqa: PLC0415

    monkeypatch.setattr(sync_agent, "DEFER_MAX_BYTES", 64 << 10)
    monkeypatch.setattr(sync_agent, "FULL_TURN_BYTES", 16 << 10)
    monkeypatch.setattr(sync_agent, "RECV_TURN_BYTES", 16 << 10)

    async def main():
        pb, peer = free_port(), free_port()
        tb = FakeTables(BACKUP_VIPS)
        b = make_agent(sync_cfg(pb, peer), "lb2", tb, FakeProg(), role="backup",
                       ring_mode="poll")
        macs = []  # datagrams that reached the MAC check, per loop callback
        real_on_datagram = None

        def counting(*a):
            macs[-1] += 1
            return real_on_datagram(*a)

        def per_callback(f):
            def wrap():
                macs.append(0)
                return f()
            return wrap

        for name in ("_on_readable", "_process_deferred"):
            setattr(b, name, per_callback(getattr(b, name)))
        await b.start()
        real_on_datagram = b.receiver.on_datagram
        b.receiver.on_datagram = counting
        try:
            body = bytes((0x99, 2)) + bytes(1400 - PREFIX_LEN - 2 - 32)  # "a full-walk chunk"
            junk = b"L4S" + bytes([VERSION]) + len(body).to_bytes(4, "big") + body + bytes(32)
            assert len(junk) == 1400 and junk[PREFIX_LEN:PREFIX_LEN + 2] == bytes((0x99, 2))
            n = 300
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as spoof, \
                    socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as foreign:
                spoof.bind(("127.0.0.1", peer))
                for _ in range(n):
                    foreign.sendto(junk, ("127.0.0.1", pb))
                    spoof.sendto(junk, ("127.0.0.1", pb))
            rej = b.receiver.counters
            await until(lambda: rej["foreign_addr"] == n
                        and rej["bad_mac"] + rej["backlog_full"] == n)
            assert rej["backlog_full"] >= 1  # 420 KB offered, 64 KiB held at most
            assert max(macs) <= (16 << 10) // 1400 + 1  # per loop callback
            assert b.status()["full_backlog"] == 0 and not tb.conns
            # the real peer is still heard
            s = Sender("lb1", b"0123456789abcdef0123", time.time(), role="master")
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out:
                out.bind(("127.0.0.1", peer))
                await prove(b, s, out, pb)
                s.add_new_flows([SyncEntry(p(CLIENT), 7, p(VIP), 80, 6, p("10.99.0.31"))],
                                time.time())
                for g in s.poll(time.time() + 1):
                    out.sendto(g, ("127.0.0.1", pb))
            await until(lambda: tb.entry(CLIENT, 7, VIP, 80) is not None)
            text = generate_latest(registry_of(b)).decode()
            assert 'l4lb_sync_rejected_total{reason="foreign_addr"} 300.0' in text
        finally:
            await b.stop()

    asyncio.run(main())


def registry_of(agent):
    reg = CollectorRegistry(auto_describe=False)

    class C:
        def collect(self):
            yield from agent.metrics()

    reg.register(C())
    return reg


def test_session_persists_and_grows_across_restarts_even_with_the_clock_back(tmp_path,
                                                                             monkeypatch):
    async def main():
        pa, pb = free_port(), free_port()
        a = make_agent(sync_cfg(pa, pb), "lb1", FakeTables(MASTER_VIPS), FakeProg(),
                       role="master", ring_mode="poll", state_dir=tmp_path / "lb1")
        b = make_agent(sync_cfg(pb, pa), "lb2", FakeTables(BACKUP_VIPS), FakeProg(),
                       role="backup", ring_mode="poll", state_dir=tmp_path / "lb2")
        await a.start()
        await b.start()
        first = a.sender.session
        await until(lambda: json.loads((tmp_path / "lb2" / "sync.json").read_text())
                    .get("peers") == {"lb1": first})
        await a.stop()
        assert json.loads((tmp_path / "lb1" / "sync.json").read_text())["session"] == first
        monkeypatch.setattr(sync_agent.time, "time_ns", lambda: 1_000)  # clock reset
        a2 = make_agent(sync_cfg(pa, pb), "lb1", FakeTables(MASTER_VIPS), FakeProg(),
                        role="master", ring_mode="poll", state_dir=tmp_path / "lb1")
        await a2.start()
        try:
            assert a2.sender.session == first + 1
            await until(lambda: b.receiver.peer("lb1")["session"] == first + 1)
        finally:
            await a2.stop()
            await b.stop()

    asyncio.run(main())


def test_wildcard_listen_binds_the_nodes_own_address_never_a_vip():
    async def main():
        port, peer = free_port(), free_port()
        cfg = sync_cfg(port, peer)
        cfg = SyncConfig(**{**cfg.__dict__,
                            "listen": Endpoint(ipaddress.ip_address("0.0.0.0"), port)})
        a = make_agent(cfg, "lb1", FakeTables(MASTER_VIPS), FakeProg(), ring_mode="poll")
        await a.start()
        try:
            assert a.bound == ("127.0.0.1", port)  # lo's address, towards the peer
        finally:
            await a.stop()
        # the only address there is a VIP: a clear error, not the VIP
        b = make_agent(cfg, "lb1", FakeTables([vip("127.0.0.1", 80, "tcp", 1, [])]),
                       FakeProg(), ring_mode="poll")
        with pytest.raises(RuntimeError, match="set sync.listen"):
            await b.start()
        await b.stop()

    asyncio.run(main())


def test_restarted_standby_with_state_proves_the_masters_session_and_gets_the_table(tmp_path):
    """The standby remembers the master's session from its last run: a replay could
    not be told from the live session, so it challenges; the master answers, walks
    its table again (the standby dropped the start of the first walk), all arrives."""
    async def main():
        pa, pb = free_port(), free_port()
        ta = FakeTables(MASTER_VIPS)
        now = time.monotonic_ns()
        for i in range(500):
            ta.add(CLIENT, 20000 + i, VIP, 80, 1 + i % 2, 0, now)
        a = make_agent(sync_cfg(pa, pb), "lb1", ta, FakeProg(), role="master", ring_mode="poll")
        tb = FakeTables(BACKUP_VIPS)
        b = make_agent(sync_cfg(pb, pa), "lb2", tb, FakeProg(), role="backup",
                       ring_mode="poll", state_dir=tmp_path)
        await a.start()
        await b.start()
        try:
            await until(lambda: len(tb.conns) == 500)
            await b.stop()
            tb2 = FakeTables(BACKUP_VIPS)
            b = make_agent(sync_cfg(pb, pa), "lb2", tb2, FakeProg(), role="backup",
                           ring_mode="poll", state_dir=tmp_path)
            await b.start()
            assert b.receiver.known_sessions() == {"lb1": a.sender.session}
            await until(lambda: len(tb2.conns) == 500)
            assert b.receiver.stats["sessions_proven"] == 1
            assert b.status()["rejected"].get("replay", 0) >= 1  # what came before the proof
            assert tb2.entry(CLIENT, 20000, VIP, 80)[:2] == (41, 6)
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(main())


def test_distinct_rows_survive_hash_collisions(monkeypatch):
    import numpy as np  # noqa: PLC0415

    rows = np.array([[1] * 8 + [5] * 3, [2] * 8 + [5] * 3, [1] * 8 + [5] * 3, [1] * 11],
                    np.uint8)
    uniq, inv = translate._distinct(rows)
    assert [uniq[i] for i in inv] == [bytes(r) for r in rows] and len(uniq) == 3
    monkeypatch.setattr(translate, "_MIX", np.uint64(0))  # hash = the last word only
    uniq, inv = translate._distinct(rows)  # rows 0 and 1 now collide: found and resolved
    assert [uniq[i] for i in inv] == [bytes(r) for r in rows] and len(uniq) == 3


# --------------------------------------------------------------------------- entry ages


@pytest.mark.parametrize("bulk", [False, True], ids=["per-entry", "numpy"])
def test_a_synced_flow_keeps_its_idle_time_across_clocks(bulk):
    """Issue 17: the standby's last-seen is its own now minus the age the master saw,
    whatever the two clocks read; not its install time."""
    from l4lb.sync.codec import FullChunk, decode, encode  # noqa: PLC0415

    a_now, b_now = 7_000 * 10**9, 123_456 * 10**9 + 321  # unrelated clocks
    ta = FakeTables(STANDBY_VIPS)
    idle_s = [0, 1, 3, 250]
    for i, idle in enumerate(idle_s):
        ta.add(CLIENT, 5000 + i, VIP, 53, 11, 4, a_now - idle * 10**9 - 4 * 10**8, proto=17)
    tr = Translator(ta)
    keys, vals, _ = next(ta.conn_batches())
    if bulk:
        from l4lb.sync.codec import SHAPE_LENS, PackedEntries  # noqa: PLC0415

        rows, skipped = tr.records_to_rows(keys, vals, a_now, 300 * 10**9)
        ents = PackedEntries(tuple((SHAPE_LENS[k][0], r.tobytes()) for k, r in rows.items()))
    else:
        ents, skipped = tr.records_to_entries(keys, vals, a_now, 300 * 10**9)
    assert not +skipped and sorted(e[6] for e in ents) == idle_s  # 0.4 s more rounds down
    key = b"k" * 32
    got = decode(encode(FullChunk("lb1", 1, 1, 0.0, 1, 0, True, ents), key), key).entries
    tb = FakeTables(STANDBY_VIPS)
    if bulk:
        k, v, skipped = Translator(tb).groups_to_records(got.groups, b_now)
    else:
        k, v, skipped = Translator(tb).entries_to_records(list(got), b_now)
    assert not +skipped
    seen = {key[2]: val[2] for key, val in records(k, v)}  # sport -> last_seen_ns
    assert seen == {5000 + i: b_now - idle * 10**9 for i, idle in enumerate(idle_s)}
    # A young clock (the standby booted recently) cannot go below 0: idle since boot.
    k, v, _ = Translator(tb).entries_to_records(list(got), 2 * 10**9)
    assert sorted(val[2] for _, val in records(k, v)) == [0, 0, 10**9, 2 * 10**9]


def test_age_helpers_round_and_clamp():
    s = 10**9
    assert translate.age_s(100 * s, 100 * s) == 0
    assert translate.age_s(100 * s, 100 * s + 5) == 0  # another CPU's newer last-seen
    assert translate.age_s(100 * s, 98 * s - s // 2) == 2  # 2.5 s rounds down: never older
    assert translate.age_s(10**6 * s, 0) == 0xFFFF  # saturates at MAX_AGE_S
    assert translate.seen_ns(100 * s, 3) == 97 * s
    assert translate.seen_ns(2 * s, 3) == 0
