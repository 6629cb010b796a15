//! Keeping a DNS name resolved: the endpoints of a service published in AWS Cloud Map or
//! Consul DNS, refreshed when their TTL runs out.
//!
//! [`watch`] starts one task per [`Query`] that publishes a [`Resolution`] on a
//! `tokio::sync::watch` channel:
//!
//! * **Questions.** An [`Query::Address`] asks for A and AAAA records (two questions with
//!   their own TTLs; every address gets the query's port). A [`Query::Srv`] asks for SRV
//!   records; each target's addresses come from the answer's additional section when the
//!   server put them there (dnsmasq and Consul do), else from A and AAAA questions for the
//!   target (Route 53 does not add them). Names are absolute: no search list, no `ndots`,
//!   so `orders.apps.local` is exactly that name and costs one query, not one per search
//!   domain.
//! * **Refresh.** Each question is asked again when its answer's TTL (the smallest TTL of
//!   the records used, CNAMEs included) runs out, clamped to
//!   [`min_refresh`, `max_refresh`]: Consul's TTL 0 means "ask again after `min_refresh`",
//!   not "ask in a busy loop", and a day-long TTL is not trusted for a day. A negative
//!   answer is kept for its SOA's negative TTL; one without an SOA (dnsmasq) must not be
//!   cached (RFC 2308 §5), so it is asked again after `min_refresh`.
//! * **No cache.** The questions go straight to the name servers through hickory's
//!   name-server pool (UDP, TCP when truncated, server selection and statistics), not
//!   through `hickory_resolver::Resolver`: its cache would answer from memory until its own
//!   idea of the TTL ran out, and its SRV handling keeps the additional addresses of only
//!   one target. Every refresh therefore sees what the server says now.
//! * **Failures keep the last known good endpoints.** A timeout, SERVFAIL, REFUSED or a
//!   network error never empties the set: the question's previous endpoints stay published
//!   (source [`Source::LastKnownGood`], with the error) and it is asked again after a
//!   jittered exponential backoff from `min_refresh` up to [`BACKOFF_CAP`]. Routing to
//!   endpoints that may have moved is better than refusing every connection because the
//!   resolver hiccupped; passive health checking ejects the ones that really are gone.
//! * **A positive "no records" empties the set.** NXDOMAIN, or NOERROR without records of
//!   the type (NODATA), is the server saying the service has no instances: Consul and Cloud
//!   Map drop unhealthy instances from their answers, and awsvpc task addresses are reused
//!   by other tasks, so holding on to them would send traffic to a stranger. That answer is
//!   published as an empty, fresh set, as Envoy's DNS clusters do.
//!
//! Publishing wakes receivers (`changed()`) only when the endpoints, the source or the
//! error change; the timestamps are updated in place, so `borrow()` always shows when the
//! set was last confirmed without waking every router on each TTL refresh.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_resolver::config::{NameServerConfigGroup, ResolverOpts};
use hickory_resolver::name_server::{NameServerPool, TokioConnectionProvider};
use hickory_resolver::proto::op::{Query as DnsQuestion, ResponseCode};
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use hickory_resolver::proto::xfer::{
    DnsHandle, DnsRequestOptions, DnsResponse, FirstAnswer, RetryDnsHandle,
};
use hickory_resolver::proto::{ProtoError, ProtoErrorKind};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

/// The longest wait between two attempts at a question whose server keeps failing. Long
/// enough not to hammer a struggling resolver from every node, short enough that the set
/// follows the service again within half a minute of the resolver's recovery.
pub const BACKOFF_CAP: Duration = Duration::from_secs(30);

/// CNAMEs followed per question before giving up (a loop, or a misconfigured zone).
const MAX_ALIAS_HOPS: usize = 8;

/// How DNS discovery talks to the name servers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsSettings {
    /// The name server to ask (e.g. Consul's agent on 127.0.0.1:8600); `None`: the servers
    /// of `/etc/resolv.conf` (on EC2, the VPC resolver, which serves Cloud Map's private
    /// namespaces). Its search list and options are not used; see the module docs.
    pub resolver: Option<SocketAddr>,
    /// The shortest time an answer is trusted, whatever its TTL (also the first retry delay
    /// after a failure). Must be greater than zero.
    pub min_refresh: Duration,
    /// The longest time an answer is trusted, whatever its TTL.
    pub max_refresh: Duration,
    /// How long one question may take, retries included, before it counts as failed.
    pub timeout: Duration,
}

impl Default for DnsSettings {
    fn default() -> Self {
        Self {
            resolver: None,
            min_refresh: Duration::from_secs(1),
            max_refresh: Duration::from_secs(300),
            timeout: Duration::from_secs(3),
        }
    }
}

impl DnsSettings {
    /// Rejects settings the watcher cannot honour.
    pub fn validate(&self) -> Result<(), DnsError> {
        if self.min_refresh.is_zero() {
            return Err(DnsError::Settings(
                "min_refresh must be greater than zero: a TTL of 0 (Consul's default) would \
                 otherwise re-resolve in a busy loop"
                    .into(),
            ));
        }
        if self.max_refresh < self.min_refresh {
            return Err(DnsError::Settings(format!(
                "max_refresh ({:?}) is shorter than min_refresh ({:?})",
                self.max_refresh, self.min_refresh
            )));
        }
        if self.timeout.is_zero() {
            return Err(DnsError::Settings(
                "timeout must be greater than zero".into(),
            ));
        }
        Ok(())
    }

    /// How long an answer with this TTL (seconds) is used before it is asked again.
    fn refresh_after(&self, ttl: u32) -> Duration {
        Duration::from_secs(u64::from(ttl)).clamp(self.min_refresh, self.max_refresh)
    }

    /// The wait before the next attempt after `failures` consecutive failures (1 = the
    /// first): `min_refresh` doubled per failure up to [`BACKOFF_CAP`] (or `min_refresh`
    /// if that is longer), then "equal jitter": a uniform draw in the upper half
    /// (`jitter` in [0, 1)), so the agents of a fleet that lost the resolver together do
    /// not come back to it in lockstep.
    fn backoff(&self, failures: u32, jitter: f64) -> Duration {
        let cap = BACKOFF_CAP.max(self.min_refresh);
        let doublings = failures.saturating_sub(1).min(20);
        let base = self.min_refresh.saturating_mul(1u32 << doublings).min(cap);
        base.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }
}

/// Why a watch could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("invalid DNS name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },
    #[error("invalid DNS settings: {0}")]
    Settings(String),
    #[error("cannot use the system's DNS configuration (/etc/resolv.conf): {0}")]
    SystemConfig(String),
    #[error("no DNS name server is configured (/etc/resolv.conf lists none)")]
    NoNameServers,
}

/// What to keep resolved.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Query {
    /// The A and AAAA records of `hostname`; every address gets `port`. Cloud Map's
    /// awsvpc services (`orders.apps.local`), or Consul's `orders.service.consul`.
    Address { hostname: String, port: u16 },
    /// The SRV records of `name`: each target's addresses with the record's port. Cloud Map
    /// (`orders.apps.local`, the only form for bridge and host network tasks) or Consul in
    /// RFC 2782 form (`_orders._tcp.service.consul`).
    Srv { name: String },
}

impl Query {
    /// Checks the name, so a configuration error is reported when the configuration is
    /// loaded rather than when the watch starts.
    pub fn validate(&self) -> Result<(), DnsError> {
        self.questions().map(drop)
    }

    fn questions(&self) -> Result<Vec<Question>, DnsError> {
        Ok(match self {
            Self::Address { hostname, port } => {
                let name = parse_name(hostname)?;
                [RecordType::A, RecordType::AAAA]
                    .into_iter()
                    .map(|rtype| Question::Address {
                        name: name.clone(),
                        rtype,
                        port: *port,
                    })
                    .collect()
            }
            Self::Srv { name } => vec![Question::Srv {
                name: parse_name(name)?,
            }],
        })
    }
}

