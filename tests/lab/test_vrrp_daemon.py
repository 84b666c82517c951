"""VRRP through the real daemon (issue 5, "Lab tests"): two `l4lb start` nodes with
the same VRID in front of nginx on two reals (DR, generic XDP).

One lab, in order:
  * lb1 (priority 150, preempt after 1 s) is master, lb2 (100) backup; the backup's
    data plane is loaded and ready (XDP attached, VIP programmed, reals in the ring)
    but it holds no VIP and forwards nothing;
  * kill -9 of lb1's daemon: lb2 takes over after Master_Down_Interval and serves
    the VIP. The split-brain caveat: lb1's host stays up with XDP attached and the
    VIP still on its interface, yet the client's traffic goes through exactly one
    balancer: across a burst of requests only lb2's counters rise (lb1's are read
    from its pinned maps when its daemon is back);
  * lb1 restarted: it takes the VIP back after preempt_delay;
  * lb1's link down: lb2 serves; link up: lb1 takes back after preempt_delay;
  * SIGTERM of lb1's daemon: it sends priority 0, lb2 takes over after Skew_Time,
    well before Master_Down_Interval;
  * lb1 restarted with preempt = false: lb2 stays master.
"""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from l4lb import api
from l4lb.lab import Lab, wait_for

pytestmark = pytest.mark.timeout(240)

VIP = "10.99.0.100"
VIP_KEY = f"{VIP}:80/tcp"
INTERVAL = 0.1
PREEMPT_DELAY = 1.0
MDI_100 = 3 * INTERVAL + (256 - 100) / 256 * INTERVAL  # lb2's Master_Down_Interval
SKEW_100 = (256 - 100) / 256 * INTERVAL
SLACK = 0.5  # scheduling on a loaded 2-core machine
BURST = 40  # HTTP requests


def lb_config(lab: Lab, node: str, preempt: bool = True) -> dict:
    reals = [{"address": r.ipv4} for r in lab.by_role("real")]
    vrrp = {"name": "VI_1", "interface": "eth0", "vrid": 51, "version": 3,
            "priority": 150 if node == "lb1" else 100, "advert_interval_s": INTERVAL,
            "preempt": preempt, "preempt_delay_s": PREEMPT_DELAY if node == "lb1" else 0.0,
            "vips": [f"{VIP}/24"]}
    return lab.balancer_config(node, [{"address": VIP, "port": 80, "mode": "dr",
                                       "real": reals}], vrrp=[vrrp])


def status(lab: Lab, node: str) -> dict | None:
    try:
        return api.request(lab.api_socket(node), "status", timeout=2.0)
    except (OSError, api.ApiError):
        return None


def vrrp(lab: Lab, node: str) -> dict:
    st = status(lab, node)
    return (st.get("vrrp") or [{}])[0] if st else {}


def wait_state(lab: Lab, node: str, state: str, timeout: float) -> dict:
    try:
        return wait_for(lambda: (v := vrrp(lab, node)).get("state") == state and v,
                        timeout, 0.02, f"{node} VRRP {state}")
    except TimeoutError:
        logs = "\n".join(s.output()[-1500:] for s in lab.services if s.node == node
                         and "l4lb.cli" in " ".join(s.argv))
        raise AssertionError(f"{node} is {vrrp(lab, node).get('state')}, not {state}; "
                             f"log:\n{logs}") from None


def vip_packets(lab: Lab, node: str) -> int:
    st = api.request(lab.api_socket(node), "stats", timeout=5.0)  # = `l4lb stats --json`
    return next(v["packets"] for v in st["vips"] if v["vip"] == VIP_KEY)


def holders(lab: Lab) -> set[str]:
    out = set()
    for n in ("lb1", "lb2"):
        info = json.loads(lab.run(n, ["ip", "-j", "addr", "show", "dev", "eth0"]).stdout)
        if any(a["local"] == VIP for a in info[0]["addr_info"]):
            out.add(n)
    return out


def xdp_prog(lab: Lab, node: str) -> int | None:
    info = json.loads(lab.run(node, ["ip", "-j", "link", "show", "dev", "eth0"]).stdout)[0]
    return ((info.get("xdp") or {}).get("prog") or {}).get("id")


