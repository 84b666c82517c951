#!/usr/bin/env python3
"""Failover: how long a client probing the VIP every 10 ms goes unanswered when the
VRRP master fails, l4lb against a keepalived pair in the same run (README: Benchmarks).

One lab (client1, lb1, lb2, real1, real2), reused by every case:

  keepalived  keepalived 2.x on lb1 (state MASTER, priority 150) and lb2 (BACKUP, 100),
              VRRP only (-P), its own VIP handling (10.99.0.100/24 on eth0, gratuitous
              ARPs on takeover). The data path is the balancer node itself: an echo
              server on lb1 and lb2 answers VIP:9001 (no l4lb, no XDP loaded yet).
  l4lb        `l4lb start` on lb1 (priority 150) and lb2 (100): VRRP + conn sync,
              generic XDP, DR to echo servers on real1/real2 at VIP:9000.

Both pairs: same VRID, priorities, preemption without delay, 5 gratuitous ARPs on
takeover. Cases, each repeated (--runs, default 5; --quick: 1, and no v3 1 s cases):

  linkdown  lb1's (the master's) eth0 set down, through a netlink socket opened in its
            namespace beforehand (about 1 ms: the failure time is known to that).
  sigkill   kill -9 of the master's daemon (keepalived: its process group, parent and
            VRRP child). The old master's host stays up: its kernel keeps the VIP
            (keepalived: for good; l4lb: until the VIP lifetime runs out) and, for
            l4lb, its XDP program keeps forwarding. So the client only loses answers
            if the move to the new master (its gratuitous ARPs) loses any: this case
            measures what the client sees; the VRRP takeover time (the VIP added on
            lb2, from `ip -ts monitor address`) is reported beside.

Settings: VRRPv3 at 0.1 s and 1 s, VRRPv2 at 1 s for both, plus l4lb VRRPv3 at 0.02 s.
Between runs the pair is restored: link up / the killed daemon restarted, and the
next run waits until lb1 is master again (preempt) and the client follows it.

The probe (`l4lb.lab.client probe`, run in client1) starts a TCP connect to the VIP
every 10 ms on a fixed schedule, without waiting for the previous one, and prints one
JSON line {"t": start time, "real": who answered} per answered connect (timeout 0.5 s,
below the 1 s SYN retransmission, so a connect lost in the outage never counts as a
late answer). A probe that waited for each connect would only try again after its
timeout during an outage, quantising the outage to that timeout.
Outage = the longest silence between two answers around the failure
(l4lb.lab.demo.outage): from the last answer through the old master to the first
through the new one.

    .venv/bin/python -m bench.failover [--quick] [--runs N] [--json PATH] [--md PATH] [--only SUBSTR]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench.common import markdown_table, run_meta, text_table, write_json, write_text
from l4lb.lab import wait_for

PREFIX = "bfail"
VIP = "10.99.0.100"
L4LB_PORT = 9000  # echo servers on the reals, through l4lb
KA_PORT = 9001  # echo servers on the balancer nodes (keepalived cases)
VRID = 51
PRIO = {"lb1": 150, "lb2": 100}
SYNC_KEY = "bench-failover-sync-key"
PROBE_EVERY = 0.01
PROBE_TIMEOUT = 0.5
KINDS = ("linkdown", "sigkill")
# Measured elsewhere (keepalived, link down), min/median/max in ms.
REFERENCE = {"keepalived_v3_100ms_linkdown": (292, 330, 350),
             "keepalived_v2_1000ms_linkdown": (2900, 3200, 3400)}


# --------------------------------------------------------------------------- helpers
@dataclass(frozen=True)
class Setting:
    impl: str  # l4lb | keepalived
    version: int
    interval: float  # seconds

    def case(self, kind: str) -> str:
        return f"{self.impl}_v{self.version}_{round(self.interval * 1000)}ms_{kind}"

    def mdi(self, prio: int = 100) -> float:
        """Master_Down_Interval of a backup of this priority."""
        skew = (256 - prio) / 256 * (self.interval if self.version == 3 else 1.0)
        return 3 * self.interval + skew


KA_SETTINGS = [Setting("keepalived", 3, 0.1), Setting("keepalived", 3, 1.0),
               Setting("keepalived", 2, 1.0)]
L4_SETTINGS = [Setting("l4lb", 3, 0.1), Setting("l4lb", 3, 0.02), Setting("l4lb", 3, 1.0),
               Setting("l4lb", 2, 1.0)]


def vip_on(lab, node: str) -> bool:
    out = lab.run(node, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"], check=False).stdout
    return f" {VIP}/" in out


def neigh_mac(lab) -> str | None:
    out = lab.run("client1", ["ip", "-j", "neigh", "show", VIP, "dev", "eth0"],
                  check=False).stdout
    entries = json.loads(out or "[]")
    return entries[0].get("lladdr") if entries else None


def wait(pred, timeout: float, what: str, interval: float = 0.02):
    return wait_for(pred, timeout, interval=interval, what=what)


class Watch:
    """What lb2 sees, timestamped at real-time priority (so that a busy machine does
    not delay the stamps): VIP adds (`ip -ts monitor address`) and lb1's adverts
    (tcpdump)."""

    def __init__(self, lab) -> None:
        rt = ["chrt", "-f", "50"]
        self.monitor = lab.popen("lb2", [*rt, "ip", "-ts", "monitor", "address", "dev", "eth0"])
        self.adverts = lab.popen("lb2", [*rt, "tcpdump", "-i", "eth0", "-n", "-tt", "-l", "-p",
                                         f"ip proto 112 and src host {lab.node('lb1').ipv4}"])

    def vip_added(self, after: float) -> float | None:
        """Time of the first VIP add on lb2 after `after`."""
        from datetime import datetime  # noqa: PLC0415

        for ln in self.monitor.output().splitlines():
            if not ln.startswith("[") or "Deleted" in ln or f" inet {VIP}/" not in ln:
                continue
            t = datetime.strptime(ln[1:ln.index("]")], "%Y-%m-%dT%H:%M:%S.%f").timestamp()
            if t > after:
                return t
        return None

    def last_advert(self, before: float) -> float | None:
        """Time lb2 received lb1's last advert before `before`."""
        last = None
        for ln in self.adverts.output().splitlines():
            try:
                t = float(ln.split(" ", 1)[0])
            except ValueError:
                continue
            if t < before:
                last = t
        return last


