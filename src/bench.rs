//! `scorecam-gpu bench`: ms/image of whole Score-CAM runs at several image counts, a per-stage
//! breakdown (CUDA events on the GPU, wall clock on the CPU) and the achieved TFLOP/s of the
//! masked forwards; or, with `--forward`, the time of plain forward passes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};

use crate::backend::{Backend, Plan, Semantics, Stage};
use crate::cam::Targets;
use crate::engine::Engine;
use crate::error::Result;
use crate::model::{LayerKind, Vgg};

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
    let backend = engine.backend_report();
    let layers = layers(engine, model, &backend)?;
    Ok(json!({
        "ms_per_image": ms_per_image,
        "stages_ms_per_image": stages,
        "masked_forward_tflops": tflops,
        "channels": k,
        "layer": engine.layer_name(),
        "mask_batch": engine.mask_batch(),
        "layers": layers,
        "backend": backend,
    }))
}

/// Per-layer timing of one full mask batch's forward: ms (median of 5), TFLOP/s for convs and
/// Linears, GB/s of activations moved for pools, and the convolution configuration chosen at
/// prepare for that batch size (from the backend's report).
fn layers(engine: &mut Engine, model: &Vgg, backend: &Value) -> Result<Vec<Value>> {
    let rows = engine.mask_batch();
    let s = model.input_size();
    let ms = engine.layer_times(5)?;
    let elem_bytes = if engine.is_cpu() { 4 } else { 2 };
    let costs = model.layer_costs(s, rows, elem_bytes);
    // The plan of a conv stage at this batch size: its configuration, and the tuning times of
    // the best legacy configuration and graph-API plan (the per-layer before/after).
    let plan = |stage: usize| -> Option<&Value> {
        backend["plans"].as_array().and_then(|plans| {
            plans.iter().find(|p| {
                p["stage"] == json!(stage) && p["rows"] == json!(rows) && p["pre_relu"] == false
            })
        })
    };
    // A conv run with the max-pool after it in one kernel (where forwards fuse them): its ms
    // holds the pool's too, and the pool's own is only the gap between two timing events.
    // The kernel that ran conv stage `stage` with the max-pool after it (FP16, or FP8 as the
    // route ran it), and the two apart (ms).
    let fused = |stage: usize| -> Option<(Value, f64)> {
        let fp16 = backend["fused_pools"]["layers"].as_array().and_then(|l| {
            l.iter()
                .find(|f| f["stage"] == json!(stage) && f["fused"] == json!(true))
        });
        let apart =
            |f: &Value| f["conv_ms"].as_f64().unwrap_or(0.0) + f["pool_ms"].as_f64().unwrap_or(0.0);
        let fp8 = || {
            let l = backend["fp8_fused_pools"].as_array()?;
            let f = l.iter().find(|f| f["stage"] == json!(stage))?;
            let o = f["outs"]
                .as_array()?
                .iter()
                .find(|o| o["runs"] == json!(true))?;
            Some((o["algo"].clone(), o["apart_ms"].as_f64().unwrap_or(0.0)))
        };
        fp16.map(|f| (f["algo"].clone(), apart(f))).or_else(fp8)
    };
    // The first block run as one kernel: its first stage, where forwards run it.
    let block = &backend["fused_block"];
    let block_at = block["stage"]
        .as_u64()
        .filter(|_| block["runs"] == json!(true))
        .map(|s| s as usize);
    Ok(costs
        .iter()
        .zip(&ms)
        .enumerate()
        .map(|(i, (c, &ms))| {
            let secs = ms * 1e-3;
            let mut v = json!({
                "name": c.name,
                "kind": c.kind.name(),
                "rows": rows,
                "ms": round3(ms),
            });
            // A fused pool is the stage right after its conv; a fused block's second conv and
            // pool the two after its first.
            let in_block = block_at.filter(|&b| i == b + 1 || i == b + 2);
            let fused_into = in_block.or_else(|| i.checked_sub(1).filter(|&c| fused(c).is_some()));
            if let Some(conv) = fused_into {
                v["fused_into"] = json!(costs[conv].name);
            } else if c.flops > 0 && secs > 0.0 {
                v["tflops"] = json!(round3(c.flops as f64 / secs / 1e12));
            } else if secs > 0.0 {
                v["gbps"] = json!(round3(c.bytes as f64 / secs / 1e9));
            }
            if let Some(p) = plan(i).filter(|_| c.kind == LayerKind::Conv) {
                for key in [
                    "algo",
                    "legacy_ms",
                    "graph_ms",
                    "direct_ms",
                    "direct_half_grid_ms",
                    "fp8_ms",
                    "e4m3_out_ms",
                    "fp8_algo",
                    "fp8_half_algo",
                ] {
                    if !p[key].is_null() {
                        v[key] = p[key].clone();
                    }
                }
                if !p["fp8_ms"].is_null() || !p["e4m3_out_ms"].is_null() {
                    v["fp8"] = p["fp8"].clone();
                    v["e4m3_out_plan"] = p["e4m3_out"].clone();
                }
            }
            let with_pool = fused(i).filter(|_| in_block.is_none());
            if let Some((algo, apart_ms)) = &with_pool {
                v["algo"] = algo.clone();
                v["with_pool"] = json!(costs.get(i + 1).map(|p| &p.name));
                v["apart_ms"] = json!(round3(*apart_ms));
            }
            if block_at == Some(i) {
                v["algo"] = block["algo"].clone();
                v["with_block"] = json!(costs
                    .get(i + 1..i + 3)
                    .map(|r| { r.iter().map(|p| p.name.clone()).collect::<Vec<_>>() }));
                v["apart_ms"] = json!(round3(block["apart_ms"].as_f64().unwrap_or(0.0)));
            }
            // Under FP8: how this stage ran (FP8 or not, its activations E4M3 or FP16).
            if let Some(route) = backend["fp8_route"].as_object() {
                let has = |k: &str, stage: usize| {
                    route[k]
                        .as_array()
                        .is_some_and(|a| a.contains(&json!(stage)))
                };
                if matches!(c.kind, LayerKind::Conv | LayerKind::MaxPool) {
                    v["runs_fp8"] = json!(has("fp8", i));
                    // What ran it: the FP8 form's engine (of the output the route wrote), not the
                    // FP16 plan's.
                    let form = match has("e4m3_out", i) || v["fp8_half_algo"].is_null() {
                        true => v["fp8_algo"].clone(),
                        false => v["fp8_half_algo"].clone(),
                    };
                    if has("fp8", i) && !form.is_null() && with_pool.is_none() {
                        v["fp16_algo"] = v["algo"].clone();
                        v["algo"] = form;
                    }
                    v["e4m3_in"] = json!(i > 0 && has("e4m3_out", i - 1));
                    v["e4m3_out"] = json!(has("e4m3_out", i));
                    v["dequantized_input"] = json!(has("dequantized_inputs", i));
                    if c.kind == LayerKind::MaxPool && has("e4m3_out", i) && secs > 0.0 {
                        // One byte per value moved, not two.
                        v["gbps"] = json!(round3(c.bytes as f64 / 2.0 / secs / 1e9));
                    }
                }
            }
            v
        })
        .collect())
}

