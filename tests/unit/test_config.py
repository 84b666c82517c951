"""l4lb.config: parsing, validation messages, defaults, merging, round trip."""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import re
import socket
from pathlib import Path

import pytest

from l4lb import config as cfgmod
from l4lb.config import (
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
    check_system,
    config_from_dict,
    config_to_dict,
    dumps_toml,
    load_config,
    parse_config,
)
from l4lb.config import system as cfgsys

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
KEY = "0123456789abcdef0123456789abcdef"


class _Del:
    def __repr__(self) -> str:
        return "DEL"


DEL = _Del()  # edit(): remove the key


def minimal() -> dict:
    return {
        "node": {"name": "lb1", "interfaces": ["eth0"]},
        "vip": [
            {
                "address": "10.99.0.100",
                "port": 80,
                "real": [{"address": "10.99.0.11"}, {"address": "10.99.0.12"}],
            }
        ],
    }


def full() -> dict:
    """A valid config touching every section, so any field can be broken in place."""
    return {
        "node": {"name": "lb1", "interfaces": ["eth0"]},
        "healthcheck": {"type": "tcp"},
        "vip": [
            {
                "address": "10.99.0.100",
                "port": 80,
                "healthcheck": {"rise": 2},
                "real": [
                    {"address": "10.99.0.11", "healthcheck": {"fall": 3}},
                    {"address": "10.99.0.12"},
                ],
            }
        ],
        "metrics": {"listen": "127.0.0.1:9541"},
        "vrrp": [
            {
                "name": "VI_1",
                "interface": "eth0",
                "vrid": 51,
                "vips": ["10.99.0.100/24"],
                "track_interfaces": [{"name": "eth1", "weight": -20}],
                "track_scripts": [{"script": ["/bin/true"]}],
            }
        ],
        "sync": {
            "enabled": True,
            "listen": "10.99.0.2:9542",
            "peers": ["10.99.0.3:9542"],
            "key": KEY,
            "vrrp_instance": "VI_1",
        },
    }


def edit(data: dict, loc: tuple, key: str, value) -> dict:
    data = copy.deepcopy(data)
    tbl = data
    for step in loc:
        tbl = tbl.setdefault(step, {}) if isinstance(step, str) else tbl[step]
    if value is DEL:
        del tbl[key]
    else:
        tbl[key] = value
    return data


def errors_of(data: dict) -> list[str]:
    """Errors from parsing `data` written as TOML (so the TOML path is what's tested)."""
    with pytest.raises(ConfigError) as info:
        parse_config(dumps_toml(data))
    return info.value.errors


def parse(data: dict) -> Config:
    return parse_config(dumps_toml(data))


def test_bases_are_valid():
    parse(minimal())
    parse(full())


