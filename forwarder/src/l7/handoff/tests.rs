use std::net::SocketAddrV4;

use super::*;
use crate::l7::conn::{MAX_QUEUED_PIECES, Snapshot};
use crate::l7::frame::{self, Opcode};

/// A connection with every field set to something other than its default:
/// a message open and a header half read from the client, a frame half
/// relayed from the backend, bytes and a Close of weir's queued both ways,
/// a drain under way, an IPv6 backend.
pub(crate) fn busy() -> Snapshot {
    let close = frame::close_frame(1001, "going away", Some([9, 8, 7, 6]));
    Snapshot {
        service: ServiceAddr {
            vip: Ipv4Addr::new(198, 19, 0, 1),
            port: 80,
        },
        backend: 7,
        backend_addr: SocketAddrV6::new("2001:db8::10".parse().unwrap(), 8080, 3, 2).into(),
        settings: Settings {
            idle: Duration::from_secs(300),
            ping_interval: Some(Duration::from_millis(1500)),
            close: Duration::from_secs(5),
            limits: FrameLimits {
                max_frame: 1 << 20,
                max_message: 1 << 22,
            },
        },
        allow_rsv1: true,
        client: PeerSnapshot {
            flags: PeerFlags {
                eof: false,
                closed: true,
                failed: false,
                finish: true,
                shut: false,
                gone: false,
            },
            queued: vec![
                Queued {
                    bytes: b"\x81\x05hello".to_vec(),
                    close: None,
                },
                Queued {
                    bytes: frame::close_frame(1001, "going away", None),
                    close: Some(1001),
                },
            ],
            scanner: ScannerState {
                open_message: Some(300),
                close_seen: false,
                // A masked continuation with a 16-bit length, its length
                // and mask not in yet.
                partial: vec![0x80, 0xfe, 0x01],
                remaining: 0,
                close_passed: false,
                discarding: false,
            },
        },
        server: PeerSnapshot {
            flags: PeerFlags {
                eof: true,
                closed: false,
                failed: true,
                finish: false,
                shut: true,
                gone: true,
            },
            queued: vec![Queued {
                bytes: close[3..].to_vec(),
                close: Some(1001),
            }],
            scanner: ScannerState {
                open_message: None,
                close_seen: false,
                partial: Vec::new(),
                remaining: 1000,
                close_passed: false,
                discarding: false,
            },
        },
        deadline_in: Some(Duration::from_nanos(2_500_000_001)),
        idle_for: Duration::from_secs(10),
        pinged_ago: Duration::from_millis(3),
        pending_close: Some((1001, "going away".into())),
        drain_in: Some(Duration::from_millis(4_250)),
    }
}

/// The other values: a closed direction that discards, an IPv4 backend,
/// nothing pending, nothing queued.
pub(crate) fn quiet() -> Snapshot {
    let mut s = busy();
    s.backend_addr = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 10), 8080).into();
    s.settings.ping_interval = None;
    s.allow_rsv1 = false;
    s.client = PeerSnapshot::default();
    s.server = PeerSnapshot {
        scanner: ScannerState {
            close_seen: true,
            close_passed: true,
            discarding: true,
            ..ScannerState::default()
        },
        ..PeerSnapshot::default()
    };
    s.deadline_in = None;
    s.pending_close = None;
    s.drain_in = None;
    s
}

#[test]
fn a_batch_comes_back_as_it_went() {
    for batch in [vec![], vec![busy()], vec![busy(), quiet(), busy()]] {
        let bytes = encode(&batch);
        assert_eq!(decode(&bytes), Ok(batch.clone()));
        assert_eq!(encode(&decode(&bytes).unwrap()), bytes, "canonical");
    }
}

