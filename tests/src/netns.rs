//! Named network namespaces (`ip netns`, so they show in `ip netns list` and live under
//! /var/run/netns) and running code inside one.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::thread;

use anyhow::{Context, Result, bail};

/// Where `ip netns add` bind-mounts named namespaces.
pub const NETNS_DIR: &str = "/var/run/netns";

/// The first `ip netns add` on a host also makes /var/run/netns a shared mount point;
/// two of them racing there can stack mounts, so this process adds and deletes one at a
/// time (each is a few milliseconds).
static NETNS_LOCK: Mutex<()> = Mutex::new(());

pub fn path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

pub fn add(name: &str) -> Result<PathBuf> {
    let _serial = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    ip(&format!("netns add {name}"))?;
    Ok(path(name))
}

/// Removes the name; the namespace itself (and every interface in it) goes away once no
/// process, socket or open fd holds it any more.
pub fn delete(name: &str) -> Result<()> {
    let _serial = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if !path(name).exists() {
        return Ok(());
    }
    ip(&format!("netns delete {name}"))
}

/// Runs `ip <command>`, failing with its stderr if it fails. The words of `command` are
/// split at whitespace: no name or address the harness passes contains any.
pub fn ip(command: &str) -> Result<()> {
    let out = Command::new("ip")
        .args(command.split_whitespace())
        .output()
        .context("run `ip` (iproute2): is it installed?")?;
    if !out.status.success() {
        bail!(
            "`ip {command}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `ip -n <netns> <command>`: `command` inside the named namespace.
pub fn ip_in(netns: &str, command: &str) -> Result<()> {
    ip(&format!("-n {netns} {command}"))
}

/// Runs `f` on a fresh thread that has joined the network namespace at `netns`; sockets
/// it opens and /proc/sys/net files it writes belong to that namespace. Joining another
/// network namespace is per thread, so the rest of the process is unaffected.
pub fn run_in<T: Send>(netns: &Path, f: impl FnOnce() -> T + Send) -> Result<T> {
    let ns = File::open(netns).with_context(|| format!("open netns {}", netns.display()))?;
    thread::scope(|scope| {
        let worker = scope.spawn(move || {
            // SAFETY: setns(2) on a valid fd; it only changes this thread's namespace.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("setns into {}", netns.display()));
            }
            Ok(f())
        });
        worker
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Writes a per-namespace sysctl such as `net/ipv4/ip_forward`.
pub fn sysctl(netns: &Path, key: &str, value: &str) -> Result<()> {
    let file = Path::new("/proc/sys").join(key);
    run_in(netns, || std::fs::write(&file, value))?
        .with_context(|| format!("write {} in {}", file.display(), netns.display()))
}
