//! Attachments across network namespaces that share one bpffs (every
//! container host): each namespace's device gets its own link even when the
//! device names are the same, a device deleted and re-created is noticed,
//! native XDP on a veth needs (and the CLI gives) a program on the peer, and
//! nothing reports an attachment that is not there as working.
//!
//! Needs root (CI runs as root) and `cargo build -p weir` first.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use weir_testbed::topology::{self, Topology, TopologySpec};
use weir_testbed::weir_cli::WeirCli;
use weir_testbed::workspace_bin;
use weir_testbed::wsload::LoadReport;

const PORT: u16 = 8080;

/// One weir instance, destroyed (detaching everything) when dropped and
/// when the test process is interrupted.
struct Weir {
    cli: WeirCli,
    bin: PathBuf,
    instance: String,
}

impl Weir {
    fn new(tag: &str) -> Self {
        weir_testbed::require_root();
        let cli = WeirCli::new(&format!("at{}{tag}", std::process::id())).expect("weir");
        Self {
            bin: cli.bin().to_path_buf(),
            instance: cli.instance().to_string(),
            cli,
        }
    }

    /// `weir --instance I args` in namespace `ns`, whatever its exit status.
    fn run(&self, topo: &Topology, ns: &str, args: &[&str]) -> Output {
        self.cli.output(topo, ns, args).expect("run weir")
    }

