//! `scorecam-gpu bench`: ms/image of whole Score-CAM runs at several image counts, a per-stage
//! breakdown (CUDA events on the GPU, wall clock on the CPU) and the achieved TFLOP/s of the
//! masked forwards; or, with `--forward`, the time of plain forward passes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};

use crate::backend::{Backend, Plan, Semantics, Stage};
use crate::engine::Engine;
use crate::error::Result;
use crate::model::Vgg;

/// Deterministic test images: smooth colour gradients with a bright square, so activations vary.
pub fn synthetic_images(count: usize, s: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|i| {
            let mut rgb = vec![0u8; s * s * 3];
            let (cx, cy) = ((i * 37) % s, (i * 61 + s / 3) % s);
            for y in 0..s {
                for x in 0..s {
                    let p = (y * s + x) * 3;
                    let inside = x.abs_diff(cx) < s / 6 && y.abs_diff(cy) < s / 6;
                    rgb[p] = ((x * 255) / s) as u8;
                    rgb[p + 1] = ((y * 255) / s) as u8 ^ (i as u8).wrapping_mul(40);
                    rgb[p + 2] = if inside {
                        250
                    } else {
                        ((x + y) * 127 / s) as u8
                    };
                }
            }
            rgb
        })
        .collect()
}

/// Score-CAM timings for each image count in `sizes` (after one warm-up run per size).
pub fn scorecam(
    engine: &mut Engine,
    model: &Vgg,
    sem: Semantics,
    sizes: &[usize],
) -> Result<Value> {
    let s = model.input_size();
    let k = engine.capture_shape().c;
    let flops_per_pass = 2.0 * model.macs(s) as f64;
    let mut ms_per_image = BTreeMap::new();
    let mut stages = BTreeMap::new();
    let mut tflops = BTreeMap::new();
    for &n in sizes {
        let images = synthetic_images(n, s);
        engine.set_profiling(false);
        engine.explain(&images[..n.min(8)])?; // warm-up: plans, algorithms, caches
        engine.set_profiling(true);
        let t0 = Instant::now();
        let explained = engine.explain(&images)?;
        let wall = t0.elapsed().as_secs_f64() * 1e3;
        let times = engine.take_stage_times()?;
        engine.set_profiling(false);
        let passes: usize = explained
            .iter()
            .map(|e| {
                if sem == Semantics::Official {
                    k - e.flat_channels
                } else {
                    k
                }
            })
            .sum();
        let mut per_stage = BTreeMap::new();
        for (stage, ms) in &times {
            *per_stage.entry(stage.name()).or_insert(0.0) += ms / n as f64;
        }
        let masked_ms: f64 = times
            .iter()
            .filter(|(st, _)| *st == Stage::MaskedForward)
            .map(|(_, ms)| ms)
            .sum();
        ms_per_image.insert(n.to_string(), round3(wall / n as f64));
        stages.insert(
            n.to_string(),
            json!(per_stage
                .into_iter()
                .map(|(k, v)| (k, round3(v)))
                .collect::<BTreeMap<_, _>>()),
        );
        if masked_ms > 0.0 {
            tflops.insert(
                n.to_string(),
                round3(passes as f64 * flops_per_pass / (masked_ms * 1e-3) / 1e12),
            );
        }
    }
    Ok(json!({
        "ms_per_image": ms_per_image,
        "stages_ms_per_image": stages,
        "masked_forward_tflops": tflops,
        "channels": k,
        "layer": engine.layer_name(),
        "mask_batch": engine.mask_batch(),
    }))
}

/// Median ms of a plain forward pass at each batch size in `sizes`.
pub fn forward<B: Backend>(
    be: &mut B,
    model: &Arc<Vgg>,
    sizes: &[usize],
    reps: usize,
) -> Result<Value> {
    let s = model.input_size();
    let classes = model.num_classes();
    let mut out = BTreeMap::new();
    for &n in sizes {
        let plan = Plan {
            input_size: s,
            max_images: n,
            max_masks: 1,
            capture: model.default_capture(),
        };
        be.prepare(model, plan)?;
        let mut x = be.alloc(&[n, 3, s, s])?;
        let mut logits = be.alloc(&[n, classes])?;
        for (slot, rgb) in synthetic_images(n, s).iter().enumerate() {
            be.preprocess(rgb, model.meta.mean, model.meta.std, &mut x, slot)?;
        }
        be.forward(&x, n, &mut logits, None)?;
        be.download(&logits, 1)?;
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps.max(1) {
            let t0 = Instant::now();
            be.forward(&x, n, &mut logits, None)?;
            be.download(&logits, 1)?; // synchronizes
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        out.insert(n.to_string(), round3(times[times.len() / 2]));
    }
    Ok(json!({ "forward_ms": out }))
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
