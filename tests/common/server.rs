//! A `qvc serve` child process for the server tests, its HTTP client calls,
//! chat conversations written both as OpenAI messages and as the ChatML the
//! reference `chat()` builds, and `qvc generate` as the reference answer.
#![allow(dead_code)]

use qvc::bench_serve::http;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

pub const TIMEOUT: Duration = Duration::from_secs(300);

pub fn qvc_bin() -> &'static str {
    env!("CARGO_BIN_EXE_qvc")
}

/// A scratch directory unique to this process and `tag`, created empty.
pub fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qvc-serve-test-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A running `qvc serve`; killed (and reaped) when dropped. When the test is
/// failing, the server's output is printed.
pub struct Server {
    child: Option<Child>,
    pub port: u16,
    pub addr: String,
    log: Arc<Mutex<String>>,
    pub api_key: Option<String>,
}

impl Server {
    /// `qvc serve MODEL --port 0 ARGS...`, waiting until `/health` answers 200.
    pub fn start(model: &Path, args: &[&str]) -> Server {
        Self::start_with_env(model, args, &[])
    }

    pub fn start_with_env(model: &Path, args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(qvc_bin());
        cmd.arg("serve").arg(model).args(["--host", "127.0.0.1", "--port", "0"]).args(args);
        if !args.contains(&"--served-model-name") {
            // The bodies below send "model": "qvc" (the default would be the directory's name).
            cmd.args(["--served-model-name", "qvc"]);
        }
        cmd.env_remove("QVC_API_KEY");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("cannot start qvc serve");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel::<u16>();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        for (name, pipe) in [("out", Box::new(out) as Box<dyn Read + Send>), ("err", Box::new(err))] {
            let log = log.clone();
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    if let Some(rest) = line.split("listening on http://").nth(1) {
                        if let Some(p) = rest
                            .trim()
                            .rsplit(':')
                            .next()
                            .and_then(|p| p.trim_end_matches(|c: char| !c.is_ascii_digit()).parse::<u16>().ok())
                        {
                            let _ = tx.send(p);
                        }
                    }
                    let mut l = log.lock().unwrap();
                    l.push_str(&format!("[{name}] {line}\n"));
                }
            });
        }
        drop(tx);
        let mut s = Server { child: Some(child), port: 0, addr: String::new(), log, api_key: None };
        let t0 = Instant::now();
        let port = loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(p) => break p,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let st = s.child.as_mut().unwrap().wait().ok();
                    panic!("qvc serve exited ({st:?}) before it listened:\n{}", s.log());
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Ok(Some(st)) = s.child.as_mut().unwrap().try_wait() {
                        std::thread::sleep(Duration::from_millis(200));
                        panic!("qvc serve exited ({st}) before it listened:\n{}", s.log());
                    }
                    if t0.elapsed() > TIMEOUT {
                        panic!("qvc serve printed no 'listening on http://HOST:PORT' line:\n{}", s.log());
                    }
                }
            }
        };
        assert_ne!(port, 0, "the server must print the port it bound, not 0");
        s.port = port;
        s.addr = format!("127.0.0.1:{port}");
        loop {
            if let Ok(r) = s.get("/health") {
                if r.status == 200 {
                    break;
                }
                assert_eq!(r.status, 503, "/health before the model is loaded: {}", r.text());
            }
            if let Ok(Some(st)) = s.child.as_mut().unwrap().try_wait() {
                panic!("qvc serve exited ({st}) before /health said ready:\n{}", s.log());
            }
            assert!(t0.elapsed() < TIMEOUT, "/health never became 200:\n{}", s.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("qvc serve {} ready on {} in {:.2} s", args.join(" "), s.addr, t0.elapsed().as_secs_f64());
        s
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Send SIGTERM.
    pub fn sigterm(&self) {
        let st = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status().unwrap();
        assert!(st.success(), "kill -TERM failed");
    }

    /// Wait for the process to exit, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return st;
            }
            assert!(t0.elapsed() < limit, "qvc serve still running {limit:?} after SIGTERM:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn auth(&self) -> Option<String> {
        self.api_key.as_ref().map(|k| format!("Bearer {k}"))
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<http::Response> {
        let auth = self.auth();
        let mut h: Vec<(&str, &str)> = headers.to_vec();
        if let Some(a) = &auth {
            if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("authorization")) {
                h.push(("Authorization", a));
            }
        }
        http::send(&self.addr, method, path, &h, body, TIMEOUT)
    }

    pub fn get(&self, path: &str) -> std::io::Result<http::Response> {
        self.request("GET", path, &[], b"")
    }

    /// POST /v1/chat/completions with a JSON body; any status.
    pub fn post(&self, body: &Value) -> http::Response {
        self.post_raw(&serde_json::to_vec(body).unwrap())
    }

    pub fn post_raw(&self, body: &[u8]) -> http::Response {
        self.request("POST", "/v1/chat/completions", &[], body)
            .unwrap_or_else(|e| panic!("POST failed: {e}\n{}", self.log()))
    }

    /// A non-streamed completion that must succeed: the response JSON.
    pub fn chat(&self, body: &Value) -> Value {
        let r = self.post(body);
        assert_eq!(r.status, 200, "request {} failed: {}", short(body), r.text());
        r.json().unwrap()
    }

    /// Open a streamed request (any status).
    pub fn open_stream(&self, body: &Value) -> http::Streaming {
        let auth = self.auth();
        let mut h = vec![];
        if let Some(a) = &auth {
            h.push(("Authorization", a.as_str()));
        }
        http::open(&self.addr, "POST", "/v1/chat/completions", &h, &serde_json::to_vec(body).unwrap(), TIMEOUT)
            .unwrap_or_else(|e| panic!("POST (stream) failed: {e}\n{}", self.log()))
    }

    /// A streamed completion read to its end, with every protocol check.
    pub fn stream(&self, body: &Value) -> Streamed {
        let mut s = self.open_stream(body);
        if s.status != 200 {
            let text = String::from_utf8_lossy(&s.read_to_end().unwrap()).into_owned();
            panic!("stream {} failed: HTTP {}: {text}", short(body), s.status);
        }
        let ct = s.header("content-type").unwrap_or("").to_string();
        assert!(ct.starts_with("text/event-stream"), "content-type {ct:?}");
        read_stream(&mut s)
    }

    /// The server's /metrics as `name{labels}` → value.
    pub fn metrics(&self) -> HashMap<String, f64> {
        let r = self.get("/metrics").unwrap();
        assert_eq!(r.status, 200, "/metrics: {}", r.text());
        parse_metrics(&r.text())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            let log = self.log();
            let tail: String = log.chars().rev().take(6000).collect::<Vec<_>>().into_iter().rev().collect();
            eprintln!("---- qvc serve output (last 6000 chars) ----\n{tail}\n----");
        }
    }
}

