//! Label text for grounding drawings: which font draws each character, where the glyphs go, and
//! their anti-aliased pixels.
//!
//! Read this first:
//! * [`Fonts`] is the font choice for one drawing: the user's `--font` file first, then the faces
//!   found in the system's font folders (scanned once per process with `fontdb`, kept in a
//!   `OnceLock`) or, for tests, in given folders. Faces are tried in a fixed order of preference
//!   (regular sans faces first: DejaVu Sans, Noto Sans, Noto Sans CJK, WenQuanYi, Source Han …),
//!   per character, so a label mixing English and Chinese takes each script from a face that
//!   has it. Checking whether a face covers a character only maps the file; only faces that
//!   draw something are read into memory.
//! * [`Fonts::layout`] turns a string into a [`Line`]: glyphs rasterised with `ab_glyph` at a
//!   pixel size, positioned relative to an origin on the baseline, plus the line's ink box.
//!   A printable ASCII character that no face covers is drawn with the built-in 5x7 bitmap font
//!   (scaled), anything else no face covers as a box ("tofu"); [`Line::missing`] and
//!   [`Line::bitmap`] record that so the drawing can tell the user once which package to install.
//! * [`Line::draw`] blends the glyph coverage over what is already on the canvas.

#[path = "font.rs"]
mod bitmap;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use ab_glyph::{point, Font, FontVec, GlyphId, OutlinedGlyph, PxScale, ScaleFont};

/// Families tried first, in this order (matched on the face's English family name). Regular
/// sans faces read best on small coloured tags; the simplified-Chinese CJK faces come before the
/// other CJK variants because Qwen-VL answers in Chinese.
const PREFERRED_FAMILIES: &[&str] = &[
    "DejaVu Sans",
    "Noto Sans",
    "Noto Sans CJK SC",
    "Noto Sans SC",
    "Source Han Sans SC",
    "Source Han Sans CN",
    "WenQuanYi Micro Hei",
    "WenQuanYi Zen Hei",
    "Noto Sans CJK TC",
    "Noto Sans CJK JP",
    "Noto Sans CJK KR",
    "Source Han Sans",
    "Droid Sans Fallback",
    "Liberation Sans",
    "Arial",
    "Helvetica",
    "Microsoft YaHei",
    "SimHei",
    "PingFang SC",
    "Hiragino Sans GB",
];

/// Font files larger than this are refused (a font is a few MB, a full CJK collection tens of
/// MB): reading `/dev/zero` or a huge unrelated file given as `--font` must fail, not hang.
const MAX_FONT_BYTES: u64 = 512 << 20;

/// A loaded face, shared by the labels of a drawing (and, for system faces, by all drawings).
type Face = Arc<FontVec>;

/// Reads a font file the user named and parses its first usable face (face 0 of a `.ttc`
/// collection, or the first one that parses). The error is the reason, for `DrawError::Font`.
pub(super) fn load_font_file(path: &Path) -> Result<Face, String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.len() > MAX_FONT_BYTES {
        return Err(format!("{} bytes is too large for a font file", meta.len()));
    }
    let data = std::fs::read(path).map_err(|e| e.to_string())?;
    parse_first_face(data).ok_or_else(|| "not a TrueType/OpenType font (no face in it parses)".to_string())
}

/// The first face of `data` that parses: index 0, then (for a `ttcf` collection) the others.
fn parse_first_face(data: Vec<u8>) -> Option<Face> {
    let count = collection_len(&data).unwrap_or(1).clamp(1, 256);
    for index in 0..count {
        // Parsed by reference first, so that the bytes move only into the face that parses.
        if ab_glyph::FontRef::try_from_slice_and_index(&data, index).is_ok() {
            return FontVec::try_from_vec_and_index(data, index).ok().map(Arc::new);
        }
    }
    None
}

/// Number of faces in a TrueType collection header (`ttcf`, version, numFonts), if it is one.
fn collection_len(data: &[u8]) -> Option<u32> {
    if data.len() >= 12 && &data[..4] == b"ttcf" {
        Some(u32::from_be_bytes([data[8], data[9], data[10], data[11]]))
    } else {
        None
    }
}

