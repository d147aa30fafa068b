//! Two weir hosts behind an ECMP router: long-lived WebSocket connections
//! spread over both, then one host leaves the route (or loses its XDP
//! program first) and the router moves its connections to the other, whose
//! ring has never seen them. Maglev from addresses alone is what lets them
//! live on: both rings send every slot to the same backend address. Also
//! measures what that cannot keep: flows whose slot changed because a
//! backend joined at the moment of the move.
//!
//! Both hosts get their backends as an operator's fleet would: a `weir
//! agent` each, watching the same etcd prefix. The first agent sees the
//! backends arrive one by one in reverse order, the second starts once all
//! are there, so the hosts number the same backends differently (ids are
//! host-local) and only the addresses can make their rings agree.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use weir::instance::Instance;
use weir::registry::Registry;
use weir_ebpf::abi::{FlowKey, flow_hash};

use crate::agent::{self, Agent};
use crate::etcd::EtcdCluster;
use crate::scenario::{L4Options, PORT, log, parse_report, start_long_lived, tempdir};
use crate::topology::{Topology, TopologySpec};
use crate::weir_cli::WeirCli;
use crate::workspace_bin;
use crate::wsload::ConnResult;

/// Backends b0..b3 serve from the start; b4 joins in [`Failover::AddBackend`].
const BACKENDS: usize = 5;
const INITIAL: usize = 4;

/// How the first LB loses its connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failover {
    /// The router withdraws its path (a BGP session going down).
    Withdraw,
    /// `weir detach` on it, then the router withdraws its path (its health
    /// check failing), so its connections go nowhere for a moment first.
    Detach,
    /// A fifth backend joins both LBs, then the path is withdrawn.
    AddBackend,
    /// Every etcd member is stopped (both agents count their source
    /// stale), then the path is withdrawn; etcd is restarted after.
    EtcdDown,
}

/// How to run it.
#[derive(Clone, Debug)]
pub struct EcmpOptions {
    /// Prefix of the two instance names (unique per run).
    pub instance: String,
    pub connections: usize,
    /// Client source addresses the connections spread over.
    pub sources: usize,
    pub interval: Duration,
    /// Time traffic flows before and after the move.
    pub settle: Duration,
    pub verbose: bool,
}

impl Default for EcmpOptions {
    fn default() -> Self {
        Self {
            instance: format!("ecmp-{}", std::process::id()),
            connections: 200,
            sources: 4,
            interval: Duration::from_millis(100),
            settle: Duration::from_secs(2),
            verbose: false,
        }
    }
}

/// What happened.
#[derive(Debug)]
pub struct EcmpReport {
    pub failover: Failover,
    /// Both LBs' `weir check` digests, before any change.
    pub digests: [String; 2],
    /// The same, as each LB's agent exposes it on `/metrics`.
    pub metric_digests: [String; 2],
    /// The LBs gave at least one backend different ids (the premise: only
    /// addresses can make the rings agree).
    pub ids_differ: bool,
    pub connected: usize,
    /// Connections that were on the first LB, which ECMP moved.
    pub moved: usize,
    /// Of those, the ones that kept echoing to the end.
    pub survived: usize,
    /// Connections that were on the second LB all along, and how many of
    /// them kept echoing.
    pub stayed: usize,
    pub stayed_survived: usize,
    /// Share of ring slots whose backend address changed between the ring
    /// before the move and the second LB's ring after it (0 without a
    /// change).
    pub slot_share: f64,
    /// Moved connections whose own slot changed: the ones Maglev cannot
    /// keep.
    pub predicted_broken: usize,
    /// Non-SYN packets the second LB found no flow for (moved flows).
    pub lb2_flow_misses: u64,
}

impl EcmpReport {
    pub fn broken(&self) -> usize {
        self.moved - self.survived
    }
}

/// Backend address → the instance's id for it, for every backend.
fn backend_ids(instance: &str) -> Result<BTreeMap<SocketAddrV4, u32>> {
    let state = Registry::open(&Instance::new(instance)?)?.state()?;
    Ok(state
        .backends
        .iter()
        .map(|(id, b)| (SocketAddrV4::new(b.addr.addr, b.addr.port), *id))
        .collect())
}

