//! Acceptance of "Workload identity and the mutual-TLS tunnel between nodes": two linked
//! nodes, an agent on each, task `a` on node 1 (198.18.1.2, role `a`) and task `b` on
//! node 2 (198.18.2.2, role `b`), one trust directory made by `mesh-agent trust init`.
//!
//! These tests need root, cgroup v2, iproute2, curl, openssl and tcpdump, and the agent
//! binary (`MESH_AGENT_BIN`, else target/debug/mesh-agent). Without them they fail, with
//! the reason; they never skip. Every negative check has a positive control in the same
//! test: a probe that must be refused is run beside one that must be accepted.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::process::{ChildStdin, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use mesh_testbed::mesh::{
    MeshConfig, TUNNEL_PORT, TrustDir, TrustInit, TwoNodes, role_arn, spiffe_id, spiffe_id_in,
    wait_for,
};
use mesh_testbed::pcap::LinkCapture;
use mesh_testbed::pki::{CertFiles, TestCa, Validity};
use mesh_testbed::testkit::LoadOptions;
use mesh_testbed::tls::{ProbeReport, TlsProbe, TlsVersion, Verdict};
use mesh_testbed::{
    Agent, Launch, LoadClient, Node, Process, ServeMode, Task, Testkit, Topology, netns,
    require_root, require_tools, run_with_timeout,
};

const SHORT: Duration = Duration::from_secs(10);
/// How long a metric may lag behind what it counts.
const METRIC_LAG: Duration = Duration::from_secs(5);
/// How long an agent may take to notice a changed trust file (polled every 500 ms) and
/// act on it.
const TRUST_LAG: Duration = Duration::from_secs(15);

const TCP_OPENED: &str = "istio_tcp_connections_opened_total";
const TCP_SENT: &str = "istio_tcp_sent_bytes_total";
const TCP_CLOSED: &str = "istio_tcp_connections_closed_total";
const TCP_RESET: &str = "mesh_tcp_connections_reset_total";
const TUNNEL_OPENED: &str = "mesh_tunnel_connections_opened_total";
const STREAMS_OPENED: &str = "mesh_tunnel_streams_opened_total";
const HANDSHAKE_ERRORS: &str = "mesh_tunnel_handshake_errors_total";
const DENIALS: &str = "mesh_policy_denials_total";
const ANCHOR_EXPIRY: &str = "mesh_trust_anchor_expiry_timestamp_seconds";
const ISSUER_EXPIRY: &str = "mesh_issuer_expiry_timestamp_seconds";
const LEAF_EXPIRY: &str = "mesh_workload_cert_expiry_timestamp_seconds";
const RELOADS: &str = "mesh_config_reloads_total";
const CONNECT_ERRORS: &str = "mesh_connect_errors_total";
const TUNNEL_ACTIVE: &str = "mesh_tunnel_connections_active";
const CAPTURED: &str = "mesh_connections_captured_total";
const RETIRED: &str = "mesh_tunnel_connections_retired_total";
/// The label value of an unknown workload or principal.
const UNKNOWN: &str = "unknown";

/// Two linked nodes with task `a` on node 1 and task `b` on node 2, and a trust directory.
struct Mesh {
    // Field order is drop order: nothing here outlives the topology.
    kit: Testkit,
    trust: TrustDir,
    a: Task,
    b: Task,
    n1: Node,
    n2: Node,
    topology: Topology,
}

impl Mesh {
    /// Node 1's agent config: task `a` (role `a`), endpoint `b` (role `b`).
    fn node1(&self) -> MeshConfig {
        MeshConfig::new(&self.trust)
            .task(&self.a, "a")
            .endpoint(&self.b, "b")
    }

    /// Node 2's agent config: task `b` (role `b`), endpoint `a` (role `a`).
    fn node2(&self) -> MeshConfig {
        MeshConfig::new(&self.trust)
            .task(&self.b, "b")
            .endpoint(&self.a, "a")
    }
}

/// Runs `body` on a fresh two-node mesh. An error fails the test by panicking while the
/// topology still exists, so the teardown prints the agents' logs and keeps them on disk.
fn with_mesh(init: TrustInit, body: impl FnOnce(&Mesh) -> Result<()>) {
    let m = mesh(init).unwrap_or_else(|e| panic!("test prerequisites: {e:#}"));
    if let Err(e) = body(&m) {
        panic!("{e:?}");
    }
}

fn mesh(init: TrustInit) -> Result<Mesh> {
    require_root()?;
    require_tools(&["ip", "curl", "openssl", "tcpdump"])?;
    let kit = Testkit::new(env!("CARGO_BIN_EXE_mesh-testkit"))?;
    let TwoNodes {
        topology,
        n1,
        n2,
        trust,
    } = TwoNodes::with_trust(&init)?;
    let a = n1.add_task("a")?;
    let b = n2.add_task("b")?;
    Ok(Mesh {
        kit,
        trust,
        a,
        b,
        n1,
        n2,
        topology,
    })
}

fn addr(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

/// What curl did.
struct Curl {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

impl Curl {
    fn ok(&self) -> bool {
        self.code == Some(0)
    }

    fn describe(&self) -> String {
        format!(
            "curl exit {:?} after {:?}; stdout: {:?}; stderr: {:?}",
            self.code,
            self.elapsed,
            self.stdout.trim(),
            self.stderr.trim()
        )
    }
}

/// `curl -sS --max-time 5 URL EXTRA...` inside `task` (so the agent captures it).
fn curl(task: &Task, url: &str, extra: &[&str]) -> Result<Curl> {
    let mut command = task.command("curl")?;
    command
        .args(["-sS", "--max-time", "5"])
        .args(extra)
        .arg(url);
    let started = Instant::now();
    let out = run_with_timeout(&mut command, SHORT)?;
    Ok(Curl {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: started.elapsed(),
    })
}

/// Fails with curl's output unless it succeeded.
fn curl_ok(task: &Task, url: &str, extra: &[&str]) -> Result<String> {
    let c = curl(task, url, extra)?;
    ensure!(
        c.ok(),
        "curl {url} in task {} failed: {}",
        task.id(),
        c.describe()
    );
    Ok(c.stdout)
}

/// `curl -v URL` inside `task`, which must fail quickly with its connection reset (RST):
/// "Connection reset by peer" while connecting (exit 7: the agent reset it before curl
/// checked the connect), sending (55) or receiving (56), within a second. A timeout (28),
/// an empty reply after a FIN (52), a refused connect ("Connection refused": the
/// connection was not carried by the agent) or a slow failure are not what a refused mesh
/// connection must look like to the application. Prints and returns what curl did.
fn curl_reset(task: &Task, url: &str, what: &str) -> Result<Curl> {
    let c = curl(task, url, &["-v"])?;
    println!("{what}: {}", c.describe());
    ensure!(
        matches!(c.code, Some(7 | 55 | 56))
            && c.stderr.contains("Connection reset by peer")
            && c.elapsed < Duration::from_secs(1),
        "{what}: expected a fast reset (curl exit 7/55/56 with \"Connection reset by peer\", under 1 s): {}",
        c.describe()
    );
    Ok(c)
}

/// Every label of an Istio TCP metric sample, so a lookup matches exactly one series.
fn hop_labels<'a>(
    reporter: &'a str,
    source: (&'a str, &'a str),
    destination: (&'a str, &'a str),
    security_policy: &'a str,
) -> [(&'a str, &'a str); 6] {
    [
        ("reporter", reporter),
        ("source_workload", source.0),
        ("source_principal", source.1),
        ("destination_workload", destination.0),
        ("destination_principal", destination.1),
        ("connection_security_policy", security_policy),
    ]
}

/// Whether a plain TCP connection from `netns` to `target` is accepted (within 2 s).
fn tcp_accepts(netns: &std::path::Path, target: SocketAddr) -> Result<bool> {
    netns::run_in(netns, || {
        std::net::TcpStream::connect_timeout(&target, Duration::from_secs(2)).is_ok()
    })
}

/// A marker no packet contains by chance.
fn marker(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{what}-{}-{nanos:09}", std::process::id())
}

fn mtls_labels<'a>(
    reporter: &'a str,
    source: &'a str,
    destination: &'a str,
) -> [(&'a str, &'a str); 4] {
    [
        ("reporter", reporter),
        ("source_principal", source),
        ("destination_principal", destination),
        ("connection_security_policy", "mutual_tls"),
    ]
}