def answers(svc) -> list[dict]:
    out = []
    for ln in svc.output().splitlines():
        if ln.startswith("{"):
            try:
                out.append(json.loads(ln))
            except json.JSONDecodeError:
                pass  # a line cut by the stop
    return out


class Link:
    """lb1's eth0 up/down through one netlink socket in its namespace: a link change
    takes about a millisecond, so the failure time is known to about that (spawning
    `ip` through nsenter takes 10 ms or more on a busy machine)."""

    def __init__(self, lab, node: str) -> None:
        from pyroute2 import NetNS  # noqa: PLC0415

        self.ns = NetNS(lab.node(node).netns)
        self.index = self.ns.link_lookup(ifname="eth0")[0]

    def set(self, up: bool) -> float:
        t = time.time()
        self.ns.link("set", index=self.index, state="up" if up else "down")
        return t

    def close(self) -> None:
        self.ns.close()


# ----------------------------------------------------------------------------- pairs
class KeepalivedPair:
    port = KA_PORT
    starts = 0  # keepalived runs in this bench: each gets its own directory

    def __init__(self, lab, setting: Setting, link: Link) -> None:
        self.lab, self.s, self.link = lab, setting, link
        self.svc: dict = {}

    def conf(self, node: str) -> Path:
        KeepalivedPair.starts += 1
        d = self.lab.workdir / f"ka-{node}-{KeepalivedPair.starts}"
        d.mkdir()
        path = d / "keepalived.conf"
        path.write_text(f"""global_defs {{
    router_id {node}
    vrrp_version {self.s.version}
    vrrp_garp_master_delay 0
    vrrp_garp_master_repeat 5
}}
vrrp_instance VI_1 {{
    state {"MASTER" if node == "lb1" else "BACKUP"}
    interface eth0
    virtual_router_id {VRID}
    priority {PRIO[node]}
    advert_int {self.s.interval:g}
    virtual_ipaddress {{
        {VIP}/24 dev eth0
    }}
}}
""")
        return path

    def start_node(self, node: str) -> None:
        conf = self.conf(node)
        d = conf.parent
        self.svc[node] = self.lab.popen(
            node, ["keepalived", "-n", "-l", "-D", "-G", "-P", "-f", str(conf),
                   "-p", str(d / "keepalived.pid"), "-r", str(d / "vrrp.pid"),
                   "-c", str(d / "checkers.pid")], log_name=f"{d.name}.log")

    def start(self) -> None:
        self.start_node("lb1")
        self.start_node("lb2")
        self.wait_lb1_master()

    def master(self, node: str) -> bool:
        other = "lb2" if node == "lb1" else "lb1"
        return vip_on(self.lab, node) and not vip_on(self.lab, other)

    def wait_lb1_master(self) -> None:
        wait(lambda: self.master("lb1"), self.s.mdi(150) + 10, "keepalived lb1 master")

    def fail(self, kind: str) -> float:
        if kind == "linkdown":
            return self.link.set(False)
        t = time.time()
        self.svc["lb1"].stop(signal.SIGKILL)  # the process group: parent and VRRP child
        return t

    def restore(self, kind: str, again: bool) -> None:
        if kind == "linkdown":
            self.link.set(True)
        elif again:
            self.lab.run("lb1", ["ip", "addr", "del", f"{VIP}/24", "dev", "eth0"], check=False)
            self.start_node("lb1")
        else:
            return
        self.wait_lb1_master()

    def stop(self) -> None:
        for svc in self.svc.values():
            svc.stop(signal.SIGTERM)
        for node in ("lb1", "lb2"):
            self.lab.run(node, ["ip", "addr", "del", f"{VIP}/24", "dev", "eth0"], check=False)


