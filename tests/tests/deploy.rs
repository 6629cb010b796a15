//! The ECS deployment artefacts in `deploy/` (docs/deploy-ecs.md): every JSON file parses, the
//! fields the agent depends on are there, and the files agree with each other and with
//! `deploy/mesh.toml`. Reads files only: no root, no AWS account.
//!
//! `deploy/mesh.toml` is not parsed as TOML here (the `toml` crate is not a dependency of this
//! package); the few values the cross-checks need are read from simple `key = value` lines.

use std::collections::{BTreeSet, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

const TASK_DEFINITION: &str = "task-definition.json";
const SERVICE: &str = "service.json";
const EXECUTION_POLICY: &str = "iam-execution-role-policy.json";
const EXECUTION_TRUST: &str = "iam-execution-role-trust-policy.json";
const MESH_TOML: &str = "mesh.toml";

/// Every JSON artefact and what it is; a new file needs its checks here.
/// The Grafana dashboard is a JSON artefact too; its content is checked in observability.rs.
const DASHBOARD: &str = "grafana-dashboard.json";
const JSON_FILES: &[&str] = &[
    TASK_DEFINITION,
    SERVICE,
    EXECUTION_POLICY,
    EXECUTION_TRUST,
    DASHBOARD,
];

const AGENT_BIN: &str = "/usr/local/bin/mesh-agent";
const BUNDLE_ENV: &str = "MESH_TRUST_BUNDLE_PEM";
const ISSUER_ENV: &str = "MESH_ISSUER_PEM";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn read(name: &str) -> Result<String> {
    let path = deploy_dir().join(name);
    fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))
}

fn json(name: &str) -> Result<Value> {
    serde_json::from_str(&read(name)?).with_context(|| format!("deploy/{name} is not valid JSON"))
}

/// The string at a JSON pointer (`/a/0/b`), or an error naming the pointer.
fn string<'a>(v: &'a Value, pointer: &str) -> Result<&'a str> {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .with_context(|| format!("{pointer} is missing or not a string"))
}

fn array<'a>(v: &'a Value, pointer: &str) -> Result<&'a Vec<Value>> {
    v.pointer(pointer)
        .and_then(Value::as_array)
        .with_context(|| format!("{pointer} is missing or not an array"))
}

fn integer(v: &Value, pointer: &str) -> Result<i64> {
    v.pointer(pointer)
        .and_then(Value::as_i64)
        .with_context(|| format!("{pointer} is missing or not an integer"))
}

/// The only container of the task definition, which must be `mesh-agent`.
fn container(td: &Value) -> Result<&Value> {
    let containers = array(td, "/containerDefinitions")?;
    ensure!(
        containers.len() == 1,
        "expected exactly one container, found {}",
        containers.len()
    );
    let c = &containers[0];
    ensure!(string(c, "/name")? == "mesh-agent", "container name");
    Ok(c)
}

/// The `name`/`value` (or `name`/`valueFrom`) entries of a list such as `environment`.
fn named<'a>(list: &'a [Value], name: &str, field: &str) -> Result<&'a str> {
    let found: Vec<&str> = list
        .iter()
        .filter(|e| e.get("name").and_then(Value::as_str) == Some(name))
        .filter_map(|e| e.get(field).and_then(Value::as_str))
        .collect();
    match found.as_slice() {
        [one] => Ok(one),
        [] => bail!("no entry named {name} with a {field}"),
        _ => bail!("{name} is listed {} times", found.len()),
    }
}

