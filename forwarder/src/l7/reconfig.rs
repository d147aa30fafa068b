//! How a reloaded configuration reaches the workers: the daemon publishes
//! it, each worker picks it up between completions (one atomic load per
//! turn of its loop while nothing is new) and acknowledges the generation
//! it runs, and the daemon confirms a reload only once every worker has.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::config::Config;

/// One reload as one worker takes it.
pub struct Update {
    pub generation: u64,
    pub config: Arc<Config>,
    /// This worker's sockets of the listeners the reload adds, by their
    /// configured address.
    pub added: Vec<(SocketAddr, OwnedFd)>,
}

/// The reloads published to a process's workers.
pub struct Reconfig {
    /// The latest generation published; 0 is the configuration at start.
    published: AtomicU64,
    /// Per worker, what it has not taken yet, oldest first: a worker that
    /// lags a reload behind still gets every listener socket meant for it.
    pending: Box<[Mutex<Vec<Update>>]>,
    /// Per worker, the generation it runs.
    applied: Box<[AtomicU64]>,
}

impl Reconfig {
    pub fn new(workers: usize) -> Self {
        Self {
            published: AtomicU64::new(0),
            pending: (0..workers).map(|_| Mutex::new(Vec::new())).collect(),
            applied: (0..workers).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The latest generation published: a worker compares it with the one
    /// it runs once per turn.
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Acquire)
    }

    /// Publishes `config` with, per worker, the sockets of the listeners
    /// it adds; returns its generation.
    pub fn publish(&self, config: Config, added: Vec<Vec<(SocketAddr, OwnedFd)>>) -> u64 {
        let generation = self.published.load(Ordering::Relaxed) + 1;
        let config = Arc::new(config);
        for (pending, added) in self.pending.iter().zip(added) {
            lock(pending).push(Update {
                generation,
                config: config.clone(),
                added,
            });
        }
        self.published.store(generation, Ordering::Release);
        generation
    }

    /// What worker `worker` has not applied yet, oldest first.
    pub fn take(&self, worker: usize) -> Vec<Update> {
        std::mem::take(&mut *lock(&self.pending[worker]))
    }

    /// Worker `worker` runs `generation` now.
    pub fn applied(&self, worker: usize, generation: u64) {
        self.applied[worker].store(generation, Ordering::Release);
    }

    /// Waits until every worker runs `generation`, at most `within`;
    /// otherwise returns the workers that do not.
    pub fn wait_applied(&self, generation: u64, within: Duration) -> Result<(), Vec<usize>> {
        let deadline = Instant::now() + within;
        loop {
            let lagging: Vec<usize> = (0..self.applied.len())
                .filter(|w| self.applied[*w].load(Ordering::Acquire) < generation)
                .collect();
            if lagging.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(lagging);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::l7::config::{DEFAULT, parse};

    /// A worker that missed a reload takes both, in order, and the
    /// daemon's wait names the workers that lag.
    #[test]
    fn every_worker_takes_every_reload_in_order_and_is_waited_for() {
        let r = Reconfig::new(2);
        let config = parse(DEFAULT, "default").unwrap();
        let socket = || OwnedFd::from(std::net::TcpListener::bind("127.0.0.1:0").unwrap());
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let one = r.publish(config.clone(), vec![vec![(addr, socket())], vec![]]);
        let two = r.publish(config, vec![vec![], vec![(addr, socket())]]);
        assert_eq!((one, two, r.published()), (1, 2, 2));
        let taken = r.take(0);
        assert_eq!(
            taken
                .iter()
                .map(|u| (u.generation, u.added.len()))
                .collect::<Vec<_>>(),
            [(1, 1), (2, 0)]
        );
        assert!(r.take(0).is_empty(), "taken once");
        r.applied(0, 2);
        assert_eq!(r.wait_applied(2, Duration::from_millis(20)), Err(vec![1]));
        assert_eq!(r.take(1).len(), 2);
        r.applied(1, 2);
        assert_eq!(r.wait_applied(2, Duration::from_millis(20)), Ok(()));
    }
}
