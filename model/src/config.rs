//! `config.json` and `generation_config.json`, and the tensor names and
//! shapes they imply (QWEN-VL.md §1–2). Every expected tensor is checked
//! against the checkpoint before any compute.

use qvc_runtime::{WeightError, WeightStore};
use serde_json::Value;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not valid JSON: {detail}")]
    Json { path: PathBuf, detail: String },
    #[error("{path} has no usable {key:?} (expected {what})")]
    Key { path: PathBuf, key: String, what: &'static str },
    #[error("{path}: {detail}")]
    Invalid { path: PathBuf, detail: String },
}

/// The vision tower's shape (`config.json` → `visual`).
#[derive(Clone, Debug, PartialEq)]
pub struct VisualConfig {
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    pub mlp_width: usize,
    pub patch_size: usize,
    pub image_size: usize,
    pub output_dim: usize,
    pub image_start_id: u32,
}

impl VisualConfig {
    pub fn head_dim(&self) -> usize {
        self.width / self.heads
    }
    /// Patches per side (32 at 448 with 14-pixel patches).
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
    /// Adapter queries: 256, a 16×16 grid.
    pub fn queries(&self) -> usize {
        256
    }
    /// The adapter's attention heads: one per 128 channels.
    pub fn pool_heads(&self) -> usize {
        (self.output_dim / 128).max(1)
    }
}

/// The decoder's shape and the long-context switches.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub hidden_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// The MLP width (half of `intermediate_size`).
    pub mlp_width: usize,
    pub eps: f32,
    pub rotary_base: f64,
    pub seq_length: usize,
    pub use_dynamic_ntk: bool,
    pub use_logn_attn: bool,
    pub vocab_size: usize,
    pub visual: VisualConfig,
}

/// Chat defaults (`generation_config.json`).
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationConfig {
    pub eos_token_id: u32,
    pub max_window_size: usize,
    pub max_new_tokens: usize,
    pub do_sample: bool,
    pub top_k: usize,
    pub top_p: f32,
    pub temperature: f32,
    pub repetition_penalty: f32,
}

impl Default for GenerationConfig {
    /// The values of Qwen-VL-Chat's own file.
    fn default() -> Self {
        GenerationConfig {
            eos_token_id: 151643,
            max_window_size: 6144,
            max_new_tokens: 512,
            do_sample: true,
            top_k: 0,
            top_p: 0.5,
            temperature: 1.0,
            repetition_penalty: 1.0,
        }
    }
}

fn read_json(path: &Path) -> Result<Value, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    serde_json::from_str(&text).map_err(|e| ConfigError::Json { path: path.into(), detail: e.to_string() })
}

struct Obj<'a> {
    v: &'a Value,
    path: &'a Path,
    prefix: &'a str,
}

impl Obj<'_> {
    fn err(&self, key: &str, what: &'static str) -> ConfigError {
        ConfigError::Key { path: self.path.into(), key: format!("{}{key}", self.prefix), what }
    }
    fn usize(&self, key: &str) -> Result<usize, ConfigError> {
        self.v
            .get(key)
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .ok_or_else(|| self.err(key, "a non-negative integer"))
    }
    fn f64(&self, key: &str) -> Result<f64, ConfigError> {
        self.v.get(key).and_then(Value::as_f64).ok_or_else(|| self.err(key, "a number"))
    }
    fn bool_or(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.err(key, "true or false")),
        }
    }
}

