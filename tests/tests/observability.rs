//! The observability artefacts: `deploy/grafana-dashboard.json`, `deploy/prometheus.yml` and the
//! queries documented in `docs/metrics.md`. Reads files only: no root, no agent, no Prometheus.
//!
//! Every dashboard query may only use metric names the agent exports. They are read from the
//! text of `mesh-agent/src/metrics.rs` (the names passed to `reg.register` and to the kernel
//! collector's `encode_descriptor`), with the suffixes prometheus-client's text encoding adds:
//! `_total` for counters, `_bucket`/`_sum`/`_count` for histograms, none for gauges.
//!
//! Neither a YAML nor a regex crate is a dependency of this package, so `deploy/prometheus.yml`
//! is checked with line-based structure checks (indentation, the keys and values the scrape
//! depends on), not parsed as YAML, and metric names are extracted from PromQL with a small
//! tokenizer rather than a regex.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> Result<String> {
    let path = root().join(rel);
    fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))
}

fn dashboard() -> Result<Value> {
    serde_json::from_str(&read("deploy/grafana-dashboard.json")?)
        .context("deploy/grafana-dashboard.json is not valid JSON")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// A string literal at the start of `s` (after whitespace): its value and the rest.
fn string_literal(s: &str) -> Option<(String, &str)> {
    let s = s.trim_start().strip_prefix('"')?;
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, &s[i + 1..])),
            '\\' => out.push(chars.next()?.1),
            c => out.push(c),
        }
    }
    None
}

fn kind_of_type(ty: &str) -> Option<Kind> {
    if ty.contains("Histogram") {
        Some(Kind::Histogram)
    } else if ty.contains("Counter") {
        Some(Kind::Counter)
    } else if ty.contains("Gauge") {
        Some(Kind::Gauge)
    } else {
        None
    }
}

/// The metric families registered in `metrics.rs`, with their kinds.
fn registered_families(src: &str) -> Result<BTreeMap<String, Kind>> {
    // Field types of `struct Metrics`.
    let body = src
        .split_once("pub struct Metrics {")
        .context("no `pub struct Metrics` in metrics.rs")?
        .1;
    let body = &body[..body.find("\n}").context("unterminated struct Metrics")?];
    let mut fields = BTreeMap::new();
    for line in body.lines() {
        let line = line.trim();
        if line.starts_with("//") {
            continue;
        }
        let line = line.strip_prefix("pub ").unwrap_or(line);
        if let Some((name, ty)) = line.split_once(':') {
            fields.insert(name.trim().to_owned(), ty.trim().to_owned());
        }
    }

    let mut families = BTreeMap::new();
    for (_, rest) in src
        .match_indices("reg.register(")
        .map(|(i, _)| src.split_at(i + 13))
    {
        let (name, rest) = string_literal(rest).context("reg.register without a name")?;
        let rest = rest
            .trim_start()
            .strip_prefix(',')
            .context("reg.register(name,")?;
        let (_help, rest) = string_literal(rest).with_context(|| format!("{name}: no help"))?;
        let rest = rest
            .trim_start()
            .strip_prefix(',')
            .context("reg.register(name, help,")?;
        let field: String = rest
            .trim_start()
            .strip_prefix("m.")
            .with_context(|| format!("{name}: the metric is not `m.<field>`"))?
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let ty = fields
            .get(&field)
            .with_context(|| format!("{name}: no field `{field}` in struct Metrics"))?;
        let kind = kind_of_type(ty).with_context(|| format!("{name}: unknown type `{ty}`"))?;
        ensure!(
            families.insert(name.clone(), kind).is_none(),
            "{name} registered twice"
        );
    }
    // Collectors: `encode_descriptor("name", "help", unit, MetricType::X)`.
    for (_, rest) in src
        .match_indices("encode_descriptor(")
        .map(|(i, _)| src.split_at(i + 18))
    {
        let (name, rest) = string_literal(rest).context("encode_descriptor without a name")?;
        let call = &rest[..rest.find(")?").unwrap_or(rest.len())];
        let kind = if call.contains("MetricType::Counter") {
            Kind::Counter
        } else if call.contains("MetricType::Gauge") {
            Kind::Gauge
        } else if call.contains("MetricType::Histogram") {
            Kind::Histogram
        } else {
            bail!("{name}: unknown MetricType");
        };
        families.insert(name, kind);
    }
    Ok(families)
}

