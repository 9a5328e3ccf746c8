//! Grounding labels drawn with real fonts: the glyphs on the picture are the font's own
//! (compared with ab_glyph's rasterisation of the same string, not with a stored screenshot),
//! labels grow with the picture, stay inside it, fall back to placeholders with one note when no
//! font covers a character, and a bad `--font` is an error.
//!
//! The font files are the Debian packages `fonts-wqy-microhei` and `fonts-dejavu-core`; a test
//! that needs one and does not find it says so and returns, unless QVC_REQUIRE_CJK_FONT=1 (set
//! by CI, which installs them), where it fails.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ab_glyph::{point, Font, FontVec, PxScale, ScaleFont};
use qvc_model::grounding::{
    draw_groundings, label_text_px, line_width, parse_groundings, DrawError, DrawOptions, Drawing, PlacedLabel,
};
use qvc_model::image::RgbImage;

const WQY: &str = "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc";
const DEJAVU: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const GREY: [u8; 3] = [128, 128, 128];

fn font_file(path: &str) -> Option<PathBuf> {
    let p = PathBuf::from(path);
    if p.is_file() {
        return Some(p);
    }
    if std::env::var("QVC_REQUIRE_CJK_FONT").as_deref() == Ok("1") {
        panic!("{path} is missing and QVC_REQUIRE_CJK_FONT=1: install fonts-wqy-microhei and fonts-dejavu-core");
    }
    eprintln!("skipped: {path} is not installed (Debian: fonts-wqy-microhei / fonts-dejavu-core)");
    None
}

fn face(path: &Path) -> FontVec {
    FontVec::try_from_vec_and_index(std::fs::read(path).unwrap(), 0).unwrap()
}

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qvc-draw-labels-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn px(img: &RgbImage, x: i64, y: i64) -> [u8; 3] {
    let i = (y as usize * img.width as usize + x as usize) * 3;
    [img.data[i], img.data[i + 1], img.data[i + 2]]
}

fn draw(img: &RgbImage, text: &str, opts: &DrawOptions) -> Drawing {
    draw_groundings(img, &parse_groundings(text), opts).unwrap()
}

/// The text colour the drawing uses on a tag of colour `bg`.
fn text_colour(bg: [u8; 3]) -> [u8; 3] {
    let luma = 299 * bg[0] as u32 + 587 * bg[1] as u32 + 114 * bg[2] as u32;
    if luma > 150_000 {
        [0, 0, 0]
    } else {
        [255, 255, 255]
    }
}

/// Pixels of the tag where the text covers at least half the pixel: how far each pixel went
/// from the tag colour towards the text colour, on the channels where the two differ.
fn drawn_mask(img: &RgbImage, tag: &PlacedLabel) -> Vec<(i64, i64)> {
    let (bg, fg) = (tag.colour, text_colour(tag.colour));
    let [x0, y0, x1, y1] = tag.rect;
    let mut out = Vec::new();
    for y in y0..=y1 {
        for x in x0..=x1 {
            let p = px(img, x, y);
            let alpha = (0..3)
                .filter(|&k| (fg[k] as f32 - bg[k] as f32).abs() > 40.0)
                .map(|k| (p[k] as f32 - bg[k] as f32) / (fg[k] as f32 - bg[k] as f32))
                .fold(0.0f32, f32::max);
            if alpha >= 0.5 {
                out.push((x - x0, y - y0));
            }
        }
    }
    out
}

/// ab_glyph's own rasterisation of `runs` (each a string in one face) one after the other on a
/// baseline at y = 0 from x = 0, kerned within a face: the pixels with coverage >= 0.5.
fn expected_mask(runs: &[(&FontVec, &str)], size: f32) -> Vec<(i64, i64)> {
    let scale = PxScale::from(size);
    let mut cov: HashMap<(i64, i64), f32> = HashMap::new();
    let mut x = 0.0f32;
    for (font, text) in runs {
        let scaled = font.as_scaled(scale);
        let mut prev = None;
        for c in text.chars() {
            let id = font.glyph_id(c);
            assert_ne!(id.0, 0, "the test's font lacks {c:?}");
            if let Some(p) = prev {
                x += scaled.kern(p, id);
            }
            if let Some(og) = font.outline_glyph(id.with_scale_and_position(scale, point(x, 0.0))) {
                let b = og.px_bounds();
                og.draw(|gx, gy, c| {
                    *cov.entry((b.min.x as i64 + gx as i64, b.min.y as i64 + gy as i64)).or_default() += c;
                });
            }
            x += scaled.h_advance(id);
            prev = Some(id);
        }
    }
    cov.into_iter().filter(|&(_, c)| c.min(1.0) >= 0.5).map(|(p, _)| p).collect()
}

