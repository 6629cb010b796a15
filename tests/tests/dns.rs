//! Acceptance of DNS-discovered services (`[[services]]`, `[dns]`, `[outlier_detection]`):
//! two linked nodes, an agent on each. Node 1 runs task `a` (198.18.1.2, role `a`) and a
//! real dnsmasq on its bridge address (198.18.1.1:53, `mesh_testbed::dns`); node 2 runs
//! tasks `b1` (198.18.2.2) and `b2` (198.18.2.3), both role `backend` with an HTTP server on
//! :8080 and meshed by node 2's agent, and task `c` (198.18.2.4), which no agent knows.
//! Node 1's agent knows b1 and b2 ONLY through the service `backend` in DNS
//! (`backend.apps.local` A records, or `_backend._tcp.apps.local` SRV records).
//!
//! How a test tells who answered and how: the testkit's HTTP server answers
//! `peer=<ip:port>`, the client as it saw it. A connection carried by the tunnel reaches
//! the server from its own task's netns (the receiving agent connects from there), so the
//! server sees its *own* address; a connection that went straight from task `a` shows a's
//! address. So `peer` = b2's address means "through the tunnel, answered by b2", and `peer`
//! = a's address means "not meshed". The metrics of both agents say the same with labels.
//!
//! These tests need root, cgroup v2, iproute2, curl, dnsmasq and the agent binary
//! (`MESH_AGENT_BIN`, else target/debug/mesh-agent). Without them they fail, with the
//! reason; they never skip. Every negative check has a positive control in the same test.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use mesh_testbed::dns::{DnsZone, Dnsmasq, Srv};
use mesh_testbed::mesh::{MeshConfig, TrustDir, TwoNodes, role_arn, spiffe_id, wait_for};
use mesh_testbed::{
    Agent, Node, ServeMode, Server, Task, Testkit, Topology, netns, require_root, require_tools,
    run_with_timeout,
};

const SHORT: Duration = Duration::from_secs(10);
/// How long a metric may lag behind what it counts.
const METRIC_LAG: Duration = Duration::from_secs(5);
/// How long the agent may take to resolve the service for the first time after it started.
const FIRST_RESOLUTION: Duration = Duration::from_secs(10);
/// The TTL of the changing record sets (seconds).
const TTL: u32 = 2;
/// `[dns] min_refresh`.
const MIN_REFRESH: Duration = Duration::from_secs(1);
/// How long a changed record set may take to be followed: the TTL, `min_refresh`, and a
/// margin for the lookup and for applying the new set (≤ ~5 s).
const FOLLOW: Duration = Duration::from_secs(TTL as u64 + 1 + 2);
/// Ejection must beat any TTL: everything after an endpoint's death happens within this.
const EJECTION_WINDOW: Duration = Duration::from_secs(5);

const TCP_OPENED: &str = "istio_tcp_connections_opened_total";
const EJECTIONS: &str = "mesh_endpoint_ejections_total";
const DECISIONS: &str = "mesh_capture_decisions_total";
const UNKNOWN: &str = "unknown";

const SERVICE: &str = "backend";
const DOMAIN: &str = "apps.local";
const HOSTNAME: &str = "backend.apps.local";
const SRV_NAME: &str = "_backend._tcp.apps.local";
const PORT: u16 = 8080;

/// Two linked nodes: task `a` on node 1; tasks `b1`, `b2` (role `backend`) and `c` (no
/// agent knows it) on node 2; a trust directory.
struct DnsMesh {
    // Field order is drop order: nothing here outlives the topology.
    kit: Testkit,
    trust: TrustDir,
    a: Task,
    b1: Task,
    b2: Task,
    c: Task,
    n1: Node,
    n2: Node,
    topology: Topology,
}

/// How node 1's agent looks the service up.
#[derive(Clone, Copy, Debug)]
enum Lookup {
    /// `hostname = "backend.apps.local"`, `port = 8080`.
    Address,
    /// `srv = "_backend._tcp.apps.local"`.
    Srv,
}

