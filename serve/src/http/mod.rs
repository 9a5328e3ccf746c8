//! The OpenAI-compatible HTTP server of `qvc serve` (axum on tokio): it only
//! parses, validates, fetches pictures, streams and maps errors; the
//! [`Engine`] does the rest.
//!
//! | route | |
//! |---|---|
//! | `POST /v1/chat/completions` | [`openai::ChatRequest`] in; a `chat.completion`, or server-sent `chat.completion.chunk`s with `stream` |
//! | `GET /v1/models`, `GET /v1/models/{id}` | the one served model |
//! | `GET /health` | 200 `{"status":"ok"}` when ready; 503 with the state (`loading`, `failed` + error, `shutting_down`) |
//! | `GET /metrics` | [`Engine::metrics_text`], Prometheus text format 0.0.4 |
//!
//! With an API key, the `/v1/` routes need `Authorization: Bearer KEY`;
//! `/health` and `/metrics` stay open (for load balancers and scrapers).
//! Every error is OpenAI's envelope (see [`openai::ApiError`]), including
//! bad JSON, an oversized body (413), unknown routes (404) and a panic while
//! handling one request (500; the server goes on).
//!
//! A client that goes away (mid-stream or while waiting for a non-streamed
//! answer) drops the request's event receiver, so the engine's sink returns
//! `false` and the request is cancelled before the next decode step.
//!
//! [`serve`] runs the server on a bound listener until SIGTERM or Ctrl-C, then
//! stops accepting, lets running requests finish for up to
//! [`HttpConfig::shutdown_timeout`], and returns.

pub mod media;
pub mod openai;

use crate::conversation::{build_prompt, Message, Part, Role};
use crate::request::{Event, FinishReason, GenRequest, ImageInput, ImageKey, SubmitError, TokenLogprob};
use crate::{Engine, EngineState};
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use media::{Fetcher, MediaConfig, MediaError};
use openai::{
    ApiError, ChatCompletion, ChatRequest, ChunkMaker, LogprobOut, MsgPart, MsgRole, TopLogprobOut, UsageOut,
};
use qvc_model::grounding::{box_outputs, parse_groundings, BoxOut};
use qvc_model::sampling::{SamplingOverrides, SamplingParams};
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::mpsc;

/// How the HTTP layer behaves (the engine has its own [`crate::EngineConfig`]).
#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// The model name clients must send (and `/v1/models` lists).
    pub served_model_name: String,
    /// When set, `/v1/` routes need `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// Larger request bodies get a 413.
    pub max_body_bytes: usize,
    /// How long running requests may take to finish after SIGTERM / Ctrl-C.
    pub shutdown_timeout: Duration,
    /// Picture fetching limits and permissions.
    pub media: MediaConfig,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            served_model_name: "qvc".into(),
            api_key: None,
            max_body_bytes: 64 << 20,
            shutdown_timeout: Duration::from_secs(30),
            media: MediaConfig::default(),
        }
    }
}

/// What [`serve`] reports while it runs (the caller prints it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerEvent {
    /// The model has loaded: `/health` is 200 and requests are served.
    Ready,
    /// A signal arrived: no new connections; running requests get `timeout` to finish.
    Draining { signal: &'static str, timeout: Duration },
    /// Everything finished in time (`true`) or the deadline passed (`false`).
    Stopped { drained: bool },
}

/// Why [`serve`] ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot start the HTTP server: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Media(#[from] MediaError),
    #[error("the model failed to load: {0}")]
    LoadFailed(String),
}

struct AppState {
    engine: Engine,
    cfg: HttpConfig,
    fetcher: Fetcher,
    /// Unix time the server started (`/v1/models` `created`).
    created: u64,
}

type Shared = Arc<AppState>;

/// The router with every route, the body limit, the API-key check and the panic guard.
pub fn router(engine: Engine, cfg: HttpConfig) -> Result<Router, ServeError> {
    let fetcher = Fetcher::new(cfg.media.clone())?;
    let max_body = cfg.max_body_bytes;
    let state: Shared = Arc::new(AppState { engine, cfg, fetcher, created: openai::unix_now() });
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_api_key));
    Ok(Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn(catch_panic))
        .with_state(state))
}

