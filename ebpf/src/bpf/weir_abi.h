/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The kernel/user ABI of weir: every map, every value layout and every
 * counter shared between the BPF programs (lb.bpf.c, decap.bpf.c,
 * probe.bpf.c) and the userspace registry. The Rust mirror lives in
 * ebpf/src/abi.rs and is checked against this header's BTF by
 * `cargo test -p weir-ebpf`.
 *
 * All maps are pinned by name under /sys/fs/bpf/weir/<instance>/, so the
 * `weir` CLI, the daemon and the attached programs share one registry.
 * Addresses and ports are stored in network byte order, exactly as they
 * appear on the wire, so the data path never converts.
 */
#ifndef WEIR_ABI_H
#define WEIR_ABI_H

#include <linux/types.h>

/* Capacity limits. Service ids index `weir_rings` and `weir_svc_stats`;
 * backend ids index `weir_backends` and `weir_be_stats`. */
#define WEIR_MAX_SERVICES 1024
#define WEIR_MAX_BACKENDS 65536
/* Default flow-table size; `weir` may override it when it creates an
 * instance. About 80 bytes of kernel memory per entry. */
#define WEIR_DEFAULT_FLOWS (1 << 21)
/* Ring slot value meaning "this service has no active backend". */
#define WEIR_NO_BACKEND 0xffffffffu
/* Largest Maglev table a service may use (a prime above 16M). */
#define WEIR_MAX_RING_SIZE 16777259u
/* IPIP outer header: a plain 20-byte IPv4 header. */
#define WEIR_IPIP_OVERHEAD 20
/* Next-hop cache: slots per CPU (direct-mapped by backend id) and how long
 * a FIB result is reused before it is looked up again. */
#define WEIR_NEXTHOP_SLOTS 4096
#define WEIR_NEXTHOP_TTL_NS 100000000ULL
/* ICMP "fragmentation needed" replies to packets too big for the tunnel
 * are rate-limited by a token bucket per CPU (weir_icmp_bucket): it refills
 * at WEIR_ICMP_RATE replies per second and holds at most WEIR_ICMP_BURST,
 * so a flood of oversized packets cannot turn the LB into an ICMP source.
 * A reply is 70 bytes: Ethernet, IPv4, the 8-byte ICMP header and the
 * offending packet's IPv4 header plus its first 8 bytes. */
#define WEIR_ICMP_RATE 1000
#define WEIR_ICMP_BURST 100
#define WEIR_ICMP_FRAME_LEN 70
/* Most (VIP, source prefix) pairs the decap allow list holds. */
#define WEIR_MAX_DECAP_SOURCES 4096

/* BPF_F_INNER_MAP | BPF_F_MMAPABLE: ring tables may differ in size per
 * service and are filled by userspace through mmap before being swapped in. */
#define WEIR_RING_MAP_FLAGS ((1U << 12) | (1U << 10))

enum weir_service_mode {
	WEIR_MODE_L4 = 1, /* XDP picks a backend and IPIP-encapsulates */
	WEIR_MODE_L7 = 2, /* XDP passes to the host stack for the L7 proxy */
};

enum weir_backend_state {
	WEIR_BACKEND_EMPTY = 0,    /* slot unused (never used, or freed) */
	WEIR_BACKEND_ACTIVE = 1,   /* in the ring: takes new flows */
	WEIR_BACKEND_DRAINING = 2, /* out of the ring: keeps its flows */
	WEIR_BACKEND_REMOVED = 3,  /* removed by the operator; still serves its
				    * flows until the registry frees the slot */
	/* 4 was "down" before observed health became a field of its own
	 * (weir_backend.health); nothing ever wrote it. Kept unused. */
};

/* Observed health, written by `weir agent` only; operator intent stays in
 * `state` and neither overwrites the other. The data path never reads it:
 * the registry decides ring membership (active and not unhealthy, unless
 * the service is in panic) and writes only the ring. */
enum weir_backend_health {
	WEIR_HEALTH_UNKNOWN = 0,   /* not checked (yet): counts as healthy */
	WEIR_HEALTH_HEALTHY = 1,
	WEIR_HEALTH_UNHEALTHY = 2, /* out of the ring unless its service panics */
};

