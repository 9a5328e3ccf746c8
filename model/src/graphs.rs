//! The three Qwen-VL programs as IR graphs (QWEN-VL.md §4 and §6):
//! `vision` (pixels → 256 feature vectors), and the decoder, built for a
//! prompt (prefill) or for one token over a KV cache (decode). Shapes are
//! concrete; building a graph is cheap (about thirty nodes a layer), so the
//! session builds one per step shape.

use crate::config::Config;
use qvc_ir::{DType, Graph, IrError, Mask, NodeId};
use qvc_runtime::WeightStore;

/// Graph plus the checkpoint it reads params from (for their stored dtypes).
struct B<'a> {
    g: Graph,
    w: &'a WeightStore,
}

impl B<'_> {
    fn p(&mut self, name: &str) -> NodeId {
        let (dtype, shape) = match self.w.info(name) {
            Some((d, s)) => (d, s.0.clone()),
            // Validation runs before graphs are built; an absent tensor here
            // would be caught again by the backend with its name.
            None => (DType::F32, vec![0]),
        };
        self.g.param(name, dtype, shape)
    }
    fn ln(&mut self, x: NodeId, prefix: &str, eps: f32) -> Result<NodeId, IrError> {
        let w = self.p(&format!("{prefix}.weight"));
        let b = self.p(&format!("{prefix}.bias"));
        self.g.layer_norm(x, w, b, eps)
    }
    /// `x·wᵀ (+ b)`. A bias the architecture lacks is still added when the
    /// checkpoint has a nonzero one: GPTQ stores a bias on every quantized
    /// Linear (zeros where the model has none, which are skipped so that the
    /// MLP's SwiGLU still fuses).
    fn lin(&mut self, x: NodeId, prefix: &str, bias: bool) -> Result<NodeId, IrError> {
        let w = self.p(&format!("{prefix}.weight"));
        let bias = bias || self.w.nonzero(&format!("{prefix}.bias"));
        let b = if bias { Some(self.p(&format!("{prefix}.bias"))) } else { None };
        self.g.linear(x, w, b)
    }
}

/// How the ViT blocks attend (`qvc compile --vit-attention`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum VitAttention {
    /// Every block attends over the whole patch grid: what the released
    /// checkpoints were trained with, and the parity target.
    #[default]
    Global,
    /// The paper's appendix E.3 variant: block `j` attends inside
    /// `window × window` squares of patches, except that it attends globally
    /// when `global_every > 0 && (j + 1) % global_every == 0` (0 = never).
    Window { window: usize, global_every: usize },
}

/// A malformed `--vit-attention` value; each variant names the bad part.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VitAttentionError {
    #[error("vit attention {0:?}: expected `global`, `window:W` or `window:W,global-every:N`")]
    Syntax(String),
    #[error("vit attention: the window {0:?} is not a positive whole number of patches")]
    Window(String),
    #[error("vit attention: global-every {0:?} is not a whole number (0 = never)")]
    GlobalEvery(String),
    #[error("vit attention: unknown part {0:?} after the window (expected `global-every:N`)")]
    UnknownPart(String),
    #[error("vit attention: the window must be at least one patch, got 0")]
    ZeroWindow,
}

impl VitAttention {
    /// The attention mask of block `j` on a `grid × grid` patch grid.
    pub fn mask(&self, j: usize, grid: usize) -> Mask {
        match *self {
            VitAttention::Global => Mask::None,
            VitAttention::Window { global_every, .. } if global_every > 0 && (j + 1).is_multiple_of(global_every) => {
                Mask::None
            }
            VitAttention::Window { window, .. } => Mask::Window { grid_h: grid, grid_w: grid, window },
        }
    }

    /// Reject settings no graph can be built for (a zero window).
    pub fn validate(&self) -> Result<(), VitAttentionError> {
        match self {
            VitAttention::Window { window: 0, .. } => Err(VitAttentionError::ZeroWindow),
            _ => Ok(()),
        }
    }
}

impl std::str::FromStr for VitAttention {
    type Err = VitAttentionError;

