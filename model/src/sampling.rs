//! Choosing the next token from logits: repetition penalty, temperature,
//! top-k, top-p, then a seeded draw; temperature 0 (or `greedy`) takes the
//! argmax over every id, special and unused rows included, as the reference.

/// How to pick tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = off).
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens (0 = off).
    pub top_k: usize,
    /// Divide positive (multiply negative) logits of seen tokens by this (1 = off).
    pub repetition_penalty: f32,
    pub seed: u64,
}

/// Sampling settings a caller (command-line flags, an HTTP request) gives;
/// `None` falls back to the checkpoint's `generation_config.json`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SamplingOverrides {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub repetition_penalty: Option<f32>,
}

impl SamplingParams {
    /// `o` over the defaults of `g`: a checkpoint whose `do_sample` is false
    /// defaults to greedy, whatever its `temperature` says (as the reference).
    pub fn with_defaults(g: &crate::config::GenerationConfig, o: &SamplingOverrides, seed: u64) -> Self {
        SamplingParams {
            temperature: o.temperature.unwrap_or(if g.do_sample { g.temperature } else { 0.0 }),
            top_p: o.top_p.unwrap_or(g.top_p),
            top_k: o.top_k.unwrap_or(g.top_k),
            repetition_penalty: o.repetition_penalty.unwrap_or(g.repetition_penalty),
            seed,
        }
    }

    pub fn greedy() -> Self {
        SamplingParams { temperature: 0.0, top_p: 1.0, top_k: 0, repetition_penalty: 1.0, seed: 0 }
    }
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
    /// Reject values that cannot mean anything, naming the flag.
    pub fn validate(&self) -> Result<(), String> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(format!("--temperature must be 0 (greedy) or positive, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("--top-p must be in (0, 1], got {}", self.top_p));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return Err(format!("--repetition-penalty must be positive, got {}", self.repetition_penalty));
        }
        Ok(())
    }
}

/// A small, fast, seedable generator (SplitMix64): sampling needs
/// reproducibility, not cryptographic quality.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best
}

/// Pick the next token. `seen` are the ids the repetition penalty applies to
/// (prompt and generated so far).
pub fn sample(logits: &[f32], seen: &[u32], p: &SamplingParams, rng: &mut Rng) -> u32 {
    let mut l = logits.to_vec();
    if p.repetition_penalty != 1.0 {
        let mut done = std::collections::HashSet::new();
        for &id in seen {
            let i = id as usize;
            if i < l.len() && done.insert(i) {
                l[i] = if l[i] < 0.0 { l[i] * p.repetition_penalty } else { l[i] / p.repetition_penalty };
            }
        }
    }
    if p.is_greedy() {
        return argmax(&l) as u32;
    }
    let mut idx: Vec<usize> = (0..l.len()).collect();
    idx.sort_unstable_by(|&a, &b| l[b].total_cmp(&l[a]).then(a.cmp(&b)));
    if p.top_k > 0 {
        idx.truncate(p.top_k.max(1));
    }
    let max = l[idx[0]] as f64;
    let probs: Vec<f64> = idx.iter().map(|&i| ((l[i] as f64 - max) / p.temperature as f64).exp()).collect();
    let total: f64 = probs.iter().sum();
    // top-p: the smallest prefix of the sorted tokens whose mass reaches top_p.
    let mut keep = probs.len();
    if p.top_p < 1.0 {
        let mut cum = 0.0;
        for (j, q) in probs.iter().enumerate() {
            cum += q / total;
            if cum >= p.top_p as f64 {
                keep = j + 1;
                break;
            }
        }
    }
    let mass: f64 = probs[..keep].iter().sum();
    let mut r = rng.next_f64() * mass;
    for j in 0..keep {
        r -= probs[j];
        if r < 0.0 {
            return idx[j] as u32;
        }
    }
    idx[keep - 1] as u32
}

/// OpenAI's presence and frequency penalties over the generated tokens:
/// `logit[t] -= presence · (count[t] > 0) + frequency · count[t]`, where
/// `counts` maps each generated id to how often it was generated.
pub fn apply_penalties(
    logits: &mut [f32],
    counts: &std::collections::HashMap<u32, u32>,
    presence: f32,
    frequency: f32,
) {
    if presence == 0.0 && frequency == 0.0 {
        return;
    }
    for (&id, &c) in counts {
        if let Some(l) = logits.get_mut(id as usize) {
            if c > 0 {
                *l -= presence + frequency * c as f32;
            }
        }
    }
}

