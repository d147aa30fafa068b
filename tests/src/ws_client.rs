//! What every WebSocket load client here shares: the `ws://` URL, the
//! connect path (source address, timeout, the backend's response headers),
//! the one vocabulary for how a connection ended and the classifier that
//! maps an error onto it, the close handshake, and the hold and ready files
//! a harness steers a fleet with.
//!
//! The tests' `weir-wsclient` ([`crate::wsload`]) and the bench's
//! `weir-load` build their reports from these parts, so a reset counts the
//! same way in a test and in a benchmark.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use futures_util::StreamExt;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message, http};

/// Response header naming the backend that accepted the upgrade.
pub const BACKEND_HEADER: &str = "x-weir-backend";
/// Response header with the peer address the backend saw (`weir-echo`).
pub const PEER_HEADER: &str = "x-weir-peer";

/// The long-lived connections a load client opens and holds, said the same
/// way to both clients: `weir-wsclient` takes it as flags, `weir-load` as
/// part of its JSON plan.
#[derive(Clone, Debug, clap::Args, Serialize, Deserialize)]
pub struct Fleet {
    /// ws://HOST:PORT/PATH
    #[arg(long)]
    pub url: String,
    /// Source address to bind; repeat to use several round-robin.
    #[arg(long = "source")]
    pub sources: Vec<IpAddr>,
    /// Number of long-lived connections.
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// Seconds the connections talk (or are held): after each connected
    /// for the tests' client, from the start for the bench's generator;
    /// the upper bound with --hold-file.
    #[arg(long = "duration-secs", default_value = "2", value_parser = seconds)]
    pub duration: Duration,
    /// Ends the talking early once this file exists.
    #[arg(long)]
    pub hold_file: Option<PathBuf>,
    /// Created once every connection attempt has finished (connected or
    /// failed), so a harness knows when the fleet is up.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// Handshakes of the long-lived connections in flight at once.
    #[arg(long = "concurrency", default_value_t = 100)]
    pub connect_concurrency: usize,
    /// Milliseconds allowed for TCP connect + WebSocket handshake.
    #[arg(long = "connect-timeout-ms", default_value = "5000", value_parser = millis)]
    pub connect_timeout: Duration,
    /// Milliseconds allowed for an echo to come back.
    #[arg(long = "echo-timeout-ms", default_value = "5000", value_parser = millis)]
    pub echo_timeout: Duration,
}

fn seconds(s: &str) -> Result<Duration, std::num::ParseIntError> {
    s.parse().map(Duration::from_secs)
}

/// Milliseconds as a command-line value.
pub fn millis(s: &str) -> Result<Duration, std::num::ParseIntError> {
    s.parse().map(Duration::from_millis)
}

/// A client WebSocket over plain TCP.
pub type Ws = WebSocketStream<TcpStream>;

/// A parsed `ws://HOST[:PORT]/PATH` URL (no TLS: weir terminates none).
#[derive(Clone, Debug)]
pub struct WsUrl {
    /// Without IPv6 brackets.
    pub host: String,
    pub port: u16,
    pub uri: http::Uri,
}

impl FromStr for WsUrl {
    type Err = anyhow::Error;

    fn from_str(url: &str) -> Result<WsUrl> {
        let uri: http::Uri = url.parse().with_context(|| format!("bad URL {url:?}"))?;
        match uri.scheme_str() {
            Some("ws") => {}
            Some(other) => bail!("unsupported scheme {other:?} in {url:?} (only ws://)"),
            None => bail!("URL {url:?} has no scheme (want ws://HOST:PORT/PATH)"),
        }
        let host = uri
            .host()
            .ok_or_else(|| anyhow!("URL {url:?} has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(80);
        Ok(WsUrl { host, port, uri })
    }
}

impl WsUrl {
    /// The address when the host is an IP literal (the bench never
    /// resolves names: a lookup would be part of what it measures).
    pub fn ip_target(&self) -> Option<SocketAddr> {
        let ip: IpAddr = self.host.parse().ok()?;
        Some(SocketAddr::new(ip, self.port))
    }

    /// Resolves the host to an address of `family`'s kind (the first
    /// address when there is no preference).
    pub async fn resolve(&self, family: Option<IpAddr>) -> Result<SocketAddr> {
        let host = self.host.as_str();
        let addrs: Vec<SocketAddr> = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::lookup_host((host, self.port)),
        )
        .await
        .map_err(|_| anyhow!("resolving {host} timed out"))?
        .with_context(|| format!("resolving {host}"))?
        .collect();
        match family {
            Some(src) => addrs.iter().find(|a| a.is_ipv4() == src.is_ipv4()),
            None => addrs.first(),
        }
        .copied()
        .ok_or_else(|| anyhow!("{host} has no address of the sources' family"))
    }
}

/// Why an upgrade never happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Unupgraded {
    /// The socket could not be made, or the handshake broke off.
    Io,
    /// The source address could not be bound.
    Bind,
    /// The TCP connect failed.
    Connect,
    /// No 101 within the connect timeout.
    Timeout,
    /// The server answered with this HTTP status instead of 101.
    Status(u16),
}

