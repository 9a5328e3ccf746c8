//! The OpenAI Chat Completions protocol: the request as qvc reads it (with
//! OpenAI's validation ranges and messages that name the field), the response,
//! the streamed chunk, and the error envelope.
//!
//! Requests are read from a `serde_json::Value` by hand rather than derived, so
//! that every ill-typed or out-of-range field gives a 400 whose `param` names it
//! (`messages[1].content[0].image_url`) and whose message says what was
//! expected. Fields qvc does not know are ignored, as OpenAI's SDKs expect.

use axum::http::StatusCode;
use qvc_model::grounding::BoxOut;
use serde::Serialize;
use serde_json::{Map, Value};

/// OpenAI's limit on `top_logprobs`.
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Most `stop` sequences one request may give.
pub const MAX_STOP_SEQUENCES: usize = 16;

/// An error returned to the client in OpenAI's envelope
/// `{"error": {"message", "type", "param", "code"}}`.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, `server_error`, ...
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds for a `Retry-After` header (503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, code: Option<&'static str>, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), kind, param: None, code, retry_after: None }
    }
    /// 400: the request is malformed or asks for something impossible; `param` names the field.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", None, message);
        let p: String = param.into();
        e.param = (!p.is_empty()).then_some(p);
        e
    }
    /// 400 with a machine-readable code.
    pub fn invalid_code(param: impl Into<String>, code: &'static str, message: impl Into<String>) -> Self {
        let mut e = Self::invalid(param, message);
        e.code = Some(code);
        e
    }
    /// 401: missing or wrong API key.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "authentication_error", Some("invalid_api_key"), message)
    }
    /// 404 for a model this server does not serve.
    pub fn model_not_found(asked: &str, served: &str) -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("model_not_found"),
            format!("The model `{asked}` does not exist; this server serves `{served}`"),
        );
        e.param = Some("model".into());
        e
    }
    /// 404 for a path this server does not have.
    pub fn no_route(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("not_found"),
            format!(
                "no such endpoint: {method} {path} (this server has POST /v1/chat/completions, GET /v1/models, \
                 GET /health, GET /metrics)"
            ),
        )
    }
    /// 405 for a known path with the wrong method.
    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            Some("method_not_allowed"),
            format!("{method} is not allowed on {path}"),
        )
    }
    /// 413: the body is over `--max-body-bytes`.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            Some("request_too_large"),
            format!("the request body is larger than this server's limit of {limit} bytes (--max-body-bytes)"),
        )
    }
    /// 503 with `Retry-After`.
    pub fn unavailable(code: &'static str, retry_after: u64, message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", Some(code), message);
        e.retry_after = Some(retry_after);
        e
    }
    /// 500: this request failed inside the server.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", Some("internal_error"), message)
    }
    /// The JSON body `{"error": {...}}`.
    pub fn body(&self) -> Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

/// Who wrote a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsgRole {
    System,
    User,
    Assistant,
}

/// One piece of a message's content.
#[derive(Clone, Debug, PartialEq)]
pub enum MsgPart {
    Text(String),
    /// `image_url.url` as given (a `data:` URL, `http(s)://`, `file://` or a local path).
    Image(String),
}

/// One message of the conversation.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatMessage {
    pub role: MsgRole,
    pub parts: Vec<MsgPart>,
}

/// A validated `POST /v1/chat/completions` request. Optional sampling fields are
/// `None` when absent (or `null`): the model's `generation_config.json` decides.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    /// `max_completion_tokens`, else `max_tokens`.
    pub max_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Extension; 0 or -1 = off.
    pub top_k: Option<usize>,
    /// Extension; 1 = off.
    pub repetition_penalty: Option<f32>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
    /// `None`: no logprobs; `Some(k)`: each token's logprob and the `k` likeliest alternatives.
    pub logprobs: Option<usize>,
}

/// The field at `key`, with JSON `null` read as absent.
fn field<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn ill_typed(param: &str, expected: &str, got: &Value) -> ApiError {
    ApiError::invalid(param, format!("`{param}` must be {expected}, got {}", type_name(got)))
}

