//! Tests of the ECS stand-ins themselves, without the mesh agent: `mesh-testkit ecs-agent`
//! answers every route with the real ECS agent's shapes, status codes and error bodies, and
//! `EcsTask` puts processes where ECS would (slice and scope cgroups, task netns,
//! container environment) and leaves nothing behind.

use std::collections::BTreeSet;
use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use mesh_testbed::ecs::{EcsAgent, EcsTask, NetworkMode, TaskStatus, cgroup_root};
use mesh_testbed::mesh::role_arn;
use mesh_testbed::{Node, ServeMode, Testkit, Topology, cgroup, run_ok};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(10);

fn testkit() -> Result<Testkit> {
    Testkit::new(env!("CARGO_BIN_EXE_mesh-testkit"))
}

/// GET from the node's netns; the body parsed as JSON.
fn get_json(ecs: &EcsAgent, path: &str) -> Result<(u16, Value)> {
    let r = ecs.get(path)?;
    let v = serde_json::from_str(&r.body)
        .with_context(|| format!("GET {path}: {} is not JSON: {:?}", r.status, r.body))?;
    Ok((r.status, v))
}

fn keys(v: &Value) -> BTreeSet<&str> {
    v.as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default()
}

fn set<'a>(items: &[&'a str]) -> BTreeSet<&'a str> {
    items.iter().copied().collect()
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn task_by_arn<'a>(listing: &'a Value, arn: &str) -> Result<&'a Value> {
    listing["Tasks"]
        .as_array()
        .context("no Tasks array")?
        .iter()
        .find(|t| t["Arn"] == arn)
        .with_context(|| format!("{arn} not listed in {listing}"))
}

/// The empty TaskResponse the real agent sends with a 4xx of /v1/tasks.
fn empty_task() -> Value {
    json!({"Arn":"","KnownStatus":"","Family":"","Version":"","Containers":null})
}

/// `/proc/<pid>/cgroup` (cgroup v2 line) and whether `/proc/<pid>/ns/net` is `netns`.
fn placement(pid: u32, netns: &Path) -> Result<(String, bool)> {
    // Only the cgroup v2 line: a hybrid host lists the v1 hierarchies too.
    let cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup"))?
        .lines()
        .find(|l| l.starts_with("0::"))
        .map(|l| format!("{l}\n"))
        .unwrap_or_default();
    let ns = fs::metadata(format!("/proc/{pid}/ns/net"))?;
    let want = fs::metadata(netns)?;
    Ok((cgroup, ns.ino() == want.ino() && ns.dev() == want.dev()))
}

