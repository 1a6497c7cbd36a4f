//! The CPU engine against the golden fixtures made by PyTorch, a port of the official Score-CAM
//! and pytorch-grad-cam 1.5.7 (`tests/fixtures/make_fixtures.py`; outputs committed).

mod common;

use common::{
    check_cam, check_tol as check, fixture_model as model, fixture_rgb as rgb, fixtures as dir,
    npy, CamTolerances,
};
use scorecam_gpu::backend::cpu::{self, CpuBackend};
use scorecam_gpu::backend::Semantics;
use scorecam_gpu::cam::{CamOptions, Explainer, Explanation, Targets};
use scorecam_gpu::image::{self, ResizeMode};
use serde_json::Value;

#[test]
fn forward_logits_and_activations_match_pytorch() {
    let m = common::manifest();
    let mut worst = 0f32;
    for case in m["forward"].as_array().unwrap() {
        let what = format!("{} × {}", case["model"], case["image"]);
        let model = model(&case["model_file"]);
        let s = model.input_size();
        let x = image::normalize(
            &rgb(&case["image_file"], s),
            s,
            model.meta.mean,
            model.meta.std,
        );
        check(
            &x,
            &npy(&case["input"]),
            1e-6,
            0.0,
            &format!("{what} input"),
        );
        let (logits, _) = cpu::forward(&model, &x, 1, s, None);
        worst = worst.max(check(
            &logits,
            &npy(&case["logits"]),
            1e-4,
            1e-4,
            &format!("{what} logits"),
        ));
        for (layer, file) in case["activations"].as_object().unwrap() {
            let cap = model.resolve_layer(layer).unwrap();
            let (_, acts) = cpu::forward(&model, &x, 1, s, Some(cap));
            check(
                &acts.unwrap(),
                &npy(file),
                1e-4,
                1e-4,
                &format!("{what} {layer}"),
            );
        }
    }
    println!("fixture forward: worst logit |Δ| {worst:.3e}");
}

/// Explain a golden case on the CPU in one mode.
fn explain_case(case: &Value, sem: Semantics) -> Explanation {
    let model = model(&case["model_file"]);
    let s = model.input_size();
    let img = rgb(&case["image_file"], s);
    let opts = CamOptions {
        method: scorecam_gpu::cam::Method::ScoreCam,
        semantics: sem,
        layer: Some(case["layer"].as_str().unwrap().to_string()),
        targets: Targets::Classes(vec![case["class"].as_u64().unwrap() as usize]),
        mask_batch: 7, // several batches and a remainder
        image_batch: 1,
        precision: Default::default(),
    };
    let mut ex = Explainer::new(CpuBackend::new(), model, opts).unwrap();
    ex.explain(std::slice::from_ref(&img)).unwrap().remove(0)
}

const MODES: [(Semantics, &str); 2] = [
    (Semantics::Official, "official"),
    (Semantics::ChannelSoftmax, "channel_softmax"),
];

#[test]
fn score_cam_maps_match_references_in_both_modes() {
    let m = common::manifest();
    let tol = CamTolerances::from_manifest(&m, "cpu_f32");
    let mut report = Vec::new();
    for case in m["cams"].as_array().unwrap() {
        for (sem, key) in MODES {
            let e = explain_case(case, sem);
            report.push(check_cam(case, key, &e, &tol).unwrap_or_else(|msg| panic!("{msg}")));
        }
    }
    println!("{}", report.join("\n"));
}

/// The map of `case` recomputed from its golden activations with other channel scores: what a
/// backend that got the channel weights wrong would produce.
fn map_with_scores(case: &Value, sem: Semantics, scores: &[f32]) -> (Vec<f32>, bool) {
    let model = model(&case["model_file"]);
    let s = model.input_size();
    let cap = model
        .resolve_layer(case["layer"].as_str().unwrap())
        .unwrap();
    let a = model.capture_shape(cap, s);
    let acts = npy(&case["activations"]);
    let weights = match sem {
        Semantics::Official => scores.to_vec(),
        _ => cpu::softmax(scores),
    };
    let (map, flat) = cpu::combine_maps(&acts, a.c, a.h, a.w, s, &weights, sem);
    match sem {
        Semantics::Official => (map, flat),
        _ => scorecam_gpu::cam::grad_cam_scale(&map, a.h, a.w, s),
    }
}

