//! Parity of the Qwen tokenizer and the ChatML prompt builder with the
//! reference (`tokenization_qwen.py` + tiktoken, `make_context`), against the
//! ids recorded in `shared/fixtures/tiny-qwen-vl/expected.json`.
//!
//! Covers every `tokenizer.cases` entry (ids with all specials, ids as chat
//! content, decode with and without specials), the reference's encode errors,
//! `decode_cases`, the special ids and vocabulary size, every chat prompt
//! (`make_context` ids and the image spans the model reads back) and the
//! long-context prompts (the numbered text re-created from its recipe).
//!
//! The fixtures live outside the repository; without them the tests print
//! "skipped" and pass, unless `QVC_REQUIRE_FIXTURES=1` (as in CI).

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Instant;

use qvc_model::chat::{format_query, make_context, stop_ids, Turn, DEFAULT_MAX_WINDOW_SIZE};
use qvc_model::tokenizer::{QwenTokenizer, Specials, TokenizerError};
use serde_json::Value;

fn fixture_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/tiny-qwen-vl");
    if dir.join("expected.json").is_file() && dir.join("qwen.tiktoken").is_file() {
        return Some(dir);
    }
    if std::env::var("QVC_REQUIRE_FIXTURES").as_deref() == Ok("1") {
        panic!("QVC_REQUIRE_FIXTURES=1 but the fixtures are missing at {}", dir.display());
    }
    println!("skipped: ../shared/fixtures not found");
    None
}

struct Fixture {
    tok: QwenTokenizer,
    expected: Value,
}

fn fixture() -> Option<&'static Fixture> {
    static FIXTURE: OnceLock<Option<Fixture>> = OnceLock::new();
    FIXTURE
        .get_or_init(|| {
            let dir = fixture_dir()?;
            let t0 = Instant::now();
            let tok = QwenTokenizer::from_file(&dir.join("qwen.tiktoken")).expect("load qwen.tiktoken");
            println!("qwen.tiktoken loaded in {:.3} s", t0.elapsed().as_secs_f64());
            let text = std::fs::read_to_string(dir.join("expected.json")).expect("read expected.json");
            let expected = serde_json::from_str(&text).expect("parse expected.json");
            Some(Fixture { tok, expected })
        })
        .as_ref()
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected an id list, got {v}"))
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("expected a string, got {v}"))
}

/// Index of the first difference, for readable failures.
fn first_diff(a: &[u32], b: &[u32]) -> String {
    let i = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    format!(
        "lengths {} vs {}, first difference at {i}: {:?} vs {:?}",
        a.len(),
        b.len(),
        &a[i.min(a.len())..(i + 5).min(a.len())],
        &b[i.min(b.len())..(i + 5).min(b.len())]
    )
}

#[test]
fn special_ids_and_vocab_size() {
    let Some(f) = fixture() else { return };
    let t = &f.expected["tokenizer"];
    let sp = f.tok.specials();
    let want = &t["special_ids"];
    let got = [
        ("endoftext", sp.endoftext),
        ("im_start", sp.im_start),
        ("im_end", sp.im_end),
        ("ref_start", sp.ref_start),
        ("ref_end", sp.ref_end),
        ("box_start", sp.box_start),
        ("box_end", sp.box_end),
        ("quad_start", sp.quad_start),
        ("quad_end", sp.quad_end),
        ("img_start", sp.img_start),
        ("img_end", sp.img_end),
        ("img_pad", sp.img_pad),
    ];
    assert_eq!(want.as_object().unwrap().len(), got.len());
    for (name, id) in got {
        assert_eq!(want[name].as_u64(), Some(id as u64), "special id {name}");
    }
    assert_eq!(f.tok.n_vocab() as u64, t["n_vocab_tokenizer"].as_u64().unwrap());
    assert_eq!(f.tok.n_ranks(), 151643);
    assert!(f.tok.is_special(151643) && f.tok.is_special(151859));
    assert!(!f.tok.is_special(151642) && !f.tok.is_special(151860));
    assert_eq!(stop_ids(&f.tok), vec![151645, 151644, 151643]);
}

#[test]
fn tokenizer_cases() {
    let Some(f) = fixture() else { return };
    let cases = f.expected["tokenizer"]["cases"].as_array().unwrap();
    assert!(cases.len() >= 40);
    for case in cases {
        let text = str_of(&case["text"]);
        let want = ids_of(&case["ids"]);
        let got = f.tok.encode(text, Specials::All).unwrap();
        assert_eq!(got, want, "encode {text:?}: {}", first_diff(&got, &want));

        let want_chat = ids_of(&case["ids_chat_content"]);
        let got_chat = f.tok.encode(text, Specials::ImageTags).unwrap();
        assert_eq!(got_chat, want_chat, "encode as chat content {text:?}: {}", first_diff(&got_chat, &want_chat));

        assert_eq!(f.tok.decode(&want, false), str_of(&case["decoded"]), "decode {text:?}");
        assert_eq!(
            f.tok.decode(&want, true),
            str_of(&case["decoded_skip_special"]),
            "decode skipping specials {text:?}"
        );
        if let Some(d) = case.get("decoded_chat_content") {
            assert_eq!(f.tok.decode(&want_chat, false), str_of(d), "decode chat content {text:?}");
        }
    }
}

#[test]
fn tokenizer_errors() {
    let Some(f) = fixture() else { return };
    let errors = f.expected["tokenizer"]["errors"].as_array().unwrap();
    assert!(!errors.is_empty());
    for case in errors {
        let text = str_of(&case["text"]);
        let reference = str_of(&case["error"]);
        for specials in [Specials::All, Specials::ImageTags] {
            let e = f.tok.encode(text, specials).expect_err(reference);
            if reference.contains("Unclosed") {
                assert!(matches!(e, TokenizerError::UnclosedImage { .. }), "{text:?}: {e:?}");
            } else if reference.contains("too long") {
                assert!(matches!(e, TokenizerError::ImagePathTooLong { .. }), "{text:?}: {e:?}");
            } else {
                panic!("unknown reference error {reference}");
            }
        }
    }
}

