//! The registry as plain data, and the pure planning step of every change:
//! validate, apply the guard rails, and produce the next state and its diff.
//! Nothing here touches the kernel; `registry::maps` writes what this
//! decides.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use serde::Serialize;
use weir_ebpf::abi::{self, BackendHealth, BackendState, HealthReason, ServiceMode};

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
/// Panic below a healthy share of 50% of the active backends.
pub const DEFAULT_PANIC_PERMILLE: u32 = 500;
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
    /// Below this healthy share (per mille) of the active backends the
    /// service panics: health is not trusted, every active backend serves.
    pub panic_permille: u32,
    /// In panic now.
    pub panic: bool,
    /// Panic episodes so far.
    pub panics: u32,
    /// When the last episode began (CLOCK_REALTIME ms; 0: never).
    pub panic_since_ms: u64,
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
    /// Operator intent, set by the CLI.
    #[serde(serialize_with = "state_name")]
    pub state: BackendState,
    /// Observed health, set by `weir agent`; never overwrites `state`.
    #[serde(serialize_with = "health_name")]
    pub health: BackendHealth,
    /// Why the last health transition happened.
    #[serde(serialize_with = "reason_name")]
    pub health_reason: HealthReason,
    /// The HTTP status or errno behind `health_reason`, else 0.
    pub health_detail: u16,
    /// When the last health transition happened (CLOCK_REALTIME ms; 0:
    /// never).
    pub health_since_ms: u64,
}

impl BackendEntry {
    /// A backend as the operator adds it: active, health not known yet.
    pub fn new(service_id: u32, addr: BackendAddr, weight: u16) -> Self {
        Self {
            service_id,
            addr,
            weight,
            state: BackendState::Active,
            health: BackendHealth::Unknown,
            health_reason: HealthReason::None,
            health_detail: 0,
            health_since_ms: 0,
        }
    }
}

fn state_name<S: serde::Serializer>(s: &BackendState, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(s.name())
}

fn health_name<S: serde::Serializer>(h: &BackendHealth, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(h.name())
}

fn reason_name<S: serde::Serializer>(r: &HealthReason, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(r.name())
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

    /// Which backends of a service take new connections: the active ones
    /// that are not unhealthy, unless trusting health would leave too few
    /// (then all active ones: panic).
    pub fn membership(&self, svc: &ServiceEntry) -> Membership {
        let active: Vec<(u32, &BackendEntry)> = self
            .backends_of(svc.id)
            .filter(|(_, b)| b.state == BackendState::Active)
            .collect();
        let healthy: Vec<u32> = active
            .iter()
            .filter(|(_, b)| b.health != BackendHealth::Unhealthy)
            .map(|(id, _)| *id)
            .collect();
        let (n_active, n_healthy) = (active.len() as u64, healthy.len() as u64);
        let unhealthy = n_active - n_healthy;
        let panic = if unhealthy == 0 {
            None
        } else if n_healthy * 1000 < u64::from(svc.panic_permille) * n_active {
            Some(PanicCause::BelowThreshold)
        } else if unhealthy * 1000 > u64::from(svc.max_remove_permille) * n_active
            || n_healthy < u64::from(svc.min_backends)
        {
            Some(PanicCause::GuardRails)
        } else {
            None
        };
        let members = match panic {
            Some(_) => active.iter().map(|(id, _)| *id).collect(),
            None => healthy,
        };
        Membership {
            members,
            active: n_active as usize,
            healthy: n_healthy as usize,
            panic,
        }
    }

    /// The Maglev table a service must have for this state.
    pub fn ring_for(&self, svc: &ServiceEntry) -> Result<Vec<u32>, RegistryError> {
        let members: Vec<maglev::Member> = self
            .membership(svc)
            .members
            .into_iter()
            .map(|id| {
                let b = &self.backends[&id];
                maglev::Member {
                    id,
                    identity: b.addr.identity(),
                    weight: b.weight as u32,
                }
            })
            .collect();
        Ok(maglev::build(&members, svc.ring_size)?)
    }
}

/// Why a service with unhealthy backends keeps them in its ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PanicCause {
    /// The healthy share fell below the service's panic threshold.
    BelowThreshold,
    /// Leaving the unhealthy ones out would break `max_remove_fraction` or
    /// `min_backends`: the guard rails bind health as they bind operators.
    GuardRails,
}

impl fmt::Display for PanicCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::BelowThreshold => "healthy share below the panic threshold",
            Self::GuardRails => "ejecting the unhealthy ones would break the guard rails",
        })
    }
}

