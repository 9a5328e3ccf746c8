//! `qvc serve` end to end: the binary started on 127.0.0.1 with an ephemeral
//! port on the tiny fixture, spoken to over plain HTTP/1.1 (the protocol is
//! the OpenAI Chat Completions API). Every endpoint, every error of issue 10,
//! streaming, greedy answers against `qvc generate`, concurrency (CPU and the
//! emulated GPU), cancellation, a full queue, the API key, image URLs and
//! local paths, and SIGTERM.

mod common;
#[path = "common/server.rs"]
mod server;

use qvc::bench_serve::http;
use serde_json::{json, Value};
use server::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn fixture() -> Option<PathBuf> {
    common::fixtures()
}

fn expected(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap()
}

/// A prompt the fixture's greedy decoding keeps answering for 20000+ tokens (no stop token; ~100 s).
const LONG: &str = "Tell me a long story.";

fn long_request(max_tokens: usize) -> Value {
    json!({
        "model": "qvc",
        "messages": [{"role": "user", "content": LONG}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": true,
    })
}

/// The error envelope of a non-2xx response: `{"error": {"message", "type", "param", "code"}}`.
fn envelope(r: &http::Response, status: u16, what: &str) -> Value {
    assert_eq!(r.status, status, "{what}: want HTTP {status}, got {}: {}", r.status, r.text());
    let v = r.json().unwrap_or_else(|e| panic!("{what}: {e}"));
    let e = &v["error"];
    assert!(e.is_object(), "{what}: no error object in {v}");
    for k in ["message", "type", "param", "code"] {
        assert!(e.get(k).is_some(), "{what}: the error envelope lacks {k:?}: {v}");
    }
    let m = e["message"].as_str().unwrap_or("");
    assert!(!m.is_empty(), "{what}: empty error message: {v}");
    eprintln!("{what}: {status} {m}");
    e.clone()
}

fn has_metric(m: &std::collections::HashMap<String, f64>, name: &str) -> bool {
    m.keys().any(|k| k == name || k.starts_with(&format!("{name}{{")))
}

#[test]
fn endpoints_and_response_shape() {
    let Some(dir) = fixture() else { return };
    // Server::start names the model "qvc"; tests/serve_openai.rs checks another name.
    let s = Server::start(&dir, &["--max-batch", "4"]);

    let h = s.get("/health").unwrap();
    assert_eq!(h.status, 200, "{}", h.text());

    let m = s.get("/v1/models").unwrap();
    assert_eq!(m.status, 200, "{}", m.text());
    let mv = m.json().unwrap();
    assert_eq!(mv["object"], "list", "{mv}");
    assert_eq!(mv["data"][0]["id"], "qvc", "{mv}");
    assert_eq!(mv["data"][0]["object"], "model", "{mv}");

    // A picture and a question, non-streamed.
    let conv = Conv::ask(vec![image("shapes.png"), text("What is in this picture?")]);
    let v = s.chat(&conv.greedy(&dir, 6));
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"), "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000, "{v}");
    assert_eq!(v["model"], "qvc");
    let c = &v["choices"][0];
    assert_eq!(v["choices"].as_array().unwrap().len(), 1);
    assert_eq!(c["index"], 0);
    assert_eq!(c["message"]["role"], "assistant");
    assert!(c["message"]["content"].is_string());
    assert_eq!(c["finish_reason"], "length", "6 tokens of a long answer: {v}");
    assert!(c.get("logprobs").is_some(), "choices[].logprobs (null) is part of the shape: {v}");
    let u = &v["usage"];
    assert_eq!(u["prompt_tokens"], 288, "img1's prompt has 288 tokens: {v}");
    assert_eq!(u["completion_tokens"], 6);
    assert_eq!(u["total_tokens"], 294);
    assert!(u["prompt_tokens_details"]["cached_tokens"].is_u64(), "{v}");

    // max_completion_tokens is max_tokens' newer name.
    let mut b2 = conv.greedy(&dir, 0);
    b2.as_object_mut().unwrap().remove("max_tokens");
    b2["max_completion_tokens"] = json!(3);
    assert_eq!(s.chat(&b2)["usage"]["completion_tokens"], 3);

    // Unknown fields are ignored.
    let mut b3 = conv.greedy(&dir, 2);
    b3["user"] = json!("someone");
    b3["frobnicate"] = json!({"x": [1, 2]});
    assert_eq!(s.chat(&b3)["usage"]["completion_tokens"], 2);

    // logprobs with top_logprobs.
    let mut b4 = Conv::ask(vec![text("Write a haiku about the sea.")]).greedy(&dir, 4);
    b4["logprobs"] = json!(true);
    b4["top_logprobs"] = json!(3);
    let v4 = s.chat(&b4);
    let lp = v4["choices"][0]["logprobs"]["content"].as_array().unwrap_or_else(|| panic!("no logprobs.content: {v4}"));
    assert_eq!(lp.len(), 4, "{v4}");
    let mut joined = String::new();
    for t in lp {
        let l = t["logprob"].as_f64().unwrap();
        assert!(l <= 0.0, "{t}");
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3, "{t}");
        // Greedy: the chosen token is the likeliest.
        assert!((top[0]["logprob"].as_f64().unwrap() - l).abs() < 1e-4, "{t}");
        assert!(t["bytes"].is_array(), "{t}");
        joined.push_str(t["token"].as_str().unwrap());
    }
    let content4 = v4["choices"][0]["message"]["content"].as_str().unwrap();
    if !content4.contains('\u{fffd}') {
        assert_eq!(joined, content4, "the logprob tokens spell the answer");
    }

    // A stop string cuts the answer before it, finish_reason "stop".
    let full = s.chat(&Conv::ask(vec![text("Write a haiku about the sea.")]).greedy(&dir, 12));
    let full_text = answer(&full).0;
    let cut: String = full_text.chars().skip(6).take(3).collect();
    let mut b5 = Conv::ask(vec![text("Write a haiku about the sea.")]).greedy(&dir, 12);
    b5["stop"] = json!([cut.clone(), "never-appears"]);
    let v5 = s.chat(&b5);
    let (t5, f5, _) = answer(&v5);
    assert_eq!(f5, "stop", "stop {cut:?} in {full_text:?}: {v5}");
    assert_eq!(t5, full_text[..full_text.find(&cut).unwrap()], "stop {cut:?}");
    b5["stop"] = json!(cut);
    assert_eq!(answer(&s.chat(&b5)).0, t5, "stop as a string");

    // A seed makes sampling reproducible.
    let mut b6 = Conv::ask(vec![text("Tell me a joke.")]).greedy(&dir, 8);
    b6["temperature"] = json!(1.0);
    b6["top_p"] = json!(0.9);
    b6["seed"] = json!(1234);
    assert_eq!(answer(&s.chat(&b6)).0, answer(&s.chat(&b6)).0, "same seed, same answer");

    // Unknown paths and wrong methods.
    assert_eq!(s.get("/v1/nothing").unwrap().status, 404);
    let g = s.get("/v1/chat/completions").unwrap();
    assert!(g.status == 405 || g.status == 404, "GET on the chat endpoint: {}", g.status);

    // Metrics: every name the issue lists, and the counters moved.
    let r = s.get("/metrics").unwrap();
    assert_eq!(r.status, 200);
    let ct = r.header("content-type").unwrap_or("");
    assert!(ct.starts_with("text/plain"), "Prometheus text format, got {ct:?}");
    let mt = parse_metrics(&r.text());
    for name in [
        "qvc_requests_running",
        "qvc_requests_waiting",
        "qvc_prompt_tokens_total",
        "qvc_generation_tokens_total",
        "qvc_request_success_total",
        "qvc_time_to_first_token_seconds_bucket",
        "qvc_time_to_first_token_seconds_count",
        "qvc_inter_token_latency_seconds_bucket",
        "qvc_e2e_request_latency_seconds_bucket",
        "qvc_e2e_request_latency_seconds_sum",
        "qvc_kv_slots_used",
        "qvc_kv_slots_total",
    ] {
        assert!(has_metric(&mt, name), "/metrics lacks {name}:\n{}", r.text());
    }
    assert_eq!(mt["qvc_kv_slots_total"], 4.0, "--max-batch 4");
    assert!(mt["qvc_generation_tokens_total"] >= 6.0 + 3.0 + 2.0 + 4.0 + 12.0);
    assert!(mt["qvc_request_success_total{finish_reason=\"length\"}"] >= 4.0, "{}", r.text());
    assert!(mt["qvc_request_success_total{finish_reason=\"stop\"}"] >= 2.0, "{}", r.text());
    assert!(mt["qvc_prompt_tokens_total"] >= 288.0);
}

