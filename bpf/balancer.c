/* balancer.c: the XDP entry of l4lb, read top to bottom.
 *
 * parse -> VIP? -> conn table hit? -> else Maglev ring -> forward (DR or TUN).
 * Everything not for a VIP leaves with XDP_PASS, untouched.
 */
/* uapi headers only: the kernel's internal linux/ headers cost clang ~4 s per compile,
 * and every daemon start and reload compiles (README: Architecture). */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/icmpv6.h>
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>

#include "maps.h"
#include "parse.h"
#include "csum.h"
#include "encap.h"

#define ONE_SECOND_NS 1000000000ULL

static __always_inline void count(__u32 reason)
{
    __u64 *c = stats_global.lookup(&reason);
    if (c)
        *c += 1;
}


static __always_inline int mac_equal(const __u8 *a, const __u8 *b)
{
    return *(const __u32 *)a == *(const __u32 *)b &&
           *(const __u16 *)(a + 4) == *(const __u16 *)(b + 4);
}

static __always_inline __u32 mix32(__u32 h)
{
    h ^= h >> 16;
    h *= 0x7feb352d;
    h ^= h >> 15;
    h *= 0x846ca68b;
    h ^= h >> 16;
    return h;
}

/* Stable across nodes and restarts: a flow lands on the same real whichever
 * balancer carries it (both build identical rings from the same config). */
static __always_inline __u32 flow_hash(const struct flow_key *k, int src_only)
{
    const __u32 *s = (const __u32 *)k->src;
    const __u32 *d = (const __u32 *)k->dst;
    __u32 h = mix32(0x9e3779b9 ^ s[0]);
    if (k->family == FAMILY_V6) {
        h = mix32(h ^ s[1]);
        h = mix32(h ^ s[2]);
        h = mix32(h ^ s[3]);
    }
    if (src_only)
        return h;
    h = mix32(h ^ d[0]);
    if (k->family == FAMILY_V6) {
        h = mix32(h ^ d[1]);
        h = mix32(h ^ d[2]);
        h = mix32(h ^ d[3]);
    }
    return mix32(h ^ (((__u32)k->sport << 16) | k->dport) ^ ((__u32)k->proto << 24));
}

static __always_inline __u32 vip_filter_index(const struct flow_key *k)
{
    const __u32 *d = (const __u32 *)k->dst;
    return mix32(d[0] ^ d[1] ^ d[2] ^ d[3] ^ k->family) & (VIP_FILTER_SIZE - 1);
}

/* False only when the destination is certainly not a VIP address. */
static __always_inline int maybe_vip(const struct flow_key *k)
{
    __u32 idx = vip_filter_index(k);
    __u32 *hit = vip_filter.lookup(&idx);
    return hit && *hit;
}

static __always_inline struct vip_meta *find_vip(const struct flow_key *k)
{
    struct vip_key vk = {};
    __builtin_memcpy(vk.addr, k->dst, 16);
    vk.port = k->dport;
    vk.proto = k->proto;
    vk.family = k->family;
    struct vip_meta *m = vips.lookup(&vk);
    if (m)
        return m;
    vk.port = 0; /* a port-0 VIP serves every port of its address */
    return vips.lookup(&vk);
}

/* Does the flow's destination still belong to the VIP this id names? (A VIP
 * deleted and its id reused must not capture the old VIP's flows.) */
static __always_inline int vip_entry_matches(const struct vip_entry *ve,
                                             const struct flow_key *k)
{
    const __u32 *a = (const __u32 *)ve->key.addr;
    const __u32 *d = (const __u32 *)k->dst;
    return ve->key.family == k->family && ve->key.proto == k->proto &&
           (ve->key.port == 0 || ve->key.port == k->dport) &&
           a[0] == d[0] && a[1] == d[1] && a[2] == d[2] && a[3] == d[3];
}

static __always_inline int is_vip_addr(const struct flow_key *k)
{
    if (!maybe_vip(k))
        return 0;
    struct vip_key vk = {};
    __builtin_memcpy(vk.addr, k->dst, 16);
    vk.family = k->family;
    return vip_addrs.lookup(&vk) != 0;
}

