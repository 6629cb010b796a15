//! Passive health checking (outlier detection), as App Mesh's `outlierDetection` and
//! Envoy's outlier detector do it: the proxy reports how its connections to each endpoint
//! went, and an endpoint that fails is ejected from load balancing for a while.
//!
//! * **Ejection.** `consecutive_failures` failures in a row eject an endpoint (default 1:
//!   a refused or unreachable connect to a peer's tunnel port means the task or its node is
//!   gone, and waiting for a second application connection to fail the same way helps no
//!   one). The n-th ejection lasts `base_ejection * 2^(n-1)`, capped at `max_ejection`, so
//!   an endpoint that keeps failing is tried less and less often.
//! * **Return.** When the ejection runs out the endpoint gets traffic again. If it then
//!   succeeds it is forgotten (the next failure starts from `base_ejection` again); if it
//!   fails it is ejected for twice as long. A success during an ejection (a connection
//!   started before it, or one sent there in panic mode) ends the ejection at once: the
//!   endpoint demonstrably accepts connections, but its ejection count is kept until a
//!   success outside an ejection.
//! * **Never eject everything.** Of the endpoints [`OutlierDetector::choose`] is offered, at
//!   most `max_ejection_percent` (and at least one, as in Envoy) are treated as ejected; the
//!   excess, and the last endpoint if all are ejected, are used anyway, soonest-to-return
//!   first ("panic mode"). A mesh whose bookkeeping refused every connection would turn a
//!   blip into an outage; with every endpoint failing, the application's own errors are
//!   the better signal.
//! * **Bounded memory.** Only endpoints with a failure, an ejection or an ejection history
//!   are tracked; [`OutlierDetector::retain`] drops the ones no longer in any endpoint set,
//!   and beyond [`MAX_TRACKED`] entries the oldest un-ejected ones are dropped.
//!
//! Every method takes the time as an argument, so the logic is tested with an injected
//! clock; callers pass `Instant::now()`. On the hot path (`choose`, `record_success`) a
//! detector that tracks nothing costs one atomic load and no lock.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The most endpoints tracked at once; far above any real mesh's failing endpoints, but a
/// ceiling if a caller reports failures for arbitrary addresses.
pub const MAX_TRACKED: usize = 4096;

/// When endpoints are ejected, and for how long.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutlierSettings {
    /// Failures in a row that eject an endpoint (at least 1).
    pub consecutive_failures: u32,
    /// The first ejection's length; each further ejection of the same endpoint doubles it.
    pub base_ejection: Duration,
    /// The longest ejection.
    pub max_ejection: Duration,
    /// The most endpoints of a set that may be ejected at once, in percent (0 to 100); at
    /// least one endpoint may always be ejected unless this is 0.
    pub max_ejection_percent: u8,
}

impl Default for OutlierSettings {
    fn default() -> Self {
        Self {
            consecutive_failures: 1,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(300),
            max_ejection_percent: 50,
        }
    }
}

impl OutlierSettings {
    /// Rejects settings with no sensible meaning, for configuration validation.
    pub fn validate(&self) -> Result<(), String> {
        if self.consecutive_failures == 0 {
            return Err("consecutive_failures must be at least 1".into());
        }
        if self.base_ejection.is_zero() {
            return Err("base_ejection must be greater than zero".into());
        }
        if self.max_ejection < self.base_ejection {
            return Err(format!(
                "max_ejection ({:?}) is shorter than base_ejection ({:?})",
                self.max_ejection, self.base_ejection
            ));
        }
        if self.max_ejection_percent > 100 {
            return Err(format!(
                "max_ejection_percent is {}, more than 100",
                self.max_ejection_percent
            ));
        }
        Ok(())
    }

    /// The length of the `nth` ejection (1 = the first).
    fn ejection(&self, nth: u32) -> Duration {
        let doublings = nth.saturating_sub(1).min(31);
        self.base_ejection
            .saturating_mul(1u32 << doublings)
            .min(self.max_ejection)
    }

    /// How many of `pool` endpoints may be ejected at once.
    fn max_ejected(&self, pool: usize) -> usize {
        if self.max_ejection_percent == 0 {
            return 0;
        }
        (pool * usize::from(self.max_ejection_percent) / 100).max(1)
    }
}

