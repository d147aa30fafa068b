//! One check's I/O: a socket, a connect, and the bytes the probe asks to
//! send, on the agent's tokio runtime. The probe decides; this only moves
//! bytes and tells it what the network did.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

use crate::health::probe::{Check, Outcome, Probe, Seed, Step};

/// Where a check connects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// To the backend itself (L7 services: `weir run` connects there too).
    Direct(SocketAddr),
    /// To the service's VIP with `SO_MARK` set, from the LB address (the
    /// outer source `weir attach` set): the L4 probe path sends the packets
    /// to the backend the mark names, encapsulated as a client's are. A VIP
    /// that is an address of this host is reached through `lo` whatever
    /// the source, so the source is bound, not left to the route.
    Marked {
        vip: SocketAddr,
        mark: u32,
        source: std::net::Ipv4Addr,
    },
}

impl Route {
    fn addr(self) -> SocketAddr {
        match self {
            Self::Direct(addr) | Self::Marked { vip: addr, .. } => addr,
        }
    }
}

/// Runs one check within `timeout`, connect included. `Err`: the agent
/// could not set up a socket (out of descriptors, say); that says nothing
/// about the backend.
pub async fn run(
    check: &Check,
    route: Route,
    timeout: Duration,
    seed: Seed,
) -> io::Result<Outcome> {
    let addr = route.addr();
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }?;
    // A check ends with a reset, not a FIN: thousands of checks a second
    // would otherwise leave as many sockets in TIME_WAIT on this host.
    let options = socket2::SockRef::from(&socket);
    options.set_linger(Some(Duration::ZERO))?;
    if let Route::Marked { mark, source, .. } = route {
        options.set_mark(mark)?;
        if !source.is_unspecified() {
            socket.bind(SocketAddr::from((source, 0)))?;
        }
    }
    let mut probe = Probe::new(check, &addr.to_string(), seed);
    Ok(
        match tokio::time::timeout(timeout, exchange(&mut probe, socket, addr)).await {
            Ok(outcome) => outcome,
            Err(_) => probe.timed_out(),
        },
    )
}

async fn exchange(probe: &mut Probe, socket: TcpSocket, addr: SocketAddr) -> Outcome {
    let mut stream = match socket.connect(addr).await {
        Ok(s) => s,
        Err(e) => return Outcome::connect_failed(e.raw_os_error().unwrap_or(0)),
    };
    let mut step = probe.connected();
    let mut buf = vec![0u8; 4096];
    loop {
        match step {
            Step::Done(outcome) => return outcome,
            Step::Send(bytes) => {
                if stream.write_all(&bytes).await.is_err() {
                    return probe.closed();
                }
            }
            Step::Wait => {}
        }
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return probe.closed(),
            Ok(n) => step = probe.received(&buf[..n]),
        }
    }
}
