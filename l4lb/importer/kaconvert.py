"""keepalived statements -> l4lb tables ([[vrrp]], [[vip]], [sync]) and a report of what differs.

Spellings follow l4lb/config/ and configs/ha-lb1.toml. Every keyword is either
mapped, reported (no equivalent / changed meaning), or an error when keepalived
itself has no such keyword.
"""

from __future__ import annotations

from l4lb.importer import common as c
from l4lb.importer.emit import Table
from l4lb.importer.kabase import KaResult, ScriptDef, close_match
from l4lb.importer.kakeywords import TOP_LEVEL
from l4lb.importer.kalvs import LvsPart
from l4lb.importer.kavrrp import VrrpPart
from l4lb.importer.keepalived import Parsed, Stmt
from l4lb.importer.report import Report


class KaConverter(VrrpPart, LvsPart):
    """Top level, global_defs, vrrp_script, groups and [sync]; VrrpPart and LvsPart do the rest."""

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
                self.r.error(st.loc, f"unknown top-level keyword '{k}'{close_match(k, TOP_LEVEL)}")
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
            elif k == "enable_script_security":
                self.out.script_security = ch.loc
            elif k == "vrrp_strict":
                self.r.changed(ch.loc, k, "l4lb always follows RFC 5798 on the wire; it adds no firewall rules")
            else:
                self.other(ch, "global_defs")

    def vrrp_script(self, st: Stmt) -> None:
        if not st.args:
            self.r.error(st.loc, "vrrp_script needs a name")
            return
        s = ScriptDef(st.loc)
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

def convert(parsed: Parsed, report: Report, opts: c.Options) -> KaResult:
    return KaConverter(parsed, report, opts).run()
