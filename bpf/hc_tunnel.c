/* hc_tunnel.c: health checks through the tunnel, for VIPs in tunnel mode (tc, on
 * the balancer's own interfaces).
 *
 * A probe is an ordinary TCP socket connected to the real's own address (always
 * routable, its MAC resolved by the kernel) and marked with SO_MARK
 * HC_MARK_TAG | real id. On egress, tc_hc_egress turns every packet of such a
 * socket into what the balancer sends for a client: the inner destination becomes
 * the VIP, and an outer IPIP / IP6IP6 header to the real is pushed in front. A real
 * without decap never sees a packet to the VIP, so its check fails.
 *
 * The real answers from the VIP straight to this node (DSR). On ingress,
 * tc_hc_ingress gives such replies back the real's address as their source,
 * before IP routing: the socket sees the peer it connected to, and a node that
 * holds the VIP itself does not drop them as martians (no accept_local needed).
 * The flows of probes are remembered in hc_flows (LRU) by (VIP, port, local port).
 *
 * The kernel here has no ipip module: the encapsulation is bpf_skb_adjust_room.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>

#include "csum.h"

#define ETH_P_IP_BE   0x0008
#define ETH_P_IPV6_BE 0xDD86
#define HC_MARK_MASK  0xff000000
#define HC_MARK_TAG   0x4c000000 /* 'L': l4lb/dataplane/maps.py HC_MARK_TAG */

/* mark -> the VIP a probe of that (VIP, real) is addressed to */
struct hc_tunnel {
    __u8 vip[16]; /* IPv4 in the first 4 bytes */
    __u8 family;  /* 4 or 6: the VIP's, the real's and the probe's */
    __u8 pad[3];
};

/* A probe's flow as the reply names it: (VIP, VIP port, our port) -> the real. */
struct hc_flow_key {
    __u8 vip[16];
    __be16 vport;
    __be16 lport;
    __u8 family;
    __u8 pad[3];
};

struct hc_flow_val {
    __u8 real[16];
};

BPF_HASH(hc_tunnels, __u32, struct hc_tunnel, 65536);
BPF_TABLE("lru_hash", struct hc_flow_key, struct hc_flow_val, hc_flows, 16384);
/* 0 encapsulated, 1 marked but no tunnel (dropped), 2 errors, 3 replies rewritten */
BPF_PERCPU_ARRAY(hc_stats, __u64, 4);

static __always_inline int bump(__u32 i, int verdict)
{
    __u64 *c = hc_stats.lookup(&i);
    if (c)
        *c += 1;
    return verdict;
}

#define ETH_LEN 14
#define IP4_DST (ETH_LEN + offsetof(struct iphdr, daddr))
#define IP4_SRC (ETH_LEN + offsetof(struct iphdr, saddr))
#define IP4_CSUM (ETH_LEN + offsetof(struct iphdr, check))
#define TCP4 (ETH_LEN + sizeof(struct iphdr))
#define IP6_DST (ETH_LEN + offsetof(struct ipv6hdr, daddr))
#define IP6_SRC (ETH_LEN + offsetof(struct ipv6hdr, saddr))
#define TCP6 (ETH_LEN + sizeof(struct ipv6hdr))

