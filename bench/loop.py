#!/usr/bin/env python3
"""VRRP is never delayed by the rest of the daemon (issue 11): adverts under load.

A lab pair (lb1 master, priority 150; lb2 backup, 100; VRRPv3, conn sync on) in
front of one real. Cases:

  stall    0.1 s adverts. lb1's conn table holds N entries (1,000,000; --quick
           100,000) written straight into its pinned map (BPF_MAP_UPDATE_BATCH, as
           bench/sync.py fills its tables), so every walk is a big one. For S
           seconds (30; --quick 10), at the same time: two API clients calling
           `status`, `stats`, `conns` (limit 1000; and limit 100 of the VIP) over
           and over, one `conns` of 200,000 entries (--big-conns; --quick 30,000:
           a long walk and a huge JSON answer, whose encoding holds the GIL),
           `curl` scraping /metrics in lb1 in a loop, and the sync master walking
           its whole table to lb2 again and again (full_sync_interval_s 1).
  iperf3   0.02 s adverts (--iperf-interval) with node.vrrp_rt_priority (SCHED_RR for
           the VRRP process; case iperf3-rt) and without (case iperf3), --runs times,
           iperf3 through the VIP (DR via lb1, generic XDP) saturating both CPUs for
           S seconds (60; --quick 15), as tests/lab/test_vrrp_load.py does at 0.1 s.

Measured per case:
  advert_interval_ms     the configured interval;
  longest_advert_gap_ms  the longest gap between two adverts of lb1 as lb2's kernel
                         received them (a raw protocol-112 socket in lb2's namespace,
                         kernel receive timestamps: `python -m bench.loop capture`);
  false_failovers        VRRP transitions on either node during the load;
  loop_lag_p99_ms / loop_lag_max_ms
                         the daemon's own event loop (API, metrics, health, sync) on lb1:
                         how late a task sleeping 50 ms there woke up
                         (l4lb_event_loop_lag_seconds{loop="main"}; p99 interpolated in
                         the histogram's buckets, max from the status' 10 s recent max
                         read every second);
  vrrp_lag_max_ms        the same for the VRRP process's loop on lb1 (its CPU waits);
  conn_entries           lb1's conn table as its metrics counted it;
  ops                    API calls and scrapes done during the load.

Run as root from the repository root:
    .venv/bin/python -m bench.loop --json bench/results/loop.json --md bench/results/loop.md
"""

from __future__ import annotations

import argparse
import ctypes as ct
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import common

ROOT = Path(__file__).resolve().parent.parent

VIP = "10.99.0.100"
VPORT = 5201
VIP_KEY = f"{VIP}:{VPORT}/tcp"
SYNC_PORT = 7400
KEY = "bench-loop-key-0123456789abcdef"
FILL_SRC = 0x0A010000  # 10.1.0.0: fill flows 10.1.x.y, 60000 source ports each
SO_TIMESTAMPNS = 35  # Linux (socket module lacks it); cmsg type SCM_TIMESTAMPNS is the same
LAG_BUCKETS_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]


# ------------------------------------------------------------------ the lab pair
def lb_config(lab, node: str, interval: float, conn_table_size: int, rt_priority: int = 0,
              full_sync_s: float = 1.0) -> dict:
    vrrp = {"name": "VI_1", "interface": "eth0", "vrid": 51, "version": 3,
            "priority": 150 if node == "lb1" else 100, "advert_interval_s": interval,
            "preempt": True, "vips": [f"{VIP}/24"]}
    peer = "lb2" if node == "lb1" else "lb1"
    sync = {"enabled": True, "listen": f"{lab.node(node).ipv4}:{SYNC_PORT}",
            "peers": [f"{lab.node(peer).ipv4}:{SYNC_PORT}"], "key": KEY,
            "vrrp_instance": "VI_1", "full_sync_interval_s": full_sync_s}
    cfg = lab.balancer_config(node, [{"address": VIP, "port": VPORT, "mode": "dr",
                                      "real": [{"address": lab.node("real1").ipv4}]}],
                              vrrp=[vrrp], sync=sync)
    cfg["node"]["conn_table_size"] = conn_table_size
    if rt_priority:
        cfg["node"]["vrrp_rt_priority"] = rt_priority
    return cfg


