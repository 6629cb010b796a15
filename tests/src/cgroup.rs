//! cgroup v2: finding the mount, making leaf cgroups, and removing whole subtrees.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The cgroup2 mount point, read from /proc/mounts: /sys/fs/cgroup on a unified host
/// (Amazon Linux 2023), /sys/fs/cgroup/unified on a hybrid one, never hard-coded.
pub fn mount() -> Result<&'static Path> {
    static MOUNT: OnceLock<Option<PathBuf>> = OnceLock::new();
    MOUNT
        .get_or_init(|| {
            let mounts = fs::read_to_string("/proc/mounts").ok()?;
            mounts.lines().find_map(|line| {
                let mut fields = line.split_whitespace();
                let (_, path, fstype) = (fields.next()?, fields.next()?, fields.next()?);
                (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(path)))
            })
        })
        .as_deref()
        .context("no cgroup2 filesystem is mounted (see /proc/mounts); the mesh needs cgroup v2")
}

/// /proc/mounts writes space, tab, newline and backslash as octal escapes.
fn unescape_mount_path(path: &str) -> String {
    path.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

pub fn create(path: &Path) -> Result<()> {
    fs::create_dir_all(path).with_context(|| format!("create cgroup {}", path.display()))
}

/// Opens `cgroup.procs` for writing before a fork: writing "0" to it from the child moves
/// the child itself into the cgroup, which is async-signal-safe (one write(2)).
pub fn open_procs(path: &Path) -> Result<File> {
    let procs = path.join("cgroup.procs");
    OpenOptions::new()
        .write(true)
        .open(&procs)
        .with_context(|| format!("open {}", procs.display()))
}

/// Kills every process in the subtree at `path`, waits until it is empty, and removes
/// every cgroup in it, deepest first. A missing `path` is not an error.
pub fn kill_and_remove(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    kill_all(path)?;
    remove_tree(path)
}

fn kill_all(path: &Path) -> Result<()> {
    // cgroup.kill (Linux 5.14+) SIGKILLs the whole subtree at once, including processes
    // that fork while we look. Older kernels: kill what cgroup.procs lists, until empty.
    let deadline = Instant::now() + Duration::from_secs(10);
    let has_kill = path.join("cgroup.kill").exists();
    loop {
        if !populated(path)? {
            return Ok(());
        }
        if has_kill {
            fs::write(path.join("cgroup.kill"), "1")
                .with_context(|| format!("write {}/cgroup.kill", path.display()))?;
        } else {
            for pid in pids_in_subtree(path)? {
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if Instant::now() > deadline {
            bail!("processes in cgroup {} survive SIGKILL", path.display());
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// `populated 1` in cgroup.events: some process lives in this cgroup or below it.
fn populated(path: &Path) -> Result<bool> {
    let events = fs::read_to_string(path.join("cgroup.events"))
        .with_context(|| format!("read {}/cgroup.events", path.display()))?;
    Ok(events.lines().any(|l| l == "populated 1"))
}

fn pids_in_subtree(path: &Path) -> Result<Vec<i32>> {
    let mut pids: Vec<i32> = fs::read_to_string(path.join("cgroup.procs"))?
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    for child in child_cgroups(path)? {
        pids.extend(pids_in_subtree(&child)?);
    }
    Ok(pids)
}

fn child_cgroups(path: &Path) -> Result<Vec<PathBuf>> {
    let mut children = Vec::new();
    for entry in fs::read_dir(path).with_context(|| format!("list {}", path.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            children.push(entry.path());
        }
    }
    Ok(children)
}

fn remove_tree(path: &Path) -> Result<()> {
    for child in child_cgroups(path)? {
        remove_tree(&child)?;
    }
    // rmdir can briefly fail with EBUSY right after the last process died while the
    // kernel finishes releasing it; retry for a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) => {
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).with_context(|| format!("rmdir {}", path.display())),
        }
    }
}