/// A request from task a reaches b's server through the tunnel: it works, only TLS on
/// port 15008 crosses the link between the nodes (the marker in the request and the
/// response never appears there, while a control datagram does), and both agents report
/// the connection with both SPIFFE identities as mutual TLS.
#[test]
fn request_crosses_nodes_encrypted_with_both_identities_reported() {
    with_mesh(TrustInit::default(), |m| {
        let server = m
            .kit
            .serve(&m.b, addr(m.b.ip(), 8080), ServeMode::HttpEcho)?;
        let agent1 = Agent::start(&m.n1, &m.node1().render())?;
        let agent2 = Agent::start(&m.n2, &m.node2().render())?;
        let (id_a, id_b) = (spiffe_id("a"), spiffe_id("b"));

        let capture = LinkCapture::start(&m.n1, "to-node2")?;
        // Control: a datagram sent in clear across the same link must show up in the
        // capture, so the absence of the secret below means something.
        let control = marker("mesh-control");
        let dst = addr(m.b.ip(), 9);
        netns::run_in(&m.n1.netns_path(), || -> std::io::Result<()> {
            UdpSocket::bind("0.0.0.0:0")?.send_to(control.as_bytes(), dst)?;
            Ok(())
        })??;
        let secret = marker("mesh-secret");
        let body = curl_ok(
            &m.a,
            &format!("http://{}/{secret}", server.addr()),
            &["-H", &format!("X-Secret: {secret}")],
        )?;
        let pcap = capture.stop()?;
        println!("response: {body:?}");
        ensure!(
            body.contains(&format!("request=GET /{secret} ")),
            "the server's answer does not carry the request's marker: {body:?}"
        );

        ensure!(
            pcap.contains(control.as_bytes()),
            "the control marker sent in clear is not in the capture: the capture is blind"
        );
        ensure!(
            !pcap.contains(secret.as_bytes()),
            "the marker crossed the link in clear text ({})",
            m.topology.dir().display()
        );
        let (on_tunnel, with_data) = pcap.tcp_port_counts(TUNNEL_PORT);
        println!(
            "link capture: {} frames, {on_tunnel} TCP packets on port {TUNNEL_PORT} ({with_data} with data), TCP ports seen: {:?}",
            pcap.frames,
            pcap.tcp_ports()
        );
        ensure!(
            with_data >= 2,
            "no data on port {TUNNEL_PORT} crossed the link ({on_tunnel} packets): the request did not go through the tunnel"
        );
        let (app_port, _) = pcap.tcp_port_counts(8080);
        ensure!(
            app_port == 0,
            "{app_port} packets to or from the application port 8080 crossed the link: traffic bypassed the tunnel"
        );

        // Both agents saw a mutual-TLS connection between the two identities.
        let source = mtls_labels("source", &id_a, &id_b);
        agent1.wait_metric(TCP_OPENED, &source, METRIC_LAG, |v| v >= 1.0)?;
        agent1.wait_metric(
            TCP_OPENED,
            &[
                ("reporter", "source"),
                ("source_workload", "a"),
                ("destination_workload", "b"),
            ],
            METRIC_LAG,
            |v| v >= 1.0,
        )?;
        let destination = mtls_labels("destination", &id_a, &id_b);
        agent2.wait_metric(TCP_OPENED, &destination, METRIC_LAG, |v| v >= 1.0)?;
        agent1.wait_metric(TCP_SENT, &source, METRIC_LAG, |v| v > 0.0)?;
        // Control of the labels: nothing was reported as plain TCP.
        for (agent, reporter) in [(&agent1, "source"), (&agent2, "destination")] {
            let plain = agent.metric_sum(
                TCP_OPENED,
                &[
                    ("reporter", reporter),
                    ("connection_security_policy", "none"),
                ],
            )?;
            ensure!(
                plain == 0.0,
                "{} reported {plain} plain-TCP connections",
                agent.node().name()
            );
        }
        Ok(())
    })
}

/// b's tunnel listener accepts only mutual TLS 1.3 with a current leaf of the mesh's
/// trust domain: without a client certificate, with a leaf of another CA, of another
/// trust domain (minted by the real issuer), expired, or over TLS 1.2, the handshake is
/// refused; the same probe with a valid leaf is accepted and answered in HTTP/2, before
/// and after the refusals.
#[test]
fn tunnel_refuses_clients_without_a_valid_identity() {
    with_mesh(TrustInit::default(), |m| {
        let _agent1 = Agent::start(&m.n1, &m.node1().render())?;
        let agent2 = Agent::start(&m.n2, &m.node2().render())?;
        let dir = m.topology.dir().join("probe-certs");
        let issuer = m.trust.issuer_ca()?;
        let valid = issuer.mint(&spiffe_id("a"), Validity::Current, &dir, "valid")?;
        let other_domain = issuer.mint(
            &spiffe_id_in("other.test", "a"),
            Validity::Current,
            &dir,
            "other-domain",
        )?;
        let expired = issuer.mint(&spiffe_id("a"), Validity::Expired, &dir, "expired")?;
        let other_ca = TestCa::self_signed("not the mesh")?.mint(
            &spiffe_id("a"),
            Validity::Current,
            &dir,
            "other-ca",
        )?;

        let target = addr(m.b.ip(), TUNNEL_PORT);
        // Probes run on node 1's host namespace (outside every task) and cross the link,
        // verifying b's certificate against the bundle.
        let base = TlsProbe::new(target).verify_server(m.trust.bundle());
        let probe = |name: &str, probe: &TlsProbe| -> Result<ProbeReport> {
            let report = probe.run(m.n1.command("openssl")?)?;
            println!("{name}: {}", report.summary());
            Ok(report)
        };
        let expect_accepted = |name: &str, report: &ProbeReport| -> Result<()> {
            ensure!(
                report.verdict == Verdict::AcceptedHttp2
                    && report.protocol.as_deref() == Some("TLSv1.3"),
                "{name}: a valid leaf over TLS 1.3 must be accepted and answered in HTTP/2: {report}"
            );
            Ok(())
        };

        let inbound = [("direction", "inbound")];
        let errors_before = agent2.metric_sum(HANDSHAKE_ERRORS, &inbound)?;
        let opened_before = agent2.metric_sum(TUNNEL_OPENED, &inbound)?;

        let first = probe("valid leaf (before)", &base.clone().client_cert(&valid))?;
        expect_accepted("valid leaf (before)", &first)?;

        let refused: [(&str, TlsProbe); 5] = [
            ("no client certificate", base.clone()),
            ("leaf of another CA", base.clone().client_cert(&other_ca)),
            (
                "leaf of another trust domain",
                base.clone().client_cert(&other_domain),
            ),
            ("expired leaf", base.clone().client_cert(&expired)),
            (
                "TLS 1.2 with a valid leaf",
                base.clone().client_cert(&valid).version(TlsVersion::Tls12),
            ),
        ];
        let mut failures = Vec::new();
        for (name, p) in &refused {
            let report = probe(name, p)?;
            if report.verdict != Verdict::Rejected {
                failures.push(format!("{name}: must be refused: {report}"));
            }
        }

        let last = probe("valid leaf (after)", &base.clone().client_cert(&valid))?;
        expect_accepted("valid leaf (after)", &last)?;
        ensure!(failures.is_empty(), "{}", failures.join("\n"));

        let errors = agent2.wait_metric_sum(HANDSHAKE_ERRORS, &inbound, METRIC_LAG, |v| {
            v >= errors_before + refused.len() as f64
        });
        let by_reason: Vec<String> = agent2
            .samples(HANDSHAKE_ERRORS, &inbound)?
            .iter()
            .map(|s| format!("{}={}", s.label("reason").unwrap_or("?"), s.value))
            .collect();
        println!(
            "inbound handshake errors on node 2: {}",
            by_reason.join(" ")
        );
        errors.with_context(|| {
            format!(
                "{} refused probes, handshake errors by reason: {}",
                refused.len(),
                by_reason.join(" ")
            )
        })?;
        // One tunnel connection per completed handshake: the two valid probes only.
        let opened = agent2.metric_sum(TUNNEL_OPENED, &inbound)? - opened_before;
        ensure!(
            opened == 2.0,
            "inbound tunnel connections opened during the probes: {opened}, expected 2 (the valid ones)"
        );
        Ok(())
    })
}

/// A policy on node 2 that allows only role `c` refuses task a (quickly, as a reset)
/// while it lets task c (also on node 1) through; once node 2's config allows a, the
/// same agent process lets a through.
#[test]
fn policy_denies_a_source_until_a_reload_allows_it() {
    with_mesh(TrustInit::default(), |m| {
        let c = m.n1.add_task("c")?;
        let server = m.kit.serve(&m.b, addr(m.b.ip(), 8080), ServeMode::Http)?;
        let url = format!("http://{}/", server.addr());
        let _agent1 = Agent::start(&m.n1, &m.node1().task(&c, "c").render())?;
        let only_c = m
            .node2()
            .endpoint(&c, "c")
            .policy("b", &[8080], &[&spiffe_id("c")]);
        let mut agent2 = Agent::start(&m.n2, &only_c.render())?;
        let pid = agent2.pid();
        let (id_a, id_c) = (spiffe_id("a"), spiffe_id("c"));
        let denied_a = [
            ("reporter", "destination"),
            ("source_principal", id_a.as_str()),
            ("destination_workload", "b"),
        ];

        // Control: the policy lets its allowed source through, so b is reachable.
        curl_ok(&c, &url, &[]).context("task c is allowed by the policy")?;
        agent2.wait_metric(
            TCP_OPENED,
            &mtls_labels("destination", &id_c, &spiffe_id("b")),
            METRIC_LAG,
            |v| v >= 1.0,
        )?;

        let denials = agent2.metric(DENIALS, &denied_a)?;
        let refused = curl(&m.a, &url, &[])?;
        println!("a before the reload: {}", refused.describe());
        ensure!(
            !refused.ok(),
            "task a reached b despite the policy: {}",
            refused.describe()
        );
        ensure!(
            refused.code != Some(28) && refused.elapsed < Duration::from_secs(1),
            "a denied connection must fail fast (a reset), not time out: {}",
            refused.describe()
        );
        agent2.wait_metric(DENIALS, &denied_a, METRIC_LAG, |v| v > denials)?;

        // Allow a by its SPIFFE id (and c by its role ARN), without restarting the agent.
        let both = m
            .node2()
            .endpoint(&c, "c")
            .policy("b", &[8080], &[&id_a, &role_arn("c")]);
        agent2.reload(&both.render())?;
        let denials_after = agent2.metric(DENIALS, &denied_a)?;
        curl_ok(&m.a, &url, &[]).context("task a after the policy allows it")?;
        curl_ok(&c, &url, &[]).context("task c, allowed by role ARN")?;
        ensure!(agent2.pid() == pid && agent2.exit_status()?.is_none());
        ensure!(
            agent2.metric(DENIALS, &denied_a)? == denials_after,
            "a was counted as denied after the reload allowed it"
        );
        Ok(())
    })
}

