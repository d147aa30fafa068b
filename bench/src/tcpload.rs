//! Plain TCP load for the L4 scenario, against `weir-sink`: bulk streams
//! (client to backend) and short connections. The sink answers each
//! connection with the number of bytes it read, so throughput is what
//! arrived at the backend, not what the client managed to buffer.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use weir_testbed::ws_client::bind_address_no_port;

use crate::load::self_cpu_s;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TcpResult {
    /// Bytes the sinks counted (bulk).
    pub bytes: u64,
    /// Connections that completed (connect, send, answer, close).
    pub ok: u64,
    pub errors: u64,
    pub seconds: f64,
    pub cpu_s: f64,
}

/// A blocking TCP connection to `to`, from `source` if given (std has no
/// bind-before-connect).
fn connect_from(source: Option<IpAddr>, to: SocketAddr) -> Result<std::net::TcpStream> {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::for_address(to), Type::STREAM, None).context("socket")?;
    if let Some(src) = source {
        bind_address_no_port(&sock);
        sock.bind(&SocketAddr::new(src, 0).into())
            .with_context(|| format!("bind {src}"))?;
    }
    sock.connect(&to.into())
        .with_context(|| format!("connect {to}"))?;
    Ok(sock.into())
}

/// `streams` connections each writing as fast as they can for `secs`;
/// returns the bytes the sinks counted.
pub fn bulk(
    target: SocketAddr,
    streams: usize,
    secs: Duration,
    sources: &[IpAddr],
) -> Result<TcpResult> {
    let cpu0 = self_cpu_s();
    let start = Instant::now();
    let deadline = start + secs;
    let mut threads = Vec::new();
    for i in 0..streams {
        let src = (!sources.is_empty()).then(|| sources[i % sources.len()]);
        threads.push(std::thread::spawn(move || -> Result<u64> {
            let mut s = connect_from(src, target)?;
            s.set_write_timeout(Some(Duration::from_secs(10)))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            let buf = vec![0x33u8; 128 * 1024];
            while Instant::now() < deadline {
                s.write_all(&buf).context("bulk write")?;
            }
            s.shutdown(std::net::Shutdown::Write)?;
            let mut count = [0u8; 8];
            s.read_exact(&mut count)
                .context("reading the sink's count")?;
            Ok(u64::from_le_bytes(count))
        }));
    }
    let mut r = TcpResult::default();
    for t in threads {
        match t.join() {
            Ok(Ok(b)) => {
                r.bytes += b;
                r.ok += 1;
            }
            _ => r.errors += 1,
        }
    }
    r.seconds = start.elapsed().as_secs_f64();
    r.cpu_s = self_cpu_s() - cpu0;
    Ok(r)
}

/// Short connections, `concurrency` in flight, for `secs`.
pub fn conns(
    target: SocketAddr,
    concurrency: usize,
    secs: Duration,
    sources: &[IpAddr],
) -> Result<TcpResult> {
    let cpu0 = self_cpu_s();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    rt.block_on(async {
        let deadline = tokio::time::Instant::now() + secs;
        let mut tasks = Vec::new();
        for i in 0..concurrency {
            let src = (!sources.is_empty()).then(|| sources[i % sources.len()]);
            let (ok, errors) = (ok.clone(), errors.clone());
            tasks.push(tokio::spawn(async move {
                while tokio::time::Instant::now() < deadline {
                    let one = async {
                        let sock = tokio::net::TcpSocket::new_v4()?;
                        if let Some(src) = src {
                            // The system measured second must not inherit
                            // the first one's TIME_WAIT ports.
                            bind_address_no_port(&sock);
                            sock.bind(SocketAddr::new(src, 0))?;
                        }
                        let mut s = sock.connect(target).await?;
                        s.write_all(b"x").await?;
                        s.shutdown().await?;
                        let mut count = [0u8; 8];
                        s.read_exact(&mut count).await?;
                        anyhow::ensure!(u64::from_le_bytes(count) == 1, "sink counted wrong");
                        Ok::<_, anyhow::Error>(())
                    };
                    match tokio::time::timeout(Duration::from_secs(5), one).await {
                        Ok(Ok(())) => ok.fetch_add(1, Ordering::Relaxed),
                        _ => errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
    Ok(TcpResult {
        bytes: 0,
        ok: ok.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        seconds: start.elapsed().as_secs_f64(),
        cpu_s: self_cpu_s() - cpu0,
    })
}
