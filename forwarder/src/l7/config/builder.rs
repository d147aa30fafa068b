//! Writes `weir run` configuration files through the very tables [`parse`]
//! reads, so that tests and the bench cannot drift from the parser: a key
//! renamed there renames here, and a field removed there fails to compile
//! here.
//!
//! [`parse`]: super::parse

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use toml::Spanned;

use super::{Outlier, RawConfig, RawListener, RawRoute, RawService, any_host};

/// A keepalive or deadline of the `[timeouts]` table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timeout {
    ClientHead,
    Connect,
    BackendHead,
    Idle,
    PingInterval,
    Close,
    Shutdown,
    Takeover,
}

/// A configuration file under construction; [`fmt::Display`] gives its
/// TOML. Unset keys are written with the parser's own defaults.
#[derive(Default)]
pub struct ConfigBuilder {
    raw: RawConfig,
}

fn spanned<T>(value: T) -> Spanned<T> {
    Spanned::new(0..0, value)
}

/// A duration as the parser reads it, exactly (`1500ms`, `0.000250000s`).
fn duration_text(d: Duration) -> String {
    if d.subsec_nanos().is_multiple_of(1_000_000) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}.{:09}s", d.as_secs(), d.subsec_nanos())
    }
}

impl ConfigBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// The `instance` key (else `--instance` or `default` decides).
    pub fn instance(mut self, name: &str) -> Self {
        self.raw.instance = Some(spanned(name.to_string()));
        self
    }

    pub fn workers(mut self, n: u64) -> Self {
        self.raw.runtime.workers = spanned(n);
        self
    }

    pub fn buffers(mut self, n: u32) -> Self {
        self.raw.runtime.buffers = spanned(n);
        self
    }

    pub fn max_connections(mut self, n: u64) -> Self {
        self.raw.runtime.max_connections = spanned(n);
        self
    }

    pub fn metrics(mut self, listen: SocketAddr) -> Self {
        self.raw.metrics.listen = Some(spanned(listen.to_string()));
        self
    }

    pub fn timeout(mut self, which: Timeout, d: Duration) -> Self {
        let t = &mut self.raw.timeouts;
        let key = match which {
            Timeout::ClientHead => &mut t.client_head,
            Timeout::Connect => &mut t.connect,
            Timeout::BackendHead => &mut t.backend_head,
            Timeout::Idle => &mut t.idle,
            Timeout::PingInterval => &mut t.ping_interval,
            Timeout::Close => &mut t.close,
            Timeout::Shutdown => &mut t.shutdown,
            Timeout::Takeover => &mut t.takeover,
        };
        *key = spanned(duration_text(d));
        self
    }

    /// The frame and message size limits (a message takes one frame or
    /// more, so the parser wants `max_message >= max_frame`).
    pub fn frame_limits(mut self, max_frame: u64, max_message: u64) -> Self {
        let l = &mut self.raw.limits;
        (l.max_frame, l.max_message) = (spanned(max_frame), spanned(max_message));
        self
    }

    /// The global drain window.
    pub fn drain_window(mut self, d: Duration) -> Self {
        self.raw.drain.window = Some(spanned(duration_text(d)));
        self
    }

    /// A `[[service]]` table: this service's own drain window.
    pub fn service_drain(mut self, service: impl fmt::Display, d: Duration) -> Self {
        self.raw.services.push(RawService {
            address: spanned(service.to_string()),
            drain_window: Some(spanned(duration_text(d))),
            drain_unhealthy: None,
        });
        self
    }

    /// A `[[service]]` table: drain connections to backends found
    /// unhealthy.
    pub fn drain_unhealthy(mut self, service: impl fmt::Display) -> Self {
        self.raw.services.push(RawService {
            address: spanned(service.to_string()),
            drain_window: None,
            drain_unhealthy: Some(true),
        });
        self
    }

    /// The `[outlier]` table.
    pub fn outlier(mut self, outlier: Outlier) -> Self {
        let o = &mut self.raw.outlier;
        o.consecutive = spanned(u64::from(outlier.consecutive));
        o.base_ejection = spanned(duration_text(outlier.base_ejection));
        o.max_ejection = spanned(duration_text(outlier.max_ejection));
        o.max_ejected_percent = spanned(u64::from(outlier.max_ejected_percent));
        self
    }

    /// A `[[listener]]` table; [`ConfigBuilder::route`] and
    /// [`ConfigBuilder::shared`] apply to the latest one.
    pub fn listener(mut self, listen: SocketAddr) -> Self {
        self.raw.listeners.push(RawListener {
            listen: spanned(listen.to_string()),
            shared: false,
            routes: Vec::new(),
        });
        self
    }

    /// Lets other processes serve the latest listener's address too.
    pub fn shared(mut self, shared: bool) -> Self {
        self.latest_listener().shared = shared;
        self
    }

    /// Routes requests for any host under `path_prefix` to `service`.
    pub fn route(mut self, path_prefix: &str, service: impl fmt::Display) -> Self {
        self.latest_listener().routes.push(RawRoute {
            host: any_host(),
            path_prefix: spanned(path_prefix.to_string()),
            service: spanned(service.to_string()),
        });
        self
    }

    fn latest_listener(&mut self) -> &mut RawListener {
        self.raw
            .listeners
            .last_mut()
            .expect("a route or `shared` comes after the listener() it belongs to")
    }
}

