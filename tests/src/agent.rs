//! Running the real `mesh-agent` binary on a simulated node.

use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::mesh::wait_for;
use crate::process::Process;
use crate::topology::Node;
use crate::{http, metrics};

/// Where the agent serves `/metrics`, inside the node's namespace (the config default).
pub const METRICS_ADDR: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15020));
/// Where the agent serves `/healthz/ready`, inside the node's namespace.
pub const READINESS_ADDR: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15021));

const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Longer than the default drain_timeout (5 s), so a clean drain is never cut short.
const TERMINATE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a reload may take to be applied (tasks re-attached, watches restarted).
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);
/// The agent's count of configuration reloads, by `result` (`success` or `failure`).
const RELOADS: &str = "mesh_config_reloads_total";
const HTTP_TIMEOUT: Duration = Duration::from_secs(3);

/// How to launch the agent; [`Agent::start`] uses the defaults.
#[derive(Clone, Debug)]
pub struct Launch {
    /// The agent binary: `MESH_AGENT_BIN`, else `<target dir>/debug/mesh-agent`.
    pub bin: PathBuf,
    /// Program and arguments to put in front of the agent, e.g.
    /// `["setpriv", "--reuid=65534", ...]` to run it as another user.
    pub wrapper: Vec<OsString>,
    /// Extra environment variables (e.g. `MESH_LOG=debug`).
    pub env: Vec<(OsString, OsString)>,
}

impl Default for Launch {
    fn default() -> Self {
        Self {
            bin: default_bin(),
            wrapper: Vec::new(),
            env: Vec::new(),
        }
    }
}

/// `MESH_AGENT_BIN`, else `mesh-agent` in the debug directory of `CARGO_TARGET_DIR` or of
/// this workspace's `target/`.
pub fn default_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("MESH_AGENT_BIN") {
        return bin.into();
    }
    crate::target_dir().join("debug/mesh-agent")
}

/// A running (or exited) `mesh-agent run` in a node's namespace, killed when dropped.
/// Its log outlives it: a topology torn down by a failing test prints every agent log.
pub struct Agent {
    process: Process,
    node: Node,
    config: PathBuf,
    log: PathBuf,
}

impl Agent {
    /// Starts the agent with `config` (TOML) and waits until `/healthz/ready` answers 200.
    pub fn start(node: &Node, config: &str) -> Result<Self> {
        Self::start_with(node, config, &Launch::default())
    }

    /// [`Agent::start`] with another binary, wrapper or environment.
    pub fn start_with(node: &Node, config: &str, launch: &Launch) -> Result<Self> {
        let mut agent = Self::spawn(node, config, launch)?;
        agent.wait_ready(READY_TIMEOUT)?;
        Ok(agent)
    }

