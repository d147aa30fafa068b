//! The registry as plain data, and the pure planning step of every change:
//! validate, apply the guard rails, and produce the next state and its diff.
//! Nothing here touches the kernel; `registry::maps` writes what this
//! decides.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use serde::Serialize;
use weir_ebpf::abi::{self, BackendState, ServiceMode};

use super::RegistryError;
use super::maglev;

/// A service's listener: VIP and TCP port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ServiceAddr {
    pub vip: Ipv4Addr,
    pub port: u16,
}

impl fmt::Display for ServiceAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.vip, self.port)
    }
}

/// A backend's address. For L4 services the port equals the service port:
/// packets reach the backend unchanged inside IPIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct BackendAddr {
    pub addr: Ipv4Addr,
    pub port: u16,
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.addr, self.port)
    }
}

impl BackendAddr {
    /// The bytes Maglev hashes: the same on every host.
    pub fn identity(&self) -> Vec<u8> {
        let mut id = self.addr.octets().to_vec();
        id.extend_from_slice(&self.port.to_be_bytes());
        id
    }
}

/// Guard-rail defaults: `max_remove_fraction` 0.5, `min_backends` 1.
pub const DEFAULT_MAX_REMOVE_PERMILLE: u32 = 500;
pub const DEFAULT_MIN_BACKENDS: u32 = 1;
pub const DEFAULT_RING_SIZE: u32 = 65537;
/// A ring needs at least 100 slots per backend to keep the shares fair.
pub const SLOTS_PER_BACKEND: u32 = 100;
/// The smallest prime ring that holds one backend.
pub const MIN_RING_SIZE: u32 = 101;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceEntry {
    pub id: u32,
    pub mode: ServiceModeName,
    pub ring_size: u32,
    pub min_backends: u32,
    pub max_remove_permille: u32,
}

/// Serializable service mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceModeName {
    L4,
    L7,
}

impl From<ServiceModeName> for ServiceMode {
    fn from(m: ServiceModeName) -> Self {
        match m {
            ServiceModeName::L4 => ServiceMode::L4,
            ServiceModeName::L7 => ServiceMode::L7,
        }
    }
}

impl From<ServiceMode> for ServiceModeName {
    fn from(m: ServiceMode) -> Self {
        match m {
            ServiceMode::L4 => ServiceModeName::L4,
            ServiceMode::L7 => ServiceModeName::L7,
        }
    }
}

impl fmt::Display for ServiceModeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::L4 => "l4",
            Self::L7 => "l7",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendEntry {
    pub service_id: u32,
    pub addr: BackendAddr,
    pub weight: u16,
    #[serde(serialize_with = "state_name")]
    pub state: BackendState,
}

fn state_name<S: serde::Serializer>(s: &BackendState, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(s.name())
}

/// Everything the registry holds, as read from (or to be written to) the
/// pinned maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct State {
    pub services: BTreeMap<ServiceAddr, ServiceEntry>,
    /// Occupied backend slots by id.
    pub backends: BTreeMap<u32, BackendEntry>,
    /// Empty slots that held a backend before: reusable only once no flow
    /// references them (quarantine).
    pub used_free: BTreeSet<u32>,
    /// Used slots a flow still references: never handed out. Filled by the
    /// writer from a flow-table scan, not stored in the maps.
    pub quarantined: BTreeSet<u32>,
}

impl State {
    pub fn service(&self, addr: &ServiceAddr) -> Result<&ServiceEntry, RegistryError> {
        self.services
            .get(addr)
            .ok_or(RegistryError::UnknownService(*addr))
    }

    pub fn service_by_id(&self, id: u32) -> Option<(&ServiceAddr, &ServiceEntry)> {
        self.services.iter().find(|(_, s)| s.id == id)
    }

    /// Backends of one service, by id.
    pub fn backends_of(&self, service_id: u32) -> impl Iterator<Item = (u32, &BackendEntry)> {
        self.backends
            .iter()
            .filter(move |(_, b)| b.service_id == service_id)
            .map(|(id, b)| (*id, b))
    }

    fn find_backend(&self, service_id: u32, addr: &BackendAddr) -> Option<u32> {
        self.backends_of(service_id)
            .find(|(_, b)| &b.addr == addr)
            .map(|(id, _)| id)
    }

    fn active_count(&self, service_id: u32) -> usize {
        self.backends_of(service_id)
            .filter(|(_, b)| b.state == BackendState::Active)
            .count()
    }

    /// The Maglev table a service must have for this state.
    pub fn ring_for(&self, service_id: u32, ring_size: u32) -> Result<Vec<u32>, RegistryError> {
        let members: Vec<maglev::Member> = self
            .backends_of(service_id)
            .filter(|(_, b)| b.state == BackendState::Active)
            .map(|(id, b)| maglev::Member {
                id,
                identity: b.addr.identity(),
                weight: b.weight as u32,
            })
            .collect();
        Ok(maglev::build(&members, ring_size)?)
    }
}

