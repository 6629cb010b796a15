//! The mesh configuration model: App Mesh's objects (virtual services, virtual nodes, virtual
//! routers, routes) and the mesh-wide routing settings, as they are written in the agent's
//! TOML configuration file. docs/routing.md describes every field.
//!
//! These are the *written* form: every scalar that names another object, or whose value
//! needs checking beyond its type, is a [`Spanned`] so that validation
//! ([`super::validate`]) can name the file, line and field of a mistake. (Tables are never
//! `Spanned`: `toml` 0.8 has no span for a table written with dotted keys, e.g.
//! `match.prefix = "/"`, and would refuse it.) The compiled form used per request is
//! [`super::table::RoutingTable`].
//!
//! The top-level keys (`routing`, `virtual_services`, `virtual_nodes`, `virtual_routers`,
//! `routes`) are meant to become `#[serde(default)]` fields of the agent's `Config`, exactly
//! as [`RoutingSpec`] declares them. Spans are only meaningful when the text is parsed with
//! the `toml` crate, which is how the configuration file is always read.

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// The routing sections of the configuration file. Other top-level keys are ignored here
/// (they belong to the agent's `Config`, which rejects unknown keys).
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(default)]
pub struct RoutingSpec {
    /// Mesh-wide settings: `[routing.retry_budget]`, `[routing.override_header]`.
    pub routing: RoutingSettings,
    /// `[[virtual_services]]`: the names applications call.
    pub virtual_services: Vec<VirtualServiceSpec>,
    /// `[[virtual_nodes]]`: groups of endpoints that traffic is sent to.
    pub virtual_nodes: Vec<VirtualNodeSpec>,
    /// `[[virtual_routers]]`: what spreads a virtual service's traffic over virtual nodes.
    pub virtual_routers: Vec<VirtualRouterSpec>,
    /// `[[routes]]`: the rules of the virtual routers (each names its router).
    pub routes: Vec<RouteSpec>,
}

impl RoutingSpec {
    /// True when the file declares no routing objects (the mesh-wide settings alone route
    /// nothing).
    pub fn is_empty(&self) -> bool {
        self.virtual_services.is_empty()
            && self.virtual_nodes.is_empty()
            && self.virtual_routers.is_empty()
            && self.routes.is_empty()
    }
}

/// `[routing]`: mesh-wide routing settings.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingSettings {
    pub retry_budget: RetryBudgetSpec,
    pub override_header: OverrideHeaderSpec,
    pub protocol_detection: ProtocolDetectionSpec,
}

/// `[routing.protocol_detection]`: how a connection to a meshed workload is treated when no
/// virtual node declares the protocol of its port. The first bytes the application sends
/// decide (HTTP/1.x request line or the HTTP/2 preface: proxied as HTTP, with request
/// metrics; anything else: opaque TCP). An application that sends nothing first (a
/// server-speaks-first protocol such as MySQL or SMTP) is carried as opaque TCP once
/// `timeout` has passed, delayed by that much; such ports belong in `opaque_ports`, or in a
/// virtual node listener with protocol `tcp`, where there is no detection at all.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProtocolDetectionSpec {
    /// How long to wait for the application's first bytes (default 100ms, at most 10s);
    /// `0s` turns detection off: undeclared ports are opaque TCP.
    pub timeout: Option<Spanned<HumanDuration>>,
    /// Ports never inspected (default: Linkerd's list of server-speaks-first and binary
    /// protocols: SMTP 25 and 587, MySQL 3306, Galera 4444, PostgreSQL 5432, Redis 6379,
    /// Elasticsearch 9300, memcached 11211).
    pub opaque_ports: Option<Vec<u16>>,
}

/// `[routing.retry_budget]`: how many retries the agent may add on top of the requests it
/// carries, per virtual service (as Linkerd's retry budget): at any time, the retries of the
/// last `window` are at most `min_retries_per_second × window + ratio × requests of the last
/// window`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryBudgetSpec {
    /// Retries allowed per original request, 0 to 1 (default 0.2: at most 20% extra load).
    pub ratio: Option<Spanned<f64>>,
    /// Retries always allowed per second, whatever the request rate (default 10), so a
    /// service with little traffic can still retry.
    pub min_retries_per_second: Option<Spanned<u32>>,
    /// The sliding window requests and retries are counted over (default 10s, 1s to 5m).
    pub window: Option<Spanned<HumanDuration>>,
}

