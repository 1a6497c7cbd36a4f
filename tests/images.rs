//! Tests for `scorecam_gpu::image`: decoding (good and bad files), resizing against PIL,
//! normalization, the jet colormap and overlay, and the atomic file writers.
//!
//! Most inputs are made here at run time in a temp dir. The PIL references under
//! `tests/data/images/` come from `tests/data/images/make_refs.py`.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use image::{DynamicImage, ImageBuffer, ImageFormat, Luma, LumaA, Rgb, RgbImage, Rgba};
use scorecam_gpu::image::{
    colormap_jet, load_rgb, load_rgb_from_bytes, normalize, overlay, read_npy, write_atomic,
    write_npy, write_png, ResizeMode,
};
use scorecam_gpu::job::results::ResultsLog;

// ---------------------------------------------------------------------------------------------
// Allocation watch: the largest single allocation this test binary has made, so the oversized
// image tests can show that nothing big was allocated. No other test here allocates > 16 MiB.
// ---------------------------------------------------------------------------------------------

struct PeakAlloc;
static LARGEST_ALLOC: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for PeakAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST_ALLOC.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST_ALLOC.fetch_max(new_size, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: PeakAlloc = PeakAlloc;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

const S: usize = 32;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/images")
}

/// Encode `img` in `format` to bytes.
fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut buf = Cursor::new(Vec::new());
    img.write_to(&mut buf, format).expect("encode test image");
    buf.into_inner()
}

/// Write `bytes` to `dir/name` and return the path.
fn file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write test input");
    p
}

/// The error of a call that must fail, as its message; checks that it names `path`.
fn err_naming<T: std::fmt::Debug>(r: scorecam_gpu::Result<T>, path: &Path) -> String {
    let msg = r.expect_err("expected an error").to_string();
    assert!(
        msg.contains(&path.display().to_string()),
        "message does not name {}: {msg}",
        path.display()
    );
    msg
}

fn assert_contains(msg: &str, what: &str) {
    assert!(
        msg.to_lowercase().contains(&what.to_lowercase()),
        "expected `{what}` in: {msg}"
    );
}

/// Every pixel of an RGB buffer.
fn pixels(rgb: &[u8]) -> impl Iterator<Item = [u8; 3]> + '_ {
    rgb.chunks_exact(3).map(|p| [p[0], p[1], p[2]])
}

fn assert_all(rgb: &[u8], want: [u8; 3], tol: u8) {
    for (i, p) in pixels(rgb).enumerate() {
        let close = p.iter().zip(want).all(|(&a, b)| a.abs_diff(b) <= tol);
        assert!(close, "pixel {i} is {p:?}, want {want:?} ± {tol}");
    }
}

/// Seeded noise, so resampling is exercised everywhere.
fn noise(w: u32, h: u32, seed: u32) -> RgbImage {
    let mut x = seed.wrapping_mul(2654435761).max(1);
    ImageBuffer::from_fn(w, h, |_, _| {
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        };
        Rgb([next(), next(), next()])
    })
}

// ---------------------------------------------------------------------------------------------
// Bad inputs: clear errors that name the file, never a panic
// ---------------------------------------------------------------------------------------------

#[test]
fn zero_byte_file_is_rejected() {
    let d = tmp();
    let p = file(d.path(), "empty.png", b"");
    let msg = err_naming(load_rgb(&p, S, ResizeMode::Crop), &p);
    assert_contains(&msg, "empty file");
    let msg = err_naming(
        load_rgb_from_bytes(b"", Path::new("mem.png"), S, ResizeMode::Crop),
        Path::new("mem.png"),
    );
    assert_contains(&msg, "empty file");
}

#[test]
fn truncated_png_is_rejected() {
    let d = tmp();
    let png = encode(&DynamicImage::ImageRgb8(noise(64, 64, 1)), ImageFormat::Png);
    let p = file(d.path(), "half.png", &png[..png.len() / 2]);
    let msg = err_naming(load_rgb(&p, S, ResizeMode::Crop), &p);
    assert_contains(&msg, "truncated or corrupt");
}

#[test]
fn text_file_named_png_is_rejected() {
    let d = tmp();
    let p = file(
        d.path(),
        "notes.png",
        b"this is not an image, just some text\n",
    );
    let msg = err_naming(load_rgb(&p, S, ResizeMode::Stretch), &p);
    assert_contains(&msg, "not a recognised image format");
}