/// The GPU's check against the goldens (FP16 tolerances) must tell wrong channel weights apart:
/// equal weights, or the most important channel's weight zeroed, in the map alone (the scores
/// reported correctly) or in the scores. Shown here with the CPU's results, so it runs everywhere.
#[test]
fn the_fp16_golden_check_rejects_wrong_channel_weights() {
    let m = common::manifest();
    let tol = CamTolerances::from_manifest(&m, "gpu_f16");
    let mut caught = Vec::new();
    for case in m["cams"].as_array().unwrap() {
        let id = case["id"].as_str().unwrap();
        for (sem, key) in MODES {
            let e = explain_case(case, sem);
            // The right answer passes the FP16 check (the CPU is far inside it).
            check_cam(case, key, &e, &tol).unwrap_or_else(|msg| panic!("{msg}"));
            let scores = &e.maps[0].channel_scores;
            let k = scores.len();
            // Equal weights: every channel the same (official: the mean score; channel-softmax:
            // equal logits give equal softmax weights).
            let mean = scores.iter().sum::<f32>() / k as f32;
            let equal = vec![mean; k];
            // The channel contributing most, zeroed (channel-softmax: its logit sent to -inf
            // would be the same as a zero weight; a very low logit does it).
            let top = (0..k)
                .max_by(|&a, &b| scores[a].total_cmp(&scores[b]))
                .unwrap();
            let mut zeroed = scores.clone();
            zeroed[top] = if sem == Semantics::Official {
                0.0
            } else {
                -1e4
            };
            for (what, wrong) in [("equal weights", &equal), ("top channel zeroed", &zeroed)] {
                // Wrong weights in the map, right scores reported.
                let mut bad = e.clone();
                (bad.maps[0].map, bad.maps[0].flat) = map_with_scores(case, sem, wrong);
                let verdict = check_cam(case, key, &bad, &tol);
                assert!(
                    verdict.is_err(),
                    "{id} {key}: {what} in the map passed the FP16 check"
                );
                // Wrong scores reported.
                let mut bad = e.clone();
                bad.maps[0].channel_scores = wrong.clone();
                assert!(
                    check_cam(case, key, &bad, &tol).is_err(),
                    "{id} {key}: {what} in the scores passed the FP16 check"
                );
                caught.push(format!("{id} {key} {what}: {}", verdict.unwrap_err()));
            }
        }
    }
    println!("{}", caught.join("\n"));
}

#[test]
fn several_classes_and_a_batch_of_three_match_their_single_goldens() {
    let m = common::manifest();
    let tol = CamTolerances::from_manifest(&m, "cpu_f32");
    let report = common::check_multi_and_batch(CpuBackend::new, &tol);
    println!("{}", report.join("\n"));
}

#[test]
fn preprocessing_matches_torchvision() {
    let m = common::manifest();
    for case in m["preprocess"].as_array().unwrap() {
        let mode = match case["mode"].as_str().unwrap() {
            "crop" => ResizeMode::Crop,
            _ => ResizeMode::Stretch,
        };
        let s = case["size"].as_u64().unwrap() as usize;
        let px =
            image::load_rgb(&dir().join(case["image_file"].as_str().unwrap()), s, mode).unwrap();
        let f = |v: &Value| -> [f32; 3] {
            let a = v.as_array().unwrap();
            [0, 1, 2].map(|i| a[i].as_f64().unwrap() as f32)
        };
        let x = image::normalize(&px, s, f(&case["mean"]), f(&case["std"]));
        let d = check(
            &x,
            &npy(&case["golden"]),
            0.021,
            0.0,
            &format!("preprocess {}", case["mode"]),
        );
        println!(
            "preprocess {}: max |Δ| {d:.4} (normalized units)",
            case["mode"]
        );
    }
}
