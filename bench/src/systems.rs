//! The systems under test, started in the topology's lb namespace with
//! equivalent configurations: a WebSocket reverse proxy on one address to
//! the same echo backends, the same worker count, timeouts for long-lived
//! connections, no access logs, and no health checks unless a scenario asks
//! for them ([`Spec::health_checks`]: each system then notices a dead
//! backend its usual way). Each is changed the way its operators change it.
//!
//! Where one process cannot hold the connections (20,000 open files per
//! process here; a proxied connection costs HAProxy and nginx two), the
//! system runs as several shards on the same listening address
//! (SO_REUSEPORT), the same number for every system.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use weir::l7::config::{ConfigBuilder, Timeout};
use weir_testbed::topology::{Topology, register_cleanup_command, unregister_cleanup_command};

use crate::procs;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Weir,
    Haproxy,
    Nginx,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Weir, Kind::Haproxy, Kind::Nginx];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Weir => "weir",
            Kind::Haproxy => "haproxy",
            Kind::Nginx => "nginx",
        }
    }
}

/// How a running system's backend set is changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// `weir backend set`: leavers drained with 1001 over the drain window.
    WeirCli,
    /// HAProxy Runtime API: `add server` + `enable server` for joiners;
    /// `set server state drain`, the drain window, `shutdown sessions` and
    /// `del server` for leavers (it refuses to delete a server with
    /// connections).
    HaproxyApi,
    /// Rewrite the configuration and reload (SIGUSR2 to HAProxy's master,
    /// SIGHUP to nginx's): old workers keep serving their connections.
    Reload,
}

impl Method {
    pub fn label(self, kind: Kind) -> String {
        match self {
            Method::WeirCli => kind.name().to_string(),
            Method::HaproxyApi => format!("{}-api", kind.name()),
            Method::Reload => format!("{}-reload", kind.name()),
        }
    }
}

/// What to start.
#[derive(Clone, Debug)]
pub struct Spec {
    pub kind: Kind,
    pub listen: SocketAddr,
    pub backends: Vec<SocketAddr>,
    /// Threads (weir, HAProxy) or worker processes (nginx) per shard.
    pub workers: usize,
    pub shards: usize,
    /// How long a leaving backend's connections get: weir's drain window,
    /// HAProxy's wait before `shutdown sessions`, and the old workers'
    /// limit after a reload (HAProxy `hard-stop-after`, nginx
    /// `worker_shutdown_timeout`); None: old workers stay as long as their
    /// connections do (both peers' default).
    pub drain_window: Option<Duration>,
    /// HAProxy in TCP mode (the L4 peer) instead of HTTP.
    pub tcp_mode: bool,
    /// weir's `max_connections` per process; None: its default. The peers'
    /// limits are their configurations' (HAProxy `maxconn`, nginx
    /// `worker_connections`).
    pub max_connections: Option<u64>,
    /// The scenario relays messages of up to 16 KiB: nginx gets
    /// `proxy_buffer_size 16k` (and a busy limit it accepts with it), the
    /// relay buffer weir and HAProxy have by
    /// default. nginx's own default, one page, reads and writes a 4 KiB
    /// message with its frame header in two pieces each way (and 16 KiB in
    /// five); kept elsewhere, as it is nginx's best case for idle memory.
    pub large_messages: bool,
    /// Each system watches its backends the way it usually does: weir runs
    /// `weir agent` with its defaults beside `weir run`; HAProxy checks
    /// every server (`check inter 1s fall 2 rise 2`, a TCP connect);
    /// nginx, which has no active checks in its open source build, marks
    /// a server failed after one error for 10 s (`max_fails=1
    /// fail_timeout=10s`, per worker process).
    pub health_checks: bool,
    /// weir's `--ring-size` for the service; None: its default (65,537
    /// slots, fair for 655 backends). A scenario that gives the service
    /// more backends sizes the ring for them.
    pub ring_size: Option<u32>,
}

/// What a system says of one backend's health, for those that say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthView {
    pub down: bool,
    /// Unix ms of the last transition, when the system records it (weir's
    /// registry does; HAProxy's `show servers state` counts whole seconds).
    pub since_unix_ms: Option<u64>,
}

/// A server as HAProxy and nginx configurations name it.
type Server = (String, SocketAddr);

