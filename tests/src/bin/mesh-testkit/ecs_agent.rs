//! `ecs-agent`: a stand-in of the ECS agent's introspection API and credentials endpoint.
//!
//! It serves what the state file (`mesh_testbed::ecs::api::State`, JSON) says, read again
//! on every request, so the harness changes the node's tasks by rewriting the file (a
//! temporary file renamed over it). Shapes, status codes and error bodies are the real
//! agent's (aws/amazon-ecs-agent); see `mesh_testbed::ecs` for the details copied.
//!
//! Routes: `/v1/metadata`; `/v1/tasks` (all), `?dockerid=` (more than 12 characters:
//! exact; else a prefix that must match one container), `?taskarn=` (exact), both: 400,
//! none found: 404; `/v2/credentials/<id>` and `/v1/credentials?id=<id>`: 400 for an
//! unknown or missing id, 503 for the first `fail_first` requests of an id (counted in
//! memory), then 200. Anything else: 404. Every request is logged on stderr as
//! `request method=M path=P status=S remote=A [arn=TASK]`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use mesh_testbed::ecs::api;
use serde::Serialize;

use crate::args::Args;

/// The body of a `/v1/tasks` error: the real agent marshals an empty TaskResponse
/// (`DesiredStatus` omitted, `Containers` a nil slice).
const EMPTY_TASK: &str =
    r#"{"Arn":"","KnownStatus":"","Family":"","Version":"","Containers":null}"#;
/// Docker ids up to this length are prefixes in `?dockerid=`.
const DOCKER_SHORT_ID_LEN: usize = 12;

pub struct Options {
    listen: SocketAddr,
    state: PathBuf,
}

impl Options {
    pub fn from_args(args: &Args) -> Result<Self, String> {
        args.only(&["listen", "state"])?;
        Ok(Self {
            listen: args.required("listen")?,
            state: args.required("state")?,
        })
    }
}

pub fn run(opts: Options) -> Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(serve(opts))
}

async fn serve(opts: Options) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("bind {}", opts.listen))?;
    // The harness waits for this line; stdout is a pipe, hence block-buffered.
    println!("listening on {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    let stand_in = Arc::new(StandIn {
        state: opts.state,
        attempts: Mutex::default(),
        seq: AtomicU64::new(0),
    });
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let stand_in = stand_in.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let stand_in = stand_in.clone();
                async move { Ok::<_, Infallible>(stand_in.handle(&req, remote)) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                eprintln!("connection from {remote}: {e}");
            }
        });
    }
}

struct StandIn {
    state: PathBuf,
    /// Credentials requests per id since start, for `fail_first`.
    attempts: Mutex<HashMap<String, u32>>,
    /// Requests so far: seeds the order in which tasks and containers are listed.
    seq: AtomicU64,
}

struct Reply {
    status: StatusCode,
    json: bool,
    body: Vec<u8>,
    /// The task a credentials request was for, for the log (as the audit log has it).
    arn: Option<String>,
}

impl Reply {
    fn json(status: u16, value: &impl Serialize) -> Self {
        Self::raw(
            status,
            serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec()),
        )
    }

    fn raw(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            json: true,
            body: body.into(),
            arn: None,
        }
    }

    /// Go's `http.NotFound`.
    fn not_found() -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            json: false,
            body: b"404 page not found\n".to_vec(),
            arn: None,
        }
    }

    fn credentials_error(status: u16, code: &str, message: String) -> Self {
        Self::json(
            status,
            &api::ErrorMessage {
                code: code.into(),
                message,
                http_error_code: status,
            },
        )
    }
}