/// Serves on `listener` until SIGTERM or Ctrl-C (then drains, see the module doc) or until the
/// model fails to load ([`ServeError::LoadFailed`]). Blocks; runs its own tokio runtime.
pub fn serve(
    listener: std::net::TcpListener,
    engine: Engine,
    cfg: HttpConfig,
    on_event: impl Fn(ServerEvent) + Send + Sync + 'static,
) -> Result<(), ServeError> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("qvc-http").build()?;
    let result = rt.block_on(run(listener, engine, cfg, Arc::new(on_event)));
    // Blocking work (a picture still decoding) must not hold the exit.
    rt.shutdown_timeout(Duration::from_millis(200));
    result
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    Signal(&'static str),
    LoadFailed,
}

async fn run(
    listener: std::net::TcpListener,
    engine: Engine,
    cfg: HttpConfig,
    on_event: Arc<dyn Fn(ServerEvent) + Send + Sync>,
) -> Result<(), ServeError> {
    use axum::serve::ListenerExt;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?.tap_io(|tcp| {
        // Small SSE writes go out at once.
        let _ = tcp.set_nodelay(true);
    });
    let shutdown_timeout = cfg.shutdown_timeout;
    let app = router(engine.clone(), cfg)?;
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(None::<Stop>);

    // Signals.
    let tx = stop_tx.clone();
    tokio::spawn(async move {
        let signal = next_signal().await;
        let _ = tx.send(Some(Stop::Signal(signal)));
    });
    // Loading: report Ready, or stop on a failed load.
    let (eng, tx, ev) = (engine.clone(), stop_tx.clone(), on_event.clone());
    tokio::spawn(async move {
        loop {
            match eng.state() {
                EngineState::Loading => tokio::time::sleep(Duration::from_millis(20)).await,
                EngineState::Ready => return ev(ServerEvent::Ready),
                EngineState::Failed(_) => {
                    let _ = tx.send(Some(Stop::LoadFailed));
                    return;
                }
                EngineState::Draining => return,
            }
        }
    });

    let mut graceful_rx = stop_rx.clone();
    let eng = engine.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        let _ = graceful_rx.wait_for(Option::is_some).await;
        eng.shutdown();
    });
    let mut server = tokio::spawn(std::future::IntoFuture::into_future(server));

    let stop = tokio::select! {
        done = &mut server => {
            // The server ended without a stop (accept loop failure): report it.
            return match done {
                Ok(r) => r.map_err(ServeError::Io),
                Err(e) => Err(ServeError::Io(std::io::Error::other(e.to_string()))),
            };
        }
        s = stop_rx.wait_for(Option::is_some) => s.map(|s| s.expect("waited for Some")).unwrap_or(Stop::Signal("stop")),
    };
    let signal = match stop {
        Stop::LoadFailed => {
            let why = match engine.state() {
                EngineState::Failed(why) => why,
                s => format!("{s:?}"),
            };
            return Err(ServeError::LoadFailed(why));
        }
        Stop::Signal(s) => s,
    };
    on_event(ServerEvent::Draining { signal, timeout: shutdown_timeout });
    let deadline = tokio::time::sleep(shutdown_timeout);
    let drained = tokio::select! {
        // Every connection closed: every answer was delivered (or its client left and it was cancelled).
        _ = &mut server => true,
        _ = deadline => false,
        // A second signal: stop now.
        _ = next_signal() => false,
    };
    on_event(ServerEvent::Stopped { drained });
    Ok(())
}

/// The next SIGTERM or Ctrl-C (SIGINT).
async fn next_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return "Ctrl-C";
            }
        };
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = tokio::signal::ctrl_c() => "Ctrl-C",
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "Ctrl-C"
    }
}

// ---------------------------------------------------------------------------
// Responses and middleware

