"""`make demo-ecmp`: three active balancers behind an FRR router's ECMP, narrated.

The router (FRR, maximum-paths, L4 multipath hash) peers over BGP with lb1..lb3,
each running FRR and `l4lb start` in ECMP mode ([bgp], conn sync to both others).
The demo shows the router's multipath route to the VIP, 300 long-lived
connections spread over the three nodes, then a node lost (link down, kill -9):
BFD takes its path away and every connection carries on through the others.

    python -m l4lb.lab.demo_ecmp
"""

from __future__ import annotations

import sys
import time

from l4lb.lab import LabError
from l4lb.lab import ecmp as E

PREFIX = "demoecmp"
NODES = ["lb1", "lb2", "lb3"]
CONNS = 300


def say(msg: str = "") -> None:
    print(msg, flush=True)


def step(n: int, title: str) -> None:
    say(f"\n== {n}. {title} " + "=" * max(0, 60 - len(title)))


def run() -> dict:
    t0 = time.monotonic()
    step(1, "Building the lab")
    lab = E.make_lab(PREFIX)
    lab.up()
    try:
        E.start_router(lab)
        E.start_reals(lab)
        say(f"client1 {lab.node('client1').ipv4} -> router 10.99.128.1 | 10.99.0.1 -> "
            f"lb1-3 10.99.0.21-23 -> real1-4 10.99.0.31-34 (echo server :{E.PORT})")
        step(2, "FRR and l4lb on three balancers (ECMP mode, sync to each other)")
        cfgs = {n: E.node_config(lab, n) for n in NODES}
        E.start_nodes(lab, NODES, cfgs)
        E.wait_paths(lab, NODES)
        say(lab.run("router", ["ip", "route", "show", f"{E.VIP_DR}/32"]).stdout.rstrip())
        say("lb1 " + "bgp:" + lab.l4lb("lb1", ["status"]).stdout.split("\nbgp:")[1].rstrip())
        step(3, f"{CONNS} long-lived connections to {E.VIP_DR}:{E.PORT}, spread by the router")
        before = {n: E.packets(lab, n)[E.vip_key(E.VIP_DR)] for n in NODES}
        hold = E.start_hold(lab, "demo", E.VIP_DR, CONNS)
        time.sleep(2.0)
        spread = {n: E.packets(lab, n)[E.vip_key(E.VIP_DR)] - before[n] for n in NODES}
        for n, p in spread.items():
            say(f"  {n}: {p} packets forwarded in 2 s")
        step(4, "lb2 dies (link down, kill -9): BFD takes its path away")
        t = time.monotonic()
        E.kill(lab, "lb2")
        E.wait_paths(lab, ["lb1", "lb3"], timeout=20)
        gone_ms = (time.monotonic() - t) * 1000
        say(f"router route to the VIP without lb2 after {gone_ms:.0f} ms:")
        say(lab.run("router", ["ip", "route", "show", f"{E.VIP_DR}/32"]).stdout.rstrip())
        time.sleep(2.0)
        rep = E.end_hold(hold)
        lost = E.broken(rep)
        say(f"connections: {rep['conns'] - len(lost)}/{rep['conns']} carried on (lb2's moved "
            "to lb1 and lb3, which knew them by sync)")
    finally:
        lab.down()
    summary = {"spread_packets": spread, "path_gone_ms": round(gone_ms),
               "conns": rep["conns"], "lost": len(lost),
               "seconds": round(time.monotonic() - t0, 1)}
    step(5, "Summary")
    say(str(summary))
    return summary


def main() -> int:
    try:
        s = run()
    except LabError as e:
        print(f"demo-ecmp: {e}", file=sys.stderr)
        return 1
    return 0 if s["lost"] == 0 and all(s["spread_packets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
