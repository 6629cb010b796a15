//! L7 routing of gRPC and the route idle timeout, end to end.
//!
//! * gRPC: serviceA (task a, node 1) makes unary calls to `greeter.apps.local` at the virtual
//!   service's address; a `grpc` route sends them to virtual node greeter (task g on node 2,
//!   `mesh-testkit grpc-serve`) over the mutual-TLS tunnel. The gRPC status comes back
//!   unchanged and `istio_requests_total` counts the calls per `grpc_response_status`.
//! * Idle timeout: a keep-alive HTTP/1.1 connection to a virtual service whose route has
//!   `timeout.idle = "1s"` is closed by the agent about 1 s after its last request, while one
//!   to a virtual service with `idle = "30s"` stays open.
//!
//! Needs root, cgroup v2, iproute2, bash and coreutils (`timeout`, `date`, `cat`).

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use mesh_testbed::mesh::{MeshConfig, TwoNodes, endpoint_section, spiffe_id};
use mesh_testbed::{Agent, Process, ServeMode, Task, Testkit, run_with_timeout};

/// What applications resolve `greeter.apps.local` to.
const GREETER_VIP: &str = "198.18.251.1";
const GRPC_PORT: u16 = 50051;
const GREETER: &str = "greeter.apps.local";

/// Starts `mesh-testkit grpc-serve` in `task` on `listen`; killed when dropped.
fn grpc_serve(kit: &Testkit, task: &Task, listen: SocketAddr, log: &Path) -> Result<Process> {
    let mut command = task.command(kit.bin())?;
    command
        .args(["grpc-serve", "--listen", &listen.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(File::create(log)?);
    let mut process = Process::spawn(&mut command)?;
    let stdout = process
        .child_mut()
        .stdout
        .take()
        .context("no stdout pipe")?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let _ = tx.send(lines.next());
        lines.for_each(drop);
    });
    match rx.recv_timeout(Duration::from_secs(5)) {
        Ok(Some(Ok(line))) if line.starts_with("listening on ") => Ok(process),
        other => bail!(
            "grpc-serve on {listen} in task {} did not start ({other:?}); stderr: {}",
            task.id(),
            std::fs::read_to_string(log).unwrap_or_default().trim()
        ),
    }
}

/// One unary call from `task` to the greeter's address; returns the grpc-status.
fn grpc_call(kit: &Testkit, task: &Task, path: &str) -> Result<u32> {
    let mut command = task.command(kit.bin())?;
    command.args([
        "grpc-call",
        "--connect",
        &format!("{GREETER_VIP}:{GRPC_PORT}"),
        "--path",
        path,
        "--authority",
        &format!("{GREETER}:{GRPC_PORT}"),
        "--timeout",
        "20",
    ]);
    let out = run_with_timeout(&mut command, Duration::from_secs(30))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "grpc-call {path} failed ({}): {} {}",
        out.status,
        stdout.trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    stdout
        .split_whitespace()
        .find_map(|w| w.strip_prefix("status="))
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status=N in grpc-call's output {stdout:?}"))
}

fn grpc_routing(endpoint: &str) -> String {
    format!(
        r#"
[[virtual_services]]
name = "{GREETER}"
addresses = ["{GREETER_VIP}"]
provider = {{ virtual_router = "greeter-router" }}

[[virtual_routers]]
name = "greeter-router"
listeners = [{{ port = {GRPC_PORT}, protocol = "grpc" }}]

[[virtual_nodes]]
name = "greeter"
endpoint = "{endpoint}"
listeners = [{{ port = {GRPC_PORT}, protocol = "grpc" }}]

[[routes]]
name = "greeter"
virtual_router = "greeter-router"
kind = "grpc"
match.service_name = "pkg.Greeter"
action.weighted_targets = [{{ virtual_node = "greeter", weight = 100 }}]
"#
    )
}