/// How a connection ended: one vocabulary for the tests' reports and the
/// bench's counters. Its names (see [`ending_name`]) are what reports and
/// result files carry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Ending {
    /// We sent Close 1000 and the peer answered.
    Clean,
    /// The peer sent Close with this code (1005: no code).
    PeerClose(u16),
    /// The connection was reset or aborted.
    Reset,
    /// TCP ended without a Close frame.
    Eof,
    /// An echo, a send or the close handshake did not finish in time.
    Timeout,
    /// Anything else that ended the connection (also: not yet known).
    #[default]
    Error,
    /// The connection never became a WebSocket.
    Unupgraded(Unupgraded),
}

/// The names of [`Ending`]s in reports and results.
pub mod ending_name {
    pub const CLEAN: &str = "clean";
    /// Prefix of `peer_close:CODE`.
    pub const PEER_CLOSE: &str = "peer_close:";
    pub const RESET: &str = "reset";
    pub const EOF: &str = "eof";
    pub const TIMEOUT: &str = "timeout";
    pub const ERROR: &str = "error";
    /// Prefix of `handshake:STATUS`, `handshake:io`, `handshake:bind`,
    /// `handshake:connect`, `handshake:timeout`.
    pub const HANDSHAKE: &str = "handshake:";
    /// Not an ending: a connection still open when the run ended, which a
    /// harness counts beside the endings.
    pub const OPEN: &str = "open";
}

impl Ending {
    /// Ended with neither a close handshake nor a failed upgrade: the
    /// connection was cut.
    pub fn is_cut(self) -> bool {
        matches!(
            self,
            Ending::Reset | Ending::Eof | Ending::Timeout | Ending::Error
        )
    }

    /// Maps the error that ended a connection onto an ending.
    pub fn of_error(e: &tungstenite::Error) -> Ending {
        use std::io::ErrorKind;
        use tungstenite::error::ProtocolError;
        match e {
            tungstenite::Error::ConnectionClosed
            | tungstenite::Error::AlreadyClosed
            | tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
                Ending::Eof
            }
            tungstenite::Error::Io(io) => match io.kind() {
                ErrorKind::ConnectionReset
                | ErrorKind::ConnectionAborted
                | ErrorKind::BrokenPipe => Ending::Reset,
                ErrorKind::UnexpectedEof => Ending::Eof,
                ErrorKind::TimedOut => Ending::Timeout,
                _ => Ending::Error,
            },
            _ => Ending::Error,
        }
    }

    /// The ending a peer's Close frame gives.
    pub fn peer_close(frame: Option<&CloseFrame>) -> Ending {
        Ending::PeerClose(frame.map_or(1005, |f| u16::from(f.code)))
    }
}

impl fmt::Display for Ending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use ending_name as n;
        match self {
            Ending::Clean => f.write_str(n::CLEAN),
            Ending::PeerClose(code) => write!(f, "{}{code}", n::PEER_CLOSE),
            Ending::Reset => f.write_str(n::RESET),
            Ending::Eof => f.write_str(n::EOF),
            Ending::Timeout => f.write_str(n::TIMEOUT),
            Ending::Error => f.write_str(n::ERROR),
            Ending::Unupgraded(why) => {
                f.write_str(n::HANDSHAKE)?;
                match why {
                    Unupgraded::Io => f.write_str("io"),
                    Unupgraded::Bind => f.write_str("bind"),
                    Unupgraded::Connect => f.write_str("connect"),
                    Unupgraded::Timeout => f.write_str("timeout"),
                    Unupgraded::Status(s) => write!(f, "{s}"),
                }
            }
        }
    }
}

