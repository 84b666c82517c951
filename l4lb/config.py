"""The l4lb config file: TOML in, frozen dataclasses out, strictly validated.

`parse_config` / `load_config` check everything that can be checked offline and
collect *every* problem before raising one `ConfigError`. Each message starts
with the exact field path and says how to fix it, e.g.::

    vip[1].real[0].weight: 70000 is out of range 0..65535
    vip[0].wieght: unknown key; did you mean 'weight'?

`check_system` checks what needs the machine (interfaces, scripts, key file,
bpffs) and is never called by the parsers, so `l4lb check` works anywhere.

Sections (see configs/*.toml for commented examples): [node], [healthcheck]
(defaults for every real), [[vip]] with [vip.healthcheck] and [[vip.real]] with
[vip.real.healthcheck] (merged field by field over the defaults), [metrics],
[[vrrp]], [sync].
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import ipaddress
import json
import math
import os
import re
import shlex
import shutil
import socket
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Union

from l4lb.dataplane import maps as _maps  # compile-time sizes only (no bcc)

if TYPE_CHECKING:  # config_bgp imports this module: the name is for annotations only
    from l4lb.config_bgp import BgpConfig
from l4lb.maglev import is_prime

__all__ = [
    "ConfigError",
    "Config",
    "NodeConfig",
    "HealthCheckConfig",
    "RealConfig",
    "VipConfig",
    "MetricsConfig",
    "VrrpConfig",
    "TrackInterface",
    "TrackScript",
    "SyncConfig",
    "Endpoint",
    "vip_key",
    "load_config",
    "parse_config",
    "config_from_dict",
    "config_to_dict",
    "dumps_toml",
    "check_system",
    "Capacity",
    "check_capacity",
    "config_warnings",
    "hc_via",
]

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPInterface = Union[ipaddress.IPv4Interface, ipaddress.IPv6Interface]

DEFAULT_PIN_PATH = "/sys/fs/bpf/l4lb"
API_SOCKET_DIR = "/run/l4lb"
UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the NUL


class ConfigError(Exception):
    """The config is invalid. `errors` holds every problem, one line each."""

    def __init__(self, errors: list[str], source: str | None = None) -> None:
        self.errors = list(errors)
        self.source = source
        super().__init__("\n".join(self.errors))

    def __str__(self) -> str:
        return "\n".join(self.errors)


# --------------------------------------------------------------------------
# The dataclasses. Their defaults are the config file's defaults.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """An IP literal and a port: "10.99.0.2:9542" or "[fd99::2]:9542"."""

    host: IPAddress
    port: int

    def __str__(self) -> str:
        if self.host.version == 6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @property
    def family(self) -> int:
        return self.host.version


@dataclass(frozen=True)
class NodeConfig:
    name: str
    interfaces: tuple[str, ...]
    xdp_mode: str = "native"
    pin_path: str = DEFAULT_PIN_PATH
    api_socket: str = ""  # "" = f"{API_SOCKET_DIR}/{name}.sock"
    conn_table_size: int = 1048576
    conn_timeout_s: int = 300  # UDP idle timeout; TCP entries leave by LRU eviction
    # New conn-table entries admitted per CPU and second (promoted TCP handshakes, new
    # UDP flows); above it a flow is forwarded by the ring without an entry, counted as
    # conn_guard_limited: a spoofed flood cannot evict the table's live flows.
    new_flow_rate: int = 10000
    # Refuse scripts that a non-root user could change (keepalived's enable_script_security).
    script_security: bool = True
    # SCHED_RR priority of the VRRP process (keepalived's vrrp_rt_priority); 0 = normal.
    # Refused by the system (EPERM): a warning, and VRRP runs at normal priority.
    vrrp_rt_priority: int = 0

    def __post_init__(self) -> None:
        if not self.api_socket:
            object.__setattr__(self, "api_socket", f"{API_SOCKET_DIR}/{self.name}.sock")


@dataclass(frozen=True)
class HealthCheckConfig:
    type: str = "tcp"
    port: int = 0  # 0 = the VIP's port (80 for port-0 VIPs); resolved in RealConfig
    interval_s: float = 2.0
    timeout_s: float = 1.0
    rise: int = 2
    fall: int = 3
    http_path: str = "/"
    http_expect_status: int = 200
    http_host: str | None = None
    script: tuple[str, ...] | None = None
    # "tunnel": probe through the tunnel (tc BPF: addressed to the VIP, encapsulated to
    # the real), so a real without decap fails; "auto": tunnel for tun VIPs (tcp/http/
    # https checks, real of the VIP's family), else direct. See hc_via().
    via: str = "auto"


@dataclass(frozen=True)
class RealConfig:
    address: IPAddress
    weight: int = 100  # 0 = drain: no new flows, existing flows stay
    mac: str | None = None  # lower case "aa:bb:cc:dd:ee:ff"; None = neighbour table
    healthcheck: HealthCheckConfig = HealthCheckConfig()  # fully merged, port resolved

    @property
    def family(self) -> int:
        return self.address.version


@dataclass(frozen=True)
class VipConfig:
    address: IPAddress
    port: int  # 0 = every port of the address
    protocol: str = "tcp"
    mode: str = "dr"
    hash: str = "5tuple"
    ring_size: int = 65537
    all_down: str = "keep"
    healthcheck: HealthCheckConfig = HealthCheckConfig()  # defaults + [vip.healthcheck]
    reals: tuple[RealConfig, ...] = ()

    @property
    def key(self) -> str:
        """Canonical id: "10.99.0.100:80/tcp", "[fd99::100]:80/tcp"."""
        return vip_key(self.address, self.port, self.protocol)

    @property
    def family(self) -> int:
        return self.address.version

    def real_by_address(self, address: str | IPAddress) -> RealConfig:
        addr = ipaddress.ip_address(address)
        for real in self.reals:
            if real.address == addr:
                return real
        raise KeyError(f"{self.key} has no real {addr}")


@dataclass(frozen=True)
class MetricsConfig:
    listen: Endpoint = Endpoint(ipaddress.IPv4Address("127.0.0.1"), 9541)
    enabled: bool = True


@dataclass(frozen=True)
class TrackInterface:
    name: str
    weight: int = 0  # 0 = the instance goes to FAULT while the interface is down


@dataclass(frozen=True)
class TrackScript:
    script: tuple[str, ...]
    interval_s: float = 1.0
    weight: int = 0  # 0 = the instance goes to FAULT while the script fails
    rise: int = 1
    fall: int = 1


@dataclass(frozen=True)
class VrrpConfig:
    name: str
    interface: str
    vrid: int
    vips: tuple[IPInterface, ...]
    priority: int = 100
    version: int = 3
    advert_interval_s: float = 1.0
    preempt: bool = True
    preempt_delay_s: float = 0.0
    accept_mode: bool = False
    unicast_src: IPAddress | None = None
    unicast_peers: tuple[IPAddress, ...] = ()
    auth_pass: str | None = field(default=None, repr=False)
    garp_count: int = 5
    garp_refresh_s: float = 0.0
    track_interfaces: tuple[TrackInterface, ...] = ()
    track_scripts: tuple[TrackScript, ...] = ()
    notify: tuple[str, ...] | None = None
    notify_master: tuple[str, ...] | None = None
    notify_backup: tuple[str, ...] | None = None
    notify_fault: tuple[str, ...] | None = None

    @property
    def family(self) -> int:
        return self.vips[0].version if self.vips else 4


@dataclass(frozen=True)
class SyncConfig:
    enabled: bool = False
    listen: Endpoint | None = None
    peers: tuple[Endpoint, ...] = ()
    key: str | None = field(default=None, repr=False)
    key_file: str | None = None
    vrrp_instance: str | None = None
    batch_max: int = 200
    batch_delay_ms: float = 5.0
    full_sync_interval_s: float = 60.0  # 0 = only when a peer starts
    max_datagram: int = 1400

    def load_key(self) -> bytes:
        """The HMAC key: `key` itself, or `key_file`'s content without surrounding whitespace."""
        if self.key is not None:
            return self.key.encode()
        if self.key_file is not None:
            data = Path(self.key_file).read_bytes().strip()
            if not data:
                raise ValueError(f"sync key file {self.key_file} is empty")
            return data
        raise ValueError("no sync key configured (set sync.key or sync.key_file)")


