//! The `explain` job: images in, maps and a results.jsonl line per image out. Every file is
//! written atomically; a failing image gets an error line and the others go on.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::json;

use crate::cam::Explanation;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::image::{self as img, ResizeMode};

/// Where and how to write results.
pub struct JobOptions {
    pub out_dir: PathBuf,
    pub resize: ResizeMode,
    /// Also write `<stem>.heatmap.png` and `<stem>.overlay.png`.
    pub pngs: bool,
    pub progress: bool,
}

/// How many images succeeded and failed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct JobSummary {
    pub ok: usize,
    pub failed: usize,
}

/// Create the output directory and prove it is writable before any work is done.
pub fn prepare_out_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::output(dir, format!("cannot create directory: {e}")))?;
    let probe = dir.join(format!(".scorecam-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .map_err(|e| Error::output(dir, format!("directory is not writable: {e}")))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Run the job over `paths`. Returns the summary; only a failure to write results.jsonl itself
/// aborts the job.
pub fn run(engine: &mut Engine, paths: &[PathBuf], opts: &JobOptions) -> Result<JobSummary> {
    let s = engine.input_size();
    let mode = engine.semantics().name();
    let results = opts.out_dir.join("results.jsonl");
    let mut stems = HashSet::new();
    let mut summary = JobSummary::default();
    let bar = progress_bar(paths.len(), opts.progress);
    for chunk in paths.chunks(engine.image_batch()) {
        // Decode; images that fail are reported now and left out of the batch.
        let (mut names, mut rgbs): (Vec<&PathBuf>, Vec<Vec<u8>>) = (Vec::new(), Vec::new());
        for path in chunk {
            match img::load_rgb(path, s, opts.resize) {
                Ok(rgb) => {
                    names.push(path);
                    rgbs.push(rgb);
                }
                Err(e) => {
                    summary.failed += 1;
                    report_error(&results, path, &e)?;
                }
            }
        }
        if rgbs.is_empty() {
            bar.inc(chunk.len() as u64);
            continue;
        }
        let t0 = Instant::now();
        let explained = engine.explain(&rgbs);
        let ms = t0.elapsed().as_secs_f64() * 1e3 / rgbs.len() as f64;
        match explained {
            Ok(explanations) => {
                for ((path, rgb), ex) in names.iter().zip(&rgbs).zip(&explanations) {
                    let stem = unique_stem(path, &mut stems);
                    match write_outputs(engine, path, &stem, rgb, ex, s, mode, ms, opts, &results) {
                        Ok(()) => summary.ok += 1,
                        Err(e) => {
                            summary.failed += 1;
                            report_error(&results, path, &e)?;
                        }
                    }
                }
            }
            Err(e) => {
                for path in &names {
                    summary.failed += 1;
                    report_error(&results, path, &e)?;
                }
            }
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(summary)
}

fn progress_bar(n: usize, show: bool) -> indicatif::ProgressBar {
    if !show || n < 2 {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(n as u64);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} images, {per_sec}, eta {eta}")
    {
        bar.set_style(style);
    }
    bar
}

/// `report_error` prints the failure and appends its results line.
fn report_error(results: &Path, path: &Path, e: &Error) -> Result<()> {
    eprintln!("error: {e}");
    let line = json!({ "image": path.to_string_lossy(), "error": e.to_string() });
    img::append_line(results, &line.to_string())
}

/// The file stem for an image's outputs; a stem seen before gets `-2`, `-3`, ... appended so
/// `a/x.png` and `b/x.png` do not overwrite each other.
fn unique_stem(path: &Path, used: &mut HashSet<String>) -> String {
    let base = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "image".into());
    let mut stem = base.clone();
    let mut i = 1;
    while !used.insert(stem.clone()) {
        i += 1;
        stem = format!("{base}-{i}");
    }
    stem
}

#[allow(clippy::too_many_arguments)]
fn write_outputs(
    engine: &Engine,
    path: &Path,
    stem: &str,
    rgb: &[u8],
    ex: &Explanation,
    s: usize,
    mode: &str,
    ms: f64,
    opts: &JobOptions,
    results: &Path,
) -> Result<()> {
    let labels = engine.labels();
    let single = ex.maps.len() == 1;
    let mut lines = Vec::new();
    for m in &ex.maps {
        let name = if single {
            stem.to_string()
        } else {
            format!("{stem}.class{}", m.class)
        };
        let npy = opts.out_dir.join(format!("{name}.npy"));
        img::write_npy(&npy, &m.map, &[s as u64, s as u64])?;
        if opts.pngs {
            let side = s as u32;
            img::write_png(
                &opts.out_dir.join(format!("{name}.heatmap.png")),
                &img::colormap_jet(&m.map),
                side,
                side,
            )?;
            img::write_png(
                &opts.out_dir.join(format!("{name}.overlay.png")),
                &img::overlay(rgb, &m.map, 0.5),
                side,
                side,
            )?;
        }
        lines.push(json!({
            "image": path.to_string_lossy(),
            "class": m.class,
            "label": labels.and_then(|l| l.get(m.class)),
            "score": m.score,
            "mode": mode,
            "flat_channels": ex.flat_channels,
            "flat_map": m.flat,
            "map": npy.to_string_lossy(),
            "ms": (ms * 1000.0).round() / 1000.0,
        }));
    }
    // Lines only after every file of the image is in place: a line always points at real files.
    for line in lines {
        img::append_line(results, &line.to_string())?;
    }
    Ok(())
}
