//! The vision tower at other resolutions and with window attention (the
//! paper's appendix E.3), on `../shared/fixtures/tiny-qwen-vl` (ViT width 64,
//! 4 heads, 2 blocks, 448 px = a 32×32 grid).
//!
//! Invariant checked: a vision program built with `VitAttention::Window`
//! computes, block by block, exactly what attention restricted to each
//! `window × window` square of patches computes. The reference for that is a
//! graph built here from primitive ops only (rows gathered per window,
//! MatMul/Softmax/MatMul per head, rows scattered back), independent of
//! `Mask::Window`, its window indexing and its expansion, run on the f64
//! reference interpreter; the program under test runs on the CPU backend.

mod common;
use common::{check, fixtures, rel_err, Expected};
use qvc_ir::{DType, Graph, InputRef, NodeId, WeightSource};
use qvc_model::config::Config;
use qvc_model::engine::ModelError;
use qvc_model::graphs::{VisionOptions, VitAttention, VitAttentionError};
use qvc_model::image::preprocess;
use qvc_model::posembed::resize_pos_embed;
use qvc_model::{LoadOptions, Model, Session};
use qvc_runtime::{Backend, Cpu, Reference};
use std::collections::HashMap;
use std::path::Path;

fn load(dir: &Path, image_size: Option<usize>, vit_attention: VitAttention) -> Result<Model, ModelError> {
    Model::load(dir, &LoadOptions { image_size, vit_attention, ..Default::default() })
}

fn window(window: usize, global_every: usize) -> VitAttention {
    VitAttention::Window { window, global_every }
}

/// Features of the model's own vision program with `attention` on `backend`.
fn features(m: &Model, attention: VitAttention, backend: &dyn Backend, pixels: &[f32]) -> Vec<f32> {
    let g = m.vision_graph(&VisionOptions { attention, ..Default::default() }).unwrap();
    let inputs = HashMap::from([("pixels".to_string(), InputRef::F32(pixels))]);
    backend.run(&g, &m.weights, &inputs).unwrap().remove("features").unwrap()
}

/// The rows of each `w × w` square of a `grid × grid` row-major patch grid
/// (edge squares are smaller), computed directly from the geometry.
fn windows(grid: usize, w: usize) -> Vec<Vec<i32>> {
    let starts: Vec<usize> = (0..grid).step_by(w).collect();
    let mut out = vec![];
    for &r0 in &starts {
        for &c0 in &starts {
            let rows = (r0..(r0 + w).min(grid))
                .flat_map(|r| (c0..(c0 + w).min(grid)).map(move |c| (r * grid + c) as i32))
                .collect();
            out.push(rows);
        }
    }
    out
}

/// The vision tower written out with primitive attention, for comparison.
struct Explicit<'a> {
    g: Graph,
    m: &'a Model,
}