fn get_f32(obj: &Map<String, Value>, key: &str) -> Result<Option<f32>, ApiError> {
    match field(obj, key) {
        None => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if x.is_finite() => Ok(Some(x as f32)),
            _ => Err(ill_typed(key, "a number", v)),
        },
    }
}

fn get_bool(obj: &Map<String, Value>, key: &str, param: &str) -> Result<Option<bool>, ApiError> {
    match field(obj, key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(ill_typed(param, "true or false", v)),
    }
}

/// An integer field (a JSON number with no fraction; `3.0` is refused as OpenAI does).
fn get_int(obj: &Map<String, Value>, key: &str) -> Result<Option<i64>, ApiError> {
    match field(obj, key) {
        None => Ok(None),
        Some(v) => match (v.as_i64(), v.as_u64()) {
            (Some(i), _) => Ok(Some(i)),
            (None, Some(u)) => Ok(Some(i64::try_from(u).unwrap_or(i64::MAX))),
            _ => Err(ill_typed(key, "an integer", v)),
        },
    }
}

fn in_range(key: &str, x: Option<f32>, lo: f32, hi: f32) -> Result<(), ApiError> {
    match x {
        Some(x) if !(lo..=hi).contains(&x) => {
            Err(ApiError::invalid(key, format!("`{key}` must be between {lo} and {hi}, got {x}")))
        }
        _ => Ok(()),
    }
}

impl ChatRequest {
    /// Parses and validates a request body.
    pub fn parse(body: &[u8]) -> Result<ChatRequest, ApiError> {
        let v: Value = serde_json::from_slice(body).map_err(|e| {
            ApiError::invalid_code("", "invalid_json", format!("the request body is not valid JSON: {e}"))
        })?;
        Self::from_value(&v)
    }

