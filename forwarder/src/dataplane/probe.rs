//! The probe path: health checks of L4 backends leave the LB the way
//! clients' packets do, inside weir's IPIP header to one backend, so a
//! backend whose decapsulation or VIP listener is missing fails its check
//! although its own address still answers.
//!
//! The agent marks a check's socket with [`mark_for`] its backend and
//! connects to the service's VIP:port. A policy rule (the probe marks →
//! [`TABLE`], at [`RULE_PRIORITY`]) gives such packets a default route
//! through `lo` with the LB address as source; a VIP that is a local
//! address of the LB goes through `lo` by the local table anyway (the
//! socket must then be bound to the LB address, or `weir_probe` drops it as
//! `probe_drop_source`). At tc egress of `lo`, `weir_probe` encapsulates
//! each marked packet to the backend its mark names and sends it out of the
//! interface the FIB gives for that backend. One hook on `lo` thus serves
//! every uplink of the namespace. `weir attach` sets the path up with the
//! balancer and asks the kernel where a marked packet goes before it
//! reports success; `weir detach` of the namespace's last balancer device
//! removes it. Without the program, marked packets would loop through `lo`
//! and fail; without the rule they would leave unencapsulated: [`attached`]
//! is what the agent asks before it trusts a check.

use std::net::Ipv4Addr;
use std::path::Path;

use aya::maps::{Array, MapData};
use aya::programs::TcAttachType;
use aya::{Ebpf, EbpfLoader};
use weir_ebpf::abi;

use super::attachment::{self, Key, Kind, Netns, Status};
use super::netlink::{self, DeviceRoute, MarkRule};
use super::{Attached, DataplaneError, find_live, kernel, key_here};
use crate::instance::{BPFFS, Instance};

/// Priority of the policy rule: before `main` (32766), so marked packets
/// never take the host's own routes.
pub const RULE_PRIORITY: u32 = 30565;
/// The routing table the rule points at: one default route through `lo`.
pub const TABLE: u32 = 30565;
/// The device the program is attached to.
const LOOPBACK: &str = "lo";
/// A destination no host holds (TEST-NET-1, RFC 5737), for asking the
/// kernel where a marked packet to a non-local VIP goes.
const SAMPLE_DST: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

/// The socket mark (`SO_MARK`) of a health check of backend `backend_id`.
/// Ids come from the registry, so they are below [`abi::MAX_BACKENDS`];
/// a larger one is a caller's bug.
pub fn mark_for(backend_id: u32) -> u32 {
    assert!(
        backend_id < abi::MAX_BACKENDS,
        "backend id {backend_id} out of range"
    );
    abi::PROBE_MARK_BASE + backend_id
}

/// Whether the probe path of `instance` is attached and live in this
/// network namespace: the program on `lo` (the kernel confirms its link),
/// and the kernel routing a marked packet through `lo` from the LB
/// address. The agent's checks of L4 backends mean something only then.
pub fn attached(instance: &Instance) -> Result<bool, DataplaneError> {
    let key = key_here(Kind::Probe, LOOPBACK)?;
    if find_live(instance, key)?.is_none() {
        return Ok(false);
    }
    Ok(routing_problem(lb_addr(instance)?, key.ifindex)?.is_none())
}

/// The LB address `weir attach` wrote (unspecified before any attach).
fn lb_addr(instance: &Instance) -> Result<Ipv4Addr, DataplaneError> {
    let path = instance.pin_dir().join(abi::maps::CONFIG);
    let data = MapData::from_pin(&path)
        .map_err(|e| kernel(format!("opening {}", path.display()))(e.to_string()))?;
    let config: Array<MapData, abi::LbConfig> = Array::try_from(aya::maps::Map::Array(data))
        .map_err(|e| kernel(abi::maps::CONFIG)(e.to_string()))?;
    let value = config
        .get(&0, 0)
        .map_err(|e| kernel(abi::maps::CONFIG)(e.to_string()))?;
    Ok(Ipv4Addr::from(value.lb_addr))
}

fn rule() -> MarkRule {
    MarkRule {
        priority: RULE_PRIORITY,
        mark: abi::PROBE_MARK_BASE,
        mask: abi::PROBE_MARK_MASK,
        table: TABLE,
    }
}

/// The route of [`TABLE`]. Its MTU leaves room for the outer header, so a
/// check's TCP segments still fit the uplink once encapsulated.
fn route(loopback: u32, lb_addr: Ipv4Addr, uplink_mtu: u32) -> DeviceRoute {
    DeviceRoute {
        table: TABLE,
        oif: loopback,
        src: lb_addr,
        mtu: uplink_mtu.saturating_sub(abi::IPIP_OVERHEAD),
    }
}

