//! [`GpuBackend`]: runs graphs on a [`Device`] through [`lower`].
//!
//! Per program (recognised by a structural fingerprint, so an artifact's
//! programs are lowered once): one lowering and its kernels loaded once.
//! Programs run one at a time, so they share one device workspace sized by
//! the largest memory plan used so far (plus inputs and scratch): a prompt
//! bucket of 2048 tokens and the decode step do not each hold their own.
//! Weights are uploaded on first use in the dtype and layout their kernel
//! wants, straight from the memory map where those match, and shared by all
//! programs. The KV cache lives on the device ([`Backend::kv_on_device`]):
//! sessions pass `past_len` (and `kv_slot` for the sequence) instead of cache
//! inputs, and the backend returns every output except the new K/V rows.
//! A program whose arguments are fixed (a decode step: its sequences' cache
//! slots and key counts are device data it reads, not kernel arguments) is
//! recorded as a device graph on its second run and replayed after, for any
//! slots in any order.

use super::device::{DevPtr, Device, DeviceError, KArg};
use super::lower::{
    fnv_extend, lower, resolve, Arg, Buf, HostArg, KvShape, Layout, LowerOptions, Lowered, Q4Part, SampleArg, Sampling,
    Step, WeightKey, FNV_START,
};
use crate::{Backend, Inputs, KernelTime};
use half::bf16;
use qvc_codegen::Module;
use qvc_ir::{DType, Elems, ExecError, Graph, InputRef, Op, Q4Ref, Q4Words, WeightSource};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

fn dev_err(e: DeviceError) -> ExecError {
    ExecError::Device(e.to_string())
}

/// Counters of what the backend did (for `qvc bench` and tests).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecStats {
    pub runs: u64,
    pub launches: u64,
    pub host_nodes: u64,
    pub programs: usize,
    pub kernels_loaded: usize,
    pub weight_bytes: u64,
    /// Programs recorded as device graphs, and runs replayed from one.
    pub captures: u64,
    pub replays: u64,
}

struct Program {
    low: Lowered,
    /// [`State::clock`] at its last run.
    used: u64,
    /// Every weight its steps read is on the device (uploads are never
    /// dropped, so this is checked once, not on every decode step).
    weights_ready: bool,
}

/// Lowered programs kept at most (see [`GpuBackend::prepare`]).
const MAX_PROGRAMS: usize = 256;

struct State {
    dev: Box<dyn Device>,
    weights: HashMap<WeightKey, DevPtr>,
    programs: HashMap<u64, Program>,
    /// Per layer: K and V caches, `[slots, heads, max_seq, head_dim]` bf16.
    kv: Vec<[DevPtr; 2]>,
    stats: ExecStats,
    /// Full fingerprints by (graph address, wiring-and-shapes hash).
    fingerprints: HashMap<(usize, u64), u64>,
    /// Captured runs by (program, sequence slots where its arguments depend
    /// on them (else none), sampling settings).
    graphs: HashMap<(u64, Vec<u64>), GraphState>,
    /// Per kernel while profiling: launches, milliseconds, work.
    profile: Option<HashMap<String, KernelTime>>,
    /// Runs so far (ages programs).
    clock: u64,
    /// The workspace all programs share (pointer, bytes).
    arena: Option<(DevPtr, u64)>,
    /// The artifact's module, loaded before generating any kernel.
    module: Option<(String, Option<Vec<u8>>)>,
}

/// A graph executor on one device (the PTX emulator or a CUDA GPU).
pub struct GpuBackend {
    state: Mutex<State>,
    kv: KvShape,
    slots: usize,
    sms: usize,
    label: &'static str,
    /// Capture capturable programs (decode steps) as device graphs.
    graphs: bool,
    /// Called as weights upload: (bytes done, bytes of this batch).
    progress: Option<Progress>,
}

/// A weight-upload progress callback: (bytes done, bytes to do).
pub type Progress = Box<dyn Fn(u64, u64) + Send + Sync>;

