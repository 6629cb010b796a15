//! How the agent learns a connection's protocol, end to end on two simulated nodes:
//!
//! 1. a server-speaks-first protocol (MySQL-like greeting) on a port declared `tcp`, and on a
//!    default opaque port (3306), is carried with no stall; on an undeclared port the
//!    detection fallback costs at most the configured timeout and is counted;
//! 2. a TCP route splits connections (not requests) by weight;
//! 3. HTTP on an undeclared port is detected and proxied request by request, reported by both
//!    agents (`reporter="source"` and `"destination"`) and written to both JSON access logs
//!    with the same trace context; a virtual service's requests are reported by the
//!    destination's agent too.
//!
//! Needs root, cgroup v2, iproute2 and curl.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use mesh_testbed::mesh::{MeshConfig, TwoNodes};
use mesh_testbed::{Agent, ServeMode, Task, Testkit, run_with_timeout};

const DETECTION_TIMEOUT: Duration = Duration::from_millis(1000);
const UNDECLARED: u16 = 7000;
const DECLARED_TCP: u16 = 7001;
const MYSQL: u16 = 3306;
const HTTP: u16 = 8080;
const HTTP_DECLARED: u16 = 8081;
const DETECTION_TIMEOUTS: &str = "mesh_protocol_detection_timeouts_total";

/// `result`, with the agents' last log lines when it is an error (the topology, and with it
/// the logs, is gone once the test body returns).
fn with_logs<T>(agents: &[&Agent], result: Result<T>) -> Result<T> {
    result.map_err(|e| {
        let logs: Vec<String> = agents
            .iter()
            .map(|a| format!("--- {} ---\n{}", a.node().name(), a.log_tail(40)))
            .collect();
        e.context(logs.join("\n"))
    })
}

fn greeting_ms(kit: &Testkit, from: &Task, to: SocketAddr) -> Result<(String, f64)> {
    let out = kit.run_client(
        from,
        to,
        &["--mode", "greeting", "--timeout", "10"],
        Duration::from_secs(20),
    )?;
    let field = |name: &str| {
        out.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .map(str::to_owned)
            .with_context(|| format!("no {name} in {out:?}"))
    };
    // `greeting="220 <ip:port> ready"`: the words between the quotes.
    let start = out.find("greeting=\"").context("no greeting")? + "greeting=\"".len();
    let end = out[start..].find('"').context("unterminated greeting")? + start;
    let ms: f64 = field("greeting_ms=")?.parse()?;
    Ok((out[start..end].to_owned(), ms))
}