#[test]
fn every_invalid_request_is_a_400_with_the_openai_envelope() {
    let Some(dir) = fixture() else { return };
    let s = Server::start(&dir, &["--max-batch", "2"]);
    let ok = Conv::ask(vec![text("hi")]).greedy(&dir, 2);
    let with = |k: &str, v: Value| {
        let mut b = ok.clone();
        b[k] = v;
        b
    };
    let without = |k: &str| {
        let mut b = ok.clone();
        b.as_object_mut().unwrap().remove(k);
        b
    };
    let raw_cases: Vec<(&str, &[u8])> = vec![
        ("bad JSON", b"{\"model\": \"qvc\", \"messages\": [" as &[u8]),
        ("not JSON at all", b"hello"),
        ("a JSON array body", b"[1, 2]"),
        ("an empty body", b""),
    ];
    for (what, body) in raw_cases {
        envelope(&s.post_raw(body), 400, what);
    }
    let user = |content: Value| json!([{"role": "user", "content": content}]);
    let png_garbage = format!("data:image/png;base64,{}", http::base64(b"this is not a PNG file at all"));
    let cases: Vec<(&str, Value)> = vec![
        ("missing messages", without("messages")),
        ("messages not a list", with("messages", json!("hi"))),
        ("empty messages", with("messages", json!([]))),
        ("a message without role", with("messages", json!([{"content": "hi"}]))),
        ("a message without content", with("messages", json!([{"role": "user"}]))),
        ("content a number", with("messages", user(json!(42)))),
        ("a part without type", with("messages", user(json!([{"text": "hi"}])))),
        ("an unknown part type", with("messages", user(json!([{"type": "audio", "audio": "x"}])))),
        ("a text part without text", with("messages", user(json!([{"type": "text"}])))),
        ("an image part without url", with("messages", user(json!([{"type": "image_url", "image_url": {}}])))),
        ("unknown role", with("messages", json!([{"role": "wizard", "content": "hi"}]))),
        (
            "last message from the assistant",
            with("messages", json!([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])),
        ),
        ("max_tokens a string", with("max_tokens", json!("ten"))),
        ("max_tokens negative", with("max_tokens", json!(-1))),
        ("max_tokens fractional", with("max_tokens", json!(2.5))),
        ("temperature a string", with("temperature", json!("hot"))),
        ("temperature negative", with("temperature", json!(-0.5))),
        ("temperature above 2", with("temperature", json!(2.5))),
        ("top_p above 1", with("top_p", json!(1.5))),
        ("top_p negative", with("top_p", json!(-0.1))),
        ("repetition_penalty 0", with("repetition_penalty", json!(0))),
        ("presence_penalty above 2", with("presence_penalty", json!(3))),
        ("frequency_penalty below -2", with("frequency_penalty", json!(-3))),
        ("top_logprobs above 20", with("top_logprobs", json!(21)).tap_logprobs()),
        ("seed a string", with("seed", json!("abc"))),
        ("stream a string", with("stream", json!("yes"))),
        ("stop a number", with("stop", json!(5))),
        ("model a number", with("model", json!(7))),
        (
            "an image that does not decode",
            with(
                "messages",
                user(json!([
                    {"type": "image_url", "image_url": {"url": png_garbage}},
                    {"type": "text", "text": "What is this?"}
                ])),
            ),
        ),
        (
            "a data URL that is not base64",
            with(
                "messages",
                user(json!([
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@not base64@@@"}},
                    {"type": "text", "text": "What is this?"}
                ])),
            ),
        ),
        (
            "an unsupported URL scheme",
            with(
                "messages",
                user(json!([
                    {"type": "image_url", "image_url": {"url": "ftp://example.com/a.png"}},
                    {"type": "text", "text": "What is this?"}
                ])),
            ),
        ),
    ];
    for (what, body) in &cases {
        envelope(&s.post(body), 400, what);
    }
    // The role error names the role.
    let e = envelope(&s.post(&with("messages", json!([{"role": "wizard", "content": "hi"}]))), 400, "role");
    assert!(e["message"].as_str().unwrap().contains("wizard") || e["message"].as_str().unwrap().contains("role"));
    // n other than 1 says that only 1 is supported.
    for n in [2, 0] {
        let e = envelope(&s.post(&with("n", json!(n))), 400, "n");
        let m = e["message"].as_str().unwrap();
        assert!(m.contains('1') || m.contains("one"), "the n error should say n must be 1: {m}");
    }
    assert_eq!(s.post(&with("n", json!(1))).status, 200, "n = 1 is fine");

    // A prompt plus max_tokens beyond the context: the message names both numbers.
    let prompt_tokens =
        generate(&dir, &Conv::ask(vec![text("hi")]), 1, "cpu")["prompt_tokens"].as_array().unwrap().len();
    for stream in [false, true] {
        let mut b = with("max_tokens", json!(100_000));
        b["stream"] = json!(stream);
        let e = envelope(&s.post(&b), 400, "prompt + max_tokens over the context");
        let m = e["message"].as_str().unwrap();
        assert!(m.contains("100000"), "the message names max_tokens (100000): {m}");
        assert!(m.contains(&prompt_tokens.to_string()), "the message names the prompt's {prompt_tokens} tokens: {m}");
    }
    // So does a long prompt alone.
    let long_text = "sea ".repeat(40_000);
    let e = envelope(
        &s.post(&with("messages", json!([{"role": "user", "content": long_text}]))),
        400,
        "a prompt over the context",
    );
    assert!(e["message"].as_str().unwrap().chars().any(|c| c.is_ascii_digit()));

    // 404 for a model the server does not serve.
    envelope(&s.post(&with("model", json!("gpt-4o"))), 404, "unknown model");

    // The server kept running through all of it.
    assert_eq!(s.post(&ok).status, 200);
    let m = s.metrics();
    assert_eq!(m["qvc_requests_running"], 0.0);
    assert_eq!(m["qvc_kv_slots_used"], 0.0);
}

