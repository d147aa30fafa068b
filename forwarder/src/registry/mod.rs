//! The registry: weir's one source of truth for services and backends,
//! kept in pinned BPF maps that the XDP program reads on every packet and
//! the L7 workers read on every accept.
//!
//! Every change, from the CLI or the daemon, goes through [`Registry::apply`]:
//! lock → read → validate and plan (pure, in [`model`]) → write new backend
//! slots → build the new Maglev tables (a second thread creates their maps
//! meanwhile) → fill them and swap each in with one map update → write the
//! remaining entries → read everything back and verify → bump the generation
//! → append an audit line. A failure at any step rolls back what was
//! written, so a change is applied whole or not at all.

pub mod addr;
pub mod audit;
pub mod digest;
pub mod maglev;
pub mod maps;
pub mod model;

use std::collections::{BTreeMap, BTreeSet};

use aya::maps::MapData;
use serde::Serialize;
use thiserror::Error;
use weir_ebpf::abi::{self, BackendState};

use crate::instance::{Instance, InstanceError};
pub use addr::AddrError;
pub use maps::Maps;
pub use model::{
    BackendAddr, Change, DiffLine, HealthUpdate, Membership, PanicCause, ServiceAddr,
    ServiceModeName, State,
};

#[derive(Debug, Error)]
pub enum RegistryError {
    #[error(transparent)]
    Instance(#[from] InstanceError),
    #[error("no service {0}; create it with `weir service add {0}`")]
    UnknownService(ServiceAddr),
    #[error("service {0} exists already")]
    ServiceExists(ServiceAddr),
    #[error("no backend {0} in service {1}")]
    UnknownBackend(BackendAddr, ServiceAddr),
    #[error("backend {0} is listed twice or is already active in service {1}")]
    DuplicateBackend(BackendAddr, ServiceAddr),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Guard(String),
    #[error("the {0} table is full ({1} entries)")]
    Full(&'static str, u32),
    #[error(transparent)]
    Maglev(#[from] maglev::MaglevError),
    #[error("map {0}: {1}")]
    Map(&'static str, String),
    #[error("{0}")]
    Kernel(String),
    #[error("registry is inconsistent: {0}")]
    Corrupt(String),
    #[error("read-back verification failed: {0}")]
    ReadBack(String),
    #[error("instance {0:?} does not exist; `weir service add` or `weir attach` creates it")]
    NoInstance(String),
    #[error("audit log {0}: {1}")]
    Audit(String, std::io::Error),
}

/// Ring slots in one change from which their empty maps are created on a
/// second thread while the tables build. Smaller tables build in a few
/// milliseconds, less than a new thread may wait for a CPU on a busy host.
const PARALLEL_RING_SLOTS: u64 = 500_000;

/// How long a writer may spend reading the flow table under the lock.
const FLOW_SCAN_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Test hook run between the writes and the read-back.
pub type VerifyHook = Box<dyn FnOnce(&mut Maps)>;

/// How to apply a change.
#[derive(Default)]
pub struct ApplyOptions {
    /// Override the guard rails (never validation).
    pub force: bool,
    /// Plan and report, write nothing.
    pub dry_run: bool,
    /// The command line recorded in the audit log.
    pub command: String,
    /// Test hook: runs after the writes and before the read-back.
    #[doc(hidden)]
    pub before_verify: Option<VerifyHook>,
}

/// What a change did.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    pub applied: bool,
    pub generation: u64,
    pub diff: Vec<DiffLine>,
    /// Things the operator should know that did not stop the change.
    pub warnings: Vec<String>,
}

/// Options for creating an instance's maps.
#[derive(Clone, Copy, Debug)]
pub struct CreateOptions {
    pub flows: u32,
}

impl Default for CreateOptions {
    fn default() -> Self {
        Self {
            flows: abi::DEFAULT_FLOWS,
        }
    }
}

/// An open registry of one instance.
pub struct Registry {
    instance: Instance,
    maps: Maps,
}

/// One undoable write.
enum Undo {
    Service(ServiceAddr, Option<model::ServiceEntry>),
    Backend(u32, Option<model::BackendEntry>),
    Ring(u32, Option<MapData>),
}

impl Registry {
    /// Opens the instance, creating its maps if it has none yet.
    pub fn open_or_create(instance: &Instance, opts: CreateOptions) -> Result<Self, RegistryError> {
        instance.prepare()?;
        {
            let _lock = instance.lock()?;
            Maps::create(&instance.pin_dir(), opts.flows)?;
        }
        Self::open(instance)
    }

    /// Opens an existing instance.
    pub fn open(instance: &Instance) -> Result<Self, RegistryError> {
        crate::instance::require_root()?;
        crate::instance::ensure_bpffs()?;
        let dir = instance.pin_dir();
        if !dir.join(abi::maps::SERVICES).exists() {
            return Err(RegistryError::NoInstance(instance.name().into()));
        }
        Ok(Self {
            instance: instance.clone(),
            maps: Maps::open(&dir)?,
        })
    }

    pub fn instance(&self) -> &Instance {
        &self.instance
    }

    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    pub fn maps_mut(&mut self) -> &mut Maps {
        &mut self.maps
    }

    pub fn state(&self) -> Result<State, RegistryError> {
        self.maps.read_state()
    }

    /// Applies one change atomically (see the module docs). Afterwards, in
    /// the same lock, frees removed backends that no flow references any
    /// more (a separate audit line); a refused change does neither.
    pub fn apply(
        &mut self,
        change: &Change,
        mut opts: ApplyOptions,
    ) -> Result<Outcome, RegistryError> {
        let _lock = self.lock_live()?;
        let state = self.maps.read_state()?;
        let mut plan = model::plan(&state, change, opts.force)?;
        if reuses_slot(&state, &plan) {
            // Quarantine: a used slot is handed out only if no flow names
            // it. If the flow table cannot be read in time, none is.
            let mut cleared = state.clone();
            let referenced = self.maps.referenced_backends(FLOW_SCAN_LIMIT).ok();
            let (reusable, quarantined) = cleared.used_free.iter().partition(|id| {
                referenced.as_ref().is_some_and(|r| !r.contains(id))
                    && self.maps.l7_connections(**id) == 0
            });
            cleared.used_free = reusable;
            cleared.quarantined = quarantined;
            plan = model::plan(&cleared, change, opts.force)?;
        }
        plan.stamp_panics(audit::now_ms());
        let generation = self.maps.generation()?;
        if opts.dry_run || plan.diff.is_empty() {
            return Ok(Outcome {
                applied: false,
                generation,
                diff: plan.diff,
                warnings: vec![],
            });
        }
        let hook = opts.before_verify.take();
        let generation = self.write_verified(&state, &plan, &opts.command, hook)?;
        let mut outcome = Outcome {
            applied: true,
            generation,
            diff: plan.diff,
            warnings: vec![],
        };
        match self.collect_locked(&opts.command) {
            Ok(Some((generation, diff))) => {
                outcome.generation = generation;
                outcome.diff.extend(diff);
            }
            Ok(None) => {}
            Err(e) => outcome
                .warnings
                .push(format!("removed backends were not collected: {e}")),
        }
        Ok(outcome)
    }

    /// Frees removed backends that no flow references any more.
    pub fn collect(&mut self, command: &str) -> Result<Outcome, RegistryError> {
        let _lock = self.lock_live()?;
        let generation = self.maps.generation()?;
        Ok(match self.collect_locked(command)? {
            Some((generation, diff)) => Outcome {
                applied: true,
                generation,
                diff,
                warnings: vec![],
            },
            None => Outcome {
                applied: false,
                generation,
                diff: vec![],
                warnings: vec![],
            },
        })
    }

    /// Takes the writer lock and checks the instance was not destroyed
    /// while this writer waited for it.
    fn lock_live(&self) -> Result<crate::instance::LockGuard, RegistryError> {
        let lock = self.instance.lock()?;
        if !self.instance.pin_dir().join(abi::maps::SERVICES).exists() {
            return Err(RegistryError::NoInstance(self.instance.name().into()));
        }
        Ok(lock)
    }

    fn collect_locked(
        &mut self,
        command: &str,
    ) -> Result<Option<(u64, Vec<DiffLine>)>, RegistryError> {
        let state = self.maps.read_state()?;
        let removed: BTreeSet<u32> = state
            .backends
            .iter()
            .filter(|(_, b)| b.state == BackendState::Removed)
            .map(|(id, _)| *id)
            .collect();
        if removed.is_empty() {
            return Ok(None);
        }
        let referenced = self.maps.referenced_backends(FLOW_SCAN_LIMIT)?;
        // Neither flows (L4) nor connections of `weir run` (L7) use it.
        let unreferenced = removed
            .difference(&referenced)
            .copied()
            .filter(|id| self.maps.l7_connections(*id) == 0)
            .collect();
        let plan = model::plan(&state, &Change::Collect { unreferenced }, true)?;
        if plan.diff.is_empty() {
            return Ok(None);
        }
        let command = format!("{command} (collect: removed backends without flows)");
        let generation = self.write_verified(&state, &plan, &command, None)?;
        Ok(Some((generation, plan.diff)))
    }

    /// Writes a plan, verifies it, bumps the generation and appends the
    /// audit line; rolls back on any failure, so the change is applied
    /// and recorded, or neither.
    fn write_verified(
        &mut self,
        before: &State,
        plan: &model::Plan,
        command: &str,
        hook: Option<VerifyHook>,
    ) -> Result<u64, RegistryError> {
        let audit_path = self.instance.audit_log();
        let audit_err = |e| RegistryError::Audit(audit_path.display().to_string(), e);
        let mut audit_file = audit::open(&audit_path).map_err(audit_err)?;
        let mut undo = Vec::new();
        let mut tables = BTreeMap::new();
        let result = self
            .write(before, plan, &mut undo, &mut tables)
            .and_then(|()| {
                if let Some(hook) = hook {
                    hook(&mut self.maps);
                }
                self.verify(&plan.next, &tables)
            })
            .and_then(|()| self.maps.bump_generation())
            .and_then(|generation| {
                audit::append(&mut audit_file, generation, command, &plan.diff)
                    .map_err(audit_err)?;
                Ok(generation)
            });
        match result {
            Ok(generation) => Ok(generation),
            Err(e) => {
                // Only the audit append fails after the generation bump.
                let bumped = matches!(e, RegistryError::Audit(..));
                let rollback = self.rollback(undo);
                if bumped {
                    // Readers saw the new generation: tell them again.
                    let _ = self.maps.bump_generation();
                }
                Err(match rollback {
                    Ok(()) => e,
                    Err(r) => RegistryError::Corrupt(format!("{e}; rolling back also failed: {r}")),
                })
            }
        }
    }

    /// Writes a plan; `tables` receives every ring table swapped in, by
    /// service id, for the read-back.
    fn write(
        &mut self,
        before: &State,
        plan: &model::Plan,
        undo: &mut Vec<Undo>,
        tables: &mut BTreeMap<u32, Vec<u32>>,
    ) -> Result<(), RegistryError> {
        let next = &plan.next;
        // 1. Services that go away stop matching first.
        for (addr, svc) in &before.services {
            if !next.services.contains_key(addr) {
                undo.push(Undo::Service(*addr, Some(svc.clone())));
                self.maps.delete_service(addr)?;
            }
        }
        // 2. Backends that will be active (new, reactivated, reweighted),
        //    before any ring names them; new slots with fresh counters. Then
        //    the new tables are built; a service that goes away gets a
        //    one-slot table of NO_BACKEND.
        let sizes: Vec<(u32, Option<&model::ServiceEntry>)> = plan
            .rings
            .iter()
            .map(|&id| (id, next.services.values().find(|s| s.id == id)))
            .collect();
        let create = || {
            sizes
                .iter()
                .map(|&(_, svc)| Maps::create_ring_table(svc.map_or(1, |s| s.ring_size)))
                .collect::<Result<Vec<_>, _>>()
        };
        let total_slots: u64 = sizes
            .iter()
            .map(|(_, s)| u64::from(s.map_or(1, |s| s.ring_size)))
            .sum();
        let (built, created) = std::thread::scope(|scope| {
            // A large build takes tens of milliseconds: meanwhile another
            // thread creates the empty maps (the kernel zeroes 8 MB for
            // 1,000,003 slots). The build stays on this thread, which is
            // running already, where a new one may wait to be scheduled.
            let creating = (total_slots >= PARALLEL_RING_SLOTS).then(|| scope.spawn(create));
            let built = self
                .write_active_backends(before, next, undo)
                .and_then(|()| {
                    sizes
                        .iter()
                        .map(|&(_, svc)| match svc {
                            Some(svc) => next.ring_for(svc),
                            None => Ok(vec![abi::NO_BACKEND]),
                        })
                        .collect::<Result<Vec<_>, _>>()
                });
            let created =
                creating.map(|c| c.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
            (built, created)
        });
        let built = built?;
        let maps = match created {
            Some(maps) => maps?,
            None => create()?,
        };
        // 3. New tables, each swapped in with one outer-map update.
        for ((map, table), &(service_id, _)) in maps.into_iter().zip(built).zip(&sizes) {
            Maps::fill_ring_table(&map, &table)?;
            let previous = self.maps.swap_ring(service_id, &map)?;
            undo.push(Undo::Ring(service_id, previous));
            tables.insert(service_id, table);
        }
        // 4. New services start matching once their table is in place.
        for (addr, svc) in &next.services {
            if before.services.get(addr) != Some(svc) {
                if !before.services.contains_key(addr) {
                    self.maps.reset_service_stats(svc.id)?;
                }
                undo.push(Undo::Service(*addr, before.services.get(addr).cloned()));
                self.maps.write_service(addr, svc)?;
            }
        }
        // 5. Backends leaving active (after no ring names them any more),
        //    other changes, and freed slots.
        let mut slots = Vec::new();
        for (id, b) in &before.backends {
            match next.backends.get(id) {
                Some(n) if n == b || n.state == BackendState::Active => {}
                n => {
                    undo.push(Undo::Backend(*id, Some(b.clone())));
                    slots.push((*id, n));
                }
            }
        }
        self.maps.write_backends(&slots)
    }

    /// Writes the backends that will be active and differ from `before`
    /// (new slots with fresh counters), one batch each.
    fn write_active_backends(
        &mut self,
        before: &State,
        next: &State,
        undo: &mut Vec<Undo>,
    ) -> Result<(), RegistryError> {
        let mut fresh = Vec::new();
        let mut slots = Vec::new();
        for (id, b) in &next.backends {
            let prev = before.backends.get(id);
            if b.state == BackendState::Active && prev != Some(b) {
                if prev.is_none() {
                    fresh.push(*id);
                }
                undo.push(Undo::Backend(*id, prev.cloned()));
                slots.push((*id, Some(b)));
            }
        }
        self.maps.reset_backend_stats(&fresh)?;
        self.maps.write_backends(&slots)
    }

    fn rollback(&mut self, undo: Vec<Undo>) -> Result<(), RegistryError> {
        for step in undo.into_iter().rev() {
            match step {
                Undo::Service(addr, Some(svc)) => self.maps.write_service(&addr, &svc)?,
                Undo::Service(addr, None) => self.maps.delete_service(&addr)?,
                Undo::Backend(id, prev) => self.maps.write_backends(&[(id, prev.as_ref())])?,
                Undo::Ring(id, Some(prev)) => {
                    self.maps.swap_ring(id, &prev)?;
                }
                Undo::Ring(id, None) => {
                    let empty = Maps::new_ring_table(&[abi::NO_BACKEND])?;
                    self.maps.swap_ring(id, &empty)?;
                }
            }
        }
        Ok(())
    }

    /// Reads the registry back and compares it with `want`, and every ring
    /// table in `tables` (by service id) with what is installed.
    fn verify(&self, want: &State, tables: &BTreeMap<u32, Vec<u32>>) -> Result<(), RegistryError> {
        let got = self.maps.read_state()?;
        if got.services != want.services {
            return Err(RegistryError::ReadBack(format!(
                "services differ: wrote {:?}, read {:?}",
                want.services, got.services
            )));
        }
        if got.backends != want.backends {
            let bad: Vec<String> = want
                .backends
                .iter()
                .filter(|(id, b)| got.backends.get(id) != Some(b))
                .map(|(id, b)| format!("slot {id} should be {} {}", b.addr, b.state.name()))
                .chain(
                    got.backends
                        .keys()
                        .filter(|id| !want.backends.contains_key(id))
                        .map(|id| format!("slot {id} should be empty")),
                )
                .collect();
            return Err(RegistryError::ReadBack(format!(
                "backends differ: {}",
                bad.join(", ")
            )));
        }
        for (service_id, expected) in tables {
            match self.maps.ring_differences(*service_id, expected)? {
                Some(0) => {}
                Some(wrong) => {
                    return Err(RegistryError::ReadBack(format!(
                        "ring of service id {service_id}: {wrong} of {} slots differ",
                        expected.len()
                    )));
                }
                None => {
                    return Err(RegistryError::ReadBack(format!(
                        "ring of service id {service_id} is missing"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Each service's installed ring as a digest over slot → backend
    /// address ([`digest::ring_digest`]), with its size: equal on every
    /// host that serves the same backend set.
    pub fn ring_digests(&self) -> Result<Vec<(ServiceAddr, u32, String)>, RegistryError> {
        let state = self.maps.read_state()?;
        state
            .services
            .iter()
            .map(|(addr, svc)| {
                let ring = self.maps.read_ring(svc.id)?.unwrap_or_default();
                Ok((
                    *addr,
                    svc.ring_size,
                    digest::ring_digest(&ring, &state.backends),
                ))
            })
            .collect()
    }

    /// Checks that the installed rings are exactly what the backends imply
    /// (for `weir` diagnostics and tests).
    pub fn check(&self) -> Result<(), RegistryError> {
        let state = self.maps.read_state()?;
        let tables = state
            .services
            .values()
            .map(|s| Ok((s.id, state.ring_for(s)?)))
            .collect::<Result<BTreeMap<_, _>, RegistryError>>()?;
        self.verify(&state, &tables)
    }
}

fn reuses_slot(before: &State, plan: &model::Plan) -> bool {
    plan.diff
        .iter()
        .any(|d| matches!(d, DiffLine::BackendAdded { id, .. } if before.used_free.contains(id)))
}
