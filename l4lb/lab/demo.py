"""`make demo`: l4lb at work in a throw-away lab, narrated, in a few minutes.

One client, two balancers (a VRRP pair with connection sync) and three reals
running nginx and an echo server. The demo spreads requests, stops a real so the
health checks take it out, kills the master while long-lived connections keep
going, scrapes the metrics, prints a summary and removes everything (also on
Ctrl-C).

    python -m l4lb.lab.demo [--fast] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from l4lb import api
from l4lb.lab import Lab, LabError, lab_namespaces, wait_for

PREFIX = "demo"
VIP = "10.99.0.100"
HTTP, ECHO = 80, 9000
SYNC_KEY = "demo-sync-key-change-me"


def say(msg: str = "") -> None:
    print(msg, flush=True)


def step(n: int, title: str) -> None:
    say(f"\n== {n}. {title} " + "=" * max(0, 60 - len(title)))


def balancer(lab: Lab, name: str, prio: int, peer: str) -> dict:
    me = lab.node(name)
    hc = {"type": "tcp", "interval_s": 0.5, "timeout_s": 0.4, "rise": 2, "fall": 2}
    reals = [{"address": r.ipv4} for r in lab.by_role("real")]
    vips = [{"address": VIP, "port": HTTP, "real": reals,
             "healthcheck": {"type": "http", "http_path": "/"}},
            {"address": VIP, "port": ECHO, "real": reals}]
    return lab.balancer_config(
        name, vips, healthcheck=hc,
        vrrp=[{"name": "vi1", "interface": "eth0", "vrid": 51, "priority": prio,
               "advert_interval_s": 0.1, "preempt": True, "preempt_delay_s": 2.0,
               "vips": [f"{VIP}/24"]}],
        sync={"enabled": True, "listen": f"{me.ipv4}:9542", "peers": [f"{peer}:9542"],
              "key": SYNC_KEY, "vrrp_instance": "vi1"})


def status(lab: Lab, name: str) -> dict | None:
    """The daemon's status straight from its API socket (quicker than the CLI)."""
    try:
        return api.request(lab.api_socket(name), "status", timeout=2.0)
    except (OSError, api.ApiError):
        return None


def vrrp_state(lab: Lab, name: str) -> str | None:
    st = status(lab, name)
    return (st.get("vrrp") or [{}])[0].get("state") if st else None


def outage(answer_times: list[float], t_fail: float) -> float | None:
    """The longest silence between two probe answers around the failure, in ms: from
    the last answer through the old master to the first through the new one."""
    around = sorted(t for t in answer_times if t >= t_fail - 1.0)
    if len(around) < 2 or around[0] > t_fail or around[-1] < t_fail:
        return None
    return max(b - a for a, b in zip(around, around[1:], strict=False)) * 1000