/// Why the kernel does not route a marked packet through `lo` from
/// `lb_addr`, if it does not.
fn routing_problem(lb_addr: Ipv4Addr, loopback: u32) -> Result<Option<String>, DataplaneError> {
    let netlink::RouteTo { oif, src, .. } = netlink::route_get(SAMPLE_DST, abi::PROBE_MARK_BASE)
        .map_err(|e| {
            kernel(format!(
                "asking the kernel where a packet marked {:#x} goes",
                abi::PROBE_MARK_BASE
            ))(e.to_string())
        })?;
    if oif != Some(loopback) {
        return Ok(Some(format!(
            "a packet marked {:#x} leaves by ifindex {} instead of lo: the rule `ip rule \
             add pref {RULE_PRIORITY} fwmark {:#x}/{:#x} table {TABLE}` or its route is \
             missing, or an earlier rule takes such packets",
            abi::PROBE_MARK_BASE,
            oif.map_or_else(|| "none".into(), |i| i.to_string()),
            abi::PROBE_MARK_BASE,
            abi::PROBE_MARK_MASK,
        )));
    }
    if src != Some(lb_addr) {
        return Ok(Some(format!(
            "a marked packet would leave from {}, not from the LB address {lb_addr}",
            src.map_or_else(|| "no address".into(), |a| a.to_string())
        )));
    }
    Ok(None)
}

/// Adds the route, then the rule (so the rule never points at an empty
/// table), and checks what the kernel now does with a marked packet.
fn install_routing(
    loopback: u32,
    lb_addr: Ipv4Addr,
    uplink_mtu: u32,
) -> Result<(), DataplaneError> {
    netlink::replace_route(&route(loopback, lb_addr, uplink_mtu)).map_err(|e| {
        kernel(format!("adding the probe route (table {TABLE}, dev lo)"))(e.to_string())
    })?;
    netlink::add_rule(&rule()).map_err(|e| {
        kernel(format!(
            "adding the probe rule (priority {RULE_PRIORITY}, table {TABLE})"
        ))(e.to_string())
    })?;
    match routing_problem(lb_addr, loopback)? {
        None => Ok(()),
        Some(problem) => Err(DataplaneError::Kernel {
            what: "setting up the probe path".into(),
            detail: problem,
        }),
    }
}

/// Removes the rule, then the route, from this namespace (each only if
/// there).
fn remove_routing(loopback: u32) -> Result<(), DataplaneError> {
    netlink::delete_rule(&rule()).map_err(|e| {
        kernel(format!(
            "removing the probe rule (priority {RULE_PRIORITY}, table {TABLE})"
        ))(e.to_string())
    })?;
    let any = route(loopback, Ipv4Addr::UNSPECIFIED, 0);
    netlink::delete_route(&any).map_err(|e| {
        kernel(format!("removing the probe route (table {TABLE}, dev lo)"))(e.to_string())
    })?;
    Ok(())
}

/// Another instance whose probe program is live on this namespace's `lo`:
/// the marks name backend ids, which only one registry can give meaning.
fn other_prober(instance: &Instance, key: Key) -> Result<Option<String>, DataplaneError> {
    let root = Path::new(BPFFS).join("weir");
    let entries = match std::fs::read_dir(&root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(kernel(format!("reading {}", root.display()))(e.to_string())),
    };
    for entry in entries.flatten().take(100_000) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Ok(other) = Instance::new(&name) else {
            continue;
        };
        if name != instance.name() && find_live(&other, key)?.is_some() {
            return Ok(Some(name));
        }
    }
    Ok(None)
}

/// Attaches `weir_probe` at tc egress of `lo` (kept when it is already live
/// for this instance: one serves every uplink) and sets up its routing
/// from `lb_addr`, with room for the outer header within `uplink_mtu`.
/// `None` when `lb_addr` is no address of this namespace: the backends'
/// answers to checks would not come here, so there is no path to set up.
pub(super) fn attach(
    instance: &Instance,
    lb_addr: Ipv4Addr,
    uplink_mtu: u32,
) -> Result<Option<Attached>, DataplaneError> {
    let local = netlink::is_local(lb_addr).map_err(|e| {
        kernel(format!("asking the kernel whether {lb_addr} is local"))(e.to_string())
    })?;
    if !local {
        return Ok(None);
    }
    let key = key_here(Kind::Probe, LOOPBACK)?;
    let live = find_live(instance, key)?;
    let (attachment, attached_now, replaced) = match live {
        Some(existing) => (existing, false, Vec::new()),
        None => {
            if let Some(other) = other_prober(instance, key)? {
                return Err(DataplaneError::Kernel {
                    what: "attaching the probe path".into(),
                    detail: format!(
                        "instance {other} already probes from this network namespace (its \
                         program is on lo); one namespace has one probe path: detach {other} \
                         first"
                    ),
                });
            }
            let mut ebpf = load_object(instance)?;
            let (attachment, replaced) = super::attach_tc(
                instance,
                &mut ebpf,
                weir_ebpf::PROBE_PROGRAM,
                TcAttachType::Egress,
                key,
                LOOPBACK,
            )?;
            (attachment, true, replaced)
        }
    };
    if let Err(e) = install_routing(key.ifindex, lb_addr, uplink_mtu) {
        if !attached_now {
            return Err(e);
        }
        let _ = remove_routing(key.ifindex);
        return Err(super::unpin_after(&attachment, e));
    }
    Ok(Some(Attached {
        attachment,
        attached_now,
        replaced,
    }))
}

