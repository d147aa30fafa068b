//! The connection handoff of a takeover, between the daemon threads of the
//! two processes, once the listeners moved ([`super::takeover`]). The
//! workers quiesce, export and import ([`crate::l7::handoff::mailbox`]);
//! this passes their batches over the conversation:
//!
//! - old → new: a `batch` line with the batch's sockets attached (client
//!   and backend of each connection, in order), then its bytes in the
//!   handoff format ([`crate::l7::handoff`]);
//! - new → old: `taken`, once every connection of it is imported but not
//!   started, naming the ones it refused; the new process starts the
//!   others after writing it, the old one lets them go when it reads it. A
//!   batch never runs in both processes: if the old one never reads
//!   `taken` (the new one died first), the new one never started it;
//! - old → new, at the end: `handoff_done` with what moved, what was
//!   refused and what is left.
//!
//! One batch is in flight at a time, so a new process that fails takes
//! at most one batch with it; everything else stays served by the old one.

use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::control::{self, Command, Outcome};
use super::fdpass;
use super::takeover::Conversation;
use crate::l7::handoff::mailbox::{Arriving, FromWorker, Mailbox, ToWorker, Verdict};
use crate::l7::handoff::{self as format};
use crate::l7::metrics::TakeoverMetrics;

/// Connections per batch: two sockets each in one message (SCM_MAX_FD).
pub const MAX_BATCH: usize = fdpass::MAX_FDS / 2;

/// How long a handoff may take before what is still in the old process
/// stays there (it is then served until it ends or `timeouts.takeover`).
const HANDOFF_WITHIN: Duration = Duration::from_secs(60);

/// How long the new process's workers may take to import their share of
/// a batch.
const IMPORT_WITHIN: Duration = Duration::from_secs(10);

/// The longest line of the conversation.
const MAX_LINE: usize = 64 * 1024;

/// Test hooks, read by the new process: the largest batch it takes, and a
/// pause after each batch it confirms (so that a test can kill it in the
/// middle of a handoff).
pub const BATCH_HOOK: &str = "WEIR_TEST_HANDOFF_BATCH";
pub const PAUSE_HOOK: &str = "WEIR_TEST_HANDOFF_PAUSE_MS";

/// Tells apart the handoffs of one process: a batch a worker sent for one
/// that ended is stale.
static EPOCH: AtomicU64 = AtomicU64::new(1);

/// What the old process handed over.
#[derive(Debug, Default)]
pub struct Given {
    pub moved: u64,
    /// Refused by the new process: they go on here.
    pub failed: u64,
    pub longest_stall: Duration,
    pub took: Duration,
    /// The conversation broke: the new process is gone or misbehaved, and
    /// this process must accept again.
    pub broken: Option<String>,
}

