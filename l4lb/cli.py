"""The `l4lb` command line (typer).

Every command that reads state has --json; errors print one line saying what is
wrong and how to fix it, and exit with code 2 (bad usage or environment) or 1
(the operation failed).
"""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer

from l4lb import __version__

app = typer.Typer(
    name="l4lb",
    help=(
        "l4lb: a layer-4 load balancer with an XDP fast path.\n\n"
        "Packets for a virtual service (VIP) are spread over real servers by Maglev "
        "consistent hashing and forwarded in the kernel's XDP hook, by direct routing "
        "(MAC rewrite) or IP-in-IP tunnel. A pair of balancers shares the VIPs by VRRP "
        "and keeps established connections alive across a failover.\n\n"
        "Start with `l4lb check -c FILE`, then `l4lb start -c FILE`. "
        "Try it all in a throw-away lab of network namespaces with `make demo`."
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)

lab_app = typer.Typer(
    help="A throw-away test network of namespaces: clients, balancers and reals on one bridge "
         "(in a source checkout: the installed package does not ship the lab).",
    no_args_is_help=True,
)
app.add_typer(lab_app, name="lab")


def fail(msg: str, code: int = 2) -> None:
    typer.echo(f"l4lb: error: {msg}", err=True)
    raise typer.Exit(code)


def emit_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.")):
    if version:
        typer.echo(f"l4lb {__version__}")
        raise typer.Exit(0)


vip_app = typer.Typer(help="Add or delete virtual services at run time.", no_args_is_help=True)
real_app = typer.Typer(help="Add, delete, weight or drain real servers at run time.",
                       no_args_is_help=True)
app.add_typer(vip_app, name="vip")
app.add_typer(real_app, name="real")

CONFIG_OPT = typer.Option(None, "--config", "-c", help="Config file (TOML). See configs/.")
SOCKET_OPT = typer.Option(None, "--socket", "-s",
                          help="API socket of the daemon (default: from -c, or the only one "
                               "in /run/l4lb).")
JSON_OPT = typer.Option(False, "--json", help="Print as JSON.")


def _load(path: str):
    from l4lb.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as e:
        typer.echo(f"l4lb: {path}: invalid config:", err=True)
        for line in e.errors:
            typer.echo(f"  {line}", err=True)
        raise typer.Exit(1) from None


def _socket(config: Optional[str], sock: Optional[str]) -> str:
    if sock:
        return sock
    if config:
        return _load(config).node.api_socket
    from pathlib import Path

    socks = sorted(Path("/run/l4lb").glob("*.sock"))
    if len(socks) == 1:
        return str(socks[0])
    if not socks:
        fail("no l4lb daemon is running here (no socket in /run/l4lb); start one with "
             "`l4lb start -c FILE`", 1)
    fail(f"several daemons run here ({', '.join(s.name for s in socks)}); pick one with "
         "--socket or -c", 2)


def _call(config, sock, cmd, **args):
    from l4lb.api import ApiError, request

    path = _socket(config, sock)
    try:
        return request(path, cmd, **args)
    except (FileNotFoundError, ConnectionRefusedError):
        fail(f"no daemon answers on {path}; is `l4lb start` running?", 1)
    except ApiError as e:
        fail(str(e), 1)
    except PermissionError:
        fail(f"permission denied on {path}: the API is root only; use sudo", 2)
    except TimeoutError:
        fail(f"the daemon on {path} did not answer in time; see its log", 1)
    except ConnectionError as e:
        fail(f"the connection to the daemon on {path} failed: {e.strerror or e}", 1)


@app.command()
def check(config: str = typer.Option(..., "--config", "-c", help="Config file to validate."),
          system: bool = typer.Option(True, help="Also check this machine (interfaces, "
                                                 "bpffs, scripts).")):
    """Validate a config without touching the system; exit 0 if valid, 1 with every error."""
    from l4lb.config import check_system

    cfg = _load(config)
    errs = check_system(cfg) if system else []
    if system and cfg.bgp is not None and not errs:  # ECMP: FRR must be running too
        import asyncio

        from l4lb.routing.node import check_frr

        errs += [e for e in [asyncio.run(check_frr(cfg.bgp))] if e]
    if errs:
        typer.echo(f"l4lb: {config}: does not fit this machine:", err=True)
        for e in errs:
            typer.echo(f"  {e}", err=True)
        raise typer.Exit(1)
    from l4lb.config import config_warnings

    for w in config_warnings(cfg):
        typer.echo(f"l4lb: {config}: warning: {w}", err=True)
    typer.echo(f"{config}: OK ({len(cfg.vips)} VIPs, "
               f"{sum(len(v.reals) for v in cfg.vips)} reals, {len(cfg.vrrp)} VRRP instances)")


@app.command()
def start(config: str = typer.Option(..., "--config", "-c", help="Config file (TOML)."),
          log_level: str = typer.Option("info", help="debug, info, warning or error.")):
    """Run the balancer in the foreground (systemd Type=notify; logs to stderr).

    Started again after a crash or an upgrade it reattaches to the pinned maps, so
    forwarding and the connection table survive. SIGHUP reloads the config; SIGTERM
    stops the daemon but leaves XDP forwarding; `l4lb stop` removes everything."""
    import asyncio
    import os

    from l4lb.daemon import Daemon, configure_logging
    from l4lb.errors import L4lbError

    if os.geteuid() != 0:
        fail("l4lb start needs root (CAP_BPF, CAP_NET_ADMIN); run it with sudo or as the "
             "l4lb.service unit", 2)
    cfg = _load(config)
    configure_logging(log_level)
    try:
        rc = asyncio.run(Daemon(cfg, config_path=config).run())
    except (L4lbError, RuntimeError, OSError) as e:
        fail(str(e), 1)
    raise typer.Exit(rc)


@app.command()
def stop(config: Optional[str] = CONFIG_OPT, sock: Optional[str] = SOCKET_OPT):
    """Stop the daemon and remove the data plane: detach XDP, delete pins and VIP addresses.

    When no daemon answers (it was killed), cleans up from the config file instead."""
    from l4lb.api import ApiError, request

    try:
        path = _socket(config, sock)
        request(path, "stop", timeout=10)
        typer.echo("stopping: XDP detached, pins and VIPs removed")
        return
    except (FileNotFoundError, ConnectionRefusedError, ApiError, typer.Exit):
        if not config:
            fail("no daemon answered; pass -c FILE to clean up after a killed daemon", 1)
    from l4lb.daemon import offline_stop

    for line in offline_stop(_load(config)):
        typer.echo(line)


@app.command()
def drain(config: Optional[str] = CONFIG_OPT, sock: Optional[str] = SOCKET_OPT,
          stay: bool = typer.Option(False, "--stay", help="Withdraw but keep running "
                                                           "(no stop after the drain time).")):
    """ECMP mode: withdraw every VIP from BGP, keep forwarding for bgp.drain_s while the
    router moves flows to the other nodes, then stop (XDP stays until then)."""
    r = _call(config, sock, "drain", stop=not stay)
    then = f"stopping in {r['drain_s']:g}s" if r["stop"] else "staying up (--stay)"
    typer.echo(f"draining: withdrew {', '.join(r['withdrawing']) or 'nothing'}; {then}")


@app.command("frr-config")
def frr_config(config: str = typer.Option(..., "--config", "-c", help="Config file with [bgp].")):
    """Print the FRR config (zebra, bgpd, bfdd) that carries this node's [bgp] section:
    put it in /etc/frr/frr.conf (or merge it) and enable bgpd and bfdd."""
    from l4lb.routing.frr import node_config

    cfg = _load(config)
    if cfg.bgp is None:
        fail(f"{config}: no [bgp] section (ECMP mode); nothing for FRR to do", 1)
    typer.echo(node_config(cfg.bgp, cfg.node.name), nl=False)


@app.command()
def reload(config: Optional[str] = CONFIG_OPT, sock: Optional[str] = SOCKET_OPT):
    """Re-read the config file and apply the difference (like SIGHUP). A bad file changes
    nothing and says why."""
    r = _call(config, sock, "reload")
    typer.echo(f"reloaded: {r['vips']} VIPs, added {r['added'] or 'none'}, removed "
               f"{r['removed'] or 'none'}, changed {len(r.get('changed') or {}) or 'none'}")
    for key, what in (r.get("changed") or {}).items():
        typer.echo(f"  {key}: {', '.join(what)}")


@app.command()
def status(config: Optional[str] = CONFIG_OPT, sock: Optional[str] = SOCKET_OPT,
           json_out: bool = JSON_OPT):
    """VIPs and their reals with health, weight and ring membership; VRRP and sync state."""
    st = _call(config, sock, "status")
    if json_out:
        emit_json(st)
        return
    typer.echo(f"node {st['node']} (pid {st['pid']}, up {st['uptime_s']}s), XDP "
               f"{st['xdp_mode']} on {', '.join(st['interfaces'])}; holds "
               f"{', '.join(st['held_vips']) or 'no VIPs'}")
    for v in st["vips"]:
        typer.echo(f"\n{v['vip']}  mode {v['mode']}  hash {v['hash']}  ring {v['ring_size']}")
        typer.echo(f"  {'real':<28}{'weight':>7}  {'health':<7}{'ring':<6}{'mac':<19}check")
        for r in v["reals"]:
            typer.echo(f"  {r['address']:<28}{r['weight']:>7}  {'up' if r['up'] else 'DOWN':<7}"
                       f"{'yes' if r['in_ring'] else 'no':<6}{r['mac']:<19}"
                       f"{r['health']}: {r['last_check'] or '-'}")
    for a in st.get("vrrp") or []:
        typer.echo(f"\nvrrp {a.get('name')}: {a.get('state')} priority {a.get('priority')} "
                   f"master {a.get('master_address')}")
    if st.get("sync"):
        s = st["sync"]
        typer.echo(f"\nsync: {s.get('role')} peer {s.get('peers')} sent {s.get('entries_sent')} "
                   f"received {s.get('entries_received')} lag {s.get('lag_ms')} ms")
    if st.get("bgp"):
        _print_bgp(st["bgp"])


def _print_bgp(b: dict) -> None:
    state = "DRAINING" if b["draining"] else ("joined" if b["joined"] else "joining")
    typer.echo(f"\nbgp: AS {b['asn']} router id {b['router_id']}, {b['speaker']}"
               f"{'' if b['frr_up'] else ' NOT ANSWERING: ' + str(b['frr_error'])}; {state} "
               f"({b['join']}); announced: {', '.join(b['announced']) or 'nothing'}")
    for s in b["sessions"]:
        typer.echo(f"  neighbour {s['neighbor']:<26} AS {s['remote_as']}  {s['state']:<12}"
                   f"bfd {s['bfd'] or '-':<5} sent {s['prefixes_sent']}  flaps {s['flaps']}"
                   f"{'  last: ' + s['reason'] if s['reason'] and s['state'] != 'Established' else ''}")


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}P"


