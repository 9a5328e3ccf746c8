//! Image loading and the Qwen-VL preprocessing, reproducing the reference bit for bit.
//!
//! The reference (`visual.image_transform` of Qwen-VL) does
//! `Image.open(path).convert("RGB")`, then torchvision `Resize((448, 448), BICUBIC)` (which on a
//! PIL image is Pillow's `Image.resize(..., Image.BICUBIC)`), `ToTensor` and `Normalize` with the
//! CLIP mean and std. Every step here is written to give the same numbers (QWEN-VL.md §3):
//!
//! * [`load_rgb`] / [`decode_rgb`] decode JPEG with libjpeg-turbo's decompressor, as Pillow does
//!   (bit-identical pixels), the other formats with the `image` crate, and convert to 8-bit RGB the
//!   way Pillow's `convert("RGB")` does (see [`decode_rgb`] for the per-format mapping). The image
//!   size is read from the file header and checked against [`MAX_PIXELS`] *before* any pixel
//!   buffer is allocated, and the decoders run under memory limits, so a hostile or huge file
//!   gives an [`ImageError`], never an out-of-memory abort or a panic.
//! * [`resize_bicubic`] is Pillow's separable convolution resampler (`libImaging/Resample.c`, as
//!   in every release up to 12.x): cubic a = -0.5, support widened by the down-scale factor,
//!   weights normalised per output pixel then quantised to 22 fractional bits, horizontal pass
//!   first, each pass rounded and clamped to `u8`, a pass whose size does not change skipped.
//!   It uses the same integer arithmetic, so its output is identical to Pillow's.
//! * [`normalize_chw`] is `ToTensor` + `Normalize` in `f32`, in the reference's order of
//!   operations, so the pixel tensor is bit-identical for the same `u8` input.

use std::fmt;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageFormat, ImageReader, Limits};
use rayon::prelude::*;

/// An 8-bit RGB image, HWC, row-major: pixel (x, y) channel c is at `(y * width + x) * 3 + c`.
#[derive(Clone, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `width * height * 3` bytes.
    pub data: Vec<u8>,
}

impl fmt::Debug for RgbImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RgbImage")
            .field("width", &self.width)
            .field("height", &self.height)
            .field("data_len", &self.data.len())
            .finish()
    }
}

impl RgbImage {
    /// A `width` x `height` image filled with one colour.
    pub fn new_filled(width: u32, height: u32, rgb: [u8; 3]) -> RgbImage {
        let n = width as usize * height as usize;
        let mut data = Vec::with_capacity(n * 3);
        for _ in 0..n {
            data.extend_from_slice(&rgb);
        }
        RgbImage { width, height, data }
    }
}

/// The largest image (width x height, in pixels) that [`load_rgb`] / [`decode_rgb`] accept:
/// 100 megapixels (for example 12000 x 8000). The decoded RGB image then takes at most 300 MB.
pub const MAX_PIXELS: u64 = 100_000_000;

/// The largest image file [`load_rgb`] reads into memory (1 GiB); no realistic compressed image
/// within [`MAX_PIXELS`] comes near it.
pub const MAX_FILE_BYTES: u64 = 1 << 30;

/// Upper bound on what the decoder itself may allocate: the largest pixel buffer it can produce
/// within [`MAX_PIXELS`] (16-bit RGBA, 8 bytes a pixel) plus 64 MiB of working space.
const MAX_DECODER_ALLOC: u64 = MAX_PIXELS * 8 + (64 << 20);

