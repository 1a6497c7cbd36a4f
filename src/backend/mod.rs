//! The interface both backends implement, op for op. Score-CAM orchestration (`cam.rs`) is
//! written once against it; every CUDA op is tested against its CPU twin through it.
//!
//! Buffers are opaque and backend-owned (host `Vec<f32>` NCHW on the CPU, FP16 NHWC device memory
//! on CUDA). Callers allocate them once for the largest batch and reuse them: ops write into
//! caller-provided outputs and may use only the first `n` rows of a buffer. Shapes below are the
//! logical NCHW shapes, whatever the layout behind them.

pub mod cpu;
pub mod cuda;
pub mod fp8;
pub mod grad;

use std::sync::Arc;

use crate::error::Result;
use crate::model::{Capture, Vgg};

/// The error of an op called on a backend (`"CPU"`, `"CUDA"`) before `prepare`.
pub(crate) fn not_prepared(backend: &str) -> crate::error::Error {
    crate::error::Error::Invalid(format!("{backend} backend used before prepare()"))
}

/// How a channel's activations become an input mask and how its score is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Semantics {
    /// haofanwang/Score-CAM: half-pixel bilinear upsample, `M = (U-min)/(max-min)`, score =
    /// softmax probability of the target, map = `ReLU(Σ s_k U_k)` at input resolution, min-max.
    Official,
    /// pytorch-grad-cam 1.5.7 `ScoreCAM`: align-corners upsample, `M = (U-min)/(max-min+1e-8)`,
    /// score = target logit, weights = softmax over channels, map = `ReLU(Σ α_k A_k)` at layer
    /// resolution, then the library's scaling and resize.
    ChannelSoftmax,
    /// torchcam 0.5.0's Score-CAM family (SS-CAM, IS-CAM): each channel min-max normalized at
    /// the layer's resolution (`/ (max-min+1e-8)`), then upsampled (half-pixel bilinear); score =
    /// target logit minus the unmasked input's; weights = softmax over channels; map =
    /// `ReLU(Σ w_k A_k)` at layer resolution, min-max normalized (`+1e-8`), upsampled.
    Torchcam,
}

impl Semantics {
    /// Bilinear upsampling with `align_corners=True` (else half-pixel centres).
    pub fn align_corners(self) -> bool {
        matches!(self, Semantics::ChannelSoftmax)
    }
    /// Added to `max - min` when normalizing a mask.
    pub fn mask_eps(self) -> f32 {
        match self {
            Semantics::Official => 0.0,
            Semantics::ChannelSoftmax | Semantics::Torchcam => 1e-8,
        }
    }
    /// Masks are normalized with the low-resolution channel's min and max (then upsampled),
    /// not the upsampled map's.
    pub fn lowres_stats(self) -> bool {
        matches!(self, Semantics::Torchcam)
    }
    /// The per-mask score is the softmax probability (else the raw logit).
    pub fn score_is_probability(self) -> bool {
        matches!(self, Semantics::Official)
    }
    pub fn name(self) -> &'static str {
        match self {
            Semantics::Official => "official",
            Semantics::ChannelSoftmax => "channel-softmax",
            Semantics::Torchcam => "torchcam",
        }
    }
}

/// The number format of the masked forwards' convolutions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Precision {
    /// FP16 tensors, f32 accumulation (every backend; the CPU computes in f32 throughout).
    #[default]
    Fp16,
    /// FP8 E4M3 inputs and weights with per-layer scales, f32 accumulation, FP16 outputs, on
    /// the conv layers where it runs faster (CUDA, compute capability 8.9 or newer); the base
    /// forward, the first conv and the classifier stay FP16.
    Fp8,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp16 => "fp16",
            Precision::Fp8 => "fp8",
        }
    }
}

/// Gaussian noise added to masks (SS-CAM): N(0, σ²) per mask pixel, from a counter-based
/// generator (see [`normal_noise`]) so every backend draws the same values.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Noise {
    pub seed: u64,
    pub sigma: f32,
}

/// How the masks of one `masked_inputs` call are made: the semantics' mask, times `scale`
/// (IS-CAM's integration coefficient), plus `noise` drawn from stream `MaskItem::sample`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MaskStyle {
    pub sem: Semantics,
    pub scale: f32,
    pub noise: Option<Noise>,
}

impl From<Semantics> for MaskStyle {
    fn from(sem: Semantics) -> Self {
        MaskStyle {
            sem,
            scale: 1.0,
            noise: None,
        }
    }
}

