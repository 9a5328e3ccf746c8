//! The scheduler on the tiny fixture, without HTTP: greedy answers equal
//! `qvc_model::engine::generate`; concurrent requests each equal the same
//! request alone (bit for bit); a conversation's next turn reuses the KV
//! rows of the previous one; cancellation, a full queue, a panicking
//! request, validation, shutdown.

mod common;
use common::*;
use qvc_model::chat::stop_ids;
use qvc_model::sampling::SamplingParams;
use qvc_model::{generate, GenerateOptions, LoadOptions, Model, Session};
use qvc_runtime::Cpu;
use qvc_serve::conversation::{build_prompt, Message, Part, Role};
use qvc_serve::{EngineConfig, EngineState, Event, FinishReason, GenRequest, SubmitError};
use std::sync::mpsc;
use std::time::Duration;

fn cfg(max_batch: usize) -> EngineConfig {
    EngineConfig { max_batch, max_queue: 64, ..Default::default() }
}

#[test]
fn greedy_answers_equal_generate() {
    let Some(dir) = fixtures() else { return };
    let exp = expected(&dir);
    let m = Model::load(&dir, &LoadOptions::default()).unwrap();
    let engine = cpu_engine(&dir, cfg(2));
    let stops = stop_ids(&m.tokenizer);
    for case in ["img1", "text", "ground"] {
        let prompt = ids(&exp["chat"][case]["input_ids"]);
        let cpu = Cpu;
        let mut s = Session::new(&m, &cpu);
        s.set_image_dir(&dir);
        let opt = GenerateOptions { max_new_tokens: 12, sampling: SamplingParams::greedy(), stop_ids: stops.clone() };
        let want = generate(&mut s, &prompt, &opt, &mut |_| {}).unwrap();
        let images = prompt_images(&m, &dir, &prompt);
        let got = run(&engine, GenRequest::greedy(prompt.clone(), images, 12, stops.clone()));
        let (finish, usage, text) = got.done();
        assert_eq!(text, want.text, "{case}");
        assert_eq!(got.text(), want.text, "{case}: the deltas add up to the answer");
        assert_eq!(usage.completion_tokens, want.tokens.len(), "{case}");
        assert_eq!(usage.prompt_tokens, exp["chat"][case]["n_tokens"].as_u64().unwrap() as usize);
        let stop = if want.stop == qvc_model::engine::StopReason::StopToken {
            FinishReason::Stop
        } else {
            FinishReason::Length
        };
        assert_eq!(finish, stop, "{case}");
        assert_eq!(got.started().0, prompt.len());
    }
    assert!(engine.wait_idle(Duration::from_secs(10)));
    let m = engine.metrics();
    assert_eq!(m.success_stop + m.success_length, 3);
    assert_eq!((m.running, m.waiting, m.slots_used), (0, 0, 0));
    let text = engine.metrics_text();
    assert!(text.contains("qvc_e2e_request_latency_seconds_count 3"), "{text}");
    assert!(text.contains("qvc_vision_cache_misses_total 2"), "{text}");
}

/// Mixed picture/text prompts of several lengths, each with its own max_tokens.
fn mixed(m: &Model, dir: &std::path::Path, n: usize) -> Vec<GenRequest> {
    let exp = expected(dir);
    let cases = ["img1", "text", "ground", "img2"];
    (0..n)
        .map(|i| {
            let prompt = ids(&exp["chat"][cases[i % cases.len()]]["input_ids"]);
            let images = prompt_images(m, dir, &prompt);
            let mut r = GenRequest::greedy(prompt, images, 3 + (i * 5) % 11, vec![]);
            r.logprobs = Some(2);
            r
        })
        .collect()
}