/// 20 sequential and then 20 concurrent connections from a to b share one pooled
/// tunnel connection per direction, each carried as its own stream.
#[test]
fn connections_share_one_pooled_tunnel_connection() {
    with_mesh(TrustInit::default(), |m| {
        let echo = m.kit.serve(&m.b, addr(m.b.ip(), 9001), ServeMode::Echo)?;
        let agent1 = Agent::start(&m.n1, &m.node1().render())?;
        let agent2 = Agent::start(&m.n2, &m.node2().render())?;
        let (outbound, inbound) = ([("direction", "outbound")], [("direction", "inbound")]);
        // Control: nothing opened a tunnel connection before the traffic.
        ensure!(agent1.metric_sum(TUNNEL_OPENED, &outbound)? == 0.0);
        ensure!(agent2.metric_sum(TUNNEL_OPENED, &inbound)? == 0.0);

        let small = ["--mode", "echo", "--send-bytes", "4096", "--timeout", "5"];
        for i in 0..20 {
            m.kit
                .run_client(&m.a, echo.addr(), &small, SHORT)
                .with_context(|| format!("sequential connection {i}"))?;
        }
        let summary = m.kit.run_client(
            &m.a,
            echo.addr(),
            &[
                "--mode",
                "concurrent",
                "--connections",
                "20",
                "--send-bytes",
                "65536",
                "--timeout",
                "10",
            ],
            Duration::from_secs(30),
        )?;
        println!("concurrent: {summary}");

        let streams_out =
            agent1.wait_metric_sum(STREAMS_OPENED, &outbound, METRIC_LAG, |v| v >= 40.0)?;
        let streams_in =
            agent2.wait_metric_sum(STREAMS_OPENED, &inbound, METRIC_LAG, |v| v >= 40.0)?;
        let conns_out = agent1.metric_sum(TUNNEL_OPENED, &outbound)?;
        let conns_in = agent2.metric_sum(TUNNEL_OPENED, &inbound)?;
        println!(
            "streams: {streams_out} outbound, {streams_in} inbound; tunnel connections: {conns_out} outbound, {conns_in} inbound"
        );
        ensure!(
            conns_out == 1.0 && conns_in == 1.0,
            "40 connections used {conns_out} outbound / {conns_in} inbound tunnel connections, expected 1"
        );
        Ok(())
    })
}

/// A connection through the tunnel to a port of b where nothing listens: b's agent cannot
/// connect the target and answers 503, and node 1's agent resets a's connection at once,
/// counted as `upstream_unavailable` for task a and under no other reason. Before and
/// after, the same client reaches b's server port over the same pooled tunnel connection.
#[test]
fn unreachable_target_behind_the_tunnel_is_reset() {
    with_mesh(TrustInit::default(), |m| {
        let server = m.kit.serve(&m.b, addr(m.b.ip(), 8080), ServeMode::Http)?;
        let agent1 = Agent::start(&m.n1, &m.node1().render())?;
        let agent2 = Agent::start(&m.n2, &m.node2().render())?;
        let (id_a, id_b) = (spiffe_id("a"), spiffe_id("b"));
        let url = format!("http://{}/", server.addr());
        let closed_url = format!("http://{}/", addr(m.b.ip(), 8081));
        let unavailable = [("task", "a"), ("reason", "upstream_unavailable")];
        let task_a = [("task", "a")];
        let (outbound, inbound) = ([("direction", "outbound")], [("direction", "inbound")]);

        // Control: b's real server port, through the tunnel.
        curl_ok(&m.a, &url, &[]).context("a to b's server port (before)")?;
        let source = hop_labels("source", ("a", &id_a), ("b", &id_b), "mutual_tls");
        agent1.wait_metric(TCP_OPENED, &source, METRIC_LAG, |v| v == 1.0)?;
        let streams_in =
            agent2.wait_metric_sum(STREAMS_OPENED, &inbound, METRIC_LAG, |v| v == 1.0)?;
        ensure!(
            agent1.metric_sum(CONNECT_ERRORS, &task_a)? == 0.0,
            "connect errors for a after a successful request"
        );

        curl_reset(&m.a, &closed_url, "a to a port of b where nothing listens")?;
        agent1.wait_metric(CONNECT_ERRORS, &unavailable, METRIC_LAG, |v| v == 1.0)?;
        let by_reason: Vec<String> = agent1
            .samples(CONNECT_ERRORS, &task_a)?
            .iter()
            .filter(|s| s.value > 0.0)
            .map(|s| format!("{}={}", s.label("reason").unwrap_or("?"), s.value))
            .collect();
        ensure!(
            by_reason == ["upstream_unavailable=1"],
            "connect errors of a by reason: {by_reason:?}, expected only upstream_unavailable=1"
        );
        // It went through the tunnel to b's agent, which refused no one by policy.
        agent2.wait_metric_sum(STREAMS_OPENED, &inbound, METRIC_LAG, |v| {
            v == streams_in + 1.0
        })?;
        ensure!(agent2.metric_sum(DENIALS, &[])? == 0.0);
        ensure!(agent1.metric_sum(DENIALS, &[])? == 0.0);

        // Control again: the failed stream did not break the pooled connection or the path.
        curl_ok(&m.a, &url, &[]).context("a to b's server port (after)")?;
        agent1.wait_metric(TCP_OPENED, &source, METRIC_LAG, |v| v == 2.0)?;
        let conns = agent1.metric_sum(TUNNEL_OPENED, &outbound)?;
        ensure!(
            conns == 1.0,
            "{conns} outbound tunnel connections for three streams, expected 1 (a 503 must not cost the pooled connection)"
        );
        Ok(())
    })
}

/// A connection that fails on one side fails on the other, as it would without the mesh (RFC
/// 9113 section 8.5: a TCP reset crosses the tunnel as a stream reset with CONNECT_ERROR, and
/// comes out as a TCP reset): a server that answers and resets is seen by the client as its
/// answer and then a reset, a client that sends and resets is seen by the server as its bytes
/// and then a reset. Before, both ends saw a clean FIN, so an application could not tell a
/// truncated stream from a finished one. Checked first without agents, so the check itself is
/// known to tell a reset from a FIN, then through the tunnel.
#[test]
fn a_reset_crosses_the_tunnel_as_a_reset() {
    with_mesh(TrustInit::default(), |m| {
        let reply_bytes = 1000u64;
        let resetting =
            m.kit
                .serve(&m.b, addr(m.b.ip(), 8080), ServeMode::Abort { reply_bytes })?;
        let watching = m.kit.serve(&m.b, addr(m.b.ip(), 8081), ServeMode::Watch)?;
        let finishing = m.kit.serve(
            &m.b,
            addr(m.b.ip(), 8082),
            ServeMode::HalfClose { reply_bytes: 1000 },
        )?;
        let finish = || -> Result<()> {
            m.kit.run_client(
                &m.a,
                finishing.addr(),
                &[
                    "--mode",
                    "halfclose",
                    "--send-bytes",
                    "100",
                    "--expect-bytes",
                    "1000",
                ],
                SHORT,
            )?;
            Ok(())
        };
        let check = |how: &str, runs: usize| -> Result<()> {
            for run in 0..runs {
                let out = m.kit.run_client(
                    &m.a,
                    resetting.addr(),
                    &["--mode", "until-end", "--send-bytes", "100"],
                    SHORT,
                )?;
                ensure!(
                    out.contains(&format!("received={reply_bytes} ended=reset")),
                    "{how}, run {run}: the client should see the server's {reply_bytes} bytes, then its reset: {out}"
                );
                // The same while the client is still sending (an upload answered early by a
                // server that then resets): the answer must arrive. Whether the client then
                // learns of the reset on its read or on its write is a race in the client
                // itself (without the mesh too), so only the bytes are checked here.
                let out = m
                    .kit
                    .run_client(&m.a, resetting.addr(), &["--mode", "upload"], SHORT)?;
                ensure!(
                    out.contains(&format!("received={reply_bytes} ")),
                    "{how}, run {run}: the uploading client should see the server's {reply_bytes} bytes: {out}"
                );
                let before = watching.log().lines().count();
                m.kit.run_client(
                    &m.a,
                    watching.addr(),
                    &["--mode", "abort", "--send-bytes", "1000"],
                    SHORT,
                )?;
                wait_for(
                    "the server to see the client's connection end",
                    SHORT,
                    || {
                        Ok(if watching.log().lines().count() > before {
                            Ok(())
                        } else {
                            Err("no new line in its log".to_string())
                        })
                    },
                )?;
                let log = watching.log();
                let end = log.lines().nth(before).unwrap_or_default();
                ensure!(
                    end == "ended after 1000 bytes: reset",
                    "{how}, run {run}: the server should see the client's 1000 bytes, then its reset: {end:?} (log: {log:?})"
                );
            }
            Ok(())
        };
        check("without agents", 1)?;
        finish()?;

        let agent1 = Agent::start(&m.n1, &m.node1().render())?;
        let agent2 = Agent::start(&m.n2, &m.node2().render())?;
        let runs = 5;
        check("through the mesh", runs)?;
        // A connection that both sides finish is closed, not reset.
        finish()?;
        // Every connection was carried by the tunnel, mutual TLS with both identities, on
        // one pooled connection that the resets did not break; both agents count the
        // resets, and only them, for the hop.
        let (id_a, id_b) = (spiffe_id("a"), spiffe_id("b"));
        let connections = 3.0 * runs as f64 + 1.0;
        for (agent, reporter) in [(&agent1, "source"), (&agent2, "destination")] {
            let hop = mtls_labels(reporter, &id_a, &id_b);
            agent.wait_metric(TCP_CLOSED, &hop, METRIC_LAG, |v| v == connections)?;
            let resets = agent.metric(TCP_RESET, &hop)?;
            ensure!(
                resets == 3.0 * runs as f64,
                "{reporter}: {resets} connections counted as reset, expected {}",
                3 * runs
            );
        }
        let conns = agent1.metric_sum(TUNNEL_OPENED, &[("direction", "outbound")])?;
        ensure!(
            conns == 1.0,
            "{conns} outbound tunnel connections, expected 1: a reset stream must not cost the pooled connection"
        );
        Ok(())
    })
}

