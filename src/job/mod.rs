//! The batch job: inputs → decode → explain → write, as a pipeline of thread pools joined by
//! bounded channels, so the GPU never waits for the host and nothing grows without bound.
//!
//! One image, followed through the files of this module:
//! 1. [`inputs`]: the reader walks directories / reads the manifest, checks the file without
//!    opening it, drops what another shard ([`shard`]) or an earlier run (`--resume`, [`results`])
//!    already covers, and numbers what is left;
//! 2. [`pipeline`]: a decode pool (`--jobs`) decodes and resizes; the images are put back in input
//!    order and grouped (`--image-batch`), so groups never depend on timing; one worker per device
//!    explains whole groups, handed out to whichever device is free; a write pool encodes the
//!    NPY/PNG files and writes each image's files as one transaction ([`outputs`]);
//! 3. the committer (the calling thread) makes groups of images durable with one sync and one
//!    append of their lines to `results.jsonl` ([`results`]), and drives progress ([`progress`])
//!    and the `--profile` table ([`profile`]).

pub mod inputs;
pub mod outputs;
pub mod pipeline;
pub mod profile;
pub mod progress;
pub mod results;
pub mod shard;

use std::path::PathBuf;

use crate::backend::Stage;
use crate::cam::{Explanation, Targets};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::image::ResizeMode;

pub use inputs::Source;
pub use shard::Shard;

/// An output file kind (`--save`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Save {
    /// The map, f32 `[S, S]` in [0, 1].
    Npy,
    /// The map in the jet colormap.
    Heatmap,
    /// The heatmap over the image the model saw.
    Overlay,
}

impl Save {
    pub const ALL: [Save; 3] = [Save::Npy, Save::Heatmap, Save::Overlay];

    /// The file name suffix after the input's name (and class).
    pub fn suffix(self) -> &'static str {
        match self {
            Save::Npy => ".npy",
            Save::Heatmap => ".heatmap.png",
            Save::Overlay => ".overlay.png",
        }
    }

    /// The name on the command line (`--save`).
    pub fn name(self) -> &'static str {
        match self {
            Save::Npy => "npy",
            Save::Heatmap => "heatmap",
            Save::Overlay => "overlay",
        }
    }

    /// The key of the file's path in a result line.
    pub fn field(self) -> &'static str {
        match self {
            Save::Npy => "map",
            Save::Heatmap => "heatmap",
            Save::Overlay => "overlay",
        }
    }

    /// Parse `--save npy,heatmap,overlay` (each at most once, at least one).
    pub fn parse_list(items: &[String]) -> Result<Vec<Save>> {
        let mut out = Vec::new();
        for item in items {
            let s = Save::ALL
                .into_iter()
                .find(|s| s.name() == item.trim())
                .ok_or_else(|| {
                    Error::Usage(format!(
                        "--save {item}: unknown kind (expected npy, heatmap, overlay)"
                    ))
                })?;
            if !out.contains(&s) {
                out.push(s);
            }
        }
        if out.is_empty() {
            return Err(Error::Usage(
                "--save needs at least one of npy, heatmap, overlay".into(),
            ));
        }
        Ok(out)
    }
}

/// How much the job reports while it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verbosity {
    /// Progress bars on a terminal, periodic log lines otherwise; notices and per-image errors.
    Normal,
    /// Only fatal errors.
    Quiet,
}

/// Everything the job needs besides its workers.
#[derive(Clone, Debug)]
pub struct JobOptions {
    pub source: Source,
    /// The root the output tree mirrors (see [`inputs`]); checked against the tree's record.
    pub root: PathBuf,
    pub out_dir: PathBuf,
    pub resize: ResizeMode,
    pub saves: Vec<Save>,
    /// Skip inputs whose outputs and result lines exist.
    pub resume: bool,
    pub shard: Shard,
    /// Decode threads (the write pool has as many).
    pub jobs: usize,
    /// Images explained together by a worker.
    pub image_batch: usize,
    /// Targets of inputs whose manifest line names none.
    pub targets: Targets,
    pub verbosity: Verbosity,
    /// Print the per-stage table at the end.
    pub profile: bool,
    /// Seconds between progress log lines when stderr is not a terminal.
    pub log_every: f64,
}

