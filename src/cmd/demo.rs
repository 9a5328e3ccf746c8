//! `qvc demo`: the flags; [`crate::demo`] writes the tiny checkpoint and runs the turn.

use crate::device::parse_device;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct DemoArgs {
    /// Where to write the demo checkpoint [default: a folder in the system temp dir].
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// The question to ask about the demo picture.
    #[arg(long, default_value = "What is in this picture? Outline the red square.")]
    prompt: String,
    /// Tokens to generate.
    #[arg(long, default_value_t = 24)]
    max_new_tokens: usize,
    /// Where to run it: `cpu`, `cuda`/`cuda:N`, or `emu` (the GPU code path on the PTX emulator, seconds here).
    #[arg(long, default_value = "cpu", value_name = "DEVICE", value_parser = parse_device)]
    device: String,
}

pub fn run(a: DemoArgs) -> Result<()> {
    crate::demo::run(a.dir, &a.prompt, a.max_new_tokens, &a.device)
}
