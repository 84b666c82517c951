/* maps.h: every map and struct the XDP balancer shares with user space.
 *
 * l4lb/dataplane/maps.py is the one Python mirror of these layouts; change both
 * together and bump LAYOUT_VERSION there (pins live under .../v<LAYOUT_VERSION>/,
 * because bcc reopens a pinned map without checking its layout).
 */
#pragma once

#ifndef MAX_VIPS
#define MAX_VIPS 64
#endif
#ifndef MAX_REALS
#define MAX_REALS 4096
#endif
#ifndef RING_MAX
#define RING_MAX 65537
#endif
#ifndef CONN_TABLE_SIZE
#define CONN_TABLE_SIZE 1048576
#endif
/* TCP flows wait in embryos from their SYN until their next packet (the
 * handshake's ACK) promotes them into conns: a SYN flood churns only embryos. */
#ifndef EMBRYO_TABLE_SIZE
#define EMBRYO_TABLE_SIZE (CONN_TABLE_SIZE / 8 > 1024 ? CONN_TABLE_SIZE / 8 : 1024)
#endif
/* Admissions into conns (TCP promotions, new UDP flows) per CPU and second when
 * flow_guard_cfg holds 0; beyond it flows are forwarded by the ring, no entry. */
#ifndef FLOW_GUARD_RATE
#define FLOW_GUARD_RATE 10000
#endif
#ifndef CONN_TABLE_FLAGS
#define CONN_TABLE_FLAGS 0 /* BPF_F_NO_COMMON_LRU (2) for per-CPU LRU lists */
#endif
/* Two ring slots per VIP: the control plane fills the idle one, then flips the
 * VIP's ring_slot in one map update, so lookups never see a half-written ring. */
#define RING_SLOTS (2 * MAX_VIPS)

/* Pinned maps survive a restart of the control plane (and keep the conn table);
 * tests compile without PIN_DIR and get private maps. */