/* Why the last health transition happened (weir_backend.health_reason);
 * health_detail carries the HTTP status or errno where one applies. The
 * names `weir backend list` prints are in abi.rs (HealthReason). */
enum weir_health_reason {
	WEIR_HR_NONE = 0,            /* no check result yet */
	WEIR_HR_PASSED = 1,          /* rise checks passed */
	WEIR_HR_REFUSED = 2,         /* connect refused or reset (detail: errno) */
	WEIR_HR_CONNECT_TIMEOUT = 3, /* no answer to the SYN in time */
	WEIR_HR_TIMEOUT = 4,         /* connected, the check did not finish */
	WEIR_HR_RESET = 5,           /* closed or reset during the check */
	WEIR_HR_STATUS = 6,          /* HTTP check: other status (detail) */
	WEIR_HR_NOT_UPGRADED = 7,    /* WebSocket check: not 101 (detail) */
	WEIR_HR_BAD_HANDSHAKE = 8,   /* malformed answer or wrong Accept */
	WEIR_HR_NO_PONG = 9,         /* upgraded, the ping went unanswered */
	WEIR_HR_BAD_FRAME = 10,      /* WebSocket protocol error */
	WEIR_HR_UNREACHABLE = 11,    /* no route (detail: errno) */
	WEIR_HR_PROBE_PATH = 12,     /* L4 probe path not attached */
};

/* Backend flag: the slot has held a backend once. A slot that was used is
 * only handed out again after a scan shows no flow references it
 * (quarantine), so a stale flow can never land on a stranger. */
#define WEIR_BACKEND_F_USED 1u

/* weir_services key: one listener on the VIP. */
struct weir_service_key {
	__be32 vip;
	__be16 port;
	__u8 proto; /* IPPROTO_TCP */
	__u8 pad;
};

/* weir_services value. The guard-rail fields are not read by the data path;
 * they live here so that every writer, daemon or CLI, applies the same
 * limits. */
struct weir_service {
	__u32 id;        /* index into weir_rings and weir_svc_stats */
	__u32 ring_size; /* entries of this service's ring table (prime) */
	__u8 mode;       /* enum weir_service_mode */
	__u8 pad[3];
	__u32 flags;
	__u32 min_backends;        /* refuse to leave fewer active backends */
	__u32 max_remove_permille; /* refuse to remove more, per mille */
	/* Panic: below this healthy share (per mille) of the active backends,
	 * or when leaving the unhealthy ones out would break the guard rails,
	 * health is not trusted and every active backend stays in the ring. */
	__u32 panic_permille;
	__u32 panics;          /* panic episodes so far */
	__u64 panic_since_ms;  /* CLOCK_REALTIME ms the last episode began */
};

/* weir_service flag: in panic now (see panic_permille). */
#define WEIR_SERVICE_F_PANIC 1u

/* weir_backends value (array indexed by backend id). */
struct weir_backend {
	__be32 addr;
	__be16 port;
	__u16 weight;
	__u32 service_id;
	__u32 state; /* enum weir_backend_state: operator intent */
	__u32 flags; /* WEIR_BACKEND_F_* */
	__u8 health;         /* enum weir_backend_health: observed */
	__u8 health_reason;  /* enum weir_health_reason of the last transition */
	__u16 health_detail; /* HTTP status or errno, else 0 */
	__u64 health_since_ms; /* CLOCK_REALTIME ms of the last transition */
};

/* weir_flows key: the client's 5-tuple as received. */
struct weir_flow_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
};

/* weir_config value (single entry): set by `weir attach`. */
struct weir_lb_config {
	__be32 lb_addr; /* outer source address of the IPIP header */
	__u32 flags;
};

/* weir_nexthop[backend id % WEIR_NEXTHOP_SLOTS] (per CPU): the FIB result
 * for a backend, reused for WEIR_NEXTHOP_TTL_NS so that the lookup (the
 * costliest step of the fast path) runs a few times a second per backend
 * instead of once per packet. Valid only for the same ingress device and
 * backend address. The deadline is in jiffies (weir_nexthop_ttl_jiffies
 * says why). */