/// The host path behind a container path: the mount point and the host volume it names.
fn host_source(td: &Value, container_path: &str) -> Result<(String, bool)> {
    let c = container(td)?;
    let mount = array(c, "/mountPoints")?
        .iter()
        .find(|m| m.get("containerPath").and_then(Value::as_str) == Some(container_path))
        .with_context(|| format!("no mount point at {container_path}"))?;
    let volume = string(mount, "/sourceVolume")?;
    let read_only = mount
        .get("readOnly")
        .map(|v| v.as_bool().context("readOnly is not a boolean"))
        .transpose()?
        .unwrap_or(false);
    let source = array(td, "/volumes")?
        .iter()
        .find(|v| v.get("name").and_then(Value::as_str) == Some(volume))
        .with_context(|| format!("mount point {container_path} names no volume `{volume}`"))?;
    let path = string(source, "/host/sourcePath")
        .with_context(|| format!("volume `{volume}` is not a host volume"))?;
    Ok((path.to_string(), read_only))
}

/// `*` and `?` as in IAM resource patterns.
fn glob_match(pattern: &str, s: &str) -> bool {
    let (p, s): (Vec<char>, Vec<char>) = (pattern.chars().collect(), s.chars().collect());
    // matches[j]: pattern[..i] matches s[..j]
    let mut matches = vec![false; s.len() + 1];
    matches[0] = true;
    for &pc in &p {
        let mut next = vec![false; s.len() + 1];
        if pc == '*' {
            let mut any = false;
            for j in 0..=s.len() {
                any |= matches[j];
                next[j] = any;
            }
        } else {
            for j in 1..=s.len() {
                next[j] = matches[j - 1] && (pc == '?' || pc == s[j - 1]);
            }
        }
        matches = next;
    }
    matches[s.len()]
}

/// A string or an array of strings, as IAM allows for Action and Resource.
fn one_or_many(v: &Value) -> Result<Vec<&str>> {
    match v {
        Value::String(s) => Ok(vec![s.as_str()]),
        Value::Array(items) if !items.is_empty() => items
            .iter()
            .map(|i| i.as_str().context("a list entry is not a string"))
            .collect(),
        _ => bail!("expected a string or a non-empty list of strings, found {v}"),
    }
}

/// Whether the permission policy allows `action` on `resource`.
fn allows(policy: &Value, action: &str, resource: &str) -> Result<bool> {
    for st in array(policy, "/Statement")? {
        if string(st, "/Effect")? != "Allow" {
            continue;
        }
        let (Some(actions), Some(resources)) = (st.get("Action"), st.get("Resource")) else {
            continue;
        };
        if one_or_many(actions)?.iter().any(|a| glob_match(a, action))
            && one_or_many(resources)?
                .iter()
                .any(|r| glob_match(r, resource))
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The raw value of `key` in `[section]` of deploy/mesh.toml, without a trailing comment.
/// Handles the one-line `key = value` forms the file uses; not a TOML parser.
fn toml_value(section: &str, key: &str) -> Result<String> {
    let text = read(MESH_TOML)?;
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(header) = line.strip_prefix('[') {
            current = header.trim_matches(|c| c == '[' || c == ']').to_string();
            continue;
        }
        if current != section {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        if k.trim() != key {
            continue;
        }
        let v = v.trim();
        // A comment starts at the first `#` outside a string.
        let mut in_string = false;
        let end = v
            .char_indices()
            .find(|&(_, c)| {
                if c == '"' {
                    in_string = !in_string;
                }
                c == '#' && !in_string
            })
            .map_or(v.len(), |(i, _)| i);
        return Ok(v[..end].trim().to_string());
    }
    bail!("deploy/{MESH_TOML} has no `{key}` in [{section}]")
}

fn toml_string(section: &str, key: &str) -> Result<String> {
    let raw = toml_value(section, key)?;
    raw.strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .filter(|s| !s.contains(['"', '\\']))
        .map(str::to_string)
        .with_context(|| format!("[{section}] {key} = {raw} is not a simple string"))
}

fn toml_string_list(section: &str, key: &str) -> Result<Vec<String>> {
    let raw = toml_value(section, key)?;
    let inner = raw
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .with_context(|| format!("[{section}] {key} = {raw} is not a one-line list"))?;
    inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.strip_prefix('"')
                .and_then(|r| r.strip_suffix('"'))
                .map(str::to_string)
                .with_context(|| format!("[{section}] {key}: {s} is not a string"))
        })
        .collect()
}

