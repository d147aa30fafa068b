//! Drain scheduling, sans-IO. When a backend turns draining (or weir shuts
//! down) its connections are closed with 1001 at times spread evenly over
//! the drain window, so their clients do not all reconnect at once. Each
//! worker schedules its own connections; spreading each worker's share
//! evenly spreads the union too.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// When the `i`-th of `n` connections closes, in milliseconds from the start
/// of a `window_ms` window: the midpoints of `n` equal slices, so the first
/// close is not at once and the last is before the window ends.
pub fn offset_ms(i: usize, n: usize, window_ms: u64) -> u64 {
    assert!(i < n, "connection {i} of {n}");
    ((2 * i as u128 + 1) * window_ms as u128 / (2 * n as u128)) as u64
}

/// Connections waiting for their drain time, earliest first.
#[derive(Debug)]
pub struct DrainQueue<K: Ord> {
    heap: BinaryHeap<Reverse<(u64, u64, K)>>,
    seq: u64,
}

impl<K: Ord> Default for DrainQueue<K> {
    fn default() -> Self {
        Self {
            heap: BinaryHeap::new(),
            seq: 0,
        }
    }
}

impl<K: Ord> DrainQueue<K> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Schedules `conns` (in the order given) over `window_ms` from `now_ms`.
    pub fn schedule(&mut self, now_ms: u64, window_ms: u64, conns: Vec<K>) {
        let n = conns.len();
        for (i, k) in conns.into_iter().enumerate() {
            let due = now_ms.saturating_add(offset_ms(i, n, window_ms));
            self.heap.push(Reverse((due, self.seq, k)));
            self.seq += 1;
        }
    }

    /// Schedules one connection at `due_ms`: one that comes from another
    /// process (a takeover) keeps the time its drain gave it there.
    pub fn schedule_at(&mut self, due_ms: u64, conn: K) {
        self.heap.push(Reverse((due_ms, self.seq, conn)));
        self.seq += 1;
    }

    /// Every connection waiting, with when it is due, in no order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &K)> {
        self.heap.iter().map(|Reverse((due, _, k))| (*due, k))
    }

    /// Removes and returns every connection due at `now_ms`, earliest first.
    /// A connection that ended on its own meanwhile is the caller's to skip.
    pub fn due(&mut self, now_ms: u64) -> Vec<K> {
        let mut out = Vec::new();
        while self
            .heap
            .peek()
            .is_some_and(|Reverse((due, _, _))| *due <= now_ms)
        {
            let Reverse((_, _, k)) = self.heap.pop().expect("peeked");
            out.push(k);
        }
        out
    }

    /// When the next connection is due, for the worker's timer.
    pub fn next_due(&self) -> Option<u64> {
        self.heap.peek().map(|Reverse((due, _, _))| *due)
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection scheduled at a time of its own (a drain carried over
    /// from another process) comes due then, among the others, and is
    /// listed with its time until then.
    #[test]
    fn a_connection_keeps_the_time_it_is_scheduled_at() {
        let mut q = DrainQueue::new();
        q.schedule(0, 1000, vec!['a', 'b']);
        q.schedule_at(600, 'x');
        let mut waiting: Vec<(u64, char)> = q.iter().map(|(due, k)| (due, *k)).collect();
        waiting.sort();
        assert_eq!(waiting, [(250, 'a'), (600, 'x'), (750, 'b')]);
        assert_eq!(q.due(599), ['a']);
        assert_eq!(q.due(600), ['x']);
        assert_eq!(q.due(10_000), ['b']);
        assert!(q.is_empty());
    }

    #[test]
    fn offsets_are_midpoints_of_equal_slices() {
        assert_eq!(offset_ms(0, 1, 30_000), 15_000);
        assert_eq!(
            (0..4).map(|i| offset_ms(i, 4, 1000)).collect::<Vec<_>>(),
            [125, 375, 625, 875]
        );
        assert_eq!(
            offset_ms(0, 3, 0),
            0,
            "a zero window closes everything at once"
        );
    }

    #[test]
    fn a_window_is_spread_evenly() {
        let n = 200;
        let window = 30_000;
        let times: Vec<u64> = (0..n).map(|i| offset_ms(i, n, window)).collect();
        assert!(times.windows(2).all(|w| w[1] >= w[0]), "in order");
        assert!(*times.last().unwrap() < window);
        // Every tenth of the window gets a tenth of the connections.
        for decile in 0..10 {
            let lo = window * decile / 10;
            let hi = window * (decile + 1) / 10;
            let count = times.iter().filter(|t| (lo..hi).contains(*t)).count();
            assert_eq!(count, n / 10, "decile {decile}");
        }
    }

    #[test]
    fn queue_releases_connections_when_due() {
        let mut q = DrainQueue::new();
        q.schedule(1_000, 1_000, vec!["a", "b", "c", "d"]);
        assert_eq!(q.next_due(), Some(1_125));
        assert!(q.due(1_124).is_empty());
        assert_eq!(q.due(1_400), ["a", "b"]);
        // A second backend drains meanwhile, over a shorter window.
        q.schedule(1_400, 100, vec!["x"]);
        assert_eq!(q.next_due(), Some(1_450));
        assert_eq!(q.due(1_700), ["x", "c"]);
        assert_eq!(q.len(), 1);
        assert_eq!(q.due(u64::MAX), ["d"]);
        assert!(q.is_empty() && q.next_due().is_none());
    }

    #[test]
    fn equal_deadlines_keep_scheduling_order() {
        let mut q = DrainQueue::new();
        q.schedule(0, 0, vec![3, 1, 2]);
        assert_eq!(q.due(0), [3, 1, 2]);
    }

    proptest::proptest! {
        #[test]
        fn every_connection_is_released_once_within_the_window(
            n in 1usize..500, window in 0u64..100_000, start in 0u64..1_000_000,
        ) {
            let mut q = DrainQueue::new();
            q.schedule(start, window, (0..n).collect());
            let mut seen = Vec::new();
            let mut now = start;
            while !q.is_empty() {
                now = q.next_due().unwrap();
                proptest::prop_assert!(now >= start && now < start + window.max(1));
                seen.extend(q.due(now));
            }
            proptest::prop_assert_eq!(seen, (0..n).collect::<Vec<_>>());
            let _ = now;
        }
    }
}
