//! The CUDA backend against its CPU twin, op by op (normalized MSE thresholds per op, in the
//! style of ggml's `test-backend-ops`), on a whole random VGG16, through full Score-CAM runs, and
//! against the golden fixtures made by PyTorch.
//!
//! Without a usable GPU the GPU tests are reported as *ignored* (cargo counts them so; they never
//! pass unseen); with `SCORECAM_REQUIRE_GPU` set to a truthy value (1, true, yes, on) a missing
//! GPU fails them instead. Run on a GPU host with `--test-threads=1` (one device, big buffers);
//! `--include-ignored` adds the full 512-channel VGG16 run.
//!
//! Limits. FP16 stores every activation rounded to 11 significant bits: a relative error of
//! u/√3 RMS per layer (u = 2⁻¹¹, uniform rounding), adding up in quadrature over L layers. With a
//! factor 3 of margin on the RMS the normalized MSE of a result L weight layers deep stays under
//! 9·L·u²/3 = 3·L·2⁻²² (see [`fp16_nmse_limit`]): ≈ 5.0e-6 for the tiny model's 7 layers,
//! 1.1e-5 for VGG16's 16. (The H100 run of 2026-11-27 measured 7e-8..5e-7 and 1.2e-6.)

use std::sync::Arc;

mod common;

use common::{
    check_cam, check_tol, corr, fixture_model, fixture_rgb, manifest, npy, values, CamTolerances,
};
use scorecam_gpu::backend::cpu::{CpuBackend, CpuBuf};
use scorecam_gpu::backend::cuda::kernels::ConvWgBuild;
use scorecam_gpu::backend::cuda::{CudaBackend, DirectUse};
use scorecam_gpu::backend::{Backend, MaskItem, MaskStyle, Noise, Plan, Semantics, Stage};
use scorecam_gpu::cam::{CamOptions, Explainer, Explanation, Targets};
use scorecam_gpu::model::{Capture, FeatureStage, MapShape, Vgg, IMAGENET_MEAN, IMAGENET_STD};
use scorecam_gpu::Error;
use serde_json::Value;

// ------------------------------------------------------------------------------------------
// Shared helpers

/// The CUDA backend (the trial runs only where the GPU probe succeeded).
fn gpu() -> CudaBackend {
    CudaBackend::new(0)
        .unwrap_or_else(|e| panic!("the probe found a device, but CudaBackend::new failed: {e}"))
}

/// The largest normalized MSE FP16 storage can explain for a result `layers` weight layers deep
/// (see the module docs).
fn fp16_nmse_limit(layers: usize) -> f64 {
    3.0 * layers as f64 * 2f64.powi(-22)
}

/// Normalized mean squared error `mse(got − want) / mean(want²)` (plain MSE when `want` is all
/// zeros).
fn nmse(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "nmse: lengths differ");
    assert!(!want.is_empty(), "nmse: empty");
    let n = want.len() as f64;
    let err: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w as f64).powi(2))
        .sum::<f64>()
        / n;
    let pow: f64 = want.iter().map(|&w| (w as f64).powi(2)).sum::<f64>() / n;
    if pow == 0.0 {
        err
    } else {
        err / pow
    }
}

/// Assert `nmse(got, want) ≤ max`, printing the measured value either way.
fn check_nmse(got: &[f32], want: &[f32], max: f64, what: &str) -> f64 {
    assert!(
        got.iter().all(|v| v.is_finite()),
        "{what}: non-finite value in the CUDA output"
    );
    let e = nmse(got, want);
    println!("{what}: nmse {e:.3e} (max {max:.0e})");
    assert!(e <= max, "{what}: normalized MSE {e:.3e} > {max:.0e}");
    e
}

/// Deterministic pseudo-random RGB bytes.
fn rgb_bytes(n: usize, seed: u64) -> Vec<u8> {
    values(n, seed)
        .iter()
        .map(|v| ((v + 1.0) * 127.9) as u8)
        .collect()
}

/// Round to FP16 precision, so both backends can be given identical inputs.
fn r16(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect()
}

fn cpu_buf(shape: &[usize], data: Vec<f32>) -> CpuBuf {
    assert_eq!(shape.iter().product::<usize>(), data.len());
    CpuBuf {
        shape: shape.to_vec(),
        data,
    }
}

fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

/// The tiny VGG of the op tests: conv8 · pool · conv16 · pool · conv16 · conv16 · pool at 32²
/// (features end at 4×4, so the adaptive pool upsamples to 7×7), head 784 → 32 → 32 → 10.
/// Weight layers of [`tiny_model`]: 4 convs and 3 Linear.
const TINY_WEIGHT_LAYERS: usize = 7;

fn tiny_model() -> Arc<Vgg> {
    Arc::new(Vgg::random_from_config(
        &[8, 0, 16, 0, 16, 16, 0],
        &[32, 32, 10],
        1,
        32,
    ))
}

fn plan(model: &Vgg, max_images: usize, max_masks: usize, capture: Capture) -> Plan {
    Plan {
        input_size: model.input_size(),
        max_images,
        max_masks,
        capture,
    }
}

/// `n` normalized images of side `s`, rounded to FP16 (NCHW f32), made by the CPU backend.
fn cpu_images(n: usize, s: usize, seed: u64) -> Vec<f32> {
    let mut cpu = CpuBackend::new();
    let mut buf = cpu.alloc(&[n, 3, s, s]).unwrap();
    for i in 0..n {
        let rgb = rgb_bytes(s * s * 3, seed + i as u64);
        cpu.preprocess(&rgb, IMAGENET_MEAN, IMAGENET_STD, &mut buf, i)
            .unwrap();
    }
    r16(&buf.data)
}

// ------------------------------------------------------------------------------------------
// Detection

fn new_never_panics_and_reports_unavailability() {
    match CudaBackend::new(0) {
        Ok(be) => {
            let d = be.describe();
            println!("{d}");
            assert!(
                d.starts_with("cuda:0: ") && d.contains("sm_") && d.contains("cuDNN"),
                "{d}"
            );
        }
        Err(e) => {
            assert!(
                matches!(e, Error::CudaUnavailable(_)),
                "expected CudaUnavailable, got {e:?}"
            );
            assert!(
                !common::truthy("SCORECAM_REQUIRE_GPU"),
                "SCORECAM_REQUIRE_GPU is set but {e}"
            );
            println!("no CUDA device: {e}");
        }
    }
    // A device that does not exist is an error, never a panic.
    assert!(matches!(
        CudaBackend::new(1 << 20),
        Err(Error::CudaUnavailable(_))
    ));
}

// ------------------------------------------------------------------------------------------
// Op by op against the CPU twin

fn preprocess_matches_cpu() {
    let mut g = gpu();
    let mut c = CpuBackend::new();
    let (mean, std) = ([0.5, 0.4, 0.3], [0.25, 0.2, 0.3]);
    for (i, s) in [32usize, 33, 224].into_iter().enumerate() {
        let rgb = rgb_bytes(s * s * 3, 10 + i as u64);
        let mut gb = g.alloc(&[3, 3, s, s]).unwrap();
        let mut cb = c.alloc(&[3, 3, s, s]).unwrap();
        g.preprocess(&rgb, mean, std, &mut gb, 1).unwrap();
        c.preprocess(&rgb, mean, std, &mut cb, 1).unwrap();
        let got = g.download(&gb, 3).unwrap();
        let want = c.download(&cb, 3).unwrap();
        check_nmse(&got, &want, 1e-6, &format!("preprocess s={s}"));
        // Rows 0 and 2 were never written: still zero.
        let row = 3 * s * s;
        assert!(got[..row].iter().chain(&got[2 * row..]).all(|&v| v == 0.0));
    }
}

/// A forward of `n` rows of `x` on `b`: its logits and its capture of shape `a`.
fn logits_and_capture<B: Backend>(
    b: &mut B,
    x: &B::Buf,
    n: usize,
    classes: usize,
    a: MapShape,
) -> (Vec<f32>, Vec<f32>) {
    let mut logits = b.alloc(&[n, classes]).unwrap();
    let mut acts = b.alloc(&[n, a.c, a.h, a.w]).unwrap();
    b.forward(x, n, &mut logits, Some(&mut acts)).unwrap();
    (
        b.download(&logits, n).unwrap(),
        b.download(&acts, n).unwrap(),
    )
}