/// Old process: hands the workers' connections over, batch by batch,
/// until every worker (`finished` or idle) has nothing more that can move
/// or [`HANDOFF_WITHIN`] passed.
pub fn give(conv: &mut Conversation, mailbox: &Mailbox, finished: impl Fn(usize) -> bool) -> Given {
    let epoch = EPOCH.fetch_add(1, Ordering::Relaxed);
    let workers = mailbox.workers();
    for w in 0..workers {
        mailbox.send(
            w,
            ToWorker::Give {
                batch: conv.batch,
                epoch,
            },
        );
    }
    let started = Instant::now();
    let mut idle = vec![false; workers];
    let mut given = Given::default();
    let mut batch = 0u64;
    loop {
        if (0..workers).all(|w| idle[w] || finished(w)) {
            break;
        }
        if started.elapsed() >= HANDOFF_WITHIN {
            tracing::warn!(
                event = "handoff_bound",
                "the handoff took {HANDOFF_WITHIN:?}: what is not handed over yet stays in this \
                 process"
            );
            break;
        }
        let Some(message) = mailbox.next(Duration::from_millis(50)) else {
            continue;
        };
        match message {
            FromWorker::Idle {
                worker,
                idle: now,
                epoch: e,
            } if e == epoch => idle[worker] = now,
            FromWorker::Batch(out) if out.epoch == epoch => {
                idle[out.worker] = false;
                let (worker, conns, since) = (out.worker, out.conns.len(), out.quiet_since);
                match pass(conv, batch, &out.conns) {
                    Ok(refused) => {
                        given.failed += refused.len() as u64;
                        given.moved += (conns - refused.len()) as u64;
                        given.longest_stall = given.longest_stall.max(since.elapsed());
                        mailbox.send(worker, ToWorker::Verdict(Verdict::Taken { refused }));
                    }
                    Err(reason) => {
                        mailbox.send(worker, ToWorker::Verdict(Verdict::Kept));
                        given.broken = Some(reason);
                        break;
                    }
                }
                batch += 1;
            }
            // A stale batch: its worker took it back when that handoff
            // stopped; its descriptors close here.
            _ => {}
        }
    }
    for w in 0..workers {
        mailbox.send(w, ToWorker::StopGiving);
    }
    given.took = started.elapsed();
    given
}

/// Sends one batch and reads its verdict: the places of the connections
/// the new process refused.
fn pass(
    conv: &mut Conversation,
    batch: u64,
    conns: &[crate::l7::handoff::mailbox::Leaving],
) -> Result<Vec<u32>, String> {
    let bytes = format::encode(conns.iter().map(|l| &l.snapshot));
    let fds: Vec<RawFd> = conns
        .iter()
        .flat_map(|l| [l.client.as_raw_fd(), l.backend.as_raw_fd()])
        .collect();
    let line = control::encode_response(Outcome::Batch {
        batch,
        conns: conns.len(),
        bytes: bytes.len(),
    });
    let failed = |e: std::io::Error| format!("passing batch {batch} to the new process: {e}");
    fdpass::send(&conv.stream, line.as_bytes(), &fds).map_err(failed)?;
    (&conv.stream).write_all(&bytes).map_err(failed)?;
    let answer = conv
        .reader
        .line(&conv.stream, MAX_LINE)
        .map_err(|e| format!("waiting for the new process to confirm batch {batch}: {e}"))?;
    match control::decode_request(&answer)? {
        Command::Taken {
            batch: b,
            mut refused,
        } if b == batch => {
            refused.sort_unstable();
            refused.dedup();
            if refused.last().is_some_and(|&i| i as usize >= conns.len()) {
                return Err(format!(
                    "the new process refused a connection batch {batch} does not have"
                ));
            }
            Ok(refused)
        }
        other => Err(format!(
            "the new process answered batch {batch} with {other:?}"
        )),
    }
}

/// Old process: tells the new one the handoff is over.
pub fn finish(conv: &mut Conversation, given: &Given, left: usize) -> std::io::Result<()> {
    let line = control::encode_response(Outcome::HandoffDone {
        moved: given.moved,
        failed: given.failed,
        left: left as u64,
        ms: given.took.as_millis() as u64,
        longest_stall_ms: given.longest_stall.as_millis() as u64,
    });
    (&conv.stream).write_all(line.as_bytes())
}