#[test]
fn concurrent_greedy_requests_equal_each_alone() {
    let Some(dir) = fixtures() else { return };
    let m = Model::load(&dir, &LoadOptions::default()).unwrap();
    let reqs = mixed(&m, &dir, 16);
    let alone_engine = cpu_engine(&dir, cfg(1));
    let alone: Vec<Outcome> = reqs.iter().map(|r| run(&alone_engine, r.clone())).collect();
    // 10 slots for 16 requests: the rest queue, join the batch as others
    // leave, and prefill while others decode; a decode batch of more than
    // CPU_DECODE_GROUP (8) runs as two groups.
    const { assert!(qvc_serve::engine::CPU_DECODE_GROUP < 10) };
    let engine = cpu_engine(&dir, cfg(10));
    let rxs: Vec<mpsc::Receiver<Event>> = reqs.iter().map(|r| submit(&engine, r.clone())).collect();
    for (i, (rx, want)) in rxs.iter().zip(&alone).enumerate() {
        let got = collect(rx);
        let ((f1, u1, t1), (f2, u2, t2)) = (got.done(), want.done());
        assert_eq!((f1, u1.completion_tokens, t1), (f2, u2.completion_tokens, t2), "request {i}");
        assert_eq!(got.text(), want.text(), "request {i}");
        assert_eq!(got.logprob_bits(), want.logprob_bits(), "request {i}: logprobs differ from the request alone");
        assert_eq!(got.done().1.completion_tokens, reqs[i].max_tokens, "request {i}");
    }
    assert!(engine.wait_idle(Duration::from_secs(10)));
    // The fixture's widths are too narrow for the 16-row tile groups.
    assert_eq!(engine.decode_group(), Some(qvc_serve::engine::CPU_DECODE_GROUP));
    let c = engine.metrics();
    assert_eq!(c.success_length, 16);
    assert_eq!(c.slots_used, 0);
    assert_eq!(c.vision_misses, 4, "each of the 4 pictures is encoded once");
}

fn ground_turns(m: &Model, dir: &std::path::Path) -> (Vec<Message>, Vec<Message>) {
    let pic = image(m, dir, "grey.png", "grey.png");
    let first =
        vec![Message { role: Role::User, parts: vec![Part::Image(pic), Part::Text("Find the circle.".into())] }];
    let mut second = first.clone();
    second.push(Message::text(Role::Assistant, "<ref>the circle</ref><box>(310,246),(686,753)</box>"));
    second.push(Message::text(Role::User, "Is <ref>the circle</ref> white? 框出图中的黑色条。"));
    (first, second)
}

#[test]
fn the_next_turn_reuses_the_previous_turns_rows() {
    let Some(dir) = fixtures() else { return };
    let m = Model::load(&dir, &LoadOptions::default()).unwrap();
    let exp = expected(&dir);
    let (first, second) = ground_turns(&m, &dir);
    let chunk = 64;
    let c = EngineConfig { max_batch: 2, prefill_chunk: chunk, ..Default::default() };
    let engine = cpu_engine(&dir, c.clone());
    let stops = stop_ids(&m.tokenizer);
    let (p1, i1) = build_prompt(&m, &first).unwrap();
    let t1 = run(&engine, GenRequest::greedy(p1.clone(), i1, 6, stops.clone()));
    assert_eq!(t1.started(), (p1.len(), 0));
    let (p2, i2) = build_prompt(&m, &second).unwrap();
    assert_eq!(p2, ids(&exp["chat"]["ground"]["input_ids"]));
    // The client resends the picture without pixels: the engine has its features.
    assert!(engine.has_image(i2[0].key));
    let mut i2_cached = i2.clone();
    i2_cached[0].pixels = None;
    let t2 = run(&engine, GenRequest::greedy(p2.clone(), i2_cached, 8, stops.clone()));
    let (_, cached) = t2.started();
    assert!(cached >= 256 && cached % chunk == 0 && cached < p1.len(), "cached {cached} of {}", p1.len());
    assert_eq!(t2.done().1.cached_tokens, cached);
    let fresh = cpu_engine(&dir, c);
    let want = run(&fresh, GenRequest::greedy(p2, i2, 8, stops));
    assert_eq!(want.started().1, 0);
    assert_eq!(t2.done().2, want.done().2);
    assert_eq!(t2.done().0, want.done().0);
    let mc = engine.metrics();
    assert_eq!(mc.prefix_hit_tokens, cached as u64);
    assert_eq!((mc.vision_misses, mc.vision_hits), (1, 1));
}