/// One operator (or discovery) request.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    AddService {
        addr: ServiceAddr,
        mode: ServiceModeName,
        ring_size: Option<u32>,
        max_remove_fraction: Option<f64>,
        min_backends: Option<u32>,
    },
    RemoveService {
        addr: ServiceAddr,
    },
    AddBackend {
        service: ServiceAddr,
        backend: BackendAddr,
        weight: u16,
    },
    DrainBackend {
        service: ServiceAddr,
        backend: BackendAddr,
    },
    RemoveBackend {
        service: ServiceAddr,
        backend: BackendAddr,
    },
    SetWeight {
        service: ServiceAddr,
        backend: BackendAddr,
        weight: u16,
    },
    /// Declarative: exactly these backends are active afterwards; the others
    /// are removed (drained first: their flows keep flowing).
    SetBackends {
        service: ServiceAddr,
        backends: Vec<(BackendAddr, u16)>,
    },
    /// Frees removed backends that no flow references any more.
    Collect {
        unreferenced: BTreeSet<u32>,
    },
}

/// One line of a diff, for the operator and the audit log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum DiffLine {
    ServiceAdded {
        service: ServiceAddr,
        id: u32,
        mode: ServiceModeName,
        ring_size: u32,
    },
    ServiceRemoved {
        service: ServiceAddr,
        id: u32,
    },
    BackendAdded {
        service: ServiceAddr,
        backend: BackendAddr,
        id: u32,
        weight: u16,
    },
    BackendState {
        service: ServiceAddr,
        backend: BackendAddr,
        id: u32,
        from: String,
        to: String,
    },
    BackendWeight {
        service: ServiceAddr,
        backend: BackendAddr,
        id: u32,
        from: u16,
        to: u16,
    },
    BackendFreed {
        service: ServiceAddr,
        backend: BackendAddr,
        id: u32,
    },
}

impl fmt::Display for DiffLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ServiceAdded {
                service,
                id,
                mode,
                ring_size,
            } => {
                write!(f, "+ service {service} (id {id}, {mode}, ring {ring_size})")
            }
            Self::ServiceRemoved { service, id } => write!(f, "- service {service} (id {id})"),
            Self::BackendAdded {
                service,
                backend,
                id,
                weight,
            } => {
                write!(f, "+ {service} backend {backend} weight {weight} (id {id})")
            }
            Self::BackendState {
                service,
                backend,
                id,
                from,
                to,
            } => {
                write!(f, "~ {service} backend {backend}: {from} -> {to} (id {id})")
            }
            Self::BackendWeight {
                service,
                backend,
                id,
                from,
                to,
            } => {
                write!(
                    f,
                    "~ {service} backend {backend}: weight {from} -> {to} (id {id})"
                )
            }
            Self::BackendFreed {
                service,
                backend,
                id,
            } => {
                write!(f, "- {service} backend {backend} freed (id {id})")
            }
        }
    }
}

/// What a change does: the next state, the diff, and which services need a
/// new ring table.
#[derive(Clone, Debug)]
pub struct Plan {
    pub next: State,
    pub diff: Vec<DiffLine>,
    pub rings: BTreeSet<u32>,
}