/// A stopping agent gives the connections still open its drain timeout, then cuts them: the
/// applications on both sides see a reset, not a clean end that would pass a cut-short stream
/// for a complete one, and the stopping agent still accounts for what it cut (an access log
/// line saying `"end":"reset"`), as the other agent does (its reset counter).
#[test]
fn a_stopping_agent_resets_the_connections_left_after_its_drain() {
    with_mesh(TrustInit::default(), |m| {
        let watching = m.kit.serve(&m.b, addr(m.b.ip(), 8081), ServeMode::Watch)?;
        let log1 = m.topology.dir().join("access-node1.log");
        let mut agent1 = Agent::start(&m.n1, &m.node1().access_log(&log1).render())?;
        let agent2 = Agent::start(&m.n2, &m.node2().render())?;
        let (id_a, id_b) = (spiffe_id("a"), spiffe_id("b"));
        let hop = mtls_labels("destination", &id_a, &id_b);
        let (client_out, stopped_after) = thread::scope(|scope| -> Result<(String, Duration)> {
            // Sends 1,000 bytes, then waits for the connection to end; the server never answers.
            let client = scope.spawn(|| {
                m.kit.run_client(
                    &m.a,
                    watching.addr(),
                    &["--mode", "until-end", "--send-bytes", "1000"],
                    Duration::from_secs(30),
                )
            });
            agent2.wait_metric(TCP_OPENED, &hop, SHORT, |v| v == 1.0)?;
            let stopping = Instant::now();
            let status = agent1.terminate()?;
            let stopped_after = stopping.elapsed();
            ensure!(
                status.success(),
                "the agent exited with {status}\n{}",
                agent1.log_tail(30)
            );
            let out = client
                .join()
                .map_err(|_| anyhow::anyhow!("the client thread panicked"))??;
            Ok((out, stopped_after))
        })?;
        // The test mesh's drain timeout is 2 s: the connection was given it.
        ensure!(
            stopped_after >= Duration::from_secs(2),
            "the agent stopped after {stopped_after:?}, before its 2 s drain timeout"
        );
        ensure!(
            client_out.contains("received=0 ended=reset"),
            "the client should see its connection reset when the drain ends: {client_out}"
        );
        wait_for("the server to see the connection end", SHORT, || {
            Ok(if watching.log().contains("ended after") {
                Ok(())
            } else {
                Err(watching.log())
            })
        })?;
        let seen = watching.log();
        ensure!(
            seen.contains("ended after 1000 bytes: reset"),
            "the server should see the client's 1000 bytes, then a reset: {seen:?}"
        );
        agent2.wait_metric(TCP_RESET, &hop, METRIC_LAG, |v| v == 1.0)?;
        let log = std::fs::read_to_string(&log1).context("node 1's access log")?;
        let cut: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(r#""kind":"connection""#))
            .collect();
        ensure!(
            cut.len() == 1
                && cut[0].contains(r#""end":"reset""#)
                && cut[0].contains(r#""received_bytes":1000"#),
            "node 1's access log should hold one connection line, reset after 1000 bytes: {log:?}"
        );
        Ok(())
    })
}

/// Tasks a and c on one node: a's connection to c skips the tunnel, but c's policy still
/// applies. While it allows only role z, a is reset and node 1 counts a denial as the
/// destination; once the config file is rewritten to allow a (noticed by the file watch,
/// no signal), a reaches c, and node 1 reports the hop as source and as destination, both
/// mutual TLS with both principals, without any tunnel connection.
#[test]
fn same_node_hop_applies_the_destination_policy_without_the_tunnel() {
    with_mesh(TrustInit::default(), |m| {
        let c = m.n1.add_task("c")?;
        let server = m.kit.serve(&c, addr(c.ip(), 8080), ServeMode::Http)?;
        let url = format!("http://{}/", server.addr());
        let (id_a, id_c) = (spiffe_id("a"), spiffe_id("c"));
        let only_z = m.node1().task(&c, "c").policy("c", &[], &[&spiffe_id("z")]);
        let agent1 = Agent::start(&m.n1, &only_z.render())?;
        let pid = agent1.pid();
        let denied = [
            ("reporter", "destination"),
            ("source_principal", id_a.as_str()),
            ("destination_workload", "c"),
        ];

        curl_reset(&m.a, &url, "a to c while c's policy allows only z")?;
        agent1.wait_metric(DENIALS, &denied, METRIC_LAG, |v| v == 1.0)?;
        agent1.wait_metric(
            CONNECT_ERRORS,
            &[("task", "a"), ("reason", "denied")],
            METRIC_LAG,
            |v| v == 1.0,
        )?;
        let opened = agent1.metric_sum(TCP_OPENED, &[("destination_workload", "c")])?;
        ensure!(
            opened == 0.0,
            "{opened} connections to c reported as opened while the policy denied them"
        );

        // Allow a, by rewriting the file only: the agent's file watch must pick it up.
        let success = [("result", "success")];
        let reloads = agent1.metric(RELOADS, &success)?;
        let allow_a = m.node1().task(&c, "c").policy("c", &[], &[&id_a]);
        agent1.replace_config(&allow_a.render())?;
        agent1.wait_metric(RELOADS, &success, METRIC_LAG, |v| v == reloads + 1.0)?;
        let log = agent1.log();
        ensure!(
            log.contains("configuration file changed: reloading") && !log.contains("SIGHUP"),
            "expected a reload by the file watch, not by a signal\n{}",
            agent1.log_tail(20)
        );

        let body = curl_ok(&m.a, &url, &[]).context("a to c once the policy allows a")?;
        ensure!(
            body.contains(&format!("peer={}:", m.a.ip())),
            "c's server should see a's own address as the client: {body:?}"
        );
        for reporter in ["source", "destination"] {
            let labels = hop_labels(reporter, ("a", &id_a), ("c", &id_c), "mutual_tls");
            agent1
                .wait_metric(TCP_OPENED, &labels, METRIC_LAG, |v| v == 1.0)
                .with_context(|| format!("the hop a -> c reported by {reporter}"))?;
        }
        let all: Vec<String> = agent1
            .samples(TCP_OPENED, &[])?
            .iter()
            .map(|s| format!("{:?}={}", s.labels, s.value))
            .collect();
        ensure!(
            all.len() == 2,
            "expected exactly the two series of the hop a -> c, got: {all:#?}"
        );
        let tunnel = agent1.metric_sum(TUNNEL_OPENED, &[])?;
        let streams = agent1.metric_sum(STREAMS_OPENED, &[])?;
        ensure!(
            tunnel == 0.0 && streams == 0.0,
            "a same-node hop used the tunnel: {tunnel} connections, {streams} streams"
        );
        ensure!(
            agent1.metric(DENIALS, &denied)? == 1.0,
            "a was counted as denied after the reload allowed it"
        );
        ensure!(agent1.pid() == pid, "the agent restarted");
        Ok(())
    })
}

/// With `tunnel_idle_timeout = "1s"`, a tunnel connection that carries a stream for longer
/// than that stays open (one connection for the whole hold); once its last stream has
/// ended it closes after about a second, on both agents; the next connection from a to b
/// works and opens a second tunnel connection.
#[test]
fn idle_pooled_tunnel_connection_closes_after_the_idle_timeout() {
    with_mesh(TrustInit::default(), |m| {
        let echo = m.kit.serve(&m.b, addr(m.b.ip(), 9001), ServeMode::Echo)?;
        let node1 = m.node1().agent("tunnel_idle_timeout", "\"1s\"");
        let agent1 = Agent::start(&m.n1, &node1.render())?;
        let agent2 = Agent::start(&m.n2, &m.node2().render())?;
        let (outbound, inbound) = ([("direction", "outbound")], [("direction", "inbound")]);

        let mut hold = m.kit.client(
            &m.a,
            echo.addr(),
            &["--mode", "hold", "--seconds", "2", "--timeout", "2"],
        )?;
        let holder = thread::spawn(move || mesh_testbed::run_ok(&mut hold, SHORT));
        agent1.wait_metric(TUNNEL_ACTIVE, &outbound, METRIC_LAG, |v| v == 1.0)?;
        agent2.wait_metric(TUNNEL_ACTIVE, &inbound, METRIC_LAG, |v| v == 1.0)?;
        let summary = holder
            .join()
            .map_err(|_| anyhow::anyhow!("hold thread panicked"))?
            .context("a connection held across the idle timeout")?;
        let ended = Instant::now();
        println!("hold: {}", summary.trim());
        let opened = agent1.metric(TUNNEL_OPENED, &outbound)?;
        ensure!(
            opened == 1.0,
            "{opened} outbound tunnel connections for one held stream, expected 1"
        );

        agent1.wait_metric(TUNNEL_ACTIVE, &outbound, Duration::from_secs(5), |v| {
            v == 0.0
        })?;
        let idle_for = ended.elapsed();
        println!("outbound tunnel connection closed {idle_for:?} after the last stream ended");
        ensure!(
            idle_for >= Duration::from_millis(500),
            "the tunnel connection closed {idle_for:?} after its last stream, before the 1 s idle timeout"
        );
        agent2.wait_metric(TUNNEL_ACTIVE, &inbound, METRIC_LAG, |v| v == 0.0)?;

        m.kit
            .run_client(
                &m.a,
                echo.addr(),
                &["--mode", "echo", "--send-bytes", "4096", "--timeout", "5"],
                SHORT,
            )
            .context("a new connection after the idle close")?;
        agent1.wait_metric(TUNNEL_OPENED, &outbound, METRIC_LAG, |v| v == 2.0)?;
        agent2.wait_metric(TUNNEL_OPENED, &inbound, METRIC_LAG, |v| v == 2.0)?;
        Ok(())
    })
}

/// An agent whose issuer has expired refuses to start, quickly and with an error naming
/// the issuer file and its expiry; after `trust renew-issuer` in the same directory the
/// same configuration starts and mints task a's certificate.
#[test]
fn agent_refuses_to_start_with_an_expired_issuer() {
    let init = TrustInit {
        issuer_validity: Some("3s".into()),
        ..TrustInit::default()
    };
    with_mesh(init, |m| {
        let status = m.trust.status_json()?;
        let not_after = status.json["issuer"]["not_after_unix"]
            .as_u64()
            .with_context(|| format!("no issuer.not_after_unix in {}", status.json))?;
        // X.509 times have whole seconds: wait until the issuer is past its notAfter.
        let expired_at = std::time::UNIX_EPOCH + Duration::from_secs(not_after + 1);
        if let Ok(left) = expired_at.duration_since(std::time::SystemTime::now()) {
            ensure!(
                left < SHORT,
                "the issuer lives {left:?} more, expected ~3 s"
            );
            thread::sleep(left);
        }
        let config = m.node1().render();
        let issuer = m.trust.issuer().display().to_string();

        let started = Instant::now();
        let mut refused = Agent::spawn(&m.n1, &config, &Launch::default())?;
        let exit = refused.wait_exit(SHORT)?;
        let took = started.elapsed();
        let log = refused.log();
        println!(
            "agent with the expired issuer: {exit} after {took:?}\n{}",
            log.trim()
        );
        ensure!(
            !exit.success(),
            "the agent exited successfully with an expired issuer"
        );
        ensure!(took < Duration::from_secs(5), "refusing took {took:?}");
        let error = log
            .lines()
            .find(|l| l.starts_with("error:"))
            .with_context(|| format!("no `error:` line in the log:\n{log}"))?;
        ensure!(
            error.contains(&issuer) && error.contains("expired"),
            "the error must name the issuer file {issuer} and say it expired: {error}"
        );

        // Control: a renewed issuer in the same directory lets the same config start.
        let renewed = m.trust.renew_issuer()?;
        println!("renew-issuer: {}", renewed.trim());
        let mut agent = Agent::start(&m.n1, &config).context("the agent after renew-issuer")?;
        let leaves = agent.samples(
            LEAF_EXPIRY,
            &[("task", "a"), ("principal", &spiffe_id("a"))],
        )?;
        ensure!(
            leaves.len() == 1,
            "expected task a's workload certificate in the metrics: {leaves:?}"
        );
        let exit = agent.terminate()?;
        ensure!(exit.success(), "the agent exited with {exit} on SIGTERM");
        Ok(())
    })
}

/// Task r on node 1 has no role, so no identity: its connection to meshed b is reset
/// (`no_identity`) without any tunnel attempt, while task a (with a role) reaches b; r
/// still reaches d, a task that is not meshed (captured by `[capture]`), as plain TCP,
/// reported with principal `unknown` and security policy `none`. r gets no tunnel
/// listener; a has one.
#[test]
fn task_without_role_reaches_only_unmeshed_destinations() {
    with_mesh(TrustInit::default(), |m| {
        let r = m.n1.add_task("r")?;
        let d = m.n2.add_task("d")?;
        let server_b = m.kit.serve(&m.b, addr(m.b.ip(), 8080), ServeMode::Http)?;
        let server_d = m.kit.serve(&d, addr(d.ip(), 8080), ServeMode::Http)?;
        let (url_b, url_d) = (
            format!("http://{}/", server_b.addr()),
            format!("http://{}/", server_d.addr()),
        );
        let node1 = m
            .node1()
            .raw(&r.config())
            .raw(&format!("[capture]\ndestinations = [\"{}/32\"]\n", d.ip()));
        let agent1 = Agent::start(&m.n1, &node1.render())?;
        let _agent2 = Agent::start(&m.n2, &m.node2().render())?;
        let (id_a, id_b) = (spiffe_id("a"), spiffe_id("b"));
        let outbound = [("direction", "outbound")];

        // Control: b is meshed and reachable for a task with a role.
        curl_ok(&m.a, &url_b, &[]).context("a (role a) to b")?;
        let a_to_b = hop_labels("source", ("a", &id_a), ("b", &id_b), "mutual_tls");
        agent1.wait_metric(TCP_OPENED, &a_to_b, METRIC_LAG, |v| v == 1.0)?;

        curl_reset(&r, &url_b, "r (no role) to meshed b")?;
        agent1.wait_metric(
            CONNECT_ERRORS,
            &[("task", "r"), ("reason", "no_identity")],
            METRIC_LAG,
            |v| v == 1.0,
        )?;
        let tunnels = agent1.metric_sum(TUNNEL_OPENED, &outbound)?;
        let streams = agent1.metric_sum(STREAMS_OPENED, &outbound)?;
        ensure!(
            tunnels == 1.0 && streams == 1.0,
            "r's refused connection touched the tunnel: {tunnels} connections, {streams} streams (a's request alone makes 1 and 1)"
        );

        let body = curl_ok(&r, &url_d, &[]).context("r (no role) to unmeshed d")?;
        ensure!(
            body.contains(&format!("peer={}:", r.ip())),
            "d's server should see r's own address: {body:?}"
        );
        let plain = hop_labels("source", ("r", UNKNOWN), (UNKNOWN, UNKNOWN), "none");
        agent1.wait_metric(TCP_OPENED, &plain, METRIC_LAG, |v| v == 1.0)?;
        // Both of r's connections were captured: the one to d was carried, not bypassed.
        ensure!(agent1.metric(CAPTURED, &[("task", "r")])? == 2.0);
        let r_errors = agent1.metric_sum(CONNECT_ERRORS, &[("task", "r")])?;
        ensure!(
            r_errors == 1.0,
            "r has {r_errors} connect errors, expected 1"
        );

        let tunnel_of = |task: &Task| tcp_accepts(&m.n1.netns_path(), addr(task.ip(), TUNNEL_PORT));
        ensure!(tunnel_of(&m.a)?, "a (role a) has no tunnel listener");
        ensure!(!tunnel_of(&r)?, "r (no role) has a tunnel listener");
        Ok(())
    })
}

/// `mesh.egress = "deny"`: a captured destination that is neither a task nor an endpoint
/// (task d on node 2, listed only in `[capture]`) is reset and counted as `egress_denied`,
/// while meshed b stays reachable. Control: the same connection succeeds, as plain TCP,
/// with `passthrough` before and after.
#[test]
fn egress_deny_resets_unmeshed_destinations() {
    with_mesh(TrustInit::default(), |m| {
        let d = m.n2.add_task("d")?;
        let server_b = m.kit.serve(&m.b, addr(m.b.ip(), 8080), ServeMode::Http)?;
        let server_d = m.kit.serve(&d, addr(d.ip(), 8080), ServeMode::Http)?;
        let (url_b, url_d) = (
            format!("http://{}/", server_b.addr()),
            format!("http://{}/", server_d.addr()),
        );
        let capture_d = format!("[capture]\ndestinations = [\"{}/32\"]\n", d.ip());
        let config = |egress: &str| {
            m.node1()
                .mesh("egress", &format!("\"{egress}\""))
                .raw(&capture_d)
                .render()
        };
        let mut agent1 = Agent::start(&m.n1, &config("passthrough"))?;
        let _agent2 = Agent::start(&m.n2, &m.node2().render())?;
        let (id_a, id_b) = (spiffe_id("a"), spiffe_id("b"));
        let plain = hop_labels("source", ("a", &id_a), (UNKNOWN, UNKNOWN), "none");
        let egress_denied = [("task", "a"), ("reason", "egress_denied")];

        // Control: passthrough carries d as plain TCP (captured, so the agent decided).
        curl_ok(&m.a, &url_d, &[]).context("a to d with egress = passthrough")?;
        agent1.wait_metric(TCP_OPENED, &plain, METRIC_LAG, |v| v == 1.0)?;

        agent1.reload(&config("deny"))?;
        curl_reset(&m.a, &url_d, "a to unmeshed d with egress = deny")?;
        agent1.wait_metric(CONNECT_ERRORS, &egress_denied, METRIC_LAG, |v| v == 1.0)?;
        ensure!(agent1.metric(CAPTURED, &[("task", "a")])? == 2.0);
        // Meshed destinations are not egress.
        curl_ok(&m.a, &url_b, &[]).context("a to meshed b with egress = deny")?;
        let a_to_b = hop_labels("source", ("a", &id_a), ("b", &id_b), "mutual_tls");
        agent1.wait_metric(TCP_OPENED, &a_to_b, METRIC_LAG, |v| v == 1.0)?;

        // Control: back to passthrough, d is reachable again.
        agent1.reload(&config("passthrough"))?;
        curl_ok(&m.a, &url_d, &[]).context("a to d with egress = passthrough again")?;
        agent1.wait_metric(TCP_OPENED, &plain, METRIC_LAG, |v| v == 2.0)?;
        let errors = agent1.metric_sum(CONNECT_ERRORS, &[("task", "a")])?;
        ensure!(errors == 1.0, "a has {errors} connect errors, expected 1");
        Ok(())
    })
}

/// The three steps of a trust rotation (add the new anchor, switch the issuer, drop
/// the old anchor), each awaited on both agents through their metrics, while task a
/// sends requests to b without pause: not one fails.
#[test]
fn trust_rotation_under_load_fails_no_request() {
    let init = TrustInit {
        propagation_delay: Some("1s".into()),
        max_leaf_lifetime: Some("6s".into()),
        clock_skew: Some("0s".into()),
        ..TrustInit::default()
    };
    with_mesh(init, |m| {
        let echo = m.kit.serve(&m.b, addr(m.b.ip(), 9001), ServeMode::Echo)?;
        let agent1 = Agent::start(&m.n1, &m.node1().workload_cert_ttl("6s").render())?;
        let agent2 = Agent::start(&m.n2, &m.node2().workload_cert_ttl("6s").render())?;
        let agents = [&agent1, &agent2];
        let old = m.trust.anchor_ids()?;
        ensure!(old.len() == 1, "trust init wrote {} anchors", old.len());
        let old = old[0].clone();
        for agent in agents {
            wait_trust_state(agent, &[&old], &old)?;
        }

        let mut load = LoadClient::start(&m.kit, &m.a, echo.addr(), &LoadOptions::default())?;
        load.wait_for_successes(20, SHORT)?;
        let started = Instant::now();

        // 1. add-anchor: the bundle holds old and new; leaves still chain to the old one.
        rotate(&m.trust, "add-anchor", SHORT)?;
        let ids = m.trust.anchor_ids()?;
        let new = ids
            .iter()
            .find(|id| **id != old)
            .with_context(|| format!("no new anchor in the bundle after add-anchor: {ids:?}"))?
            .clone();
        ensure!(ids.len() == 2, "bundle after add-anchor: {ids:?}");
        for agent in agents {
            wait_trust_state(agent, &[&old, &new], &old)?;
        }
        load.wait_for_successes(20, SHORT)?;
        println!("{:?}: add-anchor seen by both agents", started.elapsed());

        // 2. switch-issuer (allowed once the propagation delay has passed): every leaf
        // is re-issued by the new issuer and chains to the new anchor.
        rotate(&m.trust, "switch-issuer", SHORT)?;
        for agent in agents {
            wait_trust_state(agent, &[&old, &new], &new)?;
        }
        load.wait_for_successes(20, SHORT)?;
        println!("{:?}: switch-issuer seen by both agents", started.elapsed());

        // 3. drop-old-anchor (allowed max-leaf-lifetime after the switch).
        rotate(&m.trust, "drop-old-anchor", Duration::from_secs(20))?;
        ensure!(m.trust.anchor_ids()? == vec![new.clone()]);
        for agent in agents {
            wait_trust_state(agent, &[&new], &new)?;
        }
        println!(
            "{:?}: drop-old-anchor seen by both agents",
            started.elapsed()
        );

        // Keep the load on across at least one more leaf renewal (ttl 6 s: every 3 s).
        thread::sleep(Duration::from_secs(4));
        load.wait_for_successes(20, SHORT)?;
        let report = load.stop()?;
        println!(
            "load over {:?}: {} ok, {} failed",
            started.elapsed(),
            report.ok,
            report.failed
        );
        report.ensure_none_failed("during the rotation")?;
        // The load really went through the tunnel (zero failures of plain TCP would prove
        // nothing): node 2 saw mutual-TLS connections from a, many of them.
        let id_a = spiffe_id("a");
        let id_b = spiffe_id("b");
        let tunnelled = agent2.metric(TCP_OPENED, &mtls_labels("destination", &id_a, &id_b))?;
        ensure!(
            tunnelled >= 20.0,
            "only {tunnelled} mutual-TLS connections from a reached node 2 during the load"
        );

        let status = m.trust.status_json()?;
        println!("trust status: {}", m.trust.status()?);
        ensure!(
            status.anchor_ids() == vec![new.clone()]
                && status.issuer_anchor().is_some_and(|a| a.starts_with(&new))
                && status.phase().as_deref() == Some("stable")
                && status.ok(),
            "`trust status --json` after the rotation: expected only anchor {new}, the issuer on it, phase stable, ok: {}",
            status.json
        );
        Ok(())
    })
}

/// A pooled tunnel connection outlives the certificates it was authenticated with, and
/// each end retires it when the other end's certificate expires. b's leaves last 6 s and
/// a's 12 s (each renewed at half-life), so the two ends act one after the other: at about
/// 6 s node 1 stops opening streams on it (`peer_expired`, outbound) and opens a new
/// connection for the next ones; at about 12 s node 2 retires it too (inbound) and sends
/// GOAWAY. A long-lived connection opened on it first keeps working throughout, and no
/// request fails. Control: neither end retires anything before the leaf it checks could
/// have expired.
#[test]
fn tunnel_connection_is_retired_when_the_peers_certificate_expires() {
    let init = TrustInit {
        max_leaf_lifetime: Some("12s".into()),
        ..TrustInit::default()
    };
    with_mesh(init, |m| {
        let echo = m.kit.serve(&m.b, addr(m.b.ip(), 9001), ServeMode::Echo)?;
        // Before the agents start, so every leaf expires at least its lifetime after this
        // (less the second the certificates' times are rounded to): a retirement seen
        // earlier than that was not caused by an expiry. A slow machine only makes what
        // follows later, never earlier.
        let started = Instant::now();
        let agent1 = Agent::start(&m.n1, &m.node1().workload_cert_ttl("12s").render())?;
        let agent2 = Agent::start(&m.n2, &m.node2().workload_cert_ttl("6s").render())?;
        let opts = LoadOptions {
            workers: 1,
            long_lived: 1,
            ..LoadOptions::default()
        };
        let mut load = LoadClient::start(&m.kit, &m.a, echo.addr(), &opts)?;
        load.wait_for_successes(20, SHORT)?;
        let outbound = [("direction", "outbound")];
        let opened_before = agent1.metric_sum(TUNNEL_OPENED, &outbound)?;

        // b's first leaf expires 6 s after it was minted: node 1 retires the connection and
        // opens the next streams over a new one.
        let out_expired = [("direction", "outbound"), ("reason", "peer_expired")];
        agent1.wait_metric_sum(RETIRED, &out_expired, Duration::from_secs(20), |v| v >= 1.0)?;
        let at = started.elapsed();
        ensure!(
            at >= Duration::from_secs(5),
            "node 1 retired a connection {at:?} in, before b's first leaf (6 s) could expire"
        );
        let opened =
            agent1.wait_metric_sum(TUNNEL_OPENED, &outbound, SHORT, |v| v > opened_before)?;
        println!(
            "{at:?}: node 1 retired the connection; tunnel connections opened: {opened_before} before, {opened} after"
        );
        load.wait_for_successes(20, SHORT)?;

        // a's first leaf expires after 12 s: node 2 retires the old connection, which is
        // still open because the long-lived connection rides it.
        let in_expired = [("direction", "inbound"), ("reason", "peer_expired")];
        agent2.wait_metric_sum(RETIRED, &in_expired, Duration::from_secs(20), |v| v >= 1.0)?;
        let at = started.elapsed();
        ensure!(
            at >= Duration::from_secs(11),
            "node 2 retired a connection {at:?} in, before a's first leaf (12 s) could expire"
        );
        println!("{at:?}: node 2 retired it too");
        load.wait_for_successes(50, SHORT)?;
        let report = load.stop()?;
        println!(
            "load over {:?}: {} ok, {} failed",
            started.elapsed(),
            report.ok,
            report.failed
        );
        report.ensure_none_failed("across the retirements")?;
        // Nothing was retired for a reason it did not have.
        for agent in [&agent1, &agent2] {
            ensure!(agent.metric_sum(RETIRED, &[("reason", "peer_untrusted")])? == 0.0);
        }
        Ok(())
    })
}

/// An anchor removed from the bundle stops vouching for the connections authenticated
/// under it: after add-anchor and switch-issuer, a long-lived connection from a to b still
/// rides the tunnel connection made with the old leaves (24 h, far from expiry); when
/// drop-old-anchor is forced, node 2 retires that connection (`peer_untrusted`, GOAWAY;
/// node 1 counts it too when its reload comes first) and the long-lived connection keeps
/// working (TLS 1.3 cannot re-authenticate in place, and cutting open connections at every
/// rotation would be an outage; docs/identity.md).
/// On the way, a connection left without streams by a change of trust material is closed
/// at the next sweep of the pool. Control: the first two steps, which keep the old anchor,
/// retire nothing.
#[test]
fn dropping_an_anchor_retires_tunnel_connections_authenticated_under_it() {
    let init = TrustInit {
        propagation_delay: Some("1s".into()),
        ..TrustInit::default()
    };
    with_mesh(init, |m| {
        let echo = m.kit.serve(&m.b, addr(m.b.ip(), 9001), ServeMode::Echo)?;
        // A 20 s idle timeout: the pool is swept every 5 s.
        let idle = "\"20s\"";
        let agent1 = Agent::start(
            &m.n1,
            &m.node1().agent("tunnel_idle_timeout", idle).render(),
        )?;
        let agent2 = Agent::start(
            &m.n2,
            &m.node2().agent("tunnel_idle_timeout", idle).render(),
        )?;
        let agents = [&agent1, &agent2];
        let old = m.trust.anchor_ids()?.remove(0);
        let opts = LoadOptions {
            workers: 1,
            long_lived: 1,
            ..LoadOptions::default()
        };
        let mut load = LoadClient::start(&m.kit, &m.a, echo.addr(), &opts)?;
        load.wait_for_successes(20, SHORT)?;

        rotate(&m.trust, "add-anchor", SHORT)?;
        let new = m
            .trust
            .anchor_ids()?
            .into_iter()
            .find(|id| *id != old)
            .context("no new anchor after add-anchor")?;
        for agent in agents {
            wait_trust_state(agent, &[&old, &new], &old)?;
        }
        rotate(&m.trust, "switch-issuer", SHORT)?;
        for agent in agents {
            wait_trust_state(agent, &[&old, &new], &new)?;
        }
        load.wait_for_successes(20, SHORT)?;
        // Each step bumped the trust generation, so node 1 dialled a new connection for the
        // streams after it. The one from after add-anchor carries nothing now and can never
        // carry anything again: it is closed at the next sweep, not after the idle timeout.
        // Left: the first (the long-lived connection rides it) and the current one.
        let outbound = [("direction", "outbound")];
        let opened = agent1.metric_sum(TUNNEL_OPENED, &outbound)?;
        ensure!(
            opened == 3.0,
            "node 1 opened {opened} tunnel connections, expected one per trust generation (3)"
        );
        agent1.wait_metric(TUNNEL_ACTIVE, &outbound, Duration::from_secs(9), |v| {
            v == 2.0
        })?;
        for (agent, what) in [(&agent1, "node 1"), (&agent2, "node 2")] {
            let retired = agent.metric_sum(RETIRED, &[])?;
            ensure!(
                retired == 0.0,
                "{what} retired {retired} connections while the old anchor was still trusted"
            );
        }

        // Forced: the default wait is for leaves to expire, which is not what is tested here.
        let out = m.trust.rotate(true)?;
        ensure!(
            out.status.success(),
            "trust rotate --force (drop-old-anchor): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for agent in agents {
            wait_trust_state(agent, &[&new], &new)?;
        }
        // Node 2 retires it (GOAWAY): the connection is still open there, carrying the
        // long-lived connection. Node 1 counts it too when its own reload comes first; after
        // node 2's GOAWAY its side of the connection takes no new streams anyway.
        let untrusted_in = [("direction", "inbound"), ("reason", "peer_untrusted")];
        let retired_in =
            agent2.wait_metric_sum(RETIRED, &untrusted_in, METRIC_LAG, |v| v >= 1.0)?;
        let retired_out = agent1.metric_sum(RETIRED, &[("reason", "peer_untrusted")])?;
        println!("retired after drop-old-anchor: {retired_in} inbound, {retired_out} outbound");

        load.wait_for_successes(50, SHORT)?;
        let report = load.stop()?;
        println!("load: {} ok, {} failed", report.ok, report.failed);
        report.ensure_none_failed("across the anchor removal")?;
        Ok(())
    })
}

/// Runs `mesh-agent trust rotate` until it succeeds (a step that is not yet allowed
/// fails and is retried), at most for `timeout`; prints what it said.
fn rotate(trust: &TrustDir, step: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let out = trust.rotate(false)?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            println!("trust rotate ({step}): {}", text.trim());
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "`trust rotate` ({step}) still failing after {timeout:?} ({}): {}",
                out.status,
                text.trim()
            );
        }
        thread::sleep(Duration::from_millis(250));
    }
}

