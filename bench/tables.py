"""Conn-table walks of the control plane on a big table (issue 11): how long they take
and what they cost the event loop.

Cases:
  walk    BPF only (no lab): a program with a 2^21 conn table holding N entries
          (1,000,000; --quick 100,000). Times conn_entries(limit=1), a filtered
          limit=20, a full conn_entries() in a thread while an asyncio task measures
          its wake-up lag (5 ms sleeps), referenced_real_ids, conn_count and the
          metrics census. Each walk reads WALK_BATCH entries per bpf(2) call.
  daemon  `l4lb start` in the lab with N entries in its pinned conn table: the API's
          `conns --limit 1` (as the CLI calls it), and `status` answered while a
          `conns` of the whole table runs.

    .venv/bin/python -m bench.tables --json bench/results/tables.json --md bench/results/tables.md
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import threading
import time

from bench import common


def _ms(s: float) -> float:
    return round(s * 1e3, 2)


def _fill(st, n: int) -> None:
    """n TCP flows to four VIPs, seven real ids in turn (packed records, batch updates)."""
    import numpy as np  # noqa: PLC0415

    from l4lb.dataplane import maps as M  # noqa: PLC0415
    from l4lb.dataplane.tables import CONN_VAL_DTYPE, FLOW_KEY_DTYPE  # noqa: PLC0415

    vips = np.array([M.addr16(f"10.99.0.{100 + i}")[0] for i in range(4)], dtype="V16")
    step = 1 << 16
    for lo in range(0, n, step):
        i = np.arange(lo, min(n, lo + step), dtype=np.uint32)
        k = np.zeros(len(i), FLOW_KEY_DTYPE)
        src = np.zeros((len(i), 16), np.uint8)
        src[:, 0], src[:, 1], src[:, 2], src[:, 3] = 10, (i >> 16) & 255, (i >> 8) & 255, i & 255
        k["src"] = src.view("V16").ravel()
        both = np.frombuffer(vips[i % 4].tobytes(), "<u8").reshape(len(i), 2)
        k["dst_hi"], k["dst_lo"] = both[:, 0], both[:, 1]
        k["sport"], k["dport"], k["proto"], k["family"] = 1024 + i % 60000, 80, 6, 4
        v = np.zeros(len(i), CONN_VAL_DTYPE)
        v["real_id"] = 1 + i % 7
        st.install_conns(k.tobytes(), v.tobytes())


async def _walk_with_lag(fn):
    """Run fn in a thread while a task sleeps 5 ms at a time; (result, s, lags)."""
    loop = asyncio.get_running_loop()
    lags, done = [], asyncio.Event()

    async def ticker():
        while not done.is_set():
            t0 = loop.time()
            await asyncio.sleep(0.005)
            lags.append(loop.time() - t0 - 0.005)

    tick = asyncio.create_task(ticker())
    t0 = time.perf_counter()
    res = await asyncio.to_thread(fn)
    dt = time.perf_counter() - t0
    done.set()
    await tick
    return res, dt, lags


def case_walk(n: int) -> dict:
    from l4lb import metrics  # noqa: PLC0415
    from l4lb.dataplane import loader, tables  # noqa: PLC0415

    opts = loader.BuildOptions(max_vips=16, max_reals=256, ring_max=4099,
                               conn_table_size=1 << 21)
    prog = loader.compile_balancer(opts)
    try:
        st = tables.ServiceTables(prog, opts)
        t0 = time.perf_counter()
        _fill(st, n)
        fill_s = time.perf_counter() - t0
        entries = st.conn_count()
        r = {"case": "walk", "entries": entries, "walk_batch": tables.WALK_BATCH,
             "fill_s": round(fill_s, 2)}
        times, stats = [], {}
        for _ in range(5):
            t0 = time.perf_counter()
            st.conn_entries(limit=1, stats=stats)
            times.append(time.perf_counter() - t0)
        r["limit1_ms"] = _ms(statistics.median(times))
        r["limit1_slices"] = stats["slices"]
        t0 = time.perf_counter()
        st.conn_entries(limit=20, want=("10.99.0.103", 80, "tcp"), stats=stats)
        r["vip_limit20_ms"] = _ms(time.perf_counter() - t0)
        r["vip_limit20_slices"] = stats["slices"]
        for name, fn in (("full", lambda: st.conn_entries(stats=stats)),
                         ("referenced", st.referenced_real_ids), ("count", st.conn_count),
                         ("census", lambda: metrics.conn_census(st))):
            _, dt, lags = asyncio.run(_walk_with_lag(fn))
            r[f"{name}_s"] = round(dt, 3)
            r[f"{name}_entries_per_s"] = round(entries / dt)
            r[f"{name}_lag_max_ms"] = _ms(max(lags))
            r[f"{name}_lag_p99_ms"] = _ms(sorted(lags)[int(0.99 * (len(lags) - 1))])
        r["full_slices"] = stats["slices"]
        return r
    finally:
        tables._empty_map(prog.map("conns"))
        prog.close()


def case_daemon(n: int) -> dict:
    from bench import loop as B  # noqa: PLC0415
    from l4lb import api  # noqa: PLC0415
    from l4lb.lab import Lab  # noqa: PLC0415

    with Lab("btab", clients=1, balancers=1, reals=1) as lab:
        cfg = lab.balancer_config("lb1", [{"address": B.VIP, "port": B.VPORT, "mode": "dr",
                                           "real": [{"address": lab.node("real1").ipv4}]}])
        cfg["node"]["conn_table_size"] = max(1 << 21, 2 * n)
        lab.start_l4lb("lb1", cfg)
        B.fill_conns(lab, "lb1", n)
        sock = lab.api_socket("lb1")
        r = {"case": "daemon", "entries": n}
        for name, args in (("conns_limit1", {"limit": 1}),
                           ("conns_vip_limit1", {"limit": 1, "vip": B.VIP_KEY})):
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                rows = api.request(sock, "conns", timeout=120, **args)
                times.append(time.perf_counter() - t0)
                assert len(rows) == 1, rows
            r[f"{name}_ms"] = _ms(statistics.median(times))
            r[f"{name}_max_ms"] = _ms(max(times))
        # status while one client reads the whole table
        big: dict = {}

        def whole():
            t0 = time.perf_counter()
            big["rows"] = len(api.request(sock, "conns", timeout=600, limit=n))
            big["s"] = time.perf_counter() - t0

        th = threading.Thread(target=whole)
        th.start()
        lat = []
        while th.is_alive():
            t0 = time.perf_counter()
            api.request(sock, "status", timeout=60)
            lat.append(time.perf_counter() - t0)
            time.sleep(0.02)
        th.join()
        r["conns_whole_rows"], r["conns_whole_s"] = big.get("rows"), round(big.get("s", 0), 2)
        r["status_during_whole_max_ms"] = _ms(max(lat)) if lat else None
        r["status_during_whole_median_ms"] = _ms(statistics.median(lat)) if lat else None
        r["status_calls"] = len(lat)
        return r


HEADERS = ["case", "entries", "what", "value"]


def rows(cases: list[dict]) -> list[list]:
    out = []
    for c in cases:
        for k, v in c.items():
            if k not in ("case", "entries"):
                out.append([c["case"], c["entries"], k, v])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100,000 entries")
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--cases", default="walk,daemon", help="comma-separated: walk, daemon")
    ap.add_argument("--json", help="write results as JSON here")
    ap.add_argument("--md", help="write a Markdown report here")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("python -m bench.tables needs root (BPF, network namespaces)", file=sys.stderr)
        return 2
    n = 100_000 if args.quick else args.entries
    cases = []
    for c in args.cases.split(","):
        cases.append({"walk": case_walk, "daemon": case_daemon}[c](n))
    r = dict(common.run_meta(args.quick), cases=cases)
    print(common.text_table(HEADERS, rows(cases)))
    if args.json:
        common.write_json(args.json, r)
    if args.md:
        common.write_text(args.md, f"# Conn-table walks\n\n`{r['command']}` (kernel "
                          f"{r['kernel']}, {r['timestamp']})\n\n"
                          + common.markdown_table(HEADERS, rows(cases)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
