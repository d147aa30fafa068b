//! Checked messages, for the `upgrade` scenario: every message names its
//! connection and sequence number and carries a hash of itself, so the
//! client can tell of every echo whether it is intact, a duplicate, late
//! (overtaken by a later one), another connection's, or corrupted, and of
//! every message that never came back that it was lost. A proxy that
//! moves a live connection to another process has to get all of that
//! right; latency alone would not show a duplicated or swapped byte.
//!
//! A message is `size` bytes: the send time (ns since the generator's
//! reference, as every other talk stamps it), the sequence number, the
//! connection id, a 64-bit FNV-1a hash of everything else, then filler
//! bytes drawn from the connection id and sequence number (so two messages
//! never carry the same bytes).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// Bytes before the filler: send time, sequence, connection id, hash.
pub const HEADER: usize = 32;

/// The connection id of long-lived connection `index` of this process:
/// unique among the generator processes running at once.
pub fn connection_id(index: usize) -> u64 {
    (u64::from(std::process::id()) << 32) | index as u64
}

/// The message `seq` of connection `id`, stamped `sent_ns`.
pub fn message(id: u64, seq: u64, sent_ns: u64, size: usize) -> Vec<u8> {
    let mut m = vec![0u8; size.max(HEADER)];
    m[..8].copy_from_slice(&sent_ns.to_le_bytes());
    m[8..16].copy_from_slice(&seq.to_le_bytes());
    m[16..24].copy_from_slice(&id.to_le_bytes());
    let mut x = id ^ seq.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for chunk in m[HEADER..].chunks_mut(8) {
        x = mix(x);
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let h = hash(&m);
    m[24..32].copy_from_slice(&h.to_le_bytes());
    m
}

/// FNV-1a over the message with its hash field skipped.
fn hash(m: &[u8]) -> u64 {
    m[..24]
        .iter()
        .chain(&m[HEADER..])
        .fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        })
}

/// One step of a 64-bit mixer (splitmix64's finaliser), for the filler.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What one connection's echoes came to, in messages (or several
/// connections', merged).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    pub sent: u64,
    /// Echoed once, intact, in order or late.
    pub intact: u64,
    /// Sent and never echoed.
    pub lost: u64,
    /// Echoed again after their first echo.
    pub duplicated: u64,
    /// Echoed after a later message's echo.
    pub reordered: u64,
    /// Wrong length or hash.
    pub corrupted: u64,
    /// Intact, but another connection's.
    pub foreign: u64,
}

impl Tally {
    pub fn add(&mut self, o: &Tally) {
        self.sent += o.sent;
        self.intact += o.intact;
        self.lost += o.lost;
        self.duplicated += o.duplicated;
        self.reordered += o.reordered;
        self.corrupted += o.corrupted;
        self.foreign += o.foreign;
    }
}

/// What one echo was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Echo {
    /// An intact message of this connection, echoed for the first time;
    /// the send time it carries.
    First(u64),
    /// Not one of the messages still awaited: a duplicate, or another
    /// connection's.
    NotOurs,
    /// Unreadable: one awaited message will not come back intact.
    Corrupted,
}

/// One connection's account of its messages.
pub struct Ledger {
    id: u64,
    size: usize,
    /// The sequence number after the highest one echoed.
    next: u64,
    /// Below `next` and not echoed yet.
    missing: BTreeSet<u64>,
    tally: Tally,
}

impl Ledger {
    pub fn new(id: u64, size: usize) -> Ledger {
        Ledger {
            id,
            size: size.max(HEADER),
            next: 0,
            missing: BTreeSet::new(),
            tally: Tally::default(),
        }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// Checks one echo.
    pub fn echo(&mut self, m: &[u8]) -> Echo {
        let field = |at: usize| u64::from_le_bytes(m[at..at + 8].try_into().expect("8 bytes"));
        if m.len() != self.size || field(24) != hash(m) {
            self.tally.corrupted += 1;
            return Echo::Corrupted;
        }
        if field(16) != self.id {
            self.tally.foreign += 1;
            return Echo::NotOurs;
        }
        let seq = field(8);
        if seq >= self.next {
            self.missing.extend(self.next..seq);
            self.next = seq + 1;
        } else if self.missing.remove(&seq) {
            self.tally.reordered += 1;
        } else {
            self.tally.duplicated += 1;
            return Echo::NotOurs;
        }
        self.tally.intact += 1;
        Echo::First(field(0))
    }

    /// The account once the connection is done, `sent` messages in all:
    /// whatever did not come back is lost.
    pub fn close(self, sent: u64) -> Tally {
        let echoed_below = self.next.min(sent);
        Tally {
            sent,
            lost: self.missing.len() as u64 + (sent - echoed_below),
            ..self.tally
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: usize = 96;

    fn msg(id: u64, seq: u64) -> Vec<u8> {
        message(id, seq, 1000 + seq, SIZE)
    }

    #[test]
    fn in_order_echoes_are_intact_and_carry_their_send_time() {
        let mut l = Ledger::new(7, SIZE);
        for seq in 0..5 {
            assert_eq!(l.echo(&msg(7, seq)), Echo::First(1000 + seq));
        }
        assert_eq!(
            l.close(5),
            Tally {
                sent: 5,
                intact: 5,
                ..Tally::default()
            }
        );
    }

    #[test]
    fn a_late_echo_is_reordered_a_second_one_duplicated_a_missing_one_lost() {
        let mut l = Ledger::new(7, SIZE);
        let echoes: Vec<Echo> = [0, 2, 1, 2, 4].map(|seq| l.echo(&msg(7, seq))).into();
        assert_eq!(echoes[2], Echo::First(1001));
        assert_eq!(echoes[3], Echo::NotOurs);
        // 3 never came back, 5 was sent and not echoed before the end.
        assert_eq!(
            l.close(6),
            Tally {
                sent: 6,
                intact: 4,
                lost: 2,
                duplicated: 1,
                reordered: 1,
                ..Tally::default()
            }
        );
    }

    #[test]
    fn a_flipped_bit_anywhere_or_a_cut_message_is_corrupted() {
        let good = msg(7, 0);
        for at in [0, 9, 17, 25, HEADER, SIZE - 1] {
            let mut bad = good.clone();
            bad[at] ^= 0x10;
            let mut l = Ledger::new(7, SIZE);
            assert_eq!(l.echo(&bad), Echo::Corrupted, "bit flipped at {at}");
            assert_eq!(l.close(1).corrupted, 1);
        }
        let mut l = Ledger::new(7, SIZE);
        assert_eq!(l.echo(&good[..SIZE - 1]), Echo::Corrupted);
        let t = l.close(1);
        assert_eq!((t.corrupted, t.lost), (1, 1));
    }

    #[test]
    fn another_connections_message_is_foreign_and_ours_still_lost() {
        let mut l = Ledger::new(7, SIZE);
        assert_eq!(l.echo(&msg(8, 0)), Echo::NotOurs);
        let t = l.close(1);
        assert_eq!((t.foreign, t.lost, t.intact), (1, 1, 0));
    }

    #[test]
    fn messages_differ_by_connection_and_sequence_and_ids_by_index() {
        assert_ne!(msg(7, 0)[HEADER..], msg(7, 1)[HEADER..]);
        assert_ne!(msg(7, 0)[HEADER..], msg(8, 0)[HEADER..]);
        assert_ne!(connection_id(0), connection_id(1));
        assert_eq!(connection_id(3) >> 32, u64::from(std::process::id()));
    }
}
