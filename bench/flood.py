"""A spoofed TCP flood through the VIP of an HA pair, while held connections echo.

lb1 (VRRP master) and lb2 (backup, conn-table sync on) balance one DR VIP over
three reals; 60 long-lived echo connections run through lb1 and are synced to
lb2. A fourth real is added just before the flood (so a flow that lost its conn
entry would be re-hashed to another real and reset). Then client1 sends
`--packets` frames from a raw AF_PACKET socket, every 5-tuple never seen before,
sources from 198.18.0.0/15 (RFC 2544 benchmark addresses: no node has a route
to them, so the reals' answers die in their own routing): in each group of four,
a lone SYN, a SYN and then an ACK of one tuple (what a client's handshake looks
like to a DSR balancer), and a stray ACK. IP checksums are right (the lab's
bridge runs br_netfilter, which drops bad ones); TCP checksums are not: the
balancer never reads them, and the reals drop these segments early, which keeps
the 2-CPU lab from measuring their TCP stacks. While the flood runs, client1 also
opens new connections through the VIP.

Figures: held connections lost (reset, failed or moved to another real), growth
of the backup's conn table, new connections per second completed during the
flood, and lb1's counters (new embryos, promotions, guard refusals, stray
non-SYNs). Both balancers' admission guard is `--guard` flows per CPU and second,
set by `[node] new_flow_rate` as an operator would size it to the legitimate
new-connection rate.

    sudo .venv/bin/python -m bench.flood [--quick] [--json PATH] [--md PATH]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import socket
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

VIP = "10.99.0.100"
PORT = 9000
VIP_KEY = f"{VIP}:{PORT}/tcp"
HELD = 60
SYNC_PORT = 9542
KEY = "lab-flood-key-0123456789abcdef"
SPOOF_BASE = 0xC6120000  # 198.18.0.0
TCP_SYN, TCP_ACK = 0x02, 0x10
FRAME_LEN = 54


# ------------------------------------------------------------------ generator
def flood_frames(dst_mac: bytes, src_mac: bytes, vip: str, port: int, packets: int) -> bytearray:
    """`packets` frames (FRAME_LEN each), groups of four: SYN(a), SYN(b), ACK(b), ACK(c);
    tuple j has source 198.18.0.0 + j // 4096, port 1024 + j % 4096."""
    dst = socket.inet_aton(vip)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0x4000, 64, 6, 0, b"\0" * 4, dst)
    tcp = struct.pack("!HHIIBBHHH", 0, port, 1, 0, 5 << 4, 0, 64240, 0, 0)
    tmpl = dst_mac + src_mac + b"\x08\x00" + ip + tcp
    assert len(tmpl) == FRAME_LEN
    out = bytearray(tmpl * packets)
    kinds = ((0, TCP_SYN), (1, TCP_SYN), (1, TCP_ACK), (2, TCP_ACK))  # (tuple in group, flags)
    base = sum(struct.unpack("!10H", ip))  # the IP header's words, source zero
    for i in range(packets):
        grp, (t, flags) = divmod(i, 4)[0], kinds[i % 4]
        j = grp * 3 + t
        o = i * FRAME_LEN
        src = SPOOF_BASE + (j >> 12)
        struct.pack_into("!I", out, o + 26, src)
        c = base + (src >> 16) + (src & 0xFFFF)
        c = (c & 0xFFFF) + (c >> 16)
        struct.pack_into("!H", out, o + 24, ~((c & 0xFFFF) + (c >> 16)) & 0xFFFF)
        struct.pack_into("!H", out, o + 34, 1024 + (j & 0xFFF))
        out[o + 47] = flags
        if flags == TCP_ACK:
            struct.pack_into("!I", out, o + 42, 0x5EED0000 + j)  # some ack number
    return out


