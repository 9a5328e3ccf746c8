//! `qvc bench-serve`: a load generator for a running `qvc serve` (or any
//! OpenAI-compatible chat server).
//!
//! For each concurrency level it runs that many client threads, each sending
//! streamed `/v1/chat/completions` requests (a mix of picture and text
//! prompts) until the level's request count is used up, and reports the
//! aggregate generated tokens per second, time to first token (p50/p99),
//! inter-token latency (p50, the gaps between content chunks) and end-to-end
//! latency (p50). Tokens are counted from the server's usage chunk
//! (`stream_options.include_usage`).
//!
//! [`http`] is the blocking HTTP/1.1 client it uses (std only: no TLS, one
//! connection per request, chunked transfer encoding, server-sent events);
//! the integration tests use it too.

use crate::common::percentile;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A minimal blocking HTTP/1.1 client over `std::net::TcpStream`.
pub mod http {
    use std::io::{self, BufRead, BufReader, Read, Write};
    use std::net::{TcpStream, ToSocketAddrs};
    use std::time::Duration;

    /// `http://HOST:PORT[/PREFIX]`, split.
    #[derive(Clone, Debug, PartialEq)]
    pub struct Url {
        pub host: String,
        pub port: u16,
        /// Path prefix without a trailing slash ("" for none).
        pub prefix: String,
    }

    impl Url {
        pub fn parse(s: &str) -> Result<Url, String> {
            let rest = s
                .strip_prefix("http://")
                .ok_or_else(|| format!("{s:?}: only http:// URLs are supported (no TLS in this client)"))?;
            let (authority, path) = match rest.find('/') {
                Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
                None => (rest, ""),
            };
            let (host, port) = match authority.rsplit_once(':') {
                Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
                    (h, p.parse::<u16>().map_err(|_| format!("{s:?}: bad port {p:?}"))?)
                }
                _ => (authority, 80),
            };
            if host.is_empty() {
                return Err(format!("{s:?}: no host"));
            }
            Ok(Url { host: host.to_string(), port, prefix: path.to_string() })
        }
        /// `HOST:PORT`, for connecting.
        pub fn addr(&self) -> String {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// A complete response.
    #[derive(Debug)]
    pub struct Response {
        pub status: u16,
        pub headers: Vec<(String, String)>,
        pub body: Vec<u8>,
    }

    impl Response {
        /// The first header of that name (case-insensitive).
        pub fn header(&self, name: &str) -> Option<&str> {
            header(&self.headers, name)
        }
        pub fn text(&self) -> String {
            String::from_utf8_lossy(&self.body).into_owned()
        }
        pub fn json(&self) -> Result<serde_json::Value, String> {
            serde_json::from_slice(&self.body)
                .map_err(|e| format!("status {}: body is not JSON ({e}): {}", self.status, self.text()))
        }
    }

    fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
        headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    enum Framing {
        Length(u64),
        Chunked { left: u64, done: bool },
        UntilClose,
    }

    /// A response whose body is read as it arrives.
    pub struct Streaming {
        pub status: u16,
        pub headers: Vec<(String, String)>,
        reader: BufReader<TcpStream>,
        framing: Framing,
        /// Body bytes read but not yet consumed as a line.
        pending: Vec<u8>,
    }

    /// Connect to `addr` (HOST:PORT), send one request and read the status line and headers.
    /// `Connection: close` is always sent.
    pub fn open(
        addr: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout: Duration,
    ) -> io::Result<Streaming> {
        let sock = addr
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{addr}: no address")))?;
        let mut stream = TcpStream::connect_timeout(&sock, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        let mut has_type = false;
        for (k, v) in headers {
            has_type |= k.eq_ignore_ascii_case("content-type");
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if !body.is_empty() || method == "POST" {
            if !has_type {
                head.push_str("Content-Type: application/json\r\n");
            }
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes())?;
        // A server may answer (413, 401) before reading the whole body and close: keep the response.
        if let Err(e) = stream.write_all(body) {
            if !matches!(e.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset) {
                return Err(e);
            }
        }
        stream.flush()?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("bad status line {line:?}")))?;
        let mut headers = Vec::new();
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed in the headers"));
            }
            let l = line.trim_end_matches(['\r', '\n']);
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        let chunked = header(&headers, "transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        let framing = if chunked {
            Framing::Chunked { left: 0, done: false }
        } else if let Some(n) = header(&headers, "content-length").and_then(|v| v.parse::<u64>().ok()) {
            Framing::Length(n)
        } else if method == "HEAD" || status == 204 || status == 304 {
            Framing::Length(0)
        } else {
            Framing::UntilClose
        };
        Ok(Streaming { status, headers, reader, framing, pending: Vec::new() })
    }