/// The backends of a service that take new connections, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Membership {
    /// Backend ids in the ring.
    pub members: Vec<u32>,
    pub active: usize,
    /// Active and not unhealthy (unknown counts as healthy).
    pub healthy: usize,
    pub panic: Option<PanicCause>,
}

/// One observed health transition (or confirmation) from `weir agent`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthUpdate {
    pub service: ServiceAddr,
    pub backend: BackendAddr,
    pub health: BackendHealth,
    pub reason: HealthReason,
    /// HTTP status or errno behind `reason`, else 0.
    pub detail: u16,
    /// When the agent saw it (CLOCK_REALTIME ms).
    pub at_ms: u64,
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
        panic_threshold: Option<f64>,
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
    /// Observed health from `weir agent`: never touches operator intent.
    SetHealth {
        updates: Vec<HealthUpdate>,
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
    BackendHealth {
        service: ServiceAddr,
        backend: BackendAddr,
        id: u32,
        from: String,
        to: String,
        reason: String,
        detail: u16,
    },
    /// The service stopped trusting health: every active backend serves.
    PanicStarted {
        service: ServiceAddr,
        healthy: usize,
        active: usize,
        cause: PanicCause,
    },
    PanicEnded {
        service: ServiceAddr,
        healthy: usize,
        active: usize,
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
            Self::BackendHealth {
                service,
                backend,
                id,
                from,
                to,
                reason,
                detail,
            } => {
                write!(f, "~ {service} backend {backend}: {from} -> {to} ({reason}")?;
                if *detail != 0 {
                    write!(f, " {detail}")?;
                }
                write!(f, ") (id {id})")
            }
            Self::PanicStarted {
                service,
                healthy,
                active,
                cause,
            } => write!(
                f,
                "! service {service} panics: {healthy} of {active} active backends healthy, \
                 {cause}; all {active} stay in the ring"
            ),
            Self::PanicEnded {
                service,
                healthy,
                active,
            } => write!(
                f,
                "! service {service} ends its panic: {healthy} of {active} active backends \
                 healthy; unhealthy ones leave the ring"
            ),
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

impl Plan {
    /// Dates the panic episodes this plan starts: the writer owns the clock.
    pub fn stamp_panics(&mut self, now_ms: u64) {
        for d in &self.diff {
            if let DiffLine::PanicStarted { service, .. } = d
                && let Some(svc) = self.next.services.get_mut(service)
            {
                svc.panic_since_ms = now_ms;
            }
        }
    }
}

/// Validates `change` against `state` and the guard rails and computes the
/// result. `force` overrides the guard rails (never validation).
pub fn plan(state: &State, change: &Change, force: bool) -> Result<Plan, RegistryError> {
    let mut next = state.clone();
    let mut diff = Vec::new();
    let mut rings = BTreeSet::new();
    // Services whose panic must be judged again: health changed even
    // where the ring did not (a panic keeps the same members).
    let mut judged = BTreeSet::new();

    match change {
        Change::AddService {
            addr,
            mode,
            ring_size,
            max_remove_fraction,
            min_backends,
            panic_threshold,
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
            let permille = permille_of(
                *max_remove_fraction,
                DEFAULT_MAX_REMOVE_PERMILLE,
                "max-remove-fraction",
            )?;
            let panic_permille =
                permille_of(*panic_threshold, DEFAULT_PANIC_PERMILLE, "panic-threshold")?;
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
                    panic_permille,
                    panic: false,
                    panics: 0,
                    panic_since_ms: 0,
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
                        && matches!(b.state, BackendState::Active | BackendState::Draining)
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
        Change::SetHealth { updates } => {
            judged = set_health(state, &mut next, &mut diff, &mut rings, updates)?;
        }
    }

    if !force {
        for &service_id in &rings {
            check_guard_rails(state, &next, service_id)?;
        }
    }
    judged.extend(&rings);
    update_panic(&mut next, &mut diff, &judged);
    Ok(Plan { next, diff, rings })
}

fn permille_of(fraction: Option<f64>, default: u32, what: &str) -> Result<u32, RegistryError> {
    match fraction {
        None => Ok(default),
        Some(f) if (0.0..=1.0).contains(&f) => Ok((f * 1000.0).round() as u32),
        Some(f) => Err(RegistryError::Invalid(format!(
            "{what} {f} must be between 0 and 1"
        ))),
    }
}

/// Records observed health and returns the services it touched. Only a
/// service whose ring members change is rebuilt; a confirmation of the
/// stored health changes nothing.
fn set_health(
    state: &State,
    next: &mut State,
    diff: &mut Vec<DiffLine>,
    rings: &mut BTreeSet<u32>,
    updates: &[HealthUpdate],
) -> Result<BTreeSet<u32>, RegistryError> {
    let mut touched = BTreeSet::new();
    for u in updates {
        let svc = state.service(&u.service)?;
        let id = state
            .find_backend(svc.id, &u.backend)
            .ok_or(RegistryError::UnknownBackend(u.backend, u.service))?;
        touched.insert(svc.id);
        let b = next.backends.get_mut(&id).expect("found above");
        if b.health == u.health {
            continue;
        }
        diff.push(DiffLine::BackendHealth {
            service: u.service,
            backend: u.backend,
            id,
            from: b.health.name().into(),
            to: u.health.name().into(),
            reason: u.reason.name().into(),
            detail: u.detail,
        });
        b.health = u.health;
        b.health_reason = u.reason;
        b.health_detail = u.detail;
        b.health_since_ms = u.at_ms;
    }
    for &service_id in &touched {
        let (_, svc) = state.service_by_id(service_id).expect("looked up above");
        if state.membership(svc).members != next.membership(svc).members {
            rings.insert(service_id);
        }
    }
    Ok(touched)
}

/// Starts or ends the panic of each service in `judged`. The episode's
/// start time is stamped by the writer, which owns the clock.
fn update_panic(next: &mut State, diff: &mut Vec<DiffLine>, judged: &BTreeSet<u32>) {
    let services: Vec<ServiceAddr> = next
        .services
        .iter()
        .filter(|(_, s)| judged.contains(&s.id))
        .map(|(a, _)| *a)
        .collect();
    for addr in services {
        let m = next.membership(&next.services[&addr]);
        let svc = next.services.get_mut(&addr).expect("listed above");
        match (svc.panic, m.panic) {
            (false, Some(cause)) => {
                svc.panic = true;
                svc.panics = svc.panics.saturating_add(1);
                diff.push(DiffLine::PanicStarted {
                    service: addr,
                    healthy: m.healthy,
                    active: m.active,
                    cause,
                });
            }
            (true, None) => {
                svc.panic = false;
                diff.push(DiffLine::PanicEnded {
                    service: addr,
                    healthy: m.healthy,
                    active: m.active,
                });
            }
            _ => {}
        }
    }
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
    next.backends
        .insert(id, BackendEntry::new(svc.id, addr, weight));
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
            panic_threshold: None,
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
                panic_threshold: None,
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
            panic_threshold: None,
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
            panic_threshold: None,
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
        full.backends
            .insert(abi::MAX_BACKENDS - 1, BackendEntry::new(0, be(200), 1));
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
            panic_threshold: None,
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
                panic_threshold: None,
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
            panic_threshold: None,
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
        let ring = s.ring_for(&s.services[&svc(80)]).unwrap();
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

    fn health(n: &[(u8, BackendHealth)]) -> Change {
        Change::SetHealth {
            updates: n
                .iter()
                .map(|&(i, health)| HealthUpdate {
                    service: svc(80),
                    backend: be(i),
                    health,
                    reason: match health {
                        BackendHealth::Unhealthy => HealthReason::Refused,
                        _ => HealthReason::Passed,
                    },
                    detail: if health == BackendHealth::Unhealthy {
                        111
                    } else {
                        0
                    },
                    at_ms: 1_000 + u64::from(i),
                })
                .collect(),
        }
    }

    fn ring_ids(s: &State) -> BTreeSet<u32> {
        s.ring_for(&s.services[&svc(80)])
            .unwrap()
            .into_iter()
            .collect()
    }

    fn id_of(s: &State, i: u8) -> u32 {
        s.find_backend(0, &be(i)).unwrap()
    }

    #[test]
    fn an_unhealthy_backend_leaves_the_ring_and_keeps_its_state() {
        let s = with_backends(4, 1, 0.5);
        assert!(
            s.backends
                .values()
                .all(|b| b.health == BackendHealth::Unknown)
        );
        let p = plan(&s, &health(&[(2, BackendHealth::Unhealthy)]), false).unwrap();
        assert_eq!(p.rings, BTreeSet::from([0]), "the ring is rebuilt");
        let b = &p.next.backends[&id_of(&s, 2)];
        assert_eq!(b.state, BackendState::Active, "operator intent untouched");
        assert_eq!(b.health, BackendHealth::Unhealthy);
        assert_eq!(b.health_reason, HealthReason::Refused);
        assert_eq!(b.health_detail, 111);
        assert_eq!(b.health_since_ms, 1_002);
        assert_eq!(
            p.diff,
            [DiffLine::BackendHealth {
                service: svc(80),
                backend: be(2),
                id: id_of(&s, 2),
                from: "unknown".into(),
                to: "unhealthy".into(),
                reason: "refused".into(),
                detail: 111,
            }]
        );
        assert_eq!(
            p.diff[0].to_string(),
            format!(
                "~ 198.19.0.10:80 backend 198.18.10.2:80: unknown -> unhealthy (refused 111) (id {})",
                id_of(&s, 2)
            )
        );
        let ring = ring_ids(&p.next);
        assert!(!ring.contains(&id_of(&s, 2)));
        assert_eq!(ring.len(), 3);
        assert!(!p.next.services[&svc(80)].panic);

        let back = plan(&p.next, &health(&[(2, BackendHealth::Healthy)]), false).unwrap();
        assert_eq!(back.rings, BTreeSet::from([0]));
        assert_eq!(ring_ids(&back.next).len(), 4, "it returns");
        assert_eq!(
            back.next.backends[&id_of(&s, 2)].health_reason,
            HealthReason::Passed
        );
    }

    #[test]
    fn a_confirmation_rebuilds_nothing() {
        let s = with_backends(3, 1, 0.5);
        let all = [
            (1, BackendHealth::Healthy),
            (2, BackendHealth::Healthy),
            (3, BackendHealth::Healthy),
        ];
        let p = plan(&s, &health(&all), false).unwrap();
        assert_eq!(p.diff.len(), 3, "unknown -> healthy is a transition");
        assert!(p.rings.is_empty(), "but the ring members stay the same");
        let again = plan(&p.next, &health(&all), false).unwrap();
        assert!(again.diff.is_empty() && again.rings.is_empty());
        assert_eq!(again.next, p.next);
    }

    #[test]
    fn an_update_for_an_unknown_backend_refuses_the_whole_change() {
        let s = with_backends(2, 1, 0.5);
        let err = plan(
            &s,
            &health(&[(1, BackendHealth::Unhealthy), (9, BackendHealth::Unhealthy)]),
            false,
        )
        .unwrap_err();
        assert!(
            matches!(err, RegistryError::UnknownBackend(b, _) if b == be(9)),
            "{err}"
        );
    }

    #[test]
    fn below_the_panic_threshold_every_active_backend_serves() {
        let s = with_backends(4, 1, 1.0);
        let p = plan(
            &s,
            &health(&[(1, BackendHealth::Unhealthy), (2, BackendHealth::Unhealthy)]),
            false,
        )
        .unwrap();
        assert_eq!(ring_ids(&p.next).len(), 2, "50% healthy is not below 50%");
        assert!(!p.next.services[&svc(80)].panic);

        let mut p = plan(&p.next, &health(&[(3, BackendHealth::Unhealthy)]), false).unwrap();
        let svc_entry = &p.next.services[&svc(80)];
        assert!(svc_entry.panic);
        assert_eq!(svc_entry.panics, 1);
        assert_eq!(ring_ids(&p.next).len(), 4, "all four stay in the ring");
        assert_eq!(
            p.next.membership(svc_entry).panic,
            Some(PanicCause::BelowThreshold)
        );
        assert_eq!(
            p.diff.last().unwrap(),
            &DiffLine::PanicStarted {
                service: svc(80),
                healthy: 1,
                active: 4,
                cause: PanicCause::BelowThreshold,
            }
        );
        p.stamp_panics(77_000);
        assert_eq!(p.next.services[&svc(80)].panic_since_ms, 77_000);

        // Still in panic: no second episode, no new start time.
        let still = plan(&p.next, &health(&[(4, BackendHealth::Unhealthy)]), false).unwrap();
        assert!(still.next.services[&svc(80)].panic);
        assert_eq!(still.next.services[&svc(80)].panics, 1);
        assert!(still.rings.is_empty(), "members unchanged: all four");

        let over = plan(
            &still.next,
            &health(&[(1, BackendHealth::Healthy), (2, BackendHealth::Healthy)]),
            false,
        )
        .unwrap();
        let e = &over.next.services[&svc(80)];
        assert!(!e.panic);
        assert_eq!(e.panics, 1, "episodes are counted, not undone");
        assert_eq!(ring_ids(&over.next).len(), 2);
        assert!(over.diff.contains(&DiffLine::PanicEnded {
            service: svc(80),
            healthy: 2,
            active: 4,
        }));

        let again = plan(&over.next, &health(&[(1, BackendHealth::Unhealthy)]), false).unwrap();
        assert_eq!(again.next.services[&svc(80)].panics, 2);
    }

    #[test]
    fn the_guard_rails_bind_health() {
        // min_backends 3: two healthy of four is not below the 50% panic
        // threshold, but would leave fewer than three in the ring.
        let s = with_backends(4, 3, 1.0);
        let p = plan(
            &s,
            &health(&[(1, BackendHealth::Unhealthy), (2, BackendHealth::Unhealthy)]),
            false,
        )
        .unwrap();
        let e = &p.next.services[&svc(80)];
        assert!(e.panic);
        assert_eq!(p.next.membership(e).panic, Some(PanicCause::GuardRails));
        assert_eq!(ring_ids(&p.next).len(), 4);
        // max_remove_fraction 0.25: one of four may go, two may not.
        let s = with_backends(4, 1, 0.25);
        let one = plan(&s, &health(&[(1, BackendHealth::Unhealthy)]), false).unwrap();
        assert_eq!(ring_ids(&one.next).len(), 3);
        let two = plan(&one.next, &health(&[(2, BackendHealth::Unhealthy)]), false).unwrap();
        assert_eq!(
            two.next.membership(&two.next.services[&svc(80)]).panic,
            Some(PanicCause::GuardRails)
        );
        assert_eq!(ring_ids(&two.next).len(), 4);
    }

    #[test]
    fn a_panic_threshold_of_zero_never_panics_on_share_alone() {
        let s = add_service_with_panic(Some(0.0));
        let set = (1..=4).map(|i| (be(i), 1)).collect();
        let s = plan(
            &s,
            &Change::SetBackends {
                service: svc(80),
                backends: set,
            },
            false,
        )
        .unwrap()
        .next;
        let p = plan(
            &s,
            &health(&[
                (1, BackendHealth::Unhealthy),
                (2, BackendHealth::Unhealthy),
                (3, BackendHealth::Unhealthy),
            ]),
            false,
        )
        .unwrap();
        assert!(!p.next.services[&svc(80)].panic);
        assert_eq!(ring_ids(&p.next).len(), 1);
        let err = plan(&State::default(), &add_panic_change(Some(1.5)), false).unwrap_err();
        assert!(
            err.to_string()
                .contains("panic-threshold 1.5 must be between 0 and 1"),
            "{err}"
        );
    }

    fn add_panic_change(panic_threshold: Option<f64>) -> Change {
        Change::AddService {
            addr: svc(80),
            mode: ServiceModeName::L4,
            ring_size: None,
            max_remove_fraction: Some(1.0),
            min_backends: Some(1),
            panic_threshold,
        }
    }

    fn add_service_with_panic(panic_threshold: Option<f64>) -> State {
        let p = plan(&State::default(), &add_panic_change(panic_threshold), false).unwrap();
        assert_eq!(
            p.next.services[&svc(80)].panic_permille,
            panic_threshold.map_or(DEFAULT_PANIC_PERMILLE, |f| (f * 1000.0) as u32)
        );
        p.next
    }

    #[test]
    fn operator_intent_and_health_never_overwrite_each_other() {
        let s = with_backends(4, 1, 1.0);
        let s = plan(&s, &health(&[(1, BackendHealth::Unhealthy)]), false)
            .unwrap()
            .next;
        let drain = Change::DrainBackend {
            service: svc(80),
            backend: be(1),
        };
        let drained = plan(&s, &drain, false).unwrap().next;
        let b = &drained.backends[&id_of(&s, 1)];
        assert_eq!(
            (b.state, b.health),
            (BackendState::Draining, BackendHealth::Unhealthy)
        );
        let back = Change::AddBackend {
            service: svc(80),
            backend: be(1),
            weight: 1,
        };
        let back = plan(&drained, &back, false).unwrap().next;
        let b = &back.backends[&id_of(&s, 1)];
        assert_eq!(
            (b.state, b.health),
            (BackendState::Active, BackendHealth::Unhealthy),
            "reactivated, still unhealthy"
        );
        assert!(!ring_ids(&back).contains(&id_of(&s, 1)));
        // Health of a draining backend is recorded; no ring changes.
        let p = plan(&drained, &health(&[(1, BackendHealth::Healthy)]), false).unwrap();
        assert!(p.rings.is_empty());
        assert_eq!(p.next.backends[&id_of(&s, 1)].state, BackendState::Draining);
        // A new backend starts unknown, which counts as healthy.
        let add = Change::AddBackend {
            service: svc(80),
            backend: be(7),
            weight: 1,
        };
        let added = plan(&back, &add, false).unwrap().next;
        let id = id_of(&added, 7);
        assert_eq!(added.backends[&id].health, BackendHealth::Unknown);
        assert!(ring_ids(&added).contains(&id));
    }
}
