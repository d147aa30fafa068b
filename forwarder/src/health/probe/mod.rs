//! One health check as a state machine: the driver connects, tells the
//! probe, sends what it returns, and feeds it every read until it returns
//! an [`Outcome`]. The three kinds: TCP (a completed connect passes), HTTP
//! (a GET must answer the expected status) and WebSocket (upgrade, ping,
//! pong, close: a backend that accepts TCP but cannot upgrade fails).

mod http;
mod websocket;

use weir_ebpf::abi::HealthReason;

/// What a check does once connected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    Tcp,
    Http {
        path: String,
        /// The Host header; the address connected to when `None`.
        host: Option<String>,
        expect_status: u16,
    },
    WebSocket {
        path: String,
        host: Option<String>,
    },
}

impl Check {
    /// The name configurations and metrics use.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Http { .. } => "http",
            Self::WebSocket { .. } => "websocket",
        }
    }
}

/// How a check ended: `Passed`, or why not, with the HTTP status or errno
/// that says more (0 when nothing does).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub reason: HealthReason,
    pub detail: u16,
}

impl Outcome {
    pub const PASSED: Self = Self::new(HealthReason::Passed, 0);

    pub const fn new(reason: HealthReason, detail: u16) -> Self {
        Self { reason, detail }
    }

    pub fn passed(&self) -> bool {
        self.reason == HealthReason::Passed
    }

    /// A connect that failed with `errno`: refused (or reset while
    /// connecting), or the network said there is no way there.
    pub fn connect_failed(errno: i32) -> Self {
        let reason = match errno {
            libc::ECONNREFUSED | libc::ECONNRESET => HealthReason::Refused,
            libc::ETIMEDOUT => HealthReason::ConnectTimeout,
            _ => HealthReason::Unreachable,
        };
        Self::new(reason, u16::try_from(errno).unwrap_or(u16::MAX))
    }
}

/// What the driver does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Write these bytes, then keep reading.
    Send(Vec<u8>),
    /// Keep reading.
    Wait,
    /// The check is over: close the connection.
    Done(Outcome),
}

/// Random bytes a probe draws from: the WebSocket key, the ping payload and
/// the masks, which RFC 6455 wants unpredictable.
pub type Seed = [u8; 32];

/// One check in progress.
#[derive(Debug)]
pub struct Probe {
    state: State,
}

#[derive(Debug)]
enum State {
    Connecting(Pending),
    Http(http::Exchange),
    WebSocket(websocket::Exchange),
    Done(Outcome),
}

/// What a probe keeps until its connection is up.
#[derive(Debug)]
struct Pending {
    check: Check,
    host: String,
    seed: Seed,
}

impl Probe {
    /// A probe of `check`; `addr` is the address it connects to (the Host
    /// header unless the check names one).
    pub fn new(check: &Check, addr: &str, seed: Seed) -> Self {
        Self {
            state: State::Connecting(Pending {
                check: check.clone(),
                host: addr.to_string(),
                seed,
            }),
        }
    }

    /// The connection is up: a TCP check has passed, the others send their
    /// request.
    pub fn connected(&mut self) -> Step {
        let State::Connecting(p) = &self.state else {
            return self.unexpected();
        };
        let (next, step) = match &p.check {
            Check::Tcp => (State::Done(Outcome::PASSED), Step::Done(Outcome::PASSED)),
            Check::Http {
                path,
                host,
                expect_status,
            } => {
                let host = host.as_deref().unwrap_or(&p.host);
                let (exchange, request) = http::Exchange::start(path, host, *expect_status);
                (State::Http(exchange), Step::Send(request))
            }
            Check::WebSocket { path, host } => {
                let host = host.as_deref().unwrap_or(&p.host);
                let (exchange, request) = websocket::Exchange::start(path, host, &p.seed);
                (State::WebSocket(exchange), Step::Send(request))
            }
        };
        self.state = next;
        step
    }

    /// Bytes read from the connection.
    pub fn received(&mut self, bytes: &[u8]) -> Step {
        let step = match &mut self.state {
            State::Http(x) => x.received(bytes),
            State::WebSocket(x) => x.received(bytes),
            State::Connecting(_) | State::Done(_) => return self.unexpected(),
        };
        if let Step::Done(outcome) = step {
            self.state = State::Done(outcome);
        }
        step
    }

    /// The backend ended the connection (EOF or reset) before the check
    /// was over.
    pub fn closed(&mut self) -> Outcome {
        let outcome = match self.state {
            State::Done(outcome) => outcome,
            _ => Outcome::new(HealthReason::Reset, 0),
        };
        self.state = State::Done(outcome);
        outcome
    }

    /// The check's time ran out: why, by how far it got.
    pub fn timed_out(&mut self) -> Outcome {
        let outcome = match &self.state {
            State::Done(outcome) => *outcome,
            State::Connecting(_) => Outcome::new(HealthReason::ConnectTimeout, 0),
            State::WebSocket(x) if x.awaiting_pong() => Outcome::new(HealthReason::NoPong, 0),
            State::Http(_) | State::WebSocket(_) => Outcome::new(HealthReason::Timeout, 0),
        };
        self.state = State::Done(outcome);
        outcome
    }

    /// A call out of order (a driver bug): the check ends as a protocol
    /// failure rather than a panic in the agent.
    fn unexpected(&mut self) -> Step {
        let outcome = match self.state {
            State::Done(outcome) => outcome,
            _ => Outcome::new(HealthReason::BadFrame, 0),
        };
        self.state = State::Done(outcome);
        Step::Done(outcome)
    }
}

/// The longest response head a probe waits for; a longer one fails the
/// check as malformed rather than holding memory for a broken backend.
const MAX_HEAD: usize = 16 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tcp_check_passes_on_connect() {
        let mut p = Probe::new(&Check::Tcp, "198.18.0.1:80", [0; 32]);
        assert_eq!(p.connected(), Step::Done(Outcome::PASSED));
        assert_eq!(p.closed(), Outcome::PASSED, "the outcome stays");
    }

    #[test]
    fn connect_errors_map_to_reasons() {
        use HealthReason::*;
        for (errno, reason) in [
            (libc::ECONNREFUSED, Refused),
            (libc::ECONNRESET, Refused),
            (libc::ETIMEDOUT, ConnectTimeout),
            (libc::ENETUNREACH, Unreachable),
            (libc::EHOSTUNREACH, Unreachable),
        ] {
            assert_eq!(
                Outcome::connect_failed(errno),
                Outcome::new(reason, errno as u16),
                "{errno}"
            );
        }
    }

    #[test]
    fn timeouts_say_how_far_the_check_got() {
        let http = Check::Http {
            path: "/".into(),
            host: None,
            expect_status: 200,
        };
        let mut p = Probe::new(&http, "a:1", [0; 32]);
        assert_eq!(p.timed_out().reason, HealthReason::ConnectTimeout);
        let mut p = Probe::new(&http, "a:1", [0; 32]);
        p.connected();
        assert_eq!(p.timed_out().reason, HealthReason::Timeout);
    }

    #[test]
    fn calls_out_of_order_end_the_check_without_panicking() {
        let mut p = Probe::new(&Check::Tcp, "a:1", [0; 32]);
        assert!(matches!(p.received(b"x"), Step::Done(o) if !o.passed()));
        let mut p = Probe::new(&Check::Tcp, "a:1", [0; 32]);
        p.connected();
        assert_eq!(p.connected(), Step::Done(Outcome::PASSED));
        assert_eq!(p.received(b"late"), Step::Done(Outcome::PASSED));
    }
}
