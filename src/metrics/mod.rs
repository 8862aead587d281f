//! Lock-free latency histograms recorded on the hot path once per transaction (never per
//! message), encoded by the admin API at scrape time.
//!
//! prometheus-client's own `Histogram` takes a write lock per observation; with every worker
//! thread ending transactions on the same pool that lock would be contended, so the counts
//! here are plain atomics and only the encoder touches prometheus-client.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Upper bounds in seconds, from half a millisecond (a pooled SELECT) to half a minute.
pub const BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

// Bucket indexes (`BUCKETS.len() + 1` of them) fit [`LocalHistogram`]'s `u16` bitmap.
const _: () = assert!(BUCKETS.len() < 16);

/// [`BUCKETS`] in nanoseconds: an observation is placed by integer compares, not by a float
/// conversion and float compares (three observations per transaction).
const BUCKET_NANOS: [u64; BUCKETS.len()] = {
    let mut nanos = [0; BUCKETS.len()];
    let mut i = 0;
    while i < BUCKETS.len() {
        nanos[i] = (BUCKETS[i] * 1e9) as u64;
        i += 1;
    }
    nanos
};

/// The bucket `d` falls in (the last one is +Inf) and `d` in whole microseconds.
#[inline]
fn place(d: Duration) -> (usize, u64) {
    // u64 nanoseconds last 584 years; the saturation only keeps the arithmetic total.
    let nanos = d
        .as_secs()
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::from(d.subsec_nanos()));
    let i = BUCKET_NANOS.iter().position(|&b| nanos <= b).unwrap_or(BUCKETS.len());
    (i, nanos / 1_000)
}

/// Counters and histograms written on every transaction are split into per-thread shards, so
/// the workers do not bounce one cache line between cores on each update; a scrape sums them.
pub(crate) const SHARDS: usize = 8;

/// Keeps each shard on its own cache lines (128 bytes: adjacent-line prefetch pairs lines).
#[repr(align(128))]
#[derive(Debug, Default)]
pub(crate) struct Padded<T>(pub(crate) T);

/// This thread's shard. Threads are numbered as they first touch a metric; the counter only
/// spreads threads over shards and holds no state anyone reads.
pub(crate) fn shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local!(static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS);
    SHARD.with(|s| *s)
}

/// A u64 counter offering the `AtomicU64` calls the code uses, sharded per thread.
#[derive(Debug, Default)]
pub struct StripedCounter {
    shards: [Padded<AtomicU64>; SHARDS],
}

impl StripedCounter {
    pub fn fetch_add(&self, n: u64, order: Ordering) {
        self.shards[shard()].0.fetch_add(n, order);
    }

    pub fn load(&self, order: Ordering) -> u64 {
        self.shards.iter().map(|s| s.0.load(order)).sum()
    }
}

#[derive(Debug, Default)]
struct HistogramShard {
    /// Per-bucket (not cumulative) counts; the last slot is +Inf.
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

/// A fixed-bucket histogram of durations.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    shards: [Padded<HistogramShard>; SHARDS],
}

impl LatencyHistogram {
    pub fn observe(&self, d: Duration) {
        let (i, micros) = place(d);
        let shard = &self.shards[shard()].0;
        shard.counts[i].fetch_add(1, Ordering::Relaxed);
        shard.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// Adds a session-local histogram (folded once per transaction).
    pub fn merge(&self, local: &LocalHistogram) {
        let shard = &self.shards[shard()].0;
        // Only the buckets the transaction used (usually one), not a walk over all of them.
        let mut touched = local.touched;
        while touched != 0 {
            let i = touched.trailing_zeros() as usize;
            touched &= touched - 1;
            shard.counts[i].fetch_add(local.counts[i], Ordering::Relaxed);
        }
        shard.sum_micros.fetch_add(local.sum_micros, Ordering::Relaxed);
    }

    /// A consistent-enough copy for encoding (counters only grow; a scrape racing an
    /// observation may see the count before the sum, which Prometheus tolerates).
    pub fn snapshot(&self) -> HistogramSnapshot {
        // prometheus-client's encoder makes the bucket counts cumulative itself.
        let mut count = 0;
        let mut buckets = Vec::with_capacity(BUCKETS.len() + 1);
        for i in 0..=BUCKETS.len() {
            let n: u64 = self.shards.iter().map(|s| s.0.counts[i].load(Ordering::Relaxed)).sum();
            count += n;
            buckets.push((BUCKETS.get(i).copied().unwrap_or(f64::INFINITY), n));
        }
        let sum_micros: u64 = self.shards.iter().map(|s| s.0.sum_micros.load(Ordering::Relaxed)).sum();
        HistogramSnapshot(Arc::new(Mutex::new(SnapshotInner {
            sum: sum_micros as f64 / 1e6,
            count,
            buckets,
        })))
    }
}

/// A plain (non-atomic) histogram a session fills during a transaction and merges at its end,
/// so per-query observations cost no shared-memory traffic.
#[derive(Debug, Default, Clone)]
pub struct LocalHistogram {
    counts: [u64; BUCKETS.len() + 1],
    sum_micros: u64,
    /// Bit i set: `counts[i]` > 0.
    touched: u16,
}

impl LocalHistogram {
    pub fn observe(&mut self, d: Duration) {
        let (i, micros) = place(d);
        self.counts[i] += 1;
        self.touched |= 1 << i;
        self.sum_micros += micros;
    }

