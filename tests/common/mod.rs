//! Helpers shared by the integration tests: deterministic data, error measures, fixture loading.
#![allow(dead_code)] // each test crate uses its own subset

use std::path::{Path, PathBuf};
use std::sync::Arc;

use scorecam_gpu::image::{self, ResizeMode};
use scorecam_gpu::{weights, Vgg};
use serde_json::Value;

/// Deterministic pseudo-random values in [-1, 1).
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Pearson correlation (1 when both are constant).
pub fn corr(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let n = a.len() as f64;
    let ma = a.iter().map(|&v| v as f64).sum::<f64>() / n;
    let mb = b.iter().map(|&v| v as f64).sum::<f64>() / n;
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64 - ma, y as f64 - mb);
        sab += x * y;
        saa += x * x;
        sbb += y * y;
    }
    if saa == 0.0 && sbb == 0.0 {
        return 1.0;
    }
    sab / (saa.sqrt() * sbb.sqrt())
}

/// Assert `|got − want| ≤ atol + rtol·|want|` element-wise; returns the worst |Δ|.
pub fn check_tol(got: &[f32], want: &[f32], atol: f32, rtol: f32, what: &str) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = 0f32;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = (g - w).abs();
        assert!(
            d <= atol + rtol * w.abs(),
            "{what}[{i}]: got {g}, want {w} (|Δ| {d})"
        );
        worst = worst.max(d);
    }
    worst
}

/// `tests/fixtures`.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The golden fixtures' manifest, or `None` (with a notice) when it is missing.
pub fn manifest() -> Option<Value> {
    let path = fixtures().join("manifest.json");
    match std::fs::read_to_string(&path) {
        Ok(text) => Some(serde_json::from_str(&text).expect("manifest.json parses")),
        Err(_) => {
            println!("skipped: no {}", path.display());
            None
        }
    }
}

/// A golden array named by a manifest entry.
pub fn npy(rel: &Value) -> Vec<f32> {
    image::read_npy(&fixtures().join(rel.as_str().unwrap()))
        .unwrap()
        .0
}

pub fn fixture_model(file: &Value) -> Arc<Vgg> {
    Arc::new(weights::load(&fixtures().join(file.as_str().unwrap())).unwrap())
}

pub fn fixture_rgb(file: &Value, s: usize) -> Vec<u8> {
    image::load_rgb(
        &fixtures().join(file.as_str().unwrap()),
        s,
        ResizeMode::Crop,
    )
    .unwrap()
}

/// PNG chunk with its CRC (crc32 over type and data, polynomial 0xEDB88320).
pub fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in kind.iter().chain(data) {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    let mut out = (data.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    out.extend_from_slice(&(!crc).to_be_bytes());
    out
}

/// A PNG that is only a header claiming `w`×`h` (an empty IDAT and IEND follow, so decoders
/// that read up to the pixel data get that far).
pub fn png_claiming(w: u32, h: u32, bit_depth: u8, color_type: u8) -> Vec<u8> {
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[bit_depth, color_type, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(png_chunk(b"IHDR", &ihdr));
    png.extend(png_chunk(b"IDAT", &[]));
    png.extend(png_chunk(b"IEND", &[]));
    png
}

// ---------------------------------------------------------------------------------------------
// The binary on a tiny model (CLI and batch-job tests)
// ---------------------------------------------------------------------------------------------

/// The binary under test: cargo's build, or `$SCORECAM_BIN` where the tests run from a bundle
/// on another machine (target/gpu-bundle on a GPU host).
pub fn bin() -> PathBuf {
    std::env::var_os("SCORECAM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_scorecam-gpu")))
}

/// A temporary directory with a tiny random VGG (3 convs, 24 channels at the default layer,
/// 10 classes, 32×32 input) saved as safetensors.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub weights: PathBuf,
}

impl Fixture {
    pub fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let model = Vgg::random_from_config(&[8, 0, 16, 0, 24, 0], &[16, 10], 5, 32);
        let weights = dir.path().join("tiny.safetensors");
        scorecam_gpu::weights::save(&model, &weights, "F32").unwrap();
        Fixture { dir, weights }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A 48×40 RGB PNG with some structure, at `name` (parent directories created).
    pub fn image(&self, name: &str, seed: u8) -> PathBuf {
        let p = self.path(name);
        write_png_image(&p, seed);
        p
    }

    /// `explain` on the CPU with the tiny model into `out`, plus `extra` arguments.
    pub fn explain_cmd(&self, out: &Path, extra: &[&str]) -> std::process::Command {
        let mut cmd = std::process::Command::new(bin());
        cmd.arg("explain")
            .arg("--weights")
            .arg(&self.weights)
            .args(["--backend", "cpu", "--out"])
            .arg(out)
            .args(extra)
            .env_remove("SLURM_ARRAY_TASK_ID")
            .env_remove("JOB_COMPLETION_INDEX");
        cmd
    }

    pub fn explain(&self, out: &Path, extra: &[&str]) -> std::process::Output {
        self.explain_cmd(out, extra).output().unwrap()
    }
}

/// A 48×40 RGB PNG with some structure.
pub fn write_png_image(p: &Path, seed: u8) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    let img = ::image::RgbImage::from_fn(48, 40, |x, y| {
        ::image::Rgb([
            (x * 5) as u8 ^ seed,
            (y * 6) as u8,
            if (x / 8 + y / 8) % 2 == 0 { 200 } else { seed },
        ])
    });
    img.save_with_format(p, ::image::ImageFormat::Png).unwrap();
}

/// A JPEG of `w`×`h` with smooth content, as bytes.
pub fn jpeg_bytes(w: u32, h: u32, quality: u8) -> Vec<u8> {
    let img = ::image::RgbImage::from_fn(w, h, |x, y| {
        ::image::Rgb([
            (x % 256) as u8,
            (y % 256) as u8,
            ((x / 3 + y / 5) % 256) as u8,
        ])
    });
    let mut out = Vec::new();
    ::image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality)
        .encode_image(&img)
        .unwrap();
    out
}

pub fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The lines of `out/results.jsonl` (each must parse).
pub fn results(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("results.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
        .collect()
}

/// Every file below `dir` (relative, sorted), the tool's `.scorecam` state directory aside.
pub fn files(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.file_name().is_some_and(|n| n == ".scorecam") {
                continue;
            }
            if e.file_type().unwrap().is_dir() {
                walk(base, &p, out);
            } else {
                out.push(p.strip_prefix(base).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    let mut v = Vec::new();
    walk(dir, dir, &mut v);
    v.sort();
    v
}

/// Files left in the tool's temporary directories (each a run's; a finished run leaves none).
pub fn temp_leftovers(out: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir(out.join(".scorecam/tmp")) {
        for e in rd.flatten() {
            v.push(e.path());
        }
    }
    v
}