    /// Like `run`, but the command must succeed; returns stdout.
    fn ok(&self, topo: &Topology, ns: &str, args: &[&str]) -> String {
        let out = self.run(topo, ns, args);
        assert!(
            out.status.success(),
            "weir {args:?} in {ns}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn json(&self, topo: &Topology, ns: &str, args: &[&str]) -> Value {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        serde_json::from_str(&self.ok(topo, ns, &full)).expect("JSON output")
    }

    /// The attachments `weir stats` lists, seen from `ns`.
    fn attached(&self, topo: &Topology, ns: &str) -> Vec<Value> {
        let stats = self.json(topo, ns, &["stats"]);
        stats["attached"]
            .as_array()
            .unwrap_or_else(|| panic!("stats has no attachment list: {stats}"))
            .clone()
    }

    /// [`Weir::attached`] without the probe path, which `weir attach`
    /// adds on the LB's `lo` beside each balancer.
    fn attached_besides_probe(&self, topo: &Topology, ns: &str) -> Vec<Value> {
        without_probe(self.attached(topo, ns))
    }

    /// The attachments `weir attachments` lists (no registry needed).
    fn listed(&self, topo: &Topology, ns: &str) -> Vec<Value> {
        let listed = self.json(topo, ns, &["attachments"]);
        listed["attached"]
            .as_array()
            .unwrap_or_else(|| panic!("no attachment list: {listed}"))
            .clone()
    }
}

fn without_probe(attachments: Vec<Value>) -> Vec<Value> {
    attachments
        .into_iter()
        .filter(|a| a["kind"] != "probe")
        .collect()
}

fn ip(topo: &Topology, ns: &str, args: &[&str]) {
    topo.run_ok_in(ns, "ip", args).expect("ip");
}

fn ifindex(topo: &Topology, ns: &str, dev: &str) -> u64 {
    let out = topo
        .run_ok_in(ns, "ip", &["-j", "link", "show", "dev", dev])
        .expect("ip link show");
    let v: Value = serde_json::from_slice(&out.stdout).expect("ip -j");
    v[0]["ifindex"].as_u64().expect("ifindex")
}

/// Renames backend `i`'s device to `eth0`, as in a container.
fn rename_to_eth0(topo: &Topology, i: usize) {
    let ns = &topo.backend_ns[i];
    let dev = topo.backend_dev(i);
    ip(topo, ns, &["link", "set", &dev, "down"]);
    ip(topo, ns, &["link", "set", &dev, "name", "eth0"]);
    ip(topo, ns, &["link", "set", "eth0", "up"]);
    let gw = topo.backend_gateway(i).to_string();
    ip(topo, ns, &["route", "replace", "default", "via", &gw]);
}

/// Re-creates backend `i`'s link as `eth0` (optionally with ifindex
/// `index`) after it was deleted, addressed and routed as before.
fn recreate_eth0(topo: &Topology, i: usize, index: Option<u64>) {
    let ns = &topo.backend_ns[i];
    let peer = topo.router_backend_dev(i);
    let router = format!("/run/netns/{}", topo.router_ns);
    let index = index.map(|x| x.to_string());
    let mut add = vec!["link", "add", "eth0"];
    if let Some(index) = &index {
        add.extend(["index", index.as_str()]);
    }
    add.extend(["mtu", "9000", "type", "veth", "peer", "name", &peer]);
    add.extend(["netns", &router, "mtu", "9000"]);
    ip(topo, ns, &add);
    let addr = format!("{}/24", topo.backend_addr(i));
    ip(topo, ns, &["addr", "add", &addr, "dev", "eth0"]);
    ip(topo, ns, &["link", "set", "eth0", "up"]);
    let gw = topo.backend_gateway(i).to_string();
    ip(topo, ns, &["route", "replace", "default", "via", &gw]);
    let gw_cidr = format!("{gw}/24");
    ip(
        topo,
        &topo.router_ns,
        &["addr", "add", &gw_cidr, "dev", &peer],
    );
    ip(topo, &topo.router_ns, &["link", "set", &peer, "up"]);
}

/// Opens `n` WebSocket connections to the VIP from the client and returns
/// how many each backend (by echo name) got, after checking all connected.
fn connections_per_backend(topo: &Topology, n: usize) -> std::collections::BTreeMap<String, u64> {
    let out = topo
        .start_in(
            &topo.client_ns,
            &workspace_bin("weir-wsclient"),
            &[
                "--url",
                &format!("ws://{}:{PORT}/", topo.vip()),
                "--connections",
                &n.to_string(),
                "--duration-secs",
                "1",
                "--quiet",
            ],
        )
        .expect("start weir-wsclient")
        .wait_output(Duration::from_secs(60))
        .expect("weir-wsclient");
    let report = LoadReport::from_json(&String::from_utf8_lossy(&out.stdout)).expect("report");
    let mut per = std::collections::BTreeMap::new();
    for c in &report.connections {
        if let (true, Some(b)) = (c.connected, &c.backend) {
            *per.entry(b.clone()).or_insert(0) += 1;
        }
    }
    assert_eq!(
        report.summary.connected, n,
        "every connection must reach a backend: {:?}, per backend {per:?}",
        report.summary
    );
    per
}

fn decap(w: &Weir, topo: &Topology, i: usize) -> String {
    let vip = topo.vip().to_string();
    let lb = topo.lb_addr().to_string();
    w.ok(
        topo,
        &topo.backend_ns[i],
        &[
            "decap", "attach", "--dev", "eth0", "--vip", &vip, "--from", &lb,
        ],
    )
}

/// Starts an echo server named `b<i>` in backend `i`'s namespace.
fn echo(topo: &mut Topology, i: usize) {
    topo.start_echo(i, PORT).unwrap();
}

/// Declares the VIP service on the LB with backends `0..n`.
fn service(w: &Weir, topo: &Topology, n: usize) {
    let service = format!("{}:{PORT}", topo.vip());
    w.ok(topo, &topo.lb_ns, &["service", "add", &service]);
    let backends: Vec<String> = (0..n).map(|i| topo.backend_addr(i).to_string()).collect();
    let mut set = vec!["backend", "set", service.as_str()];
    set.extend(backends.iter().map(String::as_str));
    w.ok(topo, &topo.lb_ns, &set);
}

#[test]
fn four_namespaces_with_the_same_device_name_each_get_decap() {
    let w = Weir::new("same");
    let mut topo = Topology::build(TopologySpec {
        backends: 4,
        client_addrs: 1,
    })
    .unwrap();
    for i in 0..4 {
        rename_to_eth0(&topo, i);
        echo(&mut topo, i);
    }
    let said: Vec<String> = (0..4).map(|i| decap(&w, &topo, i)).collect();
    let lb_addr = topo.lb_addr().to_string();
    w.ok(
        &topo,
        &topo.lb_ns,
        &[
            "attach",
            "--dev",
            topo.lb_dev(),
            "--lb-addr",
            &lb_addr,
            "--mode",
            "generic",
        ],
    );
    service(&w, &topo, 4);

    // Traffic reaches all four: each namespace's eth0 decapsulates.
    let per = connections_per_backend(&topo, 40);
    for i in 0..4 {
        assert!(
            per.get(&format!("b{i}")).copied().unwrap_or(0) > 0,
            "backend b{i} got no traffic: {per:?}; decap said {said:?}"
        );
    }
    for (i, out) in said.iter().enumerate() {
        assert!(out.contains("attached now"), "backend {i}: {out}");
    }
    let listed = w.json(&topo, &topo.backend_ns[0], &["attachments"]);
    let decaps: Vec<&Value> = listed["attached"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["kind"] == "decap")
        .collect();
    assert_eq!(decaps.len(), 4, "{listed}");
    let mut namespaces: Vec<u64> = decaps
        .iter()
        .map(|a| a["netns"].as_u64().unwrap())
        .collect();
    namespaces.sort();
    namespaces.dedup();
    assert_eq!(namespaces.len(), 4, "one per namespace: {listed}");
    for a in &decaps {
        assert_eq!(a["dev"], "eth0", "{a}");
        assert_eq!(a["mode"], "tc_ingress", "{a}");
        assert_eq!(a["live"], true, "{a}");
    }
    let mut said_again = Vec::new();
    // Idempotent per namespace: a second attach keeps the live link.
    let again = decap(&w, &topo, 2);
    assert!(again.contains("already attached"), "{again}");

    // Backend devices deleted and re-created under the same name: b0 with
    // the same ifindex (the same key, its pin's link detached by the
    // kernel), b1 with a new one (a new key; the old pin is defunct).
    for (i, same_index) in [(0, true), (1, false)] {
        let ns = topo.backend_ns[i].clone();
        let index = ifindex(&topo, &ns, "eth0");
        let label = format!("/run/netns/{ns}");
        let netns = decaps
            .iter()
            .find(|a| a["netns_label"].as_str() == Some(label.as_str()))
            .map(|a| a["netns"].as_u64().unwrap())
            .unwrap_or_else(|| panic!("no decap listed for {ns}: {listed}"));
        ip(&topo, &ns, &["link", "del", "eth0"]);
        let stale = w
            .attached(&topo, &topo.lb_ns)
            .into_iter()
            .find(|a| a["kind"] == "decap" && a["netns"].as_u64() == Some(netns))
            .expect("the deleted device's decap is still listed");
        assert_eq!(stale["live"], false, "{stale}");
        assert_eq!(stale["state"], "defunct", "{stale}");
        recreate_eth0(&topo, i, same_index.then_some(index));
        let new_index = ifindex(&topo, &ns, "eth0");
        assert_eq!(
            new_index == index,
            same_index,
            "ifindex {index} -> {new_index}"
        );
        let out = decap(&w, &topo, i);
        said_again.push(out);
    }
    let per = connections_per_backend(&topo, 40);
    for b in ["b0", "b1"] {
        assert!(
            per.get(b).copied().unwrap_or(0) > 0,
            "{b}'s re-created device decapsulates again: {per:?}; decap said {said_again:?}"
        );
    }
    for out in &said_again {
        assert!(
            out.contains("attached now") && out.contains("replaced a defunct attachment"),
            "{out}"
        );
    }
    let after = w.attached_besides_probe(&topo, &topo.lb_ns);
    assert_eq!(after.len(), 5, "4 decap + 1 xdp: {after:?}");
    for a in after {
        assert_eq!(a["live"], true, "{a}");
    }

    // A re-created device that is not attached again: detaching it removes
    // the defunct pin of its predecessor, and says that is what it did.
    let b3 = topo.backend_ns[3].clone();
    ip(&topo, &b3, &["link", "del", "eth0"]);
    recreate_eth0(&topo, 3, None);
    let out = w.ok(&topo, &b3, &["decap", "detach", "--dev", "eth0"]);
    assert!(out.contains("removed the defunct attachment"), "{out}");
    let after = w.attached_besides_probe(&topo, &topo.lb_ns);
    assert_eq!(after.len(), 4, "3 decap + 1 xdp: {after:?}");
    let gone = w.run(&topo, &b3, &["decap", "detach", "--dev", "eth0"]);
    assert!(!gone.status.success(), "nothing is left to detach");
}

#[test]
fn native_attach_on_a_veth_needs_the_peer_program() {
    let w = Weir::new("peer");
    let mut topo = Topology::build(TopologySpec {
        backends: 1,
        client_addrs: 1,
    })
    .unwrap();
    let lb_addr = topo.lb_addr().to_string();
    let attach = [
        "attach",
        "--dev",
        "lb0",
        "--lb-addr",
        &lb_addr,
        "--mode",
        "native",
    ];
    let out = w.run(&topo, &topo.lb_ns, &attach);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "native attach without a peer program must fail"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let command = err
        .split('`')
        .nth(1)
        .unwrap_or_else(|| panic!("no command in: {err}"));
    let expected = format!(
        "nsenter --net=/run/netns/{} weir --instance {} attach-peer --dev r-lb",
        topo.router_ns, w.instance
    );
    assert_eq!(command, expected, "{err}");
    assert!(
        w.listed(&topo, &topo.lb_ns).is_empty(),
        "a refused attach leaves nothing"
    );

    // A peer program in generic mode does not wake the veth's receiver:
    // still refused, and attach-peer will not stack a second program.
    let obj = std::env::temp_dir().join(format!("weir-support-{}.o", std::process::id()));
    std::fs::write(&obj, weir_ebpf::support_object()).unwrap();
    let obj_path = obj.display().to_string();
    let router = topo.router_ns.clone();
    let generic = ["link", "set", "dev", "r-lb", "xdpgeneric"];
    let mut on = generic.to_vec();
    on.extend(["obj", obj_path.as_str(), "sec", "xdp.frags"]);
    ip(&topo, &router, &on);
    let _ = std::fs::remove_file(&obj);
    let out = w.run(&topo, &topo.lb_ns, &attach);
    assert!(
        !out.status.success(),
        "a generic peer program is not enough"
    );
    let out = w.run(&topo, &router, &["attach-peer", "--dev", "r-lb"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("generic mode"),
        "{err}"
    );
    let mut off = generic.to_vec();
    off.push("off");
    ip(&topo, &router, &off);

    // The command from the message, as an operator would run it.
    let mut words: Vec<String> = command.split_whitespace().map(String::from).collect();
    words[2] = w.bin.display().to_string();
    let ran = topology::run_cmd(Command::new(&words[0]).args(&words[1..])).expect("attach-peer");
    let said = String::from_utf8_lossy(&ran.stdout);
    assert!(said.contains("r-lb"), "{said}");

    let out = w.ok(&topo, &topo.lb_ns, &attach);
    assert!(out.contains("native mode"), "{out}");
    // Native XDP_TX into the veth now reaches the backend.
    echo(&mut topo, 0);
    let vip = topo.vip().to_string();
    w.ok(
        &topo,
        &topo.backend_ns[0],
        &[
            "decap",
            "attach",
            "--dev",
            &topo.backend_dev(0),
            "--vip",
            &vip,
            "--from",
            &topo.lb_addr().to_string(),
        ],
    );
    service(&w, &topo, 1);
    let per = connections_per_backend(&topo, 10);
    assert_eq!(per.get("b0"), Some(&10), "{per:?}");
    let attached = w.attached(&topo, &topo.lb_ns);
    let kinds: Vec<(&str, &str, bool)> = attached
        .iter()
        .map(|a| {
            (
                a["kind"].as_str().unwrap(),
                a["netns_label"].as_str().unwrap(),
                a["live"].as_bool().unwrap(),
            )
        })
        .collect();
    let lb = format!("/run/netns/{}", topo.lb_ns);
    let router = format!("/run/netns/{}", topo.router_ns);
    assert!(kinds.contains(&("xdp", lb.as_str(), true)), "{attached:?}");
    assert!(
        kinds.contains(&("veth_peer", router.as_str(), true)),
        "{attached:?}"
    );

    // Refusals: twice on one device, and the peer program off a veth.
    let twice = w.run(&topo, &topo.lb_ns, &attach);
    assert!(!twice.status.success());
    assert!(String::from_utf8_lossy(&twice.stderr).contains("already attached"));
    let lo = w.run(&topo, &topo.lb_ns, &["attach-peer", "--dev", "lo"]);
    assert!(!lo.status.success());
    assert!(String::from_utf8_lossy(&lo.stderr).contains("not a veth"));

    // Detaching checks the link is gone. While another process holds the
    // peer's link open, the program stays: detach-peer says so and fails.
    let links = format!("/sys/fs/bpf/weir/{}/links", w.instance);
    let peer_pin = std::fs::read_dir(&links)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("veth_peer-")
        })
        .expect("the peer's pin");
    let held = aya::programs::links::PinnedLink::from_pin(&peer_pin).expect("open the pin");
    let out = w.run(&topo, &topo.router_ns, &["detach-peer", "--dev", "r-lb"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("holds the link"),
        "{err}"
    );
    drop(held);
    let out = w.ok(&topo, &topo.lb_ns, &["detach", "--dev", "lb0"]);
    assert!(out.starts_with("detached"), "{out}");
    let left = w.listed(&topo, &topo.lb_ns);
    assert!(
        left.iter().all(|a| a["kind"] == "decap"),
        "only the backend's decap is left: {left:?}"
    );
    for (ns, dev) in [(&topo.lb_ns, "lb0"), (&topo.router_ns, "r-lb")] {
        let shown = topo.run_ok_in(ns, "ip", &["link", "show", dev]).unwrap();
        assert!(
            !String::from_utf8_lossy(&shown.stdout).contains("xdp"),
            "{dev} still runs XDP"
        );
    }
}

#[test]
fn stats_shows_an_attachment_whose_namespace_is_gone_as_defunct() {
    let w = Weir::new("gone");
    let mut topo = Topology::build(TopologySpec {
        backends: 1,
        client_addrs: 1,
    })
    .unwrap();
    let lb_addr = topo.lb_addr().to_string();
    w.ok(
        &topo,
        &topo.lb_ns,
        &[
            "attach",
            "--dev",
            "lb0",
            "--lb-addr",
            &lb_addr,
            "--mode",
            "generic",
        ],
    );
    let all = w.attached(&topo, &topo.router_ns);
    let probe: Vec<&Value> = all.iter().filter(|a| a["kind"] == "probe").collect();
    assert_eq!(probe.len(), 1, "weir attach adds the probe path: {all:?}");
    assert_eq!(
        (&probe[0]["dev"], &probe[0]["mode"], &probe[0]["live"]),
        (
            &Value::from("lo"),
            &Value::from("tc_egress"),
            &Value::from(true)
        ),
        "{all:?}"
    );
    let before = w.attached_besides_probe(&topo, &topo.router_ns);
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before[0]["live"], true, "{before:?}");
    assert_eq!(before[0]["mode"], "generic", "{before:?}");

