//! What a caller hands the [`Engine`](crate::Engine) and what it gets back:
//! a [`GenRequest`] (prompt ids, pictures, sampling), a [`Sink`] that
//! receives [`Event`]s, and the errors [`Engine::submit`](crate::Engine::submit)
//! returns before anything runs.

use qvc_model::sampling::SamplingParams;
use std::sync::Arc;

/// Identifies a picture by the content of its bytes (a 128-bit FNV-1a hash):
/// the vision-feature cache and the prompt's image names are keyed by it, so
/// the same picture sent again is encoded once and tokenizes identically.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageKey(pub u128);

impl ImageKey {
    /// The key of a picture's (encoded, e.g. PNG or JPEG) bytes: SipHash
    /// under a secret key drawn once per process, two domain-separated
    /// outputs making 128 bits.
    /// Keyed, because the vision cache is shared by every client: with a
    /// public hash (FNV, say) a client could craft a picture that collides
    /// with another user's and plant its features under that key. Stable
    /// within a process, which is all the cache and prefix reuse need.
    pub fn of(bytes: &[u8]) -> ImageKey {
        use std::collections::hash_map::RandomState;
        use std::hash::{BuildHasher, Hasher};
        static KEY: std::sync::OnceLock<RandomState> = std::sync::OnceLock::new();
        let key = KEY.get_or_init(RandomState::new);
        // Two outputs of one keyed PRF on domain-separated inputs.
        let half = |domain: u8| {
            let mut h = key.build_hasher();
            h.write_u8(domain);
            h.write(bytes);
            h.write_usize(bytes.len());
            h.finish() as u128
        };
        ImageKey(half(0) << 64 | half(1))
    }

    /// The name written in a prompt's `<img>NAME</img>` for this picture:
    /// `image-` and 32 hex digits (38 bytes, well under the 256-byte limit).
    pub fn name(&self) -> String {
        format!("image-{:032x}", self.0)
    }
}

/// One picture of a request.
#[derive(Clone, Debug)]
pub struct ImageInput {
    /// Content hash of the picture's bytes.
    pub key: ImageKey,
    /// The PATH written in the prompt's `<img>PATH</img>` (at most 256 bytes).
    pub name: String,
    /// Original size in pixels (for boxes in pixels).
    pub width: u32,
    pub height: u32,
    /// Preprocessed pixels `[3, S, S]` (see `qvc_model::image::preprocess_rgb`).
    /// `None`: the engine must already hold the features of `key`
    /// ([`Engine::has_image`](crate::Engine::has_image)); if it no longer does
    /// at submission, `submit` refuses with [`SubmitError::Invalid`] saying
    /// "not cached any more: send its pixels". An accepted request holds the
    /// features it needs, so a later eviction cannot fail it.
    pub pixels: Option<Arc<Vec<f32>>>,
}

/// A generation request: a complete prompt and how to continue it.
#[derive(Clone, Debug)]
pub struct GenRequest {
    /// The complete ChatML prompt ids (see [`crate::conversation::build_prompt`]).
    pub prompt: Vec<u32>,
    /// One per `<img>` span of `prompt`, in order.
    pub images: Vec<ImageInput>,
    /// Most new tokens (the stop token not counted).
    pub max_tokens: usize,
    /// Temperature, top-p, top-k, repetition penalty and seed.
    pub sampling: SamplingParams,
    /// OpenAI semantics over the generated tokens: `logit[t] -= presence·(count[t] > 0) + frequency·count[t]`.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Ids that end the answer (not part of it); usually `qvc_model::chat::stop_ids`.
    pub stop_ids: Vec<u32>,
    /// Texts that end the answer; the answer is cut before the first one.
    pub stop_strings: Vec<String>,
    /// `Some(k)`: report each token's log-probability and the `k` (at most
    /// [`MAX_TOP_LOGPROBS`]) most likely alternatives.
    pub logprobs: Option<usize>,
}

/// The most alternatives a request may ask for per token (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

