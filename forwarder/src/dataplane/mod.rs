//! Loading and attaching the kernel programs. Attachments are BPF links
//! pinned under the instance directory, so they outlive the `weir` process:
//! the XDP path keeps forwarding with no daemon, and `detach` is unpinning.
//! A pin is trusted only once the kernel confirms its link is still on the
//! device it names (see [`attachment`]). Attaching the balancer also
//! attaches the [`probe`] path the agent's L4 checks take.

pub mod attachment;
mod netlink;
mod veth;

pub mod decap_sources;
pub mod probe;

use std::net::Ipv4Addr;

use aya::maps::{HashMap, MapData, PerCpuArray};
use aya::programs::links::FdLink;
use aya::programs::tc::TcAttachOptions;
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType, Xdp};
use aya::{Ebpf, EbpfLoader};
use thiserror::Error;
use weir_ebpf::abi;

use attachment::{Attachment, Key, Kind, Mode, Netns, Status};

use crate::instance::{Instance, InstanceError};
use crate::registry::{CreateOptions, Registry, RegistryError};

#[derive(Debug, Error)]
pub enum DataplaneError {
    #[error(transparent)]
    Instance(#[from] InstanceError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("no network interface {0:?} in this network namespace")]
    NoDevice(String),
    #[error(
        "IPv4 forwarding is off on {0}: XDP's FIB lookup needs it; enable it with \
         `sysctl -w net.ipv4.conf.{0}.forwarding=1`"
    )]
    ForwardingOff(String),
    #[error(
        "accept_local is off on {0}: when a next hop is not resolved yet, weir hands the \
         encapsulated packet (source: this host) to the kernel to forward; enable it with \
         `sysctl -w net.ipv4.conf.{0}.accept_local=1`"
    )]
    AcceptLocalOff(String),
    #[error("weir ({instance}) is already attached to {dev}; run `weir detach --dev {dev}` first")]
    AlreadyAttached { instance: String, dev: String },
    #[error("weir ({instance}) is not attached to {dev} in this network namespace")]
    NotAttached { instance: String, dev: String },
    #[error(
        "no network interface {dev:?} in this network namespace; if it was deleted, its \
         attachment is defunct: `weir --instance {instance} attachments --prune` removes it"
    )]
    DeviceGone { instance: String, dev: String },
    #[error(
        "{dev} is a veth whose peer {peer} runs no native XDP program, so native XDP_TX frames \
         sent into it would be dropped; give the peer weir's pass-through first with \
         {command}, or attach with --mode generic"
    )]
    PeerWithoutXdp {
        dev: String,
        peer: String,
        command: String,
    },
    #[error("{0} is not a veth: the pass-through program is for the far end of a veth")]
    NotVeth(String),
    #[error("{what}: {detail}")]
    Kernel { what: String, detail: String },
}

fn kernel(what: impl Into<String>) -> impl FnOnce(String) -> DataplaneError {
    move |detail| DataplaneError::Kernel {
        what: what.into(),
        detail,
    }
}

/// How XDP is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpMode {
    /// In the driver (veth, most NICs): the fast path.
    Native,
    /// In the generic network stack: works everywhere, slower.
    Generic,
}

fn ifindex(dev: &str) -> Result<u32, DataplaneError> {
    let c = std::ffi::CString::new(dev).map_err(|_| DataplaneError::NoDevice(dev.into()))?;
    // SAFETY: valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        return Err(DataplaneError::NoDevice(dev.into()));
    }
    Ok(index)
}

/// Whether `net.ipv4.conf.<dev>.<key>` is 1 in this network namespace.
fn ipv4_conf(dev: &str, key: &str) -> bool {
    std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{dev}/{key}"))
        .is_ok_and(|s| s.trim() == "1")
}

