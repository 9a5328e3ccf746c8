//! The `quantization_config` of a GPTQ checkpoint (`config.json`, and/or
//! `quantize_config.json` beside it): what qvc runs, and a named error for
//! everything else. The tensors themselves are checked by
//! `qvc_runtime::gptq` when the weights open; this checks that the
//! checkpoint's description and its tensors agree.

use qvc_runtime::WeightStore;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// A GPTQ int4 checkpoint's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantConfig {
    /// Group size over the inputs; `None` is GPTQ's −1 (one group per Linear).
    pub group_size: Option<usize>,
    pub sym: bool,
    pub desc_act: bool,
    /// GPTQModel's `lm_head: true`: the output projection is int4 too.
    pub lm_head: bool,
    /// The file it was read from.
    pub source: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("{path}: {detail}")]
    Unsupported { path: PathBuf, detail: String },
    #[error("cannot read {path}: {detail}")]
    Read { path: PathBuf, detail: String },
    #[error("{path} describes a GPTQ checkpoint, but the weights have no int4 tensors (*.qweight); are the right weight files in place?")]
    NoInt4Tensors { path: PathBuf },
    #[error("the weights hold int4 tensors ({example}.qweight, …) but neither config.json nor quantize_config.json has a quantization_config; is this a complete GPTQ checkpoint?")]
    NoConfig { example: String },
    #[error("{path}: group_size {want} but {name} has groups of {got} inputs")]
    GroupSize { path: PathBuf, name: String, want: i64, got: usize },
    #[error("{path}: lm_head {want} but lm_head.weight is {got}")]
    LmHead { path: PathBuf, want: &'static str, got: &'static str },
}

impl QuantConfig {
    /// The quantization settings of the checkpoint whose `config.json` is
    /// `config` (already parsed as `cfg`), or `None` for an unquantized one.
    pub fn read(cfg: &Value, config: &Path) -> Result<Option<QuantConfig>, QuantError> {
        if let Some(q) = cfg.get("quantization_config").filter(|q| !q.is_null()) {
            return Self::parse(q, config).map(Some);
        }
        let side = config.parent().unwrap_or(Path::new(".")).join("quantize_config.json");
        if !side.is_file() {
            return Ok(None);
        }
        let read = |detail: String| QuantError::Read { path: side.clone(), detail };
        let text = std::fs::read_to_string(&side).map_err(|e| read(e.to_string()))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| read(format!("not valid JSON: {e}")))?;
        Self::parse(&v, &side).map(Some)
    }

    /// [`QuantConfig::read`] of the `config.json` at `config`.
    pub fn from_config_file(config: &Path) -> Result<Option<QuantConfig>, QuantError> {
        let read = |detail: String| QuantError::Read { path: config.into(), detail };
        let text = std::fs::read_to_string(config).map_err(|e| read(e.to_string()))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| read(format!("not valid JSON: {e}")))?;
        Self::read(&v, config)
    }

    fn parse(q: &Value, path: &Path) -> Result<QuantConfig, QuantError> {
        let bad = |detail: String| QuantError::Unsupported { path: path.into(), detail };
        if !q.is_object() {
            return Err(bad("quantization_config is not a JSON object".into()));
        }
        let text = |k: &str| q.get(k).and_then(Value::as_str).map(str::to_ascii_lowercase);
        let flag = |k: &str, default: bool| -> Result<bool, QuantError> {
            match q.get(k) {
                None | Some(Value::Null) => Ok(default),
                Some(Value::Bool(b)) => Ok(*b),
                Some(v) => Err(bad(format!("quantization_config.{k} is {v}, expected true or false"))),
            }
        };
        let method = text("quant_method").unwrap_or_else(|| "gptq".into());
        if method != "gptq" {
            return Err(bad(format!(
                "quant_method {method:?} is not supported: qvc runs GPTQ int4 checkpoints (quant_method \"gptq\", \
                 AutoGPTQ format v1, like Qwen-VL-Chat-Int4); AWQ, EXL2, bitsandbytes and others are not"
            )));
        }
        for key in ["checkpoint_format", "format"] {
            if let Some(f) = text(key) {
                if f != "gptq" {
                    return Err(bad(format!(
                        "{key} {f:?} is not supported: qvc reads AutoGPTQ checkpoint format v1 (\"gptq\"); \
                         convert gptq_v2 or Marlin checkpoints back to v1 (GPTQModel can), or quantize the \
                         original weights with `qvc quantize`"
                    )));
                }
            }
        }
        if flag("is_marlin_format", false)? {
            return Err(bad(
                "is_marlin_format: Marlin-packed weights are not supported; use the GPTQ v1 checkpoint".into()
            ));
        }
        match q.get("bits").and_then(Value::as_i64) {
            Some(4) => {}
            Some(b) => {
                return Err(bad(format!("bits {b}: qvc runs 4-bit GPTQ weights only (Qwen-VL-Chat-Int4's format)")))
            }
            None => return Err(bad("quantization_config has no integer \"bits\"".into())),
        }
        let group_size = match q.get("group_size").and_then(Value::as_i64) {
            Some(-1) => None,
            Some(g) if g > 0 => Some(g as usize),
            Some(g) => return Err(bad(format!("group_size {g} is neither positive nor -1"))),
            None => return Err(bad("quantization_config has no integer \"group_size\"".into())),
        };
        Ok(QuantConfig {
            group_size,
            sym: flag("sym", true)?,
            desc_act: flag("desc_act", false)?,
            lm_head: flag("lm_head", false)?,
            source: path.into(),
        })
    }

    /// The settings agree with the tensors: every int4 Linear has this group
    /// size, and `lm_head` is int4 exactly when they say so.
    pub fn check(quant: Option<&QuantConfig>, weights: &WeightStore) -> Result<(), QuantError> {
        let names = weights.q4_names();
        let Some(q) = quant else {
            return match names.first() {
                Some(n) => Err(QuantError::NoConfig { example: n.trim_end_matches(".weight").into() }),
                None => Ok(()),
            };
        };
        if names.is_empty() {
            return Err(QuantError::NoInt4Tensors { path: q.source.clone() });
        }
        for name in &names {
            let w = weights.q4(name).expect("listed by q4_names");
            let want = q.group_size.unwrap_or(w.cols).min(w.cols);
            if w.group != want {
                return Err(QuantError::GroupSize {
                    path: q.source.clone(),
                    name: name.to_string(),
                    want: q.group_size.map_or(-1, |g| g as i64),
                    got: w.group,
                });
            }
        }
        let head = names.contains(&"lm_head.weight");
        if head != q.lm_head {
            let (want, got) = if q.lm_head { ("true", "not int4") } else { ("false (absent)", "int4") };
            return Err(QuantError::LmHead { path: q.source.clone(), want, got });
        }
        Ok(())
    }
}
