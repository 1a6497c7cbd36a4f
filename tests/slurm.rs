//! The README's deployment examples, for real: its Slurm array script submitted with
//! `sbatch --wait --array=0-2` to a one-node cluster (`.ci/slurm.sh up` starts one, as `.ci/run`
//! does; without one the test is reported as ignored, and `SCORECAM_SLURM=1` makes that a
//! failure), and its Kubernetes Indexed Job manifest parsed as YAML and checked against the CLI.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use common::{bin, results, write_png_image, Fixture};
use yaml_rust2::{Yaml, YamlLoader};

/// The first fenced block of `lang` in the README whose text contains `marker`.
fn readme_block(lang: &str, marker: &str) -> String {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let fence = format!("```{lang}\n");
    readme
        .split(&fence)
        .skip(1)
        .filter_map(|rest| rest.split("\n```").next())
        .find(|block| block.contains(marker))
        .unwrap_or_else(|| panic!("no ```{lang} block with {marker:?} in the README"))
        .to_owned()
}

fn the_readme_slurm_array_script_partitions_a_tree_on_a_real_cluster() {
    let f = Fixture::new();
    let imgs = f.path("imgs");
    let mut want = Vec::new();
    for i in 0..24 {
        let rel = format!("{}/img{:02}.png", ["a", "b", "c"][i % 3], i / 3);
        write_png_image(&imgs.join(&rel), i as u8);
        want.push(rel);
    }
    want.sort();
    let out = f.path("out");
    let script = f.path("scorecam.sbatch");
    std::fs::write(&script, readme_block("bash", "#SBATCH --array")).unwrap();
    let bin_dir = bin().parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // The README's script as is; the command line narrows it to this one-node, GPU-less cluster:
    // 3 tasks, no GPU, one core each, logs in the test directory.
    let submit = |logs: &str| {
        Command::new("sbatch")
            .args(["--wait", "--array=0-2", "--gres=none", "--cpus-per-task=1"])
            .arg(format!("--output={}/{logs}-%a.log", f.dir.path().display()))
            .arg(format!("--chdir={}", f.dir.path().display()))
            .arg(format!(
                "--export=ALL,IMAGES={},OUT={},SCORECAM_WEIGHTS={},PATH={path}",
                imgs.display(),
                out.display(),
                f.weights.display()
            ))
            .arg(&script)
            .output()
            .unwrap()
    };
    let o = submit("task");
    let logs: String = (0..3)
        .map(|i| std::fs::read_to_string(f.path(&format!("task-{i}.log"))).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n---\n");
    assert!(
        o.status.success(),
        "sbatch: {}\n{}\ntask logs:\n{logs}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    println!("{logs}");
    let lines = results(&out);
    assert!(lines.iter().all(|l| l.get("error").is_none()), "{lines:?}");
    let mut rels: Vec<String> = lines
        .iter()
        .map(|l| l["rel"].as_str().unwrap().to_owned())
        .collect();
    rels.sort();
    assert_eq!(rels, want, "the tasks' union is every image, none twice");
    let mut per_shard: BTreeMap<&str, usize> = BTreeMap::new();
    for l in &lines {
        *per_shard.entry(l["shard"].as_str().unwrap()).or_default() += 1;
    }
    assert_eq!(
        per_shard.keys().copied().collect::<Vec<_>>(),
        ["0/3", "1/3", "2/3"]
    );
    let runs: BTreeSet<&str> = lines.iter().map(|l| l["run"].as_str().unwrap()).collect();
    assert_eq!(runs.len(), 3, "one run per array task");
    for r in &want {
        for suffix in [".npy", ".heatmap.png", ".overlay.png"] {
            assert!(out.join(format!("{r}{suffix}")).is_file(), "{r}{suffix}");
        }
    }
    // Rerunning the whole array finds everything done.
    let o = submit("again");
    assert!(o.status.success());
    assert_eq!(
        results(&out).len(),
        want.len(),
        "--resume: no image explained twice"
    );
}

fn the_readme_kubernetes_indexed_job_parses_and_matches_the_cli() {
    let text = readme_block("yaml", "completionMode: Indexed");
    let docs = YamlLoader::load_from_str(&text).expect("the README's manifest is valid YAML");
    let job = &docs[0];
    assert_eq!(job["kind"].as_str(), Some("Job"));
    assert_eq!(job["apiVersion"].as_str(), Some("batch/v1"));
    let spec = &job["spec"];
    assert_eq!(spec["completionMode"].as_str(), Some("Indexed"));
    let completions = spec["completions"].as_i64().unwrap();
    let container = &spec["template"]["spec"]["containers"][0];
    let command: Vec<&str> = match &container["command"] {
        Yaml::Array(a) => a.iter().map(|v| v.as_str().unwrap()).collect(),
        other => panic!("command is not a list: {other:?}"),
    };
    assert_eq!(command[..2], ["scorecam-gpu", "explain"]);
    let count = command
        .iter()
        .position(|&a| a == "--shard-count")
        .map(|i| command[i + 1].parse::<i64>().unwrap());
    assert_eq!(
        count,
        Some(completions),
        "--shard-count must equal completions"
    );
    assert!(command.contains(&"--resume"));
    // The same arguments are accepted by the binary (checked up to loading weights).
    let f = Fixture::new();
    let imgs = f.path("imgs");
    write_png_image(&imgs.join("x.png"), 1);
    let mut args: Vec<String> = command[1..].iter().map(|s| s.to_string()).collect();
    let data = args.iter().position(|a| a == "/data/imagenet/val").unwrap();
    args[data] = imgs.display().to_string();
    let results_at = args
        .iter()
        .position(|a| a == "/results/imagenet-val-cams")
        .unwrap();
    args[results_at] = f.path("out").display().to_string();
    let o = Command::new(bin())
        .args(&args)
        .args(["--backend", "cpu", "--weights"])
        .arg(&f.weights)
        .env("JOB_COMPLETION_INDEX", "0")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn main() -> std::process::ExitCode {
    let t = common::trial;
    common::run_tests(vec![
        t(
            "the_readme_slurm_array_script_partitions_a_tree_on_a_real_cluster",
            &[common::Need::Slurm],
            the_readme_slurm_array_script_partitions_a_tree_on_a_real_cluster,
        ),
        t(
            "the_readme_kubernetes_indexed_job_parses_and_matches_the_cli",
            &[],
            the_readme_kubernetes_indexed_job_parses_and_matches_the_cli,
        ),
    ])
}