#[test]
fn decode_cases() {
    let Some(f) = fixture() else { return };
    for case in f.expected["tokenizer"]["decode_cases"].as_array().unwrap() {
        let ids = ids_of(&case["ids"]);
        assert_eq!(f.tok.decode(&ids, false), str_of(&case["decoded"]), "decode {ids:?}");
        if let Some(d) = case.get("decoded_skip_special") {
            assert_eq!(f.tok.decode(&ids, true), str_of(d), "decode skipping specials {ids:?}");
        }
    }
}

#[test]
fn chat_prompts() {
    let Some(f) = fixture() else { return };
    let chat = f.expected["chat"].as_object().unwrap();
    assert!(chat.len() >= 4);
    for (name, p) in chat {
        let history: Vec<Turn> = p["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| Turn { query: str_of(&t[0]).to_string(), response: str_of(&t[1]).to_string() })
            .collect();
        let want = ids_of(&p["input_ids"]);
        let got =
            make_context(&f.tok, str_of(&p["system"]), &history, str_of(&p["query"]), DEFAULT_MAX_WINDOW_SIZE).unwrap();
        assert_eq!(got, want, "chat/{name}: {}", first_diff(&got, &want));
        assert_eq!(got.len() as u64, p["n_tokens"].as_u64().unwrap(), "chat/{name}");
        assert_eq!(f.tok.decode(&got, false), str_of(&p["raw_text"]), "chat/{name} decode");

        let spans = f.tok.image_spans(&got).unwrap();
        let want_spans = p["image_spans"].as_array().unwrap();
        assert_eq!(spans.len(), want_spans.len(), "chat/{name} image count");
        for (s, w) in spans.iter().zip(want_spans) {
            assert_eq!(s.path, str_of(&w["path"]), "chat/{name}");
            assert_eq!(s.start as u64, w["img_start_pos"].as_u64().unwrap(), "chat/{name}");
            assert_eq!(s.end as u64, w["img_end_pos"].as_u64().unwrap(), "chat/{name}");
            let rows = ids_of(&w["feature_rows"]);
            assert_eq!(rows, vec![s.start as u32 + 1, s.end as u32], "chat/{name}");
        }

        // The greedy continuation decodes as the reference decoded it.
        if let Some(g) = p.get("greedy") {
            if let (Some(ids), Some(d)) = (g.get("ids"), g.get("decoded_new")) {
                assert_eq!(f.tok.decode(&ids_of(ids), false), str_of(d), "chat/{name} greedy decode");
            }
        }
    }
}

#[test]
fn format_query_builds_the_fixture_queries() {
    let Some(f) = fixture() else { return };
    let img2 = &f.expected["chat"]["img2"];
    let q = format_query(
        &["photo.jpg".to_string(), "icon_rgba.png".to_string()],
        "What is different between the two pictures?",
    );
    assert_eq!(q, str_of(&img2["query"]));
}

/// The long-context prompts: the numbered text of `long.source_lines_python`,
/// encoded whole and cut to `n_tokens`; the `_chat_` case is a chat prompt.
#[test]
fn long_prompts() {
    let Some(f) = fixture() else { return };
    let long = f.expected["long"].as_object().unwrap();
    let recipe = str_of(&long["source_lines_python"]);
    assert!(
        recipe.contains("crosses the river at dawn; 第%d条记录显示温度为%d度。") && recipe.contains("range(400)"),
        "the long-text recipe changed: {recipe}"
    );
    let colors = ["red", "green", "blue", "grey"];
    let things = ["fox", "boat", "train", "kite", "bird"];
    let text = (0..400)
        .map(|i| {
            format!(
                "Item {i}: the {} {} crosses the river at dawn; 第{i}条记录显示温度为{}度。",
                colors[i % 4],
                things[i % 5],
                (i * 7) % 40
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    let t0 = Instant::now();
    let all = f.tok.encode(&text, Specials::All).unwrap();
    println!("encoded {} bytes into {} ids in {:.4} s", text.len(), all.len(), t0.elapsed().as_secs_f64());
    assert_eq!(f.tok.decode(&all, false), text);

    let mut checked = 0;
    for (name, case) in long {
        let Some(want) = case.get("input_ids").map(ids_of) else {
            continue;
        };
        let n = case["n_tokens"].as_u64().unwrap() as usize;
        assert_eq!(want.len(), n, "long/{name}");
        if name.contains("chat") {
            let chat = &f.expected["chat"]["img1"];
            assert_eq!(want, ids_of(&chat["input_ids"]), "long/{name} is chat/img1's prompt");
        } else {
            assert!(all.len() >= n, "long/{name}: text too short");
            assert_eq!(&all[..n], &want[..], "long/{name}: {}", first_diff(&all[..n], &want));
        }
        checked += 1;
    }
    assert!(checked >= 5);
}

#[test]
fn load_time() {
    let Some(dir) = fixture_dir() else { return };
    let t0 = Instant::now();
    let tok = QwenTokenizer::from_file(&dir.join("qwen.tiktoken")).unwrap();
    let dt = t0.elapsed().as_secs_f64();
    println!("qwen.tiktoken: {} ids, loaded in {dt:.3} s", tok.n_vocab());
    // Generous, so that debug builds pass too; release is far below.
    assert!(dt < 10.0, "loading took {dt} s");
}