    /// `global`, `window:W` or `window:W,global-every:N`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if t == "global" {
            return Ok(VitAttention::Global);
        }
        let mut parts = t.split(',');
        let first = parts.next().unwrap_or_default();
        let Some(w) = first.strip_prefix("window:") else {
            return Err(VitAttentionError::Syntax(s.into()));
        };
        let window: usize = w.trim().parse().map_err(|_| VitAttentionError::Window(w.into()))?;
        if window == 0 {
            return Err(VitAttentionError::ZeroWindow);
        }
        let mut global_every = 0;
        match (parts.next(), parts.next()) {
            (None, _) => {}
            (Some(p), None) => {
                let Some(n) = p.trim().strip_prefix("global-every:") else {
                    return Err(VitAttentionError::UnknownPart(p.into()));
                };
                global_every = n.trim().parse().map_err(|_| VitAttentionError::GlobalEvery(n.into()))?;
            }
            (Some(_), Some(extra)) => return Err(VitAttentionError::UnknownPart(extra.into())),
        }
        Ok(VitAttention::Window { window, global_every })
    }
}

impl std::fmt::Display for VitAttention {
    /// The form [`VitAttention::from_str`] reads back (for manifests and summaries).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VitAttention::Global => write!(f, "global"),
            VitAttention::Window { window, global_every: 0 } => write!(f, "window:{window}"),
            VitAttention::Window { window, global_every } => write!(f, "window:{window},global-every:{global_every}"),
        }
    }
}

/// Options for [`vision_graph`].
#[derive(Clone, Debug, Default)]
pub struct VisionOptions {
    /// Also output the intermediates `patch_embed`, `ln_pre`, `block_{j}`,
    /// `resampler`, `ln_post` (for parity tests and debugging).
    pub intermediates: bool,
    /// Global (default) or window attention in the ViT blocks.
    pub attention: VitAttention,
}

/// `pixels [3, S, S]` → `features [256, D]`, with `S = cfg.visual.image_size`
/// (any multiple of the patch size: the grid has `(S/p)²` tokens and the
/// adapter still makes 256 vectors). `vit_pos` is the ViT position table
/// resized to the grid, `pool_pos_k` the adapter's key position table resized
/// likewise (both folded constants, see [`crate::posembed`]). Block `j` uses
/// the mask [`VitAttention::mask`] gives it.
pub fn vision_graph(
    cfg: &Config,
    w: &WeightStore,
    vit_pos: Vec<f32>,
    pool_pos_k: Vec<f32>,
    opt: &VisionOptions,
) -> Result<Graph, IrError> {
    let v = &cfg.visual;
    let (width, heads, hd, t, d) = (v.width, v.heads, v.head_dim(), v.grid() * v.grid(), v.output_dim);
    let eps = 1e-6;
    if let Err(e) = opt.attention.validate() {
        return Err(IrError::Type { op: "vision_graph".into(), detail: e.to_string() });
    }
    let mut b = B { g: Graph::new(), w };
    let px = b.g.input("pixels", DType::F32, vec![3, v.image_size, v.image_size]);
    let conv = b.p("transformer.visual.conv1.weight");
    let mut x = b.g.conv2d_patch(px, conv, v.patch_size)?;
    if opt.intermediates {
        b.g.set_output("patch_embed", x);
    }
    let pos = b.g.constant(vit_pos, vec![t, width])?;
    x = b.g.add(x, pos)?;
    x = b.ln(x, "transformer.visual.ln_pre", eps)?;
    if opt.intermediates {
        b.g.set_output("ln_pre", x);
    }
    for j in 0..v.layers {
        let pre = format!("transformer.visual.transformer.resblocks.{j}");
        let h = b.ln(x, &format!("{pre}.ln_1"), eps)?;
        let qkv = b.lin(h, &format!("{pre}.attn.in_proj"), true)?;
        // The ViT's in_proj output is interleaved per head: [T, heads, q|k|v].
        let qkv = b.g.reshape(qkv, vec![t, heads, 3 * hd])?;
        let q = b.g.slice(qkv, 2, 0, hd)?;
        let k = b.g.slice(qkv, 2, hd, 2 * hd)?;
        let vv = b.g.slice(qkv, 2, 2 * hd, 3 * hd)?;
        let a = b.g.attention(q, k, vv, opt.attention.mask(j, v.grid()), 1.0 / (hd as f32).sqrt())?;
        let a = b.g.reshape(a, vec![t, width])?;
        let o = b.lin(a, &format!("{pre}.attn.out_proj"), true)?;
        x = b.g.add(x, o)?;
        let h = b.ln(x, &format!("{pre}.ln_2"), eps)?;
        let m = b.lin(h, &format!("{pre}.mlp.c_fc"), true)?;
        let m = b.g.gelu(m)?;
        let m = b.lin(m, &format!("{pre}.mlp.c_proj"), true)?;
        x = b.g.add(x, m)?;
        if opt.intermediates {
            b.g.set_output(&format!("block_{j}"), x);
        }
    }
    // The adapter: 256 learned queries cross-attend to the grid's patches
    // (1024 at 448), so the output size does not depend on the resolution.
    let ap = "transformer.visual.attn_pool";
    let kv = b.lin(x, &format!("{ap}.kv_proj"), false)?;
    let kv = b.ln(kv, &format!("{ap}.ln_kv"), eps)?;
    let query = b.p(&format!("{ap}.query"));
    let q = b.ln(query, &format!("{ap}.ln_q"), eps)?;
    let qpos = b.p(&format!("{ap}.pos_embed"));
    let q = b.g.add(q, qpos)?;
    let kpos = b.g.constant(pool_pos_k, vec![t, d])?;
    let kk = b.g.add(kv, kpos)?;
    let w_in = b.p(&format!("{ap}.attn.in_proj_weight"));
    let b_in = b.p(&format!("{ap}.attn.in_proj_bias"));
    let (nh, phd, nq) = (v.pool_heads(), d / v.pool_heads(), v.queries());
    let mut proj = |x: NodeId, i: usize, rows: usize| -> Result<NodeId, IrError> {
        let wi = b.g.slice(w_in, 0, i * d, (i + 1) * d)?;
        let bi = b.g.slice(b_in, 0, i * d, (i + 1) * d)?;
        let y = b.g.linear(x, wi, Some(bi))?;
        b.g.reshape(y, vec![rows, nh, phd])
    };
    let qh = proj(q, 0, nq)?;
    let kh = proj(kk, 1, t)?;
    let vh = proj(kv, 2, t)?;
    let a = b.g.attention(qh, kh, vh, Mask::None, 1.0 / (phd as f32).sqrt())?;
    let a = b.g.reshape(a, vec![nq, d])?;
    let o = b.lin(a, &format!("{ap}.attn.out_proj"), true)?;
    if opt.intermediates {
        b.g.set_output("resampler", o);
    }
    let o = b.ln(o, "transformer.visual.ln_post", eps)?;
    if opt.intermediates {
        b.g.set_output("ln_post", o);
    }
    let pw = b.p("transformer.visual.proj");
    let f = b.g.matmul(o, pw)?;
    b.g.set_output("features", f);
    Ok(b.g)
}

