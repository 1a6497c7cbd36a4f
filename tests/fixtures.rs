//! The CPU engine against the golden fixtures made by PyTorch, a port of the official Score-CAM
//! and pytorch-grad-cam 1.5.7 (`tests/fixtures/make_fixtures.py`; outputs committed).

mod common;

use std::sync::Arc;

use common::{
    check_tol as check, corr, fixture_model as model, fixture_rgb as rgb, fixtures as dir, npy,
};
use scorecam_gpu::backend::cpu::{self, CpuBackend};
use scorecam_gpu::backend::Semantics;
use scorecam_gpu::cam::{CamOptions, Explainer, Targets};
use scorecam_gpu::image::{self, ResizeMode};
use serde_json::Value;

#[test]
fn forward_logits_and_activations_match_pytorch() {
    let m = common::manifest().expect("tests/fixtures/manifest.json");
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

#[test]
fn score_cam_maps_match_references_in_both_modes() {
    let m = common::manifest().expect("tests/fixtures/manifest.json");
    let mut report = Vec::new();
    for case in m["cams"].as_array().unwrap() {
        let id = case["id"].as_str().unwrap();
        let model = model(&case["model_file"]);
        let s = model.input_size();
        let img = rgb(&case["image_file"], s);
        for (sem, key) in [
            (Semantics::Official, "official"),
            (Semantics::ChannelSoftmax, "channel_softmax"),
        ] {
            let opts = CamOptions {
                semantics: sem,
                layer: Some(case["layer"].as_str().unwrap().to_string()),
                targets: Targets::Classes(vec![case["class"].as_u64().unwrap() as usize]),
                mask_batch: 7, // several batches and a remainder
                image_batch: 1,
            };
            let mut ex = Explainer::new(CpuBackend::new(), Arc::clone(&model), opts).unwrap();
            let e = ex.explain(std::slice::from_ref(&img)).unwrap().remove(0);
            assert_eq!(
                e.flat_channels as u64,
                case["flat_channels"].as_u64().unwrap(),
                "{id}"
            );
            let cm = &e.maps[0];
            let gold = &case[key];
            let (scores_key, score_tol) = if sem == Semantics::Official {
                ("scores", (1e-5, 1e-4))
            } else {
                ("logits", (1e-4, 1e-4))
            };
            check(
                &cm.channel_scores,
                &npy(&gold[scores_key]),
                score_tol.0,
                score_tol.1,
                &format!("{id} {key} {scores_key}"),
            );
            let want = npy(&gold["map"]);
            let max_diff = cm
                .map
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let r = corr(&cm.map, &want);
            assert!(
                r >= 0.999 && max_diff <= 1e-3,
                "{id} {key}: corr {r:.6}, max |Δ| {max_diff:.2e}"
            );
            if let Some(flat) = gold.get("map_flat") {
                assert_eq!(cm.flat, flat.as_bool().unwrap(), "{id} flat map");
            }
            report.push(format!("{id} {key}: corr {r:.7} max|Δ| {max_diff:.2e}"));
        }
    }
    println!("{}", report.join("\n"));
}

#[test]
fn preprocessing_matches_torchvision() {
    let m = common::manifest().expect("tests/fixtures/manifest.json");
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