/// A request body for a message: at most 300 characters of it.
pub fn short(v: &Value) -> String {
    let s = v.to_string();
    s.chars().take(300).collect()
}

pub fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.trim().to_string(), v.trim().parse::<f64>().ok()?))
        })
        .collect()
}

/// A streamed answer, taken apart.
#[derive(Debug, Default)]
pub struct Streamed {
    pub chunks: Vec<Value>,
    pub content: String,
    pub finish_reason: Option<String>,
    pub usage: Option<Value>,
    pub first_has_role: bool,
    pub done_last: bool,
}

/// Read a 200 SSE stream to the end, checking each event as it goes.
pub fn read_stream(s: &mut http::Streaming) -> Streamed {
    let mut out = Streamed::default();
    let mut id: Option<String> = None;
    while let Some(ev) = s.next_event().expect("reading the stream") {
        assert!(!out.done_last, "an event after data: [DONE]: {}", String::from_utf8_lossy(&ev));
        let text = String::from_utf8(ev).expect("an SSE event is not valid UTF-8 (a split character)");
        if text == "[DONE]" {
            out.done_last = true;
            continue;
        }
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("event {text:?} is not JSON: {e}"));
        assert!(v.get("error").is_none(), "error event: {text}");
        assert_eq!(v["object"], "chat.completion.chunk", "{text}");
        let this_id = v["id"].as_str().expect("chunk id").to_string();
        assert!(this_id.starts_with("chatcmpl-"), "{text}");
        match &id {
            None => id = Some(this_id),
            Some(i) => assert_eq!(i, &this_id, "chunks of one stream carry one id"),
        }
        let choices = v["choices"].as_array().expect("choices array");
        if out.chunks.is_empty() {
            out.first_has_role = choices.first().is_some_and(|c| c["delta"]["role"] == "assistant");
        }
        for c in choices {
            assert_eq!(c["index"], 0);
            if let Some(t) = c["delta"]["content"].as_str() {
                assert!(out.finish_reason.is_none(), "content after the finish_reason chunk: {text}");
                out.content.push_str(t);
            }
            if let Some(f) = c["finish_reason"].as_str() {
                assert!(out.finish_reason.is_none(), "two finish_reason chunks");
                out.finish_reason = Some(f.to_string());
            }
        }
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            assert!(choices.is_empty(), "the usage chunk has empty choices: {text}");
            assert!(out.usage.is_none(), "two usage chunks");
            out.usage = Some(u.clone());
        }
        out.chunks.push(v);
    }
    out
}

