//! The reconnect storm of the `storm` scenario: every idle long-lived
//! connection of every generator process is dropped at one instant and
//! dialled again at once, as a fleet of clients does after a network blip.
//!
//! The instant is a Unix time the harness writes into a file every process
//! watches, so the processes drop together however far apart they were
//! started. A connection is dropped by aborting it (SO_LINGER 0, then
//! close: the proxy gets a reset), which is repeatable and tells the proxy
//! at once: it tears down the old connections while the new ones arrive,
//! the worst case, and the same for every system. The reconnect is not
//! paced (no connect concurrency limit) and a failed attempt is retried at
//! once, without backoff, until the connection is back (upgraded and one
//! echo answered) or `give_up` has passed.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;
use weir_testbed::ws_client::{Ending, Ws};

use super::{Shared, connect, echo_once, next_data, unix_us};
use crate::results::Endings;

/// A storm as the harness asks for it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StormPlan {
    /// Appears holding the instant of the drop, Unix ms.
    pub signal_file: PathBuf,
    /// Written once every dropped connection is back or was given up.
    pub done_file: PathBuf,
    /// How long a dropped connection keeps trying to come back.
    pub give_up: Duration,
}

/// What a storm did to one process' connections (or several, merged).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StormResult {
    /// Connections open at the instant, and so dropped.
    pub dropped: u64,
    /// When each came back (upgraded, one echo answered), µs after the
    /// instant, sorted.
    pub back_us: Vec<u64>,
    /// Failed attempts to come back, by ending: `handshake:STATUS` (the
    /// proxy answered but did not upgrade), `handshake:connect` (TCP
    /// connect refused), `handshake:timeout` (no 101 in time),
    /// `handshake:io` (reset or closed during the handshake), and `reset`,
    /// `eof`, `timeout` or `error` for the echo after the upgrade.
    pub failures: Endings,
    /// Connections that were not back when `give_up` passed.
    pub gave_up: u64,
}

impl StormResult {
    pub fn merge(parts: &[&StormResult]) -> StormResult {
        let mut out = StormResult::default();
        for p in parts {
            out.dropped += p.dropped;
            out.gave_up += p.gave_up;
            out.back_us.extend_from_slice(&p.back_us);
            for (k, v) in &p.failures {
                *out.failures.entry(k.clone()).or_default() += v;
            }
        }
        out.back_us.sort_unstable();
        out
    }
}

/// A process' side of the storm, shared by its connection tasks.
pub(super) struct StormState {
    plan: StormPlan,
    /// Turns true at the instant.
    now: watch::Receiver<bool>,
    /// The instant, Unix µs, once known.
    at_us: AtomicU64,
    /// Connections open at the instant: the done file waits for as many.
    dropped: AtomicUsize,
    settled: AtomicUsize,
    gave_up: AtomicU64,
    back_us: Mutex<Vec<u64>>,
    failures: Mutex<Endings>,
}

/// How a connection went through the storm.
pub(super) enum Ride {
    /// The run ended before any storm: the connection is as it was.
    Calm(Ws),
    /// Back after the drop: the new connection, its backend and the Unix µs
    /// its successful dial began.
    Back(Ws, Option<String>, u64),
    /// The connection ended by itself before the instant.
    Ended(Ending),
    /// Dropped and not back by `give_up`.
    GaveUp,
}

impl StormState {
    pub(super) fn new(plan: StormPlan) -> (StormState, watch::Sender<bool>) {
        let (tx, now) = watch::channel(false);
        let state = StormState {
            plan,
            now,
            at_us: AtomicU64::new(0),
            dropped: AtomicUsize::new(0),
            settled: AtomicUsize::new(0),
            gave_up: AtomicU64::new(0),
            back_us: Mutex::new(Vec::new()),
            failures: Mutex::new(Endings::new()),
        };
        (state, tx)
    }

    /// Waits for the signal file, then for the instant it names, and lets
    /// every connection go; returns early if the run stops first.
    pub(super) async fn signal(
        &self,
        tx: watch::Sender<bool>,
        open: &AtomicU64,
        mut stop: watch::Receiver<bool>,
    ) {
        let at_ms = loop {
            if let Ok(text) = tokio::fs::read_to_string(&self.plan.signal_file).await
                && let Ok(ms) = text.trim().parse::<u64>()
            {
                break ms;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                _ = stop.wait_for(|v| *v) => return,
            }
        };
        let at_us = at_ms * 1000;
        let wait = Duration::from_micros(at_us.saturating_sub(unix_us()));
        tokio::time::sleep(wait).await;
        self.at_us.store(at_us, Ordering::Relaxed);
        let dropped = open.load(Ordering::Relaxed) as usize;
        self.dropped.store(dropped, Ordering::Relaxed);
        if dropped == 0 {
            self.write_done();
        }
        let _ = tx.send(true);
    }

    fn failed(&self, e: Ending) {
        let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        *f.entry(e.to_string()).or_default() += 1;
    }

    /// One dropped connection is back or given up; the last one writes the
    /// done file.
    fn settle(&self) {
        let settled = self.settled.fetch_add(1, Ordering::AcqRel) + 1;
        if settled == self.dropped.load(Ordering::Relaxed) {
            self.write_done();
        }
    }

    fn write_done(&self) {
        if let Err(e) = std::fs::write(&self.plan.done_file, b"done\n") {
            eprintln!(
                "cannot write storm done file {}: {e}",
                self.plan.done_file.display()
            );
        }
    }