trait TapLogprobs {
    fn tap_logprobs(self) -> Self;
}
impl TapLogprobs for Value {
    fn tap_logprobs(mut self) -> Self {
        self["logprobs"] = json!(true);
        self
    }
}

#[test]
fn body_and_picture_limits() {
    let Some(dir) = fixture() else { return };
    let s = Server::start(
        &dir,
        &["--max-body-bytes", "200000", "--max-image-bytes", "30000", "--max-image-pixels", "40000"],
    );
    // A real request (a data-URL picture) over the limit.
    let mut big = Conv::ask(vec![image("photo.jpg"), text("What is this?")]).greedy(&dir, 2);
    let pad = "x".repeat(300_000);
    big["padding"] = json!(pad);
    envelope(&s.post(&big), 413, "body over --max-body-bytes");
    // Under it, fine (grey.png: 825 bytes, 200x150 = 30000 pixels).
    assert_eq!(s.post(&Conv::ask(vec![image("grey.png"), text("What?")]).greedy(&dir, 2)).status, 200);
    // The picture limits are 400s that name the limit: photo.jpg has 52752 bytes, shapes.png
    // 640x480 = 307200 pixels in 24808 bytes.
    for (file, limit) in [("photo.jpg", "30000"), ("shapes.png", "40000")] {
        let r = s.post(&Conv::ask(vec![image(file), text("What?")]).greedy(&dir, 2));
        let e = envelope(&r, 400, &format!("{file} over a picture limit"));
        let m = e["message"].as_str().unwrap();
        assert!(m.contains(limit), "the message names the limit ({limit}): {m}");
    }
}

