#!/usr/bin/env python3
"""Connection-table sync: full-table transfer rate and new-flow lag (README: High availability, Benchmarks).

Two processes, each a balancer data plane (the XDP program compiled by bcc,
private maps) with its SyncAgent, talk over UDP on 127.0.0.1 with the
shipped sync defaults (1400-byte datagrams, batches of up to 200 entries or
5 ms). The standby numbers its VIP and reals differently, so every entry is
translated by real address as in production.

1. Bulk: the master's conn table holds N entries (1,000,000; --quick 100,000)
   before it becomes master; becoming master starts a full walk (BPF batch
   lookups). Reported: entries/s the master sent (walk start to its last
   chunk) and entries/s the standby installed (walk start to its last install;
   the standby's table is counted afterwards: entries lost, if any), and the
   CPU per entry on each side, by thread. --bulk-rounds walks (3; --quick 1):
   the later ones urgent walks into the emptied standby table; the round with
   the median install rate is reported (one walk is a second or two: a burst
   of other load on the machine moves it).
2. Lag: new flows at --rate per second (10,000) made by BPF_PROG_TEST_RUN of a
   TCP SYN and then an ACK through the master's XDP program (the data plane
   syncs a TCP flow once established: its second packet); each flow's lag runs
   from the test run of its ACK to the moment the standby's map update of its
   entry returned. Measured for each ring-buffer reading mode of the agent
   (the default, "epoll", gives lag_p50_ms/lag_p99_ms), and while a full walk
   of the N-entry table is running (the walk must not stall the stream): one
   a peer waits for (full pace) and a periodic one (its slower pace).

Run as root from the repository root:
    .venv/bin/python -m bench.sync --json bench/results/sync.json --md bench/results/sync.md
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import multiprocessing as mp
import os
import socket
import statistics
import struct
import sys
import time
from pathlib import Path

from bench import common

ROOT = Path(__file__).resolve().parent.parent

VIP = "10.200.0.100"
VPORT = 80
REALS = [f"10.200.1.{i}" for i in range(1, 9)]
LB_MAC = bytes.fromhex("029900001415")
CLIENT_MAC = bytes.fromhex("029900000a0b")
KEY = "bench-sync-key-0123456789abcdef"
BULK_SRC = int(ipaddress.IPv4Address("10.1.0.0"))  # bulk flows: 10.1.x.y, 60000 ports each
LAG_SRC = int(ipaddress.IPv4Address("10.64.0.0"))  # lag flows: one address each, port 40000
LAG_SPORT = 40000
MODES = ("epoll", "thread", "poll")


# --------------------------------------------------------------------------- data plane


def setup_node(conn_table_size: int, reverse_ids: bool):
    from l4lb.dataplane import loader, tables  # noqa: PLC0415

    opts = loader.BuildOptions(max_vips=16, max_reals=256, ring_max=65537,
                               conn_table_size=conn_table_size)
    prog = loader.compile_balancer(opts)
    t = tables.ServiceTables(prog, opts)
    t.set_config(tun_src4="10.200.0.21", flow_events=True, conn_timeout_s=300)
    # no admission guard: its default (10,000 new flows/s per CPU) is the lag runs'
    # own rate, and a generator catching up after a stall would lose flows to it
    loader.set_flow_guard(prog.map("flow_guard_cfg"), 0xFFFFFFFF)
    t.upsert_vip(VIP, VPORT, "tcp")
    if reverse_ids:  # the standby: other ids for the same reals
        t.upsert_vip("10.200.0.99", VPORT, "tcp")
        t.set_reals("10.200.0.99:80/tcp", [("10.200.2.1", "02:00:00:00:02:01", 100)])
    reals = [(a, "02:00:00:00:01:%02x" % (i + 1), 100) for i, a in enumerate(REALS)]
    t.set_reals(f"{VIP}:{VPORT}/tcp", list(reversed(reals)) if reverse_ids else reals)
    return prog, t


def fill_table(t, n: int) -> None:
    """n established flows to the VIP, spread over the reals, written in batches."""
    from l4lb.dataplane.tables import CONN_KEY, CONN_VAL, coarse_now_ns  # noqa: PLC0415

    ids = [r.real_id for r in t.vips[f"{VIP}:{VPORT}/tcp"].reals.values()]
    vip_id = t.vips[f"{VIP}:{VPORT}/tcp"].vip_id
    dst = ipaddress.IPv4Address(VIP).packed
    now = coarse_now_ns()
    step = 100_000
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        keys = b"".join(CONN_KEY.pack(struct.pack("!I", BULK_SRC + i // 60000), dst,
                                      1024 + i % 60000, VPORT, 6, 4) for i in range(lo, hi))
        vals = b"".join(CONN_VAL.pack(ids[i % len(ids)], vip_id, now) for i in range(lo, hi))
        t.install_conns(keys, vals)


def count_table(t) -> int:
    return sum(n for _, _, n in t.conn_batches(4096))


def empty_table(t) -> int:
    from l4lb.dataplane import bpfsys  # noqa: PLC0415
    from l4lb.dataplane.tables import CONN_KEY, CONN_VAL  # noqa: PLC0415

    return sum(n for _, _, n in bpfsys.lookup_batches(t.conns.map_fd, CONN_KEY.size,
                                                      CONN_VAL.size, 16384, delete=True))


def _csum(data: bytes) -> int:
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def syn_frame(src: bytes, flags: int = 0x02) -> bytes:
    """A TCP SYN (or, with flags 0x10, the handshake's ACK) from src to the VIP."""
    dst = ipaddress.IPv4Address(VIP).packed
    seq, ack = (1, 0) if flags == 0x02 else (2, 1)
    tcp = struct.pack("!HHIIBBHHH", LAG_SPORT, VPORT, seq, ack, 5 << 4, flags, 65535, 0, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0x4000, 64, 6, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    tcp = tcp[:16] + struct.pack("!H", _csum(src + dst + struct.pack("!BBH", 0, 6, 20) + tcp)) \
        + tcp[18:]
    return LB_MAC + CLIENT_MAC + b"\x08\x00" + ip + tcp


def sync_cfg(port: int, peer_port: int, max_datagram: int):
    from l4lb.config import Endpoint, SyncConfig  # noqa: PLC0415

    lo = ipaddress.IPv4Address("127.0.0.1")
    return SyncConfig(enabled=True, listen=Endpoint(lo, port), peers=(Endpoint(lo, peer_port),),
                      key=KEY, vrrp_instance="VI_1", full_sync_interval_s=0,
                      max_datagram=max_datagram)


# --------------------------------------------------------------------------- workers


class Worker:
    """A balancer node in a child process, driven by commands over a pipe."""

    def __init__(self, conn, role: str, port: int, peer_port: int, args: dict):
        self.conn, self.role, self.args = conn, role, args
        self.port, self.peer_port = port, peer_port
        self.agent = None
        self.installs: list[tuple[float, int]] = []  # (time, entries) per install
        self.lag_install: dict[bytes, float] | None = None
        self.lag_arrive: dict[bytes, float] = {}
        self.lag_handover: dict[bytes, float] = {}
        self.walk_done_at: float | None = None
        self.walks_seen = 0  # full walks completed, over every agent of this worker

    def hook(self, keys: bytes, vals: bytes, now: float) -> None:
        t = time.time()
        n = len(keys) // 40
        self.installs.append((t, n))
        if self.lag_install is not None:
            # lag flows: source 10.64.0.0/10 (bytes 0 and 1 of the key); found with numpy,
            # or a walk's installs (a million keys) would hold this thread in Python
            import numpy as np  # noqa: PLC0415

            rec = self.lag_install
            k = np.frombuffer(keys, np.uint8).reshape(-1, 40)
            for i in np.flatnonzero((k[:, 0] == 10) & (k[:, 1] & 0xC0 == 64)).tolist():
                rec.setdefault(keys[i * 40:i * 40 + 4], t)

    async def new_agent(self, mode: str, role: str) -> None:
        from l4lb.sync.agent import SyncAgent  # noqa: PLC0415

        if self.agent is not None:
            await self.agent.stop()
        kw = {}
        if self.args.get("full_rate"):
            kw["full_entries_per_s"] = self.args["full_rate"]
        if self.args.get("periodic_rate"):
            kw["periodic_entries_per_s"] = self.args["periodic_rate"]
        self.agent = SyncAgent(sync_cfg(self.port, self.peer_port, self.args["max_datagram"]),
                               self.role, self.tables, self.prog, role=role, ring_mode=mode,
                               install_hook=self.hook, state_dir=None, **kw)
        await self.agent.start()
        recv = self.agent.receiver
        on_datagram = recv.on_datagram

        def traced(data, addr, now):  # when a lag flow's message was read off the socket
            actions = on_datagram(data, addr, now)
            if self.lag_install is not None:
                t = time.time()
                transit = recv.stats["lag_s"]  # now - the batch's time on the master
                for a in actions:
                    if getattr(a, "full_id", 0) is not None:
                        continue
                    for e in a.entries:
                        if e[0][0] == 10 and e[0][1] & 0xC0 == 64:
                            self.lag_arrive.setdefault(e[0], (t, transit))
            return actions

        recv.on_datagram = traced
        on_events = self.agent._on_events

        def handed_over(raws):  # master: when a lag flow's event left the ring buffer
            if self.lag_install is not None:
                t = time.time()
                for raw in raws:
                    if raw[0] == 10 and raw[1] & 0xC0 == 64:
                        self.lag_handover.setdefault(raw[:4], t)
            on_events(raws)

        self.agent._on_events = handed_over

    async def watch_walks(self) -> None:
        last = 0
        self.max_stall = 0.0
        while True:
            done = self.agent.sender.stats["full_completed"] if self.agent else 0
            if done != last:  # (a new agent counts from 0 again)
                more = done - last if done > last else done
                last = done
                if more:
                    self.walks_seen += more
                    self.walk_done_at = time.time()
            t = time.monotonic()
            await asyncio.sleep(0.002)
            self.max_stall = max(self.max_stall, time.monotonic() - t - 0.002)

    async def serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        a = self.args
        self.prog, self.tables = await asyncio.to_thread(setup_node, a["table_size"],
                                                         self.role == "standby")
        if self.role == "master":
            await asyncio.to_thread(fill_table, self.tables, a["entries"])
        await self.new_agent("epoll", "backup")
        # as daemon.py does once started: start-up's objects (bcc, numpy, the tables)
        # out of the collector's reach, so full collections stay short
        gc.freeze()
        watcher = asyncio.create_task(self.watch_walks())
        self.conn.send(("ready", None))
        while True:
            cmd, arg = await asyncio.to_thread(self.conn.recv)
            if cmd == "stop":
                watcher.cancel()
                await self.agent.stop()
                self.conn.send(("ok", None))
                return
            try:
                self.conn.send(("ok", await self.command(cmd, arg)))
            except Exception as e:  # noqa: BLE001 - report it to the parent
                self.conn.send(("error", repr(e)))

    async def command(self, cmd: str, arg):
        ag = self.agent
        if cmd == "status":
            return ag.status()
        if cmd == "master":
            t = time.time()
            ag.set_role("master")
            return t
        if cmd == "walk_done":  # (time, count) of the last completed walk seen
            return self.walk_done_at, self.walks_seen, ag.sender.stats["full_entries"]
        if cmd == "installs":
            out, self.installs = self.installs, []
            return out
        if cmd == "count":
            return await asyncio.to_thread(count_table, self.tables)
        if cmd == "empty":  # the conn table emptied (between bulk rounds)
            return await asyncio.to_thread(empty_table, self.tables)
        if cmd == "agent":  # a new agent with another ring mode, master, table walked
            await self.new_agent(arg, "master")
            return None
        if cmd == "lag_record":
            self.lag_install = {} if arg else None
            self.lag_arrive = {}
            self.lag_handover = {}
            return None
        if cmd == "lag_handover":
            return self.lag_handover
        if cmd == "lag_installs":
            return self.lag_install
        if cmd == "lag_count":  # (cheap: the loop under test must not stall on the bench)
            return len(self.lag_install or ())
        if cmd == "lag_arrivals":
            return self.lag_arrive
        if cmd == "cpu":  # this process's CPU time so far, and the loop's worst stall
            t = os.times()
            stall, self.max_stall = self.max_stall, 0.0
            return t.user + t.system, stall
        if cmd == "prog_id":
            from l4lb.dataplane import bpfsys  # noqa: PLC0415

            return bpfsys.prog_id(self.prog.fd)
        if cmd == "full":  # arg: urgent (a peer waits for it) or periodic
            ag.request_full(urgent=arg)
            return time.time()
        if cmd == "lost_events":  # (new flows the data plane did not hand to sync)
            c = self.tables.global_counters()
            return c.get("flow_event_lost", 0), c.get("conn_guard_limited", 0)
        raise ValueError(cmd)


def worker_main(conn, role: str, port: int, peer_port: int, args: dict) -> None:
    try:
        if role == "gen":
            gen_main(conn)
        else:
            asyncio.run(Worker(conn, role, port, peer_port, args).serve())
    except Exception as e:  # noqa: BLE001
        conn.send(("error", repr(e)))
        raise


# The flow generator is a process of its own: in the master's process it would
# compete with the agent for the GIL, which the data plane in the kernel never does.
def gen_main(conn) -> None:
    """New flows by BPF_PROG_TEST_RUN of a TCP SYN and ACK through the master's program."""
    from l4lb.dataplane import bpfsys, testrun  # noqa: PLC0415

    conn.send(("ready", None))
    frames: list[bytes] = []
    while True:
        cmd, arg = conn.recv()
        if cmd == "stop":
            conn.send(("ok", None))
            return
        if cmd == "cpu":
            t = os.times()
            conn.send(("ok", (t.user + t.system, 0.0)))
            continue
        if cmd == "prepare":  # the frames first: building them takes a while
            first, count = arg
            frames = [(syn_frame(src), syn_frame(src, 0x10)) for src in
                      (struct.pack("!I", LAG_SRC + first + i) for i in range(count))]
            conn.send(("ok", None))
            continue
        pid, rate = arg
        count = len(frames)
        fd = bpfsys.fd_by_id(bpfsys.BPF_PROG_GET_FD_BY_ID, pid)
        sent = [0.0] * count
        t0 = time.time()
        for i in range(count):
            d = t0 + i / rate - time.time()
            if d > 0.0002:
                time.sleep(d)
            syn, ack = frames[i]
            ok = testrun.test_run(fd, syn).verdict == "TX"
            sent[i] = time.time()  # the flow is synced from its second packet on
            if not ok or testrun.test_run(fd, ack).verdict != "TX":
                conn.send(("error", "the balancer did not forward a SYN or its ACK"))
                break
        else:
            conn.send(("ok", {"t0": t0, "t1": time.time(), "sent": sent}))
        os.close(fd)


class Node:
    def __init__(self, ctx, role: str, port: int, peer_port: int, args: dict):
        self.role = role
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker_main, args=(child, role, port, peer_port, args),
                                name=f"sync-{role}", daemon=True)
        self.proc.start()

    def wait_ready(self, timeout: float = 600) -> None:
        if not self.conn.poll(timeout):
            raise RuntimeError(f"{self.role}: not ready after {timeout}s")
        kind, val = self.conn.recv()
        if kind != "ready":
            raise RuntimeError(f"{self.role}: {val}")

    def __call__(self, cmd: str, arg=None, timeout: float = 600):
        self.conn.send((cmd, arg))
        if not self.conn.poll(timeout):
            raise RuntimeError(f"{self.role}: {cmd} timed out")
        kind, val = self.conn.recv()
        if kind == "error":
            raise RuntimeError(f"{self.role}: {cmd}: {val}")
        return val

    def stop(self) -> None:
        try:
            self("stop", timeout=10)
        except (RuntimeError, OSError, EOFError):
            pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()


# --------------------------------------------------------------------------- phases


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(pred, timeout: float, what: str, interval: float = 0.05):
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > end:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(interval)


def settle(node: Node, quiet_s: float = 0.5, timeout: float = 120) -> list:
    """The node's installs, once none came for quiet_s."""
    got: list = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        new = node("installs")
        got += new
        if not new and got and time.time() - got[-1][0] >= quiet_s:
            return got
        time.sleep(0.1)
    return got


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))]