impl FromStr for Ending {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Ending> {
        use ending_name as n;
        if let Some(code) = s.strip_prefix(n::PEER_CLOSE) {
            let code = code.parse().with_context(|| format!("ending {s:?}"))?;
            return Ok(Ending::PeerClose(code));
        }
        if let Some(why) = s.strip_prefix(n::HANDSHAKE) {
            let why = match why {
                "io" => Unupgraded::Io,
                "bind" => Unupgraded::Bind,
                "connect" => Unupgraded::Connect,
                "timeout" => Unupgraded::Timeout,
                status => Unupgraded::Status(
                    status
                        .parse()
                        .with_context(|| format!("ending {s:?}: not a status"))?,
                ),
            };
            return Ok(Ending::Unupgraded(why));
        }
        Ok(match s {
            n::CLEAN => Ending::Clean,
            n::RESET => Ending::Reset,
            n::EOF => Ending::Eof,
            n::TIMEOUT => Ending::Timeout,
            n::ERROR => Ending::Error,
            _ => bail!("unknown ending {s:?}"),
        })
    }
}

impl Serialize for Ending {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ending {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Ending, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A readable account of a WebSocket error (an HTTP refusal shows its
/// status and the start of its body).
pub fn describe(e: &tungstenite::Error) -> String {
    match e {
        tungstenite::Error::Http(resp) => {
            let body = resp
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            format!("HTTP {} {}", resp.status(), truncate(body.trim(), 200))
        }
        other => other.to_string(),
    }
}

/// At most `max` characters of `s`.
pub fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Where and how connections are opened.
#[derive(Clone, Debug)]
pub struct Dialer {
    pub target: SocketAddr,
    pub uri: http::Uri,
    /// Limit for TCP connect + WebSocket handshake.
    pub timeout: Duration,
    /// Bytes tungstenite reads at once: the bench reads more per call, the
    /// tests hold more connections.
    pub read_buffer: usize,
}

/// An upgraded connection.
pub struct Connected {
    pub ws: Ws,
    /// Our end of the TCP connection.
    pub local: SocketAddr,
    /// [`BACKEND_HEADER`] of the 101.
    pub backend: Option<String>,
    /// [`PEER_HEADER`] of the 101.
    pub peer_seen: Option<String>,
}

/// Why a connection was not upgraded, with what the system said.
#[derive(Debug)]
pub struct DialError {
    pub why: Unupgraded,
    pub detail: String,
}

impl fmt::Display for DialError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)
    }
}

impl DialError {
    pub fn ending(&self) -> Ending {
        Ending::Unupgraded(self.why)
    }
}

impl Dialer {
    /// Connects from `source` (any address when `None`) and upgrades,
    /// within [`Dialer::timeout`].
    pub async fn dial(&self, source: Option<IpAddr>) -> Result<Connected, DialError> {
        match tokio::time::timeout(self.timeout, self.attempt(source)).await {
            Ok(r) => r,
            Err(_) => Err(DialError {
                why: Unupgraded::Timeout,
                detail: format!("timed out after {:?}", self.timeout),
            }),
        }
    }

    async fn attempt(&self, source: Option<IpAddr>) -> Result<Connected, DialError> {
        let fail = |why, detail: String| DialError { why, detail };
        let socket = if self.target.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| fail(Unupgraded::Io, format!("socket: {e}")))?;
        if let Some(src) = source {
            if src.is_ipv4() {
                bind_address_no_port(&socket);
            }
            socket
                .bind(SocketAddr::new(src, 0))
                .map_err(|e| fail(Unupgraded::Bind, format!("bind {src}: {e}")))?;
        }
        let stream = socket.connect(self.target).await.map_err(|e| {
            fail(
                Unupgraded::Connect,
                format!("tcp connect {}: {e}", self.target),
            )
        })?;
        let _ = stream.set_nodelay(true);
        let local = stream
            .local_addr()
            .map_err(|e| fail(Unupgraded::Io, format!("local_addr: {e}")))?;
        let config = WebSocketConfig::default()
            .read_buffer_size(self.read_buffer)
            .write_buffer_size(0)
            .max_message_size(Some(16 << 20));
        let (ws, resp) =
            tokio_tungstenite::client_async_with_config(self.uri.clone(), stream, Some(config))
                .await
                .map_err(|e| {
                    let why = match &e {
                        tungstenite::Error::Http(resp) => {
                            Unupgraded::Status(resp.status().as_u16())
                        }
                        _ => Unupgraded::Io,
                    };
                    fail(why, format!("websocket handshake: {}", describe(&e)))
                })?;
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        Ok(Connected {
            ws,
            local,
            backend: header(BACKEND_HEADER),
            peer_seen: header(PEER_HEADER),
        })
    }
}

