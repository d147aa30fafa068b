//! Descriptors passed between processes over a Unix stream socket
//! (SCM_RIGHTS): how a `weir run --takeover` receives the listening
//! sockets and the daemon lock of the process it replaces. std has no
//! helper for ancillary data; these two calls are the only place weir
//! builds a `cmsghdr`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// The most descriptors one message carries (the kernel's SCM_MAX_FD).
pub const MAX_FDS: usize = 253;

/// Sends `bytes` (not empty: ancillary data rides on payload) with `fds`
/// attached, at most [`MAX_FDS`]. The bytes go whole or the call fails.
pub fn send(stream: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    assert!(!bytes.is_empty() && fds.len() <= MAX_FDS);
    let space = cmsg_space(fds.len());
    // u64 words keep the buffer aligned for cmsghdr.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: msghdr is plain data; every pointer set below outlives the
    // sendmsg call, and the CMSG macros stay within `control`, which is
    // CMSG_SPACE bytes long.
    let sent = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(fds) as u32) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr(),
                libc::CMSG_DATA(cmsg).cast::<RawFd>(),
                fds.len(),
            );
        }
        libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
    };
    match sent {
        n if n < 0 => Err(io::Error::last_os_error()),
        n if n as usize == bytes.len() => Ok(()),
        // Unix stream sends to a blocking socket go whole; a short one
        // means the peer went away.
        _ => Err(io::Error::new(io::ErrorKind::WriteZero, "short send")),
    }
}

/// Receives up to `buf.len()` bytes and the descriptors that came with
/// them (close-on-exec). `Ok((0, _))`: the peer closed.
pub fn recv(stream: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let space = cmsg_space(MAX_FDS);
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: as in `send`; the kernel writes at most msg_controllen
    // bytes of control data and `buf.len()` bytes of payload.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let n = libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut fds = Vec::new();
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(io::Error::other("descriptors were cut off in transit"));
        }
        Ok((n as usize, fds))
    }
}

/// The reading side of a conversation of lines, descriptors and blocks of
/// bytes over a Unix stream socket. Everything is read with `recvmsg`: a
/// buffered read could swallow the bytes descriptors ride on, and one
/// `recvmsg` may return the end of one message with the start of the
/// next, so what is read past a line or a block is kept for the next call,
/// and descriptors queue in the order they came.
#[derive(Default)]
pub struct Reader {
    buf: Vec<u8>,
    fds: std::collections::VecDeque<OwnedFd>,
}

impl Reader {
    /// One `recvmsg` more; the peer closing is an error.
    fn fill(&mut self, stream: &UnixStream) -> io::Result<()> {
        let mut chunk = vec![0u8; 64 * 1024];
        let (n, fds) = recv(stream, &mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the other process closed the connection",
            ));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        self.fds.extend(fds);
        Ok(())
    }

    /// The next line that is not empty (without its newline), at most
    /// `max` bytes long.
    pub fn line(&mut self, stream: &UnixStream, max: usize) -> io::Result<String> {
        loop {
            while self.buf.first() == Some(&b'\n') {
                self.buf.remove(0);
            }
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                return String::from_utf8(line)
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "a line not UTF-8"));
            }
            if self.buf.len() > max {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("a line longer than {max} bytes"),
                ));
            }
            self.fill(stream)?;
        }
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, stream: &UnixStream, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < n {
            self.fill(stream)?;
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// The next `n` descriptors, which came with what was read so far or
    /// come with what follows.
    pub fn fds(&mut self, stream: &UnixStream, n: usize) -> io::Result<Vec<OwnedFd>> {
        while self.fds.len() < n {
            self.fill(stream)?;
        }
        Ok(self.fds.drain(..n).collect())
    }
}

fn cmsg_space(fds: usize) -> usize {
    // SAFETY: CMSG_SPACE is arithmetic.
    unsafe { libc::CMSG_SPACE((fds * size_of::<RawFd>()) as u32) as usize }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A descriptor sent is a working copy of the same file on the other
    /// side, and the bytes come with it.
    #[test]
    fn descriptors_cross_with_their_bytes() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut keep, passed) = UnixStream::pair().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        send(&a, b"hello\n", &[passed.as_raw_fd(), listener.as_raw_fd()]).unwrap();
        drop(passed);
        let mut buf = [0u8; 64];
        let (n, fds) = recv(&b, &mut buf).unwrap();
        assert_eq!((&buf[..n], fds.len()), (&b"hello\n"[..], 2));
        let mut fds = fds.into_iter();
        let mut got = UnixStream::from(fds.next().unwrap());
        got.write_all(b"x").unwrap();
        let mut one = [0u8; 1];
        keep.read_exact(&mut one).unwrap();
        assert_eq!(&one, b"x");
        let received = std::net::TcpListener::from(fds.next().unwrap());
        assert_eq!(
            received.local_addr().unwrap(),
            listener.local_addr().unwrap()
        );
        send(&a, b"no fds", &[]).unwrap();
        let (n, fds) = recv(&b, &mut buf).unwrap();
        assert_eq!((n, fds.len()), (6, 0));
        drop(a);
        assert_eq!(recv(&b, &mut buf).unwrap().0, 0);
    }

    /// Lines, blocks and descriptors sent back to back come apart as they
    /// were sent, however `recvmsg` cuts them: a block that follows a line
    /// at once is not taken for part of it, and descriptors wait in order.
    #[test]
    fn a_reader_splits_lines_blocks_and_descriptors_as_sent() {
        let (a, b) = UnixStream::pair().unwrap();
        let files: Vec<std::fs::File> = (0..3)
            .map(|_| std::fs::File::open("/dev/null").unwrap())
            .collect();
        send(
            &a,
            b"first\n\nbatch 2\n",
            &[files[0].as_raw_fd(), files[1].as_raw_fd()],
        )
        .unwrap();
        let block = vec![7u8; 100_000];
        (&a).write_all(&block).unwrap();
        send(&a, b"last\n", &[files[2].as_raw_fd()]).unwrap();
        let mut r = Reader::default();
        assert_eq!(r.line(&b, 64).unwrap(), "first\n");
        assert_eq!(r.line(&b, 64).unwrap(), "batch 2\n");
        assert_eq!(r.fds(&b, 2).unwrap().len(), 2);
        assert_eq!(r.bytes(&b, block.len()).unwrap(), block);
        assert_eq!(r.line(&b, 64).unwrap(), "last\n");
        assert_eq!(r.fds(&b, 1).unwrap().len(), 1);
        drop(a);
        let e = r.line(&b, 64).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }
}
