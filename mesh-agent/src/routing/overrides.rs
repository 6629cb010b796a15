//! The per-request routing override header (Linkerd's `l5d-dtab`, made strict):
//!
//! ```text
//! mesh-route: serviceb.apps.local=serviceBv2, orders.apps.local=ordersCanary
//! ```
//!
//! A comma-separated list of `<virtual service>=<virtual node>` entries (spaces and tabs
//! around names, `=` and `,` are allowed). The value is parsed strictly: one malformed entry,
//! an empty entry or a virtual service named twice and the whole header is ignored. Several
//! header lines are one list, as HTTP says. Only requests from the source identities of
//! `routing.override_header.allow_from` are considered; the entry for the virtual service
//! being routed must name a virtual node that is a target of that virtual service.
//! [`super::table::RoutingTable::route_http`] reports whether it applied the header and,
//! if not, why.

use std::sync::LazyLock;

use http::{HeaderMap, HeaderName};
use regex::Regex;

use crate::config::{DefaultPolicy, PolicySpec};
use crate::identity::{SpiffeId, TrustDomain};
use crate::policy::{Authorizer, Decision};

/// The header's default name.
pub const DEFAULT_HEADER: &str = "mesh-route";

/// Longest header value considered (all lines together); longer values are malformed.
pub const MAX_VALUE_LEN: usize = 2048;

/// The task name under which the allow list is kept in the policy module's [`Authorizer`]
/// (whose principal matching it reuses); no real task id contains a space.
const ALLOW_LIST_TASK: &str = "mesh route override";

/// One `<virtual service>=<virtual node>` entry: a DNS name, then a virtual node name.
static ENTRY: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^[ \t]*([A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?\.?)[ \t]*=[ \t]*([A-Za-z0-9][A-Za-z0-9._-]*)[ \t]*$")
        .expect("static regex")
});

/// The compiled `[routing.override_header]`.
#[derive(Debug, Clone)]
pub struct OverrideHeader {
    name: HeaderName,
    /// `None`: nobody may use the header.
    allow: Option<Authorizer>,
}

impl Default for OverrideHeader {
    fn default() -> Self {
        OverrideHeader {
            name: HeaderName::from_static(DEFAULT_HEADER),
            allow: None,
        }
    }
}

impl OverrideHeader {
    /// `allow_from` in the syntax of `[[policies]] allow`. Errors name the entry's index
    /// (`allow_from[i]`) and say what is wrong with it.
    pub fn new(
        name: HeaderName,
        allow_from: &[String],
        trust_domain: Option<&TrustDomain>,
    ) -> Result<OverrideHeader, (usize, String)> {
        if allow_from.is_empty() {
            return Ok(OverrideHeader { name, allow: None });
        }
        let Some(td) = trust_domain else {
            return Err((
                0,
                "the override header is allowed by source identity, which needs an [identity] \
                 section"
                    .to_owned(),
            ));
        };
        // One entry at a time first, so an error names the entry (the policy module's
        // errors name `policies[0].allow[0]`, which would mislead here).
        for (i, entry) in allow_from.iter().enumerate() {
            Self::authorizer(std::slice::from_ref(entry), td).map_err(|e| {
                let msg = e
                    .chain()
                    .skip(1)
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join(": ");
                (i, if msg.is_empty() { e.to_string() } else { msg })
            })?;
        }
        let allow = Self::authorizer(allow_from, td).map_err(|e| (0, format!("{e:#}")))?;
        Ok(OverrideHeader {
            name,
            allow: Some(allow),
        })
    }

    fn authorizer(allow_from: &[String], td: &TrustDomain) -> anyhow::Result<Authorizer> {
        Authorizer::new(
            &[PolicySpec {
                task: ALLOW_LIST_TASK.to_owned(),
                family: None,
                ports: Vec::new(),
                allow: allow_from.to_vec(),
            }],
            DefaultPolicy::Deny,
            Some(td),
        )
    }

    pub fn name(&self) -> &HeaderName {
        &self.name
    }

    /// Whether requests from `source` may override routing. A source without an identity
    /// never may.
    pub fn allows(&self, source: Option<&SpiffeId>) -> bool {
        match (&self.allow, source) {
            (Some(authz), Some(id)) => {
                authz.check_in(id, ALLOW_LIST_TASK, None, 0) == Decision::Allow
            }
            _ => false,
        }
    }

    /// The header's value in `headers`, all lines joined with `,`; `None` when absent.
    /// `Err` when it is not visible ASCII or too long.
    pub fn value(&self, headers: &HeaderMap) -> Option<Result<String, String>> {
        let mut values = headers.get_all(&self.name).iter().peekable();
        values.peek()?;
        let mut joined = String::new();
        for (i, v) in values.enumerate() {
            let Ok(s) = v.to_str() else {
                return Some(Err("the value is not visible ASCII".to_owned()));
            };
            if i > 0 {
                joined.push(',');
            }
            joined.push_str(s);
            if joined.len() > MAX_VALUE_LEN {
                return Some(Err(format!(
                    "the value is longer than {MAX_VALUE_LEN} bytes"
                )));
            }
        }
        Some(Ok(joined))
    }
}

