//! Start-up checks that turn an unusable host into one clear sentence instead of a cryptic
//! failure deep inside program loading.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// Where the kernel exposes its own type information; cgroup programs are loaded against it.
const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";

/// What the host offers the agent.
#[derive(Debug, Clone)]
pub struct Host {
    /// Mount point of the cgroup v2 hierarchy (`/sys/fs/cgroup` on Amazon Linux 2023,
    /// `/sys/fs/cgroup/unified` on hybrid hosts).
    pub cgroup2_root: PathBuf,
}

/// Checks everything `mesh-agent run` needs before it touches the kernel.
pub fn check_host() -> anyhow::Result<Host> {
    require_root()?;
    let mounts = std::fs::read_to_string("/proc/mounts").context("cannot read /proc/mounts")?;
    let cgroup2_root = cgroup2_mount(&mounts).ok_or_else(|| {
        anyhow::anyhow!(
            "no cgroup v2 hierarchy is mounted (nothing of type cgroup2 in /proc/mounts): \
             mesh-agent attaches its programs to task cgroups and needs cgroup v2 \
             (Amazon Linux 2023 has it; Amazon Linux 2 is cgroup v1 and is not supported)"
        )
    })?;
    if !Path::new(KERNEL_BTF).exists() {
        bail!(
            "the kernel has no BTF ({KERNEL_BTF} is missing): mesh-agent needs a kernel built \
             with CONFIG_DEBUG_INFO_BTF=y (Amazon Linux 2023 kernels have it)"
        );
    }
    Ok(Host { cgroup2_root })
}

pub fn require_root() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        bail!(
            "mesh-agent must run as root: it loads eBPF programs, attaches them to task cgroups \
             and enters task network namespaces (running as uid {euid}; on ECS run it as a \
             privileged daemon task)"
        );
    }
    Ok(())
}

/// The first cgroup2 mount point listed in `/proc/mounts` content.
fn cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_dev, mount_point, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(mount_point)))
    })
}

/// `/proc/mounts` escapes space, tab, newline and backslash as octal (`\040`).
fn unescape_mount_path(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(c as char);
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Raises the soft limit on open files to the hard limit: every proxied connection holds two
/// or three descriptors in the agent, and the usual soft limit (1,024) would refuse
/// connections after a few hundred. Returns the limit in force.
pub fn raise_open_files_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        return Ok(raised.rlim_cur);
    }
    Ok(limit.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_on_hybrid_and_unified_hosts() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let al2023 = "cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(cgroup2_mount(al2023), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(
            cgroup2_mount("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n"),
            None
        );
    }

    #[test]
    fn unescapes_octal_in_mount_paths() {
        assert_eq!(unescape_mount_path(r"/a\040b"), "/a b");
        assert_eq!(unescape_mount_path(r"/a\\"), r"/a\\");
    }

    #[test]
    fn the_open_files_limit_ends_at_the_hard_limit() {
        let raised = raise_open_files_limit().unwrap();
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        assert_eq!(raised, limit.rlim_cur);
        assert_eq!(limit.rlim_cur, limit.rlim_max);
    }
}
