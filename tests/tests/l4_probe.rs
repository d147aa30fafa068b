//! The probe path: a health check of an L4 backend leaves the LB the way a
//! client's packet does, inside weir's IPIP header to the backend its
//! socket mark names, so it needs that backend's decapsulation and VIP
//! listener; a backend whose decap is detached fails it although its own
//! address still answers. `weir attach` sets the path up and `weir detach`
//! leaves no rule or route behind.
//!
//! Needs root and `cargo build -p weir` first.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::time::Duration;

use serde_json::Value;
use socket2::{Domain, Socket, Type};
use weir::dataplane::probe;
use weir::instance::Instance;
use weir_testbed::topology::{Topology, TopologySpec, in_netns};
use weir_testbed::weir_cli::WeirCli;

const PORT: u16 = 8080;
/// Long enough for a handshake through the namespaces; a probe that
/// nothing answers fails within it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How a connection attempt from the LB ended.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// Upgraded by the echo server of this name.
    Reached(String),
    /// No handshake within [`CONNECT_TIMEOUT`].
    TimedOut,
    /// Anything else (refused, reset, no upgrade).
    Failed(String),
}

/// Connects from the calling thread's namespace to `to`, with the socket
/// mark `mark` and bound to `from` if given, and asks for a WebSocket
/// upgrade; the echo servers name themselves in `x-weir-backend`.
fn probe_once(to: SocketAddrV4, mark: Option<u32>, from: Option<Ipv4Addr>) -> Outcome {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    if let Some(mark) = mark {
        socket.set_mark(mark).expect("SO_MARK");
    }
    if let Some(from) = from {
        socket
            .bind(&SocketAddr::from((from, 0)).into())
            .expect("bind");
    }
    match socket.connect_timeout(&SocketAddr::V4(to).into(), CONNECT_TIMEOUT) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return Outcome::TimedOut,
        Err(e) => return Outcome::Failed(e.to_string()),
    }
    let mut stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(CONNECT_TIMEOUT)).unwrap();
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {to}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    if let Err(e) = stream.write_all(request.as_bytes()) {
        return Outcome::Failed(e.to_string());
    }
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) => return Outcome::Failed(e.to_string()),
        }
    }
    let head = String::from_utf8_lossy(&head);
    head.lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("x-weir-backend")
                .then(|| Outcome::Reached(value.trim().to_string()))
        })
        .unwrap_or_else(|| Outcome::Failed(format!("no upgrade: {head}")))
}

/// [`probe_once`] from the LB's namespace.
fn probe_from_lb(
    topo: &Topology,
    to: SocketAddrV4,
    mark: Option<u32>,
    from: Option<Ipv4Addr>,
) -> Outcome {
    in_netns(&topo.ns_path(&topo.lb_ns), move || {
        probe_once(to, mark, from)
    })
    .unwrap()
}

struct Stage {
    // Field order: the instance (detaching everything) before the topology.
    weir: WeirCli,
    topo: Topology,
    /// Backend ids by index, as `weir backend list` reports them.
    ids: Vec<u32>,
}

impl Stage {
    /// Two backends, each with an echo server on the VIP and its own
    /// address and decap from the LB; native XDP on the LB (the way
    /// operators attach it, peer program included); an L4 service of both.
    fn new(tag: &str) -> Stage {
        weir_testbed::require_root();
        let mut topo = Topology::build(TopologySpec {
            backends: 2,
            client_addrs: 1,
        })
        .unwrap();
        let weir = WeirCli::new(&format!("pr{}{tag}", std::process::id())).unwrap();
        for i in 0..2 {
            topo.start_echo(i, PORT).unwrap();
            weir.decap_backend(&topo, i).unwrap();
        }
        weir.attach_peer(&topo).unwrap();
        let said = weir.attach_lb(&topo, "native").unwrap();
        assert!(said.contains("health checks marked"), "{said}");
        let service = format!("{}:{PORT}", topo.vip());
        let lb = topo.lb_ns.clone();
        weir.run(&topo, &lb, &["service", "add", &service]).unwrap();
        let backends: Vec<String> = (0..2).map(|i| topo.backend_addr(i).to_string()).collect();
        let mut set = vec!["backend", "set", service.as_str()];
        set.extend(backends.iter().map(String::as_str));
        weir.run(&topo, &lb, &set).unwrap();
        let list: Value = serde_json::from_str(
            &weir
                .run(&topo, &lb, &["--json", "backend", "list", &service])
                .unwrap(),
        )
        .unwrap();
        let ids = (0..2)
            .map(|i| {
                let addr = format!("{}:{PORT}", topo.backend_addr(i));
                list.as_array()
                    .unwrap()
                    .iter()
                    .find(|b| b["backend"] == addr.as_str())
                    .and_then(|b| b["id"].as_u64())
                    .unwrap_or_else(|| panic!("no id for {addr}: {list}")) as u32
            })
            .collect();
        Stage { weir, topo, ids }
    }

