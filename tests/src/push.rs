//! Server push as `weir-echo` does it and the bench's generator asks for
//! it: a client sends one text message ([`PushRequest`]), and the backend
//! sends it `count` binary frames on a fixed schedule, each carrying the
//! wall-clock time it was *scheduled* for. Every process of a topology
//! reads the same CLOCK_REALTIME, so the receiver's clock minus the stamp
//! is the delivery latency through whatever sits in between; a sender held
//! back by a slow path sends late frames at once with their scheduled
//! stamps, so the delay shows up as latency and no frame goes missing.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// The bytes a frame starts with: scheduled time (ns) and sequence number.
pub const HEADER_BYTES: usize = 16;
/// What the rest of a frame is filled with.
const PAD: u8 = 0x5a;

/// `push rate=R size=S count=N delay_us=D`: after `delay`, send `count`
/// frames of `size` bytes, `rate` per second.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PushRequest {
    /// Frames per second on this connection.
    pub rate: f64,
    /// Bytes per frame, at least [`HEADER_BYTES`].
    pub size: usize,
    pub count: u64,
    /// From receiving the request to the first frame: lets a client spread
    /// its connections' schedules over one period.
    pub delay: Duration,
}

impl PushRequest {
    /// Time between two frames.
    pub fn period(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.rate)
    }
}

impl fmt::Display for PushRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "push rate={} size={} count={} delay_us={}",
            self.rate,
            self.size,
            self.count,
            self.delay.as_micros()
        )
    }
}

impl FromStr for PushRequest {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<PushRequest> {
        let fields = s
            .strip_prefix("push ")
            .with_context(|| format!("{s:?} is not a push request"))?;
        let (mut rate, mut size, mut count, mut delay) = (None, None, None, None);
        for kv in fields.split_whitespace() {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("push request field {kv:?} has no value"))?;
            let bad = || format!("push request field {kv:?}");
            match k {
                "rate" => rate = Some(v.parse::<f64>().with_context(bad)?),
                "size" => size = Some(v.parse::<usize>().with_context(bad)?),
                "count" => count = Some(v.parse::<u64>().with_context(bad)?),
                "delay_us" => delay = Some(Duration::from_micros(v.parse().with_context(bad)?)),
                _ => bail!("unknown push request field {kv:?}"),
            }
        }
        let req = PushRequest {
            rate: rate.context("push request without rate")?,
            size: size.context("push request without size")?,
            count: count.context("push request without count")?,
            delay: delay.unwrap_or_default(),
        };
        ensure!(
            req.rate.is_finite() && req.rate > 0.0,
            "push rate must be above 0"
        );
        ensure!(
            req.size >= HEADER_BYTES,
            "push size must be at least {HEADER_BYTES}"
        );
        Ok(req)
    }
}

/// Nanoseconds since the Unix epoch (CLOCK_REALTIME).
pub fn realtime_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// A frame scheduled for `stamp_ns` (CLOCK_REALTIME), number `seq`.
pub fn frame(stamp_ns: u64, seq: u64, size: usize) -> Vec<u8> {
    let mut f = vec![PAD; size.max(HEADER_BYTES)];
    f[..8].copy_from_slice(&stamp_ns.to_le_bytes());
    f[8..16].copy_from_slice(&seq.to_le_bytes());
    f
}

/// The stamp and sequence number of a frame of `size` bytes; `None` when
/// its length or padding is not what was sent.
pub fn read_frame(data: &[u8], size: usize) -> Option<(u64, u64)> {
    if data.len() != size
        || data.len() < HEADER_BYTES
        || data[HEADER_BYTES..].iter().any(|&b| b != PAD)
    {
        return None;
    }
    let stamp = u64::from_le_bytes(data[..8].try_into().ok()?);
    let seq = u64::from_le_bytes(data[8..16].try_into().ok()?);
    Some((stamp, seq))
}

/// The backend's side of one request: its frames, each handed out once it
/// is due. The schedule is a CLOCK_REALTIME timerfd rather than a tokio
/// timer, which rounds up to the millisecond and would add up to 1 ms of
/// the backend's own to every latency.
pub struct Pusher {
    req: PushRequest,
    timer: AsyncFd<OwnedFd>,
    first_ns: u64,
    period_ns: u64,
    sent: u64,
    /// Frames due and not handed out yet (the timer counts missed periods).
    due: u64,
}

