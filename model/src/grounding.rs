//! Grounding: the boxes and quads Qwen-VL writes in its text, converted to pixels and drawn.
//!
//! The model reads and writes regions as `<ref>the dog</ref><box>(x1,y1),(x2,y2)</box>` with
//! integer coordinates normalised to [0, 1000) of the image width and height; one `<ref>` may be
//! followed by several `<box>`, and `<quad>(x1,y1),(x2,y2),(x3,y3),(x4,y4)</quad>` holds the four
//! corners of a text line (QWEN-VL.md §8). Users want those regions back in pixels of the
//! picture they gave, and the picture with the regions and their labels drawn on it:
//!
//! * [`parse_groundings`] extracts every well-formed box and quad, with its label; anything
//!   malformed is skipped (model output is arbitrary text, so this never fails or panics).
//! * [`to_pixels`] converts to pixels exactly as the reference does: `int(v / 1000 * W)`.
//! * [`draw_groundings`] draws box outlines, quad polygons and a filled label tag with the text
//!   in an embedded 5x7 bitmap font (no font files, no extra dependency), clipped to the image.

#[path = "font.rs"]
mod font;

use crate::image::RgbImage;

/// The kind of region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Shape {
    /// Axis-aligned box: two corners.
    Box,
    /// Quadrilateral (text line): four corners in order.
    Quad,
}

/// One region the model produced.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Grounding {
    /// Text of the preceding `<ref>`, trimmed; `None` for a region with no reference.
    pub label: Option<String>,
    /// Box or quad.
    pub shape: Shape,
    /// Corners in the model's [0, 1000) coordinates, (x, y): 2 for a box, 4 for a quad.
    pub points_1000: Vec<(i64, i64)>,
}

const REF_OPEN: &str = "<ref>";
const REF_CLOSE: &str = "</ref>";
const BOX_OPEN: &str = "<box>";
const BOX_CLOSE: &str = "</box>";
const QUAD_OPEN: &str = "<quad>";
const QUAD_CLOSE: &str = "</quad>";

/// Text between regions that keeps the current `<ref>` label alive (`<ref>a</ref><box>..</box>,
/// <box>..</box>` labels both boxes); any other text ends it.
fn is_separator(text: &str) -> bool {
    text.chars().all(|c| c.is_whitespace() || matches!(c, ',' | ';' | '，' | '、' | '；'))
}

/// Extracts all regions from decoded model text, in order of appearance.
///
/// `<ref>L</ref>` labels every `<box>`/`<quad>` that follows it until other text (anything but
/// whitespace and commas) intervenes or another `<ref>` starts. A region with no preceding
/// `<ref>` has label `None`. Malformed spans (unclosed tags, wrong number of points,
/// non-integers, a tag nested in a label) are skipped; this never panics.
pub fn parse_groundings(text: &str) -> Vec<Grounding> {
    let mut out = Vec::new();
    let mut label: Option<String> = None;
    let mut pos = 0;
    while pos < text.len() {
        let rest = &text[pos..];
        // The next opening tag of interest.
        let next = [REF_OPEN, BOX_OPEN, QUAD_OPEN]
            .iter()
            .filter_map(|t| rest.find(t).map(|i| (i, *t)))
            .min_by_key(|&(i, _)| i);
        let Some((at, tag)) = next else { break };
        if !is_separator(&rest[..at]) {
            label = None;
        }
        let body_start = pos + at + tag.len();
        let body_rest = &text[body_start..];
        let close = match tag {
            REF_OPEN => REF_CLOSE,
            BOX_OPEN => BOX_CLOSE,
            _ => QUAD_CLOSE,
        };
        let Some(end) = body_rest.find(close) else {
            // Unclosed: skip the opening tag, keep scanning after it.
            label = None;
            pos = body_start;
            continue;
        };
        let body = &body_rest[..end];
        if [REF_OPEN, BOX_OPEN, QUAD_OPEN, REF_CLOSE, BOX_CLOSE, QUAD_CLOSE].iter().any(|t| body.contains(t)) {
            // A tag inside the span: this opening tag is stray; rescan from inside it.
            label = None;
            pos = body_start;
            continue;
        }
        pos = body_start + end + close.len();
        match tag {
            REF_OPEN => {
                let l = body.trim();
                label = (!l.is_empty()).then(|| l.to_string());
            }
            BOX_OPEN => {
                if let Some(points) = parse_points(body).filter(|p| p.len() == 2) {
                    out.push(Grounding { label: label.clone(), shape: Shape::Box, points_1000: points });
                }
            }
            _ => {
                if let Some(points) = parse_points(body).filter(|p| p.len() == 4) {
                    out.push(Grounding { label: label.clone(), shape: Shape::Quad, points_1000: points });
                }
            }
        }
    }
    out
}

