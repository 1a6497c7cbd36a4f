//! `scorecam-gpu eval` end to end on the golden fixture model and images (CPU): every metric in
//! every output format, the plot, the pointing game with CSV and Pascal VOC boxes (a box over the
//! whole view holds all the energy: exactly 1), the sanity check, bad options. The metrics' math
//! is tested on hand-built cases in `src/eval/metrics.rs`.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{bin, fixtures, stderr};
use serde_json::Value;

fn eval(args: &[&str], dir: &Path) -> Output {
    Command::new(bin())
        .arg("eval")
        .arg("--weights")
        .arg(fixtures().join("tiny_vgg.safetensors"))
        .args(["--backend", "cpu", "--quiet"])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn images() -> Vec<String> {
    ["img_a.png", "img_b.png", "img_c.png"]
        .iter()
        .map(|n| fixtures().join(n).display().to_string())
        .collect()
}

fn json_of(o: &Output) -> Value {
    assert!(o.status.success(), "{}", stderr(o));
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&o.stdout)))
}

#[test]
fn every_metric_in_every_format_and_the_plot() {
    let d = tempfile::tempdir().unwrap();
    let imgs = images();
    let plot = d.path().join("curves.png");
    let mut args: Vec<&str> = vec!["--format", "json", "--plot", plot.to_str().unwrap()];
    args.extend(imgs.iter().map(String::as_str));
    let j = json_of(&eval(&args, d.path()));
    let methods = j["methods"].as_object().unwrap();
    assert_eq!(
        methods.keys().collect::<Vec<_>>(),
        ["scorecam", "gradcam", "gradcam++"]
    );
    let steps = j["protocol"]["steps"].as_u64().unwrap() as usize;
    assert_eq!(steps, 32, "32×32 pixels, 32 per step");
    for (name, m) in methods {
        assert_eq!(m["images"], 3, "{name}");
        let ad = m["average_drop"].as_f64().unwrap();
        let ic = m["increase_in_confidence"].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&ad), "{name}: {ad}");
        assert!(
            [0.0, 100.0 / 3.0, 200.0 / 3.0, 100.0]
                .iter()
                .any(|v| (ic - v).abs() < 1e-9),
            "{name}: IC {ic} is a multiple of 1/3"
        );
        for k in ["deletion_auc", "insertion_auc"] {
            let v = m[k].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&v), "{name} {k}: {v}");
        }
        for k in ["deletion_curve", "insertion_curve"] {
            let c = m[k].as_array().unwrap();
            assert_eq!(c.len(), steps + 1, "{name} {k}");
        }
        // Deletion starts at the original image, insertion ends at it: the same probability.
        let del0 = m["deletion_curve"][0].as_f64().unwrap();
        let ins_end = m["insertion_curve"][steps].as_f64().unwrap();
        assert!((del0 - ins_end).abs() < 1e-6, "{name}: {del0} vs {ins_end}");
        assert!(m["pointing_game"].is_null());
    }
    let png = image::open(&plot).unwrap();
    assert_eq!(png.width(), 1200);

    // CSV and the table carry the same numbers.
    let mut args: Vec<&str> = vec!["--format", "csv", "--no-plot"];
    args.extend(imgs.iter().map(String::as_str));
    let o = eval(&args, d.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let csv = String::from_utf8(o.stdout).unwrap();
    let mut lines = csv.lines();
    assert!(lines
        .next()
        .unwrap()
        .starts_with("method,images,average_drop"));
    for line in lines {
        let cols: Vec<&str> = line.split(',').collect();
        let m = &methods[cols[0]];
        let ad: f64 = cols[2].parse().unwrap();
        assert!(
            (ad - m["average_drop"].as_f64().unwrap()).abs() < 1e-5,
            "{line}"
        );
    }
    let mut args: Vec<&str> = vec!["--no-plot"];
    args.extend(imgs.iter().map(String::as_str));
    let o = eval(&args, d.path());
    let table = String::from_utf8(o.stdout).unwrap();
    for name in [
        "scorecam",
        "gradcam",
        "gradcam++",
        "average drop",
        "insertion AUC",
    ] {
        assert!(table.contains(name), "{table}");
    }
    // The default plot goes to the current directory.
    assert!(!d.path().join("eval-curves.png").exists());
    let o = eval(&[imgs[0].as_str()], d.path());
    assert!(o.status.success());
    assert!(d.path().join("eval-curves.png").is_file());
}

