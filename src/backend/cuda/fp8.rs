//! `--precision fp8`: the conv layers that may run in FP8 E4M3, their quantized filters, and
//! the per-layer scales.
//!
//! The numerics (which layers, the rounding, the scales) are [`crate::backend::fp8`]'s; here
//! they live on the device: the base forward measures every FP8 layer's input, then one small
//! kernel turns the amaxes into the multipliers and descales the masked forwards read from
//! device memory (so captured CUDA graphs stay valid).
//!
//! Between two FP8 convs the activations stay E4M3 where cuDNN offers the E4M3-output form
//! ([`route`]): the first conv quantizes its own output at the second's multiplier, the max-pool
//! between works on the codes, and no quantize pass runs. Elsewhere an FP8 conv's FP16 input is
//! quantized by a kernel into [`Fp8State::x8`] first.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView};
use half::f16;

use super::device::Dev;
use super::kernels::{Kernels, DESCALE_AT, MULTIPLIER_AT, SCALE_STRIDE};
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
        kernels.quantize_e4m3(stream, x, n, &multiplier, &mut self.x8.slice_mut(..n))
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

/// How one feature stage of an FP8 forward runs: in FP8 or not, and in which format its input
/// and output activations are (E4M3 codes, one byte each at the start of the FP16 rows they
/// replace, or FP16). A batch read whole starts at the buffer's first byte either way; a
/// sub-batch chunk's rows start at their FP16 offset, except where `packed_out` says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct StageRoute {
    /// The stage is a conv (else a pool).
    pub conv: bool,
    /// The conv runs an FP8 plan.
    pub fp8: bool,
    /// The input is E4M3 at this stage's multiplier (for a conv: already quantized).
    pub e4m3_in: bool,
    /// The output is E4M3: a conv's at the multiplier of conv stage `next`, a pool's as its input.
    pub e4m3_out: bool,
    /// The next conv stage (after any pools), whose multiplier an E4M3 conv output is at.
    pub next: Option<usize>,
    /// The E4M3 output of `rows` rows from row `row0` goes to bytes `row0·len..` of the buffer
    /// (packed) rather than to the first bytes of its FP16 rows: set on the last stage of
    /// sub-batched blocks 1–2, whose chunks the full batch after them reads as one.
    pub packed_out: bool,
}

/// The plans a conv key has for an FP8 forward: FP8 with an FP16 output, FP8 with an E4M3
/// output, FP16 with an E4M3 output (an FP16 layer before an FP8 one).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Fp8Forms {
    pub half_out: bool,
    pub e4m3_out: bool,
    pub fp16_e4m3_out: bool,
}

/// The route of one forward's feature stages, from the FP8 plans each conv key has (`None`:
/// a pool). A conv with an FP8 plan runs FP8. It writes E4M3 (its E4M3-output form, which
/// exists only where the next conv may run FP8) when the next conv runs FP8, or when it has no
/// FP16-output form; a next conv that then runs FP16 reads its input dequantized (it sees the
/// E4M3-rounded values an FP8 conv would). An FP16 conv with an E4M3-output plan writes E4M3
/// when the next conv runs FP8. The last conv's output, which the head reads, stays FP16.
pub(super) fn route(forms: &[Option<Fp8Forms>]) -> Vec<StageRoute> {
    let n = forms.len();
    let mut routes = vec![StageRoute::default(); n];
    // Backwards: the next conv and whether it runs FP8.
    let mut next: Option<(usize, bool)> = None;
    for i in (0..n).rev() {
        let Some(f) = forms[i] else { continue };
        let r = &mut routes[i];
        r.conv = true;
        r.next = next.map(|(j, _)| j);
        let next_fp8 = next.is_some_and(|(_, fp8)| fp8);
        r.e4m3_out = f.e4m3_out && next.is_some() && (next_fp8 || !f.half_out);
        r.fp8 = f.half_out || r.e4m3_out;
        // An FP16 conv's E4M3 output.
        r.e4m3_out |= !r.fp8 && f.fp16_e4m3_out && next_fp8;
        next = Some((i, r.fp8));
    }
    // Forwards: the format each stage reads; pools pass theirs on.
    let mut e4m3 = false;
    for (i, r) in routes.iter_mut().enumerate() {
        r.e4m3_in = e4m3;
        if forms[i].is_none() {
            r.e4m3_out = e4m3;
        }
        e4m3 = r.e4m3_out;
    }
    routes
}