fn json_response(status: StatusCode, body: String) -> Response {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = json_response(self.status, self.body().to_string());
        if let Some(s) = self.retry_after {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

/// A future that turns a panic while polling into a 500 for this request only.
struct CatchUnwind<F>(Pin<Box<F>>);

impl<F: Future<Output = Response>> Future for CatchUnwind<F> {
    type Output = Response;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Response> {
        let inner = self.0.as_mut();
        match catch_unwind(AssertUnwindSafe(move || inner.poll(cx))) {
            Ok(p) => p,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Poll::Ready(
                    ApiError::internal(format!("internal error while handling this request: {what}")).into_response(),
                )
            }
        }
    }
}

async fn catch_panic(req: Request, next: Next) -> Response {
    CatchUnwind(Box::pin(next.run(req))).await
}

/// Compares without an early exit on the first differing byte.
fn same_key(given: &[u8], key: &[u8]) -> bool {
    given.len() == key.len() && given.iter().zip(key).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

async fn require_api_key(State(st): State<Shared>, req: Request, next: Next) -> Response {
    let Some(key) = &st.cfg.api_key else { return next.run(req).await };
    let given = req.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes());
    let token = given.and_then(|v| v.strip_prefix(b"Bearer ").or_else(|| v.strip_prefix(b"bearer ")));
    match (given, token) {
        (None, _) => ApiError::unauthorized(
            "this server needs an API key: send the header `Authorization: Bearer KEY` (the key given to \
             --api-key / QVC_API_KEY)",
        )
        .into_response(),
        (Some(_), Some(t)) if same_key(t.trim_ascii(), key.as_bytes()) => next.run(req).await,
        (Some(_), Some(_)) => ApiError::unauthorized("incorrect API key").into_response(),
        (Some(_), None) => ApiError::unauthorized("the Authorization header must read `Bearer KEY`").into_response(),
    }
}

async fn no_route(method: Method, uri: Uri) -> Response {
    ApiError::no_route(method.as_str(), uri.path()).into_response()
}

async fn wrong_method(method: Method, uri: Uri) -> Response {
    ApiError::method_not_allowed(method.as_str(), uri.path()).into_response()
}

async fn health(State(st): State<Shared>) -> Response {
    let (status, body) = match st.engine.state() {
        EngineState::Ready => (StatusCode::OK, serde_json::json!({"status": "ok"})),
        EngineState::Loading => (StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({"status": "loading"})),
        EngineState::Failed(e) => {
            (StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({"status": "failed", "error": e}))
        }
        EngineState::Draining => (StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({"status": "shutting_down"})),
    };
    json_response(status, body.to_string())
}

async fn metrics(State(st): State<Shared>) -> Response {
    let mut r = Response::new(Body::from(st.engine.metrics_text()));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    r
}

fn model_object(st: &AppState) -> serde_json::Value {
    serde_json::json!({"id": st.cfg.served_model_name, "object": "model", "created": st.created, "owned_by": "qvc"})
}

async fn list_models(State(st): State<Shared>) -> Response {
    let body = serde_json::json!({"object": "list", "data": [model_object(&st)]});
    json_response(StatusCode::OK, body.to_string())
}

async fn get_model(State(st): State<Shared>, UrlPath(id): UrlPath<String>) -> Response {
    if id != st.cfg.served_model_name {
        return ApiError::model_not_found(&id, &st.cfg.served_model_name).into_response();
    }
    json_response(StatusCode::OK, model_object(&st).to_string())
}

// ---------------------------------------------------------------------------
// Chat completions

async fn chat_completions(State(st): State<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
    match chat(st, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

fn body_error(rejection: BytesRejection, limit: usize) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::too_large(limit)
    } else {
        ApiError::invalid("", format!("cannot read the request body: {}", rejection.body_text()))
    }
}

/// The 503 (or other) for an engine that cannot take requests now.
fn not_serving(state: EngineState) -> ApiError {
    match state {
        EngineState::Loading | EngineState::Ready => ApiError::unavailable(
            "model_loading",
            5,
            "the model is still loading; retry shortly (GET /health says when)",
        ),
        EngineState::Failed(e) => {
            ApiError::unavailable("model_load_failed", 60, format!("the model failed to load: {e}"))
        }
        EngineState::Draining => ApiError::unavailable("shutting_down", 5, "the server is shutting down"),
    }
}

fn submit_error(e: SubmitError, state: EngineState) -> ApiError {
    match e {
        SubmitError::QueueFull { .. } => ApiError::unavailable("queue_full", 1, e.to_string()),
        SubmitError::NotReady => not_serving(state),
        SubmitError::ShuttingDown => ApiError::unavailable("shutting_down", 5, e.to_string()),
        SubmitError::ContextExceeded { .. } => {
            ApiError::invalid_code("max_tokens", "context_length_exceeded", e.to_string())
        }
        SubmitError::NotCached { .. } | SubmitError::Invalid(_) => ApiError::invalid("", e.to_string()),
    }
}

/// A picture of the request: its bytes and what decoding found.
struct Picture {
    bytes: Arc<Vec<u8>>,
    input: ImageInput,
}

/// Fetches and decodes every picture of the request (each distinct URL once); pixels are computed
/// unless the engine already holds the picture's features (or `force_pixels`).
async fn load_pictures(
    st: &Shared,
    req: &ChatRequest,
    image_size: usize,
    force_pixels: bool,
    known: &mut HashMap<String, Picture>,
) -> Result<(), ApiError> {
    // Where each distinct URL first appears.
    let mut todo: Vec<(String, String)> = Vec::new();
    for (i, m) in req.messages.iter().enumerate() {
        for (j, p) in m.parts.iter().enumerate() {
            if let MsgPart::Image(url) = p {
                let refresh = force_pixels && known.get(url).is_some_and(|p| p.input.pixels.is_none());
                if (!known.contains_key(url) || refresh) && !todo.iter().any(|(u, _)| u == url) {
                    todo.push((url.clone(), format!("messages[{i}].content[{j}]")));
                }
            }
        }
    }
    // Downloads in parallel.
    let mut fetches = tokio::task::JoinSet::new();
    for (n, (url, _)) in todo.iter().enumerate() {
        let existing = known.get(url).map(|p| p.bytes.clone());
        let (f, url) = (st.fetcher.clone(), url.clone());
        fetches.spawn(async move {
            let bytes = match existing {
                Some(b) => Ok(b),
                None => f.bytes(&url).await.map(Arc::new),
            };
            (n, bytes)
        });
    }
    let mut fetched: Vec<Option<Arc<Vec<u8>>>> = vec![None; todo.len()];
    while let Some(r) = fetches.join_next().await {
        let (n, bytes) = r.map_err(|e| ApiError::internal(format!("fetching a picture failed: {e}")))?;
        fetched[n] = Some(bytes.map_err(|e| media_error(&todo[n].1, e))?);
    }
    for ((url, at), bytes) in todo.into_iter().zip(fetched) {
        let bytes = bytes.expect("every fetch reported");
        let key = ImageKey::of(&bytes);
        let size = (force_pixels || !st.engine.has_image(key)).then_some(image_size);
        let max_pixels = st.fetcher.config().max_image_pixels;
        let b = bytes.clone();
        let decoded = tokio::task::spawn_blocking(move || media::decode(&b, max_pixels, size))
            .await
            .map_err(|e| ApiError::internal(format!("decoding a picture failed: {e}")))?
            .map_err(|e| media_error(&at, e))?;
        let input = ImageInput {
            key,
            name: key.name(),
            width: decoded.width,
            height: decoded.height,
            pixels: decoded.pixels.map(Arc::new),
        };
        known.insert(url, Picture { bytes, input });
    }
    Ok(())
}

fn media_error(at: &str, e: MediaError) -> ApiError {
    ApiError::invalid_code(format!("{at}.image_url.url"), e.code(), format!("{at}: {e}"))
}

fn to_messages(req: &ChatRequest, pictures: &HashMap<String, Picture>) -> Vec<Message> {
    req.messages
        .iter()
        .map(|m| Message {
            role: match m.role {
                MsgRole::System => Role::System,
                MsgRole::User => Role::User,
                MsgRole::Assistant => Role::Assistant,
            },
            parts: m
                .parts
                .iter()
                .map(|p| match p {
                    MsgPart::Text(t) => Part::Text(t.clone()),
                    MsgPart::Image(url) => Part::Image(pictures[url].input.clone()),
                })
                .collect(),
        })
        .collect()
}

fn logprobs_out(lp: Vec<TokenLogprob>) -> Vec<LogprobOut> {
    lp.into_iter()
        .map(|t| LogprobOut {
            token: t.token,
            logprob: t.logprob,
            bytes: t.bytes,
            top_logprobs: t
                .top
                .into_iter()
                .map(|(token, bytes, logprob)| TopLogprobOut { token, logprob, bytes })
                .collect(),
        })
        .collect()
}

/// The `boxes` of an answer, in pixels of the last picture of the prompt.
fn boxes(text: &str, images: &[ImageInput]) -> Vec<BoxOut> {
    let items = parse_groundings(text);
    if items.is_empty() {
        return Vec::new();
    }
    box_outputs(&items, images.last().map(|i| (i.name.as_str(), i.width, i.height)))
}

async fn chat(st: Shared, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let body = body.map_err(|r| body_error(r, st.cfg.max_body_bytes))?;
    let req = ChatRequest::parse(&body)?;
    drop(body);
    if req.model != st.cfg.served_model_name {
        return Err(ApiError::model_not_found(&req.model, &st.cfg.served_model_name));
    }
    let model = match (st.engine.state(), st.engine.model()) {
        (EngineState::Ready, Some(m)) => m,
        (s, _) => return Err(not_serving(s)),
    };
    let image_size = model.config.visual.image_size;

    let mut pictures = HashMap::new();
    load_pictures(&st, &req, image_size, false, &mut pictures).await?;

    let g = &model.generation;
    let o = SamplingOverrides {
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        repetition_penalty: req.repetition_penalty,
    };
    let sampling = SamplingParams::with_defaults(g, &o, req.seed.unwrap_or_else(openai::random_u64));
    sampling.validate().map_err(|e| ApiError::invalid("", e))?;
    let stop_ids = qvc_model::chat::stop_ids(&model.tokenizer);
    let context = st.engine.context_len();

    let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
    let mut attempt = 0;
    let images = loop {
        let messages = to_messages(&req, &pictures);
        let m = model.clone();
        let (prompt, images) = tokio::task::spawn_blocking(move || build_prompt(&m, &messages))
            .await
            .map_err(|e| ApiError::internal(format!("building the prompt failed: {e}")))?
            .map_err(|e| ApiError::invalid_code("messages", "invalid_conversation", e.to_string()))?;
        // Without max_tokens: generation_config's max_new_tokens, within what the context leaves.
        let left = context.map_or(usize::MAX, |c| c.saturating_sub(prompt.len()));
        if req.max_tokens.is_none() && left == 0 {
            return Err(ApiError::invalid_code(
                "messages",
                "context_length_exceeded",
                format!(
                    "the prompt has {} tokens, which leaves no room for an answer in the context of {} tokens; \
                     shorten the conversation",
                    prompt.len(),
                    context.unwrap_or(0)
                ),
            ));
        }
        let max_tokens = req.max_tokens.unwrap_or(g.max_new_tokens.min(left).max(1));
        let gen = GenRequest {
            prompt,
            images: images.clone(),
            max_tokens,
            sampling: sampling.clone(),
            presence_penalty: req.presence_penalty,
            frequency_penalty: req.frequency_penalty,
            stop_ids: stop_ids.clone(),
            stop_strings: req.stop.clone(),
            logprobs: req.logprobs,
        };
        let sender = tx.clone();
        let sink = Box::new(move |ev: Event| sender.send(ev).is_ok());
        match st.engine.submit(gen, sink) {
            Ok(_) => break images,
            // A cached picture's features were evicted between the check and the submit: send pixels.
            Err(SubmitError::NotCached { .. }) if attempt == 0 && images.iter().any(|i| i.pixels.is_none()) => {
                attempt += 1;
                load_pictures(&st, &req, image_size, true, &mut pictures).await?;
            }
            Err(e) => return Err(submit_error(e, st.engine.state())),
        }
    };
    drop(tx);

    let id = openai::completion_id();
    let created = openai::unix_now();
    let name = st.cfg.served_model_name.clone();
    if req.stream {
        let maker = ChunkMaker { id, created, model: name, include_usage: req.include_usage };
        return Ok(sse_response(SseBody::new(rx, maker, req.logprobs.is_some(), images)));
    }

    // Non-streamed: wait for the whole answer (dropping `rx` if the client goes away cancels it).
    let mut logprobs = Vec::new();
    loop {
        match rx.recv().await {
            Some(Event::Started { .. }) => {}
            Some(Event::Delta { logprobs: lp, .. }) => logprobs.extend(logprobs_out(lp)),
            Some(Event::Done { finish, usage, text }) => {
                let boxes = boxes(&text, &images);
                let response = ChatCompletion::new(
                    id,
                    created,
                    name,
                    text,
                    finish_reason(finish),
                    req.logprobs.is_some().then_some(logprobs),
                    boxes,
                    UsageOut::new(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens),
                );
                let json = serde_json::to_string(&response)
                    .map_err(|e| ApiError::internal(format!("cannot serialise the response: {e}")))?;
                return Ok(json_response(StatusCode::OK, json));
            }
            Some(Event::Error(msg)) => return Err(ApiError::internal(msg)),
            None => return Err(ApiError::internal("the engine dropped the request before it finished")),
        }
    }
}

fn finish_reason(f: FinishReason) -> &'static str {
    f.as_str()
}

