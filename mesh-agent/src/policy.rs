//! Inbound authorization: which source identities may connect to a local task and port.
//!
//! Semantics follow Istio's ALLOW policies: if any `[[policies]]` entry covers the destination
//! (task, and port when the entry lists ports), the source must match one of those entries'
//! allow lists; a destination no entry covers gets the mesh-wide default. Authorization runs
//! where the destination is (the destination's agent), after mutual TLS has proven the source.

use std::str::FromStr;

use anyhow::{Context, bail};

use crate::config::{DefaultPolicy, PolicySpec};
use crate::identity::{RoleArn, SpiffeId, TrustDomain};

/// One allowed source.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Principal {
    /// Exactly this identity.
    Exact(SpiffeId),
    /// Any identity whose id starts with this (always ends with `/`), e.g.
    /// `spiffe://td/aws/111122223333/role/`.
    Prefix(String),
    /// Any identity of the trust domain.
    Any,
}

impl Principal {
    fn parse(s: &str, trust_domain: &TrustDomain) -> anyhow::Result<Principal> {
        if s == "*" {
            return Ok(Principal::Any);
        }
        if s.starts_with("arn:") {
            let arn = RoleArn::from_str(s)?;
            return Ok(Principal::Exact(arn.to_spiffe_id(trust_domain)));
        }
        if let Some(prefix) = s.strip_suffix("/*") {
            // Validate the fixed part as an id of its own (`spiffe://td` alone is allowed).
            let td_only = prefix
                .strip_prefix("spiffe://")
                .is_some_and(|r| !r.contains('/'));
            if !td_only {
                SpiffeId::from_str(prefix)
                    .with_context(|| format!("`{s}`: the part before `/*` must be a SPIFFE id"))?;
            }
            let id_td = prefix
                .strip_prefix("spiffe://")
                .and_then(|r| r.split('/').next())
                .unwrap_or_default();
            if id_td != trust_domain.as_str() {
                bail!("`{s}` is outside the trust domain `{trust_domain}`; it could never match");
            }
            return Ok(Principal::Prefix(format!("{prefix}/")));
        }
        if s.contains('*') {
            bail!("`{s}`: `*` is only allowed alone or as a final `/*` segment");
        }
        let id = SpiffeId::from_str(s).with_context(|| {
            format!("`{s}` is neither a SPIFFE id, a `spiffe://.../*` prefix, `*`, nor a role ARN")
        })?;
        if id.trust_domain() != trust_domain {
            bail!("`{s}` is outside the trust domain `{trust_domain}`; it could never match");
        }
        Ok(Principal::Exact(id))
    }