/// Waits until `agent` reports exactly the anchors `anchors` and every workload leaf it
/// holds (at least one), and its issuer, chains to `leaf_anchor`.
fn wait_trust_state(agent: &Agent, anchors: &[&str], leaf_anchor: &str) -> Result<()> {
    let want: BTreeSet<String> = anchors.iter().map(|a| a.to_string()).collect();
    wait_for(
        &format!(
            "{}: anchors {want:?}, leaves and issuer chaining to {leaf_anchor}",
            agent.node().name()
        ),
        TRUST_LAG,
        || {
            let text = agent.metrics()?;
            let anchor_set: BTreeSet<String> =
                mesh_testbed::metrics::samples(&text, ANCHOR_EXPIRY, &[])
                    .iter()
                    .filter_map(|s| s.label("anchor").map(str::to_string))
                    .collect();
            let leaves: Vec<String> = mesh_testbed::metrics::samples(&text, LEAF_EXPIRY, &[])
                .iter()
                .map(|s| {
                    format!(
                        "{}/{}",
                        s.label("task").unwrap_or("?"),
                        s.label("anchor").unwrap_or("?")
                    )
                })
                .collect();
            let issuers: Vec<String> = mesh_testbed::metrics::samples(&text, ISSUER_EXPIRY, &[])
                .iter()
                .filter_map(|s| s.label("anchor").map(str::to_string))
                .collect();
            let leaves_ok = !leaves.is_empty()
                && leaves
                    .iter()
                    .all(|l| l.ends_with(&format!("/{leaf_anchor}")));
            if anchor_set == want && leaves_ok && issuers == [leaf_anchor] {
                Ok(Ok(()))
            } else {
                Ok(Err(format!(
                    "anchors {anchor_set:?}, leaves (task/anchor) {leaves:?}, issuer anchors {issuers:?}"
                )))
            }
        },
    )
}

