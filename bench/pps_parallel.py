"""New flows on both CPUs at once: does the conn table's common LRU lock show?
(bench/pps.py --parallel; issue 16, README: Benchmarks.)

Two balancers are compiled side by side, the same but for the conn table's flags:
`common` (one LRU list for all CPUs, the kernel's default) and `percpu`
(BPF_F_NO_COMMON_LRU: a list per CPU, the capacity split between them). Each is
measured with its conn table `room` (filling, no eviction) and `full` (prefilled
beyond capacity from both CPUs, so every new entry evicts one: the steady state of a
balancer whose TCP entries leave only by eviction). Phases, per round and table:

  new_single    one worker on CPU 1 opens fresh TCP flows: SYN, then its ACK, which
                promotes the flow from embryos into conns (the conns insert; a SYN
                alone never touches conns)
  new_parallel  two workers, CPU 0 and CPU 1, each with its own fresh flows, at once
  hit_single / hit_parallel (room only): ACKs of flows those phases established

Reported: the kernel's mean ns per packet (BPF_PROG_TEST_RUN, repeat=1, as in pps.py),
min/median/max over the rounds, and parallel / single. The lock shows when `common`'s
parallel/single is notably above `percpu`'s (both pay what two busy CPUs cost each other
anyway: shared caches, the other processes on this VM).

Workers are forked processes, not threads: with threads the GIL serialises the Python
half of every call (~3 us of ~4 us per call here) and the two CPUs are rarely inside the
program at the same moment. Even forked, a worker spends only part of its wall time
inside the program (the rest is the syscall's setup and Python): that share is reported
as `duty`, so the reader sees how often the two CPUs overlapped.
"""

from __future__ import annotations

import json
import os
import statistics
import struct
import sys
import time

TABLES = ("room", "full")
LISTS = ("common", "percpu")
XDP_TX = 3


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def handshake_frames(pps, series: int, n: int) -> tuple[bytes, bytes, int]:
    """(SYN0 ACK0 SYN1 ACK1 ..., the ACKs alone, frame length) for n fresh IPv4 flows."""
    case = pps.CASE_BY_NAME["dr_v4_new"]
    syn = pps.case_frames(case, n, series, pps.TCP_SYN)
    ack = pps.case_frames(case, n, series, pps.TCP_ACK)
    size = len(syn) // n
    both = b"".join(f[i * size:(i + 1) * size] for i in range(n) for f in (syn, ack))
    return both, ack, size


def prefill_records(count: int, first: int) -> tuple[bytes, bytes]:
    """count packed FlowKey/ConnVal records of flows no phase sends (sources from 10.240.0.0 on,
    to the dr4 VIP): they fill the table so that measured inserts must evict."""
    import numpy as np  # noqa: PLC0415

    keys = np.zeros((count, 40), np.uint8)
    src = (0x0AF00000 + first + np.arange(count, dtype=np.uint64)).astype(np.uint64)
    keys[:, 0:4] = (src[:, None] >> np.array([24, 16, 8, 0], np.uint64) & 0xFF).astype(np.uint8)
    keys[:, 16:20] = np.frombuffer(bytes([10, 200, 0, 100]), np.uint8)
    keys[:, 32:36] = np.frombuffer(struct.pack("!HH", 40000, 80), np.uint8)
    keys[:, 36], keys[:, 37] = 6, 4
    vals = np.zeros((count, 16), np.uint8)
    vals[:, 0], vals[:, 4] = 1, 0   # real id 1, VIP id 0 (never looked up: never sent)
    return keys.tobytes(), vals.tobytes()


class Worker:
    """A forked process pinned to one CPU that runs named phases on command. Runners
    (frames, prog fds) are built before the fork and inherited."""

    def __init__(self, cpu: int, runners: dict, siblings: list[Worker] = ()):
        self.cpu = cpu
        cmd_r, self.cmd_w = os.pipe()
        self.res_r, res_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # child: never returns
            os.close(self.cmd_w)
            os.close(self.res_r)
            for w in siblings:  # or a sibling never sees EOF on its command pipe
                os.close(w.cmd_w)
                os.close(w.res_r)
            code = 0
            try:
                os.sched_setaffinity(0, {cpu})
                with os.fdopen(cmd_r, "r") as cmds, os.fdopen(res_w, "w") as out:
                    for line in cmds:
                        name, calls = line.split()
                        r = runners[name]
                        t0 = time.perf_counter_ns()
                        total = r.run_total(int(calls), XDP_TX)
                        wall = time.perf_counter_ns() - t0
                        out.write(json.dumps({"ns": total, "wall_ns": wall}) + "\n")
                        out.flush()
            except BaseException as e:  # noqa: BLE001 - reported to the parent, then exit
                try:
                    os.write(2, f"parallel worker on CPU {cpu}: {e}\n".encode())
                finally:
                    code = 1
            os._exit(code)
        os.close(cmd_r)
        os.close(res_w)
        self.res = os.fdopen(self.res_r, "r")

    def start(self, name: str, calls: int) -> None:
        os.write(self.cmd_w, f"{name} {calls}\n".encode())

    def result(self) -> dict:
        line = self.res.readline()
        if not line:
            raise RuntimeError(f"parallel worker on CPU {self.cpu} died")
        return json.loads(line)

    def stop(self) -> None:
        os.close(self.cmd_w)
        self.res.close()
        os.waitpid(self.pid, 0)


