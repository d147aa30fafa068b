//! `weir run --takeover` hands every relaying WebSocket to the new
//! process: 1,000 connections carrying checksummed traffic both ways
//! (with frames and pings in flight at the switch) survive three
//! takeovers untouched; a drain keeps its schedule across a takeover; a
//! new process killed mid-handoff takes only the batches it confirmed
//! with it; a new binary that cannot read the old one's handoff format
//! refuses before anything moves.

mod common;

use std::collections::VecDeque;
use std::io::ErrorKind;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream as AsyncStream};
use tokio::sync::{mpsc, watch};

use common::require_root;
use common::takeover::{Bed, FakeOld, OLD, SVC, echoes, local, open, rest_of};
use common::ws::{close_code, send, try_recv, try_send, upgrade};
use weir::l7::frame::{self, FrameHeader, Opcode};
use weir::l7::handshake::accept_key;

const LONG: Duration = Duration::from_secs(300);
const MOVED: &str = "weir_l7_takeover_connections_total{outcome=\"moved\"}";
const FAILED: &str = "weir_l7_takeover_connections_total{outcome=\"failed\"}";
/// Test hooks of the new process: connections per batch, and a pause
/// after each batch it confirmed.
const BATCH: &str = "WEIR_TEST_HANDOFF_BATCH";
const BATCH_PAUSE: &str = "WEIR_TEST_HANDOFF_PAUSE_MS";
/// The new process's log line when the handoff is over (`--log-format
/// json`).
const TAKEOVER_DONE: &str = "\"event\":\"takeover_done\"";
/// How soon a process whose connections all moved must be gone.
const OLD_EXITS_WITHIN: Duration = Duration::from_secs(5);

/// Waits for the takeover by run `new` to end and checks the handoff:
/// run `old` exits, every one of the `open` connections moved, none
/// failed.
fn handed_over(bed: &mut Bed, old: usize, new: usize, open: usize) {
    bed.wait_for_log(new, TAKEOVER_DONE);
    assert!(
        bed.exited(old, OLD_EXITS_WITHIN).success(),
        "{}",
        bed.log(old)
    );
    assert_eq!(bed.metric(MOVED), Some(open as f64), "{}", bed.log(new));
    assert_eq!(bed.metric(FAILED), Some(0.0), "{}", bed.log(new));
    eprintln!(
        "handoff to run {new}: {:?} s, longest stall {:?} s",
        bed.metric("weir_l7_takeover_duration_seconds"),
        bed.metric("weir_l7_takeover_longest_stall_seconds")
    );
}

// ---------------------------------------------------------------------
// 1,000 connections, three takeovers.
//
// The test process is both ends: the clients and the backend they reach
// through weir. The backend echoes each frame as it came and pushes
// messages of its own between whole echoed messages. Every message
// names its connection and sequence number and carries a checksum of its
// body, so each end checks what arrives without trusting the other; the
// clients also compare each echo with what they sent. At the end each
// end sends its counts (client 'Z', backend 'Q'), which the other
// checks. Half of the connections ("held") stop mid-frame in both
// directions for each takeover: the backend has written half of a pushed
// frame, the client a whole message, a ping, the first frame of a
// fragmented message and half of its last frame; both write the rest
// once the takeover is over (the pong too comes only then). The other
// half keep sending both ways right through it.
// ---------------------------------------------------------------------

const CONNECTIONS: usize = 1000;
const TAKEOVERS: u32 = 3;

/// What the test asks of every connection, in this order per takeover.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Flow,
    /// Held backends write half a frame.
    HalfBackend,
    /// Held clients write their messages in flight and half a frame.
    HalfClient,
    /// Held ends write the rest.
    Resume,
    /// No more traffic: each end sends its last message with its counts.
    Finish,
}

fn held(id: usize) -> bool {
    id.is_multiple_of(2)
}

/// Messages and bytes in one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Count {
    messages: u64,
    bytes: u64,
}

impl Count {
    fn add(&mut self, message: &[u8]) {
        self.messages += 1;
        self.bytes += message.len() as u64;
    }
}

/// What one client saw.
#[derive(Clone, Debug, Default)]
struct ClientTally {
    sent: Count,
    echoed: Count,
    pushed: Count,
    pongs: u64,
}

/// What the backend end of one connection saw.
#[derive(Clone, Debug, Default)]
struct BackendTally {
    received: Count,
    pushed: Count,
    /// The client's last message came, with counts equal to these.
    finished: bool,
}

/// Everything that went wrong, kept for the failure message.
#[derive(Default)]
struct Faults {
    closes: AtomicU64,
    cuts: AtomicU64,
    other: AtomicU64,
    first: Mutex<Vec<String>>,
}

impl Faults {
    fn record(&self, counter: &AtomicU64, what: String) {
        counter.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first.lock().unwrap();
        if first.len() < 20 {
            first.push(what);
        }
    }

