//! Latency histograms (HdrHistogram, 3 significant digits) and error tallies, kept per
//! thread and merged at the end, so recording never takes a lock.

use hdrhistogram::Histogram;
use serde_json::{Value, json};

/// Most error messages kept as samples in a report.
const ERROR_SAMPLES: usize = 5;

/// Nanosecond latencies from 100 ns to 2 minutes.
pub struct Latency(Histogram<u64>);

impl Latency {
    pub fn new() -> Self {
        // The bounds are constants that hdrhistogram accepts; this cannot fail.
        Self(Histogram::new_with_bounds(100, 120_000_000_000, 3).expect("valid histogram bounds"))
    }

    pub fn record_ns(&mut self, ns: u64) {
        self.0.saturating_record(ns.max(1));
    }

    pub fn merge(&mut self, other: &Latency) {
        // Same bounds on both sides, and saturating: adding cannot fail.
        let _ = self.0.add(&other.0);
    }

    /// Every non-empty bucket as `[highest equivalent value in ns, count]`, ascending, so
    /// that runs can be merged exactly by whoever reads the report.
    pub fn buckets(&self) -> Value {
        let buckets: Vec<[u64; 2]> = self
            .0
            .iter_recorded()
            .map(|v| {
                [
                    self.0.highest_equivalent(v.value_iterated_to()),
                    v.count_at_value(),
                ]
            })
            .collect();
        json!(buckets)
    }

    /// `{count, mean, p50, p90, p99, p999, max}` in microseconds (null when empty).
    pub fn summary_us(&self) -> Value {
        if self.0.is_empty() {
            return json!({"count": 0, "mean": null, "p50": null, "p90": null, "p99": null, "p999": null, "max": null});
        }
        let us = |ns: u64| (ns as f64 / 100.0).round() / 10.0;
        json!({
            "count": self.0.len(),
            "mean": (self.0.mean() / 100.0).round() / 10.0,
            "p50": us(self.0.value_at_quantile(0.50)),
            "p90": us(self.0.value_at_quantile(0.90)),
            "p99": us(self.0.value_at_quantile(0.99)),
            "p999": us(self.0.value_at_quantile(0.999)),
            "max": us(self.0.max()),
        })
    }
}

/// Counts of successes and failures, with the first few failure messages.
#[derive(Default)]
pub struct Tally {
    pub ok: u64,
    pub errors: u64,
    pub samples: Vec<String>,
}

impl Tally {
    pub fn error(&mut self, message: impl std::fmt::Display) {
        self.errors += 1;
        if self.samples.len() < ERROR_SAMPLES {
            self.samples.push(message.to_string());
        }
    }

    pub fn merge(&mut self, other: Tally) {
        self.ok += other.ok;
        self.errors += other.errors;
        for sample in other.samples {
            if self.samples.len() < ERROR_SAMPLES {
                self.samples.push(sample);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summarises_in_microseconds() {
        let mut a = Latency::new();
        let mut b = Latency::new();
        for i in 1..=1000u64 {
            a.record_ns(i * 1000);
        }
        b.record_ns(5_000_000);
        a.merge(&b);
        let s = a.summary_us();
        assert_eq!(s["count"], 1001);
        let p50 = s["p50"].as_f64().unwrap();
        assert!((499.0..=502.0).contains(&p50), "{p50}");
        // 3 significant digits: within 0.1%.
        let max = s["max"].as_f64().unwrap();
        assert!((4995.0..=5005.0).contains(&max), "{max}");
        assert_eq!(Latency::new().summary_us()["p99"], Value::Null);
        let buckets = a.buckets();
        let buckets = buckets.as_array().unwrap();
        let total: u64 = buckets.iter().map(|b| b[1].as_u64().unwrap()).sum();
        assert_eq!(total, 1001);
        let last = buckets.last().unwrap();
        assert!((4_995_000..=5_005_000).contains(&last[0].as_u64().unwrap()));
    }

    #[test]
    fn keeps_a_few_samples() {
        let mut t = Tally::default();
        for i in 0..10 {
            t.error(i);
        }
        let mut u = Tally {
            ok: 3,
            ..Tally::default()
        };
        u.error("x");
        t.merge(u);
        assert_eq!((t.ok, t.errors, t.samples.len()), (3, 11, ERROR_SAMPLES));
    }
}
