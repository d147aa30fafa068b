//! The control socket of a running `weir run` (`control.sock` in the
//! instance's state directory): one JSON line each way per connection, a
//! request and its answer. Both carry the protocol version, so that a
//! command from another weir binary (`weir reload`, `weir run
//! --takeover`) is refused with a reason instead of misread.
//!
//! The messages and their checks are pure ([`decode_request`],
//! [`encode_response`] and their mirrors); [`ControlSocket`] serves them
//! one connection at a time and hands each command to the daemon's loop;
//! [`call`] is the client side. A takeover goes on over the same
//! connection after its request ([`super::takeover`]).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The protocol this binary speaks. 2: a takeover hands over the
/// connections too.
pub const VERSION: u32 = 2;

/// The longest request line read; a reload request is a few dozen bytes.
const MAX_REQUEST: u64 = 64 * 1024;
/// The longest answer read: one line per change of a reload, which a
/// file of many listeners and routes can make long.
const MAX_ANSWER: u64 = 16 << 20;

/// What a client asks of the daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// Read the configuration file again and apply it in place.
    Reload,
    /// Pass the listening sockets to the process asking
    /// ([`super::takeover`]).
    Takeover,
    /// Within a takeover: the new process accepts on every socket it was
    /// passed; the old one may stop accepting, then hand over its
    /// connections in batches of at most `batch`.
    Confirm { batch: usize },
    /// Who serves and what it holds (`weir upgrade` waits for the new
    /// process to answer).
    Status,
    /// Within a takeover: the new process runs the connections of batch
    /// `batch` but those `refused` (their places in it), which the old one
    /// keeps serving.
    Taken { batch: u64, refused: Vec<u32> },
}

/// The daemon's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// Applied by every worker; one line per change (none: the file says
    /// what already runs).
    Reloaded { changes: Vec<String> },
    /// Nothing changed, for this reason (one line).
    Refused { reason: String },
    /// The process answering, the connections it holds and what the
    /// takeover that started it moved.
    Status {
        pid: u32,
        connections: usize,
        takeover: crate::l7::metrics::TakeoverSnapshot,
    },
    /// A takeover goes ahead: these sockets come with this line, in this
    /// order: the daemon lock, the metrics listener, then each listener's
    /// sockets.
    /// `handoff` is the connection format ([`crate::l7::handoff`])
    /// version it writes: a new process that reads another refuses.
    Offered {
        pid: u32,
        listeners: Vec<OfferedListener>,
        metrics: Option<SocketAddr>,
        fds: usize,
        handoff: u16,
    },
    /// The old process stopped accepting and serving its control socket;
    /// it holds this many connections, which it hands over next.
    HandedOver { connections: usize },
    /// A batch of `conns` connections: their two sockets each (client,
    /// backend) come with this line, and `bytes` of handoff format after
    /// it.
    Batch {
        batch: u64,
        conns: usize,
        bytes: usize,
    },
    /// The handoff is over: connections moved, refused by the new
    /// process, left in the old one (handshaking, closing or never quiet);
    /// how long it took and the longest a connection was held quiet.
    HandoffDone {
        moved: u64,
        failed: u64,
        left: u64,
        ms: u64,
        longest_stall_ms: u64,
    },
}

/// One listener a takeover passes: its configured address, the address
/// it is bound to, and how many SO_REUSEPORT sockets (one per old worker).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfferedListener {
    pub listen: SocketAddr,
    pub bound: SocketAddr,
    pub sockets: usize,
}

#[derive(Serialize, Deserialize)]
struct Request {
    version: u32,
    command: Command,
}

#[derive(Serialize, Deserialize)]
struct Response {
    version: u32,
    #[serde(flatten)]
    outcome: Outcome,
}

/// Any message's version.
#[derive(Deserialize)]
struct Versioned {
    version: u32,
}

pub fn encode_request(command: Command) -> String {
    line(&Request {
        version: VERSION,
        command,
    })
}

