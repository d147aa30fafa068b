//! Loading and attaching the kernel programs. Attachments are BPF links
//! pinned under the instance directory, so they outlive the `weir` process:
//! the XDP path keeps forwarding with no daemon, and `detach` is unpinning.

pub mod decap_sources;

use std::net::Ipv4Addr;
use std::path::PathBuf;

use aya::maps::{HashMap, MapData, PerCpuArray};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::TcAttachOptions;
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType, Xdp};
use aya::{Ebpf, EbpfLoader};
use thiserror::Error;
use weir_ebpf::abi;

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
    #[error("weir ({instance}) is not attached to {dev}")]
    NotAttached { instance: String, dev: String },
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

fn xdp_link_pin(instance: &Instance, dev: &str) -> PathBuf {
    instance.link_dir().join(format!("xdp-{dev}"))
}

fn decap_link_pin(instance: &Instance, dev: &str) -> PathBuf {
    instance.link_dir().join(format!("decap-{dev}"))
}

/// Loads the balancer object against the instance's pinned maps and loads
/// its XDP program into the kernel (not attached). Used by `attach` and by
/// BPF_PROG_RUN tests and benches.
pub fn load_lb(instance: &Instance) -> Result<Ebpf, DataplaneError> {
    Registry::open_or_create(instance, CreateOptions::default())?;
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(instance.pin_dir())
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

/// Attaches the balancer to `dev`, with `lb_addr` as the outer source of
/// encapsulated packets.
pub fn attach(
    instance: &Instance,
    dev: &str,
    lb_addr: Ipv4Addr,
    mode: XdpMode,
    create: CreateOptions,
) -> Result<(), DataplaneError> {
    ifindex(dev)?;
    let pin = xdp_link_pin(instance, dev);
    if pin.exists() {
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
    let mut registry = Registry::open_or_create(instance, create)?;
    let current = Ipv4Addr::from(registry.maps().config()?.lb_addr);
    let others: Vec<String> = attachments(instance)
        .into_iter()
        .filter(|(kind, _)| kind == "xdp")
        .map(|(_, d)| d)
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
    let flags = match mode {
        XdpMode::Native => aya::programs::XdpMode::Driver,
        XdpMode::Generic => aya::programs::XdpMode::Skb,
    };
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
    fd_link
        .pin(&pin)
        .map_err(|e| kernel(format!("pinning {}", pin.display()))(e.to_string()))?;
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
        let _ = unpin(pin, instance, dev);
        return Err(e);
    }
    Ok(())
}

/// The first line of an error, at most 300 characters: kernel errors can
/// carry a whole verifier log, and the CLI prints one line.
fn one_line(e: &dyn std::fmt::Display) -> String {
    let text = format!("{e:#}");
    let first = text.lines().next().unwrap_or("").trim();
    let mut line: String = first.chars().take(300).collect();
    if text.lines().nth(1).is_some() || first.chars().count() > 300 {
        line.push_str(" ...");
    }
    line
}

/// Detaches the balancer from `dev` by removing its pinned link.
pub fn detach(instance: &Instance, dev: &str) -> Result<(), DataplaneError> {
    crate::instance::require_root()?;
    unpin(xdp_link_pin(instance, dev), instance, dev)
}

fn unpin(pin: PathBuf, instance: &Instance, dev: &str) -> Result<(), DataplaneError> {
    if !pin.exists() {
        return Err(DataplaneError::NotAttached {
            instance: instance.name().into(),
            dev: dev.into(),
        });
    }
    let link = PinnedLink::from_pin(&pin)
        .map_err(|e| kernel(format!("opening {}", pin.display()))(e.to_string()))?;
    // Unpinning drops the last reference to the link: the program detaches.
    link.unpin()
        .map_err(|e| kernel(format!("unpinning {}", pin.display()))(e.to_string()))?;
    Ok(())
}

/// Interfaces this instance has XDP or decap attached to.
pub fn attachments(instance: &Instance) -> Vec<(String, String)> {
    let Ok(dir) = std::fs::read_dir(instance.link_dir()) else {
        return vec![];
    };
    let mut out: Vec<(String, String)> = dir
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let (kind, dev) = name.split_once('-')?;
            Some((kind.to_string(), dev.to_string()))
        })
        .collect();
    out.sort();
    out
}

fn load_decap(instance: &Instance) -> Result<Ebpf, DataplaneError> {
    instance.prepare()?;
    EbpfLoader::new()
        .default_map_pin_directory(instance.pin_dir())
        .load(weir_ebpf::decap_object())
        .map_err(|e| kernel("loading the decap object")(e.to_string()))
}