# (where, key, value, the one error expected: its beginning)
# fmt: off
FIELD_CASES = [
    # [node]
    (("node",), "name", DEL, 'node.name: required; add name = "lb1"'),
    (("node",), "name", 5, "node.name: expected a string, got integer 5"),
    (("node",), "name", "lb 1", 'node.name: "lb 1" is not a valid node name; use 1-32 characters'),
    (("node",), "name", "x" * 33, 'node.name: "xxx'),
    (("node",), "interfaces", DEL, 'node.interfaces: required; add interfaces = ["eth0"]'),
    (("node",), "interfaces", "eth0", 'node.interfaces: expected a list of interface names, got string "eth0"'),
    (("node",), "interfaces", [], "node.interfaces: is empty"),
    (("node",), "interfaces", ["eth0", "eth0"], "node.interfaces[1]: eth0 duplicates node.interfaces[0]"),
    (("node",), "interfaces", ["eth0", "eth/1"], 'node.interfaces[1]: "eth/1" is not a valid interface name'),
    (("node",), "interfaces", ["a" * 16], 'node.interfaces[0]: "aaaaaaaaaaaaaaaa" is not a valid interface name'),
    (("node",), "interfaces", [1], "node.interfaces[0]: expected a string, got integer 1"),
    (("node",), "xdp_mode", "offload", 'node.xdp_mode: "offload" is not one of "native", "generic"'),
    (("node",), "xdp_mode", "Native", 'node.xdp_mode: "Native" is not one of "native", "generic"; did you mean "native"?'),
    (("node",), "xdp_mode", 1, 'node.xdp_mode: expected a string, one of "native", "generic", got integer 1'),
    (("node",), "pin_path", "sys/fs/bpf", 'node.pin_path: "sys/fs/bpf" is not an absolute path'),
    (("node",), "api_socket", "/" + "s" * 120, "node.api_socket: "),
    (("node",), "api_socket", "l4lb.sock", 'node.api_socket: "l4lb.sock" is not an absolute path'),
    (("node",), "conn_table_size", 1023, "node.conn_table_size: 1023 is out of range 1024..67108864"),
    (("node",), "conn_table_size", 67108865, "node.conn_table_size: 67108865 is out of range 1024..67108864"),
    (("node",), "conn_table_size", 1.5e6, "node.conn_table_size: expected an integer, got float 1500000.0; write 1500000 without the decimal point"),
    (("node",), "conn_table_size", "2048", 'node.conn_table_size: expected an integer, got string "2048"; remove the quotes'),
    (("node",), "conn_timeout_s", 0, "node.conn_timeout_s: 0 is out of range 1..86400"),
    (("node",), "conn_timeout_s", 86401, "node.conn_timeout_s: 86401 is out of range 1..86400"),
    (("node",), "conn_timeout_s", True, "node.conn_timeout_s: expected an integer, got boolean true"),
    (("node",), "new_flow_rate", 0, "node.new_flow_rate: 0 is out of range 1..4294967295"),
    (("node",), "new_flow_rate", "fast", 'node.new_flow_rate: expected an integer, got string "fast"'),
    (("node",), "nmae", "x", "node.nmae: unknown key; did you mean 'name'?"),
    (("node",), "colour", "x", "node.colour: unknown key; expected one of: name, interfaces,"),
    # [healthcheck]
    (("healthcheck",), "type", "icmp", 'healthcheck.type: "icmp" is not one of "tcp", "http", "https", "script", "none"'),
    (("healthcheck",), "port", 65536, "healthcheck.port: 65536 is out of range 0..65535"),
    (("healthcheck",), "port", -1, "healthcheck.port: -1 is out of range 0..65535"),
    (("healthcheck",), "interval_s", 0, "healthcheck.interval_s: 0 is out of range: must be > 0 and <= 3600"),
    (("healthcheck",), "interval_s", 3601.0, "healthcheck.interval_s: 3601.0 is out of range: must be > 0 and <= 3600"),
    (("healthcheck",), "interval_s", "2s", 'healthcheck.interval_s: expected a number, got string "2s"'),
    (("healthcheck",), "timeout_s", 0.0, "healthcheck.timeout_s: 0.0 is out of range: must be > 0 and <= 3600"),
    (("healthcheck",), "timeout_s", 3, "healthcheck.timeout_s: 3.0 must be <= interval_s (2.0, from the default)"),
    (("healthcheck",), "rise", 0, "healthcheck.rise: 0 is out of range 1..100"),
    (("healthcheck",), "rise", 101, "healthcheck.rise: 101 is out of range 1..100"),
    (("healthcheck",), "fall", 0, "healthcheck.fall: 0 is out of range 1..100"),
    (("healthcheck",), "fall", 2.5, "healthcheck.fall: expected an integer, got float 2.5"),
    (("healthcheck",), "http_path", "healthz", 'healthcheck.http_path: "healthz" is not a URL path; it must start with "/"'),
    (("healthcheck",), "http_path", 7, "healthcheck.http_path: expected a string, got integer 7"),
    (("healthcheck",), "http_expect_status", 99, "healthcheck.http_expect_status: 99 is out of range 100..599"),
    (("healthcheck",), "http_expect_status", 600, "healthcheck.http_expect_status: 600 is out of range 100..599"),
    (("healthcheck",), "http_host", "", 'healthcheck.http_host: "" is not a valid Host header'),
    (("healthcheck",), "script", "/usr/bin/check --port 80", 'healthcheck.script: expected a list of strings, got string "/usr/bin/check --port 80"; ' 'use a list: argv, not a shell string, e.g. ["/usr/bin/check", "--port", "80"]'),
    (("healthcheck",), "script", "curl -s x | grep ok", 'healthcheck.script: expected a list of strings, got string "curl -s x | grep ok"; use a list: argv, ' 'not a shell string, e.g. ["/bin/sh", "-c", "curl -s x | grep ok"]'),
    (("healthcheck",), "script", [], "healthcheck.script: is empty"),
    (("healthcheck",), "script", ["/bin/check", 80], "healthcheck.script[1]: expected a string, got integer 80"),
    (("healthcheck",), "script", [""], "healthcheck.script[0]: the program name is empty"),
    (("healthcheck",), "intervall_s", 2, "healthcheck.intervall_s: unknown key; did you mean 'interval_s'?"),
    (("vip", 0, "healthcheck"), "fal", 2, "vip[0].healthcheck.fal: unknown key; did you mean 'fall'?"),
    (("vip", 0, "healthcheck"), "rise", 0, "vip[0].healthcheck.rise: 0 is out of range 1..100"),
    (("vip", 0, "real", 1, "healthcheck"), "type", "tpc", 'vip[0].real[1].healthcheck.type: "tpc" is not one of'),
    (("vip", 0), "healthcheck", "http", 'vip[0].healthcheck: expected a table, got string "http"'),
    # [[vip]]
    (("vip", 0), "address", DEL, 'vip[0].address: required; add address = "10.99.0.100"'),
    (("vip", 0), "address", "10.99.0.300", 'vip[0].address: "10.99.0.300" is not a valid IPv4 or IPv6 address'),
    (("vip", 0), "address", "10.99.0.100/24", 'vip[0].address: "10.99.0.100/24": expected a single address, without "/prefix"'),
    (("vip", 0), "address", "224.0.0.1", "vip[0].address: 224.0.0.1 is a multicast address"),
    (("vip", 0), "address", "0.0.0.0", "vip[0].address: 0.0.0.0 is the unspecified address"),
    (("vip", 0), "address", 10, "vip[0].address: expected an IP address string"),
    (("vip", 0), "port", DEL, "vip[0].port: required; add port = 80 (0 = every port of the address)"),
    (("vip", 0), "port", 65536, "vip[0].port: 65536 is out of range 0..65535"),
    (("vip", 0), "port", "80", 'vip[0].port: expected an integer, got string "80"; remove the quotes'),
    (("vip", 0), "protocol", "sctp", 'vip[0].protocol: "sctp" is not one of "tcp", "udp"'),
    (("vip", 0), "protocol", "TCP", 'vip[0].protocol: "TCP" is not one of "tcp", "udp"; did you mean "tcp"?'),
    (("vip", 0), "mode", "nat", 'vip[0].mode: "nat" is not one of "dr", "tun"'),
    (("vip", 0), "hash", "source_ip", 'vip[0].hash: "source_ip" is not one of "5tuple", "source"; did you mean "source"?'),
    (("vip", 0), "ring_size", 65536, "vip[0].ring_size: 65536 is not prime; Maglev needs a prime table size (nearest: 65521, 65537)"),
    (("vip", 0), "ring_size", 5, "vip[0].ring_size: 5 is out of range 7..1048573"),
    (("vip", 0), "ring_size", 1048574, "vip[0].ring_size: 1048574 is out of range 7..1048573"),
    (("vip", 0), "ring_size", "65537", 'vip[0].ring_size: expected an integer, got string "65537"'),
    (("vip", 0), "all_down", "fail", 'vip[0].all_down: "fail" is not one of "keep", "drop"'),
    (("vip", 0), "real", {"address": "10.99.0.11"}, "vip[0].real: expected an array of tables, got a table; write [[vip.real]]"),
    (("vip", 0), "reals", [], "vip[0].reals: unknown key; did you mean 'real'?"),
    # [[vip.real]]
    (("vip", 0, "real", 0), "address", DEL, 'vip[0].real[0].address: required; add address = "10.99.0.11"'),
    (("vip", 0, "real", 0), "address", "10.99.0.100", "vip[0].real[0].address: 10.99.0.100 is the VIP itself"),
    (("vip", 0, "real", 1), "address", "10.99.0.11", "vip[0].real[1].address: 10.99.0.11 duplicates vip[0].real[0]; each real may appear once per VIP"),
    (("vip", 0, "real", 1), "weight", 70000, "vip[0].real[1].weight: 70000 is out of range 0..65535"),
    (("vip", 0, "real", 1), "weight", -1, "vip[0].real[1].weight: -1 is out of range 0..65535"),
    (("vip", 0, "real", 1), "weight", "100", 'vip[0].real[1].weight: expected an integer, got string "100"; remove the quotes'),
    (("vip", 0, "real", 0), "wieght", 100, "vip[0].real[0].wieght: unknown key; did you mean 'weight'?"),
    (("vip", 0, "real", 0), "mac", "52-54-00-12-34-56", 'vip[0].real[0].mac: "52-54-00-12-34-56" is not a MAC address; write six colon-separated hex bytes'),
    (("vip", 0, "real", 0), "mac", "01:00:5e:00:00:01", "vip[0].real[0].mac: 01:00:5e:00:00:01 is a multicast/broadcast MAC"),
    (("vip", 0, "real", 0), "mac", "ff:ff:ff:ff:ff:ff", "vip[0].real[0].mac: ff:ff:ff:ff:ff:ff is a multicast/broadcast MAC"),
    (("vip", 0, "real", 0), "mac", "00:00:00:00:00:00", "vip[0].real[0].mac: 00:00:00:00:00:00 is the all-zero MAC"),
    (("vip", 0, "real", 1), "address", "fd00::11", "vip[0].real[1].address: fd00::11 is IPv6 but the VIP is IPv4; dr mode forwards at layer 2 and needs " 'the same family — use mode = "tun" or an IPv4 real'),
    # [metrics]
    (("metrics",), "listen", "127.0.0.1", 'metrics.listen: "127.0.0.1" is not "host:port" with an IP address'),
    (("metrics",), "listen", "::1:9541", 'metrics.listen: "::1:9541" is not "host:port" with an IP address; write e.g. "127.0.0.1:9541" or "[fd99::1]:9541" (IPv6 addresses need brackets)'),
    (("metrics",), "listen", "127.0.0.1:0", 'metrics.listen: "127.0.0.1:0": port 0 is out of range 1..65535'),
    (("metrics",), "listen", "[10.0.0.1]:80", 'metrics.listen: "[10.0.0.1]:80": brackets are for IPv6 addresses; write 10.0.0.1:80'),
    (("metrics",), "listen", "localhost:9541", 'metrics.listen: "localhost:9541" is not "host:port" with an IP address'),
    (("metrics",), "listen", 9541, 'metrics.listen: expected a "host:port" string (e.g. "127.0.0.1:9541"), got integer 9541'),
    (("metrics",), "enabled", "true", 'metrics.enabled: expected a boolean (true or false), got string "true"; write true without the quotes'),
    (("metrics",), "enable", True, "metrics.enable: unknown key; did you mean 'enabled'?"),
    # [[vrrp]]
    (("vrrp", 0), "name", DEL, 'vrrp[0].name: required; add name = "VI_1"'),
    (("vrrp", 0), "name", "VI 1", 'vrrp[0].name: "VI 1" is not a valid instance name'),
    (("vrrp", 0), "interface", DEL, 'vrrp[0].interface: required; add interface = "eth0"'),
    (("vrrp", 0), "interface", "eth0:1", 'vrrp[0].interface: "eth0:1" is not a valid interface name'),
    (("vrrp", 0), "vrid", DEL, "vrrp[0].vrid: required; add vrid = 51"),
    (("vrrp", 0), "vrid", 0, "vrrp[0].vrid: 0 is out of range 1..255"),
    (("vrrp", 0), "vrid", 256, "vrrp[0].vrid: 256 is out of range 1..255"),
    (("vrrp", 0), "priority", 0, "vrrp[0].priority: 0 is out of range 1..255"),
    (("vrrp", 0), "priority", 256, "vrrp[0].priority: 256 is out of range 1..255"),
    (("vrrp", 0), "version", 4, "vrrp[0].version: 4 is not one of 2, 3"),
    (("vrrp", 0), "version", "3", 'vrrp[0].version: expected an integer, one of 2, 3, got string "3"; remove the quotes'),
    (("vrrp", 0), "advert_interval_s", 0.015, "vrrp[0].advert_interval_s: 0.015 is not valid for VRRPv3; use 0.01..40.95 in steps of 0.01"),
    (("vrrp", 0), "advert_interval_s", 41, "vrrp[0].advert_interval_s: 41.0 is not valid for VRRPv3"),
    (("vrrp", 0), "advert_interval_s", 0, "vrrp[0].advert_interval_s: 0 is out of range: must be > 0 and <= 255"),
    (("vrrp", 0), "preempt", "yes", 'vrrp[0].preempt: expected a boolean (true or false), got string "yes"'),
    (("vrrp", 0), "preempt_delay_s", -1, "vrrp[0].preempt_delay_s: -1 is out of range 0..3600"),
    (("vrrp", 0), "preempt_delay_s", 3601, "vrrp[0].preempt_delay_s: 3601 is out of range 0..3600"),
    (("vrrp", 0), "accept_mode", 1, "vrrp[0].accept_mode: expected a boolean (true or false), got integer 1"),
    (("vrrp", 0), "unicast_src", "10.99.0.300", 'vrrp[0].unicast_src: "10.99.0.300" is not a valid IPv4 or IPv6 address'),
    (("vrrp", 0), "unicast_src", "10.99.0.2", "vrrp[0].unicast_src: is set but unicast_peers is empty"),
    (("vrrp", 0), "unicast_peers", "10.99.0.3", 'vrrp[0].unicast_peers: expected a list of IP addresses, got string "10.99.0.3"'),
    (("vrrp", 0), "unicast_peers", ["10.99.0.3", "10.99.0.3"], "vrrp[0].unicast_peers[1]: 10.99.0.3 duplicates vrrp[0].unicast_peers[0]"),
    (("vrrp", 0), "unicast_peers", ["fd99::3"], "vrrp[0].unicast_peers[0]: fd99::3 is IPv6 but the instance's vips are IPv4"),
    (("vrrp", 0), "vips", DEL, 'vrrp[0].vips: required; add vips = ["10.99.0.100/24"]'),
    (("vrrp", 0), "vips", [], "vrrp[0].vips: is empty"),
    (("vrrp", 0), "vips", ["10.99.0.100/33"], 'vrrp[0].vips[0]: "10.99.0.100/33" is not "addr" or "addr/prefix"'),
    (("vrrp", 0), "vips", ["10.99.0.100", "10.99.0.100/32"], "vrrp[0].vips[1]: 10.99.0.100/32 duplicates vrrp[0].vips[0]"),
    (("vrrp", 0), "vips", ["10.99.0.100/24", "fd99::100/64"], "vrrp[0].vips[1]: fd99::100/64 is IPv6 but vips[0] is IPv4; one VRRP instance carries one family"),
    (("vrrp", 0), "auth_pass", "secret", "vrrp[0].auth_pass: VRRPv3 has no authentication (RFC 5798 removed it); remove auth_pass or set version = 2"),
    (("vrrp", 0), "garp_count", 101, "vrrp[0].garp_count: 101 is out of range 0..100"),
    (("vrrp", 0), "garp_refresh_s", -0.5, "vrrp[0].garp_refresh_s: -0.5 is out of range 0..3600"),
    (("vrrp", 0), "track_interfaces", {"name": "eth1"}, "vrrp[0].track_interfaces: expected an array of tables, got a table"),
    (("vrrp", 0, "track_interfaces", 0), "weight", 255, "vrrp[0].track_interfaces[0].weight: 255 is out of range -254..254"),
    (("vrrp", 0, "track_interfaces", 0), "name", DEL, 'vrrp[0].track_interfaces[0].name: required; add name = "eth1"'),
    (("vrrp", 0, "track_interfaces", 0), "wieght", 1, "vrrp[0].track_interfaces[0].wieght: unknown key; did you mean 'weight'?"),
    (("vrrp", 0, "track_scripts", 0), "script", "/bin/true", 'vrrp[0].track_scripts[0].script: expected a list of strings, got string "/bin/true"; use a list: argv, not a shell string'),
    (("vrrp", 0, "track_scripts", 0), "script", DEL, "vrrp[0].track_scripts[0].script: required; add script = ["),
    (("vrrp", 0, "track_scripts", 0), "interval_s", 0, "vrrp[0].track_scripts[0].interval_s: 0 is out of range: must be > 0 and <= 3600"),
    (("vrrp", 0, "track_scripts", 0), "weight", -255, "vrrp[0].track_scripts[0].weight: -255 is out of range -254..254"),
    (("vrrp", 0, "track_scripts", 0), "rise", 0, "vrrp[0].track_scripts[0].rise: 0 is out of range 1..100"),
    (("vrrp", 0, "track_scripts", 0), "fall", 101, "vrrp[0].track_scripts[0].fall: 101 is out of range 1..100"),
    (("vrrp", 0), "notify", "/usr/local/bin/notify.sh MASTER", 'vrrp[0].notify: expected a list of strings, got string "/usr/local/bin/notify.sh MASTER"; use a list: argv, not a shell string, e.g. ["/usr/local/bin/notify.sh", "MASTER"]'),
    (("vrrp", 0), "notify_master", [], "vrrp[0].notify_master: is empty"),
    (("vrrp", 0), "notify_backup", 5, "vrrp[0].notify_backup: expected a list of strings"),
    (("vrrp", 0), "notify_fault", [""], "vrrp[0].notify_fault[0]: the program name is empty"),
    (("vrrp", 0), "virtual_router_id", 51, "vrrp[0].virtual_router_id: unknown key; expected one of: name, interface, vrid,"),
    # [sync]
    (("sync",), "enabled", "yes", 'sync.enabled: expected a boolean (true or false), got string "yes"'),
    (("sync",), "listen", DEL, 'sync.listen: required when enabled; add listen = "10.99.0.2:9542"'),
    (("sync",), "listen", "10.99.0.2", 'sync.listen: "10.99.0.2" is not "host:port" with an IP address'),
    (("sync",), "peers", DEL, 'sync.peers: required when enabled; add peers = ["10.99.0.3:9542"]'),
    (("sync",), "peers", [], "sync.peers: is empty; add the other node"),
    (("sync",), "peers", "10.99.0.3:9542", 'sync.peers: expected a list of "host:port" strings, got string "10.99.0.3:9542"'),
    (("sync",), "peers", ["0.0.0.0:9542"], 'sync.peers[0]: "0.0.0.0:9542": 0.0.0.0 cannot be used here'),
    (("sync",), "peers", ["10.99.0.2:9542"], "sync.peers[0]: 10.99.0.2:9542 is this node's listen address"),
    (("sync",), "peers", ["[fd99::3]:9542"], "sync.peers[0]: [fd99::3]:9542 is IPv6 but listen is IPv4"),
    (("sync",), "key", DEL, 'sync.key: required when enabled; set key = "..." (a shared secret of 16+ characters) or key_file = "/etc/l4lb/sync.key"'),
    (("sync",), "key", "short", "sync.key: is 5 characters; an HMAC key needs at least 16"),
    (("sync",), "key_file", "/etc/l4lb/sync.key", "sync.key_file: set either key or key_file, not both; remove one"),
    (("sync",), "vrrp_instance", DEL, 'sync.vrrp_instance: required when enabled; add vrrp_instance = "VI_1"'),
    (("sync",), "vrrp_instance", "VI_l", 'sync.vrrp_instance: no [[vrrp]] instance is named "VI_l"; did you mean "VI_1"?'),
    (("sync",), "vrrp_instance", "other", 'sync.vrrp_instance: no [[vrrp]] instance is named "other"; known: "VI_1"'),
    (("sync",), "batch_max", 0, "sync.batch_max: 0 is out of range 1..10000"),
    (("sync",), "batch_max", 10001, "sync.batch_max: 10001 is out of range 1..10000"),
    (("sync",), "batch_delay_ms", 0.05, "sync.batch_delay_ms: 0.05 is out of range 0.1..1000"),
    (("sync",), "batch_delay_ms", 1001, "sync.batch_delay_ms: 1001 is out of range 0.1..1000"),
    (("sync",), "full_sync_interval_s", -1, "sync.full_sync_interval_s: -1 is out of range 0..86400"),
    (("sync",), "full_sync_interval_s", 86401, "sync.full_sync_interval_s: 86401 is out of range 0..86400"),
    (("sync",), "max_datagram", 511, "sync.max_datagram: 511 is out of range 512..65000"),
    (("sync",), "max_datagram", 65001, "sync.max_datagram: 65001 is out of range 512..65000"),
    (("sync",), "peer", [], "sync.peer: unknown key; did you mean 'peers'?"),
    # top level
    ((), "helthcheck", {}, "helthcheck: unknown key; did you mean 'healthcheck'?"),
    ((), "vips", [], "vips: unknown key; did you mean 'vip'?"),
    ((), "lvs", {}, "lvs: unknown key; expected one of: node, healthcheck, vip, metrics, vrrp, sync"),
    (("vip", 0, "real", 0), "ip", "10.99.0.11", "vip[0].real[0].ip: unknown key; expected one of: address, weight, mac, healthcheck"),
    ((), "node", DEL, 'node: required section; add a [node] table with name = "lb1" and interfaces = ["eth0"]'),
    ((), "vip", {"address": "10.99.0.100"}, "vip: expected an array of tables, got a table; write [[vip]] (double brackets)"),
    ((), "metrics", "on", 'metrics: expected a table, got string "on"'),
]
# fmt: on


