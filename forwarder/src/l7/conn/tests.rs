//! A client and a backend driven through one connection by bytes and a
//! virtual clock: no sockets, no ring. The harness plays the worker: it
//! hands the connection numbered buffers, carries out its sends (at once,
//! or when a test lets a slow peer take them) and records its orders.

use std::collections::BTreeMap;
use std::io;
use std::time::Duration;

use super::*;
use crate::l7::config;
use crate::l7::frame::Opcode;
use crate::l7::handshake::accept_key;

mod handover;

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
/// The mask of every frame weir writes to the backend here.
const MASK: [u8; 4] = [9, 8, 7, 6];
const CLIENT_MASK: [u8; 4] = [1, 2, 3, 4];
const BACKEND: (u32, &str) = (7, "198.19.0.10:8080");

const REQUEST: &str = "GET /chat HTTP/1.1\r\nHost: app.example\r\nUpgrade: websocket\r\n\
    Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
    Sec-WebSocket-Version: 13\r\n\r\n";

fn config(extra: &str) -> Config {
    let text = format!(
        "{extra}\n[[listener]]\nlisten = \"127.0.0.1:8080\"\n[[listener.route]]\n\
         path_prefix = \"/chat\"\nservice = \"198.19.0.1:80\"\n"
    );
    config::parse(&text, "test").expect("a valid configuration")
}

fn frame(op: Opcode, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    frame::whole_frame(op, true, payload, mask)
}

fn upgraded_head() -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        accept_key(KEY)
    )
    .into_bytes()
}

fn ix(side: Side) -> usize {
    match side {
        Side::Client => 0,
        Side::Backend => 1,
    }
}

struct Harness {
    conn: Conn,
    config: Config,
    now: Instant,
    out: Output,
    /// Buffers the connection holds, by number.
    pool: BTreeMap<u16, Vec<u8>>,
    next_bid: u16,
    /// What reached each side's socket, and whether its write side shut.
    wire: [Vec<u8>; 2],
    shut: [bool; 2],
    /// Sockets weir closed once their close handshake was done.
    closed: [bool; 2],
    /// Pieces sent straight from a receive buffer.
    zero_copy_sends: usize,
    /// Send operations, each carrying one piece or gathering several.
    sends: usize,
    /// Pieces a send gathers behind its first (the worker's: 7).
    gather: usize,
    actions: Vec<Action>,
    events: Vec<Event>,
    /// Peers take every send at once; off, sends wait for `deliver`.
    auto_send: bool,
}

impl Harness {
    fn new(config: Config) -> Self {
        let now = Instant::now();
        let peer = "198.51.100.7:40000".parse().unwrap();
        let mut h = Self {
            conn: Conn::new(now, &config, peer),
            config,
            now,
            out: Output::default(),
            pool: BTreeMap::new(),
            next_bid: 0,
            wire: Default::default(),
            shut: [false; 2],
            closed: [false; 2],
            sends: 0,
            gather: 7,
            zero_copy_sends: 0,
            actions: Vec::new(),
            events: Vec::new(),
            auto_send: true,
        };
        h.settle();
        h
    }

    /// Calls into the connection as the worker does.
    fn enter(&mut self, f: impl FnOnce(&mut Conn, &mut Cx)) {
        let mut cx = Cx {
            now: self.now,
            config: &self.config,
            routes: &self.config.listeners[0],
            mask: MASK,
            out: &mut self.out,
        };
        f(&mut self.conn, &mut cx);
    }

    /// Calls into the connection, then carries out what it asks for.
    fn call(&mut self, f: impl FnOnce(&mut Conn, &mut Cx)) {
        self.enter(f);
        self.settle();
    }

    fn settle(&mut self) {
        loop {
            for bid in self.out.recycle.drain(..) {
                assert!(
                    self.pool.remove(&bid).is_some(),
                    "buffer {bid} given back twice"
                );
            }
            self.events.append(&mut self.out.events);
            while let Some(a) = self.conn.poll_action() {
                self.actions.push(a);
            }
            if !self.auto_send || !(self.send_one(Side::Client) | self.send_one(Side::Backend)) {
                return;
            }
        }
    }

