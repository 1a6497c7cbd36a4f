//! `--precision fp8`: the conv layers that may run in FP8 E4M3, their quantized filters, and
//! the per-layer scales.
//!
//! The numerics (which layers, the rounding, the scales) are [`crate::backend::fp8`]'s; here
//! they live on the device: the base forward measures every FP8 layer's input, then one small
//! kernel turns the amaxes into the multipliers and descales the masked forwards read from
//! device memory (so captured CUDA graphs stay valid).

use cudarc::driver::CudaSlice;

use super::device::Dev;
use super::layout;
use super::weights::DevConv;
use crate::backend::fp8::{capable_stages, weight_scale};
use crate::error::Result;
use crate::model::{FeatureStage, Vgg};

/// The FP8 state of a prepared plan.
pub(super) struct Fp8State {
    /// E4M3 filters (KRSC, stored input channels) of the FP8-capable stages, by feature stage.
    pub filters: Vec<Option<CudaSlice<u8>>>,
    /// Per feature stage: the filter's scale `sw` (1 where not capable).
    pub w_scale: CudaSlice<f32>,
    /// Per feature stage: the largest |input| of the last base forward (reset by `fp8_scales`).
    pub amax: CudaSlice<f32>,
    /// Per feature stage: `[sx·sw, 1/sx, 0, 0]`, the output's descale and the input's
    /// quantization multiplier ([`SCALE_STRIDE`](super::kernels::SCALE_STRIDE) floats each).
    pub scales: CudaSlice<f32>,
    /// One layer's quantized input: `rows_max` rows of the largest FP8 layer input.
    pub x8: CudaSlice<u8>,
    /// Scales measured by a base forward: until then every layer runs in FP16.
    pub ready: bool,
    /// Run FP8 wherever a plan runs, faster or not (to test the FP8 path).
    pub prefer: bool,
}

impl Fp8State {
    /// Quantize the capable layers' filters and allocate the scales and the input buffer for
    /// `rows_max` rows of inputs of `in_len(stage)` values. The scales start at multiplier 1 and
    /// descale `sw` (what the tuning runs with, on inputs in [0, 1)).
    pub fn new(
        dev: &Dev,
        model: &Vgg,
        convs: &[Option<DevConv>],
        rows_max: usize,
        in_len: impl Fn(usize) -> usize,
        prefer: bool,
    ) -> Result<Fp8State> {
        let stages = model.features.len();
        let mut filters = Vec::with_capacity(stages);
        let mut w_scale = vec![1.0f32; stages];
        let mut x8_len = 1;
        let capable = capable_stages(model);
        for (i, stage) in model.features.iter().enumerate() {
            let filter = match (stage, convs[i].as_ref()) {
                (FeatureStage::Conv(l), Some(c)) if capable[i] => {
                    let sw = weight_scale(&l.weight);
                    w_scale[i] = sw;
                    x8_len = x8_len.max(rows_max * in_len(i));
                    let bits = layout::conv_filter_krsc_e4m3(&l.weight, l.cout, l.cin, c.cin_s, sw);
                    let name = format!("features.{} FP8 filter", l.conv_index);
                    Some(dev.upload(&bits, &name)?)
                }
                _ => None,
            };
            filters.push(filter);
        }
        // The layout of `fp8_scales`' output: [descale, multiplier, 0, 0] per layer.
        let scales: Vec<f32> = w_scale.iter().flat_map(|&sw| [sw, 1.0, 0.0, 0.0]).collect();
        Ok(Fp8State {
            filters,
            w_scale: dev.upload(&w_scale, "FP8 filter scales")?,
            amax: dev.alloc::<f32>(stages, "FP8 input amax")?,
            scales: dev.upload(&scales, "FP8 scales")?,
            x8: dev.alloc::<u8>(x8_len, "FP8 layer input")?,
            ready: false,
            prefer,
        })
    }

    /// Bytes of device memory held.
    pub fn bytes(&self) -> usize {
        self.filters
            .iter()
            .flatten()
            .map(|f| f.num_bytes())
            .sum::<usize>()
            + self.x8.num_bytes()
    }
}
