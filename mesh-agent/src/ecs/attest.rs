//! Role attestation: which IAM role a task runs with, learnt the way the task itself learns it.
//!
//! ECS gives every application container of a task with a role the variable
//! `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`; the ECS agent's credentials endpoint answers that
//! path with the role's temporary credentials and its `RoleArn`. The agent reads the variable
//! from `/proc/<pid>/environ` of a process it found in the task's own cgroup (so a task cannot
//! claim another task's role), asks the endpoint, keeps `RoleArn` and wipes the rest. The
//! endpoint is local and unauthenticated; the ECS agent logs each request in its audit log.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use ::http::StatusCode;
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::http_client as http;
use crate::identity::RoleArn;

const CREDENTIALS_VAR: &[u8] = b"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=";
/// Set by ECS in every application container (never in the pause container): tells "the app
/// has started and has no role" from "the app has not started yet".
const METADATA_VAR: &[u8] = b"ECS_CONTAINER_METADATA_URI_V4=";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attestation {
    Role(RoleArn),
    /// An application process runs without a credentials variable: the task has no role.
    NoRole,
    /// No application process yet (only the pause container, or nothing).
    NotYet,
    /// Worth retrying soon (503 while the ECS agent prepares credentials, a timeout, ...).
    Retry(String),
}

/// Only the role; the keys in the same answer are never deserialized.
#[derive(Deserialize)]
struct CredentialsAnswer {
    #[serde(rename = "RoleArn")]
    role_arn: Option<String>,
}

pub async fn attest(pids: &[u32], credentials: SocketAddr, timeout: Duration) -> Attestation {
    let mut saw_app = false;
    let mut uri = None;
    for &pid in pids {
        let Ok(environ) = read_environ(pid) else {
            continue; // exited meanwhile
        };
        let mut vars = environ.split(|b| *b == 0);
        let found = vars.find_map(|v| v.strip_prefix(CREDENTIALS_VAR));
        if let Some(value) = found {
            uri = Some(String::from_utf8_lossy(value).into_owned());
            break;
        }
        saw_app |= environ
            .split(|b| *b == 0)
            .any(|v| v.starts_with(METADATA_VAR));
    }
    let Some(uri) = uri else {
        return if saw_app {
            Attestation::NoRole
        } else {
            Attestation::NotYet
        };
    };
    if !valid_relative_uri(&uri) {
        return Attestation::Retry(format!(
            "the task's credentials path `{uri}` is not of the form /v2/credentials/<id>"
        ));
    }
    let (status, body) = match http::get(credentials, &uri, timeout).await {
        Ok(r) => r,
        Err(e) => return Attestation::Retry(format!("credentials endpoint: {e:#}")),
    };
    if status != StatusCode::OK {
        return Attestation::Retry(format!(
            "credentials endpoint answered {status} for the task's credentials"
        ));
    }
    match serde_json::from_slice::<CredentialsAnswer>(&body) {
        Ok(CredentialsAnswer {
            role_arn: Some(arn),
        }) => match RoleArn::from_str(&arn) {
            Ok(role) => Attestation::Role(role),
            Err(e) => Attestation::Retry(format!("credentials endpoint gave a bad RoleArn: {e}")),
        },
        Ok(_) => Attestation::Retry("credentials answer without RoleArn".into()),
        // serde_json's error quotes no input, only positions: safe to log.
        Err(e) => Attestation::Retry(format!("credentials answer is not JSON: {e}")),
    }
    // `body` (with the keys) is wiped here.
}

/// `/v2/credentials/<id>`: the id is a UUID; anything else is refused rather than sent on.
fn valid_relative_uri(uri: &str) -> bool {
    uri.strip_prefix("/v2/credentials/").is_some_and(|id| {
        !id.is_empty()
            && id.len() <= 128
            && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    })
}

/// A process's environment, wiped when dropped (applications keep secrets in theirs too).
fn read_environ(pid: u32) -> std::io::Result<Zeroizing<Vec<u8>>> {
    use std::io::Read;
    let mut file = std::fs::File::open(format!("/proc/{pid}/environ"))?;
    // environ is at most ARG_MAX-ish; read into one wiped buffer without regrowing.
    let mut buf = Zeroizing::new(Vec::with_capacity(256 * 1024));
    let mut chunk = Zeroizing::new([0u8; 16 * 1024]);
    loop {
        let n = file.read(&mut chunk[..])?;
        if n == 0 || buf.len() + n > buf.capacity() {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_credentials_paths_are_followed() {
        assert!(valid_relative_uri(
            "/v2/credentials/2cf1d0d3-5e6f-4b8a-9c1d-2e3f4a5b6c7d"
        ));
        for bad in [
            "/v2/credentials/",
            "/v2/credentials/../v1/tasks",
            "/v1/tasks",
            "http://evil/v2/credentials/x",
            "/v2/credentials/a?b",
        ] {
            assert!(!valid_relative_uri(bad), "{bad}");
        }
    }

    #[test]
    fn only_the_role_is_read_from_the_answer() {
        let body = br#"{"RoleArn":"arn:aws:iam::111122223333:role/orders","AccessKeyId":"ASIA","SecretAccessKey":"s","Token":"t","Expiration":"2026-11-24T12:00:00Z"}"#;
        let a: CredentialsAnswer = serde_json::from_slice(body).unwrap();
        assert_eq!(
            a.role_arn.as_deref(),
            Some("arn:aws:iam::111122223333:role/orders")
        );
    }

    /// This test process has neither variable: it counts as "no application yet".
    #[tokio::test]
    async fn a_process_without_ecs_variables_is_not_an_application() {
        let me = std::process::id();
        let got = attest(
            &[me],
            "127.0.0.1:9".parse().unwrap(),
            Duration::from_millis(10),
        )
        .await;
        assert_eq!(got, Attestation::NotYet);
    }
}
