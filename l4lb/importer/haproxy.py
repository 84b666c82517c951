"""A reader for haproxy.cfg: sections of `keyword args` lines (HAProxy 2.x syntax, layer 4 view).

Lines are split like HAProxy does (quotes, backslash escapes, '#' comments); a
section starts with global, defaults, frontend, backend, listen (or one of the
other section keywords) and runs to the next. Keywords are checked against the
ones HAProxy knows: an unknown one is an error with its file:line.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path

from l4lb.importer.keepalived import display_name, read_text
from l4lb.importer.report import ImportFailed, Loc, Report

PROXIES = ("defaults", "frontend", "backend", "listen")
SECTIONS = frozenset(("global", *PROXIES, "resolvers", "peers", "userlist", "mailers", "program",
                      "http-errors", "cache", "ring", "log-forward", "crt-store", "traces",
                      "fcgi-app", "dynamic-update"))

# Keywords of HAProxy 2.x proxy sections (defaults/frontend/backend/listen) and global.
PROXY_KEYWORDS = frozenset("""
acl backlog balance bind bind-process capture clitcpka-cnt clitcpka-idle clitcpka-intvl compression
cookie declare default-server default_backend description disabled dispatch email-alert enabled
errorfile errorfiles errorloc errorloc302 errorloc303 error-log-format force-persist filter fullconn
grace hash-balance-factor hash-type http-after-response http-check http-error http-request
http-response http-reuse http-send-name-header id ignore-persist load-server-state-from-file log
log-format log-format-sd log-steps log-tag max-keep-alive-queue max-session-srv-conns maxconn mode
monitor monitor-uri option persist rate-limit redirect retries retry-on server server-state-file-name
server-template source srvtcpka-cnt srvtcpka-idle srvtcpka-intvl stats stick stick-table
tcp-check tcp-request tcp-response timeout transparent unique-id-format unique-id-header use_backend
use-server use-fcgi-app reqadd reqdel reqrep rspadd rspdel rsprep external-check guid
""".split())
GLOBAL_KEYWORDS_PREFIXES = ("tune.", "ssl-", "h1-", "h2-", "lua-", "stats", "log", "ca-base",
                            "crt-base", "nbthread", "nbproc", "cpu-map", "maxconn", "ulimit-n",
                            "daemon", "master-worker", "user", "group", "uid", "gid", "chroot",
                            "pidfile", "node", "description", "hard-stop-after", "spread-checks",
                            "max-spread-checks", "noepoll", "nopoll", "nosplice", "nogetaddrinfo",
                            "noreuseport", "quiet", "zero-warning", "expose-experimental-directives",
                            "localpeer", "presetenv", "setenv", "resetenv", "unsetenv", "external-check",
                            "insecure-", "set-dumpable", "strict-limits", "server-state-", "maxsslconn",
                            "maxconnrate", "maxsessrate", "maxpipes", "maxzlibmem", "maxcomp",
                            "default-path", "busy-polling", "profiling.", "numa-cpu-mapping", "pp2-never",
                            "fd-hard-limit", "grace", "httpclient.", "mworker-", "issuers-chain-path",
                            "ocsp-", "quic-", "thread-", "wurfl-", "51degrees-", "deviceatlas-",
                            "anonkey", "cluster-secret", "h2-workaround", "set-var", "limited-quic",
                            "numa", "debug", "description", "dns-accept-family", "harden.",
                            "no-memory-trimming", "prealloc-fd", "unix-bind", "uid", "ssl-server")


@dataclass
class Line:
    words: list[str]
    loc: Loc

    @property
    def keyword(self) -> str:
        return self.words[0]

    @property
    def args(self) -> list[str]:
        return self.words[1:]

    def text(self) -> str:
        return " ".join(self.words)


@dataclass
class Section:
    kind: str
    name: str
    loc: Loc
    lines: list[Line] = field(default_factory=list)
    from_defaults: str | None = None


def split_line(text: str, loc: Loc, report: Report) -> list[str] | None:
    """HAProxy's word splitting: spaces separate, '\\' escapes, "..." and '...' quote, '#' starts a comment."""
    words: list[str] = []
    cur: list[str] = []
    in_word = False
    quote = None
    i = 0
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == quote:
                quote = None
            elif ch == "\\" and quote == '"' and i + 1 < len(text):
                i += 1
                cur.append(text[i])
            else:
                cur.append(ch)
        elif ch == "\\" and i + 1 < len(text):
            i += 1
            cur.append(text[i])
            in_word = True
        elif ch in "\"'":
            quote = ch
            in_word = True
        elif ch == "#":
            break
        elif ch.isspace():
            if in_word:
                words.append("".join(cur))
                cur, in_word = [], False
        else:
            cur.append(ch)
            in_word = True
        i += 1
    if quote:
        report.error(loc, f"unterminated {quote} quote")
        return None
    if in_word:
        words.append("".join(cur))
    return words


def known_keyword(section: str, word: str) -> bool:
    if section == "global":
        return word in PROXY_KEYWORDS or any(word.startswith(p) for p in GLOBAL_KEYWORDS_PREFIXES)
    if section in PROXIES:
        return word in PROXY_KEYWORDS or word == "no"
    return True  # other sections are reported whole, their contents are not checked


def parse_file(path: str | os.PathLike[str], report: Report, *, root: Path | None = None) -> list[Section]:
    """Sections of an haproxy.cfg. Raises ImportFailed on any error."""
    p = Path(path)
    shown = display_name(p, root)
    text = read_text(p, shown, None, report)
    report.raise_errors()
    assert text is not None
    sections: list[Section] = []
    for no, raw in enumerate(text.splitlines(), 1):
        loc = Loc(shown, no)
        words = split_line(raw, loc, report)
        if not words:
            continue
        kw = words[0]
        if kw in SECTIONS:
            name = words[1] if len(words) > 1 and kw != "global" else ""
            sec = Section(kw, name, loc)
            if "from" in words[2:]:
                i = words.index("from", 2)
                sec.from_defaults = words[i + 1] if i + 1 < len(words) else None
            sections.append(sec)
            continue
        if not sections:
            report.error(loc, f"'{kw}' outside any section (global, defaults, frontend, backend, listen); "
                              "is this an haproxy.cfg?")
            break
        sec = sections[-1]
        if not known_keyword(sec.kind, kw):
            close = difflib.get_close_matches(kw, sorted(PROXY_KEYWORDS), n=1, cutoff=0.75)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            report.error(loc, f"unknown keyword '{kw}' in {sec.kind} section{hint}")
            continue
        sec.lines.append(Line(words, loc))
    report.raise_errors()
    if not sections:
        raise ImportFailed([f"{shown}: no sections (empty file?)"])
    return sections
