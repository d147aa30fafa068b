//! The WebSocket load generator behind `weir-load`: one engine for every
//! scenario's traffic.
//!
//! - long-lived connections that talk in closed loop (send, wait for the
//!   echo, send again), in open loop (a fixed total rate, each message's
//!   latency measured from the time it was *scheduled*, so a stalled proxy
//!   cannot hide its stall: no coordinated omission; with checked
//!   messages, [`checked`], every echo is also checked for loss,
//!   duplication, reordering and corruption), take server push
//!   (the backend sends on a schedule, see [`weir_testbed::push`]), or
//!   stay idle;
//! - arrivals: new connections opened at a fixed rate, each doing a
//!   handshake, talking for a while (or one echo) and closing;
//! - reconnection of long-lived connections that were closed or cut, as a
//!   real client does after a 1001 or a reset;
//! - a reconnect storm: every idle connection dropped at one instant and
//!   dialled again at once (`storm`).
//!
//! Connections are dialled, closed and their endings classified by the
//! testbed's [`weir_testbed::ws_client`], as in the tests' client; the
//! endings are counted by name (see [`crate::results::Endings`]),
//! and a per-second timeline of opens, failures and cuts is kept. The harness
//! runs several generator processes (20,000 open files per process here)
//! and merges their [`LoadResult`]s.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;
use weir_testbed::push::{self, PushRequest};
use weir_testbed::ws_client::{
    self, CloseUntil, Dialer, Ending, Fleet, ReadyFile, Ws, WsUrl, close_handshake,
};

use crate::results::{Endings, Latency, TimelinePoint};

pub mod checked;
mod storm;

use checked::{Echo, Ledger, Tally};
use storm::{Ride, StormState};
pub use storm::{StormPlan, StormResult};

pub use weir_testbed::ws_client::ending_name as ending;
pub use weir_testbed::ws_client::unix_ms;

/// How long-lived connections talk.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Talk {
    /// Send, wait for the echo, send again.
    Closed,
    /// A fixed total rate (messages/s over all long-lived connections).
    Open(f64),
    /// Server push: once the plan's start file exists, each connection asks
    /// its backend for `seconds` of frames at its share of `rate` (frames/s
    /// over all long-lived connections) and records each frame's delivery
    /// latency from the time the backend was due to send it.
    Push { rate: f64, seconds: f64 },
    /// Nothing after the handshake; a ping at the end proves the
    /// connection is still alive.
    Idle,
    /// As `Open`, with checked messages ([`checked`]): every echo is
    /// checked against what its connection sent.
    Checked(f64),
}

impl Talk {
    /// The same talk for `fraction` of the connections: a fixed total rate
    /// is split with them.
    pub fn share(self, fraction: f64) -> Talk {
        match self {
            Talk::Open(rate) => Talk::Open(rate * fraction),
            Talk::Checked(rate) => Talk::Checked(rate * fraction),
            Talk::Push { rate, seconds } => Talk::Push {
                rate: rate * fraction,
                seconds,
            },
            other => other,
        }
    }
}

/// What one generator process does.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    /// The long-lived connections (the URL is an IP address: the bench
    /// never resolves). Flattened: the plan's JSON keeps its keys.
    #[serde(flatten)]
    pub fleet: Fleet,
    pub talk: Talk,
    /// Binary message size (at least 16: the send time and sequence; 32
    /// for checked messages).
    pub message_bytes: usize,
    /// New connections per second (0: none).
    pub arrivals_per_sec: f64,
    /// How long an arrival talks (one message per `arrival_interval`)
    /// before closing; zero: one echo, then close.
    pub arrival_life: Duration,
    pub arrival_interval: Duration,
    /// Reopen long-lived connections that were closed or cut (churn).
    pub reconnect: bool,
    /// Unix time (ms) the timeline counts from; processes of one run share it.
    pub epoch_unix_ms: u64,
    /// Keep a record per connection in the result.
    pub record_connections: bool,
    /// A reconnect storm of the long-lived idle connections (the `storm`
    /// scenario).
    pub storm: Option<StormPlan>,
    /// Long-lived connections that take server push wait for this file, so
    /// a harness can measure from the first frame, after every connection
    /// is up.
    #[serde(default)]
    pub start_file: Option<PathBuf>,
}

impl Default for Plan {
    fn default() -> Self {
        Plan {
            fleet: Fleet {
                url: String::new(),
                sources: Vec::new(),
                connections: 0,
                duration: Duration::from_secs(5),
                hold_file: None,
                ready_file: None,
                connect_concurrency: 200,
                connect_timeout: Duration::from_secs(10),
                echo_timeout: Duration::from_secs(10),
            },
            talk: Talk::Closed,
            message_bytes: 64,
            arrivals_per_sec: 0.0,
            arrival_life: Duration::ZERO,
            arrival_interval: Duration::from_millis(100),
            reconnect: false,
            epoch_unix_ms: 0,
            record_connections: false,
            storm: None,
            start_file: None,
        }
    }
}

/// One connection's story, kept when [`Plan::record_connections`] is set.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ConnRecord {
    /// `x-weir-backend` of the 101 response (weir-echo names itself).
    pub backend: Option<String>,
    /// Unix µs the dial began.
    #[serde(default)]
    pub started_unix_us: u64,
    pub ending: String,
    /// Unix ms of the ending.
    pub ended_unix_ms: u64,
}