/// Parses `(x,y),(x,y),...` (spaces allowed anywhere between tokens); `None` if malformed.
fn parse_points(s: &str) -> Option<Vec<(i64, i64)>> {
    let mut points = Vec::new();
    let mut rest = s.trim();
    loop {
        rest = rest.strip_prefix('(')?;
        let (x, r) = parse_int(rest)?;
        let r = r.trim_start().strip_prefix(',')?;
        let (y, r) = parse_int(r)?;
        rest = r.trim_start().strip_prefix(')')?.trim_start();
        points.push((x, y));
        if rest.is_empty() {
            return Some(points);
        }
        rest = rest.strip_prefix(',')?.trim_start();
    }
}

fn parse_int(s: &str) -> Option<(i64, &str)> {
    let s = s.trim_start();
    let sign_len = usize::from(s.starts_with(['-', '+']));
    let digits = s[sign_len..].find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len() - sign_len);
    if digits == 0 {
        return None;
    }
    let n = s[..sign_len + digits].parse().ok()?;
    Some((n, &s[sign_len + digits..]))
}

/// Converts [0, 1000) coordinates to pixels of a `width` x `height` image as the reference
/// does: `int(v / 1000 * W)` (float, then truncation toward zero) for x, likewise with H for y.
pub fn to_pixels(points_1000: &[(i64, i64)], width: u32, height: u32) -> Vec<(i64, i64)> {
    let conv = |v: i64, size: u32| (v as f64 / 1000.0 * size as f64) as i64;
    points_1000.iter().map(|&(x, y)| (conv(x, width), conv(y, height))).collect()
}

/// One region as `qvc generate --json` prints it and `qvc serve` returns it in a choice's `boxes`.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct BoxOut {
    /// The region's `<ref>` label, if any.
    #[serde(rename = "ref")]
    pub label: Option<String>,
    pub shape: Shape,
    /// Corners in the model's [0, 1000) coordinates.
    pub box_1000: Vec<(i64, i64)>,
    /// Corners in pixels of the picture, when there is one.
    pub box_px: Option<Vec<(i64, i64)>>,
    /// The name (path) of that picture as written in the prompt.
    pub image: Option<String>,
}

/// The regions of `items` as reported: in pixels of `image` (its name, width and height) when the
/// prompt has a picture (the reference draws on the latest picture of the conversation).
pub fn box_outputs(items: &[Grounding], image: Option<(&str, u32, u32)>) -> Vec<BoxOut> {
    items
        .iter()
        .map(|g| BoxOut {
            label: g.label.clone(),
            shape: g.shape,
            box_1000: g.points_1000.clone(),
            box_px: image.map(|(_, w, h)| to_pixels(&g.points_1000, w, h)),
            image: image.map(|(name, _, _)| name.to_string()),
        })
        .collect()
}

/// How to draw: the font for labels.
#[derive(Clone, Debug, Default)]
pub struct DrawOptions {
    /// A TrueType/OpenType font file for the labels (`--font FILE`); `None` picks an installed
    /// font that covers each label's characters.
    pub font: Option<std::path::PathBuf>,
}

/// A picture with the regions drawn, and what the user should hear about it (said once per
/// drawing, e.g. that no installed font covers some characters and which package would).
#[derive(Clone, Debug, PartialEq)]
pub struct Drawing {
    pub image: RgbImage,
    pub notes: Vec<String>,
}

/// Why a drawing could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DrawError {
    /// The font given with `--font` cannot be used.
    #[error("cannot use font {path}: {reason}; give a TrueType/OpenType file (.ttf, .otf, .ttc) or leave out --font")]
    Font { path: std::path::PathBuf, reason: String },
}

