//! The trust material an agent holds: the bundle of trust anchors (public) and the issuer
//! (certificate + private key, secret), and minting workload certificates with them.
//!
//! rustls and webpki never look at a trust anchor's validity period, so the agent checks anchor
//! and issuer expiry itself, refuses material that is already expired, and reports what expires
//! soon, loudly. Loading also mints a probe certificate and verifies it with webpki exactly as a
//! peer would, so material that peers would reject is refused here, not discovered in production
//! handshakes.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail, ensure};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, TrustAnchor, UnixTime};
use webpki::{EndEntityCert, KeyUsage};
use zeroize::{Zeroize, Zeroizing};

use super::certs::{self, CertInfo, SigningCa};
use super::spiffe::{SpiffeId, TrustDomain, spiffe_id_of_cert};

/// How far ahead expiry becomes a warning: a month leaves time for a calm rotation.
pub const EXPIRY_WARNING_WINDOW: Duration = Duration::from_secs(30 * 24 * 3600);

/// Only what this module issues. Accepting more algorithms would only widen what a forged or
/// foreign chain could use.
static SIG_ALGS: &[&dyn rustls_pki_types::SignatureVerificationAlgorithm] =
    &[webpki::ring::ECDSA_P256_SHA256];

fn fmt_time(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn unix_time(t: SystemTime) -> anyhow::Result<UnixTime> {
    let since = t
        .duration_since(UNIX_EPOCH)
        .map_err(|_| anyhow!("time before 1970"))?;
    Ok(UnixTime::since_unix_epoch(since))
}

/// One trust anchor of a bundle.
#[derive(Debug, Clone)]
pub struct Anchor {
    pub der: CertificateDer<'static>,
    pub info: CertInfo,
}

/// Which side of a TLS connection presented the chain being verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRole {
    /// A connecting peer (checked for the clientAuth EKU).
    Client,
    /// An accepting peer (checked for the serverAuth EKU).
    Server,
}

/// The trust anchors agents accept (`bundle.pem`): one normally, two during a rotation.
#[derive(Debug, Clone)]
pub struct TrustBundle {
    anchors: Vec<Anchor>,
    webpki_anchors: Vec<TrustAnchor<'static>>,
    trust_domain: TrustDomain,
    source: String,
}

impl TrustBundle {
    /// Loads a PEM file of one or more self-signed CA certificates of one trust domain.
    pub fn load(path: &Path) -> anyhow::Result<TrustBundle> {
        let pem = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        TrustBundle::from_pem(&pem, &path.display().to_string())
    }

    /// `source` names the bundle in messages (usually its path).
    pub fn from_pem(pem: &[u8], source: &str) -> anyhow::Result<TrustBundle> {
        let certs =
            certs::parse_certs_pem(pem).with_context(|| format!("trust bundle {source}"))?;
        TrustBundle::from_certs(certs, source)
    }

    pub fn from_certs(
        certs: Vec<CertificateDer<'static>>,
        source: &str,
    ) -> anyhow::Result<TrustBundle> {
        ensure!(
            !certs.is_empty(),
            "trust bundle {source} contains no certificate"
        );
        let mut anchors: Vec<Anchor> = Vec::with_capacity(certs.len());
        let mut webpki_anchors = Vec::with_capacity(certs.len());
        let mut trust_domain: Option<TrustDomain> = None;
        for (n, cert) in certs.into_iter().enumerate() {
            let what = format!("certificate #{} of trust bundle {source}", n + 1);
            let info = certs::inspect(&cert).with_context(|| what.clone())?;
            let parsed = certs::parse(&cert)?;
            ensure!(info.is_ca, "{what} (`{}`) is not a CA", info.subject);
            ensure!(
                info.self_issued && parsed.verify_signature(None).is_ok(),
                "{what} (`{}`) is not self-signed; a bundle holds only trust anchors (roots), \
                 not issuers",
                info.subject
            );
            let td = match &info.spiffe_id {
                Some(id) if id.is_trust_domain_id() => id.trust_domain().clone(),
                _ => bail!(
                    "{what} (`{}`) does not name its trust domain (URI SAN `spiffe://<td>`)",
                    info.subject
                ),
            };
            if let Some(expected) = &trust_domain {
                ensure!(
                    *expected == td,
                    "{what} (`{}`) is for trust domain `{td}` but the bundle's first anchor is \
                     for `{expected}`",
                    info.subject
                );
            }
            trust_domain = Some(td);
            if anchors
                .iter()
                .any(|a| a.info.sha256_fingerprint == info.sha256_fingerprint)
            {
                bail!("{what} (`{}`) appears twice", info.subject);
            }
            webpki_anchors.push(
                webpki::anchor_from_trusted_cert(&cert)
                    .map_err(|e| anyhow!("{what}: not usable as a trust anchor: {e}"))?
                    .to_owned(),
            );
            anchors.push(Anchor { der: cert, info });
        }
        Ok(TrustBundle {
            anchors,
            webpki_anchors,
            trust_domain: trust_domain.expect("at least one anchor"),
            source: source.to_string(),
        })
    }

