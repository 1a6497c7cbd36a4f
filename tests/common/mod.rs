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
