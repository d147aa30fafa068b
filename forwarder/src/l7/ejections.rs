//! The process's outlier table, shared by its workers: every worker of a
//! `weir run` stops choosing a backend once any of them saw it fail often
//! enough (the decisions are the [`Detector`]'s).
//!
//! What a pick reads is lock-free: per backend id, when its ejection ends
//! (one atomic load per candidate). A 101 from a backend with no failure on
//! record costs one load too. Only failures, the 101 that ends a run of
//! them and returns take the lock around the detector; they are rare next
//! to picks.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use weir_ebpf::abi::MAX_BACKENDS;

use super::config::Outlier;
use super::outlier::{Detector, Returned, Row, Subject, Verdict};

pub struct Ejections {
    detector: Mutex<Detector>,
    /// Whether failures count at all (a reload may change it).
    enabled: AtomicBool,
    /// The times below count milliseconds from here.
    base: Instant,
    /// Per backend id: when its ejection ends (rounded up), 0 when it is
    /// not ejected or its return was handled.
    until_ms: Box<[AtomicU64]>,
    /// Per backend id: it has failures on record, so its next 101 must
    /// reach the detector.
    suspect: Box<[AtomicBool]>,
    /// Ejections whose return is not handled yet: the tick looks for
    /// returns only while there are some.
    out: AtomicUsize,
}

impl Ejections {
    pub fn new(settings: Outlier, now: Instant) -> Self {
        let n = MAX_BACKENDS as usize;
        Self {
            detector: Mutex::new(Detector::new(settings)),
            enabled: AtomicBool::new(settings.consecutive > 0),
            base: now,
            until_ms: (0..n).map(|_| AtomicU64::new(0)).collect(),
            suspect: (0..n).map(|_| AtomicBool::new(false)).collect(),
            out: AtomicUsize::new(0),
        }
    }