struct weir_nexthop {
	__u64 expires_jiffies; /* bpf_jiffies64() deadline */
	__be32 daddr;     /* backend address this entry resolves */
	__u32 ingress_ifindex;
	__u32 egress_ifindex;
	__u16 mtu;        /* route MTU: larger encapsulated packets are
			   * not sent (ICMP frag needed instead) */
	__u8 dmac[6];
	__u8 smac[6];
	__u8 pad[6];
};

/* weir_icmp_bucket[0] (per CPU): the ICMP token bucket, kept in
 * nanoseconds of credit: elapsed time adds credit up to WEIR_ICMP_BURST
 * replies' worth, each reply spends 1e9 / WEIR_ICMP_RATE. Per CPU, so no
 * atomics: the host-wide limit is WEIR_ICMP_RATE times the CPUs that
 * receive oversized packets. */
struct weir_icmp_bucket {
	__u64 updated_ns; /* bpf_ktime_get_coarse_ns() of the last refill */
	__u64 credit_ns;
};

/* Per-service counters (per CPU), weir_svc_stats[service id]. Packets count
 * once on their way to a backend (sent, or handed to the kernel to forward
 * while the next hop resolves); dropped ones count only as drops. */
struct weir_service_stats {
	__u64 packets;         /* packets forwarded to a backend */
	__u64 bytes;           /* inner bytes forwarded */
	__u64 new_flows;       /* SYNs that created or moved a flow */
	__u64 syn_repeats;     /* SYNs for a flow already on that backend */
	__u64 flow_misses;     /* non-SYN packets with no flow entry */
	__u64 no_backend;      /* dropped: ring empty */
	__u64 passed_l7;       /* passed to the host stack (L7 service) */
};

/* Per-backend counters (per CPU), weir_be_stats[backend id]. */
struct weir_backend_stats {
	__u64 packets;
	__u64 bytes;
	__u64 new_flows;
};

/* Global counters (per CPU), weir_stats[enum weir_counter]: one per verdict
 * and one per reason for passing or dropping. */
enum weir_counter {
	WEIR_CNT_TX = 0,             /* encapsulated and sent with XDP_TX */
	WEIR_CNT_REDIRECT,           /* encapsulated and redirected */
	WEIR_CNT_PASS_NOT_IPV4,      /* ARP, IPv6, anything not IPv4 */
	WEIR_CNT_PASS_TRUNCATED,     /* headers run past the packet end */
	WEIR_CNT_PASS_BAD_IHL,       /* IHL < 5 or total length < header */
	WEIR_CNT_PASS_IP_OPTIONS,    /* IHL > 5: left to the kernel */
	WEIR_CNT_PASS_FRAGMENT,      /* fragments: no ports to hash */
	WEIR_CNT_PASS_NOT_TCP,       /* protocols weir does not balance */
	WEIR_CNT_PASS_NO_SERVICE,    /* not addressed to a service */
	WEIR_CNT_PASS_L7,            /* an L7 service: the host stack serves */
	WEIR_CNT_PASS_NO_NEIGH,      /* encapsulated, next hop unresolved */
	WEIR_CNT_PASS_NO_CONFIG,     /* no LB address configured */
	WEIR_CNT_DROP_NO_BACKEND,    /* service has no active backend */
	WEIR_CNT_DROP_BAD_RING,      /* ring names an empty backend slot */
	WEIR_CNT_DROP_ADJUST_HEAD,   /* no headroom for the outer header */
	WEIR_CNT_DROP_NO_ROUTE,      /* FIB: backend unreachable */
	WEIR_CNT_DROP_FRAG_NEEDED,   /* encapsulated packet exceeds the MTU:
				      * not forwarded (icmp_* say what
				      * became of it) */
	WEIR_CNT_FLOW_NEW,           /* flows created by a SYN */
	WEIR_CNT_FLOW_MISS,          /* non-SYN without a usable flow:
				      * evicted, started elsewhere, or stale;
				      * re-picked by the ring */
	WEIR_CNT_FLOW_STALE,         /* flow named a freed backend (also
				      * counted as a miss when re-picked) */
	WEIR_CNT_FLOW_UPDATE_FAIL,   /* flow table insert failed */
	WEIR_CNT_FIB_LOOKUP,         /* next hop resolved by the FIB (cache
				      * miss or expiry) */
	WEIR_CNT_ICMP_FRAG_NEEDED,   /* too big (counted in drop_frag_needed),
				      * DF set: answered with ICMP type 3
				      * code 4, next-hop MTU = route MTU - 20 */
	WEIR_CNT_ICMP_RATE_LIMITED,  /* too big, DF set, no reply: over the
				      * ICMP rate (weir_icmp_bucket) */
	WEIR_CNT_ICMP_NOT_DF,        /* too big, DF clear: no reply (the
				      * sender allowed fragmentation, which
				      * the tunnel cannot do) */
	WEIR_CNT_MAX,
};