impl GpuBackend {
    /// A backend on `dev` whose KV cache holds `slots` sequences of `kv`.
    /// `module`: an artifact's PTX (and cubin for this device), loaded first;
    /// kernels it lacks are generated on demand.
    pub fn new(
        dev: Box<dyn Device>,
        kv: KvShape,
        slots: usize,
        module: Option<(String, Option<Vec<u8>>)>,
    ) -> GpuBackend {
        let label = if dev.name().starts_with("PTX emulator") { "emu" } else { "cuda" };
        GpuBackend {
            state: Mutex::new(State {
                dev,
                weights: HashMap::new(),
                programs: HashMap::new(),
                kv: vec![],
                stats: ExecStats::default(),
                graphs: HashMap::new(),
                fingerprints: HashMap::new(),
                arena: None,
                clock: 0,
                profile: None,
                module,
            }),
            kv,
            slots: slots.max(1),
            sms: 132,
            label,
            graphs: std::env::var("QVC_CUDA_GRAPHS").map_or(true, |v| v != "0"),
            progress: None,
        }
    }

    /// Report weight uploads (a progress bar: they take seconds for the
    /// full model). Weights upload when a program first needs them.
    pub fn set_progress(&mut self, f: Progress) {
        self.progress = Some(f);
    }

    /// Turn device-graph capture of decode steps on or off (on by default;
    /// `QVC_CUDA_GRAPHS=0` turns it off).
    pub fn set_graphs(&mut self, on: bool) {
        self.graphs = on;
    }

    pub fn stats(&self) -> ExecStats {
        self.state.lock().map(|s| s.stats.clone()).unwrap_or_default()
    }

    /// The device's name and memory in use.
    pub fn device_info(&self) -> (String, super::MemInfo) {
        match self.state.lock() {
            Ok(s) => (s.dev.name(), s.dev.memory()),
            Err(_) => ("poisoned".into(), Default::default()),
        }
    }

