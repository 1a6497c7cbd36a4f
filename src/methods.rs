//! The explanation methods besides plain Score-CAM, and the per-method math `cam.rs` calls:
//! channel selection (Faster Score-CAM), the masks of every round (SS-CAM's noise, IS-CAM's
//! integration), channel weights from gradients (Grad-CAM, Grad-CAM++), final scaling.
//!
//! | method | reference | masks / gradients | weights | map |
//! |---|---|---|---|---|
//! | `scorecam` | `--mode` (official, pytorch-grad-cam) | one per channel | per `--mode` | per `--mode` |
//! | `faster-scorecam` | tf-keras-vis `max_N` | the N channels of largest spatial std | per `--mode`, over those | per `--mode` |
//! | `sscam` | torchcam 0.5.0 `SSCAM` | N noisy copies per channel | softmax of mean(logit − base) | ReLU, min-max, upsample |
//! | `iscam` | torchcam 0.5.0 `ISCAM` | N scaled copies per channel | softmax of mean(logit − base) | ReLU, min-max, upsample |
//! | `gradcam` | pytorch-grad-cam 1.5.7 `GradCAM` | d logit / d A | spatial mean | pytorch-grad-cam scaling |
//! | `gradcam++` | pytorch-grad-cam 1.5.7 `GradCAMPlusPlus` | d logit / d A | α·ReLU(grad), summed | pytorch-grad-cam scaling |

use crate::backend::cpu::{min_max, upsample_bilinear};
use crate::backend::{MaskStyle, Noise, Semantics};

/// How an image is explained.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Method {
    /// Score-CAM in the options' semantics (official or channel-softmax).
    #[default]
    ScoreCam,
    /// Score-CAM on the `max_channels` channels of largest spatial standard deviation only.
    FasterScoreCam { max_channels: usize },
    /// SS-CAM: `samples` rounds of masks with N(0, σ²) noise added (stream `seed`).
    SsCam {
        samples: usize,
        sigma: f32,
        seed: u64,
    },
    /// IS-CAM: `steps` rounds of masks scaled by the running coefficient Σ_{t≤i} t/steps.
    IsCam { steps: usize },
    /// Grad-CAM: weights are the spatial means of the gradient.
    GradCam,
    /// Grad-CAM++.
    GradCamPlusPlus,
}

