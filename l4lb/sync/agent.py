"""Conn-table sync agent: the asyncio layer around the sans-I/O Sender/Receiver.

The master streams the flows its data plane creates to the standby, so that
established connections survive a takeover (README: High availability)::

    XDP new flow -> ring buffer "flow_events" -> agent (batched) -> UDP -> peer
    periodic / on-demand full walk of the conn table (BPF batch lookups) -> UDP -> peer
    peer: authenticate (HMAC), translate real addresses to local real ids, install

Roles follow VRRP (``set_role``, from the daemon's ``_on_vrrp_state``): the
master sends, the backup receives; both send hello and heartbeats, so each side
sees the other come, go and restart. A master sends a full walk when it becomes
master, when a peer appears or restarts (new session), when a peer turns
backup (failback), and every ``full_sync_interval_s``. The walk runs in a
thread (_WalkFeed): BPF batch lookups, translation to wire records (numpy, no
Python object per entry) and cutting into datagram-sized chunks; the loop only
frames, signs and sends ready chunks, paced and always after the pending
incremental batch, so it never stalls the stream of new flows: a walk a peer
is waiting for goes at ``full_entries_per_s``, the periodic one (a repair) at
``periodic_entries_per_s``, so that it costs little CPU on either side. The
standby installs new flows before full-walk entries that arrived earlier:
those wait raw in a bounded backlog, are authenticated a bounded number of
bytes per loop turn and translated (numpy again, on the packed records as
they came) a slice at a time, and installed in the install thread (the kernel's
LRU updates, the walk's bottleneck, ~0.5-0.85 us an entry: that thread only writes).
Where the kernel has them, runs of equal-sized datagrams go out in one sendmsg
(UDP GSO) and come in with one recvmsg (UDP GRO); each is still a datagram of
its own on the wire and is authenticated on its own.

Who is heard. Only datagrams from the configured peers' addresses, checked
before any MAC work; a peer's session is adopted only once proven live by a
challenge round trip, on first contact too (machine.py: sessions), so a
recorded datagram replayed later installs nothing, even to a node that lost
its state. Our own session and the peers' highest are kept in the node's
state dir (STATE_FILE).
The socket is bound to this node's own address, never a VIP.

Installing. An entry names its VIP by address/port/protocol (falling back to
the port-0 VIP of the address, like the data plane) and its real by address;
the receiver uses its own VIP and real ids. An entry for a VIP or a real this
node does not have is counted (``skipped``, by reason) and left out. A backup
overwrites (the master's choice wins over whatever it held for that 5-tuple); a
master only fills in flows it does not know (BPF_NOEXIST), so a late message
from the old master never moves a flow the new master has already placed.
An entry carries its age (seconds since the sender's data plane last saw the
flow); installed, its last-seen is this node's CLOCK_MONOTONIC_COARSE now minus
that age, so a UDP flow's idle timeout runs on from the old master's last packet.
Walks skip entries idle for longer than the data plane's conn timeout, so a
standby never brings a dead flow back to life.

Why UDP. Every message is one self-contained, authenticated datagram below the
path MTU (``max_datagram``, 1400 by default) carrying a sequence number, so
UDP gives framing for free and losses are visible (sequence gaps, ``lost``)
and repaired by the next full walk. TCP would buy nothing that matters here
and cost what does: one lost segment holds back every later flow (head-of-line
blocking, lag spikes exactly when the network is stressed); a dead or hung
standby would back pressure into the master's event reader or need buffering,
reconnect and timeout logic; and a restart or a failover would race connection
setup with the traffic it is supposed to protect, while with datagrams the
sender never waits on the peer and a restarted peer is simply a new session.
The price of UDP is no congestion control: the full walk is paced, sockets get
large buffers, and the stream itself is bounded by the flow rate. (LVS's sync
daemon and conntrackd made the same choice.)

The ring buffer is read on the event loop by default (ring.py: ``RING_MODES``).
Beside this file: ring.py (the new-flow ring buffer consumer), walk.py (the
full walk's thread), translate.py (wire entries <-> conn-table records),
metrics.py (status() and the Prometheus families).
"""

from __future__ import annotations