def neigh_mac(lab: Lab) -> str | None:
    out = lab.run("client1", ["ip", "-j", "neigh", "show", VIP, "dev", "eth0"]).stdout
    entries = json.loads(out or "[]")
    return entries[0].get("lladdr") if entries else None


def wait_neigh(lab: Lab, node: str, timeout: float = 3.0) -> None:
    mac = lab.node(node).mac
    try:
        wait_for(lambda: neigh_mac(lab) == mac, timeout, 0.02, f"client neigh -> {node}")
    except TimeoutError:
        raise AssertionError(f"client's neighbour entry for {VIP} is {neigh_mac(lab)}, "
                             f"not {node}'s {mac}") from None


def curl(lab: Lab, n: int = 1) -> list[str]:
    """n HTTP requests through the VIP, one connection each; the reals that answered."""
    script = f'for i in $(seq {n}); do curl -s -m 2 --no-keepalive http://{VIP}/ || ' \
             'echo FAIL; done'
    out = lab.run("client1", ["sh", "-c", script], timeout=60).stdout.split()
    assert "FAIL" not in out and len(out) == n, out
    return out


def served_by(lab: Lab, node: str, n: int = 10) -> None:
    """The VIP answers, and through `node`: its VIP packet counter rises."""
    before = vip_packets(lab, node)
    assert set(curl(lab, n)) <= {"real1", "real2"}
    assert vip_packets(lab, node) - before >= 4 * n


def start(lab: Lab, node: str, **kw):
    lab.daemons[node] = lab.start_l4lb(node, lb_config(lab, node, **kw))
    return lab.daemons[node]


