//! The `scorecam-gpu` command line: explain (alias run), bench, inspect.
//! Exit codes: 0 all images succeeded, 1 some failed (or a run-time failure), 2 usage, weights or
//! backend-selection errors.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use scorecam_gpu::backend::cuda::CudaBackend;
use scorecam_gpu::backend::{Precision, Semantics};
use scorecam_gpu::cam::{CamOptions, Method, Targets};
use scorecam_gpu::engine::{load_model, BackendChoice, Engine};
use scorecam_gpu::image::ResizeMode;
use scorecam_gpu::job::{
    self, inputs, outputs, shard, EngineWorker, JobOptions, Save, Source, Verbosity,
};
use scorecam_gpu::model::FeatureStage;
use scorecam_gpu::{eval, Error, Result, Vgg};

#[derive(Parser)]
#[command(
    name = "scorecam-gpu",
    version,
    about = "Score-CAM explanations for VGG-family image classifiers, on NVIDIA GPUs or the CPU",
    long_about = "Score-CAM explanations for VGG-family image classifiers.\n\n\
        Score-CAM masks the input with every channel of a conv layer's activations and weights each \
        channel by the class score its masked input gets (512 extra VGG16 forward passes per image). \
        This tool runs them batched on CUDA (cuDNN/cuBLAS, FP16) or on the CPU (f32 reference)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Explain images: write a map (.npy), a heatmap and an overlay (.png) per image and a line
    /// per image to DIR/results.jsonl.
    #[command(visible_alias = "run")]
    Explain(Box<ExplainArgs>),
    /// Benchmark Score-CAM (VGG16 224², random weights unless --weights) and report ms/image,
    /// a per-stage breakdown and the masked forwards' TFLOP/s.
    Bench(BenchArgs),
    /// Measure how faithful the methods' maps are over a set of images: Average Drop, Increase
    /// in Confidence, Deletion/Insertion AUC, the energy-based pointing game (with boxes), and
    /// with --sanity the cascading-randomization sanity check.
    Eval(Box<EvalArgs>),
    /// Print the model's layers, parameter count, input size, labels and dtypes.
    Inspect(ModelArgs),
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    inputs: InputArgs,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    cam: CamArgs,
    /// The methods to compare, comma separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "scorecam,gradcam,gradcam++"
    )]
    methods: Vec<MethodArg>,
    #[command(flatten)]
    params: MethodParams,
    /// The class every map explains. Default: each image's top-1.
    #[arg(long = "class", value_name = "N")]
    class: Option<usize>,
    /// crop: shorter side to S then centre crop; stretch: resize to S×S.
    #[arg(long, value_enum, default_value = "crop")]
    resize: ResizeArg,
    /// Pixels removed or inserted per step of the deletion/insertion games. Default: S (RISE's
    /// 224 at 224²).
    #[arg(long, value_name = "N")]
    step: Option<usize>,
    /// What deleted pixels become: zeros (of the normalized input) or blur (RISE's blurred copy).
    #[arg(long, value_enum, default_value = "zeros")]
    deletion_baseline: BaselineArg,
    /// What pixels are inserted into: blur (RISE's default) or zeros.
    #[arg(long, value_enum, default_value = "blur")]
    insertion_baseline: BaselineArg,
    /// Bounding boxes for the pointing game: a CSV file (image,xmin,ymin,xmax,ymax[,label]) or a
    /// directory of Pascal VOC annotations (<image stem>.xml).
    #[arg(long, value_name = "PATH")]
    boxes: Option<PathBuf>,
    /// Also run the sanity check (Adebayo et al. 2018): randomize the layers from the top down
    /// and report the rank correlation of the maps with the original ones.
    #[arg(long)]
    sanity: bool,
    /// The sanity check's seed for the random weights.
    #[arg(long, value_name = "SEED", default_value = "0")]
    sanity_seed: u64,
    /// table, csv or json (stdout).
    #[arg(long, value_enum, default_value = "table")]
    format: FormatArg,
    /// Where to write the deletion/insertion curves (PNG).
    #[arg(long, value_name = "PNG", default_value = "eval-curves.png")]
    plot: PathBuf,
    /// Do not write the PNG.
    #[arg(long)]
    no_plot: bool,
    /// Print no per-image errors or notices.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum BaselineArg {
    Zeros,
    Blur,
}

