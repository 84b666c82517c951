"""The control-plane core without root: what the maps must hold, as a plan.

A Planner keeps the table state (VIP and real ids, ring slots, retired reals, the
ring memo: plain data, no maps) and turns each change into a Plan: the ordered map
writes (Write records) that make the maps match, computed without bcc or syscalls.
ServiceTables (tables.py) is the thin writer that carries a plan out on the maps;
tests drive a Planner alone (tests/unit/test_plan.py).

Orders the writer relies on (crash consistency, see tables.py): a new ring goes to
the VIP's idle slot, then "save" (tables.json names the new slot and every new id),
then the reals' entries, then the flip; ids leave the maps before they leave the
file; the pre-filter learns a new address before vip_addrs does.

Plans mutate the planner's state as they are made (ids, retired reals, the slot);
what must wait for the writes to succeed is in Plan.commit, what a failed write
must undo in Plan.abort. A refused change (capacity) raises TablesError before
anything changes.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import deque
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from l4lb import maglev
from l4lb.dataplane import maps as M
from l4lb.errors import L4lbError


class TablesError(L4lbError):
    """The maps cannot hold or take a change; the message says why."""


@dataclass
class RealState:
    address: str
    real_id: int
    mac: str
    weight: int
    down: bool = False


@dataclass
class VipState:
    address: str
    port: int
    proto: str
    vip_id: int
    mode: str = "dr"          # dr | tun
    hash: str = "5tuple"      # 5tuple | source
    ring_size: int = maglev.DEFAULT_RING_SIZE
    all_down: str = "keep"    # keep | drop
    slot: int = 0             # 0/1: which of the VIP's two ring slots is live
    reals: dict[str, RealState] = field(default_factory=dict)
    # Reals deleted while flows may still use them: out of the ring, but their id
    # stays programmed so open connections carry on (like IPVS's trash list)
    # until collect_retired() finds no conn entry naming them.
    retired: dict[str, RealState] = field(default_factory=dict)

    @property
    def key(self) -> str:
        a = ipaddress.ip_address(self.address)
        host = f"[{a}]" if a.version == 6 else str(a)
        return f"{host}:{self.port}/{self.proto}"

    @property
    def flags(self) -> int:
        return (M.VIP_F_TUN if self.mode == "tun" else 0) | \
            (M.VIP_F_HASH_SRC if self.hash == "source" else 0)


@functools.lru_cache(maxsize=1 << 16)  # a change re-spells every real of its VIP (~1 us each)
def canon(addr) -> str:
    return str(ipaddress.ip_address(addr))


def check_fits(vips, max_reals: int, want, gone=()) -> tuple[int, int]:
    """The real-id capacity rule, for the planner and the daemon alike: (ids needed,
    ids free) for giving each VIP of ``want`` = [(VIP key, canonical real addresses)]
    exactly those reals, after deleting the VIPs ``gone``. ``vips``: key -> VipState.

    A real keeps its id while it is in the VIP, live or retired (deleted while flows
    may still use it: IPVS's trash list), so only addresses the VIP holds neither way
    need one; a deleted VIP frees the ids of all its reals; id 0 means "no real".
    The change fits when needed <= free; callers word the refusal."""
    held = sum(len(vs.reals) + len(vs.retired) for vs in vips.values())
    freed = sum(len(vips[k].reals) + len(vips[k].retired) for k in gone if k in vips)
    need = 0
    for key, addrs in want:
        vs = vips.get(key)
        if vs is None:
            need += sum(1 for _ in addrs)
        else:
            have, gone_ = vs.reals, vs.retired
            need += sum(1 for a in addrs if a not in have and a not in gone_)
    return need, max_reals - 1 - held + freed


class Write(NamedTuple):
    """One map write. op and its arguments:
    filter (index, 0|1)            vip_filter[index]
    addr_add (address,) / addr_del (address,)   vip_addrs
    zero_vip_stats (vip_id,) / zero_real_stats (real_id,)
    ring (slot_index, ring)        rings[slot_index * ring_max ...] = ring (an idle slot)
    save ()                        tables.json (not a map: the point the file is ahead)
    real (RealState,)              reals[real_id] = address, mac, down
    flip (VipState, ring_size)     vip_by_id[vip_id] then vips[key] name the VIP's live slot
    vip_del (VipState,)            vips[key] removed, vip_by_id[vip_id] cleared
    free_real (real_id, vip_id)    reals[real_id] cleared, its counters folded into the VIP's
    """
    op: str
    args: tuple


@dataclass
class Plan:
    writes: list[Write] = field(default_factory=list)
    commit: list = field(default_factory=list)   # callables: after every write succeeded
    abort: list = field(default_factory=list)    # callables: a write failed
    result: Any = None

    def add(self, op: str, *args) -> None:
        self.writes.append(Write(op, args))

    def ops(self) -> list[str]:
        return [w.op for w in self.writes]


@dataclass
class TableState:
    """Everything the planner knows; the maps hold what it says (after the writes)."""
    max_vips: int
    max_reals: int
    ring_max: int
    vips: dict[str, VipState] = field(default_factory=dict)
    free_vip_ids: deque = field(default_factory=deque)
    free_real_ids: deque = field(default_factory=deque)   # FIFO: an id reused as late as possible
    written: set[int] = field(default_factory=set)     # real ids whose entry this process wrote
    published: set[int] = field(default_factory=set)   # VIP ids whose ring this process wrote
    last_ring: dict[str, Any] = field(default_factory=dict)   # per VIP, the ring last flipped live
    # Per VIP, the rings of its last two distinct inputs: a change undone (a real
    # added and removed, drained and back, a health flap) needs no Maglev rebuild.
    ring_memo: dict[str, dict[tuple, Any]] = field(default_factory=dict)
    filter_slots: set[int] = field(default_factory=set)  # vip_filter slots set to 1
    addrs: set[str] = field(default_factory=set)          # what vip_addrs holds
    retired_at: dict[int, float] = field(default_factory=dict)  # real id -> when retired

    @classmethod
    def empty(cls, max_vips: int, max_reals: int, ring_max: int) -> TableState:
        return cls(max_vips, max_reals, ring_max, free_vip_ids=deque(range(max_vips)),
                   free_real_ids=deque(range(1, max_reals)))  # real id 0 = "no real"

    def adopt(self, vips: list[VipState]) -> None:
        """Take over the VIPs of a previous run (their ids are in use)."""
        used_real = set()
        for vs in vips:
            self.vips[vs.key] = vs
            used_real.update(r.real_id for r in [*vs.reals.values(), *vs.retired.values()])
        used_vip = {vs.vip_id for vs in vips}
        self.free_vip_ids = deque(i for i in range(self.max_vips) if i not in used_vip)
        self.free_real_ids = deque(i for i in range(1, self.max_reals) if i not in used_real)


class Planner:
    """Changes in, plans out. The methods mirror ServiceTables' public ones."""

    def __init__(self, state: TableState):
        self.state = state

    # ----------------------------------------------------------------- VIPs
    def upsert_vip(self, address, port: int, proto: str = "tcp", mode: str = "dr",
                   hash: str = "5tuple", ring_size: int = maglev.DEFAULT_RING_SIZE,
                   all_down: str = "keep") -> Plan:
        s, plan = self.state, Plan()
        if ring_size > s.ring_max:
            raise TablesError(f"ring_size {ring_size} exceeds the compiled maximum {s.ring_max}")
        probe = VipState(canon(address), port, proto, -1)
        vs = s.vips.get(probe.key)
        if vs is None:
            if not s.free_vip_ids:
                raise TablesError(f"no free VIP slot (max {s.max_vips})")
            vs = probe
            vs.vip_id = s.free_vip_ids.popleft()
            plan.add("zero_vip_stats", vs.vip_id)
            s.vips[vs.key] = vs
            self._sync_addrs(plan)
        plan.result = vs
        params = (mode, hash, all_down, ring_size)
        if vs.vip_id in s.published and (vs.mode, vs.hash, vs.all_down, vs.ring_size) == params:
            return plan  # nothing but reals can have changed: set_reals publishes
        vs.mode, vs.hash, vs.all_down, vs.ring_size = params
        self._publish(plan, vs)
        return plan

    def delete_vip(self, key: str) -> Plan:
        s, plan = self.state, Plan()
        vs = s.vips.pop(key, None)
        if vs is None:
            raise TablesError(f"no VIP {key}")
        plan.add("vip_del", vs)
        for r in [*vs.reals.values(), *vs.retired.values()]:
            self._free_real(plan, r, vs.vip_id)
        # Freed in the maps first, then in the file: the file names every id in use.
        s.free_vip_ids.append(vs.vip_id)
        s.published.discard(vs.vip_id)
        s.last_ring.pop(key, None)
        s.ring_memo.pop(key, None)
        self._sync_addrs(plan)
        plan.add("save")
        return plan

    def sync_addrs(self) -> Plan:
        """vip_filter and vip_addrs to match the VIPs (state.addrs: what vip_addrs holds)."""
        plan = Plan()
        self._sync_addrs(plan)
        return plan

    def _sync_addrs(self, plan: Plan) -> None:
        s = self.state
        want = {canon(v.address) for v in s.vips.values()}
        # The pre-filter first, so that a new address is never filtered out.
        slots = {M.vip_filter_index(a) for a in want}
        for i in sorted(slots):
            plan.add("filter", i, 1)
        for a in sorted(want - s.addrs):
            plan.add("addr_add", a)
        for a in sorted(s.addrs - want):
            plan.add("addr_del", a)
        for i in sorted(s.filter_slots - slots):
            plan.add("filter", i, 0)
        s.addrs, s.filter_slots = want, slots

    # ---------------------------------------------------------------- reals
    def set_reals(self, key: str, reals: list[tuple[str, str, int]], now: float) -> Plan:
        """The VIP's reals become exactly ``reals`` = [(address, mac, weight)]; health
        state of reals that stay is kept; too few free ids: refused, nothing changed."""
        s, plan = self.state, Plan()
        vs = self.vip(key)
        want = {canon(a): (mac, w) for a, mac, w in reals}
        need, free = self.check_fits([(key, want)])
        if need > free:
            raise TablesError(f"VIP {key}: {need} new reals need ids but only {free} are free "
                              f"(max_reals {s.max_reals - 1} in all)")
        for addr in list(vs.reals):
            if addr not in want:
                r = vs.retired[addr] = vs.reals.pop(addr)
                s.retired_at[r.real_id] = now
        to_write = []
        for addr, (mac, w) in want.items():
            r = vs.reals.get(addr)
            if r is None and addr in vs.retired:
                r = vs.retired.pop(addr)
                s.retired_at.pop(r.real_id, None)
            if r is None:
                r = RealState(addr, s.free_real_ids.popleft(), mac, w)
                plan.add("zero_real_stats", r.real_id)
            vs.reals[addr] = r
            if r.mac != mac or r.real_id not in s.written:
                r.mac = mac
                to_write.append(r)
            r.weight = w
        self._publish(plan, vs, to_write)  # saves the new ids before writing them
        plan.result = vs
        return plan

    def set_weight(self, key: str, address, weight: int) -> Plan:
        plan = Plan()
        self.real(key, address).weight = weight
        self._publish(plan, self.state.vips[key])
        return plan

    def set_down(self, key: str, address, down: bool) -> Plan:
        """plan.result: whether the health state changed (no writes when not)."""
        plan = Plan(result=False)
        r = self.real(key, address)
        if r.down == down:
            return plan
        r.down = down
        plan.add("real", r)
        plan.commit.append(lambda: self.state.written.add(r.real_id))
        self._publish(plan, self.state.vips[key])
        plan.result = True
        return plan

    def collect_retired(self, referenced: set[int], started: float | None) -> Plan:
        """Free retired reals no conn entry names (``referenced``); one retired after the
        walk began (``started``) waits for the next round. plan.result: how many."""
        s, plan = self.state, Plan(result=0)
        for vs in s.vips.values():
            for addr, r in list(vs.retired.items()):
                if r.real_id in referenced:
                    continue
                if started is not None and s.retired_at.get(r.real_id, 0.0) >= started:
                    continue
                self._free_real(plan, vs.retired.pop(addr), vs.vip_id)
                plan.result += 1
        if plan.result:
            plan.add("save")
        return plan

    def _free_real(self, plan: Plan, r: RealState, vip_id: int) -> None:
        # family 0 marks the id unused: flows still naming it are rescheduled.
        s = self.state
        plan.add("free_real", r.real_id, vip_id)
        s.written.discard(r.real_id)
        s.retired_at.pop(r.real_id, None)
        s.free_real_ids.append(r.real_id)

    def vip(self, key: str) -> VipState:
        try:
            return self.state.vips[key]
        except KeyError:
            raise TablesError(f"no VIP {key} (VIPs: {', '.join(self.state.vips) or 'none'})") \
                from None

    def real(self, key: str, address) -> RealState:
        vs = self.vip(key)
        try:
            return vs.reals[canon(address)]
        except KeyError:
            raise TablesError(f"VIP {key} has no real {address}") from None

    # ------------------------------------------------------------ whole configs
    def apply(self, vips: list[dict], now: float) -> list[Plan]:
        """Make the tables hold exactly ``vips``: dicts of upsert_vip's arguments plus
        "reals" = [(address, mac, weight)]. All or nothing: capacity is checked for the
        whole change first (TablesError naming the limit)."""
        s = self.state
        keys = [VipState(canon(v["address"]), v["port"], v.get("proto", "tcp"), -1).key
                for v in vips]
        gone = [k for k in s.vips if k not in set(keys)]
        for v in vips:
            size = v.get("ring_size", maglev.DEFAULT_RING_SIZE)
            if size > s.ring_max:
                raise TablesError(f"VIP {v['address']}: ring_size {size} exceeds the compiled "
                                  f"maximum {s.ring_max}")
        new_vips = sum(1 for k in keys if k not in s.vips)
        if new_vips > len(s.free_vip_ids) + len(gone):
            raise TablesError(f"{new_vips} new VIPs but only {len(s.free_vip_ids) + len(gone)} "
                              f"VIP slots free (max {s.max_vips})")
        need, free = self.check_fits(
            [(k, [canon(a) for a, _, _ in v.get("reals", ())]) for k, v in zip(keys, vips,
                                                                             strict=True)],
            gone)
        if need > free:
            raise TablesError(f"{need} new reals need ids but only {free} are free "
                              f"(max_reals {s.max_reals - 1} in all)")
        plans = [self.delete_vip(k) for k in gone]
        for v in vips:
            args = {k: x for k, x in v.items() if k != "reals"}
            vs = self._run(plans, self.upsert_vip(**args))
            self._run(plans, self.set_reals(vs.key, list(v.get("reals", ())), now))
        return plans

    def check_fits(self, want, gone=()) -> tuple[int, int]:
        """(real ids needed, real ids free) for a change: see check_fits()."""
        return check_fits(self.state.vips, self.state.max_reals, want, gone)

    @staticmethod
    def _run(plans: list[Plan], plan: Plan):
        plans.append(plan)
        for f in plan.commit:  # a whole-config plan is applied in one go by its caller
            f()
        plan.commit = []
        return plan.result

    # ---------------------------------------------------------------- rings
    def ring_for(self, vs: VipState):
        s = self.state
        # (id, key, weight): maglev.Backend's fields as a plain tuple (cheaper to make)
        inputs = tuple(sorted((r.real_id, r.address, r.weight)
                              for r in vs.reals.values() if not r.down))
        memo = s.ring_memo.setdefault(vs.key, {})
        mkey = (vs.ring_size, inputs)
        ring = memo.get(mkey)
        if ring is None:  # build_ring depends on nothing else: the same input, the same ring
            ring = maglev.build_ring(list(inputs), vs.ring_size)
            if len(memo) >= 2:
                memo.pop(next(iter(memo)))  # the oldest
            memo[mkey] = ring
        else:
            memo[mkey] = memo.pop(mkey)  # now the newest
        if vs.all_down == "keep" and vs.reals and not any(w for _, _, w in inputs) \
                and vs.key in s.last_ring:
            # Every real down (not merely drained): keep serving from the last ring
            # rather than dropping everything, like keepalived's quorum-less default.
            if any(r.down for r in vs.reals.values()):
                return s.last_ring[vs.key]
        return ring

    def _publish(self, plan: Plan, vs: VipState, write_reals=()) -> None:
        """The new ring to the VIP's idle slot, save, the reals, flip. A VIP never
        published yet has no live slot: its current one is written."""
        s = self.state
        ring = self.ring_for(vs)
        present = vs.vip_id in s.published or vs.key in s.last_ring
        new_slot = vs.slot ^ 1 if present else vs.slot
        plan.add("ring", 2 * vs.vip_id + new_slot, ring)
        old_slot, vs.slot = vs.slot, new_slot
        plan.add("save")
        for r in write_reals:
            plan.add("real", r)
        plan.add("flip", vs, len(ring))

        def abort():
            vs.slot = old_slot  # the maps still name the old slot (a restart reads them)

        def commit():
            s.written.update(r.real_id for r in write_reals)
            s.last_ring[vs.key] = ring
            s.published.add(vs.vip_id)
        plan.abort.append(abort)
        plan.commit.append(commit)


__all__ = ["Planner", "Plan", "check_fits", "TableState", "TablesError", "VipState", "RealState", "Write",
           "canon"]
