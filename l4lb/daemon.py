"""`l4lb start`: one balancer node in one asyncio loop.

Loads the data plane (pinned maps: a restarted daemon reattaches and keeps the
conn table), programs VIPs and reals from the config, health-checks the reals,
and serves the local API and the metrics endpoint. VRRP, when configured, decides
whether this node holds the VIPs; without it the node holds them itself.

Every change, from the API or a reload, is a new validated Config handed to
`apply()`, which diffs it into the maps; an invalid change is refused whole.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import os
import shutil
import signal
import socket
import time
from pathlib import Path

from l4lb import maglev, netutil, scripts
from l4lb.config import (
    Capacity,
    Config,
    ConfigError,
    check_capacity,
    check_system,
    config_warnings,
    hc_via,
    load_config,
)
from l4lb.config.incremental import Changes
from l4lb.dataplane import fill, loader
from l4lb.dataplane import maps as M
from l4lb.dataplane.plan import check_fits
from l4lb.dataplane.tables import ServiceTables, TablesError
from l4lb.errors import L4lbError
from l4lb.health import HealthChecker

log = logging.getLogger("l4lb")
NO_MAC = "00:00:00:00:00:00"
STATE_ROOT = "/run/l4lb"


class DaemonError(L4lbError):
    """The daemon cannot start or go on; the message says why."""


class NotReady(Exception):
    """A request came before the data plane is loaded (the XDP program compiles)."""

    def __init__(self) -> None:
        super().__init__("starting: the XDP program is still compiling; retry in a few seconds")


def private_dir(path: Path) -> None:
    """Create `path` (and parents) mode 0700, or make an existing one 0700: it holds the
    root-only API socket and the id state."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise DaemonError(f"{path} is not a directory; move it away")
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)


def build_options(cfg: Config) -> loader.BuildOptions:
    ring_max = max([65537] + [v.ring_size for v in cfg.vips])
    return loader.BuildOptions(conn_table_size=cfg.node.conn_table_size, ring_max=ring_max,
                               pin_dir=pin_dir(cfg, ring_max))


def pin_dir(cfg: Config, ring_max: int = 65537) -> str:
    # Sizes are part of the path: a pinned map of another size is another layout.
    base = loader.pin_dir_for(cfg.node.pin_path, cfg.node.name)
    return f"{base}-r{ring_max}-c{cfg.node.conn_table_size}"


def state_dir(cfg: Config) -> Path:
    return Path(STATE_ROOT) / cfg.node.name