#[test]
fn api_key() {
    let Some(dir) = fixture() else { return };
    for (args, env) in [(vec!["--api-key", "sekrit-1"], vec![]), (vec![], vec![("QVC_API_KEY", "sekrit-1")])] {
        let mut s = Server::start_with_env(&dir, &args, &env);
        let body = serde_json::to_vec(&Conv::ask(vec![text("hi")]).greedy(&dir, 2)).unwrap();
        for (what, headers) in [
            ("no key", vec![]),
            ("wrong key", vec![("Authorization", "Bearer wrong")]),
            ("the key without Bearer", vec![("Authorization", "sekrit-1")]),
            ("a longer key", vec![("Authorization", "Bearer sekrit-12")]),
        ] {
            let r = s.request("POST", "/v1/chat/completions", &headers, &body).unwrap();
            envelope(&r, 401, &format!("chat, {what}"));
            let r = s.request("GET", "/v1/models", &headers, b"").unwrap();
            envelope(&r, 401, &format!("models, {what}"));
        }
        // Health checks and scrapers need no key.
        assert_eq!(s.get("/health").unwrap().status, 200);
        assert_eq!(s.get("/metrics").unwrap().status, 200);
        s.api_key = Some("sekrit-1".into());
        assert_eq!(s.post_raw(&body).status, 200);
        assert_eq!(s.get("/v1/models").unwrap().status, 200);
    }
}