/// What one generator process saw; [`LoadResult::merge`] adds several.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LoadResult {
    pub handshakes_ok: u64,
    pub handshakes_failed: u64,
    /// Messages sent; with push, frames asked of the backends.
    pub sent: u64,
    /// Echoes received; with push, frames received.
    pub echoed: u64,
    /// Echoes (or pushed frames) whose payload did not match, plus those
    /// never received.
    pub lost: u64,
    /// Long-lived connections that answered the final ping (idle).
    pub alive_at_end: u64,
    pub endings: Endings,
    /// Message latency (with push: delivery latency), µs (V2-serialized
    /// hdrhistogram, base64).
    pub latency: String,
    /// Handshake latency, µs, from scheduled start to 101.
    pub handshake: String,
    pub timeline: Vec<TimelinePoint>,
    /// This process' user + system CPU seconds.
    pub cpu_s: f64,
    /// Seconds from the first connection attempt to the end of talking.
    pub talk_s: f64,
    /// Arrivals that could not start on time because the generator was
    /// behind (a generator-limited run).
    pub arrivals_late: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub connections: Vec<ConnRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storm: Option<StormResult>,
    /// With checked messages: what came back of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked: Option<Tally>,
}

/// What a generator process writes to its ready file once every first
/// connection attempt finished: how many are open and how the others
/// ended, so a harness can count a step of connections as it is taken.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Ready {
    pub open: u64,
    pub endings: Endings,
}

impl Ready {
    /// Adds the ready files of several processes.
    pub fn merge(parts: &[Ready]) -> Ready {
        let mut out = Ready::default();
        for p in parts {
            out.open += p.open;
            for (k, v) in &p.endings {
                *out.endings.entry(k.clone()).or_default() += v;
            }
        }
        out
    }
}

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("static histogram bounds")
}

pub fn encode_histogram(h: &Histogram<u64>) -> String {
    let mut buf = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut buf)
        .expect("serializing to a Vec cannot fail");
    base64::engine::general_purpose::STANDARD.encode(buf)
}

pub fn decode_histogram(s: &str) -> Result<Histogram<u64>> {
    if s.is_empty() {
        return Ok(new_histogram());
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s)
        .context("histogram is not base64")?;
    let h: Histogram<u64> = Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| anyhow!("bad histogram: {e:?}"))?;
    Ok(h)
}

pub fn latency_of(h: &Histogram<u64>) -> Latency {
    Latency {
        p50_us: h.value_at_quantile(0.5),
        p90_us: h.value_at_quantile(0.9),
        p99_us: h.value_at_quantile(0.99),
        p999_us: h.value_at_quantile(0.999),
        max_us: h.max(),
        samples: h.len(),
    }
}

impl LoadResult {
    /// Adds the results of several processes of one run.
    pub fn merge(parts: &[LoadResult]) -> Result<LoadResult> {
        let mut out = LoadResult::default();
        let mut lat = new_histogram();
        let mut hs = new_histogram();
        let mut timeline: BTreeMap<u64, TimelinePoint> = BTreeMap::new();
        let storms: Vec<&StormResult> = parts.iter().filter_map(|p| p.storm.as_ref()).collect();
        if !storms.is_empty() {
            out.storm = Some(StormResult::merge(&storms));
        }
        for p in parts {
            if let Some(t) = &p.checked {
                out.checked.get_or_insert_with(Tally::default).add(t);
            }
            out.handshakes_ok += p.handshakes_ok;
            out.handshakes_failed += p.handshakes_failed;
            out.sent += p.sent;
            out.echoed += p.echoed;
            out.lost += p.lost;
            out.alive_at_end += p.alive_at_end;
            out.cpu_s += p.cpu_s;
            out.arrivals_late += p.arrivals_late;
            out.talk_s = out.talk_s.max(p.talk_s);
            for (k, v) in &p.endings {
                *out.endings.entry(k.clone()).or_default() += v;
            }
            lat.add(decode_histogram(&p.latency)?)?;
            hs.add(decode_histogram(&p.handshake)?)?;
            for t in &p.timeline {
                let e = timeline
                    .entry(t.t_s as u64)
                    .or_insert_with(|| TimelinePoint {
                        t_s: t.t_s,
                        ..TimelinePoint::default()
                    });
                e.open += t.open;
                e.new_ok += t.new_ok;
                e.new_failed += t.new_failed;
                e.cut += t.cut;
                e.closed_by_peer += t.closed_by_peer;
                e.max_echo_us = e.max_echo_us.max(t.max_echo_us);
            }
            out.connections.extend(p.connections.iter().cloned());
        }
        out.latency = encode_histogram(&lat);
        out.handshake = encode_histogram(&hs);
        out.timeline = timeline.into_values().collect();
        Ok(out)
    }

    /// Connections that ended in reset, EOF, timeout or error.
    pub fn cut(&self) -> u64 {
        self.endings
            .iter()
            .filter(|(k, _)| is_cut(k))
            .map(|(_, v)| v)
            .sum()
    }

    /// Connections the peer closed with a Close frame.
    pub fn closed_by_peer(&self) -> u64 {
        self.endings
            .iter()
            .filter(|(k, _)| k.starts_with(ending::PEER_CLOSE))
            .map(|(_, v)| v)
            .sum()
    }
}

