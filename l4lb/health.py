"""Health checks of reals: TCP connect, HTTP(S) GET, or a script; rise/fall thresholds.

`RiseFall` is the pure verdict logic; `HealthChecker` runs one probe loop per
(VIP, real) in asyncio and reports transitions through a callback.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from l4lb.config import HealthCheckConfig

log = logging.getLogger("l4lb.health")


@dataclass
class RiseFall:
    """Up after `rise` passes in a row, down after `fall` failures in a row.
    A new real starts up (like LVS with a fresh real server) unless told otherwise."""

    rise: int
    fall: int
    up: bool = True
    streak: int = 0  # consecutive results that disagree with `up`

    def feed(self, ok: bool) -> bool:
        """Feed one result; True when the state flipped."""
        if ok == self.up:
            self.streak = 0
            return False
        self.streak += 1
        if self.streak >= (self.rise if ok else self.fall):
            self.up = ok
            self.streak = 0
            return True
        return False


@dataclass
class ProbeResult:
    ok: bool
    latency_s: float
    detail: str = ""


async def probe(addr: str, hc: HealthCheckConfig) -> ProbeResult:
    t0 = time.monotonic()
    try:
        detail = await asyncio.wait_for(_probe(addr, hc), hc.timeout_s)
        return ProbeResult(detail == "", time.monotonic() - t0, detail)
    except asyncio.TimeoutError:
        return ProbeResult(False, time.monotonic() - t0, f"timeout after {hc.timeout_s}s")
    except OSError as e:
        return ProbeResult(False, time.monotonic() - t0, e.strerror or str(e))


async def _probe(addr: str, hc: HealthCheckConfig) -> str:
    """'' when healthy, else what failed."""
    if hc.type == "none":
        return ""
    if hc.type == "script":
        proc = await asyncio.create_subprocess_exec(*hc.script, stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.DEVNULL)
        try:
            rc = await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        return "" if rc == 0 else f"script exited {rc}"
    ctx = None
    if hc.type == "https":
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    reader, writer = await asyncio.open_connection(addr, hc.port, ssl=ctx)
    try:
        if hc.type == "tcp":
            return ""
        host = hc.http_host or (f"[{addr}]" if ":" in addr else addr)
        writer.write(f"GET {hc.http_path} HTTP/1.0\r\nHost: {host}\r\n"
                     f"User-Agent: l4lb-health\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        line = await reader.readline()
        parts = line.decode(errors="replace").split()
        if len(parts) < 2 or not parts[1].isdigit():
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


OnChange = Callable[[str, str, bool, str], Awaitable[None] | None]


@dataclass
class HealthChecker:
    """One asyncio task per (VIP, real); `sync()` starts and stops them to match the config."""

    on_change: OnChange
    checks: dict[tuple[str, str], CheckState] = field(default_factory=dict)

    def sync(self, wanted: dict[tuple[str, str], HealthCheckConfig]) -> None:
        for key in list(self.checks):
            if key not in wanted or self.checks[key].hc != wanted[key]:
                st = self.checks.pop(key)
                if st.task:
                    st.task.cancel()
                if key in wanted:  # config changed: keep its verdict, restart the loop
                    self._start(key, wanted[key], st.rf.up)
        for key, hc in wanted.items():
            if key not in self.checks:
                self._start(key, hc, True)

    def _start(self, key, hc: HealthCheckConfig, up: bool) -> None:
        st = CheckState(key[0], key[1], hc, RiseFall(hc.rise, hc.fall, up=up))
        self.checks[key] = st
        st.task = asyncio.get_running_loop().create_task(self._loop(st))

    async def _loop(self, st: CheckState) -> None:
        while True:
            res = await probe(st.real, st.hc)
            st.last = res
            st.checks += 1
            st.failures += 0 if res.ok else 1
            if st.rf.feed(res.ok):
                log.warning("real %s of %s is %s (%s)", st.real, st.vip,
                            "UP" if st.rf.up else "DOWN", res.detail or "check passed")
                r = self.on_change(st.vip, st.real, st.rf.up, res.detail)
                if asyncio.iscoroutine(r):
                    await r
            await asyncio.sleep(st.hc.interval_s)

    def is_up(self, vip: str, real: str) -> bool:
        st = self.checks.get((vip, real))
        return st.rf.up if st else True

    def stop(self) -> None:
        for st in self.checks.values():
            if st.task:
                st.task.cancel()
        self.checks.clear()