import asyncio
import ctypes as ct
import functools
import ipaddress
import json
import logging
import os
import resource
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from l4lb import netutil
from l4lb.dataplane.tables import CONN_KEY, coarse_now_ns
from l4lb.sync.codec import MAX_DATAGRAM, PREFIX_LEN, SHAPE_LENS, PackedEntries, entry_capacity
from l4lb.sync.machine import (
    Backlog,
    InstallEntries,
    PeerDown,
    PeerRole,
    PeerUp,
    Receiver,
    SendChallenge,
    Sender,
    SendResponse,
    new_session,
)
from l4lb.sync.metrics import _fmt_addr
from l4lb.sync.metrics import metrics as _metrics
from l4lb.sync.metrics import status as _status
from l4lb.sync.ring import RING_MODES, RingConsumer
from l4lb.sync.translate import NUMPY_MIN, Translator, decode_events
from l4lb.sync.udp import DatagramSocket
from l4lb.sync.walk import _WalkFeed

log = logging.getLogger("l4lb.sync")

__all__ = ["SyncAgent", "Translator", "decode_events", "RING_MODES", "SKIP_REASONS"]

#: Reasons an entry received from the peer is not installed.
SKIP_REASONS = ("unknown_vip", "unknown_real", "local_entry")

WALK_BATCH = 16384  # conn entries per BPF_MAP_LOOKUP_BATCH call (walk thread; numpy per call)
RECV_BURST = 256  # datagrams read per wake-up before installing
RECV_TURN_BYTES = 256 << 10  # ... and at most this many bytes (MAC work per loop turn)
FULL_TURN_BYTES = 128 << 10  # set-aside full-walk datagrams authenticated per loop turn
DEFER_MAX_BYTES = 16 << 20  # full-walk datagrams set aside (unauthenticated), at most
INSTALL_AHEAD = 2  # full-walk install slices queued for the install thread, at most
REPLAY_WINDOW = 1 << 17  # messages: covers the full-walk chunks set aside
# The first body bytes of a full-walk chunk: msgpack fixarray(9), kind 2 (codec.py)
_FULL_HEAD = bytes((0x99, 2))
SOCK_BUF = 8 << 20  # socket buffers: a full walk's burst and a slow loop tick
# Full walks a peer waits for, entries/s: about what a standby installs. Its
# install thread costs ~0.7-1.0 us of CPU an entry (most of it the kernel's LRU
# update), its loop ~0.3 us (reading, authenticating, decoding); sharing 2 CPUs
# with the master (bench/sync.py) it installs ~0.8-1.0M/s. A faster walk waits in
# the standby's socket buffer (SOCK_BUF) and backlog (DEFER_MAX_BYTES), beyond
# which entries are lost (counted as backlog_full) until the next walk. Before UDP
# GRO, one bench run's ~12 walks lost 8,142 datagrams at this pace and 21,772 at
# 1.2M/s; with it, none and 285 (the socket holds coalesced runs, reading is cheaper).
FULL_PACE = 1_000_000.0
# UDP GSO/GRO: udp.py (a run of datagrams a system call).
READ_TURN_BYTES = 1 << 20  # bytes read off the socket per loop turn, at most
WALK_LOOP_ENTRIES = 4000  # full-walk entries framed and sent per loop tick (bounds the stall)
STATE_FILE = "sync.json"  # in the node's state dir: our last session, peers' highest
DEFAULT_STATE_ROOT = "/run/l4lb"  # daemon.STATE_ROOT: /run/l4lb/<node>/


# Where a walk's CPU goes, by thread: the walk thread; the loop framing, signing and
# sending (send), reading datagrams (read), authenticating and decoding set-aside
# full-walk chunks (auth_full); the install threads translating and writing.
CPU_PARTS = ("walk", "send", "read", "auth_full", "translate_full", "write_full",
             "translate_new", "write_new")


def _thread_cpu() -> tuple[float, float]:
    """This thread's CPU seconds so far: (total, of which in the kernel).

    The total is the scheduler's exact count (CLOCK_THREAD_CPUTIME_ID); getrusage's
    split is only brought up to date at ticks and context switches, so over a
    section shorter than a tick it is the kernel share, not the amount."""
    r = resource.getrusage(resource.RUSAGE_THREAD)
    return time.thread_time(), r.ru_stime