@app.command()
def stats(config: Optional[str] = CONFIG_OPT, sock: Optional[str] = SOCKET_OPT,
          json_out: bool = JSON_OPT,
          rate: bool = typer.Option(False, "--rate", help="Rates over --interval seconds."),
          watch: bool = typer.Option(False, "--watch", help="Refresh rates in place until "
                                                            "Ctrl-C."),
          interval: float = typer.Option(1.0, help="Seconds between samples.")):
    """Packets, bytes and new flows per VIP and real (like `ipvsadm -Ln --stats/--rate`)."""
    import time

    a = _call(config, sock, "stats")
    if not (rate or watch):
        if json_out:
            emit_json(a)
            return
        _print_stats(a, None)
        return
    while True:
        time.sleep(interval)
        b = _call(config, sock, "stats")
        rates = _rates(a, b)
        if json_out:
            emit_json(rates)
        else:
            if watch:
                typer.echo("\x1b[2J\x1b[H", nl=False)
            _print_stats(b, rates)
        if not watch:
            return
        a = b


def _rates(a: dict, b: dict) -> dict:
    dt = max(b["time"] - a["time"], 1e-6)
    prev = {v["vip"]: v for v in a["vips"]}
    out = {}
    for v in b["vips"]:
        p = prev.get(v["vip"])
        if not p:
            continue
        out[v["vip"]] = {f: (v[f] - p[f]) / dt for f in ("packets", "bytes", "new_flows")}
        pr = {r["address"]: r for r in p["reals"]}
        for r in v["reals"]:
            q = pr.get(r["address"])
            if q:
                out[f"{v['vip']} -> {r['address']}"] = {
                    f: (r[f] - q[f]) / dt for f in ("packets", "bytes", "new_flows")}
    return out


