"""FRR: config text for a balancer node and for the lab router; vtysh queries.

Only text and JSON here: the daemon runs vtysh (async) and hands the output to
the parsers, so they are unit-tested without FRR.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass

from l4lb.config.bgp import BgpConfig
from l4lb.errors import L4lbError

ROUTE_MAP = "L4LB-VIPS"
BFD_PROFILE = "l4lb"
INSTALL_HINT = ("install FRR with `apt-get install frr` and enable bgpd=yes, bfdd=yes in "
                "/etc/frr/daemons")


class FrrError(L4lbError):
    """FRR cannot be asked: not installed, not running, or an answer we cannot read."""


def _family_af(addr) -> str:
    return "ipv4" if ipaddress.ip_address(addr).version == 4 else "ipv6"


def node_config(bgp: BgpConfig, hostname: str, vips: Iterable = ()) -> str:
    """frr.conf for a balancer node (zebra + bgpd + bfdd). `vips`: addresses that get
    their own route attributes (bgp.vip, or any when default communities/MED are set).

    Announcements are the node's kernel routes via lo (l4lb adds them, protocol 250);
    the route-map keeps every other kernel route out of BGP."""
    out = ["frr defaults datacenter", f"hostname {hostname}", "!"]
    seq = 10
    maps = []
    for v in bgp.vip:
        af = _family_af(v.address)
        plen = 32 if af == "ipv4" else 128
        pl = f"L4LB-VIP-{seq}"
        ipkw = "ip" if af == "ipv4" else "ipv6"
        out.append(f"{ipkw} prefix-list {pl} seq 5 permit {v.address}/{plen}")
        comms, med = bgp.attrs(v.address)
        maps.append((seq, [" match interface lo", f" match {ipkw} address prefix-list {pl}"],
                     comms, med))
        seq += 10
    maps.append((1000, [" match interface lo"], bgp.communities, bgp.med))
    for s, matches, comms, med in maps:
        out.append(f"route-map {ROUTE_MAP} permit {s}")
        out += matches
        if comms:
            out.append(f" set community {' '.join(comms)}")
        if med is not None:
            out.append(f" set metric {med}")
        out.append("exit")
    out.append("!")
    out += [f"router bgp {bgp.asn}", f" bgp router-id {bgp.router_id}",
            " no bgp ebgp-requires-policy", " no bgp default ipv4-unicast",
            f" timers bgp {bgp.keepalive_s} {bgp.hold_s}"]
    for n in bgp.neighbor:
        out.append(f" neighbor {n.address} remote-as {n.asn}")
        if n.password:
            out.append(f" neighbor {n.address} password {n.password}")
        if bgp.bfd and n.bfd:
            out.append(f" neighbor {n.address} bfd profile {BFD_PROFILE}")
    for af in ("ipv4", "ipv6"):
        out += [f" address-family {af} unicast", f"  redistribute kernel route-map {ROUTE_MAP}"]
        out += [f"  neighbor {n.address} activate" for n in bgp.neighbor
                if _family_af(n.address) == af]
        out.append(" exit-address-family")
    out += ["exit", "!"]
    if bgp.bfd:
        out += ["bfd", f" profile {BFD_PROFILE}", f"  receive-interval {bgp.bfd_rx_ms}",
                f"  transmit-interval {bgp.bfd_tx_ms}",
                f"  detect-multiplier {bgp.bfd_multiplier}", " exit", "exit", "!"]
    return "\n".join(out) + "\n"


@dataclass(frozen=True)
class RouterPeer:
    address: str
    asn: int
    password: str | None = None


def router_config(asn: int, router_id: str, peers: Iterable[RouterPeer], *,
                  bfd: tuple[int, int, int] | None = (300, 300, 3), max_paths: int = 16,
                  hostname: str = "router", passive: bool = True) -> str:
    """frr.conf for the lab's upstream router: eBGP to every balancer, ECMP over them
    (maximum-paths; the kernel hashes on L4 with fib_multipath_hash_policy=1). Passive:
    the balancers connect, so no connection collision hides why a session is refused."""
    out = ["frr defaults datacenter", f"hostname {hostname}", "!", f"router bgp {asn}",
           f" bgp router-id {router_id}", " no bgp ebgp-requires-policy",
           " no bgp default ipv4-unicast", " bgp bestpath as-path multipath-relax",
           " timers bgp 3 9"]
    peers = list(peers)
    for p in peers:
        out.append(f" neighbor {p.address} remote-as {p.asn}")
        if passive:
            out.append(f" neighbor {p.address} passive")
        if p.password:
            out.append(f" neighbor {p.address} password {p.password}")
        if bfd:
            out.append(f" neighbor {p.address} bfd profile {BFD_PROFILE}")
    for af in ("ipv4", "ipv6"):
        out += [f" address-family {af} unicast", f"  maximum-paths {max_paths}"]
        out += [f"  neighbor {p.address} activate" for p in peers
                if _family_af(p.address) == af]
        out.append(" exit-address-family")
    out += ["exit", "!"]
    if bfd:
        rx, tx, mult = bfd
        out += ["bfd", f" profile {BFD_PROFILE}", f"  receive-interval {rx}",
                f"  transmit-interval {tx}", f"  detect-multiplier {mult}", " exit", "exit", "!"]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------ vtysh

def vtysh_argv(vtysh: str, pathspace: str | None, *commands: str) -> list[str]:
    argv = [vtysh]
    if pathspace:
        argv += ["-N", pathspace]
    for c in commands:
        argv += ["-c", c]
    return argv


async def vtysh(bgp: BgpConfig, *commands: str, timeout: float = 5.0) -> str:
    """Run vtysh (never blocks the loop); FrrError says what is wrong and how to fix it."""
    if shutil.which(bgp.vtysh) is None:
        raise FrrError(f"FRR is not installed ({bgp.vtysh} not found); {INSTALL_HINT}")
    argv = vtysh_argv(bgp.vtysh, bgp.frr_pathspace, *commands)
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE,
                                                stdin=asyncio.subprocess.DEVNULL)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise FrrError(f"vtysh did not answer in {timeout:g}s") from None
    text, etext = out.decode(errors="replace"), err.decode(errors="replace")
    # vtysh -N warns about a missing per-pathspace vtysh.conf on stderr: harmless.
    problem = "\n".join(ln for ln in etext.splitlines() if "vtysh.conf" not in ln).strip()
    if proc.returncode != 0 or "failed to connect" in (text + problem).lower():
        where = f" (pathspace {bgp.frr_pathspace})" if bgp.frr_pathspace else ""
        detail = (problem or text).strip()[:200].rstrip(".")
        err = FrrError(f"FRR is not running{where}: {detail}; start it (systemctl start "
                       f"frr, or zebra/bgpd/bfdd -N NAME), {INSTALL_HINT}")
        err.detail = detail
        raise err
    return text


def parse_json(text: str, what: str):
    try:
        return json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        raise FrrError(f"{what}: FRR's answer is not JSON: {text.strip()[:200]}") from None


@dataclass
class Session:
    neighbor: str
    state: str  # BGP FSM state: Established, Active, Connect, OpenSent, Idle, ...
    remote_as: int | None = None
    uptime_s: float | None = None
    established: int = 0  # sessions established / dropped since bgpd started
    dropped: int = 0
    reason: str | None = None  # last reset / notification, FRR's words
    notified: bool = False  # reason is a NOTIFICATION exchanged with the neighbour
    prefixes_sent: int | None = None
    bfd: str | None = None  # up, down, init, ... (None: no BFD)

    @property
    def up(self) -> bool:
        return self.state == "Established"

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("neighbor", "state", "remote_as", "uptime_s",
                                              "established", "dropped", "reason",
                                              "prefixes_sent", "bfd")}


def parse_neighbors(neighbors: dict, bfd_peers: list | None = None) -> dict[str, Session]:
    """`show bgp neighbors json` (+ `show bfd peers json`) -> Session by neighbour address."""
    bfd = {}
    for p in bfd_peers or []:
        if isinstance(p, dict) and "peer" in p:
            bfd[str(ipaddress.ip_address(p["peer"]))] = p.get("status")
    out = {}
    for addr, n in (neighbors or {}).items():
        if not isinstance(n, dict):
            continue
        try:
            key = str(ipaddress.ip_address(addr))
        except ValueError:
            continue
        sent = None
        for af in (n.get("addressFamilyInfo") or {}).values():
            if isinstance(af, dict) and "sentPrefixCounter" in af:
                sent = (sent or 0) + int(af["sentPrefixCounter"])
        # A NOTIFICATION (refused: wrong AS...) says why; else FRR's last reset cause.
        notified = bool(n.get("lastNotificationReason"))
        reason = n.get("lastNotificationReason") or n.get("lastResetDueTo")
        up_ms = n.get("bgpTimerUpMsec")
        out[key] = Session(
            neighbor=key, state=str(n.get("bgpState", "unknown")),
            remote_as=n.get("remoteAs"),
            uptime_s=round(up_ms / 1000, 1) if isinstance(up_ms, int) and
            n.get("bgpState") == "Established" else None,
            established=int(n.get("connectionsEstablished", 0) or 0),
            dropped=int(n.get("connectionsDropped", 0) or 0),
            reason=reason, notified=notified, prefixes_sent=sent, bfd=bfd.get(key))
    return out


def parse_version(text: str) -> str:
    """`show version` -> "FRRouting 8.4.4"."""
    for ln in text.splitlines():
        if ln.startswith("FRRouting"):
            return " ".join(ln.split()[:2])
    return text.strip().splitlines()[0] if text.strip() else "FRR (unknown version)"


async def sessions(bgp: BgpConfig) -> dict[str, Session]:
    text = await vtysh(bgp, "show bgp neighbors json")
    neigh = parse_json(text, "show bgp neighbors json")
    bfd_peers = None
    if bgp.bfd:
        try:
            bfd_peers = parse_json(await vtysh(bgp, "show bfd peers json"), "show bfd peers")
        except FrrError:
            bfd_peers = None  # bfdd down: sessions still say what BGP knows
    return parse_neighbors(neigh, bfd_peers if isinstance(bfd_peers, list) else None)


async def version(bgp: BgpConfig) -> str:
    return parse_version(await vtysh(bgp, "show version"))


__all__ = ["FrrError", "RouterPeer", "Session", "node_config", "parse_json", "parse_neighbors",
           "parse_version", "router_config", "sessions", "version", "vtysh", "vtysh_argv"]
