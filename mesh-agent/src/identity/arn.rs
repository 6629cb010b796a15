//! IAM role ARNs and their reversible mapping to SPIFFE ids.
//!
//! A task's workload identity is its IAM role, because that is what ECS attests for a task and
//! what operators already reason about. The mapping is
//!
//! ```text
//! arn:<partition>:iam::<account>:role/<path segments>/<name>
//!   -> spiffe://<trust domain>/<partition>/<account>/role/<escaped path segments>/<escaped name>
//! arn:aws:iam::111122223333:role/path/orders -> spiffe://td/aws/111122223333/role/path/orders
//! ```
//!
//! IAM allows characters in names (`+=,@`) and paths (any printable ASCII) that SPIFFE path
//! segments do not (only `A-Z a-z 0-9 . - _`), so each ARN path segment and the name are escaped
//! into one SPIFFE segment:
//!
//! * `A-Z a-z 0-9 . -` are written as they are;
//! * any other byte is written `_XX`, its value in two UPPERCASE hex digits (`+` -> `_2B`);
//! * `_` is written `_5F` only when the next two characters of the original are both uppercase
//!   hex digits (`[0-9A-F]`), otherwise it stays `_`, so `my_role` stays readable;
//! * a segment that is exactly `.` or `..` (legal in IAM, forbidden in SPIFFE) has its dots
//!   escaped: `_2E`, `_2E_2E`.
//!
//! Decoding reads `_` followed by two uppercase hex digits as an escape and any other `_` as a
//! literal. This is unambiguous: after a literal `_` the encoder only ever emits two uppercase
//! hex digits when the original had exactly those there, and then it would have escaped the `_`.
//!
//! [`RoleArn::from_spiffe_id`] accepts only the canonical encoding (it re-encodes and compares),
//! so every valid role has exactly one id and every accepted id exactly one role: a policy that
//! names `.../role/_6Frders` can never be confused with one naming `.../role/orders`.
//!
//! Length: an ARN path is at most 512 bytes and a name 64, so the escaped path and name take at
//! most 3 * 510 + 2 + 3 * 64 = 1724 bytes; with a trust domain of at most 255 bytes and
//! `spiffe://`, `/aws-us-gov/<12 digits>/role` the id stays below the 2048-byte SPIFFE limit,
//! which is why [`RoleArn::to_spiffe_id`] cannot fail.

use std::fmt::{self, Write as _};
use std::str::FromStr;

use thiserror::Error;

use super::spiffe::{SpiffeId, TrustDomain};

/// Longest role name IAM accepts.
pub const MAX_ROLE_NAME_LEN: usize = 64;
/// Longest role path IAM accepts, slashes included.
pub const MAX_ROLE_PATH_LEN: usize = 512;

const ROLE_NAME_CHARS: &str = "A-Z a-z 0-9 and + = , . @ _ -";
/// Kept in step with [`Partition::ALL`] by a test.
const ACCEPTED_PARTITIONS: &str = "aws, aws-cn, aws-us-gov";
const FORMAT_HINT: &str = "arn:<partition>:iam::<12-digit account>:role/[<path>/]<name>";

/// The AWS partitions an IAM role can live in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Partition {
    Aws,
    AwsCn,
    AwsUsGov,
}

impl Partition {
    pub const ALL: [Partition; 3] = [Partition::Aws, Partition::AwsCn, Partition::AwsUsGov];

    pub fn as_str(self) -> &'static str {
        match self {
            Partition::Aws => "aws",
            Partition::AwsCn => "aws-cn",
            Partition::AwsUsGov => "aws-us-gov",
        }
    }
}

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Partition {
    type Err = ArnError;
    fn from_str(s: &str) -> Result<Self, ArnError> {
        Partition::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| ArnError::UnknownPartition(s.to_string()))
    }
}

