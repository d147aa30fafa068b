//! Passive outlier detection, sans-IO: which backends this process stops
//! choosing because the connections it made to them kept failing.
//!
//! A failure is a connect that was refused or failed, a connect cut for
//! taking longer than the connect timeout, or an upgrade the backend
//! answered with a server error (5xx), a malformed answer, its end of the
//! stream, or not in time. A 4xx answer is the client's request refused,
//! not the backend failing, so it counts neither way. A 101 ends a run of
//! failures.
//!
//! After `consecutive` failures in a row the backend is ejected for
//! `base_ejection × 2^(ejections so far)`, at most `max_ejection`, and
//! returns on its own when that time is over. Each `max_ejection` without
//! an ejection, counted from the end of the last one, takes one off the
//! ejections so far: a backend that recovered is not punished forever for
//! an old spell. An ejection that would take more than
//! `max_ejected_percent` of its service's active backends out of choice is
//! refused (and counted): detection must never empty a fleet.
//!
//! The clock is passed in; the worker-shared table around it
//! ([`super::ejections`]) makes it a process's.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::config::Outlier;
use crate::registry::ServiceAddr;

/// A backend as detection needs it: what identifies it, and the size of
/// its service (which bounds the ejections in it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subject {
    pub id: u32,
    pub addr: SocketAddr,
    pub service: ServiceAddr,
    /// Active backends of its service.
    pub active: u32,
}

/// What a failure led to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The backend is out of choice until `until`.
    Ejected {
        failures: u32,
        duration: Duration,
        until: Instant,
    },
    /// The backend would have been ejected, but `ejected` of the `active`
    /// backends of its service already are. `first`: the first refusal of
    /// this run of failures (later ones are only counted).
    Refused {
        failures: u32,
        ejected: u32,
        active: u32,
        first: bool,
    },
}

/// A backend whose ejection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Returned {
    pub id: u32,
    pub addr: SocketAddr,
    pub service: ServiceAddr,
    /// How long it was out.
    pub ejected_for: Duration,
}

/// Detection's record of one backend, for `/metrics`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Row {
    pub addr: SocketAddr,
    pub service: ServiceAddr,
    pub ejected: bool,
    pub ejections_total: u64,
    pub refused_total: u64,
}

#[derive(Clone, Debug)]
struct Record {
    addr: SocketAddr,
    service: ServiceAddr,
    /// Failures in a row since the last 101 or ejection.
    failures: u32,
    /// Ejections so far, less those the clean spells since took off.
    level: u32,
    /// The current ejection: since when and until when.
    ejected: Option<(Instant, Instant)>,
    /// Where the clean spell that decays `level` started.
    clean_since: Instant,
    /// This run of failures had an ejection refused already.
    refusal_reported: bool,
    ejections_total: u64,
    refused_total: u64,
}

impl Record {
    fn new(backend: &Subject, now: Instant) -> Self {
        Self {
            addr: backend.addr,
            service: backend.service,
            failures: 0,
            level: 0,
            ejected: None,
            clean_since: now,
            refusal_reported: false,
            ejections_total: 0,
            refused_total: 0,
        }
    }
}

/// The outlier state of every backend that failed (see the module docs).
#[derive(Debug)]
pub struct Detector {
    settings: Outlier,
    records: HashMap<u32, Record>,
}

impl Detector {
    pub fn new(settings: Outlier) -> Self {
        Self {
            settings,
            records: HashMap::new(),
        }
    }

    /// Replaces the settings; the records (failures in a row, earlier
    /// ejections) stay.
    pub fn set_settings(&mut self, settings: Outlier) {
        self.settings = settings;
    }

    /// Whether detection is on (`consecutive > 0`).
    pub fn enabled(&self) -> bool {
        self.settings.consecutive > 0
    }

