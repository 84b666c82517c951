"""Conn-table walks on real BPF maps: bounded slices, early stop, filters, off the loop.

One program with a 2^20-entry conn table; the million-entry tests fill it once.
"""

import asyncio
import os
import shutil
import time

import numpy as np
import pytest

from l4lb.dataplane import bpfsys, loader, tables
from l4lb.dataplane import maps as M
from l4lb.dataplane.tables import FLOW_KEY_DTYPE, WALK_BATCH

OPTS = loader.BuildOptions(max_vips=16, max_reals=256, ring_max=4099, conn_table_size=1 << 20)
MILLION = 1_000_000
VIPS4 = ["10.99.0.100", "10.99.0.101", "10.99.0.102", "10.99.0.103"]
REALS = [("10.99.0.31", "02:99:00:00:1e:1f"), ("10.99.0.32", "02:99:00:00:1e:20"),
         ("10.99.0.33", "02:99:00:00:1e:21")]


@pytest.fixture(scope="module")
def big():
    p = loader.compile_balancer(OPTS)
    yield p
    p.close()


@pytest.fixture
def t(big):
    st = tables.ServiceTables(big, OPTS)
    tables._empty_map(st.conns)
    yield st
    for key in list(st.vips):
        st.delete_vip(key)


def records(n, start=0, vips=VIPS4, dport=80, proto=6, real_ids=(1, 2, 3, 4, 5, 6, 7)):
    """n packed FlowKey/ConnVal records: clients 10.<i>, the VIPs and real ids in turn."""
    i = np.arange(start, start + n, dtype=np.uint32)
    k = np.zeros(n, dtype=FLOW_KEY_DTYPE)
    src = np.zeros((n, 16), dtype=np.uint8)
    src[:, 0], src[:, 1], src[:, 2], src[:, 3] = 10, (i >> 16) & 255, (i >> 8) & 255, i & 255
    k["src"] = src.view("V16").ravel()
    dst = np.array([M.addr16(v)[0] for v in vips], dtype="V16")
    raw = dst[i % len(vips)].tobytes()
    both = np.frombuffer(raw, dtype="<u8").reshape(n, 2)
    k["dst_hi"], k["dst_lo"] = both[:, 0], both[:, 1]
    k["sport"], k["dport"], k["proto"] = 1024 + i % 60000, dport, proto
    k["family"] = M.addr16(vips[0])[1]
    v = np.zeros(n, dtype=tables.CONN_VAL_DTYPE)
    v["real_id"] = np.array(real_ids, dtype=np.uint32)[i % len(real_ids)]
    return k.tobytes(), v.tobytes()


def fill(st, n, start=0, **kw):
    step = 1 << 16
    for lo in range(0, n, step):
        st.install_conns(*records(min(step, n - lo), start=start + lo, **kw))


def test_entries_decode_like_bcc_and_filter_by_vip(t):
    fill(t, 3000)
    fill(t, 1000, vips=["fd99::100"], dport=443, proto=17, real_ids=(9,))
    fill(t, 500, start=5000, vips=["fd99::100"], dport=8443, proto=17, real_ids=(9,))
    slow = set()
    for k, v in t.conns.items():
        src, sport, dst, dport, proto = M.flow_tuple(k)
        slow.add((str(src), sport, str(dst), dport, M.PROTO_NAME[proto], v.real_id))
    assert set(t.conn_entries()) == slow and len(t.conn_entries()) == 4500
    got = t.conn_entries(want=("10.99.0.101", 80, "tcp"))
    assert len(got) == 750 and {g[2:5] for g in got} == {("10.99.0.101", 80, "tcp")}
    assert len(t.conn_entries(want=("fd99::100", 0, "udp"))) == 1500  # port 0: every port
    assert {g[3] for g in t.conn_entries(want=("fd99::100", 8443, "udp"))} == {8443}
    assert t.conn_entries(want=("fd99::100", 443, "tcp")) == []
    assert len(t.conn_entries(limit=7, want=("10.99.0.103", 0, 6))) == 7
    assert t.conn_entries(limit=0) == []


@pytest.mark.parametrize("kw, msg", [
    ({"limit": -1}, "limit must be a whole number >= 0"),
    ({"limit": "5"}, "limit must be a whole number >= 0"),
    ({"want": ("nope", 80, "tcp")}, "want address"),
    ({"want": ("10.99.0.100", 70000, "tcp")}, "want port must be 0..65535"),
    ({"want": ("10.99.0.100", 80, "icmp")}, "want protocol must be one of tcp, udp"),
    ({"want": "10.99.0.100"}, "want must be (VIP address, port, protocol)"),
])
def test_bad_walk_arguments_are_clear_errors(t, kw, msg):
    with pytest.raises(ValueError) as e:
        t.conn_entries(**kw)
    assert msg in str(e.value)


def test_referenced_real_ids_match_a_slow_walk(t):
    fill(t, 5000, real_ids=(3, 5, 11, 200))
    fill(t, 20, start=9000, real_ids=(42,))
    assert t.referenced_real_ids() == {v.real_id for _, v in t.conns.items()} == {3, 5, 11, 42, 200}
    assert t.conn_count() == 5020


