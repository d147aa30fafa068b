//! weir-echo: a WebSocket echo backend for weir's tests and benches.
//!
//! Echoes text and binary messages, answers pings, completes close
//! handshakes, and names itself in the `x-weir-backend` header of its 101
//! response (plus `x-weir-peer`: the client address it saw). A text
//! message `push rate=.. size=.. count=.. delay_us=..` is not echoed: it
//! starts server push on that connection (see [`weir_testbed::push`]); a
//! malformed one gets Close 1008. `GET /health` answers 200. Prints `ready ADDR...` on stdout once listening. On SIGTERM or
//! SIGINT it stops accepting, sends Close 1001 to every open connection,
//! waits up to `--shutdown-grace-ms` for them to end, and exits 0.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use weir_testbed::push::{PushRequest, Pusher};
use weir_testbed::ws_client::{BACKEND_HEADER, PEER_HEADER};

#[derive(Parser, Debug)]
#[command(name = "weir-echo", about = "WebSocket echo backend for weir tests")]
struct Args {
    /// Address to listen on (ADDR:PORT); repeat for several.
    #[arg(long = "listen", required = true)]
    listen: Vec<SocketAddr>,
    /// Name reported in the x-weir-backend response header.
    #[arg(long, default_value = "echo")]
    name: String,
    /// How long open connections get to finish after Close 1001 on SIGTERM.
    #[arg(long, default_value_t = 1000)]
    shutdown_grace_ms: u64,
    /// Time limit for reading the HTTP request head / WebSocket handshake.
    #[arg(long, default_value_t = 10_000)]
    handshake_timeout_ms: u64,
    /// Log each connection to stderr.
    #[arg(long)]
    verbose: bool,
}

struct Stats {
    active: AtomicUsize,
    accepted: AtomicU64,
    messages: AtomicU64,
    pushed: AtomicU64,
    health: AtomicU64,
    probes: AtomicU64,
    handshake_errors: AtomicU64,
}

struct Ctx {
    name: String,
    name_header: HeaderValue,
    handshake_timeout: Duration,
    verbose: bool,
    stats: Stats,
}

/// Decrements the active-connection count when a connection task ends.
struct ActiveGuard(Arc<Ctx>);
impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.stats.active.fetch_sub(1, Ordering::AcqRel);
    }
}

fn main() {
    let args = Args::parse();
    weir_testbed::raise_nofile_limit(20_000);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weir-echo: cannot start runtime: {e}");
            std::process::exit(1);
        }
    };
    match rt.block_on(serve(args)) {
        Ok(()) => {
            rt.shutdown_timeout(Duration::from_millis(100));
            std::process::exit(0)
        }
        Err(e) => {
            eprintln!("weir-echo: {e:#}");
            std::process::exit(1);
        }
    }
}

fn bind(addr: SocketAddr) -> Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr).with_context(|| format!("bind {addr}"))?;
    Ok(socket.listen(4096)?)
}

async fn serve(args: Args) -> Result<()> {
    let name_header = HeaderValue::from_str(&args.name)
        .with_context(|| format!("--name {:?} is not a valid header value", args.name))?;
    let ctx = Arc::new(Ctx {
        name: args.name.clone(),
        name_header,
        handshake_timeout: Duration::from_millis(args.handshake_timeout_ms),
        verbose: args.verbose,
        stats: Stats {
            active: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
            messages: AtomicU64::new(0),
            pushed: AtomicU64::new(0),
            health: AtomicU64::new(0),
            probes: AtomicU64::new(0),
            handshake_errors: AtomicU64::new(0),
        },
    });
    let mut listeners = Vec::new();
    for addr in &args.listen {
        listeners.push(bind(*addr)?);
    }
    let bound: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.to_string()))
        .collect::<std::io::Result<_>>()?;

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    let mut accept_tasks = Vec::new();
    for listener in listeners {
        let ctx = ctx.clone();
        let shutdown = shutdown_rx.clone();
        accept_tasks.push(tokio::spawn(accept_loop(listener, ctx, shutdown)));
    }

    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "ready {}", bound.join(" "))?;
        out.flush()?;
    }
    eprintln!("weir-echo {}: listening on {}", ctx.name, bound.join(" "));

    tokio::select! {
        _ = sigterm.recv() => {}
        _ = sigint.recv() => {}
    }
    for t in &accept_tasks {
        t.abort();
    }
    let _ = shutdown_tx.send(true);
    let grace = Duration::from_millis(args.shutdown_grace_ms);
    let deadline = tokio::time::Instant::now() + grace;
    while ctx.stats.active.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let s = &ctx.stats;
    eprintln!(
        "weir-echo {}: exiting: accepted {} messages {} pushed {} health {} probes {} handshake_errors {} still_open {}",
        ctx.name,
        s.accepted.load(Ordering::Relaxed),
        s.messages.load(Ordering::Relaxed),
        s.pushed.load(Ordering::Relaxed),
        s.health.load(Ordering::Relaxed),
        s.probes.load(Ordering::Relaxed),
        s.handshake_errors.load(Ordering::Relaxed),
        s.active.load(Ordering::Relaxed),
    );
    Ok(())
}

