//! `qvc draw` as a user runs it (the built binary, the fixture pictures, the fixture's `ground`
//! answer), and the same drawing path through `qvc generate --draw-boxes` and `qvc chat`'s
//! `/draw`: the regions printed in pixels are `to_pixels` of the parsed answer, the PNG has the
//! picture's size with the region's outline on it, nothing is ever overwritten without
//! `--force`, the input picture never, and bad input gives a clear error, never a panic.

mod common;
use qvc_model::grounding::{parse_groundings, to_pixels};
use qvc_model::image::{load_rgb, RgbImage};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn qvc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qvc")).args(args).stdin(Stdio::null()).output().unwrap()
}

/// Runs qvc with `input` on its stdin.
fn qvc_stdin(args: &[&str], input: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_qvc"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A fresh, empty temporary folder for one test.
fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qvc-draw-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn px(img: &RgbImage, x: i64, y: i64) -> [u8; 3] {
    let i = (y as usize * img.width as usize + x as usize) * 3;
    [img.data[i], img.data[i + 1], img.data[i + 2]]
}

/// A failure that is an error message, not a panic.
fn assert_clean_failure(o: &Output, needle: &str) {
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// The answer of the fixture's `ground` conversation (the assistant turn of its history) and
/// the picture it is about.
fn ground_answer(dir: &Path) -> (String, PathBuf) {
    let e = common::Expected::load(dir);
    let case = &e.json["chat"]["ground"];
    let answer = case["history"][0][1].as_str().unwrap().to_string();
    let picture = case["image_spans"][0]["path"].as_str().unwrap();
    (answer, dir.join(picture))
}

#[test]
fn draws_the_fixture_ground_answer_on_its_picture() {
    let Some(dir) = common::fixtures() else { return };
    let (answer, picture) = ground_answer(&dir);
    assert!(answer.contains("<box>"), "{answer}");
    let t = tmp("ground");
    let out = t.join("ground.png");
    let o = qvc(&["draw", "--image", s(&picture), "--text", &answer, "-o", s(&out), "--json"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(&text(&o.stdout)).unwrap();

    let orig = load_rgb(&picture).unwrap();
    let items = parse_groundings(&answer);
    assert_eq!(items.len(), 1);
    let want = to_pixels(&items[0].points_1000, orig.width, orig.height);
    assert_eq!(want, vec![(62, 36), (137, 112)]);
    let boxes = v["boxes"].as_array().unwrap();
    assert_eq!(boxes.len(), 1);
    let got: Vec<(i64, i64)> = serde_json::from_value(boxes[0]["box_px"].clone()).unwrap();
    assert_eq!(got, want);
    assert_eq!(boxes[0]["ref"], "the circle");
    assert_eq!(boxes[0]["shape"], "Box");
    assert_eq!(boxes[0]["box_1000"], serde_json::json!([[310, 246], [686, 753]]));
    assert_eq!((v["width"].as_u64(), v["height"].as_u64()), (Some(200), Some(150)));
    assert_eq!(v["output"], s(&out));

    let drawn = load_rgb(&out).unwrap();
    assert_eq!((drawn.width, drawn.height), (orig.width, orig.height));
    // The outline: one colour all along the left, right and bottom edges (the top edge may carry
    // the label tag), and not a grey (the picture is greyscale, so every original pixel is).
    let ((x0, y0), (x1, y1)) = (want[0], want[1]);
    let colour = px(&drawn, x0, y1);
    assert!(colour[0] != colour[1] || colour[1] != colour[2], "region colour {colour:?} is grey");
    for y in y0 + 4..=y1 {
        assert_eq!(px(&drawn, x0, y), colour, "left edge at y {y}");
        assert_eq!(px(&drawn, x1, y), colour, "right edge at y {y}");
    }
    for x in x0..=x1 {
        assert_eq!(px(&drawn, x, y1), colour, "bottom edge at x {x}");
    }
    // Inside the box, away from the edges and the label, the picture is untouched.
    for (x, y) in [(100, 74), (80, 100), (120, 60)] {
        assert_eq!(px(&drawn, x, y), px(&orig, x, y), "interior pixel ({x}, {y})");
    }

    // Without --json: one line per region, the format `qvc generate` prints.
    let out2 = t.join("ground-text.png");
    let o = qvc(&["draw", "-i", s(&picture), "--text", &answer, "-o", s(&out2)]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(
        text(&o.stdout).trim(),
        format!(
            "[box] \"the circle\" [(310, 246), (686, 753)] (of 1000) -> [(62, 36), (137, 112)] px in {}",
            picture.display()
        )
    );
    assert!(text(&o.stderr).contains("drew 1 region(s)"), "{}", text(&o.stderr));
    assert_eq!(std::fs::read(&out2).unwrap(), std::fs::read(&out).unwrap(), "same drawing both ways");
    let _ = std::fs::remove_dir_all(t);
}

#[test]
fn draws_quads_and_several_boxes_on_rgb_and_jpeg_pictures() {
    let Some(dir) = common::fixtures() else { return };
    let t = tmp("quads");
    let answer = "<ref>red rectangle 红色矩形</ref><box>(100,150),(400,500)</box>, <box>(600,600),(700,700)</box> \
                  and the text <ref>TEXT</ref><quad>(100,700),(800,720),(790,900),(95,880)</quad>";
    let items = parse_groundings(answer);
    assert_eq!(items.len(), 3);
    for pic in ["shapes.png", "photo.jpg"] {
        let picture = dir.join(pic);
        let orig = load_rgb(&picture).unwrap();
        let out = t.join(format!("{pic}.png"));
        let o = qvc(&["draw", "-i", s(&picture), "--text", answer, "-o", s(&out), "--json"]);
        assert!(o.status.success(), "{pic}: {}", text(&o.stderr));
        let v: serde_json::Value = serde_json::from_str(&text(&o.stdout)).unwrap();
        let boxes = v["boxes"].as_array().unwrap();
        assert_eq!(boxes.len(), 3);
        for (b, item) in boxes.iter().zip(&items) {
            let got: Vec<(i64, i64)> = serde_json::from_value(b["box_px"].clone()).unwrap();
            assert_eq!(got, to_pixels(&item.points_1000, orig.width, orig.height), "{pic}");
            assert_eq!(b["image"], s(&picture));
        }
        assert_eq!(boxes[1]["ref"], "red rectangle 红色矩形", "a <ref> labels the boxes that follow it");
        assert_eq!(boxes[2]["shape"], "Quad");
        let drawn = load_rgb(&out).unwrap();
        assert_eq!((drawn.width, drawn.height), (orig.width, orig.height));
        // The second box (same label, same colour as the first) and the quad's corners are drawn.
        let first = to_pixels(&items[0].points_1000, orig.width, orig.height);
        let second = to_pixels(&items[1].points_1000, orig.width, orig.height);
        let c = px(&drawn, first[0].0, first[1].1);
        assert_eq!(px(&drawn, second[0].0, second[1].1), c, "{pic}: one colour per label");
        assert_eq!(px(&drawn, second[1].0, (second[0].1 + second[1].1) / 2), c, "{pic}");
        let quad = to_pixels(&items[2].points_1000, orig.width, orig.height);
        let q = px(&drawn, quad[2].0, quad[2].1);
        assert_ne!(q, c, "{pic}: another label, another colour");
        for &(x, y) in &quad[1..] {
            assert_eq!(px(&drawn, x, y), q, "{pic}: quad corner ({x}, {y})");
        }
    }
    let _ = std::fs::remove_dir_all(t);
}

#[test]
fn never_overwrites_without_force_and_never_the_picture() {
    let Some(dir) = common::fixtures() else { return };
    let (answer, picture) = ground_answer(&dir);
    let t = tmp("force");
    let out = t.join("out.png");
    std::fs::write(&out, "mine").unwrap();
    let o = qvc(&["draw", "-i", s(&picture), "--text", &answer, "-o", s(&out)]);
    assert_clean_failure(&o, "already exists");
    assert!(text(&o.stderr).contains("--force"), "{}", text(&o.stderr));
    assert_eq!(std::fs::read(&out).unwrap(), b"mine", "not overwritten without --force");
    let o = qvc(&["draw", "-i", s(&picture), "--text", &answer, "-o", s(&out), "--force"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(load_rgb(&out).unwrap().width, 200, "--force replaced it with the drawing");
    // No temporary file is left beside it.
    let names: Vec<String> =
        std::fs::read_dir(&t).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, vec!["out.png".to_string()]);

    // The input picture is never the output, by any name, even with --force.
    let copy = t.join("grey.png");
    std::fs::copy(&picture, &copy).unwrap();
    let before = std::fs::read(&copy).unwrap();
    let link = t.join("link.png");
    std::os::unix::fs::symlink(&copy, &link).unwrap();
    let dotted = t.join(".").join("grey.png");
    for o in [&copy, &link, &dotted] {
        let r = qvc(&["draw", "-i", s(&copy), "--text", &answer, "-o", s(o), "--force"]);
        assert_clean_failure(&r, "is the input picture");
    }
    assert_eq!(std::fs::read(&copy).unwrap(), before);
    // The drawing is PNG: another extension is refused, and nothing is written.
    let jpg = t.join("out.jpg");
    let o = qvc(&["draw", "-i", s(&picture), "--text", &answer, "-o", s(&jpg)]);
    assert_clean_failure(&o, "ending in .png");
    assert!(!jpg.exists());
    let _ = std::fs::remove_dir_all(t);
}

#[test]
fn reads_the_text_from_a_file_or_stdin() {
    let Some(dir) = common::fixtures() else { return };
    let (answer, picture) = ground_answer(&dir);
    let t = tmp("stdin");
    let reference = t.join("ref.png");
    let o = qvc(&["draw", "-i", s(&picture), "--text", &answer, "-o", s(&reference)]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let line = text(&o.stdout);
    assert!(line.contains("[(62, 36), (137, 112)] px"), "{line}");

    let file = t.join("answer.txt");
    std::fs::write(&file, format!("The circle: {answer}\n")).unwrap();
    let out = t.join("file.png");
    let o = qvc(&["draw", "-i", s(&picture), "--text-file", s(&file), "-o", s(&out)]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), line);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&reference).unwrap());

    let out = t.join("stdin.png");
    let o = qvc_stdin(&["draw", "-i", s(&picture), "-o", s(&out)], &answer);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), line);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&reference).unwrap());

    let out = t.join("dash.png");
    let o = qvc_stdin(&["draw", "-i", s(&picture), "--text-file", "-", "-o", s(&out)], &answer);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), line);

    let o = qvc(&["draw", "-i", s(&picture), "--text-file", s(&t.join("none.txt")), "-o", s(&t.join("n.png"))]);
    assert_clean_failure(&o, "none.txt");
    let _ = std::fs::remove_dir_all(t);
}

