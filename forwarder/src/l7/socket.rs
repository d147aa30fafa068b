//! Socket setup for the L7 workers, on socket2: the listeners every worker
//! binds, the backend sockets it connects, and the addresses io_uring needs
//! as raw `sockaddr`s.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};

use socket2::{Domain, SockAddr, SockRef, Socket, Type};

use super::config::Listener;

/// Pending connections a listener queues before the kernel refuses more.
const BACKLOG: i32 = 4096;

/// Opens a listening socket with SO_REUSEPORT, so each worker has its own
/// and the kernel spreads connections across them. TCP_NODELAY is set on
/// the listener so that every accepted client socket inherits it: weir
/// writes a message to a client in as many sends as it took receives, and
/// with Nagle on, the last small piece of each would wait for the client's
/// delayed ACK (40 ms on Linux).
pub fn reuseport_listener(addr: SocketAddr) -> io::Result<OwnedFd> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Binds the listeners of `workers` workers: per worker, one socket per
/// configured listener, in configuration order. A listener on port 0 gets
/// its port from the kernel once, for the first worker; the others bind the
/// same port (SO_REUSEPORT), so every worker serves the one address that is
/// logged. Returns the sockets and the addresses they listen on.
pub fn bind_listeners(
    listeners: &[Listener],
    workers: usize,
) -> io::Result<(Vec<Vec<OwnedFd>>, Vec<SocketAddr>)> {
    let mut per_worker: Vec<Vec<OwnedFd>> = (0..workers).map(|_| Vec::new()).collect();
    let mut bound = Vec::new();
    for l in listeners {
        let listening = |addr: SocketAddr| {
            reuseport_listener(addr)
                .map_err(|e| io::Error::new(e.kind(), format!("listening on {addr}: {e}")))
        };
        let first = listening(l.listen)?;
        let addr = local_addr(&first)?;
        let mut fds = vec![first];
        for _ in 1..workers {
            fds.push(listening(addr)?);
        }
        for (w, fd) in per_worker.iter_mut().zip(fds) {
            w.push(fd);
        }
        bound.push(addr);
    }
    Ok((per_worker, bound))
}

/// The address a socket is bound to.
fn local_addr(socket: &impl AsFd) -> io::Result<SocketAddr> {
    SockRef::from(socket)
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("listener bound to a non-IP address"))
}

/// The address of a connected socket's peer; None once it is gone.
pub fn peer_addr(socket: &impl AsFd) -> Option<SocketAddr> {
    SockRef::from(socket).peer_addr().ok()?.as_socket()
}

/// A socket for connecting to a backend at `addr`, with TCP_NODELAY for
/// the same reason as on client sockets (see [`reuseport_listener`]).
pub fn backend_socket(addr: SocketAddr) -> io::Result<OwnedFd> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), None)?;
    socket.set_tcp_nodelay(true)?;
    Ok(socket.into())
}

/// `addr` as the `sockaddr` a connect operation reads; it must stay put
/// until that operation completes.
pub fn raw_addr(addr: SocketAddr) -> SockAddr {
    addr.into()
}

/// Shuts one or both directions of a socket weir holds a descriptor of.
/// A socket that is already gone has nothing left to shut, so the error
/// is of no use to the caller.
pub fn shut(socket: &impl AsFd, how: Shutdown) {
    let _ = SockRef::from(socket).shutdown(how);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Port 0 resolves once; every worker's socket serves that same port,
    /// and a client connection's peer address is the client's own.
    #[test]
    fn workers_share_one_resolved_port() {
        let listener = Listener {
            listen: "127.0.0.1:0".parse().unwrap(),
            shared: false,
            routes: Vec::new(),
        };
        let (fds, bound) = bind_listeners(&[listener], 3).expect("bind");
        assert_eq!(fds.len(), 3);
        assert_eq!(bound.len(), 1);
        assert_ne!(bound[0].port(), 0);
        for w in &fds {
            assert_eq!(local_addr(&w[0]).unwrap(), bound[0]);
        }
        let client = std::net::TcpStream::connect(bound[0]).expect("connect");
        assert_eq!(peer_addr(&client), Some(bound[0]));
        shut(&client, Shutdown::Both);
        let mut buf = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut &client, &mut buf).unwrap(), 0);
    }

    #[test]
    fn a_backend_socket_has_nodelay_and_a_raw_address_round_trips() {
        let addr: SocketAddr = "[::1]:8080".parse().unwrap();
        let fd = backend_socket(addr).expect("socket");
        assert!(SockRef::from(&fd).tcp_nodelay().unwrap());
        assert_eq!(raw_addr(addr).as_socket(), Some(addr));
    }
}