/// The CLIP normalisation constants the reference uses, as Python floats (f64) that torch
/// rounds to `f32` when it builds the mean/std tensors.
const MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
const STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// Why an image could not be loaded, decoded or written. Each message names the file and says
/// what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The file does not exist.
    #[error("image file not found: {path}; check the path (relative paths are resolved from the current directory)")]
    NotFound {
        /// The path as given.
        path: PathBuf,
    },
    /// The file exists but could not be read (permissions, a directory, an I/O error).
    #[error("cannot read image file {path}: {source}; check that it is a readable regular file")]
    Unreadable {
        /// The path as given.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file (or buffer) has no bytes at all.
    #[error("image {path} is empty (0 bytes); the file was probably not written completely, supply the image again")]
    Empty {
        /// File name or description of the buffer.
        path: String,
    },
    /// The bytes are not in a format this build can decode.
    #[error("{path} is not an image in a supported format (PNG, JPEG, WebP, GIF, BMP); convert it to PNG or JPEG")]
    UnknownFormat {
        /// File name or description of the buffer.
        path: String,
    },
    /// The format was recognised but the data is damaged or truncated.
    #[error("image {path} is corrupt or truncated ({detail}); re-export or re-download the file")]
    Corrupt {
        /// File name or description of the buffer.
        path: String,
        /// What the decoder reported.
        detail: String,
    },
    /// The header announces more pixels than [`MAX_PIXELS`].
    #[error("image {path} is {width}x{height} = {} pixels, more than the limit of {limit} pixels; downscale it before use", *width as u64 * *height as u64)]
    TooLarge {
        /// File name or description of the buffer.
        path: String,
        /// Width from the header.
        width: u32,
        /// Height from the header.
        height: u32,
        /// The pixel limit ([`MAX_PIXELS`]).
        limit: u64,
    },
    /// The file is larger than [`MAX_FILE_BYTES`].
    #[error("image file {path} is {bytes} bytes, more than the limit of {limit} bytes; recompress or downscale it")]
    FileTooLarge {
        /// The path as given.
        path: PathBuf,
        /// File size.
        bytes: u64,
        /// The limit ([`MAX_FILE_BYTES`]).
        limit: u64,
    },
    /// The image (or a requested output size) has no pixels.
    #[error("image {path} has zero size ({width}x{height}); nothing to process, supply a non-empty image and size")]
    ZeroSize {
        /// File name or description of the buffer.
        path: String,
        /// Width.
        width: u32,
        /// Height.
        height: u32,
    },
    /// Writing an image failed.
    #[error("cannot write image {path}: {detail}; check that the directory exists and is writable")]
    Write {
        /// Output path.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
}

/// Reads and decodes an image file to 8-bit RGB (see [`decode_rgb`]).
pub fn load_rgb(path: &Path) -> Result<RgbImage, ImageError> {
    let meta = std::fs::metadata(path).map_err(|e| io_error(path, e))?;
    if meta.is_file() && meta.len() > MAX_FILE_BYTES {
        return Err(ImageError::FileTooLarge { path: path.to_path_buf(), bytes: meta.len(), limit: MAX_FILE_BYTES });
    }
    let bytes = std::fs::read(path).map_err(|e| io_error(path, e))?;
    decode_rgb(&bytes, &path.display().to_string())
}

fn io_error(path: &Path, e: std::io::Error) -> ImageError {
    if e.kind() == std::io::ErrorKind::NotFound {
        ImageError::NotFound { path: path.to_path_buf() }
    } else {
        ImageError::Unreadable { path: path.to_path_buf(), source: e }
    }
}

/// Decodes an in-memory image (PNG, JPEG, WebP, GIF or BMP, recognised by content) to 8-bit RGB
/// as Pillow's `Image.open(...).convert("RGB")` does; `name` is used in error messages.
///
/// Mapping of the decoded layouts (Pillow 12 behaviour):
/// * RGB8: as is. RGBA8 and grey+alpha: the alpha channel is **dropped**, not composited (the
///   colour under transparent pixels is kept). Grey8: replicated to three channels. Palette
///   images are expanded through the palette (a transparent palette entry keeps its colour).
///   1/2/4-bit grey is scaled to 0..255 as Pillow's `1`, `L;2`, `L;4` unpackers do.
/// * 16-bit RGB / RGBA / grey+alpha PNG: Pillow opens these with its `RGB;16B`, `RGBA;16B`,
///   `LA;16B` unpackers, which keep the **high byte** of each sample: `v >> 8`.
/// * 16-bit grey PNG: Pillow opens it as mode `I;16`, and `convert("RGB")` (`I16_RGB` in
///   `Convert.c`) **clamps** the value to 255 instead of scaling it: `min(v, 255)`. Odd, but that
///   is what the reference sees.
/// * Anything else (float images from formats not enabled here) goes through the `image` crate's
///   own conversion.
///
/// * JPEG (any file that starts with `FF D8 FF`, as for Pillow): libjpeg-turbo's decoder with
///   Pillow's settings, so the pixels are Pillow's exactly; grey, YCbCr/RGB and CMYK/YCCK files
///   (see `decode_jpeg`). Baseline, progressive, arithmetic-coded, any chroma subsampling.
///   Truncated data is an error, as in Pillow.
///
/// EXIF orientation is ignored, as `Image.open` ignores it. Only the first frame of an animated
/// GIF/WebP is used.
pub fn decode_rgb(bytes: &[u8], name: &str) -> Result<RgbImage, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty { path: name.to_string() });
    }
    // The signature Pillow's JpegImagePlugin accepts (and the `image` crate's guess uses).
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return decode_jpeg(bytes, name);
    }
    let reader = |limits: Limits| -> Result<ImageReader<Cursor<&[u8]>>, ImageError> {
        let mut r = ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| ImageError::Corrupt { path: name.to_string(), detail: e.to_string() })?;
        match r.format() {
            Some(ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP | ImageFormat::Gif | ImageFormat::Bmp) => {}
            _ => return Err(ImageError::UnknownFormat { path: name.to_string() }),
        }
        r.limits(limits);
        Ok(r)
    };
    let mut limits = Limits::default();
    limits.max_alloc = Some(MAX_DECODER_ALLOC);

    // 1. The size from the header only: nothing proportional to the pixel count is allocated.
    let (width, height) = reader(limits.clone())?.into_dimensions().map_err(|e| decode_error(name, e, None))?;
    check_size(name, width, height)?;

    // 2. The pixels, under the allocation limit.
    let img = reader(limits)?.decode().map_err(|e| decode_error(name, e, Some((width, height))))?;
    let rgb = dynamic_to_rgb(img);
    if rgb.width != width || rgb.height != height {
        return Err(ImageError::Corrupt {
            path: name.to_string(),
            detail: format!("header says {width}x{height} but {}x{} pixels were decoded", rgb.width, rgb.height),
        });
    }
    Ok(rgb)
}

