"""Config -> plain dict -> TOML text (for the API to persist run-time changes, and the importer).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
from collections.abc import Mapping
from typing import Any

from l4lb.config.model import Config, Endpoint, HealthCheckConfig, _resolve_hc_port

# --------------------------------------------------------------------------
# Back to a dict / TOML (for the API to persist run-time changes)
# --------------------------------------------------------------------------


def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, (ipaddress.IPv4Address, ipaddress.IPv6Address, Endpoint)):
        return str(v)
    if isinstance(v, (ipaddress.IPv4Interface, ipaddress.IPv6Interface)):
        return v.with_prefixlen
    if dataclasses.is_dataclass(v):
        return {
            f.name: _plain(getattr(v, f.name))
            for f in dataclasses.fields(v)
            if getattr(v, f.name) is not None
        }
    return v


def _hc_diff(hc: HealthCheckConfig, base: HealthCheckConfig) -> dict[str, Any]:
    return {
        f.name: _plain(getattr(hc, f.name))
        for f in dataclasses.fields(hc)
        if getattr(hc, f.name) != getattr(base, f.name) and getattr(hc, f.name) is not None
    }


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """A plain dict (str/int/float/bool/list/dict only) that config_from_dict turns back into `cfg`.

    Every field is written out explicitly; healthcheck overrides only where they differ
    from the level above. Feed it to dumps_toml() to get a config file.
    """
    out: dict[str, Any] = {"node": _plain(cfg.node), "healthcheck": _plain(cfg.healthcheck)}
    vips = []
    for vip in cfg.vips:
        d = {
            k: _plain(getattr(vip, k))
            for k in ("address", "port", "protocol", "mode", "hash", "ring_size", "all_down")
        }
        hc = _hc_diff(vip.healthcheck, cfg.healthcheck)
        if hc:
            d["healthcheck"] = hc
        base = _resolve_hc_port(vip.healthcheck, vip.port)
        reals = []
        for real in vip.reals:
            r: dict[str, Any] = {"address": str(real.address), "weight": real.weight}
            if real.mac is not None:
                r["mac"] = real.mac
            rhc = _hc_diff(real.healthcheck, base)
            if rhc:
                r["healthcheck"] = rhc
            reals.append(r)
        d["real"] = reals
        vips.append(d)
    if vips:
        out["vip"] = vips
    out["metrics"] = _plain(cfg.metrics)
    if cfg.vrrp:
        out["vrrp"] = [_plain(v) for v in cfg.vrrp]
    out["sync"] = _plain(cfg.sync)
    if cfg.bgp is not None:
        out["bgp"] = _plain(cfg.bgp)
    return out


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_str(s: str) -> str:
    out = ['"']
    for ch in s:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_key(k: str) -> str:
    return k if _BARE_KEY.fullmatch(k) else _toml_str(k)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return (
            "{ "
            + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items() if x is not None)
            + " }"
        )
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def _is_table_array(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def dumps_toml(data: Mapping[str, Any]) -> str:
    """Write a dict of TOML-able values (such as config_to_dict's) as TOML text."""
    lines: list[str] = []

    def emit(path: list[str], tbl: Mapping[str, Any], header: str | None) -> None:
        if header is not None:
            if lines:
                lines.append("")
            lines.append(header)
        for k, v in tbl.items():
            if v is not None and not isinstance(v, dict) and not _is_table_array(v):
                lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        for k, v in tbl.items():  # then sub-tables, in order (scalars must come first)
            dotted = ".".join(_toml_key(p) for p in path + [k])
            if isinstance(v, dict):
                emit(path + [k], v, f"[{dotted}]")
            elif _is_table_array(v):
                for item in v:
                    emit(path + [k], item, f"[[{dotted}]]")

    emit([], data, None)
    return "\n".join(lines) + "\n"