fn forward_matches_cpu_at_every_stage() {
    let mut g = gpu();
    let mut c = CpuBackend::new();
    let model = tiny_model();
    let s = model.input_size();
    let classes = model.num_classes();
    let n = 3;
    let x = cpu_images(n, s, 100);
    let gx = g.upload_f32(&[n, 3, s, s], &x).unwrap();
    let cx = cpu_buf(&[n, 3, s, s], x);
    for (stage, st) in model.features.iter().enumerate() {
        let pre_options: &[bool] = match st {
            FeatureStage::Conv(_) => &[false, true],
            FeatureStage::MaxPool { .. } => &[false],
        };
        for &pre_relu in pre_options {
            let cap = Capture { stage, pre_relu };
            let name = model.capture_name(cap);
            let p = plan(&model, n, 5, cap);
            g.prepare(&model, p).unwrap();
            c.prepare(&model, p).unwrap();
            let a = model.capture_shape(cap, s);
            let (glv, gav) = logits_and_capture(&mut g, &gx, n, classes, a);
            let (clv, cav) = logits_and_capture(&mut c, &cx, n, classes, a);
            check_nmse(
                &gav,
                &cav,
                fp16_nmse_limit(TINY_WEIGHT_LAYERS),
                &format!("forward capture {name} (stage {stage}, pre_relu {pre_relu})"),
            );
            if pre_relu {
                assert!(
                    cav.iter().any(|&v| v < 0.0),
                    "{name}: the pre-ReLU capture has no negative value"
                );
            }
            check_nmse(
                &glv,
                &clv,
                fp16_nmse_limit(TINY_WEIGHT_LAYERS),
                &format!("forward logits (capture {name})"),
            );
        }
    }
    // Batch sizes the plan did not name (planned on first use), no capture.
    let cap = model.default_capture();
    g.prepare(&model, plan(&model, n, 5, cap)).unwrap();
    c.prepare(&model, plan(&model, n, 5, cap)).unwrap();
    for rows in [1, 2, 3, 2] {
        let mut gl = g.alloc(&[5, classes]).unwrap();
        let mut cl = c.alloc(&[5, classes]).unwrap();
        g.forward(&gx, rows, &mut gl, None).unwrap();
        c.forward(&cx, rows, &mut cl, None).unwrap();
        check_nmse(
            &g.download(&gl, rows).unwrap(),
            &c.download(&cl, rows).unwrap(),
            fp16_nmse_limit(TINY_WEIGHT_LAYERS),
            &format!("forward logits, {rows} rows"),
        );
    }
}

fn masked_inputs_match_cpu() {
    let mut g = gpu();
    let mut c = CpuBackend::new();
    let model = tiny_model();
    let s = model.input_size();
    let n = 3;
    let x = cpu_images(n, s, 200);
    // Capture points with 4× (8×8 → 32) and 2× (16×16 → 32) upsampling.
    for cap in [
        model.default_capture(),
        Capture {
            stage: 1,
            pre_relu: false,
        },
    ] {
        let a = model.capture_shape(cap, s);
        c.prepare(&model, plan(&model, n, 64, cap)).unwrap();
        g.prepare(&model, plan(&model, n, 64, cap)).unwrap();
        let cx = cpu_buf(&[n, 3, s, s], x.clone());
        let mut cl = c.alloc(&[n, model.num_classes()]).unwrap();
        let mut ca = c.alloc(&[n, a.c, a.h, a.w]).unwrap();
        c.forward(&cx, n, &mut cl, Some(&mut ca)).unwrap();
        // Identical FP16-representable activations on both sides.
        let acts = r16(&ca.data);
        let ca = cpu_buf(&[n, a.c, a.h, a.w], acts.clone());
        let ga = g.upload_f32(&[n, a.c, a.h, a.w], &acts).unwrap();
        let gx = g.upload_f32(&[n, 3, s, s], &x).unwrap();
        let plane = a.h * a.w;
        let items: Vec<MaskItem> = (0..n)
            .flat_map(|i| (0..a.c).map(move |k| (i, k)))
            .filter(|&(i, k)| {
                let ch = &acts[(i * a.c + k) * plane..][..plane];
                ch.iter().any(|&v| v != ch[0]) // non-constant channels only (official skips them)
            })
            .map(|(i, k)| MaskItem {
                image: i as u32,
                channel: k as u32,
                sample: (i + 2 * k) as u32 % 5,
            })
            .collect();
        assert!(items.len() > n, "too few non-constant channels");
        // The Score-CAM semantics, and torchcam's with IS-CAM's scale and SS-CAM's noise (the
        // device draws the same counter-based noise as the host, in f32).
        let styles: [MaskStyle; 5] = [
            Semantics::Official.into(),
            Semantics::ChannelSoftmax.into(),
            Semantics::Torchcam.into(),
            MaskStyle {
                sem: Semantics::Torchcam,
                scale: 2.5,
                noise: None,
            },
            MaskStyle {
                sem: Semantics::Torchcam,
                scale: 1.0,
                noise: Some(Noise {
                    seed: 11,
                    sigma: 2.0,
                }),
            },
        ];
        for style in styles {
            let sem = style.sem;
            let b = items.len();
            let mut gout = g.alloc(&[b + 2, 3, s, s]).unwrap();
            let mut cout = c.alloc(&[b + 2, 3, s, s]).unwrap();
            g.masked_inputs(&gx, &ga, &items, style, &mut gout).unwrap();
            c.masked_inputs(&cx, &ca, &items, style, &mut cout).unwrap();
            check_nmse(
                &g.download(&gout, b).unwrap(),
                &c.download(&cout, b).unwrap(),
                1e-5,
                &format!(
                    "masked_inputs {} ×{} σ {:?} {}×{} → {s} ({b} items)",
                    sem.name(),
                    style.scale,
                    style.noise.map(|n| n.sigma),
                    a.h,
                    a.w
                ),
            );
            // A batch that reuses the same buffer with fewer items.
            let few = &items[3..7];
            g.masked_inputs(&gx, &ga, few, style, &mut gout).unwrap();
            c.masked_inputs(&cx, &ca, few, style, &mut cout).unwrap();
            check_nmse(
                &g.download(&gout, 4).unwrap(),
                &c.download(&cout, 4).unwrap(),
                1e-5,
                &format!("masked_inputs {} (4 items)", sem.name()),
            );
        }
    }
}

fn scores_match_cpu() {
    let mut g = gpu();
    let mut c = CpuBackend::new();
    for (classes, rows, n, t) in [
        (10usize, 6usize, 5usize, 2usize),
        (1000, 70, 67, 1),
        (1000, 4, 4, 3),
    ] {
        let logits: Vec<f32> = values(rows * classes, 7 + classes as u64)
            .iter()
            .map(|v| v * 8.0)
            .collect();
        let gl = g.upload_f32(&[rows, classes], &logits).unwrap();
        let cl = cpu_buf(&[rows, classes], logits);
        let targets: Vec<u32> = values(n * t, 9)
            .iter()
            .map(|v| ((v + 1.0) * 0.5 * classes as f32) as u32 % classes as u32)
            .collect();
        for probability in [true, false] {
            let got = g.scores(&gl, n, &targets, probability).unwrap();
            let want = c.scores(&cl, n, &targets, probability).unwrap();
            assert_eq!(got.len(), n * t);
            check_nmse(
                &got,
                &want,
                1e-6,
                &format!(
                    "scores {} {classes} classes, {n}×{t}",
                    if probability { "probability" } else { "logit" }
                ),
            );
        }
    }
}

/// Queued scores (`push_scores` … `take_scores`) equal the synchronous ones, in push order,
/// across pushes that outgrow the device buffer (its contents moved to the host first).
fn queued_scores_match_synchronous_ones() {
    let mut g = gpu();
    let model = tiny_model();
    g.prepare(&model, plan(&model, 1, 4, model.default_capture()))
        .unwrap();
    let classes = 1000;
    let rows = 64;
    let logits: Vec<f32> = values(rows * classes, 21).iter().map(|v| v * 8.0).collect();
    let gl = g.upload_f32(&[rows, classes], &logits).unwrap();
    assert!(
        g.take_scores().unwrap().is_empty(),
        "nothing pending at first"
    );
    let mut want = Vec::new();
    // Growing pushes: 1, 3, 9, ... rows, each more than the room the last one left.
    for (i, n) in [1usize, 3, 9, 27, 64, 2].into_iter().enumerate() {
        let t = 1 + i % 3;
        let targets: Vec<u32> = (0..n * t)
            .map(|j| ((j * 7919 + i * 131) % classes) as u32)
            .collect();
        want.extend(g.scores(&gl, n, &targets, i % 2 == 0).unwrap());
        g.push_scores(&gl, n, &targets, i % 2 == 0).unwrap();
    }
    let got = g.take_scores().unwrap();
    assert_eq!(got, want, "queued scores differ from synchronous ones");
    assert!(
        g.take_scores().unwrap().is_empty(),
        "take_scores clears them"
    );
}

