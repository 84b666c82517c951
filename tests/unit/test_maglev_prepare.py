"""maglev.prepare: a ring filled ahead (in a thread) and used by the build_ring after
it. The fill is keyed by ring size, real keys and weights, never ids; a change of any
of those is a new fill; what build_ring returns is what it builds without one."""

from __future__ import annotations

import threading

import pytest

from l4lb import maglev
from l4lb.maglev import Backend, build_ring, prepare

M = 4099


def reals(n, weight=10, net="10.1"):
    return [Backend(i + 1, f"{net}.0.{i}", weight + i % 3) for i in range(n)]


@pytest.fixture
def fills(monkeypatch):
    """Fresh prepared fills, and every fill computed: (thread name, keys, size)."""
    monkeypatch.setattr(maglev, "_PREPARED", maglev._Prepared())
    made = []
    real = maglev._fill

    def counting(live, size):
        made.append((threading.current_thread().name, tuple(k for k, _, _ in live), size))
        return real(live, size)
    monkeypatch.setattr(maglev, "_fill", counting)
    return made


def fresh(backends, size=M):
    """build_ring with nothing prepared."""
    saved = maglev._PREPARED
    maglev._PREPARED = maglev._Prepared()
    try:
        return build_ring(backends, size)
    finally:
        maglev._PREPARED = saved


def pairs(backends):
    return [(b.key, b.weight) for b in backends]


def test_a_prepared_fill_is_used_whatever_the_ids(fills):
    bs = reals(30)
    t = threading.Thread(target=prepare, args=(pairs(bs), M), name="filler")
    t.start()
    t.join()
    assert [name for name, _, _ in fills] == ["filler"]
    renumbered = [Backend(b.id + 1000, b.key, b.weight) for b in reversed(bs)]
    for backends in (bs, renumbered):
        assert build_ring(backends, M) == fresh(backends)
    assert len(fills) == 1 + 2  # the two fresh builds; none for the prepared ones
    prepare(pairs(bs), M)  # already there: not filled again
    assert len(fills) == 3


@pytest.mark.parametrize("change", ["size", "key", "weight", "drained", "one more"])
def test_anything_a_fill_depends_on_misses_the_prepared_one(fills, change):
    bs = reals(20)
    prepare(pairs(bs), M)
    size = M
    other = list(bs)
    if change == "size":
        size = 4093
    elif change == "key":
        other[5] = Backend(other[5].id, "10.1.9.9", other[5].weight)
    elif change == "weight":
        other[5] = Backend(other[5].id, other[5].key, other[5].weight + 1)
    elif change == "drained":
        other[5] = Backend(other[5].id, other[5].key, 0)
    else:
        other.append(Backend(99, "10.1.9.9", 10))
    before = len(fills)
    assert build_ring(other, size) == fresh(other, size)
    assert len(fills) == before + 2  # built for real, not taken from the prepared fill


def test_weight_zero_reals_do_not_matter_to_the_fill(fills):
    bs = reals(10)
    prepare(pairs(bs) + [("10.1.9.9", 0)], M)
    before = len(fills)
    assert build_ring(bs + [Backend(77, "10.1.8.8", 0)], M) == fresh(bs)
    assert len(fills) == before + 1  # only fresh()'s


def test_numpy_and_python_fills_are_kept_apart(fills, monkeypatch):
    bs = reals(12)
    prepare(pairs(bs), 1009)
    monkeypatch.setattr(maglev, "np", None)  # a prepared numpy fill must not answer
    before = len(fills)
    assert build_ring(bs, 1009) == fresh(bs, 1009)
    assert len(fills) == before + 2


def test_prepared_fills_are_bounded(fills, monkeypatch):
    monkeypatch.setattr(maglev, "_PREPARED", maglev._Prepared(limit=3 * M, hard=6 * M))
    sets = [reals(5, net=f"10.{i}") for i in range(8)]
    for bs in sets[:5]:
        prepare(pairs(bs), M)
    assert len(maglev._PREPARED) == 5  # none used yet: all kept (a reload's worth)
    for bs in sets[:5]:
        build_ring(bs, M)  # used now
    prepare(pairs(sets[5]), M)
    assert len(maglev._PREPARED) == 3  # used ones beyond the limit went, oldest first
    before = len(fills)
    build_ring(sets[0], M)
    build_ring(sets[4], M)
    assert len(fills) == before + 1  # the evicted one filled again, the newest not
    for bs in sets:  # unused ones past the hard limit go too, oldest first
        prepare(pairs(bs), M)
    assert maglev._PREPARED._slots <= 6 * M


def test_bad_input_is_refused_as_build_ring_refuses_it():
    with pytest.raises(ValueError, match="duplicate real key '10.1.0.1'"):
        prepare([("10.1.0.1", 1), ("10.1.0.1", 2)], M)
    with pytest.raises(ValueError, match="ring size 4098 is not a prime"):
        prepare([("10.1.0.1", 1)], 4098)


@pytest.mark.parametrize("pairs, size", [
    ([("10.1.0.1", 65536)], M),
    ([("10.1.0.1", -1)], M),
    ([("10.1.0.1", True)], M),
    ([("10.1.0.1", 1.5)], M),
    ([("", 1)], M),
    ([(None, 1)], M),
    ([("10.1.0.1", 1), ("10.1.0.2", 1), ("10.1.0.3", 1)], 2),
    ([("10.1.0.1", 1)], 101.0),
    ([("10.1.0.1", 1)], 1),
])
def test_prepare_words_every_refusal_as_build_ring(pairs, size):
    # prepare's one-pass check of the common case falls back to build_ring's for
    # anything else: the same refusal, word for word.
    with pytest.raises(ValueError) as built:
        build_ring([Backend(i + 1, k, w) for i, (k, w) in enumerate(pairs)], size)
    with pytest.raises(ValueError) as prepared:
        prepare(pairs, size)
    assert str(prepared.value) == str(built.value)


def test_prepared_tells_without_filling(fills):
    bs = reals(8)
    assert not maglev.prepared(pairs(bs), M)
    prepare(pairs(bs), M)
    before = len(fills)
    assert maglev.prepared(list(reversed(pairs(bs))) + [("10.1.9.9", 0)], M)  # order, drained
    assert not maglev.prepared(pairs(bs)[1:], M)
    assert not maglev.prepared(pairs(bs), 4093)
    assert len(fills) == before