@pytest.mark.parametrize(
    "loc,key,value,expected",
    FIELD_CASES,
    ids=[f"{'.'.join(map(str, c[0]))}.{c[1]}={c[2]!r}"[:70] for c in FIELD_CASES],
)
def test_field_error(loc, key, value, expected):
    errs = errors_of(edit(full(), loc, key, value))
    assert len(errs) == 1, errs
    assert errs[0].startswith(expected), errs[0]


def test_error_messages_are_single_lines():
    for loc, key, value, _ in FIELD_CASES:
        for e in errors_of(edit(full(), loc, key, value)):
            assert "\n" not in e


def test_weight_out_of_range_exact():
    data = minimal()
    data["vip"].append(
        {"address": "10.99.0.101", "port": 80, "real": [{"address": "10.99.0.11", "weight": 70000}]}
    )
    assert errors_of(data) == ["vip[1].real[0].weight: 70000 is out of range 0..65535"]


def test_unknown_key_exact():
    data = edit(minimal(), ("vip", 0, "real", 0), "wieght", 5)
    assert errors_of(data) == ["vip[0].real[0].wieght: unknown key; did you mean 'weight'?"]


def test_many_errors_reported_together():
    data = full()
    data["node"]["name"] = "bad name"
    data["vip"][0]["real"][1]["weight"] = 70000
    data["vip"][0]["wieght"] = 1
    data["vrrp"][0]["auth_pass"] = "x"
    data["sync"]["batch_max"] = 0
    with pytest.raises(ConfigError) as info:
        parse(data)
    errs = info.value.errors
    assert [e.split(":")[0] for e in errs] == [
        "node.name",
        "vip[0].wieght",
        "vip[0].real[1].weight",
        "vrrp[0].auth_pass",
        "sync.batch_max",
    ]
    assert str(info.value) == "\n".join(errs)
    assert len(str(info.value).splitlines()) == 5


