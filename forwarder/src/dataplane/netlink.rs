//! The few rtnetlink exchanges attaching needs: what kind of device an
//! interface is, where its veth peer lives (possibly in another network
//! namespace) and whether that peer runs XDP in the driver; and the policy
//! rule and route of the probe path, and where the kernel sends a marked
//! packet. One request, one answer, on a fresh socket each time.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NLMSG_HDR: usize = 16;
const IFINFOMSG: usize = 16;
const RTGENMSG: usize = 4;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_GETROUTE: u16 = 26;
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;
const RTM_NEWNSID: u16 = 88;
const RTM_GETNSID: u16 = 90;

const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_LINK: u16 = 5;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_LINK_NETNSID: u16 = 37;
const IFLA_XDP: u16 = 43;
const IFLA_TARGET_NETNSID: u16 = 46;
const IFLA_XDP_ATTACHED: u16 = 2;
const IFLA_XDP_DRV_PROG_ID: u16 = 5;
const XDP_ATTACHED_DRV: u8 = 1;
const XDP_ATTACHED_MULTI: u8 = 4;
/// struct rtmsg and struct fib_rule_hdr: both 12 bytes, the table id at
/// offset 4 (0 there when RTA_TABLE/FRA_TABLE carries it).
const RTMSG: usize = 12;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_PREFSRC: u16 = 7;
const RTA_METRICS: u16 = 8;
const RTA_TABLE: u16 = 15;
const RTA_MARK: u16 = 16;
const RTAX_MTU: u16 = 2;
const RTPROT_STATIC: u8 = 4;
const RT_SCOPE_LINK: u8 = 253;
const RTN_UNICAST: u8 = 1;
const RTN_LOCAL: u8 = 2;
const FRA_PRIORITY: u16 = 6;
const FRA_FWMARK: u16 = 10;
const FRA_TABLE: u16 = 15;
const FRA_FWMASK: u16 = 16;
const FR_ACT_TO_TBL: u8 = 1;
const NETNSA_NSID: u16 = 1;
const NETNSA_FD: u16 = 3;
/// Nested attributes carry this flag in their type on some kernels.
const NLA_TYPE_MASK: u16 = 0x3fff;

/// What rtnetlink says about one interface.
#[derive(Debug, Clone, Default)]
pub struct LinkAttrs {
    pub name: String,
    /// `veth`, `vlan`, ...; `None` for plain devices (physical NICs, lo).
    pub kind: Option<String>,
    /// The ifindex of the device this one is tied to (a veth's peer),
    /// counted in the namespace `link_netnsid` names.
    pub link: Option<u32>,
    /// The peer's namespace as an id local to the asking namespace; `None`
    /// when the peer is in the same namespace.
    pub link_netnsid: Option<i32>,
    /// A program is attached in driver (native) mode.
    pub native_xdp: bool,
    /// A program is attached in any mode.
    pub any_xdp: bool,
    pub mtu: u32,
}

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket call; the fd is owned by the returned OwnedFd.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let timeout = libc::timeval {
        tv_sec: 5,
        tv_usec: 0,
    };
    // SAFETY: setsockopt reads a properly sized timeval.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
    Ok(fd)
}

fn push_attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

/// Sends one request (`body` follows the header) and returns the payload of
/// the answer of type `want`, or the kernel's error.
fn request(kind: u16, body: &[u8], want: u16) -> io::Result<Vec<u8>> {
    exchange(kind, NLM_F_REQUEST, body, Some(want))
}

/// Sends one change (`flags` besides request and ack) and waits for the
/// kernel's acknowledgement or error.
fn command(kind: u16, flags: u16, body: &[u8]) -> io::Result<()> {
    exchange(kind, NLM_F_REQUEST | NLM_F_ACK | flags, body, None).map(drop)
}

/// One request and its answer: the payload of type `want`, or (with
/// `want` None) an empty payload for the kernel's acknowledgement.
fn exchange(kind: u16, flags: u16, body: &[u8], want: Option<u16>) -> io::Result<Vec<u8>> {
    let fd = socket()?;
    let seq: u32 = 1;
    let mut msg = Vec::with_capacity(NLMSG_HDR + body.len());
    msg.extend_from_slice(&((NLMSG_HDR + body.len()) as u32).to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(body);
    // SAFETY: send reads msg.len() bytes from a live buffer.
    let sent = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 64 * 1024];
    // A request gets one answer; anything else on the socket is skipped.
    for _ in 0..16 {
        // SAFETY: recv writes at most buf.len() bytes into buf.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut data = &buf[..n as usize];
        while data.len() >= NLMSG_HDR {
            let len = u32::from_ne_bytes(data[0..4].try_into().expect("4 bytes")) as usize;
            let ty = u16::from_ne_bytes([data[4], data[5]]);
            let got_seq = u32::from_ne_bytes(data[8..12].try_into().expect("4 bytes"));
            if len < NLMSG_HDR || len > data.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "truncated netlink message",
                ));
            }
            let payload = &data[NLMSG_HDR..len];
            if got_seq == seq {
                if ty == NLMSG_ERROR {
                    let code = payload
                        .get(0..4)
                        .map_or(0, |b| i32::from_ne_bytes(b.try_into().expect("4 bytes")));
                    if code == 0 && want.is_none() {
                        return Ok(Vec::new());
                    }
                    return Err(io::Error::from_raw_os_error(-code));
                }
                if Some(ty) == want {
                    return Ok(payload.to_vec());
                }
            }
            data = &data[len.next_multiple_of(4).min(data.len())..];
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "no answer to the netlink request",
    ))
}