impl fmt::Display for Query {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Address { hostname, port } => write!(f, "{hostname}:{port} (A/AAAA)"),
            Self::Srv { name } => write!(f, "{name} (SRV)"),
        }
    }
}

/// An absolute name from configuration. IP literals are refused: they need no discovery,
/// and asking DNS for `10.0.0.1.` would only fail later and less clearly.
fn parse_name(text: &str) -> Result<Name, DnsError> {
    let invalid = |reason: String| DnsError::InvalidName {
        name: text.to_string(),
        reason,
    };
    let trimmed = text.trim_end_matches('.');
    if trimmed.is_empty() {
        return Err(invalid("empty".into()));
    }
    if trimmed.parse::<IpAddr>().is_ok() {
        return Err(invalid(
            "an IP address, not a DNS name: list it as a static endpoint".into(),
        ));
    }
    if trimmed.split('.').any(str::is_empty) {
        return Err(invalid("empty label (two dots in a row)".into()));
    }
    // Relaxed: service names carry underscores (`_orders._tcp`) that strict hostname
    // rules refuse; non-ASCII names are IDNA-encoded.
    let mut name = Name::from_str_relaxed(trimmed).map_err(|e| invalid(e.to_string()))?;
    name.set_fqdn(true);
    Ok(name)
}

/// One address the service is reachable at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub addr: SocketAddr,
}

/// Where a [`Resolution`]'s endpoints come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// No question has been answered yet: the first resolution is in flight, or every
    /// attempt so far failed (`last_error` says why). The endpoint set is empty because
    /// nothing is known, not because the service has none; a router may wait for the first
    /// answer rather than refuse.
    Pending,
    /// Every question's latest attempt was answered.
    Fresh,
    /// The latest attempt at some question failed; the endpoints are the last answers that
    /// succeeded (`last_error` says what failed).
    LastKnownGood,
}

/// The current endpoint set of a watched [`Query`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolution {
    /// Sorted, without duplicates.
    pub endpoints: Vec<Endpoint>,
    /// When the oldest answer the set is built from was received (`None` while pending).
    pub resolved_at: Option<Instant>,
    /// When the first of those answers expires (TTL, clamped); in the past while the set
    /// is last-known-good.
    pub valid_until: Option<Instant>,
    /// The errors of the latest failed attempts, one per failing question.
    pub last_error: Option<String>,
    pub source: Source,
}

impl Resolution {
    fn pending() -> Self {
        Self {
            endpoints: Vec::new(),
            resolved_at: None,
            valid_until: None,
            last_error: None,
            source: Source::Pending,
        }
    }

    /// The endpoint addresses, sorted.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.endpoints.iter().map(|e| e.addr).collect()
    }
}

/// Asks the name servers; cheap to clone (all clones share the servers' connections and
/// statistics). Create one per agent and [`DnsClient::watch`] every query with it.
#[derive(Clone)]
pub struct DnsClient {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    handle: RetryDnsHandle<NameServerPool<TokioConnectionProvider>>,
    settings: DnsSettings,
}

impl DnsClient {
    /// Validates `settings` and reads `/etc/resolv.conf` if no resolver is given. Sends
    /// nothing yet.
    pub fn new(settings: &DnsSettings) -> Result<Self, DnsError> {
        settings.validate()?;
        let servers = match settings.resolver {
            // UDP, and TCP for answers too big for a datagram (many SRV targets).
            Some(addr) => NameServerConfigGroup::from_ips_clear(&[addr.ip()], addr.port(), true),
            None => {
                let (config, _) = hickory_resolver::system_conf::read_system_conf()
                    .map_err(|e| DnsError::SystemConfig(e.to_string()))?;
                NameServerConfigGroup::from(config.name_servers().to_vec())
            }
        };
        if servers.is_empty() {
            return Err(DnsError::NoNameServers);
        }
        let mut opts = ResolverOpts::default();
        // Two tries per question (RetryDnsHandle below), each with half the budget, so one
        // lost datagram costs half a timeout rather than a failed refresh.
        opts.timeout = (settings.timeout / 2).max(Duration::from_millis(10));
        // Room for eight Cloud Map SRV records and their addresses without falling back
        // to TCP.
        opts.edns0 = true;
        let pool = NameServerPool::from_config(servers, opts, TokioConnectionProvider::default());
        Ok(Self {
            inner: Arc::new(ClientInner {
                handle: RetryDnsHandle::new(pool, 1),
                settings: settings.clone(),
            }),
        })
    }

    pub fn settings(&self) -> &DnsSettings {
        &self.inner.settings
    }

    /// Starts keeping `query` resolved; must be called inside a Tokio runtime. The first
    /// resolution starts at once; until it is answered the published [`Resolution`] is
    /// [`Source::Pending`].
    pub fn watch(&self, query: Query) -> Result<DnsWatch, DnsError> {
        let questions = query.questions()?;
        let (tx, rx) = watch::channel(Resolution::pending());
        let cancel = CancellationToken::new();
        let now = Instant::now();
        let tracked = questions
            .into_iter()
            .map(|question| Tracked::new(question, now))
            .collect();
        let task = tokio::spawn(run(self.clone(), query, tracked, tx, cancel.clone()));
        Ok(DnsWatch {
            rx,
            cancel,
            task: Some(task),
        })
    }

    fn request_options(&self) -> DnsRequestOptions {
        let mut options = DnsRequestOptions::default();
        options.use_edns = true;
        // Through the VPC resolver, Cloud Map names need recursion.
        options.recursion_desired = true;
        options
    }

    /// Asks for the `rtype` records of `name`, following CNAMEs (in the answer, else by
    /// asking again for the alias).
    async fn ask(&self, name: &Name, rtype: RecordType) -> Reply {
        let timeout = self.inner.settings.timeout;
        let mut qname = name.clone();
        // The smallest TTL of the aliases followed so far: the answer is only as durable
        // as the chain that led to it.
        let mut alias_ttl = u32::MAX;
        for _ in 0..MAX_ALIAS_HOPS {
            let lookup = self
                .inner
                .handle
                .lookup(
                    DnsQuestion::query(qname.clone(), rtype),
                    self.request_options(),
                )
                .first_answer();
            let response = match tokio::time::timeout(timeout, lookup).await {
                Err(_) => {
                    return Reply::Failed(format!("{rtype} {qname}: no answer within {timeout:?}"));
                }
                Ok(Err(e)) => {
                    return classify_error(&qname, rtype, &e, timeout).capped(alias_ttl);
                }
                Ok(Ok(response)) => response,
            };
            match follow(&response, &qname, rtype) {
                Chain::Records { records, ttl } => {
                    return Reply::Records {
                        records,
                        ttl: ttl.min(alias_ttl),
                        additionals: response.additionals().to_vec(),
                    };
                }
                Chain::Alias { target, ttl } => {
                    alias_ttl = alias_ttl.min(ttl);
                    qname = target;
                }
                Chain::Empty => {
                    return Reply::NoRecords {
                        ttl: negative_ttl(&response).min(alias_ttl),
                    };
                }
            }
        }
        Reply::Failed(format!("{rtype} {name}: more than {MAX_ALIAS_HOPS} CNAMEs"))
    }

    /// One attempt at `question`. `previous` are the SRV targets' addresses of the last
    /// answer, kept for a target whose own lookup fails.
    async fn resolve(&self, question: &Question, previous: &Targets) -> Outcome {
        match question {
            Question::Address { name, rtype, port } => match self.ask(name, *rtype).await {
                Reply::Records { records, ttl, .. } => Outcome::Answer(Answer {
                    endpoints: records
                        .iter()
                        .filter_map(address_of)
                        .map(|ip| SocketAddr::new(ip, *port))
                        .collect(),
                    ttl,
                    partial_error: None,
                    targets: Targets::new(),
                }),
                Reply::NoRecords { ttl } => Outcome::Answer(Answer::empty(ttl)),
                Reply::Failed(e) => Outcome::Failed(e),
            },
            Question::Srv { name } => match self.ask(name, RecordType::SRV).await {
                Reply::Records {
                    records,
                    ttl,
                    additionals,
                } => Outcome::Answer(self.srv_answer(&records, ttl, &additionals, previous).await),
                Reply::NoRecords { ttl } => Outcome::Answer(Answer::empty(ttl)),
                Reply::Failed(e) => Outcome::Failed(e),
            },
        }
    }

