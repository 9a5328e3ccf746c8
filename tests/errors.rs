//! Bad checkpoints, configs, tokenizer files, images and prompts give errors
//! that name the problem, never panics.

use qvc_model::{LoadOptions, Model, PrefillOptions, Session};
use qvc_runtime::Cpu;
use std::path::{Path, PathBuf};

fn demo(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qvc-err-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    qvc::demo::write_checkpoint(&dir).unwrap();
    dir
}

fn load_err(dir: &Path) -> String {
    match Model::load(dir, &LoadOptions::default()) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(p, v.to_string()).unwrap();
}

#[test]
fn missing_checkpoint_and_files() {
    let e = load_err(Path::new("/definitely/not/here"));
    assert!(e.contains("not found") && e.contains("config.json"), "{e}");
    let dir = demo("files");
    std::fs::remove_file(dir.join("qwen.tiktoken")).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("qwen.tiktoken"), "{e}");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("qwen.tiktoken"), qvc_model::tokenizer::demo_tiktoken()).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn bad_config() {
    let dir = demo("config");
    edit_config(&dir, |v| {
        v.as_object_mut().unwrap().remove("hidden_size");
    });
    let e = load_err(&dir);
    assert!(e.contains("\"hidden_size\"") && e.contains("config.json"), "{e}");
    edit_config(&dir, |v| v["hidden_size"] = serde_json::json!("big"));
    assert!(load_err(&dir).contains("hidden_size"));
    edit_config(&dir, |v| {
        v["hidden_size"] = serde_json::json!(128);
        v["visual"].as_object_mut().unwrap().remove("width");
    });
    let e = load_err(&dir);
    assert!(e.contains("visual.width"), "{e}");
    std::fs::write(dir.join("config.json"), "{ not json").unwrap();
    assert!(load_err(&dir).contains("not valid JSON"));
}

#[test]
fn config_that_does_not_match_the_weights_names_the_tensor() {
    let dir = demo("shape");
    edit_config(&dir, |v| v["intermediate_size"] = serde_json::json!(700));
    let e = load_err(&dir);
    assert!(e.contains("transformer.h.0.mlp.w1.weight") && e.contains("shape"), "{e}");
    edit_config(&dir, |v| {
        v["intermediate_size"] = serde_json::json!(688);
        v["num_hidden_layers"] = serde_json::json!(3);
    });
    let e = load_err(&dir);
    assert!(e.contains("transformer.h.2.") && e.contains("missing"), "{e}");
}

#[test]
fn truncated_corrupt_and_unsupported_weights() {
    let dir = demo("weights");
    let p = dir.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("model.safetensors") && e.contains("truncated or corrupt"), "{e}");
    std::fs::write(&p, b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage header}").unwrap();
    assert!(load_err(&dir).contains("not a valid safetensors"));
    std::fs::write(&p, b"").unwrap();
    assert!(load_err(&dir).contains("not a valid safetensors"));
    // An integer tensor where weights belong.
    let data = [0u8; 8];
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![1], &data).unwrap();
    safetensors::tensor::serialize_to_file([("transformer.wte.weight", view)], None, &p).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("transformer.wte.weight") && e.contains("I64"), "{e}");
}

#[test]
fn sharded_checkpoints_load_and_broken_indexes_are_named() {
    let dir = demo("shards");
    // Split model.safetensors into two shards with an index.
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (i, part) in [a, b].iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let views: Vec<(String, safetensors::tensor::TensorView)> =
            part.iter().map(|n| (n.clone(), st.tensor(n).unwrap())).collect();
        safetensors::tensor::serialize_to_file(views, None, &dir.join(&file)).unwrap();
        for n in part.iter() {
            map.insert(n.clone(), serde_json::json!(file));
        }
    }
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let index = dir.join("model.safetensors.index.json");
    std::fs::write(&index, serde_json::json!({ "weight_map": map }).to_string()).unwrap();
    let m = Model::load(&dir, &LoadOptions::default()).expect("sharded checkpoint loads");
    assert_eq!(m.weights.names().len(), names.len());
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("model-00002-of-00002.safetensors"), "{e}");
    std::fs::write(&index, "[]").unwrap();
    assert!(load_err(&dir).contains("weight_map"));
}

#[test]
fn bare_safetensors_file_with_config_beside_it() {
    let dir = demo("bare");
    let m = Model::load(&dir.join("model.safetensors"), &LoadOptions::default()).unwrap();
    assert_eq!(m.config.layers, 2);
}

#[test]
fn bad_tokenizer_file_names_the_line() {
    let dir = demo("tok");
    std::fs::write(dir.join("qwen.tiktoken"), "IQ== 0\n!!!notbase64 1\n").unwrap();
    let e = load_err(&dir);
    assert!(e.contains("qwen.tiktoken") && e.contains(":2"), "{e}");
}

#[test]
fn bad_prompts_and_images_are_errors() {
    let dir = demo("prompt");
    let m = Model::load(&dir, &LoadOptions::default()).unwrap();
    let cpu = Cpu;
    let mut s = Session::new(&m, &cpu);
    let po = PrefillOptions::default();
    assert!(s.prefill(&[], &po).unwrap_err().to_string().contains("empty"));
    let e = s.prefill(&[1, 2, 99_999_999], &po).unwrap_err().to_string();
    assert!(e.contains("99999999") && e.contains("vocabulary"), "{e}");
    assert!(s.step(3).unwrap_err().to_string().contains("prefill"));
    // A picture that does not exist, and one that is not a picture.
    let tok = &m.tokenizer;
    let ids = tok.encode("<img>/no/such/picture.png</img>hi", qvc_model::tokenizer::Specials::All).unwrap();
    let e = s.prefill(&ids, &po).unwrap_err().to_string();
    assert!(e.contains("/no/such/picture.png"), "{e}");
    let junk = dir.join("junk.png");
    std::fs::write(&junk, b"this is not a png").unwrap();
    let ids = tok.encode(&format!("<img>{}</img>hi", junk.display()), qvc_model::tokenizer::Specials::All).unwrap();
    let e = s.prefill(&ids, &po).unwrap_err().to_string();
    assert!(e.contains("junk.png"), "{e}");
    // An <img> span cut short by hand-written token ids.
    let mut ids = tok.encode("<img>a.png</img>", qvc_model::tokenizer::Specials::All).unwrap();
    ids.remove(5);
    assert!(s.prefill(&ids, &po).is_err());
}