/// A started system.
pub struct Running {
    pub spec: Spec,
    /// Root pid of each shard (weir run, HAProxy's master, nginx's master).
    pub roots: Vec<u32>,
    dir: PathBuf,
    /// weir: instance names, one per shard.
    instances: Vec<String>,
    weir: PathBuf,
    /// Servers currently configured, by name (HAProxy/nginx naming).
    servers: Vec<Server>,
    next_server: usize,
    /// Upgrades done so far ([`Running::upgrade`]).
    upgrades: usize,
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

impl Running {
    /// Starts `spec` in the lb namespace and waits until it accepts.
    pub fn start(topo: &mut Topology, spec: Spec, tag: &str) -> Result<Running> {
        let dir = std::env::temp_dir().join(format!(
            "weir-bench-{}-{tag}-{}",
            std::process::id(),
            spec.kind.name()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        register_cleanup_command(remove_dir(&dir));
        let servers: Vec<(String, SocketAddr)> = spec
            .backends
            .iter()
            .enumerate()
            .map(|(i, a)| (format!("s{i}"), *a))
            .collect();
        let mut r = Running {
            next_server: servers.len(),
            upgrades: 0,
            servers,
            spec,
            roots: Vec::new(),
            dir,
            instances: Vec::new(),
            weir: weir_testbed::workspace_bin("weir"),
        };
        let started = match r.spec.kind {
            Kind::Weir => r.start_weir(topo, tag),
            Kind::Haproxy => r.start_haproxy(topo),
            Kind::Nginx => r.start_nginx(topo),
        };
        // A loopback listener is reached from its own namespace.
        let from = if r.spec.listen.ip().is_loopback() {
            topo.lb_ns.clone()
        } else {
            topo.client_ns.clone()
        };
        let listening = started.and_then(|()| {
            if topo.wait_tcp(&from, r.spec.listen, Duration::from_secs(15)) {
                Ok(())
            } else {
                let logs = r.logs();
                bail!(
                    "{} did not start listening on {}: {logs}",
                    r.spec.kind.name(),
                    r.spec.listen,
                )
            }
        });
        if let Err(e) = listening {
            r.stop(topo);
            return Err(e);
        }
        // Every shard must be up: SO_REUSEPORT spreads new connections
        // over the listeners that exist.
        std::thread::sleep(Duration::from_millis(300));
        // A process beside the listeners (weir's agent) may have refused
        // its configuration.
        if let Some(pid) = r.roots.iter().copied().find(|p| !procs::running(*p)) {
            let (name, logs) = (r.spec.kind.name(), r.logs());
            r.stop(topo);
            bail!("{name} process {pid} exited: {logs}");
        }
        Ok(r)
    }

    /// The tail of every log the system wrote, for error messages.
    fn logs(&self) -> String {
        let mut out = String::new();
        if let Ok(dir) = std::fs::read_dir(&self.dir) {
            for e in dir.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "log")
                    && let Ok(text) = std::fs::read_to_string(&p)
                {
                    let tail: Vec<&str> = text.lines().rev().take(5).collect();
                    for l in tail.into_iter().rev() {
                        out += &format!(
                            "\n  {}: {l}",
                            p.file_name().unwrap_or_default().to_string_lossy()
                        );
                    }
                }
            }
        }
        if out.is_empty() {
            "no log output".into()
        } else {
            out
        }
    }

    /// weir: the instance of each shard, whose registry a scenario may read
    /// or feed besides the CLI; empty for the peers.
    pub fn instances(&self) -> &[String] {
        &self.instances
    }

    /// Every live process of the system, old reload workers included.
    pub fn pids(&self) -> Vec<u32> {
        procs::tree(&self.roots)
    }

    fn weir_cmd(&self, topo: &Topology, instance: &str, args: &[&str]) -> Result<()> {
        self.weir_out(topo, instance, args).map(drop)
    }

