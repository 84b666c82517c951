"""Maglev consistent hashing: a VIP's weighted reals -> its lookup table (ring).

Maglev (Eisenbud et al., NSDI 2016, section 3.4): every real has its own
permutation of the M ring slots, ``slot(p) = (offset + p * skip) mod M`` with M
prime, and the reals take turns claiming their most preferred free slot until
the ring is full.  Each real ends up with its share of the slots, and a change
of the real set moves few of them, so most flows keep their real even on a node
that has no conn-table entry for them (e.g. the standby after a failover).

The ring must be byte-identical on every node given the same config, whatever
ids the reals got there and whatever order they are listed in.  So everything
that decides the table -- the permutations, the turn order, the tie-breaks --
depends only on each real's ``key`` (its address) and ``weight``; ids are only
written into the finished table.  The hash is BLAKE2b, never ``hash()``, which
is salted per process.

How the table is filled (the specification both implementations follow):

1. Reals with weight 0 are left out (draining: no new flows).  The others are
   ranked by key.
2. Turns: real i's k-th turn (k = 0, 1, ...) comes at time
   ``(k + 1/2) / weight_i``; turns are ordered by (time, rank) and the first M
   are dealt out, one per slot.  With equal weights this is Maglev's round
   robin; with weights, a real of twice the weight takes turns twice as often,
   evenly spread, and gets its share to within about one slot (Sainte-Lague).
   A turn's time depends on its own real's weight only, so adding, removing or
   reweighting one real leaves the order of everybody else's turns alone.
3. Filling, in rounds: every real with r turns still unserved proposes its r
   most preferred free slots; a slot proposed by several reals goes to the
   proposal with the earliest turn (a real's j-th proposal carries its j-th
   unserved turn); reals with turns left propose again in the next round,
   until every turn is served.

Step 3 is Maglev's fill done in parallel rounds rather than one turn at a time,
which is what lets numpy fill a ring in about a dozen rounds of array
operations instead of ~M Python steps.  Its tables differ from strictly
sequential Maglev's but have the same shares and about the same churn: at
M=65537, removing 1 of 100 equal reals moves ~1.6% of the slots (sequential
Maglev: ~1.5%; the floor is 1%), removing 1 of 1000 ~0.8% (0.7%; floor 0.1%).

``_fill_numpy`` is the fast path; ``_fill_python`` is the readable reference,
used when numpy is not installed.  They give identical tables (the tests check),
so nodes with and without numpy still agree.  The daemon goes one step further:
``set_fill_engine`` hands the rounds to bpf/maglev_fill.c, run by the kernel's
JIT (l4lb.dataplane.fill, about half numpy's time), with the same tables
(tests/bpf/test_maglev_fill.py) and numpy as its fallback.

A fill depends on the ring size and the live reals' keys and weights only, never
on ids.  At 1,000 reals and M=65537 it takes 9-15 ms of CPU on the 2-CPU test VM
(12 rounds: one block for the first, five walks, six small inverse rounds; the
walks are most of it), so the daemon makes it ahead in a worker thread
(``prepare``) and the ``build_ring`` that publishes the ring on its event loop
only writes the ids into it.
"""

from __future__ import annotations

import array
import functools
import hashlib
import itertools
import operator
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

try:
    import numpy as np
except ImportError:  # pragma: no cover - exercised only where numpy is missing
    np = None

__all__ = [
    "DEFAULT_RING_SIZE",
    "MAX_REAL_ID",
    "MAX_RING_SIZE",
    "MAX_WEIGHT",
    "NO_REAL",
    "Backend",
    "build_ring",
    "prepare",
    "prepared",
    "ring_changes",
    "ring_shares",
    "set_fill_engine",
    "turn_order",
]

DEFAULT_RING_SIZE = 65537
MAX_RING_SIZE = 1 << 24  # 64 MiB of uint32 per VIP is already far more than a BPF map wants
NO_REAL = 0  # ring entry meaning "no real": real ids start at 1
MAX_WEIGHT = 65535
MAX_REAL_ID = 0xFFFFFFFF  # ids are stored as uint32

