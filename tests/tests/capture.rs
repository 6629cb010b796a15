//! Capture acceptance: the real agent on the real kernel, on a simulated node with tasks
//! `a` (the meshed client) and `b` (a server on 198.18.1.3).
//!
//! These tests need root, cgroup v2, iproute2, curl, bpftool and setpriv, and the agent
//! binary (`MESH_AGENT_BIN`, else target/debug/mesh-agent). Without them they fail, with
//! the reason; they never skip.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use mesh_testbed::{
    Agent, Launch, Node, ServeMode, Task, Testkit, Topology, require_root, require_tools, run_ok,
    run_with_timeout,
};

const MIB: u64 = 1 << 20;
/// Per client run; generous for 64 MiB through a debug-build proxy on 2 cores.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);
const SHORT: Duration = Duration::from_secs(10);
/// How long a metric may lag behind the traffic it counts.
const METRIC_LAG: Duration = Duration::from_secs(5);

const CAPTURED: &str = "mesh_connections_captured_total";
const DECISIONS: &str = "mesh_capture_decisions_total";

/// One node with tasks `a` and `b`; `b` serves on 198.18.1.3.
struct Fixture {
    // Field order is drop order: nothing here outlives the topology.
    kit: Testkit,
    a: Task,
    b: Task,
    node: Node,
    topology: Topology,
}

/// Runs `body` on a fresh fixture. An error fails the test by panicking while the
/// topology still exists, so the teardown prints the agents' logs and keeps them on disk.
fn with_fixture(body: impl FnOnce(&Fixture) -> Result<()>) {
    let f = fixture().unwrap_or_else(|e| panic!("test prerequisites: {e:#}"));
    if let Err(e) = body(&f) {
        panic!("{e:?}");
    }
}

fn fixture() -> Result<Fixture> {
    require_root()?;
    require_tools(&["ip", "curl", "bpftool", "setpriv"])?;
    let kit = Testkit::new(env!("CARGO_BIN_EXE_mesh-testkit"))?;
    let topology = Topology::new()?;
    let node = topology.add_node()?;
    let a = node.add_task("a")?;
    let b = node.add_task("b")?;
    Ok(Fixture {
        kit,
        a,
        b,
        node,
        topology,
    })
}

/// An agent configuration capturing the node's task subnet (plus `capture_extra` lines
/// under `[capture]`) for `tasks`. Short timeouts, so a broken agent fails fast; no file
/// watching, so reloads happen exactly when a test sends SIGHUP.
fn config(capture_extra: &str, tasks: &[&Task]) -> String {
    let tasks: String = tasks.iter().map(|t| t.config() + "\n").collect();
    format!(
        "[agent]\ndrain_timeout = \"2s\"\nconnect_timeout = \"2s\"\nwatch_interval = \"0s\"\n\n\
         [capture]\nmode = \"listed\"\ndestinations = [\"198.18.1.0/24\"]\n{capture_extra}\n\n{tasks}"
    )
}

fn addr(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

fn task_label(task: &Task) -> [(&str, &str); 1] {
    [("task", task.id())]
}

fn decision(name: &str) -> [(&str, &str); 1] {
    [("decision", name)]
}

/// a. A captured connection works, is counted for task `a`, and reaches the server from
/// task a's own address with a new source port (the agent dials from inside a's netns).
#[test]
fn captured_connection_reaches_server_from_the_tasks_own_address() {
    with_fixture(|f| {
        let server = f.kit.serve(&f.b, addr(f.b.ip(), 8080), ServeMode::Http)?;
        let agent = Agent::start(&f.node, &config("", &[&f.a, &f.b]))?;

        let out = run_ok(
            f.a.command("curl")?
                .args([
                    "-sS",
                    "--max-time",
                    "5",
                    "-w",
                    "%{local_ip} %{local_port}\n",
                ])
                .arg(format!("http://{}/", server.addr())),
            SHORT,
        )?;
        // "peer=<ip>:<port>\n" from the server, then curl's own socket address.
        let (body, curl_side) = out.split_once('\n').context("curl printed one line only")?;
        let seen: SocketAddr = body
            .strip_prefix("peer=")
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("unexpected response {out:?}"))?;
        let (curl_ip, curl_port) = curl_side.trim().split_once(' ').context("no -w output")?;
        println!("server saw {seen}; curl's socket was {curl_ip}:{curl_port}");

        assert_eq!(
            seen.ip(),
            IpAddr::V4(f.a.ip()),
            "the server must see task a's own address"
        );
        assert_ne!(
            seen.port().to_string(),
            curl_port,
            "the agent's upstream socket is a new one"
        );
        // connect4 sent curl to the agent's listener on loopback inside a's netns.
        assert_eq!(
            curl_ip, "127.0.0.1",
            "curl's connection was not redirected to the agent"
        );
        agent.wait_metric(CAPTURED, &task_label(&f.a), METRIC_LAG, |v| v >= 1.0)?;
        agent.wait_metric(DECISIONS, &decision("captured"), METRIC_LAG, |v| v >= 1.0)?;
        Ok(())
    })
}

