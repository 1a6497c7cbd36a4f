//! Gradients for Grad-CAM and Grad-CAM++: d(logit of a class) / d(activations at the capture
//! point), by an explicit backward through the layers after the capture (conv + ReLU, max-pool,
//! adaptive average pool, Linear + ReLU).
//!
//! Both backends use this: they capture the activations (the CUDA backend in FP16 on the device),
//! and the rest of the network is run forward and back here in f32 on the host, recording only
//! what the backward needs (ReLU masks, max-pool winners). For the default layer of VGG16 that is
//! one max-pool and the classifier (≈ 0.25 GFLOP each way).

use rayon::prelude::*;

use super::cpu::{adaptive_avgpool, adaptive_bins, conv3x3, linear, matmul_acc};
use crate::model::{Capture, FeatureStage, Vgg, POOLED};

/// What the backward of one layer needs from its forward.
enum Saved {
    /// A conv + ReLU: which outputs were positive, the layer's index and its input shape.
    Conv {
        layer: usize,
        mask: Vec<bool>,
        cin: usize,
        h: usize,
        w: usize,
    },
    /// A 2×2 max-pool: for each output, the index of the input that won; the input's length.
    Pool { winners: Vec<u32>, input_len: usize },
}

/// The gradient of logit `class` with respect to the activations at `cap`, for one image whose
/// activations there are `acts` `[K, h, w]` (after the ReLU for a ReLU capture, before it for a
/// `pre_relu` capture, the pool's output for a pool). `s` is the model's input side. Returns
/// `[K, h, w]`.
pub fn grad_from_capture(
    model: &Vgg,
    cap: Capture,
    acts: &[f32],
    s: usize,
    class: usize,
) -> Vec<f32> {
    let shape = model.capture_shape(cap, s);
    let (mut c, mut h, mut w) = (shape.c, shape.h, shape.w);
    assert_eq!(
        acts.len(),
        c * h * w,
        "grad_from_capture: activations of the wrong size"
    );
    let mut x = acts.to_vec();
    // A pre-ReLU capture at a conv: the ReLU is the first layer after it.
    let capture_mask: Option<Vec<bool>> = match &model.features[cap.stage] {
        FeatureStage::Conv(_) if cap.pre_relu => {
            let m = x.iter().map(|&v| v > 0.0).collect();
            x.iter_mut().for_each(|v| *v = v.max(0.0));
            Some(m)
        }
        _ => None,
    };

    // Forward from the capture, keeping what the backward needs.
    let mut saved = Vec::new();
    for (i, stage) in model.features.iter().enumerate().skip(cap.stage + 1) {
        match stage {
            FeatureStage::Conv(l) => {
                let mut y = conv3x3(&x, 1, c, h, w, &l.weight, &l.bias, l.cout);
                let mask = y.iter().map(|&v| v > 0.0).collect();
                y.iter_mut().for_each(|v| *v = v.max(0.0));
                saved.push(Saved::Conv {
                    layer: i,
                    mask,
                    cin: c,
                    h,
                    w,
                });
                c = l.cout;
                x = y;
            }
            FeatureStage::MaxPool { .. } => {
                let (y, winners) = maxpool2_with_winners(&x, c, h, w);
                saved.push(Saved::Pool {
                    winners,
                    input_len: x.len(),
                });
                (h, w) = (h / 2, w / 2);
                x = y;
            }
        }
    }
    let (fh, fw) = (h, w);
    let mut feats = adaptive_avgpool(&x, c, h, w, POOLED, POOLED);
    let mut linear_masks = Vec::with_capacity(model.classifier.len());
    for l in &model.classifier {
        let mut y = linear(&feats, 1, l.fin, &l.weight, &l.bias, l.fout);
        if l.relu {
            linear_masks.push(Some(y.iter().map(|&v| v > 0.0).collect::<Vec<bool>>()));
            y.iter_mut().for_each(|v| *v = v.max(0.0));
        } else {
            linear_masks.push(None);
        }
        feats = y;
    }

    // Backward from a one-hot at the class.
    let mut d = vec![0f32; feats.len()];
    d[class] = 1.0;
    for (l, mask) in model.classifier.iter().zip(&linear_masks).rev() {
        if let Some(mask) = mask {
            d.iter_mut().zip(mask).for_each(|(g, &m)| {
                if !m {
                    *g = 0.0
                }
            });
        }
        d = linear_backward(&d, &l.weight, l.fin, l.fout);
    }
    let mut d = adaptive_avgpool_backward(&d, c, fh, fw, POOLED, POOLED);
    for sv in saved.iter().rev() {
        d = match sv {
            Saved::Pool { winners, input_len } => {
                let mut dx = vec![0f32; *input_len];
                for (g, &at) in d.iter().zip(winners) {
                    dx[at as usize] += g;
                }
                dx
            }
            Saved::Conv {
                layer,
                mask,
                cin,
                h,
                w,
            } => {
                let FeatureStage::Conv(l) = &model.features[*layer] else {
                    unreachable!("saved conv at a conv stage")
                };
                d.iter_mut().zip(mask).for_each(|(g, &m)| {
                    if !m {
                        *g = 0.0
                    }
                });
                conv3x3_backward_data(&d, &l.weight, l.cout, *cin, *h, *w)
            }
        };
    }
    if let Some(mask) = capture_mask {
        d.iter_mut().zip(&mask).for_each(|(g, &m)| {
            if !m {
                *g = 0.0
            }
        });
    }
    d
}

