"""VRRP agent: the asyncio driver of :class:`~l4lb.vrrp.machine.VrrpMachine`.

Beside it: sockets.py (the raw VRRP socket, the AF_PACKET sender), frames.py
(gratuitous ARP / unsolicited NA frames, IPv4 header parsing), packet.py (the
advert codec); VIP addresses go through l4lb.netutil.AsyncNetlink.

The agent owns the I/O and none of the protocol rules: it feeds the machine
adverts, timer ticks, interface and track events, with ``loop.time()`` as the
clock, and performs the actions the machine returns, in order.

* **Adverts** go out of a raw IP socket (protocol 112, IPv4 or IPv6 after the
  VIPs' family) bound to the interface (SO_BINDTODEVICE), to the VRRP group
  (224.0.0.18 / ff02::12, joined on that interface) or to ``unicast_peers``,
  from ``unicast_src`` or the interface's primary address (IPv6: its link-local
  address), TTL / hop limit 255.  Received adverts must carry TTL / hop limit
  255 (IPv4: from the IP header the raw socket delivers; IPv6: the
  IPV6_HOPLIMIT ancillary data) and are decoded by :mod:`l4lb.vrrp.packet`.
  Multicast loop is off, and our own adverts are dropped by source address.
  Bad packets are counted by reason (``status()["counters"]["decode_errors"]``)
  and never raise out of the receive path; the reader reads at most a small
  batch per wake-up, so a flood cannot starve the timers.
* **Timers**: one task sleeps until ``machine.next_deadline()`` and is woken
  early by every event.  All machine calls happen in that task, one at a time.
* **VIPs** are added / removed with pyroute2 (:class:`l4lb.netutil.AsyncNetlink`) on
  ``cfg.interface`` in the current network namespace (IPv6 with IFA_F_NODAD and deprecated, preferred_lft
  0, so the kernel never makes a VIP the source of the node's own traffic).
  Removing an address that is not there is not an error.
* **Gratuitous ARP** (IPv4: ARP request, sender = target = VIP, broadcast) /
  **unsolicited NA** (IPv6: to ff02::1, override flag, target link-layer
  address option, hop limit 255), sent through an AF_PACKET socket:
  ``garp_count`` rounds 10 ms apart on becoming master, and one round every
  ``garp_refresh_s`` while master when that is > 0.
* **Tracking**: the VRRP interface and ``track_interfaces`` are polled every
  100 ms; ``track_scripts`` run (argv, no shell) every ``interval_s`` with a
  timeout of ``max(interval_s, 1 s)``, going down after ``fall`` failures in a
  row and up after ``rise`` successes (the first run sets the initial state).
  Weights are keepalived's: a negative weight is added to the priority while
  the interface is down / the script fails, a positive one while it is up /
  succeeds, and weight 0 means FAULT while down / failing (the machine gets
  ``on_interface(False)``, as it does when the VRRP interface itself goes
  down).
* **Notify**: ``notify_master`` / ``notify_backup`` / ``notify_fault`` are run
  as argv with ``INSTANCE <name> <STATE>`` appended; ``notify`` with
  ``INSTANCE <name> <STATE> <priority>`` on every transition, STATE one of
  MASTER, BACKUP, FAULT, STOP.  Track and notify scripts run through
  :mod:`l4lb.scripts` (own process group, killed whole on timeout; minimal
  environment plus ``L4LB_INSTANCE`` / ``L4LB_STATE`` / ``L4LB_PRIORITY``;
  script security).  The ``on_state(old, new)`` callback (sync or
  async) gets the agent states below, in order, from a worker task: a slow
  callback never delays adverts.

Agent states (``status()["state"]``): ``initialize`` (not started, stopped),
``backup``, ``master`` and ``fault`` (the machine is in Initialize because the
interface is down or a weight-0 track fails).

Stale VIPs after SIGKILL (keepalived issue #2361)
-------------------------------------------------
A process killed with SIGKILL cannot remove its addresses, so the dead master
keeps the VIP on its interface while the backup takes over and adds it too.
Nothing here relies on the dead process; three things make it safe:

1. **Gratuitous ARP / NA from the new master.**  Linux treats an ARP request
   whose sender and target are the same address as gratuitous and lets it
   override an existing neighbour entry at once (regardless of locktime); an
   unsolicited NA with the override flag does the same for IPv6.  So every
   client that talked to the VIP moves to the new master's MAC within
   milliseconds of the takeover, and its traffic goes through exactly one
   balancer, although the dead node still holds the address.  Static neighbour
   entries ignore this (README: The lab).
2. **VIP lifetime.**  The master adds its VIPs with a finite valid / preferred
   lifetime (``vip_lifetime_s``; default ``max(3 s, 3 * Master_Down_Interval)``
   rounded up to whole seconds) and renews it every third of that.  If the
   agent dies, the *kernel* deletes the address when the lifetime runs out.
   ``vip_lifetime_s=0`` keeps them permanent (keepalived's behaviour).
3. **Clean start.**  A non-owner agent always starts in Backup (RFC 5798), so
   :meth:`VrrpAgent.start` deletes any of its VIPs it finds on the interface
   before it starts the machine: a restarted agent never holds a stale VIP.

What remains: until the lifetime runs out (or the agent is restarted), the dead
node's kernel still answers ARP requests / neighbour solicitations for the
VIP, so a client that *broadcasts* an ARP request in that window gets two
answers and may pick the dead node.  Clients that already knew the VIP follow
the gratuitous ARPs; ``garp_refresh_s`` corrects the others at its next round.

Standalone runner (tests, debugging)::

    python -m l4lb.vrrp.agent -c CONFIG.toml [--instance NAME] [--status-file PATH]
                              [--vip-lifetime SECONDS]

runs the config's ``[[vrrp]]`` instances in the foreground, logs one line per
transition to stderr (``vrrp VI_1: backup -> master (master_down)``), stops
gracefully on SIGTERM / SIGINT (priority 0, VIPs removed), and rewrites the
status file (``{"pid": ..., "instances": {name: status()}}``) at start, on
each transition, every ``--status-interval`` seconds (0.2) and at exit.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import inspect
import ipaddress
import json
import logging
import math
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import netutil, scripts
from ..config import VrrpConfig
from ..errors import L4lbError
from ..health import RiseFall
from .frames import build_garp, build_unsolicited_na
from .machine import (
    AddVips,
    Config,
    Notify,
    RemoveVips,
    SendAdvert,
    SendGratuitous,
    State,
    VrrpMachine,
)
from .packet import (
    AUTH_NONE,
    AUTH_SIMPLE,
    Address,
    Advert,
    VrrpDecodeError,
    decode,
    encode,
)
from .sockets import VrrpSocket, _L2Sender

__all__ = [
    "AgentError",
    "VrrpAgent",
    "machine_config",
    "default_vip_lifetime",
    "main",
]

log = logging.getLogger("l4lb.vrrp")

LINK_POLL_S = 0.1
GARP_SPACING_S = 0.01
RECV_BATCH = 64  # packets read per wake-up of the reader
EVENT_QUEUE_MAX = 1024
NOTIFY_TIMEOUT_S = 30.0

INITIALIZE, BACKUP, MASTER, FAULT = "initialize", "backup", "master", "fault"
_NOTIFY_STATE = {MASTER: "MASTER", BACKUP: "BACKUP", FAULT: "FAULT", INITIALIZE: "STOP"}


class AgentError(L4lbError):
    """The agent cannot start (no such interface, no address to send from...)."""


# --------------------------------------------------------------------------
# Pure helpers (unit tested without the network)
# --------------------------------------------------------------------------


def machine_config(cfg: VrrpConfig, primary: Address) -> Config:
    """The :class:`~l4lb.vrrp.machine.Config` of one ``[[vrrp]]`` instance."""
    auth = cfg.auth_pass.encode() if cfg.auth_pass else b""
    return Config(
        vrid=cfg.vrid,
        priority=cfg.priority,
        primary_address=primary,
        vips=tuple(v.ip for v in cfg.vips),
        interval_cs=int(round(cfg.advert_interval_s * 100)),
        version=cfg.version,
        preempt=cfg.preempt,
        preempt_delay=cfg.preempt_delay_s,
        accept_mode=cfg.accept_mode,
        auth_type=AUTH_SIMPLE if auth else AUTH_NONE,
        auth_data=auth,
    )


def default_vip_lifetime(mcfg: Config) -> int:
    """max(3 s, 3 * Master_Down_Interval), whole seconds (see the module doc)."""
    mdi = 3 * mcfg.interval_cs / 100.0 + (256 - mcfg.priority) * mcfg.interval_cs / 25600.0
    if mcfg.version == 2:
        mdi = 3 * mcfg.interval_cs / 100.0 + (256 - mcfg.priority) / 256.0
    return max(3, math.ceil(3 * mdi))


# --------------------------------------------------------------------------
# The agent
# --------------------------------------------------------------------------


class VrrpAgent:
    """One VRRP instance on the network.  See the module docstring.

    ``on_state(old, new)`` (plain function or coroutine function) is called
    with the agent states on every transition.  ``vip_lifetime_s``: None for
    :func:`default_vip_lifetime`, 0 for permanent VIPs.  ``netlink``,
    ``transport`` and ``l2`` replace the real pyroute2 / raw socket / AF_PACKET
    objects (tests).
    """

    def __init__(self, cfg: VrrpConfig, on_state: Callable[[str, str], Any] | None = None, *,
                 vip_lifetime_s: float | None = None, netlink: Any = None,
                 transport: Any = None, l2: Any = None) -> None:
        self.cfg = cfg
        self.on_state = on_state
        self.machine: VrrpMachine | None = None
        self.state = INITIALIZE
        self._vip_lifetime_opt = vip_lifetime_s
        self.vip_lifetime = 0
        self._nl = netlink
        self._own_nl = netlink is None
        self._sock = transport
        self._l2 = l2 or _L2Sender(cfg.interface)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ifindex = 0
        self._mac = "00:00:00:00:00:00"
        self._primary: Address | None = None
        self._na_src: ipaddress.IPv6Address | None = None
        self._events: collections.deque = collections.deque()
        self._wake: asyncio.Event | None = None
        self._main: asyncio.Task | None = None
        self._tasks: list[asyncio.Task] = []
        self._garp_task: asyncio.Task | None = None
        self._hold_task: asyncio.Task | None = None
        self._cbq: asyncio.Queue | None = None
        self._scripts: set[asyncio.Task] = set()
        self._nl_lock: asyncio.Lock | None = None
        self._vips_held = False
        self._running = False
        # tracking
        self._link_up = True
        self._if_up: dict[str, bool] = {}
        # health's rise/fall counter; the first result decides (up=None)
        self._script_trackers = [RiseFall(t.rise, t.fall, up=None) for t in cfg.track_scripts]
        self._offset = 0
        self._fault_reasons: list[str] = []
        self._iface_ok = True
        # counters the machine does not keep
        self.packets_received = 0
        self.decode_errors: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()  # own, unknown_peer, queue_full
        self.errors: Counter[str] = Counter()  # send, recv, netlink, garp, notify, callback
        self.garp_sent = 0
        self.stale_vips_removed = 0
        self.transitions: Counter[str] = Counter()
        self.last_transition: dict[str, Any] | None = None

    # ---- public API --------------------------------------------------------

    @property
    def name(self) -> str:
        return self.cfg.name

    async def start(self) -> None:
        """Open the socket, clean stale VIPs, start the machine (Backup, or Master if owner)."""
        if self._running:
            return
        cfg = self.cfg
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._cbq = asyncio.Queue()
        self._nl_lock = asyncio.Lock()
        if self._nl is None:
            self._nl = netutil.AsyncNetlink()
        try:
            await self._setup()
        except BaseException:
            if self._own_nl and self._nl is not None:
                await self._nl.close()
            if self._sock is not None:
                self._sock.close()
            raise
        # A full collection over what the process made before (bcc, pyroute2, the
        # daemon's tables: ~50k objects, none garbage) holds the loop for tens of ms,
        # more on a busy machine: 86 ms measured on a master under iperf3 load, more
        # than the 52 ms a 20 ms advert interval leaves before the backup takes over.
        # Collect once now, before any timer runs, and keep the survivors out of
        # later collections.
        gc.collect()
        gc.freeze()
        self._running = True
        self._loop.add_reader(self._sock.fileno(), self._on_readable)
        self._main = asyncio.create_task(self._run(), name=f"vrrp-{cfg.name}")
        self._main.add_done_callback(self._main_done)
        self._tasks = [asyncio.create_task(self._callback_worker()),
                       asyncio.create_task(self._link_monitor())]
        for i, t in enumerate(cfg.track_scripts):
            self._tasks.append(asyncio.create_task(self._script_loop(i, t)))
        fut = self._loop.create_future()
        self._post(("start", fut))
        await fut
        log.info("vrrp %s: started on %s (vrid %d, priority %d, v%d, interval %gs, from %s to %s)",
                 cfg.name, cfg.interface, cfg.vrid, self.machine.priority, cfg.version,
                 cfg.advert_interval_s, self._primary,
                 ",".join(str(d) for d in self._sock.destinations))

    async def stop(self, graceful: bool = True) -> None:
        """Stop.  Graceful: a master sends priority 0 and removes its VIPs.

        Not graceful: stop at once as if killed; nothing is sent and the VIPs
        are left as they are (their lifetime, if any, still runs out).
        """
        if not self._running:
            return
        self._running = False
        if self._main is not None and not self._main.done():
            fut = self._loop.create_future()
            self._events.clear()
            self._post(("stop", graceful, fut))
            try:
                await asyncio.wait_for(asyncio.shield(fut), 5.0)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                pass
            self._main.cancel()
        for t in (self._garp_task, self._hold_task):
            if t is not None:
                t.cancel()
        try:
            self._loop.remove_reader(self._sock.fileno())
        except (ValueError, OSError):
            pass
        self._sock.close()
        # let the callback worker deliver the last transitions, briefly
        try:
            await asyncio.wait_for(self._cbq.join(), 2.0)
        except asyncio.TimeoutError:
            pass
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, *(t for t in (self._main,) if t), return_exceptions=True)
        self._tasks = []
        if self._own_nl and self._nl is not None:
            await self._nl.close()
            self._nl = None

    def _main_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.errors["crash"] += 1
            log.critical("vrrp %s: the agent loop died: %r", self.cfg.name, task.exception())

    def status(self) -> dict[str, Any]:
        cfg, m = self.cfg, self.machine
        rejected: Counter[str] = Counter(self.decode_errors)
        rejected.update(self.dropped)
        mc = m.counters if m else None
        if mc:
            rejected.update(mc.rejected)
        return {
            "name": cfg.name,
            "interface": cfg.interface,
            "vrid": cfg.vrid,
            "version": cfg.version,
            "family": cfg.family,
            "state": self.state,
            "priority": m.priority if m else cfg.priority,
            "base_priority": cfg.priority,
            "priority_offset": m.priority_offset if m else 0,
            "fault_reasons": list(self._fault_reasons),
            "primary_address": str(self._primary) if self._primary else None,
            "destinations": [str(d) for d in self._sock.destinations] if self._sock else [],
            "master_address": str(m.master_address) if m and m.master_address else None,
            "master_priority": m.master_priority if m else None,
            "advert_interval_s": cfg.advert_interval_s,
            "master_advert_interval_s": (m.master_adver_interval_cs / 100.0) if m else None,
            "master_down_interval_s": m.master_down_interval if m else None,
            "vips": [str(v) for v in cfg.vips],
            "vips_held": self._vips_held,
            "vip_lifetime_s": self.vip_lifetime,
            "last_transition": self.last_transition,
            "counters": {
                "packets_received": self.packets_received,
                "adverts_received": self.packets_received,
                "adverts_accepted": mc.adverts_accepted if mc else 0,
                "adverts_sent": mc.adverts_sent if mc else 0,
                "priority_zero_sent": mc.priority_zero_sent if mc else 0,
                "priority_zero_received": mc.priority_zero_received if mc else 0,
                "addr_mismatch": mc.addr_mismatch if mc else 0,
                "rejected": dict(rejected),
                "decode_errors": dict(self.decode_errors),
                "dropped": dict(self.dropped),
                "errors": dict(self.errors),
                "garp_sent": self.garp_sent,
                "stale_vips_removed": self.stale_vips_removed,
                "transitions": dict(self.transitions),
            },
        }

    # ---- setup ---------------------------------------------------------------

    async def _setup(self) -> None:
        cfg = self.cfg
        link = await self._nl.link(cfg.interface)
        if link is None:
            raise AgentError(f"vrrp {cfg.name}: interface {cfg.interface} not found")
        self._ifindex, self._mac, self._link_up = link.index, link.mac, link.up
        fam = cfg.family
        addrs = await self._nl.addresses(link.index, fam)
        vips = {v.ip for v in cfg.vips}
        ll = [a for a, _p, _f, _s in addrs if a.version == 6 and a.is_link_local]
        if fam == 6:
            self._na_src = ll[0] if ll else None
        if cfg.unicast_src is not None:
            primary = cfg.unicast_src
        elif fam == 4:
            cands = [a for a, _p, f, s in addrs
                     if a not in vips and not f & netutil.IFA_F_SECONDARY and s == 0]
            if not cands:
                raise AgentError(f"vrrp {cfg.name}: {cfg.interface} has no IPv4 address to "
                                 "send adverts from; add one or set unicast_src")
            primary = cands[0]
        else:
            if not ll:
                raise AgentError(f"vrrp {cfg.name}: {cfg.interface} has no IPv6 link-local "
                                 "address to send adverts from")
            primary = ll[0]
        self._primary = primary
        mcfg = machine_config(cfg, primary)
        self.vip_lifetime = (default_vip_lifetime(mcfg) if self._vip_lifetime_opt is None
                             else int(math.ceil(self._vip_lifetime_opt)))
        await self._poll_interfaces(initial=True)
        await self._initial_scripts()
        self._recompute(initial=True)
        self.machine = VrrpMachine(mcfg, interface_up=self._iface_ok)
        self.machine.set_priority_offset(self._offset, 0.0)  # Initialize: no actions
        if not mcfg.is_owner:
            # RFC 5798: a non-owner starts as Backup, so any VIP on the interface is stale
            for iface in cfg.vips:
                if await self._nl.del_address(link.index, iface):
                    self.stale_vips_removed += 1
                    log.warning("vrrp %s: removed stale VIP %s from %s (left by a killed agent?)",
                                cfg.name, iface, cfg.interface)
        if self._sock is None:
            self._sock = VrrpSocket(fam, cfg.interface, link.index, primary,
                                    tuple(cfg.unicast_peers)).open()

    # ---- events -------------------------------------------------------------

    def _post(self, ev: tuple) -> None:
        if len(self._events) >= EVENT_QUEUE_MAX and ev[0] == "advert":
            self.dropped["queue_full"] += 1
            return
        self._events.append(ev)
        self._wake.set()

    def _on_readable(self) -> None:
        """Reader callback: decode a batch of packets, queue the valid adverts."""
        for _ in range(RECV_BATCH):
            try:
                got = self._sock.recv()
            except VrrpDecodeError as e:
                self.packets_received += 1
                self.decode_errors[e.reason] += 1
                continue
            except OSError as e:
                self.errors["recv"] += 1
                log.debug("vrrp %s: recv: %s", self.cfg.name, e)
                return
            if got is None:
                return
            self.packets_received += 1
            self._handle_packet(*got)

    def _handle_packet(self, payload: bytes, src: Address, dst: Address, ttl: int | None) -> None:
        if src == self._primary:
            self.dropped["own"] += 1
            return
        if self.cfg.unicast_peers and src not in self.cfg.unicast_peers:
            self.dropped["unknown_peer"] += 1
            return
        try:
            adv = decode(payload, src, dst, self.cfg.family,
                         ttl=ttl if ttl is not None else -1)
        except VrrpDecodeError as e:
            self.decode_errors[e.reason] += 1
            log.debug("vrrp %s: bad advert from %s: %s", self.cfg.name, src, e)
            return
        self._post(("advert", adv, src))

    async def _run(self) -> None:
        loop, m = self._loop, self.machine
        while True:
            while self._events:
                ev = self._events.popleft()
                kind, now = ev[0], loop.time()
                if kind == "advert":
                    await self._apply(m.on_advert(ev[1], ev[2], now))
                elif kind == "offset":
                    await self._apply(m.set_priority_offset(ev[1], now))
                elif kind == "iface":
                    await self._apply(m.on_interface(ev[1], now))
                elif kind == "start":
                    await self._apply(m.start(now))
                    if not ev[1].done():
                        ev[1].set_result(None)
                elif kind == "stop":
                    if ev[1]:
                        await self._apply(m.shutdown(now))
                        self._transition(INITIALIZE, "shutdown")  # from fault: no Notify
                    else:
                        self._vips_held = False
                        self._transition(INITIALIZE, "stopped")
                    if not ev[2].done():
                        ev[2].set_result(None)
                    return
            dl = m.next_deadline()
            now = loop.time()
            if dl is not None and now >= dl:
                await self._apply(m.on_timer(now))
                continue
            self._wake.clear()
            if self._events:
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), None if dl is None else dl - now)
            except asyncio.TimeoutError:
                pass

    async def _apply(self, actions: list) -> None:
        for a in actions:
            try:
                if isinstance(a, SendAdvert):
                    self._send_advert(a.advert)
                elif isinstance(a, AddVips):
                    await self._add_vips()
                elif isinstance(a, RemoveVips):
                    await self._remove_vips()
                elif isinstance(a, SendGratuitous):
                    self._start_garp()
                elif isinstance(a, Notify):
                    self._transition(self._agent_state(a.new_state, a.reason), a.reason)
            except Exception as e:  # noqa: BLE001 - the loop must go on
                self.errors[type(a).__name__] += 1
                log.error("vrrp %s: %s failed: %s", self.cfg.name, type(a).__name__, e)
        derived = self._derived_state()
        if derived != self.state and self._running:
            self._transition(derived, "interface_down" if derived == FAULT else "start")

    def _agent_state(self, st: State, reason: str) -> str:
        if st is State.INITIALIZE:
            return FAULT if reason == "interface_down" else INITIALIZE
        return st.value

    def _derived_state(self) -> str:
        m = self.machine
        if m.state is State.INITIALIZE:
            return FAULT if m.started and not m.interface_up else INITIALIZE
        return m.state.value

    def _transition(self, new: str, reason: str) -> None:
        old = self.state
        if new == old:
            return
        self.state = new
        self.transitions[f"{old}->{new}"] += 1
        self.last_transition = {"old": old, "new": new, "reason": reason, "time": time.time(),
                                "monotonic": self._loop.time()}
        log.info("vrrp %s: %s -> %s (%s)", self.cfg.name, old, new, reason)
        prio = self.machine.priority if self.machine else self.cfg.priority
        self._cbq.put_nowait((old, new, prio))

    # ---- actions ------------------------------------------------------------

    def _send_advert(self, adv: Advert) -> None:
        for dst in self._sock.destinations:
            try:
                self._sock.send(encode(adv, self._primary, dst), dst)
            except OSError as e:
                self.errors["send"] += 1
                log.debug("vrrp %s: send to %s: %s", self.cfg.name, dst, e)

    async def _add_vips(self) -> None:
        async with self._nl_lock:
            self._vips_held = True
            for iface in self.cfg.vips:
                await self._nl.add_address(self._ifindex, iface, self.vip_lifetime)
        if self._hold_task is None or self._hold_task.done():
            if self.vip_lifetime > 0 or self.cfg.garp_refresh_s > 0:
                self._hold_task = asyncio.create_task(self._hold_loop())

    async def _remove_vips(self) -> None:
        if self._hold_task is not None:
            self._hold_task.cancel()
            self._hold_task = None
        if self._garp_task is not None:
            self._garp_task.cancel()
            self._garp_task = None
        async with self._nl_lock:
            self._vips_held = False
            for iface in self.cfg.vips:
                await self._nl.del_address(self._ifindex, iface)

    def _frames(self) -> list[bytes]:
        if self.cfg.family == 4:
            return [build_garp(self._mac, v.ip) for v in self.cfg.vips]
        return [build_unsolicited_na(self._mac, self._na_src or v.ip, v.ip) for v in self.cfg.vips]

    def _send_gratuitous(self) -> None:
        try:
            self.garp_sent += self._l2.send(self._frames())
        except OSError as e:
            self.errors["garp"] += 1
            log.debug("vrrp %s: gratuitous ARP/NA: %s", self.cfg.name, e)

    def _start_garp(self) -> None:
        if self._garp_task is not None:
            self._garp_task.cancel()
        if self.cfg.garp_count > 0:
            self._garp_task = asyncio.create_task(self._garp_burst(self.cfg.garp_count))

    async def _garp_burst(self, count: int) -> None:
        for i in range(count):
            if not self._vips_held:
                return
            self._send_gratuitous()
            if i + 1 < count:
                await asyncio.sleep(GARP_SPACING_S)

    async def _hold_loop(self) -> None:
        """While master: renew the VIP lifetime, refresh gratuitous ARPs."""
        loop = self._loop
        renew = self.vip_lifetime / 3.0 if self.vip_lifetime > 0 else None
        refresh = self.cfg.garp_refresh_s or None
        now = loop.time()
        next_renew = now + renew if renew else math.inf
        next_garp = now + refresh if refresh else math.inf
        while self._vips_held:
            await asyncio.sleep(max(0.0, min(next_renew, next_garp) - loop.time()))
            now = loop.time()
            if now >= next_renew:
                next_renew = now + renew
                try:
                    async with self._nl_lock:
                        if self._vips_held:
                            for iface in self.cfg.vips:
                                await self._nl.add_address(self._ifindex, iface,
                                                           self.vip_lifetime)
                except Exception as e:  # noqa: BLE001
                    self.errors["netlink"] += 1
                    log.error("vrrp %s: renewing the VIPs: %s", self.cfg.name, e)
            if now >= next_garp:
                next_garp = now + refresh
                if self._vips_held:
                    self._send_gratuitous()

    # ---- callbacks and notify scripts -----------------------------------------

    async def _callback_worker(self) -> None:
        while True:
            old, new, prio = await self._cbq.get()
            try:
                if self.on_state is not None:
                    r = self.on_state(old, new)
                    if inspect.isawaitable(r):
                        await r
            except Exception as e:  # noqa: BLE001 - the daemon's problem, not ours
                self.errors["callback"] += 1
                log.error("vrrp %s: on_state callback failed: %s", self.cfg.name, e)
            try:
                env = {"L4LB_INSTANCE": self.cfg.name, "L4LB_STATE": _NOTIFY_STATE[new],
                       "L4LB_PRIORITY": prio}
                for argv in self._notify_argvs(new, prio):
                    await self._spawn_notify(argv, env)
            finally:
                self._cbq.task_done()

    def _notify_argvs(self, new: str, prio: int) -> list[list[str]]:
        cfg, st = self.cfg, _NOTIFY_STATE[new]
        out = []
        specific = {MASTER: cfg.notify_master, BACKUP: cfg.notify_backup,
                    FAULT: cfg.notify_fault}.get(new)
        if specific:
            out.append([*specific, "INSTANCE", cfg.name, st])
        if cfg.notify:
            out.append([*cfg.notify, "INSTANCE", cfg.name, st, str(prio)])
        return out

    async def _spawn_notify(self, argv: list[str], env: dict | None = None) -> None:
        # l4lb.scripts: own process group, minimal environment, script security.
        run = await scripts.start(argv, env)
        if isinstance(run, scripts.Result):
            self.errors["notify"] += 1
            log.error("vrrp %s: notify %s: %s", self.cfg.name, argv[0], run.detail)
            return

        async def reap() -> None:
            try:
                # Cancelled (the daemon exits): the command runs on, detached.
                res = await run.finish(NOTIFY_TIMEOUT_S, kill_leftovers=False,
                                       kill_on_cancel=False)
            except asyncio.CancelledError:
                return
            if res.rc is None:
                self.errors["notify"] += 1
                log.error("vrrp %s: notify %s %s", self.cfg.name, argv[0], res.detail)
            elif res.rc:
                log.warning("vrrp %s: notify %s %s", self.cfg.name, argv[0], res.detail)

        t = asyncio.create_task(reap())
        self._scripts.add(t)
        t.add_done_callback(self._scripts.discard)

    # ---- tracking -------------------------------------------------------------

    async def _poll_interfaces(self, initial: bool = False) -> bool:
        """Read the links; True when something the machine cares about changed."""
        cfg = self.cfg
        link = await self._nl.link(cfg.interface)
        changed = False
        up = link is not None and link.up
        if link is not None and link.index != self._ifindex and not initial:
            await self._reopen(link)
        if up != self._link_up:
            self._link_up, changed = up, True
        for t in cfg.track_interfaces:
            if t.name == cfg.interface:
                tup = up
            else:
                info = await self._nl.link(t.name)
                tup = info is not None and info.up
            if self._if_up.get(t.name) != tup:
                self._if_up[t.name], changed = tup, True
        return changed

    async def _reopen(self, link: netutil.LinkInfo) -> None:
        """The interface was re-created: new index, new socket."""
        log.warning("vrrp %s: %s has a new ifindex %d; reopening the socket", self.cfg.name,
                    self.cfg.interface, link.index)
        self._ifindex, self._mac = link.index, link.mac
        old = self._sock
        try:
            new = VrrpSocket(old.family, old.ifname, link.index, old.src, old.peers).open()
        except OSError as e:
            self.errors["socket"] += 1
            log.error("vrrp %s: reopening the socket: %s", self.cfg.name, e)
            return
        self._loop.remove_reader(old.fileno())
        old.close()
        self._sock = new
        self._loop.add_reader(new.fileno(), self._on_readable)

    def _recompute(self, initial: bool = False) -> None:
        """Offset and fault from the track states; post events when they change."""
        cfg = self.cfg
        offset, reasons = 0, []
        if not self._link_up:
            reasons.append(f"interface {cfg.interface} down")
        for t in cfg.track_interfaces:
            up = self._if_up.get(t.name, False)
            if t.weight == 0:
                if not up and t.name != cfg.interface:
                    reasons.append(f"track interface {t.name} down")
            elif (t.weight < 0 and not up) or (t.weight > 0 and up):
                offset += t.weight
        for t, tr in zip(cfg.track_scripts, self._script_trackers, strict=True):
            ok = bool(tr.up)
            if t.weight == 0:
                if not ok:
                    reasons.append(f"track script {t.script[0]} failing")
            elif (t.weight < 0 and not ok) or (t.weight > 0 and ok):
                offset += t.weight
        iface_ok = not reasons
        self._fault_reasons = reasons
        if initial:
            self._offset, self._iface_ok = offset, iface_ok
            return
        if offset != self._offset:
            self._offset = offset
            self._post(("offset", offset))
        if iface_ok != self._iface_ok:
            self._iface_ok = iface_ok
            log.info("vrrp %s: %s", cfg.name, "; ".join(reasons) if reasons else "fault cleared")
            self._post(("iface", iface_ok))

    async def _link_monitor(self) -> None:
        while True:
            await asyncio.sleep(LINK_POLL_S)
            try:
                if await self._poll_interfaces():
                    self._recompute()
            except Exception as e:  # noqa: BLE001 - keep polling
                self.errors["netlink"] += 1
                log.debug("vrrp %s: link poll: %s", self.cfg.name, e)

    async def _run_script(self, argv: tuple[str, ...], timeout: float) -> bool:
        # l4lb.scripts: the whole process group is killed on timeout or cancel.
        res = await scripts.run(argv, timeout, {"L4LB_INSTANCE": self.cfg.name})
        if res.rc is None:  # refused, not found, timed out: logged when the verdict flips
            log.debug("vrrp %s: track script %s: %s", self.cfg.name, argv[0], res.detail)
        return res.ok

    async def _initial_scripts(self) -> None:
        ts = self.cfg.track_scripts
        results = await asyncio.gather(*(self._run_script(t.script, max(t.interval_s, 1.0))
                                         for t in ts))
        for tr, ok in zip(self._script_trackers, results, strict=True):
            tr.feed(ok)

    async def _script_loop(self, i: int, t: Any) -> None:
        tr = self._script_trackers[i]
        while True:
            await asyncio.sleep(t.interval_s)
            if tr.feed(await self._run_script(t.script, max(t.interval_s, 1.0))):
                log.info("vrrp %s: track script %s %s", self.cfg.name, t.script[0],
                         "succeeds" if tr.up else "fails")
                self._recompute()


# --------------------------------------------------------------------------
# Standalone runner: python -m l4lb.vrrp.agent -c CONFIG.toml
# --------------------------------------------------------------------------


def _write_status(path: str, agents: list[VrrpAgent]) -> None:
    data = {"pid": os.getpid(), "time": time.time(),
            "instances": {a.name: a.status() for a in agents}}
    p = Path(path)
    tmp = p.with_name(p.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(p)


async def _run_agents(cfgs: list[VrrpConfig], status_file: str | None,
                      vip_lifetime: float | None, status_interval: float = 0.2) -> int:
    agents: list[VrrpAgent] = []

    def on_state(_old: str, _new: str) -> None:
        if status_file:
            _write_status(status_file, agents)

    for c in cfgs:
        agents.append(VrrpAgent(c, on_state=on_state, vip_lifetime_s=vip_lifetime))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    started: list[VrrpAgent] = []
    rc = 0
    try:
        for a in agents:
            try:
                await a.start()
            except (AgentError, OSError) as e:
                log.error("%s", e)
                rc = 1
                return rc
            started.append(a)
        on_state("", "")
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), status_interval if status_file else None)
            except asyncio.TimeoutError:
                on_state("", "")
    finally:
        for a in started:
            await a.stop(graceful=True)
        if status_file:
            _write_status(status_file, agents)
    return rc


def main(argv: list[str] | None = None) -> int:
    from ..config import ConfigError, load_config  # noqa: PLC0415

    ap = argparse.ArgumentParser(
        prog="python -m l4lb.vrrp.agent",
        description="Run the [[vrrp]] instances of an l4lb config in the foreground.")
    ap.add_argument("-c", "--config", required=True, help="the l4lb TOML config")
    ap.add_argument("--instance", action="append", metavar="NAME",
                    help="run only this instance (repeatable; default: all)")
    ap.add_argument("--status-file", metavar="PATH",
                    help="write the status JSON here at start, on each transition and at exit")
    ap.add_argument("--status-interval", type=float, default=0.2, metavar="SECONDS",
                    help="also rewrite the status file this often (default 0.2)")
    ap.add_argument("--vip-lifetime", type=float, default=None, metavar="SECONDS",
                    help="VIP valid lifetime, renewed while master (0 = permanent; default "
                         "max(3, 3 * Master_Down_Interval))")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = ap.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, format="%(message)s", level=logging.WARNING)
    logging.getLogger("l4lb").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    scripts.configure(cfg.node.script_security)  # track and notify scripts
    insts = list(cfg.vrrp)
    if args.instance:
        known = {i.name for i in insts}
        missing = [n for n in args.instance if n not in known]
        if missing:
            print(f"no [[vrrp]] instance named {', '.join(missing)} in {args.config} "
                  f"(known: {', '.join(sorted(known)) or 'none'})", file=sys.stderr)
            return 2
        insts = [i for i in insts if i.name in args.instance]
    if not insts:
        print(f"{args.config} has no [[vrrp]] instance", file=sys.stderr)
        return 2
    return asyncio.run(_run_agents(insts, args.status_file, args.vip_lifetime,
                                   max(0.01, args.status_interval)))


if __name__ == "__main__":
    sys.exit(main())