#[test]
fn grpc_unary_calls_are_routed_with_their_status_and_counted() {
    let result = (|| -> Result<()> {
        let kit = Testkit::new(env!("CARGO_BIN_EXE_mesh-testkit"))?;
        let TwoNodes {
            topology,
            n1,
            n2,
            trust,
        } = TwoNodes::new()?;
        let a = n1.add_task("a")?;
        let g = n2.add_task("g")?;
        let server_log = topology.dir().join("grpc-serve-g.log");
        let _server = grpc_serve(
            &kit,
            &g,
            SocketAddr::new(g.ip().into(), GRPC_PORT),
            &server_log,
        )?;

        let node1 = MeshConfig::new(&trust)
            .task(&a, "serviceA")
            .raw(&endpoint_section(&g, "greeter"))
            .raw(&grpc_routing(g.id()))
            .render();
        let node2 = MeshConfig::new(&trust)
            .task(&g, "greeter")
            .endpoint(&a, "serviceA")
            .render();
        let agent1 = Agent::start(&n1, &node1)?;
        let _agent2 = Agent::start(&n2, &node2)?;

        const OK_CALLS: usize = 3;
        const FAILED_CALLS: usize = 2;
        for i in 0..OK_CALLS {
            let status = grpc_call(&kit, &a, "/pkg.Greeter/SayHello")
                .with_context(|| format!("call {i}"))?;
            ensure!(status == 0, "SayHello answered grpc-status {status}, not 0");
        }
        for i in 0..FAILED_CALLS {
            let status =
                grpc_call(&kit, &a, "/pkg.Greeter/Fail").with_context(|| format!("call {i}"))?;
            ensure!(status == 5, "Fail answered grpc-status {status}, not 5");
        }
        // No route matches another service: the agent answers UNIMPLEMENTED itself (the
        // server would have answered 0).
        let status = grpc_call(&kit, &a, "/pkg.Other/SayHello")?;
        ensure!(
            status == 12,
            "an unrouted call answered grpc-status {status}, not 12"
        );

        let id_a = spiffe_id("serviceA");
        let id_g = spiffe_id("greeter");
        for (grpc_status, calls) in [("0", OK_CALLS), ("5", FAILED_CALLS)] {
            let labels = [
                ("reporter", "source"),
                ("source_principal", id_a.as_str()),
                ("destination_workload", "greeter"),
                ("destination_principal", id_g.as_str()),
                ("destination_service", GREETER),
                ("request_protocol", "grpc"),
                ("response_code", "200"),
                ("grpc_response_status", grpc_status),
                ("connection_security_policy", "mutual_tls"),
            ];
            agent1
                .wait_metric(
                    "istio_requests_total",
                    &labels,
                    Duration::from_secs(5),
                    |v| v as usize == calls,
                )
                .with_context(|| {
                    format!(
                        "grpc_response_status={grpc_status}; series: {:?}",
                        agent1.samples("istio_requests_total", &[])
                    )
                })?;
        }
        agent1.wait_metric(
            "istio_requests_total",
            &[
                ("reporter", "source"),
                ("destination_service", GREETER),
                ("request_protocol", "grpc"),
                ("response_code", "200"),
                ("grpc_response_status", "12"),
                ("response_flags", "NR"),
            ],
            Duration::from_secs(5),
            |v| v == 1.0,
        )?;
        Ok(())
    })();
    if let Err(e) = result {
        panic!("{e:?}");
    }
}

const IDLE_VIP_SHORT: &str = "198.18.251.11";
const IDLE_VIP_LONG: &str = "198.18.251.12";
const HTTP_PORT: u16 = 8080;

/// Two virtual services in front of the same virtual node, one per idle timeout.
fn idle_routing(endpoint: &str) -> String {
    let mut out = format!(
        r#"
[[virtual_nodes]]
name = "web"
endpoint = "{endpoint}"
listeners = [{{ port = {HTTP_PORT}, protocol = "http" }}]
"#
    );
    for (name, vip, idle) in [
        ("short", IDLE_VIP_SHORT, "1s"),
        ("long", IDLE_VIP_LONG, "30s"),
    ] {
        out.push_str(&format!(
            r#"
[[virtual_services]]
name = "{name}.apps.local"
addresses = ["{vip}"]
provider = {{ virtual_router = "{name}" }}

[[virtual_routers]]
name = "{name}"
listeners = [{{ port = {HTTP_PORT}, protocol = "http" }}]

[[routes]]
name = "{name}"
virtual_router = "{name}"
match.prefix = "/"
action.weighted_targets = [{{ virtual_node = "web", weight = 100 }}]
timeout.idle = "{idle}"
"#
        ));
    }
    out
}

/// In the task: open a connection, send one keep-alive HTTP/1.1 request, read the status
/// line, then wait at most `$4` seconds for the connection to close. Prints
/// `status=<status line> closed_rc=<0: closed, 124: still open> idle_ms=<ms waited>`.
const IDLE_PROBE: &str = r#"
exec 3<>"/dev/tcp/$1/$2" || exit 3
printf 'GET /idle HTTP/1.1\r\nHost: %s\r\n\r\n' "$3" >&3
IFS= read -r -t 10 status <&3 || { echo "no response"; exit 4; }
t0=$(date +%s%N)
timeout "$4" cat <&3 >/dev/null
rc=$?
t1=$(date +%s%N)
echo "status=${status%$'\r'} closed_rc=$rc idle_ms=$(( (t1 - t0) / 1000000 ))"
"#;

