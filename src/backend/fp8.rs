//! `--precision fp8`'s numerics, shared by the CUDA path and its CPU twin: which conv layers run
//! in FP8 E4M3, the E4M3 rounding, the weight and input scales, and [`Fp8Emulation`], the CPU
//! forward that computes what the FP8 masked forwards are designed to compute.
//!
//! A layer `y = ReLU(conv(x, w) + b)` runs as `ReLU(sx·sw · conv(q(x/sx), q(w/sw)) + b)`, `q`
//! the E4M3 rounding (saturating at ±448, ties to even). `sw` = the filter's amax / 448, fixed
//! at upload. `sx` = the layer input's amax over the image group's base forward × [`MARGIN`] /
//! 448. The base forward runs unquantized and measures every FP8 layer's input; the masked
//! forwards after it quantize. Masked inputs are the image times a mask in [0, 1], so their
//! activations rarely exceed the image's; the margin and the saturating rounding cover those
//! that do.
//!
//! The CPU twin quantizes and dequantizes ("fake quantization") and convolves in f32, which is
//! the FP8 convolution's arithmetic (exact E4M3 products, f32 accumulation) up to the order of
//! the f32 sums. Its activations between layers are f32 where CUDA's are FP16.

use crate::model::{FeatureStage, Vgg};

/// The largest finite E4M3 value.
pub const E4M3_MAX: f32 = 448.0;

/// Headroom of the input scales over the base forward's amax.
pub const MARGIN: f32 = 2.0;

/// `x` as E4M3 bits, clamped to ±448 first (so finite inputs never become NaN): cuda_fp8.hpp's
/// `__NV_SATFINITE` conversion, which the quantize kernel reproduces.
pub fn e4m3_from_f32(x: f32) -> u8 {
    let x = if x.is_nan() {
        x
    } else {
        x.clamp(-E4M3_MAX, E4M3_MAX)
    };
    float8::F8E4M3::from_f32(x).to_bits()
}

/// The value of E4M3 bits.
pub fn e4m3_to_f32(bits: u8) -> f32 {
    float8::F8E4M3::from_bits(bits).to_f32()
}

/// `v` rounded to E4M3 at `scale` and back: `q(v / scale)·scale`, the division a multiplication
/// by `1 / scale` in f32 as the kernels do it.
pub fn fake_quantize(v: f32, scale: f32) -> f32 {
    e4m3_to_f32(e4m3_from_f32(v * (1.0 / scale))) * scale
}

/// Per feature stage: whether it may run in FP8. FP8 tensor-core convolutions want the stored
/// channel counts in multiples of 16; the first conv's input is stored with
/// [`CPAD`](super::cuda::CPAD) channels, so it stays FP16.
pub fn capable_stages(model: &Vgg) -> Vec<bool> {
    let mut first = true;
    model
        .features
        .iter()
        .map(|stage| match stage {
            FeatureStage::Conv(l) => {
                let cin_stored = if first { super::cuda::CPAD } else { l.cin };
                first = false;
                cin_stored.is_multiple_of(16) && l.cout.is_multiple_of(16)
            }
            FeatureStage::MaxPool { .. } => false,
        })
        .collect()
}

/// A filter's scale `sw`: its amax / 448 (1 for an all-zero or non-finite filter).
pub fn weight_scale(weight: &[f32]) -> f32 {
    let amax = weight.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    if amax > 0.0 && amax.is_finite() {
        amax / E4M3_MAX
    } else {
        1.0
    }
}

/// A layer input's scale `sx` from the base forward's amax (kernels/fp8.cu's `fp8_scales`: an
/// amax beyond FP16's range is capped at it, so the scales stay finite).
pub fn input_scale(amax: f32) -> f32 {
    (amax.min(65504.0) * MARGIN).max(1e-30) / E4M3_MAX
}

/// The CPU twin of the FP8 masked forwards: the dequantized E4M3 filters of the capable layers,
/// and the input scales measured by the last base forward.
#[derive(Clone, Debug)]
pub struct Fp8Emulation {
    /// Per feature stage: `q(w/sw)·sw` (OIHW, f32) where the stage runs in FP8.
    filters: Vec<Option<Vec<f32>>>,
    /// Per feature stage: the largest |input| of the base forward in progress.
    amax: Vec<f32>,
    /// Per feature stage: `sx` from the last finished base forward (None before one).
    input_scales: Option<Vec<f32>>,
}

impl Fp8Emulation {
    /// Quantize `model`'s capable filters (the rounding of
    /// [`conv_filter_krsc_e4m3`](super::cuda::layout::conv_filter_krsc_e4m3)).
    pub fn new(model: &Vgg) -> Fp8Emulation {
        let capable = capable_stages(model);
        let filters = model
            .features
            .iter()
            .zip(&capable)
            .map(|(stage, &fp8)| match stage {
                FeatureStage::Conv(l) if fp8 => {
                    let sw = weight_scale(&l.weight);
                    Some(l.weight.iter().map(|&v| fake_quantize(v, sw)).collect())
                }
                _ => None,
            })
            .collect();
        Fp8Emulation {
            filters,
            amax: vec![0.0; model.features.len()],
            input_scales: None,
        }
    }

