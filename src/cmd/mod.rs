//! One module per `qvc` subcommand: its flags (a clap `Args` struct) and its
//! `run`. The heavier implementations they call sit at the crate root:
//! [`crate::compile`], [`crate::bench`], [`crate::selftest`], [`crate::demo`]
//! and [`crate::quantize`]; `qvc bench-serve` is [`crate::bench_serve`] as a
//! whole (flags, run and the HTTP client its tests use). Nothing here imports
//! [`crate::cli`].

pub mod bench;
pub mod chat;
pub mod compile;
pub mod demo;
pub mod devices;
pub mod draw;
pub mod generate;
pub mod inspect;
pub mod kernels;
pub mod logits;
pub mod quantize;
pub mod selftest;
pub mod serve;
pub mod tokenize;
