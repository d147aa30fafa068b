//! A connection handed over (exported, through the handoff wire format,
//! imported) goes on exactly as the original would have: both are driven
//! with the same bytes and clock afterwards, and what they send, report
//! and ask for is compared at every step.

use super::*;
use crate::l7::handoff;

impl Harness {
    /// Hands the connection over as a takeover does: quiesced, its
    /// receives cancelled, exported, encoded and decoded, imported at the
    /// same instant by a harness running `config` (the new process's; the
    /// connection keeps its own settings). The original resumes, as after a
    /// takeover that failed, so that both can be driven alike.
    fn hand_over(&mut self, config: Config) -> Harness {
        self.call(|c, _| c.quiesce());
        for action in self.actions() {
            let Action::CancelRecv(side) = action else {
                panic!("{action:?} while quiesced");
            };
            self.call(|c, cx| c.handle_recv(cx, side, Received::Cancelled, false));
        }
        assert_eq!(self.conn.movable(), Ok(()));
        let pool = &self.pool;
        let snapshot = self
            .conn
            .export(self.now, &self.config, |bid, len| &pool[&bid][..len])
            .expect("movable");
        let mut batch = handoff::decode(&handoff::encode(std::slice::from_ref(&snapshot)))
            .expect("a valid batch");
        assert_eq!(batch, std::slice::from_ref(&snapshot));
        let conn = Conn::import(batch.remove(0), self.now).expect("a valid snapshot");
        let mut twin = Harness {
            conn,
            config: snapshot.settings.apply(&config),
            now: self.now,
            out: Output::default(),
            pool: BTreeMap::new(),
            next_bid: self.next_bid,
            wire: Default::default(),
            shut: self.shut,
            closed: self.closed,
            sends: 0,
            gather: self.gather,
            zero_copy_sends: 0,
            actions: Vec::new(),
            events: Vec::new(),
            auto_send: self.auto_send,
        };
        for side in [Side::Client, Side::Backend] {
            self.wire(side);
        }
        self.events();
        self.call(|c, _| c.resume());
        twin.settle();
        twin
    }
}

/// Does the same to both, then checks that they did the same.
fn both(a: &mut Harness, b: &mut Harness, step: &str, f: impl Fn(&mut Harness)) {
    f(a);
    f(b);
    same(a, b, step);
}

fn same(a: &mut Harness, b: &mut Harness, step: &str) {
    for side in [Side::Client, Side::Backend] {
        assert_eq!(a.wire(side), b.wire(side), "{step}: bytes to {side:?}");
    }
    assert_eq!(a.actions(), b.actions(), "{step}: actions");
    assert_eq!(a.events(), b.events(), "{step}: events");
    assert_eq!(
        (a.shut, a.closed),
        (b.shut, b.closed),
        "{step}: shut, closed"
    );
    assert_eq!(
        a.conn.poll_timeout(&a.config),
        b.conn.poll_timeout(&b.config),
        "{step}: timeout"
    );
    let state = |h: &Harness| {
        (
            h.conn.is_relaying(),
            h.conn.is_draining(),
            h.conn.is_finished(),
            h.conn.is_aborted(),
        )
    };
    assert_eq!(state(a), state(b), "{step}: state");
}

/// A relaying connection whose sends wait, with the first 50 bytes of a
/// 200-byte frame from the backend queued to the client; and that frame.
fn mid_frame() -> (Harness, Vec<u8>) {
    let mut h = Harness::relaying(config(""));
    h.auto_send = false;
    let big = frame(Opcode::Binary, &[3; 200], None);
    h.recv(Side::Backend, &big[..50]);
    (h, big)
}

