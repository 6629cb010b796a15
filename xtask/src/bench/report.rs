//! The results of one benchmark run: merged figures, the machine they were taken on, and
//! their rendering as a Markdown report and as JSON (target/bench/results.{md,json}).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::procs::Memory;
use super::setup::{Setup, TLS_GROUP, TLS13_SUITE, TlsSeen};

/// Keep-alive connections or a new connection per request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Conn {
    KeepAlive,
    NewConnection,
}

impl Conn {
    pub fn name(self) -> &'static str {
        match self {
            Conn::KeepAlive => "keep-alive",
            Conn::NewConnection => "new connection",
        }
    }
}

/// Percentiles reported for latency, with their labels.
pub const PERCENTILES: [(f64, &str); 4] = [
    (0.50, "p50"),
    (0.90, "p90"),
    (0.99, "p99"),
    (0.999, "p99.9"),
];

/// What the relay columns are, under the latency table.
const RELAY_NOTE: &str = "The relay column is two plain TCP relays (`mesh-bench relay`) in the places of the two stunnels: \
no TLS, no framing, one thread with an event loop that accepts, dials onward and copies both ways. They hand each \
request and response from process to process as any pair of proxies must and do nothing else, so what they add to \
direct is the floor under any proxy pair's added latency on this machine (the wake-ups), and what the mesh adds \
beyond them is the cost of its own work (TLS, HTTP/2, capture, policy, metrics).";

/// Send lag beyond which requests are taken to have waited for a free connection of the
/// generator's pool rather than for the generator's own wake-up.
const QUEUED_LAG_US: f64 = 1000.0;

/// One latency figure (connection mode, rate, setup), merged over its rounds.
#[derive(Default)]
pub struct LatencyCell {
    /// Highest equivalent value (ns) -> count, from every round's histogram.
    pub buckets: BTreeMap<u64, u64>,
    pub requests: u64,
    /// Requests including the warm-ups: what the proxies' CPU time was spent on.
    pub all_requests: u64,
    pub errors: u64,
    pub error_samples: Vec<String>,
    /// CPU seconds per proxy process over the rounds (empty for direct).
    pub proxy_cpu_s: Vec<f64>,
    /// How late the generator sent, worst round: its own wake-up latency while the path
    /// keeps up, queueing for a free connection when it does not.
    pub send_lag_p50_us: f64,
    pub send_lag_p99_us: f64,
    pub rounds: usize,
    /// Rounds that could not run at all.
    pub failures: Vec<String>,
    /// Each round's `[p50, p99, requests]` per second of its measured window, so a path
    /// that slows down under steady load can be told from one that is uniformly slow.
    pub by_second: Vec<Value>,
}

impl LatencyCell {
    pub fn add_run(&mut self, report: &Value, proxy_cpu_s: &[f64]) {
        self.rounds += 1;
        for bucket in report["latency_histogram"].as_array().into_iter().flatten() {
            if let (Some(value), Some(count)) = (bucket[0].as_u64(), bucket[1].as_u64()) {
                *self.buckets.entry(value).or_default() += count;
            }
        }
        let requests = report["requests"].as_u64().unwrap_or(0);
        self.requests += requests;
        self.all_requests += requests + report["warmup_requests"].as_u64().unwrap_or(0);
        add_errors(&mut self.errors, &mut self.error_samples, report);
        add_cpu(&mut self.proxy_cpu_s, proxy_cpu_s);
        let lag = |q: &str| report["send_lag_us"][q].as_f64().unwrap_or(0.0);
        self.send_lag_p50_us = self.send_lag_p50_us.max(lag("p50"));
        self.send_lag_p99_us = self.send_lag_p99_us.max(lag("p99"));
        self.by_second.push(report["latency_by_second_us"].clone());
    }

    /// The latency at quantile `q`, microseconds.
    pub fn percentile_us(&self, q: f64) -> Option<f64> {
        percentile_ns(&self.buckets, q).map(|ns| ns as f64 / 1000.0)
    }

    /// True when most requests waited for a free connection (send lag p50 over 1 ms in some
    /// round): the path could not carry the rate, and latency grows with the run's length.
    pub fn saturated(&self) -> bool {
        self.send_lag_p50_us > QUEUED_LAG_US
    }

    /// True when some requests (over 1%) waited for a free connection although the path
    /// carried the rate: it stalled for at least pool size / rate at some point.
    pub fn stalled(&self) -> bool {
        !self.saturated() && self.send_lag_p99_us > QUEUED_LAG_US
    }

    /// Proxy CPU seconds per 1,000 requests (= vCPU at 1,000 requests/s), all processes.
    pub fn cpu_per_1000(&self) -> Option<f64> {
        per_1000(&self.proxy_cpu_s, self.all_requests)
    }
}

/// Mean and worst of per-run figures (background load, steal), vCPU.
fn mean_and_worst(per_run: &[f64]) -> Option<(f64, f64)> {
    (!per_run.is_empty()).then(|| {
        (
            per_run.iter().sum::<f64>() / per_run.len() as f64,
            per_run.iter().cloned().fold(0.0, f64::max),
        )
    })
}

/// The value at quantile `q` of a merged histogram: the smallest bucket whose cumulative
/// count reaches `ceil(q * total)`.
pub fn percentile_ns(buckets: &BTreeMap<u64, u64>, q: f64) -> Option<u64> {
    let total: u64 = buckets.values().sum();
    if total == 0 {
        return None;
    }
    let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
    let mut seen = 0;
    for (&value, &count) in buckets {
        seen += count;
        if seen >= rank {
            return Some(value);
        }
    }
    buckets.keys().next_back().copied()
}