fn check_size(name: &str, width: u32, height: u32) -> Result<(), ImageError> {
    if width == 0 || height == 0 {
        return Err(ImageError::ZeroSize { path: name.to_string(), width, height });
    }
    if width as u64 * height as u64 > MAX_PIXELS {
        return Err(ImageError::TooLarge { path: name.to_string(), width, height, limit: MAX_PIXELS });
    }
    Ok(())
}

fn decode_error(name: &str, e: image::ImageError, dims: Option<(u32, u32)>) -> ImageError {
    match (e, dims) {
        (image::ImageError::Limits(_), Some((width, height))) => {
            ImageError::TooLarge { path: name.to_string(), width, height, limit: MAX_PIXELS }
        }
        (image::ImageError::Unsupported(u), _) => {
            ImageError::Corrupt { path: name.to_string(), detail: format!("unsupported variant of the format: {u}") }
        }
        (e, _) => ImageError::Corrupt { path: name.to_string(), detail: e.to_string() },
    }
}

/// Converts whatever the decoder produced to 8-bit RGB the way Pillow's `convert("RGB")` does
/// (see [`decode_rgb`] for the rules).
fn dynamic_to_rgb(img: DynamicImage) -> RgbImage {
    let (width, height) = (img.width(), img.height());
    let n = width as usize * height as usize;
    let mut data = Vec::with_capacity(n * 3);
    match img {
        DynamicImage::ImageRgb8(b) => data = b.into_raw(),
        DynamicImage::ImageRgba8(b) => {
            for p in b.as_raw().chunks_exact(4) {
                data.extend_from_slice(&p[..3]);
            }
        }
        DynamicImage::ImageLuma8(b) => {
            for &v in b.as_raw() {
                data.extend_from_slice(&[v, v, v]);
            }
        }
        DynamicImage::ImageLumaA8(b) => {
            for p in b.as_raw().chunks_exact(2) {
                data.extend_from_slice(&[p[0], p[0], p[0]]);
            }
        }
        DynamicImage::ImageLuma16(b) => {
            for &v in b.as_raw() {
                let v = v.min(255) as u8;
                data.extend_from_slice(&[v, v, v]);
            }
        }
        DynamicImage::ImageLumaA16(b) => {
            for p in b.as_raw().chunks_exact(2) {
                let v = (p[0] >> 8) as u8;
                data.extend_from_slice(&[v, v, v]);
            }
        }
        DynamicImage::ImageRgb16(b) => {
            data.extend(b.as_raw().iter().map(|&v| (v >> 8) as u8));
        }
        DynamicImage::ImageRgba16(b) => {
            for p in b.as_raw().chunks_exact(4) {
                data.extend(p[..3].iter().map(|&v| (v >> 8) as u8));
            }
        }
        other => data = other.to_rgb8().into_raw(),
    }
    RgbImage { width, height, data }
}

// ---------------------------------------------------------------------------------------------
// JPEG: libjpeg-turbo's decoder, as Pillow runs it.
// ---------------------------------------------------------------------------------------------