#[test]
fn a_client_that_goes_away_frees_its_slot() {
    let Some(dir) = fixtures() else { return };
    let exp = expected(&dir);
    let engine = cpu_engine(&dir, cfg(1));
    let prompt = ids(&exp["chat"]["text"]["input_ids"]);
    for _ in 0..3 {
        let (tx, rx) = mpsc::channel();
        let mut n = 0;
        engine
            .submit(
                GenRequest::greedy(prompt.clone(), vec![], 40, vec![]),
                Box::new(move |ev| {
                    n += 1;
                    let _ = tx.send(ev);
                    n < 3 // Started, one delta, then gone
                }),
            )
            .unwrap();
        assert!(engine.wait_idle(Duration::from_secs(60)));
        let events: Vec<Event> = rx.try_iter().collect();
        assert_eq!(events.len(), 3, "{events:?}");
    }
    let c = engine.metrics();
    assert_eq!((c.cancelled, c.slots_used, c.running), (3, 0, 0));
    assert!(c.generation_tokens < 10, "cancelled requests stopped decoding: {}", c.generation_tokens);
    // The slot serves the next request.
    let ok = run(&engine, GenRequest::greedy(prompt, vec![], 2, vec![]));
    assert_eq!(ok.done().1.completion_tokens, 2);
}

#[test]
fn a_full_queue_refuses() {
    let Some(dir) = fixtures() else { return };
    let exp = expected(&dir);
    let engine = cpu_engine(&dir, EngineConfig { max_batch: 1, max_queue: 1, ..Default::default() });
    let prompt = ids(&exp["chat"]["text"]["input_ids"]);
    let long = submit(&engine, GenRequest::greedy(prompt.clone(), vec![], 60, vec![]));
    assert!(matches!(long.recv_timeout(Duration::from_secs(60)).unwrap(), Event::Started { .. }));
    let queued = submit(&engine, GenRequest::greedy(prompt.clone(), vec![], 1, vec![]));
    let err = engine.submit(GenRequest::greedy(prompt, vec![], 1, vec![]), Box::new(|_| true)).unwrap_err();
    assert_eq!(err, SubmitError::QueueFull { waiting: 1 });
    assert_eq!(engine.metrics().waiting, 1);
    collect(&long).done();
    collect(&queued).done();
}

#[test]
fn a_panic_in_one_request_fails_that_request_only() {
    let Some(dir) = fixtures() else { return };
    let exp = expected(&dir);
    let engine = cpu_engine(&dir, cfg(2));
    let prompt = ids(&exp["chat"]["text"]["input_ids"]);
    let (tx, rx) = mpsc::channel();
    let mut deltas = 0;
    engine
        .submit(
            GenRequest::greedy(prompt.clone(), vec![], 20, vec![]),
            Box::new(move |ev| {
                if matches!(ev, Event::Delta { .. }) {
                    deltas += 1;
                    if deltas == 2 {
                        panic!("a bug while streaming");
                    }
                }
                tx.send(ev).is_ok()
            }),
        )
        .unwrap();
    let other = submit(&engine, GenRequest::greedy(prompt.clone(), vec![], 5, vec![]));
    let events = collect(&rx).events;
    match events.last() {
        Some(Event::Error(why)) => assert!(why.contains("a bug while streaming"), "{why}"),
        e => panic!("expected an error event, got {e:?}"),
    }
    assert_eq!(collect(&other).done().1.completion_tokens, 5);
    assert!(engine.wait_idle(Duration::from_secs(30)));
    assert_eq!(engine.state(), EngineState::Ready);
    let c = engine.metrics();
    assert_eq!((c.failure, c.slots_used), (1, 0));
    // And the engine still serves.
    assert_eq!(run(&engine, GenRequest::greedy(prompt, vec![], 2, vec![])).done().1.completion_tokens, 2);
}