    /// Turns SRV records into endpoints: each target's addresses from the additional
    /// section, else from its own A and AAAA questions (all targets at once).
    async fn srv_answer(
        &self,
        records: &[Record],
        srv_ttl: u32,
        additionals: &[Record],
        previous: &Targets,
    ) -> Answer {
        let services = srv_services(records);
        let mut ttl = srv_ttl;
        let mut targets = Targets::new();
        let mut errors = Vec::new();
        let mut lookups = JoinSet::new();
        for (target, _) in &services {
            if targets.contains_key(target) {
                continue;
            }
            match additional_addresses(additionals, target) {
                Some((ips, glue_ttl)) => {
                    ttl = ttl.min(glue_ttl);
                    targets.insert(target.clone(), ips);
                }
                None => {
                    // Placeholder so a target listed twice is looked up once.
                    targets.insert(target.clone(), Vec::new());
                    let client = self.clone();
                    let target = target.clone();
                    let before = previous.get(&target).cloned().unwrap_or_default();
                    lookups.spawn(async move {
                        let lookup = client.target_addresses(&target, &before).await;
                        (target, lookup)
                    });
                }
            }
        }
        while let Some(joined) = lookups.join_next().await {
            match joined {
                Ok((target, lookup)) => {
                    ttl = ttl.min(lookup.ttl);
                    errors.extend(lookup.errors);
                    targets.insert(target, lookup.ips);
                }
                // Only a panic inside hickory gets here; the target's addresses stay
                // unknown this round and the error makes the question retry soon.
                Err(e) => errors.push(format!("SRV target lookup failed: {e}")),
            }
        }
        let endpoints = services
            .iter()
            .flat_map(|(target, port)| {
                targets
                    .get(target)
                    .into_iter()
                    .flatten()
                    .map(move |ip| SocketAddr::new(*ip, *port))
            })
            .collect();
        Answer {
            endpoints,
            ttl,
            partial_error: (!errors.is_empty()).then(|| errors.join("; ")),
            targets,
        }
    }

    /// The A and AAAA addresses of an SRV target. A family whose question fails keeps the
    /// target's addresses of that family from the previous answer.
    async fn target_addresses(&self, target: &Name, before: &[IpAddr]) -> TargetLookup {
        let (v4, v6) = tokio::join!(
            self.ask(target, RecordType::A),
            self.ask(target, RecordType::AAAA)
        );
        let mut lookup = TargetLookup {
            ips: Vec::new(),
            ttl: u32::MAX,
            errors: Vec::new(),
        };
        for (reply, v4_family) in [(v4, true), (v6, false)] {
            match reply {
                Reply::Records { records, ttl, .. } => {
                    lookup.ttl = lookup.ttl.min(ttl);
                    lookup.ips.extend(records.iter().filter_map(address_of));
                }
                Reply::NoRecords { ttl } => lookup.ttl = lookup.ttl.min(ttl),
                Reply::Failed(e) => {
                    lookup.errors.push(e);
                    lookup
                        .ips
                        .extend(before.iter().filter(|ip| ip.is_ipv4() == v4_family));
                }
            }
        }
        lookup
    }
}

/// Starts keeping `query` resolved with a client of its own; see [`DnsClient::watch`].
/// Watching many names, share one [`DnsClient`] instead.
#[cfg(test)]
pub fn watch(query: Query, settings: &DnsSettings) -> Result<DnsWatch, DnsError> {
    DnsClient::new(settings)?.watch(query)
}

/// A running watch. Dropping it stops the task too; [`DnsWatch::stop`] also waits for it.
pub struct DnsWatch {
    rx: watch::Receiver<Resolution>,
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl DnsWatch {
    /// A receiver of every meaningful change (endpoints, source, error).
    pub fn subscribe(&self) -> watch::Receiver<Resolution> {
        self.rx.clone()
    }

    /// The latest resolution.
    #[cfg(test)]
    pub fn current(&self) -> Resolution {
        self.rx.borrow().clone()
    }

    /// Stops resolving and waits until the task has ended; receivers then see the channel
    /// closed, with the last resolution still readable.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            // The task only ends by cancellation; a panic in it has been logged by tokio.
            let _ = task.await;
        }
    }
}

impl Drop for DnsWatch {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// One DNS question a watch keeps answered.
#[derive(Clone, Debug)]
enum Question {
    Address {
        name: Name,
        rtype: RecordType,
        port: u16,
    },
    Srv {
        name: Name,
    },
}

impl fmt::Display for Question {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Address { name, rtype, .. } => write!(f, "{rtype} {name}"),
            Self::Srv { name } => write!(f, "SRV {name}"),
        }
    }
}

/// Addresses per SRV target.
type Targets = HashMap<Name, Vec<IpAddr>>;

/// What the server said to one question.
#[derive(Debug)]
enum Reply {
    /// Records of the asked type (at the end of any CNAME chain), with the smallest TTL of
    /// them and of the chain, and the additional section.
    Records {
        records: Vec<Record>,
        ttl: u32,
        additionals: Vec<Record>,
    },
    /// The server positively says there are none (NXDOMAIN or NODATA); `ttl` is the
    /// negative TTL from the SOA, 0 without one.
    NoRecords { ttl: u32 },
    /// No usable answer: timeout, SERVFAIL, REFUSED, network error.
    Failed(String),
}

impl Reply {
    fn capped(self, ttl: u32) -> Self {
        match self {
            Self::NoRecords { ttl: own } => Self::NoRecords { ttl: own.min(ttl) },
            other => other,
        }
    }
}

/// Sorts a hickory error into "no records" (an answer) or a failure. `timeout` is the
/// question's budget, named in the message when hickory's own attempts ran out first.
fn classify_error(name: &Name, rtype: RecordType, error: &ProtoError, timeout: Duration) -> Reply {
    match error.kind() {
        ProtoErrorKind::NoRecordsFound {
            response_code: ResponseCode::NXDomain | ResponseCode::NoError,
            negative_ttl,
            ..
        } => Reply::NoRecords {
            ttl: negative_ttl.unwrap_or(0),
        },
        // SERVFAIL, REFUSED, ...: about the server, not about the records.
        ProtoErrorKind::NoRecordsFound { response_code, .. } => Reply::Failed(format!(
            "{rtype} {name}: the server answered {response_code}"
        )),
        ProtoErrorKind::Timeout => {
            Reply::Failed(format!("{rtype} {name}: no answer within {timeout:?}"))
        }
        _ => Reply::Failed(format!("{rtype} {name}: {error}")),
    }
}

/// The negative TTL of an answer without the records asked for: SOA TTL capped by the
/// SOA's minimum (RFC 2308 §5); 0 without an SOA, which means "do not cache".
fn negative_ttl(response: &DnsResponse) -> u32 {
    response.negative_ttl().unwrap_or(0)
}

/// The outcome of looking for `rtype` records of `name` in one answer.
#[derive(Debug, PartialEq)]
enum Chain {
    Records {
        records: Vec<Record>,
        ttl: u32,
    },
    /// `name` is an alias whose target's records are not in this answer.
    Alias {
        target: Name,
        ttl: u32,
    },
    /// Neither records nor an alias: the name has no records of the type.
    Empty,
}