/// Decodes a JPEG exactly as Pillow's `Image.open(...).convert("RGB")` does: with libjpeg-turbo's
/// decompressor (the copy vendored by MozJPEG, built from C source by `mozjpeg-sys`) and Pillow's
/// settings, which are libjpeg's defaults: integer "islow" IDCT, fancy (triangular) chroma
/// upsampling, no block smoothing beyond what libjpeg does for incomplete progressive data.
///
/// As in Pillow's `JpegImagePlugin`: 1 component -> grey (`L`, replicated to RGB); 3 components ->
/// libjpeg's RGB output (YCbCr converted with libjpeg's tables, or RGB as is); 4 components ->
/// libjpeg's CMYK output (YCCK converted by libjpeg), read with Adobe's inverted polarity
/// (`CMYK;I`) and converted to RGB with Pillow's `cmyk2rgb`. Other component counts and
/// precisions other than 8 bits are refused (Pillow refuses them too). Data that ends before
/// the image does is an error (Pillow: "image file is truncated"); other libjpeg warnings
/// (corrupt entropy data, which libjpeg repairs) are ignored, as Pillow ignores them.
fn decode_jpeg(bytes: &[u8], name: &str) -> Result<RgbImage, ImageError> {
    let (width, height, components, data) =
        jpeg::decode(bytes, &|w, h| check_size(name, w, h)).map_err(|e| match e {
            jpeg::Error::Size(e) => e,
            jpeg::Error::Libjpeg(detail) => ImageError::Corrupt { path: name.to_string(), detail },
        })?;
    let n = width as usize * height as usize;
    let data = match components {
        3 => data,
        1 => {
            let mut rgb = Vec::with_capacity(n * 3);
            for &v in &data {
                rgb.extend_from_slice(&[v, v, v]);
            }
            rgb
        }
        4 => {
            let mut rgb = Vec::with_capacity(n * 3);
            for p in data.chunks_exact(4) {
                rgb.extend_from_slice(&cmyk_inverted_to_rgb([p[0], p[1], p[2], p[3]]));
            }
            rgb
        }
        c => unreachable!("jpeg::decode returns 1, 3 or 4 components, not {c}"),
    };
    Ok(RgbImage { width, height, data })
}

/// One pixel of libjpeg's CMYK output read as Pillow's `CMYK;I` (each byte inverted), then
/// Pillow's `cmyk2rgb` (`Convert.c`): `nk = 255 - k; out = clip(nk - nk * c / 255)` with its
/// rounded integer `MULDIV255`.
fn cmyk_inverted_to_rgb(p: [u8; 4]) -> [u8; 3] {
    let [c, m, y, k] = p.map(|v| 255 - v as i32);
    let nk = 255 - k;
    let muldiv255 = |a: i32, b: i32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    [c, m, y].map(|v| (nk - muldiv255(v, nk)).clamp(0, 255) as u8)
}

/// The unsafe boundary with libjpeg. Errors never `exit()` or `longjmp`: the error manager's
/// `error_exit` unwinds (libjpeg is compiled with `-fexceptions`, the bindings are
/// `extern "C-unwind"`) to a `catch_unwind` here, after which the decompressor is destroyed.
mod jpeg {
    use std::ffi::{c_int, c_long, c_ulong};
    use std::mem::MaybeUninit;
    use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

    use ffi::J_COLOR_SPACE::{JCS_CMYK, JCS_GRAYSCALE, JCS_RGB};
    use mozjpeg_sys as ffi;

    use super::{ImageError, MAX_DECODER_ALLOC};

    pub(super) enum Error {
        /// The size check rejected the header's dimensions.
        Size(ImageError),
        /// libjpeg's message (or ours, in its words).
        Libjpeg(String),
    }

    /// The payload that `error_exit` unwinds with.
    struct Fatal(String);

    /// libjpeg's message for the error or warning in `cinfo.err`.
    fn message(cinfo: &mut ffi::jpeg_common_struct) -> String {
        // SAFETY: `cinfo.err` is the error manager installed by `decode` (jpeg_std_error filled
        // `format_message`), and `format_message` writes at most JMSG_LENGTH_MAX (80) bytes,
        // NUL-terminated, into the buffer. The binding declares the buffer `&[u8; 80]`; it is
        // written to, so it is passed as a mutable pointer of the same layout.
        unsafe {
            let err = &*cinfo.err;
            let Some(format) = err.format_message else { return format!("libjpeg error code {}", err.msg_code) };
            let format: unsafe extern "C-unwind" fn(&mut ffi::jpeg_common_struct, *mut [u8; 80]) =
                std::mem::transmute(format);
            let mut buf = [0u8; 80];
            format(cinfo, &mut buf);
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            String::from_utf8_lossy(&buf[..end]).into_owned()
        }
    }

    /// libjpeg's fatal-error hook: must not return. Unwinds to `decode`'s `catch_unwind`
    /// (`resume_unwind` does not run the panic hook, so nothing is printed).
    extern "C-unwind" fn error_exit(cinfo: &mut ffi::jpeg_common_struct) {
        let msg = message(cinfo);
        resume_unwind(Box::new(Fatal(msg)));
    }

