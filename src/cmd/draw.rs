//! `qvc draw`: draws the regions of a model answer (`<ref>` labels, `<box>` boxes, `<quad>` text
//! lines, coordinates in the model's [0, 1000) range) on the picture it refers to, so answers
//! obtained anywhere (`qvc serve`, the reference, a log) can be looked at, and prints the regions
//! in pixels as `qvc generate` does.
//!
//! This module is also the one drawing path of the other commands: `qvc generate --draw-boxes`
//! and the `/draw` command of `qvc chat` call [`check_output`] before they start (so a bad
//! output name fails before minutes of generation), then [`draw_on_picture`] (load the picture,
//! draw with [`qvc_model::grounding::draw_groundings`], say its notes, save), and print the
//! regions with [`box_line`].

use anyhow::{bail, Context, Result};
use clap::Args;
use qvc_model::grounding::{box_outputs, draw_groundings, parse_groundings, BoxOut, DrawOptions, Grounding};
use qvc_model::image::{load_rgb, save_png, RgbImage};
use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};

/// What the examples in `qvc draw --help` teach.
pub const DRAW_EXAMPLES: &str = "Examples:\n  \
qvc draw --image street.jpg --text '<ref>the bus</ref><box>(120,340),(610,700)</box>' -o bus.png\n  \
qvc draw -i sign.png --text '<ref>出口 EXIT</ref><quad>(100,200),(400,210),(398,300),(99,290)</quad>' -o sign-drawn.png\n  \
qvc draw -i street.jpg --text-file answer.txt -o out.png --force      # replace an existing out.png\n  \
curl -s localhost:8000/v1/chat/completions -d @req.json | jq -r '.choices[0].message.content' \\\n    \
| qvc draw -i street.jpg -o out.png --json                          # the answer on stdin, boxes as JSON\n\n\
Coordinates in the text are the model's: integers in [0, 1000) of the picture's width and height, \
converted to pixels as the reference does (int(v / 1000 * W)). A <ref> labels every <box>/<quad> that \
follows it. Labels are drawn with --font, else an installed font that covers their characters \
(for Chinese on Debian/Ubuntu: apt install fonts-noto-cjk or fonts-wqy-microhei).";

#[derive(Args)]
pub struct DrawArgs {
    /// The picture the answer refers to (PNG, JPEG, WebP, GIF, BMP).
    #[arg(long, short = 'i', value_name = "PIC")]
    image: PathBuf,
    /// The answer text, with <ref>label</ref><box>(x1,y1),(x2,y2)</box> and <quad> regions. Without --text
    /// and --text-file the text is read from stdin.
    #[arg(long, value_name = "TEXT", conflicts_with = "text_file")]
    text: Option<String>,
    /// A file holding the answer text (`-` for stdin).
    #[arg(long, value_name = "FILE")]
    text_file: Option<PathBuf>,
    /// Where to write the picture with the regions drawn (a PNG file: the name must end in .png).
    #[arg(long, short = 'o', value_name = "OUT.png")]
    output: PathBuf,
    /// Replace OUT.png when it exists (the input picture itself is never replaced).
    #[arg(long)]
    force: bool,
    /// A TrueType/OpenType font file (.ttf, .otf, .ttc) for the labels [default: an installed font that covers
    /// the labels' characters].
    #[arg(long, value_name = "FILE")]
    font: Option<PathBuf>,
    /// Print one JSON object ({"boxes": [...], "image", "width", "height", "output", "notes"}; the boxes as in
    /// `qvc generate --json`) on stdout instead of one line per region.
    #[arg(long)]
    json: bool,
}