#[test]
fn streaming() {
    let Some(dir) = fixture() else { return };
    let s = Server::start(&dir, &[]);
    let convs = [
        Conv::ask(vec![image("shapes.png"), text("What is in this picture?")]),
        Conv::ask(vec![text("Write a haiku about the sea. 请用中文回答。")]),
        Conv::ask(vec![text("hi")]),
    ];
    for (i, conv) in convs.iter().enumerate() {
        let body = conv.greedy(&dir, 40);
        let plain = s.chat(&body);
        let (content, finish, usage) = answer(&plain);
        for include_usage in [true, false] {
            let mut sb = body.clone();
            sb["stream"] = json!(true);
            if include_usage {
                sb["stream_options"] = json!({"include_usage": true});
            }
            let st = s.stream(&sb);
            assert!(st.first_has_role, "conversation {i}: the first chunk carries delta.role: {:?}", st.chunks.first());
            assert!(st.done_last, "conversation {i}: data: [DONE] ends the stream");
            assert_eq!(st.content, content, "conversation {i}: streamed deltas == the non-streamed content");
            assert_eq!(st.finish_reason.as_deref(), Some(finish.as_str()), "conversation {i}");
            if include_usage {
                let u = st.usage.as_ref().unwrap_or_else(|| panic!("conversation {i}: no usage chunk"));
                assert_eq!(u["prompt_tokens"], usage["prompt_tokens"]);
                assert_eq!(u["completion_tokens"], usage["completion_tokens"]);
                assert_eq!(u["total_tokens"], usage["total_tokens"]);
                assert!(st.chunks.last().unwrap()["choices"].as_array().unwrap().is_empty(), "usage chunk last");
            } else {
                assert!(st.usage.is_none(), "conversation {i}: a usage chunk without include_usage");
            }
        }
    }
    // A stop string: the streamed text never shows what the stop cuts (held back, then dropped).
    let full = answer(&s.chat(&convs[1].greedy(&dir, 12))).0;
    let cut: String = full.chars().skip(5).take(2).collect();
    let mut sb = convs[1].greedy(&dir, 12);
    sb["stop"] = json!(cut);
    let plain = answer(&s.chat(&sb));
    assert_eq!(plain.1, "stop");
    sb["stream"] = json!(true);
    let st = s.stream(&sb);
    assert_eq!(st.content, plain.0, "stop {cut:?}: streamed == non-streamed");
    assert_eq!(st.finish_reason.as_deref(), Some("stop"));
    // Streamed with logprobs: one entry per token across the chunks.
    let mut b = convs[1].greedy(&dir, 5);
    b["stream"] = json!(true);
    b["logprobs"] = json!(true);
    let st = s.stream(&b);
    let n: usize = st
        .chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().unwrap().iter())
        .map(|c| c["logprobs"]["content"].as_array().map_or(0, |a| a.len()))
        .sum();
    assert_eq!(n, 5, "streamed logprobs cover every token");
    // Errors are still plain JSON before the stream starts.
    let mut bad = convs[2].greedy(&dir, 2);
    bad["stream"] = json!(true);
    bad["temperature"] = json!(-1);
    envelope(&s.post(&bad), 400, "invalid streamed request");
}

/// Greedy answers equal `qvc generate --temperature 0` for the same conversation, including a
/// follow-up turn that reuses the previous turn's KV rows.
#[test]
fn greedy_answers_equal_qvc_generate() {
    let Some(dir) = fixture() else { return };
    let ex = expected(&dir);
    let s = Server::start(&dir, &[]);
    let mut convs: Vec<(String, Conv)> =
        ["img1", "img2", "text", "ground"].iter().map(|n| (n.to_string(), Conv::from_fixture(&ex, n))).collect();
    convs.push((
        "two pictures, text first, system".into(),
        Conv {
            system: Some("You describe pictures tersely.".into()),
            history: vec![],
            query: vec![text("Compare: "), image("grey.png"), image("icon_rgba.png"), text("Which is brighter?")],
        },
    ));
    for (name, conv) in &convs {
        let want = generate(&dir, conv, 12, "cpu");
        let v = s.chat(&conv.greedy(&dir, 12));
        let (content, _, usage) = answer(&v);
        assert_eq!(content, want["text"].as_str().unwrap(), "{name}: server vs qvc generate");
        assert_eq!(
            usage["prompt_tokens"].as_u64().unwrap() as usize,
            want["prompt_tokens"].as_array().unwrap().len(),
            "{name}"
        );
        assert_eq!(
            usage["completion_tokens"].as_u64().unwrap() as usize,
            want["tokens"].as_array().unwrap().len(),
            "{name}"
        );
        if let Some(n) = ex["chat"].get(name.as_str()).and_then(|c| c["n_tokens"].as_u64()) {
            assert_eq!(usage["prompt_tokens"].as_u64().unwrap(), n, "{name}: the fixture's n_tokens");
        }
        // The next turn of the same conversation: the previous turn's rows are reused (prefix cache).
        let mut next = conv.clone();
        // The reference tokenizes message text with only the picture/grounding tags special, while
        // the raw prompt file given to qvc generate makes every special form special: keep answer
        // text like "<|extra_60|>" (the random model writes such tokens) out of the history.
        let said = content.split("<|").next().unwrap().to_string();
        next.history.push((conv.query.clone(), said));
        next.query = vec![text("And then?")];
        let want2 = generate(&dir, &next, 8, "cpu");
        let v2 = s.chat(&next.greedy(&dir, 8));
        let (c2, _, u2) = answer(&v2);
        assert_eq!(c2, want2["text"].as_str().unwrap(), "{name}, second turn");
        eprintln!("{name}: second turn cached_tokens {}", u2["prompt_tokens_details"]["cached_tokens"]);
    }
    let m = s.metrics();
    assert!(m["qvc_vision_cache_hits_total"] >= 1.0, "the second turns reuse the pictures' features");
}