def test_duplicate_vip_names_both_indexes():
    data = minimal()
    data["vip"].append({"address": "10.99.0.101", "port": 80, "real": [{"address": "10.99.0.11"}]})
    data["vip"].append(copy.deepcopy(data["vip"][0]))
    assert errors_of(data) == [
        "vip[2]: duplicates vip[0] (10.99.0.100:80/tcp); each address, port and protocol may appear once — "
        "merge their reals or remove one"
    ]
    # same address and port, other protocol or port: distinct services
    data["vip"][2]["protocol"] = "udp"
    data["vip"].append(edit(data["vip"][0], (), "port", 0))
    assert len(parse(data).vips) == 4


def test_duplicate_vip_v6_spellings():
    data = minimal()
    data["vip"] = [
        {"address": "fd99::100", "port": 80, "real": [{"address": "fd99::11"}]},
        {"address": "fd99:0:0::100", "port": 80, "real": [{"address": "fd99::11"}]},
    ]
    assert errors_of(data)[0].startswith("vip[1]: duplicates vip[0] ([fd99::100]:80/tcp)")


def test_dr_family_rules():
    data = minimal()
    data["vip"][0]["real"].append({"address": "fd99::13"})
    assert errors_of(data) == [
        "vip[0].real[2].address: fd99::13 is IPv6 but the VIP is IPv4; dr mode forwards at layer 2 and needs "
        'the same family — use mode = "tun" or an IPv4 real'
    ]
    data["vip"][0]["mode"] = "tun"
    vip = parse(data).vips[0]
    assert [r.family for r in vip.reals] == [4, 4, 6]
    v6 = {"address": "fd99::100", "port": 443, "real": [{"address": "10.99.0.11"}]}
    assert errors_of({**minimal(), "vip": [v6]})[0].startswith(
        "vip[0].real[0].address: 10.99.0.11 is IPv4 but the VIP is IPv6;"
    )


def test_ring_size_prime_and_bounds():
    for good in (7, 13, 251, 65537, 1048573):
        assert parse(edit(minimal(), ("vip", 0), "ring_size", good)).vips[0].ring_size == good
    assert errors_of(edit(minimal(), ("vip", 0), "ring_size", 9)) == [
        "vip[0].ring_size: 9 is not prime; Maglev needs a prime table size (nearest: 7, 11)"
    ]
    data = edit(minimal(), ("vip", 0), "ring_size", 7)
    data["vip"][0]["real"] = [{"address": f"10.99.0.{i}"} for i in range(10, 18)]
    assert errors_of(data)[0].startswith(
        "vip[0].ring_size: 7 is smaller than the number of reals (8)"
    )


def test_auth_pass_v2():
    data = edit(full(), ("vrrp", 0), "version", 2)
    data["vrrp"][0]["auth_pass"] = "secret"
    assert parse(data).vrrp[0].auth_pass == "secret"
    assert "secret" not in repr(parse(data).vrrp[0])
    data["vrrp"][0]["auth_pass"] = "ninechars"
    assert errors_of(data) == ["vrrp[0].auth_pass: is 9 characters; VRRPv2 simple auth takes 1..8"]


def test_vrrp_v2_rules():
    data = edit(full(), ("vrrp", 0), "version", 2)
    assert parse(data).vrrp[0].advert_interval_s == 1.0
    for bad in (1.5, 0.5):
        errs = errors_of(edit(data, ("vrrp", 0), "advert_interval_s", bad))
        assert errs == [
            f"vrrp[0].advert_interval_s: {bad} is not valid for VRRPv2; use whole seconds 1..255 (or version = 3 for less)"
        ]
    assert (
        parse(edit(data, ("vrrp", 0), "advert_interval_s", 255)).vrrp[0].advert_interval_s == 255.0
    )
    v6 = edit(data, ("vrrp", 0), "vips", ["fd99::100/64"])
    assert errors_of(v6) == [
        "vrrp[0].version: VRRPv2 is IPv4 only and vips are IPv6; use version = 3"
    ]


