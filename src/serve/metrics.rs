//! The counters of `GET /metrics`, in Prometheus' text exposition format (version 0.0.4).
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the latency histogram's buckets; `+Inf` follows.
const LATENCY_BUCKETS: [f64; 12] = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

#[derive(Default)]
struct Latency {
    /// Answers at or under each bound (not cumulative; `render` sums them).
    buckets: [u64; LATENCY_BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// Upper bounds of the batch-size histogram's buckets (requests per batched generation).
const BATCH_BUCKETS: [usize; 7] = [1, 2, 4, 8, 16, 32, 64];

#[derive(Default)]
pub struct Metrics {
    by_status: Mutex<BTreeMap<u16, u64>>,
    latency: Mutex<Latency>,
    images: AtomicU64,
    credits_charged: AtomicU64,
    credits_refunded: AtomicU64,
    /// Batches at or under each bound of `BATCH_BUCKETS` (not cumulative), their count and sum.
    batches: Mutex<([u64; BATCH_BUCKETS.len()], u64, u64)>,
}

impl Metrics {
    /// One HTTP answer with `status`, `elapsed` after its request arrived.
    pub fn answered(&self, status: u16, elapsed: Duration) {
        *self.by_status.lock().unwrap_or_else(|e| e.into_inner()).entry(status).or_default() += 1;
        let s = elapsed.as_secs_f64();
        let mut l = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = LATENCY_BUCKETS.iter().position(|&b| s <= b) {
            l.buckets[i] += 1;
        }
        l.count += 1;
        l.sum += s;
    }

    pub fn served(&self, images: u64, credits: u64) {
        self.images.fetch_add(images, Ordering::SeqCst);
        self.credits_charged.fetch_add(credits, Ordering::SeqCst);
    }

    /// One generation of `size` requests together.
    pub fn batch(&self, size: usize) {
        let mut b = self.batches.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = BATCH_BUCKETS.iter().position(|&bound| size <= bound) {
            b.0[i] += 1;
        }
        b.1 += 1;
        b.2 += size as u64;
    }

    pub fn refunded(&self, credits: u64) {
        self.credits_refunded.fetch_add(credits, Ordering::SeqCst);
    }

    /// The exposition text, with `queue_depth` requests waiting now.
    pub fn render(&self, queue_depth: usize) -> String {
        let mut out = String::new();
        let w = &mut out;
        let _ = writeln!(w, "# HELP sdkd_http_requests_total HTTP answers by status code.");
        let _ = writeln!(w, "# TYPE sdkd_http_requests_total counter");
        for (status, n) in self.by_status.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(w, "sdkd_http_requests_total{{code=\"{status}\"}} {n}");
        }
        let l = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(w, "# HELP sdkd_http_request_duration_seconds Time from a request's arrival to its answer.");
        let _ = writeln!(w, "# TYPE sdkd_http_request_duration_seconds histogram");
        let mut cumulative = 0;
        for (bound, n) in LATENCY_BUCKETS.iter().zip(l.buckets) {
            cumulative += n;
            let _ = writeln!(w, "sdkd_http_request_duration_seconds_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(w, "sdkd_http_request_duration_seconds_bucket{{le=\"+Inf\"}} {}", l.count);
        let _ = writeln!(w, "sdkd_http_request_duration_seconds_sum {}", l.sum);
        let _ = writeln!(w, "sdkd_http_request_duration_seconds_count {}", l.count);
        drop(l);
        let b = self.batches.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(w, "# HELP sdkd_batch_size Requests per batched generation (--max-batch).");
        let _ = writeln!(w, "# TYPE sdkd_batch_size histogram");
        let mut cumulative = 0;
        for (bound, n) in BATCH_BUCKETS.iter().zip(b.0) {
            cumulative += n;
            let _ = writeln!(w, "sdkd_batch_size_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(w, "sdkd_batch_size_bucket{{le=\"+Inf\"}} {}", b.1);
        let _ = writeln!(w, "sdkd_batch_size_sum {}", b.2);
        let _ = writeln!(w, "sdkd_batch_size_count {}", b.1);
        drop(b);
        for (name, kind, help, value) in [
            ("sdkd_queue_depth", "gauge", "Generation requests waiting for the pipeline.", queue_depth as u64),
            ("sdkd_images_total", "counter", "Images delivered.", self.images.load(Ordering::SeqCst)),
            ("sdkd_credits_charged_total", "counter", "Credits kept for delivered images.", self.credits_charged.load(Ordering::SeqCst)),
            ("sdkd_credits_refunded_total", "counter", "Credits given back for requests not delivered.", self.credits_refunded.load(Ordering::SeqCst)),
        ] {
            let _ = writeln!(w, "# HELP {name} {help}");
            let _ = writeln!(w, "# TYPE {name} {kind}");
            let _ = writeln!(w, "{name} {value}");
        }
        out
    }
}