/// Follows CNAMEs from `name` through the answer section to the records of `rtype`.
fn follow(response: &DnsResponse, name: &Name, rtype: RecordType) -> Chain {
    let answers = response.answers();
    let mut current = name.clone();
    let mut ttl = u32::MAX;
    for _ in 0..MAX_ALIAS_HOPS {
        let records: Vec<Record> = answers
            .iter()
            .filter(|r| r.record_type() == rtype && *r.name() == current)
            .cloned()
            .collect();
        if let Some(min) = records.iter().map(Record::ttl).min() {
            return Chain::Records {
                records,
                ttl: ttl.min(min),
            };
        }
        let alias = answers.iter().find_map(|r| match r.data() {
            RData::CNAME(cname) if *r.name() == current => Some((cname.0.clone(), r.ttl())),
            _ => None,
        });
        match alias {
            Some((target, alias_ttl)) => {
                ttl = ttl.min(alias_ttl);
                current = target;
            }
            None => break,
        }
    }
    if current == *name {
        Chain::Empty
    } else {
        Chain::Alias {
            target: current,
            ttl,
        }
    }
}

fn address_of(record: &Record) -> Option<IpAddr> {
    match record.data() {
        RData::A(a) => Some(IpAddr::V4(a.0)),
        RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
        _ => None,
    }
}

/// (target, port) of each SRV record, in answer order. A target of "." means "no service
/// here" (RFC 2782) and is skipped. Priority and weight are not used: Cloud Map and Consul
/// publish every instance with the same ones, and spreading load and failing over is the
/// router's job, with health information DNS does not have.
fn srv_services(records: &[Record]) -> Vec<(Name, u16)> {
    records
        .iter()
        .filter_map(|r| match r.data() {
            RData::SRV(srv) if !srv.target().is_root() => Some((srv.target().clone(), srv.port())),
            _ => None,
        })
        .collect()
}

/// The A and AAAA records of `target` in an additional section, with their smallest TTL;
/// `None` if the server added none for it.
fn additional_addresses(additionals: &[Record], target: &Name) -> Option<(Vec<IpAddr>, u32)> {
    let glue: Vec<&Record> = additionals
        .iter()
        .filter(|r| *r.name() == *target && address_of(r).is_some())
        .collect();
    let ttl = glue.iter().map(|r| r.ttl()).min()?;
    Some((glue.iter().filter_map(|r| address_of(r)).collect(), ttl))
}

struct TargetLookup {
    ips: Vec<IpAddr>,
    ttl: u32,
    errors: Vec<String>,
}

/// A question's answer, turned into endpoints.
#[derive(Debug)]
struct Answer {
    endpoints: Vec<SocketAddr>,
    /// The smallest TTL of every record used (seconds).
    ttl: u32,
    /// Set when part of the answer (an SRV target's lookup) failed and old addresses were
    /// used for it.
    partial_error: Option<String>,
    targets: Targets,
}

impl Answer {
    fn empty(ttl: u32) -> Self {
        Self {
            endpoints: Vec::new(),
            ttl,
            partial_error: None,
            targets: Targets::new(),
        }
    }
}

#[derive(Debug)]
enum Outcome {
    Answer(Answer),
    Failed(String),
}

/// A question and what is known of its answer.
#[derive(Debug)]
struct Tracked {
    question: Question,
    /// `None` until the question is answered once.
    endpoints: Option<Vec<SocketAddr>>,
    answered_at: Option<Instant>,
    valid_until: Option<Instant>,
    /// Consecutive failed attempts.
    failures: u32,
    error: Option<String>,
    next_at: Instant,
    targets: Targets,
}

impl Tracked {
    fn new(question: Question, now: Instant) -> Self {
        Self {
            question,
            endpoints: None,
            answered_at: None,
            valid_until: None,
            failures: 0,
            error: None,
            next_at: now,
            targets: Targets::new(),
        }
    }

    /// Records an attempt's outcome and schedules the next attempt: at TTL expiry after an
    /// answer, after a backoff after a failure (or a partly failed answer, whichever comes
    /// first).
    fn apply(&mut self, outcome: Outcome, now: Instant, settings: &DnsSettings, jitter: f64) {
        match outcome {
            Outcome::Answer(answer) => {
                let life = settings.refresh_after(answer.ttl);
                self.endpoints = Some(answer.endpoints);
                self.answered_at = Some(now);
                self.valid_until = Some(now + life);
                self.targets = answer.targets;
                match answer.partial_error {
                    None => {
                        self.failures = 0;
                        self.error = None;
                        self.next_at = now + life;
                    }
                    Some(error) => {
                        self.failures += 1;
                        self.error = Some(error);
                        self.next_at = now + life.min(settings.backoff(self.failures, jitter));
                    }
                }
            }
            Outcome::Failed(error) => {
                self.failures += 1;
                self.error = Some(error);
                self.next_at = now + settings.backoff(self.failures, jitter);
            }
        }
    }
}

/// The resolution the questions add up to.
fn summarize(tracked: &[Tracked]) -> Resolution {
    let errors: Vec<&str> = tracked.iter().filter_map(|t| t.error.as_deref()).collect();
    let last_error = (!errors.is_empty()).then(|| errors.join("; "));
    let answered: Vec<&Tracked> = tracked.iter().filter(|t| t.endpoints.is_some()).collect();
    if answered.is_empty() {
        return Resolution {
            last_error,
            ..Resolution::pending()
        };
    }
    let mut endpoints: Vec<Endpoint> = answered
        .iter()
        .flat_map(|t| t.endpoints.iter().flatten())
        .map(|&addr| Endpoint { addr })
        .collect();
    endpoints.sort_unstable();
    endpoints.dedup();
    let fresh = answered.len() == tracked.len() && last_error.is_none();
    Resolution {
        endpoints,
        resolved_at: answered.iter().filter_map(|t| t.answered_at).min(),
        valid_until: answered.iter().filter_map(|t| t.valid_until).min(),
        last_error,
        source: if fresh {
            Source::Fresh
        } else {
            Source::LastKnownGood
        },
    }
}

/// Replaces the published resolution; wakes receivers only on a meaningful change.
fn publish(tx: &watch::Sender<Resolution>, query: &Query, new: Resolution) {
    tx.send_if_modified(|current| {
        let changed = current.endpoints != new.endpoints
            || current.source != new.source
            || current.last_error != new.last_error;
        if current.endpoints != new.endpoints {
            let endpoints: Vec<String> = new.endpoints.iter().map(|e| e.addr.to_string()).collect();
            tracing::info!(
                %query,
                endpoints = %endpoints.join(","),
                source = ?new.source,
                "DNS endpoints changed"
            );
        }
        match (&current.last_error, &new.last_error) {
            (None, Some(error)) => tracing::warn!(
                %query,
                %error,
                endpoints = new.endpoints.len(),
                "DNS resolution failing; keeping the last known endpoints"
            ),
            (Some(_), None) => tracing::info!(%query, "DNS resolution recovered"),
            _ => {}
        }
        *current = new;
        changed
    });
}

async fn run(
    client: DnsClient,
    query: Query,
    mut tracked: Vec<Tracked>,
    tx: watch::Sender<Resolution>,
    cancel: CancellationToken,
) {
    let settings = client.settings().clone();
    loop {
        let now = Instant::now();
        let mut attempts = JoinSet::new();
        for (index, t) in tracked.iter_mut().enumerate() {
            if t.next_at > now {
                continue;
            }
            // Provisional: if the attempt never reports back (a panic inside hickory), it
            // is retried after min_refresh rather than in a busy loop.
            t.next_at = now + settings.min_refresh;
            let client = client.clone();
            let question = t.question.clone();
            let previous = t.targets.clone();
            attempts.spawn(async move { (index, client.resolve(&question, &previous).await) });
        }
        if !attempts.is_empty() {
            let outcomes = tokio::select! {
                _ = cancel.cancelled() => return,
                outcomes = collect(&mut attempts) => outcomes,
            };
            let now = Instant::now();
            for (index, outcome) in outcomes {
                let question = &tracked[index].question;
                tracing::debug!(%query, %question, ?outcome, "DNS attempt");
                tracked[index].apply(outcome, now, &settings, fastrand::f64());
            }
            publish(&tx, &query, summarize(&tracked));
        }
        let next = tracked
            .iter()
            .map(|t| t.next_at)
            .min()
            .expect("every query has at least one question");
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep_until(next.into()) => {}
        }
    }
}