/// New process: takes batches until the old process says the handoff is
/// over; records what moved in `metrics`. An error: the old process went
/// away or misbehaved (what was confirmed runs here; the rest is its).
pub fn take(
    conv: &mut Conversation,
    mailbox: &Mailbox,
    metrics: &TakeoverMetrics,
) -> Result<(), String> {
    let pause = std::env::var(PAUSE_HOOK)
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis);
    loop {
        let line = conv
            .reader
            .line(&conv.stream, MAX_LINE)
            .map_err(|e| format!("the old weir run went away during the handoff: {e}"))?;
        match control::decode_response(&line)? {
            Outcome::Batch {
                batch,
                conns,
                bytes,
            } => {
                let refused = take_batch(conv, mailbox, batch, conns, bytes)?;
                let moved = (conns - refused.len()) as u64;
                let taken = control::encode_request(Command::Taken { batch, refused });
                (&conv.stream)
                    .write_all(taken.as_bytes())
                    .map_err(|e| format!("confirming batch {batch}: {e}"))?;
                // Written: the old process lets them go when it reads it,
                // whatever becomes of this one.
                for w in 0..mailbox.workers() {
                    mailbox.send(w, ToWorker::Start { batch });
                }
                metrics.moved.fetch_add(moved, Ordering::Relaxed);
                metrics
                    .failed
                    .fetch_add(conns as u64 - moved, Ordering::Relaxed);
                if let Some(p) = pause {
                    tracing::info!(
                        event = "handoff_paused",
                        batch,
                        "test hook: pausing after batch {batch}"
                    );
                    std::thread::sleep(p);
                }
            }
            Outcome::HandoffDone {
                left,
                ms,
                longest_stall_ms,
                ..
            } => {
                metrics.left.store(left, Ordering::Relaxed);
                metrics.duration_us.store(ms * 1000, Ordering::Relaxed);
                metrics
                    .longest_stall_us
                    .store(longest_stall_ms * 1000, Ordering::Relaxed);
                return Ok(());
            }
            other => return Err(format!("unexpected message in the handoff: {other:?}")),
        }
    }
}

/// Reads batch `batch` and has the workers import it; the places of the
/// connections refused. A batch that does not decode is refused whole.
fn take_batch(
    conv: &mut Conversation,
    mailbox: &Mailbox,
    batch: u64,
    conns: usize,
    bytes: usize,
) -> Result<Vec<u32>, String> {
    if conns > MAX_BATCH || bytes > conns * (2 * crate::l7::conn::MAX_QUEUED_BYTES + (1 << 16)) {
        return Err(format!(
            "batch {batch}: {conns} connections in {bytes} bytes is over the bounds"
        ));
    }
    let fds = conv
        .reader
        .fds(&conv.stream, 2 * conns)
        .map_err(|e| format!("batch {batch}: receiving its sockets: {e}"))?;
    let payload = conv
        .reader
        .bytes(&conv.stream, bytes)
        .map_err(|e| format!("batch {batch}: receiving it: {e}"))?;
    let all = || (0..conns as u32).collect();
    let snapshots = match format::decode(&payload) {
        Ok(s) if s.len() == conns => s,
        Ok(s) => {
            tracing::error!(
                event = "handoff_batch_refused",
                batch,
                "batch {batch} holds {} connection(s), {conns} announced: refused, they stay in \
                 the old process",
                s.len()
            );
            return Ok(all());
        }
        Err(e) => {
            tracing::error!(
                event = "handoff_batch_refused",
                batch,
                "batch {batch} refused, its connections stay in the old process: {e}"
            );
            return Ok(all());
        }
    };
    let workers = mailbox.workers();
    let mut shares: Vec<Vec<Arriving>> = (0..workers).map(|_| Vec::new()).collect();
    let mut fds = fds.into_iter();
    for (i, snapshot) in snapshots.into_iter().enumerate() {
        let (client, backend) = (fds.next().expect("counted"), fds.next().expect("counted"));
        shares[i % workers].push(Arriving {
            index: i as u32,
            snapshot,
            client,
            backend,
        });
    }
    let mut waiting = 0;
    for (w, share) in shares.into_iter().enumerate() {
        if !share.is_empty() {
            waiting += 1;
            mailbox.send(
                w,
                ToWorker::Import {
                    batch,
                    conns: share,
                },
            );
        }
    }
    let deadline = Instant::now() + IMPORT_WITHIN;
    let mut refused = Vec::new();
    while waiting > 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        match mailbox.next(left) {
            Some(FromWorker::Imported {
                batch: b,
                refused: r,
                ..
            }) if b == batch => {
                refused.extend(r);
                waiting -= 1;
            }
            Some(_) => {}
            None => {
                return Err(format!(
                    "batch {batch}: the workers did not import it within {IMPORT_WITHIN:?}"
                ));
            }
        }
    }
    refused.sort_unstable();
    Ok(refused)
}