/// What is known about one endpoint that has failed.
#[derive(Clone, Debug)]
struct Health {
    /// Failures in a row since the last success or ejection.
    consecutive_failures: u32,
    /// Ejections so far; sets the next ejection's length.
    ejections: u32,
    /// The end of the current or last ejection.
    ejected_until: Option<Instant>,
    last_failure: Instant,
}

impl Health {
    fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| now < until)
    }
}

/// Passive health of endpoints, shared by every connection of the agent (put it in an
/// `Arc`); see the module docs.
#[derive(Debug)]
pub struct OutlierDetector {
    settings: OutlierSettings,
    endpoints: Mutex<HashMap<SocketAddr, Health>>,
    /// `endpoints.len()`, readable without the lock: zero in the healthy steady state.
    tracked: AtomicUsize,
    /// Round-robin position among healthy alternatives.
    next: AtomicUsize,
}

impl OutlierDetector {
    /// A detector with `settings`; values [`OutlierSettings::validate`] would refuse are
    /// brought into range (at least one failure, at most 100 %, `max_ejection` at least
    /// `base_ejection`).
    pub fn new(settings: OutlierSettings) -> Self {
        let mut settings = settings;
        settings.consecutive_failures = settings.consecutive_failures.max(1);
        settings.max_ejection_percent = settings.max_ejection_percent.min(100);
        settings.max_ejection = settings.max_ejection.max(settings.base_ejection);
        Self {
            settings,
            endpoints: Mutex::new(HashMap::new()),
            tracked: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
        }
    }

