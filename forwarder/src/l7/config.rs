//! The `weir run` configuration (TOML). With no file, weir runs on
//! [`DEFAULT`] (`weir config default` prints it). A bad file is refused at
//! start with the file, the line and the reason; nothing runs half
//! configured.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config_file::{self, Source};
pub use crate::config_file::{ConfigError, MAX_DURATION, parse_duration};
use crate::registry::ServiceAddr;

mod builder;
mod reload;
pub use builder::{ConfigBuilder, Timeout};
pub use reload::{NeedsRestart, ReloadPlan, plan_reload};

/// The embedded default: one listener on loopback routing everything to
/// the L7 service 127.0.0.1:8080, whose backends come from the registry
/// (`weir backend add 127.0.0.1:8080 ...`).
pub const DEFAULT: &str = r#"# weir run: the embedded default configuration.
# Durations take ms, s, m or h suffixes, may be fractional (1.5s), and go up to 24h.
instance = "default"

[runtime]
workers = 0              # 0: one per core, more if max_connections needs more io_uring file tables; at most 1024
buffers = 4096           # provided receive buffers per worker (a power of two, at most 32768)
buffer_size = 16384      # bytes per buffer (1024..=1048576)
max_connections = 100000 # per process (1..=1048576); over it new clients get 503

[metrics]
listen = "127.0.0.1:9100"

[timeouts]
client_head = "10s"      # the client's handshake request
connect = "3s"           # TCP connect to a backend (then the next one is tried)
backend_head = "10s"     # the backend's handshake answer (else 504)
idle = "5m"              # no frame either way: Close 1001
ping_interval = "0s"     # keepalive pings to the client; 0s: off, else at least 100ms
close = "5s"             # close handshake, then TCP close
shutdown = "30s"         # SIGTERM: drain everything within this
takeover = "5m"          # after `weir run --takeover`: the old process serves
                         # its connections this long, then drains as on SIGTERM

[limits]
max_head_bytes = 8192
max_headers = 64
max_frame = 16777216
max_message = 67108864

[drain]
window = "30s"           # drained connections close spread over this

# Passive outlier detection: a backend whose connects fail or time out, or
# that answers the upgrade with a 5xx (or badly, or not in time), this many
# times in a row leaves this process's choices for base_ejection, doubled at
# each ejection up to max_ejection, and returns on its own. Per process: not
# shared between weir run processes.
[outlier]
consecutive = 5          # failures in a row that eject (0..=1000; 0: off)
base_ejection = "10s"    # the first ejection's length (1ms..=24h)
max_ejection = "5m"      # the longest (base_ejection..=24h)
max_ejected_percent = 50 # at most this share of a service's active backends is ejected (0..=100)

# Per-service overrides:
# [[service]]
# address = "127.0.0.1:8080"
# drain_window = "5s"
# drain_unhealthy = true # close (1001) connections to a backend weir agent
#                        # finds unhealthy; by default they stay

[[listener]]
listen = "127.0.0.1:8080"
# shared = true          # only when several weir run serve this address on purpose

[[listener.route]]
host = "*"
path_prefix = "/"
service = "127.0.0.1:8080"
"#;

/// The validated configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub instance: String,
    /// `FILE:LINE` of the `instance` key when the file sets it.
    pub instance_set_at: Option<String>,
    pub workers: usize,
    pub buffers: u16,
    pub buffer_size: u32,
    pub max_connections: usize,
    pub metrics: Option<SocketAddr>,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub drain_window: Duration,
    /// Per-service drain windows that differ from `drain_window`.
    pub service_drain: Vec<(ServiceAddr, Duration)>,
    /// Services whose connections to a backend that `weir agent` found
    /// unhealthy (and that left the ring) are drained with 1001 like a
    /// removed backend's. Elsewhere they stay: the check may be wrong, the
    /// connection may be fine.
    pub drain_unhealthy: Vec<ServiceAddr>,
    pub outlier: Outlier,
    pub listeners: Vec<Listener>,
}

/// Passive outlier detection (`[outlier]`, see [`crate::l7::outlier`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outlier {
    /// Failures in a row that eject a backend; 0: detection is off.
    pub consecutive: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    /// At most this share (in percent) of a service's active backends is
    /// ejected at a time.
    pub max_ejected_percent: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub client_head: Duration,
    pub connect: Duration,
    pub backend_head: Duration,
    pub idle: Duration,
    pub ping_interval: Option<Duration>,
    pub close: Duration,
    pub shutdown: Duration,
    /// How long a process that handed its listeners to a `weir run
    /// --takeover` keeps serving the connections it holds before it
    /// drains them as on SIGTERM.
    pub takeover: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_head_bytes: usize,
    pub max_headers: usize,
    pub max_frame: u64,
    pub max_message: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listener {
    pub listen: SocketAddr,
    /// Other processes may serve this address too (SO_REUSEPORT shards,
    /// each with its own instance); otherwise `weir run` refuses to start
    /// while anyone else listens there.
    pub shared: bool,
    pub routes: Vec<Route>,
}

