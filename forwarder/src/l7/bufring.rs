//! A worker's provided-buffer ring (io_uring `IORING_REGISTER_PBUF_RING`).
//!
//! Multishot receives on every connection of a worker draw from this one
//! pool: the kernel picks a free buffer only when data arrives, so an idle
//! connection holds no buffer at all, which is what makes idle connections
//! cheap. A buffer goes back to the ring once its bytes were sent on (or
//! dropped); the number handed out is the worker's in-flight data, bounded
//! by the pool.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;

/// Largest ring the kernel accepts.
pub const MAX_ENTRIES: u16 = 32768;

/// The ring of buffer descriptors (shared with the kernel) and the buffers.
pub struct BufRing {
    ring: NonNull<BufRingEntry>,
    ring_len: usize,
    bufs: NonNull<u8>,
    bufs_len: usize,
    entries: u16,
    buf_size: u32,
    bgid: u16,
    /// Our copy of the tail: the kernel only reads it.
    tail: u16,
    /// Buffers currently handed out (received into, not yet recycled).
    in_use: u32,
    /// Buffers the kernel has taken since creation: the owner compares it
    /// across ticks to tell a quiet pool.
    taken_total: u64,
}

fn mmap_anon(len: usize) -> io::Result<NonNull<u8>> {
    // SAFETY: a fresh private anonymous mapping; checked for failure.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(NonNull::new(ptr.cast()).expect("mmap never returns null on success"))
}

