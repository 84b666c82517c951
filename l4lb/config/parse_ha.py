"""The HA sections: [[vrrp]] instances (with their track_interfaces / track_scripts)
and [sync], parsed with the converters of convert.py.
"""

from __future__ import annotations

import difflib
from typing import Any

from l4lb.config.convert import (
    Conv,
    _argv,
    _bool,
    _check_abs_path,
    _check_ifname,
    _check_vrrp_name,
    _Ctx,
    _endpoint,
    _enum,
    _float,
    _get,
    _int,
    _ip,
    _ip_interface,
    _join,
    _list,
    _num,
    _q,
    _str,
    _table,
    _tables,
)
from l4lb.config.model import (
    IPInterface,
    SyncConfig,
    TrackInterface,
    TrackScript,
    VrrpConfig,
    _default,
)

_TRACK_IF: dict[str, Conv] = {"name": _str(_check_ifname), "weight": _int(-254, 254)}
_TRACK_SCRIPT: dict[str, Conv] = {
    "script": _argv,
    "interval_s": _float(0, 3600, lo_open=True),
    "weight": _int(-254, 254),
    "rise": _int(1, 100),
    "fall": _int(1, 100),
}
_ARGV_KEYS = ("notify", "notify_master", "notify_backup", "notify_fault")
_VRRP: dict[str, Conv] = {
    "name": _str(_check_vrrp_name),
    "interface": _str(_check_ifname),
    "vrid": _int(1, 255),
    "priority": _int(1, 255),
    "version": _enum(2, 3),
    "advert_interval_s": _float(0, 255, lo_open=True),
    "preempt": _bool,
    "preempt_delay_s": _float(0, 3600),
    "accept_mode": _bool,
    "unicast_src": _ip(),
    "unicast_peers": _list(_ip(), what="IP addresses", unique=True),
    "vips": _list(
        _ip_interface, what='"addr" or "addr/prefix" strings', unique=True, nonempty=True
    ),
    "auth_pass": _str(),
    "garp_count": _int(0, 100),
    "garp_refresh_s": _float(0, 3600),
    "track_interfaces": lambda ctx, p, v: v,  # parsed below: arrays of tables
    "track_scripts": lambda ctx, p, v: v,
    **{k: _argv for k in _ARGV_KEYS},
}
_VRRP_REQUIRED = {
    "name": 'add name = "VI_1" (unique among [[vrrp]] instances)',
    "interface": 'add interface = "eth0" (where adverts are sent)',
    "vrid": "add vrid = 51 (1..255, the same on both nodes of the pair)",
    "vips": 'add vips = ["10.99.0.100/24"] (the addresses the master holds)',
}


def _parse_track_interfaces(ctx: _Ctx, path: str, raw: Any) -> tuple[TrackInterface, ...] | None:
    out, ok, seen = [], True, {}
    for p, t in _tables(ctx, path, raw, "vrrp.track_interfaces"):
        _table(ctx, p, t, _TRACK_IF)
        name = _get(ctx, t, p, "name", _TRACK_IF["name"], required='add name = "eth1"')
        weight = _get(ctx, t, p, "weight", _TRACK_IF["weight"], 0)
        if name is None or weight is None:
            ok = False
            continue
        if name in seen:
            ctx.err(
                _join(p, "name"), f"{_q(name)} is already tracked by {seen[name]}; track it once"
            )
            ok = False
            continue
        seen[name] = p
        out.append(TrackInterface(name, weight))
    if not isinstance(raw, list) or len(out) != len(raw):
        ok = False
    return tuple(out) if ok else None


def _parse_track_scripts(ctx: _Ctx, path: str, raw: Any) -> tuple[TrackScript, ...] | None:
    out, ok = [], True
    for p, t in _tables(ctx, path, raw, "vrrp.track_scripts"):
        _table(ctx, p, t, _TRACK_SCRIPT)
        v = {
            k: _get(
                ctx,
                t,
                p,
                k,
                c,
                _default(TrackScript, k) if k != "script" else None,
                required='add script = ["/usr/local/bin/check", "arg"]' if k == "script" else None,
            )
            for k, c in _TRACK_SCRIPT.items()
        }
        if None in v.values():
            ok = False
            continue
        out.append(TrackScript(**v))
    if not isinstance(raw, list) or len(out) != len(raw):
        ok = False
    return tuple(out) if ok else None