/// Microseconds since the Unix epoch: one clock for every generator
/// process and the harness.
pub fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Whether an ending, by its name in [`Endings`], counts as a cut
/// connection (see [`Ending::is_cut`]).
pub fn is_cut(name: &str) -> bool {
    name.parse::<Ending>().is_ok_and(Ending::is_cut)
}

/// User + system CPU seconds of this process so far.
pub fn self_cpu_s() -> f64 {
    // SAFETY: getrusage fills a properly sized struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Per-second counters, indexed by seconds since the epoch of the plan.
struct Timeline {
    epoch_unix_ms: u64,
    /// new_ok, new_failed, cut, closed_by_peer.
    buckets: Vec<[AtomicU64; 4]>,
    open_samples: Vec<AtomicU64>,
    /// The longest echo that arrived in each second, µs.
    max_echo_us: Vec<AtomicU64>,
}

impl Timeline {
    fn new(epoch_unix_ms: u64, seconds: usize) -> Self {
        Timeline {
            epoch_unix_ms,
            buckets: (0..seconds).map(|_| Default::default()).collect(),
            open_samples: (0..seconds).map(|_| AtomicU64::new(0)).collect(),
            max_echo_us: (0..seconds).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn second(&self) -> usize {
        (unix_ms().saturating_sub(self.epoch_unix_ms) / 1000) as usize
    }

    fn count(&self, which: usize) {
        let s = self.second().min(self.buckets.len() - 1);
        self.buckets[s][which].fetch_add(1, Ordering::Relaxed);
    }

    fn echo_took(&self, us: u64) {
        let s = self.second().min(self.max_echo_us.len() - 1);
        self.max_echo_us[s].fetch_max(us, Ordering::Relaxed);
    }

    fn points(&self, last: usize) -> Vec<TimelinePoint> {
        (0..=last.min(self.buckets.len() - 1))
            .map(|s| {
                let b = &self.buckets[s];
                TimelinePoint {
                    t_s: s as f64,
                    open: self.open_samples[s].load(Ordering::Relaxed),
                    new_ok: b[0].load(Ordering::Relaxed),
                    new_failed: b[1].load(Ordering::Relaxed),
                    cut: b[2].load(Ordering::Relaxed),
                    closed_by_peer: b[3].load(Ordering::Relaxed),
                    max_echo_us: self.max_echo_us[s].load(Ordering::Relaxed),
                }
            })
            .collect()
    }
}

/// State shared by all connection tasks of one process.
struct Shared {
    plan: Plan,
    dialer: Dialer,
    open: AtomicU64,
    handshakes_ok: AtomicU64,
    handshakes_failed: AtomicU64,
    sent: AtomicU64,
    echoed: AtomicU64,
    lost: AtomicU64,
    alive_at_end: AtomicU64,
    ready: ReadyFile,
    arrivals_late: AtomicU64,
    endings: Mutex<Endings>,
    latency: Mutex<Histogram<u64>>,
    handshake: Mutex<Histogram<u64>>,
    records: Mutex<Vec<ConnRecord>>,
    /// Checked messages' account, added as their connections end.
    checked: Mutex<Option<Tally>>,
    timeline: Timeline,
    /// Long-lived connections stop talking when this turns true.
    stop: watch::Receiver<bool>,
    /// Server push starts when this turns true (the start file appeared).
    start: watch::Receiver<bool>,
    /// Reference point of message timestamps.
    t0: std::time::Instant,
    storm: Option<StormState>,
}

impl Shared {
    fn end(&self, backend: Option<String>, started_unix_us: u64, ending: Ending) {
        {
            let mut e = self.endings.lock().unwrap_or_else(|e| e.into_inner());
            *e.entry(ending.to_string()).or_default() += 1;
        }
        match ending {
            e if e.is_cut() => self.timeline.count(2),
            Ending::PeerClose(_) => self.timeline.count(3),
            Ending::Unupgraded(_) => self.timeline.count(1),
            _ => {}
        }
        if self.plan.record_connections {
            self.records
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(ConnRecord {
                    backend,
                    started_unix_us,
                    ending: ending.to_string(),
                    ended_unix_ms: unix_ms(),
                });
        }
    }

    /// Counts an echo (or pushed frame) that arrived intact after `us`.
    fn received(&self, us: u64) {
        self.echoed.fetch_add(1, Ordering::Relaxed);
        self.timeline.echo_took(us);
        let _ = self
            .latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(us.clamp(1, 120_000_000));
    }

    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    fn attempt_done(&self) {
        self.ready.attempt_done(|| {
            let ready = Ready {
                open: self.open.load(Ordering::Relaxed),
                endings: self
                    .endings
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone(),
            };
            serde_json::to_string(&ready).unwrap_or_default() + "\n"
        });
    }
}

/// Parses `ws://IP:PORT/PATH`: the address and the URL with its path.
pub fn parse_url(url: &str) -> Result<(SocketAddr, String)> {
    let parsed: WsUrl = url.parse()?;
    let addr = parsed
        .ip_target()
        .ok_or_else(|| anyhow!("URL {url:?}: {:?} is not an IP address", parsed.host))?;
    let path = parsed.uri.path_and_query().map_or("/", |p| p.as_str());
    Ok((addr, format!("ws://{addr}{path}")))
}

/// Runs a plan to its end and returns what happened. Bounded: every task
/// ends by `duration` + connect and echo timeouts + 30 s.
pub async fn run(plan: Plan) -> Result<LoadResult> {
    if plan.message_bytes < 16 {
        bail!("message_bytes must be at least 16");
    }
    if matches!(plan.talk, Talk::Checked(_)) && plan.message_bytes < checked::HEADER {
        bail!("checked messages are at least {} bytes", checked::HEADER);
    }
    let (target, uri) = parse_url(&plan.fleet.url)?;
    let dialer = Dialer {
        target,
        uri: uri.parse().context("URL")?,
        timeout: plan.fleet.connect_timeout,
        read_buffer: 16 * 1024,
    };
    let epoch = if plan.epoch_unix_ms == 0 {
        unix_ms()
    } else {
        plan.epoch_unix_ms
    };
    let horizon = plan.fleet.duration
        + plan.fleet.connect_timeout
        + plan.fleet.echo_timeout
        + Duration::from_secs(30);
    let cpu0 = self_cpu_s();
    let start = Instant::now();
    // The stop signal: the duration passed or the hold file appeared.
    let (stop_rx, stopper) =
        ws_client::stop_signal(plan.fleet.hold_file.clone(), start + plan.fleet.duration);
    let (storm, storm_tx) = match &plan.storm {
        Some(p) => {
            let (state, tx) = StormState::new(p.clone());
            (Some(state), Some(tx))
        }
        None => (None, None),
    };
    // Without a start file, push starts at once.
    let (start_rx, starter) = ws_client::stop_signal(
        plan.start_file.clone(),
        if plan.start_file.is_some() {
            start + horizon
        } else {
            start
        },
    );
    let shared = Arc::new(Shared {
        dialer,
        open: AtomicU64::new(0),
        handshakes_ok: AtomicU64::new(0),
        handshakes_failed: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        echoed: AtomicU64::new(0),
        lost: AtomicU64::new(0),
        alive_at_end: AtomicU64::new(0),
        ready: ReadyFile::new(plan.fleet.ready_file.clone(), plan.fleet.connections),
        arrivals_late: AtomicU64::new(0),
        endings: Mutex::new(Endings::new()),
        latency: Mutex::new(new_histogram()),
        handshake: Mutex::new(new_histogram()),
        records: Mutex::new(Vec::new()),
        checked: Mutex::new(None),
        timeline: Timeline::new(
            epoch,
            (horizon.as_secs() as usize) + (unix_ms().saturating_sub(epoch) / 1000) as usize + 2,
        ),
        stop: stop_rx,
        start: start_rx,
        t0: std::time::Instant::now(),
        storm,
        plan,
    });
    let plan = &shared.plan;
    let hard_end = start + horizon;

    // One sample of open connections per second, for the timeline.
    let sampler = {
        let s = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                let sec = s.timeline.second().min(s.timeline.open_samples.len() - 1);
                s.timeline.open_samples[sec]
                    .store(s.open.load(Ordering::Relaxed), Ordering::Relaxed);
            }
        })
    };

    let mut tasks = Vec::new();
    if let Some(tx) = storm_tx {
        let s = shared.clone();
        tasks.push(tokio::spawn(async move {
            if let Some(storm) = &s.storm {
                storm.signal(tx, &s.open, s.stop.clone()).await;
            }
        }));
    }
    let sem = Arc::new(Semaphore::new(plan.fleet.connect_concurrency.max(1)));
    let per_conn_interval = match plan.talk {
        Talk::Open(rate) | Talk::Checked(rate) | Talk::Push { rate, .. } if rate > 0.0 => Some(
            Duration::from_secs_f64(plan.fleet.connections as f64 / rate),
        ),
        Talk::Open(_) | Talk::Checked(_) | Talk::Push { .. } => {
            bail!("an open-loop or push rate must be above 0")
        }
        _ => None,
    };
    for i in 0..plan.fleet.connections {
        let s = shared.clone();
        let sem = sem.clone();
        // Spread open-loop senders (and pushing backends) over one period so
        // they do not all fire in the same instant.
        let phase = per_conn_interval
            .map(|p| p.mul_f64(i as f64 / plan.fleet.connections.max(1) as f64))
            .unwrap_or_default();
        tasks.push(tokio::spawn(async move {
            long_lived(s, i, sem, per_conn_interval, phase).await;
        }));
    }
    if plan.arrivals_per_sec > 0.0 {
        let s = shared.clone();
        tasks.push(tokio::spawn(async move { arrivals(s).await }));
    }
    for t in &mut tasks {
        let _ = tokio::time::timeout_at(hard_end, t).await;
    }
    for t in &tasks {
        t.abort();
    }
    stopper.abort();
    starter.abort();
    sampler.abort();
    let talk_s = start.elapsed().as_secs_f64();
    let last_second = shared.timeline.second();
    let s = &shared;
    let endings = s.endings.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let result = LoadResult {
        handshakes_ok: s.handshakes_ok.load(Ordering::Relaxed),
        handshakes_failed: s.handshakes_failed.load(Ordering::Relaxed),
        sent: s.sent.load(Ordering::Relaxed),
        echoed: s.echoed.load(Ordering::Relaxed),
        lost: s.lost.load(Ordering::Relaxed),
        alive_at_end: s.alive_at_end.load(Ordering::Relaxed),
        endings,
        latency: encode_histogram(&s.latency.lock().unwrap_or_else(|e| e.into_inner())),
        handshake: encode_histogram(&s.handshake.lock().unwrap_or_else(|e| e.into_inner())),
        timeline: s.timeline.points(last_second),
        cpu_s: self_cpu_s() - cpu0,
        talk_s,
        arrivals_late: s.arrivals_late.load(Ordering::Relaxed),
        connections: std::mem::take(&mut *s.records.lock().unwrap_or_else(|e| e.into_inner())),
        storm: s.storm.as_ref().map(StormState::result),
        checked: s.checked.lock().unwrap_or_else(|e| e.into_inner()).take(),
    };
    Ok(result)
}

