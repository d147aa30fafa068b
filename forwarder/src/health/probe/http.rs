//! The HTTP check: `GET path HTTP/1.1` with `Connection: close`; the
//! status line decides.

use weir_ebpf::abi::HealthReason;

use super::{MAX_HEAD, Outcome, Step};

/// Header fields an answer may carry before it counts as malformed.
const MAX_HEADERS: usize = 64;

#[derive(Debug)]
pub(super) struct Exchange {
    expect_status: u16,
    head: Vec<u8>,
}

impl Exchange {
    pub(super) fn start(path: &str, host: &str, expect_status: u16) -> (Self, Vec<u8>) {
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: weir-agent\r\nAccept: */*\r\n\
             Connection: close\r\n\r\n"
        );
        let exchange = Self {
            expect_status,
            head: Vec::new(),
        };
        (exchange, request.into_bytes())
    }

    pub(super) fn received(&mut self, bytes: &[u8]) -> Step {
        self.head.extend_from_slice(bytes);
        match status(&self.head) {
            Ok(None) => Step::Wait,
            Ok(Some(status)) if status == self.expect_status => Step::Done(Outcome::PASSED),
            Ok(Some(status)) => Step::Done(Outcome::new(HealthReason::Status, status)),
            Err(()) => Step::Done(Outcome::new(HealthReason::BadHandshake, 0)),
        }
    }
}

/// The status of a complete response head at the start of `buf`;
/// `Ok(None)` while it is incomplete; `Err` when it is malformed or longer
/// than [`MAX_HEAD`].
pub fn status(buf: &[u8]) -> Result<Option<u16>, ()> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n <= MAX_HEAD => Ok(response.code),
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => Ok(None),
        _ => Err(()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Check, Probe, Step};
    use super::*;

    fn probe(expect_status: u16) -> (Probe, String) {
        let check = Check::Http {
            path: "/healthz?deep=1".into(),
            host: None,
            expect_status,
        };
        let mut p = Probe::new(&check, "198.18.0.5:8080", [0; 32]);
        let Step::Send(request) = p.connected() else {
            panic!("an HTTP check sends its request first");
        };
        (p, String::from_utf8(request).unwrap())
    }

    #[test]
    fn the_request_is_a_closing_get_of_the_path() {
        let (_, request) = probe(200);
        assert!(
            request.starts_with("GET /healthz?deep=1 HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(
            request.contains("\r\nHost: 198.18.0.5:8080\r\n"),
            "{request}"
        );
        assert!(request.contains("\r\nConnection: close\r\n"), "{request}");
        assert!(request.ends_with("\r\n\r\n"));
        let named = Check::Http {
            path: "/".into(),
            host: Some("app.example".into()),
            expect_status: 200,
        };
        let Step::Send(r) = Probe::new(&named, "198.18.0.5:80", [0; 32]).connected() else {
            panic!()
        };
        assert!(
            String::from_utf8(r)
                .unwrap()
                .contains("\r\nHost: app.example\r\n")
        );
    }

    #[test]
    fn the_expected_status_passes_and_another_fails_with_it() {
        let (mut p, _) = probe(200);
        assert_eq!(
            p.received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
            Step::Done(Outcome::PASSED)
        );
        let (mut p, _) = probe(204);
        assert_eq!(
            p.received(b"HTTP/1.1 200 OK\r\n\r\n"),
            Step::Done(Outcome::new(HealthReason::Status, 200))
        );
        let (mut p, _) = probe(200);
        assert_eq!(
            p.received(b"HTTP/1.0 503 Service Unavailable\r\n\r\n"),
            Step::Done(Outcome::new(HealthReason::Status, 503))
        );
    }

    #[test]
    fn a_head_split_over_reads_is_waited_for() {
        let (mut p, _) = probe(200);
        let answer = b"HTTP/1.1 200 OK\r\nServer: x\r\n\r\n";
        for (i, b) in answer.iter().enumerate() {
            let step = p.received(&[*b]);
            if i + 1 < answer.len() {
                assert_eq!(step, Step::Wait, "byte {i}");
            } else {
                assert_eq!(step, Step::Done(Outcome::PASSED));
            }
        }
    }

    #[test]
    fn malformed_or_endless_heads_fail() {
        let bad = Outcome::new(HealthReason::BadHandshake, 0);
        let (mut p, _) = probe(200);
        assert_eq!(p.received(b"SSH-2.0-OpenSSH_9.6\r\n"), Step::Done(bad));
        let (mut p, _) = probe(200);
        assert_eq!(p.received(b"HTTP/1.1 200 OK\r\n"), Step::Wait);
        let endless = format!("X-Pad: {}\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(p.received(endless.as_bytes()), Step::Done(bad));
        let (mut p, _) = probe(200);
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: 1\r\n")).collect();
        assert_eq!(
            p.received(format!("HTTP/1.1 200 OK\r\n{many}\r\n").as_bytes()),
            Step::Done(bad)
        );
    }

    #[test]
    fn a_close_before_the_head_is_a_reset() {
        let (mut p, _) = probe(200);
        assert_eq!(p.received(b"HTTP/1.1 2"), Step::Wait);
        assert_eq!(p.closed(), Outcome::new(HealthReason::Reset, 0));
    }

    proptest::proptest! {
        #[test]
        fn any_answer_ends_or_waits_without_panicking(
            chunks in proptest::collection::vec(proptest::collection::vec(0u8..=255, 0..64), 0..8)
        ) {
            let (mut p, _) = probe(200);
            for c in &chunks {
                if let Step::Done(_) = p.received(c) {
                    break;
                }
            }
        }
    }
}
