//! The certificates the running agent holds: the trust material (bundle and issuer, reloaded
//! from disk when they change) and one workload certificate per attested local task (minted
//! here, in memory only, renewed at half-life).
//!
//! Renewal keeps the valid certificate until a new one exists: a failure is retried with
//! jittered, growing backoff. An issuer change (rotation) re-mints every workload certificate
//! at once, so the fleet moves to the new chain in one watch interval instead of one leaf
//! lifetime.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use rustls::pki_types::TrustAnchor;
use rustls::sign::CertifiedKey;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::IdentitySettings;
use crate::identity::authority::TrustBundle;
use crate::identity::{Authority, SpiffeId, TrustDomain, WorkloadCert};
use crate::metrics::Metrics;

/// How early expiries are logged as warnings.
const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);
/// Retry backoff for a failed renewal.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// The trust anchors in the form the verifiers use. Replaced as a whole on reload.
#[derive(Debug)]
pub struct Trust {
    anchors: Vec<TrustAnchor<'static>>,
    trust_domain: TrustDomain,
}

impl Trust {
    fn of(authority: &Authority) -> Trust {
        Trust::of_bundle(authority.bundle())
    }

    pub fn of_bundle(bundle: &TrustBundle) -> Trust {
        Trust {
            anchors: bundle.trust_anchors().to_vec(),
            trust_domain: bundle.trust_domain().clone(),
        }
    }

    pub fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }
}

/// One task's current workload certificate, swapped in place on renewal.
#[derive(Debug)]
pub struct WorkloadSlot {
    task: Arc<str>,
    id: SpiffeId,
    current: RwLock<Current>,
}

#[derive(Debug)]
struct Current {
    key: Arc<CertifiedKey>,
    not_after: SystemTime,
    renew_at: SystemTime,
    anchor: String,
}

impl WorkloadSlot {
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// The certificate chain and key for the next handshake.
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .key
            .clone()
    }

    fn renew_at(&self) -> SystemTime {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .renew_at
    }
}

/// A task's certificate and the token that stops its renewal.
type RenewedSlot = (Arc<WorkloadSlot>, CancellationToken);

/// Trust material and workload certificates of the agent.
pub struct Certs {
    settings: IdentitySettings,
    metrics: Arc<Metrics>,
    authority: RwLock<Arc<Authority>>,
    trust: RwLock<Arc<Trust>>,
    /// Bumped whenever the authority changes: renewers re-mint at once.
    generation: watch::Sender<u64>,
    slots: Mutex<HashMap<Arc<str>, RenewedSlot>>,
}

impl Certs {
    /// Loads the bundle and issuer; refuses expired or inconsistent material.
    pub fn load(settings: &IdentitySettings, metrics: Arc<Metrics>) -> anyhow::Result<Arc<Certs>> {
        let authority = load_authority(settings)?;
        let trust = Trust::of(&authority);
        if trust.trust_domain.as_str() != settings.trust_domain {
            anyhow::bail!(
                "the trust bundle {} is for trust domain `{}`, but identity.trust_domain is `{}`",
                settings.bundle.display(),
                trust.trust_domain,
                settings.trust_domain
            );
        }
        let certs = Arc::new(Certs {
            settings: settings.clone(),
            metrics,
            authority: RwLock::new(Arc::new(authority)),
            trust: RwLock::new(Arc::new(trust)),
            generation: watch::channel(0).0,
            slots: Mutex::new(HashMap::new()),
        });
        certs.report_trust();
        certs.warn_expiring();
        Ok(certs)
    }

