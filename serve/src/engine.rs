//! The scheduler: one thread owns the model, its backend and `max_batch` KV
//! slots, and serves every request through them (continuous batching).
//!
//! Each iteration of the loop:
//! 1. admits waiting requests (FIFO) into free slots: a request goes to the
//!    free slot whose cached tokens share the longest reusable prefix with
//!    its prompt ([`Session::reusable_prefix`]: whole prefill chunks, same NTK
//!    alpha, same pictures), which keeps those rows and prefills only the rest;
//! 2. does at most **one** piece of prefill work for the oldest request in
//!    prefill: encode one of its pictures the vision cache lacks, or else run
//!    one prefill chunk (rows up to the next absolute multiple of
//!    `prefill_chunk`). After the prompt's last chunk the first token is
//!    sampled (`Started`, then text);
//! 3. runs one batched decode step over every decoding request, whatever
//!    their slots (on the CPU in groups of [`CPU_DECODE_GROUP`], or 16 where
//!    the model decodes on AMX tiles, see [`decode_group_size`]),
//!    samples each row on the host and streams it.
//!
//! A request's life: `Queued → Prefill → Decode → Done | Cancelled | Failed`,
//! with timestamps for the latency histograms. A sink that returns `false`
//! cancels its request and frees its slot at once (before the next decode
//! step); a panic while serving one request (its sampling, detokenizing,
//! sink, or its own prefill) fails that request with [`Event::Error`] and the
//! engine goes on; a failed model step fails the requests it ran for.
//!
//! A compiled artifact ([`Session::can_extend`] false) prefills each prompt
//! whole from row 0: no chunking and no prefix reuse there. A checkpoint
//! chunks and reuses on every backend (the GPU executor's device KV cache too).

use crate::detok::TextStream;
use crate::metrics::Metrics;
use crate::request::{
    Event, FinishReason, GenRequest, ImageKey, RequestId, Sink, SubmitError, TokenLogprob, Usage, MAX_TOP_LOGPROBS,
};
use crate::vision_cache::VisionCache;
use qvc_model::sampling::{apply_penalties, log_softmax_top, sample, Rng};
use qvc_model::{chunk_end, step_batch, Model, Session, MAX_CONTEXT, PREFILL_CHUNK};
use qvc_runtime::Backend;
use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// Decode rows per batched step on any CPU: larger batches run as several
/// groups of at most this many. The CPU decode kernels give every row the
/// same bits for any batch size up to this bound
/// ([`qvc_runtime::DECODE_BATCH_INVARIANT_MAX`]), so a greedy answer does not
/// depend on what else runs. [`Model::cpu_decode_group`] says where a model
/// may take more (16 on AMX tiles, in either `--cpu-math` once `qvc serve`
/// declares batched decode).
pub const CPU_DECODE_GROUP: usize = qvc_runtime::DECODE_BATCH_INVARIANT_MAX;

/// How the engine runs.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// KV slots: requests that run at once (prefill or decode).
    pub max_batch: usize,
    /// Requests that may wait for a slot; one more is refused with [`SubmitError::QueueFull`].
    pub max_queue: usize,
    /// Prefill chunk: boundaries at the absolute multiples of this many
    /// positions (keep [`PREFILL_CHUNK`] for answers identical to `qvc generate`).
    pub prefill_chunk: usize,
    /// Pictures whose vision features are kept (LRU).
    pub vision_cache: usize,
    /// Most prompt + answer tokens of one request; `None`: the model's limit
    /// (a compiled artifact's `--max-seq`, else [`MAX_CONTEXT`]). Set it to
    /// the device KV cache's rows on a GPU.
    pub max_context: Option<usize>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig { max_batch: 4, max_queue: 64, prefill_chunk: PREFILL_CHUNK, vision_cache: 64, max_context: None }
    }
}

/// Where the engine is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EngineState {
    /// The model is loading (`/health` 503).
    Loading,
    /// Serving.
    Ready,
    /// Loading failed; the text says why.
    Failed(String),
    /// [`Engine::shutdown`] was called: no new requests; running and queued ones finish.
    Draining,
}

/// Loads the model and its backend on the scheduler thread (so the backend
/// need not be `Send`); gets the number of KV slots.
pub type LoadFn = Box<dyn FnOnce(usize) -> anyhow::Result<(Arc<Model>, Box<dyn Backend>)> + Send>;