/// `5s`, `500ms`, `2m`: the forms deploy/mesh.toml uses.
fn duration(s: &str) -> Result<Duration> {
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits.parse().with_context(|| format!("duration `{s}`"))?;
    Ok(match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        _ => bail!("duration `{s}`: unit `{unit}` not handled here"),
    })
}

#[test]
fn every_json_artefact_parses_and_is_checked() -> Result<()> {
    let mut found = BTreeSet::new();
    for entry in fs::read_dir(deploy_dir()).context("deploy/ is missing")? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.ends_with(".json") {
            json(&name)?;
            found.insert(name);
        }
    }
    let expected: BTreeSet<String> = JSON_FILES.iter().map(|s| s.to_string()).collect();
    ensure!(
        found == expected,
        "deploy/*.json is {found:?}; this test checks {expected:?}: add checks for new files"
    );
    Ok(())
}

#[test]
fn task_definition_runs_a_privileged_host_daemon_on_ec2() -> Result<()> {
    let td = json(TASK_DEFINITION)?;
    ensure!(string(&td, "/family")? == "mesh-agent", "family");
    ensure!(
        td["requiresCompatibilities"] == serde_json::json!(["EC2"]),
        "requiresCompatibilities must be [\"EC2\"]"
    );
    ensure!(string(&td, "/networkMode")? == "host", "networkMode");
    ensure!(string(&td, "/pidMode")? == "host", "pidMode");
    ensure!(
        string(&td, "/executionRoleArn")?.starts_with("arn:aws:iam::"),
        "executionRoleArn (secrets and logs need it)"
    );
    // The agent calls no AWS API (docs/deploy-ecs.md, "IAM"): it gets no task role.
    ensure!(
        td.get("taskRoleArn").is_none(),
        "taskRoleArn: the agent has no task role"
    );
    let c = container(&td)?;
    ensure!(c["privileged"] == Value::Bool(true), "privileged");
    ensure!(c["essential"] == Value::Bool(true), "essential");
    ensure!(
        string(c, "/image")?.ends_with("/mesh-agent:<version>"),
        "image placeholder"
    );
    ensure!(
        c["command"] == serde_json::json!(["run", "--config", "/etc/mesh/mesh.toml"]),
        "command"
    );
    ensure!(integer(c, "/memoryReservation")? > 0, "memoryReservation");
    ensure!(integer(c, "/cpu")? > 0, "cpu");
    let env = array(c, "/environment")?;
    ensure!(named(env, "MESH_LOG", "value")? == "info", "MESH_LOG");
    ensure!(
        named(env, "MESH_LOG_FORMAT", "value")? == "json",
        "MESH_LOG_FORMAT"
    );
    Ok(())
}

#[test]
fn task_definition_mounts_host_cgroup_bpffs_and_config() -> Result<()> {
    let td = json(TASK_DEFINITION)?;
    for path in ["/sys/fs/cgroup", "/sys/fs/bpf"] {
        let (source, read_only) = host_source(&td, path).with_context(|| path.to_string())?;
        ensure!(source == path, "{path} is backed by host path {source}");
        // The agent attaches programs to task cgroups: the mount must be writable.
        ensure!(!read_only, "{path} must be mounted read-write");
    }
    let (source, _) = host_source(&td, "/etc/mesh")?;
    ensure!(source == "/etc/mesh", "/etc/mesh is backed by {source}");
    Ok(())
}