def test_collect_retired_with_a_walk_from_a_thread(t):
    vs = t.upsert_vip("10.99.0.100", 80, "tcp", ring_size=4099)
    t.set_reals(vs.key, [(a, m, 100) for a, m in REALS])
    ids = {a: r.real_id for a, r in vs.reals.items()}
    t.install_conn("10.99.1.1", 5000, "10.99.0.100", 80, "tcp", ids["10.99.0.31"], vs.vip_id, 1)
    t.set_reals(vs.key, [REALS[2] + (100,)])  # .31 (one flow) and .32 (none) retired
    walk = t.referenced_real_ids()
    assert walk.started > 0 and ids["10.99.0.31"] in walk
    assert t.collect_retired(walk) == 1 and set(vs.retired) == {"10.99.0.31"}
    # A real retired after the walk began waits for the next walk: the walk may have
    # passed flows that were still being created.
    walk = t.referenced_real_ids()
    t.set_reals(vs.key, [])
    assert t.collect_retired(walk) == 0 and "10.99.0.33" in vs.retired
    assert t.collect_retired() == 1  # old callers: it walks itself
    assert set(vs.retired) == {"10.99.0.31"}


def test_live_ring_reads_the_maps(t):
    from l4lb import maglev
    vs = t.upsert_vip("10.99.0.100", 80, "tcp", ring_size=4099)
    t.set_reals(vs.key, [(a, m, 100 * (i + 1)) for i, (a, m) in enumerate(REALS)])
    want = maglev.build_ring([maglev.Backend(r.real_id, r.address, r.weight)
                              for r in vs.reals.values()], 4099)
    assert t.live_ring(vs.key) == list(want)


def test_syscall_number_per_architecture():
    assert bpfsys.sys_bpf_number("x86_64") == 321 and bpfsys.sys_bpf_number("aarch64") == 280
    with pytest.raises(OSError) as e:
        bpfsys.sys_bpf_number("pdp11")
    assert "unknown for architecture 'pdp11'" in str(e.value)


# ------------------------------------------------------------- a million entries
@pytest.fixture(scope="module")
def million(big):
    st = tables.ServiceTables(big, OPTS)
    tables._empty_map(st.conns)
    fill(st, MILLION)
    n = st.conn_count()
    assert n >= 0.99 * MILLION  # an LRU table of 2^20 may drop a few near full
    yield st, n
    tables._empty_map(st.conns)


def test_limit_1_of_a_million_reads_one_slice(million):
    st, n = million
    stats = {}
    t0 = time.perf_counter()
    got = st.conn_entries(limit=1, stats=stats)
    dt = time.perf_counter() - t0
    assert len(got) == 1 and stats == {"slices": 1, "entries": stats["entries"]}
    assert stats["entries"] <= WALK_BATCH
    print(f"\nconn_entries(limit=1) on {n} entries: {dt * 1e3:.2f} ms, 1 slice")
    stats = {}
    got = st.conn_entries(limit=20, want=("10.99.0.103", 80, "tcp"), stats=stats)
    assert len(got) == 20 and {g[2] for g in got} == {"10.99.0.103"}
    assert stats["slices"] == 1
    stats = {}  # a VIP with no flows: the whole table, still slice by slice
    assert st.conn_entries(limit=1, want=("10.99.0.104", 80, "tcp"), stats=stats) == []
    assert stats["entries"] == n and stats["slices"] >= n // WALK_BATCH


def test_full_walk_in_a_thread_leaves_the_loop_running(million):
    st, n = million

    async def go():
        loop = asyncio.get_running_loop()
        lags, done = [], asyncio.Event()

        async def ticker():  # what VRRP needs: to wake up on time
            while not done.is_set():
                t0 = loop.time()
                await asyncio.sleep(0.005)
                lags.append(loop.time() - t0 - 0.005)

        tick = asyncio.create_task(ticker())
        stats = {}
        t0 = time.perf_counter()
        rows = await asyncio.to_thread(st.conn_entries, None, None, WALK_BATCH, stats)
        dt = time.perf_counter() - t0
        done.set()
        await tick
        return rows, stats, dt, lags

    rows, stats, dt, lags = asyncio.run(go())
    assert len(rows) == n and stats["slices"] >= n // WALK_BATCH
    print(f"\nfull walk of {n} entries in a thread: {dt:.2f} s ({n / dt:,.0f} entries/s), "
          f"{stats['slices']} slices; loop wake-ups {len(lags)}, max lag {max(lags) * 1e3:.1f} ms")
    # Walked on the loop this would be one stall of the whole walk (about a second).
    assert max(lags) < 0.5 and len(lags) > 10


def test_pinned_map_opened_by_path():
    opts = loader.BuildOptions(max_vips=4, max_reals=16, ring_max=7, conn_table_size=256,
                               pin_dir=f"/sys/fs/bpf/l4lbtest-tables-{os.getpid()}/obj/v1")
    loader.ensure_bpffs()
    p = loader.compile_balancer(opts)
    try:
        st = tables.ServiceTables(p, opts)
        st.install_conns(*records(10))
        fd = bpfsys.obj_get(f"{opts.pin_dir}/conns")
        try:
            assert sum(n for _, _, n in bpfsys.lookup_batches(fd, 40, 16, 4)) == 10
        finally:
            os.close(fd)
        with pytest.raises(OSError) as e:
            bpfsys.obj_get(f"{opts.pin_dir}/nothing")
        assert "BPF_OBJ_GET" in str(e.value) and "No such file" in str(e.value)
    finally:
        p.close()
        loader.remove_pins(opts.pin_dir)
        shutil.rmtree(f"/sys/fs/bpf/l4lbtest-tables-{os.getpid()}", ignore_errors=True)