    /// Runs a `weir` command on `instance` and returns its stdout.
    fn weir_out(&self, topo: &Topology, instance: &str, args: &[&str]) -> Result<String> {
        let mut full = vec!["--instance", instance, "--flows", "65536"];
        full.extend_from_slice(args);
        let out = topo.run_ok_in(&topo.lb_ns, &self.weir, &full)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn start_weir(&mut self, topo: &mut Topology, tag: &str) -> Result<()> {
        let svc = self.spec.listen.to_string();
        for k in 0..self.spec.shards {
            let instance = format!("wb{}{tag}{k}", std::process::id());
            // A leftover of an interrupted run goes first.
            let destroy = destroy_argv(&self.weir, &instance);
            undo(&destroy);
            register_cleanup_command(destroy);
            self.instances.push(instance.clone());
            // Replacing the whole set is what the churn scenario does.
            let mut add = vec![
                "service".to_string(),
                "add".into(),
                svc.clone(),
                "--mode".into(),
                "l7".into(),
                "--max-remove-fraction".into(),
                "1".into(),
            ];
            if let Some(slots) = self.spec.ring_size {
                add.extend(["--ring-size".into(), slots.to_string()]);
            }
            let add: Vec<&str> = add.iter().map(String::as_str).collect();
            self.weir_cmd(topo, &instance, &add)?;
            let mut set = vec!["backend".to_string(), "set".into(), svc.clone()];
            set.extend(self.spec.backends.iter().map(|b| b.to_string()));
            let set: Vec<&str> = set.iter().map(String::as_str).collect();
            self.weir_cmd(topo, &instance, &set)?;
            let window = self.spec.drain_window.unwrap_or(Duration::from_secs(30));
            let config = self.dir.join(format!("weir-{k}.toml"));
            let mut file = ConfigBuilder::new();
            if let Some(n) = self.spec.max_connections {
                file = file.max_connections(n);
            }
            let file = file
                .instance(&instance)
                .workers(self.spec.workers as u64)
                .metrics(SocketAddr::from((Ipv4Addr::LOCALHOST, 19100 + k as u16)))
                .timeout(Timeout::Idle, Duration::from_secs(3600))
                .timeout(Timeout::Shutdown, Duration::from_secs(5))
                .drain_window(window)
                .listener(self.spec.listen)
                // Shards are separate instances on one address, on purpose.
                .shared(self.spec.shards > 1)
                .route("/", &svc);
            write(&config, &file.to_string())?;
            self.spawn_weir(topo, "run", &config, &format!("weir-{k}.log"), &[])?;
            if self.spec.health_checks {
                self.start_weir_agent(topo, &instance, k)?;
            }
        }
        Ok(())
    }

    /// Starts `weir SUBCOMMAND --config CONFIG [EXTRA...]`, its output in
    /// `log` in the system's directory, as one of its roots; returns its pid.
    fn spawn_weir(
        &mut self,
        topo: &mut Topology,
        subcommand: &str,
        config: &Path,
        log: &str,
        extra: &[&str],
    ) -> Result<u32> {
        let config = config.to_str().context("utf-8 path")?;
        let log = self.dir.join(log);
        let mut args = vec![subcommand, "--config", config];
        args.extend_from_slice(extra);
        let pid = spawn_logged(topo, &self.weir.clone(), &args, &log)?;
        self.roots.push(pid);
        Ok(pid)
    }

    /// `weir agent` for one shard's instance: its defaults, with the
    /// service's backends checked (a WebSocket upgrade, ping and close,
    /// what a client of the service needs).
    fn start_weir_agent(&mut self, topo: &mut Topology, instance: &str, k: usize) -> Result<()> {
        let config = self.dir.join(format!("agent-{k}.toml"));
        write(
            &config,
            &format!(
                "instance = \"{instance}\"\n\n[metrics]\nlisten = \"{metrics}\"\n\n\
                 [[check]]\nservice = \"{svc}\"\ntype = \"websocket\"\n",
                metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, 19200 + k as u16)),
                svc = self.spec.listen,
            ),
        )?;
        self.spawn_weir(topo, "agent", &config, &format!("agent-{k}.log"), &[])
            .map(drop)
    }

    fn haproxy_config(&self, k: usize) -> String {
        let mode = if self.spec.tcp_mode { "tcp" } else { "http" };
        let mut c = format!(
            "global\n    master-worker\n    nbthread {workers}\n    maxconn 9500\n\
             \x20   stats socket {sock} mode 600 level admin\n",
            workers = self.spec.workers,
            sock = self.dir.join(format!("haproxy-{k}.sock")).display(),
        );
        if let Some(w) = self.spec.drain_window {
            c += &format!("    hard-stop-after {}ms\n", w.as_millis());
        }
        c += &format!(
            "defaults\n    mode {mode}\n    maxconn 9500\n    timeout connect 3s\n\
             \x20   timeout client 1h\n    timeout server 1h\n    timeout tunnel 1h\n\
             \x20   timeout client-fin 5s\n    timeout http-request 10s\n\
             frontend fe\n    bind {listen}\n    default_backend be\n\
             backend be\n    balance roundrobin\n",
            listen = self.spec.listen,
        );
        let check = if self.spec.health_checks {
            " check inter 1s fall 2 rise 2"
        } else {
            ""
        };
        for (name, addr) in &self.servers {
            c += &format!("    server {name} {addr}{check}\n");
        }
        c
    }

    fn start_haproxy(&mut self, topo: &mut Topology) -> Result<()> {
        for k in 0..self.spec.shards {
            let cfg = self.dir.join(format!("haproxy-{k}.cfg"));
            write(&cfg, &self.haproxy_config(k))?;
            weir_testbed::topology::run_cmd(
                std::process::Command::new("haproxy")
                    .arg("-c")
                    .arg("-q")
                    .arg("-f")
                    .arg(&cfg),
            )
            .context("HAProxy refused its configuration")?;
            let log = self.dir.join(format!("haproxy-{k}.log"));
            let pid = spawn_logged(
                topo,
                Path::new("/usr/sbin/haproxy"),
                &["-W", "-db", "-f", cfg.to_str().context("utf-8 path")?],
                &log,
            )?;
            self.roots.push(pid);
        }
        Ok(())
    }

