//! WebSocket load client: N connections that each send a text message every
//! interval, check that the echo is identical, and finish with a close
//! handshake (1000). Used by the `weir-wsclient` binary; the report types are
//! what tests parse from its stdout.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{ArgAction, Parser};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;

use crate::ws_client::{
    self, CloseUntil, Closed, Dialer, Ending, Fleet, ReadyFile, Unupgraded, Ws, WsUrl, describe,
    millis, truncate,
};

/// What to run: also the command line of `weir-wsclient`, so a flag and
/// the setting it sets are declared once.
#[derive(Clone, Debug, Parser)]
#[command(name = "weir-wsclient", about = "WebSocket load client for weir tests")]
pub struct LoadConfig {
    #[command(flatten)]
    pub fleet: Fleet,
    /// Milliseconds between messages on a connection.
    #[arg(long = "interval-ms", default_value = "100", value_parser = millis)]
    pub interval: Duration,
    /// Milliseconds allowed for the close handshake.
    #[arg(long = "close-timeout-ms", default_value = "5000", value_parser = millis)]
    pub close_timeout: Duration,
    /// Padding bytes added to each message.
    #[arg(long, default_value_t = 0)]
    pub payload_bytes: usize,
    /// Print progress lines to stderr.
    #[arg(long = "quiet", action = ArgAction::SetFalse, help = "No progress lines on stderr")]
    pub progress: bool,
}

impl LoadConfig {
    /// The whole run ends by this long after start, whatever happens.
    pub fn hard_limit(&self) -> Duration {
        self.fleet.duration + Duration::from_secs(30)
    }
}

/// The outcome of one connection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ConnResult {
    pub index: usize,
    /// The `x-weir-backend` response header, if any.
    pub backend: Option<String>,
    /// The `x-weir-peer` response header: the client address the backend saw.
    pub peer_seen: Option<String>,
    /// Our local address of the TCP connection.
    pub local_addr: Option<String>,
    pub connected: bool,
    /// Milliseconds for TCP connect + handshake.
    pub connect_ms: Option<u64>,
    /// Wall-clock time (Unix ms) the peer's Close arrived, if it sent one:
    /// lets a test see how closes were spread over a drain window.
    pub peer_close_unix_ms: Option<u64>,
    pub sent: u64,
    pub echoed: u64,
    pub mismatches: u64,
    pub error: Option<String>,
    /// How the connection ended (`Ending::Error` until it is known).
    pub close: Ending,
}

impl ConnResult {
    /// Connected, but ended with an error, a mismatch or a close that was not
    /// our clean close handshake.
    pub fn is_broken(&self) -> bool {
        self.connected
            && (self.error.is_some() || self.mismatches > 0 || self.close != Ending::Clean)
    }
}

/// Totals over all connections.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Summary {
    pub connections: usize,
    pub connected: usize,
    pub failed: usize,
    pub broken: usize,
    pub messages_sent: u64,
    pub messages_echoed: u64,
    pub mismatches: u64,
    /// Connections per `x-weir-backend` value (`?` when the header is absent).
    pub per_backend: BTreeMap<String, usize>,
    /// Connections per close outcome.
    pub closes: BTreeMap<String, usize>,
    pub elapsed_ms: u64,
}

/// The JSON document `weir-wsclient` prints.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoadReport {
    pub connections: Vec<ConnResult>,
    pub summary: Summary,
}

impl LoadReport {
    /// Parses the report from `weir-wsclient`'s stdout.
    pub fn from_json(s: &str) -> Result<LoadReport> {
        serde_json::from_str(s.trim()).context("parsing weir-wsclient report")
    }