/// The probe itself, against `openssl s_server` requiring a client certificate over
/// TLS 1.3 (no agent involved): it must tell an accepted client from refused ones, or
/// the refusals in the tunnel test would prove nothing.
#[test]
fn tls_probe_tells_accepted_from_refused_clients() {
    let f = || -> Result<()> {
        require_root()?;
        require_tools(&["ip", "openssl"])?;
        let topology = Topology::new()?;
        let node = topology.add_node()?;
        let dir = topology.dir().join("certs");
        let ca = TestCa::self_signed("probe test CA")?;
        let ca_file = dir.join("ca.pem");
        let server = ca.mint(
            "spiffe://probe.test/server",
            Validity::Current,
            &dir,
            "server",
        )?;
        ca.write_cert(&ca_file)?;
        let valid = ca.mint(
            "spiffe://probe.test/client",
            Validity::Current,
            &dir,
            "client",
        )?;
        let expired = ca.mint("spiffe://probe.test/client", Validity::Expired, &dir, "old")?;
        let other = TestCa::self_signed("other")?.mint(
            "spiffe://probe.test/client",
            Validity::Current,
            &dir,
            "other",
        )?;

        let port = 16008;
        let target = addr(node.ip(), port);
        let base = TlsProbe::new(target).verify_server(&ca_file);
        let cases: [(&str, TlsProbe, Verdict); 6] = [
            (
                "valid",
                base.clone().client_cert(&valid),
                Verdict::AcceptedHttp2,
            ),
            ("no certificate", base.clone(), Verdict::Rejected),
            (
                "other CA",
                base.clone().client_cert(&other),
                Verdict::Rejected,
            ),
            (
                "expired",
                base.clone().client_cert(&expired),
                Verdict::Rejected,
            ),
            (
                "TLS 1.2",
                base.clone().client_cert(&valid).version(TlsVersion::Tls12),
                Verdict::Rejected,
            ),
            (
                "valid again",
                base.clone().client_cert(&valid),
                Verdict::AcceptedHttp2,
            ),
        ];
        for (name, probe, expected) in cases {
            // A fresh server per probe: it sends the SETTINGS frame from its stdin to the
            // first client only.
            let (_server, _stdin) = s_server(&node, port, &server, &ca_file)?;
            let report = probe.run(node.command("openssl")?)?;
            println!("{name}: {}", report.summary());
            ensure!(
                report.verdict == expected,
                "{name}: expected {expected:?}: {report}"
            );
            if expected == Verdict::Rejected {
                ensure!(
                    report.elapsed < Duration::from_secs(2),
                    "{name}: slow: {report}"
                );
                ensure!(report.alert.is_some(), "{name}: no alert: {report}");
            } else {
                ensure!(
                    report.handshake_completed && report.protocol.as_deref() == Some("TLSv1.3")
                );
            }
        }
        Ok(())
    };
    if let Err(e) = f() {
        panic!("{e:?}");
    }
}

