//! `weir run --takeover`: a new process takes the listening sockets of
//! the running `weir run` of its instance, so that an upgrade never
//! refuses a connect. Over the old process's control socket:
//!
//! 1. new → old: `takeover` (the control protocol's version: a process
//!    of another version refuses, or is refused, before anything moves);
//!    the old one refuses a second takeover while one runs;
//! 2. old → new: an `offered` line with the daemon lock, the metrics
//!    listener and every worker's SO_REUSEPORT listening sockets attached
//!    (SCM_RIGHTS, [`super::fdpass`]);
//! 3. the new process starts its workers accepting on them, then sends
//!    `confirm`: only now does the old one stop accepting (its workers
//!    cancel their accepts; the sockets stay open in the new process, so
//!    the kernel always has a listener to queue a client on) and stop
//!    serving the control socket;
//! 4. old → new: `handed_over` with the connections it holds; then the
//!    connections themselves, batch by batch ([`super::handoff`]), and
//!    `handoff_done`; the new process takes the control socket path and
//!    the stats file.
//!
//! A new process that dies before step 3 leaves the old one as it was;
//! one that dies during step 4 leaves the old one serving what it did not
//! hand over, and accepting again. The old one exits once it holds
//! nothing; what it could not hand over it serves until it ends or
//! `timeouts.takeover` passes, then drains it as on SIGTERM.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use super::control::{self, Command, OfferedListener, Outcome};
use super::fdpass::{self, Reader};
use crate::l7::config::Listener;
use crate::l7::handoff;
use crate::l7::socket::{bind_listeners, reuseport_listener};

/// How long the old process waits for the new one to confirm: long
/// enough to start its workers; a new process that takes longer is taken
/// for dead and the old one goes on as before.
const CONFIRM_WITHIN: Duration = Duration::from_secs(60);

/// How long the new process waits for each answer of the old one.
const ANSWER_WITHIN: Duration = Duration::from_secs(30);

/// The longest `offered` line: a few hundred bytes per listener.
const MAX_OFFER: usize = 1 << 20;

/// A listener as a takeover passes it: its configured address, the one
/// it is bound to, and its sockets, one per worker of the process that
/// bound them.
pub struct Handed {
    pub listen: SocketAddr,
    pub bound: SocketAddr,
    pub sockets: Vec<OwnedFd>,
}

/// What the old process offers: copies of its descriptors, which it keeps
/// using until the new process confirms.
pub struct Offer {
    pub lock: OwnedFd,
    pub metrics: Option<(SocketAddr, OwnedFd)>,
    pub listeners: Vec<Handed>,
}

/// The old process's side of a takeover in progress.
pub struct Giving {
    stream: UnixStream,
    /// `Ok`: the new process confirmed; `Err`: it failed or went away
    /// first, and nothing moved.
    confirmed: mpsc::Receiver<Result<Confirmed, String>>,
}

/// The new process's confirmation, and the reader of the conversation
/// (what it read past the line is the conversation's too).
pub struct Confirmed {
    /// The largest batch of connections the new process takes.
    pub batch: usize,
    reader: Reader,
}

/// The conversation with the other process once the listeners moved: the
/// connection handoff goes on over it.
pub struct Conversation {
    pub stream: UnixStream,
    pub reader: Reader,
    /// The largest batch of connections the new process takes.
    pub batch: usize,
}

impl Giving {
    /// Sends `offer` over `stream` and waits, on a thread of its own, for
    /// the new process to confirm.
    pub fn start(stream: UnixStream, offer: Offer) -> io::Result<Self> {
        let ours = stream.try_clone()?;
        let (tx, confirmed) = mpsc::channel();
        std::thread::Builder::new()
            .name("weir-takeover".into())
            .spawn(move || {
                let _ = tx.send(send_offer(&stream, &offer).and_then(|()| await_confirm(&stream)));
            })?;
        Ok(Self {
            stream: ours,
            confirmed,
        })
    }