    /// Validates an already-parsed JSON body.
    pub fn from_value(v: &Value) -> Result<ChatRequest, ApiError> {
        let Some(obj) = v.as_object() else {
            return Err(ApiError::invalid("", format!("the request body must be a JSON object, got {}", type_name(v))));
        };
        let model = match field(obj, "model") {
            Some(Value::String(s)) => s.clone(),
            Some(v) => return Err(ill_typed("model", "a string", v)),
            None => return Err(ApiError::invalid("model", "`model` is required (GET /v1/models lists it)")),
        };
        let messages = match field(obj, "messages") {
            Some(Value::Array(a)) if a.is_empty() => {
                return Err(ApiError::invalid("messages", "`messages` must hold at least one message"))
            }
            Some(Value::Array(a)) => {
                a.iter().enumerate().map(|(i, m)| parse_message(i, m)).collect::<Result<_, _>>()?
            }
            Some(v) => return Err(ill_typed("messages", "an array of messages", v)),
            None => return Err(ApiError::invalid("messages", "`messages` is required")),
        };

        if let Some(n) = get_int(obj, "n")? {
            if n != 1 {
                return Err(ApiError::invalid(
                    "n",
                    format!("only n=1 is supported (one choice per request), got n={n}"),
                ));
            }
        }

        let mut max_tokens = None;
        for key in ["max_tokens", "max_completion_tokens"] {
            if let Some(m) = get_int(obj, key)? {
                if m < 1 {
                    return Err(ApiError::invalid(key, format!("`{key}` must be at least 1, got {m}")));
                }
                max_tokens = Some(usize::try_from(m).unwrap_or(usize::MAX));
            }
        }

        let temperature = get_f32(obj, "temperature")?;
        in_range("temperature", temperature, 0.0, 2.0)?;
        let top_p = get_f32(obj, "top_p")?;
        if let Some(p) = top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(ApiError::invalid(
                    "top_p",
                    format!("`top_p` must be greater than 0 and at most 1, got {p}"),
                ));
            }
        }
        let top_k = match get_int(obj, "top_k")? {
            None => None,
            Some(-1) | Some(0) => Some(0),
            Some(k) if k > 0 => Some(usize::try_from(k).unwrap_or(usize::MAX)),
            Some(k) => {
                return Err(ApiError::invalid(
                    "top_k",
                    format!("`top_k` must be a positive integer, or 0 or -1 for off, got {k}"),
                ))
            }
        };
        let repetition_penalty = get_f32(obj, "repetition_penalty")?;
        if let Some(r) = repetition_penalty {
            if r <= 0.0 {
                return Err(ApiError::invalid(
                    "repetition_penalty",
                    format!("`repetition_penalty` must be greater than 0 (1 = off), got {r}"),
                ));
            }
        }
        let presence_penalty = get_f32(obj, "presence_penalty")?;
        in_range("presence_penalty", presence_penalty, -2.0, 2.0)?;
        let frequency_penalty = get_f32(obj, "frequency_penalty")?;
        in_range("frequency_penalty", frequency_penalty, -2.0, 2.0)?;

        // Any 64-bit integer; a negative seed is taken as its two's-complement bits.
        let seed = get_int(obj, "seed")?.map(|s| s as u64);

        let stop = match field(obj, "stop") {
            None => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, s)| match s {
                    Value::String(s) => Ok(s.clone()),
                    v => Err(ill_typed(&format!("stop[{i}]"), "a string", v)),
                })
                .collect::<Result<Vec<_>, _>>()?,
            Some(v) => return Err(ill_typed("stop", "a string or an array of strings", v)),
        };
        if stop.len() > MAX_STOP_SEQUENCES {
            return Err(ApiError::invalid(
                "stop",
                format!("at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {}", stop.len()),
            ));
        }
        if let Some(i) = stop.iter().position(String::is_empty) {
            return Err(ApiError::invalid(format!("stop[{i}]"), "a stop sequence must not be empty"));
        }

        let stream = get_bool(obj, "stream", "stream")?.unwrap_or(false);
        let include_usage = match field(obj, "stream_options") {
            None => false,
            Some(Value::Object(o)) => {
                if !stream {
                    return Err(ApiError::invalid(
                        "stream_options",
                        "`stream_options` is only allowed when `stream` is true",
                    ));
                }
                get_bool(o, "include_usage", "stream_options.include_usage")?.unwrap_or(false)
            }
            Some(v) => return Err(ill_typed("stream_options", "an object", v)),
        };

        let want_logprobs = get_bool(obj, "logprobs", "logprobs")?.unwrap_or(false);
        let top_logprobs = get_int(obj, "top_logprobs")?;
        let logprobs = match (want_logprobs, top_logprobs) {
            (_, Some(k)) if !(0..=MAX_TOP_LOGPROBS as i64).contains(&k) => {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    format!("`top_logprobs` must be between 0 and {MAX_TOP_LOGPROBS}, got {k}"),
                ))
            }
            (false, Some(_)) => {
                return Err(ApiError::invalid("top_logprobs", "`top_logprobs` needs `logprobs` set to true"));
            }
            (true, k) => Some(k.unwrap_or(0) as usize),
            (false, None) => None,
        };

        Ok(ChatRequest {
            model,
            messages,
            max_tokens,
            temperature,
            top_p,
            top_k,
            repetition_penalty,
            presence_penalty: presence_penalty.unwrap_or(0.0),
            frequency_penalty: frequency_penalty.unwrap_or(0.0),
            seed,
            stop,
            stream,
            include_usage,
            logprobs,
        })
    }

    /// The `image_url`s of all messages, in order.
    pub fn image_urls(&self) -> impl Iterator<Item = &str> {
        self.messages.iter().flat_map(|m| &m.parts).filter_map(|p| match p {
            MsgPart::Image(u) => Some(u.as_str()),
            MsgPart::Text(_) => None,
        })
    }
}