impl StandIn {
    fn handle(&self, req: &Request<Incoming>, remote: SocketAddr) -> Response<Full<Bytes>> {
        let reply = self.route(req.uri().path(), req.uri().query().unwrap_or(""));
        let path = req
            .uri()
            .path_and_query()
            .map_or_else(|| req.uri().path().to_string(), |p| p.to_string());
        let arn = reply
            .arn
            .as_deref()
            .map(|a| format!(" arn={a}"))
            .unwrap_or_default();
        eprintln!(
            "request method={} path={path} status={} remote={remote}{arn}",
            req.method(),
            reply.status.as_u16()
        );
        let mut response = Response::new(Full::new(Bytes::from(reply.body)));
        *response.status_mut() = reply.status;
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static(if reply.json {
                "application/json"
            } else {
                "text/plain; charset=utf-8"
            }),
        );
        response
    }

    fn load(&self) -> Result<api::State> {
        let text =
            std::fs::read(&self.state).with_context(|| format!("read {}", self.state.display()))?;
        serde_json::from_slice(&text).with_context(|| format!("parse {}", self.state.display()))
    }

    fn route(&self, path: &str, query: &str) -> Reply {
        let state = match self.load() {
            Ok(state) => state,
            Err(e) => {
                eprintln!("error: {e:#}");
                return Reply::raw(500, "{}");
            }
        };
        match path {
            "/v1/metadata" => Reply::json(200, &state.metadata),
            "/v1/tasks" => self.tasks(&state, &parse_query(query)),
            "/v1/credentials" => {
                let query = parse_query(query);
                let id = query.get("id").map(String::as_str).unwrap_or_default();
                self.credentials(&state, id, "CredentialsV1Request: ")
            }
            _ => match path.strip_prefix("/v2/credentials/") {
                Some(id) => self.credentials(&state, id, "CredentialsV2Request: "),
                None => Reply::not_found(),
            },
        }
    }

    fn tasks(&self, state: &api::State, query: &HashMap<String, String>) -> Reply {
        let found = match (query.get("dockerid"), query.get("taskarn")) {
            (Some(_), Some(_)) => return Reply::raw(400, EMPTY_TASK),
            (None, None) => {
                let mut tasks: Vec<api::TaskResponse> =
                    state.tasks.iter().map(|t| t.task.clone()).collect();
                let mut rng = self.rng();
                shuffle(&mut tasks, &mut rng);
                for task in &mut tasks {
                    shuffle(&mut task.containers, &mut rng);
                }
                return Reply::json(200, &api::TasksResponse { tasks });
            }
            (None, Some(arn)) => state.tasks.iter().find(|t| &t.task.arn == arn),
            (Some(id), None) => {
                // One entry per matching container (listed or internal), as the real
                // agent collects them: two containers of one task are ambiguous too.
                let matches: Vec<&api::StateTask> = state
                    .tasks
                    .iter()
                    .flat_map(|t| {
                        t.task
                            .containers
                            .iter()
                            .map(|c| &c.docker_id)
                            .chain(&t.internal_docker_ids)
                            .filter(|docker_id| {
                                if id.len() > DOCKER_SHORT_ID_LEN {
                                    *docker_id == id
                                } else {
                                    docker_id.starts_with(id.as_str())
                                }
                            })
                            .map(move |_| t)
                    })
                    .collect();
                if matches.len() > 1 {
                    return Reply::raw(400, EMPTY_TASK);
                }
                matches.into_iter().next()
            }
        };
        match found {
            Some(task) => {
                let mut task = task.task.clone();
                shuffle(&mut task.containers, &mut self.rng());
                Reply::json(200, &task)
            }
            None => Reply::raw(404, EMPTY_TASK),
        }
    }

    fn credentials(&self, state: &api::State, id: &str, prefix: &str) -> Reply {
        if id.is_empty() {
            return Reply::credentials_error(
                400,
                "NoIdInRequest",
                format!("{prefix}No Credential ID in the request"),
            );
        }
        let Some(credentials) = state.credentials.get(id) else {
            return Reply::credentials_error(
                400,
                "InvalidIdInRequest",
                format!("{prefix}Credentials not found"),
            );
        };
        let attempt = {
            let mut attempts = self.attempts.lock().unwrap_or_else(|e| e.into_inner());
            let n = attempts.entry(id.to_string()).or_insert(0);
            *n += 1;
            *n
        };
        let mut reply = if attempt <= credentials.fail_first {
            Reply::credentials_error(
                503,
                "CredentialsUninitialized",
                format!("{prefix}Credentials uninitialized for ID"),
            )
        } else {
            Reply::json(200, &credentials.response)
        };
        reply.arn = Some(credentials.task_arn.clone());
        reply
    }

    fn rng(&self) -> u64 {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        (seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(nanos)) | 1
    }
}

/// Fisher-Yates with xorshift64: Go lists map entries in no fixed order, neither do we.
fn shuffle<T>(items: &mut [T], state: &mut u64) {
    for i in (1..items.len()).rev() {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        let j = (*state % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

/// Go's `url.ParseQuery` then `Get`: the first value of each key, `+` and `%XX` decoded;
/// a key without `=` has the value "".
fn parse_query(query: &str) -> HashMap<String, String> {
    let mut values = HashMap::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if let (Some(key), Some(value)) = (unescape(key), unescape(value)) {
            values.entry(key).or_insert(value);
        }
    }
    values
}

fn unescape(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_decode_like_go() {
        let q = parse_query("taskarn=arn%3Aaws%3Aecs%3Aus-west-2&dockerid&x=a+b&x=2");
        assert_eq!(q["taskarn"], "arn:aws:ecs:us-west-2");
        assert_eq!(q["dockerid"], "");
        assert_eq!(q["x"], "a b");
        assert!(!parse_query("bad=%zz").contains_key("bad"));
    }

    #[test]
    fn shuffle_keeps_every_item() {
        let mut items: Vec<u32> = (0..10).collect();
        let mut state = 12345;
        shuffle(&mut items, &mut state);
        items.sort();
        assert_eq!(items, (0..10).collect::<Vec<_>>());
    }
}