# Largest combined turn priority the numpy path packs into int64 (a constant so
# that the tests can force the other branch).
_PRIO_LIMIT = 1 << 62
# Personalisation of the key hash.  Part of the table's definition, like the
# fill algorithm: change either and every node must be upgraded together.
_HASH_PERSON = b"l4lb-maglev-v1"

if array.array("I").itemsize != 4:  # pragma: no cover - true on every Linux ABI
    raise ImportError("l4lb.maglev needs array typecode 'I' to be 32 bits")


class Backend(NamedTuple):
    """One real as Maglev sees it.

    ``key`` is the real's identity for hashing (its address, spelled the same
    on every node); ``id`` is what the ring stores (>= 1); ``weight`` is
    0..65535, 0 meaning drain.
    """

    id: int
    key: str
    weight: int


def build_ring(backends: Sequence[Backend], size: int = DEFAULT_RING_SIZE) -> array.array:
    """Return the Maglev table: ``array('I')`` of ``size`` real ids.

    ``backends``: Backends, or plain (id, key, weight) tuples.

    Reals with weight 0 get no entries; if no real has a positive weight every
    entry is NO_REAL.  Raises ValueError on a non-prime size, a weight outside
    0..65535, an id outside 1..2**32-1, a duplicate key or id, or more live
    reals than slots.  A fill made ahead by ``prepare`` for the same keys,
    weights and size is used instead of filling again.
    """
    live = _validate(backends, size)
    if not live:
        return array.array("I", bytes(4 * size))
    ids = [rid for _, rid, _ in live]
    fkey = _fill_key(size, [(key, w) for key, _, w in live])
    owner = _PREPARED.get(fkey)
    if owner is None:
        owner = _fill(live, size)
    if np is not None:
        return array.array("I", np.asarray(ids, dtype=np.uint32)[owner].tobytes())
    return array.array("I", [ids[i] for i in owner])


def prepare(reals: Iterable[tuple[str, int]], size: int = DEFAULT_RING_SIZE) -> None:
    """Fill the table of ``reals`` = [(key, weight)] now, for a later build_ring
    of the same keys, weights and size (whatever the ids) to use.

    For a worker thread: the daemon fills here, then publishes the ring on its
    event loop without the ~10 ms fill.  Raises ValueError as build_ring does.
    """
    live = _validate_pairs(list(reals), size)
    if live:
        fkey = _fill_key(size, [(key, w) for key, _, w in live])
        if _PREPARED.get(fkey) is None:
            _PREPARED.put(fkey, _fill(live, size))


def prepared(reals: Iterable[tuple[str, int]], size: int = DEFAULT_RING_SIZE) -> bool:
    """Whether prepare() has the fill of ``reals`` = [(key, weight)] (cheap: no fill,
    no validation)."""
    return _fill_key(size, sorted((k, w) for k, w in reals if w)) in _PREPARED


# A faster fill with _fill_numpy's exact output, or None: the daemon sets the
# kernel's (l4lb.dataplane.fill); it answers None for rings it cannot fill.
_ENGINE = None


def set_fill_engine(engine) -> None:
    """Fill rings with ``engine(perms, weights, size)`` (owner ranks, as
    _fill_numpy returns them, or None to leave the ring to numpy); None: numpy."""
    global _ENGINE
    _ENGINE = engine


def turn_order(weights: Sequence[int], size: int):
    """Step 2 for fill engines: (turns, keyn, row) as _turn_order_numpy gives them."""
    return _turn_order_numpy(weights, size)


def _fill(live: list[tuple[str, int, int]], size: int):
    """Per slot, the rank (index in ``live``) of the real owning it."""
    perms = [_permutation(key, size) for key, _, _ in live]
    weights = [w for _, _, w in live]
    if np is not None:
        owner = _ENGINE(perms, weights, size) if _ENGINE is not None else None
        if owner is None:
            owner = _fill_numpy(perms, weights, size)
        return owner.astype(np.uint16 if len(live) <= 1 << 16 else np.uint32)
    return array.array("I", _fill_python(perms, weights, size))