    /// The outcome, once there is one.
    pub fn outcome(&self) -> Option<Result<Confirmed, String>> {
        match self.confirmed.try_recv() {
            Ok(r) => Some(r),
            Err(mpsc::TryRecvError::Empty) => None,
            Err(mpsc::TryRecvError::Disconnected) => {
                Some(Err("the takeover thread ended without an outcome".into()))
            }
        }
    }

    /// Tells the new process that this one stopped accepting and holds
    /// `connections`, which it hands over next in batches as `confirmed`
    /// said.
    pub fn done(self, connections: usize, confirmed: Confirmed) -> io::Result<Conversation> {
        let line = control::encode_response(Outcome::HandedOver { connections });
        (&self.stream).write_all(line.as_bytes())?;
        self.stream.set_read_timeout(Some(ANSWER_WITHIN))?;
        Ok(Conversation {
            stream: self.stream,
            reader: confirmed.reader,
            batch: confirmed.batch,
        })
    }
}

fn send_offer(stream: &UnixStream, offer: &Offer) -> Result<(), String> {
    let mut fds: Vec<RawFd> = vec![offer.lock.as_raw_fd()];
    fds.extend(offer.metrics.iter().map(|(_, fd)| fd.as_raw_fd()));
    for l in &offer.listeners {
        fds.extend(l.sockets.iter().map(AsRawFd::as_raw_fd));
    }
    let line = control::encode_response(Outcome::Offered {
        pid: std::process::id(),
        listeners: offer
            .listeners
            .iter()
            .map(|l| OfferedListener {
                listen: l.listen,
                bound: l.bound,
                sockets: l.sockets.len(),
            })
            .collect(),
        metrics: offer.metrics.as_ref().map(|(a, _)| *a),
        fds: fds.len(),
        handoff: handoff::VERSION,
    });
    let failed = |e: io::Error| format!("sending the listening sockets: {e}");
    // The line carries the first batch; each further batch rides on one
    // newline, which the reader skips.
    let mut batches = fds.chunks(fdpass::MAX_FDS);
    fdpass::send(stream, line.as_bytes(), batches.next().unwrap_or(&[])).map_err(failed)?;
    for batch in batches {
        fdpass::send(stream, b"\n", batch).map_err(failed)?;
    }
    Ok(())
}

fn await_confirm(stream: &UnixStream) -> Result<Confirmed, String> {
    stream
        .set_read_timeout(Some(CONFIRM_WITHIN))
        .map_err(|e| e.to_string())?;
    let mut reader = Reader::default();
    let line = reader.line(stream, 4096).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => "the new process went away before it confirmed".into(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            format!("the new process did not confirm within {CONFIRM_WITHIN:?}")
        }
        _ => format!("reading the new process's confirmation: {e}"),
    })?;
    match control::decode_request(&line)? {
        Command::Confirm { batch } => Ok(Confirmed {
            batch: batch.clamp(1, super::handoff::MAX_BATCH),
            reader,
        }),
        other => Err(format!("the new process sent {other:?} instead of confirm")),
    }
}

/// What the new process received.
pub struct Taken {
    stream: UnixStream,
    reader: Reader,
    /// The pid of the process taken over.
    pub pid: u32,
    pub lock: OwnedFd,
    pub metrics: Option<(SocketAddr, TcpListener)>,
    pub listeners: Vec<Handed>,
}