/// 2×2 max-pool (floor mode) of `[c, h, w]`, with each output's winning input index. On ties the
/// first in scan order wins, as in PyTorch's CPU kernel (`val > max`).
fn maxpool2_with_winners(x: &[f32], c: usize, h: usize, w: usize) -> (Vec<f32>, Vec<u32>) {
    let (oh, ow) = (h / 2, w / 2);
    let mut y = Vec::with_capacity(c * oh * ow);
    let mut at = Vec::with_capacity(c * oh * ow);
    for p in 0..c {
        for oy in 0..oh {
            for ox in 0..ow {
                let base = p * h * w + 2 * oy * w + 2 * ox;
                let mut best = base;
                for i in [base + 1, base + w, base + w + 1] {
                    if x[i] > x[best] || x[i].is_nan() {
                        best = i;
                    }
                }
                y.push(x[best]);
                at.push(best as u32);
            }
        }
    }
    (y, at)
}

/// `dx[fin] = Wᵀ · dy` for a Linear with `W` `[fout, fin]`.
fn linear_backward(dy: &[f32], weight: &[f32], fin: usize, fout: usize) -> Vec<f32> {
    let mut dx = vec![0f32; fin];
    matmul_acc(
        1,
        fin,
        fout,
        dy,
        weight,
        &mut dx,
        gemm::Parallelism::Rayon(0),
    );
    dx
}

/// The gradient of AdaptiveAvgPool2d((oh, ow)) from `[c, h, w]`: every output spreads its
/// gradient evenly over its bin (PyTorch's bins, as in [`adaptive_avgpool`]).
fn adaptive_avgpool_backward(
    dy: &[f32],
    c: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
) -> Vec<f32> {
    if (h, w) == (oh, ow) {
        return dy[..c * h * w].to_vec();
    }
    let mut dx = vec![0f32; c * h * w];
    dx.par_chunks_mut(h * w).enumerate().for_each(|(p, dst)| {
        let g = &dy[p * oh * ow..][..oh * ow];
        for (&gi, (ys, xs)) in g.iter().zip(adaptive_bins(h, w, oh, ow)) {
            let share = gi / (ys.len() * xs.len()) as f32;
            for yy in ys {
                dst[yy * w..][xs.clone()]
                    .iter_mut()
                    .for_each(|v| *v += share);
            }
        }
    });
    dx
}

