"""Files in, one l4lb config out: format detection, the [node] table, merging, validation.

The result is checked twice before anyone writes it: the TOML text must read
back (tomllib) to exactly the dict that was built, and config_from_dict must
accept that dict. A failure of either is an ImportFailed, never a file.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from l4lb.config import Config, ConfigError, config_from_dict
from l4lb.importer import common as c
from l4lb.importer import haconvert, haproxy, kaconvert, keepalived
from l4lb.importer.emit import Draft, Table, VipDraft
from l4lb.importer.kakeywords import TOP_LEVEL
from l4lb.importer.report import ImportFailed, Report

FORMATS = ("keepalived", "haproxy")


@dataclass
class Result:
    text: str  # the commented TOML
    config: Config  # what l4lb will load from it
    report: Report


def detect_format(path: str | os.PathLike[str], root: Path | None = None) -> str:
    """"keepalived" or "haproxy" from the first statement; ImportFailed if neither."""
    p = Path(path)
    shown = keepalived.display_name(p, root)
    rep = Report()
    text = keepalived.read_text(p, shown, None, rep)
    rep.raise_errors()
    assert text is not None
    for no, raw in enumerate(text.splitlines(), 1):
        line = keepalived.strip_comment(raw).strip()
        if not line:
            continue
        first = line.split()[0]
        if first in haproxy.SECTIONS and "{" not in line:
            return "haproxy"
        if (first in TOP_LEVEL or first in keepalived.INCLUDE_WORDS or first[0] in "@$"
                or "{" in line):
            return "keepalived"
        raise ImportFailed([f"{shown}:{no}: '{first}' starts neither a keepalived.conf nor an haproxy.cfg; "
                            "is this the right file? (or name the format: l4lb import keepalived FILE)"])
    raise ImportFailed([f"{shown}: no configuration statements (empty file?)"])


def _node(draft: Draft, opts: c.Options, ka: kaconvert.KaResult | None, report: Report) -> None:
    t = Table()
    if opts.node:
        name, note = opts.node, "--node"
    elif ka is not None and ka.router_id is not None:
        raw, loc = ka.router_id
        name, note = c.safe_name(raw, c.NODE_NAME, 32), f"router_id {raw} ({loc})"
        if name != raw:
            report.changed(loc, "router_id", f"{raw!r} written as node name {name!r} (A-Z a-z 0-9 _ -, up to 32)")
    else:
        name, note = "lb1", "no --node and no router_id: rename it"
        report.note(None, "node.name", "no --node given and no router_id: the node is called 'lb1'")
    if not c.NODE_NAME.fullmatch(name):
        raise ImportFailed([f"--node {name!r}: a node name is 1-32 characters from A-Z a-z 0-9 _ -"])
    t.set("name", name, note)
    if opts.interfaces:
        bad = [i for i in opts.interfaces if not c.valid_ifname(i)]
        if bad:
            raise ImportFailed([f"--interface {bad[0]!r}: not a valid Linux interface name"])
        t.set("interfaces", list(dict.fromkeys(opts.interfaces)), "--interface")
    elif ka is not None and ka.interfaces:
        t.set("interfaces", list(ka.interfaces), "the VRRP interfaces; XDP attaches here (--interface to change)")
    else:
        t.set("interfaces", ["eth0"], "a guess: give --interface with the NIC that receives VIP traffic")
        report.note(None, "node.interfaces", "no VRRP interface to take it from: XDP attaches to eth0; "
                                             "give --interface")
    if ka is not None and ka.script_security is not None:
        t.set("script_security", True, f"enable_script_security ({ka.script_security})")
    draft.node = t


def _script_security(draft: Draft, report: Report) -> None:
    """l4lb checks scripts by default; keepalived only with enable_script_security: say so."""
    if "script_security" in draft.node:
        return
    argv_keys = ("track_scripts", "notify", "notify_master", "notify_backup", "notify_fault")
    scripts = any(k in t for t in draft.vrrp for k in argv_keys) or any(
        "script" in r.hc for v in draft.vips for r in v.reals)
    if scripts:
        report.changed(None, "script_security", "l4lb refuses scripts that a non-root user could change "
                                                "([node] script_security = true, keepalived's "
                                                "enable_script_security, which the input does not set); "
                                                "check their permissions, or set it false")


def import_files(paths: list[str], opts: c.Options | None = None, *, fmt: str | None = None,
                 root: Path | None = None) -> Result:
    """Convert keepalived and/or HAProxy files (one of each at most) into one node's config.

    `fmt` forces the format of every file; otherwise each is detected. Report paths
    are relative to `root` when given. Raises ImportFailed with file:line errors.
    """
    opts = opts or c.Options()
    if not paths:
        raise ImportFailed(["no input files"])
    if fmt is not None and fmt not in FORMATS:
        raise ImportFailed([f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}"])
    kinds: dict[str, str] = {}
    for p in paths:
        k = fmt or detect_format(p, root)
        if k in kinds:
            raise ImportFailed([f"{p}: a second {k} file ({kinds[k]} is the first); one output is one node: "
                                "convert each node's file separately (keepalived.conf with haproxy.cfg is fine)"])
        kinds[k] = p
    report = Report()
    ka = None
    if "keepalived" in kinds:
        parsed = keepalived.parse_file(kinds["keepalived"], report,
                                       config_id=opts.config_id or opts.node, root=root)
        ka = kaconvert.convert(parsed, report, opts)
        report.raise_errors()
    ha_vips: list[VipDraft] = []
    if "haproxy" in kinds:
        sections = haproxy.parse_file(kinds["haproxy"], report, root=root)
        wild = list(opts.vips) or [str(a.ip) for a in (ka.vrrp_vips if ka else [])]
        try:
            ha_vips = haconvert.convert(sections, report, wild)
        except ValueError as e:  # --vip that is not an address
            raise ImportFailed([f"--vip: {e}"]) from None
        report.raise_errors()

    draft = Draft()
    shown = [keepalived.display_name(Path(kinds[k]), root) for k in FORMATS if k in kinds]
    draft.header = [
        f"l4lb config converted by `l4lb import` from {' and '.join(shown)}.",
        "Every setting without an exact equivalent is listed in the import report (stderr, and",
        "at the end of this file) with file and line; comments say where each table came from.",
    ]
    if ka is not None and ka.summary:
        draft.header.append("VRRP priorities (keepalived's weight rules: + while a track is up, - while down):")
        draft.header.extend(f"  {s}" for s in ka.summary)
    _node(draft, opts, ka, report)
    seen: dict[tuple, VipDraft] = {}
    for v in (ka.vips if ka else []) + ha_vips:
        key = (v.table.get("address"), v.table.get("port"), v.table.get("protocol"))
        if key in seen:
            report.unsupported(v.loc, "VIP", f"{key[0]}:{key[1]}/{key[2]} is already converted from "
                                             f"{seen[key].loc}; this one is dropped")
            continue
        seen[key] = v
        draft.vips.append(v)
    if ka is not None:
        draft.vrrp = ka.vrrp
        draft.sync = ka.sync
    _script_security(draft, report)
    if not draft.vips and not draft.vrrp:
        report.note(None, "result", "nothing to balance or fail over was convertible; the config holds [node] only")
    # The file carries its own report, so what l4lb lacks stays next to the config.
    findings = report.lines()
    if findings:
        draft.trailer = [f"Import report: {len(findings)} setting(s) dropped or with a different meaning "
                         "(unsupported = no l4lb equivalent; changed = converted, behaves differently; "
                         "note = kept, worth knowing):", *findings]
    data = draft.to_dict()
    text = draft.to_toml()
    if tomllib.loads(text) != data:  # the emitter must write what was built
        raise ImportFailed(["internal error: the written TOML does not read back to the converted config"])
    try:
        cfg = config_from_dict(data, source="<import>")
    except ConfigError as e:
        raise ImportFailed([_where(draft, x) for x in e.errors]) from None
    return Result(text, cfg, report)


def _where(draft: Draft, error: str) -> str:
    """A config validation error, prefixed with the input line its table came from."""
    m = re.match(r"(vip|vrrp)\[(\d+)\]", error)
    loc = None
    if m:
        i = int(m.group(2))
        if m.group(1) == "vip" and i < len(draft.vips):
            loc = draft.vips[i].loc
        elif m.group(1) == "vrrp" and i < len(draft.vrrp):
            loc = draft.vrrp[i].loc
    return f"{loc}: l4lb refuses the result: {error}" if loc else f"l4lb refuses the result: {error}"

