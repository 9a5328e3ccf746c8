//! # qvc: the command-line front end
//!
//! The `qvc` binary (`generate`, `chat`, `logits`, `tokenize`, `demo`,
//! `bench`, `inspect`) and the `generate` binary share this library. All the
//! model logic lives in the workspace crates (see `DESIGN.md`); this crate
//! turns flags into calls and results into text, JSON, PNG or safetensors.

pub mod bench;
pub mod bench_serve;
pub mod cli;
pub mod compile;
pub mod demo;
pub mod selftest;
pub mod serve_cmd;