    /// Time every launch from now on (each waits for the previous: runs get
    /// slower, and nothing is recorded as a device graph) until
    /// [`GpuBackend::take_profile`].
    pub fn start_profile(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.profile = Some(HashMap::new());
        }
    }

    /// The profile since [`GpuBackend::start_profile`], slowest kernel first; profiling stops.
    pub fn take_profile(&self) -> Vec<KernelTime> {
        let mut v: Vec<KernelTime> = self
            .state
            .lock()
            .ok()
            .and_then(|mut s| s.profile.take())
            .map(|m| m.into_values().collect())
            .unwrap_or_default();
        v.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        v
    }

    /// [`fingerprint`] without re-hashing every op's text on each decode
    /// step: remembered per graph address, checked by a cheap hash of the
    /// wiring and shapes (a graph rebuilt at the same address with other
    /// shapes misses).
    fn fingerprint_cached(&self, s: &mut State, g: &Graph) -> u64 {
        // The wiring and shapes, a word at a time (this runs every step).
        let mut h = FNV_START;
        let mut eat = |x: u64| h = (h ^ x).wrapping_mul(0x100000001b3);
        for n in &g.nodes {
            eat(n.inputs.len() as u64);
            n.inputs.iter().for_each(|i| eat(i.0 as u64));
            n.ty.shape.0.iter().for_each(|&d| eat(d as u64));
        }
        let key = (g as *const Graph as usize, h);
        if let Some(&f) = s.fingerprints.get(&key) {
            return f;
        }
        let f = fingerprint(g);
        if s.fingerprints.len() > 4096 {
            s.fingerprints.clear();
        }
        s.fingerprints.insert(key, f);
        f
    }

    fn prepare(&self, s: &mut State, g: &Graph, key: u64, sampling: Sampling) -> Result<(), ExecError> {
        if s.programs.contains_key(&key) {
            return Ok(());
        }
        let opt = LowerOptions { kv: self.kv, sms: self.sms, sampling };
        let low = lower(g, &opt).map_err(|e| ExecError::Device(e.to_string()))?;
        if let Some((ptx, cubin)) = s.module.take() {
            s.dev.load_module(&ptx, cubin.as_deref()).map_err(dev_err)?;
        }
        let missing: Vec<_> =
            low.kernels.iter().filter(|(n, _)| !s.dev.has_kernel(n)).map(|(_, k)| k.build()).collect();
        if !missing.is_empty() {
            s.stats.kernels_loaded += missing.len();
            let text = Module::new(s.dev.target(), missing).print();
            s.dev.load_module(&text, None).map_err(dev_err)?;
        }
        s.stats.programs += 1;
        // A checkpoint's decode graphs differ at every length: keep the
        // lowerings bounded (an artifact has a few dozen programs).
        if s.programs.len() >= MAX_PROGRAMS {
            s.programs.retain(|_, p| p.used + (MAX_PROGRAMS as u64) / 2 > s.clock);
            s.graphs.retain(|(k, _), _| s.programs.contains_key(k));
        }
        s.programs.insert(key, Program { low, used: s.clock, weights_ready: false });
        Ok(())
    }

    fn ensure_kv(&self, s: &mut State) -> Result<(), ExecError> {
        if !s.kv.is_empty() || self.kv.layers == 0 {
            return Ok(());
        }
        let bytes = self.slots * self.kv.heads * self.kv.max_seq * self.kv.head_dim * 2;
        for _ in 0..self.kv.layers {
            let k = s.dev.alloc(bytes, "the KV cache").map_err(dev_err)?;
            let v = s.dev.alloc(bytes, "the KV cache").map_err(dev_err)?;
            // Zeroed: padded rows of a bucket are finite (masked, never NaN·0).
            s.dev.memset_zero(k, bytes).map_err(dev_err)?;
            s.dev.memset_zero(v, bytes).map_err(dev_err)?;
            s.kv.push([k, v]);
        }
        Ok(())
    }

    fn ensure_weights(&self, s: &mut State, key: u64, weights: &dyn WeightSource) -> Result<(), ExecError> {
        if s.programs[&key].weights_ready {
            return Ok(());
        }
        self.upload_weights(s, key, weights)?;
        if let Some(p) = s.programs.get_mut(&key) {
            p.weights_ready = true;
        }
        Ok(())
    }

    fn upload_weights(&self, s: &mut State, key: u64, weights: &dyn WeightSource) -> Result<(), ExecError> {
        let p = &s.programs[&key];
        let mut want: Vec<WeightKey> = vec![];
        let mut note = |b: &Buf| {
            if let Buf::Weight(k, _) = b {
                want.push(k.clone());
            }
        };
        for st in &p.low.steps {
            if let Step::Launch { args, .. } = st {
                args.iter().for_each(|a| {
                    if let Arg::Buf(b) = a {
                        note(b)
                    }
                });
            }
        }
        for (_, l) in &p.low.outputs {
            note(&l.buf);
        }
        for args in p.low.host_inputs.values() {
            for a in args {
                if let HostArg::Device(l) = a {
                    note(&l.buf);
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        want.retain(|k| !s.weights.contains_key(k) && seen.insert(k.clone()));
        let size = |k: &WeightKey| -> u64 {
            if let Layout::Q4(part) = k.layout {
                return q4_of(weights, &k.name).map_or(0, |q| q4_part_bytes(&q, part));
            }
            let p = &s.programs[&key].low;
            let n: usize = match (p.consts.get(&k.name), p.params.get(&k.name)) {
                (Some(c), _) => c.len(),
                (_, Some(shape)) => match (&k.layout, shape.as_slice()) {
                    (Layout::PadCols(c), [r, _]) => r * c,
                    _ => shape.iter().product(),
                },
                _ => 0,
            };
            (n * k.dtype.size()) as u64
        };
        let total: u64 = want.iter().map(size).sum();
        let mut done = 0u64;
        for k in want {
            let bytes: std::borrow::Cow<[u8]> = if let Some(c) = s.programs[&key].low.consts.get(&k.name) {
                convert(Elems::F32(c), k.dtype).into()
            } else if let Layout::Q4(part) = k.layout {
                q4_part(&q4_of(weights, &k.name)?, part)
            } else {
                let e = weights.weight(&k.name).ok_or_else(|| ExecError::BadWeight {
                    name: k.name.clone(),
                    got: 0,
                    want: 1,
                })?;
                match (&k.layout, e, k.dtype) {
                    // Straight from the memory map: no host copy.
                    (Layout::AsIs, Elems::BF16(v), DType::BF16) => bytemuck::cast_slice(v).into(),
                    (Layout::AsIs, Elems::F32(v), DType::F32) => bytemuck::cast_slice(v).into(),
                    (_, e, _) => {
                        let shape = s.programs[&key].low.params.get(&k.name).cloned().unwrap_or_default();
                        layout(e, &shape, &k)?.into()
                    }
                }
            };
            let ptr = s.dev.alloc(bytes.len(), &format!("weight {}", k.name)).map_err(dev_err)?;
            s.dev.upload(ptr, &bytes).map_err(dev_err)?;
            s.stats.weight_bytes += bytes.len() as u64;
            s.weights.insert(k, ptr);
            done += bytes.len() as u64;
            if let Some(f) = &self.progress {
                f(done, total);
            }
        }
        Ok(())
    }
}

/// The int4 weight `name`, whole, in the form the int4 kernels take (see
/// `qvc_kernels::gpu::q4`): a group size that is a multiple of 8, so that
/// the 8 rows of a packed word share one scale and zero.
fn q4_of<'a>(weights: &'a dyn WeightSource, name: &str) -> Result<Q4Ref<'a>, ExecError> {
    let bad = |why: String| ExecError::Device(format!("int4 weight {name:?}: {why}"));
    match weights.weight(name) {
        Some(Elems::Q4(q)) => {
            if q.row0 != 0 || q.rows != q.ld {
                return Err(bad(format!("a view of rows {}..{} of {}, not the whole weight", q.row0, q.rows, q.ld)));
            }
            if q.group == 0 || !q.group.is_multiple_of(8) {
                return Err(bad(format!(
                    "group size {} is not a multiple of 8, which the GPU int4 kernels need (the CPU backend runs it)",
                    q.group
                )));
            }
            Ok(q)
        }
        Some(e) => Err(bad(format!("stored as {}, not as int4", e.dtype()))),
        None => Err(ExecError::BadWeight { name: name.to_string(), got: 0, want: 1 }),
    }
}