impl Config {
    /// Parse a Qwen-VL `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let v = read_json(path)?;
        Self::from_json(&v, path)
    }

    pub fn from_json(v: &Value, path: &Path) -> Result<Self, ConfigError> {
        let o = Obj { v, path, prefix: "" };
        let vis = v.get("visual").ok_or_else(|| {
            o.err("visual", "the vision tower's settings (is this a Qwen-VL, not a text-only Qwen, config?)")
        })?;
        let vo = Obj { v: vis, path, prefix: "visual." };
        let width = vo.usize("width")?;
        let mlp_ratio = vo.f64("mlp_ratio")?;
        let visual = VisualConfig {
            width,
            layers: vo.usize("layers")?,
            heads: vo.usize("heads")?,
            mlp_width: (width as f64 * mlp_ratio) as usize,
            patch_size: vo.usize("patch_size")?,
            image_size: vo.usize("image_size")?,
            output_dim: vo.usize("output_dim")?,
            image_start_id: vo.usize("image_start_id")? as u32,
        };
        let hidden_size = o.usize("hidden_size")?;
        let heads = o.usize("num_attention_heads")?;
        let head_dim = match v.get("kv_channels") {
            Some(_) => o.usize("kv_channels")?,
            None => hidden_size / heads.max(1),
        };
        let rotary_pct = match v.get("rotary_pct") {
            Some(_) => o.f64("rotary_pct")?,
            None => 1.0,
        };
        let cfg = Config {
            hidden_size,
            layers: o.usize("num_hidden_layers")?,
            heads,
            head_dim,
            mlp_width: o.usize("intermediate_size")? / 2,
            eps: o.f64("layer_norm_epsilon")? as f32,
            rotary_base: o.f64("rotary_emb_base")?,
            seq_length: o.usize("seq_length")?,
            use_dynamic_ntk: o.bool_or("use_dynamic_ntk", false)?,
            use_logn_attn: o.bool_or("use_logn_attn", false)?,
            vocab_size: o.usize("vocab_size")?,
            visual,
        };
        let invalid = |detail: String| Err(ConfigError::Invalid { path: path.into(), detail });
        if rotary_pct != 1.0 {
            return invalid(format!("rotary_pct {rotary_pct} is not supported (Qwen-VL uses 1.0)"));
        }
        if heads == 0 || head_dim * heads != hidden_size || head_dim % 2 != 0 {
            return invalid(format!("num_attention_heads {heads} × kv_channels {head_dim} must equal hidden_size {hidden_size} with an even head size"));
        }
        let vis = &cfg.visual;
        if vis.heads == 0
            || !vis.width.is_multiple_of(vis.heads)
            || vis.patch_size == 0
            || !vis.image_size.is_multiple_of(vis.patch_size)
        {
            return invalid("visual: width must be a multiple of heads and image_size a multiple of patch_size".into());
        }
        if vis.output_dim != hidden_size || !vis.output_dim.is_multiple_of(vis.pool_heads()) {
            return invalid(format!("visual.output_dim {} must equal hidden_size {hidden_size}", vis.output_dim));
        }
        if cfg.seq_length < 2 {
            return invalid("seq_length must be at least 2".into());
        }
        Ok(cfg)
    }

    /// Every tensor the model reads, with its shape.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (h, f, v) = (self.hidden_size, self.mlp_width, self.vocab_size);
        let vis = &self.visual;
        let (w, m, d, p) = (vis.width, vis.mlp_width, vis.output_dim, vis.patch_size);
        let mut t: Vec<(String, Vec<usize>)> = vec![("transformer.wte.weight".into(), vec![v, h])];
        for i in 0..self.layers {
            let l = |s: &str| format!("transformer.h.{i}.{s}");
            t.extend([
                (l("ln_1.weight"), vec![h]),
                (l("attn.c_attn.weight"), vec![3 * h, h]),
                (l("attn.c_attn.bias"), vec![3 * h]),
                (l("attn.c_proj.weight"), vec![h, h]),
                (l("ln_2.weight"), vec![h]),
                (l("mlp.w1.weight"), vec![f, h]),
                (l("mlp.w2.weight"), vec![f, h]),
                (l("mlp.c_proj.weight"), vec![h, f]),
            ]);
        }
        t.push(("transformer.ln_f.weight".into(), vec![h]));
        t.push(("lm_head.weight".into(), vec![v, h]));
        let vp = |s: &str| format!("transformer.visual.{s}");
        t.extend([
            (vp("conv1.weight"), vec![w, 3, p, p]),
            (vp("positional_embedding"), vec![256, w]),
            (vp("ln_pre.weight"), vec![w]),
            (vp("ln_pre.bias"), vec![w]),
        ]);
        for j in 0..vis.layers {
            let b = |s: &str| format!("transformer.visual.transformer.resblocks.{j}.{s}");
            t.extend([
                (b("ln_1.weight"), vec![w]),
                (b("ln_1.bias"), vec![w]),
                (b("attn.in_proj.weight"), vec![3 * w, w]),
                (b("attn.in_proj.bias"), vec![3 * w]),
                (b("attn.out_proj.weight"), vec![w, w]),
                (b("attn.out_proj.bias"), vec![w]),
                (b("ln_2.weight"), vec![w]),
                (b("ln_2.bias"), vec![w]),
                (b("mlp.c_fc.weight"), vec![m, w]),
                (b("mlp.c_fc.bias"), vec![m]),
                (b("mlp.c_proj.weight"), vec![w, m]),
                (b("mlp.c_proj.bias"), vec![w]),
            ]);
        }
        let q = vis.queries();
        t.extend([
            (vp("attn_pool.query"), vec![q, d]),
            (vp("attn_pool.pos_embed"), vec![q, d]),
            (vp("attn_pool.kv_proj.weight"), vec![d, w]),
            (vp("attn_pool.attn.in_proj_weight"), vec![3 * d, d]),
            (vp("attn_pool.attn.in_proj_bias"), vec![3 * d]),
            (vp("attn_pool.attn.out_proj.weight"), vec![d, d]),
            (vp("attn_pool.attn.out_proj.bias"), vec![d]),
            (vp("attn_pool.ln_q.weight"), vec![d]),
            (vp("attn_pool.ln_q.bias"), vec![d]),
            (vp("attn_pool.ln_kv.weight"), vec![d]),
            (vp("attn_pool.ln_kv.bias"), vec![d]),
            (vp("ln_post.weight"), vec![d]),
            (vp("ln_post.bias"), vec![d]),
            (vp("proj"), vec![d, d]),
        ]);
        t
    }

    /// Check presence and shape of every expected tensor (dtype is checked
    /// when the store opens: bf16, f16 or f32).
    pub fn validate(&self, weights: &WeightStore) -> Result<(), WeightError> {
        for (name, shape) in self.expected_tensors() {
            weights.expect(&name, &shape)?;
        }
        Ok(())
    }

    /// Dynamic-NTK alpha for a prompt of `n` tokens (QWEN-VL.md §6.3).
    pub fn ntk_alpha(&self, n: usize) -> f64 {
        if !self.use_dynamic_ntk {
            return 1.0;
        }
        let context = (n as f64 / self.seq_length as f64).log2() + 1.0;
        (2f64.powf(context.ceil()) - 1.0).max(1.0)
    }
}

impl GenerationConfig {
    /// Parse `generation_config.json`; absent keys keep Qwen-VL-Chat's values.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let v = read_json(path)?;
        let o = Obj { v: &v, path, prefix: "" };
        let mut g = GenerationConfig::default();
        let opt = |k: &str| v.get(k).filter(|x| !x.is_null()).is_some();
        if opt("eos_token_id") {
            g.eos_token_id = o.usize("eos_token_id")? as u32;
        }
        if opt("max_window_size") {
            g.max_window_size = o.usize("max_window_size")?;
        }
        if opt("max_new_tokens") {
            g.max_new_tokens = o.usize("max_new_tokens")?;
        }
        g.do_sample = o.bool_or("do_sample", g.do_sample)?;
        if opt("top_k") {
            g.top_k = o.usize("top_k")?;
        }
        if opt("top_p") {
            g.top_p = o.f64("top_p")? as f32;
        }
        if opt("temperature") {
            g.temperature = o.f64("temperature")? as f32;
        }
        if opt("repetition_penalty") {
            g.repetition_penalty = o.f64("repetition_penalty")? as f32;
        }
        Ok(g)
    }
}