fn parse_message(i: usize, m: &Value) -> Result<ChatMessage, ApiError> {
    let at = format!("messages[{i}]");
    let Some(obj) = m.as_object() else { return Err(ill_typed(&at, "an object with `role` and `content`", m)) };
    let role = match field(obj, "role") {
        Some(Value::String(r)) => match r.as_str() {
            "system" | "developer" => MsgRole::System,
            "user" => MsgRole::User,
            "assistant" => MsgRole::Assistant,
            other => {
                return Err(ApiError::invalid(
                    format!("{at}.role"),
                    format!("{at}.role: unknown role {other:?}; expected \"system\", \"user\" or \"assistant\""),
                ))
            }
        },
        Some(v) => return Err(ill_typed(&format!("{at}.role"), "a string", v)),
        None => return Err(ApiError::invalid(format!("{at}.role"), format!("{at}.role is required"))),
    };
    let param = format!("{at}.content");
    let parts = match field(obj, "content") {
        Some(Value::String(s)) => vec![MsgPart::Text(s.clone())],
        Some(Value::Array(a)) => {
            a.iter().enumerate().map(|(j, p)| parse_part(&format!("{param}[{j}]"), p)).collect::<Result<_, _>>()?
        }
        // OpenAI allows an assistant message without content (it then carries tool calls, which qvc has not).
        None if role == MsgRole::Assistant => Vec::new(),
        None => return Err(ApiError::invalid(&param, format!("{param} is required"))),
        Some(v) => return Err(ill_typed(&param, "a string or an array of content parts", v)),
    };
    Ok(ChatMessage { role, parts })
}

fn parse_part(param: &str, p: &Value) -> Result<MsgPart, ApiError> {
    let Some(obj) = p.as_object() else { return Err(ill_typed(param, "an object with a `type`", p)) };
    match field(obj, "type") {
        Some(Value::String(t)) if t == "text" => match field(obj, "text") {
            Some(Value::String(s)) => Ok(MsgPart::Text(s.clone())),
            Some(v) => Err(ill_typed(&format!("{param}.text"), "a string", v)),
            None => Err(ApiError::invalid(format!("{param}.text"), format!("{param}.text is required"))),
        },
        Some(Value::String(t)) if t == "image_url" => {
            let url = match field(obj, "image_url") {
                Some(Value::String(u)) => u,
                Some(Value::Object(o)) => match field(o, "url") {
                    Some(Value::String(u)) => u,
                    Some(v) => return Err(ill_typed(&format!("{param}.image_url.url"), "a string", v)),
                    None => {
                        return Err(ApiError::invalid(
                            format!("{param}.image_url.url"),
                            format!("{param}.image_url.url is required"),
                        ))
                    }
                },
                Some(v) => return Err(ill_typed(&format!("{param}.image_url"), "an object with a `url`", v)),
                None => {
                    return Err(ApiError::invalid(
                        format!("{param}.image_url"),
                        format!("{param}.image_url is required"),
                    ))
                }
            };
            if url.is_empty() {
                return Err(ApiError::invalid(format!("{param}.image_url.url"), "an image URL must not be empty"));
            }
            Ok(MsgPart::Image(url.clone()))
        }
        Some(Value::String(t)) => Err(ApiError::invalid(
            format!("{param}.type"),
            format!("{param}.type: unsupported content part type {t:?}; expected \"text\" or \"image_url\""),
        )),
        Some(v) => Err(ill_typed(&format!("{param}.type"), "a string", v)),
        None => Err(ApiError::invalid(format!("{param}.type"), format!("{param}.type is required"))),
    }
}

// ---------------------------------------------------------------------------
// Responses

/// `chatcmpl-` and 24 random hex digits.
pub fn completion_id() -> String {
    format!("chatcmpl-{:016x}{:08x}", random_u64(), random_u64() as u32)
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// 64 unpredictable bits (std's per-process random hash keys, a counter and the clock): ids and the
/// seed of a request that gives none. Not for cryptography.
pub fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.finish()
}

/// `usage`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct UsageOut {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose keys and values were reused from an earlier request (prefix reuse).
    pub cached_tokens: usize,
}

impl UsageOut {
    pub fn new(prompt_tokens: usize, completion_tokens: usize, cached_tokens: usize) -> UsageOut {
        UsageOut {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: PromptTokensDetails { cached_tokens },
        }
    }
}

/// One alternative of `top_logprobs`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TopLogprobOut {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

/// One generated token's entry of `logprobs.content`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LogprobOut {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprobOut>,
}

/// A choice's `logprobs`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ChoiceLogprobs {
    pub content: Vec<LogprobOut>,
}

/// `choices[0].message`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AssistantMessage {
    pub role: &'static str,
    pub content: String,
}

