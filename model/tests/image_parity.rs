//! Parity of image loading and preprocessing with the Qwen-VL reference (Pillow 12 + torchvision),
//! against the tensors in `shared/fixtures/tiny-qwen-vl/expected.safetensors`, and the error
//! behaviour of the loader on missing, empty, truncated, random and oversized files.
//!
//! * `decoded_rgb/*`: `Image.open(p).convert("RGB")`; every picture, the JPEG included, must
//!   match exactly.
//! * `resized_rgb/*`: Pillow's bicubic resize to 448x448; must match exactly for every image
//!   (resized from the fixture's own decoded pixels, so only the resize is under test).
//! * `pixels/*`: the full transform from the file; bit-identical for every picture.
//! * `tests/data/jpeg/*.jpg`: small JPEGs made by Pillow 13.0.0 (libjpeg-turbo 3.2.0) in the
//!   layouts the fixture lacks (4:4:4, 4:2:2, 4:1:1 with restart markers, progressive, optimised
//!   Huffman tables, arithmetic coding, greyscale, Adobe CMYK); their Pillow-decoded pixels
//!   (`Image.open(p).convert("RGB")`) are pinned by a hash (`tests/data/jpeg/make.py` writes the
//!   files and prints the hashes).
//!
//! Without the fixtures the tests print a notice and pass, unless `QVC_REQUIRE_FIXTURES=1`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use qvc_model::image::{
    decode_rgb, load_rgb, normalize_chw, preprocess, resize_bicubic, save_png, ImageError, RgbImage, MAX_PIXELS,
};
use safetensors::{Dtype, SafeTensors};

const SIZE: u32 = 448;
const PNGS: [&str; 3] = ["shapes.png", "icon_rgba.png", "grey.png"];
const JPEG: &str = "photo.jpg";

fn fixture_dir() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/tiny-qwen-vl");
    if dir.join("expected.safetensors").is_file() {
        return Some(dir);
    }
    if std::env::var("QVC_REQUIRE_FIXTURES").as_deref() == Ok("1") {
        panic!("fixtures not found at {} and QVC_REQUIRE_FIXTURES=1", dir.display());
    }
    println!("skipped: ../shared/fixtures not found");
    None
}

fn expected_bytes() -> Option<&'static [u8]> {
    static BYTES: OnceLock<Option<Vec<u8>>> = OnceLock::new();
    BYTES.get_or_init(|| fixture_dir().map(|d| std::fs::read(d.join("expected.safetensors")).unwrap())).as_deref()
}

fn tensor_u8(st: &SafeTensors, name: &str) -> (Vec<usize>, Vec<u8>) {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(t.dtype(), Dtype::U8, "{name}");
    (t.shape().to_vec(), t.data().to_vec())
}

fn tensor_f32(st: &SafeTensors, name: &str) -> (Vec<usize>, Vec<f32>) {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(t.dtype(), Dtype::F32, "{name}");
    let v = t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    (t.shape().to_vec(), v)
}

fn rgb_from_tensor(st: &SafeTensors, name: &str) -> RgbImage {
    let (shape, data) = tensor_u8(st, name);
    assert_eq!(shape.len(), 3);
    assert_eq!(shape[2], 3);
    RgbImage { width: shape[1] as u32, height: shape[0] as u32, data }
}

fn max_level_diff(a: &[u8], b: &[u8]) -> u8 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn png_decoding_matches_pillow_exactly() {
    let (Some(dir), Some(bytes)) = (fixture_dir(), expected_bytes()) else {
        return;
    };
    let st = SafeTensors::deserialize(bytes).unwrap();
    for name in PNGS {
        let want = rgb_from_tensor(&st, &format!("decoded_rgb/{name}"));
        let got = load_rgb(&dir.join(name)).unwrap();
        assert_eq!((got.width, got.height), (want.width, want.height), "{name}");
        let d = max_level_diff(&got.data, &want.data);
        println!("decoded_rgb/{name}: max level diff {d}");
        assert_eq!(d, 0, "{name}");
    }
}