    pub fn trust(&self) -> Arc<Trust> {
        self.trust.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A number that changes whenever the trust material does (for caches of TLS configs).
    pub fn generation(&self) -> u64 {
        *self.generation.borrow()
    }

    /// Fires whenever the trust material changes: live tunnel connections check their peers
    /// against the new bundle then.
    pub fn watch_trust(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    fn authority(&self) -> Arc<Authority> {
        self.authority
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Mints the first certificate of a task and keeps it renewed until [`Certs::remove`].
    pub fn add(self: &Arc<Self>, task: &str, id: SpiffeId) -> anyhow::Result<Arc<WorkloadSlot>> {
        let task: Arc<str> = task.into();
        let current = self
            .mint(&id)
            .with_context(|| format!("cannot mint a workload certificate for {id}"))?;
        let slot = Arc::new(WorkloadSlot {
            task: task.clone(),
            id,
            current: RwLock::new(current),
        });
        self.report_slot(&slot);
        let stop = CancellationToken::new();
        let previous = self
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(task, (slot.clone(), stop.clone()));
        if let Some((old, old_stop)) = previous {
            old_stop.cancel();
            self.forget_slot(&old);
        }
        tokio::spawn(self.clone().renew_loop(slot.clone(), stop));
        Ok(slot)
    }

    /// Stops renewing a task's certificate and drops its metric series.
    pub fn remove(&self, task: &str) {
        let removed = self
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(task);
        if let Some((slot, stop)) = removed {
            stop.cancel();
            self.forget_slot(&slot);
        }
    }

    fn mint(&self, id: &SpiffeId) -> anyhow::Result<Current> {
        let authority = self.authority();
        let cert = authority.mint(id, self.settings.workload_cert_ttl, SystemTime::now())?;
        current_of(&cert, authority.issuer_anchor_fingerprint())
    }

    async fn renew_loop(self: Arc<Self>, slot: Arc<WorkloadSlot>, stop: CancellationToken) {
        let mut generation = self.generation.subscribe();
        generation.mark_unchanged();
        let mut backoff = RETRY_MIN;
        let mut due = slot.renew_at();
        loop {
            let wait = due
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                changed = generation.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    generation.mark_unchanged();
                }
            }
            match self.mint(&slot.id) {
                Ok(current) => {
                    due = current.renew_at;
                    *slot.current.write().unwrap_or_else(|p| p.into_inner()) = current;
                    self.report_slot(&slot);
                    backoff = RETRY_MIN;
                }
                Err(e) => {
                    // Keep serving the certificate we have; it is still valid for a while.
                    let left = slot
                        .current
                        .read()
                        .unwrap_or_else(|p| p.into_inner())
                        .not_after
                        .duration_since(SystemTime::now())
                        .unwrap_or(Duration::ZERO);
                    error!(task = %slot.task, identity = %slot.id, "workload certificate renewal failed (current one valid for {}): {e:#}", humantime::format_duration(Duration::from_secs(left.as_secs())));
                    self.metrics.cert_renewal_failure(&slot.task);
                    due = SystemTime::now() + jitter(backoff);
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            }
        }
    }

    /// Re-reads the bundle and issuer. Invalid material changes nothing (logged and counted).
    /// Returns whether anything changed.
    pub fn reload(&self) -> bool {
        let loaded = load_authority(&self.settings).and_then(|a| {
            let t = Trust::of(&a);
            if t.trust_domain.as_str() != self.settings.trust_domain {
                anyhow::bail!(
                    "the new bundle is for trust domain `{}`, not `{}`",
                    t.trust_domain,
                    self.settings.trust_domain
                );
            }
            Ok((a, t))
        });
        let (authority, trust) = match loaded {
            Ok(x) => x,
            Err(e) => {
                error!(
                    "trust material reload failed, keeping the current bundle and issuer: {e:#}"
                );
                self.metrics.trust_reload(false);
                return false;
            }
        };
        if authority.same_material(&self.authority()) {
            return false;
        }
        *self.authority.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(authority);
        *self.trust.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(trust);
        self.generation.send_modify(|g| *g += 1);
        self.metrics.trust_reload(true);
        self.report_trust();
        self.warn_expiring();
        info!("trust material reloaded; re-minting workload certificates");
        true
    }

    /// Logs loudly what expires within 30 days.
    pub fn warn_expiring(&self) {
        for w in self
            .authority()
            .expiry_warnings(SystemTime::now(), EXPIRY_WARNING)
        {
            warn!("{w}");
        }
    }

    fn report_trust(&self) {
        let authority = self.authority();
        self.metrics.set_trust_expiry(
            authority
                .anchor_expiries()
                .into_iter()
                .map(|(fingerprint, at)| (short_fingerprint(&fingerprint), at))
                .collect(),
            (
                short_fingerprint(authority.issuer_anchor_fingerprint()),
                authority.issuer_not_after(),
            ),
        );
    }

    fn report_slot(&self, slot: &WorkloadSlot) {
        let c = slot.current.read().unwrap_or_else(|p| p.into_inner());
        self.metrics.set_workload_cert_expiry(
            &slot.task,
            &slot.id.to_string(),
            &c.anchor,
            c.not_after,
        );
    }

    fn forget_slot(&self, slot: &WorkloadSlot) {
        self.metrics.forget_workload_cert(&slot.task);
    }
}

fn load_authority(settings: &IdentitySettings) -> anyhow::Result<Authority> {
    Authority::load(&settings.bundle, &settings.issuer, SystemTime::now())
}

fn current_of(cert: &WorkloadCert, anchor_fingerprint: &str) -> anyhow::Result<Current> {
    Ok(Current {
        key: cert.certified_key()?,
        not_after: cert.not_after,
        renew_at: cert.renew_at(),
        anchor: short_fingerprint(anchor_fingerprint),
    })
}

/// The label value naming an anchor: enough of the SHA-256 fingerprint to tell anchors apart.
pub fn short_fingerprint(hex: &str) -> String {
    hex.chars()
        .filter(|c| *c != ':')
        .take(16)
        .collect::<String>()
        .to_lowercase()
}

/// ±20 % so a fleet that failed together does not retry together.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.8 + 0.4 * fastrand::f64())
}
