//! Image decoding and preprocessing, colormaps and overlays, atomic PNG/NPY writing.
//!
//! Preprocessing reproduces the reference Python pipeline
//! `PIL.Image.open(p).convert("RGB")` → torchvision `Resize(S)` + `CenterCrop(S)` (or a plain
//! resize to S×S) → `ToTensor()` + `Normalize(mean, std)`. The resampling is a port of Pillow's
//! (13.x) 8-bit bilinear resampler and gives the same bytes; fast_image_resize was tried first
//! but follows Pillow-SIMD's 16-bit weights and lands one level off on ~a quarter of the values.
//! Heatmaps and overlays follow pytorch-grad-cam's `show_cam_on_image` (OpenCV's COLORMAP_JET).
//!
//! Every function that touches a file returns an error that names that file; no input, however
//! malformed, makes this module panic.

use std::fs::{self, File, OpenOptions};
use std::io::{Cursor, Read, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use image::error::LimitErrorKind;
use image::{DynamicImage, ImageDecoder, ImageError, ImageReader, Limits, RgbImage};

use crate::error::{Error, Result};

/// Largest accepted image side, in pixels (decoding is refused above it).
pub const MAX_IMAGE_SIDE: u32 = 16384;
/// Largest decoded pixel buffer we allow a decoder to allocate.
pub const MAX_DECODE_BYTES: u64 = 1 << 30;

// ---------------------------------------------------------------------------------------------
// Resize mode
// ---------------------------------------------------------------------------------------------

/// How an image is brought to the model's S×S input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResizeMode {
    /// Shorter side to S, then a centered S×S crop (torchvision `Resize(S)` + `CenterCrop(S)`).
    Crop,
    /// Resize straight to S×S, ignoring the aspect ratio.
    Stretch,
}

impl ResizeMode {
    /// The name used on the command line and in result files.
    pub fn name(self) -> &'static str {
        match self {
            ResizeMode::Crop => "crop",
            ResizeMode::Stretch => "stretch",
        }
    }
}

impl FromStr for ResizeMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "crop" => Ok(ResizeMode::Crop),
            "stretch" => Ok(ResizeMode::Stretch),
            other => Err(Error::Usage(format!(
                "unknown resize mode `{other}` (expected `crop` or `stretch`)"
            ))),
        }
    }
}

impl std::fmt::Display for ResizeMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// Decode an image file and return the model's view of it: S×S RGB u8, HWC, row-major.
///
/// - Formats: whatever the `image` crate decodes (PNG, JPEG incl. CMYK, BMP, GIF first frame,
///   TIFF, WebP), recognised by content, not by file extension. Gray, gray+alpha, RGBA, 16-bit
///   and float images become RGB8 like PIL's `.convert("RGB")`: alpha is dropped (not
///   composited), 16-bit samples are scaled to 8 bits by keeping the high byte as PIL does
///   (65535 → 255, 0x8080 → 128, 0x10A0 → 16).
/// - Images over [`MAX_IMAGE_SIDE`] per side, or whose decoded pixels would need more than
///   [`MAX_DECODE_BYTES`], are refused from their header, before any pixel buffer is allocated.
/// - An image that is already S×S is returned as decoded (no resampling).
/// - [`ResizeMode::Crop`]: shorter side to S (longer side `floor(S·long/short)`), Pillow's
///   antialiased bilinear filter, then the S×S center crop at `round((h−S)/2)`, `round((w−S)/2)`
///   with Python's round-half-to-even, as torchvision does on PIL images. Only the kept block is
///   computed. [`ResizeMode::Stretch`]: the same filter straight to S×S. Both give the same bytes
///   as torchvision 0.26 with Pillow 13.
pub fn load_rgb(path: &Path, s: usize, mode: ResizeMode) -> Result<Vec<u8>> {
    load_rgb_sized(path, s, mode).map(|(rgb, _)| rgb)
}

/// [`load_rgb`], and the decoded image's original `(width, height)` (to map boxes drawn on it).
pub fn load_rgb_sized(path: &Path, s: usize, mode: ResizeMode) -> Result<(Vec<u8>, (u32, u32))> {
    let bytes = read_image_file(path)?;
    decode_view(&bytes, path, s, mode)
}

