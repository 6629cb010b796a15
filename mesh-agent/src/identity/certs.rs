//! Certificates of the identity chain: trust anchor (self-signed root) -> issuer (intermediate)
//! -> workload leaf (X.509-SVID). All keys are ECDSA P-256: small certificates, fast handshakes,
//! and supported by every TLS stack the mesh may meet.
//!
//! The profile follows the SPIFFE X.509-SVID specification: CA certificates carry the trust
//! domain's own id (`spiffe://<td>`) as their URI SAN, so an issuer from another trust domain is
//! caught by a string comparison; leaves carry exactly one URI SAN, the workload's id, and no
//! subject name (the SAN is then critical, as RFC 5280 requires).

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail, ensure};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use rustls_pki_types::pem::{PemObject, SectionKind};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::ParsedExtension;
use zeroize::{Zeroize, Zeroizing};

use super::spiffe::{SpiffeId, TrustDomain, spiffe_id_of_cert};

/// Certificates start this long before "now", so a peer whose clock is a little behind does not
/// see a fresh certificate as not yet valid.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);
#[cfg(test)]
pub const DEFAULT_ANCHOR_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
#[cfg(test)]
pub const DEFAULT_ISSUER_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);
pub const DEFAULT_LEAF_TTL: Duration = Duration::from_secs(24 * 3600);
const O_NAME: &str = "mesh-agent";
/// RFC 5280's upper bound for a common name.
const MAX_CN_LEN: usize = 64;

/// What `inspect` reads out of a certificate: what operators and metrics need to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub subject: String,
    pub issuer: String,
    /// Lowercase hex of the serial number's bytes.
    pub serial_hex: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub is_ca: bool,
    /// True when subject and issuer names are identical (a root, or a cross-signed oddity).
    pub self_issued: bool,
    /// The certificate's single URI SAN when it is a SPIFFE id.
    pub spiffe_id: Option<SpiffeId>,
    /// SHA-256 of the DER, lowercase hex without colons.
    pub sha256_fingerprint: String,
    pub subject_key_id: Option<String>,
    pub authority_key_id: Option<String>,
}

impl CertInfo {
    /// Time left until notAfter, zero once expired.
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.not_after.duration_since(now).unwrap_or_default()
    }

    /// Whole days until notAfter (negative once expired), for operator messages.
    pub fn days_left(&self, now: SystemTime) -> i64 {
        let secs = match self.not_after.duration_since(now) {
            Ok(d) => d.as_secs() as i64,
            Err(e) => -(e.duration().as_secs() as i64),
        };
        secs.div_euclid(86_400)
    }

    /// First 16 hex digits of the fingerprint: enough to tell anchors apart in messages.
    pub fn short_fingerprint(&self) -> &str {
        &self.sha256_fingerprint[..16]
    }

    /// The trust domain a CA certificate belongs to (its `spiffe://<td>` URI SAN).
    #[cfg(test)]
    pub fn trust_domain(&self) -> Option<&TrustDomain> {
        self.spiffe_id.as_ref().map(SpiffeId::trust_domain)
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// SHA-256 through rustls' ring provider, which is already linked for TLS; no extra crate.
pub fn sha256_hex(data: &[u8]) -> String {
    let suite = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
        .tls13()
        .expect("TLS13_AES_128_GCM_SHA256 is a TLS 1.3 suite");
    hex(suite.common.hash_provider.hash(data).as_ref())
}

pub(crate) fn asn1_to_system(t: x509_parser::time::ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

/// X.509 times have whole seconds; rounding here keeps what we compute equal to what we parse.
fn to_offset(t: SystemTime) -> OffsetDateTime {
    let dt = OffsetDateTime::from(t);
    dt.replace_nanosecond(0).unwrap_or(dt)
}

pub(crate) fn parse(der: &[u8]) -> anyhow::Result<X509Certificate<'_>> {
    let (rest, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| anyhow::anyhow!("{e}"))?;
    ensure!(
        rest.is_empty(),
        "{} trailing bytes after the certificate",
        rest.len()
    );
    Ok(cert)
}

/// Reads the facts of a DER certificate.
pub fn inspect(der: &[u8]) -> anyhow::Result<CertInfo> {
    let cert = parse(der).context("not a valid X.509 certificate")?;
    let mut subject_key_id = None;
    let mut authority_key_id = None;
    for ext in cert.iter_extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(id) => subject_key_id = Some(hex(id.0)),
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                authority_key_id = aki.key_identifier.as_ref().map(|id| hex(id.0))
            }
            _ => {}
        }
    }
    Ok(CertInfo {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        serial_hex: hex(cert.raw_serial()),
        not_before: asn1_to_system(cert.validity().not_before),
        not_after: asn1_to_system(cert.validity().not_after),
        is_ca: cert.is_ca(),
        self_issued: cert.subject().as_raw() == cert.issuer().as_raw(),
        spiffe_id: spiffe_id_of_cert(der).ok(),
        sha256_fingerprint: sha256_hex(der),
        subject_key_id,
        authority_key_id,
    })
}