/// SplitMix64's finalizer: a bijective 64-bit mix.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Element `index` of Gaussian noise stream `stream` for `seed`: N(0, σ²), as f32. Counter-based
/// (no state), so any backend, thread or order draws the same value:
/// `key(i) = splitmix64(splitmix64(splitmix64(seed) ^ stream) ^ i)`,
/// `u1 = ((key(2·index) >> 11) + 1)·2⁻⁵³ ∈ (0, 1]`, `u2 = (key(2·index+1) >> 11)·2⁻⁵³`,
/// `z = √(−2 ln u1)·cos(2π u2)` in f64, value `f32(σ·z)`. The fixture script draws the same
/// numbers to run torchcam's SS-CAM with them.
pub fn normal_noise(seed: u64, stream: u64, index: u64, sigma: f32) -> f32 {
    let base = splitmix64(splitmix64(seed) ^ stream);
    let key = |i: u64| splitmix64(base ^ i);
    let two53 = (1u64 << 53) as f64;
    let u1 = ((key(index.wrapping_mul(2)) >> 11) + 1) as f64 / two53;
    let u2 = (key(index.wrapping_mul(2).wrapping_add(1)) >> 11) as f64 / two53;
    let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
    (f64::from(sigma) * z) as f32
}

/// One masked input to build: channel `channel` of image slot `image`'s activations masks that
/// image's input; `sample` picks the noise stream (SS-CAM's sample index).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct MaskItem {
    pub image: u32,
    pub channel: u32,
    pub sample: u32,
}

impl MaskItem {
    pub fn new(image: u32, channel: u32) -> MaskItem {
        MaskItem {
            image,
            channel,
            sample: 0,
        }
    }
}

/// The median of a non-empty sample of timings (the upper middle value of an even count).
pub fn median<T: PartialOrd + Copy>(mut v: Vec<T>) -> T {
    // Timings are never NaN; one would sort as equal to anything.
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

/// The per-layer median over runs (`runs[r][layer]` ms), for [`Backend::layer_times`].
pub fn median_per_layer(runs: &[Vec<f64>]) -> Vec<f64> {
    let layers = runs.iter().map(Vec::len).min().unwrap_or(0);
    (0..layers)
        .map(|l| median(runs.iter().map(|r| r[l]).collect()))
        .collect()
}

/// Sizes a backend plans its buffers, descriptors and workspaces for. Set once per run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Input side S (the model's input size).
    pub input_size: usize,
    /// Most images forwarded together in a base pass (and resident at once).
    pub max_images: usize,
    /// Most masked inputs forwarded together.
    pub max_masks: usize,
    /// Where the activations are taken.
    pub capture: Capture,
}

/// Pipeline stages, for the per-stage time breakdown of `bench`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    Preprocess,
    BaseForward,
    Masks,
    MaskedForward,
    Scores,
    Combine,
}

impl Stage {
    pub const ALL: [Stage; 6] = [
        Stage::Preprocess,
        Stage::BaseForward,
        Stage::Masks,
        Stage::MaskedForward,
        Stage::Scores,
        Stage::Combine,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Stage::Preprocess => "preprocess",
            Stage::BaseForward => "base_forward",
            Stage::Masks => "masks",
            Stage::MaskedForward => "masked_forward",
            Stage::Scores => "scores",
            Stage::Combine => "combine",
        }
    }
}

/// The ops Score-CAM needs. `Buf` is the backend's tensor storage.
pub trait Backend {
    type Buf;

    /// Turn stage timing on or off (off by default; it costs an event record per mark on CUDA).
    fn set_profiling(&mut self, on: bool);

    /// With profiling on: the work enqueued from now until the next mark belongs to `stage`
    /// (`None`: to nothing). Timed on the device timeline (CUDA events) or by the wall clock (CPU).
    fn mark(&mut self, stage: Option<Stage>) -> Result<()>;

    /// Milliseconds per stage accumulated since the last call (synchronizes), then reset.
    fn take_stage_times(&mut self) -> Result<Vec<(Stage, f64)>>;

    /// Human-readable name, e.g. `cpu (2 threads)` or `cuda: NVIDIA H100 80GB HBM3 (sm_90)`.
    fn describe(&self) -> String;

    /// Upload weights (once) and build per-batch-size plans for `plan`. Calling it again with a
    /// different plan replaces the old one. A backend that cannot fit the plan returns
    /// [`crate::Error::OutOfMemory`], so the caller may retry with smaller batches.
    fn prepare(&mut self, model: &Arc<Vgg>, plan: Plan) -> Result<()>;

    /// A buffer of logical shape `shape` (NCHW for images/activations, `[N, C]` for logits).
    fn alloc(&mut self, shape: &[usize]) -> Result<Self::Buf>;

