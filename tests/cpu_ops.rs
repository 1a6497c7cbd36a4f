//! Every CPU op against naive loops written straight from the definitions.

mod common;

use common::{naive_conv3x3, values};
use scorecam_gpu::backend::cpu::{self, CpuBackend};
use scorecam_gpu::backend::{normal_noise, Backend, MaskItem, MaskStyle, Noise, Plan, Semantics};
use scorecam_gpu::model::{Capture, FeatureStage, Vgg, POOLED};
use std::sync::Arc;

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "{what}[{i}]: got {g}, want {w}"
        );
    }
}

#[test]
fn conv3x3_matches_naive() {
    for &(n, cin, cout, h, w) in &[
        (1, 3, 4, 5, 7),
        (2, 5, 3, 8, 8),
        (3, 2, 6, 1, 1),
        (1, 16, 8, 6, 3),
    ] {
        let x = values(n * cin * h * w, 1);
        let wt = values(cout * cin * 9, 2);
        let b = values(cout, 3);
        let got = cpu::conv3x3(&x, n, cin, h, w, &wt, &b, cout);
        let want = naive_conv3x3(&x, n, cin, h, w, &wt, &b, cout);
        assert_close(
            &got,
            &want,
            1e-5,
            &format!("conv {n}x{cin}x{h}x{w}->{cout}"),
        );
    }
}

#[test]
fn maxpool_and_avgpool_match_naive() {
    let (planes, h, w) = (3, 7, 6);
    let x = values(planes * h * w, 4);
    let got = cpu::maxpool2(&x, planes, h, w);
    let mut want = Vec::new();
    for p in 0..planes {
        for oy in 0..h / 2 {
            for ox in 0..w / 2 {
                let mut m = f32::NEG_INFINITY;
                for dy in 0..2 {
                    for dx in 0..2 {
                        m = m.max(x[p * h * w + (2 * oy + dy) * w + 2 * ox + dx]);
                    }
                }
                want.push(m);
            }
        }
    }
    assert_eq!(got, want);

    // Adaptive average pooling: PyTorch's bins, for shrinking (10→7), growing (4→7) and identity.
    for &(h, w) in &[(10, 9), (4, 4), (7, 7), (1, 2)] {
        let x = values(2 * h * w, 5);
        let got = cpu::adaptive_avgpool(&x, 2, h, w, 7, 7);
        let mut want = Vec::new();
        for p in 0..2 {
            for oy in 0..7 {
                let (y0, y1) = ((oy * h) / 7, ((oy + 1) * h).div_ceil(7));
                for ox in 0..7 {
                    let (x0, x1) = ((ox * w) / 7, ((ox + 1) * w).div_ceil(7));
                    let mut s = 0.0;
                    for yy in y0..y1 {
                        for xx in x0..x1 {
                            s += x[p * h * w + yy * w + xx];
                        }
                    }
                    want.push(s / ((y1 - y0) * (x1 - x0)) as f32);
                }
            }
        }
        assert_close(&got, &want, 1e-6, &format!("avgpool {h}x{w}"));
    }
}

#[test]
fn linear_matches_naive() {
    let (n, fin, fout) = (3, 17, 5);
    let x = values(n * fin, 6);
    let wt = values(fout * fin, 7);
    let b = values(fout, 8);
    let got = cpu::linear(&x, n, fin, &wt, &b, fout);
    let want: Vec<f32> = (0..n)
        .flat_map(|i| {
            let (x, wt, b) = (&x, &wt, &b);
            (0..fout).map(move |o| {
                b[o] + (0..fin)
                    .map(|k| x[i * fin + k] * wt[o * fin + k])
                    .sum::<f32>()
            })
        })
        .collect();
    assert_close(&got, &want, 1e-5, "linear");
}