/// How our close handshake went when it did not fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closed {
    /// The peer answered our Close with its own.
    Answered,
    /// The connection ended without the peer's Close.
    Unanswered,
}

/// What our close handshake waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseUntil {
    /// The peer's Close: the connection's work is done (the bench).
    Reply,
    /// The end of the connection after it, so that a reset after the
    /// Close still counts (the tests).
    End,
}

/// An ending other than a clean close, and what happened.
pub type Failure = (Ending, String);

/// Sends Close 1000 and reads until `until`, within `limit`.
pub async fn close_handshake(
    ws: &mut Ws,
    limit: Duration,
    until: CloseUntil,
) -> Result<Closed, Failure> {
    let outcome = tokio::time::timeout(limit, async {
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        };
        if let Err(e) = ws.close(Some(frame)).await {
            return Err((Ending::of_error(&e), format!("close: {}", describe(&e))));
        }
        let mut answered = Closed::Unanswered;
        for _ in 0..10_000 {
            match ws.next().await {
                Some(Ok(Message::Close(_))) if until == CloseUntil::Reply => {
                    return Ok(Closed::Answered);
                }
                Some(Ok(Message::Close(_))) => answered = Closed::Answered,
                Some(Ok(_)) => {} // late data or control frames
                None | Some(Err(tungstenite::Error::ConnectionClosed)) => return Ok(answered),
                Some(Err(e)) => {
                    return Err((Ending::of_error(&e), format!("closing: {}", describe(&e))));
                }
            }
        }
        Err((Ending::Error, "too many frames while closing".into()))
    })
    .await;
    outcome.unwrap_or_else(|_| {
        Err((
            Ending::Timeout,
            format!("close handshake not finished within {limit:?}"),
        ))
    })
}

/// A signal that turns true once `hold_file` exists or `until` passed,
/// whichever comes first; the task ends with it.
pub fn stop_signal(
    hold_file: Option<PathBuf>,
    until: Instant,
) -> (watch::Receiver<bool>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        while Instant::now() < until {
            tick.tick().await;
            if let Some(p) = &hold_file
                && tokio::fs::try_exists(p).await.unwrap_or(false)
            {
                break;
            }
        }
        let _ = tx.send(true);
    });
    (rx, task)
}

/// Counts first connection attempts and writes the ready file once all
/// `total` finished, so a harness knows the fleet is up.
pub struct ReadyFile {
    path: Option<PathBuf>,
    total: usize,
    done: AtomicUsize,
}

impl ReadyFile {
    pub fn new(path: Option<PathBuf>, total: usize) -> Self {
        ReadyFile {
            path,
            total,
            done: AtomicUsize::new(0),
        }
    }