/// Validates `change` against `state` and the guard rails and computes the
/// result. `force` overrides the guard rails (never validation).
pub fn plan(state: &State, change: &Change, force: bool) -> Result<Plan, RegistryError> {
    let mut next = state.clone();
    let mut diff = Vec::new();
    let mut rings = BTreeSet::new();

    match change {
        Change::AddService {
            addr,
            mode,
            ring_size,
            max_remove_fraction,
            min_backends,
        } => {
            if state.services.contains_key(addr) {
                return Err(RegistryError::ServiceExists(*addr));
            }
            if addr.port == 0 {
                return Err(RegistryError::Invalid(format!(
                    "service {addr}: port 0 is not a valid port"
                )));
            }
            check_vip(addr, *mode)?;
            let ring_size = ring_size.unwrap_or(DEFAULT_RING_SIZE);
            if !maglev::is_prime(ring_size)
                || !(MIN_RING_SIZE..=abi::MAX_RING_SIZE).contains(&ring_size)
            {
                return Err(RegistryError::Invalid(format!(
                    "ring size {ring_size} must be a prime between {MIN_RING_SIZE} ({SLOTS_PER_BACKEND} \
                     slots per backend, one backend) and {} (e.g. 65537, 1000003)",
                    abi::MAX_RING_SIZE
                )));
            }
            let permille = match max_remove_fraction {
                None => DEFAULT_MAX_REMOVE_PERMILLE,
                Some(f) if (0.0..=1.0).contains(f) => (f * 1000.0).round() as u32,
                Some(f) => {
                    return Err(RegistryError::Invalid(format!(
                        "max-remove-fraction {f} must be between 0 and 1"
                    )));
                }
            };
            let used: BTreeSet<u32> = state.services.values().map(|s| s.id).collect();
            let id = (0..abi::MAX_SERVICES)
                .find(|i| !used.contains(i))
                .ok_or(RegistryError::Full("services", abi::MAX_SERVICES))?;
            next.services.insert(
                *addr,
                ServiceEntry {
                    id,
                    mode: *mode,
                    ring_size,
                    min_backends: min_backends.unwrap_or(DEFAULT_MIN_BACKENDS),
                    max_remove_permille: permille,
                },
            );
            diff.push(DiffLine::ServiceAdded {
                service: *addr,
                id,
                mode: *mode,
                ring_size,
            });
            rings.insert(id);
        }
        Change::RemoveService { addr } => {
            let svc = state.service(addr)?;
            let serving: Vec<u32> = state
                .backends_of(svc.id)
                .filter(|(_, b)| b.state != BackendState::Empty)
                .map(|(id, _)| id)
                .collect();
            if !serving.is_empty() && !force {
                let removed = state
                    .backends_of(svc.id)
                    .filter(|(_, b)| b.state == BackendState::Removed)
                    .count();
                let live = serving.len() - removed;
                return Err(RegistryError::Guard(format!(
                    "service {addr} still has {live} backend(s) and {removed} removed one(s) whose \
                     flows are still in the flow table; remove the backends first, or pass --force \
                     to remove the service now (established connections to it will be cut)"
                )));
            }
            for id in serving {
                let b = next.backends.remove(&id).expect("listed above");
                next.used_free.insert(id);
                diff.push(DiffLine::BackendFreed {
                    service: *addr,
                    backend: b.addr,
                    id,
                });
            }
            next.services.remove(addr);
            diff.push(DiffLine::ServiceRemoved {
                service: *addr,
                id: svc.id,
            });
            rings.insert(svc.id);
        }
        Change::AddBackend {
            service,
            backend,
            weight,
        } => {
            let svc = state.service(service)?.clone();
            check_backend(service, &svc, backend, *weight)?;
            match state.find_backend(svc.id, backend) {
                Some(id) => {
                    let cur = &state.backends[&id];
                    if cur.state == BackendState::Active {
                        return Err(RegistryError::DuplicateBackend(*backend, *service));
                    }
                    set_state(&mut next, &mut diff, service, id, BackendState::Active);
                    set_weight(&mut next, &mut diff, service, id, *weight);
                }
                None => {
                    add_backend(&mut next, &mut diff, service, &svc, *backend, *weight)?;
                }
            }
            check_capacity(&next, service, &svc)?;
            rings.insert(svc.id);
        }
        Change::DrainBackend { service, backend } | Change::RemoveBackend { service, backend } => {
            let svc = state.service(service)?.clone();
            let id = state
                .find_backend(svc.id, backend)
                .ok_or(RegistryError::UnknownBackend(*backend, *service))?;
            let cur = state.backends[&id].state;
            let to = if matches!(change, Change::DrainBackend { .. }) {
                if cur != BackendState::Active {
                    return Err(RegistryError::Invalid(format!(
                        "backend {backend} of {service} is {}, not active: nothing to drain",
                        cur.name()
                    )));
                }
                BackendState::Draining
            } else {
                if cur == BackendState::Removed {
                    return Err(RegistryError::Invalid(format!(
                        "backend {backend} of {service} is already removed (its flows are draining)"
                    )));
                }
                BackendState::Removed
            };
            set_state(&mut next, &mut diff, service, id, to);
            if force && to == BackendState::Removed {
                free_backend(&mut next, &mut diff, service, id);
            }
            rings.insert(svc.id);
        }
        Change::SetWeight {
            service,
            backend,
            weight,
        } => {
            let svc = state.service(service)?.clone();
            check_backend(service, &svc, backend, *weight)?;
            let id = state
                .find_backend(svc.id, backend)
                .ok_or(RegistryError::UnknownBackend(*backend, *service))?;
            if state.backends[&id].weight == *weight {
                return Err(RegistryError::Invalid(format!(
                    "backend {backend} of {service} already has weight {weight}"
                )));
            }
            set_weight(&mut next, &mut diff, service, id, *weight);
            rings.insert(svc.id);
        }
        Change::SetBackends { service, backends } => {
            let svc = state.service(service)?.clone();
            let mut seen = BTreeSet::new();
            for (b, w) in backends {
                check_backend(service, &svc, b, *w)?;
                if !seen.insert(*b) {
                    return Err(RegistryError::DuplicateBackend(*b, *service));
                }
            }
            // One pass to index the service's backends: a set of 10,000
            // must not cost 10,000 scans.
            let current: std::collections::HashMap<BackendAddr, u32> = state
                .backends_of(svc.id)
                .map(|(id, b)| (b.addr, id))
                .collect();
            for (b, w) in backends {
                match current.get(b).copied() {
                    Some(id) => {
                        set_state(&mut next, &mut diff, service, id, BackendState::Active);
                        set_weight(&mut next, &mut diff, service, id, *w);
                    }
                    None => add_backend(&mut next, &mut diff, service, &svc, *b, *w)?,
                }
            }
            let leaving: Vec<u32> = state
                .backends_of(svc.id)
                .filter(|(_, b)| {
                    !seen.contains(&b.addr)
                        && matches!(
                            b.state,
                            BackendState::Active | BackendState::Draining | BackendState::Down
                        )
                })
                .map(|(id, _)| id)
                .collect();
            for id in leaving {
                set_state(&mut next, &mut diff, service, id, BackendState::Removed);
            }
            check_capacity(&next, service, &svc)?;
            rings.insert(svc.id);
        }
        Change::Collect { unreferenced } => {
            let removed: Vec<(u32, u32)> = state
                .backends
                .iter()
                .filter(|(id, b)| b.state == BackendState::Removed && unreferenced.contains(id))
                .map(|(id, b)| (*id, b.service_id))
                .collect();
            for (id, service_id) in removed {
                let service =
                    *state
                        .service_by_id(service_id)
                        .map(|(a, _)| a)
                        .ok_or_else(|| {
                            RegistryError::Corrupt(format!(
                                "backend {id} names unknown service {service_id}"
                            ))
                        })?;
                free_backend(&mut next, &mut diff, &service, id);
            }
        }
    }

    if !force {
        for &service_id in &rings {
            check_guard_rails(state, &next, service_id)?;
        }
    }
    Ok(Plan { next, diff, rings })
}