def _loop_cpu() -> tuple[float, float]:
    """_thread_cpu for the loop's short, frequent sections: the total alone (a
    getrusage a turn costs more than it tells; they are user time)."""
    return time.thread_time(), 0.0


# =========================================================================== local address


def local_address(peer, avoid: Iterable = ()) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address to bind sync to when ``listen`` names none: this node's own
    address (netutil.own_address: never a VIP) on the interface the kernel
    routes ``peer`` through."""
    ip = ipaddress.ip_address(peer)
    _gw, oif = netutil.next_hop(ip)
    ifname = socket.if_indextoname(oif)
    got = netutil.own_address([ifname], ip.version, avoid)
    if got is None:
        raise RuntimeError(f"no address of this node on {ifname} (towards {ip}); "
                           "set sync.listen to this node's address")
    return ipaddress.ip_address(got)


# =========================================================================== state file


def _load_state(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("sync: ignoring %s: %s", path, e)
        return {}
    return data if isinstance(data, dict) else {}


_state_lock = threading.Lock()


def _save_state(path: Path | None, data: dict) -> None:
    """Write atomically (a reader never sees half a file); runs in a thread."""
    if path is None:
        return
    with _state_lock:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data))
            os.replace(tmp, path)
        except OSError as e:
            log.warning("sync: cannot save %s: %s", path, e)


# =========================================================================== agent


class SyncAgent:
    """One node's sync: a UDP socket on ``cfg.listen``, datagrams to ``cfg.peers``.

    ``role``: the starting role ("backup" while VRRP decides; "master" without
    VRRP). ``full_entries_per_s`` paces the full walks a peer waits for (it
    appeared, restarted or turned backup; this node became master),
    ``periodic_entries_per_s`` the periodic ones. ``clock`` is wall time on
    both nodes (the lag is measured across them). ``install_hook`` (tests,
    benches) is called with ``(keys, values, now)`` after each install, in the
    install thread. ``state_dir`` (default /run/l4lb/<node>; None: keep
    nothing) holds STATE_FILE: this node's last session number and the
    highest session accepted from each peer (machine.py: sessions).

    Only datagrams from the configured peers' addresses are heard (checked
    before any MAC work); the socket is bound to ``listen``, or when that is a
    wildcard, to this node's own address towards the first peer (never a VIP,
    so nothing the peer hears from us comes from an address that moves).
    """

    def __init__(self, cfg, node_name: str, tables, prog, *, role: str = "backup",
                 ring_mode: str = "epoll", full_entries_per_s: float = FULL_PACE,
                 periodic_entries_per_s: float = 50_000.0,
                 clock: Callable[[], float] = time.time,
                 install_hook: Callable[[bytes, bytes, float], None] | None = None,
                 state_dir: str | Path | None | type(...) = ...) -> None:
        if ring_mode not in RING_MODES:
            raise ValueError(f"ring_mode must be one of {RING_MODES}")
        if cfg.listen is None or not cfg.peers:
            raise ValueError("sync needs listen and peers")
        self.cfg = cfg
        self.node_name = node_name
        self.tables = tables
        self.prog = prog
        self.ring_mode = ring_mode
        self.install_hook = install_hook
        self._clock = clock
        key = cfg.load_key()
        now = clock()
        cap = entry_capacity(cfg.max_datagram, node_name, (4, 4, 4))
        self.sender = Sender(
            node_name, key, now,
            max_batch_entries=cfg.batch_max,
            max_delay_s=cfg.batch_delay_ms / 1000.0,
            full_interval_s=cfg.full_sync_interval_s or None,
            max_payload=cfg.max_datagram,
            full_chunks_per_poll=max(1, WALK_LOOP_ENTRIES // cap),
            full_rate=max(1.0, full_entries_per_s / cap),
            role=role,
        )  # fmt: skip
        self._rate_urgent = max(1.0, full_entries_per_s / cap)  # chunks/s
        self._rate_periodic = max(1.0, periodic_entries_per_s / cap)
        self._urgent = role == "master"  # the walk due now is one a peer waits for
        # full-walk entries per datagram, by address shape (len of src, dst, real)
        self._caps = {lens: entry_capacity(cfg.max_datagram, node_name, lens)
                      for lens in SHAPE_LENS}
        self._key = key
        self.peers = [(str(p.host), p.port) for p in cfg.peers]
        self.receiver = self._new_receiver({})
        if state_dir is ...:
            state_dir = Path(DEFAULT_STATE_ROOT) / node_name
        self.state_path = None if state_dir is None else Path(state_dir) / STATE_FILE
        self._saved_sessions: dict[str, int] = {}
        self.translator = Translator(tables)
        # (keys the threads write are there from the start: status() may iterate)
        self.counters: Counter = Counter(installed=0, install_errors=0)
        self.skipped: Counter = Counter({r: 0 for r in SKIP_REASONS})
        self.walk_skipped: Counter = Counter(idle=0, unknown_real=0, bad=0)
        # CPU seconds of the walk thread and of the install threads (translating,
        # then writing to the conn table), user and system: where a walk's time goes
        self.cpu_s: dict[str, float] = {f"{w}_{k}": 0.0 for w in CPU_PARTS
                                        for k in ("user", "sys")}
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        # (a lambda: bench/sync.py wraps _on_events on the instance)
        self._ring = RingConsumer(prog, ring_mode, lambda raws: self._on_events(raws),
                                  self._ring_error)
        self._io: DatagramSocket | None = None  # self._sock's datagrams (udp.py)
        self._deferred = Backlog(DEFER_MAX_BYTES, FULL_TURN_BYTES)
        self._full_handle: asyncio.Handle | None = None
        # Installs run off the loop, new flows and full-walk slices each in their own
        # thread, so that a new flow never waits behind a slice of a walk.
        self._pools: dict[bool, ThreadPoolExecutor] = {}  # full? -> its install thread
        self._count_lock = threading.Lock()  # counters both install threads update
        self._full_inflight = 0  # full-walk install slices handed to the pool
        self.bound: tuple | None = None  # the socket's address
        self._conn_timeout_ns: int | None = None
        self.started_at: float | None = None

    def _new_receiver(self, known: dict[str, int]) -> Receiver:
        return Receiver(self._key, None, MAX_DATAGRAM, REPLAY_WINDOW, node_id=self.node_name,
                        peer_addrs=self.peers, known_sessions=known)

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._wake = asyncio.Event()
        # A session provably newer than the last run's (machine.new_session); the
        # peers' sessions we accepted then, so that a restart reopens no replay.
        state = await asyncio.to_thread(_load_state, self.state_path)
        last = state.get("session")
        last = last if type(last) is int and 0 <= last < (1 << 64) - 1 else None
        self.sender.session = new_session(last, time.time_ns())
        peers = state.get("peers")
        known = {n: v for n, v in peers.items() if type(v) is int} \
            if isinstance(peers, dict) else {}
        self._saved_sessions = dict(known)
        self.receiver = self._new_receiver(known)
        await asyncio.to_thread(_save_state, self.state_path,
                                {"session": self.sender.session, "peers": known})
        self._pools = {full: ThreadPoolExecutor(1, thread_name_prefix=f"sync-install-{name}")
                       for full, name in ((False, "new"), (True, "full"))}
        ep = self.cfg.listen
        host = ep.host
        if host.is_unspecified:  # never the wildcard: a VIP could become our source
            exclude = [vs.address for vs in list(self.tables.vips.values())]
            try:
                host = await asyncio.to_thread(local_address, self.cfg.peers[0].host, exclude)
            except Exception as e:  # noqa: BLE001 - netlink said no: say what to set
                raise RuntimeError(f"sync.listen {ep}: {e}") from None
        fam = socket.AF_INET6 if host.version == 6 else socket.AF_INET
        sock = socket.socket(fam, socket.SOCK_DGRAM)
        try:
            if fam == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            for force, plain in ((getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF),
                                 (getattr(socket, "SO_SNDBUFFORCE", 32), socket.SO_SNDBUF)):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, force, SOCK_BUF)
                except OSError:  # not root: as much as net.core.*mem_max allows
                    sock.setsockopt(socket.SOL_SOCKET, plain, SOCK_BUF)
            sock.bind((str(host), ep.port))
        except OSError as e:
            sock.close()
            raise RuntimeError(f"sync.listen {ep}: cannot bind {host} ({e.strerror})") from None
        sock.setblocking(False)
        self._sock = sock
        self._io = DatagramSocket(sock, self.counters)
        self.bound = sock.getsockname()[:2]
        loop.add_reader(sock.fileno(), self._on_readable)
        self._ring.start(loop)
        self.started_at = self._clock()
        self._task = loop.create_task(self._run(), name="sync")
        log.info("sync: %s on %s, peers %s, role %s, ring %s, session %d", self.node_name,
                 _fmt_addr(self.bound), ", ".join(str(p) for p in self.cfg.peers),
                 self.sender.role, self.ring_mode, self.sender.session)

    async def stop(self) -> None:
        """Send what is pending (a stopping master's last flows), then close."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - stopping anyway
                pass
            self._task = None
        self._ring.drain()
        try:
            self._send(self.sender.flush(self._clock()))
        except Exception as e:  # noqa: BLE001
            log.warning("sync: final flush failed: %s", e)
        await self._ring.stop()
        self.sender.set_role("backup", self._clock())  # ends a walk (and its thread)
        if self._full_handle is not None:
            self._full_handle.cancel()
            self._full_handle = None
        if self._sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = self._io = None
        self._deferred.clear()
        pools, self._pools = self._pools, {}
        for pool in pools.values():  # let queued installs finish
            await asyncio.to_thread(pool.shutdown, True)

    # ----------------------------------------------------------------- role

    @property
    def role(self) -> str:
        return self.sender.role

    def set_role(self, role: str) -> None:
        """"master" or "backup" (from VRRP). Safe to call from any thread."""
        if role not in ("master", "backup"):
            raise ValueError(f"sync role must be master or backup, not {role!r}")
        loop = self._loop
        if loop is not None and threading.get_ident() != self._loop_thread:
            loop.call_soon_threadsafe(self.set_role, role)
            return
        old = self.sender.role
        if role == old:
            return
        # (Flows the data plane created before becoming master are in the full
        # walk that becoming master starts.)
        self._urgent = role == "master"
        if old == "master":
            # The flows this node placed up to now go to the new master first.
            self._ring.drain()
            self._send(self.sender.flush(self._clock()))
        self.sender.set_role(role, self._clock())
        self.counters["role_changes"] += 1
        log.info("sync: %s -> %s", old, role)
        self._kick()

    def request_full(self, urgent: bool = True) -> None:
        """Walk the whole table to the peer (again) now; ``urgent``: at the fast pace."""
        self.sender.request_full()
        self._urgent = self._urgent or urgent
        self._kick()

    def _kick(self) -> None:
        if self._wake is not None:
            self._wake.set()

    # ----------------------------------------------------------------- main loop

    async def _run(self) -> None:
        wake = self._wake
        assert wake is not None
        while True:
            wake.clear()
            now = self._clock()
            try:
                self._tick(now)
                deadline = self.sender.next_deadline(now)
                rd = self.receiver.next_deadline(now)
                if rd is not None:
                    deadline = min(deadline, rd)
            except Exception:  # noqa: BLE001 - keep syncing; the log says what broke
                log.exception("sync: tick failed")
                deadline = now + 0.5
            timeout = deadline - self._clock()
            if timeout <= 0:
                await asyncio.sleep(0)
                continue
            try:
                async with asyncio.timeout(min(timeout, 1.0)):
                    await wake.wait()
            except TimeoutError:
                pass

    def _tick(self, now: float) -> None:
        s = self.sender
        if s.full_due(now):
            s.full_rate = self._rate_urgent if self._urgent else self._rate_periodic
            self._urgent = False
            fid = s.start_full(self._walk_feed(), now, packed=True)
            log.debug("sync: full walk %d started", fid)
        start = _loop_cpu()
        try:
            self._send(s.poll(now))
        finally:
            self._add_cpu("send", start, _loop_cpu)
        for action in self.receiver.poll(now):
            self._on_action(action, now)

    # ----------------------------------------------------------------- sending

    @property
    def gso(self) -> bool:
        """Sending runs of datagrams in one call (UDP_SEGMENT)."""
        return self._io is not None and self._io.gso

    @property
    def gro(self) -> bool:
        """Receiving them so (UDP_GRO)."""
        return self._io is not None and self._io.gro

    def _send(self, datagrams: list[bytes]) -> None:
        if self._io is not None:
            self._io.send(datagrams, self.peers)

    def _conn_timeout(self) -> int:
        """The data plane's idle timeout (ns), read from its config map."""
        if self._conn_timeout_ns is None:
            try:
                self._conn_timeout_ns = int(self.prog.map("config")[ct.c_uint32(0)]
                                            .conn_timeout_ns)
            except Exception:  # noqa: BLE001 - no config map (fakes): no filter
                self._conn_timeout_ns = 0
        return self._conn_timeout_ns

    def _walk_feed(self) -> _WalkFeed:
        """A full walk of the conn table, made in a thread (see _WalkFeed)."""
        loop = self._loop

        def wake() -> None:
            if loop is not None:
                try:
                    loop.call_soon_threadsafe(self._kick)
                except RuntimeError:  # the loop is closed
                    pass

        return _WalkFeed(self._produce_walk, wake)

    def _add_cpu(self, what: str, start: tuple[float, float], clock=None) -> None:
        """Add this thread's CPU seconds since ``start`` to cpu_s, split into user
        and system (in the kernel) as getrusage saw them (``clock``: _loop_cpu)."""
        total, sys_ = (clock or _thread_cpu)()
        spent = max(total - start[0], 0.0)
        in_kernel = min(max(sys_ - start[1], 0.0), spent)
        with self._count_lock:
            self.cpu_s[f"{what}_user"] += spent - in_kernel
            self.cpu_s[f"{what}_sys"] += in_kernel

    def _produce_walk(self, feed: _WalkFeed) -> None:
        start = _thread_cpu()
        try:
            self._walk_table(feed)
        finally:
            self._add_cpu("walk", start)

    def _walk_table(self, feed: _WalkFeed) -> None:
        """(walk thread) The conn table in BPF batches, translated to wire records
        with numpy and cut into datagram-sized chunks (no Python object per entry)."""
        tr = self.translator
        tr.maybe_refresh()
        self._conn_timeout_ns = None
        timeout_ns = self._conn_timeout()
        carry: dict[tuple, np.ndarray] = {}  # per shape: records short of a whole chunk
        ready: list = []  # chunks of this BPF batch, queued together; the very last
        # one is held back until we know it is the last

        def emit(lens: tuple, rows: np.ndarray) -> None:
            code, size = SHAPE_LENS[lens]
            blob = rows.tobytes()
            ready.append((PackedEntries(((code, blob),), len(blob) // size), False))

        for keys, vals, _n in self.tables.conn_batches(WALK_BATCH):
            tr.maybe_refresh()
            rows_by_shape, skipped = tr.records_to_rows(keys, vals, coarse_now_ns(), timeout_ns)
            if skipped:
                self.walk_skipped.update(skipped)
            for lens, rows in rows_by_shape.items():
                cap = self._caps[lens]
                if lens in carry:
                    rows = np.concatenate((carry.pop(lens), rows))
                whole = len(rows) // cap * cap
                for i in range(0, whole, cap):
                    emit(lens, rows[i:i + cap])
                if whole < len(rows):
                    carry[lens] = rows[whole:]
            if len(ready) > 1:
                feed.put_many(ready[:-1])
                del ready[:-1]
        for lens, rows in carry.items():
            emit(lens, rows)
        if ready:
            ready[-1] = (ready[-1][0], True)
        else:
            ready.append((PackedEntries(()), True))
        feed.put_many(ready)

    # ----------------------------------------------------------------- new flows

    def _ring_error(self, e: Exception) -> None:
        self.counters["ring_errors"] += 1
        log.warning("sync: ring buffer consume failed: %s", e)

    def _on_events(self, raws: list[bytes]) -> None:
        now = self._clock()
        self.counters["events"] += len(raws)
        if self.sender.role != "master":
            self.counters["events_not_master"] += len(raws)
            return
        self.translator.maybe_refresh()
        entries, skipped = self.translator.events_to_entries(raws)
        for reason, n in skipped.items():
            self.counters[f"events_{reason}"] += n
        if entries:
            s = self.sender
            s.add_new_flows(entries, now)
            if s.pending_entries >= s.max_batch_entries:
                self._send(s.poll(now))  # a full batch goes at once
            self._kick()

    # ----------------------------------------------------------------- receiving

    def _on_readable(self) -> None:
        start = _loop_cpu()
        try:
            self._read()
        finally:
            self._add_cpu("read", start, _loop_cpu)

    def _read(self) -> None:
        io = self._io
        if io is None:
            return
        now = self._clock()
        recv = self.receiver
        new: list[InstallEntries] = []
        deferred = self._deferred
        view = memoryview(io.buf)
        budget = RECV_TURN_BYTES  # bytes authenticated in this turn, at most
        read = READ_TURN_BYTES  # ... and read
        for _ in range(RECV_BURST):
            got = io.recv()  # a run of datagrams of one size (the last maybe shorter)
            if got is None:
                break
            n, seg, addr = got
            if not recv.addr_allowed(addr):  # not a peer: no copy, no MAC
                recv.reject("foreign_addr", addr, now)
                continue
            read -= n
            for off in range(0, n, seg):  # each datagram on its own
                end = min(off + seg, n)
                if view[off + PREFIX_LEN:off + PREFIX_LEN + 2] == _FULL_HEAD:  # later
                    if not deferred.offer(bytes(view[off:end]), addr):  # a walk repairs it
                        recv.reject("backlog_full", addr, now)
                    continue
                for action in recv.on_datagram(bytes(view[off:end]), addr, now):
                    if isinstance(action, InstallEntries):
                        new.append(action)
                    else:
                        self._on_action(action, now)
                budget -= end - off
            if budget <= 0 or read <= 0:
                break  # the rest waits in the socket for the next turn
        if new:
            self._install(new, now)
        self._schedule_deferred()

    def _schedule_deferred(self) -> None:
        if (self._deferred and self._full_handle is None and self._loop is not None
                and self._sock is not None and self._full_inflight < INSTALL_AHEAD):
            self._full_handle = self._loop.call_soon(self._process_deferred)

    # A full walk arrives at the walk's pace, new flows at theirs, in one socket.
    # Reading must keep up, or new flows queue in the socket behind the walk: so
    # full-walk chunks (told apart by their first body bytes) are only read and
    # set aside, raw and bounded (Backlog), and authenticated and decoded
    # FULL_TURN_BYTES per loop turn, after whatever new flows came in meanwhile;
    # translating and installing them runs in the install thread, at most
    # INSTALL_AHEAD slices queued (new flows' installs go in between). (The
    # receiver's replay window is wide enough for the reordering; raw bytes also
    # give the garbage collector nothing to walk through.)
    def _process_deferred(self) -> None:
        self._full_handle = None
        if self._full_inflight >= INSTALL_AHEAD:
            return  # _full_installed calls again
        now = self._clock()
        start = _loop_cpu()
        try:
            batch = self._auth_deferred(now)
        finally:
            self._add_cpu("auth_full", start, _loop_cpu)
        if batch:
            self._install(batch, now, full=True)
        self._schedule_deferred()

    def _auth_deferred(self, now: float) -> list[InstallEntries]:
        batch: list[InstallEntries] = []
        for data, addr in self._deferred.take():
            for action in self.receiver.on_datagram(data, addr, now):
                if isinstance(action, InstallEntries):
                    batch.append(action)
                else:
                    self._on_action(action, now)
        return batch

    def _send_to(self, data: bytes, addr) -> None:
        if self._io is not None:
            self._io.sendto(data, addr)

    def _persist(self) -> None:
        """Save the peers' highest sessions when they grew (in a thread)."""
        known = self.receiver.known_sessions()
        if known == self._saved_sessions or self._loop is None or self.state_path is None:
            return
        self._saved_sessions = known
        self._loop.run_in_executor(None, _save_state, self.state_path,
                                   {"session": self.sender.session, "peers": known})

    def _on_action(self, action, now: float) -> None:
        s = self.sender
        if isinstance(action, PeerUp):
            log.info("sync: peer %s up at %s (%s%s)", action.sender, _fmt_addr(action.addr),
                     action.role, ", restarted" if action.restarted else "")
            self._persist()
            if s.role == "master":
                self.request_full()  # a new or restarted standby starts empty
            elif action.role == "backup" and s.role == "backup":
                log.info("sync: both %s and %s are backup", self.node_name, action.sender)
        elif isinstance(action, PeerRole):
            log.info("sync: peer %s is now %s", action.sender, action.role)
            if s.role == "master" and action.role == "backup" and not s.full_in_progress:
                self.request_full()  # failback: the old master gets our table
            elif s.role == "master" and action.role == "master":
                log.warning("sync: peer %s is master too (split brain?)", action.sender)
        elif isinstance(action, PeerDown):
            log.warning("sync: peer %s silent since %.1fs", action.sender,
                        now - action.last_seen)
        elif isinstance(action, SendChallenge):
            log.info("sync: %s speaks in a session not proven live yet: challenging it",
                     action.sender)
            self._send_to(s.challenge(action.nonce, now), action.addr)
        elif isinstance(action, SendResponse):
            self._send_to(s.respond(action.nonce, now), action.addr)
            if action.current and s.role == "master":
                # it dropped what we sent until now (our session was new to it)
                self.request_full()

    def _translate(self, actions: list[InstallEntries]) -> tuple[bytes, bytes]:
        """Entries -> packed conn-table records with this node's ids (skips counted).
        Runs in an install thread; bulk (full-walk slices) through numpy."""
        tr = self.translator
        tr.maybe_refresh()
        now_ns = coarse_now_ns()
        if sum(len(a.entries) for a in actions) >= NUMPY_MIN and all(
                type(a.entries) is PackedEntries for a in actions):
            keys, vals, skipped = tr.groups_to_records(
                [g for a in actions for g in a.entries.groups], now_ns)
        else:
            keys, vals, skipped = tr.entries_to_records(
                [e for a in actions for e in a.entries], now_ns)
        if skipped:
            with self._count_lock:
                self.skipped.update(skipped)
        return keys, vals

    def _install(self, actions: list[InstallEntries], now: float, full: bool = False) -> None:
        """Hand entries to their install thread: new flows as they come, full-walk
        slices (``full``) INSTALL_AHEAD at a time. A full-walk slice is translated
        here, on the loop (numpy, a bounded slice: about what authenticating it
        took), so that its install thread, the walk's bottleneck, only writes."""
        overwrite = self.sender.role != "master"
        pool = self._pools.get(full)
        if pool is None or self._loop is None:  # not started (tests)
            self._install_job(actions, overwrite, now, full)
            return
        if full:
            keys, vals = self._translate_part(actions, "full")
            fut = self._loop.run_in_executor(pool, self._write_part, keys, vals, now,
                                             overwrite, "full")
            self._full_inflight += 1
        else:
            fut = self._loop.run_in_executor(pool, self._install_job, actions, overwrite, now)
        fut.add_done_callback(functools.partial(self._installed, full))

    def _installed(self, full: bool, fut: asyncio.Future) -> None:
        if full:
            self._full_inflight -= 1
        if not fut.cancelled() and fut.exception() is not None:
            log.error("sync: install failed: %r", fut.exception())
        if full:
            self._schedule_deferred()

    def _install_job(self, actions: list[InstallEntries], overwrite: bool, now: float,
                     full: bool = False) -> None:
        part = "full" if full else "new"
        keys, vals = self._translate_part(actions, part)
        self._write_part(keys, vals, now, overwrite, part)

    def _translate_part(self, actions: list[InstallEntries], part: str) -> tuple[bytes, bytes]:
        start = _thread_cpu()
        try:
            return self._translate(actions)
        finally:
            self._add_cpu(f"translate_{part}", start)

    def _write_part(self, keys: bytes, vals: bytes, now: float, overwrite: bool,
                    part: str) -> None:
        start = _thread_cpu()
        try:
            self._write(keys, vals, now, overwrite)
        finally:
            self._add_cpu(f"write_{part}", start)

    def _write(self, keys: bytes, vals: bytes, now: float, overwrite: bool) -> None:
        n = len(keys) // CONN_KEY.size
        if not n:
            return
        try:
            written = self.tables.install_conns(keys, vals, overwrite=overwrite)
        except OSError as e:
            with self._count_lock:
                self.counters["install_errors"] += n
            log.warning("sync: installing %d entries failed: %s", n, e)
            return
        with self._count_lock:
            self.counters["installed"] += written
            if written < n:
                self.skipped["local_entry"] += n - written
        if self.install_hook is not None:
            self.install_hook(keys, vals, now)

    # ----------------------------------------------------------------- status (metrics.py)

    def status(self) -> dict:
        return _status(self)

    def metrics(self):
        """prometheus_client metric families (l4lb/metrics.py yields them)."""
        return _metrics(self)