    #[cfg(test)]
    pub fn settings(&self) -> &OutlierSettings {
        &self.settings
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Health>> {
        // Every update leaves the map consistent, so a panic elsewhere while the lock was
        // held does not make it unusable.
        self.endpoints.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sync_len(&self, endpoints: &HashMap<SocketAddr, Health>) {
        self.tracked.store(endpoints.len(), Ordering::Relaxed);
    }

    /// A connection to `endpoint` succeeded (the connect, or the tunnel stream, was
    /// accepted).
    pub fn record_success(&self, endpoint: SocketAddr, now: Instant) {
        if self.tracked.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut endpoints = self.lock();
        let Some(health) = endpoints.get_mut(&endpoint) else {
            return;
        };
        let ended_early = health.is_ejected(now);
        if ended_early {
            health.ejected_until = Some(now);
            health.consecutive_failures = 0;
        } else {
            endpoints.remove(&endpoint);
        }
        self.sync_len(&endpoints);
        drop(endpoints);
        if ended_early {
            tracing::info!(%endpoint, "ejected endpoint accepted a connection; ejection ended");
        }
    }

    /// A connection to `endpoint` failed in a way that says the endpoint is unhealthy
    /// (refused, unreachable, timed out; not a policy denial). Returns `true` if this
    /// failure ejected it.
    pub fn record_failure(&self, endpoint: SocketAddr, now: Instant) -> bool {
        // Ejection disabled: nothing to track, and nothing to count as ejected.
        if self.settings.max_ejection_percent == 0 {
            return false;
        }
        let mut endpoints = self.lock();
        if !endpoints.contains_key(&endpoint) && !self.make_room(&mut endpoints, now) {
            return false;
        }
        let health = endpoints.entry(endpoint).or_insert(Health {
            consecutive_failures: 0,
            ejections: 0,
            ejected_until: None,
            last_failure: now,
        });
        health.last_failure = now;
        // Failures of connections made before the ejection say nothing new.
        let mut ejection = None;
        if !health.is_ejected(now) {
            health.consecutive_failures += 1;
            if health.consecutive_failures >= self.settings.consecutive_failures {
                health.consecutive_failures = 0;
                health.ejections = health.ejections.saturating_add(1);
                let length = self.settings.ejection(health.ejections);
                health.ejected_until = Some(now + length);
                ejection = Some((health.ejections, length));
            }
        }
        self.sync_len(&endpoints);
        // Logged after the lock is released: other connections need it, not the log.
        drop(endpoints);
        if let Some((nth, length)) = ejection {
            tracing::warn!(
                %endpoint,
                ejection = nth,
                ?length,
                "endpoint ejected after failed connections"
            );
        }
        ejection.is_some()
    }

    /// Frees an entry for a new endpoint if the map is full: first everything un-ejected
    /// that has not failed for `max_ejection`, then the un-ejected entry that failed
    /// longest ago. `false` if every entry is an active ejection.
    fn make_room(&self, endpoints: &mut HashMap<SocketAddr, Health>, now: Instant) -> bool {
        if endpoints.len() < MAX_TRACKED {
            return true;
        }
        let horizon = self.settings.max_ejection;
        endpoints.retain(|_, h| h.is_ejected(now) || now.duration_since(h.last_failure) < horizon);
        if endpoints.len() < MAX_TRACKED {
            return true;
        }
        let oldest = endpoints
            .iter()
            .filter(|(_, h)| !h.is_ejected(now))
            .min_by_key(|(_, h)| h.last_failure)
            .map(|(addr, _)| *addr);
        match oldest {
            Some(addr) => {
                endpoints.remove(&addr);
                true
            }
            None => false,
        }
    }

    /// Whether `endpoint` is ejected at `now` (whatever panic mode would do with it).
    #[cfg(test)]
    pub fn is_ejected(&self, endpoint: SocketAddr, now: Instant) -> bool {
        if self.tracked.load(Ordering::Relaxed) == 0 {
            return false;
        }
        self.lock()
            .get(&endpoint)
            .is_some_and(|h| h.is_ejected(now))
    }

    /// How many tracked endpoints are ejected at `now` (for a gauge).
    #[cfg(test)]
    pub fn ejected_count(&self, now: Instant) -> usize {
        self.lock().values().filter(|h| h.is_ejected(now)).count()
    }

    /// The endpoint a connection for `wanted` should go to: `wanted` itself unless it is
    /// ejected; else another endpoint of the same service from `candidates` (round-robin
    /// among the usable ones). Usable means not ejected, or brought back by the
    /// `max_ejection_percent` limit (panic mode, soonest-to-return first), computed over
    /// `candidates` and `wanted` together. Always returns an endpoint: with every endpoint
    /// ejected, the one whose ejection ends first.
    pub fn choose(
        &self,
        wanted: SocketAddr,
        candidates: &[SocketAddr],
        now: Instant,
    ) -> SocketAddr {
        if self.tracked.load(Ordering::Relaxed) == 0 {
            return wanted;
        }
        let endpoints = self.lock();
        let until = |addr: &SocketAddr| {
            endpoints
                .get(addr)
                .filter(|h| h.is_ejected(now))
                .and_then(|h| h.ejected_until)
        };
        if until(&wanted).is_none() {
            return wanted;
        }
        let mut pool: Vec<SocketAddr> = Vec::with_capacity(candidates.len() + 1);
        for addr in std::iter::once(&wanted).chain(candidates) {
            if !pool.contains(addr) {
                pool.push(*addr);
            }
        }
        let mut ejected: Vec<(Instant, SocketAddr)> = pool
            .iter()
            .filter_map(|addr| until(addr).map(|u| (u, *addr)))
            .collect();
        let healthy = pool.len() - ejected.len();
        let mut readmit = ejected
            .len()
            .saturating_sub(self.settings.max_ejected(pool.len()));
        if healthy == 0 {
            readmit = readmit.max(1);
        }
        ejected.sort_unstable();
        let readmitted: Vec<SocketAddr> = ejected[..readmit].iter().map(|(_, a)| *a).collect();
        if readmitted.contains(&wanted) {
            return wanted;
        }
        let usable: Vec<SocketAddr> = pool
            .into_iter()
            .filter(|addr| until(addr).is_none() || readmitted.contains(addr))
            .collect();
        // Never empty: either something is healthy or one endpoint was readmitted.
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        usable[turn % usable.len()]
    }

    /// Forgets every endpoint not in `live`. Call it with the union of every endpoint set
    /// the detector serves whenever one changes, so endpoints that left discovery do not
    /// stay tracked (and a reused address does not inherit an old ejection).
    pub fn retain(&self, live: &[SocketAddr]) {
        if self.tracked.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut endpoints = self.lock();
        endpoints.retain(|addr, _| live.contains(addr));
        self.sync_len(&endpoints);
    }

    /// How many endpoints are tracked (failed recently, ejected, or with an ejection
    /// history).
    #[cfg(test)]
    pub fn tracked(&self) -> usize {
        self.tracked.load(Ordering::Relaxed)
    }
}

impl Default for OutlierDetector {
    fn default() -> Self {
        Self::new(OutlierSettings::default())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn ep(last: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, last], 15008))
    }

