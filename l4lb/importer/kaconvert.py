"""keepalived statements -> l4lb tables ([[vrrp]], [[vip]], [sync]) and a report of what differs.

Spellings follow l4lb/config.py and configs/ha-lb1.toml. Every keyword is either
mapped, reported (no equivalent / changed meaning), or an error when keepalived
itself has no such keyword.
"""

from __future__ import annotations

import difflib
import ipaddress
from dataclasses import dataclass, field
from typing import Any

from l4lb.importer import common as c
from l4lb.importer.emit import RealDraft, Table, VipDraft
from l4lb.importer.kakeywords import KEYWORDS, TOP_LEVEL
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
    "enable_script_security": "l4lb always applies its own script security (l4lb/scripts.py)",
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
class _Script:
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


def _close(word: str, choices: set[str] | frozenset[str]) -> str:
    m = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.75)
    return f"; did you mean '{m[0]}'?" if m else ""


class KaConverter:
    def __init__(self, parsed: Parsed, report: Report, opts: c.Options) -> None:
        self.p = parsed
        self.r = report
        self.opts = opts
        self.out = KaResult()
        self.version = 2  # keepalived's default VRRP version (global vrrp_version)
        self.garp_count: int | None = None
        self.garp_refresh: float | None = None
        self.scripts: dict[str, _Script] = {}
        self.groups: dict[str, list[tuple[str, Loc]]] = {}
        self.sync_req: tuple[str, str, Loc] | None = None

    # ---- helpers
    def known(self, st: Stmt, where: str) -> bool:
        """False (and an error) when `st.keyword` is no keepalived keyword at all."""
        if st.keyword in KEYWORDS:
            return True
        hint = _close(st.keyword, KEYWORDS)
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

    # ---- top level
    def run(self) -> KaResult:
        for sk in self.p.skipped:
            self.r.note(sk.loc, sk.cond, f"line left out: {sk.cond} does not match config id "
                                         f"{self.opts.config_id or self.opts.node or '(none)'!r} (give --config-id)")
        stmts = self.p.stmts
        if not any(st.keyword in TOP_LEVEL for st in stmts):
            st = stmts[0]
            self.r.error(st.loc, f"'{st.keyword}' is not a keepalived top-level keyword; is this a keepalived.conf?")
            self.r.raise_errors()
        for st in stmts:  # definitions first: instances and servers refer to them
            if st.keyword == "global_defs":
                self.global_defs(st)
            elif st.keyword == "vrrp_script":
                self.vrrp_script(st)
            elif st.keyword == "virtual_server_group":
                self.vs_group(st)
        for st in stmts:
            k = st.keyword
            if k in ("global_defs", "vrrp_script", "virtual_server_group"):
                continue
            if k == "vrrp_instance":
                self.vrrp_instance(st)
            elif k == "virtual_server":
                self.virtual_server(st)
            elif k not in TOP_LEVEL:
                self.r.error(st.loc, f"unknown top-level keyword '{k}'{_close(k, TOP_LEVEL)}")
            else:
                self.gone(st)
                if k == "vrrp_sync_group":
                    for ch in st.children or []:
                        if ch.keyword.startswith("notify"):
                            self.r.unsupported(ch.loc, ch.keyword, "group notify scripts: put them on each "
                                                                   "instance (notify_master/backup/fault)")
        self.sync()
        return self.out

    def global_defs(self, st: Stmt) -> None:
        for ch in st.children or []:
            k = ch.keyword
            if k == "router_id" and ch.args:
                self.out.router_id = (ch.args[0], ch.loc)
            elif k == "vrrp_version":
                v = self.num(ch, int, 2, 3)
                if v:
                    self.version = v
            elif k == "vrrp_garp_master_repeat":
                v = self.num(ch, int, 0, 100)
                if v is not None:
                    self.garp_count = v
            elif k == "vrrp_garp_master_refresh":
                v = self.num(ch, float, 0, 3600)
                if v is not None:
                    self.garp_refresh = v
            elif k == "lvs_sync_daemon":
                if len(ch.args) < 2:
                    self.r.error(ch.loc, "lvs_sync_daemon needs an interface and a VRRP instance")
                else:
                    self.sync_req = (ch.args[0], ch.args[1], ch.loc)
                    if len(ch.args) > 2:
                        self.r.unsupported(ch.loc, k, f"options {' '.join(ch.args[2:])} dropped: l4lb sync is "
                                                      f"unicast UDP to port {c.SYNC_PORT} with an HMAC key")
            elif k == "vrrp_strict":
                self.r.changed(ch.loc, k, "l4lb always follows RFC 5798 on the wire; it adds no firewall rules")
            else:
                self.other(ch, "global_defs")

    def vrrp_script(self, st: Stmt) -> None:
        if not st.args:
            self.r.error(st.loc, "vrrp_script needs a name")
            return
        s = _Script(st.loc)
        for ch in st.children or []:
            k = ch.keyword
            if k == "script":
                argv, shell = c.command_argv(" ".join(ch.args))
                s.argv = argv
                if shell:
                    self.r.changed(ch.loc, k, "shell syntax: run through /bin/sh -c (keepalived runs scripts "
                                              "without a shell; Debian's sh is dash, which has no /dev/tcp)")
                if "haproxy" in " ".join(ch.args):
                    self.r.note(ch.loc, k, "checks HAProxy: where l4lb replaces HAProxy, make it check l4lb "
                                           "(e.g. [\"/usr/bin/l4lb\", \"status\"]) or it fails on both nodes")
            elif k == "interval":
                v = self.num(ch, float, 0.001, 3600)
                if v:
                    s.interval = v
            elif k == "weight":
                v = self.num(ch, int, -254, 254) if ch.args else None
                if v is not None:
                    s.weight = v
                s.reverse = "reverse" in ch.args[1:]
            elif k in ("rise", "fall"):
                v = self.num(ch, int, 1, 100)
                if v:
                    setattr(s, k, v)
            elif k == "timeout":
                self.r.changed(ch.loc, k, "l4lb stops a track script after max(interval, 1 s)")
            else:
                self.other(ch, "vrrp_script")
        if s.argv is None:
            self.r.unsupported(st.loc, "vrrp_script", f"{st.args[0]} has no script; instances tracking it "
                                                      "drop the track")
        self.scripts[st.args[0]] = s

    def vs_group(self, st: Stmt) -> None:
        if not st.args:
            self.r.error(st.loc, "virtual_server_group needs a name")
            return
        self.groups[st.args[0]] = [(ch.text(), ch.loc) for ch in st.children or []]

    # ---- VRRP
    def vrrp_instance(self, st: Stmt) -> None:
        if not st.args:
            self.r.error(st.loc, "vrrp_instance needs a name")
            return
        raw = st.args[0]
        name = c.safe_name(raw, c.VRRP_NAME, 64)
        if name != raw:
            self.r.changed(st.loc, "vrrp_instance", f"name {raw!r} written as {name!r} (l4lb names use A-Z a-z 0-9 _ . -)")
        t = Table([f"vrrp_instance {raw} ({st.loc})"])
        t.set("name", name)
        f: dict[str, Any] = {"version": None, "advert": 1.0, "vips": [], "peers": [], "src": None,
                             "auth": None, "priority": 100}
        tracks_s: list[dict] = []
        tracks_i: list[dict] = []
        weights: list[tuple[str, int]] = []
        for ch in st.children or []:
            k = ch.keyword
            if k == "interface" and ch.args:
                if c.valid_ifname(ch.args[0]):
                    f["interface"] = ch.args[0]
                else:
                    self.r.error(ch.loc, f"interface {ch.args[0]!r} is not a valid Linux interface name")
            elif k == "virtual_router_id":
                f["vrid"] = self.num(ch, int, 1, 255)
            elif k == "priority":
                v = self.num(ch, int, 1, 255)
                if v:
                    f["priority"] = v
            elif k == "advert_int":
                v = self.num(ch, float, 0.01, 255)
                if v:
                    f["advert"] = v
                    f["advert_loc"] = ch.loc
            elif k == "version":
                f["version"] = self.num(ch, int, 2, 3)
            elif k == "state":
                self.r.changed(ch.loc, k, f"{' '.join(ch.args)}: l4lb has no initial state; every instance "
                                          "starts as backup and the highest priority becomes master after "
                                          "Master_Down_Interval (about 3 adverts), as RFC 5798 says")
            elif k == "nopreempt":
                t.set("preempt", False)
            elif k == "preempt":
                pass  # keepalived's default, and l4lb's
            elif k == "preempt_delay":
                v = self.num(ch, float, 0, 3600)
                if v is not None:
                    f["preempt_delay"] = v
            elif k == "authentication":
                self.auth(ch, f)
            elif k == "unicast_src_ip":
                a = c.ip(ch.args[0]) if ch.args else None
                if a is None:
                    self.r.error(ch.loc, f"unicast_src_ip {' '.join(ch.args)}: not an IP address")
                else:
                    f["src"] = (a, ch.loc)
            elif k == "unicast_peer":
                for p in ch.children or []:
                    a = c.ip(p.keyword)
                    if a is None:
                        self.r.error(p.loc, f"unicast_peer {p.keyword}: not an IP address")
                        continue
                    if p.args:
                        self.r.unsupported(p.loc, "unicast_peer", f"options {' '.join(p.args)} dropped")
                    f["peers"].append((a, p.loc))
            elif k == "virtual_ipaddress":
                for v in ch.children or []:
                    self.vip_line(v, f)
            elif k in ("notify", "notify_master", "notify_backup", "notify_fault"):
                self.notify(ch, t)
            elif k == "track_script":
                for ts in ch.children or []:
                    got = self.track_script(ts)
                    if got:
                        tracks_s.append(got)
                        if got["weight"]:
                            weights.append((ts.keyword, got["weight"]))
            elif k == "track_interface":
                for ti in ch.children or []:
                    got = self.track_interface(ti)
                    if got:
                        tracks_i.append(got)
                        if got["weight"]:
                            weights.append((ti.keyword, got["weight"]))
            elif k == "garp_master_repeat":
                v = self.num(ch, int, 0, 100)
                if v is not None:
                    t.set("garp_count", v)
            elif k == "garp_master_refresh":
                v = self.num(ch, float, 0, 3600)
                if v is not None:
                    t.set("garp_refresh_s", v)
            elif k == "accept":
                t.set("accept_mode", True)
            elif k == "no_accept":
                t.set("accept_mode", False)
            elif k == "lvs_sync_daemon_interface" and ch.args:
                self.sync_req = (ch.args[0], raw, ch.loc)
            else:
                self.other(ch, f"vrrp_instance {raw}")
        self.finish_instance(st, t, f, tracks_s, tracks_i, weights, raw)

    def auth(self, st: Stmt, f: dict) -> None:
        kind, pw = None, None
        for ch in st.children or []:
            if ch.keyword == "auth_type" and ch.args:
                kind = (ch.args[0].upper(), ch.loc)
            elif ch.keyword == "auth_pass" and ch.args:
                pw = (ch.args[0], ch.loc)
            else:
                self.other(ch, "authentication")
        if kind and kind[0] == "AH":
            self.r.unsupported(kind[1], "auth_type", "AH (IPsec) authentication is not supported: l4lb's "
                                                     "adverts would carry none; drop it on the peer too")
            return
        if pw:
            f["auth"] = pw

    def vip_line(self, v: Stmt, f: dict) -> None:
        a = c.iface(v.keyword)
        if a is None or a.ip.is_multicast or a.ip.is_unspecified:
            self.r.error(v.loc, f"virtual_ipaddress {v.keyword}: not a unicast address[/prefix]")
            return
        words = v.args
        i = 0
        while i < len(words):
            w = words[i]
            val = words[i + 1] if i + 1 < len(words) else ""
            if w == "dev":
                f.setdefault("vip_devs", []).append((val, v.loc))
            elif w == "label":
                self.r.unsupported(v.loc, "label", f"{val}: l4lb adds VIPs without a label")
            elif w in ("brd", "broadcast", "scope", "preferred_lft"):
                self.r.unsupported(v.loc, w, f"{w} {val} dropped: l4lb adds VIPs with its own lifetimes")
            elif w == "no_track":
                self.r.unsupported(v.loc, w, "l4lb tracks the VRRP interface only")
                i += 1
                continue
            else:
                self.r.unsupported(v.loc, w, "option dropped")
                i += 1
                continue
            i += 2
        if any(x[0] == a for x in f["vips"]):
            self.r.note(v.loc, "virtual_ipaddress", f"{a} is listed twice; written once")
            return
        f["vips"].append((a, v.loc))

    def notify(self, st: Stmt, t: Table) -> None:
        if not st.args:
            self.r.error(st.loc, f"{st.keyword} needs a script")
            return
        argv, shell = c.command_argv(st.args[0])
        if argv is None:
            self.r.error(st.loc, f"{st.keyword}: empty script")
            return
        if len(st.args) > 1:
            self.r.unsupported(st.loc, "user", f"{' '.join(st.args[1:])}: {NO_EQUIV['user']}")
        if shell:
            self.r.changed(st.loc, st.keyword, "shell syntax: run through /bin/sh -c")
        if st.keyword == "notify":
            msg = "called with INSTANCE <name> <STATE> <priority> appended, as keepalived does"
            self.r.note(st.loc, st.keyword, msg)
        else:
            self.r.changed(st.loc, st.keyword, "l4lb appends INSTANCE <name> <STATE> to the command; "
                                               "keepalived appends nothing to notify_master/backup/fault")
        t.set(st.keyword, argv)

    def track_script(self, ts: Stmt) -> dict | None:
        name = ts.keyword
        s = self.scripts.get(name)
        if s is None:
            self.r.unsupported(ts.loc, "track_script", f"no vrrp_script {name!r} is defined (keepalived ignores "
                                                       "it too); dropped")
            return None
        if s.argv is None:
            return None
        weight, reverse = s.weight, s.reverse
        if ts.args[:1] == ["weight"] and len(ts.args) >= 2:
            w = c.to_int(ts.args[1])
            if w is None or not -254 <= w <= 254:
                self.r.error(ts.loc, f"track_script {name}: weight {ts.args[1]} is not in -254..254")
                return None
            weight, reverse = w, "reverse" in ts.args[2:]
        elif ts.args:
            self.r.unsupported(ts.loc, "track_script", f"{' '.join(ts.args)} dropped")
        if reverse:
            self.r.unsupported(ts.loc, "reverse", f"{name}: reversed tracking has no l4lb equivalent; "
                                                  "invert the script's exit code instead; track dropped")
            return None
        if weight > 0:
            self.r.note(ts.loc, "weight", f"{name} weight {weight}: keepalived adds {weight} to the priority "
                                          f"while the script succeeds and nothing while it fails "
                                          "(keepalived.conf(5), vrrp_script); l4lb does the same. A comment "
                                          "saying the weight is subtracted on failure describes a negative weight")
        return {"script": list(s.argv), "interval_s": float(s.interval), "weight": weight,
                "rise": s.rise, "fall": s.fall}

    def track_interface(self, ti: Stmt) -> dict | None:
        name = ti.keyword
        if not c.valid_ifname(name):
            self.r.error(ti.loc, f"track_interface {name!r} is not a valid interface name")
            return None
        weight = 0
        if ti.args[:1] == ["weight"] and len(ti.args) >= 2:
            w = c.to_int(ti.args[1])
            if w is None or not -254 <= w <= 254:
                self.r.error(ti.loc, f"track_interface {name}: weight {ti.args[1]} is not in -254..254")
                return None
            weight = w
            if "reverse" in ti.args[2:]:
                self.r.unsupported(ti.loc, "reverse", f"{name}: reversed tracking has no l4lb equivalent; dropped")
                return None
        elif ti.args:
            self.r.unsupported(ti.loc, "track_interface", f"{' '.join(ti.args)} dropped")
        return {"name": name, "weight": weight}

    def finish_instance(self, st: Stmt, t: Table, f: dict, tracks_s: list[dict], tracks_i: list[dict],
                        weights: list[tuple[str, int]], raw: str) -> None:
        missing = [k for k, kw in (("interface", "interface"), ("vrid", "virtual_router_id")) if f.get(k) is None]
        if missing or not f["vips"]:
            what = ", ".join([{"vrid": "virtual_router_id"}.get(m, m) for m in missing]
                             + ([] if f["vips"] else ["virtual_ipaddress"]))
            self.r.unsupported(st.loc, "vrrp_instance", f"{raw} has no {what}; l4lb needs it, instance dropped")
            return
        vips = f["vips"]
        fam = vips[0][0].version
        kept = []
        for a, loc in vips:
            if a.version != fam:
                self.r.unsupported(loc, "virtual_ipaddress", f"{a} is IPv{a.version} but {vips[0][0]} is "
                                                             f"IPv{fam}; one l4lb instance carries one family: "
                                                             "put it into a second vrrp_instance")
            else:
                kept.append(a)
        for dev, loc in f.get("vip_devs", []):
            if dev != f["interface"]:
                self.r.changed(loc, "dev", f"{dev}: l4lb adds every VIP of an instance to its interface "
                                           f"{f['interface']}")
        version = f["version"] or self.version
        if fam == 6 and version == 2:
            if f["version"] == 2:
                self.r.changed(st.loc, "version", "IPv6 needs VRRPv3; written as version 3 (keepalived does the same)")
            version = 3
        t.set("interface", f["interface"])
        t.set("vrid", f["vrid"])
        t.set("priority", f["priority"])
        t.set("version", version, None if f["version"] else "keepalived's default (vrrp_version)")
        adv = f["advert"]
        if version == 2 and not float(adv).is_integer():
            new = float(max(1, int(adv) + 1))
            self.r.changed(f.get("advert_loc"), "advert_int", f"{adv:g} s: VRRPv2 counts whole seconds; written as {new:g}")
            adv = new
        elif version == 3:
            new = min(40.95, max(0.01, round(adv * 100) / 100))
            if new != adv:
                self.r.changed(f.get("advert_loc"), "advert_int", f"{adv:g} s: VRRPv3 counts centiseconds "
                                                                  f"up to 40.95; written as {new:g}")
            adv = new
        t.set("advert_interval_s", float(adv))
        if "preempt_delay" in f:
            t.set("preempt_delay_s", float(f["preempt_delay"]))
        if f["auth"]:
            pw, loc = f["auth"]
            if version == 3:
                self.r.unsupported(loc, "authentication", "VRRPv3 has no authentication (RFC 5798); keepalived "
                                                          "ignores it too for version 3")
            else:
                if len(pw) > 8:
                    self.r.changed(loc, "auth_pass", f"longer than 8 characters; VRRPv2 carries 8, written as {pw[:8]!r}")
                    pw = pw[:8]
                t.set("auth_pass", pw)
        src = f["src"]
        peers = []
        for a, loc in f["peers"]:
            if a.version != fam:
                self.r.unsupported(loc, "unicast_peer", f"{a} is not IPv{fam} like the VIPs; dropped")
            elif src and a == src[0]:
                self.r.unsupported(loc, "unicast_peer", f"{a} is this node's unicast_src_ip; dropped")
            elif str(a) not in peers:
                peers.append(str(a))
        if src:
            if src[0].version != fam:
                self.r.unsupported(src[1], "unicast_src_ip", f"{src[0]} is not IPv{fam} like the VIPs; dropped")
            elif not peers:
                self.r.unsupported(src[1], "unicast_src_ip", "without unicast_peer adverts are multicast; dropped")
            else:
                t.set("unicast_src", str(src[0]))
        if peers:
            t.set("unicast_peers", peers)
        t.set("vips", [a.with_prefixlen if a.network.prefixlen != a.max_prefixlen else str(a.ip) for a in kept])
        if self.garp_count is not None and "garp_count" not in t:
            t.set("garp_count", self.garp_count, "vrrp_garp_master_repeat")
        if self.garp_refresh is not None and "garp_refresh_s" not in t:
            t.set("garp_refresh_s", self.garp_refresh, "vrrp_garp_master_refresh")
        if tracks_i:
            seen: set[str] = set()
            uniq = [x for x in tracks_i if not (x["name"] in seen or seen.add(x["name"]))]
            t.set("track_interfaces", uniq)
        if tracks_s:
            t.set("track_scripts", tracks_s)
        # Keys in the order of configs/ha-lb1.toml, whatever the order in the file.
        order = ("name", "interface", "vrid", "priority", "version", "advert_interval_s", "preempt",
                 "preempt_delay_s", "accept_mode", "auth_pass", "unicast_src", "unicast_peers", "vips",
                 "garp_count", "garp_refresh_s", "track_interfaces", "track_scripts", "notify",
                 "notify_master", "notify_backup", "notify_fault")
        items, notes = t.items, t.notes
        t.items = {k: items[k] for k in sorted(items, key=order.index)}
        t.notes = notes
        base = f["priority"]
        up = sum(w for _, w in weights if w > 0)
        down = sum(w for _, w in weights if w < 0)
        if weights:
            desc = ", ".join(f"{n} {w:+d} while {'up' if w > 0 else 'down'}" for n, w in weights)
            line = (f"{t.get('name')}: priority {base}; with tracks {max(1, min(254, base + down))}.."
                    f"{max(1, min(254, base + up))} ({desc})")
            self.out.summary.append(line)
            t.comments.append(f"effective priority {max(1, min(254, base + down))}..{max(1, min(254, base + up))}: {desc}")
        self.out.vrrp.append(t)
        self.out.vrrp_vips.extend(kept)
        if f["interface"] not in self.out.interfaces:
            self.out.interfaces.append(f["interface"])
        self.out.instances[raw] = {"name": t.get("name"), "src": t.get("unicast_src"), "peers": peers,
                                   "interface": f["interface"]}

    def sync(self) -> None:
        if self.sync_req is None:
            return
        ifname, inst_name, loc = self.sync_req
        inst = self.out.instances.get(inst_name)
        t = Table([f"lvs_sync_daemon {ifname} {inst_name} ({loc})"])
        if inst is None:
            self.r.unsupported(loc, "lvs_sync_daemon", f"no converted vrrp_instance {inst_name!r}; no [sync] written")
            return
        if inst["src"] and inst["peers"]:
            t.set("enabled", True)
            t.set("listen", f"{inst['src']}:{c.SYNC_PORT}")
            t.set("peers", [f"{p}:{c.SYNC_PORT}" for p in inst["peers"]])
            t.set("key_file", c.SYNC_KEY_FILE, "same content on both nodes: openssl rand -hex 32; chmod 600")
            t.set("vrrp_instance", inst["name"])
            self.r.changed(loc, "lvs_sync_daemon", f"l4lb syncs its conn table by unicast UDP between "
                                                   f"unicast_src and the peers (port {c.SYNC_PORT}), authenticated "
                                                   f"with the key in {c.SYNC_KEY_FILE}: create it on both nodes")
        else:
            t.set("enabled", False, "set listen, peers and key_file, then enabled = true")
            t.set("vrrp_instance", inst["name"])
            self.r.changed(loc, "lvs_sync_daemon", "l4lb syncs by unicast UDP between node addresses and "
                                                   f"{inst_name} has no unicast_src_ip/unicast_peer: [sync] is "
                                                   "written disabled; set listen, peers and key_file to enable it")
        if ifname != inst["interface"]:
            self.r.note(loc, "lvs_sync_daemon", f"interface {ifname}: l4lb sends sync from the listen address, "
                                                "whatever its interface")
        self.out.sync = t

    # ---- LVS
    def endpoints(self, st: Stmt) -> list[tuple[c.IPAddress, int, Loc]]:
        """The (address, port) pairs a virtual_server serves; reports what cannot be served."""
        args = st.args
        if args[:1] == ["fwmark"]:
            self.gone(st, NO_EQUIV["fwmark"] + "; this virtual_server and its reals are dropped")
            return []
        if args[:1] == ["group"] and len(args) == 2:
            items = self.groups.get(args[1])
            if items is None:
                self.r.error(st.loc, f"virtual_server group {args[1]}: no virtual_server_group of that name")
                return []
            out = []
            for text, loc in items:
                words = text.split()
                if words[0] == "fwmark":
                    self.r.unsupported(loc, "fwmark", NO_EQUIV["fwmark"] + "; this group member is dropped")
                    continue
                got = self.addr_range(words, loc)
                out.extend((a, p, loc) for a, p in got)
            return out
        got = self.addr_range(args, st.loc)
        return [(a, p, st.loc) for a, p in got]

    def addr_range(self, words: list[str], loc: Loc) -> list[tuple[c.IPAddress, int]]:
        if len(words) != 2 or c.to_int(words[1]) is None or not 0 <= int(words[1]) <= 65535:
            self.r.error(loc, f"virtual server {' '.join(words)}: expected ADDRESS PORT (or fwmark N / group NAME)")
            return []
        port = int(words[1])
        text = words[0]
        a = c.ip(text)
        if a is not None:
            return [(a, port)]
        base, _, last = text.rpartition("-")
        first = c.ip(base)
        if first is not None and last:
            # keepalived ranges vary the last byte (IPv4) or last 16-bit group (IPv6, hex)
            try:
                end = int(last, 16 if first.version == 6 else 10)
            except ValueError:
                end = -1
            step_hi = 0xFFFF if first.version == 6 else 0xFF
            start = int(first) & step_hi
            if start <= end <= step_hi:
                if end - start >= 256:
                    self.r.error(loc, f"{text}: a range of {end - start + 1} addresses; at most 256 are converted")
                    return []
                return [(ipaddress.ip_address(int(first) + i), port) for i in range(end - start + 1)]
        self.r.error(loc, f"{text}: not an IP address or keepalived range (e.g. 10.0.0.3-10)")
        return []

    def virtual_server(self, st: Stmt) -> None:
        eps = self.endpoints(st)
        if not eps:
            return
        vs: dict[str, Any] = {"delay_loop": 60.0, "proto": "tcp", "kind": None, "algo": None,
                              "persist": None, "conn_timeout": 5.0, "retry": None, "host": None,
                              "inhibit": None}
        reals: list[Stmt] = []
        for ch in st.children or []:
            k = ch.keyword
            if k == "real_server":
                reals.append(ch)
            elif k == "delay_loop":
                v = self.num(ch, float, 0.001, 3600)
                if v:
                    vs["delay_loop"] = v
            elif k in ("lb_algo", "lvs_sched") and ch.args:
                vs["algo"] = (ch.args[0], ch.loc)
            elif k in ("lb_kind", "lvs_method") and ch.args:
                vs["kind"] = (ch.args[0].upper(), ch.loc, ch.args[1:])
            elif k == "persistence_timeout":
                vs["persist"] = ch.loc
            elif k == "protocol" and ch.args:
                p = ch.args[0].upper()
                if p in ("TCP", "UDP"):
                    vs["proto"] = p.lower()
                else:
                    self.r.unsupported(ch.loc, k, f"{p}: l4lb balances TCP and UDP only; virtual_server dropped")
                    return
            elif k == "connect_timeout":
                v = self.num(ch, float, 0.001, 3600)
                if v:
                    vs["conn_timeout"] = v
            elif k in ("retry", "nb_get_retry"):
                vs["retry"] = self.num(ch, int, 0, 99)
            elif k == "virtualhost" and ch.args:
                vs["host"] = ch.args[0]
            elif k == "inhibit_on_failure":
                vs["inhibit"] = ch.loc
            else:
                self.other(ch, "virtual_server")
        for a, port, loc in eps:
            self.one_vip(st, a, port, loc, vs, reals)

    def one_vip(self, st: Stmt, addr: c.IPAddress, port: int, loc: Loc, vs: dict, reals: list[Stmt]) -> None:
        t = Table([f"virtual_server {' '.join(st.args)} ({st.loc})" + (f", member {addr} {port} ({loc})" if loc != st.loc else "")])
        t.set("address", str(addr))
        t.set("port", port)
        t.set("protocol", vs["proto"])
        kind = vs["kind"]
        mode, note = "dr", None
        if kind is None:
            note = "keepalived's default lvs_method is NAT: not supported, written as dr"
            self.r.changed(st.loc, "lb_kind", "not set: keepalived uses NAT, which l4lb does not support; written as "
                                              "mode = \"dr\": reals must hold the VIP on lo (arp_ignore=1, "
                                              "arp_announce=2) and answer clients directly")
        elif kind[0] == "DR":
            mode = "dr"
        elif kind[0] == "TUN":
            mode = "tun"
            if kind[2]:
                self.r.unsupported(kind[1], "lb_kind", f"{' '.join(kind[2])}: l4lb tunnels with IPIP/IP6IP6 only")
        else:
            note = f"lb_kind {kind[0]} is not supported: written as dr"
            self.r.changed(kind[1], "lb_kind", f"{kind[0]}: not supported (l4lb forwards without rewriting "
                                               "addresses); written as mode = \"dr\": reals must hold the VIP on "
                                               "lo (arp_ignore=1, arp_announce=2) and answer clients directly, "
                                               "not through the balancer")
        t.set("mode", mode, note)
        algo = vs["algo"]
        weighted = True
        hash_ = "5tuple"
        if algo is not None:
            name, aloc = algo
            if name in ("rr", "lc"):
                weighted = False
            if name == "sh":
                hash_ = "source"
                self.r.changed(aloc, "lb_algo", "sh: Maglev consistent hashing of the source address (hash = \"source\")")
            elif name == "mh":
                self.r.note(aloc, "lb_algo", "mh: IPVS's Maglev; l4lb is Maglev with weights (5-tuple hash)")
            else:
                what = {"rr": "round robin", "wrr": "weighted round robin", "lc": "least connections",
                        "wlc": "weighted least connections", "dh": "destination hashing",
                        "fo": "weighted failover", "ovf": "overflow"}.get(name, name)
                extra = "" if weighted else "; rr/lc ignore weights, so every real with weight > 0 gets weight 1"
                self.r.changed(aloc, "lb_algo", f"{name} ({what}) -> Maglev consistent hashing over the 5-tuple, "
                                                f"weighted: new flows are spread by hash, not by {what}{extra}")
        if vs["persist"] is not None:
            hash_ = "source"
            self.r.changed(vs["persist"], "persistence_timeout", "-> hash = \"source\": a client address always "
                                                                  "maps to the same real while the set of healthy "
                                                                  "reals is unchanged, with no timeout")
        t.set("hash", hash_)
        if vs["inhibit"] is not None:
            self.r.note(vs["inhibit"], "inhibit_on_failure", "l4lb's behaviour already: a failed real gets no new "
                                                             "flows and its established flows stay")
        vip = VipDraft(t, origin="keepalived", loc=loc)
        seen: dict[str, Loc] = {}
        for rs in reals:
            real = self.real(rs, addr, port, mode, vs, weighted, seen)
            if real is not None:
                vip.reals.append(real)
        self.out.vips.append(vip)

    def real(self, rs: Stmt, vaddr: c.IPAddress, vport: int, mode: str, vs: dict, weighted: bool,
             seen: dict[str, Loc]) -> RealDraft | None:
        a = c.ip(rs.args[0]) if rs.args else None
        if a is None:
            self.r.error(rs.loc, f"real_server {' '.join(rs.args)}: expected ADDRESS [PORT]")
            return None
        rport = None
        if len(rs.args) > 1:
            rport = c.to_int(rs.args[1])
            if rport is None or not 0 <= rport <= 65535:
                self.r.error(rs.loc, f"real_server port {rs.args[1]} is not 0..65535")
                return None
        if a == vaddr:
            self.r.unsupported(rs.loc, "real_server", f"{a} is the VIP itself; dropped")
            return None
        if mode == "dr" and a.version != vaddr.version:
            self.r.unsupported(rs.loc, "real_server", f"{a} is IPv{a.version}, the VIP IPv{vaddr.version}: dr "
                                                      "needs one family (use lb_kind TUN); dropped")
            return None
        if str(a) in seen:
            self.r.unsupported(rs.loc, "real_server", f"{a} is already a real of this VIP ({seen[str(a)]}); l4lb "
                                                      "keys reals by address: dropped")
            return None
        seen[str(a)] = rs.loc
        if rport is not None and vport and rport != vport:
            self.r.changed(rs.loc, "real_server", f"port {rport} differs from the VIP's {vport}: l4lb does not "
                                                  f"translate ports, the real must serve {vport}; its health check "
                                                  f"still probes {rport}")
        t = Table([f"real_server {' '.join(rs.args)} ({rs.loc})"])
        t.set("address", str(a))
        weight = 1
        rv = dict(vs)
        checkers: list[Stmt] = []
        for ch in rs.children or []:
            k = ch.keyword
            if k == "weight":
                v = self.num(ch, int, 0, 2**31 - 1)
                if v is not None:
                    if v > 65535:
                        self.r.changed(ch.loc, k, f"{v} is above l4lb's 65535; written as 65535")
                        v = 65535
                    weight = v
            elif k in ("TCP_CHECK", "HTTP_GET", "SSL_GET", "MISC_CHECK", "SMTP_CHECK", "DNS_CHECK",
                       "UDP_CHECK", "PING_CHECK", "BFD_CHECK", "FILE_CHECK"):
                checkers.append(ch)
            elif k == "delay_loop":
                v = self.num(ch, float, 0.001, 3600)
                if v:
                    rv["delay_loop"] = v
            elif k == "connect_timeout":
                v = self.num(ch, float, 0.001, 3600)
                if v:
                    rv["conn_timeout"] = v
            elif k in ("retry", "nb_get_retry"):
                rv["retry"] = self.num(ch, int, 0, 99)
            elif k == "virtualhost" and ch.args:
                rv["host"] = ch.args[0]
            elif k == "inhibit_on_failure":
                self.r.note(ch.loc, k, "l4lb's behaviour already: a failed real gets no new flows and its "
                                       "established flows stay")
            elif k == "lvs_method" and ch.args:
                if ch.args[0].upper() != {"dr": "DR", "tun": "TUN"}[mode]:
                    self.r.unsupported(ch.loc, k, f"{ch.args[0]}: l4lb forwards a VIP's reals one way, "
                                                  f"mode = {mode!r}")
            else:
                self.other(ch, "real_server")
        if not weighted and weight > 0:
            weight = 1
        t.set("weight", weight)
        real = RealDraft(t)
        self.health(real, checkers, rv, rport, vport)
        return real

    def health(self, real: RealDraft, checkers: list[Stmt], vs: dict, rport: int | None, vport: int) -> None:
        hc, notes = real.hc, real.hc_notes
        chosen = None
        for ch in checkers:
            if ch.keyword in ("TCP_CHECK", "HTTP_GET", "SSL_GET", "MISC_CHECK", "SMTP_CHECK") and chosen is None:
                chosen = ch
            elif chosen is not None:
                self.r.unsupported(ch.loc, ch.keyword, f"l4lb runs one check per real; {chosen.keyword} "
                                                       f"({chosen.loc}) is kept, this one dropped")
            else:
                self.r.unsupported(ch.loc, ch.keyword, "no such check in l4lb; the real is not checked "
                                                       "(healthcheck type = \"none\")" if ch is checkers[-1] else
                                   "no such check in l4lb; dropped")
        if chosen is None:
            hc["type"] = "none"
            if not checkers:
                notes["type"] = "no checker: keepalived keeps the real up"
            return
        k = chosen.keyword
        hc["type"] = {"TCP_CHECK": "tcp", "SMTP_CHECK": "tcp", "HTTP_GET": "http", "SSL_GET": "https",
                      "MISC_CHECK": "script"}[k]
        if k == "SMTP_CHECK":
            self.r.changed(chosen.loc, k, "l4lb has no SMTP dialogue check: written as a TCP connect check")
        interval, timeout = vs["delay_loop"], vs["conn_timeout"]
        retry = vs["retry"]
        port = rport if rport not in (None, 0) and rport != vport else None
        urls: list[Stmt] = []
        host = vs["host"]
        for ch in chosen.children or []:
            kk = ch.keyword
            if kk == "connect_port":
                v = self.num(ch, int, 1, 65535)
                if v:
                    port = v
            elif kk == "connect_timeout":
                v = self.num(ch, float, 0.001, 3600)
                if v:
                    timeout = v
            elif kk == "misc_timeout":
                v = self.num(ch, float, 0.001, 3600)
                if v:
                    timeout = v
            elif kk == "delay_loop":
                v = self.num(ch, float, 0.001, 3600)
                if v:
                    interval = v
            elif kk in ("retry", "nb_get_retry"):
                retry = self.num(ch, int, 0, 99)
            elif kk == "url" and k in ("HTTP_GET", "SSL_GET"):
                urls.append(ch)
            elif kk == "virtualhost" and ch.args:
                host = ch.args[0]
            elif kk == "misc_path" and k == "MISC_CHECK":
                argv, shell = c.command_argv(" ".join(ch.args))
                if argv:
                    hc["script"] = argv
                if shell:
                    self.r.changed(ch.loc, kk, "shell syntax: run through /bin/sh -c")
            elif kk in ("helo_name", "host") and k == "SMTP_CHECK":
                self.r.unsupported(ch.loc, kk, "no SMTP dialogue in l4lb's checks; dropped")
            elif kk == "delay_before_retry":
                self.gone(ch)
            else:
                self.other(ch, k)
        if k == "MISC_CHECK" and "script" not in hc:
            self.r.unsupported(chosen.loc, k, "no misc_path; the real is not checked (type = \"none\")")
            hc.clear()
            hc["type"] = "none"
            return
        if k in ("HTTP_GET", "SSL_GET"):
            self.urls(chosen, urls, hc, notes)
            if host:
                hc["http_host"] = host
        if port is not None:
            hc["port"] = port
        hc["interval_s"] = float(interval)
        if timeout > interval:
            notes["timeout_s"] = f"keepalived's {timeout:g} s is longer than the interval; l4lb needs timeout <= interval"
            timeout = interval
        hc["timeout_s"] = float(timeout)
        if retry is None:
            retry = 0 if k == "MISC_CHECK" else 1  # keepalived's defaults
        hc["rise"] = 1
        hc["fall"] = min(100, retry + 1)
        notes["fall"] = f"retry {retry} + 1"
        notes["rise"] = "keepalived puts a real back after one good check"

    def urls(self, chosen: Stmt, urls: list[Stmt], hc: dict, notes: dict) -> None:
        if not urls:
            self.r.unsupported(chosen.loc, chosen.keyword, "no url: l4lb checks GET / for status 200")
            return
        for extra in urls[1:]:
            self.r.unsupported(extra.loc, "url", f"l4lb checks one URL per real; the first ({urls[0].loc}) is kept")
        status_seen = False
        for ch in urls[0].children or []:
            kk = ch.keyword
            if kk == "path" and ch.args:
                path = ch.args[0]
                if path.startswith("/") and not any(x.isspace() for x in path):
                    hc["http_path"] = path
                else:
                    self.r.unsupported(ch.loc, kk, f"{path!r} is not a URL path starting with '/'; l4lb checks /")
            elif kk == "status_code" and ch.args:
                status_seen = True
                first = ch.args[0].split("-")[0]
                code = c.to_int(first)
                if code is None or not 100 <= code <= 599:
                    self.r.error(ch.loc, f"status_code {ch.args[0]}: not an HTTP status")
                    continue
                hc["http_expect_status"] = code
                if len(ch.args) > 1 or "-" in ch.args[0]:
                    self.r.changed(ch.loc, kk, f"{' '.join(ch.args)}: l4lb expects one status; written as {code}")
            elif kk == "virtualhost" and ch.args:
                hc["http_host"] = ch.args[0]
            else:
                self.other(ch, "url")
        if not status_seen:
            digest = any(ch.keyword == "digest" for ch in urls[0].children or [])
            if not digest:
                self.r.changed(urls[0].loc, "status_code", "not set: keepalived accepts any 2xx; l4lb expects exactly 200")
            hc["http_expect_status"] = 200
            if digest:
                notes["http_expect_status"] = "keepalived checked a digest here, not the status"


def convert(parsed: Parsed, report: Report, opts: c.Options) -> KaResult:
    return KaConverter(parsed, report, opts).run()