/// A CA certificate (anchor or issuer) with its private key: what signs the next link.
pub struct SigningCa {
    cert: CertificateDer<'static>,
    info: CertInfo,
    key: KeyPair,
}

impl std::fmt::Debug for SigningCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningCa")
            .field("subject", &self.info.subject)
            .field("fingerprint", &self.info.sha256_fingerprint)
            .field("key", &"[secret]")
            .finish()
    }
}

impl Drop for SigningCa {
    fn drop(&mut self) {
        // Wipes rcgen's PKCS#8 copy of the key; ring's own expanded copy is not reachable.
        self.key.zeroize();
    }
}

impl SigningCa {
    /// Pairs a CA certificate with its PKCS#8 key, checking that the key is P-256, belongs to the
    /// certificate, and that the certificate is a CA allowed to sign certificates.
    pub fn new(
        cert: CertificateDer<'static>,
        key: &PrivatePkcs8KeyDer<'_>,
    ) -> anyhow::Result<Self> {
        let info = inspect(&cert)?;
        let key = KeyPair::from_pkcs8_der_and_sign_algo(key, &PKCS_ECDSA_P256_SHA256)
            .map_err(|e| anyhow::anyhow!("private key is not a PKCS#8 ECDSA P-256 key: {e}"))?;
        let parsed = parse(&cert)?;
        ensure!(
            parsed.public_key().subject_public_key.data.as_ref() == key.public_key_raw(),
            "the private key does not belong to certificate `{}`",
            info.subject
        );
        ensure!(
            info.is_ca,
            "certificate `{}` is not a CA (basicConstraints cA is not set)",
            info.subject
        );
        if let Some(ku) = parsed.key_usage().map_err(|e| anyhow::anyhow!("{e}"))? {
            ensure!(
                ku.value.key_cert_sign(),
                "certificate `{}` may not sign certificates (keyUsage lacks keyCertSign)",
                info.subject
            );
        }
        Ok(SigningCa { cert, info, key })
    }

    /// Reads `CERTIFICATE` then `PRIVATE KEY` from one PEM blob (the layout of `issuer.pem`).
    pub fn from_pem(pem: &[u8]) -> anyhow::Result<Self> {
        let (cert, key) = parse_cert_and_key_pem(pem)?;
        Self::new(cert, &key)
    }

    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    pub fn info(&self) -> &CertInfo {
        &self.info
    }

    pub fn cert_pem(&self) -> String {
        pem_encode("CERTIFICATE", &self.cert)
    }

    /// The PKCS#8 private key as PEM; wiped from memory when dropped.
    pub fn key_pem(&self) -> Zeroizing<String> {
        let der = Zeroizing::new(self.key.serialize_der());
        pem_encode_secret("PRIVATE KEY", &der)
    }