    fn nginx_config(&self) -> String {
        let dir = self.dir.display();
        let mut c = format!(
            "daemon off;\nmaster_process on;\nworker_processes {workers};\n\
             worker_rlimit_nofile 20000;\npid {dir}/nginx.pid;\n\
             error_log {dir}/nginx-error.log warn;\n",
            workers = self.spec.workers * self.spec.shards,
        );
        if let Some(w) = self.spec.drain_window {
            c += &format!("worker_shutdown_timeout {}ms;\n", w.as_millis());
        }
        c += &format!(
            "events {{\n    worker_connections 19000;\n}}\n\
             http {{\n    access_log off;\n\
             \x20   client_body_temp_path {dir}/body;\n    proxy_temp_path {dir}/proxy;\n\
             \x20   fastcgi_temp_path {dir}/fastcgi;\n    uwsgi_temp_path {dir}/uwsgi;\n\
             \x20   scgi_temp_path {dir}/scgi;\n\
             \x20   map $http_upgrade $connection_upgrade {{\n        default upgrade;\n        '' close;\n    }}\n\
             \x20   upstream be {{\n"
        );
        let fails = if self.spec.health_checks {
            " max_fails=1 fail_timeout=10s"
        } else {
            ""
        };
        for (_, addr) in &self.servers {
            c += &format!("        server {addr}{fails};\n");
        }
        c += &format!(
            "    }}\n    server {{\n        listen {listen} reuseport backlog=4096;\n\
             \x20       location / {{\n            proxy_pass http://be;\n\
             \x20           proxy_http_version 1.1;\n\
             \x20           proxy_set_header Upgrade $http_upgrade;\n\
             \x20           proxy_set_header Connection $connection_upgrade;\n\
             \x20           proxy_connect_timeout 3s;\n\
             \x20           proxy_read_timeout 1h;\n            proxy_send_timeout 1h;\n\
             {buffer}\
             \x20       }}\n    }}\n}}\n",
            listen = self.spec.listen,
            buffer = if self.spec.large_messages {
                "            proxy_buffer_size 16k;\n            proxy_busy_buffers_size 16k;\n"
            } else {
                ""
            },
        );
        c
    }

    fn start_nginx(&mut self, topo: &mut Topology) -> Result<()> {
        write(&self.dir.join("nginx.conf"), &self.nginx_config())?;
        // Tested where it runs: it binds the VIP, which only the lb
        // namespace has.
        self.nginx_cli(topo, &["-t", "-q"])
            .context("nginx refused its configuration")?;
        let log = self.dir.join("nginx.log");
        let files = self.nginx_files()?;
        let files: Vec<&str> = files.iter().map(String::as_str).collect();
        let pid = spawn_logged(topo, Path::new("/usr/sbin/nginx"), &files, &log)?;
        self.roots.push(pid);
        Ok(())
    }

    /// nginx's `-e ERROR_LOG -p PREFIX -c CONFIG`: this system's files.
    fn nginx_files(&self) -> Result<Vec<String>> {
        let path = |p: &Path| p.to_str().map(String::from).context("utf-8 path");
        Ok(vec![
            "-e".into(),
            path(&self.dir.join("nginx-error.log"))?,
            "-p".into(),
            path(&self.dir)?,
            "-c".into(),
            path(&self.dir.join("nginx.conf"))?,
        ])
    }

    /// `nginx ARGS` on this system's files, in the lb namespace.
    fn nginx_cli(&self, topo: &Topology, args: &[&str]) -> Result<()> {
        let files = self.nginx_files()?;
        let mut all = args.to_vec();
        all.extend(files.iter().map(String::as_str));
        topo.run_ok_in(&topo.lb_ns, "nginx", &all).map(drop)
    }