/// The shape of one decoder step.
#[derive(Clone, Debug, Default)]
pub struct DecoderShape {
    /// New tokens in this step (the prompt at prefill, 1 at decode).
    pub tokens: usize,
    /// Tokens already in the KV cache.
    pub past: usize,
    /// Rows of image features to write over the embeddings (256 per image).
    /// In a [`DecoderShape::bucketed`] prefill this is a capacity, usually
    /// [`max_image_rows`] of `tokens`: the prompt's real rows come first and
    /// the rest of `image_rows` is `qvc_ir::NO_ROW`, which writes nothing
    /// (see [`image_inputs`]), so one program serves any number of pictures.
    pub image_rows: usize,
    /// Logits for every new position instead of only the last.
    pub all_logits: bool,
    /// Also output the residual stream: `hidden.embeds`, `hidden.block_{i}`, `hidden.final_norm`.
    pub hidden: bool,
    /// A shape bucket, compiled once and run for many lengths: `tokens` and
    /// `past` are capacities. The prompt is padded at the end to `tokens`
    /// (causal attention keeps the padding out of the real positions) and the
    /// logits row is picked by the input `last_index [1]` (i32); the cache
    /// inputs hold `past` rows of which the input `past_len [1, 1]` (f32) are
    /// real (padded-cache attention, see `qvc_ir::Op::Attention`).
    pub bucketed: bool,
    /// Decode several sequences in one step (0 and 1 mean one): one new token
    /// each (`tokens` must be 1), each with its own padded cache inputs
    /// `past_k.{i}.{b}`, `past_v.{i}.{b} [past, heads, d]` and length
    /// `past_len.{b} [1, 1]`; rows of `ids`, the rotary/logn tables and the
    /// outputs are the sequences. The GEMMs read each weight once for all.
    pub batch: usize,
}