/// Every batch size runs at a size planned at prepare (nothing planned on first use), padded
/// rows change no real row's logits, and a replayed CUDA graph gives the eager pass's logits
/// bit for bit.
fn every_batch_runs_planned_and_graphs_replay_exactly() {
    let model = tiny_model();
    let s = model.input_size();
    let classes = model.num_classes();
    let (images, masks) = (3, 20);
    let p = plan(&model, images, masks, model.default_capture());
    let x = cpu_images(masks, s, 500);
    let mut c = CpuBackend::new();
    c.prepare(&model, p).unwrap();
    let cx = cpu_buf(&[masks, 3, s, s], x.clone());
    let mut cl = c.alloc(&[masks, classes]).unwrap();
    // One backend, so both passes run the same plans: launch by launch, then from graphs.
    let mut g = gpu();
    g.prepare(&model, p).unwrap();
    let mut gx = g.upload_f32(&[masks, 3, s, s], &x).unwrap();
    let mut gl = g.alloc(&[masks, classes]).unwrap();
    let a = model.capture_shape(model.default_capture(), s);
    let mut ga = g.alloc(&[images, a.c, a.h, a.w]).unwrap();
    let mut gli = g.alloc(&[images, classes]).unwrap();
    let mut eager = Vec::new();
    for graphs in [false, true] {
        g.set_cuda_graphs(graphs);
        let mut out = Vec::new();
        for n in (1..=masks).chain([7, 20, 1]) {
            g.forward(&gx, n, &mut gl, None).unwrap();
            c.forward(&cx, n, &mut cl, None).unwrap();
            let got = g.download(&gl, n).unwrap();
            check_nmse(
                &got,
                &c.download(&cl, n).unwrap(),
                fp16_nmse_limit(TINY_WEIGHT_LAYERS),
                &format!("forward of {n} rows (graphs {graphs})"),
            );
            out.push(got);
        }
        // Base forwards with activations: the image ladder.
        for n in 1..=images {
            g.forward(&gx, n, &mut gli, Some(&mut ga)).unwrap();
        }
        assert_eq!(
            g.plans_built_on_first_use(),
            0,
            "a batch size was planned in the hot path: {}",
            g.report()
        );
        let report = g.report();
        println!("graphs {graphs}: {}", report["graphs"]);
        if graphs {
            let replays = report["graphs"]["replays"].as_u64().unwrap_or(0);
            assert!(
                report["graphs"]["captured"].as_u64().unwrap_or(0) > 0 && replays > 0,
                "graphs on, but none captured or replayed (disabled because: {})",
                report["graphs"]["disabled_because"]
            );
            assert_eq!(out, eager, "graph replays differ from eager launches");
            // A replay reads what the input buffer holds now, not what it held at capture.
            let x2 = cpu_images(masks, s, 900);
            g.write_rows(&mut gx, 0, &x2).unwrap();
            g.forward(&gx, 7, &mut gl, None).unwrap();
            assert!(g.report()["graphs"]["replays"].as_u64().unwrap_or(0) > replays);
            let cx2 = cpu_buf(&[masks, 3, s, s], x2);
            c.forward(&cx2, 7, &mut cl, None).unwrap();
            check_nmse(
                &g.download(&gl, 7).unwrap(),
                &c.download(&cl, 7).unwrap(),
                fp16_nmse_limit(TINY_WEIGHT_LAYERS),
                "a replay on new input",
            );
        } else {
            assert_eq!(report["graphs"]["captured"], 0);
            eager = out;
        }
    }
}

/// Per-layer timing covers every layer of `Vgg::layer_costs` with finite times.
fn layer_times_cover_every_layer() {
    let mut g = gpu();
    let model = tiny_model();
    let s = model.input_size();
    let rows = 6;
    g.prepare(&model, plan(&model, 2, rows, model.default_capture()))
        .unwrap();
    let gx = g
        .upload_f32(&[rows, 3, s, s], &cpu_images(rows, s, 600))
        .unwrap();
    let t = g.layer_times(&gx, rows, 3).unwrap();
    let costs = model.layer_costs(s, rows, 2);
    assert_eq!(t.len(), costs.len(), "{t:?}");
    assert!(t.iter().all(|ms| ms.is_finite() && *ms >= 0.0), "{t:?}");
    assert!(t.iter().sum::<f64>() > 0.0);
}

/// cuDNN's graph API (conv + bias + ReLU as one graph), preferred wherever it has a plan, gives
/// the CPU's logits; the report says which layers it ran.
fn graph_api_convolutions_match_cpu() {
    use scorecam_gpu::backend::cuda::GraphUse;
    for model in [tiny_model(), Arc::new(Vgg::random_vgg16(3))] {
        let s = model.input_size();
        let classes = model.num_classes();
        let n = if s == 224 { 2 } else { 4 };
        let p = plan(&model, n, n, model.default_capture());
        let mut g = gpu();
        g.set_graph_use(GraphUse::Prefer);
        g.prepare(&model, p).unwrap();
        let mut c = CpuBackend::new();
        c.prepare(&model, p).unwrap();
        let x = cpu_images(n, s, 700);
        let gx = g.upload_f32(&[n, 3, s, s], &x).unwrap();
        let cx = cpu_buf(&[n, 3, s, s], x);
        let mut gl = g.alloc(&[n, classes]).unwrap();
        let mut cl = c.alloc(&[n, classes]).unwrap();
        g.forward(&gx, n, &mut gl, None).unwrap();
        c.forward(&cx, n, &mut cl, None).unwrap();
        let layers = model.weight_layers_from_top().len();
        check_nmse(
            &g.download(&gl, n).unwrap(),
            &c.download(&cl, n).unwrap(),
            fp16_nmse_limit(layers),
            &format!("graph-API forward ({layers} weight layers)"),
        );
        let graph_plans = g
            .plan_choices()
            .iter()
            .filter(|c| c.algo.starts_with("graph"))
            .count();
        println!(
            "{s}²: {graph_plans} of {} conv plans through the graph API",
            g.plan_choices().len()
        );
    }
}

