//! Host-port endpoints (bridge network mode): a task published on `<node ip>:<host port>`, as
//! Cloud Map SRV records and Docker port publishing give it out, is reached through the tunnel
//! listener in its node's own netns. The client names the identity it expects in SNI; the node
//! listener presents that task's certificate, maps the host port to the task and connects to
//! the container port inside the task's netns.
//!
//! Needs root, cgroup v2, iproute2, curl and dnsmasq (Debian: dnsmasq-base).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use mesh_testbed::dns::{DnsZone, Dnsmasq, Srv};
use mesh_testbed::mesh::{MeshConfig, TwoNodes, spiffe_id, task_section};
use mesh_testbed::{Agent, ServeMode, Task, Testkit, run_with_timeout};

const HOST_PORT: u16 = 32768;
const CONTAINER_PORT: u16 = 8080;
const TCP_OPENED: &str = "istio_tcp_connections_opened_total";
const TUNNEL_OPENED: &str = "mesh_tunnel_connections_opened_total";
const CONNECT_ERRORS: &str = "mesh_connect_errors_total";
const LAG: Duration = Duration::from_secs(10);

fn curl(task: &Task, url: &str) -> Result<(bool, String)> {
    let mut command = task.command("curl")?;
    command.args(["-sS", "--max-time", "5", url]);
    let out = run_with_timeout(&mut command, Duration::from_secs(10))?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

/// Node 1 knows service `b` only from an SRV record naming node 2's address and a host port;
/// node 2's task b publishes that host port. Traffic goes a -> node 1's agent -> mTLS to
/// node 2's node listener (SNI = b's identity) -> b's container port; a host port nobody
/// publishes is refused with a reset, and a service whose expected identity no task on node 2
/// has fails the handshake.
#[test]
fn srv_host_port_endpoint_is_reached_through_the_node_listener() {
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

        // b listens on all its addresses, as a bridge-mode container does.
        let _server = kit.serve(
            &b,
            SocketAddr::new(IpAddr::from([0, 0, 0, 0]), CONTAINER_PORT),
            ServeMode::Http,
        )?;
        let dns = Dnsmasq::start(
            &n1,
            SocketAddr::new(n1.ip().into(), 53),
            DnsZone::new()
                .ttl(5)
                .host("node2.apps.local", n2.ip().into())
                .srv(Srv::new(
                    "_b._tcp.apps.local",
                    "node2.apps.local",
                    HOST_PORT,
                ))
                .srv(Srv::new(
                    "_x._tcp.apps.local",
                    "node2.apps.local",
                    HOST_PORT + 1,
                )),
        )?;

        let node1 = MeshConfig::new(&trust).task(&a, "a").raw(&format!(
            "[dns]\nresolver = \"{}\"\n\n\
             [[services]]\nname = \"b\"\nsrv = \"_b._tcp.apps.local\"\nrole_arn = \"arn:aws:iam::111122223333:role/b\"\n\n\
             [[services]]\nname = \"x\"\nsrv = \"_x._tcp.apps.local\"\nrole_arn = \"arn:aws:iam::111122223333:role/x\"\n",
            dns.addr()
        ));
        let node2 = MeshConfig::new(&trust).raw(&format!(
            "{}host_ports = [\"{HOST_PORT}:{CONTAINER_PORT}\"]\n",
            task_section(&b, "b")
        ));
        let agent1 = Agent::start(&n1, &node1.render())?;
        let agent2 = Agent::start(&n2, &node2.render())?;

        // Wait until node 1 has resolved the SRV record (the address becomes meshed).
        let url = format!("http://{}:{HOST_PORT}/", n2.ip());
        let deadline = Instant::now() + LAG;
        let body = loop {
            let (ok, out) = curl(&a, &url)?;
            if ok {
                break out;
            }
            ensure!(
                Instant::now() < deadline,
                "a never reached b at its host port: {out}\n{}\n{}",
                agent1.log_tail(30),
                agent2.log_tail(30)
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        // The node agent connected inside b's netns, on the container port, over loopback.
        ensure!(
            body.starts_with("peer=127.0.0.1:"),
            "unexpected answer from b: {body}"
        );
        let id_a = spiffe_id("a");
        let id_b = spiffe_id("b");
        for (agent, reporter) in [(&agent1, "source"), (&agent2, "destination")] {
            let labels = [
                ("reporter", reporter),
                ("source_principal", id_a.as_str()),
                ("destination_workload", "b"),
                ("destination_principal", id_b.as_str()),
                ("connection_security_policy", "mutual_tls"),
            ];
            agent.wait_metric(TCP_OPENED, &labels, LAG, |v| v >= 1.0)?;
        }
        ensure!(agent2.metric_sum(TUNNEL_OPENED, &[("direction", "inbound")])? >= 1.0);

        // A host port nobody on node 2 publishes, for an identity node 2 has no task of: the
        // node listener has no certificate for that name, so the handshake fails and a's
        // connection is reset, fast.
        let started = Instant::now();
        let (ok, out) = curl(&a, &format!("http://{}:{}/", n2.ip(), HOST_PORT + 1))?;
        ensure!(!ok, "a reached an unpublished host port: {out}");
        ensure!(
            started.elapsed() < Duration::from_secs(2),
            "refusal took {:?}: {out}",
            started.elapsed()
        );
        agent1.wait_metric(
            CONNECT_ERRORS,
            &[("task", "a"), ("reason", "tunnel")],
            LAG,
            |v| v >= 1.0,
        )?;
        // Control: b is still reachable afterwards.
        let (ok, out) = curl(&a, &url)?;
        ensure!(ok, "b unreachable after the refused attempt: {out}");
        drop(dns);
        Ok(())
    })();
    if let Err(e) = result {
        panic!("{e:?}");
    }
}

/// The node listener only delivers a stream to the task whose identity the client asked for:
/// b and c both publish host ports on node 2; a client that expects b but dials c's host port
/// completes the handshake with b's certificate, and the stream is refused (421), so a's
/// connection is reset and never reaches c.
#[test]
fn node_listener_refuses_a_port_published_by_another_identity() {
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
        let c = n2.add_task("c")?;
        let _server = kit.serve(
            &c,
            SocketAddr::new(IpAddr::from([0, 0, 0, 0]), CONTAINER_PORT),
            ServeMode::Http,
        )?;
        let dns = Dnsmasq::start(
            &n1,
            SocketAddr::new(n1.ip().into(), 53),
            DnsZone::new()
                .ttl(5)
                .host("node2.apps.local", n2.ip().into())
                .srv(Srv::new(
                    "_b._tcp.apps.local",
                    "node2.apps.local",
                    HOST_PORT,
                )),
        )?;
        let node1 = MeshConfig::new(&trust).task(&a, "a").raw(&format!(
            "[dns]\nresolver = \"{}\"\n\n[[services]]\nname = \"b\"\nsrv = \"_b._tcp.apps.local\"\nrole_arn = \"arn:aws:iam::111122223333:role/b\"\n",
            dns.addr()
        ));
        // b publishes another host port; c publishes the one the SRV record names.
        let node2 = MeshConfig::new(&trust).raw(&format!(
            "{}host_ports = [\"{}:{}\"]\n\n{}host_ports = [\"{HOST_PORT}:{CONTAINER_PORT}\"]\n",
            task_section(&b, "b"),
            HOST_PORT + 1,
            CONTAINER_PORT + 1,
            task_section(&c, "c")
        ));
        let agent1 = Agent::start(&n1, &node1.render())?;
        let agent2 = Agent::start(&n2, &node2.render())?;
        let url = format!("http://{}:{HOST_PORT}/", n2.ip());
        // Until node 1 has resolved the SRV record the address is not meshed (and nothing
        // answers it); afterwards the tunnel must refuse. Either way a never reaches c.
        let deadline = Instant::now() + LAG;
        loop {
            let (ok, out) = curl(&a, &url)?;
            ensure!(!ok, "a reached c while expecting identity b: {out}");
            let tunnel_errors = agent1
                .metric(CONNECT_ERRORS, &[("task", "a"), ("reason", "tunnel")])
                .context("node 1 metrics")?;
            if tunnel_errors >= 1.0 {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "no tunnel refusal counted: {out}\n{}",
                agent1.log_tail(30)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        // It was the node listener's identity check that refused, after a good handshake.
        let log = agent2.log();
        ensure!(
            log.contains("not to the identity the client asked for"),
            "node 2 did not refuse the misdirected stream:\n{}",
            agent2.log_tail(30)
        );
        drop(dns);
        Ok(())
    })();
    if let Err(e) = result {
        panic!("{e:?}");
    }
}
