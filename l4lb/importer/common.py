"""Small helpers both converters share: addresses, numbers, script command lines, names."""

from __future__ import annotations

import ipaddress
import math
import re
import shlex
from dataclasses import dataclass, field

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

SHELL_CHARS = set("|&;<>$`*?(){}~")
NODE_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")
VRRP_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
SYNC_PORT = 9542  # l4lb's default sync port (configs/ha-lb1.toml)
SYNC_KEY_FILE = "/etc/l4lb/sync.key"


@dataclass
class Options:
    """What the user tells the importer beyond the files."""

    node: str | None = None  # [node] name; also the config id for @ lines unless config_id is set
    interfaces: list[str] = field(default_factory=list)  # [node] interfaces (XDP)
    config_id: str | None = None  # keepalived -i: which @id lines apply
    vips: list[str] = field(default_factory=list)  # addresses for HAProxy's wildcard binds


def ip(text: str) -> IPAddress | None:
    try:
        a = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(a, ipaddress.IPv6Address) and a.scope_id:
        return None
    return a


def iface(text: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface | None:
    try:
        return ipaddress.ip_interface(text.strip())
    except ValueError:
        return None


def to_int(text: str) -> int | None:
    try:
        return int(text, 10)
    except ValueError:
        return None


def to_float(text: str) -> float | None:
    try:
        v = float(text)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def valid_ifname(v: str) -> bool:
    return bool(v) and len(v.encode()) <= 15 and v not in (".", "..") and not any(
        c in "/:" or c.isspace() for c in v)


def safe_name(v: str, pattern: re.Pattern[str], limit: int) -> str:
    """`v` with the characters `pattern` refuses replaced by '_' (and cut to `limit`)."""
    if pattern.fullmatch(v):
        return v
    fixed = re.sub(r"[^A-Za-z0-9_.-]" if "." in pattern.pattern else r"[^A-Za-z0-9_-]", "_", v)
    return fixed[:limit] or "x"


def command_argv(text: str) -> tuple[list[str] | None, bool]:
    """A command line as argv, and whether it needed a shell (then argv runs it with /bin/sh -c).

    keepalived splits a script into words itself (single quotes keep spaces) and
    runs it without a shell; l4lb takes argv directly. A line with shell syntax
    (redirections, pipes, variables) only works through a shell, so it gets one.
    """
    text = text.strip()
    if not text:
        return None, False
    if any(c in SHELL_CHARS for c in text):
        return ["/bin/sh", "-c", text], True
    try:
        words = shlex.split(text)
    except ValueError:
        return ["/bin/sh", "-c", text], True
    return (words or None), False