def lag_run(master: Node, standby: Node, gen_node: Node, first: int, count: int, rate: float,
            full: str | None) -> dict:
    """Flows at `rate`; with `full` ("urgent" or "periodic"), a full walk of that kind
    starts with them and only the flows made while it ran are counted."""
    standby("lag_record", True)
    master("lag_record", True)
    walks = master("walk_done")[1]
    c0 = master("cpu")[0], standby("cpu")[0]
    w0 = time.time()
    gen_node("prepare", (first, count))
    pid = master("prog_id")
    t_full = master("full", full == "urgent") if full else None
    gen = gen_node("generate", (pid, rate))
    wait(lambda: standby("lag_count") >= count or time.time() - gen["t1"] > 5,
         30, "lag installs", 0.1)
    window = (gen["t0"], gen["t1"])
    if full:
        wait(lambda: master("walk_done")[1] > walks, 300, "the full walk", 0.05)
        window = (t_full, master("walk_done")[0])
    cm, cs = master("cpu"), standby("cpu")
    wall = time.time() - w0
    got = standby("lag_installs")
    arrived = standby("lag_arrivals")
    handed = master("lag_handover")
    standby("lag_record", False)
    master("lag_record", False)
    settle(standby, 0.3)
    lags, made, arrive, transit, ring = [], 0, [], [], []
    for i, t_sent in enumerate(gen["sent"]):
        if not window[0] <= t_sent <= window[1]:
            continue
        made += 1
        src = struct.pack("!I", LAG_SRC + first + i)
        t_in = got.get(src)
        if t_in is not None:
            lags.append((t_in - t_sent) * 1000)
        if src in arrived:
            arrive.append((arrived[src][0] - t_sent) * 1000)
            transit.append(arrived[src][1] * 1000)
        if src in handed:
            ring.append((handed[src] - t_sent) * 1000)
    # handed: flows whose event reached the master's agent (the rest never left the
    # data plane); synced: installed on the standby
    out = {"flows": made, "rate": rate, "handed": len(ring), "synced": len(lags),
           "achieved_rate": round(count / (gen["t1"] - gen["t0"]), 1),
           "lag_p50_ms": round(pct(lags, 50), 3), "lag_p99_ms": round(pct(lags, 99), 3),
           "lag_max_ms": round(max(lags), 3) if lags else None,
           "lag_mean_ms": round(statistics.fmean(lags), 3) if lags else None,
           # the part up to the standby reading the message (the rest: translate, install)
           "arrive_p50_ms": round(pct(arrive, 50), 3), "arrive_p99_ms": round(pct(arrive, 99), 3),
           # ... of which from the master's batch (oldest entry) to the standby reading it
           "transit_p50_ms": round(pct(transit, 50), 3),
           "transit_p99_ms": round(pct(transit, 99), 3),
           # the ring buffer alone: second packet to the agent having the event
           "ring_p50_ms": round(pct(ring, 50), 3), "ring_p99_ms": round(pct(ring, 99), 3),
           "_lags": lags, "_ring": ring}
    if full:
        out["walk_s"] = round(window[1] - window[0], 3)
    # share of one CPU each side used, and its event loop's longest stall
    out["master_cpu"] = round((cm[0] - c0[0]) / wall, 2)
    out["standby_cpu"] = round((cs[0] - c0[1]) / wall, 2)
    out["master_loop_max_stall_ms"] = round(cm[1] * 1000, 1)
    out["standby_loop_max_stall_ms"] = round(cs[1] * 1000, 1)
    return out


