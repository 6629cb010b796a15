//! The benchmark's testbed: two simulated nodes, four client/server task pairs, and what
//! carries each pair's traffic.
//!
//! ```text
//!  node1 (198.18.1.0/24)                         node2 (198.18.2.0/24)
//!  direct-client  ───────── plain TCP ─────────▶ direct-server  :8080 http :8081 sink :8082 echo
//!  mesh-client    ─▶ agent1 ══ mTLS HTTP/2 ══▶ agent2 ─▶ mesh-server (same servers)
//!  stunnel-client ─▶ stunnel (client mode, 127.0.0.1:1808x) ══ TLS 1.3 ══▶ stunnel (:908x) ─▶ stunnel-server
//!  relay-client   ─▶ relay (127.0.0.1:2808x) ─── plain TCP ───▶ relay (:1008x) ─▶ relay-server
//! ```
//! Only the mesh pair is listed in the agents' configuration, so only its connections are
//! captured; the other pairs share the same kernel, links and agents' presence, which is
//! what makes the setups comparable within one run.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use mesh_testbed::mesh::{MeshConfig, TrustDir, TrustInit, spiffe_id};
use mesh_testbed::pki::{TestCa, Validity};
use mesh_testbed::{Agent, Launch, Process, Task, Topology, netns, run_with_timeout};

use super::procs;

/// The RLIMIT_NOFILE (soft = hard) the agents and stunnel are started with, through
/// `prlimit`: xtask's own hard limit, the most a process without CAP_SYS_RESOURCE may
/// give. The agent does not raise its own soft limit (often 1,024), and 10,000 idle
/// connections need about 10,000 descriptors in each agent and 20,000 in a stunnel.
pub fn proxy_nofile() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 1024;
    }
    limit.rlim_max.min(1 << 20)
}

const HTTP_PORT: u16 = 8080;
const SINK_PORT: u16 = 8081;
const ECHO_PORT: u16 = 8082;
/// stunnel's TLS ports on the server task (one service per server port).
const STUNNEL_TLS_PORTS: [u16; 3] = [9080, 9081, 9082];
/// stunnel's plaintext ports on loopback in the client task.
const STUNNEL_LOCAL_PORTS: [u16; 3] = [18080, 18081, 18082];
/// The server-side relay's ports on the server task, and the client-side relay's on loopback
/// in the client task.
const RELAY_HOP_PORTS: [u16; 3] = [10080, 10081, 10082];
const RELAY_LOCAL_PORTS: [u16; 3] = [28080, 28081, 28082];
/// The cipher suite and key exchange rustls (ring provider) picks between two agents: its
/// first preference on both sides. stunnel is held to exactly these.
pub const TLS13_SUITE: &str = "TLS_AES_256_GCM_SHA384";
pub const TLS_GROUP: &str = "X25519";
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// The four ways a client reaches its server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Setup {
    /// No proxy: the baseline, and the limit of this machine.
    Direct,
    /// Two mesh agents, mutual TLS between them.
    Mesh,
    /// Two stunnel instances, mutual TLS between them.
    Stunnel,
    /// Two plain TCP relays (`mesh-bench relay`: no TLS, no framing, an event loop copying
    /// both ways): the floor of any pair of user-space proxies on this machine, the cost of
    /// handing every byte from process to process and nothing else.
    Relay,
}

impl Setup {
    pub const ALL: [Setup; 4] = [Setup::Direct, Setup::Mesh, Setup::Stunnel, Setup::Relay];

    pub fn name(self) -> &'static str {
        match self {
            Setup::Direct => "direct",
            Setup::Mesh => "mesh",
            Setup::Stunnel => "stunnel",
            Setup::Relay => "relay",
        }
    }
}

/// A client task and the addresses it dials for each server.
pub struct Pair {
    pub setup: Setup,
    pub client: Task,
    pub http: SocketAddr,
    pub sink: SocketAddr,
    pub echo: SocketAddr,
}

/// What the TLS probes saw (`openssl s_client -brief` against each TLS listener).
#[derive(Clone, Debug, Default)]
pub struct TlsSeen {
    pub mesh: String,
    pub stunnel: String,
}