    fn detector(settings: OutlierSettings) -> OutlierDetector {
        OutlierDetector::new(settings)
    }

    #[test]
    fn defaults_eject_on_the_first_failure_for_ten_seconds() {
        let d = OutlierDetector::default();
        assert_eq!(d.settings(), &OutlierSettings::default());
        assert!(d.settings().validate().is_ok());
        let t0 = Instant::now();
        assert!(d.record_failure(ep(1), t0));
        assert!(d.is_ejected(ep(1), t0));
        assert!(d.is_ejected(ep(1), t0 + 10 * S - Duration::from_millis(1)));
        assert!(!d.is_ejected(ep(1), t0 + 10 * S));
        assert!(!d.is_ejected(ep(2), t0));
    }

    #[test]
    fn the_threshold_counts_consecutive_failures_only() {
        let d = detector(OutlierSettings {
            consecutive_failures: 3,
            ..Default::default()
        });
        let t0 = Instant::now();
        assert!(!d.record_failure(ep(1), t0));
        assert!(!d.record_failure(ep(1), t0));
        d.record_success(ep(1), t0);
        assert_eq!(
            d.tracked(),
            0,
            "a success forgets an endpoint that is not ejected"
        );
        assert!(!d.record_failure(ep(1), t0));
        assert!(!d.record_failure(ep(1), t0));
        assert!(!d.is_ejected(ep(1), t0));
        assert!(d.record_failure(ep(1), t0));
        assert!(d.is_ejected(ep(1), t0));
    }

    #[test]
    fn repeated_ejections_double_up_to_the_maximum() {
        let d = detector(OutlierSettings {
            base_ejection: 10 * S,
            max_ejection: 60 * S,
            ..Default::default()
        });
        let mut now = Instant::now();
        for expected in [10, 20, 40, 60, 60] {
            assert!(d.record_failure(ep(1), now));
            let length = expected * S;
            assert!(d.is_ejected(ep(1), now + length - Duration::from_millis(1)));
            assert!(
                !d.is_ejected(ep(1), now + length),
                "ejection {expected}s too long"
            );
            // Back in rotation, and it fails again at once.
            now += length;
        }
    }

    #[test]
    fn failures_during_an_ejection_neither_extend_it_nor_count() {
        let d = detector(OutlierSettings {
            consecutive_failures: 2,
            ..Default::default()
        });
        let t0 = Instant::now();
        d.record_failure(ep(1), t0);
        assert!(d.record_failure(ep(1), t0));
        for i in 1..5 {
            assert!(!d.record_failure(ep(1), t0 + i * S));
        }
        assert!(!d.is_ejected(ep(1), t0 + 10 * S));
        // After the ejection the count starts afresh: one failure is not enough.
        assert!(!d.record_failure(ep(1), t0 + 10 * S));
        assert!(d.record_failure(ep(1), t0 + 10 * S));
        // And the second ejection is twice as long.
        assert!(d.is_ejected(ep(1), t0 + 29 * S));
        assert!(!d.is_ejected(ep(1), t0 + 30 * S));
    }

    #[test]
    fn a_success_after_the_ejection_forgets_the_history() {
        let d = OutlierDetector::default();
        let t0 = Instant::now();
        d.record_failure(ep(1), t0);
        let back = t0 + 10 * S;
        d.record_success(ep(1), back);
        assert_eq!(d.tracked(), 0);
        // The next ejection is a first one again: 10 s, not 20 s.
        assert!(d.record_failure(ep(1), back));
        assert!(!d.is_ejected(ep(1), back + 10 * S));
    }

    #[test]
    fn a_success_during_an_ejection_ends_it_but_keeps_the_count() {
        let d = OutlierDetector::default();
        let t0 = Instant::now();
        d.record_failure(ep(1), t0);
        d.record_success(ep(1), t0 + S);
        assert!(!d.is_ejected(ep(1), t0 + S));
        assert_eq!(d.tracked(), 1);
        // Relapse: second ejection, 20 s.
        assert!(d.record_failure(ep(1), t0 + 2 * S));
        assert!(d.is_ejected(ep(1), t0 + 21 * S));
        assert!(!d.is_ejected(ep(1), t0 + 22 * S));
    }

