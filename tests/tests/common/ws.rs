//! A raw WebSocket client over loopback: the handshake and frames written
//! and read by hand, so a test sees every byte `weir run` sends.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use weir::l7::frame::{self, FrameHeader, Opcode};

/// A raw client: the handshake and frames by hand.
pub fn raw_request(port: u16, request: &str) -> (TcpStream, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).unwrap_or(0) == 0 {
            break;
        }
        head.push(byte[0]);
    }
    (s, String::from_utf8_lossy(&head).into_owned())
}

pub fn upgrade(port: u16, path: &str) -> (TcpStream, String) {
    raw_request(
        port,
        &format!(
            "GET {path} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ),
    )
}

pub fn send(s: &mut TcpStream, fin: bool, op: Opcode, payload: &[u8]) {
    s.write_all(&masked(fin, op, payload)).unwrap();
}

/// A frame as a client writes it (masked).
pub fn masked(fin: bool, op: Opcode, payload: &[u8]) -> Vec<u8> {
    let mask = [0x12, 0x34, 0x56, 0x78];
    let mut out = Vec::new();
    FrameHeader::new(fin, op, Some(mask), payload.len() as u64).write_to(&mut out);
    let mut p = payload.to_vec();
    frame::apply_mask(&mut p, mask, 0);
    out.extend(p);
    out
}

/// Reads one frame: (fin, opcode, payload).
pub fn recv(s: &mut TcpStream) -> (bool, u8, Vec<u8>) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    let header = loop {
        if let Some(h) = frame::parse_header(&buf).unwrap() {
            break h;
        }
        assert_eq!(
            s.read(&mut byte).unwrap(),
            1,
            "stream ended inside a header"
        );
        buf.push(byte[0]);
    };
    assert!(header.mask.is_none(), "frames to a client are not masked");
    let mut payload = vec![0u8; header.payload_len as usize];
    s.read_exact(&mut payload).unwrap();
    (header.fin, header.opcode, payload)
}

pub fn close_code(payload: &[u8]) -> u16 {
    u16::from_be_bytes([payload[0], payload[1]])
}