#[test]
fn missing_file_and_directory_are_rejected() {
    let d = tmp();
    let p = d.path().join("nope.jpg");
    let msg = err_naming(load_rgb(&p, S, ResizeMode::Crop), &p);
    assert_contains(&msg, "cannot open");
    let msg = err_naming(load_rgb(d.path(), S, ResizeMode::Crop), d.path());
    assert_contains(&msg, "directory");
}

#[test]
fn png_claiming_20000x20000_fails_fast_without_allocating() {
    let d = tmp();
    let p = file(
        d.path(),
        "huge.png",
        &common::png_claiming(20000, 20000, 8, 2),
    );
    let t0 = Instant::now();
    let r = load_rgb(&p, S, ResizeMode::Crop);
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "took {:?}",
        t0.elapsed()
    );
    let msg = err_naming(r, &p);
    assert_contains(&msg, "too large");
    assert_contains(&msg, "16384");
    let largest = LARGEST_ALLOC.load(Ordering::Relaxed);
    assert!(
        largest < 64 << 20,
        "largest allocation so far: {largest} bytes"
    );
}

#[test]
fn png_that_would_need_over_1_gib_is_refused_before_decoding() {
    // 16000×16000 RGBA, 16 bits: within the side limit, but 1.9 GiB of pixels.
    let d = tmp();
    let p = file(
        d.path(),
        "deep.png",
        &common::png_claiming(16000, 16000, 16, 6),
    );
    let t0 = Instant::now();
    let r = load_rgb(&p, S, ResizeMode::Crop);
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "took {:?}",
        t0.elapsed()
    );
    let msg = err_naming(r, &p);
    assert_contains(&msg, "too large");
    let largest = LARGEST_ALLOC.load(Ordering::Relaxed);
    assert!(
        largest < 64 << 20,
        "largest allocation so far: {largest} bytes"
    );
}

#[test]
fn garbage_after_a_valid_signature_is_rejected() {
    let d = tmp();
    let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
    bytes.extend_from_slice(&[0xAB; 100]);
    let p = file(d.path(), "garbage.png", &bytes);
    let msg = err_naming(load_rgb(&p, S, ResizeMode::Crop), &p);
    assert_contains(&msg, "truncated or corrupt");
    // A JPEG signature followed by nothing useful.
    let p = file(
        d.path(),
        "garbage.jpg",
        &[0xFF, 0xD8, 0xFF, 0xE0, 0, 0, 1, 2, 3],
    );
    err_naming(load_rgb(&p, S, ResizeMode::Crop), &p);
}

#[test]
fn damaged_files_of_every_format_give_errors_or_images_never_panics() {
    let img = DynamicImage::ImageRgb8(noise(24, 20, 9));
    let formats = [
        (ImageFormat::Png, "d.png"),
        (ImageFormat::Jpeg, "d.jpg"),
        (ImageFormat::Bmp, "d.bmp"),
        (ImageFormat::Gif, "d.gif"),
        (ImageFormat::Tiff, "d.tiff"),
        (ImageFormat::WebP, "d.webp"),
    ];
    for (format, name) in formats {
        let good = encode(&img, format);
        let name = Path::new(name);
        // Truncations, and single corrupted bytes (a decoder may tolerate those: any image it
        // returns must still be S×S).
        let cuts = (1..20).map(|i| good.len() * i / 20);
        for cut in cuts {
            if let Err(e) = load_rgb_from_bytes(&good[..cut], name, S, ResizeMode::Crop) {
                assert!(e.to_string().contains("d."), "{e}");
            }
        }
        for i in (0..good.len()).step_by(good.len() / 37 + 1) {
            let mut bad = good.clone();
            bad[i] ^= 0x5A;
            if let Ok(rgb) = load_rgb_from_bytes(&bad, name, S, ResizeMode::Stretch) {
                assert_eq!(rgb.len(), S * S * 3);
            }
        }
    }
}

#[test]
fn zero_target_size_is_an_error_not_a_panic() {
    let png = encode(&DynamicImage::ImageRgb8(noise(4, 4, 2)), ImageFormat::Png);
    let name = Path::new("x.png");
    err_naming(load_rgb_from_bytes(&png, name, 0, ResizeMode::Crop), name);
}

