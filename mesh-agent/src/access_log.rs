//! The optional JSON access log (`agent.access_log`): one line per request and one per
//! proxied connection, with the labels of the golden metrics plus what metrics must not carry
//! (path, authority, trace context, durations and byte counts of each one).
//!
//! Lines are written by a thread of their own through a bounded queue, so a slow disk never
//! stalls the data path: when the queue is full the line is dropped and counted
//! (`mesh_access_log_dropped_lines_total`).

use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use tracing::warn;

use crate::metrics::{ConnectionEnd, RequestLabels, TcpLabels};

/// Lines waiting for the writer before new ones are dropped.
const QUEUE: usize = 8192;

pub struct AccessLog {
    lines: SyncSender<Vec<u8>>,
    dropped: Counter,
}

/// A request's line: its metric labels and the request's own details.
pub struct RequestEntry<'a> {
    pub labels: &'a RequestLabels,
    pub method: &'a str,
    pub authority: Option<&'a str>,
    pub path: &'a str,
    pub traceparent: Option<&'a str>,
    pub upstream: Option<String>,
    pub duration: Duration,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub retries: u32,
}

#[derive(Serialize)]
struct RequestLine<'a> {
    timestamp: String,
    kind: &'static str,
    #[serde(flatten)]
    labels: &'a RequestLabels,
    method: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    authority: Option<&'a str>,
    path: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    traceparent: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream: Option<String>,
    duration_ms: f64,
    request_bytes: u64,
    response_bytes: u64,
    retries: u32,
}

#[derive(Serialize)]
struct ConnectionLine<'a> {
    timestamp: String,
    kind: &'static str,
    #[serde(flatten)]
    labels: &'a TcpLabels,
    duration_ms: f64,
    received_bytes: u64,
    sent_bytes: u64,
    /// `closed` (a FIN each way) or `reset` (one side failed; the agent reset both).
    end: &'static str,
}

impl AccessLog {
    /// Opens `path` for appending (`/dev/stdout` works too) and starts the writer.
    pub fn open(path: &Path, dropped: Counter) -> io::Result<AccessLog> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(path)?;
        let (lines, queue) = mpsc::sync_channel::<Vec<u8>>(QUEUE);
        let name = path.display().to_string();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(BufWriter::new(file), &queue, &name))?;
        Ok(AccessLog { lines, dropped })
    }

    pub fn request(&self, e: &RequestEntry<'_>) {
        self.send(&RequestLine {
            timestamp: now(),
            kind: "request",
            labels: e.labels,
            method: e.method,
            authority: e.authority,
            path: e.path,
            traceparent: e.traceparent,
            upstream: e.upstream.clone(),
            duration_ms: millis(e.duration),
            request_bytes: e.request_bytes,
            response_bytes: e.response_bytes,
            retries: e.retries,
        });
    }

    pub fn connection(
        &self,
        labels: &TcpLabels,
        duration: Duration,
        received: u64,
        sent: u64,
        end: ConnectionEnd,
    ) {
        self.send(&ConnectionLine {
            timestamp: now(),
            kind: "connection",
            labels,
            duration_ms: millis(duration),
            received_bytes: received,
            sent_bytes: sent,
            end: end.name(),
        });
    }

    fn send(&self, line: &impl Serialize) {
        let Ok(mut bytes) = serde_json::to_vec(line) else {
            return;
        };
        bytes.push(b'\n');
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.lines.try_send(bytes)
        {
            self.dropped.inc();
        }
    }
}

/// Writes until every sender is gone, flushing whenever the queue runs dry.
fn write_lines(mut out: BufWriter<std::fs::File>, queue: &mpsc::Receiver<Vec<u8>>, name: &str) {
    let mut failing = false;
    while let Ok(first) = queue.recv() {
        // Everything queued meanwhile goes out in the same write.
        let written = std::iter::once(first)
            .chain(std::iter::from_fn(|| queue.try_recv().ok()))
            .try_for_each(|line| out.write_all(&line))
            .and_then(|()| out.flush());
        match written {
            Err(e) if !failing => {
                warn!(file = %name, error = %e, "cannot write the access log; lines are lost until it works again");
                failing = true;
            }
            Err(_) => {}
            Ok(()) => failing = false,
        }
    }
    let _ = out.flush();
}

fn now() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string()
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp_labels() -> TcpLabels {
        TcpLabels {
            reporter: "source",
            source_workload: "a".into(),
            source_version: "3".into(),
            source_principal: "spiffe://td/a".into(),
            destination_workload: "b".into(),
            destination_version: "unknown".into(),
            destination_principal: "spiffe://td/b".into(),
            connection_security_policy: "mutual_tls",
        }
    }

    #[test]
    fn writes_one_json_object_per_line_with_the_metric_labels() {
        let dir = std::env::temp_dir().join(format!("mesh-access-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("access.log");
        let dropped = Counter::default();
        let log = AccessLog::open(&path, dropped.clone()).unwrap();
        log.connection(
            &tcp_labels(),
            Duration::from_micros(1500),
            10,
            20,
            ConnectionEnd::Reset,
        );
        let labels = RequestLabels {
            reporter: "destination",
            source_workload: "a".into(),
            source_version: "3".into(),
            source_principal: "spiffe://td/a".into(),
            destination_workload: "b".into(),
            destination_version: "7".into(),
            destination_principal: "spiffe://td/b".into(),
            destination_service: "b.apps.local".into(),
            request_protocol: "http",
            response_code: "200".into(),
            grpc_response_status: String::new(),
            response_flags: "-".into(),
            connection_security_policy: "mutual_tls",
        };
        log.request(&RequestEntry {
            labels: &labels,
            method: "GET",
            authority: Some("b.apps.local"),
            path: "/x",
            traceparent: None,
            upstream: Some("198.18.0.2:80".into()),
            duration: Duration::from_millis(2),
            request_bytes: 0,
            response_bytes: 5,
            retries: 1,
        });
        drop(log);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let text = loop {
            let text = std::fs::read_to_string(&path).unwrap();
            if text.lines().count() == 2 || std::time::Instant::now() > deadline {
                break text;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["kind"], "connection");
        assert_eq!(lines[0]["source_principal"], "spiffe://td/a");
        assert_eq!(lines[0]["duration_ms"], 1.5);
        assert_eq!(lines[0]["sent_bytes"], 20);
        assert_eq!(lines[0]["end"], "reset");
        assert_eq!(lines[1]["kind"], "request");
        assert_eq!(lines[1]["reporter"], "destination");
        assert_eq!(lines[1]["response_code"], "200");
        assert_eq!(lines[1]["path"], "/x");
        assert_eq!(lines[1]["retries"], 1);
        assert!(lines[1].get("traceparent").is_none());
        assert_eq!(dropped.get(), 0);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o640);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