/* Decap counters (per CPU), weir_dcap_stats[enum weir_decap_counter]. */
enum weir_decap_counter {
	WEIR_DCAP_OK = 0,          /* outer header removed */
	WEIR_DCAP_PASS_NOT_IPIP,   /* not IPv4-in-IPv4: untouched */
	WEIR_DCAP_PASS_NOT_VIP,    /* inner destination is not a decap VIP */
	WEIR_DCAP_PASS_MALFORMED,  /* truncated or bad outer/inner header */
	WEIR_DCAP_DROP_ADJUST,     /* bpf_skb_adjust_room failed */
	WEIR_DCAP_DROP_SOURCE,     /* IPIP to a VIP from an outer source its
				    * allow list (weir_dcap_sources) lacks */
	WEIR_DCAP_MAX,
};

/* weir_dcap_vips key: the inner destination a backend accepts. */
struct weir_decap_key {
	__be32 vip;
};

/* weir_dcap_sources key (LPM trie): the VIP, always in full, then the
 * outer source prefix allowed to send IPIP to it. A lookup uses
 * prefixlen 64 with the packet's inner destination and outer source; it
 * matches an entry with prefixlen 32 + N whose VIP is that destination and
 * whose first N source bits match. */
struct weir_decap_source {
	__u32 prefixlen; /* 32 + source prefix length */
	__be32 vip;
	__be32 saddr;
};

/* The probe path (probe.bpf.c, tc egress of the LB host's `lo`): a packet
 * whose mark is WEIR_PROBE_MARK_BASE + a backend id is a health check of
 * that backend. The agent sets the mark per socket (SO_MARK) and connects
 * to the service's VIP:port; `weir attach` routes such packets to `lo`
 * (a policy rule on the mark), where the program sends them to the backend
 * inside the same IPIP header weir_lb gives a client's packet. The low 16
 * bits hold the id (ids are below WEIR_MAX_BACKENDS); the high 16 bits must
 * equal the base's under the mask. */
#define WEIR_PROBE_MARK_BASE 0x77650000u
#define WEIR_PROBE_MARK_MASK 0xffff0000u

/* Probe counters (per CPU), weir_probe_stats[enum weir_probe_counter]. Only
 * marked packets are counted; every other packet passes untouched. A marked
 * packet that cannot go the way a client's would is dropped (counted by
 * reason), never passed: the check must fail, not reach something else. */
enum weir_probe_counter {
	WEIR_PROBE_ENCAPSULATED = 0,   /* sent to its backend inside IPIP */
	WEIR_PROBE_DROP_MALFORMED,     /* not plain IPv4 TCP (options, short) */
	WEIR_PROBE_DROP_UNKNOWN_BACKEND, /* the mark names no backend that
					  * serves flows (an empty slot) */
	WEIR_PROBE_DROP_NO_SERVICE,    /* destination is no service's VIP:port */
	WEIR_PROBE_DROP_NOT_L4,        /* an L7 service: weir run, not XDP,
					* carries its clients */
	WEIR_PROBE_DROP_OTHER_SERVICE, /* the backend serves another service */
	WEIR_PROBE_DROP_NO_CONFIG,     /* no LB address yet (weir attach) */
	WEIR_PROBE_DROP_SOURCE,        /* inner source is not the LB address:
					* the backend's answer would go
					* elsewhere (bind the probe socket to
					* it when the VIP is local) */
	WEIR_PROBE_DROP_NO_ROOM,       /* bpf_skb_adjust_room failed */
	WEIR_PROBE_DROP_NO_ROUTE,      /* no route to the backend */
	WEIR_PROBE_DROP_TOO_BIG,       /* larger than the route MTU once
					* encapsulated */
	WEIR_PROBE_MAX,
};

