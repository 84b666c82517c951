"""Health checks of reals: TCP connect, HTTP(S) GET, or a script; rise/fall thresholds.

`RiseFall` is the pure verdict logic; `HealthChecker` runs one probe loop per
(VIP, real) in asyncio and reports transitions through a callback.

A probe never raises: whatever goes wrong (refused, timeout, a 70 KB status
line, a TLS error, a bug) is a failed check with a detail.  Failures are logged
when the verdict flips, not per probe.  Each loop is supervised: if it dies
anyway, it is logged and restarted.  TCP and HTTP probes bind to the node's own
address (``source``), never a VIP: a real holds the VIP on lo, so a probe sent
from the VIP would be answered to the real itself.  Scripts run through
:mod:`l4lb.scripts` (process group killed on timeout, minimal environment,
script security).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Protocol

from l4lb import scripts
from l4lb.config import HealthCheckConfig

log = logging.getLogger("l4lb.health")


@dataclass
class RiseFall:
    """Up after `rise` passes in a row, down after `fall` failures in a row.
    A new real starts up (like LVS with a fresh real server) unless told otherwise;
    up=None: the first result decides (VRRP track scripts, as keepalived)."""

    rise: int
    fall: int
    up: bool | None = True
    streak: int = 0  # consecutive results that disagree with `up`

    def feed(self, ok: bool) -> bool:
        """Feed one result; True when the state flipped (or was first set)."""
        if self.up is None:
            self.up = ok
            return True
        if ok == self.up:
            self.streak = 0
            return False
        self.streak += 1
        if self.streak >= (self.rise if ok else self.fall):
            self.up = ok
            self.streak = 0
            return True
        return False


MAX_STATUS_LINE = 8192  # bytes; a longer HTTP status line is a failed check
RESTART_DELAY_S = 1.0  # before a crashed check loop is restarted


class Source(Protocol):
    """Where probes come from (netutil.SourcePicker): the node's own address per family."""

    async def pick(self, family: int) -> str | None: ...  # None: let the kernel choose

    def invalidate(self) -> None: ...  # the address went away: look again


@dataclass
class ProbeResult:
    ok: bool
    latency_s: float
    detail: str = ""
    errno: int = 0  # of an OSError, when that is what failed


def _family(addr: str) -> int:
    return 6 if ":" in addr else 4


async def probe(addr: str, hc: HealthCheckConfig, source: str | None = None,
                env: dict[str, object] | None = None, mark: int | None = None) -> ProbeResult:
    """One check of `addr`; never raises (except CancelledError). `mark`: SO_MARK of
    the probe socket (tunnel checks: bpf/hc_tunnel.c encapsulates what carries it);
    0 means a tunnel check that cannot run (yet)."""
    t0 = time.monotonic()
    err = 0
    try:
        if hc.type == "script":
            res = await scripts.run(hc.script or (), hc.timeout_s, env)
            detail = "" if res.ok else f"script {res.detail}"
        elif mark == 0:
            detail = "tunnel health check not ready (no real id or no tc program)"
        else:
            detail = await asyncio.wait_for(_probe(addr, hc, source, mark), hc.timeout_s)
    except asyncio.TimeoutError:
        detail = f"timeout after {hc.timeout_s:g}s"
    except ssl.SSLError as e:
        detail = f"TLS: {e.reason or e}"
    except OSError as e:  # asyncio's connect error says "Connect call failed": name the errno
        err = e.errno or 0
        detail = os.strerror(err) if err else (e.strerror or str(e) or type(e).__name__)
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of a probe is a failed check
        detail = f"{type(e).__name__}: {e}"[:200]
    return ProbeResult(detail == "", time.monotonic() - t0, detail, err)


