"""Crash windows of the service tables on pinned maps: a control plane killed between
saving tables.json and flipping a ring slot (either order), a flip cut in half, and
restarts whose tables.json is missing or does not match the pins.

A "restart" builds a new ServiceTables over the same pinned maps (what the next
`l4lb start` reopens); one test recompiles to reopen the pins for real.
"""

import json
import logging
import os
import shutil

import pytest

from l4lb import maglev
from l4lb.dataplane import bpfsys, loader, tables
from l4lb.dataplane import maps as M

PREFIX = "/sys/fs/bpf/l4lbtest-tables-"
VIP = "10.99.0.100"
REALS = [("10.99.0.31", "02:99:00:00:1e:1f"), ("10.99.0.32", "02:99:00:00:1e:20"),
         ("10.99.0.33", "02:99:00:00:1e:21")]
RING = 4099


class Crash(Exception):
    """The process dies here."""


def _remove_stale_pins():
    """Pin dirs of earlier runs of this module whose process is gone."""
    for d in os.listdir("/sys/fs/bpf"):
        path = "/sys/fs/bpf/" + d
        if path.startswith(PREFIX) and not os.path.exists(f"/proc/{path[len(PREFIX):]}"):
            shutil.rmtree(path, ignore_errors=True)


def _opts(tag: str) -> loader.BuildOptions:
    return loader.BuildOptions(max_vips=8, max_reals=64, ring_max=RING, conn_table_size=4096,
                               pin_dir=f"{PREFIX}{os.getpid()}/{tag}/v{M.LAYOUT_VERSION}")


@pytest.fixture(scope="module")
def pinned():
    loader.ensure_bpffs()
    _remove_stale_pins()
    opts = _opts("a")
    prog = loader.compile_balancer(opts)
    yield prog, opts
    prog.close()
    shutil.rmtree(f"{PREFIX}{os.getpid()}", ignore_errors=True)


@pytest.fixture
def state(pinned, tmp_path):
    prog, opts = pinned
    for name in os.listdir(opts.pin_dir):  # every test starts from empty maps
        tables._empty_map(prog.map(name))
    return tmp_path / "tables.json"


def setup_vip(t):
    """A VIP with three reals, published twice (both slots used), and a flow per real."""
    vs = t.upsert_vip(VIP, 80, "tcp", ring_size=RING)
    t.set_reals(vs.key, [(a, m, 100) for a, m in REALS])
    t.set_weight(vs.key, REALS[0][0], 50)
    for i, r in enumerate(vs.reals.values()):
        t.install_conn(f"10.99.1.{i + 1}", 5000, VIP, 80, "tcp", r.real_id, vs.vip_id, 1)
    return vs


def live_slot(t, vs) -> int:
    e = t._vip_by_id[tables.ct.c_uint32(vs.vip_id)]
    meta = t._vips_map[M.vip_key(VIP, 80, "tcp")]
    assert bytes(e.meta) == bytes(meta)  # both maps name the same ring
    return e.meta.ring_slot - 2 * vs.vip_id


def ids(vs) -> dict:
    return {a: r.real_id for a, r in [*vs.reals.items(), *vs.retired.items()]}


def ring_of(vs) -> list[int]:
    return list(maglev.build_ring([maglev.Backend(r.real_id, r.address, r.weight)
                                   for r in vs.reals.values() if not r.down], vs.ring_size))


def restart(pinned, state) -> tables.ServiceTables:
    prog, opts = pinned
    return tables.ServiceTables(prog, opts, state_file=str(state))


def test_file_names_the_new_slot_and_ids_before_the_maps_use_them(pinned, state):
    t = restart(pinned, state)
    vs = setup_vip(t)
    seen = []
    write_real, flip = t._write_real, t._flip

    def on_write_real(r):
        saved = json.loads(state.read_text())["vips"][0]["reals"]
        seen.append(("real", r.real_id in {x["real_id"] for x in saved}))
        write_real(r)

    def on_flip(v, n):
        seen.append(("slot", json.loads(state.read_text())["vips"][0]["slot"] == v.slot
                     != live_slot(t, v)))
        flip(v, n)

    t._write_real, t._flip = on_write_real, on_flip
    t.set_reals(vs.key, [(a, m, 100) for a, m in REALS] + [("10.99.0.34", "02:99:00:00:1e:22", 100)])
    assert seen == [("real", True), ("slot", True)]