/// A figure taken once per round (max requests/s, bulk MiB/s, connections/s); the report
/// gives the median round.
#[derive(Default)]
pub struct Measure {
    pub values: Vec<f64>,
    pub errors: u64,
    pub error_samples: Vec<String>,
    pub failures: Vec<String>,
    pub proxy_cpu_s: Vec<f64>,
    /// Requests or connections the CPU time was spent on.
    pub units: u64,
}

impl Measure {
    pub fn add(&mut self, value: Option<f64>, report: &Value, proxy_cpu_s: &[f64], units: u64) {
        if let Some(v) = value {
            self.values.push(v);
        }
        add_errors(&mut self.errors, &mut self.error_samples, report);
        add_cpu(&mut self.proxy_cpu_s, proxy_cpu_s);
        self.units += units;
    }

    pub fn median(&self) -> Option<f64> {
        let mut v = self.values.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        match v.len() {
            0 => None,
            n if n % 2 == 1 => Some(v[n / 2]),
            n => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
        }
    }

    pub fn cpu_per_1000(&self) -> Option<f64> {
        per_1000(&self.proxy_cpu_s, self.units)
    }
}

fn add_errors(errors: &mut u64, samples: &mut Vec<String>, report: &Value) {
    *errors +=
        report["errors"].as_u64().unwrap_or(0) + report["setup_errors"].as_u64().unwrap_or(0);
    for sample in report["error_samples"].as_array().into_iter().flatten() {
        if samples.len() < 5 {
            samples.push(sample.as_str().unwrap_or_default().to_string());
        }
    }
}

fn add_cpu(total: &mut Vec<f64>, run: &[f64]) {
    if total.len() < run.len() {
        total.resize(run.len(), 0.0);
    }
    for (t, r) in total.iter_mut().zip(run) {
        *t += r;
    }
}

fn per_1000(cpu: &[f64], units: u64) -> Option<f64> {
    (!cpu.is_empty() && units > 0).then(|| cpu.iter().sum::<f64>() / units as f64 * 1000.0)
}

/// N idle connections held through a setup's proxies.
#[derive(Default)]
pub struct IdleConns {
    pub count: usize,
    pub open: u64,
    pub errors: u64,
    pub error_samples: Vec<String>,
    pub open_seconds: f64,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    /// The same per proxy process (agent on node1 or client-side stunnel first).
    pub rss_before_each_kib: Vec<u64>,
    pub rss_after_each_kib: Vec<u64>,
    pub alive_at_end: u64,
    /// Open descriptors per proxy process while the connections were held.
    pub fds: Vec<usize>,
    pub failure: Option<String>,
}

impl IdleConns {
    /// (RSS with the connections open - RSS before) / connections, bytes.
    pub fn bytes_per_connection(&self) -> Option<f64> {
        (self.open > 0 && self.failure.is_none()).then(|| {
            (self.rss_after_kib as f64 - self.rss_before_kib as f64) * 1024.0 / self.open as f64
        })
    }
}

/// Where and on what the figures were taken.
#[derive(Default)]
pub struct Machine {
    pub date: String,
    pub cpu_model: String,
    pub nproc: usize,
    pub kernel: String,
    pub memory: String,
    pub commit: String,
    pub stunnel: String,
    pub load_before: String,
    pub load_after: String,
}

impl Machine {
    pub fn read(root: &Path) -> Machine {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kib: u64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        let git = |args: &[&str]| {
            output(Command::new("git").current_dir(root).args(args)).unwrap_or_default()
        };
        // Which tracked files differ from the commit, so a reader can tell whether the
        // agent measured is the commit's.
        let changed: Vec<String> = git(&["diff", "--name-only", "HEAD"])
            .lines()
            .map(str::to_string)
            .collect();
        let dirty = match changed.len() {
            0 => String::new(),
            n if n <= 8 => format!(" with uncommitted changes to {}", changed.join(", ")),
            n => format!(
                " with uncommitted changes to {} and {} more files",
                changed[..8].join(", "),
                n - 8
            ),
        };
        let stunnel = Command::new("stunnel4")
            .arg("-version")
            .output()
            .ok()
            .and_then(|o| {
                let text = String::from_utf8_lossy(&o.stderr).into_owned();
                text.lines()
                    .find(|l| l.starts_with("stunnel "))
                    .map(str::to_string)
            })
            .unwrap_or_else(|| "unknown".into());
        Machine {
            date: output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
                .unwrap_or_else(|| "unknown".into()),
            cpu_model: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
                .unwrap_or_else(|| "unknown".into()),
            nproc: cpuinfo
                .lines()
                .filter(|l| l.starts_with("processor"))
                .count(),
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            memory: format!("{:.1} GiB", mem_kib as f64 / 1024.0 / 1024.0),
            commit: format!("{}{dirty}", git(&["rev-parse", "--short", "HEAD"])),
            stunnel,
            load_before: loadavg(),
            load_after: String::new(),
        }
    }
}

/// The 1, 5 and 15 minute load averages.
pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn output(command: &mut Command) -> Option<String> {
    let out = command.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A throughput row: label, the figure per setup, how to print a value.
type Row<'a> = (
    String,
    &'a BTreeMap<Setup, Measure>,
    fn(Option<f64>) -> String,
);