/// The best intersection-over-union of `expected`, shifted by whole pixels anywhere inside a
/// `w` x `h` tag, with `drawn`.
fn best_iou(drawn: &[(i64, i64)], expected: &[(i64, i64)], w: i64, h: i64) -> f64 {
    assert!(!drawn.is_empty() && !expected.is_empty());
    let drawn_set: std::collections::HashSet<_> = drawn.iter().copied().collect();
    let (ex0, ey0) = expected.iter().fold((i64::MAX, i64::MAX), |a, p| (a.0.min(p.0), a.1.min(p.1)));
    let (ex1, ey1) = expected.iter().fold((i64::MIN, i64::MIN), |a, p| (a.0.max(p.0), a.1.max(p.1)));
    let mut best = 0.0f64;
    for dy in -ey0..(h - ey1) {
        for dx in -ex0..(w - ex1) {
            let inter = expected.iter().filter(|&&(x, y)| drawn_set.contains(&(x + dx, y + dy))).count();
            let union = drawn.len() + expected.len() - inter;
            best = best.max(inter as f64 / union as f64);
        }
    }
    best
}

#[test]
fn a_chinese_label_is_drawn_with_the_fonts_glyphs() {
    let Some(wqy) = font_file(WQY) else { return };
    let font = face(&wqy);
    let img = RgbImage::new_filled(640, 480, GREY);
    let opts = DrawOptions { font: Some(wqy), ..Default::default() };
    let d = draw(&img, "<ref>文字 text</ref><box>(300,400),(700,800)</box>", &opts);
    assert!(d.notes.is_empty(), "{:?}", d.notes);
    assert_eq!(d.labels.len(), 1);
    let tag = &d.labels[0];
    assert_eq!(tag.text, "文字 text");
    assert_eq!(tag.text_px, label_text_px(640, 480));
    let (w, h) = (tag.rect[2] - tag.rect[0] + 1, tag.rect[3] - tag.rect[1] + 1);
    let drawn = drawn_mask(&d.image, tag);
    let iou = best_iou(&drawn, &expected_mask(&[(&font, "文字 text")], tag.text_px), w, h);
    eprintln!("文字 text in WenQuanYi at {} px: IoU {iou:.3}", tag.text_px);
    assert!(iou >= 0.95, "IoU {iou} against the font's rasterisation");
    // The comparison can tell glyphs apart: the same characters in another order do not match.
    let wrong = best_iou(&drawn, &expected_mask(&[(&font, "字文 text")], tag.text_px), w, h);
    eprintln!("against 字文 text: IoU {wrong:.3}");
    assert!(wrong < 0.8, "IoU {wrong} against a different string");
}

#[test]
fn a_latin_label_is_drawn_with_the_fonts_glyphs() {
    let Some(dejavu) = font_file(DEJAVU) else { return };
    let font = face(&dejavu);
    let img = RgbImage::new_filled(1000, 700, [20, 40, 60]);
    let opts = DrawOptions { font: Some(dejavu), ..Default::default() };
    let d = draw(&img, "<ref>Dog AVA 1</ref><box>(100,300),(500,900)</box>", &opts);
    let tag = &d.labels[0];
    let (w, h) = (tag.rect[2] - tag.rect[0] + 1, tag.rect[3] - tag.rect[1] + 1);
    let iou = best_iou(&drawn_mask(&d.image, tag), &expected_mask(&[(&font, "Dog AVA 1")], tag.text_px), w, h);
    eprintln!("Dog AVA 1 in DejaVu Sans at {} px: IoU {iou:.3}", tag.text_px);
    assert!(iou >= 0.95, "IoU {iou}");
}

