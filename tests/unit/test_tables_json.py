"""tables.json's text, made from per-real records kept between saves, is exactly what
json.dumps made of the whole state (the reader, _load_state, is unchanged)."""

import json

from l4lb.dataplane import maps as M
from l4lb.dataplane.loader import BuildOptions
from l4lb.dataplane.plan import Planner, TableState
from l4lb.dataplane.tables import STATE_SIZES, ServiceTables


def plain(t) -> str:
    return json.dumps({"layout": M.LAYOUT_VERSION,
                       "sizes": {k: getattr(t.opts, k) for k in STATE_SIZES},
                       "vips": [dict(v.__dict__, reals=[r.__dict__ for r in v.reals.values()],
                                     retired=[r.__dict__ for r in v.retired.values()])
                                for v in t.vips.values()]}, separators=(",", ":"))


def test_state_json_is_json_dumps_of_the_state_through_changes():
    t = ServiceTables.__new__(ServiceTables)  # the text only: no maps
    t.opts = BuildOptions(max_vips=4, max_reals=64, ring_max=251)
    state = TableState.empty(4, 64, 251)
    p = Planner(state)
    t.vips, t._real_json = state.vips, {}

    def run(plan):
        for f in plan.commit:
            f()

    assert t._state_json() == plain(t)  # nothing yet
    a = p.upsert_vip("10.9.0.1", 80, ring_size=251).result
    b = p.upsert_vip("fd00::1", 443, ring_size=251).result
    reals = [(f"10.0.0.{i}", f"02:00:00:00:00:{i:02x}", 10 + i) for i in range(1, 30)]
    run(p.set_reals(a.key, reals, 1.0))
    run(p.set_reals(b.key, [("fd00::10", "02:00:00:00:01:01", 5)], 1.0))
    assert t._state_json() == plain(t)
    run(p.set_weight(a.key, "10.0.0.3", 77))          # one record changes
    run(p.set_down(a.key, "10.0.0.4", True))
    run(p.set_reals(a.key, reals[5:], 2.0))          # five retired
    assert t._state_json() == plain(t)
    assert json.loads(t._state_json())["vips"][0]["retired"][0]["address"] == "10.0.0.1"
    run(p.delete_vip(b.key))
    assert t._state_json() == plain(t)
