//! Attention over a padded KV-cache bucket (six inputs: the cache is `P`
//! rows of which only the first `past_len` are keys, a run-time value) must
//! equal attention over an exact-length cache, on both backends; rows past
//! `past_len` hold garbage and must not matter. On the CPU backend the two
//! are bit-identical (a batched decode pads every cache to the longest, and
//! a sequence's logits must not depend on that padding).

mod common;
use common::*;

use proptest::prelude::*;
use qvc_ir::{DType, Graph, InputRef, WeightSource};
use qvc_runtime::{Backend, Cpu, Reference};
use std::collections::HashMap;

struct NoWeights;
impl WeightSource for NoWeights {
    fn weight(&self, _: &str) -> Option<qvc_ir::Elems<'_>> {
        None
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn padded_cache_equals_exact_cache(t in 1usize..4, past in 0usize..20, pad in 0usize..9, heads in 1usize..3,
                                       d in 1usize..9, seed in 0u64..1000) {
        padded_vs_exact(t, past, pad, heads, d, seed)?;
    }
}

/// Decode shapes: one query over caches past the CPU kernel's 256-key block
/// (so the blocks of the padded and the exact cache must split alike), with
/// much padding.
#[test]
fn padded_decode_cache_is_bit_identical_over_key_blocks() {
    for (past, pad) in [(255, 1), (256, 300), (300, 212), (600, 5)] {
        padded_vs_exact(1, past, pad, 2, 16, past as u64).unwrap();
    }
}

fn padded_vs_exact(t: usize, past: usize, pad: usize, heads: usize, d: usize, seed: u64) -> Result<(), TestCaseError> {
    let cap = past + pad;
    let scale = 1.0 / (d as f32).sqrt();
    let q = vals(t * heads * d, seed);
    let k = vals(t * heads * d, seed + 1);
    let v = vals(t * heads * d, seed + 2);
    // The bucket: `past` real rows, then garbage the mask must hide.
    let mut ck = vals(cap * heads * d, seed + 3);
    let mut cv = vals(cap * heads * d, seed + 4);
    for x in ck[past * heads * d..].iter_mut().chain(cv[past * heads * d..].iter_mut()) {
        *x *= 1e3;
    }
    let exact_k = ck[..past * heads * d].to_vec();
    let exact_v = cv[..past * heads * d].to_vec();
    let len = [past as f32];

    let mut gp = Graph::new();
    let (iq, ik, iv) = (
        gp.input("q", DType::F32, vec![t, heads, d]),
        gp.input("k", DType::F32, vec![t, heads, d]),
        gp.input("v", DType::F32, vec![t, heads, d]),
    );
    let pk = gp.input("ck", DType::F32, vec![cap, heads, d]);
    let pv = gp.input("cv", DType::F32, vec![cap, heads, d]);
    let pl = gp.input("past_len", DType::F32, vec![1, 1]);
    let o = gp.attention_padded(iq, ik, iv, pk, pv, pl, scale).unwrap();
    gp.set_output("o", o);

    let mut ge = Graph::new();
    let (eq, ek, ev) = (
        ge.input("q", DType::F32, vec![t, heads, d]),
        ge.input("k", DType::F32, vec![t, heads, d]),
        ge.input("v", DType::F32, vec![t, heads, d]),
    );
    let o = if past > 0 {
        let xk = ge.input("ck", DType::F32, vec![past, heads, d]);
        let xv = ge.input("cv", DType::F32, vec![past, heads, d]);
        ge.attention_cached(eq, ek, ev, xk, xv, scale).unwrap()
    } else {
        ge.attention(eq, ek, ev, qvc_ir::Mask::Causal, scale).unwrap()
    };
    ge.set_output("o", o);

    let mut ins: HashMap<String, InputRef> = HashMap::new();
    ins.insert("q".into(), InputRef::F32(&q));
    ins.insert("k".into(), InputRef::F32(&k));
    ins.insert("v".into(), InputRef::F32(&v));
    let mut exact = ins.clone();
    exact.insert("ck".into(), InputRef::F32(&exact_k));
    exact.insert("cv".into(), InputRef::F32(&exact_v));
    ins.insert("ck".into(), InputRef::F32(&ck));
    ins.insert("cv".into(), InputRef::F32(&cv));
    ins.insert("past_len".into(), InputRef::F32(&len));

    let want = Reference.run(&ge, &NoWeights, &exact).unwrap().remove("o").unwrap();
    // The yardstick: the same attention over |v| (see `rel_to`; at d = 1 one
    // output is a sum of 20 signed values, which can cancel to 1e-3 of them).
    let (abs_v, abs_exact_v) =
        (v.iter().map(|x| x.abs()).collect::<Vec<_>>(), exact_v.iter().map(|x| x.abs()).collect::<Vec<_>>());
    let mut abs_ins = exact.clone();
    abs_ins.insert("v".into(), InputRef::F32(&abs_v));
    abs_ins.insert("cv".into(), InputRef::F32(&abs_exact_v));
    let mag = Reference.run(&ge, &NoWeights, &abs_ins).unwrap().remove("o").unwrap();
    for b in [&Reference as &dyn Backend, &Cpu] {
        let got = b.run(&gp, &NoWeights, &ins).unwrap().remove("o").unwrap();
        let r = rel_to(&got, &want, &mag);
        prop_assert!(r < 1e-5, "{}: error {r:e} of the values' magnitudes (t {t}, past {past}, pad {pad})", b.name());
    }
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let padded = Cpu.run(&gp, &NoWeights, &ins).unwrap().remove("o").unwrap();
    let exact = Cpu.run(&ge, &NoWeights, &exact).unwrap().remove("o").unwrap();
    prop_assert!(bits(&padded) == bits(&exact), "cpu: padded cache differs from exact (t {t}, past {past}, pad {pad})");
    Ok(())
}

#[test]
fn past_len_outside_the_bucket_is_an_error() {
    let mut g = Graph::new();
    let q = g.input("q", DType::F32, vec![1, 1, 2]);
    let ck = g.input("ck", DType::F32, vec![4, 1, 2]);
    let pl = g.input("past_len", DType::F32, vec![1, 1]);
    let o = g.attention_padded(q, q, q, ck, ck, pl, 1.0).unwrap();
    g.set_output("o", o);
    let (x, c, len) = ([1.0f32, 2.0], [0.5f32; 8], [5.0f32]);
    let ins: HashMap<String, InputRef> = [
        ("q".to_string(), InputRef::F32(&x)),
        ("ck".to_string(), InputRef::F32(&c)),
        ("past_len".to_string(), InputRef::F32(&len)),
    ]
    .into();
    let e = Cpu.run(&g, &NoWeights, &ins).unwrap_err();
    assert!(e.to_string().contains("past_len"), "{e}");
}
