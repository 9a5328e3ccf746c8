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
//!   in a TrueType/OpenType font (label_font.rs picks and rasterises it), all sized to the
//!   picture, clipped to the image, tags kept inside it.

#[path = "label_font.rs"]
mod label_font;

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
    /// A TrueType/OpenType font file for the labels (`--font FILE`; face 0 of a `.ttc`
    /// collection, or its first face that parses); characters it lacks come from the installed
    /// fonts. `None` picks, per character, an installed font that covers it.
    pub font: Option<std::path::PathBuf>,
    /// Search these folders (recursively) for label fonts instead of the system's font folders;
    /// `None` (the default) searches the system's. For tests, and for installs that ship fonts.
    pub font_dirs: Option<Vec<std::path::PathBuf>>,
}

/// A picture with the regions drawn, and what the user should hear about it (said once per
/// drawing, e.g. that no installed font covers some characters and which package would).
#[derive(Clone, Debug, PartialEq)]
pub struct Drawing {
    pub image: RgbImage,
    pub notes: Vec<String>,
    /// The label tags as drawn, in the order of `items` (labelled regions only; a label that
    /// cannot fit at all on a tiny picture is left out).
    pub labels: Vec<PlacedLabel>,
}

/// One label tag on the picture.
#[derive(Clone, Debug, PartialEq)]
pub struct PlacedLabel {
    /// The text drawn: the label, shortened with an ellipsis when the picture is too narrow.
    pub text: String,
    /// The tag rectangle in pixels, inclusive corners (x0, y0, x1, y1); always inside the
    /// picture, and the text's ink is inside it.
    pub rect: [i64; 4],
    /// The tag's colour (the region's); the text is white or black, whichever reads better.
    pub colour: [u8; 3],
    /// The text size in pixels (ascent to descent of the font), [`label_text_px`] unless the
    /// picture is too short for it.
    pub text_px: f32,
}

/// Why a drawing could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DrawError {
    /// The font given with `--font` cannot be used.
    #[error("cannot use font {path}: {reason}; give a TrueType/OpenType file (.ttf, .otf, .ttc) or leave out --font")]
    Font { path: std::path::PathBuf, reason: String },
}

/// Label text size for a `width` x `height` picture: a thirtieth of its short side, at least
/// 12 px (the smallest size at which Chinese stays legible), so a label looks the same on a
/// 300-pixel icon and a 4000-pixel photo.
pub fn label_text_px(width: u32, height: u32) -> f32 {
    (width.min(height) as f32 / 30.0).max(12.0)
}