/// `[routing.override_header]`: the per-request routing override (like Linkerd's
/// `l5d-dtab`): `mesh-route: serviceb.apps.local=serviceBv2`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OverrideHeaderSpec {
    /// The header's name (default `mesh-route`).
    pub name: Option<Spanned<String>>,
    /// Source identities whose requests may carry it, in the syntax of `[[policies]] allow`:
    /// SPIFFE ids, `spiffe://<td>/.../*` prefixes, IAM role ARNs, or `*`. Empty (the
    /// default): the header is honoured from no one.
    pub allow_from: Vec<Spanned<String>>,
}

/// `[[virtual_services]]`: a name applications call, e.g. `serviceb.apps.local`, and what
/// provides it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtualServiceSpec {
    /// A DNS name (matched case-insensitively against the request's host).
    pub name: Spanned<String>,
    /// The addresses the name resolves to for applications (what their DNS answers, e.g. a
    /// Cloud Map or Route 53 record): connections to them on the provider's listener ports are
    /// captured and routed.
    #[serde(default)]
    pub addresses: Vec<std::net::IpAddr>,
    /// `provider = { virtual_router = "serviceB" }` or `{ virtual_node = "serviceB" }`.
    pub provider: ProviderSpec,
}

/// Exactly one of the two.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSpec {
    #[serde(default)]
    pub virtual_node: Option<Spanned<String>>,
    #[serde(default)]
    pub virtual_router: Option<Spanned<String>>,
}

/// `[[virtual_nodes]]`: a group of endpoints, found through exactly one of `service`,
/// `endpoint` or `task`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtualNodeSpec {
    pub name: Spanned<String>,
    /// The ports the node's endpoints serve, with their protocol.
    #[serde(default)]
    pub listeners: Vec<ListenerSpec>,
    /// The name of a `[[services]]` entry (endpoints from DNS: Cloud Map, Consul)...
    #[serde(default)]
    pub service: Option<Spanned<String>>,
    /// ...or of an `[[endpoints]]` entry (static addresses of a workload on another node)...
    #[serde(default)]
    pub endpoint: Option<Spanned<String>>,
    /// ...or the id of a task of this node.
    #[serde(default)]
    pub task: Option<Spanned<String>>,
}

/// A port and the protocol spoken on it (App Mesh's `portMapping`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSpec {
    pub port: Spanned<u16>,
    pub protocol: Protocol,
}

