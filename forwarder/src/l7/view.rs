//! A worker's view of the registry: the same pinned maps the XDP path
//! reads. One load of the mmap'd generation counter per accept tells the
//! worker whether anything changed; only then does it re-read the maps.
//!
//! Backend choice: power of two choices over the service's Maglev ring.
//! Two random ring slots are drawn (so each candidate is drawn in
//! proportion to its weight) and the one with fewer live connections in
//! this worker, relative to its weight, wins. For long-lived WebSockets
//! live connections are the load, and they drift from any static split as
//! connections end and backends drain; weighing by live count corrects
//! that drift while the ring keeps the weights.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};

use weir_ebpf::abi::{BackendHealth, BackendState, NO_BACKEND};

use crate::registry::maps::GenerationWatch;
use crate::registry::{Maps, RegistryError, ServiceAddr, ServiceModeName};

/// A backend as a worker needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendView {
    pub addr: SocketAddr,
    pub weight: u16,
    pub state: BackendState,
    pub health: BackendHealth,
    /// When `health` last changed (CLOCK_REALTIME ms).
    pub health_since_ms: u64,
}

#[derive(Clone, Debug, Default)]
struct ServiceView {
    /// The ring: slot -> backend id.
    ring: Vec<u32>,
    /// The backends in the ring, each once.
    members: Vec<u32>,
}

/// What a refresh found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Backends that served and do not any more: drain their connections.
    pub stopped: BTreeSet<u32>,
    /// Backends `weir agent` found healthy since the last refresh: an
    /// outlier ejection of theirs ends.
    pub healthy_again: BTreeSet<u32>,
}

/// A state read from the registry, installed only once whole.
struct Loaded {
    generation: u64,
    services: HashMap<ServiceAddr, ServiceView>,
    backends: HashMap<u32, BackendView>,
    serving: BTreeSet<u32>,
}

pub struct RegistryView {
    maps: Maps,
    watch: GenerationWatch,
    seen: u64,
    services: HashMap<ServiceAddr, ServiceView>,
    backends: HashMap<u32, BackendView>,
    /// Services whose connections to unhealthy backends are drained.
    drain_unhealthy: BTreeSet<ServiceAddr>,
    /// Backends whose connections may stay: active, and, in a
    /// `drain_unhealthy` service, in the ring (an unhealthy backend kept
    /// by a panic still serves).
    serving: BTreeSet<u32>,
}

impl RegistryView {
    /// Opens the instance's maps read-only and loads the current state.
    pub fn open(maps: Maps, drain_unhealthy: BTreeSet<ServiceAddr>) -> Result<Self, RegistryError> {
        let watch = maps.generation_watch()?;
        let mut view = Self {
            maps,
            watch,
            seen: u64::MAX,
            services: HashMap::new(),
            backends: HashMap::new(),
            drain_unhealthy,
            serving: BTreeSet::new(),
        };
        view.reload()?;
        Ok(view)
    }

    /// Re-reads the maps if the generation moved. Cheap when it did not.
    /// A failed read changes nothing: the view stays on its last good
    /// state, and the next refresh compares against that state.
    pub fn refresh(&mut self) -> Result<Option<Changes>, RegistryError> {
        if self.watch.get() == self.seen {
            return Ok(None);
        }
        let next = self.load()?;
        let healthy_again = next
            .backends
            .iter()
            .filter(|(id, b)| {
                b.health == BackendHealth::Healthy
                    && self.backends.get(id).is_some_and(|was| {
                        (was.health, was.health_since_ms) != (b.health, b.health_since_ms)
                    })
            })
            .map(|(id, _)| *id)
            .collect();
        let stopped = self.serving.difference(&next.serving).copied().collect();
        self.install(next);
        Ok(Some(Changes {
            stopped,
            healthy_again,
        }))
    }

    /// Changes the services whose connections to unhealthy backends are
    /// drained; the next [`RegistryView::refresh`] reads the registry
    /// again and reports the backends that stop serving under it.
    pub fn set_drain_unhealthy(&mut self, services: BTreeSet<ServiceAddr>) {
        self.drain_unhealthy = services;
        self.seen = u64::MAX;
    }

    fn reload(&mut self) -> Result<(), RegistryError> {
        let next = self.load()?;
        self.install(next);
        Ok(())
    }