/// A route: requests whose Host matches `host` (`*` for any, or a name
/// compared without port and case) and whose path is `path_prefix` or lies
/// under it (whole segments: `/chat` takes `/chat/x`, not `/chatroom`) go
/// to `service`. The longest matching prefix wins; an exact host wins over
/// `*`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub host: String,
    pub path_prefix: String,
    pub service: ServiceAddr,
}

impl Listener {
    /// The service for a request, if any route matches (else 404).
    pub fn route(&self, host: &str, path: &str) -> Option<ServiceAddr> {
        let host = host
            .rsplit_once(':')
            .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
            .map_or(host, |(h, _)| h);
        self.routes
            .iter()
            .filter(|r| {
                (r.host == "*" || r.host.eq_ignore_ascii_case(host))
                    && under_prefix(path, &r.path_prefix)
            })
            .max_by_key(|r| (r.host != "*", r.path_prefix.len()))
            .map(|r| r.service)
    }
}

/// Whether request target `target` (path and query) is `prefix` or under
/// it, on segment boundaries.
fn under_prefix(target: &str, prefix: &str) -> bool {
    let Some(rest) = target.strip_prefix(prefix) else {
        return false;
    };
    prefix.ends_with('/') || rest.is_empty() || rest.starts_with(['/', '?'])
}

// The file as written, with spans for the errors found after parsing;
// `ConfigBuilder` writes files through the same tables.
#[derive(Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    instance: Option<toml::Spanned<String>>,
    #[serde(default)]
    runtime: RawRuntime,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    timeouts: RawTimeouts,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    drain: RawDrain,
    #[serde(default)]
    outlier: RawOutlier,
    #[serde(default, rename = "service")]
    services: Vec<RawService>,
    #[serde(rename = "listener")]
    listeners: Vec<RawListener>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawRuntime {
    #[serde(default = "default_workers")]
    workers: toml::Spanned<u64>,
    #[serde(default = "default_buffers")]
    buffers: toml::Spanned<u32>,
    #[serde(default = "default_buffer_size")]
    buffer_size: toml::Spanned<u32>,
    #[serde(default = "default_max_connections")]
    max_connections: toml::Spanned<u64>,
}

impl Default for RawRuntime {
    fn default() -> Self {
        Self {
            workers: default_workers(),
            buffers: default_buffers(),
            buffer_size: default_buffer_size(),
            max_connections: default_max_connections(),
        }
    }
}

fn default_buffers() -> toml::Spanned<u32> {
    toml::Spanned::new(0..0, 4096)
}
fn default_buffer_size() -> toml::Spanned<u32> {
    toml::Spanned::new(0..0, 16384)
}
fn default_workers() -> toml::Spanned<u64> {
    toml::Spanned::new(0..0, 0)
}
fn default_max_connections() -> toml::Spanned<u64> {
    toml::Spanned::new(0..0, 100_000)
}

#[derive(Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<toml::Spanned<String>>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    #[serde(default = "d10s")]
    client_head: toml::Spanned<String>,
    #[serde(default = "d3s")]
    connect: toml::Spanned<String>,
    #[serde(default = "d10s")]
    backend_head: toml::Spanned<String>,
    #[serde(default = "d5m")]
    idle: toml::Spanned<String>,
    #[serde(default = "d0s")]
    ping_interval: toml::Spanned<String>,
    #[serde(default = "d5s")]
    close: toml::Spanned<String>,
    #[serde(default = "d30s")]
    shutdown: toml::Spanned<String>,
    #[serde(default = "d5m")]
    takeover: toml::Spanned<String>,
}

impl Default for RawTimeouts {
    fn default() -> Self {
        Self {
            client_head: d10s(),
            connect: d3s(),
            backend_head: d10s(),
            idle: d5m(),
            ping_interval: d0s(),
            close: d5s(),
            shutdown: d30s(),
            takeover: d5m(),
        }
    }
}

fn dur(s: &str) -> toml::Spanned<String> {
    toml::Spanned::new(0..0, s.into())
}
fn d0s() -> toml::Spanned<String> {
    dur("0s")
}
fn d3s() -> toml::Spanned<String> {
    dur("3s")
}
fn d5s() -> toml::Spanned<String> {
    dur("5s")
}
fn d10s() -> toml::Spanned<String> {
    dur("10s")
}
fn d30s() -> toml::Spanned<String> {
    dur("30s")
}
fn d5m() -> toml::Spanned<String> {
    dur("5m")
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    #[serde(default = "default_head")]
    max_head_bytes: toml::Spanned<usize>,
    #[serde(default = "default_headers")]
    max_headers: toml::Spanned<usize>,
    #[serde(default = "default_frame")]
    max_frame: toml::Spanned<u64>,
    #[serde(default = "default_message")]
    max_message: toml::Spanned<u64>,
}

