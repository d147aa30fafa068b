//! The `weir agent` configuration (TOML). With no file, the agent runs on
//! [`DEFAULT`] (`weir config default --agent` prints it). A bad file is
//! refused at start with the file, the line and the reason, like `weir
//! run`'s; the metrics address is bound at start too, so a taken or foreign
//! address is refused at its line, not discovered later.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::config_file::{self, ConfigError, Source};
use crate::discovery::etcd::EtcdConfig;
use crate::health::probe::Check;
use crate::registry::ServiceAddr;

/// The embedded default: a WebSocket check of the backends of the L7
/// service `weir run`'s default configuration routes to.
pub const DEFAULT: &str = r#"# weir agent: the embedded default configuration.
# The agent checks the active backends of the registry services named in the
# [[check]] tables and writes their health through the registry (a backend
# leaves the ring while unhealthy). It also frees removed backends once no
# flow or connection uses them. Durations take ms, s, m or h suffixes.
instance = "default"

[metrics]
listen = "127.0.0.1:9101"  # Prometheus text at /metrics; bound at start

[collect]
interval = "1s"            # how often removed backends nothing uses are freed (100ms..24h)

[[check]]
service = "127.0.0.1:8080" # a registry service, VIP:PORT; one [[check]] per service
type = "websocket"         # tcp: connect; http: GET path, expect_status;
                           # websocket: upgrade, ping, pong, close
path = "/"                 # http and websocket: the request target; starts with /
# host = "app.example"     # http and websocket: the Host header (default: the address checked)
# expect_status = 200      # http only (default 200)
interval = "1s"            # between checks of one backend (100ms..24h)
jitter = "10%"             # up to this much more per interval, at random: a share or a duration
timeout = "500ms"          # one check, connect included; at most the interval
rise = 2                   # consecutive passes that make a backend healthy (1..=100)
fall = 2                   # consecutive failures that make it unhealthy (1..=100)

# [[source]]               # backend sets from a watched file (TOML, or JSON by
# type = "file"            # extension), applied whole through the registry on
# path = "/etc/weir/backends.toml"  # each change; absolute, its directory must exist

# [[source]]               # backend sets from an etcd v3 key prefix, read at a
# type = "etcd"            # revision, then watched; keys: services/<VIP:PORT> = {},
# endpoints = ["http://127.0.0.1:2379"]  # backends/<VIP:PORT>/<ADDR[:PORT]> = {"weight": 3}
# prefix = "/weir/default/"  # starts and ends with '/'
"#;

/// The shortest check and collect interval: anything shorter floods
/// backends with connections rather than watching them.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// The most consecutive results `rise` and `fall` may ask for.
pub const MAX_RUN: u64 = 100;

/// The validated configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub instance: String,
    /// `FILE:LINE` of the `instance` key when the file sets it.
    pub instance_set_at: Option<String>,
    pub metrics: Option<MetricsListen>,
    pub collect_interval: Duration,
    pub checks: Vec<CheckConfig>,
    /// Where backend sets come from, besides the command line.
    pub sources: Vec<SourceConfig>,
}

/// One `[[source]]`: a discovery source the agent applies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceConfig {
    /// A watched TOML or JSON file ([`crate::discovery::file`]).
    File { path: PathBuf },
    /// An etcd v3 key prefix ([`crate::discovery::etcd`]).
    Etcd(EtcdConfig),
}

/// Where `/metrics` listens, and where the file says so.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsListen {
    pub addr: SocketAddr,
    source_name: String,
    line: usize,
    column: usize,
}

impl MetricsListen {
    /// Binds the address; a failure is refused at its line in the file.
    pub fn bind(&self) -> Result<TcpListener, ConfigError> {
        TcpListener::bind(self.addr).map_err(|e| ConfigError {
            source_name: self.source_name.clone(),
            line: self.line,
            column: self.column,
            reason: format!(
                "metrics.listen = \"{}\": cannot listen there: {e}",
                self.addr
            ),
        })
    }
}

/// The checks of one service's backends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckConfig {
    pub service: ServiceAddr,
    pub check: Check,
    pub interval: Duration,
    /// Each next check comes up to this much later than `interval`, at
    /// random, so checks of many backends do not stay in step.
    pub jitter: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    instance: Option<toml::Spanned<String>>,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    collect: RawCollect,
    #[serde(default, rename = "check")]
    checks: Vec<RawCheck>,
    #[serde(default, rename = "source")]
    sources: Vec<RawSource>,
}