/*
 * Map definitions. A program includes this header with WEIR_LB_MAPS (the
 * XDP balancer) or WEIR_DECAP_MAPS (the backend-side decap program) defined
 * and gets exactly the maps it uses. Every map is pinned by name.
 * WEIR_PROBE_MAPS (the probe program, on the LB host) gets the balancer's
 * maps, of which it reads weir_services, weir_backends and weir_config, and
 * its own counters.
 */
#ifdef WEIR_PROBE_MAPS
#define WEIR_LB_MAPS
#endif
#if defined(WEIR_LB_MAPS) || defined(WEIR_DECAP_MAPS)
#include <bpf/bpf_helpers.h>
#ifndef LIBBPF_PIN_BY_NAME
#define LIBBPF_PIN_BY_NAME 1
#endif
#endif

#ifdef WEIR_LB_MAPS
/* weir_services: {vip, port, proto} -> service. A miss means "not ours". */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, WEIR_MAX_SERVICES);
	__type(key, struct weir_service_key);
	__type(value, struct weir_service);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weir_services SEC(".maps");

/* Template of one Maglev table: ring slot -> backend id. Each service's
 * table is created by userspace with exactly ring_size entries. */
struct weir_ring_table {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__uint(map_flags, WEIR_RING_MAP_FLAGS);
	__type(key, __u32);
	__type(value, __u32);
};

/* weir_rings[service id] -> that service's current table. A change fills a
 * new table completely and swaps it in with one update of this outer map, so
 * a packet sees the old table or the new one, never a mix. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, WEIR_MAX_SERVICES);
	__type(key, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__array(values, struct weir_ring_table);
} weir_rings SEC(".maps");

/* weir_backends[backend id] -> address and state. Mmapable so the
 * registry reads all of it at once; it writes entries by syscall. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, WEIR_MAX_BACKENDS);
	__uint(map_flags, 1U << 10); /* BPF_F_MMAPABLE */
	__type(key, __u32);
	__type(value, struct weir_backend);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weir_backends SEC(".maps");

/* weir_flows: client 5-tuple -> backend id. Non-SYN packets consult it
 * first, so established connections stay put whatever the ring says.
 *
 * One table for every CPU, with the kernel's common LRU. RSS may move a
 * flow to another CPU in the middle of a connection (a queue's interrupt
 * moved, the indirection table rewritten); that CPU finds the same entry,
 * so the flow stays on its backend even if the ring changed since its SYN.
 * The per-CPU layouts were measured (weir-bench-l4, 2 CPUs) and rejected:
 * - BPF_F_NO_COMMON_LRU (shared hash, one LRU list per CPU) inserts no
 *   faster here, one CPU or both at once, table full or not, and gives
 *   each CPU max_entries / possible CPUs: a CPU that RSS hands more flows
 *   evicts its own while the others have room.
 * - One LRU per CPU (an array of maps, as Katran has) or an
 *   LRU_PERCPU_HASH: the second CPU finds no entry (or a zero value) and
 *   re-picks from the ring. Maglev names the same backend only while the
 *   backend set is unchanged; after a change since the flow's SYN, the
 *   flows whose slot moved (about 1/N when one of N backends changes) go
 *   to a backend that knows nothing of them and answers RST. WebSockets
 *   outlive many changes, so an interrupt moved by irqbalance would cut
 *   connections: not acceptable for weir.
 * What a new flow's insert costs is cache misses (its hash bucket, an
 * element never used before, the LRU lists' upkeep), not the lock. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, WEIR_DEFAULT_FLOWS);
	__type(key, struct weir_flow_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weir_flows SEC(".maps");

/* weir_config[0]: the LB's own address, written by `weir attach`. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct weir_lb_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weir_config SEC(".maps");

/* weir_gen[0]: bumped by every registry change; the L7 workers mmap it and
 * reload their view when it moves. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__uint(map_flags, 1U << 10); /* BPF_F_MMAPABLE */
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weir_gen SEC(".maps");