def run(args, pps) -> dict:
    """The experiment; returns the JSON section (pps.py adds it to its report)."""
    from l4lb.dataplane import loader, tables  # noqa: PLC0415

    if (os.cpu_count() or 1) < 2:
        raise pps.BenchError("--parallel needs two CPUs")
    flows = args.parallel_flows
    rounds = args.rounds
    size = args.parallel_table
    load_before = load_average()
    t_start = time.monotonic()
    os.sched_setaffinity(0, {0, 1})
    progs, sts = {}, {}
    for lst in LISTS:
        for tab in TABLES:
            opts = loader.BuildOptions(conn_table_size=size, per_cpu_lru=lst == "percpu")
            p = loader.compile_balancer(opts)
            st = tables.ServiceTables(p, opts)
            st.set_config(tun_src4=pps.TUN_SRC4, tun_src6=pps.TUN_SRC6, flow_events=False,
                          conn_timeout_s=pps.CONN_TIMEOUT_S)
            st.conns.clear()
            for addr, port, mode, rfam in pps.VIPS.values():
                vs = st.upsert_vip(addr, port, "tcp", mode=mode)
                st.set_reals(vs.key, pps.real_list(rfam))
            loader.set_flow_guard(p.map("flow_guard_cfg"), 0xFFFFFFFF)
            st.set_own_macs({1: pps.LB_MAC.hex(":")})
            progs[lst, tab], sts[lst, tab] = p, st
    try:
        # Full tables: prefilled from each CPU in turn (a per-CPU list takes the entries
        # its CPU inserts), 5% beyond capacity, so every list is at its limit.
        fill = {}
        per_cpu = size * 105 // 200
        for lst in LISTS:
            st = sts[lst, "full"]
            for cpu in (0, 1):
                os.sched_setaffinity(0, {cpu})
                keys, vals = prefill_records(per_cpu, cpu * per_cpu)
                for off in range(0, per_cpu, 65536):
                    n = min(65536, per_cpu - off)
                    st.install_conns(keys[off * 40:(off + n) * 40], vals[off * 16:(off + n) * 16])
            os.sched_setaffinity(0, {0, 1})
            fill[lst] = st.conn_count()

        # Frames: a series per (list, table, round, phase, worker), all distinct flows.
        runners, plan = {}, []
        series = 0
        for rnd in range(rounds):
            for lst in LISTS:
                for tab in TABLES:
                    p = progs[lst, tab]
                    for mode, cpus in (("single", (1,)), ("parallel", (0, 1))):
                        names = []
                        for cpu in cpus:
                            both, acks, flen = handshake_frames(pps, series, flows)
                            series += 1
                            tag = f"{lst}/{tab}/{rnd}/{mode}/{cpu}"
                            runners["new/" + tag] = pps.Runner(p.fd, both, flen, cyclic=False)
                            runners["hit/" + tag] = pps.Runner(p.fd, acks, flen, cyclic=True)
                            names.append(tag)
                        plan.append((rnd, lst, tab, mode, names))
        print(f"parallel: set up in {time.monotonic() - t_start:.0f} s (prefilled {fill})",
              file=sys.stderr)
        workers: dict[int, Worker] = {}
        for cpu in (0, 1):
            workers[cpu] = Worker(cpu, runners, list(workers.values()))
        try:
            per_pkt: dict[str, list[float]] = {}
            duty: dict[str, list[float]] = {}
            for rnd in range(rounds):
                # Rotate the order of (list, table) so drift falls on all alike.
                steps = [s for s in plan if s[0] == rnd]
                k = rnd % len(steps)
                for _, lst, tab, mode, names in steps[k:] + steps[:k]:
                    phases = [("new", 2 * flows)] + ([("hit", flows)] if tab == "room" else [])
                    for kind, calls in phases:
                        st = sts[lst, tab]
                        before = st.global_counters()
                        for tag in names:
                            workers[int(tag.rsplit("/", 1)[1])].start(f"{kind}/{tag}", calls)
                        res = [workers[int(tag.rsplit("/", 1)[1])].result() for tag in names]
                        check_counters(pps, kind, tab, before, st.global_counters(),
                                       flows * len(names))
                        key = f"{lst}/{tab}/{kind}_{mode}"
                        per_pkt.setdefault(key, []).append(
                            statistics.mean(r["ns"] for r in res) / calls)
                        duty.setdefault(key, []).append(
                            statistics.mean(r["ns"] / r["wall_ns"] for r in res))
        finally:
            for w in workers.values():
                w.stop()
    finally:
        for p in progs.values():
            p.close()
    return summarize(per_pkt, duty, {
        "flows_per_worker_and_phase": flows, "rounds": rounds, "conn_table_size": size,
        "prefilled_entries": fill, "load_average_before": load_before,
        "load_average_after": load_average(),
        "seconds": round(time.monotonic() - t_start, 1)})


