"""Compile bpf/ with bcc, attach and detach XDP, pin maps: the only module that knows bcc."""

from __future__ import annotations

import ctypes as ct
import importlib.resources
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from l4lb.dataplane import bpfsys
from l4lb.dataplane import maps as M
from l4lb.errors import L4lbError

# The BPF sources ship inside the package (l4lb/bpf links the repository's bpf/):
# the same lookup works from a checkout and from an installed wheel.
BPF_DIR = Path(str(importlib.resources.files("l4lb") / "bpf"))
BPFFS = "/sys/fs/bpf"
XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_MODES = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}
BPF_F_NO_COMMON_LRU = 1 << 1


class DataplaneError(L4lbError):
    """The data plane could not be built or attached; the message says why."""


@dataclass(frozen=True)
class BuildOptions:
    max_vips: int = M.DEFAULT_MAX_VIPS
    max_reals: int = M.DEFAULT_MAX_REALS
    ring_max: int = M.DEFAULT_RING_MAX
    conn_table_size: int = M.DEFAULT_CONN_TABLE_SIZE
    per_cpu_lru: bool = False
    pin_dir: str | None = None  # None: private maps (tests); else pinned here
    embryo_table_size: int | None = None  # None: M.default_embryo_table_size(conn_table_size)
    flow_guard_rate: int = M.DEFAULT_FLOW_GUARD_RATE  # conns admissions per CPU and second

    def embryos(self) -> int:
        return self.embryo_table_size or M.default_embryo_table_size(self.conn_table_size)

    def cflags(self) -> list[str]:
        if not 1 <= self.flow_guard_rate <= 0xFFFFFFFF:
            raise DataplaneError(f"flow_guard_rate: {self.flow_guard_rate} is out of range "
                                 "1..4294967295 (admissions per CPU and second)")
        f = [f"-I{BPF_DIR}", f"-DMAX_VIPS={self.max_vips}", f"-DMAX_REALS={self.max_reals}",
             f"-DRING_MAX={self.ring_max}", f"-DCONN_TABLE_SIZE={self.conn_table_size}",
             f"-DEMBRYO_TABLE_SIZE={self.embryos()}", f"-DFLOW_GUARD_RATE={self.flow_guard_rate}U",
             f"-DCONN_TABLE_FLAGS={BPF_F_NO_COMMON_LRU if self.per_cpu_lru else 0}",
             "-Wno-macro-redefined", "-Wno-compare-distinct-pointer-types"]
        if self.pin_dir:
            f.append(f'-DPIN_DIR="{self.pin_dir}"')
        return f


_PIN_DIR_NAME = re.compile(r"v\d+(-r\d+-c\d+)?")


def remove_stale_pins(pin_dir: str) -> list[str]:
    """Remove the node's other pin directories (an older layout, other sizes) once the
    maps of ``pin_dir`` serve: nothing reads them any more, and a conn table pinned
    there holds its memory until reboot. Returns what was removed."""
    node_dir = os.path.dirname(pin_dir.rstrip("/"))
    keep = os.path.basename(pin_dir.rstrip("/"))
    try:
        names = os.listdir(node_dir)
    except OSError:
        return []
    gone = []
    for name in sorted(names):
        path = os.path.join(node_dir, name)
        if name != keep and _PIN_DIR_NAME.fullmatch(name) and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            gone.append(path)
    return gone


def pin_dir_for(pin_path: str, node: str) -> str:
    """Where a node's maps are pinned: the layout version is part of the path."""
    return f"{pin_path.rstrip('/')}/{node}/v{M.LAYOUT_VERSION}"


def ensure_bpffs(path: str = BPFFS) -> None:
    """Pinning needs bpffs; mount it when the host has not (a fresh VM often has not)."""
    with open("/proc/mounts") as f:
        if any(line.split()[1] == path and line.split()[2] == "bpf" for line in f):
            return
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "bpf", "bpf", path], capture_output=True, text=True)
    if r.returncode != 0:
        raise DataplaneError(f"cannot mount bpffs on {path}: {r.stderr.strip()}; "
                             "run: mount -t bpf bpf /sys/fs/bpf")