fn sse_response(body: SseBody) -> Response {
    let mut r = Response::new(Body::from_stream(body));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

/// The server-sent events of one streamed answer: the role chunk once the prompt is read (so the first
/// event marks the time to first token, as with OpenAI), a chunk per delta, the
/// finishing chunk (with `boxes`), the usage chunk with `include_usage`, then `data: [DONE]`. An
/// engine error mid-stream becomes a `data: {"error": ...}` event before `[DONE]`.
/// Dropping it (the client went away) drops the receiver, which cancels the request.
struct SseBody {
    rx: mpsc::UnboundedReceiver<Event>,
    maker: ChunkMaker,
    logprobs: bool,
    images: Vec<ImageInput>,
    pending: VecDeque<String>,
    role_sent: bool,
    finished: bool,
}

impl SseBody {
    fn new(rx: mpsc::UnboundedReceiver<Event>, maker: ChunkMaker, logprobs: bool, images: Vec<ImageInput>) -> Self {
        SseBody { rx, maker, logprobs, images, pending: VecDeque::new(), role_sent: false, finished: false }
    }

    /// The `delta.role` chunk, before anything else of the answer.
    fn role(&mut self) {
        if !self.role_sent {
            self.role_sent = true;
            self.pending.push_back(openai::sse_data(&self.maker.role()));
        }
    }

    /// Queues the events for one engine event.
    fn on_event(&mut self, ev: Option<Event>) {
        match ev {
            Some(Event::Started { .. }) => self.role(),
            Some(Event::Delta { text, logprobs }) => {
                self.role();
                if text.is_empty() && logprobs.is_empty() {
                    return;
                }
                let lp = self.logprobs.then(|| logprobs_out(logprobs));
                self.pending.push_back(openai::sse_data(&self.maker.content(text, lp)));
            }
            Some(Event::Done { finish, usage, text }) => {
                self.role();
                let boxes = boxes(&text, &self.images);
                self.pending.push_back(openai::sse_data(&self.maker.finish(finish_reason(finish), boxes)));
                if self.maker.include_usage {
                    let u = UsageOut::new(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens);
                    self.pending.push_back(openai::sse_data(&self.maker.usage(u)));
                }
                self.pending.push_back(openai::SSE_DONE.to_string());
                self.finished = true;
            }
            Some(Event::Error(msg)) => self.fail(msg),
            None => self.fail("the engine dropped the request before it finished".into()),
        }
    }

    fn fail(&mut self, msg: String) {
        self.pending.push_back(format!("data: {}\n\n", ApiError::internal(msg).body()));
        self.pending.push_back(openai::SSE_DONE.to_string());
        self.finished = true;
    }
}

impl futures_core::Stream for SseBody {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(s) = this.pending.pop_front() {
                return Poll::Ready(Some(Ok(Bytes::from(s))));
            }
            if this.finished {
                return Poll::Ready(None);
            }
            match this.rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(ev) => this.on_event(ev),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::Usage;

    fn maker(include_usage: bool) -> ChunkMaker {
        ChunkMaker { id: "chatcmpl-t".into(), created: 1, model: "m".into(), include_usage }
    }

    /// Runs `events` through an [`SseBody`] and returns the SSE text.
    fn stream(events: Vec<Event>, include_usage: bool, close: bool) -> String {
        let (tx, rx) = mpsc::unbounded_channel();
        for e in events {
            tx.send(e).unwrap();
        }
        if close {
            drop(tx);
        } else {
            std::mem::forget(tx);
        }
        let images = vec![ImageInput { key: ImageKey(1), name: "pic".into(), width: 200, height: 100, pixels: None }];
        let mut body = SseBody::new(rx, maker(include_usage), false, images);
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut out = String::new();
        loop {
            match futures_core::Stream::poll_next(Pin::new(&mut body), &mut cx) {
                Poll::Ready(Some(Ok(b))) => out.push_str(std::str::from_utf8(&b).unwrap()),
                Poll::Ready(None) | Poll::Pending => return out,
            }
        }
    }

    fn data_lines(s: &str) -> Vec<serde_json::Value> {
        s.split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                let d = e.strip_prefix("data: ").expect("every event is one data line");
                if d == "[DONE]" {
                    serde_json::Value::String("[DONE]".into())
                } else {
                    serde_json::from_str(d).unwrap()
                }
            })
            .collect()
    }

    #[test]
    fn sse_stream_framing_and_order() {
        let usage = Usage { prompt_tokens: 5, completion_tokens: 2, cached_tokens: 1 };
        let text = "a dog <ref>dog</ref><box>(0,0),(500,500)</box>".to_string();
        let s = stream(
            vec![
                Event::Started { prompt_tokens: 5, cached_tokens: 1 },
                Event::Delta { text: "a dog ".into(), logprobs: vec![] },
                Event::Delta { text: String::new(), logprobs: vec![] },
                Event::Delta { text: text[6..].into(), logprobs: vec![] },
                Event::Done { finish: FinishReason::Stop, usage, text },
            ],
            true,
            false,
        );
        assert!(s.ends_with("data: [DONE]\n\n"));
        let ev = data_lines(&s);
        assert_eq!(ev.len(), 6, "{s}");
        assert_eq!(ev[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(ev[1]["choices"][0]["delta"]["content"], "a dog ");
        assert_eq!(ev[2]["choices"][0]["delta"]["content"], "<ref>dog</ref><box>(0,0),(500,500)</box>");
        assert_eq!(ev[3]["choices"][0]["finish_reason"], "stop");
        assert_eq!(ev[3]["choices"][0]["boxes"][0]["box_px"], serde_json::json!([[0, 0], [100, 50]]));
        assert_eq!(ev[3]["choices"][0]["boxes"][0]["image"], "pic");
        assert_eq!(ev[4]["choices"], serde_json::json!([]));
        assert_eq!(ev[4]["usage"]["prompt_tokens_details"]["cached_tokens"], 1);
        assert_eq!(ev[5], "[DONE]");
        for e in &ev[..5] {
            assert_eq!(e["object"], "chat.completion.chunk");
            assert_eq!(e["id"], "chatcmpl-t");
        }
    }

    #[test]
    fn sse_stream_without_usage_and_with_errors() {
        let s = stream(
            vec![Event::Done { finish: FinishReason::Length, usage: Usage::default(), text: "x".into() }],
            false,
            false,
        );
        let ev = data_lines(&s);
        assert_eq!(ev.len(), 3);
        assert_eq!(ev[1]["choices"][0]["finish_reason"], "length");
        assert!(ev[1]["choices"][0].get("boxes").is_none());
        assert!(ev[1].get("usage").is_none());

        let ev = data_lines(&stream(vec![Event::Error("boom".into())], true, false));
        assert_eq!(ev.len(), 2);
        assert_eq!(ev[0]["error"]["message"], "boom");
        assert_eq!(ev[0]["error"]["type"], "server_error");
        assert_eq!(ev[1], "[DONE]");
        // The engine dropping the sink without an answer ends the stream with an error too.
        let ev = data_lines(&stream(vec![Event::Started { prompt_tokens: 1, cached_tokens: 0 }], false, true));
        assert_eq!(ev[0]["choices"][0]["delta"]["role"], "assistant");
        assert!(ev[1]["error"]["message"].as_str().unwrap().contains("dropped"));
        assert_eq!(ev[2], "[DONE]");
        // Nothing before the prompt is read; then the role chunk, and the stream waits.
        assert_eq!(stream(vec![], false, false), "");
        let s = stream(vec![Event::Started { prompt_tokens: 1, cached_tokens: 0 }], false, false);
        assert_eq!(data_lines(&s)[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(data_lines(&s).len(), 1);
    }

    #[test]
    fn dropping_the_stream_makes_the_sink_return_false() {
        let (tx, rx) = mpsc::unbounded_channel::<Event>();
        let mut sink: crate::Sink = Box::new(move |ev| tx.send(ev).is_ok());
        let body = SseBody::new(rx, maker(false), false, vec![]);
        assert!(sink(Event::Started { prompt_tokens: 1, cached_tokens: 0 }));
        drop(body);
        assert!(!sink(Event::Delta { text: "x".into(), logprobs: vec![] }));
    }

    #[test]
    fn submit_errors_map_to_statuses() {
        let e = submit_error(SubmitError::QueueFull { waiting: 64 }, EngineState::Ready);
        assert_eq!((e.status, e.retry_after, e.code), (StatusCode::SERVICE_UNAVAILABLE, Some(1), Some("queue_full")));
        let e = submit_error(SubmitError::NotReady, EngineState::Loading);
        assert_eq!((e.status, e.code), (StatusCode::SERVICE_UNAVAILABLE, Some("model_loading")));
        let e = submit_error(SubmitError::ShuttingDown, EngineState::Draining);
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        let e = submit_error(
            SubmitError::ContextExceeded { prompt: 10, max_tokens: 9000, context: 8192 },
            EngineState::Ready,
        );
        assert_eq!((e.status, e.code), (StatusCode::BAD_REQUEST, Some("context_length_exceeded")));
        assert!(e.message.contains("9010 tokens exceed the context of 8192"), "{}", e.message);
        assert!(e.message.contains("lower max_tokens to at most 8182"), "{}", e.message);
        let e = not_serving(EngineState::Failed("no weights".into()));
        assert!(e.message.contains("no weights"));
    }

    #[test]
    fn api_key_comparison() {
        assert!(same_key(b"secret", b"secret"));
        assert!(!same_key(b"secreT", b"secret"));
        assert!(!same_key(b"secret2", b"secret"));
        assert!(!same_key(b"", b"secret"));
    }

    #[test]
    fn error_responses_carry_retry_after_and_json() {
        let r = ApiError::unavailable("queue_full", 1, "busy").into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        let r = ApiError::unauthorized("no").into_response();
        assert_eq!(r.headers()[header::WWW_AUTHENTICATE], "Bearer");
    }

    #[test]
    fn a_panicking_future_becomes_a_500() {
        let fut = CatchUnwind(Box::pin(async {
            if std::hint::black_box(true) {
                panic!("handler bug");
            }
            Response::new(Body::empty())
        }));
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let r = rt.block_on(fut);
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
