//! The `scorecam-gpu` command line: explain (alias run), bench, inspect.
//! Exit codes: 0 all images succeeded, 1 some failed (or a run-time failure), 2 usage, weights or
//! backend-selection errors.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use scorecam_gpu::backend::Semantics;
use scorecam_gpu::cam::CamOptions;
use scorecam_gpu::engine::{load_model, BackendChoice, Engine};
use scorecam_gpu::image::ResizeMode;
use scorecam_gpu::job::{self, JobOptions};
use scorecam_gpu::model::FeatureStage;
use scorecam_gpu::{Error, Result};

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
    Explain(ExplainArgs),
    /// Benchmark Score-CAM (VGG16 224², random weights unless --weights) and report ms/image,
    /// a per-stage breakdown and the masked forwards' TFLOP/s.
    Bench(BenchArgs),
    /// Print the model's layers, parameter count, input size, labels and dtypes.
    Inspect(ModelArgs),
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
    /// Masked inputs per forward pass (bounds memory). Default: 256 on CUDA, 32 on the CPU.
    #[arg(long, value_name = "N")]
    mask_batch: Option<usize>,
    /// Images whose masked inputs share forward passes. Default: 8 on CUDA, 1 on the CPU.
    #[arg(long, value_name = "N")]
    image_batch: Option<usize>,
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

#[derive(Args)]
struct ExplainArgs {
    /// Image files (PNG, JPEG, BMP, GIF, TIFF, WebP).
    #[arg(required = true, value_name = "IMAGES")]
    images: Vec<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    cam: CamArgs,
    /// crop: shorter side to S then centre crop (the reference transform); stretch: resize to S×S.
    #[arg(long, value_enum, default_value = "crop")]
    resize: ResizeArg,
    /// Target class(es), comma separated; they share the masked passes. Default: top-1.
    #[arg(long = "class", value_name = "N", value_delimiter = ',')]
    classes: Vec<usize>,
    /// Output directory.
    #[arg(long, value_name = "DIR", default_value = "scorecam-out")]
    out: PathBuf,
    /// Skip the heatmap and overlay PNGs (write only .npy maps and results.jsonl).
    #[arg(long)]
    no_png: bool,
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Explain(a) => explain(a),
        Command::Bench(a) => bench(a),
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

fn cam_options(cam: &CamArgs, classes: Vec<usize>, cuda: bool) -> CamOptions {
    CamOptions {
        semantics: cam.mode.into(),
        layer: cam.layer.clone(),
        classes: (!classes.is_empty()).then_some(classes),
        mask_batch: cam.mask_batch.unwrap_or(if cuda { 256 } else { 32 }),
        image_batch: cam.image_batch.unwrap_or(if cuda { 8 } else { 1 }),
    }
}

/// Open the engine: probe the backend first so batch defaults fit it.
fn open_engine(
    m: &ModelArgs,
    cam: &CamArgs,
    classes: Vec<usize>,
    progress: bool,
) -> Result<Engine> {
    let model = load_model(
        m.weights.as_deref(),
        m.random_weights,
        m.input_size,
        progress,
    )?;
    let cuda = match cam.backend {
        BackendChoice::Cpu => false,
        BackendChoice::Cuda => true,
        BackendChoice::Auto => scorecam_gpu::backend::cuda::CudaBackend::probe().is_ok(),
    };
    Engine::new(cam.backend, model, cam_options(cam, classes, cuda))
}

fn explain(a: ExplainArgs) -> Result<u8> {
    // Fail on an unwritable output directory before loading anything.
    job::prepare_out_dir(&a.out).map_err(|e| Error::Usage(e.to_string()))?;
    let mut engine = open_engine(&a.model, &a.cam, a.classes.clone(), true)?;
    let opts = JobOptions {
        out_dir: a.out.clone(),
        resize: match a.resize {
            ResizeArg::Crop => ResizeMode::Crop,
            ResizeArg::Stretch => ResizeMode::Stretch,
        },
        pngs: !a.no_png,
        progress: true,
    };
    let summary = job::run(&mut engine, &a.images, &opts)?;
    eprintln!(
        "{} of {} images explained on {} (layer {}); results in {}",
        summary.ok,
        a.images.len(),
        engine.describe(),
        engine.layer_name(),
        a.out.join("results.jsonl").display()
    );
    Ok(if summary.failed == 0 { 0 } else { 1 })
}

fn bench(a: BenchArgs) -> Result<u8> {
    let mut args = a;
    if args.model.weights.is_none() && args.model.random_weights.is_none() {
        args.model.random_weights = Some(0);
    }
    let mut engine = open_engine(&args.model, &args.cam, Vec::new(), !args.json)?;
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
    if args.json {
        println!("{report}");
    } else {
        print_bench_table(&report);
    }
    Ok(0)
}

fn print_bench_table(r: &serde_json::Value) {
    println!("device: {}", r["device"].as_str().unwrap_or("?"));
    if let Some(f) = r["forward_ms"].as_object() {
        println!("{:>8}  {:>12}", "batch", "forward ms");
        for (n, ms) in f {
            println!("{n:>8}  {:>12.3}", ms.as_f64().unwrap_or(f64::NAN));
        }
        return;
    }
    println!(
        "mode {}, layer {} ({} channels), mask batch {}",
        r["mode"].as_str().unwrap_or("?"),
        r["layer"].as_str().unwrap_or("?"),
        r["channels"],
        r["mask_batch"]
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
    println!("parameters: {}", model.parameter_count());
    println!("GFLOP per forward: {:.2}", 2.0 * model.macs(s) as f64 / 1e9);
    println!("layers:");
    let shapes = model.stage_shapes(s);
    for (stage, shape) in model.features.iter().zip(&shapes) {
        match stage {
            FeatureStage::Conv(c) => println!(
                "  features.{:<3} Conv2d({}, {}, 3×3, pad 1) + ReLU (features.{})  → {}×{}×{}",
                c.conv_index, c.cin, c.cout, c.relu_index, shape.c, shape.h, shape.w
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
