//! A listener probe before binding with SO_REUSEPORT: another process on
//! the same address would otherwise silently take part of the traffic.

use std::net::SocketAddr;

/// Refuses to share `addr` with another process. weir's listeners use
/// SO_REUSEPORT so that its own workers share them; without this check a
/// second process (another `weir run` instance, or any other server with
/// SO_REUSEPORT) on the same address would start and silently take part
/// of the connections. A probe bound without SO_REUSEPORT fails exactly
/// when someone listens there.
pub fn check_listener_free(addr: SocketAddr) -> Result<(), String> {
    match std::net::TcpListener::bind(addr) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let owners = listening_pids(addr);
            let by = if owners.is_empty() {
                "another process".to_string()
            } else {
                owners
                    .iter()
                    .map(|(pid, comm)| format!("pid {pid} ({comm})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            Err(format!(
                "listener {addr} is already in use by {by}; weir run does not share a listener \
                 with another process: stop it, or set `shared = true` on this [[listener]] in \
                 every process that serves it on purpose"
            ))
        }
        Err(e) => Err(format!("listening on {addr}: {e}")),
    }
}

/// Processes in this network namespace with a TCP socket listening on
/// `addr` (or on the wildcard address of its port).
fn listening_pids(addr: SocketAddr) -> Vec<(u32, String)> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st ... inode (column 9)
            if cols.len() < 10 || cols[3] != "0A" {
                continue;
            }
            let Some(local) = parse_proc_addr(cols[1]) else {
                continue;
            };
            let same_ip = local.ip() == addr.ip()
                || local.ip().is_unspecified()
                || addr.ip().is_unspecified();
            if local.port() == addr.port() && same_ip {
                inodes.push(format!("socket:[{}]", cols[9]));
            }
        }
    }
    let mut owners = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return owners;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let listens = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
        });
        if listens && pid != std::process::id() {
            let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            owners.push((pid, comm.trim().to_string()));
        }
    }
    owners
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6), as the
/// kernel prints them: each 32-bit word in host byte order.
fn parse_proc_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |h: &str| u32::from_str_radix(h, 16).ok().map(u32::to_ne_bytes);
    match ip.len() {
        8 => Some(SocketAddr::from((word(ip)?, port))),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(&ip[i * 8..i * 8 + 8])?);
            }
            Some(SocketAddr::from((bytes, port)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_addresses_parse() {
        if cfg!(target_endian = "little") {
            assert_eq!(
                parse_proc_addr("0100007F:1F90"),
                Some("127.0.0.1:8080".parse().unwrap())
            );
            assert_eq!(
                parse_proc_addr("00000000000000000000000001000000:0050"),
                Some("[::1]:80".parse().unwrap())
            );
        }
        assert_eq!(parse_proc_addr("zz:1"), None);
    }

    #[test]
    fn a_taken_listener_is_refused_and_names_its_owner() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        // Our own process is left out of the owners; the message still
        // refuses.
        let err = check_listener_free(addr).unwrap_err();
        assert!(
            err.contains(&addr.to_string()) && err.contains("in use"),
            "{err}"
        );
        drop(taken);
        check_listener_free(addr).unwrap();
    }
}
