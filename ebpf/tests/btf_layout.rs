//! The Rust mirror in `weir_ebpf::abi` must match the C ABI bit for bit.
//! Structs are checked against the BTF clang emitted into the objects
//! (names, sizes, member names and offsets); enums and constants, which BTF
//! does not carry unless used as types, against the header text.

use std::collections::HashMap;
use std::mem::{offset_of, size_of};

use object::{Object, ObjectSection};
use weir_ebpf::abi;

const BTF_KIND_STRUCT: u32 = 4;

/// A struct as BTF describes it: size and (member name, byte offset).
#[derive(Debug, PartialEq)]
struct Layout {
    size: usize,
    members: Vec<(String, usize)>,
}

/// Minimal BTF reader: enough to list named structs and their members.
fn btf_structs(elf: &[u8]) -> HashMap<String, Layout> {
    let file = object::File::parse(elf).expect("object parses as ELF");
    let section = file
        .section_by_name(".BTF")
        .expect("object has .BTF (built with -g)");
    let btf = section.data().expect(".BTF readable");
    let u16_at = |off: usize| u16::from_le_bytes(btf[off..off + 2].try_into().unwrap());
    let u32_at = |off: usize| u32::from_le_bytes(btf[off..off + 4].try_into().unwrap());
    assert_eq!(u16_at(0), 0xeb9f, "BTF magic");
    let hdr_len = u32_at(4) as usize;
    let type_start = hdr_len + u32_at(8) as usize;
    let type_end = type_start + u32_at(12) as usize;
    let str_start = hdr_len + u32_at(16) as usize;
    let name = |off: u32| {
        let s = &btf[str_start + off as usize..];
        let end = s.iter().position(|b| *b == 0).unwrap();
        String::from_utf8(s[..end].to_vec()).unwrap()
    };

    let mut out = HashMap::new();
    let mut at = type_start;
    while at < type_end {
        let name_off = u32_at(at);
        let info = u32_at(at + 4);
        let size = u32_at(at + 8) as usize;
        let kind = (info >> 24) & 0x1f;
        let vlen = (info & 0xffff) as usize;
        let kind_flag = info >> 31 == 1;
        at += 12;
        let trailing = match kind {
            1 | 14 | 17 => 4,     // INT, VAR, DECL_TAG
            3 => 12,              // ARRAY
            4 | 5 => 12 * vlen,   // STRUCT, UNION
            6 | 13 => 8 * vlen,   // ENUM, FUNC_PROTO
            15 | 19 => 12 * vlen, // DATASEC, ENUM64
            2 | 7 | 8 | 9 | 10 | 11 | 12 | 16 | 18 => 0,
            other => panic!("unknown BTF kind {other}"),
        };
        if kind == BTF_KIND_STRUCT && name_off != 0 {
            let members = (0..vlen)
                .map(|i| {
                    let m = at + 12 * i;
                    let bits = u32_at(m + 8);
                    let bit_offset = if kind_flag { bits & 0x00ff_ffff } else { bits };
                    assert_eq!(bit_offset % 8, 0, "no bitfields in the ABI");
                    (name(u32_at(m)), (bit_offset / 8) as usize)
                })
                .collect();
            out.insert(name(name_off), Layout { size, members });
        }
        at += trailing;
    }
    out
}

macro_rules! layout {
    ($ty:ty { $($field:ident),* $(,)? }) => {
        Layout {
            size: size_of::<$ty>(),
            members: vec![$((stringify!($field).to_string(), offset_of!($ty, $field))),*],
        }
    };
}