/// PyTorch's bilinear interpolation, written out from its source formula for one output pixel.
fn torch_bilinear(a: &[f32], h: usize, w: usize, s: usize, y: usize, x: usize, align: bool) -> f32 {
    let coord = |d: usize, inp: usize| -> f32 {
        if align {
            d as f32 * (inp as f32 - 1.0) / (s as f32 - 1.0)
        } else {
            (((d as f32) + 0.5) * inp as f32 / s as f32 - 0.5).max(0.0)
        }
    };
    let (sy, sx) = (coord(y, h), coord(x, w));
    let (y0, x0) = (sy.floor() as usize, sx.floor() as usize);
    let (y1, x1) = ((y0 + 1).min(h - 1), (x0 + 1).min(w - 1));
    let (ly, lx) = (sy - y0 as f32, sx - x0 as f32);
    (1.0 - ly) * ((1.0 - lx) * a[y0 * w + x0] + lx * a[y0 * w + x1])
        + ly * ((1.0 - lx) * a[y1 * w + x0] + lx * a[y1 * w + x1])
}

#[test]
fn upsample_matches_pytorch_formula() {
    for &(h, w, s) in &[(14, 14, 224), (4, 4, 32), (3, 5, 17), (1, 1, 8)] {
        let a = values(h * w, 9);
        for align in [false, true] {
            let got = cpu::upsample_bilinear(&a, h, w, s, align);
            for y in 0..s {
                for x in 0..s {
                    let want = torch_bilinear(&a, h, w, s, y, x, align);
                    assert!(
                        (got[y * s + x] - want).abs() < 1e-5,
                        "({h},{w})->{s} align={align} at ({y},{x})"
                    );
                }
            }
        }
    }
}

fn prepared_backend(model: &Arc<Vgg>, cap: Capture, n: usize) -> CpuBackend {
    let mut be = CpuBackend::new();
    let plan = Plan {
        input_size: model.input_size(),
        max_images: n,
        max_masks: 8,
        capture: cap,
    };
    be.prepare(model, plan).unwrap();
    be
}

