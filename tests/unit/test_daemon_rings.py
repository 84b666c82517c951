"""Run-time changes build no Maglev ring on the event loop: the daemon fills every ring
a change (or a health verdict) will publish in a thread first, and the planner finds
it made. The daemon runs here on the real planner with a writer that keeps the maps as
dicts (no BPF), and its health-check wanted list is kept by what changed."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest

from l4lb import maglev, netutil
from l4lb.config import config_from_dict
from l4lb.daemon import Daemon, _health_wanted
from l4lb.dataplane.loader import BuildOptions
from l4lb.dataplane.plan import Planner, TableState

RING = 4099
VIP = "10.99.0.100:80/tcp"


class PlanTables:
    """ServiceTables' interface on the real planner; the maps are dicts."""

    def __init__(self):
        self.opts = BuildOptions(ring_max=RING)
        self.state = TableState.empty(self.opts.max_vips, self.opts.max_reals, RING)
        self.planner = Planner(self.state)
        self.vips = self.state.vips
        self.slots, self.live = {}, {}

    def _run(self, plan):
        for w in plan.writes:
            if w.op == "ring":
                self.slots[w.args[0]] = list(w.args[1])
            elif w.op == "flip":
                vs, n = w.args
                self.live[vs.key] = self.slots[2 * vs.vip_id + vs.slot][:n]
        for f in plan.commit:
            f()
        return plan.result

    def upsert_vip(self, address, port, proto="tcp", **kw):
        return self._run(self.planner.upsert_vip(address, port, proto, **kw))

    def set_reals(self, key, reals):
        return self._run(self.planner.set_reals(key, reals, 1.0))

    def delete_vip(self, key):
        self._run(self.planner.delete_vip(key))

    def set_down(self, key, address, down):
        return self._run(self.planner.set_down(key, address, down))


class Health:
    """Verdicts set by the test; sync() records what it was given."""

    def __init__(self):
        self.checks: dict = {}
        self.down: set = set()
        self.synced: dict = {}

    def sync(self, wanted, start_down=frozenset()):
        self.synced = dict(wanted)

    def is_up(self, vip, real):
        return (vip, real) not in self.down

    def stop(self):
        pass


def cfg(n=40):
    return config_from_dict({
        "node": {"name": "lbt", "interfaces": ["lo"], "api_socket": "/nonexistent/api.sock"},
        "healthcheck": {"type": "tcp"},
        "vip": [{"address": "10.99.0.100", "port": 80, "ring_size": RING,
                 "real": [{"address": f"10.98.0.{i}", "mac": "02:00:00:00:00:01"}
                          for i in range(1, n + 1)]},
                {"address": "10.99.0.101", "port": 53, "protocol": "udp", "ring_size": RING,
                 "real": [{"address": "10.98.1.1", "mac": "02:00:00:00:00:02",
                           "healthcheck": {"type": "none"}}]}],
    })


@pytest.fixture
def fills(monkeypatch):
    monkeypatch.setattr(maglev, "_PREPARED", maglev._Prepared())
    made = []
    real = maglev._fill

    def counting(live, size):
        made.append(threading.current_thread() is threading.main_thread())
        return real(live, size)
    monkeypatch.setattr(maglev, "_fill", counting)
    return made


def expected(t, key):
    vs = t.vips[key]
    return list(maglev.build_ring([maglev.Backend(r.real_id, r.address, r.weight)
                                   for r in vs.reals.values() if not r.down], vs.ring_size))