    fn any(&self) -> bool {
        [&self.closes, &self.cuts, &self.other]
            .iter()
            .any(|c| c.load(Ordering::Relaxed) > 0)
    }

    fn report(&self) -> String {
        format!(
            "{} Close frame(s), {} cut(s), {} other fault(s); first: {:#?}",
            self.closes.load(Ordering::Relaxed),
            self.cuts.load(Ordering::Relaxed),
            self.other.load(Ordering::Relaxed),
            self.first.lock().unwrap()
        )
    }

    /// Files a read or write failure under Close, cut or other.
    fn failed(&self, who: &str, id: usize, e: &Failure) {
        let counter = match e {
            Failure::Close(_) => &self.closes,
            Failure::Cut(_) => &self.cuts,
            Failure::Wrong(_) => &self.other,
        };
        self.record(counter, format!("{who} {id}: {e}"));
    }
}

enum Failure {
    /// A Close frame arrived (its code).
    Close(u16),
    /// The stream ended or was reset.
    Cut(String),
    /// Bytes that are not what was sent.
    Wrong(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Close(code) => write!(f, "a Close {code}"),
            Failure::Cut(why) => write!(f, "cut: {why}"),
            Failure::Wrong(why) => f.write_str(why),
        }
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::Cut(e.to_string())
    }
}

/// What the phases and the tallies of every connection meet in.
struct Shared {
    phase: watch::Sender<Phase>,
    /// Held ends that did what the current phase asks.
    acks: AtomicUsize,
    faults: Faults,
    backends: Mutex<Vec<BackendTally>>,
}

