//! systemd's notification protocol: a daemon under `Type=notify` says
//! when it serves (`READY=1`), and a process that took over from the main
//! one says it is the main one now (`MAINPID=`, which systemd accepts from
//! a process other than the main one only with `NotifyAccess=all`). One
//! datagram to the socket `$NOTIFY_SOCKET` names; nothing without it.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `state` (lines of `KEY=value`) to systemd; `Ok(false)` when not
/// run under a notify service.
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let path = path.to_string_lossy().into_owned();
    let addr = match path.strip_prefix('@') {
        // An abstract socket: the name without its '@'.
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes())?,
        None => SocketAddr::from_pathname(&path)?,
    };
    let socket = UnixDatagram::unbound()?;
    socket.send_to_addr(state.as_bytes(), &addr)?;
    Ok(true)
}

/// Tells systemd this process serves (and, after a takeover, is the
/// service's main process now); a failure is logged, not fatal: the
/// proxy serves either way.
pub fn serving(took_over: bool) {
    let pid = std::process::id();
    let state = if took_over {
        format!("MAINPID={pid}\nREADY=1\nSTATUS=serving (took over)")
    } else {
        "READY=1\nSTATUS=serving".to_string()
    };
    if let Err(e) = notify(&state) {
        tracing::warn!(
            event = "notify_failed",
            "cannot tell systemd this process serves ({e}); with Type=notify it waits for it"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The datagram reaches the socket `$NOTIFY_SOCKET` names, abstract or
    /// a path. (One test: the variable is the process's.)
    #[test]
    fn the_state_reaches_the_notify_socket() {
        let dir = std::env::temp_dir().join(format!("weir-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        // SAFETY: this test is the only one in the crate that touches the
        // variable.
        unsafe { std::env::set_var("NOTIFY_SOCKET", &path) };
        assert!(notify("READY=1").unwrap());
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        let name = format!("weir-notify-{}", std::process::id());
        let abstract_listener =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        unsafe { std::env::set_var("NOTIFY_SOCKET", format!("@{name}")) };
        assert!(notify("MAINPID=1\nREADY=1").unwrap());
        let n = abstract_listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"MAINPID=1\nREADY=1");

        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
        assert!(!notify("READY=1").unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
