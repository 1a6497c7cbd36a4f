//! The scripts a GPU session runs (benches/): a GPU run is short and rare, so what can be checked
//! without one is checked here. `gpu_report.py selftest` merges and tabulates fake runs (a full
//! one, a partial one, an empty directory, garbage files) and checks every figure, ratio and
//! target verdict; the peers' script must compile and the shell scripts parse; `gpu_check.sh`'s
//! retries run against a fake engine.

mod common;

use std::process::Command;

use common::Need;

fn run(cmd: &mut Command) -> String {
    let o = cmd
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// Merge and table on fake inputs, every check of the script's own self-test.
fn gpu_report_selftest_passes() {
    let out = run(Command::new("python3").args(["benches/gpu_report.py", "selftest"]));
    assert!(out.contains("selftest: ok"), "{out}");
}

/// The peers' benchmark (it needs PyTorch and a GPU, so it runs only there) at least compiles.
fn peers_script_compiles() {
    run(Command::new("python3").args([
        "-c",
        "import ast, sys; [ast.parse(open(f).read(), f) for f in sys.argv[1:]]",
        "benches/peers_gpu.py",
        "benches/pytorch_cpu_forward.py",
    ]));
}

/// The GPU run's shell scripts parse (a syntax error would cost a whole device session).
fn gpu_shell_scripts_parse() {
    for script in ["benches/gpu_check.sh", "benches/gpu_bundle.sh"] {
        run(Command::new("bash").args(["-n", script]));
    }
}

/// `gpu_check.sh` with a fake bundle whose engine hangs unless `SCORECAM_WGMMA=off` (as a
/// wgmma kernel that never finishes would) or, in a second run, fails fast unless cuDNN only:
/// the FP16 bench is retried without the wgmma builds after its timeout, and without every
/// hand-written conv after two failures; in a third, fails naming a kernel (a hung device check)
/// unless that kernel is skipped: retried without just that kernel. The benches after it keep
/// the setting that worked; the figures come from the try that worked, the failed tries' files
/// are kept.
fn gpu_check_retries_a_hung_or_failed_engine() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::temp_dir().join(format!("scorecam-gpu-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("benches")).unwrap();
    std::fs::create_dir_all(dir.join("target/gpu-bundle")).unwrap();
    for f in ["gpu_check.sh", "gpu_report.py", "peers_gpu.py"] {
        std::fs::copy(root.join("benches").join(f), dir.join("benches").join(f)).unwrap();
    }
    let script = |name: &str, body: &str| {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join("target/gpu-bundle").join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    script(
        "run.sh",
        "echo 'test result: ok. 1 passed; 0 failed; 0 ignored'",
    );
    let steps = |engine: &str| -> Vec<(String, String)> {
        script("scorecam-gpu", engine);
        let out = dir.join("out");
        let o = Command::new("bash")
            .arg(dir.join("benches/gpu_check.sh"))
            .envs([
                ("OUT", out.to_str().unwrap()),
                ("TEST_TIMEOUT", "10"),
                ("BENCH_TIMEOUT", "3"),
                ("FP8_TIMEOUT", "10"),
                ("CS_TIMEOUT", "10"),
                ("PEERS_TIMEOUT", "20"),
                ("PEERS_COMPILE", "0"),
                ("GPU_CHECK_BUDGET_S", "200"),
            ])
            .env_remove("SCORECAM_WGMMA")
            .env_remove("SCORECAM_CONV_DIRECT")
            .env_remove("SCORECAM_SKIP_KERNELS")
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&o.stdout).into_owned();
        let tsv = std::fs::read_to_string(out.join("steps.tsv")).unwrap_or_default();
        println!("{tsv}");
        assert!(!tsv.is_empty(), "no steps.tsv:\n{log}");
        tsv.lines()
            .map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                (f[0].to_string(), f.get(1).unwrap_or(&"").to_string())
            })
            .collect()
    };
    let rc = |steps: &[(String, String)], name: &str| {
        steps
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, rc)| rc.clone())
    };
    // Hangs with the wgmma builds: a timeout, then a try without them that works, and the FP8
    // bench without them too.
    let hang = r#"if [ "$SCORECAM_WGMMA" = off ]; then echo '{"ok": 1}'; else exec sleep 60; fi"#;
    let s = steps(hang);
    assert_eq!(rc(&s, "engine_fp16").as_deref(), Some("124"), "{s:?}");
    assert_eq!(
        rc(&s, "engine_fp16_no_wgmma").as_deref(),
        Some("0"),
        "{s:?}"
    );
    assert_eq!(rc(&s, "engine_fp16_cudnn_only"), None, "{s:?}");
    assert_eq!(rc(&s, "engine_fp8").as_deref(), Some("0"), "{s:?}");
    let out = dir.join("out");
    let kept = out.join("engine_fp16_failed_before_engine_fp16_no_wgmma.err");
    assert!(kept.exists(), "the failed try's stderr is not kept");
    assert!(std::fs::read_to_string(out.join("engine_fp16.json"))
        .unwrap()
        .contains("\"ok\""));
    // Fails unless cuDNN only: two retries, the second with every hand-written conv off.
    let fail = r#"if [ "$SCORECAM_CONV_DIRECT" = off ]; then echo '{"ok": 1}'; else exit 1; fi"#;
    let s = steps(fail);
    assert_eq!(rc(&s, "engine_fp16").as_deref(), Some("1"), "{s:?}");
    assert_eq!(
        rc(&s, "engine_fp16_no_wgmma").as_deref(),
        Some("1"),
        "{s:?}"
    );
    assert_eq!(
        rc(&s, "engine_fp16_cudnn_only").as_deref(),
        Some("0"),
        "{s:?}"
    );
    assert_eq!(rc(&s, "engine_fp8").as_deref(), Some("0"), "{s:?}");
    // A device check that hung names its kernel: the next try skips just that one, and works;
    // no try without the wgmma builds; the FP8 bench keeps the skip.
    let named = r#"case "$SCORECAM_SKIP_KERNELS" in
  *conv3x3_block1_pool_wg2*) echo '{"ok": 1}' ;;
  *) echo 'error: CUDA: the whole-first-block kernel, device check (conv3x3_block1_pool_wg2): not finished after 20 s' >&2; exit 1 ;;
