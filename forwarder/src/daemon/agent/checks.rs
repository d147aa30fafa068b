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
        self.pending.insert((job.service, job.backend), update);
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
        self.pending.values().copied().collect()
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use weir_ebpf::abi::HealthReason;

    use super::*;
    use crate::registry::model::plan;

    const SECOND: Duration = Duration::from_secs(1);

    fn svc() -> ServiceAddr {
        "198.19.0.10:80".parse().unwrap()
    }

    fn be(i: u8) -> BackendAddr {
        BackendAddr {
            addr: std::net::Ipv4Addr::new(198, 18, 10, i),
            port: 80,
        }
    }

    /// The service with backends 1..=n active and healthy (as a running
    /// agent would have left them).
    fn state(n: u8) -> State {
        let add = Change::AddService {
            addr: svc(),
            mode: ServiceModeName::L7,
            ring_size: None,
            max_remove_fraction: None,
            min_backends: None,
            panic_threshold: None,
        };
        let s = plan(&State::default(), &add, false).unwrap().next;
        let set = Change::SetBackends {
            service: svc(),
            backends: (1..=n).map(|i| (be(i), 1)).collect(),
        };
        let mut s = plan(&s, &set, false).unwrap().next;
        for b in s.backends.values_mut() {
            b.health = BackendHealth::Healthy;
        }
        s
    }

    fn set_backend(
        s: &mut State,
        i: u8,
        f: impl FnOnce(&mut crate::registry::model::BackendEntry),
    ) {
        f(s.backends.values_mut().find(|b| b.addr == be(i)).unwrap());
    }

    use crate::registry::Change;

    fn config(fall: u32) -> CheckConfig {
        CheckConfig {
            service: svc(),
            check: Check::Tcp,
            interval: SECOND,
            jitter: Duration::ZERO,
            timeout: SECOND / 2,
            rise: 2,
            fall,
        }
    }

    fn due(c: &mut Checks, now: Instant) -> Vec<Job> {
        std::iter::from_fn(|| c.pop_due(now)).collect()
    }

    const REFUSED: Outcome = Outcome::new(HealthReason::Refused, 111);

    #[test]
    fn active_backends_are_checked_once_per_interval() {
        let now = Instant::now();
        let mut s = state(3);
        set_backend(&mut s, 3, |b| b.state = BackendState::Draining);
        let mut c = Checks::new(&[config(2)]);
        let synced = c.sync(&s, now, || 0);
        assert_eq!(synced.found, [svc()]);
        let jobs = due(&mut c, now);
        let checked: Vec<BackendAddr> = jobs.iter().map(|j| j.backend).collect();
        assert_eq!(checked, [be(1), be(2)], "draining backends are not checked");
        assert_eq!(jobs[0].mode, ServiceModeName::L7);
        assert!(
            due(&mut c, now + 10 * SECOND).is_empty(),
            "in flight until finished"
        );
        for j in &jobs {
            assert_eq!(
                c.finished(j, Outcome::PASSED, 0, 1),
                None,
                "healthy stays healthy"
            );
        }
        assert!(due(&mut c, now + SECOND - Duration::from_millis(1)).is_empty());
        assert_eq!(due(&mut c, now + SECOND).len(), 2);
    }

    #[test]
    fn fall_failures_make_one_pending_update_until_applied() {
        let now = Instant::now();
        let s = state(2);
        let mut c = Checks::new(&[config(2)]);
        c.sync(&s, now, || 0);
        let mut t = now;
        let mut updates = vec![];
        for _ in 0..2 {
            for j in due(&mut c, t) {
                let outcome = if j.backend == be(1) {
                    REFUSED
                } else {
                    Outcome::PASSED
                };
                updates.extend(c.finished(&j, outcome, 0, 42));
            }
            t += SECOND;
        }
        let want = HealthUpdate {
            service: svc(),
            backend: be(1),
            health: BackendHealth::Unhealthy,
            reason: HealthReason::Refused,
            detail: 111,
            at_ms: 42,
        };
        assert_eq!(updates, [want]);
        assert_eq!(c.pending(), [want]);
        // Not applied yet: a read that still says healthy does not undo it.
        c.sync(&s, t, || 0);
        assert_eq!(c.pending(), [want]);
        c.applied(&[want]);
        assert!(c.pending().is_empty());
    }

    #[test]
    fn a_restarted_agent_resumes_from_the_registry() {
        let now = Instant::now();
        let mut s = state(1);
        set_backend(&mut s, 1, |b| b.health = BackendHealth::Unhealthy);
        let mut c = Checks::new(&[config(2)]);
        c.sync(&s, now, || 0);
        let j = due(&mut c, now).pop().unwrap();
        assert_eq!(c.finished(&j, REFUSED, 0, 1), None, "already unhealthy");
        let j = due(&mut c, now + SECOND).pop().unwrap();
        assert_eq!(c.finished(&j, Outcome::PASSED, 0, 1), None, "rise is 2");
        let j = due(&mut c, now + 2 * SECOND).pop().unwrap();
        assert_eq!(
            c.finished(&j, Outcome::PASSED, 0, 1).map(|u| u.health),
            Some(BackendHealth::Healthy)
        );
    }

    #[test]
    fn a_health_the_registry_changed_meanwhile_restarts_the_count() {
        let now = Instant::now();
        let mut s = state(1);
        let mut c = Checks::new(&[config(2)]);
        c.sync(&s, now, || 0);
        let j = due(&mut c, now).pop().unwrap();
        assert_eq!(c.finished(&j, REFUSED, 0, 1), None, "one of two failures");
        // Removed and added again: the registry says unknown now.
        set_backend(&mut s, 1, |b| b.health = BackendHealth::Unknown);
        c.sync(&s, now, || 0);
        let j = due(&mut c, now + SECOND).pop().unwrap();
        assert_eq!(
            c.finished(&j, REFUSED, 0, 1),
            None,
            "the count started over"
        );
    }

    #[test]
    fn backends_and_services_that_leave_are_dropped_with_their_updates() {
        let now = Instant::now();
        let s = state(2);
        let mut c = Checks::new(&[config(1)]);
        c.sync(&s, now, || 0);
        let jobs = due(&mut c, now);
        for j in &jobs {
            c.finished(j, REFUSED, 0, 1);
        }
        assert_eq!(c.pending().len(), 2);
        let mut drained = s.clone();
        set_backend(&mut drained, 2, |b| b.state = BackendState::Removed);
        c.sync(&drained, now, || 0);
        assert_eq!(
            c.pending().len(),
            1,
            "the removed backend's update is dropped"
        );
        assert_eq!(due(&mut c, now + SECOND).len(), 1);
        let synced = c.sync(&State::default(), now, || 0);
        assert_eq!(synced.missing, [svc()]);
        assert!(c.pending().is_empty());
        assert_eq!(c.next_due(), None);
        // A result of a check started before the service left counts for
        // nothing.
        assert_eq!(c.finished(&jobs[0], REFUSED, 0, 1), None);
        assert_eq!(c.sync(&s, now, || 0).found, [svc()]);
    }

    #[test]
    fn first_checks_of_new_targets_spread_and_unrun_checks_come_back() {
        let now = Instant::now();
        let mut c = Checks::new(&[config(2)]);
        let mut randoms = [0, u32::MAX / 2].into_iter();
        c.sync(&state(2), now, || randoms.next().unwrap());
        assert_eq!(
            due(&mut c, now).len(),
            1,
            "the second is due half an interval later"
        );
        let j = c.pop_due(now + SECOND / 2).unwrap();
        c.not_run(&j, 0);
        assert_eq!(c.next_due(), Some(now + SECOND / 2 + SECOND));
        assert!(c.pending().is_empty());
    }
}
