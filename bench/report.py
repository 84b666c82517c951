#!/usr/bin/env python3
"""Run every benchmark and write bench/results/REPORT.md with tables and PNG plots.

    python -m bench.report                 # full runs (tens of minutes), results in bench/results/
    python -m bench.report --quick         # every bench in its quick mode
    python -m bench.report --from-results  # only rebuild REPORT.md and plots from the JSON files
    python -m bench.report --only pps throughput

Each bench writes bench/results/<name>.json; the report shows one table per bench,
each against its anchor (XDP_PASS and MAC-swap baselines, the direct path and
HAProxy, keepalived), and plots per-packet cost, throughput and failover outage.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.common import markdown_table

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

BENCHES = ["pps", "throughput", "failover", "sync", "control", "loop", "flood", "tables",
           "scaleout"]
# The options the committed results were made with (their tables are in the .md files):
# without them a full rebuild would drop the parallel new-flow table and the perf profile.
EXTRA_ARGS = {"pps": ["--parallel"], "throughput": ["--profile"]}


def run_bench(name: str, quick: bool) -> bool:
    out = RESULTS / f"{name}.json"
    cmd = [sys.executable, "-m", f"bench.{name}", "--json", str(out),
           "--md", str(RESULTS / f"{name}.md"), *EXTRA_ARGS.get(name, [])]
    if quick:
        cmd.append("--quick")
    print(f"\n### {name}: {' '.join(cmd[1:])}", flush=True)
    t = time.monotonic()
    r = subprocess.run(cmd, cwd=ROOT)
    print(f"### {name}: exit {r.returncode} after {time.monotonic() - t:.0f}s", flush=True)
    return r.returncode == 0


def load(name: str) -> dict | None:
    try:
        return json.loads((RESULTS / f"{name}.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _plt():
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def section_pps(d: dict) -> tuple[str, str | None]:
    cases = d["cases"]
    rows = [[n, f"{c['min_ns']:.0f}", f"{c['median_ns']:.0f}", f"{c['max_ns']:.0f}",
             f"{c['net_ns']:.0f}"] for n, c in cases.items()]
    md = markdown_table(["case", "min ns", "median ns", "max ns", "net of XDP_PASS ns"], rows,
                        right={1, 2, 3, 4})
    plt = _plt()
    names = list(cases)
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.barh(names, [cases[n]["net_ns"] for n in names],
            color=["#999" if n in ("xdp_pass", "xdp_tx_swap") else "#2a7" for n in names])
    ax.set_xlabel("ns per packet, net of XDP_PASS (median of rounds)")
    ax.set_title("XDP per-packet cost (BPF_PROG_TEST_RUN); grey = baselines")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(RESULTS / "pps.png", dpi=110)
    plt.close(fig)
    return md, "pps.png"


def section_throughput(d: dict) -> tuple[str, str | None]:
    paths = list(d["iperf3_gbps"])
    g, r = d["iperf3_gbps"], d["wrk_rps"]
    rows = [[p, f"{g[p]:.2f}", f"{g[p] / g['direct']:.2f}", f"{g[p] / g['haproxy']:.2f}",
             f"{r[p]:.0f}", f"{r[p] / r['direct']:.2f}", f"{r[p] / r['haproxy']:.2f}"]
            for p in paths]
    md = markdown_table(["path", "iperf3 Gbit/s", "x direct", "x HAProxy", "wrk req/s",
                         "x direct", "x HAProxy"], rows, right=set(range(1, 7)))
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, data, label in ((axes[0], g, "iperf3 Gbit/s"), (axes[1], r, "wrk requests/s")):
        ax.bar(paths, [data[p] for p in paths],
               color=["#999" if p in ("direct", "haproxy") else "#2a7" for p in paths])
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle("Throughput through the VIP vs the direct path and HAProxy (grey = anchors)")
    fig.tight_layout()
    fig.savefig(RESULTS / "throughput.png", dpi=110)
    plt.close(fig)
    return md, "throughput.png"


def section_failover(d: dict) -> tuple[str, str | None]:
    cases = d["cases"]
    rows = [[n, f"{c['min_ms']:.0f}", f"{c['median_ms']:.0f}", f"{c['max_ms']:.0f}",
             str(len(c["runs"]) if isinstance(c["runs"], list) else c["runs"])]
            for n, c in cases.items()]
    md = markdown_table(["case", "min ms", "median ms", "max ms", "runs"], rows,
                        right={1, 2, 3, 4})
    plt = _plt()
    names = list(cases)
    med = [cases[n]["median_ms"] for n in names]
    lo = [cases[n]["median_ms"] - cases[n]["min_ms"] for n in names]
    hi = [cases[n]["max_ms"] - cases[n]["median_ms"] for n in names]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.barh(names, med, xerr=[lo, hi], capsize=3,
            color=["#999" if n.startswith("keepalived") else "#2a7" for n in names])
    ax.set_xscale("log")
    ax.set_xlabel("outage seen by a client probing every 10 ms (ms, log scale)")
    ax.set_title("Failover outage: l4lb vs keepalived (grey), min/median/max")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(RESULTS / "failover.png", dpi=110)
    plt.close(fig)
    return md, "failover.png"


def section_sync(d: dict) -> tuple[str, str | None]:
    keys = ["bulk_entries_per_s", "install_entries_per_s", "lag_p50_ms", "lag_p99_ms"]
    aims = {"bulk_entries_per_s": ">= 500,000", "install_entries_per_s": "",
            "lag_p50_ms": "", "lag_p99_ms": "<= 50"}
    rows = [[k, f"{d[k]:,.1f}" if isinstance(d.get(k), (int, float)) else str(d.get(k)),
             aims[k]] for k in keys]
    return markdown_table(["figure", "measured", "aim"], rows, right={1}), None


def section_control(d: dict) -> tuple[str, str | None]:
    rows = [[op, f"{v['min_ms']:.1f}", f"{v['median_ms']:.1f}", f"{v['max_ms']:.1f}", "<= 20 (issue 16)"]
            for op, v in d["ops"].items()]
    md = markdown_table(["operation", "min ms", "median ms", "max ms", "aim"], rows,
                        right={1, 2, 3})
    return md + f"\n\n{d['reals']} reals, ring size {d['ring_size']}.", None


def _own_markdown(name: str) -> tuple[str, str | None]:
    """A bench that writes its own Markdown: its tables, without its title and command
    line (the report prints those from the JSON)."""
    try:
        text = (RESULTS / f"{name}.md").read_text()
    except FileNotFoundError:
        return f"_{name}.md missing: rerun `python -m bench.report --only {name}`._", None
    lines = [ln for ln in text.splitlines() if not ln.startswith(("# ", "Command:"))
             and not (ln.startswith("`") and "bench/" in ln.split("`")[1])]
    while lines and not lines[0].strip():
        lines.pop(0)
    return "\n".join(lines).replace("\n## ", "\n### "), None


def section_loop(d: dict) -> tuple[str, str | None]:
    return _own_markdown("loop")


def section_flood(d: dict) -> tuple[str, str | None]:
    return _own_markdown("flood")


def section_tables(d: dict) -> tuple[str, str | None]:
    return _own_markdown("tables")


def section_scaleout(d: dict) -> tuple[str, str | None]:
    return _own_markdown("scaleout")


TITLES = {"pps": "Per-packet cost of the XDP program",
          "throughput": "End-to-end throughput in the lab",
          "failover": "Failover outage",
          "sync": "Connection-table sync",
          "control": "Control plane: API call to new ring in the maps",
          "loop": "VRRP adverts while the daemon is busy (1M conn entries) and under iperf3",
          "flood": "Spoofed flood through the VIP: held connections and the backup's table",
          "tables": "Conn-table walks off the event loop",
          "scaleout": "Scale-out: ECMP over three nodes announced by FRR"}


def write_report() -> Path:
    parts = ["# l4lb benchmark report", "",
             "Made by `python -m bench.report` (`make bench`); each section names the command that "
             "produced its figures. Timings on this 2-core VM are noisy: compare figures "
             "measured side by side in one run, not across runs.", ""]
    for name in BENCHES:
        d = load(name)
        parts.append(f"## {TITLES[name]}")
        if d is None:
            parts += ["", "_No results yet: run `python -m bench.report --only " + name + "`._", ""]
            continue
        md, png = globals()[f"section_{name}"](d)
        quick = " (quick mode)" if d.get("quick") else ""
        parts += ["", f"Command: `{d.get('command', '?')}`{quick}, {d.get('timestamp', '')}", ""]
        if d.get("method"):
            parts += [f"Method: {d['method']}", ""]
        parts += [md, ""]
        if png:
            parts += [f"![{name}]({png})", ""]
    path = RESULTS / "REPORT.md"
    path.write_text("\n".join(parts))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="every bench in quick mode")
    ap.add_argument("--from-results", action="store_true",
                    help="do not run benches; rebuild the report from bench/results/*.json")
    ap.add_argument("--only", nargs="+", choices=BENCHES, help="run only these benches")
    a = ap.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    failed = []
    if not a.from_results:
        for name in a.only or BENCHES:
            if not run_bench(name, a.quick):
                failed.append(name)
    path = write_report()
    print(f"\nreport: {path.relative_to(ROOT)}")
    if failed:
        print(f"benches that failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
