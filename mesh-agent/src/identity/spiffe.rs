//! SPIFFE ids and trust domains, parsed strictly per the SPIFFE ID specification
//! (<https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE-ID.md>).
//!
//! Strictness is the point: authorization compares ids as strings, so two spellings of one
//! identity (upper-case trust domain, `%2F`, `/./`, a trailing slash) must not both be accepted.
//! Every accepted string is already in its only canonical form, which is also what `Display`
//! prints.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;
use x509_parser::extensions::GeneralName;

/// Longest SPIFFE id the specification requires implementations to accept (bytes).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;

/// Longest trust domain name accepted. The specification bounds ids, not trust domains; a DNS
/// name is at most 255 bytes, and this bound is also what guarantees that every IAM role ARN maps
/// to an id within [`MAX_SPIFFE_ID_LEN`] (see `arn.rs`).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

const SCHEME_PREFIX: &str = "spiffe://";

/// Why a string is not a SPIFFE id or trust domain. Each message quotes the offending part.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SpiffeIdError {
    #[error("SPIFFE id is empty")]
    Empty,
    #[error("SPIFFE id is {0} bytes long; at most {MAX_SPIFFE_ID_LEN} are allowed")]
    TooLong(usize),
    #[error("`{0}` does not start with `spiffe://` (the scheme must be lowercase `spiffe`)")]
    WrongScheme(String),
    #[error("trust domain is missing in `{0}`")]
    MissingTrustDomain(String),
    #[error("trust domain is {0} bytes long; at most {MAX_TRUST_DOMAIN_LEN} are allowed")]
    TrustDomainTooLong(usize),
    #[error("trust domain `{0}` must not contain a port")]
    Port(String),
    #[error("trust domain `{0}` must not contain user info (`@`)")]
    UserInfo(String),
    #[error("trust domain `{0}` must be lowercase")]
    UppercaseTrustDomain(String),
    #[error(
        "trust domain `{domain}` contains {ch:?}; only lowercase letters, digits, `.`, `-` and `_` are allowed"
    )]
    TrustDomainChar { domain: String, ch: char },
    #[error("`{0}` must not contain a query (`?`)")]
    Query(String),
    #[error("`{0}` must not contain a fragment (`#`)")]
    Fragment(String),
    #[error("`{0}` must not contain percent-encoding (`%`)")]
    PercentEncoded(String),
    #[error("path of `{0}` has an empty segment (`//`)")]
    EmptySegment(String),
    #[error("path of `{0}` ends with `/`")]
    TrailingSlash(String),
    #[error("path of `{0}` has a `.` or `..` segment")]
    DotSegment(String),
    #[error(
        "path segment `{segment}` contains {ch:?}; only letters, digits, `.`, `-` and `_` are allowed"
    )]
    PathChar { segment: String, ch: char },
    #[error("`{0}` is a SPIFFE id; write the trust domain alone, without `spiffe://`")]
    SchemeInTrustDomain(String),
    #[error("path `{0}` must be empty or start with `/`")]
    RelativePath(String),
}

/// A SPIFFE trust domain name, e.g. `prod.example.com` (without `spiffe://`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id of the trust domain itself (`spiffe://<td>`, no path). CA certificates carry it.
    pub fn id(&self) -> SpiffeId {
        SpiffeId {
            trust_domain: self.clone(),
            path: String::new(),
        }
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Lets callers compare with a configured name without parsing it first.
impl PartialEq<str> for TrustDomain {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, SpiffeIdError> {
        if s.starts_with(SCHEME_PREFIX) {
            // Accepting both spellings would make config files ambiguous; say which one is wanted.
            return Err(SpiffeIdError::SchemeInTrustDomain(s.to_string()));
        }
        validate_trust_domain(s, s)?;
        Ok(TrustDomain(s.to_string()))
    }
}

impl<'de> serde::Deserialize<'de> for TrustDomain {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `whole` is the full input, quoted in errors about query/fragment so the operator sees context.
fn validate_trust_domain(td: &str, whole: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::MissingTrustDomain(whole.to_string()));
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong(td.len()));
    }
    for ch in td.chars() {
        match ch {
            'a'..='z' | '0'..='9' | '.' | '-' | '_' => {}
            ':' => return Err(SpiffeIdError::Port(td.to_string())),
            '@' => return Err(SpiffeIdError::UserInfo(td.to_string())),
            '?' => return Err(SpiffeIdError::Query(whole.to_string())),
            '#' => return Err(SpiffeIdError::Fragment(whole.to_string())),
            '%' => return Err(SpiffeIdError::PercentEncoded(whole.to_string())),
            'A'..='Z' => return Err(SpiffeIdError::UppercaseTrustDomain(td.to_string())),
            _ => {
                return Err(SpiffeIdError::TrustDomainChar {
                    domain: td.to_string(),
                    ch,
                });
            }
        }
    }
    Ok(())
}