int tc_hc_egress(struct __sk_buff *skb)
{
    __u32 mark = skb->mark;
    if ((mark & HC_MARK_MASK) != HC_MARK_TAG)
        return TC_ACT_OK;
    struct hc_tunnel *t = hc_tunnels.lookup(&mark);
    if (!t) /* a probe for a tunnel we no longer know: never send it in the clear */
        return bump(1, TC_ACT_SHOT);

    struct hc_flow_key fk = {};
    struct hc_flow_val fv = {};
    __u8 iph[40] = {};
    __u32 inner_len = skb->len - ETH_LEN;
    __u64 flags;
    int outer_len, tcp_off;
    __u16 ports[2];

    __builtin_memcpy(fk.vip, t->vip, 16);
    fk.family = t->family;
    if (skb->protocol == ETH_P_IP_BE && t->family == 4) {
        __u8 ihl;
        if (bpf_skb_load_bytes(skb, ETH_LEN, &ihl, 1) || (ihl & 0x0f) != 5)
            return bump(2, TC_ACT_SHOT);
        __u8 proto;
        if (bpf_skb_load_bytes(skb, ETH_LEN + offsetof(struct iphdr, protocol), &proto, 1) ||
            proto != IPPROTO_TCP)
            return bump(2, TC_ACT_SHOT);
        __be32 real, vip;
        if (bpf_skb_load_bytes(skb, IP4_DST, &real, 4))
            return bump(2, TC_ACT_SHOT);
        __builtin_memcpy(&vip, t->vip, 4);
        __builtin_memcpy(fv.real, &real, 4);
        tcp_off = TCP4;
        /* destination real -> VIP: TCP pseudo-header and IP header checksums */
        if (bpf_l4_csum_replace(skb, TCP4 + offsetof(struct tcphdr, check), real, vip,
                                BPF_F_PSEUDO_HDR | 4) ||
            bpf_l3_csum_replace(skb, IP4_CSUM, real, vip, 4) ||
            bpf_skb_store_bytes(skb, IP4_DST, &vip, 4, 0))
            return bump(2, TC_ACT_SHOT);
        /* outer IPv4: from the probe's own source, to the real */
        struct iphdr *o = (struct iphdr *)iph;
        o->version = 4;
        o->ihl = 5;
        o->tot_len = bpf_htons(inner_len + sizeof(struct iphdr));
        o->ttl = 64;
        o->protocol = IPPROTO_IPIP;
        if (bpf_skb_load_bytes(skb, IP4_SRC, &o->saddr, 4))
            return bump(2, TC_ACT_SHOT);
        o->daddr = real;
        o->check = ipv4_hdr_csum(o);
        outer_len = sizeof(struct iphdr);
        flags = BPF_F_ADJ_ROOM_ENCAP_L3_IPV4;
    } else if (skb->protocol == ETH_P_IPV6_BE && t->family == 6) {
        __u8 nexthdr;
        if (bpf_skb_load_bytes(skb, ETH_LEN + offsetof(struct ipv6hdr, nexthdr), &nexthdr, 1) ||
            nexthdr != IPPROTO_TCP)
            return bump(2, TC_ACT_SHOT);
        __u32 real[4], vip[4];
        if (bpf_skb_load_bytes(skb, IP6_DST, real, 16))
            return bump(2, TC_ACT_SHOT);
        __builtin_memcpy(vip, t->vip, 16);
        __builtin_memcpy(fv.real, real, 16);
        tcp_off = TCP6;
        __s64 diff = bpf_csum_diff(real, 16, vip, 16, 0);
        if (diff < 0 ||
            bpf_l4_csum_replace(skb, TCP6 + offsetof(struct tcphdr, check), 0, diff,
                                BPF_F_PSEUDO_HDR) ||
            bpf_skb_store_bytes(skb, IP6_DST, vip, 16, 0))
            return bump(2, TC_ACT_SHOT);
        struct ipv6hdr *o = (struct ipv6hdr *)iph;
        o->version = 6;
        o->payload_len = bpf_htons(inner_len);
        o->nexthdr = IPPROTO_IPV6;
        o->hop_limit = 64;
        if (bpf_skb_load_bytes(skb, IP6_SRC, &o->saddr, 16))
            return bump(2, TC_ACT_SHOT);
        __builtin_memcpy(&o->daddr, real, 16);
        outer_len = sizeof(struct ipv6hdr);
        flags = BPF_F_ADJ_ROOM_ENCAP_L3_IPV6;
    } else {
        return bump(2, TC_ACT_SHOT);
    }
    if (bpf_skb_load_bytes(skb, tcp_off, ports, 4))
        return bump(2, TC_ACT_SHOT);
    fk.lport = ports[0];
    fk.vport = ports[1];
    hc_flows.update(&fk, &fv);

    if (bpf_skb_adjust_room(skb, outer_len, BPF_ADJ_ROOM_MAC, flags))
        return bump(2, TC_ACT_SHOT);
    if (outer_len == sizeof(struct iphdr)) {
        if (bpf_skb_store_bytes(skb, ETH_LEN, iph, sizeof(struct iphdr), 0))
            return bump(2, TC_ACT_SHOT);
    } else if (bpf_skb_store_bytes(skb, ETH_LEN, iph, sizeof(struct ipv6hdr), 0)) {
        return bump(2, TC_ACT_SHOT);
    }
    return bump(0, TC_ACT_OK);
}

int tc_hc_ingress(struct __sk_buff *skb)
{
    struct hc_flow_key fk = {};
    __u16 ports[2];
    if (skb->protocol == ETH_P_IP_BE) {
        __u8 vihl, proto;
        if (bpf_skb_load_bytes(skb, ETH_LEN, &vihl, 1) || vihl != 0x45)
            return TC_ACT_OK;
        if (bpf_skb_load_bytes(skb, ETH_LEN + offsetof(struct iphdr, protocol), &proto, 1) ||
            proto != IPPROTO_TCP)
            return TC_ACT_OK;
        if (bpf_skb_load_bytes(skb, IP4_SRC, fk.vip, 4) ||
            bpf_skb_load_bytes(skb, TCP4, ports, 4))
            return TC_ACT_OK;
        fk.family = 4;
    } else if (skb->protocol == ETH_P_IPV6_BE) {
        __u8 nexthdr;
        if (bpf_skb_load_bytes(skb, ETH_LEN + offsetof(struct ipv6hdr, nexthdr), &nexthdr, 1) ||
            nexthdr != IPPROTO_TCP)
            return TC_ACT_OK;
        if (bpf_skb_load_bytes(skb, IP6_SRC, fk.vip, 16) ||
            bpf_skb_load_bytes(skb, TCP6, ports, 4))
            return TC_ACT_OK;
        fk.family = 6;
    } else {
        return TC_ACT_OK;
    }
    fk.vport = ports[0];
    fk.lport = ports[1];
    struct hc_flow_val *fv = hc_flows.lookup(&fk);
    if (!fv)
        return TC_ACT_OK;
    if (fk.family == 4) {
        __be32 vip, real;
        __builtin_memcpy(&vip, fk.vip, 4);
        __builtin_memcpy(&real, fv->real, 4);
        if (bpf_l4_csum_replace(skb, TCP4 + offsetof(struct tcphdr, check), vip, real,
                                BPF_F_PSEUDO_HDR | 4) ||
            bpf_l3_csum_replace(skb, IP4_CSUM, vip, real, 4) ||
            bpf_skb_store_bytes(skb, IP4_SRC, &real, 4, 0))
            return bump(2, TC_ACT_OK);
    } else {
        __u32 vip[4], real[4];
        __builtin_memcpy(vip, fk.vip, 16);
        __builtin_memcpy(real, fv->real, 16);
        __s64 diff = bpf_csum_diff(vip, 16, real, 16, 0);
        if (diff < 0 ||
            bpf_l4_csum_replace(skb, TCP6 + offsetof(struct tcphdr, check), 0, diff,
                                BPF_F_PSEUDO_HDR) ||
            bpf_skb_store_bytes(skb, IP6_SRC, real, 16, 0))
            return bump(2, TC_ACT_OK);
    }
    return bump(3, TC_ACT_OK);
}