/// Waits until the instance's ring holds exactly the backends `want`
/// (what its agent applies from etcd).
fn wait_ring(instance: &str, want: &[SocketAddrV4], agent: &Agent) -> Result<()> {
    let want: BTreeSet<Option<SocketAddrV4>> = want.iter().copied().map(Some).collect();
    agent.until(
        &format!("{instance}: the ring held no {want:?} from etcd"),
        Duration::from_secs(30),
        || {
            let ring = ring_addrs(instance).unwrap_or_default();
            (ring.into_iter().collect::<BTreeSet<_>>() == want).then_some(())
        },
    )
}

/// The ring digest of `service` in the `/metrics` of the agent on `port`
/// (`weir_agent_ring_digest{service=..,digest=..} 1`), once it is `want`
/// (the agent reads it again within about a second of a change); the last
/// one seen if it never is.
fn metric_digest(port: u16, service: &str, want: &str, agent: &Agent) -> Result<String> {
    let prefix = format!("weir_agent_ring_digest{{service=\"{service}\",");
    let mut last = String::new();
    let seen = agent.until(
        &format!("no ring digest {want} of {service} on /metrics"),
        Duration::from_secs(10),
        || {
            let text = agent::scrape(port);
            let line = text.lines().find(|l| l.starts_with(&prefix))?;
            last = line
                .split("digest=\"")
                .nth(1)?
                .split('"')
                .next()?
                .to_string();
            (last == want).then(|| last.clone())
        },
    );
    Ok(seen.unwrap_or(last))
}

/// Waits until the agent on `port` counts its source stale
/// (`weir_agent_source_stale{..} 1`).
fn wait_stale(port: u16, agent: &Agent) -> Result<()> {
    agent.until(
        "the agent counted etcd not stale",
        Duration::from_secs(30),
        || {
            agent::scrape(port)
                .lines()
                .any(|l| l.starts_with("weir_agent_source_stale{") && l.ends_with(" 1"))
                .then_some(())
        },
    )
}

/// A ring as slot → backend address, read from the instance's pins.
fn ring_addrs(instance: &str) -> Result<Vec<Option<SocketAddrV4>>> {
    let reg = Registry::open(&Instance::new(instance)?)?;
    let state = reg.maps().read_state()?;
    let [(_, svc)] = state.services.iter().collect::<Vec<_>>()[..] else {
        bail!("{instance}: expected one service");
    };
    let ring = reg.maps().read_ring(svc.id)?.unwrap_or_default();
    Ok(ring
        .iter()
        .map(|id| {
            state
                .backends
                .get(id)
                .map(|b| SocketAddrV4::new(b.addr.addr, b.addr.port))
        })
        .collect())
}

