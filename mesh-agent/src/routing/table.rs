//! The compiled, immutable routing table consulted per request (HTTP, HTTP/2, gRPC) and per
//! connection (TCP). It is built by [`super::validate`] from the configuration and replaced
//! whole on reload (the proxy keeps it behind an `Arc`).
//!
//! Routing a request to virtual service `S`:
//!
//! 1. `S` is looked up by name (case-insensitive, without port or trailing dot).
//! 2. A virtual-node provider gets every request. A virtual-router provider tries its routes
//!    in this order, and the first whose match holds wins:
//!    1. routes with a `priority`, lowest number first (priorities are unique per router);
//!    2. then routes without one, most specific first: exact path, then regex path, then
//!       prefix (longer prefixes first), then no path condition; gRPC routes naming a
//!       method before those naming only a service before those naming neither; then more
//!       header (metadata) conditions first, then a route with a method before one without;
//!       remaining ties in file order.
//!
//!    gRPC routes only take gRPC requests (`content-type: application/grpc...`); http and
//!    http2 routes take any request. No route matching: no decision (the proxy answers
//!    404, as App Mesh does).
//! 3. The route's target is drawn by weight — unless the override header applies
//!    ([`super::overrides`]), which replaces the draw with the node it names; the route's
//!    retry policy and timeouts stay.
//!
//! A TCP connection to `S` takes the router's first tcp route in the same order (tcp routes
//! have no match), and its target is drawn by weight per connection.

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::Duration;

use http::{HeaderMap, HeaderName, Method};
use regex::Regex;

use super::budget::RetryBudgetSettings;
use super::model::{HttpMethod, HttpRetryEvent, Protocol};
use super::overrides::{self, OverrideHeader};
use crate::identity::SpiffeId;

