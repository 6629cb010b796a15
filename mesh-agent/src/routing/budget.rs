//! The retry budget: retries may add at most a fixed share of load on top of the requests
//! carried, so retries cannot turn a partial outage into a full one (Linkerd's and
//! Finagle's retry budget).
//!
//! At any moment, with `R` the original requests and `r` the retries recorded in the last
//! `window` (10 s by default):
//!
//! ```text
//! r <= min_retries_per_second × window + ratio × R
//! ```
//!
//! [`RetryBudget::try_retry`] grants a retry only if it keeps that true (and records it).
//! Retries are not requests: they add no allowance. So with the upstream failing every
//! attempt, over any run no longer than `window`,
//! `attempts = R + r <= R × (1 + ratio) + min_retries_per_second × window`; over a longer
//! run the reserve `min_retries_per_second × window` is granted again per window.
//!
//! The window slides in [`BUCKETS`] steps: counts live in a ring of buckets of
//! `window / BUCKETS` each, and a bucket older than the window is reset when its slot comes
//! round again. Every operation is a handful of atomic loads and one compare-and-swap, with
//! no lock: one budget is shared by every connection to a virtual service. Concurrent
//! `try_retry` calls are serialised on the current bucket's counter, so they cannot
//! overshoot the budget together (except across the instant a bucket turns over, by at most
//! the number of callers racing there).
//!
//! Every method has an `_at(now)` form taking the time, so tests drive the clock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How many steps the window slides in.
pub const BUCKETS: usize = 10;

/// `[routing.retry_budget]`, validated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryBudgetSettings {
    /// Retries per original request, 0 to 1.
    pub ratio: f64,
    /// Retries always allowed per second.
    pub min_retries_per_second: u32,
    /// The window requests and retries are counted over (at least [`BUCKETS`] ms).
    pub window: Duration,
}

impl Default for RetryBudgetSettings {
    fn default() -> Self {
        RetryBudgetSettings {
            ratio: 0.2,
            min_retries_per_second: 10,
            window: Duration::from_secs(10),
        }
    }
}

impl RetryBudgetSettings {
    /// The retries granted per window whatever the traffic: `min_retries_per_second × window`.
    pub fn reserve(&self) -> u64 {
        (f64::from(self.min_retries_per_second) * self.window.as_secs_f64()).floor() as u64
    }
}

/// Allowance is computed in millionths of a retry, so a ratio like 0.2 is exact.
const MICRO: u64 = 1_000_000;

/// One counter of one bucket: the bucket's tick in the high 32 bits, the count in the low 32
/// (saturating). A tick that is not the caller's reads as 0 (the slot was last used one or
/// more windows ago).
#[derive(Debug, Default)]
struct Counter(AtomicU64);

impl Counter {
    fn pack(tick: u32, count: u32) -> u64 {
        (u64::from(tick) << 32) | u64::from(count)
    }

    fn unpack(v: u64) -> (u32, u32) {
        ((v >> 32) as u32, v as u32)
    }

    /// The count if the slot holds tick `tick`.
    fn get(&self, tick: u32) -> u64 {
        let (t, c) = Self::unpack(self.0.load(Ordering::Acquire));
        if t == tick { u64::from(c) } else { 0 }
    }

    /// Adds one for tick `tick` if `allow(current count)` says so; a slot holding an older
    /// tick starts again from 0. Returns whether it added.
    fn add_if(&self, tick: u32, allow: impl Fn(u64) -> bool) -> bool {
        let mut cur = self.0.load(Ordering::Acquire);
        loop {
            let (t, c) = Self::unpack(cur);
            let count = if t == tick { c } else { 0 };
            if !allow(u64::from(count)) {
                return false;
            }
            let next = Self::pack(tick, count.saturating_add(1));
            match self
                .0
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return true,
                Err(actual) => cur = actual,
            }
        }
    }
}

/// A retry budget for one virtual service (or whatever the proxy shares it over).
#[derive(Debug)]
pub struct RetryBudget {
    settings: RetryBudgetSettings,
    ratio_micro: u64,
    reserve_micro: u64,
    tick_len: Duration,
    start: Instant,
    requests: [Counter; BUCKETS],
    retries: [Counter; BUCKETS],
}

impl RetryBudget {
    pub fn new(settings: RetryBudgetSettings) -> RetryBudget {
        Self::starting_at(settings, Instant::now())
    }