impl DnsMesh {
    /// Where dnsmasq listens: node 1's bridge address, as a VPC resolver would be.
    fn resolver(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.n1.ip()), 53)
    }

    /// Node 1's agent config: task `a` (role `a`); the service `backend` from DNS (and
    /// nothing else about node 2); c's :8080 captured by `[capture]`, so it is carried as
    /// plain TCP (passthrough).
    fn node1(&self, lookup: Lookup, dns_timeout: &str) -> MeshConfig {
        let query = match lookup {
            Lookup::Address => format!("hostname = \"{HOSTNAME}\"\nport = {PORT}\n"),
            Lookup::Srv => format!("srv = \"{SRV_NAME}\"\n"),
        };
        MeshConfig::new(&self.trust)
            .task(&self.a, "a")
            .raw(&format!(
                "[capture]\ndestinations = [\"{}\"]\n",
                addr(self.c.ip(), PORT)
            ))
            .raw(&format!(
                "[dns]\nresolver = \"{}\"\nmin_refresh = \"{}s\"\nmax_refresh = \"300s\"\ntimeout = \"{dns_timeout}\"\n",
                self.resolver(),
                MIN_REFRESH.as_secs()
            ))
            .raw(&format!(
                "[[services]]\nname = \"{SERVICE}\"\n{query}role_arn = \"{}\"\n",
                role_arn(SERVICE)
            ))
    }

    /// Node 2's agent config: tasks b1 and b2 (role `backend`), endpoint `a` (role `a`).
    fn node2(&self) -> MeshConfig {
        MeshConfig::new(&self.trust)
            .task(&self.b1, SERVICE)
            .task(&self.b2, SERVICE)
            .endpoint(&self.a, "a")
    }

    /// An HTTP server on `task`'s address.
    fn serve(&self, task: &Task, port: u16) -> Result<Server> {
        self.kit.serve(task, addr(task.ip(), port), ServeMode::Http)
    }

    /// `backend.apps.local` A records for `tasks`, TTL `ttl`.
    fn a_zone(&self, ttl: u32, tasks: &[&Task]) -> DnsZone {
        tasks.iter().fold(
            DnsZone::new().ttl(ttl).local_domain(DOMAIN),
            |zone, task| zone.host(HOSTNAME, IpAddr::V4(task.ip())),
        )
    }

    /// `_backend._tcp.apps.local` SRV records, one per task (target `<id>.apps.local`, port
    /// 8080), with the targets' A records.
    fn srv_zone(&self, ttl: u32, tasks: &[&Task]) -> DnsZone {
        tasks.iter().fold(
            DnsZone::new().ttl(ttl).local_domain(DOMAIN),
            |zone, task| {
                let target = format!("{}.{DOMAIN}", task.id());
                zone.host(&target, IpAddr::V4(task.ip()))
                    .srv(Srv::new(SRV_NAME, &target, PORT))
            },
        )
    }

    /// Node 1's source-side series of a meshed connection from a to the service.
    fn meshed_source(&self) -> Labels {
        Labels::hop(
            "source",
            ("a", &spiffe_id("a")),
            (SERVICE, &spiffe_id(SERVICE)),
            "mutual_tls",
        )
    }

    /// Node 2's destination-side series of a meshed connection from a to task `workload`.
    fn meshed_destination(&self, workload: &str) -> Labels {
        Labels::hop(
            "destination",
            ("a", &spiffe_id("a")),
            (workload, &spiffe_id(SERVICE)),
            "mutual_tls",
        )
    }

    /// Node 1's source-side series of a plain-TCP (passthrough) connection from a.
    fn plain_source(&self) -> Labels {
        Labels::hop("source", ("a", &spiffe_id("a")), (UNKNOWN, UNKNOWN), "none")
    }
}