#[test]
fn lb_structs_match_btf() {
    let btf = btf_structs(weir_ebpf::lb_object());
    let expect = [
        (
            "weir_service_key",
            layout!(abi::ServiceKey {
                vip,
                port,
                proto,
                pad
            }),
        ),
        (
            "weir_service",
            layout!(abi::Service {
                id,
                ring_size,
                mode,
                pad,
                flags,
                min_backends,
                max_remove_permille,
                panic_permille,
                panics,
                panic_since_ms
            }),
        ),
        (
            "weir_backend",
            layout!(abi::Backend {
                addr,
                port,
                weight,
                service_id,
                state,
                flags,
                health,
                health_reason,
                health_detail,
                health_since_ms
            }),
        ),
        (
            "weir_flow_key",
            layout!(abi::FlowKey {
                saddr,
                daddr,
                sport,
                dport,
                proto,
                pad
            }),
        ),
        ("weir_lb_config", layout!(abi::LbConfig { lb_addr, flags })),
        (
            "weir_nexthop",
            layout!(abi::Nexthop {
                expires_jiffies,
                daddr,
                ingress_ifindex,
                egress_ifindex,
                mtu,
                dmac,
                smac,
                pad
            }),
        ),
        (
            "weir_service_stats",
            layout!(abi::ServiceStats {
                packets,
                bytes,
                new_flows,
                syn_repeats,
                flow_misses,
                no_backend,
                passed_l7
            }),
        ),
        (
            "weir_icmp_bucket",
            layout!(abi::IcmpBucket {
                updated_ns,
                credit_ns
            }),
        ),
        (
            "weir_backend_stats",
            layout!(abi::BackendStats {
                packets,
                bytes,
                new_flows
            }),
        ),
    ];
    for (name, want) in expect {
        let got = btf
            .get(name)
            .unwrap_or_else(|| panic!("struct {name} missing from BTF"));
        assert_eq!(got, &want, "layout of struct {name}");
    }
}

#[test]
fn decap_structs_match_btf() {
    let btf = btf_structs(weir_ebpf::decap_object());
    assert_eq!(btf["weir_decap_key"], layout!(abi::DecapKey { vip }));
    assert_eq!(
        btf["weir_decap_source"],
        layout!(abi::DecapSource {
            prefixlen,
            vip,
            saddr
        })
    );
}

fn header() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/bpf/weir_abi.h")).unwrap()
}

/// Member names of a C enum in the header, in order, without `prefix`,
/// stopping before the `_MAX` sentinel.
fn enum_members(header: &str, enum_name: &str, prefix: &str) -> Vec<String> {
    let start = header
        .find(&format!("enum {enum_name} {{"))
        .expect("enum in header");
    let body = &header[start..header[start..].find("};").unwrap() + start];
    body.lines()
        .skip(1)
        .filter_map(|line| {
            let ident = line.trim().split([',', ' ', '=', '\t']).next()?;
            ident.strip_prefix(prefix).map(str::to_ascii_lowercase)
        })
        .take_while(|name| name != "max")
        .collect()
}

#[test]
fn counters_match_header_enums() {
    let h = header();
    assert_eq!(enum_members(&h, "weir_counter", "WEIR_CNT_"), abi::COUNTERS);
    let decap: Vec<String> = abi::DECAP_COUNTERS
        .iter()
        .map(|c| c.strip_prefix("decap_").unwrap().to_string())
        .collect();
    assert_eq!(enum_members(&h, "weir_decap_counter", "WEIR_DCAP_"), decap);
    let probe: Vec<String> = abi::PROBE_COUNTERS
        .iter()
        .map(|c| c.strip_prefix("probe_").unwrap().to_string())
        .collect();
    assert_eq!(enum_members(&h, "weir_probe_counter", "WEIR_PROBE_"), probe);
    assert_eq!(
        enum_members(&h, "weir_backend_state", "WEIR_BACKEND_"),
        ["empty", "active", "draining", "removed"]
    );
    for (i, s) in ["empty", "active", "draining", "removed"]
        .iter()
        .enumerate()
    {
        assert_eq!(abi::BackendState::from_raw(i as u32).unwrap().name(), *s);
    }
    assert_eq!(
        abi::BackendState::from_raw(4),
        None,
        "4 (the retired \"down\") is never written"
    );
    assert_eq!(
        enum_members(&h, "weir_backend_health", "WEIR_HEALTH_"),
        ["unknown", "healthy", "unhealthy"]
    );
    for (i, s) in ["unknown", "healthy", "unhealthy"].iter().enumerate() {
        assert_eq!(abi::BackendHealth::from_raw(i as u8).unwrap().name(), *s);
    }
    let reasons: Vec<&str> = abi::HealthReason::ALL.iter().map(|r| r.name()).collect();
    assert_eq!(enum_members(&h, "weir_health_reason", "WEIR_HR_"), reasons);
    for (i, r) in abi::HealthReason::ALL.iter().enumerate() {
        assert_eq!(abi::HealthReason::from_raw(i as u8), Some(*r));
        assert_eq!(*r as usize, i);
    }
    assert_eq!(abi::HealthReason::from_raw(13), None);
}