    fn detector(&self) -> std::sync::MutexGuard<'_, Detector> {
        self.detector.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn ms(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.base).as_millis() as u64
    }

    /// Whether backend `id` is out of choice at `now`.
    pub fn is_ejected(&self, id: u32, now: Instant) -> bool {
        self.until_ms
            .get(id as usize)
            .is_some_and(|u| self.ms(now) < u.load(Ordering::Relaxed))
    }

    /// A connection to `backend` failed (connect refused or timed out, or
    /// the upgrade failed) at `now`.
    pub fn failed(&self, backend: Subject, now: Instant) {
        let Some(suspect) = self.suspect.get(backend.id as usize) else {
            return;
        };
        if !self.enabled.load(Ordering::Relaxed) {
            return;
        }
        let mut d = self.detector();
        // A return not handled yet goes first, so that its line comes
        // before a new ejection's.
        self.handle_returns(&mut d, now);
        suspect.store(true, Ordering::Relaxed);
        match d.handle_failure(backend, now) {
            Some(Verdict::Ejected {
                failures,
                duration,
                until,
            }) => {
                let end = until.saturating_duration_since(self.base);
                let end_ms = end.as_millis() as u64 + u64::from(end.subsec_nanos() % 1_000_000 > 0);
                self.until_ms[backend.id as usize].store(end_ms, Ordering::Relaxed);
                self.out.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    event = "outlier_ejected",
                    backend = %backend.addr,
                    service = %backend.service,
                    failures,
                    duration_ms = duration.as_millis() as u64,
                    "backend {} of {} failed {failures} times in a row: no new connection goes \
                     to it for {duration:?}, then it returns on its own (counted in \
                     weir_l7_outlier_ejections_total)",
                    backend.addr,
                    backend.service
                );
            }
            Some(Verdict::Refused {
                failures,
                ejected,
                active,
                first: true,
            }) => {
                tracing::warn!(
                    event = "outlier_ejection_refused",
                    backend = %backend.addr,
                    service = %backend.service,
                    failures,
                    ejected,
                    active,
                    "backend {} of {} failed {failures} times in a row but stays in choice: \
                     {ejected} of its {active} active backend(s) are ejected already, the most \
                     outlier.max_ejected_percent allows (counted in \
                     weir_l7_outlier_ejections_refused_total)",
                    backend.addr,
                    backend.service
                );
            }
            Some(Verdict::Refused { first: false, .. }) | None => {}
        }
    }

    /// New settings from a reload: failures from now on count under them
    /// and the next ejections last what they say; ejections in progress
    /// end when they were given to.
    pub fn set_settings(&self, settings: Outlier) {
        let mut d = self.detector();
        d.set_settings(settings);
        self.enabled
            .store(settings.consecutive > 0, Ordering::Relaxed);
    }

    /// Backend `id` answered an upgrade with 101.
    pub fn succeeded(&self, id: u32) {
        let Some(suspect) = self.suspect.get(id as usize) else {
            return;
        };
        if !suspect.load(Ordering::Relaxed) {
            return;
        }
        let mut d = self.detector();
        suspect.store(false, Ordering::Relaxed);
        d.handle_success(id);
    }

    /// Handles the ejections that ended by `now` (their log lines): the
    /// workers' tick. Cheap while nothing is ejected.
    pub fn poll_returns(&self, now: Instant) {
        if self.out.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut d = self.detector();
        self.handle_returns(&mut d, now);
    }

    fn handle_returns(&self, d: &mut Detector, now: Instant) {
        while let Some(r) = d.poll_returned(now) {
            self.returned(r, "time", "");
        }
    }

    /// Ends `r`'s ejection in the table and logs why (`by`).
    fn returned(&self, r: Returned, by: &'static str, why: &str) {
        let Returned {
            id,
            addr,
            service,
            ejected_for,
        } = r;
        self.clear(id);
        tracing::info!(
            event = "outlier_returned",
            backend = %addr,
            service = %service,
            duration_ms = ejected_for.as_millis() as u64,
            by,
            "backend {addr} of {service} returns after {ejected_for:?} of ejection{why}"
        );
    }

    /// `weir agent` found `id` healthy again: its ejection ends now.
    pub fn checked_healthy(&self, id: u32, now: Instant) {
        if self.out.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut d = self.detector();
        if let Some(r) = d.handle_checked_healthy(id, now) {
            self.returned(r, "health_check", ": weir agent found it healthy");
        }
    }

    /// Marks `id` as not ejected, if it was.
    fn clear(&self, id: u32) {
        if self.until_ms[id as usize].swap(0, Ordering::Relaxed) != 0 {
            self.out.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Forgets the backends `keep` says are gone from the registry.
    pub fn forget(&self, mut keep: impl FnMut(u32, SocketAddr) -> bool) {
        let mut gone = Vec::new();
        self.detector().retain(|id, addr| {
            let k = keep(id, addr);
            if !k {
                gone.push(id);
            }
            k
        });
        for id in gone {
            self.clear(id);
            self.suspect[id as usize].store(false, Ordering::Relaxed);
        }
    }

    /// Every backend with a record, for `/metrics`.
    pub fn rows(&self, now: Instant) -> Vec<Row> {
        self.detector().rows(now).map(|(_, r)| r).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::registry::ServiceAddr;

    fn table(consecutive: u32) -> Ejections {
        let settings = Outlier {
            consecutive,
            base_ejection: Duration::from_millis(1500),
            max_ejection: Duration::from_secs(60),
            max_ejected_percent: 50,
        };
        Ejections::new(settings, Instant::now())
    }

    fn subject(id: u32) -> Subject {
        Subject {
            id,
            addr: SocketAddr::from(([127, 0, 0, 1], 9000 + id as u16)),
            service: ServiceAddr {
                vip: std::net::Ipv4Addr::new(198, 19, 0, 1),
                port: 80,
            },
            active: 4,
        }
    }

    /// A reload turns detection on: failures count from then on, under
    /// the new settings.
    #[test]
    fn settings_from_a_reload_apply_to_the_next_failures() {
        let e = table(0);
        let t = e.base + Duration::from_millis(3);
        for _ in 0..3 {
            e.failed(subject(5), t);
        }
        assert!(!e.is_ejected(5, t), "detection off: nothing counts");
        e.set_settings(Outlier {
            consecutive: 2,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(1),
            max_ejected_percent: 50,
        });
        e.failed(subject(5), t);
        assert!(!e.is_ejected(5, t), "one failure since the reload");
        e.failed(subject(5), t);
        assert!(e.is_ejected(5, t));
        assert!(!e.is_ejected(5, t + Duration::from_millis(1001)));
    }

    #[test]
    fn every_reader_sees_an_ejection_until_its_end() {
        let e = table(2);
        let t = e.base + Duration::from_millis(3);
        e.failed(subject(7), t);
        assert!(!e.is_ejected(7, t));
        e.failed(subject(7), t);
        assert!(e.is_ejected(7, t));
        let end = t + Duration::from_millis(1500);
        assert!(e.is_ejected(7, end - Duration::from_millis(1)));
        assert!(!e.is_ejected(7, end), "back exactly at its end");
        assert_eq!(e.out.load(Ordering::Relaxed), 1);
        e.poll_returns(end);
        assert_eq!(e.out.load(Ordering::Relaxed), 0, "its return handled");
        assert!(!e.is_ejected(7, t), "cleared");
        let rows = e.rows(end);
        assert_eq!((rows.len(), rows[0].ejections_total), (1, 1));
    }

    #[test]
    fn a_101_reaches_the_detector_only_after_failures() {
        let e = table(2);
        let t = e.base;
        e.failed(subject(3), t);
        assert!(e.suspect[3].load(Ordering::Relaxed));
        e.succeeded(3);
        assert!(!e.suspect[3].load(Ordering::Relaxed));
        e.failed(subject(3), t);
        assert!(!e.is_ejected(3, t), "the 101 ended the run");
        e.succeeded(4);
        assert_eq!(
            e.rows(t).len(),
            1,
            "no record for a backend that never failed"
        );
    }

    #[test]
    fn off_records_nothing_and_odd_ids_are_ignored() {
        let e = table(0);
        e.failed(subject(1), e.base);
        assert!(!e.is_ejected(1, e.base));
        assert!(e.rows(e.base).is_empty());
        let on = table(1);
        on.failed(subject(MAX_BACKENDS), on.base);
        on.succeeded(u32::MAX);
        assert!(!on.is_ejected(u32::MAX, on.base));
        assert!(on.rows(on.base).is_empty());
    }

    #[test]
    fn a_forgotten_backend_is_no_longer_ejected() {
        let e = table(1);
        let t = e.base;
        e.failed(subject(5), t);
        assert!(e.is_ejected(5, t));
        e.forget(|id, _| id != 5);
        assert!(!e.is_ejected(5, t));
        assert_eq!(e.out.load(Ordering::Relaxed), 0);
        assert!(e.rows(t).is_empty());
    }
}