impl Default for RawLimits {
    fn default() -> Self {
        Self {
            max_head_bytes: default_head(),
            max_headers: default_headers(),
            max_frame: default_frame(),
            max_message: default_message(),
        }
    }
}

fn default_head() -> toml::Spanned<usize> {
    toml::Spanned::new(0..0, 8192)
}
fn default_headers() -> toml::Spanned<usize> {
    toml::Spanned::new(0..0, 64)
}
fn default_frame() -> toml::Spanned<u64> {
    toml::Spanned::new(0..0, 16 << 20)
}
fn default_message() -> toml::Spanned<u64> {
    toml::Spanned::new(0..0, 64 << 20)
}

#[derive(Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDrain {
    window: Option<toml::Spanned<String>>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawOutlier {
    #[serde(default = "default_consecutive")]
    consecutive: toml::Spanned<u64>,
    #[serde(default = "d10s")]
    base_ejection: toml::Spanned<String>,
    #[serde(default = "d5m")]
    max_ejection: toml::Spanned<String>,
    #[serde(default = "default_ejected_percent")]
    max_ejected_percent: toml::Spanned<u64>,
}

impl Default for RawOutlier {
    fn default() -> Self {
        Self {
            consecutive: default_consecutive(),
            base_ejection: d10s(),
            max_ejection: d5m(),
            max_ejected_percent: default_ejected_percent(),
        }
    }
}

fn default_consecutive() -> toml::Spanned<u64> {
    toml::Spanned::new(0..0, 5)
}
fn default_ejected_percent() -> toml::Spanned<u64> {
    toml::Spanned::new(0..0, 50)
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    address: toml::Spanned<String>,
    drain_window: Option<toml::Spanned<String>>,
    drain_unhealthy: Option<bool>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    listen: toml::Spanned<String>,
    #[serde(default)]
    shared: bool,
    #[serde(rename = "route")]
    routes: Vec<RawRoute>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    #[serde(default = "any_host")]
    host: toml::Spanned<String>,
    #[serde(default = "root_prefix")]
    path_prefix: toml::Spanned<String>,
    service: toml::Spanned<String>,
}

fn any_host() -> toml::Spanned<String> {
    toml::Spanned::new(0..0, "*".into())
}
fn root_prefix() -> toml::Spanned<String> {
    toml::Spanned::new(0..0, "/".into())
}

/// The shortest keepalive ping interval.
pub const MIN_PING_INTERVAL: Duration = Duration::from_millis(100);
/// Upper bounds of the numeric settings: beyond them a process runs out of
/// descriptors or memory long before it serves anything.
pub const MAX_WORKERS: u64 = 1024;
pub const MAX_CONNECTIONS: u64 = 1 << 20;
/// Receive buffer memory one worker may reserve (`buffers` × `buffer_size`).
pub const MAX_POOL_BYTES: u64 = 1 << 30;
pub const MAX_FRAME_BYTES: u64 = 1 << 30;
pub const MAX_LISTENERS: usize = 64;
/// More failures in a row than this before an ejection would be no
/// detection at all.
pub const MAX_CONSECUTIVE: u64 = 1000;
pub const MAX_ROUTES: usize = 1024;
/// Listening sockets of all workers together (each worker has one per
/// listener): they count against the process's open files, with clients.
pub const MAX_LISTENER_SOCKETS: u64 = 4096;
/// Receive buffer memory of all workers together (reserved address space;
/// resident only while traffic uses it).
pub const MAX_TOTAL_POOL_BYTES: u64 = 64 << 30;

/// Reads and validates a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    parse(&config_file::read(path)?, &path.display().to_string())
}

