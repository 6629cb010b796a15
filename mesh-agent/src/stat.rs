//! `mesh-agent stat`: a live per-hop view of one agent's metrics, like `linkerd viz stat`.
//!
//! Scrapes the agent's OpenMetrics endpoint twice, `--interval` apart, and prints per hop
//! (source workload -> destination workload [destination service]) the success rate, requests
//! per second and p50/p95/p99 latency of `istio_requests_total` and
//! `istio_request_duration_milliseconds_bucket`, then per TCP hop the connections opened and
//! bytes per second of `istio_tcp_*`. The quantiles interpolate linearly within a bucket, as
//! PromQL's `histogram_quantile` does, so they match the Grafana dashboard's.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use clap::{Args, ValueEnum};

const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Args, Debug)]
pub struct StatArgs {
    /// The agent's metrics endpoint: an IP address or `localhost` (host names are not resolved).
    #[arg(long, default_value = "http://127.0.0.1:15020/metrics")]
    metrics_url: String,
    /// Time between the two scrapes; rates are over this window.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Whose view of each hop: the source task's agent (`reporter="source"`) or the destination
    /// task's (`reporter="destination"`: what reached the workload, before the caller's
    /// retries and timeouts are applied).
    #[arg(long, value_enum, default_value_t = By::Source)]
    by: By,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum By {
    Source,
    Destination,
}

impl By {
    fn reporter(self) -> &'static str {
        match self {
            By::Source => "source",
            By::Destination => "destination",
        }
    }
}

pub fn run(args: StatArgs) -> anyhow::Result<()> {
    if args.interval.is_zero() {
        bail!("--interval must be greater than zero");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (before, after, elapsed) = rt.block_on(async {
        let first = scrape(&args.metrics_url).await?;
        let t0 = Instant::now();
        tokio::time::sleep(args.interval).await;
        let second = scrape(&args.metrics_url).await?;
        anyhow::Ok((first, second, t0.elapsed()))
    })?;
    let before = parse(&before).context("parsing the first scrape")?;
    let after = parse(&after).context("parsing the second scrape")?;
    let stats = compute(&before, &after, elapsed.as_secs_f64(), args.by.reporter());
    print!("{}", render(&stats, elapsed));
    Ok(())
}

/// GETs an `http://host:port/path` URL and returns the body as text.
async fn scrape(url: &str) -> anyhow::Result<String> {
    tokio::time::timeout(SCRAPE_TIMEOUT, scrape_inner(url))
        .await
        .map_err(|_| anyhow!("GET {url} timed out after {SCRAPE_TIMEOUT:?}"))?
}

async fn scrape_inner(url: &str) -> anyhow::Result<String> {
    let (addr, path) = metrics_address(url)?;
    let (status, body) = crate::http_client::get(addr, &path, SCRAPE_TIMEOUT).await?;
    if !status.is_success() {
        bail!("GET {url}: {status}");
    }
    let out = body.to_vec();
    String::from_utf8(out).with_context(|| format!("the answer from {url} is not UTF-8"))
}

/// The address and path of the metrics URL. The metrics endpoint listens on loopback by
/// default; where it is opened to the VPC, the instance's IP address is what Prometheus' ECS
/// discovery reports too, so taking no host names costs the operator nothing.
fn metrics_address(url: &str) -> anyhow::Result<(SocketAddr, String)> {
    let (addr, uri) = crate::http_client::http_address(url, "http://10.0.1.10:15020/metrics")?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    Ok((addr, path))
}

/// One sample line of the text exposition.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    /// In exposition order.
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses the sample lines of Prometheus / OpenMetrics text (`# HELP`, `# TYPE`, `# EOF` and
/// blank lines are skipped; a timestamp or exemplar after the value is ignored).
pub fn parse(text: &str) -> anyhow::Result<Vec<Sample>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        out.push(parse_line(line).with_context(|| format!("line {}: `{line}`", n + 1))?);
    }
    Ok(out)
}