    /// Builds a report (with its summary) from per-connection results.
    pub fn from_results(mut connections: Vec<ConnResult>, elapsed: Duration) -> LoadReport {
        connections.sort_by_key(|c| c.index);
        let mut s = Summary {
            connections: connections.len(),
            elapsed_ms: elapsed.as_millis() as u64,
            ..Summary::default()
        };
        for c in &connections {
            if c.connected {
                s.connected += 1;
                let b = c.backend.clone().unwrap_or_else(|| "?".into());
                *s.per_backend.entry(b).or_default() += 1;
            } else {
                s.failed += 1;
            }
            if c.is_broken() {
                s.broken += 1;
            }
            s.messages_sent += c.sent;
            s.messages_echoed += c.echoed;
            s.mismatches += c.mismatches;
            *s.closes.entry(c.close.to_string()).or_default() += 1;
        }
        LoadReport {
            connections,
            summary: s,
        }
    }
}

/// The text of message `seq` on connection `index`.
pub fn message_text(index: usize, seq: u64, pad: usize) -> String {
    let mut s = format!("c{index} s{seq} ");
    s.extend(std::iter::repeat_n('x', pad));
    s
}

struct Shared {
    connected: AtomicUsize,
    failed: AtomicUsize,
    echoed: AtomicU64,
    ready: ReadyFile,
}

impl Shared {
    fn attempt_done(&self) {
        self.ready.attempt_done(|| {
            format!(
                "connected {} failed {}\n",
                self.connected.load(Ordering::Acquire),
                self.failed.load(Ordering::Acquire)
            )
        });
    }
}

/// Runs the load and returns the report. Always finishes within
/// [`LoadConfig::hard_limit`] (plus a moment to collect).
pub async fn run(cfg: LoadConfig) -> Result<LoadReport> {
    let start = Instant::now();
    let hard_deadline = start + cfg.hard_limit();
    if cfg.fleet.connections == 0 {
        return Ok(LoadReport::from_results(Vec::new(), Duration::ZERO));
    }
    let url: WsUrl = cfg.fleet.url.parse()?;
    let target = url.resolve(cfg.fleet.sources.first().copied()).await?;

    let shared = Arc::new(Shared {
        connected: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        echoed: AtomicU64::new(0),
        ready: ReadyFile::new(cfg.fleet.ready_file.clone(), cfg.fleet.connections),
    });
    // Talking ends for everyone by here, leaving time for close handshakes.
    let talk_cap = start + cfg.fleet.duration + Duration::from_secs(20);
    let (stop_rx, watcher) = ws_client::stop_signal(cfg.fleet.hold_file.clone(), talk_cap);

    let progress = cfg.progress.then(|| {
        let shared = shared.clone();
        let total = cfg.fleet.connections;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            let mut last = (usize::MAX, usize::MAX, u64::MAX);
            while Instant::now() < hard_deadline {
                tick.tick().await;
                let now = (
                    shared.connected.load(Ordering::Relaxed),
                    shared.failed.load(Ordering::Relaxed),
                    shared.echoed.load(Ordering::Relaxed),
                );
                if now != last {
                    eprintln!(
                        "wsclient: connected {}/{total} failed {} echoed {}",
                        now.0, now.1, now.2
                    );
                    last = now;
                }
            }
        })
    });

    let sem = Arc::new(Semaphore::new(cfg.fleet.connect_concurrency.max(1)));
    let dialer = Arc::new(Dialer {
        target,
        uri: url.uri,
        timeout: cfg.fleet.connect_timeout,
        read_buffer: 8 * 1024,
    });
    let cfg = Arc::new(cfg);
    let mut states = Vec::with_capacity(cfg.fleet.connections);
    let mut tasks = Vec::with_capacity(cfg.fleet.connections);
    for index in 0..cfg.fleet.connections {
        let state = Arc::new(Mutex::new(ConnState {
            result: ConnResult {
                index,
                ..ConnResult::default()
            },
            finished: false,
        }));
        states.push(state.clone());
        let source = (!cfg.fleet.sources.is_empty())
            .then(|| cfg.fleet.sources[index % cfg.fleet.sources.len()]);
        let conn = Conn {
            index,
            cfg: cfg.clone(),
            dialer: dialer.clone(),
            source,
            sem: sem.clone(),
            stop: stop_rx.clone(),
            state,
            shared: shared.clone(),
            talk_cap,
        };
        tasks.push(tokio::spawn(conn.run()));
    }

    for task in &mut tasks {
        // Bounded: each task ends on its own well before the hard deadline.
        let _ = tokio::time::timeout_at(hard_deadline, task).await;
    }
    for task in &tasks {
        task.abort();
    }
    watcher.abort();
    if let Some(p) = progress {
        p.abort();
    }
    let results = states
        .iter()
        .map(|s| {
            let mut st = s.lock().unwrap_or_else(|e| e.into_inner());
            if !st.finished {
                if st.result.error.is_none() {
                    st.result.error = Some("hard deadline reached".into());
                }
                // One that never connected failed its handshake; one that
                // did was cut.
                st.result.close = if st.result.connected {
                    Ending::Timeout
                } else {
                    Ending::Unupgraded(Unupgraded::Timeout)
                };
            }
            st.result.clone()
        })
        .collect();
    Ok(LoadReport::from_results(results, start.elapsed()))
}