/// The glyph of `ch` in `font`, if the face really draws it: a mapped glyph with an outline
/// (colour-bitmap emoji faces map characters but have no outlines ab_glyph can draw), or any
/// mapped glyph for whitespace.
fn covering_glyph<F: Font>(font: &F, ch: char) -> Option<GlyphId> {
    let id = font.glyph_id(ch);
    (id.0 != 0 && (ch.is_whitespace() || font.outline(id).is_some())).then_some(id)
}

/// The installed faces of one search (the system's font folders, or given folders), in order of
/// preference, loaded as they are needed.
pub(super) struct Catalog {
    db: fontdb::Database,
    order: Vec<fontdb::ID>,
    /// Faces read into memory so far (`None`: the file could not be read or parsed after all).
    loaded: Mutex<HashMap<fontdb::ID, Option<Face>>>,
    /// For each character asked about: the face that covers it, `None` if none does.
    covering: Mutex<HashMap<char, Option<fontdb::ID>>>,
    /// Where it searched, for the note to the user.
    pub(super) searched: String,
}

impl Catalog {
    /// The system's fonts, scanned on first use (the scan reads every font folder, so it is done
    /// once per process).
    pub(super) fn system() -> &'static Catalog {
        static SYSTEM: OnceLock<Catalog> = OnceLock::new();
        SYSTEM.get_or_init(|| {
            let mut db = fontdb::Database::new();
            db.load_system_fonts();
            Catalog::new(db, "the system's font folders".into())
        })
    }

    /// The fonts in `dirs` (searched recursively) instead of the system's.
    pub(super) fn from_dirs(dirs: &[PathBuf]) -> Catalog {
        let mut db = fontdb::Database::new();
        for d in dirs {
            db.load_fonts_dir(d);
        }
        let searched = dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ");
        Catalog::new(db, if searched.is_empty() { "no folder".into() } else { searched })
    }

    fn new(db: fontdb::Database, searched: String) -> Catalog {
        let mut faces: Vec<&fontdb::FaceInfo> = db.faces().collect();
        faces.sort_by_cached_key(|f| preference(f));
        let order = faces.iter().map(|f| f.id).collect();
        Catalog { db, order, loaded: Mutex::default(), covering: Mutex::default(), searched }
    }

    /// The preferred face that covers `ch`, with its glyph (remembered per character).
    fn face_for(&self, ch: char) -> Option<(Face, GlyphId)> {
        let cached = self.covering.lock().unwrap_or_else(|e| e.into_inner()).get(&ch).copied();
        if let Some(id) = cached {
            let face = id.and_then(|id| self.load(id))?;
            return covering_glyph(face.as_ref(), ch).map(|g| (face, g));
        }
        let found = self.search(ch);
        self.covering.lock().unwrap_or_else(|e| e.into_inner()).insert(ch, found.as_ref().map(|(id, _, _)| *id));
        found.map(|(_, face, g)| (face, g))
    }

    /// The first face in order of preference that covers `ch`. Faces already loaded are asked
    /// directly; the others through a mapping of their file (most are looked at, never drawn).
    fn search(&self, ch: char) -> Option<(fontdb::ID, Face, GlyphId)> {
        for &id in &self.order {
            let loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner()).get(&id).cloned();
            let covers = match loaded {
                Some(face) => face.is_some_and(|f| covering_glyph(f.as_ref(), ch).is_some()),
                None => self
                    .db
                    .with_face_data(id, |data, index| {
                        ab_glyph::FontRef::try_from_slice_and_index(data, index)
                            .is_ok_and(|f| covering_glyph(&f, ch).is_some())
                    })
                    .unwrap_or(false),
            };
            if covers {
                if let Some(face) = self.load(id) {
                    if let Some(g) = covering_glyph(face.as_ref(), ch) {
                        return Some((id, face, g));
                    }
                }
            }
        }
        None
    }

    fn load(&self, id: fontdb::ID) -> Option<Face> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        loaded
            .entry(id)
            .or_insert_with(|| {
                let data = self.db.with_face_data(id, |data, index| (data.to_vec(), index))?;
                FontVec::try_from_vec_and_index(data.0, data.1).ok().map(Arc::new)
            })
            .clone()
    }
}

