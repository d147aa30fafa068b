//! The self-healing scenario, shared by the namespace tests of L4 and L7
//! services: `weir agent` checks four backends while clients connect; a
//! backend's server is killed and restarted, (L4) a backend loses its
//! decapsulation, three of four die (panic), and the agent itself is
//! killed with SIGKILL and started again.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use weir::l7::config::{ConfigBuilder, Timeout};

use crate::scenario::{L4Options, PORT, Stage, log, parse_report, start_long_lived, tempdir};
use crate::wsload::LoadReport;

/// Check interval the scenario's agent runs with, and its rise and fall.
pub const INTERVAL: Duration = Duration::from_millis(500);
pub const RISE: u32 = 2;
pub const FALL: u32 = 2;
/// The check timeout.
pub const TIMEOUT: Duration = Duration::from_millis(300);

/// What the scenario saw, phase by phase.
#[derive(Debug)]
pub struct HealthReport {
    /// Time from the kill of b3's server to `backend list` saying
    /// unhealthy, and b3's row then.
    pub detect: Duration,
    pub detected_row: Value,
    /// Clients that talked through the kill: per connection, backend and
    /// ending.
    pub long_lived: LoadReport,
    /// New clients while b3 is out.
    pub while_out: LoadReport,
    /// Time from the restart of b3's server to healthy again.
    pub recover: Duration,
    /// New clients after b3 returned.
    pub after_return: LoadReport,
    /// L4 only: b2 without decapsulation. Time to unhealthy, its row, and
    /// whether b2's own address answered meanwhile.
    pub decap: Option<(Duration, Value, bool)>,
    /// Three of four killed: the service row and the backend rows.
    pub panic_service: Value,
    pub panic_backends: Vec<Value>,
    /// `weir --json stats` in panic.
    pub panic_stats: Value,
    /// Backend rows right before the agent is killed and 3 s later (its
    /// dead backends restarted meanwhile).
    pub before_agent_kill: Vec<Value>,
    pub after_agent_kill: Vec<Value>,
    /// New clients while no agent runs.
    pub without_agent: LoadReport,
    /// Time the restarted agent took to mark all four healthy again, and
    /// the rows and service row then.
    pub converge: Duration,
    pub converged: Vec<Value>,
    pub converged_service: Value,
}

