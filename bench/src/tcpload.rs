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

fn socket_from(source: Option<IpAddr>) -> Result<socket2_free::Socket> {
    socket2_free::Socket::new_v4(source)
}

/// A tiny wrapper over libc for a bound IPv4 client socket (std has no
/// bind-before-connect).
mod socket2_free {
    use std::net::{IpAddr, SocketAddr, SocketAddrV4, TcpStream};
    use std::os::fd::{FromRawFd, OwnedFd};

    use anyhow::{Result, bail};

    pub struct Socket(OwnedFd);

    fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
        libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: a.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*a.ip()).to_be(),
            },
            sin_zero: [0; 8],
        }
    }

    impl Socket {
        pub fn new_v4(source: Option<IpAddr>) -> Result<Socket> {
            // SAFETY: plain socket(2); the descriptor is owned at once.
            let fd =
                unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
            if fd < 0 {
                bail!("socket: {}", std::io::Error::last_os_error());
            }
            // SAFETY: fd is a fresh descriptor nobody else owns.
            let sock = Socket(unsafe { OwnedFd::from_raw_fd(fd) });
            if let Some(IpAddr::V4(ip)) = source {
                let sa = sockaddr(SocketAddrV4::new(ip, 0));
                // SAFETY: bind with a properly sized sockaddr_in.
                let r = unsafe {
                    libc::bind(
                        fd,
                        (&sa as *const libc::sockaddr_in).cast(),
                        size_of::<libc::sockaddr_in>() as u32,
                    )
                };
                if r != 0 {
                    bail!("bind {ip}: {}", std::io::Error::last_os_error());
                }
            }
            Ok(sock)
        }

        pub fn connect(self, to: SocketAddr) -> Result<TcpStream> {
            let SocketAddr::V4(v4) = to else {
                bail!("IPv4 only")
            };
            let sa = sockaddr(v4);
            use std::os::fd::{AsRawFd, IntoRawFd};
            // SAFETY: connect with a properly sized sockaddr_in.
            let r = unsafe {
                libc::connect(
                    self.0.as_raw_fd(),
                    (&sa as *const libc::sockaddr_in).cast(),
                    size_of::<libc::sockaddr_in>() as u32,
                )
            };
            if r != 0 {
                bail!("connect {to}: {}", std::io::Error::last_os_error());
            }
            // SAFETY: the descriptor moves into the stream.
            Ok(unsafe { TcpStream::from_raw_fd(self.0.into_raw_fd()) })
        }
    }
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
            let mut s = socket_from(src)?.connect(target)?;
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