/// One choice of a non-streamed response.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Choice {
    pub index: usize,
    pub message: AssistantMessage,
    /// `"stop"` or `"length"`.
    pub finish_reason: &'static str,
    pub logprobs: Option<ChoiceLogprobs>,
    /// Extension: the answer's `<ref>`/`<box>`/`<quad>` regions in pixels of the picture they refer to,
    /// as `qvc generate --json` prints them. Absent when the answer has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boxes: Option<Vec<BoxOut>>,
}

/// A non-streamed response (`object: "chat.completion"`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<Choice>,
    pub usage: UsageOut,
}

impl ChatCompletion {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: String,
        created: u64,
        model: String,
        content: String,
        finish_reason: &'static str,
        logprobs: Option<Vec<LogprobOut>>,
        boxes: Vec<BoxOut>,
        usage: UsageOut,
    ) -> ChatCompletion {
        ChatCompletion {
            id,
            object: "chat.completion",
            created,
            model,
            choices: vec![Choice {
                index: 0,
                message: AssistantMessage { role: "assistant", content },
                finish_reason,
                logprobs: logprobs.map(|content| ChoiceLogprobs { content }),
                boxes: (!boxes.is_empty()).then_some(boxes),
            }],
            usage,
        }
    }
}

/// `delta` of a streamed chunk.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// One choice of a streamed chunk.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ChunkChoice {
    pub index: usize,
    pub delta: Delta,
    pub logprobs: Option<ChoiceLogprobs>,
    pub finish_reason: Option<&'static str>,
    /// Extension, on the final chunk only (see [`Choice::boxes`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boxes: Option<Vec<BoxOut>>,
}

/// A streamed chunk (`object: "chat.completion.chunk"`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ChatChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChunkChoice>,
    /// With `stream_options.include_usage`: `null` on every chunk but the last, which has no choices.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<UsageOut>>,
}

/// Builds the chunks of one streamed answer, all with the same id, timestamp and model.
#[derive(Clone, Debug)]
pub struct ChunkMaker {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub include_usage: bool,
}

impl ChunkMaker {
    fn chunk(&self, choices: Vec<ChunkChoice>, usage: Option<UsageOut>) -> ChatChunk {
        ChatChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage: self.include_usage.then_some(usage),
        }
    }
    /// The first chunk: `delta: {"role": "assistant", "content": ""}`.
    pub fn role(&self) -> ChatChunk {
        let delta = Delta { role: Some("assistant"), content: Some(String::new()) };
        self.chunk(vec![ChunkChoice { index: 0, delta, logprobs: None, finish_reason: None, boxes: None }], None)
    }
    /// A piece of the answer.
    pub fn content(&self, text: String, logprobs: Option<Vec<LogprobOut>>) -> ChatChunk {
        let delta = Delta { role: None, content: Some(text) };
        let logprobs = logprobs.map(|content| ChoiceLogprobs { content });
        self.chunk(vec![ChunkChoice { index: 0, delta, logprobs, finish_reason: None, boxes: None }], None)
    }
    /// The last chunk of the choice: empty delta, `finish_reason`, and the boxes if any.
    pub fn finish(&self, finish_reason: &'static str, boxes: Vec<BoxOut>) -> ChatChunk {
        let choice = ChunkChoice {
            index: 0,
            delta: Delta::default(),
            logprobs: None,
            finish_reason: Some(finish_reason),
            boxes: (!boxes.is_empty()).then_some(boxes),
        };
        self.chunk(vec![choice], None)
    }
    /// The usage chunk (only with `include_usage`): no choices.
    pub fn usage(&self, usage: UsageOut) -> ChatChunk {
        self.chunk(Vec::new(), Some(usage))
    }
}

/// One server-sent event carrying `value` as JSON: `data: {...}\n\n`.
pub fn sse_data<T: Serialize>(value: &T) -> String {
    // Serialising these types cannot fail (string keys, no maps with non-string keys); an error
    // would still produce a well-formed event.
    let json = serde_json::to_string(value)
        .unwrap_or_else(|e| ApiError::internal(format!("cannot serialise a chunk: {e}")).body().to_string());
    format!("data: {json}\n\n")
}

