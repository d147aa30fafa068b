//! Path MTU discovery through the L4 path: the LB's link to the backends
//! carries 1500 bytes, so a client's full-size 1500-byte segment no longer
//! fits once encapsulated. XDP answers with ICMP "fragmentation needed"
//! (MTU 1480); the client's kernel learns it, shrinks its segments, and the
//! transfer completes.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use weir_testbed::topology::{Topology, TopologySpec, in_netns};
use weir_testbed::weir_cli::WeirCli;

const PORT: u16 = 8080;
const BYTES: usize = 1 << 20;

/// Accepts one connection within 20 s, reads it to the end (20 s without
/// data ends it) and answers with the byte count.
fn count_server(listener: TcpListener) -> std::thread::JoinHandle<std::io::Result<u64>> {
    std::thread::spawn(move || {
        listener.set_nonblocking(true)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut conn = loop {
            match listener.accept() {
                Ok((c, _)) => break c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err(e);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        };
        conn.set_nonblocking(false)?;
        conn.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut total = 0u64;
        let mut buf = vec![0u8; 65536];
        loop {
            let n = conn.read(&mut buf)?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        conn.write_all(&total.to_be_bytes())?;
        Ok(total)
    })
}

#[test]
fn client_learns_the_tunnel_mtu_from_icmp_and_the_transfer_completes() {
    weir_testbed::require_root();
    let topo = Topology::build(TopologySpec {
        backends: 1,
        client_addrs: 1,
    })
    .unwrap();
    let weir = WeirCli::new(&format!("pm{}", std::process::id())).unwrap();
    let w = |ns: &str, args: &[&str]| -> String { weir.run(&topo, ns, args).unwrap() };
    let vip = topo.vip();
    let service = format!("{vip}:{PORT}");
    let (lb, be, client) = (
        topo.lb_ns.clone(),
        topo.backend_ns[0].clone(),
        topo.client_ns.clone(),
    );

    // The LB's link carries 1500 bytes, like the client's: 1500 + 20 does
    // not fit. Frames as on a wire: no TSO/GSO at the client, no GRO on
    // the router (veth would otherwise hand XDP 64 KiB aggregates).
    topo.set_lb_link_mtu(1500).unwrap();
    topo.run_ok_in(
        &client,
        "ethtool",
        &["-K", "cli0", "tso", "off", "gso", "off"],
    )
    .unwrap();
    topo.run_ok_in(&topo.router_ns, "ethtool", &["-K", "r-cli", "gro", "off"])
        .unwrap();
    weir.attach_peer(&topo).unwrap();
    weir.decap_backend(&topo, 0).unwrap();
    weir.attach_lb(&topo, "native").unwrap();
    w(&lb, &["service", "add", &service]);
    w(
        &lb,
        &[
            "backend",
            "add",
            &service,
            &topo.backend_addr(0).to_string(),
        ],
    );

    let listener = in_netns(&topo.ns_path(&be), move || {
        TcpListener::bind(("0.0.0.0", PORT))
    })
    .unwrap()
    .unwrap();
    let server = count_server(listener);
    let target = SocketAddr::from((vip, PORT));
    let mut stream = in_netns(&topo.ns_path(&client), move || {
        TcpStream::connect_timeout(&target, Duration::from_secs(5))
    })
    .unwrap()
    .expect("connect through the VIP");
    stream
        .set_write_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let data = vec![0x5au8; BYTES];
    stream.write_all(&data).expect("send 1 MiB");
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut reply = [0u8; 8];
    let read = stream.read_exact(&mut reply);
    let stats = w(&lb, &["--json", "stats"]);
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    read.unwrap_or_else(|e| panic!("no reply from the backend ({e}): {stats}"));
    assert_eq!(u64::from_be_bytes(reply), BYTES as u64, "all bytes arrived");
    assert_eq!(server.join().unwrap().unwrap(), BYTES as u64);

    // The client's kernel took the MTU from weir's ICMP.
    let route = topo
        .run_ok_in(&client, "ip", &["route", "get", &vip.to_string()])
        .unwrap();
    let route = String::from_utf8_lossy(&route.stdout);
    assert!(route.contains("mtu 1480"), "route cache: {route}");

    let xdp = &stats["xdp"];
    let icmp = xdp["icmp_frag_needed"].as_u64().unwrap();
    assert!(icmp >= 1, "{stats}");
    assert_eq!(
        xdp["drop_frag_needed"].as_u64().unwrap(),
        icmp + xdp["icmp_rate_limited"].as_u64().unwrap() + xdp["icmp_not_df"].as_u64().unwrap(),
        "every packet too big is accounted for: {stats}"
    );
    assert_eq!(stats["decap"]["decap_drop_source"], 0, "{stats}");
    // (Counted per skb: the backend's veth merges segments with GRO.)
    assert!(stats["decap"]["decap_ok"].as_u64().unwrap() > 0, "{stats}");
}
