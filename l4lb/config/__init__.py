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
[[vrrp]], [sync], [bgp].

Layout: model.py (dataclasses, ConfigError), convert.py (field converters),
parse.py + parse_ha.py + bgp.py (sections), checks.py (capacity, warnings),
dump.py (back to dict / TOML), system.py (checks on this machine). Callers
import from `l4lb.config`; the names below are the package's interface.
"""

from l4lb.config.checks import Capacity, check_capacity, config_warnings
from l4lb.config.dump import config_to_dict, dumps_toml
from l4lb.config.model import (
    Config,
    ConfigError,
    Endpoint,
    HealthCheckConfig,
    MetricsConfig,
    NodeConfig,
    RealConfig,
    SyncConfig,
    TrackInterface,
    TrackScript,
    VipConfig,
    VrrpConfig,
    _canonical_vip_key,
    hc_via,
    vip_key,
)
from l4lb.config.parse import config_from_dict, load_config, parse_config
from l4lb.config.system import check_system

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
    "_canonical_vip_key",  # api.py: VIP keys as users type them
]