def start_pair(lab, interval: float, conn_table_size: int, rt_priority: int = 0,
               full_sync_s: float = 1.0) -> None:
    from l4lb.lab import wait_for  # noqa: PLC0415

    with ThreadPoolExecutor(2) as ex:  # the two compile in parallel
        futs = [ex.submit(lab.start_l4lb, n, lb_config(lab, n, interval, conn_table_size,
                                                       rt_priority, full_sync_s))
                for n in ("lb1", "lb2")]
        for f in futs:
            f.result()
    wait_for(lambda: vrrp(lab, "lb1").get("state") == "master"
             and vrrp(lab, "lb2").get("state") == "backup", 15, 0.05, "lb1 master, lb2 backup")


def status(lab, node: str) -> dict:
    from l4lb import api  # noqa: PLC0415

    return api.request(lab.api_socket(node), "status", timeout=10.0)


def vrrp(lab, node: str) -> dict:
    return (status(lab, node).get("vrrp") or [{}])[0]


# ------------------------------------------------------- filling the pinned table
def fill_conns(lab, node: str, n: int, chunk: int = 100_000) -> int:
    """Write n established TCP flows to the VIP (real1) into the node's pinned conn
    table; returns n. Ids come from the daemon's tables.json."""
    import numpy as np  # noqa: PLC0415

    from l4lb.dataplane import bpfsys  # noqa: PLC0415
    from l4lb.dataplane import maps as M  # noqa: PLC0415
    from l4lb.dataplane.tables import CONN_VAL_DTYPE, coarse_now_ns  # noqa: PLC0415

    st = status(lab, node)
    tables = json.loads((Path("/run/l4lb") / lab.l4lb_name(node) / "tables.json").read_text())
    vip = next(v for v in tables["vips"] if v["address"] == VIP and v["port"] == VPORT)
    real_id, vip_id = vip["reals"][0]["real_id"], vip["vip_id"]
    fd = bpfsys.obj_get(f"{st['pin_dir']}/conns")
    # IPv4 flow keys: the fields this fill sets, at the mirror's offsets (maps.FlowKey)
    fields = {"src": ">u4", "dst": ">u4", "sport": ">u2", "dport": ">u2", "proto": "u1",
              "family": "u1"}
    kdt = np.dtype({"names": list(fields), "formats": list(fields.values()),
                    "offsets": [getattr(M.FlowKey, f).offset for f in fields],
                    "itemsize": ct.sizeof(M.FlowKey)})
    vdt = CONN_VAL_DTYPE
    vip_int = int.from_bytes(socket.inet_aton(VIP), "big")
    try:
        for lo in range(0, n, chunk):
            i = np.arange(lo, min(n, lo + chunk), dtype=np.uint64)
            k = np.zeros(len(i), kdt)
            k["src"] = FILL_SRC + i // 60000
            k["sport"] = 1024 + i % 60000
            k["dst"], k["dport"], k["proto"], k["family"] = vip_int, VPORT, 6, 4
            v = np.zeros(len(i), vdt)
            v["real_id"], v["vip_id"], v["last_seen_ns"] = real_id, vip_id, coarse_now_ns()
            bpfsys.update_batch(fd, k.tobytes(), v.tobytes(), len(i))
    finally:
        os.close(fd)
    return n