/// `path` is either empty or `/seg(/seg)*`.
fn validate_path(path: &str, whole: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(SpiffeIdError::RelativePath(path.to_string()));
    };
    let segments: Vec<&str> = rest.split('/').collect();
    let last = segments.len() - 1;
    for (i, segment) in segments.iter().enumerate() {
        validate_segment(segment, whole, i == last)?;
    }
    Ok(())
}

/// Checks one path segment; `is_last` distinguishes a trailing slash from `//` in messages.
fn validate_segment(segment: &str, whole: &str, is_last: bool) -> Result<(), SpiffeIdError> {
    if segment.is_empty() {
        return Err(if is_last {
            SpiffeIdError::TrailingSlash(whole.to_string())
        } else {
            SpiffeIdError::EmptySegment(whole.to_string())
        });
    }
    if segment == "." || segment == ".." {
        return Err(SpiffeIdError::DotSegment(whole.to_string()));
    }
    for ch in segment.chars() {
        match ch {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_' => {}
            '?' => return Err(SpiffeIdError::Query(whole.to_string())),
            '#' => return Err(SpiffeIdError::Fragment(whole.to_string())),
            '%' => return Err(SpiffeIdError::PercentEncoded(whole.to_string())),
            _ => {
                return Err(SpiffeIdError::PathChar {
                    segment: segment.to_string(),
                    ch,
                });
            }
        }
    }
    Ok(())
}

/// A SPIFFE id: `spiffe://<trust domain><path>`. The path is empty (the trust domain's own id,
/// carried by CA certificates) or `/`-separated non-empty segments (a workload).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    path: String,
}

impl SpiffeId {
    /// Builds `spiffe://<td>/<seg>/<seg>...` from segments that must each be valid as they are
    /// (no escaping happens here).
    pub fn from_segments(td: &TrustDomain, segments: &[&str]) -> Result<SpiffeId, SpiffeIdError> {
        let mut path = String::new();
        for segment in segments {
            path.push('/');
            path.push_str(segment);
        }
        let id = SpiffeId {
            trust_domain: td.clone(),
            path,
        };
        let whole = id.to_string();
        if whole.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong(whole.len()));
        }
        validate_path(&id.path, &whole)?;
        Ok(id)
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    #[cfg(test)]
    /// `""` for a trust domain id, otherwise `/seg/...`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The path split into its segments (empty for a trust domain id).
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.path.split('/').skip(1)
    }

    /// True for `spiffe://<td>` itself, which names the trust domain rather than a workload.
    pub fn is_trust_domain_id(&self) -> bool {
        self.path.is_empty()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME_PREFIX}{}{}", self.trust_domain, self.path)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong(s.len()));
        }
        let Some(rest) = s.strip_prefix(SCHEME_PREFIX) else {
            return Err(SpiffeIdError::WrongScheme(s.to_string()));
        };
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        validate_trust_domain(td, s)?;
        validate_path(path, s)?;
        Ok(SpiffeId {
            trust_domain: TrustDomain(td.to_string()),
            path: path.to_string(),
        })
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Why a certificate does not name exactly one SPIFFE id.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CertIdError {
    #[error("not a parsable X.509 certificate: {0}")]
    Parse(String),
    #[error("certificate has no URI SAN (subject alternative names: {0})")]
    NoUriSan(String),
    #[error("certificate has {} URI SANs ({}); an X.509-SVID carries exactly one", .0.len(), .0.join(", "))]
    ManyUriSans(Vec<String>),
    #[error("certificate's URI SAN `{uri}` is not a SPIFFE id: {source}")]
    NotSpiffe { uri: String, source: SpiffeIdError },
}