/// Sort key: regular upright normal-width faces first, then by family (preferred list, other
/// sans, others, monospace last), then names for a stable order.
fn preference(f: &fontdb::FaceInfo) -> (u8, u16, u8, usize, String, String, u32) {
    let family = f.families.first().map(|(n, _)| n.as_str()).unwrap_or("");
    let lower = family.to_lowercase();
    let n = PREFERRED_FAMILIES.len();
    let rank = PREFERRED_FAMILIES.iter().position(|p| p.eq_ignore_ascii_case(family)).unwrap_or(
        if f.monospaced || lower.contains("mono") {
            n + 2
        } else if lower.contains("sans") {
            n
        } else {
            n + 1
        },
    );
    let style = u8::from(f.style != fontdb::Style::Normal);
    let weight = f.weight.0.abs_diff(400) / 100;
    let stretch = u8::from(f.stretch != fontdb::Stretch::Normal);
    (style, weight, stretch, rank, family.to_string(), f.post_script_name.clone(), f.index)
}

/// The font choice for one drawing: the user's face, then the catalog (resolved on first need,
/// so a `--font` that covers everything never scans the system's folders).
pub(super) struct Fonts<'a> {
    user: Option<Face>,
    dirs: Option<&'a [PathBuf]>,
    own: OnceLock<Catalog>,
}

/// How one character is drawn.
#[derive(Clone)]
enum Ink {
    Glyph(Face, GlyphId),
    /// Printable ASCII no face covers: the built-in 5x7 bitmap font.
    Bitmap(char),
    /// Nothing covers it: an empty box.
    Tofu,
}

/// A laid-out line of label text; coordinates are pixels relative to the origin (left end of
/// the baseline), y down.
pub(super) struct Line {
    /// The characters laid out.
    pub(super) text: String,
    pieces: Vec<(Ink, f32, Option<OutlinedGlyph>)>,
    px: f32,
    /// Ink and line box together: (left, top, right, bottom), whole pixels, right/bottom exclusive.
    pub(super) bounds: (i64, i64, i64, i64),
    /// Characters drawn as boxes because no face covers them.
    pub(super) missing: Vec<char>,
    /// Whether the bitmap font had to stand in for a real one.
    pub(super) bitmap: bool,
}

impl<'a> Fonts<'a> {
    /// `user`: the `--font` face; `dirs`: search these folders instead of the system's.
    pub(super) fn new(user: Option<Face>, dirs: Option<&'a [PathBuf]>) -> Fonts<'a> {
        Fonts { user, dirs, own: OnceLock::new() }
    }

    /// The installed faces after the user's: the given folders' or the system's (scanned on
    /// first call).
    pub(super) fn catalog(&self) -> &Catalog {
        match self.dirs {
            Some(d) => self.own.get_or_init(|| Catalog::from_dirs(d)),
            None => Catalog::system(),
        }
    }

    fn ink(&self, ch: char) -> Ink {
        if let Some(face) = &self.user {
            if let Some(g) = covering_glyph(face.as_ref(), ch) {
                return Ink::Glyph(face.clone(), g);
            }
        }
        match self.catalog().face_for(ch) {
            Some((face, g)) => Ink::Glyph(face, g),
            None if (' '..='~').contains(&ch) => Ink::Bitmap(ch),
            None => Ink::Tofu,
        }
    }

    /// Lays out `text` (control characters dropped) at `px` pixels per line (ascent to descent
    /// of each face), shortened with an ellipsis to at most `max_w` pixels wide (ink and line
    /// box); `None` when not even the ellipsis fits.
    pub(super) fn layout_fitting(&self, text: &str, px: f32, max_w: i64) -> Option<Line> {
        let inks: Vec<(char, Ink)> = text.chars().filter(|c| !c.is_control()).map(|c| (c, self.ink(c))).collect();
        let line = place(&inks, px);
        if line.width() <= max_w {
            return Some(line);
        }
        // The ellipsis from a real face, or three dots (which the bitmap font can always draw).
        let ellipsis: Vec<(char, Ink)> = match self.ink('…') {
            g @ Ink::Glyph(..) => vec![('…', g)],
            _ => (0..3).map(|_| ('.', self.ink('.'))).collect(),
        };
        // The longest head that fits with the ellipsis, by bisection: a label can be a whole
        // paragraph, and each try rasterises the line. (Width grows with the head; kerning can
        // take back a fraction of a pixel, which at worst keeps one character fewer.)
        let shortened = |keep: usize| {
            // Trailing spaces before the ellipsis only waste room.
            let head = inks[..keep].iter().rposition(|(c, _)| !c.is_whitespace()).map_or(0, |i| i + 1);
            let candidate: Vec<(char, Ink)> = inks[..head].iter().chain(&ellipsis).cloned().collect();
            place(&candidate, px)
        };
        let (mut lo, mut hi) = (0, inks.len().saturating_sub(1)); // heads known to fit / not yet known
        let mut best = shortened(0);
        if best.width() > max_w {
            return None;
        }
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            let line = shortened(mid);
            if line.width() <= max_w {
                (lo, best) = (mid, line);
            } else {
                hi = mid - 1;
            }
        }
        Some(best)
    }
}