# ------------------------------------------------------------- advert capture
def capture_main(src: str, seconds: float) -> dict:
    """In a node's namespace: adverts (IP protocol 112) from `src`, kernel receive
    timestamps; the longest gap between two of them."""
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 112)
    s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    s.settimeout(0.2)
    times: list[float] = []
    end = time.monotonic() + seconds
    print("ready", flush=True)
    while time.monotonic() < end:
        try:
            data, anc, _f, addr = s.recvmsg(2048, 256)
        except (TimeoutError, socket.timeout):
            continue
        if addr[0] != src or len(data) < 21:
            continue
        ts = next((struct.unpack("=qq", d[:16]) for lvl, typ, d in anc
                   if lvl == socket.SOL_SOCKET and typ == SO_TIMESTAMPNS), None)
        times.append(ts[0] + ts[1] / 1e9 if ts else time.time())
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    worst = sorted(gaps)[-5:]
    return {"adverts": len(times), "longest_gap_ms": round(max(gaps, default=0) * 1000, 2),
            "worst_gaps_ms": [round(g * 1000, 2) for g in reversed(worst)]}


class Capture:
    """`python -m bench.loop capture` running in a node's namespace."""

    def __init__(self, lab, node: str, src: str, seconds: float) -> None:
        argv = lab.nsenter(node) + [sys.executable, "-m", "bench.loop", "capture",
                                    "--src", src, "--seconds", str(seconds)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("advert capture did not start")

    def result(self, timeout: float = 30) -> dict:
        out, _ = self.proc.communicate(timeout=timeout)
        return json.loads(out)


# ------------------------------------------------------------------ the load
class Load:
    """API clients and a metrics scraper hammering lb1 until stop()."""

    def __init__(self, lab, node: str = "lb1", api_threads: int = 2, big_conns: int = 0) -> None:
        self.lab, self.node = lab, node
        self.stop_ev = threading.Event()
        self.ops: dict[str, int] = {}
        self.errors: list[str] = []
        self.big: dict = {}
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._api, args=(i,), daemon=True)
                         for i in range(api_threads)]
        if big_conns:  # one `conns --limit big_conns`: a long walk and a huge JSON answer
            self._threads.append(threading.Thread(target=self._big, args=(big_conns,),
                                                  daemon=True))
        # one long-lived shell loop in the namespace scraping /metrics
        self._scraper = subprocess.Popen(
            lab.nsenter(node) + ["sh", "-c", "n=0; while :; do curl -s -m 30 -o /dev/null "
                                 "http://127.0.0.1:9541/metrics && n=$((n+1)); echo $n; done"],
            stdout=subprocess.PIPE, text=True, start_new_session=True)

    def _count(self, what: str) -> None:
        with self._lock:
            self.ops[what] = self.ops.get(what, 0) + 1

    def _api(self, i: int) -> None:
        from l4lb import api  # noqa: PLC0415

        sock = self.lab.api_socket(self.node)
        calls = [("status", {}), ("stats", {}), ("conns", {"limit": 1000}),
                 ("conns", {"vip": VIP_KEY, "limit": 100})]
        k = i
        while not self.stop_ev.is_set():
            cmd, args = calls[k % len(calls)]
            k += 1
            try:
                api.request(sock, cmd, timeout=60, **args)
                self._count(cmd)
            except Exception as e:  # noqa: BLE001 - reported, the load goes on
                self.errors.append(f"{cmd}: {e}")
                time.sleep(0.1)

    def _big(self, limit: int) -> None:
        from l4lb import api  # noqa: PLC0415

        t0 = time.monotonic()
        try:
            rows = api.request(self.lab.api_socket(self.node), "conns", timeout=300, limit=limit)
            self.big = {"limit": limit, "rows": len(rows),
                        "seconds": round(time.monotonic() - t0, 1)}
            self._count("conns")
        except Exception as e:  # noqa: BLE001 - reported
            self.errors.append(f"conns limit {limit}: {e}")

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self.stop_ev.set()
        for t in self._threads:
            t.join(300)
        os.killpg(self._scraper.pid, 15)
        out, _ = self._scraper.communicate(timeout=30)
        lines = [x for x in out.split() if x.isdigit()]
        self.ops["metrics"] = int(lines[-1]) if lines else 0


