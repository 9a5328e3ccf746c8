//! # qvc-serve: the request scheduler behind `qvc serve` and `qvc chat`
//!
//! One process, one copy of the weights, many conversations. Start here:
//!
//! - [`Engine`] ([`engine`]) owns the model, its backend and `max_batch` KV
//!   slots on one scheduler thread. [`Engine::submit`] validates a
//!   [`GenRequest`] and queues it (at most `max_queue` wait); the thread
//!   admits waiting requests into free slots, runs at most one prefill chunk
//!   per iteration and then one batched decode step over every decoding
//!   request (continuous batching: requests join and leave the batch at any
//!   step), and streams [`Event`]s to each request's [`Sink`].
//! - A request's life is explicit: queued → prefill → decode → done |
//!   cancelled | failed. A sink that returns `false` cancels its request and
//!   frees the slot before the next decode step; a panic while serving one
//!   request fails that request only.
//! - Reuse: vision features are cached by the picture's bytes
//!   ([`ImageKey`], [`vision_cache`]), and a request is placed in the free
//!   slot whose cached tokens share the longest prefix with its prompt (the
//!   same conversation's previous turn), which then prefills only the rest.
//! - Determinism: prefill chunks start at absolute multiples of
//!   `prefill_chunk` and only whole chunks of prefilled rows are reused, and
//!   CPU decode is invariant to the batch, so a greedy answer does not depend
//!   on what else runs. A compiled artifact prefills a whole prompt at once
//!   (no chunking, no prefix reuse there).
//! - [`conversation::build_prompt`] turns OpenAI-style messages into exactly
//!   the prompt the reference `chat()` builds; [`metrics`] renders the
//!   Prometheus text of [`Engine::metrics_text`].
//!
//! The scheduler knows nothing of HTTP; the `http` module (axum) only parses,
//! validates, streams and maps errors onto this API.

pub mod conversation;
mod detok;
pub mod engine;
pub mod http;
pub mod metrics;
pub mod request;
pub mod vision_cache;

pub use conversation::{build_prompt, ConversationError, Message, Part, Role};
pub use engine::{Engine, EngineConfig, EngineState};
pub use request::{
    Event, FinishReason, GenRequest, ImageInput, ImageKey, RequestId, Sink, SubmitError, TokenLogprob, Usage,
    MAX_TOP_LOGPROBS,
};