#[test]
fn masked_inputs_scores_and_combine_match_naive() {
    let model = Arc::new(Vgg::random_from_config(&[4, 0, 6, 0], &[5], 3, 32));
    let cap = model.default_capture();
    let mut be = prepared_backend(&model, cap, 2);
    let (s, k, h, w) = (32, 6, 16, 16);
    let mut images = be.alloc(&[2, 3, s, s]).unwrap();
    images.data = values(2 * 3 * s * s, 10);
    let mut acts = be.alloc(&[2, k, h, w]).unwrap();
    acts.data = values(2 * k * h * w, 11);
    let items = [
        MaskItem {
            image: 1,
            channel: 4,
            sample: 3,
        },
        MaskItem {
            image: 0,
            channel: 0,
            sample: 0,
        },
    ];
    // Torchcam's masks: normalized at the layer's resolution, then upsampled; IS-CAM's scale and
    // SS-CAM's noise (element channel·S² + pixel of the item's stream) on top.
    let noisy = MaskStyle {
        sem: Semantics::Torchcam,
        scale: 1.0,
        noise: Some(Noise {
            seed: 7,
            sigma: 0.5,
        }),
    };
    let scaled = MaskStyle {
        sem: Semantics::Torchcam,
        scale: 2.5,
        noise: None,
    };
    for style in [
        Semantics::Official.into(),
        Semantics::ChannelSoftmax.into(),
        Semantics::Torchcam.into(),
        scaled,
        noisy,
    ] {
        let sem = style.sem;
        let mut out = be.alloc(&[4, 3, s, s]).unwrap();
        be.masked_inputs(&images, &acts, &items, style, &mut out)
            .unwrap();
        for (r, it) in items.iter().enumerate() {
            let (i, c) = (it.image as usize, it.channel as usize);
            let a = &acts.data[(i * k + c) * h * w..][..h * w];
            let mask: Vec<f32> = if sem == Semantics::Torchcam {
                let lo = a.iter().copied().fold(f32::INFINITY, f32::min);
                let hi = a.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let norm: Vec<f32> = a.iter().map(|v| (v - lo) / (hi - lo + 1e-8)).collect();
                (0..s * s)
                    .map(|p| torch_bilinear(&norm, h, w, s, p / s, p % s, false))
                    .collect()
            } else {
                let u: Vec<f32> = (0..s * s)
                    .map(|p| torch_bilinear(a, h, w, s, p / s, p % s, sem.align_corners()))
                    .collect();
                let lo = u.iter().copied().fold(f32::INFINITY, f32::min);
                let hi = u.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let eps = if sem == Semantics::Official {
                    0.0
                } else {
                    1e-8
                };
                u.iter().map(|v| (v - lo) / (hi - lo + eps)).collect()
            };
            let want: Vec<f32> = (0..3 * s * s)
                .map(|q| {
                    let p = q % (s * s);
                    let mut m = mask[p] * style.scale;
                    if let Some(n) = style.noise {
                        let index = (c * s * s + p) as u64;
                        m += normal_noise(n.seed, u64::from(it.sample), index, n.sigma);
                    }
                    images.data[i * 3 * s * s + q] * m
                })
                .collect();
            assert_close(
                &out.data[r * 3 * s * s..][..3 * s * s],
                &want,
                1e-5,
                &format!("mask {style:?} {r}"),
            );
        }
        if sem == Semantics::Torchcam {
            continue; // its combine is channel-softmax's
        }

        // Combine: official = min-max(ReLU(Σ w_k U_k)) at S×S; channel-softmax = ReLU(Σ w_k A_k).
        let weights = values(k, 12);
        let (map, flat) = be.combine(&acts, 1, &weights, sem).unwrap();
        assert!(!flat);
        let a1 = &acts.data[k * h * w..][..k * h * w];
        let want: Vec<f32> = match sem {
            Semantics::Official => {
                let raw: Vec<f32> = (0..s * s)
                    .map(|p| {
                        (0..k)
                            .map(|c| {
                                weights[c]
                                    * torch_bilinear(&a1[c * h * w..], h, w, s, p / s, p % s, false)
                            })
                            .sum::<f32>()
                            .max(0.0)
                    })
                    .collect();
                let lo = raw.iter().copied().fold(f32::INFINITY, f32::min);
                let hi = raw.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                raw.iter().map(|v| (v - lo) / (hi - lo)).collect()
            }
            Semantics::ChannelSoftmax | Semantics::Torchcam => (0..h * w)
                .map(|p| {
                    (0..k)
                        .map(|c| weights[c] * a1[c * h * w + p])
                        .sum::<f32>()
                        .max(0.0)
                })
                .collect(),
        };
        assert_close(&map, &want, 1e-4, &format!("combine {sem:?}"));
    }

    // A constant map is flat and written as zeros.
    let (map, flat) = be
        .combine(&acts, 0, &vec![0.0; k], Semantics::Official)
        .unwrap();
    assert!(flat && map.iter().all(|&v| v == 0.0));

    // Scores: softmax probability or raw logit of each row's targets.
    let mut logits = be.alloc(&[3, 5]).unwrap();
    logits.data = values(15, 13).iter().map(|v| v * 10.0).collect();
    let targets = [4u32, 0, 1, 1, 2, 3];
    let probs = be.scores(&logits, 3, &targets, true).unwrap();
    let raw = be.scores(&logits, 3, &targets, false).unwrap();
    for r in 0..3 {
        let row = &logits.data[r * 5..][..5];
        let z: f64 = row.iter().map(|&v| (v as f64).exp()).sum();
        for j in 0..2 {
            let t = targets[r * 2 + j] as usize;
            assert!((probs[r * 2 + j] as f64 - (row[t] as f64).exp() / z).abs() < 1e-6);
            assert_eq!(raw[r * 2 + j], row[t]);
        }
    }
}

/// The layers after capture point `cap`, run here one op at a time from the captured
/// activations `acts` (`[n, c, h, w]`): the ReLU a pre-ReLU capture has not had yet, the
/// remaining feature stages, the adaptive pool and the classifier.
fn push_through_rest(model: &Vgg, cap: Capture, acts: &[f32], n: usize, s: usize) -> Vec<f32> {
    let shape = model.capture_shape(cap, s);
    let (mut c, mut h, mut w) = (shape.c, shape.h, shape.w);
    let mut x = acts.to_vec();
    if cap.pre_relu && matches!(model.features[cap.stage], FeatureStage::Conv(_)) {
        cpu::relu(&mut x);
    }
    for stage in &model.features[cap.stage + 1..] {
        match stage {
            FeatureStage::Conv(l) => {
                assert_eq!(l.cin, c);
                x = cpu::conv3x3(&x, n, c, h, w, &l.weight, &l.bias, l.cout);
                cpu::relu(&mut x);
                c = l.cout;
            }
            FeatureStage::MaxPool { .. } => {
                x = cpu::maxpool2(&x, n * c, h, w);
                (h, w) = (h / 2, w / 2);
            }
        }
    }
    x = cpu::adaptive_avgpool(&x, n * c, h, w, POOLED, POOLED);
    for l in &model.classifier {
        x = cpu::linear(&x, n, l.fin, &l.weight, &l.bias, l.fout);
        if l.relu {
            cpu::relu(&mut x);
        }
    }
    x
}