/// Decode `bytes` and bring them to the model's S×S view; also the original size.
fn decode_view(
    bytes: &[u8],
    name: &Path,
    s: usize,
    mode: ResizeMode,
) -> Result<(Vec<u8>, (u32, u32))> {
    if bytes.is_empty() {
        return Err(Error::image(name, "empty file (0 bytes), not an image"));
    }
    let rgb = decode_rgb(bytes, name)?;
    let size = rgb.dimensions();
    Ok((model_view(rgb, s, mode, name)?, size))
}

/// Largest image file read into memory (a camera JPEG is a few MiB).
pub const MAX_FILE_BYTES: u64 = 1 << 30;

/// Read a whole image file. Only regular files are read: the file is opened without blocking
/// (a FIFO would otherwise stall the caller until a writer appears) and checked with `fstat`
/// before a byte is read, so a FIFO, socket or device is an error that names what it is.
pub fn read_image_file(path: &Path) -> Result<Vec<u8>> {
    let mut open = OpenOptions::new();
    open.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        open.custom_flags(libc::O_NONBLOCK);
    }
    let mut file = open
        .open(path)
        .map_err(|e| Error::image(path, format!("cannot open: {e}")))?;
    let meta = file
        .metadata()
        .map_err(|e| Error::image(path, format!("cannot read: {e}")))?;
    if !meta.is_file() {
        return Err(Error::image(path, not_a_regular_file(&meta.file_type())));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(Error::image(
            path,
            format!(
                "file too large: {} MiB (limit {} MiB)",
                meta.len() >> 20,
                MAX_FILE_BYTES >> 20
            ),
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.read_to_end(&mut bytes)
        .map_err(|e| Error::image(path, format!("cannot read: {e}")))?;
    Ok(bytes)
}

/// Why a file that is not a regular file cannot be an image, naming what it is.
pub fn not_a_regular_file(ft: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_fifo() {
            return "is a FIFO (named pipe), not a regular file: not read";
        }
        if ft.is_socket() {
            return "is a socket, not a regular file: not read";
        }
        if ft.is_char_device() {
            return "is a character device, not a regular file: not read";
        }
        if ft.is_block_device() {
            return "is a block device, not a regular file: not read";
        }
    }
    if ft.is_dir() {
        "is a directory, not an image file"
    } else if ft.is_symlink() {
        "is a symbolic link that does not lead to a regular file"
    } else {
        "is not a regular file: not read"
    }
}

/// Same as [`load_rgb`], from bytes already in memory (`name` is used in messages).
pub fn load_rgb_from_bytes(
    bytes: &[u8],
    name: &Path,
    s: usize,
    mode: ResizeMode,
) -> Result<Vec<u8>> {
    decode_view(bytes, name, s, mode).map(|(rgb, _)| rgb)
}

/// A JPEG whose data stops before its end-of-image marker is truncated. The decoder would fill
/// the missing blocks with grey and report success (PIL refuses such files: "image file is
/// truncated"), so the marker structure is walked here: segments before the first scan are
/// skipped by their lengths (an EXIF thumbnail's own EOI does not count), entropy-coded data is
/// scanned for the next marker (0xFF followed by anything but a stuffed 0x00 or a restart
/// marker), and the segments between the scans of a progressive JPEG are skipped again.
pub fn jpeg_is_complete(bytes: &[u8]) -> bool {
    if bytes.len() < 4 || bytes[0] != 0xFF || bytes[1] != 0xD8 {
        return false;
    }
    let mut i = 2;
    let mut in_scan = false;
    while i + 1 < bytes.len() {
        if in_scan {
            // Entropy-coded data: find the next real marker.
            match memchr_ff(&bytes[i..]) {
                None => return false,
                Some(off) => i += off,
            }
            let Some(&m) = bytes.get(i + 1) else {
                return false;
            };
            if m == 0x00 || (0xD0..=0xD7).contains(&m) || m == 0xFF {
                i += if m == 0xFF { 1 } else { 2 };
                continue;
            }
            in_scan = false;
            continue;
        }
        if bytes[i] != 0xFF {
            return false; // a marker was expected here: corrupt structure
        }
        let m = bytes[i + 1];
        match m {
            0xFF => i += 1, // fill byte before a marker
            0xD9 => return true,
            0x01 | 0xD0..=0xD7 => i += 2, // markers without a length
            _ => {
                let Some(len) = bytes.get(i + 2..i + 4) else {
                    return false;
                };
                let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
                if len < 2 {
                    return false;
                }
                i += 2 + len;
                in_scan = m == 0xDA;
            }
        }
    }
    false
}

fn memchr_ff(b: &[u8]) -> Option<usize> {
    b.iter().position(|&x| x == 0xFF)
}

/// Decoder limits: the side limit is strict and checked from the header (so a PNG that claims
/// 20000×20000 fails before anything is allocated); `max_alloc` bounds what decoders allocate.
fn decode_limits() -> Limits {
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    limits
}

/// Decode any supported format to RGB8, refusing oversized images before decoding pixels.
fn decode_rgb(bytes: &[u8], name: &Path) -> Result<RgbImage> {
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::image(name, format!("cannot read: {e}")))?;
    if reader.format().is_none() {
        return Err(Error::image(
            name,
            "not a recognised image format (expected PNG, JPEG, BMP, GIF, TIFF or WebP)",
        ));
    }
    if reader.format() == Some(image::ImageFormat::Jpeg) && !jpeg_is_complete(bytes) {
        return Err(Error::image(
            name,
            "truncated or corrupt: the JPEG data ends before its end-of-image marker",
        ));
    }
    reader.limits(decode_limits());
    let decoder = reader.into_decoder().map_err(|e| decode_error(name, e))?;
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        return Err(Error::image(name, format!("image has no pixels ({w}×{h})")));
    }
    // `into_decoder` does not charge the output buffer against `max_alloc`; do it here.
    if decoder.total_bytes() > MAX_DECODE_BYTES {
        return Err(Error::image(
            name,
            format!(
                "image too large: {w}×{h} would need {} MiB to decode (limit {} MiB)",
                decoder.total_bytes() >> 20,
                MAX_DECODE_BYTES >> 20
            ),
        ));
    }
    // Third-party decoders have panicked on hostile input before; a bad file must stay an error.
    let decoded = catch_unwind(AssertUnwindSafe(|| {
        DynamicImage::from_decoder(decoder).map(to_rgb8)
    }));
    match decoded {
        Ok(Ok(rgb)) => Ok(rgb),
        Ok(Err(e)) => Err(decode_error(name, e)),
        Err(_) => Err(Error::image(
            name,
            "truncated or corrupt: the decoder crashed on this file",
        )),
    }
}