/// The most image feature rows a prompt of `tokens` tokens can hold: every
/// picture is a span of `<img>`, its `queries` feature rows and `</img>`.
pub fn max_image_rows(cfg: &Config, tokens: usize) -> usize {
    let q = cfg.visual.queries();
    tokens / (q + 2) * q
}

/// The inputs `image_features` and `image_rows` of a decoder program.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageInputs {
    pub features: Vec<f32>,
    pub rows: Vec<i32>,
}

/// The `image_features` and `image_rows` inputs of decoder program `g` for
/// the real feature rows `feats` (`rows.len()` rows of `h`) written at token
/// rows `rows`: padded to the rows `g` declares with zero features at
/// `qvc_ir::NO_ROW`. `None` when `g` has no image inputs and there are no
/// rows; an error when the program holds fewer rows than given.
pub fn image_inputs(g: &Graph, h: usize, feats: &[f32], rows: &[i32]) -> Result<Option<ImageInputs>, IrError> {
    let cap = g.inputs().iter().find(|(n, _)| *n == "image_rows").map(|(_, t)| t.shape.numel());
    let err = |cap: usize| IrError::Type {
        op: "decoder".into(),
        detail: format!("the program holds {cap} image feature rows; the step has {}", rows.len()),
    };
    if feats.len() != rows.len() * h {
        return Err(IrError::Type {
            op: "decoder".into(),
            detail: format!("{} image feature values for {} rows of {h}", feats.len(), rows.len()),
        });
    }
    match cap {
        None if rows.is_empty() => Ok(None),
        None => Err(err(0)),
        Some(cap) if cap < rows.len() => Err(err(cap)),
        Some(cap) => {
            let mut f = Vec::with_capacity(cap * h);
            f.extend_from_slice(feats);
            f.resize(cap * h, 0.0);
            let mut r = rows.to_vec();
            r.resize(cap, qvc_ir::NO_ROW);
            Ok(Some(ImageInputs { features: f, rows: r }))
        }
    }
}

