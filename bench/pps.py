#!/usr/bin/env python3
"""Per-packet cost of the XDP balancer by BPF_PROG_TEST_RUN (README: Benchmarks).

Method, the way Katran's perf mode does it: many BPF_PROG_TEST_RUN calls with
repeat=1 each (repeat>1 would re-run the program on the packet it has already
rewritten: a tunnelled packet would grow again, a new flow would become an
established one), and the kernel's `duration` of each call averaged over the
round. The kernel times one call with two ktime_get_ns() reads, so a repeat=1
duration is quantised (about 10 ns steps on this VM) and carries a fixed timer
overhead; averaging many calls per round resolves well below the step, and the
overhead cancels in net = case - xdp_pass, because the baselines are measured
the same way in the same run, interleaved with the balancer cases.

Rounds: every case runs `calls` calls per round, 5 rounds; within a round the
cases take turns in chunks of 1000 calls (the order rotating), so that noise
from the rest of the machine falls on all cases alike; reported are
min/median/max of the per-round means and net = median - median(xdp_pass).
Every call counts; calls over 20 us (interrupted by a tick or the host) are
kept in the mean and only counted, as `long_calls` in the JSON.

Cross-check: for the cases where re-running the output is the same case
(xdp_pass, xdp_tx_swap and non_vip; not DR established: its output carries the
real's MAC, which the balancer no longer takes for its own), the same figures
with one call of repeat=N are printed beside; they are free of the per-call
timer overhead.

Run as root from the repository root:
    .venv/bin/python -m bench.pps --json bench/results/pps.json --md bench/results/pps.md
"""

from __future__ import annotations

import argparse
import ctypes as ct
import dataclasses
import hashlib
import ipaddress
import os
import statistics
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench import common
from l4lb.vrrp.packet import inet_checksum  # RFC 1071, one copy

ROOT = Path(__file__).resolve().parent.parent

XDP_PASS, XDP_TX = 2, 3
LB_MAC = bytes.fromhex("029900001415")
CLIENT_MAC = bytes.fromhex("029900000a0b")
PAYLOAD = bytes(10)            # 14 + 20 + 20 + 10 = 64-byte IPv4 frame; IPv6: 84 bytes
TCP_SYN, TCP_ACK = 0x02, 0x10
PORTS_PER_SRC = 60000          # flow i: source address base + i // 60000, port 1024 + i % 60000

N_REALS = 8
#: name -> (VIP address, port, forwarding mode, real family)
VIPS = {
    "dr4": ("10.200.0.100", 80, "dr", 4),
    "tun4": ("10.200.0.101", 443, "tun", 4),
    "dr6": ("fd00:200::100", 80, "dr", 6),
    "tun6": ("fd00:200::101", 443, "tun", 6),
}
NON_VIP_DST = "10.200.0.50"
TUN_SRC4, TUN_SRC6 = "10.200.0.2", "fd00:200::2"
CONN_TIMEOUT_S = 300           # the config default: the timeout check runs as in production

DEFAULT_CALLS, QUICK_CALLS = 20000, 5000
DEFAULT_ROUNDS = 5
DEFAULT_MANY_FLOWS = 100000
DEFAULT_CHUNK = 1000
CROSS_CHECK_REPEAT = 100000
LONG_CALL_NS = 20000           # a call this long was interrupted (tick, host): counted, kept


@dataclass(frozen=True)
class Case:
    name: str
    prog: str              # pass | swap | lb
    vip: str | None        # key of VIPS (None: baselines and non_vip)
    flows: str             # one | many | new
    verdict: int
    same_on_rerun: bool    # re-running the program's output is the same case (repeat=N is valid)
    what: str


CASES = [
    Case("xdp_pass", "pass", None, "one", XDP_PASS, True, "baseline: return XDP_PASS"),
    Case("xdp_tx_swap", "swap", None, "one", XDP_TX, True, "baseline: swap MACs, XDP_TX"),
    Case("dr_v4_established", "lb", "dr4", "one", XDP_TX, False, "one established flow"),
    Case("dr_v4_established_many", "lb", "dr4", "many", XDP_TX, False,
         "hits cycling over many established flows"),
    Case("dr_v4_new", "lb", "dr4", "new", XDP_TX, False, "a fresh 5-tuple every call"),
    Case("tun_v4_established", "lb", "tun4", "one", XDP_TX, False, "IPIP, one established flow"),
    Case("tun_v4_new", "lb", "tun4", "new", XDP_TX, False, "IPIP, a fresh 5-tuple every call"),
    Case("dr_v6_established", "lb", "dr6", "one", XDP_TX, False, "one established flow"),
    Case("tun_v6_established", "lb", "tun6", "one", XDP_TX, False, "IP6IP6, one established flow"),
    Case("dr_v6_new", "lb", "dr6", "new", XDP_TX, False, "a fresh 5-tuple every call"),
    Case("non_vip", "lb", None, "one", XDP_PASS, True, "IPv4 TCP to an address that is no VIP"),
    Case("dr_v4_established_1m", "lb", "dr4", "many1m", XDP_TX, False,
         "hits cycling over 1,000,000 established flows (cache-cold)"),
    # Floors (bpf/floors.c): fixed programs, never tuned with the balancer.
    Case("floor_parse", "floor_parse", None, "one", XDP_PASS, True,
         "floor: parse Eth/IPv4/TCP into a 40-byte key"),
    Case("floor_dr", "floor_dr", None, "one", XDP_TX, False,
         "floor: parse + LRU lookup + MAC rewrite"),
    Case("floor_tun", "floor_tun", None, "one", XDP_TX, False, "floor: floor_dr + IPIP push"),
    Case("floor_new", "floor_new", None, "new", XDP_TX, False,
         "floor: parse + LRU insert of a fresh key"),
    Case("floor_dr_1m", "floor_dr", None, "many1m", XDP_TX, False,
         "floor_dr cycling over 1,000,000 flows in its table"),
]
FLOOR_PROGS = ("floor_parse", "floor_dr", "floor_tun", "floor_new")
#: case -> (its floor, the issue's aim for net(case) / net(floor)); IPv6 cases are set
#: against the IPv4 floor (the floors parse IPv4 only), and say so in the table.
FLOOR_OF = {
    "dr_v4_established": ("floor_dr", 1.15), "dr_v6_established": ("floor_dr", 1.15),
    "tun_v4_established": ("floor_tun", 1.15), "tun_v6_established": ("floor_tun", 1.15),
    "dr_v4_new": ("floor_new", 1.1), "tun_v4_new": ("floor_new", 1.1),
    "dr_v6_new": ("floor_new", 1.1), "non_vip": ("floor_parse", 1.2),
    "dr_v4_established_1m": ("floor_dr_1m", 1.2),
}
DEFAULT_FLOWS_1M = 1_000_000
CASE_BY_NAME = {c.name: c for c in CASES}