fn check_backend(
    service: &ServiceAddr,
    svc: &ServiceEntry,
    backend: &BackendAddr,
    weight: u16,
) -> Result<(), RegistryError> {
    if weight == 0 {
        return Err(RegistryError::Invalid(format!(
            "backend {backend}: weight must be 1..65535 (use `weir backend drain` to stop new connections)"
        )));
    }
    // A backend that is the service itself forwards to itself: packets (L4)
    // or connections (L7) loop until something drops them.
    let a = backend.addr;
    let same_host =
        a == service.vip && (svc.mode == ServiceModeName::L4 || backend.port == service.port);
    if same_host {
        return Err(RegistryError::Invalid(format!(
            "backend {backend} is the service {service} itself: traffic would loop back to weir"
        )));
    }
    // L7 backends may sit on this host; an L4 backend must be reachable
    // over the wire.
    let loopback = a.is_loopback() && svc.mode == ServiceModeName::L4;
    if a.is_unspecified() || a.is_broadcast() || a.is_multicast() || loopback {
        return Err(RegistryError::Invalid(format!(
            "backend address {a} is not a unicast address another host can reach"
        )));
    }
    if svc.mode == ServiceModeName::L4 && backend.port != service.port {
        return Err(RegistryError::Invalid(format!(
            "backend {backend}: an L4 service forwards packets unchanged inside IPIP, so the backend \
             port must be the service port {}",
            service.port
        )));
    }
    if backend.port == 0 {
        return Err(RegistryError::Invalid(format!(
            "backend {backend}: port 0 is not a valid port"
        )));
    }
    Ok(())
}

fn check_capacity(
    next: &State,
    service: &ServiceAddr,
    svc: &ServiceEntry,
) -> Result<(), RegistryError> {
    let active = next.active_count(svc.id) as u32;
    let max = svc.ring_size / SLOTS_PER_BACKEND;
    if active > max {
        return Err(RegistryError::Invalid(format!(
            "service {service} would have {active} active backends but its ring of {} slots keeps \
             shares fair for at most {max}; recreate it with a larger --ring-size (at least {})",
            svc.ring_size,
            smallest_ring_for(active)
        )));
    }
    Ok(())
}

/// The smallest prime ring with [`SLOTS_PER_BACKEND`] slots for each of
/// `backends`.
fn smallest_ring_for(backends: u32) -> u32 {
    u64::from(backends.max(1))
        .checked_mul(u64::from(SLOTS_PER_BACKEND))
        .and_then(|n| u32::try_from(n).ok())
        .and_then(maglev::checked_next_prime)
        .unwrap_or(abi::MAX_RING_SIZE)
}

/// A VIP must be an address clients can send to and this host can own:
/// never unspecified, "this network", broadcast, multicast or reserved.
/// Loopback is fine for L7 (`weir run` listens there) but not for L4: XDP
/// never sees loopback traffic.
fn check_vip(addr: &ServiceAddr, mode: ServiceModeName) -> Result<(), RegistryError> {
    let v = addr.vip;
    let why = if v.octets()[0] == 0 {
        Some("is unspecified (0.0.0.0/8 names no host)")
    } else if v.is_broadcast() {
        Some("is the broadcast address")
    } else if v.is_multicast() {
        Some("is a multicast address")
    } else if v.octets()[0] >= 240 {
        Some("is reserved (240.0.0.0/4)")
    } else if v.is_loopback() && mode == ServiceModeName::L4 {
        Some("is a loopback address, which XDP never sees (use --mode l7 for a local proxy)")
    } else {
        None
    };
    match why {
        Some(why) => Err(RegistryError::Invalid(format!(
            "service {addr}: the VIP {v} {why}; a VIP must be a unicast address clients can reach"
        ))),
        None => Ok(()),
    }
}

fn check_guard_rails(before: &State, after: &State, service_id: u32) -> Result<(), RegistryError> {
    let Some((addr, svc)) = before.service_by_id(service_id) else {
        return Ok(());
    };
    if !after.services.contains_key(addr) {
        return Ok(());
    }
    let was_active: BTreeSet<u32> = before
        .backends_of(service_id)
        .filter(|(_, b)| b.state == BackendState::Active)
        .map(|(id, _)| id)
        .collect();
    let lost = was_active
        .iter()
        .filter(|id| {
            after
                .backends
                .get(id)
                .is_none_or(|b| b.state != BackendState::Active)
        })
        .count() as u64;
    if lost == 0 {
        return Ok(());
    }
    let before_n = was_active.len() as u64;
    let after_n = after.active_count(service_id) as u64;
    if lost * 1000 > svc.max_remove_permille as u64 * before_n {
        return Err(RegistryError::Guard(format!(
            "refusing to take {lost} of {before_n} active backends of {addr} out of service \
             (limit {:.0}%); pass --force if this is intended",
            svc.max_remove_permille as f64 / 10.0
        )));
    }
    if after_n < svc.min_backends as u64 && after_n < before_n {
        return Err(RegistryError::Guard(format!(
            "refusing to leave {after_n} active backend(s) for {addr} (minimum {}); pass --force \
             if this is intended",
            svc.min_backends
        )));
    }
    Ok(())
}