class L4lbPair:
    port = L4LB_PORT

    def __init__(self, lab, setting: Setting, link: Link) -> None:
        self.lab, self.s, self.link = lab, setting, link
        self.svc: dict = {}

    def config(self, node: str) -> dict:
        lab = self.lab
        peer = lab.node("lb2" if node == "lb1" else "lb1").ipv4
        reals = [{"address": r.ipv4} for r in lab.by_role("real")]
        hc = {"type": "tcp", "interval_s": 0.5, "timeout_s": 0.4, "rise": 2, "fall": 2}
        return lab.balancer_config(
            node, [{"address": VIP, "port": L4LB_PORT, "real": reals}], healthcheck=hc,
            vrrp=[{"name": "vi1", "interface": "eth0", "vrid": VRID, "priority": PRIO[node],
                   "version": self.s.version, "advert_interval_s": self.s.interval,
                   "preempt": True, "preempt_delay_s": 0.0, "vips": [f"{VIP}/24"]}],
            sync={"enabled": True, "listen": f"{lab.node(node).ipv4}:9542",
                  "peers": [f"{peer}:9542"], "key": SYNC_KEY, "vrrp_instance": "vi1"})

    def status(self, node: str) -> dict | None:
        from l4lb import api  # noqa: PLC0415

        try:
            return api.request(self.lab.api_socket(node), "status", timeout=2.0)
        except (OSError, api.ApiError):
            return None

    def vrrp(self, node: str) -> dict:
        st = self.status(node)
        return (st.get("vrrp") or [{}])[0] if st else {}

    def start(self) -> None:
        with ThreadPoolExecutor(2) as ex:  # the two compile in parallel
            futs = {n: ex.submit(self.lab.start_l4lb, n, self.config(n)) for n in ("lb1", "lb2")}
            for n, f in futs.items():
                self.svc[n] = f.result()
        self.wait_lb1_master()

    def wait_lb1_master(self) -> None:
        wait(lambda: self.vrrp("lb1").get("state") == "master"
             and self.vrrp("lb2").get("state") == "backup",
             self.s.mdi(150) + 10, "l4lb lb1 master, lb2 backup", 0.05)

    def fail(self, kind: str) -> float:
        if kind == "linkdown":
            return self.link.set(False)
        t = time.time()
        self.svc["lb1"].stop(signal.SIGKILL)
        return t

    def restore(self, kind: str, again: bool) -> None:
        if kind == "linkdown":
            self.link.set(True)
        elif again:
            self.svc["lb1"] = self.lab.start_l4lb("lb1", self.config("lb1"))
        else:
            return
        self.wait_lb1_master()

    def stop(self) -> None:
        for svc in self.svc.values():
            svc.stop(signal.SIGTERM, timeout=10)  # XDP stays attached; the next start reattaches