/// Default per-request timeout of request-level routes (App Mesh's and Envoy's 15 s).
pub const DEFAULT_PER_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Default idle timeout of streams and connections (App Mesh's 300 s).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Where a random number comes from when a target is drawn. Tests pass a seeded
/// `fastrand::Rng`; the proxy uses [`ThreadRandom`].
pub trait RandomSource {
    /// A uniformly random number in `0..bound` (`bound > 0`).
    fn below(&mut self, bound: u32) -> u32;
}

impl RandomSource for fastrand::Rng {
    fn below(&mut self, bound: u32) -> u32 {
        self.u32(..bound)
    }
}

/// fastrand's thread-local generator.
#[derive(Debug, Default, Clone, Copy)]
pub struct ThreadRandom;

impl RandomSource for ThreadRandom {
    fn below(&mut self, bound: u32) -> u32 {
        fastrand::u32(..bound)
    }
}

/// How a virtual node's endpoints are found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Discovery {
    /// A `[[services]]` entry (DNS).
    Service(String),
    /// An `[[endpoints]]` entry (static, on another node).
    Endpoint(String),
    /// A task of this node.
    Task(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listener {
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualNode {
    pub(super) name: String,
    pub(super) discovery: Discovery,
    pub(super) listeners: Vec<Listener>,
}

impl VirtualNode {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn discovery(&self) -> &Discovery {
        &self.discovery
    }

    pub fn listeners(&self) -> &[Listener] {
        &self.listeners
    }

    /// The protocol of the listener on `port`, if the node declares it.
    pub fn protocol_on(&self, port: u16) -> Option<Protocol> {
        listener_protocol(&self.listeners, port)
    }
}

fn listener_protocol(listeners: &[Listener], port: u16) -> Option<Protocol> {
    listeners
        .iter()
        .find(|l| l.port == port)
        .map(|l| l.protocol)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Provider {
    Node(usize),
    Router(usize),
}

/// A node (and the port to reach it on) that a virtual service may send traffic to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct TargetRef {
    pub(super) node: usize,
    pub(super) port: Option<u16>,
}

#[derive(Debug, Clone)]
pub(super) struct VirtualService {
    pub(super) name: String,
    pub(super) provider: Provider,
    /// Every node a request to this service can reach: what the override header may name.
    pub(super) override_targets: Vec<TargetRef>,
}

#[derive(Debug, Clone)]
pub(super) struct VirtualRouter {
    pub(super) name: String,
    pub(super) listeners: Vec<Listener>,
    /// http, http2 and grpc routes, in matching order.
    pub(super) request_routes: Vec<Route>,
    /// tcp routes, in matching order.
    pub(super) tcp_routes: Vec<Route>,
}

#[derive(Debug, Clone)]
pub(super) struct Route {
    pub(super) name: String,
    pub(super) kind: Protocol,
    pub(super) matcher: RequestMatch,
    pub(super) targets: Vec<WeightedTarget>,
    pub(super) total_weight: u32,
    pub(super) retry: Option<RetryPolicy>,
    pub(super) timeouts: Timeouts,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct WeightedTarget {
    pub(super) target: TargetRef,
    pub(super) weight: u32,
}

/// The conditions of a request-level route (all must hold).
#[derive(Debug, Clone, Default)]
pub(super) struct RequestMatch {
    pub(super) path: PathMatcher,
    pub(super) method: Option<HttpMethod>,
    pub(super) headers: Vec<HeaderMatcher>,
    /// gRPC routes: only gRPC requests, optionally of this service and method.
    pub(super) grpc: Option<GrpcMatcher>,
}

#[derive(Debug, Clone, Default)]
pub(super) enum PathMatcher {
    #[default]
    Any,
    Prefix(String),
    Exact(String),
    /// Anchored at both ends.
    Regex(Regex),
}

#[derive(Debug, Clone, Default)]
pub(super) struct GrpcMatcher {
    pub(super) service: Option<String>,
    pub(super) method: Option<String>,
}

#[derive(Debug, Clone)]
pub(super) struct HeaderMatcher {
    pub(super) name: HeaderName,
    pub(super) invert: bool,
    pub(super) value: ValueMatcher,
}

#[derive(Debug, Clone)]
pub(super) enum ValueMatcher {
    Present,
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// Anchored at both ends.
    Regex(Regex),
    /// `start <= value < end`.
    Range {
        start: i64,
        end: i64,
    },
}

impl RequestMatch {
    /// How specific the match is, for ordering routes without a priority: larger first.
    pub(super) fn specificity(&self) -> (u8, usize, u8, usize, bool) {
        let (path_rank, prefix_len) = match &self.path {
            PathMatcher::Exact(_) => (3, 0),
            PathMatcher::Regex(_) => (2, 0),
            PathMatcher::Prefix(p) => (1, p.len()),
            PathMatcher::Any => (0, 0),
        };
        let grpc_rank = self.grpc.as_ref().map_or(0, |g| {
            u8::from(g.service.is_some()) + u8::from(g.method.is_some())
        });
        (
            path_rank,
            prefix_len,
            grpc_rank,
            self.headers.len(),
            self.method.is_some(),
        )
    }

    fn matches(&self, req: &RequestView<'_>) -> bool {
        if let Some(g) = &self.grpc {
            if !req.is_grpc() {
                return false;
            }
            // `/package.Service/Method`
            let mut parts = req
                .bare_path()
                .strip_prefix('/')
                .unwrap_or("")
                .splitn(2, '/');
            let (service, method) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            if g.service.as_deref().is_some_and(|s| s != service)
                || g.method.as_deref().is_some_and(|m| m != method)
            {
                return false;
            }
        }
        let path = req.bare_path();
        let path_ok = match &self.path {
            PathMatcher::Any => true,
            PathMatcher::Prefix(p) => path.starts_with(p.as_str()),
            PathMatcher::Exact(p) => path == p,
            PathMatcher::Regex(re) => re.is_match(path),
        };
        path_ok
            && self
                .method
                .is_none_or(|m| m.as_str() == req.method.as_str())
            && self.headers.iter().all(|h| h.matches(req.headers))
    }
}

impl HeaderMatcher {
    fn matches(&self, headers: &HeaderMap) -> bool {
        self.invert != self.holds(headers)
    }

    fn holds(&self, headers: &HeaderMap) -> bool {
        let mut values = headers.get_all(&self.name).iter().peekable();
        if values.peek().is_none() {
            return false;
        }
        if matches!(self.value, ValueMatcher::Present) {
            return true;
        }
        // Several lines are one comma-separated value (as Envoy matches them).
        let mut joined: Cow<'_, str> = Cow::Borrowed("");
        for (i, v) in values.enumerate() {
            let Ok(s) = v.to_str() else {
                return false;
            };
            if i == 0 {
                joined = Cow::Borrowed(s);
            } else {
                let j = joined.to_mut();
                j.push(',');
                j.push_str(s);
            }
        }
        let v = joined.as_ref();
        match &self.value {
            ValueMatcher::Present => true,
            ValueMatcher::Exact(x) => v == x,
            ValueMatcher::Prefix(x) => v.starts_with(x.as_str()),
            ValueMatcher::Suffix(x) => v.ends_with(x.as_str()),
            ValueMatcher::Regex(re) => re.is_match(v),
            ValueMatcher::Range { start, end } => v
                .trim()
                .parse::<i64>()
                .is_ok_and(|n| *start <= n && n < *end),
        }
    }
}

/// The retry policy of a route, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_retries: u32,
    pub per_retry_timeout: Duration,
    pub(super) http_events: Vec<HttpRetryEvent>,
    pub(super) connection_error: bool,
    pub(super) grpc_codes: Vec<u32>,
}

impl RetryPolicy {
    /// Whether a response with this status is retried (`server-error`: 5xx;
    /// `gateway-error`: 502, 503, 504; `client-error`: 409).
    pub fn retries_status(&self, status: u16) -> bool {
        self.http_events.iter().any(|e| match e {
            HttpRetryEvent::ServerError => (500..600).contains(&status),
            HttpRetryEvent::GatewayError => matches!(status, 502..=504),
            HttpRetryEvent::ClientError => status == 409,
            HttpRetryEvent::StreamError => false,
        })
    }

    /// Whether a stream the upstream reset or refused is retried (`stream-error`).
    pub fn retries_stream_error(&self) -> bool {
        self.http_events.contains(&HttpRetryEvent::StreamError)
    }

    /// Whether a failed or dropped upstream connection is retried (`connection-error`).
    pub fn retries_connection_error(&self) -> bool {
        self.connection_error
    }

    /// Whether a gRPC response with this `grpc-status` is retried.
    pub fn retries_grpc_status(&self, code: u32) -> bool {
        self.grpc_codes.contains(&code)
    }
}

/// `None`: no timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub per_request: Option<Duration>,
    pub idle: Option<Duration>,
}

impl Timeouts {
    pub(super) const HTTP_DEFAULT: Timeouts = Timeouts {
        per_request: Some(DEFAULT_PER_REQUEST_TIMEOUT),
        idle: Some(DEFAULT_IDLE_TIMEOUT),
    };
    pub(super) const TCP_DEFAULT: Timeouts = Timeouts {
        per_request: None,
        idle: Some(DEFAULT_IDLE_TIMEOUT),
    };
}

/// What the router sees of a request.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    pub method: &'a Method,
    /// The path; a query string, if present, is ignored.
    pub path: &'a str,
    pub headers: &'a HeaderMap,
}

impl<'a> RequestView<'a> {
    pub fn new(method: &'a Method, path: &'a str, headers: &'a HeaderMap) -> Self {
        RequestView {
            method,
            path,
            headers,
        }
    }

    pub fn of<B>(req: &'a http::Request<B>) -> Self {
        Self::new(req.method(), req.uri().path(), req.headers())
    }

    /// The path without its query string.
    fn bare_path(&self) -> &'a str {
        self.path.split_once('?').map_or(self.path, |(p, _)| p)
    }

    fn is_grpc(&self) -> bool {
        self.headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| {
                ct.get(..16)
                    .is_some_and(|p| p.eq_ignore_ascii_case("application/grpc"))
            })
    }
}