    pub fn anchors(&self) -> &[Anchor] {
        &self.anchors
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// Where the bundle came from (its path), for messages.
    pub fn source(&self) -> &str {
        &self.source
    }

    #[cfg(test)]
    /// The anchors as a rustls root store (for rustls' own verifiers).
    pub fn roots(&self) -> rustls::RootCertStore {
        rustls::RootCertStore {
            roots: self.webpki_anchors.clone(),
        }
    }

    /// The anchors as webpki trust anchors (for custom verifiers).
    pub fn trust_anchors(&self) -> &[TrustAnchor<'static>] {
        &self.webpki_anchors
    }

    #[cfg(test)]
    /// The bundle as PEM, anchors in order.
    pub fn to_pem(&self) -> String {
        self.anchors
            .iter()
            .map(|a| certs::pem_encode("CERTIFICATE", &a.der))
            .collect()
    }

    /// The anchor that signed `cert` (matching name and a verifying signature), if any.
    pub fn signer_of(&self, cert: &CertificateDer<'_>) -> Option<&Anchor> {
        let child = certs::parse(cert).ok()?;
        self.anchors.iter().find(|a| {
            let Ok(anchor) = certs::parse(&a.der) else {
                return false;
            };
            anchor.subject().as_raw() == child.issuer().as_raw()
                && child.verify_signature(Some(anchor.public_key())).is_ok()
        })
    }

    /// Verifies a peer's chain (leaf first, then intermediates) at `now` against these anchors,
    /// for the given role, and returns the peer's SPIFFE id, which must be in this trust domain.
    pub fn verify_peer(
        &self,
        chain: &[CertificateDer<'_>],
        role: PeerRole,
        now: SystemTime,
    ) -> anyhow::Result<SpiffeId> {
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or_else(|| anyhow!("the peer presented no certificate"))?;
        let ee = EndEntityCert::try_from(leaf).map_err(|e| anyhow!("peer certificate: {e}"))?;
        let usage = match role {
            PeerRole::Client => KeyUsage::client_auth(),
            PeerRole::Server => KeyUsage::server_auth(),
        };
        ee.verify_for_usage(
            SIG_ALGS,
            &self.webpki_anchors,
            intermediates,
            unix_time(now)?,
            usage,
            None,
            None,
        )
        .map_err(|e| anyhow!("peer certificate chain does not verify: {e}"))?;
        let id = spiffe_id_of_cert(leaf)?;
        ensure!(
            id.trust_domain() == &self.trust_domain,
            "peer identity `{id}` is not in trust domain `{}`",
            self.trust_domain
        );
        ensure!(
            !id.is_trust_domain_id(),
            "peer presented the trust domain id `{id}` instead of a workload id"
        );
        Ok(id)
    }
}

/// Refuses a secret file that anyone but its owner can read. There is no override: a leaked
/// issuer key lets its holder mint any identity of the trust domain.
pub fn check_secret_file_mode(path: &Path) -> anyhow::Result<()> {
    let meta = fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    let mode = meta.mode() & 0o777;
    ensure!(
        mode & 0o077 == 0,
        "{} is readable by group or others (mode {mode:04o}) but holds a private key: \
         run `chmod 600 {}`",
        path.display(),
        path.display()
    );
    Ok(())
}

/// The issuer: an intermediate CA certificate and its key, checked against a bundle.
#[derive(Debug)]
pub struct Issuer {
    ca: SigningCa,
    anchor_fingerprint: String,
    source: String,
}

impl Issuer {
    /// Loads `issuer.pem` (certificate, then PKCS#8 key) and checks it against `bundle`.
    /// One file, so that one atomic rename replaces certificate and key together.
    pub fn load(path: &Path, bundle: &TrustBundle) -> anyhow::Result<Issuer> {
        check_secret_file_mode(path)?;
        let pem =
            Zeroizing::new(fs::read(path).with_context(|| format!("reading {}", path.display()))?);
        Issuer::from_pem(&pem, &path.display().to_string(), bundle)
    }

    pub fn from_pem(pem: &[u8], source: &str, bundle: &TrustBundle) -> anyhow::Result<Issuer> {
        let ca = SigningCa::from_pem(pem).with_context(|| format!("issuer {source}"))?;
        Issuer::new(ca, source, bundle)
    }

    /// Checks that `ca` is an issuer of the bundle's trust domain signed by one of its anchors.
    pub fn new(ca: SigningCa, source: &str, bundle: &TrustBundle) -> anyhow::Result<Issuer> {
        let info = ca.info();
        match &info.spiffe_id {
            Some(id) if id.is_trust_domain_id() => ensure!(
                id.trust_domain() == bundle.trust_domain(),
                "issuer {source} (`{}`) is for trust domain `{}` but bundle {} is for `{}`",
                info.subject,
                id.trust_domain(),
                bundle.source(),
                bundle.trust_domain()
            ),
            _ => bail!(
                "issuer {source} (`{}`) does not name its trust domain (URI SAN `spiffe://<td>`)",
                info.subject
            ),
        }
        ensure!(
            !info.self_issued,
            "issuer {source} (`{}`) is a self-signed root; agents need an issuer signed by an \
             anchor (`mesh-agent trust renew-issuer`)",
            info.subject
        );
        let anchor = bundle.signer_of(ca.cert()).ok_or_else(|| {
            let anchors: Vec<String> = bundle
                .anchors()
                .iter()
                .map(|a| format!("`{}` ({})", a.info.subject, a.info.short_fingerprint()))
                .collect();
            anyhow!(
                "issuer {source} (`{}`, issued by `{}`) is not signed by any anchor of {}: {}",
                info.subject,
                info.issuer,
                bundle.source(),
                anchors.join(", ")
            )
        })?;
        Ok(Issuer {
            anchor_fingerprint: anchor.info.sha256_fingerprint.clone(),
            ca,
            source: source.to_string(),
        })
    }

    pub fn info(&self) -> &CertInfo {
        self.ca.info()
    }

    pub fn cert(&self) -> &CertificateDer<'static> {
        self.ca.cert()
    }

    /// Fingerprint of the bundle anchor this issuer chains to.
    pub fn anchor_fingerprint(&self) -> &str {
        &self.anchor_fingerprint
    }

    pub fn source(&self) -> &str {
        &self.source
    }
}

/// A private key wiped from memory when dropped (pki-types keys only zeroize on request).
struct SecretKey(PrivateKeyDer<'static>);

impl Drop for SecretKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// A workload's certificate chain and key, minted in memory for one SPIFFE id.
pub struct WorkloadCert {
    pub id: SpiffeId,
    /// Leaf, then the issuer: peers hold only anchors, so the intermediate travels along.
    pub chain: Vec<CertificateDer<'static>>,
    key: SecretKey,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl std::fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("id", &self.id)
            .field("not_before", &fmt_time(self.not_before))
            .field("not_after", &fmt_time(self.not_after))
            .field("key", &"[secret]")
            .finish()
    }
}

impl WorkloadCert {
    #[cfg(test)]
    /// A copy of the private key (for rustls, which takes ownership). Unlike the original, the
    /// copy is not wiped on drop; prefer [`WorkloadCert::certified_key`], which hands rustls a
    /// parsed signing key without copying the DER.
    pub fn key(&self) -> PrivateKeyDer<'static> {
        self.key.0.clone_key()
    }

