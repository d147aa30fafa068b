//! A worker's registered-file table. Every client and backend socket is a
//! direct descriptor in one slot of its worker's ring: it costs no entry in
//! the process's descriptor table, and the accept, the socket's creation,
//! its option, connect, send, receive, shutdown and close all go through
//! the ring on the slot.
//!
//! The kernel caps one ring's table at the process's open-files limit
//! (`RLIMIT_NOFILE`, checked when the table is registered), so a process
//! holds more connections than that by running more rings: [`size`] says
//! how many workers, and how large a table each, the configured
//! `max_connections` takes.

/// Slots one proxied connection takes: its client and its backend.
pub const PER_CONNECTION: u64 = 2;

/// Accepts each worker keeps armed per listener: each holds the slot its
/// client will land in. More let a burst of arrivals in per pass of the
/// event loop.
pub const ACCEPTS_PER_LISTENER: u64 = 16;

/// The kernel's own cap on a table (`IORING_MAX_FIXED_FILES`).
pub const KERNEL_MAX: u64 = 1 << 20;

/// Upper bound of `runtime.workers`, which [`size`] also respects.
const MAX_WORKERS: u64 = super::config::MAX_WORKERS;

/// How many workers a process runs and how large each one's table is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizing {
    pub workers: usize,
    /// Slots of each worker's table.
    pub slots: u32,
    /// Accepts each worker keeps armed per listener.
    pub accepts_per_listener: u32,
    /// Connections the workers hold together, at most `max_connections`.
    pub capacity: u64,
    /// Connections one table can hold.
    pub per_worker: u64,
}

/// Sizes the tables for `max_connections`. `workers` is the configured
/// count, 0 for "one per core, or more where the open-files limit
/// `nofile` caps each table below what `max_connections` needs"; a
/// configured count is kept even when it cannot hold `max_connections`
/// ([`Sizing::capacity`] then says what it holds).
pub fn size(
    max_connections: u64,
    workers: usize,
    cores: usize,
    nofile: u64,
    listeners: usize,
) -> Sizing {
    let listeners = listeners.max(1) as u64;
    let cap = nofile.clamp(PER_CONNECTION + 1, KERNEL_MAX);
    // A tiny limit keeps a quarter of the table for accepts, and at least one.
    let accepts_per_listener = (cap / (4 * listeners)).clamp(1, ACCEPTS_PER_LISTENER);
    let accepts = (accepts_per_listener * listeners).min(cap - PER_CONNECTION);
    let per_table = (cap - accepts) / PER_CONNECTION;
    let workers = match workers {
        0 => {
            // SO_REUSEPORT spreads clients by hash, not evenly: an eighth
            // more tables than the average needs.
            let wanted = max_connections + max_connections / 8;
            let needed = wanted.div_ceil(per_table);
            needed.max(cores.max(1) as u64).min(MAX_WORKERS) as usize
        }
        n => n,
    };
    // Any one worker may get more than its share of clients: each table
    // is as large as the whole process may need, up to the cap.
    let slots = (accepts + PER_CONNECTION * max_connections).min(cap);
    let per_worker = (slots - accepts) / PER_CONNECTION;
    Sizing {
        workers,
        slots: slots as u32,
        accepts_per_listener: accepts_per_listener as u32,
        capacity: (per_worker * workers as u64).min(max_connections),
        per_worker,
    }
}

/// The free slots of one worker's table.
pub struct Slots {
    free: Vec<u32>,
}

impl Slots {
    /// A table of `size` slots, all free; the lowest are handed out first.
    pub fn new(size: u32) -> Self {
        Self {
            free: (0..size).rev().collect(),
        }
    }

    pub fn take(&mut self) -> Option<u32> {
        self.free.pop()
    }

    /// Gives back a slot whose descriptor is closed, or which never got one.
    pub fn give(&mut self, slot: u32) {
        debug_assert!(!self.free.contains(&slot), "slot {slot} given back twice");
        self.free.push(slot);
    }

    pub fn free(&self) -> usize {
        self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This machine's case: 20,000 open files. One table holds 9,992
    /// connections next to 16 accepts, so 100,000 connections take 12
    /// workers (an eighth of headroom), each table at the cap.
    #[test]
    fn a_low_file_limit_takes_more_workers() {
        let s = size(100_000, 0, 2, 20_000, 1);
        assert_eq!(s.per_worker, 9_992);
        assert_eq!(s.workers, 12);
        assert_eq!(s.slots, 20_000);
        assert_eq!(s.accepts_per_listener, 16);
        assert_eq!(s.capacity, 100_000);
    }

    /// A host with a high limit runs one worker per core, each table sized
    /// for the whole process.
    #[test]
    fn a_high_file_limit_keeps_one_worker_per_core() {
        let s = size(100_000, 0, 8, 1 << 20, 2);
        assert_eq!(s.workers, 8);
        assert_eq!(s.slots, 200_032);
        assert_eq!(s.per_worker, 100_000);
        assert_eq!(s.capacity, 100_000);
    }

    /// Configured workers stay as configured; the capacity says what they
    /// hold.
    #[test]
    fn configured_workers_are_kept_and_their_capacity_told() {
        let s = size(100_000, 2, 2, 20_000, 1);
        assert_eq!(s.workers, 2);
        assert_eq!(s.capacity, 19_984);
        let s = size(500, 1, 2, 20_000, 1);
        assert_eq!((s.workers, s.slots, s.capacity), (1, 1_016, 500));
    }

    /// The kernel's own cap bounds a table whatever the file limit; a tiny
    /// limit still leaves one accept and one connection.
    #[test]
    fn tables_stay_within_the_kernels_bounds() {
        let s = size(1 << 20, 0, 2, u64::MAX, 1);
        assert_eq!(u64::from(s.slots), KERNEL_MAX);
        let s = size(10, 1, 1, 4, 1);
        assert_eq!((s.slots, s.accepts_per_listener, s.per_worker), (4, 1, 1));
        let s = size(10, 0, 1, 0, 3);
        assert!(s.per_worker >= 1 && s.slots >= 3, "{s:?}");
    }

    #[test]
    fn slots_come_back_and_go_out_lowest_first() {
        let mut slots = Slots::new(3);
        assert_eq!(slots.take(), Some(0));
        assert_eq!(slots.take(), Some(1));
        slots.give(0);
        assert_eq!(slots.free(), 2);
        assert_eq!(slots.take(), Some(0));
        assert_eq!(slots.take(), Some(2));
        assert_eq!(slots.take(), None);
    }
}
