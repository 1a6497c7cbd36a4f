//! Host-side layout conversions between the crate's logical tensors (NCHW f32, PyTorch weight
//! layouts) and what the CUDA backend keeps on the device (FP16, NHWC activations, KRSC filters,
//! the first Linear's columns in H,W,C order). Pure functions, tested on the CPU.

use half::f16;
use rayon::prelude::*;

/// f32 → f16 (round to nearest even), in parallel for large tensors.
pub fn to_f16(x: &[f32]) -> Vec<f16> {
    let mut out = vec![f16::ZERO; x.len()];
    out.par_chunks_mut(1 << 16)
        .zip(x.par_chunks(1 << 16))
        .for_each(|(d, s)| {
            d.iter_mut()
                .zip(s)
                .for_each(|(d, &s)| *d = f16::from_f32(s))
        });
    out
}

/// Conv filters OIHW f32 `[cout, cin, 3, 3]` → KRSC f16 `[cout, 3, 3, cin_s]` (cuDNN's filter
/// format NHWC), input channels `cin..cin_s` zero (the padded channels of the first conv).
pub fn conv_filter_krsc(w: &[f32], cout: usize, cin: usize, cin_s: usize) -> Vec<f16> {
    krsc_with(w, cout, cin, cin_s, f16::ZERO, f16::from_f32)
}

/// [`conv_filter_krsc`] in FP8 E4M3 bits: each weight divided by `scale` (the filter's
/// amax / 448), saturating at ±448.
pub fn conv_filter_krsc_e4m3(
    w: &[f32],
    cout: usize,
    cin: usize,
    cin_s: usize,
    scale: f32,
) -> Vec<u8> {
    let inv = 1.0 / scale;
    krsc_with(w, cout, cin, cin_s, 0u8, |v| {
        super::kernels::e4m3_from_f32(v * inv)
    })
}

/// OIHW → KRSC with each value converted by `conv` and padded channels `zero`.
fn krsc_with<T: Copy + Send + Sync>(
    w: &[f32],
    cout: usize,
    cin: usize,
    cin_s: usize,
    zero: T,
    conv: impl Fn(f32) -> T + Sync,
) -> Vec<T> {
    assert!(cin_s >= cin, "conv filter: {cin_s} stored channels < {cin}");
    assert_eq!(w.len(), cout * cin * 9, "conv filter: weight length");
    let mut out = vec![zero; cout * 9 * cin_s];
    out.par_chunks_mut(9 * cin_s)
        .enumerate()
        .for_each(|(k, dst)| {
            for c in 0..cin {
                for r in 0..3 {
                    for s in 0..3 {
                        dst[(r * 3 + s) * cin_s + c] = conv(w[((k * cin + c) * 3 + r) * 3 + s]);
                    }
                }
            }
        });
    out
}

/// The first Linear's weights `[fout, c·h·w]` with columns in PyTorch's flatten order (c, h, w)
/// → f16 with columns in (h, w, c) order, the order of a flattened NHWC feature map.
pub fn linear_chw_to_hwc(w: &[f32], fout: usize, c: usize, h: usize, ww: usize) -> Vec<f16> {
    let fin = c * h * ww;
    assert_eq!(w.len(), fout * fin, "linear weight length");
    let mut out = vec![f16::ZERO; fout * fin];
    out.par_chunks_mut(fin)
        .zip(w.par_chunks(fin))
        .for_each(|(dst, src)| {
            for ch in 0..c {
                for y in 0..h {
                    for x in 0..ww {
                        dst[(y * ww + x) * c + ch] = f16::from_f32(src[(ch * h + y) * ww + x]);
                    }
                }
            }
        });
    out
}