#ifdef PIN_DIR
#define L4LB_MAP(type, key, val, name, size, flags) \
    BPF_TABLE_PINNED(type, key, val, name, size, PIN_DIR "/" #name, flags)
#else
#define L4LB_MAP(type, key, val, name, size, flags) \
    BPF_F_TABLE(type, key, val, name, size, flags)
#endif

#define FAMILY_V4 4
#define FAMILY_V6 6

/* A virtual service: address (IPv4 in the first 4 bytes, rest zero), port in
 * network order (0 = every port), IP protocol, family. */
struct vip_key {
    __u8 addr[16];
    __be16 port;
    __u8 proto;
    __u8 family;
};

#define VIP_F_HASH_SRC 0x1 /* Maglev index from the client address only */
#define VIP_F_TUN      0x2 /* IP-in-IP / IP6-in-IP6 instead of MAC rewrite */

struct vip_meta {
    __u32 vip_id;    /* index into stats_vip */
    __u32 flags;     /* VIP_F_* */
    __u32 ring_slot; /* which of rings' slots is live */
    __u32 ring_size; /* M, prime, <= RING_MAX */
};

/* The live settings of each VIP by id, with its key (family 0 = unused): an
 * established flow reaches its VIP from the conn entry's vip_id by an inlined
 * array lookup, instead of one or two hash lookups by key. */
struct vip_entry {
    struct vip_key key;
    struct vip_meta meta;
};

#define REAL_F_DOWN 0x1 /* failed health check: its flows are rescheduled */

/* A real server of one VIP (ids are per VIP and real address). mac is the
 * next hop: the real itself in DR mode, the real or a router in tunnel mode. */
struct real_def {
    __u8 addr[16];
    __u8 mac[6];
    __u8 family;
    __u8 flags;
};

/* The conn-table key: the packet's 5-tuple as seen by the balancer. */
struct flow_key {
    __u8 src[16];
    __u8 dst[16];
    __be16 sport;
    __be16 dport;
    __u8 proto;
    __u8 family;
    __u8 pad[2];
};

struct conn_val {
    __u32 real_id;
    __u32 vip_id;
    __u64 last_seen_ns; /* coarse clock, refreshed at most once a second */
};

#define CFG_F_FLOW_EVENTS 0x1 /* push new flows to the ring buffer (sync) */

struct lb_config {
    __u8 tun_src6[16];       /* outer source of IP6IP6 / IPv4-in-IPv6 */
    __be32 tun_src4;         /* outer source of IPIP */
    __u32 flags;             /* CFG_F_* */
    __u64 conn_timeout_ns;   /* idle flows older than this are rescheduled; 0 = never */
};

struct counters {
    __u64 packets;
    __u64 bytes;
    __u64 new_flows;
};

/* Per real, per CPU: the one record an established flow's packet touches. Its
 * packets also count for the real's VIP and its hits and transmits for the
 * global reasons: user space sums them (stats_vip and stats_global's conn_hit,
 * tx_dr and tx_tun only keep what freed real ids had counted). */
struct real_counters {
    __u64 packets;
    __u64 bytes;
    __u64 new_flows;
    __u64 conn_hit;
    __u64 tx_dr;
    __u64 tx_tun;
};

/* Verdicts and reasons, counted per CPU in stats_global. */
enum stat_reason {
    ST_PASS_NON_IP = 0,    /* not IPv4/IPv6 (ARP, LLDP, ...) */
    ST_PASS_NON_VIP,       /* IP, but not for a VIP */
    ST_PASS_MALFORMED_L3,  /* IP header truncated or inconsistent: left to the kernel */
    ST_PASS_ICMP,          /* ICMP to a VIP address that is not about a VIP flow */
    ST_TX_DR,
    ST_TX_TUN,
    ST_DROP_MALFORMED_L4,  /* for a VIP address, transport header truncated */
    ST_DROP_FRAGMENT,      /* IPv4 fragment for a VIP address */
    ST_DROP_IP_OPTIONS,    /* IPv4 options for a VIP address */
    ST_DROP_IPV6_EXT,      /* IPv6 extension headers for a VIP address */
    ST_DROP_NO_REAL,       /* empty ring (all reals drained or down) */
    ST_DROP_ENCAP,         /* could not grow the packet for the tunnel header */
    ST_CONN_HIT,
    ST_CONN_MISS,          /* new flow: picked from the ring */
    ST_CONN_RESCHEDULED,   /* known flow whose real went down or timed out */
    ST_ICMP_FORWARDED,     /* frag-needed / packet-too-big sent after its flow */
    ST_FLOW_EVENT_LOST,    /* ring buffer full */
    ST_PASS_NOT_OURS,      /* VIP packet sent to another host's MAC (flooded by a switch) */
    ST_DROP_NO_SERVICE,    /* TCP/UDP to a VIP address on a port no VIP serves */
    ST_CONN_MISS_NON_SYN,  /* TCP non-SYN of no known flow: forwarded by the ring, no entry */
    ST_CONN_PROMOTED,      /* TCP flow's second packet: moved from embryos into conns */
    ST_CONN_GUARD_LIMITED, /* admission into conns refused by the rate guard: forwarded by the ring */
    ST_MAX,
};

struct flow_event {
    struct flow_key key;
    __u32 real_id;
    __u32 vip_id;
    __u64 ts_ns;
};

L4LB_MAP("hash", struct vip_key, struct vip_meta, vips, 2 * MAX_VIPS, 0);
/* VIP addresses (port 0, proto 0): lets fragments and malformed packets for a
 * VIP get a defined verdict although they carry no usable port. */
L4LB_MAP("hash", struct vip_key, __u32, vip_addrs, 2 * MAX_VIPS, 0);
L4LB_MAP("array", __u32, struct vip_entry, vip_by_id, MAX_VIPS, 0);
L4LB_MAP("array", __u32, struct real_def, reals, MAX_REALS, 0);
L4LB_MAP("array", __u32, __u32, rings, RING_SLOTS * RING_MAX, 0);
L4LB_MAP("lru_hash", struct flow_key, struct conn_val, conns, CONN_TABLE_SIZE, CONN_TABLE_FLAGS);
/* A TCP flow between its SYN and its next packet, in one of the two slots of pair
 * flow_hash % (EMBRYO_TABLE_SIZE / 2): an array, set associative (a SYN takes a free
 * slot or the older one; no locks, no LRU lists: a new flow costs what it did before
 * embryos existed). check = flow hash ^ value mix: an entry torn by two CPUs writing
 * one slot at once reads as empty. Never synced. */
struct embryo {
    struct flow_key key;
    struct conn_val val;
    __u32 check;
    __u32 pad;       /* key.family 0: empty (or promoted) */
};
L4LB_MAP("array", __u32, struct embryo, embryos, EMBRYO_TABLE_SIZE, 0);
L4LB_MAP("array", __u32, struct lb_config, config, 1, 0);

/* Admission guard (as Katran's is_under_flood): each CPU admits at most
 * max_per_s flows into conns per one-second window. */
struct flow_guard_cfg {
    __u32 max_per_s; /* per CPU; 0 = FLOW_GUARD_RATE */
    __u32 pad;
};
struct flow_guard_state {
    __u64 window_start_ns;
    __u64 admitted;
};
L4LB_MAP("array", __u32, struct flow_guard_cfg, flow_guard_cfg, 1, 0);
L4LB_MAP("percpu_array", __u32, struct flow_guard_state, flow_guard, 1, 0);
/* Our MAC per ingress ifindex: a VIP frame addressed to another MAC reached us
 * only by flooding (a switch that does not know the master's port yet) and must
 * not be forwarded, or its rewritten source MAC (= the master's) teaches the
 * switch that the master lives behind our port. */
#define MAX_IFINDEX 1024 /* interfaces with a higher ifindex skip the check */
struct own_mac {
    __u8 mac[6];
    __u8 valid;
    __u8 pad;
};
/* An array (inlined lookup), not a hash: this is on every VIP packet's path. */
L4LB_MAP("array", __u32, struct own_mac, own_macs, MAX_IFINDEX, 0);

/* Pre-filter for the non-VIP fast path: slot vip_filter_index(dst) is non-zero
 * when some VIP address hashes there. Most packets a balancer sees are not for
 * a VIP; one inlined array lookup lets them pass without two hash lookups.
 * l4lb/dataplane/maps.py computes the same index. */
#define VIP_FILTER_SIZE 4096
L4LB_MAP("array", __u32, __u32, vip_filter, VIP_FILTER_SIZE, 0);
L4LB_MAP("percpu_array", __u32, struct counters, stats_vip, MAX_VIPS, 0);
L4LB_MAP("percpu_array", __u32, struct real_counters, stats_real, MAX_REALS, 0);
L4LB_MAP("percpu_array", __u32, __u64, stats_global, ST_MAX, 0);
BPF_RINGBUF_OUTPUT(flow_events, 256);
