//! `--precision fp8`'s CPU twin ([`Fp8Emulation`]): that it computes what the design says (which
//! layers are quantized, with which scales, from which base forward), checked against naive
//! loops; and the fidelity the design gives Score-CAM maps, measured on the CPU: emulated-FP8
//! maps against f32 maps of the same class. The CUDA FP8 path is tested against this twin in
//! `cuda_parity.rs`.
//!
//! The full VGG16 measurement (two 224² images, 512 channels, 2 × 1026 forwards) takes minutes
//! on a small CPU: it runs with `SCORECAM_SLOW=1` and is reported as ignored otherwise.

use std::sync::Arc;

mod common;

use common::{corr, naive_conv3x3, values, Need};
use scorecam_gpu::backend::cpu::{self, CpuBackend, CpuBuf};
use scorecam_gpu::backend::fp8::{
    capable_stages, fake_quantize, input_scale, weight_scale, Fp8Emulation, StageQuant,
};
use scorecam_gpu::backend::{Backend, Plan, Semantics};
use scorecam_gpu::cam::{CamOptions, Explainer, Targets};
use scorecam_gpu::image::{self, ResizeMode};
use scorecam_gpu::model::{FeatureStage, Vgg, VGG16_CONFIG};

/// The forward by hand: every conv stage quantized as `quantize` says, its input rounded at
/// `sx[stage]` and (FP8) its filter at its own amax / 448; the head through the (separately
/// tested) CPU ops. Returns the logits and the largest |input| of every stage.
fn naive_forward(
    model: &Vgg,
    x: &[f32],
    n: usize,
    s: usize,
    quantize: &[StageQuant],
    sx: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let (mut a, mut c, mut h) = (x.to_vec(), 3, s);
    let mut amax = vec![0f32; model.features.len()];
    for (i, stage) in model.features.iter().enumerate() {
        amax[i] = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        match stage {
            FeatureStage::Conv(l) => {
                let sw = l.weight.iter().fold(0f32, |m, v| m.max(v.abs())) / 448.0;
                let round_x = || a.iter().map(|&v| fake_quantize(v, sx[i])).collect();
                let (xin, win): (Vec<f32>, Vec<f32>) = match quantize[i] {
                    StageQuant::Fp8 => (
                        round_x(),
                        l.weight.iter().map(|&v| fake_quantize(v, sw)).collect(),
                    ),
                    StageQuant::InputOnly => (round_x(), l.weight.clone()),
                    StageQuant::Exact => (a.clone(), l.weight.clone()),
                };
                a = naive_conv3x3(&xin, n, c, h, h, &win, &l.bias, l.cout);
                a.iter_mut().for_each(|v| *v = v.max(0.0));
                c = l.cout;
            }
            FeatureStage::MaxPool { .. } => {
                a = cpu::maxpool2(&a, n * c, h, h);
                h /= 2;
            }
        }
    }
    let mut f = cpu::adaptive_avgpool(&a, n * c, h, h, 7, 7);
    for l in &model.classifier {
        f = cpu::linear(&f, n, l.fin, &l.weight, &l.bias, l.fout);
        if l.relu {
            cpu::relu(&mut f);
        }
    }
    (f, amax)
}

/// Two capable convs (16 → 32, 32 → 32) behind an FP16-only first conv.
fn small_capable_model() -> Vgg {
    Vgg::random_from_config(&[16, 32, 0, 32], &[16, 10], 7, 8)
}

fn max_rel_diff(got: &[f32], want: &[f32]) -> f32 {
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    got.iter()
        .zip(want)
        .fold(0f32, |m, (g, w)| m.max((g - w).abs()))
        / scale
}