#: The issue's targets for net ns (printed beside the figures, never asserted).
TARGETS = {
    "dr_v4_established": 75, "dr_v4_established_many": 75, "dr_v6_established": 75,
    "tun_v4_established": 110, "tun_v6_established": 110,
    "dr_v4_new": 650, "tun_v4_new": 650, "dr_v6_new": 650,
    "non_vip": 30,
}
#: Katran measured on this machine with this method (net ns; Katran forwards by IPIP only).
KATRAN = {"tun_v4_established": "186", "tun_v4_new": "~780", "non_vip": "58"}


class BenchError(Exception):
    pass


# --------------------------------------------------------------------------- statistics
def summarize(means: list[float]) -> dict[str, float]:
    """min/median/max of the per-round means, in ns, rounded to 0.1 ns."""
    if not means:
        raise ValueError("no rounds")
    return {"min_ns": round(min(means), 1), "median_ns": round(statistics.median(means), 1),
            "max_ns": round(max(means), 1)}


def add_net(cases: dict[str, dict], baseline: str = "xdp_pass") -> dict[str, dict]:
    """net_ns = the case's median - the baseline's median (the baseline's own net is 0)."""
    base = cases[baseline]["median_ns"]
    for v in cases.values():
        v["net_ns"] = round(v["median_ns"] - base, 1)
    return cases


def resolution_ns(durations: list[int]) -> int:
    """The step in which single-call durations come: distinct values are grouped when
    within 2 ns of each other (clock rounding gives e.g. 130 and 131), and the answer is
    the most common distance between neighbouring groups (1 if there is no coarser grid)."""
    vals = sorted(set(durations))
    if len(vals) < 2:
        return 0
    starts = [vals[0]]
    for prev, v in zip(vals, vals[1:], strict=False):
        if v - prev > 2:
            starts.append(v)
    if len(starts) < 2:
        return 1
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    return statistics.mode(gaps)


def target_cell(name: str, net: float) -> str:
    t = TARGETS.get(name)
    if t is None:
        return ""
    return f"<= {t} ({'ok' if net <= t else 'over'})"


# --------------------------------------------------------------------------- packets

def tcp_frame(src: bytes, dst: bytes, sport: int, dport: int, flags: int = TCP_ACK,
              payload: bytes = PAYLOAD, smac: bytes = CLIENT_MAC, dmac: bytes = LB_MAC) -> bytes:
    """Ethernet + IPv4/IPv6 + TCP (no options) + payload, checksums filled in.
    `src` and `dst` are packed addresses (4 or 16 bytes)."""
    tcp_len = 20 + len(payload)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 1 if flags & TCP_ACK else 0, 5 << 4,
                      flags, 64240, 0, 0) + payload
    if len(src) == 4:
        pseudo = src + dst + struct.pack("!BBH", 0, 6, tcp_len)
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + tcp_len, 0, 0x4000, 64, 6, 0, src, dst)
        ip = ip[:10] + struct.pack("!H", inet_checksum(ip)) + ip[12:]
        ethertype = 0x0800
    else:
        pseudo = src + dst + struct.pack("!IxxxB", tcp_len, 6)
        ip = struct.pack("!IHBB16s16s", 6 << 28, tcp_len, 6, 64, src, dst)
        ethertype = 0x86DD
    tcp = tcp[:16] + struct.pack("!H", inet_checksum(pseudo + tcp)) + tcp[18:]
    return dmac + smac + struct.pack("!H", ethertype) + ip + tcp