    /// Starts the agent without waiting for readiness (for agents meant to fail).
    ///
    /// The child moves itself into the topology's `agent` cgroup and the node's network
    /// namespace before exec, the same thing `nsenter --net=<netns> -- mesh-agent` does,
    /// without `ip netns exec`'s private /sys mount that would hide cgroup2 and bpffs.
    pub fn spawn(node: &Node, config: &str, launch: &Launch) -> Result<Self> {
        if !launch.bin.is_file() {
            bail!(
                "agent binary {} not found: build it (cargo build -p mesh-agent) or set MESH_AGENT_BIN",
                launch.bin.display()
            );
        }
        let config_path = node.new_file(&format!("agent-{}", node.name()), "toml");
        fs::write(&config_path, config)
            .with_context(|| format!("write {}", config_path.display()))?;
        let log = config_path.with_extension("log");
        node.register_agent_log(&log);
        // One file for stdout and stderr, both appending, so lines stay in order.
        let out = OpenOptions::new().create(true).append(true).open(&log)?;

        let mut argv: Vec<OsString> = launch.wrapper.clone();
        argv.push(launch.bin.clone().into());
        argv.extend(["run".into(), "--config".into(), config_path.clone().into()]);
        let mut command = node.agent_command(&argv[0])?;
        command
            .args(&argv[1..])
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let process = Process::spawn(&mut command)?;
        Ok(Self {
            process,
            node: node.clone(),
            config: config_path,
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn node(&self) -> &Node {
        &self.node
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the agent has written to stdout and stderr so far, without terminal
    /// colour codes.
    pub fn log(&self) -> String {
        read_log(&self.log)
    }

    /// The last `lines` lines of the log, framed for an error message.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    /// Polls `/healthz/ready` until it answers 200; fails early, with the log, if the
    /// agent exits.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exit_status()? {
                bail!(
                    "agent exited ({status}) before it was ready\n{}",
                    self.log_tail(40)
                );
            }
            let last = match http::get(
                &self.node.netns_path(),
                READINESS_ADDR,
                "/healthz/ready",
                HTTP_TIMEOUT,
            ) {
                Ok(r) if r.status == 200 => return Ok(()),
                Ok(r) => format!("status {}: {}", r.status, r.body.trim()),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "agent not ready after {timeout:?} (last: {last})\n{}",
                    self.log_tail(40)
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The `/metrics` text.
    pub fn metrics(&self) -> Result<String> {
        let r = http::get(
            &self.node.netns_path(),
            METRICS_ADDR,
            "/metrics",
            HTTP_TIMEOUT,
        )
        .with_context(|| self.log_tail(20))?;
        if r.status != 200 {
            bail!(
                "/metrics answered {}: {}\n{}",
                r.status,
                r.body,
                self.log_tail(20)
            );
        }
        Ok(r.body)
    }

    /// One sample by exact name (counters end in `_total`) and a subset of its labels;
    /// an absent sample reads as 0, as an untouched counter would.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        Ok(metrics::value(&self.metrics()?, name, labels).unwrap_or(0.0))
    }

    /// The sum of every sample called `name` whose labels include `labels` (0 if none).
    pub fn metric_sum(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        Ok(metrics::sum(&self.metrics()?, name, labels))
    }

    /// Every sample called `name` whose labels include `labels`.
    pub fn samples(&self, name: &str, labels: &[(&str, &str)]) -> Result<Vec<metrics::Sample>> {
        Ok(metrics::samples(&self.metrics()?, name, labels))
    }

    /// Polls [`Agent::metric`] until `accept` holds for it, returning the last value; an
    /// error after `timeout` names the metric, its last value and the agent's log.
    /// Metrics update asynchronously (e.g. when a connection's last byte is copied), so
    /// tests wait for them rather than read them once.
    pub fn wait_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        timeout: Duration,
        accept: impl Fn(f64) -> bool,
    ) -> Result<f64> {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.metric(name, labels)?;
            if accept(value) {
                return Ok(value);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{name}{labels:?} is still {value} after {timeout:?}\n{}",
                    self.log_tail(30)
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// [`Agent::wait_metric`] on the sum of every sample called `name` whose labels
    /// include `labels` (e.g. a counter over every value of a label not given).
    pub fn wait_metric_sum(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        timeout: Duration,
        accept: impl Fn(f64) -> bool,
    ) -> Result<f64> {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.metric_sum(name, labels)?;
            if accept(value) {
                return Ok(value);
            }
            if Instant::now() >= deadline {
                bail!(
                    "sum of {name}{labels:?} is still {value} after {timeout:?}\n{}",
                    self.log_tail(30)
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Number of open file descriptors of the agent (entries in /proc/<pid>/fd).
    pub fn fd_count(&self) -> Result<usize> {
        let dir = format!("/proc/{}/fd", self.pid());
        Ok(fs::read_dir(&dir)
            .with_context(|| format!("list {dir}"))?
            .count())
    }

    /// Replaces the configuration file, sends SIGHUP and waits until the agent has applied
    /// the new file (its count of successful reloads goes up), so what a test does next meets
    /// the new configuration. A reload the agent rejects, or one not finished within
    /// `RELOAD_TIMEOUT`, is an error carrying the agent's log.
    pub fn reload(&mut self, config: &str) -> Result<()> {
        let (successes, failures) = self.reload_counts()?;
        self.replace_config(config)?;
        self.process
            .signal(libc::SIGHUP)
            .with_context(|| self.log_tail(20))?;
        wait_for(
            "the agent applies the new configuration",
            RELOAD_TIMEOUT,
            || {
                let (s, f) = self.reload_counts()?;
                Ok(match (s > successes, f > failures) {
                    (true, _) => Ok(()),
                    (false, true) => Err("the agent rejected it".to_string()),
                    (false, false) => Err("no reload reported yet".to_string()),
                })
            },
        )
        .with_context(|| self.log_tail(20))
    }

    /// The agent's successful and failed configuration reloads so far.
    fn reload_counts(&self) -> Result<(f64, f64)> {
        let metrics = self.metrics()?;
        let count = |result| metrics::value(&metrics, RELOADS, &[("result", result)]);
        Ok((
            count("success").unwrap_or(0.0),
            count("failure").unwrap_or(0.0),
        ))
    }

    /// Replaces the configuration file without signalling the agent: it must notice the
    /// change itself (its file watch polls every `agent.watch_interval`). The new file is
    /// written aside and renamed over the old one, so the watcher never reads half a file.
    pub fn replace_config(&self, config: &str) -> Result<()> {
        let staged = self.config.with_extension("toml.new");
        fs::write(&staged, config).with_context(|| format!("write {}", staged.display()))?;
        fs::rename(&staged, &self.config)
            .with_context(|| format!("rename {} over the config", staged.display()))?;
        Ok(())
    }

    /// SIGTERM, then waits for the exit (the agent drains for up to its drain_timeout).
    pub fn terminate(&mut self) -> Result<ExitStatus> {
        self.process
            .signal(libc::SIGTERM)
            .with_context(|| self.log_tail(20))?;
        self.wait_exit(TERMINATE_TIMEOUT)
    }

    /// Waits up to `timeout` for the agent to exit; on timeout kills it and fails.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        match self.process.wait_timeout(timeout)? {
            Some(status) => Ok(status),
            None => {
                let _ = self.process.signal(libc::SIGKILL);
                bail!(
                    "agent still running after {timeout:?}; killed\n{}",
                    self.log_tail(40)
                )
            }
        }
    }

    /// The exit status if the agent has exited.
    pub fn exit_status(&mut self) -> Result<Option<ExitStatus>> {
        self.process.try_wait()
    }
}

fn read_log(path: &Path) -> String {
    match fs::read_to_string(path) {
        Ok(log) => strip_ansi(&log),
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// The last `lines` lines of the agent log at `path`, framed for an error message.
pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    let log = read_log(path);
    let all: Vec<&str> = log.lines().collect();
    let tail = all[all.len().saturating_sub(lines)..].join("\n");
    format!(
        "--- agent log ({}) ---\n{tail}\n--- end of agent log ---",
        path.display()
    )
}

/// Removes ANSI escape sequences (`ESC [ ... letter`), which loggers may emit even into a
/// file and which make assertions on log text and failure output hard to read.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.next() == Some('[') {
                // Parameters and intermediates, up to the final byte (a letter).
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn strips_colour_codes() {
        let line = "\x1b[2m2026\x1b[0m \x1b[32m INFO\x1b[0m task meshed \x1b[3mtask\x1b[0m=a";
        assert_eq!(super::strip_ansi(line), "2026  INFO task meshed task=a");
    }
}
