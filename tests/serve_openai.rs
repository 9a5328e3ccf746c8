//! The official `openai` Python package against `qvc serve`: non-streamed
//! and streamed answers for the fixture's img1, text and ground
//! conversations equal `qvc generate --temperature 0`, and
//! `usage.prompt_tokens` equals the fixture's `n_tokens`
//! (tests/serve_openai.py does the talking).
//!
//! The Python comes from `QVC_PYTHON` (a venv with the pinned `openai`, made by
//! `.ci/run`); without it the test prints "skipped", unless
//! `QVC_REQUIRE_PYTHON_CLIENT=1` (CI), where that is a failure.

mod common;
#[path = "common/server.rs"]
mod server;

use serde_json::{json, Value};
use server::*;
use std::process::Command;

#[test]
fn openai_python_client() {
    let python = match std::env::var("QVC_PYTHON") {
        Ok(p) if !p.is_empty() => p,
        _ => {
            if std::env::var("QVC_REQUIRE_PYTHON_CLIENT").as_deref() == Ok("1") {
                panic!("QVC_REQUIRE_PYTHON_CLIENT=1 but QVC_PYTHON is not set (a python with the openai package)");
            }
            eprintln!("skipped: QVC_PYTHON is not set (a python with the pinned openai package; .ci/run makes one)");
            return;
        }
    };
    let Some(dir) = common::fixtures() else { return };
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let mut s = Server::start(&dir, &["--api-key", "py-key", "--served-model-name", "qwen-vl-tiny"]);
    s.api_key = Some("py-key".into());
    let max_tokens = 12;
    let cases: Vec<Value> = ["img1", "text", "ground"]
        .iter()
        .map(|name| {
            let conv = Conv::from_fixture(&expected, name);
            let g = generate(&dir, &conv, max_tokens, "cpu");
            json!({
                "name": name,
                "max_tokens": max_tokens,
                "text": g["text"],
                "prompt_tokens": g["prompt_tokens"].as_array().unwrap().len(),
                "completion_tokens": g["tokens"].as_array().unwrap().len(),
            })
        })
        .collect();
    let tmp = scratch("openai");
    let cfg = tmp.join("cfg.json");
    std::fs::write(
        &cfg,
        serde_json::to_vec_pretty(&json!({
            "base_url": format!("http://{}/v1", s.addr),
            "api_key": "py-key",
            "model": "qwen-vl-tiny",
            "fixture": dir,
            "cases": cases,
        }))
        .unwrap(),
    )
    .unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/serve_openai.py");
    let out =
        Command::new(&python).arg(&script).arg(&cfg).output().unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_dir_all(&tmp);
    assert!(out.status.success() && stdout.contains("all ok"), "the openai client's checks failed (above)");
}