/// What the model and explainer tell the job.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub input_size: usize,
    pub num_classes: usize,
    pub labels: Option<Vec<String>>,
    pub mode: &'static str,
    pub method: &'static str,
    pub layer: String,
    /// `fp16` or `fp8` (the masked forwards' convolutions).
    pub precision: &'static str,
}

/// Counts at the end of a job.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    /// Images with committed result lines and files.
    pub explained: u64,
    /// Inputs with an error line.
    pub failed: u64,
    /// Inputs skipped by `--resume`.
    pub skipped: u64,
    pub wall_s: f64,
    /// The error that stopped the job early (a full disk, every device failing, results.jsonl
    /// unwritable). Inputs not reached have no line; `--resume` continues.
    pub stopped: Option<String>,
    /// The `--profile` table, when asked for.
    pub profile: Option<String>,
    pub run: String,
}

impl Summary {
    /// 0: every input explained; 1: some failed or the job stopped early.
    pub fn exit_code(&self) -> u8 {
        if self.failed == 0 && self.stopped.is_none() {
            0
        } else {
            1
        }
    }
}

/// One explaining device: a worker of the pipeline. The pool is generic over it, so the
/// scheduling is tested with several CPU workers.
pub trait Worker: Send {
    /// E.g. `cuda:1` or `cpu`.
    fn name(&self) -> String;
    /// Explain `images` (S×S RGB) for their targets.
    fn explain(&mut self, images: &[Vec<u8>], targets: &[Targets]) -> Result<Vec<Explanation>>;
    /// Per-stage device time since the last call (empty unless profiling was turned on).
    fn stage_times(&mut self) -> Vec<(Stage, f64)>;
    /// Turn per-stage timing on.
    fn set_profiling(&mut self, on: bool);
    /// Masked-pass counts for the progress display.
    fn pass_counter(&mut self) -> std::sync::Arc<crate::cam::PassCounter>;
    /// Does a single image take long enough that masked passes should be shown?
    fn is_slow(&self) -> bool;
}

/// An [`Engine`] as a pipeline worker.
pub struct EngineWorker {
    pub engine: Engine,
    pub name: String,
    counter: std::sync::Arc<crate::cam::PassCounter>,
}

impl EngineWorker {
    pub fn new(mut engine: Engine, name: String) -> EngineWorker {
        let counter = std::sync::Arc::new(crate::cam::PassCounter::default());
        engine.set_pass_counter(counter.clone());
        EngineWorker {
            engine,
            name,
            counter,
        }
    }
}

impl Worker for EngineWorker {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn explain(&mut self, images: &[Vec<u8>], targets: &[Targets]) -> Result<Vec<Explanation>> {
        self.engine.explain_for(images, targets)
    }

    fn stage_times(&mut self) -> Vec<(Stage, f64)> {
        self.engine.take_stage_times().unwrap_or_default()
    }

    fn set_profiling(&mut self, on: bool) {
        self.engine.set_profiling(on);
    }

    fn pass_counter(&mut self) -> std::sync::Arc<crate::cam::PassCounter> {
        self.counter.clone()
    }

    fn is_slow(&self) -> bool {
        self.engine.is_cpu()
    }
}

/// A unique id for this invocation: UTC start time, host name, process id.
pub fn run_id() -> String {
    let t = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let compact: String = t.chars().filter(|c| *c != '-' && *c != ':').collect();
    format!("{compact}-{}-{}", host_name(), std::process::id())
}

fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = if ok {
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.is_empty() {
        "host".into()
    } else {
        clean
    }
}

/// Run the job with `workers` (one per device). Creates the output directory and everything in
/// it; the caller has validated options, model and backend before (nothing is written when they
/// are wrong). Per-image failures are error lines; a returned error means the job could not
/// start (its output directory could not be prepared).
pub fn run(workers: Vec<Box<dyn Worker>>, model: ModelInfo, opts: &JobOptions) -> Result<Summary> {
    pipeline::run(workers, model, opts)
}
