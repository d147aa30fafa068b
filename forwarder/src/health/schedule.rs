//! When each target is checked next. A check is due `interval` after the
//! previous one started, plus a random part of `jitter`, so checks of many
//! backends drift apart instead of firing together; the first checks of new
//! targets are spread over one interval, so an agent that starts on 5,000
//! backends does not open 5,000 connections in the same millisecond.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// Next-due times of a set of targets with one interval and jitter.
#[derive(Clone, Debug)]
pub struct Schedule<K: Ord + Clone> {
    interval: Duration,
    jitter: Duration,
    /// Due time of each waiting target; targets being checked are not here.
    due: BTreeMap<K, Instant>,
    queue: BTreeSet<(Instant, K)>,
}

/// `random` (any u32) as that share of `span`.
fn share(span: Duration, random: u32) -> Duration {
    Duration::from_nanos((span.as_nanos() * u128::from(random) / (1u128 << 32)) as u64)
}

impl<K: Ord + Clone> Schedule<K> {
    pub fn new(interval: Duration, jitter: Duration) -> Self {
        Self {
            interval,
            jitter,
            due: BTreeMap::new(),
            queue: BTreeSet::new(),
        }
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Adds `key` if it is not scheduled yet, due at a point of the next
    /// interval that `random` picks (uniformly over the u32 range).
    pub fn insert(&mut self, key: K, now: Instant, random: u32) {
        if !self.due.contains_key(&key) {
            self.set(key, now + share(self.interval, random));
        }
    }

    /// Forgets `key` (it is no longer checked).
    pub fn remove(&mut self, key: &K) {
        if let Some(at) = self.due.remove(key) {
            self.queue.remove(&(at, key.clone()));
        }
    }

    /// Keeps only the targets `keep` accepts.
    pub fn retain(&mut self, mut keep: impl FnMut(&K) -> bool) {
        let gone: Vec<K> = self.due.keys().filter(|k| !keep(k)).cloned().collect();
        for k in &gone {
            self.remove(k);
        }
    }

    /// Takes the earliest target due at `now` out of the schedule: it is
    /// being checked until [`Schedule::reschedule`] puts it back.
    pub fn pop_due(&mut self, now: Instant) -> Option<K> {
        let (at, _) = self.queue.first()?;
        if *at > now {
            return None;
        }
        let (_, key) = self.queue.pop_first()?;
        self.due.remove(&key);
        Some(key)
    }

    /// Puts `key` back, due one interval after `started` plus `random`'s
    /// share of the jitter.
    pub fn reschedule(&mut self, key: K, started: Instant, random: u32) {
        self.remove(&key);
        self.set(key, started + self.interval + share(self.jitter, random));
    }

    /// When the earliest waiting target is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.queue.first().map(|(at, _)| *at)
    }

    pub fn contains(&self, key: &K) -> bool {
        self.due.contains_key(key)
    }

    pub fn len(&self) -> usize {
        self.due.len()
    }

    pub fn is_empty(&self) -> bool {
        self.due.is_empty()
    }

    fn set(&mut self, key: K, at: Instant) {
        self.queue.insert((at, key.clone()));
        self.due.insert(key, at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn first_checks_spread_over_one_interval() {
        let now = Instant::now();
        let mut s = Schedule::new(SECOND, Duration::from_millis(100));
        for k in 0..1000u32 {
            // What a uniform random source gives, in order.
            s.insert(k, now, k.wrapping_mul(4_294_967));
        }
        assert_eq!(s.len(), 1000);
        let mut per_tenth = [0; 10];
        while let Some(at) = s.next_due() {
            let k = s.pop_due(at).unwrap();
            let offset = at - now;
            assert!(offset < SECOND, "{k}: {offset:?}");
            per_tenth[(offset.as_millis() / 100) as usize] += 1;
        }
        assert!(
            per_tenth.iter().all(|&n| (90..=110).contains(&n)),
            "{per_tenth:?}"
        );
    }

    #[test]
    fn only_due_targets_pop_and_they_leave_until_rescheduled() {
        let now = Instant::now();
        let mut s = Schedule::new(SECOND, Duration::ZERO);
        s.insert("a", now, 0);
        s.insert("b", now, u32::MAX / 2);
        assert_eq!(s.pop_due(now), Some("a"));
        assert_eq!(s.pop_due(now), None, "b is due half an interval later");
        assert!(!s.contains(&"a"), "in flight");
        s.insert("a", now, 0);
        assert!(s.contains(&"a"), "insert of an in-flight key puts it back");
        s.remove(&"a");
        assert_eq!(s.pop_due(now + SECOND), Some("b"));
        assert!(s.is_empty());
        s.reschedule("b", now + SECOND, 0);
        assert_eq!(s.next_due(), Some(now + 2 * SECOND));
    }

    #[test]
    fn inserting_a_scheduled_key_keeps_its_time() {
        let now = Instant::now();
        let mut s = Schedule::new(SECOND, Duration::ZERO);
        s.insert(1, now, 0);
        s.insert(1, now + SECOND, u32::MAX);
        assert_eq!((s.len(), s.next_due()), (1, Some(now)));
    }

    #[test]
    fn the_next_check_is_an_interval_plus_part_of_the_jitter_later() {
        let now = Instant::now();
        let jitter = Duration::from_millis(200);
        let mut s = Schedule::new(SECOND, jitter);
        for (random, want) in [
            (0, SECOND),
            (u32::MAX / 2, SECOND + jitter / 2),
            (u32::MAX, SECOND + jitter),
        ] {
            s.reschedule(7, now, random);
            let at = s.next_due().unwrap() - now;
            assert!(
                at.abs_diff(want) < Duration::from_micros(1),
                "{random}: {at:?}"
            );
            assert!(at < SECOND + jitter);
        }
        assert_eq!(s.len(), 1, "rescheduling replaces the old time");
    }

    #[test]
    fn retain_drops_the_others() {
        let now = Instant::now();
        let mut s = Schedule::new(SECOND, Duration::ZERO);
        for k in 0..10 {
            s.insert(k, now, k * 1000);
        }
        s.retain(|k| k % 2 == 0);
        let mut popped = vec![];
        while let Some(k) = s.pop_due(now + SECOND) {
            popped.push(k);
        }
        assert_eq!(popped, [0, 2, 4, 6, 8]);
    }
}
