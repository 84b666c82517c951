/* floors.c: fixed floor programs for bench/pps.py (README: Benchmarks).
 *
 * The least a balancer of our shape must do per packet, written once and never
 * tuned with the balancer, so that "our cost / floor cost" measured in the same
 * rounds says how close we are, whatever the machine's speed that day:
 *   floor_parse  parse Ethernet/IPv4/TCP into a 40-byte 5-tuple key, XDP_PASS
 *   floor_dr     the same + one lookup of that key in an LRU hash, MAC rewrite, XDP_TX
 *   floor_tun    floor_dr + pushing an IPIP header (checksummed), XDP_TX
 *   floor_new    parse + one insert of the (fresh) key into the LRU hash, XDP_TX
 * The key has 16-byte addresses (Katran's flow key, and l4lb's today): a balancer
 * with a smaller key can go below 1.0. Self-contained: no l4lb header included.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>

#ifndef FLOOR_TABLE_SIZE
#define FLOOR_TABLE_SIZE 1048576
#endif

struct floor_key {
    __u8 src[16];
    __u8 dst[16];
    __be16 sport;
    __be16 dport;
    __u8 proto;
    __u8 family;
    __u8 pad[2];
};

struct floor_val {
    __u8 mac[6];   /* the next hop's MAC */
    __u8 pad[2];
    __u32 real;    /* IPIP outer destination */
    __u64 ts;
};

BPF_TABLE("lru_hash", struct floor_key, struct floor_val, floor_conns, FLOOR_TABLE_SIZE);

/* 0 and the key filled in, or -1 for anything but an option-less IPv4 TCP frame. */
static __always_inline int floor_parse_key(void *data, void *data_end, struct floor_key *k)
{
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
        return -1;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > data_end || ip->ihl != 5 || ip->protocol != IPPROTO_TCP)
        return -1;
    struct tcphdr *th = (void *)(ip + 1);
    if ((void *)(th + 1) > data_end)
        return -1;
    __builtin_memcpy(k->src, &ip->saddr, 4);
    __builtin_memcpy(k->dst, &ip->daddr, 4);
    k->sport = th->source;
    k->dport = th->dest;
    k->proto = IPPROTO_TCP;
    k->family = 4;
    return 0;
}

int floor_parse(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct floor_key k = {};
    if (floor_parse_key(data, data_end, &k))
        return XDP_DROP;
    return XDP_PASS;
}

int floor_dr(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct floor_key k = {};
    if (floor_parse_key(data, data_end, &k))
        return XDP_DROP;
    struct floor_val *v = floor_conns.lookup(&k);
    if (!v)
        return XDP_DROP; /* the bench installs every flow first: a miss is an error */
    struct ethhdr *eth = data;
    __builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
    __builtin_memcpy(eth->h_dest, v->mac, ETH_ALEN);
    return XDP_TX;
}

int floor_tun(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct floor_key k = {};
    if (floor_parse_key(data, data_end, &k))
        return XDP_DROP;
    struct floor_val *v = floor_conns.lookup(&k);
    if (!v)
        return XDP_DROP;
    struct ethhdr *eth = data;
    struct iphdr *inner = (void *)(eth + 1);
    if ((void *)(inner + 1) > data_end)
        return XDP_DROP;
    __u16 inner_len = inner->tot_len;
    __u8 tos = inner->tos;
    __u8 our_mac[ETH_ALEN];
    __builtin_memcpy(our_mac, eth->h_dest, ETH_ALEN);
    __u32 real = v->real;
    __u8 mac[ETH_ALEN];
    __builtin_memcpy(mac, v->mac, ETH_ALEN);
    if (bpf_xdp_adjust_head(ctx, -(int)sizeof(struct iphdr)))
        return XDP_DROP;
    data = (void *)(long)ctx->data;
    data_end = (void *)(long)ctx->data_end;
    eth = data;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > data_end)
        return XDP_DROP;
    __builtin_memcpy(eth->h_source, our_mac, ETH_ALEN);
    __builtin_memcpy(eth->h_dest, mac, ETH_ALEN);
    eth->h_proto = bpf_htons(ETH_P_IP);
    ip->version = 4;
    ip->ihl = 5;
    ip->tos = tos;
    ip->tot_len = bpf_htons(bpf_ntohs(inner_len) + sizeof(*ip));
    ip->id = 0;
    ip->frag_off = 0;
    ip->ttl = 64;
    ip->protocol = IPPROTO_IPIP;
    ip->check = 0;
    ip->saddr = bpf_htonl(0x0ac80002); /* 10.200.0.2 */
    ip->daddr = real;
    __u16 *w = (__u16 *)ip;
    __u32 sum = 0;
#pragma unroll
    for (int i = 0; i < 10; i++)
        sum += w[i];
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    ip->check = (__u16)~sum;
    return XDP_TX;
}

int floor_new(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct floor_key k = {};
    if (floor_parse_key(data, data_end, &k))
        return XDP_DROP;
    struct floor_val v = {.mac = {0x02, 0x99, 0x00, 0x01, 0x00, 0x01}, .real = bpf_htonl(0x0ac80101)};
    if (floor_conns.update(&k, &v))
        return XDP_DROP;
    return XDP_TX;
}

/* xdp_relay (bench/throughput.py): the floor of "an XDP hop in this lab", used
 * in place of the balancer on a lab node. IPv4 frames to RELAY_VIP addressed to
 * RELAY_OWN_MAC leave again by XDP_TX with RELAY_REAL_MAC as destination and our
 * MAC as source; everything else (ARP, the node's own traffic) passes. No table,
 * no counters: what remains of l4lb's gap over this is in our program. */
#ifndef RELAY_VIP
#define RELAY_VIP 0 /* IPv4 address, host order */
#endif
#ifndef RELAY_OWN_MAC
#define RELAY_OWN_MAC 0, 0, 0, 0, 0, 0
#endif
#ifndef RELAY_REAL_MAC
#define RELAY_REAL_MAC 0, 0, 0, 0, 0, 0
#endif

int xdp_relay(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
        return XDP_PASS;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > data_end || ip->daddr != bpf_htonl(RELAY_VIP))
        return XDP_PASS;
    const __u8 own[ETH_ALEN] = {RELAY_OWN_MAC}, real[ETH_ALEN] = {RELAY_REAL_MAC};
#pragma unroll
    for (int i = 0; i < ETH_ALEN; i++)
        if (eth->h_dest[i] != own[i])
            return XDP_PASS;
    __builtin_memcpy(eth->h_source, own, ETH_ALEN);
    __builtin_memcpy(eth->h_dest, real, ETH_ALEN);
    return XDP_TX;
}
