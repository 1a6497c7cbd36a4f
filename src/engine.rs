//! Choosing a backend and loading a model: the glue between the CLI and [`crate::cam`].

use std::path::Path;
use std::sync::Arc;

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::CudaBackend;
use crate::backend::{Backend, Precision, Stage};
use crate::cam::{CamOptions, Explainer, Explanation, PassCounter, Targets};
use crate::error::{Error, Result};
use crate::model::{MapShape, Vgg};

/// `--backend`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// CUDA when a usable GPU is found, else the CPU (with a one-line notice).
    Auto,
    Cpu,
    Cuda,
}

/// Load the model: `--random-weights SEED` builds VGG16 in memory, else the weights file is
/// resolved (`--weights`, `$SCORECAM_WEIGHTS`, `weights/vgg16.safetensors`, hub cache/download).
/// `input_size` overrides the file's `input_size`.
pub fn load_model(
    weights: Option<&Path>,
    random_seed: Option<u64>,
    input_size: Option<usize>,
    show_progress: bool,
) -> Result<Arc<Vgg>> {
    let mut model = match random_seed {
        Some(seed) => {
            let mut m = Vgg::random_vgg16(seed);
            // Random weights, but the ImageNet head's shape: name its classes like the real one.
            m.meta.labels = Some(crate::weights::imagenet_labels());
            m
        }
        None => {
            let path = crate::hub::resolve_weights(weights, show_progress)?;
            crate::weights::load(&path)?
        }
    };
    if let Some(s) = input_size {
        use crate::weights::{MAX_INPUT_SIZE, MIN_INPUT_SIZE};
        if !(MIN_INPUT_SIZE..=MAX_INPUT_SIZE).contains(&s) {
            return Err(Error::Usage(format!(
                "--input-size {s}: must be {MIN_INPUT_SIZE}..={MAX_INPUT_SIZE}"
            )));
        }
        model.meta.input_size = s;
        model
            .validate()
            .map_err(|m| Error::Usage(format!("--input-size {s}: {m}")))?;
    }
    Ok(Arc::new(model))
}

/// An explainer on whichever backend was chosen.
pub enum Engine {
    Cpu(Box<Explainer<CpuBackend>>),
    Cuda(Box<Explainer<CudaBackend>>),
}

/// Run `$body` with `$e` bound to the explainer inside, whatever its backend.
macro_rules! with_explainer {
    ($engine:expr, $e:ident => $body:expr) => {
        match $engine {
            Engine::Cpu($e) => $body,
            Engine::Cuda($e) => $body,
        }
    };
}

impl Engine {
    /// Open the backend (CUDA device `ordinal`) and prepare the explainer. `auto` falls back to
    /// the CPU with a notice on stderr when no usable GPU is found; `cuda` fails with
    /// `Error::CudaUnavailable`.
    pub fn new(
        choice: BackendChoice,
        ordinal: usize,
        model: Arc<Vgg>,
        opts: CamOptions,
    ) -> Result<Engine> {
        let cuda = match choice {
            BackendChoice::Cpu => None,
            BackendChoice::Cuda => Some(CudaBackend::new(ordinal)?),
            BackendChoice::Auto => match CudaBackend::new(ordinal) {
                Ok(b) => Some(b),
                Err(e) => {
                    eprintln!("notice: no usable GPU ({e}); running on the CPU");
                    None
                }
            },
        };
        let cuda = match cuda {
            Some(mut b) => {
                b.set_precision(opts.precision)?;
                Some(b)
            }
            None if opts.precision == Precision::Fp8 => {
                return Err(Error::Usage(
                    "--precision fp8 needs a CUDA GPU of compute capability 8.9 or newer (FP8 \
                     tensor cores); the CPU backend computes in f32"
                        .into(),
                ))
            }
            None => None,
        };
        Ok(match cuda {
            Some(b) => Engine::Cuda(Box::new(Explainer::new(b, model, opts)?)),
            None => Engine::Cpu(Box::new(Explainer::new(CpuBackend::new(), model, opts)?)),
        })
    }