/// The SPIFFE id of a DER certificate: its one and only URI SAN. More than one URI SAN is
/// refused rather than picking one, because a peer choosing which of its names we check would
/// let one certificate speak for two identities.
pub fn spiffe_id_of_cert(der: &[u8]) -> Result<SpiffeId, CertIdError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| CertIdError::Parse(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| CertIdError::Parse(format!("subject alternative names: {e}")))?;
    let names: &[GeneralName<'_>] = match &san {
        Some(ext) => &ext.value.general_names,
        None => &[],
    };
    let uris: Vec<&str> = names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => {
            let found = if names.is_empty() {
                "none".to_string()
            } else {
                names
                    .iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            Err(CertIdError::NoUriSan(found))
        }
        [uri] => uri.parse().map_err(|source| CertIdError::NotSpiffe {
            uri: uri.to_string(),
            source,
        }),
        many => Err(CertIdError::ManyUriSans(
            many.iter().map(|u| u.to_string()).collect(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids_round_trip() {
        for s in [
            "spiffe://example.org",
            "spiffe://example.org/a",
            "spiffe://example.org/aws/111122223333/role/path/orders",
            "spiffe://a-b_c.9/A.b-C_9/..a/a..",
            "spiffe://td/_2E_2E",
        ] {
            let id: SpiffeId = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(id.to_string(), s);
        }
        let id: SpiffeId = "spiffe://example.org/x/y".parse().unwrap();
        assert_eq!(id.trust_domain().as_str(), "example.org");
        assert_eq!(id.path(), "/x/y");
        assert_eq!(id.segments().collect::<Vec<_>>(), ["x", "y"]);
        assert!(!id.is_trust_domain_id());
        assert!(
            "spiffe://example.org"
                .parse::<SpiffeId>()
                .unwrap()
                .is_trust_domain_id()
        );
    }

    #[test]
    fn invalid_ids_name_the_problem() {
        use SpiffeIdError as E;
        type Check = fn(&E) -> bool;
        let cases: &[(&str, Check)] = &[
            ("", |e| matches!(e, E::Empty)),
            ("http://example.org/a", |e| matches!(e, E::WrongScheme(_))),
            ("SPIFFE://example.org/a", |e| matches!(e, E::WrongScheme(_))),
            ("spiffe:/example.org/a", |e| matches!(e, E::WrongScheme(_))),
            ("spiffe://", |e| matches!(e, E::MissingTrustDomain(_))),
            ("spiffe:///a", |e| matches!(e, E::MissingTrustDomain(_))),
            ("spiffe://Example.org/a", |e| {
                matches!(e, E::UppercaseTrustDomain(_))
            }),
            ("spiffe://example.org:443/a", |e| matches!(e, E::Port(_))),
            ("spiffe://user@example.org/a", |e| {
                matches!(e, E::UserInfo(_))
            }),
            ("spiffe://example.org/a?x=1", |e| matches!(e, E::Query(_))),
            ("spiffe://example.org?x", |e| matches!(e, E::Query(_))),
            ("spiffe://example.org/a#f", |e| matches!(e, E::Fragment(_))),
            ("spiffe://example.org/a%2Fb", |e| {
                matches!(e, E::PercentEncoded(_))
            }),
            ("spiffe://example.org/", |e| {
                matches!(e, E::TrailingSlash(_))
            }),
            ("spiffe://example.org/a/", |e| {
                matches!(e, E::TrailingSlash(_))
            }),
            ("spiffe://example.org//a", |e| {
                matches!(e, E::EmptySegment(_))
            }),
            ("spiffe://example.org/a/./b", |e| {
                matches!(e, E::DotSegment(_))
            }),
            ("spiffe://example.org/..", |e| matches!(e, E::DotSegment(_))),
            ("spiffe://example.org/a+b", |e| {
                matches!(e, E::PathChar { ch: '+', .. })
            }),
            ("spiffe://example.org/caf\u{e9}", |e| {
                matches!(e, E::PathChar { .. })
            }),
            ("spiffe://exa mple.org/a", |e| {
                matches!(e, E::TrustDomainChar { ch: ' ', .. })
            }),
        ];
        for (input, check) in cases {
            let err = input.parse::<SpiffeId>().unwrap_err();
            assert!(check(&err), "{input:?}: unexpected error {err:?}");
        }
    }

    #[test]
    fn length_limits() {
        let td = "a".repeat(MAX_TRUST_DOMAIN_LEN);
        let at_limit = format!(
            "spiffe://{td}/{}",
            "b".repeat(MAX_SPIFFE_ID_LEN - 10 - td.len())
        );
        assert_eq!(at_limit.len(), MAX_SPIFFE_ID_LEN);
        assert!(at_limit.parse::<SpiffeId>().is_ok());
        let over = format!("{at_limit}b");
        assert_eq!(
            over.parse::<SpiffeId>().unwrap_err(),
            SpiffeIdError::TooLong(MAX_SPIFFE_ID_LEN + 1)
        );
        let long_td = "a".repeat(MAX_TRUST_DOMAIN_LEN + 1);
        assert_eq!(
            long_td.parse::<TrustDomain>().unwrap_err(),
            SpiffeIdError::TrustDomainTooLong(MAX_TRUST_DOMAIN_LEN + 1)
        );
    }

    #[test]
    fn trust_domain_parsing() {
        let td: TrustDomain = "prod.example.com".parse().unwrap();
        assert_eq!(td.to_string(), "prod.example.com");
        assert_eq!(td.id().to_string(), "spiffe://prod.example.com");
        for bad in [
            "",
            "Prod.example.com",
            "spiffe://prod.example.com",
            "a:1",
            "a/b",
            "a@b",
        ] {
            assert!(bad.parse::<TrustDomain>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn from_segments_validates() {
        let td: TrustDomain = "td".parse().unwrap();
        assert_eq!(
            SpiffeId::from_segments(&td, &["a", "b"])
                .unwrap()
                .to_string(),
            "spiffe://td/a/b"
        );
        assert!(SpiffeId::from_segments(&td, &["a/b"]).is_ok()); // two valid segments
        assert!(SpiffeId::from_segments(&td, &[""]).is_err());
        assert!(SpiffeId::from_segments(&td, &[".."]).is_err());
        assert!(SpiffeId::from_segments(&td, &["a+b"]).is_err());
    }

    #[test]
    fn deserializes_from_toml() {
        #[derive(serde::Deserialize)]
        struct C {
            td: TrustDomain,
            id: SpiffeId,
        }
        let c: C = toml::from_str("td = \"td\"\nid = \"spiffe://td/a\"").unwrap();
        assert_eq!(c.td.as_str(), "td");
        assert_eq!(c.id.path(), "/a");
        let err = toml::from_str::<C>("td = \"TD\"\nid = \"spiffe://td/a\"")
            .err()
            .unwrap();
        assert!(err.to_string().contains("lowercase"), "{err}");
    }

    fn cert_with_sans(sans: Vec<rcgen::SanType>) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = sans;
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn uri(s: &str) -> rcgen::SanType {
        rcgen::SanType::URI(s.try_into().unwrap())
    }

    #[test]
    fn id_of_cert_requires_exactly_one_uri_san() {
        let der = cert_with_sans(vec![uri("spiffe://td/a")]);
        assert_eq!(
            spiffe_id_of_cert(&der).unwrap().to_string(),
            "spiffe://td/a"
        );

        // Non-URI SANs next to the one URI are fine.
        let der = cert_with_sans(vec![
            rcgen::SanType::DnsName("a.example".try_into().unwrap()),
            uri("spiffe://td/a"),
        ]);
        assert!(spiffe_id_of_cert(&der).is_ok());

        let err = spiffe_id_of_cert(&cert_with_sans(vec![])).unwrap_err();
        assert!(err.to_string().contains("no URI SAN"), "{err}");

        let der = cert_with_sans(vec![rcgen::SanType::DnsName(
            "a.example".try_into().unwrap(),
        )]);
        let err = spiffe_id_of_cert(&der).unwrap_err();
        assert!(err.to_string().contains("a.example"), "{err}");

        let der = cert_with_sans(vec![uri("spiffe://td/a"), uri("spiffe://td/b")]);
        let err = spiffe_id_of_cert(&der).unwrap_err();
        assert!(matches!(err, CertIdError::ManyUriSans(ref v) if v.len() == 2));
        assert!(err.to_string().contains("spiffe://td/b"), "{err}");

        let der = cert_with_sans(vec![uri("https://td/a")]);
        let err = spiffe_id_of_cert(&der).unwrap_err();
        assert!(err.to_string().contains("https://td/a"), "{err}");

        assert!(matches!(
            spiffe_id_of_cert(b"not a cert"),
            Err(CertIdError::Parse(_))
        ));
    }
}