#[test]
fn each_character_comes_from_a_font_that_has_it() {
    // DejaVu Sans is preferred but has no Chinese: the Chinese comes from WenQuanYi, the rest
    // from DejaVu, without a note.
    let (Some(wqy), Some(dejavu)) = (font_file(WQY), font_file(DEJAVU)) else { return };
    let dirs = tmp_dir("fallback");
    std::fs::copy(&wqy, dirs.join("wqy-microhei.ttc")).unwrap();
    std::fs::copy(&dejavu, dirs.join("DejaVuSans.ttf")).unwrap();
    let (cjk, latin) = (face(&wqy), face(&dejavu));
    let img = RgbImage::new_filled(800, 600, GREY);
    let opts = DrawOptions { font_dirs: Some(vec![dirs.clone()]), ..Default::default() };
    let d = draw(&img, "<ref>文字 text</ref><box>(300,400),(700,800)</box>", &opts);
    assert!(d.notes.is_empty(), "{:?}", d.notes);
    let tag = &d.labels[0];
    let (w, h) = (tag.rect[2] - tag.rect[0] + 1, tag.rect[3] - tag.rect[1] + 1);
    let drawn = drawn_mask(&d.image, tag);
    let mixed = best_iou(&drawn, &expected_mask(&[(&cjk, "文字"), (&latin, " text")], tag.text_px), w, h);
    eprintln!("文字 (WenQuanYi) + text (DejaVu): IoU {mixed:.3}");
    assert!(mixed >= 0.95, "IoU {mixed}");
    let all_cjk = best_iou(&drawn, &expected_mask(&[(&cjk, "文字 text")], tag.text_px), w, h);
    eprintln!("against all in WenQuanYi: IoU {all_cjk:.3}");
    assert!(all_cjk < mixed - 0.05, "the Latin letters are DejaVu's: {all_cjk} vs {mixed}");
    let _ = std::fs::remove_dir_all(dirs);
}

/// The thickness of the box outline crossing row `y` from `x` rightwards.
fn run_length(img: &RgbImage, x: i64, y: i64) -> i64 {
    let c = px(img, x, y);
    (x..img.width as i64).take_while(|&i| px(img, i, y) == c).count() as i64
}

#[test]
fn labels_and_lines_grow_with_the_picture() {
    let text = "<ref>the dog 狗</ref><box>(200,300),(800,900)</box>";
    let small = draw(&RgbImage::new_filled(300, 300, GREY), text, &DrawOptions::default());
    let big = draw(&RgbImage::new_filled(4000, 3000, GREY), text, &DrawOptions::default());
    let (s, b) = (&small.labels[0], &big.labels[0]);
    assert_eq!((s.text_px, b.text_px), (12.0, 100.0));
    let (sh, bh) = ((s.rect[3] - s.rect[1] + 1) as f64, (b.rect[3] - b.rect[1] + 1) as f64);
    let (sw, bw) = ((s.rect[2] - s.rect[0] + 1) as f64, (b.rect[2] - b.rect[0] + 1) as f64);
    // Same look: the tag takes about the same share of the picture's short side.
    assert!(bh / bw > 0.5 * sh / sw && bh / bw < 2.0 * sh / sw, "{sh}x{sw} vs {bh}x{bw}");
    assert!(bh / 3000.0 > 0.7 * sh / 300.0 && bh / 3000.0 < 1.3 * sh / 300.0, "{sh} vs {bh}");
    // Box lines: 2 px on the icon, 12 px on the photo (x = 200/1000 of the width).
    assert_eq!((line_width(300, 300), line_width(4000, 3000)), (2, 12));
    assert_eq!(run_length(&small.image, 60, 200), 2);
    assert_eq!(run_length(&big.image, 800, 2000), 12);
}