/// A fragmented text message is cut inside a UTF-8 sequence and then
/// inside the header of a ping between its fragments; weir's keepalive
/// ping and a frame are queued to the client, half a big frame from the
/// backend is in flight; nothing has been sent for a while. After the
/// handover the rest of every frame, the close handshake and the ends of
/// both streams go as they would have.
#[test]
fn a_connection_handed_over_mid_frame_goes_on_as_the_original() {
    let mut h = Harness::relaying(config("[timeouts]\nping_interval = \"1s\""));
    h.auto_send = false;
    h.advance(Duration::from_secs(1));
    let text = "héllo wörld".as_bytes();
    let cut = 2; // inside the 'é'
    let first = frame::whole_frame(Opcode::Text, false, &text[..cut], Some(CLIENT_MASK));
    let ping = frame::ping_frame(b"are you there", Some(CLIENT_MASK));
    let last = frame::whole_frame(Opcode::Continuation, true, &text[cut..], Some(CLIENT_MASK));
    h.recv(Side::Client, &[first.as_slice(), &ping[..1]].concat());
    let hello = frame(Opcode::Text, b"hello", None);
    let big = frame(Opcode::Binary, &[7; 300], None);
    h.recv(Side::Backend, &[hello.as_slice(), &big[..120]].concat());
    h.advance(Duration::from_millis(400));

    let mut t = h.hand_over(config(""));
    same(&mut h, &mut t, "handover");
    both(&mut h, &mut t, "delivered", |h| {
        h.deliver(Side::Client, 1);
        h.deliver(Side::Backend, 1);
    });
    both(&mut h, &mut t, "rest of the ping header", |h| {
        h.recv(Side::Client, &ping[1..3])
    });
    both(&mut h, &mut t, "rest of the frames", |h| {
        h.auto_send = true;
        h.recv(Side::Client, &[&ping[3..], last.as_slice()].concat());
        h.recv(Side::Backend, &big[120..]);
    });
    both(&mut h, &mut t, "a ping due", |h| {
        h.advance(Duration::from_secs(1))
    });
    both(&mut h, &mut t, "the client closes", |h| {
        h.recv(
            Side::Client,
            &frame::close_frame(1000, "bye", Some(CLIENT_MASK)),
        )
    });
    both(&mut h, &mut t, "the backend answers", |h| {
        h.recv(Side::Backend, &frame::close_frame(1000, "", None));
        h.eof(Side::Backend);
        h.eof(Side::Client);
    });
    assert!(t.conn.is_finished());
    t.assert_no_buffer_held();
    h.assert_no_buffer_held();
}

/// Taken over while weir drains it (its Close to the backend queued, the
/// one to the client waiting for the end of a frame): the Close goes out
/// with the drain's reason at the same boundary, and peers that do not
/// finish closing are cut at the same instant, by the close deadline set
/// before the handover, not one counted again from it.
#[test]
fn a_handover_during_a_drain_keeps_its_schedule() {
    let (mut h, big) = mid_frame();
    h.call(|c, cx| c.handle_close(cx, frame::CLOSE_GOING_AWAY, "going away"));
    h.advance(Duration::from_secs(2));
    let mut t = h.hand_over(config("[timeouts]\nclose = \"20s\""));
    same(&mut h, &mut t, "handover");
    both(&mut h, &mut t, "the frame ends", |h| {
        h.auto_send = true;
        h.settle();
        h.recv(Side::Backend, &big[50..]);
    });
    both(&mut h, &mut t, "almost at the deadline", |h| {
        h.advance(Duration::from_millis(2_999))
    });
    assert!(!t.conn.is_aborted());
    both(&mut h, &mut t, "the deadline", |h| {
        h.advance(Duration::from_millis(1))
    });
    assert!(t.conn.is_aborted() && t.conn.is_finished());
}

/// weir's Close queued before the handover (to the backend; the
/// client's waits for the end of a frame) is reported as sent by the new
/// process once written whole, as is the one that follows the frame.
#[test]
fn closes_queued_before_the_handover_are_reported_when_written() {
    let (mut h, big) = mid_frame();
    h.call(|c, cx| c.handle_close(cx, frame::CLOSE_GOING_AWAY, "going away"));
    let mut t = h.hand_over(config(""));
    t.auto_send = true;
    t.recv(Side::Backend, &big[50..]);
    let sent: Vec<Event> = t
        .events()
        .into_iter()
        .filter(|e| matches!(e, Event::CloseSent { .. }))
        .collect();
    assert_eq!(
        sent,
        [
            Event::CloseSent {
                to: Side::Client,
                code: 1001
            },
            Event::CloseSent {
                to: Side::Backend,
                code: 1001
            },
        ]
    );
    let close = frame::close_frame(1001, "going away", None);
    assert_eq!(t.wire(Side::Client), [&big[..], &close].concat());
    assert_eq!(
        t.wire(Side::Backend),
        frame::close_frame(1001, "going away", Some(MASK))
    );
}