def run(fast: bool) -> dict:
    summary: dict = {}
    t_start = time.monotonic()
    step(1, "Building the lab")
    with Lab(PREFIX, clients=1, balancers=2, reals=3) as lab:
        for r in lab.by_role("real"):
            lab.start_nginx(r.name, HTTP)
            lab.start_echo(r.name, ECHO)
        say("client1 10.99.0.11 | lb1 10.99.0.21, lb2 10.99.0.22 | real1-3 10.99.0.31-33")
        say(f"each real runs nginx (:{HTTP}) and an echo server (:{ECHO}) and holds the VIP "
            f"{VIP} on lo")

        step(2, "Starting l4lb on both balancers (VRRP pair, conn sync)")
        lab.daemons = {}
        lab.daemons["lb1"] = lab.start_l4lb("lb1", balancer(lab, "lb1", 150, "10.99.0.22"))
        lab.daemons["lb2"] = lab.start_l4lb("lb2", balancer(lab, "lb2", 100, "10.99.0.21"))
        wait_for(lambda: vrrp_state(lab, "lb1") == "master", 15, what="lb1 master")
        wait_for(lambda: vrrp_state(lab, "lb2") == "backup", 15, what="lb2 backup")
        say("lb1 is VRRP master and holds the VIP; lb2 is backup with its XDP program "
            "loaded and ready")

        step(3, "Requests spread over the reals (Maglev)")
        n = 150 if fast else 600
        res = lab.client("client1", ["spread", f"{VIP}:{ECHO}", "--count", str(n)])
        for real, k in sorted(res["reals"].items()):
            say(f"  {real}: {k:4d} connections  {'#' * (k * 40 // n)}")
        summary["requests"] = n
        summary["answered"] = res["ok"]
        wrk_s = 2 if fast else 5
        out = lab.run("client1", ["wrk", "-t2", "-c32", f"-d{wrk_s}s", f"http://{VIP}/"],
                      timeout=60).stdout
        rps = next((ln.split()[-1] for ln in out.splitlines() if "Requests/sec" in ln), "?")
        say(f"  wrk through the VIP: {rps} HTTP requests/s for {wrk_s}s")
        summary["wrk_rps"] = float(rps) if rps != "?" else None

        step(4, "A real dies; health checks take it out")
        echo3 = next(s for s in lab.services if s.node == "real3" and "echoserver" in
                     " ".join(s.argv))
        echo3.stop()
        t0 = time.monotonic()

        def real3_down():
            st = status(lab, "lb1") or {"vips": []}
            return any(r["address"] == "10.99.0.33" and not r["up"]
                       for v in st["vips"] if v["vip"].endswith(f":{ECHO}/tcp")
                       for r in v["reals"])
        wait_for(real3_down, 10, what="real3 down")
        took = time.monotonic() - t0
        say(f"  echo server on real3 stopped; l4lb marked it DOWN after {took:.1f}s "
            "(interval 0.5s x fall 2)")
        res = lab.client("client1", ["spread", f"{VIP}:{ECHO}", "--count", "60"])
        say(f"  60 new connections: {res['reals']} (real3 gets none), {res['ok']}/60 answered")
        summary["health_down_s"] = round(took, 2)
        summary["answered"] += res["ok"]
        summary["requests"] += 60
        lab.start_echo("real3", ECHO)

        step(5, "The master dies; the backup takes over, connections carry on")
        conns = 20 if fast else 50
        ready = lab.workdir / "demo-hold.json"
        holder = lab.popen("client1", [sys.executable, "-m", "l4lb.lab.client", "hold",
                                       f"{VIP}:{ECHO}", "--conns", str(conns), "--every", "0.1",
                                       "--seconds", "120", "--ready-file", str(ready)])
        wait_for(ready.exists, 15, what="long-lived connections")
        prober = lab.popen("client1", [sys.executable, "-m", "l4lb.lab.client", "probe",
                                       f"{VIP}:{ECHO}", "--every", "0.01", "--seconds", "60",
                                       "--timeout", "0.5"])
        time.sleep(1.0 if fast else 2.0)  # sync streams the open connections to lb2
        say(f"  {conns} long-lived connections (a line every 100 ms each) and a probe "
            "every 10 ms run through lb1")
        t_kill = time.time()
        lab.daemons["lb1"].stop(signal.SIGKILL)
        lab.run("lb1", ["ip", "link", "set", "eth0", "down"])
        say("  kill -9 of lb1's daemon, and lb1's link down")
        wait_for(lambda: vrrp_state(lab, "lb2") == "master", 10, what="lb2 master")
        time.sleep(2.0)
        prober.stop()
        holder.proc.send_signal(signal.SIGTERM)
        holder.proc.wait(20)
        hold = json.loads(holder.output().strip().splitlines()[-1])
        answers = [json.loads(ln)["t"] for ln in prober.output().splitlines()
                   if ln.startswith("{")]
        outage_ms = outage(answers, t_kill)
        say(f"  lb2 is master now; VIP outage seen by the probe: "
            f"{outage_ms:.0f} ms" if outage_ms is not None else "  no probe answers?")
        say(f"  long-lived connections alive: {hold['alive']}/{conns}, reset: {hold['errors']},"
            f" moved to another real: {hold['moved']}")
        summary["failover_outage_ms"] = round(outage_ms, 1) if outage_ms is not None else None
        summary["long_lived_alive"] = hold["alive"]
        summary["long_lived_total"] = conns

        step(6, "Metrics (Prometheus, scraped from lb2)")
        text = lab.run("lb2", ["curl", "-s", "http://127.0.0.1:9541/metrics"]).stdout
        shown = [ln for ln in text.splitlines()
                 if ln.startswith(("l4lb_vip_packets_total", "l4lb_vrrp_state{",
                                   "l4lb_conn_table_entries", "l4lb_sync_entries_received"))
                 and not ln.endswith(" 0.0")]
        for ln in shown[:8]:
            say(f"  {ln}")
        summary["metrics_lines"] = sum(1 for ln in text.splitlines()
                                       if ln.startswith("l4lb_"))
    summary["namespaces_left"] = len(lab_namespaces(PREFIX))
    summary["seconds"] = round(time.monotonic() - t_start, 1)

    step(7, "Summary")
    rows = [("requests answered", f"{summary['answered']}/{summary['requests']}"),
            ("HTTP requests/s (wrk)", summary["wrk_rps"]),
            ("dead real out of the ring after", f"{summary['health_down_s']} s"),
            ("failover outage (probe every 10 ms)", f"{summary['failover_outage_ms']} ms"),
            ("long-lived connections alive", f"{summary['long_lived_alive']}/"
                                              f"{summary['long_lived_total']}"),
            ("l4lb metric samples exported", summary["metrics_lines"]),
            ("namespaces left behind", summary["namespaces_left"]),
            ("demo took", f"{summary['seconds']} s")]
    for k, v in rows:
        say(f"  {k:<40}{v}")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fast", action="store_true", help="shorter steps (used by the tests)")
    ap.add_argument("--json", help="write the summary as JSON here")
    a = ap.parse_args(argv)
    # SIGTERM tears the lab down like Ctrl-C does. pyroute2 forks helpers that it
    # ends with SIGTERM: in those, the default action must stay.
    main_pid = os.getpid()

    def on_term(*_):
        if os.getpid() != main_pid:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        summary = run(a.fast)
    except KeyboardInterrupt:
        say("\ninterrupted: the lab has been removed")
        return 130
    except (LabError, TimeoutError) as e:
        say(f"\ndemo failed: {e}\n(the lab has been removed)")
        return 1
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