/// FP8's fidelity: `n` synthetic images explained by `fp16` (top-1 class) and by `fp8` for the
/// same class; the Pearson correlation of each image's two maps, with their distribution.
pub fn fp8_fidelity(fp8: &mut Engine, fp16: &mut Engine, n: usize, s: usize) -> Result<Value> {
    let images = synthetic_images(n, s);
    let reference = fp16.explain(&images)?;
    let targets: Vec<Targets> = reference
        .iter()
        .map(|e| Targets::classes([e.top1]))
        .collect();
    let got = fp8.explain_for(&images, &targets)?;
    let mut corr: Vec<f64> = reference
        .iter()
        .zip(&got)
        .map(|(a, b)| {
            let a: Vec<f64> = a.maps[0].map.iter().map(|&v| f64::from(v)).collect();
            let b: Vec<f64> = b.maps[0].map.iter().map(|&v| f64::from(v)).collect();
            crate::eval::metrics::pearson(&a, &b)
        })
        .collect();
    let same_top1 = reference
        .iter()
        .zip(&got)
        .filter(|(a, b)| a.top1 == b.top1)
        .count();
    let per_image: Vec<f64> = corr.iter().map(|&c| round5(c)).collect();
    corr.sort_by(f64::total_cmp);
    let at = |q: f64| round5(corr[((corr.len() - 1) as f64 * q).round() as usize]);
    Ok(json!({
        "images": n,
        "class": "the FP16 run's top-1 class of each image",
        "map_corr_vs_fp16": {
            "min": at(0.0),
            "p10": at(0.1),
            "median": at(0.5),
            "max": at(1.0),
            "per_image": per_image,
            "at_least_0_99": corr.iter().filter(|&&c| c >= 0.99).count(),
        },
        "same_top1_class": same_top1,
    }))
}

