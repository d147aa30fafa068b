//! When each connection next needs its [`Conn::handle_timeout`]: a hashed
//! timing wheel of ticks. A worker with 100,000 mostly idle connections
//! must not visit every one of them on every tick; with the wheel a tick
//! costs what is due in it.
//!
//! Filing is lazy: a connection is filed once, under the earliest tick it
//! may need, and only moved when its deadline comes earlier (activity only
//! ever pushes the idle timeout later). When its tick comes, the worker
//! asks the connection again and files it anew if nothing is due yet.
//! Deadlines past the wheel's horizon are filed at the horizon and looked
//! at again then.
//!
//! [`Conn::handle_timeout`]: super::conn::Conn::handle_timeout

use std::time::{Duration, Instant};

/// A connection as the wheel files it: its table index and generation.
pub type Key = (u32, u32);

/// Tick number of "not filed".
pub const UNFILED: u32 = u32::MAX;

pub struct Wheel {
    slots: Box<[Vec<Key>]>,
    start: Instant,
    tick: Duration,
    /// The last tick whose keys were handed out.
    current: u32,
}

impl Wheel {
    /// A wheel of `slots` ticks of `tick` each, counting from `start`.
    pub fn new(start: Instant, tick: Duration, slots: usize) -> Self {
        assert!(slots >= 2 && !tick.is_zero());
        Self {
            slots: (0..slots).map(|_| Vec::new()).collect(),
            start,
            tick,
            current: 0,
        }
    }

    /// The first tick at or after `at`.
    fn tick_at(&self, at: Instant) -> u64 {
        let since = at.saturating_duration_since(self.start);
        since.as_nanos().div_ceil(self.tick.as_nanos()) as u64
    }

    /// The tick `key` would be filed under for `at`: the first at or
    /// after it, at the soonest the next one, at the latest the horizon.
    pub fn tick_for(&self, at: Instant) -> u32 {
        let horizon = u64::from(self.current) + self.slots.len() as u64 - 1;
        self.tick_at(at)
            .clamp(u64::from(self.current) + 1, horizon)
            .min(u64::from(UNFILED - 1)) as u32
    }

    /// Files `key` for `at` ([`Wheel::tick_for`]); returns the tick it went
    /// under, which the caller keeps to tell this filing from stale ones.
    pub fn file(&mut self, key: Key, at: Instant) -> u32 {
        let tick = self.tick_for(at);
        let n = self.slots.len();
        self.slots[tick as usize % n].push(key);
        tick
    }

    /// Moves the wheel up to `now` and hands out what was filed under
    /// every tick passed, each with its tick, into `due`.
    pub fn advance(&mut self, now: Instant, due: &mut Vec<(Key, u32)>) {
        let to = (now.saturating_duration_since(self.start).as_nanos() / self.tick.as_nanos())
            .min(u128::from(UNFILED - 1)) as u32;
        let n = self.slots.len();
        while self.current < to {
            self.current += 1;
            let tick = self.current;
            let slot = &mut self.slots[tick as usize % n];
            due.extend(slot.drain(..).map(|k| (k, tick)));
            // A slot that once held a burst gives its memory back.
            if slot.capacity() > 64 {
                slot.shrink_to(64);
            }
        }
    }

    /// Keys filed, stale ones included.
    pub fn filed(&self) -> usize {
        self.slots.iter().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(50);

    fn ticks(n: u32) -> Duration {
        TICK * n
    }

    #[test]
    fn a_key_comes_out_at_its_tick_and_not_before() {
        let t0 = Instant::now();
        let mut w = Wheel::new(t0, TICK, 8);
        assert_eq!(w.file((1, 1), t0 + ticks(3)), 3);
        // Between ticks: the next whole tick.
        assert_eq!(w.file((2, 1), t0 + ticks(3) + Duration::from_millis(1)), 4);
        let mut due = Vec::new();
        w.advance(t0 + ticks(2) + Duration::from_millis(49), &mut due);
        assert!(due.is_empty(), "{due:?}");
        w.advance(t0 + ticks(3), &mut due);
        assert_eq!(due, [((1, 1), 3)]);
        due.clear();
        // A late tick hands out everything it passed.
        w.advance(t0 + ticks(7), &mut due);
        assert_eq!(due, [((2, 1), 4)]);
        assert_eq!(w.filed(), 0);
    }

    #[test]
    fn the_past_is_the_next_tick_and_the_far_future_the_horizon() {
        let t0 = Instant::now();
        let mut w = Wheel::new(t0, TICK, 8);
        let mut due = Vec::new();
        w.advance(t0 + ticks(10), &mut due);
        assert_eq!(w.file((1, 1), t0), 11);
        assert_eq!(w.file((2, 1), t0 + Duration::from_secs(3600)), 17);
        w.advance(t0 + ticks(11), &mut due);
        assert_eq!(due, [((1, 1), 11)]);
        due.clear();
        w.advance(t0 + ticks(16), &mut due);
        assert!(due.is_empty());
        // At the horizon the caller finds it not due and files it again.
        w.advance(t0 + ticks(17), &mut due);
        assert_eq!(due, [((2, 1), 17)]);
        assert_eq!(w.file((2, 1), t0 + Duration::from_secs(3600)), 24);
    }

    /// Many keys under one tick come out together, in filing order, and
    /// the slot keeps no more than a small buffer afterwards.
    #[test]
    fn a_burst_comes_out_whole() {
        let t0 = Instant::now();
        let mut w = Wheel::new(t0, TICK, 4);
        for i in 0..1000 {
            w.file((i, 7), t0 + ticks(1));
        }
        let mut due = Vec::new();
        w.advance(t0 + ticks(1), &mut due);
        assert_eq!(due.len(), 1000);
        assert!(
            due.iter()
                .enumerate()
                .all(|(i, (k, t))| *k == (i as u32, 7) && *t == 1)
        );
        assert!(w.slots[1].capacity() <= 64);
    }
}
