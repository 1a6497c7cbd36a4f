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

/// Conv 3×3, pad 1, plus bias, by direct summation in f64 (the reference for the CPU conv and
/// the FP8 twin). `x` `[n, cin, h, w]`.
#[allow(clippy::too_many_arguments)]
pub fn naive_conv3x3(
    x: &[f32],
    n: usize,
    cin: usize,
    h: usize,
    w: usize,
    weight: &[f32],
    bias: &[f32],
    cout: usize,
) -> Vec<f32> {
    let mut y = vec![0f32; n * cout * h * w];
    for b in 0..n {
        for o in 0..cout {
            for i in 0..h {
                for j in 0..w {
                    let mut acc = bias[o] as f64;
                    for c in 0..cin {
                        for r in 0..3 {
                            for q in 0..3 {
                                let (yy, xx) = (i + r, j + q);
                                if yy < 1 || xx < 1 || yy > h || xx > w {
                                    continue;
                                }
                                let v = x[((b * cin + c) * h + yy - 1) * w + xx - 1] as f64;
                                acc += v * weight[((o * cin + c) * 3 + r) * 3 + q] as f64;
                            }
                        }
                    }
                    y[((b * cout + o) * h + i) * w + j] = acc as f32;
                }
            }
        }
    }
    y
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

/// The golden fixtures' manifest. The fixtures are committed: a missing one is a failure.
pub fn manifest() -> Value {
    let path = fixtures().join("manifest.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (the fixtures are committed)", path.display()));
    serde_json::from_str(&text).expect("manifest.json parses")
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

// ---------------------------------------------------------------------------------------------
// The binary on a tiny model (CLI and batch-job tests)
// ---------------------------------------------------------------------------------------------

/// The binary under test: cargo's build, or `$SCORECAM_BIN` where the tests run from a bundle
/// on another machine (target/gpu-bundle on a GPU host).
pub fn bin() -> PathBuf {
    std::env::var_os("SCORECAM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_scorecam-gpu")))
}

/// A temporary directory with a tiny random VGG (3 convs, 24 channels at the default layer,
/// 10 classes, 32×32 input) saved as safetensors.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub weights: PathBuf,
}

impl Fixture {
    pub fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let model = Vgg::random_from_config(&[8, 0, 16, 0, 24, 0], &[16, 10], 5, 32);
        let weights = dir.path().join("tiny.safetensors");
        scorecam_gpu::weights::save(&model, &weights, "F32").unwrap();
        Fixture { dir, weights }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A 48×40 RGB PNG with some structure, at `name` (parent directories created).
    pub fn image(&self, name: &str, seed: u8) -> PathBuf {
        let p = self.path(name);
        write_png_image(&p, seed);
        p
    }

    /// `explain` on the CPU with the tiny model into `out`, plus `extra` arguments.
    pub fn explain_cmd(&self, out: &Path, extra: &[&str]) -> std::process::Command {
        let mut cmd = std::process::Command::new(bin());
        cmd.arg("explain")
            .arg("--weights")
            .arg(&self.weights)
            .args(["--backend", "cpu", "--out"])
            .arg(out)
            .args(extra)
            .env_remove("SLURM_ARRAY_TASK_ID")
            .env_remove("JOB_COMPLETION_INDEX");
        cmd
    }

    pub fn explain(&self, out: &Path, extra: &[&str]) -> std::process::Output {
        self.explain_cmd(out, extra).output().unwrap()
    }
}

/// A 48×40 RGB PNG with some structure.
pub fn write_png_image(p: &Path, seed: u8) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    let img = ::image::RgbImage::from_fn(48, 40, |x, y| {
        ::image::Rgb([
            (x * 5) as u8 ^ seed,
            (y * 6) as u8,
            if (x / 8 + y / 8) % 2 == 0 { 200 } else { seed },
        ])
    });
    img.save_with_format(p, ::image::ImageFormat::Png).unwrap();
}