/// Bit-for-bit equality, reporting the first difference (not two long vectors).
fn assert_same(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        panic!("{what}: [{i}] is {}, want {}", got[i], want[i]);
    }
}

/// Largest `|a - b| / (1 + |b|)`.
fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
        .fold(0.0, f32::max)
}

#[test]
fn forward_captures_every_stage_consistently() {
    // Every capture point the forward offers (each conv's output before its ReLU, each ReLU's
    // output, each pool's output) is checked two ways:
    // - against the stage before it: one layer computed here from the previous capture (the
    //   input for the first), so a capture taken one stage off or on the wrong side of a ReLU
    //   differs (the two 6-channel convs have the same shape: only the values tell them apart);
    // - pushed through the rest of the network here, layer by layer, it gives the logits.
    let model = Arc::new(Vgg::random_from_config(&[4, 0, 6, 6, 0], &[8, 5], 4, 32));
    let (n, s) = (2, 32);
    let x = values(n * 3 * s * s, 14);
    let (logits, none) = cpu::forward(&model, &x, n, s, None);
    assert!(none.is_none(), "nothing captured unless asked");
    assert_eq!(logits.len(), n * model.num_classes());
    // The whole network by hand from the input: the reference is not degenerate.
    let by_hand = push_through_rest(
        &model,
        Capture {
            stage: 0,
            pre_relu: true,
        },
        &cpu::conv3x3(
            &x,
            n,
            3,
            s,
            s,
            &model.convs().next().unwrap().weight,
            &model.convs().next().unwrap().bias,
            4,
        ),
        n,
        s,
    );
    assert_close(&by_hand, &logits, 1e-5, "whole network by hand");
    let spread = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max)
        - logits.iter().copied().fold(f32::INFINITY, f32::min);
    assert!(spread > 0.1, "logits {logits:?} should differ");

    let captured = |cap: Capture| {
        let (l, acts) = cpu::forward(&model, &x, n, s, Some(cap));
        let name = model.capture_name(cap);
        assert_eq!(l, logits, "{name}: capturing must not change the logits");
        let shape = model.capture_shape(cap, s);
        let acts = acts.unwrap_or_else(|| panic!("{name}: nothing captured"));
        assert_eq!(acts.len(), n * shape.c * shape.h * shape.w, "{name}");
        acts
    };
    let mut checked = Vec::new();
    // Output of the previous stage (after its ReLU): `[n, c, h, h]`.
    let (mut prev, mut c, mut h) = (x.clone(), 3, s);
    for (i, stage) in model.features.iter().enumerate() {
        match stage {
            FeatureStage::Conv(l) => {
                let pre_cap = Capture {
                    stage: i,
                    pre_relu: true,
                };
                let post_cap = Capture {
                    stage: i,
                    pre_relu: false,
                };
                let (pre, post) = (captured(pre_cap), captured(post_cap));
                let name = model.capture_name(pre_cap);
                let want = cpu::conv3x3(&prev, n, c, h, h, &l.weight, &l.bias, l.cout);
                assert_close(
                    &pre,
                    &want,
                    1e-5,
                    &format!("{name}: conv of the stage before"),
                );
                assert!(
                    pre.iter().any(|&v| v < 0.0),
                    "{name}: a conv output before ReLU has negatives"
                );
                let mut relu_pre = pre.clone();
                cpu::relu(&mut relu_pre);
                assert_same(
                    &post,
                    &relu_pre,
                    &format!(
                        "{}: the ReLU output is ReLU of the conv output",
                        model.capture_name(post_cap)
                    ),
                );
                for cap in [pre_cap, post_cap] {
                    let acts = if cap.pre_relu { &pre } else { &post };
                    let got = push_through_rest(&model, cap, acts, n, s);
                    let what = format!("{} pushed through the rest", model.capture_name(cap));
                    assert_close(&got, &logits, 1e-5, &what);
                }
                // The check above can tell the two sides of the ReLU apart: the pre-ReLU
                // activations taken as if they were the ReLU output give other logits.
                let wrong = push_through_rest(&model, post_cap, &pre, n, s);
                assert!(
                    max_rel_diff(&wrong, &logits) > 1e-3,
                    "{name}: skipping the ReLU should change the logits"
                );
                checked.extend([pre_cap, post_cap]);
                (prev, c) = (post, l.cout);
            }
            FeatureStage::MaxPool { .. } => {
                let cap = Capture {
                    stage: i,
                    pre_relu: false,
                };
                let pooled = captured(cap);
                let name = model.capture_name(cap);
                assert_same(
                    &pooled,
                    &cpu::maxpool2(&prev, n * c, h, h),
                    &format!("{name}: max-pool of the stage before"),
                );
                let got = push_through_rest(&model, cap, &pooled, n, s);
                assert_close(
                    &got,
                    &logits,
                    1e-5,
                    &format!("{name} pushed through the rest"),
                );
                checked.push(cap);
                (prev, h) = (pooled, h / 2);
            }
        }
    }
    // Those are exactly the layers a user can name.
    let named: Vec<Capture> = model
        .layer_names()
        .iter()
        .map(|name| {
            let cap = model.resolve_layer(name).unwrap();
            assert_eq!(&model.capture_name(cap), name);
            cap
        })
        .collect();
    assert_eq!(named, checked);
}