    #[test]
    fn choose_keeps_a_healthy_wanted_endpoint() {
        let d = OutlierDetector::default();
        let t0 = Instant::now();
        let all = [ep(1), ep(2), ep(3)];
        assert_eq!(d.choose(ep(1), &all, t0), ep(1), "nothing tracked");
        d.record_failure(ep(2), t0);
        assert_eq!(d.choose(ep(1), &all, t0), ep(1));
        assert_eq!(d.choose(ep(3), &all, t0), ep(3));
    }

    #[test]
    fn choose_round_robins_over_healthy_alternatives() {
        let d = OutlierDetector::default();
        let t0 = Instant::now();
        let all = [ep(1), ep(2), ep(3), ep(4)];
        d.record_failure(ep(1), t0);
        let picks: Vec<SocketAddr> = (0..6).map(|_| d.choose(ep(1), &all, t0)).collect();
        assert!(!picks.contains(&ep(1)));
        for alt in [ep(2), ep(3), ep(4)] {
            assert_eq!(picks.iter().filter(|p| **p == alt).count(), 2, "{picks:?}");
        }
        // Once the ejection is over, the wanted endpoint is used again.
        assert_eq!(d.choose(ep(1), &all, t0 + 10 * S), ep(1));
    }

    #[test]
    fn choose_considers_the_wanted_endpoint_part_of_the_pool() {
        let d = OutlierDetector::default();
        let t0 = Instant::now();
        d.record_failure(ep(1), t0);
        // Candidates without the wanted one: it counts anyway (pool of 2, 1 may be ejected).
        assert_eq!(d.choose(ep(1), &[ep(2)], t0), ep(2));
        // No alternative at all: the wanted endpoint, ejected or not.
        assert_eq!(d.choose(ep(1), &[], t0), ep(1));
        assert_eq!(d.choose(ep(1), &[ep(1)], t0), ep(1));
    }

    #[test]
    fn beyond_max_ejection_percent_the_soonest_to_return_are_used_again() {
        let d = OutlierDetector::default(); // 50 %
        let all = [ep(1), ep(2), ep(3), ep(4)];
        let t0 = Instant::now();
        // ep(4) has a history: its second ejection is 20 s and ends last.
        d.record_failure(ep(4), t0);
        d.record_success(ep(4), t0);
        d.record_failure(ep(1), t0);
        d.record_failure(ep(2), t0 + S);
        d.record_failure(ep(4), t0 + 2 * S);
        let now = t0 + 3 * S;
        // 3 of 4 ejected, 2 allowed: the one ejected first (ep(1), back at 10 s) is usable.
        assert_eq!(d.choose(ep(1), &all, now), ep(1));
        let picks: Vec<SocketAddr> = (0..4).map(|_| d.choose(ep(2), &all, now)).collect();
        assert!(
            picks.iter().all(|p| [ep(1), ep(3)].contains(p)),
            "{picks:?}"
        );
        assert!(picks.contains(&ep(1)) && picks.contains(&ep(3)));
        assert_ne!(d.choose(ep(4), &all, now), ep(4));
        // The flags themselves are not changed by panic mode.
        assert!(d.is_ejected(ep(1), now));
        assert_eq!(d.ejected_count(now), 3);
    }

    #[test]
    fn with_every_endpoint_ejected_the_first_to_return_is_used() {
        let d = detector(OutlierSettings {
            max_ejection_percent: 100,
            ..Default::default()
        });
        let all = [ep(1), ep(2), ep(3)];
        let t0 = Instant::now();
        d.record_failure(ep(2), t0);
        d.record_failure(ep(3), t0 + S);
        d.record_failure(ep(1), t0 + 2 * S);
        let now = t0 + 3 * S;
        assert_eq!(d.choose(ep(1), &all, now), ep(2));
        assert_eq!(d.choose(ep(3), &all, now), ep(2));
        assert_eq!(d.choose(ep(2), &all, now), ep(2));
    }

    #[test]
    fn at_least_one_endpoint_may_be_ejected_and_zero_percent_disables_ejection_effects() {
        let t0 = Instant::now();
        let pair = [ep(1), ep(2)];
        // 10 % of 2 rounds down to 0, but one ejection is always allowed.
        let d = detector(OutlierSettings {
            max_ejection_percent: 10,
            ..Default::default()
        });
        d.record_failure(ep(1), t0);
        assert_eq!(d.choose(ep(1), &pair, t0), ep(2));
        // 0 %: ejection is off; a failure neither ejects (nor is counted as an ejection) nor
        // changes where connections go.
        let d = detector(OutlierSettings {
            max_ejection_percent: 0,
            ..Default::default()
        });
        assert!(!d.record_failure(ep(1), t0));
        assert!(!d.is_ejected(ep(1), t0));
        assert_eq!(d.choose(ep(1), &pair, t0), ep(1));
    }

