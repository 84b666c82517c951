"""The planner (l4lb/dataplane/plan.py) alone: ids, slots, write order, refusals,
the ring memo -- no maps, no root. A tiny Fake writer applies plans the way
ServiceTables does (commit after the writes) and records what the maps would hold."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l4lb import maglev
from l4lb.dataplane import maps as M
from l4lb.dataplane.plan import Plan, Planner, TablesError, TableState

RING = 251  # prime, small: rings build fast


class Fake:
    """Applies plans to dicts standing in for the maps."""

    def __init__(self, max_vips=4, max_reals=8, ring_max=RING):
        self.state = TableState.empty(max_vips, max_reals, ring_max)
        self.p = Planner(self.state)
        self.slots: dict[int, list[int]] = {}   # ring slot -> contents
        self.live: dict[int, tuple] = {}        # vip id -> (key, ring slot, size) after flips
        self.reals: dict[int, tuple] = {}       # real id -> (address, mac, down)
        self.saves = 0

    def run(self, plan: Plan):
        for w in plan.writes:
            if w.op == "ring":
                self.slots[w.args[0]] = list(w.args[1])
            elif w.op == "flip":
                vs, n = w.args
                self.live[vs.vip_id] = (vs.key, 2 * vs.vip_id + vs.slot, n)
            elif w.op == "vip_del":
                del self.live[w.args[0].vip_id]
            elif w.op == "real":
                r = w.args[0]
                self.reals[r.real_id] = (r.address, r.mac, r.down)
            elif w.op == "free_real":
                del self.reals[w.args[0]]
            elif w.op == "save":
                self.saves += 1
        for f in plan.commit:
            f()
        return plan.result

    def live_ring(self, vip_id):
        _, slot, n = self.live[vip_id]
        return self.slots[slot][:n]


def reals(*last_octets, weight=100):
    return [(f"10.0.0.{i}", f"02:00:00:00:00:{i:02x}", weight) for i in last_octets]


def built(vs):
    return list(maglev.build_ring([maglev.Backend(r.real_id, r.address, r.weight)
                                   for r in vs.reals.values() if not r.down], vs.ring_size))


def vip(f: Fake, addr="10.9.0.1", port=80):
    return f.run(f.p.upsert_vip(addr, port, "tcp", ring_size=RING))


def test_ids_are_assigned_and_reused_fifo():
    f = Fake(max_vips=2, max_reals=5)
    a = vip(f, "10.9.0.1")
    b = vip(f, "10.9.0.2")
    assert (a.vip_id, b.vip_id) == (0, 1)
    f.run(f.p.set_reals(a.key, reals(1, 2), now=1.0))
    assert sorted(r.real_id for r in a.reals.values()) == [1, 2]
    f.run(f.p.delete_vip(a.key))
    assert list(f.state.free_vip_ids) == [0] and list(f.state.free_real_ids) == [3, 4, 1, 2]
    c = vip(f, "10.9.0.3")
    assert c.vip_id == 0  # the freed VIP id
    f.run(f.p.set_reals(c.key, reals(7), now=2.0))
    assert c.reals["10.0.0.7"].real_id == 3  # the longest-free real id, not the just-freed 1


def test_deleted_real_is_retired_then_freed_and_comes_back_with_its_id():
    f = Fake()
    vs = vip(f)
    f.run(f.p.set_reals(vs.key, reals(1, 2, 3), now=1.0))
    rid = vs.reals["10.0.0.2"].real_id
    plan = f.p.set_reals(vs.key, reals(1, 3), now=5.0)
    f.run(plan)
    assert "free_real" not in plan.ops() and rid in f.reals  # flows may still use it
    assert vs.retired["10.0.0.2"].real_id == rid and rid not in f.live_ring(vs.vip_id)
    f.run(f.p.set_reals(vs.key, reals(1, 2, 3), now=6.0))  # back: the same id, no new one
    assert vs.reals["10.0.0.2"].real_id == rid and not vs.retired
    f.run(f.p.set_reals(vs.key, reals(1, 3), now=10.0))
    assert f.run(f.p.collect_retired({rid}, started=20.0)) == 0   # a conn entry names it
    assert f.run(f.p.collect_retired(set(), started=9.0)) == 0    # retired after the walk began
    plan = f.p.collect_retired(set(), started=11.0)
    assert f.run(plan) == 1 and plan.ops() == ["free_real", "save"]
    assert rid not in f.reals and f.state.free_real_ids[-1] == rid


def test_slots_alternate_and_the_write_order_is_ring_save_reals_flip():
    f = Fake()
    vs = vip(f)
    assert vs.slot == 0 and f.live[0][1] == 0  # first publish: slot 0, nothing to protect
    plan = f.p.set_reals(vs.key, reals(1, 2), now=1.0)
    assert plan.ops() == ["zero_real_stats", "zero_real_stats", "ring", "save", "real", "real",
                          "flip"]
    assert plan.writes[2].args[0] == 1  # the idle slot
    f.run(plan)
    assert vs.slot == 1 and f.live[0][1] == 1
    plan = f.p.set_weight(vs.key, "10.0.0.1", 50)
    assert plan.ops() == ["ring", "save", "flip"] and plan.writes[0].args[0] == 0
    f.run(plan)
    assert vs.slot == 0 and f.live_ring(0) == built(vs)


def test_a_failed_write_leaves_the_slot_the_maps_name():
    f = Fake()
    vs = vip(f)
    f.run(f.p.set_reals(vs.key, reals(1, 2), now=1.0))
    live = vs.slot
    plan = f.p.set_weight(vs.key, "10.0.0.1", 10)
    assert vs.slot == live ^ 1  # what the save writes
    for fn in plan.abort:  # the flip failed
        fn()
    assert vs.slot == live and f.state.last_ring[vs.key] is not plan.writes[0].args[1]


def test_capacity_refusals_name_the_limit_and_change_nothing():
    f = Fake(max_vips=1, max_reals=3)
    vs = vip(f)
    with pytest.raises(TablesError, match=r"no free VIP slot \(max 1\)"):
        f.p.upsert_vip("10.9.0.2", 80, ring_size=RING)
    with pytest.raises(TablesError, match="ring_size 257 exceeds the compiled maximum 251"):
        f.p.upsert_vip("10.9.0.1", 80, ring_size=257)
    before = (dict(vs.reals), list(f.state.free_real_ids), vs.slot)
    with pytest.raises(TablesError, match=r"3 new reals need ids but only 2 are free "
                                          r"\(max_reals 2 in all\)"):
        f.p.set_reals(vs.key, reals(1, 2, 3), now=1.0)
    assert (dict(vs.reals), list(f.state.free_real_ids), vs.slot) == before
    with pytest.raises(TablesError, match="no VIP 10.9.9.9:80/tcp"):
        f.p.set_reals("10.9.9.9:80/tcp", [], now=1.0)
    with pytest.raises(TablesError, match="has no real 10.0.0.9"):
        f.p.set_weight(vs.key, "10.0.0.9", 1)
    with pytest.raises(TablesError, match=r"2 new VIPs but only 1 VIP slots free \(max 1\)"):
        f.p.apply([dict(address="10.9.0.5", port=80, ring_size=RING),
                   dict(address="10.9.0.6", port=80, ring_size=RING)], 1.0)
    with pytest.raises(TablesError, match="VIP 10.9.0.5: ring_size 65537 exceeds the compiled "
                                          "maximum 251"):
        f.p.apply([dict(address="10.9.0.5", port=80)], 1.0)
    assert list(f.state.vips) == [vs.key]


def test_apply_a_whole_config():
    f = Fake(max_vips=2, max_reals=5)  # real ids 1..4
    a = dict(address="10.9.0.1", port=80, ring_size=RING, reals=reals(1, 2))
    b = dict(address="10.9.0.2", port=53, proto="udp", ring_size=RING, reals=reals(3))
    for plan in f.p.apply([a, b], now=1.0):
        f.run(plan)
    assert sorted(f.state.vips) == ["10.9.0.1:80/tcp", "10.9.0.2:53/udp"]
    # a VIP replaced: the ids its deletion frees count for the new one, in the same change
    c = dict(address="10.9.0.3", port=80, ring_size=RING, reals=reals(4, 5, 6))
    with pytest.raises(TablesError, match=r"3 new reals need ids but only 2 are free"):  # b gone: 1+1
        f.p.apply([a, c], now=2.0)
    plans = f.p.apply([c, b], now=2.0)
    assert plans[0].ops()[0] == "vip_del"
    for plan in plans:
        f.run(plan)
    vs = f.state.vips["10.9.0.3:80/tcp"]
    assert vs.vip_id == 0 and set(f.live) == {0, 1} and f.live_ring(0) == built(vs)
    assert [r.real_id for r in vs.reals.values()] == [4, 1, 2]  # the free one, then 10.9.0.1's


def test_an_unchanged_vip_produces_no_writes():
    f = Fake()
    vs = vip(f)
    f.run(f.p.set_reals(vs.key, reals(1, 2), now=1.0))
    assert f.p.upsert_vip("10.9.0.1", 80, "tcp", ring_size=RING).writes == []
    assert f.p.set_down(vs.key, "10.0.0.1", False).writes == []  # already up
    # the same reals again: a ring flip (set_reals always publishes) but no real rewritten
    assert "real" not in f.p.set_reals(vs.key, reals(1, 2), now=2.0).ops()


def test_ring_memo_reuses_the_ring_of_two_changes_ago(monkeypatch):
    f = Fake()
    vs = vip(f)
    f.run(f.p.set_reals(vs.key, reals(1, 2, 3), now=1.0))
    first = f.live_ring(0)
    f.run(f.p.set_down(vs.key, "10.0.0.2", True))
    assert f.live_ring(0) == built(vs) != first
    calls = []
    real_build = maglev.build_ring
    monkeypatch.setattr(maglev, "build_ring", lambda *a: calls.append(a) or real_build(*a))
    f.run(f.p.set_down(vs.key, "10.0.0.2", False))  # the flap back
    assert calls == [] and f.live_ring(0) == first
    f.run(f.p.set_weight(vs.key, "10.0.0.1", 7))    # a new input: rebuilt
    assert len(calls) == 1 and f.live_ring(0) == built(vs)


def test_all_down_keep_serves_the_last_ring():
    f = Fake()
    vs = vip(f)
    f.run(f.p.set_reals(vs.key, reals(1, 2), now=1.0))
    ring = f.live_ring(0)
    f.run(f.p.set_down(vs.key, "10.0.0.1", True))
    one_left = f.live_ring(0)
    assert one_left != ring and set(one_left) == {vs.reals["10.0.0.2"].real_id}
    f.run(f.p.set_down(vs.key, "10.0.0.2", True))
    assert f.live_ring(0) == one_left  # not an empty (dropping) ring
    f.run(f.p.upsert_vip("10.9.0.1", 80, ring_size=RING, all_down="drop"))
    assert f.live_ring(0) == built(vs) and not any(f.live_ring(0))


def test_new_vip_writes_the_filter_before_the_address_and_delete_clears_both():
    f = Fake()
    plan = f.p.upsert_vip("10.9.0.1", 80, ring_size=RING)
    idx = M.vip_filter_index("10.9.0.1")
    assert plan.writes[:3] == [("zero_vip_stats", (0,)), ("filter", (idx, 1)),
                               ("addr_add", ("10.9.0.1",))]
    f.run(plan)
    vs = plan.result
    plan = f.p.delete_vip(vs.key)
    assert plan.writes == [("vip_del", (vs,)), ("addr_del", ("10.9.0.1",)), ("filter", (idx, 0)),
                           ("save", ())]


# ---------------------------------------------------------------- property
ADDRS = [f"10.0.0.{i}" for i in range(1, 9)]
VIPS = ["10.9.0.1", "10.9.0.2", "10.9.0.3"]
change = st.one_of(
    st.tuples(st.just("reals"), st.sampled_from(VIPS),
              st.lists(st.tuples(st.sampled_from(ADDRS), st.integers(0, 3)), max_size=5,
                       unique_by=lambda t: t[0])),
    st.tuples(st.just("delete"), st.sampled_from(VIPS), st.just(None)),
    st.tuples(st.just("down"), st.sampled_from(VIPS), st.sampled_from(ADDRS)),
    st.tuples(st.just("weight"), st.sampled_from(VIPS),
              st.tuples(st.sampled_from(ADDRS), st.integers(0, 3))),
    st.tuples(st.just("collect"), st.just(None), st.just(None)),
)


@settings(max_examples=80, deadline=None)
@given(st.lists(change, max_size=25))
def test_random_changes_keep_ids_unique_and_the_live_ring_right(changes):
    f = Fake(max_vips=3, max_reals=16)
    wanted: dict[str, set] = {}
    now = 0.0
    for op, addr, arg in changes:
        now += 1
        key = f"{addr}:80/tcp"
        try:
            if op == "reals":
                if key not in f.state.vips:
                    vip(f, addr)
                f.run(f.p.set_reals(key, [(a, "02:00:00:00:00:01", w) for a, w in arg], now))
                wanted[key] = {a for a, _ in arg}
            elif op == "delete" and key in f.state.vips:
                f.run(f.p.delete_vip(key))
                wanted.pop(key)
            elif op == "down" and key in f.state.vips and arg in f.state.vips[key].reals:
                f.run(f.p.set_down(key, arg, not f.state.vips[key].reals[arg].down))
            elif op == "weight" and key in f.state.vips and arg[0] in f.state.vips[key].reals:
                f.run(f.p.set_weight(key, *arg))
            elif op == "collect":
                f.run(f.p.collect_retired(set(), started=now + 1))
        except TablesError as e:
            assert "max_reals" in str(e)  # the only refusal these changes can meet
        ids = [r.real_id for v in f.state.vips.values()
               for r in [*v.reals.values(), *v.retired.values()]]
        assert len(ids) == len(set(ids)) and not set(ids) & set(f.state.free_real_ids)
        assert len(ids) + len(f.state.free_real_ids) == 15
        vids = [v.vip_id for v in f.state.vips.values()]
        assert sorted(vids + list(f.state.free_vip_ids)) == [0, 1, 2]
        assert set(f.live) == set(vids)
        for v in f.state.vips.values():
            assert set(v.reals) == wanted.get(v.key, set())
            assert f.live[v.vip_id][0] == v.key and f.live[v.vip_id][1] == 2 * v.vip_id + v.slot
            up = [r for r in v.reals.values() if not r.down and r.weight]
            if up or not any(r.down for r in v.reals.values()):
                assert f.live_ring(v.vip_id) == built(v)
            assert set(f.reals) >= set(r.real_id for r in [*v.reals.values(),
                                                           *v.retired.values()])


def test_check_fits_is_the_one_real_id_rule():
    # The planner refuses by it; the daemon's _plan asks it for a whole config change.
    from l4lb.dataplane.plan import check_fits
    f = Fake(max_vips=3, max_reals=6)  # real ids 1..5
    a, b = vip(f, "10.9.0.1"), vip(f, "10.9.0.2")
    f.run(f.p.set_reals(a.key, reals(1, 2), now=1.0))
    f.run(f.p.set_reals(b.key, reals(3), now=1.0))
    f.run(f.p.set_reals(a.key, reals(1), now=2.0))  # 10.0.0.2 retired: keeps its id
    vips, cap = f.state.vips, f.state.max_reals
    assert check_fits(vips, cap, []) == (0, 2)
    # a retired real coming back needs no new id; a new one does
    assert check_fits(vips, cap, [(a.key, ["10.0.0.1", "10.0.0.2", "10.0.0.7"])]) == (1, 2)
    # a deleted VIP frees its reals' ids for the same change; a new VIP needs all its own
    assert check_fits(vips, cap, [("10.9.0.3:80/tcp", ["10.0.0.8", "10.0.0.9"])],
                      gone=[b.key]) == (2, 3)
    assert f.p.check_fits([(a.key, ["10.0.0.5", "10.0.0.6", "10.0.0.7"])]) == (3, 2)
    with pytest.raises(TablesError, match="3 new reals need ids but only 2 are free"):
        f.p.set_reals(a.key, reals(1, 5, 6, 7), now=3.0)
