//! Rust mirror of `src/bpf/weir_abi.h`. Field order, sizes and offsets are
//! checked against the object's BTF by `tests/btf_layout.rs`.

/// Capacity of `weir_services` and of the per-service arrays.
pub const MAX_SERVICES: u32 = 1024;
/// Capacity of `weir_backends` and `weir_be_stats`.
pub const MAX_BACKENDS: u32 = 65536;
/// Default capacity of the `weir_flows` LRU.
pub const DEFAULT_FLOWS: u32 = 1 << 21;
/// Ring slot value for "no active backend".
pub const NO_BACKEND: u32 = u32::MAX;
/// Largest ring table a service may use.
pub const MAX_RING_SIZE: u32 = 16_777_259;
/// Bytes the IPIP outer header adds.
pub const IPIP_OVERHEAD: u32 = 20;
/// Next-hop cache slots per CPU.
pub const NEXTHOP_SLOTS: u32 = 4096;
/// How long a cached FIB result is reused.
pub const NEXTHOP_TTL_NS: u64 = 100_000_000;
/// The program's global that holds [`NEXTHOP_TTL_NS`] in jiffies, set when
/// the program is loaded.
pub const NEXTHOP_TTL_GLOBAL: &str = "weir_nexthop_ttl_jiffies";
/// ICMP "fragmentation needed" replies per second per CPU (token bucket
/// refill rate).
pub const ICMP_RATE: u32 = 1000;
/// Replies a CPU's bucket holds at most (burst).
pub const ICMP_BURST: u32 = 100;
/// Bytes of an ICMP reply frame: Ethernet, IPv4, ICMP header, 28 quoted.
pub const ICMP_FRAME_LEN: u32 = 70;
/// Capacity of `weir_dcap_sources`.
pub const MAX_DECAP_SOURCES: u32 = 4096;
/// The probe path's socket marks: `PROBE_MARK_BASE + backend id` under
/// `PROBE_MARK_MASK` (the id is in the low 16 bits).
pub const PROBE_MARK_BASE: u32 = 0x7765_0000;
pub const PROBE_MARK_MASK: u32 = 0xffff_0000;
/// `BPF_F_MMAPABLE`.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
/// `BPF_F_INNER_MAP`.
pub const BPF_F_INNER_MAP: u32 = 1 << 12;
/// Flags every ring table is created with (must match the template).
pub const RING_MAP_FLAGS: u32 = BPF_F_INNER_MAP | BPF_F_MMAPABLE;
/// `WEIR_BACKEND_F_USED`: the slot has held a backend (quarantine).
pub const BACKEND_F_USED: u32 = 1;
/// `WEIR_SERVICE_F_PANIC`: the service is in panic (health not trusted).
pub const SERVICE_F_PANIC: u32 = 1;
/// IPPROTO_TCP.
pub const PROTO_TCP: u8 = 6;

/// Names of the pinned maps (pinned by name under the instance directory).
pub mod maps {
    pub const SERVICES: &str = "weir_services";
    pub const RINGS: &str = "weir_rings";
    pub const BACKENDS: &str = "weir_backends";
    pub const FLOWS: &str = "weir_flows";
    pub const CONFIG: &str = "weir_config";
    pub const GENERATION: &str = "weir_gen";
    pub const STATS: &str = "weir_stats";
    pub const SERVICE_STATS: &str = "weir_svc_stats";
    pub const BACKEND_STATS: &str = "weir_be_stats";
    pub const NEXTHOP: &str = "weir_nexthop";
    pub const L7_CONNS: &str = "weir_l7_conns";
    pub const DECAP_VIPS: &str = "weir_dcap_vips";
    pub const DECAP_STATS: &str = "weir_dcap_stats";
    pub const ICMP_BUCKET: &str = "weir_icmp_bucket";
    pub const DECAP_SOURCES: &str = "weir_dcap_sources";
    pub const PROBE_STATS: &str = "weir_probe_stats";
    /// Maps of the balancer object.
    pub const LB: &[&str] = &[
        SERVICES,
        RINGS,
        BACKENDS,
        FLOWS,
        CONFIG,
        GENERATION,
        STATS,
        SERVICE_STATS,
        BACKEND_STATS,
        NEXTHOP,
        L7_CONNS,
        ICMP_BUCKET,
    ];
    /// Maps of the decap object.
    pub const DECAP: &[&str] = &[DECAP_VIPS, DECAP_STATS, DECAP_SOURCES];
}

/// `enum weir_service_mode`.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ServiceMode {
    L4 = 1,
    L7 = 2,
}