/// The largest batch this process takes: [`MAX_BATCH`], or less through
/// the test hook.
pub fn batch_size() -> usize {
    std::env::var(BATCH_HOOK)
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(MAX_BATCH, |n: usize| n.clamp(1, MAX_BATCH))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    use super::*;
    use crate::daemon::fdpass::Reader;
    use crate::l7::handoff::mailbox::Leaving;
    use crate::l7::handoff::tests::{busy, quiet};
    use crate::l7::op::ConnId;

    fn conversation(stream: UnixStream, batch: usize) -> Conversation {
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Conversation {
            stream,
            reader: Reader::default(),
            batch,
        }
    }

    /// A connection leaving with the far ends of its two sockets, which
    /// the test keeps to check the sockets arrive.
    fn leaving(idx: u32, snapshot: crate::l7::conn::Snapshot) -> (Leaving, [UnixStream; 2]) {
        let (client, client_far) = UnixStream::pair().unwrap();
        let (backend, backend_far) = UnixStream::pair().unwrap();
        let l = Leaving {
            id: ConnId { idx, generation: 1 },
            snapshot,
            client: client.into(),
            backend: backend.into(),
        };
        (l, [client_far, backend_far])
    }

    /// A worker's inbox as the test's worker thread reads it, one
    /// message at a time.
    struct Inbox<'a> {
        mailbox: &'a Mailbox,
        read: std::collections::VecDeque<ToWorker>,
    }

    impl Inbox<'_> {
        fn of(mailbox: &Mailbox) -> Inbox<'_> {
            Inbox {
                mailbox,
                read: Default::default(),
            }
        }

        fn next(&mut self) -> ToWorker {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Some(m) = self.read.pop_front() {
                    return m;
                }
                self.read.extend(self.mailbox.take(0));
                assert!(Instant::now() < deadline, "nothing came to the worker");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// Old and new daemon threads over a real socket pair, with a thread
    /// each playing the workers: a batch of two goes over with its four
    /// sockets, the new side refuses one, the old worker hears which, the
    /// new one starts the batch only after confirming it, and the end says
    /// what moved.
    #[test]
    fn a_batch_moves_with_its_sockets_and_its_refusals_reach_both_sides() {
        let (old_end, new_end) = UnixStream::pair().unwrap();
        let (old_box, new_box) = (Mailbox::new(1).unwrap(), Mailbox::new(1).unwrap());
        let metrics = TakeoverMetrics::default();
        let (mut far, mut verdict) = (Vec::new(), None);
        std::thread::scope(|s| {
            let old_worker = s.spawn(|| {
                let mut inbox = Inbox::of(&old_box);
                let ToWorker::Give { batch, epoch } = inbox.next() else {
                    panic!("not a give");
                };
                assert_eq!(batch, 2);
                let (a, far_a) = leaving(1, busy());
                let (b, far_b) = leaving(2, quiet());
                old_box.report(FromWorker::Batch(crate::l7::handoff::mailbox::Outgoing {
                    worker: 0,
                    epoch,
                    conns: vec![a, b],
                    quiet_since: Instant::now(),
                }));
                let ToWorker::Verdict(v) = inbox.next() else {
                    panic!("not a verdict");
                };
                old_box.report(FromWorker::Idle {
                    worker: 0,
                    idle: true,
                    epoch,
                });
                assert!(matches!(inbox.next(), ToWorker::StopGiving));
                (v, [far_a, far_b])
            });
            let new_worker = s.spawn(|| {
                let mut inbox = Inbox::of(&new_box);
                let ToWorker::Import { batch, conns } = inbox.next() else {
                    panic!("not an import");
                };
                assert_eq!(
                    conns
                        .iter()
                        .map(|a| (a.index, &a.snapshot))
                        .collect::<Vec<_>>(),
                    [(0, &busy()), (1, &quiet())]
                );
                new_box.report(FromWorker::Imported {
                    worker: 0,
                    batch,
                    refused: vec![1],
                });
                assert!(matches!(inbox.next(), ToWorker::Start { batch: b } if b == batch));
                conns
            });
            let new_side = s.spawn(|| take(&mut conversation(new_end, 2), &new_box, &metrics));
            let mut conv = conversation(old_end, 2);
            let given = give(&mut conv, &old_box, |_| false);
            assert_eq!((given.moved, given.failed, &given.broken), (1, 1, &None));
            finish(&mut conv, &given, 1).unwrap();
            new_side.join().unwrap().unwrap();
            let (v, f) = old_worker.join().unwrap();
            verdict = Some(v);
            far.extend(f);
            // The sockets that arrived are the ones sent: bytes written
            // through them come out at the far ends kept here.
            let arrived = new_worker.join().unwrap();
            for (a, ends) in arrived.into_iter().zip(&mut far) {
                let mut client = UnixStream::from(a.client);
                client.write_all(b"c").unwrap();
                let mut got = [0u8; 1];
                ends[0].read_exact(&mut got).unwrap();
                assert_eq!(&got, b"c");
                let mut backend = UnixStream::from(a.backend);
                backend.write_all(b"b").unwrap();
                ends[1].read_exact(&mut got).unwrap();
                assert_eq!(&got, b"b");
            }
        });
        assert_eq!(verdict, Some(Verdict::Taken { refused: vec![1] }));
        let m = metrics.snapshot();
        assert_eq!((m.moved, m.failed, m.left), (1, 1, 1));
    }

    /// A new process that goes away before it confirms a batch: the batch
    /// is kept by its worker, the handoff stops, and the old side says
    /// the conversation broke (it then accepts again).
    #[test]
    fn a_new_process_gone_before_its_confirmation_leaves_the_batch_where_it_was() {
        let (old_end, new_end) = UnixStream::pair().unwrap();
        let old_box = Mailbox::new(1).unwrap();
        std::thread::scope(|s| {
            let old_worker = s.spawn(|| {
                let mut inbox = Inbox::of(&old_box);
                let ToWorker::Give { epoch, .. } = inbox.next() else {
                    panic!("not a give");
                };
                let (a, _far) = leaving(1, quiet());
                old_box.report(FromWorker::Batch(crate::l7::handoff::mailbox::Outgoing {
                    worker: 0,
                    epoch,
                    conns: vec![a],
                    quiet_since: Instant::now(),
                }));
                (inbox.next(), inbox.next())
            });
            // The new side reads the whole batch and dies.
            s.spawn(move || {
                let mut r = Reader::default();
                let line = r.line(&new_end, MAX_LINE).unwrap();
                let Ok(Outcome::Batch { conns, bytes, .. }) = control::decode_response(&line)
                else {
                    panic!("not a batch: {line}");
                };
                assert_eq!(r.fds(&new_end, 2 * conns).unwrap().len(), 2);
                r.bytes(&new_end, bytes).unwrap();
                drop(new_end);
            });
            let given = give(&mut conversation(old_end, 5), &old_box, |_| false);
            assert_eq!(given.moved, 0);
            assert!(
                given
                    .broken
                    .as_deref()
                    .is_some_and(|b| b.contains("waiting for the new process to confirm batch 0")),
                "{given:?}"
            );
            let (first, second) = old_worker.join().unwrap();
            assert!(matches!(first, ToWorker::Verdict(Verdict::Kept)));
            assert!(matches!(second, ToWorker::StopGiving));
        });
    }
}
