//! The documented PromQL and every query of `deploy/grafana-dashboard.json`, evaluated by a real
//! Prometheus (the Debian package's `/usr/bin/prometheus`, run with its own configuration in
//! node 1's netns) that scrapes both agents of the seed scenario (see `l7.rs`): serviceA (task
//! a, node 1) calls `serviceb.apps.local`, split 75/25 between serviceB (task b1, always 200)
//! and serviceBv2 (task b2, a `flaky` server answering every second request with 503), without
//! retries, so the client sees ~87.5% success. The success rates Prometheus computes must match
//! what curl counted within 1 percentage point, the p99 of the a -> serviceB hop must be a
//! finite positive number, and every dashboard query must return data. A `[[policies]]` entry
//! on node 2 refuses task c (serviceC) so that the policy-denials panel has data too.
//! Plain TCP connections from a straight to b1 give the TCP panels (`reporter="source"`) data:
//! HTTP hops through a virtual service have TCP series on the destination's agent only.
//!
//! Needs root, cgroup v2, iproute2, curl and the `prometheus` package.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use mesh_testbed::mesh::{
    MeshConfig, TwoNodes, endpoint_section, seed_routing, spiffe_id, wait_for,
};
use mesh_testbed::prometheus::{self, Prometheus, Sample};
use mesh_testbed::{Agent, ServeMode, Task, Testkit, run_with_timeout};
use serde_json::Value;

const VIP: &str = "198.18.250.1";
const PORT: u16 = 8080;
const SERVICE: &str = "serviceb.apps.local";
/// Requests of the measured phase.
const REQUESTS: usize = 1600;
/// Inside node 1's netns, so it cannot collide with anything on the host.
const PROMETHEUS_PORT: u16 = 9090;
/// Agent 1 on its own node; agent 2 across link 1 (198.19.1.2 is node 2's end).
const TARGETS: [&str; 2] = ["127.0.0.1:15020", "198.19.1.2:15020"];
/// How long Prometheus may take to show what the agents export (scrape interval 1s).
const SCRAPE_LAG: Duration = Duration::from_secs(10);

/// `n` requests to the virtual service from `task` over one keep-alive connection: each as
/// (status code, body's first line).
fn requests(task: &Task, n: usize) -> Result<Vec<(u16, String)>> {
    let mut curl = task.command("curl")?;
    curl.args(["-sS", "--max-time", "60", "-H"])
        .arg(format!("Host: {SERVICE}"))
        .arg(format!("http://{VIP}:{PORT}/req[1-{n}]"))
        .args(["-w", "\ncode=%{http_code}\n"]);
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
    ensure!(all.len() == n, "{} answers for {n} requests", all.len());
    Ok(all)
}

/// What the client saw, per virtual node: (non-5xx, all). serviceB's server always answers
/// 200 with `peer=<its ip>:...`; serviceBv2's answers 200 the same way or 503, so every 5xx is
/// serviceBv2's.
#[derive(Default, Debug, Clone, Copy)]
struct Seen {
    b1_ok: usize,
    b1_all: usize,
    b2_ok: usize,
    b2_all: usize,
}

impl Seen {
    fn add(&mut self, answers: &[(u16, String)], b1: &Task, b2: &Task) -> Result<()> {
        let (p1, p2) = (format!("peer={}:", b1.ip()), format!("peer={}:", b2.ip()));
        for (code, body) in answers {
            match *code {
                200 if body.starts_with(&p1) => {
                    self.b1_ok += 1;
                    self.b1_all += 1;
                }
                200 if body.starts_with(&p2) => {
                    self.b2_ok += 1;
                    self.b2_all += 1;
                }
                503 => self.b2_all += 1,
                _ => bail!("unexpected answer {code} {body:?}"),
            }
        }
        Ok(())
    }

    fn total(&self) -> usize {
        self.b1_all + self.b2_all
    }

    fn ok(&self) -> usize {
        self.b1_ok + self.b2_ok
    }

    fn since(&self, before: &Seen) -> Seen {
        Seen {
            b1_ok: self.b1_ok - before.b1_ok,
            b1_all: self.b1_all - before.b1_all,
            b2_ok: self.b2_ok - before.b2_ok,
            b2_all: self.b2_all - before.b2_all,
        }
    }
}

fn pct(ok: usize, all: usize) -> f64 {
    ok as f64 * 100.0 / all as f64
}

