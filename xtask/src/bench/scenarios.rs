//! The measurements, each interleaving the setups: for every figure and round the
//! setups run back to back, and the order rotates from one run group to the next so that no
//! setup always goes first (or always right after another one's load).

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::process::Stdio;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use mesh_testbed::Process;
use serde_json::{Value, json};

use super::interrupted;
use super::procs::{self, Background, RssSampler};
use super::report::{Conn, IdleConns, LatencyCell, Measure, Results};
use super::setup::{Setup, Testbed};

/// One figure of the benchmark, to run alone (`--only`): a partial run, for profiling one kind
/// of traffic, whose report leaves the other figures out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Figure {
    /// Latency of keep-alive requests at fixed rates.
    KeepAlive,
    /// Latency of requests on a new connection each, at fixed rates.
    NewConnection,
    /// Max requests/s.
    Max,
    /// Bulk single-stream throughput.
    Bulk,
    /// New connections/s.
    ConnectRate,
    /// Memory of idle connections.
    Idle,
}

impl Figure {
    /// The name `--only` takes.
    pub fn name(self) -> String {
        use clap::ValueEnum;
        self.to_possible_value()
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default()
    }
}

/// How a run departs from the standard plan (`cargo xtask bench` flags).
#[derive(Clone, Debug, Default)]
pub struct Options {
    pub quick: bool,
    /// The agents run with `capture.loopback_redirect = true`.
    pub loopback_redirect: bool,
    /// Only this figure.
    pub only: Option<Figure>,
    /// Only this rate (requests/s) for the latency figures.
    pub rate: Option<u32>,
    /// Measured seconds per round of the timed figures (latency, max, new connections).
    pub seconds: Option<u64>,
}

/// What to measure and for how long.
pub struct Plan {
    pub quick: bool,
    pub only: Option<Figure>,
    pub rounds: usize,
    /// Bulk transfers are short (a fraction of a second direct), so they get more rounds.
    pub bulk_rounds: usize,
    pub rates: Vec<u32>,
    pub warmup: Duration,
    pub latency_duration: Duration,
    pub rate_connections: usize,
    pub max_duration: Duration,
    pub max_connections: usize,
    pub bulk_bytes: u64,
    pub connect_duration: Duration,
    pub connect_concurrency: usize,
    pub idle_count: usize,
}

impl Plan {
    pub fn new(options: &Options) -> Plan {
        let quick = options.quick;
        let timed = Duration::from_secs(options.seconds.unwrap_or(if quick { 3 } else { 5 }));
        Plan {
            quick,
            only: options.only,
            rounds: if quick { 1 } else { 3 },
            bulk_rounds: if quick { 3 } else { 5 },
            rates: options
                .rate
                .map_or_else(|| vec![500, 1000, 2000], |r| vec![r]),
            warmup: Duration::from_secs(1),
            latency_duration: timed,
            rate_connections: 32,
            max_duration: timed,
            max_connections: 16,
            bulk_bytes: if quick { 256 << 20 } else { 1 << 30 },
            connect_duration: timed,
            connect_concurrency: 8,
            idle_count: if quick { 1_000 } else { 10_000 },
        }
    }

    /// Whether `figure` is part of this run.
    pub fn includes(&self, figure: Figure) -> bool {
        self.only.is_none_or(|only| only == figure)
    }

    pub fn json(&self) -> Value {
        json!({
            "quick": self.quick,
            "only": self.only.map(Figure::name),
            "rounds": self.rounds,
            "bulk_rounds": self.bulk_rounds,
            "rates": self.rates,
            "warmup_s": self.warmup.as_secs_f64(),
            "latency_duration_s": self.latency_duration.as_secs_f64(),
            "rate_connections": self.rate_connections,
            "max_duration_s": self.max_duration.as_secs_f64(),
            "max_connections": self.max_connections,
            "bulk_bytes": self.bulk_bytes,
            "connect_duration_s": self.connect_duration.as_secs_f64(),
            "connect_concurrency": self.connect_concurrency,
            "idle_count": self.idle_count,
        })
    }