/// Positions `inks` on a line at `px` and rasterises the glyph outlines.
fn place(inks: &[(char, Ink)], px: f32) -> Line {
    let scale = PxScale::from(px);
    // Bitmap font: `s` pixels per dot, 5x7 dots in a 6-dot advance, sitting on the baseline.
    let s = (px / 9.0).round().max(1.0);
    let mut x = 0.0f32;
    let mut prev: Option<(&Face, GlyphId)> = None;
    let (mut ascent, mut descent) = (0.0f32, 0.0f32);
    let mut any_face = false;
    let mut pieces = Vec::with_capacity(inks.len());
    let mut ink_box: Option<(f32, f32, f32, f32)> = None;
    let mut grow = |b: (f32, f32, f32, f32)| {
        ink_box = Some(match ink_box {
            None => b,
            Some(a) => (a.0.min(b.0), a.1.min(b.1), a.2.max(b.2), a.3.max(b.3)),
        });
    };
    let mut missing = Vec::new();
    let mut bitmap = false;
    for (ch, ink) in inks {
        match ink {
            Ink::Glyph(face, id) => {
                let scaled = face.as_scaled(scale);
                // Kerning pairs exist only within a face.
                if let Some((_, pid)) = prev.filter(|(pf, _)| Arc::ptr_eq(pf, face)) {
                    x += scaled.kern(pid, *id);
                }
                any_face = true;
                ascent = ascent.max(scaled.ascent());
                descent = descent.min(scaled.descent());
                let og = face.outline_glyph(id.with_scale_and_position(scale, point(x, 0.0)));
                if let Some(og) = &og {
                    let b = og.px_bounds();
                    grow((b.min.x, b.min.y, b.max.x, b.max.y));
                }
                pieces.push((ink.clone(), x, og));
                x += scaled.h_advance(*id);
                prev = Some((face, *id));
            }
            Ink::Bitmap(_) => {
                bitmap = true;
                grow((x, -7.0 * s, x + 5.0 * s, 0.0));
                pieces.push((ink.clone(), x, None));
                x += 6.0 * s;
                prev = None;
            }
            Ink::Tofu => {
                if !missing.contains(ch) {
                    missing.push(*ch);
                }
                grow(tofu_box(x, px));
                pieces.push((ink.clone(), x, None));
                x += (0.6 * px).round();
                prev = None;
            }
        }
    }
    if !any_face {
        // Bitmap and boxes only: a line box of the same height a face would have.
        ascent = 0.8 * px;
        descent = -0.2 * px;
    }
    let (mut l, mut t, mut r, mut b) = (0.0f32, -ascent, x, -descent);
    if let Some(i) = ink_box {
        (l, t, r, b) = (l.min(i.0), t.min(i.1), r.max(i.2), b.max(i.3));
    }
    let bounds = (l.floor() as i64, t.floor() as i64, r.ceil() as i64, b.ceil() as i64);
    let text = inks.iter().map(|(c, _)| *c).collect();
    Line { text, pieces, px, bounds, missing, bitmap }
}

/// The placeholder box for a character no face covers: (left, top, right, bottom).
fn tofu_box(x: f32, px: f32) -> (f32, f32, f32, f32) {
    let l = x + (0.08 * px).round();
    (l, -(0.7 * px).round(), l + (0.45 * px).round().max(3.0), 0.0)
}

impl Line {
    /// Width in whole pixels of the ink and line box.
    pub(super) fn width(&self) -> i64 {
        self.bounds.2 - self.bounds.0
    }

    /// Height in whole pixels of the ink and line box.
    pub(super) fn height(&self) -> i64 {
        self.bounds.3 - self.bounds.1
    }

