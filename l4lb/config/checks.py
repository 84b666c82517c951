"""Checks of a valid config beyond its schema, offline: what the compiled data plane can
hold (Capacity / check_capacity) and valid-but-risky settings (config_warnings).
"""

from __future__ import annotations

from dataclasses import dataclass

from l4lb.config.model import Config
from l4lb.dataplane import maps as _maps  # compile-time sizes only (no bcc)


@dataclass(frozen=True)
class Capacity:
    """What the compiled data plane can hold (the sizes in bpf/maps.h)."""

    max_vips: int = _maps.DEFAULT_MAX_VIPS
    max_real_ids: int = _maps.DEFAULT_MAX_REALS - 1  # id 0 means "no real"
    ring_max: int | None = None  # None: `l4lb start` sizes the rings to fit the config


def check_capacity(cfg: Config, cap: Capacity) -> list[str]:
    """Errors, one per limit exceeded, naming the field and the limit (empty = fits)."""
    errors: list[str] = []
    if len(cfg.vips) > cap.max_vips:
        errors.append(
            f"vip[{cap.max_vips}]: {len(cfg.vips)} VIPs are above the compiled maximum of "
            f"{cap.max_vips} VIPs (MAX_VIPS); delete a VIP first"
        )
    if cap.ring_max is not None:
        for i, vip in enumerate(cfg.vips):
            if vip.ring_size > cap.ring_max:
                errors.append(
                    f"vip[{i}].ring_size: {vip.ring_size} is above the compiled maximum "
                    f"{cap.ring_max} of the running data plane (restart with this ring_size in "
                    "the config file: the maps are rebuilt to fit it, and the conn table "
                    f"starts empty); or use a prime up to {cap.ring_max}"
                )
    n = 0
    for i, vip in enumerate(cfg.vips):
        for j, _ in enumerate(vip.reals):
            n += 1
            if n == cap.max_real_ids + 1:
                total = sum(len(v.reals) for v in cfg.vips)
                errors.append(
                    f"vip[{i}].real[{j}]: {total} reals over all VIPs are above the compiled "
                    f"maximum of {cap.max_real_ids} real ids (MAX_REALS - 1)"
                )
    return errors


def config_warnings(cfg: Config) -> list[str]:
    """Valid but risky settings: `l4lb check` prints these, `l4lb start` logs them."""
    warns: list[str] = []
    udp = [v.key for v in cfg.vips if v.protocol == "udp"]
    if cfg.sync.enabled and udp:
        walk, timeout = cfg.sync.full_sync_interval_s, cfg.node.conn_timeout_s
        # A synced entry is refreshed on the standby only by the next walk: a UDP flow
        # whose standby copy aged past conn_timeout_s is rescheduled at takeover. The
        # copy is up to one walk plus the data plane's 1 s last-seen grain old, and
        # it ages on through the takeover (Master_Down_Interval) until the flow's
        # next packet reaches the new master.
        takeover = _takeover_s(cfg)
        if walk == 0 or walk + 1 + takeover >= timeout:
            what = "0 (walks only when a peer starts)" if walk == 0 else (
                f"{walk:g} s: a standby copy can be {walk:g} s + 1 s + {takeover:.1f} s "
                f"(takeover) old, not below node.conn_timeout_s ({timeout} s)")
            warns.append(
                f"sync.full_sync_interval_s is {what}, with UDP VIPs ({', '.join(udp[:3])}"
                f"{', ...' if len(udp) > 3 else ''}): the standby's copies of long-lived UDP "
                "flows go idle between walks, and a failover moves them to the new master's "
                f"ring; set full_sync_interval_s below "
                f"{max(timeout - 1 - takeover, 1):.1f} s or raise node.conn_timeout_s")
    return warns


def _takeover_s(cfg: Config) -> float:
    """Master_Down_Interval (RFC 5798) of the VRRP instance sync follows: how long a
    standby waits before it takes over (0 without VRRP)."""
    inst = [v for v in cfg.vrrp if v.name == cfg.sync.vrrp_instance] or list(cfg.vrrp[:1])
    if not inst:
        return 0.0
    v = inst[0]
    skew = (256 - v.priority) / 256 * (v.advert_interval_s if v.version == 3 else 1.0)
    return 3 * v.advert_interval_s + skew