/// A handle to the scheduler (cheap to clone; the thread ends once every
/// handle is dropped and nothing runs or waits).
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
    _handle: Arc<Handle>,
}

/// Dropped with the last [`Engine`] clone: tells the thread to end when idle.
struct Handle(Arc<Shared>);

impl Drop for Handle {
    fn drop(&mut self) {
        let mut q = self.0.lock();
        q.closed = true;
        self.0.wake.notify_all();
    }
}

struct Queued {
    id: RequestId,
    req: GenRequest,
    sink: Sink,
    at: Instant,
    /// Features of the pictures sent without pixels, taken from the cache at
    /// submission (so a later eviction cannot fail the request).
    feats: Vec<Option<Arc<Vec<f32>>>>,
}

struct Queue {
    waiting: VecDeque<Queued>,
    running: usize,
    draining: bool,
    closed: bool,
}

struct Shared {
    cfg: EngineConfig,
    state: Mutex<EngineState>,
    model: OnceLock<Arc<Model>>,
    context: OnceLock<usize>,
    /// Sequences per decode step ([`decode_group_size`]), once loaded.
    group: OnceLock<usize>,
    queue: Mutex<Queue>,
    /// Wakes the scheduler (new request, shutdown).
    wake: Condvar,
    /// Wakes `wait_idle` callers.
    idle: Condvar,
    vision: Mutex<VisionCache>,
    metrics: Metrics,
    next_id: Mutex<RequestId>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn vision(&self) -> MutexGuard<'_, VisionCache> {
        self.vision.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn set_state(&self, s: EngineState) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = s;
    }
}

impl Engine {
    /// Spawns the scheduler thread; `load` runs on it and returns the model
    /// and its backend. [`Engine::state`] is `Loading` until it returns.
    pub fn start(cfg: EngineConfig, load: LoadFn) -> Engine {
        let cfg = EngineConfig { max_batch: cfg.max_batch.max(1), prefill_chunk: cfg.prefill_chunk.max(1), ..cfg };
        let shared = Arc::new(Shared {
            state: Mutex::new(EngineState::Loading),
            model: OnceLock::new(),
            context: OnceLock::new(),
            group: OnceLock::new(),
            queue: Mutex::new(Queue { waiting: VecDeque::new(), running: 0, draining: false, closed: false }),
            wake: Condvar::new(),
            idle: Condvar::new(),
            vision: Mutex::new(VisionCache::new(cfg.vision_cache)),
            metrics: Metrics::default(),
            next_id: Mutex::new(1),
            cfg,
        });
        shared.metrics.update(|c| c.slots_total = shared.cfg.max_batch);
        let s = shared.clone();
        let spawned = std::thread::Builder::new().name("qvc-scheduler".into()).spawn(move || scheduler(s, load));
        if let Err(e) = spawned {
            shared.set_state(EngineState::Failed(format!("cannot start the scheduler thread: {e}")));
        }
        Engine { _handle: Arc::new(Handle(shared.clone())), shared }
    }

