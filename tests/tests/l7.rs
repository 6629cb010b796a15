//! L7 routing end to end: the seed scenario. serviceA (task a, node 1) calls
//! `serviceb.apps.local` at the virtual service's address; the router splits requests 75/25
//! between virtual nodes serviceB (task b1) and serviceBv2 (task b2) on node 2, every request
//! carried over the mutual-TLS tunnel and counted in `istio_requests_total`.
//!
//! Needs root, cgroup v2, iproute2 and curl.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use mesh_testbed::mesh::{MeshConfig, TrustDir, TrustInit, endpoint_section, spiffe_id};
use mesh_testbed::{Agent, ServeMode, Task, Testkit, Topology, run_with_timeout};

/// What applications resolve `serviceb.apps.local` to (a Route 53 / Cloud Map record).
const VIP: &str = "198.18.250.1";
const PORT: u16 = 8080;
const REQUESTS: usize = 2000;

/// The routing part of node 1's configuration, with the given weights.
fn routing(weight_b: u32, weight_b2: u32) -> String {
    format!(
        r#"
[[virtual_services]]
name = "serviceb.apps.local"
addresses = ["{VIP}"]
provider = {{ virtual_router = "serviceB" }}

[[virtual_routers]]
name = "serviceB"
listeners = [{{ port = {PORT}, protocol = "http" }}]

[[virtual_nodes]]
name = "serviceB"
endpoint = "b1"
listeners = [{{ port = {PORT}, protocol = "http" }}]

[[virtual_nodes]]
name = "serviceBv2"
endpoint = "b2"
listeners = [{{ port = {PORT}, protocol = "http" }}]

[[routes]]
name = "split"
virtual_router = "serviceB"
match.prefix = "/"
action.weighted_targets = [
  {{ virtual_node = "serviceB", weight = {weight_b} }},
  {{ virtual_node = "serviceBv2", weight = {weight_b2} }},
]
"#
    )
}

/// `n` requests over one keep-alive connection (curl's URL globbing); returns each response
/// body's first line.
fn requests(a: &Task, n: usize) -> Result<Vec<String>> {
    let mut curl = a.command("curl")?;
    curl.args(["-sS", "--max-time", "60", "-H", "Host: serviceb.apps.local"])
        .arg(format!("http://{VIP}:{PORT}/req[1-{n}]"))
        .args(["-w", "\n"]);
    let out = run_with_timeout(&mut curl, Duration::from_secs(90))?;
    ensure!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect())
}

/// Which task answered: the server answers `peer=<ip>:<port>`, the address it saw the agent's
/// connection from, which is the serving task's own (the tunnel delivers inside its netns).
fn count(bodies: &[String], task: &Task) -> usize {
    let prefix = format!("peer={}:", task.ip());
    bodies.iter().filter(|b| b.starts_with(&prefix)).count()
}

#[test]
fn seed_scenario_splits_75_25_and_follows_a_reload_to_0_100() {
    let result = (|| -> Result<()> {
        let kit = Testkit::new(env!("CARGO_BIN_EXE_mesh-testkit"))?;
        let topology = Topology::new()?;
        let n1 = topology.add_node()?;
        let n2 = topology.add_node()?;
        topology.link_nodes(&n1, &n2)?;
        let a = n1.add_task("a")?;
        let b1 = n2.add_task("b1")?;
        let b2 = n2.add_task("b2")?;
        let trust = TrustDir::init(&topology, &TrustInit::default())?;
        let _s1 = kit.serve(&b1, SocketAddr::new(b1.ip().into(), PORT), ServeMode::Http)?;
        let _s2 = kit.serve(&b2, SocketAddr::new(b2.ip().into(), PORT), ServeMode::Http)?;

        let node1 = |weights: (u32, u32)| {
            MeshConfig::new(&trust)
                .task(&a, "serviceA")
                .raw(&endpoint_section(&b1, "serviceB"))
                .raw(&endpoint_section(&b2, "serviceBv2"))
                .raw(&routing(weights.0, weights.1))
                .render()
        };
        let node2 = MeshConfig::new(&trust)
            .task(&b1, "serviceB")
            .task(&b2, "serviceBv2")
            .endpoint(&a, "serviceA");
        let mut agent1 = Agent::start(&n1, &node1((75, 25)))?;
        let _agent2 = Agent::start(&n2, &node2.render())?;

        let bodies = requests(&a, REQUESTS)?;
        ensure!(
            bodies.len() == REQUESTS,
            "{} answers for {REQUESTS} requests",
            bodies.len()
        );
        let (to_b1, to_b2) = (count(&bodies, &b1), count(&bodies, &b2));
        ensure!(
            to_b1 + to_b2 == REQUESTS,
            "answers from neither b1 nor b2: {:?}",
            bodies.iter().take(3).collect::<Vec<_>>()
        );
        let share = to_b1 as f64 * 100.0 / REQUESTS as f64;
        println!("75/25: serviceB {to_b1}, serviceBv2 {to_b2} ({share:.1}% to serviceB)");
        ensure!(
            (71.0..=79.0).contains(&share),
            "serviceB got {share:.1}% of the requests, expected 75 ± 4"
        );
        let id_a = spiffe_id("serviceA");
        let id_b1 = spiffe_id("serviceB");
        let ok_b1 = agent1.metric(
            "istio_requests_total",
            &[
                ("reporter", "source"),
                ("source_principal", id_a.as_str()),
                ("destination_workload", "serviceB"),
                ("destination_principal", id_b1.as_str()),
                ("destination_service", "serviceb.apps.local"),
                ("response_code", "200"),
                ("connection_security_policy", "mutual_tls"),
            ],
        )?;
        ensure!(
            ok_b1 as usize == to_b1,
            "istio_requests_total for serviceB is {ok_b1}, curl saw {to_b1}"
        );

        // Finish the migration: 0/100, by reloading the file (no restart).
        let pid = agent1.pid();
        agent1.reload(&node1((0, 100)))?;
        let bodies = requests(&a, 200).context("after the reload to 0/100")?;
        ensure!(
            bodies.len() == 200,
            "{} answers for 200 requests",
            bodies.len()
        );
        ensure!(
            count(&bodies, &b1) == 0 && count(&bodies, &b2) == 200,
            "after 0/100: serviceB {}, serviceBv2 {}",
            count(&bodies, &b1),
            count(&bodies, &b2)
        );
        ensure!(agent1.pid() == pid, "the agent restarted");
        Ok(())
    })();
    if let Err(e) = result {
        panic!("{e:?}");
    }
}
