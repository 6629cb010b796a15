//! L7 routing end to end: the seed scenario. serviceA (task a, node 1) calls
//! `serviceb.apps.local` at the virtual service's address; the router splits requests 75/25
//! between virtual nodes serviceB (task b1) and serviceBv2 (task b2) on node 2, every request
//! carried over the mutual-TLS tunnel and counted in `istio_requests_total`. Then the override
//! header (honoured only for allowed callers), retries within the retry budget against
//! `flaky` upstreams, and the per-request timeout against a `slow` upstream.
//!
//! Needs root, cgroup v2, iproute2 and curl.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use mesh_testbed::mesh::{
    MeshConfig, TwoNodes, endpoint_section, role_arn, seed_routing, spiffe_id,
};
use mesh_testbed::{Agent, ServeMode, Task, Testkit, run_with_timeout};

/// What applications resolve `serviceb.apps.local` to (a Route 53 / Cloud Map record).
const VIP: &str = "198.18.250.1";
const PORT: u16 = 8080;
const REQUESTS: usize = 2000;

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
        let TwoNodes {
            topology: _topology,
            n1,
            n2,
            trust,
        } = TwoNodes::new()?;
        let a = n1.add_task("a")?;
        let b1 = n2.add_task("b1")?;
        let b2 = n2.add_task("b2")?;
        let _s1 = kit.serve(&b1, SocketAddr::new(b1.ip().into(), PORT), ServeMode::Http)?;
        let _s2 = kit.serve(&b2, SocketAddr::new(b2.ip().into(), PORT), ServeMode::Http)?;

        let node1 = |weights: (u32, u32)| {
            MeshConfig::new(&trust)
                .task(&a, "serviceA")
                .raw(&endpoint_section(&b1, "serviceB"))
                .raw(&endpoint_section(&b2, "serviceBv2"))
                .raw(&seed_routing(VIP, PORT, weights.0, weights.1))
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

/// Responses of `n` requests to `url` (curl globbing, e.g. `http://VIP:PORT/x[1-400]`) from
/// `task` with `Host: host` and extra `headers`: each as (status code, body's first line).
fn responses(task: &Task, host: &str, url: &str, headers: &[&str]) -> Result<Vec<(u16, String)>> {
    let mut curl = task.command("curl")?;
    curl.args(["-sS", "--max-time", "60", "-H"])
        .arg(format!("Host: {host}"));
    for h in headers {
        curl.args(["-H", h]);
    }
    curl.arg(url).args(["-w", "\ncode=%{http_code}\n"]);
    let out = run_with_timeout(&mut curl, Duration::from_secs(90))?;
    ensure!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut body = String::new();
    let mut all = Vec::new();
    for line in stdout.lines() {
        if let Some(code) = line.strip_prefix("code=") {
            all.push((
                code.parse().context("status code")?,
                std::mem::take(&mut body),
            ));
        } else if body.is_empty() && !line.trim().is_empty() {
            body = line.to_owned();
        }
    }
    Ok(all)
}

/// Bodies of the 200 responses; fails on any other status.
fn ok_bodies(responses: Vec<(u16, String)>) -> Result<Vec<String>> {
    let bad: Vec<_> = responses
        .iter()
        .filter(|(c, _)| *c != 200)
        .take(3)
        .collect();
    ensure!(bad.is_empty(), "non-200 responses, e.g. {bad:?}");
    Ok(responses.into_iter().map(|(_, b)| b).collect())
}

/// The number of counted requests a [`ServeMode::Flaky`] server in `task` received, asked
/// outside the mesh.
fn flaky_count(task: &Task) -> Result<u64> {
    let mut curl = task.command_unmeshed("curl")?;
    curl.args(["-sS", "--max-time", "10"])
        .arg(format!("http://{}:{PORT}/count", task.ip()));
    let out = run_with_timeout(&mut curl, Duration::from_secs(15))?;
    let body = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "/count: {body}");
    body.trim()
        .strip_prefix("count=")
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("/count answered {body:?}"))
}

