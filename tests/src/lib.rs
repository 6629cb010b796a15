//! `mesh_testbed`: simulated ECS nodes on the real kernel, for mesh-agent's integration
//! tests and demo.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use mesh_testbed::{Agent, ServeMode, Testkit, Topology};
//! let topology = Topology::new()?;              // removed again on drop, even on panic
//! let node = topology.add_node()?;              // node1: bridge 198.18.1.1/24
//! let a = node.add_task("a")?;                  // 198.18.1.2, own netns + cgroup
//! let b = node.add_task("b")?;                  // 198.18.1.3
//! let kit = Testkit::locate()?;
//! let server = kit.serve(&b, (b.ip(), 8080).into(), ServeMode::Http)?;
//! let config = format!("[capture]\ndestinations = [\"198.18.1.0/24\"]\n\n{}", a.config());
//! let agent = Agent::start(&node, &config)?;    // in node1's netns; waits for readiness
//! let out = a.command("curl")?.arg(format!("http://{}/", server.addr())).output()?;
//! let captured = agent.metric("mesh_connections_captured_total", &[("task", "a")])?;
//! # Ok(()) }
//! ```
//!
//! Everything made on the host is named `meshtest-<pid>_<starttime>-...`; leftovers of
//! test processes that died without cleaning up are swept when the next one starts.

pub mod agent;
pub mod cgroup;
pub mod dns;
pub mod ecs;
pub mod http;
pub mod mesh;
pub mod metrics;
pub mod netns;
pub mod pcap;
pub mod pki;
pub mod process;
pub mod prometheus;
mod sweep;
pub mod testkit;
pub mod tls;
pub mod topology;

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

pub use agent::{Agent, Launch};
pub use process::{Process, run_ok, run_with_timeout};
pub use testkit::{LoadClient, LoadReport, ServeMode, Server, Testkit};
pub use topology::{Node, Task, Topology};

/// Fails unless the process runs as root: namespaces, cgroups and eBPF all need it.
pub fn require_root() -> Result<()> {
    // SAFETY: geteuid(2) cannot fail and has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the mesh integration tests must run as root (they create network namespaces, \
             cgroups and load eBPF programs); run them with sudo or as root"
        );
    }
    Ok(())
}

/// Fails naming every program in `tools` that is not on PATH.
pub fn require_tools(tools: &[&str]) -> Result<()> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|tool| !std::env::split_paths(&path).any(|dir| is_executable(&dir.join(tool))))
        .collect();
    if !missing.is_empty() {
        bail!(
            "required tools not found on PATH: {} (Debian: apt-get install iproute2 util-linux curl bpftool)",
            missing.join(", ")
        );
    }
    Ok(())
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `CARGO_TARGET_DIR` if set, else this workspace's `target/`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => dir.into(),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
    }
}