/// Loads the balancer object against the instance's pinned maps and loads
/// its XDP program into the kernel (not attached). Used by `attach` and by
/// BPF_PROG_RUN tests and benches.
pub fn load_lb(instance: &Instance) -> Result<Ebpf, DataplaneError> {
    Registry::open_or_create(instance, CreateOptions::default())?;
    let ttl = nexthop_ttl_jiffies();
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(instance.pin_dir())
        .override_global(abi::NEXTHOP_TTL_GLOBAL, &ttl, true)
        .load(weir_ebpf::lb_object())
        .map_err(|e| kernel("loading the XDP object")(e.to_string()))?;
    let program: &mut Xdp = ebpf
        .program_mut(weir_ebpf::LB_PROGRAM)
        .expect("object defines weir_lb")
        .try_into()
        .map_err(|e: aya::programs::ProgramError| kernel("weir_lb")(e.to_string()))?;
    program.load().map_err(|e| {
        kernel("the kernel refused the XDP program (is BPF/XDP enabled?)")(one_line(&e))
    })?;
    Ok(ebpf)
}

/// [`abi::NEXTHOP_TTL_NS`] in this kernel's jiffies. The coarse clocks
/// advance once a jiffy, so their resolution is its length.
fn nexthop_ttl_jiffies() -> u64 {
    let mut res = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_getres writes one timespec into `res`.
    let rc = unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut res) };
    // HZ=250, the program's default, if the kernel does not say.
    let tick_ns = match rc {
        0 => (res.tv_sec as u64 * 1_000_000_000 + res.tv_nsec as u64).max(1),
        _ => 4_000_000,
    };
    abi::NEXTHOP_TTL_NS.div_ceil(tick_ns)
}

/// What an attach command did.
#[derive(Debug)]
pub struct Attached {
    pub attachment: Attachment,
    /// False when a live link was already there (decap is idempotent).
    pub attached_now: bool,
    /// Pins for this device whose links no longer worked, now replaced.
    pub replaced: Vec<Status>,
}

/// What `attach` did: the balancer on the device, and the probe path on
/// `lo` (kept when another device of the namespace already had it; none
/// when the LB address is not an address of this namespace).
#[derive(Debug)]
pub struct AttachedLb {
    pub xdp: Attached,
    pub probe: Option<Attached>,
}

/// This namespace's identity for `dev`.
fn key_here(kind: Kind, dev: &str) -> Result<Key, DataplaneError> {
    let ifindex = ifindex(dev)?;
    let netns = Netns::current().map_err(|e| {
        kernel("reading this network namespace (/proc/thread-self/ns/net)")(e.to_string())
    })?;
    Ok(Key {
        kind,
        netns,
        ifindex,
    })
}

/// The instance's pins, or an error naming the link directory.
fn scan(
    instance: &Instance,
) -> Result<(Vec<Attachment>, Vec<attachment::Unknown>), DataplaneError> {
    attachment::scan(instance).map_err(|e| kernel("listing attachments")(e.to_string()))
}

/// The live attachment pinned for `key`, if any.
fn find_live(instance: &Instance, key: Key) -> Result<Option<Attachment>, DataplaneError> {
    Ok(attachment::find(instance, key)
        .map_err(|e| kernel("listing attachments")(e.to_string()))?
        .filter(|a| attachment::status(a).live))
}

/// Undoes a pin made by a step that then failed with `error`. If the pin
/// cannot be removed, the program may still be attached: the error says so
/// and how to remove it, rather than imply nothing was attached.
fn unpin_after(attachment: &Attachment, error: DataplaneError) -> DataplaneError {
    match std::fs::remove_file(&attachment.pin) {
        Ok(()) => error,
        Err(e) => DataplaneError::Kernel {
            what: error.to_string(),
            detail: format!(
                "and removing the new pin {} failed ({e}), so the program may still be \
                 attached to {}: remove it with `rm {}`",
                attachment.pin.display(),
                attachment.dev,
                attachment.pin.display()
            ),
        },
    }
}