def bulk_round(master: Node, standby: Node, entries: int, rnd: int) -> dict:
    """One full walk of the master's table into the standby's (empty) one: the first
    starts by becoming master, later ones as a walk a peer waits for."""
    standby("installs")
    cpu0 = {"master": master("cpu")[0], "standby": standby("cpu")[0]}
    parts0 = {"master": master("status")["cpu_s"], "standby": standby("status")["cpu_s"]}
    _, walks, sent0 = master("walk_done")
    t_start = master("full", True) if rnd else master("master")
    wait(lambda: master("walk_done")[1] > walks, 300, "full walk", 0.02)
    t_done, _, total = master("walk_done")
    sent = total - sent0  # (the sender counts the entries of all its walks)
    cpu_m = master("cpu")
    installs = settle(standby)
    installed = sum(n for _, n in installs)
    cpu_s = standby("cpu")
    in_table = standby("count")
    bulk = {"entries": entries, "sent": sent, "installed": installed,
            "in_standby_table": in_table, "lost": max(0, entries - in_table),
            "send_s": round(t_done - t_start, 3),
            "install_s": round(installs[-1][0] - t_start, 3) if installs else None}
    bulk["bulk_entries_per_s"] = round(sent / (t_done - t_start), 1)
    # CPU cost per entry: the walk and encoding on the master, decoding,
    # translating and installing on the standby
    bulk["master_cpu_us_per_entry"] = round((cpu_m[0] - cpu0["master"]) / sent * 1e6, 2)
    bulk["standby_cpu_us_per_entry"] = round(
        (cpu_s[0] - cpu0["standby"]) / max(installed, 1) * 1e6, 2)
    # ... by thread: the walk thread (BPF lookups, numpy) and the rest (the loop:
    # framing, signing, sending); the install thread's translating and writing
    # (the kernel's LRU updates: its sys time) and the rest (the loop: reading,
    # authenticating, decoding); sys = in the kernel
    pm, ps = master("status")["cpu_s"], standby("status")["cpu_s"]

    def us(d, d0, key, n):
        return round((d[key] - d0[key]) / max(n, 1) * 1e6, 3)

    walk = {k: us(pm, parts0["master"], f"walk_{k}", sent) for k in ("user", "sys")}
    send = {k: us(pm, parts0["master"], f"send_{k}", sent) for k in ("user", "sys")}
    bulk["master_us_per_entry_by_part"] = {
        "walk_thread": walk, "loop_send": send,
        "other": round(bulk["master_cpu_us_per_entry"] - sum(walk.values())
                       - sum(send.values()), 3)}
    inst = {f"{p}_{k}": us(ps, parts0["standby"], f"{p}_full_{k}", installed)
            for p in ("translate", "write") for k in ("user", "sys")}
    loop = {f"{p}_{k}": us(ps, parts0["standby"], f"{p}_{k}", installed)
            for p in ("read", "auth_full") for k in ("user", "sys")}
    bulk["standby_us_per_entry_by_part"] = {
        "install_thread": inst, "loop": loop,
        "other": round(bulk["standby_cpu_us_per_entry"] - sum(inst.values())
                       - sum(loop.values()), 3)}
    bulk["offload"] = {"gso": master("status")["offload"]["gso"],
                       "gro": standby("status")["offload"]["gro"]}
    bulk["master_loop_max_stall_ms"] = round(cpu_m[1] * 1000, 1)
    bulk["standby_loop_max_stall_ms"] = round(cpu_s[1] * 1000, 1)
    bulk["install_entries_per_s"] = round(installed / (installs[-1][0] - t_start), 1) \
        if installs else 0.0
    return bulk


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all CPUs, /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def pooled(rs: list[dict]) -> dict:
    """Runs of one mode together: percentiles over all their flows."""
    lags = [x for r in rs for x in r["_lags"]]
    ring = [x for r in rs for x in r["_ring"]]
    return {"flows": sum(r["flows"] for r in rs), "handed": sum(r["handed"] for r in rs),
            "synced": len(lags), "rounds": len(rs),
            "achieved_rate": min(r["achieved_rate"] for r in rs),
            "lag_p50_ms": round(pct(lags, 50), 3), "lag_p99_ms": round(pct(lags, 99), 3),
            "lag_max_ms": round(max(lags), 3) if lags else None,
            "ring_p50_ms": round(pct(ring, 50), 3), "ring_p99_ms": round(pct(ring, 99), 3),
            "per_round_lag_p99_ms": [r["lag_p99_ms"] for r in rs],
            "master_cpu": round(statistics.fmean(r["master_cpu"] for r in rs), 3)}