/// The sample names the agent's exposition can contain.
fn exported_names() -> Result<BTreeSet<String>> {
    let families = registered_families(&read("mesh-agent/src/metrics.rs")?)?;
    ensure!(
        families.len() >= 30,
        "only {} families found in metrics.rs: is the extraction broken?",
        families.len()
    );
    let mut names = BTreeSet::new();
    for (name, kind) in families {
        let suffixes: &[&str] = match kind {
            Kind::Counter => &["_total"],
            Kind::Gauge => &[""],
            Kind::Histogram => &["_bucket", "_sum", "_count"],
        };
        for s in suffixes {
            names.insert(format!("{name}{s}"));
        }
    }
    Ok(names)
}

/// Identifiers of a PromQL expression outside string literals, each with the next non-space
/// character after it.
fn identifiers(expr: &str) -> Vec<(String, Option<char>)> {
    let mut out = Vec::new();
    let chars: Vec<char> = expr.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                if chars[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' || c == '$' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], '_' | ':' | '$'))
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = chars[i..].iter().copied().find(|c| !c.is_whitespace());
            out.push((word, next));
        } else if c.is_ascii_digit() || c == '.' {
            // Numbers, including durations such as `5m` or `1.5e3`.
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else {
            i += 1;
        }
    }
    out
}

/// The metric names a PromQL expression selects: identifiers that start with `istio_` or
/// `mesh_`, or that are directly followed by a label matcher or range (`{`, `[`).
fn metric_names(expr: &str) -> BTreeSet<String> {
    identifiers(expr)
        .into_iter()
        .filter(|(w, next)| {
            !w.starts_with('$')
                && (w.starts_with("istio_")
                    || w.starts_with("mesh_")
                    || matches!(next, Some('{') | Some('[')))
        })
        .map(|(w, _)| w)
        .collect()
}

/// Every (panel title, expr) of the dashboard, failing on a panel without a query.
fn dashboard_exprs(dash: &Value) -> Result<Vec<(String, String)>> {
    let panels = dash["panels"].as_array().context("no panels")?;
    ensure!(!panels.is_empty(), "the dashboard has no panels");
    let mut out = Vec::new();
    for p in panels {
        let title = p["title"].as_str().context("a panel without a title")?;
        if p["type"] == "row" {
            continue;
        }
        let targets = p["targets"]
            .as_array()
            .with_context(|| format!("panel `{title}` has no targets"))?;
        ensure!(!targets.is_empty(), "panel `{title}` has no targets");
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or("").trim();
            ensure!(!expr.is_empty(), "panel `{title}`: a target without expr");
            out.push((title.to_owned(), expr.to_owned()));
        }
    }
    Ok(out)
}

#[test]
fn metrics_rs_extraction() -> Result<()> {
    let src = r#"
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: Family<RequestLabels, Histogram, fn() -> Histogram>,
    /// Doc.
    pub ecs_tasks: Gauge,
}
fn new() {
    reg.register("istio_requests", "Requests, \"quoted\" (m.x)", m.requests.clone());
    reg.register(
        "istio_request_duration_milliseconds",
        "Duration",
        m.request_duration.clone(),
    );
    reg.register("mesh_ecs_tasks", "Tasks", m.ecs_tasks.clone());
    let mut family = encoder.encode_descriptor(
        "mesh_capture_decisions",
        "Decisions",
        None,
        MetricType::Counter,
    )?;
}
"#;
    let got = registered_families(src)?;
    let want: BTreeMap<String, Kind> = [
        ("istio_requests", Kind::Counter),
        ("istio_request_duration_milliseconds", Kind::Histogram),
        ("mesh_ecs_tasks", Kind::Gauge),
        ("mesh_capture_decisions", Kind::Counter),
    ]
    .into_iter()
    .map(|(n, k)| (n.to_owned(), k))
    .collect();
    assert_eq!(got, want);
    Ok(())
}

#[test]
fn promql_metric_name_extraction() {
    let names = |e: &str| metric_names(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            r#"histogram_quantile(0.99, sum by (le, source_workload) (rate(istio_request_duration_milliseconds_bucket{reporter="source",x="mesh_not_a_metric"}[$__rate_interval])))"#
        ),
        ["istio_request_duration_milliseconds_bucket"]
    );
    assert_eq!(
        names("min(mesh_workload_cert_expiry_timestamp_seconds) - time()"),
        ["mesh_workload_cert_expiry_timestamp_seconds"]
    );
    // A misspelt metric without the usual prefix is still caught by its selector.
    assert_eq!(names("rate(requests_totl[5m]) / 1.5e3"), ["requests_totl"]);
    assert_eq!(
        names(r#"label_join(up, "id", "->", "a", "b")"#),
        Vec::<String>::new()
    );
}