/// Everything one run measured.
pub struct Results {
    pub command: String,
    pub machine: Machine,
    /// The plan's parameters, for the report's method line and the JSON.
    pub plan: Value,
    pub plan_text: String,
    pub tls: TlsSeen,
    /// `(process name, RLIMIT_NOFILE soft/hard)` of each proxy.
    pub nofile: Vec<(String, String)>,
    pub latency: BTreeMap<(Conn, u32, Setup), LatencyCell>,
    pub max_rps: BTreeMap<Setup, Measure>,
    pub bulk: BTreeMap<Setup, Measure>,
    pub connect: BTreeMap<Setup, Measure>,
    /// RSS per proxy process before any traffic, KiB.
    pub rss_idle_kib: BTreeMap<Setup, Vec<u64>>,
    /// The same split into anonymous and file-backed memory, with thread counts.
    pub idle_memory: BTreeMap<Setup, Vec<Memory>>,
    /// Peak summed RSS of a setup's proxies during its 1,000 requests/s keep-alive runs.
    pub rss_1000_kib: BTreeMap<Setup, u64>,
    /// Peak summed RSS during the max-throughput runs.
    pub rss_peak_kib: BTreeMap<Setup, u64>,
    pub idle: BTreeMap<Setup, IdleConns>,
    /// Every client run's own report (histograms left out).
    pub runs: Vec<Value>,
    /// Runs that could not happen, and why the benchmark stopped early if it did.
    pub failures: Vec<String>,
    /// vCPUs the rest of the machine used during each measured run.
    pub background_vcpu: Vec<f64>,
    /// Per measured run: vCPU time the hypervisor took (steal), on average.
    pub steal_vcpu: Vec<f64>,
    pub took: Duration,
}

impl Results {
    pub fn new(command: String, machine: Machine, plan: Value, plan_text: String) -> Results {
        Results {
            command,
            machine,
            plan,
            plan_text,
            tls: TlsSeen::default(),
            nofile: Vec::new(),
            latency: BTreeMap::new(),
            max_rps: BTreeMap::new(),
            bulk: BTreeMap::new(),
            connect: BTreeMap::new(),
            rss_idle_kib: BTreeMap::new(),
            idle_memory: BTreeMap::new(),
            rss_1000_kib: BTreeMap::new(),
            rss_peak_kib: BTreeMap::new(),
            idle: BTreeMap::new(),
            runs: Vec::new(),
            failures: Vec::new(),
            background_vcpu: Vec::new(),
            steal_vcpu: Vec::new(),
            took: Duration::ZERO,
        }
    }