/// Parses a header value into `(virtual service, virtual node)` pairs; virtual service
/// names are lowercased and lose a trailing dot. Strict: any flaw rejects the whole value.
pub fn parse(value: &str) -> Result<Vec<(String, String)>, String> {
    let mut out: Vec<(String, String)> = Vec::new();
    for (i, entry) in value.split(',').enumerate() {
        let Some(c) = ENTRY.captures(entry) else {
            return Err(if entry.trim().is_empty() {
                format!("entry {} is empty", i + 1)
            } else {
                format!(
                    "entry {} `{}` is not `<virtual service>=<virtual node>`",
                    i + 1,
                    entry.trim()
                )
            });
        };
        let service = c[1].trim_end_matches('.').to_ascii_lowercase();
        if out.iter().any(|(s, _)| *s == service) {
            return Err(format!("virtual service `{service}` is named twice"));
        }
        out.push((service, c[2].to_owned()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lists_strictly() {
        assert_eq!(
            parse("serviceb.apps.local=serviceBv2").unwrap(),
            vec![("serviceb.apps.local".into(), "serviceBv2".into())]
        );
        assert_eq!(
            parse(" ServiceB.apps.local. = serviceBv2 ,\torders=o_1.x-y ").unwrap(),
            vec![
                ("serviceb.apps.local".into(), "serviceBv2".into()),
                ("orders".into(), "o_1.x-y".into())
            ]
        );
        for (bad, needle) in [
            ("", "entry 1 is empty"),
            ("a=b,", "entry 2 is empty"),
            ("a=b,,c=d", "entry 2 is empty"),
            ("a", "entry 1 `a` is not"),
            ("a=", "is not"),
            ("=b", "is not"),
            ("a=b=c", "is not"),
            ("a b=c", "is not"),
            ("a=b c", "is not"),
            ("a=b;c=d", "is not"),
            ("a=*", "is not"),
            ("-a=b", "is not"),
            ("a=b, A=c", "named twice"),
        ] {
            let err = parse(bad).unwrap_err();
            assert!(err.contains(needle), "`{bad}` gave `{err}`");
        }
    }

    fn td() -> TrustDomain {
        "mesh.test".parse().unwrap()
    }

    const QA: &str = "spiffe://mesh.test/aws/111122223333/role/qa";

    #[test]
    fn allow_list_reuses_policy_principals() {
        let h = OverrideHeader::new(
            HeaderName::from_static("mesh-route"),
            &[
                QA.to_owned(),
                "spiffe://mesh.test/aws/444455556666/*".to_owned(),
                "arn:aws:iam::777788889999:role/tester".to_owned(),
            ],
            Some(&td()),
        )
        .unwrap();
        let id = |s: &str| s.parse::<SpiffeId>().unwrap();
        assert!(h.allows(Some(&id(QA))));
        assert!(h.allows(Some(&id("spiffe://mesh.test/aws/444455556666/role/x"))));
        assert!(h.allows(Some(&id("spiffe://mesh.test/aws/777788889999/role/tester"))));
        assert!(!h.allows(Some(&id("spiffe://mesh.test/aws/111122223333/role/a"))));
        assert!(!h.allows(Some(&id("spiffe://other.test/aws/111122223333/role/qa"))));
        assert!(!h.allows(None));
        // Nobody by default.
        assert!(!OverrideHeader::default().allows(Some(&id(QA))));
    }

    #[test]
    fn allow_list_errors_name_the_entry() {
        let name = HeaderName::from_static("mesh-route");
        let (i, msg) = OverrideHeader::new(
            name.clone(),
            &[QA.to_owned(), "spiffe://other.test/x".to_owned()],
            Some(&td()),
        )
        .unwrap_err();
        assert_eq!(i, 1);
        assert!(msg.contains("outside the trust domain"), "{msg}");
        assert!(!msg.contains("policies"), "{msg}");
        let (i, msg) = OverrideHeader::new(name, &[QA.to_owned()], None).unwrap_err();
        assert_eq!(i, 0);
        assert!(msg.contains("[identity]"), "{msg}");
    }

    #[test]
    fn header_lines_are_joined() {
        let h = OverrideHeader::default();
        let mut headers = HeaderMap::new();
        assert!(h.value(&headers).is_none());
        headers.append("mesh-route", "a=b".parse().unwrap());
        headers.append("mesh-route", "c=d".parse().unwrap());
        assert_eq!(h.value(&headers).unwrap().unwrap(), "a=b,c=d");
        headers.insert(
            "mesh-route",
            http::HeaderValue::from_bytes(b"a=\xff").unwrap(),
        );
        assert!(h.value(&headers).unwrap().is_err());
        headers.insert("mesh-route", "a=b,".repeat(MAX_VALUE_LEN).parse().unwrap());
        assert!(h.value(&headers).unwrap().is_err());
    }
}