    pub fn state(&self) -> EngineState {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The model, once loaded.
    pub fn model(&self) -> Option<Arc<Model>> {
        self.shared.model.get().cloned()
    }

    /// The most prompt + `max_tokens` a request may have (once loaded).
    pub fn context_len(&self) -> Option<usize> {
        self.shared.context.get().copied()
    }

    /// Most sequences one decode step runs (once loaded): more active
    /// requests take several steps ([`decode_group_size`]).
    pub fn decode_group(&self) -> Option<usize> {
        self.shared.group.get().copied()
    }

    /// The engine's settings.
    pub fn config(&self) -> &EngineConfig {
        &self.shared.cfg
    }

    /// Validate `req` and queue it; its events go to `sink` on the scheduler
    /// thread. Refused: not loaded yet ([`SubmitError::NotReady`]), shutting
    /// down, queue full, or an invalid request (empty prompt, ids outside the
    /// vocabulary, prompt + `max_tokens` beyond the context, pictures that do
    /// not match the prompt's image spans, out-of-range sampling values).
    pub fn submit(&self, req: GenRequest, sink: Sink) -> Result<RequestId, SubmitError> {
        match self.state() {
            EngineState::Ready => {}
            EngineState::Draining => return Err(SubmitError::ShuttingDown),
            EngineState::Loading | EngineState::Failed(_) => return Err(SubmitError::NotReady),
        }
        let model = self.model().ok_or(SubmitError::NotReady)?;
        let context = self.context_len().unwrap_or(MAX_CONTEXT);
        self.validate(&model, context, &req)?;
        let mut feats = Vec::with_capacity(req.images.len());
        for img in &req.images {
            let f = match img.pixels {
                Some(_) => None,
                None => {
                    let f = self.shared.vision().get(img.key);
                    let Some(f) = f else {
                        return Err(SubmitError::NotCached { name: img.name.clone() });
                    };
                    self.shared.metrics.update(|c| c.vision_hits += 1);
                    Some(f)
                }
            };
            feats.push(f);
        }
        let mut q = self.shared.lock();
        if q.draining {
            return Err(SubmitError::ShuttingDown);
        }
        if q.waiting.len() >= self.shared.cfg.max_queue {
            return Err(SubmitError::QueueFull { waiting: q.waiting.len() });
        }
        let id = {
            let mut n = self.shared.next_id.lock().unwrap_or_else(|p| p.into_inner());
            *n += 1;
            *n - 1
        };
        q.waiting.push_back(Queued { id, req, sink, at: Instant::now(), feats });
        let waiting = q.waiting.len();
        self.shared.metrics.update(|c| c.waiting = waiting);
        self.shared.wake.notify_all();
        Ok(id)
    }

    fn validate(&self, model: &Model, context: usize, r: &GenRequest) -> Result<(), SubmitError> {
        let invalid = |why: String| Err(SubmitError::Invalid(why));
        let cfg = &model.config;
        if r.prompt.is_empty() {
            return invalid("the prompt is empty".into());
        }
        if let Some(&bad) = r.prompt.iter().find(|&&i| i as usize >= cfg.vocab_size) {
            return invalid(format!("token id {bad} is outside the vocabulary (0..{})", cfg.vocab_size));
        }
        if r.max_tokens == 0 {
            return invalid("max_tokens must be at least 1".into());
        }
        let total = r.prompt.len().saturating_add(r.max_tokens);
        if total > context {
            return Err(SubmitError::ContextExceeded { prompt: r.prompt.len(), max_tokens: r.max_tokens, context });
        }
        let spans = model.tokenizer.image_spans(&r.prompt).map_err(|e| SubmitError::Invalid(e.to_string()))?;
        if spans.len() != r.images.len() {
            return invalid(format!("the prompt has {} picture(s) but {} were given", spans.len(), r.images.len()));
        }
        let px = 3 * cfg.visual.image_size * cfg.visual.image_size;
        for (s, img) in spans.iter().zip(&r.images) {
            match &img.pixels {
                Some(p) if p.len() != px => {
                    return invalid(format!(
                        "picture {:?}: {} preprocessed values, the vision tower needs 3 × {s} × {s}",
                        img.name,
                        p.len(),
                        s = cfg.visual.image_size
                    ))
                }
                None if !self.has_image(img.key) => return Err(SubmitError::NotCached { name: img.name.clone() }),
                _ => {}
            }
            if s.path != img.name {
                return invalid(format!(
                    "picture {} is named {:?} in the prompt but {:?} was given",
                    s.start, s.path, img.name
                ));
            }
        }
        r.sampling.validate().map_err(SubmitError::Invalid)?;
        for (name, v) in [("presence_penalty", r.presence_penalty), ("frequency_penalty", r.frequency_penalty)] {
            if !(-2.0..=2.0).contains(&v) {
                return invalid(format!("{name} must be between -2 and 2, got {v}"));
            }
        }
        if r.logprobs.is_some_and(|k| k > MAX_TOP_LOGPROBS) {
            return invalid(format!("top_logprobs must be at most {MAX_TOP_LOGPROBS}"));
        }
        if r.stop_strings.iter().any(String::is_empty) {
            return invalid("a stop string must not be empty".into());
        }
        Ok(())
    }

    /// Whether the vision features of `key` are cached (the caller may then
    /// send the picture without pixels).
    pub fn has_image(&self, key: ImageKey) -> bool {
        self.shared.vision().contains(key)
    }

    /// The Prometheus text of [`crate::metrics`].
    pub fn metrics_text(&self) -> String {
        self.shared.metrics.render()
    }

    /// The engine's metrics (for tests and `qvc chat`'s statistics).
    pub fn metrics(&self) -> crate::metrics::Counts {
        self.shared.metrics.snapshot()
    }

    /// Stop accepting requests ([`SubmitError::ShuttingDown`]); running and
    /// queued requests finish.
    pub fn shutdown(&self) {
        let mut q = self.shared.lock();
        q.draining = true;
        if self.state() == EngineState::Ready {
            self.shared.set_state(EngineState::Draining);
        }
        self.shared.wake.notify_all();
    }

    /// Wait until nothing runs or waits, at most `deadline`; true when idle.
    pub fn wait_idle(&self, deadline: Duration) -> bool {
        let end = Instant::now() + deadline;
        let mut q = self.shared.lock();
        loop {
            if q.waiting.is_empty() && q.running == 0 {
                return true;
            }
            let now = Instant::now();
            if now >= end {
                return false;
            }
            q = self.shared.idle.wait_timeout(q, end - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

/// The largest decode batch one step may run with `backend` and `model`.
pub fn decode_group_size(model: &Model, backend: &dyn Backend, slots: usize) -> usize {
    let most = if backend.kv_on_device() { slots.max(1) } else { model.cpu_decode_group() };
    match model.compiled() {
        // Compiled decode programs exist for 1..=--max-batch sequences.
        Some(m) => most.min(m.options.max_batch.max(1)),
        None => most,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Prefill,
    Decode,
}

/// A request holding a slot.
struct Active {
    id: RequestId,
    req: GenRequest,
    sink: Sink,
    phase: Phase,
    slot: usize,
    feats: Vec<Option<Arc<Vec<f32>>>>,
    cached: usize,
    generated: Vec<u32>,
    counts: HashMap<u32, u32>,
    seen: Vec<u32>,
    rng: Rng,
    /// The token to feed at the next decode step.
    next: Option<u32>,
    text: TextStream,
    logprobs: Vec<TokenLogprob>,
    queued_at: Instant,
    last_token_at: Option<Instant>,
}

/// What became of a request after some work.
enum Outcome {
    Continue,
    Finished(FinishReason, String),
    Cancelled,
    Failed(String),
}

/// A KV slot: its session and the pictures of the spans its cache holds.
struct Slot<'m> {
    session: Session<'m>,
    /// (span start, picture) of the image spans in the cached tokens.
    images: Vec<(usize, ImageKey)>,
    busy: bool,
    last_used: u64,
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

fn scheduler(shared: Arc<Shared>, load: LoadFn) {
    let slots_n = shared.cfg.max_batch;
    let loaded = catch_unwind(AssertUnwindSafe(|| load(slots_n)));
    let (model, backend) = match loaded {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => return fail_loading(&shared, format!("{e:#}")),
        Err(p) => return fail_loading(&shared, format!("loading panicked: {}", panic_text(p.as_ref()))),
    };
    let model_limit = model.compiled().map_or(MAX_CONTEXT, |m| m.options.max_seq.min(MAX_CONTEXT));
    let context = shared.cfg.max_context.map_or(model_limit, |c| c.min(model_limit));
    let _ = shared.context.set(context);
    let group = decode_group_size(&model, backend.as_ref(), slots_n);
    let _ = shared.group.set(group);
    let _ = shared.model.set(model.clone());
    {
        let q = shared.lock();
        shared.set_state(if q.draining { EngineState::Draining } else { EngineState::Ready });
    }
    let mut s = Scheduler::new(&shared, &model, backend.as_ref(), context, group);
    if let Err(p) = catch_unwind(AssertUnwindSafe(|| s.run())) {
        // A bug outside any one request's work: fail everything rather than
        // leave clients waiting on a dead thread.
        let why = format!("the scheduler failed: {}", panic_text(p.as_ref()));
        for mut a in s.active.drain(..) {
            let _ = catch_unwind(AssertUnwindSafe(|| (a.sink)(Event::Error(why.clone()))));
        }
        shared.lock().running = 0;
        fail_loading(&shared, why);
    }
}

/// The engine cannot serve: state `Failed`, waiting requests get the reason.
fn fail_loading(shared: &Shared, why: String) {
    shared.set_state(EngineState::Failed(why.clone()));
    let waiting: Vec<Queued> = shared.lock().waiting.drain(..).collect();
    for mut r in waiting {
        let _ = catch_unwind(AssertUnwindSafe(|| (r.sink)(Event::Error(why.clone()))));
    }
    shared.metrics.update(|c| c.waiting = 0);
    shared.idle.notify_all();
}

struct Scheduler<'m> {
    shared: &'m Shared,
    model: &'m Model,
    slots: Vec<Slot<'m>>,
    active: Vec<Active>,
    context: usize,
    group: usize,
    clock: u64,
}

impl<'m> Scheduler<'m> {
    fn new(shared: &'m Shared, model: &'m Model, backend: &'m dyn Backend, context: usize, group: usize) -> Self {
        let n = shared.cfg.max_batch;
        let slots = (0..n)
            .map(|i| {
                let mut session = Session::new(model, backend);
                session.set_kv_slot(i);
                Slot { session, images: vec![], busy: false, last_used: 0 }
            })
            .collect();
        Scheduler { shared, model, slots, active: vec![], context, group, clock: 0 }
    }

    fn run(&mut self) {
        loop {
            let admitted = {
                let mut q = self.shared.lock();
                loop {
                    let free = self.slots.iter().filter(|s| !s.busy).count();
                    if free > 0 && !q.waiting.is_empty() || !self.active.is_empty() {
                        break;
                    }
                    q.running = 0;
                    self.shared.idle.notify_all();
                    if q.closed && q.waiting.is_empty() {
                        return;
                    }
                    q = self.shared.wake.wait(q).unwrap_or_else(|p| p.into_inner());
                }
                let free = self.slots.iter().filter(|s| !s.busy).count();
                let n = free.min(q.waiting.len());
                let taken: Vec<Queued> = q.waiting.drain(..n).collect();
                q.running = self.active.len() + taken.len();
                let (w, r) = (q.waiting.len(), q.running);
                self.shared.metrics.update(|c| {
                    c.waiting = w;
                    c.running = r;
                });
                taken
            };
            for r in admitted {
                self.admit(r);
            }
            self.prefill_one();
            self.decode_step();
            self.publish();
        }
    }

    /// Counts the queue and metrics see.
    fn publish(&self) {
        let used = self.slots.iter().filter(|s| s.busy).count();
        let mut q = self.shared.lock();
        q.running = self.active.len();
        let (w, r) = (q.waiting.len(), q.running);
        // Metrics before waking `wait_idle`, so an idle engine reads idle.
        self.shared.metrics.update(|c| {
            c.waiting = w;
            c.running = r;
            c.slots_used = used;
        });
        if w == 0 && r == 0 {
            self.shared.idle.notify_all();
        }
    }

    /// Place a request in the free slot with the longest reusable prefix.
    fn admit(&mut self, q: Queued) {
        let chunk = self.shared.cfg.prefill_chunk;
        let spans = self.model.tokenizer.image_spans(&q.req.prompt).unwrap_or_default();
        let keys: Vec<(usize, ImageKey)> =
            spans.iter().map(|s| s.start).zip(q.req.images.iter().map(|i| i.key)).collect();
        let mut best: Option<(usize, usize)> = None; // (reuse, slot)
        for (i, slot) in self.slots.iter().enumerate().filter(|(_, s)| !s.busy) {
            let mut reuse = slot.session.reusable_prefix(&q.req.prompt, chunk);
            // A span in the kept prefix must hold the same picture (its ids are only its name).
            for &(start, key) in &keys {
                if start < reuse && !slot.images.contains(&(start, key)) {
                    reuse = start / chunk * chunk;
                }
            }
            let better = match best {
                None => true,
                Some((r, j)) => reuse > r || (reuse == r && slot.last_used < self.slots[j].last_used),
            };
            if better {
                best = Some((reuse, i));
            }
        }
        let Some((reuse, i)) = best else {
            // Not reached: admission takes only as many requests as there are free slots.
            let mut sink = q.sink;
            let _ = catch_unwind(AssertUnwindSafe(|| sink(Event::Error("no free KV slot".into()))));
            return;
        };
        self.clock += 1;
        let slot = &mut self.slots[i];
        slot.busy = true;
        slot.last_used = self.clock;
        slot.session.truncate(reuse);
        slot.images.retain(|&(start, _)| start < reuse);
        let prompt_len = q.req.prompt.len();
        self.shared.metrics.update(|c| {
            c.prompt_tokens += prompt_len as u64;
            c.prefix_hit_tokens += reuse as u64;
        });
        let mut seen = q.req.prompt.clone();
        seen.reserve(q.req.max_tokens);
        self.active.push(Active {
            id: q.id,
            rng: Rng::new(q.req.sampling.seed),
            text: TextStream::new(&q.req.stop_strings),
            req: q.req,
            sink: q.sink,
            phase: Phase::Prefill,
            slot: i,
            feats: q.feats,
            cached: reuse,
            generated: vec![],
            counts: HashMap::new(),
            seen,
            next: None,
            logprobs: vec![],
            queued_at: q.at,
            last_token_at: None,
        });
    }

    /// Vision features of every picture of request `a` (cache first).
    /// Returns false after encoding one picture (the iteration's model work;
    /// the next iteration goes on), true when every picture is ready.
    fn features(&mut self, ai: usize) -> Result<bool, String> {
        let slot = self.active[ai].slot;
        for k in 0..self.active[ai].req.images.len() {
            if self.active[ai].feats[k].is_some() {
                continue;
            }
            let img = &self.active[ai].req.images[k];
            let (key, pixels) = (img.key, img.pixels.clone());
            let cached = self.shared.vision().get(key);
            let f = match (cached, pixels) {
                (Some(f), _) => {
                    self.shared.metrics.update(|c| c.vision_hits += 1);
                    f
                }
                (None, Some(px)) => {
                    let f = self.slots[slot].session.encode_pixels(&px).map_err(|e| e.to_string())?;
                    let f = Arc::new(f);
                    self.shared.vision().insert(key, f.clone());
                    self.shared.metrics.update(|c| c.vision_misses += 1);
                    self.active[ai].feats[k] = Some(f);
                    return Ok(false);
                }
                (None, None) => {
                    return Err(format!(
                        "the features of picture {:?} are no longer cached and no pixels were sent",
                        img.name
                    ))
                }
            };
            self.active[ai].feats[k] = Some(f);
        }
        Ok(true)
    }

    /// One prefill chunk, or one picture's vision encoding, of the oldest
    /// request in prefill (so a decode step follows every such piece of work).
    fn prefill_one(&mut self) {
        let Some(ai) = self
            .active
            .iter()
            .enumerate()
            .filter(|(_, a)| a.phase == Phase::Prefill)
            .min_by_key(|(_, a)| a.id)
            .map(|(i, _)| i)
        else {
            return;
        };
        let chunk = self.shared.cfg.prefill_chunk;
        let res = catch_unwind(AssertUnwindSafe(|| -> Result<Option<Vec<f32>>, String> {
            if !self.features(ai)? {
                return Ok(None);
            }
            let a = &self.active[ai];
            let slot = &mut self.slots[a.slot];
            let s = &mut slot.session;
            let n = a.req.prompt.len();
            let end = if s.can_extend() {
                chunk_end(s.cached_tokens(), n, chunk)
            } else {
                s.truncate(0);
                n
            };
            let feats: Vec<&[f32]> = a.feats.iter().map(|f| f.as_deref().map_or(&[][..], Vec::as_slice)).collect();
            let logits = s.extend(&a.req.prompt, end, &feats).map_err(|e| e.to_string())?;
            Ok((end == n).then_some(logits))
        }));
        let outcome = match res {
            Ok(Ok(None)) => return,
            Ok(Ok(Some(logits))) => {
                let a = &mut self.active[ai];
                a.phase = Phase::Decode;
                // The spans of the prompt are now in the slot's cache.
                let spans = self.model.tokenizer.image_spans(&a.req.prompt).unwrap_or_default();
                let slot = &mut self.slots[a.slot];
                slot.images = spans.iter().map(|s| s.start).zip(a.req.images.iter().map(|i| i.key)).collect();
                if !self.slots[a.slot].session.can_extend() {
                    a.cached = 0;
                }
                let started = Event::Started { prompt_tokens: a.req.prompt.len(), cached_tokens: a.cached };
                match emit(a, started) {
                    Outcome::Continue => self.token(ai, &logits),
                    o => o,
                }
            }
            Ok(Err(e)) => Outcome::Failed(e),
            Err(p) => Outcome::Failed(format!("internal error: {}", panic_text(p.as_ref()))),
        };
        let failed = matches!(outcome, Outcome::Failed(_));
        if failed {
            // The cache may be half written.
            let slot = self.active[ai].slot;
            self.slots[slot].session.truncate(0);
            self.slots[slot].images.clear();
        }
        self.settle(ai, outcome);
    }

    /// Sample the next token of request `ai` from `logits` and stream it.
    fn token(&mut self, ai: usize, logits: &[f32]) -> Outcome {
        let tok = &self.model.tokenizer;
        let context = self.context;
        let shared = self.shared;
        let a = &mut self.active[ai];
        let r = catch_unwind(AssertUnwindSafe(|| {
            let mut l = logits.to_vec();
            apply_penalties(&mut l, &a.counts, a.req.presence_penalty, a.req.frequency_penalty);
            let next = sample(&l, &a.seen, &a.req.sampling, &mut a.rng);
            let now = Instant::now();
            let prev = a.last_token_at.replace(now);
            shared.metrics.update(|c| match prev {
                None => c.ttft.observe((now - a.queued_at).as_secs_f64()),
                Some(p) => c.itl.observe((now - p).as_secs_f64()),
            });
            if a.req.stop_ids.contains(&next) {
                return finish_text(a, tok, FinishReason::Stop);
            }
            if let Some(k) = a.req.logprobs {
                let (lp, top) = log_softmax_top(logits, next, k);
                let piece = |id: u32| -> (String, Vec<u8>) {
                    let b = tok
                        .token_bytes(id)
                        .map(<[u8]>::to_vec)
                        .unwrap_or_else(|| tok.decode(&[id], false).into_bytes());
                    (String::from_utf8_lossy(&b).into_owned(), b)
                };
                let (token, bytes) = piece(next);
                let top = top
                    .into_iter()
                    .map(|(id, p)| {
                        let (t, b) = piece(id);
                        (t, b, p)
                    })
                    .collect();
                a.logprobs.push(TokenLogprob { token, bytes, logprob: lp, top });
            }
            a.generated.push(next);
            a.seen.push(next);
            *a.counts.entry(next).or_insert(0) += 1;
            shared.metrics.update(|c| c.generation_tokens += 1);
            let full = tok.decode(&a.generated, false);
            let u = a.text.update(&full, false);
            if let Some(p) = u.stop_at {
                let o = send_delta(a, u.delta);
                return match o {
                    Outcome::Continue => Outcome::Finished(FinishReason::Stop, full[..p].to_string()),
                    o => o,
                };
            }
            if !u.delta.is_empty() {
                if let o @ (Outcome::Cancelled | Outcome::Failed(_)) = send_delta(a, u.delta) {
                    return o;
                }
            }
            if a.generated.len() >= a.req.max_tokens || a.req.prompt.len() + a.generated.len() >= context {
                return finish_text(a, tok, FinishReason::Length);
            }
            a.next = Some(next);
            Outcome::Continue
        }));
        r.unwrap_or_else(|p| Outcome::Failed(format!("internal error: {}", panic_text(p.as_ref()))))
    }

    /// One batched decode step over every decoding request (in groups).
    fn decode_step(&mut self) {
        let mut rows: Vec<usize> = (0..self.active.len())
            .filter(|&i| self.active[i].phase == Phase::Decode && self.active[i].next.is_some())
            .collect();
        if rows.is_empty() {
            return;
        }
        rows.sort_by_key(|&i| self.active[i].slot);
        let mut outcomes: Vec<(usize, Outcome)> = Vec::new();
        for group in rows.chunks(self.group) {
            let ids: Vec<u32> =
                group.iter().map(|&i| self.active[i].next.expect("decoding rows have a token")).collect();
            let slot_of: Vec<usize> = group.iter().map(|&i| self.active[i].slot).collect();
            let res = {
                let mut sessions: Vec<&mut Session<'m>> = self
                    .slots
                    .iter_mut()
                    .enumerate()
                    .filter(|(i, _)| slot_of.contains(i))
                    .map(|(_, s)| &mut s.session)
                    .collect();
                catch_unwind(AssertUnwindSafe(|| step_batch(&mut sessions, &ids)))
            };
            match res {
                Ok(Ok(logits)) => {
                    for (&ai, l) in group.iter().zip(logits) {
                        self.active[ai].next = None;
                        let o = self.token(ai, &l);
                        outcomes.push((ai, o));
                    }
                }
                Ok(Err(e)) => {
                    for &ai in group {
                        outcomes.push((ai, Outcome::Failed(format!("decode step failed: {e}"))));
                    }
                }
                Err(p) => {
                    for &ai in group {
                        outcomes.push((ai, Outcome::Failed(format!("internal error: {}", panic_text(p.as_ref())))));
                    }
                }
            }
        }
        for (ai, o) in &outcomes {
            if matches!(o, Outcome::Failed(_)) {
                let slot = self.active[*ai].slot;
                self.slots[slot].session.truncate(0);
                self.slots[slot].images.clear();
            }
        }
        // Settle from the back so indices stay valid.
        outcomes.sort_by_key(|(ai, _)| std::cmp::Reverse(*ai));
        for (ai, o) in outcomes {
            self.settle(ai, o);
        }
    }

    /// End request `ai` unless it continues; frees its slot.
    ///
    /// The request leaves the engine (slot freed, gauges published) before
    /// the client hears its last event, so metrics read after a response
    /// never still count it as running.
    fn settle(&mut self, ai: usize, o: Outcome) {
        match o {
            Outcome::Continue => {}
            Outcome::Finished(finish, text) => {
                let a = &self.active[ai];
                let usage = Usage {
                    prompt_tokens: a.req.prompt.len(),
                    completion_tokens: a.generated.len(),
                    cached_tokens: a.cached,
                };
                let lat = a.queued_at.elapsed().as_secs_f64();
                self.shared.metrics.update(|c| {
                    c.e2e.observe(lat);
                    match finish {
                        FinishReason::Stop => c.success_stop += 1,
                        FinishReason::Length => c.success_length += 1,
                    }
                });
                let mut a = self.leave(ai);
                if let Outcome::Failed(_) = emit(&mut a, Event::Done { finish, usage, text }) {
                    self.shared.metrics.update(|c| {
                        match finish {
                            FinishReason::Stop => c.success_stop -= 1,
                            FinishReason::Length => c.success_length -= 1,
                        }
                        c.failure += 1
                    });
                }
            }
            Outcome::Cancelled => {
                self.shared.metrics.update(|c| c.cancelled += 1);
                self.leave(ai);
            }
            Outcome::Failed(why) => {
                self.shared.metrics.update(|c| c.failure += 1);
                let mut a = self.leave(ai);
                let _ = catch_unwind(AssertUnwindSafe(|| (a.sink)(Event::Error(why))));
            }
        }
    }

    /// Take request `ai` out of the engine: its slot is free and the gauges
    /// no longer count it.
    fn leave(&mut self, ai: usize) -> Active {
        let a = self.active.remove(ai);
        self.slots[a.slot].busy = false;
        self.publish();
        a
    }
}

/// Send `ev` to the request's sink: `Cancelled` when the client is gone,
/// `Failed` when the sink panicked.
fn emit(a: &mut Active, ev: Event) -> Outcome {
    match catch_unwind(AssertUnwindSafe(|| (a.sink)(ev))) {
        Ok(true) => Outcome::Continue,
        Ok(false) => Outcome::Cancelled,
        Err(p) => Outcome::Failed(format!("internal error while streaming: {}", panic_text(p.as_ref()))),
    }
}

/// A delta with the log-probabilities gathered since the last one.
fn send_delta(a: &mut Active, text: String) -> Outcome {
    let logprobs = std::mem::take(&mut a.logprobs);
    emit(a, Event::Delta { text, logprobs })
}

/// The request ends without a stop string: flush what was held back.
fn finish_text(a: &mut Active, tok: &qvc_model::tokenizer::QwenTokenizer, finish: FinishReason) -> Outcome {
    let full = tok.decode(&a.generated, false);
    let u = a.text.update(&full, true);
    let text = match u.stop_at {
        Some(p) => full[..p].to_string(),
        None => full,
    };
    if !u.delta.is_empty() || !a.logprobs.is_empty() {
        if let o @ (Outcome::Cancelled | Outcome::Failed(_)) = send_delta(a, u.delta) {
            return o;
        }
    }
    Outcome::Finished(if u.stop_at.is_some() { FinishReason::Stop } else { finish }, text)
}
