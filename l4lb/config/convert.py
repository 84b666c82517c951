"""Validation machinery shared by every section parser (and bgp.py).

A converter takes (ctx, path, value), appends "path: message" to ctx on error and
returns None; otherwise it returns the converted value.
"""

from __future__ import annotations

import difflib
import functools
import ipaddress
import json
import math
import re
import shlex
from collections.abc import Callable, Mapping
from pathlib import PurePosixPath
from typing import Any

from l4lb.config.dump import _toml_str
from l4lb.config.model import Endpoint, IPAddress, IPInterface

# --------------------------------------------------------------------------
# Validation machinery: converters append "path: message" and return None on error.
# --------------------------------------------------------------------------


class _Ctx:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.reported: set[str] = set()  # paths already blamed for a shared problem

    def err(self, path: str, msg: str) -> None:
        self.errors.append(f"{path}: {msg}")


Conv = Callable[[_Ctx, str, Any], Any]


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _q(s: str) -> str:
    if len(s) > 60:
        s = s[:57] + "..."
    return json.dumps(s, ensure_ascii=False)


def _describe(v: Any) -> str:
    if isinstance(v, bool):
        return f"boolean {'true' if v else 'false'}"
    if isinstance(v, int):
        return f"integer {v}"
    if isinstance(v, float):
        return f"float {v!r}"
    if isinstance(v, str):
        return f"string {_q(v)}"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "a table"
    return f"a {type(v).__name__}"  # datetime, date, time


_NUMERIC_STR = re.compile(r"[+-]?\d+(\.\d+)?")


def _type_msg(expected: str, v: Any, kind: str = "") -> str:
    msg = f"expected {expected}, got {_describe(v)}"
    if isinstance(v, str) and kind in ("int", "float") and _NUMERIC_STR.fullmatch(v.strip()):
        msg += "; remove the quotes"
    elif isinstance(v, float) and kind == "int" and v.is_integer():
        msg += f"; write {int(v)} without the decimal point"
    elif isinstance(v, str) and kind == "bool" and v.strip().lower() in ("true", "false"):
        msg += f"; write {v.strip().lower()} without the quotes"
    return msg


def _num(v: int | float) -> str:
    return repr(v)


def _int(lo: int, hi: int) -> Conv:
    def conv(ctx: _Ctx, path: str, v: Any) -> int | None:
        if isinstance(v, bool) or not isinstance(v, int):
            ctx.err(path, _type_msg("an integer", v, "int"))
            return None
        if not lo <= v <= hi:
            ctx.err(path, f"{v} is out of range {lo}..{hi}")
            return None
        return v

    return conv


def _float(lo: float, hi: float, *, lo_open: bool = False) -> Conv:
    def conv(ctx: _Ctx, path: str, v: Any) -> float | None:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            ctx.err(path, _type_msg("a number", v, "float"))
            return None
        if not math.isfinite(v):
            ctx.err(path, f"{_num(v)} is not a finite number")
            return None
        if lo_open and not lo < v <= hi:
            ctx.err(path, f"{_num(v)} is out of range: must be > {lo:g} and <= {hi:g}")
            return None
        if not lo_open and not lo <= v <= hi:
            ctx.err(path, f"{_num(v)} is out of range {lo:g}..{hi:g}")
            return None
        return float(v)

    return conv


def _bool(ctx: _Ctx, path: str, v: Any) -> bool | None:
    if not isinstance(v, bool):
        ctx.err(path, _type_msg("a boolean (true or false)", v, "bool"))
        return None
    return v


def _enum(*choices: Any) -> Conv:
    strings = all(isinstance(c, str) for c in choices)
    listed = ", ".join(_q(c) if isinstance(c, str) else str(c) for c in choices)

    def conv(ctx: _Ctx, path: str, v: Any) -> Any:
        if strings and not isinstance(v, str):
            ctx.err(path, _type_msg(f"a string, one of {listed}", v))
            return None
        if not strings and (isinstance(v, bool) or not isinstance(v, int)):
            ctx.err(path, _type_msg(f"an integer, one of {listed}", v, "int"))
            return None
        if v not in choices:
            msg = f"{_q(v) if strings else v} is not one of {listed}"
            if strings:
                close = difflib.get_close_matches(v.lower(), choices, n=1, cutoff=0.6)
                if close:
                    msg += f"; did you mean {_q(close[0])}?"
            ctx.err(path, msg)
            return None
        return v

    return conv


def _str(check: Callable[[str], str | None] | None = None) -> Conv:
    """A string; `check` returns an error message or None."""

    def conv(ctx: _Ctx, path: str, v: Any) -> str | None:
        if not isinstance(v, str):
            ctx.err(path, _type_msg("a string", v))
            return None
        if check is not None:
            problem = check(v)
            if problem:
                ctx.err(path, problem)
                return None
        return v

    return conv


_NODE_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")
_VRRP_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")