/// RGB8 like PIL's `.convert("RGB")`: alpha dropped, gray replicated. 16-bit samples keep
/// their high byte, which is how PIL reads 16-bit RGB PNGs (the image crate would round).
/// (PIL clips 16-bit gray to 255 instead of scaling it; we scale it the same way as RGB.)
fn to_rgb8(img: DynamicImage) -> RgbImage {
    use DynamicImage::*;
    match img {
        ImageRgb16(_) | ImageRgba16(_) | ImageLuma16(_) | ImageLumaA16(_) => {
            let wide = img.into_rgb16();
            let mut out = RgbImage::new(wide.width(), wide.height());
            for (o, &v) in out.iter_mut().zip(wide.iter()) {
                *o = (v >> 8) as u8;
            }
            out
        }
        other => other.into_rgb8(),
    }
}

/// Turn an `image` error into a message that says what is wrong with the file.
fn decode_error(name: &Path, e: ImageError) -> Error {
    let msg = match &e {
        ImageError::Limits(l) => match l.kind() {
            LimitErrorKind::DimensionError => format!(
                "image too large: more than {MAX_IMAGE_SIDE} pixels per side (refused from its header)"
            ),
            LimitErrorKind::InsufficientMemory => {
                format!("image too large: decoding would need more than {} MiB", MAX_DECODE_BYTES >> 20)
            }
            _ => format!("image refused by decoding limits: {e}"),
        },
        ImageError::Unsupported(u) => format!("unsupported image: {u}"),
        ImageError::IoError(io) if io.kind() != std::io::ErrorKind::UnexpectedEof => {
            format!("cannot read: {io}")
        }
        _ => format!("truncated or corrupt: {e}"),
    };
    Error::image(name, msg)
}