def gen_main(a) -> None:
    """In the client's namespace: send the flood, print {"sent", "seconds"} as JSON."""
    frames = flood_frames(bytes.fromhex(a.dst_mac.replace(":", "")),
                          bytes.fromhex(a.src_mac.replace(":", "")), a.vip, a.port, a.packets)
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((a.iface, 0))
    mv = memoryview(frames)
    sent = 0
    print(json.dumps({"started": time.time()}), flush=True)
    w0 = time.time()
    t0 = time.monotonic()
    deadline = t0 + a.seconds
    send = s.send
    # Paced in bursts of 32: unpaced, the veth backlogs (netdev_max_backlog) overflow
    # and the frames die before the balancer sees them.
    per_burst = 32 / a.pps
    for i in range(a.packets):
        if i & 31 == 0:
            due = t0 + (i >> 5) * per_burst
            while (now := time.monotonic()) < due:
                pass
            if now > deadline:
                break
        try:
            send(mv[i * FRAME_LEN:(i + 1) * FRAME_LEN])
            sent += 1
        except BlockingIOError:
            pass
    print(json.dumps({"sent": sent, "seconds": time.monotonic() - t0, "t0": w0,
                      "t1": time.time()}), flush=True)


# ------------------------------------------------------------------ the scenario
def lb_config(lab, name: str, guard: int) -> dict:
    reals = [{"address": lab.node(f"real{i}").ipv4} for i in (1, 2, 3)]
    vip = {"address": VIP, "port": PORT, "mode": "dr", "real": reals}
    vrrp = {"name": "VI_1", "interface": "eth0", "vrid": 52, "version": 3,
            "priority": 150 if name == "lb1" else 100, "advert_interval_s": 0.1,
            "preempt": True, "vips": [f"{VIP}/24"]}
    peer = "lb2" if name == "lb1" else "lb1"
    sync = {"enabled": True, "listen": f"{lab.node(name).ipv4}:{SYNC_PORT}",
            "peers": [f"{lab.node(peer).ipv4}:{SYNC_PORT}"], "key": KEY,
            "vrrp_instance": "VI_1", "full_sync_interval_s": 30}
    cfg = lab.balancer_config(name, [vip], vrrp=[vrrp], sync=sync)
    cfg["node"]["new_flow_rate"] = guard  # the admission guard, as an operator sets it
    return cfg


def vrrp_state(lab, node: str):
    r = lab.l4lb(node, ["status", "--json"], check=False, timeout=10)
    return (json.loads(r.stdout).get("vrrp") or [{}])[0].get("state") if r.returncode == 0 \
        else None


def conn_count(lab, node: str) -> int:
    return len(lab.l4lb_json(node, ["conns", "--vip", VIP_KEY, "--limit", "1000000"]))


def counters(lab, node: str) -> dict:
    return lab.l4lb_json(node, ["stats"])["global"]


def read_guard(lab, node: str) -> int:
    """The running admission guard of a node, read from its pinned flow_guard_cfg."""
    import ctypes as ct  # noqa: PLC0415

    from l4lb.dataplane import bpfsys  # noqa: PLC0415
    from l4lb.dataplane import maps as M  # noqa: PLC0415
    from l4lb.lab import PIN_ROOT  # noqa: PLC0415

    paths = glob.glob(f"{PIN_ROOT}/{lab.l4lb_name(node)}/v{M.LAYOUT_VERSION}-*/flow_guard_cfg")
    if len(paths) != 1:
        raise RuntimeError(f"{node}: expected one pinned flow_guard_cfg, found {paths}")
    fd = bpfsys.obj_get(paths[0])
    try:
        (_, vals, n), = bpfsys.lookup_batches(fd, 4, ct.sizeof(M.FlowGuardCfg), 1)
    finally:
        os.close(fd)
    return M.FlowGuardCfg.from_buffer_copy(vals[:ct.sizeof(M.FlowGuardCfg)]).max_per_s


def vip_mac(lab) -> str:
    """The MAC client1 resolved the VIP to (the master's)."""
    from pyroute2 import NetNS  # noqa: PLC0415

    with NetNS(lab.node("client1").netns) as ns:
        for n in ns.get_neighbours(dst=VIP):
            mac = n.get_attr("NDA_LLADDR")
            if mac:
                return mac
    raise RuntimeError("client1 has no neighbour entry for the VIP")


def start_hold(lab, tag: str, count: int, seconds: float = 150):
    ready = lab.workdir / f"{tag}-ready.json"
    svc = lab.popen("client1", [sys.executable, "-m", "l4lb.lab.client", "hold", f"{VIP}:{PORT}",
                                "--conns", str(count), "--every", "0.1", "--seconds",
                                str(seconds), "--ready-file", str(ready)], log_name=f"{tag}.log")
    from l4lb.lab import wait_for  # noqa: PLC0415

    wait_for(ready.exists, 30, what=f"{tag}: {count} connections")
    if json.loads(ready.read_text())["connected"] != count:
        raise RuntimeError(f"{tag}: not all connected: {svc.output()[-2000:]}")
    return svc