/// The override header: only serviceA's role is allowed to pin a request to a virtual node.
#[test]
fn override_header_is_honoured_for_allowed_callers_only() {
    let result = (|| -> Result<()> {
        let kit = Testkit::new(env!("CARGO_BIN_EXE_mesh-testkit"))?;
        let TwoNodes {
            topology: _topology,
            n1,
            n2,
            trust,
        } = TwoNodes::new()?;
        let a = n1.add_task("a")?;
        let c = n1.add_task("c")?;
        let b1 = n2.add_task("b1")?;
        let b2 = n2.add_task("b2")?;
        let _s1 = kit.serve(&b1, SocketAddr::new(b1.ip().into(), PORT), ServeMode::Http)?;
        let _s2 = kit.serve(&b2, SocketAddr::new(b2.ip().into(), PORT), ServeMode::Http)?;
        let node1 = MeshConfig::new(&trust)
            .task(&a, "serviceA")
            .task(&c, "serviceC")
            .raw(&endpoint_section(&b1, "serviceB"))
            .raw(&endpoint_section(&b2, "serviceBv2"))
            .raw(&seed_routing(VIP, PORT, 75, 25))
            .raw(&format!(
                "[routing.override_header]\nallow_from = [\"{}\"]\n",
                role_arn("serviceA")
            ));
        let node2 = MeshConfig::new(&trust)
            .task(&b1, "serviceB")
            .task(&b2, "serviceBv2")
            .endpoint(&a, "serviceA")
            .endpoint(&c, "serviceC");
        let agent1 = Agent::start(&n1, &node1.render())?;
        let _agent2 = Agent::start(&n2, &node2.render())?;
        let url = |n: usize| format!("http://{VIP}:{PORT}/req[1-{n}]");
        let pin = "mesh-route: serviceb.apps.local=serviceBv2";

        // From a, allowed: with the header every request goes to serviceBv2...
        let pinned = ok_bodies(responses(&a, "serviceb.apps.local", &url(100), &[pin])?)?;
        ensure!(pinned.len() == 100, "{} answers for 100", pinned.len());
        let (p1, p2) = (count(&pinned, &b1), count(&pinned, &b2));
        println!("a with the header: serviceB {p1}, serviceBv2 {p2}");
        ensure!(
            p1 == 0 && p2 == 100,
            "a's pinned requests: serviceB {p1}, serviceBv2 {p2} (expected 0, 100)"
        );
        // ...and without it the split holds in the same run.
        let split = ok_bodies(responses(&a, "serviceb.apps.local", &url(400), &[])?)?;
        let (s1, s2) = (count(&split, &b1), count(&split, &b2));
        println!("a without the header: serviceB {s1}, serviceBv2 {s2}");
        ensure!(s1 + s2 == 400, "a: {s1} + {s2} answers for 400");
        // 75% of 400 = 300, sd 8.7: 300 ± 40 is over 4.5 sd.
        ensure!(
            (260..=340).contains(&s1),
            "a without the header: serviceB got {s1} of 400, expected 300 ± 40"
        );
        // From c, not allowed: the header is ignored.
        let ignored = ok_bodies(responses(&c, "serviceb.apps.local", &url(400), &[pin])?)?;
        let (i1, i2) = (count(&ignored, &b1), count(&ignored, &b2));
        println!("c with the header: serviceB {i1}, serviceBv2 {i2}");
        ensure!(i1 + i2 == 400, "c: {i1} + {i2} answers for 400");
        ensure!(
            (260..=340).contains(&i1),
            "c's header was not ignored: serviceB got {i1} of 400, expected 300 ± 40"
        );

        let (id_a, id_c) = (spiffe_id("serviceA"), spiffe_id("serviceC"));
        let requests_to = |source: &str, workload: &str| {
            agent1.metric(
                "istio_requests_total",
                &[
                    ("reporter", "source"),
                    ("source_workload", if source == id_a { "a" } else { "c" }),
                    ("source_principal", source),
                    ("destination_workload", workload),
                    ("destination_service", "serviceb.apps.local"),
                    ("response_code", "200"),
                    ("response_flags", "-"),
                    ("connection_security_policy", "mutual_tls"),
                ],
            )
        };
        let (m_a2, m_c1) = (
            requests_to(&id_a, "serviceBv2")?,
            requests_to(&id_c, "serviceB")?,
        );
        ensure!(
            m_a2 as usize == p2 + s2,
            "istio_requests_total a -> serviceBv2 is {m_a2}, curl saw {}",
            p2 + s2
        );
        ensure!(
            m_c1 as usize == i1,
            "istio_requests_total c -> serviceB is {m_c1}, curl saw {i1}"
        );
        Ok(())
    })();
    if let Err(e) = result {
        panic!("{e:?}");
    }
}