// ---------------------------------------------------------------------------------------------
// Colour conversion and formats
// ---------------------------------------------------------------------------------------------

#[test]
fn one_pixel_image_fills_the_output() {
    let img = DynamicImage::ImageRgb8(ImageBuffer::from_pixel(1, 1, Rgb([200, 30, 90])));
    let png = encode(&img, ImageFormat::Png);
    for mode in [ResizeMode::Crop, ResizeMode::Stretch] {
        let rgb = load_rgb_from_bytes(&png, Path::new("one.png"), S, mode).unwrap();
        assert_eq!(rgb.len(), S * S * 3);
        assert_all(&rgb, [200, 30, 90], 0);
    }
}

#[test]
fn gray_and_gray_alpha_become_rgb() {
    let gray = DynamicImage::ImageLuma8(ImageBuffer::from_pixel(S as u32, S as u32, Luma([77])));
    let rgb = load_rgb_from_bytes(
        &encode(&gray, ImageFormat::Png),
        Path::new("g.png"),
        S,
        ResizeMode::Crop,
    )
    .unwrap();
    assert_all(&rgb, [77, 77, 77], 0);

    // Alpha is dropped, not composited over black or white.
    let la = DynamicImage::ImageLumaA8(ImageBuffer::from_pixel(8, 8, LumaA([150, 10])));
    let rgb = load_rgb_from_bytes(
        &encode(&la, ImageFormat::Png),
        Path::new("ga.png"),
        S,
        ResizeMode::Crop,
    )
    .unwrap();
    assert_all(&rgb, [150, 150, 150], 0);
}

#[test]
fn rgba_alpha_is_dropped() {
    let mut img: ImageBuffer<Rgba<u8>, Vec<u8>> =
        ImageBuffer::from_pixel(S as u32, S as u32, Rgba([10, 20, 30, 255]));
    img.put_pixel(5, 7, Rgba([250, 128, 3, 0])); // fully transparent, colour must survive
    let png = encode(&DynamicImage::ImageRgba8(img), ImageFormat::Png);
    let rgb = load_rgb_from_bytes(&png, Path::new("a.png"), S, ResizeMode::Crop).unwrap();
    let at = |x: usize, y: usize| &rgb[(y * S + x) * 3..(y * S + x) * 3 + 3];
    assert_eq!(at(5, 7), &[250, 128, 3]);
    assert_eq!(at(0, 0), &[10, 20, 30]);
}

#[test]
fn sixteen_bit_rgb_is_scaled_to_eight_bits() {
    // PIL keeps the high byte of 16-bit PNG samples: 0x10A0 is 16 there (rounding would say 17).
    let mut img: ImageBuffer<Rgb<u16>, Vec<u16>> =
        ImageBuffer::from_pixel(S as u32, S as u32, Rgb([65535, 0x8080, 0]));
    img.put_pixel(1, 0, Rgb([0x0101, 0xFFFF, 0x10A0]));
    let png = encode(&DynamicImage::ImageRgb16(img), ImageFormat::Png);
    let rgb = load_rgb_from_bytes(&png, Path::new("deep.png"), S, ResizeMode::Crop).unwrap();
    assert_eq!(&rgb[..6], &[255, 128, 0, 1, 255, 16]);

    // 16-bit gray and gray+alpha are scaled the same way (alpha dropped).
    let gray = DynamicImage::ImageLumaA16(ImageBuffer::from_pixel(4, 4, LumaA([0x8080u16, 7])));
    let rgb = load_rgb_from_bytes(
        &encode(&gray, ImageFormat::Png),
        Path::new("g16.png"),
        S,
        ResizeMode::Crop,
    )
    .unwrap();
    assert_all(&rgb, [128, 128, 128], 0);
}

#[test]
fn jpeg_decodes_to_about_the_right_colour() {
    let img = DynamicImage::ImageRgb8(ImageBuffer::from_pixel(48, 40, Rgb([30, 160, 220])));
    let jpg = encode(&img, ImageFormat::Jpeg);
    let rgb = load_rgb_from_bytes(&jpg, Path::new("c.jpg"), S, ResizeMode::Crop).unwrap();
    assert_all(&rgb, [30, 160, 220], 4);
}