/// Makes room for a new link for `key`: refuses if a live one is pinned,
/// and removes the pins of this namespace's earlier `dev` (same kind) whose
/// links no longer work: the one at this ifindex, and any the kernel
/// detached because the device was deleted (a re-created device usually
/// gets a new ifindex). Returns what it removed.
fn clear_for(instance: &Instance, key: Key, dev: &str) -> Result<Vec<Status>, DataplaneError> {
    let mut removed = Vec::new();
    for existing in scan(instance)?.0 {
        let same_key = existing.key() == key;
        let same_dev =
            existing.kind == key.kind && existing.netns == key.netns && existing.dev == dev;
        if !same_key && !same_dev {
            continue;
        }
        let status = attachment::status(&existing);
        if same_key && status.live {
            return Err(DataplaneError::AlreadyAttached {
                instance: instance.name().into(),
                dev: dev.into(),
            });
        }
        if !same_key && status.state != "defunct" {
            continue;
        }
        std::fs::remove_file(&existing.pin).map_err(|e| {
            kernel(format!(
                "removing the {} pin {}",
                status.state,
                existing.pin.display()
            ))(e.to_string())
        })?;
        removed.push(status);
    }
    Ok(removed)
}

/// Pins a new link for `key` and has the kernel confirm it is attached to
/// that device; a link the kernel does not confirm is unpinned again.
fn pin_verified(
    link: FdLink,
    instance: &Instance,
    key: Key,
    mode: Mode,
    dev: &str,
) -> Result<Attachment, DataplaneError> {
    let pin = Attachment::pin_path(instance, key, mode, dev);
    link.pin(&pin)
        .map_err(|e| kernel(format!("pinning {}", pin.display()))(e.to_string()))?;
    let attachment = Attachment {
        kind: key.kind,
        netns: key.netns,
        ifindex: key.ifindex,
        mode,
        dev: dev.into(),
        pin,
    };
    let status = attachment::status(&attachment);
    if !status.live {
        let error = DataplaneError::Kernel {
            what: format!("attaching to {dev}"),
            detail: format!(
                "the kernel does not report the new link on {dev} (ifindex {}): {}",
                key.ifindex,
                status.detail.unwrap_or_else(|| status.state.into())
            ),
        };
        return Err(unpin_after(&attachment, error));
    }
    Ok(attachment)
}

