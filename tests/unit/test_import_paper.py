"""The paper's HA pair (section 4.1): lb01/lb02 keepalived.conf + haproxy.cfg -> two l4lb configs.

The failover check runs l4lb's own VRRP state machine on the converted
[[vrrp]] tables, with the track-script weight applied by keepalived's rule
(keepalived.conf(5), vrrp_script: a positive weight is added while the script
succeeds, a negative one subtracted while it fails). The paper's text says the
weight-2 script "reduces priority by 2" on failure (101 - 2 = 99); keepalived
does not do that, and the failover still happens, for a different reason:
lb01 loses its +2 (103 -> 101) while lb02 keeps its +2 (102).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from l4lb.config import Config, TrackScript
from l4lb.importer import Options, import_files
from l4lb.vrrp.agent import machine_config
from l4lb.vrrp.machine import SendAdvert, State, VrrpMachine

PAPER = Path(__file__).resolve().parent.parent / "import_vectors" / "paper"
ADDR = {"lb01": "192.168.1.10", "lb02": "192.168.1.11"}  # the paper's node addresses


def convert(node: str) -> Config:
    res = import_files([str(PAPER / f"{node}-keepalived.conf"), str(PAPER / "haproxy.cfg")],
                       Options(node=node))
    return res.config


@pytest.fixture(scope="module")
def pair() -> dict[str, Config]:
    return {n: convert(n) for n in ("lb01", "lb02")}


def test_vip_and_reals(pair):
    for cfg in pair.values():
        assert [v.key for v in cfg.vips] == ["192.168.1.100:80/tcp"]  # bind *:80 on the keepalived VIP
        vip = cfg.vips[0]
        assert vip.mode == "dr" and vip.hash == "5tuple"
        assert [(str(r.address), r.weight) for r in vip.reals] == [("192.168.1.20", 1), ("192.168.1.21", 1)]
        for r in vip.reals:  # `check` without option httpchk: HAProxy's TCP check, inter 2s rise 2 fall 3
            hc = r.healthcheck
            assert (hc.type, hc.port, hc.interval_s, hc.rise, hc.fall) == ("tcp", 80, 2.0, 2, 3)
    assert pair["lb01"].vips == pair["lb02"].vips  # identical VIP tables: identical Maglev rings


def test_vrrp_instance(pair):
    for node, prio in (("lb01", 101), ("lb02", 100)):
        cfg = pair[node]
        assert cfg.node.name == node and cfg.node.interfaces == ("eth0",)
        (inst,) = cfg.vrrp
        assert (inst.name, inst.interface, inst.vrid, inst.priority) == ("VI_1", "eth0", 51, prio)
        assert inst.version == 2  # keepalived's default, so a keepalived peer understands it
        assert inst.advert_interval_s == 1.0 and inst.auth_pass == "1111" and inst.preempt
        assert inst.vips == (ipaddress.ip_interface("192.168.1.100/24"),)
        assert inst.track_scripts == (
            TrackScript(script=("/usr/bin/killall", "-0", "haproxy"), interval_s=2.0, weight=2, rise=1, fall=1),
        )


def effective(cfg: Config, script_ok: bool) -> int:
    """keepalived's rule for the instance's priority with its track scripts in one state."""
    inst = cfg.vrrp[0]
    offset = sum(t.weight for t in inst.track_scripts
                 if (t.weight > 0 and script_ok) or (t.weight < 0 and not script_ok))
    return max(1, min(254, inst.priority + offset))


def test_weight_arithmetic(pair):
    lb01, lb02 = pair["lb01"], pair["lb02"]
    assert (effective(lb01, True), effective(lb01, False)) == (103, 101)
    assert (effective(lb02, True), effective(lb02, False)) == (102, 100)
    assert effective(lb01, True) > effective(lb02, True)  # healthy: lb01 is master
    assert effective(lb01, False) < effective(lb02, True)  # lb01's script fails: lb02 wins
    assert effective(lb01, False) != 99  # not the paper's 101 - 2


class Pair:
    """Two VrrpMachines on a lossless wire, stepped every 10 ms."""

    def __init__(self, cfgs: dict[str, Config]) -> None:
        self.cfgs = cfgs
        self.m = {n: VrrpMachine(machine_config(c.vrrp[0], ipaddress.ip_address(ADDR[n]))) for n, c in cfgs.items()}
        self.now = 0.0
        self.wire: list[tuple[str, object]] = []

    def other(self, n: str) -> str:
        return "lb02" if n == "lb01" else "lb01"

    def act(self, n: str, actions: list) -> None:
        for a in actions:
            if isinstance(a, SendAdvert):
                self.wire.append((n, a.advert))

    def scripts(self, ok: dict[str, bool]) -> None:
        for n, m in self.m.items():
            base = self.cfgs[n].vrrp[0].priority
            self.act(n, m.set_priority_offset(effective(self.cfgs[n], ok[n]) - base, self.now))

    def run(self, seconds: float) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now = round(self.now + 0.01, 2)
            wire, self.wire = self.wire, []
            for src, adv in wire:
                self.act(self.other(src), self.m[self.other(src)].on_advert(adv, ADDR[src], self.now))
            for n, m in self.m.items():
                dl = m.next_deadline()
                if dl is not None and dl <= self.now:
                    self.act(n, m.on_timer(self.now))

    def states(self) -> dict[str, State]:
        return {n: m.state for n, m in self.m.items()}


def test_track_script_failure_moves_mastership_both_ways(pair):
    p = Pair(pair)
    p.scripts({"lb01": True, "lb02": True})
    for n, m in p.m.items():
        p.act(n, m.start(p.now))
    p.run(10)
    assert p.states() == {"lb01": State.MASTER, "lb02": State.BACKUP}
    assert p.m["lb01"].priority == 103 and p.m["lb02"].priority == 102

    p.scripts({"lb01": False, "lb02": True})  # `systemctl stop haproxy` on lb01
    p.run(10)
    assert p.m["lb01"].priority == 101
    assert p.states() == {"lb01": State.BACKUP, "lb02": State.MASTER}

    p.scripts({"lb01": True, "lb02": True})  # haproxy back on lb01: it preempts (no preempt_delay)
    p.run(10)
    assert p.states() == {"lb01": State.MASTER, "lb02": State.BACKUP}


def test_report_explains_the_weight(pair):
    res = import_files([str(PAPER / "lb01-keepalived.conf")], Options(node="lb01"))
    notes = [f for f in res.report.findings if f.directive == "weight"]
    assert len(notes) == 1
    assert notes[0].loc.line == 21  # the track_script line naming chk_haproxy
    assert "adds 2 to the priority while the script succeeds" in notes[0].message
    assert "VI_1: priority 101; with tracks 101..103" in res.text