impl ServiceMode {
    pub fn from_raw(raw: u8) -> Option<Self> {
        match raw {
            1 => Some(Self::L4),
            2 => Some(Self::L7),
            _ => None,
        }
    }
}

/// `enum weir_backend_state`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BackendState {
    Empty = 0,
    Active = 1,
    Draining = 2,
    Removed = 3,
}

impl BackendState {
    pub fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            0 => Some(Self::Empty),
            1 => Some(Self::Active),
            2 => Some(Self::Draining),
            3 => Some(Self::Removed),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::Active => "active",
            Self::Draining => "draining",
            Self::Removed => "removed",
        }
    }
}

/// `enum weir_backend_health`: observed by `weir agent`, apart from the
/// operator's [`BackendState`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BackendHealth {
    /// Not checked (yet); counts as healthy so a fresh agent ejects nothing.
    #[default]
    Unknown = 0,
    Healthy = 1,
    Unhealthy = 2,
}

impl BackendHealth {
    pub fn from_raw(raw: u8) -> Option<Self> {
        match raw {
            0 => Some(Self::Unknown),
            1 => Some(Self::Healthy),
            2 => Some(Self::Unhealthy),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Healthy => "healthy",
            Self::Unhealthy => "unhealthy",
        }
    }
}

/// `enum weir_health_reason`: why the last health transition happened.
#[repr(u8)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HealthReason {
    #[default]
    None = 0,
    Passed = 1,
    Refused = 2,
    ConnectTimeout = 3,
    Timeout = 4,
    Reset = 5,
    Status = 6,
    NotUpgraded = 7,
    BadHandshake = 8,
    NoPong = 9,
    BadFrame = 10,
    Unreachable = 11,
    ProbePath = 12,
}

impl HealthReason {
    /// Every reason, in ABI order.
    pub const ALL: [Self; 13] = [
        Self::None,
        Self::Passed,
        Self::Refused,
        Self::ConnectTimeout,
        Self::Timeout,
        Self::Reset,
        Self::Status,
        Self::NotUpgraded,
        Self::BadHandshake,
        Self::NoPong,
        Self::BadFrame,
        Self::Unreachable,
        Self::ProbePath,
    ];

    pub fn from_raw(raw: u8) -> Option<Self> {
        Self::ALL.get(usize::from(raw)).copied()
    }

    /// The name `weir backend list` and `/metrics` show.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Passed => "passed",
            Self::Refused => "refused",
            Self::ConnectTimeout => "connect_timeout",
            Self::Timeout => "timeout",
            Self::Reset => "reset",
            Self::Status => "status",
            Self::NotUpgraded => "not_upgraded",
            Self::BadHandshake => "bad_handshake",
            Self::NoPong => "no_pong",
            Self::BadFrame => "bad_frame",
            Self::Unreachable => "unreachable",
            Self::ProbePath => "probe_path",
        }
    }
}

/// `struct weir_service_key`. Address and port in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub vip: [u8; 4],
    pub port: [u8; 2],
    pub proto: u8,
    pub pad: u8,
}

/// `struct weir_service`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    pub id: u32,
    pub ring_size: u32,
    pub mode: u8,
    pub pad: [u8; 3],
    pub flags: u32,
    pub min_backends: u32,
    pub max_remove_permille: u32,
    pub panic_permille: u32,
    pub panics: u32,
    pub panic_since_ms: u64,
}

/// `struct weir_backend`. Address and port in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: [u8; 4],
    pub port: [u8; 2],
    pub weight: u16,
    pub service_id: u32,
    pub state: u32,
    pub flags: u32,
    pub health: u8,
    pub health_reason: u8,
    pub health_detail: u16,
    pub health_since_ms: u64,
}

/// `struct weir_flow_key`. Fields in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub proto: u8,
    pub pad: [u8; 3],
}

/// `struct weir_lb_config`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbConfig {
    pub lb_addr: [u8; 4],
    pub flags: u32,
}

/// `struct weir_nexthop` (one CPU's cache entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Nexthop {
    pub expires_jiffies: u64,
    pub daddr: [u8; 4],
    pub ingress_ifindex: u32,
    pub egress_ifindex: u32,
    pub mtu: u16,
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    pub pad: [u8; 6],
}

/// `struct weir_icmp_bucket` (one CPU's ICMP token bucket).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IcmpBucket {
    pub updated_ns: u64,
    pub credit_ns: u64,
}