def test_vrrp_v3_centiseconds():
    for ok in (0.01, 0.1, 0.35, 1, 40.95):
        assert parse(edit(full(), ("vrrp", 0), "advert_interval_s", ok)).vrrp[0] \
            .advert_interval_s == ok


def test_vrrp_uniqueness():
    data = full()
    inst = copy.deepcopy(data["vrrp"][0])
    data["vrrp"].append(inst)
    errs = errors_of(data)
    assert errs == [
        'vrrp[1].name: "VI_1" is already used by vrrp[0]; names must be unique',
        "vrrp[1].vrid: 51 on eth0 (IPv4) is already used by vrrp[0]; each instance on a link needs its own vrid",
    ]
    inst["name"] = "VI_2"
    inst["interface"] = "eth1"
    assert len(parse(data).vrrp) == 2  # same vrid on another link
    inst["interface"] = "eth0"
    inst["vips"] = ["fd99::100/64"]
    assert len(parse(data).vrrp) == 2  # same vrid, other family: separate VRRP instances


def test_vrrp_unicast_rules():
    data = edit(full(), ("vrrp", 0), "unicast_src", "10.99.0.2")
    data["vrrp"][0]["unicast_peers"] = ["10.99.0.3", "10.99.0.2"]
    assert errors_of(data) == [
        "vrrp[0].unicast_peers[1]: 10.99.0.2 is this node's unicast_src; list only the other nodes"
    ]
    data["vrrp"][0]["unicast_peers"] = ["10.99.0.3"]
    inst = parse(data).vrrp[0]
    assert inst.unicast_src == ipaddress.ip_address("10.99.0.2")
    assert inst.unicast_peers == (ipaddress.ip_address("10.99.0.3"),)
    data["vrrp"][0]["unicast_src"] = "fd99::2"
    assert errors_of(data)[0].startswith(
        "vrrp[0].unicast_src: fd99::2 is IPv6 but the instance's vips are IPv4"
    )


def test_track_interface_duplicates():
    data = edit(
        full(), ("vrrp", 0), "track_interfaces", [{"name": "eth1"}, {"name": "eth1", "weight": 5}]
    )
    assert errors_of(data) == [
        'vrrp[0].track_interfaces[1].name: "eth1" is already tracked by vrrp[0].track_interfaces[0]; track it once'
    ]


def test_sync_rules():
    # disabled: nothing required
    assert parse(edit(minimal(), ("sync",), "enabled", False)).sync == SyncConfig()
    # key_file alone is fine
    data = edit(full(), ("sync",), "key", DEL)
    data["sync"]["key_file"] = "/etc/l4lb/sync.key"
    assert parse(data).sync.key_file == "/etc/l4lb/sync.key"
    data["sync"]["key_file"] = "sync.key"
    assert errors_of(data)[0].startswith('sync.key_file: "sync.key" is not an absolute path')
    # both is an error even when disabled
    both = edit(minimal(), ("sync",), "key", KEY)
    both["sync"]["key_file"] = "/etc/l4lb/sync.key"
    assert errors_of(both) == ["sync.key_file: set either key or key_file, not both; remove one"]
    # enabled with nothing at all: every missing piece at once
    errs = errors_of(edit(minimal(), ("sync",), "enabled", True))
    assert [e.split(":")[0] for e in errs] == [
        "sync.listen",
        "sync.peers",
        "sync.key",
        "sync.vrrp_instance",
    ]
    assert errs[3].endswith(
        'add vrrp_instance = "VI_1" (the [[vrrp]] instance whose state decides who sends)'
    )
    # vrrp_instance must exist even with no [[vrrp]] at all
    errs = errors_of(edit(minimal(), ("sync",), "vrrp_instance", "VI_1"))
    assert errs == [
        'sync.vrrp_instance: no [[vrrp]] instance is named "VI_1"; add a [[vrrp]] instance (sync follows its master/backup state)'
    ]


def test_sync_parsed_values():
    s = parse(full()).sync
    assert s.enabled and s.vrrp_instance == "VI_1"
    assert s.listen == Endpoint(ipaddress.ip_address("10.99.0.2"), 9542)
    assert [str(p) for p in s.peers] == ["10.99.0.3:9542"]
    assert s.load_key() == KEY.encode()
    assert KEY not in repr(s)
    v6 = edit(full(), ("sync",), "listen", "[::]:9542")
    v6["sync"]["peers"] = ["[fd99::3]:9542"]
    s6 = parse(v6).sync
    assert str(s6.listen) == "[::]:9542" and s6.peers[0].family == 6


def test_malformed_toml_one_error_with_position():
    text = '[node]\nname = "lb1"\ninterfaces = ["eth0",\n  oops]\n'
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="lb.toml")
    assert len(info.value.errors) == 1
    err = info.value.errors[0]
    assert re.match(r"lb\.toml: invalid TOML at line 4, column \d+: ", err), err
    with pytest.raises(ConfigError) as info:
        parse_config('[node]\nname = "lb1\n')
    assert re.match(r"<string>: invalid TOML at line 2, column \d+: ", info.value.errors[0])


def test_toml_datetime_is_a_type_error():
    text = '[node]\nname = "lb1"\ninterfaces = ["eth0"]\nconn_timeout_s = 1979-05-27\n'
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert info.value.errors == ["node.conn_timeout_s: expected an integer, got a date"]


def test_defaults_applied():
    cfg = parse({"node": {"name": "lb1", "interfaces": ["eth0"]}})
    assert cfg.node == NodeConfig(
        name="lb1",
        interfaces=("eth0",),
        xdp_mode="native",
        pin_path="/sys/fs/bpf/l4lb",
        api_socket="/run/l4lb/lb1.sock",
        conn_table_size=1048576,
        conn_timeout_s=300,
    )
    assert cfg.healthcheck == HealthCheckConfig(
        type="tcp",
        port=0,
        interval_s=2.0,
        timeout_s=1.0,
        rise=2,
        fall=3,
        http_path="/",
        http_expect_status=200,
        http_host=None,
        script=None,
    )
    assert cfg.vips == () and cfg.vrrp == ()
    assert cfg.metrics == MetricsConfig(
        listen=Endpoint(ipaddress.ip_address("127.0.0.1"), 9541), enabled=True
    )
    assert cfg.sync == SyncConfig(
        enabled=False,
        listen=None,
        peers=(),
        key=None,
        key_file=None,
        vrrp_instance=None,
        batch_max=200,
        batch_delay_ms=5.0,
        full_sync_interval_s=60.0,
        max_datagram=1400,
    )

    cfg = parse(full())
    vip = cfg.vips[0]
    assert (vip.protocol, vip.mode, vip.hash, vip.ring_size, vip.all_down) == (
        "tcp",
        "dr",
        "5tuple",
        65537,
        "keep",
    )
    assert vip.reals[1] == RealConfig(
        address=ipaddress.ip_address("10.99.0.12"),
        weight=100,
        mac=None,
        healthcheck=HealthCheckConfig(port=80),
    )
    inst = cfg.vrrp[0]
    assert (
        inst.priority,
        inst.version,
        inst.advert_interval_s,
        inst.preempt,
        inst.preempt_delay_s,
    ) == (100, 3, 1.0, True, 0.0)
    assert (inst.accept_mode, inst.unicast_src, inst.unicast_peers, inst.auth_pass) == (
        False,
        None,
        (),
        None,
    )
    assert (inst.garp_count, inst.garp_refresh_s) == (5, 0.0)
    assert (inst.notify, inst.notify_master, inst.notify_backup, inst.notify_fault) == (
        None,
        None,
        None,
        None,
    )
    assert inst.track_interfaces == (TrackInterface("eth1", -20),)
    assert inst.track_scripts == (
        TrackScript(("/bin/true",), interval_s=1.0, weight=0, rise=1, fall=1),
    )
    assert inst.vips == (ipaddress.ip_interface("10.99.0.100/24"),)