/// Bytes of one part of an int4 weight on the device.
fn q4_part_bytes(q: &Q4Ref, part: Q4Part) -> u64 {
    let (g, n, k) = (q.groups(), q.ld, q.cols);
    (match part {
        Q4Part::QWeight => k / 8 * n * 4,
        Q4Part::QZeros => g * n / 8 * 4,
        Q4Part::Scales => g * n * 2,
        Q4Part::Perm => k * 4,
    }) as u64
}

/// One part of an int4 weight as the kernels read it: the checkpoint's
/// storage straight from the memory map (the words put back in stored order
/// when the loader tiled them for the CPU), the identity permutation made up
/// for a weight without act-order.
fn q4_part<'a>(q: &Q4Ref<'a>, part: Q4Part) -> std::borrow::Cow<'a, [u8]> {
    let (g, n, k) = (q.groups(), q.ld, q.cols);
    match part {
        Q4Part::QWeight if q.words == Q4Words::Gptq => bytemuck::cast_slice(&q.qweight[..k / 8 * n]).into(),
        // Regrouped for the CPU at load: back to the stored order the GPU
        // kernels read, as an artifact's `X.qweight` is written.
        Q4Part::QWeight => {
            let mut buf = Vec::with_capacity(k / 8 * n * 4);
            crate::artifact::q4_part_bytes(q, crate::artifact::Q4Part::QWeight, &mut buf);
            buf.into()
        }
        Q4Part::QZeros => bytemuck::cast_slice(&q.qzeros[..g * n / 8]).into(),
        Q4Part::Scales => bytemuck::cast_slice(&q.scales[..g * n]).into(),
        Q4Part::Perm => match q.perm {
            Some(p) => bytemuck::cast_slice(&p[..k]).into(),
            None => (0..k as u32).flat_map(u32::to_le_bytes).collect::<Vec<u8>>().into(),
        },
    }
}

/// Elements of `e` as little-endian bytes of `dtype` (F32 or BF16).
fn convert(e: Elems<'_>, dtype: DType) -> Vec<u8> {
    let n = e.len();
    match (e, dtype) {
        (Elems::F32(v), DType::F32) => bytemuck::cast_slice(v).to_vec(),
        (Elems::BF16(v), DType::BF16) => bytemuck::cast_slice(v).to_vec(),
        (e, DType::BF16) => (0..n).flat_map(|i| bf16::from_f32(e.get(i)).to_le_bytes()).collect(),
        (e, _) => (0..n).flat_map(|i| e.get(i).to_le_bytes()).collect(),
    }
}