def start_pair(lab, guard: int) -> None:
    from l4lb.lab import wait_for  # noqa: PLC0415

    for r in ("real1", "real2", "real3", "real4"):
        lab.start_echo(r, PORT)
    lab.daemons = {}
    with ThreadPoolExecutor(2) as ex:  # the two compile in parallel
        futs = {n: ex.submit(lab.start_l4lb, n, lb_config(lab, n, guard)) for n in ("lb1", "lb2")}
        for n, f in futs.items():
            lab.daemons[n] = f.result()
    wait_for(lambda: vrrp_state(lab, "lb1") == "master", 15, what="lb1 master")
    wait_for(lambda: vrrp_state(lab, "lb2") == "backup", 5, what="lb2 backup")
    wait_for(lambda: lab.l4lb_json("lb2", ["status"])["sync"]["peer_detail"][0]["state"] == "up",
             10, what="lb2 sees lb1 over sync")


def scenario(lab, packets: int, guard: int, flood_seconds: float = 30.0,
             new_conns: int = 300, pps: int = 100_000) -> dict:
    """On a lab with 1 client, 2 balancers, 4 reals: the whole measurement."""
    from l4lb.lab import end_hold, wait_for  # noqa: PLC0415

    start_pair(lab, guard)
    for n in ("lb1", "lb2"):  # the daemon programmed [node] new_flow_rate
        assert read_guard(lab, n) == guard, (n, read_guard(lab, n))
    hold = start_hold(lab, "held", HELD)
    wait_for(lambda: conn_count(lab, "lb2") >= HELD, 10, what="lb2 has the held flows")
    for n in ("lb1", "lb2"):  # a real added just before: lost entries would re-hash
        lab.l4lb(n, ["real", "add", VIP_KEY, lab.node("real4").ipv4])
    backup_before = conn_count(lab, "lb2")
    master_before = conn_count(lab, "lb1")
    c0 = counters(lab, "lb1")
    client = lab.node("client1")
    gen = lab.popen("client1", [sys.executable, "-m", "bench.flood", "gen",
                                "--iface", "eth0", "--dst-mac", vip_mac(lab),
                                "--src-mac", client.mac, "--vip", VIP, "--port", str(PORT),
                                "--packets", str(packets), "--seconds", str(flood_seconds),
                                "--pps", str(pps)],
                    log_name="flood-gen.log", cwd=Path(__file__).resolve().parent.parent)
    wait_for(lambda: "started" in gen.output() or not gen.alive, 60,
             what="the flood generator's frames built")
    s0 = time.time()
    spread = lab.client("client1", ["spread", f"{VIP}:{PORT}", "--count", str(new_conns),
                                    "--parallel", "10", "--timeout", "5"])
    s1 = time.time()
    spread_s = s1 - s0
    gen.proc.wait(flood_seconds + 60)
    sent = json.loads(gen.output().strip().splitlines()[-1])
    if "sent" not in sent:
        raise RuntimeError(f"flood generator failed: {gen.output()[-2000:]}")
    flood_running_at_spread_end = s1 <= sent["t1"]
    time.sleep(2.0)  # held connections keep echoing after the flood; sync drains
    rep = end_hold(hold)
    c1 = counters(lab, "lb1")
    backup_after = conn_count(lab, "lb2")
    master_after = conn_count(lab, "lb1")
    d = {k: c1.get(k, 0) - c0.get(k, 0) for k in
         ("conn_miss", "conn_promoted", "conn_guard_limited", "conn_miss_non_syn", "conn_hit",
          "tx_dr", "drop_no_service", "flow_event_lost")}
    lost = [(r["id"], r["reals"], r["error"]) for r in rep["detail"]
            if r["error"] or len(r["reals"]) > 1]
    return {
        "flood_packets": sent["sent"],
        "flood_seconds": round(sent["seconds"], 3),
        "flood_pps": round(sent["sent"] / sent["seconds"]),
        "held_connections": HELD,
        "held_lost": len(lost),
        "held_lost_detail": lost[:10],
        "held_max_gap_s": round(rep["max_gap_s"], 3),
        "backup_conn_before": backup_before,
        "backup_conn_growth": backup_after - backup_before,
        "master_conn_growth": master_after - master_before,
        "new_conns_ok": spread["ok"],
        "new_conns_errors": spread["errors"],
        "new_flows_per_s_during_flood": round(spread["ok"] / spread_s, 1),
        "new_conns_seconds": round(spread_s, 3),
        "new_conns_within_flood": bool(flood_running_at_spread_end),
        "guard_per_cpu_s": guard,
        "lb1_counters_delta": d,
    }