    /// libjpeg's warning/trace hook. Running out of data (libjpeg would pad the image with grey)
    /// is fatal, as in Pillow; other warnings are ignored, as in Pillow.
    extern "C-unwind" fn emit_message(cinfo: &mut ffi::jpeg_common_struct, level: c_int) {
        // SAFETY: `cinfo.err` points to the live error manager installed by `decode`.
        let code = unsafe { (*cinfo.err).msg_code };
        if level < 0 && code == ffi::JWRN_JPEG_EOF as c_int {
            let msg = message(cinfo);
            resume_unwind(Box::new(Fatal(format!("{msg}: the image data is truncated"))));
        }
    }

    /// Decodes `bytes`; `check` sees the header's size before anything proportional to it is
    /// allocated. Returns width, height, components (1 grey, 3 RGB, 4 CMYK as libjpeg writes it)
    /// and the interleaved samples.
    #[allow(clippy::type_complexity)]
    pub(super) fn decode(
        bytes: &[u8],
        check: &dyn Fn(u32, u32) -> Result<(), ImageError>,
    ) -> Result<(u32, u32, usize, Vec<u8>), Error> {
        // Boxed: libjpeg keeps pointers to both structs, so their addresses must not change.
        // SAFETY: both are plain C structs for which all-zero is a valid (inert) value;
        // jpeg_std_error and jpeg_CreateDecompress initialise them.
        let mut err: Box<ffi::jpeg_error_mgr> = Box::new(unsafe { MaybeUninit::zeroed().assume_init() });
        let mut cinfo: Box<ffi::jpeg_decompress_struct> = Box::new(unsafe { MaybeUninit::zeroed().assume_init() });
        // SAFETY: `err` outlives `cinfo`'s use (both live to the end of this function, and
        // jpeg_destroy_decompress runs before they drop). The hooks are extern "C-unwind".
        unsafe {
            ffi::jpeg_std_error(&mut err);
        }
        err.error_exit = Some(error_exit);
        err.emit_message = Some(emit_message);
        cinfo.common.err = &mut *err;

        let result = catch_unwind(AssertUnwindSafe(|| -> Result<(u32, u32, usize, Vec<u8>), Error> {
            // SAFETY: the calls follow libjpeg's documented sequence on a struct created by
            // jpeg_create_decompress; `bytes` outlives the decompressor (destroyed below, before
            // this function returns); every libjpeg error unwinds out of this closure.
            unsafe {
                ffi::jpeg_create_decompress(&mut *cinfo);
                // Bounds libjpeg's large buffers (the whole-image coefficient arrays of a
                // progressive JPEG): past it libjpeg fails with "backing store not supported".
                (*cinfo.common.mem).max_memory_to_use = c_long::try_from(MAX_DECODER_ALLOC).unwrap_or(c_long::MAX);
                ffi::jpeg_mem_src(&mut cinfo, bytes.as_ptr(), bytes.len() as c_ulong);
                // require_image = TRUE: a tables-only stream is an error.
                ffi::jpeg_read_header(&mut cinfo, 1);
                let (width, height) = (cinfo.image_width, cinfo.image_height);
                check(width, height).map_err(Error::Size)?;
                let (out, components) = match cinfo.num_components {
                    1 => (JCS_GRAYSCALE, 1),
                    3 => (JCS_RGB, 3),
                    4 => (JCS_CMYK, 4),
                    n => {
                        return Err(Error::Libjpeg(format!(
                            "cannot handle {n}-layer images (only 1, 3 and 4 components)"
                        )))
                    }
                };
                cinfo.out_color_space = out;
                ffi::jpeg_start_decompress(&mut cinfo);
                if cinfo.output_width != width
                    || cinfo.output_height != height
                    || cinfo.output_components as usize != components
                {
                    return Err(Error::Libjpeg(format!(
                        "libjpeg produces {}x{}x{} instead of {width}x{height}x{components}",
                        cinfo.output_width, cinfo.output_height, cinfo.output_components
                    )));
                }
                let stride = width as usize * components;
                let mut data = vec![0u8; stride * height as usize];
                while cinfo.output_scanline < height {
                    let first = cinfo.output_scanline as usize;
                    let mut rows: Vec<*mut u8> =
                        data[first * stride..].chunks_exact_mut(stride).take(16).map(|r| r.as_mut_ptr()).collect();
                    let got = ffi::jpeg_read_scanlines(&mut cinfo, rows.as_mut_ptr(), rows.len() as _);
                    if got == 0 {
                        return Err(Error::Libjpeg("libjpeg returned no scanlines".into()));
                    }
                }
                Ok((width, height, components, data))
            }
        }));
        // SAFETY: created above (destroying a zeroed, never-created struct is also safe: libjpeg
        // checks `mem` for NULL); no pointer into it is used afterwards.
        unsafe {
            ffi::jpeg_destroy_decompress(&mut cinfo);
        }
        match result {
            Ok(r) => r,
            Err(payload) => match payload.downcast::<Fatal>() {
                Ok(f) => Err(Error::Libjpeg(f.0)),
                Err(other) => resume_unwind(other),
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Pillow's BICUBIC resampler (libImaging/Resample.c, Pillow <= 12).
// ---------------------------------------------------------------------------------------------

/// Fractional bits of the fixed-point weights for 8-bit images: `32 - 8 - 2`.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// The bicubic kernel with a = -0.5 (Pillow's `bicubic_filter`), support 2.
fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = if x < 0.0 { -x } else { x };
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Fixed-point weights of one resampling axis: output pixel `i` reads input pixels
/// `start[i] .. start[i] + len[i]` with weights `kk[i * ksize ..][.. len[i]]`.
struct Coeffs {
    ksize: usize,
    start: Vec<usize>,
    len: Vec<usize>,
    kk: Vec<i32>,
}

/// Pillow's `precompute_coeffs` (box = the whole input) followed by `normalize_coeffs_8bpc`.
fn precompute_coeffs(in_size: u32, out_size: u32) -> Coeffs {
    const SUPPORT: f64 = 2.0;
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let out = out_size as usize;
    let mut start = Vec::with_capacity(out);
    let mut len = Vec::with_capacity(out);
    let mut kk = vec![0i32; out * ksize];
    let mut k = vec![0f64; ksize];
    let ss = 1.0 / filterscale;
    for (xx, kk_row) in kk.chunks_exact_mut(ksize).enumerate() {
        let center = (xx as f64 + 0.5) * scale;
        // C `(int)` truncates toward zero; negative values are clamped to 0 anyway.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64).max(xmin as i64) as usize;
        let n = (xmax - xmin).min(ksize);
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = bicubic_filter((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        for (kx, q) in k.iter().zip(kk_row.iter_mut()).take(n) {
            let w = if ww != 0.0 { kx / ww } else { *kx };
            let f = w * (1u32 << PRECISION_BITS) as f64;
            *q = if w < 0.0 { (f - 0.5) as i32 } else { (f + 0.5) as i32 };
        }
        start.push(xmin);
        len.push(n);
    }
    Coeffs { ksize, start, len, kk }
}

/// Pillow's `clip8`: drop the fractional bits and clamp to 0..=255.
#[inline(always)]
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

const ROUND_HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Horizontal pass over input rows `row0 .. row0 + rows` of `src` (width `in_w`).
fn resample_horizontal(src: &[u8], in_w: usize, row0: usize, rows: usize, c: &Coeffs) -> Vec<u8> {
    let out_w = c.start.len();
    let mut out = vec![0u8; out_w * rows * 3];
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(out_w * 3).enumerate().for_each(|(r, orow)| {
        let irow = &src[(row0 + r) * in_w * 3..(row0 + r + 1) * in_w * 3];
        for (xx, o) in orow.chunks_exact_mut(3).enumerate() {
            let xmin = c.start[xx];
            let k = &c.kk[xx * c.ksize..xx * c.ksize + c.len[xx]];
            let px = &irow[xmin * 3..(xmin + k.len()) * 3];
            let (mut s0, mut s1, mut s2) = (ROUND_HALF, ROUND_HALF, ROUND_HALF);
            for (p, &w) in px.chunks_exact(3).zip(k) {
                s0 += p[0] as i32 * w;
                s1 += p[1] as i32 * w;
                s2 += p[2] as i32 * w;
            }
            o[0] = clip8(s0);
            o[1] = clip8(s1);
            o[2] = clip8(s2);
        }
    });
    out
}

/// Vertical pass; `c.start` is relative to the first row of `src` plus `row_offset`
/// (the rows of `src` are input rows `row_offset ..`).
fn resample_vertical(src: &[u8], width: usize, row_offset: usize, c: &Coeffs) -> Vec<u8> {
    let out_h = c.start.len();
    let stride = width * 3;
    let mut out = vec![0u8; stride * out_h];
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(stride).enumerate().for_each_init(
        || vec![0i32; stride],
        |acc, (yy, orow)| {
            acc.fill(ROUND_HALF);
            let ymin = c.start[yy] - row_offset;
            let k = &c.kk[yy * c.ksize..yy * c.ksize + c.len[yy]];
            for (y, &w) in k.iter().enumerate() {
                let irow = &src[(ymin + y) * stride..(ymin + y + 1) * stride];
                for (a, &p) in acc.iter_mut().zip(irow) {
                    *a += p as i32 * w;
                }
            }
            for (o, &a) in orow.iter_mut().zip(acc.iter()) {
                *o = clip8(a);
            }
        },
    );
    out
}

/// Resizes to `width` x `height` exactly as Pillow (<= 12.x) `Image.resize((width, height),
/// Image.BICUBIC)` does on an RGB image (see the module documentation); integer arithmetic,
/// rows in parallel. A zero output size gives an empty image; an empty input gives black.
pub fn resize_bicubic(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (in_w, in_h) = (img.width as usize, img.height as usize);
    let valid = in_w > 0 && in_h > 0 && img.data.len() == in_w * in_h * 3;
    if width == 0 || height == 0 || !valid {
        return RgbImage::new_filled(width, height, [0, 0, 0]);
    }
    let need_h = width != img.width;
    let need_v = height != img.height;
    match (need_h, need_v) {
        (false, false) => img.clone(),
        (true, false) => {
            let ch = precompute_coeffs(img.width, width);
            let data = resample_horizontal(&img.data, in_w, 0, in_h, &ch);
            RgbImage { width, height, data }
        }
        (false, true) => {
            let cv = precompute_coeffs(img.height, height);
            let data = resample_vertical(&img.data, in_w, 0, &cv);
            RgbImage { width, height, data }
        }
        (true, true) => {
            let ch = precompute_coeffs(img.width, width);
            let cv = precompute_coeffs(img.height, height);
            // Only the input rows the vertical pass reads go through the horizontal pass.
            let first = cv.start[0];
            let last = cv.start[cv.start.len() - 1] + cv.len[cv.len.len() - 1];
            let tmp = resample_horizontal(&img.data, in_w, first, last - first, &ch);
            let data = resample_vertical(&tmp, width as usize, first, &cv);
            RgbImage { width, height, data }
        }
    }
}

/// `ToTensor` + `Normalize` in `f32`, output CHW (`[3, height, width]`):
/// `((v as f32 / 255.0) - mean[c]) / std[c]`, in exactly that order, which makes the result
/// bit-identical to the reference for the same `u8` input.
pub fn normalize_chw(img: &RgbImage) -> Vec<f32> {
    let plane = img.width as usize * img.height as usize;
    let mut out = vec![0f32; plane * 3];
    if plane == 0 || img.data.len() != plane * 3 {
        return out;
    }
    for (c, dst) in out.chunks_exact_mut(plane).enumerate() {
        let mean = MEAN[c] as f32;
        let std = STD[c] as f32;
        for (o, p) in dst.iter_mut().zip(img.data.chunks_exact(3)) {
            *o = (p[c] as f32 / 255.0 - mean) / std;
        }
    }
    out
}

/// The whole reference preprocessing: load, convert to RGB, resize to `size` x `size` with
/// Pillow's bicubic, normalise. Returns `[3, size, size]` `f32` values, CHW.
pub fn preprocess(path: &Path, size: u32) -> Result<Vec<f32>, ImageError> {
    if size == 0 {
        return Err(ImageError::ZeroSize {
            path: format!("{} (requested output size)", path.display()),
            width: 0,
            height: 0,
        });
    }
    let img = load_rgb(path)?;
    preprocess_rgb(&img, size, &path.display().to_string())
}

/// [`preprocess`] of a picture already decoded (e.g. by [`decode_rgb`] from
/// bytes a client sent): resize to `size` x `size` with Pillow's bicubic,
/// normalise; `[3, size, size]` CHW. `name` is used in error messages.
pub fn preprocess_rgb(img: &RgbImage, size: u32, name: &str) -> Result<Vec<f32>, ImageError> {
    if size == 0 || img.width == 0 || img.height == 0 {
        return Err(ImageError::ZeroSize { path: name.to_string(), width: img.width, height: img.height });
    }
    Ok(normalize_chw(&resize_bicubic(img, size, size)))
}

/// Writes an RGB image as PNG.
pub fn save_png(img: &RgbImage, path: &Path) -> Result<(), ImageError> {
    let write_err = |detail: String| ImageError::Write { path: path.to_path_buf(), detail };
    if img.data.len() != img.width as usize * img.height as usize * 3 {
        return Err(write_err(format!(
            "the pixel buffer has {} bytes, a {}x{} RGB image needs {}",
            img.data.len(),
            img.width,
            img.height,
            img.width as usize * img.height as usize * 3
        )));
    }
    if img.width == 0 || img.height == 0 {
        return Err(write_err(format!("a PNG cannot be {}x{} (zero size)", img.width, img.height)));
    }
    image::save_buffer_with_format(
        path,
        &img.data,
        img.width,
        img.height,
        image::ExtendedColorType::Rgb8,
        ImageFormat::Png,
    )
    .map_err(|e| write_err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode_png(img: DynamicImage) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(640, 448), (300, 448), (448, 448), (4000, 448), (7, 3), (1, 5)] {
            let c = precompute_coeffs(i, o);
            for xx in 0..o as usize {
                let s: i64 = c.kk[xx * c.ksize..xx * c.ksize + c.len[xx]].iter().map(|&w| w as i64).sum();
                assert!((s - (1 << PRECISION_BITS)).abs() <= c.ksize as i64, "{i}->{o} {xx} {s}");
                assert!(c.start[xx] + c.len[xx] <= i as usize);
            }
        }
    }

    #[test]
    fn constant_image_stays_constant_and_same_size_is_identity() {
        let img = RgbImage::new_filled(37, 23, [10, 200, 255]);
        for (w, h) in [(448, 448), (5, 9), (37, 100), (100, 23), (1, 1)] {
            let r = resize_bicubic(&img, w, h);
            assert_eq!((r.width, r.height), (w, h));
            assert!(r.data.chunks_exact(3).all(|p| p == [10, 200, 255]));
        }
        let mut ramp = RgbImage::new_filled(16, 8, [0, 0, 0]);
        for (i, v) in ramp.data.iter_mut().enumerate() {
            *v = (i * 7 % 256) as u8;
        }
        assert_eq!(resize_bicubic(&ramp, 16, 8), ramp);
        assert_eq!(resize_bicubic(&ramp, 0, 8).data.len(), 0);
        let empty = RgbImage { width: 0, height: 0, data: vec![] };
        assert_eq!(resize_bicubic(&empty, 2, 2).data, vec![0; 12]);
    }

    #[test]
    fn conversions_follow_pillow() {
        // 16-bit grey: clamped (Pillow I;16 -> RGB), not scaled.
        let g16 = image::ImageBuffer::<image::Luma<u16>, _>::from_raw(3, 1, vec![7u16, 255, 40000]).unwrap();
        let rgb = decode_rgb(&encode_png(DynamicImage::ImageLuma16(g16)), "g16").unwrap();
        assert_eq!(rgb.data, vec![7, 7, 7, 255, 255, 255, 255, 255, 255]);
        // 16-bit RGBA: high byte, alpha dropped.
        let c16 =
            image::ImageBuffer::<image::Rgba<u16>, _>::from_raw(1, 1, vec![0x12ffu16, 0xab00, 0x0001, 0]).unwrap();
        let rgb = decode_rgb(&encode_png(DynamicImage::ImageRgba16(c16)), "c16").unwrap();
        assert_eq!(rgb.data, vec![0x12, 0xab, 0x00]);
        // 8-bit grey + alpha: replicated, alpha dropped (not composited).
        let la = image::ImageBuffer::<image::LumaA<u8>, _>::from_raw(2, 1, vec![9u8, 0, 200, 128]).unwrap();
        let rgb = decode_rgb(&encode_png(DynamicImage::ImageLumaA8(la)), "la").unwrap();
        assert_eq!(rgb.data, vec![9, 9, 9, 200, 200, 200]);
    }

    #[test]
    fn normalize_matches_formula_order() {
        let img = RgbImage { width: 2, height: 1, data: vec![0, 128, 255, 1, 2, 3] };
        let t = normalize_chw(&img);
        assert_eq!(t.len(), 6);
        assert_eq!(t[0], (0.0f32 / 255.0 - 0.48145466f64 as f32) / 0.26862954f64 as f32);
        assert_eq!(t[1], (1.0f32 / 255.0 - 0.48145466f64 as f32) / 0.26862954f64 as f32);
        assert_eq!(t[2], (128.0f32 / 255.0 - 0.4578275f64 as f32) / 0.26130258f64 as f32);
        assert_eq!(t[5], (3.0f32 / 255.0 - 0.40821073f64 as f32) / 0.27577711f64 as f32);
    }

    #[test]
    fn bad_buffers_are_errors() {
        assert!(matches!(decode_rgb(&[], "x"), Err(ImageError::Empty { .. })));
        assert!(matches!(decode_rgb(b"hello world, not an image", "x"), Err(ImageError::UnknownFormat { .. })));
        let bad = RgbImage { width: 3, height: 3, data: vec![0; 5] };
        let p = std::env::temp_dir().join(format!("qvc_img_bad_{}.png", std::process::id()));
        assert!(matches!(save_png(&bad, &p), Err(ImageError::Write { .. })));
    }
}
