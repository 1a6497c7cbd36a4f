//! The scripts a GPU session runs (benches/): a GPU run is short and rare, so what can be checked
//! without one is checked here. `gpu_report.py selftest` merges and tabulates fake runs (a full
//! one, a partial one, an empty directory, garbage files) and checks every figure, ratio and
//! target verdict; the peers' script must compile and the shell scripts parse.

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
    ])
}