def _fill_key(size: int, pairs: list[tuple[str, int]]) -> tuple:
    # Which implementation filled is part of the key: tests compare the two.
    return size, np is None, tuple(pairs)


class _Prepared:
    """Fills made by prepare(), oldest first. Fills a build_ring has used are kept
    up to ``limit`` slots in all (16 MiB of uint16: 128 rings of 65537), so that a
    change undone finds its ring again; fills not used yet are kept whatever their
    number (a reload preparing hundreds of VIPs), up to ``hard`` slots. Thread-safe."""

    def __init__(self, limit: int = 1 << 23, hard: int = 1 << 27):
        self.limit, self.hard = limit, hard
        self._fills: dict[tuple, Any] = {}
        self._unused: set[tuple] = set()
        self._slots = 0
        self._lock = threading.Lock()

    def get(self, key: tuple):
        with self._lock:
            owner = self._fills.pop(key, None)
            if owner is not None:
                self._fills[key] = owner  # now the newest
                self._unused.discard(key)
            return owner

    def put(self, key: tuple, owner) -> None:
        with self._lock:
            old = self._fills.pop(key, None)
            self._slots += len(owner) - (len(old) if old is not None else 0)
            self._fills[key] = owner
            self._unused.add(key)
            for k in list(self._fills):  # the oldest used ones go first
                if self._slots <= self.limit:
                    break
                if k not in self._unused:
                    self._slots -= len(self._fills.pop(k))
            while self._slots > self.hard and len(self._fills) > 1:
                k = next(iter(self._fills))
                self._unused.discard(k)
                self._slots -= len(self._fills.pop(k))

    def __contains__(self, key: tuple) -> bool:
        with self._lock:
            return key in self._fills

    def clear(self) -> None:
        with self._lock:
            self._fills.clear()
            self._unused.clear()
            self._slots = 0

    def __len__(self) -> int:
        return len(self._fills)


_PREPARED = _Prepared()


def ring_changes(old: Sequence[int], new: Sequence[int]) -> int:
    """Number of entries that differ between two rings of the same size."""
    if len(old) != len(new):
        raise ValueError(f"rings differ in size: {len(old)} vs {len(new)}")
    if np is not None:
        return int(np.count_nonzero(np.asarray(old) != np.asarray(new)))
    return sum(1 for a, b in zip(old, new, strict=True) if a != b)


def ring_shares(ring: Iterable[int]) -> dict[int, int]:
    """Entries per id (NO_REAL included if present), in ascending id order."""
    return dict(sorted(Counter(ring).items()))


# --------------------------------------------------------------- validation


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:  # n <= 2**24: at most ~2000 divisions
        if n % f == 0:
            return False
        f += 2
    return True