# ------------------------------------------------------------------ measuring
def lag_quantile(before: list[int], after: list[int], q: float) -> float | None:
    """Prometheus-style histogram_quantile over the bucket deltas (ms)."""
    d = [a - b for a, b in zip(after, before, strict=True)]
    total = sum(d)
    if not total:
        return None
    rank, cum, lo = q * total, 0, 0.0
    for i, c in enumerate(d):
        hi = LAG_BUCKETS_MS[i] if i < len(LAG_BUCKETS_MS) else LAG_BUCKETS_MS[-1]
        if cum + c >= rank and c:
            return round(lo + (hi - lo) * (rank - cum) / c, 2)
        cum += c
        lo = hi
    return float(LAG_BUCKETS_MS[-1])


def transitions(v: dict) -> int:
    return sum((v.get("counters") or {}).get("transitions", {}).values())


def metric(lab, node: str, name: str) -> float | None:
    out = lab.run(node, ["curl", "-s", "-m", "60", "http://127.0.0.1:9541/metrics"],
                  timeout=90).stdout
    for ln in out.splitlines():
        if ln.startswith(name + " ") or ln.startswith(name + "{"):
            return float(ln.rsplit(" ", 1)[1])
    return None


class LagPoller:
    """Reads lb1's status every second: the max of its 10 s recent-max lags, so the
    whole window is covered."""

    def __init__(self, lab, node: str = "lb1") -> None:
        self.lab, self.node = lab, node
        self.max = {"main": 0.0, "vrrp": 0.0}
        self.stop_ev = threading.Event()
        self.th = threading.Thread(target=self._run, daemon=True)
        self.th.start()

    def _run(self) -> None:
        while not self.stop_ev.wait(1.0):
            self.poll()

    def poll(self) -> None:
        try:
            lag = vrrp(self.lab, self.node)["runner"]["loop_lag"]
        except Exception:  # noqa: BLE001 - the next poll
            return
        for k in self.max:
            self.max[k] = max(self.max[k], lag[k]["recent_max_ms"])

    def stop(self) -> dict:
        self.stop_ev.set()
        self.th.join(30)
        self.poll()
        return self.max


def measure(lab, seconds: float, load: Load | None, interval: float) -> dict:
    """Capture adverts at lb2 and lags on lb1 while `load` (started here) runs."""
    v0 = {n: vrrp(lab, n) for n in ("lb1", "lb2")}
    cap = Capture(lab, "lb2", lab.node("lb1").ipv4, seconds)
    poller = LagPoller(lab)
    cpu0 = common.cpu_snapshot()
    if load:
        load.start()
    time.sleep(seconds)
    if load:
        load.stop()
    got = cap.result()
    cpu = common.cpu_snapshot()
    maxes = poller.stop()
    v1 = {n: vrrp(lab, n) for n in ("lb1", "lb2")}
    th0, th1 = v0["lb1"]["runner"], v1["lb1"]["runner"]
    main0, main1 = th0["loop_lag"]["main"], th1["loop_lag"]["main"]
    vr0, vr1 = th0["loop_lag"]["vrrp"], th1["loop_lag"]["vrrp"]
    flips = sum(transitions(v1[n]) - transitions(v0[n]) for n in ("lb1", "lb2"))
    takeovers = (v1["lb2"]["counters"]["transitions"].get("backup->master", 0)
                 - v0["lb2"]["counters"]["transitions"].get("backup->master", 0))

    def p99(b0: list[int], b1: list[int], top: float) -> float | None:
        q = lag_quantile(b0, b1, 0.99)  # interpolated: never above the max seen
        return None if q is None else min(q, round(top, 2))
    return {
        "advert_interval_ms": round(interval * 1000, 1),
        "longest_advert_gap_ms": got["longest_gap_ms"],
        "worst_advert_gaps_ms": got["worst_gaps_ms"],
        "adverts_seen": got["adverts"],
        "false_failovers": takeovers,  # the backup became master with the master alive
        "transitions": flips,  # on either node (a false failover makes two or more)
        "states_after": {n: v1[n]["state"] for n in ("lb1", "lb2")},
        "master_down_interval_ms": round(v1["lb2"]["master_down_interval_s"] * 1000, 1),
        "loop_lag_p99_ms": p99(main0["buckets"], main1["buckets"], maxes["main"]),
        "loop_lag_max_ms": round(maxes["main"], 1),
        "loop_lag_samples": main1["count"] - main0["count"],
        "vrrp_lag_p99_ms": p99(vr0["buckets"], vr1["buckets"], maxes["vrrp"]),
        "vrrp_lag_max_ms": round(maxes["vrrp"], 1),
        "rt_active": th1["rt_active"],
        # CPUs' worth busy outside this bench's own process (the daemons, iperf3, softirqs,
        # and anything else running on the machine) and stolen by the host
        "machine": common.other_load(cpu0, cpu),
        "ops": dict(load.ops) if load else {},
        "big_conns": dict(load.big) if load else {},
        "load_errors": (load.errors[:5] if load else []),
    }


