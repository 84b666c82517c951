"""virtual_server (and _group) -> [[vip]]: forwarding method, scheduler, reals, health checks."""

from __future__ import annotations

import ipaddress
from typing import Any

from l4lb.importer import common as c
from l4lb.importer.emit import RealDraft, Table, VipDraft
from l4lb.importer.kabase import NO_EQUIV, KaBase
from l4lb.importer.keepalived import Stmt
from l4lb.importer.report import Loc

INHIBIT = ("l4lb moves a failed real's established flows to the other reals; keepalived's weight 0 "
           "keeps them on it. To keep them, drain the real instead (weight 0, `l4lb real drain`)")


class LvsPart(KaBase):
    """virtual_server / real_server / checkers (mixed into KaConverter)."""

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
            self.r.changed(vs["inhibit"], "inhibit_on_failure", INHIBIT)
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
                self.r.changed(ch.loc, k, INHIBIT)
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
        if k == "MISC_CHECK":
            timeout = None  # misc_timeout, else keepalived gives the script the whole delay_loop
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
        if timeout is None:
            timeout = interval
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


