#!/usr/bin/env python3
"""End-to-end throughput in the lab: iperf3 Gbit/s and wrk requests/s.

Six paths, all set up at once on one lab (each through its own middle node and VIP)
and measured side by side: every run takes every path in turn, the order rotating,
so that the load of the rest of the machine falls on all paths alike.
  direct        client -> real1 by its own address (the ceiling)
  lab_routed    client -> lb4 (kernel IP forwarding, no XDP) -> real1: the lab's extra
                veth/bridge hop alone (GRO/GSO intact)
  xdp_relay     client -> VIP -> lb3 (bpf/floors.c xdp_relay, generic XDP: only rewrites
                MACs, XDP_TX) -> real1: the floor of "an XDP hop in this lab"
  l4lb_generic  client -> VIP -> lb1 (l4lb, generic XDP, DR) -> real1
  l4lb_native   client -> VIP -> lb5 (l4lb, native XDP, DR) -> real1
  haproxy       client -> lb2 (HAProxy `mode tcp`, no XDP) -> real1 -> lb2 -> client
Replies go straight from real1 to the client on every path but haproxy (DSR).
So: lab_routed / direct is what the extra hop costs, xdp_relay / lab_routed what a
generic-XDP hop costs on veth, l4lb_generic / xdp_relay what our program adds.

Beside each iperf3 figure: the mean size of what the middle node's eth0 received
(bytes / packets over the run): ~64 KB means GSO super-packets crossed the hop whole,
~1.5 KB means they were cut into MTU frames. A middle node that saw less than 90% of
the bytes iperf3 moved is an error (the path went around it). `--profile` records
`perf` (Debian's linux-perf) system-wide during one extra iperf3 run per XDP path
and keeps the top kernel symbols of the iperf3 processes (where softirq work lands).
On veth, native XDP needs an XDP_PASS program on the peer bridge port, which turns
off TSO there (README: The lab): native is expected to be slower than generic here.

    .venv/bin/python -m bench.throughput [--quick] [--seconds S] [--runs N] [--profile]
                                         [--json PATH] [--md PATH]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pyroute2 import NetNS

from bench.common import markdown_table, run_meta, text_table, write_json, write_text
from l4lb.lab import Lab

#: path -> (middle node or None, VIP it is reached by or None: the node's own address)
PATHS = {
    "direct": (None, None),
    "lab_routed": ("lb4", "10.99.0.103"),
    "xdp_relay": ("lb3", "10.99.0.102"),
    "l4lb_generic": ("lb1", "10.99.0.100"),
    "l4lb_native": ("lb5", "10.99.0.101"),
    "haproxy": ("lb2", None),
}
VIPS = tuple(v for _, v in PATHS.values() if v)
PROFILED = ("lab_routed", "xdp_relay", "l4lb_generic")
AIM = "aim: l4lb >= 0.9x direct and >= 1.6x haproxy"


def iperf3(lab: Lab, host: str, seconds: float) -> tuple[float, int]:
    """(Gbit/s received, bytes received) of one bounded iperf3 run."""
    r = lab.run("client1", ["iperf3", "-c", host, "-p", "5201", "-t", str(seconds), "-J",
                            "--connect-timeout", "3000"], timeout=seconds + 30)
    data = json.loads(r.stdout)
    if "error" in data:
        raise RuntimeError(f"iperf3 to {host}: {data['error']}")
    got = data["end"]["sum_received"]
    return got["bits_per_second"] / 1e9, int(got["bytes"])


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


def rx_stats(lab: Lab, node: str) -> tuple[int, int]:
    """(rx bytes, rx packets) of a node's eth0."""
    with NetNS(lab.node(node).netns) as ns:
        link = ns.get_links(ifname="eth0")[0]
    s = link.get_attr("IFLA_STATS64")
    return s["rx_bytes"], s["rx_packets"]


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


def mac_bytes(mac: str) -> str:
    return ",".join(f"0x{b}" for b in mac.split(":"))


def relay_cflags(vip: str, own_mac: str, real_mac: str) -> list[str]:
    """bpf/floors.c's xdp_relay for one VIP (the floors' unused table kept small)."""
    vip_int = int(ipaddress.IPv4Address(vip))
    return [f"-DRELAY_VIP={vip_int:#x}", f"-DRELAY_OWN_MAC={mac_bytes(own_mac)}",
            f"-DRELAY_REAL_MAC={mac_bytes(real_mac)}", "-DFLOOR_TABLE_SIZE=1024"]