def table(r: dict) -> str:
    rows = [("flood packets sent", f"{r['flood_packets']:,} in {r['flood_seconds']} s "
             f"({r['flood_pps']:,}/s)"),
            ("held connections lost", f"{r['held_lost']} of {r['held_connections']} "
             f"(longest exchange gap {r['held_max_gap_s']} s)"),
            ("backup conn-table growth", f"{r['backup_conn_growth']:,} "
             f"(master: {r['master_conn_growth']:,})"),
            ("new connections during the flood", f"{r['new_flows_per_s_during_flood']}/s "
             f"({r['new_conns_ok']} ok, errors {r['new_conns_errors']}, "
             f"{r['new_conns_seconds']} s, within the flood: {r['new_conns_within_flood']})"),
            ("admission guard", f"{r['guard_per_cpu_s']:,} per CPU and second")]
    rows += [(f"lb1 {k}", f"{v:,}") for k, v in r["lb1_counters_delta"].items()]
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{w}}  {b}" for a, b in rows)


def markdown(r: dict, cmd: str) -> str:
    lines = ["# Spoofed flood through the VIP", "", f"Command: `{cmd}`", ""]
    for run in [r, *r["other_guards"]]:
        lines += [f"## Admission guard {run['guard_per_cpu_s']:,} per CPU and second", "",
                  "| figure | measured |", "| --- | --- |"]
        for line in table(run).splitlines():
            a, b = line.split("  ", 1)
            lines.append(f"| {a.strip()} | {b.strip()} |")
        lines.append("")
    lines += [__doc__.split("\n\n")[1].replace("\n", " "), "", f"kernel {r['kernel']}, {r['time']}, quick: {r['quick']}; "
              "XDP generic in the lab's namespaces, 2 CPUs shared by everything.", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    g = sub.add_parser("gen", help="(internal) send the flood from this namespace")
    g.add_argument("--iface", required=True)
    g.add_argument("--dst-mac", required=True)
    g.add_argument("--src-mac", required=True)
    g.add_argument("--vip", required=True)
    g.add_argument("--port", type=int, required=True)
    g.add_argument("--packets", type=int, required=True)
    g.add_argument("--seconds", type=float, default=30.0)
    g.add_argument("--pps", type=float, default=100_000)
    ap.add_argument("--quick", action="store_true", help="400,000 packets instead of 1,000,000")
    ap.add_argument("--packets", type=int, help="flood size (default 1,000,000; quick 400,000)")
    ap.add_argument("--guard", default="200,10000",
                    help="lb1/lb2 admission guards to run, flows per CPU and second, comma-"
                         "separated; the first gives the top-level figures (default 200,10000: "
                         "a lab-sized guard, and the compiled default)")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--md", metavar="PATH")
    a = ap.parse_args(argv)
    if a.cmd == "gen":
        gen_main(a)
        return
    if os.geteuid() != 0:
        sys.exit("python -m bench.flood needs root (namespaces, XDP)")
    from l4lb.lab import Lab  # noqa: PLC0415

    packets = a.packets or (400_000 if a.quick else 1_000_000)
    try:
        guards = [int(g) for g in a.guard.split(",")]
    except ValueError:
        ap.error(f"--guard: expected integers separated by commas, got {a.guard!r}")
    runs = []
    for g in guards:
        with Lab("bflood", clients=1, balancers=2, reals=4) as lab:
            runs.append(scenario(lab, packets, g))
        print(table(runs[-1]) + "\n")
    r = dict(runs[0])
    r["other_guards"] = runs[1:]
    r.update(kernel=os.uname().release, time=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             quick=a.quick)
    cmd = "sudo .venv/bin/python -m bench.flood " + " ".join(argv if argv is not None
                                                              else sys.argv[1:])
    r["command"] = cmd.strip()
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=2) + "\n")
    if a.md:
        Path(a.md).write_text(markdown(r, r["command"]))


if __name__ == "__main__":
    main()