/// `struct weir_service_stats` (one CPU's share).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceStats {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub syn_repeats: u64,
    pub flow_misses: u64,
    pub no_backend: u64,
    pub passed_l7: u64,
}

/// `struct weir_backend_stats` (one CPU's share).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendStats {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

/// `struct weir_decap_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DecapKey {
    pub vip: [u8; 4],
}

/// `struct weir_decap_source`: `saddr/(prefixlen - 32)` may send IPIP to
/// `vip`. Addresses in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DecapSource {
    pub prefixlen: u32,
    pub vip: [u8; 4],
    pub saddr: [u8; 4],
}

impl DecapSource {
    /// Entry letting `saddr/source_len` send to `vip`; host bits of
    /// `saddr` are cleared, so one prefix has one key.
    pub fn new(vip: [u8; 4], saddr: [u8; 4], source_len: u8) -> Self {
        let len = u32::from(source_len.min(32));
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        Self {
            prefixlen: 32 + len,
            vip,
            saddr: (u32::from_be_bytes(saddr) & mask).to_be_bytes(),
        }
    }

    /// Length of the source prefix.
    pub fn source_len(&self) -> u8 {
        self.prefixlen.saturating_sub(32).min(32) as u8
    }
}

/// `enum weir_counter`, in order, with the names `weir stats` prints.
pub const COUNTERS: &[&str] = &[
    "tx",
    "redirect",
    "pass_not_ipv4",
    "pass_truncated",
    "pass_bad_ihl",
    "pass_ip_options",
    "pass_fragment",
    "pass_not_tcp",
    "pass_no_service",
    "pass_l7",
    "pass_no_neigh",
    "pass_no_config",
    "drop_no_backend",
    "drop_bad_ring",
    "drop_adjust_head",
    "drop_no_route",
    "drop_frag_needed",
    "flow_new",
    "flow_miss",
    "flow_stale",
    "flow_update_fail",
    "fib_lookup",
    "icmp_frag_needed",
    "icmp_rate_limited",
    "icmp_not_df",
];

/// `enum weir_decap_counter`, in order.
pub const DECAP_COUNTERS: &[&str] = &[
    "decap_ok",
    "decap_pass_not_ipip",
    "decap_pass_not_vip",
    "decap_pass_malformed",
    "decap_drop_adjust",
    "decap_drop_source",
];

/// `enum weir_probe_counter`, in order.
pub const PROBE_COUNTERS: &[&str] = &[
    "probe_encapsulated",
    "probe_drop_malformed",
    "probe_drop_unknown_backend",
    "probe_drop_no_service",
    "probe_drop_not_l4",
    "probe_drop_other_service",
    "probe_drop_no_config",
    "probe_drop_source",
    "probe_drop_no_room",
    "probe_drop_no_route",
    "probe_drop_too_big",
];

/// Index of a counter in [`COUNTERS`].
pub fn counter_index(name: &str) -> Option<u32> {
    COUNTERS.iter().position(|c| *c == name).map(|i| i as u32)
}

// SAFETY: all of these are repr(C), made only of integers and byte arrays,
// with explicit padding fields, so every bit pattern is a valid value.
unsafe impl aya::Pod for ServiceKey {}
unsafe impl aya::Pod for Service {}
unsafe impl aya::Pod for Backend {}
unsafe impl aya::Pod for FlowKey {}
unsafe impl aya::Pod for LbConfig {}
unsafe impl aya::Pod for ServiceStats {}
unsafe impl aya::Pod for BackendStats {}
unsafe impl aya::Pod for DecapKey {}
unsafe impl aya::Pod for Nexthop {}
unsafe impl aya::Pod for IcmpBucket {}
unsafe impl aya::Pod for DecapSource {}

/// `weir_flow_hash()` from the header, bit for bit: the ring slot of a flow
/// is `flow_hash(key) % ring_size`.
pub fn flow_hash(k: &FlowKey) -> u32 {
    let saddr = u32::from_ne_bytes(k.saddr) as u64;
    let daddr = u32::from_ne_bytes(k.daddr) as u64;
    let sport = u16::from_ne_bytes(k.sport) as u64;
    let dport = u16::from_ne_bytes(k.dport) as u64;
    let mut h = (saddr << 32) | daddr;
    let p = ((k.proto as u64) << 32) | (sport << 16) | dport;
    h ^= p.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^= h >> 32;
    h = h.wrapping_mul(0xd6e8_feb8_6659_fd93);
    h ^= h >> 32;
    h = h.wrapping_mul(0xd6e8_feb8_6659_fd93);
    h ^= h >> 32;
    h as u32
}
