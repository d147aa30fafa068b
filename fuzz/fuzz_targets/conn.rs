//! One proxied connection driven by an arbitrary script of events, played
//! the way the worker plays them (receives only while armed, one send in
//! flight per side, completions of what was started): no panic, no buffer
//! given back twice, and once the connection is cut every buffer it was
//! handed is back.
#![no_main]

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use weir::l7::config::{self, Config};
use weir::l7::conn::{Action, Conn, Cx, Output, Received, Side, Transmit};
use weir::l7::handshake::{accept_key, reject};

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const REQUEST: &[u8] = b"GET /chat HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\
    Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
    Sec-WebSocket-Version: 13\r\n\r\n";

struct Player {
    conn: Conn,
    config: Config,
    now: Instant,
    out: Output,
    /// Buffers the connection holds, by number.
    pool: BTreeMap<u16, usize>,
    next_bid: u16,
    armed: [bool; 2],
    /// Length of the send in flight to each side.
    sending: [Option<u32>; 2],
    connecting: bool,
    next_backend: u32,
}

fn ix(side: Side) -> usize {
    match side {
        Side::Client => 0,
        Side::Backend => 1,
    }
}

impl Player {
    fn call(&mut self, f: impl FnOnce(&mut Conn, &mut Cx)) {
        let mut cx = Cx {
            now: self.now,
            config: &self.config,
            routes: &self.config.listeners[0],
            mask: [1, 2, 3, 4],
            out: &mut self.out,
        };
        f(&mut self.conn, &mut cx);
        self.settle();
    }

    /// What the worker does after every call: takes the buffers back,
    /// carries out the orders, starts the sends.
    fn settle(&mut self) {
        for bid in self.out.recycle.drain(..) {
            assert!(self.pool.remove(&bid).is_some(), "buffer {bid} given back twice");
        }
        self.out.events.clear();
        while let Some(action) = self.conn.poll_action() {
            match action {
                Action::Recv(side) => {
                    assert!(!self.armed[ix(side)], "{side:?} armed twice");
                    self.armed[ix(side)] = true;
                }
                Action::CancelRecv(side) => {
                    if self.armed[ix(side)] {
                        self.armed[ix(side)] = false;
                        return self.call(|c, cx| c.handle_recv(cx, side, Received::Cancelled, false));
                    }
                }
                Action::Connect(_) => {
                    let addr: SocketAddr = "198.19.0.10:8080".parse().expect("an address");
                    let id = self.next_backend;
                    self.next_backend += 1;
                    self.connecting = true;
                    return self.call(|c, cx| c.handle_connecting(cx, id, addr));
                }
                Action::CancelConnect => {}
                // The worker cancels every operation on the socket and
                // closes it; a send in flight completes when the script says.
                Action::Abort(side) => {
                    if std::mem::take(&mut self.armed[ix(side)]) {
                        return self.call(|c, cx| {
                            c.handle_recv(cx, side, Received::Cancelled, false)
                        });
                    }
                }
            }
        }
        for side in [Side::Client, Side::Backend] {
            if self.sending[ix(side)].is_some() {
                continue;
            }
            let pool = &self.pool;
            let piece = |t: Transmit<'_>| match t {
                Transmit::Buf { bid, start, len } => {
                    assert!((start + len) as usize <= pool[&bid], "a send past its buffer");
                    len
                }
                Transmit::Bytes(b) => b.len() as u32,
                Transmit::Finish | Transmit::Close => panic!("not a piece of data"),
            };
            let first = match self.conn.poll_transmit(side) {
                None | Some(Transmit::Finish) => continue,
                // The worker cancels the receive and closes the socket.
                Some(Transmit::Close) => {
                    if std::mem::take(&mut self.armed[ix(side)]) {
                        return self.call(|c, cx| {
                            c.handle_recv(cx, side, Received::Cancelled, false)
                        });
                    }
                    continue;
                }
                Some(t) => piece(t),
            };
            // As the worker does, what is queued behind goes along.
            let mut total = first;
            self.conn.gather(side, 7, |t| total += piece(t));
            self.sending[ix(side)] = Some(total);
        }
    }

    fn receive(&mut self, side: Side, bytes: &[u8]) {
        if !self.armed[ix(side)] {
            return;
        }
        let bid = self.next_bid;
        self.next_bid = self.next_bid.wrapping_add(1);
        assert!(self.pool.insert(bid, bytes.len()).is_none(), "buffer {bid} reused");
        self.call(|c, cx| c.handle_recv(cx, side, Received::Data { bid, bytes }, true));
    }

    fn end_recv(&mut self, side: Side, received: Received<'static>) {
        if std::mem::take(&mut self.armed[ix(side)]) {
            self.call(|c, cx| c.handle_recv(cx, side, received, false));
        }
    }

    fn sent(&mut self, side: Side, how: u8) {
        let Some(len) = self.sending[ix(side)].take() else { return };
        let result = match how % 4 {
            0 => Err(io::ErrorKind::BrokenPipe.into()),
            1 if len > 1 => Ok(len / 2),
            _ => Ok(len),
        };
        self.call(|c, cx| c.handle_sent(cx, side, result));
    }
}