#[test]
fn truncated_jpegs_are_rejected_not_filled_with_grey() {
    // The decoder alone would return a mostly grey image for all of these; PIL refuses them.
    let img = DynamicImage::ImageRgb8(noise(64, 48, 3));
    let jpg = encode(&img, ImageFormat::Jpeg);
    let sos = jpg.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap();
    for cut in [sos + 20, jpg.len() / 2, jpg.len() - 2] {
        let e = load_rgb_from_bytes(&jpg[..cut], Path::new("t.jpg"), S, ResizeMode::Crop)
            .expect_err("a truncated JPEG must fail");
        assert_contains(&e.to_string(), "truncated");
        assert!(
            !scorecam_gpu::image::jpeg_is_complete(&jpg[..cut]),
            "cut at {cut}"
        );
    }
    // A complete one, with bytes after its end marker (some cameras append data), is fine, and
    // an EXIF-like segment whose payload holds an end marker before the scan does not fool it.
    let mut tail = jpg.clone();
    tail.extend_from_slice(b"trailer");
    assert!(load_rgb_from_bytes(&tail, Path::new("t.jpg"), S, ResizeMode::Crop).is_ok());
    let mut app1 = jpg[..2].to_vec();
    app1.extend_from_slice(&[0xFF, 0xE1, 0x00, 0x08, b'E', b'x', 0xFF, 0xD8, 0xFF, 0xD9]);
    app1.extend_from_slice(&jpg[2..]);
    assert!(scorecam_gpu::image::jpeg_is_complete(&app1));
    let cut = app1.len() / 2;
    assert!(!scorecam_gpu::image::jpeg_is_complete(&app1[..cut]));
    assert!(load_rgb_from_bytes(&app1[..cut], Path::new("t.jpg"), S, ResizeMode::Crop).is_err());
}

#[cfg(unix)]
#[test]
fn fifos_and_devices_are_refused_without_reading() {
    let d = tmp();
    let fifo = d.path().join("pipe.png");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    // No writer ever opens the FIFO: a blocking open would hang this test forever.
    let msg = err_naming(load_rgb(&fifo, S, ResizeMode::Crop), &fifo);
    assert_contains(&msg, "FIFO");
    let zero = Path::new("/dev/zero");
    let msg = err_naming(load_rgb(zero, S, ResizeMode::Crop), zero);
    assert_contains(&msg, "character device");
}

#[test]
fn cmyk_jpeg_converts_to_rgb() {
    // Made by PIL: Image.new("CMYK", (16, 16), (0, 255, 255, 0)), which PIL reads back as red.
    let p = data_dir().join("cmyk_red.jpg");
    let rgb = load_rgb(&p, S, ResizeMode::Crop).unwrap();
    assert_all(&rgb, [255, 0, 0], 8);
}

#[test]
fn other_lossless_formats_round_trip() {
    let img = DynamicImage::ImageRgb8(noise(S as u32, S as u32, 3));
    for (format, name) in [
        (ImageFormat::Bmp, "x.bmp"),
        (ImageFormat::Tiff, "x.tiff"),
        (ImageFormat::WebP, "x.webp"),
    ] {
        let got = load_rgb_from_bytes(&encode(&img, format), Path::new(name), S, ResizeMode::Crop)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(got, img.as_bytes(), "{name}");
    }
    // GIF is paletted: use few colours so it stays exact.
    let flat = DynamicImage::ImageRgba8(ImageBuffer::from_fn(S as u32, S as u32, |x, _| {
        if x < 16 {
            Rgba([255, 0, 0, 255])
        } else {
            Rgba([0, 0, 255, 255])
        }
    }));
    let got = load_rgb_from_bytes(
        &encode(&flat, ImageFormat::Gif),
        Path::new("x.gif"),
        S,
        ResizeMode::Crop,
    )
    .unwrap();
    assert_eq!(got, flat.to_rgb8().into_raw());
}

#[test]
fn extension_does_not_matter_content_does() {
    let d = tmp();
    let img = DynamicImage::ImageRgb8(noise(S as u32, S as u32, 4));
    let p = file(
        d.path(),
        "really_a_png.jpg",
        &encode(&img, ImageFormat::Png),
    );
    assert_eq!(load_rgb(&p, S, ResizeMode::Crop).unwrap(), img.as_bytes());
}

// ---------------------------------------------------------------------------------------------
// Geometry
// ---------------------------------------------------------------------------------------------