/// Connects (from source `index % sources`) and upgrades; returns the
/// stream and the backend the 101 named, or the ending of a failure.
async fn connect(
    s: &Shared,
    index: usize,
    scheduled: Instant,
) -> Result<(Ws, Option<String>), Ending> {
    let source = (!s.plan.fleet.sources.is_empty())
        .then(|| s.plan.fleet.sources[index % s.plan.fleet.sources.len()]);
    match s.dialer.dial(source).await {
        Ok(c) => {
            s.handshakes_ok.fetch_add(1, Ordering::Relaxed);
            s.timeline.count(0);
            let us = scheduled.elapsed().as_micros().max(1) as u64;
            let _ = s
                .handshake
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .record(us.min(120_000_000));
            Ok((c.ws, c.backend))
        }
        Err(e) => {
            s.handshakes_failed.fetch_add(1, Ordering::Relaxed);
            Err(e.ending())
        }
    }
}

/// A message carrying its scheduled send time (ns since `t0`) and a
/// sequence number, padded to `size`.
fn payload(s: &Shared, scheduled: Instant, seq: u64, size: usize) -> Vec<u8> {
    let ns = stamp(s, scheduled);
    let mut p = vec![0x5a; size];
    p[..8].copy_from_slice(&ns.to_le_bytes());
    p[8..16].copy_from_slice(&seq.to_le_bytes());
    p
}

