//! A real Prometheus server (Debian package `prometheus`, `/usr/bin/prometheus`) inside a
//! node's network namespace, scraping mesh agents, and instant queries against its HTTP API
//! (made with curl from the same namespace).
//!
//! The server runs with its own configuration and TSDB under the topology's directory; the
//! package's system service plays no part. It is killed when [`Prometheus`] is dropped (and
//! with the topology's cgroup subtree in any case).

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::process::{Process, run_with_timeout};
use crate::topology::{Node, Topology};

/// Where the Debian package installs the server.
pub const BIN: &str = "/usr/bin/prometheus";

/// One sample of an instant vector: its labels (without `__name__` if absent) and value.
#[derive(Clone, Debug)]
pub struct Sample {
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// A Prometheus server in a node's netns, listening on `127.0.0.1:<port>` there.
pub struct Prometheus {
    node: Node,
    port: u16,
    log: PathBuf,
    process: Process,
}

impl Prometheus {
    /// Starts Prometheus in `node`'s netns scraping `targets` (`host:port`, path `/metrics`)
    /// every `scrape_interval`, and waits until it is ready.
    pub fn start(
        topology: &Topology,
        node: &Node,
        port: u16,
        targets: &[&str],
        scrape_interval: &str,
    ) -> Result<Self> {
        crate::require_tools(&["curl"])?;
        ensure!(
            std::path::Path::new(BIN).exists(),
            "{BIN} not found: the Prometheus tests need the Debian package `prometheus` \
             (apt-get install prometheus)"
        );
        let dir = topology.dir().join(format!("prometheus-{port}"));
        fs::create_dir_all(dir.join("data"))
            .with_context(|| format!("create {}", dir.display()))?;
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: {scrape_interval}\n  scrape_timeout: {scrape_interval}\n  \
             evaluation_interval: {scrape_interval}\nscrape_configs:\n  - job_name: mesh-agent\n    \
             metrics_path: /metrics\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        );
        let config_path = dir.join("prometheus.yml");
        fs::write(&config_path, config)
            .with_context(|| format!("write {}", config_path.display()))?;
        let log = dir.join("prometheus.log");
        let log_file =
            fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let mut command = node.command(BIN)?;
        command
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg("--storage.tsdb.retention.time=1h")
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=info")
            .stdin(std::process::Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        let process = Process::spawn(&mut command)?;
        let mut server = Self {
            node: node.clone(),
            port,
            log,
            process,
        };
        server.wait_ready(Duration::from_secs(20))?;
        Ok(server)
    }

    /// The server's log (stdout and stderr).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.process.try_wait()? {
                bail!("prometheus exited ({status}):\n{}", self.log());
            }
            let mut curl = self.node.command("curl")?;
            curl.args(["-sf", "--max-time", "2"])
                .arg(format!("http://127.0.0.1:{}/-/ready", self.port));
            if run_with_timeout(&mut curl, Duration::from_secs(5))?
                .status
                .success()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("prometheus not ready after {timeout:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The server's version, from `/api/v1/status/buildinfo`.
    pub fn version(&self) -> Result<String> {
        let mut curl = self.node.command("curl")?;
        curl.args(["-sS", "--max-time", "10"]).arg(format!(
            "http://127.0.0.1:{}/api/v1/status/buildinfo",
            self.port
        ));
        let out = run_with_timeout(&mut curl, Duration::from_secs(15))?;
        let body: Value = serde_json::from_slice(&out.stdout).context("buildinfo JSON")?;
        Ok(body["data"]["version"].as_str().unwrap_or("?").to_owned())
    }

    /// `GET /api/v1/query` with `query` at `time` (Unix seconds; `None`: now); the raw `data`
    /// object. Fails on an error status, naming Prometheus's error.
    pub fn query_raw(&self, query: &str, time: Option<f64>) -> Result<Value> {
        let mut curl = self.node.command("curl")?;
        curl.args(["-sS", "--max-time", "10", "-G"])
            .arg(format!("http://127.0.0.1:{}/api/v1/query", self.port))
            .arg("--data-urlencode")
            .arg(format!("query={query}"));
        if let Some(t) = time {
            curl.arg("--data-urlencode").arg(format!("time={t:.3}"));
        }
        let out = run_with_timeout(&mut curl, Duration::from_secs(15))?;
        ensure!(
            out.status.success(),
            "curl to prometheus failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let body: Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "prometheus answered non-JSON: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })?;
        if body["status"] != "success" {
            bail!(
                "query {query:?} failed: {} {}",
                body["errorType"],
                body["error"]
            );
        }
        Ok(body["data"].clone())
    }

    /// An instant query whose result is a vector (or a scalar, returned as one sample
    /// without labels).
    pub fn query(&self, query: &str, time: Option<f64>) -> Result<Vec<Sample>> {
        let data = self.query_raw(query, time)?;
        let number = |v: &Value| -> Result<f64> {
            let s = v[1].as_str().context("sample value is not a string")?;
            // Prometheus writes "+Inf", "-Inf" and "NaN", which Rust parses too.
            s.parse::<f64>()
                .with_context(|| format!("sample value {s:?}"))
        };
        match data["resultType"].as_str() {
            Some("vector") => data["result"]
                .as_array()
                .context("no result array")?
                .iter()
                .map(|r| {
                    let labels = r["metric"]
                        .as_object()
                        .map(|m| {
                            m.iter()
                                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_owned()))
                                .collect()
                        })
                        .unwrap_or_default();
                    Ok(Sample {
                        labels,
                        value: number(&r["value"])?,
                    })
                })
                .collect(),
            Some("scalar") => Ok(vec![Sample {
                labels: Vec::new(),
                value: number(&data["result"])?,
            }]),
            other => bail!("query {query:?}: unexpected result type {other:?}"),
        }
    }
}

/// Now as Unix seconds (the clock Prometheus stamps its samples with: same host).
pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}