#[test]
fn resize_matches_pillow_exactly() {
    let Some(bytes) = expected_bytes() else {
        return;
    };
    let st = SafeTensors::deserialize(bytes).unwrap();
    for name in PNGS.iter().chain([&JPEG]) {
        // Input: Pillow's own decoded pixels, so only the resize is under test.
        let input = rgb_from_tensor(&st, &format!("decoded_rgb/{name}"));
        let want = rgb_from_tensor(&st, &format!("resized_rgb/{name}"));
        assert_eq!((want.width, want.height), (SIZE, SIZE));
        let got = resize_bicubic(&input, SIZE, SIZE);
        let d = max_level_diff(&got.data, &want.data);
        let n = got.data.iter().zip(&want.data).filter(|(a, b)| a != b).count();
        println!("resized_rgb/{name}: max level diff {d}, {n} values differ");
        assert_eq!(d, 0, "{name}");
    }
}

#[test]
fn png_pixels_match_reference() {
    let (Some(dir), Some(bytes)) = (fixture_dir(), expected_bytes()) else {
        return;
    };
    let st = SafeTensors::deserialize(bytes).unwrap();
    for name in PNGS {
        let (shape, want) = tensor_f32(&st, &format!("pixels/{name}"));
        assert_eq!(shape, vec![3, SIZE as usize, SIZE as usize]);
        let got = preprocess(&dir.join(name), SIZE).unwrap();
        let d = max_abs_diff(&got, &want);
        let bit_exact = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
        println!("pixels/{name}: max abs diff {d:e}, bit-exact {bit_exact}");
        assert!(d <= 1e-6, "{name}: {d}");
        // normalize_chw of the reference's resized_rgb is the reference's pixels.
        let resized = rgb_from_tensor(&st, &format!("resized_rgb/{name}"));
        assert_eq!(max_abs_diff(&normalize_chw(&resized), &want), 0.0, "{name}");
    }
}

/// `photo.jpg` (baseline, 4:2:0) decodes to exactly Pillow's pixels (libjpeg-turbo's islow IDCT,
/// fancy upsampling and YCbCr tables), so its resized and normalised pixels are the reference's.
#[test]
fn jpeg_decoding_matches_pillow_exactly() {
    let (Some(dir), Some(bytes)) = (fixture_dir(), expected_bytes()) else {
        return;
    };
    let st = SafeTensors::deserialize(bytes).unwrap();
    let want = rgb_from_tensor(&st, &format!("decoded_rgb/{JPEG}"));
    let got = load_rgb(&dir.join(JPEG)).unwrap();
    assert_eq!((got.width, got.height), (300, 500));
    let d = max_level_diff(&got.data, &want.data);
    let n = got.data.iter().zip(&want.data).filter(|(a, b)| a != b).count();
    println!("decoded_rgb/{JPEG}: max level diff {d}, {n} of {} values differ", got.data.len());
    assert_eq!(d, 0, "{JPEG}: {n} values differ");

    let (_, want_px) = tensor_f32(&st, &format!("pixels/{JPEG}"));
    let got_px = preprocess(&dir.join(JPEG), SIZE).unwrap();
    let bit_exact =
        got_px.len() == want_px.len() && got_px.iter().zip(&want_px).all(|(a, b)| a.to_bits() == b.to_bits());
    println!("pixels/{JPEG}: max abs diff {:e}, bit-exact {bit_exact}", max_abs_diff(&got_px, &want_px));
    assert!(bit_exact, "pixels/{JPEG}");
}

fn jpeg_data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/jpeg")
}

/// FNV-1a, 64 bits: pins Pillow's decoded pixels without storing them.
fn fnv1a64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