#[test]
fn trust_secrets_land_in_a_tmpfs_where_mesh_toml_reads_them() -> Result<()> {
    let td = json(TASK_DEFINITION)?;
    let c = container(&td)?;
    let secrets = array(c, "/secrets")?;
    let policy = json(EXECUTION_POLICY)?;
    for name in [BUNDLE_ENV, ISSUER_ENV] {
        let arn = named(secrets, name, "valueFrom")?;
        ensure!(
            arn.starts_with("arn:aws:secretsmanager:"),
            "{name} comes from {arn}"
        );
        ensure!(
            allows(&policy, "secretsmanager:GetSecretValue", arn)?,
            "{EXECUTION_POLICY} does not allow reading {arn}"
        );
        ensure!(
            named(array(c, "/environment")?, name, "value").is_err(),
            "{name} must not also be a plain environment variable"
        );
    }

    let tmpfs = array(c, "/linuxParameters/tmpfs")?;
    ensure!(tmpfs.len() == 1, "one tmpfs expected");
    let dir = string(&tmpfs[0], "/containerPath")?;
    ensure!(integer(&tmpfs[0], "/size")? >= 1, "tmpfs size");

    let bundle = toml_string("identity", "bundle")?;
    let issuer = toml_string("identity", "issuer")?;
    for path in [&bundle, &issuer] {
        ensure!(
            Path::new(path).parent() == Some(Path::new(dir)),
            "{path} (deploy/mesh.toml) is not in the tmpfs {dir}"
        );
    }

    // entryPoint = sh -c SCRIPT $0, command = the agent's arguments ("$@").
    let entry = array(c, "/entryPoint")?;
    ensure!(entry.len() == 4, "entryPoint is [sh, -c, script, $0]");
    ensure!(
        entry[0] == "/bin/sh" && entry[1] == "-c",
        "entryPoint runs sh -c"
    );
    let script = entry[2].as_str().context("script")?;
    let steps: Vec<&str> = script.split("; ").collect();
    let position = |step: &str| {
        steps
            .iter()
            .position(|s| *s == step)
            .with_context(|| format!("the entry point script lacks `{step}`:\n{script}"))
    };
    let umask = position("umask 077")?;
    let write_bundle = position(&format!("printf '%s\\n' \"${BUNDLE_ENV}\" > {bundle}"))?;
    let write_issuer = position(&format!("printf '%s\\n' \"${ISSUER_ENV}\" > {issuer}"))?;
    let unset = position(&format!("unset {BUNDLE_ENV} {ISSUER_ENV}"))?;
    let exec = position(&format!("exec {AGENT_BIN} \"$@\""))?;
    ensure!(
        umask < write_bundle && umask < write_issuer,
        "umask 077 must come before the files are written"
    );
    ensure!(
        write_bundle < unset && write_issuer < unset && unset < exec && exec == steps.len() - 1,
        "the script must write both files, unset the variables, then exec the agent"
    );
    ensure!(
        steps[0] == "set -eu",
        "the script must stop at the first failure"
    );
    ensure!(
        script.contains(&format!("[ \"$p\" = {dir} ] && [ \"$t\" = tmpfs ]")),
        "the script must refuse to write the issuer key unless {dir} is a tmpfs"
    );
    Ok(())
}

#[test]
fn health_check_probes_readiness_on_15021() -> Result<()> {
    let td = json(TASK_DEFINITION)?;
    let c = container(&td)?;
    let check = array(c, "/healthCheck/command")?;
    ensure!(
        check.len() == 2 && check[0] == "CMD-SHELL",
        "healthCheck.command"
    );
    let probe = check[1].as_str().context("probe")?;
    ensure!(
        probe.contains("http://127.0.0.1:15021/healthz/ready") && probe.contains("-f"),
        "the probe must fail on HTTP errors from 127.0.0.1:15021/healthz/ready: {probe}"
    );
    let readiness = toml_string("agent", "readiness_addr")?;
    ensure!(
        readiness == "127.0.0.1:15021" || readiness == "0.0.0.0:15021",
        "deploy/{MESH_TOML} readiness_addr {readiness} is not reachable at 127.0.0.1:15021"
    );
    let interval = integer(c, "/healthCheck/interval")?;
    let timeout = integer(c, "/healthCheck/timeout")?;
    ensure!(
        timeout < interval,
        "healthCheck timeout must be below interval"
    );
    ensure!(integer(c, "/healthCheck/retries")? >= 1, "retries");
    ensure!(integer(c, "/healthCheck/startPeriod")? > 0, "startPeriod");
    Ok(())
}