/// What happened to the override header of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OverrideOutcome {
    /// No header, or no entry for this virtual service.
    Absent,
    /// The header chose the target.
    Applied,
    /// The header was there and not honoured; the target was drawn as usual.
    Ignored(IgnoredBecause),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IgnoredBecause {
    /// The source is not in `routing.override_header.allow_from` (or has no identity).
    SourceNotAllowed,
    /// The value does not parse; the reason.
    Malformed(String),
    /// The entry for this virtual service names a virtual node that is not one of its
    /// targets.
    NotATarget(String),
}

impl std::fmt::Display for IgnoredBecause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IgnoredBecause::SourceNotAllowed => f.write_str("the source may not override routing"),
            IgnoredBecause::Malformed(why) => write!(f, "malformed: {why}"),
            IgnoredBecause::NotATarget(node) => {
                write!(
                    f,
                    "virtual node `{node}` is not a target of this virtual service"
                )
            }
        }
    }
}

/// Where one request (or TCP connection) goes.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteDecision<'t> {
    /// The virtual service's name as configured.
    pub virtual_service: &'t str,
    /// The provider router, if the provider is a router.
    pub virtual_router: Option<&'t str>,
    /// The route taken; `None` when the provider is a virtual node.
    pub route: Option<&'t str>,
    pub target: &'t VirtualNode,
    /// The target's listener port; `None`: the port the application connected to (a
    /// virtual-node provider with several listeners, or none).
    pub port: Option<u16>,
    /// `None`: no retries.
    pub retry: Option<&'t RetryPolicy>,
    pub timeouts: Timeouts,
    pub override_header: OverrideOutcome,
}

/// The compiled routing configuration.
#[derive(Debug, Clone, Default)]
pub struct RoutingTable {
    pub(super) services: HashMap<String, VirtualService>,
    pub(super) nodes: Vec<VirtualNode>,
    pub(super) routers: Vec<VirtualRouter>,
    pub(super) override_header: OverrideHeader,
    pub(super) retry_budget: RetryBudgetSettings,
    pub(super) detection: DetectionSettings,
}

/// How the application protocol of a connection to a meshed workload is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppProtocol {
    /// A virtual node declares the port: no detection.
    Declared(Protocol),
    /// Nothing declares it: decide from the first bytes, waiting at most this long.
    Detect(Duration),
    /// Nothing declares it and detection is off for it: opaque TCP.
    Opaque,
}

/// The validated `[routing.protocol_detection]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DetectionSettings {
    /// `None`: detection is off.
    pub timeout: Option<Duration>,
    pub opaque_ports: Vec<u16>,
}

impl Default for DetectionSettings {
    fn default() -> Self {
        DetectionSettings {
            timeout: Some(Duration::from_millis(100)),
            opaque_ports: vec![25, 587, 3306, 4444, 5432, 6379, 9300, 11211],
        }
    }
}

impl RoutingTable {
    /// How a connection to `port` of the workload `name` (a task id, an `[[endpoints]]` or a
    /// `[[services]]` name) is spoken: as a virtual node with that discovery declares it,
    /// else by detection (unless the port is opaque or detection is off).
    pub fn app_protocol(&self, name: &str, port: u16) -> AppProtocol {
        let declared = self
            .nodes
            .iter()
            .filter(|n| match &n.discovery {
                Discovery::Service(x) | Discovery::Endpoint(x) | Discovery::Task(x) => x == name,
            })
            .find_map(|n| n.protocol_on(port));
        match (declared, self.detection.timeout) {
            (Some(p), _) => AppProtocol::Declared(p),
            (None, Some(t)) if !self.detection.opaque_ports.contains(&port) => {
                AppProtocol::Detect(t)
            }
            _ => AppProtocol::Opaque,
        }
    }

    /// True when no virtual service is declared (nothing is routed at L7).
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// The validated `[routing.retry_budget]`: the proxy keeps one
    /// [`super::budget::RetryBudget`] per virtual service.
    pub fn retry_budget(&self) -> RetryBudgetSettings {
        self.retry_budget
    }

    /// The override header's name (the proxy forwards it unchanged, so a workload that
    /// propagates it carries the override to the next hop, where it is checked again).
    pub fn override_header_name(&self) -> &HeaderName {
        self.override_header.name()
    }

    /// Virtual service names, as configured.
    pub fn virtual_services(&self) -> impl Iterator<Item = &str> {
        self.services.values().map(|s| s.name.as_str())
    }

    pub fn virtual_node(&self, name: &str) -> Option<&VirtualNode> {
        self.nodes.iter().find(|n| n.name == name)
    }

    pub fn virtual_nodes(&self) -> &[VirtualNode] {
        &self.nodes
    }

    /// The virtual service a request's `Host`/`:authority` (or a TLS SNI, or a DNS name)
    /// names: case-insensitive, port and trailing dot ignored.
    pub fn virtual_service_for_authority(&self, authority: &str) -> Option<&str> {
        self.service(authority).map(|s| s.name.as_str())
    }

    /// The idle timeout of an application connection to `vs`: the shortest of its routes' (one
    /// connection may carry requests for any of them), else the default.
    pub fn idle_timeout(&self, vs: &str) -> Option<Duration> {
        let s = self.service(vs)?;
        match s.provider {
            Provider::Router(r) => {
                let router = &self.routers[r];
                router
                    .request_routes
                    .iter()
                    .chain(&router.tcp_routes)
                    .filter_map(|route| route.timeouts.idle)
                    .min()
                    .or(Some(DEFAULT_IDLE_TIMEOUT))
            }
            Provider::Node(_) => Some(DEFAULT_IDLE_TIMEOUT),
        }
    }