async fn collect(attempts: &mut JoinSet<(usize, Outcome)>) -> Vec<(usize, Outcome)> {
    let mut outcomes = Vec::with_capacity(attempts.len());
    while let Some(joined) = attempts.join_next().await {
        match joined {
            Ok(outcome) => outcomes.push(outcome),
            Err(e) => tracing::error!("DNS attempt panicked: {e}"),
        }
    }
    outcomes
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::sync::Mutex;

    use hickory_resolver::proto::op::{Message, MessageType, OpCode};
    use hickory_resolver::proto::rr::rdata::{A, AAAA, CNAME, SOA, SRV};
    use tokio::net::UdpSocket;

    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    fn name(s: &str) -> Name {
        parse_name(s).unwrap()
    }

    fn a(owner: &str, ttl: u32, ip: [u8; 4]) -> Record {
        Record::from_rdata(name(owner), ttl, RData::A(A(Ipv4Addr::from(ip))))
    }

    fn aaaa(owner: &str, ttl: u32, ip: Ipv6Addr) -> Record {
        Record::from_rdata(name(owner), ttl, RData::AAAA(AAAA(ip)))
    }

    fn cname(owner: &str, ttl: u32, target: &str) -> Record {
        Record::from_rdata(name(owner), ttl, RData::CNAME(CNAME(name(target))))
    }

    fn srv(owner: &str, ttl: u32, port: u16, target: &str) -> Record {
        Record::from_rdata(
            name(owner),
            ttl,
            RData::SRV(SRV::new(1, 1, port, name(target))),
        )
    }

    fn soa(zone: &str, ttl: u32, minimum: u32) -> Record {
        let soa = SOA::new(name("ns.test"), name("admin.test"), 1, 60, 60, 600, minimum);
        Record::from_rdata(name(zone), ttl, RData::SOA(soa))
    }

    fn response(answers: Vec<Record>, additionals: Vec<Record>) -> DnsResponse {
        let mut message = Message::new();
        message.set_message_type(MessageType::Response);
        message.add_answers(answers);
        message.add_additionals(additionals);
        DnsResponse::from_message(message).unwrap()
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn settings() -> DnsSettings {
        DnsSettings::default()
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let s = DnsSettings::default();
        assert_eq!(s.resolver, None);
        assert_eq!(s.min_refresh, Duration::from_secs(1));
        assert_eq!(s.max_refresh, Duration::from_secs(300));
        assert!(s.validate().is_ok());
    }

    #[test]
    fn settings_that_would_spin_or_contradict_are_refused() {
        let zero_min = DnsSettings {
            min_refresh: Duration::ZERO,
            ..settings()
        };
        assert!(
            zero_min
                .validate()
                .unwrap_err()
                .to_string()
                .contains("busy loop")
        );
        let inverted = DnsSettings {
            min_refresh: Duration::from_secs(10),
            max_refresh: Duration::from_secs(5),
            ..settings()
        };
        assert!(inverted.validate().is_err());
        let no_timeout = DnsSettings {
            timeout: Duration::ZERO,
            ..settings()
        };
        assert!(no_timeout.validate().is_err());
        assert!(DnsClient::new(&zero_min).is_err());
    }

    #[test]
    fn ttl_is_clamped_to_the_refresh_bounds() {
        let s = settings();
        // Consul's default TTL 0: ask again after min_refresh, not at once.
        assert_eq!(s.refresh_after(0), Duration::from_secs(1));
        assert_eq!(s.refresh_after(1), Duration::from_secs(1));
        assert_eq!(s.refresh_after(60), Duration::from_secs(60));
        assert_eq!(s.refresh_after(300), Duration::from_secs(300));
        assert_eq!(s.refresh_after(86_400), Duration::from_secs(300));
        assert_eq!(s.refresh_after(u32::MAX), Duration::from_secs(300));
    }

    #[test]
    fn backoff_doubles_from_min_refresh_up_to_the_cap_with_jitter_in_the_upper_half() {
        let s = settings();
        // jitter 0.999.. ~ the full base; jitter 0 = half of it.
        let full = |n| s.backoff(n, 1.0);
        assert_eq!(full(1), Duration::from_secs(1));
        assert_eq!(full(2), Duration::from_secs(2));
        assert_eq!(full(3), Duration::from_secs(4));
        assert_eq!(full(5), Duration::from_secs(16));
        assert_eq!(full(6), Duration::from_secs(30));
        assert_eq!(full(1000), Duration::from_secs(30));
        assert_eq!(s.backoff(1, 0.0), Duration::from_millis(500));
        assert_eq!(s.backoff(50, 0.0), Duration::from_secs(15));
        for n in 1..40 {
            for jitter in [0.0, 0.25, 0.5, 0.99] {
                let d = s.backoff(n, jitter);
                assert!(
                    d <= BACKOFF_CAP && d >= Duration::from_millis(500),
                    "{n} {jitter}: {d:?}"
                );
            }
        }
        // A min_refresh above the cap is still honoured.
        let slow = DnsSettings {
            min_refresh: Duration::from_secs(60),
            max_refresh: Duration::from_secs(600),
            ..settings()
        };
        assert_eq!(slow.backoff(3, 1.0), Duration::from_secs(60));
    }

    #[test]
    fn names_are_absolute_and_service_labels_are_accepted() {
        assert_eq!(name("orders.apps.local").to_string(), "orders.apps.local.");
        assert_eq!(name("orders.apps.local.").to_string(), "orders.apps.local.");
        assert_eq!(
            name("_orders._tcp.service.consul").to_string(),
            "_orders._tcp.service.consul."
        );
        assert!(name("orders").is_fqdn());
        for bad in ["", ".", "10.0.2.106", "::1", "a..b", &"x".repeat(64)] {
            let query = Query::Address {
                hostname: bad.to_string(),
                port: 80,
            };
            assert!(query.validate().is_err(), "{bad:?} accepted");
        }
        assert!(
            Query::Srv {
                name: "orders.apps.local".into()
            }
            .validate()
            .is_ok()
        );
    }

    #[test]
    fn an_address_query_asks_a_and_aaaa_with_its_port() {
        let questions = Query::Address {
            hostname: "orders.apps.local".into(),
            port: 8080,
        }
        .questions()
        .unwrap();
        let shown: Vec<String> = questions.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["A orders.apps.local.", "AAAA orders.apps.local."]);
        assert!(matches!(questions[0], Question::Address { port: 8080, .. }));
    }

    #[test]
    fn records_are_found_through_cnames_with_the_chain_ttl() {
        let r = response(
            vec![
                cname("orders.apps.local", 30, "lb.apps.local"),
                a("lb.apps.local", 60, [10, 0, 0, 1]),
                a("lb.apps.local", 45, [10, 0, 0, 2]),
                a("other.apps.local", 1, [10, 9, 9, 9]),
            ],
            vec![],
        );
        match follow(&r, &name("orders.apps.local"), RecordType::A) {
            Chain::Records { records, ttl } => {
                assert_eq!(ttl, 30);
                let ips: Vec<IpAddr> = records.iter().filter_map(address_of).collect();
                assert_eq!(
                    ips,
                    [IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2])]
                );
            }
            other => panic!("{other:?}"),
        }
        // Direct records: the smallest TTL among them.
        match follow(&r, &name("lb.apps.local"), RecordType::A) {
            Chain::Records { ttl, .. } => assert_eq!(ttl, 45),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_alias_without_its_target_records_is_reported_for_a_second_question() {
        let r = response(
            vec![cname("orders.apps.local", 20, "elsewhere.example")],
            vec![],
        );
        assert_eq!(
            follow(&r, &name("orders.apps.local"), RecordType::A),
            Chain::Alias {
                target: name("elsewhere.example"),
                ttl: 20
            }
        );
        // No records of the type, no alias: empty.
        let r = response(vec![a("orders.apps.local", 5, [10, 0, 0, 1])], vec![]);
        assert_eq!(
            follow(&r, &name("orders.apps.local"), RecordType::AAAA),
            Chain::Empty
        );
        // A CNAME loop ends rather than spinning.
        let r = response(
            vec![cname("x.test", 5, "y.test"), cname("y.test", 5, "x.test")],
            vec![],
        );
        assert!(matches!(
            follow(&r, &name("x.test"), RecordType::A),
            Chain::Alias { .. } | Chain::Empty
        ));
    }

    #[test]
    fn negative_answers_are_answers_and_server_errors_are_failures() {
        let q = name("orders.apps.local");
        let no_records = |code, negative_ttl| -> ProtoError {
            ProtoErrorKind::NoRecordsFound {
                query: Box::new(DnsQuestion::query(q.clone(), RecordType::A)),
                soa: None,
                ns: None,
                negative_ttl,
                response_code: code,
                trusted: true,
                authorities: None,
            }
            .into()
        };
        assert!(matches!(
            classify_error(
                &q,
                RecordType::A,
                &no_records(ResponseCode::NXDomain, Some(15)),
                SEC
            ),
            Reply::NoRecords { ttl: 15 }
        ));
        // NODATA without an SOA: not cacheable, ttl 0 (-> min_refresh).
        assert!(matches!(
            classify_error(
                &q,
                RecordType::A,
                &no_records(ResponseCode::NoError, None),
                SEC
            ),
            Reply::NoRecords { ttl: 0 }
        ));
        for code in [
            ResponseCode::ServFail,
            ResponseCode::Refused,
            ResponseCode::FormErr,
        ] {
            match classify_error(&q, RecordType::A, &no_records(code, None), SEC) {
                Reply::Failed(e) => assert!(
                    e.starts_with("A orders.apps.local.: the server answered"),
                    "{e}"
                ),
                other => panic!("{code}: {other:?}"),
            }
        }
        let timeout = ProtoError::from(ProtoErrorKind::Timeout);
        match classify_error(&q, RecordType::A, &timeout, 3 * SEC) {
            Reply::Failed(e) => assert_eq!(e, "A orders.apps.local.: no answer within 3s"),
            other => panic!("{other:?}"),
        }
        // A negative answer reached through an alias lasts no longer than the alias.
        assert!(matches!(
            Reply::NoRecords { ttl: 300 }.capped(20),
            Reply::NoRecords { ttl: 20 }
        ));
    }

    #[test]
    fn negative_ttl_comes_from_the_soa() {
        let mut message = Message::new();
        message.add_name_server(soa("apps.local", 900, 15));
        let r = DnsResponse::from_message(message).unwrap();
        assert_eq!(negative_ttl(&r), 15);
        assert_eq!(negative_ttl(&response(vec![], vec![])), 0);
    }

    #[test]
    fn srv_targets_and_their_glue_are_read_for_every_target() {
        let records = vec![
            srv("orders.apps.local", 60, 8080, "i-1.orders.apps.local"),
            srv("orders.apps.local", 60, 9090, "i-2.orders.apps.local"),
            Record::from_rdata(
                name("orders.apps.local"),
                60,
                RData::SRV(SRV::new(0, 0, 1, Name::root())),
            ),
        ];
        assert_eq!(
            srv_services(&records),
            [
                (name("i-1.orders.apps.local"), 8080),
                (name("i-2.orders.apps.local"), 9090)
            ]
        );
        let glue = vec![
            a("i-1.orders.apps.local", 30, [10, 0, 0, 1]),
            aaaa("i-1.orders.apps.local", 20, Ipv6Addr::LOCALHOST),
            a("i-2.orders.apps.local", 40, [10, 0, 0, 2]),
        ];
        let (ips, ttl) = additional_addresses(&glue, &name("i-1.orders.apps.local")).unwrap();
        assert_eq!(
            ips,
            [IpAddr::from([10, 0, 0, 1]), IpAddr::V6(Ipv6Addr::LOCALHOST)]
        );
        assert_eq!(ttl, 20);
        // The second target's glue too (hickory's caching resolver keeps only one's).
        let (ips, ttl) = additional_addresses(&glue, &name("I-2.Orders.apps.local")).unwrap();
        assert_eq!((ips, ttl), (vec![IpAddr::from([10, 0, 0, 2])], 40));
        assert!(additional_addresses(&glue, &name("i-3.orders.apps.local")).is_none());
    }

    fn tracked_address(now: Instant) -> Tracked {
        Tracked::new(
            Question::Address {
                name: name("orders.apps.local"),
                rtype: RecordType::A,
                port: 8080,
            },
            now,
        )
    }

    fn answer(endpoints: &[&str], ttl: u32) -> Outcome {
        Outcome::Answer(Answer {
            endpoints: endpoints.iter().map(|s| sa(s)).collect(),
            ttl,
            partial_error: None,
            targets: Targets::new(),
        })
    }

    #[test]
    fn an_answer_is_refreshed_at_its_ttl_and_a_failure_keeps_it() {
        let s = settings();
        let t0 = Instant::now();
        let mut t = tracked_address(t0);
        assert_eq!(summarize(std::slice::from_ref(&t)).source, Source::Pending);

        t.apply(answer(&["10.0.0.2:8080", "10.0.0.1:8080"], 60), t0, &s, 0.5);
        assert_eq!(t.next_at, t0 + Duration::from_secs(60));
        let r = summarize(std::slice::from_ref(&t));
        assert_eq!(r.source, Source::Fresh);
        assert_eq!(r.addrs(), [sa("10.0.0.1:8080"), sa("10.0.0.2:8080")]);
        assert_eq!(r.valid_until, Some(t0 + Duration::from_secs(60)));

        // The resolver fails: same endpoints, flagged, retried after a growing backoff.
        let t1 = t0 + Duration::from_secs(60);
        t.apply(
            Outcome::Failed("A orders.apps.local.: timed out".into()),
            t1,
            &s,
            1.0,
        );
        assert_eq!(t.next_at, t1 + Duration::from_secs(1));
        let t2 = t1 + Duration::from_secs(1);
        t.apply(
            Outcome::Failed("A orders.apps.local.: timed out".into()),
            t2,
            &s,
            1.0,
        );
        assert_eq!(t.next_at, t2 + Duration::from_secs(2));
        let r = summarize(std::slice::from_ref(&t));
        assert_eq!(r.source, Source::LastKnownGood);
        assert_eq!(r.addrs(), [sa("10.0.0.1:8080"), sa("10.0.0.2:8080")]);
        assert_eq!(
            r.last_error.as_deref(),
            Some("A orders.apps.local.: timed out")
        );
        assert_eq!(r.resolved_at, Some(t0));

        // It recovers: fresh again, backoff forgotten.
        let t3 = t2 + Duration::from_secs(2);
        t.apply(answer(&["10.0.0.3:8080"], 0), t3, &s, 1.0);
        assert_eq!(t.failures, 0);
        assert_eq!(t.next_at, t3 + s.min_refresh);
        let r = summarize(std::slice::from_ref(&t));
        assert_eq!(r.addrs(), [sa("10.0.0.3:8080")]);
        assert_eq!((r.source, r.last_error), (Source::Fresh, None));

        // The server says there are none any more: empty and fresh, not kept.
        t.apply(answer(&[], 0), t3 + s.min_refresh, &s, 1.0);
        let r = summarize(std::slice::from_ref(&t));
        assert_eq!((r.source, r.endpoints.len()), (Source::Fresh, 0));
    }

    #[test]
    fn failing_before_any_answer_stays_pending_with_the_error() {
        let s = settings();
        let t0 = Instant::now();
        let mut t = tracked_address(t0);
        t.apply(Outcome::Failed("A x.: refused".into()), t0, &s, 0.0);
        let r = summarize(std::slice::from_ref(&t));
        assert_eq!(r.source, Source::Pending);
        assert!(r.endpoints.is_empty());
        assert_eq!(r.last_error.as_deref(), Some("A x.: refused"));
    }

    #[test]
    fn questions_add_up_sorted_and_deduplicated_and_one_failing_question_marks_the_set() {
        let s = settings();
        let t0 = Instant::now();
        let mut v4 = tracked_address(t0);
        let mut v6 = Tracked::new(
            Question::Address {
                name: name("orders.apps.local"),
                rtype: RecordType::AAAA,
                port: 8080,
            },
            t0,
        );
        v4.apply(
            answer(&["10.0.0.2:8080", "10.0.0.1:8080", "10.0.0.2:8080"], 30),
            t0,
            &s,
            0.0,
        );
        v6.apply(answer(&["[2001:db8::1]:8080"], 10), t0, &s, 0.0);
        let both = [v4, v6];
        let r = summarize(&both);
        assert_eq!(
            r.addrs(),
            [
                sa("10.0.0.1:8080"),
                sa("10.0.0.2:8080"),
                sa("[2001:db8::1]:8080")
            ]
        );
        assert_eq!(r.valid_until, Some(t0 + Duration::from_secs(10)));
        assert_eq!(r.source, Source::Fresh);

        let [v4, mut v6] = both;
        v6.apply(
            Outcome::Failed("AAAA orders.apps.local.: SERVFAIL".into()),
            t0,
            &s,
            0.0,
        );
        let r = summarize(&[v4, v6]);
        assert_eq!(r.source, Source::LastKnownGood);
        assert_eq!(r.endpoints.len(), 3);
    }

    #[test]
    fn a_partly_failed_srv_answer_is_used_and_retried_early() {
        let s = settings();
        let t0 = Instant::now();
        let mut t = Tracked::new(
            Question::Srv {
                name: name("orders.apps.local"),
            },
            t0,
        );
        t.apply(
            Outcome::Answer(Answer {
                endpoints: vec![sa("10.0.0.1:8080")],
                ttl: 60,
                partial_error: Some("A i-2.orders.apps.local.: timed out".into()),
                targets: Targets::new(),
            }),
            t0,
            &s,
            1.0,
        );
        assert_eq!(t.next_at, t0 + Duration::from_secs(1));
        let r = summarize(std::slice::from_ref(&t));
        assert_eq!(r.source, Source::LastKnownGood);
        assert_eq!(r.addrs(), [sa("10.0.0.1:8080")]);
    }

    // ---- Against a DNS server on loopback: the real client, the real task. ----

    #[derive(Clone, Copy, PartialEq)]
    enum Mode {
        Answer,
        ServFail,
        /// Never answer: the client times out.
        Silent,
    }

    struct ZoneData {
        records: Vec<Record>,
        /// Put the SRV targets' addresses in the additional section.
        glue: bool,
        /// An SOA for negative answers (negative TTL = its minimum).
        soa: Option<Record>,
        mode: Mode,
        queries: Vec<(Name, RecordType)>,
    }

    /// A tiny authoritative server: answers from `records`, NXDOMAIN for unknown names,
    /// NODATA for known names without the type.
    struct FakeDns {
        addr: SocketAddr,
        zone: Arc<Mutex<ZoneData>>,
        task: JoinHandle<()>,
    }

    impl FakeDns {
        async fn start(records: Vec<Record>) -> Self {
            let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let addr = socket.local_addr().unwrap();
            let zone = Arc::new(Mutex::new(ZoneData {
                records,
                glue: true,
                soa: None,
                mode: Mode::Answer,
                queries: Vec::new(),
            }));
            let shared = zone.clone();
            let task = tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                loop {
                    let Ok((len, peer)) = socket.recv_from(&mut buf).await else {
                        return;
                    };
                    let Ok(request) = Message::from_vec(&buf[..len]) else {
                        continue;
                    };
                    let reply = answer_request(&shared, &request);
                    if let Some(bytes) = reply {
                        let _ = socket.send_to(&bytes, peer).await;
                    }
                }
            });
            Self { addr, zone, task }
        }

        fn zone(&self) -> std::sync::MutexGuard<'_, ZoneData> {
            self.zone.lock().unwrap()
        }

        fn set_records(&self, records: Vec<Record>) {
            self.zone().records = records;
        }

        fn settings(&self) -> DnsSettings {
            DnsSettings {
                resolver: Some(self.addr),
                min_refresh: Duration::from_millis(50),
                max_refresh: Duration::from_secs(300),
                timeout: Duration::from_millis(300),
            }
        }

        fn count(&self, qname: &str, rtype: RecordType) -> usize {
            let qname = name(qname);
            self.zone()
                .queries
                .iter()
                .filter(|(n, t)| *n == qname && *t == rtype)
                .count()
        }
    }

    impl Drop for FakeDns {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    fn answer_request(zone: &Mutex<ZoneData>, request: &Message) -> Option<Vec<u8>> {
        let mut zone = zone.lock().unwrap();
        let question = request.queries().first()?.clone();
        zone.queries
            .push((question.name().clone(), question.query_type()));
        let mut reply = Message::new();
        reply
            .set_id(request.id())
            .set_message_type(MessageType::Response)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(request.recursion_desired())
            .set_recursion_available(true)
            .set_authoritative(true)
            .add_query(question.clone());
        match zone.mode {
            Mode::Silent => return None,
            Mode::ServFail => {
                reply.set_response_code(ResponseCode::ServFail);
                return reply.to_vec().ok();
            }
            Mode::Answer => {}
        }
        let qname = question.name();
        let answers: Vec<Record> = zone
            .records
            .iter()
            .filter(|r| {
                r.name() == qname
                    && (r.record_type() == question.query_type()
                        || r.record_type() == RecordType::CNAME)
            })
            .cloned()
            .collect();
        if answers.is_empty() {
            let exists = zone.records.iter().any(|r| r.name() == qname);
            reply.set_response_code(if exists {
                ResponseCode::NoError
            } else {
                ResponseCode::NXDomain
            });
            if let Some(soa) = &zone.soa {
                reply.add_name_server(soa.clone());
            }
        } else if question.query_type() == RecordType::SRV && zone.glue {
            let glue: Vec<Record> = srv_services(&answers)
                .iter()
                .flat_map(|(target, _)| {
                    zone.records
                        .iter()
                        .filter(|r| r.name() == target && address_of(r).is_some())
                        .cloned()
                        .collect::<Vec<_>>()
                })
                .collect();
            reply.add_additionals(glue);
        }
        reply.add_answers(answers);
        reply.to_vec().ok()
    }

    /// Waits (up to 5 s) for a resolution matching `pred`.
    async fn wait_for(
        rx: &mut watch::Receiver<Resolution>,
        what: &str,
        pred: impl FnMut(&Resolution) -> bool,
    ) -> Resolution {
        let waited = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(pred))
            .await
            .map(|r| r.map(|r| r.clone()));
        match waited {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => panic!("watch closed while waiting for {what}"),
            Err(_) => panic!("timed out waiting for {what}; last: {:?}", *rx.borrow()),
        }
    }

    #[tokio::test]
    async fn address_watch_follows_record_changes_at_ttl_expiry() {
        let dns = FakeDns::start(vec![
            a("orders.apps.local", 0, [10, 0, 0, 2]),
            a("orders.apps.local", 0, [10, 0, 0, 1]),
        ])
        .await;
        let watch = watch(
            Query::Address {
                hostname: "orders.apps.local".into(),
                port: 8080,
            },
            &dns.settings(),
        )
        .unwrap();
        let mut rx = watch.subscribe();
        let r = wait_for(&mut rx, "first answer", |r| r.source == Source::Fresh).await;
        assert_eq!(r.addrs(), [sa("10.0.0.1:8080"), sa("10.0.0.2:8080")]);
        assert!(r.resolved_at.is_some() && r.valid_until > r.resolved_at);

        dns.set_records(vec![
            a("orders.apps.local", 0, [10, 0, 0, 3]),
            aaaa("orders.apps.local", 0, "2001:db8::3".parse().unwrap()),
        ]);
        let r = wait_for(&mut rx, "changed records", |r| {
            r.endpoints.len() == 2 && r.addrs()[0] == sa("10.0.0.3:8080")
        })
        .await;
        assert_eq!(r.addrs(), [sa("10.0.0.3:8080"), sa("[2001:db8::3]:8080")]);
        assert_eq!(r.source, Source::Fresh);
        watch.stop().await;
    }

    #[tokio::test]
    async fn a_long_ttl_is_not_asked_again_before_it_expires() {
        let dns = FakeDns::start(vec![a("orders.apps.local", 3600, [10, 0, 0, 1])]).await;
        // The AAAA question gets NODATA with an SOA: negative TTL 3600 too.
        dns.zone().soa = Some(soa("apps.local", 3600, 3600));
        let watch = watch(
            Query::Address {
                hostname: "orders.apps.local".into(),
                port: 80,
            },
            &dns.settings(),
        )
        .unwrap();
        let mut rx = watch.subscribe();
        wait_for(&mut rx, "first answer", |r| r.source == Source::Fresh).await;
        // (A lost datagram on a loaded machine may have cost a retry; what matters is that
        // nothing is asked again while the answers are valid.)
        let asked = |t| dns.count("orders.apps.local", t);
        let (v4, v6) = (asked(RecordType::A), asked(RecordType::AAAA));
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!((asked(RecordType::A), asked(RecordType::AAAA)), (v4, v6));
        let r = watch.current();
        let life = r.valid_until.unwrap() - r.resolved_at.unwrap();
        assert_eq!(life, Duration::from_secs(300), "clamped to max_refresh");
    }

    #[tokio::test]
    async fn server_failures_keep_the_last_known_good_endpoints() {
        let dns = FakeDns::start(vec![a("orders.apps.local", 0, [10, 0, 0, 1])]).await;
        let watch = watch(
            Query::Address {
                hostname: "orders.apps.local".into(),
                port: 8080,
            },
            &dns.settings(),
        )
        .unwrap();
        let mut rx = watch.subscribe();
        wait_for(&mut rx, "first answer", |r| r.source == Source::Fresh).await;

        dns.zone().mode = Mode::ServFail;
        let r = wait_for(&mut rx, "SERVFAIL noticed", |r| {
            r.source == Source::LastKnownGood
        })
        .await;
        assert_eq!(r.addrs(), [sa("10.0.0.1:8080")]);
        assert!(
            r.last_error
                .as_deref()
                .unwrap()
                .contains("the server answered"),
            "{r:?}"
        );

        dns.zone().mode = Mode::Silent;
        let r = wait_for(&mut rx, "timeout noticed", |r| {
            r.last_error
                .as_deref()
                .is_some_and(|e| e.contains("no answer within"))
        })
        .await;
        assert_eq!(r.addrs(), [sa("10.0.0.1:8080")]);
        assert_eq!(r.source, Source::LastKnownGood);

        dns.zone().mode = Mode::Answer;
        let r = wait_for(&mut rx, "recovery", |r| r.source == Source::Fresh).await;
        assert_eq!((r.addrs(), r.last_error), (vec![sa("10.0.0.1:8080")], None));
    }

    #[tokio::test]
    async fn nxdomain_after_an_answer_empties_the_set() {
        let dns = FakeDns::start(vec![a("orders.apps.local", 0, [10, 0, 0, 1])]).await;
        let watch = watch(
            Query::Address {
                hostname: "orders.apps.local".into(),
                port: 8080,
            },
            &dns.settings(),
        )
        .unwrap();
        let mut rx = watch.subscribe();
        wait_for(&mut rx, "first answer", |r| !r.endpoints.is_empty()).await;
        dns.set_records(vec![]);
        let r = wait_for(&mut rx, "empty set", |r| r.endpoints.is_empty()).await;
        assert_eq!((r.source, r.last_error), (Source::Fresh, None));
    }

    #[tokio::test]
    async fn a_server_that_never_answers_leaves_the_watch_pending() {
        let dns = FakeDns::start(vec![]).await;
        dns.zone().mode = Mode::Silent;
        let watch = watch(
            Query::Srv {
                name: "orders.apps.local".into(),
            },
            &dns.settings(),
        )
        .unwrap();
        let mut rx = watch.subscribe();
        let r = wait_for(&mut rx, "an error", |r| r.last_error.is_some()).await;
        assert_eq!(r.source, Source::Pending);
        assert!(r.endpoints.is_empty());
    }

    #[tokio::test]
    async fn srv_watch_uses_glue_for_every_target_and_looks_up_the_rest() {
        let records = vec![
            srv("orders.apps.local", 60, 8080, "i-1.orders.apps.local"),
            srv("orders.apps.local", 60, 9090, "i-2.orders.apps.local"),
            a("i-1.orders.apps.local", 60, [10, 0, 0, 1]),
            a("i-2.orders.apps.local", 60, [10, 0, 0, 2]),
        ];
        let dns = FakeDns::start(records.clone()).await;
        let client = DnsClient::new(&dns.settings()).unwrap();
        let query = Query::Srv {
            name: "orders.apps.local".into(),
        };
        let glued = client.watch(query.clone()).unwrap();
        let mut rx = glued.subscribe();
        let r = wait_for(&mut rx, "SRV answer", |r| r.source == Source::Fresh).await;
        assert_eq!(r.addrs(), [sa("10.0.0.1:8080"), sa("10.0.0.2:9090")]);
        // The additional section was enough: no question about the targets.
        assert_eq!(dns.count("i-1.orders.apps.local", RecordType::A), 0);
        glued.stop().await;

        // Without glue (Route 53), each target is asked for A and AAAA.
        dns.zone().glue = false;
        let looked_up = client.watch(query).unwrap();
        let mut rx = looked_up.subscribe();
        let r = wait_for(&mut rx, "SRV answer", |r| r.source == Source::Fresh).await;
        assert_eq!(r.addrs(), [sa("10.0.0.1:8080"), sa("10.0.0.2:9090")]);
        assert!(dns.count("i-1.orders.apps.local", RecordType::A) >= 1);
        assert!(dns.count("i-2.orders.apps.local", RecordType::AAAA) >= 1);
    }

    #[tokio::test]
    async fn consul_style_srv_with_ttl_zero_is_polled_at_min_refresh() {
        let dns = FakeDns::start(vec![
            srv(
                "_orders._tcp.service.consul",
                0,
                21000,
                "node-1.node.dc1.consul",
            ),
            a("node-1.node.dc1.consul", 0, [10, 0, 1, 1]),
        ])
        .await;
        let watch = watch(
            Query::Srv {
                name: "_orders._tcp.service.consul".into(),
            },
            &dns.settings(),
        )
        .unwrap();
        let mut rx = watch.subscribe();
        let r = wait_for(&mut rx, "SRV answer", |r| r.source == Source::Fresh).await;
        assert_eq!(r.addrs(), [sa("10.0.1.1:21000")]);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let asked = dns.count("_orders._tcp.service.consul", RecordType::SRV);
        // ~10 at 50 ms; bounds loose for a loaded machine, but not a busy loop.
        assert!((3..=20).contains(&asked), "asked {asked} times in 500 ms");
    }

    #[tokio::test]
    async fn stop_ends_the_task_and_closes_the_channel() {
        let dns = FakeDns::start(vec![a("orders.apps.local", 0, [10, 0, 0, 1])]).await;
        let watch = watch(
            Query::Address {
                hostname: "orders.apps.local".into(),
                port: 1,
            },
            &dns.settings(),
        )
        .unwrap();
        let mut rx = watch.subscribe();
        wait_for(&mut rx, "first answer", |r| r.source == Source::Fresh).await;
        watch.stop().await;
        assert!(rx.changed().await.is_err(), "the sender is gone");
        let before = dns.count("orders.apps.local", RecordType::A);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(dns.count("orders.apps.local", RecordType::A), before);
        // The last resolution stays readable.
        assert_eq!(rx.borrow().addrs(), [sa("10.0.0.1:1")]);
    }
}