    #[test]
    fn retain_drops_endpoints_that_left_discovery() {
        let d = OutlierDetector::default();
        let t0 = Instant::now();
        d.record_failure(ep(1), t0);
        d.record_failure(ep(2), t0);
        d.retain(&[ep(2), ep(3)]);
        assert_eq!(d.tracked(), 1);
        assert!(!d.is_ejected(ep(1), t0), "a reused address starts clean");
        assert!(d.is_ejected(ep(2), t0));
    }

    #[test]
    fn memory_is_bounded_and_active_ejections_are_kept_longest() {
        let d = detector(OutlierSettings {
            consecutive_failures: 2,
            ..Default::default()
        });
        let t0 = Instant::now();
        let addr = |i: usize| SocketAddr::from(([10, 1, (i >> 8) as u8, i as u8], 80));
        // One real ejection, then a flood of single failures (below the threshold).
        d.record_failure(ep(1), t0);
        d.record_failure(ep(1), t0);
        for i in 0..MAX_TRACKED + 100 {
            d.record_failure(addr(i), t0 + Duration::from_millis(i as u64));
        }
        assert!(d.tracked() <= MAX_TRACKED);
        let later = t0 + 5 * S;
        assert!(
            d.is_ejected(ep(1), later),
            "the ejection survived the flood"
        );
        // The newest failures are the ones kept: the last address's first failure counts.
        let last = MAX_TRACKED + 99;
        assert!(
            d.record_failure(addr(last), later),
            "its second failure ejects it"
        );
        // The oldest single failures were the ones dropped.
        assert!(
            !d.record_failure(addr(0), later),
            "its first failure was forgotten"
        );
    }

    #[test]
    fn a_map_full_of_active_ejections_stops_tracking_new_endpoints() {
        let d = OutlierDetector::default();
        let t0 = Instant::now();
        let addr = |i: usize| SocketAddr::from(([10, 2, (i >> 8) as u8, i as u8], 80));
        for i in 0..MAX_TRACKED {
            assert!(d.record_failure(addr(i), t0));
        }
        assert!(!d.record_failure(ep(1), t0));
        assert!(!d.is_ejected(ep(1), t0));
        // Once those ejections are old, there is room again.
        assert!(d.record_failure(ep(1), t0 + 400 * S));
    }

    #[test]
    fn settings_validation_names_the_problem() {
        let bad = [
            OutlierSettings {
                consecutive_failures: 0,
                ..Default::default()
            },
            OutlierSettings {
                base_ejection: Duration::ZERO,
                ..Default::default()
            },
            OutlierSettings {
                max_ejection: S,
                ..Default::default()
            },
            OutlierSettings {
                max_ejection_percent: 101,
                ..Default::default()
            },
        ];
        for settings in bad {
            assert!(settings.validate().is_err(), "{settings:?}");
        }
        // new() brings them into range rather than misbehaving.
        let d = detector(OutlierSettings {
            consecutive_failures: 0,
            max_ejection: S,
            max_ejection_percent: 200,
            ..Default::default()
        });
        assert_eq!(d.settings().consecutive_failures, 1);
        assert_eq!(d.settings().max_ejection, 10 * S);
        assert_eq!(d.settings().max_ejection_percent, 100);
    }

    #[test]
    fn concurrent_reports_from_many_threads_stay_consistent() {
        let d = Arc::new(OutlierDetector::default());
        let t0 = Instant::now();
        let threads: Vec<_> = (0..8u8)
            .map(|t| {
                let d = d.clone();
                std::thread::spawn(move || {
                    for i in 0..1000u32 {
                        let e = ep(t * 10 + (i % 10) as u8);
                        if i % 3 == 0 {
                            d.record_success(e, t0);
                        } else {
                            d.record_failure(e, t0);
                        }
                        let _ = d.choose(e, &[ep(1), ep(2), ep(3)], t0);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(d.tracked(), d.lock().len());
    }
}