/// Attaches the balancer to `dev`, with `lb_addr` as the outer source of
/// encapsulated packets, and the probe path beside it when `lb_addr` is an
/// address of this namespace; if the probe path cannot be set up, the
/// balancer is detached again.
pub fn attach(
    instance: &Instance,
    dev: &str,
    lb_addr: Ipv4Addr,
    mode: XdpMode,
    create: CreateOptions,
) -> Result<AttachedLb, DataplaneError> {
    let key = key_here(Kind::Xdp, dev)?;
    if find_live(instance, key)?.is_some() {
        return Err(DataplaneError::AlreadyAttached {
            instance: instance.name().into(),
            dev: dev.into(),
        });
    }
    if !ipv4_conf(dev, "forwarding") {
        return Err(DataplaneError::ForwardingOff(dev.into()));
    }
    if !ipv4_conf(dev, "accept_local") && !ipv4_conf("all", "accept_local") {
        return Err(DataplaneError::AcceptLocalOff(dev.into()));
    }
    if lb_addr.is_unspecified() || lb_addr.is_multicast() || lb_addr.is_broadcast() {
        return Err(DataplaneError::Kernel {
            what: "--lb-addr".into(),
            detail: format!("{lb_addr} cannot be the source address of encapsulated packets"),
        });
    }
    if mode == XdpMode::Native {
        let peer = veth::peer_of(key.ifindex)
            .map_err(|e| kernel(format!("looking up the veth peer of {dev}"))(e.to_string()))?;
        if let Some(peer) = peer.filter(|p| !p.native_xdp) {
            return Err(DataplaneError::PeerWithoutXdp {
                dev: dev.into(),
                peer: peer.name.clone(),
                command: peer.attach_command(instance.name()),
            });
        }
    }
    let mut registry = Registry::open_or_create(instance, create)?;
    let current = Ipv4Addr::from(registry.maps().config()?.lb_addr);
    let others: Vec<String> = scan(instance)?
        .0
        .iter()
        .filter(|a| a.kind == Kind::Xdp && a.key() != key)
        .map(attachment::status)
        .filter(|s| s.live)
        .map(|s| format!("{} ({})", s.attachment.dev, s.netns_label))
        .collect();
    if !others.is_empty() && current != lb_addr {
        return Err(DataplaneError::Kernel {
            what: "--lb-addr".into(),
            detail: format!(
                "this instance already encapsulates from {current} on {}; one instance has one \
                 LB address: attach with --lb-addr {current}, or detach the others first",
                others.join(", ")
            ),
        });
    }

    // Attach first; the address is written only once that worked (until
    // then the program passes service traffic as "no config").
    let mut ebpf = load_lb(instance)?;
    let program: &mut Xdp = ebpf
        .program_mut(weir_ebpf::LB_PROGRAM)
        .expect("loaded above")
        .try_into()
        .expect("weir_lb is XDP");
    let (flags, pin_mode) = match mode {
        XdpMode::Native => (aya::programs::XdpMode::Driver, Mode::Native),
        XdpMode::Generic => (aya::programs::XdpMode::Skb, Mode::Generic),
    };
    let replaced = clear_for(instance, key, dev)?;
    let id = program.attach(dev, flags).map_err(|e| {
        let hint = if mode == XdpMode::Native {
            " (try --mode generic)"
        } else {
            ""
        };
        kernel(format!("attaching XDP to {dev}{hint}"))(one_line(&e))
    })?;
    let link = program
        .take_link(id)
        .map_err(|e| kernel("XDP link")(e.to_string()))?;
    let fd_link: FdLink = link
        .try_into()
        .map_err(|e: aya::programs::links::LinkError| {
            kernel(format!(
                "XDP on {dev} is not a BPF link (kernel older than 5.9?)"
            ))(e.to_string())
        })?;
    let attachment = pin_verified(fd_link, instance, key, pin_mode, dev)?;
    let configured = instance
        .lock()
        .map_err(DataplaneError::from)
        .and_then(|_lock| {
            registry
                .maps_mut()
                .set_config(abi::LbConfig {
                    lb_addr: lb_addr.octets(),
                    flags: 0,
                })
                .map_err(Into::into)
        });
    if let Err(e) = configured {
        return Err(unpin_after(&attachment, e));
    }
    let probe =
        uplink_mtu(instance, key.netns).and_then(|mtu| probe::attach(instance, lb_addr, mtu));
    match probe {
        Ok(probe) => Ok(AttachedLb {
            xdp: Attached {
                attachment,
                attached_now: true,
                replaced,
            },
            probe,
        }),
        Err(e) => Err(unpin_after(&attachment, e)),
    }
}

/// The smallest MTU of the devices this instance balances on in `netns`
/// (this one): a check leaves by whichever the FIB names.
fn uplink_mtu(instance: &Instance, netns: Netns) -> Result<u32, DataplaneError> {
    let mut smallest = u32::MAX;
    for a in scan(instance)?.0 {
        if a.kind != Kind::Xdp || a.netns != netns || !attachment::status(&a).live {
            continue;
        }
        let link = netlink::link(a.ifindex, None)
            .map_err(|e| kernel(format!("reading the MTU of {}", a.dev))(e.to_string()))?;
        smallest = smallest.min(link.mtu);
    }
    Ok(smallest)
}