/// The decoder. Inputs: `ids [T]` (i32); `image_features [R, H]` and
/// `image_rows [R]` (i32) when R > 0; `rope_cos`, `rope_sin [T, d]`;
/// `logn [T, 1, 1]` when logn attention is on; `past_k.{i}`, `past_v.{i}
/// [P, heads, d]` when P > 0; `past_len [1, 1]` and `last_index [1]` for
/// [`DecoderShape::bucketed`] programs. Outputs: `logits [1 or T, V]` and the new cache
/// rows `k.{i}`, `v.{i} [T, heads, d]`.
pub fn decoder_graph(cfg: &Config, w: &WeightStore, s: &DecoderShape) -> Result<Graph, IrError> {
    let batch = s.batch.max(1);
    if batch > 1 && (s.tokens != 1 || s.past == 0 || !s.bucketed || s.image_rows > 0 || s.hidden || s.all_logits) {
        return Err(IrError::Type {
            op: "decoder".into(),
            detail: format!("a batch of {batch} decodes one token per sequence over bucketed caches; got {s:?}"),
        });
    }
    // Rows of the step: the new tokens of one sequence, or one token per sequence.
    let (h, nh, hd, t) = (cfg.hidden_size, cfg.heads, cfg.head_dim, if batch > 1 { batch } else { s.tokens });
    let mut b = B { g: Graph::new(), w };
    let ids = b.g.input("ids", DType::I32, vec![t]);
    let wte = b.p("transformer.wte.weight");
    let mut x = b.g.gather(wte, ids)?;
    if s.image_rows > 0 {
        let f = b.g.input("image_features", DType::F32, vec![s.image_rows, h]);
        let rows = b.g.input("image_rows", DType::I32, vec![s.image_rows]);
        x = b.g.scatter_rows(x, f, rows)?;
    }
    if s.hidden {
        b.g.set_output("hidden.embeds", x);
    }
    let cos = b.g.input("rope_cos", DType::F32, vec![t, hd]);
    let sin = b.g.input("rope_sin", DType::F32, vec![t, hd]);
    let logn = if cfg.use_logn_attn { Some(b.g.input("logn", DType::F32, vec![t, 1, 1])) } else { None };
    let past_len = (s.bucketed && s.past > 0 && batch == 1).then(|| b.g.input("past_len", DType::F32, vec![1, 1]));
    let past_lens: Vec<NodeId> = if batch > 1 {
        (0..batch).map(|bi| b.g.input(&format!("past_len.{bi}"), DType::F32, vec![1, 1])).collect()
    } else {
        vec![]
    };
    let wanted = Wanted::of(s, t, batch);
    let mut last_index = None;
    // Narrow inside the last block unless every row's residual stream is an output.
    let early = !s.hidden && cfg.layers > 0;
    for i in 0..cfg.layers {
        let pre = format!("transformer.h.{i}");
        let ln1 = b.p(&format!("{pre}.ln_1.weight"));
        let y = b.g.rms_norm(x, ln1, cfg.eps)?;
        let qkv = b.lin(y, &format!("{pre}.attn.c_attn"), true)?;
        // Unlike the ViT, c_attn's output is contiguous q | k | v.
        let part = |b: &mut B, j: usize| -> Result<NodeId, IrError> {
            let p = b.g.slice(qkv, 1, j * h, (j + 1) * h)?;
            b.g.reshape(p, vec![t, nh, hd])
        };
        let (q, k, v) = (part(&mut b, 0)?, part(&mut b, 1)?, part(&mut b, 2)?);
        let mut q = b.g.rotary(q, cos, sin)?;
        let k = b.g.rotary(k, cos, sin)?;
        if let Some(l) = logn {
            q = b.g.mul(q, l)?;
        }
        b.g.set_output(&format!("k.{i}"), k);
        b.g.set_output(&format!("v.{i}"), v);
        let scale = 1.0 / (hd as f32).sqrt();
        let a = if batch > 1 {
            // Attention per sequence (each has its own cache and length); the
            // projections around it run on all rows at once.
            let mut outs = Vec::with_capacity(batch);
            for (bi, &len) in past_lens.iter().enumerate() {
                let (qb, kb, vb) =
                    (b.g.slice(q, 0, bi, bi + 1)?, b.g.slice(k, 0, bi, bi + 1)?, b.g.slice(v, 0, bi, bi + 1)?);
                let pk = b.g.input(&format!("past_k.{i}.{bi}"), DType::F32, vec![s.past, nh, hd]);
                let pv = b.g.input(&format!("past_v.{i}.{bi}"), DType::F32, vec![s.past, nh, hd]);
                outs.push(b.g.attention_padded(qb, kb, vb, pk, pv, len, scale)?);
            }
            b.g.concat(&outs, 0)?
        } else if s.past > 0 {
            let pk = b.g.input(&format!("past_k.{i}"), DType::F32, vec![s.past, nh, hd]);
            let pv = b.g.input(&format!("past_v.{i}"), DType::F32, vec![s.past, nh, hd]);
            match past_len {
                Some(len) => b.g.attention_padded(q, k, v, pk, pv, len, scale)?,
                None => b.g.attention_cached(q, k, v, pk, pv, scale)?,
            }
        } else {
            b.g.attention(q, k, v, Mask::Causal, scale)?
        };
        let mut a = b.g.reshape(a, vec![t, h])?;
        if early && i + 1 == cfg.layers {
            // The last block's keys and values (above) cover every row;
            // after its attention only the rows whose logits are wanted feed
            // anything, so its c_proj, MLP, `ln_f` and `lm_head` run on
            // those rows alone (exact: each is row-wise). What llama.cpp
            // does; a third of a 2-layer prefill's work. The attention
            // itself keeps every query row: at 300 tokens it is ~1% of a
            // block, and a bucketed program's last row is a run-time index,
            // so a one-row causal query would need a run-time offset.
            a = pick_rows(&mut b, wanted, t, a, &mut last_index)?;
            x = pick_rows(&mut b, wanted, t, x, &mut last_index)?;
        }
        let o = b.lin(a, &format!("{pre}.attn.c_proj"), false)?;
        x = b.g.add(x, o)?;
        let ln2 = b.p(&format!("{pre}.ln_2.weight"));
        let y = b.g.rms_norm(x, ln2, cfg.eps)?;
        let a1 = b.lin(y, &format!("{pre}.mlp.w1"), false)?;
        let a2 = b.lin(y, &format!("{pre}.mlp.w2"), false)?;
        // silu applies to w2's output (QWEN-VL.md §6.2).
        let g2 = b.g.silu(a2)?;
        let m = b.g.mul(a1, g2)?;
        let m = b.lin(m, &format!("{pre}.mlp.c_proj"), false)?;
        x = b.g.add(x, m)?;
        if s.hidden {
            b.g.set_output(&format!("hidden.block_{i}"), x);
        }
    }
    // Narrowed early, `x` holds only the wanted rows already.
    let last = if early { x } else { pick_rows(&mut b, wanted, t, x, &mut last_index)? };
    let lnf = b.p("transformer.ln_f.weight");
    if s.hidden {
        let all = b.g.rms_norm(x, lnf, cfg.eps)?;
        b.g.set_output("hidden.final_norm", all);
    }
    let y = b.g.rms_norm(last, lnf, cfg.eps)?;
    let lm = b.p("lm_head.weight");
    let logits = b.g.matmul_t(y, lm)?;
    b.g.set_output("logits", logits);
    Ok(b.g)
}