def test_vrrp_through_the_daemon():
    with Lab("tvrrpd", clients=1, balancers=2, reals=2) as lab:
        for r in lab.by_role("real"):
            lab.start_nginx(r.name)
        lab.daemons = {}
        with ThreadPoolExecutor(2) as ex:  # the two compile in parallel
            for f in [ex.submit(start, lab, n) for n in ("lb1", "lb2")]:
                f.result()
        wait_state(lab, "lb1", "master", PREEMPT_DELAY + 5)
        wait_state(lab, "lb2", "backup", 5)

        # ---- one master; the backup is loaded and ready but holds and forwards nothing
        assert holders(lab) == {"lb1"}
        st2 = status(lab, "lb2")
        assert xdp_prog(lab, "lb2") is not None and xdp_prog(lab, "lb1") is not None
        assert st2["xdp_mode"] == "generic" and st2["interfaces"] == ["eth0"]
        vip2 = next(v for v in st2["vips"] if v["vip"] == VIP_KEY)
        wait_for(lambda: all(r["in_ring"] and r["up"] for v in status(lab, "lb2")["vips"]
                             for r in v["reals"]), 10, 0.1, "lb2's reals up and in the ring")
        assert len(vip2["reals"]) == 2
        v2 = st2["vrrp"][0]
        assert v2["vips_held"] is False and v2["master_address"] == lab.node("lb1").ipv4
        assert v2["counters"]["rejected"] == {}, v2["counters"]
        idle2 = vip_packets(lab, "lb2")
        served_by(lab, "lb1")
        assert vip_packets(lab, "lb2") == idle2
        assert neigh_mac(lab) == lab.node("lb1").mac  # learnt by ARP: only lb1 answers

        # ---- kill -9 of the master's daemon: lb2 takes over after Master_Down_Interval
        lb1_before = vip_packets(lab, "lb1")
        t0 = time.time()
        lab.daemons["lb1"].stop(signal.SIGKILL)
        v2 = wait_state(lab, "lb2", "master", MDI_100 + 3)
        took = v2["last_transition"]["time"] - t0
        print(f"\n[vrrp daemon] SIGKILL takeover {took * 1000:.0f} ms "
              f"(MDI {MDI_100 * 1000:.0f} ms)")
        assert v2["last_transition"]["reason"] == "master_down"
        assert took < MDI_100 + SLACK
        # the split-brain caveat: lb1's host is up, XDP attached and the VIP still held
        assert xdp_prog(lab, "lb1") is not None
        assert holders(lab) == {"lb1", "lb2"}
        wait_neigh(lab, "lb2")  # the new master's gratuitous ARPs
        lb2_before = vip_packets(lab, "lb2")
        assert set(curl(lab, BURST)) <= {"real1", "real2"}
        assert vip_packets(lab, "lb2") - lb2_before >= 4 * BURST
        assert neigh_mac(lab) == lab.node("lb2").mac

        # ---- lb1's daemon back (preempt, delay 1 s); its counters survived in the pins
        start(lab, "lb1")
        assert vip_packets(lab, "lb1") == lb1_before, "lb1 forwarded some of the burst"
        v1 = wait_state(lab, "lb1", "backup", 10)
        t_backup = v1["last_transition"]["time"]
        v1 = wait_state(lab, "lb1", "master", PREEMPT_DELAY + 5)
        held_back = v1["last_transition"]["time"] - t_backup
        print(f"[vrrp daemon] restarted lb1 took over after {held_back:.2f} s "
              f"(preempt_delay {PREEMPT_DELAY} s)")
        assert v1["last_transition"]["reason"] == "preempt"
        assert PREEMPT_DELAY - 0.05 <= held_back < PREEMPT_DELAY + SLACK
        v2 = wait_state(lab, "lb2", "backup", 3)
        assert v2["last_transition"]["reason"] == "higher_priority"
        wait_for(lambda: holders(lab) == {"lb1"}, 3, 0.05, "the VIP on lb1 only")
        wait_neigh(lab, "lb1")
        served_by(lab, "lb1")

        # ---- lb1's link down: lb2 serves; link up: lb1 takes back after preempt_delay
        t0 = time.time()
        lab.run("lb1", ["ip", "link", "set", "dev", "eth0", "down"])
        v2 = wait_state(lab, "lb2", "master", MDI_100 + 3)
        took = v2["last_transition"]["time"] - t0
        print(f"[vrrp daemon] link down takeover {took * 1000:.0f} ms")
        assert v2["last_transition"]["reason"] == "master_down" and took < MDI_100 + SLACK
        assert wait_state(lab, "lb1", "fault", 2)["vips_held"] is False
        wait_neigh(lab, "lb2")
        served_by(lab, "lb2")
        lab.run("lb1", ["ip", "link", "set", "dev", "eth0", "up"])
        t_backup = wait_state(lab, "lb1", "backup", 3)["last_transition"]["time"]
        v1 = wait_state(lab, "lb1", "master", PREEMPT_DELAY + 5)
        assert v1["last_transition"]["reason"] == "preempt"
        assert PREEMPT_DELAY - 0.05 <= v1["last_transition"]["time"] - t_backup \
            < PREEMPT_DELAY + SLACK
        wait_state(lab, "lb2", "backup", 3)
        wait_neigh(lab, "lb1")
        served_by(lab, "lb1")

        # ---- clean stop: priority 0, lb2 takes over after Skew_Time, not MDI
        t0 = time.time()
        lab.daemons["lb1"].proc.send_signal(signal.SIGTERM)
        v2 = wait_state(lab, "lb2", "master", 3)
        took = v2["last_transition"]["time"] - t0
        print(f"[vrrp daemon] SIGTERM takeover {took * 1000:.0f} ms "
              f"(skew {SKEW_100 * 1000:.0f} ms, MDI {MDI_100 * 1000:.0f} ms)")
        assert v2["last_transition"]["reason"] == "master_released"
        assert took < MDI_100
        assert lab.daemons["lb1"].proc.wait(10) == 0
        assert holders(lab) == {"lb2"}  # lb1 removed its VIP before exiting
        assert xdp_prog(lab, "lb1") is not None  # SIGTERM leaves the data plane running
        wait_neigh(lab, "lb2")
        served_by(lab, "lb2")

        # ---- preempt = false: lb1 (priority 150) comes back and stays backup
        transitions2 = dict(v2["counters"]["transitions"])
        start(lab, "lb1", preempt=False)
        wait_state(lab, "lb1", "backup", 10)
        time.sleep(PREEMPT_DELAY + MDI_100 + 1.0)  # past every timer that could preempt
        v1, v2 = vrrp(lab, "lb1"), vrrp(lab, "lb2")
        assert v1["state"] == "backup" and v1["master_address"] == lab.node("lb2").ipv4
        assert v2["state"] == "master" and v2["counters"]["transitions"] == transitions2
        assert holders(lab) == {"lb2"}
        served_by(lab, "lb2")
