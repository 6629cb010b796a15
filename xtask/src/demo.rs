//! `cargo xtask demo`: one simulated ECS node with two tasks and the real agent.
//!
//! Task `b` runs a plain HTTP server (mesh-testkit) that answers with the address it saw
//! the client as; task `a` runs an unmodified `curl`. The agent captures curl's connection
//! in the kernel and carries it to b, so b sees a's address with the agent's new source
//! port, and the agent's metrics count the connection. Everything the demo made
//! (namespaces, cgroups, processes) is removed on the way out, also on failure.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use mesh_testbed::{Agent, Launch, ServeMode, Testkit, Topology, run_ok};

const SERVER_PORT: u16 = 8080;

pub fn run(workspace_root: &Path, agent_bin: &Path) -> Result<()> {
    // `cargo xtask demo` builds mesh-tests (debug) together with the agent.
    let kit = Testkit::new(workspace_root.join("target/debug/mesh-testkit"))?;
    let topology = Topology::new().context("building the demo topology")?;
    let node = topology.add_node()?;
    let a = node.add_task("a")?;
    let b = node.add_task("b")?;
    println!(
        "node {} (bridge {}): task a = {}, task b = {}",
        node.name(),
        node.ip(),
        a.ip(),
        b.ip()
    );

    let server = kit.serve(
        &b,
        SocketAddr::new(b.ip().into(), SERVER_PORT),
        ServeMode::Http,
    )?;
    let config = format!(
        "[capture]\nmode = \"listed\"\ndestinations = [\"{}\"]\n\n{}\n{}",
        node.subnet(),
        a.config(),
        b.config()
    );
    let launch = Launch {
        bin: agent_bin.to_path_buf(),
        ..Launch::default()
    };
    let mut agent = Agent::start_with(&node, &config, &launch)?;
    println!(
        "agent ready (pid {}) with this config:\n{config}",
        agent.pid()
    );

    let url = format!("http://{}/", server.addr());
    let mut curl = a.command("curl")?;
    curl.args([
        "-sS",
        "--max-time",
        "5",
        "-w",
        "curl's socket: %{local_ip}:%{local_port}\n",
        &url,
    ]);
    let output = run_ok(&mut curl, Duration::from_secs(10)).context("curl in task a")?;
    println!("$ curl {url}   # in task a, unmodified");
    for line in output.lines() {
        println!("  {line}");
    }
    // What proves the capture: curl's socket ended on loopback (the agent's listener in
    // a's netns), yet b saw a's own address, from the socket the agent opened there.
    anyhow::ensure!(
        output.contains("curl's socket: 127.0.0.1:")
            && output.starts_with(&format!("peer={}:", a.ip())),
        "curl's connection was not carried by the agent\n{}",
        agent.log_tail(30)
    );
    println!(
        "curl connected to the agent's listener on loopback in task a; b saw task a's own \
         address ({}) from the agent's socket",
        a.ip()
    );

    println!("agent metrics (mesh_*):");
    for line in agent.metrics()?.lines().filter(|l| l.starts_with("mesh_")) {
        println!("  {line}");
    }
    let status = agent.terminate()?;
    println!("agent stopped: {status}; tearing down {}", topology.id());
    anyhow::ensure!(
        status.success(),
        "agent exited with {status}\n{}",
        agent.log_tail(30)
    );
    Ok(())
}