/// Why a string is not an IAM role ARN, or a SPIFFE id is not a role identity.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ArnError {
    #[error("`{0}` is not an IAM role ARN (expected `{FORMAT_HINT}`)")]
    NotAnArn(String),
    #[error("unknown partition `{0}` (accepted: {ACCEPTED_PARTITIONS})")]
    UnknownPartition(String),
    #[error(
        "`{arn}` is an STS assumed-role session ARN; use the role ARN, not an assumed-role \
         session ARN (here probably `{suggestion}`, plus the role's path if it has one)"
    )]
    AssumedRole { arn: String, suggestion: String },
    #[error("service is `{0}`, expected `iam`")]
    NotIam(String),
    #[error("IAM ARNs have no region, found `{0}`")]
    Region(String),
    #[error("account `{0}` is not 12 digits")]
    Account(String),
    #[error("resource `{0}` is not a role (expected `role/[<path>/]<name>`)")]
    NotRole(String),
    #[error("role name is empty in `{0}`")]
    EmptyName(String),
    #[error("role name `{name}` contains {ch:?}; role names allow {ROLE_NAME_CHARS}")]
    NameChar { name: String, ch: char },
    #[error("role name `{name}` is {len} characters long; at most {MAX_ROLE_NAME_LEN} are allowed")]
    NameTooLong { name: String, len: usize },
    #[error("role path `{path}` contains {ch:?}; paths allow printable ASCII (0x21-0x7E)")]
    PathChar { path: String, ch: char },
    #[error("role path `{0}` has an empty segment (`//`)")]
    EmptyPathSegment(String),
    #[error("role path is {0} characters long; at most {MAX_ROLE_PATH_LEN} are allowed")]
    PathTooLong(usize),
    #[error("trailing characters {trailing:?} after `{arn}`")]
    Trailing { arn: String, trailing: String },
    #[error("ARN `{arn}` contains {ch:?} at byte {pos}")]
    Char { arn: String, ch: char, pos: usize },
    #[error(
        "`{0}` is not a role identity (expected `spiffe://<td>/<partition>/<account>/role/[<path>/]<name>`)"
    )]
    NotRoleId(String),
    #[error("`{id}` does not name a valid role: {source}")]
    BadRoleId { id: String, source: Box<ArnError> },
    #[error(
        "segment `{segment}` of `{id}` decodes to byte 0x{byte:02X}, which IAM does not allow there"
    )]
    DecodedByte {
        id: String,
        segment: String,
        byte: u8,
    },
    #[error("`{id}` is not in canonical form; the role it decodes to is written `{canonical}`")]
    NonCanonical { id: String, canonical: String },
}

/// An IAM role ARN, validated against IAM's rules for partitions, accounts, paths and names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoleArn {
    partition: Partition,
    account: String,
    /// `/` or `/seg/.../`, as IAM writes it.
    path: String,
    name: String,
}

impl RoleArn {
    /// Builds a role from its parts, checking each the way IAM does.
    pub fn new(
        partition: Partition,
        account: &str,
        path: &str,
        name: &str,
    ) -> Result<RoleArn, ArnError> {
        if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ArnError::Account(account.to_string()));
        }
        validate_path(path)?;
        validate_name(name)?;
        Ok(RoleArn {
            partition,
            account: account.to_string(),
            path: path.to_string(),
            name: name.to_string(),
        })
    }

    #[cfg(test)]
    pub fn partition(&self) -> Partition {
        self.partition
    }

    #[cfg(test)]
    pub fn account_id(&self) -> &str {
        &self.account
    }

    #[cfg(test)]
    /// The IAM path: `/` when the role has none, otherwise `/seg/.../`.
    pub fn path(&self) -> &str {
        &self.path
    }

    #[cfg(test)]
    pub fn name(&self) -> &str {
        &self.name
    }

    fn path_segments(&self) -> impl Iterator<Item = &str> {
        self.path.split('/').filter(|s| !s.is_empty())
    }

    /// The role's SPIFFE id in `td` (see the module documentation for the encoding).
    pub fn to_spiffe_id(&self, td: &TrustDomain) -> SpiffeId {
        let mut segments: Vec<String> = vec![
            self.partition.as_str().to_string(),
            self.account.clone(),
            "role".to_string(),
        ];
        segments.extend(self.path_segments().map(escape_segment));
        segments.push(escape_segment(&self.name));
        let refs: Vec<&str> = segments.iter().map(String::as_str).collect();
        // Escaped segments only contain SPIFFE segment characters, are never empty, "." or "..",
        // and fit in 2048 bytes (module docs), so this cannot fail for a validated RoleArn.
        SpiffeId::from_segments(td, &refs).expect("an escaped role ARN is always a valid SPIFFE id")
    }

    /// The role a SPIFFE id names, if it is the canonical id of a valid role (in any trust
    /// domain; callers check the trust domain).
    pub fn from_spiffe_id(id: &SpiffeId) -> Result<RoleArn, ArnError> {
        let segments: Vec<&str> = id.segments().collect();
        let [partition, account, "role", rest @ .., name] = segments.as_slice() else {
            return Err(ArnError::NotRoleId(id.to_string()));
        };
        let bad = |source: ArnError| ArnError::BadRoleId {
            id: id.to_string(),
            source: Box::new(source),
        };
        let partition: Partition = partition.parse().map_err(bad)?;
        let mut path = String::from("/");
        for segment in rest {
            path.push_str(&unescape_segment(id, segment)?);
            path.push('/');
        }
        let name = unescape_segment(id, name)?;
        let arn = RoleArn::new(partition, account, &path, &name).map_err(bad)?;
        let canonical = arn.to_spiffe_id(id.trust_domain());
        if canonical != *id {
            return Err(ArnError::NonCanonical {
                id: id.to_string(),
                canonical: canonical.to_string(),
            });
        }
        Ok(arn)
    }
}

