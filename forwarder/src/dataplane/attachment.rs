//! What an attachment is and whether it still works.
//!
//! Many network namespaces share one bpffs on a container host, and each can
//! have its own `eth0`: a pin keyed by device name would let one namespace's
//! attachment stand in for another's. A pin is therefore named for what the
//! link is attached to: `<kind>-<netns inode>-<ifindex>-<mode>-<device>`
//! (the device name last, as it may itself contain '-'; it is only for
//! display). A pin outlives its device: when the device (or its namespace)
//! goes, the kernel detaches the link and reports ifindex 0 for it, so a pin
//! is trusted only after the kernel confirms where its link is attached.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::instance::Instance;

/// What is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The balancer (XDP).
    Xdp,
    /// The decapsulator (tc ingress).
    Decap,
    /// The pass-through XDP program on the far end of a veth.
    VethPeer,
    /// The probe encapsulator (tc egress of `lo` on the LB host).
    Probe,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::Xdp, Kind::Decap, Kind::VethPeer, Kind::Probe];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Xdp => "xdp",
            Kind::Decap => "decap",
            Kind::VethPeer => "veth_peer",
            Kind::Probe => "probe",
        }
    }
}

/// How it is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Native,
    Generic,
    TcIngress,
    TcEgress,
}

impl Mode {
    const ALL: [Mode; 4] = [Mode::Native, Mode::Generic, Mode::TcIngress, Mode::TcEgress];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Native => "native",
            Mode::Generic => "generic",
            Mode::TcIngress => "tc_ingress",
            Mode::TcEgress => "tc_egress",
        }
    }
}

/// A network namespace, by the inode of its nsfs file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Netns(pub u64);

impl Netns {
    /// The calling thread's namespace.
    pub fn current() -> io::Result<Netns> {
        Ok(Netns(std::fs::metadata("/proc/thread-self/ns/net")?.ino()))
    }

    /// A name an operator can use: `/run/netns/NAME` when `ip netns` knows
    /// it, `init` for the host's, else the kernel's `net:[INODE]`.
    pub fn label(self) -> String {
        if let Some(path) = named_netns().into_iter().find(|(ino, _)| *ino == self.0) {
            return path.1.display().to_string();
        }
        if std::fs::metadata("/proc/1/ns/net").is_ok_and(|m| m.ino() == self.0) {
            return "init".into();
        }
        format!("net:[{}]", self.0)
    }
}

/// `(inode, path)` of every namespace under /run/netns.
pub fn named_netns() -> Vec<(u64, PathBuf)> {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return vec![];
    };
    dir.flatten()
        .take(10_000)
        .filter_map(|e| Some((std::fs::metadata(e.path()).ok()?.ino(), e.path())))
        .collect()
}

/// Where a link belongs: the identity its pin is named for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Key {
    pub kind: Kind,
    pub netns: Netns,
    pub ifindex: u32,
}

/// One pinned link of an instance, as its pin name describes it.
#[derive(Clone, Debug, Serialize)]
pub struct Attachment {
    pub kind: Kind,
    pub netns: Netns,
    pub ifindex: u32,
    pub mode: Mode,
    /// The device's name when it was attached.
    pub dev: String,
    #[serde(skip)]
    pub pin: PathBuf,
}

impl Attachment {
    pub fn key(&self) -> Key {
        Key {
            kind: self.kind,
            netns: self.netns,
            ifindex: self.ifindex,
        }
    }

    /// The pin path for a new attachment.
    pub fn pin_path(instance: &Instance, key: Key, mode: Mode, dev: &str) -> PathBuf {
        instance.link_dir().join(format!(
            "{}-{}-{}-{}-{dev}",
            key.kind.name(),
            key.netns.0,
            key.ifindex,
            mode.name()
        ))
    }

    /// Parses a pin name; `None` for names weir did not make this way.
    pub fn parse(name: &str, pin: PathBuf) -> Option<Attachment> {
        let mut parts = name.splitn(5, '-');
        let kind = parts.next()?;
        let kind = Kind::ALL.into_iter().find(|k| k.name() == kind)?;
        let netns = parts.next()?.parse().ok()?;
        let ifindex = parts.next()?.parse().ok()?;
        let mode = parts.next()?;
        let mode = Mode::ALL.into_iter().find(|m| m.name() == mode)?;
        let dev = parts.next().filter(|d| !d.is_empty())?.to_string();
        Some(Attachment {
            kind,
            netns: Netns(netns),
            ifindex,
            mode,
            dev,
            pin,
        })
    }
}

/// Whether an attachment works, as the kernel sees it now.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    #[serde(flatten)]
    pub attachment: Attachment,
    /// The namespace as an operator names it.
    pub netns_label: String,
    /// `live`, `defunct` (the device or its namespace is gone, so the
    /// kernel detached the link), `moved` (attached elsewhere than the pin
    /// says) or `unreadable` (the pin cannot be opened).
    pub state: &'static str,
    pub live: bool,
    /// Why it is not live, for operators.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A pin that is not a weir attachment (a leftover of an older layout, or
/// a file someone put there).
#[derive(Clone, Debug, Serialize)]
pub struct Unknown {
    pub name: String,
    pub live: bool,
}