/// Every type's keys in one table; each type refuses the keys it does not
/// take.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    #[serde(rename = "type")]
    kind: toml::Spanned<String>,
    path: Option<toml::Spanned<String>>,
    endpoints: Option<toml::Spanned<Vec<String>>>,
    prefix: Option<toml::Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<toml::Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCollect {
    interval: Option<toml::Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    service: toml::Spanned<String>,
    #[serde(rename = "type")]
    kind: toml::Spanned<String>,
    path: Option<toml::Spanned<String>>,
    host: Option<toml::Spanned<String>>,
    expect_status: Option<toml::Spanned<u64>>,
    interval: Option<toml::Spanned<String>>,
    jitter: Option<toml::Spanned<String>>,
    timeout: Option<toml::Spanned<String>>,
    rise: Option<toml::Spanned<u64>>,
    fall: Option<toml::Spanned<u64>>,
}

/// Reads and validates a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    parse(&config_file::read(path)?, &path.display().to_string())
}

/// Parses and validates configuration text; `name` appears in errors.
pub fn parse(text: &str, name: &str) -> Result<Config, ConfigError> {
    let src = Source::new(text, name);
    let raw: RawConfig = src.parse()?;
    let (instance, instance_set_at) = match &raw.instance {
        Some(i) => (src.instance(i)?, Some(src.place(i.span()))),
        None => ("default".to_string(), None),
    };
    let metrics = match &raw.metrics.listen {
        Some(l) => {
            let addr = src.addr(l, "metrics.listen")?;
            let at = src.error(l.span(), String::new());
            Some(MetricsListen {
                addr,
                source_name: at.source_name,
                line: at.line,
                column: at.column,
            })
        }
        None => None,
    };
    let collect_interval = match &raw.collect.interval {
        Some(i) => src.duration(i, "collect.interval", MIN_INTERVAL)?,
        None => Duration::from_secs(1),
    };
    let mut checks: Vec<CheckConfig> = Vec::new();
    let mut places: Vec<String> = Vec::new();
    for rc in &raw.checks {
        let check = check(&src, rc)?;
        if let Some(i) = checks.iter().position(|c| c.service == check.service) {
            return Err(src.error(
                rc.service.span(),
                format!(
                    "check.service = \"{}\": checked already by the [[check]] at {}; one \
                     [[check]] per service",
                    check.service, places[i]
                ),
            ));
        }
        places.push(src.place(rc.service.span()));
        checks.push(check);
    }
    let mut sources: Vec<SourceConfig> = Vec::new();
    for rs in &raw.sources {
        let source = source(&src, rs)?;
        if sources.contains(&source) {
            return Err(src.error(
                rs.kind.span(),
                "source: listed twice; one [[source]] per file".into(),
            ));
        }
        sources.push(source);
    }
    Ok(Config {
        instance,
        instance_set_at,
        metrics,
        collect_interval,
        checks,
        sources,
    })
}

fn source(src: &Source, rs: &RawSource) -> Result<SourceConfig, ConfigError> {
    match rs.kind.get_ref().as_str() {
        "file" => {
            for (key, span) in [
                ("endpoints", rs.endpoints.as_ref().map(|e| e.span())),
                ("prefix", rs.prefix.as_ref().map(|p| p.span())),
            ] {
                if let Some(span) = span {
                    return Err(
                        src.error(span, format!("source.{key}: a file source takes only path"))
                    );
                }
            }
            let Some(path) = &rs.path else {
                return Err(src.error(
                    rs.kind.span(),
                    "source: a file source needs path = \"/etc/weir/backends.toml\"".into(),
                ));
            };
            let p = Path::new(path.get_ref());
            if !p.is_absolute() || p.file_name().is_none() {
                return Err(src.error(
                    path.span(),
                    format!(
                        "source.path = {:?}: must be an absolute path to a file",
                        path.get_ref()
                    ),
                ));
            }
            Ok(SourceConfig::File { path: p.into() })
        }
        "etcd" => etcd_source(src, rs),
        other => Err(src.error(
            rs.kind.span(),
            format!("source.type = {other:?}: must be \"file\" or \"etcd\""),
        )),
    }
}

