//! The batch job end to end on the CPU with a tiny model: directory trees with equal names and
//! corrupt files, manifests, resume, a run killed mid-way, shards (flag, Slurm and Kubernetes
//! variables), a full output disk, several workers, top-k, progress and profile output, and one
//! regression test per defect listed in issue 6.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{files, jpeg_bytes, results, stderr, temp_leftovers, write_png_image, Fixture};
use serde_json::Value;

/// Run `cmd`, failing the test if it takes longer than `secs` (a blocked job must not hang CI).
fn run_within(mut cmd: Command, secs: u64) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!("the job did not finish within {secs} s: {}", stderr(&o));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn ok_lines(lines: &[Value]) -> Vec<&Value> {
    lines.iter().filter(|l| l.get("error").is_none()).collect()
}

fn err_lines(lines: &[Value]) -> Vec<&Value> {
    lines.iter().filter(|l| l.get("error").is_some()).collect()
}

fn rels(lines: &[&Value]) -> Vec<String> {
    let mut v: Vec<String> = lines
        .iter()
        .map(|l| l["rel"].as_str().unwrap().to_owned())
        .collect();
    v.sort();
    v
}

/// `n` good images under `dir`: `a/img00.png`, `b/img00.png`, ... spread over three folders with
/// the same names in each. Returns their paths relative to `dir`.
fn good_tree(dir: &Path, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let rel = format!("{}/img{:02}.png", ["a", "b", "c/deep"][i % 3], i / 3);
            write_png_image(&dir.join(&rel), i as u8);
            rel
        })
        .collect()
}

/// A JPEG cut 20 bytes after the start of its scan.
fn jpeg_cut_after_sos() -> Vec<u8> {
    let j = jpeg_bytes(64, 48, 90);
    let sos = j.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap();
    j[..sos + 20].to_vec()
}

#[cfg(unix)]
fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(s(p)).unwrap();
    // SAFETY: a valid C string path.
    assert_eq!(
        unsafe { libc::mkfifo(c.as_ptr(), 0o644) },
        0,
        "mkfifo {p:?}"
    );
}

