//! The binary end to end on a tiny model: outputs, results.jsonl, exit codes, and every rejected
//! input leaving no output file behind.

mod common;

use std::process::Command;

use common::{bin, files, results, stderr, Fixture};

fn explain_writes_maps_pngs_and_results() {
    let f = Fixture::new();
    let a = f.image("a.png", 1);
    let b = f.image("b.png", 90);
    let out = f.path("out");
    for mode in ["official", "channel-softmax"] {
        let o = f.explain(
            &out.join(mode),
            &[
                "--mode",
                mode,
                "--mask-batch",
                "5",
                a.to_str().unwrap(),
                b.to_str().unwrap(),
            ],
        );
        assert!(o.status.success(), "{mode}: {}", stderr(&o));
        let dir = out.join(mode);
        assert_eq!(
            files(&dir),
            [
                "a.png.heatmap.png",
                "a.png.npy",
                "a.png.overlay.png",
                "b.png.heatmap.png",
                "b.png.npy",
                "b.png.overlay.png",
                "results.jsonl"
            ]
        );
        assert!(common::temp_leftovers(&dir).is_empty());
        let mut lines = results(&dir);
        lines.sort_by_key(|l| l["rel"].as_str().unwrap().to_owned());
        assert_eq!(lines.len(), 2);
        for (line, img) in lines.iter().zip([&a, &b]) {
            assert_eq!(line["image"], img.to_str().unwrap());
            let name = img.file_name().unwrap().to_str().unwrap();
            assert_eq!(line["rel"], name);
            assert_eq!(line["map"], format!("{name}.npy"));
            assert_eq!(line["heatmap"], format!("{name}.heatmap.png"));
            assert_eq!(line["overlay"], format!("{name}.overlay.png"));
            assert_eq!(line["rank"], 1);
            assert_eq!(line["layer"], "features.7");
            assert_eq!(line["device"], "cpu:0");
            assert!(line["run"].as_str().is_some_and(|r| !r.is_empty()));
            assert!(line.get("shard").is_none());
            assert_eq!(line["mode"], mode);
            let class = line["class"].as_u64().unwrap();
            assert!(class < 10);
            let score = line["score"].as_f64().unwrap();
            assert!(score > 0.0 && score <= 1.0);
            assert!(line["ms"].as_f64().unwrap() >= 0.0);
            let flat = line["flat_channels"].as_u64().unwrap();
            assert!(flat <= 24);
            let passes = line["masked_passes"].as_u64().unwrap();
            // Official mode skips flat channels; channel-softmax forwards one zero input per run
            // for all of them (their masked inputs are all zeros): either way they are saved.
            assert_eq!(passes, 24 - flat, "{mode}");
            assert_eq!(
                line["masked_passes_saved"].as_u64().unwrap(),
                flat,
                "{mode}"
            );
            assert_eq!(line["method"], "scorecam");
            let (map, shape) =
                scorecam_gpu::image::read_npy(&dir.join(line["map"].as_str().unwrap())).unwrap();
            assert_eq!(shape, [32, 32]);
            assert!(map.iter().all(|v| (0.0..=1.0).contains(v)));
            // Official maps are min-max normalized (max exactly 1); pytorch-grad-cam divides by
            // max + 1e-7, so its maximum is just below 1.
            let max = map.iter().copied().fold(0f32, f32::max);
            assert!(max > 0.999, "normalized map reaches 1, got max {max}");
        }
        let png = image::open(dir.join("a.png.overlay.png")).unwrap();
        assert_eq!((png.width(), png.height()), (32, 32));
    }
}

