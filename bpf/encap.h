/* encap.h: forwarding rewrites. Both return XDP_TX on success.
 *
 * DR: the real holds the VIP on lo; only the MACs change. The new source is the
 * old destination (our own MAC, the frame was sent to us), so the bridge/switch
 * never learns the client's MAC on the balancer's port.
 *
 * TUN: push an outer IPv4 (IPIP, proto 4 / IPv6-in-IPv4, proto 41) or IPv6
 * (nexthdr 41 / 4) header in front of the packet, keeping the L2 header. */
#pragma once

static __always_inline void set_macs(struct ethhdr *eth, const __u8 *dst_mac)
{
    __builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
    __builtin_memcpy(eth->h_dest, dst_mac, ETH_ALEN);
}

static __always_inline int forward_dr(struct xdp_md *ctx, const struct real_def *real)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return XDP_DROP;
    set_macs(eth, real->mac);
    return XDP_TX;
}

static __always_inline int forward_tun(struct xdp_md *ctx, const struct packet *p,
                                       const struct real_def *real, const struct lb_config *cfg,
                                       __u32 hash)
{
    /* Keep the L2 header (Ethernet + optional VLAN tag) to write it back in front. */
    __u8 l2[18];
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    if (data + 18 > data_end && p->l2_len == 18)
        return XDP_DROP;
    if (data + 14 > data_end)
        return XDP_DROP;
    __builtin_memcpy(l2, data, 14);
    if (p->l2_len == 18) {
        if (data + 18 > data_end)
            return XDP_DROP;
        __builtin_memcpy(l2 + 14, data + 14, 4);
    }
    __u8 inner_proto = p->key.family == FAMILY_V4 ? IPPROTO_IPIP_ : IPPROTO_IPV6_;
    int outer_len = real->family == FAMILY_V4 ? sizeof(struct iphdr) : sizeof(struct ipv6hdr);

    if (bpf_xdp_adjust_head(ctx, -outer_len))
        return -1;
    data = (void *)(long)ctx->data;
    data_end = (void *)(long)ctx->data_end;

    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return XDP_DROP;
    __builtin_memcpy(eth->h_source, l2, ETH_ALEN); /* old dst = our MAC */
    __builtin_memcpy(eth->h_dest, real->mac, ETH_ALEN);
    __be16 outer_type = real->family == FAMILY_V4 ? ETH_P_IP_BE : ETH_P_IPV6_BE;
    void *l3;
    if (p->l2_len == 18) {
        struct vlan_hdr_ *vh = data + 14;
        if ((void *)(vh + 1) > data_end)
            return XDP_DROP;
        eth->h_proto = *(__be16 *)(l2 + 12); /* the 802.1Q TPID */
        vh->tci = *(__be16 *)(l2 + 14);
        vh->proto = outer_type;
        l3 = data + 18;
    } else {
        eth->h_proto = outer_type;
        l3 = data + 14;
    }

    if (real->family == FAMILY_V4) {
        struct iphdr *ip = l3;
        if ((void *)(ip + 1) > data_end)
            return XDP_DROP;
        ip->version = 4;
        ip->ihl = 5;
        ip->tos = p->tos;
        ip->tot_len = bpf_htons(p->ip_len + sizeof(*ip));
        ip->id = 0;
        ip->frag_off = 0;
        ip->ttl = 64;
        ip->protocol = inner_proto;
        ip->check = 0;
        ip->saddr = cfg->tun_src4;
        __builtin_memcpy(&ip->daddr, real->addr, 4);
        ip->check = ipv4_hdr_csum(ip);
    } else {
        struct ipv6hdr *ip6 = l3;
        if ((void *)(ip6 + 1) > data_end)
            return XDP_DROP;
        /* flow label from the flow hash: entropy for ECMP/RSS on the way */
        *(__be32 *)ip6 = bpf_htonl((6 << 28) | ((__u32)p->tos << 20) | (hash & 0xfffff));
        ip6->payload_len = bpf_htons(p->ip_len);
        ip6->nexthdr = inner_proto;
        ip6->hop_limit = 64;
        __builtin_memcpy(&ip6->saddr, cfg->tun_src6, 16);
        __builtin_memcpy(&ip6->daddr, real->addr, 16);
    }
    return XDP_TX;
}