    /// The half-life point: renewing there leaves the other half of the lifetime to retry in.
    pub fn renew_at(&self) -> SystemTime {
        let lifetime = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + lifetime / 2
    }

    #[cfg(test)]
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now <= self.not_after
    }

    /// The chain and key in the form rustls serves them.
    pub fn certified_key(&self) -> anyhow::Result<Arc<rustls::sign::CertifiedKey>> {
        let signer = rustls::crypto::ring::sign::any_ecdsa_type(&self.key.0)
            .map_err(|e| anyhow!("workload key for `{}`: {e}", self.id))?;
        Ok(Arc::new(rustls::sign::CertifiedKey::new(
            self.chain.clone(),
            signer,
        )))
    }
}

/// The agent's signing authority: a bundle and an issuer that chains to it, both checked.
#[derive(Debug)]
pub struct Authority {
    bundle: TrustBundle,
    issuer: Issuer,
}

impl Authority {
    /// Loads `bundle.pem` and `issuer.pem` and checks them at `now` (see [`Authority::new`]).
    pub fn load(bundle_path: &Path, issuer_path: &Path, now: SystemTime) -> anyhow::Result<Self> {
        let bundle = TrustBundle::load(bundle_path)?;
        let issuer = Issuer::load(issuer_path, &bundle)?;
        Authority::new(bundle, issuer, now)
    }

