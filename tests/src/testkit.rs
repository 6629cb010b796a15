//! Driving the `mesh-testkit` binary (this package's plain TCP server and client) inside
//! tasks.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::process::{self, Process};
use crate::topology::Task;

const LISTEN_TIMEOUT: Duration = Duration::from_secs(5);

/// What a `mesh-testkit serve` answers; see the binary's documentation.
#[derive(Clone, Copy, Debug)]
pub enum ServeMode {
    /// `HTTP/1.1 200 OK` with body `peer=<ip:port>`: the client as the server saw it.
    Http,
    /// Like `Http`, and the body has a second line `request=<the request line>`, so a
    /// marker in the request path comes back in the response.
    HttpEcho,
    /// Full-duplex echo.
    Echo,
    /// Read to EOF, then send the SHA-256 of it and `reply_bytes` pattern bytes.
    HalfClose { reply_bytes: u64 },
    /// HTTP: `503 Service Unavailable` to `fail_percent`% of the requests, deterministically
    /// (50: every second request; 100: all), otherwise like `Http`. `GET /count` is not
    /// counted and answers `count=<requests received so far>`.
    Flaky { fail_percent: u8 },
    /// HTTP: like `Http` after `delay`, except requests whose path starts with `/fast`,
    /// answered at once.
    Slow { delay: Duration },
    /// Server speaks first (as MySQL or SMTP): `220 <ip:port> ready\r\n` at once, then echo.
    Greet,
    /// After the client's first bytes, send `reply_bytes` pattern bytes and reset the
    /// connection (client: `--mode until-end`).
    Abort { reply_bytes: u64 },
    /// Read the client's pattern bytes to their end and log how they ended:
    /// `ended after N bytes: eof|reset` (client: `--mode abort`).
    Watch,
}

/// The `mesh-testkit` binary.
#[derive(Clone, Debug)]
pub struct Testkit {
    bin: PathBuf,
}

impl Testkit {
    /// Integration tests of this package pass `env!("CARGO_BIN_EXE_mesh-testkit")`.
    pub fn new(bin: impl Into<PathBuf>) -> Result<Self> {
        let bin = bin.into();
        if !bin.is_file() {
            bail!(
                "mesh-testkit binary {} not found: build it (cargo build -p mesh-tests --bin mesh-testkit) or set MESH_TESTKIT_BIN",
                bin.display()
            );
        }
        Ok(Self { bin })
    }

    /// `MESH_TESTKIT_BIN`, else `mesh-testkit` in the target directory's `debug/`.
    pub fn locate() -> Result<Self> {
        match std::env::var_os("MESH_TESTKIT_BIN") {
            Some(bin) => Self::new(bin),
            None => Self::new(crate::target_dir().join("debug/mesh-testkit")),
        }
    }

    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// Starts `serve` inside `task` and waits until it listens.
    pub fn serve(&self, task: &Task, listen: SocketAddr, mode: ServeMode) -> Result<Server> {
        let mut command = task.command(&self.bin)?;
        command.arg("serve").arg("--listen").arg(listen.to_string());
        match mode {
            ServeMode::Http => command.args(["--mode", "http"]),
            ServeMode::HttpEcho => command.args(["--mode", "httpecho"]),
            ServeMode::Echo => command.args(["--mode", "echo"]),
            ServeMode::Greet => command.args(["--mode", "greet"]),
            ServeMode::Watch => command.args(["--mode", "watch"]),
            ServeMode::Abort { reply_bytes } => command
                .args(["--mode", "abort", "--reply-bytes"])
                .arg(reply_bytes.to_string()),
            ServeMode::HalfClose { reply_bytes } => command
                .args(["--mode", "halfclose", "--reply-bytes"])
                .arg(reply_bytes.to_string()),
            ServeMode::Flaky { fail_percent } => command
                .args(["--mode", "flaky", "--fail-percent"])
                .arg(fail_percent.to_string()),
            ServeMode::Slow { delay } => command
                .args(["--mode", "slow", "--delay-ms"])
                .arg(delay.as_millis().to_string()),
        };
        let log = task.new_file(&format!("serve-{}", task.id()), "log");
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&log)?);
        let mut process = Process::spawn(&mut command)?;
        match process.first_stdout_line(LISTEN_TIMEOUT) {
            Ok(Some(line)) if line.starts_with("listening on ") => {}
            other => bail!(
                "mesh-testkit serve on {listen} in task {} did not start ({other:?}); stderr: {}",
                task.id(),
                std::fs::read_to_string(&log).unwrap_or_default().trim()
            ),
        }
        Ok(Server {
            _process: process,
            addr: listen,
            log,
        })
    }

    /// A `mesh-testkit client --connect <connect> ARGS...` command inside `task`.
    pub fn client(&self, task: &Task, connect: SocketAddr, args: &[&str]) -> Result<Command> {
        let mut command = task.command(&self.bin)?;
        command
            .arg("client")
            .arg("--connect")
            .arg(connect.to_string())
            .args(args);
        Ok(command)
    }

    /// Runs a client inside `task` to completion; fails with its stderr unless it exits 0.
    /// Returns its `ok ...` summary line.
    pub fn run_client(
        &self,
        task: &Task,
        connect: SocketAddr,
        args: &[&str],
        timeout: Duration,
    ) -> Result<String> {
        let out = process::run_ok(&mut self.client(task, connect, args)?, timeout)
            .with_context(|| format!("mesh-testkit client in task {} to {connect}", task.id()))?;
        Ok(out.trim().to_string())
    }
}

