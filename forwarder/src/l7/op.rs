//! The io_uring operations a worker submits, and what their completions
//! mean. Each operation travels as a 64-bit `user_data` tag: which
//! operation, on which connection slot, of which generation of that slot
//! (a completion for a connection that was freed and whose slot was reused
//! must not reach the new one).

use std::io;

use io_uring::{cqueue, opcode, squeue, types};

use super::conn::Side;

/// Generations wrap at 24 bits: what fits in the tag next to a 32-bit slot
/// and an 8-bit operation.
pub const GENERATION_MASK: u32 = 0xff_ffff;

/// A connection slot and the generation of the connection in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnId {
    pub idx: u32,
    pub generation: u32,
}

impl ConnId {
    /// The generation after `generation`, skipping 0 (which never names a
    /// connection).
    pub fn next_generation(generation: u32) -> u32 {
        (generation.wrapping_add(1) & GENERATION_MASK).max(1)
    }
}

/// One operation in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// An accept into a registered-file slot, by its entry in the worker's
    /// table of armed accepts (which holds the slot and the address the
    /// kernel writes the client's into).
    Accept {
        accept: u32,
    },
    /// The worker's periodic timeout.
    Tick,
    /// Multishot receive from one side into the provided buffers.
    Recv {
        conn: ConnId,
        side: Side,
    },
    Send {
        conn: ConnId,
        side: Side,
    },
    /// A send gathering several queued pieces (sendmsg with an iovec the
    /// worker keeps until it completes).
    SendMsg {
        conn: ConnId,
        side: Side,
    },
    /// The connect to the backend.
    Connect {
        conn: ConnId,
    },
    /// A shutdown of one side's socket (a direct descriptor, which only
    /// the ring can reach).
    Shutdown {
        conn: ConnId,
        side: Side,
    },
    /// The backend socket's creation, linked before its option and its
    /// connect; it completes only when it fails.
    Socket {
        conn: ConnId,
    },
    /// TCP_NODELAY on the new backend socket, linked before its connect;
    /// it completes only when it fails.
    NoDelay {
        conn: ConnId,
    },
    /// The close of a registered-file slot; the slot is free again when
    /// it completes.
    Close {
        slot: u32,
    },
    /// A cancel of another operation of this connection; nothing waits
    /// for its completion.
    Cancel {
        conn: ConnId,
    },
    /// One side's direct descriptor installed as a normal one, to pass it
    /// to the process taking over; the completion carries the descriptor.
    Install {
        conn: ConnId,
        side: Side,
    },
    /// A read of the worker's eventfd: the daemon has something for it.
    Wake,
}

const ACCEPT: u8 = 1;
const RECV_CLIENT: u8 = 2;
const RECV_BACKEND: u8 = 3;
const SEND_CLIENT: u8 = 4;
const SEND_BACKEND: u8 = 5;
const CONNECT: u8 = 6;
const TICK: u8 = 7;
const CANCEL: u8 = 8;
const SHUTDOWN_BACKEND: u8 = 9;
const SHUTDOWN_CLIENT: u8 = 10;
const SOCKET: u8 = 11;
const NODELAY: u8 = 12;
const CLOSE: u8 = 13;
const SENDMSG_CLIENT: u8 = 14;
const SENDMSG_BACKEND: u8 = 15;
const INSTALL_CLIENT: u8 = 16;
const INSTALL_BACKEND: u8 = 17;
const WAKE: u8 = 18;

fn tag(op: u8, idx: u32, generation: u32) -> u64 {
    (u64::from(generation & GENERATION_MASK) << 40) | (u64::from(idx) << 8) | u64::from(op)
}

impl Op {
    pub fn user_data(self) -> u64 {
        let on = |op, c: ConnId| tag(op, c.idx, c.generation);
        let by_side = |side, client, backend| match side {
            Side::Client => client,
            Side::Backend => backend,
        };
        match self {
            Self::Accept { accept } => tag(ACCEPT, accept, 0),
            Self::Close { slot } => tag(CLOSE, slot, 0),
            Self::Tick => tag(TICK, 0, 0),
            Self::Wake => tag(WAKE, 0, 0),
            Self::Install { conn, side } => {
                on(by_side(side, INSTALL_CLIENT, INSTALL_BACKEND), conn)
            }
            Self::Recv { conn, side } => on(by_side(side, RECV_CLIENT, RECV_BACKEND), conn),
            Self::Send { conn, side } => on(by_side(side, SEND_CLIENT, SEND_BACKEND), conn),
            Self::SendMsg { conn, side } => {
                on(by_side(side, SENDMSG_CLIENT, SENDMSG_BACKEND), conn)
            }
            Self::Connect { conn } => on(CONNECT, conn),
            Self::Shutdown { conn, side } => {
                on(by_side(side, SHUTDOWN_CLIENT, SHUTDOWN_BACKEND), conn)
            }
            Self::Socket { conn } => on(SOCKET, conn),
            Self::NoDelay { conn } => on(NODELAY, conn),
            Self::Cancel { conn } => on(CANCEL, conn),
        }
    }

