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
    help="A throw-away test network of namespaces: clients, balancers and reals on one bridge.",
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


# ------------------------------------------------------------------- lab
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
    from l4lb.lab import Lab, LabError

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
    from l4lb.lab import LabError, check_environment, destroy

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
    from l4lb.lab import live_labs

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


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