fn add_backend(
    next: &mut State,
    diff: &mut Vec<DiffLine>,
    service: &ServiceAddr,
    svc: &ServiceEntry,
    addr: BackendAddr,
    weight: u16,
) -> Result<(), RegistryError> {
    // Never-used slots first; a used slot only once the quarantine cleared
    // it (the caller removes referenced slots from `used_free`).
    // Allocation always takes the lowest never-used slot and used slots never
    // become never-used again, so the never-used slots are a suffix.
    let high_water = [
        next.backends.last_key_value().map(|(k, _)| *k),
        next.used_free.last().copied(),
        next.quarantined.last().copied(),
    ]
    .into_iter()
    .flatten()
    .max()
    .map_or(0, |k| k + 1);
    let id = Some(high_water)
        .filter(|id| *id < abi::MAX_BACKENDS)
        .or_else(|| next.used_free.first().copied())
        .ok_or_else(|| {
            RegistryError::Invalid(format!(
                "all {} backend slots are taken or still referenced by flows of removed backends \
                 ({} quarantined); `weir backend remove --force` frees a removed backend's slot now",
                abi::MAX_BACKENDS,
                next.quarantined.len()
            ))
        })?;
    next.used_free.remove(&id);
    next.backends.insert(
        id,
        BackendEntry {
            service_id: svc.id,
            addr,
            weight,
            state: BackendState::Active,
        },
    );
    diff.push(DiffLine::BackendAdded {
        service: *service,
        backend: addr,
        id,
        weight,
    });
    Ok(())
}

fn set_state(
    next: &mut State,
    diff: &mut Vec<DiffLine>,
    service: &ServiceAddr,
    id: u32,
    to: BackendState,
) {
    let b = next
        .backends
        .get_mut(&id)
        .expect("caller found the backend");
    if b.state != to {
        diff.push(DiffLine::BackendState {
            service: *service,
            backend: b.addr,
            id,
            from: b.state.name().into(),
            to: to.name().into(),
        });
        b.state = to;
    }
}

fn set_weight(next: &mut State, diff: &mut Vec<DiffLine>, service: &ServiceAddr, id: u32, to: u16) {
    let b = next
        .backends
        .get_mut(&id)
        .expect("caller found the backend");
    if b.weight != to {
        diff.push(DiffLine::BackendWeight {
            service: *service,
            backend: b.addr,
            id,
            from: b.weight,
            to,
        });
        b.weight = to;
    }
}