def test_crash_between_save_and_flip(pinned, state):
    t1 = restart(pinned, state)
    vs1 = setup_vip(t1)
    live, ring = live_slot(t1, vs1), t1.live_ring(vs1.key)
    t1._flip = lambda *a: (_ for _ in ()).throw(Crash())
    with pytest.raises(Crash):
        t1.set_weight(vs1.key, REALS[1][0], 10)
    assert json.loads(state.read_text())["vips"][0]["slot"] == live ^ 1  # saved, not flipped
    assert live_slot(t1, vs1) == live and t1.live_ring(vs1.key) == ring

    t2 = restart(pinned, state)
    vs2 = t2.vips[vs1.key]
    assert t2.clean_start_reason is None and ids(vs2) == ids(vs1) and t2.conn_count() == 3
    assert vs2.slot == live  # from the maps, not from the file
    written = []
    write_slot = t2._write_slot
    t2._write_slot = lambda idx, r: (written.append(idx), write_slot(idx, r))
    t2.set_weight(vs2.key, REALS[1][0], 10)
    assert written == [2 * vs2.vip_id + (live ^ 1)]  # the idle slot, never the live one
    assert live_slot(t2, vs2) == live ^ 1 and t2.live_ring(vs2.key) == ring_of(vs2)


def test_crash_after_flip_before_save(pinned, state):
    """The old order (or a crash between the flip and a later save): the file names the
    slot that is now idle. The maps say which one is live."""
    t1 = restart(pinned, state)
    vs1 = setup_vip(t1)
    before = state.read_bytes()
    t1.set_weight(vs1.key, REALS[1][0], 10)
    live = live_slot(t1, vs1)
    state.write_bytes(before)
    assert json.loads(before)["vips"][0]["slot"] == live ^ 1

    t2 = restart(pinned, state)
    vs2 = t2.vips[vs1.key]
    assert t2.clean_start_reason is None and vs2.slot == live and ids(vs2) == ids(vs1)
    written = []
    write_slot = t2._write_slot
    t2._write_slot = lambda idx, r: (written.append(idx), write_slot(idx, r))
    t2.set_weight(vs2.key, REALS[2][0], 30)
    assert written == [2 * vs2.vip_id + (live ^ 1)]
    assert t2.live_ring(vs2.key) == ring_of(vs2) and t2.conn_count() == 3


def test_a_flip_cut_in_half_is_completed(pinned, state, caplog):
    t1 = restart(pinned, state)
    vs1 = setup_vip(t1)
    live = live_slot(t1, vs1)
    # vip_by_id already names the other slot (it holds a whole ring), the vips map not yet.
    e = t1._vip_by_id[tables.ct.c_uint32(vs1.vip_id)]
    e.meta.ring_slot = 2 * vs1.vip_id + (live ^ 1)
    t1._vip_by_id[tables.ct.c_uint32(vs1.vip_id)] = e
    with caplog.at_level(logging.INFO, "l4lb.tables"):
        t2 = restart(pinned, state)
    assert "completing a ring flip" in caplog.text
    assert live_slot(t2, t2.vips[vs1.key]) == live ^ 1 == t2.vips[vs1.key].slot


def test_all_reals_down_keeps_the_last_ring_across_a_restart(pinned, state):
    t1 = restart(pinned, state)
    vs1 = setup_vip(t1)
    for a, _ in REALS:
        t1.set_down(vs1.key, a, True)
    ring = t1.live_ring(vs1.key)  # all_down = "keep": the ring of the last real up
    assert set(ring) == {vs1.reals[REALS[2][0]].real_id}
    t2 = restart(pinned, state)
    t2.set_weight(vs1.key, REALS[0][0], 70)  # a new ring is published: still all down
    assert t2.live_ring(vs1.key) == ring


def test_first_start_is_quiet(pinned, state, caplog):
    with caplog.at_level(logging.INFO, "l4lb.tables"):
        t = restart(pinned, state)
    assert t.clean_start_reason is None and not t.vips and caplog.text == ""


def _swap_real_ids(data):
    r = data["vips"][0]["reals"]
    r[0]["real_id"], r[1]["real_id"] = r[1]["real_id"], r[0]["real_id"]


def _other_vip_id(data):
    data["vips"][0]["vip_id"] = 5