impl Pusher {
    /// Arms the schedule: the first frame is due `req.delay` from now.
    pub fn start(req: PushRequest) -> io::Result<Pusher> {
        // SAFETY: timerfd_create takes no pointers; the fd is checked.
        let fd = unsafe {
            libc::timerfd_create(libc::CLOCK_REALTIME, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC)
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let period_ns = (req.period().as_nanos() as u64).max(1);
        let first_ns = realtime_ns() + req.delay.as_nanos() as u64;
        let spec = libc::itimerspec {
            it_value: timespec(first_ns),
            it_interval: timespec(period_ns),
        };
        // SAFETY: a valid timerfd and itimerspec; the old value is not wanted.
        let r = unsafe {
            libc::timerfd_settime(
                fd.as_raw_fd(),
                libc::TFD_TIMER_ABSTIME,
                &spec,
                std::ptr::null_mut(),
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays
        // open and the same for the AsyncFd's whole life.
        let timer = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(Pusher {
            req,
            timer,
            first_ns,
            period_ns,
            sent: 0,
            due: 0,
        })
    }

    /// Every frame was handed out.
    pub fn done(&self) -> bool {
        self.sent >= self.req.count
    }

    /// The next frame, once it is due, stamped with the time it was due.
    /// Cancel-safe: nothing awaits between reading the timer and returning.
    pub async fn next(&mut self) -> io::Result<Vec<u8>> {
        while self.due == 0 {
            let mut ready = self.timer.readable().await?;
            let expirations = ready.try_io(|fd| {
                let mut buf = [0u8; 8];
                // SAFETY: reads 8 bytes into an 8-byte buffer.
                let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n == 8 {
                    Ok(u64::from_ne_bytes(buf))
                } else {
                    Err(io::Error::last_os_error())
                }
            });
            match expirations {
                Ok(Ok(n)) => self.due += n,
                Ok(Err(e)) => return Err(e),
                // Spurious readiness: wait again.
                Err(_) => {}
            }
        }
        self.due -= 1;
        let f = frame(
            self.first_ns + self.sent * self.period_ns,
            self.sent,
            self.req.size,
        );
        self.sent += 1;
        Ok(f)
    }
}

fn timespec(ns: u64) -> libc::timespec {
    libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_through_their_text() {
        let req = PushRequest {
            rate: 12.5,
            size: 64,
            count: 300,
            delay: Duration::from_micros(4_000),
        };
        let text = req.to_string();
        assert_eq!(text, "push rate=12.5 size=64 count=300 delay_us=4000");
        assert_eq!(text.parse::<PushRequest>().unwrap(), req);
        assert_eq!(req.period(), Duration::from_millis(80));
        let no_delay: PushRequest = "push rate=1 size=16 count=1".parse().unwrap();
        assert_eq!(no_delay.delay, Duration::ZERO);
    }

    #[test]
    fn bad_requests_are_refused() {
        for bad in [
            "hello",
            "push rate=0 size=64 count=1",
            "push rate=10 size=8 count=1",
            "push rate=10 size=64",
            "push rate=10 size=64 count=1 colour=red",
            "push rate=x size=64 count=1",
        ] {
            assert!(bad.parse::<PushRequest>().is_err(), "{bad}");
        }
    }

    #[test]
    fn frames_carry_their_stamp_and_sequence() {
        let f = frame(1_700_000_000_123_456_789, 42, 64);
        assert_eq!(f.len(), 64);
        assert_eq!(read_frame(&f, 64), Some((1_700_000_000_123_456_789, 42)));
        assert_eq!(read_frame(&f, 65), None);
        let mut bent = f.clone();
        bent[40] = 0;
        assert_eq!(read_frame(&bent, 64), None);
    }

    /// Frames come on their schedule, stamped with it; a consumer that
    /// falls behind gets the missed frames at once with their own stamps.
    #[tokio::test]
    async fn a_pusher_hands_out_frames_on_schedule() {
        let req = PushRequest {
            rate: 200.0,
            size: 32,
            count: 10,
            delay: Duration::from_millis(20),
        };
        let asked = realtime_ns();
        let mut p = Pusher::start(req).unwrap();
        let (first, seq) = read_frame(&p.next().await.unwrap(), 32).unwrap();
        assert_eq!(seq, 0);
        let after = realtime_ns();
        assert!(first >= asked + 20_000_000, "due {first}, asked {asked}");
        assert!(after >= first, "handed out before it was due");
        // Fall 30 ms (six periods) behind.
        std::thread::sleep(Duration::from_millis(30));
        let mut stamps = vec![first];
        while !p.done() {
            let (stamp, seq) = read_frame(&p.next().await.unwrap(), 32).unwrap();
            assert_eq!(seq, stamps.len() as u64);
            stamps.push(stamp);
        }
        for w in stamps.windows(2) {
            assert_eq!(w[1] - w[0], 5_000_000);
        }
        assert_eq!(stamps.len(), 10);
    }
}
