//! Which backend a connection goes to, and what a failed connect means.
//!
//! A connection tries up to [`MAX_ATTEMPTS`] backends, each another one,
//! before anything went upstream. What the client gets when none is left
//! depends on how the attempts failed: 503 when there was nothing to try,
//! 504 when the last attempt took too long, 502 when it was refused.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use super::ejections::Ejections;
use super::handshake::{Reject, reject};
use super::outlier::Subject;
use super::view::RegistryView;
use crate::registry::ServiceAddr;

/// Connect attempts per connection (each on another backend).
pub const MAX_ATTEMPTS: usize = 3;

const NO_SERVICE: Reject = reject(503, "no such L7 service in the registry");
const NO_BACKEND: Reject = reject(503, "no healthy backend");
const TIMED_OUT: Reject = reject(504, "backend did not answer in time");
const REFUSED: Reject = reject(502, "backend refused the connection");

/// The connect attempts of one connection.
#[derive(Debug, Default)]
pub struct Attempts {
    /// Backends tried so far.
    tried: Vec<u32>,
    /// The last attempt was cut for taking too long.
    timed_out: bool,
}

impl Attempts {
    #[cfg(test)]
    pub fn tried(&self) -> &[u32] {
        &self.tried
    }

    /// An attempt on backend `id` starts.
    pub fn start(&mut self, id: u32) {
        self.timed_out = false;
        self.tried.push(id);
    }

    /// The attempt in flight is being cut for taking too long.
    pub fn time_out(&mut self) {
        self.timed_out = true;
    }

    /// Whether the attempt that failed last timed out (rather than being
    /// refused).
    pub fn timed_out(&self) -> bool {
        self.timed_out
    }

    /// What the client gets when no further backend can be tried.
    pub fn exhausted(&self) -> Reject {
        match (self.tried.is_empty(), self.timed_out) {
            (true, _) => NO_BACKEND,
            (false, true) => TIMED_OUT,
            (false, false) => REFUSED,
        }
    }
}

/// The worker's side of backend choice: the registry view, how many
/// connections this worker holds per backend (which least-connections
/// picks weigh, and which keep a removed backend in the registry), and the
/// process's outlier table (whose ejected backends picks pass over).
pub struct Upstream {
    view: RegistryView,
    live: HashMap<u32, u32>,
    outliers: Arc<Ejections>,
}

impl Upstream {
    pub fn new(view: RegistryView, outliers: Arc<Ejections>) -> Self {
        Self {
            view,
            live: HashMap::new(),
            outliers,
        }
    }

    pub fn outliers(&self) -> &Ejections {
        &self.outliers
    }

    pub fn view(&self) -> &RegistryView {
        &self.view
    }

    pub fn view_mut(&mut self) -> &mut RegistryView {
        &mut self.view
    }

    /// The next backend to try for `service` at `now`, or the refusal when
    /// there is none. `random` seeds the pick (Maglev/hash as the view does
    /// it).
    pub fn pick(
        &self,
        service: &ServiceAddr,
        attempts: &Attempts,
        random: [u32; 2],
        now: Instant,
    ) -> Result<(u32, SocketAddr), Reject> {
        if !self.view.has_service(service) {
            return Err(NO_SERVICE);
        }
        if attempts.tried.len() >= MAX_ATTEMPTS {
            return Err(attempts.exhausted());
        }
        let (live, outliers) = (&self.live, &self.outliers);
        self.view
            .pick(
                service,
                random,
                &attempts.tried,
                |id| live.get(&id).copied().unwrap_or(0),
                |id| outliers.is_ejected(id, now),
            )
            .ok_or_else(|| attempts.exhausted())
    }

    /// A connection to backend `id` of `service` failed at `now` (its
    /// connect, or its upgrade): outlier detection counts it.
    pub fn failed(&self, service: ServiceAddr, id: u32, addr: SocketAddr, now: Instant) {
        let active = self.view.active_backends(&service);
        let subject = Subject {
            id,
            addr,
            service,
            active,
        };
        self.outliers.failed(subject, now);
    }

    /// Backend `id` upgraded a connection: its run of failures is over.
    pub fn succeeded(&self, id: u32) {
        self.outliers.succeeded(id);
    }

    /// A connection uses backend `id` from the pick on: a backend being
    /// connected to is in use (the registry must not free it meanwhile).
    pub fn hold(&mut self, id: u32) {
        *self.live.entry(id).or_insert(0) += 1;
        self.view.add_l7_connections(id, 1);
    }

    /// A connection let go of backend `id`.
    pub fn release(&mut self, id: u32) {
        if let Some(n) = self.live.get_mut(&id) {
            *n = n.saturating_sub(1);
        }
        self.view.add_l7_connections(id, -1);
    }
}

/// xorshift64 from a seed of the kernel's: backend picks and the masks of
/// frames weir sends to backends (which RFC 6455 5.3 wants unpredictable)
/// differ per worker and per run.
pub struct Rng(u64);

impl Rng {
    pub fn from_os() -> io::Result<Self> {
        os_random_seed().map(Self)
    }

    pub fn next_u32(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 16) as u32
    }
}

/// A seed from the kernel's random pool (getrandom(2)), per worker. Never
/// 0, which xorshift could not leave.
fn os_random_seed() -> io::Result<u64> {
    let mut seed = [0u8; 8];
    let mut got = 0;
    while got < seed.len() {
        // SAFETY: getrandom writes at most the given length into our buffer.
        let n = unsafe { libc::getrandom(seed[got..].as_mut_ptr().cast(), seed.len() - got, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(io::Error::new(e.kind(), format!("getrandom: {e}")));
        }
        got += n as usize;
    }
    Ok(u64::from_ne_bytes(seed) | 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each worker seeds from the kernel: seeds differ between calls (so
    /// between workers), and none is 0.
    #[test]
    fn workers_get_seeds_of_their_own() {
        let seeds: std::collections::BTreeSet<u64> = (0..64)
            .map(|_| os_random_seed().expect("getrandom"))
            .collect();
        assert_eq!(seeds.len(), 64);
        assert!(!seeds.contains(&0));
    }

    #[test]
    fn the_refusal_says_how_the_attempts_failed() {
        let mut a = Attempts::default();
        assert_eq!(a.exhausted().status, 503, "nothing to try");
        a.start(4);
        assert_eq!(a.exhausted().status, 502, "refused");
        a.time_out();
        assert!(a.timed_out());
        assert_eq!(a.exhausted().status, 504, "timed out");
        a.start(9);
        assert!(!a.timed_out(), "a new attempt starts afresh");
        assert_eq!(a.exhausted().status, 502);
        assert_eq!(a.tried(), [4, 9]);
    }
}