impl BufRing {
    /// Creates `entries` buffers of `buf_size` bytes and registers them with
    /// `ring` as buffer group `bgid`. `entries` must be a power of two up to
    /// [`MAX_ENTRIES`].
    pub fn new(
        ring: &io_uring::IoUring,
        bgid: u16,
        entries: u16,
        buf_size: u32,
    ) -> io::Result<Self> {
        if !entries.is_power_of_two() || entries > MAX_ENTRIES || buf_size == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "buffer ring: {entries} entries of {buf_size} bytes (entries must be a power of two up to {MAX_ENTRIES})"
                ),
            ));
        }
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let ring_len = (entries as usize * size_of::<BufRingEntry>()).next_multiple_of(page);
        let bufs_len = (entries as usize * buf_size as usize).next_multiple_of(page);
        let ring_mem = mmap_anon(ring_len)?;
        let bufs = match mmap_anon(bufs_len) {
            Ok(b) => b,
            Err(e) => {
                // SAFETY: unmapping what we just mapped.
                unsafe { libc::munmap(ring_mem.as_ptr().cast(), ring_len) };
                return Err(e);
            }
        };
        let mut this = Self {
            ring: ring_mem.cast(),
            ring_len,
            bufs,
            bufs_len,
            entries,
            buf_size,
            bgid,
            tail: 0,
            in_use: entries as u32,
            taken_total: 0,
        };
        // SAFETY: the ring memory is page aligned, sized for `entries`, and
        // lives (in `this`) until it is unregistered in Drop.
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                this.ring.as_ptr() as u64,
                entries,
                bgid,
                0,
            )?;
        }
        for bid in 0..entries {
            this.recycle(bid);
        }
        Ok(this)
    }

    pub fn bgid(&self) -> u16 {
        self.bgid
    }

    /// Buffers the kernel cannot use right now (data waiting to be sent on).
    pub fn in_use(&self) -> u32 {
        self.in_use
    }

    /// The first `len` bytes the kernel received into buffer `bid`.
    pub fn buffer(&self, bid: u16, len: usize) -> &[u8] {
        assert!(
            bid < self.entries && len <= self.buf_size as usize,
            "buffer {bid} length {len}"
        );
        // SAFETY: in bounds (checked); the kernel finished writing this buffer
        // before it posted the completion that named it.
        unsafe {
            std::slice::from_raw_parts(
                self.bufs
                    .as_ptr()
                    .add(bid as usize * self.buf_size as usize),
                len,
            )
        }
    }

    /// A buffer was taken by the kernel for a completion: account for it.
    pub fn taken(&mut self) {
        self.in_use += 1;
        self.taken_total += 1;
    }

    /// Buffers taken since the pool was made.
    pub fn taken_total(&self) -> u64 {
        self.taken_total
    }

    /// Gives the pool's memory back to the kernel when no buffer is handed
    /// out; returns whether it did. The kernel hands buffers out in ring
    /// order, so traffic touches every buffer of the pool in turn and a
    /// pool's resident memory grows to its full size; once the traffic has
    /// stopped (idle connections), this keeps the promise that idle
    /// connections hold no userspace buffer memory. The pages come back,
    /// zeroed, the next time the kernel writes into them.
    ///
    /// Call it only between `io_uring_enter` calls, with the completion
    /// queue drained, on a ring set up with DEFER_TASKRUN and without
    /// IOSQE_ASYNC receives: then the kernel selects and fills buffers only
    /// inside this thread's `io_uring_enter`, so no write into a free buffer
    /// can race with the release.
    pub fn release_memory(&mut self) -> io::Result<bool> {
        if self.in_use != 0 {
            return Ok(false);
        }
        // SAFETY: the range is exactly the buffer mapping; no buffer is
        // handed out, and (see above) the kernel cannot be writing into a
        // free one now. Discarding their contents is harmless: a free
        // buffer's bytes mean nothing.
        let r = unsafe {
            libc::madvise(
                self.bufs.as_ptr().cast(),
                self.bufs_len,
                libc::MADV_DONTNEED,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(true)
    }

    /// Gives buffer `bid` back to the kernel.
    pub fn recycle(&mut self, bid: u16) {
        assert!(bid < self.entries, "buffer {bid} of {}", self.entries);
        let mask = self.entries - 1;
        // SAFETY: the slot index is masked into the ring; entries are plain
        // data the kernel reads only up to the published tail.
        unsafe {
            let entry = &mut *self.ring.as_ptr().add((self.tail & mask) as usize);
            entry.set_addr(
                self.bufs
                    .as_ptr()
                    .add(bid as usize * self.buf_size as usize) as u64,
            );
            entry.set_len(self.buf_size);
            entry.set_bid(bid);
        }
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: the tail field overlays entry 0's reserved field; it is
        // written with release ordering so the kernel sees the entry first.
        unsafe {
            let tail = BufRingEntry::tail(self.ring.as_ptr()) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
        self.in_use -= 1;
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // The kernel keeps writing into buffers it holds until the io_uring
        // instance is gone: the owner drops that first (field order in the
        // worker), then this memory.
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe {
            libc::munmap(self.ring.as_ptr().cast(), self.ring_len);
            libc::munmap(self.bufs.as_ptr().cast(), self.bufs_len);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    use io_uring::{IoUring, cqueue, opcode, types};

    use super::*;

    /// Completes `n` CQEs (or fewer if the ring stays quiet for a second).
    fn reap(ring: &mut IoUring, n: usize) -> Vec<(i32, u32)> {
        let mut out = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while out.len() < n && std::time::Instant::now() < deadline {
            ring.submit_and_wait(1).unwrap();
            out.extend(ring.completion().map(|c| (c.result(), c.flags())));
        }
        out
    }

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        a.set_nodelay(true).unwrap();
        (a, b)
    }

    /// Pages of the buffer mapping that are resident now (mincore).
    fn resident_pages(pool: &BufRing) -> usize {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let mut vec = vec![0u8; pool.bufs_len.div_ceil(page)];
        // SAFETY: mincore over our own mapping, one byte per page.
        let r =
            unsafe { libc::mincore(pool.bufs.as_ptr().cast(), pool.bufs_len, vec.as_mut_ptr()) };
        assert_eq!(r, 0, "mincore: {}", io::Error::last_os_error());
        vec.iter().filter(|b| *b & 1 == 1).count()
    }

    /// Traffic makes the pool resident; releasing it while no buffer is
    /// out drops every page, refuses while one is out, and receives
    /// afterwards still land intact.
    #[test]
    fn release_memory_drops_the_pool_and_keeps_it_usable() {
        let mut ring = IoUring::new(64).unwrap();
        let mut pool = BufRing::new(&ring, 3, 8, 8192).unwrap();
        let (mut client, server) = pair();
        arm_receive(&mut ring, &pool, server.as_raw_fd());
        let mut receive = |pool: &mut BufRing, byte: u8| -> u16 {
            client.write_all(&[byte; 5000]).unwrap();
            let mut got = 0;
            let mut bid = 0;
            while got < 5000 {
                let (res, flags) = reap(&mut ring, 1)[0];
                assert!(res > 0, "receive failed: {res}");
                bid = cqueue::buffer_select(flags).unwrap();
                pool.taken();
                assert!(pool.buffer(bid, res as usize).iter().all(|b| *b == byte));
                got += res as usize;
                if got < 5000 {
                    pool.recycle(bid);
                }
            }
            bid
        };
        for i in 0..8 {
            let bid = receive(&mut pool, b'a' + i);
            pool.recycle(bid);
        }
        assert!(resident_pages(&pool) >= 8, "traffic touched the pool");
        assert!(pool.taken_total() >= 8);

        let held = receive(&mut pool, b'x');
        assert!(!pool.release_memory().unwrap(), "a buffer is out: refused");
        pool.recycle(held);
        assert!(pool.release_memory().unwrap());
        assert_eq!(resident_pages(&pool), 0, "every page given back");

        let bid = receive(&mut pool, b'z');
        pool.recycle(bid);
        drop(ring);
        drop(pool);
    }

    /// Arms a multishot receive on `fd` drawing from `pool`.
    fn arm_receive(ring: &mut IoUring, pool: &BufRing, fd: i32) {
        let recv = opcode::RecvMulti::new(types::Fd(fd), pool.bgid())
            .build()
            .user_data(1);
        // SAFETY: the tests keep the socket open until the ring is gone.
        unsafe { ring.submission().push(&recv).unwrap() };
        ring.submit().unwrap();
    }

    #[test]
    fn rejects_bad_geometry() {
        let ring = IoUring::new(8).unwrap();
        assert!(BufRing::new(&ring, 0, 3, 64).is_err());
        assert!(BufRing::new(&ring, 0, 8, 0).is_err());
    }

    /// Multishot receive draws buffers only as data arrives, runs out
    /// (ENOBUFS ends the multishot) when none are recycled, and works again
    /// once they are.
    #[test]
    fn multishot_receive_takes_and_returns_buffers() {
        let mut ring = IoUring::new(64).unwrap();
        let mut pool = BufRing::new(&ring, 7, 4, 16).unwrap();
        assert_eq!(pool.in_use(), 0, "all buffers start with the kernel");
        let (mut client, server) = pair();
        // Ended below by ENOBUFS, then armed again.
        arm_receive(&mut ring, &pool, server.as_raw_fd());

        let mut seen = Vec::new();
        for i in 0..4u8 {
            client.write_all(&[b'a' + i; 10]).unwrap();
            let (res, flags) = reap(&mut ring, 1)[0];
            assert_eq!(res, 10, "chunk {i}");
            assert!(cqueue::more(flags), "multishot still armed");
            let bid = cqueue::buffer_select(flags).expect("a buffer was selected");
            pool.taken();
            assert_eq!(pool.buffer(bid, 10), [b'a' + i; 10]);
            seen.push(bid);
        }
        assert_eq!(pool.in_use(), 4);
        let mut sorted = seen.clone();
        sorted.sort();
        assert_eq!(sorted, [0, 1, 2, 3], "each buffer used once");

        // No buffer left: the kernel ends the multishot with ENOBUFS.
        client.write_all(b"overflow").unwrap();
        let (res, flags) = reap(&mut ring, 1)[0];
        assert_eq!(res, -libc::ENOBUFS);
        assert!(!cqueue::more(flags));

        // Recycle and re-arm: the waiting bytes arrive.
        for bid in seen {
            pool.recycle(bid);
        }
        assert_eq!(pool.in_use(), 0);
        arm_receive(&mut ring, &pool, server.as_raw_fd());
        let (res, flags) = reap(&mut ring, 1)[0];
        assert_eq!(res, 8);
        let bid = cqueue::buffer_select(flags).unwrap();
        pool.taken();
        assert_eq!(pool.buffer(bid, 8), b"overflow");
        pool.recycle(bid);
        // The ring (and its armed receive) goes before the buffers.
        drop(ring);
        drop(pool);
    }
}
