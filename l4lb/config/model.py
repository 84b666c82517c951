"""The config model: frozen dataclasses whose defaults are the config file's defaults,
ConfigError, and the small helpers derived from the model (VIP keys, health-check routing).
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from l4lb.errors import L4lbError

if TYPE_CHECKING:  # bgp imports this module: the name is for annotations only
    from l4lb.config.bgp import BgpConfig


IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPInterface = Union[ipaddress.IPv4Interface, ipaddress.IPv6Interface]

DEFAULT_PIN_PATH = "/sys/fs/bpf/l4lb"
API_SOCKET_DIR = "/run/l4lb"
UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the NUL


class ConfigError(L4lbError):
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
    bgp: BgpConfig | None = None  # config/bgp.py: ECMP mode when set
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