/// b. 64 MiB each way arrives intact through the agent: half-close (the reply starts only
/// after the client's FIN got through) and full-duplex echo.
#[test]
fn large_transfers_are_intact_in_both_directions() {
    with_fixture(|f| {
        let size = 64 * MIB;
        let halfclose = f.kit.serve(
            &f.b,
            addr(f.b.ip(), 9000),
            ServeMode::HalfClose { reply_bytes: size },
        )?;
        let echo = f.kit.serve(&f.b, addr(f.b.ip(), 9001), ServeMode::Echo)?;
        let agent = Agent::start(&f.node, &config("", &[&f.a]))?;
        let n = size.to_string();

        let started = Instant::now();
        let summary = f.kit.run_client(
            &f.a,
            halfclose.addr(),
            &[
                "--mode",
                "halfclose",
                "--send-bytes",
                &n,
                "--expect-bytes",
                &n,
                "--timeout",
                "20",
            ],
            CLIENT_TIMEOUT,
        )?;
        println!("halfclose: {summary} ({:?})", started.elapsed());
        let started = Instant::now();
        let summary = f.kit.run_client(
            &f.a,
            echo.addr(),
            &["--mode", "echo", "--send-bytes", &n, "--timeout", "20"],
            CLIENT_TIMEOUT,
        )?;
        println!("echo: {summary} ({:?})", started.elapsed());

        let a = task_label(&f.a);
        agent.wait_metric(CAPTURED, &a, METRIC_LAG, |v| v >= 2.0)?;
        // Both connections went through the agent: their bytes are in its counters.
        let sent = (2 * size) as f64;
        let received = (2 * size + 32) as f64;
        agent.wait_metric("mesh_tcp_sent_bytes_total", &a, METRIC_LAG, |v| v >= sent)?;
        agent.wait_metric("mesh_tcp_received_bytes_total", &a, METRIC_LAG, |v| {
            v >= received
        })?;
        Ok(())
    })
}

