//! Active health checking as pure code: no sockets, no clock, no
//! randomness of its own. `weir agent` ([`crate::daemon::agent`]) feeds it
//! the time, the bytes its sockets read and random bytes, and sends what it
//! returns; every decision is here, where a unit test or a fuzzer reaches it.
//!
//! - [`schedule`]: when each backend is checked next (interval, jitter, the
//!   first checks spread over one interval);
//! - [`counter`]: rise and fall, so one lost check does not move a backend;
//! - [`probe`]: one check (TCP, HTTP or WebSocket) as a state machine fed
//!   with bytes, ending in an [`probe::Outcome`].

pub mod counter;
pub mod probe;
pub mod schedule;