    fn matches(&self, source: &SpiffeId) -> bool {
        match self {
            Principal::Exact(id) => id == source,
            Principal::Prefix(p) => source.to_string().starts_with(p.as_str()),
            Principal::Any => true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Selector {
    Task(String),
    Family(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    selector: Selector,
    ports: Vec<u16>,
    allow: Vec<Principal>,
}

impl Rule {
    fn covers(&self, task: &str, family: Option<&str>, port: u16) -> bool {
        let selected = match &self.selector {
            Selector::Task(t) => t == task,
            Selector::Family(f) => family == Some(f.as_str()),
        };
        selected && (self.ports.is_empty() || self.ports.contains(&port))
    }
}

/// The decision for one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Refused; says whether a policy or the default refused it (for the log line).
    Deny {
        by_default: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorizer {
    rules: Vec<Rule>,
    default: DefaultPolicy,
    trust_domain: Option<TrustDomain>,
}

impl Authorizer {
    /// Compiles the `[[policies]]` of the configuration. Errors name the entry.
    pub fn new(
        specs: &[PolicySpec],
        default: DefaultPolicy,
        trust_domain: Option<&TrustDomain>,
    ) -> anyhow::Result<Authorizer> {
        let mut rules = Vec::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            let Some(td) = trust_domain else {
                bail!("policies[{i}]: authorization policies need an [identity] section");
            };
            let selector = match (spec.task.is_empty(), &spec.family) {
                (false, None) => Selector::Task(spec.task.clone()),
                (true, Some(f)) if !f.is_empty() => Selector::Family(f.clone()),
                _ => bail!("policies[{i}] needs exactly one of `task` or `family`"),
            };
            if spec.ports.contains(&0) {
                bail!("policies[{i}].ports must not contain 0");
            }
            let allow = spec
                .allow
                .iter()
                .enumerate()
                .map(|(j, s)| {
                    Principal::parse(s, td).with_context(|| format!("policies[{i}].allow[{j}]"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            rules.push(Rule {
                selector,
                ports: spec.ports.clone(),
                allow,
            });
        }
        Ok(Authorizer {
            rules,
            default,
            trust_domain: trust_domain.cloned(),
        })
    }

    /// May `source` connect to port `port` of local task `task`?
    #[cfg(test)]
    pub fn check(&self, source: &SpiffeId, task: &str, port: u16) -> Decision {
        self.check_in(source, task, None, port)
    }

    /// May `source` connect to port `port` of local task `task` (of `family`, if known)?
    pub fn check_in(
        &self,
        source: &SpiffeId,
        task: &str,
        family: Option<&str>,
        port: u16,
    ) -> Decision {
        // mTLS verification already refuses other trust domains; this is a second guard.
        if self
            .trust_domain
            .as_ref()
            .is_some_and(|td| source.trust_domain() != td)
        {
            return Decision::Deny { by_default: false };
        }
        let mut covered = false;
        for rule in self.rules.iter().filter(|r| r.covers(task, family, port)) {
            covered = true;
            if rule.allow.iter().any(|p| p.matches(source)) {
                return Decision::Allow;
            }
        }
        match (covered, self.default) {
            (true, _) => Decision::Deny { by_default: false },
            (false, DefaultPolicy::Allow) => Decision::Allow,
            (false, DefaultPolicy::Deny) => Decision::Deny { by_default: true },
        }
    }
}

/// For log lines: the IAM role an identity stands for (what operators search for), or `-` for
/// an identity that is not a role's.
pub fn role_of(id: &SpiffeId) -> String {
    RoleArn::from_spiffe_id(id).map_or_else(|_| "-".to_owned(), |r| r.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        "mesh.test".parse().unwrap()
    }

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    fn spec(task: &str, ports: &[u16], allow: &[&str]) -> PolicySpec {
        PolicySpec {
            task: task.into(),
            family: None,
            ports: ports.to_vec(),
            allow: allow.iter().map(|s| s.to_string()).collect(),
        }
    }

    const A: &str = "spiffe://mesh.test/aws/111122223333/role/a";
    const C: &str = "spiffe://mesh.test/aws/444455556666/role/c";

    #[test]
    fn exact_prefix_arn_and_any() {
        let authz = Authorizer::new(
            &[
                spec("b", &[8080], &[A]),
                spec("d", &[], &["spiffe://mesh.test/aws/444455556666/*"]),
                spec("e", &[], &["arn:aws:iam::111122223333:role/a"]),
                spec("f", &[], &["*"]),
            ],
            DefaultPolicy::Deny,
            Some(&td()),
        )
        .unwrap();
        assert_eq!(authz.check(&id(A), "b", 8080), Decision::Allow);
        assert_eq!(
            authz.check(&id(C), "b", 8080),
            Decision::Deny { by_default: false }
        );
        // Port 9090 of b is not covered by the entry: the default (deny) applies.
        assert_eq!(
            authz.check(&id(A), "b", 9090),
            Decision::Deny { by_default: true }
        );
        assert_eq!(authz.check(&id(C), "d", 1), Decision::Allow);
        assert_eq!(
            authz.check(&id(A), "d", 1),
            Decision::Deny { by_default: false }
        );
        assert_eq!(authz.check(&id(A), "e", 1), Decision::Allow);
        assert_eq!(
            authz.check(&id(C), "e", 1),
            Decision::Deny { by_default: false }
        );
        assert_eq!(authz.check(&id(C), "f", 1), Decision::Allow);
        assert_eq!(
            authz.check(&id(A), "nobody", 1),
            Decision::Deny { by_default: true }
        );
        // Another trust domain never passes, whatever the policy says.
        let foreign = id("spiffe://other.test/aws/111122223333/role/a");
        assert_eq!(
            authz.check(&foreign, "f", 1),
            Decision::Deny { by_default: false }
        );
    }

    #[test]
    fn family_rules_cover_every_task_of_the_family() {
        let by_family = PolicySpec {
            task: String::new(),
            family: Some("orders".into()),
            ports: vec![],
            allow: vec![A.into()],
        };
        let authz = Authorizer::new(&[by_family], DefaultPolicy::Allow, Some(&td())).unwrap();
        let c = id(C);
        assert_eq!(
            authz.check_in(&id(A), "orders-8f03e412", Some("orders"), 80),
            Decision::Allow
        );
        assert_eq!(
            authz.check_in(&c, "orders-1234abcd", Some("orders"), 80),
            Decision::Deny { by_default: false }
        );
        // Another family is not covered: the default applies.
        assert_eq!(
            authz.check_in(&c, "billing-1", Some("billing"), 80),
            Decision::Allow
        );
        let both = PolicySpec {
            task: "x".into(),
            family: Some("orders".into()),
            ports: vec![],
            allow: vec![],
        };
        let err = Authorizer::new(&[both], DefaultPolicy::Allow, Some(&td())).unwrap_err();
        assert!(err.to_string().contains("exactly one of"), "{err}");
    }

    #[test]
    fn log_lines_name_the_role() {
        assert_eq!(role_of(&id(A)), "arn:aws:iam::111122223333:role/a");
        assert_eq!(role_of(&id("spiffe://mesh.test/custom/x")), "-");
    }

    #[test]
    fn default_allow_only_for_uncovered_destinations() {
        let authz =
            Authorizer::new(&[spec("b", &[], &[A])], DefaultPolicy::Allow, Some(&td())).unwrap();
        assert_eq!(
            authz.check(&id(C), "b", 80),
            Decision::Deny { by_default: false }
        );
        assert_eq!(authz.check(&id(C), "x", 80), Decision::Allow);
    }

    #[test]
    fn a_prefix_matches_whole_segments_only() {
        let authz = Authorizer::new(
            &[spec("b", &[], &["spiffe://mesh.test/aws/1111/*"])],
            DefaultPolicy::Deny,
            Some(&td()),
        )
        .unwrap();
        assert_eq!(
            authz.check(&id("spiffe://mesh.test/aws/11112/role/x"), "b", 1),
            Decision::Deny { by_default: false }
        );
        assert_eq!(
            authz.check(&id("spiffe://mesh.test/aws/1111/role/x"), "b", 1),
            Decision::Allow
        );
    }

    #[test]
    fn bad_entries_are_reported_with_their_place() {
        for (allow, needle) in [
            ("spiffe://other.test/x", "outside the trust domain"),
            ("spiffe://other.test/*", "outside the trust domain"),
            ("spiffe://mesh.test/a*", "only allowed alone"),
            ("arn:aws:iam::12:role/x", "policies[0].allow[0]"),
            ("orders", "neither a SPIFFE id"),
        ] {
            let err = Authorizer::new(
                &[spec("b", &[], &[allow])],
                DefaultPolicy::Allow,
                Some(&td()),
            )
            .unwrap_err();
            let msg = format!("{err:#}");
            assert!(msg.contains(needle), "`{allow}` gave `{msg}`");
        }
        let err = Authorizer::new(&[spec("b", &[], &[A])], DefaultPolicy::Allow, None).unwrap_err();
        assert!(err.to_string().contains("[identity]"));
    }
}
