//! Shared pieces of the root integration tests: a throwaway weir instance,
//! removed on drop, a raw WebSocket client (`ws`) and the bed of the
//! takeover tests (`takeover`).

#![allow(dead_code)]

pub mod takeover;
pub mod ws;

use std::sync::atomic::{AtomicU32, Ordering};

use std::net::SocketAddr;
use weir::instance::Instance;

use weir::registry::{
    ApplyOptions, BackendAddr, Change, CreateOptions, Registry, ServiceAddr, ServiceModeName,
};

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn unique(tag: &str) -> String {
    format!(
        "t{}{}{}",
        std::process::id(),
        tag,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

#[allow(unused_imports)] // not every test file needs it
pub use weir_testbed::require_root;

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    weir_testbed::free_port().expect("a free loopback port")
}

/// Applies `change`, guard rails forced: the BPF_PROG_RUN tests set up
/// whatever registry they need.
pub fn apply(reg: &mut Registry, change: Change) {
    reg.apply(
        &change,
        ApplyOptions {
            force: true,
            ..Default::default()
        },
    )
    .expect("apply");
}

/// Declares `addr` an L7 service with the registry's defaults.
pub fn add_l7_service(addr: ServiceAddr) -> Change {
    add_service(addr, ServiceModeName::L7)
}

/// Adding service `addr` in `mode` with every option at its default.
pub fn add_service(addr: ServiceAddr, mode: ServiceModeName) -> Change {
    Change::AddService {
        addr,
        mode,
        ring_size: None,
        max_remove_fraction: None,
        min_backends: None,
        panic_threshold: None,
    }
}

/// A backend at `a`, where an echo server on loopback listens.
pub fn backend(a: SocketAddr) -> BackendAddr {
    match a {
        SocketAddr::V4(v4) => BackendAddr {
            addr: *v4.ip(),
            port: v4.port(),
        },
        SocketAddr::V6(_) => unreachable!("echo servers listen on IPv4"),
    }
}

/// A weir instance of its own, with a small flow table; destroyed on drop
/// (which also detaches anything pinned under it).
pub struct TestInstance {
    pub instance: Instance,
}

impl TestInstance {
    pub fn new(tag: &str) -> Self {
        let instance = Instance::new(&unique(tag)).expect("valid name");
        Registry::open_or_create(&instance, CreateOptions { flows: 65536 })
            .expect("create instance");
        Self { instance }
    }

    pub fn registry(&self) -> Registry {
        Registry::open(&self.instance).expect("open registry")
    }

    pub fn name(&self) -> &str {
        self.instance.name()
    }
}

impl Drop for TestInstance {
    fn drop(&mut self) {
        let _ = self.instance.destroy();
        // `destroy` keeps the audit log; a throwaway instance leaves nothing.
        let _ = std::fs::remove_dir_all(self.instance.state_dir());
    }
}

/// What `GET /metrics` on loopback `port` answers (head and body).
pub fn metrics_answer(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text
}