    /// One attempt finished (connected or failed); the last one writes
    /// `contents()` to the file.
    pub fn attempt_done(&self, contents: impl FnOnce() -> String) {
        let done = self.done.fetch_add(1, Ordering::AcqRel) + 1;
        if done == self.total
            && let Some(p) = &self.path
            && let Err(e) = std::fs::write(p, contents())
        {
            eprintln!("cannot write ready file {}: {e}", p.display());
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Lets connect() pick the port of a socket bound to a source address
/// (IP_BIND_ADDRESS_NO_PORT), so many connections share ports across
/// destinations. Without it, bind() must find a port no socket on that
/// address holds, TIME_WAIT ones included: after a few hundred thousand
/// short connections from one address, each bind searches a full range.
/// Best effort: a kernel without it binds as before.
pub fn bind_address_no_port(socket: &impl AsRawFd) {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a valid fd and a c_int option value.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_bound_without_a_port_gets_one_at_connect() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        bind_address_no_port(&sock);
        sock.bind(&"127.0.0.2:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        // No port taken by the bind: nothing for a TIME_WAIT pile to block.
        let bound = sock.local_addr().unwrap().as_socket().unwrap();
        assert_eq!(bound, "127.0.0.2:0".parse().unwrap());
        sock.connect(&listener.local_addr().unwrap().into())
            .unwrap();
        let connected = sock.local_addr().unwrap().as_socket().unwrap();
        assert_eq!(connected.ip(), "127.0.0.2".parse::<IpAddr>().unwrap());
        assert_ne!(connected.port(), 0);
    }

    #[test]
    fn url_parsing() {
        let u: WsUrl = "ws://198.19.0.10:8080/chat?x=1".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port), ("198.19.0.10", 8080));
        assert_eq!(u.uri.path(), "/chat");
        assert_eq!(u.ip_target(), Some("198.19.0.10:8080".parse().unwrap()));
        let u: WsUrl = "ws://127.0.0.1/".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port), ("127.0.0.1", 80));
        let u: WsUrl = "ws://[::1]:9/".parse().unwrap();
        assert_eq!(u.ip_target(), Some("[::1]:9".parse().unwrap()));
        let named: WsUrl = "ws://localhost:80/".parse().unwrap();
        assert_eq!(named.ip_target(), None);
        assert!("wss://127.0.0.1/".parse::<WsUrl>().is_err());
        assert!("127.0.0.1:80".parse::<WsUrl>().is_err());
    }

    #[test]
    fn endings_round_trip_through_their_names() {
        for e in [
            Ending::Clean,
            Ending::PeerClose(1001),
            Ending::Reset,
            Ending::Eof,
            Ending::Timeout,
            Ending::Error,
            Ending::Unupgraded(Unupgraded::Io),
            Ending::Unupgraded(Unupgraded::Bind),
            Ending::Unupgraded(Unupgraded::Connect),
            Ending::Unupgraded(Unupgraded::Timeout),
            Ending::Unupgraded(Unupgraded::Status(503)),
        ] {
            let name = e.to_string();
            assert_eq!(name.parse::<Ending>().unwrap(), e, "{name}");
            let json = serde_json::to_string(&e).unwrap();
            assert_eq!(json, format!("\"{name}\""));
            assert_eq!(serde_json::from_str::<Ending>(&json).unwrap(), e);
        }
        assert_eq!(Ending::PeerClose(1001).to_string(), "peer_close:1001");
        assert_eq!(
            Ending::Unupgraded(Unupgraded::Status(503)).to_string(),
            "handshake:503"
        );
        for bad in ["", "closed", "peer_close:x", "handshake:teapot", "open"] {
            assert!(bad.parse::<Ending>().is_err(), "{bad}");
        }
    }

    #[test]
    fn errors_are_classified_by_what_ended_the_connection() {
        use std::io::{Error, ErrorKind};
        let io = |k: ErrorKind| Ending::of_error(&tungstenite::Error::Io(Error::from(k)));
        assert_eq!(io(ErrorKind::ConnectionReset), Ending::Reset);
        assert_eq!(io(ErrorKind::BrokenPipe), Ending::Reset);
        assert_eq!(io(ErrorKind::UnexpectedEof), Ending::Eof);
        assert_eq!(io(ErrorKind::TimedOut), Ending::Timeout);
        assert_eq!(io(ErrorKind::PermissionDenied), Ending::Error);
        assert_eq!(
            Ending::of_error(&tungstenite::Error::ConnectionClosed),
            Ending::Eof
        );
        assert!(Ending::Eof.is_cut() && Ending::Reset.is_cut());
        assert!(!Ending::Clean.is_cut() && !Ending::PeerClose(1001).is_cut());
        assert!(!Ending::Unupgraded(Unupgraded::Status(503)).is_cut());
    }

    /// A refused TCP connect and a non-101 answer are told apart.
    #[tokio::test]
    async fn dial_failures_name_their_step() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let target = closed.local_addr().unwrap();
        drop(closed);
        let dialer = |target| Dialer {
            target,
            uri: format!("ws://{target}/").parse().unwrap(),
            timeout: Duration::from_secs(5),
            read_buffer: 8 * 1024,
        };
        let e = dialer(target).dial(None).await.err().unwrap();
        assert_eq!(e.ending(), Ending::Unupgraded(Unupgraded::Connect), "{e}");

        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = http.local_addr().unwrap();
        let server = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut s, _) = http.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbusy")
                .await;
        });
        let e = dialer(target)
            .dial(Some("127.0.0.1".parse().unwrap()))
            .await
            .err()
            .unwrap();
        server.abort();
        assert_eq!(e.ending().to_string(), "handshake:503", "{e}");
        assert!(e.to_string().contains("HTTP 503"), "{e}");
    }
}