def _print_stats(s: dict, rates: Optional[dict]) -> None:
    head = "pkts/s   bytes/s  conns/s" if rates else "packets     bytes  conns"
    typer.echo(f"{'service / real':<44}{head}")
    for v in s["vips"]:
        for label, row in [(v["vip"], v)] + [(f"  -> {r['address']}", r) for r in v["reals"]]:
            key = v["vip"] if row is v else f"{v['vip']} -> {row['address']}"
            src = rates.get(key, {}) if rates else row
            typer.echo(f"{label:<44}{_human(src.get('packets', 0)):>7}"
                       f"{_human(src.get('bytes', 0)):>10}{_human(src.get('new_flows', 0)):>7}")
    g = s["global"]
    nz = {k: v for k, v in g.items() if v and not k.startswith(("tx_", "conn_"))}
    typer.echo(f"\nconn table: {g['conn_hit']} hits, {g['conn_miss']} new flows, "
               f"{g['conn_rescheduled']} rescheduled; forwarded dr {g['tx_dr']} tun "
               f"{g['tx_tun']}")
    if nz:
        typer.echo("passed/dropped: " + ", ".join(f"{k} {v}" for k, v in nz.items()))


@app.command()
def conns(config: Optional[str] = CONFIG_OPT, sock: Optional[str] = SOCKET_OPT,
          vip: Optional[str] = typer.Option(None, help="Only this VIP (10.0.0.1:80/tcp)."),
          limit: int = typer.Option(100, min=1, help="At most this many entries."),
          json_out: bool = JSON_OPT):
    """Entries of the connection table: client, VIP, and the real the flow is pinned to."""
    rows = _call(config, sock, "conns", vip=vip, limit=limit)
    if json_out:
        emit_json(rows)
        return
    typer.echo(f"{'proto':<6}{'client':<42}{'vip':<42}real")
    for r in rows:
        typer.echo(f"{r['proto']:<6}{r['client'] + ':' + str(r['cport']):<42}"
                   f"{r['vip'] + ':' + str(r['vport']):<42}{r['real']}")
    typer.echo(f"({len(rows)} shown)")