def sd_notify(msg: str) -> None:
    """systemd Type=notify readiness (no-op outside systemd)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.connect(addr)
            s.sendall(msg.encode())
        except OSError as e:
            log.warning("sd_notify failed: %s", e)


class Daemon:
    def __init__(self, cfg: Config, config_path: str | None = None):
        self.cfg = cfg
        self.config_path = config_path
        self.started = time.time()
        self.prog: loader.Program | None = None
        self.ring_fill = None  # the kernel's Maglev fill (l4lb.dataplane.fill), if it loaded
        self.tables: ServiceTables | None = None
        scripts.configure(cfg.node.script_security)  # health, track and notify scripts
        # Probes bind to the node's own address, never a VIP: a real would answer a
        # probe from the VIP to itself (it holds the VIP on lo).
        self.health = HealthChecker(self._on_health, source=netutil.SourcePicker(
            cfg.node.interfaces, avoid=lambda: [v.address for v in self.cfg.vips] +
            [i.ip for inst in self.cfg.vrrp for i in inst.vips]))
        self.macs: dict[str, str] = {}
        self._resolving: dict[str, asyncio.Future] = {}  # one ARP/ND resolution per address
        # ARP/ND waits (up to 1 s each, mostly asleep) get their own threads, so that
        # silent reals never hold up the default pool (validation, map walks).
        self._arp_pool = concurrent.futures.ThreadPoolExecutor(16, thread_name_prefix="arp")
        # What apply() last wrote per VIP key: a VIP whose signature is unchanged is
        # not rewritten.
        self._applied: dict[str, tuple] = {}  # key -> (VipConfig, MAC version, signature)
        self._mac_version = 0  # bumped whenever a MAC is learnt
        self._sig_memo: dict[str, tuple] = {}  # key -> (VipConfig, MAC version, signature)
        self._changes = Changes()  # validates API changes by what they touch
        # What health.sync is given, (VIP key, real) -> check config, and the VipConfig
        # objects it was made from: kept up to date by what changed (_health_wanted).
        self._hc_wanted: dict[tuple[str, str], object] = {}
        self._hc_vips: dict[str, object] = {}
        self.ready = False  # set once the maps are programmed and XDP is attached
        self.stop_event = asyncio.Event()
        self.full_stop = False  # `l4lb stop`: detach and remove pins too
        self.held_vips: set[str] = set()
        self.vrrp = []  # VrrpAgent instances
        self.sync = None
        self.routing = None  # l4lb.routing.service.Routing in ECMP mode ([bgp])
        self.metrics_server = None
        self.api_server = None
        self.reloads = 0
        self._lock = asyncio.Lock()
        self._saved_down: set[tuple[str, str]] = set()  # (VIP key, real) DOWN at the last stop
        self.hc_tunnel: loader.HcTunnel | None = None  # tc programs of tunnel health checks
        self._hc_compiled: loader.HcTunnel | None = None  # compiled at start, not attached
        self._hc_marks: dict = {}  # what hc_tunnel.tunnels holds: probe mark -> VIP address
        self.health.mark_for = self._hc_mark

    # ------------------------------------------------------------ lifecycle
    async def run(self) -> int:
        if self.cfg.node.pin_path.startswith(loader.BPFFS + "/"):
            loader.ensure_bpffs()  # a fresh host often has none mounted
        errs = check_system(self.cfg)
        if self.cfg.bgp is not None and not errs:  # FRR must answer, or nothing is announced
            from l4lb.routing import node as ecmp  # noqa: PLC0415
            errs = [e for e in [await ecmp.check_frr(self.cfg.bgp)] if e]
        if errs:
            raise DaemonError("; ".join(errs))
        for w in config_warnings(self.cfg):
            log.warning("config: %s", w)
        opts = build_options(self.cfg)
        sdir = state_dir(self.cfg)
        private_dir(Path(STATE_ROOT))  # also fixes a 0755 one left by an older version
        private_dir(sdir)
        reattach = Path(opts.pin_dir).exists() and (sdir / "tables.json").exists()
        # Sockets first: a port in use fails the start before anything is attached.
        from l4lb import api, metrics  # noqa: PLC0415 - keep import of prometheus lazy
        self.api_server = await api.serve(self)
        if self.cfg.metrics.enabled:
            try:
                self.metrics_server = await metrics.serve(self)
            except RuntimeError:
                self.api_server.close()
                Path(self.cfg.node.api_socket).unlink(missing_ok=True)
                raise
        log.info("compiling the XDP program (%s)", "reattaching to pinned maps" if reattach
                 else "fresh maps")
        self.prog = await asyncio.to_thread(loader.compile_balancer, opts)
        # Rings filled by the kernel's JIT, about half numpy's time on a ring update
        # (bench/control.py); numpy stays the fallback with the same tables.
        self.ring_fill = await asyncio.to_thread(fill.enable, opts.ring_max, opts.max_reals)
        # The tunnel health check's tc program compiles now, not under apply: status
        # answers once the maps are loaded. (One after the other: bcc is not thread-safe.)
        if any(hc_via(v, r) == "tunnel" for v in self.cfg.vips for r in v.reals):
            self._hc_compiled = await asyncio.to_thread(_compile_hc)
        self.tables = ServiceTables(self.prog, opts, state_file=str(sdir / "tables.json"))
        # Health verdicts of the previous run (tables.json): a real that was DOWN starts
        # DOWN and needs `rise` passes; one down only for want of a MAC is not a verdict.
        self._saved_down = {(k, a) for k, vs in self.tables.vips.items()
                            for a, r in vs.reals.items() if r.down and r.mac != NO_MAC}
        await self._set_dp_config()
        await self._resolve_macs(self._unknown_macs(self.cfg))
        await self.apply(self.cfg, initial=True)
        for ifname in self.cfg.node.interfaces:
            self.prog.attach(ifname, self.cfg.node.xdp_mode)
            log.info("XDP attached to %s (%s mode)", ifname, self.cfg.node.xdp_mode)
        for gone in loader.remove_stale_pins(opts.pin_dir):  # after an upgrade or a resize
            log.warning("removed the pinned maps of an older layout or size: %s", gone)
        await self._start_ha()
        if not self.vrrp and self.cfg.bgp is None:  # ECMP: XDP takes VIP traffic, no address
            await self._hold_vips(True)
        if self.cfg.bgp is not None:  # ECMP: announce what this node serves, once joined
            from l4lb.routing import node as ecmp  # noqa: PLC0415
            self.routing = await ecmp.start(self)
        # Start-up's objects (bcc, numpy, the tables) live as long as the daemon: out
        # of the collector's reach, full collections stay short (VRRP child: runner.py).
        gc.freeze()
        self.ready = True  # changes from here on (their VIP holding depends on self.vrrp)
        tasks = [asyncio.create_task(self._resolver_loop())]
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on_sigterm)
        loop.add_signal_handler(signal.SIGINT, self.stop_event.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: tasks.append(
            asyncio.create_task(self._sighup())))
        sd_notify("READY=1")
        log.info("l4lb %s ready: %d VIPs on %s", self.cfg.node.name, len(self.cfg.vips),
                 ",".join(self.cfg.node.interfaces))
        await self.stop_event.wait()
        sd_notify("STOPPING=1")
        for t in tasks:
            t.cancel()
        await self.shutdown()
        return 0

    async def _start_ha(self) -> None:
        """VRRP and sync, when configured (wired by their modules)."""
        if self.cfg.sync.enabled:
            from l4lb.sync.agent import SyncAgent  # noqa: PLC0415
            # Sync first, so that VRRP's first transition finds it. Backup until
            # VRRP says otherwise; without VRRP this node is the master.
            self.sync = SyncAgent(self.cfg.sync, self.cfg.node.name, self.tables, self.prog,
                                  role="backup" if self.cfg.vrrp else "master")
            await self.sync.start()
        if self.cfg.vrrp:
            from l4lb.vrrp.runner import VrrpProcess  # noqa: PLC0415
            # The agents run in a process of their own (real time if configured): nothing
            # here, not even the GIL, can delay an advert. Transitions come back to this
            # loop, in order; iterating gives each instance's status() (a snapshot).
            self.vrrp = VrrpProcess(self.cfg.vrrp, on_state=self._on_vrrp_state,
                                    rt_priority=self.cfg.node.vrrp_rt_priority)
            await self.vrrp.start()

    def _on_vrrp_state(self, old, new, instance: str | None = None) -> None:
        log.info("vrrp %s: %s -> %s", instance or "", old, new)
        # Sync follows the instance named by sync.vrrp_instance: its master sends.
        if self.sync is not None and instance in (None, self.cfg.sync.vrrp_instance):
            self.sync.set_role("master" if new == "master" else "backup")

    def _on_sigterm(self) -> None:
        """SIGTERM: in ECMP mode a graceful leave (withdraw, forward drain_s, stop)."""
        if self.routing is not None and not self.routing.draining:
            asyncio.ensure_future(self.drain())
        else:
            self.stop_event.set()

    async def drain(self, stop: bool = True) -> dict:
        """`l4lb drain`: withdraw every VIP, keep forwarding bgp.drain_s, then stop."""
        from l4lb.routing import node as ecmp  # noqa: PLC0415
        return await ecmp.drain(self, stop)

    async def shutdown(self) -> None:
        if self.routing is not None:  # withdrawn first: the router stops sending here
            try:
                await self.routing.stop(withdraw=True)
            except Exception as e:  # noqa: BLE001 - stopping anyway
                log.warning("routing stop: %s", e)
        self.health.stop()
        if self.hc_tunnel is not None:  # no probes without the daemon
            for ifname in self.hc_tunnel.attached:
                try:
                    loader.detach_hc_tunnel(ifname)
                except Exception as e:  # noqa: BLE001 - stopping anyway
                    log.warning("removing the tunnel health check from %s: %s", ifname, e)
        if self.vrrp:  # a master sends priority 0 and drops its VIPs, then the VRRP process exits
            try:
                await self.vrrp.stop(graceful=True)
            except Exception as e:  # noqa: BLE001 - stopping anyway
                log.warning("vrrp stop: %s", e)
        if self.sync is not None:
            try:
                await self.sync.stop()
            except Exception as e:  # noqa: BLE001 - stopping anyway
                log.warning("sync stop: %s", e)
        if self.api_server:
            self.api_server.close()
            Path(self.cfg.node.api_socket).unlink(missing_ok=True)
        if self.metrics_server:
            self.metrics_server.close()
        if self.full_stop:
            await self._hold_vips(False)
            for ifname in self.cfg.node.interfaces:
                loader.detach_xdp(ifname)
            loader.remove_pins(self.tables.opts.pin_dir if self.tables else pin_dir(self.cfg))
            shutil.rmtree(state_dir(self.cfg), ignore_errors=True)
            log.info("stopped: XDP detached, pins and VIP addresses removed")
        else:
            # SIGTERM (restart, upgrade): the XDP program keeps forwarding from the
            # pinned maps until the next `l4lb start` takes over.
            log.info("stopped; XDP stays attached and pinned (use `l4lb stop` to remove it)")
        if self.ring_fill:
            maglev.set_fill_engine(None)
            self.ring_fill.close()
        if self.prog:
            self.prog.close()

    # ---------------------------------------------------------- the program
    async def _set_dp_config(self) -> None:
        src4 = src6 = None
        for ifname in self.cfg.node.interfaces:
            for ip in await asyncio.to_thread(netutil.iface_addresses, ifname):
                if ip.version == 4 and not src4:
                    src4 = str(ip)
                if ip.version == 6 and not src6:
                    src6 = str(ip)
        macs = {}
        for ifname in self.cfg.node.interfaces:
            macs[netutil.ifindex(ifname)] = await asyncio.to_thread(netutil.link_mac, ifname)
        self.tables.set_own_macs(macs)
        self.tables.set_config(tun_src4=src4, tun_src6=src6,
                               flow_events=self.cfg.sync.enabled,
                               conn_timeout_s=self.cfg.node.conn_timeout_s)
        loader.set_flow_guard(self.prog.map("flow_guard_cfg"), self.cfg.node.new_flow_rate)

    def _mac_for(self, real) -> str:
        if real.mac:
            return real.mac
        return self.macs.get(str(real.address), NO_MAC)

    def _unknown_macs(self, cfg: Config) -> set[str]:
        return {str(r.address) for v in cfg.vips for r in v.reals
                if not r.mac and self.macs.get(str(r.address), NO_MAC) == NO_MAC}

    async def _resolve_macs(self, addrs) -> bool:
        """ARP/ND for `addrs` in parallel, never under the lock (up to 1 s each); callers
        asking for the same address share one resolution. True if a MAC was learnt."""
        loop = asyncio.get_running_loop()
        futs = []
        for a in sorted(addrs):
            fut = self._resolving.get(a)
            if fut is None:
                fut = loop.run_in_executor(self._arp_pool, netutil.resolve_mac, a, 1.0)
                self._resolving[a] = fut
                fut.add_done_callback(lambda _f, a=a: self._resolving.pop(a, None))
            futs.append((a, fut))
        learnt = False
        for addr, fut in futs:
            try:
                mac = await asyncio.shield(fut)
            except Exception as e:  # noqa: BLE001 - an unresolvable real stays out of the ring
                log.warning("resolving the MAC of real %s failed: %s", addr, e)
                mac = None
            if mac and self.macs.get(addr) != mac:
                self.macs[addr] = mac
                self._mac_version += 1
                learnt = True
            elif not mac:
                log.warning("cannot resolve the MAC of real %s: it stays out of the ring until "
                            "it answers ARP/ND (or set vip.real.mac)", addr)
        return learnt

    def _capacity(self) -> Capacity:
        o = self.tables.opts
        return Capacity(max_vips=o.max_vips, max_real_ids=o.max_reals - 1, ring_max=o.ring_max)

    def _signature(self, v) -> tuple:
        """What the maps hold of VIP `v`; its last element is set_reals' argument. The
        last one made per VIP is kept: _plan and the write after it need the same."""
        memo = self._sig_memo.get(v.key)
        made = {}
        if memo is not None and memo[1] == self._mac_version:
            if memo[0] is v:
                return memo[2]
            # the reals that are the very objects they were (an API change reuses them)
            made = {id(r): t for r, t in zip(memo[0].reals, memo[2][4], strict=True)}
        sig = (v.mode, v.hash, v.ring_size, v.all_down,
               tuple(made.get(id(r)) or (str(r.address), self._mac_for(r), r.weight)
                     for r in v.reals))
        self._sig_memo[v.key] = (v, self._mac_version, sig)
        return sig

    def _unchanged(self, v) -> bool:
        """Is VIP `v` in the maps as written last? Cheap when neither its config nor any
        MAC changed (4,000 reals: no string building per change)."""
        prev = self._applied.get(v.key)
        if prev is None:
            return False
        pv, version, sig = prev
        if version == self._mac_version and pv == v:
            return True
        return sig == self._signature(v)

    def _plan(self, cfg: Config, initial: bool) -> tuple[list[str], list]:
        """(VIP keys to delete, VIPs to write), after checking that everything new fits
        the compiled maps: nothing is deleted before the whole change is known to fit."""
        t = self.tables
        errs = check_capacity(cfg, self._capacity())
        want = {v.key: v for v in cfg.vips}
        deletes = [k for k in t.vips if k not in want]
        writes = [v for v in cfg.vips if initial or v.key not in t.vips
                  or not self._unchanged(v)]
        # Real ids: the planner's rule (deleted reals keep theirs while connections may
        # use them), checked for the whole change before anything is written.
        need, free = check_fits(t.vips, t.opts.max_reals,
                                [(v.key, (a for a, _, _ in self._signature(v)[4]))
                                 for v in writes], deletes)
        if need > free:
            errs.append(f"real ids: this change needs {need} new real ids but {free} of "
                        f"{t.opts.max_reals - 1} (MAX_REALS - 1) are free; ids of deleted reals "
                        "are freed once no connection names them (checked every 30 s)")
        if errs:
            raise ConfigError(errs)
        return deletes, writes

    async def apply(self, cfg: Config, initial: bool = False) -> None:
        """Make the maps match `cfg` (validated already)."""
        async with self._lock:
            await self._apply_locked(cfg, initial)

    async def _apply_locked(self, cfg: Config, initial: bool = False) -> None:
        """Under self._lock: write `cfg` to the maps, then publish it as self.cfg.
        All or nothing: a change that does not fit raises ConfigError before any write."""
        t = self.tables
        version = self._mac_version  # the MACs the signatures below were made with
        deletes, writes = self._plan(cfg, initial)
        reals = {v.key: list(self._signature(v)[4]) for v in writes}
        sigs = {v.key: self._signature(v) for v in writes}
        # Reals whose down state the refresh below must set: new, back from retirement,
        # or with another MAC (all of them at start). The rings of this change are
        # filled in a thread first; publishing them here then finds them made.
        fresh = {v.key: self._fresh(v, reals[v.key], initial) for v in writes}
        await self._prepare_rings(writes, reals, fresh, initial)
        try:
            for key in deletes:
                t.delete_vip(key)
                self._applied.pop(key, None)
                log.info("VIP %s removed", key)
            for v in writes:
                self._applied.pop(v.key, None)  # rewritten in full next time if this fails
                t.upsert_vip(v.address, v.port, v.protocol, mode=v.mode, hash=v.hash,
                             ring_size=v.ring_size, all_down=v.all_down)
                t.set_reals(v.key, reals[v.key])
                self._applied[v.key] = (v, version, sigs[v.key])
        except (TablesError, OSError) as e:
            # Cannot happen for a change that passed _plan, short of a failing bpf(2):
            # put the previous config back so that status and the maps agree again.
            log.error("writing the maps failed (%s); restoring the previous config", e)
            if cfg is not self.cfg and not initial:
                try:
                    await self._apply_locked(self.cfg)
                except Exception as e2:  # noqa: BLE001 - already failing; say so
                    log.error("restoring the previous config failed too: %s", e2)
            raise DaemonError(f"writing the maps failed: {e}; nothing of the change was "
                              "kept") from None
        old_vips = {str(v.address) for v in self.cfg.vips}
        self.cfg = cfg
        await self._program_hc_tunnels(cfg)
        self._hc_vips = _health_wanted(self._hc_wanted, self._hc_vips, cfg)
        self.health.sync(self._hc_wanted, start_down=self._saved_down if initial else frozenset())
        self._refresh_down(fresh)  # other reals: _on_health keeps them current
        if not self.vrrp and not initial and cfg.bgp is None:
            now = {str(v.address) for v in cfg.vips}
            for a in old_vips - now:
                await self._hold_vip(a, False)
            for a in sorted(now - self.held_vips):  # the others are held already
                await self._hold_vip(a, True)

    async def _program_hc_tunnels(self, cfg: Config) -> None:
        """Tunnel health checks (bpf/hc_tunnel.c): the tc programs on the node's
        interfaces once a check needs them, and probe mark -> VIP for each real."""
        want = {}
        for v in cfg.vips:
            vs = self.tables.vips.get(v.key)
            # Only a tun VIP checks through the tunnel unless a real says via = "tunnel";
            # skipping the others costs a glance per real, not hc_via (~1 ms / 1,000).
            if v.mode != "tun" and all(r.healthcheck.via != "tunnel" for r in v.reals):
                continue
            for r in v.reals:
                rs = vs.reals.get(str(r.address)) if vs else None
                if rs is not None and hc_via(v, r) == "tunnel":
                    want[M.hc_mark(rs.real_id)] = v.address
        if not want and self.hc_tunnel is None:
            return
        if self.hc_tunnel is None:
            compiled, self._hc_compiled = self._hc_compiled, None
            try:
                self.hc_tunnel = compiled or await asyncio.to_thread(loader.HcTunnel)
                for ifname in cfg.node.interfaces:
                    await asyncio.to_thread(self.hc_tunnel.attach, ifname)
            except loader.DataplaneError as e:
                self.hc_tunnel = None
                log.error("tunnel health checks cannot run (%s): those reals fail their "
                          'checks; set [healthcheck] via = "direct" to check them directly', e)
                return
            log.info("tunnel health checks: tc programs attached to %s",
                     ",".join(cfg.node.interfaces))
        t, had = self.hc_tunnel.tunnels, self._hc_marks
        for k in had.keys() - want.keys():  # only what changed: few syscalls per change
            t.pop(t.Key(k), None)
        for mark, vip in want.items():
            if had.get(mark) != vip:
                t[t.Key(mark)] = M.hc_tunnel_def(vip)
        self._hc_marks = want

    def _hc_mark(self, vip: str, real: str) -> int | None:
        """SO_MARK of the probe of `real` for `vip` (HealthChecker.mark_for)."""
        try:
            v = self.cfg.vip_by_key(vip)
            r = v.real_by_address(real)
        except KeyError:
            return None
        if hc_via(v, r) != "tunnel":
            return None
        vs = self.tables.vips.get(vip) if self.tables else None
        rs = vs.reals.get(str(r.address)) if vs else None
        return M.hc_mark(rs.real_id) if rs is not None and self.hc_tunnel else 0

    def _should_be_down(self, key: str, r) -> bool:
        return not self.health.is_up(key, str(r.address)) or self._mac_for(r) == NO_MAC

    def _refresh_down(self, fresh: dict[str, list]) -> None:
        for key, rs in fresh.items():
            for r in rs:
                self.tables.set_down(key, r.address, self._should_be_down(key, r))

    def _fresh(self, v, reals: list, initial: bool) -> list:
        """The reals of `v` (RealConfig) whose down state may not be what the tables
        hold: new ones, ones back from retirement, ones with another MAC; all at start."""
        if initial:
            return list(v.reals)
        vs = self.tables.vips.get(v.key)
        if vs is None:
            return list(v.reals)
        have = vs.reals
        return [r for r, (a, mac, _) in zip(v.reals, reals, strict=True)
                if (x := have.get(a)) is None or x.mac != mac]

    async def _prepare_rings(self, writes, reals, fresh, initial: bool) -> None:
        """Fill, in a thread, the Maglev rings the writes of this change will publish
        (maglev.prepare; the tables' build_ring calls then find them made), unless an
        API change's validation filled them already (_speculate)."""
        jobs = [j for j in self._ring_jobs(writes, reals, fresh, initial)
                if not maglev.prepared(j[1], j[0])]
        if jobs:
            await asyncio.to_thread(_prepare_rings, jobs)

    def _speculate(self, cfg: Config) -> None:
        """In the validating thread, before the lock: fill the rings `cfg` is expected to
        need (the VIPs whose config objects changed), as _apply_locked will ask. It reads
        the tables without the lock: a guess; a wrong one costs _prepare_rings a fill."""
        try:
            old = {v.key: v for v in self.cfg.vips}
            writes = [v for v in cfg.vips if old.get(v.key) is not v]
            reals = {v.key: list(self._signature(v)[4]) for v in writes}
            fresh = {v.key: self._fresh(v, reals[v.key], False) for v in writes}
            _prepare_rings(self._ring_jobs(writes, reals, fresh, False))
        except Exception as e:  # noqa: BLE001 - e.g. the tables changed under us: only a guess
            log.debug("filling rings ahead failed: %s", e)

    def _ring_jobs(self, writes, reals, fresh, initial: bool) -> list:
        """(ring size, [(real, weight)]) of each ring the writes will publish: upsert_vip's
        (new ring size), set_reals' and each one the down refresh after it makes. The
        same down rules as the tables' and _refresh_down's."""
        jobs = []
        for v in writes:
            vs = self.tables.vips.get(v.key)
            have, gone = (vs.reals, vs.retired) if vs is not None else ({}, {})
            if vs is not None and (initial or (vs.mode, vs.hash, vs.all_down, vs.ring_size)
                                   != (v.mode, v.hash, v.all_down, v.ring_size)):
                # upsert_vip publishes the reals as they are, at the new ring size
                jobs.append((v.ring_size, [(a, r.weight) for a, r in have.items()
                                           if not r.down]))
            # set_reals keeps the down state of reals the tables hold (retired ones
            # included), new ones start up
            down = {}
            pairs = []
            for a, _, w in reals[v.key]:
                x = have.get(a) or gone.get(a)
                if x is not None and x.down:
                    down[a] = True
                else:
                    pairs.append((a, w))
            jobs.append((v.ring_size, pairs))
            weight = None
            for r in fresh[v.key]:  # then the refresh sets them one by one
                a = str(r.address)
                d = self._should_be_down(v.key, r) or \
                    (initial and (v.key, a) in self._saved_down)
                if d != down.get(a, False):
                    down[a] = d
                    weight = weight or {a: w for a, _, w in reals[v.key]}
                    if weight[a]:
                        jobs.append((v.ring_size, [(x, w) for x, w in weight.items()
                                                   if not down.get(x, False)]))
        return jobs

    async def _on_health(self, vip: str, real: str, up: bool, detail: str) -> None:
        async with self._lock:
            try:
                r = self.cfg.vip_by_key(vip).real_by_address(real)
            except KeyError:
                return
            down = (not up) or self._mac_for(r) == NO_MAC
            vs = self.tables.vips.get(vip)
            rs = vs.reals.get(real) if vs else None
            if rs is not None and rs.down != down:  # a new ring: made in a thread
                await asyncio.to_thread(_prepare_rings, [(vs.ring_size, [
                    (a, x.weight) for a, x in vs.reals.items()
                    if not (down if a == real else x.down)])])
            self.tables.set_down(vip, real, down)

    async def _resolver_loop(self) -> None:
        n = 0
        while True:
            await asyncio.sleep(2.0)
            n += 1
            try:
                if n % 15 == 0:  # every 30 s: forget deleted reals nobody uses any more
                    await self._collect_retired()
                # ARP outside the lock; then apply the config as it is NOW, under the
                # lock: never a snapshot taken before another change.
                if await self._resolve_macs(self._unknown_macs(self.cfg)):
                    async with self._lock:
                        await self._apply_locked(self.cfg)
            except Exception:  # noqa: BLE001 - keep resolving; say what failed
                log.exception("resolver loop")

    async def _collect_retired(self) -> None:
        t = self.tables
        if not any(vs.retired for vs in t.vips.values()):
            return
        # The conn-table walk runs in a thread without the lock; only the quick
        # bookkeeping holds it.
        referenced = await asyncio.to_thread(t.referenced_real_ids)
        async with self._lock:
            t.collect_retired(referenced)

    # ----------------------------------------------------------------- VIPs
    def _vip_iface(self) -> str:
        return self.cfg.node.interfaces[0]

    # pyroute2's IPRoute runs its own event loop: call it from a thread.
    async def _hold_vip(self, addr: str, hold: bool) -> None:
        if hold:
            await asyncio.to_thread(netutil.add_address, self._vip_iface(), addr)
            self.held_vips.add(addr)
        else:
            await asyncio.to_thread(netutil.del_address, self._vip_iface(), addr)
            self.held_vips.discard(addr)

    async def _hold_vips(self, hold: bool) -> None:
        for addr in {str(v.address) for v in self.cfg.vips} | set(self.held_vips):
            await self._hold_vip(addr, hold)

    # ------------------------------------------------------- runtime change
    def require_ready(self, changes: bool = False) -> None:
        """Reads need the maps loaded; changes wait for the initial apply as well."""
        if self.tables is None or (changes and not self.ready):
            raise NotReady()

    def _candidate(self, mutate, base: Config | None = None) -> Config:
        # config_from_dict(mutate(config_to_dict(base))), parsing only what changed
        cfg = self._changes.candidate(base or self.cfg, mutate, self._capacity())
        errs = check_system(cfg)
        if errs:
            raise ConfigError(errs)
        if self.tables is not None and self.ready:
            self._speculate(cfg)  # this thread fills the rings: no second one under the lock
        return cfg

    async def change(self, mutate) -> Config:
        """Apply `mutate(dict)` to the running config; refuse it whole if invalid.

        `mutate` may run twice: once to learn which new reals need ARP (done without
        the lock), then under the lock on the config as it is then, so that
        concurrent changes serialize and none is lost. Returns once it is in the maps."""
        self.require_ready(changes=True)
        # Beside the loop: validation (by what changed; a refusal parses the whole config,
        # ~0.3 s at 4,000 reals) and the Maglev fills the change will publish.
        base = self.cfg
        cand = await asyncio.to_thread(self._candidate, mutate, base)  # invalid: refused here
        new = self._unknown_macs(cand)  # usually none: then no string per real
        if new:
            new -= {str(r.address) for v in base.vips for r in v.reals}
        if new:
            await self._resolve_macs(new)
        async with self._lock:
            # Validated once when nothing changed the config meanwhile (the usual case).
            cfg = cand if self.cfg is base else await asyncio.to_thread(self._candidate, mutate)
            await self._apply_locked(cfg)
        return cfg

    async def _sighup(self) -> None:
        """SIGHUP: reload; a refused file is logged as such (no traceback), the running
        config stays."""
        try:
            r = await self.reload()
        except (ConfigError, NotReady, DaemonError) as e:
            log.error("reload refused, nothing applied:\n  %s", str(e).replace("\n", "\n  "))
        except Exception:  # noqa: BLE001 - a bug: say where, keep running
            log.exception("reload failed")
        else:
            log.info("reload (SIGHUP): %s", r)

    async def reload(self) -> dict:
        self.require_ready(changes=True)
        if not self.config_path:
            raise ConfigError(["no config file to reload (started without -c)"])
        # raises ConfigError: nothing applied
        cfg = await asyncio.to_thread(load_config, self.config_path)
        errs = check_system(cfg) + check_capacity(cfg, self._capacity())
        if errs:
            raise ConfigError(errs)
        for section in ("node", "vrrp", "sync", "metrics", "bgp"):
            if getattr(cfg, section) != getattr(self.cfg, section):
                raise ConfigError([f"[{section}] changed: that needs a restart of the daemon "
                                   "(`systemctl restart l4lb`; forwarding and the conn table "
                                   "survive it); nothing was applied"])
        await self._resolve_macs(self._unknown_macs(cfg) - self._unknown_macs(self.cfg))
        async with self._lock:
            old = {v.key: v for v in self.cfg.vips}
            await self._apply_locked(cfg)
        self.reloads += 1
        before, after = set(old), {v.key for v in cfg.vips}
        changed = {v.key: d for v in cfg.vips if v.key in old for d in [_vip_diff(old[v.key], v)]
                   if d}
        log.info("reloaded %s: +%d -%d VIPs, %d changed%s", self.config_path,
                 len(after - before), len(before - after), len(changed),
                 "".join(f"; {k}: {', '.join(d)}" for k, d in changed.items()))
        return {"added": sorted(after - before), "removed": sorted(before - after),
                "changed": changed, "vips": len(after)}

    # --------------------------------------------------------------- status
    def status(self) -> dict:
        self.require_ready()
        t = self.tables
        vips = []
        for v in self.cfg.vips:
            vs = t.vips.get(v.key)
            reals = []
            for r in v.reals:
                rs = vs.reals.get(str(r.address)) if vs else None
                chk = self.health.checks.get((v.key, str(r.address)))
                reals.append({
                    "address": str(r.address), "weight": r.weight,
                    "mac": self._mac_for(r), "id": rs.real_id if rs else None,
                    "up": self.health.is_up(v.key, str(r.address)),
                    "in_ring": bool(rs and not rs.down and r.weight > 0),
                    "health": r.healthcheck.type, "via": hc_via(v, r),
                    "last_check": (chk.last.detail or "ok") if chk and chk.last else None,
                })
            vips.append({"vip": v.key, "mode": v.mode, "hash": v.hash,
                         "ring_size": v.ring_size, "reals": reals})
        return {
            "node": self.cfg.node.name, "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 1),
            "interfaces": list(self.cfg.node.interfaces), "xdp_mode": self.cfg.node.xdp_mode,
            "xdp_attached": {ifname: self.prog.attached.get(ifname) is not None
                             for ifname in self.cfg.node.interfaces} if self.prog else {},
            "pin_dir": t.opts.pin_dir, "held_vips": sorted(self.held_vips),
            # who fills Maglev rings: the kernel (bpf/maglev_fill.c) or numpy, its fallback
            "ring_fill": "kernel" if self.ring_fill else "numpy",
            "vips": vips,
            "vrrp": [a.status() for a in self.vrrp],
            "sync": self.sync.status() if self.sync else None,
            "bgp": self.routing.status() if self.routing else None,
            "config": self.config_path, "reloads": self.reloads,
        }

    def stats(self) -> dict:
        self.require_ready()
        t = self.tables
        out = []
        for v in self.cfg.vips:
            if v.key not in t.vips:
                continue
            reals = [dict(address=str(r.address), **t.real_counters(v.key, r.address))
                     for r in v.reals]
            out.append(dict(vip=v.key, **t.vip_counters(v.key), reals=reals))
        return {"vips": out, "global": t.global_counters(), "time": time.time()}

    async def conns(self, vip: str | None, limit: int) -> list[dict]:
        """Up to `limit` conn-table entries (of one VIP): the walk runs in a thread and
        stops at `limit`, never on the event loop."""
        self.require_ready()
        want = None
        if vip:
            v = self.cfg.vip_by_key(vip)  # KeyError: no such VIP
            want = (str(v.address), v.port, v.protocol)
        names = self.tables.real_by_id()
        t = self.tables

        def rows() -> list[dict]:  # in a thread: the walk and the row building
            return [{"client": src, "cport": sport, "vip": dst, "vport": dport,
                     "proto": proto, "real": names.get(rid, ("?", f"id {rid}"))[1]}
                    for src, sport, dst, dport, proto, rid in t.conn_entries(limit, want)]

        return await asyncio.to_thread(rows)


def _health_wanted(wanted: dict, old: dict, cfg: Config) -> dict:
    """Bring `wanted`, (VIP key, real) -> health check config as health.sync takes it,
    from the VIPs `old` (key -> the VipConfig it was made from) to those of `cfg`; returns
    the new `old`. Only reals that are not the very objects they were are looked at: an
    API change reuses every other real's (l4lb.config.incremental)."""
    now = {v.key: v for v in cfg.vips}
    for key, ov in old.items():
        v = now.get(key)
        if v is not ov:
            keep = {id(r) for r in v.reals} if v is not None else set()
            for r in ov.reals:
                if id(r) not in keep:
                    wanted.pop((key, str(r.address)), None)
    for key, v in now.items():
        ov = old.get(key)
        if v is not ov:
            had = {id(r) for r in ov.reals} if ov is not None else set()
            for r in v.reals:
                if id(r) not in had:
                    wanted[(key, str(r.address))] = r.healthcheck
    return now


def _prepare_rings(jobs) -> None:
    """maglev.prepare for each (ring size, [(real address, weight)]); for a thread."""
    for size, pairs in jobs:
        try:
            maglev.prepare(pairs, size)
        except Exception as e:  # noqa: BLE001 - the tables' build_ring will fill (and say) it
            log.debug("preparing a ring failed: %s", e)


def _compile_hc() -> loader.HcTunnel | None:
    """bpf/hc_tunnel.c compiled, or None (then attached later, or its error logged)."""
    try:
        return loader.HcTunnel()
    except loader.DataplaneError:
        return None


def _vip_diff(a, b) -> list[str]:
    """What a reload changed in one VIP, for the reload report ("mode dr -> tun", ...)."""
    out = [f"{f} {getattr(a, f)} -> {getattr(b, f)}" for f in ("mode", "hash", "ring_size",
                                                               "all_down")
           if getattr(a, f) != getattr(b, f)]
    ra = {str(r.address): r for r in a.reals}
    rb = {str(r.address): r for r in b.reals}
    out += [f"real {x} added" for x in rb if x not in ra]
    out += [f"real {x} removed" for x in ra if x not in rb]
    out += [f"real {x} changed" for x in rb if x in ra and ra[x] != rb[x]]
    return out


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def offline_stop(cfg: Config) -> list[str]:
    """`l4lb stop` when no daemon answers: detach XDP, remove VIPs, pins and state."""
    done = []
    for ifname in cfg.node.interfaces:
        loader.detach_xdp(ifname)
        done.append(f"XDP detached from {ifname}")
        loader.detach_hc_tunnel(ifname)
        for v in cfg.vips:
            if netutil.del_address(ifname, v.address):
                done.append(f"VIP {v.address} removed from {ifname}")
    if cfg.bgp is not None:  # ECMP: the host routes that announce the VIPs
        from l4lb.routing import announce  # noqa: PLC0415
        for addr in sorted(announce.installed_routes()):
            announce.set_route(addr, False)
            done.append(f"route {addr} withdrawn")
    pd = pin_dir(cfg, max([65537] + [v.ring_size for v in cfg.vips]))
    if Path(pd).exists():
        loader.remove_pins(pd)
        done.append(f"pins removed: {pd}")
    shutil.rmtree(state_dir(cfg), ignore_errors=True)
    return done


__all__ = ["Daemon", "DaemonError", "NotReady", "ConfigError", "TablesError", "M", "configure_logging",
           "offline_stop"]