def _parse_vrrp(ctx: _Ctx, path: str, tbl: dict) -> VrrpConfig | None:
    _table(ctx, path, tbl, _VRRP)
    v: dict[str, Any] = {}
    for key, conv in _VRRP.items():
        if key in ("track_interfaces", "track_scripts"):
            continue
        v[key] = _get(
            ctx,
            tbl,
            path,
            key,
            conv,
            _default(VrrpConfig, key) if key not in _VRRP_REQUIRED else None,
            _VRRP_REQUIRED.get(key),
        )
    ok = all(
        v[k] is not None
        for k in _VRRP
        if k not in ("track_interfaces", "track_scripts") and (k in tbl or k in _VRRP_REQUIRED)
    )
    for key, parse in (
        ("track_interfaces", _parse_track_interfaces),
        ("track_scripts", _parse_track_scripts),
    ):
        v[key] = ()
        if key in tbl:
            got = parse(ctx, _join(path, key), tbl[key])
            if got is None:
                ok = False
            else:
                v[key] = got

    version = v["version"]
    vips: tuple[IPInterface, ...] | None = v["vips"]
    family = None
    if vips:
        family = vips[0].version
        for i, iface in enumerate(vips[1:], 1):
            if iface.version != family:
                ctx.err(
                    f"{path}.vips[{i}]",
                    f"{iface} is IPv{iface.version} but vips[0] is IPv{family}; one VRRP instance carries "
                    f"one family — put the IPv{iface.version} ones in a second [[vrrp]] instance",
                )
                ok = False
    if version == 2 and family == 6:
        ctx.err(_join(path, "version"), "VRRPv2 is IPv4 only and vips are IPv6; use version = 3")
        ok = False
    adv = v["advert_interval_s"]
    if adv is not None and version is not None and "advert_interval_s" in tbl:
        if version == 3 and not (0.01 <= adv <= 40.95 and abs(adv * 100 - round(adv * 100)) < 1e-6):
            ctx.err(
                _join(path, "advert_interval_s"),
                f"{_num(adv)} is not valid for VRRPv3; use 0.01..40.95 in steps of 0.01 (centiseconds)",
            )
            ok = False
        if version == 2 and not (1 <= adv <= 255 and float(adv).is_integer()):
            ctx.err(
                _join(path, "advert_interval_s"),
                f"{_num(adv)} is not valid for VRRPv2; use whole seconds 1..255 (or version = 3 for less)",
            )
            ok = False
    if v["auth_pass"] is not None:
        if version == 3:
            ctx.err(
                _join(path, "auth_pass"),
                "VRRPv3 has no authentication (RFC 5798 removed it); remove auth_pass or set version = 2",
            )
            ok = False
        elif not 1 <= len(v["auth_pass"]) <= 8:
            ctx.err(
                _join(path, "auth_pass"),
                f"is {len(v['auth_pass'])} characters; VRRPv2 simple auth takes 1..8",
            )
            ok = False
    src, peers = v["unicast_src"], v["unicast_peers"]
    if family is not None:
        for p, a in [(_join(path, "unicast_src"), src)] + [
            (f"{path}.unicast_peers[{i}]", a) for i, a in enumerate(peers or ())
        ]:
            if a is not None and a.version != family:
                ctx.err(
                    p,
                    f"{a} is IPv{a.version} but the instance's vips are IPv{family}; use an IPv{family} address",
                )
                ok = False
    if src is not None and peers is not None:
        if not peers:
            ctx.err(
                _join(path, "unicast_src"),
                "is set but unicast_peers is empty, so adverts would be multicast; add unicast_peers or remove unicast_src",
            )
            ok = False
        elif src in peers:
            ctx.err(
                f"{path}.unicast_peers[{peers.index(src)}]",
                f"{src} is this node's unicast_src; list only the other nodes",
            )
            ok = False
    if not ok:
        return None
    return VrrpConfig(**v)