    /// The declared protocol of virtual service `vs` on `port` (its router's or node's
    /// listener), from which the proxy knows whether to parse HTTP.
    pub fn listener_protocol(&self, vs: &str, port: u16) -> Option<Protocol> {
        let s = self.service(vs)?;
        match s.provider {
            Provider::Node(n) => self.nodes[n].protocol_on(port),
            Provider::Router(r) => listener_protocol(&self.routers[r].listeners, port),
        }
    }

    fn service(&self, authority: &str) -> Option<&VirtualService> {
        let host = if authority.starts_with('[') {
            authority // an IPv6 literal is no virtual service
        } else {
            authority.rsplit_once(':').map_or(authority, |(h, _)| h)
        };
        let host = host.strip_suffix('.').unwrap_or(host);
        if host.bytes().any(|b| b.is_ascii_uppercase()) {
            self.services.get(&host.to_ascii_lowercase())
        } else {
            self.services.get(host)
        }
    }

    /// Routes one HTTP request to `virtual_service` (see the module documentation for the
    /// order). `source` is the identity of the calling workload, which decides whether the
    /// override header may be used. `None` when the service is unknown or no route matches.
    pub fn route_http(
        &self,
        virtual_service: &str,
        request: &RequestView<'_>,
        source: Option<&SpiffeId>,
    ) -> Option<RouteDecision<'_>> {
        self.route_http_with(virtual_service, request, source, &mut ThreadRandom)
    }

    /// [`Self::route_http`] with the random source given.
    pub fn route_http_with(
        &self,
        virtual_service: &str,
        request: &RequestView<'_>,
        source: Option<&SpiffeId>,
        rng: &mut impl RandomSource,
    ) -> Option<RouteDecision<'_>> {
        let vs = self.service(virtual_service)?;
        let (forced, outcome) = self.override_for(vs, request.headers, source);
        match vs.provider {
            Provider::Node(n) => Some(self.direct(vs, n, Timeouts::HTTP_DEFAULT, outcome)),
            Provider::Router(r) => {
                let router = &self.routers[r];
                let route = router
                    .request_routes
                    .iter()
                    .find(|route| route.matcher.matches(request))?;
                let target = match forced {
                    // The port the route itself uses for that node, if it lists it.
                    Some(f) => route
                        .targets
                        .iter()
                        .map(|t| t.target)
                        .find(|t| t.node == f.node)
                        .unwrap_or(f),
                    None => route.draw(rng),
                };
                Some(self.decision(vs, router, route, target, outcome))
            }
        }
    }

    /// Routes one TCP connection to `virtual_service`: the router's first tcp route, its
    /// target drawn by weight. `None` when the service is unknown or its router has no tcp
    /// route.
    pub fn route_tcp(&self, virtual_service: &str) -> Option<RouteDecision<'_>> {
        self.route_tcp_with(virtual_service, &mut ThreadRandom)
    }

    /// [`Self::route_tcp`] with the random source given.
    pub fn route_tcp_with(
        &self,
        virtual_service: &str,
        rng: &mut impl RandomSource,
    ) -> Option<RouteDecision<'_>> {
        let vs = self.service(virtual_service)?;
        match vs.provider {
            Provider::Node(n) => {
                Some(self.direct(vs, n, Timeouts::TCP_DEFAULT, OverrideOutcome::Absent))
            }
            Provider::Router(r) => {
                let router = &self.routers[r];
                let route = router.tcp_routes.first()?;
                let target = route.draw(rng);
                Some(self.decision(vs, router, route, target, OverrideOutcome::Absent))
            }
        }
    }

    fn direct<'t>(
        &'t self,
        vs: &'t VirtualService,
        node: usize,
        timeouts: Timeouts,
        outcome: OverrideOutcome,
    ) -> RouteDecision<'t> {
        let target = &self.nodes[node];
        RouteDecision {
            virtual_service: &vs.name,
            virtual_router: None,
            route: None,
            target,
            port: match target.listeners.as_slice() {
                [only] => Some(only.port),
                _ => None,
            },
            retry: None,
            timeouts,
            override_header: outcome,
        }
    }

    fn decision<'t>(
        &'t self,
        vs: &'t VirtualService,
        router: &'t VirtualRouter,
        route: &'t Route,
        target: TargetRef,
        outcome: OverrideOutcome,
    ) -> RouteDecision<'t> {
        RouteDecision {
            virtual_service: &vs.name,
            virtual_router: Some(&router.name),
            route: Some(&route.name),
            target: &self.nodes[target.node],
            port: target.port,
            retry: route.retry.as_ref(),
            timeouts: route.timeouts,
            override_header: outcome,
        }
    }

    /// The node the override header forces for `vs`, if it applies, and what happened to it.
    fn override_for(
        &self,
        vs: &VirtualService,
        headers: &HeaderMap,
        source: Option<&SpiffeId>,
    ) -> (Option<TargetRef>, OverrideOutcome) {
        let Some(value) = self.override_header.value(headers) else {
            return (None, OverrideOutcome::Absent);
        };
        let ignored = |why| (None, OverrideOutcome::Ignored(why));
        if !self.override_header.allows(source) {
            return ignored(IgnoredBecause::SourceNotAllowed);
        }
        let entries = match value.and_then(|v| overrides::parse(&v)) {
            Ok(e) => e,
            Err(why) => return ignored(IgnoredBecause::Malformed(why)),
        };
        let Some((_, node)) = entries.into_iter().find(|(s, _)| *s == vs.name) else {
            return (None, OverrideOutcome::Absent);
        };
        match vs
            .override_targets
            .iter()
            .find(|t| self.nodes[t.node].name == node)
        {
            Some(t) => (Some(*t), OverrideOutcome::Applied),
            None => ignored(IgnoredBecause::NotATarget(node)),
        }
    }
}