impl Method {
    pub fn name(&self) -> &'static str {
        match self {
            Method::ScoreCam => "scorecam",
            Method::FasterScoreCam { .. } => "faster-scorecam",
            Method::SsCam { .. } => "sscam",
            Method::IsCam { .. } => "iscam",
            Method::GradCam => "gradcam",
            Method::GradCamPlusPlus => "gradcam++",
        }
    }

    /// Grad-CAM and Grad-CAM++ need gradients and no masked passes.
    pub fn uses_gradients(&self) -> bool {
        matches!(self, Method::GradCam | Method::GradCamPlusPlus)
    }

    /// The semantics the method's masks, scores and map follow (`base`: `--mode`).
    pub fn semantics(&self, base: Semantics) -> Semantics {
        match self {
            Method::ScoreCam | Method::FasterScoreCam { .. } => base,
            Method::SsCam { .. } | Method::IsCam { .. } => Semantics::Torchcam,
            // Grad-CAM maps are scaled as pytorch-grad-cam scales its Score-CAM maps.
            Method::GradCam | Method::GradCamPlusPlus => Semantics::ChannelSoftmax,
        }
    }

    /// The masks of every round of masked passes: one for Score-CAM, `samples` noisy ones for
    /// SS-CAM (stream = the round), `steps` scaled ones for IS-CAM. Empty for gradient methods.
    pub fn rounds(&self, base: Semantics) -> Vec<(MaskStyle, u32)> {
        let sem = self.semantics(base);
        match self {
            Method::ScoreCam | Method::FasterScoreCam { .. } => vec![(sem.into(), 0)],
            Method::SsCam {
                samples,
                sigma,
                seed,
            } => (0..*samples as u32)
                .map(|j| {
                    let style = MaskStyle {
                        sem,
                        scale: 1.0,
                        noise: Some(Noise {
                            seed: *seed,
                            sigma: *sigma,
                        }),
                    };
                    (style, j)
                })
                .collect(),
            Method::IsCam { steps } => iscam_coefficients(*steps)
                .into_iter()
                .map(|scale| {
                    let style = MaskStyle {
                        sem,
                        scale,
                        noise: None,
                    };
                    (style, 0)
                })
                .collect(),
            Method::GradCam | Method::GradCamPlusPlus => Vec::new(),
        }
    }

    /// Whether a flat channel's masked input is all zeros in every round (so one forward of a
    /// zero input serves every flat channel); SS-CAM's noise makes them differ.
    pub fn flat_masks_are_zero(&self) -> bool {
        !matches!(self, Method::SsCam { .. })
    }

    /// Check the parameters; the message names the option.
    pub fn check(&self, channels: usize) -> Result<(), String> {
        match self {
            Method::FasterScoreCam { max_channels } if *max_channels == 0 || *max_channels > channels => {
                Err(format!(
                    "--max-channels {max_channels}: the layer has {channels} channels (1..={channels})"
                ))
            }
            Method::SsCam { samples: 0, .. } => Err("--samples must be at least 1".into()),
            Method::SsCam { sigma, .. } if !(sigma.is_finite() && *sigma >= 0.0) => {
                Err(format!("--sigma {sigma}: must be a finite number ≥ 0"))
            }
            Method::IsCam { steps: 0 } => Err("--steps must be at least 1".into()),
            _ => Ok(()),
        }
    }
}

/// IS-CAM's mask scales: round `i` (1-based) multiplies the masked input by Σ_{t=1..i} t/N,
/// accumulated in f32 as torchcam does (`coeff += (i + 1) / N`).
pub fn iscam_coefficients(steps: usize) -> Vec<f32> {
    let mut coeff = 0f64;
    (0..steps)
        .map(|i| {
            // torchcam adds Python floats (f64) and multiplies an f32 tensor by the result.
            coeff += (i as f64 + 1.0) / steps as f64;
            coeff as f32
        })
        .collect()
}

/// The `n` channels of `acts` `[k, plane]` with the largest spatial standard deviation
/// (tf-keras-vis `max_N`; `tf.math.top_k` puts the lower index first among equals).
pub fn top_std_channels(acts: &[f32], k: usize, plane: usize, n: usize) -> Vec<bool> {
    let std: Vec<f64> = (0..k)
        .map(|c| {
            let a = &acts[c * plane..][..plane];
            let mean = a.iter().map(|&v| f64::from(v)).sum::<f64>() / plane as f64;
            (a.iter()
                .map(|&v| (f64::from(v) - mean).powi(2))
                .sum::<f64>()
                / plane as f64)
                .sqrt()
        })
        .collect();
    let mut order: Vec<usize> = (0..k).collect();
    order.sort_by(|&a, &b| std[b].total_cmp(&std[a]).then(a.cmp(&b)));
    let mut keep = vec![false; k];
    for &c in order.iter().take(n) {
        keep[c] = true;
    }
    keep
}

/// Grad-CAM weights: the spatial mean of each channel's gradient (`grads` `[k, plane]`).
pub fn gradcam_weights(grads: &[f32], k: usize, plane: usize) -> Vec<f32> {
    (0..k)
        .map(|c| {
            let g = &grads[c * plane..][..plane];
            (g.iter().map(|&v| f64::from(v)).sum::<f64>() / plane as f64) as f32
        })
        .collect()
}

