/* baseline.c: the benchmark baselines (README: Benchmarks), and the XDP_PASS program a
 * veth peer needs so that native XDP_TX frames reach it. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>

int xdp_pass(struct xdp_md *ctx)
{
    return XDP_PASS;
}

/* Swap source and destination MAC and send back: the cheapest XDP_TX. */
int xdp_tx_swap(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return XDP_DROP;
    __u8 tmp[ETH_ALEN];
    __builtin_memcpy(tmp, eth->h_source, ETH_ALEN);
    __builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
    __builtin_memcpy(eth->h_dest, tmp, ETH_ALEN);
    return XDP_TX;
}