fuzz_target!(|input: &[u8]| {
    let text = "[[listener]]\nlisten = \"127.0.0.1:8080\"\n[[listener.route]]\n\
                path_prefix = \"/chat\"\nservice = \"198.19.0.1:80\"\n";
    let config = config::parse(text, "fuzz").expect("a valid configuration");
    let now = Instant::now();
    let peer: SocketAddr = "198.18.0.7:40000".parse().expect("an address");
    let mut p = Player {
        conn: Conn::new(now, &config, peer),
        config,
        now,
        out: Output::default(),
        pool: BTreeMap::new(),
        next_bid: 0,
        armed: [false; 2],
        sending: [None, None],
        connecting: false,
        next_backend: 1,
    };
    p.settle();
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        accept_key(KEY)
    );
    let mut rest = input;
    while let Some((&op, tail)) = rest.split_first() {
        rest = tail;
        let side = if op & 0x80 == 0 { Side::Client } else { Side::Backend };
        match op & 0x0f {
            0..=2 => {
                // A length byte, then that many bytes plus one.
                let Some((&n, tail)) = rest.split_first() else { break };
                let (bytes, tail) = tail.split_at((usize::from(n) + 1).min(tail.len()));
                rest = tail;
                p.receive(side, bytes);
            }
            3 => p.receive(Side::Client, REQUEST),
            4 => p.receive(Side::Backend, answer.as_bytes()),
            5 | 6 => p.sent(side, op >> 4),
            7 if op & 0x40 == 0 => p.end_recv(side, Received::Eof),
            7 => p.end_recv(side, Received::Reset),
            8 => p.end_recv(side, Received::NoBuffers),
            9 => {
                if std::mem::take(&mut p.connecting) {
                    let ok = op & 0x10 != 0;
                    p.call(|c, cx| c.handle_connected(cx, ok));
                }
            }
            10 => {
                // As the worker's timer wheel does: only when it is due.
                p.now += Duration::from_millis(u64::from(op >> 4) * 700);
                let now = p.now;
                if p.conn.poll_timeout(&p.config).is_some_and(|at| at <= now) {
                    p.call(|c, cx| c.handle_timeout(cx));
                }
            }
            11 => p.call(|c, cx| c.handle_close(cx, 1001, "going away")),
            12 => p.call(|c, cx| c.handle_shutdown(cx)),
            13 => p.call(|c, cx| c.handle_reject(cx, reject(503, "no backend"))),
            _ => p.call(|c, cx| c.handle_abort(cx)),
        }
    }
    // Cut: whatever is queued goes, the sends in flight fail.
    p.call(|c, cx| c.handle_abort(cx));
    for side in [Side::Client, Side::Backend] {
        p.sent(side, 0);
    }
    assert!(p.conn.is_finished(), "a cut connection is finished");
    assert!(p.pool.is_empty(), "buffers never given back: {:?}", p.pool);
});