/// A request line, or the refusal to answer it with.
pub fn decode_request(line: &str) -> Result<Command, String> {
    decode::<Request>(line, "not a control request", |version| {
        format!(
            "control protocol version {version} is not spoken here (this weir run speaks \
             version {VERSION}); use the weir binary that runs"
        )
    })
    .map(|r| r.command)
}

pub fn encode_response(outcome: Outcome) -> String {
    line(&Response {
        version: VERSION,
        outcome,
    })
}

/// An answer line; an error when it is not one this binary can read.
pub fn decode_response(line: &str) -> Result<Outcome, String> {
    decode::<Response>(line, "unreadable answer from weir run", |version| {
        format!(
            "weir run answered in control protocol version {version}, this binary reads \
             version {VERSION}"
        )
    })
    .map(|r| r.outcome)
}

/// A message of this version, read after its version alone: another
/// version's message may not parse as this one's.
fn decode<T: DeserializeOwned>(
    line: &str,
    unreadable: &str,
    other_version: impl FnOnce(u32) -> String,
) -> Result<T, String> {
    let version = serde_json::from_str::<Versioned>(line)
        .map_err(|e| format!("{unreadable}: {e}"))?
        .version;
    if version != VERSION {
        return Err(other_version(version));
    }
    serde_json::from_str(line).map_err(|e| format!("{unreadable}: {e}"))
}

fn line(message: &impl Serialize) -> String {
    let mut s = serde_json::to_string(message).expect("control messages serialize");
    s.push('\n');
    s
}

/// A command for the daemon's loop, with where its answer goes.
pub struct Call {
    pub command: Command,
    pub reply: mpsc::Sender<Outcome>,
    /// The client's connection, for a takeover: the daemon goes on over
    /// it and drops `reply` without an answer.
    pub conversation: Option<UnixStream>,
}

