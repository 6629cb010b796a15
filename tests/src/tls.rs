//! Probing a mutual-TLS listener with `openssl s_client`, as an outside client would:
//! with or without a client certificate, TLS 1.2 or 1.3, offering ALPN `h2`.
//!
//! The probe completes the handshake, sends the HTTP/2 client preface and an empty
//! SETTINGS frame, and waits for the server's SETTINGS frame. Its verdict is
//! [`Verdict::AcceptedHttp2`] only when that frame arrives: the handshake was accepted and
//! the server spoke HTTP/2 over it. A server that refuses the client (an alert during the
//! handshake, or, in TLS 1.3, after the client's Finished, which the client only sees on
//! its first read; or a closed connection) before any application data gives
//! [`Verdict::Rejected`]. Neither within the timeout gives [`Verdict::NoVerdict`].
//!
//! What OpenSSL 3.0 `s_client -brief` prints, and what this parses (stderr):
//! ```text
//! CONNECTION ESTABLISHED                  <- handshake done (client side)
//! Protocol version: TLSv1.3
//! Verification: OK                        <- the server's chain against -CAfile
//! ...:ssl3_read_bytes:tlsv13 alert certificate required:...:SSL alert number 116
//! ```
//! With `-brief` (which implies `-quiet`), stdout carries nothing but the application
//! data received, so the server's first HTTP/2 frame is found by its bytes.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::pki::CertFiles;
use crate::process::Process;

/// The HTTP/2 client connection preface followed by an empty SETTINGS frame.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsVersion {
    Tls12,
    Tls13,
}

/// One `openssl s_client` connection attempt.
#[derive(Clone, Debug)]
pub struct TlsProbe {
    addr: SocketAddr,
    client: Option<CertFiles>,
    version: TlsVersion,
    alpn: Option<String>,
    ca_file: Option<PathBuf>,
    timeout: Duration,
}

/// What the server did with the probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The handshake completed and the server answered the HTTP/2 preface with SETTINGS.
    AcceptedHttp2,
    /// The connection ended (alert, close or reset) before any application data arrived.
    Rejected,
    /// Application data arrived, but not an HTTP/2 SETTINGS frame.
    AcceptedOther,
    /// Nothing conclusive within the timeout (the server neither answered nor closed).
    NoVerdict,
}

/// The probe's verdict with the evidence.
#[derive(Clone, Debug)]
pub struct ProbeReport {
    pub verdict: Verdict,
    /// `CONNECTION ESTABLISHED` was printed: the client finished its handshake. In TLS 1.3
    /// this is true also when the server rejects the client's certificate afterwards.
    pub handshake_completed: bool,
    /// `TLSv1.3`, ... as negotiated.
    pub protocol: Option<String>,
    /// The alert the server sent, e.g. `(116, "tlsv13 alert certificate required")`.
    pub alert: Option<(u8, String)>,
    /// Bytes of application data received.
    pub received: usize,
    pub elapsed: Duration,
    /// s_client's stderr, for failure messages.
    pub stderr: String,
}

impl ProbeReport {
    /// One line: verdict, protocol, alert and time.
    pub fn summary(&self) -> String {
        format!(
            "{:?} (handshake completed: {}, protocol: {}, alert: {}, {} bytes received, {:?})",
            self.verdict,
            self.handshake_completed,
            self.protocol.as_deref().unwrap_or("-"),
            self.alert
                .as_ref()
                .map(|(n, text)| format!("{n} {text}"))
                .unwrap_or_else(|| "-".into()),
            self.received,
            self.elapsed,
        )
    }
}

impl std::fmt::Display for ProbeReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}\n--- s_client stderr ---\n{}\n--- end ---",
            self.summary(),
            self.stderr.trim()
        )
    }
}

