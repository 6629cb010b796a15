//! `cargo xtask build`: the eBPF object first, then the user-space crates that embed or test it.

use crate::{Profile, cmd, ebpf};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Built {
    pub ebpf_object: PathBuf,
    pub agent_bin: PathBuf,
}

pub fn build(root: &Path, profile: Profile) -> Result<Built> {
    let ebpf_object = ebpf::build(root, profile)?;
    let mut cargo = cargo_with_object(root, &ebpf_object);
    cargo
        .args(["build", "-p", "mesh-agent", "-p", "mesh-tests"])
        .args(profile.cargo_flag());
    cmd::run(&mut cargo).context("building mesh-agent failed")?;
    let agent_bin = agent_bin(root, profile);
    if !agent_bin.exists() {
        bail!("cargo succeeded but {} is missing", agent_bin.display());
    }
    cmd::say(format!("mesh-agent: {}", agent_bin.display()));
    Ok(Built {
        ebpf_object,
        agent_bin,
    })
}

pub fn agent_bin(root: &Path, profile: Profile) -> PathBuf {
    root.join("target").join(profile.dir()).join("mesh-agent")
}

/// A host cargo that hands the agent's build script the object explicitly. Every workspace cargo
/// run in one xtask invocation uses this, so the build script sees the same environment and
/// does not rerun between build, clippy and test.
pub fn cargo_with_object(root: &Path, ebpf_object: &Path) -> Command {
    let mut cargo = cmd::host_cargo(root);
    cargo.env("MESH_EBPF_OBJECT", ebpf_object);
    cargo
}