/// Colours for labels, in order of first appearance (Trubetskoy's distinct colours).
const PALETTE: [[u8; 3]; 12] = [
    [230, 25, 75],
    [60, 180, 75],
    [0, 130, 200],
    [245, 130, 48],
    [145, 30, 180],
    [70, 240, 240],
    [240, 50, 230],
    [210, 245, 60],
    [255, 225, 25],
    [0, 128, 128],
    [170, 110, 40],
    [250, 190, 212],
];

/// Pixel writer that clips everything to the image.
struct Canvas {
    img: RgbImage,
}

impl Canvas {
    fn put(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && x < self.img.width as i64 && y < self.img.height as i64 {
            let i = (y as usize * self.img.width as usize + x as usize) * 3;
            self.img.data[i..i + 3].copy_from_slice(&c);
        }
    }

    /// Fills the inclusive rectangle [x0, x1] x [y0, y1], clipped.
    fn fill_rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: [u8; 3]) {
        let (w, h) = (self.img.width as i64, self.img.height as i64);
        let (x0, x1) = (x0.max(0), x1.min(w - 1));
        let (y0, y1) = (y0.max(0), y1.min(h - 1));
        for y in y0..=y1 {
            for x in x0..=x1 {
                self.put(x, y, c);
            }
        }
    }

    /// A line `t` pixels thick (square brush), clipped first so huge coordinates cost nothing.
    fn thick_line(&mut self, a: (i64, i64), b: (i64, i64), t: i64, c: [u8; 3]) {
        let m = t as f64 + 1.0;
        let bounds = (-m, -m, self.img.width as f64 + m, self.img.height as f64 + m);
        let Some(((x0, y0), (x1, y1))) = clip_segment((a.0 as f64, a.1 as f64), (b.0 as f64, b.1 as f64), bounds)
        else {
            return;
        };
        let (mut x, mut y) = (x0.round() as i64, y0.round() as i64);
        let (x1, y1) = (x1.round() as i64, y1.round() as i64);
        let (dx, dy) = ((x1 - x).abs(), -(y1 - y).abs());
        let (sx, sy) = (if x < x1 { 1 } else { -1 }, if y < y1 { 1 } else { -1 });
        let mut err = dx + dy;
        let lo = -(t - 1) / 2;
        loop {
            self.fill_rect(x + lo, y + lo, x + lo + t - 1, y + lo + t - 1, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }
}

/// Liang-Barsky clipping of segment a-b to the rectangle (xmin, ymin, xmax, ymax).
type Pt = (f64, f64);
fn clip_segment(a: Pt, b: Pt, (xmin, ymin, xmax, ymax): (f64, f64, f64, f64)) -> Option<(Pt, Pt)> {
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let (mut t0, mut t1) = (0.0f64, 1.0f64);
    for (p, q) in [(-dx, a.0 - xmin), (dx, xmax - a.0), (-dy, a.1 - ymin), (dy, ymax - a.1)] {
        if p == 0.0 {
            if q < 0.0 {
                return None;
            }
        } else {
            let r = q / p;
            if p < 0.0 {
                t0 = t0.max(r);
            } else {
                t1 = t1.min(r);
            }
        }
    }
    if t0 > t1 || !t0.is_finite() || !t1.is_finite() {
        return None;
    }
    Some(((a.0 + t0 * dx, a.1 + t0 * dy), (a.0 + t1 * dx, a.1 + t1 * dy)))
}

/// Draws `items` on a copy of `img`: box outlines (2 px thick, 3 px on images at least 400 px
/// on their short side), quad outlines, and each label above its region (below the top edge
/// when there is no room above) as text on a filled tag of the region's colour. Each distinct
/// label gets its own colour; unlabelled regions get one each. Characters outside printable
/// ASCII are drawn as a placeholder box. Everything is clipped to the image; coordinates may be
/// anywhere.
pub fn draw_groundings(img: &RgbImage, items: &[Grounding], opts: &DrawOptions) -> Result<Drawing, DrawError> {
    let _ = &opts.font;
    let notes = Vec::new();
    let (w, h) = (img.width, img.height);
    if w == 0 || h == 0 || img.data.len() != w as usize * h as usize * 3 {
        return Ok(Drawing { image: img.clone(), notes });
    }
    let mut canvas = Canvas { img: img.clone() };
    let short = w.min(h);
    let t: i64 = if short >= 400 { 3 } else { 2 };
    let scale: i64 = if short >= 800 { 2 } else { 1 };

    let mut keys: Vec<Option<&str>> = Vec::new();
    for item in items {
        let colour = match item.label.as_deref() {
            Some(l) => {
                let idx = keys.iter().position(|k| *k == Some(l)).unwrap_or_else(|| {
                    keys.push(Some(l));
                    keys.len() - 1
                });
                PALETTE[idx % PALETTE.len()]
            }
            None => {
                keys.push(None);
                PALETTE[(keys.len() - 1) % PALETTE.len()]
            }
        };
        let pts = to_pixels(&item.points_1000, w, h);
        if pts.is_empty() {
            continue;
        }
        let (xmin, ymin) = pts.iter().fold((i64::MAX, i64::MAX), |(a, b), p| (a.min(p.0), b.min(p.1)));
        let (xmax, ymax) = pts.iter().fold((i64::MIN, i64::MIN), |(a, b), p| (a.max(p.0), b.max(p.1)));
        match item.shape {
            Shape::Box => {
                // Drawn inward from the corners, like PIL's rectangle(width=t).
                let (x0, y0, x1, y1) = (xmin, ymin, xmax, ymax);
                canvas.fill_rect(x0, y0, x1, y0.saturating_add(t - 1), colour);
                canvas.fill_rect(x0, y1.saturating_sub(t - 1), x1, y1, colour);
                canvas.fill_rect(x0, y0, x0.saturating_add(t - 1), y1, colour);
                canvas.fill_rect(x1.saturating_sub(t - 1), y0, x1, y1, colour);
            }
            Shape::Quad => {
                for i in 0..pts.len() {
                    canvas.thick_line(pts[i], pts[(i + 1) % pts.len()], t, colour);
                }
            }
        }
        if let Some(label) = item.label.as_deref().filter(|l| !l.is_empty()) {
            draw_label(&mut canvas, label, xmin, ymin, t, scale, colour);
        }
    }
    Ok(Drawing { image: canvas.img, notes })
}

/// A filled tag with `label` in it, just above (x, y), moved inside the image when it would
/// fall outside.
fn draw_label(canvas: &mut Canvas, label: &str, x: i64, y: i64, t: i64, s: i64, bg: [u8; 3]) {
    let (w, h) = (canvas.img.width as i64, canvas.img.height as i64);
    let pad = s + 1;
    let advance = (font::GLYPH_W as i64 + 1) * s;
    // Only as many characters as can be visible.
    let max_chars = (w / advance + 1).max(1) as usize;
    let chars: Vec<char> = label.chars().take(max_chars).collect();
    let tag_w = chars.len() as i64 * advance - s + 2 * pad;
    let tag_h = font::GLYPH_H as i64 * s + 2 * pad;
    let mut top = y.saturating_sub(tag_h);
    if top < 0 {
        top = y.saturating_add(t); // inside the box, under its top edge
    }
    let top = top.min(h - tag_h).max(0);
    let left = x.min(w - tag_w).max(0);
    canvas.fill_rect(left, top, left + tag_w - 1, top + tag_h - 1, bg);
    let luma = 299 * bg[0] as u32 + 587 * bg[1] as u32 + 114 * bg[2] as u32;
    let fg = if luma > 150_000 { [0, 0, 0] } else { [255, 255, 255] };
    for (i, ch) in chars.iter().enumerate() {
        let gx = left + pad + i as i64 * advance;
        let gy = top + pad;
        match font::glyph(*ch) {
            Some(g) => {
                for row in 0..font::GLYPH_H {
                    for col in 0..font::GLYPH_W {
                        if font::is_set(g, col, row) {
                            let (px, py) = (gx + col as i64 * s, gy + row as i64 * s);
                            canvas.fill_rect(px, py, px + s - 1, py + s - 1, fg);
                        }
                    }
                }
            }
            None => {
                // Placeholder: the outline of the glyph cell.
                let (x1, y1) = (gx + font::GLYPH_W as i64 * s - 1, gy + font::GLYPH_H as i64 * s - 1);
                canvas.fill_rect(gx, gy, x1, gy + s - 1, fg);
                canvas.fill_rect(gx, y1 - s + 1, x1, y1, fg);
                canvas.fill_rect(gx, gy, gx + s - 1, y1, fg);
                canvas.fill_rect(x1 - s + 1, gy, x1, y1, fg);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(label: Option<&str>, pts: &[(i64, i64)]) -> Grounding {
        Grounding {
            label: label.map(str::to_string),
            shape: if pts.len() == 4 { Shape::Quad } else { Shape::Box },
            points_1000: pts.to_vec(),
        }
    }

    #[test]
    fn box_outputs_in_pixels_of_the_picture() {
        let items = parse_groundings("<ref>dog</ref><box>(100,200),(500,1000)</box>");
        let out = box_outputs(&items, Some(("image-1", 640, 480)));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].box_px, Some(vec![(64, 96), (320, 480)]));
        assert_eq!(out[0].image.as_deref(), Some("image-1"));
        let v = serde_json::to_value(&out[0]).unwrap();
        assert_eq!(v["ref"], "dog");
        assert_eq!(v["shape"], "Box");
        assert_eq!(v["box_1000"], serde_json::json!([[100, 200], [500, 1000]]));
        let none = box_outputs(&items, None);
        assert_eq!((none[0].box_px.clone(), none[0].image.clone()), (None, None));
    }

    #[test]
    fn parses_several_boxes_per_ref() {
        let t = "Here: <ref>the dog</ref><box>(10,20),(300,400)</box><box>(500, 600),(700,800)</box> \
                 and <ref> a cat </ref><box>(1,2),(3,4)</box>, <box>(5,6),(7,8)</box> done <box>(0,0),(999,999)</box>";
        let g = parse_groundings(t);
        assert_eq!(
            g,
            vec![
                b(Some("the dog"), &[(10, 20), (300, 400)]),
                b(Some("the dog"), &[(500, 600), (700, 800)]),
                b(Some("a cat"), &[(1, 2), (3, 4)]),
                b(Some("a cat"), &[(5, 6), (7, 8)]),
                b(None, &[(0, 0), (999, 999)]),
            ]
        );
    }

    #[test]
    fn parses_quads_and_unlabelled() {
        let g = parse_groundings("<box>(1,1),(2,2)</box><ref>STOP</ref><quad>(10,10),(90,12),(88,40),(9,38)</quad>");
        assert_eq!(g, vec![b(None, &[(1, 1), (2, 2)]), b(Some("STOP"), &[(10, 10), (90, 12), (88, 40), (9, 38)]),]);
        assert_eq!(g[1].shape, Shape::Quad);
    }

    #[test]
    fn chinese_labels() {
        let g = parse_groundings("图中<ref>一只狗</ref><box>(100,200),(300,400)</box>，<box>(1,1),(5,5)</box>。");
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].label.as_deref(), Some("一只狗"));
        assert_eq!(g[1].label.as_deref(), Some("一只狗"));
    }

    #[test]
    fn malformed_input_is_skipped() {
        let cases = [
            "<box>(1,2),(3,4)",                          // unclosed
            "<box>(1,2)</box>",                          // one point
            "<box>(1,2),(3,4),(5,6)</box>",              // three points
            "<box>(a,2),(3,4)</box>",                    // not a number
            "<box>(1,2),(3,4</box>",                     // missing paren
            "<box>(99999999999999999999,2),(3,4)</box>", // overflow
            "<quad>(1,2),(3,4)</quad>",                  // quad with two points
            "<ref>x<box>(1,2),(3,4)",                    // nothing closed
            "</box></ref><ref></box>",
            "<ref>",
            "<",
            "",
        ];
        for c in cases {
            assert!(parse_groundings(c).is_empty(), "{c}");
        }
        // A box nested in an unclosed ref still parses, unlabelled.
        let g = parse_groundings("<ref>x<box>(1,2),(3,4)</box>");
        assert_eq!(g, vec![b(None, &[(1, 2), (3, 4)])]);
        // Text between ref and box ends the label.
        let g = parse_groundings("<ref>x</ref> is at <box>(1,2),(3,4)</box>");
        assert_eq!(g[0].label, None);
        // Garbage of every kind never panics.
        let junk = "<ref>é</ref><box>(-5,+7),( 8 , 9 )</box><quad>((</quad><box>)</box>";
        let g = parse_groundings(junk);
        assert_eq!(g, vec![b(Some("é"), &[(-5, 7), (8, 9)])]);
        for i in 0..junk.len() {
            if junk.is_char_boundary(i) {
                let _ = parse_groundings(&junk[..i]);
                let _ = parse_groundings(&junk[i..]);
            }
        }
    }

    #[test]
    fn to_pixels_truncates_like_python_int() {
        assert_eq!(
            to_pixels(&[(0, 0), (500, 500), (999, 999), (1000, 1000)], 640, 480),
            vec![(0, 0), (320, 240), (639, 479), (640, 480)]
        );
        // int(333/1000*300) = int(99.9) = 99 ; int(-5/1000*100) = int(-0.5) = 0
        assert_eq!(to_pixels(&[(333, -5)], 300, 100), vec![(99, 0)]);
        // 0.29 * 100 = 28.999999999999996 in floating point: int() gives 28.
        assert_eq!(to_pixels(&[(290, 0)], 100, 1), vec![(28, 0)]);
    }

    fn px(img: &RgbImage, x: u32, y: u32) -> [u8; 3] {
        let i = ((y * img.width + x) * 3) as usize;
        [img.data[i], img.data[i + 1], img.data[i + 2]]
    }

    #[test]
    fn drawing_marks_box_edges_and_keeps_size() {
        let img = RgbImage::new_filled(200, 100, [128, 128, 128]);
        let items = parse_groundings(
            "<ref>Dog 1</ref><box>(100,300),(500,900)</box><ref>猫</ref><box>(600,500),(900,800)</box>",
        );
        let out = draw_groundings(&img, &items, &DrawOptions::default()).unwrap().image;
        assert_eq!((out.width, out.height, out.data.len()), (200, 100, 200 * 100 * 3));
        // Box 1 spans x 20..=100, y 30..=90.
        let c1 = px(&out, 20, 60);
        assert_ne!(c1, [128, 128, 128]);
        assert_eq!(px(&out, 100, 60), c1);
        assert_eq!(px(&out, 60, 90), c1);
        assert_eq!(px(&out, 60, 60), [128, 128, 128]); // interior untouched
        assert_eq!(px(&out, 10, 95), [128, 128, 128]); // outside untouched
                                                       // Box 2 (other label) gets another colour.
        let c2 = px(&out, 120, 65);
        assert_ne!(c2, [128, 128, 128]);
        assert_ne!(c2, c1);
        // The label tag sits above box 1: some pixels in the tag rows above y = 30 changed.
        let changed_above = (0..30).any(|y| (20..60).any(|x| px(&out, x, y) != [128, 128, 128]));
        assert!(changed_above);
        // A quad draws its outline.
        let q = parse_groundings("<quad>(100,100),(900,100),(900,900),(100,900)</quad>");
        let out = draw_groundings(&img, &q, &DrawOptions::default()).unwrap().image;
        assert_ne!(px(&out, 100, 10), [128, 128, 128]);
        assert_ne!(px(&out, 20, 50), [128, 128, 128]);
        assert_eq!(px(&out, 100, 50), [128, 128, 128]);
    }

    #[test]
    fn out_of_range_coordinates_are_clipped() {
        let img = RgbImage::new_filled(50, 40, [0, 0, 0]);
        let items = vec![
            b(Some("far away label that is long"), &[(-5000, -5000), (99_999, 99_999)]),
            b(None, &[(i64::MIN, i64::MIN), (i64::MAX, i64::MAX)]),
            b(Some("q"), &[(-100000, 0), (3000, 500), (500, 1_000_000), (i64::MAX, i64::MIN)]),
            b(Some("x"), &[(2000, 2000), (3000, 3000)]),
            b(Some(""), &[(500, 500), (500, 500)]),
        ];
        let out = draw_groundings(&img, &items, &DrawOptions::default()).unwrap().image;
        assert_eq!((out.width, out.height, out.data.len()), (50, 40, 50 * 40 * 3));
        assert!(out.data.iter().any(|&v| v != 0));
        // Degenerate images do not panic either.
        let empty = RgbImage { width: 0, height: 0, data: vec![] };
        assert_eq!(draw_groundings(&empty, &items, &DrawOptions::default()).unwrap().image, empty);
        let one = RgbImage::new_filled(1, 1, [9, 9, 9]);
        assert_eq!(draw_groundings(&one, &items, &DrawOptions::default()).unwrap().image.data.len(), 3);
    }
}