impl fmt::Display for RoleArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "arn:{}:iam::{}:role{}{}",
            self.partition, self.account, self.path, self.name
        )
    }
}

impl FromStr for RoleArn {
    type Err = ArnError;

    fn from_str(s: &str) -> Result<Self, ArnError> {
        // Every legal ARN character is printable ASCII. A newline or space at the end is the
        // usual copy-paste accident, so name it as such.
        if let Some(pos) = s.find(|c: char| !('!'..='~').contains(&c)) {
            let trimmed = s.trim_end();
            if pos >= trimmed.len() {
                return Err(ArnError::Trailing {
                    arn: trimmed.to_string(),
                    trailing: s[trimmed.len()..].to_string(),
                });
            }
            return Err(ArnError::Char {
                arn: s.to_string(),
                ch: s[pos..].chars().next().unwrap_or(' '),
                pos,
            });
        }
        // The resource may itself contain `:` (IAM paths allow it), so split at most 5 times.
        let parts: Vec<&str> = s.splitn(6, ':').collect();
        let ["arn", partition, service, region, account, resource] = parts.as_slice() else {
            return Err(ArnError::NotAnArn(s.to_string()));
        };
        let partition: Partition = partition.parse()?;
        if *service == "sts"
            && let Some(session) = resource.strip_prefix("assumed-role/")
        {
            let role = session.split('/').next().unwrap_or_default();
            return Err(ArnError::AssumedRole {
                arn: s.to_string(),
                suggestion: format!("arn:{partition}:iam::{account}:role/{role}"),
            });
        }
        if *service != "iam" {
            return Err(ArnError::NotIam(service.to_string()));
        }
        if !region.is_empty() {
            return Err(ArnError::Region(region.to_string()));
        }
        let Some(path_and_name) = resource.strip_prefix("role/") else {
            return Err(ArnError::NotRole(resource.to_string()));
        };
        let (path, name) = match path_and_name.rfind('/') {
            Some(i) => (
                format!("/{}", &path_and_name[..=i]),
                &path_and_name[i + 1..],
            ),
            None => ("/".to_string(), path_and_name),
        };
        if name.is_empty() {
            return Err(ArnError::EmptyName(s.to_string()));
        }
        RoleArn::new(partition, account, &path, name)
    }
}

impl<'de> serde::Deserialize<'de> for RoleArn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn validate_name(name: &str) -> Result<(), ArnError> {
    if name.is_empty() {
        return Err(ArnError::EmptyName(name.to_string()));
    }
    if let Some(ch) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "+=,.@_-".contains(*c)))
    {
        return Err(ArnError::NameChar {
            name: name.to_string(),
            ch,
        });
    }
    if name.len() > MAX_ROLE_NAME_LEN {
        return Err(ArnError::NameTooLong {
            name: name.to_string(),
            len: name.len(),
        });
    }
    Ok(())
}

fn validate_path(path: &str) -> Result<(), ArnError> {
    if let Some(ch) = path.chars().find(|c| !('!'..='~').contains(c)) {
        return Err(ArnError::PathChar {
            path: path.to_string(),
            ch,
        });
    }
    if path.len() > MAX_ROLE_PATH_LEN {
        return Err(ArnError::PathTooLong(path.len()));
    }
    if !path.starts_with('/') || !path.ends_with('/') {
        // Only reachable through RoleArn::new; parsing always produces a slash-framed path.
        return Err(ArnError::PathChar {
            path: path.to_string(),
            ch: '/',
        });
    }
    if path.len() > 1 && path[1..path.len() - 1].split('/').any(str::is_empty) {
        return Err(ArnError::EmptyPathSegment(path.to_string()));
    }
    Ok(())
}