fn round5(x: f64) -> f64 {
    (x * 1e5).round() / 1e5
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
        let ms = median_ms(reps, || {
            be.forward(&x, n, &mut logits, None)?;
            be.download(&logits, 1).map(|_| ()) // synchronizes
        })?;
        out.insert(n.to_string(), round3(ms));
    }
    Ok(json!({ "forward_ms": out }))
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// A camera-size JPEG (4032×3024, quality 90) with photo-like content: smooth gradients with
/// sensor-like noise, so the entropy decoder has as much to do as on a real photo (a clean
/// gradient would compress, and decode, unrealistically fast).
pub fn camera_jpeg(w: u32, h: u32) -> Result<Vec<u8>> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let mut px = [0u8; 3];
        for (c, v) in px.iter_mut().enumerate() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let noise = (state % 25) as i32 - 12;
            let base = match c {
                0 => (x * 255 / w) as i32,
                1 => (y * 255 / h) as i32,
                _ => (((x / 97 + y / 61) % 2) * 120 + 60) as i32,
            };
            *v = (base + noise).clamp(0, 255) as u8;
        }
        image::Rgb(px)
    });
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
        .encode_image(&img)
        .map_err(|e| crate::Error::Invalid(format!("encoding the benchmark JPEG: {e}")))?;
    Ok(out)
}

/// Median of `reps` timings of `f`, in ms.
fn median_ms(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        f()?;
        t.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    Ok(crate::backend::median(t))
}

/// Host throughput of the batch job's CPU stages for one camera-size JPEG: decode + resize to
/// S×S (the decode pool's work) and encode + write of the three output files (the write pool's),
/// per core; then every core at once; and how many cores keep one GPU fed at `engine_ms` per image.
pub fn host(s: usize, engine_ms: f64, threads: usize, seconds: f64) -> Result<Value> {
    use crate::image::{self as img, ResizeMode};
    use crate::job::outputs::OutputTree;
    let (w, h) = (4032, 3024);
    let jpeg = camera_jpeg(w, h)?;
    let name = std::path::Path::new("camera.jpg");
    let decode =
        || -> Result<Vec<u8>> { img::load_rgb_from_bytes(&jpeg, name, s, ResizeMode::Crop) };
    let rgb = decode()?;
    let map: Vec<f32> = (0..s * s)
        .map(|i| ((i * 7919) % 1000) as f32 / 999.0)
        .collect();
    let dir = std::env::temp_dir().join(format!("scorecam-bench-host-{}", std::process::id()));
    let tree = OutputTree::create(&dir, &dir, "bench")?;
    let side = s as u32;
    let n = std::sync::atomic::AtomicU64::new(0);
    let encode_write = || -> Result<()> {
        let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let files = vec![
            (
                format!("{i}.npy").into(),
                img::encode_npy(name, &map, &[s as u64, s as u64])?,
            ),
            (
                format!("{i}.heatmap.png").into(),
                img::encode_png(name, &img::colormap_jet(&map), side, side)?,
            ),
            (
                format!("{i}.overlay.png").into(),
                img::encode_png(name, &img::overlay(&rgb, &map, 0.5), side, side)?,
            ),
        ];
        for p in tree.write_image(&files)? {
            let _ = std::fs::remove_file(p);
        }
        Ok(())
    };
    let decode_ms = median_ms(7, || decode().map(|_| ()))?;
    let write_ms = median_ms(15, encode_write)?;
    let per_image_ms = decode_ms + write_ms;

    // Every core at once: decode + encode/write back to back for `seconds`.
    let done = std::sync::atomic::AtomicU64::new(0);
    let t0 = Instant::now();
    std::thread::scope(|sc| {
        for _ in 0..threads.max(1) {
            sc.spawn(|| {
                while t0.elapsed().as_secs_f64() < seconds {
                    if decode().is_ok() && encode_write().is_ok() {
                        done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let all_rate = done.into_inner() as f64 / t0.elapsed().as_secs_f64();
    drop(tree);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(json!({
        "jpeg": { "width": w, "height": h, "bytes": jpeg.len(), "quality": 90 },
        "input_size": s,
        "decode_resize_ms": round3(decode_ms),
        "encode_write_ms": round3(write_ms),
        "images_per_s_per_core": round3(1e3 / per_image_ms),
        "threads": threads,
        "images_per_s_all_threads": round3(all_rate),
        "engine_ms_per_image": engine_ms,
        "cores_to_feed_one_gpu": round3(per_image_ms / engine_ms),
    }))
}