/// Bring a decoded image to S×S as the reference transform does.
fn model_view(rgb: RgbImage, s: usize, mode: ResizeMode, name: &Path) -> Result<Vec<u8>> {
    let s = match u32::try_from(s) {
        Ok(s) if (1..=MAX_IMAGE_SIDE).contains(&s) => s,
        _ => {
            return Err(Error::image(
                name,
                format!("cannot resize to {s}×{s}: size must be 1..={MAX_IMAGE_SIDE}"),
            ))
        }
    };
    let (w, h) = rgb.dimensions();
    if (w, h) == (s, s) {
        return Ok(rgb.into_raw());
    }
    Ok(match mode {
        ResizeMode::Stretch => pillow_bilinear(&rgb, s, s, 0, 0, s),
        ResizeMode::Crop => {
            let (rw, rh) = shorter_side_to(w, h, s);
            let (left, top) = (center_offset(rw - s), center_offset(rh - s));
            if (rw, rh) == (w, h) {
                // Shorter side already S: torchvision's resize is a no-op, only the crop remains.
                crop(&rgb, left, top, s)
            } else {
                // Resize and crop in one go: only the kept block is computed, so a 1×16384
                // image (Resize(224) would make it 224×3.7M) costs no more than a small one.
                pillow_bilinear(&rgb, rw, rh, left, top, s)
            }
        }
    })
}

/// torchvision `Resize(S)` output size: shorter side S, longer side `int(S * long / short)`.
pub(crate) fn shorter_side_to(w: u32, h: u32, s: u32) -> (u32, u32) {
    let scaled = |long: u32, short: u32| (u64::from(s) * u64::from(long) / u64::from(short)) as u32;
    if w <= h {
        (s, scaled(h, w))
    } else {
        (scaled(w, h), s)
    }
}

/// torchvision `CenterCrop` offset `int(round(d / 2))`; Python rounds halves to even.
pub(crate) fn center_offset(d: u32) -> u32 {
    let half = d / 2;
    if d % 2 == 1 && half % 2 == 1 {
        half + 1
    } else {
        half
    }
}

/// Pillow's fixed-point precision for 8-bit resampling weights (`PRECISION_BITS` in Resample.c).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Resampling taps of a run of consecutive output positions of one axis, as Pillow computes
/// them (`precompute_coeffs` + `normalize_coeffs_8bpc` in `libImaging/Resample.c`).
struct Taps {
    /// First input index read by each output position.
    start: Vec<usize>,
    /// Fixed-point weights of each output position: `count[i]` used out of `stride` slots.
    weights: Vec<i32>,
    count: Vec<usize>,
    stride: usize,
}