def setup_relay(lab: Lab, node: str, vip: str) -> None:
    """xdp_relay (generic XDP) on the node's eth0; the node holds the VIP so that the
    client's ARP finds it (the program sends the VIP's frames on before the stack)."""
    n, real = lab.node(node), lab.node("real1")
    flags = relay_cflags(vip, n.mac, real.mac)
    lab.run_ns(n.netns, [sys.executable, "-c",
                         "import sys; from l4lb.dataplane import loader; "
                         "loader.Program('floors.c', 'xdp_relay', sys.argv[2:])"
                         ".attach(sys.argv[1], 'generic')", "eth0", *flags])
    with NetNS(n.netns) as ns:
        ns.addr("add", index=ns.link_lookup(ifname="lo")[0], address=vip, prefixlen=32)


def setup_routed(lab: Lab, node: str, vip: str) -> None:
    """The node forwards the VIP to real1 as a plain IPv4 router (no XDP); the client
    routes the VIP through it. No ICMP redirects either way: they would send the client
    straight to real1."""
    lab.sysctl(node, {"net.ipv4.ip_forward": "1", "net.ipv4.conf.all.send_redirects": "0",
                      "net.ipv4.conf.eth0.send_redirects": "0"})
    lab.sysctl("client1", {"net.ipv4.conf.all.accept_redirects": "0",
                           "net.ipv4.conf.eth0.accept_redirects": "0"})
    with NetNS(lab.node(node).netns) as ns:
        ns.route("add", dst=f"{vip}/32", gateway=lab.node("real1").ipv4)
    with NetNS(lab.node("client1").netns) as ns:
        ns.route("add", dst=f"{vip}/32", gateway=lab.node(node).ipv4)


LINEARISE = {"__pskb_pull_tail", "pskb_expand_head", "skb_cow_data_for_xdp"}


def chain_shares(script: str, comm: str = "iperf3") -> dict:
    """From `perf script -F comm,ip,sym` of a call-graph recording: of `comm`'s samples,
    the share (%) with do_xdp_generic in the chain, with generic XDP linearising the skb
    (one of LINEARISE called from do_xdp_generic), with a BPF program as the leaf, and the
    top leaf symbols as [percent, symbol]."""
    n = xdp = lin = bpf = 0
    leaves: dict[str, int] = {}
    for block in script.split("\n\n"):
        lines = block.strip("\n").splitlines()
        if not lines or lines[0].split()[:1] != [comm]:
            continue
        syms = [ln.split(None, 1)[1] if len(ln.split(None, 1)) > 1 else "?" for ln in lines[1:]]
        syms = [x.split("+0x")[0] for x in syms]
        n += 1
        leaf = syms[0] if syms else "?"
        leaves[leaf] = leaves.get(leaf, 0) + 1
        if "do_xdp_generic" in syms:
            xdp += 1
            if LINEARISE & set(syms[:syms.index("do_xdp_generic")]):
                lin += 1
        bpf += leaf.startswith("bpf_prog_")
    pct = (lambda k: round(100 * k / n, 1)) if n else (lambda k: 0.0)
    top = sorted(leaves.items(), key=lambda kv: -kv[1])[:10]
    return {"samples": n, "xdp_generic_percent": pct(xdp), "linearise_percent": pct(lin),
            "bpf_prog_percent": pct(bpf), "top": [[pct(c), sym] for sym, c in top]}