/// Every label of an Istio TCP metric sample, so a lookup matches exactly one series.
struct Labels(Vec<(&'static str, String)>);

impl Labels {
    fn hop(
        reporter: &str,
        source: (&str, &str),
        destination: (&str, &str),
        security_policy: &str,
    ) -> Self {
        Self(vec![
            ("reporter", reporter.to_string()),
            ("source_workload", source.0.to_string()),
            ("source_principal", source.1.to_string()),
            ("destination_workload", destination.0.to_string()),
            ("destination_principal", destination.1.to_string()),
            ("connection_security_policy", security_policy.to_string()),
        ])
    }

    fn get(&self) -> Vec<(&str, &str)> {
        self.0.iter().map(|(k, v)| (*k, v.as_str())).collect()
    }
}

/// Runs `body` on a fresh two-node mesh. An error fails the test by panicking while the
/// topology still exists, so the teardown prints the agents' logs and keeps them on disk.
fn with_dns_mesh(body: impl FnOnce(&DnsMesh) -> Result<()>) {
    let m = dns_mesh().unwrap_or_else(|e| panic!("test prerequisites: {e:#}"));
    println!("topology {}", m.topology.dir().display());
    let started = Instant::now();
    if let Err(e) = body(&m) {
        panic!("{e:?}");
    }
    println!("test body took {:?}", started.elapsed());
}

fn dns_mesh() -> Result<DnsMesh> {
    require_root()?;
    require_tools(&["ip", "curl"])?;
    let kit = Testkit::new(env!("CARGO_BIN_EXE_mesh-testkit"))?;
    let TwoNodes {
        topology,
        n1,
        n2,
        trust,
    } = TwoNodes::new()?;
    let a = n1.add_task("a")?;
    let b1 = n2.add_task("b1")?;
    let b2 = n2.add_task("b2")?;
    let c = n2.add_task("c")?;
    Ok(DnsMesh {
        kit,
        trust,
        a,
        b1,
        b2,
        c,
        n1,
        n2,
        topology,
    })
}

fn addr(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

/// `curl http://TARGET/` inside `task` (so the agent may capture it); fails unless it
/// succeeds. Returns the client address the server saw (`peer=` in its answer).
fn request(task: &Task, target: SocketAddr) -> Result<SocketAddr> {
    let mut command = task.command("curl")?;
    command
        .args(["-sS", "--max-time", "5"])
        .arg(format!("http://{target}/"));
    let started = Instant::now();
    let out = run_with_timeout(&mut command, SHORT)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "curl http://{target}/ in task {} failed after {:?} ({}): stdout {:?}, stderr {:?}",
        task.id(),
        started.elapsed(),
        out.status,
        stdout.trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let peer = stdout
        .lines()
        .find_map(|l| l.strip_prefix("peer="))
        .with_context(|| format!("no peer= line in the answer from {target}: {stdout:?}"))?;
    peer.trim()
        .parse()
        .with_context(|| format!("peer {peer:?} from {target}"))
}

/// What a server's `peer` says about the path: through the tunnel to the task whose
/// server saw its own address, or straight from the client task.
fn describe(m: &DnsMesh, peer: SocketAddr) -> String {
    let known = [&m.a, &m.b1, &m.b2, &m.c];
    match known.iter().find(|t| IpAddr::V4(t.ip()) == peer.ip()) {
        Some(t) if t.id() == "a" => format!("direct from a (peer {peer})"),
        Some(t) => format!("tunnel, answered by {} (peer {peer})", t.id()),
        None => format!("unexpected peer {peer}"),
    }
}

/// A request from a to `target` answered through the tunnel by `by`'s server.
fn expect_tunnel(m: &DnsMesh, target: SocketAddr, by: &Task) -> Result<()> {
    let peer = request(&m.a, target)?;
    ensure!(
        peer.ip() == IpAddr::V4(by.ip()),
        "a -> {target}: expected the tunnel to {} ({}), got {}",
        by.id(),
        by.ip(),
        describe(m, peer)
    );
    Ok(())
}

/// A request from a to `target` that went straight there, not meshed.
fn expect_direct(m: &DnsMesh, target: SocketAddr) -> Result<()> {
    let peer = request(&m.a, target)?;
    ensure!(
        peer.ip() == IpAddr::V4(m.a.ip()),
        "a -> {target}: expected a direct (unmeshed) connection, got {}",
        describe(m, peer)
    );
    Ok(())
}

/// Requests from a to `target` every 100 ms until one is answered with `peer_ip` (the
/// tunnel to that task, or a's own address: direct); returns how long that took.
fn until_peer(
    m: &DnsMesh,
    target: SocketAddr,
    peer_ip: Ipv4Addr,
    what: &str,
    timeout: Duration,
) -> Result<Duration> {
    let started = Instant::now();
    wait_for(what, timeout, || {
        let peer = request(&m.a, target)?;
        Ok(if peer.ip() == IpAddr::V4(peer_ip) {
            Ok(())
        } else {
            Err(format!("a -> {target}: {}", describe(m, peer)))
        })
    })?;
    Ok(started.elapsed())
}

/// Waits until node 1's agent has logged the service's endpoints as exactly `want` (the
/// DNS answer reached the agent), and returns how long that took.
fn wait_endpoints(agent: &Agent, want: &[SocketAddr], timeout: Duration) -> Result<Duration> {
    let started = Instant::now();
    let mut want: Vec<String> = want.iter().map(SocketAddr::to_string).collect();
    want.sort();
    wait_for("the agent logs the service's endpoints", timeout, || {
        let log = agent.log();
        let last = log
            .lines()
            .rfind(|l| l.contains("service endpoints changed") && l.contains(SERVICE))
            .map(str::to_string);
        let Some(line) = last else {
            return Ok(Err("no \"service endpoints changed\" line yet".into()));
        };
        let listed = line
            .split_once("endpoints=[")
            .and_then(|(_, rest)| rest.split_once(']'))
            .map(|(list, _)| list)
            .with_context(|| format!("no endpoints=[...] in {line:?}"))?;
        let mut got: Vec<String> = listed
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        got.sort();
        Ok(if got == want {
            Ok(())
        } else {
            Err(format!("last logged endpoints {got:?}, want {want:?}"))
        })
    })?;
    Ok(started.elapsed())
}

/// The value of `name{labels}` on `agent` once it equals `want` (metrics lag a little).
fn expect_metric(agent: &Agent, name: &str, labels: &Labels, want: f64) -> Result<()> {
    agent
        .wait_metric(name, &labels.get(), METRIC_LAG, |v| v == want)
        .map(drop)
        .with_context(|| format!("{} on {}: expected {want}", name, agent.node().name()))
}

fn not_meshed(agent: &Agent) -> Result<f64> {
    agent.metric(DECISIONS, &[("decision", "bypass_not_meshed")])
}

fn ejections(agent: &Agent) -> Result<f64> {
    agent.metric(EJECTIONS, &[("destination_workload", SERVICE)])
}

/// Checks of tests 1 and 2 once node 1's agent knows b1 and b2 from DNS: a request to each
/// endpoint goes through the tunnel and is answered by that endpoint, both agents report
/// it as mutual TLS with the service's identity; control: c (captured, not in DNS) is
/// carried as plain TCP.
fn check_both_meshed_and_c_plain(m: &DnsMesh, agent1: &Agent, agent2: &Agent) -> Result<()> {
    let source = m.meshed_source();
    let plain = m.plain_source();
    for task in [&m.b1, &m.b2] {
        let destination = m.meshed_destination(task.id());
        let src_before = agent1.metric(TCP_OPENED, &source.get())?;
        let dst_before = agent2.metric(TCP_OPENED, &destination.get())?;
        let plain_before = agent1.metric(TCP_OPENED, &plain.get())?;
        expect_tunnel(m, addr(task.ip(), PORT), task)
            .with_context(|| format!("{}:{PORT} is in DNS", task.id()))?;
        expect_metric(agent1, TCP_OPENED, &source, src_before + 1.0)?;
        expect_metric(agent2, TCP_OPENED, &destination, dst_before + 1.0)?;
        ensure!(
            agent1.metric(TCP_OPENED, &plain.get())? == plain_before,
            "the meshed request to {} was also counted as plain TCP",
            task.id()
        );
    }

    // Control: c's :8080 is captured but in no service: plain TCP, straight to c.
    let src_before = agent1.metric(TCP_OPENED, &source.get())?;
    let plain_before = agent1.metric(TCP_OPENED, &plain.get())?;
    expect_direct(m, addr(m.c.ip(), PORT)).context("c is not in DNS")?;
    expect_metric(agent1, TCP_OPENED, &plain, plain_before + 1.0)
        .context("c was captured by [capture] and must be reported as plain TCP")?;
    ensure!(
        agent1.metric(TCP_OPENED, &source.get())? == src_before,
        "the request to c was counted as a meshed connection to {SERVICE}"
    );
    Ok(())
}

/// 1. A records: `backend.apps.local` -> b1, b2 (TTL 2). Requests from a to b1:8080 and to
///    b2:8080 go through the tunnel to that endpoint, reported as mutual TLS to
///    `backend` with its SPIFFE id by node 1 and as received by b1 / b2 by node 2; c's
///    :8080 (captured, not in DNS) is carried as plain TCP.
#[test]
fn a_records_mesh_every_address_with_the_port() {
    with_dns_mesh(|m| {
        let _servers = [
            m.serve(&m.b1, PORT)?,
            m.serve(&m.b2, PORT)?,
            m.serve(&m.c, PORT)?,
        ];
        let _dns = Dnsmasq::start(&m.n1, m.resolver(), m.a_zone(TTL, &[&m.b1, &m.b2]))?;
        let agent2 = Agent::start(&m.n2, &m.node2().render())?;
        let agent1 = Agent::start(&m.n1, &m.node1(Lookup::Address, "2s").render())?;
        let resolved = wait_endpoints(
            &agent1,
            &[addr(m.b1.ip(), PORT), addr(m.b2.ip(), PORT)],
            FIRST_RESOLUTION,
        )?;
        println!("first resolution logged {resolved:?} after the agent was ready");
        // The log line comes just before the set is applied: the first request may still
        // go direct, so wait for the tunnel once (counted exactly below anyway).
        until_peer(
            m,
            addr(m.b1.ip(), PORT),
            m.b1.ip(),
            "b1 meshed",
            Duration::from_secs(2),
        )?;
        check_both_meshed_and_c_plain(m, &agent1, &agent2)
    })
}

/// 2. SRV records: `_backend._tcp.apps.local` -> b1.apps.local:8080, b2.apps.local:8080
///    (with A records for the targets); the same checks as with A records. Control of the
///    port: b1 also serves :9090, which is in no SRV record: not meshed (not even
///    captured).
#[test]
fn srv_records_mesh_each_target_with_the_record_port() {
    with_dns_mesh(|m| {
        let _servers = [
            m.serve(&m.b1, PORT)?,
            m.serve(&m.b2, PORT)?,
            m.serve(&m.c, PORT)?,
            m.serve(&m.b1, 9090)?,
        ];
        let _dns = Dnsmasq::start(&m.n1, m.resolver(), m.srv_zone(TTL, &[&m.b1, &m.b2]))?;
        let agent2 = Agent::start(&m.n2, &m.node2().render())?;
        let agent1 = Agent::start(&m.n1, &m.node1(Lookup::Srv, "2s").render())?;
        let resolved = wait_endpoints(
            &agent1,
            &[addr(m.b1.ip(), PORT), addr(m.b2.ip(), PORT)],
            FIRST_RESOLUTION,
        )?;
        println!("first resolution logged {resolved:?} after the agent was ready");
        until_peer(
            m,
            addr(m.b1.ip(), PORT),
            m.b1.ip(),
            "b1 meshed",
            Duration::from_secs(2),
        )?;
        check_both_meshed_and_c_plain(m, &agent1, &agent2)?;

        let bypass = not_meshed(&agent1)?;
        let source = m.meshed_source();
        let meshed = agent1.metric(TCP_OPENED, &source.get())?;
        expect_direct(m, addr(m.b1.ip(), 9090)).context("b1:9090 is in no SRV record")?;
        ensure!(
            not_meshed(&agent1)? == bypass + 1.0,
            "b1:9090 must be left alone by the kernel (bypass_not_meshed {bypass} -> {})",
            not_meshed(&agent1)?
        );
        ensure!(agent1.metric(TCP_OPENED, &source.get())? == meshed);
        Ok(())
    })
}

/// 3. The record set changes and the agent follows within the TTL: with only b1 in DNS,
///    b2:8080 is not meshed (not captured: `bypass_not_meshed`); once b2 is added, a
///    connection to it is carried by the tunnel within TTL + min_refresh + a margin;
///    once b1 is removed, b1:8080 is no longer meshed within the same bound, while b2
///    stays meshed.
#[test]
fn endpoint_set_follows_dns_changes_within_the_ttl() {
    with_dns_mesh(|m| {
        let _servers = [m.serve(&m.b1, PORT)?, m.serve(&m.b2, PORT)?];
        let (to_b1, to_b2) = (addr(m.b1.ip(), PORT), addr(m.b2.ip(), PORT));
        let mut dns = Dnsmasq::start(&m.n1, m.resolver(), m.a_zone(TTL, &[&m.b1]))?;
        let agent2 = Agent::start(&m.n2, &m.node2().render())?;
        let agent1 = Agent::start(&m.n1, &m.node1(Lookup::Address, "2s").render())?;
        wait_endpoints(&agent1, &[to_b1], FIRST_RESOLUTION)?;
        until_peer(m, to_b1, m.b1.ip(), "b1 meshed", Duration::from_secs(2))?;

        // Only b1 in DNS: b2 is not meshed, not even captured.
        let bypass = not_meshed(&agent1)?;
        let b2_received = m.meshed_destination("b2");
        expect_direct(m, to_b2).context("b2 is not in DNS yet")?;
        ensure!(
            not_meshed(&agent1)? == bypass + 1.0,
            "a -> b2 (not in DNS) must be bypassed by the kernel as not meshed"
        );
        ensure!(agent2.metric(TCP_OPENED, &b2_received.get())? == 0.0);

        // b2 joins: meshed within the TTL.
        dns.set_zone(m.a_zone(TTL, &[&m.b1, &m.b2]))?;
        let joined = until_peer(m, to_b2, m.b2.ip(), "b2 meshed after it joined DNS", FOLLOW)?;
        println!("b2 meshed {joined:?} after it joined DNS (TTL {TTL} s)");
        agent2.wait_metric(TCP_OPENED, &b2_received.get(), METRIC_LAG, |v| v >= 1.0)?;
        expect_tunnel(m, to_b1, &m.b1).context("b1 is still in DNS")?;

        // b1 leaves: no longer meshed within the TTL; b2 still is.
        dns.set_zone(m.a_zone(TTL, &[&m.b2]))?;
        let left = until_peer(m, to_b1, m.a.ip(), "b1 unmeshed after it left DNS", FOLLOW)?;
        println!("b1 no longer meshed {left:?} after it left DNS");
        let bypass = not_meshed(&agent1)?;
        expect_direct(m, to_b1).context("b1 left DNS")?;
        ensure!(
            not_meshed(&agent1)? == bypass + 1.0,
            "a -> b1 (gone from DNS) must be bypassed by the kernel as not meshed"
        );
        expect_tunnel(m, to_b2, &m.b2).context("b2 is still in DNS")?;
        wait_endpoints(&agent1, &[to_b2], Duration::from_secs(1))?;
        Ok(())
    })
}

/// 4. Outlier ejection is faster than the TTL: DNS lists b1 and b2 for 300 s. Control:
///    before, b1:8080 is answered by b1. Then b1's server dies (its agent still runs, so
///    the tunnel answers 503): a request to b1:8080 still succeeds, answered by b2; b1 is
///    ejected once (`mesh_endpoint_ejections_total{destination_workload="backend"}` = 1);
///    further requests to b1:8080 are carried to b2 without new ejections; all within 5 s
///    of the death, although DNS still lists b1.
#[test]
fn dead_endpoint_is_ejected_and_its_connections_carried_to_another() {
    with_dns_mesh(|m| {
        let server_b1 = m.serve(&m.b1, PORT)?;
        let _server_b2 = m.serve(&m.b2, PORT)?;
        let (to_b1, to_b2) = (addr(m.b1.ip(), PORT), addr(m.b2.ip(), PORT));
        let _dns = Dnsmasq::start(&m.n1, m.resolver(), m.a_zone(300, &[&m.b1, &m.b2]))?;
        let agent2 = Agent::start(&m.n2, &m.node2().render())?;
        let agent1 = Agent::start(&m.n1, &m.node1(Lookup::Address, "2s").render())?;
        wait_endpoints(&agent1, &[to_b1, to_b2], FIRST_RESOLUTION)?;
        until_peer(m, to_b1, m.b1.ip(), "b1 meshed", Duration::from_secs(2))?;

        // Control: each endpoint answers for itself, nothing is ejected.
        expect_tunnel(m, to_b1, &m.b1).context("before b1's server died")?;
        expect_tunnel(m, to_b2, &m.b2).context("before b1's server died")?;
        ensure!(
            ejections(&agent1)? == 0.0,
            "an endpoint was ejected while all were healthy"
        );
        let b2_received = m.meshed_destination("b2");
        let b2_before = agent2.metric(TCP_OPENED, &b2_received.get())?;

        drop(server_b1);
        let death = Instant::now();
        // The endpoint really is down: nothing accepts on b1:8080 any more.
        let accepts = netns::run_in(&m.n2.netns_path(), || {
            std::net::TcpStream::connect_timeout(&to_b1, Duration::from_secs(1)).is_ok()
        })?;
        ensure!(
            !accepts,
            "b1:8080 still accepts connections after its server was killed"
        );

        let peer = request(&m.a, to_b1).context("the first request to b1 after its death")?;
        println!("first request to b1 after its death: {}", describe(m, peer));
        ensure!(
            peer.ip() == IpAddr::V4(m.b2.ip()),
            "the first request to b1 after its death must be retried on b2: {}",
            describe(m, peer)
        );
        agent1
            .wait_metric(
                EJECTIONS,
                &[("destination_workload", SERVICE)],
                METRIC_LAG,
                |v| v >= 1.0,
            )
            .context("b1 must be ejected")?;
        for i in 0..5 {
            let peer = request(&m.a, to_b1)?;
            ensure!(
                peer.ip() == IpAddr::V4(m.b2.ip()),
                "request {} to b1 while it is ejected: {}",
                i + 2,
                describe(m, peer)
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        // b2's own clients are unaffected.
        expect_tunnel(m, to_b2, &m.b2)?;
        let elapsed = death.elapsed();
        println!("six requests to the dead b1 carried to b2 within {elapsed:?} of its death");
        ensure!(
            elapsed < EJECTION_WINDOW,
            "the requests after b1's death took {elapsed:?}, more than {EJECTION_WINDOW:?}"
        );
        ensure!(
            ejections(&agent1)? == 1.0,
            "b1 must be ejected exactly once, got {} ejections",
            ejections(&agent1)?
        );
        expect_metric(&agent2, TCP_OPENED, &b2_received, b2_before + 7.0)
            .context("b2 received the six requests for b1 and its own")?;
        let log = agent1.log();
        ensure!(
            log.lines()
                .any(|l| l.contains("endpoint ejected") && l.contains(&to_b1.to_string())),
            "node 1's log does not name b1 as ejected"
        );
        Ok(())
    })
}

/// 5. A failing resolver keeps the last known good set: with TTL 1 s, dnsmasq frozen
///    (queries time out) for 5 s, lookups fail (the agent says so) but b1 and b2 stay
///    meshed; after the thaw the agent follows DNS again (b2 removed: no longer meshed).
///    Then dnsmasq is killed outright: still meshed; a new dnsmasq with b2 back is
///    followed again.
#[test]
fn resolver_failure_keeps_the_last_known_endpoints() {
    with_dns_mesh(|m| {
        let _servers = [m.serve(&m.b1, PORT)?, m.serve(&m.b2, PORT)?];
        let (to_b1, to_b2) = (addr(m.b1.ip(), PORT), addr(m.b2.ip(), PORT));
        let ttl = 1;
        let mut dns = Dnsmasq::start(&m.n1, m.resolver(), m.a_zone(ttl, &[&m.b1, &m.b2]))?;
        let _agent2 = Agent::start(&m.n2, &m.node2().render())?;
        let agent1 = Agent::start(&m.n1, &m.node1(Lookup::Address, "1s").render())?;
        wait_endpoints(&agent1, &[to_b1, to_b2], FIRST_RESOLUTION)?;
        until_peer(m, to_b1, m.b1.ip(), "b1 meshed", Duration::from_secs(2))?;
        expect_tunnel(m, to_b2, &m.b2)?;
        const KEEPING: &str = "keeping the last known endpoints";
        ensure!(
            !agent1.log().contains(KEEPING),
            "a lookup failed while dnsmasq was answering"
        );

        // Frozen: queries are received, never answered.
        dns.freeze()?;
        let frozen = Instant::now();
        wait_for(
            "the agent reports failed lookups",
            Duration::from_secs(6),
            || {
                Ok(if agent1.log().contains(KEEPING) {
                    Ok(())
                } else {
                    Err("no failed lookup logged yet".into())
                })
            },
        )?;
        println!(
            "failed lookup logged {:?} after the freeze",
            frozen.elapsed()
        );
        let mut rounds = 0;
        while frozen.elapsed() < Duration::from_secs(5) || rounds < 2 {
            expect_tunnel(m, to_b1, &m.b1).context("resolver frozen")?;
            expect_tunnel(m, to_b2, &m.b2).context("resolver frozen")?;
            rounds += 1;
            std::thread::sleep(Duration::from_millis(300));
        }
        dns.thaw()?;
        println!(
            "{rounds} rounds meshed during {:?} of frozen resolver",
            frozen.elapsed()
        );

        // Thawed: the agent follows DNS again.
        dns.set_zone(m.a_zone(ttl, &[&m.b1]))?;
        let thawed = Instant::now();
        let followed = until_peer(
            m,
            to_b2,
            m.a.ip(),
            "b2 unmeshed after the thaw and its removal",
            Duration::from_secs(12),
        )?;
        println!("after the thaw, b2's removal followed within {followed:?}");
        expect_tunnel(m, to_b1, &m.b1).context("after the thaw")?;

        // Killed: nothing listens on the resolver's port at all.
        // (Dropping it stops the process and waits for it: its sockets are closed.)
        drop(dns);
        let killed = Instant::now();
        let failures = |agent: &Agent| agent.log().matches(KEEPING).count();
        let failures_before = failures(&agent1);
        while killed.elapsed() < Duration::from_secs(3) || failures(&agent1) == failures_before {
            ensure!(
                killed.elapsed() < Duration::from_secs(8),
                "no failed lookup logged within 8 s of killing dnsmasq"
            );
            expect_tunnel(m, to_b1, &m.b1).context("resolver killed")?;
            std::thread::sleep(Duration::from_millis(300));
        }
        let _dns = Dnsmasq::start(&m.n1, m.resolver(), m.a_zone(ttl, &[&m.b1, &m.b2]))?;
        let back = until_peer(
            m,
            to_b2,
            m.b2.ip(),
            "b2 meshed again from the restarted resolver",
            Duration::from_secs(12),
        )?;
        println!(
            "restarted resolver followed {back:?} after it started ({:?} after the kill, {:?} after the thaw)",
            killed.elapsed(),
            thawed.elapsed()
        );
        expect_tunnel(m, to_b1, &m.b1).context("after the resolver came back")?;
        Ok(())
    })
}

/// 4b. An endpoint whose tunnel cannot be reached at all (no agent answers on its
///     :15008, as when its node's agent is gone) is ejected the same way: DNS lists b1 and
///     c, c has a server on :8080 but no agent; a request to c:8080 is carried to b1 and c
///     is ejected once; the next ones go to b1 directly. Control: c's server itself works
///     (a direct connection from node 2 is answered).
#[test]
fn endpoint_without_a_tunnel_is_ejected_and_its_connections_carried_to_another() {
    with_dns_mesh(|m| {
        let _servers = [m.serve(&m.b1, PORT)?, m.serve(&m.c, PORT)?];
        let (to_b1, to_c) = (addr(m.b1.ip(), PORT), addr(m.c.ip(), PORT));
        let _dns = Dnsmasq::start(&m.n1, m.resolver(), m.a_zone(300, &[&m.b1, &m.c]))?;
        let _agent2 = Agent::start(&m.n2, &m.node2().render())?;
        let agent1 = Agent::start(&m.n1, &m.node1(Lookup::Address, "2s").render())?;
        wait_endpoints(&agent1, &[to_b1, to_c], FIRST_RESOLUTION)?;
        until_peer(m, to_b1, m.b1.ip(), "b1 meshed", Duration::from_secs(2))?;

        // Control: c's server answers; only its tunnel port is closed.
        let (server_ok, tunnel_ok) = netns::run_in(&m.n2.netns_path(), || {
            let timeout = Duration::from_secs(1);
            (
                std::net::TcpStream::connect_timeout(&to_c, timeout).is_ok(),
                std::net::TcpStream::connect_timeout(&addr(m.c.ip(), 15008), timeout).is_ok(),
            )
        })?;
        ensure!(
            server_ok && !tunnel_ok,
            "c: server accepts {server_ok}, :15008 accepts {tunnel_ok}; want true, false"
        );
        ensure!(ejections(&agent1)? == 0.0);

        let started = Instant::now();
        for i in 0..4 {
            let peer = request(&m.a, to_c).with_context(|| format!("request {} to c", i + 1))?;
            ensure!(
                peer.ip() == IpAddr::V4(m.b1.ip()),
                "request {} to c (no tunnel) must be carried to b1: {}",
                i + 1,
                describe(m, peer)
            );
        }
        println!(
            "four requests to c carried to b1 in {:?}",
            started.elapsed()
        );
        agent1
            .wait_metric(
                EJECTIONS,
                &[("destination_workload", SERVICE)],
                METRIC_LAG,
                |v| v >= 1.0,
            )
            .context("c must be ejected")?;
        ensure!(
            ejections(&agent1)? == 1.0,
            "c must be ejected exactly once, got {}",
            ejections(&agent1)?
        );
        Ok(())
    })
}

/// 5b. The last known endpoints also survive a configuration reload while the resolver
///     is down: with dnsmasq frozen, node 1's config gains a second, unrelated service;
///     b1 and b2 must stay meshed (the reload must not throw away what DNS said about
///     `backend`). Control: before the freeze, the reload machinery works (a reload that
///     adds the service while dnsmasq answers keeps b1 meshed as well).
#[test]
fn reload_during_resolver_failure_keeps_the_last_known_endpoints() {
    with_dns_mesh(|m| {
        let _servers = [m.serve(&m.b1, PORT)?, m.serve(&m.b2, PORT)?];
        let (to_b1, to_b2) = (addr(m.b1.ip(), PORT), addr(m.b2.ip(), PORT));
        let zone = m
            .a_zone(1, &[&m.b1, &m.b2])
            .host("other.apps.local", IpAddr::V4(m.c.ip()));
        let mut dns = Dnsmasq::start(&m.n1, m.resolver(), zone)?;
        let _agent2 = Agent::start(&m.n2, &m.node2().render())?;
        let base = m.node1(Lookup::Address, "1s");
        let mut agent1 = Agent::start(&m.n1, &base.render())?;
        wait_endpoints(&agent1, &[to_b1, to_b2], FIRST_RESOLUTION)?;
        until_peer(m, to_b1, m.b1.ip(), "b1 meshed", Duration::from_secs(2))?;

        let other = |n: u32| {
            format!(
                "[[services]]\nname = \"other{n}\"\nhostname = \"other.apps.local\"\nport = 9{n:03}\nrole_arn = \"{}\"\n",
                role_arn("other")
            )
        };
        // Control: a reload adding a service while the resolver answers.
        agent1.reload(&base.clone().raw(&other(1)).render())?;
        until_peer(
            m,
            to_b1,
            m.b1.ip(),
            "b1 meshed after a reload",
            Duration::from_secs(3),
        )?;

        dns.freeze()?;
        wait_for(
            "the agent reports failed lookups",
            Duration::from_secs(6),
            || {
                Ok(
                    if agent1.log().contains("keeping the last known endpoints") {
                        Ok(())
                    } else {
                        Err("no failed lookup logged yet".into())
                    },
                )
            },
        )?;
        agent1.reload(&base.clone().raw(&other(1)).raw(&other(2)).render())?;
        let reloaded = Instant::now();
        while reloaded.elapsed() < Duration::from_secs(2) {
            expect_tunnel(m, to_b1, &m.b1).context("after a reload with the resolver frozen")?;
            expect_tunnel(m, to_b2, &m.b2).context("after a reload with the resolver frozen")?;
            std::thread::sleep(Duration::from_millis(200));
        }
        dns.thaw()?;
        Ok(())
    })
}
