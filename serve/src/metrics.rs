//! The engine's counters, gauges and histograms, rendered in the Prometheus
//! text exposition format (version 0.0.4) by [`Metrics::render`].
//!
//! | name | type | what |
//! |---|---|---|
//! | `qvc_requests_running` | gauge | requests holding a KV slot (prefill or decode) |
//! | `qvc_requests_waiting` | gauge | requests queued for a slot |
//! | `qvc_kv_slots_used` / `qvc_kv_slots_total` | gauge | KV slots held by a request / all slots |
//! | `qvc_prompt_tokens_total` | counter | prompt tokens of admitted requests (reused ones included) |
//! | `qvc_generation_tokens_total` | counter | tokens generated |
//! | `qvc_prefix_cache_hit_tokens_total` | counter | prompt tokens whose KV rows were reused |
//! | `qvc_vision_cache_hits_total` / `_misses_total` | counter | pictures found in / encoded into the vision-feature cache |
//! | `qvc_request_success_total{finish_reason}` | counter | finished requests, by `stop` / `length` |
//! | `qvc_request_failure_total` | counter | requests that ended with an error |
//! | `qvc_request_cancelled_total` | counter | requests whose client went away |
//! | `qvc_time_to_first_token_seconds` | histogram | submit → first token |
//! | `qvc_inter_token_latency_seconds` | histogram | between consecutive tokens of a request |
//! | `qvc_e2e_request_latency_seconds` | histogram | submit → done |

use std::fmt::Write;
use std::sync::Mutex;

const TTFT_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
const ITL_BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
const E2E_BUCKETS: &[f64] = &[0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];

/// A cumulative histogram with fixed upper bounds.
#[derive(Clone, Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram { bounds, counts: vec![0; bounds.len()], sum: 0.0, count: 0 }
    }
    /// Record one observation (seconds).
    pub fn observe(&mut self, v: f64) {
        for (c, &b) in self.counts.iter_mut().zip(self.bounds) {
            if v <= b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }
    pub fn count(&self) -> u64 {
        self.count
    }
    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (c, b) in self.counts.iter().zip(self.bounds) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

/// Everything counted, one lock (updates are a few per token).
#[derive(Clone, Debug)]
pub struct Counts {
    pub running: usize,
    pub waiting: usize,
    pub slots_used: usize,
    pub slots_total: usize,
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
    pub prefix_hit_tokens: u64,
    pub vision_hits: u64,
    pub vision_misses: u64,
    pub success_stop: u64,
    pub success_length: u64,
    pub failure: u64,
    pub cancelled: u64,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
}

/// The engine's metrics (shared between the scheduler thread and readers).
#[derive(Debug)]
pub struct Metrics(Mutex<Counts>);

impl Default for Metrics {
    fn default() -> Self {
        Metrics(Mutex::new(Counts {
            running: 0,
            waiting: 0,
            slots_used: 0,
            slots_total: 0,
            prompt_tokens: 0,
            generation_tokens: 0,
            prefix_hit_tokens: 0,
            vision_hits: 0,
            vision_misses: 0,
            success_stop: 0,
            success_length: 0,
            failure: 0,
            cancelled: 0,
            ttft: Histogram::new(TTFT_BUCKETS),
            itl: Histogram::new(ITL_BUCKETS),
            e2e: Histogram::new(E2E_BUCKETS),
        }))
    }
}

impl Metrics {
    /// Change the counts under the lock.
    pub fn update<R>(&self, f: impl FnOnce(&mut Counts) -> R) -> R {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// A copy of the counts.
    pub fn snapshot(&self) -> Counts {
        self.update(|c| c.clone())
    }

    /// The Prometheus text format, `# HELP` and `# TYPE` before each family.
    pub fn render(&self) -> String {
        let c = self.snapshot();
        let mut out = String::new();
        let mut one = |name: &str, kind: &str, help: &str, v: String| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        one("qvc_requests_running", "gauge", "Requests holding a KV slot (prefill or decode).", c.running.to_string());
        one("qvc_requests_waiting", "gauge", "Requests waiting for a KV slot.", c.waiting.to_string());
        one("qvc_kv_slots_used", "gauge", "KV-cache slots held by a request.", c.slots_used.to_string());
        one("qvc_kv_slots_total", "gauge", "KV-cache slots (concurrent sequences).", c.slots_total.to_string());
        one("qvc_prompt_tokens_total", "counter", "Prompt tokens of admitted requests.", c.prompt_tokens.to_string());
        one("qvc_generation_tokens_total", "counter", "Tokens generated.", c.generation_tokens.to_string());
        one(
            "qvc_prefix_cache_hit_tokens_total",
            "counter",
            "Prompt tokens whose KV rows were reused instead of prefilled.",
            c.prefix_hit_tokens.to_string(),
        );
        one(
            "qvc_vision_cache_hits_total",
            "counter",
            "Pictures whose vision features were already cached.",
            c.vision_hits.to_string(),
        );
        one(
            "qvc_vision_cache_misses_total",
            "counter",
            "Pictures encoded by the vision tower.",
            c.vision_misses.to_string(),
        );
        one("qvc_request_failure_total", "counter", "Requests that ended with an error.", c.failure.to_string());
        one("qvc_request_cancelled_total", "counter", "Requests cancelled by their client.", c.cancelled.to_string());
        let name = "qvc_request_success_total";
        let _ = writeln!(
            out,
            "# HELP {name} Requests finished, by finish reason.\n# TYPE {name} counter\n\
             {name}{{finish_reason=\"stop\"}} {}\n{name}{{finish_reason=\"length\"}} {}",
            c.success_stop, c.success_length
        );
        c.ttft.render(&mut out, "qvc_time_to_first_token_seconds", "Time from submission to the first token.");
        c.itl.render(&mut out, "qvc_inter_token_latency_seconds", "Time between consecutive tokens of a request.");
        c.e2e.render(&mut out, "qvc_e2e_request_latency_seconds", "Time from submission to the last token.");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.update(|c| {
            c.running = 2;
            c.success_stop = 3;
            c.ttft.observe(0.2);
            c.ttft.observe(7.0);
        });
        let t = m.render();
        assert!(t.contains("# TYPE qvc_requests_running gauge\nqvc_requests_running 2\n"), "{t}");
        assert!(t.contains("qvc_request_success_total{finish_reason=\"stop\"} 3\n"));
        assert!(t.contains("qvc_request_success_total{finish_reason=\"length\"} 0\n"));
        assert!(t.contains("# TYPE qvc_time_to_first_token_seconds histogram"));
        assert!(t.contains("qvc_time_to_first_token_seconds_bucket{le=\"0.1\"} 0\n"));
        assert!(t.contains("qvc_time_to_first_token_seconds_bucket{le=\"0.25\"} 1\n"));
        assert!(t.contains("qvc_time_to_first_token_seconds_bucket{le=\"10\"} 2\n"));
        assert!(t.contains("qvc_time_to_first_token_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(t.contains("qvc_time_to_first_token_seconds_sum 7.2\n"));
        assert!(t.contains("qvc_time_to_first_token_seconds_count 2\n"));
        // Every sample line belongs to a family announced by # TYPE.
        for line in t.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            let family =
                name.trim_end_matches("_bucket").trim_end_matches("_sum").trim_end_matches("_count").to_string();
            assert!(t.contains(&format!("# TYPE {family} ")) || t.contains(&format!("# TYPE {name} ")), "{line}");
        }
    }
}