/* weir_nexthop: see struct weir_nexthop. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, WEIR_NEXTHOP_SLOTS);
	__type(key, __u32);
	__type(value, struct weir_nexthop);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weir_nexthop SEC(".maps");

/* weir_l7_conns[backend id]: connections `weir run` holds to each backend,
 * kept by the L7 workers through mmap (atomic adds). Not read by XDP: the
 * registry frees a removed backend only when neither flows nor L7
 * connections use it any more. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, WEIR_MAX_BACKENDS);
	__uint(map_flags, 1U << 10); /* BPF_F_MMAPABLE */
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weir_l7_conns SEC(".maps");

/* weir_stats[enum weir_counter]: verdicts and reasons, per CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, WEIR_CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weir_stats SEC(".maps");

/* weir_svc_stats[service id], per CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, WEIR_MAX_SERVICES);
	__type(key, __u32);
	__type(value, struct weir_service_stats);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weir_svc_stats SEC(".maps");

/* weir_be_stats[backend id], per CPU. Reset when a slot is reused. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, WEIR_MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct weir_backend_stats);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weir_be_stats SEC(".maps");

/* WEIR_NEXTHOP_TTL_NS in jiffies, set by `weir` when it loads the program,
 * from the kernel's tick length (the resolution of the coarse clocks). The
 * next-hop cache counts in jiffies because bpf_jiffies64() is inlined to a
 * load, where a nanosecond clock is a helper call on every packet. The
 * default is right for HZ=250. */
const volatile __u64 weir_nexthop_ttl_jiffies = 25;

/* weir_icmp_bucket[0]: see struct weir_icmp_bucket. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct weir_icmp_bucket);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weir_icmp_bucket SEC(".maps");
/*
 * The flow hash that places a flow on a ring slot. It is part of the ABI:
 * every weir host computes the same value, so several hosts behind ECMP send
 * a flow to the same backend, and userspace can predict where a flow lands.
 * A 64-bit multiply/xor-shift mix over the 5-tuple as stored in the key
 * (network byte order fields loaded as native integers).
 */
static __always_inline __u32 weir_flow_hash(const struct weir_flow_key *k)
{
	__u64 h = ((__u64)k->saddr << 32) | k->daddr;
	__u64 p = ((__u64)k->proto << 32) | ((__u64)k->sport << 16) | k->dport;

	h ^= p * 0x9e3779b97f4a7c15ULL;
	h ^= h >> 32;
	h *= 0xd6e8feb86659fd93ULL;
	h ^= h >> 32;
	h *= 0xd6e8feb86659fd93ULL;
	h ^= h >> 32;
	return (__u32)h;
}
#endif /* WEIR_LB_MAPS */

#ifdef WEIR_DECAP_MAPS
/* weir_dcap_vips: inner destinations this backend decapsulates. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, WEIR_MAX_SERVICES);
	__type(key, struct weir_decap_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weir_dcap_vips SEC(".maps");

/* weir_dcap_stats[enum weir_decap_counter], per CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, WEIR_DCAP_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weir_dcap_stats SEC(".maps");

/* weir_dcap_sources: which outer sources may send IPIP to which VIP (see
 * struct weir_decap_source). IPIP to a decap VIP from any other source is
 * dropped: it could carry any forged inner client address. Empty means
 * nothing is accepted. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, WEIR_MAX_DECAP_SOURCES);
	__uint(map_flags, 1U << 0); /* BPF_F_NO_PREALLOC, required */
	__type(key, struct weir_decap_source);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weir_dcap_sources SEC(".maps");
#endif /* WEIR_DECAP_MAPS */

#ifdef WEIR_PROBE_MAPS
/* weir_probe_stats[enum weir_probe_counter], per CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, WEIR_PROBE_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weir_probe_stats SEC(".maps");
#endif /* WEIR_PROBE_MAPS */

#endif /* WEIR_ABI_H */