/// `type = "etcd"`: plain-HTTP client URLs of the cluster's members and the
/// instance's key prefix.
fn etcd_source(src: &Source, rs: &RawSource) -> Result<SourceConfig, ConfigError> {
    if let Some(path) = &rs.path {
        return Err(src.error(
            path.span(),
            "source.path: an etcd source takes endpoints and prefix".into(),
        ));
    }
    let (Some(endpoints), Some(prefix)) = (&rs.endpoints, &rs.prefix) else {
        return Err(src.error(
            rs.kind.span(),
            "source: an etcd source needs endpoints = [\"http://127.0.0.1:2379\"] and \
             prefix = \"/weir/<instance>/\""
                .into(),
        ));
    };
    if endpoints.get_ref().is_empty() {
        return Err(src.error(endpoints.span(), "source.endpoints: empty".into()));
    }
    if let Some(bad) = endpoints
        .get_ref()
        .iter()
        .find(|e| !e.starts_with("http://"))
    {
        return Err(src.error(
            endpoints.span(),
            format!("source.endpoints: {bad:?} is not an http:// URL (TLS is not supported)"),
        ));
    }
    let p = prefix.get_ref();
    if !p.starts_with('/') || !p.ends_with('/') {
        // Ending in '/' keeps "/weir/a/" from also reading "/weir/ab/".
        return Err(src.error(
            prefix.span(),
            format!("source.prefix = {p:?}: must start and end with '/'"),
        ));
    }
    Ok(SourceConfig::Etcd(EtcdConfig {
        endpoints: endpoints.get_ref().clone(),
        prefix: p.clone(),
    }))
}

fn check(src: &Source, rc: &RawCheck) -> Result<CheckConfig, ConfigError> {
    let service = src.service(&rc.service, "check.service")?;
    let kind = rc.kind.get_ref().as_str();
    let takes_path = matches!(kind, "http" | "websocket");
    let unused = |key: &str, span: std::ops::Range<usize>, who: &str| {
        src.error(
            span,
            format!("check.{key}: a {kind} check takes none (only {who} checks do)"),
        )
    };
    if !takes_path {
        if let Some(p) = &rc.path {
            return Err(unused("path", p.span(), "http and websocket"));
        }
        if let Some(h) = &rc.host {
            return Err(unused("host", h.span(), "http and websocket"));
        }
    }
    if kind != "http"
        && let Some(s) = &rc.expect_status
    {
        return Err(unused("expect_status", s.span(), "http"));
    }
    let path = match &rc.path {
        Some(p) => {
            let path = p.get_ref();
            let printable = path.bytes().all(|b| b.is_ascii_graphic());
            if !path.starts_with('/') || !printable || path.len() > 1024 {
                return Err(src.error(
                    p.span(),
                    format!(
                        "check.path = {path:?}: must start with / and be at most 1024 printable \
                         ASCII bytes without spaces"
                    ),
                ));
            }
            path.clone()
        }
        None => "/".into(),
    };
    let host = match &rc.host {
        Some(h) => {
            let host = h.get_ref();
            if host.is_empty() || host.len() > 261 || !host.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(src.error(
                    h.span(),
                    format!(
                        "check.host = {host:?}: must be a host name or address, optionally with \
                         :PORT (printable ASCII, at most 261 bytes)"
                    ),
                ));
            }
            Some(host.clone())
        }
        None => None,
    };
    let check = match kind {
        "tcp" => Check::Tcp,
        "http" => Check::Http {
            path,
            host,
            expect_status: match &rc.expect_status {
                Some(s) => src.range(s, "check.expect_status", 100, 599, "")? as u16,
                None => 200,
            },
        },
        "websocket" => Check::WebSocket { path, host },
        other => {
            return Err(src.error(
                rc.kind.span(),
                format!("check.type = {other:?}: must be tcp, http or websocket"),
            ));
        }
    };
    let interval = match &rc.interval {
        Some(i) => src.duration(i, "check.interval", MIN_INTERVAL)?,
        None => Duration::from_secs(1),
    };
    let jitter = match &rc.jitter {
        Some(j) => jitter(src, j, interval)?,
        None => interval / 10,
    };
    let timeout = match &rc.timeout {
        Some(t) => {
            let timeout = src.duration(t, "check.timeout", Duration::from_millis(1))?;
            if timeout > interval {
                return Err(src.error(
                    t.span(),
                    format!(
                        "check.timeout = {:?}: must be at most check.interval ({interval:?}): \
                         a backend is checked once at a time",
                        t.get_ref()
                    ),
                ));
            }
            timeout
        }
        None => (interval / 2).min(Duration::from_secs(5)),
    };
    let run = |v: &Option<toml::Spanned<u64>>, key: &str| match v {
        Some(v) => src.range(v, key, 1, MAX_RUN, "").map(|n| n as u32),
        None => Ok(2),
    };
    Ok(CheckConfig {
        service,
        check,
        interval,
        jitter,
        timeout,
        rise: run(&rc.rise, "check.rise")?,
        fall: run(&rc.fall, "check.fall")?,
    })
}