/// The rows of a decoder step whose logits are wanted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wanted {
    /// Every row: all-position logits, or one row per step or sequence.
    Every,
    /// The prompt's last row, `t - 1`.
    Last,
    /// The row the input `last_index [1]` names (a bucketed prompt, padded
    /// at the end).
    AtIndex,
}

impl Wanted {
    fn of(s: &DecoderShape, t: usize, batch: usize) -> Wanted {
        if s.all_logits || t == 1 || batch > 1 {
            Wanted::Every
        } else if s.bucketed {
            Wanted::AtIndex
        } else {
            Wanted::Last
        }
    }
}

/// `x [t, h]` reduced to the wanted rows; `last_index` is the input node,
/// declared on first use.
fn pick_rows(
    b: &mut B<'_>,
    w: Wanted,
    t: usize,
    x: NodeId,
    last_index: &mut Option<NodeId>,
) -> Result<NodeId, IrError> {
    match w {
        Wanted::Every => Ok(x),
        Wanted::Last => b.g.slice(x, 0, t - 1, t),
        Wanted::AtIndex => {
            let at = *last_index.get_or_insert_with(|| b.g.input("last_index", DType::I32, vec![1]));
            b.g.gather(x, at)
        }
    }
}

/// Rotary tables for absolute positions `start..start + n`, with the NTK
/// `alpha` chosen at prefill, computed in f32 like the reference:
/// `inv_freq = 1 / base^(2i/d)`, angle = `pos · inv_freq`, halves repeated.
pub fn rope_tables(cfg: &Config, alpha: f64, start: usize, n: usize) -> (Vec<f32>, Vec<f32>) {
    let d = cfg.head_dim;
    let base = (cfg.rotary_base * alpha.powf(d as f64 / (d as f64 - 2.0))) as f32;
    let inv: Vec<f32> = (0..d / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / d as f32)).collect();
    let (mut cos, mut sin) = (vec![0f32; n * d], vec![0f32; n * d]);
    for p in 0..n {
        let pos = (start + p) as f32;
        for (i, &f) in inv.iter().enumerate() {
            let a = pos * f;
            let (s, c) = a.sin_cos();
            for j in [i, i + d / 2] {
                cos[p * d + j] = c;
                sin[p * d + j] = s;
            }
        }
    }
    (cos, sin)
}