/// A JPEG of `w`×`h` with smooth content, as bytes.
pub fn jpeg_bytes(w: u32, h: u32, quality: u8) -> Vec<u8> {
    let img = ::image::RgbImage::from_fn(w, h, |x, y| {
        ::image::Rgb([
            (x % 256) as u8,
            (y % 256) as u8,
            ((x / 3 + y / 5) % 256) as u8,
        ])
    });
    let mut out = Vec::new();
    ::image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality)
        .encode_image(&img)
        .unwrap();
    out
}

pub fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The lines of `out/results.jsonl` (each must parse).
pub fn results(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("results.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
        .collect()
}

/// Every file below `dir` (relative, sorted), the tool's `.scorecam` state directory aside.
pub fn files(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.file_name().is_some_and(|n| n == ".scorecam") {
                continue;
            }
            if e.file_type().unwrap().is_dir() {
                walk(base, &p, out);
            } else {
                out.push(p.strip_prefix(base).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    let mut v = Vec::new();
    walk(dir, dir, &mut v);
    v.sort();
    v
}

/// Files left in the tool's temporary directories (each a run's; a finished run leaves none).
pub fn temp_leftovers(out: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir(out.join(".scorecam/tmp")) {
        for e in rd.flatten() {
            v.push(e.path());
        }
    }
    v
}

// ---------------------------------------------------------------------------------------------
// Tests that need something this machine may lack
// ---------------------------------------------------------------------------------------------

/// `1`, `true`, `yes`, `on` (any case) — what a `SCORECAM_REQUIRE_*` variable accepts as "yes".
pub fn truthy(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    })
}

/// What a test needs beyond the CPU. Checked when the test runs: unmet, the test is reported as
/// *ignored* with the reason (and counted so in cargo's summary, never as passed), unless the
/// need's `SCORECAM_REQUIRE_*` variable is truthy, which makes it a failure.
#[derive(Clone, Copy, Debug)]
pub enum Need {
    /// A usable CUDA device (`SCORECAM_REQUIRE_GPU`).
    Gpu,
    /// No usable CUDA device (tests of the no-GPU path); never required.
    NoGpu,
    /// A loadable NVRTC (`SCORECAM_REQUIRE_NVRTC`).
    Nvrtc,
    /// A Slurm cluster that answers `sinfo` (`SCORECAM_SLURM`, set by `.ci/slurm.sh up`).
    Slurm,
    /// Root where mounting a tmpfs is allowed (`SCORECAM_REQUIRE_ROOT`).
    Root,
    /// The Rust toolchain named by Cargo.toml's `rust-version`, installed with rustup
    /// (`SCORECAM_REQUIRE_MSRV`; `.ci/run` installs it).
    MsrvToolchain,
    /// Leave to run a long CPU measurement: `SCORECAM_SLOW` set to a truthy value.
    Slow,
    /// Python 3 (`SCORECAM_REQUIRE_PYTHON`), for the GPU run's report script (standard library
    /// only).
    Python,
    /// A C++20 compiler, to run the kernels on the CPU (`SCORECAM_REQUIRE_CXX`; tests/kernel_host).
    /// `SCORECAM_KERNEL_HOST=off` skips those runs (a GPU host, where CI's CPU checks would only
    /// spend device time).
    Cxx,
}

impl Need {
    fn require_var(self) -> Option<&'static str> {
        match self {
            Need::Gpu => Some("SCORECAM_REQUIRE_GPU"),
            Need::NoGpu => None,
            Need::Nvrtc => Some("SCORECAM_REQUIRE_NVRTC"),
            Need::Slurm => Some("SCORECAM_SLURM"),
            Need::Root => Some("SCORECAM_REQUIRE_ROOT"),
            Need::MsrvToolchain => Some("SCORECAM_REQUIRE_MSRV"),
            Need::Slow => None,
            Need::Cxx => Some("SCORECAM_REQUIRE_CXX"),
            Need::Python => Some("SCORECAM_REQUIRE_PYTHON"),
        }
    }

    /// `Err(why)` when the need is not met here.
    pub fn check(self) -> Result<(), String> {
        use scorecam_gpu::backend::cuda::CudaBackend;
        match self {
            Need::Gpu => CudaBackend::probe()
                .map(|_| ())
                .map_err(|e| format!("needs a CUDA GPU: {e}")),
            Need::NoGpu => match CudaBackend::probe() {
                Ok(d) => Err(format!("needs a machine without a usable GPU ({d} found)")),
                Err(_) => Ok(()),
            },
            Need::Nvrtc => {
                if scorecam_gpu::backend::cuda::kernels::nvrtc_available() {
                    Ok(())
                } else {
                    Err("needs NVRTC (libnvrtc.so) on the loader path: \
                         `eval \"$(bash .ci/install-nvrtc.sh)\"` provides it"
                        .into())
                }
            }
            Need::Slurm => {
                let up = std::process::Command::new("sinfo")
                    .args(["-h", "-o", "%t"])
                    .output()
                    .is_ok_and(|o| o.status.success() && !o.stdout.is_empty());
                if up {
                    Ok(())
                } else {
                    Err("needs a Slurm cluster (`bash .ci/slurm.sh up` starts one)".into())
                }
            }
            Need::MsrvToolchain => {
                let v = declared_rust_version();
                let ok = std::process::Command::new("rustup")
                    .args(["run", &v, "cargo", "--version"])
                    .output()
                    .is_ok_and(|o| o.status.success());
                if ok {
                    Ok(())
                } else {
                    Err(format!(
                        "needs the Rust {v} toolchain (`rustup toolchain install {v} --profile minimal`)"
                    ))
                }
            }
            Need::Slow => {
                if truthy("SCORECAM_SLOW") {
                    Ok(())
                } else {
                    Err("a long CPU measurement: set SCORECAM_SLOW=1 to run it".into())
                }
            }
            Need::Cxx if std::env::var("SCORECAM_KERNEL_HOST").is_ok_and(|v| v == "off") => {
                Err("the CPU runs of the kernels are off (SCORECAM_KERNEL_HOST=off)".into())
            }
            Need::Cxx => cxx_compiler().map(|_| ()).ok_or_else(|| {
                "needs a C++ compiler (c++, g++ or clang++ on the PATH, or $CXX)".into()
            }),
            Need::Python => std::process::Command::new("python3")
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
                .then_some(())
                .ok_or_else(|| "needs python3 on the PATH".into()),
            Need::Root => {
                // SAFETY: geteuid has no preconditions.
                if unsafe { libc::geteuid() } != 0 {
                    return Err("needs root (to mount a tmpfs)".into());
                }
                // Root is not always allowed to mount (containers): try it.
                let d = tempfile::tempdir().map_err(|e| e.to_string())?;
                let mounted = std::process::Command::new("mount")
                    .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
                    .arg(d.path())
                    .stderr(std::process::Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if mounted {
                    let _ = std::process::Command::new("umount").arg(d.path()).status();
                    Ok(())
                } else {
                    Err("needs to mount a tmpfs (root, where mounting is allowed)".into())
                }
            }
        }
    }
}

/// The C++ compiler: `$CXX`, else the first of `c++`, `g++`, `clang++` that answers
/// `--version`.
pub fn cxx_compiler() -> Option<String> {
    let candidates = std::env::var("CXX")
        .ok()
        .into_iter()
        .chain(["c++", "g++", "clang++"].map(String::from));
    candidates.into_iter().find(|c| {
        std::process::Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// A test for [`run_tests`]: runs `f` when `needs` are met (see [`Need`]).
pub fn trial(name: &str, needs: &[Need], f: fn()) -> libtest_mimic::Trial {
    let needs = needs.to_vec();
    libtest_mimic::Trial::ignorable_test(name, move || {
        for need in needs {
            if let Err(why) = need.check() {
                return match need.require_var() {
                    Some(var) if truthy(var) => Err(format!("{var} is set but: {why}").into()),
                    _ => Ok(libtest_mimic::Completion::ignored_with(why)),
                };
            }
        }
        f();
        Ok(libtest_mimic::Completion::Completed)
    })
}

/// The `main` of a test file whose tests have run-time needs (`harness = false` in Cargo.toml).
pub fn run_tests(trials: Vec<libtest_mimic::Trial>) -> std::process::ExitCode {
    libtest_mimic::run(&libtest_mimic::Arguments::from_args(), trials).exit_code()
}

// ---------------------------------------------------------------------------------------------
// Score-CAM against the goldens: one check for every backend
// ---------------------------------------------------------------------------------------------

/// How close a backend must come to the goldens: one of the manifest's tolerance sets
/// (`cpu_f32` for the f32 CPU backend, `gpu_f16` for the FP16 CUDA backend).
#[derive(Clone, Copy, Debug)]
pub struct CamTolerances {
    /// (atol, rtol) of the official per-channel scores s_k.
    pub official_scores: (f32, f32),
    /// (atol, rtol) of the channel-softmax per-channel logits z_k.
    pub cs_logits: (f32, f32),
    /// Largest |Δ| allowed anywhere in an official / channel-softmax map.
    pub official_map: f32,
    pub cs_map: f32,
    /// Smallest map correlation allowed.
    pub min_corr: f64,
}

impl CamTolerances {
    pub fn from_manifest(m: &Value, set: &str) -> CamTolerances {
        let t = &m["tolerances"][set];
        let pair = |k: &str| {
            (
                t[k]["atol"]
                    .as_f64()
                    .unwrap_or_else(|| panic!("{set}.{k}.atol")) as f32,
                t[k]["rtol"]
                    .as_f64()
                    .unwrap_or_else(|| panic!("{set}.{k}.rtol")) as f32,
            )
        };
        CamTolerances {
            official_scores: pair("official_scores"),
            cs_logits: pair("cs_logits"),
            official_map: pair("official_map").0,
            cs_map: pair("cs_map").0,
            min_corr: 0.999,
        }
    }
}

/// Check the first map of `e` against the golden `case` in mode `key` (`official` or
/// `channel_softmax`): flat channels, every per-channel score (the channel weights before
/// normalization), the map element by element and its correlation, the flat-map flag.
/// Returns a one-line report, or what was wrong.
pub fn check_cam(
    case: &Value,
    key: &str,
    e: &scorecam_gpu::cam::Explanation,
    tol: &CamTolerances,
) -> Result<String, String> {
    let id = case["id"].as_str().unwrap_or("?");
    if let Some(f) = case["flat_channels"].as_u64() {
        if e.flat_channels as u64 != f {
            return Err(format!(
                "{id}: {} flat channels, golden {f}",
                e.flat_channels
            ));
        }
    }
    let gold = &case[key];
    let cm = &e.maps[0];
    let (scores_key, (atol, rtol), map_atol) = if key == "official" {
        ("scores", tol.official_scores, tol.official_map)
    } else {
        ("logits", tol.cs_logits, tol.cs_map)
    };
    let want = npy(&gold[scores_key]);
    if want.len() != cm.channel_scores.len() {
        return Err(format!(
            "{id} {key}: {} channel scores, golden {}",
            cm.channel_scores.len(),
            want.len()
        ));
    }
    let mut worst_score = 0f32;
    for (k, (g, w)) in cm.channel_scores.iter().zip(&want).enumerate() {
        let d = (g - w).abs();
        if d.is_nan() || d > atol + rtol * w.abs() {
            return Err(format!(
                "{id} {key}: channel {k} {scores_key} {g}, golden {w} (|Δ| {d:.3e})"
            ));
        }
        worst_score = worst_score.max(d);
    }
    let want = npy(&gold["map"]);
    let max_diff = cm
        .map
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(
            0f32,
            |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
        );
    let r = corr(&cm.map, &want);
    if max_diff.is_nan() || max_diff > map_atol {
        return Err(format!(
            "{id} {key}: map max |Δ| {max_diff:.3e} > {map_atol} (corr {r:.6})"
        ));
    }
    if r.is_nan() || r < tol.min_corr {
        return Err(format!(
            "{id} {key}: map correlation {r:.6} < {}",
            tol.min_corr
        ));
    }
    if let Some(flat) = gold.get("map_flat").and_then(Value::as_bool) {
        if cm.flat != flat {
            return Err(format!("{id} {key}: flat map {} (golden {flat})", cm.flat));
        }
    }
    Ok(format!(
        "{id} {key}: {scores_key} max|Δ| {worst_score:.2e}, map max|Δ| {max_diff:.2e}, corr {r:.7}"
    ))
}

/// The golden cases by id.
pub fn cases_by_id(m: &Value) -> std::collections::HashMap<String, Value> {
    m["cams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["id"].as_str().unwrap().to_owned(), c.clone()))
        .collect()
}

/// `e` with only its map `j` (to check one target of a multi-target explanation).
fn only_map(e: &scorecam_gpu::cam::Explanation, j: usize) -> scorecam_gpu::cam::Explanation {
    let mut one = e.clone();
    one.maps = vec![e.maps[j].clone()];
    one
}

/// The manifest's `multi_class` and `batch` entries on a backend (`make` opens a fresh one):
/// several classes explained from one set of masked passes, and three images explained as one
/// group, must each equal their single-run goldens, in both modes. Returns report lines.
pub fn check_multi_and_batch<B: scorecam_gpu::backend::Backend>(
    make: impl Fn() -> B,
    tol: &CamTolerances,
) -> Vec<String> {
    use scorecam_gpu::backend::Semantics;
    use scorecam_gpu::cam::{CamOptions, Explainer, Targets};
    let m = manifest();
    let cases = cases_by_id(&m);
    let mut report = Vec::new();
    let modes = [
        (Semantics::Official, "official"),
        (Semantics::ChannelSoftmax, "channel_softmax"),
    ];
    for entry in m["multi_class"].as_array().expect("manifest multi_class") {
        let model = fixture_model(&entry["model_file"]);
        let img = fixture_rgb(&entry["image_file"], model.input_size());
        let classes: Vec<usize> = entry["classes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_u64().unwrap() as usize)
            .collect();
        assert!(classes.len() >= 2);
        for (sem, key) in modes {
            let opts = CamOptions {
                method: scorecam_gpu::cam::Method::ScoreCam,
                semantics: sem,
                layer: entry["layer"].as_str().map(str::to_owned),
                targets: Targets::Classes(classes.clone()),
                mask_batch: 7,
                image_batch: 1,
                precision: Default::default(),
            };
            let mut ex = Explainer::new(make(), Arc::clone(&model), opts).unwrap();
            let e = ex.explain(std::slice::from_ref(&img)).unwrap().remove(0);
            assert_eq!(e.maps.len(), classes.len());
            for (j, id) in entry["cases"].as_array().unwrap().iter().enumerate() {
                let case = &cases[id.as_str().unwrap()];
                assert_eq!(e.maps[j].class as u64, case["class"].as_u64().unwrap());
                let line = check_cam(case, key, &only_map(&e, j), tol)
                    .unwrap_or_else(|msg| panic!("two classes at once: {msg}"));
                report.push(format!("multi-class {line}"));
            }
        }
    }
    for entry in m["batch"].as_array().expect("manifest batch") {
        let model = fixture_model(&entry["model_file"]);
        let s = model.input_size();
        let images: Vec<Vec<u8>> = entry["image_files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| fixture_rgb(f, s))
            .collect();
        let classes: Vec<usize> = entry["classes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_u64().unwrap() as usize)
            .collect();
        for (sem, key) in modes {
            let opts = CamOptions {
                method: scorecam_gpu::cam::Method::ScoreCam,
                semantics: sem,
                layer: entry["layer"].as_str().map(str::to_owned),
                targets: Targets::Top(1),
                mask_batch: 7, // batches mixing the three images' masks
                image_batch: images.len(),
                precision: Default::default(),
            };
            let mut ex = Explainer::new(make(), Arc::clone(&model), opts).unwrap();
            let targets: Vec<Targets> =
                classes.iter().map(|&c| Targets::Classes(vec![c])).collect();
            let got = ex.explain_for(&images, &targets).unwrap();
            for (i, e) in got.iter().enumerate() {
                let case = &cases[entry["cases"][i].as_str().unwrap()];
                let line = check_cam(case, key, e, tol)
                    .unwrap_or_else(|msg| panic!("batch of {}: {msg}", images.len()));
                report.push(format!("batch {line}"));
                if key == "channel_softmax" {
                    // pytorch-grad-cam's own batched run.
                    let want = npy(&entry["channel_softmax_maps"][i]);
                    let d = check_tol(&e.maps[0].map, &want, tol.cs_map, 0.0, "batch map");
                    report.push(format!(
                        "batch image {i}: vs pytorch-grad-cam batch max|Δ| {d:.2e}"
                    ));
                }
            }
        }
    }
    report
}

/// Cargo.toml's `rust-version`.
pub fn declared_rust_version() -> String {
    let toml =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")).unwrap();
    toml.lines()
        .find_map(|l| l.strip_prefix("rust-version = \""))
        .and_then(|r| r.strip_suffix('"'))
        .expect("Cargo.toml declares rust-version")
        .to_owned()
}

// ---------------------------------------------------------------------------------------------
// The other methods against their references (manifest "methods")
// ---------------------------------------------------------------------------------------------

/// The method a golden "methods" case was made with, and the mode for Score-CAM variants.
pub fn method_of(case: &Value) -> scorecam_gpu::cam::Method {
    use scorecam_gpu::cam::Method;
    let p = &case["params"];
    let int = |k: &str| p[k].as_u64().unwrap_or_else(|| panic!("params.{k}")) as usize;
    match case["method"].as_str().unwrap() {
        "gradcam" => Method::GradCam,
        "gradcam++" => Method::GradCamPlusPlus,
        "sscam" => Method::SsCam {
            samples: int("num_samples"),
            sigma: p["std"].as_f64().unwrap() as f32,
            seed: p["seed"].as_u64().unwrap(),
        },
        "iscam" => Method::IsCam {
            steps: int("num_samples"),
        },
        "faster-scorecam" => Method::FasterScoreCam {
            max_channels: int("max_n"),
        },
        other => panic!("unknown method {other}"),
    }
}

/// Run one "methods" case on a backend (`make` opens one) and check it against its goldens with
/// the tolerance set `set` (`cpu_f32` or `gpu_f16`): the channel weights (Grad-CAM's, SS/IS-CAM's
/// mean logit differences and softmax weights, Faster Score-CAM's per-channel scores in both
/// modes) and the map. Returns report lines, or what was wrong.
pub fn check_method_case<B: scorecam_gpu::backend::Backend>(
    make: impl Fn() -> B,
    m: &Value,
    case: &Value,
    set: &str,
) -> Result<Vec<String>, String> {
    use scorecam_gpu::backend::Semantics;
    use scorecam_gpu::cam::{CamOptions, Explainer, Method, Targets};
    let id = case["id"].as_str().unwrap();
    let method = method_of(case);
    let model = fixture_model(&case["model_file"]);
    let img = fixture_rgb(&case["image_file"], model.input_size());
    let class = case["class"].as_u64().unwrap() as usize;
    let tm = &m["tolerances"]["methods"][set];
    let tol = |k: &str| {
        (
            tm[k]["atol"]
                .as_f64()
                .unwrap_or_else(|| panic!("{set}.{k}")) as f32,
            tm[k]["rtol"].as_f64().unwrap() as f32,
        )
    };
    let run = |sem: Semantics| {
        let opts = CamOptions {
            method: method.clone(),
            semantics: sem,
            layer: case["layer"].as_str().map(str::to_owned),
            targets: Targets::Classes(vec![class]),
            mask_batch: 7,
            image_batch: 1,
            precision: Default::default(),
        };
        let mut ex = Explainer::new(make(), Arc::clone(&model), opts).unwrap();
        ex.explain(std::slice::from_ref(&img)).unwrap().remove(0)
    };
    let files = &case["files"];
    let close =
        |got: &[f32], want: &[f32], (atol, rtol): (f32, f32), what: &str| -> Result<f32, String> {
            if got.len() != want.len() {
                return Err(format!(
                    "{id} {what}: {} values, golden {}",
                    got.len(),
                    want.len()
                ));
            }
            let mut worst = 0f32;
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                let d = (g - w).abs();
                if d.is_nan() || d > atol + rtol * w.abs() {
                    return Err(format!("{id} {what}[{i}]: {g}, golden {w} (|Δ| {d:.3e})"));
                }
                worst = worst.max(d);
            }
            Ok(worst)
        };
    let mut report = Vec::new();
    match &method {
        Method::GradCam | Method::GradCamPlusPlus => {
            let e = run(Semantics::Official);
            let key = if matches!(method, Method::GradCam) {
                "gradcam_weights"
            } else {
                "gradcampp_weights"
            };
            let dw = close(
                &e.maps[0].channel_scores,
                &npy(&files["weights"]),
                tol(key),
                "weights",
            )?;
            let dm = close(&e.maps[0].map, &npy(&files["map"]), tol("map"), "map")?;
            report.push(format!(
                "{id}: weights max|Δ| {dw:.2e}, map max|Δ| {dm:.2e}"
            ));
        }
        Method::SsCam { .. } | Method::IsCam { .. } => {
            let e = run(Semantics::Official); // their own (torchcam) semantics either way
            let raw = &e.maps[0].channel_scores;
            let ds = close(
                raw,
                &npy(&files["scores_raw"]),
                tol("scores_raw"),
                "scores_raw",
            )?;
            let w = scorecam_gpu::backend::cpu::softmax(raw);
            let dw = close(
                &w,
                &npy(&files["weights"]),
                tol("torchcam_weights"),
                "weights",
            )?;
            let dm = close(&e.maps[0].map, &npy(&files["map"]), tol("map"), "map")?;
            report.push(format!(
                "{id}: scores_raw max|Δ| {ds:.2e}, weights {dw:.2e}, map {dm:.2e}"
            ));
        }
        Method::FasterScoreCam { .. } => {
            let t = &m["tolerances"][set];
            let pair = |k: &str| {
                (
                    t[k]["atol"].as_f64().unwrap() as f32,
                    t[k]["rtol"].as_f64().unwrap() as f32,
                )
            };
            for (sem, scores, map, sk, mk) in [
                (
                    Semantics::Official,
                    "official_scores",
                    "official_map",
                    "official_scores",
                    "official_map",
                ),
                (
                    Semantics::ChannelSoftmax,
                    "cs_logits",
                    "cs_map",
                    "cs_logits",
                    "cs_map",
                ),
            ] {
                let e = run(sem);
                let ds = close(
                    &e.maps[0].channel_scores,
                    &npy(&files[scores]),
                    pair(sk),
                    scores,
                )?;
                let dm = close(&e.maps[0].map, &npy(&files[map]), (pair(mk).0, 0.0), map)?;
                report.push(format!(
                    "{id} {}: scores max|Δ| {ds:.2e}, map {dm:.2e}",
                    sem.name()
                ));
            }
        }
        Method::ScoreCam => unreachable!("plain Score-CAM cases live in \"cams\""),
    }
    Ok(report)
}
