//! Rise and fall: a backend changes health only after `rise` consecutive
//! passes or `fall` consecutive failures, so a single lost check neither
//! ejects a backend nor lets a flapping one back in.

use weir_ebpf::abi::BackendHealth;

/// Consecutive results of one backend's checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counter {
    rise: u32,
    fall: u32,
    health: BackendHealth,
    passes: u32,
    fails: u32,
}

impl Counter {
    /// Starts from `health`: what the registry says, so a restarted agent
    /// resumes where the last one left off instead of from unknown.
    /// `rise` and `fall` below 1 count as 1.
    pub fn new(rise: u32, fall: u32, health: BackendHealth) -> Self {
        Self {
            rise: rise.max(1),
            fall: fall.max(1),
            health,
            passes: 0,
            fails: 0,
        }
    }

    pub fn health(&self) -> BackendHealth {
        self.health
    }

    /// Records one check result; returns the new health when this result
    /// completes a transition. A pass resets the run of failures and a
    /// failure the run of passes.
    pub fn record(&mut self, passed: bool) -> Option<BackendHealth> {
        let (run, reset, need, target) = if passed {
            (
                &mut self.passes,
                &mut self.fails,
                self.rise,
                BackendHealth::Healthy,
            )
        } else {
            (
                &mut self.fails,
                &mut self.passes,
                self.fall,
                BackendHealth::Unhealthy,
            )
        };
        *reset = 0;
        if self.health == target {
            return None;
        }
        *run = run.saturating_add(1);
        if *run < need {
            return None;
        }
        *run = 0;
        self.health = target;
        Some(target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use BackendHealth::{Healthy, Unhealthy, Unknown};

    fn run(c: &mut Counter, results: &str) -> Vec<Option<BackendHealth>> {
        results.chars().map(|r| c.record(r == '+')).collect()
    }

    #[test]
    fn unknown_needs_rise_passes_or_fall_failures() {
        let mut c = Counter::new(2, 3, Unknown);
        assert_eq!(run(&mut c, "+"), [None]);
        assert_eq!(c.health(), Unknown);
        assert_eq!(run(&mut c, "+"), [Some(Healthy)]);

        let mut c = Counter::new(2, 3, Unknown);
        assert_eq!(run(&mut c, "--"), [None, None]);
        assert_eq!(run(&mut c, "-"), [Some(Unhealthy)]);
        assert_eq!(c.health(), Unhealthy);
    }

    #[test]
    fn healthy_falls_only_after_fall_consecutive_failures() {
        let mut c = Counter::new(2, 2, Healthy);
        assert_eq!(
            run(&mut c, "-+-+-+"),
            [None; 6],
            "interleaved passes reset the run"
        );
        assert_eq!(c.health(), Healthy);
        assert_eq!(run(&mut c, "--"), [None, Some(Unhealthy)]);
        assert_eq!(
            run(&mut c, "---"),
            [None; 3],
            "no transition to where it is"
        );
    }

    #[test]
    fn unhealthy_rises_only_after_rise_consecutive_passes() {
        let mut c = Counter::new(3, 1, Unhealthy);
        assert_eq!(run(&mut c, "++-++"), [None; 5]);
        assert_eq!(run(&mut c, "+"), [Some(Healthy)]);
        assert_eq!(
            run(&mut c, "-"),
            [Some(Unhealthy)],
            "fall 1: one failure is enough"
        );
    }

    #[test]
    fn a_transition_starts_the_next_count_from_zero() {
        let mut c = Counter::new(2, 2, Healthy);
        assert_eq!(run(&mut c, "--"), [None, Some(Unhealthy)]);
        assert_eq!(run(&mut c, "+"), [None]);
        assert_eq!(run(&mut c, "+"), [Some(Healthy)]);
        assert_eq!(run(&mut c, "-"), [None]);
        assert_eq!(run(&mut c, "-"), [Some(Unhealthy)]);
    }

    #[test]
    fn zero_counts_mean_one() {
        let mut c = Counter::new(0, 0, Unknown);
        assert_eq!(run(&mut c, "-+"), [Some(Unhealthy), Some(Healthy)]);
    }

    proptest::proptest! {
        /// Whatever the results, a transition happens exactly when the last
        /// `rise` (or `fall`) results were all passes (failures) and the
        /// health was not already there.
        #[test]
        fn transitions_follow_the_last_results(
            rise in 1u32..5,
            fall in 1u32..5,
            start in 0u8..3,
            results in proptest::collection::vec(proptest::bool::ANY, 0..64),
        ) {
            let start = [Unknown, Healthy, Unhealthy][start as usize];
            let mut c = Counter::new(rise, fall, start);
            let mut health = start;
            let mut since = 0usize;
            for (i, &passed) in results.iter().enumerate() {
                let got = c.record(passed);
                let need = if passed { rise } else { fall } as usize;
                let target = if passed { Healthy } else { Unhealthy };
                let window = &results[since.max((i + 1).saturating_sub(need))..=i];
                let expect = health != target
                    && i + 1 - since >= need
                    && window.len() == need
                    && window.iter().all(|&r| r == passed);
                proptest::prop_assert_eq!(got, expect.then_some(target), "at {}", i);
                if expect {
                    health = target;
                    since = i + 1;
                }
                proptest::prop_assert_eq!(c.health(), health);
            }
        }
    }
}
