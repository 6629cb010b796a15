//! The loopback redirect: both ends of the app <-> agent loopback legs go into a socket map, and
//! an `sk_msg` program hands every write straight to the peer socket's receive queue instead of
//! sending it through the loopback TCP/IP stack (see `mesh-ebpf` for the kernel side).
//!
//! The app's ends are seen by the programs already attached to task cgroups. The agent's ends
//! need a `sock_ops` program on the agent's own cgroup: only there does the kernel report the
//! agent's sockets as they become established, which is the one moment both ends can be put in
//! the map before either has written (a socket added later could see its later bytes overtake
//! earlier ones). That program acts only on sockets of this agent's task netns, so the cgroup
//! may hold other processes (as in tests) or other agents.

use std::io::{self, BufRead};
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};

/// The cgroup this process is in, under the cgroup v2 mount `cgroup2_root`.
///
/// `/proc/self/cgroup` names it relative to the cgroup namespace's root. In a container with a
/// private cgroup namespace and the host's hierarchy mounted (as the ECS daemon runs) that name
/// is `/`, which is not where the process is on the mounted tree; so the candidate is checked
/// against `cgroup.procs`, and if it does not list this process the tree is searched for it.
pub fn own_cgroup(cgroup2_root: &Path) -> anyhow::Result<PathBuf> {
    let pid = std::process::id();
    let listed = std::fs::read_to_string("/proc/self/cgroup")
        .context("cannot read /proc/self/cgroup")?
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
        .ok_or_else(|| anyhow!("/proc/self/cgroup has no cgroup v2 entry (0::)"))?;
    let candidate = cgroup2_root.join(listed.trim_start_matches('/'));
    if lists_pid(&candidate, pid) {
        return Ok(candidate);
    }
    find_pid(cgroup2_root, pid, 0)?.ok_or_else(|| {
        anyhow!(
            "this process (pid {pid}) is in no cgroup under {}",
            cgroup2_root.display()
        )
    })
}

fn lists_pid(cgroup: &Path, pid: u32) -> bool {
    let Ok(file) = std::fs::File::open(cgroup.join("cgroup.procs")) else {
        return false;
    };
    io::BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .any(|l| l.trim().parse::<u32>() == Ok(pid))
}

/// Depth-first search for the cgroup listing `pid`. Cgroup trees are shallow; the bound only
/// guards against a pathological mount.
fn find_pid(dir: &Path, pid: u32, depth: usize) -> anyhow::Result<Option<PathBuf>> {
    if lists_pid(dir, pid) {
        return Ok(Some(dir.to_owned()));
    }
    if depth >= 16 {
        return Ok(None);
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        // A cgroup removed while we look.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(anyhow!(e).context(format!("cannot list {}", dir.display()))),
    };
    for entry in entries.map_while(Result::ok) {
        if entry.file_type().is_ok_and(|t| t.is_dir())
            && let Some(found) = find_pid(&entry.path(), pid, depth + 1)?
        {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_cgroup_is_found_and_lists_this_process() {
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
        let Some(root) = mounts
            .lines()
            .find(|l| l.split_whitespace().nth(2) == Some("cgroup2"))
            .and_then(|l| l.split_whitespace().nth(1))
        else {
            eprintln!("no cgroup2 mount on this machine; nothing to check");
            return;
        };
        let found = own_cgroup(Path::new(root)).unwrap();
        assert!(found.starts_with(root));
        assert!(lists_pid(&found, std::process::id()));
    }

    #[test]
    fn socket_cookies_are_distinct_per_socket() {
        use crate::netns::socket_cookie;
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (ca, cb) = (socket_cookie(&a).unwrap(), socket_cookie(&b).unwrap());
        assert_ne!(ca, 0);
        assert_ne!(ca, cb);
        assert_eq!(socket_cookie(&a).unwrap(), ca);
    }
}
