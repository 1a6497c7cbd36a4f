//! `--precision fp8`: the conv layers that may run in FP8 E4M3, their quantized filters, and
//! the per-layer scales.
//!
//! The numerics (which layers, the rounding, the scales) are [`crate::backend::fp8`]'s; here
//! they live on the device: the base forward measures every FP8 layer's input, then one small
//! kernel turns the amaxes into the multipliers and descales the masked forwards read from
//! device memory (so captured CUDA graphs stay valid).
//!
//! Which convs run FP8, and where activations stay E4M3 between them, is the cheapest route by
//! the tuning's timings ([`route`](super::forward_plan::route)): an E4M3 output is written at
//! the next conv's multiplier, the max-pool between works on the codes, and no quantize pass
//! runs. Elsewhere an FP8 conv's FP16 input is quantized by a kernel into [`Fp8State::x8`]
//! first.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView};
use half::f16;

use super::device::Dev;
use super::kernels::{Kernels, DESCALE_AT, MULTIPLIER_AT, SCALE_STRIDE};
use super::layout;
use super::weights::upload_wg_packed;
use super::weights::DevConv;
use crate::backend::fp8::{capable_stages, weight_scale};
use crate::error::{Error, Result};
use crate::model::{FeatureStage, Vgg};

/// The FP8 state of a prepared plan.
pub(super) struct Fp8State {
    /// E4M3 filters (KRSC, stored input channels) of the FP8-capable stages, by feature stage.
    pub filters: Vec<Option<CudaSlice<u8>>>,
    /// The same packed for the wgmma conv's E4M3 build ([`ConvWgBuild::E4M3`],
    /// [`conv3x3_wg_pack_filter`]) where it fits the layer and the device runs it.
    pub wg_filters: Vec<Option<CudaSlice<u8>>>,
    /// Per feature stage: the filter's scale `sw` (1 where not capable).
    pub w_scale: CudaSlice<f32>,
    /// Per feature stage: the largest |input| of the last base forward (reset by `fp8_scales`).
    pub amax: CudaSlice<f32>,
    /// Per feature stage, [`SCALE_STRIDE`] floats: the output's descale `sx·sw` and the input's
    /// quantization multiplier `1/sx` (see [`Fp8State::descale`], [`Fp8State::multiplier`]).
    pub scales: CudaSlice<f32>,
    /// One layer's quantized input: `rows_max` rows of the largest FP8 layer input.
    pub x8: CudaSlice<u8>,
    /// Scales measured by a base forward: until then every layer runs in FP16.
    pub ready: bool,
    /// Run FP8 wherever a plan runs, faster or not (to test the FP8 path).
    pub prefer: bool,
}

impl Fp8State {
    /// Quantize the capable layers' filters (also packed for the wgmma conv with `pack_wg`, a
    /// device that runs it) and allocate the scales and the input buffer for `rows_max` rows of
    /// inputs of `in_len(stage)` values. The scales start at multiplier 1 and descale `sw` (what
    /// the tuning runs with, on inputs in [0, 1)).
    pub fn new(
        dev: &Dev,
        model: &Vgg,
        convs: &[Option<DevConv>],
        rows_max: usize,
        in_len: impl Fn(usize) -> usize,
        (prefer, pack_wg): (bool, bool),
    ) -> Result<Fp8State> {
        let stages = model.features.len();
        let mut filters = Vec::with_capacity(stages);
        let mut wg_filters = Vec::with_capacity(stages);
        let mut w_scale = vec![1.0f32; stages];
        let mut x8_len = 1;
        let capable = capable_stages(model);
        for (i, stage) in model.features.iter().enumerate() {
            let (filter, wg) = match (stage, convs[i].as_ref()) {
                (FeatureStage::Conv(l), Some(c)) if capable[i] => {
                    let sw = weight_scale(&l.weight);
                    w_scale[i] = sw;
                    x8_len = x8_len.max(rows_max * in_len(i));
                    let bits = layout::conv_filter_krsc_e4m3(&l.weight, l.cout, l.cin, c.cin_s, sw);
                    let name = format!("features.{} FP8 filter", l.conv_index);
                    let wg = match pack_wg {
                        true => upload_wg_packed(dev, &bits, [c.cin_s, c.cout], true, &name)?,
                        false => None,
                    }
                    .map(|(_, packed)| packed);
                    (Some(dev.upload(&bits, &name)?), wg)
                }
                _ => (None, None),
            };
            filters.push(filter);
            wg_filters.push(wg);
        }
        // The layout of `fp8_scales`' output.
        let scales: Vec<f32> = w_scale
            .iter()
            .flat_map(|&sw| {
                let mut layer = [0.0f32; SCALE_STRIDE];
                layer[DESCALE_AT] = sw;
                layer[MULTIPLIER_AT] = 1.0;
                layer
            })
            .collect();
        Ok(Fp8State {
            filters,
            wg_filters,
            w_scale: dev.upload(&w_scale, "FP8 filter scales")?,
            amax: dev.alloc::<f32>(stages, "FP8 input amax")?,
            scales: dev.upload(&scales, "FP8 scales")?,
            x8: dev.alloc::<u8>(x8_len, "FP8 layer input")?,
            ready: false,
            prefer,
        })
    }