/// The idle and ping clocks run on from where they were: the ping falls
/// due and the idle timeout fires at the same instants, with the
/// connection's own timeouts although the new process has others.
#[test]
fn idle_and_ping_clocks_cross_the_handover() {
    let mut h = Harness::relaying(config("[timeouts]\nping_interval = \"1s\"\nidle = \"3s\""));
    h.advance(Duration::from_millis(700));
    let mut t = h.hand_over(config("[timeouts]\nidle = \"1h\""));
    assert_eq!(t.config.timeouts.idle, Duration::from_secs(3));
    same(&mut h, &mut t, "handover");
    both(&mut h, &mut t, "just before the ping", |h| {
        h.advance(Duration::from_millis(299))
    });
    both(&mut h, &mut t, "the ping", |h| {
        h.advance(Duration::from_millis(1))
    });
    for step in 0..3 {
        both(&mut h, &mut t, &format!("{step} s later"), |h| {
            h.advance(Duration::from_millis(500))
        });
    }
    h.advance(Duration::from_millis(500));
    t.advance(Duration::from_millis(500));
    let idle_out = Event::Closing {
        code: frame::CLOSE_GOING_AWAY,
        reason: "idle timeout",
    };
    assert!(t.events.contains(&idle_out), "{:?}", t.events);
    same(&mut h, &mut t, "the idle timeout");
}

/// More than the high-water mark queued to a slow client: after the
/// handover reading from the backend resumes at the same point.
#[test]
fn backpressure_crosses_the_handover() {
    let mut h = Harness::relaying(config(""));
    h.auto_send = false;
    h.gather = 0;
    let msg = frame(Opcode::Text, b"x", None);
    for _ in 0..HIGH_WATER + 2 {
        h.recv(Side::Backend, &msg);
    }
    let mut t = h.hand_over(config(""));
    same(&mut h, &mut t, "handover");
    for step in 0..HIGH_WATER + 2 {
        both(&mut h, &mut t, &format!("send {step}"), |h| {
            h.deliver(Side::Client, 1)
        });
    }
    h.assert_no_buffer_held();
}

/// A client that broke a rule: the connection relays nothing more from it
/// and closes both sides, the same after the handover.
#[test]
fn a_failed_peer_stays_failed() {
    let (mut h, big) = mid_frame();
    h.recv(Side::Client, &frame(Opcode::Text, b"bare", None));
    let mut t = h.hand_over(config(""));
    both(&mut h, &mut t, "more from the client", |h| {
        h.auto_send = true;
        h.settle();
        h.recv(Side::Client, &frame(Opcode::Text, b"x", Some(CLIENT_MASK)));
        h.recv(Side::Backend, &big[50..]);
    });
}