    /// Carries out one send to `side`, if one is due; true if it did.
    fn send_one(&mut self, side: Side) -> bool {
        let n = match self.conn.poll_transmit(side) {
            None => return false,
            Some(Transmit::Finish) => {
                self.shut[ix(side)] = true;
                return true;
            }
            Some(Transmit::Close) => {
                self.shut[ix(side)] = true;
                self.closed[ix(side)] = true;
                return true;
            }
            Some(Transmit::Bytes(b)) => {
                self.wire[ix(side)].extend_from_slice(b);
                b.len() as u32
            }
            Some(Transmit::Buf { bid, start, len }) => {
                let buf = &self.pool[&bid];
                let bytes = &buf[start as usize..(start + len) as usize];
                self.wire[ix(side)].extend_from_slice(bytes);
                self.zero_copy_sends += 1;
                len
            }
        };
        // As the worker does, what is queued behind goes in the same send.
        let (pool, wire) = (&self.pool, &mut self.wire[ix(side)]);
        let mut n = n as usize;
        let mut zero_copy = 0;
        self.conn.gather(side, self.gather, |piece| {
            let bytes = match piece {
                Transmit::Buf { bid, start, len } => {
                    zero_copy += 1;
                    &pool[&bid][start as usize..(start + len) as usize]
                }
                Transmit::Bytes(b) => b,
                other => panic!("gathered {other:?}"),
            };
            wire.extend_from_slice(bytes);
            n += bytes.len();
        });
        self.zero_copy_sends += zero_copy;
        self.sends += 1;
        self.enter(|c, cx| c.handle_sent(cx, side, Ok(n as u32)));
        true
    }

    /// A slow peer takes `sends` of what waits for it.
    fn deliver(&mut self, side: Side, sends: usize) {
        for _ in 0..sends {
            assert!(self.send_one(side), "nothing to send to {side:?}");
            self.settle();
        }
    }

    fn recv(&mut self, side: Side, bytes: &[u8]) {
        let bid = self.next_bid;
        self.next_bid += 1;
        self.pool.insert(bid, bytes.to_vec());
        self.call(|c, cx| c.handle_recv(cx, side, Received::Data { bid, bytes }, true));
    }

    fn eof(&mut self, side: Side) {
        self.call(|c, cx| c.handle_recv(cx, side, Received::Eof, false));
    }

    /// Moves the clock on and, as the worker's timer wheel does, handles
    /// the timeout only if the connection said it would be due by then.
    fn advance(&mut self, by: Duration) {
        self.now += by;
        let now = self.now;
        if self
            .conn
            .poll_timeout(&self.config)
            .is_some_and(|at| at <= now)
        {
            self.call(|c, cx| c.handle_timeout(cx));
        }
    }

    fn wire(&mut self, side: Side) -> Vec<u8> {
        std::mem::take(&mut self.wire[ix(side)])
    }

    fn actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    fn events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// The worker's answer to `Action::Connect`: backend `id` picked and
    /// being connected to.
    fn connecting(&mut self, id: u32) {
        let addr = BACKEND.1.parse().unwrap();
        self.call(|c, cx| c.handle_connecting(cx, id, addr));
    }

    /// A client upgraded through backend [`BACKEND`]; what got there on
    /// the way is checked and cleared.
    fn relaying(config: Config) -> Self {
        let mut h = Self::new(config);
        h.recv(Side::Client, REQUEST.as_bytes());
        let service = h.config.listeners[0].routes[0].service;
        assert_eq!(
            h.actions(),
            [Action::Recv(Side::Client), Action::Connect(service)]
        );
        h.connecting(BACKEND.0);
        h.call(|c, cx| c.handle_connected(cx, true));
        assert_eq!(h.actions(), [Action::Recv(Side::Backend)]);
        h.recv(Side::Backend, &upgraded_head());
        assert!(h.conn.is_relaying());
        assert!(h.conn.hs.is_none(), "the handshake state is gone");
        h.wire(Side::Client);
        h.wire(Side::Backend);
        h.events();
        h
    }

    /// Every buffer handed to the connection came back.
    fn assert_no_buffer_held(&self) {
        assert!(self.pool.is_empty(), "buffers held: {:?}", self.pool.keys());
    }
}