#[test]
fn exported_names_include_suffixes() -> Result<()> {
    let names = exported_names()?;
    for n in [
        "istio_requests_total",
        "istio_request_duration_milliseconds_bucket",
        "istio_request_duration_milliseconds_count",
        "istio_tcp_connections_opened_total",
        "istio_tcp_received_bytes_total",
        "mesh_policy_denials_total",
        "mesh_workload_cert_expiry_timestamp_seconds",
        "mesh_connections_active",
        "mesh_capture_decisions_total",
    ] {
        ensure!(names.contains(n), "{n} is not among the exported names");
    }
    for n in [
        "istio_requests",
        "istio_request_duration_milliseconds_total",
        "mesh_workload_cert_expiry_timestamp_seconds_total",
    ] {
        ensure!(!names.contains(n), "{n} should not be exported");
    }
    Ok(())
}

#[test]
fn dashboard_is_a_grafana_dashboard() -> Result<()> {
    let dash = dashboard()?;
    let schema = dash["schemaVersion"].as_u64().context("no schemaVersion")?;
    ensure!((36..=41).contains(&schema), "schemaVersion {schema}");
    ensure!(dash["title"].as_str().is_some_and(|t| !t.is_empty()));
    ensure!(dash["uid"].as_str().is_some_and(|t| !t.is_empty()));
    let vars = dash["templating"]["list"]
        .as_array()
        .context("no templating")?;
    let ds = vars
        .iter()
        .find(|v| v["type"] == "datasource")
        .context("no data source variable")?;
    ensure!(
        ds["query"] == "prometheus",
        "the data source variable is not Prometheus"
    );
    let var = format!("${{{}}}", ds["name"].as_str().context("unnamed variable")?);

    let panels = dash["panels"].as_array().context("no panels")?;
    let mut ids = BTreeSet::new();
    let mut types = BTreeSet::new();
    for p in panels {
        let title = p["title"].as_str().unwrap_or("?");
        ensure!(
            ids.insert(p["id"].as_u64().context("panel without id")?),
            "duplicate panel id in `{title}`"
        );
        types.insert(p["type"].as_str().context("panel without type")?.to_owned());
        for key in ["x", "y", "w", "h"] {
            ensure!(p["gridPos"][key].is_u64(), "`{title}`: gridPos.{key}");
        }
        ensure!(
            p["gridPos"]["x"].as_u64().unwrap() + p["gridPos"]["w"].as_u64().unwrap() <= 24,
            "`{title}` is wider than the grid"
        );
        ensure!(
            p["datasource"]["uid"] == var.as_str(),
            "`{title}` does not use the {var} data source"
        );
        for t in p["targets"].as_array().into_iter().flatten() {
            ensure!(t["refId"].is_string(), "`{title}`: a target without refId");
            ensure!(
                t["datasource"]["uid"] == var.as_str(),
                "`{title}`: a target does not use {var}"
            );
        }
    }
    for t in ["timeseries", "stat", "nodeGraph"] {
        ensure!(types.contains(t), "no `{t}` panel");
    }

    // The node graph: a nodes and an edges query, and the renames that make their columns the
    // fields the panel reads.
    let graph = panels
        .iter()
        .find(|p| p["type"] == "nodeGraph")
        .context("no node graph")?;
    let refs: BTreeSet<&str> = graph["targets"]
        .as_array()
        .context("node graph targets")?
        .iter()
        .filter_map(|t| t["refId"].as_str())
        .collect();
    ensure!(
        refs == BTreeSet::from(["nodes", "edges"]),
        "node graph refIds {refs:?}"
    );
    let renames = &graph["transformations"][0]["options"]["renameByName"];
    ensure!(renames["source_workload"] == "source");
    ensure!(renames["destination_workload"] == "target");
    ensure!(renames["Value #edges"] == "mainstat");
    ensure!(renames["Value #nodes"] == "mainstat");
    Ok(())
}