/// Attributes as (type, payload) pairs.
fn attrs(mut data: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while data.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([data[0], data[1]]));
        let ty = u16::from_ne_bytes([data[2], data[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > data.len() {
            break;
        }
        out.push((ty, &data[4..len]));
        data = &data[len.next_multiple_of(4).min(data.len())..];
    }
    out
}

fn u32_of(b: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(0..4)?.try_into().ok()?))
}

fn string_of(b: &[u8]) -> String {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// The interface with `ifindex`, in this namespace or (with `netnsid`) in
/// the namespace that id names here.
pub fn link(ifindex: u32, netnsid: Option<i32>) -> io::Result<LinkAttrs> {
    let mut body = vec![0u8; IFINFOMSG];
    body[0] = libc::AF_UNSPEC as u8;
    body[4..8].copy_from_slice(&(ifindex as i32).to_ne_bytes());
    if let Some(id) = netnsid {
        push_attr(&mut body, IFLA_TARGET_NETNSID, &id.to_ne_bytes());
    }
    let answer = request(RTM_GETLINK, &body, RTM_NEWLINK)?;
    let mut out = LinkAttrs::default();
    for (ty, value) in attrs(answer.get(IFINFOMSG..).unwrap_or(&[])) {
        match ty {
            IFLA_IFNAME => out.name = string_of(value),
            IFLA_MTU => out.mtu = u32_of(value).unwrap_or(0),
            IFLA_LINK => out.link = u32_of(value),
            IFLA_LINK_NETNSID => out.link_netnsid = u32_of(value).map(|v| v as i32),
            IFLA_LINKINFO => {
                for (inner, v) in attrs(value) {
                    if inner == IFLA_INFO_KIND {
                        out.kind = Some(string_of(v));
                    }
                }
            }
            IFLA_XDP => {
                let nested = attrs(value);
                let attached = nested
                    .iter()
                    .find(|(t, _)| *t == IFLA_XDP_ATTACHED)
                    .and_then(|(_, v)| v.first().copied())
                    .unwrap_or(0);
                let drv_id = nested
                    .iter()
                    .find(|(t, _)| *t == IFLA_XDP_DRV_PROG_ID)
                    .and_then(|(_, v)| u32_of(v))
                    .unwrap_or(0);
                out.any_xdp = attached != 0;
                out.native_xdp =
                    attached == XDP_ATTACHED_DRV || (attached == XDP_ATTACHED_MULTI && drv_id != 0);
            }
            _ => {}
        }
    }
    Ok(out)
}

/// A policy rule: IPv4 packets whose mark matches `mark` under `mask` look
/// up `table`, at `priority`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MarkRule {
    pub priority: u32,
    pub mark: u32,
    pub mask: u32,
    pub table: u32,
}

fn rule_body(rule: &MarkRule) -> Vec<u8> {
    let mut body = vec![0u8; RTMSG];
    body[0] = libc::AF_INET as u8;
    body[7] = FR_ACT_TO_TBL;
    push_attr(&mut body, FRA_PRIORITY, &rule.priority.to_ne_bytes());
    push_attr(&mut body, FRA_FWMARK, &rule.mark.to_ne_bytes());
    push_attr(&mut body, FRA_FWMASK, &rule.mask.to_ne_bytes());
    push_attr(&mut body, FRA_TABLE, &rule.table.to_ne_bytes());
    body
}

/// Adds the rule; an identical rule already there is kept (`Ok(false)`).
pub fn add_rule(rule: &MarkRule) -> io::Result<bool> {
    match command(RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL, &rule_body(rule)) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Deletes the rule; `Ok(false)` when there was none.
pub fn delete_rule(rule: &MarkRule) -> io::Result<bool> {
    absent_is_false(command(RTM_DELRULE, 0, &rule_body(rule)))
}

/// A default route in `table` through the device `oif`, with `src` as the
/// source of what it carries and `mtu` as its MTU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceRoute {
    pub table: u32,
    pub oif: u32,
    pub src: std::net::Ipv4Addr,
    pub mtu: u32,
}

