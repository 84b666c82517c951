/* csum.h: checksums the encapsulation needs. */
#pragma once

static __always_inline __u16 csum_fold32(__u32 sum)
{
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    return (__u16)~sum;
}

/* Header checksum of a fresh 20-byte IPv4 header (no options), check = 0. */
static __always_inline __u16 ipv4_hdr_csum(struct iphdr *iph)
{
    __u16 *p = (__u16 *)iph;
    __u32 sum = 0;
#pragma unroll
    for (int i = 0; i < 10; i++)
        sum += p[i];
    return csum_fold32(sum);
}