@vip_app.command("add")
def vip_add(address: str = typer.Argument(..., help="VIP address."),
            port: int = typer.Argument(..., help="Port; 0 = every port."),
            protocol: str = typer.Option("tcp", help="tcp or udp."),
            mode: str = typer.Option("dr", help="dr (MAC rewrite) or tun (IP-in-IP)."),
            hash: str = typer.Option("5tuple", help="5tuple, or source (persistence)."),
            ring_size: Optional[int] = typer.Option(
                None, help="Maglev table size, a prime (default 65537); at most the size "
                           "the daemon started with."),
            config: Optional[str] = CONFIG_OPT, sock: Optional[str] = SOCKET_OPT):
    """Add a virtual service (with no reals yet: add them with `l4lb real add`)."""
    r = _call(config, sock, "vip_add", address=address, port=port, protocol=protocol,
              mode=mode, hash=hash, ring_size=ring_size)
    typer.echo(f"VIPs: {', '.join(r['vips'])}")


@vip_app.command("del")
def vip_del(vip: str = typer.Argument(..., help="VIP as addr:port/proto."),
            config: Optional[str] = CONFIG_OPT, sock: Optional[str] = SOCKET_OPT):
    """Delete a virtual service."""
    r = _call(config, sock, "vip_del", vip=vip)
    typer.echo(f"VIPs: {', '.join(r['vips']) or 'none'}")