#[test]
fn pointing_game_from_csv_and_voc_boxes() {
    let d = tempfile::tempdir().unwrap();
    let imgs = images();
    // img_a: the whole view (all the energy, exactly 1); img_b: nothing is boxed (no line).
    let csv = d.path().join("boxes.csv");
    std::fs::write(
        &csv,
        "image,xmin,ymin,xmax,ymax,label\nimg_a.png,0,0,32,32,thing\n",
    )
    .unwrap();
    let o = eval(
        &[
            "--format",
            "json",
            "--no-plot",
            "--methods",
            "gradcam",
            "--boxes",
            csv.to_str().unwrap(),
            &imgs[0],
            &imgs[1],
        ],
        d.path(),
    );
    let j = json_of(&o);
    let m = &j["methods"]["gradcam"];
    assert_eq!(m["pointing_images"], 1);
    assert!(
        (m["pointing_game"].as_f64().unwrap() - 1.0).abs() < 1e-12,
        "{m}"
    );

    // A VOC directory: img_a's annotation boxes its left half (VOC is 1-based, inclusive).
    let voc = d.path().join("voc");
    std::fs::create_dir_all(&voc).unwrap();
    std::fs::write(
        voc.join("img_a.xml"),
        "<annotation><filename>img_a.png</filename><size><width>32</width><height>32</height>\
         <depth>3</depth></size><object><name>thing</name><bndbox><xmin>1</xmin><ymin>1</ymin>\
         <xmax>16</xmax><ymax>32</ymax></bndbox></object></annotation>",
    )
    .unwrap();
    let half = json_of(&eval(
        &[
            "--format",
            "json",
            "--no-plot",
            "--methods",
            "gradcam",
            "--boxes",
            voc.to_str().unwrap(),
            &imgs[0],
        ],
        d.path(),
    ));
    let share = half["methods"]["gradcam"]["pointing_game"]
        .as_f64()
        .unwrap();
    assert!(share > 0.0 && share < 1.0, "{share}");
    // The same share computed from the map itself.
    let out = d.path().join("maps");
    let o = Command::new(bin())
        .args([
            "explain",
            "--backend",
            "cpu",
            "--method",
            "gradcam",
            "--save",
            "npy",
            "--quiet",
        ])
        .arg("--weights")
        .arg(fixtures().join("tiny_vgg.safetensors"))
        .arg("--out")
        .arg(&out)
        .arg(&imgs[0])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let (map, _) = scorecam_gpu::image::read_npy(&out.join("img_a.png.npy")).unwrap();
    let total: f64 = map.iter().map(|&v| f64::from(v)).sum();
    let left: f64 = (0..32)
        .flat_map(|y| (0..16).map(move |x| y * 32 + x))
        .map(|p| f64::from(map[p]))
        .sum();
    assert!(
        (share - left / total).abs() < 1e-6,
        "{share} vs {}",
        left / total
    );

    // A malformed boxes file is a usage error naming it; nothing is evaluated.
    let bad = d.path().join("bad.csv");
    std::fs::write(&bad, "image,xmin,ymin\nimg_a.png,0,0\n").unwrap();
    let o = eval(&["--boxes", bad.to_str().unwrap(), &imgs[0]], d.path());
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("bad.csv"), "{}", stderr(&o));
}

#[test]
fn sanity_check_reports_every_layer_from_the_top() {
    let d = tempfile::tempdir().unwrap();
    let imgs = images();
    let j = json_of(&eval(
        &[
            "--format",
            "json",
            "--no-plot",
            "--methods",
            "scorecam,gradcam",
            "--sanity",
            &imgs[0],
            &imgs[1],
        ],
        d.path(),
    ));
    let s = &j["sanity"];
    let layers: Vec<&str> = s["layers_randomized"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        layers,
        [
            "classifier.6",
            "classifier.3",
            "classifier.0",
            "features.8",
            "features.6",
            "features.3",
            "features.0"
        ]
    );
    for name in ["scorecam", "gradcam"] {
        let rho: Vec<f64> = s["spearman"][name]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(rho.len(), layers.len());
        assert!(
            rho.iter().all(|r| (-1.0..=1.0).contains(r)),
            "{name}: {rho:?}"
        );
        // With every layer random the maps no longer follow the trained model's.
        assert!(rho.last().unwrap().abs() < 0.9, "{name}: {rho:?}");
    }
}

#[test]
fn bad_options_and_images() {
    let d = tempfile::tempdir().unwrap();
    let imgs = images();
    for bad in [
        &["--methods", "gradcam+"][..],
        &["--step", "0"],
        &["--class", "10"],
        &["--methods", "faster-scorecam", "--max-channels", "99"],
        &["--plot", "/nonexistent/dir/x.png"],
    ] {
        let mut args = bad.to_vec();
        args.push(&imgs[0]);
        let o = eval(&args, d.path());
        assert_eq!(o.status.code(), Some(2), "{bad:?}: {}", stderr(&o));
    }
    // A missing image fails alone: the others are evaluated, exit 1.
    let missing = d.path().join("missing.png");
    let o = eval(
        &[
            "--format",
            "json",
            "--no-plot",
            &imgs[0],
            missing.to_str().unwrap(),
        ],
        d.path(),
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let j: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["methods"]["scorecam"]["images"], 1);
    let failed = j["failed"].as_array().unwrap();
    assert_eq!(failed.len(), 1);
    assert!(failed[0]["image"]
        .as_str()
        .unwrap()
        .ends_with("missing.png"));
}
