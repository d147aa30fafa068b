//! The registry: weir's one source of truth for services and backends,
//! kept in pinned BPF maps that the XDP program reads on every packet and
//! the L7 workers read on every accept.
//!
//! Every change, from the CLI or the daemon, goes through [`Registry::apply`]:
//! lock → read → validate and plan (pure, in [`model`]) → write new backend
//! slots → fill new Maglev tables and swap each in with one map update →
//! write the remaining entries → read everything back and verify → bump the
//! generation → append an audit line. A failure at any step rolls back what
//! was written, so a change is applied whole or not at all.

pub mod audit;
pub mod maglev;
pub mod maps;
pub mod model;

use std::collections::{BTreeMap, BTreeSet};

use aya::maps::MapData;
use serde::Serialize;
use thiserror::Error;
use weir_ebpf::abi::{self, BackendState};

use crate::instance::{Instance, InstanceError};
pub use maps::Maps;
pub use model::{BackendAddr, Change, DiffLine, ServiceAddr, ServiceModeName, State};

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

    /// Applies one change atomically (see the module docs).
    pub fn apply(
        &mut self,
        change: &Change,
        mut opts: ApplyOptions,
    ) -> Result<Outcome, RegistryError> {
        let _lock = self.instance.lock()?;
        if !opts.dry_run {
            self.collect_locked(&opts.command)?;
        }
        let state = self.maps.read_state()?;
        let mut plan = model::plan(&state, change, opts.force)?;
        if reuses_slot(&state, &plan) {
            // Quarantine: a used slot is handed out only if no flow names it.
            let mut cleared = state.clone();
            let referenced = self.maps.referenced_backends()?;
            cleared.used_free.retain(|id| !referenced.contains(id));
            plan = model::plan(&cleared, change, opts.force)?;
        }
        let generation = self.maps.generation()?;
        if opts.dry_run || plan.diff.is_empty() {
            return Ok(Outcome {
                applied: false,
                generation,
                diff: plan.diff,
            });
        }
        let hook = opts.before_verify.take();
        let generation = self.write_verified(&state, &plan, hook)?;
        audit::append(
            &self.instance.audit_log(),
            generation,
            &opts.command,
            &plan.diff,
        )
        .map_err(|e| RegistryError::Audit(self.instance.audit_log().display().to_string(), e))?;
        Ok(Outcome {
            applied: true,
            generation,
            diff: plan.diff,
        })
    }

    /// Frees removed backends that no flow references any more.
    pub fn collect(&mut self, command: &str) -> Result<Outcome, RegistryError> {
        let _lock = self.instance.lock()?;
        self.collect_locked(command)
    }

    fn collect_locked(&mut self, command: &str) -> Result<Outcome, RegistryError> {
        let state = self.maps.read_state()?;
        let generation = self.maps.generation()?;
        let removed: BTreeSet<u32> = state
            .backends
            .iter()
            .filter(|(_, b)| b.state == BackendState::Removed)
            .map(|(id, _)| *id)
            .collect();
        if removed.is_empty() {
            return Ok(Outcome {
                applied: false,
                generation,
                diff: vec![],
            });
        }
        let referenced = self.maps.referenced_backends()?;
        let unreferenced = removed.difference(&referenced).copied().collect();
        let plan = model::plan(&state, &Change::Collect { unreferenced }, true)?;
        if plan.diff.is_empty() {
            return Ok(Outcome {
                applied: false,
                generation,
                diff: vec![],
            });
        }
        let generation = self.write_verified(&state, &plan, None)?;
        let command = format!("{command} (collect: removed backends without flows)");
        audit::append(&self.instance.audit_log(), generation, &command, &plan.diff).map_err(
            |e| RegistryError::Audit(self.instance.audit_log().display().to_string(), e),
        )?;
        Ok(Outcome {
            applied: true,
            generation,
            diff: plan.diff,
        })
    }

    /// Writes a plan, verifies it, and bumps the generation; rolls back on
    /// any failure.
    fn write_verified(
        &mut self,
        before: &State,
        plan: &model::Plan,
        hook: Option<VerifyHook>,
    ) -> Result<u64, RegistryError> {
        let mut undo = Vec::new();
        let mut tables = BTreeMap::new();
        let result = self
            .write(before, plan, &mut undo, &mut tables)
            .and_then(|()| {
                if let Some(hook) = hook {
                    hook(&mut self.maps);
                }
                self.verify(&plan.next, &tables)
            });
        if let Err(e) = result {
            let rollback = self.rollback(undo);
            return Err(match rollback {
                Ok(()) => e,
                Err(r) => RegistryError::Corrupt(format!("{e}; rolling back also failed: {r}")),
            });
        }
        self.maps.bump_generation()
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
        // 2. New backend slots, with fresh counters. Nothing references them
        //    until a ring names them.
        for (id, b) in &next.backends {
            if !before.backends.contains_key(id) {
                self.maps.reset_backend_stats(*id)?;
                undo.push(Undo::Backend(*id, None));
                self.maps.write_backend(*id, Some(b))?;
            }
        }
        // 3. New tables, each swapped in with one outer-map update.
        for &service_id in &plan.rings {
            let table = match next.services.values().find(|s| s.id == service_id) {
                Some(svc) => next.ring_for(service_id, svc.ring_size)?,
                None => vec![abi::NO_BACKEND],
            };
            let map = Maps::new_ring_table(&table)?;
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
        // 5. State and weight changes of existing backends, and freed slots.
        for (id, b) in &before.backends {
            match next.backends.get(id) {
                Some(n) if n == b => {}
                n => {
                    undo.push(Undo::Backend(*id, Some(b.clone())));
                    self.maps.write_backend(*id, n)?;
                }
            }
        }
        Ok(())
    }

    fn rollback(&mut self, undo: Vec<Undo>) -> Result<(), RegistryError> {
        for step in undo.into_iter().rev() {
            match step {
                Undo::Service(addr, Some(svc)) => self.maps.write_service(&addr, &svc)?,
                Undo::Service(addr, None) => self.maps.delete_service(&addr)?,
                Undo::Backend(id, prev) => self.maps.write_backend(id, prev.as_ref())?,
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
            match self.maps.read_ring(*service_id)? {
                Some(t) if &t == expected => {}
                Some(t) => {
                    let wrong = t.iter().zip(expected).filter(|(a, b)| a != b).count()
                        + t.len().abs_diff(expected.len());
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

    /// Checks that the installed rings are exactly what the backends imply
    /// (for `weir` diagnostics and tests).
    pub fn check(&self) -> Result<(), RegistryError> {
        let state = self.maps.read_state()?;
        let tables = state
            .services
            .values()
            .map(|s| Ok((s.id, state.ring_for(s.id, s.ring_size)?)))
            .collect::<Result<BTreeMap<_, _>, RegistryError>>()?;
        self.verify(&state, &tables)
    }
}

fn reuses_slot(before: &State, plan: &model::Plan) -> bool {
    plan.diff
        .iter()
        .any(|d| matches!(d, DiffLine::BackendAdded { id, .. } if before.used_free.contains(id)))
}