def _check_node_name(v: str) -> str | None:
    if not _NODE_NAME.fullmatch(v):
        return (
            f"{_q(v)} is not a valid node name; use 1-32 characters from A-Z a-z 0-9 _ - "
            "(it goes into pin paths and sync messages)"
        )
    return None


def _check_vrrp_name(v: str) -> str | None:
    if not _VRRP_NAME.fullmatch(v):
        return f"{_q(v)} is not a valid instance name; use 1-64 characters from A-Z a-z 0-9 _ . -"
    return None


def _check_ifname(v: str) -> str | None:
    # Linux dev_valid_name(): 1..15 bytes, not "." or "..", no "/", ":" or whitespace.
    if (
        not v
        or len(v.encode()) > 15
        or v in (".", "..")
        or any(c in "/:" or c.isspace() for c in v)
    ):
        return (
            f"{_q(v)} is not a valid interface name; Linux names are 1-15 characters "
            'without "/", ":" or whitespace'
        )
    return None


def _check_abs_path(example: str, max_len: int | None = None) -> Callable[[str], str | None]:
    def check(v: str) -> str | None:
        if not PurePosixPath(v).is_absolute():
            return f"{_q(v)} is not an absolute path; write it from the root, e.g. {_q(example)}"
        if "\0" in v:
            return "path contains a NUL character"
        if max_len is not None and len(v.encode()) > max_len:
            return (
                f"{_q(v)} is {len(v.encode())} bytes; a unix socket path may be at most {max_len}"
            )
        return None

    return check


def _check_http_path(v: str) -> str | None:
    if not v.startswith("/") or any(c.isspace() for c in v):
        return f'{_q(v)} is not a URL path; it must start with "/" and contain no spaces, e.g. "/healthz"'
    return None


def _check_http_host(v: str) -> str | None:
    if not v or any(c.isspace() for c in v):
        return f'{_q(v)} is not a valid Host header; give a host name such as "www.example.test"'
    return None


def _check_mac(v: str) -> str | None:
    if not _MAC.fullmatch(v):
        return f'{_q(v)} is not a MAC address; write six colon-separated hex bytes, e.g. "52:54:00:12:34:56"'
    first = int(v[:2], 16)
    if first & 1:
        return f"{v} is a multicast/broadcast MAC; a real's next hop needs its unicast MAC"
    if int(v.replace(":", ""), 16) == 0:
        return f"{v} is the all-zero MAC; give the real's MAC or remove mac to resolve it from the neighbour table"
    return None


@functools.lru_cache(maxsize=65536)
def _parse_ip(text: str) -> IPAddress:
    # Runtime API changes re-validate the whole config: caching keeps a VIP of
    # thousands of reals cheap to re-check.
    return ipaddress.ip_address(text)


def _ip(*, allow_unspecified: bool = False) -> Conv:
    def conv(ctx: _Ctx, path: str, v: Any) -> IPAddress | None:
        if not isinstance(v, str):
            ctx.err(path, _type_msg('an IP address string (e.g. "10.99.0.10")', v))
            return None
        if "/" in v:
            ctx.err(path, f'{_q(v)}: expected a single address, without "/prefix"')
            return None
        try:
            addr = _parse_ip(v.strip())
        except ValueError:
            ctx.err(path, f"{_q(v)} is not a valid IPv4 or IPv6 address")
            return None
        if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id:
            ctx.err(
                path,
                f"{_q(v)}: scoped (%zone) addresses are not supported; drop the %{addr.scope_id}",
            )
            return None
        if addr.is_multicast:
            ctx.err(path, f"{addr} is a multicast address; give a unicast address")
            return None
        if addr.is_unspecified and not allow_unspecified:
            ctx.err(path, f"{addr} is the unspecified address; give a real unicast address")
            return None
        return addr

    return conv


def _ip_interface(ctx: _Ctx, path: str, v: Any) -> IPInterface | None:
    if not isinstance(v, str):
        ctx.err(path, _type_msg('an address string, "addr" or "addr/prefix"', v))
        return None
    try:
        iface = ipaddress.ip_interface(v.strip())
    except ValueError:
        ctx.err(path, f'{_q(v)} is not "addr" or "addr/prefix" (e.g. "10.99.0.100/24")')
        return None
    if isinstance(iface, ipaddress.IPv6Interface) and iface.ip.scope_id:
        ctx.err(path, f"{_q(v)}: scoped (%zone) addresses are not supported")
        return None
    if iface.ip.is_multicast or iface.ip.is_unspecified:
        ctx.err(path, f"{iface.ip} is not a unicast address; VRRP VIPs must be unicast")
        return None
    return iface


