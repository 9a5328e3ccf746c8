//! `qvc serve MODEL`: the OpenAI-compatible HTTP server (flags → an
//! [`Engine`] and [`qvc_serve::http::serve`]).
//!
//! Order of events: the flags are checked, the port is bound and
//! `qvc serve: listening on http://HOST:PORT` is printed (stdout and stderr,
//! the real port when `--port 0`), then the model loads on the scheduler
//! thread while `/health` answers 503, then `qvc serve: ready ...` is printed.
//! A model that fails to load ends the process with an error (exit 1);
//! SIGTERM or Ctrl-C drains and exits 0.

use crate::device::{DeviceChoice, GPU_CHECKPOINT_MAX_SEQ};
use anyhow::{bail, Context, Result};
use clap::Args;
use qvc_serve::http::media::MediaConfig;
use qvc_serve::http::{HttpConfig, ServerEvent};
use qvc_serve::{Engine, EngineConfig};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The long help's examples.
pub const SERVE_EXAMPLES: &str = "\
Examples:
  qvc serve ./Qwen-VL-Chat                       # http://127.0.0.1:8000, model name \"Qwen-VL-Chat\"
  qvc serve chat.qvc --device cuda --host 0.0.0.0 --port 8080 --max-batch 16 --api-key s3cret

  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{\"model\": \"Qwen-VL-Chat\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello!\"}]}'

  # A picture as a data URL (bash's printf builds the request in a file, whatever the picture's size):
  printf '{\"model\": \"Qwen-VL-Chat\", \"temperature\": 0, \"max_tokens\": 64, \"messages\": [{\"role\": \"user\",
    \"content\": [{\"type\": \"image_url\", \"image_url\": {\"url\": \"data:image/jpeg;base64,%s\"}},
    {\"type\": \"text\", \"text\": \"Where is the dog?\"}]}]}' \"$(base64 -w0 dog.jpg)\" > request.json
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' --data-binary @request.json

  Python: openai.OpenAI(base_url=\"http://127.0.0.1:8000/v1\", api_key=\"s3cret\").chat.completions.create(...)

Endpoints:
  POST /v1/chat/completions   OpenAI Chat Completions: text and image_url parts, stream, stop, seed, logprobs,
                              temperature/top_p (+ top_k, repetition_penalty); answers with <ref>/<box> also carry
                              `boxes` in pixels of the last picture
  GET  /v1/models             the served model
  GET  /health                200 when ready; 503 while loading, after a failed load, or while shutting down
  GET  /metrics               Prometheus text (requests, tokens, latencies, KV slots)
With --api-key, the /v1/ endpoints need `Authorization: Bearer KEY`; /health and /metrics stay open.

Pictures: data: URLs (base64 PNG, JPEG, WebP, GIF, BMP); http(s) URLs (public addresses only unless
--allow-private-urls, at most 3 redirects, --image-fetch-timeout); local paths and file:// URLs only under
--allowed-local-media-path. Errors use OpenAI's {\"error\": {message, type, param, code}}; a full queue is a
503 with Retry-After. SIGTERM / Ctrl-C: stop accepting, finish running requests (--shutdown-timeout), exit 0.";

/// `qvc serve` flags.
#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub(crate) model: crate::common::ModelArgs,
    /// Address to listen on (0.0.0.0 for every interface).
    #[arg(long, default_value = "127.0.0.1", value_name = "ADDR")]
    pub host: String,
    /// Port to listen on; 0 picks a free one (printed on the `listening on` line).
    #[arg(long, default_value_t = 8000, value_name = "PORT")]
    pub port: u16,
    /// Requests that run at once (KV-cache slots); more wait in the queue. On the CPU one decode
    /// step holds up to 8 of them (16 where AMX tiles run the model's bf16 Linears, in exact math
    /// too; the `ready` line says which), the rest take further steps.
    #[arg(long, default_value_t = 8, value_name = "N", value_parser = at_least_one)]
    pub max_batch: usize,
    /// Requests that may wait for a slot; beyond that a request gets 503 with Retry-After.
    #[arg(long, default_value_t = 64, value_name = "N", value_parser = at_least_one)]
    pub max_queue: usize,
    /// Require `Authorization: Bearer KEY` on the /v1/ endpoints (/health and /metrics stay open).
    #[arg(long, env = "QVC_API_KEY", hide_env_values = true, value_name = "KEY")]
    pub api_key: Option<String>,
    /// The model name clients send in `model` and /v1/models lists [default: the model directory's name].
    #[arg(long, value_name = "NAME")]
    pub served_model_name: Option<String>,
    /// Allow pictures given as local paths or file:// URLs, but only inside DIR (symlinks and `..` out of it are
    /// refused).
    #[arg(long, value_name = "DIR")]
    pub allowed_local_media_path: Option<PathBuf>,
    /// Allow http(s) picture URLs that point to loopback, private, link-local and other non-public addresses
    /// (refused by default: a client could otherwise make the server fetch from its own network).
    #[arg(long)]
    pub allow_private_urls: bool,
    /// Largest request body (e.g. 64MiB, 1GB, 100000); larger requests get 413.
    #[arg(long, default_value = "64MiB", value_name = "BYTES", value_parser = parse_bytes)]
    pub max_body_bytes: usize,
    /// Largest picture (encoded bytes: data URL payload, download or file).
    #[arg(long, default_value = "20MiB", value_name = "BYTES", value_parser = parse_bytes)]
    pub max_image_bytes: usize,
    /// Most pixels (width x height) of a picture, checked from its header before decoding.
    #[arg(long, default_value_t = 50_000_000, value_name = "N")]
    pub max_image_pixels: u64,
    /// Seconds one picture download may take.
    #[arg(long, default_value = "30", value_name = "SECONDS", value_parser = parse_secs)]
    pub image_fetch_timeout: Duration,
    /// Prompt positions per prefill chunk: a long prompt is read in chunks between decode steps of the running
    /// requests. Keep the default for answers identical to `qvc generate`.
    #[arg(long, default_value_t = qvc_model::PREFILL_CHUNK, value_name = "N", value_parser = at_least_one)]
    pub prefill_chunk: usize,
    /// Pictures whose vision features are kept (LRU); a picture sent again is not encoded again.
    #[arg(long, default_value_t = 64, value_name = "N", value_parser = at_least_one)]
    pub vision_cache: usize,
    /// Most prompt + answer tokens of one request [default: what the model and device allow].
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    pub max_context: Option<usize>,
    /// After SIGTERM or Ctrl-C, seconds running requests get to finish before the server exits.
    #[arg(long, default_value = "30", value_name = "SECONDS", value_parser = parse_secs)]
    pub shutdown_timeout: Duration,
}

fn at_least_one(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        Ok(_) => Err("must be at least 1".into()),
        Err(_) => Err(format!("{s:?} is not a whole number")),
    }
}

/// `64MiB`, `20MB`, `1G`, `512k`, `100000` → bytes (K/M/G are powers of 1024 with or without `i`, and
/// KB/MB/GB powers of 1000).
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a size (e.g. 64MiB, 20MB, 100000)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        u => return Err(format!("unknown size unit {u:?} in {s:?}: use B, KiB, MiB, GiB, KB, MB or GB")),
    };
    let bytes = n * mult;
    if !(1.0..=(usize::MAX as f64)).contains(&bytes) {
        return Err(format!("{s:?} must be at least 1 byte"));
    }
    Ok(bytes as usize)
}