struct Probe {
    status: String,
    closed: bool,
    idle: Duration,
}

fn idle_probe(task: &Task, vip: &str, host: &str, wait_secs: u32) -> Result<Process> {
    let mut command = task.command("bash")?;
    command
        .args(["-c", IDLE_PROBE, "idle-probe", vip, &HTTP_PORT.to_string()])
        .arg(host)
        .arg(wait_secs.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    Process::spawn(&mut command)
}

fn probe_result(mut process: Process, what: &str) -> Result<Probe> {
    let status = process
        .wait_timeout(Duration::from_secs(20))?
        .with_context(|| format!("the {what} probe did not finish"))?;
    let child = process.child_mut();
    let mut stdout = String::new();
    let mut stderr = String::new();
    if let Some(mut out) = child.stdout.take() {
        out.read_to_string(&mut stdout)?;
    }
    if let Some(mut err) = child.stderr.take() {
        err.read_to_string(&mut stderr)?;
    }
    ensure!(
        status.success(),
        "the {what} probe failed ({status}): {} {}",
        stdout.trim(),
        stderr.trim()
    );
    // `status=HTTP/1.1 200 OK closed_rc=0 idle_ms=1003`
    let parsed = stdout.trim().strip_prefix("status=").and_then(|rest| {
        let (status, rest) = rest.split_once(" closed_rc=")?;
        let (rc, ms) = rest.split_once(" idle_ms=")?;
        Some((status, rc.parse::<i32>().ok()?, ms.parse::<u64>().ok()?))
    });
    let Some((status, rc, ms)) = parsed else {
        bail!("unexpected output of the {what} probe: {stdout:?} {stderr:?}");
    };
    ensure!(
        rc == 0 || rc == 124,
        "the {what} probe's cat ended with {rc}: {stdout:?}"
    );
    Ok(Probe {
        status: status.to_owned(),
        closed: rc == 0,
        idle: Duration::from_millis(ms),
    })
}

#[test]
fn a_route_idle_timeout_closes_an_idle_application_connection() {
    let result = (|| -> Result<()> {
        let kit = Testkit::new(env!("CARGO_BIN_EXE_mesh-testkit"))?;
        let TwoNodes {
            topology: _topology,
            n1,
            n2,
            trust,
        } = TwoNodes::new()?;
        let a = n1.add_task("a")?;
        let b = n2.add_task("b")?;
        let _server = kit.serve(
            &b,
            SocketAddr::new(b.ip().into(), HTTP_PORT),
            ServeMode::Http,
        )?;

        let node1 = MeshConfig::new(&trust)
            .task(&a, "serviceA")
            .raw(&endpoint_section(&b, "web"))
            .raw(&idle_routing(b.id()))
            .render();
        let node2 = MeshConfig::new(&trust)
            .task(&b, "web")
            .endpoint(&a, "serviceA")
            .render();
        let _agent1 = Agent::start(&n1, &node1)?;
        let _agent2 = Agent::start(&n2, &node2)?;

        // Both connections idle over the same period: the short one must close, the long
        // one must still be open when the probe gives up after 5 s.
        let short = idle_probe(&a, IDLE_VIP_SHORT, "short.apps.local", 5)?;
        let long = idle_probe(&a, IDLE_VIP_LONG, "long.apps.local", 5)?;
        let short = probe_result(short, "idle 1s")?;
        let long = probe_result(long, "idle 30s")?;
        println!(
            "idle 1s: closed={} after {:?}; idle 30s: closed={} after {:?}",
            short.closed, short.idle, long.closed, long.idle
        );
        for probe in [&short, &long] {
            ensure!(
                probe.status.starts_with("HTTP/1.1 200"),
                "the request was answered {:?}",
                probe.status
            );
        }
        ensure!(
            short.closed,
            "the connection with idle = 1s was still open after {:?}",
            short.idle
        );
        ensure!(
            (Duration::from_millis(800)..=Duration::from_secs(3)).contains(&short.idle),
            "the connection with idle = 1s closed after {:?}, expected 0.8 s to 3 s",
            short.idle
        );
        ensure!(
            !long.closed,
            "the connection with idle = 30s closed after {:?}",
            long.idle
        );
        Ok(())
    })();
    if let Err(e) = result {
        panic!("{e:?}");
    }
}