fn one_bad_image_fails_alone_with_exit_1() {
    let f = Fixture::new();
    let good = f.image("good.png", 3);
    let empty = f.path("empty.png");
    std::fs::write(&empty, b"").unwrap();
    let text = f.path("notes.jpg");
    std::fs::write(&text, b"this is not an image").unwrap();
    let cut = f.path("cut.png");
    let whole = std::fs::read(f.image("whole.png", 9)).unwrap();
    std::fs::write(&cut, &whole[..whole.len() / 2]).unwrap();
    let huge = f.path("huge.png");
    std::fs::write(&huge, common::png_claiming(20000, 20000, 8, 2)).unwrap();
    std::fs::remove_file(f.path("whole.png")).unwrap();
    let out = f.path("out");
    let bad = [&empty, &text, &cut, &huge];
    let o = f.explain(
        &out,
        &[
            empty.to_str().unwrap(),
            good.to_str().unwrap(),
            text.to_str().unwrap(),
            cut.to_str().unwrap(),
            huge.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    for p in bad {
        assert!(
            err.contains(p.to_str().unwrap()),
            "{p:?} not named in: {err}"
        );
    }
    assert!(!err.contains("panicked"), "{err}");
    let lines = results(&out);
    assert_eq!(lines.len(), 5);
    let errors: Vec<_> = lines.iter().filter(|l| l.get("error").is_some()).collect();
    assert_eq!(errors.len(), 4);
    assert!(errors
        .iter()
        .all(|l| !l["error"].as_str().unwrap().is_empty()));
    // Only the good image's outputs exist: no partial or temporary files.
    assert_eq!(
        files(&out),
        [
            "good.png.heatmap.png",
            "good.png.npy",
            "good.png.overlay.png",
            "results.jsonl"
        ]
    );
    assert!(common::temp_leftovers(&out).is_empty());
}

fn same_stem_twice_does_not_overwrite_and_classes_share_passes() {
    let f = Fixture::new();
    std::fs::create_dir_all(f.path("x")).unwrap();
    std::fs::create_dir_all(f.path("y")).unwrap();
    let a = f.image("x/cat.png", 1);
    let b = f.image("y/cat.png", 2);
    let out = f.path("out");
    let o = f.explain(
        &out,
        &[
            "--no-png",
            "--class",
            "2,7",
            a.to_str().unwrap(),
            b.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // The output tree mirrors the inputs below their common directory.
    assert_eq!(
        files(&out),
        [
            "results.jsonl",
            "x/cat.png.class2.npy",
            "x/cat.png.class7.npy",
            "y/cat.png.class2.npy",
            "y/cat.png.class7.npy",
        ]
    );
    let lines = results(&out);
    for rel in ["x/cat.png", "y/cat.png"] {
        let classes: Vec<u64> = lines
            .iter()
            .filter(|l| l["rel"] == rel)
            .map(|l| l["class"].as_u64().unwrap())
            .collect();
        assert_eq!(classes, [2, 7], "{rel}: one line per class, in order");
    }
}

fn usage_and_weights_errors_exit_2_without_output_files() {
    let f = Fixture::new();
    let img = f.image("a.png", 1);
    let img = img.to_str().unwrap();

    // Class out of range, unknown layer.
    let out = f.path("o1");
    let o = f.explain(&out, &["--class", "10", img]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--class 10"), "{}", stderr(&o));
    let o = f.explain(&out, &["--layer", "features.99", img]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("features.99"), "{}", stderr(&o));
    // Nothing is created before options, weights and backend are checked.
    assert!(!out.exists());

    // Truncated weights.
    let bytes = std::fs::read(&f.weights).unwrap();
    let cut = f.path("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let out = f.path("o2");
    let o = Command::new(bin())
        .args(["explain", "--backend", "cpu", "--weights"])
        .arg(&cut)
        .arg("--out")
        .arg(&out)
        .arg(img)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("cut.safetensors"), "{}", stderr(&o));
    assert!(!out.exists());

    // Missing weights file.
    let o = Command::new(bin())
        .args([
            "explain",
            "--backend",
            "cpu",
            "--weights",
            "/nonexistent/w.safetensors",
            img,
        ])
        .current_dir(f.dir.path())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("/nonexistent/w.safetensors"),
        "{}",
        stderr(&o)
    );
}

fn unwritable_output_directory_is_a_clear_error() {
    let f = Fixture::new();
    let img = f.image("a.png", 1);
    let blocker = f.path("file");
    std::fs::write(&blocker, b"x").unwrap();
    let out = blocker.join("out");
    let o = f.explain(&out, &[img.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains(out.to_str().unwrap()), "{}", stderr(&o));
    assert_eq!(
        files(f.dir.path())
            .iter()
            .filter(|n| n.starts_with('.'))
            .count(),
        0
    );
}

/// `--precision fp8` on the CPU (chosen, or fallen back to) is a usage error before anything is
/// written; `bench` refuses it the same way.
fn fp8_without_a_capable_gpu_exits_2() {
    let f = Fixture::new();
    let img = f.image("a.png", 1);
    let out = f.path("out");
    for backend in ["cpu", "auto"] {
        let o = Command::new(bin())
            .args([
                "explain",
                "--precision",
                "fp8",
                "--backend",
                backend,
                "--weights",
            ])
            .arg(&f.weights)
            .arg("--out")
            .arg(&out)
            .arg(&img)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{backend}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("--precision fp8 needs a CUDA GPU"),
            "{backend}: {}",
            stderr(&o)
        );
        assert!(!out.exists(), "{backend}: an output directory was made");
    }
    let o = Command::new(bin())
        .args([
            "bench",
            "--precision",
            "fp8",
            "--backend",
            "cpu",
            "--weights",
        ])
        .arg(&f.weights)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
}

fn cuda_backend_without_gpu_exits_2() {
    let f = Fixture::new();
    let img = f.image("a.png", 1);
    let out = f.path("out");
    let o = Command::new(bin())
        .args(["explain", "--backend", "cuda", "--weights"])
        .arg(&f.weights)
        .arg("--out")
        .arg(&out)
        .arg(&img)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("CUDA"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    // auto falls back to the CPU with a notice.
    let o = Command::new(bin())
        .args(["explain", "--backend", "auto", "--weights"])
        .arg(&f.weights)
        .arg("--out")
        .arg(&out)
        .arg(&img)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("notice: no usable GPU"),
        "{}",
        stderr(&o)
    );
}

fn offline_without_weights_explains_how_to_get_them() {
    let f = Fixture::new();
    let img = f.image("a.png", 1);
    let o = Command::new(bin())
        .args(["explain", "--backend", "cpu"])
        .arg(&img)
        .current_dir(f.dir.path())
        .env_remove("SCORECAM_WEIGHTS")
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", f.path("hf"))
        .env_remove("HF_HUB_CACHE")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("--weights") && err.contains("--random-weights"),
        "{err}"
    );
}

fn inspect_lists_layers() {
    let f = Fixture::new();
    let o = Command::new(bin())
        .arg("inspect")
        .arg("--weights")
        .arg(&f.weights)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    for want in [
        "features.0",
        "features.2",
        "MaxPool2d",
        "classifier.3",
        "input size: 32×32",
        "parameters:",
        "F32",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    let o = Command::new(bin())
        .args(["inspect", "--random-weights", "1"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("parameters: 138357544"), "{text}");
    assert!(text.contains("classes: 1000 (1000 labels)"), "{text}");
    // A _bn file says its BatchNorm layers are folded, and where they were.
    let o = Command::new(bin())
        .arg("inspect")
        .arg("--weights")
        .arg(common::fixtures().join("tiny_vgg_bn.safetensors"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("batch norm: folded"), "{text}");
    assert!(
        text.contains("BatchNorm2d (features.1, folded) + ReLU (features.2)"),
        "{text}"
    );
}

fn main() -> std::process::ExitCode {
    #[allow(unused_imports)]
    use common::Need::*;
    let t = common::trial;
    common::run_tests(vec![
        t(
            "explain_writes_maps_pngs_and_results",
            &[],
            explain_writes_maps_pngs_and_results,
        ),
        t(
            "one_bad_image_fails_alone_with_exit_1",
            &[],
            one_bad_image_fails_alone_with_exit_1,
        ),
        t(
            "same_stem_twice_does_not_overwrite_and_classes_share_passes",
            &[],
            same_stem_twice_does_not_overwrite_and_classes_share_passes,
        ),
        t(
            "usage_and_weights_errors_exit_2_without_output_files",
            &[],
            usage_and_weights_errors_exit_2_without_output_files,
        ),
        t(
            "unwritable_output_directory_is_a_clear_error",
            &[],
            unwritable_output_directory_is_a_clear_error,
        ),
        t(
            "cuda_backend_without_gpu_exits_2",
            &[NoGpu],
            cuda_backend_without_gpu_exits_2,
        ),
        t(
            "fp8_without_a_capable_gpu_exits_2",
            &[NoGpu],
            fp8_without_a_capable_gpu_exits_2,
        ),
        t(
            "offline_without_weights_explains_how_to_get_them",
            &[],
            offline_without_weights_explains_how_to_get_them,
        ),
        t("inspect_lists_layers", &[], inspect_lists_layers),
    ])
}
