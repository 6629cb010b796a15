//! The loopback redirect (`capture.loopback_redirect`): both loopback legs of a meshed
//! connection (app -> agent's outbound listener on node 1, agent -> app on node 2) are carried
//! by the kernel's socket-map redirect instead of loopback TCP, bytes arrive whole and in order
//! in both directions (including half-close and a server that speaks first), the redirect is
//! switchable by a reload, and with it off everything still works over loopback TCP.
//!
//! "Carried by the redirect" is checked from outside the agent: `ss -ti` in each task's netns
//! reports the TCP byte counters of the loopback sockets, which stay at zero when the bytes
//! skip the TCP stack and count every byte when they do not (the control, after a reload that
//! switches the redirect off).
//!
//! The clients wait in poll(2) (`--io poll`), as event-loop programs do: a blocking read on a
//! redirected socket can fail with EAGAIN on this kernel, which is why the redirect is off by
//! default (docs/benchmarks.md).
//!
//! Needs root, cgroup v2, iproute2 (`ss`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use mesh_testbed::mesh::{MeshConfig, TrustDir, TwoNodes};
use mesh_testbed::{
    Agent, Node, ServeMode, Task, Testkit, Topology, require_root, require_tools, run_with_timeout,
};

const ECHO: u16 = 9001;
const HALF_CLOSE: u16 = 9002;
const GREET: u16 = 9003;
const DECISIONS: &str = "mesh_capture_decisions_total";
const TIMEOUT: Duration = Duration::from_secs(60);
/// Bulk sizes: large enough for many writes and for the receiver to fall behind the sender.
const BULK: u64 = 8 << 20;
const REPLY: u64 = 4 << 20;

struct Mesh {
    kit: Testkit,
    trust: TrustDir,
    a: Task,
    b: Task,
    n1: Node,
    n2: Node,
    _topology: Topology,
}

impl Mesh {
    fn new() -> Result<Mesh> {
        require_root()?;
        require_tools(&["ip", "ss"])?;
        let kit = Testkit::new(env!("CARGO_BIN_EXE_mesh-testkit"))?;
        let TwoNodes {
            topology,
            n1,
            n2,
            trust,
        } = TwoNodes::new()?;
        let a = n1.add_task("a")?;
        let b = n2.add_task("b")?;
        Ok(Mesh {
            kit,
            trust,
            a,
            b,
            n1,
            n2,
            _topology: topology,
        })
    }

    fn node1(&self, redirect: bool) -> String {
        MeshConfig::new(&self.trust)
            .task(&self.a, "a")
            .endpoint(&self.b, "b")
            .raw(&format!("[capture]\nloopback_redirect = {redirect}\n"))
            .render()
    }

    fn node2(&self, redirect: bool) -> String {
        MeshConfig::new(&self.trust)
            .task(&self.b, "b")
            .endpoint(&self.a, "a")
            .raw(&format!("[capture]\nloopback_redirect = {redirect}\n"))
            .render()
    }
}

fn addr(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

fn decisions(agent: &Agent, decision: &str) -> Result<f64> {
    agent.metric_sum(DECISIONS, &[("decision", decision)])
}

/// `ss -tin` of a netns: established TCP sockets with their counters.
fn ss(netns: &Path) -> Result<String> {
    let mut cmd = std::process::Command::new("ip");
    cmd.arg("netns")
        .arg("exec")
        .arg(netns.file_name().context("netns name")?)
        .args(["ss", "-tinH", "state", "established"]);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(10))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The TCP payload bytes (sent + received) of the established socket whose line names both
/// `local` and `peer`, from `ss -tin` output (a counter `ss` leaves out is zero).
fn tcp_bytes(ss: &str, local: &str, peer: &str) -> Result<u64> {
    // Each socket is a line with the addresses followed by a line with its counters.
    let lines: Vec<&str> = ss.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.len() >= 4 && words[2] == local && words[3] == peer {
            let info = lines.get(i + 1).copied().unwrap_or_default();
            let counter = |name: &str| -> u64 {
                info.split_whitespace()
                    .find_map(|w| w.strip_prefix(name))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            return Ok(counter("bytes_sent:") + counter("bytes_received:"));
        }
    }
    bail!("no established socket {local} -> {peer} in:\n{ss}")
}

/// One long-lived connection from a to b's echo server exchanging small messages for a while;
/// halfway through, the TCP payload counters of the two loopback legs, as
/// (a's socket to its agent, b's server socket accepted from its agent), and the number of
/// messages the whole connection carried.
fn leg_bytes(m: &Mesh) -> Result<(u64, u64, u64)> {
    let mut hold = m.kit.client(
        &m.a,
        addr(m.b.ip(), ECHO),
        &[
            "--mode",
            "hold",
            "--seconds",
            "2",
            "--io",
            "poll",
            "--timeout",
            "10",
        ],
    )?;
    let child = hold
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("start the hold client")?;
    std::thread::sleep(Duration::from_millis(1000));
    let (ss_a, ss_b) = (ss(&m.a.netns_path()), ss(&m.b.netns_path()));
    let out = child.wait_with_output().context("hold client")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "hold client failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let messages: u64 = stdout
        .split_whitespace()
        .find_map(|w| w.strip_prefix("messages="))
        .context("no messages= in the hold client's summary")?
        .parse()?;
    let (ss_a, ss_b) = (ss_a?, ss_b?);
    // a's socket: 127.0.0.1:<port> -> 127.0.0.1:15001; the client reports its own port.
    let local = stdout
        .split_whitespace()
        .find_map(|w| w.strip_prefix("local="))
        .context("no local= in the hold client's summary")?;
    let a_leg = tcp_bytes(
        &ss_a,
        &format!("127.0.0.1:{}", port_of(local)?),
        "127.0.0.1:15001",
    )?;
    // b's server socket: accepted on b's address from the agent dialling from b's netns.
    let b_line = ss_b
        .lines()
        .find_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.len() >= 4 && w[2] == format!("{}:{ECHO}", m.b.ip())).then(|| w[3].to_owned())
        })
        .with_context(|| format!("no established socket on b's echo port in:\n{ss_b}"))?;
    let b_leg = tcp_bytes(&ss_b, &format!("{}:{ECHO}", m.b.ip()), &b_line)?;
    Ok((a_leg, b_leg, messages))
}