async def _marked_socket(addr: str, port: int, source: str | None, mark: int) -> socket.socket:
    """A TCP socket carrying SO_MARK `mark`, connected to addr:port (from `source`)."""
    sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        sock.setblocking(False)
        if source:
            sock.bind((source, 0))
        await asyncio.get_running_loop().sock_connect(sock, (addr, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def _probe(addr: str, hc: HealthCheckConfig, source: str | None,
                 mark: int | None = None) -> str:
    """'' when healthy, else what failed."""
    if hc.type == "none":
        return ""
    ctx = None
    if hc.type == "https":
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if mark:
        sock = await _marked_socket(addr, hc.port, source, mark)
        reader, writer = await asyncio.open_connection(
            sock=sock, ssl=ctx, limit=MAX_STATUS_LINE, server_hostname="" if ctx else None)
    else:
        reader, writer = await asyncio.open_connection(
            addr, hc.port, ssl=ctx, limit=MAX_STATUS_LINE,
            local_addr=(source, 0) if source else None)
    try:
        if hc.type == "tcp":
            return ""
        host = hc.http_host or (f"[{addr}]" if ":" in addr else addr)
        writer.write(f"GET {hc.http_path} HTTP/1.0\r\nHost: {host}\r\n"
                     f"User-Agent: l4lb-health\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            return f"HTTP status line longer than {MAX_STATUS_LINE} bytes"
        except asyncio.IncompleteReadError as e:
            line = e.partial
            if not line:
                return "connection closed before an HTTP status line"
        parts = line.decode(errors="replace").split()
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            return f"bad HTTP status line {line[:60]!r}"
        status = int(parts[1])
        return "" if status == hc.http_expect_status else \
            f"HTTP {status}, expected {hc.http_expect_status}"
    finally:
        writer.close()


@dataclass
class CheckState:
    vip: str
    real: str
    hc: HealthCheckConfig
    rf: RiseFall
    task: asyncio.Task | None = None
    last: ProbeResult | None = None
    checks: int = 0
    failures: int = 0
    restarts: int = 0  # times the loop died and was restarted (a bug if ever > 0)


OnChange = Callable[[str, str, bool, str], Awaitable[None] | None]


@dataclass
class HealthChecker:
    """One asyncio task per (VIP, real); `sync()` starts and stops them to match the config.

    TCP/HTTP probes bind to `source.pick(family)` when a source is given."""

    on_change: OnChange
    source: Source | None = None
    checks: dict[tuple[str, str], CheckState] = field(default_factory=dict)
    # (VIP key, real) -> SO_MARK for a check through the tunnel (0: wanted, not ready),
    # None for a direct check.
    mark_for: Callable[[str, str], int | None] | None = None

    def sync(self, wanted: dict[tuple[str, str], HealthCheckConfig],
             start_down: frozenset | set = frozenset()) -> None:
        """Start/stop/restart loops to match `wanted`. A new check starts UP, except the
        keys in `start_down` (a restart's saved DOWN verdicts): they need `rise` passes."""
        for key in list(self.checks):
            hc = wanted.get(key)
            # `is` first: configs are shared objects, comparing them field by field is
            # most of a sync of 1,000 unchanged reals
            if hc is None or (hc is not self.checks[key].hc and self.checks[key].hc != hc):
                st = self.checks.pop(key)
                if st.task:
                    st.task.cancel()
                if key in wanted:  # config changed: keep its verdict, restart the loop
                    self._start(key, wanted[key], st.rf.up)
        for key, hc in wanted.items():
            if key not in self.checks:
                down = key in start_down
                if down:
                    log.warning("real %s of %s starts DOWN, as saved before the restart; "
                                "UP after %d passing checks", key[1], key[0], hc.rise)
                self._start(key, hc, not down)

    def _start(self, key, hc: HealthCheckConfig, up: bool) -> None:
        st = CheckState(key[0], key[1], hc, RiseFall(hc.rise, hc.fall, up=up))
        self.checks[key] = st
        self._spawn(st)

    def _spawn(self, st: CheckState, delay: float = 0.0) -> None:
        st.task = asyncio.get_running_loop().create_task(self._loop(st, delay))
        st.task.add_done_callback(lambda t, st=st: self._supervise(st, t))

    def _supervise(self, st: CheckState, task: asyncio.Task) -> None:
        """A loop that ends other than by cancel is a bug: say so, and restart it."""
        if task.cancelled() or self.checks.get((st.vip, st.real)) is not st:
            return
        st.restarts += 1
        exc = task.exception()
        log.error("health check of %s for %s stopped (%s); restarting it in %gs", st.real,
                  st.vip, f"{type(exc).__name__}: {exc}" if exc else "returned", RESTART_DELAY_S,
                  exc_info=exc)
        self._spawn(st, RESTART_DELAY_S)

    async def _source(self, addr: str) -> str | None:
        if self.source is None:
            return None
        try:
            return await self.source.pick(_family(addr))
        except Exception as e:  # noqa: BLE001 - probe unbound rather than not at all
            log.debug("no source address for %s: %s", addr, e)
            return None

    async def _loop(self, st: CheckState, delay: float = 0.0) -> None:
        if delay:
            await asyncio.sleep(delay)
        env = {"L4LB_VIP": st.vip, "L4LB_REAL": st.real, "L4LB_PORT": st.hc.port}
        while True:
            src = None if st.hc.type in ("script", "none") else await self._source(st.real)
            mark = self.mark_for(st.vip, st.real) if self.mark_for else None
            res = await probe(st.real, st.hc, src, env, mark)
            if res.errno == errno.EADDRNOTAVAIL and self.source is not None:
                self.source.invalidate()  # our address went away: look again
            if not res.ok and (st.last is None or st.last.detail != res.detail):
                log.debug("check of %s for %s failed: %s", st.real, st.vip, res.detail)
            st.last = res
            st.checks += 1
            st.failures += 0 if res.ok else 1
            if st.rf.feed(res.ok):
                log.warning("real %s of %s is %s (%s)", st.real, st.vip,
                            "UP" if st.rf.up else "DOWN", res.detail or "check passed")
                await self._notify(st, res)
            await asyncio.sleep(st.hc.interval_s)

    async def _notify(self, st: CheckState, res: ProbeResult) -> None:
        try:
            r = self.on_change(st.vip, st.real, st.rf.up, res.detail)
            if asyncio.iscoroutine(r):
                await r
        except Exception as e:  # noqa: BLE001 - the check goes on; the daemon's problem
            log.error("health change of %s for %s: on_change failed: %s", st.real, st.vip, e)

    def is_up(self, vip: str, real: str) -> bool:
        st = self.checks.get((vip, real))
        return st.rf.up if st else True

    def stop(self) -> None:
        for st in self.checks.values():
            if st.task:
                st.task.cancel()
        self.checks.clear()
