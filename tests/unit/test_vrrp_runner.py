"""The VRRP runners (l4lb/vrrp/runner.py): agents on their own loop, in a thread (with
fake sockets) or in a child process (in a network namespace of its own, on a veth); transitions handed to the caller's loop in order, adverts on time while
the caller's loop is blocked, SCHED_RR and what happens when the system refuses it."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import threading
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from test_vrrp_agent import ME4, FakeL2, FakeNetlink, FakeTransport, _cfg

from l4lb.vrrp import runner as R
from l4lb.vrrp.agent import AgentError


def make_runner(cfgs, events=None, nl=None, **kw):
    fakes = {}

    def kwargs_for(cfg):
        fakes[cfg.name] = (nl or FakeNetlink(), FakeTransport(4, ME4), FakeL2())
        n, t, l2 = fakes[cfg.name]
        return {"netlink": n, "transport": t, "l2": l2}

    def on_state(old, new, instance):
        if events is not None:
            events.append((old, new, instance, threading.get_ident()))

    return R.VrrpRunner(cfgs, on_state, agent_kwargs_for=kwargs_for, **kw), fakes


async def wait_state(runner, i, state, timeout=3.0):
    t0 = time.monotonic()
    while runner[i].status()["state"] != state:
        assert time.monotonic() - t0 < timeout, runner[i].status()["state"]
        await asyncio.sleep(0.01)


def test_agents_run_in_their_thread_and_report_to_the_callers_loop():
    async def run():
        events = []
        runner, fakes = make_runner([_cfg(priority=100)], events)
        await runner.start()
        assert len(runner) == 1 and runner[0].name == "VI_1"
        assert runner.agents[0]._loop is not asyncio.get_running_loop()
        assert runner.native_id != threading.get_native_id()
        await wait_state(runner, 0, "master")  # no peer: takes over after MDI
        st = runner[0].status()
        assert st["vips_held"] and st["runner"]["rt_active"] is False
        assert [a.status()["state"] for a in runner] == ["master"]
        await runner.stop(graceful=True)
        _nl, tr, _l2 = fakes["VI_1"]
        assert tr.adverts()[-1].priority == 0 and tr.closed
        assert runner[0].status()["state"] == "initialize"
        await asyncio.sleep(0.05)  # the last transition's callback
        me = threading.get_ident()
        assert [(o, n, i) for o, n, i, _t in events] == [
            ("initialize", "backup", "VI_1"), ("backup", "master", "VI_1"),
            ("master", "initialize", "VI_1")]
        assert all(t == me for *_x, t in events)  # on the caller's loop, not the VRRP thread
        assert not runner._thread.is_alive()

    asyncio.run(run())


def test_adverts_keep_their_interval_while_the_callers_loop_is_blocked():
    async def run():
        runner, fakes = make_runner([_cfg(priority=100)])
        await runner.start()
        await wait_state(runner, 0, "master")
        _nl, tr, _l2 = fakes["VI_1"]
        n0 = len(tr.sent)
        time.sleep(1.0)  # the daemon's loop held for a second (a map walk on the loop)
        sent = tr.sent[n0:]
        await asyncio.sleep(0.2)  # the probe's callback runs now; the thread records it
        th = runner[0].status()["runner"]
        await runner.stop()
        gaps = [b[0] - a[0] for a, b in zip(sent, sent[1:], strict=False)]
        assert len(sent) >= 8, len(sent)  # 0.1 s adverts through a 1 s block
        assert max(gaps) < 0.25, gaps
        main = th["loop_lag"]["main"]
        assert main["max_ms"] >= 900 and main["recent_max_ms"] >= 900, main
        assert th["loop_lag"]["vrrp"]["count"] > 20

    asyncio.run(run())


def test_a_failed_start_raises_and_ends_the_thread():
    async def run():
        runner, _ = make_runner([_cfg(priority=100)], nl=FakeNetlink(links={}))
        with pytest.raises(AgentError, match="interface eth0 not found"):
            await runner.start()
        assert not runner._thread.is_alive()
        assert runner[0].status()["state"] == "initialize"
        await runner.stop()  # harmless

    asyncio.run(run())


def test_realtime_priority_applies_to_the_vrrp_thread_only():
    async def run():
        runner, _ = make_runner([_cfg(priority=100)], rt_priority=10)
        await runner.start()
        try:
            assert runner[0].status()["runner"]["rt_active"] is True
            # SCHED_RR, and children / threads it starts run normal
            assert os.sched_getscheduler(runner.native_id) == \
                os.SCHED_RR | os.SCHED_RESET_ON_FORK
            assert os.sched_getparam(runner.native_id).sched_priority == 10
            assert os.sched_getscheduler(0) == os.SCHED_OTHER  # this thread unchanged
        finally:
            await runner.stop()

    asyncio.run(run())


def test_a_refused_realtime_priority_warns_and_runs_normal(monkeypatch, caplog):
    def refuse(*_a):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(R.os, "sched_setscheduler", refuse)

    async def run():
        runner, _ = make_runner([_cfg(priority=100)], rt_priority=50)
        await runner.start()
        try:
            await wait_state(runner, 0, "master")
            th = runner[0].status()["runner"]
            assert th["rt_priority"] == 50 and th["rt_active"] is False
            assert "Operation not permitted" in th["rt_error"] and "CAP_SYS_NICE" in th["rt_error"]
        finally:
            await runner.stop()

    with caplog.at_level(logging.WARNING, logger="l4lb.vrrp"):
        asyncio.run(run())
    assert any("vrrp_rt_priority = 50 refused" in r.getMessage() for r in caplog.records)


def test_rt_priority_out_of_range_is_refused():
    with pytest.raises(ValueError, match="vrrp_rt_priority 100"):
        R.VrrpRunner([_cfg()], rt_priority=100)


def test_metrics_families():
    async def run():
        runner, _ = make_runner([_cfg(priority=100)])
        await runner.start()
        await asyncio.sleep(0.3)
        reg = CollectorRegistry(auto_describe=False)

        class C:
            def collect(self):
                yield from runner.metrics()

        reg.register(C())
        text = generate_latest(reg).decode()
        await runner.stop()
        return text

    text = asyncio.run(run())
    assert 'l4lb_event_loop_lag_seconds_bucket{le="+Inf",loop="main"}' in text
    assert 'l4lb_event_loop_lag_seconds_count{loop="vrrp"}' in text
    assert "l4lb_vrrp_realtime 0.0" in text


def test_lag_stats_buckets_and_recent_window():
    s = R.LagStats()
    s.record(0.0005, 0.0)
    s.record(0.03, 1.0)
    s.record(2.5, 2.0)
    snap = s.snapshot()
    assert snap["count"] == 3 and snap["max_ms"] == 2500.0
    assert snap["buckets"][0] == 1 and snap["buckets"][R.LAG_BUCKETS.index(0.05)] == 1
    assert snap["buckets"][R.LAG_BUCKETS.index(5.0)] == 1
    s.record(0.001, 2.0 + R.RECENT_S + 1)  # the older ones leave the window
    assert s.snapshot()["recent_max_ms"] == 1.0 and s.snapshot()["max_ms"] == 2500.0


# ---- the process (what the daemon runs) ------------------------------------------------

# The child in a namespace of its own (gone with it) with one veth pair: nothing
# on this host is touched. `exec` keeps the child's pid, so PDEATHSIG and the parent
# check see the test process as parent.
NETNS = ["unshare", "--net", "sh", "-c",
         "ip link add d0 type veth peer name d1 && ip addr add 10.77.0.1/24 dev d0 && "
         "ip link set d1 up && ip link set d0 up && exec \"$@\"", "sh"]


def _dummy_cfg(**kw):
    from ipaddress import IPv4Interface  # noqa: PLC0415

    return _cfg(interface="d0", vips=(IPv4Interface("10.77.0.100/24"),), **kw)


def test_process_runs_the_agents_and_stops_them_gracefully():
    async def run():
        events = []
        p = R.VrrpProcess([_dummy_cfg(priority=100)],
                          lambda o, n, i: events.append((o, n, i, threading.get_ident())),
                          rt_priority=5, child_prefix=NETNS)
        await p.start()
        pid = p.proc.pid
        assert pid != os.getpid()
        await wait_state(p, 0, "master")  # nobody else on d0/d1: master after MDI
        st = p[0].status()
        assert st["vips_held"] and st["master_address"] == "10.77.0.1"
        rs = st["runner"]
        assert rs["mode"] == "process" and rs["pid"] == pid and rs["rt_active"] is True
        assert os.sched_getscheduler(rs["native_id"]) == os.SCHED_RR | os.SCHED_RESET_ON_FORK
        # the child's start-up objects are frozen out of the collector (no 100 ms full GCs)
        assert rs["gc"]["frozen"] > 10_000 and len(rs["gc"]["max_ms"]) == 3
        time.sleep(0.5)  # this loop blocked: the child goes on advertising
        sent0 = st["counters"]["adverts_sent"]
        await asyncio.sleep(0.1)
        assert p[0].status()["counters"]["adverts_sent"] >= sent0 + 4
        assert p[0].status()["runner"]["loop_lag"]["main"]["max_ms"] >= 400
        await p.stop(graceful=True)
        assert p.proc.returncode == 0
        st = p[0].status()
        assert st["state"] == "initialize" and st["counters"]["priority_zero_sent"] == 1
        assert [(o, n) for o, n, _i, _t in events] == [
            ("initialize", "backup"), ("backup", "master"), ("master", "initialize")]
        assert all(t == threading.get_ident() for *_x, t in events)

    asyncio.run(run())


def test_process_start_failure_is_the_agents_error():
    async def run():
        p = R.VrrpProcess([_cfg(priority=100, interface="nosuch0")], child_prefix=NETNS)
        with pytest.raises(AgentError, match="interface nosuch0 not found"):
            await p.start()
        assert p.proc.returncode == 1
        await p.stop()  # harmless

    asyncio.run(run())


def test_process_killed_with_the_daemon_and_a_crash_shows_in_status():
    async def run():
        p = R.VrrpProcess([_dummy_cfg(priority=100)], child_prefix=NETNS)
        await p.start()
        os.kill(p.proc.pid, 9)  # a crash of the VRRP process
        t0 = time.monotonic()
        while "(code -9)" not in (p[0].status().get("error") or ""):
            assert time.monotonic() - t0 < 5
            await asyncio.sleep(0.02)
        st = p[0].status()
        assert st["state"] == "initialize" and "exited (code -9)" in st["error"]
        await p.stop()

    asyncio.run(run())


def test_process_dies_with_a_sigkilled_daemon():
    # A "daemon" that starts the VRRP process and waits; kill -9 of it must take the
    # VRRP process along (no priority 0, as a killed daemon could not send one).
    code = f"""
import asyncio, sys
from ipaddress import IPv4Interface
from l4lb.config import VrrpConfig
from l4lb.vrrp.runner import VrrpProcess
async def main():
    cfg = VrrpConfig(name="VI_1", interface="d0", vrid=51, advert_interval_s=0.1,
                     vips=(IPv4Interface("10.77.0.100/24"),))
    p = VrrpProcess([cfg], child_prefix={NETNS!r})
    await p.start()
    print(p.proc.pid, flush=True)
    await asyncio.sleep(60)
asyncio.run(main())
"""
    daemon = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        child = int(daemon.stdout.readline())
        os.kill(child, 0)  # alive
        daemon.kill()
        daemon.wait(5)
        t0 = time.monotonic()
        while _alive(child):
            assert time.monotonic() - t0 < 5, "the VRRP process outlived the daemon"
            time.sleep(0.02)
    finally:
        daemon.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