/// Parses and validates configuration text; `name` appears in errors.
pub fn parse(text: &str, name: &str) -> Result<Config, ConfigError> {
    let src = Source::new(text, name);
    let at = |span, reason| src.error(span, reason);
    let raw: RawConfig = src.parse()?;
    let duration = |s, key, min| src.duration(s, key, min);
    let range = |v, key, min, max, note| src.range(v, key, min, max, note);
    let addr = |s, key| src.addr(s, key);
    let service = |s, key| src.service(s, key);

    let (instance, instance_set_at) = match &raw.instance {
        Some(i) => (src.instance(i)?, Some(src.place(i.span()))),
        None => ("default".to_string(), None),
    };
    let rt = &raw.runtime;
    let workers = range(
        &rt.workers,
        "runtime.workers",
        0,
        MAX_WORKERS,
        " (0: one per core, or as many as max_connections needs)",
    )?;
    let buffers = *rt.buffers.get_ref();
    if !buffers.is_power_of_two() || buffers > crate::l7::bufring::MAX_ENTRIES as u32 {
        return Err(at(
            rt.buffers.span(),
            format!(
                "runtime.buffers = {buffers}: must be a power of two from 1 to {}",
                crate::l7::bufring::MAX_ENTRIES
            ),
        ));
    }
    let buffer_size = *rt.buffer_size.get_ref();
    if !(1024..=1 << 20).contains(&buffer_size) {
        return Err(at(
            rt.buffer_size.span(),
            format!("runtime.buffer_size = {buffer_size}: must be 1024..=1048576"),
        ));
    }
    let pool = u64::from(buffers) * u64::from(buffer_size);
    if pool > MAX_POOL_BYTES {
        return Err(at(
            rt.buffer_size.span(),
            format!(
                "runtime.buffers × runtime.buffer_size = {} MiB per worker: must be at most {} MiB",
                pool >> 20,
                MAX_POOL_BYTES >> 20
            ),
        ));
    }
    let max_connections = range(
        &rt.max_connections,
        "runtime.max_connections",
        1,
        MAX_CONNECTIONS,
        "",
    )?;
    let t = &raw.timeouts;
    let positive = Duration::from_millis(1);
    let ping = duration(&t.ping_interval, "timeouts.ping_interval", Duration::ZERO)?;
    // A ping every few microseconds would be a flood, not a keepalive.
    if !ping.is_zero() && ping < MIN_PING_INTERVAL {
        return Err(at(
            t.ping_interval.span(),
            format!(
                "timeouts.ping_interval = {:?}: must be 0s (off) or from 100ms to 24h",
                t.ping_interval.get_ref()
            ),
        ));
    }
    let timeouts = Timeouts {
        client_head: duration(&t.client_head, "timeouts.client_head", positive)?,
        connect: duration(&t.connect, "timeouts.connect", positive)?,
        backend_head: duration(&t.backend_head, "timeouts.backend_head", positive)?,
        idle: duration(&t.idle, "timeouts.idle", positive)?,
        ping_interval: (!ping.is_zero()).then_some(ping),
        close: duration(&t.close, "timeouts.close", positive)?,
        shutdown: duration(&t.shutdown, "timeouts.shutdown", Duration::ZERO)?,
        takeover: duration(&t.takeover, "timeouts.takeover", Duration::ZERO)?,
    };
    let l = &raw.limits;
    let limits = Limits {
        max_head_bytes: *l.max_head_bytes.get_ref(),
        max_headers: *l.max_headers.get_ref(),
        max_frame: *l.max_frame.get_ref(),
        max_message: *l.max_message.get_ref(),
    };
    if !(512..=65536).contains(&limits.max_head_bytes) {
        return Err(at(
            l.max_head_bytes.span(),
            format!(
                "limits.max_head_bytes = {}: must be 512..=65536",
                limits.max_head_bytes
            ),
        ));
    }
    if !(8..=256).contains(&limits.max_headers) {
        return Err(at(
            l.max_headers.span(),
            format!(
                "limits.max_headers = {}: must be 8..=256",
                limits.max_headers
            ),
        ));
    }
    if !(1..=MAX_FRAME_BYTES).contains(&limits.max_frame) {
        return Err(at(
            l.max_frame.span(),
            format!(
                "limits.max_frame = {}: must be 1..={MAX_FRAME_BYTES}",
                limits.max_frame
            ),
        ));
    }
    if !(limits.max_frame..=MAX_FRAME_BYTES).contains(&limits.max_message) {
        return Err(at(
            l.max_message.span(),
            format!(
                "limits.max_message = {}: must be from limits.max_frame ({}) to {MAX_FRAME_BYTES}",
                limits.max_message, limits.max_frame
            ),
        ));
    }
    let drain_window = match &raw.drain.window {
        Some(w) => duration(w, "drain.window", Duration::ZERO)?,
        None => Duration::from_secs(30),
    };
    if raw.services.len() > MAX_ROUTES {
        return Err(at(
            raw.services[MAX_ROUTES].address.span(),
            format!("more than {MAX_ROUTES} [[service]] tables"),
        ));
    }
    let mut service_drain: Vec<(ServiceAddr, Duration)> = Vec::new();
    let mut drain_unhealthy = Vec::new();
    let mut listed: Vec<ServiceAddr> = Vec::new();
    for s in &raw.services {
        let addr = service(&s.address, "service.address")?;
        if listed.contains(&addr) {
            return Err(at(
                s.address.span(),
                format!("service.address = \"{addr}\" is listed twice"),
            ));
        }
        listed.push(addr);
        if s.drain_window.is_none() && s.drain_unhealthy.is_none() {
            return Err(at(
                s.address.span(),
                format!(
                    "[[service]] {addr} sets nothing: give it drain_window and/or \
                     drain_unhealthy"
                ),
            ));
        }
        if let Some(w) = &s.drain_window {
            let window = duration(w, "service.drain_window", Duration::ZERO)?;
            service_drain.push((addr, window));
        }
        if s.drain_unhealthy == Some(true) {
            drain_unhealthy.push(addr);
        }
    }
    let o = &raw.outlier;
    let base_ejection = duration(&o.base_ejection, "outlier.base_ejection", positive)?;
    let outlier = Outlier {
        consecutive: range(
            &o.consecutive,
            "outlier.consecutive",
            0,
            MAX_CONSECUTIVE,
            " (0: off)",
        )? as u32,
        base_ejection,
        max_ejection: duration(&o.max_ejection, "outlier.max_ejection", base_ejection).map_err(
            |e| ConfigError {
                reason: format!(
                    "{} (from outlier.base_ejection = {:?})",
                    e.reason,
                    o.base_ejection.get_ref()
                ),
                ..e
            },
        )?,
        max_ejected_percent: range(
            &o.max_ejected_percent,
            "outlier.max_ejected_percent",
            0,
            100,
            "",
        )? as u8,
    };
    let metrics = raw
        .metrics
        .listen
        .as_ref()
        .map(|m| addr(m, "metrics.listen"))
        .transpose()?;

    if raw.listeners.is_empty() {
        return Err(at(0..0, "no [[listener]]: weir would serve nothing".into()));
    }
    if raw.listeners.len() > MAX_LISTENERS {
        return Err(at(
            raw.listeners[MAX_LISTENERS].listen.span(),
            format!(
                "{} [[listener]] tables: at most {MAX_LISTENERS}",
                raw.listeners.len()
            ),
        ));
    }
    // Bounds across keys: each key may be in range while their product is
    // not. `workers = 0` means one per core of the host checking.
    let running = match workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get() as u64),
        n => n,
    };
    let sockets = running * raw.listeners.len() as u64;
    if sockets > MAX_LISTENER_SOCKETS {
        return Err(at(
            rt.workers.span(),
            format!(
                "runtime.workers ({running}) × {} [[listener]] tables = {sockets} listening \
                 sockets: must be at most {MAX_LISTENER_SOCKETS}; use fewer workers or listeners",
                raw.listeners.len()
            ),
        ));
    }
    if running * pool > MAX_TOTAL_POOL_BYTES {
        return Err(at(
            rt.workers.span(),
            format!(
                "runtime.workers ({running}) × runtime.buffers × runtime.buffer_size = {} MiB of \
                 receive buffers: must be at most {} MiB; use fewer workers or a smaller pool",
                (running * pool) >> 20,
                MAX_TOTAL_POOL_BYTES >> 20
            ),
        ));
    }
    let mut listeners = Vec::new();
    for rl in &raw.listeners {
        let listen = addr(&rl.listen, "listener.listen")?;
        if listeners.iter().any(|l: &Listener| l.listen == listen) {
            return Err(at(rl.listen.span(), format!("{listen} is listed twice")));
        }
        if rl.routes.is_empty() {
            return Err(at(
                rl.listen.span(),
                format!("listener {listen} has no [[listener.route]]"),
            ));
        }
        if rl.routes.len() > MAX_ROUTES {
            return Err(at(
                rl.routes[MAX_ROUTES].service.span(),
                format!(
                    "listener {listen} has {} routes: at most {MAX_ROUTES}",
                    rl.routes.len()
                ),
            ));
        }
        let mut routes = Vec::new();
        for r in &rl.routes {
            let prefix = r.path_prefix.get_ref();
            if !prefix.starts_with('/') || prefix.len() > 1024 {
                return Err(at(
                    r.path_prefix.span(),
                    format!(
                        "listener.route.path_prefix = {prefix:?}: must start with / and be at \
                         most 1024 bytes"
                    ),
                ));
            }
            let host = r.host.get_ref().trim().to_ascii_lowercase();
            if host.is_empty() || host.len() > 253 || host.contains([' ', '/']) {
                return Err(at(
                    r.host.span(),
                    format!(
                        "listener.route.host = {:?}: must be a host name (at most 253 bytes) or *",
                        r.host.get_ref()
                    ),
                ));
            }
            let route = Route {
                host,
                path_prefix: prefix.clone(),
                service: service(&r.service, "listener.route.service")?,
            };
            if routes
                .iter()
                .any(|x: &Route| x.host == route.host && x.path_prefix == route.path_prefix)
            {
                return Err(at(
                    r.path_prefix.span(),
                    "the same host and path_prefix are routed twice".into(),
                ));
            }
            routes.push(route);
        }
        listeners.push(Listener {
            listen,
            shared: rl.shared,
            routes,
        });
    }

    Ok(Config {
        instance,
        instance_set_at,
        workers: workers as usize,
        buffers: buffers as u16,
        buffer_size,
        max_connections: max_connections as usize,
        metrics,
        timeouts,
        limits,
        drain_window,
        service_drain,
        drain_unhealthy,
        outlier,
        listeners,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_parses() {
        let c = parse(DEFAULT, "default").unwrap();
        assert_eq!(c.instance, "default");
        assert_eq!(c.listeners.len(), 1);
        assert_eq!(c.listeners[0].listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.timeouts.idle, Duration::from_secs(300));
        assert_eq!(c.timeouts.ping_interval, None);
        assert_eq!(c.drain_window, Duration::from_secs(30));
        assert_eq!(c.metrics, Some("127.0.0.1:9100".parse().unwrap()));
        assert!(c.drain_unhealthy.is_empty(), "unhealthy: stay by default");
        assert_eq!(
            c.outlier,
            Outlier {
                consecutive: 5,
                base_ejection: Duration::from_secs(10),
                max_ejection: Duration::from_secs(300),
                max_ejected_percent: 50,
            }
        );
    }

    #[test]
    fn services_set_a_drain_window_and_drain_unhealthy_apart() {
        let text = DEFAULT.replace(
            "# Per-service overrides:",
            "[[service]]\naddress = \"198.19.0.2:80\"\ndrain_unhealthy = true\n\
             [[service]]\naddress = \"198.19.0.3:80\"\ndrain_window = \"5s\"\n\
             drain_unhealthy = false\n",
        );
        let c = parse(&text, "t").unwrap();
        assert_eq!(c.drain_unhealthy, ["198.19.0.2:80".parse().unwrap()]);
        assert_eq!(
            c.service_drain,
            [("198.19.0.3:80".parse().unwrap(), Duration::from_secs(5))]
        );
    }

    #[test]
    fn outlier_detection_can_be_off_and_unknown_keys_are_refused() {
        let c = parse(&format!("{MIN}[outlier]\nconsecutive = 0\n"), "weir.toml").unwrap();
        assert_eq!(c.outlier.consecutive, 0);
        let c = parse(
            &format!("{MIN}[outlier]\nbase_ejection = \"1s\"\nmax_ejection = \"1s\"\n"),
            "weir.toml",
        )
        .unwrap();
        assert_eq!(
            c.outlier.max_ejection,
            Duration::from_secs(1),
            "max may equal base"
        );
        let e = err(&format!(
            "{MIN}[outlier]\nconsecutive = 5\ninterval = \"1s\"\n"
        ));
        assert_eq!(e.line, 7, "{e}");
        assert!(e.reason.contains("interval"), "{e}");
        let e = err(&format!("{MIN}[outlier]\nconsecutive = -1\n"));
        assert_eq!(e.line, 6, "{e}");
    }

    /// Every key with a range: the error names the key, the value, the
    /// range and the line.
    #[test]
    fn every_value_is_bounded() {
        let cases: &[(&str, &str)] = &[
            (
                "[runtime]\nworkers = 100000\n",
                "runtime.workers = 100000: must be 0..=1024",
            ),
            (
                "[runtime]\nworkers = 12000\n",
                "runtime.workers = 12000: must be 0..=1024",
            ),
            (
                "[runtime]\nmax_connections = 0\n",
                "runtime.max_connections = 0: must be 1..=1048576",
            ),
            (
                "[runtime]\nmax_connections = 99999999999\n",
                "runtime.max_connections = 99999999999: must be 1..=1048576",
            ),
            (
                "[runtime]\nbuffers = 1000\n",
                "runtime.buffers = 1000: must be a power of two",
            ),
            (
                "[runtime]\nbuffer_size = 512\n",
                "runtime.buffer_size = 512: must be 1024..=1048576",
            ),
            (
                "[runtime]\nbuffers = 32768\nbuffer_size = 1048576\n",
                "runtime.buffers × runtime.buffer_size = 32768 MiB per worker: must be at most 1024 MiB",
            ),
            (
                "[timeouts]\nidle = \"25h\"\n",
                "timeouts.idle = \"25h\": must be from 1ms to 24h",
            ),
            (
                "[timeouts]\nconnect = \"0s\"\n",
                "timeouts.connect = \"0s\": must be from 1ms to 24h",
            ),
            (
                "[timeouts]\nshutdown = \"99999h\"\n",
                "timeouts.shutdown = \"99999h\": must be from 0s to 24h",
            ),
            (
                "[drain]\nwindow = \"48h\"\n",
                "drain.window = \"48h\": must be from 0s to 24h",
            ),
            (
                "[[service]]\naddress = \"127.0.0.1:8080\"\n",
                "[[service]] 127.0.0.1:8080 sets nothing: give it drain_window and/or drain_unhealthy",
            ),
            (
                "[[service]]\naddress = \"127.0.0.1:8080\"\ndrain_unhealthy = \"yes\"\n",
                "invalid type: string \"yes\", expected a boolean",
            ),
            (
                "[timeouts]\nping_interval = \"1ms\"\n",
                "timeouts.ping_interval = \"1ms\": must be 0s (off) or from 100ms to 24h",
            ),
            (
                "[limits]\nmax_frame = 0\n",
                "limits.max_frame = 0: must be 1..=1073741824",
            ),
            (
                "[limits]\nmax_message = 2000000000\n",
                "limits.max_message = 2000000000: must be from limits.max_frame",
            ),
            (
                "[limits]\nmax_headers = 1000\n",
                "limits.max_headers = 1000: must be 8..=256",
            ),
            (
                "[limits]\nmax_head_bytes = 1\n",
                "limits.max_head_bytes = 1: must be 512..=65536",
            ),
            (
                "[outlier]\nconsecutive = 1001\n",
                "outlier.consecutive = 1001: must be 0..=1000 (0: off)",
            ),
            (
                "[outlier]\nbase_ejection = \"0s\"\n",
                "outlier.base_ejection = \"0s\": must be from 1ms to 24h",
            ),
            (
                "[outlier]\nbase_ejection = \"1m\"\nmax_ejection = \"30s\"\n",
                "outlier.max_ejection = \"30s\": must be from 60s to 24h (from outlier.base_ejection = \"1m\")",
            ),
            (
                "[outlier]\nmax_ejection = \"2d\"\n",
                "outlier.max_ejection: \"2d\": the unit must be",
            ),
            (
                "[outlier]\nmax_ejected_percent = 101\n",
                "outlier.max_ejected_percent = 101: must be 0..=100",
            ),
        ];
        for (table, want) in cases {
            let e = err(&format!("{MIN}{table}"));
            assert!(e.reason.contains(want), "{table}: {e}");
            let line = MIN.lines().count() + table.lines().count();
            assert_eq!(e.line, line, "{table}: {e}");
            assert!(
                e.to_string().starts_with(&format!("weir.toml:{line}:")),
                "{e}"
            );
        }
        let many: String = (0..=MAX_LISTENERS)
            .map(|i| {
                format!(
                    "[[listener]]\nlisten = \"127.0.0.1:{}\"\n[[listener.route]]\nservice = \"198.19.0.1:80\"\n",
                    1000 + i
                )
            })
            .collect();
        assert!(err(&many).reason.contains("at most 64"));
        let ok = parse(
            &format!("{MIN}[runtime]\nworkers = 1024\nmax_connections = 1048576\n[timeouts]\nidle = \"24h\"\nshutdown = \"0s\"\n"),
            "weir.toml",
        )
        .unwrap();
        assert_eq!((ok.workers, ok.max_connections), (1024, 1 << 20));
    }

    #[test]
    fn keys_in_range_are_also_bounded_together() {
        let listeners: String = (0..8)
            .map(|i| {
                format!(
                    "[[listener]]\nlisten = \"127.0.0.1:{}\"\n[[listener.route]]\nservice = \"198.19.0.1:80\"\n",
                    2000 + i
                )
            })
            .collect();
        let e = err(&format!("[runtime]\nworkers = 1024\n{listeners}"));
        assert!(
            e.reason
                .contains("runtime.workers (1024) × 8 [[listener]] tables = 8192"),
            "{e}"
        );
        assert_eq!(e.line, 2, "{e}");
        let e = err(&format!("{MIN}[runtime]\nworkers = 1024\nbuffers = 8192\n"));
        assert!(e.reason.contains("= 131072 MiB of receive buffers"), "{e}");
        assert!(
            parse(
                &format!("[runtime]\nworkers = 512\n{listeners}"),
                "weir.toml"
            )
            .is_ok()
        );
    }

    #[test]
    fn the_instance_key_is_known_to_be_set() {
        assert_eq!(parse(MIN, "weir.toml").unwrap().instance_set_at, None);
        let c = parse(&format!("instance = \"x\"\n{MIN}"), "weir.toml").unwrap();
        assert_eq!(c.instance, "x");
        assert_eq!(c.instance_set_at.as_deref(), Some("weir.toml:1"));
    }

    fn err(text: &str) -> ConfigError {
        parse(text, "weir.toml").expect_err("should be refused")
    }

    const MIN: &str = "[[listener]]\nlisten = \"127.0.0.1:8080\"\n[[listener.route]]\nservice = \"198.19.0.10:8080\"\n";

    #[test]
    fn a_minimal_file_gets_the_defaults() {
        let c = parse(MIN, "weir.toml").unwrap();
        let d = parse(DEFAULT, "default").unwrap();
        assert_eq!(c.timeouts, d.timeouts);
        assert_eq!(c.limits, d.limits);
        assert_eq!(c.outlier, d.outlier);
        assert_eq!(c.listeners[0].routes[0].host, "*");
        assert_eq!(c.metrics, None);
    }

    #[test]
    fn errors_name_file_line_and_reason() {
        let e = err(&format!("{MIN}[timeouts]\nidle = \"5 minutes\"\n"));
        assert_eq!((e.line, e.source_name.as_str()), (6, "weir.toml"), "{e}");
        assert!(e.to_string().starts_with("weir.toml:6:"), "{e}");
        assert!(e.reason.contains("unit"), "{e}");

        let e = err(&format!("{MIN}[runtime]\nbuffers = 1000\n"));
        assert_eq!(e.line, 6, "{e}");
        assert!(e.reason.contains("power of two"));

        let e = err(&format!("{MIN}[runtme]\n"));
        assert_eq!(e.line, 5, "unknown table: {e}");

        let e = err(
            "[[listener]]\nlisten = \"localhost:80\"\n[[listener.route]]\nservice = \"198.19.0.10:8080\"\n",
        );
        assert_eq!(e.line, 2, "{e}");
        assert!(e.reason.contains("IP:PORT"));

        let e = err(
            "[[listener]]\nlisten = \"127.0.0.1:80\"\n[[listener.route]]\nservice = \"198.19.0.10\"\n",
        );
        assert_eq!(e.line, 4, "{e}");

        let e = err(
            "[[listener]]\nlisten = \"127.0.0.1:80\"\n[[listener.route]]\npath_prefix = \"chat\"\nservice = \"198.19.0.10:80\"\n",
        );
        assert_eq!(e.line, 4, "{e}");

        let e = err(
            "instance = \"../x\"\n[[listener]]\nlisten = \"127.0.0.1:80\"\n[[listener.route]]\nservice = \"198.19.0.10:80\"\n",
        );
        assert_eq!(e.line, 1, "{e}");

        let e = err(&format!(
            "{MIN}[limits]\nmax_frame = 100\nmax_message = 10\n"
        ));
        assert_eq!(e.line, 7, "{e}");

        let e = err("listener = 5\n");
        assert_eq!(e.line, 1, "{e}");

        assert!(
            err("[metrics]\nlisten = \"127.0.0.1:9100\"\n")
                .reason
                .contains("listener")
        );
        assert!(
            err(&format!("{MIN}[timeouts]\nconnect = \"0s\"\n"))
                .reason
                .contains("from 1ms")
        );
    }

    #[test]
    fn routes_prefer_exact_hosts_and_longer_prefixes() {
        let text = r#"
[[listener]]
listen = "127.0.0.1:8080"
[[listener.route]]
service = "198.19.0.1:80"
[[listener.route]]
path_prefix = "/chat"
service = "198.19.0.2:80"
[[listener.route]]
host = "Admin.Example"
service = "198.19.0.3:80"
[[listener.route]]
host = "admin.example"
path_prefix = "/chat/room"
service = "198.19.0.4:80"
"#;
        let c = parse(text, "t").unwrap();
        let l = &c.listeners[0];
        let svc = |h, p| l.route(h, p).map(|s| s.vip.octets()[3]);
        assert_eq!(svc("app", "/"), Some(1));
        assert_eq!(svc("app", "/chat/x"), Some(2));
        assert_eq!(
            svc("admin.example", "/chat/x"),
            Some(3),
            "exact host beats a longer * prefix"
        );
        assert_eq!(svc("ADMIN.example:8080", "/chat/room/1"), Some(4));
        assert_eq!(svc("admin.example", "/"), Some(3));
        let only_chat = parse(
            "[[listener]]\nlisten = \"127.0.0.1:1\"\n[[listener.route]]\npath_prefix = \"/chat\"\nservice = \"198.19.0.2:80\"\n",
            "t",
        )
        .unwrap();
        assert_eq!(
            only_chat.listeners[0].route("x", "/other"),
            None,
            "no route: 404"
        );
    }

    #[test]
    fn prefixes_match_whole_segments() {
        let c = parse(
            "[[listener]]\nlisten = \"127.0.0.1:1\"\n[[listener.route]]\npath_prefix = \"/chat\"\nservice = \"198.19.0.2:80\"\n[[listener.route]]\npath_prefix = \"/api/\"\nservice = \"198.19.0.3:80\"\n",
            "t",
        )
        .unwrap();
        let svc = |p| c.listeners[0].route("x", p).map(|s| s.vip.octets()[3]);
        for (path, want) in [
            ("/chat", Some(2)),
            ("/chat/", Some(2)),
            ("/chat/room", Some(2)),
            ("/chat?x=1", Some(2)),
            ("/chatroom", None),
            ("/chat.html", None),
            ("/api/", Some(3)),
            ("/api/v1", Some(3)),
            ("/api", None),
            ("/apiv1", None),
        ] {
            assert_eq!(svc(path), want, "{path}");
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,300}") {
            let _ = parse(&text, "fuzz");
        }
    }
}