    /// Certificate then key, the layout of `issuer.pem`.
    pub fn cert_and_key_pem(&self) -> Zeroizing<String> {
        let cert = self.cert_pem();
        let key = self.key_pem();
        // Sized up front: growing the buffer would leave a copy of the key in freed memory.
        let mut out = Zeroizing::new(String::with_capacity(cert.len() + key.len()));
        out.push_str(&cert);
        out.push_str(&key);
        out
    }

    fn trust_domain(&self) -> anyhow::Result<TrustDomain> {
        match &self.info.spiffe_id {
            Some(id) if id.is_trust_domain_id() => Ok(id.trust_domain().clone()),
            _ => bail!(
                "CA certificate `{}` does not carry its trust domain as URI SAN `spiffe://<td>`",
                self.info.subject
            ),
        }
    }

    fn signer(&self) -> anyhow::Result<rcgen::Issuer<'static, &KeyPair>> {
        rcgen::Issuer::from_ca_cert_der(&self.cert, &self.key)
            .map_err(|e| anyhow::anyhow!("cannot sign with `{}`: {e}", self.info.subject))
    }
}

/// 16 bytes from the system CSPRNG (as the CA/Browser Forum asks of public CAs: unpredictable
/// serials make chosen-prefix collisions against the signature hash impractical). Falls back to
/// a non-cryptographic generator only if the OS refuses randomness, where uniqueness still holds.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    if rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut bytes)
        .is_err()
    {
        fastrand::fill(&mut bytes);
    }
    // Positive (top bit clear) and full length (non-zero first byte), so DER keeps 16 bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

fn date(t: SystemTime) -> String {
    let dt = OffsetDateTime::from(t);
    format!(
        "{:04}-{:02}-{:02}",
        dt.year(),
        u8::from(dt.month()),
        dt.day()
    )
}

/// A human-readable, practically unique CA name. The trust domain is dropped when it would push
/// the name past RFC 5280's 64-character bound; the URI SAN carries it anyway.
fn ca_common_name(kind: &str, td: &TrustDomain, now: SystemTime, key_id: &[u8]) -> String {
    let suffix = format!("{} {}", date(now), &hex(key_id)[..8]);
    let full = format!("mesh {kind} {td} {suffix}");
    if full.len() <= MAX_CN_LEN {
        full
    } else {
        format!("mesh {kind} {suffix}")
    }
}

fn ca_params(
    kind: &str,
    td: &TrustDomain,
    key: &KeyPair,
    not_before: SystemTime,
    not_after: SystemTime,
    now: SystemTime,
) -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::default();
    let key_id = params.key_identifier(key);
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, O_NAME);
    dn.push(DnType::CommonName, ca_common_name(kind, td, now, &key_id));
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(td.id().to_string().try_into()?)];
    params.not_before = to_offset(not_before);
    params.not_after = to_offset(not_after);
    params.serial_number = Some(random_serial());
    Ok(params)
}

/// A new self-signed trust anchor for `td`, valid from `now` (minus skew) for `validity`.
/// pathLenConstraint 1: it may sign issuers, and issuers may only sign leaves.
pub fn new_trust_anchor(
    td: &TrustDomain,
    validity: Duration,
    now: SystemTime,
) -> anyhow::Result<SigningCa> {
    ensure!(!validity.is_zero(), "anchor validity must be positive");
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = ca_params(
        "trust anchor",
        td,
        &key,
        now - CLOCK_SKEW,
        now + validity,
        now,
    )?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key)?;
    let pkcs8 = Zeroizing::new(key.serialize_der());
    SigningCa::new(
        cert.der().clone(),
        &PrivatePkcs8KeyDer::from(pkcs8.as_slice()),
    )
}