const RETRY_VIP_HALF: &str = "198.18.250.2";
const RETRY_VIP_DOWN: &str = "198.18.250.3";
/// The retry budget configured in [`retries_ride_out_failures_within_the_budget`].
const BUDGET_RATIO: f64 = 1.0;
const BUDGET_MIN_PER_SECOND: u64 = 1;
const BUDGET_WINDOW_SECS: u64 = 10;

/// Two virtual services, each with one node and a retrying route: `half.apps.local` (task b1,
/// failing every second request) and `down.apps.local` (task b2, failing every request).
fn retry_routing() -> String {
    let mut out = format!(
        r#"
[routing.retry_budget]
ratio = {BUDGET_RATIO:.1}
min_retries_per_second = {BUDGET_MIN_PER_SECOND}
window = "{BUDGET_WINDOW_SECS}s"
"#
    );
    for (name, vip, endpoint) in [
        ("half", RETRY_VIP_HALF, "b1"),
        ("down", RETRY_VIP_DOWN, "b2"),
    ] {
        out += &format!(
            r#"
[[virtual_services]]
name = "{name}.apps.local"
addresses = ["{vip}"]
provider = {{ virtual_router = "{name}" }}

[[virtual_routers]]
name = "{name}"
listeners = [{{ port = {PORT}, protocol = "http" }}]

[[virtual_nodes]]
name = "{name}"
endpoint = "{endpoint}"
listeners = [{{ port = {PORT}, protocol = "http" }}]

[[routes]]
name = "{name}-retry"
virtual_router = "{name}"
match.prefix = "/"
action.weighted_targets = [{{ virtual_node = "{name}", weight = 100 }}]
retry_policy.max_retries = 3
retry_policy.per_retry_timeout = "2s"
retry_policy.http_retry_events = ["server-error", "gateway-error"]
"#
        );
    }
    out
}