def check_counters(pps, kind: str, tab: str, before: dict, after: dict, flows: int) -> None:
    """Every SYN made a new flow and every ACK promoted it (no guard, no lost embryo);
    hits (room table) all hit."""
    d = pps.counter_deltas(before, after)
    if kind == "new":
        want = {"conn_promoted": flows, "conn_miss": flows}
        got = {k: d.get(k, 0) for k in want}
        bad = {k: d[k] for k in ("conn_guard_limited", "conn_miss_non_syn") if d.get(k)}
    else:
        want, got = {"conn_hit": flows}, {"conn_hit": d.get("conn_hit", 0)}
        bad = {k: d[k] for k in ("conn_miss", "conn_miss_non_syn") if d.get(k)}
    if got != want or bad:
        raise pps.BenchError(f"parallel {kind} ({tab} table): counters {got} {bad}, "
                             f"expected {want}")


def summarize(per_pkt: dict, duty: dict, extra: dict) -> dict:
    cases = {}
    for key, v in per_pkt.items():
        cases[key] = {"min_ns": round(min(v), 1), "median_ns": round(statistics.median(v), 1),
                      "max_ns": round(max(v), 1),
                      "duty": round(statistics.median(duty[key]), 2)}
    ratios = {}
    for lst in LISTS:
        for tab in TABLES:
            for kind in ("new", "hit"):
                s, p = cases.get(f"{lst}/{tab}/{kind}_single"), cases.get(
                    f"{lst}/{tab}/{kind}_parallel")
                if s and p:
                    ratios[f"{lst}/{tab}/{kind}"] = round(p["median_ns"] / s["median_ns"], 3)
    return {"cases": cases, "parallel_over_single": ratios, **extra}


HEADERS = ["conn table", "packets", "single ns (min-max)", "parallel ns (min-max)",
           "parallel / single", "duty single / parallel"]


def table_rows(section: dict) -> list[list[str]]:
    rows = []
    c = section["cases"]
    for tab in TABLES:
        for kind in ("new", "hit"):
            for lst in LISTS:
                s, p = c.get(f"{lst}/{tab}/{kind}_single"), c.get(f"{lst}/{tab}/{kind}_parallel")
                if not (s and p):
                    continue
                what = ("SYN + promoting ACK" if kind == "new" else "ACK, established")
                rows.append([f"{lst} LRU, {tab}", what,
                             f"{s['median_ns']:.0f} ({s['min_ns']:.0f}-{s['max_ns']:.0f})",
                             f"{p['median_ns']:.0f} ({p['min_ns']:.0f}-{p['max_ns']:.0f})",
                             f"{section['parallel_over_single'][f'{lst}/{tab}/{kind}']:.2f}",
                             f"{s['duty']:.2f} / {p['duty']:.2f}"])
    return rows


def notes(section: dict) -> list[str]:
    return [f"parallel: {section['rounds']} rounds, {section['flows_per_worker_and_phase']} fresh "
            f"flows per worker and phase (2 packets each), conn table "
            f"{section['conn_table_size']} entries, full tables prefilled to "
            f"{section['prefilled_entries']} entries; workers are forked processes pinned to "
            f"CPU 0 and CPU 1 (single: CPU 1 alone); duty = the workers' share of wall time "
            f"spent inside the program; load average before/after "
            f"{section['load_average_before']} / {section['load_average_after']}"]