#[test]
fn a_client_upgrades_and_frames_pass_both_ways_from_the_receive_buffers() {
    let mut h = Harness::new(config(""));
    // Nothing is read before weir asked to.
    assert_eq!(h.actions(), [Action::Recv(Side::Client)]);
    assert_eq!(
        h.conn.poll_timeout(&h.config),
        Some(h.now + Duration::from_secs(10))
    );
    // The request comes in two reads; a frame follows before the backend
    // answered.
    let (a, b) = REQUEST.as_bytes().split_at(20);
    h.recv(Side::Client, a);
    assert!(h.actions().is_empty());
    let early = frame(Opcode::Text, b"early", Some(CLIENT_MASK));
    h.recv(Side::Client, &[b, early.as_slice()].concat());
    let service = h.config.listeners[0].routes[0].service;
    assert_eq!(h.actions(), [Action::Connect(service)]);
    assert_eq!(h.conn.attempts().unwrap().tried(), [] as [u32; 0]);

    h.connecting(BACKEND.0);
    assert_eq!(h.conn.attempts().unwrap().tried(), [BACKEND.0]);
    assert!(h.wire(Side::Backend).is_empty(), "nothing before connected");
    h.call(|c, cx| c.handle_connected(cx, true));
    let forwarded = "GET /chat HTTP/1.1\r\nHost: app.example\r\nUpgrade: websocket\r\n\
        Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Version: 13\r\nX-Forwarded-For: 198.51.100.7\r\n\
        X-Forwarded-Proto: http\r\n\r\n";
    assert_eq!(String::from_utf8(h.wire(Side::Backend)).unwrap(), forwarded);
    assert_eq!(h.actions(), [Action::Recv(Side::Backend)]);

    // The 101 and the backend's first frame in one read.
    let hello = frame(Opcode::Text, b"hello", None);
    h.recv(Side::Backend, &[upgraded_head(), hello.clone()].concat());
    let to_client = h.wire(Side::Client);
    assert!(to_client.starts_with(b"HTTP/1.1 101 Switching Protocols\r\n"));
    assert!(to_client.ends_with(&[b"\r\n\r\n".as_slice(), &hello].concat()));
    assert_eq!(
        h.wire(Side::Backend),
        early,
        "early bytes follow the upgrade"
    );
    let addr = BACKEND.1.parse().unwrap();
    assert_eq!(
        h.events(),
        [
            Event::Connected {
                backend: BACKEND.0,
                addr
            },
            Event::Upgraded { backend: BACKEND.0 },
            Event::Relayed {
                from: Side::Backend,
                frames: 1,
                bytes: hello.len()
            },
            Event::Relayed {
                from: Side::Client,
                frames: 1,
                bytes: early.len()
            },
        ]
    );
    assert_eq!(
        h.conn.poll_timeout(&h.config),
        Some(h.now + Duration::from_secs(300)),
        "while relaying only the idle timeout"
    );

    // Relaying: each read goes out from its own buffer.
    let sent_before = h.zero_copy_sends;
    let up = frame(Opcode::Binary, &[5; 300], Some(CLIENT_MASK));
    h.recv(Side::Client, &up);
    let down = frame(Opcode::Text, b"world", None);
    h.recv(Side::Backend, &down);
    assert_eq!(h.wire(Side::Backend), up);
    assert_eq!(h.wire(Side::Client), down);
    assert_eq!(h.zero_copy_sends, sent_before + 2);
    assert_eq!(
        h.conn.backend(),
        Some(Backend {
            id: BACKEND.0,
            addr,
            connected: true
        })
    );
    h.assert_no_buffer_held();
}

#[test]
fn a_drain_closes_at_a_frame_boundary_then_shakes_hands_and_shuts() {
    let mut h = Harness::relaying(config(""));
    // The backend is half way through a frame to the client.
    let big = frame(Opcode::Binary, &[3; 200], None);
    h.recv(Side::Backend, &big[..50]);
    assert_eq!(h.wire(Side::Client), big[..50]);
    h.call(|c, cx| c.handle_close(cx, frame::CLOSE_GOING_AWAY, "going away"));
    assert!(h.conn.is_draining());
    assert_eq!(
        h.conn.poll_timeout(&h.config),
        Some(h.now + Duration::from_secs(5))
    );
    // The backend gets its Close now (the client's frames are at a
    // boundary); the client only once its frame is whole.
    assert_eq!(
        h.wire(Side::Backend),
        frame::close_frame(1001, "going away", Some(MASK))
    );
    assert!(
        h.shut[ix(Side::Backend)],
        "nothing more goes to the backend"
    );
    assert!(h.wire(Side::Client).is_empty());
    h.recv(Side::Backend, &big[50..]);
    assert_eq!(
        h.wire(Side::Client),
        [
            &big[50..],
            &frame::close_frame(1001, "going away", None)[..]
        ]
        .concat()
    );
    assert!(h.shut[ix(Side::Client)]);
    assert!(!h.conn.is_draining(), "closing");
    // Both answer with their Close and end their streams: nothing more is
    // relayed after weir's own Close, and the connection is done.
    h.recv(
        Side::Client,
        &frame::close_frame(1001, "", Some(CLIENT_MASK)),
    );
    h.recv(Side::Backend, &frame::close_frame(1001, "", None));
    assert!(h.wire(Side::Client).is_empty() && h.wire(Side::Backend).is_empty());
    assert!(!h.conn.is_finished());
    h.eof(Side::Client);
    h.eof(Side::Backend);
    assert!(h.conn.is_finished());
    let events = h.events();
    let closing = Event::Closing {
        code: 1001,
        reason: "going away",
    };
    assert_eq!(events.iter().filter(|e| **e == closing).count(), 1);
    for to in [Side::Backend, Side::Client] {
        assert!(events.contains(&Event::CloseSent { to, code: 1001 }));
    }
    h.assert_no_buffer_held();
}