esac"#;
    let s = steps(named);
    assert_eq!(rc(&s, "engine_fp16").as_deref(), Some("1"), "{s:?}");
    assert_eq!(
        rc(&s, "engine_fp16_skip_conv3x3_block1_pool_wg2").as_deref(),
        Some("0"),
        "{s:?}"
    );
    assert_eq!(rc(&s, "engine_fp16_no_wgmma"), None, "{s:?}");
    assert_eq!(rc(&s, "engine_fp8").as_deref(), Some("0"), "{s:?}");
    // The named kernel is not the only trouble: the skip's try fails too, and the try without
    // the wgmma builds runs without the skip (which it would refuse here).
    let worse = r#"if [ "$SCORECAM_WGMMA" = off ]; then
  if [ -n "$SCORECAM_SKIP_KERNELS" ]; then exit 2; else echo '{"ok": 1}'; fi
else
  echo 'error: CUDA: the wgmma conv (N256), device check (conv3x3_wg_n256): not finished after 20 s' >&2; exit 1
fi"#;
    let s = steps(worse);
    assert_eq!(
        rc(&s, "engine_fp16_skip_conv3x3_wg_n256").as_deref(),
        Some("1"),
        "{s:?}"
    );
    assert_eq!(
        rc(&s, "engine_fp16_no_wgmma").as_deref(),
        Some("0"),
        "{s:?}"
    );
    assert_eq!(rc(&s, "engine_fp8").as_deref(), Some("0"), "{s:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() -> std::process::ExitCode {
    common::run_tests(vec![
        common::trial(
            "gpu_report_selftest_passes",
            &[Need::Python],
            gpu_report_selftest_passes,
        ),
        common::trial(
            "peers_script_compiles",
            &[Need::Python],
            peers_script_compiles,
        ),
        common::trial("gpu_shell_scripts_parse", &[], gpu_shell_scripts_parse),
        common::trial(
            "gpu_check_retries_a_hung_or_failed_engine",
            &[Need::Python],
            gpu_check_retries_a_hung_or_failed_engine,
        ),
    ])
}
