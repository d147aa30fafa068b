//! What `weir run` tells an operator: events through `tracing`, as text
//! lines in weir's own `weir: warning: ...` form or as JSON objects for
//! log shippers, and a limiter for events that happen per connection, so
//! a backend refusing ten thousand clients writes a few lines, not ten
//! thousand.

use std::fmt;
use std::time::{Duration, Instant};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// `weir: warning: message (key=value, ...)`, one line per event.
    #[default]
    Text,
    /// One JSON object per line: timestamp, level, thread, message and the
    /// event's fields at the top level.
    Json,
}

/// The least severe events written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Verbosity {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
}

impl Verbosity {
    fn level(self) -> Level {
        match self {
            Self::Error => Level::ERROR,
            Self::Warn => Level::WARN,
            Self::Info => Level::INFO,
            Self::Debug => Level::DEBUG,
        }
    }
}

/// Sends this process's events to stderr. Fails if a subscriber is
/// already installed (a second call would silently log nowhere new).
pub fn init(format: Format, verbosity: Verbosity) -> Result<(), String> {
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(verbosity.level());
    let set = match format {
        Format::Text => builder.event_format(TextLine).try_init(),
        Format::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_target(false)
            .with_thread_names(true)
            .try_init(),
    };
    set.map_err(|e| format!("setting up logging: {e}"))
}

/// weir's text form: `weir: ` and, for all but info, the level as a word,
/// then the message and any fields in parentheses. The `event` field names
/// the kind of event for machines; a human reads it in the message.
struct TextLine;

impl<S, N> FormatEvent<S, N> for TextLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let level = match *event.metadata().level() {
            Level::ERROR => "error: ",
            Level::WARN => "warning: ",
            Level::DEBUG => "debug: ",
            Level::TRACE => "trace: ",
            _ => "",
        };
        let mut fields = Fields::default();
        event.record(&mut fields);
        write!(writer, "weir: {level}{}", fields.message)?;
        if !fields.rest.is_empty() {
            write!(writer, " ({})", fields.rest.join(", "))?;
        }
        writeln!(writer)
    }
}

#[derive(Default)]
struct Fields {
    message: String,
    rest: Vec<String>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message = value.to_string(),
            "event" => {}
            name => self.rest.push(format!("{name}={value}")),
        }
    }

    /// `suppressed = 0` says nothing to a reader; JSON keeps it.
    fn record_u64(&mut self, field: &Field, value: u64) {
        match field.name() {
            "suppressed" if value == 0 => {}
            name => self.rest.push(format!("{name}={value}")),
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        match field.name() {
            "message" => self.message = format!("{value:?}"),
            "event" => {}
            name => self.rest.push(format!("{name}={value:?}")),
        }
    }
}

/// At most `burst` events per `window` of one kind; the rest are counted,
/// and the next event let through says how many were left out. Each worker
/// holds its own, so the limit costs no shared state on the hot path.
#[derive(Debug)]
pub struct RateLimit {
    window: Duration,
    burst: u32,
    started: Option<Instant>,
    admitted: u32,
    suppressed: u64,
}

impl RateLimit {
    pub const fn new(burst: u32, window: Duration) -> Self {
        Self {
            window,
            burst,
            started: None,
            admitted: 0,
            suppressed: 0,
        }
    }

    /// Whether to log an event at `now`: `Some(n)` with the number of
    /// events left out since the last one logged, `None` to leave it out.
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        let fresh = self
            .started
            .is_none_or(|s| now.saturating_duration_since(s) >= self.window);
        if fresh {
            self.started = Some(now);
            self.admitted = 0;
        }
        if self.admitted >= self.burst {
            self.suppressed += 1;
            return None;
        }
        self.admitted += 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_rest_is_counted_and_reported_once() {
        let t0 = Instant::now();
        let mut limit = RateLimit::new(3, Duration::from_secs(10));
        let got: Vec<Option<u64>> = (0..6)
            .map(|i| limit.admit(t0 + Duration::from_millis(i)))
            .collect();
        assert_eq!(got, [Some(0), Some(0), Some(0), None, None, None]);
        // Still inside the window: nothing.
        assert_eq!(limit.admit(t0 + Duration::from_secs(9)), None);
        // A new window: the first line carries what was left out.
        assert_eq!(limit.admit(t0 + Duration::from_secs(10)), Some(4));
        assert_eq!(limit.admit(t0 + Duration::from_secs(10)), Some(0));
    }

    #[test]
    fn a_quiet_limit_never_reports_suppressed_events() {
        let t0 = Instant::now();
        let mut limit = RateLimit::new(1, Duration::from_secs(1));
        for s in 0..5 {
            assert_eq!(limit.admit(t0 + Duration::from_secs(s * 2)), Some(0));
        }
    }

    #[test]
    fn a_clock_that_steps_back_does_not_open_a_window() {
        let t0 = Instant::now() + Duration::from_secs(5);
        let mut limit = RateLimit::new(1, Duration::from_secs(1));
        assert_eq!(limit.admit(t0), Some(0));
        assert_eq!(limit.admit(t0 - Duration::from_secs(3)), None);
    }
}
