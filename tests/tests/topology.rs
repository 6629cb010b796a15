//! Tests of the harness itself, without the agent: the simulated nodes are wired as
//! documented, processes land where they are asked to, and nothing is left behind.

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use mesh_testbed::{ServeMode, Testkit, Topology, cgroup, run_ok};

const TIMEOUT: Duration = Duration::from_secs(10);

fn testkit() -> Result<Testkit> {
    Testkit::new(env!("CARGO_BIN_EXE_mesh-testkit"))
}

/// What a topology made on the host, to check it is gone afterwards.
struct Footprint {
    netns: Vec<PathBuf>,
    cgroup: PathBuf,
    dir: PathBuf,
}

impl Footprint {
    fn of(topology: &Topology, netns: Vec<PathBuf>) -> Result<Self> {
        let cgroup = cgroup::mount()?.join(topology.id());
        let footprint = Self {
            netns,
            cgroup,
            dir: topology.dir().to_path_buf(),
        };
        ensure!(
            footprint.all().iter().all(|p| p.exists()),
            "topology objects missing"
        );
        Ok(footprint)
    }

    fn all(&self) -> Vec<PathBuf> {
        let mut all = self.netns.clone();
        all.extend([self.cgroup.clone(), self.dir.clone()]);
        all
    }

    fn assert_gone(&self) {
        for path in self.all() {
            assert!(!path.exists(), "{} survived the teardown", path.display());
        }
    }
}

#[test]
fn tasks_on_one_node_reach_each_other_directly() -> Result<()> {
    let topology = Topology::new()?;
    let node = topology.add_node()?;
    let a = node.add_task("a")?;
    let b = node.add_task("b")?;
    assert_eq!(a.ip().to_string(), "198.18.1.2");
    assert_eq!(b.ip().to_string(), "198.18.1.3");
    let footprint = Footprint::of(
        &topology,
        vec![node.netns_path(), a.netns_path(), b.netns_path()],
    )?;

    let server = testkit()?.serve(&b, SocketAddr::new(b.ip().into(), 8080), ServeMode::Http)?;
    let body = run_ok(
        a.command("curl")?
            .args(["-sS", "--max-time", "5"])
            .arg(format!("http://{}/", server.addr())),
        TIMEOUT,
    )?;
    // No agent: the server sees task A itself.
    assert!(
        body.starts_with(&format!("peer={}:", a.ip())),
        "unexpected response {body:?}"
    );
    // The node (the EC2 host) reaches its tasks over the bridge from 198.18.1.1.
    let body = run_ok(
        node.command("curl")?
            .args(["-sS", "--max-time", "5"])
            .arg(format!("http://{}/", server.addr())),
        TIMEOUT,
    )
    .context("node -> task")?;
    assert!(
        body.starts_with(&format!("peer={}:", node.ip())),
        "unexpected response {body:?}"
    );

    drop(server);
    drop(topology);
    footprint.assert_gone();
    Ok(())
}

#[test]
fn processes_land_in_the_requested_cgroup_and_netns() -> Result<()> {
    let topology = Topology::new()?;
    let node = topology.add_node()?;
    let a = node.add_task("a")?;
    let cgroup_of = |cmd: &mut std::process::Command| -> Result<String> {
        run_ok(
            cmd.args(["-c", "cat /proc/self/cgroup; ip -4 -o addr show dev eth0"]),
            TIMEOUT,
        )
    };

    let inside = cgroup_of(&mut a.command("sh")?)?;
    assert!(
        inside.contains(&format!("0::/{}\n", a.cgroup_relative())),
        "task process not in {}: {inside}",
        a.cgroup_relative()
    );
    assert!(
        inside.contains(&format!("inet {}/24", a.ip())),
        "not in A's netns: {inside}"
    );

    let outside = cgroup_of(&mut a.command_unmeshed("sh")?)?;
    assert!(
        outside.contains(&format!("0::/{}/unmeshed\n", topology.id())),
        "{outside}"
    );
    assert!(
        outside.contains(&format!("inet {}/24", a.ip())),
        "not in A's netns: {outside}"
    );
    assert!(!a.config().is_empty() && a.config().contains(&a.cgroup_relative()));
    Ok(())
}

#[test]
fn linked_nodes_route_between_their_tasks() -> Result<()> {
    let topology = Topology::new()?;
    let n1 = topology.add_node()?;
    let n2 = topology.add_node()?;
    let a = n1.add_task("a")?;
    let c = n2.add_task("c")?;
    topology.link_nodes(&n1, &n2)?;
    assert_eq!(c.ip().to_string(), "198.18.2.2");

    let kit = testkit()?;
    let server = kit.serve(&c, SocketAddr::new(c.ip().into(), 9000), ServeMode::Echo)?;
    let summary = kit.run_client(
        &a,
        server.addr(),
        &["--mode", "echo", "--send-bytes", "1000000"],
        TIMEOUT,
    )?;
    assert!(summary.starts_with("ok "), "{summary}");
    let http = kit.serve(&a, SocketAddr::new(a.ip().into(), 8080), ServeMode::Http)?;
    let body = run_ok(
        c.command("curl")?
            .args(["-sS", "--max-time", "5"])
            .arg(format!("http://{}/", http.addr())),
        TIMEOUT,
    )?;
    // Routed, not NATed: node 1 sees task C's own address.
    assert!(body.starts_with(&format!("peer={}:", c.ip())), "{body}");
    Ok(())
}

#[test]
fn a_panicking_test_still_tears_down() {
    let footprint = Mutex::new(None);
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let topology = Topology::new().unwrap();
        let node = topology.add_node().unwrap();
        let a = node.add_task("a").unwrap();
        // A daemonised process (its parent exits at once) that would outlive the test if
        // the cgroup were not emptied.
        run_ok(
            a.command("sh")
                .unwrap()
                .args(["-c", "sleep 600 >/dev/null 2>&1 &"]),
            TIMEOUT,
        )
        .unwrap();
        let made = Footprint::of(&topology, vec![node.netns_path(), a.netns_path()]).unwrap();
        *footprint.lock().unwrap() = Some(made);
        panic!("deliberate panic: the topology must still be torn down");
    }));
    assert!(outcome.is_err());
    let footprint = footprint.into_inner().unwrap().expect("topology was built");
    for path in footprint.netns.iter().chain([&footprint.cgroup]) {
        assert!(!path.exists(), "{} survived the teardown", path.display());
    }
    // The directory with the logs of a failed test is kept on purpose.
    assert!(
        footprint.dir.exists(),
        "logs of a failed test should be kept"
    );
    let _ = std::fs::remove_dir_all(&footprint.dir);
}