# ------------------------------------------------------------------------------- runs
def one_run(lab, pair, kind: str, watch: Watch) -> dict:
    from l4lb.lab.demo import outage  # noqa: PLC0415

    # the client follows lb1 again (its gratuitous ARPs) before the next run
    lb2_mac = lab.node("lb2").mac
    wait(lambda: neigh_mac(lab) != lb2_mac, 5, "the client's neighbour entry back on lb1", 0.05)
    prober = lab.popen("client1", [sys.executable, "-m", "l4lb.lab.client", "probe",
                                   f"{VIP}:{pair.port}", "--every", str(PROBE_EVERY),
                                   "--timeout", str(PROBE_TIMEOUT), "--seconds", "120"])
    try:
        # 0.5 s of answers before the failure
        wait(lambda: len(answers(prober)) >= 50, 15, "probe answers before the failure", 0.05)
        before = {a["real"] for a in answers(prober)}
        t_fail = pair.fail(kind)
        t_take = wait(lambda: watch.vip_added(t_fail), pair.s.mdi() + 5,
                      "the VIP on the backup", 0.01)
        # the client follows the gratuitous ARPs within milliseconds; give it a margin
        time.sleep(0.5)
        wait(lambda: any(a["t"] > t_take + 0.2 for a in answers(prober)), 5,
             "answers through the new master", 0.05)
        t_end = time.time()
    finally:
        prober.stop()
    got = [a for a in answers(prober) if a["t"] <= t_end]
    # the silence that the failure ends: from the last answer before it on (a hiccup
    # earlier in the window is not the failover's; it shows as the calm gap)
    last = max((a["t"] for a in got if a["t"] <= t_fail), default=t_fail)
    ms = outage([a["t"] for a in got if a["t"] >= last], t_fail)
    t_adv = watch.last_advert(t_fail)
    late = None if t_adv is None else (t_take - (t_adv + pair.s.mdi())) * 1000
    after = {a["real"] for a in got if a["t"] > t_take + 0.1}
    calm = sorted(a["t"] for a in got if a["t"] < t_fail)
    baseline = max((b - a for a, b in zip(calm, calm[1:], strict=False)), default=None)
    return {"outage_ms": None if ms is None else round(ms, 1),
            "baseline_max_gap_ms": None if baseline is None else round(baseline * 1000, 1),
            "takeover_ms": round((t_take - t_fail) * 1000, 1),
            "late_ms": None if late is None else round(late, 1),
            "answers": len(got), "before": sorted(before), "after": sorted(after)}


def summarize(vals: list[float]) -> dict:
    ok = [v for v in vals if v is not None]
    if not ok:
        return {"min_ms": None, "median_ms": None, "max_ms": None}
    return {"min_ms": round(min(ok), 1), "median_ms": round(statistics.median(ok), 1),
            "max_ms": round(max(ok), 1)}