/// The base forward (it captures) runs unquantized and sets `sx` from its inputs' amax; the
/// masked forwards after it quantize exactly the capable stages, as naive loops compute it.
fn emulation_computes_the_design() {
    let model = small_capable_model();
    let s = model.input_size();
    assert_eq!(capable_stages(&model), vec![false, true, false, true]);
    let (exact, fp8, input_only) = (StageQuant::Exact, StageQuant::Fp8, StageQuant::InputOnly);
    let quantize = [exact, fp8, exact, fp8];
    let base: Vec<f32> = values(2 * 3 * s * s, 1).iter().map(|v| v * 2.0).collect();
    let masked: Vec<f32> = values(3 * 3 * s * s, 2).iter().map(|v| v * 1.5).collect();
    let cap = model.default_capture();
    let mut emu = Fp8Emulation::new(&model);

    // Before any base forward: f32.
    let (early, _) = cpu::forward_emulating_fp8(&model, &masked, 3, s, None, &mut emu);
    assert_eq!(early, cpu::forward(&model, &masked, 3, s, None).0);

    let (base_logits, _) = cpu::forward_emulating_fp8(&model, &base, 2, s, Some(cap), &mut emu);
    let none = vec![exact; quantize.len()];
    let (want_base, amax) = naive_forward(&model, &base, 2, s, &none, &[]);
    assert!(max_rel_diff(&base_logits, &want_base) < 1e-5);
    let sx: Vec<f32> = amax.iter().map(|&a| input_scale(a)).collect();

    let (got, _) = cpu::forward_emulating_fp8(&model, &masked, 3, s, None, &mut emu);
    let (want, _) = naive_forward(&model, &masked, 3, s, &quantize, &sx);
    let (f32_logits, _) = naive_forward(&model, &masked, 3, s, &none, &[]);
    let d = max_rel_diff(&got, &want);
    let q = max_rel_diff(&f32_logits, &want);
    println!("emulated vs naive FP8 logits: {d:.2e} of max |logit|; FP8 vs f32: {q:.2e}");
    assert!(
        d < 1e-5,
        "emulated FP8 logits differ from the naive ones by {d:.2e}"
    );
    assert!(
        q > 1e3 * d,
        "the test would not see a missing quantization ({q:.2e})"
    );

    // A GPU route: the second capable conv in FP16 on its input rounded to E4M3 (it reads the
    // first one's E4M3 output dequantized), or exact.
    for (route, inputs_only, want_quant) in [
        (vec![1], vec![3], [exact, fp8, exact, input_only]),
        (vec![1], vec![], [exact, fp8, exact, exact]),
        (vec![0, 2, 3], vec![], [exact, exact, exact, fp8]),
    ] {
        let mut routed = emu.clone();
        routed.route(&route, &inputs_only);
        let (got, _) = cpu::forward_emulating_fp8(&model, &masked, 3, s, None, &mut routed);
        let (want, _) = naive_forward(&model, &masked, 3, s, &want_quant, &sx);
        let d = max_rel_diff(&got, &want);
        assert!(d < 1e-5, "route {route:?} {inputs_only:?}: {d:.2e}");
        assert!(
            max_rel_diff(&got, &f32_logits) > 1e3 * d,
            "route {route:?} {inputs_only:?}: no rounding visible"
        );
    }

    // Scales from an image group: the amax of every image of the base forward.
    let FeatureStage::Conv(l) = &model.features[1] else {
        unreachable!()
    };
    assert_eq!(weight_scale(&l.weight), {
        l.weight.iter().fold(0f32, |m, v| m.max(v.abs())) / 448.0
    });

    // The CPU backend runs the same when asked to emulate, and only then.
    let plan = Plan {
        input_size: s,
        max_images: 2,
        max_masks: 3,
        capture: cap,
    };
    let run = |emulate: bool| {
        let mut b = CpuBackend::new();
        b.emulate_fp8(emulate);
        b.prepare(&Arc::new(model.clone()), plan).unwrap();
        let shape = model.capture_shape(cap, s);
        let mut acts = b.alloc(&[2, shape.c, shape.h, shape.w]).unwrap();
        let mut logits = b.alloc(&[3, 10]).unwrap();
        let x = CpuBuf {
            shape: vec![2, 3, s, s],
            data: base.clone(),
        };
        b.forward(&x, 2, &mut logits, Some(&mut acts)).unwrap();
        let xm = CpuBuf {
            shape: vec![3, 3, s, s],
            data: masked.clone(),
        };
        b.forward(&xm, 3, &mut logits, None).unwrap();
        logits.data
    };
    assert_eq!(run(true), got);
    assert_eq!(run(false), cpu::forward(&model, &masked, 3, s, None).0);
}

