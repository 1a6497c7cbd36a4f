//! The interface both backends implement, op for op. Score-CAM orchestration (`cam.rs`) is
//! written once against it; every CUDA op is tested against its CPU twin through it.
//!
//! Buffers are opaque and backend-owned (host `Vec<f32>` NCHW on the CPU, FP16 NHWC device memory
//! on CUDA). Callers allocate them once for the largest batch and reuse them: ops write into
//! caller-provided outputs and may use only the first `n` rows of a buffer. Shapes below are the
//! logical NCHW shapes, whatever the layout behind them.

pub mod cpu;
pub mod cuda;

use std::sync::Arc;

use crate::error::Result;
use crate::model::{Capture, Vgg};

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
            Semantics::ChannelSoftmax => 1e-8,
        }
    }
    /// The per-mask score is the softmax probability (else the raw logit).
    pub fn score_is_probability(self) -> bool {
        matches!(self, Semantics::Official)
    }
    pub fn name(self) -> &'static str {
        match self {
            Semantics::Official => "official",
            Semantics::ChannelSoftmax => "channel-softmax",
        }
    }
}

/// One masked input to build: channel `channel` of image slot `image`'s activations masks that
/// image's input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct MaskItem {
    pub image: u32,
    pub channel: u32,
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

    /// Masked inputs, one per item: `out[i] = images[item.image] ⊙ M` with `M` the min-max
    /// normalized bilinear upsample (to S×S) of `acts[item.image, item.channel]`, per `sem`.
    /// `images` `[N, 3, S, S]`, `acts` `[N, K, h, w]`, `out` `[B, 3, S, S]` with B ≥ items.len().
    fn masked_inputs(
        &mut self,
        images: &Self::Buf,
        acts: &Self::Buf,
        items: &[MaskItem],
        sem: Semantics,
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

    /// The weighted sum of image slot `image`'s activation channels, ReLU'd:
    /// official: `ReLU(Σ_k w_k U_k)` at S×S with `U_k` the half-pixel upsample of `A_k`
    /// (recomputed, never materialized), min-max normalized to [0, 1] (all zeros when flat);
    /// channel-softmax: `ReLU(Σ_k w_k A_k)` at the layer's h×w, not normalized.
    /// Returns the map and whether it was flat (official only).
    fn combine(
        &mut self,
        acts: &Self::Buf,
        image: usize,
        weights: &[f32],
        sem: Semantics,
    ) -> Result<(Vec<f32>, bool)>;
}