#[test]
fn stop_timeout_outlasts_the_drain() -> Result<()> {
    let td = json(TASK_DEFINITION)?;
    let stop = Duration::from_secs(integer(container(&td)?, "/stopTimeout")?.try_into()?);
    let drain = duration(&toml_string("agent", "drain_timeout")?)?;
    // Draining: detach, 200 ms accept grace, then up to drain_timeout for open connections.
    ensure!(stop > Duration::from_secs(5), "stopTimeout {stop:?}");
    ensure!(
        stop >= drain + Duration::from_secs(2),
        "stopTimeout {stop:?} leaves the {drain:?} drain no margin before SIGKILL"
    );
    ensure!(
        stop <= Duration::from_secs(120),
        "ECS caps stopTimeout at 120 s"
    );
    Ok(())
}

#[test]
fn logs_go_to_cloudwatch() -> Result<()> {
    let td = json(TASK_DEFINITION)?;
    let c = container(&td)?;
    ensure!(
        string(c, "/logConfiguration/logDriver")? == "awslogs",
        "logDriver"
    );
    let group = string(c, "/logConfiguration/options/awslogs-group")?;
    string(c, "/logConfiguration/options/awslogs-region")?;
    string(c, "/logConfiguration/options/awslogs-stream-prefix")?;
    let stream = format!("arn:aws:logs:<region>:<account>:log-group:{group}:log-stream:x");
    let policy = json(EXECUTION_POLICY)?;
    for action in ["logs:CreateLogStream", "logs:PutLogEvents"] {
        ensure!(
            allows(&policy, action, &stream)?,
            "{EXECUTION_POLICY} does not allow {action} in {group}"
        );
    }
    Ok(())
}

#[test]
fn service_is_a_daemon_that_can_roll() -> Result<()> {
    let svc = json(SERVICE)?;
    let td = json(TASK_DEFINITION)?;
    ensure!(
        string(&svc, "/schedulingStrategy")? == "DAEMON",
        "schedulingStrategy"
    );
    ensure!(
        svc.get("desiredCount").is_none(),
        "a daemon service has no desiredCount"
    );
    ensure!(
        svc.get("placementStrategy").is_none(),
        "a daemon service takes no placementStrategy"
    );
    ensure!(
        string(&svc, "/taskDefinition")? == string(&td, "/family")?,
        "taskDefinition"
    );
    ensure!(string(&svc, "/launchType")? == "EC2", "launchType");
    ensure!(
        integer(&svc, "/deploymentConfiguration/maximumPercent")? == 100,
        "maximumPercent must be 100: one agent per instance"
    );
    // With maximumPercent 100 the old agent must stop before the new one starts; 100 would
    // deadlock every deployment.
    let min = integer(&svc, "/deploymentConfiguration/minimumHealthyPercent")?;
    ensure!((0..100).contains(&min), "minimumHealthyPercent {min}");
    let mesh_families = toml_string_list("ecs", "exclude_families")?;
    ensure!(
        mesh_families.iter().any(|f| f == "mesh-agent"),
        "deploy/{MESH_TOML} must exclude the agent's own family from meshing"
    );
    Ok(())
}

