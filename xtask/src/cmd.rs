//! Child processes and facts about the host. Every command xtask runs goes through `run`, so the
//! log always shows what ran and a failure always names the exact command line to re-run by hand.

use anyhow::{Context, Result, bail};
use std::env;
use std::ffi::OsStr;
use std::fmt::Display;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// One line saying what xtask found or did; prefixed so it stands out between cargo's output.
pub fn say(message: impl Display) {
    println!("xtask: {message}");
}

/// Renders a command as a shell line (with the environment it sets), for logs and error messages.
/// PATH is left out: it is long, and xtask says separately what it put in front of it.
pub fn render(cmd: &Command) -> String {
    let mut parts = Vec::new();
    if let Some(dir) = cmd.get_current_dir() {
        parts.push(format!("(cd {} &&", quote(dir.as_os_str())));
    }
    for (key, value) in cmd.get_envs() {
        if let Some(value) = value.filter(|_| key != "PATH") {
            parts.push(format!("{}={}", key.to_string_lossy(), quote(value)));
        }
    }
    parts.push(quote(cmd.get_program()));
    parts.extend(cmd.get_args().map(quote));
    let line = parts.join(" ");
    if cmd.get_current_dir().is_some() {
        line + ")"
    } else {
        line
    }
}

fn quote(word: &OsStr) -> String {
    let word = word.to_string_lossy();
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./=:+,@%".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.into_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Runs a command with inherited stdio and fails, naming the command, unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = render(cmd);
    println!("+ {line}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Runs a quiet probe (`--version` and the like): stdout if it ran and exited 0, else None.
pub fn probe(cmd: &mut Command) -> Option<String> {
    let output = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// The cargo that is running xtask (cargo sets `$CARGO` for `cargo run`), so nested builds use the
/// same toolchain instead of whatever `cargo` on PATH resolves to.
pub fn cargo() -> Command {
    Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// A cargo for host builds of the workspace. Target-dir and target overrides are removed because the
/// agent's build, the tests and the demo find artefacts under `<root>/target/<profile>/`.
pub fn host_cargo(root: &Path) -> Command {
    let mut cmd = cargo();
    cmd.current_dir(root);
    for key in [
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        cmd.env_remove(key);
    }
    cmd
}

/// Looks a program up on PATH the way a shell would.
pub fn which(program: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|path| is_executable(path))
}

pub fn is_executable(path: &Path) -> bool {
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// PATH with `dir` in front, so a tool we installed wins over an older one elsewhere.
pub fn path_with(dir: &Path) -> Result<std::ffi::OsString> {
    let rest = env::var_os("PATH").unwrap_or_default();
    let dirs = std::iter::once(dir.to_path_buf()).chain(env::split_paths(&rest));
    env::join_paths(dirs).context("cannot put the tools directory on PATH")
}

/// Effective uid 0, read from procfs so xtask needs no libc binding for one number.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| effective_uid(&status))
        == Some(0)
}

fn effective_uid(proc_status: &str) -> Option<u32> {
    let line = proc_status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Prefix for commands that need root, in instructions printed to a non-root user.
pub fn sudo() -> &'static str {
    if is_root() { "" } else { "sudo " }
}

/// Parses the `x.y.z` out of `rustc 1.96.0 (ac68faa20 2026-05-25)` or `bpf-linker 0.13.0`.
pub fn parse_version(output: &str) -> Option<(u32, u32, u32)> {
    let word = output.split_whitespace().nth(1)?;
    let core = word.split(['-', '+']).next()?;
    let mut numbers = core.split('.').map(|n| n.parse::<u32>().ok());
    Some((numbers.next()??, numbers.next()??, numbers.next()??))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_versions() {
        assert_eq!(
            parse_version("rustc 1.96.0 (ac68faa20 2026-05-25) (built from a source tarball)"),
            Some((1, 96, 0))
        );
        assert_eq!(
            parse_version("rustc 1.97.0-nightly (e50aa6fba 2026-05-19)"),
            Some((1, 97, 0))
        );
        assert_eq!(parse_version("bpf-linker 0.13.0"), Some((0, 13, 0)));
        assert_eq!(parse_version("bpf-linker"), None);
    }

    #[test]
    fn reads_effective_uid() {
        let status = "Name:\tx\nUid:\t1000\t0\t0\t0\nGid:\t0\t0\t0\t0\n";
        assert_eq!(effective_uid(status), Some(0));
        assert_eq!(effective_uid("Name:\tx\n"), None);
    }

    #[test]
    fn renders_shell_lines() {
        let mut cmd = Command::new("cargo");
        cmd.args(["install", "--version", "~0.13", "it's"])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .env("PATH", "/x");
        assert_eq!(
            render(&cmd),
            r"LLVM_PREFIX=/usr/lib/llvm-22 cargo install --version '~0.13' 'it'\''s'"
        );
    }
}