def test_types_of_parsed_values():
    data = edit(full(), ("vip", 0, "real", 0), "mac", "52:54:00:AB:CD:EF")
    data["healthcheck"]["interval_s"] = 3  # an integer where a float is expected is fine
    cfg = parse(data)
    assert isinstance(cfg.vips[0].address, ipaddress.IPv4Address)
    assert isinstance(cfg.vips[0].reals[0].address, ipaddress.IPv4Address)
    assert cfg.vips[0].reals[0].mac == "52:54:00:ab:cd:ef"
    assert cfg.healthcheck.interval_s == 3.0 and isinstance(cfg.healthcheck.interval_s, float)
    assert cfg.source == "<string>"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.node.name = "x"  # type: ignore[misc]
    hash(cfg)  # frozen all the way down


def test_healthcheck_merging():
    data = minimal()
    data["healthcheck"] = {
        "type": "http",
        "interval_s": 5.0,
        "timeout_s": 2.0,
        "http_host": "www.example.test",
    }
    data["vip"][0]["healthcheck"] = {"http_path": "/hz", "rise": 4}
    data["vip"][0]["real"][0]["healthcheck"] = {"type": "tcp", "port": 8080, "timeout_s": 4.5}
    cfg = parse(data)
    assert cfg.healthcheck.http_path == "/" and cfg.healthcheck.port == 0
    vip = cfg.vips[0]
    assert vip.healthcheck == HealthCheckConfig(
        type="http",
        port=0,
        interval_s=5.0,
        timeout_s=2.0,
        rise=4,
        http_path="/hz",
        http_host="www.example.test",
    )
    assert vip.reals[0].healthcheck == HealthCheckConfig(
        type="tcp",
        port=8080,
        interval_s=5.0,
        timeout_s=4.5,
        rise=4,
        http_path="/hz",
        http_host="www.example.test",
    )
    assert vip.reals[1].healthcheck == dataclasses.replace(
        vip.healthcheck, port=80
    )  # 0 -> the VIP's port


def test_healthcheck_port_for_port0_vip():
    data = edit(minimal(), ("vip", 0), "port", 0)
    assert parse(data).vips[0].reals[0].healthcheck.port == 80
    data = edit(data, ("vip", 0, "healthcheck"), "port", 22)
    assert parse(data).vips[0].reals[0].healthcheck.port == 22
    data = edit(minimal(), ("vip", 0), "port", 443)
    assert parse(data).vips[0].reals[0].healthcheck.port == 443


def test_healthcheck_timeout_checked_on_merged_values_reported_once():
    data = minimal()
    data["healthcheck"] = {"timeout_s": 5.0}  # > default interval 2.0
    assert errors_of(data) == [
        "healthcheck.timeout_s: 5.0 must be <= interval_s (2.0, from the default); a probe must time out before "
        "the next one starts"
    ]
    data = edit(minimal(), ("vip", 0, "healthcheck"), "interval_s", 0.5)
    assert errors_of(data) == [
        "vip[0].healthcheck.interval_s: 0.5 must be >= timeout_s (1.0, from the default); a probe must time out "
        "before the next one starts"
    ]
    data = minimal()
    data["healthcheck"] = {"interval_s": 10.0, "timeout_s": 5.0}
    data["vip"][0]["real"][1]["healthcheck"] = {"interval_s": 3.0}
    assert errors_of(data) == [
        "vip[0].real[1].healthcheck.interval_s: 3.0 must be >= timeout_s (5.0, from healthcheck); a probe must time "
        "out before the next one starts"
    ]
    data["vip"][0]["real"][1]["healthcheck"]["timeout_s"] = 1.0  # fixed where it is set
    assert parse(data).vips[0].reals[1].healthcheck.timeout_s == 1.0


def test_script_type_rules():
    data = edit(minimal(), ("vip", 0, "healthcheck"), "type", "script")
    data["vip"][0]["real"][0]["healthcheck"] = {"script": ["/usr/local/bin/check", "10.99.0.11"]}
    data["vip"][0]["real"][1]["healthcheck"] = {"script": ["/usr/local/bin/check", "10.99.0.12"]}
    cfg = parse(data)  # the VIP sets the type, each real its own script (MISC_CHECK style)
    assert cfg.vips[0].reals[1].healthcheck.script == ("/usr/local/bin/check", "10.99.0.12")
    del data["vip"][0]["real"][1]["healthcheck"]
    assert errors_of(data) == [
        'vip[0].healthcheck.script: required when type = "script": vip[0].real[1] gets no script; add script = '
        '["/usr/local/bin/check", "arg"] here, or in each real\'s [vip.real.healthcheck]'
    ]
    # set at the real: reported at the real
    data = edit(minimal(), ("vip", 0, "real", 0, "healthcheck"), "type", "script")
    assert errors_of(data) == [
        'vip[0].real[0].healthcheck.script: required when type = "script"; add script = ["/usr/local/bin/check", "arg"]'
    ]
    # set globally for many VIPs: one error, not one per real
    data = minimal()
    data["healthcheck"] = {"type": "script"}
    data["vip"].append({"address": "10.99.0.101", "port": 80, "real": [{"address": "10.99.0.11"}]})
    errs = errors_of(data)
    assert len(errs) == 1 and errs[0].startswith(
        'healthcheck.script: required when type = "script": vip[0].real[0]'
    )
    # a script given as a string is reported as such, not also as missing
    data["healthcheck"]["script"] = "/usr/local/bin/check"
    assert errors_of(data) == [
        'healthcheck.script: expected a list of strings, got string "/usr/local/bin/check"; use a list: argv, not a '
        'shell string, e.g. ["/usr/local/bin/check"]'
    ]


def test_vip_key_and_lookup():
    data = minimal()
    data["vip"].append(
        {
            "address": "fd99:0::100",
            "port": 443,
            "protocol": "udp",
            "mode": "tun",
            "real": [{"address": "fd99::11"}],
        }
    )
    cfg = parse(data)
    assert [v.key for v in cfg.vips] == ["10.99.0.100:80/tcp", "[fd99::100]:443/udp"]
    assert cfg.vip_by_key("[fd99::100]:443/udp") is cfg.vips[1]
    assert cfg.vip_by_key("[fd99:0:0::100]:443/UDP") is cfg.vips[1]
    assert cfg.vip_by_key("10.99.0.100:80/tcp") is cfg.vips[0]
    for missing in ("10.99.0.100:81/tcp", "10.99.0.100:80/udp", "nonsense"):
        with pytest.raises(KeyError):
            cfg.vip_by_key(missing)
    assert cfg.vips[0].real_by_address("10.99.0.12") is cfg.vips[0].reals[1]
    assert parse(full()).vrrp_by_name("VI_1").vrid == 51
    with pytest.raises(KeyError):
        cfg.vrrp_by_name("VI_1")


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_example_configs_parse_and_round_trip(path):
    cfg = load_config(path)
    assert cfg.source == str(path)
    assert cfg.node.name
    d = config_to_dict(cfg)
    assert config_from_dict(d) == cfg
    assert parse_config(dumps_toml(d)) == cfg


def test_expected_example_configs_exist():
    names = {p.name for p in CONFIGS.glob("*.toml")}
    assert {"single-dr.toml", "single-tun.toml", "ha-lb1.toml", "ha-lb2.toml"} <= names


