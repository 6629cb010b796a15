//! Parsing and validation of the routing sections into a [`RoutingTable`], with errors that
//! name the file, the line and the field:
//!
//! ```text
//! mesh.toml:42: routes[3].action.weighted_targets[1].virtual_node: no virtual node "serviceBv3" (known: serviceB, serviceBv2)
//! ```
//!
//! Type errors found while parsing (a string where a number belongs, an unknown field, an
//! unknown protocol) are reported the same way: the `toml` error's span is located in a
//! spanned copy of the document to name the field. Validation reports every problem it
//! finds, in file order, not just the first.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::str::FromStr;
use std::time::Duration;

use http::HeaderName;
use regex::{Regex, RegexBuilder};
use serde::Deserialize;
use toml::Spanned;

use super::budget::RetryBudgetSettings;
use super::model::{
    HeaderMatchSpec, Protocol, ProtocolDetectionSpec, RouteSpec, RoutingSettings, RoutingSpec,
    VirtualNodeSpec, VirtualRouterSpec, VirtualServiceSpec,
};
use super::overrides::{DEFAULT_HEADER, OverrideHeader};
use super::table::{
    DetectionSettings, Discovery, GrpcMatcher, HeaderMatcher, Listener, PathMatcher, Provider,
    RequestMatch, RetryPolicy, Route, RoutingTable, TargetRef, Timeouts, ValueMatcher, VirtualNode,
    VirtualRouter, VirtualService, WeightedTarget,
};
use crate::identity::TrustDomain;

/// The longest protocol detection timeout accepted.
const MAX_DETECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// The most weighted targets of one route (App Mesh's limit).
pub const MAX_TARGETS: usize = 10;
/// The highest (last) route priority.
pub const MAX_PRIORITY: u32 = 1000;
/// The most a weighted target may weigh.
pub const MAX_WEIGHT: u32 = 100;
/// Compiled size limit of one regex.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// One mistake in the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: String,
    /// 1-based.
    pub line: usize,
    /// The field, e.g. `routes[3].action.weighted_targets[1].virtual_node`; empty for a
    /// syntax error.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}:{}: {}", self.file, self.line, self.message)
        } else {
            write!(
                f,
                "{}:{}: {}: {}",
                self.file, self.line, self.field, self.message
            )
        }
    }
}

/// Everything wrong with the routing configuration (at least one problem), one per line
/// when displayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for RoutingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for RoutingError {}

/// What the routing sections may refer to outside themselves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KnownNames {
    /// Names of the `[[services]]` entries.
    pub services: Vec<String>,
    /// Names of the `[[endpoints]]` entries.
    pub endpoints: Vec<String>,
    /// Ids of this node's tasks when they are all known in advance (only static
    /// `[[tasks]]`); `None` when tasks are discovered at run time (`[ecs]`), and `task`
    /// references are not checked.
    pub tasks: Option<Vec<String>>,
    /// `identity.trust_domain`: needed by `routing.override_header.allow_from`.
    pub trust_domain: Option<TrustDomain>,
}

/// Parses the routing sections of a whole agent configuration file (other sections are
/// only read for the names routing refers to) and validates them. `file` names the file in
/// errors.
pub fn parse_and_validate(text: &str, file: &str) -> Result<RoutingTable, RoutingError> {
    let (spec, known) = parse(text, file)?;
    validate(&spec, &known, text, file)
}

/// The parsing half of [`parse_and_validate`].
pub fn parse(text: &str, file: &str) -> Result<(RoutingSpec, KnownNames), RoutingError> {
    let doc: Document = toml::from_str(text).map_err(|e| toml_error(&e, text, file))?;
    let mut known = KnownNames {
        services: doc.services.into_iter().filter_map(|s| s.name).collect(),
        endpoints: doc.endpoints.into_iter().filter_map(|s| s.name).collect(),
        tasks: doc
            .ecs
            .is_none()
            .then(|| doc.tasks.into_iter().filter_map(|t| t.id).collect()),
        trust_domain: None,
    };
    if let Some(td) = doc.identity.and_then(|i| i.trust_domain) {
        match TrustDomain::from_str(td.get_ref()) {
            Ok(td) => known.trust_domain = Some(td),
            Err(e) => {
                let lines = Lines::new(text);
                return Err(RoutingError {
                    problems: vec![Problem {
                        file: file.to_owned(),
                        line: lines.line(td.span().start),
                        field: "identity.trust_domain".to_owned(),
                        message: e.to_string(),
                    }],
                });
            }
        }
    }
    let spec = RoutingSpec {
        routing: doc.routing,
        virtual_services: doc.virtual_services,
        virtual_nodes: doc.virtual_nodes,
        virtual_routers: doc.virtual_routers,
        routes: doc.routes,
    };
    Ok((spec, known))
}

/// Validates routing sections parsed from `text` (whose spans they carry) and compiles them.
pub fn validate(
    spec: &RoutingSpec,
    known: &KnownNames,
    text: &str,
    file: &str,
) -> Result<RoutingTable, RoutingError> {
    let mut c = Checker {
        file,
        lines: Lines::new(text),
        problems: Vec::new(),
    };
    let (override_header, retry_budget) = c.settings(&spec.routing, known);
    let detection = c.detection(&spec.routing.protocol_detection);
    let nodes = c.nodes(&spec.virtual_nodes, known);
    let routers = c.routers(&spec.virtual_routers);
    let routes = c.routes(&spec.routes, &nodes, &routers);
    let services = c.services(&spec.virtual_services, &nodes, &routers, &routes);
    if !c.problems.is_empty() {
        c.problems.sort_by_key(|p| p.line);
        return Err(RoutingError {
            problems: c.problems,
        });
    }
    // No problem: every `Option` below is `Some`.
    let nodes: Vec<VirtualNode> = nodes.into_iter().map(|n| n.node).collect();
    let mut routers: Vec<VirtualRouter> = routers
        .into_iter()
        .map(|r| VirtualRouter {
            name: r.name,
            listeners: r.listeners,
            request_routes: Vec::new(),
            tcp_routes: Vec::new(),
        })
        .collect();
    let mut routes = routes;
    // Matching order: by priority, then routes without one, most specific first, then in
    // file order (the sort is stable).
    routes.sort_by(|a, b| match (a.priority, b.priority) {
        (Some(x), Some(y)) => x.cmp(&y),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => b
            .route
            .matcher
            .specificity()
            .cmp(&a.route.matcher.specificity()),
    });
    for r in routes {
        let Some(router) = r.router else { continue };
        let router = &mut routers[router];
        if r.route.kind == Protocol::Tcp {
            router.tcp_routes.push(r.route);
        } else {
            router.request_routes.push(r.route);
        }
    }
    Ok(RoutingTable {
        services: services.into_iter().map(|s| (s.name.clone(), s)).collect(),
        nodes,
        routers,
        override_header,
        retry_budget,
        detection,
    })
}

/// The whole configuration file, as far as routing is concerned.
#[derive(Deserialize)]
struct Document {
    #[serde(default)]
    routing: RoutingSettings,
    #[serde(default)]
    virtual_services: Vec<VirtualServiceSpec>,
    #[serde(default)]
    virtual_nodes: Vec<VirtualNodeSpec>,
    #[serde(default)]
    virtual_routers: Vec<VirtualRouterSpec>,
    #[serde(default)]
    routes: Vec<RouteSpec>,
    #[serde(default)]
    services: Vec<Named>,
    #[serde(default)]
    endpoints: Vec<Named>,
    #[serde(default)]
    tasks: Vec<TaskId>,
    #[serde(default)]
    ecs: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    identity: Option<IdentityTd>,
}

#[derive(Deserialize)]
struct Named {
    #[serde(default)]
    name: Option<String>,
}

#[derive(Deserialize)]
struct TaskId {
    #[serde(default)]
    id: Option<String>,
}

#[derive(Deserialize)]
struct IdentityTd {
    #[serde(default)]
    trust_domain: Option<Spanned<String>>,
}

/// Line numbers of byte offsets.
struct Lines(Vec<usize>);

impl Lines {
    fn new(text: &str) -> Lines {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Lines(starts)
    }

    /// 1-based.
    fn line(&self, offset: usize) -> usize {
        self.0.partition_point(|&s| s <= offset).max(1)
    }
}

/// A `toml` error as a [`Problem`]: the line of its span and, located in a spanned copy of
/// the document, the field.
fn toml_error(e: &toml::de::Error, text: &str, file: &str) -> RoutingError {
    let lines = Lines::new(text);
    let span = e.span();
    let offset = span.as_ref().map_or(0, |s| s.start);
    let field = match toml::from_str::<SNode>(text) {
        Ok(mut root) if span.is_some() => {
            root.fill_spans();
            let mut path = String::new();
            root.locate(offset, &mut path);
            path
        }
        // A syntax error: there is no field yet.
        _ => String::new(),
    };
    let message = e
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    RoutingError {
        problems: vec![Problem {
            file: file.to_owned(),
            line: lines.line(offset),
            field,
            message,
        }],
    }
}