/// Gives the far end of a veth (`dev`, in this namespace) weir's
/// pass-through XDP program, so native XDP on the near end can send into
/// it.
pub fn attach_peer(instance: &Instance, dev: &str) -> Result<Attached, DataplaneError> {
    instance.prepare()?;
    let key = key_here(Kind::VethPeer, dev)?;
    let link = netlink::link(key.ifindex, None)
        .map_err(|e| kernel(format!("looking up {dev}"))(e.to_string()))?;
    if link.kind.as_deref() != Some("veth") {
        return Err(DataplaneError::NotVeth(dev.into()));
    }
    if find_live(instance, key)?.is_some() {
        return Err(DataplaneError::AlreadyAttached {
            instance: instance.name().into(),
            dev: dev.into(),
        });
    }
    if link.any_xdp {
        let (mode, enough) = if link.native_xdp {
            ("native", "which is all native XDP on its peer needs")
        } else {
            (
                "generic",
                "which does not let its peer's native XDP send into it",
            )
        };
        return Err(DataplaneError::Kernel {
            what: format!("attaching native XDP to {dev}"),
            detail: format!(
                "{dev} already runs an XDP program in {mode} mode, {enough}; a device has \
                 one XDP program"
            ),
        });
    }
    let mut ebpf = EbpfLoader::new()
        .load(weir_ebpf::support_object())
        .map_err(|e| kernel("loading the veth peer object")(e.to_string()))?;
    let program: &mut Xdp = ebpf
        .program_mut(weir_ebpf::VETH_PEER_PROGRAM)
        .expect("object defines weir_veth_peer")
        .try_into()
        .map_err(|e: aya::programs::ProgramError| kernel("weir_veth_peer")(e.to_string()))?;
    program
        .load()
        .map_err(|e| kernel("the kernel refused the veth peer program")(one_line(&e)))?;
    let replaced = clear_for(instance, key, dev)?;
    let id = program
        .attach(dev, aya::programs::XdpMode::Driver)
        .map_err(|e| kernel(format!("attaching native XDP to {dev}"))(one_line(&e)))?;
    let link = program
        .take_link(id)
        .map_err(|e| kernel("XDP link")(e.to_string()))?;
    let fd_link: FdLink = link
        .try_into()
        .map_err(|e: aya::programs::links::LinkError| kernel("XDP link")(e.to_string()))?;
    let attachment = pin_verified(fd_link, instance, key, Mode::Native, dev)?;
    // What the near end's check will read: the device runs XDP in the driver.
    let native = netlink::link(key.ifindex, None).is_ok_and(|l| l.native_xdp);
    if !native {
        let error = DataplaneError::Kernel {
            what: format!("attaching native XDP to {dev}"),
            detail: "the link was made but the device reports no driver-mode XDP program".into(),
        };
        return Err(unpin_after(&attachment, error));
    }
    Ok(Attached {
        attachment,
        attached_now: true,
        replaced,
    })
}

/// The first line of an error and of each of its causes (where the errno
/// is), at most 300 characters: kernel errors can carry a whole verifier
/// log, and the CLI prints one line.
fn one_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = Vec::new();
    let mut truncated = false;
    let mut next = Some(e);
    while let Some(err) = next.take() {
        let text = err.to_string();
        truncated |= text.lines().nth(1).is_some();
        parts.push(text.lines().next().unwrap_or("").trim().to_string());
        next = err.source();
    }
    let joined = parts.join(": ");
    let mut line: String = joined.chars().take(300).collect();
    if truncated || joined.chars().count() > 300 {
        line.push_str(" ...");
    }
    line
}

/// Detaches the balancer from `dev` by removing its pinned link; returns
/// what the link was (a defunct one is removed too, and says so), and what
/// the probe path's was when this was the namespace's last balancer device.
pub fn detach(instance: &Instance, dev: &str) -> Result<(Status, Option<Status>), DataplaneError> {
    let xdp = detach_kind(instance, Kind::Xdp, dev)?;
    let probe = probe::detach_unless_used(instance)?;
    Ok((xdp, probe))
}

/// Removes the veth peer program from `dev`.
pub fn detach_peer(instance: &Instance, dev: &str) -> Result<Status, DataplaneError> {
    detach_kind(instance, Kind::VethPeer, dev)
}