#[test]
fn image_already_sxs_is_returned_unchanged() {
    let img = DynamicImage::ImageRgb8(noise(S as u32, S as u32, 5));
    let png = encode(&img, ImageFormat::Png);
    for mode in [ResizeMode::Crop, ResizeMode::Stretch] {
        let got = load_rgb_from_bytes(&png, Path::new("same.png"), S, mode).unwrap();
        assert_eq!(got, img.as_bytes());
    }
}

#[test]
fn crop_keeps_the_middle_stretch_keeps_everything() {
    // 64×32: left and right quarters red, middle half blue.
    let img = DynamicImage::ImageRgb8(ImageBuffer::from_fn(64, 32, |x, _| {
        if (16..48).contains(&x) {
            Rgb([0, 0, 255])
        } else {
            Rgb([255, 0, 0])
        }
    }));
    let png = encode(&img, ImageFormat::Png);
    let crop = load_rgb_from_bytes(&png, Path::new("w.png"), 32, ResizeMode::Crop).unwrap();
    assert_all(&crop, [0, 0, 255], 0);

    let stretch = load_rgb_from_bytes(&png, Path::new("w.png"), 32, ResizeMode::Stretch).unwrap();
    for y in 0..32 {
        let px = |x: usize| &stretch[(y * 32 + x) * 3..(y * 32 + x) * 3 + 3];
        assert_eq!(px(0), &[255, 0, 0], "left edge, row {y}");
        assert_eq!(px(31), &[255, 0, 0], "right edge, row {y}");
        assert_eq!(px(16), &[0, 0, 255], "middle, row {y}");
    }
}

#[test]
fn tall_image_is_cropped_vertically() {
    // 16×48, top third green, then white, bottom third green; crop to 16 keeps only white.
    let img = DynamicImage::ImageRgb8(ImageBuffer::from_fn(16, 48, |_, y| {
        if (16..32).contains(&y) {
            Rgb([255, 255, 255])
        } else {
            Rgb([0, 255, 0])
        }
    }));
    let got = load_rgb_from_bytes(
        &encode(&img, ImageFormat::Png),
        Path::new("t.png"),
        16,
        ResizeMode::Crop,
    )
    .unwrap();
    assert_all(&got, [255, 255, 255], 0);
}

#[test]
fn extreme_aspect_ratio_does_not_blow_up() {
    // Resize(32) would make this 32×81920 px; only the crop window is resampled.
    let img = DynamicImage::ImageRgb8(ImageBuffer::from_pixel(1, 2560, Rgb([9, 99, 199])));
    let got = load_rgb_from_bytes(
        &encode(&img, ImageFormat::Png),
        Path::new("thin.png"),
        S,
        ResizeMode::Crop,
    )
    .unwrap();
    assert_all(&got, [9, 99, 199], 0);
}