/// Runs the scenario for an L4 (XDP, tcp check through the tunnel) or an
/// L7 (`weir run`, WebSocket check) service.
pub fn run_health(opts: &L4Options, l7: bool) -> Result<HealthReport> {
    let start = Instant::now();
    let instance = format!("{}-{}", opts.instance, if l7 { "h7" } else { "h4" });
    let mut stage = Stage::new(&instance, opts)?;
    let lb_ns = stage.topo.lb_ns.clone();
    let vip = stage.topo.vip();
    let dir = tempdir(&instance)?;
    let backend =
        |stage: &Stage, i: usize| -> String { format!("{}:{PORT}", stage.topo.backend_addr(i)) };
    let service = if l7 {
        let service = format!("{vip}:8081");
        stage.topo.run_ok_in(
            &lb_ns,
            "ip",
            &["addr", "add", &format!("{vip}/32"), "dev", "lo"],
        )?;
        stage.lb(&["service", "add", &service, "--mode", "l7"])?;
        service
    } else {
        for i in 0..4 {
            stage.weir.decap_backend(&stage.topo, i)?;
        }
        let service = format!("{vip}:{PORT}");
        stage.lb(&["service", "add", &service])?;
        service
    };
    let all: Vec<String> = (0..4).map(|i| backend(&stage, i)).collect();
    let mut set = vec!["backend", "set", service.as_str()];
    set.extend(all.iter().map(String::as_str));
    stage.lb(&set)?;
    // weir run (L7) stops before the instance goes: it would write its
    // state file into the removed state directory again.
    let mut run = None;
    if l7 {
        let listen: SocketAddr = service.parse()?;
        let file = ConfigBuilder::new()
            .instance(&instance)
            .timeout(Timeout::Shutdown, Duration::from_secs(5))
            .listener(listen)
            .route("/", &service);
        let config = dir.join("weir.toml");
        std::fs::write(&config, file.to_string())?;
        run = Some(stage.spawn(&lb_ns, &["run", "--config", config.to_str().unwrap()])?);
        if !stage
            .topo
            .wait_tcp(&stage.topo.client_ns, listen, Duration::from_secs(10))
        {
            bail!("weir run did not come up on {service}");
        }
    }
    let agent_config = dir.join("agent.toml");
    std::fs::write(
        &agent_config,
        format!(
            "instance = \"{instance}\"\n\
             [metrics]\nlisten = \"127.0.0.1:9101\"\n\
             [[check]]\nservice = \"{service}\"\n{}\
             interval = \"{}ms\"\njitter = \"10%\"\ntimeout = \"{}ms\"\nrise = {RISE}\nfall = {FALL}\n",
            // A tcp check takes no path: the agent refuses one.
            if l7 {
                "type = \"websocket\"\npath = \"/\"\n"
            } else {
                "type = \"tcp\"\n"
            },
            INTERVAL.as_millis(),
            TIMEOUT.as_millis()
        ),
    )?;
    let agent_args = ["agent", "--config", agent_config.to_str().unwrap()];
    let mut agent = stage.spawn(&lb_ns, &agent_args)?;
    let rows = |stage: &Stage| -> Result<Vec<Value>> {
        let text = stage.lb(&["--json", "backend", "list", &service])?;
        Ok(serde_json::from_str::<Vec<Value>>(&text)?)
    };
    let row_of = |rows: &[Value], addr: &str| -> Value {
        rows.iter()
            .find(|r| r["backend"] == addr)
            .cloned()
            .unwrap_or(Value::Null)
    };
    // Waits until every listed backend has health `want`.
    let wait = |stage: &Stage, which: &[usize], want: &str, limit: Duration| -> Result<Duration> {
        let t = Instant::now();
        loop {
            let rows = rows(stage)?;
            if which
                .iter()
                .all(|i| row_of(&rows, &backend(stage, *i))["health"] == want)
            {
                return Ok(t.elapsed());
            }
            if t.elapsed() > limit {
                bail!(
                    "backends {which:?} not {want} after {limit:?}: {}",
                    serde_json::to_string(&rows)?
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let converge_limit = INTERVAL * (RISE + 4) + Duration::from_secs(2);
    wait(&stage, &[0, 1, 2, 3], "healthy", converge_limit).context("first checks")?;
    log(
        opts.verbose,
        start,
        &format!("weir agent checks {service}: b0-b3 healthy"),
    );

    let url = format!("ws://{service}/");
    let (long_lived, hold) = start_long_lived(&stage.topo, &stage.client, &url, opts, &dir, &[])?;
    std::thread::sleep(Duration::from_millis(500));
    stage.kill_echo(3);
    let limit = INTERVAL * (FALL + 1) + TIMEOUT + Duration::from_secs(2);
    let detect = wait(&stage, &[3], "unhealthy", limit).context("b3 killed")?;
    let detected_row = row_of(&rows(&stage)?, &backend(&stage, 3));
    log(
        opts.verbose,
        start,
        &format!("b3 killed: unhealthy after {detect:?}"),
    );
    let while_out = stage.new_clients(&url, opts, "clients while b3 is out")?;
    stage.restart_echo(3)?;
    let recover = wait(&stage, &[3], "healthy", converge_limit).context("b3 restarted")?;
    log(
        opts.verbose,
        start,
        &format!("b3 restarted: healthy after {recover:?}"),
    );
    let after_return = stage.new_clients(&url, opts, "clients after b3 returned")?;
    std::fs::write(&hold, b"done")?;
    let long_lived = parse_report(
        long_lived.wait_output(Duration::from_secs(60))?,
        "clients through the kill",
    )?;

    let decap = if l7 {
        None
    } else {
        let ns = stage.topo.backend_ns[2].clone();
        let dev = stage.topo.backend_dev(2);
        stage
            .weir
            .run(&stage.topo, &ns, &["decap", "detach", "--dev", &dev])?;
        let t = wait(&stage, &[2], "unhealthy", limit).context("b2 without decap")?;
        let row = row_of(&rows(&stage)?, &backend(&stage, 2));
        let direct: SocketAddr = backend(&stage, 2).parse()?;
        let answers = stage.topo.wait_tcp(&lb_ns, direct, Duration::from_secs(2));
        stage.weir.decap_backend(&stage.topo, 2)?;
        wait(&stage, &[2], "healthy", converge_limit).context("b2 decap back")?;
        log(
            opts.verbose,
            start,
            &format!("b2 decap detached: unhealthy after {t:?}; reattached: healthy"),
        );
        Some((t, row, answers))
    };

    for i in 1..4 {
        stage.kill_echo(i);
    }
    let service_row = |stage: &Stage| -> Result<Value> {
        let list: Vec<Value> = serde_json::from_str(&stage.lb(&["--json", "service", "list"])?)?;
        list.into_iter()
            .find(|s| s["service"] == service.as_str())
            .context("service listed")
    };
    let t = Instant::now();
    let panic_service = loop {
        let row = service_row(&stage)?;
        if row["panic"] == true {
            break row;
        }
        if t.elapsed() > limit * 2 {
            bail!("no panic after killing three of four: {row}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Let the last transitions land: the three are unhealthy.
    wait(&stage, &[1, 2, 3], "unhealthy", limit).context("three killed")?;
    let panic_backends = rows(&stage)?;
    let panic_stats = serde_json::from_str(&stage.lb(&["--json", "stats"])?)?;
    log(opts.verbose, start, "b1-b3 killed: the service panics");

    let before_agent_kill = rows(&stage)?;
    stage.topo.signal_child(agent, libc::SIGKILL);
    stage.topo.stop_child(agent, Duration::from_secs(5));
    for i in 1..4 {
        stage.restart_echo(i)?;
    }
    std::thread::sleep(INTERVAL * (RISE + 2));
    let after_agent_kill = rows(&stage)?;
    let without_agent = stage.new_clients(&url, opts, "clients without an agent")?;
    log(
        opts.verbose,
        start,
        "agent killed (SIGKILL), b1-b3 restarted: the registry stays as it was",
    );
    agent = stage.spawn(&lb_ns, &agent_args)?;
    let converge = wait(&stage, &[0, 1, 2, 3], "healthy", converge_limit).context("resume")?;
    let converged = rows(&stage)?;
    let converged_service = service_row(&stage)?;
    log(
        opts.verbose,
        start,
        &format!("agent started again: all healthy after {converge:?}"),
    );
    stage.topo.stop_child(agent, Duration::from_secs(5));
    if let Some(run) = run {
        stage.topo.stop_child(run, Duration::from_secs(10));
    }
    let _ = std::fs::remove_dir_all(&dir);
    stage.finish()?;
    Ok(HealthReport {
        detect,
        detected_row,
        long_lived,
        while_out,
        recover,
        after_return,
        decap,
        panic_service,
        panic_backends,
        panic_stats,
        before_agent_kill,
        after_agent_kill,
        without_agent,
        converge,
        converged,
        converged_service,
    })
}
