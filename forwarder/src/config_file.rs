//! What weir's TOML configuration files (`weir run`'s and `weir agent`'s)
//! share: errors that name the file, line, column and reason; durations
//! with units; the checks on keys every file has (addresses, ranges). A bad
//! file is refused at start; nothing runs half configured.

use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::registry::ServiceAddr;

/// A refused configuration: where and why.
#[derive(Debug, thiserror::Error)]
#[error("{source_name}:{line}:{column}: {reason}")]
pub struct ConfigError {
    pub source_name: String,
    pub line: usize,
    pub column: usize,
    pub reason: String,
}

/// The longest duration any setting takes; longer ones are surely typos
/// (and some would overflow the clock arithmetic).
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// Reads a configuration file; an unreadable one is an error at line 0.
pub fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError {
        source_name: path.display().to_string(),
        line: 0,
        column: 0,
        reason: format!("cannot read: {e}"),
    })
}

/// Configuration text and its name, to turn spans into errors. Every error
/// names the key as written (`table.key`), the value, and what is allowed.
#[derive(Clone, Copy)]
pub struct Source<'a> {
    text: &'a str,
    name: &'a str,
}

impl<'a> Source<'a> {
    pub fn new(text: &'a str, name: &'a str) -> Self {
        Self { text, name }
    }

    /// An error at the start of `span`.
    pub fn error(&self, span: Range<usize>, reason: String) -> ConfigError {
        let upto = &self.text[..span.start.min(self.text.len())];
        let line = upto.matches('\n').count() + 1;
        let column = upto.len() - upto.rfind('\n').map_or(0, |i| i + 1) + 1;
        ConfigError {
            source_name: self.name.into(),
            line,
            column,
            reason,
        }
    }

    /// `FILE:LINE` of a span, for messages that point at a key.
    pub fn place(&self, span: Range<usize>) -> String {
        let e = self.error(span, String::new());
        format!("{}:{}", e.source_name, e.line)
    }

    /// The text as TOML into `T` (unknown keys refused where `T` says so).
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        toml::from_str(self.text).map_err(|e| {
            let reason = e.message().to_string();
            self.error(e.span().unwrap_or(0..0), reason)
        })
    }

    /// A duration from `min` to [`MAX_DURATION`].
    pub fn duration(
        &self,
        s: &toml::Spanned<String>,
        key: &str,
        min: Duration,
    ) -> Result<Duration, ConfigError> {
        let value =
            parse_duration(s.get_ref()).map_err(|r| self.error(s.span(), format!("{key}: {r}")))?;
        if value < min || value > MAX_DURATION {
            let low = if min.is_zero() {
                "0s".to_string()
            } else {
                format!("{min:?}")
            };
            return Err(self.error(
                s.span(),
                format!("{key} = {:?}: must be from {low} to 24h", s.get_ref()),
            ));
        }
        Ok(value)
    }

    /// A number in `min..=max`; `note` follows the range in the error.
    pub fn range(
        &self,
        v: &toml::Spanned<u64>,
        key: &str,
        min: u64,
        max: u64,
        note: &str,
    ) -> Result<u64, ConfigError> {
        let value = *v.get_ref();
        if (min..=max).contains(&value) {
            Ok(value)
        } else {
            Err(self.error(
                v.span(),
                format!("{key} = {value}: must be {min}..={max}{note}"),
            ))
        }
    }

    /// A socket address, `IP:PORT`.
    pub fn addr(&self, s: &toml::Spanned<String>, key: &str) -> Result<SocketAddr, ConfigError> {
        s.get_ref().parse::<SocketAddr>().map_err(|_| {
            self.error(
                s.span(),
                format!(
                    "{key} = {:?}: must be IP:PORT, e.g. 127.0.0.1:8080 or [::1]:8080",
                    s.get_ref()
                ),
            )
        })
    }

    /// A registry service, `VIP:PORT`.
    pub fn service(
        &self,
        s: &toml::Spanned<String>,
        key: &str,
    ) -> Result<ServiceAddr, ConfigError> {
        s.get_ref()
            .parse::<ServiceAddr>()
            .map_err(|r| self.error(s.span(), format!("{key}: {r}")))
    }

    /// The `instance` key: a valid instance name.
    pub fn instance(&self, s: &toml::Spanned<String>) -> Result<String, ConfigError> {
        crate::instance::Instance::new(s.get_ref())
            .map_err(|e| self.error(s.span(), format!("instance: {e}")))?;
        Ok(s.get_ref().clone())
    }
}

/// Parses a duration: a number, which may have a fraction, and a unit
/// `ms`, `s`, `m` or `h` (`250ms`, `1.5s`, `5m`, `0.5h`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let nanos_per_unit: u128 = match unit {
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        _ if num.is_empty() => {
            return Err(format!(
                "{s:?} is not a duration: write a number and a unit ms, s, m or h, \
                 e.g. 250ms, 1.5s, 5m"
            ));
        }
        _ => {
            return Err(format!(
                "{s:?}: the unit must be ms, s, m or h (e.g. 250ms, 1.5s, 5m)"
            ));
        }
    };
    let (whole, fraction) = num.split_once('.').unwrap_or((num, "0"));
    let digits = |d: &str| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || !digits(fraction) || fraction.len() > 9 {
        return Err(format!(
            "{s:?} is not a duration: write a number (at most 9 decimals) and a unit ms, s, m \
             or h, e.g. 250ms, 1.5s, 5m"
        ));
    }
    let too_long = || format!("{s:?} is too long");
    let whole: u128 = whole.parse().map_err(|_| too_long())?;
    let fraction: u128 = format!("{fraction:0<9}").parse().map_err(|_| too_long())?;
    let nanos = whole
        .checked_mul(nanos_per_unit)
        .and_then(|n| n.checked_add(fraction * nanos_per_unit / 1_000_000_000))
        .ok_or_else(too_long)?;
    u64::try_from(nanos)
        .map(Duration::from_nanos)
        .map_err(|_| too_long())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["", "s", "10", "10x", "-1s", "99999999999999999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations_take_fractions() {
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0.25m"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("2.5ms"), Ok(Duration::from_micros(2500)));
        assert_eq!(parse_duration("0.5h"), Ok(Duration::from_secs(1800)));
        for bad in [".5s", "1.s", "1.2.3s", "1.0000000001s"] {
            let e = parse_duration(bad).expect_err(bad);
            assert!(e.contains("e.g. 250ms, 1.5s, 5m"), "{bad}: {e}");
        }
        let e = parse_duration("1.5 sec").unwrap_err();
        assert!(e.contains("unit must be ms, s, m or h"), "{e}");
    }
}