impl GenRequest {
    /// A greedy request for `prompt` with the model's stop ids and no extras.
    pub fn greedy(prompt: Vec<u32>, images: Vec<ImageInput>, max_tokens: usize, stop_ids: Vec<u32>) -> GenRequest {
        GenRequest {
            prompt,
            images,
            max_tokens,
            sampling: SamplingParams::greedy(),
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            stop_ids,
            stop_strings: vec![],
            logprobs: None,
        }
    }
}

/// Why an answer ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop id or stop string.
    Stop,
    /// `max_tokens`, or the context is full.
    Length,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Token counts of a finished request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens whose KV rows were reused from an earlier request (not prefilled again).
    pub cached_tokens: usize,
}

/// The log-probability of one generated token and its most likely alternatives.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TokenLogprob {
    /// The token's text (lossy UTF-8 of `bytes`; special tokens by name).
    pub token: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
    /// `(token, bytes, logprob)` of the most likely tokens, most likely first.
    pub top: Vec<(String, Vec<u8>, f32)>,
}

/// What a request's [`Sink`] receives, in this order: `Started`, any number
/// of `Delta`, then `Done`; or `Error` at any point (nothing follows it).
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The prompt is in the KV cache; the first token follows.
    Started { prompt_tokens: usize, cached_tokens: usize },
    /// New text. Never splits a UTF-8 character; text that could be the start
    /// of a stop string is held back until it is known not to be one.
    /// `logprobs` covers the tokens released since the previous delta.
    Delta { text: String, logprobs: Vec<TokenLogprob> },
    /// The answer is complete; `text` is all of it (the concatenated deltas).
    Done { finish: FinishReason, usage: Usage, text: String },
    /// This request failed; the engine keeps serving the others.
    Error(String),
}

/// Receives a request's events on the scheduler thread; returns `false` when
/// the receiver is gone (the request is then cancelled and its KV slot freed
/// before the next decode step). Keep it fast: it runs between model steps.
pub type Sink = Box<dyn FnMut(Event) -> bool + Send>;

/// Identifies a submitted request (unique per engine, increasing).
pub type RequestId = u64;

/// Why [`Engine::submit`](crate::Engine::submit) refused a request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// `max_queue` requests already wait (HTTP 503 with Retry-After).
    #[error("the server is busy: {waiting} requests are already waiting; retry later")]
    QueueFull { waiting: usize },
    /// The model is still loading (or failed to load).
    #[error("the model is not ready yet")]
    NotReady,
    /// [`Engine::shutdown`](crate::Engine::shutdown) was called.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The prompt plus `max_tokens` does not fit the context (HTTP 400,
    /// `context_length_exceeded`).
    #[error(
        "the prompt has {prompt} tokens and max_tokens is {max_tokens}: {} tokens exceed the context of {context} \
         tokens ({})",
        prompt + max_tokens,
        context_fix(*prompt, *context)
    )]
    ContextExceeded { prompt: usize, max_tokens: usize, context: usize },
    /// A picture sent without pixels whose features the engine no longer
    /// holds: send it again with its pixels.
    #[error("picture {name:?} is not cached any more: send its pixels")]
    NotCached { name: String },
    /// The request cannot run (HTTP 400); the text says why.
    #[error("{0}")]
    Invalid(String),
}

/// How to make a prompt of `prompt` tokens fit a context of `context`.
fn context_fix(prompt: usize, context: usize) -> String {
    match context.saturating_sub(prompt) {
        0 => format!(
            "the prompt alone leaves no room for an answer: shorten the conversation to fewer than {context} tokens"
        ),
        room => format!("lower max_tokens to at most {room} or shorten the conversation"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_keys_and_names() {
        let a = ImageKey::of(b"picture one");
        assert_eq!(a, ImageKey::of(b"picture one"));
        assert_ne!(a, ImageKey::of(b"picture two"));
        assert_ne!(ImageKey::of(b""), ImageKey::of(b"\0"));
        let n = a.name();
        assert_eq!(n.len(), 38);
        assert!(n.starts_with("image-") && n[6..].chars().all(|c| c.is_ascii_hexdigit()));
    }
}