impl Explicit<'_> {
    fn p(&mut self, name: &str) -> NodeId {
        let (dtype, shape) = self.m.weights.info(name).unwrap_or_else(|| panic!("fixture lacks {name}"));
        let shape = shape.0.clone();
        self.g.param(name, dtype, shape)
    }
    fn ln(&mut self, x: NodeId, prefix: &str) -> NodeId {
        let (w, b) = (self.p(&format!("{prefix}.weight")), self.p(&format!("{prefix}.bias")));
        self.g.layer_norm(x, w, b, 1e-6).unwrap()
    }
    fn lin(&mut self, x: NodeId, prefix: &str, bias: bool) -> NodeId {
        let w = self.p(&format!("{prefix}.weight"));
        let y = self.g.matmul_t(x, w).unwrap();
        if bias {
            let b = self.p(&format!("{prefix}.bias"));
            self.g.add(y, b).unwrap()
        } else {
            y
        }
    }
    /// Plain multi-head attention `q [n, H, d]`, `k = v [m, H, d]` → `[n, H, d]`.
    fn dense(&mut self, q: NodeId, k: NodeId, v: NodeId, scale: f32) -> NodeId {
        let g = &mut self.g;
        let q = g.permute(q, vec![1, 0, 2]).unwrap();
        let k = g.permute(k, vec![1, 0, 2]).unwrap();
        let v = g.permute(v, vec![1, 0, 2]).unwrap();
        let s = g.matmul_t(q, k).unwrap();
        let sc = g.scalar(scale);
        let s = g.mul(s, sc).unwrap();
        let p = g.softmax(s).unwrap();
        let o = g.matmul(p, v).unwrap();
        g.permute(o, vec![1, 0, 2]).unwrap()
    }
    /// Self-attention inside each window: gather the window's rows of q, k
    /// and v (`[t, H, d]`), attend densely, scatter the result rows back.
    fn windowed(&mut self, q: NodeId, k: NodeId, v: NodeId, wins: &[NodeId], scale: f32) -> NodeId {
        let s = self.g.shape(q).clone();
        let (t, h, d) = (s.dim(0), s.dim(1), s.dim(2));
        let flat = |g: &mut Graph, x: NodeId| g.reshape(x, vec![t, h * d]).unwrap();
        let (qf, kf, vf) = (flat(&mut self.g, q), flat(&mut self.g, k), flat(&mut self.g, v));
        let mut out = self.g.constant(vec![0.0; t * h * d], vec![t, h * d]).unwrap();
        for &rows in wins {
            let n = self.g.shape(rows).dim(0);
            let mut pick = |x: NodeId| {
                let r = self.g.gather(x, rows).unwrap();
                self.g.reshape(r, vec![n, h, d]).unwrap()
            };
            let (qw, kw, vw) = (pick(qf), pick(kf), pick(vf));
            let o = self.dense(qw, kw, vw, scale);
            let o = self.g.reshape(o, vec![n, h * d]).unwrap();
            out = self.g.scatter_rows(out, o, rows).unwrap();
        }
        self.g.reshape(out, vec![t, h, d]).unwrap()
    }
}