    /// Send one request and read the whole response.
    pub fn send(
        addr: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout: Duration,
    ) -> io::Result<Response> {
        let mut s = open(addr, method, path, headers, body, timeout)?;
        let body = s.read_to_end()?;
        Ok(Response { status: s.status, headers: s.headers, body })
    }

    impl Streaming {
        pub fn header(&self, name: &str) -> Option<&str> {
            header(&self.headers, name)
        }

        /// The next piece of the body as it arrives (an HTTP chunk, or what one read returns); `None` at the end.
        pub fn read_piece(&mut self) -> io::Result<Option<Vec<u8>>> {
            if !self.pending.is_empty() {
                return Ok(Some(std::mem::take(&mut self.pending)));
            }
            match &mut self.framing {
                Framing::Length(0) => Ok(None),
                Framing::Length(n) => {
                    let mut buf = vec![0u8; (*n).min(64 * 1024) as usize];
                    let got = self.reader.read(&mut buf)?;
                    if got == 0 {
                        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "body shorter than Content-Length"));
                    }
                    *n -= got as u64;
                    buf.truncate(got);
                    Ok(Some(buf))
                }
                Framing::UntilClose => {
                    let mut buf = vec![0u8; 64 * 1024];
                    let got = self.reader.read(&mut buf)?;
                    if got == 0 {
                        return Ok(None);
                    }
                    buf.truncate(got);
                    Ok(Some(buf))
                }
                Framing::Chunked { left, done } => {
                    if *done {
                        return Ok(None);
                    }
                    if *left == 0 {
                        let mut line = String::new();
                        if self.reader.read_line(&mut line)? == 0 {
                            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "chunked body cut short"));
                        }
                        let size = line.trim_end_matches(['\r', '\n']).split(';').next().unwrap_or("").trim();
                        let size = u64::from_str_radix(size, 16).map_err(|_| {
                            io::Error::new(io::ErrorKind::InvalidData, format!("bad chunk size line {line:?}"))
                        })?;
                        if size == 0 {
                            // Trailers, then the empty line.
                            loop {
                                line.clear();
                                if self.reader.read_line(&mut line)? == 0
                                    || line.trim_end_matches(['\r', '\n']).is_empty()
                                {
                                    break;
                                }
                            }
                            *done = true;
                            return Ok(None);
                        }
                        *left = size;
                    }
                    let mut buf = vec![0u8; *left as usize];
                    self.reader.read_exact(&mut buf)?;
                    *left = 0;
                    let mut crlf = [0u8; 2];
                    self.reader.read_exact(&mut crlf)?;
                    if &crlf != b"\r\n" {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, "chunk not followed by CRLF"));
                    }
                    Ok(Some(buf))
                }
            }
        }

        /// The rest of the body.
        pub fn read_to_end(&mut self) -> io::Result<Vec<u8>> {
            let mut out = Vec::new();
            while let Some(p) = self.read_piece()? {
                out.extend_from_slice(&p);
            }
            Ok(out)
        }

        fn read_line_bytes(&mut self) -> io::Result<Option<Vec<u8>>> {
            let mut line = Vec::new();
            loop {
                if let Some(i) = self.pending.iter().position(|&b| b == b'\n') {
                    line.extend(self.pending.drain(..=i));
                    return Ok(Some(line));
                }
                line.append(&mut self.pending);
                match self.read_piece()? {
                    Some(p) => self.pending = p,
                    None => return Ok(if line.is_empty() { None } else { Some(line) }),
                }
            }
        }

        /// The data of the next server-sent event (its `data:` lines joined by `\n`), as raw bytes;
        /// `None` when the body ends. Comments and other fields are skipped.
        pub fn next_event(&mut self) -> io::Result<Option<Vec<u8>>> {
            let mut data: Option<Vec<u8>> = None;
            loop {
                let Some(mut line) = self.read_line_bytes()? else {
                    return Ok(data);
                };
                while matches!(line.last(), Some(b'\n' | b'\r')) {
                    line.pop();
                }
                if line.is_empty() {
                    if data.is_some() {
                        return Ok(data);
                    }
                    continue;
                }
                if let Some(rest) = line.strip_prefix(b"data:") {
                    let rest = rest.strip_prefix(b" ").unwrap_or(rest);
                    match &mut data {
                        Some(d) => {
                            d.push(b'\n');
                            d.extend_from_slice(rest);
                        }
                        None => data = Some(rest.to_vec()),
                    }
                }
            }
        }

        /// Close the connection now (a client that goes away).
        pub fn abandon(self) {
            let _ = self.reader.get_ref().shutdown(std::net::Shutdown::Both);
        }
    }

    /// Standard base64 (with padding), for data URLs.
    pub fn base64(bytes: &[u8]) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
        for c in bytes.chunks(3) {
            let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
            out.push(T[(n >> 18) as usize & 63] as char);
            out.push(T[(n >> 12) as usize & 63] as char);
            out.push(if c.len() > 1 { T[(n >> 6) as usize & 63] as char } else { '=' });
            out.push(if c.len() > 2 { T[n as usize & 63] as char } else { '=' });
        }
        out
    }

    /// `data:MIME;base64,...` for a picture file's bytes (MIME from the extension).
    pub fn data_url(path: &std::path::Path, bytes: &[u8]) -> String {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
        let mime = match ext.as_str() {
            "png" => "image/png",
            "jpg" | "jpeg" => "image/jpeg",
            "webp" => "image/webp",
            "gif" => "image/gif",
            "bmp" => "image/bmp",
            _ => "application/octet-stream",
        };
        format!("data:{mime};base64,{}", base64(bytes))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn base64_matches_rfc4648() {
            for (i, o) in [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foobar", "Zm9vYmFy")] {
                assert_eq!(base64(i.as_bytes()), o);
            }
        }

        #[test]
        fn urls() {
            assert_eq!(
                Url::parse("http://127.0.0.1:8000").unwrap(),
                Url { host: "127.0.0.1".into(), port: 8000, prefix: "".into() }
            );
            assert_eq!(
                Url::parse("http://localhost/api/").unwrap(),
                Url { host: "localhost".into(), port: 80, prefix: "/api".into() }
            );
            assert!(Url::parse("https://x").is_err());
            assert!(Url::parse("http://x:99999").is_err());
        }
    }
}