    fn vip(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.topo.vip(), PORT)
    }

    fn lb(&self, args: &[&str]) -> String {
        self.weir.run(&self.topo, &self.topo.lb_ns, args).unwrap()
    }

    /// `weir stats`' probe counter `name`.
    fn probe_counter(&self, name: &str) -> u64 {
        let stats: Value = serde_json::from_str(&self.lb(&["--json", "stats"])).unwrap();
        stats["probe"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("no probe counter {name}: {stats}"))
    }

    /// Whether the probe path is live for this instance, asked from the
    /// LB's namespace as the agent asks.
    fn probe_attached(&self) -> bool {
        let instance = Instance::new(self.weir.instance()).unwrap();
        in_netns(&self.topo.ns_path(&self.topo.lb_ns), move || {
            probe::attached(&instance)
        })
        .unwrap()
        .unwrap()
    }

    /// The LB namespace's rules and the probe table's routes, as `ip`
    /// shows them.
    fn routing(&self) -> (String, String) {
        let show = |args: &[&str]| {
            let out = self.topo.run_ok_in(&self.topo.lb_ns, "ip", args).unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let table = probe::TABLE.to_string();
        (
            show(&["rule", "show"]),
            show(&["route", "show", "table", &table]),
        )
    }
}

#[test]
fn a_marked_connect_reaches_its_backend_through_its_decap_only() {
    let stage = Stage::new("path");
    assert!(stage.probe_attached(), "weir attach set the probe path up");
    let (rules, routes) = stage.routing();
    let pref = format!("{}:", probe::RULE_PRIORITY);
    assert!(rules.lines().any(|l| l.starts_with(&pref)), "{rules}");
    assert!(routes.contains("dev lo"), "{routes}");

    // Each mark reaches the backend it names, whatever the ring says for
    // the connection (four tries each, from new source ports).
    for (i, id) in stage.ids.iter().enumerate() {
        for _ in 0..4 {
            let got = probe_from_lb(&stage.topo, stage.vip(), Some(probe::mark_for(*id)), None);
            assert_eq!(got, Outcome::Reached(format!("b{i}")), "mark of b{i}");
        }
    }
    let encapsulated = stage.probe_counter("probe_encapsulated");
    assert!(
        encapsulated >= 8 * 3,
        "handshake and request of each: {encapsulated}"
    );

    // An unmarked connect to the VIP is none of the probe's business.
    let _ = probe_from_lb(&stage.topo, stage.vip(), None, None);
    assert_eq!(stage.probe_counter("probe_encapsulated"), encapsulated);

    // b0 without its decap: the check through the tunnel fails, although
    // b0's own address answers; b1 is still reached.
    let b0 = stage.topo.backend_ns[0].clone();
    stage
        .weir
        .run(
            &stage.topo,
            &b0,
            &["decap", "detach", "--dev", &stage.topo.backend_dev(0)],
        )
        .unwrap();
    let mark0 = probe::mark_for(stage.ids[0]);
    assert_eq!(
        probe_from_lb(&stage.topo, stage.vip(), Some(mark0), None),
        Outcome::TimedOut
    );
    let own = SocketAddrV4::new(stage.topo.backend_addr(0), PORT);
    assert_eq!(
        probe_from_lb(&stage.topo, own, None, None),
        Outcome::Reached("b0".into())
    );
    let mark1 = probe::mark_for(stage.ids[1]);
    assert_eq!(
        probe_from_lb(&stage.topo, stage.vip(), Some(mark1), None),
        Outcome::Reached("b1".into())
    );

    // A mark that names no backend is dropped and counted, not sent on.
    let unknown = probe::mark_for(60_000);
    assert_eq!(
        probe_from_lb(&stage.topo, stage.vip(), Some(unknown), None),
        Outcome::TimedOut
    );
    assert!(stage.probe_counter("probe_drop_unknown_backend") >= 1);

    // Detaching the balancer takes the probe path with it.
    let said = stage.lb(&["detach", "--dev", stage.topo.lb_dev()]);
    assert!(said.contains("probe path"), "{said}");
    assert!(!stage.probe_attached());
    let (rules, routes) = stage.routing();
    assert!(!rules.lines().any(|l| l.starts_with(&pref)), "{rules}");
    assert!(routes.trim().is_empty(), "{routes}");
    let listed: Value = serde_json::from_str(&stage.lb(&["--json", "attachments"])).unwrap();
    let kinds: Vec<&str> = listed["attached"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["kind"].as_str())
        .collect();
    assert!(!kinds.contains(&"probe"), "{listed}");
}

#[test]
fn a_vip_local_to_the_lb_is_probed_from_the_lb_address() {
    let stage = Stage::new("local");
    let lb_ns = stage.topo.lb_ns.clone();
    let vip = format!("{}/32", stage.topo.vip());
    stage
        .topo
        .run_ok_in(&lb_ns, "ip", &["addr", "add", &vip, "dev", "lo"])
        .unwrap();
    let mark1 = probe::mark_for(stage.ids[1]);
    // The local table sends it to lo with the VIP as source: the backend's
    // answer would go to itself, so the probe drops it and says why.
    assert_eq!(
        probe_from_lb(&stage.topo, stage.vip(), Some(mark1), None),
        Outcome::TimedOut
    );
    assert!(stage.probe_counter("probe_drop_source") >= 1);
    // Bound to the LB address it goes through, to the backend it names.
    let lb_addr = stage.topo.lb_addr();
    assert_eq!(
        probe_from_lb(&stage.topo, stage.vip(), Some(mark1), Some(lb_addr)),
        Outcome::Reached("b1".into())
    );
}
