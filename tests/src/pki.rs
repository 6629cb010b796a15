//! Test certificates: reading the agent's trust files and minting leaves the agent must
//! accept or refuse (another trust domain, expired, from another CA), with rcgen.
//!
//! The agent's files (written by `mesh-agent trust init`): `bundle.pem` holds the trust
//! anchors, `issuer.pem` the issuer's certificate followed by its PKCS#8 key.

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};

/// Every certificate in the PEM file at `path`, in order, as DER; other blocks (keys) are
/// skipped.
pub fn read_certs(path: &Path) -> Result<Vec<Vec<u8>>> {
    let text = fs::read(path).with_context(|| format!("read {}", path.display()))?;
    let blocks = pem::parse_many(&text).with_context(|| format!("parse PEM {}", path.display()))?;
    Ok(blocks
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| b.into_contents())
        .collect())
}

/// How the agent names an anchor in its metrics: the first 16 hex digits (lowercase) of
/// the SHA-256 of the certificate's DER.
pub fn anchor_id(der: &[u8]) -> String {
    let digest = Sha256::digest(der);
    let mut hex = String::with_capacity(16);
    for byte in &digest[..8] {
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

/// [`anchor_id`] of every certificate in a bundle file, in file order.
pub fn bundle_anchor_ids(bundle: &Path) -> Result<Vec<String>> {
    let certs = read_certs(bundle)?;
    ensure!(
        !certs.is_empty(),
        "{} holds no certificate",
        bundle.display()
    );
    Ok(certs.iter().map(|c| anchor_id(c)).collect())
}

/// Certificate files for `openssl s_client -cert <cert> -cert_chain <chain> -key <key>`.
#[derive(Clone, Debug)]
pub struct CertFiles {
    /// The leaf alone.
    pub cert: PathBuf,
    /// The certificates between the leaf and an anchor (the issuer's certificate).
    pub chain: PathBuf,
    /// The leaf's PKCS#8 private key (mode 0600).
    pub key: PathBuf,
}

/// When a minted leaf is valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Validity {
    /// From an hour ago to an hour from now.
    Current,
    /// From two hours ago to one hour ago: expired.
    Expired,
}

/// A CA that signs test leaves: the agent's real issuer (loaded from `issuer.pem`) or a
/// fresh self-signed "other" CA that no agent trusts.
pub struct TestCa {
    cert_pem: String,
    issuer: rcgen::Issuer<'static, KeyPair>,
}

impl TestCa {
    /// Loads an issuer from a PEM file holding its certificate and its private key (the
    /// agent's `issuer.pem`); the first certificate in the file is the issuer's.
    pub fn load(issuer_pem: &Path) -> Result<Self> {
        let text =
            fs::read(issuer_pem).with_context(|| format!("read {}", issuer_pem.display()))?;
        let blocks =
            pem::parse_many(&text).with_context(|| format!("parse {}", issuer_pem.display()))?;
        let cert = blocks
            .iter()
            .find(|b| b.tag() == "CERTIFICATE")
            .with_context(|| format!("no CERTIFICATE in {}", issuer_pem.display()))?;
        let key = blocks
            .iter()
            .find(|b| b.tag().ends_with("PRIVATE KEY"))
            .with_context(|| format!("no PRIVATE KEY in {}", issuer_pem.display()))?;
        let key = KeyPair::from_pem(&encode(key))
            .with_context(|| format!("load the key in {}", issuer_pem.display()))?;
        let cert_pem = encode(cert);
        let issuer = rcgen::Issuer::from_ca_cert_pem(&cert_pem, key)
            .with_context(|| format!("load the certificate in {}", issuer_pem.display()))?;
        Ok(Self { cert_pem, issuer })
    }

    /// A new self-signed CA (ECDSA P-256), valid from an hour ago for a day.
    pub fn self_signed(common_name: &str) -> Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(1);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        })
    }

    /// The CA's certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Mints an X509-SVID-shaped leaf for `spiffe_id` (any trust domain; the string is put
    /// in the URI SAN as given) and writes `<stem>.pem`, `<stem>-chain.pem` (this CA's
    /// certificate) and `<stem>.key` in `dir`.
    pub fn mint(
        &self,
        spiffe_id: &str,
        validity: Validity,
        dir: &Path,
        stem: &str,
    ) -> Result<CertFiles> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "mesh-testbed");
        params.subject_alt_names =
            vec![SanType::URI(spiffe_id.try_into().with_context(|| {
                format!("{spiffe_id:?} is not an IA5 string")
            })?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        (params.not_before, params.not_after) = match validity {
            Validity::Current => (now - Duration::hours(1), now + Duration::hours(1)),
            Validity::Expired => (now - Duration::hours(2), now - Duration::hours(1)),
        };
        let cert = params
            .signed_by(&key, &self.issuer)
            .with_context(|| format!("sign a leaf for {spiffe_id}"))?;

        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let files = CertFiles {
            cert: dir.join(format!("{stem}.pem")),
            chain: dir.join(format!("{stem}-chain.pem")),
            key: dir.join(format!("{stem}.key")),
        };
        write(&files.cert, &cert.pem())?;
        write(&files.chain, &self.cert_pem)?;
        write(&files.key, &key.serialize_pem())?;
        fs::set_permissions(&files.key, fs::Permissions::from_mode(0o600))?;
        Ok(files)
    }

    /// Writes the CA's certificate to `path` (e.g. as a CAfile).
    pub fn write_cert(&self, path: &Path) -> Result<()> {
        write(path, &self.cert_pem)
    }
}