    /// The operation a completion's `user_data` names; None for a tag no
    /// operation of weir's carries.
    pub fn decode(user_data: u64) -> Option<Self> {
        let idx = (user_data >> 8) as u32;
        let conn = ConnId {
            idx,
            generation: (user_data >> 40) as u32,
        };
        let tag = user_data as u8;
        let side = if matches!(
            tag,
            RECV_CLIENT | SEND_CLIENT | SENDMSG_CLIENT | SHUTDOWN_CLIENT | INSTALL_CLIENT
        ) {
            Side::Client
        } else {
            Side::Backend
        };
        Some(match tag {
            ACCEPT => Self::Accept { accept: idx },
            CLOSE => Self::Close { slot: idx },
            TICK => Self::Tick,
            WAKE => Self::Wake,
            INSTALL_CLIENT | INSTALL_BACKEND => Self::Install { conn, side },
            RECV_CLIENT | RECV_BACKEND => Self::Recv { conn, side },
            SEND_CLIENT | SEND_BACKEND => Self::Send { conn, side },
            SENDMSG_CLIENT | SENDMSG_BACKEND => Self::SendMsg { conn, side },
            CONNECT => Self::Connect { conn },
            SHUTDOWN_CLIENT | SHUTDOWN_BACKEND => Self::Shutdown { conn, side },
            SOCKET => Self::Socket { conn },
            NODELAY => Self::NoDelay { conn },
            CANCEL => Self::Cancel { conn },
            _ => return None,
        })
    }

    /// The connection this operation belongs to, if any.
    pub fn conn(self) -> Option<ConnId> {
        match self {
            Self::Accept { .. } | Self::Tick | Self::Close { .. } | Self::Wake => None,
            Self::Recv { conn, .. }
            | Self::Send { conn, .. }
            | Self::SendMsg { conn, .. }
            | Self::Connect { conn }
            | Self::Shutdown { conn, .. }
            | Self::Socket { conn }
            | Self::NoDelay { conn }
            | Self::Cancel { conn }
            | Self::Install { conn, .. } => Some(conn),
        }
    }

    /// Whether this operation keeps its connection alive until it
    /// completes: it points into the connection's memory or sockets.
    /// A cancel points at nothing of the connection; the socket's creation
    /// and its option complete only on failure, and the connect linked
    /// after them completes in any case.
    pub fn holds_conn(self) -> bool {
        self.conn().is_some()
            && !matches!(
                self,
                Self::Cancel { .. } | Self::Socket { .. } | Self::NoDelay { .. }
            )
    }
}

/// A completion, decoded.
pub struct Completion {
    pub op: Op,
    /// What the operation returned: a count or descriptor, or the error.
    pub result: io::Result<u32>,
    /// The provided buffer the kernel filled, if it picked one.
    pub buffer: Option<u16>,
    /// A multishot operation goes on after this completion.
    pub more: bool,
}

impl Completion {
    /// None for a completion no operation of weir's asked for.
    pub fn new(user_data: u64, res: i32, flags: u32) -> Option<Self> {
        Some(Self {
            op: Op::decode(user_data)?,
            result: result(res),
            buffer: cqueue::buffer_select(flags),
            more: cqueue::more(flags),
        })
    }
}

/// A completion's result code as a Rust result: negative is an errno.
pub fn result(res: i32) -> io::Result<u32> {
    if res < 0 {
        Err(io::Error::from_raw_os_error(-res))
    } else {
        Ok(res as u32)
    }
}

/// A multishot receive on a registered-file slot into the provided
/// buffers of group `bgid`.
pub fn recv(slot: u32, bgid: u16) -> squeue::Entry {
    opcode::RecvMulti::new(types::Fixed(slot), bgid).build()
}

/// A sendmsg of `msg` (several pieces) on a registered-file slot; the
/// header, its iovec and the bytes must stay put until it completes.
pub fn send_msg(slot: u32, msg: *const libc::msghdr) -> squeue::Entry {
    opcode::SendMsg::new(types::Fixed(slot), msg)
        .flags(libc::MSG_NOSIGNAL as u32)
        .build()
}