/// True once `pid` has exited (a zombie not yet reaped by init counts as exited).
fn exited(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

fn environ(pid: u32) -> Result<Vec<String>> {
    let raw = fs::read(format!("/proc/{pid}/environ"))?;
    Ok(raw
        .split(|&b| b == 0)
        .filter(|v| !v.is_empty())
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect())
}

fn started(node: &Node) -> Result<EcsAgent> {
    EcsAgent::start(node, &testkit()?, EcsAgent::DEFAULT_ADDR)
}

#[test]
fn metadata_and_listing_have_the_real_agents_shapes() -> Result<()> {
    let topology = Topology::new()?;
    let node = topology.add_node()?;
    let ecs = started(&node)?;

    let (status, tasks) = get_json(&ecs, "/v1/tasks")?;
    assert_eq!((status, &tasks), (200, &json!({"Tasks": []})));
    let (status, meta) = get_json(&ecs, "/v1/metadata")?;
    assert_eq!(status, 200);
    assert_eq!(
        keys(&meta),
        set(&["Cluster", "ContainerInstanceArn", "Version"])
    );
    assert_eq!(meta["Cluster"], "mesh-test");
    assert_eq!(ecs.cluster(), "mesh-test");
    assert!(
        meta["ContainerInstanceArn"]
            .as_str()
            .is_some_and(|a| a
                .starts_with("arn:aws:ecs:us-west-2:111122223333:container-instance/mesh-test/")),
        "{meta}"
    );
    assert!(
        meta["Version"]
            .as_str()
            .is_some_and(|v| v.starts_with("Amazon ECS Agent - v")),
        "{meta}"
    );

    let mut orders = ecs
        .task("orders")
        .version("7")
        .role("orders")
        .port(8080)
        .build()?;
    orders.start_running()?;
    let mut web = ecs
        .task("web")
        .bridge()
        .container("front")
        .host_port(80, 8081)
        .container("side")
        .port(9000)
        .build()?;
    web.start_running()?;
    let mut batch = ecs.task("batch").build()?;
    batch.create_cgroup()?;
    batch.register_without_containers(TaskStatus::Pending)?;

    let body = ecs.get("/v1/tasks")?.body;
    let listing: Value = serde_json::from_str(&body)?;
    assert_eq!(listing["Tasks"].as_array().map(Vec::len), Some(3), "{body}");
    // The role ARN is not part of the introspection API.
    assert!(!body.contains(":role/"), "{body}");
    // Nor is the pause container.
    let pause = orders.pause_docker_id().context("awsvpc has a pause")?;
    assert!(!body.contains(pause), "{body}");

    // awsvpc
    let t = task_by_arn(&listing, orders.arn())?;
    assert_eq!(
        keys(t),
        set(&[
            "Arn",
            "DesiredStatus",
            "KnownStatus",
            "Family",
            "Version",
            "Containers"
        ])
    );
    assert_eq!(
        (&t["DesiredStatus"], &t["KnownStatus"]),
        (&json!("RUNNING"), &json!("RUNNING"))
    );
    assert_eq!(
        (&t["Family"], &t["Version"]),
        (&json!("orders"), &json!("7"))
    );
    assert!(
        orders
            .arn()
            .starts_with("arn:aws:ecs:us-west-2:111122223333:task/mesh-test/")
            && orders.arn().ends_with(orders.task_id())
    );
    let c = &t["Containers"][0];
    assert_eq!(t["Containers"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        keys(c),
        set(&[
            "DockerId",
            "DockerName",
            "Name",
            "Image",
            "ImageID",
            "CreatedAt",
            "StartedAt",
            "Ports",
            "Networks"
        ])
    );
    let app = &orders.containers()[0];
    assert!(is_hex(app.docker_id(), 64));
    assert_eq!(c["DockerId"], app.docker_id());
    assert_eq!(c["Name"], "app");
    assert!(
        c["DockerName"]
            .as_str()
            .is_some_and(|n| n.starts_with("ecs-orders-7-app-"))
    );
    assert!(
        c["ImageID"]
            .as_str()
            .is_some_and(|i| i.starts_with("sha256:"))
    );
    for stamp in ["CreatedAt", "StartedAt"] {
        let s = c[stamp].as_str().unwrap_or_default();
        assert!(
            s.len() >= 20 && s.ends_with('Z') && &s[10..11] == "T",
            "{stamp} {s}"
        );
    }
    assert_eq!(
        c["Ports"],
        json!([{"ContainerPort": 8080, "Protocol": "tcp", "HostPort": 8080}])
    );
    assert_eq!(
        c["Networks"],
        json!([{"NetworkMode": "awsvpc", "IPv4Addresses": [orders.ip().to_string()]}])
    );

    // bridge: no Networks, host ports, one netns and address per container
    let t = task_by_arn(&listing, web.arn())?;
    assert_eq!(t["Containers"].as_array().map(Vec::len), Some(2));
    for c in t["Containers"].as_array().into_iter().flatten() {
        assert!(!keys(c).contains("Networks"), "{c}");
        let ours = web
            .container(c["Name"].as_str().unwrap_or_default())
            .context("unknown container")?;
        assert_eq!(c["DockerId"], ours.docker_id());
        let port = &c["Ports"][0];
        match ours.name() {
            "front" => assert_eq!(
                port,
                &json!({"ContainerPort": 80, "Protocol": "tcp", "HostPort": 8081})
            ),
            _ => {
                assert_eq!(port["ContainerPort"], 9000);
                let host = port["HostPort"].as_u64().unwrap_or_default();
                assert!((32768..61000).contains(&host), "{port}");
            }
        }
    }
    assert_eq!(web.network_mode(), NetworkMode::Bridge);
    let (front, side) = (&web.containers()[0], &web.containers()[1]);
    assert_ne!(front.ip(), side.ip());
    assert_ne!(front.task().netns_path(), side.task().netns_path());
    assert!(web.pause_docker_id().is_none());

    // received, no container created yet: Containers is [] (never omitted)
    let t = task_by_arn(&listing, batch.arn())?;
    assert_eq!(t["KnownStatus"], "PENDING");
    assert_eq!(t["Containers"], json!([]));

    // HTTP/1.1 keep-alive, as Go's server does: the second request reuses the connection.
    let url = format!("{}/v1/metadata", ecs.url());
    let out = run_ok(
        node.command("curl")?
            .args([
                "-sS",
                "--max-time",
                "5",
                "-o",
                "/dev/null",
                "-o",
                "/dev/null",
            ])
            .args(["-w", "%{http_code} %{num_connects}\\n", &url, &url]),
        TIMEOUT,
    )?;
    assert_eq!(out, "200 1\n200 0\n");
    Ok(())
}

#[test]
fn single_task_queries_follow_the_real_agent() -> Result<()> {
    let topology = Topology::new()?;
    let node = topology.add_node()?;
    let ecs = started(&node)?;
    let mut orders = ecs.task("orders").build()?;
    orders.start_running()?;
    let mut web = ecs.task("web").container("a").container("b").build()?;
    web.start_running()?;
    let app = orders.containers()[0].docker_id().to_string();

    // One task object, not {"Tasks":[...]}.
    for path in [
        format!("/v1/tasks?dockerid={app}"),
        format!("/v1/tasks?dockerid={}", &app[..12]),
        format!("/v1/tasks?taskarn={}", orders.arn()),
        format!(
            "/v1/tasks?taskarn={}",
            orders.arn().replace(':', "%3A").replace('/', "%2F")
        ),
        // The pause container is not listed, but its id finds its task.
        format!(
            "/v1/tasks?dockerid={}",
            orders.pause_docker_id().context("pause")?
        ),
    ] {
        let (status, t) = get_json(&ecs, &path)?;
        assert_eq!(status, 200, "{path}: {t}");
        assert_eq!(t["Arn"], orders.arn(), "{path}: {t}");
        assert!(!keys(&t).contains("Tasks"));
        assert_eq!(t["Containers"].as_array().map(Vec::len), Some(1));
    }
    // Longer than 12 characters: exact only. Unknown: 404. Both parameters, or a short id
    // matching several containers (here: every one): 400. Bodies: an empty task.
    for (path, want) in [
        (format!("/v1/tasks?dockerid={}", &app[..13]), 404),
        ("/v1/tasks?dockerid=zzzz".to_string(), 404),
        ("/v1/tasks?taskarn=arn:aws:ecs:nope".to_string(), 404),
        ("/v1/tasks?dockerid=".to_string(), 400),
        (
            format!("/v1/tasks?dockerid={app}&taskarn={}", orders.arn()),
            400,
        ),
    ] {
        let (status, body) = get_json(&ecs, &path)?;
        assert_eq!((status, body), (want, empty_task()), "{path}");
    }
    // Two containers of ONE task sharing the prefix are ambiguous too (the real agent
    // counts matching containers, not tasks): a hand-made task with such ids.
    let mut odd = ecs.state().tasks[0].clone();
    odd.task.arn = "arn:aws:ecs:us-west-2:111122223333:task/mesh-test/odd".into();
    odd.internal_docker_ids.clear();
    let mut second = odd.task.containers[0].clone();
    odd.task.containers[0].docker_id = format!("abcdef123456{}", "0".repeat(52));
    second.docker_id = format!("abcdef123456{}", "1".repeat(52));
    odd.task.containers.push(second);
    ecs.update_state(|state| state.tasks.push(odd))?;
    assert_eq!(get_json(&ecs, "/v1/tasks?dockerid=abcdef")?.0, 400);
    let (status, t) = get_json(
        &ecs,
        &format!("/v1/tasks?dockerid=abcdef123456{}", "1".repeat(52)),
    )?;
    assert_eq!(
        (status, &t["Arn"]),
        (
            200,
            &json!("arn:aws:ecs:us-west-2:111122223333:task/mesh-test/odd")
        )
    );
    assert_eq!(web.containers().len(), 2);

    for path in ["/v1/tasks/", "/v1", "/v3/credentials/x", "/"] {
        let r = ecs.get(path)?;
        assert_eq!((r.status, r.body.as_str()), (404, "404 page not found\n"));
    }
    // Every request was logged, with its status.
    let logged = ecs.requests();
    assert!(
        logged
            .iter()
            .any(|r| r.path == "/v1/tasks?dockerid=zzzz" && r.status == 404 && r.method == "GET"),
        "{logged:?}"
    );
    Ok(())
}

#[test]
fn credentials_answer_503_then_200_and_400_for_unknown_ids() -> Result<()> {
    let topology = Topology::new()?;
    let node = topology.add_node()?;
    let mut ecs = started(&node)?;
    let mut orders = ecs.task("orders").role("orders").fail_first(2).build()?;
    orders.start_running()?;
    let creds = orders.credentials().context("a role was given")?.clone();
    assert_eq!(creds.role_arn, role_arn("orders"));
    assert_eq!(orders.role_arn(), Some(role_arn("orders").as_str()));
    assert!(creds.access_key_id.starts_with("ASIA"));
    let uri = creds.relative_uri();
    assert_eq!(uri, format!("/v2/credentials/{}", creds.id));

    let not_ready = json!({
        "code": "CredentialsUninitialized",
        "message": "CredentialsV2Request: Credentials uninitialized for ID",
        "HTTPErrorCode": 503,
    });
    for _ in 0..2 {
        assert_eq!(get_json(&ecs, &uri)?, (503, not_ready.clone()));
    }
    let granted = json!({
        "RoleArn": creds.role_arn,
        "AccessKeyId": creds.access_key_id,
        "SecretAccessKey": creds.secret_access_key,
        "Token": creds.token,
        "Expiration": creds.expiration,
    });
    for _ in 0..2 {
        assert_eq!(get_json(&ecs, &uri)?, (200, granted.clone()));
    }
    assert!(creds.expiration.ends_with('Z') && !creds.expiration.contains('.'));
    assert_eq!(ecs.credential_requests(&creds.id), 4);
    let statuses: Vec<u16> = ecs
        .requests()
        .iter()
        .filter(|r| r.credentials_id() == Some(creds.id.as_str()))
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, [503, 503, 200, 200]);
    // The log names the task, as the audit log does, and none of the secrets.
    assert!(ecs.log().contains(&format!("arn={}", orders.arn())));
    assert!(creds.leaks_in(&ecs.log()).is_empty());

    assert_eq!(
        get_json(&ecs, "/v2/credentials/5e0b8b9a-0000-4000-8000-000000000000")?,
        (
            400,
            json!({"code": "InvalidIdInRequest",
                   "message": "CredentialsV2Request: Credentials not found",
                   "HTTPErrorCode": 400})
        )
    );
    assert_eq!(
        get_json(&ecs, "/v2/credentials/")?,
        (
            400,
            json!({"code": "NoIdInRequest",
                   "message": "CredentialsV2Request: No Credential ID in the request",
                   "HTTPErrorCode": 400})
        )
    );
    assert_eq!(
        get_json(&ecs, &format!("/v1/credentials?id={}", creds.id))?,
        (200, granted.clone())
    );

    // A restarted agent counts again from zero (the count lives in its memory).
    ecs.restart()?;
    assert_eq!(get_json(&ecs, &uri)?.0, 503);
    ecs.wait_requests(1, TIMEOUT, |r| {
        r.status == 503 && r.credentials_id().is_some()
    })?;
    // A killed agent refuses connections.
    ecs.kill();
    assert!(ecs.get("/v1/metadata").is_err());
    ecs.restart()?;

    // Stopped tasks keep their credentials until cleanup.
    orders.stop()?;
    assert_eq!(get_json(&ecs, &uri)?.0, 503);
    assert_eq!(get_json(&ecs, &uri)?.0, 503);
    assert_eq!(get_json(&ecs, &uri)?.0, 200);
    orders.cleanup()?;
    assert_eq!(get_json(&ecs, &uri)?.0, 400);

    // No role: no credentials, no variable.
    let plain = ecs.task("plain").build()?;
    assert!(plain.credentials().is_none() && plain.role_arn().is_none());
    Ok(())
}

#[test]
fn lifecycle_steps_place_processes_like_ecs() -> Result<()> {
    let topology = Topology::new()?;
    let node = topology.add_node()?;
    let ecs = started(&node)?;
    let kit = testkit()?;
    let mut task = ecs.task("orders").role("orders").build()?;
    assert!(is_hex(task.task_id(), 32));
    assert_eq!(
        task.agent_task_id(),
        format!("orders-{}", &task.task_id()[..8])
    );
    let creds = task.credentials().context("role")?.clone();
    let app = task.containers()[0].docker_id().to_string();

    // The [ecs] section points at the node's ecstasks.slice, which the stand-in made.
    let root = cgroup_root(&node)?;
    assert_eq!(root, format!("{}/node1/ecstasks.slice", topology.id()));
    assert!(cgroup::mount()?.join(&root).is_dir());
    let config: toml::Table = toml::from_str(&ecs.config())?;
    let section = config["ecs"].as_table().context("[ecs]")?;
    let want = [
        ("agent_url", "http://127.0.0.1:51678"),
        ("credentials_url", "http://127.0.0.1:51678"),
        ("cgroup_root", root.as_str()),
        ("poll_interval", "1s"),
        ("default", "mesh"),
    ];
    assert_eq!(section.len(), want.len(), "{section:?}");
    for (key, value) in want {
        assert_eq!(section[key].as_str(), Some(value), "{key}");
    }

    // (a) the slice
    assert!(!task.slice_path().exists());
    assert!(task.command("true").is_err(), "no cgroup yet");
    task.create_cgroup()?;
    assert_eq!(
        task.slice_relative(),
        format!("{root}/ecstasks-{}.slice", task.task_id())
    );
    assert!(task.slice_path().is_dir());

    // (b) the pause container: in the task netns and its own scope, no ECS variables,
    // not listed.
    let pause = task.start_pause()?;
    let (cg, in_netns) = placement(pause, &task.netns_path())?;
    let pause_scope = format!(
        "{}/docker-{}.scope",
        task.slice_relative(),
        task.pause_docker_id().context("pause")?
    );
    assert_eq!(cg, format!("0::/{pause_scope}\n"));
    assert!(in_netns);
    let env = environ(pause)?;
    assert!(
        env.iter()
            .all(|v| !v.starts_with("AWS_") && !v.starts_with("ECS_")),
        "{env:?}"
    );
    assert_eq!(get_json(&ecs, "/v1/tasks")?.1, json!({"Tasks": []}));

    // (c) PENDING: created, not started
    task.register(TaskStatus::Pending)?;
    let (_, listing) = get_json(&ecs, "/v1/tasks")?;
    let t = task_by_arn(&listing, task.arn())?;
    assert_eq!(t["KnownStatus"], "PENDING");
    assert_eq!(t["DesiredStatus"], "RUNNING");
    assert!(keys(&t["Containers"][0]).contains("CreatedAt"));
    assert!(!keys(&t["Containers"][0]).contains("StartedAt"));

    // (d) a command in the app container
    let app_scope = format!("{}/docker-{app}.scope", task.slice_relative());
    assert_eq!(task.containers()[0].cgroup_relative(), app_scope);
    let out = run_ok(
        task.command("sh")?.args([
            "-c",
            "cat /proc/self/cgroup; ip -4 -o addr show dev eth0; tr '\\0' '\\n' </proc/self/environ",
        ]),
        TIMEOUT,
    )?;
    assert!(out.contains(&format!("0::/{app_scope}\n")), "{out}");
    assert!(out.contains(&format!("inet {}/24", task.ip())), "{out}");
    for var in [
        format!(
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=/v2/credentials/{}",
            creds.id
        ),
        format!("ECS_CONTAINER_METADATA_URI_V4=http://169.254.170.2/v4/{app}"),
    ] {
        assert!(out.lines().any(|l| l == var), "{var} missing: {out}");
    }
    assert!(
        !out.contains("CARGO"),
        "the harness's environment leaked: {out}"
    );
    // A long-lived process, as the agent would find it.
    let pids = task.start_containers()?;
    let (cg, in_netns) = placement(pids[0], &task.netns_path())?;
    assert_eq!(cg, format!("0::/{app_scope}\n"));
    assert!(in_netns);
    assert!(environ(pids[0])?.contains(&format!(
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI={}",
        creds.relative_uri()
    )));
    // The container works with the ordinary testkit too.
    let server = kit.serve(
        task.task(),
        SocketAddr::new(task.ip().into(), 8080),
        ServeMode::Http,
    )?;
    let body = run_ok(
        node.command("curl")?
            .args(["-sS", "--max-time", "5"])
            .arg(format!("http://{}/", server.addr())),
        TIMEOUT,
    )?;
    assert!(body.starts_with(&format!("peer={}:", node.ip())), "{body}");
    task.register(TaskStatus::Running)?;
    let (_, t) = get_json(&ecs, &format!("/v1/tasks?taskarn={}", task.arn()))?;
    assert_eq!(t["KnownStatus"], "RUNNING");
    assert!(keys(&t["Containers"][0]).contains("StartedAt"));
    let all = task.pids();
    assert!(
        all.contains(&pause) && all.contains(&pids[0]) && all.len() >= 3,
        "{all:?}"
    );

    // (e) stop: processes gone, cgroups gone, listed as STOPPED
    task.stop()?;
    assert!(!task.slice_path().exists());
    assert!(task.pids().is_empty());
    for pid in [pause, pids[0]] {
        assert!(exited(pid), "{pid} lives");
    }
    let (_, t) = get_json(&ecs, &format!("/v1/tasks?taskarn={}", task.arn()))?;
    assert_eq!(
        (&t["KnownStatus"], &t["DesiredStatus"]),
        (&json!("STOPPED"), &json!("STOPPED"))
    );
    assert_eq!(t["Containers"][0]["DockerId"], app);
    assert!(task.command("true").is_err(), "the slice is gone");
    drop(server);

    // cleanup: gone from the listing
    task.cleanup()?;
    assert_eq!(get_json(&ecs, "/v1/tasks")?.1, json!({"Tasks": []}));
    Ok(())
}

#[test]
fn bridge_containers_have_their_own_netns_and_scope() -> Result<()> {
    let topology = Topology::new()?;
    let node = topology.add_node()?;
    let ecs = started(&node)?;
    let mut web = ecs
        .task("web")
        .bridge()
        .role("web")
        .container("front")
        .container("side")
        .build()?;
    web.create_cgroup()?;
    assert!(web.start_pause().is_err(), "bridge tasks have no pause");
    let pids = web.start_containers()?;
    for (c, pid) in web.containers().iter().zip(&pids) {
        let (cg, in_netns) = placement(*pid, &c.task().netns_path())?;
        assert_eq!(cg, format!("0::/{}\n", c.cgroup_relative()));
        assert!(in_netns, "{} not in its netns", c.name());
        let env = environ(*pid)?;
        assert!(env.contains(&format!(
            "ECS_CONTAINER_METADATA_URI_V4=http://169.254.170.2/v4/{}",
            c.docker_id()
        )));
        assert!(
            env.iter()
                .any(|v| v.starts_with("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI="))
        );
    }
    let (_, other_netns) = placement(pids[0], &web.containers()[1].task().netns_path())?;
    assert!(!other_netns);
    Ok(())
}

/// What a topology with ECS tasks made on the host.
struct Footprint {
    paths: Vec<PathBuf>,
    pids: Vec<u32>,
}

impl Footprint {
    fn of(topology: &Topology, ecs: &EcsAgent, tasks: &[&EcsTask]) -> Result<Self> {
        let mut paths = vec![
            cgroup::mount()?.join(topology.id()),
            topology.dir().to_path_buf(),
            ecs.node().netns_path(),
        ];
        let mut pids = vec![ecs.pid().context("stand-in running")?];
        for task in tasks {
            paths.push(task.slice_path().to_path_buf());
            paths.extend(task.containers().iter().map(|c| c.task().netns_path()));
            pids.extend(task.pids());
        }
        ensure!(
            paths.iter().all(|p| p.exists()),
            "objects missing: {paths:?}"
        );
        ensure!(pids.len() > 2, "{pids:?}");
        Ok(Self { paths, pids })
    }

    fn assert_gone(&self, except_dir: Option<&Path>) {
        for path in &self.paths {
            if Some(path.as_path()) != except_dir {
                assert!(!path.exists(), "{} survived the teardown", path.display());
            }
        }
        for pid in &self.pids {
            assert!(exited(*pid), "process {pid} survived the teardown");
        }
    }
}

#[test]
fn a_dropped_task_leaves_nothing_and_the_listing() -> Result<()> {
    let topology = Topology::new()?;
    let node = topology.add_node()?;
    let ecs = started(&node)?;
    let mut gone = ecs.task("gone").role("gone").build()?;
    gone.start_running()?;
    let mut kept = ecs.task("kept").build()?;
    kept.start_running()?;
    // A daemonised process in the container: only the cgroup knows it.
    run_ok(
        gone.command("sh")?
            .args(["-c", "sleep 600 >/dev/null 2>&1 &"]),
        TIMEOUT,
    )?;
    let (slice, pids) = (gone.slice_path().to_path_buf(), gone.pids());
    let uri = gone.credentials().context("role")?.relative_uri();
    assert_eq!(pids.len(), 3, "pause, idle app, daemon: {pids:?}");
    drop(gone);
    assert!(!slice.exists());
    for pid in pids {
        assert!(exited(pid), "{pid} lives");
    }
    let (_, listing) = get_json(&ecs, "/v1/tasks")?;
    assert_eq!(listing["Tasks"].as_array().map(Vec::len), Some(1));
    assert_eq!(listing["Tasks"][0]["Arn"], kept.arn());
    assert_eq!(get_json(&ecs, &uri)?.0, 400);

    let footprint = Footprint::of(&topology, &ecs, &[&kept])?;
    // Any drop order works; the topology first is the harder one.
    drop(topology);
    drop(kept);
    drop(ecs);
    footprint.assert_gone(None);
    Ok(())
}

#[test]
fn a_panicking_test_still_tears_ecs_tasks_down() {
    let footprint = Mutex::new(None);
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let topology = Topology::new().unwrap();
        let node = topology.add_node().unwrap();
        let ecs = started(&node).unwrap();
        let mut a = ecs.task("a").role("a").build().unwrap();
        a.start_running().unwrap();
        let mut b = ecs.task("b").bridge().build().unwrap();
        b.start_running().unwrap();
        *footprint.lock().unwrap() = Some(Footprint::of(&topology, &ecs, &[&a, &b]).unwrap());
        panic!("deliberate panic: the ECS tasks must still be torn down");
    }));
    assert!(outcome.is_err());
    let footprint = footprint.into_inner().unwrap().expect("built");
    // The directory with the logs of a failed test is kept on purpose.
    let dir = footprint.paths[1].clone();
    footprint.assert_gone(Some(&dir));
    assert!(dir.exists(), "logs of a failed test should be kept");
    let _ = fs::remove_dir_all(&dir);
}