fn port_of(addr: &str) -> Result<u16> {
    Ok(addr.parse::<SocketAddr>().context("socket address")?.port())
}

/// Bulk echo (both directions at once), half-close with a large reply, a server that speaks
/// first, and 20 concurrent connections: every byte checked by the client.
fn traffic(m: &Mesh) -> Result<()> {
    let bulk = BULK.to_string();
    let reply = REPLY.to_string();
    for args in [
        vec!["--mode", "echo", "--send-bytes", &bulk],
        vec![
            "--mode",
            "halfclose",
            "--send-bytes",
            &bulk,
            "--expect-bytes",
            &reply,
        ],
        vec![
            "--mode",
            "concurrent",
            "--connections",
            "20",
            "--send-bytes",
            "262144",
        ],
    ] {
        let port = if args[1] == "halfclose" {
            HALF_CLOSE
        } else {
            ECHO
        };
        let mut args = args.clone();
        args.extend(["--io", "poll", "--timeout", "20"]);
        let out = m
            .kit
            .run_client(&m.a, addr(m.b.ip(), port), &args, TIMEOUT)?;
        println!("{}: {out}", args[1]);
    }
    let out = m.kit.run_client(
        &m.a,
        addr(m.b.ip(), GREET),
        &["--mode", "greeting", "--io", "poll", "--timeout", "20"],
        TIMEOUT,
    )?;
    println!("greeting: {out}");
    Ok(())
}

/// Reloads both agents (each call returns once that agent has applied its new file).
fn reload(agents: [&mut Agent; 2], configs: [String; 2]) -> Result<()> {
    for (agent, config) in agents.into_iter().zip(configs) {
        agent.reload(&config)?;
    }
    Ok(())
}

#[test]
fn loopback_legs_skip_tcp_carry_every_byte_and_follow_a_reload() {
    let m = Mesh::new().unwrap_or_else(|e| panic!("test prerequisites: {e:#}"));
    let result = (|| -> Result<()> {
        // Servers stop when dropped: held to the end of the test.
        let _echo = m.kit.serve(&m.b, addr(m.b.ip(), ECHO), ServeMode::Echo)?;
        let _half_close = m.kit.serve(
            &m.b,
            addr(m.b.ip(), HALF_CLOSE),
            ServeMode::HalfClose { reply_bytes: REPLY },
        )?;
        let _greet = m.kit.serve(&m.b, addr(m.b.ip(), GREET), ServeMode::Greet)?;
        let mut agent1 = Agent::start(&m.n1, &m.node1(true))?;
        let mut agent2 = Agent::start(&m.n2, &m.node2(true))?;

        // Redirect on: both legs' TCP counters stay at zero while messages flow.
        let (a_leg, b_leg, messages) = leg_bytes(&m)?;
        println!(
            "redirect on: {messages} messages; TCP payload bytes: a's leg {a_leg}, b's leg {b_leg}"
        );
        ensure!(messages >= 10, "only {messages} messages in 2 s");
        ensure!(
            a_leg == 0 && b_leg == 0,
            "with the redirect on, the loopback legs carried {a_leg} / {b_leg} bytes over TCP"
        );
        traffic(&m)?;
        let added = (
            decisions(&agent1, "redirect_socket_added")?,
            decisions(&agent2, "redirect_socket_added")?,
        );
        // hold + echo + halfclose + 20 concurrent + greeting = 24 connections, two ends each.
        println!("sockets added: node 1 {}, node 2 {}", added.0, added.1);
        ensure!(
            added.0 >= 48.0 && added.1 >= 48.0,
            "expected both ends of 24 connections in the map on each node, got {added:?}"
        );
        for agent in [&agent1, &agent2] {
            ensure!(decisions(agent, "redirect_add_failed")? == 0.0);
        }

        // Switched off by a reload: new connections count every byte on both legs again, and
        // still carry everything; no socket joins the map.
        reload([&mut agent1, &mut agent2], [m.node1(false), m.node2(false)])?;
        let (a_leg, b_leg, messages) = leg_bytes(&m)?;
        println!(
            "redirect off: {messages} messages; TCP payload bytes: a's leg {a_leg}, b's leg {b_leg}"
        );
        // 17 bytes each way per message (one every 100 ms), about half of them before the
        // sample; the floor leaves room for timing.
        let floor = messages * 8;
        ensure!(
            a_leg >= floor && b_leg >= floor,
            "with the redirect off, the legs carried only {a_leg} / {b_leg} TCP bytes for {messages} messages"
        );
        traffic(&m)?;
        ensure!(decisions(&agent1, "redirect_socket_added")? == added.0);
        ensure!(decisions(&agent2, "redirect_socket_added")? == added.1);

        // And on again.
        reload([&mut agent1, &mut agent2], [m.node1(true), m.node2(true)])?;
        let (a_leg, b_leg, _) = leg_bytes(&m)?;
        ensure!(
            a_leg == 0 && b_leg == 0,
            "switched on again, the legs carried {a_leg} / {b_leg} bytes over TCP"
        );
        Ok(())
    })();
    if let Err(e) = result {
        panic!("{e:?}");
    }
}
