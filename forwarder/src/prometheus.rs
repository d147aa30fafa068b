//! The Prometheus text exposition both daemons serve (`weir run` and
//! `weir agent`): metric families and the one-request HTTP exchange of a
//! scrape.

use std::fmt::Write as _;

/// Appends one metric family: its help and type, then one line per row
/// (`labels` as written, e.g. `{service="..."}`, or empty).
pub fn family<V: std::fmt::Display>(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    rows: impl IntoIterator<Item = (String, V)>,
) {
    // Writing into a String cannot fail.
    let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
    for (labels, v) in rows {
        let _ = writeln!(out, "{name}{labels} {v}");
    }
}

/// The whole HTTP answer to a scrape request: `/metrics` gets `render()`,
/// anything else a 404; the connection closes after it.
pub fn answer(request: &[u8], render: impl FnOnce() -> String) -> Vec<u8> {
    let (status, body) = if request.starts_with(b"GET /metrics ") {
        ("200 OK", render())
    } else {
        ("404 Not Found", "try /metrics\n".to_string())
    };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_family_has_help_type_and_rows() {
        let mut out = String::new();
        family(
            &mut out,
            "x_total",
            "counter",
            "Xs.",
            [(String::new(), 3), ("{a=\"b\"}".into(), 4)],
        );
        assert_eq!(
            out,
            "# HELP x_total Xs.\n# TYPE x_total counter\nx_total 3\nx_total{a=\"b\"} 4\n"
        );
    }

    #[test]
    fn only_metrics_is_served() {
        let ok =
            String::from_utf8(answer(b"GET /metrics HTTP/1.1\r\n\r\n", || "m 1\n".into())).unwrap();
        assert!(
            ok.starts_with("HTTP/1.1 200 OK\r\n") && ok.ends_with("\r\n\r\nm 1\n"),
            "{ok}"
        );
        assert!(ok.contains("Content-Length: 4\r\n"));
        let no = String::from_utf8(answer(b"GET / HTTP/1.1\r\n\r\n", || unreachable!())).unwrap();
        assert!(no.starts_with("HTTP/1.1 404 Not Found\r\n"), "{no}");
    }
}