fn free_backend(next: &mut State, diff: &mut Vec<DiffLine>, service: &ServiceAddr, id: u32) {
    if let Some(b) = next.backends.remove(&id) {
        next.used_free.insert(id);
        diff.push(DiffLine::BackendFreed {
            service: *service,
            backend: b.addr,
            id,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(port: u16) -> ServiceAddr {
        ServiceAddr {
            vip: Ipv4Addr::new(198, 19, 0, 10),
            port,
        }
    }

    fn be(i: u8) -> BackendAddr {
        BackendAddr {
            addr: Ipv4Addr::new(198, 18, 10, i),
            port: 80,
        }
    }

    fn add_service(state: &State, ring: u32, min: u32, frac: f64) -> State {
        let change = Change::AddService {
            addr: svc(80),
            mode: ServiceModeName::L4,
            ring_size: Some(ring),
            max_remove_fraction: Some(frac),
            min_backends: Some(min),
        };
        plan(state, &change, false).unwrap().next
    }

    /// A service on port 80 with backends 1..=n active, weight 1.
    fn with_backends(n: u8, min: u32, frac: f64) -> State {
        let s = add_service(&State::default(), 65537, min, frac);
        let set = (1..=n).map(|i| (be(i), 1)).collect();
        plan(
            &s,
            &Change::SetBackends {
                service: svc(80),
                backends: set,
            },
            false,
        )
        .unwrap()
        .next
    }

    fn state_of(s: &State, addr: BackendAddr) -> Option<BackendState> {
        s.backends
            .values()
            .find(|b| b.addr == addr)
            .map(|b| b.state)
    }

    #[test]
    fn services_get_the_lowest_free_id_and_defaults() {
        let mut s = State::default();
        for port in [80, 81, 82] {
            let change = Change::AddService {
                addr: svc(port),
                mode: ServiceModeName::L7,
                ring_size: None,
                max_remove_fraction: None,
                min_backends: None,
            };
            s = plan(&s, &change, false).unwrap().next;
        }
        let p = plan(&s, &Change::RemoveService { addr: svc(81) }, false).unwrap();
        assert!(p.rings.contains(&1));
        let change = Change::AddService {
            addr: svc(90),
            mode: ServiceModeName::L4,
            ring_size: None,
            max_remove_fraction: None,
            min_backends: None,
        };
        let next = plan(&p.next, &change, false).unwrap().next;
        let e = &next.services[&svc(90)];
        assert_eq!(e.id, 1, "freed id reused");
        assert_eq!(
            (e.ring_size, e.min_backends, e.max_remove_permille),
            (
                DEFAULT_RING_SIZE,
                DEFAULT_MIN_BACKENDS,
                DEFAULT_MAX_REMOVE_PERMILLE
            )
        );
    }

    #[test]
    fn service_validation() {
        let s = add_service(&State::default(), 65537, 1, 0.5);
        let bad = |ring: Option<u32>, frac: Option<f64>, port: u16| Change::AddService {
            addr: svc(port),
            mode: ServiceModeName::L4,
            ring_size: ring,
            max_remove_fraction: frac,
            min_backends: None,
        };
        assert!(matches!(
            plan(&s, &bad(None, None, 80), false),
            Err(RegistryError::ServiceExists(_))
        ));
        for change in [
            bad(Some(65536), None, 81),
            bad(Some(2), None, 81),
            bad(Some(abi::MAX_RING_SIZE + 2), None, 81),
            bad(None, Some(1.5), 81),
            bad(None, Some(-0.1), 81),
            bad(None, None, 0),
        ] {
            assert!(
                matches!(plan(&s, &change, false), Err(RegistryError::Invalid(_))),
                "{change:?}"
            );
        }
        assert!(matches!(
            plan(&s, &Change::RemoveService { addr: svc(99) }, false),
            Err(RegistryError::UnknownService(_))
        ));
    }

    #[test]
    fn backend_validation() {
        let s = with_backends(2, 1, 0.5);
        let add = |addr: BackendAddr, weight: u16| Change::AddBackend {
            service: svc(80),
            backend: addr,
            weight,
        };
        let cases = [
            (add(be(1), 1), "duplicate"),
            (
                add(
                    BackendAddr {
                        addr: Ipv4Addr::new(198, 18, 10, 9),
                        port: 81,
                    },
                    1,
                ),
                "port",
            ),
            (add(be(9), 0), "weight"),
            (
                add(
                    BackendAddr {
                        addr: Ipv4Addr::LOCALHOST,
                        port: 80,
                    },
                    1,
                ),
                "unicast",
            ),
            (
                add(
                    BackendAddr {
                        addr: Ipv4Addr::UNSPECIFIED,
                        port: 80,
                    },
                    1,
                ),
                "unicast",
            ),
            (
                add(
                    BackendAddr {
                        addr: Ipv4Addr::new(224, 0, 0, 1),
                        port: 80,
                    },
                    1,
                ),
                "unicast",
            ),
        ];
        for (change, what) in cases {
            let err = plan(&s, &change, true).expect_err(what).to_string();
            assert!(err.contains(what) || err.contains("twice"), "{what}: {err}");
        }
        let drain_missing = Change::DrainBackend {
            service: svc(80),
            backend: be(9),
        };
        assert!(matches!(
            plan(&s, &drain_missing, false),
            Err(RegistryError::UnknownBackend(..))
        ));
        let same_weight = Change::SetWeight {
            service: svc(80),
            backend: be(1),
            weight: 1,
        };
        assert!(matches!(
            plan(&s, &same_weight, false),
            Err(RegistryError::Invalid(_))
        ));
        let dup = Change::SetBackends {
            service: svc(80),
            backends: vec![(be(1), 1), (be(1), 2)],
        };
        assert!(matches!(
            plan(&s, &dup, false),
            Err(RegistryError::DuplicateBackend(..))
        ));
    }

    #[test]
    fn guard_rails_count_active_backends_removed() {
        let s = with_backends(4, 1, 0.5);
        let set = |ids: &[u8]| Change::SetBackends {
            service: svc(80),
            backends: ids.iter().map(|i| (be(*i), 1)).collect(),
        };
        // Exactly half is allowed, more is not.
        assert!(plan(&s, &set(&[1, 2]), false).is_ok());
        assert!(matches!(
            plan(&s, &set(&[1]), false),
            Err(RegistryError::Guard(_))
        ));
        assert!(plan(&s, &set(&[1]), true).is_ok(), "--force overrides");
        // Replacing backends counts removals, not the net change.
        assert!(matches!(
            plan(&s, &set(&[5, 6, 7, 8]), false),
            Err(RegistryError::Guard(_))
        ));
        // min_backends: 3 of 4 stay, but the minimum is 4.
        let strict = with_backends(4, 4, 0.5);
        let drain = Change::DrainBackend {
            service: svc(80),
            backend: be(1),
        };
        let err = plan(&strict, &drain, false).unwrap_err().to_string();
        assert!(err.contains("minimum 4"), "{err}");
        // Adding is never refused by the guard rails, even below the minimum.
        let add = Change::AddBackend {
            service: svc(80),
            backend: be(9),
            weight: 1,
        };
        let few = with_backends(1, 4, 0.5);
        assert!(plan(&few, &add, false).is_ok());
        // Weight changes remove nothing.
        let w = Change::SetWeight {
            service: svc(80),
            backend: be(1),
            weight: 9,
        };
        assert!(plan(&strict, &w, false).is_ok());
    }

    #[test]
    fn set_diffs_and_drains_leavers() {
        let s = with_backends(3, 1, 0.5);
        let change = Change::SetBackends {
            service: svc(80),
            backends: vec![(be(1), 1), (be(2), 5), (be(4), 1)],
        };
        let p = plan(&s, &change, false).unwrap();
        assert_eq!(state_of(&p.next, be(3)), Some(BackendState::Removed));
        assert_eq!(
            p.next
                .backends
                .values()
                .find(|b| b.addr == be(2))
                .unwrap()
                .weight,
            5
        );
        let text: Vec<String> = p.diff.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "~ 198.19.0.10:80 backend 198.18.10.2:80: weight 1 -> 5 (id 1)",
                "+ 198.19.0.10:80 backend 198.18.10.4:80 weight 1 (id 3)",
                "~ 198.19.0.10:80 backend 198.18.10.3:80: active -> removed (id 2)",
            ]
        );
        // The same set again is no change at all.
        let again = plan(&p.next, &change, false).unwrap();
        assert!(again.diff.is_empty());
        // A removed backend listed again comes back active in its slot.
        let back = Change::SetBackends {
            service: svc(80),
            backends: vec![(be(1), 1), (be(2), 5), (be(3), 1), (be(4), 1)],
        };
        let p2 = plan(&p.next, &back, false).unwrap();
        assert_eq!(state_of(&p2.next, be(3)), Some(BackendState::Active));
        assert_eq!(
            p2.next
                .backends
                .iter()
                .find(|(_, b)| b.addr == be(3))
                .unwrap()
                .0,
            &2
        );
    }

    #[test]
    fn drain_remove_and_reactivate() {
        let s = with_backends(3, 1, 0.5);
        let drain = Change::DrainBackend {
            service: svc(80),
            backend: be(2),
        };
        let drained = plan(&s, &drain, false).unwrap().next;
        assert_eq!(state_of(&drained, be(2)), Some(BackendState::Draining));
        assert!(plan(&drained, &drain, false).is_err(), "draining twice");
        let add = Change::AddBackend {
            service: svc(80),
            backend: be(2),
            weight: 3,
        };
        let back = plan(&drained, &add, false).unwrap().next;
        assert_eq!(state_of(&back, be(2)), Some(BackendState::Active));

        let remove = Change::RemoveBackend {
            service: svc(80),
            backend: be(2),
        };
        let removed = plan(&s, &remove, false).unwrap().next;
        assert_eq!(state_of(&removed, be(2)), Some(BackendState::Removed));
        assert!(plan(&removed, &remove, false).is_err(), "removing twice");
        let forced = plan(&s, &remove, true).unwrap().next;
        assert_eq!(state_of(&forced, be(2)), None, "--force frees the slot now");
        assert!(forced.used_free.contains(&1));
    }

    #[test]
    fn collect_frees_only_unreferenced_removed_backends() {
        let s = with_backends(4, 1, 0.5);
        let set = Change::SetBackends {
            service: svc(80),
            backends: vec![(be(1), 1), (be(2), 1)],
        };
        let s = plan(&s, &set, false).unwrap().next;
        let collect = Change::Collect {
            unreferenced: BTreeSet::from([0, 2]),
        };
        let p = plan(&s, &collect, false).unwrap();
        assert!(
            !p.next.backends.contains_key(&2),
            "removed and unreferenced: freed"
        );
        assert_eq!(
            state_of(&p.next, be(4)),
            Some(BackendState::Removed),
            "still referenced"
        );
        assert_eq!(
            state_of(&p.next, be(1)),
            Some(BackendState::Active),
            "active ones untouched"
        );
        assert!(
            p.rings.is_empty(),
            "freeing removed backends changes no ring"
        );
    }

    #[test]
    fn slots_come_from_the_never_used_suffix_then_quarantine() {
        let s = with_backends(2, 1, 0.5);
        let remove = Change::RemoveBackend {
            service: svc(80),
            backend: be(1),
        };
        let s = plan(&s, &remove, true).unwrap().next;
        let add = Change::AddBackend {
            service: svc(80),
            backend: be(7),
            weight: 1,
        };
        let p = plan(&s, &add, false).unwrap();
        let id = p
            .next
            .backends
            .iter()
            .find(|(_, b)| b.addr == be(7))
            .unwrap()
            .0;
        assert_eq!(*id, 2, "never-used slot, not the quarantined 0");

        // With the never-used slots exhausted, a cleared used slot is taken.
        let mut full = s.clone();
        full.used_free.insert(abi::MAX_BACKENDS - 1);
        let p = plan(&full, &add, false).unwrap();
        let id = p
            .next
            .backends
            .iter()
            .find(|(_, b)| b.addr == be(7))
            .unwrap()
            .0;
        assert_eq!(*id, 0);
        full.used_free.clear();
        full.backends.insert(
            abi::MAX_BACKENDS - 1,
            BackendEntry {
                service_id: 0,
                addr: be(200),
                weight: 1,
                state: BackendState::Active,
            },
        );
        let err = plan(&full, &add, true).unwrap_err().to_string();
        assert!(err.contains("slots are taken"), "{err}");
    }

    #[test]
    fn capacity_follows_the_ring_size() {
        let s = add_service(&State::default(), 251, 1, 0.5);
        let set = |n: u8| Change::SetBackends {
            service: svc(80),
            backends: (1..=n).map(|i| (be(i), 1)).collect(),
        };
        assert!(plan(&s, &set(2), false).is_ok());
        let err = plan(&s, &set(3), false).unwrap_err().to_string();
        assert!(err.contains("at most 2"), "{err}");
    }

    #[test]
    fn unusable_vips_are_refused() {
        let add = |vip: [u8; 4], mode| Change::AddService {
            addr: ServiceAddr {
                vip: Ipv4Addr::from(vip),
                port: 80,
            },
            mode,
            ring_size: None,
            max_remove_fraction: None,
            min_backends: None,
        };
        for (vip, mode, why) in [
            ([0, 0, 0, 0], ServiceModeName::L4, "unspecified"),
            ([0, 0, 0, 0], ServiceModeName::L7, "unspecified"),
            ([0, 1, 2, 3], ServiceModeName::L4, "unspecified"),
            ([255, 255, 255, 255], ServiceModeName::L4, "broadcast"),
            ([224, 0, 0, 1], ServiceModeName::L4, "multicast"),
            ([239, 1, 2, 3], ServiceModeName::L7, "multicast"),
            ([240, 0, 0, 1], ServiceModeName::L4, "reserved"),
            ([127, 0, 0, 1], ServiceModeName::L4, "loopback"),
        ] {
            let e = plan(&State::default(), &add(vip, mode), false)
                .expect_err(why)
                .to_string();
            assert!(e.contains(why) && e.contains("VIP"), "{vip:?} {mode}: {e}");
        }
        // `weir run` serves L7 services on loopback.
        plan(
            &State::default(),
            &add([127, 0, 0, 1], ServiceModeName::L7),
            false,
        )
        .unwrap();
        plan(
            &State::default(),
            &add([198, 19, 0, 1], ServiceModeName::L4),
            false,
        )
        .unwrap();
    }

    #[test]
    fn a_backend_equal_to_its_service_is_a_loop() {
        let s = with_backends(1, 1, 0.5);
        let itself = BackendAddr {
            addr: svc(80).vip,
            port: 80,
        };
        for change in [
            Change::AddBackend {
                service: svc(80),
                backend: itself,
                weight: 1,
            },
            Change::SetBackends {
                service: svc(80),
                backends: vec![(be(1), 1), (itself, 1)],
            },
        ] {
            let e = plan(&s, &change, true).unwrap_err().to_string();
            assert!(e.contains("is the service") && e.contains("loop"), "{e}");
        }
        // L7: the VIP's host is fine on another port, not on the service's.
        let l7 = ServiceAddr {
            vip: Ipv4Addr::LOCALHOST,
            port: 8080,
        };
        let s = plan(
            &State::default(),
            &Change::AddService {
                addr: l7,
                mode: ServiceModeName::L7,
                ring_size: None,
                max_remove_fraction: None,
                min_backends: None,
            },
            false,
        )
        .unwrap()
        .next;
        let add = |port| Change::AddBackend {
            service: l7,
            backend: BackendAddr {
                addr: Ipv4Addr::LOCALHOST,
                port,
            },
            weight: 1,
        };
        assert!(
            plan(&s, &add(8080), false)
                .unwrap_err()
                .to_string()
                .contains("loop")
        );
        plan(&s, &add(9000), false).unwrap();
    }

    #[test]
    fn a_ring_too_small_for_one_backend_is_refused_up_front() {
        let add = |ring| Change::AddService {
            addr: svc(80),
            mode: ServiceModeName::L4,
            ring_size: Some(ring),
            max_remove_fraction: None,
            min_backends: None,
        };
        for ring in [3, 31, 97] {
            let e = plan(&State::default(), &add(ring), false)
                .unwrap_err()
                .to_string();
            assert!(e.contains("between 101"), "{ring}: {e}");
        }
        // 101 holds exactly one backend.
        let s = add_service(&State::default(), 101, 1, 1.0);
        let set = |n: u8| Change::SetBackends {
            service: svc(80),
            backends: (1..=n).map(|i| (be(i), 1)).collect(),
        };
        plan(&s, &set(1), false).unwrap();
        // The advice names the smallest ring that fits, not the default.
        let e = plan(&s, &set(2), false).unwrap_err().to_string();
        assert!(e.contains("at least 211)"), "{e}");
    }

    #[test]
    fn rings_hold_only_active_backends_by_weight() {
        let s = with_backends(3, 1, 0.5);
        let s = plan(
            &s,
            &Change::DrainBackend {
                service: svc(80),
                backend: be(3),
            },
            false,
        )
        .unwrap()
        .next;
        let s = plan(
            &s,
            &Change::SetWeight {
                service: svc(80),
                backend: be(2),
                weight: 3,
            },
            false,
        )
        .unwrap()
        .next;
        let ring = s.ring_for(0, 65537).unwrap();
        let count = |id: u32| ring.iter().filter(|x| **x == id).count() as f64;
        assert_eq!(count(2), 0.0, "draining backend owns no slot");
        assert!((count(1) / count(0) - 3.0).abs() < 0.03);
        assert_eq!(count(0) + count(1), 65537.0);
    }

    #[test]
    fn quarantined_slots_are_never_handed_out() {
        // Slots 0..=9 serve; every other slot was used once. With the
        // never-used suffix gone, a slot comes from the cleared ones only,
        // whatever the highest quarantined id is.
        let mut s = with_backends(10, 1, 0.5);
        s.used_free = (10..abi::MAX_BACKENDS).collect();
        let mut cleared = s.clone();
        cleared.used_free = BTreeSet::from([12]);
        cleared.quarantined = (10..abi::MAX_BACKENDS).filter(|id| *id != 12).collect();
        let add = Change::AddBackend {
            service: svc(80),
            backend: be(50),
            weight: 1,
        };
        let p = plan(&cleared, &add, false).unwrap();
        let id = *p
            .next
            .backends
            .iter()
            .find(|(_, b)| b.addr == be(50))
            .unwrap()
            .0;
        assert_eq!(id, 12);
        cleared.used_free.clear();
        cleared.quarantined.insert(12);
        assert!(
            plan(&cleared, &add, false).is_err(),
            "everything quarantined: refused"
        );
    }
}