// `toml` hands out spans through serde_spanned's private protocol: a struct with these
// names. `toml::Spanned` itself refuses values `toml` has no span for (a table written with
// dotted keys), so the document tree below speaks the protocol itself and keeps `None`.
const SPANNED_NAME: &str = "$__serde_spanned_private_Spanned";
const SPANNED_START: &str = "$__serde_spanned_private_start";
const SPANNED_END: &str = "$__serde_spanned_private_end";
const SPANNED_VALUE: &str = "$__serde_spanned_private_value";
const SPANNED_FIELDS: [&str; 3] = [SPANNED_START, SPANNED_END, SPANNED_VALUE];

/// A TOML document (or key) with the span of every key and value `toml` knows one for.
struct SNode {
    span: Option<Range<usize>>,
    node: Node,
}

enum Node {
    Table(Vec<(SNode, SNode)>),
    Array(Vec<SNode>),
    Leaf(String),
}

impl SNode {
    fn leaf(s: impl Into<String>) -> SNode {
        SNode {
            span: None,
            node: Node::Leaf(s.into()),
        }
    }

    /// Widens the span of every table and array to cover its contents: a table header's
    /// span covers only its own lines, not sub-tables written after it, and a table written
    /// with dotted keys has no span at all.
    fn fill_spans(&mut self) {
        let mut lo = self.span.as_ref().map_or(usize::MAX, |s| s.start);
        let mut hi = self.span.as_ref().map_or(0, |s| s.end);
        let mut widen = |s: &Option<Range<usize>>| {
            if let Some(s) = s {
                lo = lo.min(s.start);
                hi = hi.max(s.end);
            }
        };
        match &mut self.node {
            Node::Table(entries) => {
                for (k, v) in entries {
                    v.fill_spans();
                    widen(&k.span);
                    widen(&v.span);
                }
            }
            Node::Array(items) => {
                for v in items {
                    v.fill_spans();
                    widen(&v.span);
                }
            }
            Node::Leaf(_) => {}
        }
        if lo < hi {
            self.span = Some(lo..hi);
        }
    }

    /// Appends to `path` the field at `offset`.
    fn locate(&self, offset: usize, path: &mut String) {
        let Some((segments, _)) = self.find(offset) else {
            return;
        };
        for seg in segments {
            match seg {
                Segment::Key(k) => {
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(k);
                }
                Segment::Index(i) => path.push_str(&format!("[{i}]")),
            }
        }
    }

    /// The path below this node to the narrowest key or value holding `offset`, and that
    /// key's or value's length. Widened spans may overlap (tables interleaved in the file),
    /// so every candidate is followed and the narrowest wins.
    fn find<'a>(&'a self, offset: usize) -> Option<(Vec<Segment<'a>>, usize)> {
        let holds = |n: &SNode| n.span.as_ref().is_some_and(|s| s.contains(&offset));
        let len = |n: &SNode| n.span.as_ref().map_or(usize::MAX, |s| s.len());
        let below = |first: Segment<'a>, v: &'a SNode| -> (Vec<Segment<'a>>, usize) {
            match v.find(offset) {
                Some((mut rest, l)) => {
                    rest.insert(0, first);
                    (rest, l)
                }
                None => (vec![first], len(v)),
            }
        };
        let candidates: Vec<(Vec<Segment<'a>>, usize)> = match &self.node {
            Node::Table(entries) => entries
                .iter()
                .filter_map(|(k, v)| {
                    let Node::Leaf(key) = &k.node else {
                        return None;
                    };
                    if holds(k) {
                        Some((vec![Segment::Key(key)], len(k)))
                    } else if holds(v) {
                        Some(below(Segment::Key(key), v))
                    } else {
                        None
                    }
                })
                .collect(),
            Node::Array(items) => items
                .iter()
                .enumerate()
                .filter(|(_, v)| holds(v))
                .map(|(i, v)| below(Segment::Index(i), v))
                .collect(),
            Node::Leaf(_) => Vec::new(),
        };
        candidates.into_iter().min_by_key(|(_, l)| *l)
    }
}

enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

struct SNodeVisitor;

impl<'de> serde::de::Visitor<'de> for SNodeVisitor {
    type Value = SNode;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any TOML value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<SNode, E> {
        Ok(SNode::leaf(""))
    }
    fn visit_i64<E>(self, _: i64) -> Result<SNode, E> {
        Ok(SNode::leaf(""))
    }
    fn visit_u64<E>(self, _: u64) -> Result<SNode, E> {
        Ok(SNode::leaf(""))
    }
    fn visit_f64<E>(self, _: f64) -> Result<SNode, E> {
        Ok(SNode::leaf(""))
    }
    fn visit_str<E>(self, s: &str) -> Result<SNode, E> {
        Ok(SNode::leaf(s))
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<SNode, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = a.next_element()? {
            items.push(item);
        }
        Ok(SNode {
            span: None,
            node: Node::Array(items),
        })
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<SNode, A::Error> {
        // The first key says which: the span protocol's field, or a table's first key (with
        // its own span, if `toml` has one).
        let Some(first) = a.next_key::<SNode>()? else {
            return Ok(SNode {
                span: None,
                node: Node::Table(Vec::new()),
            });
        };
        if first.span.is_none() && matches!(&first.node, Node::Leaf(k) if k == SPANNED_START) {
            let start: usize = a.next_value()?;
            let mut end = start;
            let mut node = Node::Leaf(String::new());
            while let Some(key) = a.next_key::<String>()? {
                if key == SPANNED_END {
                    end = a.next_value()?;
                } else {
                    node = a.next_value::<Unspanned>()?.0.node;
                }
            }
            return Ok(SNode {
                span: Some(start..end),
                node,
            });
        }
        // A table without a span.
        let mut entries = vec![(first, a.next_value::<SNode>()?)];
        while let Some(key) = a.next_key::<SNode>()? {
            entries.push((key, a.next_value::<SNode>()?));
        }
        Ok(SNode {
            span: None,
            node: Node::Table(entries),
        })
    }
}

impl<'de> Deserialize<'de> for SNode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_struct(SPANNED_NAME, &SPANNED_FIELDS, SNodeVisitor)
    }
}

/// The value inside a span: asking for a span again would get the same span again.
struct Unspanned(SNode);

impl<'de> Deserialize<'de> for Unspanned {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(SNodeVisitor).map(Unspanned)
    }
}

/// `(known: a, b)`, sorted.
fn known_list<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let mut names: Vec<&str> = names.collect();
    names.sort_unstable();
    names.dedup();
    if names.is_empty() {
        "(none is declared)".to_owned()
    } else {
        format!("(known: {})", names.join(", "))
    }
}

/// Names of virtual nodes, routers and routes: what the override header can carry.
fn check_name(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 255
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a name: 1 to 255 letters, digits, `.`, `_` or `-`, starting with a \
             letter or digit"
        ))
    }
}

/// A virtual service name: a DNS name, returned lowercase without a trailing dot.
fn check_dns_name(s: &str) -> Result<String, String> {
    let name = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if !name.is_empty() && name.len() <= 253 && name.split('.').all(label_ok) {
        Ok(name)
    } else {
        Err(format!(
            "{s:?} is not a DNS name (letters, digits and `-` in dot-separated labels)"
        ))
    }
}

fn compile_regex(re: &str) -> Result<Regex, String> {
    RegexBuilder::new(&format!("^(?:{re})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| {
            // The crate's syntax errors draw a caret diagram over several lines; keep the
            // line that says what is wrong.
            let text = e.to_string();
            let what = text
                .lines()
                .find_map(|l| l.strip_prefix("error: "))
                .unwrap_or(&text)
                .to_owned();
            format!("invalid regex {re:?}: {what}")
        })
}

/// The route kinds a router listener of `listener` protocol takes (App Mesh: the same).
fn router_takes(listener: Protocol, kind: Protocol) -> bool {
    listener == kind
}

/// Whether a route of `kind` may send traffic to a node listener of `protocol`: tcp routes
/// to any; http and http2 routes to any HTTP listener; grpc routes to HTTP/2 ones.
fn target_takes(kind: Protocol, protocol: Protocol) -> bool {
    match kind {
        Protocol::Tcp => true,
        Protocol::Http | Protocol::Http2 => protocol.is_request_level(),
        Protocol::Grpc => matches!(protocol, Protocol::Http2 | Protocol::Grpc),
    }
}

fn listeners_text(listeners: &[Listener]) -> String {
    listeners
        .iter()
        .map(|l| format!("{}/{}", l.port, l.protocol))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Headers the override header may not be named after: they frame or route the request.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "traceparent",
    "tracestate",
];

struct NodeEntry {
    node: VirtualNode,
    line: usize,
}

struct RouterEntry {
    name: String,
    listeners: Vec<Listener>,
    line: usize,
}

struct RouteEntry {
    /// `None` when the router did not resolve (there is then a problem).
    router: Option<usize>,
    priority: Option<u32>,
    route: Route,
}