/// Either peer may start the close handshake: its Close passes, the
/// answer passes back. When the second one ends its stream, the first has
/// its handshake done: weir closes its socket (the FIN goes with the
/// close) rather than shut it and wait for its end, and the connection is
/// done; anything the first still sends is past its Close and dropped.
#[test]
fn either_side_starts_the_close_handshake() {
    let close = |from: Side, reason| {
        frame::close_frame(1000, reason, (from == Side::Client).then_some(CLIENT_MASK))
    };
    for first in [Side::Client, Side::Backend] {
        let (second, mut h) = (first.other(), Harness::relaying(config("")));
        h.recv(first, &close(first, "bye"));
        assert_eq!(h.wire(second), close(first, "bye"));
        h.recv(second, &close(second, ""));
        assert_eq!(h.wire(first), close(second, ""));
        h.eof(second);
        assert!(h.closed[ix(first)], "{first:?}");
        assert!(!h.shut[ix(second)], "{first:?}");
        assert!(h.conn.is_finished());
        // A read that raced the close.
        h.recv(first, &frame(Opcode::Text, b"late", None));
        assert!(h.wire(second).is_empty());
        let seen: Vec<Event> = h
            .events()
            .into_iter()
            .filter(|e| matches!(e, Event::CloseSeen { .. }))
            .collect();
        assert_eq!(
            seen,
            [
                Event::CloseSeen {
                    from: first,
                    code: 1000
                },
                Event::CloseSeen {
                    from: second,
                    code: 1000
                }
            ]
        );
        h.assert_no_buffer_held();
    }
}

/// A client whose socket fails (reset) mid-relay: what waited for it is
/// dropped (a Close of weir's among it counted undelivered), what it had
/// sent still reaches the backend, and then the backend's socket is closed
/// rather than shut, since no one is left to read what it would send; the
/// connection is done without waiting for the backend's end.
#[test]
fn a_client_reset_closes_the_backend_after_what_it_sent() {
    let mut h = Harness::relaying(config(""));
    h.auto_send = false;
    let up = frame(Opcode::Binary, &[5; 30], Some(CLIENT_MASK));
    h.recv(Side::Client, &up);
    h.recv(Side::Backend, &frame(Opcode::Text, b"to the client", None));
    h.call(|c, cx| c.handle_close(cx, frame::CLOSE_GOING_AWAY, "going away"));
    h.call(|c, cx| c.handle_recv(cx, Side::Client, Received::Reset, false));
    assert!(h.events().contains(&Event::ClosesUndelivered {
        to: Side::Client,
        count: 1
    }));
    assert!(
        !h.conn.is_finished(),
        "the backend still has its data to get"
    );
    // One send with the frame and weir's Close behind it, then the close.
    h.deliver(Side::Backend, 2);
    assert!(h.wire(Side::Backend).starts_with(&up));
    assert!(h.closed[ix(Side::Backend)], "closed, not shut");
    assert!(h.conn.is_finished());
    assert!(h.wire(Side::Client).is_empty());
    h.assert_no_buffer_held();
}

#[test]
fn a_backend_that_vanishes_between_frames_closes_the_client_with_1014() {
    let mut h = Harness::relaying(config(""));
    h.eof(Side::Backend);
    assert_eq!(
        h.wire(Side::Client),
        frame::close_frame(1014, "backend went away", None)
    );
    assert!(
        h.wire(Side::Backend).is_empty(),
        "no Close to a gone backend"
    );
}