@pytest.mark.parametrize("damage, why", [
    (None, "tables.json is missing"),
    (_swap_real_ids, "does not match the maps: reals["),
    (_other_vip_id, "does not match the maps: vip_by_id[0]"),
    (lambda d: d.update(layout=M.LAYOUT_VERSION - 1), "is for layout"),
    (lambda d: d["sizes"].update(conn_table_size=1 << 20), "is for sizes"),
    (lambda d: d["vips"][0].update(bogus=1), "is unreadable (TypeError"),
    ("{not json", "is unreadable (JSONDecodeError"),
    (lambda d: d["vips"][0].update(address="10.99.0.999"), "is unreadable (ValueError"),
    (lambda d: d["vips"][0].update(port=70000), "is unreadable (OverflowError"),
    (lambda d: d["vips"][0]["reals"][0].update(real_id="1"), "is unreadable (TypeError"),
])
def test_pins_that_tables_json_does_not_describe_start_clean(pinned, state, caplog, damage, why):
    t1 = restart(pinned, state)
    setup_vip(t1)
    if damage is None:
        state.unlink()
    elif isinstance(damage, str):
        state.write_text(damage)
    else:
        data = json.loads(state.read_text())
        damage(data)
        state.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, "l4lb.tables"):
        t2 = restart(pinned, state)
    assert why in t2.clean_start_reason
    assert "starting with empty maps" in caplog.text and why in caplog.text
    assert not t2.vips and t2.conn_count() == 0 and not t2._vips_map.items()
    assert not any(t2._vip_by_id[tables.ct.c_uint32(i)].key.family for i in range(8))
    assert json.loads(state.read_text())["vips"] == []  # saved clean at once
    # The ids start over, and the data plane works with them.
    vs = setup_vip(t2)
    assert ids(vs) == {a: i + 1 for i, (a, _) in enumerate(REALS)}
    assert t2.live_ring(vs.key) == ring_of(vs)


def test_recompiled_program_reopens_pins_and_keeps_flows(pinned, state):
    prog, opts = pinned
    t1 = restart(pinned, state)
    vs1 = setup_vip(t1)
    again = loader.compile_balancer(opts)  # `l4lb start` again: the pins are reopened
    try:
        t2 = tables.ServiceTables(again, opts, state_file=str(state))
        assert t2.clean_start_reason is None and t2.conn_count() == 3
        assert ids(t2.vips[vs1.key]) == ids(vs1) and t2.live_ring(vs1.key) == ring_of(vs1)
        state.unlink()
        t3 = tables.ServiceTables(again, opts, state_file=str(state))
        assert "tables.json is missing" in t3.clean_start_reason
        assert t3.conn_count() == 0 and t1.conn_count() == 0  # one table, seen by both
    finally:
        again.close()


def test_a_clean_start_empties_every_pinned_map(pinned, state):
    """Whatever maps the program pins (new ones too): hashes emptied, arrays zeroed;
    only the ring slots are left, as nothing reads a slot before it is rewritten."""
    prog, opts = pinned
    t1 = restart(pinned, state)
    setup_vip(t1)
    names = sorted(os.listdir(opts.pin_dir))
    for name in names:  # one non-zero record in every map
        m = prog.map(name)
        ksize, vsize = tables.ct.sizeof(m.Key), tables.ct.sizeof(m.Leaf)
        idx = min(1, m.max_entries - 1)  # arrays: an index in range
        key = idx.to_bytes(4, "little") + bytes(ksize - 4) if ksize >= 4 else b"\1" * ksize
        bpfsys.update_batch(m.map_fd, key, b"\7" * vsize, 1)
    state.unlink()
    t2 = restart(pinned, state)
    assert "tables.json is missing" in t2.clean_start_reason
    for name in names:
        m = prog.map(name)
        ksize, vsize = tables.ct.sizeof(m.Key), tables.ct.sizeof(m.Leaf)
        left = [v for _, vals, n in bpfsys.lookup_batches(m.map_fd, ksize, vsize, 4096)
                for v in (vals,) if any(vals)]
        if name == "rings":
            assert left, "the ring slots were zeroed after all"
        elif m.ttype in (1, 5, 9, 10):  # hash maps: no entry left
            assert sum(n for *_, n in bpfsys.lookup_batches(m.map_fd, ksize, vsize, 4096)) == 0, name
        else:
            assert not left, f"{name} still holds data"