#[test]
fn a_pool_capture_ignores_pre_relu() {
    // A pool has one output: `pre_relu` on it must not lose the capture (the CUDA backend takes
    // the pool output either way).
    let model = Vgg::random_from_config(&[4, 0, 6, 0], &[10], 2, 32);
    let s = 32;
    let x: Vec<f32> = values(3 * s * s, 9);
    let pool = model
        .features
        .iter()
        .position(|st| matches!(st, FeatureStage::MaxPool { .. }))
        .unwrap();
    let (_, a) = cpu::forward(
        &model,
        &x,
        1,
        s,
        Some(Capture {
            stage: pool,
            pre_relu: false,
        }),
    );
    let (_, b) = cpu::forward(
        &model,
        &x,
        1,
        s,
        Some(Capture {
            stage: pool,
            pre_relu: true,
        }),
    );
    let a = a.expect("pool capture");
    assert_eq!(Some(a), b);
}

/// Queued scores come back in push order, equal to the synchronous ones; per-layer timing
/// covers every layer of `Vgg::layer_costs`, and `forward_timed` computes what `forward` does.
#[test]
fn queued_scores_and_layer_timing() {
    let model = Arc::new(Vgg::random_from_config(&[4, 0, 8, 0], &[16, 10], 5, 16));
    let mut be = CpuBackend::new();
    be.prepare(
        &model,
        Plan {
            input_size: 16,
            max_images: 1,
            max_masks: 3,
            capture: model.default_capture(),
        },
    )
    .unwrap();
    let mut buf = be.alloc(&[5, 10]).unwrap();
    buf.data = values(5 * 10, 3);
    let mut want = Vec::new();
    for (n, targets) in [(2, vec![1u32, 9]), (5, vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9])] {
        want.extend(be.scores(&buf, n, &targets, n == 2).unwrap());
        be.push_scores(&buf, n, &targets, n == 2).unwrap();
    }
    assert_eq!(be.take_scores().unwrap(), want);
    assert!(be.take_scores().unwrap().is_empty());

    let x = values(3 * 3 * 16 * 16, 4);
    let mut xb = be.alloc(&[3, 3, 16, 16]).unwrap();
    be.write_rows(&mut xb, 0, &x).unwrap();
    let t = be.layer_times(&xb, 3, 3).unwrap();
    assert_eq!(t.len(), model.layer_costs(16, 3, 4).len(), "{t:?}");
    assert!(t.iter().all(|ms| ms.is_finite() && *ms >= 0.0));
    assert!(
        be.layer_times(&xb, 4, 1).is_err(),
        "more rows than the buffer"
    );
    let mut calls = 0;
    let timed = cpu::forward_timed(&model, &x, 3, 16, None, &mut || calls += 1);
    assert_eq!(timed, cpu::forward(&model, &x, 3, 16, None));
    assert_eq!(calls, t.len());
}