def _bcc():
    try:
        import bcc  # noqa: PLC0415 - only the loader imports bcc
    except ImportError as e:
        raise DataplaneError("bcc is not importable: install Debian's python3-bpfcc and use a "
                             "venv made with --system-site-packages (`make setup` does both)"
                             ) from e
    return bcc


class Program:
    """One compiled XDP program with its maps."""

    def __init__(self, source: str, func: str, cflags: list[str]):
        bcc = _bcc()
        self._bcc = bcc
        try:
            self.bpf = bcc.BPF(src_file=str(BPF_DIR / source).encode(), cflags=cflags)
        except Exception as e:  # bcc raises bare Exception on compile errors
            raise DataplaneError(f"compiling bpf/{source} failed: {e}") from e
        self.fn = self.bpf.load_func(func.encode(), bcc.BPF.XDP)
        self.attached: dict[str, int] = {}

    @property
    def fd(self) -> int:
        return self.fn.fd

    def map(self, name: str):
        return self.bpf[name.encode()]

    def attach(self, ifname: str, mode: str = "native") -> None:
        """Attach (or atomically replace) this program on `ifname`."""
        try:
            self._bcc.BPF.attach_xdp(ifname.encode(), self.fn, XDP_MODES[mode])
        except Exception as e:
            raise DataplaneError(f"attaching XDP ({mode}) to {ifname} failed: {e}") from e
        self.attached[ifname] = XDP_MODES[mode]

    def detach(self, ifname: str | None = None) -> None:
        for name in [ifname] if ifname else list(self.attached):
            flags = self.attached.pop(name, XDP_FLAGS_SKB_MODE)
            detach_xdp(name, flags)

    def close(self) -> None:
        """Free the program and map handles (attached XDP and pins stay)."""
        self.bpf.cleanup()


def detach_xdp(ifname: str, flags: int | None = None) -> None:
    """Remove whatever XDP program `ifname` carries, in either mode."""
    bcc = _bcc()
    for f in ([flags] if flags is not None else [XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE]):
        try:
            bcc.BPF.remove_xdp(ifname.encode(), f)
        except Exception:  # noqa: BLE001 - nothing attached in that mode
            pass


def compile_balancer(opts: BuildOptions) -> Program:
    if opts.pin_dir:
        ensure_bpffs()
        os.makedirs(opts.pin_dir, exist_ok=True)
    return Program("balancer.c", "xdp_balancer", opts.cflags())


def set_flow_guard(table, max_per_s: int) -> None:
    """Set the running program's admission guard (flow_guard_cfg): at most max_per_s
    flows per CPU and second enter conns; 0 restores the compiled FLOW_GUARD_RATE.
    `table` is a bcc table (Program.map("flow_guard_cfg")) or a pinned map's path."""
    if not 0 <= max_per_s <= 0xFFFFFFFF:
        raise ValueError(f"max_per_s: {max_per_s} is out of range 0..4294967295")
    val = M.FlowGuardCfg(max_per_s=max_per_s)
    if not isinstance(table, (str, os.PathLike)):
        table[ct.c_uint32(0)] = val
        return
    try:
        fd = bpfsys.obj_get(os.fspath(table))
    except OSError as e:
        raise DataplaneError(f"cannot open pinned map {table}: {e.strerror}") from e
    try:
        key = ct.c_uint32(0)
        err = bpfsys.bpf(bpfsys.BPF_MAP_UPDATE_ELEM, bpfsys.ElemAttr(
            map_fd=fd, key=ct.addressof(key), value=ct.addressof(val)))
        if err:
            raise DataplaneError(f"cannot update {table}: {os.strerror(err)}")
    finally:
        os.close(fd)


def embryos_waiting(table) -> int:
    """TCP flows waiting in `embryos` (a bcc table) for their second packet."""
    return sum(1 for _, v in table.items_lookup_batch() if v.key.family)


def clear_embryos(table) -> None:
    """Empty every slot of `embryos` (a bcc table) in one syscall."""
    n = table.max_entries
    table.items_update_batch((ct.c_uint32 * n)(*range(n)), (table.Leaf * n)())