/// Asks the `weir run` serving `path` for its listening sockets. Refused
/// (by either side) before anything moves when the other speaks another
/// protocol version or a takeover already runs.
pub fn take(path: &Path) -> Result<Taken, String> {
    let stream = UnixStream::connect(path).map_err(|e| {
        format!(
            "no weir run to take over: nothing listens on {} ({e})",
            path.display()
        )
    })?;
    let io_err = |e: io::Error| format!("talking to weir run over {}: {e}", path.display());
    stream
        .set_read_timeout(Some(ANSWER_WITHIN))
        .map_err(io_err)?;
    (&stream)
        .write_all(control::encode_request(Command::Takeover).as_bytes())
        .map_err(io_err)?;
    let mut reader = Reader::default();
    let line = reader
        .line(&stream, MAX_OFFER)
        .map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => {
                format!("weir run closed {} without an answer", path.display())
            }
            _ => io_err(e),
        })?;
    let (pid, offered, metrics, count) = match control::decode_response(&line)? {
        Outcome::Offered {
            pid,
            listeners,
            metrics,
            fds,
            handoff: format,
        } => {
            if format != handoff::VERSION {
                // Before anything moves: the old process sees this one go
                // away before it confirmed, and goes on as it was.
                return Err(format!(
                    "takeover refused: the running weir writes handoff format version \
                     {format}, this binary reads version {}; upgrade through a version that \
                     reads both, or restart",
                    handoff::VERSION
                ));
            }
            (pid, listeners, metrics, fds)
        }
        Outcome::Refused { reason } => return Err(format!("takeover refused: {reason}")),
        other => return Err(format!("unexpected answer to a takeover: {other:?}")),
    };
    let fds = reader
        .fds(&stream, count)
        .map_err(|e| format!("weir run went away while passing its sockets: {e}"))?;
    let expected =
        offered.iter().map(|l| l.sockets).sum::<usize>() + 1 + usize::from(metrics.is_some());
    if count != expected {
        return Err(format!(
            "weir run announced {count} descriptor(s) and described {expected}"
        ));
    }
    let mut fds = fds.into_iter();
    let lock = fds.next().expect("counted");
    let metrics = metrics.map(|a| (a, TcpListener::from(fds.next().expect("counted"))));
    let listeners = offered
        .into_iter()
        .map(|l| Handed {
            listen: l.listen,
            bound: l.bound,
            sockets: fds.by_ref().take(l.sockets).collect(),
        })
        .collect();
    Ok(Taken {
        stream,
        reader,
        pid,
        lock,
        metrics,
        listeners,
    })
}

impl Taken {
    /// Tells the old process that this one accepts on every socket it was
    /// passed and takes batches of at most `batch` connections; returns the
    /// connections the old one holds once it stopped accepting, and the
    /// conversation they come over.
    pub fn confirm(self, batch: usize) -> Result<(usize, Conversation), String> {
        let Self {
            stream, mut reader, ..
        } = self;
        let io_err = |e: io::Error| format!("confirming the takeover: {e}");
        (&stream)
            .write_all(control::encode_request(Command::Confirm { batch }).as_bytes())
            .map_err(io_err)?;
        let line = reader.line(&stream, 4096).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => {
                "the old weir run went away before it stopped accepting".to_string()
            }
            _ => io_err(e),
        })?;
        match control::decode_response(&line)? {
            Outcome::HandedOver { connections } => Ok((
                connections,
                Conversation {
                    stream,
                    reader,
                    batch,
                },
            )),
            other => Err(format!("unexpected answer to confirm: {other:?}")),
        }
    }
}

/// Per worker, its listening sockets with the index of their listener in
/// the configuration.
pub type WorkerSockets = Vec<Vec<(usize, OwnedFd)>>;