def test_changes_and_health_verdicts_fill_rings_in_threads(fills, monkeypatch):
    monkeypatch.setattr(netutil, "resolve_mac", lambda addr, timeout: None)  # silent
    d = Daemon(cfg())
    d.tables, d.health, d.ready = PlanTables(), Health(), True
    t = d.tables

    def real(i, **kw):
        return dict({"address": f"10.98.0.{i}", "mac": "02:00:00:00:00:03"}, **kw)

    def add(i, **kw):
        return lambda data: data["vip"][0]["real"].append(real(i, **kw))

    def weight(j, w):
        return lambda data: data["vip"][0]["real"][j].__setitem__("weight", w)

    def delete(addr):
        return lambda data: data["vip"][0]["real"].remove(
            next(r for r in data["vip"][0]["real"] if r["address"] == addr))

    async def main():
        await d.apply(d.cfg, initial=True)
        start = len(fills)
        await d.change(add(200))
        await d.change(weight(3, 7))
        await d.change(delete("10.98.0.200"))        # a memo hit: no fill at all
        await d.change(add(201, weight=0))           # drained from the start
        await d.change(lambda data: data["vip"][0]["real"].append(
            {"address": "10.98.0.202"}))             # no MAC (it does not answer): down
        assert t.vips[VIP].reals["10.98.0.202"].down
        await d._on_health(VIP, "10.98.0.5", False, "refused")
        assert t.vips[VIP].reals["10.98.0.5"].down
        await d._on_health(VIP, "10.98.0.5", True, "")
        d.health.down.add((VIP, "10.98.0.201"))
        await d.change(weight(-2, 50))                # back from drain, but its check is down
        await d.change(lambda data: data["vip"][0].__setitem__("ring_size", 4093))
        # a real deleted while down comes back: retired down, then up by the refresh
        await d._on_health(VIP, "10.98.0.6", False, "refused")
        await d.change(delete("10.98.0.6"))
        assert t.vips[VIP].retired["10.98.0.6"].down
        await d.change(add(6))
        assert not t.vips[VIP].reals["10.98.0.6"].down
        return start

    start = asyncio.run(main())
    assert fills[start:] and not any(fills[start:]), "a ring was filled on the event loop"
    assert t.live[VIP] == expected(t, VIP)
    assert t.vips[VIP].ring_size == 4093 and len(t.live[VIP]) == 4093


def test_the_health_wanted_list_and_signatures_follow_changes_by_what_changed():
    rng = random.Random(13)
    d = Daemon(cfg(30))
    d.tables, d.health, d.ready = PlanTables(), Health(), True

    def full(c):
        return {(v.key, str(r.address)): r.healthcheck for v in c.vips for r in v.reals}

    async def main():
        await d.apply(d.cfg, initial=True)
        assert d.health.synced == full(d.cfg)
        for step in range(40):
            n = len(d.cfg.vips[0].reals)
            j = rng.randrange(n)
            op = rng.choice(["add", "del", "weight", "hc"])
            if op == "add":
                a = f"10.98.2.{rng.randint(1, 250)}"
                mut = lambda data, a=a: data["vip"][0]["real"].append(  # noqa: E731
                    {"address": a, "mac": "02:00:00:00:00:04"})
            elif op == "del" and n > 2:
                mut = lambda data, j=j: data["vip"][0]["real"].pop(j)  # noqa: E731
            elif op == "hc":
                p = rng.choice([81, 82])
                mut = lambda data, j=j, p=p: data["vip"][0]["real"][j].__setitem__(  # noqa: E731
                    "healthcheck", {"port": p})
            else:
                w = rng.randint(0, 9)
                mut = lambda data, j=j, w=w: data["vip"][0]["real"][j].__setitem__(  # noqa: E731
                    "weight", w)
            try:
                await d.change(mut)
            except Exception as e:  # a duplicate address: refused whole, nothing changes
                assert "duplicates" in str(e), e
            assert d.health.synced == full(d.cfg), step
            # the signature, kept by what changed too, is the one made from scratch
            v = d.cfg.vips[0]
            assert d._signature(v)[4] == tuple((str(r.address), d._mac_for(r), r.weight)
                                               for r in v.reals), step
        # a reload: every object new, the same list
        await d.apply(config_from_dict({"node": {"name": "lbt", "interfaces": ["lo"]},
                                        "vip": [{"address": "10.99.0.102", "port": 80,
                                                 "ring_size": RING,
                                                 "real": [{"address": "10.98.3.1"}]}]}))
        assert d.health.synced == full(d.cfg)

    asyncio.run(main())


def test_health_wanted_alone():
    a, b = cfg(5), cfg(6)
    wanted: dict = {}
    old = _health_wanted(wanted, {}, a)
    assert wanted == {(v.key, str(r.address)): r.healthcheck for v in a.vips for r in v.reals}
    _health_wanted(wanted, old, b)
    assert wanted == {(v.key, str(r.address)): r.healthcheck for v in b.vips for r in v.reals}