/* Pick the real from the VIP's live ring; 0 when the ring is empty. */
static __always_inline __u32 ring_pick(const struct vip_meta *vip, __u32 hash)
{
    if (vip->ring_size == 0 || vip->ring_slot >= RING_SLOTS)
        return 0;
    __u32 idx = vip->ring_slot * RING_MAX + hash % vip->ring_size;
    __u32 *id = rings.lookup(&idx);
    return id ? *id : 0;
}

static __always_inline void push_flow_event(const struct flow_key *k, __u32 real_id,
                                            __u32 vip_id, __u64 now)
{
    struct flow_event *ev = flow_events.ringbuf_reserve(sizeof(*ev));
    if (!ev) {
        count(ST_FLOW_EVENT_LOST);
        return;
    }
    __builtin_memcpy(&ev->key, k, sizeof(*k));
    ev->real_id = real_id;
    ev->vip_id = vip_id;
    ev->ts_ns = now;
    flow_events.ringbuf_submit(ev, 0);
}

static __always_inline __u32 embryo_check(__u32 fh, const struct conn_val *v)
{
    return fh ^ mix32(v->real_id * 0x9e3779b1 ^ v->vip_id);
}

static __always_inline int flow_key_equal(const struct flow_key *a, const struct flow_key *b)
{
    const __u64 *x = (const __u64 *)a, *y = (const __u64 *)b;
    return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3] && x[4] == y[4];
}

/* Embryos are 2-way set associative: a flow may sit in either slot of its pair
 * (a handshake loses its slot only when two younger ones share its pair). */
static __always_inline __u32 embryo_pair(__u32 fh)
{
    return (fh % (EMBRYO_TABLE_SIZE / 2)) * 2;
}

/* The flow's embryo, copied out (a valid one only), or 0; *slot says where. */
static __always_inline struct conn_val *embryo_get(const struct flow_key *k, __u32 fh,
                                                   struct conn_val *out, __u32 *slot)
{
    __u32 s = embryo_pair(fh);
    struct embryo *e = embryos.lookup(&s);
    if (!e)
        return 0;
    if (!flow_key_equal(&e->key, k)) {
        s += 1;
        e = embryos.lookup(&s);
        if (!e || !flow_key_equal(&e->key, k))
            return 0;
    }
    __builtin_memcpy(out, &e->val, sizeof(*out));
    *slot = s;
    return e->check == embryo_check(fh, out) ? out : 0;
}

/* Into the slot of the pair that holds this flow, is empty, or is the older. */
static __always_inline void embryo_put(const struct flow_key *k, __u32 fh,
                                       const struct conn_val *v)
{
    __u32 s0 = embryo_pair(fh), s1 = s0 + 1;
    struct embryo *e = embryos.lookup(&s0);
    struct embryo *e1 = embryos.lookup(&s1);
    if (!e || !e1)
        return;
    if (e->key.family && !flow_key_equal(&e->key, k) &&
        (!e1->key.family || flow_key_equal(&e1->key, k) ||
         (__s64)(e1->val.last_seen_ns - e->val.last_seen_ns) < 0))
        e = e1;
    __builtin_memcpy(&e->key, k, sizeof(*k));
    __builtin_memcpy(&e->val, v, sizeof(*v));
    e->check = embryo_check(fh, v);
}

static __always_inline void embryo_clear(__u32 slot)
{
    struct embryo *e = embryos.lookup(&slot);
    if (e)
        e->key.family = 0; /* matches no packet */
}

/* A connection's opening SYN: SYN without ACK, RST or FIN. */
static __always_inline int tcp_syn(const struct packet *p)
{
    return (p->tcp_flags & (TCP_F_SYN | TCP_F_ACK | TCP_F_RST | TCP_F_FIN)) == TCP_F_SYN;
}

/* May one more flow enter conns on this CPU this second? Counted when not. */
static __always_inline int guard_admit(__u64 now)
{
    __u32 zero = 0;
    struct flow_guard_state *g = flow_guard.lookup(&zero);
    if (!g)
        return 1;
    struct flow_guard_cfg *gc = flow_guard_cfg.lookup(&zero);
    __u64 limit = gc && gc->max_per_s ? gc->max_per_s : FLOW_GUARD_RATE;
    if (now - g->window_start_ns > ONE_SECOND_NS) {
        g->window_start_ns = now;
        g->admitted = 0;
    }
    if (g->admitted >= limit) {
        count(ST_CONN_GUARD_LIMITED);
        return 0;
    }
    g->admitted += 1;
    return 1;
}