/// A new issuer signed by `anchor`, valid for `validity` but never beyond the anchor's notAfter
/// (a chain is only as valid as its shortest link). pathLenConstraint 0: leaves only.
pub fn new_issuer(
    anchor: &SigningCa,
    validity: Duration,
    now: SystemTime,
) -> anyhow::Result<SigningCa> {
    ensure!(!validity.is_zero(), "issuer validity must be positive");
    let td = anchor.trust_domain()?;
    let not_after = (now + validity).min(anchor.info.not_after);
    ensure!(
        not_after > now,
        "anchor `{}` expired at {}; rotate the trust anchor first",
        anchor.info.subject,
        humantime::format_rfc3339_seconds(anchor.info.not_after)
    );
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = ca_params("issuer", &td, &key, now - CLOCK_SKEW, not_after, now)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &anchor.signer()?)?;
    let pkcs8 = Zeroizing::new(key.serialize_der());
    SigningCa::new(
        cert.der().clone(),
        &PrivatePkcs8KeyDer::from(pkcs8.as_slice()),
    )
}

/// A freshly minted workload certificate and its key, which never touches disk.
pub struct IssuedLeaf {
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl std::fmt::Debug for IssuedLeaf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedLeaf")
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("key", &"[secret]")
            .finish()
    }
}

/// Mints an X.509-SVID for `id` under `issuer`: valid from `now - CLOCK_SKEW` until
/// `min(now + ttl, issuer notAfter)`, usable as TLS client and server, never as a CA.
pub fn new_workload_leaf(
    issuer: &SigningCa,
    id: &SpiffeId,
    ttl: Duration,
    now: SystemTime,
) -> anyhow::Result<IssuedLeaf> {
    ensure!(
        !ttl.is_zero(),
        "workload certificate lifetime must be positive"
    );
    ensure!(
        !id.is_trust_domain_id(),
        "`{id}` names the trust domain itself, not a workload"
    );
    let not_before = to_offset(now - CLOCK_SKEW);
    let not_after = to_offset((now + ttl).min(issuer.info.not_after));
    ensure!(
        not_after > to_offset(now),
        "issuer `{}` expired at {}",
        issuer.info.subject,
        humantime::format_rfc3339_seconds(issuer.info.not_after)
    );
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    // No subject name: the identity is the URI SAN alone, so nothing else can be mistaken for it.
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(random_serial());
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &issuer.signer()?)?;
    let pkcs8 = key.serialize_der();
    Ok(IssuedLeaf {
        cert: cert.der().clone(),
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8)),
        not_before: not_before.into(),
        not_after: not_after.into(),
    })
}

/// Every `CERTIFICATE` in a PEM blob, in order. Other sections are an error: a bundle holding
/// a private key is a leak waiting to happen.
pub fn parse_certs_pem(pem: &[u8]) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let mut certs = Vec::new();
    for section in <(SectionKind, Vec<u8>)>::pem_slice_iter(pem) {
        let (kind, der) = section.map_err(|e| anyhow::anyhow!("bad PEM: {e}"))?;
        match kind {
            SectionKind::Certificate => certs.push(CertificateDer::from(der)),
            other => {
                let mut der = der;
                der.zeroize();
                bail!("unexpected PEM section {other:?}; only CERTIFICATE sections belong here")
            }
        }
    }
    Ok(certs)
}

/// Exactly one `CERTIFICATE` followed by one PKCS#8 `PRIVATE KEY`.
pub fn parse_cert_and_key_pem(
    pem: &[u8],
) -> anyhow::Result<(CertificateDer<'static>, PrivatePkcs8KeyDer<'static>)> {
    let mut sections = Vec::new();
    for section in <(SectionKind, Vec<u8>)>::pem_slice_iter(pem) {
        sections.push(section.map_err(|e| anyhow::anyhow!("bad PEM: {e}"))?);
    }
    let kinds: Vec<SectionKind> = sections.iter().map(|(k, _)| *k).collect();
    let result = match sections.as_mut_slice() {
        [
            (SectionKind::Certificate, cert),
            (SectionKind::PrivateKey, key),
        ] => Ok((
            CertificateDer::from(std::mem::take(cert)),
            PrivatePkcs8KeyDer::from(std::mem::take(key)),
        )),
        _ if kinds.contains(&SectionKind::EcPrivateKey) => Err(anyhow::anyhow!(
            "the key is a SEC1 `EC PRIVATE KEY`; convert it to PKCS#8 \
             (`openssl pkcs8 -topk8 -nocrypt`)"
        )),
        _ => Err(anyhow::anyhow!(
            "expected one CERTIFICATE followed by one PRIVATE KEY, found {kinds:?}"
        )),
    };
    for (_, der) in &mut sections {
        der.zeroize();
    }
    result
}

