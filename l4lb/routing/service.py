"""The daemon's routing shell: announce what this node can serve, watch the sessions.

    r = Routing(cfg.bgp, servable=..., sync_status=...)
    await r.start()      # FrrError when FRR is missing or not running
    r.drain()            # withdraw everything now (l4lb drain, SIGTERM in ECMP mode)
    await r.stop(withdraw=True)

Each tick (0.5 s) recomputes the wanted set and changes host routes in a thread;
every 2 s vtysh (a subprocess, awaited) reports the sessions: state changes are
logged with FRR's reason (wrong AS, refused...), drops counted as flaps.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from l4lb.config.bgp import BgpConfig
from l4lb.routing import announce, frr

log = logging.getLogger("l4lb.routing")
TICK_S = 0.5
POLL_S = 2.0
HELLO_GRACE_S = 2.5  # sync heartbeats come every 1 s: by then live peers are known
STUCK_S = 8.0  # a neighbour not Established this long is worth a warning


def join_state(sync_status: dict | None, elapsed: float, timeout: float) -> tuple[bool, str]:
    """(joined, why): a node announces once every live sync peer has sent it a complete
    full walk, or when join_timeout_s has passed (a peer that never answers)."""
    if sync_status is None:
        return True, "no sync configured"
    if elapsed >= timeout:
        return True, f"join timeout ({timeout:g}s) passed"
    if elapsed < min(HELLO_GRACE_S, timeout):
        return False, "waiting for sync peers"
    peers = [p for p in sync_status.get("peer_detail", []) if p.get("state") == "up"]
    waiting = [p.get("name") or p.get("address") for p in peers if not p.get("full_complete")]
    if waiting:
        return False, f"waiting for full walks from {', '.join(map(str, waiting))}"
    if peers:
        return True, "full walks received from " + ", ".join(
            str(p.get("name") or p.get("address")) for p in peers)
    return True, "no sync peer is up"


class Routing:
    def __init__(self, bgp: BgpConfig, servable: Callable[[], set[str]],
                 sync_status: Callable[[], dict | None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.bgp = bgp
        self._servable = servable
        self._sync_status = sync_status
        self._clock = clock
        self.announcer = announce.Announcer()
        self.sessions: dict[str, frr.Session] = {}
        self.flaps: Counter = Counter()
        self.frr_up = False
        self.frr_error: str | None = None
        self.speaker = "FRR"
        self.joined = False
        self.join_reason = "starting"
        self.draining = False
        self.drain_started: float | None = None
        self._started = clock()
        self._since_down: dict[str, float] = {}
        self._warned: dict[str, str] = {}  # neighbour -> the problem last logged
        self._tasks: list[asyncio.Task] = []
        self._apply_lock = asyncio.Lock()

    # -------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Refuse to start without a running FRR (nothing would be announced); pick up
        the routes a previous run left (they stay announced until decided again)."""
        self.speaker = await frr.version(self.bgp)  # FrrError: not installed / not running
        self.frr_up = True
        left = await asyncio.to_thread(announce.installed_routes)
        self.announcer = announce.Announcer(left)
        self._started = self._clock()
        log.info("routing: %s, AS %d, router id %s, neighbours %s%s", self.speaker,
                 self.bgp.asn, self.bgp.router_id,
                 ", ".join(f"{n.address} (AS {n.asn})" for n in self.bgp.neighbor),
                 f"; {len(left)} routes left by the last run" if left else "")
        self._tasks = [asyncio.create_task(self._tick_loop(), name="routing-tick"),
                       asyncio.create_task(self._poll_loop(), name="routing-poll")]

    async def stop(self, withdraw: bool) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - stopping anyway
                pass
        self._tasks = []
        if withdraw:
            await self._apply([], sorted(self.announcer.announced))

    def drain(self) -> None:
        """Withdraw every VIP at the next tick (at once: the tick is kicked)."""
        if not self.draining:
            self.draining = True
            self.drain_started = self._clock()
            log.info("routing: draining: withdrawing %d VIPs (%s)",
                     len(self.announcer.announced), ", ".join(sorted(self.announcer.announced)))
            self._tasks.append(asyncio.create_task(self.tick(), name="routing-drain"))

    # -------------------------------------------------------------- announcing
    async def tick(self) -> None:
        if not self.joined:
            self.joined, why = join_state(self._sync_status(), self._clock() - self._started,
                                          self.bgp.join_timeout_s)
            if why != self.join_reason:
                self.join_reason = why
                log.info("routing: %s%s", "joined: " if self.joined else "", why)
        add, remove = self.announcer.plan(self._servable(), joined=self.joined,
                                          draining=self.draining)
        if add or remove:
            await self._apply(add, remove)

    async def _apply(self, add: list[str], remove: list[str]) -> None:
        async with self._apply_lock:
            done_add, done_rm = [], []
            for addr, present, done in [(a, True, done_add) for a in add] + \
                    [(a, False, done_rm) for a in remove]:
                try:
                    await asyncio.to_thread(announce.set_route, addr, present)
                    done.append(addr)
                except Exception as e:  # noqa: BLE001 - retried next tick
                    log.error("routing: %s %s failed: %s", "announcing" if present
                              else "withdrawing", addr, e)
            self.announcer.done(done_add, done_rm)
            for a in done_add:
                log.info("routing: announcing %s", a)
            for a in done_rm:
                log.info("routing: withdrew %s", a)

    async def _tick_loop(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - keep deciding
                log.exception("routing: tick")
            await asyncio.sleep(TICK_S)

    # -------------------------------------------------------------- sessions
    async def poll(self) -> None:
        try:
            new = await frr.sessions(self.bgp)
        except frr.FrrError as e:
            if self.frr_up or self.frr_error != str(e):
                log.error("routing: %s (announcements stay in the kernel and come back "
                          "when FRR does)", e)
            self.frr_up, self.frr_error = False, str(e)
            return
        if not self.frr_up:
            log.info("routing: FRR answers again")
        self.frr_up, self.frr_error = True, None
        now = self._clock()
        configured = {str(n.address): n for n in self.bgp.neighbor}
        for addr, s in new.items():
            old = self.sessions.get(addr)
            if old is not None and old.up and not s.up:
                self.flaps[addr] += 1
            if old is None or old.state != s.state:
                if s.up:
                    log.info("routing: BGP session to %s (AS %s) established", addr,
                             s.remote_as)
                elif old is not None and old.up:
                    log.warning("routing: BGP session to %s lost: %s", addr,
                                s.reason or s.state)
            if s.up:
                self._since_down.pop(addr, None)
                self._warned.pop(addr, None)
                continue
            since = self._since_down.setdefault(addr, now)
            key = s.reason if s.notified else ("stuck" if now - since >= STUCK_S else None)
            if key and self._warned.get(addr) != key:
                log.warning("routing: BGP session to %s not established (state %s%s): %s",
                            addr, s.state, f", {s.reason}" if s.reason else "",
                            self._hint(configured.get(addr), s))
                self._warned[addr] = key
        self.sessions = new

    def _hint(self, n, s: frr.Session) -> str:
        reason = s.reason or ""
        if not s.notified:
            return ("no reply: check reachability and that both sides use the same "
                    "bgp.neighbor password (TCP MD5 drops mismatched segments silently)")
        if "AS" in reason or "OPEN" in reason:
            return (f"refused: check bgp.asn ({self.bgp.asn}) against the neighbour's "
                    f"remote-as, and bgp.neighbor asn ({n.asn if n else '?'}) against its AS")
        return "see FRR's log for the neighbour"

    async def _poll_loop(self) -> None:
        while True:
            try:
                await self.poll()
            except Exception:  # noqa: BLE001 - keep watching
                log.exception("routing: poll")
            await asyncio.sleep(POLL_S)

    # -------------------------------------------------------------- reading
    def status(self) -> dict:
        return {
            "speaker": self.speaker, "frr_up": self.frr_up, "frr_error": self.frr_error,
            "asn": self.bgp.asn, "router_id": str(self.bgp.router_id),
            "joined": self.joined, "join": self.join_reason,
            "draining": self.draining, "drain_s": self.bgp.drain_s,
            "announced": sorted(self.announcer.announced),
            "announcements": self.announcer.counters["announcements"],
            "withdrawals": self.announcer.counters["withdrawals"],
            "sessions": [dict(s.as_dict(), flaps=self.flaps[a])
                         for a, s in sorted(self.sessions.items())],
        }

    def metrics(self):
        up = GaugeMetricFamily("l4lb_bgp_session_up", "1 while the BGP session is Established.",
                               labels=["neighbor"])
        flaps = CounterMetricFamily("l4lb_bgp_session_flaps",
                                    "Established BGP sessions that went down.",
                                    labels=["neighbor"])
        for n in self.bgp.neighbor:
            a = str(n.address)
            s = self.sessions.get(a)
            up.add_metric([a], 1 if s is not None and s.up else 0)
            flaps.add_metric([a], self.flaps[a])
        yield up
        yield flaps
        ann = GaugeMetricFamily("l4lb_bgp_announced", "1 for each VIP address announced.",
                                labels=["vip"])
        for a in sorted(self.announcer.announced):
            ann.add_metric([a], 1)
        yield ann
        yield CounterMetricFamily("l4lb_bgp_announcements", "VIP routes announced.",
                                  value=self.announcer.counters["announcements"])
        yield CounterMetricFamily("l4lb_bgp_withdrawals", "VIP routes withdrawn.",
                                  value=self.announcer.counters["withdrawals"])
        yield GaugeMetricFamily("l4lb_bgp_draining", "1 while the node drains.",
                                value=1 if self.draining else 0)
        yield GaugeMetricFamily("l4lb_bgp_frr_up", "1 while FRR answers vtysh.",
                                value=1 if self.frr_up else 0)


__all__ = ["Routing", "join_state"]