/// `qvc bench-serve` flags.
#[derive(clap::Args, Debug)]
pub struct BenchServeArgs {
    /// The server's base URL (http only).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub url: String,
    /// Concurrency levels: client threads, each sending one request after another.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16", value_name = "N,...")]
    pub concurrency: Vec<usize>,
    /// Requests per level [default: 4 x the level, at least 8].
    #[arg(long, value_name = "N")]
    pub requests: Option<usize>,
    /// max_tokens of every request.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub max_tokens: usize,
    /// Pictures for the picture prompts (repeat). Without any, small generated BMP pictures are sent.
    #[arg(long, value_name = "PATH")]
    pub image: Vec<PathBuf>,
    /// Every K-th request is a text-only prompt, the others carry a picture (1: text only, 0: pictures only).
    #[arg(long, default_value_t = 2, value_name = "K")]
    pub text_every: usize,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// The model name sent [default: the first of GET /v1/models].
    #[arg(long)]
    pub model: Option<String>,
    /// Bearer key (also QVC_API_KEY).
    #[arg(long, env = "QVC_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Requests sent (and not counted) before each level.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub warmup: usize,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

const QUESTIONS: &[&str] = &[
    "What is in this picture?",
    "Describe the picture in detail.",
    "Write a haiku about the sea.",
    "Which colours do you see?",
    "请用中文描述这张图片。",
    "Count the objects and say where each one is.",
    "Tell me a short story about a lighthouse keeper who finds a message in a bottle.",
    "Is there any text? Read it.",
];

/// One request's measurements.
#[derive(Clone, Debug, Default)]
struct Sample {
    ttft: f64,
    e2e: f64,
    tokens: usize,
    gaps: Vec<f64>,
}

/// One level's summary.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LevelReport {
    pub concurrency: usize,
    pub requests: usize,
    pub failed: usize,
    pub wall_s: f64,
    pub generated_tokens: usize,
    pub tokens_per_s: f64,
    pub requests_per_s: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    pub itl_p50_ms: f64,
    pub e2e_p50_ms: f64,
}