def profile(lab: Lab, host: str, seconds: float, out: Path) -> dict:
    """perf record -a -g during one iperf3 run; chain_shares() of the iperf3 processes'
    samples (both ends' softirq work lands there)."""
    rec = subprocess.Popen(["perf", "record", "-a", "-g", "-F", "499", "-o", str(out), "--",
                            "sleep", str(seconds)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        iperf3(lab, host, seconds)
    finally:
        rec.wait(timeout=seconds + 30)
    script = subprocess.run(["perf", "script", "-i", str(out), "-F", "comm,ip,sym",
                             "--comms", "iperf3"], capture_output=True, text=True,
                            timeout=300).stdout
    return chain_shares(script)


def profile_text(prof: dict) -> str:
    return (f"of {prof['samples']} iperf3 samples: under do_xdp_generic "
            f"{prof['xdp_generic_percent']:.1f}%, in its linearisation of the skb "
            f"{prof['linearise_percent']:.1f}%, in BPF programs "
            f"{prof['bpf_prog_percent']:.1f}%; top symbols "
            + ", ".join(f"{s} {x:.1f}%" for x, s in prof["top"][:6]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short runs (under 3 minutes)")
    ap.add_argument("--seconds", type=float, default=None, help="length of each run")
    ap.add_argument("--runs", type=int, default=None, help="runs per path and tool")
    ap.add_argument("--profile", action="store_true",
                    help="perf profile of one extra iperf3 run per XDP path (needs perf)")
    ap.add_argument("--json", help="write results as JSON here")
    ap.add_argument("--md", help="write a Markdown report here")
    a = ap.parse_args(argv)
    seconds = a.seconds or (4 if a.quick else 10)
    runs = a.runs or (1 if a.quick else 3)
    if not 1 <= seconds <= 120 or not 1 <= runs <= 20:
        ap.error("--seconds must be in 1..120 and --runs in 1..20")
    if a.profile and not shutil.which("perf"):
        ap.error("--profile needs perf (Debian: linux-perf)")

    raw = {p: {"iperf3_gbps": [], "wrk_rps": [], "hop_rx_bytes_per_packet": []} for p in PATHS}
    profiles = {}
    with open("/proc/loadavg") as f:
        load_before = " ".join(f.read().split()[:3])
    with Lab("bthr", clients=1, balancers=5, reals=1, vips=VIPS) as lab:
        lab.start_nginx("real1")
        lab.start_iperf3("real1")
        hc = {"type": "tcp", "interval_s": 1.0, "timeout_s": 0.5}
        real = lab.node("real1").ipv4
        targets = {"direct": real}
        hap = lab.popen("lb2", ["haproxy", "-db", "-f", str(haproxy_conf(lab))])
        lab.wait_listening(hap, 5201)
        targets["haproxy"] = lab.node("lb2").ipv4
        setup_relay(lab, "lb3", PATHS["xdp_relay"][1])
        setup_routed(lab, "lb4", PATHS["lab_routed"][1])
        lab.prepare_native("lb5")
        for path, mode in (("l4lb_generic", "generic"), ("l4lb_native", "native")):
            node, vip = PATHS[path]
            vips = [{"address": vip, "port": p, "real": [{"address": real}]} for p in (80, 5201)]
            lab.start_l4lb(node, lab.balancer_config(node, vips, xdp_mode=mode, healthcheck=hc))
            time.sleep(2.5)  # the real passes its health checks (rise 2 x 1 s)
        for p in ("lab_routed", "xdp_relay", "l4lb_generic", "l4lb_native"):
            targets[p] = PATHS[p][1]
        names = list(PATHS)
        for run in range(runs):
            k = run % len(names)
            for path in names[k:] + names[:k]:
                print(f"run {run + 1}/{runs}: {path} ...", flush=True)
                hop = PATHS[path][0] or "real1"
                b0, p0 = rx_stats(lab, hop)
                g, moved = iperf3(lab, targets[path], seconds)
                b1, p1 = rx_stats(lab, hop)
                if b1 - b0 < 0.9 * moved:
                    raise RuntimeError(f"{path}: {hop} received {b1 - b0} bytes of the "
                                       f"{moved} iperf3 moved: the path went around it")
                raw[path]["iperf3_gbps"].append(round(g, 3))
                raw[path]["hop_rx_bytes_per_packet"].append(round((b1 - b0) / max(p1 - p0, 1)))
                time.sleep(0.5)
                raw[path]["wrk_rps"].append(round(wrk(lab, targets[path], seconds), 1))
                time.sleep(0.5)
        if a.profile:
            for path in PROFILED:
                print(f"profiling {path} ...", flush=True)
                profiles[path] = profile(lab, targets[path], min(seconds, 5),
                                         lab.workdir / f"perf-{path}.data")
    with open("/proc/loadavg") as f:
        load_after = " ".join(f.read().split()[:3])

    med = {p: {k: statistics.median(v) for k, v in raw[p].items()} for p in PATHS}
    d, h = med["direct"], med["haproxy"]
    rows = []
    for p in PATHS:
        m = med[p]
        rows.append([p, f"{m['iperf3_gbps']:.2f}", f"{m['iperf3_gbps'] / d['iperf3_gbps']:.2f}",
                     f"{m['iperf3_gbps'] / h['iperf3_gbps']:.2f}",
                     f"{m['hop_rx_bytes_per_packet']:.0f}", f"{m['wrk_rps']:.0f}",
                     f"{m['wrk_rps'] / d['wrk_rps']:.2f}", f"{m['wrk_rps'] / h['wrk_rps']:.2f}"])
    headers = ["path", "iperf3 Gbit/s", "x direct", "x haproxy", "hop rx B/pkt", "wrk req/s",
               "x direct", "x haproxy"]
    g = {p: med[p]["iperf3_gbps"] for p in PATHS}
    steps = {"extra hop (lab_routed / direct)": g["lab_routed"] / g["direct"],
             "generic XDP hop (xdp_relay / lab_routed)": g["xdp_relay"] / g["lab_routed"],
             "our program (l4lb_generic / xdp_relay)": g["l4lb_generic"] / g["xdp_relay"]}
    out = {"iperf3_gbps": {p: round(med[p]["iperf3_gbps"], 3) for p in PATHS},
           "wrk_rps": {p: round(med[p]["wrk_rps"], 1) for p in PATHS},
           "hop_rx_bytes_per_packet": {p: med[p]["hop_rx_bytes_per_packet"] for p in PATHS},
           "iperf3_steps": {k: round(v, 3) for k, v in steps.items()},
           # ratios within each run (neighbours in time), robust to the load moving
           "iperf3_x_direct_per_run": {p: [round(x / dx, 3) for x, dx in zip(
               raw[p]["iperf3_gbps"], raw["direct"]["iperf3_gbps"], strict=True)]
               for p in PATHS},
           "raw": raw, "profiles": profiles, "seconds": seconds, "runs": runs,
           "load_average_before_after": [load_before, load_after],
           "note": "medians over runs, paths interleaved within each run; one real; " + AIM,
           **run_meta(a.quick, argv)}
    print(f"\nthroughput, medians of {runs} run(s) of {seconds:g}s each, paths interleaved")
    print(text_table(headers, rows, right=set(range(1, 8))))
    step_lines = [f"{k}: {v:.2f}" for k, v in steps.items()]
    print("\n".join(["iperf3, where the gap to direct goes:", *step_lines, AIM,
                     f"load average before / after: {load_before} / {load_after}"]))
    for p, prof in profiles.items():
        print(f"perf, {p}: {profile_text(prof)}")
    if a.json:
        write_json(a.json, out)
    if a.md:
        md = [f"# Throughput\n\n`{out['command']}`\n",
              markdown_table(headers, rows, right=set(range(1, 8))), "",
              "iperf3, where the gap to direct goes (ratios of medians, same run):", "",
              *[f"- {s}" for s in step_lines], "",
              "Paths: lab_routed crosses the same extra veth/bridge hop through a node that "
              "forwards by plain IP routing (no XDP); xdp_relay through a node running "
              "bpf/floors.c's xdp_relay in generic mode (MAC rewrite, XDP_TX, nothing else); "
              "l4lb_generic and l4lb_native through the l4lb daemon (DR); replies go straight "
              "to the client on all of them. "
              f"Paths interleaved within each run (order rotating); {runs} run(s) of "
              f"{seconds:g} s; load average before / after: {load_before} / {load_after}. "
              "hop rx B/pkt: mean size of what the middle node's eth0 received (real1's "
              "on the direct path).", ""]
        if profiles:
            md += ["`--profile`: perf over one extra iperf3 run per path, in % of the iperf3 "
                   "processes' samples (both ends' softirq work lands there):", ""]
        for p, prof in profiles.items():
            md.append(f"- {p}: {profile_text(prof)}")
        md += ["", AIM.replace("aim:", "Aim:").replace("haproxy", "HAProxy") + "."]
        write_text(a.md, "\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