/// Listener protocols, and the kinds of route (App Mesh's `httpRoute`, `http2Route`,
/// `grpcRoute`, `tcpRoute`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http,
    Http2,
    Grpc,
    Tcp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Http2 => "http2",
            Protocol::Grpc => "grpc",
            Protocol::Tcp => "tcp",
        }
    }

    /// Whether requests (rather than connections) are routed: http, http2 and grpc.
    pub fn is_request_level(self) -> bool {
        self != Protocol::Tcp
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[[virtual_routers]]`: spreads a virtual service's traffic over virtual nodes with
/// `[[routes]]` that name it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtualRouterSpec {
    pub name: Spanned<String>,
    /// At least one; the protocols decide which kinds of route the router may have.
    pub listeners: Vec<ListenerSpec>,
}

/// `[[routes]]`: one rule of a virtual router.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// Unique within its router.
    pub name: Spanned<String>,
    /// The `[[virtual_routers]]` entry this route belongs to.
    pub virtual_router: Spanned<String>,
    /// 0 (first) to 1000 (last), unique within the router. Routes without a priority come
    /// after all routes with one, most specific match first.
    #[serde(default)]
    pub priority: Option<Spanned<u32>>,
    /// `http`, `http2`, `grpc` or `tcp`. May be left out when the router's listeners all
    /// have one protocol: the route then has that kind.
    #[serde(default)]
    pub kind: Option<Spanned<Protocol>>,
    /// What requests the route takes; absent: every request (tcp routes have none).
    #[serde(default, rename = "match")]
    pub matcher: Option<RouteMatchSpec>,
    pub action: ActionSpec,
    #[serde(default)]
    pub retry_policy: Option<RetryPolicySpec>,
    #[serde(default)]
    pub timeout: Option<TimeoutSpec>,
}

/// `[routes.match]`. HTTP kinds (`http`, `http2`) use `prefix` or `path`, `method` and
/// `headers`; `grpc` uses `service_name`, `method_name` and `metadata`. All given
/// conditions must hold.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatchSpec {
    /// The request path (without the query string) starts with this; must start with `/`.
    #[serde(default)]
    pub prefix: Option<Spanned<String>>,
    /// `path = { exact = "/x" }` or `path = { regex = "/v[0-9]+/.*" }` (the regex must match
    /// the whole path).
    #[serde(default)]
    pub path: Option<PathMatchSpec>,
    #[serde(default)]
    pub method: Option<Spanned<HttpMethod>>,
    #[serde(default)]
    pub headers: Vec<HeaderMatchSpec>,
    /// gRPC: the fully qualified service, e.g. `orders.v1.Orders`.
    #[serde(default)]
    pub service_name: Option<Spanned<String>>,
    /// gRPC: the method, e.g. `Get`; needs `service_name`.
    #[serde(default)]
    pub method_name: Option<Spanned<String>>,
    /// gRPC: request metadata, matched as `headers` are.
    #[serde(default)]
    pub metadata: Vec<HeaderMatchSpec>,
}

/// Exactly one of the two.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathMatchSpec {
    /// Must start with `/`.
    #[serde(default)]
    pub exact: Option<Spanned<String>>,
    #[serde(default)]
    pub regex: Option<Spanned<String>>,
}

/// The methods App Mesh routes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Connect,
    Options,
    Trace,
    Patch,
}

impl HttpMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            HttpMethod::Get => "GET",
            HttpMethod::Head => "HEAD",
            HttpMethod::Post => "POST",
            HttpMethod::Put => "PUT",
            HttpMethod::Delete => "DELETE",
            HttpMethod::Connect => "CONNECT",
            HttpMethod::Options => "OPTIONS",
            HttpMethod::Trace => "TRACE",
            HttpMethod::Patch => "PATCH",
        }
    }
}

/// One header (or gRPC metadata) condition.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatchSpec {
    /// Header name, case-insensitive.
    pub name: Spanned<String>,
    /// Negates the whole condition (presence included).
    #[serde(default)]
    pub invert: bool,
    /// Absent: the header is present (with any value).
    #[serde(default, rename = "match")]
    pub matcher: Option<HeaderValueMatchSpec>,
}

/// How a header's value is matched: exactly one of these. `range` parses the value as a
/// (signed, decimal) integer: `start <= value < end`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderValueMatchSpec {
    #[serde(default)]
    pub exact: Option<Spanned<String>>,
    #[serde(default)]
    pub prefix: Option<Spanned<String>>,
    #[serde(default)]
    pub suffix: Option<Spanned<String>>,
    /// Must match the whole value.
    #[serde(default)]
    pub regex: Option<Spanned<String>>,
    #[serde(default)]
    pub range: Option<RangeSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RangeSpec {
    pub start: Spanned<i64>,
    pub end: Spanned<i64>,
}

/// `[routes.action]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionSpec {
    /// 1 to 10 targets; each request (tcp: each connection) goes to one of them with a
    /// probability proportional to its weight.
    pub weighted_targets: Vec<WeightedTargetSpec>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedTargetSpec {
    pub virtual_node: Spanned<String>,
    /// 0 to 100 (0: never chosen; the weights of a route must not all be 0).
    pub weight: Spanned<u32>,
    /// Which listener of the node; required when it has more than one.
    #[serde(default)]
    pub port: Option<Spanned<u16>>,
}

/// `[routes.retry_policy]` (request-level routes only).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicySpec {
    /// Retries after the first attempt (the retry budget may allow fewer).
    pub max_retries: u32,
    /// Timeout of each attempt.
    pub per_retry_timeout: Spanned<HumanDuration>,
    #[serde(default)]
    pub http_retry_events: Vec<HttpRetryEvent>,
    #[serde(default)]
    pub tcp_retry_events: Vec<TcpRetryEvent>,
    /// gRPC routes only.
    #[serde(default)]
    pub grpc_retry_events: Vec<GrpcRetryEvent>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[allow(clippy::enum_variant_names)] // App Mesh's names
pub enum HttpRetryEvent {
    /// Any 5xx response.
    ServerError,
    /// 502, 503 or 504.
    GatewayError,
    /// 409.
    ClientError,
    /// The upstream reset the stream (HTTP/2 `REFUSED_STREAM` and resets).
    StreamError,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TcpRetryEvent {
    /// The connection to the upstream failed or was closed before a response.
    ConnectionError,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GrpcRetryEvent {
    Cancelled,
    DeadlineExceeded,
    Internal,
    ResourceExhausted,
    Unavailable,
}

impl GrpcRetryEvent {
    /// The `grpc-status` code.
    pub fn code(self) -> u32 {
        match self {
            GrpcRetryEvent::Cancelled => 1,
            GrpcRetryEvent::DeadlineExceeded => 4,
            GrpcRetryEvent::ResourceExhausted => 8,
            GrpcRetryEvent::Internal => 13,
            GrpcRetryEvent::Unavailable => 14,
        }
    }
}

/// `[routes.timeout]`. `0s` disables a timeout.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutSpec {
    /// Whole request, retries included (default 15s; not for tcp routes).
    #[serde(default)]
    pub per_request: Option<Spanned<HumanDuration>>,
    /// No bytes in either direction for this long closes the stream or connection
    /// (default 300s).
    #[serde(default)]
    pub idle: Option<Spanned<HumanDuration>>,
}

/// A duration written in humantime syntax (`500ms`, `15s`, `2m`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map(HumanDuration)
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid duration `{s}`: {e} (write e.g. \"500ms\", \"15s\", \"2m\")"
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_field() {
        let spec: RoutingSpec = toml::from_str(
            r#"
            [routing.retry_budget]
            ratio = 0.25
            min_retries_per_second = 5
            window = "20s"

            [routing.override_header]
            name = "x-route"
            allow_from = ["*"]

            [[virtual_services]]
            name = "serviceb.apps.local"
            provider = { virtual_router = "serviceB" }

            [[virtual_nodes]]
            name = "serviceB"
            listeners = [{ port = 8080, protocol = "http" }]
            service = "serviceb"

            [[virtual_routers]]
            name = "serviceB"
            listeners = [{ port = 8080, protocol = "http" }]

            [[routes]]
            name = "r"
            virtual_router = "serviceB"
            priority = 3
            kind = "http"
            match.prefix = "/api"
            match.method = "POST"
            match.headers = [
              { name = "x-a", match = { exact = "1" } },
              { name = "x-b", invert = true, match = { range = { start = 1, end = 5 } } },
              { name = "x-c" },
            ]
            [routes.action]
            weighted_targets = [{ virtual_node = "serviceB", weight = 100, port = 8080 }]
            [routes.retry_policy]
            max_retries = 2
            per_retry_timeout = "500ms"
            http_retry_events = ["server-error", "gateway-error", "client-error", "stream-error"]
            tcp_retry_events = ["connection-error"]
            [routes.timeout]
            per_request = "3s"
            idle = "0s"
            "#,
        )
        .unwrap();
        assert_eq!(
            *spec.routing.retry_budget.ratio.as_ref().unwrap().get_ref(),
            0.25
        );
        assert_eq!(
            spec.routing
                .retry_budget
                .window
                .as_ref()
                .unwrap()
                .get_ref()
                .0,
            Duration::from_secs(20)
        );
        let route = &spec.routes[0];
        assert_eq!(route.kind.as_ref().unwrap().get_ref(), &Protocol::Http);
        let m = route.matcher.as_ref().unwrap();
        assert_eq!(m.prefix.as_ref().unwrap().get_ref(), "/api");
        assert_eq!(m.method.as_ref().unwrap().get_ref(), &HttpMethod::Post);
        let range = m.headers[1]
            .matcher
            .as_ref()
            .unwrap()
            .range
            .as_ref()
            .unwrap();
        assert_eq!((*range.start.get_ref(), *range.end.get_ref()), (1, 5));
        assert!(m.headers[1].invert);
        assert!(m.headers[2].matcher.is_none());
        let retry = route.retry_policy.as_ref().unwrap();
        assert_eq!(retry.http_retry_events.len(), 4);
        assert_eq!(
            retry.per_retry_timeout.get_ref().0,
            Duration::from_millis(500)
        );
        let timeout = route.timeout.as_ref().unwrap();
        assert_eq!(timeout.idle.as_ref().unwrap().get_ref().0, Duration::ZERO);
        assert!(!spec.is_empty());
    }

    #[test]
    fn other_top_level_keys_are_ignored_and_typos_inside_are_not() {
        let spec: RoutingSpec = toml::from_str("[agent]\nx = 1\n[[tasks]]\nid = \"a\"\n").unwrap();
        assert!(spec.is_empty());
        let err = toml::from_str::<RoutingSpec>("[routing.retry_budget]\nratoi = 1.0\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `ratoi`"), "{err}");
    }

    #[test]
    fn durations_are_humantime() {
        let err =
            toml::from_str::<RoutingSpec>("[routing.retry_budget]\nwindow = \"10 parsecs\"\n")
                .unwrap_err()
                .to_string();
        assert!(err.contains("invalid duration `10 parsecs`"), "{err}");
    }
}