/// The hand-written convs, preferred wherever they run: the first conv (kernels/conv_cin8.cu),
/// conv1_2 with pool1 in one kernel (kernels/conv_pool.cu) and, with kernels built for sm_90a
/// (Hopper), every deeper conv by wgmma (kernels/conv_wg.cu). They give the CPU's conv1_1 output
/// (pre-ReLU and post-ReLU captures) and logits on a random VGG16 at 224², after passing their
/// own checks on the device (the wgmma conv's once per layer shape and build); with them off, no plan
/// names them.
fn direct_conv_matches_cpu() {
    let model = Arc::new(Vgg::random_vgg16(5));
    let (s, classes, n) = (model.input_size(), model.num_classes(), 2);
    let x = cpu_images(n, s, 800);
    let mut c = CpuBackend::new();
    let cx = cpu_buf(&[n, 3, s, s], x.clone());
    for pre_relu in [false, true] {
        let cap = Capture { stage: 0, pre_relu };
        let p = plan(&model, n, n, cap);
        let mut g = gpu();
        g.set_direct_conv(DirectUse::Prefer);
        g.prepare(&model, p).unwrap();
        c.prepare(&model, p).unwrap();
        let report = g.report();
        let check = &report["direct_conv"]["check"];
        let hand_written: Vec<scorecam_gpu::backend::cuda::PlanChoice> = g
            .plan_choices()
            .into_iter()
            .filter(|c| c.algo.starts_with("hand-written"))
            .collect();
        let arch = report["kernels_arch"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let digits: String = arch.chars().filter(|c| c.is_ascii_digit()).collect();
        if digits.parse::<u32>().is_ok_and(|v| v < 80) {
            println!("{arch} has no m16n8k16 mma: the hand-written conv is never offered");
            assert!(hand_written.is_empty() && check.is_null());
            return;
        }
        assert_eq!(check, "passed", "the device check: {check}");
        // Stage 0 by conv_cin8; on sm_90a every conv from 32·k input to 128·k output channels
        // by the wgmma conv too (conv2_1 on; conv1_2's 64 outputs are not the kernel's).
        let wg = arch == "sm_90a";
        let (mut want_stages, mut want_checks) = (Vec::new(), Vec::new());
        for (i, f) in model.features.iter().enumerate() {
            if let FeatureStage::Conv(l) = f {
                if i == 0 || (wg && l.cin % 32 == 0 && l.cout % 128 == 0) {
                    want_stages.push(i);
                    // One check per shape and build: the wgmma conv's single and paired builds,
                    // and the tall ones.
                    let checks = match i {
                        0 => vec![format!("8→{}", l.cout)],
                        _ => ConvWgBuild::for_layer(l.cin, l.cout, false)
                            .expect("a wgmma shape")
                            .candidates(l.cin)
                            .into_iter()
                            .map(|b| format!("{}→{} {b:?}", l.cin, l.cout))
                            .collect(),
                    };
                    for check in checks {
                        if !want_checks.contains(&check) {
                            want_checks.push(check);
                        }
                    }
                }
            }
        }
        let mut stages: Vec<usize> = hand_written.iter().map(|c| c.stage).collect();
        stages.sort_unstable();
        stages.dedup();
        assert_eq!(stages, want_stages, "{hand_written:?}");
        let checks = report["direct_conv"]["checks"]
            .as_object()
            .expect("per-shape and build checks");
        let mut got_checks: Vec<&String> = checks.keys().collect();
        got_checks.sort();
        want_checks.sort();
        assert_eq!(
            got_checks,
            want_checks.iter().collect::<Vec<_>>(),
            "{checks:?}"
        );
        assert!(checks.values().all(|c| c == "passed"), "{checks:?}");
        // conv1_2 (stage 1, 64 → 64) runs with pool1 where the device gives the kernel its
        // shared memory (sm_80 and sm_90 do); on sm_90a every block's last conv (conv2_2 …
        // conv5_3) also runs with its pool, by the wgmma conv's pooled build.
        let fused = &report["fused_pools"];
        println!("fused pools: {fused}");
        assert_eq!(fused["check"], "passed", "{fused}");
        // Each build checked on its own; kernels built for sm_90a (Hopper) have the wgmma ones.
        let checks = fused["checks"].as_object().expect("per-build checks");
        let mut want = vec!["W4", "W8"];
        if wg {
            let pooled = [
                "WgPoolM256N128",
                "WgPoolM256N128Pair",
                "WgPoolN128",
                "WgPoolN128Pair",
                "WgPoolN256",
                "WgPoolN256Pair",
            ];
            want.extend(["Wg", "Wg2"].into_iter().chain(pooled));
        }
        // (The report lists them in the builds' order; compared as sets.)
        let mut got: Vec<&str> = checks.keys().map(String::as_str).collect();
        got.sort_unstable();
        want.sort_unstable();
        assert_eq!(got, want, "{fused}");
        assert!(checks.values().all(|c| c == "passed"), "{fused}");
        let layers = fused["layers"].as_array().expect("fused pool layers");
        let pooled_convs: Vec<usize> = (1..model.features.len())
            .filter(|&i| matches!(model.features[i], FeatureStage::MaxPool { .. }))
            .map(|i| i - 1)
            .filter(|&i| i == 1 || wg)
            .collect();
        let fused_stages: Vec<usize> = layers
            .iter()
            .filter(|l| l["fused"] == true)
            .filter_map(|l| l["stage"].as_u64().map(|s| s as usize))
            .collect();
        // On sm_90a the whole first block runs as one kernel (preferred), so conv1_2's own
        // fused pool does not.
        let pooled_convs: Vec<usize> = pooled_convs
            .into_iter()
            .filter(|&i| !wg || i != 1)
            .collect();
        assert_eq!(fused_stages, pooled_convs, "{fused}");
        let block = &report["fused_block"];
        println!("fused block: {block}");
        if wg {
            assert_eq!(block["check"], "passed", "{block}");
            assert_eq!(block["stage"], 0, "{block}");
            assert_eq!(block["kept"], true, "{block}");
            assert_eq!(block["runs"], true, "{block}");
        } else {
            assert!(block["check"].is_null() && block["ms"].is_null(), "{block}");
        }
        let a = model.capture_shape(cap, s);
        let gx = g.upload_f32(&[n, 3, s, s], &x).unwrap();
        let (glv, gav) = logits_and_capture(&mut g, &gx, n, classes, a);
        let (clv, cav) = logits_and_capture(&mut c, &cx, n, classes, a);
        let e = check_nmse(
            &gav,
            &cav,
            fp16_nmse_limit(1),
            &format!("conv1_1 by the hand-written conv (pre_relu {pre_relu})"),
        );
        let layers = model.weight_layers_from_top().len();
        check_nmse(
            &glv,
            &clv,
            fp16_nmse_limit(layers),
            "logits with the hand-written conv1_1",
        );
        println!("pre_relu {pre_relu}: conv1_1 NMSE {e:.2e}, plans {hand_written:?}");
    }
    // A forward whose capture is past the first block runs the block as one kernel (sm_90a):
    // its logits are the CPU's.
    let cap = model.default_capture();
    let mut g = gpu();
    g.set_direct_conv(DirectUse::Prefer);
    g.prepare(&model, plan(&model, n, n, cap)).unwrap();
    c.prepare(&model, plan(&model, n, n, cap)).unwrap();
    let runs = g.report()["fused_block"]["runs"] == true;
    let a = model.capture_shape(cap, s);
    let gx = g.upload_f32(&[n, 3, s, s], &x).unwrap();
    let (glv, _) = logits_and_capture(&mut g, &gx, n, classes, a);
    let (clv, _) = logits_and_capture(&mut c, &cx, n, classes, a);
    let layers = model.weight_layers_from_top().len();
    let e = check_nmse(
        &glv,
        &clv,
        fp16_nmse_limit(layers),
        "logits with the hand-written convs and the first block as one kernel",
    );
    println!("first block as one kernel: {runs}, logits NMSE {e:.2e}");
    let mut g = gpu();
    g.set_direct_conv(DirectUse::Off);
    g.prepare(&model, plan(&model, n, n, model.default_capture()))
        .unwrap();
    assert!(g
        .plan_choices()
        .iter()
        .all(|c| !c.algo.starts_with("hand-written")));
    let report = g.report();
    assert!(report["direct_conv"]["check"].is_null());
    assert_eq!(report["direct_conv"]["checks"], serde_json::json!({}));
    assert!(report["fused_pools"]["check"].is_null());
    assert_eq!(report["fused_pools"]["checks"], serde_json::json!({}));
    assert_eq!(report["fused_pools"]["layers"], serde_json::json!([]));
    assert!(report["fused_block"]["check"].is_null());
    assert_eq!(report["fused_block"]["runs"], false);
}

/// The graph-API plan choices a first prepare searched for are what a second one (a new backend,
/// as in a new process) finalizes from the plan cache, without searching, to the same logits.
fn plan_cache_serves_a_second_prepare() {
    use scorecam_gpu::backend::cuda::GraphUse;
    let dir = std::env::temp_dir().join(format!("scorecam-plan-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let model = tiny_model();
    let (s, classes, n) = (model.input_size(), model.num_classes(), 3);
    let p = plan(&model, n, 4, model.default_capture());
    let x = cpu_images(n, s, 900);
    let run = || {
        let mut g = gpu();
        g.set_graph_use(GraphUse::FullBatch);
        g.set_plan_cache_dir(Some(&dir));
        g.prepare(&model, p).unwrap();
        let gx = g.upload_f32(&[n, 3, s, s], &x).unwrap();
        let mut gl = g.alloc(&[n, classes]).unwrap();
        g.forward(&gx, n, &mut gl, None).unwrap();
        (g.report(), g.download(&gl, n).unwrap())
    };
    let (first, logits1) = run();
    let (second, logits2) = run();
    let searched = &first["graph_api_search"]["fp16"];
    let cached = &second["graph_api_search"]["fp16"];
    println!(
        "first: {searched}\nsecond: {cached}\ncache: {}",
        second["plan_cache"]
    );
    assert!(
        first["plan_cache"]["save_error"].is_null(),
        "{}",
        first["plan_cache"]
    );
    assert_eq!(searched["from_plan_cache"], 0);
    // A search that found a plan is remembered; the second prepare times only that plan.
    let timed = |r: &Value| r["plans_timed"].as_u64().unwrap();
    assert!(timed(searched) > 0, "no graph plan found: {searched}");
    let from_cache = cached["from_plan_cache"].as_u64().unwrap();
    assert!(from_cache > 0, "nothing from the cache: {cached}");
    assert!(timed(cached) <= timed(searched), "{cached} vs {searched}");
    assert!(second["plan_cache"]["hits"].as_u64().unwrap() >= from_cache);
    check_nmse(&logits2, &logits1, 1e-6, "logits from the cached plans");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The FP8 kernels against the host: the quantization bit for bit with the float8 crate's
/// conversion (cuda_fp8.hpp's), the amax exactly.
fn fp8_kernels_match_the_host() {
    use scorecam_gpu::backend::cuda::kernels::e4m3_from_f32;
    let mut g = gpu();
    let x: Vec<f32> = values(50_000, 31).iter().map(|v| v * 600.0).collect();
    let x16: Vec<f32> = x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
    for multiplier in [1.0f32, 0.37, 3.5, 1e-3] {
        let got = g.quantize_e4m3_on_device(&x, multiplier).unwrap();
        for (i, (&v, &b)) in x16.iter().zip(&got).enumerate() {
            let want = e4m3_from_f32(v * multiplier);
            assert_eq!(
                b, want,
                "x[{i}] = {v} × {multiplier}: {b:#04x} ≠ {want:#04x}"
            );
        }
    }
    let want = x16.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert_eq!(g.amax_on_device(&x).unwrap(), want);

    // Dequantization: every code, to FP16.
    use scorecam_gpu::backend::fp8::{e4m3_to_f32, max_e4m3};
    let codes: Vec<u8> = (0..=u8::MAX).collect();
    for multiplier in [1.0f32, 0.37, 56.0] {
        let got = g.dequantize_e4m3_on_device(&codes, multiplier).unwrap();
        for (&b, &v) in codes.iter().zip(&got) {
            let want = half::f16::from_f32(e4m3_to_f32(b) / multiplier).to_f32();
            assert!(
                v.to_bits() == want.to_bits() || (v.is_nan() && want.is_nan()),
                "{b:#04x} / {multiplier}: {v} ≠ {want}"
            );
        }
    }

    // The E4M3 max-pool, on codes of post-ReLU values (and a few −0 and negatives), on the
    // 16-channel vector path and the one-channel path (c = 24, or a misaligned start).
    for ([n, h, w, c], offset) in [([2, 6, 10, 32], 0), ([1, 7, 5, 24], 0), ([3, 4, 4, 16], 3)] {
        let x: Vec<u8> = values(n * h * w * c, 77 + c as u64)
            .iter()
            .enumerate()
            .map(|(i, v)| match i % 41 {
                0 => 0x80,
                1 => 0xB5,
                _ => e4m3_from_f32(v.abs() * 300.0),
            })
            .collect();
        let got = g.maxpool2_e4m3_on_device(&x, [n, h, w, c], offset).unwrap();
        let (oh, ow) = (h / 2, w / 2);
        let at = |b: usize, y: usize, xx: usize, ch: usize| x[((b * h + y) * w + xx) * c + ch];
        for b in 0..n {
            for y in 0..oh {
                for xx in 0..ow {
                    for ch in 0..c {
                        let want = max_e4m3(
                            max_e4m3(at(b, 2 * y, 2 * xx, ch), at(b, 2 * y, 2 * xx + 1, ch)),
                            max_e4m3(
                                at(b, 2 * y + 1, 2 * xx, ch),
                                at(b, 2 * y + 1, 2 * xx + 1, ch),
                            ),
                        );
                        let o = ((b * oh + y) * ow + xx) * c + ch;
                        assert_eq!(got[o], want, "[{n},{h},{w},{c}] +{offset}: out {o}");
                    }
                }
            }
        }
    }
}

/// `--precision fp8`: refused below compute capability 8.9; above, every image's map (same
/// class) correlates with the FP16 map at ≥ 0.99, with FP8 preferred wherever a plan runs.
fn fp8_maps_correlate_with_fp16() {
    use scorecam_gpu::backend::Precision;
    let mut probe = gpu();
    if let Err(e) = probe.set_precision(Precision::Fp8) {
        assert!(matches!(e, Error::Usage(_)), "{e}");
        println!("FP8 refused on this GPU, as it must be: {e}");
        return;
    }
    drop(probe);
    let model = Arc::new(Vgg::random_vgg16(5));
    let s = model.input_size();
    let images = scorecam_gpu::bench::synthetic_images(4, s);
    let opts = |precision| CamOptions {
        mask_batch: 128,
        image_batch: 2,
        precision,
        ..CamOptions::default()
    };
    let mut e16 = Explainer::new(gpu(), Arc::clone(&model), opts(Precision::Fp16)).unwrap();
    let reference = e16.explain(&images).unwrap();
    drop(e16);
    let mut b8 = gpu();
    b8.set_precision(Precision::Fp8).unwrap();
    b8.prefer_fp8(true);
    let mut e8 = Explainer::new(b8, model, opts(Precision::Fp8)).unwrap();
    let targets: Vec<Targets> = reference
        .iter()
        .map(|e| Targets::classes([e.top1]))
        .collect();
    let got = e8.explain_for(&images, &targets).unwrap();
    let fp8_layers: Vec<usize> = e8
        .backend()
        .plan_choices()
        .iter()
        .filter(|c| c.fp8)
        .map(|c| c.stage)
        .collect();
    println!("FP8 plans at stages {fp8_layers:?}");
    println!(
        "route of a 128-mask forward: {:?}",
        e8.backend().fp8_route(128)
    );
    for (i, (a, b)) in reference.iter().zip(&got).enumerate() {
        let r = corr(&a.maps[0].map, &b.maps[0].map);
        println!("image {i}: FP8 vs FP16 map correlation {r:.5}");
        assert!(r >= 0.99, "image {i}: FP8 map correlation {r:.5} < 0.99");
    }
}

/// The FP8 masked forward against its CPU twin (`CpuBackend::emulate_fp8`: the same layers
/// quantized, scales from the same base forward), FP8 preferred wherever a plan runs. What
/// separates them is FP16 storage moving a few values across E4M3 rounding boundaries, so the
/// GPU must sit far closer to the twin than to f32: a layer left unquantized, a stale or wrong
/// scale or a misread filter shows up as an FP8-sized error.
///
/// Two FP8 layers, not VGG16's twelve: each flipped rounding perturbs the next layer's input and
/// so its roundings, and over twelve layers the two FP8 noises all but decorrelate. Simulated on
/// the CPU (FP16 storage modelled): GPU-to-twin NMSE 0.02–0.08 of GPU-to-f32 for this shape over
/// four seeds, 0.24–0.27 for four FP8 layers, 0.7 for VGG16; replaying round 1's scales in
/// round 2 gives 0.35–1.7. Hence the bound of 1/4 with two FP8 layers.
///
/// A second case runs three FP8 layers with blocks 1–2 in sub-batches of 4 rows (forced), so the
/// E4M3 activations cross from the sub-batched prefix to the full batch: there the bound is 1/2
/// (three layers sit between the simulated two and four); rows read from the wrong place would
/// be far above 1. A third keeps the conv after the prefix FP16, so it reads the prefix's
/// packed E4M3 output dequantized.
///
/// Each case names the route it is there to cover; where cuDNN offers no plan for it, the
/// case still runs (against the twin of the route taken) and says what it skipped.
fn fp8_forward_matches_the_cpu_twin() {
    // conv 3 → 64 (FP16, E4M3 out), conv 64 → 128 (FP8, E4M3 out), pool, conv 128 → 128 (FP8),
    // pool, head.
    let small = [64, 128, 0, 128, 0];
    fp8_twin_case(
        &small,
        (2, 4),
        (None, DirectUse::Off),
        &[],
        0.25,
        &[(1, "E4M3 between two FP8 convs")],
    );
    // The same with the first conv's E4M3 output written by the hand-written conv (and, on
    // sm_90a, the FP8 convs by the wgmma conv's E4M3 build).
    fp8_twin_case(
        &small,
        (2, 4),
        (None, DirectUse::Prefer),
        &[],
        0.25,
        &[(0, "the hand-written conv's E4M3 output")],
    );
    // ... then, after the sub-batched blocks 1–2 (stages 0–4), conv 128 → 128, pool.
    let three = [64, 128, 0, 128, 0, 128, 0];
    fp8_twin_case(
        &three,
        (2, 8),
        (Some(4), DirectUse::Off),
        &[],
        0.5,
        &[(4, "E4M3 across the prefix boundary")],
    );
    fp8_twin_case(
        &three,
        (2, 8),
        (Some(4), DirectUse::Off),
        &[5],
        0.5,
        &[(4, "dequantized after the prefix")],
    );
}

/// One case of [`fp8_forward_matches_the_cpu_twin`]: a random model of feature config `config`
/// at 32², `n` images and `m` masked rows, blocks 1–2 forced into sub-batches of `prefix` rows,
/// the hand-written first conv as `direct` says, stages `keep` kept FP16; `covers`: (stage,
/// what) pairs whose E4M3 output is the point.
fn fp8_twin_case(
    config: &[usize],
    (n, m): (usize, usize),
    (prefix, direct): (Option<usize>, DirectUse),
    keep: &[usize],
    max_ratio: f64,
    covers: &[(usize, &str)],
) {
    use scorecam_gpu::backend::Precision;
    let mut g = gpu();
    if let Err(e) = g.set_precision(Precision::Fp8) {
        assert!(matches!(e, Error::Usage(_)), "{e}");
        println!("FP8 refused on this GPU, as it must be: {e}");
        return;
    }
    g.prefer_fp8(true);
    g.force_prefix(prefix);
    g.set_direct_conv(direct);
    g.keep_fp16(keep);
    let model = Arc::new(Vgg::random_from_config(config, &[64, 10], 2, 32));
    let s = 32;
    let classes = model.num_classes();
    let cap = model.default_capture();
    let p = plan(&model, n, m, cap);
    g.prepare(&model, p).unwrap();
    println!("{config:?}: blocks 1–2 {}", g.report()["prefix"]);
    let base = cpu_images(n, s, 500);
    // Masked rows: each image times a smooth mask in [0, 1], as Score-CAM makes them.
    let plane = 3 * s * s;
    let masked = r16(&(0..m * plane)
        .map(|i| {
            let (r, j) = (i / plane, i % plane);
            let (y, x) = ((j % (s * s)) / s, j % s);
            let mask = ((x + r * 37) % s) as f32 / s as f32 * (y as f32 / s as f32);
            base[(r % n) * plane + j] * mask
        })
        .collect::<Vec<_>>());
    let a = model.capture_shape(cap, s);
    let acts_shape = [n, a.c, a.h, a.w];
    let mut gx = g.upload_f32(&[n, 3, s, s], &base).unwrap();
    let gm = g.upload_f32(&[m, 3, s, s], &masked).unwrap();
    let mut gacts = g.alloc(&acts_shape).unwrap();
    let mut gl = g.alloc(&[m, classes]).unwrap();
    // How the m-row forward runs (where FP8 plans could be built; m, the most masks planned, is
    // a rung of the ladder): known once a base forward has set the scales.
    g.forward(&gx, n, &mut gl, Some(&mut gacts)).unwrap();
    let route = g.fp8_route(m).expect("scales are set after a base forward");
    println!("FP8 route of the {m}-row forward: {route:?}");
    assert!(
        !route.fp8.is_empty(),
        "no FP8 plan could be built on this GPU and cuDNN (see SCORECAM_CUDA_VERBOSE=1)"
    );
    for &(stage, what) in covers {
        if !route.e4m3_out.contains(&stage) {
            println!("{config:?}: {what} skipped: no E4M3-output plan reached stage {stage}");
        }
    }
    let hand_written_e4m3 = g
        .plan_choices()
        .iter()
        .any(|c| c.rows == m && c.e4m3_out && c.direct_e4m3_ms.is_some());
    // Where the conv after it runs FP8 (its plans are cuDNN's to offer), the first conv's E4M3
    // output is the hand-written one's when preferred.
    let check_passed = g.report()["direct_conv"]["check"] == "passed";
    if direct == DirectUse::Prefer && check_passed && route.fp8.contains(&1) {
        assert!(
            hand_written_e4m3 && route.e4m3_out.contains(&0),
            "the hand-written conv's E4M3 output was preferred: {:?}",
            g.plan_choices()
        );
    }
    // On sm_90a the wgmma conv's E4M3 build runs every FP8 conv it fits (64·k input channels)
    // when preferred, after its own device check per layer shape.
    let report = g.report();
    if direct == DirectUse::Prefer && report["kernels_arch"] == "sm_90a" {
        let checks = &report["direct_conv"]["checks"];
        println!("hand-written conv checks: {checks}");
        assert!(
            checks.as_object().is_some_and(|c| c
                .iter()
                .any(|(k, v)| k.starts_with("E4M3") && v == "passed")),
            "no E4M3 wgmma conv check passed: {checks}"
        );
        for c in g.plan_choices().iter().filter(|c| c.rows == m && c.fp8) {
            let algo = c.fp8_algo.as_deref().unwrap_or_default();
            assert!(
                algo.starts_with("hand-written conv3x3_wg"),
                "stage {}: FP8 by {algo}, not the preferred wgmma conv",
                c.stage
            );
        }
        // Each block's last conv that runs FP8 runs with its pool, by the pooled E4M3 build
        // (preferred: kept whatever its time), in the format the route writes; the twin below
        // computes them apart, which pooling's commuting with the rounding makes the same.
        let pools = &report["fp8_fused_pools"];
        println!("FP8 fused pools: {pools}");
        let pools = pools.as_array().expect("fp8_fused_pools");
        assert!(!pools.is_empty(), "no FP8 conv + pool timed");
        for f in pools {
            let stage = f["stage"].as_u64().expect("stage") as usize;
            let runs = f["outs"]
                .as_array()
                .is_some_and(|o| o.iter().any(|o| o["runs"] == true));
            assert_eq!(runs, route.fp8.contains(&stage), "stage {stage}: {f}");
        }
    }
    for &stage in keep {
        assert!(
            !route.fp8.contains(&stage),
            "stage {stage} was to stay FP16"
        );
    }
    let mut twin = CpuBackend::new();
    twin.emulate_fp8_route(&route.fp8, &route.dequantized_inputs);
    twin.prepare(&model, p).unwrap();
    let mut exact = CpuBackend::new();
    exact.prepare(&model, p).unwrap();
    // Round 2's base images are round 1's × 0.7, so every scale changes (by no power of two,
    // which the E4M3 grid would not see): the masked forward, captured in round 1, must replay
    // with the new scales.
    for (round, factor) in [(1, 1.0f32), (2, 0.7)] {
        let base_r = r16(&base.iter().map(|v| v * factor).collect::<Vec<_>>());
        g.write_rows(&mut gx, 0, &base_r).unwrap();
        g.forward(&gx, n, &mut gl, Some(&mut gacts)).unwrap();
        g.forward(&gm, m, &mut gl, None).unwrap();
        let got = g.download(&gl, m).unwrap();
        let run_cpu = |b: &mut CpuBackend| {
            let x = cpu_buf(&[n, 3, s, s], base_r.clone());
            let xm = cpu_buf(&[m, 3, s, s], masked.clone());
            let mut acts = b.alloc(&acts_shape).unwrap();
            let mut l = b.alloc(&[m, classes]).unwrap();
            b.forward(&x, n, &mut l, Some(&mut acts)).unwrap();
            b.forward(&xm, m, &mut l, None).unwrap();
            b.download(&l, m).unwrap()
        };
        let (want, f32_logits) = (run_cpu(&mut twin), run_cpu(&mut exact));
        let to_twin = nmse(&got, &want);
        let to_f32 = nmse(&got, &f32_logits);
        let twin_to_f32 = nmse(&want, &f32_logits);
        println!(
            "round {round}: FP8 logits NMSE to the CPU twin {to_twin:.2e}, to f32 {to_f32:.2e} \
             (twin to f32 {twin_to_f32:.2e}); graphs {}",
            g.report()["graphs"]
        );
        assert!(
            to_twin <= to_f32 * max_ratio,
            "{config:?} round {round}: the FP8 forward is not the designed one: NMSE \
             {to_twin:.2e} to its twin, {to_f32:.2e} to f32"
        );
    }
}

/// Blocks 1–2 in sub-batches (forced, as timing may not choose them on a small model) give the
/// CPU's logits, launch by launch and replayed from a CUDA graph.
fn sub_batched_blocks_match_cpu() {
    let mut g = gpu();
    g.force_prefix(Some(4));
    let mut c = CpuBackend::new();
    let model = tiny_model();
    let (s, m) = (model.input_size(), 8);
    let classes = model.num_classes();
    let p = plan(&model, 2, m, model.default_capture());
    g.prepare(&model, p).unwrap();
    c.prepare(&model, p).unwrap();
    assert_eq!(
        g.report()["prefix"]["sub_batch"],
        4,
        "{}",
        g.report()["prefix"]
    );
    let x = cpu_images(m, s, 900);
    let gx = g.upload_f32(&[m, 3, s, s], &x).unwrap();
    let cx = cpu_buf(&[m, 3, s, s], x);
    let mut gl = g.alloc(&[m, classes]).unwrap();
    let mut cl = c.alloc(&[m, classes]).unwrap();
    c.forward(&cx, m, &mut cl, None).unwrap();
    let want = c.download(&cl, m).unwrap();
    for run in ["first (launch by launch)", "second (graph replay)"] {
        g.forward(&gx, m, &mut gl, None).unwrap();
        check_nmse(
            &g.download(&gl, m).unwrap(),
            &want,
            fp16_nmse_limit(TINY_WEIGHT_LAYERS),
            &format!("blocks 1–2 in sub-batches of 4, {run} forward"),
        );
    }
    // A size that does not apply is an error, not a silent whole-batch run.
    g.force_prefix(Some(3));
    assert!(matches!(g.prepare(&model, p), Err(Error::Invalid(_))));
}

fn combine_matches_cpu() {
    let mut g = gpu();
    let mut c = CpuBackend::new();
    let model = tiny_model();
    let s = model.input_size();
    for cap in [
        model.default_capture(),
        Capture {
            stage: 1,
            pre_relu: false,
        },
    ] {
        let a = model.capture_shape(cap, s);
        let p = plan(&model, 2, 8, cap);
        g.prepare(&model, p).unwrap();
        c.prepare(&model, p).unwrap();
        let shape = [2, a.c, a.h, a.w];
        let acts = r16(&values(2 * a.c * a.h * a.w, 31)
            .iter()
            .map(|v| v + 0.3)
            .collect::<Vec<_>>());
        let ga = g.upload_f32(&shape, &acts).unwrap();
        let ca = cpu_buf(&shape, acts);
        let probs: Vec<f32> = values(a.c, 41)
            .iter()
            .enumerate()
            .map(|(k, v)| if k % 5 == 0 { 0.0 } else { (v + 1.0) * 0.5 })
            .collect();
        let logits: Vec<f32> = values(a.c, 43).iter().map(|v| v * 3.0).collect();
        let m = logits.iter().copied().fold(f32::MIN, f32::max);
        let e: Vec<f32> = logits.iter().map(|v| (v - m).exp()).collect();
        let sum: f32 = e.iter().sum();
        let alpha: Vec<f32> = e.iter().map(|v| v / sum).collect();
        for (sem, w) in [
            (Semantics::Official, &probs),
            (Semantics::ChannelSoftmax, &alpha),
        ] {
            let (gm, gf) = g.combine(&ga, 1, w, sem).unwrap();
            let (cm, cf) = c.combine(&ca, 1, w, sem).unwrap();
            assert_eq!(gm.len(), cm.len(), "{} map size", sem.name());
            assert_eq!(gf, cf, "{} flat flag", sem.name());
            check_nmse(
                &gm,
                &cm,
                1e-5,
                &format!("combine {} {}×{}", sem.name(), a.h, a.w),
            );
        }
        // A flat official map: all weights zero.
        let zeros = vec![0f32; a.c];
        let (gm, gf) = g.combine(&ga, 0, &zeros, Semantics::Official).unwrap();
        assert!(
            gf && gm.iter().all(|&v| v == 0.0),
            "an all-zero official map must be flat zeros"
        );
    }
}

fn out_of_memory_is_an_error_and_the_backend_recovers() {
    let mut g = gpu();
    let model = tiny_model();
    let cap = model.default_capture();
    match g.prepare(&model, plan(&model, 1, 1 << 28, cap)) {
        Err(Error::OutOfMemory(msg)) => println!("absurd plan rejected: {msg}"),
        other => panic!("expected Error::OutOfMemory, got {other:?}"),
    }
    match g.alloc(&[1 << 40, 3, 224, 224]) {
        Err(Error::OutOfMemory(msg)) => println!("absurd buffer rejected: {msg}"),
        Err(e) => panic!("expected Error::OutOfMemory, got {e:?}"),
        Ok(_) => panic!("expected Error::OutOfMemory, got a buffer"),
    }
    // A real driver out-of-memory: two buffers of 60% of the device each.
    let (_, total) = g.device_memory().unwrap();
    let cols = total / 10 * 6 / 4 / 1024;
    let first = g.alloc(&[1024, cols]);
    let second = g.alloc(&[1024, cols]);
    match (&first, &second) {
        (_, Err(Error::OutOfMemory(msg))) | (Err(Error::OutOfMemory(msg)), _) => {
            println!("driver out-of-memory reported: {msg}")
        }
        _ => panic!(
            "two buffers of 60% of {total} bytes: expected Error::OutOfMemory, got {:?} / {:?}",
            first.as_ref().err(),
            second.as_ref().err()
        ),
    }
    drop((first, second));
    // Still usable with a sane plan.
    let mut c = CpuBackend::new();
    let s = model.input_size();
    g.prepare(&model, plan(&model, 2, 4, cap)).unwrap();
    c.prepare(&model, plan(&model, 2, 4, cap)).unwrap();
    let x = cpu_images(2, s, 300);
    let gx = g.upload_f32(&[2, 3, s, s], &x).unwrap();
    let cx = cpu_buf(&[2, 3, s, s], x);
    let mut gl = g.alloc(&[2, 10]).unwrap();
    let mut cl = c.alloc(&[2, 10]).unwrap();
    g.forward(&gx, 2, &mut gl, None).unwrap();
    c.forward(&cx, 2, &mut cl, None).unwrap();
    check_nmse(
        &g.download(&gl, 2).unwrap(),
        &c.download(&cl, 2).unwrap(),
        fp16_nmse_limit(TINY_WEIGHT_LAYERS),
        "forward after an out-of-memory plan",
    );
}

fn stage_times_are_recorded() {
    let mut g = gpu();
    let model = tiny_model();
    let s = model.input_size();
    g.prepare(&model, plan(&model, 2, 4, model.default_capture()))
        .unwrap();
    let x = g.upload_f32(&[2, 3, s, s], &cpu_images(2, s, 400)).unwrap();
    let mut l = g.alloc(&[2, 10]).unwrap();
    assert!(
        g.take_stage_times().unwrap().is_empty(),
        "profiling is off by default"
    );
    g.set_profiling(true);
    g.mark(Some(Stage::BaseForward)).unwrap();
    g.forward(&x, 2, &mut l, None).unwrap();
    g.mark(Some(Stage::MaskedForward)).unwrap();
    g.forward(&x, 2, &mut l, None).unwrap();
    g.mark(None).unwrap();
    let t = g.take_stage_times().unwrap();
    println!("stage times: {t:?}");
    let stages: Vec<Stage> = t.iter().map(|(st, _)| *st).collect();
    assert_eq!(stages, vec![Stage::BaseForward, Stage::MaskedForward]);
    assert!(t.iter().all(|(_, ms)| *ms >= 0.0 && ms.is_finite()));
    assert!(
        g.take_stage_times().unwrap().is_empty(),
        "times are reset by take_stage_times"
    );
    g.set_profiling(false);
}

// ------------------------------------------------------------------------------------------
// Whole model: random VGG16 at 224²

fn vgg16_logits_match_cpu() {
    let mut g = gpu();
    let mut c = CpuBackend::new();
    let model = Arc::new(Vgg::random_vgg16(0));
    let s = 224;
    let n = 2;
    let p = plan(&model, n, n, model.default_capture());
    g.prepare(&model, p).unwrap();
    c.prepare(&model, p).unwrap();
    let imgs = scorecam_gpu::bench::synthetic_images(n, s);
    let (mut gx, mut cx) = (
        g.alloc(&[n, 3, s, s]).unwrap(),
        c.alloc(&[n, 3, s, s]).unwrap(),
    );
    for (i, rgb) in imgs.iter().enumerate() {
        g.preprocess(rgb, model.meta.mean, model.meta.std, &mut gx, i)
            .unwrap();
        c.preprocess(rgb, model.meta.mean, model.meta.std, &mut cx, i)
            .unwrap();
    }
    let (mut gl, mut cl) = (g.alloc(&[n, 1000]).unwrap(), c.alloc(&[n, 1000]).unwrap());
    g.forward(&gx, n, &mut gl, None).unwrap();
    c.forward(&cx, n, &mut cl, None).unwrap();
    let (gv, cv) = (g.download(&gl, n).unwrap(), c.download(&cl, n).unwrap());
    check_nmse(&gv, &cv, fp16_nmse_limit(16), "VGG16 logits");
    for i in 0..n {
        let (gr, cr) = (&gv[i * 1000..][..1000], &cv[i * 1000..][..1000]);
        let (gt, ct) = (argmax(gr), argmax(cr));
        if gt != ct {
            // Only acceptable for a near tie on the CPU side (FP16 noise ~1e-2 of the logits).
            let gap = cr[ct] - cr[gt];
            let spread = cr.iter().map(|v| v.abs()).fold(0f32, f32::max);
            assert!(
                gap <= 1e-3 * spread,
                "image {i}: top-1 CUDA {gt} vs CPU {ct} (CPU gap {gap})"
            );
            println!("image {i}: top-1 differs on a near tie (CPU gap {gap})");
        }
    }
}

fn explain_both(
    model: &Arc<Vgg>,
    opts: CamOptions,
    imgs: &[Vec<u8>],
) -> (Vec<Explanation>, Vec<Explanation>) {
    let g = gpu();
    let mut ge = Explainer::new(g, Arc::clone(model), opts.clone()).unwrap();
    let mut ce = Explainer::new(CpuBackend::new(), Arc::clone(model), opts).unwrap();
    let t0 = std::time::Instant::now();
    let gx = ge.explain(imgs).unwrap();
    let tg = t0.elapsed();
    let t0 = std::time::Instant::now();
    let cx = ce.explain(imgs).unwrap();
    println!("explain: CUDA {tg:?}, CPU {:?}", t0.elapsed());
    (gx, cx)
}

/// GPU against CPU, channel by channel and pixel by pixel. The limits come from FP16 logits:
/// their error (see the module docs, ≲ 1–2 % of the logits' spread on VGG16) moves a softmax
/// probability by about twice that relatively, so an official score s_k may differ by
/// 0.005 + 0.05·s_k and a channel-softmax logit by 0.03 + 0.02·|z_k| (the fixtures' FP16 tolerances);
/// a map normalized to [0, 1] built from those weights by at most 0.02 anywhere, at correlation
/// ≥ 0.999. Equal weights, or the top channel's weight zeroed, miss those limits by 2–20×
/// (`tests/fixtures.rs`, `the_fp16_golden_check_rejects_wrong_channel_weights`).
fn compare_explanations(gx: &[Explanation], cx: &[Explanation], sem: Semantics, what: &str) {
    let (atol, rtol) = match sem {
        Semantics::Official => (0.005, 0.05),
        Semantics::ChannelSoftmax | Semantics::Torchcam => (0.03, 0.02),
    };
    assert_eq!(gx.len(), cx.len());
    for (i, (g, c)) in gx.iter().zip(cx).enumerate() {
        assert_eq!(g.top1, c.top1, "{what} image {i}: predicted class");
        assert_eq!(
            g.flat_channels, c.flat_channels,
            "{what} image {i}: flat channels"
        );
        assert_eq!(g.maps.len(), c.maps.len());
        for (gm, cm) in g.maps.iter().zip(&c.maps) {
            assert_eq!(gm.class, cm.class);
            let d_scores = check_tol(
                &gm.channel_scores,
                &cm.channel_scores,
                atol,
                rtol,
                &format!("{what} image {i} class {} channel scores", gm.class),
            );
            let r = corr(&gm.map, &cm.map);
            let d_map = check_tol(
                &gm.map,
                &cm.map,
                0.02,
                0.0,
                &format!("{what} image {i} class {} map", gm.class),
            );
            println!(
                "{what} image {i} class {}: scores max|Δ| {d_scores:.2e}, map max|Δ| {d_map:.2e}, corr {r:.6}",
                gm.class
            );
            assert!(
                r >= 0.999,
                "{what} image {i} class {}: map correlation {r:.5} < 0.999",
                gm.class
            );
            assert!(
                gm.map.iter().all(|v| (0.0..=1.0).contains(v)),
                "{what}: map outside [0, 1]"
            );
        }
    }
}

/// Full Score-CAM on both backends at `features.4` (64 channels at 112², so 128 masked inputs
/// for two images: batches of 48, 48 and a remainder).
fn vgg16_score_cam_matches_cpu() {
    let model = Arc::new(Vgg::random_vgg16(0));
    let imgs = scorecam_gpu::bench::synthetic_images(2, 224);
    for sem in [Semantics::Official, Semantics::ChannelSoftmax] {
        let opts = CamOptions {
            method: scorecam_gpu::cam::Method::ScoreCam,
            semantics: sem,
            layer: Some("features.4".into()),
            targets: Targets::Top(1),
            mask_batch: 48,
            image_batch: 2,
            precision: Default::default(),
        };
        let (gx, cx) = explain_both(&model, opts, &imgs);
        compare_explanations(&gx, &cx, sem, &format!("VGG16 features.4 {}", sem.name()));
    }
}

/// The default layer (`features.29`, 512 channels): 1024 masked forwards per mode on the CPU.
fn vgg16_score_cam_default_layer_matches_cpu() {
    let model = Arc::new(Vgg::random_vgg16(0));
    let imgs = scorecam_gpu::bench::synthetic_images(2, 224);
    for sem in [Semantics::Official, Semantics::ChannelSoftmax] {
        let opts = CamOptions {
            method: scorecam_gpu::cam::Method::ScoreCam,
            semantics: sem,
            layer: None,
            targets: Targets::Top(1),
            mask_batch: 100,
            image_batch: 2,
            precision: Default::default(),
        };
        let (gx, cx) = explain_both(&model, opts, &imgs);
        compare_explanations(
            &gx,
            &cx,
            sem,
            &format!("VGG16 default layer {}", sem.name()),
        );
    }
}

// ------------------------------------------------------------------------------------------
// Golden fixtures (tests/fixtures, made by PyTorch + pytorch-grad-cam 1.5.7)

fn gpu_tol(m: &Value, key: &str, default: (f32, f32)) -> (f32, f32) {
    let t = &m["tolerances"]["gpu_f16"][key];
    match (t["atol"].as_f64(), t["rtol"].as_f64()) {
        (Some(a), Some(r)) => (a as f32, r as f32),
        _ => default,
    }
}

fn fixtures_forward_matches_golden() {
    let m = manifest();
    let mut g = gpu();
    let (la, lr) = gpu_tol(&m, "logits", (0.03, 0.02));
    let (aa, ar) = gpu_tol(&m, "activations", (0.03, 0.02));
    for case in m["forward"].as_array().unwrap() {
        let what = format!(
            "{} × {}",
            case["model"].as_str().unwrap(),
            case["image"].as_str().unwrap()
        );
        let model = fixture_model(&case["model_file"]);
        let s = model.input_size();
        let rgb = fixture_rgb(&case["image_file"], s);
        let mut layers: Vec<(Capture, Option<&Value>)> = case["activations"]
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(l, f)| (model.resolve_layer(l).unwrap(), Some(f)))
                    .collect()
            })
            .unwrap_or_default();
        if layers.is_empty() {
            layers.push((model.default_capture(), None));
        }
        for (cap, file) in layers {
            g.prepare(&model, plan(&model, 1, 4, cap)).unwrap();
            let a = model.capture_shape(cap, s);
            let mut x = g.alloc(&[1, 3, s, s]).unwrap();
            g.preprocess(&rgb, model.meta.mean, model.meta.std, &mut x, 0)
                .unwrap();
            check_tol(
                &g.download(&x, 1).unwrap(),
                &npy(&case["input"]),
                0.01,
                0.0,
                &format!("{what} input (FP16)"),
            );
            let mut l = g.alloc(&[1, model.num_classes()]).unwrap();
            let mut acts = g.alloc(&[1, a.c, a.h, a.w]).unwrap();
            g.forward(&x, 1, &mut l, Some(&mut acts)).unwrap();
            let logits = g.download(&l, 1).unwrap();
            let want = npy(&case["logits"]);
            let d = check_tol(&logits, &want, la, lr, &format!("{what} logits"));
            if let Some(top1) = case["top1"].as_u64() {
                assert_eq!(argmax(&logits), top1 as usize, "{what}: top-1");
            }
            let mut line = format!("{what}: logits max|Δ| {d:.2e}");
            if let Some(file) = file {
                let name = model.capture_name(cap);
                let d = check_tol(
                    &g.download(&acts, 1).unwrap(),
                    &npy(file),
                    aa,
                    ar,
                    &format!("{what} {name}"),
                );
                line += &format!(", {name} max|Δ| {d:.2e}");
            }
            println!("{line}");
        }
    }
}

/// Every golden case on the GPU, in both modes, through the same check as the CPU's but with the
/// manifest's FP16 tolerances: every channel's score, the map pixel by pixel, its correlation.
fn fixtures_score_cam_matches_golden() {
    let m = manifest();
    let tol = CamTolerances::from_manifest(&m, "gpu_f16");
    let (la, lr) = gpu_tol(&m, "logits", (0.03, 0.02));
    let mut failures = Vec::new();
    for case in m["cams"].as_array().unwrap() {
        let id = case["id"].as_str().unwrap();
        let model = fixture_model(&case["model_file"]);
        let s = model.input_size();
        let img = fixture_rgb(&case["image_file"], s);
        let class = case["class"].as_u64().unwrap() as usize;
        for (sem, key) in [
            (Semantics::Official, "official"),
            (Semantics::ChannelSoftmax, "channel_softmax"),
        ] {
            let opts = CamOptions {
                method: scorecam_gpu::cam::Method::ScoreCam,
                semantics: sem,
                layer: case["layer"].as_str().map(str::to_string),
                targets: Targets::Classes(vec![class]),
                mask_batch: 7, // several batches and a remainder
                image_batch: 1,
                precision: Default::default(),
            };
            let mut ex = Explainer::new(gpu(), Arc::clone(&model), opts).unwrap();
            let e = ex.explain(std::slice::from_ref(&img)).unwrap().remove(0);
            check_tol(
                &e.logits,
                &npy(&case["logits"]),
                la,
                lr,
                &format!("{id} logits"),
            );
            if case["top1"].as_bool() == Some(true) {
                assert_eq!(e.top1, class, "{id}: top-1");
            }
            match check_cam(case, key, &e, &tol) {
                Ok(line) => println!("{line}"),
                Err(msg) => failures.push(msg),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Several classes at once and a batch of three images on the GPU, against the goldens.
fn fixtures_multi_class_and_batch_match_golden() {
    let tol = CamTolerances::from_manifest(&manifest(), "gpu_f16");
    let report = common::check_multi_and_batch(gpu, &tol);
    println!("{}", report.join("\n"));
}

/// Every method on the GPU against its reference (the manifest's FP16 suggestions; unmeasured
/// until a GPU run).
fn methods_match_golden() {
    let m = manifest();
    let mut failures = Vec::new();
    for case in m["methods"].as_array().unwrap() {
        match common::check_method_case(gpu, &m, case, "gpu_f16") {
            Ok(lines) => lines.iter().for_each(|l| println!("{l}")),
            Err(msg) => failures.push(msg),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The metrics' forwards (host-made inputs written into the device buffer, class probabilities)
/// against the CPU, over more rows than one mask batch.
fn class_probs_match_cpu() {
    let model = tiny_model();
    let s = model.input_size();
    let opts = CamOptions {
        method: scorecam_gpu::cam::Method::ScoreCam,
        semantics: Semantics::Official,
        layer: None,
        targets: Targets::Top(1),
        mask_batch: 5,
        image_batch: 1,
        precision: Default::default(),
    };
    let mut ge = Explainer::new(gpu(), Arc::clone(&model), opts.clone()).unwrap();
    let mut ce = Explainer::new(CpuBackend::new(), Arc::clone(&model), opts).unwrap();
    let rows = 13;
    let x = cpu_images(rows, s, 400);
    let classes: Vec<usize> = (0..rows).map(|r| r % 10).collect();
    let g = ge.class_probs(&x, &classes).unwrap();
    let c = ce.class_probs(&x, &classes).unwrap();
    let d = check_tol(&g, &c, 0.005, 0.02, "class_probs");
    println!("class_probs: {rows} rows, max |Δ| {d:.2e}");
}

fn main() -> std::process::ExitCode {
    use common::Need::Gpu;
    let t = common::trial;
    common::run_tests(vec![
        t(
            "new_never_panics_and_reports_unavailability",
            &[],
            new_never_panics_and_reports_unavailability,
        ),
        t("preprocess_matches_cpu", &[Gpu], preprocess_matches_cpu),
        t(
            "forward_matches_cpu_at_every_stage",
            &[Gpu],
            forward_matches_cpu_at_every_stage,
        ),
        t("masked_inputs_match_cpu", &[Gpu], masked_inputs_match_cpu),
        t("scores_match_cpu", &[Gpu], scores_match_cpu),
        t("combine_matches_cpu", &[Gpu], combine_matches_cpu),
        t(
            "fp8_kernels_match_the_host",
            &[Gpu],
            fp8_kernels_match_the_host,
        ),
        t(
            "fp8_maps_correlate_with_fp16",
            &[Gpu],
            fp8_maps_correlate_with_fp16,
        ),
        t(
            "fp8_forward_matches_the_cpu_twin",
            &[Gpu],
            fp8_forward_matches_the_cpu_twin,
        ),
        t(
            "sub_batched_blocks_match_cpu",
            &[Gpu],
            sub_batched_blocks_match_cpu,
        ),
        t(
            "queued_scores_match_synchronous_ones",
            &[Gpu],
            queued_scores_match_synchronous_ones,
        ),
        t(
            "every_batch_runs_planned_and_graphs_replay_exactly",
            &[Gpu],
            every_batch_runs_planned_and_graphs_replay_exactly,
        ),
        t(
            "layer_times_cover_every_layer",
            &[Gpu],
            layer_times_cover_every_layer,
        ),
        t(
            "graph_api_convolutions_match_cpu",
            &[Gpu],
            graph_api_convolutions_match_cpu,
        ),
        t(
            "out_of_memory_is_an_error_and_the_backend_recovers",
            &[Gpu],
            out_of_memory_is_an_error_and_the_backend_recovers,
        ),
        t("stage_times_are_recorded", &[Gpu], stage_times_are_recorded),
        t("vgg16_logits_match_cpu", &[Gpu], vgg16_logits_match_cpu),
        t(
            "vgg16_score_cam_matches_cpu",
            &[Gpu],
            vgg16_score_cam_matches_cpu,
        ),
        // 1024 masked forwards per mode on the CPU side: run with --include-ignored on a GPU host.
        t(
            "vgg16_score_cam_default_layer_matches_cpu",
            &[Gpu],
            vgg16_score_cam_default_layer_matches_cpu,
        )
        .with_ignored_flag(true),
        t(
            "fixtures_forward_matches_golden",
            &[Gpu],
            fixtures_forward_matches_golden,
        ),
        t(
            "fixtures_score_cam_matches_golden",
            &[Gpu],
            fixtures_score_cam_matches_golden,
        ),
        t(
            "fixtures_multi_class_and_batch_match_golden",
            &[Gpu],
            fixtures_multi_class_and_batch_match_golden,
        ),
        t("methods_match_golden", &[Gpu], methods_match_golden),
        t("direct_conv_matches_cpu", &[Gpu], direct_conv_matches_cpu),
        t(
            "plan_cache_serves_a_second_prepare",
            &[Gpu],
            plan_cache_serves_a_second_prepare,
        ),
        t("class_probs_match_cpu", &[Gpu], class_probs_match_cpu),
    ])
}
