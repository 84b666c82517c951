"""The converted config as tables with comments, written as TOML that tomllib reads back to the same dict.

config.dumps_toml writes values; the layout and the comments (where each setting
came from, what changed) are written here, because dumps_toml has no comments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from l4lb.config import dumps_toml
from l4lb.importer.report import Loc


def _one_line(s: str) -> str:
    return " ".join(s.split())


class Table:
    """Ordered key = value pairs, each with an optional trailing comment, and comment lines above."""

    def __init__(self, comments: list[str] | None = None, loc: Loc | None = None) -> None:
        self.items: dict[str, Any] = {}
        self.notes: dict[str, str] = {}
        self.comments: list[str] = list(comments or [])
        self.loc = loc  # where the table came from, for errors found by config validation

    def set(self, key: str, value: Any, note: str | None = None) -> None:
        self.items[key] = value
        if note:
            self.notes[key] = note
        else:
            self.notes.pop(key, None)

    def drop(self, key: str) -> None:
        self.items.pop(key, None)
        self.notes.pop(key, None)

    def __contains__(self, key: str) -> bool:
        return key in self.items

    def get(self, key: str, default: Any = None) -> Any:
        return self.items.get(key, default)


@dataclass
class RealDraft:
    table: Table
    hc: dict[str, Any] = field(default_factory=dict)
    hc_notes: dict[str, str] = field(default_factory=dict)


@dataclass
class VipDraft:
    table: Table
    reals: list[RealDraft] = field(default_factory=list)
    origin: str = ""  # "keepalived" or "haproxy"
    loc: Loc | None = None  # where it was defined (for duplicate reports)

    def split_hc(self) -> tuple[Table, list[Table]]:
        """[vip.healthcheck] = what every real shares; each real keeps only its differences."""
        common: dict[str, Any] = {}
        if self.reals:
            first = self.reals[0].hc
            for k, v in first.items():
                if all(k in r.hc and r.hc[k] == v for r in self.reals[1:]):
                    common[k] = v
        vip_hc = Table()
        for k, v in common.items():
            notes = {r.hc_notes.get(k) for r in self.reals} - {None}
            vip_hc.set(k, v, notes.pop() if len(notes) == 1 else None)
        per_real = []
        for r in self.reals:
            t = Table()
            for k, v in r.hc.items():
                if k not in common:
                    t.set(k, v, r.hc_notes.get(k))
            per_real.append(t)
        return vip_hc, per_real


@dataclass
class Draft:
    header: list[str] = field(default_factory=list)
    node: Table = field(default_factory=Table)
    vips: list[VipDraft] = field(default_factory=list)
    vrrp: list[Table] = field(default_factory=list)
    sync: Table | None = None
    trailer: list[str] = field(default_factory=list)  # comments at the end (what has no place)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"node": dict(self.node.items)}
        vips = []
        for v in self.vips:
            d = dict(v.table.items)
            vip_hc, real_hcs = v.split_hc()
            if vip_hc.items:
                d["healthcheck"] = dict(vip_hc.items)
            reals = []
            for r, hc in zip(v.reals, real_hcs, strict=True):
                rd = dict(r.table.items)
                if hc.items:
                    rd["healthcheck"] = dict(hc.items)
                reals.append(rd)
            d["real"] = reals
            vips.append(d)
        if vips:
            out["vip"] = vips
        if self.vrrp:
            out["vrrp"] = [dict(t.items) for t in self.vrrp]
        if self.sync is not None:
            out["sync"] = dict(self.sync.items)
        return out

    def to_toml(self) -> str:
        lines: list[str] = [f"# {_one_line(c)}" if c else "#" for c in self.header]

        def table(header: str, t: Table, blank: bool = True) -> None:
            if blank and lines:
                lines.append("")
            lines.extend(f"# {_one_line(c)}" for c in t.comments)
            lines.append(header)
            for k, v in t.items.items():
                text = f"{k} = {_value(v)}"
                if k in t.notes:
                    text += f"  # {_one_line(t.notes[k])}"
                lines.append(text)

        table("[node]", self.node)
        for v in self.vips:
            table("[[vip]]", v.table)
            vip_hc, real_hcs = v.split_hc()
            if vip_hc.items:
                table("[vip.healthcheck]", vip_hc, blank=False)
            for r, hc in zip(v.reals, real_hcs, strict=True):
                table("[[vip.real]]", r.table)
                if hc.items:
                    table("[vip.real.healthcheck]", hc, blank=False)
        for t in self.vrrp:
            table("[[vrrp]]", t)
        if self.sync is not None:
            table("[sync]", self.sync)
        if self.trailer:
            lines.append("")
            lines.extend(f"# {_one_line(c)}" if c else "#" for c in self.trailer)
        return "\n".join(lines) + "\n"


def _value(v: Any) -> str:
    if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
        return "[" + ", ".join(
            "{ " + ", ".join(f"{k} = {_value(x)}" for k, x in d.items()) + " }" for d in v
        ) + "]"
    text = dumps_toml({"x": v})
    return text[len("x = "):].rstrip("\n")