impl Shared {
    /// Moves every connection to `phase` and waits until `acks` held ends
    /// did their part.
    fn step(&self, phase: Phase, acks: usize) {
        self.acks.store(0, Ordering::SeqCst);
        self.phase.send_replace(phase);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.acks.load(Ordering::SeqCst) < acks {
            assert!(
                Instant::now() < deadline,
                "{phase:?}: {} of {acks} held ends answered; {}",
                self.acks.load(Ordering::SeqCst),
                self.faults.report()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn ack(&self) {
        self.acks.fetch_add(1, Ordering::SeqCst);
    }
}

/// A 64-bit FNV-1a checksum.
fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A message of kind `tag` ('C' client, 'P' pushed): its connection,
/// sequence number and body checksum, then the body. Lengths vary from a
/// few bytes to several receive buffers; text bodies are letters.
fn message(tag: char, id: usize, seq: u64, text: bool) -> Vec<u8> {
    let mut x = (((id as u64) << 32) ^ (seq << 8) ^ u64::from(tag)) | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let len = if next() % 32 == 0 {
        8_000 + next() % 8_000
    } else {
        1 + next() % 1500
    } as usize;
    let body: Vec<u8> = (0..len)
        .map(|_| {
            let r = next();
            if text { b'a' + (r % 26) as u8 } else { r as u8 }
        })
        .collect();
    let mut out = format!("{tag}{id}:{seq}:{:016x}:", checksum(&body)).into_bytes();
    out.extend(body);
    out
}

/// Checks `got` is message `seq` of kind `tag` on connection `id`, whole.
fn check_message(tag: char, id: usize, seq: u64, got: &[u8]) -> Result<(), Failure> {
    let wrong = |why: &str| {
        Failure::Wrong(format!(
            "{why}: expected {tag}{id}:{seq}, got {:?}",
            String::from_utf8_lossy(&got[..got.len().min(40)])
        ))
    };
    let mut parts = got.splitn(4, |&b| b == b':');
    let (Some(head), Some(seq_text), Some(sum), Some(body)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(wrong("no header"));
    };
    if head != format!("{tag}{id}").as_bytes() || seq_text != seq.to_string().as_bytes() {
        return Err(wrong("out of order or misrouted"));
    }
    if sum != format!("{:016x}", checksum(body)).as_bytes() {
        return Err(wrong("checksum"));
    }
    Ok(())
}

/// Reads frames off a stream, keeping what follows the last one whole.
struct Frames<R> {
    read: R,
    buf: Vec<u8>,
}

impl<R: AsyncRead + Unpin> Frames<R> {
    fn new(read: R, buf: Vec<u8>) -> Self {
        Self { read, buf }
    }

    /// The next frame (header, payload unmasked).
    async fn next(&mut self) -> Result<(FrameHeader, Vec<u8>), Failure> {
        loop {
            if let Some(h) = frame::parse_header(&self.buf)
                .map_err(|v| Failure::Wrong(format!("bad frame header: {v:?}")))?
            {
                let end = h.header_len + h.payload_len as usize;
                if self.buf.len() >= end {
                    let mut payload = self.buf[h.header_len..end].to_vec();
                    if let Some(mask) = h.mask {
                        frame::apply_mask(&mut payload, mask, 0);
                    }
                    self.buf.drain(..end);
                    return Ok((h, payload));
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            match self.read.read(&mut chunk).await? {
                0 => return Err(Failure::Cut("end of stream".into())),
                n => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

/// Joins data frames into messages; control frames pass alone.
#[derive(Default)]
struct Messages {
    open: Option<(u8, Vec<u8>)>,
}

enum Received {
    Message(u8, Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    /// A frame of a message not yet complete.
    Partial,
}

impl Messages {
    fn take(&mut self, h: &FrameHeader, payload: Vec<u8>) -> Result<Received, Failure> {
        let wrong = |why: &str| Err(Failure::Wrong(why.to_string()));
        match h.opcode {
            8 => Err(Failure::Close(if payload.len() >= 2 {
                close_code(&payload)
            } else {
                frame::CLOSE_NO_STATUS
            })),
            9 => Ok(Received::Ping(payload)),
            10 => Ok(Received::Pong(payload)),
            0 => {
                let Some((op, mut data)) = self.open.take() else {
                    return wrong("a continuation outside a message");
                };
                data.extend(payload);
                if h.fin {
                    Ok(Received::Message(op, data))
                } else {
                    self.open = Some((op, data));
                    Ok(Received::Partial)
                }
            }
            op @ (1 | 2) if self.open.is_none() => {
                if h.fin {
                    Ok(Received::Message(op, payload))
                } else {
                    self.open = Some((op, payload));
                    Ok(Received::Partial)
                }
            }
            op => wrong(&format!("opcode {op} inside a message")),
        }
    }
}

/// Reads up to the blank line ending an HTTP head; returns the head and
/// whatever came after it.
async fn read_head(s: &mut AsyncStream) -> Result<(String, Vec<u8>), Failure> {
    let mut buf = Vec::new();
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok((String::from_utf8_lossy(&buf).into_owned(), rest));
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk).await? {
            0 => return Err(Failure::Cut("end of stream in the HTTP head".into())),
            n => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// How long until the next message or push: 0.6 to 1.4 s.
fn interval(id: usize, seq: u64) -> Duration {
    Duration::from_millis(600 + (id as u64 * 7919 + seq * 104_729) % 800)
}

// --- the backend end ---

/// What the reader of a backend connection passes to its writer.
enum Out {
    /// A data frame to echo as it came (unmasked).
    Echo(bool, u8, Vec<u8>),
    Pong(Vec<u8>),
}

async fn backend(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let s = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => return shared.faults.failed("backend accepting", 0, &e.into()),
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut s = s;
            let (head, rest) = match read_head(&mut s).await {
                Ok(x) => x,
                Err(e) => return shared.faults.failed("backend handshake", 0, &e),
            };
            let id = head
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.strip_prefix("/ws/"))
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|&id| id < CONNECTIONS);
            let key = head.lines().find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("sec-websocket-key")
                    .then(|| value.trim().to_string())
            });
            let (Some(id), Some(key)) = (id, key) else {
                let e = Failure::Wrong(format!("not a request of a client here: {head}"));
                return shared.faults.failed("backend handshake", 0, &e);
            };
            let answer = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: \
                 Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                accept_key(&key)
            );
            if let Err(e) = s.write_all(answer.as_bytes()).await {
                return shared.faults.failed("backend", id, &e.into());
            }
            let (read, write) = s.into_split();
            let (tx, rx) = mpsc::unbounded_channel();
            let reader = tokio::spawn(backend_reads(
                id,
                Frames::new(read, rest),
                tx,
                shared.clone(),
            ));
            if let Err(e) = backend_writes(id, write, rx, &shared).await {
                shared.faults.failed("backend writing", id, &e);
            }
            let _ = reader.await;
        });
    }
}

/// Checks each client message, and passes what to echo to the writer.
async fn backend_reads(
    id: usize,
    mut frames: Frames<OwnedReadHalf>,
    out: mpsc::UnboundedSender<Out>,
    shared: Arc<Shared>,
) {
    let mut messages = Messages::default();
    let mut received = Count::default();
    loop {
        let (h, payload) = match frames.next().await {
            Ok(f) => f,
            Err(Failure::Cut(_)) if shared.backends.lock().unwrap()[id].finished => return,
            Err(e) => return shared.faults.failed("backend reading", id, &e),
        };
        if h.mask.is_none() {
            let e = Failure::Wrong("an unmasked client frame".into());
            return shared.faults.failed("backend", id, &e);
        }
        if matches!(h.opcode, 0..=2) {
            let _ = out.send(Out::Echo(h.fin, h.opcode, payload.clone()));
        }
        let checked = match messages.take(&h, payload) {
            Ok(Received::Message(_, m)) if m.starts_with(b"Z") => {
                // The client's last message: its counts against ours.
                let expect = format!("Z{id}:{}:{}", received.messages, received.bytes);
                if m == expect.as_bytes() {
                    shared.backends.lock().unwrap()[id].finished = true;
                    Ok(())
                } else {
                    Err(Failure::Wrong(format!(
                        "the client counts {:?}, the backend {expect}",
                        String::from_utf8_lossy(&m)
                    )))
                }
            }
            Ok(Received::Message(_, m)) => {
                let checked = check_message('C', id, received.messages, &m);
                received.add(&m);
                shared.backends.lock().unwrap()[id].received = received;
                checked
            }
            Ok(Received::Ping(p)) => {
                let _ = out.send(Out::Pong(p));
                Ok(())
            }
            Ok(Received::Pong(_)) => Err(Failure::Wrong("a pong nobody asked for".into())),
            Ok(Received::Partial) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = checked {
            return shared.faults.failed("backend reading", id, &e);
        }
    }
}

/// Echoes in order, pushes messages of its own between whole echoed
/// messages, and for a held connection stops mid-frame while a takeover
/// runs.
async fn backend_writes(
    id: usize,
    mut write: OwnedWriteHalf,
    mut from_reader: mpsc::UnboundedReceiver<Out>,
    shared: &Shared,
) -> Result<(), Failure> {
    let mut phases = shared.phase.subscribe();
    let mut queue: VecDeque<Out> = VecDeque::new();
    // An echoed message is open: a push would land inside it.
    let mut echo_open = false;
    // The rest of a frame written in half.
    let mut unwritten: Option<Vec<u8>> = None;
    let mut want_half = false;
    let mut finishing = false;
    let mut last_written = false;
    let mut push_due = false;
    let mut pushed = Count::default();
    let mut timer = Box::pin(tokio::time::sleep(interval(id, 0)));
    loop {
        tokio::select! {
            got = from_reader.recv() => match got {
                Some(out) => queue.push_back(out),
                None => return Ok(()),
            },
            changed = phases.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let phase = *phases.borrow_and_update();
                match phase {
                    Phase::HalfBackend if held(id) => want_half = true,
                    Phase::Resume if held(id) => {
                        let rest = unwritten.take().expect("a frame written in half");
                        write.write_all(&rest).await?;
                        shared.ack();
                    }
                    Phase::Finish => finishing = true,
                    _ => {}
                }
            }
            () = &mut timer, if !finishing => {
                push_due = true;
                timer.as_mut().reset(tokio::time::Instant::now() + interval(id, pushed.messages + 1));
            }
        }
        if unwritten.is_some() {
            continue;
        }
        while let Some(out) = queue.pop_front() {
            let bytes = match out {
                Out::Echo(fin, op, payload) => {
                    echo_open = !fin;
                    let op = Opcode::from_u8(op).expect("a data opcode");
                    frame::whole_frame(op, fin, &payload, None)
                }
                Out::Pong(payload) => frame::whole_frame(Opcode::Pong, true, &payload, None),
            };
            write.write_all(&bytes).await?;
        }
        if echo_open {
            continue;
        }
        if want_half || push_due {
            let m = message('P', id, pushed.messages, false);
            pushed.add(&m);
            shared.backends.lock().unwrap()[id].pushed = pushed;
            let mut bytes = frame::whole_frame(Opcode::Binary, true, &m, None);
            if want_half {
                let rest = bytes.split_off(bytes.len() / 2);
                unwritten = Some(rest);
                want_half = false;
                write.write_all(&bytes).await?;
                shared.ack();
            } else {
                push_due = false;
                write.write_all(&bytes).await?;
            }
        }
        if finishing && !last_written {
            // Then only echoes, until the client goes.
            let last = format!("Q{id}:{}:{}", pushed.messages, pushed.bytes);
            let last = frame::whole_frame(Opcode::Text, true, last.as_bytes(), None);
            write.write_all(&last).await?;
            last_written = true;
        }
    }
}

// --- the client end ---

/// What a client waits for, in order.
#[derive(Default)]
struct Expected {
    echoes: VecDeque<(u8, Vec<u8>)>,
    pongs: VecDeque<Vec<u8>>,
    /// The client sent its last message, whose echo ends the echoes.
    last_sent: bool,
}

const MASK: [u8; 4] = [0x5a, 0x17, 0xc3, 0x8e];

fn masked(op: Opcode, fin: bool, payload: &[u8]) -> Vec<u8> {
    frame::whole_frame(op, fin, payload, Some(MASK))
}

/// One client: connects, then follows the phases; returns its tally once
/// both ends' last messages came, or files what went wrong.
async fn client(id: usize, port: u16, shared: Arc<Shared>) -> Option<ClientTally> {
    let tally = follow(id, port, &shared).await;
    if let Err(e) = &tally {
        shared.faults.failed("client", id, e);
    }
    tally.ok()
}

async fn follow(id: usize, port: u16, shared: &Arc<Shared>) -> Result<ClientTally, Failure> {
    let mut s = AsyncStream::connect(local(port)).await?;
    let request = format!(
        "GET /ws/{id} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(request.as_bytes()).await?;
    let (head, rest) = read_head(&mut s).await?;
    if !head.starts_with("HTTP/1.1 101") {
        return Err(Failure::Wrong(format!("no upgrade: {head}")));
    }
    let (read, mut write) = s.into_split();
    let expected = Arc::new(Mutex::new(Expected::default()));
    let reader = tokio::spawn(client_reads(id, Frames::new(read, rest), expected.clone()));
    let sent = client_writes(id, &mut write, &expected, shared).await;
    let sent = sent.inspect_err(|_| reader.abort())?;
    let mut tally = reader.await.expect("the reader ran")?;
    tally.sent = sent;
    // Only now: dropping the write half would end the stream early.
    drop(write);
    Ok(tally)
}

async fn client_writes(
    id: usize,
    write: &mut OwnedWriteHalf,
    expected: &Mutex<Expected>,
    shared: &Shared,
) -> Result<Count, Failure> {
    let mut phases = shared.phase.subscribe();
    let mut sent = Count::default();
    let mut unwritten: Option<Vec<u8>> = None;
    let mut round = 0;
    let mut timer = Box::pin(tokio::time::sleep(interval(id, 1)));
    // Message number `sent.messages`, counted and expected back, as
    // frames in the form its number picks (text or binary, whole or in
    // three frames);
    // when `half`, fragmented, with the second half of its last frame
    // apart.
    let next = |sent: &mut Count, half: bool| {
        let seq = sent.messages;
        let (text, fragmented) = if half {
            (false, true)
        } else {
            (matches!(seq % 4, 0 | 3), seq % 4 >= 2)
        };
        let m = message('C', id, seq, text);
        sent.add(&m);
        let op = if text { Opcode::Text } else { Opcode::Binary };
        expected
            .lock()
            .unwrap()
            .echoes
            .push_back((op as u8, m.clone()));
        let mut bytes = if fragmented {
            let (a, b) = m.split_at(m.len() / 3);
            let (b, c) = b.split_at(b.len() / 2);
            let mut bytes = masked(op, false, a);
            bytes.extend(masked(Opcode::Continuation, false, b));
            bytes.extend(masked(Opcode::Continuation, true, c));
            bytes
        } else {
            masked(op, true, &m)
        };
        let rest = half.then(|| {
            let last = masked(Opcode::Continuation, true, &[]).len() + m.len() / 4;
            bytes.split_off(bytes.len() - last)
        });
        (bytes, rest)
    };
    loop {
        tokio::select! {
            changed = phases.changed() => {
                if changed.is_err() {
                    return Ok(sent);
                }
                let phase = *phases.borrow_and_update();
                match phase {
                    Phase::HalfClient if held(id) => {
                        // A whole message, a ping, then a fragmented
                        // message whose last frame is half written.
                        let (mut bytes, _) = next(&mut sent, false);
                        let ping = format!("ping {id} {round}");
                        expected.lock().unwrap().pongs.push_back(ping.clone().into_bytes());
                        bytes.extend(masked(Opcode::Ping, true, ping.as_bytes()));
                        let (first, rest) = next(&mut sent, true);
                        bytes.extend(first);
                        write.write_all(&bytes).await?;
                        unwritten = rest;
                        round += 1;
                        shared.ack();
                    }
                    Phase::Resume if held(id) => {
                        let rest = unwritten.take().expect("a frame written in half");
                        write.write_all(&rest).await?;
                        shared.ack();
                    }
                    Phase::Finish => {
                        expected.lock().unwrap().last_sent = true;
                        let last = format!("Z{id}:{}:{}", sent.messages, sent.bytes);
                        write.write_all(&masked(Opcode::Text, true, last.as_bytes())).await?;
                        return Ok(sent);
                    }
                    _ => {}
                }
            }
            () = &mut timer, if unwritten.is_none() => {
                let (bytes, _) = next(&mut sent, false);
                write.write_all(&bytes).await?;
                timer.as_mut().reset(tokio::time::Instant::now() + interval(id, sent.messages + 1));
            }
        }
    }
}

/// Checks every echo against what was sent, every push against its
/// sequence and checksum, every pong against its ping; ends when both
/// ends' last messages came.
async fn client_reads(
    id: usize,
    mut frames: Frames<OwnedReadHalf>,
    expected: Arc<Mutex<Expected>>,
) -> Result<ClientTally, Failure> {
    let mut messages = Messages::default();
    let mut tally = ClientTally::default();
    let mut backend_done = false;
    let mut echo_done = false;
    while !(backend_done && echo_done) {
        let (h, payload) = frames.next().await?;
        if h.mask.is_some() {
            return Err(Failure::Wrong("a masked frame to the client".into()));
        }
        match messages.take(&h, payload)? {
            Received::Message(_, m) if m.starts_with(b"P") => {
                check_message('P', id, tally.pushed.messages, &m)?;
                tally.pushed.add(&m);
            }
            Received::Message(_, m) if m.starts_with(b"Q") => {
                let expect = format!("Q{id}:{}:{}", tally.pushed.messages, tally.pushed.bytes);
                if m != expect.as_bytes() {
                    return Err(Failure::Wrong(format!(
                        "the backend counts {:?}, the client {expect}",
                        String::from_utf8_lossy(&m)
                    )));
                }
                backend_done = true;
            }
            Received::Message(op, m) => {
                let mut expected = expected.lock().unwrap();
                match expected.echoes.pop_front() {
                    Some(sent) if sent == (op, m.clone()) => tally.echoed.add(&m),
                    None if expected.last_sent && m.starts_with(b"Z") => echo_done = true,
                    other => {
                        return Err(Failure::Wrong(format!(
                            "echo {:?} (opcode {op}) where {:?} was due",
                            String::from_utf8_lossy(&m[..m.len().min(40)]),
                            other.map(|(_, s)| String::from_utf8_lossy(&s[..s.len().min(40)])
                                .into_owned())
                        )));
                    }
                }
            }
            Received::Pong(p) => match expected.lock().unwrap().pongs.pop_front() {
                Some(ping) if ping == p => tally.pongs += 1,
                other => {
                    return Err(Failure::Wrong(format!(
                        "pong {p:?} where {other:?} was due"
                    )));
                }
            },
            Received::Ping(_) => {
                return Err(Failure::Wrong("weir pinged (keepalive is off)".into()));
            }
            Received::Partial => {}
        }
    }
    if !expected.lock().unwrap().pongs.is_empty() {
        return Err(Failure::Wrong("pings without a pong".into()));
    }
    Ok(tally)
}

#[test]
fn a_thousand_websockets_survive_three_takeovers_with_every_byte_in_order() {
    require_root();
    weir_testbed::raise_nofile_limit(20_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(TcpListener::bind("127.0.0.1:0"))
        .expect("a backend port");
    let backend_addr: SocketAddr = listener.local_addr().unwrap();
    let shared = Arc::new(Shared {
        phase: watch::Sender::new(Phase::Flow),
        acks: AtomicUsize::new(0),
        faults: Faults::default(),
        backends: Mutex::new(vec![BackendTally::default(); CONNECTIONS]),
    });
    rt.spawn(backend(listener, shared.clone()));

    let mut bed = Bed::behind("hoload", LONG, 0, &[backend_addr]);
    bed.json_logs = true;
    bed.start_old();
    let port = bed.port;
    let started = Instant::now();
    let clients: Vec<_> = (0..CONNECTIONS)
        .map(|id| rt.spawn(client(id, port, shared.clone())))
        .collect();
    let upgraded = || {
        let backends = shared.backends.lock().unwrap();
        backends.iter().filter(|b| b.received.messages > 0).count()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while upgraded() < CONNECTIONS {
        assert!(
            Instant::now() < deadline && !shared.faults.any(),
            "{} of {CONNECTIONS} connections carry traffic; {}",
            upgraded(),
            shared.faults.report()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "{CONNECTIONS} connections relaying after {:?}",
        started.elapsed()
    );

    let held_ends = (0..CONNECTIONS).filter(|&id| held(id)).count();
    for _ in 0..TAKEOVERS {
        std::thread::sleep(Duration::from_secs(1));
        shared.step(Phase::HalfBackend, held_ends);
        shared.step(Phase::HalfClient, held_ends);
        let switch = Instant::now();
        let new = bed.run(true, &[]);
        handed_over(&mut bed, new - 1, new, CONNECTIONS);
        eprintln!("takeover {new} over after {:?}", switch.elapsed());
        shared.step(Phase::Resume, 2 * held_ends);
        assert!(!shared.faults.any(), "{}", shared.faults.report());
    }
    std::thread::sleep(Duration::from_secs(1));
    shared.phase.send_replace(Phase::Finish);
    let tallies: Vec<_> = rt.block_on(async {
        let mut tallies = Vec::new();
        for (id, c) in clients.into_iter().enumerate() {
            match tokio::time::timeout(Duration::from_secs(20), c).await {
                Ok(Ok(Some(t))) => tallies.push(t),
                Ok(Ok(None)) => {}
                other => panic!(
                    "client {id} did not end: {other:?}; {}",
                    shared.faults.report()
                ),
            }
        }
        tallies
    });
    assert!(!shared.faults.any(), "{}", shared.faults.report());
    let backends = shared.backends.lock().unwrap().clone();
    let mut total = Count::default();
    for (id, (c, b)) in tallies.iter().zip(&backends).enumerate() {
        assert!(b.finished, "connection {id}: the backend missed the end");
        assert_eq!(c.sent, b.received, "connection {id}: client to backend");
        assert_eq!(c.sent, c.echoed, "connection {id}: echoes");
        assert_eq!(b.pushed, c.pushed, "connection {id}: backend to client");
        let pings = if held(id) { u64::from(TAKEOVERS) } else { 0 };
        assert_eq!(c.pongs, pings, "connection {id}: pongs");
        total.messages += c.sent.messages + b.pushed.messages;
        total.bytes += c.sent.bytes + b.pushed.bytes;
    }
    eprintln!(
        "{} messages, {} bytes relayed in {:?}",
        total.messages,
        total.bytes,
        started.elapsed()
    );
    rt.shutdown_timeout(Duration::from_secs(1));
}

// ---------------------------------------------------------------------
// A drain across a takeover.
// ---------------------------------------------------------------------

const DRAIN_WINDOW: Duration = Duration::from_secs(6);

/// When a connection's Close came, counted from `since`, after answering
/// it; `Err` for anything else it saw.
fn close_after(mut s: TcpStream, since: Instant) -> Result<(u16, Duration), String> {
    s.set_read_timeout(Some(DRAIN_WINDOW + Duration::from_secs(5)))
        .unwrap();
    let (fin, op, payload) = try_recv(&mut s)?;
    let at = since.elapsed();
    if (fin, op) != (true, 8) {
        return Err(format!("frame {op} before the Close"));
    }
    send(&mut s, true, Opcode::Close, &payload[..2]);
    Ok((close_code(&payload), at))
}

#[test]
fn a_takeover_in_the_middle_of_a_drain_keeps_its_schedule() {
    require_root();
    let mut bed = Bed::behind("hodrain", LONG, 2, &[]);
    bed.drain_window = Some(DRAIN_WINDOW);
    bed.json_logs = true;
    bed.configure(2, None);
    bed.start_old();
    let drained = bed.echoes[0].1;
    let (mut on_drained, mut others) = (Vec::new(), Vec::new());
    while on_drained.len() < 60 {
        assert!(others.len() < 400, "the echoes share no connections");
        let (s, head) = upgrade(bed.port, "/ws");
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        if head.to_ascii_lowercase().contains("x-weir-backend: e0") {
            on_drained.push(s);
        } else {
            others.push(s);
        }
    }
    let out = bed.weir_cli(&["backend", "drain", &SVC.to_string(), &drained.to_string()]);
    assert!(out.status.success(), "{out:?}");
    let drain_started = Instant::now();
    let waiting: Vec<_> = on_drained
        .into_iter()
        .map(|s| std::thread::spawn(move || close_after(s, drain_started)))
        .collect();

    std::thread::sleep(DRAIN_WINDOW * 2 / 5);
    let takeover_at = drain_started.elapsed();
    let new = bed.run(true, &[]);
    bed.wait_for_log(new, TAKEOVER_DONE);
    let takeover_done = drain_started.elapsed();

    let mut closes: Vec<Duration> = waiting
        .into_iter()
        .map(|w| match w.join().unwrap() {
            Ok((1001, at)) => at,
            other => panic!("a drained connection saw {other:?}"),
        })
        .collect();
    closes.sort();
    let n = closes.len();
    let slack = Duration::from_millis(1500);
    let schedule = format!(
        "closes (ms after the drain began): {:?}; takeover from {takeover_at:?} to \
         {takeover_done:?}",
        closes.iter().map(|c| c.as_millis()).collect::<Vec<_>>()
    );
    eprintln!("{schedule}");
    // The whole window is used, before and after the takeover...
    let before = closes.iter().filter(|&&c| c < takeover_at).count();
    assert!(
        (n / 5..=n * 3 / 4).contains(&before),
        "{before} of {n} before the takeover; {schedule}"
    );
    assert!(
        *closes.last().unwrap() >= DRAIN_WINDOW * 3 / 4,
        "{schedule}"
    );
    assert!(
        *closes.last().unwrap() <= DRAIN_WINDOW + slack,
        "{schedule}"
    );
    // ...with no burst at the takeover: as many as any half second holds.
    let burst = closes
        .iter()
        .filter(|&&c| c >= takeover_at && c <= takeover_done + Duration::from_millis(500))
        .count();
    assert!(burst <= n / 4, "{burst} around the takeover; {schedule}");
    let after_takeover = &closes[n - closes.iter().filter(|&&c| c > takeover_done).count()..];
    assert!(
        after_takeover.len() >= n / 4
            && after_takeover.last().unwrap() > after_takeover.first().unwrap()
            && *after_takeover.last().unwrap() - *after_takeover.first().unwrap()
                >= DRAIN_WINDOW / 3,
        "{schedule}"
    );
    // The other backend's connections were not touched. They moved, as
    // did the drained ones still open after the takeover, with their
    // schedule: the old process is gone.
    for (i, s) in others.iter_mut().enumerate() {
        echoes(s, &format!("not drained {i}"));
    }
    assert!(
        bed.exited(OLD, OLD_EXITS_WITHIN).success(),
        "{}",
        bed.log(OLD)
    );
    let moved = bed.metric(MOVED).unwrap_or(0.0) as usize;
    assert!(
        moved >= others.len() + after_takeover.len(),
        "{moved} moved; {}",
        bed.log(new)
    );
    assert_eq!(bed.metric(FAILED), Some(0.0), "{}", bed.log(new));
}

// ---------------------------------------------------------------------
// A new process killed mid-handoff.
// ---------------------------------------------------------------------

/// Echoes `text` on `s`, or says how the connection failed.
fn echo_or_cut(s: &mut TcpStream, text: &str) -> Result<(), String> {
    try_send(s, true, Opcode::Text, text.as_bytes()).map_err(|e| e.to_string())?;
    match try_recv(s)? {
        (true, 1, p) if p == text.as_bytes() => Ok(()),
        other => Err(format!("{other:?} instead of the echo")),
    }
}

#[test]
fn a_new_process_killed_mid_handoff_takes_only_its_confirmed_batches_with_it() {
    require_root();
    let mut bed = Bed::bounded("hokill", LONG);
    bed.json_logs = true;
    bed.start_old();
    let port = bed.port;
    let mut conns: Vec<TcpStream> = (0..50).map(|_| open(port)).collect();
    for (i, s) in conns.iter_mut().enumerate() {
        echoes(s, &format!("before {i}"));
    }

    let new = bed.run(true, &[(BATCH, 10), (BATCH_PAUSE, 2000)]);
    let deadline = Instant::now() + Duration::from_secs(15);
    let moved = loop {
        if let Some(m) = bed.metric(MOVED).filter(|&m| m >= 1.0) {
            break m as usize;
        }
        assert!(
            Instant::now() < deadline,
            "the new process confirmed no batch:\n{}",
            bed.log(new)
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    bed.runs[new].kill().unwrap();
    bed.runs[new].wait().unwrap();
    assert_eq!(moved, 10, "one batch of 10 before the pause");

    // The confirmed batch died with the new process; the rest stayed.
    let mut kept = Vec::new();
    let mut gone = 0;
    for (i, mut s) in conns.into_iter().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        match echo_or_cut(&mut s, &format!("after the kill {i}")) {
            Ok(()) => kept.push(s),
            Err(e) if e.contains("end of stream") || e.contains("reset") || e.contains("pipe") => {
                gone += 1
            }
            Err(e) => panic!("connection {i} neither served nor closed: {e}"),
        }
    }
    assert_eq!((gone, kept.len()), (moved, 50 - moved));
    assert!(bed.running(OLD));
    // The old process accepts again (what it accepts stays open, to be
    // moved later too).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (s, head) = upgrade(port, "/ws");
        if head.starts_with("HTTP/1.1 101") {
            kept.push(s);
            break;
        }
        assert!(Instant::now() < deadline, "{}", bed.log(OLD));
    }
    for i in 0..20 {
        let mut s = open(port);
        echoes(&mut s, &format!("accepted by the old process {i}"));
        kept.push(s);
    }

    // A later takeover moves what the old process kept and accepted.
    let later = bed.run(true, &[]);
    handed_over(&mut bed, OLD, later, kept.len());
    for (i, s) in kept.iter_mut().enumerate() {
        echoes(s, &format!("moved later {i}"));
    }
    echoes(&mut open(port), "served by the later process");
}

// ---------------------------------------------------------------------
// A handoff format the new binary cannot read.
// ---------------------------------------------------------------------

#[test]
fn a_handoff_format_the_new_process_cannot_read_is_refused_before_anything_moves() {
    require_root();
    let mut bed = Bed::bounded("hofmt", LONG);
    bed.json_logs = true;
    let fake = FakeOld::bind(&bed);
    let new = bed.run(true, &[]);
    // A well-formed offer of the daemon lock alone, in a batch format
    // from the future.
    let lock = std::fs::File::create(bed.dir.join("lock")).unwrap();
    let conversation = fake.answer(
        "{\"version\":2,\"outcome\":\"offered\",\"pid\":1,\"listeners\":[],\"metrics\":null,\
         \"fds\":1,\"handoff\":99}\n",
        &[&lock],
    );
    assert!(!bed.exited(new, Duration::from_secs(10)).success());
    // Nothing moved: no confirm came, nothing listens.
    assert_eq!(rest_of(conversation), "");
    for port in [bed.port, bed.metrics] {
        assert!(
            TcpStream::connect(local(port))
                .is_err_and(|e| e.kind() == ErrorKind::ConnectionRefused)
        );
    }
    let log = bed.log(new);
    assert!(
        log.contains("takeover refused")
            && log.contains("handoff format version")
            && log.contains("99"),
        "{log}"
    );
}