pub fn run(a: DrawArgs) -> Result<()> {
    check_output(&a.output, a.force, "-o/--output", &[&a.image])?;
    check_font(a.font.as_deref())?;
    // The picture before the text: a wrong path should fail before a pipe's producer has run.
    let pic = load_picture(&a.image)?;
    let text = read_text(a.text.as_deref(), a.text_file.as_deref())?;
    let items = parse_groundings(&text);
    if items.is_empty() {
        bail!(
            "no <box> or <quad> found in the text, so nothing was drawn and {} was not written; a region is written \
             <ref>label</ref><box>(x1,y1),(x2,y2)</box> or <quad>(x1,y1),(x2,y2),(x3,y3),(x4,y4)</quad>, with \
             integer coordinates in [0, 1000)",
            a.output.display()
        );
    }
    let opts = DrawOptions { font: a.font.clone(), ..Default::default() };
    let drawn = draw_loaded(&a.image, &pic, &items, &opts, &a.output, a.force)?;
    if a.json {
        let v = serde_json::json!({
            "boxes": drawn.boxes,
            "image": a.image.display().to_string(),
            "width": drawn.width,
            "height": drawn.height,
            "output": a.output.display().to_string(),
            "notes": drawn.notes,
        });
        println!("{}", serde_json::to_string(&v)?);
    } else {
        for b in &drawn.boxes {
            println!("{}", box_line(b));
        }
    }
    Ok(())
}

/// The answer text from `--text`, `--text-file` (`-` = stdin), or stdin when neither is given.
/// An implicit stdin that is a terminal is refused: nobody is typing an answer, and waiting for
/// one would look like a hang.
fn read_text(text: Option<&str>, file: Option<&Path>) -> Result<String> {
    let from_stdin = |what: &str| -> Result<String> {
        let mut bytes = Vec::new();
        std::io::stdin().read_to_end(&mut bytes).with_context(|| format!("cannot read the text from {what}"))?;
        String::from_utf8(bytes).with_context(|| format!("the text on {what} is not UTF-8"))
    };
    match (text, file) {
        (Some(t), _) => Ok(t.to_string()),
        (None, Some(f)) if f == Path::new("-") => from_stdin("stdin (--text-file -)"),
        (None, Some(f)) => {
            let bytes = std::fs::read(f).with_context(|| format!("cannot read --text-file {}", f.display()))?;
            String::from_utf8(bytes).with_context(|| format!("--text-file {} is not UTF-8 text", f.display()))
        }
        (None, None) => {
            if std::io::stdin().is_terminal() {
                bail!(
                    "no text to draw: give the answer with --text TEXT or --text-file FILE, or pipe it on stdin \
                     (`... | qvc draw -i PIC -o OUT.png`)"
                );
            }
            from_stdin("stdin")
        }
    }
}

/// Refuses an output path before any work is done: it must end in `.png` (the drawing is always
/// written as PNG), must not exist unless `force`, and must never be one of the `inputs` (the
/// picture drawn on is not replaced, even with `force`). `flag` names the option in messages.
pub(crate) fn check_output(out: &Path, force: bool, flag: &str, inputs: &[&Path]) -> Result<()> {
    let png = out.extension().and_then(|e| e.to_str()).is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if !png {
        bail!("{flag} {}: the drawing is written as PNG; give a file name ending in .png", out.display());
    }
    for input in inputs {
        if same_file(out, input) {
            bail!(
                "{flag} {} is the input picture {}; qvc never replaces the picture it draws on (not even with \
                 --force): choose another output file",
                out.display(),
                input.display()
            );
        }
    }
    if out.is_dir() {
        bail!("{flag} {} is a directory; give a file name ending in .png", out.display());
    }
    crate::common::refuse_overwrite(out, force, flag)
}

/// Whether `a` and `b` name the same existing file (through symbolic or hard links too).
fn same_file(a: &Path, b: &Path) -> bool {
    let (Ok(ma), Ok(mb)) = (std::fs::metadata(a), std::fs::metadata(b)) else { return false };
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        ma.dev() == mb.dev() && ma.ino() == mb.ino()
    }
    #[cfg(not(unix))]
    {
        let _ = (ma, mb);
        matches!((std::fs::canonicalize(a), std::fs::canonicalize(b)), (Ok(x), Ok(y)) if x == y)
    }
}

