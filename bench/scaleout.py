#!/usr/bin/env python3
"""Scale-out: N active balancers behind an FRR router's ECMP (README: VRRP or ECMP; issue 14).

One lab (l4lb/lab/ecmp.py): router (FRR, maximum-paths, L4 multipath hash),
client1 behind it, lb1..lb3 each running FRR (bgpd + bfdd, BFD 300 ms x 3) and
`l4lb start` in ECMP mode with conn sync to both other nodes, 4 reals running an
echo server (DR VIP:9000) and nginx (DR VIP:80). Generic XDP.

Cases, each with C long-lived echo connections (300; --quick 100, one exchange
every 0.1 s) and a probe that starts a new TCP connect every 10 ms:

  drain          `l4lb drain` on lb1: withdraw, forward 4 s, stop.
  add            lb1 started again after a wipe (XDP, pins, state gone): it gets its
                 peers' full walks, then announces; the router rehashes onto it.
  weight_change  real1's weight 100 -> 1000 on every node, then lb2 killed as below:
                 the flows the kill moves land on nodes whose rings changed since the
                 flows began; only sync keeps them on their reals.
  kill           kill -9 of lb2's l4lb and FRR, link down: BFD on the router drops
                 the path (weight restored, lb2 back, before this case).

total/lost: the held connections, and those that broke or changed real. The probe
(one new connection every 10 ms, 0.5 s timeout, each attempt logged): failed_probes,
those unanswered after the failure; outage_ms, from the failure to the last unanswered probe (new connections
hashed to a dead node fail until BFD takes its path away; the others are answered);
max_gap_ms, the longest silence between two answers.
wrk_rps.<n>: wrk -t2 -c64 to VIP:80 for S s (--quick 3, else 8) with n nodes
announcing (3, then lb3 and lb2 drained away). The lab is 2 shared CPUs: the
client, router, nodes and reals all compete for them, so this shows that traffic
spreads, not that capacity scales.

    .venv/bin/python -m bench.scaleout [--quick] [--json PATH] [--md PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time

from bench.common import markdown_table, run_meta, text_table, write_json, write_text

PREFIX = "bscale"
ALL = ["lb1", "lb2", "lb3"]
PROBE_EVERY = 0.01


def attempts(svc) -> list[dict]:
    out = []
    for ln in svc.output().splitlines():
        try:
            d = json.loads(ln)
        except json.JSONDecodeError:
            continue
        if isinstance(d, dict) and "t" in d:
            out.append(d)
    return out


def new_conn_outage(attempts: list[dict], t_fail: float, t_end: float) -> dict:
    """From the probe's attempts ({"t": start, "ok": answered}, one every 10 ms): those
    that failed after the failure (failed_probes), the time from the failure to the
    start of the last failed one (outage_ms: while new connections could fail; with
    ECMP only those hashed to the lost node do), and the longest silence between
    answers (max_gap_ms)."""
    window = [a for a in attempts if t_fail < a["t"] <= t_end]
    if not window:
        return {"outage_ms": None, "failed_probes": None, "max_gap_ms": None}
    failed = [a["t"] for a in window if not a["ok"]]
    ok = sorted([a["t"] for a in attempts if a["ok"] and a["t"] <= t_fail][-1:]
                + [a["t"] for a in window if a["ok"]])
    gap = max((b - a for a, b in zip(ok, ok[1:], strict=False)), default=None)
    return {"outage_ms": round((max(failed) - t_fail) * 1000, 1) if failed else 0.0,
            "failed_probes": len(failed),
            "max_gap_ms": None if gap is None else round(gap * 1000, 1)}


def wrk(lab, seconds: int) -> float:
    from l4lb.lab import ecmp as E  # noqa: PLC0415

    r = lab.run("client1", ["wrk", "-t2", "-c64", f"-d{seconds}s", "--timeout", "2s",
                            f"http://{E.VIP_DR}:{E.HTTP}/"], timeout=seconds + 30)
    m = re.search(r"Requests/sec:\s+([\d.]+)", r.stdout)
    if not m:
        raise RuntimeError(f"wrk printed no rate: {r.stdout[-300:]}")
    if re.search(r"Non-2xx or 3xx responses: (\d+)", r.stdout) or "Socket errors" in r.stdout:
        print(f"  wrk: {r.stdout.strip().splitlines()[-3:]}", flush=True)
    return float(m.group(1))


class Bench:
    def __init__(self, lab, conns: int, log) -> None:
        from l4lb.lab import ecmp as E  # noqa: PLC0415

        self.E, self.lab, self.conns, self.log = E, lab, conns, log
        self.cfgs = {n: E.node_config(lab, n, http=True) for n in ALL}

    def case(self, name: str, act) -> dict:
        """Hold conns + probe, run `act()` (returns the failure time), measure."""
        E, lab = self.E, self.lab
        hold = E.start_hold(lab, f"{name}-hold", E.VIP_DR, self.conns)
        probe = lab.popen("client1", [sys.executable, "-m", "l4lb.lab.client", "probe",
                                      f"{E.VIP_DR}:{E.PORT}", "--every", str(PROBE_EVERY),
                                      "--seconds", "120", "--timeout", "0.5", "--failures"],
                          log_name=f"{name}-probe.log")
        try:
            E.wait_for(lambda: len(attempts(probe)) >= 50, 20, 0.05, "probe answers")
            t_fail = act()
            time.sleep(3.0)  # flows settle on their new nodes, probes go on
            t_end = time.time()
        finally:
            probe.stop()
        rep = E.end_hold(hold)
        out = {"total": rep["conns"], "lost": len(E.broken(rep)),
               **new_conn_outage(attempts(probe), t_fail, t_end - 1.0)}  # 0.5 s timeout
        self.log(f"{name}: {out}")
        return out

    # ------------------------------------------------------------------ actions
    def drain(self) -> float:
        t = time.time()
        self.lab.l4lb("lb1", ["drain"])
        self.E.drain(self.lab, "lb1")
        return t

    def add(self) -> float:
        E, lab = self.E, self.lab
        E.wipe(lab, "lb1", self.cfgs["lb1"])
        t = time.time()
        lab.daemons["lb1"] = lab.start_l4lb("lb1", self.cfgs["lb1"], 120)
        E.wait_paths(lab, ALL, timeout=60)
        return t

    def weight_change(self) -> float:
        self.E.set_weight(self.lab, ALL, "real1", 1000)
        time.sleep(1.0)
        return self.kill()

    def kill(self) -> float:
        t = time.time()
        self.E.kill(self.lab, "lb2")
        self.E.wait_paths(self.lab, ["lb1", "lb3"], timeout=20)
        return t

    def revive_lb2(self) -> None:
        E, lab = self.E, self.lab
        lab.run("lb2", ["ip", "link", "set", "dev", "eth0", "up"])
        E.start_node_frr(lab, "lb2", self.cfgs["lb2"])
        lab.daemons["lb2"] = lab.start_l4lb("lb2", self.cfgs["lb2"], 120)
        E.wait_paths(lab, ALL, timeout=60)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100 connections, 3 s wrk runs")
    ap.add_argument("--json", help="write results as JSON here")
    ap.add_argument("--md", help="write a Markdown report here")
    a = ap.parse_args(argv)

    from l4lb.lab import ecmp as E  # noqa: PLC0415
    from l4lb.routing import frr  # noqa: PLC0415

    t0 = time.monotonic()
    load_before = os.getloadavg()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f}s] {msg}", flush=True)

    conns = 100 if a.quick else 300
    secs = 3 if a.quick else 8
    cases: dict = {}
    wrk_rps: dict = {}
    lab = E.make_lab(PREFIX)
    lab.up()
    try:
        E.start_router(lab)
        E.start_reals(lab)
        for r in lab.by_role("real"):
            lab.start_nginx(r.name, E.HTTP)
        b = Bench(lab, conns, log)
        E.start_nodes(lab, ALL, b.cfgs)
        E.wait_paths(lab, ALL)
        speaker = lab.l4lb_json("lb1", ["status"])["bgp"]["speaker"]
        log(f"3 nodes announce; speaker {speaker}")
        cases["drain"] = b.case("drain", b.drain)
        cases["add"] = b.case("add", b.add)
        cases["weight_change"] = b.case("weight_change", b.weight_change)
        b.revive_lb2()
        E.set_weight(lab, ALL, "real1", 100)
        cases["kill"] = b.case("kill", b.kill)
        b.revive_lb2()
        for n, gone in ((3, None), (2, "lb3"), (1, "lb2")):
            if gone:
                lab.l4lb(gone, ["drain", "--stay"])
                E.wait_paths(lab, ALL[:n], timeout=20, vips=(E.VIP_DR,))
            wrk_rps[str(n)] = round(wrk(lab, secs), 1)
            log(f"wrk through {n} node(s): {wrk_rps[str(n)]} req/s")
        frr_version = frr.parse_version(lab.vtysh("router", "show version"))
    finally:
        for svc in list(lab.services):
            if svc.alive and "l4lb.cli" in " ".join(svc.argv):
                svc.stop(signal.SIGKILL)
        lab.down()
    seconds = round(time.monotonic() - t0, 1)
    out = {"nodes": 3, "speaker": f"{speaker} (bgpd + bfdd, BFD 300 ms x 3; router "
                                  f"{frr_version}, fib_multipath_hash_policy=1)",
           "xdp_mode": "generic", "conns": conns, "cases": cases, "wrk_rps": wrk_rps,
           "seconds": seconds, "loadavg_before": [round(x, 2) for x in load_before],
           "loadavg_after": [round(x, 2) for x in os.getloadavg()],
           **run_meta(a.quick, [sys.argv[0], *argv])}
    headers = ["case", "conns", "lost", "new-conn outage ms", "failed probes", "max gap ms"]
    rows = [[k, v["total"], v["lost"]] + ["-" if v[x] is None else v[x] for x in
                                          ("outage_ms", "failed_probes", "max_gap_ms")]
            for k, v in cases.items()]
    wheaders = ["nodes announcing", "wrk req/s"]
    wrows = [[k, v] for k, v in wrk_rps.items()]
    print(f"\nscale-out: 3 nodes behind ECMP, {speaker}, {seconds:.0f}s in all")
    print(text_table(headers, rows))
    print()
    print(text_table(wheaders, wrows))
    if a.json:
        write_json(a.json, out)
    if a.md:
        write_text(a.md, f"# Scale-out (ECMP)\n\n`{out['command']}`\n\n{out['timestamp']}, "
                   f"kernel {out['kernel']}, {seconds:.0f} s, load average "
                   f"{out['loadavg_before'][0]} before / {out['loadavg_after'][0]} after\n\n"
                   f"Speaker: {out['speaker']}\n\n" + markdown_table(headers, rows) + "\n\n"
                   + markdown_table(wheaders, wrows) + "\n\n## Method\n\n"
                   + (__doc__ or "").split("\n\n", 1)[1].rsplit("\n\n", 1)[0] + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