def run_setting(lab, setting: Setting, runs: int, results: dict, log, watch: Watch,
                link: Link) -> None:
    pair = (L4lbPair if setting.impl == "l4lb" else KeepalivedPair)(lab, setting, link)
    t0 = time.monotonic()
    pair.start()
    log(f"{setting.impl} v{setting.version} {setting.interval:g}s: pair up in "
        f"{time.monotonic() - t0:.1f}s")
    try:
        for kind in KINDS:
            name = setting.case(kind)
            details = []
            for i in range(runs):
                last = kind == KINDS[-1] and i == runs - 1
                d = one_run(lab, pair, kind, watch)
                details.append(d)
                log(f"  {name} run {i + 1}/{runs}: outage {d['outage_ms']} ms, takeover "
                    f"{d['takeover_ms']} ms (late {d['late_ms']} ms), calm gap "
                    f"{d['baseline_max_gap_ms']} ms, answered by {d['before']} -> {d['after']}")
                pair.restore(kind, again=not last)
            results[name] = dict(
                summarize([d["outage_ms"] for d in details]),
                runs=[d["outage_ms"] for d in details],
                takeover_ms=summarize([d["takeover_ms"] for d in details]),
                late_ms=summarize([d["late_ms"] for d in details]),
                baseline_max_gap_ms=summarize([d["baseline_max_gap_ms"] for d in details]),
                master_down_interval_ms=round(setting.mdi() * 1000, 1),
                impl=setting.impl, version=setting.version,
                advert_interval_s=setting.interval, kind=kind, detail=details)
    finally:
        pair.stop()


def fmt(v, digits: int = 0) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def table(cases: dict) -> tuple[list[str], list[list[str]]]:
    headers = ["case", "runs", "min ms", "median ms", "max ms", "takeover ms (median)",
               "MDI ms", "late ms (median)", "calm gap ms (max)", "keepalived median",
               "reference (elsewhere)"]
    rows = []
    for name, c in cases.items():
        ka = cases.get(name.replace("l4lb_", "keepalived_", 1)) if name.startswith("l4lb") \
            else None
        ref = REFERENCE.get(name)
        rows.append([name, str(len(c["runs"])), fmt(c["min_ms"]), fmt(c["median_ms"]),
                     fmt(c["max_ms"]), fmt(c["takeover_ms"]["median_ms"]),
                     fmt(c["master_down_interval_ms"]), fmt(c["late_ms"]["median_ms"], 1),
                     fmt(c["baseline_max_gap_ms"]["max_ms"]),
                     fmt(ka["median_ms"]) if ka else "",
                     "/".join(str(x) for x in ref) if ref else ""])
    return headers, rows