/// PEM with LF line endings (the `pem` crate's default is CRLF).
fn encode(block: &pem::Pem) -> String {
    pem::encode_config(
        block,
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

fn write(path: &Path, contents: &str) -> Result<()> {
    fs::write(path, contents).with_context(|| format!("write {}", path.display()))
}

/// The URI SANs of the first certificate in the PEM file at `path` (via `openssl x509`
/// would need a process; this reads the DER directly).
pub fn uri_sans(path: &Path) -> Result<Vec<String>> {
    let certs = read_certs(path)?;
    let Some(first) = certs.first() else {
        bail!("{} holds no certificate", path.display());
    };
    let (_, cert) = x509_parser::parse_x509_certificate(first)
        .map_err(|e| anyhow::anyhow!("parse the certificate in {}: {e}", path.display()))?;
    let mut uris = Vec::new();
    if let Some(san) = cert
        .subject_alternative_name()
        .map_err(|e| anyhow::anyhow!("{}: bad SAN extension: {e}", path.display()))?
    {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = name {
                uris.push(uri.to_string());
            }
        }
    }
    Ok(uris)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_leaves_chain_to_their_ca_and_carry_the_id() {
        let dir = std::env::temp_dir().join(format!("mesh-testbed-pki-{}", std::process::id()));
        let ca = TestCa::self_signed("test CA").unwrap();
        let files = ca
            .mint("spiffe://x.test/a", Validity::Expired, &dir, "leaf")
            .unwrap();
        assert_eq!(
            uri_sans(&files.cert).unwrap(),
            vec!["spiffe://x.test/a".to_string()]
        );
        let chain = read_certs(&files.chain).unwrap();
        assert_eq!(chain.len(), 1);
        assert_eq!(anchor_id(&chain[0]).len(), 16);

        // An issuer.pem-shaped file (certificate, then key) loads back as a CA.
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        let issuer_pem = dir.join("issuer.pem");
        fs::write(&issuer_pem, cert.pem() + &key.serialize_pem()).unwrap();
        let loaded = TestCa::load(&issuer_pem).unwrap();
        assert_eq!(loaded.cert_pem().trim(), cert.pem().trim());
        loaded
            .mint("spiffe://y.test/b", Validity::Current, &dir, "leaf2")
            .unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }
}
