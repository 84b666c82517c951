"""TOML / dict -> Config: the [node], [healthcheck], [[vip]], [metrics] sections and the
entry points (config_from_dict, parse_config, load_config), collecting every error
before raising one ConfigError. [[vrrp]] and [sync] are in parse_ha.py, [bgp] in bgp.py.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from l4lb.config.bgp import parse_bgp
from l4lb.config.checks import Capacity, check_capacity
from l4lb.config.convert import (
    _VRRP_NAME,
    Conv,
    _argv,
    _bool,
    _check_abs_path,
    _check_http_host,
    _check_http_path,
    _check_ifname,
    _check_mac,
    _check_node_name,
    _Ctx,
    _endpoint,
    _enum,
    _float,
    _get,
    _int,
    _ip,
    _join,
    _list,
    _num,
    _q,
    _str,
    _table,
    _tables,
)
from l4lb.config.model import (
    DEFAULT_PIN_PATH,
    UNIX_PATH_MAX,
    Config,
    ConfigError,
    HealthCheckConfig,
    IPAddress,
    MetricsConfig,
    NodeConfig,
    RealConfig,
    SyncConfig,
    VipConfig,
    VrrpConfig,
    _default,
    _resolve_hc_port,
    _tunnel_hc_unfit,
)
from l4lb.config.parse_ha import _parse_sync, _parse_vrrp
from l4lb.maglev import is_prime

# --------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------

_NODE: dict[str, Conv] = {
    "name": _str(_check_node_name),
    "interfaces": _list(_str(_check_ifname), what="interface names", unique=True, nonempty=True),
    "xdp_mode": _enum("native", "generic"),
    "pin_path": _str(_check_abs_path(DEFAULT_PIN_PATH)),
    "api_socket": _str(_check_abs_path("/run/l4lb/lb1.sock", UNIX_PATH_MAX)),
    "conn_table_size": _int(1024, 67108864),
    "conn_timeout_s": _int(1, 86400),
    "new_flow_rate": _int(1, 4294967295),
    "script_security": _bool,
    "vrrp_rt_priority": _int(0, 99),
}


def _parse_node(ctx: _Ctx, raw: Any) -> NodeConfig | None:
    tbl = _table(ctx, "node", raw, _NODE)
    if tbl is None:
        return None
    v: dict[str, Any] = {}
    for key, conv in _NODE.items():
        required = None
        if key == "name":
            required = 'add name = "lb1" (1-32 characters from A-Z a-z 0-9 _ -)'
        elif key == "interfaces":
            required = 'add interfaces = ["eth0"] (where XDP attaches)'
        v[key] = _get(ctx, tbl, "node", key, conv, _default(NodeConfig, key), required)
    if v["name"] is None or v["interfaces"] is None:
        return None
    return NodeConfig(**{k: x for k, x in v.items() if x is not None})


_HC: dict[str, Conv] = {
    "type": _enum("tcp", "http", "https", "script", "none"),
    "port": _int(0, 65535),
    "interval_s": _float(0, 3600, lo_open=True),
    "timeout_s": _float(0, 3600, lo_open=True),
    "rise": _int(1, 100),
    "fall": _int(1, 100),
    "http_path": _str(_check_http_path),
    "http_expect_status": _int(100, 599),
    "http_host": _str(_check_http_host),
    "script": _argv,
    "via": _enum("auto", "direct", "tunnel"),
}
_HC_DEFAULTS = {f.name: f.default for f in dataclasses.fields(HealthCheckConfig)}


class _HcLayer:
    """A merged healthcheck: the effective values and which layer set each one."""

    def __init__(
        self, values: dict[str, Any], origin: dict[str, str], bad: set[str] | None = None
    ) -> None:
        self.values = values
        self.origin = origin
        self.bad = bad or set()  # keys that were invalid in some layer (already reported)

    def build(self) -> HealthCheckConfig:
        return HealthCheckConfig(**self.values)


_HC_BASE = _HcLayer(dict(_HC_DEFAULTS), {k: "the default" for k in _HC_DEFAULTS})


def _parse_hc(ctx: _Ctx, path: str, raw: Any, base: _HcLayer) -> _HcLayer:
    """Validate one healthcheck table and merge it over `base`.

    Cross-field rules are checked on the merged result but reported only at the
    layer that set one of the fields involved, so a bad default is reported once.
    """
    tbl = _table(ctx, path, raw, _HC)
    if tbl is None:
        return base
    layer: dict[str, Any] = {}
    bad: set[str] = set()
    for key in tbl:
        if key in _HC:
            val = _HC[key](ctx, _join(path, key), tbl[key])
            if val is None:
                bad.add(key)
            else:
                layer[key] = val
    values = {**base.values, **layer}
    origin = {**base.origin, **{k: path for k in layer}}

    if ({"timeout_s", "interval_s"} & layer.keys()) and not ({"timeout_s", "interval_s"} & bad):
        t, i = values["timeout_s"], values["interval_s"]
        if t > i:
            if "timeout_s" in layer:
                where, other, other_v, own_v = "timeout_s", "interval_s", i, t
            else:
                where, other, other_v, own_v = "interval_s", "timeout_s", t, i
            src = origin[other]
            from_ = "" if src == path else f", from {src}"
            relation = "must be <=" if where == "timeout_s" else "must be >="
            ctx.err(
                _join(path, where),
                f"{_num(own_v)} {relation} {other} ({_num(other_v)}{from_}); a probe must time out "
                "before the next one starts",
            )
    # type = "script" without a script is checked per real (_parse_real): a VIP may set
    # the type and leave each real its own script, as keepalived's MISC_CHECK does.
    return _HcLayer(values, origin, base.bad | bad)


# Tuples, not sets: "expected one of: ..." lists keys in schema order.
_REAL = ("address", "weight", "mac", "healthcheck")
_VIP = (
    "address",
    "port",
    "protocol",
    "mode",
    "hash",
    "ring_size",
    "all_down",
    "healthcheck",
    "real",
)


def _ring_size(ctx: _Ctx, path: str, v: Any) -> int | None:
    n = _int(7, 1048573)(ctx, path, v)
    if n is None:
        return None
    if not is_prime(n):
        lo = next(k for k in range(n - 1, 1, -1) if is_prime(k))
        hi = next(k for k in range(n + 1, 2 * n + 2) if is_prime(k))
        near = ", ".join(str(k) for k in (lo, hi) if 7 <= k <= 1048573)
        ctx.err(path, f"{n} is not prime; Maglev needs a prime table size (nearest: {near})")
        return None
    return n


def _parse_vip(ctx: _Ctx, path: str, tbl: dict, hc_base: _HcLayer) -> VipConfig | None:
    _table(ctx, path, tbl, _VIP)
    address = _get(
        ctx, tbl, path, "address", _ip(), required='add address = "10.99.0.100" (IPv4 or IPv6)'
    )
    port = _get(
        ctx,
        tbl,
        path,
        "port",
        _int(0, 65535),
        required="add port = 80 (0 = every port of the address)",
    )
    protocol = _get(ctx, tbl, path, "protocol", _enum("tcp", "udp"), "tcp")
    mode = _get(ctx, tbl, path, "mode", _enum("dr", "tun"), "dr")
    hash_ = _get(ctx, tbl, path, "hash", _enum("5tuple", "source"), "5tuple")
    ring_size = _get(ctx, tbl, path, "ring_size", _ring_size, 65537)
    all_down = _get(ctx, tbl, path, "all_down", _enum("keep", "drop"), "keep")

    hc = hc_base
    if "healthcheck" in tbl:
        hc = _parse_hc(ctx, _join(path, "healthcheck"), tbl["healthcheck"], hc_base)

    reals: list[RealConfig] = []
    ok = None not in (address, port, protocol, mode, hash_, ring_size, all_down)
    rpath = _join(path, "real")
    # A VIP may start with no reals (like `ipvsadm -A` before `-a`): it drops new
    # flows until `l4lb real add` gives it one.
    if "real" in tbl:
        raw = tbl["real"]
        items = _tables(ctx, rpath, raw, "vip.real")
        if not isinstance(raw, list) or len(items) != len(raw):
            ok = False
        seen: dict[IPAddress, str] = {}
        for p, rt in items:
            real = _parse_real(ctx, p, rt, hc, port, address, mode)
            if real is None:
                ok = False
                continue
            if real.address in seen:
                ctx.err(
                    _join(p, "address"),
                    f"{real.address} duplicates {seen[real.address]}; each real may appear once per VIP",
                )
                ok = False
                continue
            seen[real.address] = p
            reals.append(real)
        if ring_size is not None and len(items) > ring_size:
            ctx.err(
                _join(path, "ring_size"),
                f"{ring_size} is smaller than the number of reals ({len(items)}); use a prime at least "
                "100 times the number of reals, e.g. 65537",
            )
            ok = False
    if not ok:
        return None
    return VipConfig(
        address=address,
        port=port,
        protocol=protocol,
        mode=mode,
        hash=hash_,
        ring_size=ring_size,
        all_down=all_down,
        healthcheck=hc.build(),
        reals=tuple(reals),
    )


def _parse_real(
    ctx: _Ctx,
    path: str,
    tbl: dict,
    hc_vip: _HcLayer,
    vip_port: int | None,
    vip_addr: IPAddress | None,
    mode: str | None,
) -> RealConfig | None:
    _table(ctx, path, tbl, _REAL)
    address = _get(ctx, tbl, path, "address", _ip(), required='add address = "10.99.0.11"')
    weight = _get(ctx, tbl, path, "weight", _int(0, 65535), 100)
    mac = _get(ctx, tbl, path, "mac", _str(_check_mac))
    if mac is not None:
        mac = mac.lower()
    bad_mac = "mac" in tbl and mac is None
    hc = hc_vip
    hc_path = _join(path, "healthcheck")
    if "healthcheck" in tbl:
        hc = _parse_hc(ctx, hc_path, tbl["healthcheck"], hc_vip)
    bad_hc = False
    if (
        hc.values["type"] == "script"
        and hc.values["script"] is None
        and not {"type", "script"} & hc.bad
    ):
        bad_hc = True
        where = hc.origin["type"]
        fix = 'add script = ["/usr/local/bin/check", "arg"]'
        if where == hc_path:
            ctx.err(_join(hc_path, "script"), f'required when type = "script"; {fix}')
        elif where not in ctx.reported:
            ctx.reported.add(where)
            ctx.err(
                _join(where, "script"),
                f'required when type = "script": {path} gets no script; {fix} here, or in each '
                "real's [vip.real.healthcheck]",
            )
    if address is not None and vip_addr is not None:
        if address == vip_addr:
            ctx.err(
                _join(path, "address"),
                f"{address} is the VIP itself; give the real server's own address "
                "(reals hold the VIP on lo, but are reached by their own address)",
            )
            address = None
        elif mode == "dr" and address.version != vip_addr.version:
            want = f"IPv{vip_addr.version}"
            ctx.err(
                _join(path, "address"),
                f"{address} is IPv{address.version} but the VIP is {want}; dr mode forwards at layer 2 "
                f'and needs the same family — use mode = "tun" or an {want} real',
            )
            address = None
    if hc.values["via"] == "tunnel" and "via" not in hc.bad and address is not None \
            and vip_addr is not None and mode is not None:
        why = _tunnel_hc_unfit(mode, hc.values["type"], address.version, vip_addr.version)
        if why:
            bad_hc = True
            ctx.err(_join(hc.origin["via"], "via"), f'"tunnel" does not fit {path}: {why}; '
                    'use via = "direct" (or "auto")')
    if address is None or weight is None or bad_mac or bad_hc or vip_port is None:
        return None
    return RealConfig(
        address=address,
        weight=weight,
        mac=mac,
        healthcheck=_resolve_hc_port(hc.build(), vip_port),
    )


_METRICS: dict[str, Conv] = {
    "listen": _endpoint(allow_unspecified=True, example="127.0.0.1:9541"),
    "enabled": _bool,
}


def _parse_metrics(ctx: _Ctx, raw: Any) -> MetricsConfig | None:
    tbl = _table(ctx, "metrics", raw, _METRICS)
    if tbl is None:
        return None
    v = {
        k: _get(ctx, tbl, "metrics", k, c, _default(MetricsConfig, k)) for k, c in _METRICS.items()
    }
    if None in v.values():
        return None
    return MetricsConfig(**v)


_TOP = ("node", "healthcheck", "vip", "metrics", "vrrp", "sync", "bgp")


def config_from_dict(
    data: Mapping[str, Any], source: str = "<dict>", limits: Capacity | None = None
) -> Config:
    """Validate a dict shaped like the TOML document (as tomllib returns it).

    `limits`: what the data plane holds (default: the compiled defaults, any ring size).
    """
    ctx = _Ctx()
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: expected a table at the top level"], source)
    _table(ctx, "", data, _TOP)

    node = None
    if "node" not in data:
        ctx.err(
            "node",
            'required section; add a [node] table with name = "lb1" and interfaces = ["eth0"]',
        )
    else:
        node = _parse_node(ctx, data["node"])

    hc = _HC_BASE
    if "healthcheck" in data:
        hc = _parse_hc(ctx, "healthcheck", data["healthcheck"], _HC_BASE)

    vips: list[VipConfig] = []
    seen_vips: dict[str, str] = {}
    if "vip" in data:
        for p, t in _tables(ctx, "vip", data["vip"], "vip"):
            vip = _parse_vip(ctx, p, t, hc)
            if vip is None:
                continue
            if vip.key in seen_vips:
                ctx.err(
                    p,
                    f"duplicates {seen_vips[vip.key]} ({vip.key}); each address, port and protocol may "
                    "appear once — merge their reals or remove one",
                )
                continue
            seen_vips[vip.key] = p
            vips.append(vip)

    metrics = MetricsConfig()
    if "metrics" in data:
        metrics = _parse_metrics(ctx, data["metrics"]) or metrics

    vrrp: list[VrrpConfig] = []
    names: dict[str, str] = {}
    vrids: dict[tuple[str, int, int], str] = {}
    raw_names: list[str] = []
    names_known = True
    if "vrrp" in data:
        for p, t in _tables(ctx, "vrrp", data["vrrp"], "vrrp"):
            if isinstance(t.get("name"), str) and _VRRP_NAME.fullmatch(t["name"]):
                raw_names.append(t["name"])
            else:
                names_known = False  # already an error; don't blame sync.vrrp_instance too
            inst = _parse_vrrp(ctx, p, t)
            if inst is None:
                continue
            dup = False
            if inst.name in names:
                ctx.err(
                    _join(p, "name"),
                    f"{_q(inst.name)} is already used by {names[inst.name]}; names must be unique",
                )
                dup = True
            vkey = (inst.interface, inst.vrid, inst.family)
            if vkey in vrids:
                ctx.err(
                    _join(p, "vrid"),
                    f"{inst.vrid} on {inst.interface} (IPv{inst.family}) is already used by {vrids[vkey]}; "
                    "each instance on a link needs its own vrid",
                )
                dup = True
            if dup:
                continue
            names[inst.name] = p
            vrids[vkey] = p
            vrrp.append(inst)

    sync = SyncConfig()
    if "sync" in data:
        sync = _parse_sync(ctx, data["sync"], list(dict.fromkeys(raw_names)), names_known,
                           ecmp="bgp" in data) or sync

    bgp = None
    if "bgp" in data:
        bgp = parse_bgp(ctx, data["bgp"], {v.address for v in vips}, bool(vrrp) or bool(data.get("vrrp")))

    if ctx.errors or node is None:
        raise ConfigError(ctx.errors or ["node: invalid"], source)
    cfg = Config(
        node=node,
        healthcheck=hc.build(),
        vips=tuple(vips),
        metrics=metrics,
        vrrp=tuple(vrrp),
        sync=sync,
        bgp=bgp,
        source=source,
    )
    # What any data plane holds (ring sizes are chosen at start to fit the file;
    # the running daemon checks them with check_capacity against its own maps).
    errs = check_capacity(cfg, limits or Capacity())
    if errs:
        raise ConfigError(errs, source)
    return cfg


_TOML_POS = re.compile(r"^(.*) \(at line (\d+), column (\d+)\)$", re.S)


def parse_config(text: str, source: str = "<string>") -> Config:
    """Parse and validate TOML text. Raises ConfigError listing every problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = _TOML_POS.match(str(exc))
        if m:
            msg = f"{source}: invalid TOML at line {m.group(2)}, column {m.group(3)}: {m.group(1)}"
        else:
            msg = f"{source}: invalid TOML: {exc}"
        raise ConfigError([msg], source) from None
    return config_from_dict(data, source)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file. Raises ConfigError listing every problem."""
    source = os.fspath(path)
    try:
        raw = Path(source).read_bytes()
    except OSError as exc:
        raise ConfigError(
            [f"{source}: cannot read the config file: {exc.strerror or exc}"], source
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [f"{source}: not UTF-8 text (byte {exc.start}); TOML files must be UTF-8"], source
        ) from None
    return parse_config(text, source)
