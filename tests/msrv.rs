//! The Rust version the crate declares (`rust-version` in Cargo.toml, "Rust ≥ X" in the README) is
//! the one it needs: no locked dependency asks for a newer one, and the crate with all its
//! targets builds (`cargo check --locked --all-targets`) with exactly that toolchain. The second
//! needs the toolchain installed (`.ci/run` does it; without it the test is reported as ignored,
//! `SCORECAM_REQUIRE_MSRV=1` makes that a failure).

mod common;

use std::path::Path;
use std::process::Command;

use common::declared_rust_version;

fn parse(v: &str) -> (u64, u64, u64) {
    let mut parts = v.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    )
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

fn declared_version_covers_every_locked_dependency_and_the_readme() {
    let declared = declared_rust_version();
    let o = Command::new(cargo())
        .args(["metadata", "--format-version", "1", "--locked", "--offline"])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut needs: Vec<(String, String)> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"] != env!("CARGO_PKG_NAME"))
        .filter_map(|p| {
            let v = p["rust_version"].as_str()?;
            Some((
                v.to_owned(),
                format!("{} {}", p["name"].as_str()?, p["version"].as_str()?),
            ))
        })
        .collect();
    needs.sort_by_key(|(v, _)| parse(v));
    let (newest, who) = needs.last().cloned().unwrap();
    println!("declared {declared}; newest need: {who} wants {newest}");
    assert!(
        parse(&newest) <= parse(&declared),
        "{who} needs Rust {newest} but Cargo.toml declares rust-version {declared}"
    );
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    assert!(
        readme.contains(&format!("Rust ≥ {declared}")),
        "the README must say Rust ≥ {declared}"
    );
}

fn the_crate_builds_with_the_declared_toolchain() {
    let declared = declared_rust_version();
    let o = Command::new("rustup")
        .args([
            "run",
            &declared,
            "cargo",
            "check",
            "--locked",
            "--all-targets",
        ])
        .arg("--target-dir")
        .arg(root().join("target/msrv"))
        .current_dir(root())
        .env_remove("RUSTC")
        .env_remove("RUSTDOC")
        .env_remove("CARGO")
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "cargo +{declared} check failed:\n{}",
        err.lines().rev().take(40).collect::<Vec<_>>().join("\n")
    );
    println!("cargo +{declared} check --locked --all-targets: ok");
}

fn main() -> std::process::ExitCode {
    let t = common::trial;
    common::run_tests(vec![
        t(
            "declared_version_covers_every_locked_dependency_and_the_readme",
            &[],
            declared_version_covers_every_locked_dependency_and_the_readme,
        ),
        t(
            "the_crate_builds_with_the_declared_toolchain",
            &[common::Need::MsrvToolchain],
            the_crate_builds_with_the_declared_toolchain,
        ),
    ])
}
