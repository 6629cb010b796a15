//! Names that say which process made them, and the sweep that removes what dead
//! processes left behind (a test run killed with SIGKILL never runs its Drop impls).
//!
//! Every namespace, cgroup and temporary directory the harness makes is named
//! `meshtest-<pid>_<starttime>-...`: the pid of the test process plus its start time (from
//! /proc/<pid>/stat), so a recycled pid does not make a dead run's leftovers look alive.

use std::fs;
use std::path::Path;
use std::sync::{Once, OnceLock};

use anyhow::Result;

use crate::{cgroup, netns};

/// The prefix of every name the harness gives to a host-wide object.
pub const PREFIX: &str = "meshtest-";

/// This process's `<pid>_<starttime>`.
pub fn owner() -> &'static str {
    static OWNER: OnceLock<String> = OnceLock::new();
    OWNER.get_or_init(|| {
        let pid = std::process::id();
        format!("{pid}_{}", start_time(pid).unwrap_or(0))
    })
}

/// Field 22 of /proc/<pid>/stat: start time in clock ticks since boot.
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses; fields after the last
    // ')' are plain. Field 3 is the first of them, so field 22 is the 20th.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// True if `name` was made by a harness process that no longer exists.
fn is_stale(name: &str) -> bool {
    let Some(owner) = name
        .strip_prefix(PREFIX)
        .and_then(|rest| rest.split('-').next())
    else {
        return false;
    };
    let Some((pid, started)) = owner.split_once('_') else {
        return false;
    };
    match (pid.parse::<u32>(), started.parse::<u64>()) {
        (Ok(pid), Ok(started)) => start_time(pid) != Some(started),
        _ => false,
    }
}

/// Removes leftovers of dead harness processes, once per process. Best effort: a
/// leftover that cannot be removed is reported and skipped, since it does not collide
/// with this run's names.
pub fn once() {
    static SWEEP: Once = Once::new();
    SWEEP.call_once(|| {
        if let Err(e) = sweep() {
            eprintln!("mesh_testbed: sweeping leftovers of earlier runs: {e:#}");
        }
    });
}

fn sweep() -> Result<()> {
    // Cgroups first: killing the processes releases the namespaces they hold.
    let cgroups = cgroup::mount()?;
    for name in stale_entries(cgroups) {
        report(&name, cgroup::kill_and_remove(&cgroups.join(&name)));
    }
    for name in stale_entries(Path::new(netns::NETNS_DIR)) {
        report(&name, netns::delete(&name));
    }
    let tmp = std::env::temp_dir();
    for name in stale_entries(&tmp) {
        report(
            &name,
            fs::remove_dir_all(tmp.join(&name)).map_err(Into::into),
        );
    }
    Ok(())
}

fn stale_entries(dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| is_stale(name))
        .collect()
}

fn report(name: &str, result: Result<()>) {
    match result {
        Ok(()) => eprintln!("mesh_testbed: removed {name}, left by a dead test run"),
        Err(e) => eprintln!("mesh_testbed: could not remove leftover {name}: {e:#}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_names_are_live_and_dead_owners_are_stale() {
        assert!(!is_stale(&format!("{PREFIX}{}-0-node1", owner())));
        assert!(is_stale(&format!(
            "{PREFIX}{}_1-0-node1",
            std::process::id()
        )));
        assert!(!is_stale("meshtest-garbage"));
        assert!(!is_stale("other-123_4-0"));
    }
}