/// A weight in the layout its kernel reads (see [`Layout`]).
fn layout(e: Elems<'_>, shape: &[usize], k: &WeightKey) -> Result<Vec<u8>, ExecError> {
    // A weight of rank > 2 (a conv kernel `[O, C, p, p]`) is read as `[O, C·p·p]`.
    let rows_cols = || -> Result<(usize, usize), ExecError> {
        match shape {
            [r, rest @ ..] if !rest.is_empty() && r * rest.iter().product::<usize>() == e.len() => {
                Ok((*r, rest.iter().product()))
            }
            _ => Err(ExecError::BadWeight { name: k.name.clone(), got: e.len(), want: shape.iter().product() }),
        }
    };
    let es = k.dtype.size();
    Ok(match k.layout {
        Layout::Q4(_) => {
            // Uploaded by q4_part; a float view of an int4 weight has a float layout.
            return Err(ExecError::Device(format!("int4 weight {:?}: its parts have no float layout", k.name)));
        }
        Layout::AsIs => convert(e, k.dtype),
        Layout::PadCols(cols) => {
            let (r, c) = rows_cols()?;
            let src = convert(e, k.dtype);
            let mut out = vec![0u8; r * cols * es];
            for i in 0..r {
                out[i * cols * es..(i * cols + c) * es].copy_from_slice(&src[i * c * es..(i + 1) * c * es]);
            }
            out
        }
        Layout::Transposed => {
            let (r, c) = rows_cols()?;
            let src = convert(e, k.dtype);
            let mut out = vec![0u8; r * c * es];
            for i in 0..r {
                for j in 0..c {
                    out[(j * r + i) * es..(j * r + i + 1) * es]
                        .copy_from_slice(&src[(i * c + j) * es..(i * c + j + 1) * es]);
                }
            }
            out
        }
    })
}

/// A structural hash of `g`: ops, wiring, types and constant data.
pub fn fingerprint(g: &Graph) -> u64 {
    let mut h = FNV_START;
    for n in &g.nodes {
        let head = format!("{:?}|{:?}|{}|{}", std::mem::discriminant(&n.op), n.inputs, n.ty.shape, n.ty.dtype);
        h = fnv_extend(h, head.as_bytes());
        h = match &n.op {
            Op::Const(d) => fnv_extend(h, bytemuck::cast_slice(d)),
            op => fnv_extend(h, format!("{op:?}").as_bytes()),
        };
    }
    for (name, id) in &g.outputs {
        h = fnv_extend(h, format!("{name}={}", id.0).as_bytes());
    }
    h
}

/// Device sampling asked for by a run's inputs: `sample.temperature` (0 =
/// greedy), `sample.top_p`, `sample.top_k`, and `sample.u` (one uniform per
/// row, top-p only).
#[derive(Clone, Copy, Debug, PartialEq)]
struct SampleSettings {
    temperature: f32,
    top_p: f32,
    top_k: u32,
}

impl SampleSettings {
    fn of(inputs: &Inputs<'_>) -> Result<Option<SampleSettings>, ExecError> {
        let Some(t) = inputs.get("sample.temperature") else { return Ok(None) };
        let f = |name: &str, default: f32| match inputs.get(name) {
            Some(InputRef::F32(v)) if v.len() == 1 => v[0],
            _ => default,
        };
        let temperature = match t {
            InputRef::F32(v) if v.len() == 1 => v[0],
            _ => return Err(ExecError::Device("sample.temperature must be one f32".into())),
        };
        let top_k = match inputs.get("sample.top_k") {
            Some(InputRef::I32(v)) if v.len() == 1 && v[0] >= 0 => v[0] as u32,
            _ => 0,
        };
        let s = SampleSettings { temperature, top_p: f("sample.top_p", 1.0), top_k };
        if !(s.temperature >= 0.0 && s.temperature.is_finite() && s.top_p > 0.0 && s.top_p <= 1.0) {
            return Err(ExecError::Device(format!("bad sampling settings {s:?}")));
        }
        Ok(Some(s))
    }

    fn mode(&self) -> Sampling {
        if self.temperature > 0.0 {
            Sampling::TopP
        } else {
            Sampling::Greedy
        }
    }
}

/// One sequence of a run: its cache slot and cached length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Seq {
    slot: usize,
    past: usize,
}

/// The run-time sequence context: `past_len` / `kv_slot` for a single
/// sequence, `past_len.{b}` / `kv_slot.{b}` for a batched step (slot `b`
/// when not given).
fn sequences(inputs: &Inputs<'_>, n: usize) -> Vec<Seq> {
    let f = |name: &str| match inputs.get(name) {
        Some(InputRef::F32(v)) if v.len() == 1 && v[0] >= 0.0 => Some(v[0] as usize),
        _ => None,
    };
    let i = |name: &str| match inputs.get(name) {
        Some(InputRef::I32(v)) if v.len() == 1 && v[0] >= 0 => Some(v[0] as usize),
        _ => None,
    };
    (0..n)
        .map(|b| {
            let past = f(&format!("past_len.{b}")).or_else(|| (b == 0).then(|| f("past_len")).flatten()).unwrap_or(0);
            let slot = i(&format!("kv_slot.{b}")).or_else(|| (b == 0).then(|| i("kv_slot")).flatten()).unwrap_or(b);
            Seq { slot, past }
        })
        .collect()
}

