//! # qvc: the command-line front end
//!
//! The `qvc` binary (`generate`, `chat`, `logits`, `tokenize`, `demo`,
//! `bench`, `inspect`, `serve`, ...) and the `generate` binary share this
//! library. All the model logic lives in the workspace crates (see
//! `DESIGN.md`); this crate turns flags into calls and results into text,
//! JSON, PNG or safetensors.
//!
//! Layers, each importing only those below it:
//! - [`cli`]: the clap parser and the dispatch;
//! - [`cmd`]: one module per subcommand (its flags and `run`), and
//!   [`bench_serve`] (`qvc bench-serve` with its HTTP client);
//! - [`bench`], [`demo`], [`selftest`], [`compile`], [`quantize`]: what those
//!   commands run;
//! - [`common`]: the shared flag groups (`--model`, prompt, sampling), model
//!   loading, prompt and sampling helpers;
//! - [`device`]: `--device` and the backend it makes.

pub mod bench;
pub mod bench_serve;
pub mod cli;
pub mod cmd;
pub mod common;
pub mod compile;
pub mod demo;
pub mod device;
pub mod quantize;
pub mod selftest;