#[test]
fn iam_policies_are_valid_policy_documents() -> Result<()> {
    for (name, trust) in [(EXECUTION_POLICY, false), (EXECUTION_TRUST, true)] {
        let doc = json(name)?;
        let check = || -> Result<()> {
            ensure!(string(&doc, "/Version")? == "2012-10-17", "Version");
            let statements = array(&doc, "/Statement")?;
            ensure!(!statements.is_empty(), "Statement is empty");
            let mut sids = HashSet::new();
            for (i, st) in statements.iter().enumerate() {
                let at = |what: &str| format!("Statement[{i}]: {what}");
                if let Some(sid) = st.get("Sid") {
                    let sid = sid.as_str().with_context(|| at("Sid"))?;
                    ensure!(
                        sid.chars().all(|c| c.is_ascii_alphanumeric()) && sids.insert(sid),
                        at("Sid must be alphanumeric and unique")
                    );
                }
                ensure!(
                    matches!(string(st, "/Effect")?, "Allow" | "Deny"),
                    at("Effect")
                );
                let actions = st.get("Action").with_context(|| at("no Action"))?;
                for action in one_or_many(actions).with_context(|| at("Action"))? {
                    let (service, op) = action.split_once(':').unwrap_or_default();
                    ensure!(
                        !service.is_empty() && !op.is_empty(),
                        at(&format!("`{action}` is not service:Action"))
                    );
                }
                if trust {
                    ensure!(st.get("Principal").is_some(), at("no Principal"));
                    ensure!(
                        st.get("Resource").is_none(),
                        at("a trust policy has no Resource")
                    );
                } else {
                    ensure!(
                        st.get("Principal").is_none(),
                        at("Principal in a role policy")
                    );
                    let resources = st.get("Resource").with_context(|| at("no Resource"))?;
                    for r in one_or_many(resources).with_context(|| at("Resource"))? {
                        ensure!(r == "*" || r.starts_with("arn:aws:"), at("Resource ARN"));
                    }
                }
            }
            Ok(())
        };
        check().with_context(|| format!("deploy/{name}"))?;
    }
    let trust = json(EXECUTION_TRUST)?;
    ensure!(
        string(&trust, "/Statement/0/Principal/Service")? == "ecs-tasks.amazonaws.com",
        "the execution role is assumed by ecs-tasks.amazonaws.com"
    );
    Ok(())
}

#[test]
fn glob_matches_like_iam() {
    assert!(glob_match("a-??????", "a-XXXXXX"));
    assert!(!glob_match("a-??????", "a-XXXXX"));
    assert!(glob_match(
        "log-group:/ecs/x:*",
        "log-group:/ecs/x:log-stream:y"
    ));
    assert!(!glob_match("log-group:/ecs/x:*", "log-group:/ecs/xy:z"));
    assert!(glob_match("*", ""));
}

/// The example configuration is one the agent accepts: `mesh-agent check-config` on
/// deploy/mesh.toml, with its trust files (on the daemon's tmpfs in production) replaced by a
/// fresh trust directory made by `mesh-agent trust init` for the file's trust domain.
#[test]
fn example_configuration_passes_check_config() -> Result<()> {
    let bin = mesh_testbed::agent::default_bin();
    ensure!(
        bin.is_file(),
        "agent binary {} not found: build it (cargo build -p mesh-agent) or set MESH_AGENT_BIN",
        bin.display()
    );
    let text = fs::read_to_string(deploy_dir().join(MESH_TOML))?;
    let trust_domain = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("trust_domain"))
        .and_then(|rest| rest.split('"').nth(1))
        .context("deploy/mesh.toml has no identity.trust_domain")?;
    let dir = std::env::temp_dir().join(format!("mesh-deploy-check-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let trust = dir.join("trust");
    let init = std::process::Command::new(&bin)
        .args(["trust", "init", "--dir"])
        .arg(&trust)
        .args(["--trust-domain", trust_domain])
        .output()?;
    ensure!(
        init.status.success(),
        "trust init: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    let local = text
        .replace(
            "/run/mesh/bundle.pem",
            &trust.join("bundle.pem").to_string_lossy(),
        )
        .replace(
            "/run/mesh/issuer.pem",
            &trust.join("issuer.pem").to_string_lossy(),
        );
    ensure!(
        local != text,
        "deploy/mesh.toml does not read its trust files from /run/mesh"
    );
    let config = dir.join("mesh.toml");
    fs::write(&config, local)?;
    let check = std::process::Command::new(&bin)
        .args(["check-config", "--config"])
        .arg(&config)
        .output()?;
    let _ = fs::remove_dir_all(&dir);
    ensure!(
        check.status.success(),
        "check-config rejected deploy/mesh.toml: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    Ok(())
}