fn bpf(cmd: libc::c_long, attr: &mut [u8]) -> io::Result<libc::c_long> {
    // SAFETY: the kernel reads (and for info, writes through pointers in)
    // an attribute buffer of the given size, which we own.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            attr.len() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;

/// Opens a pinned object.
fn open_pin(pin: &Path) -> io::Result<OwnedFd> {
    let path = std::ffi::CString::new(pin.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = [0u8; 16];
    attr[0..8].copy_from_slice(&(path.as_ptr() as u64).to_ne_bytes());
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: BPF_OBJ_GET returned a new descriptor that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The ifindex a pinned XDP or tcx link is attached to; 0 once the kernel
/// has detached it (device unregistered).
pub fn link_ifindex(pin: &Path) -> io::Result<u32> {
    Ok(link_target(pin)?.1)
}

/// The kernel's id of a pinned XDP or tcx link, and its ifindex.
pub fn link_target(pin: &Path) -> io::Result<(u32, u32)> {
    use aya_obj::generated::{bpf_link_info, bpf_link_type};
    let fd = open_pin(pin)?;
    // SAFETY: bpf_link_info is plain data; all-zero is a valid value.
    let mut info: bpf_link_info = unsafe { std::mem::zeroed() };
    let mut attr = [0u8; 16];
    attr[0..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&(std::mem::size_of::<bpf_link_info>() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(&mut info as *mut bpf_link_info as u64).to_ne_bytes());
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    // SAFETY: the kernel filled the union member that matches `type_`.
    let ifindex = unsafe {
        if info.type_ == bpf_link_type::BPF_LINK_TYPE_XDP as u32 {
            info.__bindgen_anon_1.xdp.ifindex
        } else if info.type_ == bpf_link_type::BPF_LINK_TYPE_TCX as u32 {
            info.__bindgen_anon_1.tcx.ifindex
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not an XDP or tcx link", pin.display()),
            ));
        }
    };
    Ok((info.id, ifindex))
}

/// Whether the kernel still has a link with this id (someone holds it).
pub fn link_exists(id: u32) -> bool {
    let mut attr = [0u8; 12];
    attr[0..4].copy_from_slice(&id.to_ne_bytes());
    match bpf(BPF_LINK_GET_FD_BY_ID, &mut attr) {
        Ok(fd) => {
            // SAFETY: the call returned a new descriptor that we own.
            drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
            true
        }
        Err(e) => e.raw_os_error() != Some(libc::ENOENT),
    }
}

/// Every pin of the instance: weir's attachments and anything else. No
/// link directory means no attachment; any other error is an error, never
/// an empty list (that would let a command act as if nothing were there).
pub fn scan(instance: &Instance) -> io::Result<(Vec<Attachment>, Vec<Unknown>)> {
    let dir = match std::fs::read_dir(instance.link_dir()) {
        Ok(dir) => dir,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((vec![], vec![])),
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("reading {}: {e}", instance.link_dir().display()),
            ));
        }
    };
    let mut known = Vec::new();
    let mut unknown = Vec::new();
    for entry in dir.flatten().take(100_000) {
        let name = entry.file_name().to_string_lossy().into_owned();
        match Attachment::parse(&name, entry.path()) {
            Some(a) => known.push(a),
            None => unknown.push(Unknown {
                live: link_ifindex(&entry.path()).is_ok_and(|i| i != 0),
                name,
            }),
        }
    }
    known.sort_by(|a, b| {
        (a.kind.name(), a.netns.0, a.ifindex).cmp(&(b.kind.name(), b.netns.0, b.ifindex))
    });
    unknown.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((known, unknown))
}

/// The attachment pinned for `key`, if any.
pub fn find(instance: &Instance, key: Key) -> io::Result<Option<Attachment>> {
    Ok(scan(instance)?.0.into_iter().find(|a| a.key() == key))
}

/// Asks the kernel whether `a` works: whether its link is still attached,
/// and to the ifindex the pin names.
pub fn status(a: &Attachment) -> Status {
    let (state, detail) = match link_ifindex(&a.pin) {
        Err(e) => ("unreadable", Some(format!("{}: {e}", a.pin.display()))),
        Ok(0) => (
            "defunct",
            Some(format!(
                "{} (ifindex {}) or its namespace is gone; the kernel detached the link",
                a.dev, a.ifindex
            )),
        ),
        Ok(i) if i != a.ifindex => (
            "moved",
            Some(format!("the link is now on ifindex {i}, not {}", a.ifindex)),
        ),
        Ok(_) => ("live", None),
    };
    Status {
        netns_label: a.netns.label(),
        live: state == "live",
        state,
        detail,
        attachment: a.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_round_trip() {
        let inst = Instance::new("t").unwrap();
        let key = Key {
            kind: Kind::Decap,
            netns: Netns(4026532001),
            ifindex: 7,
        };
        let pin = Attachment::pin_path(&inst, key, Mode::TcIngress, "r-be0.100");
        let name = pin.file_name().unwrap().to_str().unwrap();
        assert_eq!(name, "decap-4026532001-7-tc_ingress-r-be0.100");
        let a = Attachment::parse(name, pin.clone()).unwrap();
        assert_eq!(a.key(), key);
        assert_eq!(a.mode, Mode::TcIngress);
        assert_eq!(a.dev, "r-be0.100");
    }

    #[test]
    fn foreign_names_are_not_attachments() {
        for name in [
            "xdp-eth0",
            "decap-r-lb",
            "xdp-1-2-native-",
            "xdp-x-2-native-eth0",
            "tc-1-2-native-eth0",
            "xdp-1-2-fast-eth0",
        ] {
            assert!(Attachment::parse(name, PathBuf::new()).is_none(), "{name}");
        }
    }

    #[test]
    fn this_namespace_has_an_inode() {
        let ns = Netns::current().unwrap();
        assert!(ns.0 > 0);
        assert!(!ns.label().is_empty());
    }
}