@dataclass(frozen=True)
class Config:
    node: NodeConfig
    healthcheck: HealthCheckConfig = HealthCheckConfig()
    vips: tuple[VipConfig, ...] = ()
    metrics: MetricsConfig = MetricsConfig()
    vrrp: tuple[VrrpConfig, ...] = ()
    sync: SyncConfig = SyncConfig()
    bgp: BgpConfig | None = None  # l4lb/config_bgp.py: ECMP mode when set
    source: str = field(default="<string>", compare=False)

    def vip_by_key(self, key: str) -> VipConfig:
        """The VIP whose `key` is `key` ("10.99.0.100:80/tcp"); KeyError if none.

        Non-canonical spellings of the address ("[fd99:0::100]:80/tcp") are accepted.
        """
        for vip in self.vips:
            if vip.key == key:
                return vip
        canon = _canonical_vip_key(key)
        if canon is not None:
            for vip in self.vips:
                if vip.key == canon:
                    return vip
        raise KeyError(key)

    def vrrp_by_name(self, name: str) -> VrrpConfig:
        for inst in self.vrrp:
            if inst.name == name:
                return inst
        raise KeyError(name)


def vip_key(address: IPAddress, port: int, protocol: str) -> str:
    if address.version == 6:
        return f"[{address}]:{port}/{protocol}"
    return f"{address}:{port}/{protocol}"