fn a_tree_with_equal_names_and_corrupt_files_gives_exact_counts() {
    let f = Fixture::new();
    let imgs = f.path("imgs");
    let good = good_tree(&imgs, 45);
    // Corrupt and odd entries, each an error line; files without an image extension are ignored.
    std::fs::write(imgs.join("a/zero.png"), b"").unwrap();
    std::fs::write(imgs.join("a/text.jpg"), b"this is not an image").unwrap();
    let png = std::fs::read(imgs.join("a/img00.png")).unwrap();
    std::fs::write(imgs.join("b/cut.png"), &png[..png.len() / 2]).unwrap();
    std::fs::write(imgs.join("b/cut_scan.jpg"), jpeg_cut_after_sos()).unwrap();
    let big = jpeg_bytes(8000, 8000, 75);
    std::fs::write(imgs.join("c/big_cut.jpg"), &big[..big.len() / 10]).unwrap();
    mkfifo(&imgs.join("c/fifo.png"));
    std::os::unix::fs::symlink("..", imgs.join("c/deep/loop")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/x.png", imgs.join("c/broken.png")).unwrap();
    std::fs::write(imgs.join("a/notes.txt"), b"ignored").unwrap();
    // A complete JPEG is fine, whatever follows its end marker.
    let mut jpg = jpeg_bytes(40, 40, 90);
    jpg.extend_from_slice(b"trailing bytes some cameras add");
    std::fs::write(imgs.join("c/photo.JPG"), jpg).unwrap();

    let out = f.path("out");
    let mut cmd = f.explain_cmd(&out, &["--save", "npy", "--mask-batch", "7", s(&imgs)]);
    cmd.arg("--image-batch").arg("4");
    let o = run_within(cmd, 120);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let lines = results(&out);
    let ok = ok_lines(&lines);
    let errs = err_lines(&lines);
    let mut want: Vec<String> = good.clone();
    want.push("c/photo.JPG".into());
    want.sort();
    assert_eq!(rels(&ok), want);
    let mut bad: Vec<String> = errs
        .iter()
        .map(|l| l["image"].as_str().unwrap().to_owned())
        .collect();
    bad.sort();
    let mut want_bad: Vec<String> = [
        "a/text.jpg",
        "a/zero.png",
        "b/cut.png",
        "b/cut_scan.jpg",
        "c/big_cut.jpg",
        "c/broken.png",
        "c/deep/loop",
        "c/fifo.png",
    ]
    .iter()
    .map(|r| s(&imgs.join(r)).to_owned())
    .collect();
    want_bad.sort();
    assert_eq!(bad, want_bad, "{}", stderr(&o));
    let msg = |name: &str| {
        errs.iter()
            .find(|l| l["image"].as_str().unwrap().ends_with(name))
            .unwrap()["error"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert!(
        msg("cut_scan.jpg").contains("truncated"),
        "{}",
        msg("cut_scan.jpg")
    );
    assert!(
        msg("big_cut.jpg").contains("truncated"),
        "{}",
        msg("big_cut.jpg")
    );
    assert!(msg("fifo.png").contains("FIFO"), "{}", msg("fifo.png"));
    assert!(msg("loop").contains("loop"), "{}", msg("loop"));
    assert!(msg("zero.png").contains("empty"), "{}", msg("zero.png"));
    // Exactly the good images' maps, mirrored; nothing else, no temporary files.
    let mut expect_files: Vec<String> = want.iter().map(|r| format!("{r}.npy")).collect();
    expect_files.push("results.jsonl".into());
    expect_files.sort();
    assert_eq!(files(&out), expect_files);
    assert!(temp_leftovers(&out).is_empty());
    // Equal names in different folders are different outputs of their own images.
    let a = scorecam_gpu::image::read_npy(&out.join("a/img00.png.npy"))
        .unwrap()
        .0;
    let b = scorecam_gpu::image::read_npy(&out.join("b/img00.png.npy"))
        .unwrap()
        .0;
    assert_ne!(a, b);
    let err = stderr(&o);
    assert!(err.contains("46 explained, 8 failed"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

fn resume_skips_what_is_done_and_redoes_what_is_missing() {
    let f = Fixture::new();
    let imgs = f.path("imgs");
    let good = good_tree(&imgs, 9);
    std::fs::write(imgs.join("a/bad.png"), b"garbage").unwrap();
    let out = f.path("out");
    let args = ["--save", "npy,heatmap", s(&imgs)];
    let o = f.explain(&out, &args);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(ok_lines(&results(&out)).len(), 9);

    // Everything done: no new success line; the failed input is tried again.
    let mut resume = args.to_vec();
    resume.push("--resume");
    let o = f.explain(&out, &resume);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let lines = results(&out);
    assert_eq!(ok_lines(&lines).len(), 9);
    assert_eq!(err_lines(&lines).len(), 2);
    assert!(
        stderr(&o).contains("0 explained, 1 failed, 9 skipped"),
        "{}",
        stderr(&o)
    );

    // A lost heatmap makes its image be explained again, and only it.
    std::fs::remove_file(out.join("b/img00.png.heatmap.png")).unwrap();
    std::fs::remove_file(imgs.join("a/bad.png")).unwrap();
    let o = f.explain(&out, &resume);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let lines = results(&out);
    let ok = ok_lines(&lines);
    assert_eq!(ok.len(), 10);
    assert_eq!(ok[9]["rel"], "b/img00.png");
    assert!(out.join("b/img00.png.heatmap.png").exists());
    // A run asking for a kind the earlier run did not save redoes everything.
    let o = f.explain(&out, &["--save", "npy,overlay", "--resume", s(&imgs)]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(ok_lines(&results(&out)).len(), 19);
    assert_eq!(good.len(), 9);
}

fn a_killed_run_leaves_no_partial_file_and_resume_completes_it() {
    let f = Fixture::new();
    let imgs = f.path("imgs");
    let good = good_tree(&imgs, 240);
    let out = f.path("out");
    // Slow enough to be killed after its first commit (one every 2 s).
    let mut child = f
        .explain_cmd(
            &out,
            &[
                "--input-size",
                "96",
                "--mask-batch",
                "1",
                "--jobs",
                "1",
                "--quiet",
                s(&imgs),
            ],
        )
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let committed = std::fs::metadata(out.join("results.jsonl")).is_ok_and(|m| m.len() > 0);
        if committed {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        assert!(Instant::now() < deadline, "no commit within 120 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(!status.success());
    let before = ok_lines(&results(&out)).len();
    assert!(
        before > 0 && before < good.len(),
        "killed after {before} images"
    );

    // Every file in the tree is whole; the dead run's temporary directory is left...
    for name in files(&out) {
        let p = out.join(&name);
        if name.ends_with(".npy") {
            let (_, shape) = scorecam_gpu::image::read_npy(&p).unwrap();
            assert_eq!(shape, [96, 96], "{name}");
        } else if name.ends_with(".png") {
            image::open(&p).unwrap_or_else(|e| panic!("{name}: {e}"));
        } else {
            assert_eq!(name, "results.jsonl");
        }
    }
    assert_eq!(temp_leftovers(&out).len(), 1);

    // ...until the next run removes it and finishes the job.
    let o = f.explain(&out, &["--input-size", "96", "--resume", s(&imgs)]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("removed the temporary files of 1 run"),
        "{}",
        stderr(&o)
    );
    assert!(temp_leftovers(&out).is_empty());
    let ok = results(&out);
    let ok = ok_lines(&ok);
    let mut want = good.clone();
    want.sort();
    assert_eq!(rels(&ok), want, "every image exactly once");
}

/// Run the 3 shards of a job over `imgs` into `out`, concurrently, each configured by `setup`.
fn run_shards(f: &Fixture, imgs: &Path, out: &Path, setup: impl Fn(&mut Command, u64)) {
    let children: Vec<_> = (0..3u64)
        .map(|i| {
            let mut cmd = f.explain_cmd(out, &["--save", "npy", "--quiet", s(imgs)]);
            setup(&mut cmd, i);
            cmd.stderr(Stdio::piped()).spawn().unwrap()
        })
        .collect();
    for c in children {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{:?}: {}", o.status, stderr(&o));
    }
}

fn assert_partition(out: &Path, want: &[String]) {
    let lines = results(out);
    let ok = ok_lines(&lines);
    assert_eq!(
        rels(&ok),
        want,
        "the shards' union is every input, none twice"
    );
    let mut per_shard: BTreeMap<String, usize> = BTreeMap::new();
    for l in &ok {
        *per_shard
            .entry(l["shard"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(
        per_shard.keys().cloned().collect::<Vec<_>>(),
        ["0/3", "1/3", "2/3"]
    );
    let runs: BTreeSet<&str> = ok.iter().map(|l| l["run"].as_str().unwrap()).collect();
    assert_eq!(runs.len(), 3);
    let mut npys: Vec<String> = files(out)
        .into_iter()
        .filter(|n| n.ends_with(".npy"))
        .collect();
    npys.sort();
    let mut expect: Vec<String> = want.iter().map(|r| format!("{r}.npy")).collect();
    expect.sort();
    assert_eq!(npys, expect);
}

fn shards_partition_the_inputs_exactly_from_flags_slurm_and_kubernetes() {
    let f = Fixture::new();
    let imgs = f.path("imgs");
    let mut want = good_tree(&imgs, 30);
    want.sort();
    run_shards(&f, &imgs, &f.path("flag"), |c, i| {
        c.arg("--shard").arg(format!("{i}/3"));
    });
    assert_partition(&f.path("flag"), &want);
    run_shards(&f, &imgs, &f.path("slurm"), |c, i| {
        c.env("SLURM_ARRAY_TASK_ID", (10 + 2 * i).to_string())
            .env("SLURM_ARRAY_TASK_MIN", "10")
            .env("SLURM_ARRAY_TASK_MAX", "14")
            .env("SLURM_ARRAY_TASK_STEP", "2")
            .env("SLURM_ARRAY_TASK_COUNT", "3");
    });
    assert_partition(&f.path("slurm"), &want);
    run_shards(&f, &imgs, &f.path("k8s"), |c, i| {
        c.env("JOB_COMPLETION_INDEX", i.to_string())
            .args(["--shard-count", "3"]);
    });
    assert_partition(&f.path("k8s"), &want);
    // The same partition whoever computes it.
    let a = results(&f.path("flag"));
    let b = results(&f.path("k8s"));
    let shard_of = |lines: &[Value]| -> BTreeMap<String, String> {
        lines
            .iter()
            .map(|l| {
                (
                    l["rel"].as_str().unwrap().into(),
                    l["shard"].as_str().unwrap().into(),
                )
            })
            .collect()
    };
    assert_eq!(shard_of(&a), shard_of(&b));
    // Misconfigured arrays are refused before anything is written.
    let out = f.path("bad");
    let o = f
        .explain_cmd(&out, &[s(&imgs)])
        .env("JOB_COMPLETION_INDEX", "1")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--shard-count"), "{}", stderr(&o));
    assert!(!out.exists());
}

fn manifests_name_files_classes_and_report_bad_lines() {
    let f = Fixture::new();
    let imgs = f.path("imgs");
    good_tree(&imgs, 4);
    let manifest = f.path("imgs/list.txt");
    std::fs::write(
        &manifest,
        [
            "# a comment, then a blank line",
            "",
            "a/img00.png",
            s(&imgs.join("b/img00.png")),
            r#"{"path": "c/deep/img00.png", "class": 3}"#,
            r#"{"path": "a/img01.png", "classes": [4, 1, 4]}"#,
            "a/missing.png",
            r#"{"path": "a/img01.png", "class": 99}"#,
            r#"{"class": 2}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let out = f.path("out");
    let o = f.explain(&out, &["--save", "npy", "--manifest", s(&manifest)]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let lines = results(&out);
    // Without --root a manifest's inputs are mirrored by their absolute paths.
    let abs = |r: &str| s(&imgs.join(r)).trim_start_matches('/').to_owned();
    let ok = ok_lines(&lines);
    let classes = |rel: &str| -> Vec<u64> {
        ok.iter()
            .filter(|l| l["rel"] == rel)
            .map(|l| l["class"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(classes(&abs("c/deep/img00.png")), [3]);
    assert_eq!(classes(&abs("a/img01.png")), [4, 1]);
    assert_eq!(classes(&abs("a/img00.png")).len(), 1);
    assert_eq!(classes(&abs("b/img00.png")).len(), 1);
    assert_eq!(ok.len(), 5);
    assert!(out
        .join(format!("{}.class4.npy", abs("a/img01.png")))
        .exists());
    let errs: Vec<String> = err_lines(&lines)
        .iter()
        .map(|l| l["error"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(errs.len(), 3, "{errs:?}");
    assert!(errs.iter().any(|e| e.contains("missing.png")), "{errs:?}");
    assert!(errs.iter().any(|e| e.contains("class 99")), "{errs:?}");
    assert!(
        errs.iter()
            .any(|e| e.contains("list.txt:9") && e.contains("path")),
        "{errs:?}"
    );

    // From stdin, relative to the current directory, mirrored below --root.
    let out = f.path("out2");
    let mut cmd = f.explain_cmd(&out, &["--save", "npy", "--manifest", "-", "--root"]);
    cmd.arg(&imgs)
        .current_dir(&imgs)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"a/img00.png\nb/img00.png\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        rels(&ok_lines(&results(&out))),
        ["a/img00.png", "b/img00.png"]
    );

    // A manifest that cannot be read stops everything before any output exists.
    let out = f.path("out3");
    let o = f.explain(&out, &["--manifest", s(&f.path("nope.txt"))]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("nope.txt"), "{}", stderr(&o));
    assert!(!out.exists());
}

fn several_workers_give_the_same_maps_as_one() {
    let f = Fixture::new();
    let imgs = f.path("imgs");
    let rels_ = good_tree(&imgs, 12);
    let one = f.path("one");
    let three = f.path("three");
    for (out, workers) in [(&one, "1"), (&three, "3")] {
        let o = f.explain(
            out,
            &[
                "--save",
                "npy",
                "--image-batch",
                "2",
                "--mask-batch",
                "5",
                "--workers",
                workers,
                s(&imgs),
            ],
        );
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let devices: BTreeSet<String> = results(&three)
        .iter()
        .map(|l| l["device"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        devices.len() > 1,
        "work was handed to several workers: {devices:?}"
    );
    for r in &rels_ {
        let a = std::fs::read(one.join(format!("{r}.npy"))).unwrap();
        let b = std::fs::read(three.join(format!("{r}.npy"))).unwrap();
        assert_eq!(a, b, "{r}");
    }
}

fn top_k_explains_the_best_classes_from_the_same_passes() {
    let f = Fixture::new();
    let img = f.image("x.png", 7);
    let out = f.path("out");
    let o = f.explain(&out, &["--save", "npy", "--top-k", "3", s(&img)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines = results(&out);
    assert_eq!(lines.len(), 3);
    let ranks: Vec<u64> = lines.iter().map(|l| l["rank"].as_u64().unwrap()).collect();
    assert_eq!(ranks, [1, 2, 3]);
    let classes: BTreeSet<u64> = lines.iter().map(|l| l["class"].as_u64().unwrap()).collect();
    assert_eq!(classes.len(), 3);
    let scores: Vec<f64> = lines.iter().map(|l| l["score"].as_f64().unwrap()).collect();
    assert!(
        scores[0] >= scores[1] && scores[1] >= scores[2],
        "{scores:?}"
    );
    // The second-best class's map equals a run for that class alone.
    let second = lines[1]["class"].as_u64().unwrap().to_string();
    let alone = f.path("alone");
    let o = f.explain(&alone, &["--save", "npy", "--class", &second, s(&img)]);
    assert!(o.status.success());
    let a = std::fs::read(out.join(format!("x.png.class{second}.npy"))).unwrap();
    let b = std::fs::read(alone.join("x.png.npy")).unwrap();
    assert_eq!(a, b);
    // --class with a repeat explains it once (defect 8).
    let dup = f.path("dup");
    let o = f.explain(&dup, &["--save", "npy", "--class", "3,3", s(&img)]);
    assert!(o.status.success());
    assert_eq!(results(&dup).len(), 1);
    assert_eq!(files(&dup), ["results.jsonl", "x.png.npy"]);
}

fn progress_lines_quiet_and_profile() {
    let f = Fixture::new();
    let imgs = f.path("imgs");
    good_tree(&imgs, 6);
    let out = f.path("out");
    let o = f.explain(
        &out,
        &[
            "--save",
            "npy",
            "--input-size",
            "96",
            "--mask-batch",
            "1",
            "--log-every",
            "0.05",
            "--profile",
            s(&imgs),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("progress: "), "{err}");
    assert!(err.contains("masked passes"), "{err}");
    for want in [
        "decode + resize",
        "encode + write",
        "masked_forward",
        "busy:",
    ] {
        assert!(err.contains(want), "missing {want:?} in {err}");
    }
    let o = f.explain(&f.path("quiet"), &["--save", "npy", "--quiet", s(&imgs)]);
    assert!(o.status.success());
    assert_eq!(stderr(&o), "");
}

fn an_output_directory_inside_the_inputs_is_not_read_back() {
    let f = Fixture::new();
    let imgs = f.path("imgs");
    good_tree(&imgs, 3);
    let out = imgs.join("cams");
    for _ in 0..2 {
        let o = f.explain(&out, &[s(&imgs)]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let lines = results(&out);
    assert_eq!(lines.len(), 6, "two runs of three images");
    assert!(lines
        .iter()
        .all(|l| !l["rel"].as_str().unwrap().starts_with("cams")));
}

// ---------------------------------------------------------------------------------------------
// Regression tests, one per defect of issue 6
// ---------------------------------------------------------------------------------------------

/// Defect 1: a partial last line (a disk that filled mid-append, a crash) is cut off before the
/// next append, so every line stays parseable.
fn defect_1_a_partial_last_line_is_cut_off() {
    let f = Fixture::new();
    let img = f.image("x.png", 1);
    let out = f.path("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("results.jsonl"),
        b"{\"image\":\"old\",\"error\":\"e\"}\n{\"clas",
    )
    .unwrap();
    let o = f.explain(&out, &["--save", "npy", s(&img)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("partial line"), "{}", stderr(&o));
    let lines = results(&out); // each parses
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["image"], "old");
    assert_eq!(lines[1]["rel"], "x.png");
}

/// Defect 2: batches are capped by what the run can use, so absurd values cost nothing.
fn defect_2_huge_batches_are_capped() {
    let f = Fixture::new();
    let img = f.image("x.png", 1);
    let out = f.path("out");
    let t0 = Instant::now();
    let o = f.explain(
        &out,
        &[
            "--save",
            "npy",
            "--mask-batch",
            "99999999999",
            "--image-batch",
            "99999999999",
            s(&img),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(t0.elapsed() < Duration::from_secs(30));
    // The largest child of this test process so far (all run tiny models) stayed small.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct we pass.
    assert_eq!(
        unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) },
        0
    );
    let max_rss_mib = ru.ru_maxrss / 1024;
    assert!(max_rss_mib < 1024, "a child used {max_rss_mib} MiB");
}

/// Defect 3: the input size has a bound, checked like any option, in words that fit the CPU.
fn defect_3_input_size_is_bounded() {
    let f = Fixture::new();
    let img = f.image("x.png", 1);
    let out = f.path("out");
    let o = f.explain(&out, &["--input-size", "100000", s(&img)]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("--input-size 100000") && err.contains("2048"),
        "{err}"
    );
    assert!(!err.contains("GPU"), "{err}");
    assert!(!out.exists());
    // The same bound applies to a file's metadata.
    let mut model = scorecam_gpu::Vgg::random_from_config(&[8, 0], &[10], 1, 32);
    model.meta.input_size = 100000;
    let w = f.path("big.safetensors");
    scorecam_gpu::weights::save(&model, &w, "F32").unwrap();
    let o = Command::new(common::bin())
        .args([
            "explain",
            "--backend",
            "cpu",
            "--weights",
            s(&w),
            "--out",
            s(&out),
            s(&img),
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("input_size"), "{}", stderr(&o));
    assert!(!out.exists());
}

/// Defect 5: two runs into one output directory never overwrite each other's maps.
fn defect_5_runs_with_equal_names_never_collide() {
    let f = Fixture::new();
    let x = f.image("x/cat.png", 1);
    let y = f.image("y/cat.png", 2);
    let out = f.path("out");
    let o = f.explain(&out, &["--save", "npy", s(&x)]);
    assert!(o.status.success());
    let first = std::fs::read(out.join("cat.png.npy")).unwrap();
    // The tree mirrors x/: an input elsewhere would land on the same name, so it is refused.
    let o = f.explain(&out, &["--save", "npy", s(&y)]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--root"), "{}", stderr(&o));
    assert_eq!(std::fs::read(out.join("cat.png.npy")).unwrap(), first);
    assert_eq!(results(&out).len(), 1);
    // With a root holding both, each keeps its own map, run after run.
    let both = f.path("both");
    for p in [&x, &y] {
        let o = f.explain(&both, &["--save", "npy", "--root", s(f.dir.path()), s(p)]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let lines = results(&both);
    assert_eq!(lines[0]["map"], "x/cat.png.npy");
    assert_eq!(lines[1]["map"], "y/cat.png.npy");
    assert_eq!(std::fs::read(both.join("x/cat.png.npy")).unwrap(), first);
    assert_ne!(std::fs::read(both.join("y/cat.png.npy")).unwrap(), first);
    // A later run over a part of the tree keeps the tree's root.
    let o = f.explain(&both, &["--save", "npy", s(&f.path("y"))]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(results(&both)[2]["map"], "y/cat.png.npy");
}

/// Defect 6 (and the out-of-space handling of the job): on a full disk the job stops with exit 1,
/// results.jsonl stays valid, no failed image leaves a file, and --resume finishes the job.
fn defect_6_a_full_disk_stops_the_job_and_resume_finishes_it() {
    let f = Fixture::new();
    let imgs = f.path("imgs");
    let mut want = good_tree(&imgs, 60);
    want.sort();
    let out = f.path("out");
    std::fs::create_dir_all(&out).unwrap();
    let _mount = Tmpfs::mount(&out, "160k");
    let o = f.explain(&out, &[s(&imgs)]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("disk is full") && err.contains("--resume"),
        "{err}"
    );
    let lines = results(&out); // every line parses
    let ok = ok_lines(&lines);
    assert!(ok.len() < want.len());
    for l in &ok {
        for k in ["map", "heatmap", "overlay"] {
            assert!(out.join(l[k].as_str().unwrap()).is_file(), "{l}");
        }
    }
    for l in err_lines(&lines) {
        let rel = l["rel"].as_str().unwrap();
        assert!(
            !files(&out).iter().any(|n| n.starts_with(rel)),
            "files left for {rel}"
        );
    }
    // Room again: resume completes the job.
    assert!(Command::new("mount")
        .args(["-o", "remount,size=64m"])
        .arg(&out)
        .status()
        .unwrap()
        .success());
    let o = f.explain(&out, &["--resume", s(&imgs)]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let lines = results(&out);
    assert_eq!(rels(&ok_lines(&lines)), want);
    assert!(temp_leftovers(&out).is_empty());
}

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mount (the test runs as root: see its `Need::Root`).
    fn mount(at: &Path, size: &str) -> Tmpfs {
        let o = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .unwrap();
        assert!(o.status.success(), "mount tmpfs: {}", stderr(&o));
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Defect 7: a FIFO (or any non-regular file) is an error line, never a wait.
fn defect_7_a_fifo_never_blocks_the_job() {
    let f = Fixture::new();
    let good = f.image("x.png", 1);
    let fifo = f.path("pipe.png");
    mkfifo(&fifo);
    let out = f.path("out");
    let o = run_within(
        f.explain_cmd(&out, &["--save", "npy", s(&fifo), s(&good), "/dev/zero"]),
        60,
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let lines = results(&out);
    assert_eq!(ok_lines(&lines).len(), 1);
    let errs: Vec<&str> = err_lines(&lines)
        .iter()
        .map(|l| l["error"].as_str().unwrap())
        .collect();
    assert_eq!(errs.len(), 2);
    assert!(errs.iter().any(|e| e.contains("FIFO")), "{errs:?}");
    // /dev/zero is a character device, not an "empty file" (defect 10).
    assert!(
        errs.iter().any(|e| e.contains("character device")),
        "{errs:?}"
    );
}

/// Defect 9: usage errors of every kind leave no output directory behind.
fn defect_9_usage_errors_create_nothing() {
    let f = Fixture::new();
    let img = f.image("x.png", 1);
    let out = f.path("out");
    for bad in [
        &["--shard", "3/3"][..],
        &["--save", "npy,jpg"],
        &["--top-k", "0"],
        &["--top-k", "11"],
        &["--jobs", "0"],
        &["--devices", "0"],
        &["--layer", "features.99"],
        &["--class", "10"],
        &["--root", "/nonexistent"],
    ] {
        let mut args = bad.to_vec();
        args.push(s(&img));
        let o = f.explain(&out, &args);
        assert_eq!(o.status.code(), Some(2), "{bad:?}: {}", stderr(&o));
        assert!(!out.exists(), "{bad:?} created the output directory");
    }
}

/// Defect 10: a results.jsonl that is a directory is one clear error before anything runs; error
/// texts are one line; non-UTF-8 names are recorded exactly.
fn defect_10_odd_outputs_messages_and_names() {
    let f = Fixture::new();
    let img = f.image("x.png", 1);
    let out = f.path("out");
    std::fs::create_dir_all(out.join("results.jsonl")).unwrap();
    let o = f.explain(&out, &[s(&img)]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert_eq!(err.matches("results.jsonl").count(), 1, "{err}");
    assert!(!out.join(".scorecam").exists());

    // A JPEG whose header is garbage: its error is one line of text.
    let bad = f.path("hdr.jpg");
    std::fs::write(&bad, [0xFF, 0xD8, 0xFF, 0xC0, 0x00, 0x04, 0x01, 0xFF, 0xD9]).unwrap();
    let out = f.path("out2");
    let o = f.explain(&out, &[s(&bad)]);
    assert_eq!(o.status.code(), Some(1));
    let lines = results(&out);
    let msg = lines[0]["error"].as_str().unwrap();
    assert!(!msg.contains('\n') && !msg.ends_with(' '), "{msg:?}");

    // Two names that differ only in bytes that are not UTF-8.
    use std::os::unix::ffi::OsStrExt;
    let dir = f.path("names");
    std::fs::create_dir_all(&dir).unwrap();
    for (i, name) in [&b"caf\xe9.png"[..], b"caf\xe8.png"].iter().enumerate() {
        write_png_image(&dir.join(std::ffi::OsStr::from_bytes(name)), i as u8);
    }
    let out = f.path("out3");
    let o = f.explain(&out, &["--save", "npy", s(&dir)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines = results(&out);
    let images: BTreeSet<&str> = lines.iter().map(|l| l["rel"].as_str().unwrap()).collect();
    assert_eq!(
        images.into_iter().collect::<Vec<_>>(),
        ["caf%E8.png", "caf%E9.png"]
    );
    assert!(lines.iter().all(|l| l["escaped"] == true));
    assert!(out
        .join(std::ffi::OsStr::from_bytes(b"caf\xe9.png.npy"))
        .is_file());
    assert!(out
        .join(std::ffi::OsStr::from_bytes(b"caf\xe8.png.npy"))
        .is_file());
}

fn main() -> std::process::ExitCode {
    #[allow(unused_imports)]
    use common::Need::*;
    let t = common::trial;
    common::run_tests(vec![
        t(
            "a_tree_with_equal_names_and_corrupt_files_gives_exact_counts",
            &[],
            a_tree_with_equal_names_and_corrupt_files_gives_exact_counts,
        ),
        t(
            "resume_skips_what_is_done_and_redoes_what_is_missing",
            &[],
            resume_skips_what_is_done_and_redoes_what_is_missing,
        ),
        t(
            "a_killed_run_leaves_no_partial_file_and_resume_completes_it",
            &[],
            a_killed_run_leaves_no_partial_file_and_resume_completes_it,
        ),
        t(
            "shards_partition_the_inputs_exactly_from_flags_slurm_and_kubernetes",
            &[],
            shards_partition_the_inputs_exactly_from_flags_slurm_and_kubernetes,
        ),
        t(
            "manifests_name_files_classes_and_report_bad_lines",
            &[],
            manifests_name_files_classes_and_report_bad_lines,
        ),
        t(
            "several_workers_give_the_same_maps_as_one",
            &[],
            several_workers_give_the_same_maps_as_one,
        ),
        t(
            "top_k_explains_the_best_classes_from_the_same_passes",
            &[],
            top_k_explains_the_best_classes_from_the_same_passes,
        ),
        t(
            "progress_lines_quiet_and_profile",
            &[],
            progress_lines_quiet_and_profile,
        ),
        t(
            "an_output_directory_inside_the_inputs_is_not_read_back",
            &[],
            an_output_directory_inside_the_inputs_is_not_read_back,
        ),
        t(
            "defect_1_a_partial_last_line_is_cut_off",
            &[],
            defect_1_a_partial_last_line_is_cut_off,
        ),
        t(
            "defect_2_huge_batches_are_capped",
            &[],
            defect_2_huge_batches_are_capped,
        ),
        t(
            "defect_3_input_size_is_bounded",
            &[],
            defect_3_input_size_is_bounded,
        ),
        t(
            "defect_5_runs_with_equal_names_never_collide",
            &[],
            defect_5_runs_with_equal_names_never_collide,
        ),
        t(
            "defect_6_a_full_disk_stops_the_job_and_resume_finishes_it",
            &[Root],
            defect_6_a_full_disk_stops_the_job_and_resume_finishes_it,
        ),
        t(
            "defect_7_a_fifo_never_blocks_the_job",
            &[],
            defect_7_a_fifo_never_blocks_the_job,
        ),
        t(
            "defect_9_usage_errors_create_nothing",
            &[],
            defect_9_usage_errors_create_nothing,
        ),
        t(
            "every_method_runs_from_the_command_line",
            &[],
            every_method_runs_from_the_command_line,
        ),
        t(
            "defect_10_odd_outputs_messages_and_names",
            &[],
            defect_10_odd_outputs_messages_and_names,
        ),
    ])
}

/// Every method from the command line: a map per image, the method and its pass counts in the
/// result line; bad method parameters are usage errors.
fn every_method_runs_from_the_command_line() {
    let f = Fixture::new();
    let img = f.image("x.png", 3);
    let flat = {
        let o = f.explain(&f.path("probe"), &["--save", "npy", s(&img)]);
        assert!(o.status.success());
        results(&f.path("probe"))[0]["flat_channels"]
            .as_u64()
            .unwrap()
    };
    for (args, passes) in [
        (&["--method", "gradcam"][..], 0),
        (&["--method", "gradcam++"], 0),
        (&["--method", "faster-scorecam", "--max-channels", "5"], 5),
        (
            &[
                "--method",
                "sscam",
                "--samples",
                "3",
                "--sigma",
                "0.5",
                "--seed",
                "9",
            ],
            3 * 24,
        ),
        (&["--method", "iscam", "--steps", "4"], 4 * (24 - flat)),
    ] {
        let out = f.path(&format!("out-{}", args[1]));
        let mut all = vec!["--save", "npy"];
        all.extend_from_slice(args);
        all.push(s(&img));
        let o = f.explain(&out, &all);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        let line = &results(&out)[0];
        assert_eq!(line["method"], args[1], "{args:?}");
        let got = line["masked_passes"].as_u64().unwrap();
        if args[1] == "faster-scorecam" {
            assert!(got <= passes, "{args:?}: {got} passes");
        } else {
            assert_eq!(got, passes, "{args:?}");
        }
        let (map, _) = scorecam_gpu::image::read_npy(&out.join("x.png.npy")).unwrap();
        assert!(map.iter().all(|v| (0.0..=1.0).contains(v)), "{args:?}");
    }
    for bad in [
        &["--method", "faster-scorecam", "--max-channels", "0"][..],
        &["--method", "faster-scorecam", "--max-channels", "25"],
        &["--method", "sscam", "--samples", "0"],
        &["--method", "iscam", "--steps", "0"],
        &["--method", "gradcam+"],
    ] {
        let out = f.path("bad");
        let mut all = bad.to_vec();
        all.push(s(&img));
        let o = f.explain(&out, &all);
        assert_eq!(o.status.code(), Some(2), "{bad:?}: {}", stderr(&o));
        assert!(!out.exists());
    }
}