    /// Replaces the backend set with `new` using `method`; returns how long
    /// the change took to apply (for HAProxy's API, including the drain
    /// window it waits before cutting).
    pub fn set_backends(
        &mut self,
        topo: &Topology,
        new: &[SocketAddr],
        method: Method,
    ) -> Result<Duration> {
        let t0 = Instant::now();
        match (self.spec.kind, method) {
            (Kind::Weir, Method::WeirCli) => {
                let svc = self.spec.listen.to_string();
                let mut args = vec!["backend".to_string(), "set".into(), svc];
                args.extend(new.iter().map(|b| b.to_string()));
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                for inst in self.instances.clone() {
                    self.weir_cmd(topo, &inst, &args)?;
                }
            }
            (Kind::Haproxy, Method::HaproxyApi) => self.haproxy_api_set(new)?,
            (Kind::Haproxy, Method::Reload) => {
                self.rename_servers(new);
                for k in 0..self.spec.shards {
                    write(
                        &self.dir.join(format!("haproxy-{k}.cfg")),
                        &self.haproxy_config(k),
                    )?;
                }
                for &root in &self.roots {
                    signal(root, libc::SIGUSR2);
                }
            }
            (Kind::Nginx, Method::Reload) => {
                self.rename_servers(new);
                write(&self.dir.join("nginx.conf"), &self.nginx_config())?;
                for &root in &self.roots {
                    signal(root, libc::SIGHUP);
                }
            }
            (k, m) => bail!("{} cannot change backends by {m:?}", k.name()),
        }
        Ok(t0.elapsed())
    }

