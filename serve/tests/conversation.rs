//! `build_prompt` gives the fixture's reference prompt ids for its chat
//! conversations (pictures named as in the fixture), and names what is
//! wrong with a conversation it cannot build.

mod common;
use common::*;
use qvc_model::{LoadOptions, Model};
use qvc_serve::conversation::{build_prompt, ConversationError, Message, Part, Role};

fn user(parts: Vec<Part>) -> Message {
    Message { role: Role::User, parts }
}

#[test]
fn fixture_conversations_give_the_reference_ids() {
    let Some(dir) = fixtures() else { return };
    let exp = expected(&dir);
    let m = Model::load(&dir, &LoadOptions::default()).unwrap();
    let pic = |f: &str| Part::Image(image(&m, &dir, f, f));
    let text = |t: &str| Part::Text(t.into());
    let cases: Vec<(&str, Vec<Message>)> = vec![
        ("img1", vec![user(vec![pic("shapes.png"), text("What is in this picture?")])]),
        (
            "img2",
            vec![
                Message::text(Role::System, "You are a helpful assistant."),
                user(vec![pic("photo.jpg"), pic("icon_rgba.png"), text("What is different between the two pictures?")]),
            ],
        ),
        ("text", vec![Message::text(Role::User, "Write a haiku about the sea. 请用中文回答。")]),
        (
            "ground",
            vec![
                user(vec![pic("grey.png"), text("Find the circle.")]),
                Message::text(Role::Assistant, "<ref>the circle</ref><box>(310,246),(686,753)</box>"),
                Message::text(Role::User, "Is <ref>the circle</ref> white? 框出图中的黑色条。"),
            ],
        ),
    ];
    for (case, msgs) in cases {
        let (got, images) = build_prompt(&m, &msgs).unwrap();
        let want = ids(&exp["chat"][case]["input_ids"]);
        assert_eq!(got, want, "{case}");
        assert_eq!(got.len(), exp["chat"][case]["n_tokens"].as_u64().unwrap() as usize);
        let names: Vec<String> = images.iter().map(|i| i.name.clone()).collect();
        let spans: Vec<String> = exp["chat"][case]["image_spans"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["path"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(names, spans, "{case}");
    }
    // A content-derived name: the same picture gives the same ids every turn.
    let img = image(&m, &dir, "grey.png", "x");
    let named = qvc_serve::ImageInput { name: img.key.name(), ..img };
    let a = build_prompt(&m, &[user(vec![Part::Image(named.clone()), text("Hi")])]).unwrap().0;
    let b = build_prompt(
        &m,
        &[
            user(vec![Part::Image(named.clone()), text("Hi")]),
            Message::text(Role::Assistant, "Hello"),
            user(vec![text("More")]),
        ],
    )
    .unwrap()
    .0;
    assert_eq!(a[..a.len() - 3], b[..a.len() - 3]);
}

#[test]
fn malformed_conversations_are_named() {
    let Some(dir) = fixtures() else { return };
    let m = Model::load(&dir, &LoadOptions::default()).unwrap();
    let sys = |t: &str| Message::text(Role::System, t);
    let u = |t: &str| Message::text(Role::User, t);
    let a = |t: &str| Message::text(Role::Assistant, t);
    let err = |msgs: &[Message]| build_prompt(&m, msgs).unwrap_err();
    assert!(matches!(err(&[]), ConversationError::Empty));
    assert!(matches!(err(&[sys("s")]), ConversationError::LastNotUser { got: "system" }));
    assert!(matches!(err(&[u("q"), sys("s"), u("q")]), ConversationError::SystemNotFirst { index: 1 }));
    assert!(matches!(err(&[sys("a"), sys("b"), u("q")]), ConversationError::SystemNotFirst { index: 1 }));
    assert!(matches!(err(&[u("q"), a("r")]), ConversationError::LastNotUser { got: "assistant" }));
    assert!(matches!(err(&[a("r"), u("q")]), ConversationError::Order { index: 0, .. }));
    assert!(matches!(err(&[u("q"), u("q")]), ConversationError::Order { index: 1, expected: "assistant", .. }));
    let pic = image(&m, &dir, "grey.png", "grey.png");
    let with_pic = Message { role: Role::Assistant, parts: vec![Part::Image(pic.clone())] };
    assert!(matches!(err(&[u("q"), with_pic, u("q")]), ConversationError::ImageNotAllowed { index: 1, .. }));
    assert!(matches!(err(&[u("look <img>x.png</img>")]), ConversationError::ImageTags { .. }));
    let bad = qvc_serve::ImageInput { name: "a</img>b".into(), ..pic.clone() };
    assert!(matches!(err(&[user(vec![Part::Image(bad)])]), ConversationError::ImageName { .. }));
    let long = qvc_serve::ImageInput { name: "x".repeat(300), ..pic };
    let e = err(&[user(vec![Part::Image(long)])]);
    assert!(e.to_string().contains("256"), "{e}");
}