    /// Draws the line with its origin at pixel (`ox`, `oy`) in colour `fg`: `put(x, y, fg,
    /// coverage)` blends one pixel (coverage in 0..=1).
    pub(super) fn draw(&self, ox: i64, oy: i64, mut put: impl FnMut(i64, i64, f32)) {
        let s = (self.px / 9.0).round().max(1.0) as i64;
        for (ink, x, og) in &self.pieces {
            match ink {
                Ink::Glyph(..) => {
                    let Some(og) = og else { continue };
                    let b = og.px_bounds();
                    let (bx, by) = (ox + b.min.x as i64, oy + b.min.y as i64);
                    og.draw(|gx, gy, c| put(bx + gx as i64, by + gy as i64, c.min(1.0)));
                }
                Ink::Bitmap(ch) => {
                    let Some(g) = bitmap::glyph(*ch) else { continue };
                    let gx = ox + *x as i64;
                    let gy = oy - 7 * s;
                    for row in 0..bitmap::GLYPH_H {
                        for col in 0..bitmap::GLYPH_W {
                            if bitmap::is_set(g, col, row) {
                                for dy in 0..s {
                                    for dx in 0..s {
                                        put(gx + col as i64 * s + dx, gy + row as i64 * s + dy, 1.0);
                                    }
                                }
                            }
                        }
                    }
                }
                Ink::Tofu => {
                    let (l, t, r, b) = tofu_box(*x, self.px);
                    let (l, t, r, b) = (ox + l as i64, oy + t as i64, ox + r as i64 - 1, oy + b as i64 - 1);
                    let w = (self.px / 14.0).round().max(1.0) as i64;
                    for y in t..=b {
                        for x in l..=r {
                            if y < t + w || y > b - w || x < l + w || x > r - w {
                                put(x, y, 1.0);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The package advice for characters no installed font covers, by script.
pub(super) fn missing_note(missing: &[char], bitmap: bool, searched: &str, user_font: Option<&Path>) -> Option<String> {
    if missing.is_empty() && !bitmap {
        return None;
    }
    let is_cjk = |c: char| {
        matches!(c as u32,
            0x1100..=0x11FF | 0x2E80..=0x2FDF | 0x3000..=0x303F | 0x3040..=0x30FF | 0x3100..=0x31FF
            | 0x3200..=0x9FFF | 0xA960..=0xA97F | 0xAC00..=0xD7FF | 0xF900..=0xFAFF | 0xFE30..=0xFE4F
            | 0xFF00..=0xFFEF | 0x20000..=0x3FFFF)
    };
    let is_latin_like = |c: char| (c as u32) < 0x0590 || (0x1D00..=0x2BFF).contains(&(c as u32));
    let mut groups: Vec<(&str, String, &str)> = Vec::new();
    let mut add = |script: &'static str, c: char, package: &'static str| match groups.iter_mut().find(|g| g.0 == script)
    {
        Some(g) if g.1.chars().count() < 16 => g.1.push(c),
        Some(g) if !g.1.ends_with('…') => g.1.push('…'),
        Some(_) => {}
        None => groups.push((script, c.to_string(), package)),
    };
    for &c in missing {
        if is_cjk(c) {
            add("CJK", c, "`fonts-noto-cjk` or `fonts-wqy-microhei`");
        } else if (0x1F000..=0x1FAFF).contains(&(c as u32)) || (0x2600..=0x27BF).contains(&(c as u32)) {
            add("symbols/emoji", c, "`fonts-symbola`");
        } else if is_latin_like(c) {
            add("Latin/Greek/Cyrillic", c, "`fonts-dejavu-core`");
        } else {
            add("other scripts", c, "`fonts-noto-core`");
        }
    }
    let mut packages: Vec<String> = Vec::new();
    if bitmap {
        packages.push("`fonts-dejavu-core` (Latin)".into());
    }
    for g in &groups {
        let p = format!("{} ({})", g.2, g.0);
        if !packages.contains(&p) {
            packages.push(p);
        }
    }
    let boxes: Vec<String> = groups.iter().map(|(s, chars, _)| format!("{chars} ({s})")).collect();
    let what = match (bitmap, user_font) {
        (true, Some(p)) => format!(
            "{} has no usable glyphs for these labels and no font was found in {searched}: labels are drawn in \
             qvc's coarse built-in bitmap font",
            p.display()
        ),
        (true, None) => {
            format!(
                "no TrueType/OpenType font found in {searched}: labels are drawn in qvc's coarse built-in bitmap font"
            )
        }
        (false, Some(p)) => format!("neither {} nor any font in {searched} covers", p.display()),
        (false, None) => format!("no font in {searched} covers"),
    };
    let what = match (bitmap, boxes.is_empty()) {
        (true, true) => what,
        (true, false) => format!("{what}, and {} as boxes", boxes.join(", ")),
        (false, _) => format!("{what} {}: drawn as boxes", boxes.join(", ")),
    };
    Some(format!("{what}; install fonts, e.g. Debian/Ubuntu {}, or pass --font FILE", packages.join(" and ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collection_header_is_read() {
        let mut ttc = b"ttcf\x00\x01\x00\x00\x00\x00\x00\x03".to_vec();
        ttc.extend_from_slice(&[0; 12]);
        assert_eq!(collection_len(&ttc), Some(3));
        assert_eq!(collection_len(b"\x00\x01\x00\x00"), None);
        // Truncated collections and garbage parse to no face, without panicking.
        assert!(parse_first_face(ttc).is_none());
        assert!(parse_first_face(vec![]).is_none());
        assert!(parse_first_face(b"ttcf\xff\xff\xff\xff\xff\xff\xff\xff".to_vec()).is_none());
    }

    #[test]
    fn notes_name_the_characters_and_a_package() {
        assert_eq!(missing_note(&[], false, "x", None), None);
        let n = missing_note(&['文', '字', 'é'], false, "/f", None).unwrap();
        assert!(n.contains("文字 (CJK)") && n.contains("fonts-noto-cjk") && n.contains("é (Latin"), "{n}");
        assert!(n.contains("fonts-dejavu-core") && n.contains("--font FILE"), "{n}");
        let n = missing_note(&[], true, "/empty", None).unwrap();
        assert!(n.contains("bitmap font") && n.contains("fonts-dejavu-core") && n.contains("/empty"), "{n}");
        let n = missing_note(&['ب'], false, "/f", Some(Path::new("my.ttf"))).unwrap();
        assert!(n.contains("neither my.ttf") && n.contains("fonts-noto-core"), "{n}");
        // Long lists are cut.
        let many: Vec<char> = ('一'..='龥').take(40).collect();
        let n = missing_note(&many, false, "/f", None).unwrap();
        assert!(n.contains('…') && n.chars().filter(|c| ('一'..='龥').contains(c)).count() == 16, "{n}");
    }

    #[test]
    fn empty_catalog_falls_back_to_bitmap_and_boxes() {
        let dir = std::env::temp_dir().join(format!("qvc-label-font-empty-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let dirs = vec![dir.clone()];
        let fonts = Fonts::new(None, Some(&dirs));
        let line = fonts.layout_fitting("ab 文", 18.0, i64::MAX).unwrap();
        assert!(line.bitmap);
        assert_eq!(line.missing, vec!['文']);
        assert!(line.width() > 0 && line.height() >= 18);
        let mut ink = 0;
        line.draw(0, 0, |_, _, c| ink += usize::from(c > 0.5));
        assert!(ink > 0);
        // The ellipsis falls back to dots; a line too wide is shortened, nothing fits in 1 px.
        // 2 px dots at 18 px: 12 px a character, so two characters and three dots fill 60 px.
        let short = fonts.layout_fitting("abcdefghijklmnop", 18.0, 60).unwrap();
        assert_eq!((short.text.as_str(), short.width()), ("ab...", 60));
        assert_eq!(fonts.layout_fitting("abcdefghijklmnop", 18.0, 71).unwrap().text, "ab...");
        assert_eq!(fonts.layout_fitting("abcdefghijklmnop", 18.0, 72).unwrap().text, "abc...");
        // Spaces before the ellipsis are dropped; a paragraph is shortened as quickly.
        assert_eq!(fonts.layout_fitting("a  bcdefghijklmnop", 18.0, 72).unwrap().text, "a...");
        let long = "word ".repeat(2000);
        assert_eq!(fonts.layout_fitting(&long, 18.0, 300).unwrap().text, format!("{}...", &long[..22]));
        assert!(fonts.layout_fitting("abc", 18.0, 1).is_none());
        let _ = std::fs::remove_dir_all(dir);
    }
}