/// Score-CAM maps with emulated FP8 against f32 maps of the same class, per image: the
/// correlations, and their minimum.
fn fp8_map_correlations(
    model: &Arc<Vgg>,
    images: &[Vec<u8>],
    sem: Semantics,
    mask_batch: usize,
) -> Vec<f64> {
    let opts = CamOptions {
        semantics: sem,
        mask_batch,
        image_batch: 2,
        ..CamOptions::default()
    };
    let mut f32_run = Explainer::new(CpuBackend::new(), Arc::clone(model), opts.clone()).unwrap();
    let reference = f32_run.explain(images).unwrap();
    let mut emulated = CpuBackend::new();
    emulated.emulate_fp8(true);
    let mut fp8_run = Explainer::new(emulated, Arc::clone(model), opts).unwrap();
    let targets: Vec<Targets> = reference
        .iter()
        .map(|e| Targets::classes([e.top1]))
        .collect();
    let got = fp8_run.explain_for(images, &targets).unwrap();
    reference
        .iter()
        .zip(&got)
        .map(|(a, b)| corr(&a.maps[0].map, &b.maps[0].map))
        .collect()
}

fn report(what: &str, r: &[f64]) -> f64 {
    let mut sorted = r.to_vec();
    sorted.sort_by(f64::total_cmp);
    let min = sorted[0];
    println!(
        "{what}: emulated FP8 vs f32 map correlation min {min:.5}, median {:.5}, max {:.5}, \
         per image {:?}",
        sorted[sorted.len() / 2],
        sorted[sorted.len() - 1],
        r.iter().map(|v| format!("{v:.5}")).collect::<Vec<_>>()
    );
    min
}

/// The test images at side `s`: the fixtures' photos-like images and synthetic ones.
fn images(s: usize, synthetic: usize) -> Vec<Vec<u8>> {
    let dir = common::fixtures();
    let mut out: Vec<Vec<u8>> = ["img_a.png", "img_b.png", "img_c.png", "img_wide.png"]
        .iter()
        .map(|f| image::load_rgb(&dir.join(f), s, ResizeMode::Crop).unwrap())
        .collect();
    out.extend(scorecam_gpu::bench::synthetic_images(synthetic, s));
    out
}

/// A VGG16-shaped network at a quarter of the width (every conv but the first in FP8), 64²
/// inputs: the design's fidelity, ≥ 0.99 on every image in both semantics.
fn emulated_fp8_maps_correlate_with_f32() {
    let cfg: Vec<usize> = VGG16_CONFIG.iter().map(|&c| c / 4).collect();
    let model = Arc::new(Vgg::random_from_config(&cfg, &[64, 64, 100], 11, 64));
    assert_eq!(capable_stages(&model).iter().filter(|&&c| c).count(), 12);
    let imgs = images(64, 4);
    for sem in [Semantics::Official, Semantics::ChannelSoftmax] {
        let r = fp8_map_correlations(&model, &imgs, sem, 64);
        let min = report(&format!("quarter-width VGG16 at 64², {}", sem.name()), &r);
        assert!(
            min >= 0.99,
            "{}: FP8 map correlation {min:.5} < 0.99",
            sem.name()
        );
    }
}

/// Random-weight VGG16 at 224², the default layer (512 channels): what `bench --precision fp8`
/// reports on a GPU, emulated.
fn vgg16_emulated_fp8_fidelity() {
    let model = Arc::new(Vgg::random_vgg16(5));
    let imgs = images(224, 0)[..2].to_vec();
    let r = fp8_map_correlations(&model, &imgs, Semantics::Official, 128);
    let min = report("random VGG16 at 224², official", &r);
    assert!(min >= 0.99, "FP8 map correlation {min:.5} < 0.99");
}

fn main() -> std::process::ExitCode {
    let t = common::trial;
    common::run_tests(vec![
        t(
            "emulation_computes_the_design",
            &[],
            emulation_computes_the_design,
        ),
        t(
            "emulated_fp8_maps_correlate_with_f32",
            &[],
            emulated_fp8_maps_correlate_with_f32,
        ),
        t(
            "vgg16_emulated_fp8_fidelity",
            &[Need::Slow],
            vgg16_emulated_fp8_fidelity,
        ),
    ])
}
