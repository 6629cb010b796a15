//! Starting processes inside a cgroup and a network namespace, and never waiting on them
//! forever.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufRead, Read};
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::cgroup;

/// A `Command` whose child moves itself into the cgroup at `cgroup_dir` and then joins
/// the network namespace at `netns` before it execs `program`, so not one instruction of
/// the program runs elsewhere (a connect(2) made before the move would escape capture).
pub fn placed(program: impl AsRef<OsStr>, cgroup_dir: &Path, netns: &Path) -> Result<Command> {
    // Opened here, before the fork: between fork and exec only async-signal-safe calls are
    // allowed, so the child gets raw fds and makes one write(2) and one setns(2). Both are
    // O_CLOEXEC (std's default), so the program does not inherit them.
    let procs = cgroup::open_procs(cgroup_dir)?;
    let ns = File::open(netns).with_context(|| format!("open netns {}", netns.display()))?;
    let mut command = Command::new(program);
    // SAFETY: the hook only calls write(2) and setns(2) on fds it owns and reads errno,
    // all async-signal-safe; it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            // "0" means "the writing process": the child itself.
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return Err(io::Error::last_os_error());
            }
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(command)
}

/// A child process that is killed (SIGKILL) and reaped when dropped, so a failing test
/// cannot leave servers behind.
pub struct Process {
    child: Child,
}

impl Process {
    pub fn spawn(command: &mut Command) -> Result<Self> {
        let child = command
            .spawn()
            .with_context(|| format!("spawn {command:?}"))?;
        Ok(Self { child })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Sends `signal` unless the process has already been reaped.
    pub fn signal(&mut self, signal: i32) -> Result<()> {
        if self.child.try_wait()?.is_some() {
            bail!("process {} has already exited", self.child.id());
        }
        // SAFETY: kill(2) on our own unreaped child, so the pid cannot have been reused.
        if unsafe { libc::kill(self.child.id() as i32, signal) } != 0 {
            return Err(io::Error::last_os_error()).context("kill");
        }
        Ok(())
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The first line the process writes to its piped stdout, within `timeout` (servers print
    /// one when they listen). The rest of stdout is drained in the background so the process
    /// never blocks on a full pipe. `None` if stdout closed first.
    pub fn first_stdout_line(&mut self, timeout: Duration) -> Result<Option<String>> {
        let stdout = self
            .child
            .stdout
            .take()
            .context("no stdout pipe (spawn with Stdio::piped())")?;
        let (tx, rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            let mut lines = io::BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            lines.for_each(drop);
        });
        match rx.recv_timeout(timeout) {
            Ok(Some(line)) => Ok(Some(line.context("reading the process's stdout")?)),
            Ok(None) => Ok(None),
            Err(_) => bail!("no line on stdout within {timeout:?}"),
        }
    }

    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `command` to completion with its output captured, killing it after `timeout`.
/// Returns the output whatever the exit status; a timeout is an error carrying what the
/// process had printed so far. A background grandchild that keeps stdout or stderr open
/// holds this up until it exits: redirect such a daemon's output.
pub fn run_with_timeout(command: &mut Command, timeout: Duration) -> Result<Output> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut process = Process::spawn(command)?;
    // Drain both pipes on their own threads: a child blocked on a full pipe never exits.
    let child = process.child_mut();
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let status = process.wait_timeout(timeout)?;
    if status.is_none() {
        let _ = process.child.kill();
        let _ = process.child.wait();
    }
    let output = Output {
        status: status.unwrap_or_else(|| ExitStatus::from_raw(libc::SIGKILL)),
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    };
    if status.is_none() {
        bail!(
            "{command:?} did not finish within {timeout:?}; stdout: {} stderr: {}",
            String::from_utf8_lossy(&output.stdout).trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

/// Like [`run_with_timeout`], but a non-zero exit is an error too; returns stdout.
pub fn run_ok(command: &mut Command, timeout: Duration) -> Result<String> {
    let output = run_with_timeout(command, timeout)?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}); stdout: {} stderr: {}",
            output.status,
            stdout.trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(stdout)
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
