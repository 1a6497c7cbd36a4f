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

/// The larger of two E4M3 codes of post-ReLU values, as the E4M3 max-pool kernel takes it: a
/// code with the sign bit (−0, or a negative a ReLU would have zeroed) counts as 0. For values
/// ≥ 0 the codes 0x00..=0x7E order like the values they stand for, so pooling the codes equals
/// quantizing the pooled values (the rounding is monotonic): the FP8 path may keep activations
/// E4M3 through a max-pool and still compute what the twin does.
pub fn max_e4m3(a: u8, b: u8) -> u8 {
    let keep = |v: u8| if v & 0x80 != 0 { 0 } else { v };
    keep(a).max(keep(b))
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

/// How the twin runs one feature stage's conv in the masked forwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StageQuant {
    /// In f32, unquantized.
    Exact,
    /// In FP8: input and filter rounded to E4M3 at their scales.
    Fp8,
    /// In FP16 on an input rounded to E4M3 at its scale: the GPU's FP16 conv reading the E4M3
    /// output of the FP8 conv before it, dequantized.
    InputOnly,
}

/// The CPU twin of the FP8 masked forwards: the dequantized E4M3 filters of the capable layers,
/// how each stage runs, and the input scales measured by the last base forward.
#[derive(Clone, Debug)]
pub struct Fp8Emulation {
    /// Per feature stage: `q(w/sw)·sw` (OIHW, f32) where the stage may run in FP8.
    filters: Vec<Option<Vec<f32>>>,
    /// Per feature stage: how it runs (every capable stage FP8 unless [`Fp8Emulation::route`]
    /// says otherwise).
    quant: Vec<StageQuant>,
    /// Per feature stage: the largest |input| of the base forward in progress.
    amax: Vec<f32>,
    /// Per feature stage: `sx` from the last finished base forward (None before one).
    input_scales: Option<Vec<f32>>,
}

impl Fp8Emulation {
    /// Quantize `model`'s capable filters (the rounding of
    /// [`conv_filter_krsc_e4m3`](super::cuda::conv_filter_krsc_e4m3)).
    pub fn new(model: &Vgg) -> Fp8Emulation {
        let capable = capable_stages(model);
        let quant = capable
            .iter()
            .map(|&c| {
                if c {
                    StageQuant::Fp8
                } else {
                    StageQuant::Exact
                }
            })
            .collect();
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
            quant,
            amax: vec![0.0; model.features.len()],
            input_scales: None,
        }
    }

    /// Run the capable stages among `fp8` in FP8, those among `inputs_only` on E4M3-rounded
    /// inputs, the rest exactly: the route a GPU's masked forward takes (where its FP8 plans
    /// won or could be built; see `CudaBackend::fp8_route`).
    pub fn route(&mut self, fp8: &[usize], inputs_only: &[usize]) {
        for (i, q) in self.quant.iter_mut().enumerate() {
            *q = match self.filters[i] {
                Some(_) if fp8.contains(&i) => StageQuant::Fp8,
                Some(_) if inputs_only.contains(&i) => StageQuant::InputOnly,
                _ => StageQuant::Exact,
            };
        }
    }

    /// How stage `stage` runs.
    pub fn quant(&self, stage: usize) -> StageQuant {
        self.quant.get(stage).copied().unwrap_or(StageQuant::Exact)
    }

    /// Whether a base forward has set the input scales (until then every layer runs unquantized).
    pub fn ready(&self) -> bool {
        self.input_scales.is_some()
    }

    /// During a base forward: fold stage `stage`'s input into its amax (every capable stage's,
    /// as on the GPU).
    pub fn measure(&mut self, stage: usize, x: &[f32]) {
        if self.filters.get(stage).is_some_and(|f| f.is_some()) {
            let m = x.iter().fold(self.amax[stage], |m, v| m.max(v.abs()));
            self.amax[stage] = m;
        }
    }

    /// After a base forward: the input scales from its amaxes, which start again from 0.
    pub fn finish_base(&mut self) {
        self.input_scales = Some(self.amax.iter().map(|&a| input_scale(a)).collect());
        self.amax.fill(0.0);
    }

    /// Stage `stage`'s input and filter as its convolution sees them (dequantized; the filter
    /// None where only the input is rounded), or None where it runs unquantized.
    pub fn quantized(&self, stage: usize, x: &[f32]) -> Option<(Vec<f32>, Option<&[f32]>)> {
        let filter = match self.quant(stage) {
            StageQuant::Exact => return None,
            StageQuant::Fp8 => Some(self.filters.get(stage)?.as_deref()?),
            StageQuant::InputOnly => None,
        };
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
    fn pooling_e4m3_codes_equals_quantizing_the_pooled_values() {
        // Every pair of codes of non-negative finite values (and −0): the max code is the code
        // of the max value.
        let codes: Vec<u8> = (0u8..=0x7E).chain([0x80]).collect();
        for &a in &codes {
            for &b in &codes {
                let m = max_e4m3(a, b);
                assert_eq!(
                    e4m3_to_f32(m),
                    e4m3_to_f32(a).max(e4m3_to_f32(b)).max(0.0),
                    "{a:#04x} {b:#04x}"
                );
            }
        }
        // Quantizing then pooling four values equals pooling then quantizing, at any scale.
        let mut seed = 7u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 40) as f32 / (1u64 << 24) as f32
        };
        for scale in [1.0f32, 0.37, 4.0 / 448.0, 2e-3] {
            for _ in 0..20_000 {
                let v: [f32; 4] = std::array::from_fn(|_| (next() * 1.3).powi(3));
                let q = |x: f32| e4m3_from_f32(x * (1.0 / scale));
                let pooled_codes = max_e4m3(max_e4m3(q(v[0]), q(v[1])), max_e4m3(q(v[2]), q(v[3])));
                let pooled = v.iter().copied().fold(0.0f32, f32::max);
                assert_eq!(pooled_codes, q(pooled), "{v:?} at scale {scale}");
            }
        }
        // Negative codes (a ReLU's −0 included) count as zero.
        assert_eq!(max_e4m3(0x80, 0x00), 0x00);
        assert_eq!(max_e4m3(0xB8, 0x01), 0x01);
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
        assert_eq!(e.quant(0), StageQuant::Exact);
        assert_eq!(e.quant(1), StageQuant::Fp8);
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
        for (&v, &q) in l.weight.iter().zip(w.unwrap()) {
            assert!(
                (q - v).abs() <= v.abs() / 16.0 + sw * 2f32.powi(-10),
                "{v} → {q}"
            );
        }
        // A route: stage 0 cannot (not capable); stage 1 left out, then input-only.
        let mut only0 = e.clone();
        only0.route(&[0], &[]);
        assert_eq!(only0.quant(0), StageQuant::Exact);
        assert!(only0.quant(1) == StageQuant::Exact && only0.quantized(1, &x).is_none());
        only0.route(&[], &[1]);
        let (xi, wi) = only0.quantized(1, &x).unwrap();
        assert!(wi.is_none(), "the input only");
        assert_eq!(xi, e.quantized(1, &x).unwrap().0);
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