    pub fn explain(&mut self, images: &[Vec<u8>]) -> Result<Vec<Explanation>> {
        with_explainer!(self, e => e.explain(images))
    }

    /// Explain each image for its own targets (see [`Explainer::explain_for`]).
    pub fn explain_for(
        &mut self,
        images: &[Vec<u8>],
        targets: &[Targets],
    ) -> Result<Vec<Explanation>> {
        with_explainer!(self, e => e.explain_for(images, targets))
    }

    /// Explain with another method from now on.
    pub fn set_method(&mut self, method: crate::cam::Method) -> Result<()> {
        with_explainer!(self, e => e.set_method(method))
    }

    /// Explain with another model of the same shape.
    pub fn set_model(&mut self, model: Arc<Vgg>) -> Result<()> {
        with_explainer!(self, e => e.set_model(model))
    }

    /// Class probabilities of host-made normalized inputs (see [`Explainer::class_probs`]).
    pub fn class_probs(&mut self, inputs: &[f32], classes: &[usize]) -> Result<Vec<f32>> {
        with_explainer!(self, e => e.class_probs(inputs, classes))
    }

    /// The model being explained.
    pub fn model(&self) -> &Vgg {
        with_explainer!(self, e => e.model())
    }

    /// Count masked passes into `counter` (progress displays).
    pub fn set_pass_counter(&mut self, counter: Arc<PassCounter>) {
        with_explainer!(self, e => e.set_pass_counter(counter))
    }

    /// Is this the CPU backend (minutes per image at 224², where progress needs finer steps)?
    pub fn is_cpu(&self) -> bool {
        matches!(self, Engine::Cpu(_))
    }

    pub fn describe(&mut self) -> String {
        with_explainer!(self, e => e.backend().describe())
    }

    /// The model's class labels, if it has any.
    pub fn labels(&self) -> Option<&[String]> {
        with_explainer!(self, e => e.model().meta.labels.as_deref())
    }

    pub fn input_size(&self) -> usize {
        with_explainer!(self, e => e.model().input_size())
    }

    pub fn model_arc(&self) -> Arc<Vgg> {
        with_explainer!(self, e => e.model_arc())
    }

    pub fn layer_name(&self) -> String {
        with_explainer!(self, e => e.layer_name())
    }

    pub fn capture_shape(&self) -> MapShape {
        with_explainer!(self, e => e.capture_shape())
    }

    pub fn mask_batch(&self) -> usize {
        with_explainer!(self, e => e.mask_batch())
    }

    pub fn image_batch(&self) -> usize {
        with_explainer!(self, e => e.image_batch())
    }

    pub fn semantics(&self) -> crate::backend::Semantics {
        with_explainer!(self, e => e.semantics())
    }

    /// Plain forward timings (see [`crate::bench::forward`]). Re-plans the backend: run Score-CAM
    /// with a fresh engine afterwards.
    pub fn bench_forward(&mut self, sizes: &[usize], reps: usize) -> Result<serde_json::Value> {
        with_explainer!(self, e => {
            let model = e.model_arc();
            crate::bench::forward(e.backend(), &model, sizes, reps)
        })
    }

    /// Per-layer milliseconds of a full mask batch's forward (see [`Explainer::layer_times`]).
    pub fn layer_times(&mut self, reps: usize) -> Result<Vec<f64>> {
        with_explainer!(self, e => e.layer_times(reps))
    }

    /// What the backend planned and did (see [`Backend::report`]).
    pub fn backend_report(&mut self) -> serde_json::Value {
        with_explainer!(self, e => e.backend().report())
    }

    pub fn set_profiling(&mut self, on: bool) {
        with_explainer!(self, e => e.backend().set_profiling(on))
    }

    pub fn take_stage_times(&mut self) -> Result<Vec<(Stage, f64)>> {
        with_explainer!(self, e => e.backend().take_stage_times())
    }
}