/// A generated 24-bit BMP picture (gradient and stripes, varied by `seed`).
fn synthetic_bmp(seed: usize, w: u32, h: u32) -> Vec<u8> {
    let row = (w * 3).div_ceil(4) * 4;
    let size = 54 + row * h;
    let mut b = Vec::with_capacity(size as usize);
    b.extend_from_slice(b"BM");
    b.extend_from_slice(&size.to_le_bytes());
    b.extend_from_slice(&[0; 4]);
    b.extend_from_slice(&54u32.to_le_bytes());
    b.extend_from_slice(&40u32.to_le_bytes());
    b.extend_from_slice(&(w as i32).to_le_bytes());
    b.extend_from_slice(&(h as i32).to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&24u16.to_le_bytes());
    b.extend_from_slice(&[0; 4]);
    b.extend_from_slice(&(row * h).to_le_bytes());
    b.extend_from_slice(&[0; 16]);
    let s = seed as u32;
    for y in 0..h {
        let start = b.len();
        for x in 0..w {
            let stripe = ((x + s * 7) / 16 + y / 16).is_multiple_of(2);
            let r = ((x * 255 / w.max(1)) ^ (s * 37)) as u8;
            let g = ((y * 255 / h.max(1)) + s * 11) as u8;
            let bl = if stripe { 220 } else { (s * 53) as u8 };
            b.extend_from_slice(&[bl, g, r]);
        }
        b.resize(start + row as usize, 0);
    }
    b
}

struct Bench {
    url: http::Url,
    model: String,
    auth: Option<String>,
    pictures: Vec<String>,
    max_tokens: usize,
    text_every: usize,
    temperature: f32,
    timeout: Duration,
}

impl Bench {
    fn body(&self, i: usize) -> serde_json::Value {
        let q = QUESTIONS[i % QUESTIONS.len()];
        let text_only = self.pictures.is_empty() || (self.text_every > 0 && i.is_multiple_of(self.text_every));
        let content = if text_only {
            serde_json::json!(q)
        } else {
            let url = &self.pictures[(i / self.text_every.max(1)) % self.pictures.len()];
            serde_json::json!([
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": q},
            ])
        };
        serde_json::json!({
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "stream": true,
            "stream_options": {"include_usage": true},
        })
    }