impl Taps {
    /// Taps of outputs `first..first + n` of resizing `in_size` → `out_size` (bilinear,
    /// antialiased: the filter widens by the scale when shrinking).
    fn bilinear(in_size: u32, out_size: u32, first: u32, n: u32) -> Taps {
        let scale = f64::from(in_size) / f64::from(out_size);
        let filter_scale = scale.max(1.0);
        let support = filter_scale; // bilinear support is 1.0, widened when shrinking
        let stride = support.ceil() as usize * 2 + 1;
        let mut taps = Taps {
            start: Vec::with_capacity(n as usize),
            weights: vec![0; n as usize * stride],
            count: Vec::with_capacity(n as usize),
            stride,
        };
        let mut k = vec![0f64; stride];
        for (i, xx) in (first..first + n).enumerate() {
            // Same expressions, in the same order, as Pillow, so the weights are bit-identical.
            let center = (f64::from(xx) + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(i64::from(in_size));
            let len = (xmax - xmin).clamp(0, stride as i64) as usize;
            let mut sum = 0.0;
            for (x, kx) in k[..len].iter_mut().enumerate() {
                let t = ((x as i64 + xmin) as f64 - center + 0.5) * (1.0 / filter_scale);
                *kx = (1.0 - t.abs()).max(0.0);
                sum += *kx;
            }
            for (kx, wx) in k[..len].iter().zip(&mut taps.weights[i * stride..]) {
                let kx = if sum != 0.0 { kx / sum } else { *kx };
                *wx = (0.5 + kx * f64::from(1u32 << PRECISION_BITS)) as i32; // kx >= 0
            }
            taps.start.push(xmin as usize);
            taps.count.push(len);
        }
        taps
    }

    fn len(&self) -> usize {
        self.start.len()
    }

    /// Weights of output `i`.
    fn of(&self, i: usize) -> &[i32] {
        &self.weights[i * self.stride..i * self.stride + self.count[i]]
    }

    /// Input indices read by any of these outputs.
    fn span(&self) -> std::ops::Range<usize> {
        let first = self.start.first().copied().unwrap_or(0);
        let last = (0..self.len())
            .map(|i| self.start[i] + self.count[i])
            .max()
            .unwrap_or(first);
        first..last
    }
}

/// Pillow's rounding and `clip8` of a fixed-point sum.
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow's initial accumulator: adds 0.5 so that the final shift rounds.
const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Resize `src` to `rw`×`rh` as Pillow's `Image.resize((rw, rh), BILINEAR)` does, bit for bit,
/// but compute only the s×s block at (`left`, `top`) of the result: the same pixels as resizing
/// then cropping, without materialising the whole resized image.
///
/// Each pass rounds to 8 bits, so the pass order matters. Pillow 13 (the fixtures' version;
/// older releases always went horizontal first) runs the vertical pass first when the height
/// shrinks by more than twice as many pixels as the width.
fn pillow_bilinear(src: &RgbImage, rw: u32, rh: u32, left: u32, top: u32, s: u32) -> Vec<u8> {
    let (w, h) = src.dimensions();
    let cols = Taps::bilinear(w, rw, left, s);
    let rows = Taps::bilinear(h, rh, top, s);
    let (dw, dh) = (i64::from(w) - i64::from(rw), i64::from(h) - i64::from(rh));
    let vertical_first = dh > 0 && dh > dw * 2;
    let (raw, w) = (src.as_raw().as_slice(), w as usize);
    if vertical_first {
        // Only the source columns the horizontal pass reads.
        let used = cols.span();
        let mid = vertical(raw, w, used.clone(), &rows, 0);
        horizontal(&mid, used.len(), 0..rows.len(), &cols, used.start)
    } else {
        // Only the source rows the vertical pass reads.
        let used = rows.span();
        let mid = horizontal(raw, w, used.clone(), &cols, 0);
        vertical(&mid, cols.len(), 0..cols.len(), &rows, used.start)
    }
}

/// Horizontal pass (Pillow's `ImagingResampleHorizontal_8bpc`) over `rows` of an RGB image
/// `img_w` pixels wide whose column 0 is source column `col_offset`.
fn horizontal(
    img: &[u8],
    img_w: usize,
    rows: std::ops::Range<usize>,
    cols: &Taps,
    col_offset: usize,
) -> Vec<u8> {
    let out_row = cols.len() * 3;
    let mut out = vec![0u8; rows.len() * out_row];
    for (y, out_line) in rows.zip(out.chunks_exact_mut(out_row)) {
        let line = &img[y * img_w * 3..(y + 1) * img_w * 3];
        for (j, out_px) in out_line.chunks_exact_mut(3).enumerate() {
            let px = line[(cols.start[j] - col_offset) * 3..].chunks_exact(3);
            let mut acc = [HALF; 3];
            for (p, &k) in px.zip(cols.of(j)) {
                for c in 0..3 {
                    acc[c] += i32::from(p[c]) * k;
                }
            }
            for c in 0..3 {
                out_px[c] = clip8(acc[c]);
            }
        }
    }
    out
}

/// Vertical pass (Pillow's `ImagingResampleVertical_8bpc`) over pixel columns `cols` of an RGB
/// image `img_w` pixels wide whose row 0 is source row `row_offset`. Works a whole output row at
/// a time so the inner loop runs along memory.
fn vertical(
    img: &[u8],
    img_w: usize,
    cols: std::ops::Range<usize>,
    rows: &Taps,
    row_offset: usize,
) -> Vec<u8> {
    let out_row = cols.len() * 3;
    let mut out = vec![0u8; rows.len() * out_row];
    let mut acc = vec![0i32; out_row];
    for (i, out_line) in out.chunks_exact_mut(out_row).enumerate() {
        acc.fill(HALF);
        for (t, &k) in rows.of(i).iter().enumerate() {
            let y = rows.start[i] - row_offset + t;
            let line = &img[(y * img_w + cols.start) * 3..(y * img_w + cols.end) * 3];
            for (a, &v) in acc.iter_mut().zip(line) {
                *a += i32::from(v) * k;
            }
        }
        for (o, &a) in out_line.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

/// Copy the s×s block at (left, top) out of `src`.
fn crop(src: &RgbImage, left: u32, top: u32, s: u32) -> Vec<u8> {
    let row_bytes = src.width() as usize * 3;
    let (left, top, s) = (left as usize, top as usize, s as usize);
    let raw = src.as_raw();
    let mut out = Vec::with_capacity(s * s * 3);
    for y in top..top + s {
        let start = y * row_bytes + left * 3;
        out.extend_from_slice(&raw[start..start + s * 3]);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Normalization, colormap, overlay
// ---------------------------------------------------------------------------------------------

/// Normalize like torchvision `ToTensor` + `Normalize`: `[3, S, S]` f32 CHW,
/// `(x/255 − mean[c]) / std[c]`, computed in f32 in the same order as torchvision.
///
/// The backends have their own preprocess op; this is the reference both are tested against.
///
/// # Panics
/// If `rgb.len() != 3·s·s` (a caller bug, never an input problem).
pub fn normalize(rgb: &[u8], s: usize, mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
    let plane = s * s;
    assert_eq!(
        rgb.len(),
        plane * 3,
        "normalize: {} bytes is not a {s}×{s} RGB image",
        rgb.len()
    );
    let mut out = vec![0.0f32; plane * 3];
    for (i, px) in rgb.chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (f32::from(px[c]) / 255.0 - mean[c]) / std[c];
        }
    }
    out
}

/// OpenCV's COLORMAP_JET lookup table entry `i`, as RGB.
///
/// OpenCV builds it by interpolating a 256-point float table and rounding to u8; the result is
/// piecewise linear with slope ±4 but with odd steps at the joins (e.g. blue is 254 at 96 and 1
/// at 159) that no closed formula reproduces, so the segments are spelled out. Checked entry by
/// entry against `cv2.applyColorMap(np.arange(256, dtype=np.uint8), cv2.COLORMAP_JET)`.
fn jet_lut(i: u8) -> [u8; 3] {
    let i = i32::from(i);
    let r = match i {
        0..=95 => 0,
        96 => 2,
        97..=158 => 6 + 4 * (i - 97),
        159 => 254,
        160..=223 => 255,
        _ => 252 - 4 * (i - 224),
    };
    let g = match i {
        0..=32 => 0,
        33..=95 => 4 * (i - 32),
        96..=159 => 255,
        160..=223 => 252 - 4 * (i - 160),
        _ => 0,
    };
    let b = match i {
        0..=31 => 128 + 4 * i,
        32..=95 => 255,
        96 => 254,
        97..=158 => 250 - 4 * (i - 97),
        159 => 1,
        _ => 0,
    };
    [r as u8, g as u8, b as u8]
}

/// The LUT index pytorch-grad-cam uses: `np.uint8(255 * mask)` (truncation). Values outside
/// [0,1] are clamped and NaN counts as 0, where numpy's cast would be undefined.
fn jet_index(v: f32) -> u8 {
    let v = if v.is_nan() { 0.0 } else { v.clamp(0.0, 1.0) };
    (255.0f32 * v) as u8
}

/// Jet colormap of a map in \[0,1\] (`map` is `[S*S]`), as OpenCV's COLORMAP_JET (what
/// pytorch-grad-cam's `show_cam_on_image` uses), returned as RGB u8 HWC.
pub fn colormap_jet(map: &[f32]) -> Vec<u8> {
    map.iter().flat_map(|&v| jet_lut(jet_index(v))).collect()
}

/// Overlay like pytorch-grad-cam `show_cam_on_image(img, map, use_rgb=True, image_weight)`:
/// `out = uint8(255 · c / max(c))` with `c = (1−w)·heat + w·img`, heat and img in \[0,1\], all in
/// f32 as numpy does. `rgb` is the S×S model view; `image_weight` is clamped to \[0,1\] (NaN → 0.5).
///
/// # Panics
/// If `rgb.len() != 3 * map.len()` (a caller bug, never an input problem).
pub fn overlay(rgb: &[u8], map: &[f32], image_weight: f32) -> Vec<u8> {
    assert_eq!(
        rgb.len(),
        map.len() * 3,
        "overlay: {} RGB bytes for a map of {} values",
        rgb.len(),
        map.len()
    );
    let w = if image_weight.is_nan() {
        0.5
    } else {
        image_weight.clamp(0.0, 1.0)
    };
    // numpy computes `1 - image_weight` on a Python float, then multiplies in f32.
    let heat_weight = (1.0 - f64::from(w)) as f32;
    let heat = colormap_jet(map);
    let cam: Vec<f32> = heat
        .iter()
        .zip(rgb)
        .map(|(&h, &x)| heat_weight * (f32::from(h) / 255.0) + w * (f32::from(x) / 255.0))
        .collect();
    let max = cam.iter().copied().fold(0.0f32, f32::max);
    if max <= 0.0 {
        // Only possible for a black image at weight 1; numpy would divide by zero.
        return vec![0; cam.len()];
    }
    cam.iter().map(|&c| (255.0 * (c / max)) as u8).collect()
}

// ---------------------------------------------------------------------------------------------
// Writing and reading files
// ---------------------------------------------------------------------------------------------

/// Distinguishes temp files of concurrent writes from one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Write `bytes` to `path` atomically: a temp file in the same directory (named
/// `.<file name>.tmp-<pid>-<counter>`), fsync, rename over `path`. On any failure the temp file
/// is removed and `path` is left as it was (no partial file). Errors are `Error::output(path, ..)`
/// with the OS reason.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let Some(file_name) = path.file_name() else {
        return Err(Error::output(path, "not a file path"));
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{n}",
        file_name.to_string_lossy(),
        std::process::id()
    ));

