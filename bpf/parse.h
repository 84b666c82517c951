/* parse.h: Ethernet (+ one 802.1Q tag), IPv4 without options, IPv6 without
 * extension headers, TCP, UDP, and the inner header of ICMP errors. */
#pragma once

#define ETH_P_8021Q_BE  0x0081 /* htons(0x8100) */
#define ETH_P_8021AD_BE 0xA888 /* htons(0x88A8) */
#define ETH_P_IP_BE     0x0008
#define ETH_P_IPV6_BE   0xDD86

#define IPPROTO_IPIP_   4
#define IPPROTO_IPV6_   41

struct vlan_hdr_ {
    __be16 tci;
    __be16 proto;
};

enum parse_result {
    P_OK = 0,
    P_NOT_IP,
    P_BAD_L3,     /* truncated / inconsistent IP header */
    P_BAD_L4,     /* transport header missing or truncated */
    P_FRAGMENT,
    P_IP_OPTIONS,
    P_IPV6_EXT,
    P_OTHER_L4,   /* neither TCP, UDP nor an ICMP error we follow */
};

struct packet {
    struct flow_key key; /* the flow as the balancer sees it (client -> VIP) */
    __u32 l2_len;        /* 14 or 18 */
    __u32 ip_len;        /* bytes of IP packet per its header (what we tunnel) */
    __u8 tos;            /* IPv4 TOS / IPv6 traffic class, copied to the outer header */
    __u8 is_icmp_err;    /* key was read from an ICMP error's inner header */
    __u8 tcp_flags;      /* TCP flags byte (FIN 0x01, SYN 0x02, RST 0x04, ACK 0x10); 0 otherwise */
};

#define TCP_F_FIN 0x01
#define TCP_F_SYN 0x02
#define TCP_F_RST 0x04
#define TCP_F_ACK 0x10

/* The flags byte of a TCP header at l4 (ports already checked to fit). */
static __always_inline __u8 tcp_flags_at(void *l4, void *data_end)
{
    struct tcphdr *th = l4;
    if ((void *)(th + 1) > data_end)
        return 0;
    return ((__u8 *)th)[13];
}

static __always_inline int parse_ports(void *l4, void *data_end, __u8 proto,
                                       __be16 *sport, __be16 *dport, int ports_only)
{
    /* TCP and UDP both start with the two ports. An ICMP error quotes only the
     * first 8 bytes of the transport header (RFC 792), so there ports suffice. */
    if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
        return P_OTHER_L4;
    if (ports_only) {
        if (l4 + 4 > data_end)
            return P_BAD_L4;
    } else if (proto == IPPROTO_TCP) {
        if (l4 + sizeof(struct tcphdr) > data_end)
            return P_BAD_L4;
    } else if (l4 + sizeof(struct udphdr) > data_end) {
        return P_BAD_L4;
    }
    __be16 *ports = l4;
    *sport = ports[0];
    *dport = ports[1];
    return P_OK;
}

/* ICMP "fragmentation needed" about a VIP flow: its inner header is the
 * balancer-side packet VIP -> client; turn it back into client -> VIP. */
static __always_inline int parse_icmp4_inner(void *icmp, void *data_end, struct packet *p)
{
    struct icmphdr *ic = icmp;
    if ((void *)(ic + 1) > data_end)
        return P_BAD_L4;
    if (ic->type != 3 /* ICMP_DEST_UNREACH */ || ic->code != 4 /* ICMP_FRAG_NEEDED */)
        return P_OTHER_L4;
    struct iphdr *in = (void *)(ic + 1);
    if ((void *)(in + 1) > data_end)
        return P_BAD_L4;
    if (in->ihl != 5)
        return P_OTHER_L4;
    __be16 sport, dport;
    int rc = parse_ports((void *)(in + 1), data_end, in->protocol, &sport, &dport, 1);
    if (rc != P_OK)
        return rc;
    __builtin_memset(&p->key, 0, sizeof(p->key));
    __builtin_memcpy(p->key.src, &in->daddr, 4);
    __builtin_memcpy(p->key.dst, &in->saddr, 4);
    p->key.sport = dport;
    p->key.dport = sport;
    p->key.proto = in->protocol;
    p->key.family = FAMILY_V4;
    p->is_icmp_err = 1;
    return P_OK;
}

