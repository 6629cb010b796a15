//! Debian packages. CI machines start with nothing but rustup stable, so xtask installs what it
//! needs itself when it can (root on Debian) and otherwise prints the exact command to run.

use crate::cmd::{self, run, say};
use anyhow::{Result, bail};
use std::path::Path;
use std::process::Command;

/// True on Debian and derivatives, where the package names below mean something.
pub fn is_debian() -> bool {
    Path::new("/etc/debian_version").exists()
        && cmd::which("dpkg-query").is_some()
        && cmd::which("apt-get").is_some()
}

/// True when xtask may install packages itself.
pub fn can_install() -> bool {
    is_debian() && cmd::is_root()
}

/// The packages of `wanted` that are not fully installed. `dpkg -s` alone is not enough: it also
/// succeeds for removed packages whose configuration files remain.
pub fn missing(wanted: &[&str]) -> Vec<String> {
    let output = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${Status}\n"])
        .args(wanted)
        .output();
    // dpkg-query exits 1 when some package is unknown, but still lists the known ones.
    let listing = output
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    wanted
        .iter()
        .filter(|pkg| !is_installed(&listing, pkg))
        .map(|pkg| pkg.to_string())
        .collect()
}

fn is_installed(listing: &str, package: &str) -> bool {
    listing.lines().any(|line| {
        // Multi-arch packages are listed as `name:arch`.
        let mut words = line.split_whitespace();
        let name = words.next().unwrap_or_default();
        let name = name.split(':').next().unwrap_or_default();
        name == package && line.ends_with("install ok installed")
    })
}

/// Makes sure `packages` are installed, installing the missing ones when root on Debian.
/// `purpose` says in the log why they are needed.
pub fn ensure(packages: &[&str], purpose: &str) -> Result<()> {
    if !is_debian() {
        bail!(
            "{purpose} needs the Debian packages {}, and this is not a Debian system \
             (no /etc/debian_version, dpkg-query or apt-get); install their equivalents",
            packages.join(" ")
        );
    }
    let missing = missing(packages);
    if missing.is_empty() {
        say(format!("{purpose}: present: {}", packages.join(" ")));
        return Ok(());
    }
    let missing: Vec<&str> = missing.iter().map(String::as_str).collect();
    install(&missing, purpose)
}

/// `apt-get install`, refreshing the package index and retrying once when the install fails
/// (a fresh machine has an empty or stale index).
pub fn install(packages: &[&str], purpose: &str) -> Result<()> {
    if !can_install() {
        bail!(
            "{purpose} needs the Debian packages {0}, and xtask can only install them as root. Run:\n    {1}",
            packages.join(" "),
            install_instructions(packages)
        );
    }
    say(format!("{purpose}: installing {}", packages.join(" ")));
    if run(&mut apt_get_install(packages)).is_err() {
        say("apt-get install failed; refreshing the package index and retrying once");
        update()?;
        run(&mut apt_get_install(packages))?;
    }
    Ok(())
}

pub fn update() -> Result<()> {
    run(Command::new("apt-get").args(["update"]))
}

fn apt_get_install(packages: &[&str]) -> Command {
    let mut cmd = Command::new("apt-get");
    // Recommends stay on: the eBPF toolchain was verified with apt's defaults (rustc-web recommends
    // rust-web-llvm).
    cmd.env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y"])
        .args(packages);
    cmd
}

/// The command line a person should run to install `packages`.
pub fn install_instructions(packages: &[&str]) -> String {
    let sudo = cmd::sudo();
    format!(
        "{sudo}apt-get update && {sudo}apt-get install -y {}",
        packages.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_fully_installed_packages_count() {
        let listing = "curl install ok installed\n\
                       tcpdump deinstall ok config-files\n\
                       libzstd-dev:amd64 install ok installed\n";
        assert!(is_installed(listing, "curl"));
        assert!(!is_installed(listing, "tcpdump"));
        assert!(is_installed(listing, "libzstd-dev"));
        assert!(!is_installed(listing, "bpftool"));
    }
}
