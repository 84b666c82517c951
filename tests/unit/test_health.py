"""Health checks: a probe never raises, loops never die silently, probes bind to the
node's own address, scripts go through l4lb.scripts."""

from __future__ import annotations

import asyncio
import errno
import logging
from pathlib import Path

import pytest

from l4lb import health
from l4lb.config import HealthCheckConfig
from l4lb.health import HealthChecker, RiseFall, probe

KEY = ("10.0.0.100:80/tcp", "127.0.0.1")


def hc(port: int, type_: str = "http", **kw) -> HealthCheckConfig:
    base = {"type": type_, "port": port, "interval_s": 0.05, "timeout_s": 1.0,
            "rise": 1, "fall": 2}
    base.update(kw)
    return HealthCheckConfig(**base)


class HttpServer:
    """A server whose answer (bytes) the test changes; records the peers it saw."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.peers: list[str] = []
        self.server = None

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.server.close()

    async def _handle(self, reader, writer):
        self.peers.append(writer.get_extra_info("peername")[0])
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(self.answer)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


class Recorder:
    def __init__(self) -> None:
        self.changes: list[tuple[bool, str]] = []
        self.event = asyncio.Event()

    def __call__(self, vip, real, up, detail):
        self.changes.append((up, detail))
        self.event.set()

    async def wait(self, n: int, timeout: float = 10.0) -> None:
        async def until():
            while len(self.changes) < n:
                self.event.clear()
                await self.event.wait()
        await asyncio.wait_for(until(), timeout)


def test_rise_fall():
    rf = RiseFall(rise=2, fall=3)
    assert [rf.feed(x) for x in (False, False, True, False, False, False)] == \
        [False, False, False, False, False, True]
    assert not rf.up
    assert [rf.feed(x) for x in (True, False, True, True)] == [False, False, False, True]
    assert rf.up


def test_rise_fall_first_result_decides():
    """up=None (VRRP track scripts): the first result sets the state, then rise/fall."""
    rf = RiseFall(rise=2, fall=1, up=None)
    assert rf.feed(False) and rf.up is False
    assert [rf.feed(x) for x in (True, False, True, True, False)] == \
        [False, False, False, True, True]
    assert rf.up is False
    assert RiseFall(rise=3, fall=3, up=None).feed(True)


def test_huge_status_line_is_a_failed_check_and_the_check_goes_on():
    async def run():
        async with HttpServer(b"HTTP/1.0 200 " + b"x" * 70_000 + b"\r\n\r\n") as srv:
            rec = Recorder()
            hcx = HealthChecker(rec)
            hcx.sync({KEY: hc(srv.port)})
            await rec.wait(1)
            st = hcx.checks[KEY]
            assert rec.changes == [(False, "HTTP status line longer than 8192 bytes")]
            assert not hcx.is_up(*KEY) and not st.task.done()
            n = st.checks
            srv.answer = b"HTTP/1.0 200 OK\r\n\r\n"  # the same loop sees it recover
            await rec.wait(2)
            assert rec.changes[1] == (True, "") and hcx.is_up(*KEY)
            assert st.checks > n and st.restarts == 0
            hcx.stop()

    asyncio.run(run())


@pytest.mark.parametrize("answer, detail", [
    (b"", "connection closed before an HTTP status line"),
    (b"HTTP/1.0 503 Busy\r\n\r\n", "HTTP 503, expected 200"),
    (b"SSH-2.0-OpenSSH_9.2\r\n", "bad HTTP status line b'SSH-2.0-OpenSSH_9.2\\r\\n'"),
    (b"HTTP/1.0 200 OK", ""),  # no line end before close: still a status line
    (b"\xff\xfe\x00garbage\n", "bad HTTP status line b'\\xff\\xfe\\x00garbage\\n'"),
])
def test_http_answers(answer, detail):
    async def run():
        async with HttpServer(answer) as srv:
            return await probe("127.0.0.1", hc(srv.port))

    res = asyncio.run(run())
    assert (res.ok, res.detail) == (detail == "", detail)


def test_any_exception_in_a_probe_is_a_failed_check(monkeypatch):
    async def boom(*args):
        raise RuntimeError("something nobody expected")

    monkeypatch.setattr(health, "_probe", boom)
    res = asyncio.run(probe("127.0.0.1", hc(80, "tcp")))
    assert not res.ok and res.detail == "RuntimeError: something nobody expected"


def test_failures_are_logged_per_state_change_not_per_probe(caplog):
    async def run():
        rec = Recorder()
        hcx = HealthChecker(rec)
        # nothing listens on port 1 of 127.0.0.1: connection refused, every 50 ms
        hcx.sync({KEY: hc(1, "tcp")})
        await rec.wait(1)
        while hcx.checks[KEY].checks < 12:
            await asyncio.sleep(0.05)
        hcx.stop()
        return rec

    with caplog.at_level(logging.INFO, logger="l4lb.health"):
        rec = asyncio.run(run())
    assert rec.changes == [(False, "Connection refused")]
    msgs = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert msgs == ["real 127.0.0.1 of 10.0.0.100:80/tcp is DOWN (Connection refused)"]


def test_a_failing_callback_or_a_dying_loop_does_not_stop_the_check(monkeypatch, caplog):
    calls = []

    def bad_callback(vip, real, up, detail):
        calls.append(up)
        raise ValueError("the daemon had a bad day")

    real_probe = health.probe
    crashed = []

    async def flaky_probe(*a, **kw):  # the loop itself crashes once (a bug in our code)
        if not crashed:
            crashed.append(1)
            raise KeyError("bug")
        return await real_probe(*a, **kw)

    monkeypatch.setattr(health, "probe", flaky_probe)
    monkeypatch.setattr(health, "RESTART_DELAY_S", 0.05)

    async def run():
        hcx = HealthChecker(bad_callback)
        hcx.sync({KEY: hc(1, "tcp")})
        while len(calls) < 1 or hcx.checks[KEY].checks < 5:
            await asyncio.sleep(0.05)
        st = hcx.checks[KEY]
        assert st.restarts == 1 and not st.task.done()
        hcx.stop()

    with caplog.at_level(logging.ERROR, logger="l4lb.health"):
        asyncio.run(asyncio.wait_for(run(), 10))
    assert calls == [False]
    msgs = [r.getMessage() for r in caplog.records]
    assert any("stopped (KeyError: 'bug'); restarting it" in m for m in msgs), msgs
    assert any("on_change failed: the daemon had a bad day" in m for m in msgs), msgs


class FixedSource:
    def __init__(self, addr: str | None) -> None:
        self.addr = addr
        self.families: list[int] = []
        self.invalidated = 0

    async def pick(self, family: int) -> str | None:
        self.families.append(family)
        return self.addr

    def invalidate(self) -> None:
        self.invalidated += 1


def test_probes_bind_to_the_source_address():
    async def run():
        async with HttpServer(b"HTTP/1.0 200 OK\r\n\r\n") as srv:
            src = FixedSource("127.0.0.2")
            rec = Recorder()
            hcx = HealthChecker(rec, source=src)
            hcx.sync({KEY: hc(srv.port)})
            while hcx.checks[KEY].checks < 3:
                await asyncio.sleep(0.02)
            hcx.stop()
            return srv.peers, src, hcx

    peers, src, _ = asyncio.run(run())
    assert peers and set(peers) == {"127.0.0.2"}
    assert set(src.families) == {4}


def test_a_source_address_that_went_away_is_looked_up_again():
    async def run():
        src = FixedSource("192.0.2.77")  # not ours: bind fails with EADDRNOTAVAIL
        hcx = HealthChecker(Recorder(), source=src)
        hcx.sync({KEY: hc(80, "tcp")})
        while hcx.checks[KEY].checks < 2:
            await asyncio.sleep(0.02)
        hcx.stop()
        return src, hcx

    src, hcx = asyncio.run(run())
    assert src.invalidated >= 2
    assert not hcx.checks  # stopped


def test_script_check_runs_through_l4lb_scripts(tmp_path: Path):
    d = tmp_path / "bin"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    out = tmp_path / "args"
    s = d / "check"
    s.write_text(f"#!/bin/sh\necho \"$L4LB_VIP $L4LB_REAL $L4LB_PORT $*\" > {out}\nexit 1\n")
    s.chmod(0o755)
    res = asyncio.run(probe("10.0.0.1", hc(8080, "script", script=(str(s), "-x")),
                            env={"L4LB_VIP": "v", "L4LB_REAL": "10.0.0.1", "L4LB_PORT": 8080}))
    assert not res.ok and res.detail == "script exited 1"
    assert out.read_text() == "v 10.0.0.1 8080 -x\n"
    s.chmod(0o777)
    res = asyncio.run(probe("10.0.0.1", hc(8080, "script", script=(str(s),))))
    assert not res.ok and res.detail.startswith(f"script refused: script {s} is writable")
    s.chmod(0o755)
    s.write_text("#!/bin/sh\nsleep 300\n")
    res = asyncio.run(probe("10.0.0.1", hc(8080, "script", script=(str(s),), timeout_s=0.3)))
    assert res.detail == "script timed out after 0.3s; process group killed"


def test_oserror_keeps_its_errno():
    res = asyncio.run(probe("127.0.0.1", hc(80, "tcp"), source="192.0.2.77"))
    assert not res.ok and res.errno == errno.EADDRNOTAVAIL


def test_a_saved_down_verdict_needs_rise_passes(caplog):
    """A restart's saved DOWN: the real starts DOWN (is_up False before any probe) and
    comes UP only after `rise` passing checks; other reals start UP as before."""
    other = ("10.0.0.100:80/tcp", "127.0.0.2")

    async def run():
        async with HttpServer(b"HTTP/1.0 200 OK\r\n\r\n") as srv:
            rec = Recorder()
            hcx = HealthChecker(rec)
            hcx.sync({KEY: hc(srv.port, rise=3), other: hc(srv.port, type_="none")},
                     start_down={KEY})
            before = (hcx.is_up(*KEY), hcx.is_up(*other))
            await rec.wait(1)
            passes = hcx.checks[KEY].checks
            hcx.stop()
            return before, rec.changes, passes

    with caplog.at_level(logging.INFO, logger="l4lb.health"):
        before, changes, passes = asyncio.run(run())
    assert before == (False, True)
    assert changes == [(True, "")] and passes == 3
    assert any("starts DOWN, as saved before the restart" in r.getMessage()
               for r in caplog.records)


def test_a_tunnel_check_that_cannot_run_fails_and_says_why():
    """mark 0: the check wants the tunnel but its tc program or real id is missing."""
    res = asyncio.run(probe("127.0.0.1", hc(1, "tcp"), mark=0))
    assert not res.ok and res.detail.startswith("tunnel health check not ready")


def test_a_tunnel_check_marks_its_socket(monkeypatch):
    """The probe socket carries the mark (what bpf/hc_tunnel.c matches on)."""
    import socket as socket_mod

    seen = []
    real_setsockopt = socket_mod.socket.setsockopt

    class Spy(socket_mod.socket):
        def setsockopt(self, *a):
            seen.append(a)
            return real_setsockopt(self, *a)

    monkeypatch.setattr(health.socket, "socket", Spy)

    async def run():
        async with HttpServer(b"HTTP/1.0 200 OK\r\n\r\n") as srv:
            return await probe("127.0.0.1", hc(srv.port, "http"), mark=0x4C000007)

    res = asyncio.run(run())
    assert res.ok, res
    assert (socket_mod.SOL_SOCKET, socket_mod.SO_MARK, 0x4C000007) in seen