#[test]
fn resampling_matches_pil_bit_for_bit() {
    // References made by tests/data/images/make_refs.py with PIL (torchvision's code path for
    // PIL images): noise, so any difference in scale, crop offset (42x40 needs Python's
    // round-half-to-even), pixel centres or fixed-point rounding shows.
    let dir = data_dir();
    let sizes = [
        "40x27", "27x40", "42x40", "70x19", "5x3", "33x33", "32x50", "300x4",
    ];
    for size in sizes {
        let input = dir.join(format!("pil_{size}.png"));
        for (mode, tag) in [
            (ResizeMode::Crop, "crop32"),
            (ResizeMode::Stretch, "stretch32"),
        ] {
            let want = image::open(dir.join(format!("pil_{size}__{tag}.png")))
                .unwrap()
                .to_rgb8()
                .into_raw();
            let got = load_rgb(&input, 32, mode).unwrap();
            let off = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| a.abs_diff(*b))
                .max()
                .unwrap();
            assert!(
                off == 0,
                "{size} {tag}: {off} values differ from PIL, by up to {worst}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Normalization against torchvision (golden fixtures from another script)
// ---------------------------------------------------------------------------------------------

#[test]
fn normalize_matches_hand_computation() {
    // 1×1 would be too small to show the layout: use S=2.
    let rgb = [0u8, 128, 255, 10, 20, 30, 255, 255, 255, 1, 2, 3];
    let mean = [0.485, 0.456, 0.406];
    let std = [0.229, 0.224, 0.225];
    let x = normalize(&rgb, 2, mean, std);
    assert_eq!(x.len(), 12);
    // CHW: channel 0 holds the R of the 4 pixels, then G, then B.
    let want_r = [
        (0.0 - 0.485) / 0.229,
        (10.0 / 255.0 - 0.485) / 0.229,
        (1.0 - 0.485) / 0.229,
        (1.0 / 255.0 - 0.485) / 0.229,
    ];
    let want_g = [
        (128.0 / 255.0 - 0.456) / 0.224,
        (20.0 / 255.0 - 0.456) / 0.224,
        (1.0 - 0.456) / 0.224,
        (2.0 / 255.0 - 0.456) / 0.224,
    ];
    let want_b = [
        (1.0 - 0.406) / 0.225,
        (30.0 / 255.0 - 0.406) / 0.225,
        (1.0 - 0.406) / 0.225,
        (3.0 / 255.0 - 0.406) / 0.225,
    ];
    let want: Vec<f32> = want_r
        .iter()
        .chain(&want_g)
        .chain(&want_b)
        .map(|&v: &f64| v as f32)
        .collect();
    for (i, (a, b)) in x.iter().zip(&want).enumerate() {
        assert!((a - b).abs() < 1e-6, "element {i}: {a} vs {b}");
    }
}

/// Compare against the torchvision preprocessing goldens (tests/fixtures/make_fixtures.py):
/// the resampled 8-bit pixels (`..._pixels.npy`, CHW) and the normalized tensor.
fn check_golden(mode: ResizeMode) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let img = root.join("img_wide.png");
    let golden = root.join(format!("golden/preprocess__img_wide__{}.npy", mode.name()));
    // The goldens are committed: a missing one is a failure, not a skip.
    assert!(img.exists(), "{} is missing", img.display());
    assert!(golden.exists(), "{} is missing", golden.display());
    let rgb = load_rgb(&img, 32, mode).unwrap();
    let pixels = root.join(format!(
        "golden/preprocess__img_wide__{}_pixels.npy",
        mode.name()
    ));
    if let Ok((want, _)) = read_npy(&pixels) {
        // CHW golden vs HWC view: the resampling is Pillow's, bit for bit.
        let plane = 32 * 32;
        let diffs: Vec<f32> = (0..plane * 3)
            .map(|i| (f32::from(rgb[(i % plane) * 3 + i / plane]) - want[i]).abs())
            .collect();
        let worst = diffs.iter().copied().fold(0.0f32, f32::max);
        let off = diffs.iter().filter(|&&d| d > 0.0).count();
        println!("preprocess img_wide {}: {off} of {} 8-bit values differ from torchvision, by at most {worst}", mode.name(), diffs.len());
        assert!(
            worst <= 1.0,
            "{}: pixels differ by {worst} levels",
            mode.name()
        );
    }
    let (want, shape) = read_npy(&golden).unwrap();
    let x = normalize(&rgb, 32, [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]);
    assert_eq!(x.len(), want.len(), "golden shape {shape:?}");
    let max_diff = x
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    println!(
        "preprocess img_wide {}: max abs difference vs torchvision {max_diff:e}",
        mode.name()
    );
    assert!(
        max_diff <= 0.05,
        "{}: max abs difference {max_diff}",
        mode.name()
    );
}

#[test]
fn preprocessing_matches_torchvision_goldens_crop() {
    check_golden(ResizeMode::Crop);
}

#[test]
fn preprocessing_matches_torchvision_goldens_stretch() {
    check_golden(ResizeMode::Stretch);
}

// ---------------------------------------------------------------------------------------------
// Colormap and overlay
// ---------------------------------------------------------------------------------------------

#[test]
fn colormap_jet_endpoints_match_opencv() {
    let c = colormap_jet(&[0.0, 1.0, 0.5, 0.25, 0.75]);
    assert_eq!(&c[0..3], &[0, 0, 128], "0 → dark blue");
    assert_eq!(&c[3..6], &[128, 0, 0], "1 → dark red");
    // 0.5 → index 127 (np.uint8(127.5)): OpenCV gives (126, 255, 130).
    assert_eq!(&c[6..9], &[126, 255, 130], "0.5 → green");
    // 0.25 → index 63: (0, 124, 255); 0.75 → index 191: (255, 128, 0).
    assert_eq!(&c[9..12], &[0, 124, 255]);
    assert_eq!(&c[12..15], &[255, 128, 0]);
    // Out-of-range and NaN do not panic.
    assert_eq!(
        colormap_jet(&[-1.0, 2.0, f32::NAN]),
        vec![0, 0, 128, 128, 0, 0, 0, 0, 128]
    );
}

#[test]
fn overlay_matches_show_cam_on_image() {
    // Two pixels: map 1.0 on white, map 0.0 on black, weight 0.5.
    // heat = (128,0,0)/255 and (0,0,128)/255; cam = 0.5·heat + 0.5·img; max = 0.5 + 0.5·128/255.
    let out = overlay(&[255, 255, 255, 0, 0, 0], &[1.0, 0.0], 0.5);
    let max = 0.5f32 * (128.0 / 255.0) + 0.5;
    let v =
        |heat: f32, img: f32| (255.0 * ((0.5 * (heat / 255.0) + 0.5 * (img / 255.0)) / max)) as u8;
    assert_eq!(
        out,
        vec![
            v(128.0, 255.0),
            v(0.0, 255.0),
            v(0.0, 255.0),
            v(0.0, 0.0),
            v(0.0, 0.0),
            v(128.0, 0.0)
        ]
    );
    assert_eq!(out[0], 255);
    // Black image at full image weight: no division by zero.
    assert_eq!(overlay(&[0, 0, 0], &[0.3], 1.0), vec![0, 0, 0]);
}

#[test]
fn heatmap_and_overlay_match_opencv_and_grad_cam() {
    // References from make_refs.py: cv2.applyColorMap(COLORMAP_JET) and pytorch-grad-cam
    // 1.5.7's show_cam_on_image(img / 255, map, use_rgb=True) on a random 16×16 map.
    let dir = data_dir();
    let (map, shape) = read_npy(&dir.join("cam_map.npy")).unwrap();
    assert_eq!(shape, vec![16, 16]);
    let rgb = image::open(dir.join("cam_img.png"))
        .unwrap()
        .to_rgb8()
        .into_raw();
    let want_heat = image::open(dir.join("cam_heatmap.png"))
        .unwrap()
        .to_rgb8()
        .into_raw();
    let want_overlay = image::open(dir.join("cam_overlay.png"))
        .unwrap()
        .to_rgb8()
        .into_raw();
    assert_eq!(colormap_jet(&map), want_heat);
    assert_eq!(overlay(&rgb, &map, 0.5), want_overlay);
}

// ---------------------------------------------------------------------------------------------
// Writing files
// ---------------------------------------------------------------------------------------------

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect()
}

#[test]
fn npy_round_trip() {
    let d = tmp();
    let p = d.path().join("map.npy");
    let data: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
    write_npy(&p, &data, &[2, 3, 4]).unwrap();
    let (got, shape) = read_npy(&p).unwrap();
    assert_eq!(shape, vec![2, 3, 4]);
    assert_eq!(got, data);
    // The header says little-endian f32, C order, as numpy expects.
    let bytes = std::fs::read(&p).unwrap();
    let header = String::from_utf8_lossy(&bytes[..128]);
    assert!(
        header.contains("'<f4'") && header.contains("'fortran_order': False"),
        "{header}"
    );
    assert!(leftovers(d.path()).is_empty());
}

#[test]
fn npy_errors_name_the_file() {
    let d = tmp();
    let p = d.path().join("bad.npy");
    err_naming(write_npy(&p, &[1.0, 2.0], &[3]), &p);
    assert!(!p.exists());
    let missing = d.path().join("missing.npy");
    err_naming(read_npy(&missing), &missing);
    let junk = file(d.path(), "junk.npy", b"\x93NUMPY garbage");
    err_naming(read_npy(&junk), &junk);
    // A valid header promising far more data than the file holds.
    let mut lying = Vec::new();
    let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000, 1000000), }";
    let padded = format!("{header:<117}\n");
    lying.extend_from_slice(b"\x93NUMPY\x01\x00");
    lying.extend_from_slice(&(padded.len() as u16).to_le_bytes());
    lying.extend_from_slice(padded.as_bytes());
    lying.extend_from_slice(&[0; 16]);
    let lying = file(d.path(), "lying.npy", &lying);
    err_naming(read_npy(&lying), &lying);
}