/// NCHW f32 `[n, c, h, w]` → NHWC f16 `[n, h, w, cs]`, channels `c..cs` zero.
pub fn nchw_to_nhwc_f16(x: &[f32], n: usize, c: usize, h: usize, w: usize, cs: usize) -> Vec<f16> {
    assert!(cs >= c);
    assert_eq!(x.len(), n * c * h * w, "NCHW length");
    let hw = h * w;
    let mut out = vec![f16::ZERO; n * hw * cs];
    out.par_chunks_mut(hw * cs)
        .zip(x.par_chunks(c * hw))
        .for_each(|(dst, src)| {
            for ch in 0..c {
                for p in 0..hw {
                    dst[p * cs + ch] = f16::from_f32(src[ch * hw + p]);
                }
            }
        });
    out
}

/// NHWC f16 `[n, h, w, cs]` → NCHW f32 `[n, c, h, w]` (channels `c..cs` dropped).
pub fn nhwc_f16_to_nchw(x: &[f16], n: usize, c: usize, h: usize, w: usize, cs: usize) -> Vec<f32> {
    assert!(cs >= c);
    assert_eq!(x.len(), n * h * w * cs, "NHWC length");
    let hw = h * w;
    let mut out = vec![0f32; n * c * hw];
    out.par_chunks_mut(c * hw)
        .zip(x.par_chunks(hw * cs))
        .for_each(|(dst, src)| {
            for ch in 0..c {
                for p in 0..hw {
                    dst[ch * hw + p] = src[p * cs + ch].to_f32();
                }
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(n: usize) -> Vec<f32> {
        // Small integers: exact in f16.
        (0..n).map(|i| ((i * 7) % 61) as f32 - 30.0).collect()
    }

    #[test]
    fn filter_krsc_matches_definition() {
        let (cout, cin, cin_s) = (5, 3, 8);
        let w = seq(cout * cin * 9);
        let got = conv_filter_krsc(&w, cout, cin, cin_s);
        for k in 0..cout {
            for r in 0..3 {
                for s in 0..3 {
                    for c in 0..cin_s {
                        let want = if c < cin {
                            w[((k * cin + c) * 3 + r) * 3 + s]
                        } else {
                            0.0
                        };
                        assert_eq!(got[((k * 3 + r) * 3 + s) * cin_s + c].to_f32(), want);
                    }
                }
            }
        }
    }

    #[test]
    fn linear_permutation_preserves_the_dot_product() {
        // y = W·flatten_chw(A) must equal W'·flatten_hwc(A).
        let (fout, c, h, w) = (3, 4, 7, 7);
        let wt = seq(fout * c * h * w);
        let a: Vec<f32> = (0..c * h * w).map(|i| ((i % 5) as f32) - 2.0).collect();
        let a_hwc = nhwc_f16_to_nchw(&to_f16(&a), 1, c * h * w, 1, 1, c * h * w); // identity copy
        let mut hwc = vec![0f32; c * h * w];
        for ch in 0..c {
            for p in 0..h * w {
                hwc[p * c + ch] = a_hwc[ch * h * w + p];
            }
        }
        let wp = linear_chw_to_hwc(&wt, fout, c, h, w);
        for o in 0..fout {
            let want: f32 = (0..c * h * w).map(|i| wt[o * c * h * w + i] * a[i]).sum();
            let got: f32 = (0..c * h * w)
                .map(|i| wp[o * c * h * w + i].to_f32() * hwc[i])
                .sum();
            assert_eq!(got, want, "row {o}");
        }
    }

    #[test]
    fn nhwc_round_trip() {
        let (n, c, h, w, cs) = (2, 3, 4, 5, 8);
        let x = seq(n * c * h * w);
        let d = nchw_to_nhwc_f16(&x, n, c, h, w, cs);
        for i in 0..n {
            for p in 0..h * w {
                for ch in c..cs {
                    assert_eq!(d[(i * h * w + p) * cs + ch].to_f32(), 0.0);
                }
            }
        }
        // channel 1 of pixel (y=2, x=3) of image 1
        assert_eq!(
            d[(h * w + 2 * w + 3) * cs + 1].to_f32(),
            x[((c + 1) * h + 2) * w + 3]
        );
        assert_eq!(nhwc_f16_to_nchw(&d, n, c, h, w, cs), x);
    }
}