@real_app.command("add")
def real_add(vip: str = typer.Argument(..., help="VIP as addr:port/proto."),
             address: str = typer.Argument(..., help="Real server address."),
             weight: int = typer.Option(100, help="Weight 0..65535 (0 = drain)."),
             mac: Optional[str] = typer.Option(None, help="Next-hop MAC (default: ARP/ND)."),
             config: Optional[str] = CONFIG_OPT, sock: Optional[str] = SOCKET_OPT):
    """Add a real server to a VIP; new flows start reaching it at once."""
    _call(config, sock, "real_add", vip=vip, address=address, weight=weight, mac=mac)
    typer.echo(f"{address} added to {vip} with weight {weight}")


@real_app.command("del")
def real_del(vip: str = typer.Argument(...), address: str = typer.Argument(...),
             config: Optional[str] = CONFIG_OPT, sock: Optional[str] = SOCKET_OPT):
    """Remove a real server (its open flows are rescheduled; drain it first to avoid that)."""
    _call(config, sock, "real_del", vip=vip, address=address)
    typer.echo(f"{address} removed from {vip}")


@real_app.command("weight")
def real_weight(vip: str = typer.Argument(...), address: str = typer.Argument(...),
                weight: int = typer.Argument(..., help="0..65535"),
                config: Optional[str] = CONFIG_OPT, sock: Optional[str] = SOCKET_OPT):
    """Change a real's weight; open connections keep their real."""
    _call(config, sock, "real_weight", vip=vip, address=address, weight=weight)
    typer.echo(f"{address} of {vip}: weight {weight}")


@real_app.command("drain")
def real_drain(vip: str = typer.Argument(...), address: str = typer.Argument(...),
               config: Optional[str] = CONFIG_OPT, sock: Optional[str] = SOCKET_OPT):
    """Weight 0: no new flows, open connections carry on."""
    _call(config, sock, "real_drain", vip=vip, address=address)
    typer.echo(f"{address} of {vip}: draining")


@app.command()
def decap(iface: str = typer.Option(..., "--iface", "-i", help="The real server's interface."),
          mode: str = typer.Option("native", help="native or generic XDP."),
          remove: bool = typer.Option(False, "--remove", help="Detach instead.")):
    """On a real server in tunnel mode: strip the balancer's IPIP/IP6IP6 header in XDP.

    The inner packet goes up the stack to the VIP held on lo. Stays attached after
    this command exits; `--remove` takes it off."""
    import os

    from l4lb.dataplane import loader

    if os.geteuid() != 0:
        fail("l4lb decap needs root; run it with sudo", 2)
    try:
        from l4lb.netutil import ifindex

        ifindex(iface)
    except LookupError as e:
        fail(f"{e}; list interfaces with `ip link`", 2)
    if mode not in loader.XDP_MODES:
        fail(f"--mode: {mode!r} is not one of native, generic", 2)
    if remove:
        loader.detach_xdp(iface)
        typer.echo(f"decap removed from {iface}")
        return
    try:
        prog = loader.compile_decap()
        prog.attach(iface, mode)
    except loader.DataplaneError as e:
        fail(str(e), 1)
    typer.echo(f"decap attached to {iface} ({mode} XDP)")


# ------------------------------------------------------------------- lab
def _lab():
    """l4lb.lab lives in the source checkout only (the wheel does not ship it)."""
    try:
        import l4lb.lab as lab
    except ModuleNotFoundError as e:
        if e.name != "l4lb.lab":
            raise
        fail("the lab ships with the source checkout, not with the installed package: "
             "git clone the l4lb repository, then run `make demo` (or `.venv/bin/l4lb lab up`) in it")
    return lab