static __always_inline int parse_icmp6_inner(void *icmp, void *data_end, struct packet *p)
{
    struct icmp6hdr *ic = icmp;
    if ((void *)(ic + 1) > data_end)
        return P_BAD_L4;
    if (ic->icmp6_type != 2 /* ICMPV6_PKT_TOOBIG */)
        return P_OTHER_L4;
    struct ipv6hdr *in = (void *)(ic + 1);
    if ((void *)(in + 1) > data_end)
        return P_BAD_L4;
    __be16 sport, dport;
    int rc = parse_ports((void *)(in + 1), data_end, in->nexthdr, &sport, &dport, 1);
    if (rc != P_OK)
        return rc;
    __builtin_memcpy(p->key.src, &in->daddr, 16);
    __builtin_memcpy(p->key.dst, &in->saddr, 16);
    p->key.sport = dport;
    p->key.dport = sport;
    p->key.proto = in->nexthdr;
    p->key.family = FAMILY_V6;
    p->key.pad[0] = p->key.pad[1] = 0;
    p->is_icmp_err = 1;
    return P_OK;
}

static __always_inline int parse_ipv4(void *l3, void *data_end, struct packet *p)
{
    struct iphdr *iph = l3;
    if ((void *)(iph + 1) > data_end)
        return P_BAD_L3;
    if (iph->version != 4 || iph->ihl < 5)
        return P_BAD_L3;
    __u16 tot = bpf_ntohs(iph->tot_len);
    if (tot < iph->ihl * 4 || l3 + tot > data_end)
        return P_BAD_L3;
    p->ip_len = tot;
    p->tos = iph->tos;
    p->key.family = FAMILY_V4;
    __builtin_memcpy(p->key.src, &iph->saddr, 4);
    __builtin_memcpy(p->key.dst, &iph->daddr, 4);
    p->key.proto = iph->protocol;
    if (iph->ihl != 5)
        return P_IP_OPTIONS;
    if (iph->frag_off & bpf_htons(0x3fff)) /* MF or an offset */
        return P_FRAGMENT;
    if (iph->protocol == IPPROTO_ICMP)
        return parse_icmp4_inner((void *)(iph + 1), data_end, p);
    int rc = parse_ports((void *)(iph + 1), data_end, iph->protocol, &p->key.sport,
                         &p->key.dport, 0);
    if (rc == P_OK && iph->protocol == IPPROTO_TCP)
        p->tcp_flags = tcp_flags_at((void *)(iph + 1), data_end);
    return rc;
}

static __always_inline int parse_ipv6(void *l3, void *data_end, struct packet *p)
{
    struct ipv6hdr *ip6 = l3;
    if ((void *)(ip6 + 1) > data_end)
        return P_BAD_L3;
    if (ip6->version != 6)
        return P_BAD_L3;
    __u32 tot = bpf_ntohs(ip6->payload_len) + sizeof(*ip6);
    if (l3 + tot > data_end)
        return P_BAD_L3;
    p->ip_len = tot;
    p->tos = (ip6->priority << 4) | (ip6->flow_lbl[0] >> 4);
    p->key.family = FAMILY_V6;
    __builtin_memcpy(p->key.src, &ip6->saddr, 16);
    __builtin_memcpy(p->key.dst, &ip6->daddr, 16);
    p->key.proto = ip6->nexthdr;
    int rc;
    switch (ip6->nexthdr) {
    case IPPROTO_TCP:
    case IPPROTO_UDP:
        rc = parse_ports((void *)(ip6 + 1), data_end, ip6->nexthdr,
                         &p->key.sport, &p->key.dport, 0);
        if (rc == P_OK && ip6->nexthdr == IPPROTO_TCP)
            p->tcp_flags = tcp_flags_at((void *)(ip6 + 1), data_end);
        return rc;
    case IPPROTO_ICMPV6:
        return parse_icmp6_inner((void *)(ip6 + 1), data_end, p);
    case 0: case 43: case 44: case 50: case 51: case 60: case 135: case 139: case 140:
        return P_IPV6_EXT;
    default:
        return P_OTHER_L4;
    }
}

static __always_inline int parse_packet(void *data, void *data_end, struct packet *p)
{
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return P_NOT_IP;
    __be16 proto = eth->h_proto;
    __u32 off = sizeof(*eth);
    if (proto == ETH_P_8021Q_BE || proto == ETH_P_8021AD_BE) {
        struct vlan_hdr_ *vh = data + off;
        if ((void *)(vh + 1) > data_end)
            return P_NOT_IP;
        proto = vh->proto;
        off += sizeof(*vh);
    }
    p->l2_len = off;
    if (proto == ETH_P_IP_BE)
        return parse_ipv4(data + off, data_end, p);
    if (proto == ETH_P_IPV6_BE)
        return parse_ipv6(data + off, data_end, p);
    return P_NOT_IP;
}