impl StageRoute {
    /// A conv that runs FP16 on an E4M3 input: its input is dequantized first (a pool works on
    /// the codes).
    pub fn dequantizes(&self) -> bool {
        self.conv && self.e4m3_in && !self.fp8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn forms(half_out: bool, e4m3_out: bool, fp16_e4m3_out: bool) -> Option<Fp8Forms> {
        Some(Fp8Forms {
            half_out,
            e4m3_out,
            fp16_e4m3_out,
        })
    }
    const BOTH: Option<Fp8Forms> = forms(true, true, false);
    const HALF: Option<Fp8Forms> = forms(true, false, false);
    const E4M3: Option<Fp8Forms> = forms(false, true, false);
    const FP16: Option<Fp8Forms> = forms(false, false, false);
    /// An FP16 conv with an E4M3-output plan.
    const FP16_E4M3: Option<Fp8Forms> = forms(false, false, true);
    const POOL: Option<Fp8Forms> = None;

    fn summary(r: &[StageRoute]) -> Vec<(bool, bool, bool)> {
        r.iter().map(|s| (s.fp8, s.e4m3_in, s.e4m3_out)).collect()
    }

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

    #[test]
    fn activations_stay_e4m3_between_fp8_convs_and_through_pools() {
        // conv(FP16) conv pool conv conv pool → head
        let r = route(&[FP16, BOTH, POOL, BOTH, BOTH, POOL]);
        assert_eq!(
            summary(&r),
            [
                (false, false, false),
                (true, false, true), // quantizes its FP16 input, writes E4M3
                (false, true, true), // pools the codes
                (true, true, true),
                (true, true, false), // the last conv writes FP16 for the head
                (false, false, false),
            ]
        );
        assert!(!r[2].dequantizes(), "a pool works on the codes");
        assert_eq!(r[1].next, Some(3));
        assert_eq!(r[3].next, Some(4));
        assert_eq!(r[4].next, None);
    }

    #[test]
    fn an_fp16_conv_writes_e4m3_only_for_an_fp8_conv() {
        // conv(FP16, E4M3 out) conv pool conv: the first conv quantizes for the second.
        let r = route(&[FP16_E4M3, BOTH, POOL, HALF]);
        assert_eq!(
            summary(&r),
            [
                (false, false, true),
                (true, true, true),
                (false, true, true),
                (true, true, false),
            ]
        );
        assert!(r.iter().all(|s| !s.dequantizes()));
        // Before an FP16 conv it writes FP16.
        let r = route(&[FP16_E4M3, FP16, HALF]);
        assert_eq!(
            summary(&r),
            [
                (false, false, false),
                (false, false, false),
                (true, false, false),
            ]
        );
    }

    #[test]
    fn an_fp16_conv_after_an_e4m3_only_conv_reads_its_input_dequantized() {
        // The last conv has no FP8 plan here (say cuDNN refused its FP16-output form): the conv
        // before still runs FP8, writing E4M3, and the last one dequantizes its input.
        let r = route(&[BOTH, E4M3, FP16]);
        assert_eq!(
            summary(&r),
            [
                (true, false, true),
                (true, true, true),
                (false, true, false),
            ]
        );
        assert!(r[2].dequantizes() && !r[1].dequantizes());
        // With both forms it writes FP16 for an FP16 next conv instead (no dequantize pass).
        let r = route(&[BOTH, POOL, BOTH, FP16]);
        assert_eq!(
            summary(&r),
            [
                (true, false, true),
                (false, true, true),
                (true, true, false),
                (false, false, false),
            ]
        );
        // An E4M3-only last conv has no reader: it runs FP16 (its plan exists only with a next).
        let r = route(&[BOTH, E4M3]);
        assert_eq!(summary(&r), [(true, false, false), (false, false, false)]);
        // Every E4M3 output has a conv reading it, every conv reading E4M3 runs FP8 or
        // dequantizes, and the head reads FP16.
        for forms in [
            vec![E4M3, E4M3, E4M3, POOL],
            vec![BOTH, POOL, POOL, BOTH, E4M3],
            vec![HALF, E4M3, BOTH, FP16, E4M3, BOTH, POOL],
            vec![E4M3, FP16, E4M3, POOL, HALF, E4M3, E4M3, FP16, POOL],
            vec![FP16_E4M3, E4M3, FP16_E4M3, POOL, E4M3, FP16_E4M3, HALF],
        ] {
            let r = route(&forms);
            for (i, s) in r.iter().enumerate() {
                assert_eq!(s.conv, forms[i].is_some());
                if s.dequantizes() {
                    assert!(s.conv && s.e4m3_in && !s.fp8, "{forms:?}: stage {i}");
                }
                if forms[i].is_none() {
                    assert!(!s.dequantizes() && !s.fp8, "{forms:?}: pool {i}");
                    assert_eq!(s.e4m3_in, s.e4m3_out, "{forms:?}: pool {i}");
                }
                if forms[i].is_some() && s.e4m3_out {
                    let next = s.next.expect("an E4M3 output has a reader");
                    assert!(r[next].e4m3_in, "{forms:?}: stage {i}");
                }
                if let Some(f) = forms[i] {
                    match (s.fp8, s.e4m3_out) {
                        (true, true) => assert!(f.e4m3_out),
                        (true, false) => assert!(f.half_out),
                        (false, true) => assert!(f.fp16_e4m3_out),
                        (false, false) => {}
                    }
                }
            }
            assert!(!r.last().unwrap().e4m3_out, "{forms:?}");
        }
    }
}