    /// A connection to `backend` failed at `now`.
    pub fn handle_failure(&mut self, backend: Subject, now: Instant) -> Option<Verdict> {
        if !self.enabled() {
            return None;
        }
        let ejected = self.ejected_in(backend.service, backend.id, now);
        let settings = self.settings;
        let record = self
            .records
            .entry(backend.id)
            .or_insert_with(|| Record::new(&backend, now));
        if record.addr != backend.addr || record.service != backend.service {
            // The id was freed and given to another backend: a new record.
            *record = Record::new(&backend, now);
        }
        // A connection chosen just before the ejection fails after it: the
        // backend is out already.
        if record.ejected.is_some_and(|(_, until)| now < until) {
            return None;
        }
        record.failures = record.failures.saturating_add(1);
        if record.failures < settings.consecutive {
            return None;
        }
        let allowed = u64::from(ejected + 1) * 100
            <= u64::from(settings.max_ejected_percent) * u64::from(backend.active);
        if !allowed {
            record.refused_total += 1;
            let first = !std::mem::replace(&mut record.refusal_reported, true);
            return Some(Verdict::Refused {
                failures: record.failures,
                ejected,
                active: backend.active,
                first,
            });
        }
        decay(record, settings.max_ejection, now);
        let duration = ejection_time(&settings, record.level);
        let until = now + duration;
        let failures = std::mem::take(&mut record.failures);
        record.refusal_reported = false;
        record.level = record.level.saturating_add(1);
        record.ejected = Some((now, until));
        record.clean_since = until;
        record.ejections_total += 1;
        Some(Verdict::Ejected {
            failures,
            duration,
            until,
        })
    }

    /// `id` answered an upgrade with 101: its run of failures is over.
    pub fn handle_success(&mut self, id: u32) {
        if let Some(r) = self.records.get_mut(&id) {
            r.failures = 0;
            r.refusal_reported = false;
        }
    }

    /// The next backend whose ejection is over at `now`; call until `None`.
    pub fn poll_returned(&mut self, now: Instant) -> Option<Returned> {
        let (id, r) = self
            .records
            .iter_mut()
            .find(|(_, r)| r.ejected.is_some_and(|(_, until)| until <= now))?;
        let (since, until) = r.ejected.take().expect("found ejected");
        Some(Returned {
            id: *id,
            addr: r.addr,
            service: r.service,
            ejected_for: until - since,
        })
    }

    /// The agent's checks found `id` healthy again: an ejection in force
    /// ends now (the checks saw it answer; holding it out longer only
    /// loads the others). Its level stays, so a backend that fails again
    /// right away is ejected for longer.
    pub fn handle_checked_healthy(&mut self, id: u32, now: Instant) -> Option<Returned> {
        let r = self.records.get_mut(&id)?;
        let (since, _) = r.ejected.filter(|(_, until)| now < *until)?;
        r.ejected = None;
        r.failures = 0;
        r.clean_since = now;
        Some(Returned {
            id,
            addr: r.addr,
            service: r.service,
            ejected_for: now.saturating_duration_since(since),
        })
    }

    /// Whether `id` is out of choice at `now` (the workers read the
    /// table's atomics instead).
    #[cfg(test)]
    pub fn is_ejected(&self, id: u32, now: Instant) -> bool {
        self.records
            .get(&id)
            .and_then(|r| r.ejected)
            .is_some_and(|(_, until)| now < until)
    }

    /// Forgets the backends `keep` says are gone (they left the registry,
    /// or their id now names another address).
    pub fn retain(&mut self, mut keep: impl FnMut(u32, SocketAddr) -> bool) {
        self.records.retain(|id, r| keep(*id, r.addr));
    }

    /// Every backend detection has a record of, by id.
    pub fn rows(&self, now: Instant) -> impl Iterator<Item = (u32, Row)> + '_ {
        self.records.iter().map(move |(id, r)| {
            let row = Row {
                addr: r.addr,
                service: r.service,
                ejected: r.ejected.is_some_and(|(_, until)| now < until),
                ejections_total: r.ejections_total,
                refused_total: r.refused_total,
            };
            (*id, row)
        })
    }

    /// Backends of `service` other than `except` that are out at `now`.
    fn ejected_in(&self, service: ServiceAddr, except: u32, now: Instant) -> u32 {
        self.records
            .iter()
            .filter(|(id, r)| {
                **id != except
                    && r.service == service
                    && r.ejected.is_some_and(|(_, until)| now < until)
            })
            .count() as u32
    }
}