/// Removes the probe path from this namespace once no balancer of this
/// instance is attached here any more; returns what the program's link
/// was, `None` when the path stays (or was never here).
pub(super) fn detach_unless_used(instance: &Instance) -> Result<Option<Status>, DataplaneError> {
    let key = key_here(Kind::Probe, LOOPBACK)?;
    let (known, _) = super::scan(instance)?;
    let balancing_here = known
        .iter()
        .any(|a| a.kind == Kind::Xdp && a.netns == key.netns && attachment::status(a).live);
    let probe_here = known
        .iter()
        .any(|a| a.kind == Kind::Probe && a.netns == key.netns);
    if balancing_here || !probe_here {
        return Ok(None);
    }
    remove_routing(key.ifindex)?;
    super::detach_kind(instance, Kind::Probe, LOOPBACK).map(Some)
}

/// Where an instance's probe path is set up: read before `weir destroy`
/// removes its pins, released after.
pub struct Routed(Vec<attachment::Attachment>);

/// The probe attachments of `instance`, in every network namespace.
pub fn routed(instance: &Instance) -> Result<Routed, DataplaneError> {
    let (known, _) = super::scan(instance)?;
    Ok(Routed(
        known
            .into_iter()
            .filter(|a| a.kind == Kind::Probe)
            .collect(),
    ))
}

impl Routed {
    /// Removes the probe rule and route in each namespace it can enter
    /// (this one, or one `ip netns` names): with the program gone, the rule
    /// would send marked packets round `lo`. Returns the namespaces it
    /// could not enter, whose rule and route stay.
    pub fn release(self) -> Result<Vec<String>, DataplaneError> {
        let here = Netns::current()
            .map_err(|e| kernel("reading this network namespace")(e.to_string()))?;
        let mut unreachable = Vec::new();
        for a in self.0 {
            if a.netns == here {
                remove_routing(a.ifindex)?;
                continue;
            }
            let path = attachment::named_netns()
                .into_iter()
                .find(|(ino, _)| *ino == a.netns.0)
                .map(|(_, path)| path);
            let Some(path) = path else {
                unreachable.push(a.netns.label());
                continue;
            };
            let ifindex = a.ifindex;
            // On a thread of its own: entering a namespace is per thread.
            let removed = std::thread::scope(|s| {
                s.spawn(|| {
                    enter_netns(&path)?;
                    remove_routing(ifindex)
                })
                .join()
            });
            match removed {
                Ok(done) => done?,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        Ok(unreachable)
    }
}

/// Moves the calling thread into the network namespace at `path`.
fn enter_netns(path: &Path) -> Result<(), DataplaneError> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path)
        .map_err(|e| kernel(format!("opening {}", path.display()))(e.to_string()))?;
    // SAFETY: setns on this thread only, with a namespace descriptor we own.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(kernel(format!("entering {}", path.display()))(
            std::io::Error::last_os_error().to_string(),
        ));
    }
    Ok(())
}

/// The probe object against the instance's pinned maps, its program not
/// loaded yet.
fn load_object(instance: &Instance) -> Result<Ebpf, DataplaneError> {
    EbpfLoader::new()
        .default_map_pin_directory(instance.pin_dir())
        .load(weir_ebpf::probe_object())
        .map_err(|e| kernel("loading the probe object")(e.to_string()))
}

/// Loads the probe object and its program into the kernel, not attached:
/// for BPF_PROG_RUN tests.
pub fn load_program(instance: &Instance) -> Result<Ebpf, DataplaneError> {
    let mut ebpf = load_object(instance)?;
    super::load_classifier(&mut ebpf, weir_ebpf::PROBE_PROGRAM)?;
    Ok(ebpf)
}

/// Probe counters, summed over CPUs, in `abi::PROBE_COUNTERS` order;
/// `None` if this instance never attached the probe program.
pub fn counters(instance: &Instance) -> Result<Option<Vec<u64>>, DataplaneError> {
    super::percpu_counters(instance, abi::maps::PROBE_STATS, abi::PROBE_COUNTERS.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_carry_the_backend_id_under_the_mask() {
        for id in [0, 1, 4242, abi::MAX_BACKENDS - 1] {
            let mark = mark_for(id);
            assert_eq!(mark & abi::PROBE_MARK_MASK, abi::PROBE_MARK_BASE);
            assert_eq!(mark - abi::PROBE_MARK_BASE, id);
        }
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn an_id_past_the_registry_is_refused() {
        mark_for(abi::MAX_BACKENDS);
    }

    #[test]
    fn the_route_leaves_room_for_the_outer_header() {
        let r = route(1, Ipv4Addr::new(198, 18, 2, 2), 1500);
        assert_eq!(r.mtu, 1480);
        assert_eq!((r.table, r.oif), (TABLE, 1));
    }
}