#[test]
fn retries_ride_out_failures_within_the_budget() {
    let result = (|| -> Result<()> {
        let kit = Testkit::new(env!("CARGO_BIN_EXE_mesh-testkit"))?;
        let TwoNodes {
            topology: _topology,
            n1,
            n2,
            trust,
        } = TwoNodes::new()?;
        let a = n1.add_task("a")?;
        let b1 = n2.add_task("b1")?;
        let b2 = n2.add_task("b2")?;
        let half = ServeMode::Flaky { fail_percent: 50 };
        let down = ServeMode::Flaky { fail_percent: 100 };
        let _s1 = kit.serve(&b1, SocketAddr::new(b1.ip().into(), PORT), half)?;
        let _s2 = kit.serve(&b2, SocketAddr::new(b2.ip().into(), PORT), down)?;
        let node1 = MeshConfig::new(&trust)
            .task(&a, "serviceA")
            .raw(&endpoint_section(&b1, "serviceB"))
            .raw(&endpoint_section(&b2, "serviceBv2"))
            .raw(&retry_routing());
        let node2 = MeshConfig::new(&trust)
            .task(&b1, "serviceB")
            .task(&b2, "serviceBv2")
            .endpoint(&a, "serviceA");
        let agent1 = Agent::start(&n1, &node1.render())?;
        let _agent2 = Agent::start(&n2, &node2.render())?;
        let id_a = spiffe_id("serviceA");
        let labels = |vs: &'static str, code: &'static str| {
            vec![
                ("reporter", "source"),
                ("source_workload", "a"),
                ("destination_workload", vs),
                (
                    "destination_service",
                    if vs == "half" {
                        "half.apps.local"
                    } else {
                        "down.apps.local"
                    },
                ),
                ("response_code", code),
            ]
        };

        // 50% failures: retries absorb them.
        const N: usize = 400;
        let got = responses(
            &a,
            "half.apps.local",
            &format!("http://{RETRY_VIP_HALF}:{PORT}/req[1-{N}]"),
            &[],
        )?;
        ensure!(got.len() == N, "{} answers for {N}", got.len());
        let ok = got.iter().filter(|(c, _)| *c == 200).count();
        let attempts = flaky_count(&b1)?;
        println!("50% failing upstream: {ok} of {N} succeeded, {attempts} attempts");
        ensure!(
            ok * 100 >= N * 99,
            "only {ok} of {N} requests succeeded with retries (expected >= 99%); e.g. {:?}",
            got.iter().find(|(c, _)| *c != 200)
        );
        ensure!(
            attempts as usize > N + N / 4,
            "the upstream saw {attempts} attempts for {N} requests: hardly any retries"
        );
        let mut l = labels("half", "200");
        l.extend([("source_principal", id_a.as_str()), ("response_flags", "-")]);
        let m_ok = agent1.metric_sum("istio_requests_total", &l)?;
        ensure!(
            m_ok as usize == ok,
            "istio_requests_total{{half, 200, -}} is {m_ok}, curl saw {ok} (retries must not be counted)"
        );

        // 100% failures: retries stop at the budget; the client sees the 503s.
        // Small enough to finish well within the window (retries back off 25 ms and more).
        const M: usize = 150;
        let started = std::time::Instant::now();
        let got = responses(
            &a,
            "down.apps.local",
            &format!("http://{RETRY_VIP_DOWN}:{PORT}/req[1-{M}]"),
            &[],
        )?;
        let elapsed = started.elapsed();
        ensure!(got.len() == M, "{} answers for {M}", got.len());
        let failed = got.iter().filter(|(c, _)| *c == 503).count();
        let attempts = flaky_count(&b2)?;
        let bound =
            M as f64 * (1.0 + BUDGET_RATIO) + (BUDGET_MIN_PER_SECOND * BUDGET_WINDOW_SECS) as f64;
        println!(
            "100% failing upstream: {failed} of {M} got 503, {attempts} attempts (bound {bound}) in {elapsed:?}"
        );
        ensure!(failed == M, "{failed} of {M} requests got 503");
        ensure!(
            elapsed < Duration::from_secs(BUDGET_WINDOW_SECS - 1),
            "the run took {elapsed:?}: longer than the budget window, the bound does not apply"
        );
        ensure!(
            attempts as f64 <= bound,
            "the upstream saw {attempts} attempts for {M} requests: over the budget's {bound}"
        );
        // Positive control: the budget was used (every request could be retried 3 times).
        ensure!(
            attempts as usize >= 2 * M,
            "the upstream saw {attempts} attempts for {M} requests: retries did not use the budget"
        );
        let urx: f64 = agent1
            .samples("istio_requests_total", &labels("down", "503"))?
            .iter()
            .filter(|s| {
                s.labels
                    .iter()
                    .any(|(k, v)| k == "response_flags" && v.split(',').any(|f| f == "URX"))
            })
            .map(|s| s.value)
            .sum();
        ensure!(
            urx as usize == M,
            "istio_requests_total{{down, 503, flags with URX}} is {urx}, expected {M}: {:?}",
            agent1.samples("istio_requests_total", &labels("down", "503"))?
        );
        Ok(())
    })();
    if let Err(e) = result {
        panic!("{e:?}");
    }
}

