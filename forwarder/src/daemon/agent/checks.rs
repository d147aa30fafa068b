//! Which backends the agent checks and what their results mean: the
//! targets of each configured service as the registry lists them, their
//! schedules and rise/fall counters, and the health transitions waiting to
//! be applied. Plain data and the health core; the loop in [`super`] does
//! the I/O.

use std::collections::BTreeMap;
use std::time::Instant;

use weir_ebpf::abi::{BackendHealth, BackendState};

use super::config::CheckConfig;
use crate::health::counter::Counter;
use crate::health::probe::{Check, Outcome};
use crate::health::schedule::Schedule;
use crate::registry::model::HealthUpdate;
use crate::registry::{BackendAddr, ServiceAddr, ServiceModeName, State};

/// Every configured service's checks.
#[derive(Debug)]
pub struct Checks {
    services: Vec<Service>,
    /// Transitions not yet in the registry, by target.
    pending: BTreeMap<(ServiceAddr, BackendAddr), HealthUpdate>,
}

#[derive(Debug)]
struct Service {
    config: CheckConfig,
    /// `None` while the registry has no such service.
    mode: Option<ServiceModeName>,
    schedule: Schedule<BackendAddr>,
    targets: BTreeMap<BackendAddr, Target>,
}

#[derive(Debug)]
struct Target {
    id: u32,
    counter: Counter,
}

/// One check to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    pub service: ServiceAddr,
    pub mode: ServiceModeName,
    pub backend: BackendAddr,
    /// The backend's registry id (its L4 probe mark derives from it).
    pub id: u32,
    pub check: Check,
    pub timeout: std::time::Duration,
    pub started: Instant,
    index: usize,
}

/// What a registry read changed about the configured services.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Synced {
    /// Configured services the registry does not have (any more).
    pub missing: Vec<ServiceAddr>,
    /// Configured services the registry has again (or for the first time
    /// after being missing).
    pub found: Vec<ServiceAddr>,
}

impl Checks {
    pub fn new(configs: &[CheckConfig]) -> Self {
        Self {
            services: configs
                .iter()
                .map(|c| Service {
                    config: c.clone(),
                    mode: None,
                    schedule: Schedule::new(c.interval, c.jitter),
                    targets: BTreeMap::new(),
                })
                .collect(),
            pending: BTreeMap::new(),
        }
    }

    /// The configured services.
    pub fn services(&self) -> Vec<ServiceAddr> {
        self.services.iter().map(|s| s.config.service).collect()
    }

    /// Whether any configured service is an L4 one (its checks need the
    /// probe path).
    pub fn any_l4(&self) -> bool {
        self.services
            .iter()
            .any(|s| s.mode == Some(ServiceModeName::L4))
    }

    /// Follows the registry: the active backends of each configured service
    /// are the targets (draining and removed ones are not checked). A new
    /// target's counter starts from the health the registry has for it, so
    /// a restarted agent resumes; its first check falls at a random point
    /// of one interval (`random` gives one u32 per new target). A target
    /// whose health the registry has changed meanwhile (re-added, say)
    /// starts over from it, unless a transition of the agent's own is
    /// waiting to be applied. Waiting transitions of targets that are gone
    /// are dropped.
    pub fn sync(&mut self, state: &State, now: Instant, mut random: impl FnMut() -> u32) -> Synced {
        let mut synced = Synced::default();
        for s in &mut self.services {
            let addr = s.config.service;
            let Some(entry) = state.services.get(&addr) else {
                if s.mode.take().is_some() || !s.targets.is_empty() {
                    synced.missing.push(addr);
                }
                s.targets.clear();
                s.schedule.retain(|_| false);
                continue;
            };
            if s.mode.replace(entry.mode).is_none() {
                synced.found.push(addr);
            }
            let active: BTreeMap<BackendAddr, (u32, BackendHealth)> = state
                .backends_of(entry.id)
                .filter(|(_, b)| b.state == BackendState::Active)
                .map(|(id, b)| (b.addr, (id, b.health)))
                .collect();
            s.targets.retain(|b, _| active.contains_key(b));
            s.schedule.retain(|b| active.contains_key(b));
            for (backend, (id, health)) in active {
                let waiting = self.pending.contains_key(&(addr, backend));
                let fresh = || Counter::new(s.config.rise, s.config.fall, health);
                match s.targets.get_mut(&backend) {
                    Some(t) => {
                        if t.id != id || (t.counter.health() != health && !waiting) {
                            *t = Target {
                                id,
                                counter: fresh(),
                            };
                        }
                    }
                    None => {
                        s.targets.insert(
                            backend,
                            Target {
                                id,
                                counter: fresh(),
                            },
                        );
                        s.schedule.insert(backend, now, random());
                    }
                }
            }
        }
        let services = &self.services;
        self.pending.retain(|(service, backend), _| {
            services
                .iter()
                .any(|s| s.config.service == *service && s.targets.contains_key(backend))
        });
        synced
    }

    /// The next check due at `now`, taken out of its schedule until
    /// [`Checks::finished`] or [`Checks::not_run`] puts it back.
    pub fn pop_due(&mut self, now: Instant) -> Option<Job> {
        let (index, s) = self
            .services
            .iter_mut()
            .enumerate()
            .filter(|(_, s)| s.schedule.next_due().is_some_and(|at| at <= now))
            .min_by_key(|(_, s)| s.schedule.next_due())?;
        let backend = s.schedule.pop_due(now)?;
        let target = s.targets.get(&backend)?;
        Some(Job {
            service: s.config.service,
            mode: s.mode?,
            backend,
            id: target.id,
            check: s.config.check.clone(),
            timeout: s.config.timeout,
            started: now,
            index,
        })
    }

    /// When the earliest waiting check is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.services
            .iter()
            .filter_map(|s| s.schedule.next_due())
            .min()
    }

    /// A check is over: its target is due again one interval (plus jitter,
    /// `random`'s share of it) after the check started, and the result
    /// counts. Returns the transition it completes, also kept to be applied
    /// ([`Checks::pending`]). `at_ms` is the wall-clock time of the result.
    pub fn finished(
        &mut self,
        job: &Job,
        outcome: Outcome,
        random: u32,
        at_ms: u64,
    ) -> Option<HealthUpdate> {
        let s = self.requeue(job, random)?;
        let target = s.targets.get_mut(&job.backend)?;
        if target.id != job.id {
            return None;
        }
        let health = target.counter.record(outcome.passed())?;
        let update = HealthUpdate {
            service: job.service,
            backend: job.backend,
            health,
            reason: outcome.reason,
            detail: outcome.detail,
            at_ms,
        };
        self.pending
            .insert((job.service, job.backend), update.clone());
        Some(update)
    }

    /// A check that did not run (the agent could not open a socket, or
    /// the probe path is missing): due again, nothing counted.
    pub fn not_run(&mut self, job: &Job, random: u32) {
        self.requeue(job, random);
    }

    fn requeue(&mut self, job: &Job, random: u32) -> Option<&mut Service> {
        let s = self.services.get_mut(job.index)?;
        if s.targets.contains_key(&job.backend) {
            s.schedule.reschedule(job.backend, job.started, random);
        }
        Some(s)
    }

    /// The transitions waiting to be applied.
    pub fn pending(&self) -> Vec<HealthUpdate> {
        self.pending.values().cloned().collect()
    }

    /// The registry has these transitions now.
    pub fn applied(&mut self, updates: &[HealthUpdate]) {
        for u in updates {
            if self.pending.get(&(u.service, u.backend)) == Some(u) {
                self.pending.remove(&(u.service, u.backend));
            }
        }
    }
}