int xdp_balancer(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct packet p = {};

    int rc = parse_packet(data, data_end, &p);
    switch (rc) {
    case P_OK:
        break;
    case P_NOT_IP:
        count(ST_PASS_NON_IP);
        return XDP_PASS;
    case P_BAD_L3:
        count(ST_PASS_MALFORMED_L3);
        return XDP_PASS;
    default:
        /* Not a flow we can steer: drop it only when it is for a VIP address
         * (so the VIP never leaks to the local stack half-handled). */
        if (!is_vip_addr(&p.key)) {
            count(ST_PASS_NON_VIP);
            return XDP_PASS;
        }
        if (rc == P_OTHER_L4) {
            count(ST_PASS_ICMP); /* pings to the VIP, NDP: the balancer answers */
            return XDP_PASS;
        }
        count(rc == P_FRAGMENT ? ST_DROP_FRAGMENT
              : rc == P_IP_OPTIONS ? ST_DROP_IP_OPTIONS
              : rc == P_IPV6_EXT ? ST_DROP_IPV6_EXT : ST_DROP_MALFORMED_L4);
        return XDP_DROP;
    }

    if (!maybe_vip(&p.key)) {
        count(p.is_icmp_err ? ST_PASS_ICMP : ST_PASS_NON_VIP);
        return XDP_PASS;
    }
    /* Established flows first: the conn entry names the VIP by id. A TCP flow
     * between its SYN and its next packet lives in embryos instead; a SYN itself
     * does not look there (a retransmitted one is picked from the ring again: the
     * same real unless the ring changed, and the lookup saved keeps new flows as
     * cheap as they were). */
    struct vip_meta *vip = 0;
    struct conn_val *cv = conns.lookup(&p.key);
    int in_main = cv != 0;
    int in_embryo = 0;
    __u32 fh = 0; /* the full 5-tuple hash: embryo slot (and ring pick unless src_only) */
    struct conn_val ev;
    __u32 eslot = 0;
    if (!cv && p.key.proto == IPPROTO_TCP) {
        fh = flow_hash(&p.key, 0);
        if (!tcp_syn(&p)) {
            cv = embryo_get(&p.key, fh, &ev, &eslot);
            in_embryo = cv != 0;
        }
    }
    if (cv) {
        __u32 vid = cv->vip_id;
        struct vip_entry *ve = vip_by_id.lookup(&vid);
        if (ve && vip_entry_matches(ve, &p.key))
            vip = &ve->meta;
        else
            cv = 0, in_main = in_embryo = 0; /* its VIP is gone: a new flow */
    }
    if (!vip)
        vip = find_vip(&p.key);
    if (!vip) {
        /* A VIP address answers only its services: the rest never reaches the
         * local stack (sync, metrics listen there). ICMP errors pass as before. */
        if (!p.is_icmp_err && is_vip_addr(&p.key)) {
            count(ST_DROP_NO_SERVICE);
            return XDP_DROP;
        }
        count(p.is_icmp_err ? ST_PASS_ICMP : ST_PASS_NON_VIP);
        return XDP_PASS;
    }
    __u32 ifindex = ctx->ingress_ifindex;
    struct own_mac *own = own_macs.lookup(&ifindex);
    if (own && own->valid && !mac_equal(own->mac, ((struct ethhdr *)data)->h_dest)) {
        count(ST_PASS_NOT_OURS); /* the kernel drops it as PACKET_OTHERHOST */
        return XDP_PASS;
    }

    __u32 zero = 0;
    struct lb_config *cfg = config.lookup(&zero);
    if (!cfg)
        return XDP_PASS;
    __u32 vip_id = vip->vip_id; /* stats_vip: only user space writes it */
    /* The flow hash is computed only where it is used (ring pick, IPv6 outer flow
     * label): an established flow in DR mode never needs it. */
    int src_only = vip->flags & VIP_F_HASH_SRC;
    __u32 hash = 0;
    int hashed = 0;
    /* The clock helper is costly (a real call on a mitigated CPU): TCP hits never
     * read it; TCP flows leave the table by LRU eviction, UDP flows (which have
     * no end) by the idle timeout. */
    __u64 now = 0;
    int new_flow = 0;
    int hit = 0;
    __u32 real_id = 0;
    struct real_def *real = 0;

    if (cv) {
        real_id = cv->real_id;
        real = reals.lookup(&real_id);
        int stale = 0;
        if (p.key.proto == IPPROTO_UDP && cfg->conn_timeout_ns) {
            now = bpf_ktime_get_coarse_ns();
            /* signed: an entry stamped ahead of our clock (synced) is not stale */
            stale = (__s64)(now - cv->last_seen_ns) > (__s64)cfg->conn_timeout_ns;
            if (!stale && (__s64)(now - cv->last_seen_ns) > (__s64)ONE_SECOND_NS)
                cv->last_seen_ns = now; /* avoid dirtying the entry on every packet */
        }
        if (real && real->family && !(real->flags & REAL_F_DOWN) && !stale) {
            hit = 1; /* counted in the real's record below */
        } else {
            real = 0; /* its real went down, or the flow idled out: reschedule */
            if (!p.is_icmp_err)
                count(ST_CONN_RESCHEDULED);
        }
    }
    if (!real) {
        hash = fh && !src_only ? fh : flow_hash(&p.key, src_only);
        hashed = 1;
        real_id = ring_pick(vip, hash);
        real = real_id ? reals.lookup(&real_id) : 0;
        if (!real || !real->family) {
            count(ST_DROP_NO_REAL);
            return XDP_DROP;
        }
    }
    /* Where the flow's state goes. ICMP errors follow their flow, never make one. */
    if (!p.is_icmp_err) {
        if (p.key.proto != IPPROTO_TCP || in_main) {
            /* UDP (no handshake: its first packet is the flow), or a TCP flow
             * already established whose real was rescheduled. */
            if (!hit) {
                now = now ? now : bpf_ktime_get_coarse_ns();
                /* the guard bounds new entries; moving a known one is no admission */
                if (in_main || guard_admit(now)) {
                    struct conn_val nv = {.real_id = real_id, .vip_id = vip_id,
                                          .last_seen_ns = now};
                    conns.update(&p.key, &nv);
                    new_flow = 1;
                    count(ST_CONN_MISS);
                    if (cfg->flags & CFG_F_FLOW_EVENTS)
                        push_flow_event(&p.key, real_id, vip_id, now);
                }
            }
        } else if (tcp_syn(&p)) {
            /* A SYN (or its retransmission) waits in embryos: nothing synced yet. */
            now = now ? now : bpf_ktime_get_coarse_ns();
            struct conn_val nv = {.real_id = real_id, .vip_id = vip_id, .last_seen_ns = now};
            embryo_put(&p.key, fh, &nv);
            new_flow = 1;
            count(ST_CONN_MISS);
        } else if (in_embryo) {
            /* Its second packet: the flow is established; promote and sync it
             * (unless the guard says too many flows arrive this second). */
            now = now ? now : bpf_ktime_get_coarse_ns();
            if (guard_admit(now)) {
                struct conn_val nv = {.real_id = real_id, .vip_id = vip_id, .last_seen_ns = now};
                conns.update(&p.key, &nv);
                embryo_clear(eslot);
                count(ST_CONN_PROMOTED);
                if (cfg->flags & CFG_F_FLOW_EVENTS)
                    push_flow_event(&p.key, real_id, vip_id, now);
            }
        } else {
            /* A non-SYN of no known flow (a flood of ACKs, or a flow this node
             * never saw the start of): the ring decides, nothing is recorded. */
            count(ST_CONN_MISS_NON_SYN);
        }
    }
    if (p.is_icmp_err)
        count(ST_ICMP_FORWARDED);

    /* One per-CPU record per packet: the real's (its VIP's sums and the global
     * conn_hit / tx_dr / tx_tun are derived from it in user space). */
    struct real_counters *rs = stats_real.lookup(&real_id);
    if (rs) {
        rs->packets += 1;
        rs->bytes += (__u32)(data_end - data);
        rs->new_flows += new_flow;
        rs->conn_hit += hit;
    }

    if (vip->flags & VIP_F_TUN) {
        if (!hashed && real->family == FAMILY_V6)
            hash = flow_hash(&p.key, src_only);
        int act = forward_tun(ctx, &p, real, cfg, hash);
        if (act < 0) {
            count(ST_DROP_ENCAP);
            return XDP_DROP;
        }
        if (rs)
            rs->tx_tun += 1;
        return act;
    }
    if (rs)
        rs->tx_dr += 1;
    return forward_dr(ctx, real);
}