    /// Stage `stage`'s descale (one f32, 16-byte aligned): its conv output's scale back.
    pub fn descale(&self, stage: usize) -> CudaView<'_, f32> {
        scale(&self.scales, stage, DESCALE_AT)
    }

    /// Stage `stage`'s multiplier (one f32, 16-byte aligned): its input's quantization, and the
    /// output scale of an E4M3-output conv feeding it.
    pub fn multiplier(&self, stage: usize) -> CudaView<'_, f32> {
        scale(&self.scales, stage, MULTIPLIER_AT)
    }

    /// Quantize `x` (stage `stage`'s FP16 input, all of it) into [`Fp8State::x8`] at the stage's
    /// multiplier.
    pub fn quantize_input(
        &mut self,
        kernels: &Kernels,
        stream: &Arc<CudaStream>,
        stage: usize,
        x: &CudaView<'_, f16>,
    ) -> Result<()> {
        let n = x.len();
        // The fields apart: the multiplier is read while x8 is written.
        let multiplier = scale(&self.scales, stage, MULTIPLIER_AT);
        let cap = self.x8.len();
        let mut y = self.x8.try_slice_mut(..n).ok_or_else(|| {
            Error::Invalid(format!(
                "stage {stage}: {n} values to quantize, the FP8 input buffer holds {cap}"
            ))
        })?;
        kernels.quantize_e4m3(stream, x, n, &multiplier, &mut y)
    }

    /// After a base forward: every layer's descale and multiplier from the input amaxes it
    /// measured (which start again from 0); the FP8 plans run from now on.
    pub fn scales_from_amax(&mut self, kernels: &Kernels, stream: &Arc<CudaStream>) -> Result<()> {
        let layers = self.filters.len();
        kernels.fp8_scales(
            stream,
            &mut self.amax.slice_mut(..),
            &self.w_scale.slice(..),
            layers,
            crate::backend::fp8::MARGIN,
            &mut self.scales.slice_mut(..),
        )?;
        self.ready = true;
        Ok(())
    }

    /// Bytes of device memory held.
    pub fn bytes(&self) -> usize {
        let packed = self.wg_filters.iter().flatten().map(|f| f.num_bytes());
        self.filters
            .iter()
            .flatten()
            .map(|f| f.num_bytes())
            .chain(packed)
            .sum::<usize>()
            + self.x8.num_bytes()
    }
}

/// Stage `stage`'s scale at `offset` in its [`SCALE_STRIDE`] floats of `scales`.
fn scale(scales: &CudaSlice<f32>, stage: usize, offset: usize) -> CudaView<'_, f32> {
    let at = SCALE_STRIDE * stage + offset;
    scales.slice(at..at + 1)
}

/// Per feature stage: the next conv stage after it (past any pools) when that one may run FP8
/// (`is_conv`, `fp8` per stage), where an E4M3 output of this stage could be read.
pub(super) fn next_fp8_convs(is_conv: &[bool], fp8: &[bool]) -> Vec<Option<usize>> {
    (0..is_conv.len())
        .map(|i| {
            let j = (i + 1..is_conv.len()).find(|&j| is_conv[j])?;
            fp8[j].then_some(j)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_fp8_conv_is_found_past_pools() {
        // conv(FP16) conv pool conv(FP16) conv pool
        let is_conv = [true, true, false, true, true, false];
        let fp8 = [false, true, false, false, true, false];
        assert_eq!(
            next_fp8_convs(&is_conv, &fp8),
            [Some(1), None, None, Some(4), None, None]
        );
    }
}
