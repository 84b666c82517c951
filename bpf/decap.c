/* decap.c: for real servers in tunnel mode (the kernel here has no ipip module).
 *
 * Strips an outer IPv4 (proto 4 = IPIP, 41 = IPv6-in-IPv4) or IPv6 (nexthdr 41 /
 * 4) header addressed to this host and passes the inner packet to the stack,
 * which delivers it to the VIP held on lo. Everything else passes untouched.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/in.h>

#define ETH_P_IP_BE   0x0008
#define ETH_P_IPV6_BE 0xDD86

BPF_PERCPU_ARRAY(decap_stats, __u64, 2); /* 0: decapsulated, 1: passed */

static __always_inline int bump(__u32 i, int verdict)
{
    __u64 *c = decap_stats.lookup(&i);
    if (c)
        *c += 1;
    return verdict;
}

int xdp_decap(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return XDP_PASS;

    __u8 inner;
    int outer_len;
    if (eth->h_proto == ETH_P_IP_BE) {
        struct iphdr *ip = (void *)(eth + 1);
        if ((void *)(ip + 1) > data_end || ip->ihl != 5)
            return bump(1, XDP_PASS);
        if (ip->frag_off & bpf_htons(0x3fff))
            return bump(1, XDP_PASS);
        inner = ip->protocol;
        outer_len = sizeof(*ip);
    } else if (eth->h_proto == ETH_P_IPV6_BE) {
        struct ipv6hdr *ip6 = (void *)(eth + 1);
        if ((void *)(ip6 + 1) > data_end)
            return bump(1, XDP_PASS);
        inner = ip6->nexthdr;
        outer_len = sizeof(*ip6);
    } else {
        return XDP_PASS;
    }
    __be16 type;
    if (inner == 4)
        type = ETH_P_IP_BE;
    else if (inner == 41)
        type = ETH_P_IPV6_BE;
    else
        return bump(1, XDP_PASS);

    /* Move the Ethernet header forward over the outer IP header. */
    struct ethhdr old;
    __builtin_memcpy(&old, eth, sizeof(old));
    if (bpf_xdp_adjust_head(ctx, outer_len))
        return bump(1, XDP_PASS);
    data = (void *)(long)ctx->data;
    data_end = (void *)(long)ctx->data_end;
    eth = data;
    if ((void *)(eth + 1) > data_end)
        return XDP_DROP;
    __builtin_memcpy(eth, &old, sizeof(old));
    eth->h_proto = type;
    return bump(0, XDP_PASS);
}
