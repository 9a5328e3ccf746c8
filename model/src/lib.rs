//! # qvc-model: Qwen-VL
//!
//! Everything that knows it is Qwen-VL: the config and tensor names, the IR
//! graphs of the vision tower, prefill and decode, the tokenizer, image
//! preprocessing, ChatML, sampling and grounding.

pub mod chat;
pub mod config;
pub mod engine;
pub mod graphs;
pub mod grounding;
pub mod image;
pub mod posembed;
pub mod quant;
pub mod sampling;
pub mod tokenizer;

pub use config::{Config, GenerationConfig};
pub use engine::{
    chunk_end, generate, step_batch, GenerateOptions, Generation, LoadOptions, Model, ModelError, Phase,
    PrefillOptions, Session, Timings, MAX_CONTEXT, PREFILL_CHUNK,
};