    /// A budget whose clock starts at `start` (for the `_at` methods).
    pub fn starting_at(settings: RetryBudgetSettings, start: Instant) -> RetryBudget {
        let ratio = if settings.ratio.is_finite() {
            settings.ratio.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let window = settings.window.max(Duration::from_millis(BUCKETS as u64));
        RetryBudget {
            settings,
            ratio_micro: (ratio * MICRO as f64).round() as u64,
            reserve_micro: settings.reserve().saturating_mul(MICRO),
            tick_len: window / BUCKETS as u32,
            start,
            requests: Default::default(),
            retries: Default::default(),
        }
    }

    pub fn settings(&self) -> &RetryBudgetSettings {
        &self.settings
    }

    /// Records an original request (not a retry). Call it once per request, before its first
    /// attempt.
    pub fn record_request(&self) {
        self.record_request_at(Instant::now());
    }

    /// Asks to retry a failed attempt: true (and the retry is counted) if the budget allows
    /// it, false if the failure must be returned to the client.
    pub fn try_retry(&self) -> bool {
        self.try_retry_at(Instant::now())
    }

    /// Retries the budget would grant now.
    pub fn available(&self) -> u64 {
        self.available_at(Instant::now())
    }

    pub fn record_request_at(&self, now: Instant) {
        let tick = self.tick(now);
        self.requests[Self::slot(tick)].add_if(tick, |_| true);
    }

    pub fn try_retry_at(&self, now: Instant) -> bool {
        let tick = self.tick(now);
        let allowance = self.allowance_micro(tick);
        let earlier = self.retries_in_window(tick, false);
        self.retries[Self::slot(tick)].add_if(tick, |current| {
            (earlier + current + 1).saturating_mul(MICRO) <= allowance
        })
    }

    pub fn available_at(&self, now: Instant) -> u64 {
        let tick = self.tick(now);
        let used = self.retries_in_window(tick, true).saturating_mul(MICRO);
        self.allowance_micro(tick).saturating_sub(used) / MICRO
    }

    fn tick(&self, now: Instant) -> u32 {
        let elapsed = now.saturating_duration_since(self.start);
        (elapsed.as_nanos() / self.tick_len.as_nanos().max(1)) as u32
    }

    fn slot(tick: u32) -> usize {
        tick as usize % BUCKETS
    }

    /// The ticks of the window ending at `tick` (fewer near the start of the clock).
    fn window(tick: u32) -> impl Iterator<Item = u32> {
        (0..BUCKETS as u32).filter_map(move |back| tick.checked_sub(back))
    }

    fn allowance_micro(&self, tick: u32) -> u64 {
        let requests: u64 = Self::window(tick)
            .map(|t| self.requests[Self::slot(t)].get(t))
            .sum();
        self.reserve_micro
            .saturating_add(requests.saturating_mul(self.ratio_micro))
    }

    fn retries_in_window(&self, tick: u32, include_current: bool) -> u64 {
        Self::window(tick)
            .filter(|t| include_current || *t != tick)
            .map(|t| self.retries[Self::slot(t)].get(t))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(ratio: f64, min: u32) -> RetryBudgetSettings {
        RetryBudgetSettings {
            ratio,
            min_retries_per_second: min,
            window: Duration::from_secs(10),
        }
    }

    /// Sends `requests` requests spread over `span` (deterministic jitter) to an upstream
    /// that fails every attempt, each retried up to `max_retries` times while the budget
    /// allows. Returns the attempts made.
    fn failing_upstream(
        budget: &RetryBudget,
        t0: Instant,
        requests: u64,
        span: Duration,
        max_retries: u32,
        seed: u64,
    ) -> u64 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut times: Vec<Duration> = (0..requests).map(|_| span.mul_f64(rng.f64())).collect();
        times.sort();
        let mut attempts = 0;
        for t in times {
            let now = t0 + t;
            budget.record_request_at(now);
            attempts += 1;
            for _ in 0..max_retries {
                if !budget.try_retry_at(now) {
                    break;
                }
                attempts += 1;
            }
        }
        attempts
    }

    #[test]
    fn a_failing_upstream_gets_at_most_the_budget() {
        // Within one window the bound of the issue holds exactly, for any ratio and rate.
        for (ratio, min, requests, seed) in [
            (0.2, 10, 2000, 1),
            (0.2, 0, 2000, 2),
            (0.2, 10, 50, 3),
            (0.0, 10, 1000, 4),
            (1.0, 0, 1000, 5),
            (0.33, 3, 777, 6),
        ] {
            let s = settings(ratio, min);
            let t0 = Instant::now();
            let budget = RetryBudget::starting_at(s, t0);
            let attempts =
                failing_upstream(&budget, t0, requests, Duration::from_millis(9_999), 3, seed);
            let bound = requests as f64 * (1.0 + ratio) + f64::from(min) * 10.0;
            assert!(
                attempts as f64 <= bound,
                "ratio {ratio} min {min}: {attempts} attempts for {requests} requests (bound {bound})"
            );
            // ...and the budget is used, not just respected: all of it is granted when
            // requests keep failing.
            assert!(
                attempts as f64 >= bound - 3.0 - requests as f64 * ratio * 0.15,
                "ratio {ratio} min {min}: only {attempts} attempts (bound {bound})"
            );
        }
    }

    #[test]
    fn a_long_outage_is_bounded_per_window() {
        // Over 60 s (6 windows) the reserve is granted again each window; the ratio part
        // never exceeds ratio × requests.
        let s = settings(0.2, 10);
        let t0 = Instant::now();
        let budget = RetryBudget::starting_at(s, t0);
        let requests = 12_000;
        let attempts = failing_upstream(&budget, t0, requests, Duration::from_secs(60), 3, 9);
        let retries = attempts - requests;
        let windows = 6 + 1; // a sliding window can straddle two aligned ones
        let bound = requests as f64 * 0.2 + 100.0 * windows as f64;
        assert!(retries as f64 <= bound, "{retries} retries > {bound}");
        // Steady traffic (200/s): each retry window holds ~2,000 requests -> ~400 + 100.
        assert!(
            retries >= 2_400,
            "{retries} retries: the budget is too stingy"
        );
    }

    #[test]
    fn bursts_cannot_spend_a_deposit_twice() {
        // 1,000 successful requests, then failures just inside and just after their window:
        // their 200 retries of allowance are granted once.
        let s = settings(0.2, 0);
        let t0 = Instant::now();
        let budget = RetryBudget::starting_at(s, t0);
        for _ in 0..1000 {
            budget.record_request_at(t0);
        }
        let mut retries = 0;
        for ms in (0..30_000).step_by(100) {
            while budget.try_retry_at(t0 + Duration::from_millis(ms)) {
                retries += 1;
            }
        }
        assert_eq!(retries, 200);
        // Once the requests are out of the window, nothing is left.
        assert_eq!(budget.available_at(t0 + Duration::from_secs(11)), 0);
    }

    #[test]
    fn the_reserve_refills_as_the_window_slides() {
        let s = settings(0.0, 1); // 10 retries per 10 s
        let t0 = Instant::now();
        let budget = RetryBudget::starting_at(s, t0);
        assert_eq!(budget.available_at(t0), 10);
        let granted = (0..20).filter(|_| budget.try_retry_at(t0)).count();
        assert_eq!(granted, 10);
        assert!(!budget.try_retry_at(t0 + Duration::from_millis(9_999)));
        // The bucket of t0 leaves the window after 10 s.
        assert!(budget.try_retry_at(t0 + Duration::from_secs(10)));
        assert_eq!(budget.available_at(t0 + Duration::from_secs(10)), 9);
    }

    #[test]
    fn ratio_one_allows_a_retry_per_request() {
        let s = settings(1.0, 0);
        let t0 = Instant::now();
        let budget = RetryBudget::starting_at(s, t0);
        assert!(!budget.try_retry_at(t0));
        budget.record_request_at(t0);
        assert!(budget.try_retry_at(t0));
        assert!(!budget.try_retry_at(t0));
    }

    #[test]
    fn concurrent_callers_do_not_overshoot() {
        let s = settings(0.5, 0);
        let budget = std::sync::Arc::new(RetryBudget::new(s));
        for _ in 0..1000 {
            budget.record_request();
        }
        let granted: usize = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let b = budget.clone();
                    scope.spawn(move || (0..1000).filter(|_| b.try_retry()).count())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        // 1 s buckets: the test runs well inside one, so the grant is exact.
        assert_eq!(granted, 500);
    }

    #[test]
    fn counters_reset_when_their_slot_comes_round() {
        let c = Counter::default();
        assert!(c.add_if(3, |_| true));
        assert!(c.add_if(3, |_| true));
        assert_eq!(c.get(3), 2);
        assert_eq!(c.get(13), 0);
        assert!(c.add_if(13, |n| n == 0));
        assert_eq!(c.get(13), 1);
        assert_eq!(c.get(3), 0);
    }
}