/// A send of `len` bytes at `ptr` on a registered-file slot; they must stay
/// put until it completes.
pub fn send(slot: u32, ptr: *const u8, len: u32) -> squeue::Entry {
    opcode::Send::new(types::Fixed(slot), ptr, len)
        .flags(libc::MSG_NOSIGNAL)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_op(conn: ConnId) -> Vec<Op> {
        let mut ops = vec![
            Op::Accept { accept: 7 },
            Op::Tick,
            Op::Close { slot: 19_999 },
            Op::Connect { conn },
            Op::Socket { conn },
            Op::NoDelay { conn },
            Op::Cancel { conn },
            Op::Wake,
        ];
        for side in [Side::Client, Side::Backend] {
            ops.push(Op::Recv { conn, side });
            ops.push(Op::Send { conn, side });
            ops.push(Op::SendMsg { conn, side });
            ops.push(Op::Shutdown { conn, side });
            ops.push(Op::Install { conn, side });
        }
        ops
    }

    #[test]
    fn every_op_round_trips_and_no_two_share_a_tag() {
        for conn in [
            ConnId {
                idx: 0,
                generation: 1,
            },
            ConnId {
                idx: u32::MAX,
                generation: GENERATION_MASK,
            },
            ConnId {
                idx: 123_456,
                generation: 0x5a_5a5a,
            },
        ] {
            let ops = every_op(conn);
            let tags: std::collections::BTreeSet<u64> = ops.iter().map(|o| o.user_data()).collect();
            assert_eq!(tags.len(), ops.len());
            for op in ops {
                assert_eq!(Op::decode(op.user_data()), Some(op), "{op:?}");
            }
        }
    }

    #[test]
    fn generations_wrap_at_24_bits_and_skip_0() {
        assert_eq!(ConnId::next_generation(1), 2);
        assert_eq!(ConnId::next_generation(GENERATION_MASK), 0x1);
        assert_eq!(
            ConnId::next_generation(GENERATION_MASK - 1),
            GENERATION_MASK
        );
        // A generation past 24 bits is cut, never spilling into the slot.
        let op = Op::Send {
            conn: ConnId {
                idx: 9,
                generation: 0x0100_0002,
            },
            side: Side::Client,
        };
        assert_eq!(
            Op::decode(op.user_data()).and_then(Op::conn),
            Some(ConnId {
                idx: 9,
                generation: 2
            })
        );
    }

    #[test]
    fn unknown_tags_are_refused() {
        assert_eq!(Op::decode(0), None);
        assert_eq!(Op::decode(0xff), None);
        assert_eq!(Op::decode(tag(19, 1, 1)), None);
    }

    #[test]
    fn only_operations_on_a_connection_hold_it() {
        let conn = ConnId {
            idx: 3,
            generation: 4,
        };
        let held: Vec<bool> = every_op(conn).into_iter().map(Op::holds_conn).collect();
        assert_eq!(
            held,
            [
                false, false, false, true, false, false, false, false, true, true, true, true,
                true, true, true, true, true, true
            ]
        );
    }

    #[test]
    fn results_become_errors_or_counts() {
        assert_eq!(result(42).unwrap(), 42);
        assert_eq!(result(0).unwrap(), 0);
        let e = result(-libc::ECONNREFUSED).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ECONNREFUSED));
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
    }

    /// A receive's completion names its buffer and whether the multishot
    /// receive goes on (IORING_CQE_F_BUFFER = 1, IORING_CQE_F_MORE = 2,
    /// the buffer id above bit 16).
    #[test]
    fn a_completion_carries_its_buffer_and_more() {
        let conn = ConnId {
            idx: 5,
            generation: 6,
        };
        let recv = Op::Recv {
            conn,
            side: Side::Backend,
        };
        let c = Completion::new(recv.user_data(), 100, 1 | 2 | (37 << 16)).expect("known");
        assert_eq!(c.op, recv);
        assert_eq!(c.result.unwrap(), 100);
        assert_eq!(c.buffer, Some(37));
        assert!(c.more);
        let c =
            Completion::new(Op::Connect { conn }.user_data(), -libc::ETIMEDOUT, 0).expect("known");
        assert_eq!(c.buffer, None);
        assert!(!c.more);
        assert_eq!(c.result.unwrap_err().raw_os_error(), Some(libc::ETIMEDOUT));
        assert!(Completion::new(0, 0, 0).is_none());
    }
}