#[test]
fn per_request_timeout_answers_504_in_time() {
    let result = (|| -> Result<()> {
        let kit = Testkit::new(env!("CARGO_BIN_EXE_mesh-testkit"))?;
        let TwoNodes {
            topology: _topology,
            n1,
            n2,
            trust,
        } = TwoNodes::new()?;
        let a = n1.add_task("a")?;
        let b1 = n2.add_task("b1")?;
        let slow = ServeMode::Slow {
            delay: Duration::from_secs(1),
        };
        let _s1 = kit.serve(&b1, SocketAddr::new(b1.ip().into(), PORT), slow)?;
        let routing = format!(
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

[[routes]]
name = "timed"
virtual_router = "serviceB"
match.prefix = "/"
action.weighted_targets = [{{ virtual_node = "serviceB", weight = 100 }}]
timeout.per_request = "300ms"
"#
        );
        let node1 = MeshConfig::new(&trust)
            .task(&a, "serviceA")
            .raw(&endpoint_section(&b1, "serviceB"))
            .raw(&routing);
        let node2 = MeshConfig::new(&trust)
            .task(&b1, "serviceB")
            .endpoint(&a, "serviceA");
        let agent1 = Agent::start(&n1, &node1.render())?;
        let _agent2 = Agent::start(&n2, &node2.render())?;

        // One request: (status, seconds).
        let timed = |path: &str| -> Result<(u16, f64)> {
            let mut curl = a.command("curl")?;
            curl.args(["-sS", "-o", "/dev/null", "--max-time", "10"])
                .args(["-H", "Host: serviceb.apps.local"])
                .arg(format!("http://{VIP}:{PORT}{path}"))
                .args(["-w", "%{http_code} %{time_total}"]);
            let out = run_with_timeout(&mut curl, Duration::from_secs(15))?;
            let stdout = String::from_utf8_lossy(&out.stdout);
            ensure!(
                out.status.success(),
                "curl {path}: {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let (code, time) = stdout.trim().split_once(' ').context("curl -w output")?;
            Ok((code.parse()?, time.parse()?))
        };
        // Control: the fast path on the same route answers (also warms the tunnel up).
        for _ in 0..3 {
            let (code, time) = timed("/fast")?;
            ensure!(code == 200, "/fast answered {code} after {time}s");
        }
        const SLOW: usize = 3;
        for _ in 0..SLOW {
            let (code, time) = timed("/slow")?;
            println!("/slow: {code} after {time:.3}s");
            ensure!(
                code == 504,
                "/slow answered {code} after {time}s, expected 504"
            );
            ensure!(
                (0.3..=0.4).contains(&time),
                "/slow's 504 came after {time:.3}s, expected 0.3 to 0.4 s"
            );
        }
        let base = [
            ("reporter", "source"),
            ("source_workload", "a"),
            ("destination_workload", "serviceB"),
            ("destination_service", "serviceb.apps.local"),
        ];
        let count_of = |code: &str, flags: &str| {
            let mut l = base.to_vec();
            l.extend([("response_code", code), ("response_flags", flags)]);
            agent1.metric_sum("istio_requests_total", &l)
        };
        let (ut, ok) = (count_of("504", "UT")?, count_of("200", "-")?);
        ensure!(
            ut as usize == SLOW && ok as usize == 3,
            "istio_requests_total: 504/UT {ut} (expected {SLOW}), 200/- {ok} (expected 3): {:?}",
            agent1.samples("istio_requests_total", &base)?
        );
        Ok(())
    })();
    if let Err(e) = result {
        panic!("{e:?}");
    }
}