/// One part of a user message.
#[derive(Clone, Debug)]
pub enum Part {
    Text(String),
    /// A picture file of the fixture directory.
    Image(String),
}

/// A conversation: earlier (user, assistant) turns, then the question.
#[derive(Clone, Debug)]
pub struct Conv {
    pub system: Option<String>,
    pub history: Vec<(Vec<Part>, String)>,
    pub query: Vec<Part>,
}

pub const DEFAULT_SYSTEM: &str = "You are a helpful assistant.";

pub fn text(s: &str) -> Part {
    Part::Text(s.to_string())
}
pub fn image(s: &str) -> Part {
    Part::Image(s.to_string())
}

impl Conv {
    pub fn ask(query: Vec<Part>) -> Conv {
        Conv { system: None, history: vec![], query }
    }

    /// The fixture's `chat.NAME` conversation (query/history with `Picture k:<img>PATH</img>\n` written out).
    pub fn from_fixture(expected: &Value, name: &str) -> Conv {
        let c = &expected["chat"][name];
        let parse = |s: &str| -> Vec<Part> {
            let mut parts = vec![];
            let mut rest = s;
            while rest.starts_with("Picture ") && rest.contains(":<img>") {
                let i = rest.find(":<img>").unwrap();
                let j = rest.find("</img>").unwrap();
                parts.push(Part::Image(rest[i + 6..j].to_string()));
                rest = &rest[j + 6..];
                rest = rest.strip_prefix('\n').unwrap_or(rest);
            }
            if !rest.is_empty() {
                parts.push(Part::Text(rest.to_string()));
            }
            parts
        };
        let history = c["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| (parse(t[0].as_str().unwrap()), t[1].as_str().unwrap().to_string()))
            .collect();
        let system = c["system"].as_str().filter(|s| *s != DEFAULT_SYSTEM).map(str::to_string);
        let conv = Conv { system, history, query: parse(c["query"].as_str().unwrap()) };
        // The fixture's own text, so a parse mistake shows here and not as a wrong answer.
        assert_eq!(conv.raw(Path::new("")), c["raw_text"].as_str().unwrap(), "conversation {name}");
        conv
    }

    fn user_text(parts: &[Part], dir: &Path) -> String {
        let mut s = String::new();
        let mut k = 0;
        for p in parts {
            match p {
                Part::Text(t) => s.push_str(t),
                Part::Image(f) => {
                    k += 1;
                    s.push_str(&format!("Picture {k}:<img>{}</img>\n", dir.join(f).display()));
                }
            }
        }
        s
    }

    /// The ChatML prompt of this conversation (the reference make_context), pictures under `dir`.
    pub fn raw(&self, dir: &Path) -> String {
        let mut s = format!("<|im_start|>system\n{}<|im_end|>", self.system.as_deref().unwrap_or(DEFAULT_SYSTEM));
        for (q, a) in &self.history {
            s.push_str(&format!(
                "\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>",
                Self::user_text(q, dir)
            ));
        }
        s.push_str(&format!(
            "\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
            Self::user_text(&self.query, dir)
        ));
        s
    }

    fn content(parts: &[Part], url: &dyn Fn(&str) -> String) -> Value {
        if let [Part::Text(t)] = parts {
            return json!(t);
        }
        Value::Array(
            parts
                .iter()
                .map(|p| match p {
                    Part::Text(t) => json!({"type": "text", "text": t}),
                    Part::Image(f) => json!({"type": "image_url", "image_url": {"url": url(f)}}),
                })
                .collect(),
        )
    }

    /// OpenAI messages; `url` turns a picture file name into its image URL.
    pub fn messages(&self, url: &dyn Fn(&str) -> String) -> Value {
        let mut m = vec![];
        if let Some(s) = &self.system {
            m.push(json!({"role": "system", "content": s}));
        }
        for (q, a) in &self.history {
            m.push(json!({"role": "user", "content": Self::content(q, url)}));
            m.push(json!({"role": "assistant", "content": a}));
        }
        m.push(json!({"role": "user", "content": Self::content(&self.query, url)}));
        Value::Array(m)
    }

    /// A greedy request body with pictures as data URLs.
    pub fn greedy(&self, dir: &Path, max_tokens: usize) -> Value {
        json!({
            "model": "qvc",
            "messages": self.messages(&|f| data_url(dir, f)),
            "max_tokens": max_tokens,
            "temperature": 0,
        })
    }
}

/// A fixture picture as a data URL.
pub fn data_url(dir: &Path, file: &str) -> String {
    let p = dir.join(file);
    http::data_url(&p, &std::fs::read(&p).unwrap())
}

/// `qvc generate --temperature 0 --json` on this conversation (as a raw prompt file).
pub fn generate(dir: &Path, conv: &Conv, max_tokens: usize, device: &str) -> Value {
    let tmp = scratch(&format!("gen-{:x}", {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        format!("{conv:?}{max_tokens}{device}").hash(&mut h);
        h.finish()
    }));
    let f = tmp.join("prompt.txt");
    std::fs::write(&f, conv.raw(dir)).unwrap();
    let out = Command::new(qvc_bin())
        .args(["generate", "--temperature", "0", "--json", "--device", device, "--max-new-tokens"])
        .arg(max_tokens.to_string())
        .arg("--raw-prompt-file")
        .arg(&f)
        .arg(dir)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&tmp);
    assert!(out.status.success(), "qvc generate failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The answer's content, finish reason and usage of a non-streamed response, checked for the OpenAI shape.
pub fn answer(v: &Value) -> (String, String, Value) {
    let c = &v["choices"][0];
    (
        c["message"]["content"].as_str().unwrap_or_else(|| panic!("no content in {v}")).to_string(),
        c["finish_reason"].as_str().unwrap_or_else(|| panic!("no finish_reason in {v}")).to_string(),
        v["usage"].clone(),
    )
}

/// A one-connection-at-a-time HTTP server for image URLs: `/NAME` serves the
/// fixture file NAME, `/redirect/NAME` redirects to `/NAME`, anything else is 404.
pub struct MediaServer {
    pub port: u16,
    pub hits: Arc<Mutex<Vec<String>>>,
}

impl MediaServer {
    pub fn start(dir: PathBuf) -> MediaServer {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let hits = Arc::new(Mutex::new(Vec::new()));
        let h = hits.clone();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut conn) = conn else { continue };
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                if r.read_line(&mut line).is_err() {
                    continue;
                }
                let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                loop {
                    let mut l = String::new();
                    if r.read_line(&mut l).unwrap_or(0) == 0 || l.trim().is_empty() {
                        break;
                    }
                }
                h.lock().unwrap().push(path.clone());
                use std::io::Write;
                let name = path.trim_start_matches('/');
                let resp: Vec<u8> = if let Some(to) = name.strip_prefix("redirect/") {
                    format!("HTTP/1.1 302 Found\r\nLocation: /{to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .into_bytes()
                } else if let Ok(b) = std::fs::read(dir.join(name)).map_err(|_| ()).and_then(|b| {
                    if name.contains('/') || name.is_empty() {
                        Err(())
                    } else {
                        Ok(b)
                    }
                }) {
                    let mut v = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        b.len()
                    )
                    .into_bytes();
                    v.extend_from_slice(&b);
                    v
                } else {
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot found".to_vec()
                };
                let _ = conn.write_all(&resp);
            }
        });
        MediaServer { port, hits }
    }
    pub fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/{name}", self.port)
    }
}