/// Log-probabilities (log-softmax in f64, returned as f32) of `id` and of
/// the `k` most likely ids, most likely first (ties: the lower id first).
pub fn log_softmax_top(logits: &[f32], id: u32, k: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max + logits.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln();
    let lp = |i: usize| (logits[i] as f64 - lse) as f32;
    let own = logits.get(id as usize).map_or(f32::NEG_INFINITY, |_| lp(id as usize));
    let k = k.min(logits.len());
    let mut top: Vec<usize> = Vec::with_capacity(k + 1);
    if k > 0 {
        for i in 0..logits.len() {
            let better = |a: usize, b: usize| logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
            if top.len() < k || better(i, top[top.len() - 1]) {
                let at = top.iter().position(|&j| better(i, j)).unwrap_or(top.len());
                top.insert(at, i);
                top.truncate(k);
            }
        }
    }
    (own, top.into_iter().map(|i| (i as u32, lp(i))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_and_penalty_applies() {
        let l = [0.1, 3.0, 2.9, -1.0];
        assert_eq!(sample(&l, &[], &SamplingParams::greedy(), &mut Rng::new(0)), 1);
        let p = SamplingParams { repetition_penalty: 1.2, ..SamplingParams::greedy() };
        assert_eq!(sample(&l, &[1], &p, &mut Rng::new(0)), 2);
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let l: Vec<f32> = (0..50).map(|i| ((i * 37) % 50) as f32 / 10.0).collect();
        let best = argmax(&l) as u32;
        let mut rng = Rng::new(7);
        for _ in 0..20 {
            let k1 = SamplingParams { temperature: 1.0, top_k: 1, ..SamplingParams::greedy() };
            assert_eq!(sample(&l, &[], &k1, &mut rng), best);
            let p0 = SamplingParams { temperature: 1.0, top_p: 1e-6, ..SamplingParams::greedy() };
            assert_eq!(sample(&l, &[], &p0, &mut rng), best);
        }
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_follows_probabilities() {
        let l = [0.0f32, (3.0f32).ln(), f32::NEG_INFINITY];
        let p = SamplingParams { temperature: 1.0, ..SamplingParams::greedy() };
        let draw = |seed| {
            let mut rng = Rng::new(seed);
            (0..4000).map(|_| sample(&l, &[], &p, &mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        let d = draw(3);
        let ones = d.iter().filter(|&&t| t == 1).count() as f64 / d.len() as f64;
        assert!((ones - 0.75).abs() < 0.03, "{ones}");
        assert!(!d.contains(&2));
    }

    #[test]
    fn presence_and_frequency_penalties() {
        let mut l = vec![1.0f32, 2.0, 3.0, 4.0];
        let counts = std::collections::HashMap::from([(1u32, 2u32), (3, 1), (9, 4)]);
        apply_penalties(&mut l, &counts, 0.5, 0.25);
        assert_eq!(l, vec![1.0, 2.0 - 0.5 - 0.5, 3.0, 4.0 - 0.5 - 0.25]);
        let mut same = vec![1.0f32, 2.0];
        apply_penalties(&mut same, &counts, 0.0, 0.0);
        assert_eq!(same, vec![1.0, 2.0]);
        // Greedy picks differently once the leader is penalised.
        let mut g = vec![0.0f32, 5.0, 4.9];
        apply_penalties(&mut g, &std::collections::HashMap::from([(1u32, 1u32)]), 0.2, 0.0);
        assert_eq!(argmax(&g), 2);
    }

    #[test]
    fn log_softmax_top_k() {
        let l = [0.0f32, (3.0f32).ln(), f32::NEG_INFINITY, 0.0];
        let (own, top) = log_softmax_top(&l, 0, 3);
        assert!((own - (0.2f32).ln()).abs() < 1e-6, "{own}");
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 0, 3]);
        assert!((top[0].1 - (0.6f32).ln()).abs() < 1e-6);
        let total: f64 = [0usize, 1, 3].iter().map(|&i| (log_softmax_top(&l, i as u32, 0).0 as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert_eq!(log_softmax_top(&l, 2, 0), (f32::NEG_INFINITY, vec![]));
        assert_eq!(log_softmax_top(&l, 1, 10).1.len(), 4);
    }

    #[test]
    fn validation_names_the_flag() {
        let bad = SamplingParams { top_p: 0.0, ..SamplingParams::greedy() };
        assert!(bad.validate().unwrap_err().contains("--top-p"));
        let bad = SamplingParams { temperature: -1.0, ..SamplingParams::greedy() };
        assert!(bad.validate().unwrap_err().contains("--temperature"));
    }
}
