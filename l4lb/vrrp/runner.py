"""The VRRP agents in a thread of their own, with their own asyncio loop.

Why: adverts must go out every Advertisement_Interval whatever the rest of the
daemon does.  On the daemon's loop, anything that held it (a 1M-entry map walk,
a big JSON answer, a compile) silenced the master and the backup took over
while the master still held the VIPs.  Here the agents never wait for that loop:

* the thread runs its own event loop; the agents' sockets, timers, netlink and
  scripts all live on it.  The daemon's loop only gets the state changes, by
  ``call_soon_threadsafe`` (in order), and reads a status snapshot;
* status: the VRRP thread publishes a snapshot of every agent's ``status()``
  (a new dict each time, never mutated afterwards) every ``SNAPSHOT_S``, on
  each transition and at stop; readers on other threads just take the current
  reference, so they never see a counter dict being changed under them and
  never wait for the VRRP thread;
* the GIL: Python code of the other threads yields it to this thread within
  ``sys.getswitchinterval()`` (5 ms) of asking; syscalls and ctypes calls
  (BPF batch walks) release it.  What still holds it is one long C call
  (json.dumps of a huge answer, a full GC over many objects): the thread
  measures its own wake-up lag (``loop="vrrp"`` below) so such stalls show;
* real time (``node.vrrp_rt_priority``, keepalived's ``vrrp_rt_priority``):
  SCHED_RR at that priority for this thread only, with SCHED_RESET_ON_FORK so
  notify/track scripts and threads it starts run at normal priority.  If the
  system refuses (EPERM: no CAP_SYS_NICE, RLIMIT_RTPRIO too low, or a cgroup
  without real-time runtime), the thread logs a warning and runs at normal
  priority: the pair still works, only with less margin, and ``status`` /
  ``l4lb_vrrp_thread_realtime`` show it.  Refusing to start would take the node
  out of the pair entirely, which is worse than the risk it guards against.

The thread also watches the daemon's loop: every ``PROBE_S`` it posts a no-op
callback there and records how long it waited to run (``loop="main"``).  Both
lags are a histogram ``l4lb_event_loop_lag_seconds{loop=...}`` and, in the
status, the max of the last ``RECENT_S`` seconds and since start.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import inspect
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .agent import VrrpAgent

log = logging.getLogger("l4lb.vrrp")

SNAPSHOT_S = 0.02  # status snapshots at least this often (tests poll at 20 ms)
PROBE_S = 0.05  # main-loop probe period
VRRP_PROBE_S = 0.02  # own wake-up lag probe period
RECENT_S = 10.0  # the "recent max" window
STOP_TIMEOUT_S = 10.0
# seconds; the histogram's upper bounds (+Inf added)
LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


class LagStats:
    """Lags of one loop: cumulative histogram, max, and max of the recent window.

    Written by one thread (the VRRP thread); read anywhere through snapshot().
    """

    def __init__(self) -> None:
        self.counts = [0] * (len(LAG_BUCKETS) + 1)
        self.total = 0.0
        self.n = 0
        self.max = 0.0
        self._recent: collections.deque[tuple[float, float]] = collections.deque()

    def record(self, lag: float, now: float) -> None:
        lag = max(0.0, lag)
        i = 0
        while i < len(LAG_BUCKETS) and lag > LAG_BUCKETS[i]:
            i += 1
        self.counts[i] += 1
        self.total += lag
        self.n += 1
        self.max = max(self.max, lag)
        self._recent.append((now, lag))
        while self._recent and self._recent[0][0] < now - RECENT_S:
            self._recent.popleft()

    def snapshot(self, pending: float = 0.0) -> dict[str, Any]:
        """``pending``: the age of a probe that has not run yet (a stall in progress)."""
        recent = max([lag for _t, lag in self._recent] + [pending])
        return {"count": self.n, "sum_s": self.total, "buckets": list(self.counts),
                "max_ms": round(max(self.max, pending) * 1000, 3),
                "recent_max_ms": round(recent * 1000, 3)}


class InstanceHandle:
    """What the daemon holds for one instance: its name and its status snapshot."""

    def __init__(self, runner: VrrpRunner, name: str) -> None:
        self._runner = runner
        self.name = name

    def status(self) -> dict[str, Any]:
        return self._runner.instance_status(self.name)


class VrrpRunner:
    """Runs ``instances`` (``[[vrrp]]`` configs) in a thread with its own loop.

    ``on_state(old, new, instance)`` (plain or coroutine function) is called on
    the loop that called :meth:`start`, in transition order.  Iterating the
    runner gives one :class:`InstanceHandle` per instance (``status()``), so it
    stands where a list of agents stood.  ``agent_kwargs`` go to every
    :class:`VrrpAgent` (tests pass fakes; ``agent_kwargs_for`` per instance).
    """

    def __init__(self, instances: Sequence[Any], on_state: Callable[..., Any] | None = None, *,
                 rt_priority: int = 0, vip_lifetime_s: float | None = None,
                 agent_kwargs_for: Callable[[Any], dict] | None = None,
                 thread_name: str = "l4lb-vrrp") -> None:
        if not 0 <= int(rt_priority) <= 99:
            raise ValueError(f"vrrp_rt_priority {rt_priority}: must be 0 (off) or 1..99")
        self.instances = list(instances)
        self.on_state = on_state
        self.rt_priority = int(rt_priority)
        self.rt_active = False
        self.rt_error: str | None = None
        self.thread_name = thread_name
        self.native_id: int | None = None
        self._vip_lifetime_s = vip_lifetime_s
        self._kwargs_for = agent_kwargs_for or (lambda _cfg: {})
        self._handles = [InstanceHandle(self, c.name) for c in self.instances]
        self.agents: list[VrrpAgent] = []
        self._main: asyncio.AbstractEventLoop | None = None
        self._vloop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop_ev: asyncio.Event | None = None
        self._graceful = True
        self._started: concurrent.futures.Future = concurrent.futures.Future()
        self._done: concurrent.futures.Future = concurrent.futures.Future()
        self._snap: dict[str, dict] = {}
        self.lag = {"main": LagStats(), "vrrp": LagStats()}
        self._probe_posted: float | None = None  # when the pending main-loop probe was posted
        self._probe_ran: float | None = None  # set on the main loop when it ran

    # ---- the sequence of instances ------------------------------------------------

    def __iter__(self) -> Iterator[InstanceHandle]:
        return iter(self._handles)

    def __len__(self) -> int:
        return len(self._handles)

    def __getitem__(self, i: int) -> InstanceHandle:
        return self._handles[i]

    # ---- control, from the caller's loop -------------------------------------------

    async def start(self) -> None:
        """Start the thread and every agent; raises what an agent's start raised
        (AgentError, OSError), after stopping the ones already started."""
        if self._thread is not None:
            return
        self._main = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._thread_main, name=self.thread_name,
                                        daemon=True)
        self._thread.start()
        try:
            await asyncio.wrap_future(self._started)
        except BaseException:
            await asyncio.wrap_future(self._done)
            await asyncio.to_thread(self._thread.join, 1.0)
            raise

    async def stop(self, graceful: bool = True) -> None:
        """Stop the agents (graceful: a master sends priority 0 and drops its VIPs),
        then the thread."""
        if self._thread is None or self._done.done():
            return
        self._graceful = graceful
        vloop = self._vloop
        if vloop is not None and self._stop_ev is not None:
            try:
                vloop.call_soon_threadsafe(self._stop_ev.set)
            except RuntimeError:  # its loop is already closed
                pass
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self._done)),
                                   STOP_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.error("vrrp: the VRRP thread did not stop within %gs", STOP_TIMEOUT_S)
            return
        await asyncio.to_thread(self._thread.join, 1.0)

    # ---- status, from any thread ------------------------------------------------------

    def instance_status(self, name: str) -> dict[str, Any]:
        st = self._snap.get(name)
        if st is None:  # not started yet, or failed to start
            cfg = next(c for c in self.instances if c.name == name)
            st = {"name": name, "interface": cfg.interface, "vrid": cfg.vrid,
                  "state": "initialize", "priority": cfg.priority, "counters": {}}
        return st

    def status(self) -> list[dict[str, Any]]:
        return [h.status() for h in self._handles]

    def thread_status(self) -> dict[str, Any]:
        """Only the thread's own fields (also in each instance's ``thread`` key)."""
        snap = self._snap
        if snap:
            return next(iter(snap.values()))["thread"]
        return self._thread_info()

    def _thread_info(self) -> dict[str, Any]:
        pend = 0.0
        if self._probe_posted is not None and self._probe_ran is None:
            pend = time.monotonic() - self._probe_posted
        return {"name": self.thread_name, "native_id": self.native_id,
                "rt_priority": self.rt_priority, "rt_active": self.rt_active,
                "rt_error": self.rt_error,
                "loop_lag": {"main": self.lag["main"].snapshot(pend),
                             "vrrp": self.lag["vrrp"].snapshot()}}

    def metrics(self):
        """Prometheus families: loop lags, and whether the thread runs real time."""
        from prometheus_client.core import (  # noqa: PLC0415 - the daemon has it
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        th = self.thread_status()
        h = HistogramMetricFamily(
            "l4lb_event_loop_lag_seconds",
            "How late a callback ran: loop=main the daemon's loop (API, metrics, health, "
            "sync), loop=vrrp the VRRP thread's own loop (GIL and CPU waits).", labels=["loop"])
        for name, s in th["loop_lag"].items():
            cum, buckets = 0, []
            for le, c in zip([*map(str, LAG_BUCKETS), "+Inf"], s["buckets"], strict=True):
                cum += c
                buckets.append((le, cum))
            h.add_metric([name], buckets, s["sum_s"])
        yield h
        g = GaugeMetricFamily("l4lb_event_loop_lag_recent_max_seconds",
                              f"Largest loop lag of the last {RECENT_S:g} s.", labels=["loop"])
        for name, s in th["loop_lag"].items():
            g.add_metric([name], s["recent_max_ms"] / 1000)
        yield g
        yield GaugeMetricFamily("l4lb_vrrp_thread_realtime",
                                "1 when the VRRP thread runs SCHED_RR (node.vrrp_rt_priority).",
                                value=1 if th["rt_active"] else 0)

    # ---- the thread ---------------------------------------------------------------------

    def _thread_main(self) -> None:
        self.native_id = threading.get_native_id()
        self._set_realtime()
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._vloop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as e:  # noqa: BLE001 - handed to start() / logged
            if not self._started.done():
                self._started.set_exception(e)
            else:
                log.critical("vrrp: the VRRP thread died: %r", e)
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()
                self._done.set_result(None)

    def _set_realtime(self) -> None:
        if not self.rt_priority:
            return
        try:
            # pid 0 = this thread only; children and threads it makes start normal
            os.sched_setscheduler(0, os.SCHED_RR | os.SCHED_RESET_ON_FORK,
                                  os.sched_param(self.rt_priority))
            self.rt_active = True
            log.info("vrrp: thread %d runs SCHED_RR priority %d", self.native_id,
                     self.rt_priority)
        except OSError as e:
            self.rt_error = (f"{e.strerror or e}: real-time scheduling needs CAP_SYS_NICE (or "
                             f"RLIMIT_RTPRIO >= {self.rt_priority}) and, under cgroup v2 with RT "
                             "group scheduling, real-time runtime for the service's cgroup")
            log.warning("node.vrrp_rt_priority = %d refused (%s); VRRP runs at normal priority",
                        self.rt_priority, self.rt_error)

    async def _serve(self) -> None:
        self._stop_ev = asyncio.Event()
        started: list[VrrpAgent] = []
        try:
            for cfg in self.instances:
                agent = VrrpAgent(cfg, on_state=self._relay(cfg.name),
                                  vip_lifetime_s=self._vip_lifetime_s, **self._kwargs_for(cfg))
                self.agents.append(agent)
                await agent.start()
                started.append(agent)
        except BaseException as e:
            for a in started:
                await a.stop(graceful=True)
            self._publish()
            self._started.set_exception(e)
            return
        self._publish()
        self._started.set_result(None)
        tasks = [asyncio.create_task(self._publisher()), asyncio.create_task(self._probe_main()),
                 asyncio.create_task(self._probe_self())]
        try:
            await self._stop_ev.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for a in started:
                try:
                    await a.stop(graceful=self._graceful)
                except Exception as e:  # noqa: BLE001 - stop the others anyway
                    log.warning("vrrp %s: stop: %s", a.name, e)
            self._publish()

    def _publish(self) -> None:
        info = self._thread_info()
        self._snap = {a.name: {**a.status(), "thread": info} for a in self.agents}

    def _relay(self, name: str) -> Callable[[str, str], None]:
        def on_state(old: str, new: str) -> None:  # on the VRRP thread
            self._publish()
            if self.on_state is None or self._main is None:
                return
            try:
                self._main.call_soon_threadsafe(self._deliver, old, new, name)
            except RuntimeError:  # the daemon's loop is closed: nobody to tell
                pass
        return on_state

    def _deliver(self, old: str, new: str, name: str) -> None:  # on the daemon's loop
        try:
            r = self.on_state(old, new, name)
            if inspect.isawaitable(r):
                asyncio.ensure_future(r)
        except Exception as e:  # noqa: BLE001 - the daemon's problem, not VRRP's
            log.error("vrrp %s: on_state callback failed: %s", name, e)

    async def _publisher(self) -> None:
        while True:
            await asyncio.sleep(SNAPSHOT_S)
            self._publish()

    async def _probe_self(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(VRRP_PROBE_S)
            now = loop.time()
            self.lag["vrrp"].record(now - t0 - VRRP_PROBE_S, now)

    def _probe_ran_cb(self) -> None:  # on the daemon's loop
        self._probe_ran = time.monotonic()

    async def _probe_main(self) -> None:
        """One probe outstanding at a time: a blocked loop shows as one long lag."""
        while True:
            await asyncio.sleep(PROBE_S)
            ran, posted = self._probe_ran, self._probe_posted
            if posted is not None:
                if ran is None:
                    continue  # still waiting: the daemon's loop is busy
                self.lag["main"].record(ran - posted, time.monotonic())
            self._probe_ran = None
            self._probe_posted = time.monotonic()
            try:
                self._main.call_soon_threadsafe(self._probe_ran_cb)
            except RuntimeError:
                return
