//! How a `weir run`'s daemon thread and its workers pass connections
//! during a takeover. The daemon thread speaks to the other process; the
//! workers own the connections and their io_uring. In the old process a
//! worker quiesces a batch of its connections, installs their sockets as
//! normal descriptors and sends the batch here; the daemon passes it on
//! and returns the new process's verdict. In the new process the daemon
//! hands each worker its share of a batch, the worker imports it without
//! starting it and says which it refused, and starts it once the daemon
//! has confirmed the batch to the old process: a connection never runs in
//! two processes at once.
//!
//! A worker looks at its inbox once per turn of its loop (one atomic
//! load); the daemon wakes it through an eventfd the worker keeps a read
//! armed on, so a batch does not wait for the next tick.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

use crate::l7::conn::Snapshot;
use crate::l7::op::ConnId;

/// A connection on its way out of the old process: its state and its two
/// sockets as normal descriptors (the worker keeps its direct ones until
/// the verdict).
pub struct Leaving {
    pub id: ConnId,
    pub snapshot: Snapshot,
    pub client: OwnedFd,
    pub backend: OwnedFd,
}

/// A batch of one old worker's connections.
pub struct Outgoing {
    pub worker: usize,
    /// The handoff it belongs to: a batch of one that ended is stale.
    pub epoch: u64,
    pub conns: Vec<Leaving>,
    /// When the first of them was quiesced: their stall started there.
    pub quiet_since: Instant,
}

/// What became of a batch an old worker sent.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The new process confirmed the batch: it runs every connection but
    /// those refused (indices in the batch), which go on here.
    Taken { refused: Vec<u32> },
    /// The batch did not move (the new process failed or went away): all
    /// of it goes on here.
    Kept,
}

/// A connection arriving in the new process, with its sockets.
pub struct Arriving {
    /// Its place in the batch, for the refusals.
    pub index: u32,
    pub snapshot: Snapshot,
    pub client: OwnedFd,
    pub backend: OwnedFd,
}

/// What the daemon thread asks of a worker.
pub enum ToWorker {
    /// Old process: hand over the relaying connections, at most `batch`
    /// per batch, until told to stop.
    Give { batch: usize, epoch: u64 },
    /// Old process: the verdict on the batch in flight.
    Verdict(Verdict),
    /// Old process: stop handing over; what is quiet goes on here.
    StopGiving,
    /// New process: import these, but do not start them yet.
    Import { batch: u64, conns: Vec<Arriving> },
    /// New process: the old process let batch `batch` go: start it.
    Start { batch: u64 },
}

/// What a worker tells the daemon thread.
pub enum FromWorker {
    /// Old process: a batch to pass on.
    Batch(Outgoing),
    /// Old process: this worker holds nothing more it can hand over now
    /// (`true`), or it does again (`false`: a handshake finished).
    Idle {
        worker: usize,
        idle: bool,
        epoch: u64,
    },
    /// New process: its share of a batch is imported but for `refused`.
    Imported {
        worker: usize,
        batch: u64,
        refused: Vec<u32>,
    },
}

/// One worker's inbox and the eventfd that wakes it.
struct Inbox {
    queue: Mutex<Vec<ToWorker>>,
    pending: AtomicBool,
    wake: OwnedFd,
}

/// The mailboxes of one process's workers and its daemon thread.
pub struct Mailbox {
    inboxes: Box<[Inbox]>,
    to_daemon: mpsc::Sender<FromWorker>,
    from_workers: Mutex<mpsc::Receiver<FromWorker>>,
}

impl Mailbox {
    pub fn new(workers: usize) -> io::Result<Self> {
        let inboxes = (0..workers)
            .map(|_| {
                // SAFETY: eventfd returns a new descriptor or -1.
                let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(Inbox {
                    queue: Mutex::new(Vec::new()),
                    pending: AtomicBool::new(false),
                    // SAFETY: just created, owned by nobody else.
                    wake: unsafe { OwnedFd::from_raw_fd(fd) },
                })
            })
            .collect::<io::Result<_>>()?;
        let (to_daemon, from_workers) = mpsc::channel();
        Ok(Self {
            inboxes,
            to_daemon,
            from_workers: Mutex::new(from_workers),
        })
    }

    pub fn workers(&self) -> usize {
        self.inboxes.len()
    }

    /// The eventfd worker `worker` keeps a read armed on.
    pub fn wake_fd(&self, worker: usize) -> &OwnedFd {
        &self.inboxes[worker].wake
    }

    /// Puts `message` in worker `worker`'s inbox and wakes it.
    pub fn send(&self, worker: usize, message: ToWorker) {
        let inbox = &self.inboxes[worker];
        lock(&inbox.queue).push(message);
        inbox.pending.store(true, Ordering::Release);
        self.wake(worker);
    }

    /// Wakes worker `worker` (from `io_uring_enter`), so that it looks at
    /// its inbox and at the flags it shares with the daemon now.
    pub fn wake(&self, worker: usize) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to our eventfd. A full
        // counter (EAGAIN) means a wakeup is pending anyway.
        unsafe {
            libc::write(
                self.inboxes[worker].wake.as_raw_fd(),
                one.as_ptr().cast(),
                one.len(),
            );
        }
    }

    /// What worker `worker` has not read yet, oldest first; empty without
    /// a lock or a write when nothing came.
    pub fn take(&self, worker: usize) -> Vec<ToWorker> {
        let inbox = &self.inboxes[worker];
        // A load on every turn of the worker's loop; the write only when
        // something came.
        if !inbox.pending.load(Ordering::Relaxed) || !inbox.pending.swap(false, Ordering::Acquire) {
            return Vec::new();
        }
        std::mem::take(&mut *lock(&inbox.queue))
    }

    /// A worker's report to the daemon thread.
    pub fn report(&self, message: FromWorker) {
        // The daemon thread holds the receiver for the process's life.
        let _ = self.to_daemon.send(message);
    }

    /// The next report of a worker, waiting at most `within`.
    pub fn next(&self, within: Duration) -> Option<FromWorker> {
        lock(&self.from_workers).recv_timeout(within).ok()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message wakes its worker's eventfd and is taken once; the other
    /// worker's inbox stays empty.
    #[test]
    fn a_message_reaches_its_worker_once_and_wakes_it() {
        let m = Mailbox::new(2).unwrap();
        assert!(m.take(0).is_empty());
        m.send(1, ToWorker::Start { batch: 7 });
        m.send(1, ToWorker::StopGiving);
        let mut counter = [0u8; 8];
        // SAFETY: reads 8 bytes into a live buffer.
        let n = unsafe { libc::read(m.wake_fd(1).as_raw_fd(), counter.as_mut_ptr().cast(), 8) };
        assert_eq!((n, u64::from_ne_bytes(counter)), (8, 2));
        assert!(m.take(0).is_empty());
        let got = m.take(1);
        assert!(matches!(
            got.as_slice(),
            [ToWorker::Start { batch: 7 }, ToWorker::StopGiving]
        ));
        assert!(m.take(1).is_empty());
        m.report(FromWorker::Idle {
            worker: 1,
            idle: true,
            epoch: 3,
        });
        assert!(matches!(
            m.next(Duration::from_millis(10)),
            Some(FromWorker::Idle {
                worker: 1,
                idle: true,
                epoch: 3
            })
        ));
        assert!(m.next(Duration::from_millis(1)).is_none());
    }
}