/// Takes one ejection off `record`'s level per whole `period` of its clean
/// spell up to `now`.
fn decay(record: &mut Record, period: Duration, now: Instant) {
    if period.is_zero() {
        record.level = 0;
        return;
    }
    let clean = now.saturating_duration_since(record.clean_since);
    let spells = clean.as_nanos() / period.as_nanos();
    let off = u32::try_from(spells).unwrap_or(u32::MAX).min(record.level);
    record.level -= off;
    record.clean_since += period * off;
}

/// How long the ejection after `level` earlier ones lasts.
fn ejection_time(settings: &Outlier, level: u32) -> Duration {
    let factor = 1u32.checked_shl(level).unwrap_or(u32::MAX);
    settings
        .base_ejection
        .saturating_mul(factor)
        .min(settings.max_ejection)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SVC: ServiceAddr = ServiceAddr {
        vip: std::net::Ipv4Addr::new(198, 19, 0, 1),
        port: 80,
    };

    fn settings(consecutive: u32, max_ejected_percent: u8) -> Outlier {
        Outlier {
            consecutive,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(60),
            max_ejected_percent,
        }
    }

    fn subject(id: u32, active: u32) -> Subject {
        Subject {
            id,
            addr: SocketAddr::from(([127, 0, 0, 1], 9000 + id as u16)),
            service: SVC,
            active,
        }
    }

    /// Fails `id` `n` times at `now`; the last verdict.
    fn fail(d: &mut Detector, id: u32, active: u32, n: u32, now: Instant) -> Option<Verdict> {
        (0..n)
            .map(|_| d.handle_failure(subject(id, active), now))
            .last()
            .flatten()
    }

    fn ejected(v: Option<Verdict>) -> bool {
        matches!(v, Some(Verdict::Ejected { .. }))
    }

    fn refused(v: Option<Verdict>) -> bool {
        matches!(v, Some(Verdict::Refused { .. }))
    }

    fn ejected_for(v: Option<Verdict>) -> Duration {
        match v {
            Some(Verdict::Ejected { duration, .. }) => duration,
            other => panic!("not ejected: {other:?}"),
        }
    }

    #[test]
    fn the_configured_count_of_failures_in_a_row_ejects() {
        let t = Instant::now();
        let mut d = Detector::new(settings(3, 100));
        assert_eq!(fail(&mut d, 1, 4, 2, t), None);
        assert!(!d.is_ejected(1, t));
        let v = d.handle_failure(subject(1, 4), t);
        assert_eq!(
            v,
            Some(Verdict::Ejected {
                failures: 3,
                duration: Duration::from_secs(10),
                until: t + Duration::from_secs(10),
            })
        );
        assert!(d.is_ejected(1, t));
        assert!(d.is_ejected(1, t + Duration::from_millis(9999)));
        assert!(!d.is_ejected(2, t), "only the one that failed");
    }

    #[test]
    fn a_101_ends_the_run_of_failures() {
        let t = Instant::now();
        let mut d = Detector::new(settings(3, 100));
        fail(&mut d, 1, 4, 2, t);
        d.handle_success(1);
        assert_eq!(fail(&mut d, 1, 4, 2, t), None, "counting starts over");
        assert!(!d.is_ejected(1, t));
        assert!(fail(&mut d, 1, 4, 1, t).is_some());
        // A success of a backend never seen failing is nothing to record.
        d.handle_success(9);
        assert_eq!(d.rows(t).count(), 1);
    }

    #[test]
    fn a_healthy_check_ends_an_ejection_but_not_its_level() {
        let t = Instant::now();
        let mut d = Detector::new(settings(3, 100));
        assert_eq!(d.handle_checked_healthy(1, t), None, "no record");
        assert!(ejected(fail(&mut d, 1, 4, 3, t)));
        let later = t + Duration::from_secs(2);
        let r = d.handle_checked_healthy(1, later).expect("was ejected");
        assert_eq!((r.id, r.ejected_for), (1, Duration::from_secs(2)));
        assert!(!d.is_ejected(1, later));
        assert_eq!(d.poll_returned(later + Duration::from_secs(60)), None);
        assert_eq!(d.handle_checked_healthy(1, later), None, "once");
        assert_eq!(
            ejected_for(fail(&mut d, 1, 4, 3, later)),
            Duration::from_secs(20),
            "failing again right away: the next level"
        );
    }

    #[test]
    fn off_never_ejects() {
        let t = Instant::now();
        let mut d = Detector::new(settings(0, 100));
        assert!(!d.enabled());
        assert_eq!(fail(&mut d, 1, 4, 1000, t), None);
        assert_eq!(d.rows(t).count(), 0);
    }

    #[test]
    fn an_ejected_backend_returns_on_its_own_when_its_time_is_over() {
        let t = Instant::now();
        let mut d = Detector::new(settings(1, 100));
        fail(&mut d, 1, 4, 1, t);
        assert_eq!(d.poll_returned(t + Duration::from_secs(9)), None);
        let back = t + Duration::from_secs(10);
        assert!(!d.is_ejected(1, back), "usable at once, polled or not");
        assert_eq!(
            d.poll_returned(back),
            Some(Returned {
                id: 1,
                addr: subject(1, 4).addr,
                service: SVC,
                ejected_for: Duration::from_secs(10),
            })
        );
        assert_eq!(d.poll_returned(back), None, "returned once");
    }

    #[test]
    fn failures_while_ejected_change_nothing() {
        let t = Instant::now();
        let mut d = Detector::new(settings(2, 100));
        fail(&mut d, 1, 4, 2, t);
        // Connections picked before the ejection fail after it.
        assert_eq!(fail(&mut d, 1, 4, 10, t + Duration::from_secs(1)), None);
        let rows: Vec<Row> = d.rows(t).map(|(_, r)| r).collect();
        assert_eq!(rows[0].ejections_total, 1);
        // Back, it needs the full count again.
        let back = t + Duration::from_secs(10);
        assert_eq!(fail(&mut d, 1, 4, 1, back), None);
        assert!(fail(&mut d, 1, 4, 1, back).is_some());
    }

    #[test]
    fn each_ejection_doubles_the_time_up_to_the_maximum() {
        let mut t = Instant::now();
        let mut d = Detector::new(settings(1, 100));
        let mut times = Vec::new();
        for _ in 0..5 {
            let duration = ejected_for(fail(&mut d, 1, 4, 1, t));
            times.push(duration.as_secs());
            // Fails again the moment it is back.
            t += duration;
            assert!(d.poll_returned(t).is_some());
        }
        assert_eq!(times, [10, 20, 40, 60, 60]);
    }

    #[test]
    fn ejections_are_forgiven_one_per_clean_maximum() {
        let t = Instant::now();
        let mut d = Detector::new(settings(1, 100));
        let mut at = t;
        for _ in 0..3 {
            at += ejected_for(fail(&mut d, 1, 4, 1, at));
        }
        // Level 3 now: the next would last 60 s (capped). Back at `at`.
        let one_clean = at + Duration::from_secs(60);
        assert_eq!(
            ejected_for(fail(&mut d, 1, 4, 1, one_clean)),
            Duration::from_secs(40),
            "one clean maximum: one ejection off (level 2: 40 s)"
        );
        let back = one_clean + Duration::from_secs(40);
        let long_clean = back + Duration::from_secs(3600);
        assert_eq!(
            ejected_for(fail(&mut d, 1, 4, 1, long_clean)),
            Duration::from_secs(10),
            "a long clean spell forgives everything"
        );
        // Less than a whole clean maximum forgives nothing.
        let back = long_clean + Duration::from_secs(10);
        assert_eq!(
            ejected_for(fail(&mut d, 1, 4, 1, back + Duration::from_secs(59))),
            Duration::from_secs(20)
        );
    }

    #[test]
    fn ejections_stop_at_the_maximum_share_of_a_service() {
        let t = Instant::now();
        let mut d = Detector::new(settings(1, 50));
        // Two of two fail: one goes, the other is refused.
        assert!(ejected(fail(&mut d, 1, 2, 1, t)));
        assert_eq!(
            fail(&mut d, 2, 2, 1, t),
            Some(Verdict::Refused {
                failures: 1,
                ejected: 1,
                active: 2,
                first: true,
            })
        );
        assert!(!d.is_ejected(2, t));
        assert_eq!(
            fail(&mut d, 2, 2, 1, t),
            Some(Verdict::Refused {
                failures: 2,
                ejected: 1,
                active: 2,
                first: false,
            }),
            "refused again, reported once"
        );
        let refused: u64 = d.rows(t).map(|(_, r)| r.refused_total).sum();
        assert_eq!(refused, 2);
        // Once the first is back, the second may go.
        let back = t + Duration::from_secs(10);
        assert!(matches!(
            fail(&mut d, 2, 2, 1, back),
            Some(Verdict::Ejected { failures: 3, .. })
        ));
    }

    #[test]
    fn the_share_is_per_service_and_rounds_down() {
        let t = Instant::now();
        let mut d = Detector::new(settings(1, 50));
        // One backend of one: 50% of it is none.
        assert!(refused(fail(&mut d, 1, 1, 1, t)));
        // Another service has its own share.
        let other = Subject {
            service: ServiceAddr {
                vip: std::net::Ipv4Addr::new(198, 19, 0, 2),
                port: 80,
            },
            ..subject(3, 2)
        };
        assert!(ejected(d.handle_failure(other, t)));
        assert!(ejected(fail(&mut d, 4, 2, 1, t)));
        // 100%: every backend may go.
        let mut all = Detector::new(settings(1, 100));
        for id in 1..=3 {
            assert!(ejected(fail(&mut all, id, 3, 1, t)));
        }
        // 0%: none.
        let mut none = Detector::new(settings(1, 0));
        assert!(refused(fail(&mut none, 1, 100, 1, t)));
    }

    #[test]
    fn a_reused_id_starts_a_new_record() {
        let t = Instant::now();
        let mut d = Detector::new(settings(2, 100));
        fail(&mut d, 1, 4, 1, t);
        let successor = Subject {
            addr: SocketAddr::from(([127, 0, 0, 2], 80)),
            ..subject(1, 4)
        };
        assert_eq!(
            d.handle_failure(successor, t),
            None,
            "the old backend's failure does not count"
        );
        assert!(d.handle_failure(successor, t).is_some());
        let rows: Vec<Row> = d.rows(t).map(|(_, r)| r).collect();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].addr, successor.addr);
    }

    #[test]
    fn forgotten_backends_leave_the_rows() {
        let t = Instant::now();
        let mut d = Detector::new(settings(1, 100));
        fail(&mut d, 1, 4, 1, t);
        fail(&mut d, 2, 4, 1, t);
        d.retain(|id, _| id == 2);
        let ids: Vec<u32> = d.rows(t).map(|(id, _)| id).collect();
        assert_eq!(ids, [2]);
        assert!(!d.is_ejected(1, t));
    }

    #[test]
    fn rows_say_who_is_out_now() {
        let t = Instant::now();
        let mut d = Detector::new(settings(1, 100));
        fail(&mut d, 1, 4, 1, t);
        let row = |at| d.rows(at).next().map(|(_, r)| r).unwrap();
        assert_eq!(
            row(t),
            Row {
                addr: subject(1, 4).addr,
                service: SVC,
                ejected: true,
                ejections_total: 1,
                refused_total: 0,
            }
        );
        assert!(!row(t + Duration::from_secs(10)).ejected);
    }

    #[test]
    fn huge_levels_saturate_at_the_maximum() {
        let s = settings(1, 100);
        assert_eq!(ejection_time(&s, 0), Duration::from_secs(10));
        assert_eq!(ejection_time(&s, 31), Duration::from_secs(60));
        assert_eq!(ejection_time(&s, u32::MAX), Duration::from_secs(60));
    }
}