/// logn query scale for absolute positions `start..start + n`:
/// `log(p + 1) / log(seq_length)` once `p + 1 > seq_length`, else 1.
pub fn logn_scales(cfg: &Config, start: usize, n: usize) -> Vec<f32> {
    (start..start + n)
        .map(|p| {
            let i = p + 1;
            if i > cfg.seq_length {
                ((i as f64).ln() / (cfg.seq_length as f64).ln()) as f32
            } else {
                1.0
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows of the activation each matmul over `param` reads, in graph order.
    fn rows_into(g: &Graph, param: &str) -> Vec<usize> {
        g.nodes
            .iter()
            .filter(|n| matches!(n.op, qvc_ir::Op::MatMul { .. }))
            .filter(|n| matches!(&g.node(n.inputs[1]).op, qvc_ir::Op::Param(p) if p == param))
            .map(|n| g.shape(n.inputs[0]).0[0])
            .collect()
    }

    /// At prefill the last block's c_proj, MLP, `ln_f` and `lm_head` run on
    /// the logits row only (a slice, or the `last_index` row of a bucketed
    /// program), while its keys and values and every earlier block keep all
    /// rows; all-position logits, hidden states, decode steps and batches
    /// keep every row.
    #[test]
    fn prefill_narrows_the_last_block_to_the_logits_row() {
        let v = serde_json::json!({
            "hidden_size": 64, "num_attention_heads": 4, "kv_channels": 16, "num_hidden_layers": 3,
            "intermediate_size": 256, "layer_norm_epsilon": 1e-6, "rotary_emb_base": 10000,
            "rotary_pct": 1.0, "seq_length": 2048, "use_dynamic_ntk": true, "use_logn_attn": true,
            "vocab_size": 512,
            "visual": {"heads": 4, "image_size": 224, "image_start_id": 500, "layers": 1,
                       "mlp_ratio": 4.0, "output_dim": 64, "patch_size": 14, "width": 32}
        });
        let cfg = Config::from_json(&v, std::path::Path::new("test")).unwrap();
        let w = WeightStore::shapes_only(
            cfg.expected_tensors().into_iter().map(|(n, s)| (n, DType::BF16, qvc_ir::Shape::new(s))),
        );
        let t = 7;
        let narrow = |s: &DecoderShape, rows: usize| {
            let g = decoder_graph(&cfg, &w, s).unwrap();
            for (i, want) in [(0, t), (1, t), (2, rows)] {
                let pre = format!("transformer.h.{i}");
                assert_eq!(rows_into(&g, &format!("{pre}.attn.c_attn.weight")), [t], "{s:?}");
                for p in ["attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj"] {
                    assert_eq!(rows_into(&g, &format!("{pre}.{p}.weight")), [want], "{p} of block {i}, {s:?}");
                }
                assert_eq!(g.shape(g.output(&format!("k.{i}")).unwrap()).0[0], t, "{s:?}");
                assert_eq!(g.shape(g.output(&format!("v.{i}")).unwrap()).0[0], t, "{s:?}");
            }
            let logits = g.shape(g.output("logits").unwrap()).0.clone();
            assert_eq!(logits, [if s.all_logits { t } else { 1 }, 512], "{s:?}");
            assert_eq!(rows_into(&g, "lm_head.weight"), [logits[0]], "{s:?}");
            g
        };
        let plain = DecoderShape { tokens: t, ..Default::default() };
        let g = narrow(&plain, 1);
        assert!(g.inputs().iter().all(|(n, _)| *n != "last_index"));
        let bucketed = DecoderShape { tokens: t, bucketed: true, ..Default::default() };
        let g = narrow(&bucketed, 1);
        assert_eq!(g.inputs().iter().filter(|(n, _)| *n == "last_index").count(), 1);
        // A chunk after cached rows narrows too.
        narrow(&DecoderShape { tokens: t, past: 16, ..Default::default() }, 1);
        narrow(&DecoderShape { tokens: t, all_logits: true, ..Default::default() }, t);
        let g = narrow(&DecoderShape { tokens: t, hidden: true, ..Default::default() }, t);
        assert_eq!(g.shape(g.output("hidden.final_norm").unwrap()).0[0], t);
        assert_eq!(g.shape(g.output("hidden.block_2").unwrap()).0[0], t);
    }

    /// A program's image inputs are padded to the rows it declares, the
    /// rest `NO_ROW` with zero features; too many rows, or rows for a
    /// program without image inputs, are errors.
    #[test]
    fn image_inputs_pad_to_the_program_and_refuse_what_does_not_fit() {
        let mut g = Graph::new();
        g.input("image_features", DType::F32, vec![4, 2]);
        g.input("image_rows", DType::I32, vec![4]);
        let im = image_inputs(&g, 2, &[1.0, 2.0, 3.0, 4.0], &[5, 6]).unwrap().unwrap();
        assert_eq!(im.rows, [5, 6, qvc_ir::NO_ROW, qvc_ir::NO_ROW]);
        assert_eq!(im.features, [1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0]);
        let none = image_inputs(&g, 2, &[], &[]).unwrap().unwrap();
        assert_eq!(none.rows, [qvc_ir::NO_ROW; 4]);
        assert!(image_inputs(&g, 2, &[0.0; 10], &[0, 1, 2, 3, 4]).is_err());
        assert!(image_inputs(&g, 2, &[0.0; 3], &[0, 1]).is_err());
        let plain = Graph::new();
        assert_eq!(image_inputs(&plain, 2, &[], &[]).unwrap(), None);
        assert!(image_inputs(&plain, 2, &[0.0; 2], &[0]).is_err());
    }
}