impl From<BaselineArg> for eval::Baseline {
    fn from(b: BaselineArg) -> Self {
        match b {
            BaselineArg::Zeros => eval::Baseline::Zeros,
            BaselineArg::Blur => eval::Baseline::Blur,
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum FormatArg {
    Table,
    Csv,
    Json,
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// safetensors weights (torchvision or timm VGG names). Default: $SCORECAM_WEIGHTS, then
    /// weights/vgg16.safetensors, then the Hugging Face cache of timm/vgg16.tv_in1k (downloaded
    /// if missing unless HF_HUB_OFFLINE=1).
    #[arg(long, value_name = "PATH", conflicts_with = "random_weights")]
    weights: Option<PathBuf>,
    /// Use a deterministic He-initialised VGG16 built in memory instead of a weights file.
    #[arg(long, value_name = "SEED")]
    random_weights: Option<u64>,
    /// Model input side S (default: the file's `input_size` metadata, else 224).
    #[arg(long, value_name = "S")]
    input_size: Option<usize>,
}

#[derive(Args, Clone)]
struct CamArgs {
    /// auto: CUDA when a usable GPU is found, else CPU.
    #[arg(long, value_enum, default_value = "auto")]
    backend: BackendChoice,
    /// official (haofanwang/Score-CAM) or channel-softmax (pytorch-grad-cam ScoreCAM).
    #[arg(long, value_enum, default_value = "official")]
    mode: Mode,
    /// Target layer `features.N` (conv, ReLU or pool index, torchvision numbering).
    /// Default: the last conv's ReLU output (VGG16: features.29).
    #[arg(long, value_name = "features.N")]
    layer: Option<String>,
    /// Masked inputs per forward pass (bounds memory). Default: 256 on CUDA, 8 on the CPU (a
    /// VGG16 forward on the CPU costs no more per input at 8 than at 32, and progress moves
    /// every few seconds).
    #[arg(long, value_name = "N")]
    mask_batch: Option<usize>,
    /// Images whose masked inputs share forward passes. Default: 8 on CUDA, 1 on the CPU.
    #[arg(long, value_name = "N")]
    image_batch: Option<usize>,
    /// Number format of the masked forwards' convolutions. fp8: E4M3 inputs and weights with
    /// per-layer scales from each image group's base forward, on the conv layers where it runs
    /// faster than FP16 (timed at set-up); needs a CUDA GPU of compute capability 8.9 or newer.
    #[arg(long, value_enum, default_value = "fp16")]
    precision: PrecisionArg,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum PrecisionArg {
    Fp16,
    Fp8,
}

impl From<PrecisionArg> for Precision {
    fn from(p: PrecisionArg) -> Precision {
        match p {
            PrecisionArg::Fp16 => Precision::Fp16,
            PrecisionArg::Fp8 => Precision::Fp8,
        }
    }
}

/// The methods' parameters.
#[derive(Args, Clone)]
struct MethodParams {
    /// faster-scorecam: channels kept.
    #[arg(long, value_name = "N", default_value = "10")]
    max_channels: usize,
    /// sscam: noisy copies of every mask.
    #[arg(long, value_name = "N", default_value = "35")]
    samples: usize,
    /// sscam: standard deviation of the noise added to the masks.
    #[arg(long, value_name = "SIGMA", default_value = "2.0")]
    sigma: f32,
    /// sscam: the noise's seed (runs with the same seed give the same maps, on any backend).
    #[arg(long, value_name = "SEED", default_value = "0")]
    seed: u64,
    /// iscam: integration steps.
    #[arg(long, value_name = "N", default_value = "10")]
    steps: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum MethodArg {
    Scorecam,
    FasterScorecam,
    Sscam,
    Iscam,
    Gradcam,
    #[value(name = "gradcam++")]
    GradcamPp,
}

impl MethodParams {
    fn method(&self, m: MethodArg) -> Method {
        match m {
            MethodArg::Scorecam => Method::ScoreCam,
            MethodArg::FasterScorecam => Method::FasterScoreCam {
                max_channels: self.max_channels,
            },
            MethodArg::Sscam => Method::SsCam {
                samples: self.samples,
                sigma: self.sigma,
                seed: self.seed,
            },
            MethodArg::Iscam => Method::IsCam { steps: self.steps },
            MethodArg::Gradcam => Method::GradCam,
            MethodArg::GradcamPp => Method::GradCamPlusPlus,
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Mode {
    Official,
    ChannelSoftmax,
}

impl From<Mode> for Semantics {
    fn from(m: Mode) -> Self {
        match m {
            Mode::Official => Semantics::Official,
            Mode::ChannelSoftmax => Semantics::ChannelSoftmax,
        }
    }
}

/// Where the images come from.
#[derive(Args)]
struct InputArgs {
    /// Image files and directories (searched recursively for PNG, JPEG, BMP, GIF, TIFF, WebP).
    #[arg(value_name = "IMAGES", required_unless_present = "manifest")]
    images: Vec<PathBuf>,
    /// Read the inputs from FILE (`-`: stdin), one per line: a path (relative to the manifest's
    /// directory), or JSON like {"path": "a.jpg", "class": 3} / {"path": ..., "classes": [3, 7]}.
    #[arg(long, value_name = "FILE", conflicts_with = "images")]
    manifest: Option<PathBuf>,
}

impl InputArgs {
    fn source(&self) -> Source {
        match &self.manifest {
            Some(m) => Source::Manifest(m.clone()),
            None => Source::Paths(self.images.clone()),
        }
    }
}

#[derive(Args)]
struct ExplainArgs {
    #[command(flatten)]
    inputs: InputArgs,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    cam: CamArgs,
    /// scorecam (per --mode), faster-scorecam (the --max-channels channels of largest spatial
    /// std, tf-keras-vis), sscam / iscam (torchcam 0.5.0), gradcam / gradcam++ (pytorch-grad-cam).
    #[arg(long, value_enum, default_value = "scorecam")]
    method: MethodArg,
    #[command(flatten)]
    params: MethodParams,
    /// crop: shorter side to S then centre crop (the reference transform); stretch: resize to S×S.
    #[arg(long, value_enum, default_value = "crop")]
    resize: ResizeArg,
    /// Target class(es), comma separated; they share the masked passes. Default: top-1.
    #[arg(
        long = "class",
        value_name = "N",
        value_delimiter = ',',
        conflicts_with = "top_k"
    )]
    classes: Vec<usize>,
    /// Explain the K best classes of each image (a map and a result line per class), from the
    /// same masked passes.
    #[arg(long, value_name = "K")]
    top_k: Option<usize>,
    /// Output directory: mirrors the input tree, holds results.jsonl.
    #[arg(long, value_name = "DIR", default_value = "scorecam-out")]
    out: PathBuf,
    /// The directory the output tree mirrors. Default: the deepest directory holding every
    /// IMAGES argument; for --manifest, / (outputs keep the inputs' absolute paths).
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Files to write per map, comma separated: npy, heatmap, overlay.
    #[arg(
        long,
        value_name = "KINDS",
        value_delimiter = ',',
        default_value = "npy,heatmap,overlay"
    )]
    save: Vec<String>,
    /// Same as --save npy.
    #[arg(long, conflicts_with = "save")]
    no_png: bool,
    /// Skip inputs whose outputs and result line already exist (continue a stopped job).
    #[arg(long)]
    resume: bool,
    /// Explain only shard I of N (a partition by relative path). Default: from a Slurm job
    /// array's variables or a Kubernetes Indexed Job's JOB_COMPLETION_INDEX when set.
    #[arg(long, value_name = "I/N")]
    shard: Option<String>,
    /// Number of shards for JOB_COMPLETION_INDEX (the Job's completions).
    #[arg(long, value_name = "N")]
    shard_count: Option<u64>,
    /// Decode threads (and as many write threads). Default: the number of cores.
    #[arg(long, value_name = "N")]
    jobs: Option<usize>,
    /// CUDA devices to use, one worker each: a list like 0,1 or `all`. Default: 0.
    #[arg(long, value_name = "LIST")]
    devices: Option<String>,
    /// Engine workers on the CPU backend (each explains whole image groups).
    #[arg(long, value_name = "N", default_value = "1")]
    workers: usize,
    /// Print no progress, notices or per-image errors (fatal errors still are).
    #[arg(long, short)]
    quiet: bool,
    /// Print where the time went at the end: host stages, device stages, device-busy fraction.
    #[arg(long)]
    profile: bool,
    /// Seconds between progress lines when stderr is not a terminal.
    #[arg(long, value_name = "SECS", default_value = "10", hide = true)]
    log_every: f64,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ResizeArg {
    Crop,
    Stretch,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    cam: CamArgs,
    /// Image counts to time, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    images: Vec<usize>,
    /// Time plain forward passes at these batch sizes instead of Score-CAM.
    #[arg(long, value_delimiter = ',', value_name = "BATCHES")]
    forward: Vec<usize>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Time the batch job's host stages instead: decode + resize of a 12-megapixel JPEG and
    /// encode + write of the outputs, per core and on every core, and the cores one GPU needs.
    #[arg(long)]
    host: bool,
    /// With --host: the engine's ms per image the host must keep up with (default: 29.4, the
    /// H100 figure measured on 2026-11-27 at 8 images, official mode).
    #[arg(long, value_name = "MS", default_value = "29.4")]
    engine_ms: f64,
    /// With --host: threads for the all-cores run (default: the cores).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
}

fn main() -> ExitCode {
    // Output piped into `head` and closed early: end quietly like other Unix tools, not with a
    // "Broken pipe" panic from println!.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Explain(a) => explain(*a),
        Command::Bench(a) => bench(a),
        Command::Eval(a) => evaluate(*a),
        Command::Inspect(a) => inspect(a),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

fn cam_options(cam: &CamArgs, targets: Targets, cuda: bool) -> CamOptions {
    CamOptions {
        method: Method::ScoreCam,
        semantics: cam.mode.into(),
        layer: cam.layer.clone(),
        targets,
        mask_batch: cam.mask_batch.unwrap_or(if cuda { 256 } else { 8 }),
        image_batch: cam.image_batch.unwrap_or(if cuda { 8 } else { 1 }),
        precision: cam.precision.into(),
    }
}

/// Resolve `--backend` to CUDA or not, probing once: `auto` without a usable GPU notes it and
/// uses the CPU; `cuda` without one is an error. Returns the CUDA device count (0: the CPU).
fn cuda_devices(choice: BackendChoice, quiet: bool) -> Result<usize> {
    match choice {
        BackendChoice::Cpu => Ok(0),
        BackendChoice::Cuda => CudaBackend::device_count(),
        BackendChoice::Auto => match CudaBackend::device_count() {
            Ok(n) => Ok(n),
            Err(e) => {
                if !quiet {
                    eprintln!("notice: no usable GPU ({e}); running on the CPU");
                }
                Ok(0)
            }
        },
    }
}

/// Open the engine for `bench`: one device, the defaults of its backend.
fn open_engine(m: &ModelArgs, cam: &CamArgs, targets: Targets, progress: bool) -> Result<Engine> {
    let model = load_model(
        m.weights.as_deref(),
        m.random_weights,
        m.input_size,
        progress,
    )?;
    let cuda = cuda_devices(cam.backend, false)? > 0;
    let choice = if cuda {
        BackendChoice::Cuda
    } else {
        BackendChoice::Cpu
    };
    Engine::new(choice, 0, model, cam_options(cam, targets, cuda))
}

/// `--devices 0,2` / `all` against `count` devices.
fn parse_devices(spec: Option<&str>, count: usize) -> Result<Vec<usize>> {
    let spec = spec.unwrap_or("0").trim();
    if spec == "all" {
        return Ok((0..count).collect());
    }
    let mut out = Vec::new();
    for part in spec.split(',') {
        let d: usize = part.trim().parse().map_err(|_| {
            Error::Usage(format!("--devices {spec}: `{part}` is not a device number"))
        })?;
        if d >= count {
            return Err(Error::Usage(format!(
                "--devices {spec}: device {d} does not exist ({count} CUDA device(s): 0..={})",
                count - 1
            )));
        }
        if !out.contains(&d) {
            out.push(d);
        }
    }
    Ok(out)
}

fn explain(a: ExplainArgs) -> Result<u8> {
    let quiet = a.quiet;
    let notice = |msg: String| {
        if !quiet {
            eprintln!("notice: {msg}");
        }
    };
    // 1. Options, inputs and the output directory: checked before anything is loaded or written.
    let saves = if a.no_png {
        vec![Save::Npy]
    } else {
        Save::parse_list(&a.save)?
    };
    let targets = match a.top_k {
        Some(k) => Targets::Top(k),
        None if a.classes.is_empty() => Targets::Top(1),
        None => Targets::classes(a.classes.iter().copied()),
    };
    let (shard, shard_from) = shard::resolve(a.shard.as_deref(), a.shard_count, &|k| {
        std::env::var(k).ok()
    })?;
    if let Some(from) = shard_from {
        notice(format!("explaining shard {shard} (from {from})"));
    }
    if a.jobs == Some(0) || a.workers == 0 {
        return Err(Error::Usage(
            "--jobs and --workers must be at least 1".into(),
        ));
    }
    if a.log_every.is_nan() || a.log_every <= 0.0 {
        return Err(Error::Usage("--log-every must be positive".into()));
    }
    let source = a.inputs.source();
    outputs::check_out_dir(&a.out)?;
    let root = outputs::choose_root(&a.out, &inputs::tree_root(&source, a.root.as_deref())?)?;

    // 2. The model and the backend.
    let model = load_model(
        a.model.weights.as_deref(),
        a.model.random_weights,
        a.model.input_size,
        !quiet,
    )?;
    targets.check(model.num_classes()).map_err(|m| {
        // The messages read "class N is out of range ..." / "--top-k K ...".
        Error::Usage(if a.top_k.is_some() {
            m
        } else {
            format!("--{m}")
        })
    })?;
    let count = cuda_devices(a.cam.backend, quiet)?;
    let cuda = count > 0;
    let ordinals = if cuda {
        if a.workers != 1 {
            return Err(Error::Usage(
                "--workers is for the CPU backend; on CUDA use --devices".into(),
            ));
        }
        parse_devices(a.devices.as_deref(), count)?
    } else {
        if a.devices.is_some() {
            return Err(Error::Usage("--devices needs the CUDA backend".into()));
        }
        (0..a.workers).collect()
    };
    let mut cam = cam_options(&a.cam, targets.clone(), cuda);
    cam.method = a.params.method(a.method);
    // Groups never exceed the number of inputs when it is known (files only, no directories).
    if let Source::Paths(p) = &source {
        if p.iter().all(|p| !p.is_dir()) {
            cam.image_batch = cam.image_batch.min(p.len().max(1));
        }
    }
    let choice = if cuda {
        BackendChoice::Cuda
    } else {
        BackendChoice::Cpu
    };
    let engines = open_engines(choice, &ordinals, &model, &cam)?;
    let info = job::ModelInfo {
        input_size: model.input_size(),
        num_classes: model.num_classes(),
        labels: model.meta.labels.clone(),
        mode: cam.method.semantics(a.cam.mode.into()).name(),
        method: cam.method.name(),
        layer: engines[0].layer_name(),
        precision: cam.precision.name(),
    };
    let image_batch = engines[0].image_batch();
    let layer = info.layer.clone();
    let mut described = Vec::new();
    let workers: Vec<Box<dyn job::Worker>> = engines
        .into_iter()
        .zip(&ordinals)
        .map(|(mut e, &o)| {
            described.push(e.describe());
            let name = if cuda {
                format!("cuda:{o}")
            } else {
                format!("cpu:{o}")
            };
            Box::new(EngineWorker::new(e, name)) as Box<dyn job::Worker>
        })
        .collect();
    let opts = JobOptions {
        source,
        root,
        out_dir: a.out.clone(),
        resize: match a.resize {
            ResizeArg::Crop => ResizeMode::Crop,
            ResizeArg::Stretch => ResizeMode::Stretch,
        },
        saves,
        resume: a.resume,
        shard,
        jobs: a
            .jobs
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        image_batch,
        targets,
        verbosity: if quiet {
            Verbosity::Quiet
        } else {
            Verbosity::Normal
        },
        profile: a.profile,
        log_every: a.log_every,
    };

    // 3. The job. Errors before its first input (the output directory) are set-up errors.
    let summary = job::run(workers, info, &opts).map_err(|e| match e {
        Error::Output { .. } | Error::Io { .. } => Error::Usage(e.to_string()),
        other => other,
    })?;
    if let Some(table) = &summary.profile {
        eprint!("{table}");
    }
    if let Some(reason) = &summary.stopped {
        eprintln!("error: the job stopped early: {reason}");
    }
    if !quiet {
        let done = summary.explained + summary.failed;
        eprintln!(
            "{} explained, {} failed, {} skipped in {:.1} s ({:.2} images/s) on {} (layer {}, run {}); results in {}",
            summary.explained,
            summary.failed,
            summary.skipped,
            summary.wall_s,
            done as f64 / summary.wall_s.max(1e-9),
            described.join(", "),
            layer,
            summary.run,
            a.out.join(scorecam_gpu::job::results::RESULTS_FILE).display()
        );
    }
    Ok(summary.exit_code())
}

fn evaluate(a: EvalArgs) -> Result<u8> {
    // Options, inputs, boxes and the plot's directory before the model is loaded.
    let methods: Vec<Method> = a.methods.iter().map(|&m| a.params.method(m)).collect();
    if methods.is_empty() {
        return Err(Error::Usage("--methods needs at least one method".into()));
    }
    if a.step == Some(0) {
        return Err(Error::Usage("--step must be at least 1".into()));
    }
    let boxes = a.boxes.as_deref().map(eval::Boxes::open).transpose()?;
    if !a.no_plot {
        if let Some(parent) = a.plot.parent().filter(|p| !p.as_os_str().is_empty()) {
            if !parent.is_dir() {
                return Err(Error::Usage(format!(
                    "--plot {}: {} is not a directory",
                    a.plot.display(),
                    parent.display()
                )));
            }
        }
    }
    let source = a.inputs.source();
    let root = inputs::tree_root(&source, None)?;
    let mut listed = Vec::new();
    let mut failed_early = Vec::new();
    for input in inputs::Inputs::open(&source, root)? {
        match input.problem {
            Some(e) => {
                if !a.quiet {
                    eprintln!("error: {e}");
                }
                failed_early.push((input.path, scorecam_gpu::error::one_line(&e.to_string())));
            }
            None => listed.push(input.path),
        }
    }
    if listed.is_empty() && failed_early.is_empty() {
        return Err(Error::Usage("no images to evaluate".into()));
    }

    let model = load_model(
        a.model.weights.as_deref(),
        a.model.random_weights,
        a.model.input_size,
        !a.quiet,
    )?;
    let targets = match a.class {
        Some(c) => Targets::Classes(vec![c]),
        None => Targets::Top(1),
    };
    targets
        .check(model.num_classes())
        .map_err(|m| Error::Usage(format!("--{m}")))?;
    let cuda = cuda_devices(a.cam.backend, a.quiet)? > 0;
    let mut cam = cam_options(&a.cam, targets.clone(), cuda);
    cam.method = methods[0].clone();
    let choice = if cuda {
        BackendChoice::Cuda
    } else {
        BackendChoice::Cpu
    };
    let s = model.input_size();
    let mut engine = Engine::new(choice, 0, model, cam)?;
    // Every method's parameters are checked against the layer before anything runs.
    for m in &methods {
        engine.set_method(m.clone())?;
    }
    let opts = eval::EvalOptions {
        methods,
        resize: match a.resize {
            ResizeArg::Crop => ResizeMode::Crop,
            ResizeArg::Stretch => ResizeMode::Stretch,
        },
        targets,
        step: a.step.unwrap_or(s),
        deletion_baseline: a.deletion_baseline.into(),
        insertion_baseline: a.insertion_baseline.into(),
        boxes,
        sanity: a.sanity.then_some(a.sanity_seed),
        quiet: a.quiet,
    };
    let t0 = std::time::Instant::now();
    let mut report = eval::run(&mut engine, &listed, &opts)?;
    let mut failed = failed_early;
    failed.append(&mut report.failed);
    report.failed = failed;
    let out = match a.format {
        FormatArg::Table => eval::to_table(&report),
        FormatArg::Csv => eval::to_csv(&report),
        FormatArg::Json => format!("{}\n", eval::to_json(&report)),
    };
    print!("{out}");
    if !a.no_plot {
        eval::write_plot(&a.plot, &report)?;
    }
    let images = report.methods.first().map_or(0, |m| m.images);
    if !a.quiet {
        eprintln!(
            "{images} images evaluated, {} failed, in {:.1} s ({:.2} images/s) on {}{}",
            report.failed.len(),
            t0.elapsed().as_secs_f64(),
            images as f64 / t0.elapsed().as_secs_f64().max(1e-9),
            engine.describe(),
            if a.no_plot {
                String::new()
            } else {
                format!("; curves in {}", a.plot.display())
            }
        );
    }
    Ok(if report.failed.is_empty() { 0 } else { 1 })
}

/// Open one engine per device, in parallel (each tunes its own plans).
fn open_engines(
    choice: BackendChoice,
    ordinals: &[usize],
    model: &std::sync::Arc<Vgg>,
    cam: &CamOptions,
) -> Result<Vec<Engine>> {
    std::thread::scope(|sc| {
        let handles: Vec<_> = ordinals
            .iter()
            .map(|&o| {
                let (model, cam) = (model.clone(), cam.clone());
                sc.spawn(move || Engine::new(choice, o, model, cam))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Invalid("opening a device panicked".into())))
            })
            .collect()
    })
}

fn bench(a: BenchArgs) -> Result<u8> {
    if a.host {
        let threads = a
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let s = a.model.input_size.unwrap_or(224);
        let r = scorecam_gpu::bench::host(s, a.engine_ms, threads, 10.0)?;
        if a.json {
            println!("{r}");
        } else {
            println!(
                "host stages for a {}×{} JPEG ({} KiB) at {s}×{s}:\n  decode + resize  {:>8.2} ms\n  encode + write   {:>8.2} ms\n  per core         {:>8.2} images/s\n  {} threads        {:>8.2} images/s\n  cores to feed one GPU at {} ms/image: {:.2}",
                r["jpeg"]["width"],
                r["jpeg"]["height"],
                r["jpeg"]["bytes"].as_u64().unwrap_or(0) / 1024,
                r["decode_resize_ms"].as_f64().unwrap_or(f64::NAN),
                r["encode_write_ms"].as_f64().unwrap_or(f64::NAN),
                r["images_per_s_per_core"].as_f64().unwrap_or(f64::NAN),
                threads,
                r["images_per_s_all_threads"].as_f64().unwrap_or(f64::NAN),
                a.engine_ms,
                r["cores_to_feed_one_gpu"].as_f64().unwrap_or(f64::NAN),
            );
        }
        return Ok(0);
    }
    let mut args = a;
    if args.model.weights.is_none() && args.model.random_weights.is_none() {
        args.model.random_weights = Some(0);
    }
    let t0 = std::time::Instant::now();
    let mut engine = open_engine(&args.model, &args.cam, Targets::Top(1), !args.json)?;
    // Loading, device start-up and every batch size's planning and tuning, before the first image.
    let setup_ms = t0.elapsed().as_secs_f64() * 1e3;
    let device = engine.describe();
    let report = if args.forward.is_empty() {
        let model = engine.model_arc();
        let mut r =
            scorecam_gpu::bench::scorecam(&mut engine, &model, args.cam.mode.into(), &args.images)?;
        r["mode"] = Semantics::from(args.cam.mode).name().into();
        r
    } else {
        engine.bench_forward(&args.forward, 10)?
    };
    let mut report = report;
    report["device"] = device.clone().into();
    report["input_size"] = engine.input_size().into();
    report["setup_ms"] = ((setup_ms * 10.0).round() / 10.0).into();
    report["precision"] = Precision::from(args.cam.precision).name().into();
    if args.cam.precision == PrecisionArg::Fp8 && args.forward.is_empty() {
        // Fidelity: the same images' maps from an FP16 engine beside this one.
        let mut fp16 = args.cam.clone();
        fp16.precision = PrecisionArg::Fp16;
        let mut reference = open_engine(&args.model, &fp16, Targets::Top(1), false)?;
        let n = args.images.iter().copied().max().unwrap_or(8);
        let s = engine.input_size();
        report["fp8_fidelity"] =
            scorecam_gpu::bench::fp8_fidelity(&mut engine, &mut reference, n, s)?;
    }
    if args.json {
        println!("{report}");
    } else {
        print_bench_table(&report);
    }
    Ok(0)
}

fn print_bench_table(r: &serde_json::Value) {
    println!(
        "device: {} (set-up {:.0} ms: model, device, planning)",
        r["device"].as_str().unwrap_or("?"),
        r["setup_ms"].as_f64().unwrap_or(f64::NAN)
    );
    if let Some(f) = r["forward_ms"].as_object() {
        println!("{:>8}  {:>12}", "batch", "forward ms");
        for (n, ms) in f {
            println!("{n:>8}  {:>12.3}", ms.as_f64().unwrap_or(f64::NAN));
        }
        return;
    }
    println!(
        "mode {}, layer {} ({} channels), mask batch {}, {}",
        r["mode"].as_str().unwrap_or("?"),
        r["layer"].as_str().unwrap_or("?"),
        r["channels"],
        r["mask_batch"],
        r["precision"].as_str().unwrap_or("fp16")
    );
    let stages = [
        "preprocess",
        "base_forward",
        "masks",
        "masked_forward",
        "scores",
        "combine",
    ];
    print!("{:>7} {:>10}", "images", "ms/image");
    for s in stages {
        print!(" {s:>14}");
    }
    println!(" {:>9}", "TFLOP/s");
    if let Some(ms) = r["ms_per_image"].as_object() {
        for (n, v) in ms {
            print!("{n:>7} {:>10.3}", v.as_f64().unwrap_or(f64::NAN));
            for s in stages {
                print!(
                    " {:>14.3}",
                    r["stages_ms_per_image"][n][s].as_f64().unwrap_or(0.0)
                );
            }
            println!(
                " {:>9.1}",
                r["masked_forward_tflops"][n].as_f64().unwrap_or(f64::NAN)
            );
        }
    }
    if let Some(f) = r["fp8_fidelity"].as_object() {
        let c = &f["map_corr_vs_fp16"];
        println!(
            "FP8 maps vs FP16 ({} images, same class): correlation min {} median {} max {}; {} of them ≥ 0.99",
            f["images"], c["min"], c["median"], c["max"], c["at_least_0_99"]
        );
    }
    if let Some(route) = r["backend"]["fp8_route"].as_object() {
        let list = |k: &str| route[k].as_array().map_or(0, Vec::len);
        let cost = &r["backend"]["fp8_route_cost_ms"];
        println!(
            "FP8 route of a mask batch: {} convs FP8, {} stages writing E4M3{}",
            list("fp8"),
            list("e4m3_out"),
            match (cost["route"].as_f64(), cost["all_fp16"].as_f64()) {
                (Some(a), Some(b)) => format!(
                    "; the set-up's timings sum its features to {a:.3} ms, all FP16 {b:.3} ms"
                ),
                _ => String::new(),
            }
        );
    }
    if let Some(layers) = r["layers"].as_array() {
        println!(
            "per layer, one forward of {} masked inputs:",
            r["mask_batch"]
        );
        println!(
            "{:<14} {:<8} {:>9} {:>9} {:>9}  algorithm",
            "layer", "kind", "ms", "TFLOP/s", "GB/s"
        );
        let num = |v: &serde_json::Value| v.as_f64().map_or("-".into(), |x| format!("{x:.1}"));
        for l in layers {
            println!(
                "{:<14} {:<8} {:>9.3} {:>9} {:>9}  {}",
                l["name"].as_str().unwrap_or("?"),
                l["kind"].as_str().unwrap_or("?"),
                l["ms"].as_f64().unwrap_or(f64::NAN),
                num(&l["tflops"]),
                num(&l["gbps"]),
                match (l["algo"].as_str(), l["fused_into"].as_str()) {
                    (_, Some(conv)) => format!("in {conv}'s kernel"),
                    (Some(algo), _) => algo.to_string(),
                    (None, None) => String::new(),
                }
            );
        }
    }
}

fn inspect(m: ModelArgs) -> Result<u8> {
    let model = load_model(m.weights.as_deref(), m.random_weights, m.input_size, true)?;
    let s = model.input_size();
    println!("source: {}", model.meta.source);
    if let Some(arch) = &model.meta.arch {
        println!("arch: {arch}");
    }
    println!("input size: {s}×{s}");
    println!("mean: {:?}  std: {:?}", model.meta.mean, model.meta.std);
    println!("dtypes: {}", model.meta.dtypes.join(", "));
    println!(
        "classes: {} ({})",
        model.num_classes(),
        match &model.meta.labels {
            Some(l) => format!("{} labels", l.len()),
            None => "no labels".into(),
        }
    );
    let bn = model.convs().any(|c| c.relu_index - c.conv_index > 1);
    if bn {
        println!(
            "batch norm: folded into the convs at load (the layers and parameter count below \
             are the folded model's)"
        );
    }
    println!("parameters: {}", model.parameter_count());
    println!("GFLOP per forward: {:.2}", 2.0 * model.macs(s) as f64 / 1e9);
    println!("layers:");
    let shapes = model.stage_shapes(s);
    for (stage, shape) in model.features.iter().zip(&shapes) {
        match stage {
            FeatureStage::Conv(c) => println!(
                "  features.{:<3} Conv2d({}, {}, 3×3, pad 1){} + ReLU (features.{})  → {}×{}×{}",
                c.conv_index,
                c.cin,
                c.cout,
                if c.relu_index - c.conv_index > 1 {
                    format!(" + BatchNorm2d (features.{}, folded)", c.conv_index + 1)
                } else {
                    String::new()
                },
                c.relu_index,
                shape.c,
                shape.h,
                shape.w
            ),
            FeatureStage::MaxPool { index } => println!(
                "  features.{index:<3} MaxPool2d(2, 2)  → {}×{}×{}",
                shape.c, shape.h, shape.w
            ),
        }
    }
    println!(
        "  avgpool      AdaptiveAvgPool2d(7×7)  → {}×7×7",
        model.features_shape(s).c
    );
    for l in &model.classifier {
        println!(
            "  classifier.{:<2} Linear({}, {}){}",
            l.index,
            l.fin,
            l.fout,
            if l.relu { " + ReLU" } else { "" }
        );
    }
    println!(
        "default layer: {}",
        model.capture_name(model.default_capture())
    );
    Ok(0)
}
