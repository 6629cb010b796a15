//! `cargo xtask demo`: two simulated ECS nodes, three tasks and the real agent on each node.
//!
//! The operator step first: `mesh-agent trust init` makes the trust anchor and issuer. Then
//! each node's agent meshes its tasks, minting a workload certificate per task from its IAM
//! role. An unmodified `curl` in task `a` (node 1) calls an HTTP server in task `b` (node 2):
//! the kernel captures the connect, node 1's agent carries it over mutual TLS to node 2's agent,
//! which checks b's policy and delivers it. A second call goes to task `c` on a's own node (no
//! network hop, same policy and metrics), and a call from `c` to `b`, which b's policy does
//! not allow, is refused. Both agents' metrics are printed. Everything the demo made
//! (namespaces, cgroups, processes, files) is removed on the way out, also on failure.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use mesh_testbed::mesh::{MeshConfig, TrustDir, TrustInit, spiffe_id};
use mesh_testbed::{Agent, Launch, ServeMode, Task, Testkit, Topology, run_ok};

const SERVER_PORT: u16 = 8080;

pub fn run(workspace_root: &Path, agent_bin: &Path) -> Result<()> {
    // `cargo xtask demo` builds mesh-tests (debug) together with the agent.
    let kit = Testkit::new(workspace_root.join("target/debug/mesh-testkit"))?;
    let topology = Topology::new().context("building the demo topology")?;
    let node1 = topology.add_node()?;
    let node2 = topology.add_node()?;
    topology.link_nodes(&node1, &node2)?;
    let a = node1.add_task("a")?;
    let c = node1.add_task("c")?;
    let b = node2.add_task("b")?;
    println!(
        "node1: task a = {}, task c = {}; node2: task b = {}",
        a.ip(),
        c.ip(),
        b.ip()
    );

    let trust = TrustDir::init_with(&topology, &TrustInit::default(), agent_bin)?;
    println!(
        "$ mesh-agent trust init --dir {} --trust-domain {}",
        trust.dir().display(),
        trust.trust_domain()
    );

    let b_server = kit.serve(
        &b,
        SocketAddr::new(b.ip().into(), SERVER_PORT),
        ServeMode::Http,
    )?;
    let c_server = kit.serve(
        &c,
        SocketAddr::new(c.ip().into(), SERVER_PORT),
        ServeMode::Http,
    )?;
    // The product's defaults: HTTP on undeclared ports is detected and proxied request by
    // request (the harness turns detection off for its L4 tests).
    let node1_config = MeshConfig::new(&trust)
        .protocol_detection(None)
        .task(&a, "a")
        .task(&c, "c")
        .endpoint(&b, "b")
        .render();
    // b admits a only.
    let node2_config = MeshConfig::new(&trust)
        .protocol_detection(None)
        .task(&b, "b")
        .endpoint(&a, "a")
        .endpoint(&c, "c")
        .policy("b", &[SERVER_PORT], &[&spiffe_id("a")])
        .render();
    let launch = Launch {
        bin: agent_bin.to_path_buf(),
        ..Launch::default()
    };
    let agent1 = Agent::start_with(&node1, &node1_config, &launch)?;
    let agent2 = Agent::start_with(&node2, &node2_config, &launch)?;
    println!("node2's agent config:\n{node2_config}");

    let url = format!("http://{}/", b_server.addr());
    let body = curl(&a, &url).context("curl in task a to task b")?;
    println!("$ curl {url}   # in task a on node1, unmodified\n  {body}");
    ensure!(
        body.starts_with("peer="),
        "unexpected answer from b: {body}\n{}",
        agent1.log_tail(30)
    );

    let url_c = format!("http://{}/", c_server.addr());
    let body = curl(&a, &url_c).context("curl in task a to task c")?;
    println!("$ curl {url_c}   # in task a, to task c on the same node\n  {body}");

    // HTTP, so the refusal is an HTTP answer from c's agent (Envoy's RBAC reply).
    let refused = c
        .command("curl")?
        .args(["-sS", "--max-time", "5", "-w", " (HTTP %{http_code})", &url])
        .output()
        .context("curl in task c")?;
    let answer = String::from_utf8_lossy(&refused.stdout);
    ensure!(
        answer.ends_with("(HTTP 403)"),
        "c reached b although b's policy admits only a: {answer}"
    );
    println!("$ curl {url}   # in task c: refused by b's policy\n  {answer}");

    for (name, agent) in [("node1", &agent1), ("node2", &agent2)] {
        println!("{name} agent metrics (per-hop, tunnel, policy, identity):");
        let text = agent.metrics()?;
        for line in text.lines().filter(|l| {
            l.starts_with("istio_tcp_connections_opened_total")
                || l.starts_with("istio_requests_total")
                || l.starts_with("mesh_tunnel_connections_opened_total")
                || l.starts_with("mesh_policy_denials_total")
                || l.starts_with("mesh_workload_cert_expiry_timestamp_seconds")
        }) {
            println!("  {line}");
        }
    }
    for mut agent in [agent1, agent2] {
        let status = agent.terminate()?;
        ensure!(
            status.success(),
            "agent exited with {status}\n{}",
            agent.log_tail(30)
        );
    }
    println!("agents stopped; tearing down {}", topology.id());
    Ok(())
}

fn curl(task: &Task, url: &str) -> Result<String> {
    let mut curl = task.command("curl")?;
    curl.args(["-sS", "--max-time", "5", url]);
    Ok(run_ok(&mut curl, Duration::from_secs(10))?
        .trim()
        .to_owned())
}