/// The event that ends every stream.
pub const SSE_DONE: &str = "data: [DONE]\n\n";

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<ChatRequest, ApiError> {
        ChatRequest::from_value(&v)
    }
    fn base() -> Value {
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    }
    fn with(key: &str, value: Value) -> Value {
        let mut v = base();
        v[key] = value;
        v
    }
    fn err(v: Value) -> ApiError {
        parse(v).expect_err("must be refused")
    }

    #[test]
    fn minimal_request_uses_defaults() {
        let r = parse(base()).unwrap();
        assert_eq!(r.model, "m");
        assert_eq!(r.messages, vec![ChatMessage { role: MsgRole::User, parts: vec![MsgPart::Text("hi".into())] }]);
        assert_eq!((r.max_tokens, r.temperature, r.top_p, r.top_k, r.seed), (None, None, None, None, None));
        assert_eq!((r.stream, r.include_usage, r.logprobs), (false, false, None));
        assert!(r.stop.is_empty());
    }

    #[test]
    fn full_request_reads_every_field_and_ignores_unknown_ones() {
        let r = parse(json!({
            "model": "qwen", "unknown_field": {"x": 1}, "user": "u1",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "name": "bob", "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "high"}},
                    {"type": "image_url", "image_url": "https://example.com/a.png"},
                    {"type": "text", "text": "what?"}]},
                {"role": "assistant", "content": "<ref>x</ref>"},
                {"role": "user", "content": "more"}],
            "max_tokens": 5, "max_completion_tokens": 7, "temperature": 0, "top_p": 0.9, "top_k": 40,
            "repetition_penalty": 1.1, "presence_penalty": -2, "frequency_penalty": 2.0, "seed": -1,
            "stop": ["\n\n", "END"], "stream": true, "stream_options": {"include_usage": true},
            "logprobs": true, "top_logprobs": 3, "n": 1
        }))
        .unwrap();
        assert_eq!(r.messages.len(), 4);
        assert_eq!(r.messages[0].role, MsgRole::System);
        assert_eq!(
            r.messages[1].parts,
            vec![
                MsgPart::Image("data:image/png;base64,AAAA".into()),
                MsgPart::Image("https://example.com/a.png".into()),
                MsgPart::Text("what?".into())
            ]
        );
        assert_eq!(r.messages[2].role, MsgRole::Assistant);
        assert_eq!(r.max_tokens, Some(7), "max_completion_tokens wins");
        assert_eq!(r.temperature, Some(0.0));
        assert_eq!(r.top_p, Some(0.9));
        assert_eq!(r.top_k, Some(40));
        assert_eq!(r.repetition_penalty, Some(1.1));
        assert_eq!((r.presence_penalty, r.frequency_penalty), (-2.0, 2.0));
        assert_eq!(r.seed, Some(u64::MAX));
        assert_eq!(r.stop, vec!["\n\n".to_string(), "END".to_string()]);
        assert!(r.stream && r.include_usage);
        assert_eq!(r.logprobs, Some(3));
        assert_eq!(r.image_urls().count(), 2);
    }

    #[test]
    fn nulls_are_absent_and_stop_may_be_a_string() {
        let mut v = base();
        for k in ["temperature", "top_p", "max_tokens", "seed", "n", "stop", "stream_options", "logprobs"] {
            v[k] = Value::Null;
        }
        assert_eq!(parse(v).unwrap(), parse(base()).unwrap());
        assert_eq!(parse(with("stop", json!("###"))).unwrap().stop, vec!["###".to_string()]);
        assert_eq!(parse(with("top_k", json!(-1))).unwrap().top_k, Some(0));
        assert_eq!(parse(with("logprobs", json!(true))).unwrap().logprobs, Some(0));
    }

    #[test]
    fn out_of_range_values_name_the_field_and_the_range() {
        let cases = [
            ("temperature", json!(2.5), "`temperature` must be between 0 and 2, got 2.5"),
            ("temperature", json!(-0.1), "`temperature` must be between 0 and 2"),
            ("top_p", json!(0), "`top_p` must be greater than 0 and at most 1, got 0"),
            ("top_p", json!(1.5), "`top_p` must be greater than 0 and at most 1"),
            ("presence_penalty", json!(2.1), "`presence_penalty` must be between -2 and 2"),
            ("frequency_penalty", json!(-3), "`frequency_penalty` must be between -2 and 2"),
            ("repetition_penalty", json!(0), "`repetition_penalty` must be greater than 0"),
            ("top_k", json!(-2), "`top_k` must be a positive integer"),
            ("max_tokens", json!(0), "`max_tokens` must be at least 1, got 0"),
            ("max_completion_tokens", json!(-5), "`max_completion_tokens` must be at least 1"),
            ("n", json!(2), "only n=1 is supported"),
            ("stop", json!([""]), "a stop sequence must not be empty"),
        ];
        for (key, value, msg) in cases {
            let e = err(with(key, value.clone()));
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{key}={value}");
            assert!(e.message.contains(msg), "{key}={value}: {:?} lacks {msg:?}", e.message);
            assert!(e.param.as_deref().unwrap_or("").starts_with(key), "{key}: param {:?}", e.param);
        }
    }

    #[test]
    fn logprob_rules() {
        let mut v = with("logprobs", json!(true));
        v["top_logprobs"] = json!(21);
        assert!(err(v).message.contains("between 0 and 20, got 21"));
        let e = err(with("top_logprobs", json!(2)));
        assert!(e.message.contains("needs `logprobs`"), "{}", e.message);
        let mut v = with("logprobs", json!(true));
        v["top_logprobs"] = json!(20);
        assert_eq!(parse(v).unwrap().logprobs, Some(20));
    }

    #[test]
    fn ill_typed_fields_say_what_was_expected() {
        let cases = [
            (with("temperature", json!("hot")), "temperature", "`temperature` must be a number, got a string"),
            (with("max_tokens", json!(1.5)), "max_tokens", "`max_tokens` must be an integer, got a number"),
            (with("stream", json!("yes")), "stream", "`stream` must be true or false"),
            (with("stop", json!(5)), "stop", "must be a string or an array of strings"),
            (with("stop", json!(["a", 1])), "stop[1]", "`stop[1]` must be a string"),
            (with("messages", json!("hi")), "messages", "`messages` must be an array"),
            (with("messages", json!([])), "messages", "at least one message"),
            (with("model", json!(3)), "model", "`model` must be a string"),
            (json!({"messages": [{"role": "user", "content": "x"}]}), "model", "`model` is required"),
            (json!({"model": "m"}), "messages", "`messages` is required"),
            (with("stream_options", json!({"include_usage": true})), "stream_options", "only allowed when"),
        ];
        for (v, param, msg) in cases {
            let e = err(v);
            assert_eq!(e.param.as_deref(), Some(param));
            assert!(e.message.contains(msg), "{:?} lacks {msg:?}", e.message);
        }
    }

    #[test]
    fn message_errors_point_into_the_conversation() {
        let m = |msgs: Value| err(with("messages", msgs));
        let e = m(json!([{"role": "tool", "content": "x"}]));
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
        assert!(e.message.contains("unknown role \"tool\""), "{}", e.message);
        let e = m(json!([{"content": "x"}]));
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
        let e = m(json!([{"role": "user"}]));
        assert_eq!(e.param.as_deref(), Some("messages[0].content"));
        let e = m(json!([{"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "audio"}]}]));
        assert_eq!(e.param.as_deref(), Some("messages[1].content[0].type"));
        assert!(e.message.contains("unsupported content part type \"audio\""));
        let e = m(json!([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]));
        assert_eq!(e.param.as_deref(), Some("messages[0].content[0].image_url.url"));
        let e = m(json!([{"role": "user", "content": [{"type": "text"}]}]));
        assert_eq!(e.param.as_deref(), Some("messages[0].content[0].text"));
        let e = m(json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ""}}]}]));
        assert!(e.message.contains("must not be empty"));
        // An assistant turn without content is allowed (empty), a developer message is a system message.
        let r = parse(with(
            "messages",
            json!([{"role": "developer", "content": "s"}, {"role": "assistant"}, {"role": "user", "content": "q"}]),
        ))
        .unwrap();
        assert_eq!(r.messages[0].role, MsgRole::System);
        assert!(r.messages[1].parts.is_empty());
    }

    #[test]
    fn bad_json_is_an_invalid_request() {
        let e = ChatRequest::parse(b"{\"model\": ").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.code, Some("invalid_json"));
        assert!(e.message.starts_with("the request body is not valid JSON"), "{}", e.message);
        let e = ChatRequest::parse(b"[1,2]").unwrap_err();
        assert!(e.message.contains("must be a JSON object, got an array"));
    }

    #[test]
    fn error_envelope_has_the_openai_shape() {
        let e = ApiError::invalid("temperature", "bad");
        assert_eq!(
            e.body(),
            json!({"error": {"message": "bad", "type": "invalid_request_error", "param": "temperature", "code": null}})
        );
        let e = ApiError::unavailable("queue_full", 1, "busy");
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.retry_after, Some(1));
        assert_eq!(e.body()["error"]["code"], "queue_full");
        assert_eq!(e.body()["error"]["param"], Value::Null);
        assert_eq!(ApiError::model_not_found("gpt-4", "qwen").status, StatusCode::NOT_FOUND);
        assert_eq!(ApiError::too_large(10).status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(ApiError::unauthorized("no").status, StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn response_has_the_openai_shape() {
        let r = ChatCompletion::new(
            "chatcmpl-x".into(),
            7,
            "qwen".into(),
            "hello".into(),
            "stop",
            None,
            Vec::new(),
            UsageOut::new(10, 2, 4),
        );
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v,
            json!({"id": "chatcmpl-x", "object": "chat.completion", "created": 7, "model": "qwen",
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"},
                                "finish_reason": "stop", "logprobs": null}],
                   "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12,
                             "prompt_tokens_details": {"cached_tokens": 4}}})
        );
        let id = completion_id();
        assert!(id.starts_with("chatcmpl-") && id.len() == 9 + 24, "{id}");
        assert_ne!(id, completion_id());
    }

    #[test]
    fn chunks_and_sse_framing() {
        let mk = ChunkMaker { id: "chatcmpl-1".into(), created: 3, model: "m".into(), include_usage: false };
        assert_eq!(
            sse_data(&mk.role()),
            "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":3,\"model\":\"m\",\
             \"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"logprobs\":null,\
             \"finish_reason\":null}]}\n\n"
        );
        let v = serde_json::to_value(mk.content("é".into(), None)).unwrap();
        assert_eq!(v["choices"][0]["delta"], json!({"content": "é"}));
        assert!(v.get("usage").is_none());
        let v = serde_json::to_value(mk.finish("length", Vec::new())).unwrap();
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["choices"][0]["delta"], json!({}));

        let mk = ChunkMaker { include_usage: true, ..mk };
        let v = serde_json::to_value(mk.content("a".into(), None)).unwrap();
        assert_eq!(v["usage"], Value::Null, "usage is null before the last chunk");
        let v = serde_json::to_value(mk.usage(UsageOut::new(1, 2, 0))).unwrap();
        assert_eq!(v["choices"], json!([]));
        assert_eq!(v["usage"]["total_tokens"], 3);
        assert_eq!(SSE_DONE, "data: [DONE]\n\n");
        // A chunk's JSON never holds a raw newline, so one `data:` line is the whole event.
        assert!(!sse_data(&mk.content("a\nb\r\n".into(), None)).trim_end().contains('\n'));
    }

    #[test]
    fn logprobs_serialise_like_openai() {
        let lp = LogprobOut {
            token: "hi".into(),
            logprob: -0.5,
            bytes: vec![104, 105],
            top_logprobs: vec![TopLogprobOut { token: "hi".into(), logprob: -0.5, bytes: vec![104, 105] }],
        };
        let mk = ChunkMaker { id: "c".into(), created: 0, model: "m".into(), include_usage: false };
        let v = serde_json::to_value(mk.content("hi".into(), Some(vec![lp]))).unwrap();
        assert_eq!(
            v["choices"][0]["logprobs"],
            json!({"content": [{"token": "hi", "logprob": -0.5, "bytes": [104, 105],
                                "top_logprobs": [{"token": "hi", "logprob": -0.5, "bytes": [104, 105]}]}]})
        );
    }
}
