//! `qvc tokenize`: the token ids of a text, as JSON.

use crate::common::ModelArgs;
use anyhow::{bail, Context, Result};
use clap::Args;
use qvc_model::tokenizer::Specials;
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct TokenizeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The text.
    #[arg(long, conflicts_with = "text_file", required_unless_present = "text_file")]
    text: Option<String>,
    /// A file whose bytes are the text, exactly (no newline trimmed).
    #[arg(long, value_name = "FILE")]
    text_file: Option<PathBuf>,
    /// Tokenize as chat content: only <img> <ref> <box> <quad> tags are special, <|im_start|> is plain text.
    #[arg(long)]
    chat: bool,
}

pub fn run(a: TokenizeArgs) -> Result<()> {
    let path = a.model.path()?;
    let dir = if path.is_dir() { path.to_path_buf() } else { path.parent().map(Path::to_path_buf).unwrap_or_default() };
    let tok = qvc_model::tokenizer::QwenTokenizer::from_file(&dir.join("qwen.tiktoken"))?;
    let text = match (&a.text, &a.text_file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => {
            let b = std::fs::read(f).with_context(|| format!("cannot read --text-file {}", f.display()))?;
            String::from_utf8(b).with_context(|| format!("{} is not UTF-8 text", f.display()))?
        }
        (None, None) => bail!("give --text or --text-file"),
    };
    let ids = tok.encode(&text, if a.chat { Specials::ImageTags } else { Specials::All })?;
    println!("{}", serde_json::json!({ "ids": ids }));
    Ok(())
}