/// `openssl s_server` on `port` of `node`'s bridge address: TLS 1.3 only, ALPN h2, a
/// client certificate required and verified against `ca_file`; with an HTTP/2 SETTINGS
/// frame waiting on its stdin, which it sends to its first client.
fn s_server(
    node: &Node,
    port: u16,
    cert: &CertFiles,
    ca_file: &std::path::Path,
) -> Result<(Process, ChildStdin)> {
    let mut command = node.command("openssl")?;
    command
        .args(["s_server", "-accept", &addr(node.ip(), port).to_string()])
        .arg("-cert")
        .arg(&cert.cert)
        .arg("-cert_chain")
        .arg(&cert.chain)
        .arg("-key")
        .arg(&cert.key)
        .arg("-CAfile")
        .arg(ca_file)
        .args([
            "-Verify",
            "1",
            "-verify_return_error",
            "-tls1_3",
            "-alpn",
            "h2",
        ])
        .args(["-naccept", "1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut process = Process::spawn(&mut command)?;
    let mut stdin = process.child_mut().stdin.take().context("no stdin")?;
    stdin.write_all(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")?;
    stdin.flush()?;
    let stdout = process.child_mut().stdout.take().context("no stdout")?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.trim() == "ACCEPT" {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(5))
        .context("openssl s_server did not print ACCEPT")?;
    Ok((process, stdin))
}

/// The link capture and the load client themselves, without any agent: a marker sent in
/// clear across the link is found in the capture (so its absence in the tunnel test
/// means something), and the load client counts successes while the server is up and
/// failures once it is gone (so "zero failures" in the rotation test means something).
#[test]
fn link_capture_and_load_client_detect_what_they_must() {
    let f = || -> Result<()> {
        require_root()?;
        require_tools(&["ip", "curl", "tcpdump"])?;
        let kit = Testkit::new(env!("CARGO_BIN_EXE_mesh-testkit"))?;
        let topology = Topology::new()?;
        let n1 = topology.add_node()?;
        let n2 = topology.add_node()?;
        topology.link_nodes(&n1, &n2)?;
        let a = n1.add_task("a")?;
        let b = n2.add_task("b")?;
        let http = kit.serve(&b, addr(b.ip(), 8080), ServeMode::HttpEcho)?;

        let capture = LinkCapture::start(&n1, "to-node2")?;
        let clear = marker("mesh-clear");
        let body = curl_ok(&a, &format!("http://{}/{clear}", http.addr()), &[])?;
        ensure!(body.contains(&clear), "{body:?}");
        let pcap = capture.stop()?;
        ensure!(
            pcap.contains(clear.as_bytes()),
            "a marker sent in clear is missing from the capture"
        );
        ensure!(pcap.tcp_port_counts(8080).1 >= 2, "{:?}", pcap.tcp_ports());
        ensure!(pcap.tcp_port_counts(TUNNEL_PORT).0 == 0);
        ensure!(!pcap.contains(marker("never-sent").as_bytes()));

        let echo = kit.serve(&b, addr(b.ip(), 9001), ServeMode::Echo)?;
        let opts = LoadOptions {
            timeout: Duration::from_secs(1),
            ..LoadOptions::default()
        };
        let mut load = LoadClient::start(&kit, &a, echo.addr(), &opts)?;
        load.wait_for_successes(30, SHORT)?;
        ensure!(load.progress().failed == 0, "{:?}", load.progress());
        drop(echo);
        wait_for("the load client counts failures", SHORT, || {
            let now = load.progress();
            Ok(if now.failed >= 3 {
                Ok(())
            } else {
                Err(format!("{now:?}"))
            })
        })?;
        let report = load.stop()?;
        println!(
            "load: {} ok, {} failed; first: {:?}",
            report.ok,
            report.failed,
            report.failures.first()
        );
        ensure!(report.ok >= 30 && report.failed >= 3 && !report.failures.is_empty());
        ensure!(report.status.is_some_and(|s| !s.success()), "{report:?}");
        Ok(())
    };
    if let Err(e) = f() {
        panic!("{e:?}");
    }
}

/// A rolling update of the peer's agent: the pooled tunnel connection dies with it, and the
/// next connection after the new agent is up goes over a new tunnel connection without a
/// failed request.
#[test]
fn pooled_connection_is_replaced_after_the_peer_agent_restarts() {
    with_mesh(TrustInit::default(), |m| {
        let server = m.kit.serve(&m.b, addr(m.b.ip(), 8080), ServeMode::Http)?;
        let url = format!("http://{}/", server.addr());
        let agent1 = Agent::start(&m.n1, &m.node1().render())?;
        let mut agent2 = Agent::start(&m.n2, &m.node2().render())?;
        let outbound = [("direction", "outbound")];
        curl_ok(&m.a, &url, &[]).context("before the restart")?;
        ensure!(agent1.metric_sum(TUNNEL_OPENED, &outbound)? == 1.0);

        let status = agent2.terminate()?;
        ensure!(status.success(), "node 2's agent exited with {status}");
        drop(agent2);
        let agent2 = Agent::start(&m.n2, &m.node2().render())?;
        for i in 0..5 {
            curl_ok(&m.a, &url, &[]).with_context(|| format!("request {i} after the restart"))?;
        }
        let opened = agent1.metric_sum(TUNNEL_OPENED, &outbound)?;
        ensure!(
            opened == 2.0,
            "expected one new tunnel connection after the restart, node 1 opened {opened} in all"
        );
        ensure!(agent2.metric_sum(TUNNEL_OPENED, &[("direction", "inbound")])? == 1.0);
        Ok(())
    })
}

/// Per-hop series of workload pairs that stopped talking are removed after
/// `agent.metrics_idle_expiry`, so churn cannot grow /metrics without bound.
#[test]
fn idle_per_hop_series_expire() {
    with_mesh(TrustInit::default(), |m| {
        let server = m.kit.serve(&m.b, addr(m.b.ip(), 8080), ServeMode::Http)?;
        let agent1 = Agent::start(
            &m.n1,
            &m.node1().agent("metrics_idle_expiry", "\"1s\"").render(),
        )?;
        let _agent2 = Agent::start(&m.n2, &m.node2().render())?;
        let url = format!("http://{}/", server.addr());
        curl_ok(&m.a, &url, &[])?;
        let (id_a, id_b) = (spiffe_id("a"), spiffe_id("b"));
        let hop = mtls_labels("source", &id_a, &id_b);
        // Control: the series exists after the connection, with its lifetime observed.
        agent1.wait_metric(TCP_OPENED, &hop, METRIC_LAG, |v| v == 1.0)?;
        agent1.wait_metric(
            "mesh_tcp_connection_duration_milliseconds_count",
            &hop,
            METRIC_LAG,
            |v| v == 1.0,
        )?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = agent1.metrics()?;
            if !text.contains("istio_tcp_connections_opened_total{") {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "the idle series is still there after 10 s:\n{}",
                text.lines()
                    .filter(|l| l.starts_with("istio_tcp"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    })
}
