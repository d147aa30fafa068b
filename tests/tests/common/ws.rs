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
    try_send(s, fin, op, payload).unwrap();
}

/// Writes one masked frame; `Err` when the connection is gone.
pub fn try_send(s: &mut TcpStream, fin: bool, op: Opcode, payload: &[u8]) -> std::io::Result<()> {
    s.write_all(&masked(fin, op, payload))
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
    try_recv(s).unwrap_or_else(|e| panic!("{e}"))
}

/// Reads one frame, or says why none came: the stream ended (`end of
/// stream`), failed (the error), or sent what no server may.
pub fn try_recv(s: &mut TcpStream) -> Result<(bool, u8, Vec<u8>), String> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    let header = loop {
        if let Some(h) = frame::parse_header(&buf).map_err(|v| format!("{v:?}"))? {
            break h;
        }
        match s.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            Ok(_) if buf.is_empty() => return Err("end of stream".into()),
            Ok(_) => return Err("end of stream inside a header".into()),
            Err(e) => return Err(e.to_string()),
        }
    };
    if header.mask.is_some() {
        return Err("frames to a client are not masked".into());
    }
    let mut payload = vec![0u8; header.payload_len as usize];
    s.read_exact(&mut payload).map_err(|e| e.to_string())?;
    Ok((header.fin, header.opcode, payload))
}

pub fn close_code(payload: &[u8]) -> u16 {
    u16::from_be_bytes([payload[0], payload[1]])
}