fn parse_line(line: &str) -> anyhow::Result<Sample> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_ascii_whitespace())
        .ok_or_else(|| anyhow!("no value"))?;
    let name = &line[..name_end];
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        bail!("bad metric name `{name}`");
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        let close;
        loop {
            // Skip separators.
            while let Some(&(_, c)) = chars.peek() {
                if c == ',' || c.is_ascii_whitespace() {
                    chars.next();
                } else {
                    break;
                }
            }
            let Some(&(start, c)) = chars.peek() else {
                bail!("unterminated label set");
            };
            if c == '}' {
                close = start;
                break;
            }
            let mut key_end = start;
            while let Some(&(i, c)) = chars.peek() {
                if c == '=' {
                    key_end = i;
                    break;
                }
                chars.next();
            }
            let key = inner[start..key_end].trim();
            if key.is_empty() || chars.next().is_none() {
                bail!("bad label");
            }
            while chars.peek().is_some_and(|&(_, c)| c.is_ascii_whitespace()) {
                chars.next();
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                bail!("label `{key}`: value is not quoted");
            }
            let mut value = String::new();
            loop {
                match chars.next() {
                    None => bail!("label `{key}`: unterminated value"),
                    Some((_, '"')) => break,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c)) => value.push(c),
                        None => bail!("label `{key}`: unterminated escape"),
                    },
                    Some((_, c)) => value.push(c),
                }
            }
            labels.push((key.to_owned(), value));
        }
        rest = &inner[close + 1..];
    }
    let value = rest
        .split_ascii_whitespace()
        .next()
        .ok_or_else(|| anyhow!("no value"))?;
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value: parse_value(value)?,
    })
}

fn parse_value(s: &str) -> anyhow::Result<f64> {
    Ok(match s {
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        _ => s.parse().map_err(|_| anyhow!("bad value `{s}`"))?,
    })
}

/// `histogram_quantile(q, ...)` over one histogram's cumulative buckets `(le, count)`, sorted
/// by `le` and ending with `+Inf`: linear interpolation within the bucket the rank falls in
/// (from 0 for the first bucket); the highest finite bound if the rank falls in `+Inf`.
/// `None` without observations.
pub fn histogram_quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let &(last_le, total) = buckets.last()?;
    if last_le != f64::INFINITY || total <= 0.0 || q.is_nan() {
        return None;
    }
    if q < 0.0 {
        return Some(f64::NEG_INFINITY);
    }
    if q > 1.0 {
        return Some(f64::INFINITY);
    }
    let rank = q * total;
    let i = buckets.iter().position(|&(_, c)| c >= rank)?;
    if i == buckets.len() - 1 {
        // Prometheus returns the upper bound of the highest finite bucket.
        return Some(if i == 0 { 0.0 } else { buckets[i - 1].0 });
    }
    let (end, count) = buckets[i];
    let (start, below) = if i == 0 {
        if end <= 0.0 {
            return Some(end);
        }
        (0.0, 0.0)
    } else {
        buckets[i - 1]
    };
    let in_bucket = count - below;
    if in_bucket <= 0.0 {
        return Some(end);
    }
    Some(start + (end - start) * (rank - below) / in_bucket)
}

/// One hop: source workload, destination workload, destination service (`-` for TCP).
pub type Hop = (String, String, String);

#[derive(Debug, Default, PartialEq)]
pub struct HttpRow {
    pub requests: f64,
    pub failures: f64,
    /// Cumulative `(le, count)` deltas summed over the hop's series.
    pub buckets: Vec<(f64, f64)>,
}

impl HttpRow {
    /// The non-5xx share, `None` without requests.
    pub fn success_rate(&self) -> Option<f64> {
        (self.requests > 0.0).then(|| (self.requests - self.failures) / self.requests)
    }
}

#[derive(Debug, Default, PartialEq)]
pub struct TcpRow {
    pub opened: f64,
    /// Source to destination.
    pub received_bytes: f64,
    /// Destination back to source.
    pub sent_bytes: f64,
}

#[derive(Debug, Default, PartialEq)]
pub struct Stats {
    pub seconds: f64,
    pub http: BTreeMap<Hop, HttpRow>,
    pub tcp: BTreeMap<Hop, TcpRow>,
}

fn series_key(s: &Sample) -> (String, Vec<(String, String)>) {
    let mut labels = s.labels.clone();
    labels.sort();
    (s.name.clone(), labels)
}