    /// One paragraph for the report.
    pub fn text(&self) -> String {
        let secs = |d: Duration| d.as_secs_f64();
        format!(
            "{rounds} round(s) per figure, setups interleaved (direct, mesh, stunnel and relay back to back, order rotating; \
             relay: two plain TCP relays without TLS, the floor). \
             Latency: {rates:?} requests/s open loop, {lat} s measured per round after {warm} s of warm-up, \
             keep-alive over a pool of {pool} connections or a new connection per request (at most {pool} in flight); \
             percentiles of all rounds merged. Max throughput: {maxc} keep-alive connections, closed loop, {maxd} s. \
             Bulk: one stream of {bulk} MiB to a sink, timed to its acknowledgement, {bulk_rounds} rounds. New connections: {cc} at once, \
             closed loop, {cd} s. Idle connections: {idle} opened through the proxies, each with one 16-byte echo, \
             RSS of the proxies before and with them open. CPU: utime + stime of the proxy processes across each run \
             (warm-up included) divided by the requests it carried.",
            rounds = self.rounds,
            rates = self.rates,
            lat = secs(self.latency_duration),
            warm = secs(self.warmup),
            pool = self.rate_connections,
            maxc = self.max_connections,
            maxd = secs(self.max_duration),
            bulk = self.bulk_bytes >> 20,
            bulk_rounds = self.bulk_rounds,
            cc = self.connect_concurrency,
            cd = secs(self.connect_duration),
            idle = self.idle_count,
        ) + &self
            .only
            .map(|f| {
                format!(
                    " Only the {} figure was measured (a partial run, for profiling).",
                    f.name()
                )
            })
            .unwrap_or_default()
    }

    /// Client runs in the whole benchmark (smoke tests and idle connections excluded).
    fn runs(&self) -> usize {
        let per_figure = |figure| match figure {
            Figure::KeepAlive | Figure::NewConnection => self.rates.len() * self.rounds,
            Figure::Max | Figure::ConnectRate => self.rounds,
            Figure::Bulk => self.bulk_rounds,
            Figure::Idle => 0,
        };
        let per_setup: usize = [
            Figure::KeepAlive,
            Figure::NewConnection,
            Figure::Max,
            Figure::Bulk,
            Figure::ConnectRate,
        ]
        .into_iter()
        .filter(|&f| self.includes(f))
        .map(per_figure)
        .sum();
        per_setup * Setup::ALL.len()
    }
}

pub struct Runner<'a> {
    bed: &'a mut Testbed,
    plan: &'a Plan,
    results: &'a mut Results,
    turn: usize,
    done: usize,
    started: Instant,
}