_SYNC: dict[str, Conv] = {
    "enabled": _bool,
    "listen": _endpoint(allow_unspecified=True, example="10.99.0.2:9542"),
    "peers": _list(
        _endpoint(allow_unspecified=False, example="10.99.0.3:9542"),
        what='"host:port" strings',
        unique=True,
    ),
    "key": _str(),
    "key_file": _str(_check_abs_path("/etc/l4lb/sync.key")),
    "vrrp_instance": _str(),
    "batch_max": _int(1, 10000),
    "batch_delay_ms": _float(0.1, 1000),
    "full_sync_interval_s": _float(0, 86400),
    "max_datagram": _int(512, 65000),
}
SYNC_KEY_MIN = 16


def _parse_sync(
    ctx: _Ctx, raw: Any, vrrp_names: list[str], names_known: bool = True, ecmp: bool = False
) -> SyncConfig | None:
    tbl = _table(ctx, "sync", raw, _SYNC)
    if tbl is None:
        return None
    v = {k: _get(ctx, tbl, "sync", k, c, _default(SyncConfig, k)) for k, c in _SYNC.items()}
    ok = all(v[k] is not None for k in tbl if k in _SYNC)
    enabled = v["enabled"] is True
    if enabled:
        if "listen" not in tbl:
            ctx.err(
                "sync.listen",
                'required when enabled; add listen = "10.99.0.2:9542" (this node\'s address)',
            )
            ok = False
        if "peers" not in tbl:
            ctx.err(
                "sync.peers",
                'required when enabled; add peers = ["10.99.0.3:9542"] (the other node)',
            )
            ok = False
        elif v["peers"] == ():
            ctx.err("sync.peers", 'is empty; add the other node, e.g. peers = ["10.99.0.3:9542"]')
            ok = False
        if "key" not in tbl and "key_file" not in tbl:
            ctx.err(
                "sync.key",
                f'required when enabled; set key = "..." (a shared secret of {SYNC_KEY_MIN}+ characters) '
                'or key_file = "/etc/l4lb/sync.key"',
            )
            ok = False
        if "vrrp_instance" not in tbl and not ecmp:  # ECMP: every node sends
            hint = f' = "{vrrp_names[0]}"' if len(vrrp_names) == 1 else ' = "VI_1"'
            ctx.err(
                "sync.vrrp_instance",
                f"required when enabled; add vrrp_instance{hint} (the [[vrrp]] instance whose state decides "
                "who sends)",
            )
            ok = False
    if "key" in tbl and "key_file" in tbl:
        ctx.err("sync.key_file", "set either key or key_file, not both; remove one")
        ok = False
    if v["key"] is not None and len(v["key"]) < SYNC_KEY_MIN:
        ctx.err(
            "sync.key",
            f"is {len(v['key'])} characters; an HMAC key needs at least {SYNC_KEY_MIN} "
            "(e.g. the output of `openssl rand -hex 32`)",
        )
        ok = False
    name = v["vrrp_instance"]
    if name is not None and name not in vrrp_names and names_known:
        msg = f"no [[vrrp]] instance is named {_q(name)}"
        close = difflib.get_close_matches(name, vrrp_names, n=1, cutoff=0.6)
        if close:
            msg += f"; did you mean {_q(close[0])}?"
        elif vrrp_names:
            msg += f"; known: {', '.join(_q(n) for n in vrrp_names)}"
        else:
            msg += "; add a [[vrrp]] instance (sync follows its master/backup state)"
        ctx.err("sync.vrrp_instance", msg)
        ok = False
    listen, peers = v["listen"], v["peers"]
    if listen is not None and peers:
        for i, peer in enumerate(peers):
            p = f"sync.peers[{i}]"
            if peer == listen:
                ctx.err(p, f"{peer} is this node's listen address; list only the other nodes")
                ok = False
            elif peer.family != listen.family:
                ctx.err(
                    p,
                    f"{peer} is IPv{peer.family} but listen is IPv{listen.family}; one socket serves all peers, "
                    "so use the same family",
                )
                ok = False
    if not ok:
        return None
    return SyncConfig(**v)