def compile_decap() -> Program:
    return Program("decap.c", "xdp_decap", [f"-I{BPF_DIR}"])


TC_HC_PRIO = 0x4c  # our tc filters' priority/handle: a restart replaces, never stacks
_TC_PARENT = {"ingress": "ffff:fff2", "egress": "ffff:fff3"}


class HcTunnel:
    """bpf/hc_tunnel.c: tunnel health checks, tc egress + ingress on the node's
    interfaces; ``tunnels`` maps probe marks to VIPs (maps.hc_tunnel)."""

    def __init__(self) -> None:
        bcc = _bcc()
        try:
            self.bpf = bcc.BPF(src_file=str(BPF_DIR / "hc_tunnel.c").encode(),
                               cflags=[f"-I{BPF_DIR}", "-Wno-compare-distinct-pointer-types"])
            self.fns = {d: self.bpf.load_func(f"tc_hc_{d}".encode(), bcc.BPF.SCHED_CLS)
                        for d in ("egress", "ingress")}
        except Exception as e:  # bcc raises bare Exception on compile/verifier errors
            raise DataplaneError(f"compiling bpf/hc_tunnel.c failed: {e}") from e
        self.tunnels = self.bpf[b"hc_tunnels"]
        self.attached: set[str] = set()

    def attach(self, ifname: str) -> None:
        """clsact on `ifname` (kept if there), our two filters added or replaced."""
        from pyroute2 import IPRoute  # noqa: PLC0415
        from pyroute2.netlink.exceptions import NetlinkError  # noqa: PLC0415

        try:
            with IPRoute() as ipr:
                idx = ipr.link_lookup(ifname=ifname)[0]
                try:
                    ipr.tc("add", "clsact", idx)
                except NetlinkError as e:
                    if e.code != 17:  # EEXIST: another program's clsact, or ours of before
                        raise
                for d, fn in self.fns.items():
                    ipr.tc("replace-filter", "bpf", idx, TC_HC_PRIO, parent=_TC_PARENT[d],
                           fd=fn.fd, name=fn.name.decode(), classid=1, direct_action=True,
                           prio=TC_HC_PRIO, protocol=0x0003)  # ETH_P_ALL
        except (NetlinkError, OSError, IndexError) as e:
            raise DataplaneError(f"attaching the tunnel health check (tc) to {ifname} "
                                 f"failed: {e}") from e
        self.attached.add(ifname)

    def stats(self) -> dict[str, int]:
        t = self.bpf[b"hc_stats"]
        vals = [sum(t[ct.c_int(i)]) for i in range(4)]
        return dict(zip(("encapsulated", "no_tunnel", "errors", "replies"), vals, strict=True))


def detach_hc_tunnel(ifname: str) -> None:
    """Remove our tc filters from `ifname` (whatever program they hold)."""
    from pyroute2 import IPRoute  # noqa: PLC0415
    from pyroute2.netlink.exceptions import NetlinkError  # noqa: PLC0415

    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        for parent in _TC_PARENT.values():
            try:
                ipr.tc("del-filter", "bpf", idx[0], TC_HC_PRIO, parent=parent, prio=TC_HC_PRIO,
                       protocol=0x0003)
            except (NetlinkError, IndexError):
                pass  # not there


def compile_pass() -> Program:
    """A trivial XDP_PASS program: the benchmark baseline, and what a veth peer needs
    so that native XDP_TX frames reach it (README: The lab)."""
    return Program("baseline.c", "xdp_pass", [f"-I{BPF_DIR}"])


def compile_swap() -> Program:
    return Program("baseline.c", "xdp_tx_swap", [f"-I{BPF_DIR}"])


def remove_pins(pin_dir: str) -> None:
    """Remove a node's pinned maps, and the node's directory once it is empty."""
    shutil.rmtree(pin_dir, ignore_errors=True)
    try:
        os.rmdir(os.path.dirname(pin_dir.rstrip("/")))
    except OSError:
        pass  # other layouts or nodes still pinned there