/// The increase of each counter series between two scrapes (a series that went down was reset
/// and counts from 0; one absent from the first scrape is new and counts from 0).
fn deltas<'a>(before: &[Sample], after: &'a [Sample]) -> Vec<(&'a Sample, f64)> {
    let old: BTreeMap<_, f64> = before.iter().map(|s| (series_key(s), s.value)).collect();
    after
        .iter()
        .map(|s| {
            let prev = old.get(&series_key(s)).copied().unwrap_or(0.0);
            let d = if s.value >= prev {
                s.value - prev
            } else {
                s.value
            };
            (s, d)
        })
        .collect()
}

/// The per-hop table from two scrapes `seconds` apart, for one reporter's series.
pub fn compute(before: &[Sample], after: &[Sample], seconds: f64, reporter: &str) -> Stats {
    let mut stats = Stats {
        seconds,
        ..Stats::default()
    };
    let mut buckets: BTreeMap<Hop, BTreeMap<u64, (f64, f64)>> = BTreeMap::new();
    for (s, d) in deltas(before, after) {
        if s.label("reporter") != Some(reporter) {
            continue;
        }
        let src = s.label("source_workload").unwrap_or("unknown").to_owned();
        let dst = s
            .label("destination_workload")
            .unwrap_or("unknown")
            .to_owned();
        let svc = s.label("destination_service").unwrap_or("-").to_owned();
        match s.name.as_str() {
            "istio_requests_total" => {
                let row = stats.http.entry((src, dst, svc)).or_default();
                row.requests += d;
                if s.label("response_code").is_some_and(|c| c.starts_with('5')) {
                    row.failures += d;
                }
            }
            "istio_request_duration_milliseconds_bucket" => {
                let Some(le) = s.label("le").and_then(|v| parse_value(v).ok()) else {
                    continue;
                };
                // Keyed by the bound's bits: the bounds are positive, so bit order is numeric order.
                let b = buckets.entry((src, dst, svc)).or_default();
                b.entry(le.to_bits()).or_insert((le, 0.0)).1 += d;
            }
            "istio_tcp_connections_opened_total" => {
                stats.tcp.entry((src, dst, svc)).or_default().opened += d;
            }
            "istio_tcp_received_bytes_total" => {
                stats.tcp.entry((src, dst, svc)).or_default().received_bytes += d;
            }
            "istio_tcp_sent_bytes_total" => {
                stats.tcp.entry((src, dst, svc)).or_default().sent_bytes += d;
            }
            _ => {}
        }
    }
    for (hop, b) in buckets {
        let mut b: Vec<(f64, f64)> = b.into_values().collect();
        b.sort_by(|x, y| x.0.total_cmp(&y.0));
        stats.http.entry(hop).or_default().buckets = b;
    }
    stats
}

fn pct(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{:.2}%", v * 100.0))
}

fn ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.0}ms"))
}

fn bytes_per_sec(b: f64) -> String {
    match b {
        b if b >= 1e9 => format!("{:.1}GB/s", b / 1e9),
        b if b >= 1e6 => format!("{:.1}MB/s", b / 1e6),
        b if b >= 1e3 => format!("{:.1}kB/s", b / 1e3),
        b => format!("{b:.0}B/s"),
    }
}

fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            if i == 0 {
                let _ = write!(s, "{cell:<w$}");
            } else {
                let _ = write!(s, "  {cell:>w$}");
            }
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// The two tables; a section with no hops says so.
pub fn render(stats: &Stats, window: Duration) -> String {
    let secs = stats.seconds.max(f64::MIN_POSITIVE);
    let mut out = format!("over {:.1}s\n\n", window.as_secs_f64());
    let http: Vec<Vec<String>> = stats
        .http
        .iter()
        .map(|((src, dst, svc), r)| {
            let q = |q| histogram_quantile(q, &r.buckets);
            vec![
                format!("{src} -> {dst} [{svc}]"),
                pct(r.success_rate()),
                format!("{:.2}", r.requests / secs),
                ms(q(0.5)),
                ms(q(0.95)),
                ms(q(0.99)),
            ]
        })
        .collect();
    if http.is_empty() {
        out.push_str("HTTP: no request series\n");
    } else {
        out.push_str(&table(
            &["HTTP HOP", "SUCCESS", "RPS", "P50", "P95", "P99"],
            &http,
        ));
    }
    out.push('\n');
    let tcp: Vec<Vec<String>> = stats
        .tcp
        .iter()
        .map(|((src, dst, _), r)| {
            vec![
                format!("{src} -> {dst}"),
                format!("{:.0}", r.opened),
                format!("{:.2}", r.opened / secs),
                bytes_per_sec(r.received_bytes / secs),
                bytes_per_sec(r.sent_bytes / secs),
            ]
        })
        .collect();
    if tcp.is_empty() {
        out.push_str("TCP: no connection series\n");
    } else {
        out.push_str(&table(
            &["TCP HOP", "OPENED", "CONN/S", "REQ BYTES/S", "RESP BYTES/S"],
            &tcp,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_urls_name_an_ip_or_localhost() {
        for (url, addr, path) in [
            (
                "http://127.0.0.1:15020/metrics",
                "127.0.0.1:15020",
                "/metrics",
            ),
            (
                "http://localhost:15020/metrics",
                "127.0.0.1:15020",
                "/metrics",
            ),
            (
                "http://LocalHost/metrics?x=1",
                "127.0.0.1:80",
                "/metrics?x=1",
            ),
            ("http://[::1]:15020/metrics", "[::1]:15020", "/metrics"),
            ("http://10.0.1.10:15020", "10.0.1.10:15020", "/"),
        ] {
            let (got_addr, got_path) = metrics_address(url).unwrap();
            assert_eq!(got_addr, addr.parse().unwrap(), "{url}");
            assert_eq!(got_path, path, "{url}");
        }
        let err = metrics_address("http://ip-10-0-1-10.ec2.internal:15020/metrics")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("the host must be an IP address or localhost"),
            "{err}"
        );
        for bad in [
            "https://127.0.0.1:15020/metrics",
            "127.0.0.1:15020",
            "nonsense",
        ] {
            assert!(metrics_address(bad).is_err(), "{bad}");
        }
    }

    fn s(name: &str, labels: &[(&str, &str)], value: f64) -> Sample {
        Sample {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            value,
        }
    }

    #[test]
    fn parses_openmetrics_text() {
        let text = r#"# HELP istio_requests Requests.
# TYPE istio_requests counter
istio_requests_total{reporter="source",source_workload="a",response_code="200"} 7
mesh_tasks_meshed 3
istio_request_duration_milliseconds_bucket{reporter="source",le="0.5"} 1
istio_request_duration_milliseconds_bucket{reporter="source",le="+Inf"} 4
odd{a="x\"y\\z\nw",b="",} 1.5e3 1700000000
spaced{ a = "1" } -Inf
# EOF
"#;
        let got = parse(text).unwrap();
        assert_eq!(
            got,
            vec![
                s(
                    "istio_requests_total",
                    &[
                        ("reporter", "source"),
                        ("source_workload", "a"),
                        ("response_code", "200")
                    ],
                    7.0
                ),
                s("mesh_tasks_meshed", &[], 3.0),
                s(
                    "istio_request_duration_milliseconds_bucket",
                    &[("reporter", "source"), ("le", "0.5")],
                    1.0
                ),
                s(
                    "istio_request_duration_milliseconds_bucket",
                    &[("reporter", "source"), ("le", "+Inf")],
                    4.0
                ),
                s("odd", &[("a", "x\"y\\z\nw"), ("b", "")], 1500.0),
                s("spaced", &[("a", "1")], f64::NEG_INFINITY),
            ]
        );
    }

    #[test]
    fn rejects_malformed_lines() {
        for bad in [
            "novalue",
            "x{a=\"1\" 3",
            "x{a=1} 3",
            "x{a=\"1} 3",
            "x{a=\"1\"}",
            "x 1x",
            "bad-name 1",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_prometheus_client_output() {
        use prometheus_client::metrics::family::Family;
        use prometheus_client::metrics::histogram::Histogram;
        let labels = crate::metrics::RequestLabels {
            reporter: "source",
            source_workload: "a".into(),
            source_version: "7".into(),
            source_principal: "spiffe://td/a".into(),
            destination_workload: "b".into(),
            destination_version: "unknown".into(),
            destination_principal: "spiffe://td/b".into(),
            destination_service: "b.local".into(),
            request_protocol: "http",
            response_code: "200".into(),
            grpc_response_status: "".into(),
            response_flags: "-".into(),
            connection_security_policy: "mutual_tls",
        };
        let requests = Family::<
            crate::metrics::RequestLabels,
            prometheus_client::metrics::counter::Counter,
        >::default();
        let durations: Family<_, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new([1.0, 10.0]));
        requests.get_or_create(&labels).inc_by(3);
        durations.get_or_create(&labels).observe(4.0);
        let mut reg = prometheus_client::registry::Registry::default();
        reg.register("istio_requests", "r", requests);
        reg.register("istio_request_duration_milliseconds", "d", durations);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        let samples = parse(&text).unwrap();
        let names: Vec<(&str, Option<&str>, f64)> = samples
            .iter()
            .map(|s| (s.name.as_str(), s.label("le"), s.value))
            .collect();
        assert_eq!(
            names,
            vec![
                ("istio_requests_total", None, 3.0),
                ("istio_request_duration_milliseconds_sum", None, 4.0),
                ("istio_request_duration_milliseconds_count", None, 1.0),
                (
                    "istio_request_duration_milliseconds_bucket",
                    Some("1.0"),
                    0.0
                ),
                (
                    "istio_request_duration_milliseconds_bucket",
                    Some("10.0"),
                    1.0
                ),
                (
                    "istio_request_duration_milliseconds_bucket",
                    Some("+Inf"),
                    1.0
                ),
            ]
        );
        assert_eq!(samples[0].label("source_principal"), Some("spiffe://td/a"));
        assert_eq!(samples[0].label("grpc_response_status"), Some(""));
        assert_eq!(samples[0].labels.len(), 13);
        assert_eq!(samples[0].label("source_version"), Some("7"));
    }

    #[test]
    fn quantiles_interpolate_like_histogram_quantile() {
        // 10 observations: 2 in (0,10], 6 in (10,100], 2 in (100,+Inf).
        let b = [(10.0, 2.0), (100.0, 8.0), (f64::INFINITY, 10.0)];
        // rank 5: 3 of the 6 in (10,100] -> 10 + 90 * 3/6.
        assert_eq!(histogram_quantile(0.5, &b), Some(55.0));
        // rank 1.25: 1.25 of the 2 in (0,10], from 0.
        assert_eq!(histogram_quantile(0.125, &b), Some(6.25));
        // rank 2.5: 0.5 of the 6 in (10,100] -> 10 + 90 * 0.5/6.
        assert_eq!(histogram_quantile(0.25, &b), Some(17.5));
        // rank 8: the top of (10,100].
        assert_eq!(histogram_quantile(0.8, &b), Some(100.0));
        // rank 9.5 falls in +Inf: the highest finite bound.
        assert_eq!(histogram_quantile(0.95, &b), Some(100.0));
        assert_eq!(histogram_quantile(0.0, &b), Some(0.0));
        assert_eq!(
            histogram_quantile(0.5, &[(10.0, 0.0), (f64::INFINITY, 0.0)]),
            None
        );
        assert_eq!(histogram_quantile(0.5, &[]), None);
        assert_eq!(histogram_quantile(0.5, &[(10.0, 3.0)]), None);
    }

    #[test]
    fn rates_and_quantiles_from_two_scrapes() {
        let hop = |code: &'static str| {
            vec![
                ("reporter", "source"),
                ("source_workload", "a"),
                ("destination_workload", "b-v1"),
                ("destination_service", "b.local"),
                ("response_code", code),
            ]
        };
        let bucket = |code: &'static str, le: &'static str| {
            let mut l = hop(code);
            l.push(("le", le));
            l
        };
        let tcp = vec![
            ("reporter", "source"),
            ("source_workload", "a"),
            ("destination_workload", "c"),
        ];
        let mut tcp_dest = tcp.clone();
        tcp_dest[0] = ("reporter", "destination");
        let r = "istio_requests_total";
        let h = "istio_request_duration_milliseconds_bucket";
        let before = vec![
            s(r, &hop("200"), 100.0),
            s(r, &hop("503"), 10.0),
            s(h, &bucket("200", "5"), 50.0),
            s(h, &bucket("200", "25"), 90.0),
            s(h, &bucket("200", "+Inf"), 100.0),
            s(h, &bucket("503", "5"), 0.0),
            s(h, &bucket("503", "25"), 0.0),
            s(h, &bucket("503", "+Inf"), 10.0),
            s("istio_tcp_connections_opened_total", &tcp, 4.0),
            s("istio_tcp_received_bytes_total", &tcp, 3000.0),
            s("istio_tcp_sent_bytes_total", &tcp, 500.0),
            s("istio_tcp_connections_opened_total", &tcp_dest, 1.0),
        ];
        let after = vec![
            // +190 OK, +10 errors (5 from a series new in the second scrape).
            s(r, &hop("200"), 290.0),
            s(r, &hop("503"), 15.0),
            s(r, &hop("504"), 5.0),
            // OK: +100 in (0,5], +80 in (5,25], +10 in (25,+Inf).
            s(h, &bucket("200", "5"), 150.0),
            s(h, &bucket("200", "25"), 270.0),
            s(h, &bucket("200", "+Inf"), 290.0),
            // 503: +5 in (25,+Inf).
            s(h, &bucket("503", "5"), 0.0),
            s(h, &bucket("503", "25"), 0.0),
            s(h, &bucket("503", "+Inf"), 15.0),
            // 504: 5 in (25,+Inf).
            s(h, &bucket("504", "5"), 0.0),
            s(h, &bucket("504", "25"), 0.0),
            s(h, &bucket("504", "+Inf"), 5.0),
            s("istio_tcp_connections_opened_total", &tcp, 14.0),
            // A reset: the counter restarted from 0 and is now 2000.
            s("istio_tcp_received_bytes_total", &tcp, 2000.0),
            s("istio_tcp_sent_bytes_total", &tcp, 5500.0),
            s("istio_tcp_connections_opened_total", &tcp_dest, 9.0),
        ];
        let stats = compute(&before, &after, 10.0, "source");
        let key = ("a".to_string(), "b-v1".to_string(), "b.local".to_string());
        let row = &stats.http[&key];
        assert_eq!(row.requests, 200.0);
        assert_eq!(row.failures, 10.0);
        assert_eq!(row.success_rate(), Some(0.95));
        assert_eq!(
            row.buckets,
            vec![(5.0, 100.0), (25.0, 180.0), (f64::INFINITY, 200.0)]
        );
        // rank 100 = the top of the first bucket.
        assert_eq!(histogram_quantile(0.5, &row.buckets), Some(5.0));
        // rank 150: 50 of the 80 in (5,25] -> 5 + 20 * 50/80.
        assert_eq!(histogram_quantile(0.75, &row.buckets), Some(17.5));
        // ranks 190 and 198 fall in +Inf: the highest finite bound.
        assert_eq!(histogram_quantile(0.95, &row.buckets), Some(25.0));
        assert_eq!(histogram_quantile(0.99, &row.buckets), Some(25.0));
        let tkey = ("a".to_string(), "c".to_string(), "-".to_string());
        assert_eq!(
            stats.tcp[&tkey],
            TcpRow {
                opened: 10.0,
                received_bytes: 2000.0,
                sent_bytes: 5000.0
            }
        );
        assert_eq!(stats.http.len(), 1);
        assert_eq!(stats.tcp.len(), 1);

        let text = render(&stats, Duration::from_secs(10));
        assert_eq!(
            text,
            "over 10.0s\n\n\
             HTTP HOP             SUCCESS    RPS  P50   P95   P99\n\
             a -> b-v1 [b.local]   95.00%  20.00  5ms  25ms  25ms\n\
             \n\
             TCP HOP  OPENED  CONN/S  REQ BYTES/S  RESP BYTES/S\n\
             a -> c       10    1.00       200B/s        500B/s\n"
        );

        let dest = compute(&before, &after, 10.0, "destination");
        assert!(dest.http.is_empty());
        assert_eq!(dest.tcp[&tkey].opened, 8.0);
    }
}