fn define(header: &str, name: &str) -> u64 {
    let line = header
        .lines()
        .find(|l| l.starts_with(&format!("#define {name} ")))
        .unwrap_or_else(|| panic!("#define {name} in header"));
    let value = line[format!("#define {name} ").len()..]
        .trim()
        .trim_end_matches(['u', 'U', 'L']);
    if let Some(shift) = value
        .strip_prefix("(1 << ")
        .and_then(|v| v.strip_suffix(')'))
    {
        1u64 << shift.parse::<u32>().unwrap()
    } else if let Some(hex) = value.strip_prefix("0x") {
        u64::from_str_radix(hex, 16).unwrap()
    } else {
        value.parse().unwrap()
    }
}

#[test]
fn constants_match_header() {
    let h = header();
    assert_eq!(define(&h, "WEIR_MAX_SERVICES"), abi::MAX_SERVICES as u64);
    assert_eq!(define(&h, "WEIR_MAX_BACKENDS"), abi::MAX_BACKENDS as u64);
    assert_eq!(define(&h, "WEIR_DEFAULT_FLOWS"), abi::DEFAULT_FLOWS as u64);
    assert_eq!(define(&h, "WEIR_NO_BACKEND"), abi::NO_BACKEND as u64);
    assert_eq!(define(&h, "WEIR_MAX_RING_SIZE"), abi::MAX_RING_SIZE as u64);
    assert_eq!(define(&h, "WEIR_IPIP_OVERHEAD"), abi::IPIP_OVERHEAD as u64);
    assert_eq!(define(&h, "WEIR_NEXTHOP_TTL_NS"), abi::NEXTHOP_TTL_NS);
    assert_eq!(
        define(&h, "WEIR_BACKEND_F_USED"),
        abi::BACKEND_F_USED as u64
    );
    assert_eq!(
        define(&h, "WEIR_SERVICE_F_PANIC"),
        abi::SERVICE_F_PANIC as u64
    );
    assert_eq!(define(&h, "WEIR_ICMP_RATE"), abi::ICMP_RATE as u64);
    assert_eq!(define(&h, "WEIR_ICMP_BURST"), abi::ICMP_BURST as u64);
    assert_eq!(
        define(&h, "WEIR_ICMP_FRAME_LEN"),
        abi::ICMP_FRAME_LEN as u64
    );
    assert_eq!(
        define(&h, "WEIR_MAX_DECAP_SOURCES"),
        abi::MAX_DECAP_SOURCES as u64
    );
    assert_eq!(
        define(&h, "WEIR_PROBE_MARK_BASE"),
        abi::PROBE_MARK_BASE as u64
    );
    assert_eq!(
        define(&h, "WEIR_PROBE_MARK_MASK"),
        abi::PROBE_MARK_MASK as u64
    );
    assert!(h.contains("#define WEIR_RING_MAP_FLAGS ((1U << 12) | (1U << 10))"));
    assert_eq!(abi::RING_MAP_FLAGS, (1 << 12) | (1 << 10));
}