@lab_app.command("up")
def lab_up(
    prefix: str = typer.Option("l4lab", help="Name prefix of the lab's namespaces."),
    clients: int = typer.Option(1, help="Number of client nodes."),
    balancers: int = typer.Option(2, help="Number of balancer nodes."),
    reals: int = typer.Option(3, help="Number of real-server nodes."),
    mtu: int = typer.Option(1500, help="MTU of every lab link."),
    json_out: bool = typer.Option(False, "--json", help="Print the lab as JSON."),
):
    """Build a lab that stays up until `l4lb lab down`."""
    lab_mod = _lab()
    Lab, LabError = lab_mod.Lab, lab_mod.LabError

    try:
        lab = Lab(prefix, clients=clients, balancers=balancers, reals=reals, mtu=mtu,
                  persistent=True).up()
    except LabError as e:
        fail(str(e))
    _print_labs([lab.status()], json_out)
    if not json_out:
        typer.echo(f"\nRun a command in a node: nsenter --net=/run/netns/{prefix}-client1 curl "
                   f"http://10.99.0.31/\nTear it down: l4lb lab down --prefix {prefix}")


@lab_app.command("down")
def lab_down(prefix: str = typer.Option("l4lab", help="Name prefix of the lab to remove.")):
    """Remove a lab: its processes, namespaces and state."""
    lab_mod = _lab()
    LabError, check_environment, destroy = lab_mod.LabError, lab_mod.check_environment, lab_mod.destroy

    try:
        check_environment()
    except LabError as e:
        fail(str(e))
    removed = destroy(prefix)
    typer.echo(f"removed {len(removed)} namespaces of lab '{prefix}'")


@lab_app.command("status")
def lab_status(
    prefix: Optional[str] = typer.Option(None, help="Only this lab."),
    json_out: bool = typer.Option(False, "--json", help="Print as JSON."),
):
    """List labs with their nodes, addresses and MACs."""
    live_labs = _lab().live_labs

    labs = [lab for lab in live_labs() if prefix is None or lab["prefix"] == prefix]
    _print_labs(labs, json_out)


def _print_labs(labs: list[dict], json_out: bool) -> None:
    if json_out:
        emit_json(labs)
        return
    if not labs:
        typer.echo("no labs")
        return
    for lab in labs:
        owner = "l4lb lab up" if lab.get("owner_pid") is None else f"pid {lab['owner_pid']}"
        typer.echo(f"lab {lab['prefix']} (owner: {owner}, VIPs: {', '.join(lab['vips'])})")
        typer.echo(f"  {'node':<10}{'role':<10}{'netns':<20}{'ipv4':<14}{'ipv6':<12}mac")
        for n in lab["nodes"]:
            typer.echo(f"  {n['name']:<10}{n['role']:<10}{n['netns']:<20}{n['ipv4']:<14}"
                       f"{n['ipv6']:<12}{n['mac']}")


IMPORT_FILES = typer.Argument(..., metavar="[keepalived|haproxy] FILE...",
                              help="keepalived.conf and/or haproxy.cfg (format detected, or named first).")
IMPORT_IFACES = typer.Option(None, "--interface", "-i",
                             help="[node] interfaces (default: the VRRP interfaces).")
IMPORT_VIPS = typer.Option(None, "--vip", help="VIP address for HAProxy wildcard binds (default: the "
                                               "keepalived virtual_ipaddress).")


@app.command("import")
def import_config(
    files: list[str] = IMPORT_FILES,
    node: Optional[str] = typer.Option(None, "--node", "-n",
                                       help="[node] name (default: router_id); also keepalived's config id."),
    interface: Optional[list[str]] = IMPORT_IFACES,
    config_id: Optional[str] = typer.Option(None, "--config-id",
                                            help="Which keepalived @ID lines apply (keepalived -i)."),
    vip: Optional[list[str]] = IMPORT_VIPS,
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Write the TOML here (default: stdout)."),
):
    """Convert keepalived / HAProxy configs to an l4lb config; report what differs on stderr."""
    from l4lb.importer.cli import run

    raise typer.Exit(run(files, node=node, interfaces=interface or [], config_id=config_id,
                         vips=vip or [], output=output))


def main() -> None:
    from l4lb.errors import L4lbError

    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except L4lbError as e:  # a module's error for the user: its message, no traceback
        typer.echo(f"l4lb: error: {e}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
