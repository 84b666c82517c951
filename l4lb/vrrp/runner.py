"""VRRP out of the daemon's way: the agents in a process of their own (or a thread).

Adverts must go out every Advertisement_Interval whatever the rest of the daemon
does.  On the daemon's loop, anything that held it (a 1M-entry map walk, a big
JSON answer) silenced the master and the backup took over while the master still
held the VIPs.  A thread with its own loop is not enough either: it still needs
the GIL, and one long C call holds the GIL throughout.  Measured in the lab: the
API encoding the answer of `conns --limit 1000000` (json.dumps, even in a worker
thread) held it 4.4 s; the VRRP thread missed 57 adverts and the backup became
master twice.  So the daemon runs :class:`VrrpProcess`:

* a child process (``python -m l4lb.vrrp.runner``) runs the agents on its own
  asyncio loop; the agents' sockets, timers, netlink and scripts live there.
  It dies with the daemon (PR_SET_PDEATHSIG SIGKILL: a SIGKILLed daemon sends no
  priority 0, as before) and on SIGTERM/SIGINT stops gracefully by itself;
* the two talk over a SOCK_SEQPACKET socketpair (pickled tuples, parent and
  child only): the config at start; transitions, in order, which the daemon gets
  on its loop (``on_state(old, new, instance)``); a status snapshot every
  ``SNAPSHOT_S`` and on each transition (dropped, never waited for, while the
  daemon's loop is too busy to read them: the next one is fresher); ``stop``.
  Reading a status is taking the last snapshot: no wait on either side;
* real time (``node.vrrp_rt_priority``, keepalived's ``vrrp_rt_priority``):
  SCHED_RR at that priority for the VRRP loop's thread, with SCHED_RESET_ON_FORK
  so notify/track scripts and helper threads run at normal priority.  If the
  system refuses (EPERM: no CAP_SYS_NICE, RLIMIT_RTPRIO too low, or a cgroup
  without real-time runtime) it logs a warning and runs at normal priority: the
  pair still works, with less margin, and ``status`` / ``l4lb_vrrp_realtime``
  show it.  Refusing to start would take the node out of the pair entirely,
  which is worse than the risk the option guards against.

:class:`VrrpRunner` is the same in a thread of the calling process (tests with
fake sockets; anything that cannot spawn).  Both measure two lags:
``loop="main"`` how late a task of the daemon's loop woke up (API, metrics,
health and sync run there) and ``loop="vrrp"`` the VRRP loop's own wake-up lag
(CPU waits; in a thread also the GIL): ``l4lb_event_loop_lag_seconds``, and in
each instance's status under ``runner`` the max of the last ``RECENT_S`` s.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import ctypes
import gc
import inspect
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .agent import AgentError, VrrpAgent

log = logging.getLogger("l4lb.vrrp")

SNAPSHOT_S = 0.02  # status snapshots at least this often (tests poll at 20 ms)
PROBE_S = 0.05  # the daemon loop's lag probe
VRRP_PROBE_S = 0.02  # the VRRP loop's own lag probe
RECENT_S = 10.0  # the "recent max" window
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
SOCK_BUF = 1 << 20
MSG_MAX = 1 << 20
# seconds; the histogram's upper bounds (+Inf added)
LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
PR_SET_PDEATHSIG = 1
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33


class LagStats:
    """Lags of one loop: cumulative histogram, max, and max of the recent window.
    Written by one thread; read elsewhere only through snapshot()'s new dict."""

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

    def snapshot(self) -> dict[str, Any]:
        recent = max([lag for _t, lag in self._recent], default=0.0)
        return {"count": self.n, "sum_s": self.total, "buckets": list(self.counts),
                "max_ms": round(self.max * 1000, 3), "recent_max_ms": round(recent * 1000, 3)}


async def _probe(stats: LagStats, period: float) -> None:
    """How late this loop wakes a task that sleeps `period`."""
    loop = asyncio.get_running_loop()
    while True:
        t0 = loop.time()
        await asyncio.sleep(period)
        now = loop.time()
        stats.record(now - t0 - period, now)


