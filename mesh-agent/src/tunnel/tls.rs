//! Mutual TLS 1.3 for the tunnel: rustls configurations and the SPIFFE-aware certificate checks.
//!
//! rustls's stock verifiers check DNS names or IP addresses; workload certificates carry only a
//! SPIFFE URI. So both sides verify the chain with webpki against the current trust bundle and
//! then check the SPIFFE id: the client requires exactly the destination identity it expects,
//! the server requires an identity of its trust domain (authorization decides the rest, per
//! request). Certificates are picked per handshake from the workload slot, so a renewed leaf is
//! used by the next handshake without rebuilding anything.

use std::sync::Arc;

use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    ServerConfig, SignatureScheme,
};

use super::hostports::HostPorts;
use crate::certs::{Trust, WorkloadSlot};
use crate::identity::authority::PeerRole;
use crate::identity::{SpiffeId, spiffe_id_of_cert};

/// ALPN of the tunnel: HTTP/2 (CONNECT streams).
const ALPN_H2: &[u8] = b"h2";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The client side of a tunnel connection from `source` to a peer that must prove `expected`.
pub fn client_config(
    trust: Arc<Trust>,
    source: Arc<WorkloadSlot>,
    expected: SpiffeId,
) -> Result<ClientConfig, rustls::Error> {
    let provider = provider();
    let verifier = Arc::new(PeerVerifier {
        algs: provider.signature_verification_algorithms,
        trust,
        expected: Some(expected),
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(SlotCert(source)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// The server side of the tunnel listener of the task owning `slot`.
pub fn server_config(
    trust: Arc<Trust>,
    slot: Arc<WorkloadSlot>,
) -> Result<ServerConfig, rustls::Error> {
    server_config_with(trust, Arc::new(SlotCert(slot)))
}

/// Both listener kinds: TLS 1.3, a client certificate of the trust domain required, ALPN h2;
/// they differ in how the certificate to present is chosen.
fn server_config_with(
    trust: Arc<Trust>,
    certificate: Arc<dyn ResolvesServerCert>,
) -> Result<ServerConfig, rustls::Error> {
    let provider = provider();
    let verifier = Arc::new(PeerVerifier {
        algs: provider.signature_verification_algorithms,
        trust,
        expected: None,
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(certificate);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// The TLS server name (SNI) a client sends for a destination identity: a DNS-safe digest of
/// the SPIFFE id. Listeners of one task ignore it; the node's listener, shared by every task
/// reached at a host port, picks the certificate of the identity the client expects with it.
pub fn server_name_for(id: &SpiffeId) -> String {
    let digest = crate::identity::certs::sha256_hex(id.to_string().as_bytes());
    format!("{}.id.mesh", &digest[..32])
}

/// The server side of the node's tunnel listener (host-port endpoints): the certificate is
/// chosen by the server name the client sent.
pub fn node_server_config(
    trust: Arc<Trust>,
    host_ports: Arc<HostPorts>,
) -> Result<ServerConfig, rustls::Error> {
    server_config_with(trust, Arc::new(ByServerName(host_ports)))
}

/// Picks the certificate of the task whose identity the client named.
struct ByServerName(Arc<HostPorts>);

impl std::fmt::Debug for ByServerName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ByServerName")
    }
}

impl ResolvesServerCert for ByServerName {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name()?;
        Some(self.0.slot_for_server_name(name)?.certified_key())
    }
}

/// The identity the peer proved during the handshake.
pub fn peer_identity(conn: &rustls::CommonState) -> Option<SpiffeId> {
    let leaf = conn.peer_certificates()?.first()?;
    spiffe_id_of_cert(leaf).ok()
}

/// Farther than any expiry timer needs to look (a test CA of ten years would otherwise be
/// added to tokio's clock as is).
const FAR: std::time::Duration = std::time::Duration::from_secs(100 * 365 * 24 * 3600);

/// The chain a peer presented in the handshake, kept for the life of the connection so it can
/// be checked again when this agent's trust bundle changes: a connection takes no new streams
/// once the anchor it was authenticated under is no longer trusted (`super::reauth`).
pub struct PeerChain {
    end_entity: CertificateDer<'static>,
    intermediates: Vec<CertificateDer<'static>>,
    role: PeerRole,
    /// Set when the chain is kept, right after the handshake verified it.
    verified_at: UnixTime,
    /// The earliest `notAfter` in the chain: from then on the authentication has expired.
    expires: std::time::SystemTime,
}

impl PeerChain {
    /// The chain of an established connection (`None` before the handshake, or when the peer
    /// sent no certificate or one that does not parse; the verifier refuses both).
    pub fn of(conn: &rustls::CommonState, role: PeerRole) -> Option<PeerChain> {
        PeerChain::from_presented(conn.peer_certificates()?, role)
    }

    /// The chain as presented: the end entity first, then intermediates.
    fn from_presented(presented: &[CertificateDer<'_>], role: PeerRole) -> Option<PeerChain> {
        let (end_entity, intermediates) = presented.split_first()?;
        let expires = presented
            .iter()
            .map(|der| {
                x509_parser::parse_x509_certificate(der)
                    .map(|(_, c)| crate::identity::certs::asn1_to_system(c.validity().not_after))
            })
            .collect::<Result<Vec<_>, _>>()
            .ok()?
            .into_iter()
            .min()?;
        Some(PeerChain {
            end_entity: end_entity.clone().into_owned(),
            intermediates: intermediates
                .iter()
                .map(|c| c.clone().into_owned())
                .collect(),
            role,
            verified_at: UnixTime::now(),
            expires,
        })
    }

    /// When the chain's first certificate expires.
    pub fn expires(&self) -> std::time::SystemTime {
        self.expires
    }

    /// [`PeerChain::expires`] on tokio's clock, for a timer (now when it has passed).
    pub fn expiry_deadline(&self) -> tokio::time::Instant {
        let left = self
            .expires
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        tokio::time::Instant::now() + left.min(FAR)
    }

    /// Checks the chain again against `trust` (the bundle as it is now), at the time the
    /// handshake checked it: expiry is handled on its own (new streams stop, open ones
    /// finish), so the only question here is whether the anchors still vouch for the peer.
    pub fn verify_against(&self, trust: Arc<Trust>) -> Result<SpiffeId, rustls::Error> {
        let verifier = PeerVerifier {
            algs: provider().signature_verification_algorithms,
            trust,
            expected: None,
        };
        let usage = match self.role {
            PeerRole::Server => webpki::KeyUsage::server_auth(),
            PeerRole::Client => webpki::KeyUsage::client_auth(),
        };
        verifier.verify(
            &self.end_entity,
            &self.intermediates,
            self.verified_at,
            usage,
        )
    }
}

/// Presents the slot's current workload certificate.
#[derive(Debug)]
struct SlotCert(Arc<WorkloadSlot>);

impl ResolvesServerCert for SlotCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.certified_key())
    }
}

impl ResolvesClientCert for SlotCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.certified_key())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Chain to the trust bundle, then the SPIFFE id: exactly `expected` when set (the client
/// checking its destination), else any id of the trust domain (the server checking a client).
#[derive(Debug)]
struct PeerVerifier {
    algs: WebPkiSupportedAlgorithms,
    trust: Arc<Trust>,
    expected: Option<SpiffeId>,
}

impl PeerVerifier {
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<SpiffeId, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        cert.verify_for_usage(
            self.algs.all,
            self.trust.anchors(),
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(pki_error)?;
        let id = spiffe_id_of_cert(end_entity).map_err(|e| other(e.to_string()))?;
        if id.trust_domain() != self.trust.trust_domain() {
            return Err(other(format!(
                "peer identity {id} is outside the trust domain {}",
                self.trust.trust_domain()
            )));
        }
        if let Some(expected) = &self.expected
            && &id != expected
        {
            return Err(other(format!("peer identity is {id}, expected {expected}")));
        }
        Ok(id)
    }
}

/// Handshake signatures are checked the same way in both directions: TLS 1.3 only, with the
/// provider's algorithms.
macro_rules! tls13_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &CertificateDer<'_>,
            _dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            // Only TLS 1.3 is enabled; rustls never gets here.
            Err(rustls::Error::PeerIncompatible(
                rustls::PeerIncompatible::Tls13RequiredForQuic,
            ))
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.algs.supported_schemes()
        }
    };
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        Ok(ServerCertVerified::assertion())
    }

    tls13_signatures!();
}