impl<'a> Runner<'a> {
    pub fn new(bed: &'a mut Testbed, plan: &'a Plan, results: &'a mut Results) -> Runner<'a> {
        Runner {
            bed,
            plan,
            results,
            turn: 0,
            done: 0,
            started: Instant::now(),
        }
    }

    /// Every figure, in an order that keeps each from disturbing the next: memory before any
    /// traffic, then latency (the most sensitive), throughput, and the idle connections last,
    /// since they leave the proxies' allocators holding memory.
    pub fn run_all(&mut self) -> Result<()> {
        self.results.nofile = Setup::ALL
            .iter()
            .flat_map(|&s| {
                self.bed
                    .proxy_pids(s)
                    .into_iter()
                    .enumerate()
                    .map(move |(i, pid)| {
                        (format!("{} {}", s.name(), i + 1), procs::nofile_limit(pid))
                    })
            })
            .collect();
        // Let start-up work (certificates, program attachment) finish before "idle".
        thread::sleep(Duration::from_secs(2));
        for setup in [Setup::Mesh, Setup::Stunnel] {
            let memory = self
                .bed
                .proxy_pids(setup)
                .iter()
                .map(|&pid| procs::memory(pid))
                .collect::<Result<Vec<_>>>()?;
            let rss = memory.iter().map(|m| m.rss_kib).collect();
            self.results.rss_idle_kib.insert(setup, rss);
            self.results.idle_memory.insert(setup, memory);
        }
        self.smoke()?;
        let plan = self.plan;
        for (conn, figure) in [
            (Conn::KeepAlive, Figure::KeepAlive),
            (Conn::NewConnection, Figure::NewConnection),
        ] {
            if plan.includes(figure) {
                for &rate in &plan.rates {
                    self.latency(conn, rate)?;
                }
            }
        }
        if plan.includes(Figure::Max) {
            self.max()?;
        }
        if plan.includes(Figure::Bulk) {
            self.bulk()?;
        }
        if plan.includes(Figure::ConnectRate) {
            self.connect_rate()?;
        }
        // Not the relays: they hold two copy buffers per connection from its start, which is
        // no floor for what an idle connection must cost.
        if plan.includes(Figure::Idle) {
            for setup in [Setup::Mesh, Setup::Stunnel] {
                self.idle(setup)?;
            }
        }
        Ok(())
    }

    /// The next order of the setups: each takes each position equally often.
    fn order(&mut self) -> [Setup; 4] {
        let order = rotation(self.turn);
        self.turn += 1;
        order
    }

    /// Every path carries a little of each kind of traffic without a single error, and the
    /// mesh pair's connections really go through both agents' tunnel: otherwise there is
    /// nothing to measure.
    fn smoke(&mut self) -> Result<()> {
        let streams = |bed: &Testbed| -> Result<Vec<f64>> {
            bed.agents
                .iter()
                .map(|a| a.metric_sum("mesh_tunnel_streams_opened_total", &[]))
                .collect()
        };
        let before = streams(self.bed)?;
        for setup in Setup::ALL {
            let pair = self.bed.pair(setup);
            let (http, sink, echo) = (pair.http, pair.sink, pair.echo);
            let checks: [Vec<String>; 3] = [
                args(&[
                    "rate",
                    "--target",
                    &http.to_string(),
                    "--rate",
                    "50",
                    "--duration",
                    "1s",
                    "--warmup",
                    "0s",
                ]),
                args(&[
                    "bulk",
                    "--target",
                    &sink.to_string(),
                    "--bytes",
                    &(8u64 << 20).to_string(),
                ]),
                args(&[
                    "connect-rate",
                    "--target",
                    &echo.to_string(),
                    "--duration",
                    "1s",
                    "--warmup",
                    "0s",
                    "--concurrency",
                    "2",
                ]),
            ];
            for check in checks {
                let report = self.client(setup, &check, Duration::from_secs(60))?;
                let errors = report["errors"].as_u64().unwrap_or(0)
                    + report["setup_errors"].as_u64().unwrap_or(0);
                ensure!(
                    errors == 0,
                    "smoke test `mesh-bench {}` through {} failed: {}",
                    check.join(" "),
                    setup.name(),
                    report["error_samples"]
                );
            }
            say(format!("smoke test through {}: ok", setup.name()));
        }
        let after = streams(self.bed)?;
        for (i, (b, a)) in before.iter().zip(&after).enumerate() {
            ensure!(
                a - b >= 3.0,
                "agent {} opened {} tunnel streams during the mesh smoke test: the mesh pair is not captured",
                i + 1,
                a - b
            );
        }
        Ok(())
    }

    fn latency(&mut self, conn: Conn, rate: u32) -> Result<()> {
        for _ in 0..self.plan.rounds {
            for setup in self.order() {
                let pair = self.bed.pair(setup);
                let mut a = args(&[
                    "rate",
                    "--target",
                    &pair.http.to_string(),
                    "--rate",
                    &rate.to_string(),
                    "--duration",
                    &secs(self.plan.latency_duration),
                    "--warmup",
                    &secs(self.plan.warmup),
                    "--connections",
                    &self.plan.rate_connections.to_string(),
                    "--histogram",
                ]);
                if conn == Conn::NewConnection {
                    a.push("--new-connection".into());
                }
                let label = format!("latency {} {rate} rps {}", conn.name(), setup.name());
                let timeout =
                    self.plan.latency_duration + self.plan.warmup + Duration::from_secs(60);
                let outcome = self.measured(setup, &label, &a, timeout)?;
                let cell: &mut LatencyCell =
                    self.results.latency.entry((conn, rate, setup)).or_default();
                match outcome {
                    Ok((report, cpu, rss_peak)) => {
                        cell.add_run(&report, &cpu);
                        say(format!(
                            "{label}: p50 {} p99 {} p99.9 {} µs, {} errors; p50 by second {}",
                            report["latency_us"]["p50"],
                            report["latency_us"]["p99"],
                            report["latency_us"]["p999"],
                            report["errors"],
                            p50_by_second(&report)
                        ));
                        if conn == Conn::KeepAlive && rate == 1000 && rss_peak > 0 {
                            let peak = self.results.rss_1000_kib.entry(setup).or_default();
                            *peak = (*peak).max(rss_peak);
                        }
                    }
                    Err(e) => cell.failures.push(e),
                }
            }
        }
        Ok(())
    }

    fn max(&mut self) -> Result<()> {
        for _ in 0..self.plan.rounds {
            for setup in self.order() {
                let pair = self.bed.pair(setup);
                let a = args(&[
                    "max",
                    "--target",
                    &pair.http.to_string(),
                    "--connections",
                    &self.plan.max_connections.to_string(),
                    "--duration",
                    &secs(self.plan.max_duration),
                    "--warmup",
                    &secs(self.plan.warmup),
                ]);
                let label = format!("max throughput {}", setup.name());
                let timeout = self.plan.max_duration + self.plan.warmup + Duration::from_secs(60);
                let outcome = self.measured(setup, &label, &a, timeout)?;
                let measure: &mut Measure = self.results.max_rps.entry(setup).or_default();
                match outcome {
                    Ok((report, cpu, rss_peak)) => {
                        let units = report["requests"].as_u64().unwrap_or(0)
                            + report["warmup_requests"].as_u64().unwrap_or(0);
                        measure.add(report["rps"].as_f64(), &report, &cpu, units);
                        say(format!(
                            "{label}: {} requests/s, {} errors",
                            report["rps"], report["errors"]
                        ));
                        if rss_peak > 0 {
                            let peak = self.results.rss_peak_kib.entry(setup).or_default();
                            *peak = (*peak).max(rss_peak);
                        }
                    }
                    Err(e) => measure.failures.push(e),
                }
            }
        }
        Ok(())
    }

    fn bulk(&mut self) -> Result<()> {
        for _ in 0..self.plan.bulk_rounds {
            for setup in self.order() {
                let pair = self.bed.pair(setup);
                let a = args(&[
                    "bulk",
                    "--target",
                    &pair.sink.to_string(),
                    "--bytes",
                    &self.plan.bulk_bytes.to_string(),
                ]);
                let label = format!("bulk {}", setup.name());
                let outcome = self.measured(setup, &label, &a, Duration::from_secs(300))?;
                let measure: &mut Measure = self.results.bulk.entry(setup).or_default();
                match outcome {
                    Ok((report, cpu, _)) => {
                        measure.add(report["mib_per_s"].as_f64(), &report, &cpu, 0);
                        say(format!(
                            "{label}: {:.0} MiB/s, {} errors",
                            report["mib_per_s"].as_f64().unwrap_or(f64::NAN),
                            report["errors"]
                        ));
                    }
                    Err(e) => measure.failures.push(e),
                }
            }
        }
        Ok(())
    }

    fn connect_rate(&mut self) -> Result<()> {
        for _ in 0..self.plan.rounds {
            for setup in self.order() {
                let pair = self.bed.pair(setup);
                let a = args(&[
                    "connect-rate",
                    "--target",
                    &pair.echo.to_string(),
                    "--duration",
                    &secs(self.plan.connect_duration),
                    "--warmup",
                    &secs(self.plan.warmup),
                    "--concurrency",
                    &self.plan.connect_concurrency.to_string(),
                ]);
                let label = format!("new connections {}", setup.name());
                let timeout =
                    self.plan.connect_duration + self.plan.warmup + Duration::from_secs(60);
                let outcome = self.measured(setup, &label, &a, timeout)?;
                let measure: &mut Measure = self.results.connect.entry(setup).or_default();
                match outcome {
                    Ok((report, cpu, _)) => {
                        let units = report["connections"].as_u64().unwrap_or(0)
                            + report["warmup_connections"].as_u64().unwrap_or(0);
                        measure.add(report["connections_per_s"].as_f64(), &report, &cpu, units);
                        say(format!(
                            "{label}: {} per second, {} errors",
                            report["connections_per_s"], report["errors"]
                        ));
                    }
                    Err(e) => measure.failures.push(e),
                }
            }
        }
        Ok(())
    }

    /// Opens the plan's idle connections through `setup`'s proxies and measures what they
    /// hold: RSS before and with them open (after a settling second), descriptors.
    fn idle(&mut self, setup: Setup) -> Result<()> {
        // A client-mode stunnel holds two descriptors per connection (accepted and dialled),
        // an agent one; stay within the proxies' descriptor limit, with room to spare.
        let per_connection = if setup == Setup::Stunnel { 2 } else { 1 };
        let room = (super::setup::proxy_nofile() as usize).saturating_sub(1024) / per_connection;
        let count = self.plan.idle_count.min(room);
        if count < self.plan.idle_count {
            say(format!(
                "idle connections through {}: {count} instead of {} (descriptor limit {})",
                setup.name(),
                self.plan.idle_count,
                super::setup::proxy_nofile()
            ));
        }
        let pids = self.bed.proxy_pids(setup);
        let mut idle = IdleConns {
            count,
            ..IdleConns::default()
        };
        thread::sleep(Duration::from_secs(1));
        idle.rss_before_each_kib = pids
            .iter()
            .map(|&p| procs::rss_kib(p))
            .collect::<Result<_>>()?;
        idle.rss_before_kib = idle.rss_before_each_kib.iter().sum();
        let target = self.bed.pair(setup).echo;
        let log = self.bed.dir().join(format!("idle-{}.log", setup.name()));
        let mut command = self.bed.pair(setup).client.command(&self.bed.bench_bin)?;
        command
            .args([
                "idle",
                "--target",
                &target.to_string(),
                "--count",
                &count.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(File::create(&log)?);
        let mut process = Process::spawn(&mut command)?;
        let stdin = process.child_mut().stdin.take().context("no stdin pipe")?;
        let stdout = process
            .child_mut()
            .stdout
            .take()
            .context("no stdout pipe")?;
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let open_timeout = Duration::from_secs(60) + Duration::from_millis(10) * count as u32;
        say(format!(
            "idle connections through {}: opening {count}",
            setup.name()
        ));
        let opened = wait_line(&mut process, &rx, open_timeout)?;
        match opened {
            Some(line) => {
                let open: Value =
                    serde_json::from_str(&line).with_context(|| format!("not JSON: {line}"))?;
                idle.open = open["open"].as_u64().unwrap_or(0);
                idle.errors = open["errors"].as_u64().unwrap_or(0);
                idle.open_seconds = open["seconds"].as_f64().unwrap_or(0.0);
                thread::sleep(Duration::from_secs(2));
                idle.rss_after_each_kib = pids
                    .iter()
                    .map(|&p| procs::rss_kib(p))
                    .collect::<Result<_>>()?;
                idle.rss_after_kib = idle.rss_after_each_kib.iter().sum();
                idle.fds = pids.iter().map(|pid| fd_count(*pid)).collect();
                // End of input: the client checks every connection once more and reports.
                drop(stdin);
                match wait_line(&mut process, &rx, Duration::from_secs(120))? {
                    Some(line) => {
                        let end: Value = serde_json::from_str(&line)
                            .with_context(|| format!("not JSON: {line}"))?;
                        idle.alive_at_end = end["alive_at_end"].as_u64().unwrap_or(0);
                        for sample in end["error_samples"].as_array().into_iter().flatten() {
                            idle.error_samples.push(sample.to_string());
                        }
                        for sample in end["dead_samples"].as_array().into_iter().flatten() {
                            idle.error_samples.push(format!("at the end: {sample}"));
                        }
                        self.results.runs.push(
                            json!({"scenario": "idle", "setup": setup.name(), "report": end}),
                        );
                    }
                    None => idle.failure = Some(format!("no final report; see {}", log.display())),
                }
            }
            None => {
                idle.failure = Some(format!(
                    "the idle client did not report its connections open: {}",
                    std::fs::read_to_string(&log).unwrap_or_default().trim()
                ))
            }
        }
        say(format!(
            "idle connections through {}: {} open, RSS {:.1} -> {:.1} MiB, {:.0} bytes per connection",
            setup.name(),
            idle.open,
            idle.rss_before_kib as f64 / 1024.0,
            idle.rss_after_kib as f64 / 1024.0,
            idle.bytes_per_connection().unwrap_or(f64::NAN)
        ));
        self.results.idle.insert(setup, idle);
        let _ = process.wait_timeout(Duration::from_secs(10));
        self.bed.check_alive()
    }

    /// Runs one measured client: the proxies' CPU time around it and their peak RSS during
    /// it. `Ok(Err(reason))` when the run itself failed (recorded, the benchmark goes on);
    /// `Err` when the benchmark must stop (interrupted, a proxy died).
    #[allow(clippy::type_complexity)]
    fn measured(
        &mut self,
        setup: Setup,
        label: &str,
        a: &[String],
        timeout: Duration,
    ) -> Result<Result<(Value, Vec<f64>, u64), String>> {
        self.done += 1;
        let pids = self.bed.proxy_pids(setup);
        let cpu_before: Vec<f64> = pids
            .iter()
            .map(|&p| procs::cpu_seconds(p))
            .collect::<Result<_>>()?;
        let sampler = RssSampler::start(pids.clone());
        let background = Background::start(&self.bed.cgroup()?)?;
        let outcome = self.client(setup, a, timeout);
        let interference = background.finish()?;
        let rss_peak = sampler.finish();
        self.results.background_vcpu.push(interference.other_load);
        self.results.steal_vcpu.push(interference.steal);
        self.bed.check_alive()?;
        let cpu: Vec<f64> = pids
            .iter()
            .zip(&cpu_before)
            .map(|(&p, before)| Ok(procs::cpu_seconds(p)? - before))
            .collect::<Result<_>>()?;
        let elapsed = self.started.elapsed().as_secs_f64();
        let total = self.plan.runs();
        print!("[{}/{total} {elapsed:.0}s] ", self.done);
        match outcome {
            Ok(report) => {
                let mut raw = report.clone();
                if let Some(obj) = raw.as_object_mut() {
                    obj.remove("latency_histogram");
                }
                self.results.runs.push(json!({
                    "scenario": label, "setup": setup.name(), "proxy_cpu_s": cpu,
                    "background_vcpu": interference.other_load,
                    "steal_vcpu": interference.steal, "report": raw,
                }));
                Ok(Ok((report, cpu, rss_peak)))
            }
            Err(e) => {
                if interrupted() {
                    return Err(e);
                }
                let reason = format!("{label}: {e:#}");
                say(format!("FAILED {reason}"));
                self.results.failures.push(reason.clone());
                Ok(Err(reason))
            }
        }
    }

    /// `mesh-bench ARGS` in the setup's client task; its JSON report.
    fn client(&self, setup: Setup, a: &[String], timeout: Duration) -> Result<Value> {
        let pair = self.bed.pair(setup);
        let mut command = pair.client.command(&self.bed.bench_bin)?;
        command
            .args(a)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut process = Process::spawn(&mut command)?;
        let stdout = drain(process.child_mut().stdout.take());
        let stderr = drain(process.child_mut().stderr.take());
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = process.try_wait()? {
                break status;
            }
            if interrupted() {
                bail!("interrupted");
            }
            if Instant::now() >= deadline {
                bail!(
                    "`mesh-bench {}` still running after {timeout:?}; killed",
                    a.join(" ")
                );
            }
            thread::sleep(Duration::from_millis(20));
        };
        let stdout = String::from_utf8_lossy(&stdout.join().unwrap_or_default()).into_owned();
        let stderr = String::from_utf8_lossy(&stderr.join().unwrap_or_default()).into_owned();
        if !status.success() {
            bail!(
                "`mesh-bench {}` failed ({status}): {}",
                a.join(" "),
                stderr.trim()
            );
        }
        let last = stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or_default();
        serde_json::from_str(last)
            .with_context(|| format!("`mesh-bench {}` printed no JSON: {stdout}", a.join(" ")))
    }
}

/// The setups in the order of turn `turn`: rotated by one place per turn, so each comes
/// first (and follows each other) equally often.
fn rotation(turn: usize) -> [Setup; 4] {
    let mut order = Setup::ALL;
    order.rotate_left(turn % Setup::ALL.len());
    order
}

/// Waits for the next stdout line of `process`; `None` if it exits first. Fails when
/// interrupted or after `timeout`.
fn wait_line(
    process: &mut Process,
    lines: &mpsc::Receiver<String>,
    timeout: Duration,
) -> Result<Option<String>> {
    let deadline = Instant::now() + timeout;
    loop {
        match lines.recv_timeout(Duration::from_millis(50)) {
            Ok(line) if line.trim_start().starts_with('{') => return Ok(Some(line)),
            Ok(_) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(None),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if interrupted() {
            bail!("interrupted");
        }
        if Instant::now() >= deadline {
            let _ = process.signal(libc::SIGKILL);
            bail!("no report from the idle client within {timeout:?}");
        }
    }
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        buf
    })
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

fn secs(d: Duration) -> String {
    format!("{}s", d.as_secs_f64())
}

fn say(message: impl std::fmt::Display) {
    println!("bench: {message}");
}

/// The per-second p50s of a `rate` report, e.g. `410 / 415 / 690` (µs).
fn p50_by_second(report: &Value) -> String {
    let p50s: Vec<String> = report["latency_by_second_us"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|second| match second[0].as_f64() {
            Some(us) => format!("{us:.0}"),
            None => "-".into(),
        })
        .collect();
    p50s.join(" / ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_puts_each_setup_in_each_position() {
        let n = Setup::ALL.len();
        for position in 0..n {
            let mut at: Vec<Setup> = (0..n).map(|turn| rotation(turn)[position]).collect();
            at.sort();
            assert_eq!(at, Setup::ALL.to_vec(), "position {position}");
        }
    }

    #[test]
    fn quick_plan_is_smaller() {
        let quick = Plan::new(&Options {
            quick: true,
            ..Options::default()
        });
        let full = Plan::new(&Options::default());
        assert!(quick.runs() < full.runs());
        // Latency (3 rates, two kinds of connection), max, new connections: 3 rounds
        // each; bulk: 5 rounds; every figure for each of the four setups.
        assert_eq!(full.runs(), ((3 * 2 + 2) * 3 + 5) * 4);
        assert_eq!(full.bulk_bytes, 1 << 30);
        assert_eq!(full.idle_count, 10_000);
        assert!(full.text().contains("3 round(s)"));
        assert!(!full.text().contains("Only"));
    }

    #[test]
    fn a_partial_plan_runs_one_figure_at_one_rate_for_as_long_as_asked() {
        let plan = Plan::new(&Options {
            quick: true,
            only: Some(Figure::KeepAlive),
            rate: Some(1000),
            seconds: Some(20),
            ..Options::default()
        });
        assert!(plan.includes(Figure::KeepAlive));
        assert!(!plan.includes(Figure::Bulk) && !plan.includes(Figure::Idle));
        assert_eq!(plan.rates, vec![1000]);
        assert_eq!(plan.latency_duration, Duration::from_secs(20));
        // One round of one rate for each of the four setups.
        assert_eq!(plan.runs(), 4);
        assert!(plan.text().contains("Only the keep-alive figure"));
    }
}