    /// Upgrades or reloads every shard the way its operators do it with the
    /// same configuration, and waits until the new generation serves:
    /// weir runs `weir upgrade` (which starts `weir run --takeover`, a new
    /// process of the same binary, and returns once it serves, saying what
    /// moved); HAProxy's master gets SIGUSR2 and
    /// re-executes itself, its new worker taking the listening sockets from
    /// the old one (`-x`), and this waits for its `Loading success.`; nginx
    /// gets `nginx -s reload` and this waits for a new set of workers. The
    /// old generation is left to end as it does. Returns what each shard's
    /// new generation said.
    pub fn upgrade(&mut self, topo: &mut Topology, limit: Duration) -> Result<Vec<String>> {
        self.upgrades += 1;
        let n = self.upgrades;
        let deadline = Instant::now() + limit;
        let mut said = Vec::new();
        match self.spec.kind {
            Kind::Weir => {
                for k in 0..self.spec.shards {
                    let config = self.dir.join(format!("weir-{k}.toml"));
                    let log = self.dir.join(format!("weir-{k}-upgrade-{n}.log"));
                    let config = config.to_str().context("utf-8 path")?;
                    // Its output and the new process's log lines go to
                    // `log`; the new process is in a session of its own.
                    let args = [
                        "--json",
                        "upgrade",
                        "--config",
                        config,
                        "--log-format",
                        "json",
                    ];
                    let pid = spawn_logged(topo, &self.weir.clone(), &args, &log)?;
                    let (to, message) = self.wait_upgrade(pid, &log, deadline)?;
                    undo(&group_kill(pid));
                    register_cleanup_command(group_kill(to));
                    self.roots.push(to);
                    said.push(message);
                }
            }
            Kind::Haproxy => {
                for (k, &root) in self.roots.clone().iter().enumerate() {
                    let log = self.dir.join(format!("haproxy-{k}.log"));
                    let loaded = || haproxy_loads(&log);
                    let before = (loaded(), procs::children(root));
                    signal(root, libc::SIGUSR2);
                    while loaded() <= before.0 {
                        ensure!(
                            Instant::now() < deadline,
                            "HAProxy shard {k} did not reload within {limit:?}: {}",
                            self.logs()
                        );
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    let new: Vec<String> = procs::children(root)
                        .into_iter()
                        .filter(|p| !before.1.contains(p))
                        .map(|p| procs::command_line(p).unwrap_or_else(|| p.to_string()))
                        .collect();
                    said.push(format!("new worker: {}", new.join("; ")));
                }
            }
            Kind::Nginx => {
                let root = self.roots[0];
                let before = procs::children(root);
                self.nginx_cli(topo, &["-s", "reload"])
                    .context("nginx -s reload")?;
                let want = self.spec.workers * self.spec.shards;
                loop {
                    let new: Vec<u32> = procs::children(root)
                        .into_iter()
                        .filter(|p| !before.contains(p))
                        .collect();
                    if new.len() >= want {
                        said.push(format!("{} new worker(s): {new:?}", new.len()));
                        break;
                    }
                    ensure!(
                        Instant::now() < deadline,
                        "nginx started {} of {want} new workers within {limit:?}: {}",
                        new.len(),
                        self.logs()
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        Ok(said)
    }

    /// Waits for `weir upgrade` (pid `pid`, writing to `log`) to answer:
    /// the new process's pid and what it said, or an error with the
    /// upgrade's refusal.
    fn wait_upgrade(&self, pid: u32, log: &Path, deadline: Instant) -> Result<(u32, String)> {
        loop {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let answer = text
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|v| v["ok"] == true);
            if let Some(a) = answer {
                let to = a["to"].as_u64().context("weir upgrade named no new pid")? as u32;
                let said = format!(
                    "pid {} -> {to}: {} moved, {} refused, {} left in the old process; handoff \
                     {} ms, longest stall {} ms",
                    a["from"],
                    a["moved"],
                    a["failed"],
                    a["left"],
                    a["handoff_ms"],
                    a["longest_stall_ms"]
                );
                return Ok((to, said));
            }
            ensure!(
                procs::running(pid),
                "weir upgrade (pid {pid}) failed: {}",
                self.logs()
            );
            ensure!(
                Instant::now() < deadline,
                "weir upgrade (pid {pid}) did not finish: {}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What the system itself says of `backend` now (the first shard's
    /// view): weir's registry, where its agent records health; HAProxy's
    /// server state. None where the system keeps no such state (nginx's
    /// failure counts live in each worker) or has none yet.
    pub fn health_of(&self, topo: &Topology, backend: SocketAddr) -> Result<Option<HealthView>> {
        match self.spec.kind {
            Kind::Weir => {
                let Some(instance) = self.instances.first() else {
                    return Ok(None);
                };
                let svc = self.spec.listen.to_string();
                let out = self.weir_out(topo, instance, &["--json", "backend", "list", &svc])?;
                weir_health(&out, backend)
            }
            Kind::Haproxy => {
                let sock = self.dir.join("haproxy-0.sock");
                haproxy_health(&haproxy_cmd(&sock, "show servers state be")?, backend).map(Some)
            }
            Kind::Nginx => Ok(None),
        }
    }

    /// The servers after a change: survivors keep their names, joiners
    /// get fresh ones.
    fn rename_servers(&mut self, new: &[SocketAddr]) -> (Vec<Server>, Vec<Server>) {
        let leaving: Vec<_> = self
            .servers
            .iter()
            .filter(|(_, a)| !new.contains(a))
            .cloned()
            .collect();
        let mut joining = Vec::new();
        for a in new {
            if !self.servers.iter().any(|(_, b)| b == a) {
                joining.push((format!("s{}", self.next_server), *a));
                self.next_server += 1;
            }
        }
        self.servers.retain(|(_, a)| new.contains(a));
        self.servers.extend(joining.iter().cloned());
        (joining, leaving)
    }

    fn haproxy_api_set(&mut self, new: &[SocketAddr]) -> Result<()> {
        let (joining, leaving) = self.rename_servers(new);
        for k in 0..self.spec.shards {
            let sock = self.dir.join(format!("haproxy-{k}.sock"));
            for (name, addr) in &joining {
                haproxy_cmd(&sock, &format!("add server be/{name} {addr}"))?;
                haproxy_cmd(&sock, &format!("enable server be/{name}"))?;
            }
            for (name, _) in &leaving {
                haproxy_cmd(&sock, &format!("set server be/{name} state drain"))?;
            }
        }
        if !leaving.is_empty()
            && let Some(w) = self.spec.drain_window
        {
            std::thread::sleep(w);
        }
        for k in 0..self.spec.shards {
            let sock = self.dir.join(format!("haproxy-{k}.sock"));
            for (name, _) in &leaving {
                haproxy_cmd(&sock, &format!("set server be/{name} state maint"))?;
                haproxy_cmd(&sock, &format!("shutdown sessions server be/{name}"))?;
                // Sessions end asynchronously; retry until it lets go.
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    let out = haproxy_cmd(&sock, &format!("del server be/{name}"))?;
                    if out.contains("Server deleted") {
                        break;
                    }
                    ensure!(
                        Instant::now() < deadline,
                        "HAProxy would not delete be/{name}: {out}"
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        Ok(())
    }

    /// Stops every process (SIGTERM, then SIGKILL), old workers included,
    /// and removes weir's instances.
    pub fn stop(self, topo: &mut Topology) {
        let all = self.pids();
        for &root in &self.roots {
            topo.stop_child(root, Duration::from_secs(3));
        }
        // Reload leftovers and workers are in the roots' process groups;
        // they die with their master, but make sure.
        for &root in &self.roots {
            undo(&group_kill(root));
        }
        for &p in &all {
            if std::path::Path::new(&format!("/proc/{p}")).exists() {
                signal(p, libc::SIGKILL);
            }
        }
        // A process `weir upgrade` started is nobody's child here: the
        // instance goes only once it is gone (it holds the daemon lock).
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && !all.iter().all(|&p| procs::gone(p)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        for inst in &self.instances {
            undo(&destroy_argv(&self.weir, inst));
        }
        undo(&remove_dir(&self.dir));
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on a pid this harness started.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Starts a long-running program in the lb namespace with its output in
/// `log`, tracked by the topology for cleanup.
fn spawn_logged(topo: &mut Topology, program: &Path, args: &[&str], log: &Path) -> Result<u32> {
    // The program's output goes to the log, through sh -c exec so the pid
    // stays the program's; setsid makes that pid a process group that
    // holds the workers too, so an interrupted run can end them all
    // (nginx's workers outlive a killed master).
    let mut line = format!(
        "exec setsid {} ",
        shell_quote(&program.display().to_string())
    );
    for a in args {
        line += &shell_quote(a);
        line.push(' ');
    }
    line += &format!("> {} 2>&1", shell_quote(&log.display().to_string()));
    let lb = topo.lb_ns.clone();
    let pid = topo.spawn_in(&lb, Path::new("/bin/sh"), &["-c", &line])?;
    register_cleanup_command(group_kill(pid));
    Ok(pid)
}

pub use weir_testbed::weir_cli::destroy_argv;

/// Runs a registered cleanup command now and forgets it.
pub fn undo(argv: &[String]) {
    let _ = std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .output();
    unregister_cleanup_command(argv);
}

/// `rm -rf DIR`, for the interrupt cleanup.
pub fn remove_dir(dir: &Path) -> Vec<String> {
    vec!["rm".into(), "-rf".into(), dir.display().to_string()]
}

/// `kill -KILL -- -PGID`: ends a system's whole process group.
fn group_kill(pid: u32) -> Vec<String> {
    ["kill", "-KILL", "--", &format!("-{pid}")]
        .map(String::from)
        .to_vec()
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// A backend's health in `weir backend list --json`; None when the
/// registry has no health (an instance no agent ever checked still says
/// `unknown`, which is not down).
fn weir_health(json: &str, backend: SocketAddr) -> Result<Option<HealthView>> {
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(json).context("parsing `weir backend list --json`")?;
    let want = backend.to_string();
    let row = rows
        .iter()
        .find(|r| r["backend"].as_str() == Some(want.as_str()))
        .with_context(|| format!("`weir backend list` has no {want}"))?;
    let Some(health) = row["health"].as_str() else {
        return Ok(None);
    };
    Ok(Some(HealthView {
        down: health == "unhealthy",
        since_unix_ms: row["health_since"].as_str().and_then(unix_ms_of_rfc3339),
    }))
}

/// A server's operational state in HAProxy's `show servers state`
/// (`srv_op_state` 0 is stopped: down).
fn haproxy_health(state: &str, backend: SocketAddr) -> Result<HealthView> {
    let names: Vec<&str> = state
        .lines()
        .find_map(|l| l.strip_prefix("# "))
        .context("`show servers state` has no header")?
        .split_whitespace()
        .collect();
    let column = |name: &str| {
        names
            .iter()
            .position(|n| *n == name)
            .with_context(|| format!("`show servers state` has no {name}"))
    };
    let (addr, port, op) = (
        column("srv_addr")?,
        column("srv_port")?,
        column("srv_op_state")?,
    );
    let (ip, port_s) = (backend.ip().to_string(), backend.port().to_string());
    let row = state
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(addr) == Some(&ip.as_str()) && f.get(port) == Some(&port_s.as_str()))
        .with_context(|| format!("HAProxy has no server {backend}"))?;
    Ok(HealthView {
        down: row.get(op) == Some(&"0"),
        since_unix_ms: None,
    })
}

/// Unix ms of an RFC 3339 UTC time (`2026-12-06T19:05:44Z`, optionally
/// with a fraction of a second), as weir prints times.
fn unix_ms_of_rfc3339(s: &str) -> Option<u64> {
    unix_us_of_rfc3339(s).map(|us| us / 1000)
}

/// Unix µs of an RFC 3339 UTC time, as [`unix_ms_of_rfc3339`] reads it:
/// the timestamps of weir's JSON log lines carry microseconds.
pub(crate) fn unix_us_of_rfc3339(s: &str) -> Option<u64> {
    let s = s.strip_suffix('Z').or_else(|| s.strip_suffix("+00:00"))?;
    let (date, time) = s.split_once('T')?;
    let num = |x: &str| x.parse::<i64>().ok();
    let mut d = date.splitn(3, '-');
    let (y, m, day) = (num(d.next()?)?, num(d.next()?)?, num(d.next()?)?);
    let mut t = time.splitn(3, ':');
    let (h, min, rest) = (num(t.next()?)?, num(t.next()?)?, t.next()?);
    let (sec, frac) = rest.split_once('.').unwrap_or((rest, ""));
    if !(1..=12).contains(&m)
        || !(1..=31).contains(&day)
        || !frac.bytes().all(|c| c.is_ascii_digit())
    {
        return None;
    }
    // Days since 1970-01-01 of a proleptic Gregorian date, counted in
    // 400-year eras that start on 1 March.
    let yy = if m <= 2 { y - 1 } else { y };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + day - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let us: i64 = format!("{frac:0<6}").get(..6)?.parse().ok()?;
    let total = ((days * 24 + h) * 60 + min) * 60 + num(sec)?;
    u64::try_from(total * 1_000_000 + us).ok()
}

/// Times HAProxy's master said `Loading success.` in its log: once at
/// start and once per reload that worked.
fn haproxy_loads(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .map(|t| t.matches("Loading success.").count())
        .unwrap_or(0)
}

/// One HAProxy Runtime API command; returns its answer.
pub fn haproxy_cmd(sock: &Path, cmd: &str) -> Result<String> {
    let mut s =
        UnixStream::connect(sock).with_context(|| format!("connecting to {}", sock.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("{cmd}\n").as_bytes())?;
    let mut out = String::new();
    for line in BufReader::new(s).lines() {
        let line = line?;
        out.push_str(&line);
        out.push('\n');
    }
    let out = out.trim().to_string();
    let lower = out.to_ascii_lowercase();
    if lower.contains("unknown") || lower.contains("error") || lower.contains("require") {
        bail!("HAProxy refused `{cmd}`: {out}");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_times_read_back_to_unix_ms() {
        for secs in [0, 951_782_400, 1_795_765_431, 4_107_542_399] {
            let text = weir::registry::audit::rfc3339(secs);
            assert_eq!(unix_ms_of_rfc3339(&text), Some(secs * 1000), "{text}");
        }
        assert_eq!(
            unix_ms_of_rfc3339("2026-11-27T07:43:51.25Z"),
            Some(1_795_765_431_250)
        );
        assert_eq!(
            unix_ms_of_rfc3339("2026-11-27T07:43:51.123456+00:00"),
            Some(1_795_765_431_123)
        );
        assert_eq!(
            unix_us_of_rfc3339("2026-11-27T07:43:51.123456Z"),
            Some(1_795_765_431_123_456)
        );
        assert_eq!(
            unix_us_of_rfc3339("2026-11-27T07:43:51.5Z"),
            Some(1_795_765_431_500_000)
        );
        for bad in [
            "2026-11-27 07:43:51Z",
            "2026-11-27T07:43:51",
            "2026-11-27T07:43:51+01:00",
            "2026-13-27T07:43:51Z",
            "2026-11-27T07:43:51.x1Z",
            "",
        ] {
            assert_eq!(unix_ms_of_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn weir_health_is_read_from_backend_list() {
        let b0: SocketAddr = "198.18.1.2:8080".parse().unwrap();
        let list = r#"[
            {"id": 1, "backend": "198.18.1.2:8080", "state": "active", "health": "unhealthy",
             "health_reason": "refused", "health_since": "2026-11-27T07:43:51.5Z"},
            {"id": 2, "backend": "198.18.1.3:8080", "state": "active", "health": "healthy",
             "health_reason": "passed", "health_since": "2026-11-27T07:40:00Z"}
        ]"#;
        assert_eq!(
            weir_health(list, b0).unwrap(),
            Some(HealthView {
                down: true,
                since_unix_ms: Some(1_795_765_431_500)
            })
        );
        let b1 = "198.18.1.3:8080".parse().unwrap();
        assert!(!weir_health(list, b1).unwrap().unwrap().down);
        // A registry without health says nothing; a missing backend is an
        // error.
        let plain = r#"[{"id": 1, "backend": "198.18.1.2:8080", "state": "active"}]"#;
        assert_eq!(weir_health(plain, b0).unwrap(), None);
        assert!(weir_health(plain, b1).is_err());
    }

    #[test]
    fn haproxy_health_is_the_servers_operational_state() {
        let state = "1\n\
            # be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight \
            srv_iweight srv_time_since_last_change srv_check_status srv_check_result \
            srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id \
            srv_fqdn srv_port\n\
            3 be 1 s0 198.18.1.2 0 0 1 1 4 7 1 0 6 0 0 0 - 8080\n\
            3 be 2 s1 198.18.1.3 2 0 1 1 90 6 3 4 6 0 0 0 - 8080\n";
        let down = haproxy_health(state, "198.18.1.2:8080".parse().unwrap()).unwrap();
        assert!(down.down);
        assert_eq!(down.since_unix_ms, None);
        let up = haproxy_health(state, "198.18.1.3:8080".parse().unwrap()).unwrap();
        assert!(!up.down);
        assert!(haproxy_health(state, "198.18.1.4:8080".parse().unwrap()).is_err());
        assert!(haproxy_health("1\n", "198.18.1.2:8080".parse().unwrap()).is_err());
    }
}