#[test]
fn write_atomic_under_a_regular_file_fails_cleanly() {
    // Tests run as root, so permission bits would not stop the write: use a path whose parent is
    // a regular file.
    let d = tmp();
    let blocker = file(d.path(), "blocker", b"i am a file");
    let p = blocker.join("out.png");
    let msg = err_naming(write_atomic(&p, b"data"), &p);
    assert_contains(&msg, "cannot create temporary file");
    assert!(!p.exists());
    assert_eq!(std::fs::read(&blocker).unwrap(), b"i am a file");
    assert!(leftovers(d.path()).is_empty(), "{:?}", leftovers(d.path()));

    let missing = d.path().join("no/such/dir/out.npy");
    let msg = err_naming(write_atomic(&missing, b"data"), &missing);
    assert_contains(&msg, "no such file");
}

#[test]
fn write_atomic_onto_a_directory_removes_its_temp_file() {
    let d = tmp();
    let target = d.path().join("taken");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("inside"), b"x").unwrap();
    err_naming(write_atomic(&target, b"data"), &target);
    assert!(target.is_dir());
    assert!(leftovers(d.path()).is_empty(), "{:?}", leftovers(d.path()));
}

#[test]
fn write_atomic_replaces_and_leaves_no_temp_files() {
    let d = tmp();
    let p = d.path().join("out.bin");
    write_atomic(&p, b"first").unwrap();
    write_atomic(&p, b"second").unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), b"second");
    assert!(leftovers(d.path()).is_empty());
}