impl fmt::Display for ConfigBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&toml::to_string(&self.raw).map_err(|_| fmt::Error)?)
    }
}

#[cfg(test)]
mod tests {
    use super::super::parse;
    use super::*;

    /// What the builder writes, the parser reads back as meant.
    #[test]
    fn a_built_file_parses_to_what_was_built() {
        let text = ConfigBuilder::new()
            .instance("built")
            .workers(2)
            .buffers(64)
            .max_connections(7)
            .metrics("127.0.0.1:9101".parse().unwrap())
            .timeout(Timeout::Shutdown, Duration::from_millis(1500))
            .timeout(Timeout::PingInterval, Duration::from_micros(250_500))
            .frame_limits(1 << 20, 2 << 20)
            .drain_window(Duration::from_secs(3))
            .service_drain("198.19.0.2:80", Duration::from_millis(500))
            .outlier(Outlier {
                consecutive: 3,
                base_ejection: Duration::from_millis(1500),
                max_ejection: Duration::from_secs(4),
                max_ejected_percent: 34,
            })
            .listener("127.0.0.1:8080".parse().unwrap())
            .route("/", "198.19.0.1:80")
            .route("/chat", "198.19.0.2:80")
            .listener("127.0.0.1:8081".parse().unwrap())
            .shared(true)
            .route("/", "198.19.0.3:80")
            .to_string();
        let c = parse(&text, "built.toml").unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(c.instance, "built");
        assert_eq!(c.instance_set_at.as_deref(), Some("built.toml:1"));
        assert_eq!((c.workers, c.buffers, c.max_connections), (2, 64, 7));
        assert_eq!(c.metrics, Some("127.0.0.1:9101".parse().unwrap()));
        assert_eq!(c.timeouts.shutdown, Duration::from_millis(1500));
        assert_eq!(
            c.timeouts.ping_interval,
            Some(Duration::from_micros(250_500))
        );
        assert_eq!(
            (c.limits.max_frame, c.limits.max_message),
            (1 << 20, 2 << 20)
        );
        assert_eq!(c.drain_window, Duration::from_secs(3));
        assert_eq!(c.service_drain.len(), 1);
        assert_eq!(c.service_drain[0].1, Duration::from_millis(500));
        assert_eq!(
            c.outlier,
            Outlier {
                consecutive: 3,
                base_ejection: Duration::from_millis(1500),
                max_ejection: Duration::from_secs(4),
                max_ejected_percent: 34,
            }
        );
        assert_eq!(c.listeners.len(), 2);
        assert!(!c.listeners[0].shared && c.listeners[1].shared);
        let svc = |l: usize, p| c.listeners[l].route("x", p).map(|s| s.to_string());
        assert_eq!(svc(0, "/chat/1").as_deref(), Some("198.19.0.2:80"));
        assert_eq!(svc(0, "/other").as_deref(), Some("198.19.0.1:80"));
        assert_eq!(svc(1, "/").as_deref(), Some("198.19.0.3:80"));
    }

    /// Keys left alone keep the parser's defaults.
    #[test]
    fn unset_keys_are_the_defaults() {
        let text = ConfigBuilder::new()
            .listener("127.0.0.1:8080".parse().unwrap())
            .route("/", "127.0.0.1:8080")
            .to_string();
        let built = parse(&text, "built.toml").unwrap();
        let default = parse(super::super::DEFAULT, "default").unwrap();
        assert_eq!(built.instance_set_at, None);
        assert_eq!(built.timeouts, default.timeouts);
        assert_eq!(built.limits, default.limits);
        assert_eq!(built.drain_window, default.drain_window);
        assert_eq!(built.outlier, default.outlier);
        assert_eq!(built.listeners, default.listeners);
    }
}