impl ClientCertVerifier for PeerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        Ok(ClientCertVerified::assertion())
    }

    tls13_signatures!();
}

fn other(msg: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
        std::io::Error::other(msg),
    ))))
}

/// webpki's verdicts in rustls's terms, so the alert sent to the peer says what was wrong.
fn pki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error::*;
    let ce = match e {
        BadDer | BadDerTime => CertificateError::BadEncoding,
        CertExpired { .. } => CertificateError::Expired,
        CertNotValidYet { .. } => CertificateError::NotValidYet,
        UnknownIssuer => CertificateError::UnknownIssuer,
        InvalidSignatureForPublicKey | UnsupportedSignatureAlgorithmForPublicKeyContext(_) => {
            CertificateError::BadSignature
        }
        RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        e => return other(format!("certificate rejected: {e}")),
    };
    rustls::Error::InvalidCertificate(ce)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::identity::TrustDomain;
    use crate::identity::authority::{Authority, Issuer, TrustBundle};
    use crate::identity::certs::{SigningCa, new_issuer, new_trust_anchor};

    const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

    fn td() -> TrustDomain {
        "example.org".parse().unwrap()
    }

    fn bundle_of(anchors: &[&SigningCa]) -> TrustBundle {
        let pem: String = anchors.iter().map(|a| a.cert_pem()).collect();
        TrustBundle::from_pem(pem.as_bytes(), "test-bundle").unwrap()
    }

    /// A workload chain (leaf, issuer) under `anchor`, valid for `ttl`.
    fn chain_under(anchor: &SigningCa, ttl: Duration) -> Vec<CertificateDer<'static>> {
        let now = SystemTime::now();
        let bundle = bundle_of(&[anchor]);
        let issuer = Issuer::new(
            new_issuer(anchor, YEAR / 12, now).unwrap(),
            "issuer",
            &bundle,
        )
        .unwrap();
        let authority = Authority::new(bundle, issuer, now).unwrap();
        let id = "spiffe://example.org/aws/111122223333/role/orders"
            .parse()
            .unwrap();
        authority.mint(&id, ttl, now).unwrap().chain
    }

    #[test]
    fn a_kept_chain_is_checked_against_the_bundle_as_it_is_now() {
        let now = SystemTime::now();
        let old = new_trust_anchor(&td(), YEAR, now).unwrap();
        let new = new_trust_anchor(&td(), YEAR, now).unwrap();
        let chain = chain_under(&old, Duration::from_secs(3600));
        let kept = PeerChain::from_presented(&chain, PeerRole::Client).unwrap();
        let trust = |anchors: &[&SigningCa]| Arc::new(Trust::of_bundle(&bundle_of(anchors)));

        // The bundle it was accepted under, and the middle of a rotation: still vouched for.
        let id = kept.verify_against(trust(&[&old])).unwrap();
        assert_eq!(
            id.to_string(),
            "spiffe://example.org/aws/111122223333/role/orders"
        );
        kept.verify_against(trust(&[&new, &old])).unwrap();
        // The old anchor dropped: no longer.
        let err = kept.verify_against(trust(&[&new])).unwrap_err();
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
            ),
            "{err:?}"
        );
        // Workload leaves serve both ends of a tunnel: the server role verifies the same way.
        let as_server = PeerChain::from_presented(&chain, PeerRole::Server).unwrap();
        as_server.verify_against(trust(&[&old])).unwrap();
        assert!(as_server.verify_against(trust(&[&new])).is_err());
    }

    #[test]
    fn a_kept_chain_expires_with_its_first_certificate_and_needs_one() {
        let now = SystemTime::now();
        let anchor = new_trust_anchor(&td(), YEAR, now).unwrap();
        let chain = chain_under(&anchor, Duration::from_secs(600));
        let kept = PeerChain::from_presented(&chain, PeerRole::Server).unwrap();
        // The leaf (10 minutes) expires before its issuer (a month); second precision.
        let left = kept.expires().duration_since(now).unwrap();
        assert!(
            left > Duration::from_secs(590) && left <= Duration::from_secs(601),
            "{left:?}"
        );
        let deadline = kept.expiry_deadline() - tokio::time::Instant::now();
        assert!(deadline <= Duration::from_secs(601), "{deadline:?}");
        assert!(PeerChain::from_presented(&[], PeerRole::Server).is_none());
        let garbage = [CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x01])];
        assert!(PeerChain::from_presented(&garbage, PeerRole::Server).is_none());
    }
}