    let lb_ns = topo.lb_ns.clone();
    topo.delete_namespace(&lb_ns).unwrap();
    // The kernel tears a namespace down in the background.
    let deadline = Instant::now() + Duration::from_secs(20);
    let gone = loop {
        let now = w.attached_besides_probe(&topo, &topo.router_ns);
        if now.first().is_some_and(|a| a["live"] == false) || Instant::now() > deadline {
            break now;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(gone.len(), 1, "{gone:?}");
    assert_eq!(gone[0]["live"], false, "{gone:?}");
    assert_eq!(gone[0]["state"], "defunct", "{gone:?}");
    assert_eq!(gone[0]["dev"], "lb0", "{gone:?}");
    let text = w.ok(&topo, &topo.router_ns, &["stats"]);
    assert!(
        text.lines()
            .any(|l| l.contains("defunct") && l.contains("lb0")),
        "{text}"
    );

    // Its device is nowhere to detach from; the error says what to run.
    let detach = w.run(&topo, &topo.router_ns, &["detach", "--dev", "lb0"]);
    assert!(!detach.status.success());
    let err = String::from_utf8_lossy(&detach.stderr);
    assert!(err.contains("attachments --prune"), "{err}");

    let pruned = w.json(&topo, &topo.router_ns, &["attachments", "--prune"]);
    let pruned = without_probe(pruned["pruned"].as_array().cloned().unwrap_or_default());
    assert_eq!(pruned.len(), 1, "{pruned:?}");
    assert!(w.attached(&topo, &topo.router_ns).is_empty());
}