def _endpoint(*, allow_unspecified: bool, example: str) -> Conv:
    def conv(ctx: _Ctx, path: str, v: Any) -> Endpoint | None:
        if not isinstance(v, str):
            ctx.err(path, _type_msg(f'a "host:port" string (e.g. "{example}")', v))
            return None
        bad = f'{_q(v)} is not "host:port" with an IP address; write e.g. "{example}" or "[fd99::1]:{example.rsplit(":", 1)[1]}"'
        m = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]+):(\d+)", v.strip())
        if not m:
            if v.count(":") > 1 and not v.startswith("["):
                bad += " (IPv6 addresses need brackets)"
            ctx.err(path, bad)
            return None
        host_s, port_s = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        try:
            host = ipaddress.ip_address(host_s)
        except ValueError:
            ctx.err(path, bad)
            return None
        if m.group(1) and host.version != 6:
            ctx.err(path, f"{_q(v)}: brackets are for IPv6 addresses; write {host}:{port_s}")
            return None
        port = int(port_s)
        if not 1 <= port <= 65535:
            ctx.err(path, f"{_q(v)}: port {port} is out of range 1..65535")
            return None
        if host.is_multicast or (host.is_unspecified and not allow_unspecified):
            ctx.err(path, f"{_q(v)}: {host} cannot be used here; give a unicast address")
            return None
        return Endpoint(host, port)

    return conv


_SHELL_CHARS = set("|&;<>$`*?(){}~")


def _argv(ctx: _Ctx, path: str, v: Any) -> tuple[str, ...] | None:
    if isinstance(v, str):
        try:
            words = shlex.split(v)
        except ValueError:
            words = []
        if not words or any(c in _SHELL_CHARS for c in v):
            words = ["/bin/sh", "-c", v]
        suggestion = "[" + ", ".join(_toml_str(w) for w in words) + "]"
        ctx.err(
            path,
            f"expected a list of strings, got string {_q(v)}; use a list: argv, not a shell "
            f"string, e.g. {suggestion}",
        )
        return None
    if not isinstance(v, list):
        ctx.err(
            path, _type_msg('a list of strings (argv, e.g. ["/usr/local/bin/check", "arg"])', v)
        )
        return None
    if not v:
        ctx.err(path, 'is empty; give the command as argv, e.g. ["/usr/local/bin/check", "arg"]')
        return None
    ok = True
    for i, item in enumerate(v):
        if not isinstance(item, str):
            ctx.err(f"{path}[{i}]", _type_msg("a string", item))
            ok = False
    if ok and not v[0]:
        ctx.err(
            f"{path}[0]", 'the program name is empty; give a path such as "/usr/local/bin/check"'
        )
        ok = False
    return tuple(v) if ok else None


def _list(item: Conv, *, what: str, unique: bool = False, nonempty: bool = False) -> Conv:
    def conv(ctx: _Ctx, path: str, v: Any) -> tuple | None:
        if not isinstance(v, list):
            ctx.err(path, _type_msg(f"a list of {what}", v))
            return None
        if nonempty and not v:
            ctx.err(path, f"is empty; give at least one of {what}")
            return None
        out = []
        ok = True
        seen: dict[Any, int] = {}
        for i, raw in enumerate(v):
            p = f"{path}[{i}]"
            val = item(ctx, p, raw)
            if val is None:
                ok = False
                continue
            if unique:
                if val in seen:
                    ctx.err(p, f"{val} duplicates {path}[{seen[val]}]; list it once")
                    ok = False
                    continue
                seen[val] = i
            out.append(val)
        return tuple(out) if ok else None

    return conv


def _table(ctx: _Ctx, path: str, v: Any, keys: Mapping[str, Any] | tuple[str, ...]) -> dict | None:
    """Check `v` is a table with only known keys; returns it, or None if not a table."""
    if not isinstance(v, dict):
        ctx.err(path, _type_msg("a table", v))
        return None
    for k in v:
        if k not in keys:
            close = difflib.get_close_matches(k, list(keys), n=1, cutoff=0.6)
            if close:
                ctx.err(_join(path, k), f"unknown key; did you mean '{close[0]}'?")
            else:
                ctx.err(_join(path, k), f"unknown key; expected one of: {', '.join(keys)}")
    return v


def _tables(ctx: _Ctx, path: str, v: Any, header: str) -> list[tuple[str, dict]]:
    """An array of tables ([[header]]): returns (path, table) for each good item."""
    if isinstance(v, dict):
        ctx.err(
            path,
            f"expected an array of tables, got a table; write [[{header}]] (double brackets) for each entry",
        )
        return []
    if not isinstance(v, list):
        ctx.err(path, _type_msg(f"an array of tables ([[{header}]])", v))
        return []
    out = []
    for i, item in enumerate(v):
        p = f"{path}[{i}]"
        if not isinstance(item, dict):
            ctx.err(p, _type_msg("a table", item))
            continue
        out.append((p, item))
    return out


def _get(
    ctx: _Ctx,
    tbl: dict,
    path: str,
    key: str,
    conv: Conv,
    default: Any = None,
    required: str | None = None,
) -> Any:
    """The converted value of tbl[key]; `default` if absent; None if invalid.

    `required` is the fix shown when the key is missing and must not be.
    """
    p = _join(path, key)
    if key not in tbl:
        if required is not None:
            ctx.err(p, f"required; {required}")
        return default
    return conv(ctx, p, tbl[key])