struct Checker<'a> {
    file: &'a str,
    lines: Lines,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn problem(
        &mut self,
        span: Range<usize>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) {
        self.problems.push(Problem {
            file: self.file.to_owned(),
            line: self.lines.line(span.start),
            field: field.into(),
            message: message.into(),
        });
    }

    fn detection(&mut self, s: &ProtocolDetectionSpec) -> DetectionSettings {
        let mut d = DetectionSettings::default();
        if let Some(t) = &s.timeout {
            let t_value = t.get_ref().0;
            if t_value <= MAX_DETECTION_TIMEOUT {
                d.timeout = (!t_value.is_zero()).then_some(t_value);
            } else {
                self.problem(
                    t.span(),
                    "routing.protocol_detection.timeout",
                    format!(
                        "{} is longer than {}: a server-speaks-first protocol would wait that long",
                        humantime::format_duration(t_value),
                        humantime::format_duration(MAX_DETECTION_TIMEOUT)
                    ),
                );
            }
        }
        if let Some(ports) = &s.opaque_ports {
            d.opaque_ports = ports.clone();
        }
        d
    }

    fn settings(
        &mut self,
        s: &RoutingSettings,
        known: &KnownNames,
    ) -> (OverrideHeader, RetryBudgetSettings) {
        let mut budget = RetryBudgetSettings::default();
        let b = &s.retry_budget;
        if let Some(ratio) = &b.ratio {
            let r = *ratio.get_ref();
            if r.is_finite() && (0.0..=1.0).contains(&r) {
                budget.ratio = r;
            } else {
                self.problem(
                    ratio.span(),
                    "routing.retry_budget.ratio",
                    format!("{r} is not between 0 and 1 (retries per original request)"),
                );
            }
        }
        if let Some(min) = &b.min_retries_per_second {
            budget.min_retries_per_second = *min.get_ref();
        }
        if let Some(window) = &b.window {
            let w = window.get_ref().0;
            if (Duration::from_secs(1)..=Duration::from_secs(300)).contains(&w) {
                budget.window = w;
            } else {
                self.problem(
                    window.span(),
                    "routing.retry_budget.window",
                    format!("{} is not between 1s and 5m", humantime::format_duration(w)),
                );
            }
        }

        let o = &s.override_header;
        let mut name = HeaderName::from_static(DEFAULT_HEADER);
        if let Some(n) = &o.name {
            let field = "routing.override_header.name";
            match HeaderName::from_bytes(n.get_ref().to_ascii_lowercase().as_bytes()) {
                Ok(h) if RESERVED_HEADERS.contains(&h.as_str()) => self.problem(
                    n.span(),
                    field,
                    format!(
                        "{:?} is a header the proxy itself reads or sets",
                        h.as_str()
                    ),
                ),
                Ok(h) => name = h,
                Err(_) => self.problem(
                    n.span(),
                    field,
                    format!("{:?} is not an HTTP header name", n.get_ref()),
                ),
            }
        }
        let allow: Vec<String> = o.allow_from.iter().map(|a| a.get_ref().clone()).collect();
        let header = match OverrideHeader::new(name.clone(), &allow, known.trust_domain.as_ref()) {
            Ok(h) => h,
            Err((i, msg)) => {
                self.problem(
                    o.allow_from[i].span(),
                    format!("routing.override_header.allow_from[{i}]"),
                    msg,
                );
                OverrideHeader::default()
            }
        };
        (header, budget)
    }

    fn listeners(&mut self, path: &str, specs: &[super::model::ListenerSpec]) -> Vec<Listener> {
        let mut out: Vec<Listener> = Vec::new();
        for (j, l) in specs.iter().enumerate() {
            let port = *l.port.get_ref();
            let field = format!("{path}.listeners[{j}].port");
            if port == 0 {
                self.problem(l.port.span(), field, "port 0 is not a port");
            } else if out.iter().any(|o| o.port == port) {
                self.problem(l.port.span(), field, format!("port {port} is listed twice"));
            } else {
                out.push(Listener {
                    port,
                    protocol: l.protocol,
                });
            }
        }
        out
    }

    fn nodes(&mut self, specs: &[VirtualNodeSpec], known: &KnownNames) -> Vec<NodeEntry> {
        let mut out: Vec<NodeEntry> = Vec::new();
        for (i, n) in specs.iter().enumerate() {
            let path = format!("virtual_nodes[{i}]");
            let name = n.name.get_ref();
            let line = self.lines.line(n.name.span().start);
            if let Err(e) = check_name(name) {
                self.problem(n.name.span(), format!("{path}.name"), e);
            } else if let Some(first) = out.iter().find(|o| o.node.name == *name) {
                let msg = format!(
                    "virtual node {name:?} is already declared (line {})",
                    first.line
                );
                self.problem(n.name.span(), format!("{path}.name"), msg);
            }
            let listeners = self.listeners(&path, &n.listeners);
            let discovery = match (&n.service, &n.endpoint, &n.task) {
                (Some(s), None, None) => {
                    if !known.services.contains(s.get_ref()) {
                        let msg = format!(
                            "no [[services]] entry {:?} {}",
                            s.get_ref(),
                            known_list(known.services.iter().map(String::as_str))
                        );
                        self.problem(s.span(), format!("{path}.service"), msg);
                    }
                    Discovery::Service(s.get_ref().clone())
                }
                (None, Some(e), None) => {
                    if !known.endpoints.contains(e.get_ref()) {
                        let msg = format!(
                            "no [[endpoints]] entry {:?} {}",
                            e.get_ref(),
                            known_list(known.endpoints.iter().map(String::as_str))
                        );
                        self.problem(e.span(), format!("{path}.endpoint"), msg);
                    }
                    Discovery::Endpoint(e.get_ref().clone())
                }
                (None, None, Some(t)) => {
                    if let Some(tasks) = &known.tasks
                        && !tasks.contains(t.get_ref())
                    {
                        let msg = format!(
                            "no [[tasks]] entry with id {:?} {} (tasks discovered through \
                             [ecs] are not checked)",
                            t.get_ref(),
                            known_list(tasks.iter().map(String::as_str))
                        );
                        self.problem(t.span(), format!("{path}.task"), msg);
                    }
                    Discovery::Task(t.get_ref().clone())
                }
                _ => {
                    self.problem(
                        n.name.span(),
                        path.clone(),
                        format!(
                            "virtual node {name:?} needs exactly one of `service`, `endpoint` \
                             or `task` (how its endpoints are found)"
                        ),
                    );
                    Discovery::Task(String::new())
                }
            };
            out.push(NodeEntry {
                node: VirtualNode {
                    name: name.clone(),
                    discovery,
                    listeners,
                },
                line,
            });
        }
        out
    }

    fn routers(&mut self, specs: &[VirtualRouterSpec]) -> Vec<RouterEntry> {
        let mut out: Vec<RouterEntry> = Vec::new();
        for (i, r) in specs.iter().enumerate() {
            let path = format!("virtual_routers[{i}]");
            let name = r.name.get_ref();
            if let Err(e) = check_name(name) {
                self.problem(r.name.span(), format!("{path}.name"), e);
            } else if let Some(first) = out.iter().find(|o| o.name == *name) {
                let msg = format!(
                    "virtual router {name:?} is already declared (line {})",
                    first.line
                );
                self.problem(r.name.span(), format!("{path}.name"), msg);
            }
            if r.listeners.is_empty() {
                self.problem(
                    r.name.span(),
                    format!("{path}.listeners"),
                    "a virtual router needs at least one listener (port and protocol)",
                );
            }
            let listeners = self.listeners(&path, &r.listeners);
            out.push(RouterEntry {
                name: name.clone(),
                listeners,
                line: self.lines.line(r.name.span().start),
            });
        }
        out
    }

    fn routes(
        &mut self,
        specs: &[RouteSpec],
        nodes: &[NodeEntry],
        routers: &[RouterEntry],
    ) -> Vec<RouteEntry> {
        let mut out: Vec<RouteEntry> = Vec::new();
        // (router, name) -> line; (router, priority) -> (route name, line)
        let mut names: HashMap<(usize, &str), usize> = HashMap::new();
        let mut priorities: HashMap<(usize, u32), (&str, usize)> = HashMap::new();
        for (i, r) in specs.iter().enumerate() {
            let path = format!("routes[{i}]");
            let name = r.name.get_ref();
            let line = self.lines.line(r.name.span().start);
            if let Err(e) = check_name(name) {
                self.problem(r.name.span(), format!("{path}.name"), e);
            }
            let router_name = r.virtual_router.get_ref();
            let router = routers.iter().position(|x| x.name == *router_name);
            if router.is_none() {
                let msg = format!(
                    "no virtual router {router_name:?} {}",
                    known_list(routers.iter().map(|x| x.name.as_str()))
                );
                self.problem(
                    r.virtual_router.span(),
                    format!("{path}.virtual_router"),
                    msg,
                );
            }
            if let Some(ri) = router
                && let Some(first) = names.insert((ri, name.as_str()), line)
            {
                let msg = format!(
                    "virtual router {router_name:?} already has a route named {name:?} (line \
                     {first})"
                );
                self.problem(r.name.span(), format!("{path}.name"), msg);
            }
            let priority = r.priority.as_ref().map(|p| (*p.get_ref(), p.span()));
            if let Some((p, span)) = &priority {
                if *p > MAX_PRIORITY {
                    self.problem(
                        span.clone(),
                        format!("{path}.priority"),
                        format!("{p} is not between 0 (first) and {MAX_PRIORITY} (last)"),
                    );
                } else if let Some(ri) = router
                    && let Some((other, other_line)) =
                        priorities.insert((ri, *p), (name.as_str(), line))
                {
                    let msg = format!(
                        "priority {p} is also route {other:?}'s (line {other_line}); priorities \
                         are unique within a virtual router"
                    );
                    self.problem(span.clone(), format!("{path}.priority"), msg);
                }
            }
            let kind = self.route_kind(r, &path, router.map(|ri| &routers[ri]));
            let matcher = self.route_match(r, &path, kind);
            let (targets, total_weight) = self.targets(r, &path, kind, nodes);
            let retry = self.retry_policy(r, &path, kind);
            let timeouts = self.timeouts(r, &path, kind);
            out.push(RouteEntry {
                router,
                priority: priority.map(|(p, _)| p),
                route: Route {
                    name: name.clone(),
                    kind: kind.unwrap_or(Protocol::Http),
                    matcher,
                    targets,
                    total_weight,
                    retry,
                    timeouts,
                },
            });
        }
        out
    }

    /// The route's kind: written, or the protocol of all its router's listeners.
    fn route_kind(
        &mut self,
        r: &RouteSpec,
        path: &str,
        router: Option<&RouterEntry>,
    ) -> Option<Protocol> {
        let field = format!("{path}.kind");
        match (&r.kind, router) {
            (Some(k), Some(router)) => {
                let kind = *k.get_ref();
                if !router.listeners.is_empty()
                    && !router
                        .listeners
                        .iter()
                        .any(|l| router_takes(l.protocol, kind))
                {
                    let msg = format!(
                        "virtual router {:?} has no {kind} listener for a {kind} route (its \
                         listeners: {})",
                        router.name,
                        listeners_text(&router.listeners)
                    );
                    self.problem(k.span(), field, msg);
                }
                Some(kind)
            }
            (Some(k), None) => Some(*k.get_ref()),
            (None, Some(router)) => {
                let mut protocols: Vec<Protocol> = Vec::new();
                for l in &router.listeners {
                    if !protocols.contains(&l.protocol) {
                        protocols.push(l.protocol);
                    }
                }
                match protocols.as_slice() {
                    [one] => Some(*one),
                    [] => None, // the router's own problem is reported
                    several => {
                        let list: Vec<&str> = several.iter().map(|p| p.as_str()).collect();
                        let msg = format!(
                            "required: virtual router {:?} has listeners of several protocols \
                             ({})",
                            router.name,
                            list.join(", ")
                        );
                        self.problem(r.name.span(), field, msg);
                        None
                    }
                }
            }
            (None, None) => None,
        }
    }

    fn route_match(&mut self, r: &RouteSpec, path: &str, kind: Option<Protocol>) -> RequestMatch {
        let mut out = RequestMatch::default();
        if kind == Some(Protocol::Grpc) {
            out.grpc = Some(GrpcMatcher::default());
        }
        let (Some(m), Some(kind)) = (&r.matcher, kind) else {
            return out;
        };
        let mpath = format!("{path}.match");
        // Where each condition is written (the route's name when `toml` gives no span).
        let here = |s: Option<Range<usize>>| s.unwrap_or_else(|| r.name.span());
        let path_span = m
            .path
            .as_ref()
            .and_then(|p| p.exact.as_ref().or(p.regex.as_ref()).map(|x| x.span()));
        let conditions = [
            ("prefix", m.prefix.as_ref().map(|x| x.span()), false),
            (
                "path",
                m.path.as_ref().map(|_| here(path_span.clone())),
                false,
            ),
            ("method", m.method.as_ref().map(|x| x.span()), false),
            ("headers", m.headers.first().map(|h| h.name.span()), false),
            (
                "service_name",
                m.service_name.as_ref().map(|x| x.span()),
                true,
            ),
            (
                "method_name",
                m.method_name.as_ref().map(|x| x.span()),
                true,
            ),
            ("metadata", m.metadata.first().map(|h| h.name.span()), true),
        ];
        if kind == Protocol::Tcp {
            let span = conditions.iter().find_map(|(_, s, _)| s.clone());
            self.problem(here(span), mpath, "tcp routes have no match conditions");
            return out;
        }
        let grpc = kind == Protocol::Grpc;
        for (field, span, grpc_only) in conditions {
            let Some(span) = span else { continue };
            if grpc_only != grpc {
                let msg = if grpc {
                    "not a condition of grpc routes (they match service_name, method_name and \
                     metadata)"
                } else {
                    "only grpc routes match service_name, method_name and metadata"
                };
                self.problem(span, format!("{mpath}.{field}"), msg);
            }
        }
        if grpc {
            let g = out.grpc.get_or_insert_with(GrpcMatcher::default);
            g.service = m.service_name.as_ref().map(|s| s.get_ref().clone());
            g.method = m.method_name.as_ref().map(|s| s.get_ref().clone());
            if let Some(method) = &m.method_name
                && m.service_name.is_none()
            {
                self.problem(
                    method.span(),
                    format!("{mpath}.method_name"),
                    "a gRPC method is matched within a service: set service_name too",
                );
            }
            for (field, value) in [
                ("service_name", &m.service_name),
                ("method_name", &m.method_name),
            ] {
                if let Some(v) = value
                    && (v.get_ref().is_empty() || v.get_ref().contains('/'))
                {
                    let msg = format!("{:?} is not a gRPC name (non-empty, no `/`)", v.get_ref());
                    self.problem(v.span(), format!("{mpath}.{field}"), msg);
                }
            }
            out.headers = self.header_matches(&m.metadata, &format!("{mpath}.metadata"));
            return out;
        }
        match (&m.prefix, &m.path) {
            (Some(_), Some(_)) => self.problem(
                here(path_span),
                format!("{mpath}.path"),
                "give `prefix` or `path`, not both",
            ),
            (Some(p), None) => {
                if p.get_ref().starts_with('/') {
                    out.path = PathMatcher::Prefix(p.get_ref().clone());
                } else {
                    let msg = format!("{:?} does not start with `/`", p.get_ref());
                    self.problem(p.span(), format!("{mpath}.prefix"), msg);
                }
            }
            (None, Some(p)) => match (&p.exact, &p.regex) {
                (Some(x), None) => {
                    if x.get_ref().starts_with('/') {
                        out.path = PathMatcher::Exact(x.get_ref().clone());
                    } else {
                        let msg = format!("{:?} does not start with `/`", x.get_ref());
                        self.problem(x.span(), format!("{mpath}.path.exact"), msg);
                    }
                }
                (None, Some(x)) => match compile_regex(x.get_ref()) {
                    Ok(re) => out.path = PathMatcher::Regex(re),
                    Err(e) => self.problem(x.span(), format!("{mpath}.path.regex"), e),
                },
                _ => self.problem(
                    here(path_span),
                    format!("{mpath}.path"),
                    "needs exactly one of `exact` or `regex`",
                ),
            },
            (None, None) => {}
        }
        out.method = m.method.as_ref().map(|x| *x.get_ref());
        out.headers = self.header_matches(&m.headers, &format!("{mpath}.headers"));
        out
    }

    fn header_matches(&mut self, specs: &[HeaderMatchSpec], path: &str) -> Vec<HeaderMatcher> {
        let mut out = Vec::new();
        for (j, h) in specs.iter().enumerate() {
            let hpath = format!("{path}[{j}]");
            let raw = h.name.get_ref();
            let name = match HeaderName::from_bytes(raw.to_ascii_lowercase().as_bytes()) {
                Ok(name) => name,
                Err(_) => {
                    let msg = format!("{raw:?} is not an HTTP header name");
                    self.problem(h.name.span(), format!("{hpath}.name"), msg);
                    continue;
                }
            };
            let value = match &h.matcher {
                None => ValueMatcher::Present,
                Some(m) => {
                    let given = [
                        m.exact.is_some(),
                        m.prefix.is_some(),
                        m.suffix.is_some(),
                        m.regex.is_some(),
                        m.range.is_some(),
                    ];
                    if given.iter().filter(|g| **g).count() != 1 {
                        self.problem(
                            h.name.span(),
                            format!("{hpath}.match"),
                            "needs exactly one of `exact`, `prefix`, `suffix`, `regex` or \
                             `range` (leave `match` out to require only that the header is \
                             present)",
                        );
                        continue;
                    }
                    if let Some(x) = &m.exact {
                        ValueMatcher::Exact(x.get_ref().clone())
                    } else if let Some(x) = &m.prefix {
                        ValueMatcher::Prefix(x.get_ref().clone())
                    } else if let Some(x) = &m.suffix {
                        ValueMatcher::Suffix(x.get_ref().clone())
                    } else if let Some(x) = &m.regex {
                        match compile_regex(x.get_ref()) {
                            Ok(re) => ValueMatcher::Regex(re),
                            Err(e) => {
                                self.problem(x.span(), format!("{hpath}.match.regex"), e);
                                continue;
                            }
                        }
                    } else if let Some(range) = &m.range {
                        let (start, end) = (*range.start.get_ref(), *range.end.get_ref());
                        if start >= end {
                            let msg = format!(
                                "start {start} must be less than end {end} (the range is \
                                 start <= value < end)"
                            );
                            self.problem(range.start.span(), format!("{hpath}.match.range"), msg);
                            continue;
                        }
                        ValueMatcher::Range { start, end }
                    } else {
                        unreachable!("exactly one is given")
                    }
                }
            };
            out.push(HeaderMatcher {
                name,
                invert: h.invert,
                value,
            });
        }
        out
    }

    fn targets(
        &mut self,
        r: &RouteSpec,
        path: &str,
        kind: Option<Protocol>,
        nodes: &[NodeEntry],
    ) -> (Vec<WeightedTarget>, u32) {
        let action = &r.action;
        let tpath = format!("{path}.action.weighted_targets");
        let n = action.weighted_targets.len();
        if n == 0 || n > MAX_TARGETS {
            self.problem(
                r.name.span(),
                tpath.clone(),
                format!("a route needs 1 to {MAX_TARGETS} weighted targets, not {n}"),
            );
        }
        let mut out: Vec<WeightedTarget> = Vec::new();
        let mut total = 0u32;
        for (j, t) in action.weighted_targets.iter().enumerate() {
            let path = format!("{tpath}[{j}]");
            let weight = *t.weight.get_ref();
            if weight > MAX_WEIGHT {
                self.problem(
                    t.weight.span(),
                    format!("{path}.weight"),
                    format!("{weight} is not between 0 and {MAX_WEIGHT}"),
                );
            } else {
                total += weight;
            }
            let node_name = t.virtual_node.get_ref();
            let Some(ni) = nodes.iter().position(|x| x.node.name == *node_name) else {
                let msg = format!(
                    "no virtual node {node_name:?} {}",
                    known_list(nodes.iter().map(|x| x.node.name.as_str()))
                );
                self.problem(t.virtual_node.span(), format!("{path}.virtual_node"), msg);
                continue;
            };
            let node = &nodes[ni].node;
            let listener = match (&t.port, node.listeners.as_slice()) {
                (Some(p), listeners) => {
                    let port = *p.get_ref();
                    match listeners.iter().find(|l| l.port == port) {
                        Some(l) => Some(*l),
                        None => {
                            let msg = format!(
                                "virtual node {node_name:?} has no listener on port {port} (its \
                                 listeners: {})",
                                listeners_text(listeners)
                            );
                            self.problem(p.span(), format!("{path}.port"), msg);
                            continue;
                        }
                    }
                }
                (None, [only]) => Some(*only),
                (None, []) => {
                    let msg = format!(
                        "virtual node {node_name:?} has no listeners; a route target needs one \
                         (port and protocol)"
                    );
                    self.problem(t.virtual_node.span(), format!("{path}.virtual_node"), msg);
                    continue;
                }
                (None, several) => {
                    let msg = format!(
                        "required: virtual node {node_name:?} has several listeners ({})",
                        listeners_text(several)
                    );
                    self.problem(t.virtual_node.span(), format!("{path}.port"), msg);
                    continue;
                }
            };
            if let (Some(kind), Some(l)) = (kind, listener)
                && !target_takes(kind, l.protocol)
            {
                let msg = format!(
                    "a {kind} route cannot send traffic to virtual node {node_name:?}'s {} \
                     listener on port {}",
                    l.protocol, l.port
                );
                self.problem(t.virtual_node.span(), format!("{path}.virtual_node"), msg);
            }
            let target = TargetRef {
                node: ni,
                port: listener.map(|l| l.port),
            };
            if out.iter().any(|o| o.target == target) {
                let msg = format!("virtual node {node_name:?} is listed twice");
                self.problem(t.virtual_node.span(), format!("{path}.virtual_node"), msg);
                continue;
            }
            out.push(WeightedTarget {
                target,
                weight: weight.min(MAX_WEIGHT),
            });
        }
        if n > 0 && total == 0 {
            let span = action.weighted_targets[0].weight.span();
            self.problem(
                span,
                tpath,
                "the weights add up to 0: at least one target needs a weight above 0",
            );
        }
        (out, total)
    }

    fn retry_policy(
        &mut self,
        r: &RouteSpec,
        path: &str,
        kind: Option<Protocol>,
    ) -> Option<RetryPolicy> {
        let p = r.retry_policy.as_ref()?;
        let rpath = format!("{path}.retry_policy");
        // The one field a retry policy always has.
        let span = p.per_retry_timeout.span();
        if kind == Some(Protocol::Tcp) {
            self.problem(
                span,
                rpath,
                "tcp routes have no retry policy (a TCP connection cannot be replayed)",
            );
            return None;
        }
        if p.http_retry_events.is_empty()
            && p.tcp_retry_events.is_empty()
            && p.grpc_retry_events.is_empty()
        {
            self.problem(
                span.clone(),
                rpath.clone(),
                "no retry event: list http_retry_events (server-error, gateway-error, \
                 client-error, stream-error), tcp_retry_events (connection-error) or, for grpc \
                 routes, grpc_retry_events",
            );
        }
        if !p.grpc_retry_events.is_empty() && kind.is_some_and(|k| k != Protocol::Grpc) {
            self.problem(
                span.clone(),
                format!("{rpath}.grpc_retry_events"),
                "only grpc routes retry on gRPC status codes",
            );
        }
        let timeout = p.per_retry_timeout.get_ref().0;
        if timeout.is_zero() {
            self.problem(
                span,
                format!("{rpath}.per_retry_timeout"),
                "must be more than 0s",
            );
        }
        let mut http_events = Vec::new();
        for e in &p.http_retry_events {
            if !http_events.contains(e) {
                http_events.push(*e);
            }
        }
        Some(RetryPolicy {
            max_retries: p.max_retries,
            per_retry_timeout: timeout,
            http_events,
            connection_error: !p.tcp_retry_events.is_empty(),
            grpc_codes: p.grpc_retry_events.iter().map(|e| e.code()).collect(),
        })
    }

    fn timeouts(&mut self, r: &RouteSpec, path: &str, kind: Option<Protocol>) -> Timeouts {
        let tcp = kind == Some(Protocol::Tcp);
        let mut out = if tcp {
            Timeouts::TCP_DEFAULT
        } else {
            Timeouts::HTTP_DEFAULT
        };
        let Some(t) = &r.timeout else {
            return out;
        };
        let nonzero = |d: Duration| (!d.is_zero()).then_some(d);
        if let Some(per_request) = &t.per_request {
            if tcp {
                self.problem(
                    per_request.span(),
                    format!("{path}.timeout.per_request"),
                    "tcp routes have no requests; only `idle` applies",
                );
            }
            out.per_request = nonzero(per_request.get_ref().0);
        }
        if let Some(idle) = &t.idle {
            out.idle = nonzero(idle.get_ref().0);
        }
        out
    }

    fn services(
        &mut self,
        specs: &[VirtualServiceSpec],
        nodes: &[NodeEntry],
        routers: &[RouterEntry],
        routes: &[RouteEntry],
    ) -> Vec<VirtualService> {
        let mut out: Vec<VirtualService> = Vec::new();
        let mut lines: HashMap<String, usize> = HashMap::new();
        for (i, s) in specs.iter().enumerate() {
            let path = format!("virtual_services[{i}]");
            let name = match check_dns_name(s.name.get_ref()) {
                Ok(n) => n,
                Err(e) => {
                    self.problem(s.name.span(), format!("{path}.name"), e);
                    continue;
                }
            };
            let line = self.lines.line(s.name.span().start);
            if let Some(first) = lines.insert(name.clone(), line) {
                let msg = format!("virtual service {name:?} is already declared (line {first})");
                self.problem(s.name.span(), format!("{path}.name"), msg);
            }
            let p = &s.provider;
            let provider = match (&p.virtual_node, &p.virtual_router) {
                (Some(n), None) => match nodes.iter().position(|x| x.node.name == *n.get_ref()) {
                    Some(ni) => Some(Provider::Node(ni)),
                    None => {
                        let msg = format!(
                            "no virtual node {:?} {}",
                            n.get_ref(),
                            known_list(nodes.iter().map(|x| x.node.name.as_str()))
                        );
                        self.problem(n.span(), format!("{path}.provider.virtual_node"), msg);
                        None
                    }
                },
                (None, Some(r)) => match routers.iter().position(|x| x.name == *r.get_ref()) {
                    Some(ri) => {
                        if !routes.iter().any(|x| x.router == Some(ri)) {
                            let msg = format!(
                                "virtual router {:?} has no routes: every request to {name:?} \
                                 would fail",
                                r.get_ref()
                            );
                            self.problem(r.span(), format!("{path}.provider.virtual_router"), msg);
                        }
                        Some(Provider::Router(ri))
                    }
                    None => {
                        let msg = format!(
                            "no virtual router {:?} {}",
                            r.get_ref(),
                            known_list(routers.iter().map(|x| x.name.as_str()))
                        );
                        self.problem(r.span(), format!("{path}.provider.virtual_router"), msg);
                        None
                    }
                },
                _ => {
                    self.problem(
                        s.name.span(),
                        format!("{path}.provider"),
                        "needs exactly one of `virtual_node` or `virtual_router`",
                    );
                    None
                }
            };
            let Some(provider) = provider else { continue };
            let override_targets = match provider {
                Provider::Node(ni) => vec![TargetRef {
                    node: ni,
                    port: match nodes[ni].node.listeners.as_slice() {
                        [only] => Some(only.port),
                        _ => None,
                    },
                }],
                Provider::Router(ri) => {
                    let mut targets: Vec<TargetRef> = Vec::new();
                    for route in routes.iter().filter(|x| x.router == Some(ri)) {
                        if route.route.kind == Protocol::Tcp {
                            continue;
                        }
                        for t in &route.route.targets {
                            if !targets.iter().any(|x| x.node == t.target.node) {
                                targets.push(t.target);
                            }
                        }
                    }
                    targets
                }
            };
            out.push(VirtualService {
                name,
                provider,
                override_targets,
            });
        }
        out
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// The seed scenario: serviceA calls serviceb.apps.local; router serviceB splits 75%
    /// serviceB / 25% serviceBv2, with retries. A whole agent configuration file.
    pub(in crate::routing) const SEED: &str = r#"
[identity]
trust_domain = "prod.example.com"
bundle = "/etc/mesh/bundle.pem"
issuer = "/etc/mesh/issuer.pem"

[[services]]
name = "serviceb"
hostname = "serviceb.apps.local"
port = 8080
role_arn = "arn:aws:iam::111122223333:role/serviceB"

[[services]]
name = "serviceb-v2"
hostname = "serviceb-v2.apps.local"
port = 8080
role_arn = "arn:aws:iam::111122223333:role/serviceB"

[routing.retry_budget]
ratio = 0.2
min_retries_per_second = 10
window = "10s"

[routing.override_header]
name = "mesh-route"
allow_from = [
  "arn:aws:iam::111122223333:role/qa",
  "spiffe://prod.example.com/aws/444455556666/*",
]

[[virtual_services]]
name = "serviceb.apps.local"
provider = { virtual_router = "serviceB" }

[[virtual_routers]]
name = "serviceB"
listeners = [{ port = 8080, protocol = "http" }]

[[virtual_nodes]]
name = "serviceB"
service = "serviceb"
listeners = [{ port = 8080, protocol = "http" }]

[[virtual_nodes]]
name = "serviceBv2"
service = "serviceb-v2"
listeners = [{ port = 8080, protocol = "http" }]

[[routes]]
name = "serviceB-split"
virtual_router = "serviceB"
priority = 100
match = { prefix = "/" }
action.weighted_targets = [
  { virtual_node = "serviceB", weight = 75 },
  { virtual_node = "serviceBv2", weight = 25 },
]
retry_policy.max_retries = 2
retry_policy.per_retry_timeout = "2s"
retry_policy.http_retry_events = ["server-error", "gateway-error"]
retry_policy.tcp_retry_events = ["connection-error"]
timeout = { per_request = "15s", idle = "300s" }
"#;

    /// Objects most cases below build on (no [identity]).
    const BASE: &str = r#"
[[services]]
name = "serviceb"
[[services]]
name = "serviceb-v2"

[[virtual_nodes]]
name = "serviceB"
service = "serviceb"
listeners = [{ port = 8080, protocol = "http" }]

[[virtual_nodes]]
name = "serviceBv2"
service = "serviceb-v2"
listeners = [{ port = 8080, protocol = "http" }]

[[virtual_routers]]
name = "serviceB"
listeners = [{ port = 8080, protocol = "http" }]

[[virtual_services]]
name = "serviceb.apps.local"
provider = { virtual_router = "serviceB" }

[[routes]]
name = "default"
virtual_router = "serviceB"
action.weighted_targets = [{ virtual_node = "serviceB", weight = 1 }]
"#;

    fn errors(text: &str) -> RoutingError {
        parse_and_validate(text, "mesh.toml").expect_err("the config should be refused")
    }

    /// 1-based line of the first occurrence of `needle`.
    fn line_of(text: &str, needle: &str) -> usize {
        let at = text.find(needle).expect("needle in text");
        text[..at].matches('\n').count() + 1
    }

    #[test]
    fn the_seed_scenario_validates() {
        let table = parse_and_validate(SEED, "mesh.toml").unwrap();
        assert_eq!(
            table.virtual_services().collect::<Vec<_>>(),
            ["serviceb.apps.local"]
        );
        assert_eq!(table.virtual_nodes().len(), 2);
        let budget = table.retry_budget();
        assert_eq!(budget.ratio, 0.2);
        assert_eq!(budget.min_retries_per_second, 10);
        assert_eq!(budget.window, Duration::from_secs(10));
        assert_eq!(table.override_header_name().as_str(), "mesh-route");
        assert_eq!(
            table.virtual_node("serviceBv2").unwrap().discovery(),
            &Discovery::Service("serviceb-v2".into())
        );
    }

    #[test]
    fn the_documented_example_validates() {
        let doc = include_str!("../../../docs/routing.md");
        let section = &doc[doc.find("## Complete example").expect("example section")..];
        let start = section.find("```toml\n").expect("toml block") + "```toml\n".len();
        let end = start + section[start..].find("\n```").expect("end of block");
        let table = parse_and_validate(&section[start..end], "docs/routing.md")
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            table
                .virtual_service_for_authority("serviceb.apps.local:8080")
                .is_some()
        );
    }

    #[test]
    fn an_unknown_target_names_file_line_field_and_the_known_nodes() {
        // The example of the issue, to the line: routes[3] on line 42.
        let text = r#"[ecs]
[[virtual_nodes]]
name = "serviceB"
task = "b"
listeners = [{ port = 8080, protocol = "http" }]
[[virtual_nodes]]
name = "serviceBv2"
task = "b2"
listeners = [{ port = 8080, protocol = "http" }]
[[virtual_routers]]
name = "serviceB"
listeners = [{ port = 8080, protocol = "http" }]
[[routes]]
name = "r0"
virtual_router = "serviceB"
action = { weighted_targets = [{ virtual_node = "serviceB", weight = 1 }] }
[[routes]]
name = "r1"
virtual_router = "serviceB"
priority = 1
action = { weighted_targets = [{ virtual_node = "serviceB", weight = 1 }] }
[[routes]]
name = "r2"
virtual_router = "serviceB"
priority = 2
action = { weighted_targets = [{ virtual_node = "serviceB", weight = 1 }] }
[[routes]]
name = "v3"
virtual_router = "serviceB"
match.prefix = "/v3"
action.weighted_targets = [
  { virtual_node = "serviceB", weight = 50 },
  { virtual_node = "serviceBv3", weight = 50 },
]
"#;
        let padding = "# padding\n".repeat(42 - line_of(text, "serviceBv3"));
        let text = format!("{padding}{text}");
        assert_eq!(line_of(&text, "serviceBv3"), 42);
        assert_eq!(
            errors(&text).to_string(),
            "mesh.toml:42: routes[3].action.weighted_targets[1].virtual_node: no virtual node \
             \"serviceBv3\" (known: serviceB, serviceBv2)"
        );
    }

    /// Every problem validation finds: (config added to BASE, field, part of the message,
    /// the text on the reported line, its last occurrence).
    #[test]
    fn every_check_names_its_field_and_line() {
        let route = |body: &str| {
            format!("\n[[routes]]\nname = \"r\"\nvirtual_router = \"serviceB\"\n{body}\n")
        };
        let target = "action.weighted_targets = [{ virtual_node = \"serviceB\", weight = 1 }]";
        let cases: Vec<(String, &str, &str, &str)> = vec![
            (
                "[[virtual_nodes]]\nname = \"serviceB\"\nservice = \"serviceb\"".into(),
                "virtual_nodes[2].name",
                "already declared (line",
                "name = \"serviceB\"",
            ),
            (
                "[[virtual_nodes]]\nname = \"bad name\"\nservice = \"serviceb\"".into(),
                "virtual_nodes[2].name",
                "is not a name",
                "bad name",
            ),
            (
                "[[virtual_nodes]]\nname = \"x\"\nservice = \"nope\"".into(),
                "virtual_nodes[2].service",
                "no [[services]] entry \"nope\" (known: serviceb, serviceb-v2)",
                "\"nope\"",
            ),
            (
                "[[virtual_nodes]]\nname = \"x\"\nendpoint = \"nope\"".into(),
                "virtual_nodes[2].endpoint",
                "no [[endpoints]] entry \"nope\" (none is declared)",
                "\"nope\"",
            ),
            (
                "[[virtual_nodes]]\nname = \"x\"\ntask = \"nope\"".into(),
                "virtual_nodes[2].task",
                "no [[tasks]] entry with id \"nope\"",
                "\"nope\"",
            ),
            (
                "[[virtual_nodes]]\nname = \"x\"\nservice = \"serviceb\"\ntask = \"t\"".into(),
                "virtual_nodes[2]",
                "exactly one of `service`, `endpoint` or `task`",
                "name = \"x\"",
            ),
            (
                "[[virtual_nodes]]\nname = \"x\"\nservice = \"serviceb\"\nlisteners = [\n{ port = 80, protocol = \"http\" },\n{ port = 80, protocol = \"tcp\" }]".into(),
                "virtual_nodes[2].listeners[1].port",
                "port 80 is listed twice",
                "protocol = \"tcp\"",
            ),
            (
                "[[virtual_routers]]\nname = \"empty\"\nlisteners = []".into(),
                "virtual_routers[1].listeners",
                "at least one listener",
                "\"empty\"",
            ),
            (
                "[[virtual_services]]\nname = \"Serviceb.Apps.Local\"\nprovider = { virtual_node = \"serviceB\" }".into(),
                "virtual_services[1].name",
                "virtual service \"serviceb.apps.local\" is already declared",
                "Serviceb.Apps.Local",
            ),
            (
                "[[virtual_services]]\nname = \"under_score.local\"\nprovider = { virtual_node = \"serviceB\" }".into(),
                "virtual_services[1].name",
                "is not a DNS name",
                "under_score",
            ),
            (
                "[[virtual_services]]\nname = \"x.local\"\nprovider = { virtual_node = \"serviceB\", virtual_router = \"serviceB\" }".into(),
                "virtual_services[1].provider",
                "exactly one of `virtual_node` or `virtual_router`",
                "x.local",
            ),
            (
                "[[virtual_services]]\nname = \"x.local\"\nprovider.virtual_router = \"nope\"".into(),
                "virtual_services[1].provider.virtual_router",
                "no virtual router \"nope\" (known: serviceB)",
                "\"nope\"",
            ),
            (
                "[[virtual_routers]]\nname = \"lonely\"\nlisteners = [{ port = 1, protocol = \"http\" }]\n[[virtual_services]]\nname = \"x.local\"\nprovider.virtual_router = \"lonely\"".into(),
                "virtual_services[1].provider.virtual_router",
                "has no routes",
                "= \"lonely\"\n",
            ),
            (
                route(&format!("virtual_router = \"nope\"\n{target}")).replace("virtual_router = \"serviceB\"\n", ""),
                "routes[1].virtual_router",
                "no virtual router \"nope\" (known: serviceB)",
                "\"nope\"",
            ),
            (
                route(target).replace("name = \"r\"", "name = \"default\""),
                "routes[1].name",
                "already has a route named \"default\"",
                "name = \"default\"",
            ),
            (
                route(&format!("priority = 1001\n{target}")),
                "routes[1].priority",
                "not between 0 (first) and 1000 (last)",
                "1001",
            ),
            (
                format!("{}{}", route(&format!("priority = 7\n{target}")), route(&format!("priority = 7\n{target}")).replace("\"r\"", "\"r2\"")),
                "routes[2].priority",
                "priority 7 is also route \"r\"'s",
                "priority = 7",
            ),
            (
                route(&format!("kind = \"tcp\"\n{target}")),
                "routes[1].kind",
                "virtual router \"serviceB\" has no tcp listener for a tcp route (its listeners: 8080/http)",
                "\"tcp\"",
            ),
            (
                route(&format!("match.prefix = \"api\"\n{target}")),
                "routes[1].match.prefix",
                "does not start with `/`",
                "\"api\"",
            ),
            (
                route(&format!("match.path.exact = \"api\"\n{target}")),
                "routes[1].match.path.exact",
                "does not start with `/`",
                "\"api\"",
            ),
            (
                route(&format!("match.prefix = \"/a\"\nmatch.path.exact = \"/b\"\n{target}")),
                "routes[1].match.path",
                "`prefix` or `path`, not both",
                "\"/b\"",
            ),
            (
                route(&format!("match.path = {{}}\n{target}")),
                "routes[1].match.path",
                "exactly one of `exact` or `regex`",
                "name = \"r\"",
            ),
            (
                route(&format!("match.path.regex = \"/v(1\"\n{target}")),
                "routes[1].match.path.regex",
                "invalid regex \"/v(1\": unclosed group",
                "/v(1",
            ),
            (
                route(&format!("match.service_name = \"x.Y\"\n{target}")),
                "routes[1].match.service_name",
                "only grpc routes",
                "x.Y",
            ),
            (
                route(&format!("match.headers = [{{ name = \"x a\" }}]\n{target}")),
                "routes[1].match.headers[0].name",
                "is not an HTTP header name",
                "\"x a\"",
            ),
            (
                route(&format!("match.headers = [{{ name = \"x\", match = {{ regex = \"(\" }} }}]\n{target}")),
                "routes[1].match.headers[0].match.regex",
                "invalid regex",
                "regex = \"(\"",
            ),
            (
                route(&format!("match.headers = [{{ name = \"x\", match = {{ range = {{ start = 5, end = 5 }} }} }}]\n{target}")),
                "routes[1].match.headers[0].match.range",
                "start 5 must be less than end 5",
                "start = 5",
            ),
            (
                route(&format!("match.headers = [{{ name = \"x\", match = {{ exact = \"1\", prefix = \"2\" }} }}]\n{target}")),
                "routes[1].match.headers[0].match",
                "exactly one of `exact`, `prefix`, `suffix`, `regex` or `range`",
                "name = \"x\"",
            ),
            (
                route("action.weighted_targets = []"),
                "routes[1].action.weighted_targets",
                "1 to 10 weighted targets, not 0",
                "name = \"r\"",
            ),
            (
                route("action.weighted_targets = [{ virtual_node = \"serviceB\", weight = 0 },\n{ virtual_node = \"serviceBv2\", weight = 0 }]"),
                "routes[1].action.weighted_targets",
                "the weights add up to 0",
                "weight = 0 },\n",
            ),
            (
                route("action.weighted_targets = [{ virtual_node = \"serviceB\", weight = 101 }]"),
                "routes[1].action.weighted_targets[0].weight",
                "101 is not between 0 and 100",
                "101",
            ),
            (
                route("action.weighted_targets = [{ virtual_node = \"serviceB\", weight = 1 },\n{ virtual_node = \"serviceB\", weight = 2 }]"),
                "routes[1].action.weighted_targets[1].virtual_node",
                "virtual node \"serviceB\" is listed twice",
                "weight = 2",
            ),
            (
                route("action.weighted_targets = [{ virtual_node = \"serviceB\", weight = 1, port = 9 }]"),
                "routes[1].action.weighted_targets[0].port",
                "virtual node \"serviceB\" has no listener on port 9 (its listeners: 8080/http)",
                "port = 9",
            ),
            (
                route(&format!("retry_policy.max_retries = 1\nretry_policy.per_retry_timeout = \"1s\"\n{target}")),
                "routes[1].retry_policy",
                "no retry event",
                "per_retry_timeout",
            ),
            (
                route(&format!("retry_policy.max_retries = 1\nretry_policy.per_retry_timeout = \"0s\"\nretry_policy.http_retry_events = [\"server-error\"]\n{target}")),
                "routes[1].retry_policy.per_retry_timeout",
                "must be more than 0s",
                "\"0s\"",
            ),
            (
                route(&format!("retry_policy.max_retries = 1\nretry_policy.per_retry_timeout = \"1s\"\nretry_policy.grpc_retry_events = [\"unavailable\"]\n{target}")),
                "routes[1].retry_policy.grpc_retry_events",
                "only grpc routes",
                "per_retry_timeout",
            ),
            (
                "[routing.retry_budget]\nratio = 1.5".into(),
                "routing.retry_budget.ratio",
                "1.5 is not between 0 and 1",
                "1.5",
            ),
            (
                "[routing.retry_budget]\nwindow = \"500ms\"".into(),
                "routing.retry_budget.window",
                "500ms is not between 1s and 5m",
                "500ms",
            ),
            (
                "[routing.override_header]\nname = \"Host\"".into(),
                "routing.override_header.name",
                "\"host\" is a header the proxy itself reads or sets",
                "\"Host\"",
            ),
            (
                "[routing.override_header]\nname = \"no spaces\"".into(),
                "routing.override_header.name",
                "is not an HTTP header name",
                "no spaces",
            ),
            (
                "[routing.override_header]\nallow_from = [\"*\"]".into(),
                "routing.override_header.allow_from[0]",
                "needs an [identity] section",
                "[\"*\"]",
            ),
        ];
        for (extra, field, message, on_line) in cases {
            let text = format!("{BASE}\n{extra}\n");
            let err = errors(&text);
            let p = &err.problems[0];
            assert_eq!(
                (p.field.as_str(), p.file.as_str()),
                (field, "mesh.toml"),
                "{extra}\n gave {err}"
            );
            assert!(p.message.contains(message), "{extra}\n gave {err}");
            let at = text.rfind(on_line).expect("on_line in text");
            let line = text[..at].matches('\n').count() + 1;
            assert_eq!(p.line, line, "{extra}\n gave {err}");
        }
    }

    #[test]
    fn kinds_and_listeners_must_agree() {
        let text = r#"
[ecs]
[[virtual_nodes]]
name = "web"
task = "web"
listeners = [{ port = 80, protocol = "tcp" }]
[[virtual_nodes]]
name = "rpc"
task = "rpc"
listeners = [{ port = 80, protocol = "http" }, { port = 81, protocol = "grpc" }]
[[virtual_routers]]
name = "mixed"
listeners = [{ port = 80, protocol = "http" }, { port = 81, protocol = "tcp" }]
[[routes]]
name = "no-kind"
virtual_router = "mixed"
action.weighted_targets = [{ virtual_node = "web", weight = 1 }]
[[routes]]
name = "http-to-tcp"
virtual_router = "mixed"
kind = "http"
action.weighted_targets = [{ virtual_node = "web", weight = 1 }]
[[routes]]
name = "needs-port"
virtual_router = "mixed"
kind = "http"
action.weighted_targets = [{ virtual_node = "rpc", weight = 1 }]
[[routes]]
name = "tcp-with-match"
virtual_router = "mixed"
kind = "tcp"
match.prefix = "/"
retry_policy = { max_retries = 1, per_retry_timeout = "1s", tcp_retry_events = ["connection-error"] }
timeout.per_request = "1s"
action.weighted_targets = [{ virtual_node = "rpc", weight = 1, port = 80 }]
"#;
        let err = errors(text);
        let got: Vec<(&str, &str)> = err
            .problems
            .iter()
            .map(|p| (p.field.as_str(), p.message.as_str()))
            .collect();
        let expect = [
            (
                "routes[0].kind",
                "required: virtual router \"mixed\" has listeners of several protocols (http, tcp)",
            ),
            (
                "routes[1].action.weighted_targets[0].virtual_node",
                "a http route cannot send traffic to virtual node \"web\"'s tcp listener on port 80",
            ),
            (
                "routes[2].action.weighted_targets[0].port",
                "required: virtual node \"rpc\" has several listeners (80/http, 81/grpc)",
            ),
            ("routes[3].match", "tcp routes have no match conditions"),
            (
                "routes[3].retry_policy",
                "tcp routes have no retry policy (a TCP connection cannot be replayed)",
            ),
            (
                "routes[3].timeout.per_request",
                "tcp routes have no requests; only `idle` applies",
            ),
        ];
        assert_eq!(got, expect, "{err}");
        // All of them, in file order, one per line.
        assert_eq!(err.to_string().lines().count(), expect.len());
        assert!(err.to_string().starts_with(&format!(
            "mesh.toml:{}: routes[0].kind: required",
            line_of(text, "\"no-kind\"")
        )));
    }

    #[test]
    fn grpc_routes_match_services_and_methods_only() {
        let text = r#"
[ecs]
[[virtual_nodes]]
name = "rpc"
task = "rpc"
listeners = [{ port = 50051, protocol = "grpc" }]
[[virtual_routers]]
name = "rpc"
listeners = [{ port = 50051, protocol = "grpc" }]
[[routes]]
name = "get"
virtual_router = "rpc"
match.method_name = "Get"
match.prefix = "/"
action.weighted_targets = [{ virtual_node = "rpc", weight = 1 }]
"#;
        let err = errors(text);
        let fields: Vec<&str> = err.problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            ["routes[0].match.method_name", "routes[0].match.prefix"]
        );
        assert!(err.problems[0].message.contains("set service_name too"));
        assert!(
            err.problems[1]
                .message
                .contains("not a condition of grpc routes")
        );
    }

    /// Mistakes serde finds while parsing are located in the document: file, line, field.
    #[test]
    fn type_errors_name_the_field() {
        for (text, field, message, on_line) in [
            (
                "[[routes]]\nname = \"r\"\nvirtual_router = \"x\"\naction.weighted_targets = [\n  { virtual_node = \"a\", weight = \"heavy\" },\n]\n",
                "routes[0].action.weighted_targets[0].weight",
                "invalid type: string \"heavy\", expected u32",
                "heavy",
            ),
            (
                "[[routes]]\nname = \"r\"\nvirtual_router = \"x\"\nbogus = 1\naction.weighted_targets = []\n",
                "routes[0].bogus",
                "unknown field `bogus`",
                "bogus",
            ),
            (
                "[[routes]]\nname = \"r\"\nvirtual_router = \"x\"\n[routes.match]\nprefix = \"/\"\nmethod = \"FETCH\"\n[routes.action]\nweighted_targets = []\n",
                "routes[0].match.method",
                "unknown variant `FETCH`",
                "FETCH",
            ),
            (
                "[[virtual_nodes]]\nname = \"n\"\ntask = \"t\"\nlisteners = [{ port = 1, protocol = \"udp\" }]\n",
                "virtual_nodes[0].listeners[0].protocol",
                "unknown variant `udp`, expected one of `http`, `http2`, `grpc`, `tcp`",
                "udp",
            ),
            (
                "[[routes]]\nname = \"r\"\nvirtual_router = \"x\"\naction.weighted_targets = []\nretry_policy.max_retries = 1\nretry_policy.per_retry_timeout = \"1s\"\nretry_policy.http_retry_events = [\"server-error\", \"5xx\"]\n",
                "routes[0].retry_policy.http_retry_events[1]",
                "unknown variant `5xx`",
                "5xx",
            ),
            (
                "[[routes]]\nname = \"r\"\nvirtual_router = \"x\"\naction.weighted_targets = []\ntimeout.idle = \"forever\"\n",
                "routes[0].timeout.idle",
                "invalid duration `forever`",
                "forever",
            ),
            (
                "[[virtual_services]]\nname = \"a.local\"\n",
                "virtual_services[0]",
                "missing field `provider`",
                "[[virtual_services]]",
            ),
            (
                "[[routes]]\nname = \"r\"\nvirtual_router = \"x\"\naction.weighted_targets = [{ virtual_node = \"a\", weight = -1 }]\n",
                "routes[0].action.weighted_targets[0].weight",
                "expected u32",
                "-1",
            ),
        ] {
            let text = format!("[agent]\nmetrics_addr = \"127.0.0.1:15020\"\n\n{text}");
            let err = errors(&text);
            let p = &err.problems[0];
            assert_eq!(p.field, field, "{text}\n gave {err}");
            assert!(p.message.contains(message), "{text}\n gave {err}");
            assert_eq!(p.line, line_of(&text, on_line), "{text}\n gave {err}");
        }
    }

    #[test]
    fn every_toml_spelling_is_accepted() {
        let head = "[ecs]\n[[virtual_nodes]]\nname = \"n\"\ntask = \"t\"\n\
                    listeners = [{ port = 80, protocol = \"http\" }]\n\
                    [[virtual_routers]]\nname = \"r\"\n\
                    listeners = [{ port = 80, protocol = \"http\" }]\n\
                    [[routes]]\nname = \"x\"\nvirtual_router = \"r\"\n";
        for body in [
            "match = { prefix = \"/a\", headers = [{ name = \"h\", match = { exact = \"1\" } }] }\n\
             action = { weighted_targets = [{ virtual_node = \"n\", weight = 1 }] }\n",
            "match.prefix = \"/a\"\nmatch.headers = [{ name = \"h\", match.exact = \"1\" }]\n\
             action.weighted_targets = [{ virtual_node = \"n\", weight = 1 }]\n",
            "[routes.match]\nprefix = \"/a\"\n[[routes.match.headers]]\nname = \"h\"\n\
             [routes.match.headers.match]\nexact = \"1\"\n\
             [[routes.action.weighted_targets]]\nvirtual_node = \"n\"\nweight = 1\n",
        ] {
            let text = format!("{head}{body}");
            let (spec, _) = parse(&text, "m.toml").unwrap_or_else(|e| panic!("{body}: {e}"));
            let m = spec.routes[0].matcher.as_ref().unwrap();
            assert_eq!(m.prefix.as_ref().unwrap().get_ref(), "/a");
            let exact = m.headers[0]
                .matcher
                .as_ref()
                .unwrap()
                .exact
                .as_ref()
                .unwrap();
            assert_eq!(line_of(&text, "\"1\""), {
                let at = exact.span().start;
                text[..at].matches('\n').count() + 1
            });
            parse_and_validate(&text, "m.toml").unwrap_or_else(|e| panic!("{body}: {e}"));
        }
        // A typo in a dotted-key table is located too.
        let err = errors(&format!("{head}match.prefx = \"/\"\n"));
        assert_eq!(err.problems[0].field, "routes[0].match.prefx", "{err}");
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let err = errors("[agent]\nx = 1\n\n[[routes]\nname = \"r\"\n");
        assert_eq!(err.problems.len(), 1);
        let p = &err.problems[0];
        assert_eq!((p.line, p.field.as_str()), (4, ""));
        assert!(err.to_string().starts_with("mesh.toml:4: "), "{err}");
        assert!(!p.message.contains('\n'));
    }

    #[test]
    fn task_references_are_checked_only_without_ecs_discovery() {
        let node = "[[virtual_nodes]]\nname = \"n\"\ntask = \"orders-8f03e412\"\n";
        let err = errors(&format!(
            "[[tasks]]\nid = \"a\"\ncgroup = \"x\"\npid = 1\n{node}"
        ));
        assert!(err.problems[0].message.contains("(known: a)"), "{err}");
        let table =
            parse_and_validate(&format!("[ecs]\ndefault = \"mesh\"\n{node}"), "m.toml").unwrap();
        assert_eq!(
            table.virtual_node("n").unwrap().discovery(),
            &Discovery::Task("orders-8f03e412".into())
        );
    }

    #[test]
    fn an_invalid_trust_domain_is_reported_where_it_is() {
        let err = errors("[identity]\ntrust_domain = \"spiffe://x\"\n");
        assert_eq!(err.problems[0].field, "identity.trust_domain");
        assert_eq!(err.problems[0].line, 2);
    }

    #[test]
    fn no_routing_sections_is_an_empty_table() {
        let table = parse_and_validate("[agent]\ndrain_timeout = \"1s\"\n", "m.toml").unwrap();
        assert!(table.is_empty());
        assert_eq!(table.retry_budget(), RetryBudgetSettings::default());
        // Spans from the agent's own `Config` parse can be validated the same way.
        let (spec, known) = parse(SEED, "m.toml").unwrap();
        assert!(validate(&spec, &known, SEED, "m.toml").is_ok());
    }

    #[test]
    fn lines_are_counted_from_one() {
        let lines = Lines::new("a\nbb\n\nc");
        assert_eq!(
            [0, 1, 2, 4, 5, 6].map(|o| lines.line(o)),
            [1, 1, 2, 2, 3, 4]
        );
    }
}
