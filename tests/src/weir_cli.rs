//! The `weir` command line for one throwaway instance, run inside the
//! namespaces of a [`Topology`], the way an operator would run it on each
//! host. The instance goes (pins, links, the audit log `destroy` keeps)
//! when the [`WeirCli`] drops, and also when the process is interrupted.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Output;

use anyhow::{Result, bail};

use crate::topology::{Topology, register_cleanup_command, unregister_cleanup_command};
use crate::workspace_bin;

/// `weir --instance NAME destroy`, then the state directory `destroy`
/// keeps (the audit log): removes everything a throwaway instance made.
pub fn destroy_argv(weir: &Path, instance: &str) -> Vec<String> {
    let state_root = std::env::var("WEIR_STATE_DIR").unwrap_or_else(|_| "/var/lib/weir".into());
    vec![
        "sh".into(),
        "-c".into(),
        "\"$0\" --instance \"$1\" destroy; rm -rf -- \"$2/$1\"".into(),
        weir.display().to_string(),
        instance.into(),
        state_root,
    ]
}

/// Removes the instance (detaching XDP and decap) and its state directory
/// when dropped, and also when the process is interrupted (through the
/// topology's cleanup).
pub struct InstanceGuard {
    argv: Vec<String>,
}

impl InstanceGuard {
    pub fn new(weir: &Path, instance: &str) -> Self {
        let argv = destroy_argv(weir, instance);
        register_cleanup_command(argv.clone());
        Self { argv }
    }
}

impl Drop for InstanceGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new(&self.argv[0])
            .args(&self.argv[1..])
            .output();
        unregister_cleanup_command(&self.argv);
    }
}

/// `weir` for one instance. Drop it before the topology it ran in, so its
/// links go while their devices still exist.
pub struct WeirCli {
    bin: PathBuf,
    instance: String,
    _guard: InstanceGuard,
}

impl WeirCli {
    /// The built `weir` binary for instance `instance`, which this value
    /// owns from now on.
    pub fn new(instance: &str) -> Result<Self> {
        let bin = workspace_bin("weir");
        if !bin.exists() {
            bail!(
                "{} is not built; run `cargo build -p weir` first",
                bin.display()
            );
        }
        let guard = InstanceGuard::new(&bin, instance);
        Ok(Self {
            bin,
            instance: instance.into(),
            _guard: guard,
        })
    }

    pub fn bin(&self) -> &Path {
        &self.bin
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    fn argv<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        // A flow table sized for a test, not for an edge host.
        let mut full = vec!["--instance", self.instance.as_str(), "--flows", "65536"];
        full.extend_from_slice(args);
        full
    }

    /// `weir args` in namespace `ns`, whatever its exit status.
    pub fn output(&self, topo: &Topology, ns: &str, args: &[&str]) -> Result<Output> {
        topo.run_in(ns, &self.bin, &self.argv(args))
    }

    /// `weir args` in namespace `ns`, which must succeed (else the error has
    /// the command line and its stderr); returns stdout, trimmed.
    pub fn run(&self, topo: &Topology, ns: &str, args: &[&str]) -> Result<String> {
        let out = topo.run_ok_in(ns, &self.bin, &self.argv(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Backend `i` decapsulates IPIP to the topology's VIP at its device,
    /// from the LB's address only.
    pub fn decap_backend(&self, topo: &Topology, i: usize) -> Result<String> {
        self.decap_backend_from(topo, i, &[topo.lb_addr()])
    }

    /// Backend `i` decapsulates IPIP to the topology's VIP at its device,
    /// from each of these balancers.
    pub fn decap_backend_from(
        &self,
        topo: &Topology,
        i: usize,
        lbs: &[Ipv4Addr],
    ) -> Result<String> {
        let vip = topo.vip().to_string();
        let from: Vec<String> = lbs.iter().map(|a| format!("{a}/32")).collect();
        let from = from.join(",");
        self.run(
            topo,
            &topo.backend_ns[i],
            &[
                "decap",
                "attach",
                "--dev",
                &topo.backend_dev(i),
                "--vip",
                &vip,
                "--from",
                &from,
            ],
        )
    }

    /// weir's pass-through program on the router's end of the LB link, so
    /// native XDP_TX from the LB wakes it (the way an operator does it).
    pub fn attach_peer(&self, topo: &Topology) -> Result<String> {
        self.attach_peer_at(topo, topo.router_lb_dev())
    }

    /// The pass-through program on router device `dev`.
    pub fn attach_peer_at(&self, topo: &Topology, dev: &str) -> Result<String> {
        self.run(topo, &topo.router_ns, &["attach-peer", "--dev", dev])
    }

    /// XDP on the LB's device, encapsulating from the LB's address.
    pub fn attach_lb(&self, topo: &Topology, mode: &str) -> Result<String> {
        self.attach_lb_at(topo, &topo.lb_ns, topo.lb_dev(), topo.lb_addr(), mode)
    }

    /// XDP on device `dev` of namespace `ns`, encapsulating from `lb_addr`.
    pub fn attach_lb_at(
        &self,
        topo: &Topology,
        ns: &str,
        dev: &str,
        lb_addr: Ipv4Addr,
        mode: &str,
    ) -> Result<String> {
        let lb_addr = lb_addr.to_string();
        self.run(
            topo,
            ns,
            &[
                "attach",
                "--dev",
                dev,
                "--lb-addr",
                &lb_addr,
                "--mode",
                mode,
            ],
        )
    }
}