#[test]
fn only_a_quiet_relaying_connection_moves() {
    let service = |h: &Harness| h.config.listeners[0].routes[0].service;
    let mut h = Harness::new(config(""));
    assert_eq!(h.conn.movable(), Err(NotMovable::Handshaking));
    h.recv(Side::Client, REQUEST.as_bytes());
    assert_eq!(
        h.actions(),
        [Action::Recv(Side::Client), Action::Connect(service(&h))]
    );
    h.connecting(BACKEND.0);
    assert_eq!(h.conn.movable(), Err(NotMovable::Handshaking));
    h.call(|c, cx| c.handle_connected(cx, true));
    assert_eq!(h.conn.movable(), Err(NotMovable::Handshaking));
    h.recv(Side::Backend, b"HTTP/1.1 403 Forbidden\r\n\r\n");
    assert_eq!(
        h.conn.movable(),
        Err(NotMovable::Handshaking),
        "passing a refusal through"
    );

    let mut h = Harness::relaying(config(""));
    assert_eq!(h.conn.movable(), Err(NotMovable::Receiving(Side::Client)));
    let pool = &h.pool;
    assert!(
        h.conn
            .export(h.now, &h.config, |bid, len| &pool[&bid][..len])
            .is_err()
    );
    h.auto_send = false;
    h.recv(Side::Backend, &frame(Opcode::Text, b"to the client", None));
    let Some(Transmit::Buf { len, .. }) = h.conn.poll_transmit(Side::Client) else {
        panic!("the backend's frame goes to the client");
    };
    h.call(|c, _| c.quiesce());
    assert_eq!(
        h.actions(),
        [
            Action::CancelRecv(Side::Client),
            Action::CancelRecv(Side::Backend)
        ]
    );
    assert_eq!(
        h.conn.movable(),
        Err(NotMovable::Receiving(Side::Client)),
        "until the cancel completes"
    );
    for side in [Side::Client, Side::Backend] {
        h.call(|c, cx| c.handle_recv(cx, side, Received::Cancelled, false));
    }
    assert_eq!(h.conn.movable(), Err(NotMovable::Sending(Side::Client)));
    assert!(h.actions().is_empty(), "nothing is armed again");
    h.call(|c, cx| c.handle_sent(cx, Side::Client, Ok(len)));
    assert_eq!(h.conn.movable(), Ok(()));
    assert_eq!(h.conn.poll_transmit(Side::Client), None);

    // A provided buffer the worker no longer has in full.
    h.recv(Side::Backend, &frame(Opcode::Text, b"more", None));
    let bid = h.next_bid - 1;
    assert_eq!(
        h.conn.export(h.now, &h.config, |_, _| -> &[u8] { &[] }),
        Err(NotMovable::ShortBuffer { bid })
    );

    let mut h = Harness::relaying(config(""));
    h.call(|c, cx| c.handle_close(cx, frame::CLOSE_GOING_AWAY, "going away"));
    assert!(!h.conn.is_relaying());
    assert_eq!(h.conn.movable(), Err(NotMovable::Closing));
    h.call(|c, cx| c.handle_abort(cx));
    assert_eq!(h.conn.movable(), Err(NotMovable::Aborted));
}

#[test]
fn a_queue_over_the_handovers_bound_does_not_move() {
    let mut h = Harness::relaying(config(""));
    h.auto_send = false;
    let msg = frame(Opcode::Text, b"x", None);
    for _ in 0..MAX_QUEUED_PIECES + 1 {
        h.recv(Side::Backend, &msg);
    }
    h.call(|c, _| c.quiesce());
    for action in h.actions() {
        if let Action::CancelRecv(side) = action {
            h.call(|c, cx| c.handle_recv(cx, side, Received::Cancelled, false));
        }
    }
    assert_eq!(
        h.conn.movable(),
        Err(NotMovable::Overfull {
            side: Side::Client,
            pieces: MAX_QUEUED_PIECES + 1,
            bytes: (MAX_QUEUED_PIECES + 1) * msg.len()
        })
    );
    // The takeover is abandoned: the connection goes on here.
    h.call(|c, _| c.resume());
    assert_eq!(
        h.actions(),
        [Action::Recv(Side::Client)],
        "the backend waits for the client to take its data"
    );
    h.auto_send = true;
    h.settle();
    assert_eq!(h.wire(Side::Client), msg.repeat(MAX_QUEUED_PIECES + 1));
    h.assert_no_buffer_held();
}

/// Once the new process has it, the old one's connection gives back the
/// provided buffers whose bytes went in the snapshot.
#[test]
fn a_connection_handed_over_gives_its_buffers_back() {
    let mut h = Harness::relaying(config(""));
    h.auto_send = false;
    h.recv(Side::Backend, &frame(Opcode::Text, b"a", None));
    h.recv(Side::Client, &frame(Opcode::Text, b"b", Some(CLIENT_MASK)));
    assert_eq!(h.pool.len(), 2);
    let _twin = h.hand_over(config(""));
    let conn = std::mem::replace(
        &mut h.conn,
        Conn::new(h.now, &h.config, "198.51.100.7:1".parse().unwrap()),
    );
    conn.handed_over(&mut h.out);
    h.settle();
    h.assert_no_buffer_held();
}