# ------------------------------------------------------------------ cases
def case_stall(args) -> dict:
    from l4lb.lab import Lab  # noqa: PLC0415

    n, secs = (100_000, 10) if args.quick else (args.entries, args.seconds)
    big = 30_000 if args.quick else args.big_conns
    with Lab("bloop", clients=1, balancers=2, reals=1) as lab:
        start_pair(lab, 0.1, max(2 * n, 65536))
        t0 = time.monotonic()
        fill_conns(lab, "lb1", n)
        fill_s = time.monotonic() - t0
        load = Load(lab, big_conns=big)
        r = measure(lab, secs, load, 0.1)
        r["conn_entries"] = int(metric(lab, "lb1", "l4lb_conn_table_entries") or 0)
        s1 = status(lab, "lb1")["sync"]["full_walks"]
        r["sync_full_walks_completed"] = s1["sent_completed"]
        r["sync_full_entries_sent"] = s1["entries_sent"]
        r.update(case="stall", seconds=secs, fill_s=round(fill_s, 2), load=load_desc(big))
        return r


def load_desc(big: int) -> str:
    return ("2 API clients (status, stats, conns limit 1000, conns of the VIP limit 100), "
            f"one conns limit {big:,} at the start, curl /metrics in a loop, "
            "sync full walk every 1 s")


def case_iperf3(args, rt: int) -> dict:
    from l4lb.lab import Lab  # noqa: PLC0415

    secs = 15 if args.quick else args.iperf_seconds
    with Lab("bloopi", clients=1, balancers=2, reals=1) as lab:
        lab.start_iperf3("real1")
        start_pair(lab, args.iperf_interval, 65536, rt_priority=rt, full_sync_s=60)
        box: dict = {}

        def iperf() -> None:
            r = lab.run("client1", ["iperf3", "-c", VIP, "-p", str(VPORT), "-t", str(secs),
                                    "-J", "--connect-timeout", "3000"], timeout=secs + 60)
            box["gbps"] = json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9

        th = threading.Thread(target=iperf)
        th.start()
        time.sleep(0.5)
        r = measure(lab, secs - 1, None, args.iperf_interval)
        th.join(secs + 90)
        r.update(case=f"iperf3, rt_priority {rt}" if rt else "iperf3, normal priority",
                 seconds=secs, iperf3_gbps=round(box.get("gbps", 0.0), 2), conn_entries=0,
                 load="iperf3 through the VIP (DR via lb1, generic XDP), both CPUs saturated")
        return r


def run(args) -> dict:
    cases = []
    if "stall" in args.cases:
        cases.append(case_stall(args))
        print(render_rows(cases[-1:]), flush=True)
    for i in range(args.runs):  # alternating, so both see the same machine conditions
        for rt, name in ((args.rt_priority, "iperf3-rt"), (0, "iperf3")):
            if name in args.cases:
                c = case_iperf3(args, rt=rt)
                if args.runs > 1:
                    c["case"] += f" #{i + 1}"
                cases.append(c)
                print(render_rows(cases[-1:]), flush=True)
    return {**common.run_meta(args.quick), "cpus": os.cpu_count(), "cases": cases}