impl Route {
    /// Draws a target by weight (validation guarantees a positive total).
    fn draw(&self, rng: &mut impl RandomSource) -> TargetRef {
        let mut x = rng.below(self.total_weight.max(1));
        for t in &self.targets {
            if x < t.weight {
                return t.target;
            }
            x -= t.weight;
        }
        self.targets[0].target
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use http::{HeaderValue, Method};

    use super::*;
    use crate::identity::{RoleArn, TrustDomain};
    use crate::routing::validate::parse_and_validate;
    use crate::routing::validate::tests::SEED;

    fn table(text: &str) -> RoutingTable {
        parse_and_validate(text, "mesh.toml").unwrap_or_else(|e| panic!("{e}"))
    }

    fn role(name: &str) -> SpiffeId {
        RoleArn::from_str(&format!("arn:aws:iam::111122223333:role/{name}"))
            .unwrap()
            .to_spiffe_id(&TrustDomain::from_str("prod.example.com").unwrap())
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_str(k).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    /// Routes `GET path` with `pairs` as headers; returns (route, target, outcome).
    fn route(
        t: &RoutingTable,
        vs: &str,
        method: &str,
        path: &str,
        pairs: &[(&str, &str)],
        source: Option<&SpiffeId>,
    ) -> Option<(String, String, OverrideOutcome)> {
        let h = headers(pairs);
        let m = Method::from_str(method).unwrap();
        let mut rng = fastrand::Rng::with_seed(7);
        t.route_http_with(vs, &RequestView::new(&m, path, &h), source, &mut rng)
            .map(|d| {
                (
                    d.route.unwrap_or("-").to_owned(),
                    d.target.name().to_owned(),
                    d.override_header,
                )
            })
    }

    fn split(t: &RoutingTable, n: usize, seed: u64) -> HashMap<String, usize> {
        let mut rng = fastrand::Rng::with_seed(seed);
        let h = HeaderMap::new();
        let req = RequestView::new(&Method::GET, "/orders/1", &h);
        let mut counts = HashMap::new();
        for _ in 0..n {
            let d = t
                .route_http_with("serviceb.apps.local", &req, None, &mut rng)
                .unwrap();
            *counts.entry(d.target.name().to_owned()).or_default() += 1;
        }
        counts
    }

    #[test]
    fn the_seed_split_is_75_25() {
        let t = table(SEED);
        let counts = split(&t, 2000, 0x5eed);
        let b = counts["serviceB"] as f64 / 2000.0 * 100.0;
        let v2 = counts["serviceBv2"] as f64 / 2000.0 * 100.0;
        assert!((b - 75.0).abs() <= 1.0, "serviceB got {b}%");
        assert!((v2 - 25.0).abs() <= 1.0, "serviceBv2 got {v2}%");
        // Not a lucky seed: over many requests the draw converges.
        let counts = split(&t, 200_000, 1);
        let b = counts["serviceB"] as f64 / 200_000.0 * 100.0;
        assert!((b - 75.0).abs() <= 0.3, "serviceB got {b}%");
    }

    #[test]
    fn a_zero_weight_target_gets_nothing() {
        let t = table(
            &SEED
                .replace("weight = 75", "weight = 0")
                .replace("weight = 25", "weight = 100"),
        );
        let counts = split(&t, 2000, 3);
        assert_eq!(counts.get("serviceB"), None);
        assert_eq!(counts["serviceBv2"], 2000);
    }

    #[test]
    fn the_decision_carries_the_route_policy() {
        let t = table(SEED);
        let h = HeaderMap::new();
        let req = RequestView::new(&Method::POST, "/x?y=1", &h);
        let d = t
            .route_http("ServiceB.apps.local:8080", &req, None)
            .unwrap();
        assert_eq!(d.virtual_service, "serviceb.apps.local");
        assert_eq!(d.virtual_router, Some("serviceB"));
        assert_eq!(d.route, Some("serviceB-split"));
        assert_eq!(d.port, Some(8080));
        assert_eq!(d.override_header, OverrideOutcome::Absent);
        assert_eq!(
            d.timeouts,
            Timeouts {
                per_request: Some(Duration::from_secs(15)),
                idle: Some(Duration::from_secs(300))
            }
        );
        let retry = d.retry.unwrap();
        assert_eq!(retry.max_retries, 2);
        assert_eq!(retry.per_retry_timeout, Duration::from_secs(2));
        assert!(retry.retries_status(500) && retry.retries_status(503));
        assert!(!retry.retries_status(409) && !retry.retries_status(404));
        assert!(retry.retries_connection_error());
        assert!(!retry.retries_stream_error());
        assert!(!retry.retries_grpc_status(14));
        assert!(t.route_http("unknown.apps.local", &req, None).is_none());
    }

    #[test]
    fn the_override_header_routes_exactly_the_requests_that_carry_it() {
        let t = table(SEED);
        let qa = role("qa");
        let pin = [("mesh-route", "serviceb.apps.local=serviceBv2")];
        for seed in 0..200 {
            let h = headers(&pin);
            let mut rng = fastrand::Rng::with_seed(seed);
            let d = t
                .route_http_with(
                    "serviceb.apps.local",
                    &RequestView::new(&Method::GET, "/", &h),
                    Some(&qa),
                    &mut rng,
                )
                .unwrap();
            assert_eq!(d.target.name(), "serviceBv2");
            assert_eq!(d.override_header, OverrideOutcome::Applied);
            // The route's policy still applies.
            assert_eq!(d.route, Some("serviceB-split"));
            assert_eq!(d.port, Some(8080));
            assert!(d.retry.is_some());
        }
        // From the staging account's prefix too, and names are case-insensitive.
        let staging: SpiffeId = "spiffe://prod.example.com/aws/444455556666/role/ci"
            .parse()
            .unwrap();
        let (_, node, outcome) = route(
            &t,
            "serviceb.apps.local",
            "GET",
            "/",
            &[("Mesh-Route", " SERVICEB.apps.local. = serviceB ")],
            Some(&staging),
        )
        .unwrap();
        assert_eq!(
            (node.as_str(), outcome),
            ("serviceB", OverrideOutcome::Applied)
        );
    }

    #[test]
    fn the_override_header_is_ignored_and_reported_otherwise() {
        let t = table(SEED);
        let qa = role("qa");
        let a = role("serviceA");
        let vs = "serviceb.apps.local";
        let ignored = |pairs: &[(&str, &str)], source: Option<&SpiffeId>| {
            route(&t, vs, "GET", "/", pairs, source).unwrap().2
        };
        let pin = [("mesh-route", "serviceb.apps.local=serviceBv2")];
        assert_eq!(
            ignored(&pin, Some(&a)),
            OverrideOutcome::Ignored(IgnoredBecause::SourceNotAllowed)
        );
        assert_eq!(
            ignored(&pin, None),
            OverrideOutcome::Ignored(IgnoredBecause::SourceNotAllowed)
        );
        assert!(matches!(
            ignored(
                &[("mesh-route", "serviceb.apps.local=serviceBv2,")],
                Some(&qa)
            ),
            OverrideOutcome::Ignored(IgnoredBecause::Malformed(_))
        ));
        assert_eq!(
            ignored(
                &[("mesh-route", "serviceb.apps.local=serviceBv9")],
                Some(&qa)
            ),
            OverrideOutcome::Ignored(IgnoredBecause::NotATarget("serviceBv9".into()))
        );
        // Another virtual service's entry is for another hop.
        assert_eq!(
            ignored(&[("mesh-route", "orders.apps.local=ordersV2")], Some(&qa)),
            OverrideOutcome::Absent
        );
        assert_eq!(ignored(&[], Some(&qa)), OverrideOutcome::Absent);
        // Ignored means routed by weight: from serviceA the split stays 75/25.
        let h = headers(&pin);
        let mut rng = fastrand::Rng::with_seed(11);
        let req = RequestView::new(&Method::GET, "/", &h);
        let v2 = (0..2000)
            .filter(|_| {
                t.route_http_with(vs, &req, Some(&a), &mut rng)
                    .unwrap()
                    .target
                    .name()
                    == "serviceBv2"
            })
            .count();
        assert!((440..=560).contains(&v2), "{v2} of 2000 to serviceBv2");
    }

    const ORDER: &str = r#"
[ecs] # tasks are discovered: `task` references are not checked
[[virtual_nodes]]
name = "a"
task = "a"
listeners = [{ port = 80, protocol = "http" }]
[[virtual_nodes]]
name = "b"
task = "b"
listeners = [{ port = 80, protocol = "http" }]
[[virtual_routers]]
name = "r"
listeners = [{ port = 80, protocol = "http" }]
[[virtual_services]]
name = "svc.local"
provider = { virtual_router = "r" }

[[routes]]
name = "catch-all"
virtual_router = "r"
action.weighted_targets = [{ virtual_node = "a", weight = 1 }]
[[routes]]
name = "api"
virtual_router = "r"
match.prefix = "/api"
action.weighted_targets = [{ virtual_node = "a", weight = 1 }]
[[routes]]
name = "api-v2"
virtual_router = "r"
match.prefix = "/api/v2"
action.weighted_targets = [{ virtual_node = "a", weight = 1 }]
[[routes]]
name = "api-regex"
virtual_router = "r"
match.path.regex = "/api/v[0-9]+/items"
action.weighted_targets = [{ virtual_node = "a", weight = 1 }]
[[routes]]
name = "api-exact"
virtual_router = "r"
match.path.exact = "/api/v2/items"
action.weighted_targets = [{ virtual_node = "a", weight = 1 }]
[[routes]]
name = "api-post"
virtual_router = "r"
match = { prefix = "/api", method = "POST" }
action.weighted_targets = [{ virtual_node = "a", weight = 1 }]
[[routes]]
name = "api-header"
virtual_router = "r"
match = { prefix = "/api", headers = [{ name = "x-user" }] }
action.weighted_targets = [{ virtual_node = "a", weight = 1 }]
[[routes]]
name = "pinned-last"
virtual_router = "r"
priority = 1000
match.prefix = "/pinned"
action.weighted_targets = [{ virtual_node = "b", weight = 1 }]
[[routes]]
name = "pinned-first"
virtual_router = "r"
priority = 0
match.prefix = "/pinned/first"
action.weighted_targets = [{ virtual_node = "b", weight = 1 }]
"#;

    #[test]
    fn routes_are_tried_by_priority_then_specificity() {
        let t = table(ORDER);
        let r = |method: &str, path: &str, h: &[(&str, &str)]| {
            route(&t, "svc.local", method, path, h, None).unwrap().0
        };
        // Priorities first, whatever the specificity: /pinned is tried before any
        // unprioritised route, and priority 0 before 1000.
        assert_eq!(r("GET", "/pinned/first/x", &[]), "pinned-first");
        assert_eq!(r("GET", "/pinned/x", &[]), "pinned-last");
        // Then exact, regex, longer prefix, shorter prefix with more conditions, prefix.
        assert_eq!(r("GET", "/api/v2/items", &[]), "api-exact");
        assert_eq!(r("GET", "/api/v3/items", &[]), "api-regex");
        // The regex must match the whole path.
        assert_eq!(r("GET", "/api/v3/items/1", &[]), "api");
        assert_eq!(r("GET", "/api/v2/other", &[]), "api-v2");
        assert_eq!(r("GET", "/api/x", &[("x-user", "u")]), "api-header");
        assert_eq!(r("POST", "/api/x", &[]), "api-post");
        // Header conditions outrank a method condition.
        assert_eq!(r("POST", "/api/x", &[("x-user", "u")]), "api-header");
        assert_eq!(r("GET", "/api/x", &[]), "api");
        assert_eq!(r("GET", "/", &[]), "catch-all");
    }

    #[test]
    fn no_matching_route_is_no_decision() {
        let t = table(&SEED.replace(
            "match = { prefix = \"/\" }",
            "match = { prefix = \"/orders\" }",
        ));
        assert!(route(&t, "serviceb.apps.local", "GET", "/users", &[], None).is_none());
        assert!(route(&t, "serviceb.apps.local", "GET", "/orders/1", &[], None).is_some());
    }

    #[test]
    fn header_conditions() {
        let text = r#"
[ecs]
[[virtual_nodes]]
name = "a"
task = "a"
listeners = [{ port = 80, protocol = "http2" }]
[[virtual_routers]]
name = "r"
listeners = [{ port = 80, protocol = "http2" }]
[[virtual_services]]
name = "svc.local"
provider = { virtual_router = "r" }
[[routes]]
name = "h"
virtual_router = "r"
priority = 1
match.headers = [
  { name = "X-Tier", match = { regex = "gold|platinum" } },
  { name = "x-version", match = { range = { start = 2, end = 5 } } },
  { name = "x-region", match = { suffix = "-1" } },
  { name = "x-debug", invert = true },
  { name = "x-client", invert = true, match = { prefix = "bot" } },
]
action.weighted_targets = [{ virtual_node = "a", weight = 1 }]
"#;
        let t = table(text);
        let ok = |pairs: &[(&str, &str)]| route(&t, "svc.local", "GET", "/", pairs, None).is_some();
        let base = [
            ("x-tier", "gold"),
            ("x-version", "2"),
            ("x-region", "eu-west-1"),
        ];
        assert!(ok(&base));
        assert!(ok(&[base[0], base[1], base[2], ("x-client", "browser")]));
        // regex: the whole value.
        assert!(!ok(&[("x-tier", "golden"), base[1], base[2]]));
        assert!(ok(&[("x-tier", "platinum"), base[1], base[2]]));
        // range: start <= value < end, integers only.
        assert!(ok(&[base[0], ("x-version", "4"), base[2]]));
        assert!(!ok(&[base[0], ("x-version", "5"), base[2]]));
        assert!(!ok(&[base[0], ("x-version", "1"), base[2]]));
        assert!(!ok(&[base[0], ("x-version", "three"), base[2]]));
        assert!(!ok(&[base[0], base[1], ("x-region", "eu-west-2")]));
        // Missing headers fail their condition...
        assert!(!ok(&[base[0], base[1]]));
        // ...and satisfy inverted ones; present ones fail them.
        assert!(!ok(&[base[0], base[1], base[2], ("x-debug", "")]));
        assert!(!ok(&[base[0], base[1], base[2], ("x-client", "bot/1.0")]));
        // Several lines are one comma-joined value.
        assert!(!ok(&[
            ("x-tier", "gold"),
            ("x-tier", "gold"),
            base[1],
            base[2]
        ]));
        assert!(ok(&[
            base[0],
            base[1],
            ("x-region", "us-east-2"),
            ("x-region", "eu-west-1")
        ]));
    }

    const GRPC: &str = r#"
[ecs]
[[virtual_nodes]]
name = "orders"
task = "orders"
listeners = [{ port = 50051, protocol = "grpc" }]
[[virtual_nodes]]
name = "orders-get"
task = "orders-get"
listeners = [{ port = 50051, protocol = "http2" }]
[[virtual_routers]]
name = "orders"
listeners = [{ port = 50051, protocol = "grpc" }, { port = 50052, protocol = "http2" }]
[[virtual_services]]
name = "orders.apps.local"
provider = { virtual_router = "orders" }
[[routes]]
name = "any-grpc"
virtual_router = "orders"
kind = "grpc"
action.weighted_targets = [{ virtual_node = "orders", weight = 1 }]
[[routes]]
name = "get"
virtual_router = "orders"
kind = "grpc"
match = { service_name = "orders.v1.Orders", method_name = "Get", metadata = [{ name = "x-beta" }] }
retry_policy = { max_retries = 3, per_retry_timeout = "1s", grpc_retry_events = ["unavailable", "resource-exhausted"] }
action.weighted_targets = [{ virtual_node = "orders-get", weight = 1 }]
[[routes]]
name = "plain"
virtual_router = "orders"
kind = "http2"
priority = 500
match.prefix = "/health"
action.weighted_targets = [{ virtual_node = "orders-get", weight = 1 }]
"#;

    #[test]
    fn grpc_routes_take_grpc_requests_by_service_and_method() {
        let t = table(GRPC);
        let grpc = ("content-type", "application/grpc+proto");
        let r = |path: &str, pairs: &[(&str, &str)]| {
            route(&t, "orders.apps.local", "POST", path, pairs, None).map(|x| x.0)
        };
        assert_eq!(
            r("/orders.v1.Orders/Get", &[grpc, ("x-beta", "1")]).as_deref(),
            Some("get")
        );
        assert_eq!(
            r("/orders.v1.Orders/Get", &[grpc]).as_deref(),
            Some("any-grpc")
        );
        assert_eq!(
            r("/orders.v1.Orders/List", &[grpc, ("x-beta", "1")]).as_deref(),
            Some("any-grpc")
        );
        // Not gRPC: only the http2 route can take it.
        assert_eq!(r("/orders.v1.Orders/Get", &[("x-beta", "1")]), None);
        assert_eq!(r("/health", &[]).as_deref(), Some("plain"));
        let h = headers(&[grpc, ("x-beta", "1")]);
        let d = t
            .route_http(
                "orders.apps.local",
                &RequestView::new(&Method::POST, "/orders.v1.Orders/Get", &h),
                None,
            )
            .unwrap();
        let retry = d.retry.unwrap();
        assert!(retry.retries_grpc_status(14) && retry.retries_grpc_status(8));
        assert!(!retry.retries_grpc_status(13) && !retry.retries_status(503));
        assert_eq!(
            t.listener_protocol("orders.apps.local", 50051),
            Some(Protocol::Grpc)
        );
        assert_eq!(
            t.listener_protocol("orders.apps.local", 50052),
            Some(Protocol::Http2)
        );
        assert_eq!(t.listener_protocol("orders.apps.local", 1), None);
    }

    const TCP: &str = r#"
[[virtual_nodes]]
name = "db-primary"
endpoint = "db-primary"
listeners = [{ port = 3306, protocol = "tcp" }]
[[virtual_nodes]]
name = "db-replica"
endpoint = "db-replica"
listeners = [{ port = 3306, protocol = "tcp" }, { port = 33060, protocol = "tcp" }]
[[endpoints]]
name = "db-primary"
[[endpoints]]
name = "db-replica"
[[virtual_routers]]
name = "db"
listeners = [{ port = 3306, protocol = "tcp" }]
[[virtual_services]]
name = "db.apps.local"
provider = { virtual_router = "db" }
[[virtual_services]]
name = "primary.apps.local"
provider = { virtual_node = "db-primary" }
[[routes]]
name = "second"
virtual_router = "db"
priority = 2
action.weighted_targets = [{ virtual_node = "db-primary", weight = 1 }]
[[routes]]
name = "split"
virtual_router = "db"
priority = 1
timeout.idle = "0s"
action.weighted_targets = [
  { virtual_node = "db-primary", weight = 90 },
  { virtual_node = "db-replica", weight = 10, port = 33060 },
]
"#;

    #[test]
    fn tcp_routes_split_connections() {
        let t = table(TCP);
        let mut rng = fastrand::Rng::with_seed(42);
        let mut replica = 0;
        for _ in 0..2000 {
            let d = t.route_tcp_with("db.apps.local", &mut rng).unwrap();
            assert_eq!(d.route, Some("split"));
            assert_eq!(d.retry, None);
            assert_eq!(
                d.timeouts,
                Timeouts {
                    per_request: None,
                    idle: None
                }
            );
            if d.target.name() == "db-replica" {
                assert_eq!(d.port, Some(33060));
                replica += 1;
            } else {
                assert_eq!(d.port, Some(3306));
            }
        }
        assert!(
            (180..=220).contains(&replica),
            "{replica} of 2000 to the replica"
        );
        // A tcp router routes no requests; a node provider routes both.
        let h = HeaderMap::new();
        let req = RequestView::new(&Method::GET, "/", &h);
        assert!(t.route_http("db.apps.local", &req, None).is_none());
        let d = t.route_tcp("primary.apps.local").unwrap();
        assert_eq!(
            (d.route, d.target.name(), d.port),
            (None, "db-primary", Some(3306))
        );
        assert_eq!(d.timeouts, Timeouts::TCP_DEFAULT);
        assert_eq!(
            d.target.discovery(),
            &Discovery::Endpoint("db-primary".into())
        );
        let d = t.route_http("primary.apps.local", &req, None).unwrap();
        assert_eq!(d.timeouts, Timeouts::HTTP_DEFAULT);
    }

    #[test]
    fn a_node_provider_takes_overrides_naming_itself_only() {
        let text = format!(
            "{TCP}\n[identity]\ntrust_domain = \"prod.example.com\"\n\
             [routing.override_header]\nallow_from = [\"*\"]\n"
        );
        let t = table(&text);
        let a = role("serviceA");
        let vs = "primary.apps.local";
        let (_, node, outcome) = route(
            &t,
            vs,
            "GET",
            "/",
            &[("mesh-route", "primary.apps.local=db-primary")],
            Some(&a),
        )
        .unwrap();
        assert_eq!(
            (node.as_str(), outcome),
            ("db-primary", OverrideOutcome::Applied)
        );
        let (_, node, outcome) = route(
            &t,
            vs,
            "GET",
            "/",
            &[("mesh-route", "primary.apps.local=db-replica")],
            Some(&a),
        )
        .unwrap();
        assert_eq!(node, "db-primary");
        assert_eq!(
            outcome,
            OverrideOutcome::Ignored(IgnoredBecause::NotATarget("db-replica".into()))
        );
    }

    #[test]
    fn authorities_name_virtual_services() {
        let t = table(SEED);
        for a in [
            "serviceb.apps.local",
            "serviceb.apps.local:8080",
            "ServiceB.Apps.Local.",
            "serviceb.apps.local.:80",
        ] {
            assert_eq!(
                t.virtual_service_for_authority(a),
                Some("serviceb.apps.local"),
                "{a}"
            );
        }
        for a in ["serviceb", "[::1]:8080", "10.0.0.1:8080", ""] {
            assert_eq!(t.virtual_service_for_authority(a), None, "{a}");
        }
        assert_eq!(
            t.listener_protocol("serviceb.apps.local", 8080),
            Some(Protocol::Http)
        );
    }

    #[test]
    fn request_views_ignore_the_query_string() {
        let req = http::Request::builder()
            .method("GET")
            .uri("http://serviceb.apps.local/api/x?y=/z")
            .body(())
            .unwrap();
        let view = RequestView::of(&req);
        assert_eq!(view.bare_path(), "/api/x");
        let h = HeaderMap::new();
        assert_eq!(RequestView::new(&Method::GET, "/a?b", &h).bare_path(), "/a");
    }

    #[test]
    fn zero_disables_timeouts() {
        let t = table(&SEED.replace(
            "timeout = { per_request = \"15s\", idle = \"300s\" }",
            "timeout = { per_request = \"0s\" }",
        ));
        let h = HeaderMap::new();
        let d = t
            .route_http(
                "serviceb.apps.local",
                &RequestView::new(&Method::GET, "/", &h),
                None,
            )
            .unwrap();
        assert_eq!(
            d.timeouts,
            Timeouts {
                per_request: None,
                idle: Some(DEFAULT_IDLE_TIMEOUT)
            }
        );
    }
}