/// Seconds, fractions allowed (`30`, `0.5`, `10s`).
pub fn parse_secs(s: &str) -> Result<Duration, String> {
    let t = s.trim().trim_end_matches('s');
    match t.parse::<f64>() {
        Ok(x) if (0.0..1e9).contains(&x) => Ok(Duration::from_secs_f64(x)),
        _ => Err(format!("{s:?} is not a number of seconds")),
    }
}

/// The default served name: the model directory's (or file's) name.
fn default_name(path: &Path) -> String {
    let p = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    p.file_name().and_then(|n| n.to_str()).filter(|n| !n.is_empty()).unwrap_or("qvc").to_string()
}

/// Prints on stdout and stderr (tests and people read either), flushed at once.
fn announce(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
    eprintln!("{line}");
}

pub fn run(a: ServeArgs) -> Result<()> {
    let path = a.model.path()?.to_path_buf();
    if !path.exists() {
        bail!("model {}: no such file or directory", path.display());
    }
    let name = a.served_model_name.clone().unwrap_or_else(|| default_name(&path));
    if name.is_empty() {
        bail!("--served-model-name must not be empty");
    }
    if a.api_key.as_deref().is_some_and(|k| k.trim().is_empty()) {
        bail!("--api-key (or QVC_API_KEY) is empty; give a key or leave it unset");
    }
    let mut media = MediaConfig {
        allow_private_urls: a.allow_private_urls,
        allowed_local_path: None,
        max_image_bytes: a.max_image_bytes,
        max_image_pixels: a.max_image_pixels,
        fetch_timeout: a.image_fetch_timeout,
        max_redirects: 3,
    };
    if let Some(dir) = &a.allowed_local_media_path {
        media = media.with_local_dir(dir)?;
    }
    let http = HttpConfig {
        served_model_name: name.clone(),
        api_key: a.api_key.clone(),
        max_body_bytes: a.max_body_bytes,
        shutdown_timeout: a.shutdown_timeout,
        media,
    };

    let listener = std::net::TcpListener::bind((a.host.as_str(), a.port))
        .with_context(|| format!("cannot listen on {}:{}", a.host, a.port))?;
    let addr = listener.local_addr().context("cannot read the bound address")?;
    announce(&format!("qvc serve: listening on http://{addr}"));

    // A checkpoint on a GPU backend has GPU_CHECKPOINT_MAX_SEQ rows of device KV cache (an artifact's own
    // --max-seq is applied by the engine).
    let on_gpu = matches!(DeviceChoice::parse(&a.model.device)?, DeviceChoice::Cuda(_) | DeviceChoice::Emu);
    let max_context = match a.max_context {
        Some(n) => Some(n),
        None if on_gpu && !qvc_runtime::artifact::is_artifact(&path) => Some(GPU_CHECKPOINT_MAX_SEQ),
        None => None,
    };
    let engine_cfg = EngineConfig {
        max_batch: a.max_batch,
        max_queue: a.max_queue,
        prefill_chunk: a.prefill_chunk,
        vision_cache: a.vision_cache,
        max_context,
    };
    // A server decodes its requests together: exact decode may then take the paths whose cost per row
    // falls with the batch (AMX tiles), at the same bits for a row whatever its batch.
    qvc_kernels::gemm::set_batched_decode(a.max_batch > 1);
    let model_args = a.model.clone();
    let engine = Engine::start(
        engine_cfg,
        Box::new(move |slots| {
            let model = crate::common::load(&model_args)?;
            let backend = crate::device::make_backend(&model, &model_args.device, slots)?;
            Ok((Arc::new(model), backend))
        }),
    );

    let (max_batch, max_queue) = (a.max_batch, a.max_queue);
    let eng = engine.clone();
    let served = name.clone();
    let on_event = move |ev: ServerEvent| match ev {
        ServerEvent::Ready => announce(&format!(
            "qvc serve: ready: model \"{served}\" on http://{addr}/v1 (max batch {max_batch}, decode group {}, \
             queue {max_queue}, context {} tokens)",
            eng.decode_group().map_or("?".into(), |g| g.to_string()),
            eng.context_len().map_or("?".into(), |c| c.to_string())
        )),
        ServerEvent::Draining { signal, timeout } => eprintln!(
            "qvc serve: {signal}: no new requests; waiting up to {:.0} s for running requests",
            timeout.as_secs_f64()
        ),
        ServerEvent::Stopped { drained: true } => eprintln!("qvc serve: stopped"),
        ServerEvent::Stopped { drained: false } => {
            eprintln!("qvc serve: stopped (requests still running were cut off)")
        }
    };
    qvc_serve::http::serve(listener, engine, http, on_event).map_err(anyhow::Error::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_bytes("64MiB"), Ok(64 << 20));
        assert_eq!(parse_bytes("20mb"), Ok(20_000_000));
        assert_eq!(parse_bytes("1G"), Ok(1 << 30));
        assert_eq!(parse_bytes("512k"), Ok(512 << 10));
        assert_eq!(parse_bytes(" 100000 "), Ok(100_000));
        assert_eq!(parse_bytes("1.5KiB"), Ok(1536));
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("ten").is_err());
        assert!(parse_bytes("5 parsecs").unwrap_err().contains("unknown size unit"));
        assert_eq!(parse_secs("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_secs("0.5s"), Ok(Duration::from_millis(500)));
        assert!(parse_secs("-1").is_err());
        assert_eq!(at_least_one("3"), Ok(3));
        assert!(at_least_one("0").is_err());
    }

    #[test]
    fn default_name_is_the_directory_name() {
        assert_eq!(default_name(Path::new("/models/Qwen-VL-Chat/")), "Qwen-VL-Chat");
        assert_eq!(default_name(Path::new("/models/chat.qvc")), "chat.qvc");
    }
}
