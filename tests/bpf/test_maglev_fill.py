"""The kernel's Maglev fill (bpf/maglev_fill.c) makes numpy's tables, byte for byte.

Both nodes of a pair, and a node before and after an upgrade, must build the
same ring from the same config: a fill that differs in one slot moves flows at
failover. So every case here is compared with numpy's fill (itself compared with
the pure-Python reference in tests/unit/test_maglev.py), and the golden digests
of tests/unit/test_maglev.py are checked with the kernel filling.
"""

from __future__ import annotations

import hashlib
import random
import sys
import threading

import numpy as np
import pytest

from l4lb import maglev
from l4lb.dataplane import fill, loader
from l4lb.maglev import Backend

M = 65537


@pytest.fixture(scope="module")
def kf():
    engine = fill.KernelFill(M, 4096)
    yield engine
    engine.close()


@pytest.fixture
def engine_on(kf, monkeypatch):
    """maglev fills through the kernel, with no fill remembered from other tests."""
    monkeypatch.setattr(maglev, "_ENGINE", kf)
    maglev._PREPARED.clear()
    yield kf
    maglev._PREPARED.clear()


def inputs(backends, size):
    live = [(b.key, b.id, b.weight) for b in backends if b.weight]
    live.sort()
    return [maglev._permutation(k, size) for k, _, _ in live], [w for _, _, w in live]


def both(kf, backends, size):
    perms, weights = inputs(backends, size)
    return kf(perms, weights, size), maglev._fill_numpy(perms, weights, size)


def reals(n, weights=(1,), net="10.7"):
    return [Backend(i + 1, f"{net}.{i // 250}.{i % 250 + 1}", weights[i % len(weights)])
            for i in range(n)]


@pytest.mark.parametrize("n, weights", [
    (1, (1,)), (2, (1,)), (3, (5, 1)), (100, (1,)), (100, (100, 50, 1, 7, 65535, 0, 300)),
    (1000, (100,)), (1000, (1, 2, 3)), (4095, (1,)),
])
def test_same_table_as_numpy_at_full_size(kf, n, weights):
    got, want = both(kf, reals(n, weights), M)
    assert got is not None and got.dtype == np.int32
    assert np.array_equal(got, want)


@pytest.mark.parametrize("seed", range(20))
def test_same_table_as_numpy_on_random_configs(kf, seed):
    rng = random.Random(seed)
    size = rng.choice([3, 7, 13, 101, 1009, 4099, 65521, 65537])
    n = rng.randint(1, min(300, 4 * size))
    backends = [Backend(i + 1, f"fd00:{seed}::{i:x}", rng.choice([0, 1, 1, 2, 10, 65535]))
                for i in range(n)]
    if not any(b.weight for b in backends):
        backends[0] = backends[0]._replace(weight=1)
    got, want = both(kf, backends, size)
    assert np.array_equal(got, want)


def test_more_reals_than_slots(kf):
    # Reals beyond the ring's size get no slot; the kernel must agree on which.
    got, want = both(kf, reals(40), 13)
    assert np.array_equal(got, want)


def test_priorities_of_the_ranked_fallback(kf, monkeypatch):
    # Huge priorities take _turn_order_ranked's path; the engine gets its (turns,
    # keyn, row) as well.
    monkeypatch.setattr(maglev, "_PRIO_LIMIT", 1 << 20)
    got, want = both(kf, reals(200, (1, 3, 65535)), 4099)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("kind, expected", [
    ("equal", "f9d5bf37bc8d1d81e801fa4e2291a25b57bd5b1ac00c33a5a3affe52c9937625"),
    ("weighted", "257f176b0d1074222f1364c803d2a627972671847fc697f5a0303ebdfd6df58b"),
])
def test_golden_rings_with_the_kernel_filling(engine_on, kind, expected):
    # tests/unit/test_maglev.py's pinned digests, built through build_ring.
    weights = [100] if kind == "equal" else [100, 50, 1, 7, 65535, 0, 300]
    backends = [Backend(i + 1, f"10.98.{i // 250}.{i % 250 + 1}", weights[i % len(weights)])
                for i in range(1000)]
    steps = engine_on.last_steps
    ring = maglev.build_ring(backends, M)
    assert engine_on.last_steps != steps  # the kernel did fill it
    if sys.byteorder == "big":
        ring.byteswap()
    assert hashlib.sha256(ring.tobytes()).hexdigest() == expected