#[test]
fn write_png_produces_a_decodable_png() {
    let d = tmp();
    let p = d.path().join("heat.png");
    let rgb = colormap_jet(&(0..12).map(|i| i as f32 / 11.0).collect::<Vec<_>>());
    write_png(&p, &rgb, 4, 3).unwrap();
    let back = image::open(&p).unwrap();
    assert_eq!((back.width(), back.height()), (4, 3));
    assert_eq!(back.to_rgb8().into_raw(), rgb);
    // A buffer of the wrong size is an error, not a panic, and leaves nothing behind.
    let q = d.path().join("bad.png");
    err_naming(write_png(&q, &rgb, 5, 3), &q);
    assert!(!q.exists());
}

#[test]
fn results_log_appends_whole_groups_from_concurrent_writers() {
    // Eight writers, each with its own handle (as separate shards would have), append groups of
    // lines under the file's lock: every line whole, none lost.
    let d = tmp();
    let p = d.path().join("results.jsonl");
    std::thread::scope(|s| {
        for t in 0..8 {
            let p = &p;
            s.spawn(move || {
                let mut log = ResultsLog::open(p).unwrap();
                for i in 0..25 {
                    let group: Vec<String> = (0..2)
                        .map(|j| {
                            format!(
                                "{{\"thread\":{t},\"i\":{i},\"j\":{j},\"pad\":\"{}\"}}",
                                "x".repeat(5000)
                            )
                        })
                        .collect();
                    log.append(&group).unwrap();
                }
            });
        }
    });
    let text = std::fs::read_to_string(&p).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 400);
    assert!(text.ends_with('\n'));
    for l in lines {
        serde_json::from_str::<serde_json::Value>(l)
            .unwrap_or_else(|e| panic!("broken line {l}: {e}"));
    }
    let mut log = ResultsLog::open(&p).unwrap();
    err_naming(log.append(&["two\nlines".into()]), &p);
    let bad = d.path().join("blocker");
    std::fs::write(&bad, b"").unwrap();
    let under = bad.join("results.jsonl");
    err_naming(ResultsLog::open(&under).map(|_| ()), &under);
}

#[test]
fn resize_mode_parses_and_names() {
    assert_eq!("crop".parse::<ResizeMode>().unwrap(), ResizeMode::Crop);
    assert_eq!(
        "stretch".parse::<ResizeMode>().unwrap(),
        ResizeMode::Stretch
    );
    assert_eq!(ResizeMode::Crop.name(), "crop");
    assert_eq!(ResizeMode::Stretch.name(), "stretch");
    let e = "squash".parse::<ResizeMode>().unwrap_err().to_string();
    assert!(e.contains("squash") && e.contains("crop"), "{e}");
}