/// Outline thickness for a `width` x `height` picture: 1/250 of its short side, at least 2 px.
pub fn line_width(width: u32, height: u32) -> i64 {
    ((width.min(height) as f64 / 250.0).round() as i64).max(2)
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
    /// Blends `c` over the pixel with weight `a` in 0..=1 (anti-aliased text).
    fn blend(&mut self, x: i64, y: i64, c: [u8; 3], a: f32) {
        if x >= 0 && y >= 0 && x < self.img.width as i64 && y < self.img.height as i64 {
            let i = (y as usize * self.img.width as usize + x as usize) * 3;
            for (k, &v) in c.iter().enumerate() {
                let cur = self.img.data[i + k] as f32;
                self.img.data[i + k] = (cur + (v as f32 - cur) * a).round().clamp(0.0, 255.0) as u8;
            }
        }
    }

    /// Fills the inclusive rectangle [x0, x1] x [y0, y1], clipped.
    fn fill_rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: [u8; 3]) {
        let (w, h) = (self.img.width as i64, self.img.height as i64);
        let (x0, x1) = (x0.max(0), x1.min(w - 1));
        let (y0, y1) = (y0.max(0), y1.min(h - 1));
        if x0 > x1 {
            return;
        }
        for y in y0..=y1 {
            let row = (y as usize * w as usize + x0 as usize) * 3;
            for px in self.img.data[row..row + (x1 - x0 + 1) as usize * 3].chunks_exact_mut(3) {
                px.copy_from_slice(&c);
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

/// Checks that `path` is a font the labels can be drawn with (`--font FILE`), as
/// [`draw_groundings`] would load it: so that a command can refuse a bad file before it loads a
/// model or generates anything.
pub fn check_font(path: &std::path::Path) -> Result<(), DrawError> {
    load_user_font(path).map(drop)
}

/// The `--font` file, parsed; a [`DrawError::Font`] naming it when it cannot be used.
fn load_user_font(path: &std::path::Path) -> Result<std::sync::Arc<ab_glyph::FontVec>, DrawError> {
    label_font::load_font_file(path).map_err(|reason| DrawError::Font { path: path.to_path_buf(), reason })
}

/// Draws `items` on a copy of `img`: box outlines and quad outlines [`line_width`] thick, then
/// each label on a filled tag of its region's colour, in a real font ([`DrawOptions`]) at
/// [`label_text_px`], anti-aliased. Each distinct label gets its own colour; unlabelled regions
/// get one each. A tag goes above its region, or inside it under the top edge, or below it,
/// whichever does not cover an earlier tag (else stacked next to them), always inside the
/// picture; a label wider than the picture is shortened with an ellipsis. Outlines are clipped
/// to the image; coordinates may be anywhere.
///
/// Characters that no font covers are drawn as boxes (printable ASCII in a built-in bitmap font
/// when there is no font at all), and [`Drawing::notes`] then says, once, which package to
/// install. Fails only when the `--font` file cannot be used.
pub fn draw_groundings(img: &RgbImage, items: &[Grounding], opts: &DrawOptions) -> Result<Drawing, DrawError> {
    let user_font = opts.font.as_deref().map(load_user_font).transpose()?;
    let (w, h) = (img.width, img.height);
    if w == 0 || h == 0 || img.data.len() != w as usize * h as usize * 3 {
        return Ok(Drawing { image: img.clone(), notes: Vec::new(), labels: Vec::new() });
    }
    let mut canvas = Canvas { img: img.clone() };
    let t = line_width(w, h);

    // Outlines first, labels after, so that no line crosses a label.
    let mut keys: Vec<Option<&str>> = Vec::new();
    let mut to_label: Vec<(&str, [i64; 4], [u8; 3])> = Vec::new();
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
        if let Some(label) = item.label.as_deref().filter(|l| !l.trim().is_empty()) {
            to_label.push((label, [xmin, ymin, xmax, ymax], colour));
        }
    }

    let fonts = label_font::Fonts::new(user_font, opts.font_dirs.as_deref());
    let mut labels: Vec<PlacedLabel> = Vec::new();
    let (mut missing, mut bitmap) = (Vec::new(), false);
    for (label, region, colour) in to_label {
        let Some(placed) = draw_label(&mut canvas, &fonts, label, region, t, colour, &labels) else {
            continue;
        };
        for c in placed.1.missing.iter() {
            if !missing.contains(c) {
                missing.push(*c);
            }
        }
        bitmap |= placed.1.bitmap;
        labels.push(placed.0);
    }
    let notes = if missing.is_empty() && !bitmap {
        Vec::new()
    } else {
        label_font::missing_note(&missing, bitmap, &fonts.catalog().searched, opts.font.as_deref())
            .into_iter()
            .collect()
    };
    Ok(Drawing { image: canvas.img, notes, labels })
}

/// Draws one label's tag near `region` (its pixel bounding box, possibly outside the picture)
/// where it covers none of the `placed` tags if it can; returns the tag and its laid-out line.
/// `None` when the picture is too small for any tag.
fn draw_label(
    canvas: &mut Canvas,
    fonts: &label_font::Fonts,
    label: &str,
    region: [i64; 4],
    t: i64,
    colour: [u8; 3],
    placed: &[PlacedLabel],
) -> Option<(PlacedLabel, label_font::Line)> {
    let (w, h) = (canvas.img.width as i64, canvas.img.height as i64);
    let mut px = label_text_px(w as u32, h as u32);
    let (line, pad) = loop {
        let pad = (px * 0.15).round().max(1.0) as i64;
        let line = fonts.layout_fitting(label, px, w - 2 * pad)?;
        let tag_h = line.height() + 2 * pad;
        if tag_h <= h {
            break (line, pad);
        }
        // A picture shorter than the tag: smaller text, down to a size still worth drawing.
        px = (px * (h - 2 * pad) as f32 / line.height() as f32).floor().min(px - 1.0);
        if px < 6.0 {
            return None;
        }
    };
    if line.text.is_empty() {
        return None; // control characters only: nothing to show
    }
    let (tw, th) = (line.width() + 2 * pad, line.height() + 2 * pad);
    let clamp = |v: i64, lo: i64, hi: i64| v.max(lo).min(hi);
    // The region's corner, moved into the picture when it lies outside.
    let (x0, y0, y1) = (clamp(region[0], 0, w - 1), clamp(region[1], 0, h - 1), clamp(region[3], 0, h - 1));
    let left = clamp(x0, 0, w - tw);
    let fits = |top: i64| clamp(top, 0, h - th);
    let overlap = |top: i64| -> i64 {
        placed
            .iter()
            .map(|p| {
                let ix = (left + tw - 1).min(p.rect[2]) - left.max(p.rect[0]) + 1;
                let iy = (top + th - 1).min(p.rect[3]) - top.max(p.rect[1]) + 1;
                ix.max(0) * iy.max(0)
            })
            .sum()
    };
    // Above the region, inside under its top edge, below it, inside above its bottom edge; then
    // stacked up or down from the first, a tag height at a time.
    let mut candidates = vec![fits(y0 - th), fits(y0 + t), fits(y1 + 1), fits(y1 - t - th + 1)];
    let first = candidates[0];
    for k in 1..=(h / th.max(1) + 1) {
        candidates.push(fits(first + k * th));
        candidates.push(fits(first - k * th));
    }
    let mut best = (i64::MAX, first);
    for top in candidates {
        let o = overlap(top);
        if o < best.0 {
            best = (o, top);
        }
        if o == 0 {
            break;
        }
    }
    let top = best.1;
    canvas.fill_rect(left, top, left + tw - 1, top + th - 1, colour);
    let luma = 299 * colour[0] as u32 + 587 * colour[1] as u32 + 114 * colour[2] as u32;
    let fg = if luma > 150_000 { [0, 0, 0] } else { [255, 255, 255] };
    let (ox, oy) = (left + pad - line.bounds.0, top + pad - line.bounds.1);
    line.draw(ox, oy, |x, y, a| canvas.blend(x, y, fg, a));
    let tag =
        PlacedLabel { text: line.text.clone(), rect: [left, top, left + tw - 1, top + th - 1], colour, text_px: px };
    Some((tag, line))
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
            b(Some("\u{7}\u{1b}"), &[(100, 100), (400, 400)]),
        ];
        let d = draw_groundings(&img, &items, &DrawOptions::default()).unwrap();
        let out = d.image;
        assert_eq!((out.width, out.height, out.data.len()), (50, 40, 50 * 40 * 3));
        // Labels with something to show get a tag inside the picture; control characters do not.
        assert!(d.labels.iter().all(|l| !l.text.is_empty() && l.rect[0] >= 0 && l.rect[2] < 50 && l.rect[3] < 40));
        assert_eq!(d.labels.len(), 3, "{:?}", d.labels);
        assert!(out.data.iter().any(|&v| v != 0));
        // Degenerate images do not panic either.
        let empty = RgbImage { width: 0, height: 0, data: vec![] };
        assert_eq!(draw_groundings(&empty, &items, &DrawOptions::default()).unwrap().image, empty);
        let one = RgbImage::new_filled(1, 1, [9, 9, 9]);
        assert_eq!(draw_groundings(&one, &items, &DrawOptions::default()).unwrap().image.data.len(), 3);
    }
}