struct ConnState {
    result: ConnResult,
    finished: bool,
}

struct Conn {
    index: usize,
    cfg: Arc<LoadConfig>,
    dialer: Arc<Dialer>,
    source: Option<IpAddr>,
    sem: Arc<Semaphore>,
    stop: watch::Receiver<bool>,
    state: Arc<Mutex<ConnState>>,
    shared: Arc<Shared>,
    talk_cap: Instant,
}

/// How a connection's talk phase ended.
enum TalkEnd {
    /// Time (or hold file) to close: do our close handshake.
    Done,
    /// The connection is over; close outcome and error already recorded.
    Over,
}

impl Conn {
    fn with<R>(&self, f: impl FnOnce(&mut ConnResult) -> R) -> R {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut st.result)
    }

    fn fail(&self, ending: Ending, err: String) {
        self.with(|r| {
            r.close = ending;
            if r.error.is_none() {
                r.error = Some(err);
            }
        });
    }

    async fn run(self) {
        let ws = self.connect_phase().await;
        self.shared.attempt_done();
        if let Some(mut ws) = ws {
            match self.talk(&mut ws).await {
                TalkEnd::Done => self.close_phase(&mut ws).await,
                TalkEnd::Over => {}
            }
        }
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .finished = true;
    }

    async fn connect_phase(&self) -> Option<Ws> {
        let Ok(_permit) = self.sem.acquire().await else {
            self.fail(
                Ending::Unupgraded(Unupgraded::Io),
                "connect: semaphore closed".into(),
            );
            return None;
        };
        let t0 = Instant::now();
        match self.dialer.dial(self.source).await {
            Ok(c) => {
                self.with(|r| {
                    r.connected = true;
                    r.connect_ms = Some(t0.elapsed().as_millis() as u64);
                    r.local_addr = Some(c.local.to_string());
                    r.backend = c.backend;
                    r.peer_seen = c.peer_seen;
                    r.close = Ending::Error; // until it ends some other way
                });
                self.shared.connected.fetch_add(1, Ordering::Relaxed);
                Some(c.ws)
            }
            Err(e) => {
                self.shared.failed.fetch_add(1, Ordering::Relaxed);
                self.fail(e.ending(), format!("connect: {e}"));
                None
            }
        }
    }

    async fn talk(&self, ws: &mut Ws) -> TalkEnd {
        let cfg = &self.cfg;
        let talk_deadline = (Instant::now() + cfg.fleet.duration).min(self.talk_cap);
        let mut stop = self.stop.clone();
        let mut stopped = *stop.borrow();
        let mut watching = true;
        let mut ticker = tokio::time::interval(cfg.interval.max(Duration::from_millis(1)));
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut seq: u64 = 0;
        // The text we wait to see echoed, and when to give up on it.
        let mut outstanding: Option<(String, Instant)> = None;
        // Far-future stand-in for "no echo deadline".
        let never = self.talk_cap + Duration::from_secs(3600);
        loop {
            if outstanding.is_none() && (stopped || Instant::now() >= talk_deadline) {
                return TalkEnd::Done;
            }
            let echo_deadline = outstanding.as_ref().map_or(never, |(_, d)| *d);
            tokio::select! {
                biased;
                msg = ws.next() => match msg {
                    Some(Ok(Message::Text(t))) => {
                        match outstanding.take() {
                            Some((want, _)) if want.as_str() == t.as_str() => {
                                self.with(|r| r.echoed += 1);
                                self.shared.echoed.fetch_add(1, Ordering::Relaxed);
                            }
                            Some((want, _)) => self.with(|r| {
                                r.mismatches += 1;
                                if r.error.is_none() {
                                    r.error = Some(format!(
                                        "mismatch: sent {:?}, got {:?}",
                                        truncate(&want, 64),
                                        truncate(t.as_str(), 64)
                                    ));
                                }
                            }),
                            None => self.with(|r| {
                                r.mismatches += 1;
                                if r.error.is_none() {
                                    r.error = Some(format!(
                                        "unexpected message {:?}",
                                        truncate(t.as_str(), 64)
                                    ));
                                }
                            }),
                        }
                    }
                    Some(Ok(Message::Binary(b))) => self.with(|r| {
                        r.mismatches += 1;
                        if r.error.is_none() {
                            r.error = Some(format!("unexpected binary message of {} bytes", b.len()));
                        }
                        outstanding = None;
                    }),
                    Some(Ok(Message::Close(frame))) => {
                        let now = ws_client::unix_ms();
                        self.with(|r| {
                            r.close = Ending::peer_close(frame.as_ref());
                            r.peer_close_unix_ms = Some(now);
                            if outstanding.is_some() && r.error.is_none() {
                                r.error = Some("peer closed with a message unanswered".into());
                            }
                        });
                        // tungstenite queued our Close reply; drive it out and
                        // wait for the server to end the TCP connection.
                        let _ = tokio::time::timeout(cfg.close_timeout, async {
                            for _ in 0..1000 {
                                match ws.next().await {
                                    Some(Ok(_)) => continue,
                                    _ => break,
                                }
                            }
                        })
                        .await;
                        return TalkEnd::Over;
                    }
                    Some(Ok(_)) => {} // ping (answered by tungstenite), pong, raw frame
                    Some(Err(e)) => {
                        self.fail(Ending::of_error(&e), format!("read: {}", describe(&e)));
                        return TalkEnd::Over;
                    }
                    None => {
                        self.fail(Ending::Eof, "connection ended without close".into());
                        return TalkEnd::Over;
                    }
                },
                res = stop.changed(), if !stopped && watching => {
                    match res {
                        Ok(()) => stopped = *stop.borrow(),
                        // The signal's task is gone (it sends `true` before it
                        // ends): the talk deadline ends talking.
                        Err(_) => watching = false,
                    }
                }
                _ = tokio::time::sleep_until(echo_deadline), if outstanding.is_some() => {
                    self.fail(Ending::Timeout, format!("no echo within {:?}", cfg.fleet.echo_timeout));
                    return TalkEnd::Over;
                }
                _ = tokio::time::sleep_until(talk_deadline), if outstanding.is_none() => {
                    return TalkEnd::Done;
                }
                _ = ticker.tick(), if outstanding.is_none() && !stopped => {
                    let text = message_text(self.index, seq, cfg.payload_bytes);
                    seq += 1;
                    let sent = tokio::time::timeout(cfg.fleet.echo_timeout, ws.send(Message::text(text.clone()))).await;
                    match sent {
                        Ok(Ok(())) => {
                            self.with(|r| r.sent += 1);
                            outstanding = Some((text, Instant::now() + cfg.fleet.echo_timeout));
                        }
                        Ok(Err(e)) => {
                            self.fail(Ending::of_error(&e), format!("send: {}", describe(&e)));
                            return TalkEnd::Over;
                        }
                        Err(_) => {
                            self.fail(Ending::Timeout, "send timed out".into());
                            return TalkEnd::Over;
                        }
                    }
                }
            }
        }
    }

    async fn close_phase(&self, ws: &mut Ws) {
        match ws_client::close_handshake(ws, self.cfg.close_timeout, CloseUntil::End).await {
            Ok(Closed::Answered) => self.with(|r| r.close = Ending::Clean),
            Ok(Closed::Unanswered) => self.fail(Ending::Eof, "closed without a Close reply".into()),
            Err((ending, err)) => self.fail(ending, err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::{self, http};

    #[test]
    fn message_text_has_index_and_seq() {
        assert_eq!(message_text(3, 7, 2), "c3 s7 xx");
    }

    #[test]
    fn summary_counts() {
        let ok = ConnResult {
            index: 1,
            backend: Some("b1".into()),
            connected: true,
            sent: 5,
            echoed: 5,
            close: Ending::Clean,
            ..ConnResult::default()
        };
        let drained = ConnResult {
            index: 0,
            backend: Some("b2".into()),
            connected: true,
            sent: 3,
            echoed: 3,
            close: Ending::PeerClose(1001),
            ..ConnResult::default()
        };
        let failed = ConnResult {
            index: 2,
            error: Some("connect: refused".into()),
            close: Ending::Unupgraded(Unupgraded::Connect),
            ..ConnResult::default()
        };
        let r = LoadReport::from_results(vec![ok, drained, failed], Duration::from_millis(5));
        assert_eq!(r.connections[0].index, 0);
        let s = &r.summary;
        assert_eq!((s.connected, s.failed, s.broken), (2, 1, 1));
        assert_eq!((s.messages_sent, s.messages_echoed), (8, 8));
        assert_eq!(s.per_backend.get("b1"), Some(&1));
        assert_eq!(s.per_backend.get("b2"), Some(&1));
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(LoadReport::from_json(&json).unwrap(), r);
    }

    /// Loopback end-to-end against a minimal in-process echo server.
    #[tokio::test]
    // The handshake callback's error type is fixed by tungstenite.
    #[allow(clippy::result_large_err)]
    async fn loopback_round_trip() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            for _ in 0..3 {
                let (s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let cb = |_: &tungstenite::handshake::server::Request,
                              mut resp: tungstenite::handshake::server::Response| {
                        resp.headers_mut()
                            .insert(ws_client::BACKEND_HEADER, http::HeaderValue::from_static("t0"));
                        Ok(resp)
                    };
                    let mut ws = tokio_tungstenite::accept_hdr_async(s, cb).await.unwrap();
                    while let Some(Ok(m)) = ws.next().await {
                        if m.is_text() || m.is_binary() {
                            let _ = ws.send(m).await;
                        }
                    }
                });
            }
        });
        let mut cfg = LoadConfig::parse_from([
            "weir-wsclient",
            "--url",
            &format!("ws://{addr}/"),
            "--connections=3",
            "--interval-ms=20",
            "--source=127.0.0.1",
            "--quiet",
        ]);
        cfg.fleet.duration = Duration::from_millis(300);
        let r = run(cfg).await.unwrap();
        server.abort();
        assert_eq!(r.summary.connected, 3, "{r:?}");
        assert_eq!(r.summary.broken, 0, "{r:?}");
        assert_eq!(r.summary.per_backend.get("t0"), Some(&3));
        assert!(r.summary.messages_echoed > 0);
        assert_eq!(r.summary.messages_echoed, r.summary.messages_sent);
    }
}