fn detach_kind(instance: &Instance, kind: Kind, dev: &str) -> Result<Status, DataplaneError> {
    crate::instance::require_root()?;
    let key = key_here(kind, dev).map_err(|e| match e {
        DataplaneError::NoDevice(dev) => DataplaneError::DeviceGone {
            instance: instance.name().into(),
            dev,
        },
        other => other,
    })?;
    // This device's own pin; failing that, one this namespace made for an
    // earlier device of the same name that the kernel has since detached.
    let (known, _) = scan(instance)?;
    let existing = known.iter().find(|a| a.key() == key).or_else(|| {
        known.iter().find(|a| {
            a.kind == kind
                && a.netns == key.netns
                && a.dev == dev
                && attachment::status(a).state == "defunct"
        })
    });
    let Some(existing) = existing else {
        return Err(DataplaneError::NotAttached {
            instance: instance.name().into(),
            dev: dev.into(),
        });
    };
    let status = attachment::status(existing);
    // A defunct link can still be read; an unreadable pin cannot be
    // confirmed gone afterwards, so it is refused rather than reported
    // as detached.
    let (link_id, _) = attachment::link_target(&existing.pin).map_err(|e| {
        kernel(format!(
            "reading the link pinned at {}",
            existing.pin.display()
        ))(format!(
            "{e}; it cannot be confirmed detached: remove the pin with `rm {}` and check \
             `ip link show {dev}`",
            existing.pin.display()
        ))
    })?;
    // Removing the pin drops the last reference to the link: the program
    // detaches.
    std::fs::remove_file(&existing.pin)
        .map_err(|e| kernel(format!("unpinning {}", existing.pin.display()))(e.to_string()))?;
    confirm_link_gone(dev, link_id)?;
    Ok(status)
}

