//! The backend's decapsulator in a real topology: IPIP to the VIP from a
//! host that is not an allowed balancer (here the client, forging an inner
//! source address) is never delivered; the balancer's is. The allow list is
//! changed and read back through the CLI.

use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use weir::instance::Instance;
use weir_ebpf::abi;
use weir_testbed::packet;
use weir_testbed::topology::{Topology, TopologySpec, in_netns};
use weir_testbed::weir_cli::WeirCli;

const PORT: u16 = 9999;

/// Sends one IPIP packet from inside `ns_path` to `backend`: the kernel
/// adds the outer header (source: this namespace's address), the payload
/// is an IPv4/UDP datagram from `inner_src` to `vip`:PORT carrying `tag`.
fn send_ipip(ns_path: &str, backend: Ipv4Addr, inner_src: Ipv4Addr, vip: Ipv4Addr, tag: &[u8]) {
    let mut udp = Vec::new();
    udp.extend_from_slice(&5555u16.to_be_bytes());
    udp.extend_from_slice(&PORT.to_be_bytes());
    udp.extend_from_slice(&((8 + tag.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]); // no checksum (IPv4 allows it)
    udp.extend_from_slice(tag);
    let mut inner = packet::ipv4_header(inner_src, vip, 17, udp.len(), 0x4000).to_vec();
    inner.extend_from_slice(&udp);
    in_netns(ns_path, move || {
        // SAFETY: plain socket(2); the descriptor is owned right away.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_IPIP) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(backend.octets()),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: buffer and address are valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                inner.as_ptr().cast(),
                inner.len(),
                0,
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        assert_eq!(
            sent,
            inner.len() as isize,
            "sendto: {}",
            std::io::Error::last_os_error()
        );
    })
    .expect("in namespace");
}

/// Datagrams that reach `rx` within `wait`.
fn received(rx: &UdpSocket, wait: Duration) -> Vec<(Ipv4Addr, Vec<u8>)> {
    rx.set_read_timeout(Some(wait)).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 256];
    while let Ok((n, from)) = rx.recv_from(&mut buf) {
        let std::net::SocketAddr::V4(from) = from else {
            panic!("IPv4 only")
        };
        out.push((*from.ip(), buf[..n].to_vec()));
        if out.len() > 10 {
            break;
        }
    }
    out
}

fn decap_counter(instance: &Instance, name: &str) -> u64 {
    let i = abi::DECAP_COUNTERS.iter().position(|c| *c == name).unwrap();
    weir::dataplane::decap_counters(instance)
        .unwrap()
        .expect("decap maps pinned")[i]
}

#[test]
fn ipip_from_a_source_not_allowed_is_not_delivered() {
    weir_testbed::require_root();
    let topo = Topology::build(TopologySpec {
        backends: 1,
        client_addrs: 1,
    })
    .unwrap();
    let weir = WeirCli::new(&format!("ds{}", std::process::id())).unwrap();
    let instance = Instance::new(weir.instance()).unwrap();
    let w = |ns: &str, args: &[&str]| -> String { weir.run(&topo, ns, args).unwrap() };
    let be = topo.backend_ns[0].clone();
    let vip = topo.vip();
    let backend = topo.backend_addr(0);
    let attached = weir.decap_backend(&topo, 0).unwrap();
    assert!(
        attached.contains(" from 198.18.2.2/32 at tc ingress"),
        "{attached}"
    );

    let rx = in_netns(&topo.ns_path(&be), move || UdpSocket::bind((vip, PORT)))
        .unwrap()
        .unwrap();
    let forged_client = Ipv4Addr::new(198, 18, 1, 99);
    let client_path = topo.ns_path(&topo.client_ns);
    let lb_path = topo.ns_path(&topo.lb_ns);

    // The client forges IPIP as if it were a balancer; then the LB sends.
    send_ipip(&client_path, backend, forged_client, vip, b"forged");
    send_ipip(&lb_path, backend, forged_client, vip, b"from the lb");
    let got = received(&rx, Duration::from_millis(1500));
    assert_eq!(
        got,
        [(forged_client, b"from the lb".to_vec())],
        "only the LB's packet is delivered"
    );
    assert_eq!(decap_counter(&instance, "decap_drop_source"), 1);
    assert_eq!(decap_counter(&instance, "decap_ok"), 1);

    // Allowing the client's subnet lets it through; revoking stops it again.
    let allowed = w(
        &be,
        &[
            "decap",
            "allow",
            "--vip",
            &vip.to_string(),
            "--from",
            "198.18.1.0/24",
        ],
    );
    assert!(
        allowed.contains("accepts IPIP from 198.18.1.0/24, 198.18.2.2/32"),
        "{allowed}"
    );
    send_ipip(&client_path, backend, forged_client, vip, b"allowed now");
    assert_eq!(
        received(&rx, Duration::from_millis(1500)),
        [(forged_client, b"allowed now".to_vec())]
    );
    let list = w(&be, &["--json", "decap", "list"]);
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(
        list,
        serde_json::json!([{"vip": "198.19.0.10", "from": ["198.18.1.0/24", "198.18.2.2/32"]}])
    );

    // A revoke naming a source that is not on the list changes nothing.
    let refused = weir
        .output(
            &topo,
            &be,
            &[
                "decap",
                "revoke",
                "--vip",
                "198.19.0.10",
                "--from",
                "198.18.1.0/24,198.18.7.0/24",
            ],
        )
        .unwrap();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("198.18.7.0/24") && err.contains("nothing changed"),
        "{err}"
    );
    send_ipip(&client_path, backend, forged_client, vip, b"still allowed");
    assert_eq!(received(&rx, Duration::from_millis(1500)).len(), 1);

    let revoked = w(
        &be,
        &[
            "decap",
            "revoke",
            "--vip",
            &vip.to_string(),
            "--from",
            "198.18.1.0/24",
        ],
    );
    assert!(
        revoked.contains("revoked 198.18.1.0/24; accepts IPIP from 198.18.2.2/32"),
        "{revoked}"
    );
    send_ipip(&client_path, backend, forged_client, vip, b"forged again");
    send_ipip(&lb_path, backend, forged_client, vip, b"lb again");
    assert_eq!(
        received(&rx, Duration::from_millis(1500)),
        [(forged_client, b"lb again".to_vec())]
    );
    assert_eq!(decap_counter(&instance, "decap_drop_source"), 2);
    assert_eq!(decap_counter(&instance, "decap_ok"), 4);
}