#[test]
fn invalid_requests_are_refused_with_reasons() {
    let Some(dir) = fixtures() else { return };
    let exp = expected(&dir);
    let m = Model::load(&dir, &LoadOptions::default()).unwrap();
    let engine = cpu_engine(&dir, EngineConfig { max_context: Some(300), ..cfg(1) });
    assert_eq!(engine.context_len(), Some(300));
    let text = ids(&exp["chat"]["text"]["input_ids"]);
    let img = ids(&exp["chat"]["img1"]["input_ids"]);
    let invalid = |r: GenRequest| match engine.submit(r, Box::new(|_| true)) {
        Err(e @ (SubmitError::Invalid(_) | SubmitError::ContextExceeded { .. })) => e.to_string(),
        other => panic!("expected Invalid or ContextExceeded, got {other:?}"),
    };
    assert!(invalid(GenRequest::greedy(vec![], vec![], 4, vec![])).contains("empty"));
    assert!(invalid(GenRequest::greedy(vec![1, 999_999], vec![], 4, vec![])).contains("999999"));
    let why = invalid(GenRequest::greedy(img.clone(), prompt_images(&m, &dir, &img), 20, vec![]));
    assert!(why.contains("288") && why.contains("20") && why.contains("300"), "{why}");
    assert!(why.contains("exceed the context") && why.contains("lower max_tokens to at most 12"), "{why}");
    // A prompt that alone fills or overflows the context: no max_tokens fits, so only shortening helps.
    for len in [300, 310] {
        let why = invalid(GenRequest::greedy(vec![1; len], vec![], 4, vec![]));
        assert!(why.contains(&format!("the prompt has {len} tokens")), "{why}");
        assert!(why.contains("exceed the context of 300 tokens"), "{why}");
        assert!(why.contains("shorten the conversation to fewer than 300 tokens"), "{why}");
        assert!(!why.contains("max_tokens to"), "{why}");
    }
    assert!(invalid(GenRequest::greedy(img.clone(), vec![], 4, vec![])).contains("1 picture(s) but 0"));
    assert!(invalid(GenRequest::greedy(text.clone(), vec![], 0, vec![])).contains("max_tokens"));
    let mut r = GenRequest::greedy(text.clone(), vec![], 4, vec![]);
    r.presence_penalty = 3.0;
    assert!(invalid(r).contains("presence_penalty"));
    let mut r = GenRequest::greedy(text.clone(), vec![], 4, vec![]);
    r.logprobs = Some(21);
    assert!(invalid(r).contains("20"));
    let mut r = GenRequest::greedy(text.clone(), vec![], 4, vec![]);
    r.sampling.top_p = 0.0;
    assert!(invalid(r).contains("top-p"));
    // Shutdown: no new requests, the engine drains.
    engine.shutdown();
    assert_eq!(engine.state(), EngineState::Draining);
    assert_eq!(
        engine.submit(GenRequest::greedy(text, vec![], 4, vec![]), Box::new(|_| true)),
        Err(SubmitError::ShuttingDown)
    );
    assert!(engine.wait_idle(Duration::from_secs(5)));
}