/// A message's send time as it carries it: ns since `t0`.
fn stamp(s: &Shared, scheduled: Instant) -> u64 {
    scheduled
        .into_std()
        .saturating_duration_since(s.t0)
        .as_nanos() as u64
}

/// µs since a message's [`stamp`].
fn since(s: &Shared, ns: u64) -> u64 {
    (s.t0 + Duration::from_nanos(ns)).elapsed().as_micros() as u64
}

fn record_echo(s: &Shared, data: &[u8], size: usize) -> bool {
    if data.len() != size || data[16..].iter().any(|&b| b != 0x5a) {
        s.lost.fetch_add(1, Ordering::Relaxed);
        return false;
    }
    let ns = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
    s.received(since(s, ns));
    true
}

/// Why talking stopped.
enum Stop {
    /// The run is over: close cleanly.
    Done,
    /// The connection ended with this ending.
    Ended(Ending),
}

/// Reads the next data message, answering nothing itself (tungstenite
/// queues pong and close replies, flushed by the next send or close).
async fn next_data(ws: &mut Ws) -> Result<Vec<u8>, Ending> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => return Ok(b.to_vec()),
            Some(Ok(Message::Text(t))) => return Ok(t.as_bytes().to_vec()),
            Some(Ok(Message::Close(f))) => {
                let _ = ws.flush().await;
                return Err(Ending::peer_close(f.as_ref()));
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(Ending::of_error(&e)),
            None => return Err(Ending::Eof),
        }
    }
}