    /// Quantize only the capable stages among `stages` (as a GPU runs where its FP8 plans won or
    /// could be built).
    pub fn retain_stages(&mut self, stages: &[usize]) {
        for (i, f) in self.filters.iter_mut().enumerate() {
            if !stages.contains(&i) {
                *f = None;
            }
        }
    }

    /// Whether stage `stage` runs in FP8.
    pub fn is_fp8(&self, stage: usize) -> bool {
        self.filters.get(stage).is_some_and(|f| f.is_some())
    }

    /// Whether a base forward has set the input scales (until then every layer runs unquantized).
    pub fn ready(&self) -> bool {
        self.input_scales.is_some()
    }

    /// During a base forward: fold stage `stage`'s input into its amax.
    pub fn measure(&mut self, stage: usize, x: &[f32]) {
        if self.is_fp8(stage) {
            let m = x.iter().fold(self.amax[stage], |m, v| m.max(v.abs()));
            self.amax[stage] = m;
        }
    }

    /// After a base forward: the input scales from its amaxes, which start again from 0.
    pub fn finish_base(&mut self) {
        self.input_scales = Some(self.amax.iter().map(|&a| input_scale(a)).collect());
        self.amax.fill(0.0);
    }

    /// Stage `stage`'s input and filter as the FP8 convolution sees them (dequantized), or None
    /// where it runs unquantized.
    pub fn quantized(&self, stage: usize, x: &[f32]) -> Option<(Vec<f32>, &[f32])> {
        let filter = self.filters.get(stage)?.as_deref()?;
        let sx = self.input_scales.as_ref()?[stage];
        Some((x.iter().map(|&v| fake_quantize(v, sx)).collect(), filter))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vgg16_runs_every_conv_but_the_first_in_fp8() {
        let m = Vgg::random_from_config(crate::model::VGG16_CONFIG, &[8, 8, 10], 1, 32);
        let capable = capable_stages(&m);
        let convs: Vec<usize> = (0..m.features.len())
            .filter(|&i| matches!(m.features[i], FeatureStage::Conv(_)))
            .collect();
        assert_eq!(convs.len(), 13);
        assert!(!capable[convs[0]], "the first conv (3 → 64) stays FP16");
        assert!(convs[1..].iter().all(|&i| capable[i]));
        // Pools never; a conv with 24 channels never.
        let tiny = Vgg::random_from_config(&[16, 0, 32, 24, 16], &[8, 10], 2, 16);
        assert_eq!(
            capable_stages(&tiny),
            vec![false, false, true, false, false]
        );
    }

    #[test]
    fn scales_follow_the_kernel() {
        assert_eq!(weight_scale(&[0.5, -2.24, 1.0]), 2.24 / 448.0);
        assert_eq!(weight_scale(&[0.0; 4]), 1.0);
        assert_eq!(weight_scale(&[f32::INFINITY]), 1.0);
        assert_eq!(input_scale(112.0), 0.5);
        assert!(
            input_scale(0.0) > 0.0,
            "an all-zero input still gets a finite scale"
        );
        assert_eq!(input_scale(f32::INFINITY), input_scale(65504.0));
    }

    #[test]
    fn emulation_quantizes_after_a_base_forward_only() {
        let m = Vgg::random_from_config(&[16, 32], &[8, 10], 3, 8);
        let mut e = Fp8Emulation::new(&m);
        assert!(!e.is_fp8(0) && e.is_fp8(1));
        let x = [0.3f32, -1.7, 0.0, 2.0];
        assert!(
            e.quantized(1, &x).is_none(),
            "no scales before a base forward"
        );
        e.measure(1, &x);
        e.measure(1, &[1.0]);
        e.finish_base();
        let sx = input_scale(2.0);
        let (xq, w) = e.quantized(1, &x).unwrap();
        for (&v, &q) in x.iter().zip(&xq) {
            let want = e4m3_to_f32(e4m3_from_f32(v * (1.0 / sx))) * sx;
            assert_eq!(q, want);
            // 3 mantissa bits: within 1/16 relative, or the subnormal step.
            assert!((q - v).abs() <= v.abs() / 16.0 + sx * 2f32.powi(-10));
        }
        // The amax maps to 448/MARGIN = 224, on the E4M3 grid: exact up to the f32 scale.
        assert!((xq[3] - 2.0).abs() < 1e-6);
        let FeatureStage::Conv(l) = &m.features[1] else {
            unreachable!()
        };
        let sw = weight_scale(&l.weight);
        for (&v, &q) in l.weight.iter().zip(w) {
            assert!(
                (q - v).abs() <= v.abs() / 16.0 + sw * 2f32.powi(-10),
                "{v} → {q}"
            );
        }
        let mut only0 = e.clone();
        only0.retain_stages(&[0]);
        assert!(!only0.is_fp8(1) && only0.quantized(1, &x).is_none());
        // The amax restarts: a second base forward measures afresh.
        e.measure(1, &[4.0]);
        e.finish_base();
        let (xq, _) = e.quantized(1, &[4.0, 8.0]).unwrap();
        assert!((xq[0] - 4.0).abs() < 1e-6);
        assert!(
            (xq[1] - 8.0).abs() < 1e-5,
            "2× the amax is at 448, still exact"
        );
    }
}