/// Checks the tags of `d` on a picture that was all `GREY`: inside the picture, not
/// overlapping, each with text, its 1-pixel frame plain tag colour (nothing cut off at the tag
/// edge), and no text pixel anywhere outside a tag.
fn assert_tags_inside(d: &Drawing, regions: usize) {
    let (w, h) = (d.image.width as i64, d.image.height as i64);
    assert_eq!(d.labels.len(), regions);
    for (i, t) in d.labels.iter().enumerate() {
        let [x0, y0, x1, y1] = t.rect;
        assert!(x0 >= 0 && y0 >= 0 && x1 < w && y1 < h && x0 < x1 && y0 < y1, "{t:?} outside {w}x{h}");
        for (x, y) in (x0..=x1).flat_map(|x| [(x, y0), (x, y1)]).chain((y0..=y1).flat_map(|y| [(x0, y), (x1, y)])) {
            assert_eq!(px(&d.image, x, y), t.colour, "{t:?}: text touches the tag edge at ({x}, {y})");
        }
        assert!(!drawn_mask(&d.image, t).is_empty(), "{t:?} has no text");
        for u in &d.labels[..i] {
            let apart = u.rect[2] < x0 || x1 < u.rect[0] || u.rect[3] < y0 || y1 < u.rect[1];
            assert!(apart, "{t:?} covers {u:?}");
        }
    }
    let colours: Vec<[u8; 3]> = d.labels.iter().map(|t| t.colour).collect();
    for y in 0..h {
        for x in 0..w {
            let p = px(&d.image, x, y);
            if p == GREY || colours.contains(&p) {
                continue;
            }
            let inside =
                d.labels.iter().any(|t| (t.rect[0]..=t.rect[2]).contains(&x) && (t.rect[1]..=t.rect[3]).contains(&y));
            assert!(inside, "text pixel {p:?} at ({x}, {y}) outside every tag");
        }
    }
}

#[test]
fn no_label_is_cut_by_the_border() {
    let text = "<ref>top left corner</ref><box>(0,0),(300,300)</box>\
                <ref>右上角 top right</ref><box>(850,0),(999,150)</box>\
                <ref>bottom right yg</ref><box>(800,850),(999,999)</box>\
                <ref>bottom left, a long label that is wider than the whole picture and must be shortened</ref><box>(0,900),(100,999)</box>\
                <ref>off the picture</ref><box>(-900,-900),(-100,-100)</box>\
                <ref>right of it</ref><box>(1200,400),(1500,600)</box>";
    let empty = tmp_dir("border-empty");
    let mut cases = vec![
        ("system fonts", DrawOptions::default()),
        ("no fonts", DrawOptions { font_dirs: Some(vec![empty.clone()]), ..Default::default() }),
    ];
    if let Some(wqy) = font_file(WQY) {
        cases.push(("wqy", DrawOptions { font: Some(wqy), ..Default::default() }));
    }
    for (what, opts) in &cases {
        for (w, h) in [(320, 240), (240, 320), (1600, 1200)] {
            let d = draw(&RgbImage::new_filled(w, h, GREY), text, opts);
            assert_tags_inside(&d, 6);
            let long = &d.labels[3];
            // Too wide for the picture: shortened, with an ellipsis (three dots in the bitmap
            // font); always on the small pictures.
            let full = "bottom left, a long label that is wider than the whole picture and must be shortened";
            if long.text != full {
                let stem = long.text.trim_end_matches(['…', '.']);
                assert!(long.text.len() > stem.len() && full.starts_with(stem), "{what}: {long:?}");
            }
            assert!(w > 1000 || long.text != full, "{what}: {long:?}");
        }
    }
    let _ = std::fs::remove_dir_all(empty);
}