#[test]
fn not_ready_while_loading_and_after_a_failed_load() {
    let (go, wait) = mpsc::channel::<()>();
    let e = qvc_serve::Engine::start(
        cfg(1),
        Box::new(move |_| {
            let _ = wait.recv();
            anyhow::bail!("no such checkpoint")
        }),
    );
    assert_eq!(e.state(), EngineState::Loading);
    assert_eq!(
        e.submit(GenRequest::greedy(vec![1], vec![], 1, vec![]), Box::new(|_| true)),
        Err(SubmitError::NotReady)
    );
    go.send(()).unwrap();
    for _ in 0..500 {
        if matches!(e.state(), EngineState::Failed(_)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(e.state(), EngineState::Failed("no such checkpoint".into()));
    assert!(e.model().is_none());
    assert_eq!(
        e.submit(GenRequest::greedy(vec![1], vec![], 1, vec![]), Box::new(|_| true)),
        Err(SubmitError::NotReady)
    );
}

#[test]
fn stop_strings_penalties_and_sampling() {
    let Some(dir) = fixtures() else { return };
    let exp = expected(&dir);
    let engine = cpu_engine(&dir, cfg(2));
    let prompt = ids(&exp["chat"]["text"]["input_ids"]);
    let base = run(&engine, GenRequest::greedy(prompt.clone(), vec![], 12, vec![]));
    let full = base.done().2;
    // Cut at a stop string taken from the middle of the greedy answer.
    let cut = full.char_indices().nth(6).unwrap().0;
    let stop: String = full[cut..].chars().take(2).collect();
    let mut r = GenRequest::greedy(prompt.clone(), vec![], 12, vec![]);
    r.stop_strings = vec![stop.clone()];
    let o = run(&engine, r);
    let (finish, _, text) = o.done();
    assert_eq!(finish, FinishReason::Stop);
    assert_eq!(text, full[..full.find(&stop).unwrap()]);
    assert_eq!(o.text(), text);
    // A large frequency penalty changes a greedy answer that repeats nothing only if... it is applied:
    // with presence 2 the first token cannot come back at step 2.
    let mut r = GenRequest::greedy(prompt.clone(), vec![], 12, vec![]);
    r.presence_penalty = 2.0;
    r.frequency_penalty = 2.0;
    r.logprobs = Some(0);
    let o = run(&engine, r);
    let toks = o.logprob_bits();
    let distinct: std::collections::HashSet<_> = toks.iter().map(|t| t.0.clone()).collect();
    assert_eq!(distinct.len(), toks.len(), "penalised tokens repeated: {toks:?}");
    // Seeded sampling is reproducible.
    let sampled = |seed| {
        let mut r = GenRequest::greedy(prompt.clone(), vec![], 8, vec![]);
        r.sampling = SamplingParams { temperature: 1.0, top_p: 0.9, top_k: 0, repetition_penalty: 1.0, seed };
        run(&engine, r).done().2
    };
    assert_eq!(sampled(7), sampled(7));
}

#[test]
fn a_long_prefill_is_interleaved_with_running_decodes() {
    let Some(dir) = fixtures() else { return };
    let m = Model::load(&dir, &LoadOptions::default()).unwrap();
    let exp = expected(&dir);
    // 64-row chunks: img2's 553 tokens are 9 chunks (and two pictures to encode).
    let engine = cpu_engine(&dir, EngineConfig { max_batch: 2, prefill_chunk: 64, ..Default::default() });
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(char, bool)>::new()));
    let sink = |name: char| {
        let log = log.clone();
        Box::new(move |ev: Event| {
            log.lock().unwrap().push((name, matches!(ev, Event::Started { .. })));
            true
        }) as qvc_serve::Sink
    };
    let text = ids(&exp["chat"]["text"]["input_ids"]);
    engine.submit(GenRequest::greedy(text, vec![], 60, vec![]), sink('a')).unwrap();
    while log.lock().unwrap().is_empty() {
        std::thread::sleep(Duration::from_millis(1));
    }
    let img2 = ids(&exp["chat"]["img2"]["input_ids"]);
    let images = prompt_images(&m, &dir, &img2);
    let at_submit = log.lock().unwrap().len();
    engine.submit(GenRequest::greedy(img2, images, 2, vec![]), sink('b')).unwrap();
    assert!(engine.wait_idle(Duration::from_secs(120)));
    let log = log.lock().unwrap();
    let b_started = log.iter().position(|&(n, s)| n == 'b' && s).expect("b started");
    let a_during = log[at_submit..b_started].iter().filter(|(n, _)| *n == 'a').count();
    let a_total = log.iter().filter(|(n, _)| *n == 'a').count();
    // One decode step of a follows each of b's 11 pieces of prefill work (2
    // pictures, 9 chunks); without interleaving a would send nothing meanwhile.
    assert!(a_during >= 6 && a_during < a_total, "a sent {a_during} of {a_total} events during b's prefill");
}

#[test]
fn the_vision_cache_is_bounded_and_a_pictureless_request_needs_its_features() {
    let Some(dir) = fixtures() else { return };
    let m = Model::load(&dir, &LoadOptions::default()).unwrap();
    let engine = cpu_engine(&dir, EngineConfig { max_batch: 1, vision_cache: 1, ..Default::default() });
    let ask = |file: &str, pixels: bool| {
        let mut img = image(&m, &dir, file, file);
        if !pixels {
            img.pixels = None;
        }
        let msg = Message { role: Role::User, parts: vec![Part::Image(img), Part::Text("What is it?".into())] };
        let (prompt, images) = build_prompt(&m, &[msg]).unwrap();
        GenRequest::greedy(prompt, images, 2, vec![])
    };
    let grey = run(&engine, ask("grey.png", true)).done().2;
    assert_eq!(run(&engine, ask("grey.png", false)).done().2, grey, "features from the cache");
    run(&engine, ask("shapes.png", true)).done();
    assert!(!engine.has_image(image(&m, &dir, "grey.png", "grey.png").key), "evicted by the newer picture");
    match engine.submit(ask("grey.png", false), Box::new(|_| true)) {
        Err(SubmitError::NotCached { name }) => assert_eq!(name, "grey.png"),
        other => panic!("expected NotCached, got {other:?}"),
    }
    let c = engine.metrics();
    assert_eq!((c.vision_misses, c.vision_hits), (2, 1));
}