/// `jitter`: a share of the interval (`"10%"`, 0 to 100) or a duration up
/// to the interval.
fn jitter(
    src: &Source,
    j: &toml::Spanned<String>,
    interval: Duration,
) -> Result<Duration, ConfigError> {
    let text = j.get_ref().trim();
    if let Some(percent) = text.strip_suffix('%') {
        return match percent.trim().parse::<u32>() {
            Ok(p) if p <= 100 => Ok(interval * p / 100),
            _ => Err(src.error(
                j.span(),
                format!("check.jitter = {text:?}: a share must be 0% to 100% of check.interval"),
            )),
        };
    }
    let jitter = src.duration(j, "check.jitter", Duration::ZERO)?;
    if jitter > interval {
        return Err(src.error(
            j.span(),
            format!(
                "check.jitter = {text:?}: must be at most check.interval ({interval:?}), or a \
                 share such as \"10%\""
            ),
        ));
    }
    Ok(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> ConfigError {
        parse(text, "agent.toml").expect_err("should be refused")
    }

    const CHECK: &str = "[[check]]\nservice = \"198.18.0.1:80\"\n";

    /// A [[check]] of type `kind` with `extra` lines: the refusal is on
    /// line 4 (the first extra line) when `extra` is refused.
    fn with(kind: &str, extra: &str) -> String {
        format!("{CHECK}type = \"{kind}\"\n{extra}")
    }

    #[test]
    fn the_default_parses() {
        let c = parse(DEFAULT, "default").unwrap();
        assert_eq!(c.instance, "default");
        assert_eq!(c.metrics.unwrap().addr, "127.0.0.1:9101".parse().unwrap());
        assert_eq!(c.collect_interval, Duration::from_secs(1));
        assert_eq!(
            c.checks,
            [CheckConfig {
                service: "127.0.0.1:8080".parse().unwrap(),
                check: Check::WebSocket {
                    path: "/".into(),
                    host: None
                },
                interval: Duration::from_secs(1),
                jitter: Duration::from_millis(100),
                timeout: Duration::from_millis(500),
                rise: 2,
                fall: 2,
            }]
        );
    }

    #[test]
    fn omitted_keys_take_defaults() {
        let c = parse(&with("http", ""), "agent.toml").unwrap();
        assert_eq!(c.metrics, None);
        assert_eq!(c.instance_set_at, None);
        let k = &c.checks[0];
        assert_eq!(
            k.check,
            Check::Http {
                path: "/".into(),
                host: None,
                expect_status: 200
            }
        );
        assert_eq!(
            (k.interval, k.jitter, k.timeout, k.rise, k.fall),
            (
                Duration::from_secs(1),
                Duration::from_millis(100),
                Duration::from_millis(500),
                2,
                2
            )
        );
        let c = parse("", "agent.toml").unwrap();
        assert!(c.checks.is_empty(), "an agent may only collect");
    }

    #[test]
    fn every_kind_parses_with_its_keys() {
        let c = parse(
            &format!(
                "instance = \"edge\"\n{}\n[[check]]\nservice = \"198.18.0.2:443\"\ntype = \"tcp\"\n\
                 [[check]]\nservice = \"198.18.0.3:80\"\ntype = \"websocket\"\npath = \"/ws?probe=1\"\n",
                with(
                    "http",
                    "path = \"/healthz\"\nhost = \"app.example:8080\"\nexpect_status = 204\n\
                     interval = \"2s\"\njitter = \"250ms\"\ntimeout = \"2s\"\nrise = 3\nfall = 1\n"
                )
            ),
            "agent.toml",
        )
        .unwrap();
        assert_eq!(c.instance, "edge");
        assert_eq!(c.instance_set_at.as_deref(), Some("agent.toml:1"));
        let k = &c.checks[0];
        assert_eq!(
            k.check,
            Check::Http {
                path: "/healthz".into(),
                host: Some("app.example:8080".into()),
                expect_status: 204
            }
        );
        assert_eq!(
            (k.interval, k.jitter, k.timeout, k.rise, k.fall),
            (
                Duration::from_secs(2),
                Duration::from_millis(250),
                Duration::from_secs(2),
                3,
                1
            )
        );
        assert_eq!(c.checks[1].check, Check::Tcp);
        assert_eq!(
            c.checks[2].check,
            Check::WebSocket {
                path: "/ws?probe=1".into(),
                host: None
            }
        );
    }

    #[test]
    fn jitter_is_a_share_or_a_duration_within_the_interval() {
        let jitter = |j: &str| {
            parse(
                &with("tcp", &format!("interval = \"2s\"\njitter = \"{j}\"\n")),
                "t",
            )
            .map(|c| c.checks[0].jitter)
        };
        assert_eq!(jitter("25%").unwrap(), Duration::from_millis(500));
        assert_eq!(jitter("0%").unwrap(), Duration::ZERO);
        assert_eq!(jitter("100%").unwrap(), Duration::from_secs(2));
        assert_eq!(jitter("0s").unwrap(), Duration::ZERO);
        assert_eq!(jitter("1.5s").unwrap(), Duration::from_millis(1500));
        for bad in ["101%", "-1%", "x%", "3s", "soon"] {
            let e = jitter(bad).expect_err(bad);
            assert_eq!(e.line, 5, "{bad}: {e}");
            assert!(e.reason.starts_with("check.jitter"), "{bad}: {e}");
        }
    }

    /// Each refusal the issue names, and the others: the line of the key
    /// and a reason that names it.
    #[test]
    fn bad_checks_are_refused_at_their_line() {
        let cases: &[(&str, usize, &str)] = &[
            (
                &with("icmp", ""),
                3,
                "check.type = \"icmp\": must be tcp, http or websocket",
            ),
            (
                &with("tcp", "interval = \"0s\"\n"),
                4,
                "check.interval = \"0s\": must be from 100ms",
            ),
            (&with("tcp", "interval = \"99ms\"\n"), 4, "check.interval"),
            (
                &with("tcp", "rise = 0\n"),
                4,
                "check.rise = 0: must be 1..=100",
            ),
            (
                &with("tcp", "fall = 0\n"),
                4,
                "check.fall = 0: must be 1..=100",
            ),
            (&with("tcp", "fall = 101\n"), 4, "check.fall = 101"),
            (
                &with("http", "path = \"healthz\"\n"),
                4,
                "check.path = \"healthz\": must start with /",
            ),
            (&with("websocket", "path = \"/a b\"\n"), 4, "check.path"),
            (
                &with("http", "interval = \"1s\"\ntimeout = \"2s\"\n"),
                5,
                "check.timeout = \"2s\": must be at most check.interval",
            ),
            (
                &with("http", "timeout = \"0s\"\n"),
                4,
                "check.timeout = \"0s\": must be from 1ms",
            ),
            (
                &with("http", "expect_status = 42\n"),
                4,
                "check.expect_status = 42: must be 100..=599",
            ),
            (
                &with("tcp", "path = \"/\"\n"),
                4,
                "check.path: a tcp check takes none",
            ),
            (
                &with("tcp", "host = \"a\"\n"),
                4,
                "check.host: a tcp check takes none",
            ),
            (
                &with("websocket", "expect_status = 200\n"),
                4,
                "check.expect_status: a websocket check takes none",
            ),
            (&with("http", "host = \"a b\"\n"), 4, "check.host = \"a b\""),
            (
                &with("tcp", "intreval = \"1s\"\n"),
                4,
                "unknown field `intreval`",
            ),
            (
                "[[check]]\nservice = \"198.18.0.1\"\ntype = \"tcp\"\n",
                2,
                "check.service",
            ),
            (
                "[[check]]\nservice = \"198.18.0.1:80\"\n",
                1,
                "missing field `type`",
            ),
            (
                &format!("{}{}", with("tcp", ""), with("http", "")),
                5,
                "check.service = \"198.18.0.1:80\": checked already by the [[check]] at agent.toml:2",
            ),
            (
                "[metrics]\nlisten = \"localhost:9101\"\n",
                2,
                "metrics.listen = \"localhost:9101\": must be IP:PORT",
            ),
            (
                "[collect]\ninterval = \"0s\"\n",
                2,
                "collect.interval = \"0s\": must be from 100ms",
            ),
            ("[colect]\ninterval = \"1s\"\n", 1, "unknown field `colect`"),
            ("instance = \"../x\"\n", 1, "instance: instance name"),
        ];
        for (text, line, want) in cases {
            let e = err(text);
            assert!(e.reason.contains(want), "{text}\n-> {e}\nwant {want}");
            assert_eq!(e.line, *line, "{text}\n-> {e}");
            assert!(
                e.to_string().starts_with(&format!("agent.toml:{line}:")),
                "{e}"
            );
        }
    }

    #[test]
    fn sources_parse_and_bad_ones_are_refused_at_their_line() {
        let c = parse(
            "[[source]]\ntype = \"file\"\npath = \"/etc/weir/backends.toml\"\n",
            "agent.toml",
        )
        .unwrap();
        assert_eq!(
            c.sources,
            [SourceConfig::File {
                path: "/etc/weir/backends.toml".into()
            }]
        );
        let c = parse(
            "[[source]]\ntype = \"etcd\"\nendpoints = [\"http://10.0.0.1:2379\", \
             \"http://10.0.0.2:2379\"]\nprefix = \"/weir/default/\"\n",
            "agent.toml",
        )
        .unwrap();
        assert_eq!(
            c.sources,
            [SourceConfig::Etcd(EtcdConfig {
                endpoints: vec!["http://10.0.0.1:2379".into(), "http://10.0.0.2:2379".into()],
                prefix: "/weir/default/".into(),
            })]
        );
        for (text, line, reason) in [
            (
                "[[source]]\ntype = \"consul\"\n",
                2,
                "must be \"file\" or \"etcd\"",
            ),
            ("[[source]]\ntype = \"etcd\"\n", 2, "needs endpoints"),
            (
                "[[source]]\ntype = \"etcd\"\nendpoints = [\"https://e:2379\"]\nprefix = \"/w/\"\n",
                3,
                "not an http:// URL",
            ),
            (
                "[[source]]\ntype = \"etcd\"\nendpoints = [\"http://e:2379\"]\nprefix = \"/w\"\n",
                4,
                "start and end with '/'",
            ),
            (
                "[[source]]\ntype = \"etcd\"\npath = \"/b.toml\"\n",
                3,
                "takes endpoints and prefix",
            ),
            (
                "[[source]]\ntype = \"file\"\npath = \"/b.toml\"\nprefix = \"/w/\"\n",
                4,
                "takes only path",
            ),
            ("[[source]]\ntype = \"file\"\n", 2, "needs path"),
            (
                "[[source]]\ntype = \"file\"\npath = \"backends.toml\"\n",
                3,
                "absolute path",
            ),
            (
                "[[source]]\ntype = \"file\"\npath = \"/b.toml\"\nwatch = 1\n",
                4,
                "unknown field",
            ),
            (
                "[[source]]\ntype = \"file\"\npath = \"/b.toml\"\n\
                 [[source]]\ntype = \"file\"\npath = \"/b.toml\"\n",
                5,
                "listed twice",
            ),
        ] {
            let e = err(text);
            assert_eq!(e.line, line, "{e}");
            assert!(e.reason.contains(reason), "{e}");
        }
    }

    #[test]
    fn an_address_that_cannot_be_bound_is_refused_at_its_line() {
        // 192.0.2.1 (TEST-NET-1) is on no interface of a test host.
        let c = parse(
            "instance = \"x\"\n[metrics]\nlisten = \"192.0.2.1:9101\"\n",
            "agent.toml",
        )
        .unwrap();
        let e = c
            .metrics
            .unwrap()
            .bind()
            .expect_err("not an address of this host");
        assert_eq!((e.line, e.column), (3, 10), "{e}");
        assert!(
            e.to_string().starts_with(
                "agent.toml:3:10: metrics.listen = \"192.0.2.1:9101\": cannot listen there"
            ),
            "{e}"
        );
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let text = format!("[metrics]\nlisten = \"{}\"\n", taken.local_addr().unwrap());
        let e = parse(&text, "agent.toml")
            .unwrap()
            .metrics
            .unwrap()
            .bind()
            .unwrap_err();
        assert_eq!(e.line, 2, "{e}");
        assert!(e.reason.contains("in use"), "{e}");
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,300}") {
            let _ = parse(&text, "fuzz");
        }
    }
}