/// `tests/data/jpeg/*`: the FNV-1a hash of `Image.open(p).convert("RGB")` (37x29, HWC), from
/// Pillow 13.0.0 with libjpeg-turbo 3.2.0 (`make.py` there writes the files and prints these;
/// its docstring says how `q420_arithmetic.jpg` was made).
const GENERATED_JPEGS: [(&str, u64); 8] = [
    ("q444.jpg", 0xa573de599c92866e),
    ("q422.jpg", 0x1e18e0a4e1da6f41),
    ("q420_progressive.jpg", 0x05694a03b67dd78b),
    // The same picture, arithmetic-coded (`jpegtran -arithmetic`): same pixels in Pillow.
    ("q420_arithmetic.jpg", 0x05694a03b67dd78b),
    ("q444_progressive_optimized.jpg", 0x825765ce7d1243d3),
    ("q411_restart.jpg", 0xc5b139ba9a5588b0),
    ("grey.jpg", 0xdb8f1be0f3c117bc),
    ("cmyk.jpg", 0xd197fe4d22f17083),
];

#[test]
fn generated_jpegs_match_pillow_exactly() {
    let mut failed = Vec::new();
    for (name, want) in GENERATED_JPEGS {
        let got = load_rgb(&jpeg_data_dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((got.width, got.height), (37, 29), "{name}");
        let h = fnv1a64(&got.data);
        println!("{name}: fnv1a64 {h:#018x} (Pillow {want:#018x})");
        if h != want {
            failed.push(name);
        }
    }
    assert!(failed.is_empty(), "decoded pixels differ from Pillow's for {failed:?}");
}

/// A diagnostic beside the hash: cmyk.jpg was written from the same RGB picture as q444.jpg
/// (Pillow's RGB -> CMYK, Adobe polarity), so a wrong CMYK polarity or conversion rule shows up
/// as a large difference between the two decodes, while JPEG's own loss keeps it small.
#[test]
fn jpeg_cmyk_is_converted_as_pillow_does() {
    let data = std::fs::read(jpeg_data_dir().join("cmyk.jpg")).unwrap();
    let img = decode_rgb(&data, "cmyk.jpg").unwrap();
    // The CMYK file was written from the RGB picture of q444.jpg by Pillow's RGB->CMYK, whose
    // round trip is lossless apart from JPEG's own loss: the two decodes stay close.
    let rgb = load_rgb(&jpeg_data_dir().join("q444.jpg")).unwrap();
    let mean: f64 =
        img.data.iter().zip(&rgb.data).map(|(a, b)| a.abs_diff(*b) as f64).sum::<f64>() / img.data.len() as f64;
    println!("cmyk.jpg vs q444.jpg: mean level diff {mean:.2}");
    assert!(mean < 8.0, "{mean}");
}

/// Pillow refuses JPEG data that ends early ("image file is truncated"), including a file that
/// only lacks its final EOI marker; libjpeg would pad the picture with grey. Both are
/// [`ImageError::Corrupt`] here, and no cut point panics or aborts.
#[test]
fn truncated_jpeg_is_corrupt() {
    let Some(dir) = fixture_dir() else { return };
    let full = std::fs::read(dir.join(JPEG)).unwrap();
    for (tag, cut) in [("half", full.len() / 2), ("no_eoi", full.len() - 2), ("short10", full.len() - 10)] {
        let e = decode_rgb(&full[..cut], tag).unwrap_err();
        assert!(matches!(e, ImageError::Corrupt { .. }), "{tag}: {e:?}");
        let msg = e.to_string();
        assert!(msg.contains(tag) && msg.contains("truncated"), "{msg}");
    }
    let p = temp_file("truncated.jpg", &full[..full.len() / 3]);
    let e = load_rgb(&p).unwrap_err();
    std::fs::remove_file(&p).ok();
    assert!(matches!(e, ImageError::Corrupt { .. }), "{e:?}");
    // Every cut point: an error, never a panic, an abort or a picture.
    for cut in (0..full.len()).step_by(97) {
        assert!(decode_rgb(&full[..cut], "cut").is_err(), "cut at {cut}");
    }
}

/// Damaged JPEG data (bytes overwritten anywhere) never panics or aborts the process: libjpeg's
/// fatal errors come back as [`ImageError::Corrupt`], its warnings are ignored as in Pillow.
#[test]
fn damaged_jpegs_never_panic() {
    let mut files: Vec<Vec<u8>> =
        GENERATED_JPEGS.iter().map(|(n, _)| std::fs::read(jpeg_data_dir().join(n)).unwrap()).collect();
    if let Some(dir) = fixture_dir() {
        files.push(std::fs::read(dir.join(JPEG)).unwrap());
    }
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let (mut ok, mut corrupt) = (0, 0);
    for data in &files {
        for _ in 0..60 {
            let mut d = data.clone();
            for _ in 0..1 + next() % 4 {
                // Past the 3-byte signature: damaged JPEG data, not another format.
                let i = 3 + (next() % (d.len() as u64 - 3)) as usize;
                d[i] = next() as u8;
            }
            match decode_rgb(&d, "damaged") {
                Ok(img) => {
                    assert_eq!(img.data.len(), img.width as usize * img.height as usize * 3);
                    ok += 1;
                }
                Err(ImageError::Corrupt { .. } | ImageError::TooLarge { .. } | ImageError::ZeroSize { .. }) => {
                    corrupt += 1
                }
                Err(e) => panic!("{e:?}"),
            }
        }
    }
    println!("damaged JPEGs: {ok} decoded, {corrupt} refused");
    assert!(corrupt > 0);
}

/// A JPEG header claiming more pixels than MAX_PIXELS is refused from the header alone.
#[test]
fn huge_jpeg_header_is_refused_before_decoding() {
    let mut d = std::fs::read(jpeg_data_dir().join("q444.jpg")).unwrap();
    // SOF0/SOF2: FF C0|C2, length(2), precision(1), height(2), width(2).
    let i = d.windows(2).position(|w| w[0] == 0xFF && (w[1] == 0xC0 || w[1] == 0xC2)).unwrap();
    d[i + 5..i + 7].copy_from_slice(&20000u16.to_be_bytes());
    d[i + 7..i + 9].copy_from_slice(&20000u16.to_be_bytes());
    match decode_rgb(&d, "huge.jpg").unwrap_err() {
        ImageError::TooLarge { width, height, limit, .. } => {
            assert_eq!((width, height, limit), (20000, 20000, MAX_PIXELS))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn resize_of_a_large_photo_is_fast() {
    let (w, h) = (4000u32, 3000u32);
    let mut img = RgbImage::new_filled(w, h, [0, 0, 0]);
    let mut s = 0x2545_f491_u32;
    for v in img.data.iter_mut() {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        *v = (s >> 24) as u8;
    }
    let t = std::time::Instant::now();
    let out = resize_bicubic(&img, SIZE, SIZE);
    let el = t.elapsed();
    println!("resize 4000x3000 -> 448x448: {:.1} ms", el.as_secs_f64() * 1e3);
    assert_eq!(out.data.len(), (SIZE * SIZE * 3) as usize);
    if !cfg!(debug_assertions) {
        assert!(el.as_secs_f64() < 1.0, "{el:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Errors.
// ---------------------------------------------------------------------------------------------

fn temp_file(tag: &str, bytes: &[u8]) -> PathBuf {
    let p = std::env::temp_dir().join(format!("qvc_image_parity_{}_{tag}", std::process::id()));
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn missing_file() {
    let p = Path::new("/definitely/not/here/qvc_missing.png");
    let e = load_rgb(p).unwrap_err();
    assert!(matches!(e, ImageError::NotFound { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("qvc_missing.png") && msg.contains("not found"), "{msg}");
    assert!(preprocess(p, SIZE).is_err());
}

#[test]
fn empty_file() {
    let p = temp_file("empty.png", &[]);
    let e = load_rgb(&p).unwrap_err();
    std::fs::remove_file(&p).ok();
    assert!(matches!(e, ImageError::Empty { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("empty.png") && msg.contains("0 bytes"), "{msg}");
}

#[test]
fn directory_is_unreadable() {
    let e = load_rgb(&std::env::temp_dir()).unwrap_err();
    assert!(matches!(e, ImageError::Unreadable { .. }), "{e:?}");
}

#[test]
fn truncated_png() {
    let Some(dir) = fixture_dir() else { return };
    let full = std::fs::read(dir.join("shapes.png")).unwrap();
    let p = temp_file("truncated.png", &full[..100]);
    let e = load_rgb(&p).unwrap_err();
    std::fs::remove_file(&p).ok();
    assert!(matches!(e, ImageError::Corrupt { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("truncated.png") && msg.contains("corrupt"), "{msg}");
}

#[test]
fn random_bytes() {
    let mut s = 12345u64;
    let bytes: Vec<u8> = (0..4096)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 56) as u8
        })
        .collect();
    let p = temp_file("random.bin", &bytes);
    let e = load_rgb(&p).unwrap_err();
    std::fs::remove_file(&p).ok();
    assert!(matches!(e, ImageError::UnknownFormat { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("random.bin") && msg.contains("supported"), "{msg}");
    // Random bytes behind a valid signature are corrupt, not unknown.
    for sig in [&b"\x89PNG\r\n\x1a\n"[..], b"\xff\xd8\xff\xe0", b"GIF89a", b"BM"] {
        let mut b = sig.to_vec();
        b.extend_from_slice(&bytes[..200]);
        match decode_rgb(&b, "sig") {
            Err(ImageError::Corrupt { .. } | ImageError::TooLarge { .. } | ImageError::ZeroSize { .. }) => {}
            other => panic!("{:?}: {other:?}", &sig),
        }
    }
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// A real 1x1 PNG whose IHDR is patched to claim `w` x `h` (CRC fixed up).
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let one = RgbImage::new_filled(1, 1, [1, 2, 3]);
    let p = temp_file("one.png", &[]);
    save_png(&one, &p).unwrap();
    let mut b = std::fs::read(&p).unwrap();
    std::fs::remove_file(&p).ok();
    assert_eq!(&b[12..16], b"IHDR");
    b[16..20].copy_from_slice(&w.to_be_bytes());
    b[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32(&b[12..29]);
    b[29..33].copy_from_slice(&crc.to_be_bytes());
    b
}

#[test]
fn huge_header_is_refused_before_decoding() {
    let p = temp_file("huge.png", &png_claiming(20000, 20000));
    let e = load_rgb(&p).unwrap_err();
    std::fs::remove_file(&p).ok();
    match &e {
        ImageError::TooLarge { width, height, limit, .. } => {
            assert_eq!((*width, *height, *limit), (20000, 20000, MAX_PIXELS));
        }
        other => panic!("{other:?}"),
    }
    let msg = e.to_string();
    assert!(msg.contains("huge.png") && msg.contains("20000x20000"), "{msg}");
    // Just under the limit by the header, but the data is a 1x1 image: corrupt, no OOM.
    let e = decode_rgb(&png_claiming(10000, 10000), "big.png").unwrap_err();
    assert!(matches!(e, ImageError::Corrupt { .. }), "{e:?}");
}

#[test]
fn save_png_round_trips() {
    let mut img = RgbImage::new_filled(7, 5, [0, 0, 0]);
    for (i, v) in img.data.iter_mut().enumerate() {
        *v = (i * 37 % 251) as u8;
    }
    let p = temp_file("roundtrip.png", &[]);
    save_png(&img, &p).unwrap();
    let back = load_rgb(&p).unwrap();
    std::fs::remove_file(&p).ok();
    assert_eq!(back, img);
    let e = save_png(&img, Path::new("/definitely/not/here/out.png")).unwrap_err();
    assert!(matches!(e, ImageError::Write { .. }), "{e:?}");
    assert!(e.to_string().contains("out.png"));
}