/// Options of a [`LoadClient`] (`mesh-testkit client --mode load`).
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Workers opening a new connection per request.
    pub workers: usize,
    /// Connections held open for the whole run (a request is one echoed message).
    pub long_lived: usize,
    /// Bytes echoed per new-connection request.
    pub send_bytes: u64,
    /// Pause between two requests of one worker.
    pub interval: Duration,
    /// Longest a single connect, read or write may block before the request fails.
    pub timeout: Duration,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            workers: 2,
            long_lived: 1,
            send_bytes: 1024,
            interval: Duration::from_millis(20),
            timeout: Duration::from_secs(3),
        }
    }
}

/// Counts of a load run so far.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    pub ok: u64,
    pub failed: u64,
    /// One line per failed request: `failure t_ms=T <what>: <error>`.
    pub failures: Vec<String>,
    /// Exit status, once stopped.
    pub status: Option<ExitStatus>,
    /// Everything on stderr, once stopped.
    pub stderr: String,
}

impl LoadReport {
    /// Fails unless the stopped run had no failed request and exited cleanly; `during` says
    /// what the load ran across, for the message.
    pub fn ensure_none_failed(&self, during: &str) -> Result<()> {
        anyhow::ensure!(
            self.failed == 0 && self.failures.is_empty(),
            "{} requests failed {during}:\n{}\n{}",
            self.failed,
            self.failures.join("\n"),
            self.stderr
        );
        anyhow::ensure!(
            self.status.is_some_and(|s| s.success()),
            "the load client did not exit cleanly: {self:?}"
        );
        Ok(())
    }
}

/// A `mesh-testkit client --mode load` running in a task against an echo server: requests
/// in a loop, counted, until [`LoadClient::stop`]. Killed if dropped.
pub struct LoadClient {
    process: Process,
    stop_file: PathBuf,
    log: PathBuf,
    report: Arc<Mutex<LoadReport>>,
}

impl LoadClient {
    /// Starts the load against `echo` (a [`ServeMode::Echo`] server's address) in `task`.
    pub fn start(kit: &Testkit, task: &Task, echo: SocketAddr, opts: &LoadOptions) -> Result<Self> {
        let stop_file = task.new_file(&format!("load-stop-{}", task.id()), "flag");
        let log = task.new_file(&format!("load-{}", task.id()), "log");
        let mut command = kit.client(
            task,
            echo,
            &[
                "--mode",
                "load",
                "--stop-file",
                &stop_file.to_string_lossy(),
                "--workers",
                &opts.workers.to_string(),
                "--long-lived",
                &opts.long_lived.to_string(),
                "--send-bytes",
                &opts.send_bytes.to_string(),
                "--interval-ms",
                &opts.interval.as_millis().to_string(),
                "--timeout",
                &opts.timeout.as_secs().max(1).to_string(),
            ],
        )?;
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&log)?);
        let mut process = Process::spawn(&mut command)?;
        let stdout = process
            .child_mut()
            .stdout
            .take()
            .context("no stdout pipe")?;
        let report = Arc::new(Mutex::new(LoadReport::default()));
        let sink = report.clone();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let mut report = sink.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(counts) = line.strip_prefix("progress ") {
                    for field in counts.split_whitespace() {
                        match field.split_once('=') {
                            Some(("ok", n)) => report.ok = n.parse().unwrap_or(report.ok),
                            Some(("failed", n)) => {
                                report.failed = n.parse().unwrap_or(report.failed)
                            }
                            _ => {}
                        }
                    }
                } else if line.starts_with("failure ") {
                    report.failures.push(line);
                }
            }
        });
        Ok(Self {
            process,
            stop_file,
            log,
            report,
        })
    }

    /// The counts so far (updated every 250 ms; failures at once).
    pub fn progress(&self) -> LoadReport {
        self.report
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until at least `more` requests succeeded after this call, so a phase of a
    /// test is known to have carried traffic; fails if the client exits meanwhile.
    pub fn wait_for_successes(&mut self, more: u64, timeout: Duration) -> Result<u64> {
        let target = self.progress().ok + more;
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.progress();
            if now.ok >= target {
                return Ok(now.ok);
            }
            if let Some(status) = self.process.try_wait()? {
                bail!(
                    "the load client exited ({status}) early: {now:?} {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if Instant::now() >= deadline {
                bail!("the load made no {more} successful requests in {timeout:?}: {now:?}");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the load (after in-flight requests finish) and returns the final counts.
    pub fn stop(mut self) -> Result<LoadReport> {
        File::create(&self.stop_file)?;
        let status = self
            .process
            .wait_timeout(Duration::from_secs(30))?
            .context("the load client did not stop within 30 s of its stop file")?;
        // The reader thread sees EOF right after the exit; let it take the last lines.
        thread::sleep(Duration::from_millis(50));
        let mut report = self.progress();
        report.status = Some(status);
        report.stderr = std::fs::read_to_string(&self.log).unwrap_or_default();
        Ok(report)
    }
}

/// A running `mesh-testkit serve`; killed when dropped.
pub struct Server {
    _process: Process,
    addr: SocketAddr,
    log: PathBuf,
}

impl Server {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What the server wrote to stderr (one line per failed connection; `watch` logs every
    /// connection's end).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