impl Backend for GpuBackend {
    fn name(&self) -> &'static str {
        self.label
    }

    fn kv_on_device(&self) -> bool {
        true
    }

    fn samples_on_device(&self) -> bool {
        true
    }

    fn run(
        &self,
        graph: &Graph,
        weights: &dyn WeightSource,
        inputs: &Inputs<'_>,
    ) -> Result<HashMap<String, Vec<f32>>, ExecError> {
        let mut guard = self.state.lock().map_err(|_| ExecError::Device("device state poisoned".into()))?;
        let s = &mut *guard;
        let sample = SampleSettings::of(inputs)?;
        let sampling = sample.map_or(Sampling::Off, |x| x.mode());
        // One lowering per program and sampling mode.
        let key = self.fingerprint_cached(s, graph) ^ (sampling as u64).wrapping_mul(0x9e3779b97f4a7c15);
        self.prepare(s, graph, key, sampling)?;
        self.ensure_kv(s)?;
        self.ensure_weights(s, key, weights)?;
        // Programs run one at a time, so they share one workspace: the
        // largest memory plan (plus inputs and scratch) used so far. When
        // a bigger program comes, it grows, and recorded graphs (whose
        // pointers point into the old one) are dropped.
        let need = s.programs[&key].low.bytes;
        if s.arena.is_none_or(|(_, b)| b < need) {
            if let Some((old, _)) = s.arena.take() {
                s.dev.free(old);
            }
            let ptr = s.dev.alloc(need as usize, "program buffers (the largest memory plan)").map_err(dev_err)?;
            s.arena = Some((ptr, need));
            s.graphs.clear();
        }
        let mem = s.arena.map_or(0, |(p, _)| p);
        s.clock += 1;
        if let Some(p) = s.programs.get_mut(&key) {
            p.used = s.clock;
        }
        let State { dev, weights: wmap, programs, kv, stats, graphs, profile, .. } = s;
        let p = &programs[&key];
        let seqs = sequences(inputs, p.low.seqs);
        if p.low.kv_rows > 0 {
            for (b, q) in seqs.iter().enumerate() {
                if q.slot >= self.slots {
                    return Err(ExecError::Device(format!(
                        "sequence slot {} is outside the device KV cache ({} slots; compile with a larger --max-batch)",
                        q.slot, self.slots
                    )));
                }
                if q.past + p.low.kv_rows > self.kv.max_seq {
                    return Err(ExecError::Device(format!(
                        "{} cached + {} new tokens exceed the device KV cache of {} rows (compile with a larger --max-seq)",
                        q.past, p.low.kv_rows, self.kv.max_seq
                    )));
                }
                if seqs[..b].iter().any(|o| o.slot == q.slot) {
                    return Err(ExecError::Device(format!("two sequences of one step share KV slot {}", q.slot)));
                }
            }
        }
        for i in &p.low.inputs {
            let bytes: &[u8] = match (inputs.get(&i.name), i.dtype) {
                (Some(InputRef::F32(v)), DType::F32) if v.len() == i.numel => bytemuck::cast_slice(v),
                (Some(InputRef::I32(v)), DType::I32) if v.len() == i.numel => bytemuck::cast_slice(v),
                (None, _) => return Err(ExecError::MissingInput { name: i.name.clone() }),
                (Some(r), _) => {
                    let (got, got_dtype) = match r {
                        InputRef::F32(v) => (v.len(), DType::F32),
                        InputRef::I32(v) => (v.len(), DType::I32),
                    };
                    return Err(ExecError::BadInput {
                        name: i.name.clone(),
                        got,
                        got_dtype,
                        want: i.numel,
                        want_dtype: i.dtype,
                    });
                }
            };
            dev.upload(mem + i.offset, bytes).map_err(dev_err)?;
        }
        // Key counts (the new token of each sequence is key `past`) and cache
        // slots: device data the append and decode attention read, so a
        // recorded step replays for any lengths and slots.
        let lens: Vec<u8> = seqs.iter().flat_map(|q| (q.past as u32 + 1).to_le_bytes()).collect();
        dev.upload(mem + p.low.lens_at, &lens).map_err(dev_err)?;
        let slots: Vec<u8> = seqs.iter().flat_map(|q| (q.slot as u32).to_le_bytes()).collect();
        dev.upload(mem + p.low.slots_at, &slots).map_err(dev_err)?;

        let layer_bytes = (self.kv.heads * self.kv.max_seq * self.kv.head_dim * 2) as u64;
        let row_bytes = (self.kv.head_dim * 2) as u64;
        let wlook = |k: &WeightKey| wmap.get(k).copied();
        let kvlook = |layer: usize, v: bool, one: Option<(bool, usize)>| {
            let base = kv.get(layer)?[v as usize];
            let Some((at_past, seq)) = one else { return Some(base) };
            let q = seqs.get(seq)?;
            let row = if at_past { q.past as u64 * row_bytes } else { 0 };
            Some(base + q.slot as u64 * layer_bytes + row)
        };
        let ptr = |b: &Buf| {
            resolve(b, mem, &wlook, &kvlook).ok_or_else(|| ExecError::Device(format!("no device buffer for {b:?}")))
        };
        // A capturable step runs from a recording after its first run (one
        // graph launch instead of one launch per kernel). Decode steps read
        // their slots from the device, so one recording serves any slots;
        // only a program with per-slot pointers is keyed on them.
        let mut gslots: Vec<u64> = if p.low.slot_args { seqs.iter().map(|q| q.slot as u64).collect() } else { vec![] };
        if let Some(x) = sample {
            gslots.extend([x.temperature.to_bits() as u64, x.top_p.to_bits() as u64, x.top_k as u64]);
        }
        let gkey = (key, gslots);
        let replay = match graphs.get(&gkey) {
            _ if profile.is_some() => None,
            Some(GraphState::Captured(id)) => Some(*id),
            Some(GraphState::Seen) if self.graphs && p.low.capturable => {
                if dev.capture_begin().map_err(dev_err)? {
                    let issued = issue(dev.as_mut(), graph, p, mem, weights, &ptr, sample, stats, None);
                    let id = dev.capture_end().map_err(dev_err);
                    issued?;
                    let id = id?;
                    graphs.insert(gkey.clone(), GraphState::Captured(id));
                    stats.captures += 1;
                    Some(id)
                } else {
                    graphs.insert(gkey.clone(), GraphState::Never);
                    None
                }
            }
            Some(_) => None,
            None => {
                graphs.insert(gkey.clone(), GraphState::Seen);
                None
            }
        };
        match replay {
            Some(id) => {
                dev.replay(id).map_err(dev_err)?;
                stats.replays += 1;
            }
            None => issue(dev.as_mut(), graph, p, mem, weights, &ptr, sample, stats, profile.as_mut())?,
        }
        let mut out = HashMap::new();
        for (name, l) in &p.low.outputs {
            let mut b = vec![0u8; l.numel * 4];
            dev.download(ptr(&l.buf)?, &mut b).map_err(dev_err)?;
            let v: Vec<f32> = match l.dtype {
                DType::I32 => b.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f32).collect(),
                _ => b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
            };
            out.insert(name.clone(), v);
        }
        stats.runs += 1;
        Ok(out)
    }
}

