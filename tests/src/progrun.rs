//! A network namespace for BPF_PROG_RUN of the XDP balancer: the FIB
//! lookups the program makes need routes, a neighbour and forwarding on
//! the ingress device. Shared by the tests and the bench.

use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A namespace with one veth (`pr0`, 198.18.2.2/24), forwarding on, a
/// permanent neighbour 198.18.2.1 (02:00:00:00:00:01) as the next hop for
/// 198.18.10.0/23, and a next hop without neighbour entry (198.18.2.3) for
/// 198.18.20.0/24. The calling thread enters it; deleted on drop.
pub struct ProgRunNetns {
    pub name: String,
    pub ifindex: u32,
    pub mac: [u8; 6],
}

pub const NEXT_HOP_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

impl ProgRunNetns {
    pub fn enter(tag: &str) -> Self {
        let name = format!(
            "wp{}{}{}",
            std::process::id(),
            tag,
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        let mut guard = Self {
            name: name.clone(),
            ifindex: 0,
            mac: [0; 6],
        };
        let ns = |args: &[&str]| {
            let mut full = vec!["-n", name.as_str()];
            full.extend_from_slice(args);
            run("ip", &full);
        };
        ns(&["link", "add", "pr0", "type", "veth", "peer", "name", "pr1"]);
        ns(&["link", "set", "pr0", "up"]);
        ns(&["link", "set", "pr1", "up"]);
        ns(&["link", "set", "lo", "up"]);
        ns(&["addr", "add", "198.18.2.2/24", "dev", "pr0"]);
        ns(&[
            "neigh",
            "add",
            "198.18.2.1",
            "lladdr",
            "02:00:00:00:00:01",
            "dev",
            "pr0",
            "nud",
            "permanent",
        ]);
        ns(&["route", "add", "198.18.10.0/23", "via", "198.18.2.1"]);
        ns(&["route", "add", "198.18.20.0/24", "via", "198.18.2.3"]);
        let path = format!("/run/netns/{name}");
        run(
            "nsenter",
            &[
                &format!("--net={path}"),
                "sysctl",
                "-qw",
                "net.ipv4.conf.all.forwarding=1",
                "net.ipv4.conf.pr0.forwarding=1",
            ],
        );
        // Per-CPU state (next-hop cache, counters) must stay on one CPU for
        // a test's expectations about it to hold: pin this thread.
        pin_to_cpu(0);
        let file = std::fs::File::open(&path).expect("open netns");
        // SAFETY: setns on this thread only, with a namespace fd we own.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        let c = std::ffi::CString::new("pr0").unwrap();
        // SAFETY: valid C string; we are inside the namespace now.
        let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
        assert_ne!(ifindex, 0);
        // /sys still shows the host's namespace: ask ip for the MAC.
        let out = Command::new("ip")
            .args(["-n", &name, "-br", "link", "show", "pr0"])
            .output()
            .expect("ip");
        let text = String::from_utf8_lossy(&out.stdout);
        let mac_text = text
            .split_whitespace()
            .nth(2)
            .expect("ip -br prints the MAC");
        let mut mac = [0u8; 6];
        for (i, part) in mac_text.split(':').enumerate().take(6) {
            mac[i] = u8::from_str_radix(part, 16).expect("hex MAC");
        }
        guard.ifindex = ifindex;
        guard.mac = mac;
        guard
    }
}

/// Moves the calling thread to `cpu` and keeps it there. BPF_PROG_RUN runs
/// an XDP program on the calling thread's CPU, so this is how a test sends
/// a packet "received" on another CPU.
pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one bit set, for this thread (0).
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set)
    };
    assert_eq!(
        rc,
        0,
        "pinning to CPU {cpu}: {}",
        std::io::Error::last_os_error()
    );
}

impl Drop for ProgRunNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// One BPF_PROG_RUN of an XDP program on `frame`, received on `ifindex`.
#[derive(Debug)]
pub struct XdpRun {
    pub verdict: u32,
    /// The frame as the program left it.
    pub output: Vec<u8>,
    /// The kernel's measurement of this single run.
    pub duration: std::time::Duration,
}

/// Runs `prog` once (never with `repeat` > 1: a rerun would see the frame
/// the first run rewrote).
pub fn run_xdp(
    prog: &mut aya::programs::Xdp,
    frame: &[u8],
    ifindex: u32,
) -> anyhow::Result<XdpRun> {
    use aya::programs::{TestRun, TestRunOptions};
    let mut output = vec![0u8; frame.len() + 256];
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, ...
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut output),
        ctx_in: Some(&ctx),
        ..TestRunOptions::default()
    };
    let r = prog.test_run(opts)?;
    output.truncate(r.data_size_out as usize);
    Ok(XdpRun {
        verdict: r.return_value,
        output,
        duration: r.duration,
    })
}

/// One BPF_PROG_RUN of a tc program on `frame` (an skb starting at the
/// Ethernet header).
#[derive(Debug)]
pub struct TcRun {
    /// The TC_ACT_* the program returned.
    pub verdict: u32,
    /// The packet as the program left it.
    pub output: Vec<u8>,
    /// The skb's mark as the program left it.
    pub mark: u32,
}

/// Runs the tc program `prog` once on `frame`.
pub fn run_tc(prog: &mut aya::programs::SchedClassifier, frame: &[u8]) -> anyhow::Result<TcRun> {
    run_tc_marked(prog, frame, 0)
}

/// Runs the tc program `prog` once on `frame`, an skb that carries `mark`
/// (as a socket's SO_MARK gives its packets) and leaves by `lo`.
pub fn run_tc_marked(
    prog: &mut aya::programs::SchedClassifier,
    frame: &[u8],
    mark: u32,
) -> anyhow::Result<TcRun> {
    use aya::programs::{TestRun, TestRunOptions};
    /// Offset of `mark` in struct __sk_buff (after len and pkt_type).
    const MARK: usize = 8;
    let mut output = vec![0u8; frame.len() + 256];
    let mut ctx = [0u8; MARK + 4];
    ctx[MARK..].copy_from_slice(&mark.to_ne_bytes());
    // Room for the whole struct __sk_buff the kernel writes back.
    let mut ctx_out = [0u8; 512];
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut output),
        ctx_in: Some(&ctx),
        ctx_out: Some(&mut ctx_out),
        ..TestRunOptions::default()
    };
    let r = prog.test_run(opts)?;
    output.truncate(r.data_size_out as usize);
    Ok(TcRun {
        verdict: r.return_value,
        output,
        mark: u32::from_ne_bytes(ctx_out[MARK..MARK + 4].try_into().expect("4 bytes")),
    })
}