async fn accept_loop(listener: TcpListener, ctx: Arc<Ctx>, shutdown: watch::Receiver<bool>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                ctx.stats.accepted.fetch_add(1, Ordering::Relaxed);
                ctx.stats.active.fetch_add(1, Ordering::AcqRel);
                let guard = ActiveGuard(ctx.clone());
                let ctx = ctx.clone();
                let shutdown = shutdown.clone();
                tokio::spawn(async move {
                    let _guard = guard;
                    handle(stream, peer, ctx, shutdown).await;
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("weir-echo {}: accept: {e}", ctx.name);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// What the first bytes of a connection say.
enum Opening {
    /// `GET /health`: answer 200.
    Health,
    /// Anything else: try the WebSocket handshake.
    WebSocket,
    /// Closed (or failed) before sending a byte: a TCP health probe.
    Closed,
}

/// Looks at the first bytes without consuming them.
async fn classify_opening(stream: &TcpStream) -> Opening {
    const PREFIX: &[u8] = b"GET /health";
    let mut buf = [0u8; 12];
    for _ in 0..100 {
        let n = match stream.peek(&mut buf).await {
            Ok(0) | Err(_) => return Opening::Closed,
            Ok(n) => n,
        };
        if n > PREFIX.len() {
            let health = buf.starts_with(PREFIX) && matches!(buf[PREFIX.len()], b' ' | b'?');
            return if health {
                Opening::Health
            } else {
                Opening::WebSocket
            };
        }
        if !PREFIX.starts_with(&buf[..n]) {
            return Opening::WebSocket;
        }
        // A partial prefix so far: wait for more bytes.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Opening::WebSocket
}

async fn answer_health(mut stream: TcpStream, ctx: &Ctx) {
    ctx.stats.health.fetch_add(1, Ordering::Relaxed);
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    // Read the request head (bounded in size; the caller bounds the time).
    while head.len() < 16 * 1024 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let body = "ok\n";
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{BACKEND_HEADER}: {}\r\nConnection: close\r\n\r\n{body}",
        body.len(),
        ctx.name
    );
    let _ = stream.write_all(resp.as_bytes()).await;
    let _ = stream.shutdown().await;
}

// The handshake callback's error type is fixed by tungstenite.
#[allow(clippy::result_large_err)]
async fn handle(
    stream: TcpStream,
    peer: SocketAddr,
    ctx: Arc<Ctx>,
    mut shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let hs_timeout = ctx.handshake_timeout;
    match tokio::time::timeout(hs_timeout, classify_opening(&stream)).await {
        Ok(Opening::Health) => {
            let _ = tokio::time::timeout(hs_timeout, answer_health(stream, &ctx)).await;
            return;
        }
        Ok(Opening::Closed) => {
            ctx.stats.probes.fetch_add(1, Ordering::Relaxed);
            return;
        }
        Ok(Opening::WebSocket) => {}
        Err(_) => {
            ctx.stats.handshake_errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }

    let name_header = ctx.name_header.clone();
    let callback = move |req: &Request, mut resp: Response| {
        let headers = resp.headers_mut();
        headers.insert(BACKEND_HEADER, name_header);
        if let Ok(v) = HeaderValue::from_str(&peer.to_string()) {
            headers.insert(PEER_HEADER, v);
        }
        if let Some(xff) = req.headers().get("x-forwarded-for") {
            headers.insert("x-weir-xff", xff.clone());
        }
        Ok(resp)
    };
    let config = WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0);
    let accepted = tokio::time::timeout(
        hs_timeout,
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)),
    )
    .await;
    let mut ws = match accepted {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            ctx.stats.handshake_errors.fetch_add(1, Ordering::Relaxed);
            if ctx.verbose {
                eprintln!("weir-echo {}: {peer}: handshake: {e}", ctx.name);
            }
            return;
        }
        Err(_) => {
            ctx.stats.handshake_errors.fetch_add(1, Ordering::Relaxed);
            if ctx.verbose {
                eprintln!("weir-echo {}: {peer}: handshake timed out", ctx.name);
            }
            return;
        }
    };
    if ctx.verbose {
        eprintln!("weir-echo {}: {peer}: open", ctx.name);
    }
    let mut shutting_down = *shutdown.borrow();
    if shutting_down {
        let _ = ws
            .close(Some(CloseFrame {
                code: CloseCode::Away,
                reason: "shutting down".into(),
            }))
            .await;
    }
    // The push this connection asked for, while it lasts.
    let mut push: Option<Pusher> = None;
    // Bounded: the loop ends when the peer goes away; on shutdown the process
    // exits after the grace period whatever the peer does.
    loop {
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) if t.starts_with("push ") && !shutting_down => {
                    ctx.stats.messages.fetch_add(1, Ordering::Relaxed);
                    let started = t
                        .parse::<PushRequest>()
                        .and_then(|req| Pusher::start(req).context("arming the push timer"));
                    match started {
                        Ok(p) => push = Some(p),
                        Err(e) => {
                            if ctx.verbose {
                                eprintln!("weir-echo {}: {peer}: {e:#}", ctx.name);
                            }
                            shutting_down = true;
                            let _ = ws
                                .close(Some(CloseFrame {
                                    code: CloseCode::Policy,
                                    reason: format!("{e:#}").into(),
                                }))
                                .await;
                        }
                    }
                }
                Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
                    ctx.stats.messages.fetch_add(1, Ordering::Relaxed);
                    if shutting_down {
                        continue; // we already sent Close; no data after it
                    }
                    if let Err(e) = ws.send(m).await {
                        if ctx.verbose {
                            eprintln!("weir-echo {}: {peer}: send: {e}", ctx.name);
                        }
                        break;
                    }
                }
                // Close: tungstenite queued the reply; the next poll sends it
                // and then the stream ends. Ping: tungstenite answers.
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    if ctx.verbose {
                        eprintln!("weir-echo {}: {peer}: {e}", ctx.name);
                    }
                    break;
                }
                None => break,
            },
            frame = async { push.as_mut().expect("guarded").next().await },
                if push.as_ref().is_some_and(|p| !p.done()) && !shutting_down =>
            {
                match frame {
                    Ok(f) => {
                        if let Err(e) = ws.send(Message::binary(f)).await {
                            if ctx.verbose {
                                eprintln!("weir-echo {}: {peer}: push: {e}", ctx.name);
                            }
                            break;
                        }
                        ctx.stats.pushed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        eprintln!("weir-echo {}: {peer}: push timer: {e}", ctx.name);
                        push = None;
                    }
                }
            }
            res = shutdown.changed(), if !shutting_down => {
                if res.is_ok() && *shutdown.borrow() {
                    shutting_down = true;
                    let _ = ws
                        .close(Some(CloseFrame {
                            code: CloseCode::Away,
                            reason: "shutting down".into(),
                        }))
                        .await;
                } else if res.is_err() {
                    shutting_down = true;
                }
            }
        }
    }
    if ctx.verbose {
        eprintln!("weir-echo {}: {peer}: closed", ctx.name);
    }
}