def test_ha_pair_examples_agree():
    lb1, lb2 = load_config(CONFIGS / "ha-lb1.toml"), load_config(CONFIGS / "ha-lb2.toml")
    assert lb1.vips == lb2.vips and lb1.healthcheck == lb2.healthcheck
    assert lb1.node.name != lb2.node.name
    assert lb1.sync.enabled and lb2.sync.enabled
    assert lb1.sync.listen in lb2.sync.peers and lb2.sync.listen in lb1.sync.peers
    v1, v2 = lb1.vrrp_by_name(lb1.sync.vrrp_instance), lb2.vrrp_by_name(lb2.sync.vrrp_instance)
    assert (
        v1.version == 3 and (v1.vrid, v1.vips) == (v2.vrid, v2.vips) and v1.priority != v2.priority
    )


def _assert_plain(x):
    if isinstance(x, dict):
        for k, v in x.items():
            assert isinstance(k, str)
            _assert_plain(v)
    elif isinstance(x, list):
        for v in x:
            _assert_plain(v)
    else:
        assert isinstance(x, (str, int, float, bool)), type(x)


def test_config_to_dict_round_trip_everything():
    data = full()
    data["node"].update(
        xdp_mode="generic", pin_path="/sys/fs/bpf/t", api_socket="/tmp/l.sock", conn_table_size=4096
    )
    data["healthcheck"] = {
        "type": "http",
        "port": 8080,
        "http_host": "www.example.test",
        "interval_s": 0.5,
        "timeout_s": 0.25,
    }
    data["vip"][0]["real"][0].update(mac="52:54:00:00:00:01", weight=0)
    data["vip"][0]["real"][0]["healthcheck"] = {
        "type": "script",
        "script": ["/bin/check", "a b", "ü\t", '"q"\\', "\x7f"],
    }
    data["vip"].append(
        {
            "address": "fd99::100",
            "port": 0,
            "protocol": "udp",
            "mode": "tun",
            "hash": "source",
            "ring_size": 251,
            "all_down": "drop",
            "healthcheck": {"port": 0},
            "real": [
                {"address": "10.99.0.21"},
                {"address": "fd99::21", "healthcheck": {"port": 53}},
            ],
        }
    )
    data["metrics"] = {"listen": "[::1]:9100", "enabled": False}
    data["vrrp"][0].update(
        version=2,
        auth_pass="pw",
        advert_interval_s=3,
        preempt=False,
        preempt_delay_s=1.5,
        accept_mode=True,
        unicast_src="10.99.0.2",
        unicast_peers=["10.99.0.3"],
        garp_count=0,
        garp_refresh_s=60,
        notify=["/bin/n"],
        notify_master=["/bin/m", "x"],
        notify_backup=["/bin/b"],
        notify_fault=["/bin/f"],
    )
    data["vrrp"][0]["track_scripts"] = [
        {"script": ["/bin/c"], "interval_s": 0.5, "weight": -10, "rise": 2, "fall": 3}
    ]
    data["vrrp"].append(
        {
            "name": "VI_6",
            "interface": "eth0",
            "vrid": 51,
            "vips": ["fd99::100"],
            "track_interfaces": [],
        }
    )
    data["sync"].update(batch_max=1, batch_delay_ms=0.1, full_sync_interval_s=0, max_datagram=9000)
    cfg = parse(data)
    d = config_to_dict(cfg)
    _assert_plain(d)
    assert config_from_dict(d) == cfg
    assert parse_config(dumps_toml(d)) == cfg
    assert config_to_dict(parse_config(dumps_toml(d))) == d
    # overrides are written only where they differ from the level above
    assert "healthcheck" not in d["vip"][1]["real"][0]
    assert d["vip"][1]["real"][1]["healthcheck"] == {"port": 53}
    # a run-time change (what the API will do) survives the trip
    d["vip"][0]["real"][1]["weight"] = 0
    assert parse_config(dumps_toml(d)).vips[0].reals[1].weight == 0


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "missing.toml")
    assert info.value.errors[0].startswith(
        f"{tmp_path / 'missing.toml'}: cannot read the config file"
    )
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b'[node]\nname = "\xff"\n')
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert "not UTF-8" in str(info.value)
    good = tmp_path / "good.toml"
    good.write_text(dumps_toml(minimal()))
    assert load_config(str(good)).source == str(good)


