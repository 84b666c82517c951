"""Run-time changes validated by what they touch, not the whole config again.

An API change is a function that edits the config as a plain dict (config_to_dict's
form); the result must be what config_from_dict makes of the edited dict, errors
included. Parsing 1,000 reals takes ~10 ms and turning them into a dict ~3 ms, for a
change of one real. Here the dict form of the running config is kept, the change
edits a copy, and only what differs from the kept form is parsed again: VIPs whose
own fields changed whole, and otherwise just the reals whose tables changed (a real
parses the same under the same VIP fields and defaults). Everything the whole parse
checks across VIPs and reals is checked again on the result (duplicate VIPs and reals,
ring sizes, capacity). Anything else, and every refusal, goes through the whole parse,
so results and error messages are exactly config_from_dict's.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections.abc import Callable
from typing import Any

from l4lb.config.checks import Capacity, check_capacity
from l4lb.config.dump import config_to_dict
from l4lb.config.model import Config, ConfigError, VipConfig
from l4lb.config.parse import config_from_dict

__all__ = ["Changes"]


class _Whole(Exception):
    """The change needs (or its refusal comes from) the whole parse."""


class Changes:
    """Candidate configs for run-time changes. Thread-safe: changes may be validated
    in threads at once; each works on its own copy."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # The last two configs made or asked about, with their dict forms (a change
        # refused, or raced by another, leaves the running config's form here).
        self._known: list[tuple[Config, dict]] = []
        self.fast = self.whole = 0  # how candidates were made (tests, debugging)

    def candidate(self, base: Config, mutate: Callable[[dict], Any], limits: Capacity,
                  source: str = "api") -> Config:
        """What config_from_dict(edited dict of `base`, source, limits) returns, or the
        ConfigError it raises."""
        form = self._form(base)
        data, keep = _copy(form)
        mutate(data)
        try:
            cfg, new_form = _reparse(base, form, data, keep, limits, source)
        except _Whole:
            self.whole += 1
            return config_from_dict(data, source=source, limits=limits)
        self.fast += 1
        self._remember(cfg, new_form)
        return cfg

    def _form(self, base: Config) -> dict:
        with self._lock:
            for cfg, form in self._known:
                if cfg is base:
                    return form
        form = config_to_dict(base)
        self._remember(base, form)
        return form

    def _remember(self, cfg: Config, form: dict) -> None:
        with self._lock:
            self._known = [(c, f) for c, f in self._known if c is not cfg][-1:] + [(cfg, form)]


def _copy(form: dict) -> tuple[dict, dict]:
    """A copy of `form` for a change to edit, and where each VIP and real table of it
    came from: id -> (VIP index, real index or None). The copies are kept alive with
    it so that no new table of the change can reuse one's id."""
    data = {k: copy.deepcopy(v) for k, v in form.items() if k != "vip"}
    origin: dict[int, tuple[int, int | None]] = {}
    alive = []
    if "vip" in form:
        vips = []
        for i, p in enumerate(form["vip"]):
            d = {k: copy.deepcopy(v) for k, v in p.items() if k != "real"}
            reals = []
            for j, r in enumerate(p.get("real", ())):
                c = copy.deepcopy(r) if "healthcheck" in r else dict(r)
                origin[id(c)] = (i, j)
                reals.append(c)
            alive.append(reals)
            d["real"] = reals
            origin[id(d)] = (i, None)
            vips.append(d)
        data["vip"] = vips
    return data, {"origin": origin, "alive": alive}


def _vip_fields(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "real"}


def _reparse(base: Config, form: dict, data: Any, keep: dict, limits: Capacity,
             source: str) -> tuple[Config, dict]:
    origin = keep["origin"]
    if not isinstance(data, dict) or data.keys() != form.keys():
        raise _Whole
    if any(data[k] != form[k] for k in form if k != "vip"):
        raise _Whole  # outside the VIPs: rare at run time
    if "vip" not in data:
        return base, form
    vips = data["vip"]
    if not isinstance(vips, list) or not all(isinstance(d, dict) for d in vips):
        raise _Whole
    plan = []  # per VIP: ("same", i) | ("reals", i, [j or table]) | ("whole", table)
    subset = []
    for d in vips:
        i = origin.get(id(d), (None, None))[0]
        if i is None or _vip_fields(d) != _vip_fields(form["vip"][i]):
            plan.append(("whole", d))
            subset.append(d)
            continue
        reals = d.get("real")
        if not isinstance(reals, list):
            raise _Whole
        pr = form["vip"][i].get("real", [])
        picks, parse = [], []
        for r in reals:
            o = origin.get(id(r))
            if o is not None and o[0] == i and r == pr[o[1]]:
                picks.append(o[1])
            else:
                picks.append(None)
                parse.append(r)
        if not parse and picks == list(range(len(pr))):
            plan.append(("same", i))
            subset.append(_vip_fields(d))
        else:
            plan.append(("reals", i, picks))
            subset.append(dict(_vip_fields(d), real=parse))
    try:
        part = config_from_dict(dict(data, vip=subset), source=source, limits=limits)
    except ConfigError:
        raise _Whole from None  # the whole parse words the refusal
    if len(part.vips) != len(plan):
        raise _Whole
    out: list[VipConfig] = []
    for step, pv in zip(plan, part.vips, strict=True):
        if step[0] == "whole":
            out.append(pv)
            continue
        bv = base.vips[step[1]]
        if dataclasses.replace(bv, reals=pv.reals) != pv:
            raise _Whole  # VIP fields parse otherwise than before: never expected
        if step[0] == "same":
            out.append(bv)
            continue
        parsed = iter(pv.reals)
        reals = tuple(bv.reals[j] if j is not None else next(parsed) for j in step[2])
        # Duplicates by the canonical spelling (the kept form's, str() of the new ones):
        # hashing strings is far cheaper than hashing addresses.
        pr = form["vip"][step[1]]["real"]
        spelled = {pr[j]["address"] if j is not None else str(r.address)
                   for j, r in zip(step[2], reals, strict=True)}
        if len(spelled) != len(reals) or len(reals) > pv.ring_size:
            raise _Whole  # a duplicate real or too small a ring: the whole parse says so
        out.append(dataclasses.replace(pv, reals=reals))
    cfg = dataclasses.replace(part, vips=tuple(out))
    if check_capacity(cfg, limits):
        raise _Whole
    return cfg, _new_form(cfg, form, plan)


def _new_form(cfg: Config, form: dict, plan: list) -> dict:
    """config_to_dict(cfg), from `form` and the tables of what was parsed again."""
    new = {k: v for k, v in form.items() if k != "vip"}
    vips = []
    for step, v in zip(plan, cfg.vips, strict=True):
        if step[0] == "same":
            vips.append(form["vip"][step[1]])
            continue
        if step[0] == "whole":
            vips.append(_one_vip(cfg, v))
            continue
        old = form["vip"][step[1]]
        fresh = [r for r, j in zip(v.reals, step[2], strict=True) if j is None]
        made = iter(_one_vip(cfg, dataclasses.replace(v, reals=tuple(fresh)))["real"])
        vips.append(dict(old, real=[old["real"][j] if j is not None else next(made)
                                    for j in step[2]]))
    if vips:
        new["vip"] = vips
    return new


def _one_vip(cfg: Config, v: VipConfig) -> dict:
    return config_to_dict(dataclasses.replace(cfg, vips=(v,)))["vip"][0]
