//! Every explanation method on the CPU against its reference on the committed goldens
//! (`tests/fixtures/make_fixtures.py`, manifest "methods"): Grad-CAM and Grad-CAM++ against
//! pytorch-grad-cam 1.5.7 (ReLU, earlier-ReLU, pool and conv targets), SS-CAM and IS-CAM against
//! torchcam 0.5.0 (SS-CAM run there with this engine's counter-based noise), Faster Score-CAM
//! against tf-keras-vis' channel selection in both Score-CAM semantics.

mod common;

use common::{check_method_case, manifest};
use scorecam_gpu::backend::cpu::CpuBackend;
use scorecam_gpu::backend::normal_noise;

#[test]
fn every_method_matches_its_reference() {
    let m = manifest();
    let cases = m["methods"].as_array().expect("manifest methods");
    assert!(cases.len() >= 19);
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for case in cases {
        match check_method_case(CpuBackend::new, &m, case, "cpu_f32") {
            Ok(lines) => report.extend(lines),
            Err(msg) => failures.push(msg),
        }
    }
    println!("{}", report.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_noise_generator_draws_the_fixture_scripts_numbers() {
    let m = manifest();
    for check in m["noise"]["checks"].as_array().unwrap() {
        let seed = check["seed"].as_u64().unwrap();
        let stream = check["stream"].as_u64().unwrap();
        let sigma = check["std"].as_f64().unwrap() as f32;
        for (i, hex) in check["first4_f32_hex"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            let want =
                u32::from_str_radix(hex.as_str().unwrap().trim_start_matches("0x"), 16).unwrap();
            let got = normal_noise(seed, stream, i as u64, sigma);
            assert_eq!(
                got.to_bits(),
                want,
                "seed {seed} stream {stream} element {i}: {got}"
            );
        }
    }
}

/// The FP16 CUDA path's tolerances ("gpu_f16") hold for its CPU twin, FP16 storage emulated
/// (`CpuBackend::emulate_fp16_storage`): what storing activations and weights in FP16 does to each
/// method, measured without a GPU, sits within what the GPU test (cuda_parity's
/// `methods_match_golden`) allows.
#[test]
fn the_fp16_storage_twin_is_within_the_gpu_tolerances() {
    let m = manifest();
    let twin = || {
        let mut c = CpuBackend::new();
        c.emulate_fp16_storage(true);
        c
    };
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for case in m["methods"].as_array().unwrap() {
        match check_method_case(twin, &m, case, "gpu_f16") {
            Ok(lines) => report.extend(lines),
            Err(msg) => failures.push(msg),
        }
    }
    println!("{}", report.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