/// c. 200 concurrent captured connections all complete, and the agent gives back every
/// file descriptor they used.
#[test]
fn concurrent_connections_complete_and_release_their_fds() {
    with_fixture(|f| {
        let echo = f.kit.serve(&f.b, addr(f.b.ip(), 9001), ServeMode::Echo)?;
        let agent = Agent::start(&f.node, &config("", &[&f.a]))?;
        // Baseline after one captured connection and one scrape, so whatever the agent
        // sets up lazily on first use is not mistaken for a leak.
        let small = ["--mode", "echo", "--send-bytes", "1024"];
        f.kit.run_client(&f.a, echo.addr(), &small, SHORT)?;
        agent.wait_metric(
            "mesh_connections_active",
            &task_label(&f.a),
            METRIC_LAG,
            |v| v == 0.0,
        )?;
        let baseline = agent.fd_count()?;

        let summary = f.kit.run_client(
            &f.a,
            echo.addr(),
            &[
                "--mode",
                "concurrent",
                "--connections",
                "200",
                "--send-bytes",
                "65536",
                "--timeout",
                "20",
            ],
            CLIENT_TIMEOUT,
        )?;
        println!("{summary}; agent fds at start: {baseline}");

        let a = task_label(&f.a);
        agent.wait_metric(CAPTURED, &a, METRIC_LAG, |v| v >= 201.0)?;
        agent.wait_metric("mesh_connections_active", &a, METRIC_LAG, |v| v == 0.0)?;
        let deadline = Instant::now() + METRIC_LAG;
        loop {
            let now = agent.fd_count()?;
            if now <= baseline {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "agent holds {now} fds {METRIC_LAG:?} after the connections closed, {baseline} before"
            );
            thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    })
}

/// d. Loopback, excluded CIDRs and excluded ports bypass the agent: the connections work,
/// the matching bypass decision is counted, and nothing is captured.
#[test]
fn excluded_destinations_are_not_captured() {
    with_fixture(|f| {
        let c = f.node.add_task("c")?;
        let extra = format!(
            "exclude_ports = [2222]\nexclude_cidrs = [\"{}/32\"]",
            c.ip()
        );
        let loopback = f
            .kit
            .serve(&f.a, addr(Ipv4Addr::LOCALHOST, 7000), ServeMode::Echo)?;
        let excluded_cidr = f.kit.serve(&c, addr(c.ip(), 9001), ServeMode::Echo)?;
        let excluded_port = f.kit.serve(&f.b, addr(f.b.ip(), 2222), ServeMode::Echo)?;
        let meshed = f.kit.serve(&f.b, addr(f.b.ip(), 9001), ServeMode::Echo)?;
        let agent = Agent::start(&f.node, &config(&extra, &[&f.a]))?;
        let a = task_label(&f.a);

        for (server, bypass) in [
            (&loopback, "bypass_loopback"),
            (&excluded_cidr, "bypass_excluded_cidr"),
            (&excluded_port, "bypass_excluded_port"),
        ] {
            let captured = agent.metric(DECISIONS, &decision("captured"))?;
            let captured_a = agent.metric(CAPTURED, &a)?;
            let bypassed = agent.metric(DECISIONS, &decision(bypass))?;
            f.kit
                .run_client(
                    &f.a,
                    server.addr(),
                    &["--mode", "echo", "--send-bytes", "4096"],
                    SHORT,
                )
                .with_context(|| format!("connection to {} ({bypass})", server.addr()))?;
            agent
                .wait_metric(DECISIONS, &decision(bypass), METRIC_LAG, |v| v > bypassed)
                .with_context(|| format!("connection to {}", server.addr()))?;
            assert_eq!(
                agent.metric(DECISIONS, &decision("captured"))?,
                captured,
                "a connection to {} ({bypass}) was captured",
                server.addr()
            );
            assert_eq!(
                agent.metric(CAPTURED, &a)?,
                captured_a,
                "{bypass}: counted as captured"
            );
        }

        // The same task, same agent, a listed destination: captured. So the counters above
        // stood still because of the exclusions, not because capture was off.
        f.kit.run_client(
            &f.a,
            meshed.addr(),
            &["--mode", "echo", "--send-bytes", "4096"],
            SHORT,
        )?;
        agent.wait_metric(CAPTURED, &a, METRIC_LAG, |v| v >= 1.0)?;
        Ok(())
    })
}

/// e (1). A process in task a's netns but outside its cgroup is not captured: the server
/// sees that process's own socket.
#[test]
fn process_outside_the_task_cgroup_is_not_captured() {
    with_fixture(|f| {
        let server = f.kit.serve(&f.b, addr(f.b.ip(), 8080), ServeMode::Http)?;
        let agent = Agent::start(&f.node, &config("", &[&f.a]))?;
        let captured = agent.metric(DECISIONS, &decision("captured"))?;

        let out = run_ok(
            f.a.command_unmeshed("curl")?
                .args([
                    "-sS",
                    "--max-time",
                    "5",
                    "-w",
                    "%{local_ip}:%{local_port}\n",
                ])
                .arg(format!("http://{}/", server.addr())),
            SHORT,
        )?;
        let (body, curl_side) = out.split_once('\n').context("curl printed one line only")?;
        assert_eq!(
            body.strip_prefix("peer="),
            Some(curl_side.trim()),
            "the server should see curl's own socket, unproxied: {out:?}"
        );
        assert_eq!(agent.metric(CAPTURED, &task_label(&f.a))?, 0.0);
        assert_eq!(agent.metric(DECISIONS, &decision("captured"))?, captured);
        Ok(())
    })
}

/// e (2). A task removed from the config by a reload is no longer captured, while an
/// established connection of another task keeps flowing across the reload.
#[test]
fn reload_detaches_a_removed_task_without_disturbing_others() {
    with_fixture(|f| {
        let c = f.node.add_task("c")?;
        let echo = f.kit.serve(&f.b, addr(f.b.ip(), 9001), ServeMode::Echo)?;
        let mut agent = Agent::start(&f.node, &config("", &[&f.a, &c]))?;
        let small = ["--mode", "echo", "--send-bytes", "4096"];
        let (a, c_label) = (task_label(&f.a), task_label(&c));

        f.kit.run_client(&f.a, echo.addr(), &small, SHORT)?;
        let captured_a = agent.wait_metric(CAPTURED, &a, METRIC_LAG, |v| v >= 1.0)?;

        // c's connection echoes a message every 100 ms, and fails if one takes over 2 s.
        let mut hold = f.kit.client(
            &c,
            echo.addr(),
            &["--mode", "hold", "--seconds", "6", "--timeout", "2"],
        )?;
        let holder = thread::spawn(move || run_ok(&mut hold, Duration::from_secs(20)));
        agent.wait_metric("mesh_connections_active", &c_label, METRIC_LAG, |v| {
            v >= 1.0
        })?;

        agent.reload(&config("", &[&c]))?;
        agent.wait_metric("mesh_tasks_meshed", &[], METRIC_LAG, |v| v == 1.0)?;

        // c's connection is already open, so nothing else may be captured meanwhile.
        let captured = agent.metric(DECISIONS, &decision("captured"))?;
        f.kit
            .run_client(&f.a, echo.addr(), &small, SHORT)
            .context("a's connection after the reload")?;
        // The agent may drop a removed task's series (it reads as 0 then); it must not grow.
        let after = agent.metric(CAPTURED, &a)?;
        assert!(
            after <= captured_a,
            "a was captured after its removal ({captured_a} -> {after})"
        );
        assert_eq!(
            agent.metric(DECISIONS, &decision("captured"))?,
            captured,
            "captured after removal"
        );

        let summary = holder
            .join()
            .expect("hold thread")
            .context("c's connection across the reload")?;
        println!("hold across the reload: {}", summary.trim());
        assert!(agent.metric(CAPTURED, &c_label)? >= 1.0);
        Ok(())
    })
}

/// f. SIGTERM: exit 0, no program left on any task cgroup, nothing of ours pinned.
#[test]
fn sigterm_detaches_everything_and_exits_zero() {
    with_fixture(|f| {
        let tasks = [&f.a, &f.b];
        let mut agent = Agent::start(&f.node, &config("", &tasks))?;
        for task in tasks {
            // Proves the check below can see the agent's programs at all.
            ensure!(
                !cgroup_programs(task.cgroup_path())?.is_empty(),
                "no program attached to task {}'s cgroup while the agent runs",
                task.id()
            );
        }

        let status = agent.terminate()?;
        assert!(
            status.success(),
            "agent exited with {status}\n{}",
            agent.log_tail(30)
        );
        for task in tasks {
            let left = cgroup_programs(task.cgroup_path())?;
            assert!(
                left.is_empty(),
                "left on task {}'s cgroup: {left}",
                task.id()
            );
        }
        match bpffs_mount() {
            Some(bpffs) => {
                let pinned = pinned_mesh_objects(&bpffs)?;
                assert!(pinned.is_empty(), "pinned after exit: {pinned:?}");
            }
            None => println!("bpffs is not mounted: nothing can be pinned"),
        }
        Ok(())
    })
}

/// g (1). Not root: a quick failure that says so.
#[test]
fn agent_refuses_to_run_without_root() {
    with_fixture(|f| {
        let launch = Launch {
            wrapper: [
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
            ]
            .map(Into::into)
            .to_vec(),
            ..Launch::default()
        };
        let started = Instant::now();
        let mut agent = Agent::spawn(&f.node, &config("", &[&f.a]), &launch)?;
        let status = agent.wait_exit(Duration::from_secs(5))?;
        let log = agent.log();
        println!(
            "exit {status} after {:?}: {}",
            started.elapsed(),
            log.trim()
        );
        assert!(!status.success(), "the agent ran as uid 65534");
        assert!(
            log.contains("root"),
            "the error does not mention root: {log}"
        );
        Ok(())
    })
}

/// g (2). A task whose network namespace does not exist: a quick failure naming the path
/// and the task.
#[test]
fn agent_reports_a_missing_netns_by_path_and_task() {
    with_fixture(|f| {
        let missing = format!("/var/run/netns/{}-gone", f.topology.id());
        let ghost = format!(
            "[[tasks]]\nid = \"ghost\"\ncgroup = \"{}\"\nnetns = \"{missing}\"\naddresses = [\"198.18.1.9\"]\n",
            f.a.cgroup_relative()
        );
        let config = config("", &[&f.b]) + "\n" + &ghost;
        let started = Instant::now();
        let mut agent = Agent::spawn(&f.node, &config, &Launch::default())?;
        let status = agent.wait_exit(Duration::from_secs(5))?;
        let log = agent.log();
        println!(
            "exit {status} after {:?}: {}",
            started.elapsed(),
            log.trim()
        );
        assert!(!status.success(), "the agent started without the netns");
        assert!(
            log.contains(&missing),
            "the error does not name {missing}: {log}"
        );
        assert!(
            log.contains("\"ghost\""),
            "the error does not name task \"ghost\": {log}"
        );
        Ok(())
    })
}

/// h. The kernel programs' log records. At the agent's default level the programs log
/// nothing, so their ring buffer is one page and the agent neither maps nor reads it; with
/// `MESH_LOG=debug` the ring is aya-log's 128 KiB and a captured connection's record reaches
/// the agent's log.
#[test]
fn kernel_program_logs_are_carried_only_at_debug() {
    with_fixture(|f| {
        let server = f.kit.serve(&f.b, addr(f.b.ip(), 8080), ServeMode::Http)?;
        let record = format!("captured connect4 to {}", server.addr());
        for debug in [false, true] {
            let launch = Launch {
                env: if debug {
                    vec![("MESH_LOG".into(), "debug".into())]
                } else {
                    Vec::new()
                },
                ..Launch::default()
            };
            let mut agent = Agent::start_with(&f.node, &config("", &[&f.a, &f.b]), &launch)?;
            run_ok(
                f.a.command("curl")?
                    .args(["-sS", "--max-time", "5", "-o", "/dev/null"])
                    .arg(format!("http://{}/", server.addr())),
                SHORT,
            )?;
            agent.wait_metric(CAPTURED, &task_label(&f.a), METRIC_LAG, |v| v >= 1.0)?;
            let rings = ring_buffer_sizes(agent.pid())?;
            let mapped = std::fs::read_to_string(format!("/proc/{}/maps", agent.pid()))?
                .lines()
                .any(|l| l.ends_with("anon_inode:bpf-map"));
            if debug {
                ensure!(rings == [128 << 10], "log ring at debug: {rings:?} bytes");
                ensure!(
                    mapped,
                    "at debug the agent must map the log ring to read it"
                );
                let deadline = Instant::now() + METRIC_LAG;
                while !agent.log().contains(&record) {
                    ensure!(
                        Instant::now() < deadline,
                        "no {record:?} in the agent's log:\n{}",
                        agent.log_tail(30)
                    );
                    thread::sleep(Duration::from_millis(100));
                }
            } else {
                ensure!(
                    rings == [page_size()],
                    "log ring with logs off: {rings:?} bytes"
                );
                ensure!(!mapped, "with logs off the agent maps a BPF map");
                ensure!(
                    !agent.log().contains("captured connect4"),
                    "kernel records logged at the default level"
                );
            }
            agent.terminate()?;
        }
        Ok(())
    })
}

/// The sizes in bytes of the BPF ring buffers `pid` holds descriptors for (`/proc/<pid>/fdinfo`).
fn ring_buffer_sizes(pid: u32) -> Result<Vec<u64>> {
    const BPF_MAP_TYPE_RINGBUF: &str = "27";
    let mut sizes = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        // A descriptor closed since the listing has no fdinfo any more.
        let Ok(info) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        if field("map_type") == Some(BPF_MAP_TYPE_RINGBUF) {
            let max_entries = field("max_entries").context("ring buffer without max_entries")?;
            sizes.push(max_entries.parse()?);
        }
    }
    Ok(sizes)
}

fn page_size() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).unwrap_or(4096)
}

/// `bpftool cgroup show` of one cgroup (programs attached directly to it); empty if none.
fn cgroup_programs(cgroup: &Path) -> Result<String> {
    let out = run_with_timeout(
        std::process::Command::new("bpftool")
            .arg("cgroup")
            .arg("show")
            .arg(cgroup),
        SHORT,
    )?;
    ensure!(
        out.status.success(),
        "bpftool cgroup show {}: {}",
        cgroup.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    // Programs are listed under a header line "ID AttachType AttachFlags Name".
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("ID"))
        .collect::<Vec<_>>()
        .join("\n"))
}

fn bpffs_mount() -> Option<std::path::PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(2) == Some(&"bpf")).then(|| f[1].into())
    })
}

/// Every path under `dir` whose name starts with "mesh".
fn pinned_mesh_objects(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with("mesh") {
            found.push(entry.path());
        }
        if entry.file_type()?.is_dir() {
            found.extend(pinned_mesh_objects(&entry.path())?);
        }
    }
    Ok(found)
}