/// 16 concurrent greedy streams of mixed picture/text prompts and lengths each equal the same
/// request sent alone.
#[test]
fn sixteen_concurrent_streams_equal_each_alone() {
    let Some(dir) = fixture() else { return };
    let s = Server::start(&dir, &["--max-batch", "16", "--max-queue", "16"]);
    let pics = ["shapes.png", "photo.jpg", "icon_rgba.png", "grey.png"];
    let questions = ["What is in this picture?", "Describe it.", "写一首诗。", "Where is the circle?"];
    let bodies: Vec<Value> = (0..16)
        .map(|i| {
            let q = questions[i % 4];
            let conv = if i % 2 == 0 {
                Conv::ask(vec![image(pics[(i / 2) % 4]), text(q)])
            } else if i % 4 == 1 {
                Conv::ask(vec![text(&format!("{q} {}", "Please be precise. ".repeat(i)))])
            } else {
                Conv::ask(vec![image(pics[i % 4]), image(pics[(i + 1) % 4]), text(q)])
            };
            let mut b = conv.greedy(&dir, 4 + (i * 7) % 37);
            b["stream"] = json!(true);
            b["stream_options"] = json!({"include_usage": true});
            b
        })
        .collect();
    let alone: Vec<Streamed> = bodies.iter().map(|b| s.stream(b)).collect();
    for round in 0..2 {
        let together: Vec<Streamed> = std::thread::scope(|sc| {
            let hs: Vec<_> = bodies.iter().map(|b| sc.spawn(|| s.stream(b))).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
            assert_eq!(t.content, a.content, "round {round}, request {i}: concurrent vs alone");
            assert_eq!(t.usage.as_ref().unwrap()["completion_tokens"], a.usage.as_ref().unwrap()["completion_tokens"]);
            assert!(t.done_last && t.first_has_role);
        }
    }
    let m = s.metrics();
    assert_eq!(m["qvc_requests_running"], 0.0);
    assert_eq!(m["qvc_kv_slots_used"], 0.0);
}

/// The same on the emulated GPU: few tokens, the emulator is slow.
#[test]
fn concurrent_streams_on_the_emulated_gpu() {
    let Some(dir) = fixture() else { return };
    let s = Server::start(&dir, &["--device", "emu", "--max-batch", "4"]);
    let bodies: Vec<Value> = ["Write a haiku about the sea.", "你好"]
        .iter()
        .enumerate()
        .map(|(i, q)| {
            let mut b = Conv::ask(vec![text(q)]).greedy(&dir, 2 + i);
            b["stream"] = json!(true);
            b
        })
        .collect();
    let t0 = Instant::now();
    let alone: Vec<Streamed> = bodies.iter().map(|b| s.stream(b)).collect();
    let together: Vec<Streamed> = std::thread::scope(|sc| {
        let hs: Vec<_> = bodies.iter().map(|b| sc.spawn(|| s.stream(b))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(t.content, a.content, "emu request {i}: concurrent vs alone");
        assert!(!a.content.is_empty());
    }
    eprintln!("emu: {:.1} s", t0.elapsed().as_secs_f64());
}

fn wait_metrics(s: &Server, what: &str, limit: Duration, ok: impl Fn(&std::collections::HashMap<String, f64>) -> bool) {
    let t0 = Instant::now();
    loop {
        let m = s.metrics();
        if ok(&m) {
            return;
        }
        assert!(
            t0.elapsed() < limit,
            "{what} not reached in {limit:?}: running {} waiting {} slots used {}",
            m["qvc_requests_running"],
            m["qvc_requests_waiting"],
            m["qvc_kv_slots_used"]
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A dozen clients vanish mid-stream (some while queued); no slot stays held and the server still answers.
#[test]
fn clients_that_vanish_leave_no_slot_behind() {
    let Some(dir) = fixture() else { return };
    let s = Server::start(&dir, &["--max-batch", "4", "--max-queue", "16"]);
    std::thread::scope(|sc| {
        for i in 0..12 {
            let s = &s;
            sc.spawn(move || {
                let mut st = s.open_stream(&long_request(1800));
                assert_eq!(st.status, 200);
                if i % 3 == 0 {
                    // Gone before its first token (likely still queued).
                    st.abandon();
                    return;
                }
                for _ in 0..(1 + i % 4) {
                    st.next_event().unwrap().expect("an event");
                }
                st.abandon();
            });
        }
    });
    // Non-streamed requests whose clients hang up while waiting for the answer.
    for _ in 0..3 {
        use std::io::Write;
        let body = serde_json::to_vec(&{
            let mut b = long_request(20_000);
            b["stream"] = json!(false);
            b
        })
        .unwrap();
        let mut c = std::net::TcpStream::connect(&s.addr).unwrap();
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        c.write_all(head.as_bytes()).unwrap();
        c.write_all(&body).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        drop(c);
    }
    wait_metrics(&s, "0 running, 0 waiting, 0 KV slots used", Duration::from_secs(20), |m| {
        m["qvc_requests_running"] == 0.0 && m["qvc_requests_waiting"] == 0.0 && m["qvc_kv_slots_used"] == 0.0
    });
    let m = s.metrics();
    assert!(m["qvc_request_cancelled_total"] >= 11.0, "cancelled {}", m["qvc_request_cancelled_total"]);
    // Far fewer tokens than 12 x 1800 were generated.
    assert!(m["qvc_generation_tokens_total"] < 6000.0, "generated {}", m["qvc_generation_tokens_total"]);
    let v = s.chat(&Conv::ask(vec![image("grey.png"), text("What now?")]).greedy(&dir, 5));
    assert_eq!(v["usage"]["completion_tokens"], 5);
}

/// --max-batch 1 --max-queue 1: one running, one waiting, the third is turned away with 503 + Retry-After.
#[test]
fn full_queue_is_503_with_retry_after() {
    let Some(dir) = fixture() else { return };
    let s = Server::start(&dir, &["--max-batch", "1", "--max-queue", "1"]);
    // Long enough (20000 tokens) to still run when C arrives, however busy the machine; both are dropped.
    let mut a = s.open_stream(&long_request(20_000));
    assert_eq!(a.status, 200);
    a.next_event().unwrap().expect("A runs");
    let b = std::thread::scope(|sc| {
        let hb = sc.spawn(|| {
            let mut b = s.open_stream(&long_request(20_000));
            let first = b.next_event().ok().flatten();
            (b.status, first.is_some(), b)
        });
        wait_metrics(&s, "B waiting", Duration::from_secs(5), |m| m["qvc_requests_waiting"] == 1.0);
        let r = s.post(&Conv::ask(vec![text("hi")]).greedy(&dir, 2));
        let e = envelope(&r, 503, "queue full");
        let ra = r.header("retry-after").unwrap_or_else(|| panic!("503 without Retry-After: {:?}", r.headers));
        assert!(ra.trim().parse::<u64>().is_ok(), "Retry-After {ra:?} is seconds");
        assert!(e["message"].is_string());
        // Streamed requests get the same 503 before any event.
        let mut sb = Conv::ask(vec![text("hi")]).greedy(&dir, 2);
        sb["stream"] = json!(true);
        envelope(&s.post(&sb), 503, "queue full (stream)");
        a.abandon();
        hb.join().unwrap()
    });
    assert_eq!(b.0, 200);
    assert!(b.1, "B ran once A was gone");
    b.2.abandon();
    wait_metrics(&s, "idle", Duration::from_secs(20), |m| {
        m["qvc_requests_running"] == 0.0 && m["qvc_requests_waiting"] == 0.0
    });
    assert_eq!(s.chat(&Conv::ask(vec![text("hi")]).greedy(&dir, 3))["usage"]["completion_tokens"], 3);
}

/// SIGTERM: the running request finishes, new connections are refused, the process exits 0.
#[test]
fn sigterm_drains_and_exits_zero() {
    let Some(dir) = fixture() else { return };
    let mut s = Server::start(&dir, &[]);
    let mut body = long_request(1500);
    body["stream_options"] = json!({"include_usage": true});
    let mut a = s.open_stream(&body);
    assert_eq!(a.status, 200);
    s.sigterm();
    // Give the signal a moment to land; the request is still running (1500 tokens).
    std::thread::sleep(Duration::from_millis(150));
    match http::send(&s.addr, "GET", "/health", &[], b"", Duration::from_secs(5)) {
        Err(e) => eprintln!("new connection while draining: {e} (refused, as it should be)"),
        Ok(r) => assert_ne!(r.status, 200, "a new request while draining got 200: {}", r.text()),
    }
    let st = read_stream(&mut a);
    assert!(st.done_last, "the running request ends with [DONE]");
    assert_eq!(st.finish_reason.as_deref(), Some("length"));
    assert_eq!(st.usage.unwrap()["completion_tokens"], 1500, "the running request ran to its end");
    let status = s.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "exit status {status}:\n{}", s.log());
    assert!(
        std::net::TcpStream::connect_timeout(&s.addr.parse().unwrap(), Duration::from_secs(2)).is_err(),
        "connections after exit"
    );
}

/// Image URLs: data URLs, http:// (private addresses refused unless --allow-private-urls), local
/// paths and file:// only under --allowed-local-media-path.
#[test]
fn image_urls_and_local_paths() {
    let Some(dir) = fixture() else { return };
    let media = MediaServer::start(dir.clone());
    let q = |url: String| {
        json!({
            "model": "qvc",
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": "What is in this picture?"}
            ]}],
            "max_tokens": 6,
            "temperature": 0,
        })
    };
    // Local paths: a folder with the picture, and one outside it.
    let tmp = scratch("media");
    let allowed = tmp.join("allowed");
    std::fs::create_dir_all(&allowed).unwrap();
    std::fs::copy(dir.join("shapes.png"), allowed.join("pic.png")).unwrap();
    std::fs::copy(dir.join("shapes.png"), tmp.join("outside.png")).unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(tmp.join("outside.png"), allowed.join("link.png")).unwrap();

    let reference = {
        let s = Server::start(&dir, &[]);
        let want = answer(&s.chat(&q(data_url(&dir, "shapes.png")))).0;
        // Default: loopback/private URLs are refused, naming why.
        for url in [media.url("shapes.png"), format!("http://localhost:{}/shapes.png", media.port)] {
            let e = envelope(&s.post(&q(url.clone())), 400, &format!("{url} by default"));
            let m = e["message"].as_str().unwrap().to_lowercase();
            assert!(m.contains("private") || m.contains("loopback"), "the refusal names private addresses: {m}");
        }
        for url in ["http://10.1.2.3/a.png", "http://169.254.169.254/latest/meta-data", "http://[::1]:9/a.png"] {
            envelope(&s.post(&q(url.into())), 400, url);
        }
        assert!(media.hits.lock().unwrap().is_empty(), "nothing fetched from a private address by default");
        // Local files without --allowed-local-media-path.
        let p = allowed.join("pic.png");
        envelope(&s.post(&q(p.display().to_string())), 400, "a local path by default");
        envelope(&s.post(&q(format!("file://{}", p.display()))), 400, "file:// by default");
        want
    };
    let s = Server::start(&dir, &["--allow-private-urls", "--allowed-local-media-path", allowed.to_str().unwrap()]);
    assert_eq!(answer(&s.chat(&q(media.url("shapes.png")))).0, reference, "http:// with --allow-private-urls");
    assert_eq!(answer(&s.chat(&q(media.url("redirect/shapes.png")))).0, reference, "one redirect");
    envelope(&s.post(&q(media.url("missing.png"))), 400, "an image URL that is 404");
    let p = allowed.join("pic.png");
    assert_eq!(answer(&s.chat(&q(p.display().to_string()))).0, reference, "a path under the allowed folder");
    assert_eq!(answer(&s.chat(&q(format!("file://{}", p.display())))).0, reference, "file:// under it");
    let escape = format!("{}/../outside.png", allowed.display());
    envelope(&s.post(&q(escape.clone())), 400, "a .. escape");
    envelope(&s.post(&q(format!("file://{escape}"))), 400, "a file:// .. escape");
    envelope(&s.post(&q(tmp.join("outside.png").display().to_string())), 400, "a path outside");
    #[cfg(unix)]
    envelope(&s.post(&q(allowed.join("link.png").display().to_string())), 400, "a symlink out of the folder");
    envelope(&s.post(&q(allowed.join("nope.png").display().to_string())), 400, "a missing file");
    let _ = std::fs::remove_dir_all(&tmp);
}

/// `qvc bench-serve` against a server: every level's requests succeed and their tokens are counted.
#[test]
fn bench_serve_reports_each_level() {
    let Some(dir) = fixture() else { return };
    let s = Server::start(&dir, &["--max-batch", "4", "--api-key", "bench-key"]);
    let out = std::process::Command::new(qvc_bin())
        .args(["bench-serve", "--url", &format!("http://{}", s.addr), "--concurrency", "1,3", "--requests", "3"])
        .args(["--max-tokens", "5", "--warmup", "0", "--json", "--api-key", "bench-key", "--image"])
        .arg(dir.join("shapes.png"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["model"], "qvc", "the model name comes from /v1/models");
    let levels = v["levels"].as_array().unwrap();
    assert_eq!(levels.len(), 2);
    for (l, c) in levels.iter().zip([1, 3]) {
        assert_eq!(l["concurrency"], c);
        assert_eq!(l["failed"], 0, "{l}");
        assert_eq!(l["generated_tokens"], 15, "3 requests x 5 tokens: {l}");
        for k in ["tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "e2e_p50_ms"] {
            assert!(l[k].as_f64().is_some_and(|x| x > 0.0), "{k} in {l}");
        }
    }
    let m = s.metrics();
    assert_eq!(m["qvc_request_success_total{finish_reason=\"length\"}"], 6.0);
    // A wrong key is reported, not measured.
    let bad = std::process::Command::new(qvc_bin())
        .args(["bench-serve", "--url", &format!("http://{}", s.addr), "--concurrency", "1", "--requests", "1"])
        .args(["--model", "qvc", "--warmup", "0", "--api-key", "nope"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("401"), "{err}");
}