    /// Reads the registry into a new state for the view; `self` is
    /// untouched.
    fn load(&self) -> Result<Loaded, RegistryError> {
        // Read the generation first: a change racing this read bumps it
        // again and the next refresh reloads.
        let generation = self.watch.get();
        let state = self.maps.read_state()?;
        let mut services = HashMap::new();
        for (addr, svc) in &state.services {
            if svc.mode != ServiceModeName::L7 {
                continue;
            }
            let ring = self.maps.read_ring(svc.id)?.unwrap_or_default();
            let members: BTreeSet<u32> = ring
                .iter()
                .copied()
                .filter(|id| *id != NO_BACKEND)
                .collect();
            let members = members.into_iter().collect();
            services.insert(*addr, ServiceView { ring, members });
        }
        // In a drain_unhealthy service a backend serves while its ring
        // holds it (the registry left it out for failing its checks, or
        // kept it in a panic); elsewhere while it is active.
        let drained: HashMap<u32, &ServiceView> = state
            .services
            .iter()
            .filter(|(addr, _)| self.drain_unhealthy.contains(addr))
            .filter_map(|(addr, svc)| services.get(addr).map(|view| (svc.id, view)))
            .collect();
        let serving = state
            .backends
            .iter()
            .filter(|(id, b)| {
                b.state == BackendState::Active
                    && drained
                        .get(&b.service_id)
                        .is_none_or(|view| view.members.binary_search(id).is_ok())
            })
            .map(|(id, _)| *id)
            .collect();
        let backends = state
            .backends
            .iter()
            .map(|(id, b)| {
                let view = BackendView {
                    addr: SocketAddr::new(IpAddr::V4(b.addr.addr), b.addr.port),
                    weight: b.weight,
                    state: b.state,
                    health: b.health,
                    health_since_ms: b.health_since_ms,
                };
                (*id, view)
            })
            .collect();
        Ok(Loaded {
            generation,
            services,
            backends,
            serving,
        })
    }

    fn install(&mut self, next: Loaded) {
        self.seen = next.generation;
        self.services = next.services;
        self.backends = next.backends;
        self.serving = next.serving;
    }

    /// Counts an L7 connection to backend `id` in the registry, where the
    /// writers see it (a removed backend is freed only at zero).
    pub fn add_l7_connections(&self, id: u32, delta: i32) {
        self.maps.add_l7_connections(id, delta);
    }

    /// Whether `service` is an L7 service of this instance.
    pub fn has_service(&self, service: &ServiceAddr) -> bool {
        self.services.contains_key(service)
    }

    pub fn backend(&self, id: u32) -> Option<&BackendView> {
        self.backends.get(&id)
    }

    /// How many active backends `service` has (what bounds the share of
    /// them outlier detection may eject).
    pub fn active_backends(&self, service: &ServiceAddr) -> u32 {
        self.services.get(service).map_or(0, |svc| {
            svc.members.iter().filter(|id| self.is_active(**id)).count() as u32
        })
    }

    fn is_active(&self, id: u32) -> bool {
        self.backends
            .get(&id)
            .is_some_and(|b| b.state == BackendState::Active)
    }

    /// Picks a backend of `service` for a new connection: two ring slots
    /// drawn with `random` (two independent 32-bit values), the less loaded
    /// by `live(id)` per unit of weight wins. `exclude` lists backends
    /// already tried for this connection. Backends `avoid` names (ejected
    /// by outlier detection) are passed over as long as another is usable;
    /// when none is, the pick is as if nothing were avoided. `None`: no
    /// active backend (503).
    pub fn pick(
        &self,
        service: &ServiceAddr,
        random: [u32; 2],
        exclude: &[u32],
        live: impl Fn(u32) -> u32,
        avoid: impl Fn(u32) -> bool,
    ) -> Option<(u32, SocketAddr)> {
        let svc = self.services.get(service)?;
        if svc.ring.is_empty() {
            return None;
        }
        let candidate = |id: u32| id != NO_BACKEND && !exclude.contains(&id) && self.is_active(id);
        let shun = svc.members.iter().any(|id| candidate(*id) && !avoid(*id));
        let usable = |id: u32| candidate(id) && !(shun && avoid(id));
        let n = svc.ring.len();
        // Each draw walks forward from its slot to the first usable backend,
        // so excluded backends do not make a draw fail.
        let draw = |r: u32| {
            (0..n)
                .map(|i| svc.ring[(r as usize + i) % n])
                .find(|id| usable(*id))
        };
        let a = draw(random[0])?;
        let b = draw(random[1]).unwrap_or(a);
        let load = |id: u32| {
            let w = self.backends[&id].weight.max(1) as u64;
            (live(id) as u64 * 65536) / w
        };
        let id = if load(b) < load(a) { b } else { a };
        Some((id, self.backends[&id].addr))
    }
}
