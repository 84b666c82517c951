"""What the keepalived converters share: the "no equivalent" messages, results, and helpers."""

from __future__ import annotations

import difflib
import ipaddress
from dataclasses import dataclass, field
from typing import Any

from l4lb.importer import common as c
from l4lb.importer.emit import Table, VipDraft
from l4lb.importer.kakeywords import KEYWORDS
from l4lb.importer.keepalived import Parsed, Stmt
from l4lb.importer.report import Loc, Report

EMAIL = ("e-mail alerts: l4lb sends none; alert on its Prometheus metrics (l4lb_vrrp_state, "
         "real health) or use a notify script")
QUORUM = ("no quorum in l4lb: a VIP forwards to whichever reals are up; all_down decides what "
          "happens when none is")
SYSTEM = "addresses, routes and rules outside VRRP are the system's job (systemd-networkd, ifupdown), not l4lb's"
NO_EQUIV: dict[str, str] = {
    **{k: EMAIL for k in ("notification_email", "notification_email_from", "smtp_server",
                          "smtp_connect_timeout", "smtp_helo_name", "smtp_alert",
                          "smtp_alert_vrrp", "smtp_alert_checker", "no_email_faults")},
    **{k: QUORUM for k in ("quorum", "quorum_up", "quorum_down", "quorum_max", "hysteresis")},
    **{k: SYSTEM for k in ("static_ipaddress", "static_routes", "static_rules")},
    "virtual_routes": "routes that follow mastership: add and remove them from notify_master / notify_backup scripts",
    "virtual_rules": "rules that follow mastership: add and remove them from notify_master / notify_backup scripts",
    "use_vmac": "no VRRP virtual MAC: adverts leave from the interface's own MAC and the new master "
                "announces the VIPs with gratuitous ARP / unsolicited NA",
    "vmac_xmit_base": "no VRRP virtual MAC in l4lb",
    "vrrp_sync_group": "l4lb's VRRP instances are independent, nothing moves them together: give them "
                       "the same priorities and tracks, or put the VIPs into one instance",
    "script_user": "l4lb runs scripts as its own user, in their own process group with a minimal environment",
    "user": "l4lb runs scripts as its own user, in their own process group with a minimal environment",
    "net_namespace": "run l4lb itself inside that namespace (nsenter --net=...)",
    "garp_master_delay": "l4lb sends garp_count gratuitous ARPs 10 ms apart on becoming master, without "
                         "a delayed second burst; garp_refresh_s repeats them while master",
    "vrrp_garp_master_delay": "l4lb sends garp_count gratuitous ARPs 10 ms apart on becoming master, "
                              "without a delayed second burst",
    "mcast_src_ip": "adverts leave from the interface's primary address (multicast) or unicast_src",
    "dont_track_primary": "l4lb always goes to FAULT while the VRRP interface is down",
    "sorry_server": "no sorry server: when every real is down, all_down decides (\"keep\" forwards to "
                    "them anyway, \"drop\" drops)",
    "sorry_server_inhibit": "no sorry server in l4lb",
    "sorry_server_lvs_method": "no sorry server in l4lb",
    "alpha": "no alpha mode: reals start as the health checker finds them, then rise/fall apply",
    "omega": QUORUM,
    "persistence_granularity": "source hashing uses the whole client address",
    "ops": "no one-packet scheduling: a UDP flow stays on its real until conn_timeout_s passes idle",
    "notify_up": "no per-real notify scripts; watch l4lb_real_up in the metrics",
    "notify_down": "no per-real notify scripts; watch l4lb_real_up in the metrics",
    "uthreshold": "no connection limits per real",
    "lthreshold": "no connection limits per real",
    "virtual_ipaddress_excluded": "addresses held by the master but not advertised: list them in vips "
                                  "(then they are advertised too) or add them from a notify_master script",
    "notify_stop": "no notify on stop; the notify script gets STOP as its state when the daemon stops",
    "notify_deleted": "no notify on deletion",
    "notify_master_rx_lower_pri": "no such notify in l4lb",
    "track_file": "no file tracking; use a track script that reads the file",
    "vrrp_track_file": "no file tracking; use a track script that reads the file",
    "track_process": "no process tracking; use a track script (e.g. [\"/usr/bin/pgrep\", \"-x\", \"name\"])",
    "vrrp_track_process": "no process tracking; use a track script (e.g. [\"/usr/bin/pgrep\", \"-x\", \"name\"])",
    "track_bfd": "no BFD tracking",
    "bfd_instance": "no BFD in l4lb",
    "ha_suspend": "health checks always run, master or not",
    "delay_before_retry": "l4lb probes at one fixed interval_s; keepalived's retries come "
                          "delay_before_retry apart, so a real goes down after fall x interval_s instead",
    "warmup": "no random start delay; the first probe runs at start",
    "fwmark": "firewall-mark services are not supported: l4lb matches VIPs by address, port and protocol",
    "connect_ip": "l4lb checks the real's own address",
    "bindto": "l4lb binds checks to the node's own address (never a VIP)",
    "bind_if": "l4lb binds checks to the node's own address (never a VIP)",
    "bind_port": "checks use an ephemeral source port",
    "log_all_failures": "every probe result is in the metrics and status",
    "http_protocol": "l4lb sends HTTP/1.0 requests with Connection: close",
    "fast_recovery": "each real has one URL, checked every interval_s",
    "enable_sni": "no SNI in l4lb's HTTPS checks",
    "digest": "dropped: l4lb checks the status code, not an MD5 digest of the body",
    "regex": "dropped: l4lb checks the status code, not the body",
    "misc_dynamic": "the script's exit code cannot set the weight: 0 = up, anything else = down",
    "init_fail": "the first run of the script sets its initial state",
    "lvs_timeouts": "l4lb has conn_timeout_s (UDP) in [node]; TCP entries leave by LRU eviction",
}