#[test]
fn bad_input_gives_clear_errors_and_writes_nothing() {
    let Some(dir) = common::fixtures() else { return };
    let (answer, picture) = ground_answer(&dir);
    let t = tmp("errors");
    let out = t.join("out.png");
    // Text without a region.
    for plain in ["The circle is in the middle.", "<ref>the circle</ref> <box>(1,2)</box>", ""] {
        let o = qvc(&["draw", "-i", s(&picture), "--text", plain, "-o", s(&out)]);
        assert_clean_failure(&o, "no <box> or <quad> found in the text");
        assert!(!out.exists());
    }
    let o = qvc_stdin(&["draw", "-i", s(&picture), "-o", s(&out)], "nothing here");
    assert_clean_failure(&o, "no <box> or <quad>");
    // A picture that is missing, or not a picture.
    let o = qvc(&["draw", "-i", "/no/such/picture.png", "--text", &answer, "-o", s(&out)]);
    assert_clean_failure(&o, "/no/such/picture.png");
    let o = qvc_stdin(&["draw", "-i", "/no/such/picture.png", "-o", s(&out)], "");
    assert_clean_failure(&o, "/no/such/picture.png"); // before the text is read
    let notpic = t.join("notes.png");
    std::fs::write(&notpic, "not a picture").unwrap();
    let o = qvc(&["draw", "-i", s(&notpic), "--text", &answer, "-o", s(&out)]);
    assert_clean_failure(&o, "notes.png");
    // A font that does not exist.
    let o = qvc(&["draw", "-i", s(&picture), "--text", &answer, "-o", s(&out), "--font", "/nonexistent"]);
    assert_clean_failure(&o, "--font /nonexistent");
    let o = qvc(&["draw", "-i", s(&picture), "--text", &answer, "-o", s(&out), "--font", s(&notpic)]);
    assert_clean_failure(&o, "cannot use font");
    // An output folder that does not exist.
    let o = qvc(&["draw", "-i", s(&picture), "--text", &answer, "-o", s(&t.join("no/such/dir/out.png"))]);
    assert_clean_failure(&o, "out.png");
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(&t).unwrap().count(), 1, "only notes.png: no temporary file left");
    // The output is required.
    let o = qvc(&["draw", "-i", s(&picture), "--text", &answer]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("--output"), "{}", text(&o.stderr));
    let _ = std::fs::remove_dir_all(t);
}

