//! The textual forms of registry addresses, for the CLI and the `weir run`
//! configuration alike. Strict: anything ambiguous is an error naming the
//! expected form.

use std::net::Ipv4Addr;
use std::str::FromStr;

use super::model::{BackendAddr, ServiceAddr};

/// An address or weight that does not parse; the message names the form
/// expected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AddrError(String);

fn ipv4(s: &str, what: &str) -> Result<Ipv4Addr, AddrError> {
    s.parse::<Ipv4Addr>().map_err(|_| {
        AddrError(format!(
            "{what} {s:?} is not an IPv4 address (IPv6 is not supported yet)"
        ))
    })
}

/// Refuses IPv6 forms (`[::1]:80`, `::1`) as a whole, before any split on
/// ':' cuts them into meaningless pieces.
fn not_ipv6(s: &str, what: &str) -> Result<(), AddrError> {
    let host = s
        .strip_prefix('[')
        .and_then(|r| r.split_once(']'))
        .map(|(h, _)| h);
    let v6 = host.unwrap_or(s).parse::<std::net::Ipv6Addr>().is_ok() || host.is_some();
    if v6 || s.matches(':').count() > 1 {
        return Err(AddrError(format!(
            "{what} {s:?} is IPv6; weir's registry takes IPv4 addresses only (IPv6 is not \
             supported yet)"
        )));
    }
    Ok(())
}

fn port(s: &str, what: &str) -> Result<u16, AddrError> {
    match s.parse::<u16>() {
        Ok(0) | Err(_) => Err(AddrError(format!(
            "{what} port {s:?} must be a number from 1 to 65535"
        ))),
        Ok(p) => Ok(p),
    }
}

/// `VIP:PORT`.
impl FromStr for ServiceAddr {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Self, AddrError> {
        not_ipv6(s, "service")?;
        let (vip, p) = s.rsplit_once(':').ok_or_else(|| {
            AddrError(format!(
                "service {s:?} must be VIP:PORT, e.g. 198.19.0.10:8080"
            ))
        })?;
        Ok(ServiceAddr {
            vip: ipv4(vip, "service address")?,
            port: port(p, "service")?,
        })
    }
}

impl BackendAddr {
    /// `ADDR[:PORT]` of a backend of `service`; the port defaults to the
    /// service's (as an L4 backend's must be).
    pub fn parse_for(s: &str, service: &ServiceAddr) -> Result<Self, AddrError> {
        not_ipv6(s, "backend")?;
        match s.split_once(':') {
            Some((a, p)) => Ok(BackendAddr {
                addr: ipv4(a, "backend address")?,
                port: port(p, "backend")?,
            }),
            None => Ok(BackendAddr {
                addr: ipv4(s, "backend address")?,
                port: service.port,
            }),
        }
    }

    /// `ADDR[:PORT][@WEIGHT]`; the weight defaults to 1.
    pub fn parse_weighted_for(s: &str, service: &ServiceAddr) -> Result<(Self, u16), AddrError> {
        let (addr, weight) = match s.split_once('@') {
            Some((a, w)) => (a, parse_weight(w)?),
            None => (s, 1),
        };
        Ok((Self::parse_for(addr, service)?, weight))
    }
}

/// A backend weight: 1 to 65535.
pub fn parse_weight(s: &str) -> Result<u16, AddrError> {
    match s.parse::<u16>() {
        Ok(0) | Err(_) => Err(AddrError(format!(
            "weight {s:?} must be a number from 1 to 65535"
        ))),
        Ok(w) => Ok(w),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc() -> ServiceAddr {
        "198.19.0.10:8080".parse().unwrap()
    }

    #[test]
    fn parses_services() {
        assert_eq!(
            svc(),
            ServiceAddr {
                vip: Ipv4Addr::new(198, 19, 0, 10),
                port: 8080
            }
        );
        for bad in [
            "198.19.0.10",
            "198.19.0.10:0",
            "198.19.0.10:65536",
            "host:80",
            "[::1]:80",
            ":80",
            "1.2.3.4:x",
        ] {
            assert!(bad.parse::<ServiceAddr>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn parses_backends_with_defaults() {
        assert_eq!(
            BackendAddr::parse_for("198.18.10.2", &svc()).unwrap().port,
            8080
        );
        assert_eq!(
            BackendAddr::parse_for("198.18.10.2:9000", &svc())
                .unwrap()
                .port,
            9000
        );
        assert_eq!(
            BackendAddr::parse_weighted_for("198.18.10.2@3", &svc())
                .unwrap()
                .1,
            3
        );
        assert_eq!(
            BackendAddr::parse_weighted_for("198.18.10.2:8080@65535", &svc())
                .unwrap()
                .1,
            65535
        );
        assert_eq!(
            BackendAddr::parse_weighted_for("198.18.10.2", &svc())
                .unwrap()
                .1,
            1
        );
        for bad in [
            "198.18.10.2@0",
            "198.18.10.2@-1",
            "198.18.10.2@70000",
            "198.18.10.2:0",
            "nope",
            "198.18.10.2@",
        ] {
            assert!(
                BackendAddr::parse_weighted_for(bad, &svc()).is_err(),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn ipv6_is_named_as_such() {
        for bad in [
            "[::1]:80",
            "::1",
            "[2001:db8::1]:8080",
            "2001:db8::1",
            "[::1]",
        ] {
            let e = bad.parse::<ServiceAddr>().unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?} is IPv6")), "{bad}: {e}");
            let e = BackendAddr::parse_for(bad, &svc()).unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?} is IPv6")), "{bad}: {e}");
            let e = BackendAddr::parse_weighted_for(&format!("{bad}@2"), &svc())
                .unwrap_err()
                .to_string();
            assert!(e.contains("is IPv6"), "{bad}: {e}");
        }
    }

    proptest::proptest! {
        /// Whatever an operator types, parsing returns a value or an error
        /// message; it never panics, and what it accepts prints back as
        /// the same address.
        #[test]
        fn arbitrary_input_never_panics(input in "\\PC{0,40}") {
            let _ = input.parse::<ServiceAddr>();
            let _ = BackendAddr::parse_weighted_for(&input, &svc());
            let _ = parse_weight(&input);
        }

        #[test]
        fn valid_forms_round_trip(a in 1u8..=254, b: u8, port in 1u16..=65535, w in 1u16..=65535) {
            let text = format!("198.{a}.{b}.7:{port}");
            let parsed: ServiceAddr = text.parse().unwrap();
            proptest::prop_assert_eq!(parsed.to_string(), text.clone());
            let (backend, weight) = BackendAddr::parse_weighted_for(&format!("{text}@{w}"), &parsed).unwrap();
            proptest::prop_assert_eq!(backend.to_string(), text);
            proptest::prop_assert_eq!(weight, w);
        }
    }
}