#[test]
fn dashboard_queries_use_exported_metrics_only() -> Result<()> {
    let exported = exported_names()?;
    let exprs = dashboard_exprs(&dashboard()?)?;
    ensure!(exprs.len() >= 10, "only {} queries", exprs.len());
    let mut used = BTreeSet::new();
    for (title, expr) in &exprs {
        let names = metric_names(expr);
        ensure!(!names.is_empty(), "`{title}`: `{expr}` selects no metric");
        for n in names {
            ensure!(
                exported.contains(&n),
                "`{title}`: `{n}` is not a metric the agent exports (in `{expr}`)"
            );
            used.insert(n);
        }
        let open = expr.matches('(').count();
        let close = expr.matches(')').count();
        ensure!(
            open == close,
            "`{title}`: unbalanced parentheses in `{expr}`"
        );
    }
    // The panels the brief promises.
    for n in [
        "istio_requests_total",
        "istio_request_duration_milliseconds_bucket",
        "istio_tcp_connections_opened_total",
        "istio_tcp_received_bytes_total",
        "istio_tcp_sent_bytes_total",
        "mesh_policy_denials_total",
        "mesh_workload_cert_expiry_timestamp_seconds",
    ] {
        ensure!(used.contains(n), "no panel uses {n}");
    }
    ensure!(
        exprs
            .iter()
            .any(|(_, e)| e.contains("connection_security_policy=\"mutual_tls\"")),
        "no mTLS share panel"
    );
    Ok(())
}

#[test]
fn dashboard_queries_are_documented() -> Result<()> {
    let docs = read("docs/metrics.md")?;
    for (title, expr) in dashboard_exprs(&dashboard()?)? {
        ensure!(
            docs.contains(&format!("`{expr}`")),
            "`{title}`: `{expr}` is not in docs/metrics.md"
        );
    }
    Ok(())
}

#[test]
fn prometheus_config_structure() -> Result<()> {
    let text = read("deploy/prometheus.yml")?;
    let mut keys = BTreeSet::new();
    let mut commented = String::new();
    for (n, line) in text.lines().enumerate() {
        let n = n + 1;
        ensure!(
            !line.contains('\t'),
            "line {n}: a tab (YAML indents with spaces)"
        );
        ensure!(line == line.trim_end(), "line {n}: trailing whitespace");
        let content = line.trim_start();
        if content.is_empty() {
            continue;
        }
        if let Some(c) = content.strip_prefix('#') {
            commented.push_str(c.trim());
            commented.push('\n');
            continue;
        }
        let indent = line.len() - content.len();
        ensure!(indent % 2 == 0, "line {n}: odd indentation");
        for (open, close) in [('[', ']'), ('{', '}')] {
            ensure!(
                content.matches(open).count() == content.matches(close).count(),
                "line {n}: unbalanced {open}{close}"
            );
        }
        ensure!(
            content.matches('"').count() % 2 == 0,
            "line {n}: unbalanced quotes"
        );
        let item = content.strip_prefix("- ").unwrap_or(content);
        if let Some((key, _)) = item.split_once(':')
            && !key.contains(' ')
            && !key.starts_with('"')
        {
            keys.insert(key.to_owned());
        } else {
            bail!("line {n}: `{content}` is neither `key: value` nor a list item with one");
        }
    }
    for k in [
        "global",
        "scrape_configs",
        "job_name",
        "ec2_sd_configs",
        "port",
        "filters",
        "relabel_configs",
        "source_labels",
        "target_label",
    ] {
        ensure!(keys.contains(k), "no `{k}:` key");
    }
    ensure!(
        text.lines().any(|l| l == "scrape_configs:"),
        "scrape_configs is not top-level"
    );
    ensure!(
        text.contains("  - job_name: mesh-agent\n"),
        "no mesh-agent job"
    );
    ensure!(text.contains("port: 15020\n"), "not scraping port 15020");
    ensure!(text.contains("metrics_path: /metrics\n"));
    ensure!(
        text.contains("name: tag:mesh-agent\n"),
        "no mesh-agent tag filter"
    );
    ensure!(
        text.contains("- source_labels: [__meta_ec2_private_ip]\n        target_label: instance\n"),
        "instance is not relabelled to the private IP"
    );
    ensure!(
        text.contains("replacement: \"${1}:15020\""),
        "the address is not the private IP on 15020"
    );
    ensure!(
        commented.contains("static_configs:"),
        "no commented static_configs example"
    );
    ensure!(
        commented.contains("tag:aws:ecs:clusterName"),
        "no ECS cluster tag example"
    );
    Ok(())
}
