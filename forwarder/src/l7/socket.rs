//! Socket setup for the L7 workers: the listeners every worker binds (on
//! socket2), the option every backend socket gets through the ring, and the
//! addresses io_uring reads and writes as raw `sockaddr`s.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use io_uring::{IoUring, opcode, squeue, types};
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

/// The address an accept wrote: the client's.
pub fn sockaddr(storage: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let len = len as usize;
    match i32::from(storage.ss_family) {
        libc::AF_INET if len >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says the storage holds a sockaddr_in, and
            // sockaddr_storage is aligned for every sockaddr.
            let sin =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::from((ip, u16::from_be(sin.sin_port))))
        }
        libc::AF_INET6 if len >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe {
                &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// TCP_NODELAY's value; the kernel reads it when the option is set, which
/// for a linked operation is after the submitting call returned.
static NODELAY_ON: libc::c_int = 1;

/// TCP_NODELAY on the socket in `slot`, for the same reason as on client
/// sockets (see [`reuseport_listener`]).
pub fn nodelay(slot: u32) -> squeue::Entry {
    opcode::SetSockOpt::new(
        types::Fixed(slot),
        libc::IPPROTO_TCP as u32,
        libc::TCP_NODELAY as u32,
        (&raw const NODELAY_ON).cast(),
        size_of::<libc::c_int>() as u32,
    )
    .build()
}

/// Creates a socket in `slot` of `ring`'s table, sets TCP_NODELAY on it and
/// closes it, all through the ring, as a worker does for every backend:
/// a kernel without these operations (Linux before 6.7) refuses the start
/// here rather than every client later.
pub fn check_ring_sockets(ring: &mut IoUring, slot: u32) -> io::Result<()> {
    let steps = ["create a socket", "set TCP_NODELAY", "close the socket"];
    let dest = types::DestinationSlot::try_from_slot_target(slot)
        .map_err(|_| io::Error::other(format!("slot {slot} out of range")))?;
    let chain = [
        opcode::Socket::new(libc::AF_INET, libc::SOCK_STREAM, 0)
            .file_index(Some(dest))
            .build()
            .flags(squeue::Flags::IO_LINK)
            .user_data(0),
        nodelay(slot).user_data(1),
    ];
    let close = [opcode::Close::new(types::Fixed(slot)).build().user_data(2)];
    let mut results = [None; 3];
    for (batch, expected) in [(&chain[..], 2), (&close[..], 1)] {
        // SAFETY: the entries point only at the static option value.
        unsafe { ring.submission().push_multiple(batch) }
            .map_err(|_| io::Error::other("the submission queue is full"))?;
        ring.submit_and_wait(expected)?;
        for c in ring.completion() {
            results[c.user_data() as usize % 3] = Some(c.result());
        }
    }
    for (step, res) in steps.iter().zip(results) {
        match res {
            Some(res) if res >= 0 => {}
            Some(res) => {
                return Err(io::Error::new(
                    io::Error::from_raw_os_error(-res).kind(),
                    format!(
                        "io_uring cannot {step} ({}): weir run needs Linux 6.7 or later \
                         (IORING_OP_SOCKET, SOCKET_URING_OP_SETSOCKOPT)",
                        io::Error::from_raw_os_error(-res)
                    ),
                ));
            }
            None => return Err(io::Error::other(format!("io_uring did not {step}"))),
        }
    }
    Ok(())
}

/// `addr` as the `sockaddr` a connect operation reads; it must stay put
/// until that operation completes.
pub fn raw_addr(addr: SocketAddr) -> SockAddr {
    addr.into()
}

/// Whether a socket has something to read now (for a listening socket: a
/// client in its accept queue). Does not wait.
pub fn readable(socket: &impl AsFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: socket.as_fd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    unsafe { libc::poll(&mut pfd, 1, 0) == 1 && pfd.revents & libc::POLLIN != 0 }
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
        assert_eq!(client.peer_addr().unwrap(), bound[0]);
        shut(&client, Shutdown::Both);
        let mut buf = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut &client, &mut buf).unwrap(), 0);
    }

    /// What an accept writes reads back as the address, for both
    /// families; a length the kernel would never write gives none.
    #[test]
    fn an_accepted_address_reads_back() {
        for addr in ["198.18.0.7:40000", "[2001:db8::1]:443"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let raw = raw_addr(addr);
            // SAFETY: all zeroes is a valid sockaddr_storage, and the copy
            // stays within both.
            let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
            unsafe {
                std::ptr::copy_nonoverlapping(
                    raw.as_ptr().cast::<u8>(),
                    (&raw mut storage).cast::<u8>(),
                    raw.len() as usize,
                )
            };
            assert_eq!(sockaddr(&storage, raw.len()), Some(addr));
        }
        // SAFETY: all zeroes is a valid sockaddr_storage.
        let empty: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        assert_eq!(sockaddr(&empty, 0), None);
    }

    /// The kernel here has the operations every backend socket needs.
    #[test]
    fn the_ring_creates_and_sets_up_sockets() {
        let mut ring = IoUring::new(8).expect("io_uring");
        ring.submitter().register_files_sparse(4).expect("table");
        check_ring_sockets(&mut ring, 3).expect("socket operations");
        // The slot is empty again: a second round works the same.
        check_ring_sockets(&mut ring, 3).expect("socket operations again");
    }
}