    pub(super) fn result(&self) -> StormResult {
        let mut back_us = self
            .back_us
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        back_us.sort_unstable();
        StormResult {
            dropped: self.dropped.load(Ordering::Relaxed) as u64,
            back_us,
            failures: self
                .failures
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            gave_up: self.gave_up.load(Ordering::Relaxed),
        }
    }
}

/// Holds an open connection until the storm, drops it and brings it back.
pub(super) async fn ride(s: &Shared, storm: &StormState, index: usize, mut ws: Ws) -> Ride {
    let mut now = storm.now.clone();
    let mut stop = s.stop.clone();
    tokio::select! {
        _ = now.wait_for(|v| *v) => {}
        _ = stop.wait_for(|v| *v) => return Ride::Calm(ws),
        r = next_data(&mut ws) => return Ride::Ended(r.err().unwrap_or(Ending::Error)),
    }
    abort(ws);
    s.open.fetch_sub(1, Ordering::Relaxed);
    let give_up = Instant::now() + storm.plan.give_up;
    loop {
        let started = unix_us();
        let failure = match connect(s, index, Instant::now()).await {
            Ok((mut ws, backend)) => match echo_once(s, &mut ws, 0).await {
                Ok(true) => {
                    let at = storm.at_us.load(Ordering::Relaxed);
                    storm
                        .back_us
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(unix_us().saturating_sub(at));
                    s.open.fetch_add(1, Ordering::Relaxed);
                    storm.settle();
                    return Ride::Back(ws, backend, started);
                }
                // The echo came back wrong: the proxy mixed up connections.
                Ok(false) => Ending::Error,
                Err(e) => e,
            },
            Err(e) => e,
        };
        storm.failed(failure);
        if Instant::now() >= give_up || s.stopped() {
            storm.gave_up.fetch_add(1, Ordering::Relaxed);
            storm.settle();
            return Ride::GaveUp;
        }
    }
}

/// Closes with a reset instead of a FIN: SO_LINGER with a zero timeout.
fn abort(ws: Ws) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on the stream's own open fd with a properly sized
    // linger struct.
    unsafe {
        libc::setsockopt(
            ws.get_ref().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(ws);
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicU64;

    use futures_util::{SinkExt, StreamExt};
    use tokio::net::TcpListener;
    use tokio_tungstenite::tungstenite::{Error, Message};

    use super::*;
    use crate::load::{Plan, Talk, run, unix_ms};

    /// An echo server that counts the connections it accepted and the ones
    /// that ended with a reset.
    async fn echo_server() -> (std::net::SocketAddr, Arc<AtomicU64>, Arc<AtomicU64>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted, resets) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (a, r) = (accepted.clone(), resets.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::Relaxed);
                let r = r.clone();
                tokio::spawn(async move {
                    let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                        return;
                    };
                    while let Some(m) = ws.next().await {
                        match m {
                            Ok(m @ Message::Binary(_)) => {
                                if ws.send(m).await.is_err() {
                                    return;
                                }
                            }
                            Ok(_) => {}
                            Err(Error::Io(e))
                                if e.kind() == std::io::ErrorKind::ConnectionReset =>
                            {
                                r.fetch_add(1, Ordering::Relaxed);
                                return;
                            }
                            Err(_) => return,
                        }
                    }
                });
            }
        });
        (addr, accepted, resets)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_connection_is_reset_at_the_instant_and_comes_back() {
        let (addr, accepted, resets) = echo_server().await;
        let dir = std::env::temp_dir().join(format!("weir-storm-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |name: &str| dir.join(name);
        let mut plan = Plan {
            talk: Talk::Idle,
            ..Plan::default()
        };
        plan.fleet.url = format!("ws://{addr}/");
        plan.fleet.connections = 20;
        plan.fleet.duration = Duration::from_secs(30);
        plan.fleet.hold_file = Some(file("hold"));
        plan.fleet.ready_file = Some(file("ready"));
        plan.storm = Some(StormPlan {
            signal_file: file("at"),
            done_file: file("done"),
            give_up: Duration::from_secs(10),
        });
        let load = tokio::spawn(run(plan));
        let wait_for = |f: PathBuf| async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            while !f.exists() {
                assert!(Instant::now() < deadline, "{} never appeared", f.display());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        wait_for(file("ready")).await;
        assert_eq!(accepted.load(Ordering::Relaxed), 20);
        let at_ms = unix_ms() + 200;
        std::fs::write(file("at"), format!("{at_ms}\n")).unwrap();
        wait_for(file("done")).await;
        assert!(unix_ms() >= at_ms, "done before the instant");
        std::fs::write(file("hold"), b"done").unwrap();
        let r = load.await.unwrap().unwrap();
        let _ = std::fs::remove_dir_all(&dir);

        let storm = r.storm.expect("a storm result");
        assert_eq!(storm.dropped, 20);
        assert_eq!(storm.back_us.len(), 20);
        assert!(storm.back_us.windows(2).all(|w| w[0] <= w[1]));
        assert!(storm.failures.is_empty(), "{:?}", storm.failures);
        assert_eq!(storm.gave_up, 0);
        // The old connections ended with a reset, not a close; the new ones
        // answered the final ping.
        assert_eq!(resets.load(Ordering::Relaxed), 20);
        assert_eq!(accepted.load(Ordering::Relaxed), 40);
        assert_eq!(r.alive_at_end, 20);
        assert_eq!(r.handshakes_ok, 40);
    }
}