    pub fn is_empty(&self) -> bool {
        self.touched == 0
    }
}

#[derive(Debug, Default)]
struct SnapshotInner {
    sum: f64,
    count: u64,
    buckets: Vec<(f64, u64)>,
}

/// An encodable copy of a [`LatencyHistogram`]. `Default` + shared interior so it can live in
/// a prometheus-client `Family` built at scrape time.
#[derive(Debug, Clone, Default)]
pub struct HistogramSnapshot(Arc<Mutex<SnapshotInner>>);

impl HistogramSnapshot {
    /// Copies `other`'s values into this (family-owned) instance.
    pub fn set_from(&self, other: &HistogramSnapshot) {
        let src = other.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut dst = self.0.lock().unwrap_or_else(|e| e.into_inner());
        dst.sum = src.sum;
        dst.count = src.count;
        dst.buckets = src.buckets.clone();
    }
}

impl TypedMetric for HistogramSnapshot {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for HistogramSnapshot {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        encoder.encode_histogram::<NoLabelSet>(inner.sum, inner.count, &inner.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sharded_counts_add_up_across_threads() {
        let counter = StripedCounter::default();
        let histogram = LatencyHistogram::default();
        std::thread::scope(|scope| {
            for _ in 0..12 {
                scope.spawn(|| {
                    for _ in 0..1000 {
                        counter.fetch_add(2, Ordering::Relaxed);
                        histogram.observe(Duration::from_millis(3));
                    }
                });
            }
        });
        assert_eq!(counter.load(Ordering::Relaxed), 24_000);
        let s = histogram.snapshot();
        let inner = s.0.lock().unwrap();
        assert_eq!(inner.count, 12_000);
        assert!((inner.sum - 36.0).abs() < 1e-9, "{}", inner.sum);
        assert_eq!(inner.buckets[3], (0.005, 12_000), "3 ms falls in the 5 ms bucket");
    }

    #[test]
    fn local_histograms_merge() {
        let h = LatencyHistogram::default();
        let mut l = LocalHistogram::default();
        assert!(l.is_empty());
        l.observe(Duration::from_millis(2));
        l.observe(Duration::from_millis(2));
        h.merge(&l);
        h.merge(&l);
        let s = h.snapshot();
        let inner = s.0.lock().unwrap();
        assert_eq!(inner.count, 4);
        assert!((inner.sum - 0.008).abs() < 1e-9);
    }

    #[test]
    fn a_local_histogram_merges_every_bucket_it_used_and_no_other() {
        let h = LatencyHistogram::default();
        let mut l = LocalHistogram::default();
        for d in [
            Duration::from_micros(100),
            Duration::from_millis(3),
            Duration::from_millis(3),
            Duration::from_secs(20),
            Duration::from_secs(60),
        ] {
            l.observe(d);
        }
        assert!(!l.is_empty());
        h.merge(&l);
        let s = h.snapshot();
        let inner = s.0.lock().unwrap();
        let counts: Vec<u64> = inner.buckets.iter().map(|b| b.1).collect();
        let mut want = vec![0; BUCKETS.len() + 1];
        want[0] = 1;
        want[3] = 2;
        want[BUCKETS.len() - 1] = 1;
        want[BUCKETS.len()] = 1;
        assert_eq!(counts, want);
    }

    #[test]
    fn observations_on_a_bound_fall_in_its_bucket() {
        // The bounds as float seconds and as integer nanoseconds agree, edges included.
        for (i, &b) in BUCKETS.iter().enumerate() {
            let bound = Duration::from_secs_f64(b);
            assert_eq!(place(bound).0, i, "{b} s");
            assert_eq!(place(bound + Duration::from_nanos(1)).0, i + 1, "just over {b} s");
        }
        assert_eq!(place(Duration::ZERO), (0, 0));
        assert_eq!(place(Duration::MAX).0, BUCKETS.len());
        assert_eq!(place(Duration::from_nanos(2_500_999)).1, 2_500);
    }

    #[test]
    fn buckets_count_each_observation_once() {
        let h = LatencyHistogram::default();
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let s = h.snapshot();
        let inner = s.0.lock().unwrap();
        assert_eq!(inner.count, 3);
        assert_eq!(inner.buckets[0], (0.0005, 1));
        assert_eq!(inner.buckets[3], (0.005, 1));
        assert_eq!(inner.buckets.last().unwrap().1, 1, "+Inf holds the 60 s observation");
        assert_eq!(inner.buckets.iter().map(|b| b.1).sum::<u64>(), 3);
        assert!((inner.sum - 60.0033).abs() < 1e-6);
    }
}