/// `pixels [3, S, S]` → `features`, block `j` attending globally when
/// `global(j)`, else inside the windows whose rows are the inputs `win.{i}`.
fn explicit_vision(m: &Model, wins: &[Vec<i32>], global: impl Fn(usize) -> bool) -> Graph {
    let v = &m.config.visual;
    let (width, heads, hd, t, d) = (v.width, v.heads, v.head_dim(), v.grid() * v.grid(), v.output_dim);
    let mut ex = Explicit { g: Graph::new(), m };
    let e = &mut ex;
    let px = e.g.input("pixels", DType::F32, vec![3, v.image_size, v.image_size]);
    let wins: Vec<NodeId> =
        wins.iter().enumerate().map(|(i, r)| e.g.input(&format!("win.{i}"), DType::I32, vec![r.len()])).collect();
    let conv = e.p("transformer.visual.conv1.weight");
    let mut x = e.g.conv2d_patch(px, conv, v.patch_size).unwrap();
    let pos = e.g.constant(m.vit_pos_embed().to_vec(), vec![t, width]).unwrap();
    x = e.g.add(x, pos).unwrap();
    x = e.ln(x, "transformer.visual.ln_pre");
    let scale = 1.0 / (hd as f32).sqrt();
    for j in 0..v.layers {
        let pre = format!("transformer.visual.transformer.resblocks.{j}");
        let h = e.ln(x, &format!("{pre}.ln_1"));
        let qkv = e.lin(h, &format!("{pre}.attn.in_proj"), true);
        let qkv = e.g.reshape(qkv, vec![t, heads, 3 * hd]).unwrap();
        let q = e.g.slice(qkv, 2, 0, hd).unwrap();
        let k = e.g.slice(qkv, 2, hd, 2 * hd).unwrap();
        let vv = e.g.slice(qkv, 2, 2 * hd, 3 * hd).unwrap();
        let a = if global(j) { e.dense(q, k, vv, scale) } else { e.windowed(q, k, vv, &wins, scale) };
        let a = e.g.reshape(a, vec![t, width]).unwrap();
        let o = e.lin(a, &format!("{pre}.attn.out_proj"), true);
        x = e.g.add(x, o).unwrap();
        let h = e.ln(x, &format!("{pre}.ln_2"));
        let mlp = e.lin(h, &format!("{pre}.mlp.c_fc"), true);
        let mlp = e.g.gelu(mlp).unwrap();
        let mlp = e.lin(mlp, &format!("{pre}.mlp.c_proj"), true);
        x = e.g.add(x, mlp).unwrap();
    }
    let ap = "transformer.visual.attn_pool";
    let kv = e.lin(x, &format!("{ap}.kv_proj"), false);
    let kv = e.ln(kv, &format!("{ap}.ln_kv"));
    let query = e.p(&format!("{ap}.query"));
    let q = e.ln(query, &format!("{ap}.ln_q"));
    let qpos = e.p(&format!("{ap}.pos_embed"));
    let q = e.g.add(q, qpos).unwrap();
    let kpos = e.g.constant(m.pool_pos_embed().to_vec(), vec![t, d]).unwrap();
    let kk = e.g.add(kv, kpos).unwrap();
    let w_in = e.p(&format!("{ap}.attn.in_proj_weight"));
    let b_in = e.p(&format!("{ap}.attn.in_proj_bias"));
    let (nh, nq) = (v.pool_heads(), v.queries());
    let phd = d / nh;
    let mut proj = |x: NodeId, i: usize, rows: usize| {
        let wi = e.g.slice(w_in, 0, i * d, (i + 1) * d).unwrap();
        let bi = e.g.slice(b_in, 0, i * d, (i + 1) * d).unwrap();
        let y = e.g.matmul_t(x, wi).unwrap();
        let y = e.g.add(y, bi).unwrap();
        e.g.reshape(y, vec![rows, nh, phd]).unwrap()
    };
    let (qh, kh, vh) = (proj(q, 0, nq), proj(kk, 1, t), proj(kv, 2, t));
    let a = e.dense(qh, kh, vh, 1.0 / (phd as f32).sqrt());
    let a = e.g.reshape(a, vec![nq, d]).unwrap();
    let o = e.lin(a, &format!("{ap}.attn.out_proj"), true);
    let o = e.ln(o, "transformer.visual.ln_post");
    let pw = e.p("transformer.visual.proj");
    let f = e.g.matmul(o, pw).unwrap();
    e.g.set_output("features", f);
    ex.g
}

/// Run the explicit graph on the reference interpreter.
fn explicit_features(m: &Model, wins: &[Vec<i32>], global: impl Fn(usize) -> bool, pixels: &[f32]) -> Vec<f32> {
    let g = explicit_vision(m, wins, global);
    let names: Vec<String> = (0..wins.len()).map(|i| format!("win.{i}")).collect();
    let mut inputs = HashMap::from([("pixels".to_string(), InputRef::F32(pixels))]);
    for (name, rows) in names.iter().zip(wins) {
        inputs.insert(name.clone(), InputRef::I32(rows));
    }
    Reference.run(&g, &m.weights, &inputs).unwrap().remove("features").unwrap()
}

/// (a) Window attention against attention computed window by window from
/// primitives: at 448 px (32×32 grid, window 8: sixteen full squares, block 1
/// global), and at 602 px (a 43×43 grid, position tables resized, window 12:
/// edge squares of 7, no global block).
#[test]
fn window_attention_matches_explicit_windows() {
    let Some(dir) = fixtures() else { return };
    let e = Expected::load(&dir);
    let cases = [(None, 8, 2), (Some(602), 12, 0)];
    for (size, w, every) in cases {
        let m = load(&dir, size, VitAttention::Global).unwrap();
        let v = &m.config.visual;
        let px = match size {
            None => e.f32("pixels/shapes.png"),
            Some(s) => preprocess(&dir.join("shapes.png"), s as u32).unwrap(),
        };
        let wins = windows(v.grid(), w);
        // Every patch in exactly one window.
        let mut seen = vec![0; v.grid() * v.grid()];
        wins.iter().flatten().for_each(|&r| seen[r as usize] += 1);
        assert!(seen.iter().all(|&n| n == 1));
        let got = features(&m, window(w, every), &Cpu, &px);
        let want = explicit_features(&m, &wins, |j| every > 0 && (j + 1) % every == 0, &px);
        assert_eq!(got.len(), 256 * v.output_dim);
        check(&format!("window:{w},global-every:{every} at grid {}", v.grid()), &got, &want, 1e-4);
        // The windows matter: global attention gives clearly different features.
        let global = features(&m, VitAttention::Global, &Cpu, &px);
        let r = rel_err(&global, &want);
        eprintln!("global vs windowed at grid {}: rel diff {r:.2e}", v.grid());
        assert!(r > 1e-3, "window attention had no effect ({r:e})");
    }
}

