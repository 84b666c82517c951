/* maglev_fill.c: l4lb.maglev's ring fill (step 3 of its docstring) as a BPF
 * program, so the kernel's JIT runs it instead of numpy: the same rounds of
 * proposals, the same tables (tests/bpf/test_maglev_fill.py compares).
 *
 * The fill is a state machine in one map value. User space writes the inputs
 * (permutations, turn priorities) with the state reset, then runs the program
 * through BPF_PROG_TEST_RUN with `repeat`: each run advances it by a bounded
 * number of steps (the verifier walks every one) and returns 0 once the ring
 * is full, 1 while it is not, 2 if the inputs were inconsistent. It is a tc
 * program only because a test run of an XDP program with `repeat` swaps the XDP
 * dispatcher and waits ~15 ms for RCU; it never sees a real packet.
 *
 * Indices are masked to the power-of-two array sizes (and every counter kept
 * masked) so the verifier sees the same bounds on every path and can prune.
 */
#include <uapi/linux/bpf.h>

#ifndef FILL_SLOTS
#define FILL_SLOTS 131072 /* a power of two > the largest ring */
#endif
#ifndef FILL_REALS
#define FILL_REALS 4096   /* a power of two >= the most reals of one VIP */
#endif
#define SLOT_MASK (FILL_SLOTS - 1)
#define REAL_MASK (FILL_REALS - 1)
#define FILL_STEPS 8      /* steps per run ... */
#define BURST 64          /* ... and positions walked or slots resolved per step */

/* A slot's cell: 0 once taken (its owner is in owner[]), else the earliest
 * turn proposing it this round as priority + 1 (priorities are key * n + rank
 * < 2**62, so cells stay below 2**63), or UNSET. */
#define UNSET ((1ULL << 63) - 1)

enum { PH_START, PH_WALK, PH_RESOLVE, PH_PRUNE, PH_DONE, PH_ERROR };

/* The one Python mirror of this layout: l4lb/dataplane/fill.py. */
struct fill {
    __u32 m;        /* ring size (prime) */
    __u32 n;        /* live reals */
    __u32 phase;
    __u32 cur;      /* index into pending (START, PRUNE) or touched (RESOLVE) */
    __u32 npending;
    __u32 ntouched;
    __u32 kept;
    __u32 real;     /* the real walking its permutation (WALK) */
    __u32 slot;
    __u32 found;
    __u32 need;
    __u32 pos;
    __u64 steps;    /* steps taken, a cost figure for tests and benches */
    __u32 offset[FILL_REALS];
    __u32 skip[FILL_REALS];
    __u32 row[FILL_REALS];     /* real i's k-th turn: priority keyn[row[i] + k] + i */
    __u32 tcount[FILL_REALS];
    __u32 served[FILL_REALS];
    __u32 nxt[FILL_REALS];     /* next walk position: every one before it is taken */
    __u32 pending[FILL_REALS]; /* reals with turns left, by rank */
    __u32 touched[FILL_SLOTS]; /* slots proposed this round */
    __u32 owner[FILL_SLOTS];   /* the ring: per slot, the owning real's rank */
    __u64 keyn[FILL_SLOTS];    /* turn keys * n, as maglev.turn_order gives them */
    __u64 cell[FILL_SLOTS];
};

/* The Python mirror passes its layout; a mismatch fails the compile. */
_Static_assert(sizeof(struct fill) == FILL_BYTES, "struct fill: size differs from fill.py");
_Static_assert(__builtin_offsetof(struct fill, touched) == FILL_TOUCHED_AT, "touched");
_Static_assert(__builtin_offsetof(struct fill, owner) == FILL_OWNER_AT, "owner");
_Static_assert(__builtin_offsetof(struct fill, keyn) == FILL_KEYN_AT, "keyn");
_Static_assert(__builtin_offsetof(struct fill, cell) == FILL_CELL_AT, "cell");

/* bcc would build a ctypes type of the value (seconds for a struct this big):
 * the map holds it as opaque bytes. */
struct fill_bytes {
    __u8 raw[FILL_BYTES];
};
BPF_F_TABLE("array", __u32, struct fill_bytes, fill_state, 1, BPF_F_MMAPABLE);