#[test]
fn every_truncation_and_any_trailing_byte_refuse_the_batch() {
    let bytes = encode(&[busy(), quiet()]);
    for n in 0..bytes.len() {
        assert!(decode(&bytes[..n]).is_err(), "cut at {n}");
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert_eq!(decode(&longer), Err(DecodeError::Trailing(1)));
    assert_eq!(
        decode(&bytes[..10]),
        Err(DecodeError::ShortHeader(10)),
        "not a batch"
    );
    // A record longer than its contents.
    let mut bytes = encode(&[quiet()]);
    let at = MAGIC.len() + 6;
    let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
    bytes[at..at + 4].copy_from_slice(&(len + 1).to_le_bytes());
    bytes.push(0);
    assert_eq!(
        decode(&bytes),
        Err(DecodeError::Connection {
            index: 0,
            fault: Fault::Trailing(1)
        })
    );
}

/// A binary that reads another format refuses at the header, before it
/// reads a connection: even a batch whose records it could not parse.
#[test]
fn another_version_is_refused_before_anything_is_read() {
    for found in [0, VERSION + 1, u16::MAX] {
        let mut bytes = encode(&[busy()]);
        bytes[8..10].copy_from_slice(&found.to_le_bytes());
        assert_eq!(decode(&bytes), Err(DecodeError::Version { found }));
        bytes.truncate(20);
        assert_eq!(decode(&bytes), Err(DecodeError::Version { found }));
    }
    let mut bytes = encode(&[]);
    bytes[0] = b'w';
    assert!(matches!(decode(&bytes), Err(DecodeError::Magic(_))));
    let mut bytes = encode(&[]);
    bytes[10..14].copy_from_slice(&(MAX_BATCH as u32 + 1).to_le_bytes());
    assert_eq!(
        decode(&bytes),
        Err(DecodeError::TooMany(MAX_BATCH as u32 + 1))
    );
}

/// Makes a snapshot one no connection could be in.
type Spoil = fn(&mut Snapshot);

/// One bad connection refuses the batch, whichever it is, with its index.
#[test]
fn one_impossible_connection_refuses_the_whole_batch() {
    let cases: [(&str, Spoil); 9] = [
        ("a whole header held", |s| {
            s.client.scanner.partial = frame::ping_frame(b"", Some([1, 2, 3, 4]))[..6].to_vec()
        }),
        ("held bytes inside a payload", |s| {
            s.client.scanner.partial = vec![0x81];
            s.client.scanner.remaining = 1;
        }),
        ("a Close passed unseen", |s| {
            s.client.scanner.close_passed = true
        }),
        ("a frame after a Close", |s| {
            s.server.scanner.close_seen = true;
            s.server.scanner.remaining = 1;
        }),
        ("a message over the limit", |s| {
            s.client.scanner.open_message = Some(s.settings.limits.max_message + 1)
        }),
        ("an empty queued piece", |s| {
            s.server.queued.push(Queued {
                bytes: Vec::new(),
                close: None,
            })
        }),
        ("too many queued pieces", |s| {
            s.server.queued = vec![
                Queued {
                    bytes: vec![0],
                    close: None
                };
                MAX_QUEUED_PIECES + 1
            ]
        }),
        ("a duration over 24h", |s| {
            s.idle_for = Duration::from_secs(24 * 3600 + 1)
        }),
        ("a long close reason", |s| {
            s.pending_close = Some((1001, "x".repeat(124)))
        }),
    ];
    for (case, spoil) in cases {
        for index in 0..3u32 {
            let mut batch = vec![busy(), quiet(), busy()];
            spoil(&mut batch[index as usize]);
            let fault = batch[index as usize].check().expect_err(case);
            assert_eq!(
                decode(&encode(&batch)),
                Err(DecodeError::Connection {
                    index,
                    fault: Fault::Invalid(fault)
                }),
                "{case}"
            );
        }
    }
}

/// Values the format does not have: a flag bit, a boolean, an address
/// family, a reason that is not UTF-8.
#[test]
fn values_out_of_range_are_refused_with_what_they_are() {
    let value = |what, value| Fault::Value { what, value };
    assert_eq!(
        Reader(&[0x40]).bits::<6>("a peer's flags"),
        Err(value("a peer's flags", 0x40))
    );
    assert_eq!(Reader(&[2]).bool("x"), Err(value("x", 2)));
    assert_eq!(Reader(&[5]).addr("y"), Err(value("y", 5)));
    assert_eq!(Reader(&[1, 2]).u16("z").map(u16::to_le_bytes), Ok([1, 2]));
    assert_eq!(Reader(&[1]).u16("z"), Err(Fault::Truncated("z")));

    // In place, in a whole batch: the RSV1 flag of an IPv4 backend's
    // connection comes after the header (14), the record's length (4),
    // the service (6), the backend (4), its address (7) and the
    // settings (33, without a ping interval).
    let mut bytes = encode(&[quiet()]);
    let rsv1 = 14 + 4 + 6 + 4 + 7 + 33;
    assert_eq!(bytes[rsv1], 0);
    bytes[rsv1] = 2;
    assert_eq!(
        decode(&bytes),
        Err(DecodeError::Connection {
            index: 0,
            fault: value("the RSV1 flag", 2)
        })
    );
    let mut s = busy();
    s.pending_close = Some((1001, "é".into()));
    s.drain_in = None;
    let mut bytes = encode(&[s]);
    // The reason's last byte, before the drain's absence.
    let at = bytes.len() - 2;
    bytes[at] = 0xff;
    assert_eq!(
        decode(&bytes),
        Err(DecodeError::Connection {
            index: 0,
            fault: Fault::Utf8 {
                what: "the pending close"
            }
        })
    );
}

#[test]
fn errors_say_what_and_where() {
    let mut bytes = encode(&[busy()]);
    bytes[8..10].copy_from_slice(&2u16.to_le_bytes());
    assert_eq!(
        decode(&bytes).unwrap_err().to_string(),
        "handoff format version 2, this weir reads version 1: takeover refused"
    );
    let bytes = encode(&[quiet(), busy()]);
    let err = decode(&bytes[..bytes.len() - 3]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "connection 1 of the batch: cut short in the record length"
    );
}

proptest::proptest! {
    /// Any byte of a valid batch changed: refused, or a batch that
    /// encodes back to exactly those bytes (the encoding is canonical).
    #[test]
    fn a_changed_byte_is_refused_or_read_exactly(at in 0usize..1000, to in proptest::prelude::any::<u8>()) {
        let mut bytes = encode(&[busy(), quiet()]);
        let at = at % bytes.len();
        bytes[at] = to;
        if let Ok(batch) = decode(&bytes) {
            proptest::prop_assert_eq!(encode(&batch), bytes);
        }
    }

    /// Arbitrary input never panics.
    #[test]
    fn arbitrary_bytes_are_refused_not_a_panic(tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
        let mut bytes = encode(&[]);
        bytes[10] = 1;
        bytes.extend(tail);
        let _ = decode(&bytes);
    }
}

#[test]
fn whole_frames_queued_survive_byte_for_byte() {
    let mut s = quiet();
    let data = frame::whole_frame(Opcode::Binary, true, &[0xab; 70_000], None);
    s.client.queued = vec![Queued {
        bytes: data.clone(),
        close: None,
    }];
    let batch = decode(&encode(&[s])).unwrap();
    assert_eq!(batch[0].client.queued[0].bytes, data);
}