/// The gradient of a 3×3 conv (stride 1, pad 1) with respect to its input `[cin, h, w]`, from the
/// gradient of its output `dy` `[cout, h, w]`: `cols = Wᵀ·dy` (`[cin·9, h·w]`), then every column
/// entry added back to the input pixel it was read from (col2im).
fn conv3x3_backward_data(
    dy: &[f32],
    weight: &[f32],
    cout: usize,
    cin: usize,
    h: usize,
    w: usize,
) -> Vec<f32> {
    let hw = h * w;
    // Wᵀ: [cin·9, cout] from W [cout, cin·9].
    let k9 = cin * 9;
    let mut wt = vec![0f32; k9 * cout];
    for o in 0..cout {
        for r in 0..k9 {
            wt[r * cout + o] = weight[o * k9 + r];
        }
    }
    let mut cols = vec![0f32; k9 * hw];
    matmul_acc(
        k9,
        hw,
        cout,
        &wt,
        dy,
        &mut cols,
        gemm::Parallelism::Rayon(0),
    );
    let mut dx = vec![0f32; cin * hw];
    dx.par_chunks_mut(hw).enumerate().for_each(|(ci, dst)| {
        for ky in 0..3 {
            for kx in 0..3 {
                let row = &cols[(ci * 9 + ky * 3 + kx) * hw..][..hw];
                for oy in 0..h {
                    let iy = oy as isize + ky as isize - 1;
                    if iy < 0 || iy >= h as isize {
                        continue;
                    }
                    for ox in 0..w {
                        let ix = ox as isize + kx as isize - 1;
                        if ix >= 0 && ix < w as isize {
                            dst[iy as usize * w + ix as usize] += row[oy * w + ox];
                        }
                    }
                }
            }
        }
    });
    dx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::forward;

    /// The gradient against central finite differences of the logit, in f64 sums of f32 runs.
    #[test]
    fn gradient_matches_finite_differences_at_every_kind_of_capture() {
        let model = Vgg::random_from_config(&[4, 0, 6, 6, 0], &[8, 5], 3, 16);
        let s = 16;
        let x: Vec<f32> = (0..3 * s * s)
            .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
            .collect();
        let class = 2;
        // Captures: a ReLU output, a pre-ReLU conv output, a pool.
        for cap in [
            Capture {
                stage: 2,
                pre_relu: false,
            },
            Capture {
                stage: 3,
                pre_relu: true,
            },
            Capture {
                stage: 1,
                pre_relu: false,
            },
        ] {
            let (_, acts) = forward(&model, &x, 1, s, Some(cap));
            let acts = acts.unwrap();
            let g = grad_from_capture(&model, cap, &acts, s, class);
            assert_eq!(g.len(), acts.len());
            // Logit from the captured activations: push a perturbed copy through the rest.
            let logit = |a: &[f32]| -> f64 {
                let eps_grad = grad_logit_forward(&model, cap, a, s);
                f64::from(eps_grad[class])
            };
            let mut worst = 0f64;
            let mut checked = 0;
            for i in (0..acts.len()).step_by(7) {
                // Stay away from ReLU kinks and pool ties: skip near-zero pre-ReLU values.
                if cap.pre_relu && acts[i].abs() < 1e-2 {
                    continue;
                }
                let h = 1e-2f32;
                let mut p = acts.clone();
                p[i] += h;
                let mut m = acts.clone();
                m[i] -= h;
                let fd = (logit(&p) - logit(&m)) / (2.0 * f64::from(h));
                let d = (fd - f64::from(g[i])).abs();
                worst = worst.max(d / (1e-3 + fd.abs().max(f64::from(g[i].abs()))));
                checked += 1;
            }
            assert!(checked > 10);
            assert!(worst < 2e-2, "{cap:?}: worst relative error {worst}");
            assert!(g.iter().any(|&v| v != 0.0), "{cap:?}: all-zero gradient");
        }
    }

    /// The logits from activations at `cap` (the forward half of `grad_from_capture`).
    fn grad_logit_forward(model: &Vgg, cap: Capture, acts: &[f32], s: usize) -> Vec<f32> {
        let shape = model.capture_shape(cap, s);
        let (mut c, mut h, mut w) = (shape.c, shape.h, shape.w);
        let mut x = acts.to_vec();
        if cap.pre_relu {
            x.iter_mut().for_each(|v| *v = v.max(0.0));
        }
        for stage in model.features.iter().skip(cap.stage + 1) {
            match stage {
                FeatureStage::Conv(l) => {
                    x = conv3x3(&x, 1, c, h, w, &l.weight, &l.bias, l.cout);
                    x.iter_mut().for_each(|v| *v = v.max(0.0));
                    c = l.cout;
                }
                FeatureStage::MaxPool { .. } => {
                    x = maxpool2_with_winners(&x, c, h, w).0;
                    (h, w) = (h / 2, w / 2);
                }
            }
        }
        let mut f = adaptive_avgpool(&x, c, h, w, POOLED, POOLED);
        for l in &model.classifier {
            f = linear(&f, 1, l.fin, &l.weight, &l.bias, l.fout);
            if l.relu {
                f.iter_mut().for_each(|v| *v = v.max(0.0));
            }
        }
        f
    }
}