/* The next pending real starts its walk where it stopped last round. */
static __always_inline void start_real(struct fill *f)
{
    __u32 c = f->cur;
    if (c >= f->npending) {
        f->phase = PH_RESOLVE;
        f->cur = 0;
        return;
    }
    __u32 r = f->pending[c & REAL_MASK] & REAL_MASK;
    f->real = r;
    f->need = f->tcount[r] - f->served[r];
    f->found = 0;
    f->pos = f->nxt[r];
    f->slot = (__u32)(((__u64)f->offset[r] + (__u64)f->pos * f->skip[r]) % f->m);
    f->phase = PH_WALK;
}

/* Up to BURST positions of the walking real's permutation: each free slot is
 * proposed with the real's next unserved turn. The loop keeps its state in
 * registers (a step per position through the map value cost twice as much). */
static __always_inline void walk(struct fill *f)
{
    __u32 r = f->real & REAL_MASK;
    __u64 m = f->m, skip = f->skip[r], s = f->slot & SLOT_MASK;
    __u64 found = f->found & SLOT_MASK, need = f->need, nt = f->ntouched & SLOT_MASK;
    __u64 tb = f->row[r] + f->served[r], prio1 = r + 1; /* + 1: a cell of 0 is taken */
    __u32 pos = f->pos;
    if (pos > 2 * m) { /* a walk visits every slot in m positions */
        f->phase = PH_ERROR;
        return;
    }
    for (int j = 0; j < BURST; j++) {
        __u64 c = f->cell[s];
        if (c) {
            __u64 t = f->keyn[(tb + found) & SLOT_MASK] + prio1;
            if (c == UNSET) {
                f->touched[nt] = s;
                nt = (nt + 1) & SLOT_MASK;
            }
            if (t < c)
                f->cell[s] = t;
            found = (found + 1) & SLOT_MASK;
        }
        pos += 1;
        s += skip;
        if (s >= m)
            s -= m;
        s &= SLOT_MASK;
        if (found >= need)
            break;
    }
    f->slot = s;
    f->pos = pos;
    f->found = found;
    f->ntouched = nt;
    if (found >= need) {
        f->nxt[r] = pos;
        f->cur += 1;
        f->phase = PH_START;
    }
}

/* Every slot proposed this round goes to its earliest turn's real. */
static __always_inline void resolve(struct fill *f)
{
    __u32 c = f->cur, nt = f->ntouched, n = f->n;
    if (n == 0) {
        f->phase = PH_ERROR;
        return;
    }
    for (int j = 0; j < BURST && c < nt; j++) {
        __u32 s = f->touched[c & SLOT_MASK] & SLOT_MASK;
        __u64 best = f->cell[s];
        if (best == 0 || best == UNSET) { /* not proposed, or taken before */
            f->phase = PH_ERROR;
            return;
        }
        __u32 r = (__u32)((best - 1) % n);
        f->cell[s] = 0;
        f->owner[s] = r;
        f->served[r & REAL_MASK] += 1;
        c += 1;
    }
    f->cur = c;
    if (c >= nt) {
        f->phase = PH_PRUNE;
        f->cur = 0;
        f->kept = 0;
    }
}

/* Keep the reals with turns left for the next round. */
static __always_inline void prune(struct fill *f)
{
    __u32 c = f->cur;
    if (c >= f->npending) {
        f->npending = f->kept;
        f->ntouched = 0;
        f->cur = 0;
        f->phase = f->kept ? PH_START : PH_DONE;
        return;
    }
    __u32 r = f->pending[c & REAL_MASK] & REAL_MASK;
    if (f->served[r] < f->tcount[r]) {
        f->pending[f->kept & REAL_MASK] = r;
        f->kept += 1;
    }
    f->cur = c + 1;
}

int maglev_fill(struct __sk_buff *skb)
{
    __u32 zero = 0;
    struct fill *f = (struct fill *)fill_state.lookup(&zero);
    if (!f)
        return 2;
#pragma clang loop unroll(disable)
    for (int i = 0; i < FILL_STEPS; i++) {
        __u32 ph = f->phase;
        if (ph == PH_WALK)
            walk(f);
        else if (ph == PH_START)
            start_real(f);
        else if (ph == PH_RESOLVE)
            resolve(f);
        else if (ph == PH_PRUNE)
            prune(f);
        else
            break;
        f->steps += 1;
    }
    return f->phase == PH_DONE ? 0 : f->phase == PH_ERROR ? 2 : 1;
}