/// The one PKCS#8 `PRIVATE KEY` of a PEM blob (the layout of `anchor.key`).
pub fn parse_key_pem(pem: &[u8]) -> anyhow::Result<PrivatePkcs8KeyDer<'static>> {
    let mut keys = Vec::new();
    for section in <(SectionKind, Vec<u8>)>::pem_slice_iter(pem) {
        let (kind, der) = section.map_err(|e| anyhow::anyhow!("bad PEM: {e}"))?;
        match kind {
            SectionKind::PrivateKey => keys.push(PrivatePkcs8KeyDer::from(der)),
            other => bail!("unexpected PEM section {other:?}; expected one PKCS#8 PRIVATE KEY"),
        }
    }
    match keys.len() {
        1 => Ok(keys.pop().expect("one key")),
        n => {
            keys.iter_mut().for_each(Zeroize::zeroize);
            bail!("expected one PRIVATE KEY, found {n}")
        }
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn pem_encode_into(out: &mut String, label: &str, der: &[u8]) {
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    let mut line_len = 0;
    for chunk in der.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            let c = if i <= chunk.len() {
                B64[((n >> (18 - 6 * i)) & 63) as usize] as char
            } else {
                '='
            };
            out.push(c);
        }
        line_len += 4;
        if line_len == 64 {
            out.push('\n');
            line_len = 0;
        }
    }
    if line_len > 0 {
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
}

/// Exact length of [`pem_encode`]'s output.
fn pem_len(label: &str, der_len: usize) -> usize {
    let b64 = der_len.div_ceil(3) * 4;
    let header = "-----BEGIN -----\n".len() + label.len();
    let footer = "-----END -----\n".len() + label.len();
    header + b64 + b64.div_ceil(64) + footer
}

/// RFC 7468 PEM (64-column base64). pki-types only decodes PEM, and this is all we need.
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    let mut out = String::with_capacity(pem_len(label, der.len()));
    pem_encode_into(&mut out, label, der);
    out
}