def set_realtime(priority: int) -> tuple[bool, str | None]:
    """SCHED_RR for the calling thread; (applied, why not)."""
    if not priority:
        return False, None
    try:
        os.sched_setscheduler(0, os.SCHED_RR | os.SCHED_RESET_ON_FORK,
                              os.sched_param(priority))
    except OSError as e:
        why = (f"{e.strerror or e}: real-time scheduling needs CAP_SYS_NICE (or RLIMIT_RTPRIO "
               f">= {priority}) and, under cgroup v2 with RT group scheduling, real-time "
               "runtime for the service's cgroup")
        log.warning("node.vrrp_rt_priority = %d refused (%s); VRRP runs at normal priority",
                    priority, why)
        return False, why
    log.info("vrrp: SCHED_RR priority %d for the VRRP loop (thread %d)", priority,
             threading.get_native_id())
    return True, None


class InstanceHandle:
    """What the daemon holds for one instance: its name and its status snapshot."""

    def __init__(self, runner: _Base, name: str) -> None:
        self._runner = runner
        self.name = name

    def status(self) -> dict[str, Any]:
        return self._runner.instance_status(self.name)


class _Base:
    """What both runners share: the instances as a sequence, status, metrics,
    delivery of transitions and the probe of the caller's loop."""

    mode = "?"

    def __init__(self, instances: Sequence[Any], on_state: Callable[..., Any] | None, *,
                 rt_priority: int = 0, vip_lifetime_s: float | None = None) -> None:
        if not 0 <= int(rt_priority) <= 99:
            raise ValueError(f"vrrp_rt_priority {rt_priority}: must be 0 (off) or 1..99")
        self.instances = list(instances)
        self.on_state = on_state
        self.rt_priority = int(rt_priority)
        self._vip_lifetime_s = vip_lifetime_s
        self._handles = [InstanceHandle(self, c.name) for c in self.instances]
        self._snap: dict[str, dict] = {}  # name -> the agent's status(), as last published
        self._info: dict[str, Any] = {"rt_active": False, "rt_error": None,
                                      "vrrp_lag": LagStats().snapshot()}
        self.main_lag = LagStats()  # the caller's loop; written and read there
        self._main: asyncio.AbstractEventLoop | None = None
        self._probe_task: asyncio.Task | None = None

    def __iter__(self) -> Iterator[InstanceHandle]:
        return iter(self._handles)

    def __len__(self) -> int:
        return len(self._handles)

    def __getitem__(self, i: int) -> InstanceHandle:
        return self._handles[i]

    def _start_probe(self) -> None:
        self._main = asyncio.get_running_loop()
        self._probe_task = asyncio.create_task(_probe(self.main_lag, PROBE_S))

    def _stop_probe(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()

    def runner_status(self) -> dict[str, Any]:
        info = self._info
        return {"mode": self.mode, "pid": info.get("pid"), "native_id": info.get("native_id"),
                "rt_priority": self.rt_priority, "rt_active": info["rt_active"],
                "rt_error": info["rt_error"], "gc": info.get("gc"),
                "loop_lag": {"main": self.main_lag.snapshot(), "vrrp": info["vrrp_lag"]}}

    def instance_status(self, name: str) -> dict[str, Any]:
        st = self._snap.get(name)
        if st is None:  # not started yet, or failed to start
            cfg = next(c for c in self.instances if c.name == name)
            st = {"name": name, "interface": cfg.interface, "vrid": cfg.vrid,
                  "state": "initialize", "priority": cfg.priority, "counters": {}}
        return {**st, "runner": self.runner_status()}

    def status(self) -> list[dict[str, Any]]:
        return [h.status() for h in self._handles]

    def metrics(self):
        """Prometheus families: loop lags, and whether VRRP runs real time."""
        from prometheus_client.core import (  # noqa: PLC0415 - the daemon has it
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        rs = self.runner_status()
        h = HistogramMetricFamily(
            "l4lb_event_loop_lag_seconds",
            "How late a sleeping task woke up: loop=main the daemon's loop (API, metrics, "
            "health, sync), loop=vrrp the VRRP agents' loop.", labels=["loop"])
        for name, s in rs["loop_lag"].items():
            cum, buckets = 0, []
            for le, c in zip([*map(str, LAG_BUCKETS), "+Inf"], s["buckets"], strict=True):
                cum += c
                buckets.append((le, cum))
            h.add_metric([name], buckets, s["sum_s"])
        yield h
        g = GaugeMetricFamily("l4lb_event_loop_lag_recent_max_seconds",
                              f"Largest loop lag of the last {RECENT_S:g} s.", labels=["loop"])
        for name, s in rs["loop_lag"].items():
            g.add_metric([name], s["recent_max_ms"] / 1000)
        yield g
        yield GaugeMetricFamily("l4lb_vrrp_realtime",
                                "1 when the VRRP loop runs SCHED_RR (node.vrrp_rt_priority).",
                                value=1 if rs["rt_active"] else 0)

    def _deliver(self, old: str, new: str, name: str) -> None:  # on the caller's loop
        if self.on_state is None:
            return
        try:
            r = self.on_state(old, new, name)
            if inspect.isawaitable(r):
                asyncio.ensure_future(r)
        except Exception as e:  # noqa: BLE001 - the daemon's problem, not VRRP's
            log.error("vrrp %s: on_state callback failed: %s", name, e)


# ================================================================== in a process


class VrrpProcess(_Base):
    """Runs ``instances`` (``[[vrrp]]`` configs) in a child process.

    ``on_state(old, new, instance)`` (plain or coroutine function) is called on
    the loop that called :meth:`start`, in transition order.  Iterating gives one
    :class:`InstanceHandle` per instance, so it stands where a list of agents
    stood.  ``child_prefix`` goes before the child's argv (tests: a namespace).
    """

    mode = "process"

    def __init__(self, instances: Sequence[Any], on_state: Callable[..., Any] | None = None, *,
                 rt_priority: int = 0, vip_lifetime_s: float | None = None,
                 child_prefix: Sequence[str] = ()) -> None:
        super().__init__(instances, on_state, rt_priority=rt_priority,
                         vip_lifetime_s=vip_lifetime_s)
        self._prefix = list(child_prefix)
        self.proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._started: asyncio.Future | None = None
        self._stopping = False

    async def start(self) -> None:
        """Spawn the child and start every agent there; raises AgentError (or
        OSError / RuntimeError) with the child's reason if it cannot."""
        if self.proc is not None:
            return
        loop = asyncio.get_running_loop()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (mine, theirs):
            _bufs(s)
        argv = [*self._prefix, sys.executable, "-m", "l4lb.vrrp.runner", "--fd",
                str(theirs.fileno()), "--parent", str(os.getpid())]
        try:
            self.proc = subprocess.Popen(argv, pass_fds=(theirs.fileno(),),
                                         stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        mine.sendall(pickle.dumps(("init", {
            "instances": self.instances, "rt_priority": self.rt_priority,
            "vip_lifetime_s": self._vip_lifetime_s,
            "log_level": logging.getLogger("l4lb").getEffectiveLevel()})))
        mine.setblocking(False)
        self._sock = mine
        self._started = loop.create_future()
        loop.add_reader(mine.fileno(), self._on_readable)
        try:
            await asyncio.wait_for(asyncio.shield(self._started), START_TIMEOUT_S)
        except BaseException as e:
            self._stopping = True  # a failed child exits by itself; a hung one is killed
            await self._reap(kill=not isinstance(e, (AgentError, OSError, RuntimeError)))
            raise
        self._start_probe()

    async def stop(self, graceful: bool = True) -> None:
        """Graceful: a master sends priority 0 and removes its VIPs; then the child
        exits.  Not graceful: the child is killed (as if the daemon were)."""
        if self.proc is None or self._stopping:
            return
        self._stopping = True
        self._stop_probe()
        if graceful and self.proc.poll() is None:
            try:
                self._sock.send(pickle.dumps(("stop", True)))
            except OSError:
                pass  # the child is gone already, or stopping by its own signal
        await self._reap(kill=not graceful)

    async def _reap(self, kill: bool) -> None:
        p = self.proc
        if kill and p.poll() is None:
            p.kill()
        try:
            await asyncio.to_thread(p.wait, STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.error("vrrp: the VRRP process did not stop within %gs; killed", STOP_TIMEOUT_S)
            p.kill()
            await asyncio.to_thread(p.wait)
        if self._sock is not None:
            self._on_readable()  # the last transitions and status
            self._close()

    def _close(self) -> None:
        if self._sock is None:
            return
        try:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
        except (RuntimeError, ValueError, OSError):
            pass
        self._sock.close()
        self._sock = None

    def _on_readable(self) -> None:
        while self._sock is not None:
            try:
                data = self._sock.recv(MSG_MAX)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionResetError:  # it exited with our message unread
                data = b""
            except OSError as e:
                data = b""
                log.error("vrrp: reading from the VRRP process: %s", e)
            if not data:
                self._on_exit()
                return
            try:
                self._on_message(pickle.loads(data))
            except Exception as e:  # noqa: BLE001 - a bad message must not kill the loop
                log.error("vrrp: bad message from the VRRP process: %r", e)

    def _on_message(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "status":
            self._snap, self._info = msg[1], msg[2]
        elif kind == "state":
            self._deliver(msg[2], msg[3], msg[1])
        elif kind == "started":
            if not self._started.done():
                self._started.set_result(None)
        elif kind == "failed":
            exc = {"AgentError": AgentError, "OSError": OSError}.get(msg[1], RuntimeError)
            if not self._started.done():
                self._started.set_exception(exc(msg[2]))

    def _on_exit(self) -> None:
        code = self.proc.poll() if self.proc else None
        self._close()
        if self._started is not None and not self._started.done():
            self._started.set_exception(RuntimeError(
                f"the VRRP process exited during start (code {code}); see its log above"))
            return
        if not self._stopping:
            # Not restarted: a crash is a bug to see, and the peer takes over meanwhile.
            self._crashed(code)
            if code is None:  # its socket closed first: the exit code follows
                asyncio.ensure_future(self._reap_crashed())

    async def _reap_crashed(self) -> None:
        self._crashed(await asyncio.to_thread(self.proc.wait))

    def _crashed(self, code: int | None) -> None:
        if code is not None:
            log.critical("vrrp: the VRRP process exited (code %s): this node holds no VIP and "
                         "sends no adverts until the daemon is restarted", code)
        self._snap = {n: {**st, "state": "initialize", "vips_held": False,
                          "error": f"VRRP process exited (code {code})"}
                      for n, st in self._snap.items()}


def _bufs(s: socket.socket) -> None:
    for force, plain in ((SO_SNDBUFFORCE, socket.SO_SNDBUF), (SO_RCVBUFFORCE, socket.SO_RCVBUF)):
        try:
            s.setsockopt(socket.SOL_SOCKET, force, SOCK_BUF)
        except OSError:  # not root: what the system allows
            s.setsockopt(socket.SOL_SOCKET, plain, SOCK_BUF)


class _Outbox:
    """The child's sending side: never blocks.  Status snapshots are dropped while
    the daemon does not read (the next is fresher); everything else waits in order."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.queue: collections.deque[bytes] = collections.deque()
        self.dropped = 0
        self._loop = asyncio.get_running_loop()
        self._writing = False

    def send(self, msg: tuple, droppable: bool = False) -> None:
        data = pickle.dumps(msg)
        if self.queue:
            if droppable:
                self.dropped += 1
                return
            self.queue.append(data)
            return
        try:
            self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            if droppable:
                self.dropped += 1
                return
            self.queue.append(data)
            self._want_write()
        except OSError:
            pass  # the daemon is gone: PDEATHSIG ends us

    def _want_write(self) -> None:
        if not self._writing:
            self._writing = True
            self._loop.add_writer(self.sock.fileno(), self._flush)

    def _flush(self) -> None:
        while self.queue:
            try:
                self.sock.send(self.queue[0])
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.queue.clear()
                break
            self.queue.popleft()
        self._loop.remove_writer(self.sock.fileno())
        self._writing = False

    async def drain(self, timeout: float) -> None:
        end = self._loop.time() + timeout
        while self.queue and self._loop.time() < end:
            await asyncio.sleep(0.01)


class GcPauses:
    """The collector's pauses in this process (gc.callbacks): count and longest, by
    generation, so a late advert can be told apart from a GC pause."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.max_ms = [0.0, 0.0, 0.0]
        self._t0 = 0.0

    def install(self) -> None:
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
            return
        g = info.get("generation", 0)
        self.count[g] += 1
        self.max_ms[g] = max(self.max_ms[g], (time.perf_counter() - self._t0) * 1000)

    def snapshot(self) -> dict:
        return {"collections": list(self.count), "max_ms": [round(m, 3) for m in self.max_ms],
                "frozen": gc.get_freeze_count()}


async def _child_serve(sock: socket.socket, init: dict) -> int:
    loop = asyncio.get_running_loop()
    gc_pauses = GcPauses()
    sock.setblocking(False)
    out = _Outbox(sock)
    rt_active, rt_error = set_realtime(init["rt_priority"])
    lag = LagStats()
    agents: list[VrrpAgent] = []
    stop = asyncio.Event()
    graceful = [True]

    def publish() -> None:
        info = {"pid": os.getpid(), "native_id": threading.get_native_id(),
                "rt_active": rt_active, "rt_error": rt_error, "vrrp_lag": lag.snapshot(),
                "dropped_snapshots": out.dropped, "gc": gc_pauses.snapshot()}
        out.send(("status", {a.name: a.status() for a in agents}, info), droppable=True)

    def relay(name: str) -> Callable[[str, str], None]:
        def on_state(old: str, new: str) -> None:
            out.send(("state", name, old, new))
            publish()
        return on_state

    def on_signal() -> None:
        graceful[0] = True
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)

    started: list[VrrpAgent] = []
    try:
        for cfg in init["instances"]:
            a = VrrpAgent(cfg, on_state=relay(cfg.name), vip_lifetime_s=init["vip_lifetime_s"])
            agents.append(a)
            await a.start()
            started.append(a)
    except Exception as e:  # noqa: BLE001 - reported to the daemon, which raises it
        for a in started:
            await a.stop(graceful=True)
        kind = "AgentError" if isinstance(e, AgentError) else \
            "OSError" if isinstance(e, OSError) else "RuntimeError"
        out.send(("failed", kind, str(e)))
        await out.drain(2.0)
        return 1
    # What exists now (the imports: pyroute2, the agents) lives as long as the process:
    # frozen out of the collector's reach, a full collection never walks it again.
    # Unfrozen, one took ~100 ms here (40k objects, a loaded VM): two adverts lost at
    # 0.02 s intervals, whatever the real-time priority.
    gc.collect()
    gc.freeze()
    gc_pauses.install()
    publish()
    out.send(("started",))

    async def read_commands() -> None:
        while True:
            try:
                data = await loop.sock_recv(sock, MSG_MAX)
            except OSError:
                data = b""
            if not data:  # the daemon closed its end without asking: stop cleanly
                stop.set()
                return
            msg = pickle.loads(data)
            if msg[0] == "stop":
                graceful[0] = bool(msg[1])
                stop.set()

    async def publisher() -> None:
        while True:
            await asyncio.sleep(SNAPSHOT_S)
            publish()

    tasks = [asyncio.create_task(read_commands()), asyncio.create_task(publisher()),
             asyncio.create_task(_probe(lag, VRRP_PROBE_S))]
    await stop.wait()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for a in started:
        try:
            await a.stop(graceful=graceful[0])
        except Exception as e:  # noqa: BLE001 - stop the others anyway
            log.warning("vrrp %s: stop: %s", a.name, e)
    out.send(("status", {a.name: a.status() for a in agents},
              {"pid": os.getpid(), "native_id": threading.get_native_id(),
               "rt_active": rt_active, "rt_error": rt_error, "vrrp_lag": lag.snapshot()}))
    await out.drain(2.0)
    return 0


def child_main(fd: int, parent: int) -> int:
    """``python -m l4lb.vrrp.runner --fd N --parent PID``: the VRRP process."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # die with the daemon
    if os.getppid() != parent:
        return 1  # the daemon died before we could ask
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the daemon's reload, not ours
    sock = socket.socket(fileno=fd)
    init = pickle.loads(sock.recv(MSG_MAX))[1]
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("l4lb").setLevel(init["log_level"])
    return asyncio.run(_child_serve(sock, init))


# ================================================================== in a thread


class VrrpRunner(_Base):
    """The same in a thread of this process, with its own loop.  The GIL still
    couples it to every other thread here (see the module doc); ``agent_kwargs_for``
    (per instance config) go to each :class:`VrrpAgent` (tests pass fakes)."""

    mode = "thread"

    def __init__(self, instances: Sequence[Any], on_state: Callable[..., Any] | None = None, *,
                 rt_priority: int = 0, vip_lifetime_s: float | None = None,
                 agent_kwargs_for: Callable[[Any], dict] | None = None,
                 thread_name: str = "l4lb-vrrp") -> None:
        super().__init__(instances, on_state, rt_priority=rt_priority,
                         vip_lifetime_s=vip_lifetime_s)
        self._kwargs_for = agent_kwargs_for or (lambda _cfg: {})
        self.thread_name = thread_name
        self.agents: list[VrrpAgent] = []
        self.native_id: int | None = None
        self._vloop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop_ev: asyncio.Event | None = None
        self._graceful = True
        self._started: concurrent.futures.Future = concurrent.futures.Future()
        self._done: concurrent.futures.Future = concurrent.futures.Future()
        self._lag = LagStats()

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
        self._start_probe()

    async def stop(self, graceful: bool = True) -> None:
        if self._thread is None or self._done.done():
            return
        self._stop_probe()
        self._graceful = graceful
        if self._vloop is not None and self._stop_ev is not None:
            try:
                self._vloop.call_soon_threadsafe(self._stop_ev.set)
            except RuntimeError:  # its loop is already closed
                pass
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self._done)),
                                   STOP_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.error("vrrp: the VRRP thread did not stop within %gs", STOP_TIMEOUT_S)
            return
        await asyncio.to_thread(self._thread.join, 1.0)

    def _thread_main(self) -> None:
        self.native_id = threading.get_native_id()
        rt_active, rt_error = set_realtime(self.rt_priority)
        self._info = {**self._info, "native_id": self.native_id, "pid": os.getpid(),
                      "rt_active": rt_active, "rt_error": rt_error}
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
        tasks = [asyncio.create_task(self._publisher()),
                 asyncio.create_task(_probe(self._lag, VRRP_PROBE_S))]
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

    def _publish(self) -> None:  # on the VRRP thread: new dicts, swapped in whole
        self._info = {**self._info, "vrrp_lag": self._lag.snapshot()}
        self._snap = {a.name: a.status() for a in self.agents}

    def _relay(self, name: str) -> Callable[[str, str], None]:
        def on_state(old: str, new: str) -> None:  # on the VRRP thread
            self._publish()
            if self._main is None:
                return
            try:
                self._main.call_soon_threadsafe(self._deliver, old, new, name)
            except RuntimeError:  # the caller's loop is closed: nobody to tell
                pass
        return on_state

    async def _publisher(self) -> None:
        while True:
            await asyncio.sleep(SNAPSHOT_S)
            self._publish()


def main(argv: list[str] | None = None) -> int:
    import argparse  # noqa: PLC0415

    ap = argparse.ArgumentParser(prog="python -m l4lb.vrrp.runner",
                                 description="The VRRP process of `l4lb start` (not for "
                                             "direct use: see python -m l4lb.vrrp.agent).")
    ap.add_argument("--fd", type=int, required=True)
    ap.add_argument("--parent", type=int, required=True)
    a = ap.parse_args(argv)
    return child_main(a.fd, a.parent)


if __name__ == "__main__":
    sys.exit(main())