def test_parse_does_not_touch_the_system(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("parse must not look at the machine")

    monkeypatch.setattr(socket, "if_nametoindex", boom)
    monkeypatch.setattr(cfgsys, "check_system", boom)
    parse(edit(full(), ("node",), "interfaces", ["no-such-if0"]))


# ---------------------------------------------------------------- check_system


@pytest.fixture
def no_mounts(monkeypatch, tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text("bpf /sys/fs/bpf bpf rw,relatime 0 0\n")
    monkeypatch.setattr(cfgsys, "_MOUNTS", str(mounts))
    return mounts


def test_check_system_interfaces(no_mounts):
    assert check_system(parse(edit(minimal(), ("node",), "interfaces", ["lo"]))) == []
    data = edit(full(), ("node",), "interfaces", ["lo", "nosuchif0"])
    data["vrrp"][0]["interface"] = "nosuchif1"
    data["vrrp"][0]["track_interfaces"] = [{"name": "lo"}, {"name": "nosuchif2"}]
    data["sync"] = {"enabled": False}
    errs = check_system(parse(data))
    assert [e.split(":")[0] for e in errs] == [
        "node.interfaces[1]",
        "vrrp[0].interface",
        "vrrp[0].track_interfaces[1].name",
    ]
    assert errs[0] == (
        'node.interfaces[1]: interface "nosuchif0" does not exist here; check `ip link` '
        "(and that l4lb runs in the right network namespace)"
    )
    assert errs[1].startswith('vrrp[0].interface: interface "nosuchif1" does not exist here')


def test_check_system_scripts(no_mounts, tmp_path):
    script = tmp_path / "check"
    script.write_text("#!/bin/sh\nexit 0\n")
    data = edit(minimal(), ("node",), "interfaces", ["lo"])
    data["healthcheck"] = {"type": "script", "script": [str(script)]}
    errs = check_system(parse(data))
    assert errs == [f"healthcheck.script[0]: {script} is not executable; chmod +x {script}"]
    script.chmod(0o755)
    assert check_system(parse(data)) == []
    data["healthcheck"]["script"] = ["no-such-program-l4lb"]
    assert check_system(parse(data)) == [
        'healthcheck.script[0]: "no-such-program-l4lb" is not found in PATH; give an absolute path'
    ]
    data["healthcheck"]["script"] = [str(tmp_path / "gone")]
    assert check_system(parse(data)) == [
        f"healthcheck.script[0]: {tmp_path / 'gone'} does not exist"
    ]


def test_check_system_key_file(no_mounts, tmp_path):
    key = tmp_path / "sync.key"
    data = edit(full(), ("node",), "interfaces", ["lo"])
    data["vrrp"][0].update(interface="lo", track_interfaces=[], track_scripts=[])
    del data["sync"]["key"]
    data["sync"]["key_file"] = str(key)
    cfg = parse(data)
    assert check_system(cfg) == [f"sync.key_file: cannot read {key}: No such file or directory"]
    key.write_text(KEY + "\n")
    key.chmod(0o644)
    assert check_system(cfg) == [
        f"sync.key_file: {key} is accessible by group or others (mode 0644); chmod 600 {key}"
    ]
    key.chmod(0o600)
    assert check_system(cfg) == []
    assert cfg.sync.load_key() == KEY.encode()
    key.write_text("  \n")
    assert check_system(cfg)[0].startswith(f"sync.key_file: sync key file {key} is empty")


def test_check_system_bpffs(monkeypatch, tmp_path):
    mounts = tmp_path / "mounts"
    monkeypatch.setattr(cfgsys, "_MOUNTS", str(mounts))
    cfg = parse(edit(minimal(), ("node",), "interfaces", ["lo"]))
    mounts.write_text("/dev/root / ext4 rw 0 0\nsysfs /sys sysfs rw 0 0\n")
    errs = check_system(cfg)
    assert len(errs) == 1
    assert errs[0].startswith(
        "node.pin_path: /sys/fs/bpf/l4lb is on sysfs (mounted at /sys), not bpffs; mount one with "
        "`mount -t bpf bpf /sys/fs/bpf`"
    )
    mounts.write_text("sysfs /sys sysfs rw 0 0\nbpf /sys/fs/bpf bpf rw 0 0\n")
    assert check_system(cfg) == []
    monkeypatch.setattr(cfgsys, "_MOUNTS", str(tmp_path / "absent"))
    assert check_system(cfg) == []  # cannot tell: say nothing


def test_dataclasses_usable_directly():
    node = NodeConfig(name="lbx", interfaces=("eth0",))
    assert node.api_socket == "/run/l4lb/lbx.sock"
    vip = VipConfig(address=ipaddress.ip_address("10.99.0.100"), port=0, protocol="udp")
    assert vip.key == "10.99.0.100:0/udp"
    cfg = Config(node=node, vips=(vip,))
    assert cfg.vip_by_key("10.99.0.100:0/udp") is vip
    assert VrrpConfig(name="a", interface="eth0", vrid=1, vips=()).family == 4  # no VIPs: IPv4
    v6 = (ipaddress.ip_address("fd99::100"), ipaddress.ip_address("10.99.0.100"))
    assert VrrpConfig(name="a", interface="eth0", vrid=1, vips=v6).family == 6  # the first's


def test_vip_without_reals_is_allowed():
    # like `ipvsadm -A` before any `-a`: reals come later through the API
    cfg = parse_config(
        '[node]\nname = "lb1"\ninterfaces = ["eth0"]\n'
        '[[vip]]\naddress = "10.99.0.100"\nport = 80\n'
    )
    assert cfg.vips[0].reals == ()
    cfg = parse_config(
        '[node]\nname = "lb1"\ninterfaces = ["eth0"]\n'
        '[[vip]]\naddress = "10.99.0.100"\nport = 80\nreal = []\n'
    )
    assert cfg.vips[0].reals == ()


# ------------------------------------------------------------ capacity (maps.h sizes)


def many_vips(n: int, reals_each: int = 1) -> dict:
    data = minimal()
    data["vip"] = [
        {
            "address": f"10.99.{1 + i // 250}.{1 + i % 250}",
            "port": 80,
            "real": [{"address": f"10.98.{j // 250}.{1 + j % 250}"} for j in range(reals_each)],
        }
        for i in range(n)
    ]
    return data


def test_vip_count_is_checked_against_the_compiled_maximum():
    parse(many_vips(64))
    assert errors_of(many_vips(65)) == [
        "vip[64]: 65 VIPs are above the compiled maximum of 64 VIPs (MAX_VIPS); delete a VIP first"
    ]


def test_real_ids_over_all_vips_are_checked():
    parse(many_vips(16, reals_each=255))  # 4080 real ids, of 4095
    data = many_vips(17, reals_each=255)  # 4335: the 4096th real is vip[16].real[15]
    assert errors_of(data) == [
        "vip[16].real[15]: 4335 reals over all VIPs are above the compiled maximum of 4095 "
        "real ids (MAX_REALS - 1)"
    ]


def test_ring_size_against_the_running_data_plane():
    from l4lb.config import Capacity, check_capacity

    data = many_vips(4)
    data["vip"][3]["ring_size"] = 131071
    # A file may ask for any ring size: `l4lb start` builds the maps to fit it.
    cfg = config_from_dict(data)
    assert cfg.vips[3].ring_size == 131071
    # A running daemon whose maps hold rings of 65537 refuses it, naming field and limit.
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, limits=Capacity(ring_max=65537))
    (err,) = info.value.errors
    assert err.startswith(
        "vip[3].ring_size: 131071 is above the compiled maximum 65537 of the running data plane "
        "(restart with this ring_size in the config file"
    )
    assert check_capacity(cfg, Capacity(ring_max=131071)) == []
    # every limit is reported, not only the first
    small = Capacity(max_vips=2, max_real_ids=3, ring_max=65537)
    errs = check_capacity(cfg, small)
    assert [e.split(":")[0] for e in errs] == ["vip[2]", "vip[3].ring_size", "vip[3].real[0]"]


def _udp_sync(walk: float, timeout: int = 4, proto: str = "udp") -> Config:
    data = full()
    data["node"]["conn_timeout_s"] = timeout
    data["vip"][0]["protocol"] = proto
    data["sync"]["full_sync_interval_s"] = walk
    return parse(data)


@pytest.mark.parametrize("walk,timeout,proto,warned", [
    (0, 4, "udp", "is 0 (walks only when a peer starts)"),
    (30, 4, "udp", "is 30 s: a standby copy can be 30 s + 1 s + 3.6 s (takeover) old"),
    (5, 9, "udp", "is 5 s: a standby copy"),  # 5 s + the 1 s grain + 3.6 s takeover
    (4, 9, "udp", None),
    (2, 4, "udp", "below 1.0 s"),  # takeover at 1 s adverts alone nearly fills 4 s
    (30, 4, "tcp", None),  # TCP entries do not time out
    (60, 300, "udp", None),
])
def test_check_warns_when_udp_flows_outlive_the_walks(walk, timeout, proto, warned):
    warns = cfgmod.config_warnings(_udp_sync(walk, timeout, proto))
    if warned is None:
        assert warns == []
    else:
        assert len(warns) == 1 and warned in warns[0] and "10.99.0.100:80/udp" in warns[0]
    assert cfgmod.config_warnings(parse(minimal())) == []  # no sync: nothing to warn about


def test_reload_report_names_mode_and_real_changes_per_vip():
    from l4lb.daemon import _vip_diff

    a = parse(minimal()).vips[0]
    data = minimal()
    data["vip"][0]["mode"] = "tun"
    data["vip"][0]["real"] = [{"address": "10.99.0.11", "weight": 5}, {"address": "10.99.0.13"}]
    b = parse(data).vips[0]
    assert _vip_diff(a, b) == ["mode dr -> tun", "real 10.99.0.13 added",
                               "real 10.99.0.12 removed", "real 10.99.0.11 changed"]
    assert _vip_diff(a, a) == []


def test_healthcheck_via_defaults_to_the_tunnel_for_tun_vips():
    data = minimal()
    data["vip"].append({"address": "10.99.0.101", "port": 80, "mode": "tun",
                        "real": [{"address": "10.99.0.11"},
                                 {"address": "fd99::12"},  # tun: another family
                                 {"address": "10.99.0.13", "healthcheck": {"via": "direct"}},
                                 {"address": "10.99.0.14", "healthcheck": {"type": "none"}}]})
    cfg = parse(data)
    dr, tun = cfg.vips
    assert [cfgmod.hc_via(dr, r) for r in dr.reals] == ["direct", "direct"]
    assert [cfgmod.hc_via(tun, r) for r in tun.reals] == ["tunnel", "direct", "direct", "direct"]
    assert parse_config(dumps_toml(config_to_dict(cfg))) == cfg  # "via" round-trips


@pytest.mark.parametrize("where, real, msg", [
    ("vip", "10.99.0.11", 'vip[0].healthcheck.via: "tunnel" does not fit vip[0].real[0]: the VIP '
                          'is mode = "dr", not "tun"'),
    ("real", "fd99::11", 'vip[0].real[0].healthcheck.via: "tunnel" does not fit vip[0].real[0]: '
                         "the real is IPv6 and the VIP IPv4"),
])
def test_healthcheck_via_tunnel_where_it_cannot_work_is_refused(where, real, msg):
    data = minimal()
    v = data["vip"][0]
    v["real"] = [{"address": real}]
    if where == "vip":
        v["healthcheck"] = {"via": "tunnel"}
    else:
        v["mode"] = "tun"
        v["real"][0]["healthcheck"] = {"via": "tunnel"}
    errs = errors_of(data)
    assert any(msg in e for e in errs), errs
    assert any("via: 'sideways'" in e or "sideways" in e
               for e in errors_of(edit(minimal(), ("healthcheck",), "via", "sideways")))
