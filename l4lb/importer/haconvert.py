"""HAProxy sections -> l4lb [[vip]] tables, and a report of everything that is layer 7 or has no equivalent.

A frontend (or listen) bind becomes a VIP per address:port; its reals are the
servers of default_backend (or the listen section's own). HAProxy is a proxy:
the servers talk to HAProxy. l4lb forwards in dr mode, so the servers answer the
clients themselves; the report says so once per frontend.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from l4lb.importer import common as c
from l4lb.importer.emit import RealDraft, Table, VipDraft
from l4lb.importer.haproxy import Line, Section
from l4lb.importer.report import Loc, Report

LAYER7 = ("layer 7 (HTTP): l4lb forwards connections without reading them; do this on the servers "
          "or in an HTTP proxy behind l4lb")
STATS = ("no statistics page: use `l4lb status`, `l4lb stats` or the Prometheus endpoint ([metrics] "
         "listen)")
TIMEOUTS = ("no proxy timeouts: TCP flows leave the conn table by LRU eviction, UDP flows after "
            "conn_timeout_s idle ([node])")
LOGS = "no per-connection logs: the metrics count packets, bytes and new flows per VIP and real"
PROCESS = "HAProxy process setting: l4lb runs as a systemd service (configs/l4lb.service)"
MAX_PORTS = 64
L7_OPTIONS = {"httplog", "forwardfor", "http-server-close", "httpclose", "http-keep-alive",
              "http-buffer-request", "http-pretend-keepalive", "http-use-proxy-header",
              "http-ignore-probes", "http-no-delay", "http_proxy", "originalto", "accept-invalid-http-request",
              "accept-invalid-http-response", "h1-case-adjust-bogus-client", "h1-case-adjust-bogus-server",
              "forceclose", "http-restrict-req-hdr-names", "checkcache", "log-separate-errors"}
LOG_OPTIONS = {"tcplog", "dontlognull", "dontlog-normal", "log-health-checks", "httpslog", "logasap"}


def parse_time(text: str) -> float | None:
    """HAProxy time ("5000" = ms, "5s", "100ms", "2m", "1h", "1d", "10us") in seconds."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(us|ms|s|m|h|d)?", text.strip())
    if not m:
        return None
    unit = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}[m.group(2) or "ms"]
    return float(m.group(1)) * unit


@dataclass
class _Proxy:
    sec: Section
    mode: tuple[str, Loc | None] = ("tcp", None)
    balance: tuple[list[str], Loc] | None = None
    httpchk: tuple[list[str], Loc] | None = None
    expect: tuple[list[str], Loc] | None = None
    check_send: tuple[list[str], Loc] | None = None
    check_ssl_opt: bool = False
    timeout_check: float | None = None
    timeout_connect: float | None = None
    default_server: list[tuple[list[str], Loc]] = field(default_factory=list)
    binds: list[Line] = field(default_factory=list)
    servers: list[Line] = field(default_factory=list)
    default_backend: Line | None = None
    use_backends: list[Line] = field(default_factory=list)