def _as_int(value: object, what: str) -> int:
    if type(value) is int:  # the common case, fast
        return value
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, not {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer, not {value!r}") from None


def _validate(backends: Sequence[Backend], size: int) -> list[tuple[str, int, int]]:
    """Check the input; return (key, id, weight) of reals with weight > 0, by key."""
    size = _as_int(size, "ring size")
    if not 2 <= size <= MAX_RING_SIZE or not is_prime(size):
        raise ValueError(f"ring size {size} is not a prime number in 2..{MAX_RING_SIZE}")
    live = []
    for rid, key, weight in backends:  # Backend's fields, as a tuple (faster than by name)
        # the common case in one test; anything else is looked at closely
        if not (type(key) is str and key and type(rid) is int and type(weight) is int
                and 1 <= rid <= MAX_REAL_ID and 0 <= weight <= MAX_WEIGHT):
            rid, weight = _check_real(key, rid, weight)
        if weight:
            live.append((key, rid, weight))
    keys = {key for _, key, _ in backends}
    if len(keys) != len(backends):
        seen: set[str] = set()
        for _, key, _ in backends:
            if key in seen:
                raise ValueError(f"duplicate real key {key!r}")
            seen.add(key)
    if len({rid for rid, _, _ in backends}) != len(backends):
        seen_ids: set[int] = set()
        for rid, key, _ in backends:
            if rid in seen_ids:
                raise ValueError(f"duplicate real id {rid} (real {key!r})")
            seen_ids.add(rid)
    if len(live) > size:
        raise ValueError(f"{len(live)} reals with weight > 0 do not fit a ring of size {size}")
    live.sort()  # keys are unique, so this is by key alone
    return live


def _validate_pairs(pairs: list[tuple[str, int]], size: int) -> list[tuple[str, int, int]]:
    """_validate of [(key, weight)] (ids do not matter to a fill): the common case
    checked in one pass, anything else by _validate, for its errors."""
    if (type(size) is int and 2 <= size <= MAX_RING_SIZE and _is_prime(size)
            and all(type(k) is str and k and type(w) is int and 0 <= w <= MAX_WEIGHT
                    for k, w in pairs)
            and len({k for k, _ in pairs}) == len(pairs)):
        live = [(k, i, w) for i, (k, w) in enumerate(pairs, 1) if w]
        if len(live) > size:
            raise ValueError(f"{len(live)} reals with weight > 0 do not fit a ring of size {size}")
        live.sort()  # keys are unique, so this is by key alone
        return live
    return _validate([Backend(i + 1, k, w) for i, (k, w) in enumerate(pairs)], size)


_is_prime = functools.lru_cache(maxsize=64)(is_prime)


def _check_real(key: object, rid: object, weight: object) -> tuple[int, int]:
    if not isinstance(key, str) or not key:
        raise ValueError(f"real key must be a non-empty string, not {key!r}")
    rid = _as_int(rid, f"id of real {key!r}")
    weight = _as_int(weight, f"weight of real {key!r}")
    if not 1 <= rid <= MAX_REAL_ID:
        raise ValueError(f"real {key!r}: id {rid} out of range 1..{MAX_REAL_ID}")
    if not 0 <= weight <= MAX_WEIGHT:
        raise ValueError(f"real {key!r}: weight {weight} out of range 0..{MAX_WEIGHT}")
    return rid, weight


# ---------------------------------------------------- permutations and turns


@functools.lru_cache(maxsize=1 << 16)  # rebuilds mostly see the same reals again
def _permutation(key: str, size: int) -> tuple[int, int, int]:
    """(offset, skip, skip**-1 mod size) of a real's permutation, from its key alone.

    One 16-byte BLAKE2b digest gives two independent 64-bit numbers.  skip is in
    1..size-1, hence coprime with the prime size: the walk visits every slot.
    The inverse maps a slot back to its position in the walk (numpy path).
    """
    raw = hashlib.blake2b(
        key.encode("utf-8", "surrogatepass"), digest_size=16, person=_HASH_PERSON
    ).digest()
    offset = int.from_bytes(raw[:8], "big") % size
    skip = int.from_bytes(raw[8:], "big") % (size - 1) + 1 if size > 2 else 1
    return offset, skip, pow(skip, -1, size) if size > 2 else 1


# Turn order (step 2).  The time of real i's k-th turn, (2k+1) / (2 w_i), is
# compared exactly as the integer (2k+1) * wmax**2 // w_i: two different times
# differ by at least 1 / (2 wmax**2), so the floors keep them apart, and equal
# times give equal keys (then rank decides).  Floats would not be exact here.
# Real i can hold at most (size + n) * w_i / sum(w) + 1 of the first `size`
# turns, so that many candidates (+1 spare) are generated per real.


def _turn_candidates(weights: Sequence[int], size: int) -> list[int]:
    total = sum(weights)
    return [(size + len(weights)) * w // total + 2 for w in weights]


def _turn_order_python(weights: Sequence[int], size: int) -> list[int]:
    """The real (rank) taking each of the first ``size`` turns, in order."""
    wmax2 = max(weights) ** 2
    turns = [
        ((2 * k + 1) * wmax2 // w, i)
        for i, (w, c) in enumerate(zip(weights, _turn_candidates(weights, size), strict=True))
        for k in range(c)
    ]
    turns.sort()
    return [i for _, i in turns[:size]]


def _turn_order_numpy(weights: Sequence[int], size: int):
    """The same order as _turn_order_python, as (turns, keyn, row).

    ``turns[i]`` is real i's number of turns; ``keyn[row[i] + k] + i`` orders
    real i's k-th turn among all turns (lower is earlier).  It is not the
    turn's position, which would cost a full sort, but it compares the same.
    """
    n = len(weights)
    w = np.asarray(weights, dtype=np.int64)
    wmax2 = int(w.max()) ** 2
    # A turn's time depends on its real's weight only: work per distinct weight
    # (usually one or two), then spread to the reals.
    uw, of_real, mult = np.unique(w, return_inverse=True, return_counts=True)
    count = (size + n) * uw // int(w.sum()) + 2  # _turn_candidates, per weight
    first = np.cumsum(count) - count
    label = np.repeat(np.arange(uw.size), count)
    k = np.arange(label.size, dtype=np.int64) - np.repeat(first, count)
    key = (2 * k + 1) * wmax2 // uw[label]  # < 2**58: exact in int64
    if int(key.max()) >= _PRIO_LIMIT // n:  # huge rings with extreme weights
        return _turn_order_ranked(weights, size)
    # The size-th turn: the first key value T reached by the cumulated counts of
    # reals per key; turns of keys < T all go, those of key T by rank.
    order = np.argsort(key, kind="stable")
    skey = key[order]
    upto = np.cumsum(mult[label[order]])
    at = int(np.searchsorted(upto, size))  # upto[at] >= size
    t = int(skey[at])
    lo = int(np.searchsorted(skey, t))  # first entry of key t
    below = int(upto[lo - 1]) if lo else 0  # turns before key t
    # per weight: turns with key < t, and whether it has a turn of key t
    less = np.bincount(label[key < t], minlength=uw.size)
    has_t = np.bincount(label[key == t], minlength=uw.size) > 0
    turns = less[of_real]
    tied = np.flatnonzero(has_t[of_real])  # by rank
    turns[tied[: size - below]] += 1
    # (time, rank) as one unique integer: key * n + rank
    return turns, key * n, first[of_real]


def _turn_order_ranked(weights: Sequence[int], size: int):
    """_turn_order_numpy for priorities too big for int64: every candidate turn
    ranked by a sort."""
    n = len(weights)
    w = np.asarray(weights, dtype=np.int64)
    count = np.asarray(_turn_candidates(weights, size), dtype=np.int64)
    first = np.cumsum(count) - count
    real = np.repeat(np.arange(n, dtype=np.int64), count)
    k = np.arange(real.size, dtype=np.int64) - np.repeat(first, count)
    key = (2 * k + 1) * (int(w.max()) ** 2) // w[real]
    order = np.argsort(key, kind="stable")  # candidates are in rank order
    rank = np.empty(real.size, dtype=np.int64)
    rank[order] = np.arange(real.size, dtype=np.int64)
    turns = np.bincount(real[rank < size], minlength=n)
    return turns, rank * n, first  # rank * n + real orders as rank does


# ---------------------------------------------------- pure-Python reference


def _fill_python(perms: Sequence[tuple[int, int, int]], weights: Sequence[int], size: int) -> list[int]:
    """Reference implementation of the fill (step 3 of the module docstring).

    Returns, per slot, the rank of the real owning it.
    """
    n = len(perms)
    turn_no: list[list[int]] = [[] for _ in range(n)]  # real -> its turns' positions
    for t, i in enumerate(_turn_order_python(weights, size)):
        turn_no[i].append(t)
    owner = [-1] * size
    nxt = [0] * n  # next permutation position to look at; all before it are taken
    served = [0] * n
    pending = [i for i in range(n) if turn_no[i]]
    while pending:
        best: dict[int, tuple[int, int]] = {}  # slot -> (turn, real) of the best proposal
        for i in pending:
            offset, skip, _ = perms[i]
            pos = nxt[i]
            slot = (offset + pos * skip) % size
            turns, base = turn_no[i], served[i]
            need, found = len(turns) - base, 0
            while found < need:
                if owner[slot] < 0:
                    t = turns[base + found]
                    cur = best.get(slot)
                    if cur is None or t < cur[0]:
                        best[slot] = (t, i)
                    found += 1
                pos += 1
                slot += skip
                if slot >= size:
                    slot -= size
            # Every proposed slot is taken by somebody this round, so all the
            # positions walked so far are taken.
            nxt[i] = pos
        for slot, (_, i) in best.items():
            owner[slot] = i
            served[i] += 1
        pending = [i for i in pending if served[i] < len(turn_no[i])]
    return owner


# --------------------------------------------------------------- numpy path


def _fill_numpy(perms: Sequence[tuple[int, int, int]], weights: Sequence[int], size: int):
    """Same result as _fill_python, one array pass per round of proposals."""
    m = size
    n = len(perms)
    offset, skip, inverse = np.fromiter(
        itertools.chain.from_iterable(perms), dtype=np.int64, count=3 * n
    ).reshape(n, 3).T.copy()
    turns, keyn, row = _turn_order_numpy(weights, size)

    owner = np.full(m, -1, dtype=np.int32)
    free = np.ones(m, dtype=bool)  # slots nobody owns yet
    unset = np.iinfo(np.int64).max
    best = np.full(m, unset, dtype=np.int64)  # per slot: earliest turn proposing it
    nfree = m
    nxt = np.zeros(n, dtype=np.int64)
    served = np.zeros(n, dtype=np.int64)
    pending = np.flatnonzero(turns)
    while pending.size:
        need = turns[pending] - served[pending]
        # Walking costs ~need * m / nfree positions per real, inverting ~nfree.
        if nfree == m:  # the first round: nothing is taken, no walk needed
            real, slot, j, new_nxt = _propose_first(pending, need, offset, skip, m)
        elif nfree * nfree <= int(need.mean() * m) + 16 * nfree:
            real, slot, j, new_nxt = _propose_by_inverse(pending, need, offset, inverse, free, m)
        else:
            real, slot, j, new_nxt = _propose_by_walk(
                pending, need, nxt, offset, skip, free, m, nfree
            )
        turn = keyn[(row + served)[real] + j]  # the priority of each proposal's turn
        turn += real
        np.minimum.at(best, slot, turn)  # earliest turn wins each slot
        win = np.flatnonzero(best[slot] == turn)
        won, by = slot[win], real[win]
        best[won] = unset  # every slot proposed is won: this resets them all
        owner[won] = by
        free[won] = False
        nfree -= win.size
        served += np.bincount(by, minlength=n)
        nxt[pending] = new_nxt
        pending = pending[served[pending] < turns[pending]]
    return owner


def _mod(x, m: int, q=None):
    """x % m in place for unsigned arrays (``q``: scratch of x's shape): numpy
    divides by a scalar several times faster than it takes the remainder."""
    q = np.floor_divide(x, x.dtype.type(m), out=q)
    q *= x.dtype.type(m)
    x -= q
    return x


def _propose_first(pending, need, offset, skip, m):
    """The first round: nothing is taken yet, so each real proposes the first
    ``need`` positions of its permutation (as _propose_by_walk would, without the
    walk)."""
    width = int(need.max())
    # offset + j * skip < m * width: uint32 when that fits (faster)
    dt = np.uint32 if m * (width + 1) < 1 << 32 else np.uint64
    cand = np.multiply.outer(skip[pending].astype(dt), np.arange(width, dtype=dt))
    cand += offset[pending].astype(dt)[:, None]
    _mod(cand, m)
    shape = cand.shape
    real = np.broadcast_to(pending[:, None], shape)
    j = np.broadcast_to(np.arange(width, dtype=np.int64), shape)
    if int(need.min()) == width:  # equal weights: every row whole
        real, j, slot = real.ravel(), j.ravel(), cand.ravel()
    else:  # row by row, each row's first `need`
        use = j < need[:, None]
        real, j, slot = real[use], j[use], cand[use]
    return real, slot.astype(np.int64), j, need.copy()


def _propose_by_walk(pending, need, nxt, offset, skip, free, m, nfree):
    """Each pending real's ``need`` most preferred free slots, found by walking
    its permutation from ``nxt``.

    Returns (real, slot, j, new_nxt): per proposal the real, the slot and its
    index j among that real's proposals; per pending real the position after
    its last proposal.
    """
    reals, slots, js = [], [], []
    new_nxt = np.empty(pending.size, dtype=np.int64)
    rows = np.arange(pending.size)  # pending reals not done yet
    start = nxt[pending]
    need = need.copy()
    got = np.zeros(pending.size, dtype=np.int64)
    # `need` free slots are expected within need * m / nfree positions.  The first
    # pass adds a margin (~2.5 standard deviations); the few rows still short go
    # again with a wide one, so that a round rarely takes three passes.
    margin = (5, 4)
    while rows.size:
        width = np.minimum((need * margin[0] + margin[1]) * m // (4 * nfree) + 1, m)
        margin = (6, 12)
        next_rows, next_start, next_need, next_got = [], [], [], []
        for sel, w in _groups(width):
            b = pending[rows[sel]]
            row, slot, nth, count, end = _walk_block(
                b, start[sel], need[sel], w, offset, skip, free, m
            )
            reals.append(b[row])
            slots.append(slot)
            js.append(got[sel][row] + nth)
            new_nxt[rows[sel]] = end
            short = count < need[sel]
            next_rows.append(rows[sel][short])
            next_start.append(end[short])
            next_need.append((need[sel] - count)[short])
            next_got.append((got[sel] + count)[short])
        rows = np.concatenate(next_rows)
        start = np.concatenate(next_start)
        need = np.concatenate(next_need)
        got = np.concatenate(next_got)
    return np.concatenate(reals), np.concatenate(slots), np.concatenate(js), new_nxt


# A walk block has a fixed cost of about as many positions as this (numpy calls).
_BLOCK_COST = 16384


def _groups(width):
    """Rows in blocks walked with one width each: [(rows, width)].  Rows are
    bucketed by power of two, so that one heavy real needing thousands of slots
    does not widen everybody's block; a bucket joins the block before it when
    widening that block costs less than a block of its own."""
    top = int(width.max())
    if width.size * (top - int(width.min())) <= _BLOCK_COST:  # one block is cheaper
        return [(np.arange(width.size), top)]
    shift = np.ceil(np.log2(width)).astype(np.int64)
    u = np.unique(shift)
    if u.size == 1:
        return [(np.arange(width.size), int(width.max()))]
    order = np.argsort(shift, kind="stable")
    bounds = np.searchsorted(shift[order], u, side="right").tolist()
    tops = np.maximum.reduceat(width[order], [0, *bounds[:-1]]).tolist()
    groups, lo, prev, rows, top = [], 0, 0, 0, 0
    for hi, w in zip(bounds, tops, strict=True):
        if rows and rows * (w - top) > _BLOCK_COST:
            groups.append((order[lo:prev], top))
            lo, rows = prev, 0
        rows += hi - prev
        top = max(top, w)
        prev = hi
    groups.append((order[lo:], top))
    return groups


def _walk_block(reals, start, need, width, offset, skip, free_slots, m):
    """Look at ``width`` positions from ``start`` of each real's permutation.

    Returns per hit (free slot within the real's first ``need``) its row, slot
    and index among the row's hits (0-based); per row the hits and the position
    to continue from.
    """
    base = (offset[reals] + start * skip[reals]) % m
    # uint32 is several times faster than int64 here; fall back if it could wrap.
    dt = np.uint32 if m * (width + 1) < 1 << 32 else np.uint64
    shape = (reals.size, width)
    cand = _scratch(0, shape, dt)
    np.multiply(np.arange(width, dtype=dt), skip[reals].astype(dt)[:, None], out=cand)
    cand += base.astype(dt)[:, None]
    _mod(cand, m, _scratch(1, shape, dt))
    # mode=wrap: the slots are < m already, and it skips the bounds check
    free = np.take(free_slots, cand, out=_scratch(2, shape, bool), mode="wrap")
    idx = np.flatnonzero(free)  # row-major: row by row, by position within a row
    # where each row's run starts in idx, and its length
    bounds = np.searchsorted(idx, np.arange(0, (reals.size + 1) * width, width))
    nfree = np.diff(bounds)
    # Each row's first `need` free positions: the first count of its run in idx.
    count = np.minimum(nfree, need)
    lead = np.cumsum(count) - count
    total = int(lead[-1] + count[-1])
    shift = np.repeat(bounds[:-1] - lead, count)
    nth = np.arange(total, dtype=np.int64)
    idx = idx[nth + shift]
    nth -= np.repeat(lead, count)
    row = np.repeat(np.arange(reals.size), count)
    done = count == need
    end = start + width
    # A done row continues after its last hit: the column of its count-th hit.
    end[done] = start[done] + idx[(lead + count - 1)[done]] - np.flatnonzero(done) * width + 1
    return row, cand.ravel()[idx].astype(np.int64), nth, count, end


# Scratch arrays of the walk, kept between builds in each thread: a fresh array of
# a few hundred KiB costs a page fault per 4 KiB, more than the arithmetic on it.
_SCRATCH_KEEP = 1 << 23  # bytes per array kept at most
_tls = threading.local()


def _scratch(i: int, shape: tuple[int, int], dtype):
    nbytes = shape[0] * shape[1] * np.dtype(dtype).itemsize
    bufs = _tls.__dict__.setdefault("bufs", {})
    buf = bufs.get(i)
    if buf is None or buf.size < nbytes:
        buf = np.empty(max(nbytes, 1 << 16), dtype=np.uint8)
        if nbytes <= _SCRATCH_KEEP:
            bufs[i] = buf
    return buf[:nbytes].view(dtype).reshape(shape)


def _propose_by_inverse(pending, need, offset, inverse, free_slots, m):
    """Same result as _propose_by_walk, computed from the free slots' side:
    the position of every free slot in every pending real's permutation, then
    the ``need`` smallest per real.  Cheaper once few slots are free (a walk
    steps over ~m / nfree taken slots per hit).
    """
    free = np.flatnonzero(free_slots)
    # All slots before a real's nxt are taken, so these positions are >= nxt.
    pos = free[None, :] + (m - offset[pending])[:, None]  # >= 0
    pos = _mod(_mod(pos, m) * inverse[pending][:, None], m)  # < m * m: fits int64
    width = int(need.max())  # <= free.size: there are as many free slots as unserved turns
    if width == 1:
        col = np.argmin(pos, axis=1)[:, None]
    else:  # the `width` smallest (positions in a row are distinct), in order
        col = np.argpartition(pos, width - 1, axis=1)[:, :width]
        col = np.take_along_axis(col, np.argsort(np.take_along_axis(pos, col, axis=1),
                                                  axis=1), axis=1)
    pos = np.take_along_axis(pos, col, axis=1)
    hit = np.flatnonzero(np.arange(width)[None, :] < need[:, None])
    row, j = np.divmod(hit, width)
    new_nxt = pos[np.arange(pending.size), need - 1] + 1
    return pending[row], free[col.ravel()[hit]], j, new_nxt