/// Grad-CAM++ weights as pytorch-grad-cam 1.5.7 computes them:
/// `a = g² / (2g² + (Σ A)·g³ + 1e-6)` where `g ≠ 0` (else 0), `w_k = Σ ReLU(g)·a` over the plane.
pub fn gradcam_pp_weights(grads: &[f32], acts: &[f32], k: usize, plane: usize) -> Vec<f32> {
    (0..k)
        .map(|c| {
            let g = &grads[c * plane..][..plane];
            let sum_a: f32 = acts[c * plane..][..plane].iter().sum();
            let mut w = 0f32;
            for &gv in g {
                let g2 = gv * gv;
                let g3 = g2 * gv;
                let aij = if gv != 0.0 {
                    g2 / (2.0 * g2 + sum_a * g3 + 1e-6)
                } else {
                    0.0
                };
                w += gv.max(0.0) * aij;
            }
            w
        })
        .collect()
}

/// torchcam's map from `ReLU(Σ w_k A_k)` `[h, w]`: `(x − min)/(max(x − min) + 1e-8)`, then
/// upsampled to S×S (half-pixel bilinear). Returns the map and whether it was constant.
pub fn torchcam_scale(low: &[f32], h: usize, w: usize, s: usize) -> (Vec<f32>, bool) {
    let mut x = low.to_vec();
    let (lo, hi) = min_max(&x);
    x.iter_mut().for_each(|v| *v -= lo);
    let (_, top) = min_max(&x);
    x.iter_mut().for_each(|v| *v /= top + 1e-8);
    (upsample_bilinear(&x, h, w, s, false), lo == hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iscam_coefficients_accumulate() {
        let c = iscam_coefficients(4);
        let want = [0.25f32, 0.75, 1.5, 2.5];
        for (a, b) in c.iter().zip(want) {
            assert!((a - b).abs() < 1e-7, "{c:?}");
        }
    }

    #[test]
    fn top_std_picks_the_spread_out_channels_lower_index_first() {
        // 4 channels of 4 values: std 0, 2, 2, 1.
        let acts = [
            1.0, 1.0, 1.0, 1.0, //
            0.0, 4.0, 0.0, 4.0, //
            4.0, 0.0, 4.0, 0.0, //
            0.0, 2.0, 0.0, 2.0,
        ];
        assert_eq!(
            top_std_channels(&acts, 4, 4, 1),
            [false, true, false, false]
        );
        assert_eq!(top_std_channels(&acts, 4, 4, 3), [false, true, true, true]);
    }

    #[test]
    fn gradcam_weights_by_hand() {
        let g = [1.0, 3.0, -2.0, 0.0];
        assert_eq!(gradcam_weights(&g, 2, 2), [2.0, -1.0]);
        // One channel, g = [1, 0], A sums to 3: a = 1 / (2 + 3 + 1e-6); w = 1·a.
        let w = gradcam_pp_weights(&[1.0, 0.0], &[1.0, 2.0], 1, 2);
        assert!((w[0] - 1.0 / (5.0 + 1e-6)).abs() < 1e-7);
        // Negative gradients contribute nothing.
        assert_eq!(gradcam_pp_weights(&[-1.0, -2.0], &[1.0, 2.0], 1, 2), [0.0]);
    }

    #[test]
    fn methods_check_their_parameters() {
        assert!(Method::FasterScoreCam { max_channels: 0 }.check(8).is_err());
        assert!(Method::FasterScoreCam { max_channels: 9 }.check(8).is_err());
        assert!(Method::FasterScoreCam { max_channels: 8 }.check(8).is_ok());
        assert!(Method::SsCam {
            samples: 0,
            sigma: 2.0,
            seed: 0
        }
        .check(8)
        .is_err());
        assert!(Method::SsCam {
            samples: 1,
            sigma: f32::NAN,
            seed: 0
        }
        .check(8)
        .is_err());
        assert!(Method::IsCam { steps: 0 }.check(8).is_err());
        assert_eq!(
            Method::IsCam { steps: 3 }.rounds(Semantics::Official).len(),
            3
        );
        assert!(Method::GradCam.rounds(Semantics::Official).is_empty());
    }
}