/// Refuses a `--font` that is not a usable font file before any work is done (for `generate`
/// and `chat`, before the model loads and answers).
pub(crate) fn check_font(font: Option<&Path>) -> Result<()> {
    let Some(f) = font else { return Ok(()) };
    match std::fs::metadata(f) {
        Ok(m) if m.is_file() => {
            qvc_model::grounding::check_font(f)?;
            Ok(())
        }
        Ok(_) => bail!("--font {} is not a file; give a TrueType/OpenType font file (.ttf, .otf, .ttc)", f.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "--font {}: no such file; give a TrueType/OpenType font file (.ttf, .otf, .ttc), or leave out --font to \
             use an installed font (`fc-list` lists them)",
            f.display()
        ),
        Err(e) => bail!("--font {}: cannot read it ({e})", f.display()),
    }
}

/// What [`draw_on_picture`] did: the regions in pixels of the picture, its size, and the notes
/// the drawing had for the user (already printed).
pub(crate) struct Drawn {
    pub(crate) boxes: Vec<BoxOut>,
    pub(crate) width: u32,
    pub(crate) height: u32,
    pub(crate) notes: Vec<String>,
}

/// Loads `picture`, draws `items` on it, prints each of the drawing's notes once as
/// `[qvc] {note}` on stderr, and writes the result to `out` as PNG (checked with
/// [`check_output`] again, since time may have passed since the first check). The file is
/// written beside `out` under a temporary name and renamed, so a failed write never leaves a
/// half-written `out` or damages the file `--force` replaces.
pub(crate) fn draw_on_picture(
    picture: &Path,
    items: &[Grounding],
    opts: &DrawOptions,
    out: &Path,
    force: bool,
) -> Result<Drawn> {
    draw_loaded(picture, &load_picture(picture)?, items, opts, out, force)
}

fn load_picture(picture: &Path) -> Result<RgbImage> {
    load_rgb(picture).with_context(|| format!("cannot draw on {}", picture.display()))
}

/// [`draw_on_picture`] once the picture (`pic`, read from `picture`) is loaded.
fn draw_loaded(
    picture: &Path,
    pic: &RgbImage,
    items: &[Grounding],
    opts: &DrawOptions,
    out: &Path,
    force: bool,
) -> Result<Drawn> {
    check_output(out, force, "output", &[picture])?;
    let drawing = draw_groundings(pic, items, opts)?;
    for note in &drawing.notes {
        eprintln!("[qvc] {note}");
    }
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = out.with_file_name(format!(".{name}.qvc-{}.tmp", std::process::id()));
    let written = save_png(&drawing.image, &tmp)
        .with_context(|| format!("cannot write {}", out.display()))
        .and_then(|()| std::fs::rename(&tmp, out).with_context(|| format!("cannot write {}", out.display())));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    eprintln!("[qvc] drew {} region(s) on {} -> {}", items.len(), picture.display(), out.display());
    let name = picture.display().to_string();
    Ok(Drawn {
        boxes: box_outputs(items, Some((&name, pic.width, pic.height))),
        width: pic.width,
        height: pic.height,
        notes: drawing.notes,
    })
}

/// One region as `qvc generate`, `qvc chat` and `qvc draw` print it:
/// `[box] "label" [(x1, y1), (x2, y2)] (of 1000) -> [(..)] px in PIC`.
pub(crate) fn box_line(b: &BoxOut) -> String {
    format!(
        "[box] {:?} {:?} (of 1000) -> {} in {}",
        b.label.as_deref().unwrap_or("(no label)"),
        b.box_1000,
        b.box_px.as_ref().map_or("no picture".into(), |p| format!("{p:?} px")),
        b.image.as_deref().unwrap_or("-")
    )
}