/// One request from task c straight to b1, which node 2's policy refuses. b1's port is
/// declared `http` (virtual node serviceB), so c's agent answers it: 403, Envoy's RBAC reply.
fn denied_connection(c: &Task, b1: &Task) -> Result<()> {
    let mut curl = c.command("curl")?;
    curl.args(["-sS", "--max-time", "5", "-w", " %{http_code}"])
        .arg(format!("http://{}:{PORT}/", b1.ip()));
    let out = run_with_timeout(&mut curl, Duration::from_secs(10))?;
    let answer = String::from_utf8_lossy(&out.stdout);
    ensure!(
        answer.trim() == "RBAC: access denied 403",
        "task c's request to b1 was not refused by the policy: {answer:?}"
    );
    Ok(())
}

/// One plain (TCP, no virtual service) meshed connection from task a straight to b1, which
/// node 2's policy allows. HTTP requests routed through a virtual service are reported as TCP
/// only by the destination's agent (`reporter="destination"`), so the dashboard's TCP panels,
/// which select `reporter="source"`, need such a hop to have data.
fn direct_connection(a: &Task, b1: &Task) -> Result<()> {
    let mut curl = a.command("curl")?;
    curl.args(["-sS", "--max-time", "5"])
        .arg(format!("http://{}:{PORT}/direct", b1.ip()));
    let out = run_with_timeout(&mut curl, Duration::from_secs(10))?;
    ensure!(
        out.status.success(),
        "task a could not reach b1 directly: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The single value of a query that must return exactly one sample.
fn single(prom: &Prometheus, query: &str, time: Option<f64>) -> Result<f64> {
    let samples = prom.query(query, time)?;
    ensure!(
        samples.len() == 1,
        "{query}: expected one sample, got {samples:?}"
    );
    Ok(samples[0].value)
}

/// Waits until `query` (one sample) satisfies `ok`; returns the value.
fn wait_value(prom: &Prometheus, query: &str, ok: impl Fn(f64) -> bool) -> Result<f64> {
    wait_for(query, SCRAPE_LAG, || {
        Ok(match prom.query(query, None)?.as_slice() {
            [s] if ok(s.value) => Ok(s.value),
            other => Err(format!("{other:?}")),
        })
    })
}

/// Every `expr` of the dashboard's panels (also panels nested in rows), with the panel title.
fn dashboard_queries() -> Result<Vec<(String, String)>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana-dashboard.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let dashboard: Value = serde_json::from_str(&text).context("dashboard JSON")?;
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        for panel in panels.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("?").to_owned();
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    let ref_id = target["refId"].as_str().unwrap_or("?");
                    out.push((format!("{title} [{ref_id}]"), expr.to_owned()));
                }
            }
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    ensure!(!out.is_empty(), "no queries in the dashboard");
    Ok(out)
}

/// Grafana's variables replaced by concrete values: `$__rate_interval` (and the other
/// interval/range variables) by the measured window. `$1` in `label_replace` is PromQL's own.
fn substitute(expr: &str, window: &str) -> Result<String> {
    let mut out = expr.to_owned();
    for var in [
        "$__rate_interval",
        "$__interval",
        "$__range",
        "${__rate_interval}",
        "${__interval}",
        "${__range}",
    ] {
        out = out.replace(var, window);
    }
    ensure!(
        !out.contains("$__") && !out.contains("${"),
        "unknown Grafana variable left in {out}"
    );
    Ok(out)
}

fn finds<'a>(samples: &'a [Sample], labels: &[(&str, &str)]) -> Option<&'a Sample> {
    samples
        .iter()
        .find(|s| labels.iter().all(|(k, v)| s.label(k) == Some(*v)))
}