/// Each worker's listening sockets for `configured`, as (listener index,
/// socket), and the addresses they listen on. A listener the old process
/// passed keeps its sockets: they are spread over the workers (every one
/// accepted, so none closes with clients in its queue), and workers
/// beyond their number bind more on the same address. Others are bound
/// afresh. Passed listeners the configuration dropped stay in `handed`.
pub fn listeners(
    configured: &[Listener],
    workers: usize,
    handed: &mut Vec<Handed>,
) -> io::Result<(WorkerSockets, Vec<SocketAddr>)> {
    let mut per_worker: WorkerSockets = (0..workers).map(|_| Vec::new()).collect();
    let mut bound = Vec::new();
    for (i, l) in configured.iter().enumerate() {
        let (addr, sockets) = match handed.iter().position(|h| h.listen == l.listen) {
            Some(at) => {
                let h = handed.swap_remove(at);
                let mut sockets = h.sockets;
                while sockets.len() < workers {
                    sockets.push(listening(h.bound)?);
                }
                (h.bound, sockets)
            }
            None => {
                let (mut fds, mut addrs) = bind_listeners(std::slice::from_ref(l), workers)?;
                let sockets = fds.iter_mut().flat_map(std::mem::take).collect();
                (addrs.remove(0), sockets)
            }
        };
        for (n, socket) in sockets.into_iter().enumerate() {
            per_worker[n % workers].push((i, socket));
        }
        bound.push(addr);
    }
    Ok((per_worker, bound))
}

fn listening(addr: SocketAddr) -> io::Result<OwnedFd> {
    reuseport_listener(addr)
        .map_err(|e| io::Error::new(e.kind(), format!("listening on {addr}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::l7::config::{ConfigBuilder, parse};

    fn configured(addrs: &[SocketAddr]) -> Vec<Listener> {
        let mut b = ConfigBuilder::new();
        for a in addrs {
            b = b.listener(*a).route("/", "198.19.0.1:80");
        }
        parse(&b.to_string(), "test").unwrap().listeners
    }

    fn local_addr(fd: &OwnedFd) -> SocketAddr {
        socket2::SockRef::from(fd)
            .local_addr()
            .unwrap()
            .as_socket()
            .unwrap()
    }

    /// Three old workers' sockets over two new workers: every socket is
    /// used (none closes with clients queued); a fourth worker would bind
    /// one more on the same port; a listener not passed is bound afresh and
    /// one the configuration dropped is left to the caller.
    #[test]
    fn passed_sockets_are_spread_over_the_workers_and_the_rest_bound() {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let first = reuseport_listener(any).unwrap();
        let bound = local_addr(&first);
        let mut passed = vec![first];
        for _ in 1..3 {
            passed.push(reuseport_listener(bound).unwrap());
        }
        let dropped = reuseport_listener(any).unwrap();
        let dropped_at = local_addr(&dropped);
        let fresh: SocketAddr = format!("127.0.0.1:{}", {
            let l = std::net::TcpListener::bind(any).unwrap();
            l.local_addr().unwrap().port()
        })
        .parse()
        .unwrap();
        let mut handed = vec![
            Handed {
                listen: any,
                bound,
                sockets: passed,
            },
            Handed {
                listen: dropped_at,
                bound: dropped_at,
                sockets: vec![dropped],
            },
        ];
        let (per_worker, addrs) = listeners(&configured(&[any, fresh]), 2, &mut handed).unwrap();
        assert_eq!(addrs, [bound, fresh]);
        let on = |w: usize, i: usize| {
            per_worker[w]
                .iter()
                .filter(|(l, _)| *l == i)
                .map(|(_, fd)| local_addr(fd))
                .collect::<Vec<_>>()
        };
        assert_eq!((on(0, 0), on(1, 0)), (vec![bound, bound], vec![bound]));
        assert_eq!((on(0, 1), on(1, 1)), (vec![fresh], vec![fresh]));
        assert_eq!(handed.len(), 1);
        assert_eq!(handed[0].listen, dropped_at);

        let mut again = vec![Handed {
            listen: any,
            bound,
            sockets: vec![reuseport_listener(bound).unwrap()],
        }];
        let (per_worker, _) = listeners(&configured(&[any]), 4, &mut again).unwrap();
        assert!(per_worker.iter().all(|w| w.len() == 1));
        assert!(
            per_worker
                .iter()
                .all(|w| local_addr(&w[0].1) == bound && w[0].0 == 0)
        );
    }
}