/// The (source address, source port) of every flow in the instance's flow
/// table: the connections that went through that LB.
fn flow_sources(instance: &str) -> Result<BTreeSet<SocketAddrV4>> {
    let path = Instance::new(instance)?
        .pin_dir()
        .join(weir_ebpf::abi::maps::FLOWS);
    let data = aya::maps::MapData::from_pin(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let map = aya::maps::Map::from_map_data(data)?;
    let flows: aya::maps::HashMap<_, FlowKey, u32> = aya::maps::HashMap::try_from(map)?;
    let mut out = BTreeSet::new();
    for key in flows.keys() {
        let key = key?;
        out.insert(SocketAddrV4::new(
            Ipv4Addr::from(key.saddr),
            u16::from_be_bytes(key.sport),
        ));
    }
    Ok(out)
}

/// The flow key XDP sees for a client connection to the VIP.
fn flow_key(src: SocketAddrV4, vip: Ipv4Addr) -> FlowKey {
    FlowKey {
        saddr: src.ip().octets(),
        daddr: vip.octets(),
        sport: src.port().to_be_bytes(),
        dport: PORT.to_be_bytes(),
        proto: 6,
        pad: [0; 3],
    }
}

fn survived(c: &ConnResult) -> bool {
    c.connected && !c.is_broken() && c.echoed == c.sent && c.sent > 0
}

/// Runs one failover on a fresh topology (client, router, two LBs, five
/// backends), both LBs fed from `etcd` under a prefix of this run's own,
/// and returns what happened; everything it made is removed before it
/// returns.
pub fn run_ecmp(
    opts: &EcmpOptions,
    failover: Failover,
    etcd: &mut EtcdCluster,
) -> Result<EcmpReport> {
    let start = Instant::now();
    let client = workspace_bin("weir-wsclient");
    let mut topo = Topology::build(TopologySpec {
        backends: BACKENDS,
        client_addrs: opts.sources,
    })?;
    let lb2_ns = topo.add_second_lb()?;
    let names = [format!("{}a", opts.instance), format!("{}b", opts.instance)];
    // Declared after the topology, so they go first on the way out: they
    // detach from its devices.
    let lbs = [WeirCli::new(&names[0])?, WeirCli::new(&names[1])?];
    for i in 0..BACKENDS {
        topo.start_echo(i, PORT)?;
    }
    let sites = [
        (
            topo.lb_ns.clone(),
            topo.lb_dev(),
            topo.router_lb_dev(),
            topo.lb_addr(),
        ),
        (
            lb2_ns.clone(),
            topo.lb2_dev(),
            topo.router_lb2_dev(),
            topo.lb2_addr(),
        ),
    ];
    for (weir, (ns, dev, peer, addr)) in lbs.iter().zip(&sites) {
        weir.attach_peer_at(&topo, peer)?;
        weir.attach_lb_at(&topo, ns, dev, *addr, "native")?;
    }
    let lb_addrs = [topo.lb_addr(), topo.lb2_addr()];
    for i in 0..BACKENDS {
        lbs[0].decap_backend_from(&topo, i, &lb_addrs)?;
    }
    let service = format!("{}:{PORT}", topo.vip());
    let backend = |i: usize| SocketAddrV4::new(topo.backend_addr(i), PORT);
    let prefix = format!("/weir/{}-{failover:?}/", opts.instance);
    let backend_key = |i: usize| format!("{prefix}backends/{service}/{}", backend(i));
    etcd.put(&format!("{prefix}services/{service}"), "{}")?;
    let endpoints: Vec<String> = etcd
        .endpoints()
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect();
    let metrics = [crate::free_port()?, crate::free_port()?];
    let agent_config = |lb: usize| {
        format!(
            "[metrics]\nlisten = \"127.0.0.1:{}\"\n[[source]]\ntype = \"etcd\"\n\
             endpoints = [{}]\nprefix = \"{prefix}\"\n",
            metrics[lb],
            endpoints.join(", ")
        )
    };
    let agent_dirs: Vec<_> = names.iter().map(|n| agent::temp_dir(n)).collect();
    for (weir, (ns, ..)) in lbs.iter().zip(&sites) {
        weir.run(&topo, ns, &["service", "add", &service])?;
    }
    // The first LB's agent sees b3, b2, b1, b0 arrive one revision at a
    // time; the second starts when all four are in etcd.
    let first = Agent::start(&names[0], &agent_dirs[0], &agent_config(0));
    let mut arrived = Vec::new();
    for i in (0..INITIAL).rev() {
        etcd.put(&backend_key(i), r#"{"weight":1}"#)?;
        arrived.push(backend(i));
        wait_ring(&names[0], &arrived, &first)?;
    }
    let second = Agent::start(&names[1], &agent_dirs[1], &agent_config(1));
    wait_ring(&names[1], &arrived, &second)?;
    let ids = [backend_ids(&names[0])?, backend_ids(&names[1])?];
    let ids_differ = ids[0] != ids[1];
    let mut digests = Vec::new();
    for (weir, (ns, ..)) in lbs.iter().zip(&sites) {
        let check: serde_json::Value =
            serde_json::from_str(&weir.run(&topo, ns, &["--json", "check"])?)?;
        let digest = check["services"][0]["ring_digest"]
            .as_str()
            .context("weir check printed no ring digest")?;
        digests.push(digest.to_string());
    }
    let digests: [String; 2] = digests.try_into().expect("two LBs");
    let metric_digests = [
        metric_digest(metrics[0], &service, &digests[0], &first)?,
        metric_digest(metrics[1], &service, &digests[1], &second)?,
    ];
    log(
        opts.verbose,
        start,
        &format!(
            "two LBs behind ECMP fed from etcd, b0-b3 in two orders; ring digests {} / {}",
            &digests[0][..12],
            &digests[1][..12]
        ),
    );
    let ring_before = ring_addrs(&names[0])?;

    let dir = tempdir(&opts.instance)?;
    let url = format!("ws://{service}/");
    let long_opts = L4Options {
        connections: opts.connections,
        interval: opts.interval,
        ..Default::default()
    };
    let sources: Vec<String> = topo
        .client_addrs()
        .iter()
        .map(Ipv4Addr::to_string)
        .collect();
    let (clients, hold) = start_long_lived(&topo, &client, &url, &long_opts, &dir, &sources)?;
    std::thread::sleep(opts.settle);
    let on_lb1 = flow_sources(&names[0])?;
    log(
        opts.verbose,
        start,
        &format!(
            "{} connections open, {} through the first LB",
            opts.connections,
            on_lb1.len()
        ),
    );

    let router_hop = [topo.lb2_addr()];
    match failover {
        Failover::Withdraw => topo.route_vip_via(&router_hop)?,
        Failover::Detach => {
            lbs[0].run(&topo, &topo.lb_ns, &["detach", "--dev", topo.lb_dev()])?;
            std::thread::sleep(Duration::from_millis(500));
            topo.route_vip_via(&router_hop)?;
        }
        Failover::AddBackend => {
            etcd.put(&backend_key(INITIAL), r#"{"weight":1}"#)?;
            arrived.push(backend(INITIAL));
            wait_ring(&names[0], &arrived, &first)?;
            wait_ring(&names[1], &arrived, &second)?;
            topo.route_vip_via(&router_hop)?;
        }
        Failover::EtcdDown => {
            etcd.stop_all()?;
            for (port, agent) in metrics.iter().zip([&first, &second]) {
                wait_stale(*port, agent)?;
            }
            topo.route_vip_via(&router_hop)?;
        }
    }
    log(
        opts.verbose,
        start,
        &format!("{failover:?}: the router sends the VIP to the second LB only"),
    );
    std::thread::sleep(opts.settle);
    let ring_after = ring_addrs(&names[1])?;
    if failover == Failover::EtcdDown {
        etcd.restart_all()?;
    }
    std::fs::write(&hold, b"done")?;
    let report = parse_report(
        clients.wait_output(Duration::from_secs(60))?,
        "long-lived connections",
    )?;
    let stats: serde_json::Value =
        serde_json::from_str(&lbs[1].run(&topo, &lb2_ns, &["--json", "stats"])?)?;

    if ring_before.len() != ring_after.len() {
        bail!(
            "ring size changed: {} -> {}",
            ring_before.len(),
            ring_after.len()
        );
    }
    let changed: Vec<bool> = ring_before
        .iter()
        .zip(&ring_after)
        .map(|(a, b)| a != b)
        .collect();
    let slot_share = changed.iter().filter(|c| **c).count() as f64 / changed.len() as f64;
    let mut counts = BTreeMap::<(bool, bool), usize>::new();
    let mut predicted_broken = 0;
    let mut connected = 0;
    for c in &report.connections {
        if !c.connected {
            continue;
        }
        connected += 1;
        let src: SocketAddrV4 = c
            .local_addr
            .as_deref()
            .context("connection without a local address")?
            .parse()?;
        let moved = on_lb1.contains(&src);
        let ok = survived(c);
        *counts.entry((moved, ok)).or_default() += 1;
        let slot = flow_hash(&flow_key(src, topo.vip())) as usize % changed.len();
        if moved && changed[slot] {
            predicted_broken += 1;
        }
    }
    let n = |moved: bool, ok: bool| counts.get(&(moved, ok)).copied().unwrap_or(0);
    let _ = std::fs::remove_dir_all(&dir);
    drop((first, second));
    for d in &agent_dirs {
        let _ = std::fs::remove_dir_all(d);
    }
    drop(lbs);
    topo.teardown()?;
    Ok(EcmpReport {
        failover,
        digests,
        metric_digests,
        ids_differ,
        connected,
        moved: n(true, true) + n(true, false),
        survived: n(true, true),
        stayed: n(false, true) + n(false, false),
        stayed_survived: n(false, true),
        slot_share,
        predicted_broken,
        lb2_flow_misses: stats["xdp"]["flow_miss"].as_u64().unwrap_or(0),
    })
}