fn is_upper_hex(b: Option<&u8>) -> bool {
    matches!(b, Some(b'0'..=b'9' | b'A'..=b'F'))
}

/// One IAM path segment or role name -> one SPIFFE path segment (rules in the module docs).
pub fn escape_segment(segment: &str) -> String {
    match segment {
        "." => return "_2E".to_string(),
        ".." => return "_2E_2E".to_string(),
        _ => {}
    }
    let bytes = segment.as_bytes();
    let mut out = String::with_capacity(bytes.len());
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' => out.push(b as char),
            b'_' if !(is_upper_hex(bytes.get(i + 1)) && is_upper_hex(bytes.get(i + 2))) => {
                out.push('_')
            }
            _ => {
                let _ = write!(out, "_{b:02X}");
            }
        }
    }
    out
}

/// Inverse of [`escape_segment`]; `id` is only for error messages.
fn unescape_segment(id: &SpiffeId, segment: &str) -> Result<String, ArnError> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'_' && is_upper_hex(bytes.get(i + 1)) && is_upper_hex(bytes.get(i + 2)) {
            let hex = &segment[i + 1..i + 3];
            let byte = u8::from_str_radix(hex, 16).expect("two uppercase hex digits");
            // A `/` would split the segment and anything outside printable ASCII is not IAM.
            if byte == b'/' || !(0x21..=0x7E).contains(&byte) {
                return Err(ArnError::DecodedByte {
                    id: id.to_string(),
                    segment: segment.to_string(),
                    byte,
                });
            }
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(String::from_utf8(out).expect("printable ASCII bytes are UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        "td".parse().unwrap()
    }

    /// The documented examples (docs/identity.md has the same table).
    #[test]
    fn example_table() {
        let table = [
            (
                "arn:aws:iam::111122223333:role/orders",
                "spiffe://td/aws/111122223333/role/orders",
            ),
            (
                "arn:aws:iam::111122223333:role/path/orders",
                "spiffe://td/aws/111122223333/role/path/orders",
            ),
            (
                "arn:aws-cn:iam::111122223333:role/team/a/my_role",
                "spiffe://td/aws-cn/111122223333/role/team/a/my_role",
            ),
            (
                "arn:aws-us-gov:iam::111122223333:role/svc+blue@prod",
                "spiffe://td/aws-us-gov/111122223333/role/svc_2Bblue_40prod",
            ),
            (
                "arn:aws:iam::111122223333:role/x_2B",
                "spiffe://td/aws/111122223333/role/x_5F2B",
            ),
            (
                "arn:aws:iam::111122223333:role/x_2b",
                "spiffe://td/aws/111122223333/role/x_2b",
            ),
            (
                "arn:aws:iam::111122223333:role/a=b,c",
                "spiffe://td/aws/111122223333/role/a_3Db_2Cc",
            ),
            (
                "arn:aws:iam::111122223333:role/../.../a",
                "spiffe://td/aws/111122223333/role/_2E_2E/.../a",
            ),
            (
                "arn:aws:iam::111122223333:role/a~b:c/.",
                "spiffe://td/aws/111122223333/role/a_7Eb_3Ac/_2E",
            ),
        ];
        for (arn, id) in table {
            let role: RoleArn = arn.parse().unwrap_or_else(|e| panic!("{arn}: {e}"));
            assert_eq!(role.to_string(), arn);
            assert_eq!(role.to_spiffe_id(&td()).to_string(), id, "{arn}");
            let back = RoleArn::from_spiffe_id(&id.parse().unwrap()).unwrap();
            assert_eq!(back, role);
        }
    }

    #[test]
    fn accepted_partitions_message_lists_all() {
        assert_eq!(
            Partition::ALL.map(Partition::as_str).join(", "),
            ACCEPTED_PARTITIONS
        );
    }

    #[test]
    fn accessors() {
        let role: RoleArn = "arn:aws-cn:iam::111122223333:role/a/b/orders"
            .parse()
            .unwrap();
        assert_eq!(role.partition(), Partition::AwsCn);
        assert_eq!(role.account_id(), "111122223333");
        assert_eq!(role.path(), "/a/b/");
        assert_eq!(role.name(), "orders");
        let role: RoleArn = "arn:aws:iam::111122223333:role/orders".parse().unwrap();
        assert_eq!(role.path(), "/");
    }

    #[test]
    fn escape_edge_cases() {
        for (raw, escaped) in [
            ("_", "_"),
            ("a_", "a_"),
            ("_a", "_a"),
            ("_2", "_2"),
            ("_2B", "_5F2B"),
            ("__5F", "__5F5F"),
            ("_2+", "_2_2B"),
            ("_+", "__2B"),
            ("+=,.@-_", "_2B_3D_2C._40-_"),
            (".", "_2E"),
            ("..", "_2E_2E"),
            ("...", "..."),
            ("_2E", "_5F2E"),
        ] {
            assert_eq!(escape_segment(raw), escaped, "{raw}");
        }
    }

    fn random_string(rng: &mut fastrand::Rng, alphabet: &[u8], min: usize, max: usize) -> String {
        let len = rng.usize(min..=max);
        (0..len)
            .map(|_| alphabet[rng.usize(..alphabet.len())] as char)
            .collect()
    }

    /// Property: for many generated roles, ARN -> id -> ARN is the identity, the id is a valid
    /// SPIFFE id as a string too, and distinct roles never share an id. The alphabets are biased
    /// towards the characters the escaping has to get right (`_`, hex digits, dots).
    #[test]
    fn mapping_is_reversible() {
        let mut rng = fastrand::Rng::with_seed(0x005e_ed1d);
        let tricky_name: &[u8] = b"_5F2EBb+=,.@-aZ09";
        let all_name: &[u8] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+=,.@_-";
        let tricky_path: &[u8] = b"_5F2E.+~!%:aB_";
        let all_path: Vec<u8> = (0x21u8..=0x7E).filter(|&b| b != b'/').collect();
        let mut seen = std::collections::HashMap::new();
        for i in 0..20_000 {
            let (name_alphabet, path_alphabet) = if i % 2 == 0 {
                (tricky_name, tricky_path)
            } else {
                (all_name, all_path.as_slice())
            };
            let name = match i % 50 {
                0 => ".".to_string(),
                1 => "..".to_string(),
                _ => random_string(&mut rng, name_alphabet, 1, 12),
            };
            let mut path = String::from("/");
            for _ in 0..rng.usize(0..=3) {
                let seg = match rng.usize(0..10) {
                    0 => "..".to_string(),
                    1 => ".".to_string(),
                    _ => random_string(&mut rng, path_alphabet, 1, 8),
                };
                path.push_str(&seg);
                path.push('/');
            }
            let partition = Partition::ALL[rng.usize(0..3)];
            let arn_text = format!("arn:{partition}:iam::111122223333:role{path}{name}");
            let role: RoleArn = arn_text
                .parse()
                .unwrap_or_else(|e| panic!("{arn_text}: {e}"));
            assert_eq!(role.to_string(), arn_text);
            let id = role.to_spiffe_id(&td());
            let reparsed: SpiffeId = id.to_string().parse().unwrap();
            assert_eq!(reparsed, id);
            let back = RoleArn::from_spiffe_id(&reparsed)
                .unwrap_or_else(|e| panic!("{arn_text} -> {id}: {e}"));
            assert_eq!(back, role, "{id}");
            if let Some(other) = seen.insert(id.to_string(), arn_text.clone()) {
                assert_eq!(other, arn_text, "two roles map to {id}");
            }
        }
    }

    #[test]
    fn longest_role_fits_in_a_spiffe_id() {
        let td: TrustDomain = "a"
            .repeat(crate::identity::spiffe::MAX_TRUST_DOMAIN_LEN)
            .parse()
            .unwrap();
        let path = format!("/{}/", "!".repeat(MAX_ROLE_PATH_LEN - 2));
        let name = "+".repeat(MAX_ROLE_NAME_LEN);
        let role = RoleArn::new(Partition::AwsUsGov, "111122223333", &path, &name).unwrap();
        let id = role.to_spiffe_id(&td);
        assert!(id.to_string().len() <= crate::identity::spiffe::MAX_SPIFFE_ID_LEN);
        assert_eq!(RoleArn::from_spiffe_id(&id).unwrap(), role);
    }

    fn err(arn: &str) -> ArnError {
        arn.parse::<RoleArn>()
            .expect_err(&format!("{arn} should be rejected"))
    }

    #[test]
    fn malformed_arns_are_rejected_with_clear_errors() {
        let cases: &[(&str, &str)] = &[
            ("", "not an IAM role ARN"),
            ("orders", "not an IAM role ARN"),
            ("aws:iam::111122223333:role/orders", "not an IAM role ARN"),
            ("arn:aws:iam::111122223333", "not an IAM role ARN"),
            (
                "arn:aws-iso:iam::111122223333:role/x",
                "aws, aws-cn, aws-us-gov",
            ),
            (
                "arn:aws:sts::111122223333:assumed-role/orders/i-0abc",
                "use the role ARN, not an assumed-role session ARN",
            ),
            ("arn:aws:s3:::bucket/key", "service is `s3`"),
            (
                "arn:aws:iam:us-east-1:111122223333:role/x",
                "no region, found `us-east-1`",
            ),
            ("arn:aws:iam::11112222333:role/x", "account `11112222333`"),
            ("arn:aws:iam::11112222333a:role/x", "not 12 digits"),
            (
                "arn:aws:iam::111122223333:user/bob",
                "resource `user/bob` is not a role",
            ),
            (
                "arn:aws:iam::111122223333:role",
                "resource `role` is not a role",
            ),
            ("arn:aws:iam::111122223333:role/", "role name is empty"),
            ("arn:aws:iam::111122223333:role/path/", "role name is empty"),
            ("arn:aws:iam::111122223333:role/or*ders", "contains '*'"),
            ("arn:aws:iam::111122223333:role/a//b", "empty segment"),
            (
                "arn:aws:iam::111122223333:role/orders\n",
                "trailing characters \"\\n\"",
            ),
            ("arn:aws:iam::111122223333:role/ord ers", "' ' at byte"),
            ("arn:aws:iam::111122223333:role/caf\u{e9}", "at byte"),
        ];
        for (arn, needle) in cases {
            let msg = err(arn).to_string();
            assert!(msg.contains(needle), "{arn:?}: `{msg}` lacks `{needle}`");
        }
        let long_name = format!("arn:aws:iam::111122223333:role/{}", "a".repeat(65));
        assert!(matches!(
            err(&long_name),
            ArnError::NameTooLong { len: 65, .. }
        ));
        let ok_name = format!("arn:aws:iam::111122223333:role/{}", "a".repeat(64));
        assert!(ok_name.parse::<RoleArn>().is_ok());
        let long_path = format!("arn:aws:iam::111122223333:role/{}/x", "p".repeat(511));
        assert!(matches!(err(&long_path), ArnError::PathTooLong(513)));
        let ok_path = format!("arn:aws:iam::111122223333:role/{}/x", "p".repeat(510));
        assert!(ok_path.parse::<RoleArn>().is_ok());
        let suggestion = err("arn:aws:sts::111122223333:assumed-role/orders/i-0abc").to_string();
        assert!(
            suggestion.contains("arn:aws:iam::111122223333:role/orders"),
            "{suggestion}"
        );
    }

    #[test]
    fn ids_that_are_not_canonical_roles_are_rejected() {
        let cases: &[(&str, &str)] = &[
            ("spiffe://td", "not a role identity"),
            ("spiffe://td/aws/111122223333/orders", "not a role identity"),
            (
                "spiffe://td/aws/111122223333/user/bob",
                "not a role identity",
            ),
            ("spiffe://td/aws/111122223333/role", "not a role identity"),
            (
                "spiffe://td/aws-iso/111122223333/role/x",
                "unknown partition",
            ),
            ("spiffe://td/aws/1/role/x", "not 12 digits"),
            ("spiffe://td/aws/111122223333/role/_41", "canonical"),
            ("spiffe://td/aws/111122223333/role/_5Fx", "canonical"),
            ("spiffe://td/aws/111122223333/role/a/_2F/x", "0x2F"),
            ("spiffe://td/aws/111122223333/role/_00", "0x00"),
            ("spiffe://td/aws/111122223333/role/_7E", "contains '~'"),
        ];
        for (id, needle) in cases {
            let parsed: SpiffeId = id.parse().unwrap();
            let msg = RoleArn::from_spiffe_id(&parsed).expect_err(id).to_string();
            assert!(msg.contains(needle), "{id}: `{msg}` lacks `{needle}`");
        }
    }

    #[test]
    fn deserializes_from_toml() {
        #[derive(serde::Deserialize)]
        struct C {
            role: RoleArn,
        }
        let c: C = toml::from_str("role = \"arn:aws:iam::111122223333:role/x\"").unwrap();
        assert_eq!(c.role.name(), "x");
        assert!(toml::from_str::<C>("role = \"arn:aws:iam::1:role/x\"").is_err());
    }
}