#[test]
fn a_request_head_that_takes_too_long_is_408() {
    let mut h = Harness::new(config(""));
    h.recv(Side::Client, b"GET /chat HTTP/1.1\r\n");
    h.advance(Duration::from_millis(9_999));
    assert!(h.wire(Side::Client).is_empty());
    h.advance(Duration::from_millis(1));
    let reject = Reject {
        status: 408,
        reason: "the request head took too long",
    };
    assert_eq!(h.wire(Side::Client), reject.response());
    assert!(h.shut[ix(Side::Client)]);
    assert!(h.events().contains(&Event::Rejected {
        status: 408,
        reason: reject.reason
    }));
    h.eof(Side::Client);
    assert!(h.conn.is_finished());
    h.assert_no_buffer_held();
}

#[test]
fn an_unrouted_request_is_404_and_never_connects() {
    let mut h = Harness::new(config(""));
    h.recv(Side::Client, REQUEST.replace("/chat", "/other").as_bytes());
    assert_eq!(h.actions(), [Action::Recv(Side::Client)]);
    let out = String::from_utf8(h.wire(Side::Client)).unwrap();
    assert!(out.starts_with("HTTP/1.1 404 "), "{out}");
}

/// A refused connect moves on to another backend; the worker keeps
/// picking until the attempts run out (which [`Attempts`] tells).
#[test]
fn a_refused_connect_is_retried_on_another_backend() {
    let mut h = Harness::new(config(""));
    h.recv(Side::Client, REQUEST.as_bytes());
    h.actions();
    let addr = BACKEND.1.parse().unwrap();
    h.connecting(1);
    h.call(|c, cx| c.handle_connected(cx, false));
    let service = h.config.listeners[0].routes[0].service;
    assert_eq!(h.actions(), [Action::Connect(service)]);
    assert_eq!(
        h.events(),
        [Event::ConnectFailed {
            backend: 1,
            addr,
            timed_out: false
        }]
    );
    assert_eq!(h.conn.backend(), None, "the failed backend is let go");
    assert_eq!(h.conn.attempts().unwrap().tried(), [1]);
    h.connecting(2);
    h.call(|c, cx| c.handle_connected(cx, true));
    h.recv(Side::Backend, &upgraded_head());
    assert!(h.conn.is_relaying());
    assert_eq!(h.conn.backend().map(|b| b.id), Some(2));
    assert!(h.wire(Side::Client).starts_with(b"HTTP/1.1 101 "));
}

#[test]
fn connects_that_take_too_long_are_cut_then_504() {
    let mut h = Harness::new(config(""));
    h.recv(Side::Client, REQUEST.as_bytes());
    h.actions();
    for id in 1..=3 {
        h.connecting(id);
        h.advance(Duration::from_secs(3));
        assert_eq!(h.actions(), [Action::CancelConnect]);
        assert_eq!(h.conn.poll_timeout(&h.config), None, "cut once");
        // The cancelled connect completes with an error.
        h.call(|c, cx| c.handle_connected(cx, false));
        assert!(matches!(
            h.events()[..],
            [Event::ConnectFailed {
                timed_out: true,
                ..
            }]
        ));
        assert!(matches!(h.actions()[..], [Action::Connect(_)]));
    }
    // Out of attempts: the worker refuses with what they tell.
    let attempts = h.conn.attempts().unwrap();
    assert_eq!(attempts.tried(), [1, 2, 3]);
    let reject = attempts.exhausted();
    assert_eq!(reject.status, 504);
    let response = reject.response();
    h.call(|c, cx| c.handle_reject(cx, reject));
    assert_eq!(h.wire(Side::Client), response);
    assert!(h.wire(Side::Backend).is_empty());
}

#[test]
fn a_backend_that_does_not_answer_the_handshake_is_504() {
    let mut h = Harness::new(config(""));
    h.recv(Side::Client, REQUEST.as_bytes());
    h.connecting(BACKEND.0);
    h.call(|c, cx| c.handle_connected(cx, true));
    h.actions();
    h.advance(Duration::from_secs(10));
    let out = String::from_utf8(h.wire(Side::Client)).unwrap();
    assert!(out.starts_with("HTTP/1.1 504 "), "{out}");
    // The backend's socket is shut both ways, its stream counted ended.
    assert_eq!(h.actions(), [Action::Abort(Side::Backend)]);
    h.eof(Side::Client);
    assert!(h.conn.is_finished());
}