    /// Writes results.md and results.json into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let md = dir.join("results.md");
        fs::write(&md, self.markdown()).with_context(|| format!("write {}", md.display()))?;
        let js = dir.join("results.json");
        let text = serde_json::to_string_pretty(&self.json())?;
        fs::write(&js, text + "\n").with_context(|| format!("write {}", js.display()))?;
        Ok(())
    }

    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let m = &self.machine;
        let _ = writeln!(md, "# mesh-agent benchmark, {}\n", m.date);
        let _ = writeln!(
            md,
            "Command: `{}` ({:.0} s). Commit {}.\n",
            self.command,
            self.took.as_secs_f64(),
            m.commit
        );
        let _ = writeln!(
            md,
            "Machine: {} vCPU ({}), {} memory, Linux {}; load average {} before, {} after. {}.\n",
            m.nproc, m.cpu_model, m.memory, m.kernel, m.load_before, m.load_after, m.stunnel
        );
        let _ = writeln!(md, "Method: {}\n", self.plan_text);
        if let Some((mean, worst)) = mean_and_worst(&self.background_vcpu) {
            let _ = writeln!(
                md,
                "Other load on the machine (CPU used outside the benchmark's processes during the measured runs): \
                 {mean:.2} vCPU on average, {worst:.2} vCPU in the worst run.\n"
            );
        }
        if let Some((mean, worst)) = mean_and_worst(&self.steal_vcpu) {
            let _ = writeln!(
                md,
                "Steal (time the hypervisor gave this VM's vCPUs to others while they had work; it delays wake-ups \
                 and makes runs at different times disagree): {mean:.3} vCPU on average, {worst:.3} vCPU in the worst run.\n"
            );
        }
        let _ = writeln!(
            md,
            "TLS: both pairs are held to TLS 1.3, {TLS13_SUITE}, {TLS_GROUP}, ECDSA P-256 certificates from the same issuer, \
             client certificates required. Probes (`openssl s_client`): mesh tunnel listener: {}; stunnel: {}.\n",
            self.tls.mesh, self.tls.stunnel
        );
        if !self.nofile.is_empty() {
            let limits: Vec<String> = self
                .nofile
                .iter()
                .map(|(p, l)| format!("{p} {l}"))
                .collect();
            let _ = writeln!(
                md,
                "Descriptor limits (soft/hard) of the proxies: {}.\n",
                limits.join(", ")
            );
        }
        self.latency_table(&mut md);
        self.throughput_table(&mut md);
        self.cost_table(&mut md);
        self.targets_table(&mut md);
        self.problems(&mut md);
        md
    }

    /// Requests, transfers and connections that failed, over every figure.
    pub fn error_count(&self) -> u64 {
        let latency: u64 = self.latency.values().map(|c| c.errors).sum();
        let measures: u64 = [&self.max_rps, &self.bulk, &self.connect]
            .iter()
            .flat_map(|m| m.values())
            .map(|m| m.errors)
            .sum();
        let idle: u64 = self
            .idle
            .values()
            .map(|i| i.errors + i.open.saturating_sub(i.alive_at_end))
            .sum();
        latency + measures + idle
    }

    fn latency_table(&self, md: &mut String) {
        let _ = writeln!(
            md,
            "## Latency, µs (HTTP/1.1, 1 KiB request and response, open loop, from the intended send time)\n"
        );
        let _ = writeln!(
            md,
            "| connections | rate/s | | direct | mesh | stunnel | relay | mesh − direct | stunnel − direct | relay − direct | mesh / direct | stunnel / direct | mesh / stunnel |"
        );
        let _ = writeln!(md, "|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
        let mut keys: Vec<(Conn, u32)> = self.latency.keys().map(|(c, r, _)| (*c, *r)).collect();
        keys.dedup();
        for (conn, rate) in keys {
            let cell = |s: Setup| self.latency.get(&(conn, rate, s));
            for (q, label) in PERCENTILES {
                let v = |s: Setup| cell(s).and_then(|c| c.percentile_us(q));
                let (d, mesh, st) = (v(Setup::Direct), v(Setup::Mesh), v(Setup::Stunnel));
                let relay = v(Setup::Relay);
                let _ = writeln!(
                    md,
                    "| {} | {} | {label} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    conn.name(),
                    thousands(rate as f64),
                    us(d),
                    us(mesh),
                    us(st),
                    us(relay),
                    delta(mesh, d),
                    delta(st, d),
                    delta(relay, d),
                    ratio(mesh, d),
                    ratio(st, d),
                    ratio(mesh, st),
                );
            }
        }
        let direct: Vec<&LatencyCell> = self
            .latency
            .iter()
            .filter(|((_, _, s), _)| *s == Setup::Direct)
            .map(|(_, c)| c)
            .collect();
        let lag50 = direct.iter().map(|c| c.send_lag_p50_us).fold(0.0, f64::max);
        let lag99 = direct.iter().map(|c| c.send_lag_p99_us).fold(0.0, f64::max);
        let _ = writeln!(
            md,
            "\nThe generator's own wake-up lateness (actual minus intended send time in the direct runs, worst round): \
             p50 {lag50:.0} µs, p99 {lag99:.0} µs. It is part of every column, direct included, so it cancels in the differences."
        );
        let _ = writeln!(md, "\n{RELAY_NOTE}");
        let list = |pick: fn(&LatencyCell) -> bool| -> Vec<String> {
            self.latency
                .iter()
                .filter(|(_, c)| pick(c))
                .map(|((conn, rate, setup), c)| {
                    format!(
                        "{} at {} rps {} (send lag p50 {:.1} ms, p99 {:.1} ms in the worst round)",
                        setup.name(),
                        thousands(*rate as f64),
                        conn.name(),
                        c.send_lag_p50_us / 1000.0,
                        c.send_lag_p99_us / 1000.0
                    )
                })
                .collect()
        };
        let saturated = list(LatencyCell::saturated);
        if !saturated.is_empty() {
            let _ = writeln!(
                md,
                "\nCould not keep up with the rate (every connection of the pool busy, so requests queued in the generator \
                 and their latency, counted from the intended send time, grows with the length of the run; not a \
                 latency, a sign of saturation): {}.",
                saturated.join("; ")
            );
        }
        let stalled = list(LatencyCell::stalled);
        if !stalled.is_empty() {
            let _ = writeln!(
                md,
                "\nStalled at times (more than 1% of the requests waited over 1 ms for a free connection, so every one of \
                 the pool's connections was held up at once; the tail percentiles show it): {}.",
                stalled.join("; ")
            );
        }
        md.push('\n');
    }

    fn throughput_table(&self, md: &mut String) {
        let _ = writeln!(md, "## Throughput (median of the rounds)\n");
        let _ = writeln!(
            md,
            "| figure | direct | mesh | stunnel | relay | mesh / direct | stunnel / direct | relay / direct | mesh / stunnel |"
        );
        let _ = writeln!(md, "|---|--:|--:|--:|--:|--:|--:|--:|--:|");
        let plan = &self.plan;
        let rows: [Row; 3] = [
            (
                format!(
                    "max requests/s ({} keep-alive connections, closed loop)",
                    plan["max_connections"]
                ),
                &self.max_rps,
                |v| v.map(thousands).unwrap_or_else(|| "–".into()),
            ),
            (
                format!(
                    "bulk, one stream, MiB/s ({})",
                    bytes(plan["bulk_bytes"].as_u64().unwrap_or(0))
                ),
                &self.bulk,
                |v| v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "–".into()),
            ),
            (
                format!(
                    "new connections/s ({} at once, connect + 32-byte echo + close)",
                    plan["connect_concurrency"]
                ),
                &self.connect,
                |v| v.map(thousands).unwrap_or_else(|| "–".into()),
            ),
        ];
        for (label, map, fmt) in rows {
            let v = |s: Setup| map.get(&s).and_then(Measure::median);
            let (d, mesh, st) = (v(Setup::Direct), v(Setup::Mesh), v(Setup::Stunnel));
            let relay = v(Setup::Relay);
            let _ = writeln!(
                md,
                "| {label} | {} | {} | {} | {} | {} | {} | {} | {} |",
                fmt(d),
                fmt(mesh),
                fmt(st),
                fmt(relay),
                ratio(mesh, d),
                ratio(st, d),
                ratio(relay, d),
                ratio(mesh, st)
            );
        }
        md.push('\n');
    }

    fn cost_table(&self, md: &mut String) {
        let _ = writeln!(
            md,
            "## Proxy cost (both proxies of a pair together: two agents, two stunnels or two relays)\n"
        );
        let _ = writeln!(md, "| figure | mesh | stunnel | relay | mesh / stunnel |");
        let _ = writeln!(md, "|---|--:|--:|--:|--:|");
        // `v` gives the figure of a setup; the relay's is "–" where it was not measured.
        let row = |md: &mut String,
                   label: &str,
                   v: &dyn Fn(Setup) -> Option<f64>,
                   fmt: &dyn Fn(f64) -> String| {
            let f = |v: Option<f64>| v.map(fmt).unwrap_or_else(|| "–".into());
            let (m, s) = (v(Setup::Mesh), v(Setup::Stunnel));
            let _ = writeln!(
                md,
                "| {label} | {} | {} | {} | {} |",
                f(m),
                f(s),
                f(v(Setup::Relay)),
                ratio(m, s)
            );
        };
        let cpu = |v: f64| format!("{v:.4}");
        let mut keys: Vec<(Conn, u32)> = self.latency.keys().map(|(c, r, _)| (*c, *r)).collect();
        keys.dedup();
        for (conn, rate) in keys {
            let get = |s: Setup| {
                self.latency
                    .get(&(conn, rate, s))
                    .and_then(LatencyCell::cpu_per_1000)
            };
            let label = format!(
                "CPU-seconds per 1,000 requests, {} at {} rps",
                conn.name(),
                thousands(rate as f64)
            );
            row(md, &label, &get, &cpu);
        }
        let get =
            |map: &BTreeMap<Setup, Measure>, s: Setup| map.get(&s).and_then(Measure::cpu_per_1000);
        row(
            md,
            "CPU-seconds per 1,000 requests, max throughput",
            &|s| get(&self.max_rps, s),
            &cpu,
        );
        row(
            md,
            "CPU-seconds per 1,000 new connections",
            &|s| get(&self.connect, s),
            &cpu,
        );
        let mib = |v: f64| format!("{:.1}", v / 1024.0);
        let idle = |s: Setup| {
            self.rss_idle_kib
                .get(&s)
                .map(|v| v.iter().sum::<u64>() as f64)
        };
        row(md, "RSS idle, MiB", &idle, &mib);
        let each = |s: Setup| {
            self.rss_idle_kib
                .get(&s)
                .map(|v| {
                    v.iter()
                        .map(|k| format!("{:.1}", *k as f64 / 1024.0))
                        .collect::<Vec<_>>()
                        .join(" + ")
                })
                .unwrap_or_else(|| "–".into())
        };
        let _ = writeln!(
            md,
            "| RSS idle per process, MiB | {} | {} | – | |",
            each(Setup::Mesh),
            each(Setup::Stunnel)
        );
        let split = |s: Setup| {
            self.idle_memory
                .get(&s)
                .map(|v| {
                    v.iter()
                        .map(|m| {
                            format!(
                                "{:.1} + {:.1} ({} threads)",
                                m.anon_kib as f64 / 1024.0,
                                m.file_kib as f64 / 1024.0,
                                m.threads
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("; ")
                })
                .unwrap_or_else(|| "–".into())
        };
        let _ = writeln!(
            md,
            "| RSS idle per process: anonymous + file-backed, MiB | {} | {} | – | |",
            split(Setup::Mesh),
            split(Setup::Stunnel)
        );
        let peak = |map: &BTreeMap<Setup, u64>, s: Setup| map.get(&s).map(|v| *v as f64);
        row(
            md,
            "RSS at 1,000 rps keep-alive (peak), MiB",
            &|s| peak(&self.rss_1000_kib, s),
            &mib,
        );
        row(
            md,
            "RSS at max throughput (peak), MiB",
            &|s| peak(&self.rss_peak_kib, s),
            &mib,
        );
        let idle_each = |s: Setup| {
            self.idle
                .get(&s)
                .map(|i| {
                    let each: Vec<String> = i
                        .rss_before_each_kib
                        .iter()
                        .zip(&i.rss_after_each_kib)
                        .map(|(b, a)| {
                            format!("{:.1} → {:.1}", *b as f64 / 1024.0, *a as f64 / 1024.0)
                        })
                        .collect();
                    format!("{} conns: {}", thousands(i.count as f64), each.join(", "))
                })
                .unwrap_or_else(|| "–".into())
        };
        let _ = writeln!(
            md,
            "| idle connections, RSS per process before → with them open, MiB | {} | {} | – | |",
            idle_each(Setup::Mesh),
            idle_each(Setup::Stunnel)
        );
        let per_conn = |s: Setup| self.idle.get(&s).and_then(IdleConns::bytes_per_connection);
        row(
            md,
            "bytes per idle connection (RSS delta / connections)",
            &per_conn,
            &|v| thousands(v),
        );
        md.push('\n');
    }

    /// Issue #6's targets, checked against this run.
    fn targets_table(&self, md: &mut String) {
        let _ = writeln!(md, "## Issue #6 targets\n");
        let _ = writeln!(md, "| target | this run | relay pair (floor) | met |");
        let _ = writeln!(md, "|---|--:|--:|---|");
        let cell = |s: Setup| self.latency.get(&(Conn::KeepAlive, 1000, s));
        let p = |s: Setup, q: f64| cell(s).and_then(|c| c.percentile_us(q));
        // `floor`: the relay pair's figure for the same target, where it was measured.
        let check = |md: &mut String,
                     target: &str,
                     value: Option<f64>,
                     floor: Option<f64>,
                     unit: &str,
                     limit: f64,
                     at_least: bool| {
            let (shown, met) = match value {
                Some(v) => {
                    let met = if at_least { v >= limit } else { v <= limit };
                    let by = if met {
                        String::new()
                    } else if at_least {
                        format!(", short by {}", fmt_num(limit - v, unit))
                    } else {
                        format!(", over by {}", fmt_num(v - limit, unit))
                    };
                    (
                        fmt_num(v, unit),
                        format!("{}{by}", if met { "yes" } else { "no" }),
                    )
                }
                None => ("–".into(), "not measured".into()),
            };
            let floor = floor.map_or_else(|| "–".into(), |f| fmt_num(f, unit));
            let _ = writeln!(md, "| {target} | {shown} | {floor} | {met} |");
        };
        // The mesh's path holds the direct path and more, so a mesh percentile below direct's is
        // the baseline's own noise (a stalled direct round), not a latency the mesh took away:
        // such a run can neither meet nor miss the target.
        let added_check = |md: &mut String, target: &str, (q, label): (f64, &str), limit: f64| {
            let floor = p(Setup::Relay, q)
                .zip(p(Setup::Direct, q))
                .map(|(r, d)| r - d);
            match (p(Setup::Mesh, q), p(Setup::Direct, q)) {
                (Some(mesh), Some(direct)) if mesh < direct => {
                    let _ = writeln!(
                        md,
                        "| {target} | {} | {} | inconclusive: direct's own {label} ({direct:.0} µs) is above the mesh's ({mesh:.0} µs), so the baseline's tail sets this figure |",
                        fmt_num(mesh - direct, "µs"),
                        floor.map_or_else(|| "–".into(), |f| fmt_num(f, "µs")),
                    );
                }
                (mesh, direct) => check(
                    md,
                    target,
                    mesh.zip(direct).map(|(m, d)| m - d),
                    floor,
                    "µs",
                    limit,
                    false,
                ),
            }
        };
        added_check(
            md,
            "added latency p50, 1,000 rps keep-alive ≤ 60 µs",
            PERCENTILES[0],
            60.0,
        );
        added_check(
            md,
            "added latency p99, 1,000 rps keep-alive ≤ 150 µs",
            PERCENTILES[2],
            150.0,
        );
        let below: Vec<String> = PERCENTILES
            .iter()
            .filter_map(|(q, label)| {
                let (m, s) = (p(Setup::Mesh, *q)?, p(Setup::Stunnel, *q)?);
                (m >= s).then(|| format!("{label} ({m:.0} ≥ {s:.0} µs)"))
            })
            .collect();
        let complete = PERCENTILES
            .iter()
            .all(|(q, _)| p(Setup::Mesh, *q).is_some() && p(Setup::Stunnel, *q).is_some());
        let _ = writeln!(
            md,
            "| mesh below stunnel at every percentile, 1,000 rps keep-alive | {} | – | {} |",
            if below.is_empty() {
                "all lower".to_string()
            } else {
                below.join(", ")
            },
            match (complete, below.is_empty()) {
                (false, _) => "not measured",
                (true, true) => "yes",
                (true, false) => "no",
            }
        );
        let share = |map: &BTreeMap<Setup, Measure>, s: Setup| {
            Some(map.get(&s)?.median()? / map.get(&Setup::Direct)?.median()? * 100.0)
        };
        check(
            md,
            "bulk throughput ≥ 50% of direct",
            share(&self.bulk, Setup::Mesh),
            share(&self.bulk, Setup::Relay),
            "%",
            50.0,
            true,
        );
        check(
            md,
            "new connections/s ≥ 50% of direct",
            share(&self.connect, Setup::Mesh),
            share(&self.connect, Setup::Relay),
            "%",
            50.0,
            true,
        );
        // The busier of a pair's processes, CPU-seconds per 1,000 requests.
        let busier = |s: Setup| {
            cell(s).and_then(|c| {
                let worst = c
                    .proxy_cpu_s
                    .iter()
                    .cloned()
                    .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))?;
                (c.all_requests > 0).then(|| worst / c.all_requests as f64 * 1000.0)
            })
        };
        check(
            md,
            "CPU per agent ≤ 0.03 vCPU per 1,000 rps (busier agent)",
            busier(Setup::Mesh),
            busier(Setup::Relay),
            "vCPU",
            0.03,
            false,
        );
        let both = |s: Setup| cell(s).and_then(LatencyCell::cpu_per_1000);
        check(
            md,
            "CPU of both agents ≤ 0.06 vCPU per 1,000 rps",
            both(Setup::Mesh),
            both(Setup::Relay),
            "vCPU",
            0.06,
            false,
        );
        let idle_rss = self
            .rss_idle_kib
            .get(&Setup::Mesh)
            .and_then(|v| v.iter().max())
            .map(|k| *k as f64 * 1024.0 / 1e6);
        check(
            md,
            "RSS idle ≤ 10 MB per agent (largest agent)",
            idle_rss,
            None,
            "MB",
            10.0,
            false,
        );
        let per_conn = self
            .idle
            .get(&Setup::Mesh)
            .and_then(IdleConns::bytes_per_connection)
            .map(|b| b / 1024.0);
        check(
            md,
            "≤ 16 KiB per idle connection (both agents)",
            per_conn,
            None,
            "KiB",
            16.0,
            false,
        );
        let _ = writeln!(
            md,
            "\nRelay pair (floor): the same figure for the two plain relays of the latency table in this run, where \
             it applies. A target beyond it asks of the mesh less than two processes that only pass bytes on achieve \
             here; the mesh's distance from the floor is what its own work costs."
        );
        md.push('\n');
    }

    fn problems(&self, md: &mut String) {
        let mut lines = Vec::new();
        for ((conn, rate, setup), cell) in &self.latency {
            if cell.errors > 0 || !cell.failures.is_empty() {
                lines.push(format!(
                    "latency {} {} rps {}: {} errors of {} requests {:?} {:?}",
                    conn.name(),
                    rate,
                    setup.name(),
                    cell.errors,
                    cell.requests + cell.errors,
                    cell.error_samples,
                    cell.failures
                ));
            }
        }
        for (name, map) in [
            ("max", &self.max_rps),
            ("bulk", &self.bulk),
            ("connect", &self.connect),
        ] {
            for (setup, m) in map {
                if m.errors > 0 || !m.failures.is_empty() {
                    lines.push(format!(
                        "{name} {}: {} errors {:?} {:?}",
                        setup.name(),
                        m.errors,
                        m.error_samples,
                        m.failures
                    ));
                }
            }
        }
        for (setup, idle) in &self.idle {
            if idle.errors > 0 || idle.failure.is_some() || idle.alive_at_end < idle.open {
                lines.push(format!(
                    "idle connections {}: {} of {} opened, {} alive at the end, {} errors {:?} {:?}",
                    setup.name(),
                    idle.open,
                    idle.count,
                    idle.alive_at_end,
                    idle.errors,
                    idle.error_samples,
                    idle.failure
                ));
            }
        }
        lines.extend(self.failures.iter().cloned());
        let _ = writeln!(md, "## Errors\n");
        if lines.is_empty() {
            let _ = writeln!(
                md,
                "None: every request, transfer and connection of every run succeeded."
            );
        } else {
            for line in lines {
                let _ = writeln!(md, "- {line}");
            }
        }
    }

    pub fn json(&self) -> Value {
        let m = &self.machine;
        let latency: Vec<Value> = self
            .latency
            .iter()
            .map(|((conn, rate, setup), c)| {
                let mut percentiles = serde_json::Map::new();
                for (q, label) in PERCENTILES {
                    percentiles.insert(label.to_string(), json!(c.percentile_us(q)));
                }
                percentiles.insert(
                    "max".into(),
                    json!(percentile_ns(&c.buckets, 1.0).map(|n| n as f64 / 1000.0)),
                );
                json!({
                    "connections": conn.name(), "rate": rate, "setup": setup.name(),
                    "latency_us": percentiles, "requests": c.requests, "errors": c.errors,
                    "error_samples": c.error_samples, "failures": c.failures, "rounds": c.rounds,
                    "proxy_cpu_s": c.proxy_cpu_s, "requests_including_warmup": c.all_requests,
                    "proxy_cpu_s_per_1000_requests": c.cpu_per_1000(),
                    "send_lag_p50_us": c.send_lag_p50_us, "send_lag_p99_us": c.send_lag_p99_us,
                    "saturated": c.saturated(), "stalled": c.stalled(),
                    "p50_p99_requests_by_second_us": c.by_second,
                })
            })
            .collect();
        let measure =
            |map: &BTreeMap<Setup, Measure>| -> Value {
                map.iter()
                .map(|(s, m)| {
                    (s.name().to_string(), json!({
                        "median": m.median(), "rounds": m.values, "errors": m.errors,
                        "error_samples": m.error_samples, "failures": m.failures,
                        "proxy_cpu_s": m.proxy_cpu_s, "proxy_cpu_s_per_1000": m.cpu_per_1000(),
                    }))
                })
                .collect::<serde_json::Map<_, _>>()
                .into()
            };
        let by_setup = |map: &BTreeMap<Setup, u64>| -> Value {
            map.iter()
                .map(|(s, v)| (s.name().to_string(), json!(v)))
                .collect::<serde_json::Map<_, _>>()
                .into()
        };
        json!({
            "command": self.command,
            "took_s": self.took.as_secs_f64(),
            "machine": {
                "date": m.date, "cpu_model": m.cpu_model, "nproc": m.nproc, "kernel": m.kernel,
                "memory": m.memory, "commit": m.commit, "stunnel": m.stunnel,
                "load_before": m.load_before, "load_after": m.load_after,
            },
            "plan": self.plan,
            "tls": {"mesh": self.tls.mesh, "stunnel": self.tls.stunnel, "configured": format!("TLSv1.3 {TLS13_SUITE} {TLS_GROUP}")},
            "proxy_nofile": self.nofile.iter().map(|(p, l)| json!({"process": p, "limit": l})).collect::<Vec<_>>(),
            "latency": latency,
            "max_rps": measure(&self.max_rps),
            "bulk_mib_per_s": measure(&self.bulk),
            "connections_per_s": measure(&self.connect),
            "idle_memory": self.idle_memory.iter().map(|(s, v)| (s.name().to_string(), json!(v.iter().map(|m| json!({
                "rss_kib": m.rss_kib, "anon_kib": m.anon_kib, "file_kib": m.file_kib, "threads": m.threads,
            })).collect::<Vec<_>>()))).collect::<serde_json::Map<_, _>>(),
            "rss_idle_kib": self.rss_idle_kib.iter().map(|(s, v)| (s.name().to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "rss_1000rps_peak_kib": by_setup(&self.rss_1000_kib),
            "rss_max_throughput_peak_kib": by_setup(&self.rss_peak_kib),
            "idle_connections": self.idle.iter().map(|(s, i)| (s.name().to_string(), json!({
                "count": i.count, "open": i.open, "errors": i.errors, "error_samples": i.error_samples,
                "open_seconds": i.open_seconds, "rss_before_kib": i.rss_before_kib, "rss_after_kib": i.rss_after_kib,
                "rss_before_each_kib": i.rss_before_each_kib, "rss_after_each_kib": i.rss_after_each_kib,
                "bytes_per_connection": i.bytes_per_connection(), "alive_at_end": i.alive_at_end,
                "proxy_fds": i.fds, "failure": i.failure,
            }))).collect::<serde_json::Map<_, _>>(),
            "failures": self.failures,
            "background_vcpu": {"mean": mean_and_worst(&self.background_vcpu).map(|b| b.0), "worst": mean_and_worst(&self.background_vcpu).map(|b| b.1)},
            "steal_vcpu": {"mean": mean_and_worst(&self.steal_vcpu).map(|b| b.0), "worst": mean_and_worst(&self.steal_vcpu).map(|b| b.1)},
            "runs": self.runs,
        })
    }
}

fn us(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "–".into())
}

fn delta(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) => format!("{:+.0}", a - b),
        _ => "–".into(),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "–".into(),
    }
}