/// Whether a (program, slots) pair has a CUDA graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GraphState {
    /// Ran once: capture on the next run.
    Seen,
    Captured(usize),
    /// The device does not capture.
    Never,
}

/// Issue a program's steps in order.
#[allow(clippy::too_many_arguments)]
fn issue(
    dev: &mut dyn Device,
    graph: &Graph,
    p: &Program,
    mem: DevPtr,
    weights: &dyn WeightSource,
    ptr: &dyn Fn(&Buf) -> Result<DevPtr, ExecError>,
    sample: Option<SampleSettings>,
    stats: &mut ExecStats,
    mut profile: Option<&mut HashMap<String, KernelTime>>,
) -> Result<(), ExecError> {
    for st in &p.low.steps {
        match st {
            Step::Launch { kernel, grid, block, args, node } => {
                let mut ka = Vec::with_capacity(args.len());
                for a in args {
                    ka.push(match a {
                        Arg::Buf(b) => KArg::Ptr(ptr(b)?),
                        Arg::U32(v) => KArg::U32(*v),
                        Arg::F32(v) => KArg::F32(*v),
                        Arg::Q4Group(name) => KArg::U32(q4_of(weights, name)?.group as u32),
                        Arg::Sample(a) => {
                            let x = sample.ok_or_else(|| ExecError::Device("sampling settings missing".into()))?;
                            match a {
                                SampleArg::Temperature => KArg::F32(x.temperature),
                                SampleArg::TopP => KArg::F32(x.top_p),
                                SampleArg::TopK => KArg::U32(x.top_k),
                            }
                        }
                    });
                }
                let fail = |e: DeviceError| {
                    ExecError::Device(format!("node {} ({}): {e}", node.0, graph.node(*node).op.name()))
                };
                match profile.as_deref_mut() {
                    None => dev.launch(kernel, *grid, *block, &ka).map_err(fail)?,
                    Some(prof) => {
                        let ms = dev.launch_timed(kernel, *grid, *block, &ka).map_err(fail)?;
                        let e = prof
                            .entry(kernel.clone())
                            .or_insert_with(|| KernelTime { kernel: kernel.clone(), ..Default::default() });
                        let c = p.low.kernels.get(kernel).map(|k| k.cost()).unwrap_or_default();
                        e.launches += 1;
                        e.ms += ms;
                        e.flops += c.flops;
                        e.bytes += c.bytes;
                    }
                }
                stats.launches += 1;
            }
            Step::Zero { at, bytes } => dev.memset_zero(mem + at, *bytes as usize).map_err(dev_err)?,
            Step::Host { node } => {
                let out = mem + p.low.plan.values[node.index()].map_or(0, |s| s.offset);
                host_node(dev, graph, *node, &p.low.host_inputs[node], weights, out, ptr)?;
                stats.host_nodes += 1;
            }
        }
    }
    Ok(())
}