    let result = write_and_sync(&tmp, bytes).and_then(|()| {
        fs::rename(&tmp, path)
            .map_err(|e| format!("cannot rename {} into place: {e}", tmp.display()))
    });
    if let Err(msg) = result {
        let _ = fs::remove_file(&tmp);
        return Err(Error::output(path, msg));
    }
    // Make the rename itself durable; failing to sync a directory is not worth failing the write.
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Create `tmp` (never reusing an existing file), write `bytes`, fsync.
fn write_and_sync(tmp: &Path, bytes: &[u8]) -> std::result::Result<(), String> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(tmp)
        .map_err(|e| format!("cannot create temporary file {}: {e}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("cannot write temporary file {}: {e}", tmp.display()))
}

/// Encode a PNG (RGB8, `w`×`h`). `name` is the file it is for (in messages).
pub fn encode_png(name: &Path, rgb: &[u8], w: u32, h: u32) -> Result<Vec<u8>> {
    use image::ImageEncoder;
    let expected = w as usize * h as usize * 3;
    if rgb.len() != expected || w == 0 || h == 0 {
        return Err(Error::output(
            name,
            format!("cannot encode {w}×{h} RGB PNG from {} bytes", rgb.len()),
        ));
    }
    let mut buf = Vec::new();
    image::codecs::png::PngEncoder::new(&mut buf)
        .write_image(rgb, w, h, image::ExtendedColorType::Rgb8)
        .map_err(|e| Error::output(name, format!("cannot encode PNG: {e}")))?;
    Ok(buf)
}

/// Encode a PNG (RGB8, `w`×`h`) and write it atomically.
pub fn write_png(path: &Path, rgb: &[u8], w: u32, h: u32) -> Result<()> {
    write_atomic(path, &encode_png(path, rgb, w, h)?)
}

/// Encode an NPY file (little-endian f32, C order, given shape). `name` is the file it is for.
pub fn encode_npy(name: &Path, data: &[f32], shape: &[u64]) -> Result<Vec<u8>> {
    use npyz::WriterBuilder;
    let count = shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
    if count != Some(data.len() as u64) {
        return Err(Error::output(
            name,
            format!("shape {shape:?} does not hold {} values", data.len()),
        ));
    }
    let mut buf = Vec::with_capacity(128 + data.len() * 4);
    let encoded = (|| -> std::io::Result<()> {
        let mut w = npyz::WriteOptions::<f32>::new()
            .default_dtype()
            .shape(shape)
            .writer(&mut buf)
            .begin_nd()?;
        w.extend(data.iter().copied())?;
        w.finish()
    })();
    encoded.map_err(|e| Error::output(name, format!("cannot encode NPY: {e}")))?;
    Ok(buf)
}

/// Encode an NPY file (little-endian f32, C order, given shape) and write it atomically.
pub fn write_npy(path: &Path, data: &[f32], shape: &[u64]) -> Result<()> {
    write_atomic(path, &encode_npy(path, data, shape)?)
}

/// Read an f32 NPY file (f64 files are accepted and narrowed): data and shape, C order.
/// Errors name the file.
pub fn read_npy(path: &Path) -> Result<(Vec<f32>, Vec<u64>)> {
    let bytes = fs::read(path).map_err(|e| Error::image(path, format!("cannot read: {e}")))?;
    // npyz multiplies out the header's shape unchecked; a hostile header must not panic us.
    match catch_unwind(|| parse_npy(&bytes)) {
        Ok(Ok(parsed)) => Ok(parsed),
        Ok(Err(msg)) => Err(Error::image(path, format!("not a usable NPY file: {msg}"))),
        Err(_) => Err(Error::image(path, "not a usable NPY file: corrupt header")),
    }
}

fn parse_npy(bytes: &[u8]) -> std::result::Result<(Vec<f32>, Vec<u64>), String> {
    let npy = npyz::NpyFile::new(bytes).map_err(|e| e.to_string())?;
    if npy.order() != npyz::Order::C {
        return Err("Fortran-order arrays are not supported".into());
    }
    let shape = npy.shape().to_vec();
    // Refuse a header that promises more elements than the file holds before collecting them.
    let bytes_per = npy.dtype().num_bytes().unwrap_or(0) as u64;
    if npy.len().saturating_mul(bytes_per) > bytes.len() as u64 {
        return Err(format!(
            "shape {shape:?} needs more data than the file holds"
        ));
    }
    let data = match npy.try_data::<f32>() {
        Ok(reader) => reader.collect::<std::io::Result<Vec<f32>>>(),
        Err(npy) => match npy.try_data::<f64>() {
            Ok(reader) => reader.map(|v| v.map(|v| v as f32)).collect(),
            Err(npy) => return Err(format!("dtype {} is not f32 or f64", npy.dtype().descr())),
        },
    }
    .map_err(|e| e.to_string())?;
    Ok((data, shape))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_output_size_matches_torchvision() {
        assert_eq!(shorter_side_to(64, 32, 32), (64, 32));
        assert_eq!(shorter_side_to(32, 64, 16), (16, 32));
        // int(224 * 500 / 375) = int(298.66..) = 298
        assert_eq!(shorter_side_to(500, 375, 224), (298, 224));
        assert_eq!(shorter_side_to(1, 1, 7), (7, 7));
    }

    #[test]
    fn center_offset_rounds_half_to_even_like_python() {
        // Python: round(0.5)=0, round(1.5)=2, round(2.5)=2, round(3.5)=4, round(8.5)=8
        let cases = [
            (0, 0),
            (1, 0),
            (2, 1),
            (3, 2),
            (4, 2),
            (5, 2),
            (7, 4),
            (17, 8),
            (19, 10),
        ];
        for (d, want) in cases {
            assert_eq!(center_offset(d), want, "d = {d}");
        }
    }

    #[test]
    fn jet_lut_is_continuous_at_the_joins() {
        // Exact OpenCV values at each segment end (from cv2.applyColorMap).
        let expect = [
            (0, [0, 0, 128]),
            (31, [0, 0, 252]),
            (32, [0, 0, 255]),
            (33, [0, 4, 255]),
            (95, [0, 252, 255]),
            (96, [2, 255, 254]),
            (97, [6, 255, 250]),
            (127, [126, 255, 130]),
            (128, [130, 255, 126]),
            (158, [250, 255, 6]),
            (159, [254, 255, 1]),
            (160, [255, 252, 0]),
            (161, [255, 248, 0]),
            (223, [255, 0, 0]),
            (224, [252, 0, 0]),
            (255, [128, 0, 0]),
        ];
        for (i, rgb) in expect {
            assert_eq!(jet_lut(i), rgb, "index {i}");
        }
    }

    #[test]
    fn jet_lut_matches_the_whole_opencv_table() {
        // Hash of all 256 entries of cv2.applyColorMap(np.arange(256, dtype=np.uint8),
        // cv2.COLORMAP_JET) as RGB: h = h * 1000003 + (r << 16 | g << 8 | b), wrapping.
        let h = (0..=255u8).fold(0u64, |h, i| {
            let [r, g, b] = jet_lut(i);
            h.wrapping_mul(1_000_003)
                .wrapping_add(u64::from(r) << 16 | u64::from(g) << 8 | u64::from(b))
        });
        assert_eq!(h, 16_111_448_335_136_295_615);
    }

    #[test]
    fn jet_index_truncates_and_clamps() {
        assert_eq!(jet_index(0.0), 0);
        assert_eq!(jet_index(1.0), 255);
        assert_eq!(jet_index(0.5), 127); // 127.5 truncated
        assert_eq!(jet_index(-3.0), 0);
        assert_eq!(jet_index(7.0), 255);
        assert_eq!(jet_index(f32::NAN), 0);
    }
}