def _canonical_vip_key(key: str) -> str | None:
    m = re.fullmatch(r"\[?([^\[\]]+?)\]?:(\d+)/(\w+)", key.strip())
    if not m:
        return None
    try:
        addr = ipaddress.ip_address(m.group(1))
    except ValueError:
        return None
    return vip_key(addr, int(m.group(2)), m.group(3).lower())


def _default(cls: type, name: str) -> Any:
    return cls.__dataclass_fields__[name].default  # type: ignore[attr-defined]


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


def _tunnel_hc_unfit(mode: str, hc_type: str, real_family: int, vip_family: int) -> str | None:
    if mode != "tun":
        return f'the VIP is mode = "{mode}", not "tun"'
    if hc_type not in ("tcp", "http", "https"):
        return f'type = "{hc_type}" sends no packet to the real'
    if real_family != vip_family:
        return (f"the real is IPv{real_family} and the VIP IPv{vip_family} (a probe keeps its "
                "family through the tunnel)")
    return None


def hc_via(vip: VipConfig, real: RealConfig) -> str:
    """How `real`'s health check of `vip` is sent: "tunnel" or "direct"."""
    via = real.healthcheck.via
    if via == "auto":
        fits = _tunnel_hc_unfit(vip.mode, real.healthcheck.type, real.family, vip.family) is None
        return "tunnel" if fits else "direct"
    return via


@functools.lru_cache(maxsize=4096)
def _resolve_hc_port(hc: HealthCheckConfig, vip_port: int) -> HealthCheckConfig:
    if hc.port != 0:
        return hc
    return dataclasses.replace(hc, port=vip_port or 80)


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
        from l4lb.config_bgp import parse_bgp  # noqa: PLC0415 - it imports this module

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
        # copy is up to one walk plus the data plane's 1 s last-seen grain old.
        if walk == 0 or walk + 1 >= timeout:
            what = "0 (walks only when a peer starts)" if walk == 0 else \
                f"{walk:g} s, not below node.conn_timeout_s ({timeout} s) - 1 s"
            warns.append(
                f"sync.full_sync_interval_s is {what}, with UDP VIPs ({', '.join(udp[:3])}"
                f"{', ...' if len(udp) > 3 else ''}): the standby's copies of long-lived UDP "
                "flows go idle between walks, and a failover moves them to the new master's "
                f"ring; set full_sync_interval_s below {max(timeout - 1, 1)} s")
    return warns


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
        from l4lb.config_bgp import check_bgp_system  # noqa: PLC0415

        errors += check_bgp_system(cfg.bgp)
    return errors