    fn one(&self, i: usize) -> Result<Sample> {
        let body = serde_json::to_vec(&self.body(i))?;
        let path = format!("{}/v1/chat/completions", self.url.prefix);
        let auth;
        let mut headers = vec![];
        if let Some(k) = &self.auth {
            auth = format!("Bearer {k}");
            headers.push(("Authorization", auth.as_str()));
        }
        let t0 = Instant::now();
        let mut s = http::open(&self.url.addr(), "POST", &path, &headers, &body, self.timeout)?;
        if s.status != 200 {
            let text = String::from_utf8_lossy(&s.read_to_end().unwrap_or_default()).into_owned();
            bail!("HTTP {}: {}", s.status, text.trim());
        }
        let mut sample = Sample::default();
        let mut last: Option<Instant> = None;
        let mut done = false;
        while let Some(ev) = s.next_event()? {
            if ev == b"[DONE]" {
                done = true;
                break;
            }
            let v: serde_json::Value = serde_json::from_slice(&ev).context("an event is not JSON")?;
            if let Some(err) = v.get("error") {
                bail!("error event: {err}");
            }
            let has_text = v["choices"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c["delta"]["content"].as_str().is_some_and(|t| !t.is_empty())));
            if has_text {
                let now = Instant::now();
                match last {
                    None => sample.ttft = (now - t0).as_secs_f64(),
                    Some(l) => sample.gaps.push((now - l).as_secs_f64()),
                }
                last = Some(now);
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                sample.tokens = n as usize;
            }
        }
        if !done {
            bail!("the stream ended without data: [DONE]");
        }
        sample.e2e = t0.elapsed().as_secs_f64();
        if last.is_none() {
            sample.ttft = sample.e2e;
        }
        Ok(sample)
    }

    fn level(&self, concurrency: usize, requests: usize, warmup: usize, offset: usize) -> Result<LevelReport> {
        for w in 0..warmup {
            self.one(offset + 1_000_000 + w).context("warm-up request")?;
        }
        let next = std::sync::atomic::AtomicUsize::new(0);
        let t0 = Instant::now();
        let results: Vec<Result<Sample>> = std::thread::scope(|sc| {
            let handles: Vec<_> = (0..concurrency)
                .map(|_| {
                    sc.spawn(|| {
                        let mut out = Vec::new();
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            if i >= requests {
                                break;
                            }
                            out.push(self.one(offset + i));
                        }
                        out
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect()
        });
        let wall = t0.elapsed().as_secs_f64();
        let mut ok = Vec::new();
        let mut failed = 0;
        for r in results {
            match r {
                Ok(s) => ok.push(s),
                Err(e) => {
                    failed += 1;
                    if failed <= 3 {
                        eprintln!("[bench-serve] request failed: {e:#}");
                    }
                }
            }
        }
        let tokens: usize = ok.iter().map(|s| s.tokens).sum();
        let mut ttft: Vec<f64> = ok.iter().map(|s| s.ttft).collect();
        let mut e2e: Vec<f64> = ok.iter().map(|s| s.e2e).collect();
        let mut gaps: Vec<f64> = ok.iter().flat_map(|s| s.gaps.iter().copied()).collect();
        Ok(LevelReport {
            concurrency,
            requests,
            failed,
            wall_s: wall,
            generated_tokens: tokens,
            tokens_per_s: tokens as f64 / wall,
            requests_per_s: ok.len() as f64 / wall,
            ttft_p50_ms: percentile(&mut ttft, 50.0) * 1e3,
            ttft_p99_ms: percentile(&mut ttft, 99.0) * 1e3,
            itl_p50_ms: percentile(&mut gaps, 50.0) * 1e3,
            e2e_p50_ms: percentile(&mut e2e, 50.0) * 1e3,
        })
    }
}

/// Run `qvc bench-serve`.
pub fn run(a: BenchServeArgs) -> Result<()> {
    let url = http::Url::parse(&a.url).map_err(anyhow::Error::msg)?;
    if a.concurrency.is_empty() || a.concurrency.contains(&0) {
        bail!("--concurrency needs levels of at least 1, like 1,4,16");
    }
    if a.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    let timeout = Duration::from_secs(a.timeout.max(1));
    let auth = a.api_key.clone();
    let auth_header = auth.as_ref().map(|k| format!("Bearer {k}"));
    let headers: Vec<(&str, &str)> = auth_header.iter().map(|h| ("Authorization", h.as_str())).collect();
    let model = match &a.model {
        Some(m) => m.clone(),
        None => {
            let r = http::send(&url.addr(), "GET", &format!("{}/v1/models", url.prefix), &headers, b"", timeout)
                .with_context(|| format!("cannot reach {}", a.url))?;
            if r.status != 200 {
                bail!("GET /v1/models: HTTP {}: {}", r.status, r.text().trim());
            }
            let v = r.json().map_err(anyhow::Error::msg)?;
            v["data"][0]["id"].as_str().context("GET /v1/models lists no model")?.to_string()
        }
    };
    let pictures = if a.image.is_empty() {
        (0..4).map(|s| http::data_url(std::path::Path::new("x.bmp"), &synthetic_bmp(s, 320, 240))).collect()
    } else {
        a.image
            .iter()
            .map(|p| {
                let b = std::fs::read(p).with_context(|| format!("cannot read --image {}", p.display()))?;
                Ok(http::data_url(p, &b))
            })
            .collect::<Result<Vec<_>>>()?
    };
    let bench = Bench {
        url,
        model: model.clone(),
        auth,
        pictures,
        max_tokens: a.max_tokens,
        text_every: a.text_every,
        temperature: a.temperature,
        timeout,
    };
    let mut reports = Vec::new();
    for (li, &c) in a.concurrency.iter().enumerate() {
        let n = a.requests.unwrap_or((4 * c).max(8));
        if !a.json {
            eprintln!("[bench-serve] concurrency {c}: {n} requests ...");
        }
        let r = bench.level(c, n, a.warmup, li * 10_000)?;
        if r.failed == r.requests {
            bail!("every request at concurrency {c} failed");
        }
        reports.push(r);
    }
    let base = reports.first().map(|r| r.tokens_per_s).unwrap_or(f64::NAN);
    if a.json {
        let v = serde_json::json!({
            "url": a.url,
            "model": model,
            "max_tokens": a.max_tokens,
            "levels": reports,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{:>11} {:>8} {:>6} {:>9} {:>10} {:>8} {:>10} {:>10} {:>9} {:>9}",
            "concurrency",
            "requests",
            "failed",
            "tokens",
            "tokens/s",
            "speedup",
            "TTFT p50",
            "TTFT p99",
            "ITL p50",
            "e2e p50"
        );
        for r in &reports {
            println!(
                "{:>11} {:>8} {:>6} {:>9} {:>10.1} {:>7.2}x {:>8.1}ms {:>8.1}ms {:>7.2}ms {:>7.0}ms",
                r.concurrency,
                r.requests,
                r.failed,
                r.generated_tokens,
                r.tokens_per_s,
                r.tokens_per_s / base,
                r.ttft_p50_ms,
                r.ttft_p99_ms,
                r.itl_p50_ms,
                r.e2e_p50_ms
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bmp_is_well_formed() {
        let b = synthetic_bmp(3, 33, 7);
        let row = (33 * 3usize).div_ceil(4) * 4;
        assert_eq!(b.len(), 54 + row * 7);
        assert_eq!(&b[..2], b"BM");
        assert_eq!(u32::from_le_bytes(b[2..6].try_into().unwrap()) as usize, b.len());
    }
}