def flow_src(base: str, i: int) -> tuple[bytes, int]:
    """Flow i of a series: (packed source address, source port); all distinct."""
    a = ipaddress.ip_address(base)
    return (a + i // PORTS_PER_SRC).packed, 1024 + i % PORTS_PER_SRC


def flow_frames(src_base: str, dst: str, dport: int, count: int, flags: int) -> bytes:
    """`count` frames of distinct flows to dst:dport, concatenated (all the same length):
    frame i is tcp_frame(*flow_src(src_base, i), ...). Built from one template with numpy
    (a million frames in about a second): only the source address's last 32 bits, the
    source port and the checksums vary, and the checksums are patched by RFC 1624."""
    import numpy as np  # noqa: PLC0415 - the pure helpers stay import-light

    d = ipaddress.ip_address(dst).packed
    base = ipaddress.ip_address(src_base)
    if int(base) % (1 << 32) + (count - 1) // PORTS_PER_SRC >= 1 << 32:
        raise ValueError("too many flows for one source series")
    zero_src = base.packed[:-4] + bytes(4)
    t = np.frombuffer(tcp_frame(zero_src, d, 0, dport, flags), dtype=np.uint8)
    flen = len(t)
    l3 = 14
    ip_end = l3 + (20 if len(d) == 4 else 40)
    src_off = l3 + (12 if len(d) == 4 else 8) + len(d) - 4    # the source's last 4 bytes
    i = np.arange(count, dtype=np.uint64)
    low = (int(base) % (1 << 32) + i // PORTS_PER_SRC).astype(np.uint64)
    sport = (1024 + i % PORTS_PER_SRC).astype(np.uint64)
    out = np.tile(t, count).reshape(count, flen)
    out[:, src_off:src_off + 4] = (low[:, None] >> np.array([24, 16, 8, 0], np.uint64)
                                   & 0xFF).astype(np.uint8)
    out[:, ip_end:ip_end + 2] = np.stack([sport >> 8, sport & 0xFF], 1).astype(np.uint8)
    # Each checksum in the template covers the zero source and port; add the new words
    # (one's complement sums: ~new = ~old + added words, RFC 1624 with old words 0).
    added = (low >> 16) + (low & 0xFFFF)

    def patch(off: int, extra):
        old = (int(t[off]) << 8) | int(t[off + 1])
        total = (~old & 0xFFFF) + extra
        total = (total & 0xFFFF) + (total >> 16)
        total = (total & 0xFFFF) + (total >> 16)
        new = ~total & 0xFFFF
        out[:, off] = (new >> 8).astype(np.uint8)
        out[:, off + 1] = (new & 0xFF).astype(np.uint8)

    if len(d) == 4:
        patch(l3 + 10, added)                     # IPv4 header checksum
    patch(ip_end + 16, added + sport)             # TCP checksum (pseudo header + port)
    return out.tobytes()


def client_base(family: int, series: int) -> str:
    """Client source addresses of one flow series (series keep the cases' flows apart)."""
    if not 0 <= series < 250:
        raise ValueError("series must be in 0..249")
    return f"10.{series + 1}.0.1" if family == 4 else f"fd00:{series + 1:x}::1"


def real_list(family: int) -> list[tuple[str, str, int]]:
    return [(f"10.200.1.{i + 1}" if family == 4 else f"fd00:200:1::{i + 1:x}",
             f"02:99:00:01:00:{i + 1:02x}", 100) for i in range(N_REALS)]


def case_frames(case: Case, count: int, series: int, flags: int | None = None) -> bytes:
    if case.vip is None:
        dst, dport, family = ("10.200.0.99" if case.prog != "lb" else NON_VIP_DST), 80, 4
    else:
        addr, dport, _, _ = VIPS[case.vip]
        dst, family = addr, ipaddress.ip_address(addr).version
    if flags is None:
        flags = TCP_SYN if case.flows == "new" else TCP_ACK
    n = 1 if case.flows == "one" else count
    return flow_frames(client_base(family, series), dst, dport, n, flags)


# --------------------------------------------------------------------------- report
def build_report(cases: dict[str, dict], method: str, meta: dict, extra: dict | None = None
                 ) -> dict:
    """The JSON document: cases (with net), method, kernel, command, quick, timestamp, and
    whatever else the run knows (extra)."""
    add_net(cases)
    doc = {"cases": cases, "floor_ratios": floor_ratios(cases), "method": method}
    doc.update({k: meta[k] for k in ("kernel", "command", "quick", "timestamp")})
    if extra:
        doc.update(extra)
    return doc


HEADERS = ["case", "min ns", "median ns", "max ns", "net ns", "target net", "floor",
           "x floor (aim)", "Katran net"]


def floor_ratios(cases: dict[str, dict]) -> dict[str, dict]:
    """net(case) / net(its floor) for every case whose floor ran in the same run; a floor
    whose net is not above 0.5 ns gives no ratio (None): it would only say noise."""
    out = {}
    for name in cases:
        floor, aim = FLOOR_OF.get(name.split("@")[0], (None, None))
        if floor not in cases:
            continue
        fnet = cases[floor]["net_ns"]
        ratio = round(cases[name]["net_ns"] / fnet, 2) if fnet > 0.5 else None
        out[name] = {"floor": floor, "ratio": ratio, "aim": aim,
                     "met": ratio is not None and ratio <= aim}
    return out


def floor_cell(r: dict | None) -> str:
    if not r:
        return ""
    if r["ratio"] is None:
        return f"n/a (<= {r['aim']})"
    return f"{r['ratio']:.2f} (<= {r['aim']}, {'ok' if r['met'] else 'over'})"


def table_rows(report: dict) -> list[list[str]]:
    rows = []
    ratios = report.get("floor_ratios") or floor_ratios(report["cases"])
    for name, v in report["cases"].items():
        r = ratios.get(name)
        floor = (r["floor"] + (" (v4)" if "_v6_" in name else "")) if r else ""
        rows.append([name, f"{v['min_ns']:.1f}", f"{v['median_ns']:.1f}", f"{v['max_ns']:.1f}",
                     f"{v['net_ns']:.1f}", target_cell(name, v["net_ns"]), floor,
                     floor_cell(r), KATRAN.get(name, "")])
    return rows


def cross_rows(report: dict) -> list[list[str]]:
    cc = report.get("cross_check_repeat") or {}
    rows = []
    for name, v in cc.get("cases", {}).items():
        main = report["cases"].get(name, {})
        rows.append([name, f"{v['median_ns']:.1f}", f"{v['net_ns']:.1f}",
                     f"{main.get('net_ns', float('nan')):.1f}"])
    return rows


CROSS_HEADERS = ["case", "repeat=N median ns", "repeat=N net ns", "repeat=1 net ns"]


def notes(report: dict) -> list[str]:
    out = [f"method: {report['method']}"]
    if "resolution_ns" in report:
        out.append(f"single-call duration resolution: {report['resolution_ns']} ns steps; "
                   f"per-call timer overhead (xdp_pass repeat=1 minus repeat=N): "
                   f"{report.get('per_call_overhead_ns', float('nan')):.1f} ns, "
                   "in every figure, cancelled by net")
    if "setup" in report:
        s = report["setup"]
        out.append(f"setup: {s['vips']} VIPs x {s['reals_per_vip']} reals, ring {s['ring_size']}, "
                   f"conn table {s['conn_table_size']} ({'per-CPU' if s['per_cpu_lru'] else 'common'}"
                   f" LRU), conn timeout {s['conn_timeout_s']} s, flow events off; frames "
                   f"{s['frame_bytes_v4']} B (IPv4) / {s['frame_bytes_v6']} B (IPv6); "
                   f"{s['many_flows']} flows in _many, {s.get('flows_1m', '-')} in _1m (floor "
                   f"table {s.get('floor_table_size')}); pinned to CPU {s['cpu']}")
    if "machine_load" in report:
        m = report["machine_load"]
        out.append(f"rest of the machine while measuring: {m['other_cpus_busy']:.2f} CPUs busy "
                   f"with other processes, {m['steal_cpus']:.2f} CPUs stolen by the host "
                   f"(of {report.get('setup', {}).get('cpus', '?')}); calls over 20 us "
                   f"(interrupted, kept): {sum(report.get('long_calls', {}).values())}")
    out.append(f"kernel {report['kernel']}, {report['timestamp']}"
               + (", --quick" if report["quick"] else ""))
    return out


def render_text(report: dict) -> str:
    parts = [common.text_table(HEADERS, table_rows(report), right={1, 2, 3, 4})]
    if cross_rows(report):
        parts.append("cross-check, one call of repeat=N (only where re-running the output is "
                     "the same case):\n" + common.text_table(CROSS_HEADERS, cross_rows(report)))
    if "parallel" in report:
        from bench import pps_parallel as pp  # noqa: PLC0415
        parts.insert(1, "new flows on both CPUs at once (--parallel):\n" + common.text_table(
            pp.HEADERS, pp.table_rows(report["parallel"]), right={2, 3, 4, 5}))
    parts += notes(report)
    if "parallel" in report:
        parts += pp.notes(report["parallel"])
    head = 3 if "parallel" in report else 2
    return "\n\n".join(parts[:head]) + "\n\n" + "\n".join(parts[head:])


def render_markdown(report: dict) -> str:
    lines = ["# XDP per-packet cost (BPF_PROG_TEST_RUN)", "",
             f"Command (repository root, as root): `{report['command']}`", "",
             f"Kernel {report['kernel']}, {report['timestamp']}"
             + (" (--quick)" if report["quick"] else "") + ".", "",
             common.markdown_table(HEADERS, table_rows(report), right={1, 2, 3, 4}), ""]
    if cross_rows(report):
        lines += ["Cross-check: one call of repeat=N, only where re-running the output is the "
                  "same case (free of the per-call timer overhead):", "",
                  common.markdown_table(CROSS_HEADERS, cross_rows(report)), ""]
    if "parallel" in report:
        from bench import pps_parallel as pp  # noqa: PLC0415
        lines += ["New flows on both CPUs at once (`--parallel`, bench/pps_parallel.py): "
                  "kernel ns per packet, median (min-max) over rounds:", "",
                  common.markdown_table(pp.HEADERS, pp.table_rows(report["parallel"]),
                                        right={2, 3, 4, 5}), ""]
    lines += ["- " + n for n in notes(report)]
    if "parallel" in report:
        lines += ["- " + n for n in pp.notes(report["parallel"])]
    lines += ["- targets (issue, net ns): established <= 75 (dr) / <= 110 (tun), new flow <= 650, "
              "non-VIP <= 30; Katran, same method on this machine: 186 established IPv4 IPIP, "
              "~780 new, 58 non-VIP",
              "- floors (bpf/floors.c, fixed, measured in the same rounds): x floor = net(case) / "
              "net(floor); aims (issue 16): established <= 1.15x floor_dr / floor_tun, new flow "
              "<= 1.1x floor_new, non-VIP <= 1.2x floor_parse, 1M flows <= 1.2x floor_dr_1m; "
              "IPv6 cases are set against the IPv4 floors; dr_v4_established_many (100k flows) "
              "has no floor of its own (the 1M pair is the many-flows comparison)"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- running
class Runner:
    """BPF_PROG_TEST_RUN with repeat=1 over a buffer of same-length frames, as lean as
    Python allows: one attr, one output buffer, frames addressed in place."""

    def __init__(self, prog_fd: int, frames: bytes, frame_len: int, cyclic: bool):
        from l4lb.dataplane import bpfsys, testrun  # noqa: PLC0415 - keeps the pure helpers import-light
        if len(frames) % frame_len:
            raise ValueError("frames are not all frame_len long")
        self.frame_len = frame_len
        self.count = len(frames) // frame_len
        self.cyclic = cyclic
        self.buf = ct.create_string_buffer(frames, len(frames))
        self.outlen = frame_len + 256
        self.out = ct.create_string_buffer(self.outlen)
        self.attr = testrun._TestAttr(prog_fd=prog_fd, data_size_in=frame_len,
                                      data_out=ct.addressof(self.out), repeat=1)
        self._ref = ct.byref(self.attr)
        self._size = ct.sizeof(self.attr)
        self._syscall = bpfsys.raw_syscall
        self._nr = (bpfsys.SYS_BPF, bpfsys.BPF_PROG_TEST_RUN)
        self.next = 0
        self.long_calls = 0

    def _fail(self):
        err = ct.get_errno()
        raise OSError(err, f"BPF_PROG_TEST_RUN failed: {os.strerror(err)}")

    def run(self, n: int, verdict: int, keep: list | None = None) -> float:
        """n calls of repeat=1 on the next n frames; the mean kernel duration in ns."""
        return self.run_total(n, verdict, keep) / n

    def run_total(self, n: int, verdict: int, keep: list | None = None) -> int:
        """n calls of repeat=1 on the next n frames; the sum of the kernel's durations.
        Calls over LONG_CALL_NS are counted in self.long_calls (kept in the sum)."""
        if not self.cyclic and self.next + n > self.count:
            raise BenchError(f"only {self.count - self.next} fresh frames left, {n} wanted")
        attr, ref, size, call = self.attr, self._ref, self._size, self._syscall
        sys_bpf, cmd = self._nr
        base, flen, outlen, count = ct.addressof(self.buf), self.frame_len, self.outlen, self.count
        idx, total, wrong, long_calls = self.next, 0, 0, 0
        for _ in range(n):
            attr.data_in = base + idx * flen
            attr.data_size_out = outlen
            if call(sys_bpf, cmd, ref, size):
                self._fail()
            d = attr.duration
            total += d
            if d > LONG_CALL_NS:
                long_calls += 1
            if keep is not None:
                keep.append(d)
            if attr.retval != verdict:
                wrong += 1
            idx += 1
            if idx == count:
                idx = 0
        self.next = idx
        self.long_calls += long_calls
        if wrong:
            raise BenchError(f"{wrong} of {n} calls returned another verdict than {verdict}")
        return total

    def run_repeat(self, repeat: int, verdict: int) -> int:
        """One call of repeat=`repeat` on the current frame: the kernel's mean ns per run."""
        a = self.attr
        a.data_in = ct.addressof(self.buf) + self.next * self.frame_len
        a.data_size_out = self.outlen
        a.repeat = repeat
        try:
            if self._syscall(*self._nr, self._ref, self._size):
                self._fail()
        finally:
            a.repeat = 1
        if a.retval != verdict:
            raise BenchError(f"repeat run returned {a.retval}, not {verdict}")
        return a.duration

    def output(self) -> bytes:
        return self.out.raw[:self.attr.data_size_out]


def counter_deltas(before: dict, after: dict) -> dict:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


def expected_deltas(case: Case, n: int) -> dict:
    if case.prog != "lb":
        return {}
    if case.vip is None:
        return {"pass_non_vip": n}
    tx = "tx_tun" if VIPS[case.vip][2] == "tun" else "tx_dr"
    flow = "conn_miss" if case.flows == "new" else "conn_hit"
    return {tx: n, flow: n}


def check_output(case: Case, frame_len: int, out: bytes) -> None:
    """The first call's output is what the case claims (DR: same length, real's MAC;
    tunnel: grown by the outer header)."""
    if case.prog != "lb" or case.vip is None:
        return
    _, _, mode, rfam = VIPS[case.vip]
    grow = 0 if mode == "dr" else (20 if rfam == 4 else 40)
    if len(out) != frame_len + grow:
        raise BenchError(f"{case.name}: output {len(out)} bytes, expected {frame_len + grow}")
    if out[6:12] != LB_MAC or not out[0:6].startswith(bytes.fromhex("0299000100")):
        raise BenchError(f"{case.name}: output MACs {out[:12].hex()} are not LB -> real")


def method_text(calls: int, rounds: int, chunk: int, cpu: int) -> str:
    return (f"BPF_PROG_TEST_RUN with repeat=1 for every case, baselines included; {calls} calls "
            f"per case and round, the kernel's per-call duration averaged over the round "
            f"(every call counted, none dropped); {rounds} rounds; within a round the cases "
            f"take turns in chunks of {chunk} calls, the order rotating; min/median/max over "
            f"the per-round means; net = median - xdp_pass median; process pinned to CPU {cpu}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    ap.add_argument("--md", metavar="PATH", help="write the table and command as Markdown")
    ap.add_argument("--quick", action="store_true",
                    help=f"{QUICK_CALLS} calls per round (the whole run well under a minute)")
    ap.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    ap.add_argument("--calls", type=int, help=f"calls per case and round "
                    f"(default {DEFAULT_CALLS}, --quick {QUICK_CALLS})")
    ap.add_argument("--chunk", type=int, default=DEFAULT_CHUNK,
                    help="calls of one case before the next case's turn (interleaving grain)")
    ap.add_argument("--flows", type=int, default=DEFAULT_MANY_FLOWS,
                    help="established flows that dr_v4_established_many cycles over")
    ap.add_argument("--flows-1m", type=int, default=DEFAULT_FLOWS_1M, dest="flows_1m",
                    help="flows in the table for dr_v4_established_1m and floor_dr_1m")
    ap.add_argument("--cases", help="comma-separated subset (xdp_pass is always run)")
    ap.add_argument("--cpu", type=int, help="CPU to pin to (default: the last one)")
    ap.add_argument("--per-cpu-lru", action="store_true",
                    help="build the conn table with BPF_F_NO_COMMON_LRU")
    ap.add_argument("--parallel", action="store_true",
                    help="also run new flows on both CPUs at once, common vs per-CPU LRU "
                         "lists (bench/pps_parallel.py; with --cases xdp_pass: that alone)")
    ap.add_argument("--parallel-flows", type=int, dest="parallel_flows",
                    help="fresh flows per worker and phase of --parallel "
                         "(default 5000, --quick 2000)")
    ap.add_argument("--parallel-table", type=int, dest="parallel_table",
                    help="conn table entries of --parallel's balancers (default: the "
                         "daemon's default)")
    ap.add_argument("--bpf-dir", metavar="DIR",
                    help="compile the balancer from another copy of bpf/ (A/B against an "
                         "older version, e.g. `git archive HEAD bpf | tar -x -C /tmp/old`)")
    ap.add_argument("--ab-dir", metavar="DIR",
                    help="also compile the balancer from DIR (another copy of bpf/) and measure "
                         "every balancer case of it as <case>@A in the same rounds, interleaved "
                         "(A/B; its counters are not checked, its verdicts are). Which program "
                         "is first biases the figures (one program against itself differed by "
                         "2-7 ns on hits, up to 46 ns on the 1M case): run both orders, swapping "
                         "--bpf-dir and --ab-dir, and average (bench/results/pps_conns4_ab.md)")
    a = ap.parse_args(argv)
    a.calls = a.calls or (QUICK_CALLS if a.quick else DEFAULT_CALLS)
    if a.parallel_flows is None:
        a.parallel_flows = 2000 if a.quick else 5000
    if a.parallel_table is None:
        from l4lb.dataplane import maps as M  # noqa: PLC0415
        a.parallel_table = M.DEFAULT_CONN_TABLE_SIZE
    if min(a.rounds, a.calls, a.flows, a.chunk, a.flows_1m, a.parallel_flows) < 1:
        ap.error("--rounds, --calls, --chunk, --flows, --flows-1m and --parallel-flows "
                 "must be positive")
    if a.parallel and not 1024 <= a.parallel_table <= 1 << 26:
        ap.error("--parallel-table must be in 1024..67108864")
    if a.parallel and a.rounds * 12 > 240:
        ap.error("--parallel runs at most 20 rounds (flow series of distinct sources)")
    names = [c.name for c in CASES]
    if a.cases:
        want = {s.strip() for s in a.cases.split(",") if s.strip()} | {"xdp_pass"}
        bad = want - set(names)
        if bad:
            ap.error(f"unknown cases {sorted(bad)}; known: {', '.join(names)}")
        a.case_list = [c for c in CASES if c.name in want]
    else:
        a.case_list = list(CASES)
    if a.ab_dir:
        a.case_list += [dataclasses.replace(c, name=c.name + "@A", prog="lb_a")
                        for c in a.case_list if c.prog == "lb"]
    return a


def bpf_digest(bpf_dir: Path) -> str:
    """sha256 over bpf/'s sources: which version of the program these figures are for."""
    h = hashlib.sha256()
    for f in sorted(Path(bpf_dir).glob("*.[ch]")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def chunk_sizes(calls: int, chunk: int) -> list[int]:
    """Split a round's calls into chunks of at most `chunk` (the last one may be shorter)."""
    if calls < 1 or chunk < 1:
        raise ValueError("calls and chunk must be positive")
    return [chunk] * (calls // chunk) + ([calls % chunk] if calls % chunk else [])


def conn_table_size_for(flows_needed: int, default: int) -> int:
    """The conn table must hold every flow the run creates with room to spare, so that no
    case pays for LRU eviction: at least twice the flows, a power of two, >= default."""
    size = default
    while size < 2 * flows_needed:
        size *= 2
    return size


def compile_floors(table_size: int) -> dict:
    """bpf/floors.c's four programs sharing one LRU table, always from this checkout's
    bpf/ (an A/B run with --bpf-dir measures both balancers against the same floors)."""
    from l4lb.dataplane import loader  # noqa: PLC0415

    bcc = loader._bcc()
    b = bcc.BPF(src_file=str(ROOT / "bpf" / "floors.c").encode(),
                cflags=[f"-DFLOOR_TABLE_SIZE={table_size}"])

    class FloorProg:
        def __init__(self, fn, owner):
            self.fd, self._owner = fn.fd, owner

        def close(self):
            if self._owner:
                b.cleanup()

    return {name: FloorProg(b.load_func(name.encode(), bcc.BPF.XDP), name == "floor_parse")
            for name in FLOOR_PROGS}


def case_count(case: Case, args, new_per_case: int) -> int:
    """Frames a case's runner holds (distinct flows unless the case has one flow)."""
    return {"one": 1, "many": args.flows, "many1m": args.flows_1m}.get(case.flows, new_per_case)


def run(args) -> dict:
    from l4lb.dataplane import loader, tables  # noqa: PLC0415
    from l4lb.dataplane import maps as M  # noqa: PLC0415

    if os.geteuid() != 0:
        raise BenchError("BPF_PROG_TEST_RUN needs root")
    cpu = args.cpu if args.cpu is not None else (os.cpu_count() or 1) - 1
    os.sched_setaffinity(0, {cpu})
    cases = args.case_list
    warmup = min(args.calls, 2000)
    new_per_case = warmup + args.rounds * args.calls
    lb_cases = [c for c in cases if c.prog in ("lb", "lb_a")]
    floor_cases = [c for c in cases if c.prog in FLOOR_PROGS]
    flows_needed = sum(case_count(c, args, new_per_case) for c in lb_cases if c.vip) + 16
    conn_size = conn_table_size_for(flows_needed, M.DEFAULT_CONN_TABLE_SIZE)
    floor_size = conn_table_size_for(
        sum(case_count(c, args, new_per_case) for c in floor_cases) + 16, 1024)
    opts = loader.BuildOptions(conn_table_size=conn_size, per_cpu_lru=args.per_cpu_lru)

    if args.bpf_dir:
        loader.BPF_DIR = Path(args.bpf_dir).resolve()
    t0 = time.monotonic()
    progs = compile_floors(floor_size) if floor_cases else {}
    progs.update({"pass": loader.compile_pass(), "swap": loader.compile_swap(),
                  "lb": loader.compile_balancer(opts)})
    if args.ab_dir:
        here, loader.BPF_DIR = loader.BPF_DIR, Path(args.ab_dir).resolve()
        try:
            progs["lb_a"] = loader.compile_balancer(opts)
        finally:
            loader.BPF_DIR = here

    def setup(prog):
        st = tables.ServiceTables(prog, opts)
        st.set_config(tun_src4=TUN_SRC4, tun_src6=TUN_SRC6, flow_events=False,
                      conn_timeout_s=CONN_TIMEOUT_S)
        st.conns.clear()
        st.reset_global_counters()
        for addr, port, mode, rfam in VIPS.values():
            vs = st.upsert_vip(addr, port, "tcp", mode=mode)
            st.set_reals(vs.key, real_list(rfam))
        if hasattr(loader, "set_flow_guard"):  # the warm-up admits 100k flows at once
            loader.set_flow_guard(prog.map("flow_guard_cfg"), 0xFFFFFFFF)
        if hasattr(st, "set_own_macs"):  # as the daemon does; test runs enter on lo (1)
            st.set_own_macs({1: LB_MAC.hex(":")})
        return st

    try:
        st = setup(progs["lb"])
        if args.ab_dir:
            setup(progs["lb_a"])
        own_macs = hasattr(st, "set_own_macs")
        print(f"compiled and set up in {time.monotonic() - t0:.1f} s; building frames ...",
              file=sys.stderr)

        runners: dict[str, Runner] = {}
        frame_len = {}
        for series, c in enumerate(cases):
            count = case_count(c, args, new_per_case)
            frames = case_frames(c, count, series)
            flen = len(case_frames(c, 1, series))
            frame_len[c.name] = flen
            runners[c.name] = Runner(progs[c.prog].fd, frames, flen, cyclic=c.flows != "new")
            if c.prog in ("floor_dr", "floor_tun"):  # its flows enter the floor's table
                Runner(progs["floor_new"].fd, frames, flen, cyclic=False).run(count, XDP_TX)

        # Warm-up (not measured): a single flow gets established; the many flows are
        # each run once, which installs them all; new-flow cases spend fresh frames.
        # Established flows start with a SYN and its ACK, one flow after the other (a TCP
        # flow enters the conn table by its SYN and its next packet); measured are ACKs.
        for series, c in enumerate(cases):
            if c.prog in ("lb", "lb_a") and c.vip is not None and c.flows != "new":
                count = case_count(c, args, new_per_case)
                syns = case_frames(c, count, series, TCP_SYN)
                acks = case_frames(c, count, series)
                size = len(syns) // count
                both = b"".join(f[i * size:(i + 1) * size] for i in range(count)
                                for f in (syns, acks))  # SYN 0, ACK 0, SYN 1, ...
                Runner(progs[c.prog].fd, both, size, cyclic=False).run(2 * count, c.verdict)
        for c in cases:
            r = runners[c.name]
            r.run(1, c.verdict)
            check_output(c, frame_len[c.name], r.output())
            r.next = 0 if c.flows != "new" else r.next
            if c.flows in ("many", "many1m"):
                r.run(r.count, c.verdict)
            else:
                r.run(warmup - 1 if c.flows == "new" else warmup, c.verdict)
        g0 = st.global_counters()

        durations: list[int] = []
        runners["xdp_pass"].run(min(args.calls, 5000), XDP_PASS, keep=durations)
        for r in runners.values():
            r.long_calls = 0

        print(f"measuring {len(cases)} cases x {args.rounds} rounds x {args.calls} calls ...",
              file=sys.stderr)
        load_before = common.cpu_snapshot()
        means: dict[str, list[float]] = {c.name: [] for c in cases}
        repeat_means: dict[str, list[int]] = {c.name: [] for c in cases if c.same_on_rerun}
        sizes = chunk_sizes(args.calls, args.chunk)
        counters = st.global_counters()
        for rnd in range(args.rounds):
            totals = {c.name: 0 for c in cases}
            for j, size in enumerate(sizes):
                # Chunks of every case alternate, the order rotating, so that whatever
                # else the machine does falls on all cases alike.
                k = (rnd * len(sizes) + j) % len(cases)
                for c in cases[k:] + cases[:k]:
                    totals[c.name] += runners[c.name].run_total(size, c.verdict)
                    if c.prog != "lb":
                        continue
                    now = st.global_counters()
                    got, want = counter_deltas(counters, now), expected_deltas(c, size)
                    if got != want:
                        raise BenchError(f"{c.name}: counters moved {got}, expected {want}")
                    counters = now
            for c in cases:
                means[c.name].append(totals[c.name] / args.calls)
            for c in cases:
                if c.same_on_rerun:
                    repeat_means[c.name].append(
                        runners[c.name].run_repeat(CROSS_CHECK_REPEAT, c.verdict))
            counters = st.global_counters()
        load = common.other_load(load_before, common.cpu_snapshot())
        # Every measured new-flow call made a new flow, and no established flow lost its
        # entry (its packets would count as misses too).
        g1 = st.global_counters()
        misses = g1["conn_miss"] - g0["conn_miss"]
        lost = g1.get("conn_miss_non_syn", 0) - g0.get("conn_miss_non_syn", 0)  # ACKs of no flow
        expect_new = args.rounds * args.calls * sum(1 for c in cases
                                                    if c.prog == "lb" and c.flows == "new")
        if misses != expect_new or lost:
            raise BenchError(f"{misses} new flows counted, expected {expect_new}, and {lost} "
                             "packets of no known flow: an entry was evicted or a flow was "
                             "not new")
    finally:
        for p in progs.values():
            p.close()

    summary = {c.name: summarize(means[c.name]) for c in cases}
    long_calls = {c.name: runners[c.name].long_calls for c in cases}
    cross = {name: summarize([float(x) for x in v]) for name, v in repeat_means.items()}
    add_net(cross)
    overhead = summary["xdp_pass"]["median_ns"] - cross["xdp_pass"]["median_ns"]
    meta = common.run_meta(args.quick)
    extra = {
        "calls_per_round": args.calls, "rounds": args.rounds, "chunk": args.chunk,
        "long_calls": long_calls, "machine_load": load,
        "resolution_ns": resolution_ns(durations),
        "per_call_overhead_ns": round(overhead, 1),
        "cross_check_repeat": {"repeat": CROSS_CHECK_REPEAT, "cases": cross},
        "setup": {"vips": len(VIPS), "reals_per_vip": N_REALS, "ring_size": 65537,
                  "conn_table_size": opts.conn_table_size, "per_cpu_lru": opts.per_cpu_lru,
                  "conn_timeout_s": CONN_TIMEOUT_S, "flow_events": False,
                  "frame_bytes_v4": len(tcp_frame(bytes(4), bytes(4), 1, 1)),
                  "frame_bytes_v6": len(tcp_frame(bytes(16), bytes(16), 1, 1)),
                  "many_flows": args.flows, "flows_1m": args.flows_1m,
                  "floor_table_size": floor_size if floor_cases else None, "cpu": cpu, "cpus": os.cpu_count(),
                  "bpf_dir": str(args.bpf_dir or "bpf"), "ab_dir": args.ab_dir,
                  "bpf_sha256": bpf_digest(loader.BPF_DIR),
                  "own_macs": own_macs},
        "targets_net_ns": TARGETS, "katran_net_ns": KATRAN,
    }
    return build_report(summary, method_text(args.calls, args.rounds, args.chunk, cpu), meta,
                        extra)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
        if args.parallel:
            from bench import pps_parallel  # noqa: PLC0415
            print("measuring new flows on both CPUs at once ...", file=sys.stderr)
            report["parallel"] = pps_parallel.run(args, sys.modules[__name__])
    except BenchError as e:
        print(f"pps: {e}", file=sys.stderr)
        return 1
    print(render_text(report))
    if args.json:
        common.write_json(args.json, report)
    if args.md:
        common.write_text(args.md, render_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