fn route_body(route: &DeviceRoute, full: bool) -> Vec<u8> {
    let mut body = vec![0u8; RTMSG];
    body[0] = libc::AF_INET as u8;
    body[5] = RTPROT_STATIC;
    body[6] = RT_SCOPE_LINK;
    body[7] = RTN_UNICAST;
    push_attr(&mut body, RTA_TABLE, &route.table.to_ne_bytes());
    push_attr(&mut body, RTA_OIF, &route.oif.to_ne_bytes());
    if full {
        push_attr(&mut body, RTA_PREFSRC, &route.src.octets());
        let mut metrics = Vec::new();
        push_attr(&mut metrics, RTAX_MTU, &route.mtu.to_ne_bytes());
        push_attr(&mut body, RTA_METRICS, &metrics);
    }
    body
}

/// Adds the route, or replaces the table's default route with it.
pub fn replace_route(route: &DeviceRoute) -> io::Result<()> {
    command(
        RTM_NEWROUTE,
        NLM_F_CREATE | NLM_F_REPLACE,
        &route_body(route, true),
    )
}

/// Deletes the table's default route through `route.oif`; `Ok(false)`
/// when there was none.
pub fn delete_route(route: &DeviceRoute) -> io::Result<bool> {
    absent_is_false(command(RTM_DELROUTE, 0, &route_body(route, false)))
}

fn absent_is_false(done: io::Result<()>) -> io::Result<bool> {
    match done {
        Ok(()) => Ok(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESRCH)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The kernel's answer to "where does a packet to `dst` go".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteTo {
    /// `dst` is an address of this namespace.
    pub local: bool,
    /// The output device's ifindex.
    pub oif: Option<u32>,
    /// The source address the kernel chose.
    pub src: Option<std::net::Ipv4Addr>,
}

/// Where the kernel sends a locally generated packet to `dst` that carries
/// `mark`.
pub fn route_get(dst: std::net::Ipv4Addr, mark: u32) -> io::Result<RouteTo> {
    let mut body = vec![0u8; RTMSG];
    body[0] = libc::AF_INET as u8;
    body[1] = 32;
    push_attr(&mut body, RTA_DST, &dst.octets());
    push_attr(&mut body, RTA_MARK, &mark.to_ne_bytes());
    let answer = request(RTM_GETROUTE, &body, RTM_NEWROUTE)?;
    let mut route = RouteTo {
        local: answer.get(7) == Some(&RTN_LOCAL),
        oif: None,
        src: None,
    };
    for (ty, value) in attrs(answer.get(RTMSG..).unwrap_or(&[])) {
        match ty {
            RTA_OIF => route.oif = u32_of(value),
            RTA_PREFSRC => {
                route.src = value
                    .get(0..4)
                    .map(|b| std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]))
            }
            _ => {}
        }
    }
    Ok(route)
}

/// Whether `addr` is an address of this namespace (one without any route
/// is not).
pub fn is_local(addr: std::net::Ipv4Addr) -> io::Result<bool> {
    match route_get(addr, 0) {
        Ok(route) => Ok(route.local),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENETUNREACH | libc::EHOSTUNREACH)
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// The id this namespace gives the namespace `ns_fd` refers to, if it has
/// given it one (it does for the namespace of any veth peer it has shown).
pub fn nsid_of(ns_fd: &OwnedFd) -> io::Result<Option<i32>> {
    let mut body = vec![0u8; RTGENMSG];
    body[0] = libc::AF_UNSPEC as u8;
    push_attr(
        &mut body,
        NETNSA_FD,
        &(ns_fd.as_raw_fd() as u32).to_ne_bytes(),
    );
    let answer = request(RTM_GETNSID, &body, RTM_NEWNSID)?;
    Ok(attrs(answer.get(RTGENMSG..).unwrap_or(&[]))
        .into_iter()
        .find(|(t, _)| *t == NETNSA_NSID)
        .and_then(|(_, v)| u32_of(v))
        .map(|v| v as i32)
        .filter(|v| *v >= 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip() {
        let mut buf = Vec::new();
        push_attr(&mut buf, IFLA_IFNAME, b"eth0\0");
        push_attr(&mut buf, IFLA_LINK, &7u32.to_ne_bytes());
        assert_eq!(buf.len() % 4, 0);
        let parsed = attrs(&buf);
        assert_eq!(parsed.len(), 2);
        assert_eq!(string_of(parsed[0].1), "eth0");
        assert_eq!(u32_of(parsed[1].1), Some(7));
        // A length past the end stops parsing instead of reading past it.
        let mut bad = buf.clone();
        bad[0] = 200;
        assert!(attrs(&bad).is_empty());
    }

    #[test]
    fn loopback_is_a_plain_device() {
        let lo = link(1, None).expect("RTM_GETLINK for lo");
        assert_eq!(lo.name, "lo");
        assert_eq!(lo.kind, None);
        assert!(!lo.native_xdp);
    }
}