/// Like [`pem_encode`] for secrets: the buffer is sized exactly, so no reallocation leaves a
/// stray copy behind, and it is wiped on drop.
pub fn pem_encode_secret(label: &str, der: &[u8]) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::with_capacity(pem_len(label, der.len())));
    pem_encode_into(&mut out, label, der);
    debug_assert_eq!(out.len(), pem_len(label, der.len()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        "example.org".parse().unwrap()
    }

    #[test]
    fn pem_round_trips() {
        for len in [0usize, 1, 2, 3, 47, 48, 49, 100, 1000] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let pem = pem_encode("CERTIFICATE", &data);
            assert!(pem.lines().all(|l| l.len() <= 64), "{pem}");
            assert_eq!(pem.len(), pem_len("CERTIFICATE", len));
            if len > 0 {
                let back = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
                assert_eq!(back.as_ref(), data.as_slice(), "len {len}");
            }
        }
    }

    #[test]
    fn sha256_matches_known_vector() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn anchor_issuer_leaf_profiles() {
        let now = SystemTime::now();
        let anchor = new_trust_anchor(&td(), DEFAULT_ANCHOR_VALIDITY, now).unwrap();
        let a = anchor.info();
        assert!(a.is_ca && a.self_issued);
        assert!(
            a.subject.contains("mesh trust anchor example.org"),
            "{}",
            a.subject
        );
        assert!(a.subject.contains("O=mesh-agent"), "{}", a.subject);
        assert_eq!(
            a.spiffe_id.as_ref().unwrap().to_string(),
            "spiffe://example.org"
        );
        assert!(a.subject_key_id.is_some());
        assert_eq!(a.serial_hex.len(), 32);
        assert_eq!(a.sha256_fingerprint.len(), 64);
        let parsed = parse(anchor.cert()).unwrap();
        let bc = parsed.basic_constraints().unwrap().unwrap().value;
        assert_eq!(bc.path_len_constraint, Some(1));
        let ku = parsed.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign() && !ku.digital_signature());
        assert!(a.not_before <= now - CLOCK_SKEW + Duration::from_secs(1));
        let validity = a.not_after.duration_since(now).unwrap();
        assert!(
            validity
                .as_secs()
                .abs_diff(DEFAULT_ANCHOR_VALIDITY.as_secs())
                <= 1
        );

        let issuer = new_issuer(&anchor, DEFAULT_ISSUER_VALIDITY, now).unwrap();
        let i = issuer.info();
        assert!(i.is_ca && !i.self_issued);
        assert_eq!(i.issuer, a.subject);
        assert_eq!(i.authority_key_id, a.subject_key_id);
        assert_eq!(i.spiffe_id, a.spiffe_id);
        let parsed = parse(issuer.cert()).unwrap();
        assert_eq!(
            parsed
                .basic_constraints()
                .unwrap()
                .unwrap()
                .value
                .path_len_constraint,
            Some(0)
        );
        assert!(parsed.key_usage().unwrap().unwrap().value.key_cert_sign());
        parsed
            .verify_signature(Some(parse(anchor.cert()).unwrap().public_key()))
            .unwrap();

        let id: SpiffeId = "spiffe://example.org/aws/111122223333/role/orders"
            .parse()
            .unwrap();
        let leaf = new_workload_leaf(&issuer, &id, DEFAULT_LEAF_TTL, now).unwrap();
        let l = inspect(&leaf.cert).unwrap();
        assert!(!l.is_ca);
        assert_eq!(l.spiffe_id.as_ref(), Some(&id));
        assert_eq!(l.subject, "");
        assert_eq!(l.issuer, i.subject);
        assert_eq!(l.authority_key_id, i.subject_key_id);
        assert_eq!(l.not_before, leaf.not_before);
        assert_eq!(l.not_after, leaf.not_after);
        let parsed = parse(&leaf.cert).unwrap();
        assert!(!parsed.basic_constraints().unwrap().unwrap().value.ca);
        let ku = parsed.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && !ku.key_cert_sign());
        let eku = parsed.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let san = parsed.subject_alternative_name().unwrap().unwrap();
        assert!(
            san.critical,
            "SAN must be critical when the subject is empty"
        );
        // Serials are random, not derived from anything predictable.
        let again = new_workload_leaf(&issuer, &id, DEFAULT_LEAF_TTL, now).unwrap();
        assert_ne!(inspect(&again.cert).unwrap().serial_hex, l.serial_hex);
    }

    #[test]
    fn lifetimes_are_clamped_to_the_signer() {
        let now = SystemTime::now();
        let anchor = new_trust_anchor(&td(), Duration::from_secs(3600), now).unwrap();
        let issuer = new_issuer(&anchor, DEFAULT_ISSUER_VALIDITY, now).unwrap();
        assert_eq!(issuer.info().not_after, anchor.info().not_after);
        let id: SpiffeId = "spiffe://example.org/w".parse().unwrap();
        let leaf = new_workload_leaf(&issuer, &id, DEFAULT_LEAF_TTL, now).unwrap();
        assert_eq!(leaf.not_after, issuer.info().not_after);

        let later = now + Duration::from_secs(7200);
        let err = new_issuer(&anchor, DEFAULT_ISSUER_VALIDITY, later).unwrap_err();
        assert!(err.to_string().contains("expired"), "{err}");
        let err = new_workload_leaf(&issuer, &id, DEFAULT_LEAF_TTL, later).unwrap_err();
        assert!(err.to_string().contains("expired"), "{err}");
        let err = new_workload_leaf(&issuer, &td().id(), DEFAULT_LEAF_TTL, now).unwrap_err();
        assert!(err.to_string().contains("trust domain itself"), "{err}");
    }

    #[test]
    fn long_trust_domains_keep_names_within_bounds() {
        let long: TrustDomain = format!("{}.example.org", "a".repeat(80)).parse().unwrap();
        let anchor = new_trust_anchor(&long, DEFAULT_ANCHOR_VALIDITY, SystemTime::now()).unwrap();
        let subject = anchor.info().subject.clone();
        let cn = subject.split("CN=").nth(1).unwrap();
        assert!(cn.starts_with("mesh trust anchor 2"), "{subject}");
        assert!(cn.len() <= MAX_CN_LEN, "{subject}");
        assert_eq!(anchor.info().trust_domain(), Some(&long));
    }

    #[test]
    fn signing_ca_checks_key_and_role() {
        let now = SystemTime::now();
        let anchor = new_trust_anchor(&td(), DEFAULT_ANCHOR_VALIDITY, now).unwrap();
        let other = new_trust_anchor(&td(), DEFAULT_ANCHOR_VALIDITY, now).unwrap();
        let other_key = parse_key_pem(other.key_pem().as_bytes()).unwrap();
        let err = SigningCa::new(anchor.cert().clone(), &other_key).unwrap_err();
        assert!(err.to_string().contains("does not belong"), "{err}");

        // A leaf with its own key is not a CA.
        let issuer = new_issuer(&anchor, DEFAULT_ISSUER_VALIDITY, now).unwrap();
        let leaf = new_workload_leaf(
            &issuer,
            &"spiffe://example.org/w".parse().unwrap(),
            DEFAULT_LEAF_TTL,
            now,
        )
        .unwrap();
        let PrivateKeyDer::Pkcs8(leaf_key) = &leaf.key else {
            panic!("pkcs8")
        };
        let err = SigningCa::new(leaf.cert.clone(), leaf_key).unwrap_err();
        assert!(err.to_string().contains("not a CA"), "{err}");

        // PEM round trip of cert + key.
        let pem = issuer.cert_and_key_pem();
        let back = SigningCa::from_pem(pem.as_bytes()).unwrap();
        assert_eq!(back.info(), issuer.info());
    }

    #[test]
    fn pem_layout_is_strict() {
        let now = SystemTime::now();
        let anchor = new_trust_anchor(&td(), DEFAULT_ANCHOR_VALIDITY, now).unwrap();
        let key_then_cert = format!("{}{}", anchor.key_pem().as_str(), anchor.cert_pem());
        let err = parse_cert_and_key_pem(key_then_cert.as_bytes()).unwrap_err();
        assert!(
            err.to_string()
                .contains("one CERTIFICATE followed by one PRIVATE KEY"),
            "{err}"
        );
        let err = parse_cert_and_key_pem(anchor.cert_pem().as_bytes()).unwrap_err();
        assert!(err.to_string().contains("[Certificate]"), "{err}");
        let sec1 = pem_encode("EC PRIVATE KEY", b"x");
        let err =
            parse_cert_and_key_pem(format!("{}{sec1}", anchor.cert_pem()).as_bytes()).unwrap_err();
        assert!(err.to_string().contains("PKCS#8"), "{err}");
        let err = parse_certs_pem(anchor.cert_and_key_pem().as_bytes()).unwrap_err();
        assert!(err.to_string().contains("only CERTIFICATE"), "{err}");
        assert_eq!(
            parse_certs_pem(format!("{}{}", anchor.cert_pem(), anchor.cert_pem()).as_bytes())
                .unwrap()
                .len(),
            2
        );
        let err = parse_key_pem(anchor.cert_pem().as_bytes()).unwrap_err();
        assert!(err.to_string().contains("expected one PKCS#8"), "{err}");
    }
}