#[test]
fn missing_fonts_give_placeholders_and_one_note() {
    let empty = tmp_dir("no-fonts");
    let img = RgbImage::new_filled(400, 300, GREY);
    let text = "<ref>文字 text</ref><box>(100,300),(500,900)</box><ref>更多 more</ref><box>(600,300),(900,900)</box>";
    let opts = DrawOptions { font_dirs: Some(vec![empty.clone()]), ..Default::default() };
    let d = draw(&img, text, &opts);
    assert_eq!(d.notes.len(), 1, "{:?}", d.notes);
    let note = &d.notes[0];
    assert!(note.contains("文字更多 (CJK)") && note.contains("fonts-noto-cjk"), "{note}");
    assert!(note.contains("bitmap") && note.contains("fonts-dejavu-core") && note.contains("--font"), "{note}");
    assert_tags_inside(&d, 2);
    // Placeholders are drawn in place of the two Chinese characters: ink in the tag's first
    // third, where they stand.
    for t in &d.labels {
        let third = (t.rect[2] - t.rect[0]) / 3;
        assert!(drawn_mask(&d.image, t).iter().filter(|p| p.0 < third).count() > 10, "{t:?}");
    }

    // With a Latin font only, the note names just the CJK characters and the CJK packages.
    if let Some(dejavu) = font_file(DEJAVU) {
        let dir = tmp_dir("latin-only");
        std::fs::copy(&dejavu, dir.join("DejaVuSans.ttf")).unwrap();
        let d = draw(&img, text, &DrawOptions { font_dirs: Some(vec![dir.clone()]), ..Default::default() });
        assert_eq!(d.notes.len(), 1, "{:?}", d.notes);
        assert!(d.notes[0].contains("文字更多 (CJK)") && d.notes[0].contains("fonts-wqy-microhei"), "{:?}", d.notes);
        assert!(!d.notes[0].contains("bitmap"), "{:?}", d.notes);
        // The same font as --font with nothing to fall back on says so too.
        let o = DrawOptions { font: Some(dejavu), font_dirs: Some(vec![empty.clone()]) };
        let d = draw(&img, text, &o);
        assert_eq!(d.notes.len(), 1);
        assert!(d.notes[0].contains("neither") && d.notes[0].contains("DejaVuSans.ttf"), "{:?}", d.notes);
        let _ = std::fs::remove_dir_all(dir);
    }
    let _ = std::fs::remove_dir_all(empty);
}

#[test]
fn a_bad_font_is_an_error() {
    let dir = tmp_dir("bad-font");
    let garbage = dir.join("garbage.ttf");
    std::fs::write(&garbage, (0..5000u32).map(|i| (i * 7919 % 251) as u8).collect::<Vec<_>>()).unwrap();
    let empty = dir.join("empty.ttf");
    std::fs::write(&empty, b"").unwrap();
    let ttc = dir.join("broken.ttc");
    std::fs::write(&ttc, b"ttcf\x00\x01\x00\x00\x00\x00\x00\x02\x00\x00\x00\x14\x00\x00\x00\x20").unwrap();
    let img = RgbImage::new_filled(64, 64, GREY);
    let items = parse_groundings("<ref>a</ref><box>(1,1),(500,500)</box>");
    for path in [dir.join("no-such-font.ttf"), garbage, empty, ttc, dir.clone()] {
        let opts = DrawOptions { font: Some(path.clone()), ..Default::default() };
        match draw_groundings(&img, &items, &opts) {
            Err(e @ DrawError::Font { .. }) => {
                let DrawError::Font { path: p, .. } = &e;
                assert_eq!(p, &path);
                assert!(e.to_string().contains(&*path.to_string_lossy()), "{e}");
            }
            Ok(_) => panic!("{} was accepted as a font", path.display()),
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn twenty_labels_on_a_photo() {
    // Many overlapping regions on a big picture: every tag inside, none covering another, and
    // the time it takes (printed, not asserted).
    let mut text = String::new();
    for i in 0..20 {
        let (x, y) = (40 * (i % 5) + 50, 45 * (i / 5) + 100);
        text.push_str(&format!("<ref>物体 object {i}</ref><box>({x},{y}),({},{})</box>", x + 300, y + 200));
    }
    let img = RgbImage::new_filled(4000, 3000, GREY);
    let start = std::time::Instant::now();
    let d = draw(&img, &text, &DrawOptions::default());
    eprintln!("4000x3000, 20 labels: {:.0} ms", start.elapsed().as_secs_f64() * 1e3);
    assert_tags_inside(&d, 20);
}
