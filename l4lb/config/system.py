"""Checks that need the machine: interfaces, scripts, key file, bpffs. Never called by the
parsers, so `l4lb check` works anywhere.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
from pathlib import Path, PurePosixPath

from l4lb.config.bgp import check_bgp_system
from l4lb.config.convert import _q
from l4lb.config.model import Config
from l4lb.config.parse_ha import _ARGV_KEYS

# --------------------------------------------------------------------------
# Checks that need the machine (not run by the parsers)
# --------------------------------------------------------------------------

_MOUNTS = "/proc/self/mounts"


def _unescape_mount(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def _mount_of(path: str, mounts_text: str) -> tuple[str, str] | None:
    """(mount point, fs type) of the mount that holds `path`, from /proc/self/mounts text."""
    best: tuple[str, str] | None = None
    for line in mounts_text.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = _unescape_mount(parts[1])
        prefix = mnt.rstrip("/") + "/"
        if path == mnt or path.startswith(prefix):
            if best is None or len(mnt) >= len(best[0]):
                best = (mnt, parts[2])
    return best


def _check_exe(errors: list[str], path: str, argv0: str) -> None:
    if "/" in argv0:
        if not os.path.isfile(argv0):
            errors.append(f"{path}: {argv0} does not exist")
        elif not os.access(argv0, os.X_OK):
            errors.append(f"{path}: {argv0} is not executable; chmod +x {argv0}")
    elif shutil.which(argv0) is None:
        errors.append(f"{path}: {_q(argv0)} is not found in PATH; give an absolute path")


def check_system(cfg: Config) -> list[str]:
    """Problems only this machine can reveal: missing interfaces, scripts, key file, bpffs.

    Returns messages in the same "path: problem; fix" form as ConfigError (empty = fine).
    """
    errors: list[str] = []

    def iface(path: str, name: str) -> None:
        try:
            socket.if_nametoindex(name)
        except OSError:
            errors.append(
                f"{path}: interface {_q(name)} does not exist here; check `ip link` "
                "(and that l4lb runs in the right network namespace)"
            )

    for i, name in enumerate(cfg.node.interfaces):
        iface(f"node.interfaces[{i}]", name)

    try:
        mounts = Path(_MOUNTS).read_text()
    except OSError:
        mounts = None
    if mounts is not None:
        where = _mount_of(cfg.node.pin_path, mounts)
        if where is not None and where[1] != "bpf":
            mnt, fstype = where
            target = (
                "/sys/fs/bpf"
                if cfg.node.pin_path.startswith("/sys/fs/bpf")
                else str(PurePosixPath(cfg.node.pin_path).parent)
            )
            errors.append(
                f"node.pin_path: {cfg.node.pin_path} is on {fstype} (mounted at {mnt}), not bpffs; "
                f"mount one with `mount -t bpf bpf {target}` (under `ip netns exec`, /sys is remounted: "
                "use nsenter --net=... instead)"
            )

    seen_scripts: set[str] = set()

    def script(path: str, argv: tuple[str, ...] | None) -> None:
        if argv and argv[0] not in seen_scripts:
            seen_scripts.add(argv[0])
            n = len(errors)
            _check_exe(errors, f"{path}[0]", argv[0])
            if len(errors) == n and cfg.node.script_security:
                from l4lb import scripts  # noqa: PLC0415 - l4lb.scripts imports nothing of ours

                try:
                    scripts.check_script(argv[0])
                except scripts.ScriptRefused as e:
                    errors.append(f"{path}[0]: {e}")

    if cfg.healthcheck.type == "script":
        script("healthcheck.script", cfg.healthcheck.script)
    for vi, vip in enumerate(cfg.vips):
        for ri, real in enumerate(vip.reals):
            if real.healthcheck.type == "script":
                script(f"vip[{vi}].real[{ri}].healthcheck.script", real.healthcheck.script)

    for n, inst in enumerate(cfg.vrrp):
        p = f"vrrp[{n}]"
        iface(f"{p}.interface", inst.interface)
        for t, ti in enumerate(inst.track_interfaces):
            iface(f"{p}.track_interfaces[{t}].name", ti.name)
        for t, ts in enumerate(inst.track_scripts):
            script(f"{p}.track_scripts[{t}].script", ts.script)
        for key in _ARGV_KEYS:
            script(f"{p}.{key}", getattr(inst, key))

    s = cfg.sync
    if s.enabled and s.key_file is not None:
        try:
            st = os.stat(s.key_file)
        except OSError as exc:
            errors.append(f"sync.key_file: cannot read {s.key_file}: {exc.strerror}")
        else:
            if not stat.S_ISREG(st.st_mode):
                errors.append(f"sync.key_file: {s.key_file} is not a regular file")
            elif st.st_mode & 0o077:
                errors.append(
                    f"sync.key_file: {s.key_file} is accessible by group or others "
                    f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 {s.key_file}"
                )
            else:
                try:
                    s.load_key()
                except (OSError, ValueError) as exc:
                    errors.append(
                        f"sync.key_file: {exc}; put the shared secret in it (e.g. `openssl rand -hex 32`)"
                    )
    if cfg.bgp is not None:
        errors += check_bgp_system(cfg.bgp)
    return errors