    /// Refuses material that is useless at `now`: every anchor expired, the issuer's own anchor
    /// expired, the issuer expired or not yet valid. An expired anchor next to a valid one is
    /// the tail of a rotation: a warning only. Finally mints a probe certificate and verifies it
    /// as a peer would.
    pub fn new(bundle: TrustBundle, issuer: Issuer, now: SystemTime) -> anyhow::Result<Self> {
        let describe = |a: &Anchor| {
            format!(
                "`{}` ({}, notAfter {})",
                a.info.subject,
                a.info.short_fingerprint(),
                fmt_time(a.info.not_after)
            )
        };
        let (expired, current): (Vec<&Anchor>, Vec<&Anchor>) = bundle
            .anchors()
            .iter()
            .partition(|a| a.info.not_after < now);
        if current.is_empty() {
            bail!(
                "every trust anchor in {} has expired: {}. The mesh cannot authenticate until a \
                 new anchor is created and distributed (docs/identity.md, \"Emergency rotation\")",
                bundle.source(),
                expired
                    .iter()
                    .map(|a| describe(a))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        for a in &expired {
            tracing::warn!(
                bundle = bundle.source(),
                "expired trust anchor {} is still in the bundle; finish the rotation \
                 (`mesh-agent trust rotate`) to drop it",
                describe(a)
            );
        }
        let info = issuer.info();
        ensure!(
            info.not_before <= now,
            "issuer {} (`{}`) is not valid before {}; is this node's clock behind?",
            issuer.source(),
            info.subject,
            fmt_time(info.not_before)
        );
        ensure!(
            now <= info.not_after,
            "issuer {} (`{}`) expired at {}: run `mesh-agent trust renew-issuer` and distribute \
             the new issuer.pem",
            issuer.source(),
            info.subject,
            fmt_time(info.not_after)
        );
        if let Some(a) = expired
            .iter()
            .find(|a| a.info.sha256_fingerprint == issuer.anchor_fingerprint())
        {
            bail!(
                "issuer {} (`{}`) chains to trust anchor {}, which has expired: issue a new \
                 issuer from the current anchor (`mesh-agent trust renew-issuer`)",
                issuer.source(),
                info.subject,
                describe(a)
            );
        }
        let authority = Authority { bundle, issuer };
        authority.self_check(now)?;
        Ok(authority)
    }

    fn self_check(&self, now: SystemTime) -> anyhow::Result<()> {
        let probe = SpiffeId::from_segments(self.trust_domain(), &["mesh-agent", "self-check"])?;
        let cert = self.mint(&probe, Duration::from_secs(600), now)?;
        for role in [PeerRole::Client, PeerRole::Server] {
            let id = self
                .bundle
                .verify_peer(&cert.chain, role, now)
                .with_context(|| {
                    format!(
                        "self-check: a certificate minted with issuer {} does not verify against \
                         {}",
                        self.issuer.source(),
                        self.bundle.source()
                    )
                })?;
            ensure!(
                id == probe,
                "self-check: minted `{probe}` but verified `{id}`"
            );
        }
        Ok(())
    }

    /// Mints a certificate for `id`, valid from `now` minus clock skew until `now + ttl` or the
    /// issuer's notAfter, whichever comes first. Only ids of the bundle's trust domain: anything
    /// else would be rejected by every peer anyway, and minting it would hide a config error.
    pub fn mint(
        &self,
        id: &SpiffeId,
        ttl: Duration,
        now: SystemTime,
    ) -> anyhow::Result<WorkloadCert> {
        ensure!(
            id.trust_domain() == self.trust_domain(),
            "`{id}` is not in trust domain `{}`; this agent only mints identities of its own \
             trust domain",
            self.trust_domain()
        );
        let leaf = certs::new_workload_leaf(&self.issuer.ca, id, ttl, now)
            .with_context(|| format!("minting a certificate for `{id}`"))?;
        Ok(WorkloadCert {
            id: id.clone(),
            chain: vec![leaf.cert, self.issuer.cert().clone()],
            key: SecretKey(leaf.key),
            not_before: leaf.not_before,
            not_after: leaf.not_after,
        })
    }

    pub fn bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    /// True when both hold the same anchors (in order) and the same issuer certificate: a
    /// reload that finds this has nothing to do.
    pub fn same_material(&self, other: &Authority) -> bool {
        let fingerprints = |a: &Authority| -> Vec<String> {
            a.bundle
                .anchors()
                .iter()
                .map(|x| x.info.sha256_fingerprint.clone())
                .chain([a.issuer.info().sha256_fingerprint.clone()])
                .collect()
        };
        fingerprints(self) == fingerprints(other)
    }

    #[cfg(test)]
    pub fn issuer(&self) -> &Issuer {
        &self.issuer
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        self.bundle.trust_domain()
    }

    /// (fingerprint, notAfter) of each anchor, for the `mesh_trust_anchor_expiry_timestamp_seconds`
    /// metric.
    pub fn anchor_expiries(&self) -> Vec<(String, SystemTime)> {
        self.bundle
            .anchors()
            .iter()
            .map(|a| (a.info.sha256_fingerprint.clone(), a.info.not_after))
            .collect()
    }

    pub fn issuer_not_after(&self) -> SystemTime {
        self.issuer.info().not_after
    }

    /// Fingerprint of the anchor the issuer chains to.
    pub fn issuer_anchor_fingerprint(&self) -> &str {
        self.issuer.anchor_fingerprint()
    }

    /// One message per anchor or issuer that is expired or expires soon, each saying what to
    /// run. "Soon" is within `within` of `now`, but never more than the last third of the
    /// certificate's own lifetime: a 30-day issuer would otherwise warn from the moment it is
    /// installed, and a warning that is always on is one nobody reads. Meant to be logged at
    /// warn/error level and repeated, not logged once and forgotten.
    pub fn expiry_warnings(&self, now: SystemTime, within: Duration) -> Vec<String> {
        let mut out = Vec::new();
        for a in self.bundle.anchors() {
            let signs_issuer = a.info.sha256_fingerprint == self.issuer.anchor_fingerprint();
            let when = fmt_time(a.info.not_after);
            let days = a.info.days_left(now);
            let name = format!(
                "trust anchor `{}` ({}) in {}",
                a.info.subject,
                a.info.short_fingerprint(),
                self.bundle.source()
            );
            if a.info.not_after < now {
                out.push(format!(
                    "{name} EXPIRED at {when} ({} ago); drop it by finishing the rotation: \
                     `mesh-agent trust rotate`",
                    plural_days(-days)
                ));
            } else if expires_soon(&a.info, now, within) {
                let action = if signs_issuer {
                    "it signs the current issuer: start the anchor rotation now with \
                     `mesh-agent trust rotate` (docs/identity.md, \"Quarterly anchor rotation\")"
                } else {
                    "the issuer already chains to another anchor: finish the rotation with \
                     `mesh-agent trust rotate`"
                };
                out.push(format!(
                    "{name} expires in {} (at {when}); {action}",
                    plural_days(days)
                ));
            }
        }
        let info = self.issuer.info();
        if expires_soon(info, now, within) {
            out.push(format!(
                "issuer `{}` in {} expires in {} (at {}): run `mesh-agent trust renew-issuer` \
                 and distribute the new issuer.pem to every agent",
                info.subject,
                self.issuer.source(),
                plural_days(info.days_left(now)),
                fmt_time(info.not_after)
            ));
        }
        out
    }
}

/// The renewal window of a certificate: the last third of its lifetime, capped at `within`.
pub fn renewal_window(info: &CertInfo, within: Duration) -> Duration {
    let lifetime = info
        .not_after
        .duration_since(info.not_before)
        .unwrap_or_default();
    within.min(lifetime / 3)
}

fn expires_soon(info: &CertInfo, now: SystemTime, within: Duration) -> bool {
    info.remaining(now) <= renewal_window(info, within)
}

fn plural_days(n: i64) -> String {
    if n == 1 {
        "1 day".to_string()
    } else {
        format!("{n} days")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::identity::certs::{
        DEFAULT_ANCHOR_VALIDITY, DEFAULT_ISSUER_VALIDITY, DEFAULT_LEAF_TTL, new_issuer,
        new_trust_anchor,
    };

    const DAY: Duration = Duration::from_secs(86_400);

    fn td() -> TrustDomain {
        "example.org".parse().unwrap()
    }

    fn id(path: &str) -> SpiffeId {
        format!("spiffe://example.org{path}").parse().unwrap()
    }

    fn bundle_of(anchors: &[&SigningCa]) -> TrustBundle {
        let pem: String = anchors.iter().map(|a| a.cert_pem()).collect();
        TrustBundle::from_pem(pem.as_bytes(), "test-bundle").unwrap()
    }

    fn authority(anchor: &SigningCa, bundle: &TrustBundle, now: SystemTime) -> Authority {
        let issuer = new_issuer(anchor, DEFAULT_ISSUER_VALIDITY, now).unwrap();
        let issuer = Issuer::new(issuer, "test-issuer", bundle).unwrap();
        Authority::new(bundle.clone(), issuer, now).unwrap()
    }

    /// A unique scratch directory under the system temp dir, removed on drop.
    pub(crate) struct TempDir(pub std::path::PathBuf);

    impl TempDir {
        pub(crate) fn new(tag: &str) -> TempDir {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!(
                "mesh-identity-{tag}-{}-{n}-{}",
                std::process::id(),
                fastrand::u64(..)
            ));
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn minted_chain_verifies_for_both_roles_and_expires() {
        let now = SystemTime::now();
        let anchor = new_trust_anchor(&td(), DEFAULT_ANCHOR_VALIDITY, now).unwrap();
        let bundle = bundle_of(&[&anchor]);
        let auth = authority(&anchor, &bundle, now);
        let orders = id("/aws/111122223333/role/orders");
        let cert = auth.mint(&orders, DEFAULT_LEAF_TTL, now).unwrap();
        assert_eq!(cert.chain.len(), 2);
        assert_eq!(cert.id, orders);
        for role in [PeerRole::Client, PeerRole::Server] {
            assert_eq!(bundle.verify_peer(&cert.chain, role, now).unwrap(), orders);
        }
        // Also through rustls' root store type, as rustls' verifiers would use it.
        assert_eq!(bundle.roots().len(), 1);
        let after = cert.not_after + Duration::from_secs(1);
        let err = bundle
            .verify_peer(&cert.chain, PeerRole::Client, after)
            .unwrap_err();
        assert!(format!("{err:#}").contains("Expired"), "{err:#}");
        // Without the intermediate the chain is incomplete.
        assert!(
            bundle
                .verify_peer(&cert.chain[..1], PeerRole::Server, now)
                .is_err()
        );
        // Key and chain are usable by rustls.
        let ck = cert.certified_key().unwrap();
        ck.keys_match().unwrap();
        assert!(matches!(cert.key(), PrivateKeyDer::Pkcs8(_)));
        assert!(cert.is_valid_at(now) && !cert.is_valid_at(after));
        assert!(!format!("{cert:?}").contains("Pkcs8"));
    }

    #[test]
    fn renew_at_is_the_half_life() {
        let now = SystemTime::now();
        let anchor = new_trust_anchor(&td(), DEFAULT_ANCHOR_VALIDITY, now).unwrap();
        let auth = authority(&anchor, &bundle_of(&[&anchor]), now);
        let cert = auth.mint(&id("/w"), DEFAULT_LEAF_TTL, now).unwrap();
        let half = (cert.not_after.duration_since(cert.not_before).unwrap()) / 2;
        assert_eq!(cert.renew_at(), cert.not_before + half);
        assert!(cert.renew_at() > now + DEFAULT_LEAF_TTL / 2 - certs::CLOCK_SKEW);
    }

    #[test]
    fn leaf_is_clamped_to_issuer_expiry() {
        let now = SystemTime::now();
        let anchor = new_trust_anchor(&td(), DEFAULT_ANCHOR_VALIDITY, now).unwrap();
        let bundle = bundle_of(&[&anchor]);
        let issuer = new_issuer(&anchor, Duration::from_secs(3600), now).unwrap();
        let issuer_not_after = issuer.info().not_after;
        let auth = Authority::new(
            bundle.clone(),
            Issuer::new(issuer, "i", &bundle).unwrap(),
            now,
        )
        .unwrap();
        let cert = auth.mint(&id("/w"), DEFAULT_LEAF_TTL, now).unwrap();
        assert_eq!(cert.not_after, issuer_not_after);
        assert_eq!(auth.issuer_not_after(), issuer_not_after);
        assert!(
            bundle
                .verify_peer(&cert.chain, PeerRole::Client, now)
                .is_ok()
        );
    }

    #[test]
    fn other_trust_domain_is_refused() {
        let now = SystemTime::now();
        let anchor = new_trust_anchor(&td(), DEFAULT_ANCHOR_VALIDITY, now).unwrap();
        let auth = authority(&anchor, &bundle_of(&[&anchor]), now);
        let foreign: SpiffeId = "spiffe://other.org/w".parse().unwrap();
        let err = auth.mint(&foreign, DEFAULT_LEAF_TTL, now).unwrap_err();
        assert!(
            err.to_string()
                .contains("not in trust domain `example.org`"),
            "{err}"
        );

        // A chain from another trust domain's authority does not verify here either.
        let other_td: TrustDomain = "other.org".parse().unwrap();
        let other_anchor = new_trust_anchor(&other_td, DEFAULT_ANCHOR_VALIDITY, now).unwrap();
        let other_auth = authority(&other_anchor, &bundle_of(&[&other_anchor]), now);
        let cert = other_auth.mint(&foreign, DEFAULT_LEAF_TTL, now).unwrap();
        assert!(
            auth.bundle()
                .verify_peer(&cert.chain, PeerRole::Client, now)
                .is_err()
        );
    }

    #[test]
    fn issuer_with_wrong_key_is_rejected() {
        let now = SystemTime::now();
        let anchor = new_trust_anchor(&td(), DEFAULT_ANCHOR_VALIDITY, now).unwrap();
        let bundle = bundle_of(&[&anchor]);
        let issuer = new_issuer(&anchor, DEFAULT_ISSUER_VALIDITY, now).unwrap();
        let other = new_issuer(&anchor, DEFAULT_ISSUER_VALIDITY, now).unwrap();
        let pem = format!("{}{}", issuer.cert_pem(), other.key_pem().as_str());
        let err = Issuer::from_pem(pem.as_bytes(), "issuer.pem", &bundle).unwrap_err();
        assert!(format!("{err:#}").contains("does not belong"), "{err:#}");
    }

    #[test]
    fn issuer_from_another_anchor_is_rejected() {
        let now = SystemTime::now();
        let anchor = new_trust_anchor(&td(), DEFAULT_ANCHOR_VALIDITY, now).unwrap();
        let stranger = new_trust_anchor(&td(), DEFAULT_ANCHOR_VALIDITY, now).unwrap();
        let bundle = bundle_of(&[&anchor]);
        let issuer = new_issuer(&stranger, DEFAULT_ISSUER_VALIDITY, now).unwrap();
        let err = Issuer::new(issuer, "issuer.pem", &bundle).unwrap_err();
        assert!(
            err.to_string().contains("not signed by any anchor"),
            "{err}"
        );

        let other_td =
            new_trust_anchor(&"other.org".parse().unwrap(), DEFAULT_ANCHOR_VALIDITY, now).unwrap();
        let issuer = new_issuer(&other_td, DEFAULT_ISSUER_VALIDITY, now).unwrap();
        let err = Issuer::new(issuer, "issuer.pem", &bundle).unwrap_err();
        assert!(
            err.to_string().contains("trust domain `other.org`"),
            "{err}"
        );

        // An anchor is not an issuer.
        let err = Issuer::from_pem(anchor.cert_and_key_pem().as_bytes(), "issuer.pem", &bundle)
            .unwrap_err();
        assert!(err.to_string().contains("self-signed root"), "{err}");
    }

    #[test]
    fn expired_or_future_issuer_is_refused() {
        let now = SystemTime::now();
        let anchor = new_trust_anchor(&td(), DEFAULT_ANCHOR_VALIDITY, now).unwrap();
        let bundle = bundle_of(&[&anchor]);
        let issuer = new_issuer(&anchor, DAY, now).unwrap();
        let issuer = Issuer::new(issuer, "/etc/mesh/issuer.pem", &bundle).unwrap();
        let later = now + 2 * DAY;
        let err = Authority::new(bundle.clone(), issuer, later).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("/etc/mesh/issuer.pem") && msg.contains("expired at"),
            "{msg}"
        );
        assert!(msg.contains("renew-issuer"), "{msg}");

        let issuer = new_issuer(&anchor, DAY, now + DAY).unwrap();
        let issuer = Issuer::new(issuer, "issuer.pem", &bundle).unwrap();
        let err = Authority::new(bundle, issuer, now).unwrap_err();
        assert!(err.to_string().contains("not valid before"), "{err}");
    }

    #[test]
    fn anchors_expiry_rules() {
        let now = SystemTime::now();
        let old = new_trust_anchor(&td(), DAY, now).unwrap();
        let new = new_trust_anchor(&td(), DEFAULT_ANCHOR_VALIDITY, now).unwrap();
        let later = now + 2 * DAY;

        // Only anchor expired: refused, naming the anchor and its notAfter.
        let bundle = bundle_of(&[&old]);
        let issuer = Issuer::new(new_issuer(&old, DAY, now).unwrap(), "i", &bundle).unwrap();
        let err = Authority::new(bundle, issuer, later).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("every trust anchor in test-bundle has expired"),
            "{msg}"
        );
        assert!(
            msg.contains(&old.info().subject) && msg.contains("notAfter"),
            "{msg}"
        );

        // Expired old anchor next to the valid one that signs the issuer: loads, warns.
        let bundle = bundle_of(&[&old, &new]);
        let issuer = Issuer::new(
            new_issuer(&new, DEFAULT_ISSUER_VALIDITY, later).unwrap(),
            "i",
            &bundle,
        )
        .unwrap();
        let auth = Authority::new(bundle.clone(), issuer, later).unwrap();
        let warnings = auth.expiry_warnings(later, EXPIRY_WARNING_WINDOW);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("EXPIRED") && warnings[0].contains("(1 day ago)"),
            "{warnings:?}"
        );
        assert!(warnings[0].contains(old.info().short_fingerprint()));
        assert_eq!(auth.anchor_expiries().len(), 2);
        assert_eq!(
            auth.issuer_anchor_fingerprint(),
            new.info().sha256_fingerprint
        );

        // But an issuer that chains to the expired anchor is refused.
        let issuer = Issuer::new(new_issuer(&old, DAY, now).unwrap(), "i", &bundle).unwrap();
        let err = Authority::new(bundle, issuer, now + DAY + Duration::from_secs(1)).unwrap_err();
        assert!(err.to_string().contains("expired"), "{err}");
    }

    #[test]
    fn expiry_warnings_name_the_command() {
        let now = SystemTime::now();
        // A year-long anchor made 340 days ago has 25 days left.
        let anchor = new_trust_anchor(&td(), DEFAULT_ANCHOR_VALIDITY, now - 340 * DAY).unwrap();
        let auth = authority(&anchor, &bundle_of(&[&anchor]), now);
        let warnings = auth.expiry_warnings(now, EXPIRY_WARNING_WINDOW);
        // The anchor expires within 30 days; the issuer (clamped to it) is young for its
        // lifetime, so only the anchor, which is the thing to act on, warns.
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("expires in 24 days"),
            "{}",
            warnings[0]
        );
        assert!(
            warnings[0].contains("signs the current issuer"),
            "{}",
            warnings[0]
        );
        assert!(
            warnings[0].contains("mesh-agent trust rotate"),
            "{}",
            warnings[0]
        );

        // A fresh 30-day issuer does not warn; in the last third of its life it does.
        let anchor = new_trust_anchor(&td(), DEFAULT_ANCHOR_VALIDITY, now).unwrap();
        let auth = authority(&anchor, &bundle_of(&[&anchor]), now);
        assert!(auth.expiry_warnings(now, EXPIRY_WARNING_WINDOW).is_empty());
        let late = now + 21 * DAY;
        let warnings = auth.expiry_warnings(late, EXPIRY_WARNING_WINDOW);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("expires in 8 days"), "{}", warnings[0]);
        assert!(
            warnings[0].contains("mesh-agent trust renew-issuer"),
            "{}",
            warnings[0]
        );
        assert!(auth.expiry_warnings(late, 7 * DAY).is_empty());
    }

    #[test]
    fn bundle_validation() {
        let now = SystemTime::now();
        let anchor = new_trust_anchor(&td(), DEFAULT_ANCHOR_VALIDITY, now).unwrap();
        let err = TrustBundle::from_pem(b"", "b.pem").unwrap_err();
        assert!(err.to_string().contains("no certificate"), "{err}");

        let issuer = new_issuer(&anchor, DEFAULT_ISSUER_VALIDITY, now).unwrap();
        let err = TrustBundle::from_pem(issuer.cert_pem().as_bytes(), "b.pem").unwrap_err();
        assert!(err.to_string().contains("not self-signed"), "{err}");

        let other =
            new_trust_anchor(&"other.org".parse().unwrap(), DEFAULT_ANCHOR_VALIDITY, now).unwrap();
        let pem = format!("{}{}", anchor.cert_pem(), other.cert_pem());
        let err = TrustBundle::from_pem(pem.as_bytes(), "b.pem").unwrap_err();
        assert!(
            err.to_string().contains("trust domain `other.org`"),
            "{err}"
        );

        let pem = format!("{}{}", anchor.cert_pem(), anchor.cert_pem());
        let err = TrustBundle::from_pem(pem.as_bytes(), "b.pem").unwrap_err();
        assert!(err.to_string().contains("twice"), "{err}");

        let leaf_issuer = authority(&anchor, &bundle_of(&[&anchor]), now);
        let leaf = leaf_issuer.mint(&id("/w"), DEFAULT_LEAF_TTL, now).unwrap();
        let pem = certs::pem_encode("CERTIFICATE", &leaf.chain[0]);
        let err = TrustBundle::from_pem(pem.as_bytes(), "b.pem").unwrap_err();
        assert!(err.to_string().contains("not a CA"), "{err}");

        // A self-signed CA without a trust domain SAN.
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let bare = params.self_signed(&key).unwrap();
        let err = TrustBundle::from_pem(bare.pem().as_bytes(), "b.pem").unwrap_err();
        assert!(
            err.to_string().contains("does not name its trust domain"),
            "{err}"
        );

        let bundle = bundle_of(&[&anchor]);
        assert_eq!(bundle.trust_domain(), &td());
        let again = TrustBundle::from_pem(bundle.to_pem().as_bytes(), "again").unwrap();
        assert_eq!(again.anchors()[0].info, bundle.anchors()[0].info);
    }

    #[test]
    fn issuer_file_must_be_private() {
        let dir = TempDir::new("mode");
        let now = SystemTime::now();
        let anchor = new_trust_anchor(&td(), DEFAULT_ANCHOR_VALIDITY, now).unwrap();
        let issuer = new_issuer(&anchor, DEFAULT_ISSUER_VALIDITY, now).unwrap();
        let bundle_path = dir.0.join("bundle.pem");
        let issuer_path = dir.0.join("issuer.pem");
        fs::write(&bundle_path, anchor.cert_pem()).unwrap();
        fs::write(&issuer_path, issuer.cert_and_key_pem().as_bytes()).unwrap();
        fs::set_permissions(&issuer_path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = Authority::load(&bundle_path, &issuer_path, now).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("chmod 600") && msg.contains("0644"), "{msg}");
        fs::set_permissions(&issuer_path, fs::Permissions::from_mode(0o600)).unwrap();
        let auth = Authority::load(&bundle_path, &issuer_path, now).unwrap();
        assert_eq!(auth.issuer().source(), issuer_path.display().to_string());
    }
}