/// (a) Degenerate windows: a global block every block is the Global program
/// itself; a window covering the whole grid sees every key.
#[test]
fn degenerate_windows_equal_global_attention() {
    let Some(dir) = fixtures() else { return };
    let e = Expected::load(&dir);
    let m = load(&dir, None, VitAttention::Global).unwrap();
    let px = e.f32("pixels/shapes.png");
    let global_graph = m.vision_graph(&VisionOptions::default()).unwrap();
    let every = m.vision_graph(&VisionOptions { attention: window(8, 1), ..Default::default() }).unwrap();
    assert_eq!(format!("{every}"), format!("{global_graph}"));
    let global = features(&m, VitAttention::Global, &Cpu, &px);
    assert_eq!(features(&m, window(8, 1), &Cpu, &px), global);
    // The parity target stays the PyTorch features.
    check("global features", &global, &e.f32("vision/shapes.png"), 1e-4);
    let grid = m.config.visual.grid();
    for w in [grid, grid + 5] {
        let g = m.vision_graph(&VisionOptions { attention: window(w, 0), ..Default::default() }).unwrap();
        assert!(format!("{g}").contains("window"), "window:{w} built no window attention");
        check(&format!("window:{w} on a {grid}-grid"), &features(&m, window(w, 0), &Cpu, &px), &global, 1e-6);
    }
}

/// Which blocks attend globally (the appendix E.3 rule).
#[test]
fn global_every_picks_blocks() {
    let a = window(4, 3);
    let global: Vec<usize> = (0..9).filter(|&j| a.mask(j, 16) == qvc_ir::Mask::None).collect();
    assert_eq!(global, [2, 5, 8]);
    assert_eq!(window(4, 0).mask(11, 16), qvc_ir::Mask::Window { grid_h: 16, grid_w: 16, window: 4 });
    assert!((0..5).all(|j| VitAttention::Global.mask(j, 16) == qvc_ir::Mask::None));
}

/// (b) 896 px: a 64×64 grid of 4096 patches, still 256 output vectors.
#[test]
fn image_size_896_encodes() {
    let Some(dir) = fixtures() else { return };
    let png = dir.join("shapes.png");
    let raw = |m: &Model, name: &str| m.weights.weight(name).unwrap().to_f32_vec();
    let mut feats = vec![];
    for att in [VitAttention::Global, window(16, 2)] {
        let m = load(&dir, Some(896), att).unwrap();
        let v = &m.config.visual;
        assert_eq!((v.image_size, v.grid()), (896, 64));
        assert_eq!(m.vit_attention(), att);
        assert_eq!(m.vit_pos_embed().len(), 4096 * v.width);
        assert_eq!(m.pool_pos_embed().len(), 4096 * v.output_dim);
        // The tables are the checkpoint's 16×16 ones resized to 64×64.
        let vit = resize_pos_embed(&raw(&m, "transformer.visual.positional_embedding"), 16, 64, v.width);
        assert_eq!(m.vit_pos_embed(), &vit[..]);
        let pool = resize_pos_embed(&raw(&m, "transformer.visual.attn_pool.pos_embed"), 16, 64, v.output_dim);
        assert_eq!(m.pool_pos_embed(), &pool[..]);
        let g = m.vision_graph(&m.vision_options()).unwrap();
        assert_eq!(g.inputs()[0].1.shape.0, [3, 896, 896]);

        let cpu = Cpu;
        let mut s = Session::new(&m, &cpu);
        let f = s.encode_image(png.to_str().unwrap()).unwrap();
        assert_eq!(f.len(), 256 * v.output_dim);
        assert!(f.iter().all(|x| x.is_finite()));
        // encode_image preprocesses at 896 and uses the loaded attention.
        let px = preprocess(&png, 896).unwrap();
        assert_eq!(features(&m, att, &cpu, &px), f);
        feats.push(f);
    }
    let r = rel_err(&feats[1], &feats[0]);
    eprintln!("896: window:16,global-every:2 vs global: rel diff {r:.2e}");
    assert!(r > 1e-3, "window attention had no effect at 896 ({r:e})");
}