METHOD = (
    "One lab (client1, lb1, lb2, real1, real2), reused by every case. keepalived "
    "(2.x, -P VRRP only, lb1 state MASTER priority 150, lb2 BACKUP 100, own VIP handling, "
    "5 gratuitous ARPs, no delayed second burst) with the data path on the balancer node "
    "itself: an echo server on lb1/lb2 answers VIP:9001 (no l4lb, no XDP loaded). l4lb: "
    "`l4lb start` on lb1 (150) and lb2 (100), VRRP + conn sync, generic XDP, DR to echo "
    "servers on real1/real2 at VIP:9000. Both: same VRID, preempt without delay. The client "
    "starts a TCP connect to the VIP every 10 ms on a fixed schedule, without waiting for the "
    "previous one (timeout 0.5 s, under the 1 s SYN retransmission), and records the start "
    "time of every answered one; outage = longest silence between two answers around the "
    "failure (l4lb.lab.demo.outage), i.e. last answer through the old master to first through "
    "the new. linkdown: lb1's eth0 set down (netlink, from a socket opened beforehand). sigkill: kill -9 of lb1's daemon "
    "(keepalived: its process group); lb1's kernel keeps the VIP (keepalived: permanently; "
    "l4lb: until its lifetime runs out) and l4lb's XDP keeps forwarding, so the client "
    "loses only what the move to the new master loses; takeover = VRRP takeover time "
    "(the VIP added on lb2, timestamped by `ip -ts monitor address` there, at real-time "
    "priority); late = takeover time minus (lb1's last advert seen by tcpdump on lb2 + MDI), "
    "the backup's own reaction delay, free of the random phase of the failure. Outage counts "
    "from the last answer before the failure (a hiccup earlier is reported as the calm gap, "
    "the longest silence in the 0.5 s before the failure). Between runs: link up / daemon restarted, wait until lb1 is master again.")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="1 run per case, without the v3 1 s cases (under 3 minutes)")
    ap.add_argument("--runs", type=int, default=None, help="runs per case (default 5)")
    ap.add_argument("--only", default=None,
                    help="run only settings whose case names contain this (e.g. l4lb_v3_20ms)")
    ap.add_argument("--json", help="write results as JSON here")
    ap.add_argument("--md", help="write a Markdown report here")
    a = ap.parse_args(argv)

    from l4lb.lab import Lab  # noqa: PLC0415

    t_start = time.monotonic()
    load_before = os.getloadavg()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t_start:6.1f}s] {msg}", flush=True)

    cases: dict = {}
    settings = [s for s in KA_SETTINGS + L4_SETTINGS
                if (not a.only or any(a.only in s.case(k) for k in KINDS))
                and not (a.quick and s.version == 3 and s.interval == 1.0)]
    with Lab(PREFIX, clients=1, balancers=2, reals=2) as lab:
        for r in lab.by_role("real"):
            lab.start_echo(r.name, L4LB_PORT)
        for b in lab.by_role("balancer"):
            lab.start_echo(b.name, KA_PORT)
        watch = Watch(lab)
        link = Link(lab, "lb1")
        try:
            for s in settings:
                runs = a.runs or (1 if a.quick else 5)
                run_setting(lab, s, runs, cases, log, watch, link)
        finally:
            link.close()
    seconds = round(time.monotonic() - t_start, 1)

    headers, rows = table(cases)
    out = {"cases": cases, "method": METHOD, "seconds": seconds,
           "reference": {k: dict(zip(("min_ms", "median_ms", "max_ms"), v, strict=True))
                         for k, v in REFERENCE.items()},
           "loadavg_before": [round(x, 2) for x in load_before],
           "loadavg_after": [round(x, 2) for x in os.getloadavg()],
           **run_meta(a.quick, [sys.argv[0], *argv])}
    print(f"\nfailover: client outage (probe every 10 ms), {seconds:.0f}s in all")
    print(text_table(headers, rows))
    print("reference: keepalived measured elsewhere (min/median/max, link down)")
    if a.json:
        write_json(a.json, out)
    if a.md:
        write_text(a.md, f"# Failover\n\n`{out['command']}`\n\n"
                   f"{out['timestamp']}, kernel {out['kernel']}, {seconds:.0f} s, load "
                   f"average {out['loadavg_before'][0]} before / {out['loadavg_after'][0]} "
                   "after (other work on the machine)\n\n"
                   + markdown_table(headers, rows)
                   + "\n\nOutage: the longest silence between two probe answers around the "
                   "failure, in ms. Takeover: from the failure to the backup becoming "
                   "master (the VIP added on lb2). MDI: Master_Down_Interval of the priority-100 "
                   "backup. Late: how long after lb1's last advert + MDI the VIP was added on lb2 "
                   "(the backup's own reaction time; the rest of the takeover is the random phase "
                   "of the failure in the advert interval). Calm gap: the "
                   "longest silence between answers in the 0.5 s before the failure (the "
                   "probe's noise floor). Reference: "
                   "keepalived measured elsewhere, link down, min/median/max.\n\n"
                   f"## Method\n\n{METHOD}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
