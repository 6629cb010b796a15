//! The ECS task cgroup tree on Amazon Linux 2023 (cgroup v2, systemd driver):
//! `ecstasks.slice/ecstasks-<taskID>.slice/docker-<containerID>.scope`. The task slice exists
//! before any container of the task starts, so programs attached to it cover every process the
//! task will ever run.

use std::path::{Path, PathBuf};

/// The slice directory of a task under the `ecstasks.slice` root.
pub fn task_slice(root: &Path, task_id: &str) -> PathBuf {
    root.join(format!("ecstasks-{task_id}.slice"))
}

/// Whether a directory name is a task slice.
pub fn is_task_slice(name: &str) -> bool {
    name.starts_with("ecstasks-")
        && name.ends_with(".slice")
        && name.len() > "ecstasks-.slice".len()
}

/// Every pid in the cgroup and its descendants, ascending (the pause container, started first,
/// usually has the lowest).
pub fn pids(dir: &Path) -> Vec<u32> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(procs) = std::fs::read_to_string(d.join("cgroup.procs")) {
            out.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        if let Ok(entries) = std::fs::read_dir(&d) {
            stack.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Whether the process shares the agent's network namespace (a host-mode task).
pub fn in_agent_netns(pid: u32) -> bool {
    use std::os::unix::fs::MetadataExt;
    let ns = |p: &str| std::fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
    match (ns(&format!("/proc/{pid}/ns/net")), ns("/proc/self/ns/net")) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_names() {
        assert!(is_task_slice(
            "ecstasks-8f03e41243824aea923aca126495f665.slice"
        ));
        assert!(!is_task_slice("ecstasks-.slice"));
        assert!(!is_task_slice("docker-1.scope"));
        assert_eq!(
            task_slice(Path::new("/sys/fs/cgroup/ecstasks.slice"), "abc"),
            PathBuf::from("/sys/fs/cgroup/ecstasks.slice/ecstasks-abc.slice")
        );
    }

    #[test]
    fn this_process_is_in_its_own_netns() {
        assert!(in_agent_netns(std::process::id()));
    }
}