#[test]
fn server_speaks_first_protocols_do_not_stall_and_detection_costs_at_most_its_timeout() {
    let result = (|| -> Result<()> {
        let kit = Testkit::new(env!("CARGO_BIN_EXE_mesh-testkit"))?;
        let TwoNodes {
            topology: _topology,
            n1,
            n2,
            trust,
        } = TwoNodes::new()?;
        let a = n1.add_task("a")?;
        let db = n2.add_task("db")?;
        let _servers = [UNDECLARED, DECLARED_TCP, MYSQL]
            .map(|port| kit.serve(&db, SocketAddr::new(db.ip().into(), port), ServeMode::Greet))
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        let routing = format!(
            r#"
[[virtual_nodes]]
name = "db"
endpoint = "{db}"
listeners = [{{ port = {DECLARED_TCP}, protocol = "tcp" }}]
"#,
            db = db.id(),
        );
        let timeout = format!("{}ms", DETECTION_TIMEOUT.as_millis());
        let agent1 = Agent::start(
            &n1,
            &MeshConfig::new(&trust)
                .protocol_detection(Some(&timeout))
                .task(&a, "a")
                .endpoint(&db, "db")
                .raw(&routing)
                .render(),
        )?;
        let agent2 = Agent::start(
            &n2,
            &MeshConfig::new(&trust)
                .task(&db, "db")
                .endpoint(&a, "a")
                .render(),
        )?;
        let body = || -> Result<()> {
            // The first connection also opens the tunnel connection: not what is measured.
            greeting_ms(&kit, &a, SocketAddr::new(db.ip().into(), DECLARED_TCP))?;
            let timeout_ms = DETECTION_TIMEOUT.as_secs_f64() * 1000.0;
            for port in [DECLARED_TCP, MYSQL] {
                let (greeting, ms) = greeting_ms(&kit, &a, SocketAddr::new(db.ip().into(), port))?;
                println!("port {port}: {greeting:?} after {ms:.1} ms");
                ensure!(
                    greeting == format!("220 {}:{port} ready", db.ip()),
                    "greeting {greeting:?} on port {port}"
                );
                ensure!(
                    ms < timeout_ms / 2.0,
                    "the greeting on port {port} (declared opaque) took {ms:.1} ms: it waited for detection"
                );
            }
            ensure!(
                agent1.metric_sum(DETECTION_TIMEOUTS, &[])? == 0.0,
                "no detection may happen on declared or opaque ports"
            );

            let mut delays = Vec::new();
            for _ in 0..3 {
                let (greeting, ms) =
                    greeting_ms(&kit, &a, SocketAddr::new(db.ip().into(), UNDECLARED))?;
                ensure!(greeting == format!("220 {}:{UNDECLARED} ready", db.ip()));
                delays.push(ms);
            }
            println!(
                "undeclared port {UNDECLARED}: greetings after {delays:?} ms (timeout {timeout_ms} ms)"
            );
            for ms in &delays {
                // The timeout, plus the connect and the tunnel stream (a few ms here).
                ensure!(
                    *ms >= timeout_ms * 0.95 && *ms <= timeout_ms + 300.0,
                    "greeting on the undeclared port after {ms:.1} ms, detection timeout {timeout_ms} ms"
                );
            }
            agent1.wait_metric(
                DETECTION_TIMEOUTS,
                &[("destination_port", &UNDECLARED.to_string())],
                Duration::from_secs(5),
                |v| v == 3.0,
            )?;
            Ok(())
        };
        with_logs(&[&agent1, &agent2], body())
    })();
    if let Err(e) = result {
        panic!("{e:?}");
    }
}

#[test]
fn tcp_routes_split_connections_by_weight() {
    const VIP: &str = "198.18.250.2";
    const CONNECTIONS: usize = 200;
    let result = (|| -> Result<()> {
        let kit = Testkit::new(env!("CARGO_BIN_EXE_mesh-testkit"))?;
        let TwoNodes {
            topology: _topology,
            n1,
            n2,
            trust,
        } = TwoNodes::new()?;
        let a = n1.add_task("a")?;
        let db1 = n2.add_task("db1")?;
        let db2 = n2.add_task("db2")?;
        let _s1 = kit.serve(
            &db1,
            SocketAddr::new(db1.ip().into(), MYSQL),
            ServeMode::Greet,
        )?;
        let _s2 = kit.serve(
            &db2,
            SocketAddr::new(db2.ip().into(), MYSQL),
            ServeMode::Greet,
        )?;
        let routing = format!(
            r#"
[[virtual_services]]
name = "db.apps.local"
addresses = ["{VIP}"]
provider = {{ virtual_router = "db" }}

[[virtual_routers]]
name = "db"
listeners = [{{ port = {MYSQL}, protocol = "tcp" }}]

[[virtual_nodes]]
name = "db-primary"
endpoint = "{db1}"
listeners = [{{ port = {MYSQL}, protocol = "tcp" }}]

[[virtual_nodes]]
name = "db-replica"
endpoint = "{db2}"
listeners = [{{ port = {MYSQL}, protocol = "tcp" }}]

[[routes]]
name = "split"
virtual_router = "db"
kind = "tcp"
action.weighted_targets = [
  {{ virtual_node = "db-primary", weight = 50 }},
  {{ virtual_node = "db-replica", weight = 50 }},
]
"#,
            db1 = db1.id(),
            db2 = db2.id(),
        );
        let agent1 = Agent::start(
            &n1,
            &MeshConfig::new(&trust)
                .task(&a, "a")
                .endpoint(&db1, "db")
                .endpoint(&db2, "db")
                .raw(&routing)
                .render(),
        )?;
        let agent2 = Agent::start(
            &n2,
            &MeshConfig::new(&trust)
                .task(&db1, "db")
                .task(&db2, "db")
                .endpoint(&a, "a")
                .render(),
        )?;
        let body = || -> Result<()> {
            let vip: SocketAddr = format!("{VIP}:{MYSQL}").parse()?;
            let mut answered: HashMap<String, usize> = HashMap::new();
            let mut slowest: f64 = 0.0;
            for _ in 0..CONNECTIONS {
                let (greeting, ms) = greeting_ms(&kit, &a, vip)?;
                slowest = slowest.max(ms);
                *answered.entry(greeting).or_default() += 1;
            }
            let to = |t: &Task| {
                answered
                    .get(&format!("220 {}:{MYSQL} ready", t.ip()))
                    .copied()
                    .unwrap_or(0)
            };
            let (to1, to2) = (to(&db1), to(&db2));
            println!(
                "{CONNECTIONS} connections: db-primary {to1}, db-replica {to2}; slowest greeting {slowest:.1} ms"
            );
            ensure!(
                to1 + to2 == CONNECTIONS,
                "greetings from elsewhere: {answered:?}"
            );
            // 50/50 over 200 connections: a standard deviation of about 7.
            ensure!(
                (70..=130).contains(&to1),
                "split {to1}/{to2} is not 50/50 within 30 connections"
            );
            let by_node = |node: &str| {
                agent1.metric_sum(
                    "istio_tcp_connections_opened_total",
                    &[("reporter", "source"), ("destination_workload", node)],
                )
            };
            let (m1, m2) = (by_node("db-primary")?, by_node("db-replica")?);
            ensure!(
                (m1, m2) == (to1 as f64, to2 as f64),
                "metrics say {m1}/{m2}, the greetings {to1}/{to2}"
            );
            Ok(())
        };
        with_logs(&[&agent1, &agent2], body())
    })();
    if let Err(e) = result {
        panic!("{e:?}");
    }
}