/// Waits (briefly: the kernel frees an unpinned link from a work queue)
/// until the link is gone; one still there means another process holds it
/// open and the program stays attached.
fn confirm_link_gone(dev: &str, id: u32) -> Result<(), DataplaneError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    for _ in 0..200 {
        if !attachment::link_exists(id) {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Err(DataplaneError::Kernel {
        what: format!("detaching from {dev}"),
        detail: format!(
            "the pin is removed but another process holds the link (id {id}) open, so the \
             program stays attached until it closes it (`bpftool link show id {id}`)"
        ),
    })
}

/// Every attachment of this instance with what the kernel says of it, and
/// pins weir does not recognise.
pub fn attachments(
    instance: &Instance,
) -> Result<(Vec<Status>, Vec<attachment::Unknown>), DataplaneError> {
    let (known, unknown) = scan(instance)?;
    Ok((known.iter().map(attachment::status).collect(), unknown))
}

/// Removes every pin whose link the kernel has detached (its device or
/// namespace is gone); returns them.
pub fn prune(instance: &Instance) -> Result<Vec<Status>, DataplaneError> {
    crate::instance::require_root()?;
    let mut removed = Vec::new();
    for status in attachments(instance)?.0 {
        if status.state != "defunct" {
            continue;
        }
        let pin = &status.attachment.pin;
        std::fs::remove_file(pin)
            .map_err(|e| kernel(format!("removing {}", pin.display()))(e.to_string()))?;
        removed.push(status);
    }
    Ok(removed)
}

/// Loads `program` of `ebpf` and attaches it with TCX at `direction` of
/// `dev`, pinned as `key` and confirmed by the kernel, after removing the
/// pins of earlier links there that no longer work (returned).
fn attach_tc(
    instance: &Instance,
    ebpf: &mut Ebpf,
    program: &str,
    direction: TcAttachType,
    key: Key,
    dev: &str,
) -> Result<(Attachment, Vec<Status>), DataplaneError> {
    let (mode, hook) = match direction {
        TcAttachType::Ingress => (Mode::TcIngress, "ingress"),
        TcAttachType::Egress => (Mode::TcEgress, "egress"),
        TcAttachType::Custom(_) => panic!("weir attaches tc programs at ingress or egress"),
    };
    let classifier = load_classifier(ebpf, program)?;
    let replaced = clear_for(instance, key, dev)?;
    let id = classifier
        .attach_with_options(
            dev,
            direction,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .map_err(|e| {
            kernel(format!(
                "attaching {program} to tc {hook} of {dev} (needs TCX, kernel 6.6+)"
            ))(one_line(&e))
        })?;
    let link = classifier
        .take_link(id)
        .map_err(|e| kernel("tc link")(e.to_string()))?;
    let fd_link: FdLink = link
        .try_into()
        .map_err(|e: aya::programs::links::LinkError| kernel("tc link")(e.to_string()))?;
    let attachment = pin_verified(fd_link, instance, key, mode, dev)?;
    Ok((attachment, replaced))
}

fn load_decap(instance: &Instance) -> Result<Ebpf, DataplaneError> {
    instance.prepare()?;
    EbpfLoader::new()
        .default_map_pin_directory(instance.pin_dir())
        .load(weir_ebpf::decap_object())
        .map_err(|e| kernel("loading the decap object")(e.to_string()))
}

/// Attaches the decapsulator at tc ingress of `dev` (idempotent per
/// device: a live link is kept, a defunct one replaced) and adds `vip` to
/// the VIPs it decapsulates, accepting IPIP to it only from `from` (the
/// balancers' addresses). Returns the attachment and every source `vip`
/// now accepts, as read back.
pub fn decap_attach(
    instance: &Instance,
    dev: &str,
    vip: Ipv4Addr,
    from: &[decap_sources::Prefix],
) -> Result<(Attached, Vec<decap_sources::Prefix>), DataplaneError> {
    let key = key_here(Kind::Decap, dev)?;
    let mut ebpf = load_decap(instance)?;
    // Attach first (if this device has no working decap yet); the VIP is
    // added once that worked, and a failed VIP write undoes a fresh attach.
    let live = find_live(instance, key)?;
    let (attachment, attached_now, replaced) = match live {
        Some(existing) => (existing, false, Vec::new()),
        None => {
            let (attachment, replaced) = attach_tc(
                instance,
                &mut ebpf,
                weir_ebpf::DECAP_PROGRAM,
                TcAttachType::Ingress,
                key,
                dev,
            )?;
            (attachment, true, replaced)
        }
    };
    let added = instance
        .lock()
        .map_err(DataplaneError::from)
        .and_then(|_lock| add_decap_vip(&mut ebpf, vip, from));
    match added {
        Ok(sources) => Ok((
            Attached {
                attachment,
                attached_now,
                replaced,
            },
            sources,
        )),
        Err(e) if attached_now => Err(unpin_after(&attachment, e)),
        Err(e) => Err(e),
    }
}

/// Allows `from` for `vip`, then adds `vip`: sources first, so the VIP is
/// never served by an empty list. A failed VIP write takes the new
/// sources out again. `ebpf` is the decap object (from `decap_attach`, or
/// [`load_decap_program`] in BPF_PROG_RUN tests).
pub fn add_decap_vip(
    ebpf: &mut Ebpf,
    vip: Ipv4Addr,
    from: &[decap_sources::Prefix],
) -> Result<Vec<decap_sources::Prefix>, DataplaneError> {
    let sources = ebpf
        .map_mut(abi::maps::DECAP_SOURCES)
        .expect("object defines weir_dcap_sources");
    let new = decap_sources::allow(sources, vip, from)?;
    let map = ebpf
        .map_mut(abi::maps::DECAP_VIPS)
        .expect("object defines weir_dcap_vips");
    let mut vips: HashMap<&mut MapData, abi::DecapKey, u32> =
        HashMap::try_from(map).map_err(|e| kernel("weir_dcap_vips")(e.to_string()))?;
    let key = abi::DecapKey { vip: vip.octets() };
    let written = vips
        .insert(key, 1, 0)
        .map_err(|e| kernel("adding the VIP to weir_dcap_vips")(e.to_string()))
        .and_then(|()| {
            vips.get(&key, 0)
                .map(drop)
                .map_err(|e| kernel(format!("reading back {vip} in weir_dcap_vips"))(e.to_string()))
        });
    let sources = ebpf
        .map_mut(abi::maps::DECAP_SOURCES)
        .expect("object defines weir_dcap_sources");
    if let Err(e) = written {
        let stuck: Vec<String> = match decap_sources::revoke(sources, vip, &new) {
            Ok(_) => Vec::new(),
            Err(_) => new.iter().map(ToString::to_string).collect(),
        };
        let fix = format!("weir decap revoke --vip {vip} --from {}", stuck.join(","));
        return Err(decap_sources::left_behind(e, &stuck, &fix));
    }
    Ok(decap_sources::sources_of(sources)?
        .remove(&vip)
        .unwrap_or_default())
}

/// Detaches the decapsulator from `dev`.
pub fn decap_detach(instance: &Instance, dev: &str) -> Result<Status, DataplaneError> {
    detach_kind(instance, Kind::Decap, dev)
}

/// Decap counters, summed over CPUs, in `abi::DECAP_COUNTERS` order; `None`
/// if this instance never attached a decapsulator.
pub fn decap_counters(instance: &Instance) -> Result<Option<Vec<u64>>, DataplaneError> {
    percpu_counters(instance, abi::maps::DECAP_STATS, abi::DECAP_COUNTERS.len())
}

/// The first `len` counters of the instance's pinned per-CPU array `map`,
/// summed over CPUs; `None` if the program that makes it was never loaded.
fn percpu_counters(
    instance: &Instance,
    map: &str,
    len: usize,
) -> Result<Option<Vec<u64>>, DataplaneError> {
    let path = instance.pin_dir().join(map);
    if !path.exists() {
        return Ok(None);
    }
    let data =
        MapData::from_pin(&path).map_err(|e| kernel(path.display().to_string())(e.to_string()))?;
    let data = aya::maps::Map::from_map_data(data).map_err(|e| kernel(map)(e.to_string()))?;
    let stats: PerCpuArray<&MapData, u64> =
        PerCpuArray::try_from(&data).map_err(|e| kernel(map)(e.to_string()))?;
    let values = (0..len as u32)
        .map(|i| stats.get(&i, 0).map(|v| v.iter().sum()))
        .collect::<Result<Vec<u64>, _>>()
        .map_err(|e| kernel(map)(e.to_string()))?;
    Ok(Some(values))
}

/// Loads the decap object against the instance's pinned maps and its
/// program into the kernel, not attached: for BPF_PROG_RUN tests.
pub fn load_decap_program(instance: &Instance) -> Result<Ebpf, DataplaneError> {
    let mut ebpf = load_decap(instance)?;
    load_classifier(&mut ebpf, weir_ebpf::DECAP_PROGRAM)?;
    Ok(ebpf)
}

/// Loads the tc program `program` of `ebpf` into the kernel.
fn load_classifier<'a>(
    ebpf: &'a mut Ebpf,
    program: &str,
) -> Result<&'a mut SchedClassifier, DataplaneError> {
    let classifier: &mut SchedClassifier = ebpf
        .program_mut(program)
        .unwrap_or_else(|| panic!("object defines {program}"))
        .try_into()
        .map_err(|e: aya::programs::ProgramError| kernel(program)(e.to_string()))?;
    classifier
        .load()
        .map_err(|e| kernel(format!("the kernel refused {program}"))(one_line(&e)))?;
    Ok(classifier)
}

#[cfg(test)]
mod tests {
    #[test]
    fn nexthop_ttl_is_100_ms_of_this_kernels_jiffies() {
        // HZ is one of these (Kconfig's choices).
        let ttl = super::nexthop_ttl_jiffies();
        assert!([10, 25, 30, 100].contains(&ttl), "100 ms is {ttl} jiffies?");
    }
}