/// Run one node on the host: download its inputs, interpret, upload.
fn host_node(
    dev: &mut dyn Device,
    g: &Graph,
    node: qvc_ir::NodeId,
    args: &[HostArg],
    weights: &dyn WeightSource,
    out: DevPtr,
    ptr: &dyn Fn(&Buf) -> Result<DevPtr, ExecError>,
) -> Result<(), ExecError> {
    let n = g.node(node);
    let mut mini = Graph::new();
    let mut data: Vec<(String, Vec<f32>, Vec<i32>)> = vec![];
    let mut ids = vec![];
    for (i, (a, &inp)) in args.iter().zip(&n.inputs).enumerate() {
        let ty = g.ty(inp);
        let name = format!("in{i}");
        let (f, iv) = match a {
            HostArg::Device(l) => {
                let mut b = vec![0u8; l.numel * 4];
                dev.download(ptr(&l.buf)?, &mut b).map_err(dev_err)?;
                if l.dtype == DType::I32 {
                    (vec![], bytemuck::cast_slice::<u8, i32>(&b).to_vec())
                } else {
                    (bytemuck::cast_slice::<u8, f32>(&b).to_vec(), vec![])
                }
            }
            HostArg::Param(p) => {
                let e = weights.weight(p).ok_or_else(|| ExecError::BadWeight { name: p.clone(), got: 0, want: 1 })?;
                ((0..e.len()).map(|i| e.get(i)).collect(), vec![])
            }
            HostArg::Const(c) => (c.to_vec(), vec![]),
        };
        let dtype = if iv.is_empty() { DType::F32 } else { DType::I32 };
        ids.push(mini.input(&name, dtype, ty.shape.0.clone()));
        data.push((name, f, iv));
    }
    let y = mini.push(n.op.clone(), &ids)?;
    mini.set_output("y", y);
    let inputs: HashMap<String, InputRef> = data
        .iter()
        .map(|(n, f, i)| (n.clone(), if i.is_empty() { InputRef::F32(f) } else { InputRef::I32(i) }))
        .collect();
    let mut res = qvc_ir::run_reference(&mini, &NoWeights, &inputs)?;
    let v = res.remove("y").map(|v| v.into_f32()).unwrap_or_default();
    dev.upload(out, bytemuck::cast_slice(&v)).map_err(dev_err)
}

struct NoWeights;
impl WeightSource for NoWeights {
    fn weight(&self, _: &str) -> Option<Elems<'_>> {
        None
    }
}

/// A shared handle, so a model and its sessions can hold one backend.
pub type SharedGpu = Arc<GpuBackend>;