/// Attaches the decapsulator at tc ingress of `dev` (idempotent per
/// device) and adds `vip` to the VIPs it decapsulates, accepting IPIP to
/// it only from `from` (the balancers' addresses). Returns every source
/// `vip` now accepts, as read back.
pub fn decap_attach(
    instance: &Instance,
    dev: &str,
    vip: Ipv4Addr,
    from: &[decap_sources::Prefix],
) -> Result<Vec<decap_sources::Prefix>, DataplaneError> {
    ifindex(dev)?;
    let mut ebpf = load_decap(instance)?;
    // Attach first (if this device has no decap yet); the VIP is added
    // once that worked, and a failed VIP write undoes a fresh attach.
    let pin = decap_link_pin(instance, dev);
    let attached_now = !pin.exists();
    if attached_now {
        let program: &mut SchedClassifier = ebpf
            .program_mut(weir_ebpf::DECAP_PROGRAM)
            .expect("object defines weir_decap")
            .try_into()
            .map_err(|e: aya::programs::ProgramError| kernel("weir_decap")(e.to_string()))?;
        program
            .load()
            .map_err(|e| kernel("the kernel refused the decap program")(one_line(&e)))?;
        let id = program
            .attach_with_options(
                dev,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(|e| {
                kernel(format!(
                    "attaching decap to tc ingress of {dev} (needs TCX, kernel 6.6+)"
                ))(one_line(&e))
            })?;
        let link = program
            .take_link(id)
            .map_err(|e| kernel("tc link")(e.to_string()))?;
        let fd_link: FdLink = link
            .try_into()
            .map_err(|e: aya::programs::links::LinkError| kernel("tc link")(e.to_string()))?;
        fd_link
            .pin(&pin)
            .map_err(|e| kernel(format!("pinning {}", pin.display()))(e.to_string()))?;
    }
    let added = instance
        .lock()
        .map_err(DataplaneError::from)
        .and_then(|_lock| add_decap_vip(&mut ebpf, vip, from));
    match added {
        Ok(sources) => Ok(sources),
        Err(e) => {
            if attached_now {
                let _ = unpin(pin, instance, dev);
            }
            Err(e)
        }
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
        let _ = decap_sources::revoke(sources, vip, &new);
        return Err(e);
    }
    Ok(decap_sources::sources_of(sources)?
        .remove(&vip)
        .unwrap_or_default())
}

/// Detaches the decapsulator from `dev`.
pub fn decap_detach(instance: &Instance, dev: &str) -> Result<(), DataplaneError> {
    crate::instance::require_root()?;
    unpin(decap_link_pin(instance, dev), instance, dev)
}

/// Decap counters, summed over CPUs, in `abi::DECAP_COUNTERS` order; `None`
/// if this instance never attached a decapsulator.
pub fn decap_counters(instance: &Instance) -> Result<Option<Vec<u64>>, DataplaneError> {
    let path = instance.pin_dir().join(abi::maps::DECAP_STATS);
    if !path.exists() {
        return Ok(None);
    }
    let data =
        MapData::from_pin(&path).map_err(|e| kernel(path.display().to_string())(e.to_string()))?;
    let map = aya::maps::Map::from_map_data(data)
        .map_err(|e| kernel("weir_dcap_stats")(e.to_string()))?;
    let stats: PerCpuArray<&MapData, u64> =
        PerCpuArray::try_from(&map).map_err(|e| kernel("weir_dcap_stats")(e.to_string()))?;
    let values = (0..abi::DECAP_COUNTERS.len() as u32)
        .map(|i| stats.get(&i, 0).map(|v| v.iter().sum()))
        .collect::<Result<Vec<u64>, _>>()
        .map_err(|e| kernel("weir_dcap_stats")(e.to_string()))?;
    Ok(Some(values))
}

/// Loads the decap object against the instance's pinned maps and its
/// program into the kernel, not attached: for BPF_PROG_RUN tests.
pub fn load_decap_program(instance: &Instance) -> Result<Ebpf, DataplaneError> {
    let mut ebpf = load_decap(instance)?;
    let program: &mut SchedClassifier = ebpf
        .program_mut(weir_ebpf::DECAP_PROGRAM)
        .expect("object defines weir_decap")
        .try_into()
        .map_err(|e: aya::programs::ProgramError| kernel("weir_decap")(e.to_string()))?;
    program
        .load()
        .map_err(|e| kernel("the kernel refused the decap program")(one_line(&e)))?;
    Ok(ebpf)
}
