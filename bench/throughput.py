#!/usr/bin/env python3
"""End-to-end throughput in the lab: iperf3 Gbit/s and wrk requests/s.

Four paths, measured in one run on the same lab, one after another:
  direct        client -> real1 by its own address (the ceiling)
  l4lb_native   client -> VIP -> lb1 (l4lb, native XDP, DR) -> real1 -> client
  l4lb_generic  the same with generic (skb) XDP
  haproxy       client -> lb2 (HAProxy `mode tcp`, no XDP) -> real1 -> lb2 -> client

The VIP has one real (real1) so every path ends at the same server. On veth,
native XDP needs an XDP_PASS program on the peer bridge port, which turns off
TSO there (README: The lab): native is expected to be slower than generic here,
unlike on real NICs.

    .venv/bin/python -m bench.throughput [--quick] [--seconds S] [--runs N] [--json PATH] [--md PATH]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

from bench.common import markdown_table, run_meta, text_table, write_json, write_text
from l4lb.lab import Lab

VIP = "10.99.0.100"
PATHS = ["direct", "l4lb_generic", "l4lb_native", "haproxy"]


def iperf3(lab: Lab, host: str, seconds: float) -> float:
    r = lab.run("client1", ["iperf3", "-c", host, "-p", "5201", "-t", str(seconds), "-J",
                            "--connect-timeout", "3000"], timeout=seconds + 30)
    data = json.loads(r.stdout)
    if "error" in data:
        raise RuntimeError(f"iperf3 to {host}: {data['error']}")
    return data["end"]["sum_received"]["bits_per_second"] / 1e9


def wrk(lab: Lab, host: str, seconds: float) -> float:
    r = lab.run("client1", ["wrk", "-t2", "-c64", f"-d{int(seconds)}s", "--timeout", "2s",
                            f"http://{host}/"], timeout=seconds + 30)
    m = re.search(r"Requests/sec:\s+([\d.]+)", r.stdout)
    if not m:
        raise RuntimeError(f"wrk printed no rate: {r.stdout[-300:]}")
    errs = re.search(r"Non-2xx or 3xx responses: (\d+)", r.stdout)
    if errs:
        raise RuntimeError(f"wrk saw {errs.group(1)} error responses")
    return float(m.group(1))


def haproxy_conf(lab: Lab) -> Path:
    real = lab.node("real1").ipv4
    path = lab.workdir / "haproxy.cfg"
    path.write_text(f"""
global
    maxconn 8000
    nbthread 2
    pidfile {lab.workdir}/haproxy.pid
defaults
    mode tcp
    timeout connect 3s
    timeout client 60s
    timeout server 60s
frontend http
    bind :80
    default_backend http
backend http
    server real1 {real}:80
frontend iperf
    bind :5201
    default_backend iperf
backend iperf
    server real1 {real}:5201
""")
    return path


def measure(lab: Lab, target: str, seconds: float, runs: int) -> tuple[list, list]:
    g, r = [], []
    for _ in range(runs):
        g.append(iperf3(lab, target, seconds))
        time.sleep(0.5)
        r.append(wrk(lab, target, seconds))
        time.sleep(0.5)
    return g, r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short runs (about 2 minutes)")
    ap.add_argument("--seconds", type=float, default=None, help="length of each run")
    ap.add_argument("--runs", type=int, default=None, help="runs per path and tool")
    ap.add_argument("--json", help="write results as JSON here")
    ap.add_argument("--md", help="write a Markdown report here")
    a = ap.parse_args(argv)
    seconds = a.seconds or (4 if a.quick else 10)
    runs = a.runs or (1 if a.quick else 3)

    results = {"iperf3_gbps": {}, "wrk_rps": {}}
    raw = {}
    with Lab("bthr", clients=1, balancers=2, reals=1) as lab:
        lab.start_nginx("real1")
        lab.start_iperf3("real1")
        vips = [{"address": VIP, "port": p, "real": [{"address": lab.node("real1").ipv4}]}
                for p in (80, 5201)]
        hc = {"type": "tcp", "interval_s": 1.0, "timeout_s": 0.5}
        for path in PATHS:
            print(f"measuring {path} ...", flush=True)
            if path == "direct":
                target = lab.node("real1").ipv4
            elif path == "haproxy":
                hap = lab.popen("lb2", ["haproxy", "-db", "-f", str(haproxy_conf(lab))])
                lab.wait_listening(hap, 5201)
                target = lab.node("lb2").ipv4
            else:
                mode = path.split("_")[1]
                if mode == "native":
                    lab.prepare_native("lb1")
                daemon = lab.start_l4lb("lb1", lab.balancer_config("lb1", vips, xdp_mode=mode,
                                                                   healthcheck=hc))
                target = VIP
            g, r = measure(lab, target, seconds, runs)
            raw[path] = {"iperf3_gbps": g, "wrk_rps": r}
            results["iperf3_gbps"][path] = round(statistics.median(g), 3)
            results["wrk_rps"][path] = round(statistics.median(r), 1)
            if path.startswith("l4lb"):
                lab.l4lb("lb1", ["stop"])
                daemon.proc.wait(20)
                if path == "l4lb_native":
                    lab.unprepare_native("lb1")  # the next path must not inherit it
        results["l4lb_forwarded"] = True

    d_g, d_r = results["iperf3_gbps"]["direct"], results["wrk_rps"]["direct"]
    h_g, h_r = results["iperf3_gbps"]["haproxy"], results["wrk_rps"]["haproxy"]
    rows = []
    for p in PATHS:
        g, r = results["iperf3_gbps"][p], results["wrk_rps"][p]
        rows.append([p, f"{g:.2f}", f"{g / d_g:.2f}", f"{g / h_g:.2f}", f"{r:.0f}",
                     f"{r / d_r:.2f}", f"{r / h_r:.2f}"])
    headers = ["path", "iperf3 Gbit/s", "x direct", "x haproxy", "wrk req/s", "x direct",
               "x haproxy"]
    out = dict(results, raw=raw, seconds=seconds, runs=runs,
               note="medians over runs; one real; aim: l4lb >= 0.9x direct and >= 1.6x "
                    "haproxy", **run_meta(a.quick, argv))
    del out["l4lb_forwarded"]
    print(f"\nthroughput, medians of {runs} run(s) of {seconds:g}s each")
    print(text_table(headers, rows, right=set(range(1, 7))))
    print("aim: l4lb >= 0.9x direct and >= 1.6x haproxy")
    if a.json:
        write_json(a.json, out)
    if a.md:
        write_text(a.md, f"# Throughput\n\n`{out['command']}`\n\n"
                   + markdown_table(headers, rows, right=set(range(1, 7)))
                   + "\n\nAim: l4lb >= 0.9x direct and >= 1.6x HAProxy.\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