@dataclass
class ScriptDef:
    loc: Loc
    argv: list[str] | None = None
    interval: float = 1.0
    weight: int = 0
    reverse: bool = False
    rise: int = 1
    fall: int = 1


@dataclass
class KaResult:
    vrrp: list[Table] = field(default_factory=list)
    vips: list[VipDraft] = field(default_factory=list)
    sync: Table | None = None
    router_id: tuple[str, Loc] | None = None
    interfaces: list[str] = field(default_factory=list)
    vrrp_vips: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = field(default_factory=list)
    instances: dict[str, dict[str, Any]] = field(default_factory=dict)  # converted, by name
    summary: list[str] = field(default_factory=list)  # comment lines for the output's header
    script_security: Loc | None = None  # where global_defs enables it


def close_match(word: str, choices: set[str] | frozenset[str]) -> str:
    m = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.75)
    return f"; did you mean '{m[0]}'?" if m else ""


class KaBase:
    def __init__(self, parsed: Parsed, report: Report, opts: c.Options) -> None:
        self.p = parsed
        self.r = report
        self.opts = opts
        self.out = KaResult()
        self.version = 2  # keepalived's default VRRP version (global vrrp_version)
        self.garp_count: int | None = None
        self.garp_refresh: float | None = None
        self.scripts: dict[str, ScriptDef] = {}
        self.groups: dict[str, list[tuple[str, Loc]]] = {}
        self.sync_req: tuple[str, str, Loc] | None = None

    # ---- helpers
    def known(self, st: Stmt, where: str) -> bool:
        """False (and an error) when `st.keyword` is no keepalived keyword at all."""
        if st.keyword in KEYWORDS:
            return True
        hint = close_match(st.keyword, KEYWORDS)
        self.r.error(st.loc, f"unknown keyword '{st.keyword}' in {where}{hint}")
        return False

    def gone(self, st: Stmt, why: str | None = None) -> None:
        """Report `st` as having no l4lb equivalent."""
        self.r.unsupported(st.loc, st.keyword, why or NO_EQUIV.get(st.keyword, "no l4lb equivalent; dropped"))

    def other(self, st: Stmt, where: str) -> None:
        if self.known(st, where):
            self.gone(st)

    def num(self, st: Stmt, kind: type, lo: float, hi: float) -> Any:
        if len(st.args) < 1:
            self.r.error(st.loc, f"{st.keyword} needs a value")
            return None
        v = (c.to_int if kind is int else c.to_float)(st.args[0])
        if v is None or not lo <= v <= hi:
            self.r.error(st.loc, f"{st.keyword} {st.args[0]}: expected a number in {lo:g}..{hi:g}")
            return None
        if len(st.args) > 1:
            self.r.unsupported(st.loc, st.keyword, f"extra words after the value dropped: {' '.join(st.args[1:])}")
        return v