#[test]
fn a_named_font_is_used_when_installed() {
    let Some(dir) = common::fixtures() else { return };
    let font = Path::new("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf");
    if !font.is_file() {
        eprintln!("skipped: {} not installed", font.display());
        return;
    }
    let (answer, picture) = ground_answer(&dir);
    let t = tmp("font");
    let out = t.join("out.png");
    let o = qvc(&["draw", "-i", s(&picture), "--text", &answer, "-o", s(&out), "--font", s(font)]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(load_rgb(&out).unwrap().height, 150);
    let _ = std::fs::remove_dir_all(t);
}

#[test]
fn generate_and_chat_draw_through_the_same_checks() {
    let Some(dir) = common::fixtures() else { return };
    let d = s(&dir);
    let t = tmp("generate");
    let picture = dir.join("grey.png");
    // The output, the picture and the font are checked before the model loads (/nope would fail).
    let existing = t.join("exists.png");
    std::fs::write(&existing, "mine").unwrap();
    let base = ["generate", "--model", "/nope", "--image", s(&picture), "--prompt", "Find the circle."];
    let o = qvc(&[&base[..], &["--draw-boxes", s(&existing)]].concat());
    assert_clean_failure(&o, "already exists");
    let o = qvc(&[&base[..], &["--draw-boxes", s(&picture), "--force"]].concat());
    assert_clean_failure(&o, "is the input picture");
    let o = qvc(&[&base[..], &["--draw-boxes", s(&t.join("o.png")), "--font", "/nonexistent"]].concat());
    assert_clean_failure(&o, "--font /nonexistent");
    let o = qvc(&[&base[..], &["--draw-boxes", s(&t.join("o.png")), "--font", s(&existing)]].concat());
    assert_clean_failure(&o, "cannot use font");
    let o = qvc(&[&base[..], &["--draw-boxes", s(&t.join("o.jpg"))]].concat());
    assert_clean_failure(&o, "ending in .png");
    // --font is for --draw-boxes.
    let o = qvc(&[&base[..], &["--font", "/usr/share/fonts"]].concat());
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("--draw-boxes"), "{}", text(&o.stderr));
    assert_eq!(std::fs::read(&existing).unwrap(), b"mine");

    // The random fixture model writes no box: the answer is printed and nothing is drawn.
    let out = t.join("drawn.png");
    let args = [
        "generate",
        "--model",
        d,
        "--image",
        s(&picture),
        "--prompt",
        "Find the circle.",
        "--temperature",
        "0",
        "--max-new-tokens",
        "4",
        "--draw-boxes",
        s(&out),
    ];
    let o = qvc(&args);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("the answer has no <box> or <quad>; nothing drawn"), "{}", text(&o.stderr));
    assert!(!out.exists());
    // A prompt without a picture is refused before generating.
    let o = qvc(&["generate", "--model", d, "--prompt", "hi", "--draw-boxes", s(&out)]);
    assert_clean_failure(&o, "no picture to draw on");

    // chat: /draw before any answer, after an answer without regions, and with a bad name.
    let script = format!("/draw {0}\nFind the circle.\n/draw\n/draw {1}\n/draw {0}\n/quit\n", s(&out), s(&picture));
    let o = qvc_stdin(
        &["chat", "--model", d, "--image", s(&picture), "--temperature", "0", "--max-new-tokens", "3"],
        &script,
    );
    let err = text(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("/draw OUT.png"), "the commands are listed: {err}");
    assert!(err.contains("nothing to draw yet"), "{err}");
    assert!(err.contains("/draw needs a file name"), "{err}");
    assert!(err.contains("the last answer has no <box> or <quad>"), "{err}");
    assert!(!out.exists());
    let o = qvc(&["chat", "--model", d, "--font", "/nonexistent"]);
    assert_clean_failure(&o, "--font /nonexistent");
    let _ = std::fs::remove_dir_all(t);
}

#[test]
fn a_terminal_on_stdin_is_refused_instead_of_waited_on() {
    let Some(dir) = common::fixtures() else { return };
    // util-linux `script` runs the command on a pseudo-terminal.
    if Command::new("script").arg("--version").output().map_or(true, |o| !o.status.success()) {
        eprintln!("skipped: no `script` (util-linux) to give qvc a terminal");
        return;
    }
    let t = tmp("tty");
    let out = t.join("out.png");
    let cmd = format!("'{}' draw -i '{}' -o '{}'", env!("CARGO_BIN_EXE_qvc"), s(&dir.join("grey.png")), s(&out));
    let o = Command::new("script").args(["-qec", &cmd, "/dev/null"]).stdin(Stdio::null()).output().unwrap();
    let all = text(&o.stdout) + &text(&o.stderr);
    assert!(!o.status.success(), "{all}");
    assert!(all.contains("no text to draw") && all.contains("pipe it on stdin"), "{all}");
    assert!(!out.exists());
    let _ = std::fs::remove_dir_all(t);
}
