//! Driving the `mesh-testkit` binary (this package's plain TCP server and client) inside
//! tasks.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::process::{self, Process};
use crate::topology::Task;

const LISTEN_TIMEOUT: Duration = Duration::from_secs(5);

/// What a `mesh-testkit serve` answers; see the binary's documentation.
#[derive(Clone, Copy, Debug)]
pub enum ServeMode {
    /// `HTTP/1.1 200 OK` with body `peer=<ip:port>`: the client as the server saw it.
    Http,
    /// Full-duplex echo.
    Echo,
    /// Read to EOF, then send the SHA-256 of it and `reply_bytes` pattern bytes.
    HalfClose { reply_bytes: u64 },
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
            ServeMode::Echo => command.args(["--mode", "echo"]),
            ServeMode::HalfClose { reply_bytes } => command
                .args(["--mode", "halfclose", "--reply-bytes"])
                .arg(reply_bytes.to_string()),
        };
        let log = task.new_file(&format!("serve-{}", task.id()), "log");
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
        let (tx, rx) = mpsc::channel();
        // Reads the "listening on" line, then drains stdout so the server never blocks.
        thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            lines.for_each(drop);
        });
        match rx.recv_timeout(LISTEN_TIMEOUT) {
            Ok(Some(Ok(line))) if line.starts_with("listening on ") => {}
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

    /// What the server wrote to stderr (one line per failed connection).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