/// Everything the benchmark runs on. Fields drop in order: processes first, the topology
/// (namespaces, cgroups, files; it also kills whatever is left in its cgroups) last.
pub struct Testbed {
    pub agents: Vec<Agent>,
    stunnels: Vec<Process>,
    stunnel_pids: Vec<u32>,
    relays: Vec<Process>,
    _servers: Vec<Process>,
    pub pairs: Vec<Pair>,
    pub tls: TlsSeen,
    pub bench_bin: PathBuf,
    topology: Topology,
}

impl Testbed {
    /// `loopback_redirect`: the agents' `capture.loopback_redirect`; `agent_wrapper`: a command
    /// the agents run under (a profiler), none for the benchmark itself.
    pub fn start(
        agent_bin: &Path,
        bench_bin: &Path,
        loopback_redirect: bool,
        agent_wrapper: &[OsString],
    ) -> Result<Testbed> {
        let topology = Topology::new().context("building the benchmark topology")?;
        let node1 = topology.add_node()?;
        let node2 = topology.add_node()?;
        topology.link_nodes(&node1, &node2)?;
        let mut tasks = Vec::new();
        for setup in Setup::ALL {
            let client = node1.add_task(&format!("{}-client", setup.name()))?;
            let server = node2.add_task(&format!("{}-server", setup.name()))?;
            tasks.push((setup, client, server));
        }
        for netns in [node1.netns_path(), node2.netns_path()].into_iter().chain(
            tasks
                .iter()
                .flat_map(|(_, c, s)| [c.netns_path(), s.netns_path()]),
        ) {
            tune_netns(&netns)?;
        }

        let mut servers = Vec::new();
        for (_, _, server) in &tasks {
            for (port, mode) in [
                (HTTP_PORT, "http"),
                (SINK_PORT, "sink"),
                (ECHO_PORT, "echo"),
            ] {
                let addr = SocketAddr::new(server.ip().into(), port);
                servers.push(spawn_server(&topology, server, bench_bin, addr, mode)?);
            }
        }

        let trust = TrustDir::init_with(&topology, &TrustInit::default(), agent_bin)?;
        let [
            (_, _, _),
            (_, mesh_client, mesh_server),
            (_, stunnel_client, stunnel_server),
            (_, relay_client, relay_server),
        ] = &tasks[..]
        else {
            unreachable!("four setups");
        };
        // The agent raises its own open-files soft limit to the hard one at start-up.
        let launch = Launch {
            bin: agent_bin.to_path_buf(),
            wrapper: agent_wrapper.to_vec(),
            env: Vec::new(),
        };
        let capture = format!("[capture]\nloopback_redirect = {loopback_redirect}\n");
        let node1_config = MeshConfig::new(&trust)
            .task(mesh_client, "bench-client")
            .endpoint(mesh_server, "bench-server")
            .raw(&capture)
            .render();
        let node2_config = MeshConfig::new(&trust)
            .task(mesh_server, "bench-server")
            .endpoint(mesh_client, "bench-client")
            .raw(&capture)
            .render();
        let agents = vec![
            Agent::start_with(&node1, &node1_config, &launch)?,
            Agent::start_with(&node2, &node2_config, &launch)?,
        ];
        for agent in &agents {
            // A redirect the kernel refused would make an A/B compare two runs without it.
            ensure!(
                !loopback_redirect || agent.log().contains("loopback redirect in place"),
                "--loopback-redirect: the agent did not put the redirect in place:\n{}",
                agent.log_tail(20)
            );
            let comm = procs::comm(agent.pid())?;
            ensure!(
                comm == "mesh-agent" || !agent_wrapper.is_empty(),
                "pid {} is {comm:?}, not the agent",
                agent.pid()
            );
        }

        let ca = trust.issuer_ca()?;
        let dir = topology.dir().join("stunnel");
        let stunnel_server_conf = write_stunnel_conf(
            &ca,
            &trust.bundle(),
            &dir,
            "server",
            &stunnel_services(false, stunnel_server.ip()),
        )?;
        let stunnel_client_conf = write_stunnel_conf(
            &ca,
            &trust.bundle(),
            &dir,
            "client",
            &stunnel_services(true, stunnel_server.ip()),
        )?;
        let server_stunnel = spawn_stunnel(
            stunnel_server,
            &stunnel_server_conf,
            SocketAddr::new(stunnel_server.ip().into(), STUNNEL_TLS_PORTS[0]),
        )?;
        let client_stunnel = spawn_stunnel(
            stunnel_client,
            &stunnel_client_conf,
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), STUNNEL_LOCAL_PORTS[0]),
        )?;
        let stunnel_pids = vec![client_stunnel.pid(), server_stunnel.pid()];
        for pid in &stunnel_pids {
            let comm = procs::comm(*pid)?;
            ensure!(
                comm.starts_with("stunnel"),
                "pid {pid} is {comm:?}, not stunnel"
            );
        }

        let relays = vec![
            spawn_relay(&topology, relay_client, bench_bin, true, relay_server.ip())?,
            spawn_relay(&topology, relay_server, bench_bin, false, relay_server.ip())?,
        ];

        let probe_files = ca.mint(&spiffe_id("bench-probe"), Validity::Current, &dir, "probe")?;
        let probe = |ip: Ipv4Addr, port: u16| -> String {
            tls_probe(
                &node1,
                &trust,
                &probe_files,
                SocketAddr::new(ip.into(), port),
            )
            .unwrap_or_else(|e| format!("probe failed: {e:#}"))
        };
        let tls = TlsSeen {
            mesh: probe(mesh_server.ip(), mesh_testbed::mesh::TUNNEL_PORT),
            stunnel: probe(stunnel_server.ip(), STUNNEL_TLS_PORTS[0]),
        };

        let pairs = tasks
            .into_iter()
            .map(|(setup, client, server)| {
                let at = |port: u16| SocketAddr::new(server.ip().into(), port);
                let local = |ports: [u16; 3]| {
                    let at = |i: usize| SocketAddr::new(Ipv4Addr::LOCALHOST.into(), ports[i]);
                    (at(0), at(1), at(2))
                };
                let (http, sink, echo) = match setup {
                    Setup::Stunnel => local(STUNNEL_LOCAL_PORTS),
                    Setup::Relay => local(RELAY_LOCAL_PORTS),
                    Setup::Direct | Setup::Mesh => (at(HTTP_PORT), at(SINK_PORT), at(ECHO_PORT)),
                };
                Pair {
                    setup,
                    client,
                    http,
                    sink,
                    echo,
                }
            })
            .collect();
        Ok(Testbed {
            agents,
            stunnels: vec![client_stunnel, server_stunnel],
            stunnel_pids,
            relays,
            _servers: servers,
            pairs,
            tls,
            bench_bin: bench_bin.to_path_buf(),
            topology,
        })
    }

    pub fn id(&self) -> &str {
        self.topology.id()
    }

    pub fn dir(&self) -> &Path {
        self.topology.dir()
    }

    /// Copies the agents', stunnels' and relays' logs to `dir` (replacing earlier ones), so they
    /// outlive the testbed's directory.
    pub fn save_logs(&self, dir: &Path) -> Result<()> {
        if dir.exists() {
            fs::remove_dir_all(dir).with_context(|| format!("remove {}", dir.display()))?;
        }
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let stunnel = self.topology.dir().join("stunnel");
        let logs = self
            .agents
            .iter()
            .zip(["agent-node1.log", "agent-node2.log"])
            .map(|(a, name)| (a.log_path().to_path_buf(), name.to_string()))
            .chain(["client", "server"].map(|side| {
                (
                    stunnel.join(format!("{side}.log")),
                    format!("stunnel-{side}.log"),
                )
            }))
            .chain(
                ["client", "server"]
                    .map(|side| (relay_log(&self.topology, side), format!("relay-{side}.log"))),
            );
        for (from, name) in logs {
            if from.is_file() {
                fs::copy(&from, dir.join(&name))
                    .with_context(|| format!("copy {}", from.display()))?;
            }
        }
        Ok(())
    }

    /// The topology's cgroup: every process of the testbed runs below it.
    pub fn cgroup(&self) -> Result<PathBuf> {
        Ok(mesh_testbed::cgroup::mount()?.join(self.topology.id()))
    }

    pub fn pair(&self, setup: Setup) -> &Pair {
        self.pairs
            .iter()
            .find(|p| p.setup == setup)
            .expect("a pair per setup")
    }

    /// The processes that carry a setup's traffic: both agents, both stunnels, both relays,
    /// or none.
    pub fn proxy_pids(&self, setup: Setup) -> Vec<u32> {
        match setup {
            Setup::Direct => Vec::new(),
            Setup::Mesh => self.agents.iter().map(Agent::pid).collect(),
            Setup::Stunnel => self.stunnel_pids.clone(),
            Setup::Relay => self.relays.iter().map(Process::pid).collect(),
        }
    }

    /// Fails, with the process's log, if an agent, stunnel or relay has exited: every figure
    /// after that would be meaningless.
    pub fn check_alive(&mut self) -> Result<()> {
        for agent in &mut self.agents {
            if let Some(status) = agent.exit_status()? {
                bail!("an agent exited ({status})\n{}", agent.log_tail(40));
            }
        }
        for (stunnel, side) in self.stunnels.iter_mut().zip(["client", "server"]) {
            if let Some(status) = stunnel.try_wait()? {
                let log = self
                    .topology
                    .dir()
                    .join("stunnel")
                    .join(format!("{side}.log"));
                let text = fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(20).collect();
                bail!(
                    "the {side}-side stunnel exited ({status}); its log ends:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
        for (relay, side) in self.relays.iter_mut().zip(["client", "server"]) {
            if let Some(status) = relay.try_wait()? {
                let text = fs::read_to_string(relay_log(&self.topology, side)).unwrap_or_default();
                bail!("the {side}-side relay exited ({status}): {}", text.trim());
            }
        }
        Ok(())
    }
}

/// Per-namespace settings for connection-rate runs, in namespaces this run made: clients
/// close first, so their ports sit in TIME_WAIT for 60 s; `tcp_tw_reuse` lets a new
/// outgoing connection take such a port after a second, and a wider ephemeral range makes
/// room (ports bound by listeners are never picked).
fn tune_netns(netns: &Path) -> Result<()> {
    netns::sysctl(netns, "net/ipv4/tcp_tw_reuse", "1")?;
    netns::sysctl(netns, "net/ipv4/ip_local_port_range", "10240 65535")?;
    netns::sysctl(netns, "net/core/somaxconn", "4096")?;
    Ok(())
}

/// `mesh-bench serve` in `task`, once it prints its `listening` line.
fn spawn_server(
    topology: &Topology,
    task: &Task,
    bench_bin: &Path,
    addr: SocketAddr,
    mode: &str,
) -> Result<Process> {
    let log = topology
        .dir()
        .join(format!("serve-{}-{}.log", task.id(), addr.port()));
    let addr = addr.to_string();
    let args = ["serve", "--listen", &addr, "--mode", mode];
    spawn_listening(task, bench_bin, &args, &log)
        .with_context(|| format!("mesh-bench serve {mode} on {addr}"))
}

/// `mesh-bench ARGS` in `task`, its stderr to `log`, once it prints its `listening` line.
fn spawn_listening(task: &Task, bench_bin: &Path, args: &[&str], log: &Path) -> Result<Process> {
    let mut command = task.command(bench_bin)?;
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(File::create(log)?);
    let mut process = Process::spawn(&mut command)?;
    match process.first_stdout_line(READY_TIMEOUT) {
        Ok(Some(line)) if line.contains("\"listening\"") => Ok(process),
        other => bail!(
            "did not start in task {} ({other:?}): {}",
            task.id(),
            fs::read_to_string(log).unwrap_or_default().trim()
        ),
    }
}

/// The relays' `LISTEN=TO` routes, chained like stunnel's services: the client side accepts
/// on loopback and dials the server side's ports, which dial the servers.
fn relay_routes(client: bool, server_ip: Ipv4Addr) -> Vec<String> {
    let server = |port| SocketAddr::new(IpAddr::V4(server_ip), port);
    let local = |port| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
    RELAY_LOCAL_PORTS
        .into_iter()
        .zip(RELAY_HOP_PORTS)
        .zip([HTTP_PORT, SINK_PORT, ECHO_PORT])
        .map(|((local_port, hop_port), app_port)| {
            if client {
                format!("{}={}", local(local_port), server(hop_port))
            } else {
                format!("{}={}", server(hop_port), server(app_port))
            }
        })
        .collect()
}

fn relay_log(topology: &Topology, side: &str) -> PathBuf {
    topology.dir().join(format!("relay-{side}.log"))
}

/// The client- or server-side `mesh-bench relay` in `task`, once it listens on every route.
fn spawn_relay(
    topology: &Topology,
    task: &Task,
    bench_bin: &Path,
    client: bool,
    server_ip: Ipv4Addr,
) -> Result<Process> {
    let log = relay_log(topology, if client { "client" } else { "server" });
    let routes = relay_routes(client, server_ip);
    let mut args = vec!["relay"];
    for route in &routes {
        args.extend(["--route", route]);
    }
    spawn_listening(task, bench_bin, &args, &log).context("mesh-bench relay")
}

/// One stunnel service: `(name, accept, connect)`.
type Service = (&'static str, SocketAddr, SocketAddr);

/// The client side accepts plaintext on loopback and dials the server side's TLS ports;
/// the server side accepts TLS and dials the servers on the task's address.
fn stunnel_services(client: bool, server_ip: Ipv4Addr) -> Vec<Service> {
    let server = |port| SocketAddr::new(IpAddr::V4(server_ip), port);
    let local = |port| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
    ["http", "sink", "echo"]
        .into_iter()
        .zip(STUNNEL_LOCAL_PORTS.into_iter().zip(STUNNEL_TLS_PORTS))
        .zip([HTTP_PORT, SINK_PORT, ECHO_PORT])
        .map(|((name, (local_port, tls_port)), app_port)| {
            if client {
                (name, local(local_port), server(tls_port))
            } else {
                (name, server(tls_port), server(app_port))
            }
        })
        .collect()
}

/// Mints the side's certificate from the mesh's own issuer (same chain depth, key type and
/// trust bundle as the agents' workload certificates) and writes its stunnel.conf.
fn write_stunnel_conf(
    ca: &TestCa,
    bundle: &Path,
    dir: &Path,
    side: &str,
    services: &[Service],
) -> Result<PathBuf> {
    let files = ca.mint(
        &spiffe_id(&format!("bench-stunnel-{side}")),
        Validity::Current,
        dir,
        side,
    )?;
    // stunnel sends the chain from its `cert` file: the leaf, then the issuer.
    let chain = dir.join(format!("{side}-fullchain.pem"));
    let leaf = fs::read_to_string(&files.cert)?;
    let issuer = fs::read_to_string(&files.chain)?;
    fs::write(&chain, format!("{leaf}{issuer}"))?;
    let conf = stunnel_conf(side == "client", &chain, &files.key, bundle, services);
    let path = dir.join(format!("{side}.conf"));
    fs::write(&path, conf).with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

/// stunnel.conf: TLS 1.3 only, the agents' cipher suite and group, a client certificate
/// required and verified against the mesh's trust bundle on both sides, Nagle off, and
/// warnings only in the log (notices would log every connection; the agent does not).
fn stunnel_conf(
    client: bool,
    cert: &Path,
    key: &Path,
    bundle: &Path,
    services: &[Service],
) -> String {
    let mut conf = String::new();
    let _ = writeln!(conf, "foreground = yes\npid =\nsyslog = no\ndebug = 4\n");
    for (name, accept, connect) in services {
        let _ = writeln!(conf, "[{name}]");
        let _ = writeln!(conf, "client = {}", if client { "yes" } else { "no" });
        let _ = writeln!(conf, "accept = {accept}\nconnect = {connect}");
        let _ = writeln!(conf, "cert = {}\nkey = {}", cert.display(), key.display());
        let _ = writeln!(conf, "CAfile = {}", bundle.display());
        let _ = writeln!(conf, "verifyChain = yes\nrequireCert = yes");
        let _ = writeln!(conf, "sslVersionMin = TLSv1.3\nsslVersionMax = TLSv1.3");
        let _ = writeln!(conf, "ciphersuites = {TLS13_SUITE}\ncurves = {TLS_GROUP}");
        let _ = writeln!(conf, "socket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n");
    }
    conf
}

/// stunnel in `task`, with the proxies' descriptor limit, once `probe` accepts connections.
fn spawn_stunnel(task: &Task, conf: &Path, probe: SocketAddr) -> Result<Process> {
    let log = conf.with_extension("log");
    let out = File::create(&log)?;
    let nofile = proxy_nofile();
    let mut command = task.command("prlimit")?;
    command
        .arg(format!("--nofile={nofile}:{nofile}"))
        .args(["--", "stunnel4"])
        .arg(conf)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    let mut process = Process::spawn(&mut command)?;
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = process.try_wait()? {
            bail!(
                "stunnel ({}) exited ({status}): {}",
                conf.display(),
                fs::read_to_string(&log).unwrap_or_default().trim()
            );
        }
        let listening = netns::run_in(&task.netns_path(), || {
            TcpStream::connect_timeout(&probe, Duration::from_millis(200)).is_ok()
        })?;
        if listening {
            return Ok(process);
        }
        ensure!(
            Instant::now() < deadline,
            "stunnel ({}) not listening on {probe} after {READY_TIMEOUT:?}",
            conf.display()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// `openssl s_client -brief` from node1's namespace with a certificate of the trust domain:
/// the protocol, cipher suite and key exchange the listener at `addr` agrees to.
fn tls_probe(
    node: &mesh_testbed::Node,
    trust: &TrustDir,
    files: &mesh_testbed::pki::CertFiles,
    addr: SocketAddr,
) -> Result<String> {
    let mut command = node.command("openssl")?;
    command
        .args(["s_client", "-brief", "-tls1_3", "-alpn", "h2", "-connect"])
        .arg(addr.to_string())
        .arg("-cert")
        .arg(&files.cert)
        .arg("-cert_chain")
        .arg(&files.chain)
        .arg("-key")
        .arg(&files.key)
        .arg("-CAfile")
        .arg(trust.bundle());
    let out = run_with_timeout(&mut command, Duration::from_secs(10))?;
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .map(|v| v.trim().to_string())
    };
    match (field("Protocol version:"), field("Ciphersuite:")) {
        (Some(version), Some(suite)) => {
            let group = field("Negotiated TLS1.3 group:")
                .or_else(|| field("Server Temp Key:"))
                .unwrap_or_else(|| "group not shown".into());
            Ok(format!("{version} {suite} {group}"))
        }
        _ => bail!("no handshake: {}", text.trim()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stunnel_sides_chain_up() {
        let ip = Ipv4Addr::new(198, 18, 2, 4);
        let client = stunnel_services(true, ip);
        let server = stunnel_services(false, ip);
        assert_eq!(client.len(), 3);
        for ((name, accept, connect), (sname, saccept, sconnect)) in client.iter().zip(&server) {
            assert_eq!(name, sname);
            assert!(accept.ip().is_loopback());
            assert_eq!(
                connect, saccept,
                "the client dials the server side's TLS port"
            );
            assert_eq!(sconnect.ip(), IpAddr::V4(ip));
        }
        let conf = stunnel_conf(
            true,
            Path::new("/c.pem"),
            Path::new("/c.key"),
            Path::new("/b.pem"),
            &client,
        );
        assert!(conf.contains(
            "[echo]\nclient = yes\naccept = 127.0.0.1:18082\nconnect = 198.18.2.4:9082\n"
        ));
        assert!(conf.contains("ciphersuites = TLS_AES_256_GCM_SHA384"));
        assert!(conf.contains("requireCert = yes"));
    }
}