    /// Write host rows into a 4-D buffer: `data` holds whole rows `[r, C, H, W]` (logical NCHW
    /// f32) for rows `first..first + r` of `buf`. For inputs made on the host (the metrics'
    /// perturbed images).
    fn write_rows(&mut self, buf: &mut Self::Buf, first: usize, data: &[f32]) -> Result<()>;

    /// Copy a buffer back to the host as f32 in the logical NCHW order, first `rows` rows only.
    fn download(&mut self, buf: &Self::Buf, rows: usize) -> Result<Vec<f32>>;

    /// u8 RGB image `rgb` `[S, S, 3]` (HWC) → `(x/255 − mean)/std` into row `slot` of
    /// `images` `[N, 3, S, S]`.
    fn preprocess(
        &mut self,
        rgb: &[u8],
        mean: [f32; 3],
        std: [f32; 3],
        images: &mut Self::Buf,
        slot: usize,
    ) -> Result<()>;

    /// Forward the first `n` rows of `x` `[N, 3, S, S]` through the prepared model. Writes
    /// `logits` `[N, classes]`; with `acts`, also the activations at the plan's capture point
    /// `[N, K, h, w]`.
    fn forward(
        &mut self,
        x: &Self::Buf,
        n: usize,
        logits: &mut Self::Buf,
        acts: Option<&mut Self::Buf>,
    ) -> Result<()>;

    /// Masked inputs, one per item: `out[i] = images[item.image] ⊙ M` with
    /// `M = scale·N + noise`, `N` the min-max normalized bilinear upsample (to S×S) of
    /// `acts[item.image, item.channel]` per `style.sem`, and `noise` (when asked for) element
    /// `item.channel·S² + y·S + x` of stream `item.sample` ([`normal_noise`]).
    /// `images` `[N, 3, S, S]`, `acts` `[N, K, h, w]`, `out` `[B, 3, S, S]` with B ≥ items.len().
    fn masked_inputs(
        &mut self,
        images: &Self::Buf,
        acts: &Self::Buf,
        items: &[MaskItem],
        style: MaskStyle,
        out: &mut Self::Buf,
    ) -> Result<()>;

    /// For each of the first `n` rows of `logits` `[B, C]` and each of its `t = targets.len()/n`
    /// targets (`targets` is `[n, t]`, row-major): the softmax probability of the target over the
    /// classes (`probability`) or its raw logit. Returns `[n, t]`.
    fn scores(
        &mut self,
        logits: &Self::Buf,
        n: usize,
        targets: &[u32],
        probability: bool,
    ) -> Result<Vec<f32>>;

    /// [`Backend::scores`], queued: the scores are appended to the backend's pending scores
    /// (kept on the device by CUDA) instead of returned, so batch after batch can be enqueued
    /// without waiting for each one's result. [`Backend::take_scores`] returns them.
    fn push_scores(
        &mut self,
        logits: &Self::Buf,
        n: usize,
        targets: &[u32],
        probability: bool,
    ) -> Result<()>;

    /// Every score pushed since the last call, in push order (`[Σn, t]` per push, concatenated),
    /// then clears them. One synchronization.
    fn take_scores(&mut self) -> Result<Vec<f32>>;

    /// Milliseconds of each layer of a forward pass of the first `rows` rows of `x`, the median
    /// of `reps` passes, in the order of [`Vgg::layer_costs`](crate::model::Vgg::layer_costs).
    fn layer_times(&mut self, x: &Self::Buf, rows: usize, reps: usize) -> Result<Vec<f64>>;

    /// What the backend chose at `prepare` and did since (algorithms, planned batch sizes,
    /// graphs), for `bench --json`; `null` when it has nothing to say.
    fn report(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    /// The weighted sum of image slot `image`'s activation channels, ReLU'd:
    /// official: `ReLU(Σ_k w_k U_k)` at S×S with `U_k` the half-pixel upsample of `A_k`
    /// (recomputed, never materialized), min-max normalized to [0, 1] (all zeros when flat);
    /// channel-softmax and torchcam: `ReLU(Σ_k w_k A_k)` at the layer's h×w, not normalized.
    /// Returns the map and whether it was flat (official only).
    fn combine(
        &mut self,
        acts: &Self::Buf,
        image: usize,
        weights: &[f32],
        sem: Semantics,
    ) -> Result<(Vec<f32>, bool)>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_runs() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![5.0f32]), 5.0);
        assert_eq!(median(vec![9.0, 1.0, 1.5, 8.0]), 8.0);
        let runs = vec![vec![1.0, 9.0], vec![3.0, 7.0], vec![2.0, 8.0, 5.0]];
        assert_eq!(median_per_layer(&runs), [2.0, 8.0]);
    }
}