#[test]
fn prometheus_evaluates_the_documented_queries_and_every_dashboard_panel() {
    let result = (|| -> Result<()> {
        let started = Instant::now();
        let kit = Testkit::new(env!("CARGO_BIN_EXE_mesh-testkit"))?;
        mesh_testbed::require_tools(&["curl"])?;
        let TwoNodes {
            topology,
            n1,
            n2,
            trust,
        } = TwoNodes::new()?;
        let a = n1.add_task("a")?;
        let c = n1.add_task("c")?;
        let b1 = n2.add_task("b1")?;
        let b2 = n2.add_task("b2")?;
        let _s1 = kit.serve(&b1, SocketAddr::new(b1.ip().into(), PORT), ServeMode::Http)?;
        let _s2 = kit.serve(
            &b2,
            SocketAddr::new(b2.ip().into(), PORT),
            ServeMode::Flaky { fail_percent: 50 },
        )?;
        let node1 = MeshConfig::new(&trust)
            .task(&a, "serviceA")
            .task(&c, "serviceC")
            .raw(&endpoint_section(&b1, "serviceB"))
            .raw(&endpoint_section(&b2, "serviceBv2"))
            .raw(&seed_routing(VIP, PORT, 75, 25));
        // Only serviceA may reach b1: c's direct connections are denied (and counted).
        let node2 = MeshConfig::new(&trust)
            .task(&b1, "serviceB")
            .task(&b2, "serviceBv2")
            .endpoint(&a, "serviceA")
            .endpoint(&c, "serviceC")
            .policy("b1", &[PORT], &[&spiffe_id("serviceA")]);
        let agent1 = Agent::start(&n1, &node1.render())?;
        let agent2 = Agent::start(&n2, &node2.render())?;
        let prom = Prometheus::start(&topology, &n1, PROMETHEUS_PORT, &TARGETS, "1s")?;
        let version = prom.version()?;
        println!(
            "prometheus {} up after {:.1}s",
            version,
            started.elapsed().as_secs_f64()
        );
        wait_value(&prom, "sum(up)", |v| v == 2.0)
            .with_context(|| format!("both agents scraped\n{}", prom.log()))?;

        // Warm-up: every request series (serviceB 200, serviceBv2 200 and 503) and the denial
        // series must exist before the measured window starts, since a counter's first sample
        // is not an increase.
        let mut seen = Seen::default();
        for round in 0.. {
            seen.add(&requests(&a, 20)?, &b1, &b2)?;
            if seen.b1_ok > 0 && seen.b2_ok > 0 && seen.b2_all > seen.b2_ok {
                break;
            }
            ensure!(round < 10, "warm-up never reached serviceBv2: {seen:?}");
        }
        denied_connection(&c, &b1)?;
        direct_connection(&a, &b1)?;
        agent2.wait_metric_sum(
            "mesh_policy_denials_total",
            &[("reporter", "destination")],
            SCRAPE_LAG,
            |v| v >= 1.0,
        )?;
        let requests_sum = format!(
            "sum(istio_requests_total{{reporter=\"source\",destination_service=\"{SERVICE}\"}})"
        );
        let warm = seen;
        wait_value(&prom, &requests_sum, |v| v == warm.total() as f64)?;
        wait_value(
            &prom,
            "sum(mesh_policy_denials_total{reporter=\"destination\"})",
            |v| v >= 1.0,
        )?;
        // The newest scrape of agent 1 has the warm-up's final counts: the window starts there.
        let t0 = single(
            &prom,
            &format!(
                "max(timestamp(istio_requests_total{{reporter=\"source\",destination_service=\"{SERVICE}\"}}))"
            ),
            None,
        )?;

        // The measured traffic, and more denials within the window.
        let traffic = Instant::now();
        seen.add(&requests(&a, REQUESTS)?, &b1, &b2)?;
        for _ in 0..3 {
            denied_connection(&c, &b1)?;
            direct_connection(&a, &b1)?;
        }
        let measured = seen.since(&warm);
        println!(
            "client: {} requests in {:.1}s, {} ok ({:.2}%); serviceB {}/{}, serviceBv2 {}/{}",
            measured.total(),
            traffic.elapsed().as_secs_f64(),
            measured.ok(),
            pct(measured.ok(), measured.total()),
            measured.b1_ok,
            measured.b1_all,
            measured.b2_ok,
            measured.b2_all
        );
        ensure!(
            measured.b2_all > 0 && measured.b2_ok < measured.b2_all,
            "no failures from serviceBv2 in the measured traffic: {measured:?}"
        );
        let total = seen.total();
        wait_value(&prom, &requests_sum, |v| v == total as f64)?;
        wait_value(
            &prom,
            "sum(mesh_policy_denials_total{reporter=\"destination\"})",
            |v| v >= 4.0,
        )?;
        // One more scrape of both agents, so every series has a sample after the traffic.
        std::thread::sleep(Duration::from_millis(1200));
        let t1 = (prometheus::now() * 1000.0).floor() / 1000.0;
        // From 1 ms before the warm-up's last sample: that sample is the first in the window
        // and the extrapolation to the window's start is negligible.
        let window_ms = ((t1 - t0) * 1000.0).round() as u64 + 1;
        let window = format!("{window_ms}ms");
        println!("window {window} (t0 {t0:.3}, t1 {t1:.3})");

        // docs/metrics.md, "Requests": success rate per destination version, `[1m]` -> window.
        let per_version = prom.query(
            &format!(
                "sum by (destination_workload) (rate(istio_requests_total{{reporter=\"source\",destination_service=\"serviceb.apps.local\",response_code!~\"5..\"}}[{window}])) \
                 / sum by (destination_workload) (rate(istio_requests_total{{reporter=\"source\",destination_service=\"serviceb.apps.local\"}}[{window}]))"
            ),
            Some(t1),
        )?;
        for (workload, ok, all) in [
            ("serviceB", measured.b1_ok, measured.b1_all),
            ("serviceBv2", measured.b2_ok, measured.b2_all),
        ] {
            let got = finds(&per_version, &[("destination_workload", workload)])
                .with_context(|| format!("no success rate for {workload}: {per_version:?}"))?
                .value
                * 100.0;
            let want = pct(ok, all);
            println!("success rate {workload}: prometheus {got:.3}%, client {want:.3}%");
            ensure!(
                (got - want).abs() <= 1.0,
                "success rate of {workload}: prometheus {got:.3}%, client {want:.3}%"
            );
        }

        // The dashboard's "Success rate per service": the overall rate the client saw.
        let overall = prom.query(
            &substitute(
                "sum by (destination_service) (rate(istio_requests_total{reporter=\"source\",response_code!~\"5..\"}[$__rate_interval])) / sum by (destination_service) (rate(istio_requests_total{reporter=\"source\"}[$__rate_interval]))",
                &window,
            )?,
            Some(t1),
        )?;
        let got = finds(&overall, &[("destination_service", SERVICE)])
            .with_context(|| format!("no overall success rate: {overall:?}"))?
            .value
            * 100.0;
        let want = pct(measured.ok(), measured.total());
        println!("success rate {SERVICE}: prometheus {got:.3}%, client {want:.3}%");
        ensure!(
            (got - want).abs() <= 1.0,
            "success rate of {SERVICE}: prometheus {got:.3}%, client {want:.3}%"
        );

        // docs/metrics.md, "Requests": p99 latency per hop, for a -> serviceB.
        let p99 = prom.query(
            &format!(
                "histogram_quantile(0.99, sum by (le, source_workload, destination_workload) (rate(istio_request_duration_milliseconds_bucket{{reporter=\"source\"}}[{window}])))"
            ),
            Some(t1),
        )?;
        let hop = finds(
            &p99,
            &[
                ("source_workload", "a"),
                ("destination_workload", "serviceB"),
            ],
        )
        .with_context(|| format!("no p99 for a -> serviceB: {p99:?}"))?
        .value;
        println!("p99 a -> serviceB: {hop:.3} ms");
        ensure!(
            hop.is_finite() && hop > 0.0,
            "p99 of a -> serviceB is {hop}"
        );

        // Every dashboard query returns data.
        let mut empty = Vec::new();
        let mut seen_exprs = BTreeSet::new();
        for (panel, expr) in dashboard_queries()? {
            let query = substitute(&expr, &window)?;
            let samples = prom
                .query(&query, Some(t1))
                .with_context(|| format!("panel {panel}"))?;
            println!(
                "panel {panel}: {} sample(s), e.g. {:?}",
                samples.len(),
                samples.first().map(|s| (&s.labels, s.value))
            );
            if samples.is_empty() {
                empty.push(panel);
            }
            seen_exprs.insert(expr);
        }
        if !empty.is_empty() {
            let tcp: Vec<String> = agent1
                .metrics()?
                .lines()
                .filter(|l| l.starts_with("istio_tcp"))
                .map(str::to_owned)
                .collect();
            let raw = prom.query("{__name__=~\"istio_tcp.*\"}", Some(t1))?;
            bail!(
                "dashboard panels without data: {empty:?}\nagent 1's TCP series:\n{}\nin prometheus: {raw:?}",
                tcp.join("\n")
            );
        }
        println!(
            "{} dashboard queries evaluated; test took {:.1}s",
            seen_exprs.len(),
            started.elapsed().as_secs_f64()
        );
        Ok(())
    })();
    if let Err(e) = result {
        panic!("{e:?}");
    }
}