/// The listening control socket: served by a thread of its own until
/// dropped, which also removes the socket file.
pub struct ControlSocket {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ControlSocket {
    /// Binds `path` (a file left there by a process that held the
    /// daemon lock before is removed first: whoever calls this holds it
    /// now) and passes each command to `calls`. `answer_within` bounds
    /// the wait for the daemon's answer.
    pub fn serve(
        path: &Path,
        calls: mpsc::Sender<Call>,
        answer_within: Duration,
    ) -> io::Result<Self> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("weir-control".into())
            .spawn(move || {
                while !stopping.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => answer(stream, &calls, answer_within),
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Reads one request from `stream`, has the daemon carry it out, writes
/// the answer. A client that sends nothing in time gets nothing.
fn answer(stream: UnixStream, calls: &mpsc::Sender<Call>, answer_within: Duration) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    let mut request = String::new();
    let mut reader = BufReader::new((&stream).take(MAX_REQUEST));
    if reader.read_line(&mut request).is_err() {
        return;
    }
    let outcome = match decode_request(&request) {
        Err(reason) => Outcome::Refused { reason },
        Ok(command) => {
            let takeover = command == Command::Takeover;
            let (reply, answered) = mpsc::channel();
            let conversation = match command {
                Command::Takeover => stream.try_clone().ok(),
                _ => None,
            };
            if calls
                .send(Call {
                    command,
                    reply,
                    conversation,
                })
                .is_err()
            {
                Outcome::Refused {
                    reason: "weir run is stopping".into(),
                }
            } else {
                match answered.recv_timeout(answer_within) {
                    Ok(outcome) => outcome,
                    // The takeover went on over the connection.
                    Err(mpsc::RecvTimeoutError::Disconnected) if takeover => {
                        return;
                    }
                    Err(_) => Outcome::Refused {
                        reason: format!("weir run did not answer within {answer_within:?}"),
                    },
                }
            }
        }
    };
    let _ = (&stream).write_all(encode_response(outcome).as_bytes());
}

/// Sends `command` to the `weir run` listening on `path` and waits at most
/// `within` for its answer.
pub fn call(path: &Path, command: Command, within: Duration) -> Result<Outcome, String> {
    let stream = UnixStream::connect(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => format!(
            "no weir run is serving here: nothing listens on {} ({e})",
            path.display()
        ),
        _ => format!("connecting to {}: {e}", path.display()),
    })?;
    let io_err = |e: io::Error| format!("talking to weir run over {}: {e}", path.display());
    stream.set_read_timeout(Some(within)).map_err(io_err)?;
    (&stream)
        .write_all(encode_request(command).as_bytes())
        .map_err(io_err)?;
    let mut answer = String::new();
    BufReader::new((&stream).take(MAX_ANSWER))
        .read_line(&mut answer)
        .map_err(io_err)?;
    if answer.is_empty() {
        return Err(format!(
            "weir run closed {} without an answer",
            path.display()
        ));
    }
    decode_response(&answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_and_its_answers_read_back() {
        let line = encode_request(Command::Reload);
        assert_eq!(line, "{\"version\":2,\"command\":\"reload\"}\n");
        assert_eq!(decode_request(&line), Ok(Command::Reload));
        for command in [
            Command::Confirm { batch: 126 },
            Command::Taken {
                batch: 3,
                refused: vec![0, 7],
            },
            Command::Status,
        ] {
            assert_eq!(
                decode_request(&encode_request(command.clone())),
                Ok(command)
            );
        }
        for outcome in [
            Outcome::Batch {
                batch: 3,
                conns: 126,
                bytes: 40_000,
            },
            Outcome::HandoffDone {
                moved: 998,
                failed: 2,
                left: 1,
                ms: 250,
                longest_stall_ms: 90,
            },
            Outcome::Status {
                pid: 42,
                connections: 1000,
                takeover: crate::l7::metrics::TakeoverSnapshot {
                    moved: 1000,
                    ..Default::default()
                },
            },
            Outcome::Reloaded {
                changes: vec!["timeouts.idle: 300s -> 10s".into()],
            },
            Outcome::Reloaded { changes: vec![] },
            Outcome::Refused {
                reason: "weir.toml:3:8: bad".into(),
            },
        ] {
            let line = encode_response(outcome.clone());
            assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
            assert_eq!(decode_response(&line), Ok(outcome));
        }
    }

    #[test]
    fn another_version_or_an_unknown_command_is_refused_with_a_reason() {
        let e = decode_request("{\"version\":1,\"command\":\"takeover\"}").unwrap_err();
        assert!(
            e.contains("version 1") && e.contains("speaks version 2"),
            "{e}"
        );
        let e = decode_request("{\"version\":2,\"command\":\"explode\"}").unwrap_err();
        assert!(e.contains("explode"), "{e}");
        assert!(decode_request("reload").is_err());
        let e = decode_response("{\"version\":7,\"outcome\":\"reloaded\"}").unwrap_err();
        assert!(e.contains("version 7"), "{e}");
    }

    /// The socket end to end: a call reaches the daemon's loop and its
    /// answer comes back; the file goes with the socket.
    #[test]
    fn a_call_goes_through_the_socket_and_back() {
        let dir = std::env::temp_dir().join(format!("weir-control-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("control.sock");
        // A stale file from an earlier holder is replaced.
        std::fs::write(&path, "stale").unwrap();
        let (tx, rx) = mpsc::channel::<Call>();
        let socket = ControlSocket::serve(&path, tx, Duration::from_secs(5)).unwrap();
        let daemon = std::thread::spawn(move || {
            let call = rx.recv().unwrap();
            assert_eq!(call.command, Command::Reload);
            assert!(call.conversation.is_none());
            call.reply
                .send(Outcome::Refused {
                    reason: "no".into(),
                })
                .unwrap();
        });
        let got = call(&path, Command::Reload, Duration::from_secs(5)).unwrap();
        assert_eq!(
            got,
            Outcome::Refused {
                reason: "no".into()
            }
        );
        daemon.join().unwrap();
        drop(socket);
        assert!(!path.exists());
        let e = call(&path, Command::Reload, Duration::from_secs(1)).unwrap_err();
        assert!(e.contains("no weir run is serving here"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