/// The configured size as an explicit option is the same model.
#[test]
fn native_image_size_override_is_identity() {
    let Some(dir) = fixtures() else { return };
    let (a, b) =
        (load(&dir, None, VitAttention::Global).unwrap(), load(&dir, Some(448), VitAttention::Global).unwrap());
    assert_eq!(a.config, b.config);
    assert_eq!(a.vit_pos_embed(), b.vit_pos_embed());
    assert_eq!(a.pool_pos_embed(), b.pool_pos_embed());
}

/// (c) Bad options are typed errors that name the bad part.
#[test]
fn bad_options_are_clear_errors() {
    let Some(dir) = fixtures() else { return };
    for size in [900, 0, 13] {
        match load(&dir, Some(size), VitAttention::Global) {
            Err(e @ ModelError::ImageSize { size: s, patch: 14 }) if s == size => {
                let msg = e.to_string();
                assert!(msg.contains(&size.to_string()) && msg.contains("14"), "{msg}");
            }
            Err(e) => panic!("image size {size}: wrong error {e}"),
            Ok(_) => panic!("image size {size} was accepted"),
        }
    }
    match load(&dir, None, window(0, 2)) {
        Err(ModelError::VitAttention(VitAttentionError::ZeroWindow)) => {}
        Err(e) => panic!("window 0: wrong error {e}"),
        Ok(_) => panic!("window 0 was accepted"),
    }
    let m = load(&dir, None, VitAttention::Global).unwrap();
    let zero = VisionOptions { attention: window(0, 0), ..Default::default() };
    assert!(matches!(m.vision_graph(&zero), Err(ModelError::VitAttention(VitAttentionError::ZeroWindow))));
    // The graph builder itself refuses too, without panicking.
    let cfg: &Config = &m.config;
    let err = qvc_model::graphs::vision_graph(
        cfg,
        &m.weights,
        m.vit_pos_embed().to_vec(),
        m.pool_pos_embed().to_vec(),
        &zero,
    );
    assert!(err.is_err());
}

#[test]
fn vit_attention_parses() {
    use VitAttentionError as E;
    let ok = [
        ("global", VitAttention::Global),
        ("window:8", window(8, 0)),
        ("window:16,global-every:4", window(16, 4)),
        (" window:7 , global-every:0 ", window(7, 0)),
    ];
    for (s, want) in ok {
        let got: VitAttention = s.parse().unwrap();
        assert_eq!(got, want, "{s}");
        assert_eq!(got.to_string().parse::<VitAttention>().unwrap(), got, "round trip of {s}");
    }
    let bad = [
        ("window:x", E::Window("x".into())),
        ("window:", E::Window("".into())),
        ("window:-3", E::Window("-3".into())),
        ("window:0", E::ZeroWindow),
        ("window:8,global-every:y", E::GlobalEvery("y".into())),
        ("window:8,every:2", E::UnknownPart("every:2".into())),
        ("window:8,global-every:2,z", E::UnknownPart("z".into())),
        ("local", E::Syntax("local".into())),
        ("", E::Syntax("".into())),
    ];
    for (s, want) in bad {
        let err = s.parse::<VitAttention>().unwrap_err();
        assert_eq!(err, want, "{s}");
        eprintln!("{s:?}: {err}");
    }
    // Messages quote the offending text.
    assert!(E::Window("x".into()).to_string().contains("\"x\""));
}