#[test]
fn an_idle_connection_is_closed_with_1001() {
    let mut h = Harness::relaying(config(""));
    h.advance(Duration::from_secs(299));
    h.recv(
        Side::Client,
        &frame(Opcode::Text, b"still here", Some(CLIENT_MASK)),
    );
    h.wire(Side::Backend);
    h.advance(Duration::from_secs(299));
    assert!(
        h.wire(Side::Client).is_empty(),
        "activity restarted the clock"
    );
    h.advance(Duration::from_secs(1));
    assert_eq!(
        h.wire(Side::Client),
        frame::close_frame(1001, "idle timeout", None)
    );
    assert_eq!(
        h.wire(Side::Backend),
        frame::close_frame(1001, "idle timeout", Some(MASK))
    );
}

#[test]
fn a_quiet_client_is_pinged_between_frames() {
    let mut h = Harness::relaying(config("[timeouts]\nping_interval = \"1s\""));
    // Mid-frame towards the client: no ping may cut in.
    let big = frame(Opcode::Binary, &[1; 100], None);
    h.recv(Side::Backend, &big[..10]);
    h.wire(Side::Client);
    h.advance(Duration::from_secs(1));
    assert!(h.wire(Side::Client).is_empty());
    h.recv(Side::Backend, &big[10..]);
    h.wire(Side::Client);
    h.advance(Duration::from_millis(999));
    assert!(h.wire(Side::Client).is_empty());
    h.advance(Duration::from_millis(1));
    assert_eq!(h.wire(Side::Client), frame::ping_frame(b"weir", None));
    // Once per interval.
    h.advance(Duration::from_millis(500));
    assert!(h.wire(Side::Client).is_empty());
}

/// The timeout the worker files a connection under is the soonest thing
/// it waits for: its phase's deadline, the idle timeout, the next ping, or
/// at once for a read that found no buffer.
#[test]
fn the_timeout_is_the_soonest_thing_waited_for() {
    let mut h = Harness::relaying(config("[timeouts]\nping_interval = \"2s\""));
    let start = h.now;
    assert_eq!(
        h.conn.poll_timeout(&h.config),
        Some(start + Duration::from_secs(2))
    );
    h.advance(Duration::from_secs(2));
    assert_eq!(h.wire(Side::Client), frame::ping_frame(b"weir", None));
    assert_eq!(
        h.conn.poll_timeout(&h.config),
        Some(start + Duration::from_secs(4))
    );
    // A read without a buffer wants the next tick.
    h.call(|c, cx| c.handle_recv(cx, Side::Backend, Received::NoBuffers, false));
    assert!(h.conn.poll_timeout(&h.config).is_some_and(|at| at <= h.now));
    h.advance(Duration::from_millis(50));
    assert_eq!(h.actions(), [Action::Recv(Side::Backend)]);
    // Closing: the close deadline, not the idle timeout nor pings.
    h.call(|c, cx| c.handle_close(cx, frame::CLOSE_GOING_AWAY, "going away"));
    assert_eq!(
        h.conn.poll_timeout(&h.config),
        Some(h.now + Duration::from_secs(5))
    );
}

/// Pieces queued while a send is in flight go out together in the next
/// one, straight from their buffers; a send that takes only part of them
/// leaves the rest, from the right byte, for the one after.
#[test]
fn queued_pieces_go_out_in_one_gathering_send() {
    let mut h = Harness::relaying(config(""));
    h.auto_send = false;
    let msgs: Vec<Vec<u8>> = (0..4u8)
        .map(|i| frame(Opcode::Binary, &[i; 10], None))
        .collect();
    for m in &msgs {
        h.recv(Side::Backend, m);
    }
    let all = msgs.concat();
    // By hand, as the worker does it: the first piece, then three more.
    let Some(Transmit::Buf { len, .. }) = h.conn.poll_transmit(Side::Client) else {
        panic!("the first buffer is sent from where it was read");
    };
    assert_eq!(len as usize, msgs[0].len());
    let mut gathered = Vec::new();
    h.conn
        .gather(Side::Client, 7, |p| gathered.push(format!("{p:?}")));
    assert_eq!(gathered.len(), 3, "{gathered:?}");
    assert_eq!(
        h.conn.poll_transmit(Side::Client),
        None,
        "one send at a time"
    );
    // The socket takes the first piece and half of the second.
    let taken = msgs[0].len() + 6;
    h.enter(|c, cx| c.handle_sent(cx, Side::Client, Ok(taken as u32)));
    h.settle();
    assert_eq!(h.out.recycle.len(), 0);
    // The rest goes in one more send, from the seventh byte of the second.
    let sends = h.sends;
    h.deliver(Side::Client, 1);
    assert_eq!(h.wire(Side::Client), all[taken..]);
    assert_eq!(h.sends, sends + 1);
    h.assert_no_buffer_held();
}