class HaConverter:
    def __init__(self, sections: list[Section], report: Report, wildcard_vips: list[str]) -> None:
        self.sections = sections
        self.r = report
        self.wild = [ipaddress.ip_address(a) for a in wildcard_vips]
        self.vips: list[VipDraft] = []
        self.dr_noted = False
        self.used: set[str] = set()  # backends that became a VIP's reals

    def run(self) -> list[VipDraft]:
        defaults: dict[str, _Proxy] = {}
        last_default: _Proxy | None = None
        backends: dict[str, _Proxy] = {}
        fronts: list[_Proxy] = []
        for sec in self.sections:
            if sec.kind == "global":
                for ln in sec.lines:
                    self.global_line(ln)
                continue
            if sec.kind not in ("defaults", "frontend", "backend", "listen"):
                self.r.unsupported(sec.loc, sec.kind, f"{sec.kind} section: no l4lb equivalent; dropped")
                continue
            base = defaults.get(sec.from_defaults or "") if sec.from_defaults else last_default
            px = self.proxy(sec, base)
            if sec.kind == "defaults":
                last_default = px
                if sec.name:
                    defaults[sec.name] = px
            if sec.kind in ("backend", "listen"):
                backends[sec.name] = px
            if sec.kind in ("frontend", "listen"):
                fronts.append(px)
        for px in fronts:
            self.frontend(px, backends)
        for name, px in backends.items():
            if px.sec.kind == "backend" and name not in self.used:
                self.r.unsupported(px.sec.loc, f"backend {name}", "not the default_backend of any frontend "
                                                                  "(only chosen by layer-7 rules, or unused): "
                                                                  "its servers are not converted")
        return self.vips

    def global_line(self, ln: Line) -> None:
        kw = ln.keyword
        if kw.startswith("stats"):
            self.r.unsupported(ln.loc, kw, STATS)
        elif kw.startswith("log"):
            self.r.unsupported(ln.loc, kw, LOGS)
        elif kw.startswith("ssl-") or kw.startswith("tune.ssl"):
            self.r.unsupported(ln.loc, kw, "TLS settings: l4lb passes TLS through; the servers terminate it")
        elif kw in ("maxconn", "maxconnrate", "maxsessrate"):
            self.r.unsupported(ln.loc, kw, "no connection limits in l4lb")
        else:
            self.r.unsupported(ln.loc, kw, PROCESS)

    def proxy(self, sec: Section, base: _Proxy | None) -> _Proxy:
        px = _Proxy(sec)
        if base is not None:  # defaults carry over, HAProxy style
            px.mode, px.balance, px.httpchk = base.mode, base.balance, base.httpchk
            px.expect, px.check_send, px.check_ssl_opt = base.expect, base.check_send, base.check_ssl_opt
            px.timeout_check, px.timeout_connect = base.timeout_check, base.timeout_connect
            px.default_server = list(base.default_server)
            px.default_backend = base.default_backend
        for ln in sec.lines:
            self.proxy_line(px, ln)
        return px

    def proxy_line(self, px: _Proxy, ln: Line) -> None:
        kw, args = ln.keyword, ln.args
        if kw == "mode" and args:
            if args[0] not in ("tcp", "http"):
                self.r.unsupported(ln.loc, "mode", f"{args[0]}: l4lb balances TCP and UDP connections")
            px.mode = (args[0], ln.loc)
        elif kw == "bind":
            px.binds.append(ln)
        elif kw == "server":
            px.servers.append(ln)
        elif kw == "default-server":
            px.default_server.append((args, ln.loc))
        elif kw == "balance" and args:
            px.balance = (args, ln.loc)
        elif kw == "default_backend" and args:
            px.default_backend = ln
        elif kw == "use_backend":
            px.use_backends.append(ln)
        elif kw == "option" and args:
            self.option(px, ln)
        elif kw == "no" and args:
            self.r.unsupported(ln.loc, ln.text(), "no l4lb equivalent; dropped")
        elif kw == "http-check" and args:
            if args[0] == "expect":
                px.expect = (args[1:], ln.loc)
            elif args[0] == "send":
                px.check_send = (args[1:], ln.loc)
            else:
                self.r.unsupported(ln.loc, f"http-check {args[0]}", "l4lb's HTTP check is one GET and a status")
        elif kw == "timeout" and len(args) >= 2:
            t = parse_time(args[1])
            if args[0] == "check" and t:
                px.timeout_check = t
            elif args[0] == "connect" and t:
                px.timeout_connect = t
                self.r.note(ln.loc, "timeout connect", "used as the health check timeout where no timeout check is set")
            else:
                self.r.unsupported(ln.loc, f"timeout {args[0]}", TIMEOUTS)
        elif kw == "stats":
            self.r.unsupported(ln.loc, f"stats {args[0] if args else ''}".strip(), STATS)
        elif kw == "log":
            self.r.unsupported(ln.loc, kw, LOGS)
        elif kw in ("acl", "http-request", "http-response", "http-after-response", "redirect", "cookie",
                    "capture", "compression", "errorfile", "errorfiles", "errorloc", "errorloc302",
                    "errorloc303", "http-reuse", "unique-id-format", "unique-id-header", "monitor-uri",
                    "http-error", "reqadd", "reqdel", "reqrep", "rspadd", "rspdel", "rsprep",
                    "http-send-name-header", "use-server", "filter", "log-format"):
            self.r.unsupported(ln.loc, kw, LAYER7)
        elif kw in ("maxconn", "fullconn", "rate-limit", "backlog"):
            self.r.unsupported(ln.loc, kw, "no connection limits in l4lb")
        elif kw in ("stick", "stick-table", "hash-type", "hash-balance-factor"):
            self.r.unsupported(ln.loc, kw, "stickiness: l4lb's conn table keeps a flow on its real; "
                                           "hash = \"source\" keeps a client on one real")
        elif kw in ("retries", "retry-on", "redispatch"):
            self.r.unsupported(ln.loc, kw, "l4lb does not retry connections: the client's own connection "
                                           "goes to the real")
        elif kw == "tcp-check":
            self.r.unsupported(ln.loc, kw, "l4lb's TCP check is a connect, without send/expect steps")
        else:
            self.r.unsupported(ln.loc, kw, "no l4lb equivalent; dropped")

    def option(self, px: _Proxy, ln: Line) -> None:
        name = ln.args[0]
        if name == "httpchk":
            px.httpchk = (ln.args[1:], ln.loc)
        elif name == "ssl-hello-chk":
            px.check_ssl_opt = True
            self.r.changed(ln.loc, "option ssl-hello-chk", "written as an HTTPS check of the path (GET, status)")
        elif name in ("tcp-check", "tcpka", "clitcpka", "srvtcpka", "splice-auto", "splice-request",
                      "splice-response", "nolinger", "tcp-smart-accept", "tcp-smart-connect"):
            self.r.unsupported(ln.loc, f"option {name}", "TCP proxy setting: l4lb does not terminate connections")
        elif name in L7_OPTIONS:
            self.r.unsupported(ln.loc, f"option {name}", LAYER7 + (
                "; with dr the servers see the client's address anyway" if name == "forwardfor" else ""))
        elif name in LOG_OPTIONS:
            self.r.unsupported(ln.loc, f"option {name}", LOGS)
        elif name == "redispatch":
            self.r.unsupported(ln.loc, "option redispatch", "l4lb does not retry connections")
        else:
            self.r.unsupported(ln.loc, f"option {name}", "no l4lb equivalent; dropped")

    # ---- frontends -> VIPs
    def frontend(self, px: _Proxy, backends: dict[str, _Proxy]) -> None:
        sec = px.sec
        if px.mode[0] == "http":
            self.r.changed(px.mode[1] or sec.loc, "mode http", "l4lb is layer 4: it forwards the TCP connections "
                                                               "and the servers speak HTTP with the clients; "
                                                               "ACLs, header rules and HTTP logs do not apply")
        if sec.kind == "listen":
            be = px
        else:
            be = None
            name = None
            if px.default_backend is not None and px.default_backend.args:
                name = px.default_backend.args[0]
            for ub in px.use_backends:
                cond = ub.args[1:] if len(ub.args) > 1 else []
                if cond or name is not None:
                    self.r.changed(ub.loc, "use_backend", f"{LAYER7}; every flow of this frontend goes to "
                                                          f"{name or ub.args[0]}")
                elif ub.args:
                    name = ub.args[0]
            if name is None:
                self.r.unsupported(sec.loc, f"frontend {sec.name}", "no default_backend: no reals; no VIP written")
                return
            be = backends.get(name)
            self.used.add(name)
            if be is None:
                self.r.error(px.default_backend.loc if px.default_backend else sec.loc,
                             f"backend {name!r} is not defined")
                return
            if be.mode[0] != px.mode[0] and be.mode[1] is not None:
                self.r.note(be.mode[1], "mode", f"backend {name} is mode {be.mode[0]}, frontend {sec.name} "
                                                f"mode {px.mode[0]}")
        if not px.binds:
            self.r.unsupported(sec.loc, f"{sec.kind} {sec.name}", "no bind line: no VIP written")
            return
        for b in px.binds:
            for addr, port in self.bind_endpoints(b):
                self.vip(px, be, b, addr, port)

    def bind_endpoints(self, b: Line) -> list[tuple[c.IPAddress, int]]:
        if not b.args:
            self.r.error(b.loc, "bind needs an address")
            return []
        if len(b.args) > 1:
            opts = b.args[1:]
            if "ssl" in opts or "crt" in opts:
                self.r.changed(b.loc, "bind ... ssl", "l4lb passes TLS through: the servers need the "
                                                      "certificate and terminate TLS themselves")
            rest = [o for o in opts if o not in ("ssl",)]
            if rest:
                self.r.unsupported(b.loc, "bind options", f"{' '.join(rest)} dropped")
        out = []
        for part in b.args[0].split(","):
            m = re.fullmatch(r"(?:(ipv4|ipv6)@)?(\[[^\]]*\]|[^\[\]]*):(\d+)(?:-(\d+))?", part)
            if not m:
                self.r.unsupported(b.loc, "bind", f"{part}: not ADDRESS:PORT; l4lb VIPs are IP addresses and "
                                                  "ports (no unix sockets, fds or abstract namespaces)")
                continue
            host = m.group(2).strip("[]")
            lo = int(m.group(3))
            hi = int(m.group(4)) if m.group(4) else lo
            if not 1 <= lo <= hi <= 65535 or hi - lo >= MAX_PORTS:
                self.r.unsupported(b.loc, "bind", f"{part}: port range must be 1..65535 and at most "
                                                  f"{MAX_PORTS} ports (or use port 0 = every port)")
                continue
            addrs: list[c.IPAddress]
            if host in ("", "*", "0.0.0.0", "::"):
                fam = 6 if host == "::" else 4
                addrs = [a for a in self.wild if a.version == fam]
                if not addrs:
                    self.r.unsupported(b.loc, "bind", f"{part}: a wildcard address, and l4lb needs the VIP; give "
                                                      "--vip ADDRESS (or import the keepalived.conf holding "
                                                      "the VIP together with this file)")
                    continue
                self.r.note(b.loc, "bind", f"{part}: the wildcard stands for VIP "
                                           f"{', '.join(str(a) for a in addrs)} (from keepalived or --vip)")
            else:
                a = c.ip(host)
                if a is None:
                    self.r.unsupported(b.loc, "bind", f"{part}: {host} is not an IP address; dropped")
                    continue
                addrs = [a]
            out.extend((a, p) for a in addrs for p in range(lo, hi + 1))
        return out

    def vip(self, px: _Proxy, be: _Proxy, b: Line, addr: c.IPAddress, port: int) -> None:
        sec = px.sec
        t = Table([f"{sec.kind} {sec.name} ({sec.loc}), bind {b.args[0]} ({b.loc})"
                   + (f", backend {be.sec.name} ({be.sec.loc})" if be is not px else "")])
        t.set("address", str(addr))
        t.set("port", port)
        t.set("protocol", "tcp")
        t.set("mode", "dr", "HAProxy proxied; dr: the servers answer clients directly")
        if not self.dr_noted:
            self.dr_noted = True
            self.r.changed(sec.loc, f"{sec.kind} {sec.name}", "HAProxy proxies (the servers talk to HAProxy); "
                                                              "l4lb forwards in dr mode: each server needs the VIP "
                                                              "on lo (arp_ignore=1, arp_announce=2), answers the "
                                                              "client directly and sees its real address")
        hash_ = "5tuple"
        if be.balance is not None:
            algo, loc = be.balance
            if algo[0] == "source":
                hash_ = "source"
                self.r.changed(loc, "balance source", "Maglev consistent hashing of the source address "
                                                      "(hash = \"source\")")
            elif algo[0] in ("uri", "url_param", "hdr", "rdp-cookie", "hash"):
                self.r.changed(loc, f"balance {algo[0]}", LAYER7 + "; written as Maglev over the 5-tuple")
            else:
                self.r.changed(loc, f"balance {' '.join(algo)}", "Maglev consistent hashing over the 5-tuple, "
                                                                 "weighted: new flows are spread by hash, not in turn "
                                                                 "or by load")
        t.set("hash", hash_)
        vip = VipDraft(t, origin="haproxy", loc=b.loc)
        seen: dict[str, Loc] = {}
        for s in be.servers:
            real = self.server(be, s, addr, port, seen)
            if real is not None:
                vip.reals.append(real)
        self.vips.append(vip)

    def server(self, be: _Proxy, s: Line, vaddr: c.IPAddress, vport: int, seen: dict[str, Loc]) -> RealDraft | None:
        if len(s.args) < 2:
            self.r.error(s.loc, "server needs a name and an address")
            return None
        name, target = s.args[0], s.args[1]
        m = re.fullmatch(r"(\[[^\]]*\]|[^:\[\]]+|[0-9a-fA-F:]+)(?::([+-]?\d*))?", target)
        host = m.group(1).strip("[]") if m else target
        a = c.ip(host)
        if a is None and ":" in target and not target.startswith("["):
            a = c.ip(target)  # a bare IPv6 address without port
            m = None
        if a is None:
            self.r.unsupported(s.loc, f"server {name}", f"{target}: l4lb needs an IP address, not a name; dropped")
            return None
        port = None
        if m and m.group(2):
            if m.group(2)[0] in "+-":
                self.r.unsupported(s.loc, f"server {name}", f"port offset {m.group(2)}: l4lb forwards to the VIP's "
                                                            "port; offset dropped")
            else:
                port = int(m.group(2))
        params = [p for ds, _ in be.default_server for p in ds] + s.args[2:]
        opts: dict[str, str | bool] = {}
        dropped = []
        i = 0
        with_value = {"weight", "port", "inter", "fastinter", "downinter", "rise", "fall", "maxconn",
                      "minconn", "maxqueue", "slowstart", "cookie", "id", "addr", "check-sni", "sni", "crt",
                      "ca-file", "source", "on-error", "on-marked-down", "on-marked-up", "error-limit",
                      "resolvers", "resolve-prefer", "init-addr", "observe", "agent-port", "agent-inter",
                      "agent-check", "proto", "alpn", "check-alpn", "pool-max-conn", "pool-purge-delay",
                      "send-proxy-v2-options", "track", "redir", "namespace", "verify", "max-reuse", "tfo",
                      "ws", "usesrc", "verifyhost", "ciphers", "ciphersuites", "check-proto", "socks4",
                      "set-proxy-v2-tlv-fmt", "shard", "curves", "sigalgs", "client-sigalgs", "log-proto"}
        while i < len(params):
            p = params[i]
            if p in with_value and i + 1 < len(params):
                opts[p] = params[i + 1]
                i += 2
                continue
            opts[p] = True
            i += 1
        for k in list(opts):
            if k not in ("check", "weight", "backup", "disabled", "port", "inter", "rise", "fall", "check-ssl",
                         "enabled", "no-check"):
                dropped.append(k if opts[k] is True else f"{k} {opts[k]}")
        if dropped:
            self.r.unsupported(s.loc, f"server {name}", f"{' '.join(dropped)}: no l4lb equivalent; dropped")
        if opts.get("backup"):
            self.r.unsupported(s.loc, f"server {name} backup", "no backup servers in l4lb (all reals share the "
                                                               "ring by weight); not added: add it by hand or "
                                                               "`l4lb real add` when needed")
            return None
        if a == vaddr:
            self.r.unsupported(s.loc, f"server {name}", f"{a} is the VIP itself; dropped")
            return None
        if a.version != vaddr.version:
            self.r.unsupported(s.loc, f"server {name}", f"{a} is IPv{a.version}, the VIP IPv{vaddr.version}: dr "
                                                        "needs one family; dropped")
            return None
        if str(a) in seen:
            self.r.unsupported(s.loc, f"server {name}", f"{a} is already a real of this VIP ({seen[str(a)]}); "
                                                        "l4lb keys reals by address: dropped")
            return None
        seen[str(a)] = s.loc
        t = Table([f"server {name} {target} ({s.loc})"])
        t.set("address", str(a))
        weight = 1
        if "weight" in opts:
            w = c.to_int(str(opts["weight"]))
            if w is None or not 0 <= w <= 256:
                self.r.error(s.loc, f"server {name}: weight {opts['weight']} is not 0..256")
                return None
            weight = w
        if opts.get("disabled"):
            self.r.changed(s.loc, f"server {name} disabled", "written as weight 0 (drain): no new flows, "
                                                             "established ones stay")
            t.set("weight", 0, f"disabled (weight {weight} when enabled)")
        else:
            t.set("weight", weight)
        if port is not None and port != vport:
            self.r.changed(s.loc, f"server {name}", f"port {port} differs from the VIP's {vport}: l4lb does not "
                                                    f"translate ports, the server must serve {vport}; its health "
                                                    f"check still probes {port}")
        real = RealDraft(t)
        self.health(be, real, opts, port if port is not None and port != vport else None, s.loc)
        return real

    def health(self, be: _Proxy, real: RealDraft, opts: dict, port: int | None, loc: Loc) -> None:
        hc, notes = real.hc, real.hc_notes
        if not opts.get("check") or opts.get("no-check"):
            hc["type"] = "none"
            notes["type"] = "no 'check': HAProxy keeps the server up"
            return
        ssl = bool(opts.get("check-ssl")) or be.check_ssl_opt
        if be.httpchk is not None:
            hc["type"] = "https" if ssl else "http"
            self.http(be, hc, notes)
        else:
            hc["type"] = "https" if be.check_ssl_opt else "tcp"
            if opts.get("check-ssl"):
                self.r.changed(loc, "check-ssl", "without option httpchk: written as a TCP connect check")
                hc["type"] = "tcp"
        if "port" in opts:
            p = c.to_int(str(opts["port"]))
            if p and 1 <= p <= 65535:
                port = p
        if port is not None:
            hc["port"] = port
        inter = parse_time(str(opts["inter"])) if "inter" in opts else 2.0
        if not inter or inter > 3600:
            self.r.error(loc, f"inter {opts.get('inter')}: not a time up to 1h")
            return
        hc["interval_s"] = inter
        timeout = be.timeout_check or be.timeout_connect or inter
        if timeout > inter:
            notes["timeout_s"] = "no longer than the interval"
            timeout = inter
        hc["timeout_s"] = timeout
        for k, default in (("rise", 2), ("fall", 3)):
            v = c.to_int(str(opts[k])) if k in opts else default
            if v is None or not 1 <= v <= 100:
                self.r.error(loc, f"{k} {opts.get(k)}: not 1..100")
                return
            hc[k] = v

    def http(self, be: _Proxy, hc: dict, notes: dict) -> None:
        assert be.httpchk is not None
        args, loc = be.httpchk
        method, uri, version = "GET", "/", None
        if len(args) == 1:
            uri = args[0]
        elif len(args) >= 2:
            method, uri = args[0], args[1]
            version = " ".join(args[2:]) or None
        if be.check_send is not None:
            words, sloc = be.check_send
            for i, w in enumerate(words[:-1]):
                if w == "meth":
                    method = words[i + 1]
                elif w == "uri":
                    uri = words[i + 1]
                elif w == "hdr" and i + 2 < len(words) and words[i + 1].lower() == "host":
                    hc["http_host"] = words[i + 2]
        if method.upper() not in ("GET", "HEAD"):
            self.r.changed(loc, "option httpchk", f"method {method}: l4lb's check sends GET")
        if version and "host:" in version.lower():  # "HTTP/1.1\r\nHost:\ www.example.com"
            after = version[version.lower().index("host:") + 5:].split()
            if after:
                hc["http_host"] = after[0]
        if uri.startswith("/") and not any(x.isspace() for x in uri):
            hc["http_path"] = uri
        else:
            self.r.unsupported(loc, "option httpchk", f"{uri!r} is not a path starting with '/'; l4lb checks /")
        if be.expect is not None:
            words, eloc = be.expect
            words = [w for w in words if w != "!"]
            if len(words) >= 2 and words[0] == "status" and c.to_int(words[1]) and 100 <= int(words[1]) <= 599:
                hc["http_expect_status"] = int(words[1])
            else:
                self.r.changed(eloc, "http-check expect", f"{' '.join(words)}: l4lb checks for one status code; "
                                                          "written as 200")
                hc["http_expect_status"] = 200
        else:
            hc["http_expect_status"] = 200
            self.r.changed(loc, "option httpchk", "HAProxy accepts any 2xx or 3xx; l4lb expects exactly 200 "
                                                  "(add http-check expect status N to choose)")


def convert(sections: list[Section], report: Report, wildcard_vips: list[str]) -> list[VipDraft]:
    return HaConverter(sections, report, wildcard_vips).run()