def test_rings_that_do_not_fit_are_left_to_numpy(kf, engine_on):
    assert kf(*inputs(reals(10), 131101), 131101) is None  # > FILL_SLOTS
    ring = maglev.build_ring(reals(10), 131101)
    maglev.set_fill_engine(None)
    maglev._PREPARED.clear()
    assert ring == maglev.build_ring(reals(10), 131101)


def test_a_fill_that_does_not_add_up_is_refused(kf, engine_on, monkeypatch, caplog):
    # A kernel fill gone wrong (here: one slot moved to another real after the
    # run) is caught by the shares check; numpy fills and the ring is right.
    backends = reals(50)
    want = maglev.build_ring(backends, 1009)
    maglev._PREPARED.clear()
    real_run = kf._run

    def run_then_corrupt(size):
        done = real_run(size)
        kf._owner[0] = (kf._owner[0] + 1) % 50
        return done

    monkeypatch.setattr(kf, "_run", run_then_corrupt)
    assert kf(*inputs(backends, 1009), 1009) is None
    assert "does not match its turns" in caplog.text
    assert maglev.build_ring(backends, 1009) == want


def test_inconsistent_inputs_stop_the_program(kf, caplog):
    # More turns than slots: the walk cannot find them; the program must stop
    # with an error (bounded), never loop or write out of bounds.
    perms, weights = inputs(reals(5), 101)
    turns, keyn, row = maglev._turn_order_numpy(weights, 101)
    turns = turns * 3
    with kf._lock:
        kf._load(perms, turns, np.concatenate([keyn] * 3), row, 101)
        assert not kf._run(101)
    assert "stopped" in caplog.text
    assert kf(perms, weights, 101) is not None  # and it fills again afterwards


def test_a_refused_test_run_leaves_the_ring_to_numpy(kf, engine_on, monkeypatch, caplog):
    def refuse(*a, **kw):
        raise OSError(1, "BPF_PROG_TEST_RUN failed: Operation not permitted")

    monkeypatch.setattr(fill, "test_run", refuse)
    backends = reals(30)
    assert kf(*inputs(backends, 1009), 1009) is None
    assert "numpy fills instead" in caplog.text
    ring = maglev.build_ring(backends, 1009)
    maglev.set_fill_engine(None)
    maglev._PREPARED.clear()
    assert ring == maglev.build_ring(backends, 1009)


def test_concurrent_fills_do_not_mix(kf):
    # The daemon fills in worker threads: one fill state, so the engine serialises.
    cases = [(reals(300, (1, 2), net=f"10.{i}"), 4099) for i in range(6)]
    want = [maglev._fill_numpy(*inputs(b, s), s) for b, s in cases]
    got = [None] * len(cases)

    def run(i):
        for _ in range(3):
            got[i] = kf(*inputs(*cases[i]), cases[i][1])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))


def test_a_closed_engine_leaves_rings_to_numpy():
    engine = fill.KernelFill(4099, 64)
    perms, weights = inputs(reals(20), 4099)
    assert np.array_equal(engine(perms, weights, 4099), maglev._fill_numpy(perms, weights, 4099))
    engine.close()
    assert engine(perms, weights, 4099) is None


def test_a_ring_size_too_big_for_one_map_value_is_refused():
    with pytest.raises(loader.DataplaneError, match="numpy fills these rings"):
        fill.KernelFill(1 << 20, 4096)


def test_a_layout_out_of_step_with_the_program_does_not_load(monkeypatch):
    # The C side asserts every offset the mirror passes: a mirror that drifts
    # from struct fill fails to compile instead of filling garbage.
    real = fill.Layout.cflags
    monkeypatch.setattr(fill.Layout, "cflags", lambda self: [
        f.replace(f"-DFILL_OWNER_AT={self.owner}", f"-DFILL_OWNER_AT={self.owner + 8}")
        for f in real(self)])
    with pytest.raises(loader.DataplaneError, match="maglev_fill.c"):
        fill.KernelFill(M, 4096)