fn fmt_num(v: f64, unit: &str) -> String {
    match unit {
        "vCPU" => format!("{v:.4} {unit}"),
        "%" => format!("{v:.0}%"),
        _ => format!("{v:.1} {unit}"),
    }
}

/// 12345.6 -> "12,346".
pub fn thousands(v: f64) -> String {
    let n = v.round() as i64;
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

fn bytes(n: u64) -> String {
    if n >= 1 << 30 && n.is_multiple_of(1 << 30) {
        format!("{} GiB", n >> 30)
    } else {
        format!("{} MiB", n >> 20)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_percentiles() {
        let mut cell = LatencyCell::default();
        let run = json!({
            "requests": 4, "warmup_requests": 1, "errors": 0, "error_samples": [],
            "latency_histogram": [[100_000, 2], [200_000, 1], [900_000, 1]],
            "send_lag_us": {"p99": 30.0},
        });
        cell.add_run(&run, &[0.5, 0.25]);
        cell.add_run(&run, &[0.5, 0.25]);
        assert_eq!(cell.percentile_us(0.5), Some(100.0));
        assert_eq!(cell.percentile_us(0.75), Some(200.0));
        assert_eq!(cell.percentile_us(0.99), Some(900.0));
        assert_eq!(cell.all_requests, 10);
        assert_eq!(cell.cpu_per_1000(), Some(150.0));
        assert_eq!(percentile_ns(&BTreeMap::new(), 0.5), None);
    }

    /// A run whose direct baseline has the slower tail says so instead of claiming the
    /// added-latency target; a normal run is judged against the limit.
    #[test]
    fn a_negative_added_latency_is_inconclusive_not_met() {
        let mut results = Results::new(String::new(), Machine::default(), json!({}), String::new());
        // 98 requests at `fast` µs and two at `slow` µs: p50 is `fast`, p99 is `slow`.
        let cell = |fast: u64, slow: u64| {
            let mut cell = LatencyCell::default();
            let run = json!({
                "requests": 100, "warmup_requests": 0, "errors": 0, "error_samples": [],
                "latency_histogram": [[fast * 1000, 98], [slow * 1000, 2]],
                "send_lag_us": {"p99": 10.0},
            });
            cell.add_run(&run, &[]);
            cell
        };
        let key = |s: Setup| (Conn::KeepAlive, 1000, s);
        results.latency.insert(key(Setup::Direct), cell(100, 900));
        results.latency.insert(key(Setup::Mesh), cell(280, 850));
        let mut md = String::new();
        results.targets_table(&mut md);
        let line = |start: &str| {
            md.lines()
                .find(|l| l.starts_with(start))
                .unwrap_or_else(|| panic!("no {start:?} row in\n{md}"))
                .to_owned()
        };
        let p50 = line("| added latency p50");
        assert!(p50.ends_with("| no, over by 120.0 µs |"), "{p50}");
        let p99 = line("| added latency p99");
        assert!(
            p99.contains("inconclusive: direct's own p99 (900 µs) is above the mesh's (850 µs)"),
            "{p99}"
        );
        assert!(!p99.contains("yes"), "{p99}");
    }

    #[test]
    fn medians_and_formats() {
        let mut m = Measure::default();
        for v in [3.0, 1.0, 2.0] {
            m.add(Some(v), &json!({"errors": 0}), &[], 0);
        }
        assert_eq!(m.median(), Some(2.0));
        m.add(
            Some(10.0),
            &json!({"errors": 2, "error_samples": ["x"]}),
            &[],
            0,
        );
        assert_eq!(m.median(), Some(2.5));
        assert_eq!(m.errors, 2);
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(ratio(Some(3.0), Some(2.0)), "1.50×");
        assert_eq!(delta(Some(3.0), Some(5.0)), "-2");
        assert_eq!(bytes(1 << 30), "1 GiB");
        assert_eq!(bytes(256 << 20), "256 MiB");
    }
}
