"""ECMP mode in the daemon: the few things daemon.py asks of routing.

Kept here so that daemon.py only calls in: start routing once the data plane is
attached, drain (withdraw, keep forwarding drain_s, stop), and the start check
that FRR is installed and running.
"""

from __future__ import annotations

import asyncio
import logging

from l4lb.routing import announce, frr
from l4lb.routing.service import Routing

log = logging.getLogger("l4lb.routing")


async def check_frr(bgp) -> str | None:
    """None when FRR answers; else what is wrong and how to fix it (for `l4lb start`)."""
    try:
        await frr.version(bgp)
    except frr.FrrError as e:
        return f"bgp: {e}"
    try:  # zebra alone answers `show version`: bgpd must answer too
        await frr.sessions(bgp)
    except frr.FrrError as e:
        return f"bgp: FRR runs but bgpd does not answer ({getattr(e, 'detail', e)}); " \
               "enable bgpd=yes (and bfdd=yes) in /etc/frr/daemons and restart FRR"
    return None


def _attached(daemon) -> bool:
    prog = daemon.prog
    return bool(daemon.ready and prog is not None and all(
        prog.attached.get(i) is not None for i in daemon.cfg.node.interfaces))


def _real_live(daemon, key: str, addr: str) -> bool:
    vs = daemon.tables.vips.get(key) if daemon.tables else None
    rs = vs.reals.get(addr) if vs else None
    return rs is not None and not rs.down  # down: health says so, or no MAC yet


async def start(daemon) -> Routing:
    """Routing for `daemon` (data plane attached, sync started): announces what the node
    can serve once it has joined."""
    sync = daemon.sync
    r = Routing(daemon.cfg.bgp,
                servable=lambda: announce.servable(
                    daemon.cfg.vips, lambda k, a: _real_live(daemon, k, a), _attached(daemon)),
                sync_status=(lambda: sync.status()) if sync is not None else (lambda: None))
    await r.start()
    return r


async def drain(daemon, stop: bool = True) -> dict:
    """Withdraw every VIP now; forwarding goes on for bgp.drain_s (flows move to the other
    nodes by ECMP rehash; Maglev and sync keep them on their reals); then stop."""
    r = daemon.routing
    if r is None:
        raise ValueError("drain needs ECMP mode (a [bgp] section); in VRRP mode stop the "
                         "daemon and the backup takes over")
    if not r.draining:
        r.drain()
        if stop:
            async def later():
                await asyncio.sleep(daemon.cfg.bgp.drain_s)
                log.info("routing: drained for %gs; stopping", daemon.cfg.bgp.drain_s)
                daemon.stop_event.set()
            daemon._drain_task = asyncio.create_task(later(), name="drain")
    return {"draining": True, "drain_s": daemon.cfg.bgp.drain_s, "stop": stop,
            "withdrawing": sorted(r.announcer.announced)}


__all__ = ["check_frr", "drain", "start"]
