//! The batch job streams its inputs: a manifest of 10 million lines starts explaining as fast as
//! one of 1,000, in the same memory. `cargo bench --bench job_startup [-- LINES...]` writes
//! manifests of each size (every line a real image under a temporary directory), runs
//! `scorecam-gpu explain --manifest` on the CPU with a tiny model, and reports the time until the
//! first image is explained and the process's resident memory then and 5 s later (it keeps
//! streaming), before stopping it.

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use scorecam_gpu::Vgg;

/// Resident memory of a process in MiB (VmRSS from /proc).
fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

fn main() {
    let sizes: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![1_000, 10_000_000]
    } else {
        sizes
    };
    let dir = tempfile::tempdir().unwrap();
    let model = Vgg::random_from_config(&[8, 0, 16, 0, 24, 0], &[16, 10], 5, 32);
    let weights = dir.path().join("tiny.safetensors");
    scorecam_gpu::weights::save(&model, &weights, "F32").unwrap();
    let imgs = dir.path().join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    for i in 0..100u32 {
        let img = image::RgbImage::from_fn(48, 40, |x, y| {
            image::Rgb([(x * 5 + i) as u8, (y * 6) as u8, (x ^ y) as u8])
        });
        img.save(imgs.join(format!("{i}.png"))).unwrap();
    }
    println!(
        "{:>12} {:>12} {:>14} {:>16} {:>16}",
        "lines", "file MiB", "first image s", "RSS then MiB", "RSS +5 s MiB"
    );
    for &n in &sizes {
        let manifest = dir.path().join(format!("manifest-{n}.txt"));
        {
            let mut w = BufWriter::new(std::fs::File::create(&manifest).unwrap());
            for i in 0..n {
                // 100 real files, named again and again: the reader's work per line is the same.
                writeln!(w, "imgs/{}.png", i % 100).unwrap();
            }
        }
        let size = std::fs::metadata(&manifest).unwrap().len() as f64 / (1 << 20) as f64;
        let (first, rss_first, rss_later) =
            run(&weights, &manifest, &dir.path().join(format!("out-{n}")));
        println!("{n:>12} {size:>12.1} {first:>14.3} {rss_first:>16.1} {rss_later:>16.1}");
        let _ = std::fs::remove_file(&manifest);
    }
}

/// Seconds to the first explained image, RSS then and 5 s later.
fn run(weights: &Path, manifest: &Path, out: &Path) -> (f64, f64, f64) {
    let t0 = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_scorecam-gpu"))
        .args([
            "explain",
            "--backend",
            "cpu",
            "--save",
            "npy",
            "--log-every",
            "0.01",
        ])
        .arg("--weights")
        .arg(weights)
        .arg("--manifest")
        .arg(manifest)
        .arg("--out")
        .arg(out)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut first = f64::NAN;
    for line in lines.by_ref() {
        let line = line.unwrap();
        // "progress: N explained, ..." once N > 0.
        if let Some(rest) = line.strip_prefix("progress: ") {
            let explained: u64 = rest
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            if explained > 0 {
                first = t0.elapsed().as_secs_f64();
                break;
            }
        }
    }
    let rss_first = rss_mib(pid);
    // Keep draining stderr so the child never blocks on it.
    let drain = std::thread::spawn(move || for _ in lines {});
    std::thread::sleep(Duration::from_secs(5));
    let rss_later = rss_mib(pid);
    let _ = child.kill();
    let _ = child.wait();
    let _ = drain.join();
    (first, rss_first, rss_later)
}