#[test]
fn peers_that_do_not_finish_closing_are_cut() {
    let mut h = Harness::relaying(config(""));
    h.call(|c, cx| c.handle_close(cx, frame::CLOSE_GOING_AWAY, "going away"));
    h.actions();
    h.advance(Duration::from_millis(4_999));
    assert!(!h.conn.is_aborted());
    h.advance(Duration::from_millis(1));
    assert!(h.conn.is_aborted());
    assert_eq!(
        h.actions(),
        [Action::Abort(Side::Client), Action::Abort(Side::Backend)]
    );
    assert!(h.conn.is_finished());
}

#[test]
fn reading_stops_at_the_high_water_mark_and_resumes_when_sends_complete() {
    let mut h = Harness::relaying(config(""));
    h.auto_send = false;
    // One piece a send, to count the queue down piece by piece.
    h.gather = 0;
    let msg = frame(Opcode::Text, b"x", None);
    // The client reads nothing (no send completes): buffers queue up to
    // HIGH_WATER.
    for _ in 0..HIGH_WATER - 1 {
        h.recv(Side::Backend, &msg);
    }
    assert!(h.actions().is_empty());
    h.recv(Side::Backend, &msg);
    assert_eq!(h.actions(), [Action::CancelRecv(Side::Backend)]);
    // More data may still come until the cancel lands; asked once only.
    h.recv(Side::Backend, &msg);
    assert!(h.actions().is_empty());
    h.call(|c, cx| c.handle_recv(cx, Side::Backend, Received::Cancelled, false));
    assert!(
        h.actions().is_empty(),
        "the client has not taken enough yet"
    );
    // The client takes its data: below half the mark, reading resumes.
    h.deliver(Side::Client, HIGH_WATER / 2 + 1);
    assert!(h.actions().is_empty());
    h.deliver(Side::Client, 1);
    assert_eq!(h.actions(), [Action::Recv(Side::Backend)]);
    h.deliver(Side::Client, HIGH_WATER / 2 - 1);
    assert_eq!(h.wire(Side::Client), msg.repeat(HIGH_WATER + 1));
    h.assert_no_buffer_held();
}

#[test]
fn an_empty_pool_pauses_reading_until_the_tick() {
    let mut h = Harness::relaying(config(""));
    h.call(|c, cx| c.handle_recv(cx, Side::Client, Received::NoBuffers, false));
    assert!(h.actions().is_empty(), "re-arming now would spin");
    h.advance(Duration::from_millis(50));
    assert_eq!(h.actions(), [Action::Recv(Side::Client)]);
}

#[test]
fn a_buffer_sent_and_given_back_lets_a_starved_read_try_again() {
    let mut h = Harness::relaying(config(""));
    h.auto_send = false;
    h.recv(Side::Backend, &frame(Opcode::Text, b"a", None));
    h.call(|c, cx| c.handle_recv(cx, Side::Client, Received::NoBuffers, false));
    assert!(h.actions().is_empty(), "re-arming now would spin");
    let Some(Transmit::Buf { len, .. }) = h.conn.poll_transmit(Side::Client) else {
        panic!("the backend's frame goes to the client");
    };
    h.call(|c, cx| c.handle_sent(cx, Side::Client, Ok(len)));
    assert_eq!(h.actions(), [Action::Recv(Side::Client)]);
}

#[test]
fn a_failed_send_drops_the_queue_and_cuts_the_connection() {
    let mut h = Harness::relaying(config(""));
    h.auto_send = false;
    h.recv(Side::Backend, &frame(Opcode::Text, b"a", None));
    h.recv(Side::Backend, &frame(Opcode::Text, b"b", None));
    assert!(matches!(
        h.conn.poll_transmit(Side::Client),
        Some(Transmit::Buf { .. })
    ));
    h.call(|c, cx| c.handle_sent(cx, Side::Client, Err(io::ErrorKind::BrokenPipe.into())));
    assert!(h.conn.is_aborted());
    assert_eq!(
        h.actions(),
        [Action::Abort(Side::Client), Action::Abort(Side::Backend)]
    );
    assert!(h.conn.poll_transmit(Side::Client).is_none());
    assert!(h.conn.is_finished());
    h.assert_no_buffer_held();
}