impl TlsProbe {
    /// TLS 1.3, ALPN `h2`, no client certificate, no server verification, 5 s timeout.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            client: None,
            version: TlsVersion::Tls13,
            alpn: Some("h2".into()),
            ca_file: None,
            timeout: Duration::from_secs(5),
        }
    }

    /// Presents `files` as the client certificate (with its chain).
    pub fn client_cert(mut self, files: &CertFiles) -> Self {
        self.client = Some(files.clone());
        self
    }

    pub fn version(mut self, version: TlsVersion) -> Self {
        self.version = version;
        self
    }

    /// `None`: offer no ALPN.
    pub fn alpn(mut self, alpn: Option<&str>) -> Self {
        self.alpn = alpn.map(Into::into);
        self
    }

    /// Verifies the server's chain against `ca_file` and aborts on failure.
    pub fn verify_server(mut self, ca_file: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(ca_file.into());
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Runs the probe with `openssl`, a command already placed where it should run (e.g.
    /// `node.command("openssl")?`); the probe adds the arguments.
    pub fn run(&self, mut openssl: Command) -> Result<ProbeReport> {
        openssl.args([
            "s_client",
            "-connect",
            &self.addr.to_string(),
            "-brief",
            "-nocommands",
        ]);
        openssl.arg(match self.version {
            TlsVersion::Tls12 => "-tls1_2",
            TlsVersion::Tls13 => "-tls1_3",
        });
        if let Some(alpn) = &self.alpn {
            openssl.args(["-alpn", alpn]);
        }
        if let Some(ca) = &self.ca_file {
            openssl.arg("-CAfile").arg(ca).arg("-verify_return_error");
        }
        if let Some(files) = &self.client {
            openssl
                .arg("-cert")
                .arg(&files.cert)
                .arg("-cert_chain")
                .arg(&files.chain)
                .arg("-key")
                .arg(&files.key);
        }
        openssl
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut process = Process::spawn(&mut openssl).context("run openssl s_client")?;
        let child = process.child_mut();
        let mut stdin = child.stdin.take().context("no stdin pipe")?;
        let stdout = collect(child.stdout.take().context("no stdout pipe")?);
        let stderr = collect(child.stderr.take().context("no stderr pipe")?);
        // s_client reads stdin only once connected and sends it as application data; the
        // pipe stays open (EOF would end the session before the server answers).
        let _ = stdin.write_all(H2_PREFACE);
        let _ = stdin.flush();

        let deadline = started + self.timeout;
        let exited = loop {
            if has_settings_frame(&stdout.lock().unwrap_or_else(|e| e.into_inner())) {
                break false;
            }
            if process.try_wait()?.is_some() {
                break true;
            }
            if Instant::now() >= deadline {
                break false;
            }
            thread::sleep(Duration::from_millis(10));
        };
        let elapsed = started.elapsed();
        drop(stdin);
        // Killed if still running (accepted, or no verdict), reaped in any case.
        drop(process);
        // The reader threads end with the pipes; give them a moment to take the last bytes.
        thread::sleep(Duration::from_millis(20));
        let out = stdout.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let err =
            String::from_utf8_lossy(&stderr.lock().unwrap_or_else(|e| e.into_inner())).into_owned();

        let verdict = if has_settings_frame(&out) {
            Verdict::AcceptedHttp2
        } else if !out.is_empty() {
            Verdict::AcceptedOther
        } else if exited {
            Verdict::Rejected
        } else {
            Verdict::NoVerdict
        };
        Ok(ProbeReport {
            verdict,
            handshake_completed: err.lines().any(|l| l.trim() == "CONNECTION ESTABLISHED"),
            protocol: err
                .lines()
                .find_map(|l| l.strip_prefix("Protocol version: "))
                .map(|p| p.trim().to_string()),
            alert: parse_alert(&err),
            received: out.len(),
            elapsed,
            stderr: err,
        })
    }
}

/// Reads `pipe` to EOF on a thread, into a shared buffer readable meanwhile.
fn collect(mut pipe: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let sink = buf.clone();
    thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut chunk) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(&chunk[..n]);
        }
    });
    buf
}

/// True if `data` starts with HTTP/2 frames the first of which, or a later one, is a
/// SETTINGS frame (type 4) that is not an ACK, on stream 0, with a length that is a
/// multiple of 6: what an HTTP/2 server sends first.
pub fn has_settings_frame(data: &[u8]) -> bool {
    let mut rest = data;
    while rest.len() >= 9 {
        let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        let (kind, flags) = (rest[3], rest[4]);
        let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]) & 0x7fff_ffff;
        if kind == 4 && flags & 1 == 0 && stream == 0 && len % 6 == 0 {
            return true;
        }
        if rest.len() < 9 + len {
            return false;
        }
        rest = &rest[9 + len..];
    }
    false
}

/// `... :<text>:<file>:<line>:SSL alert number <n>` in OpenSSL's error lines.
fn parse_alert(stderr: &str) -> Option<(u8, String)> {
    stderr.lines().find_map(|line| {
        let (before, number) = line.rsplit_once("SSL alert number ")?;
        let number = number.trim().parse().ok()?;
        // The reason is the field before "<file>:<line>:".
        let fields: Vec<&str> = before.trim_end_matches(':').rsplitn(3, ':').collect();
        let text = fields
            .get(2)
            .and_then(|f| f.rsplit(':').next())
            .unwrap_or("");
        Some((number, text.to_string()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_servers_settings_frame() {
        // Empty SETTINGS, then a SETTINGS ACK.
        let frames = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00\x00\x00\x00\x04\x01\x00\x00\x00\x00";
        assert!(has_settings_frame(frames));
        // One setting (6 bytes) after a WINDOW_UPDATE.
        let mut two = b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x0f\x00\x01".to_vec();
        two.extend_from_slice(b"\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x03\x00\x00\x00\x64");
        assert!(has_settings_frame(&two));
        assert!(!has_settings_frame(b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"));
        assert!(!has_settings_frame(b"HTTP/1.1 400 Bad Request\r\n\r\n"));
        assert!(!has_settings_frame(b""));
    }

    #[test]
    fn parses_openssl_alert_lines() {
        let err = "CONNECTION ESTABLISHED\nProtocol version: TLSv1.3\n\
            80DBF647107F0000:error:0A00045C:SSL routines:ssl3_read_bytes:tlsv13 alert certificate required:../ssl/record/rec_layer_s3.c:1601:SSL alert number 116\n";
        assert_eq!(
            parse_alert(err),
            Some((116, "tlsv13 alert certificate required".to_string()))
        );
        assert_eq!(parse_alert("CONNECTION ESTABLISHED\n"), None);
    }
}