async fn long_lived(
    s: Arc<Shared>,
    index: usize,
    sem: Arc<Semaphore>,
    interval: Option<Duration>,
    phase: Duration,
) {
    let mut first = true;
    let mut storm_pending = s.storm.is_some();
    loop {
        let permit = sem.acquire().await;
        let mut started = unix_us();
        let conn = connect(&s, index, Instant::now()).await;
        drop(permit);
        // Counted before the ready file is written, which reports them.
        match &conn {
            Ok(_) => {
                s.open.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => s.end(None, started, *e),
        }
        if first {
            s.attempt_done();
            first = false;
        }
        let Ok((mut ws, mut backend)) = conn else {
            if s.plan.reconnect && !s.stopped() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            return;
        };
        if let Some(storm) = s.storm.as_ref().filter(|_| storm_pending) {
            storm_pending = false;
            match storm::ride(&s, storm, index, ws).await {
                Ride::Calm(w) => ws = w,
                Ride::Back(w, b, at) => (ws, backend, started) = (w, b, at),
                Ride::Ended(e) => {
                    s.open.fetch_sub(1, Ordering::Relaxed);
                    s.end(backend, started, e);
                    return;
                }
                Ride::GaveUp => return,
            }
        }
        let outcome = match (s.plan.talk, interval) {
            (Talk::Closed, _) => talk_closed(&s, &mut ws).await,
            (Talk::Open(_), Some(iv)) => talk_open(&s, ws, iv, phase, None).await,
            (Talk::Checked(_), Some(iv)) => {
                let ledger = Ledger::new(checked::connection_id(index), s.plan.message_bytes);
                talk_open(&s, ws, iv, phase, Some(ledger)).await
            }
            (Talk::Push { seconds, .. }, Some(iv)) => {
                talk_push(&s, &mut ws, iv, phase, seconds).await
            }
            _ => hold_idle(&s, &mut ws).await,
        };
        s.open.fetch_sub(1, Ordering::Relaxed);
        match outcome {
            Stop::Done => {
                s.end(backend, started, Ending::Clean);
                return;
            }
            Stop::Ended(e) => {
                s.end(backend, started, e);
                if !s.plan.reconnect || s.stopped() {
                    return;
                }
            }
        }
        // Closed or cut: open a new connection, as a client does after its
        // server went away.
    }
}

/// Sends our Close 1000 and waits for the peer's Close (or the end of
/// the connection). A connection that ends without the peer's Close still
/// counts as done here, as it always has in the bench: the bench measures
/// relaying, the tests' client (which calls it `eof`) checks the close
/// handshake.
async fn close_clean(s: &Shared, ws: &mut Ws) -> Stop {
    match close_handshake(ws, s.plan.fleet.echo_timeout, CloseUntil::Reply).await {
        Ok(_) => Stop::Done,
        Err((ending, _)) => Stop::Ended(ending),
    }
}

/// Sends one message now and waits for its echo; an echo that never came
/// counts as lost. Whether the echo matched what was sent.
async fn echo_once(s: &Shared, ws: &mut Ws, seq: u64) -> Result<bool, Ending> {
    let size = s.plan.message_bytes;
    if let Err(e) = ws
        .send(Message::binary(payload(s, Instant::now(), seq, size)))
        .await
    {
        return Err(Ending::of_error(&e));
    }
    s.sent.fetch_add(1, Ordering::Relaxed);
    match tokio::time::timeout(s.plan.fleet.echo_timeout, next_data(ws)).await {
        Ok(Ok(data)) => Ok(record_echo(s, &data, size)),
        Ok(Err(e)) => {
            s.lost.fetch_add(1, Ordering::Relaxed);
            Err(e)
        }
        Err(_) => {
            s.lost.fetch_add(1, Ordering::Relaxed);
            Err(Ending::Timeout)
        }
    }
}

async fn talk_closed(s: &Shared, ws: &mut Ws) -> Stop {
    let mut seq = 0u64;
    while !s.stopped() {
        if let Err(e) = echo_once(s, ws, seq).await {
            return Stop::Ended(e);
        }
        seq += 1;
    }
    close_clean(s, ws).await
}

async fn hold_idle(s: &Shared, ws: &mut Ws) -> Stop {
    let mut stop = s.stop.clone();
    tokio::select! {
        _ = stop.wait_for(|v| *v) => {}
        r = next_data(ws) => {
            return Stop::Ended(r.err().unwrap_or(Ending::Error));
        }
    }
    // Prove the connection still carries data before closing it.
    let probe = payload(s, Instant::now(), 0, s.plan.message_bytes);
    if let Err(e) = ws.send(Message::binary(probe)).await {
        return Stop::Ended(Ending::of_error(&e));
    }
    s.sent.fetch_add(1, Ordering::Relaxed);
    match tokio::time::timeout(s.plan.fleet.echo_timeout, next_data(ws)).await {
        Ok(Ok(data)) => {
            if record_echo(s, &data, s.plan.message_bytes) {
                s.alive_at_end.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(Err(e)) => return Stop::Ended(e),
        Err(_) => return Stop::Ended(Ending::Timeout),
    }
    close_clean(s, ws).await
}

/// Server push on one connection: once the start signal came, asks the
/// backend for `seconds` of frames every `interval`, the first after
/// `phase`, and takes them all (or counts the rest lost when the
/// connection ends or goes quiet for the echo timeout).
async fn talk_push(
    s: &Shared,
    ws: &mut Ws,
    interval: Duration,
    phase: Duration,
    seconds: f64,
) -> Stop {
    let mut go = s.start.clone();
    let mut stop = s.stop.clone();
    let started = tokio::select! {
        r = go.wait_for(|v| *v) => r.is_ok(),
        _ = stop.wait_for(|v| *v) => false,
    };
    if !started {
        return close_clean(s, ws).await;
    }
    let size = s.plan.message_bytes;
    let req = PushRequest {
        rate: 1.0 / interval.as_secs_f64(),
        size,
        count: (seconds / interval.as_secs_f64()).round().max(1.0) as u64,
        delay: phase,
    };
    if let Err(e) = ws.send(Message::text(req.to_string())).await {
        return Stop::Ended(Ending::of_error(&e));
    }
    s.sent.fetch_add(req.count, Ordering::Relaxed);
    for got in 0..req.count {
        let ending = match tokio::time::timeout(s.plan.fleet.echo_timeout, next_data(ws)).await {
            Ok(Ok(data)) => {
                record_push(s, &data, size);
                continue;
            }
            Ok(Err(e)) => e,
            Err(_) => Ending::Timeout,
        };
        s.lost.fetch_add(req.count - got, Ordering::Relaxed);
        return Stop::Ended(ending);
    }
    close_clean(s, ws).await
}

/// Records a pushed frame's delivery latency: now minus the time the
/// backend was due to send it (both CLOCK_REALTIME).
fn record_push(s: &Shared, data: &[u8], size: usize) {
    let Some((due_ns, _)) = push::read_frame(data, size) else {
        s.lost.fetch_add(1, Ordering::Relaxed);
        return;
    };
    s.received(push::realtime_ns().saturating_sub(due_ns) / 1000);
}

/// Open loop on one connection: a sender on a fixed schedule and a reader
/// that matches echoes by their embedded send time.
///
/// With a `ledger`, the messages are checked ones and every echo is
/// checked against it.
async fn talk_open(
    s: &Arc<Shared>,
    ws: Ws,
    interval: Duration,
    phase: Duration,
    mut ledger: Option<Ledger>,
) -> Stop {
    let size = s.plan.message_bytes;
    let (mut tx, mut rx) = ws.split();
    let sent_here = Arc::new(AtomicU64::new(0));
    let (done_tx, mut done_rx) = watch::channel(false);
    let sender = {
        let s = s.clone();
        let sent_here = sent_here.clone();
        let id = ledger.as_ref().map(Ledger::id);
        async move {
            tokio::time::sleep(phase).await;
            let mut tick = tokio::time::interval(interval);
            // Burst: a late tick is sent at once, stamped with its
            // scheduled time, so the delay shows up in the latency.
            tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
            let mut seq = 0u64;
            while !s.stopped() {
                let scheduled = tick.tick().await;
                if s.stopped() {
                    break;
                }
                let m = match id {
                    Some(id) => checked::message(id, seq, stamp(&s, scheduled), size),
                    None => payload(&s, scheduled, seq, size),
                };
                if let Err(e) = tx.send(Message::binary(m)).await {
                    let _ = done_tx.send(true);
                    return (tx, Err(Ending::of_error(&e)));
                }
                seq += 1;
                sent_here.fetch_add(1, Ordering::Relaxed);
                s.sent.fetch_add(1, Ordering::Relaxed);
            }
            let _ = done_tx.send(true);
            (tx, Ok(()))
        }
    };
    let reader = {
        let s = s.clone();
        let sent_here = sent_here.clone();
        async move {
            let mut got = 0u64;
            loop {
                let sender_done = *done_rx.borrow();
                if sender_done && got >= sent_here.load(Ordering::Relaxed) {
                    return (rx, ledger, Ok(got));
                }
                let next = tokio::select! {
                    m = tokio::time::timeout(s.plan.fleet.echo_timeout, rx.next()) => m,
                    _ = done_rx.changed(), if !sender_done => continue,
                };
                match next {
                    Ok(Some(Ok(Message::Binary(b)))) => {
                        let awaited = match ledger.as_mut().map(|l| l.echo(&b)) {
                            None => {
                                record_echo(&s, &b, size);
                                true
                            }
                            Some(Echo::First(ns)) => {
                                s.received(since(&s, ns));
                                true
                            }
                            Some(Echo::Corrupted) => true,
                            Some(Echo::NotOurs) => false,
                        };
                        got += u64::from(awaited);
                    }
                    Ok(Some(Ok(Message::Close(f)))) => {
                        return (rx, ledger, Err(Ending::peer_close(f.as_ref())));
                    }
                    Ok(Some(Ok(_))) => {}
                    Ok(Some(Err(e))) => return (rx, ledger, Err(Ending::of_error(&e))),
                    Ok(None) => return (rx, ledger, Err(Ending::Eof)),
                    Err(_) => return (rx, ledger, Err(Ending::Timeout)),
                }
            }
        }
    };
    let ((tx, sent), (rx, ledger, read)) = tokio::join!(sender, reader);
    if let Some(l) = ledger {
        let t = l.close(sent_here.load(Ordering::Relaxed));
        s.checked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(Tally::default)
            .add(&t);
    }
    let outstanding = sent_here
        .load(Ordering::Relaxed)
        .saturating_sub(read.as_ref().map(|g| *g).unwrap_or(0));
    if read.is_err() {
        s.lost.fetch_add(outstanding, Ordering::Relaxed);
    }
    let mut ws = match tx.reunite(rx) {
        Ok(ws) => ws,
        Err(_) => return Stop::Ended(Ending::Error),
    };
    match (sent, read) {
        (_, Err(e)) => {
            if let Ending::PeerClose(_) = e {
                let _ = ws.flush().await;
            }
            Stop::Ended(e)
        }
        (Err(e), _) => Stop::Ended(e),
        (Ok(()), Ok(_)) => close_clean(s, &mut ws).await,
    }
}

/// New connections at `arrivals_per_sec` until the run stops; each talks
/// for `arrival_life` (or one echo) and closes.
async fn arrivals(s: Arc<Shared>) {
    let period = Duration::from_secs_f64(1.0 / s.plan.arrivals_per_sec);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut n = 0usize;
    let mut tasks = tokio::task::JoinSet::new();
    while !s.stopped() {
        let scheduled = tick.tick().await;
        if s.stopped() {
            break;
        }
        if scheduled.elapsed() > Duration::from_millis(100) {
            s.arrivals_late.fetch_add(1, Ordering::Relaxed);
        }
        let s2 = s.clone();
        let index = s.plan.fleet.connections + n;
        n += 1;
        tasks.spawn(async move { arrival(s2, index, scheduled).await });
        // Reap finished ones so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

async fn arrival(s: Arc<Shared>, index: usize, scheduled: Instant) {
    let started = unix_us();
    let (mut ws, backend) = match connect(&s, index, scheduled).await {
        Ok(c) => c,
        Err(e) => {
            s.end(None, started, e);
            return;
        }
    };
    s.open.fetch_add(1, Ordering::Relaxed);
    let until = Instant::now() + s.plan.arrival_life;
    let mut seq = 0u64;
    let outcome = loop {
        if let Err(e) = echo_once(&s, &mut ws, seq).await {
            break Stop::Ended(e);
        }
        seq += 1;
        if Instant::now() + s.plan.arrival_interval > until || s.stopped() {
            break close_clean(&s, &mut ws).await;
        }
        tokio::time::sleep(s.plan.arrival_interval).await;
    };
    s.open.fetch_sub(1, Ordering::Relaxed);
    match outcome {
        Stop::Done => s.end(backend, started, Ending::Clean),
        Stop::Ended(e) => s.end(backend, started, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// weir-load reads its plan as JSON: the shared fleet settings sit at
    /// the top level, as they did before they were shared.
    #[test]
    fn a_plan_round_trips_through_json_with_the_fleet_flattened() {
        let mut plan = Plan::default();
        plan.fleet.url = "ws://198.18.0.1:80/".into();
        plan.fleet.connections = 7;
        plan.fleet.hold_file = Some("/tmp/hold".into());
        plan.talk = Talk::Open(12.5);
        let json: serde_json::Value = serde_json::to_value(&plan).unwrap();
        assert_eq!(json["url"], "ws://198.18.0.1:80/");
        assert_eq!(json["connections"], 7);
        assert!(json.get("fleet").is_none(), "{json}");
        let back: Plan = serde_json::from_value(json).unwrap();
        assert_eq!(back.fleet.connections, 7);
        assert_eq!(back.fleet.hold_file, plan.fleet.hold_file);
        assert_eq!(back.fleet.echo_timeout, plan.fleet.echo_timeout);
        assert_eq!(back.talk, Talk::Open(12.5));
    }

    /// A fixed total rate is split with the connections; other talk is not.
    #[test]
    fn a_share_of_the_connections_gets_a_share_of_the_rate() {
        assert_eq!(Talk::Open(100.0).share(0.25), Talk::Open(25.0));
        assert_eq!(Talk::Checked(100.0).share(0.25), Talk::Checked(25.0));
        let push = Talk::Push {
            rate: 100.0,
            seconds: 3.0,
        };
        assert_eq!(
            push.share(0.5),
            Talk::Push {
                rate: 50.0,
                seconds: 3.0
            }
        );
        assert_eq!(Talk::Closed.share(0.5), Talk::Closed);
        let mut plan = Plan {
            talk: push,
            start_file: Some("/tmp/start".into()),
            ..Plan::default()
        };
        let back: Plan = serde_json::from_str(&serde_json::to_string(&plan).unwrap()).unwrap();
        assert_eq!((back.talk, back.start_file), (push, plan.start_file.take()));
    }

    /// A checked message needs room for its header: a plan that leaves
    /// none is refused before anything is dialled.
    #[test]
    fn checked_messages_need_their_header() {
        let mut plan = Plan {
            talk: Talk::Checked(10.0),
            message_bytes: checked::HEADER - 1,
            ..Plan::default()
        };
        plan.fleet.url = "ws://127.0.0.1:1/".into();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let err = rt.block_on(run(plan)).unwrap_err();
        assert!(err.to_string().contains("checked messages"), "{err:#}");
    }

    #[test]
    fn urls_need_an_ip_address_and_the_port_defaults_to_80() {
        let (a, u) = parse_url("ws://198.19.0.10:8081/x").unwrap();
        assert_eq!(a, "198.19.0.10:8081".parse().unwrap());
        assert_eq!(u, "ws://198.19.0.10:8081/x");
        assert_eq!(
            parse_url("ws://127.0.0.1:1").unwrap().1,
            "ws://127.0.0.1:1/"
        );
        assert!(parse_url("http://127.0.0.1:1/").is_err());
        assert!(parse_url("ws://localhost:80/").is_err());
        assert_eq!(
            parse_url("ws://198.19.0.10/").unwrap().0,
            "198.19.0.10:80".parse().unwrap()
        );
    }

    #[test]
    fn histograms_survive_the_trip_through_json() {
        let mut h = new_histogram();
        for v in [5, 50, 500, 5000] {
            h.record(v).unwrap();
        }
        let back = decode_histogram(&encode_histogram(&h)).unwrap();
        assert_eq!(back.len(), 4);
        assert_eq!(back.max(), h.max());
        assert!(decode_histogram("not base64!").is_err());
    }

    #[test]
    fn merge_adds_counts_histograms_and_timelines() {
        let mut h = new_histogram();
        h.record(100).unwrap();
        let part = LoadResult {
            handshakes_ok: 2,
            echoed: 3,
            endings: [("clean".to_string(), 2), ("reset".to_string(), 1)].into(),
            latency: encode_histogram(&h),
            timeline: vec![TimelinePoint {
                t_s: 1.0,
                open: 2,
                cut: 1,
                ..Default::default()
            }],
            ..Default::default()
        };
        let m = LoadResult::merge(&[part.clone(), part]).unwrap();
        assert_eq!(m.handshakes_ok, 4);
        assert_eq!(m.echoed, 6);
        assert_eq!(m.endings["clean"], 4);
        assert_eq!(m.cut(), 2);
        assert_eq!(decode_histogram(&m.latency).unwrap().len(), 2);
        assert_eq!(m.timeline.len(), 1);
        assert_eq!(m.timeline[0].open, 4);
    }

    #[test]
    fn cuts_are_the_endings_without_a_close_handshake() {
        for e in ["reset", "eof", "timeout", "error"] {
            assert!(is_cut(e), "{e}");
        }
        for e in ["clean", "peer_close:1001", "handshake:503", "open"] {
            assert!(!is_cut(e), "{e}");
        }
    }
}