/// The access log's request lines, as JSON objects.
fn request_lines(path: &Path) -> Result<Vec<serde_json::Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).context("an access log line"))
        .filter(|l| l.as_ref().map_or(true, |v| v["kind"] == "request"))
        .collect()
}

fn curl(task: &Task, args: &[&str]) -> Result<String> {
    let mut command = task.command("curl")?;
    command.args(["-sS", "--max-time", "20"]).args(args);
    let out = run_with_timeout(&mut command, Duration::from_secs(30))?;
    if !out.status.success() {
        bail!("curl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn http_on_an_undeclared_port_is_detected_reported_by_both_agents_and_logged() {
    const VIP: &str = "198.18.250.3";
    let result = (|| -> Result<()> {
        let kit = Testkit::new(env!("CARGO_BIN_EXE_mesh-testkit"))?;
        let TwoNodes {
            topology,
            n1,
            n2,
            trust,
        } = TwoNodes::new()?;
        let a = n1.add_task("a")?;
        let web = n2.add_task("web")?;
        let _servers = [HTTP, HTTP_DECLARED]
            .map(|port| {
                kit.serve(
                    &web,
                    SocketAddr::new(web.ip().into(), port),
                    ServeMode::Http,
                )
            })
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        let log1 = topology.dir().join("access-node1.log");
        let log2 = topology.dir().join("access-node2.log");
        let routing = format!(
            r#"
[[virtual_services]]
name = "web.apps.local"
addresses = ["{VIP}"]
provider = {{ virtual_node = "web" }}

[[virtual_nodes]]
name = "web"
endpoint = "{web}"
listeners = [{{ port = {HTTP_DECLARED}, protocol = "http" }}]
"#,
            web = web.id(),
        );
        let agent1 = Agent::start(
            &n1,
            &MeshConfig::new(&trust)
                .protocol_detection(None)
                .access_log(&log1)
                .task(&a, "a")
                .endpoint(&web, "web")
                .raw(&routing)
                .render(),
        )?;
        let agent2 = Agent::start(
            &n2,
            &MeshConfig::new(&trust)
                .protocol_detection(None)
                .access_log(&log2)
                .task(&web, "web")
                .endpoint(&a, "a")
                .render(),
        )?;
        let body = || -> Result<()> {
            // Undeclared port: HTTP/1.1 (keep-alive from curl; the server closes after each
            // answer), detected from the request line.
            let direct = format!("http://{}:{HTTP}", web.ip());
            let h1 = curl(&a, &[&format!("{direct}/one[1-20]"), "-w", "\n"])?;
            ensure!(
                h1.lines().filter(|l| l.starts_with("peer=")).count() == 20,
                "{h1}"
            );
            // The virtual service (declared http), addressed by name.
            let vs = curl(
                &a,
                &[
                    "-H",
                    "Host: web.apps.local",
                    &format!("http://{VIP}:{HTTP_DECLARED}/vs[1-10]"),
                    "-w",
                    "\n",
                ],
            )?;
            ensure!(
                vs.lines().filter(|l| l.starts_with("peer=")).count() == 10,
                "{vs}"
            );

            let a_id = "spiffe://mesh.test/aws/111122223333/role/a";
            let requests = |agent: &Agent, reporter: &str, service: &str| {
                agent.metric_sum(
                    "istio_requests_total",
                    &[
                        ("reporter", reporter),
                        ("destination_service", service),
                        ("destination_workload", web.id()),
                        ("source_workload", a.id()),
                        ("response_code", "200"),
                    ],
                )
            };
            let wait = Duration::from_secs(10);
            for (agent, reporter) in [(&agent1, "source"), (&agent2, "destination")] {
                agent.wait_metric_sum(
                    "istio_requests_total",
                    &[("reporter", reporter), ("destination_service", web.id())],
                    wait,
                    |v| v == 20.0,
                )?;
                agent.wait_metric_sum(
                    "istio_requests_total",
                    &[
                        ("reporter", reporter),
                        ("destination_service", "web.apps.local"),
                    ],
                    wait,
                    |v| v == 10.0,
                )?;
                ensure!(requests(agent, reporter, web.id())? == 20.0);
                ensure!(requests(agent, reporter, "web.apps.local")? == 10.0);
            }
            let principal =
                agent2.samples("istio_requests_total", &[("reporter", "destination")])?;
            ensure!(
                principal
                    .iter()
                    .all(|s| s.label("source_principal") == Some(a_id)
                        && s.label("connection_security_policy") == Some("mutual_tls")),
                "destination-side request series: {principal:?}"
            );
            ensure!(
                agent1.metric_sum(DETECTION_TIMEOUTS, &[])? == 0.0,
                "HTTP was detected at once"
            );

            // Both access logs: one line per request, and the same trace on both sides.
            let deadline = std::time::Instant::now() + wait;
            let (lines1, lines2) = loop {
                let (l1, l2) = (request_lines(&log1)?, request_lines(&log2)?);
                if (l1.len() >= 30 && l2.len() >= 30) || std::time::Instant::now() > deadline {
                    break (l1, l2);
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            ensure!(
                lines1.len() == 30 && lines2.len() == 30,
                "access log request lines: node1 {}, node2 {}",
                lines1.len(),
                lines2.len()
            );
            let traces = |lines: &[serde_json::Value], reporter: &str| -> Result<Vec<String>> {
                lines
                    .iter()
                    .map(|l| {
                        ensure!(
                            l["reporter"] == reporter && l["response_code"] == "200",
                            "{l}"
                        );
                        ensure!(l["source_principal"] == a_id, "{l}");
                        ensure!(l["method"] == "GET" && l["path"].as_str().is_some(), "{l}");
                        l["traceparent"]
                            .as_str()
                            .map(str::to_owned)
                            .with_context(|| format!("no traceparent: {l}"))
                    })
                    .collect()
            };
            let (mut t1, mut t2) = (traces(&lines1, "source")?, traces(&lines2, "destination")?);
            t1.sort();
            t2.sort();
            ensure!(
                t1 == t2,
                "the two agents logged different traces:\n{t1:?}\n{t2:?}"
            );
            println!(
                "30 requests reported by both agents; access log lines match by traceparent, e.g. {}",
                lines2[0]
            );
            Ok(())
        };
        with_logs(&[&agent1, &agent2], body())
    })();
    if let Err(e) = result {
        panic!("{e:?}");
    }
}