def strip(r: dict) -> dict:
    return {k: v for k, v in r.items() if not k.startswith("_")}


def run(args) -> dict:
    ctx = mp.get_context("spawn")
    pm, ps = free_port(), free_port()
    wargs = {"entries": args.entries, "table_size": args.table_size,
             "max_datagram": args.max_datagram, "full_rate": args.full_rate,
             "periodic_rate": args.periodic_rate}
    master = Node(ctx, "master", pm, ps, wargs)
    standby = Node(ctx, "standby", ps, pm, wargs)
    gen_node = Node(ctx, "gen", 0, 0, wargs)
    try:
        print(f"compiling two data planes, filling the master's table with {args.entries:,} "
              "entries ...", flush=True)
        standby.wait_ready()
        master.wait_ready()
        gen_node.wait_ready()
        ours0 = sum(n("cpu")[0] for n in (master, standby, gen_node))
        busy0, wall0 = machine_busy_s(), time.monotonic()
        wait(lambda: master("status")["peer_detail"][0]["state"] == "up"
             and standby("status")["peer_detail"][0]["state"] == "up", 10, "peers up")
        standby("installs")

        # ---- 1. bulk: becoming master walks the table to the standby; then again
        # (an urgent walk, as to a restarted peer) into an emptied standby table
        rounds = []
        for rnd in range(args.bulk_rounds):
            if rnd:
                standby("empty")
                settle(standby, 0.3, 10)
            rounds.append(b := bulk_round(master, standby, args.entries, rnd))
            print(f"bulk {rnd + 1}: {b['sent']:,} sent in {b['send_s']}s, {b['installed']:,} "
                  f"installed in {b['install_s']}s, standby table {b['in_standby_table']:,}",
                  flush=True)
        # the round with the median install rate stands for them all
        bulk = sorted(rounds, key=lambda b: b["install_entries_per_s"])[len(rounds) // 2]
        bulk["rounds"] = [{k: b[k] for k in ("bulk_entries_per_s", "install_entries_per_s",
                                             "master_cpu_us_per_entry",
                                             "standby_cpu_us_per_entry", "lost")}
                          for b in rounds]

        # ---- 2. lag while a full walk of the whole table runs: one a peer waits for
        # (full pace), and a periodic one
        n = int(args.rate * max(args.seconds, 1.0))
        first = 0
        during = {}
        for kind in ("urgent", "periodic"):
            during[kind] = d = lag_run(master, standby, gen_node, first,
                                       n * (3 if kind == "periodic" else 1), args.rate, kind)
            first += n * 3
            print(f"lag during a {kind} full walk ({d['walk_s']} s): p50 {d['lag_p50_ms']} ms, "
                  f"p99 {d['lag_p99_ms']} ms ({d['synced']}/{d['flows']})", flush=True)

        # ---- 3. steady-state lag per ring-buffer mode, modes interleaved over rounds
        runs: dict[str, list[dict]] = {m: [] for m in args.modes}
        for rnd in range(args.rounds):
            for mode in args.modes[rnd % len(args.modes):] + args.modes[:rnd % len(args.modes)]:
                master("agent", mode)  # becomes master: walks its table first
                wait(lambda: master("status")["full_walks"]["sent_completed"] >= 1, 300,
                     "walk of the new agent", 0.05)
                settle(standby)
                r = lag_run(master, standby, gen_node, first, n, args.rate, full=None)
                runs[mode].append(r)
                first += n
                print(f"round {rnd + 1}, ring mode {mode}: lag p50 {r['lag_p50_ms']} ms, p99 "
                      f"{r['lag_p99_ms']} ms; ring p50 {r['ring_p50_ms']} ms, p99 "
                      f"{r['ring_p99_ms']} ms ({r['synced']}/{n}), master CPU "
                      f"{r['master_cpu']}", flush=True)
        modes = {m: pooled(rs) for m, rs in runs.items()}
        lost_events, guard_limited = master("lost_events")
        s_status = standby("status")
        ours = sum(n("cpu")[0] for n in (master, standby, gen_node)) - ours0
        wall = time.monotonic() - wall0
        other = round(max(0.0, machine_busy_s() - busy0 - ours) / wall, 2)
    finally:
        master.stop()
        standby.stop()
        gen_node.stop()
    main = modes.get("epoll") or next(iter(modes.values()))
    return {
        **common.run_meta(args.quick),
        "bulk_entries_per_s": bulk["bulk_entries_per_s"],
        "install_entries_per_s": bulk["install_entries_per_s"],
        "lag_p50_ms": main["lag_p50_ms"],
        "lag_p99_ms": main["lag_p99_ms"],
        "lag_during_full_p50_ms": during["urgent"]["lag_p50_ms"],
        "lag_during_full_p99_ms": during["urgent"]["lag_p99_ms"],
        "lag_during_periodic_p50_ms": during["periodic"]["lag_p50_ms"],
        "lag_during_periodic_p99_ms": during["periodic"]["lag_p99_ms"],
        "entries": args.entries,
        "rate": args.rate,
        "seconds": args.seconds,
        "max_datagram": args.max_datagram,
        # the agent's full-walk pacing (entries/s): walks a peer waits for, periodic ones
        "pace_full_entries_per_s": args.full_rate or _agent_default("full_entries_per_s"),
        "pace_periodic_entries_per_s": (args.periodic_rate
                                        or _agent_default("periodic_entries_per_s")),
        "bulk": bulk,
        "lag_during_full": strip(during["urgent"]),
        "lag_during_periodic": strip(during["periodic"]),
        "ring_modes": modes,
        "flow_events_lost": lost_events,
        "flows_guard_limited": guard_limited,
        "standby_rejected": s_status.get("rejected"),
        "cpus": os.cpu_count(),
        # CPUs' worth kept busy by everything else on the machine during the run
        "other_cpus_busy": other,
        "loadavg_before": LOAD_BEFORE,
    }


LOAD_BEFORE: list[float] = []


def _agent_default(name: str) -> float:
    import inspect  # noqa: PLC0415

    from l4lb.sync.agent import SyncAgent  # noqa: PLC0415

    return inspect.signature(SyncAgent).parameters[name].default


def render(r: dict) -> tuple[str, str]:
    b = r["bulk"]
    mw, sp = b["master_us_per_entry_by_part"], b["standby_us_per_entry_by_part"]
    it = sp["install_thread"]
    lp = sp.get("loop", {})

    def tot(d: dict, part: str) -> float:
        return round(d.get(f"{part}_user", 0.0) + d.get(f"{part}_sys", 0.0), 3)

    send = mw.get("loop_send", {})
    off = b.get("offload", {})
    rows = [["full walk sent (entries/s)", f"{r['bulk_entries_per_s']:,.0f}",
             f"{b['sent']:,} in {b['send_s']} s; master CPU "
             f"{b['master_cpu_us_per_entry']} us/entry: walk thread {mw['walk_thread']['sys']} "
             f"kernel (BPF lookups) + {mw['walk_thread']['user']} user (to wire records), "
             f"loop framing, signing, sending {round(sum(send.values()), 3)}, "
             f"the rest {mw['other']}; UDP GSO {'on' if off.get('gso') else 'off'}"],
            ["full walk installed (entries/s)", f"{r['install_entries_per_s']:,.0f}",
             f"{b['installed']:,} in {b['install_s']} s, lost {b['lost']:,}; standby CPU "
             f"{b['standby_cpu_us_per_entry']} us/entry: install thread writing "
             f"{tot(it, 'write')} (BPF updates; {it['write_sys']} seen in the kernel); loop "
             f"reading {tot(lp, 'read')}, authenticating and decoding {tot(lp, 'auth_full')}, "
             f"translating {tot(it, 'translate')}; the rest {sp['other']}; "
             f"UDP GRO {'on' if off.get('gro') else 'off'}; datagrams the standby dropped "
             f"(backlog full) over the whole run: "
             f"{(r.get('standby_rejected') or {}).get('backlog_full', 0):,}"]]
    for mode, m in r["ring_modes"].items():
        rows.append([f"lag p50 / p99 (ms), ring {mode}",
                     f"{m['lag_p50_ms']:.2f} / {m['lag_p99_ms']:.2f}",
                     f"{m['synced']:,}/{m['flows']:,} flows at {m['achieved_rate']:,.0f}/s "
                     f"({m['rounds']} runs), max {m['lag_max_ms']:.1f} ms; ring buffer alone "
                     f"p50 {m['ring_p50_ms']:.2f} / p99 {m['ring_p99_ms']:.2f} ms; master "
                     f"CPU {m['master_cpu']:.2f}"])
    for key, what in (("lag_during_full", "a full walk"),
                      ("lag_during_periodic", "a periodic walk")):
        d = r[key]
        rows.append([f"lag p50 / p99 (ms), during {what}",
                     f"{d['lag_p50_ms']:.2f} / {d['lag_p99_ms']:.2f}",
                     f"{d['synced']:,}/{d['flows']:,} flows made in the {d['walk_s']} s walk, "
                     f"max {d['lag_max_ms'] or 0:.1f} ms"])
    if len(b.get("rounds", ())) > 1:
        rows.insert(2, ["full walks, each round (sent / installed, entries/s)", "",
                        "; ".join(f"{x['bulk_entries_per_s']:,.0f} / {x['install_entries_per_s']:,.0f}"
                                  for x in b["rounds"]) + " (the median install rate's round "
                        "above)"])
    heads = ["figure", "measured", "detail"]
    text = common.text_table(heads, rows, right={1})
    md = ["# Connection-table sync", "", f"Command: `{r['command']}`", "",
          common.markdown_table(heads, rows, right={1}), "",
          f"{r['entries']:,}-entry table, new flows at {r['rate']:,.0f}/s for {r['seconds']} s "
          f"per run, {r['max_datagram']}-byte datagrams, two processes on 127.0.0.1, "
          f"{r['cpus']} CPUs (load average {r['loadavg_before']} before the run; other "
          f"processes kept {r['other_cpus_busy']} CPUs busy during it), kernel "
          f"{r['kernel']}, {r['timestamp']}. Lag: a flow's second packet (BPF_PROG_TEST_RUN "
          "on the master) to its entry written on the standby. lag_p50_ms/lag_p99_ms are "
          "the default ring mode's (epoll). Full walks a peer waits for (it appeared, "
          f"restarted, turned backup) are paced at {r['pace_full_entries_per_s']:,.0f} "
          "entries/s (here the CPU limits them first), periodic ones at "
          f"{r['pace_periodic_entries_per_s']:,.0f}/s."]
    return text, "\n".join(md)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    ap.add_argument("--md", metavar="PATH", help="write the table and command as Markdown")
    ap.add_argument("--quick", action="store_true", help="100,000 entries, shorter lag runs")
    ap.add_argument("--entries", type=int, help="conn entries for the bulk transfer")
    ap.add_argument("--rate", type=float, default=10_000, help="new flows per second")
    ap.add_argument("--seconds", type=float, help="length of each lag run")
    ap.add_argument("--modes", default=",".join(MODES), help="ring-buffer modes to compare")
    ap.add_argument("--rounds", type=int, help="rounds of the mode comparison (3; quick 1)")
    ap.add_argument("--bulk-rounds", type=int, help="full walks into an empty standby table, "
                    "the median one reported (3; quick 1)")
    ap.add_argument("--max-datagram", type=int, default=1400)
    ap.add_argument("--full-rate", type=float, help="pace of the walks a peer waits for, "
                    "entries/s (default: the agent's)")
    ap.add_argument("--periodic-rate", type=float, help="pace of the periodic walks, "
                    "entries/s (default: the agent's)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("python -m bench.sync needs root (BPF)", file=sys.stderr)
        return 2
    args.entries = args.entries or (100_000 if args.quick else 1_000_000)
    args.seconds = args.seconds or (2.0 if args.quick else 5.0)
    args.modes = [m for m in args.modes.split(",") if m]
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.bulk_rounds = args.bulk_rounds or (1 if args.quick else 3)
    args.table_size = 1 << max(17, (2 * args.entries).bit_length())
    LOAD_BEFORE[:] = [round(x, 2) for x in os.getloadavg()]
    r = run(args)
    text, md = render(r)
    print()
    print(text)
    if args.json:
        common.write_json(args.json, r)
    if args.md:
        common.write_text(args.md, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