#[test]
fn a_client_breaking_a_frame_rule_gets_1002_and_the_backend_too() {
    let mut h = Harness::relaying(config(""));
    // Clients must mask their frames.
    h.recv(Side::Client, &frame(Opcode::Text, b"bare", None));
    let to_client = h.wire(Side::Client);
    let to_backend = h.wire(Side::Backend);
    assert_eq!(frame::close_code(&to_client[2..], None), Some(1002));
    assert_eq!(frame::close_code(&to_backend[6..], Some(MASK)), Some(1002));
    // Nothing more from it passes.
    h.recv(Side::Client, &frame(Opcode::Text, b"x", Some(CLIENT_MASK)));
    assert!(h.wire(Side::Backend).is_empty());
    h.assert_no_buffer_held();
}

#[test]
fn the_worker_shutting_down_refuses_handshakes_only() {
    let mut h = Harness::new(config(""));
    h.recv(Side::Client, b"GET /chat");
    h.call(|c, cx| c.handle_shutdown(cx));
    let out = String::from_utf8(h.wire(Side::Client)).unwrap();
    assert!(out.starts_with("HTTP/1.1 503 "), "{out}");

    let mut h = Harness::relaying(config(""));
    h.call(|c, cx| c.handle_shutdown(cx));
    assert!(
        h.wire(Side::Client).is_empty(),
        "a relaying one drains instead"
    );
    assert!(h.conn.is_relaying());
    // A backend's refusal on its way to the client is not answered twice.
    let mut h = Harness::new(config(""));
    h.recv(Side::Client, REQUEST.as_bytes());
    h.connecting(BACKEND.0);
    h.call(|c, cx| c.handle_connected(cx, true));
    let refusal = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 4\r\n\r\nno";
    h.recv(Side::Backend, refusal);
    h.call(|c, cx| c.handle_shutdown(cx));
    h.recv(Side::Backend, b"pe");
    h.eof(Side::Backend);
    let out = String::from_utf8(h.wire(Side::Client)).unwrap();
    assert_eq!(
        out,
        "HTTP/1.1 403 Forbidden\r\nContent-Length: 4\r\n\r\nnope"
    );
}

/// What outlier detection hears of a backend's answer to the upgrade: a
/// 5xx, a malformed answer, a close or silence fail it; a 4xx (the
/// client's request refused) and a 101 do not.
#[test]
fn upgrade_failures_are_reported_for_outlier_detection() {
    let failed = Event::UpgradeFailed { backend: BACKEND.0 };
    let answered = |answer: &[u8]| {
        let mut h = Harness::new(config(""));
        h.recv(Side::Client, REQUEST.as_bytes());
        h.connecting(BACKEND.0);
        h.call(|c, cx| c.handle_connected(cx, true));
        h.events();
        h.recv(Side::Backend, answer);
        h.events()
            .into_iter()
            .filter(|e| matches!(e, Event::UpgradeFailed { .. } | Event::Upgraded { .. }))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        answered(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"),
        [failed]
    );
    assert_eq!(
        answered(b"HTTP/1.1 503 Service Unavailable\r\n\r\n"),
        [failed]
    );
    assert_eq!(answered(b"HTTP/1.1 403 Forbidden\r\n\r\n"), []);
    assert_eq!(answered(b"nonsense\r\n\r\n"), [failed]);
    assert_eq!(
        answered(&upgraded_head()),
        [Event::Upgraded { backend: BACKEND.0 }]
    );

    // Closed during the handshake.
    let mut h = Harness::new(config(""));
    h.recv(Side::Client, REQUEST.as_bytes());
    h.connecting(BACKEND.0);
    h.call(|c, cx| c.handle_connected(cx, true));
    h.eof(Side::Backend);
    assert!(h.events().contains(&failed));

    // No answer in time.
    let mut h = Harness::new(config(""));
    h.recv(Side::Client, REQUEST.as_bytes());
    h.connecting(BACKEND.0);
    h.call(|c, cx| c.handle_connected(cx, true));
    h.advance(Duration::from_secs(10));
    assert!(h.events().contains(&failed));
}