HEAD = ["case", "s", "advert_interval_ms", "longest_advert_gap_ms", "false_failovers",
        "loop_lag_p99_ms", "loop_lag_max_ms", "vrrp_lag_max_ms", "conn_entries"]


def _row(c: dict) -> list:
    return [c["case"], c["seconds"], *(c.get(k) for k in HEAD[2:])]


def render_rows(cases: list[dict]) -> str:
    return common.text_table(HEAD, [_row(c) for c in cases], right=set(range(1, len(HEAD))))


def render_md(r: dict) -> str:
    lines = ["# VRRP under load (bench/loop.py)", "",
             f"Command: `{r['command']}`  ", f"Kernel {r['kernel']}, {r['cpus']} CPUs, "
             f"{r['timestamp']}{' (quick)' if r['quick'] else ''}.", "",
             common.markdown_table(HEAD, [_row(c) for c in r["cases"]],
                                   right=set(range(1, len(HEAD)))), ""]
    for c in r["cases"]:
        lines += [f"- **{c['case']}**: {c['load']}; lb2's Master_Down_Interval "
                  f"{c['master_down_interval_ms']} ms; adverts seen at lb2 {c['adverts_seen']}, "
                  f"worst gaps {c['worst_advert_gaps_ms']} ms; VRRP real time: "
                  f"{c['rt_active']}; machine {c['machine']}; VRRP loop lag p99 {c['vrrp_lag_p99_ms']} ms; "
                  f"ops {c['ops']}" + (f"; big conns {c['big_conns']}" if c.get("big_conns")
                                       else "") + (f"; iperf3 {c['iperf3_gbps']} Gbit/s"
                                       if "iperf3_gbps" in c else "")
                  + (f"; sync full walks completed {c['sync_full_walks_completed']}, "
                     f"entries sent {c['sync_full_entries_sent']}"
                     if "sync_full_walks_completed" in c else "")
                  + (f"; load errors {c['load_errors']}" if c["load_errors"] else "")]
    lines += ["", "loop_lag: the daemon's own event loop (how late a task sleeping 50 ms "
              "there woke up); p99 interpolated in the histogram buckets "
              f"{LAG_BUCKETS_MS} ms; max: the status' 10 s recent max, read every second. "
              "vrrp_lag_max_ms: the same for the VRRP process's own loop (20 ms sleeps), "
              "read the same way."]
    return "\n".join(lines)


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["capture"]:
        ap = argparse.ArgumentParser(prog="python -m bench.loop capture")
        ap.add_argument("--src", required=True)
        ap.add_argument("--seconds", type=float, required=True)
        a = ap.parse_args(argv[1:])
        print(json.dumps(capture_main(a.src, a.seconds)), flush=True)
        return 0
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100,000 entries, 10 s; iperf3 15 s")
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--iperf-seconds", type=float, default=60)
    ap.add_argument("--big-conns", type=int, default=200_000,
                    help="stall: one conns call with this limit during the load")
    ap.add_argument("--rt-priority", type=int, default=10)
    ap.add_argument("--iperf-interval", type=float, default=0.02,
                    help="advert interval of the iperf3 cases, seconds (default 0.02)")
    ap.add_argument("--runs", type=int, default=1, help="runs of each iperf3 case")
    ap.add_argument("--cases", default="stall,iperf3-rt,iperf3",
                    help="comma-separated: stall, iperf3-rt, iperf3 (default: all three)")
    ap.add_argument("--json", help="write results as JSON here")
    ap.add_argument("--md", help="write a Markdown report here")
    args = ap.parse_args(argv)
    args.cases = args.cases.split(",")
    if os.geteuid() != 0:
        print("python -m bench.loop needs root (network namespaces, BPF)", file=sys.stderr)
        return 2
    r = run(args)
    print(render_rows(r["cases"]))
    if args.json:
        common.write_json(args.json, r)
    if args.md:
        common.write_text(args.md, render_md(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
