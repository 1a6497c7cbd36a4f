//! Faithfulness metrics for saliency maps, independent of the backend: the caller runs the
//! model and passes class probabilities and maps in; everything here is plain arithmetic.
//!
//! - Average Drop and Increase in Confidence (Chattopadhay et al. 2018, Grad-CAM++; used by the
//!   Score-CAM paper, Wang et al. 2020, §4.1): [`average_drop`], [`increase_in_confidence`].
//! - RISE's deletion and insertion games (Petsiuk et al. 2018, `evaluation.py` `CausalMetric` of
//!   github.com/eclique/RISE): [`causal_order`], [`causal_steps`], [`causal_input`] /
//!   [`causal_advance`], [`auc`], and the blurred substrate for insertion, [`blur`] ([`gkern`]).
//! - The energy-based pointing game (Score-CAM paper, §4.2): [`energy_in_boxes`].
//! - The model-randomisation sanity check (Adebayo et al. 2018): [`spearman`].
//!
//! Maps are row-major `[S, S]` f32; model inputs are normalized f32 CHW `[3, S, S]`. A slice of
//! the wrong length is a caller bug and panics (documented per function); values from files or
//! models (NaN, zeros, constant maps) never do.

use rayon::prelude::*;

use crate::eval::boxes::BoxPx;

// ---------------------------------------------------------------------------------------------
// Average Drop / Increase in Confidence
// ---------------------------------------------------------------------------------------------

/// The images both confidence metrics count: `Y = base[i]` finite and `> 0`, `O = masked[i]`
/// finite. An image with `Y = 0` (or `Y < 0`, or a NaN/inf value) has no defined relative drop,
/// so it is skipped by both metrics alike, and `N` counts only the kept images.
fn counted<'a>(base: &'a [f32], masked: &'a [f32]) -> impl Iterator<Item = (f64, f64)> + 'a {
    assert_eq!(
        base.len(),
        masked.len(),
        "confidence metrics: {} base probabilities for {} masked ones",
        base.len(),
        masked.len()
    );
    base.iter()
        .zip(masked)
        .map(|(&y, &o)| (f64::from(y), f64::from(o)))
        .filter(|&(y, o)| y.is_finite() && y > 0.0 && o.is_finite())
}

/// How many images [`average_drop`] and [`increase_in_confidence`] count (the `N` of both):
/// those with a finite `Y > 0` and a finite `O`.
///
/// # Panics
/// If the slices differ in length (a caller bug).
pub fn counted_images(base: &[f32], masked: &[f32]) -> usize {
    counted(base, masked).count()
}

/// Average Drop, in percent (0..=100; lower is better):
/// `100/N · Σᵢ max(0, Yᵢ − Oᵢ) / Yᵢ`, with `Yᵢ = base[i]` the class probability on the original
/// input and `Oᵢ = masked[i]` the same class's probability on the input multiplied by the
/// explanation map (Chattopadhay et al. 2018; Score-CAM Table 1).
///
/// Images with `Y ≤ 0` or a non-finite `Y` or `O` are skipped and not counted in `N`
/// ([`counted_images`]). NaN when no image is counted.
///
/// # Panics
/// If the slices differ in length (a caller bug).
pub fn average_drop(base: &[f32], masked: &[f32]) -> f64 {
    mean_percent(counted(base, masked).map(|(y, o)| (y - o).max(0.0) / y))
}

/// Increase in Confidence, in percent (0..=100; higher is better): `100/N · Σᵢ [Oᵢ > Yᵢ]`, the
/// share of images whose class probability rises strictly when the input is multiplied by the
/// map. Same `N` and skipped images as [`average_drop`]; NaN when no image is counted.
///
/// # Panics
/// If the slices differ in length (a caller bug).
pub fn increase_in_confidence(base: &[f32], masked: &[f32]) -> f64 {
    mean_percent(counted(base, masked).map(|(y, o)| if o > y { 1.0 } else { 0.0 }))
}

fn mean_percent(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 {
        f64::NAN
    } else {
        100.0 * sum / n as f64
    }
}

// ---------------------------------------------------------------------------------------------
// RISE deletion / insertion
// ---------------------------------------------------------------------------------------------

/// Pixel indices (`y·S + x`) in order of decreasing saliency: the order in which the deletion
/// game removes pixels and the insertion game inserts them.
///
/// Ties keep the lower index first (a stable sort). RISE uses
/// `np.flip(np.argsort(saliency))`: numpy's default argsort is not stable, so its order among
/// equal values is unspecified (with a stable argsort the flip would put the higher index
/// first); equal values only reorder pixels of the same saliency, which changes a curve only
/// where a run of ties straddles a step boundary. NaN counts as less salient than any number
/// (NaNs go last, in index order); `-0.0` ties with `0.0`.
pub fn causal_order(map: &[f32]) -> Vec<u32> {
    let mut order: Vec<u32> = (0..map.len() as u32).collect();
    order.sort_by(|&a, &b| {
        let (va, vb) = (map[a as usize], map[b as usize]);
        match (va.is_nan(), vb.is_nan()) {
            (false, false) => vb.partial_cmp(&va).unwrap_or(std::cmp::Ordering::Equal),
            (false, true) => std::cmp::Ordering::Less,
            (true, false) => std::cmp::Ordering::Greater,
            (true, true) => std::cmp::Ordering::Equal,
        }
    });
    order
}

/// Number of steps of a game over `pixels` pixels changing `step` per step: `ceil(pixels/step)`
/// (RISE's `n_steps = (HW + step − 1) // step`). A curve has `n_steps + 1` points: step `i`
/// (`0..=n_steps`) scores the input with `min(i·step, pixels)` pixels changed
/// ([`causal_changed`]). `step = 0` is treated as 1.
pub fn causal_steps(pixels: usize, step: usize) -> usize {
    pixels.div_ceil(step.max(1))
}

/// Pixels changed at step `i` of a game: `min(i·step, pixels)`.
pub fn causal_changed(i: usize, step: usize, pixels: usize) -> usize {
    i.saturating_mul(step).min(pixels)
}

/// The `[3, S, S]` input after the first `n_changed` pixels of `order` (all three channels) were
/// taken from `finish`: `out = start`, then `out[c, p] = finish[c, p]` for `p` in
/// `order[..n_changed]`. Deletion: `start` = the image, `finish` = the baseline (substrate);
/// insertion: `start` = the baseline, `finish` = the image. `n_changed` beyond `order.len()` is
/// clamped.
///
/// To walk all steps without copying `start` each time, use [`causal_advance`] on one buffer.
///
/// # Panics
/// If `start`, `finish` or `out` is not `3·S·S` long, or `order` holds an index `≥ S·S`
/// (caller bugs).
pub fn causal_input(
    start: &[f32],
    finish: &[f32],
    order: &[u32],
    n_changed: usize,
    s: usize,
    out: &mut [f32],
) {
    assert_eq!(
        start.len(),
        3 * s * s,
        "causal_input: start is not [3, {s}, {s}]"
    );
    out.copy_from_slice(start);
    causal_advance(out, finish, order, 0, n_changed, s);
}

/// Move `current` from `from` to `to` changed pixels: `current[c, p] = finish[c, p]` for `p` in
/// `order[from..to]` (both clamped to `order.len()`; nothing happens when `to ≤ from`). Starting
/// from a copy of `start` and advancing step by step gives the same inputs as
/// [`causal_input`].
///
/// # Panics
/// If `current` or `finish` is not `3·S·S` long, or `order` holds an index `≥ S·S`
/// (caller bugs).
pub fn causal_advance(
    current: &mut [f32],
    finish: &[f32],
    order: &[u32],
    from: usize,
    to: usize,
    s: usize,
) {
    let plane = s * s;
    assert_eq!(
        current.len(),
        3 * plane,
        "causal input is not [3, {s}, {s}]"
    );
    assert_eq!(
        finish.len(),
        3 * plane,
        "causal finish is not [3, {s}, {s}]"
    );
    let to = to.min(order.len());
    let from = from.min(to);
    for &p in &order[from..to] {
        let p = p as usize;
        assert!(p < plane, "causal order index {p} outside a {s}×{s} map");
        for c in 0..3 {
            current[c * plane + p] = finish[c * plane + p];
        }
    }
}

/// RISE's normalised area under a curve whose points are evenly spaced on `[0, 1]`:
/// `(Σ curve − curve[0]/2 − curve[last]/2) / (len − 1)`, the trapezoid rule. `[1, 1, 1]` → 1,
/// `[1, 0]` → 0.5. Computed in f64. NaN for fewer than two points (RISE divides 0 by 0 there)
/// and whenever a point is NaN.
pub fn auc(curve: &[f32]) -> f64 {
    let n = curve.len();
    if n < 2 {
        return f64::NAN;
    }
    let sum: f64 = curve.iter().map(|&v| f64::from(v)).sum();
    (sum - f64::from(curve[0]) / 2.0 - f64::from(curve[n - 1]) / 2.0) / (n - 1) as f64
}

// ---------------------------------------------------------------------------------------------
// Blurred substrate
// ---------------------------------------------------------------------------------------------

/// RISE's blur kernel size and width: `gkern(klen=11, nsig=5)` in its `Evaluation.ipynb`.
pub const BLUR_KLEN: usize = 11;
/// See [`BLUR_KLEN`].
pub const BLUR_NSIG: f64 = 5.0;

/// RISE's `gkern(klen, nsig)` as the f32 `klen×klen` kernel its blur convolves with:
///
/// ```python
/// inp = np.zeros((klen, klen)); inp[klen//2, klen//2] = 1
/// k = scipy.ndimage.gaussian_filter(inp, nsig)        # float64
/// kern[c, c] = k; torch.from_numpy(kern.astype('float32'))
/// ```
///
/// `gaussian_filter` with its defaults (`mode='reflect'`, `truncate=4.0`) is reproduced
/// step by step in f64: the 1-D weights `exp(−t²/(2σ²))` for `t` in `−r..=r`,
/// `r = int(4σ + 0.5)` (20 for σ = 5, wider than the 11-pixel array), divided by their sum;
/// the delta correlated with them along axis 0, then along axis 1, each time extending the
/// line by half-sample symmetric reflection (`dcba|abcd|dcba`, repeated with period `2·klen`
/// as far as the radius needs); finally cast to f32. Because the reflection keeps all the
/// mass, the kernel sums to 1 (to f32 rounding). The values equal scipy 1.17's to the last bit
/// of the f32 (tested for 11 and σ 5).
///
/// Returns an empty kernel for `klen = 0` and a centred delta for a `nsig ≤ 0` or non-finite.
pub fn gkern(klen: usize, nsig: f64) -> Vec<f32> {
    if klen == 0 {
        return Vec::new();
    }
    let mut grid = vec![0.0f64; klen * klen];
    grid[(klen / 2) * klen + klen / 2] = 1.0;
    if nsig.is_finite() && nsig > 0.0 {
        let weights = gaussian_weights(nsig);
        // Axis 0 (columns), then axis 1 (rows), as scipy's separable filter does.
        let mut line = vec![0.0f64; klen];
        for x in 0..klen {
            for (y, v) in line.iter_mut().enumerate() {
                *v = grid[y * klen + x];
            }
            let filtered = correlate_reflect(&line, &weights);
            for (y, v) in filtered.into_iter().enumerate() {
                grid[y * klen + x] = v;
            }
        }
        for row in grid.chunks_exact_mut(klen) {
            let filtered = correlate_reflect(row, &weights);
            row.copy_from_slice(&filtered);
        }
    }
    grid.into_iter().map(|v| v as f32).collect()
}

/// scipy's `_gaussian_kernel1d(sigma, 0, radius)` with `radius = int(4·sigma + 0.5)`.
fn gaussian_weights(sigma: f64) -> Vec<f64> {
    let radius = (4.0 * sigma + 0.5) as i64;
    let phi: Vec<f64> = (-radius..=radius)
        .map(|t| (-0.5 / (sigma * sigma) * (t * t) as f64).exp())
        .collect();
    let sum = pairwise_sum(&phi);
    phi.into_iter().map(|v| v / sum).collect()
}

/// numpy's pairwise summation (`pairwise_sum` in `loops_utils.h`) for short arrays: eight
/// running sums combined as `((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7))`, then the tail; longer
/// arrays are split in halves (at a multiple of 8) as numpy does.
fn pairwise_sum(a: &[f64]) -> f64 {
    let n = a.len();
    if n < 8 {
        return a.iter().fold(0.0, |s, &v| s + v);
    }
    if n <= 128 {
        let mut r = [0.0f64; 8];
        r.copy_from_slice(&a[..8]);
        let mut i = 8;
        while i + 8 <= n {
            for k in 0..8 {
                r[k] += a[i + k];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for &v in &a[i..] {
            res += v;
        }
        return res;
    }
    let half = (n / 2) & !7;
    pairwise_sum(&a[..half]) + pairwise_sum(&a[half..])
}

/// scipy's `correlate1d` with a symmetric kernel (`weights[r−j] == weights[r+j]`) and
/// `mode='reflect'`: `out[i] = x[i]·w[r] + Σⱼ (x[i+j] + x[i−j])·w[r+j]`, `j = 1..=r`, in that order
/// (scipy's symmetric fast path), with out-of-range indices mirrored periodically.
fn correlate_reflect(x: &[f64], weights: &[f64]) -> Vec<f64> {
    let n = x.len() as i64;
    let r = (weights.len() / 2) as i64;
    let at = |i: i64| {
        let p = i.rem_euclid(2 * n);
        x[(if p >= n { 2 * n - 1 - p } else { p }) as usize]
    };
    (0..n)
        .map(|i| {
            let mut acc = x[i as usize] * weights[r as usize];
            for j in 1..=r {
                acc += (at(i + j) + at(i - j)) * weights[(r + j) as usize];
            }
            acc
        })
        .collect()
}

/// RISE's insertion substrate: each channel of the `[3, S, S]` input convolved with
/// [`gkern`]`(11, 5)` (the f32 kernel, as its `blur = lambda x: nn.functional.conv2d(x, kern,
/// padding=klen//2)`), zero padding of `klen/2 = 5` pixels, output the same size. The
/// channels do not mix (RISE's kernel is diagonal in the channels). Each output value is
/// accumulated in f64 and rounded once to f32 (cuDNN's f32 sum order differs by a few ulps).
/// Applied to the normalized input, as RISE does. Near the border the zero padding darkens
/// towards 0 (the normalized mean), as in RISE.
///
/// # Panics
/// If `input` is not `3·S·S` long (a caller bug).
pub fn blur(input: &[f32], s: usize) -> Vec<f32> {
    assert_eq!(input.len(), 3 * s * s, "blur: input is not [3, {s}, {s}]");
    let k = gkern(BLUR_KLEN, BLUR_NSIG);
    let kf: Vec<f64> = k.iter().map(|&v| f64::from(v)).collect();
    let half = (BLUR_KLEN / 2) as isize;
    let plane = s * s;
    let mut out = vec![0.0f32; input.len()];
    if s == 0 {
        return out;
    }
    out.par_chunks_mut(s)
        .enumerate()
        .for_each(|(row, out_row)| {
            let (c, y) = (row / s, (row % s) as isize);
            let src = &input[c * plane..(c + 1) * plane];
            for (x, o) in out_row.iter_mut().enumerate() {
                let x = x as isize;
                let mut acc = 0.0f64;
                for ky in 0..BLUR_KLEN as isize {
                    let sy = y + ky - half;
                    if sy < 0 || sy >= s as isize {
                        continue;
                    }
                    let line = &src[sy as usize * s..(sy as usize + 1) * s];
                    let krow = &kf[ky as usize * BLUR_KLEN..(ky as usize + 1) * BLUR_KLEN];
                    for (kx, &kv) in krow.iter().enumerate() {
                        let sx = x + kx as isize - half;
                        if sx >= 0 && sx < s as isize {
                            acc += kv * f64::from(line[sx as usize]);
                        }
                    }
                }
                *o = acc as f32;
            }
        });
    out
}

// ---------------------------------------------------------------------------------------------
// Energy-based pointing game
// ---------------------------------------------------------------------------------------------

/// The energy-based pointing game (Score-CAM §4.2): the share of the map's energy that falls
/// inside the union of the boxes, `Σ map[p ∈ ∪ boxes] / Σ map`, in `[0, 1]` for a map in
/// `[0, 1]`. A pixel in several boxes counts once; no boxes gives 0. `None` when the map's total
/// is not positive or not finite (a flat-zero map has no energy to place).
///
/// # Panics
/// If `map` is not `S·S` long (a caller bug). Boxes are clamped to the map.
pub fn energy_in_boxes(map: &[f32], s: usize, boxes: &[BoxPx]) -> Option<f64> {
    assert_eq!(map.len(), s * s, "energy_in_boxes: map is not [{s}, {s}]");
    let total: f64 = map.iter().map(|&v| f64::from(v)).sum();
    if !(total.is_finite() && total > 0.0) {
        return None;
    }
    let mut inside = vec![false; s * s];
    for b in boxes {
        let (x0, x1) = ((b.x0 as usize).min(s), (b.x1 as usize).min(s));
        let (y0, y1) = ((b.y0 as usize).min(s), (b.y1 as usize).min(s));
        for y in y0..y1 {
            inside[y * s + x0.min(x1)..y * s + x1].fill(true);
        }
    }
    let energy: f64 = map
        .iter()
        .zip(&inside)
        .filter(|(_, &i)| i)
        .map(|(&v, _)| f64::from(v))
        .sum();
    Some(energy / total)
}

// ---------------------------------------------------------------------------------------------
// Sanity check: Spearman rank correlation
// ---------------------------------------------------------------------------------------------

/// Spearman's rank correlation of two maps (or any paired samples), as
/// `scipy.stats.spearmanr(a, b).statistic`: the Pearson correlation of the ranks, with tied
/// values given their average rank. Computed in f64.
///
/// NaN (as scipy) when either input is constant (its ranks have no variance), when any value
/// is NaN (scipy's default `nan_policy='propagate'`), when there are fewer than two pairs, or
/// when the lengths differ. Callers averaging over images should skip NaNs and report how many.
pub fn spearman(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() || a.len() < 2 || a.iter().chain(b).any(|v| v.is_nan()) {
        return f64::NAN;
    }
    pearson(&average_ranks(a), &average_ranks(b))
}

/// 1-based ranks, ties sharing the mean of the ranks they span (scipy's `rankdata`, 'average').
fn average_ranks(v: &[f32]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&i, &j| v[i].partial_cmp(&v[j]).unwrap_or(std::cmp::Ordering::Equal));
    let mut ranks = vec![0.0f64; v.len()];
    let mut start = 0;
    while start < idx.len() {
        let mut end = start + 1;
        while end < idx.len() && v[idx[end]] == v[idx[start]] {
            end += 1;
        }
        // Ranks start+1 ..= end share their mean.
        let rank = (start + 1 + end) as f64 / 2.0;
        for &i in &idx[start..end] {
            ranks[i] = rank;
        }
        start = end;
    }
    ranks
}

/// Pearson correlation (NaN when either side is constant).
pub(crate) fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        let (dx, dy) = (x - ma, y - mb);
        sab += dx * dy;
        saa += dx * dx;
        sbb += dy * dy;
    }
    if saa == 0.0 || sbb == 0.0 {
        return f64::NAN;
    }
    (sab / (saa.sqrt() * sbb.sqrt())).clamp(-1.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn average_drop_and_increase_on_known_pairs() {
        // drops: (0.8−0.4)/0.8 = 0.5, 0 (rise), (0.5−0.25)/0.5 = 0.5, 1 (to zero)
        let base = [0.8, 0.2, 0.5, 0.1];
        let masked = [0.4, 0.6, 0.25, 0.0];
        assert!(close(average_drop(&base, &masked), 100.0 * 2.0 / 4.0, 1e-6));
        assert!(close(increase_in_confidence(&base, &masked), 25.0, 1e-12));
        assert_eq!(counted_images(&base, &masked), 4);
        // Equal probabilities: no drop, no increase (strict).
        assert_eq!(average_drop(&[0.5], &[0.5]), 0.0);
        assert_eq!(increase_in_confidence(&[0.5], &[0.5]), 0.0);
    }

    #[test]
    fn confidence_metrics_skip_zero_and_non_finite_base() {
        let base = [0.0, 0.5, f32::NAN, 0.4, 0.3];
        let masked = [0.9, 0.25, 0.1, 0.8, f32::INFINITY];
        // Kept: (0.5, 0.25) drop 0.5, no increase; (0.4, 0.8) drop 0, increase.
        assert_eq!(counted_images(&base, &masked), 2);
        assert!(close(average_drop(&base, &masked), 25.0, 1e-6));
        assert!(close(increase_in_confidence(&base, &masked), 50.0, 1e-12));
        assert!(average_drop(&[], &[]).is_nan());
        assert!(increase_in_confidence(&[0.0], &[0.3]).is_nan());
    }

    #[test]
    fn causal_order_is_descending_with_lower_index_first_on_ties() {
        let map = [0.1, 0.9, 0.5, 0.9, f32::NAN, 0.0, -0.0, 0.5];
        assert_eq!(causal_order(&map), vec![1, 3, 2, 7, 0, 5, 6, 4]);
        assert!(causal_order(&[]).is_empty());
    }

    #[test]
    fn causal_steps_and_changed_counts() {
        assert_eq!(causal_steps(224 * 224, 224), 224);
        assert_eq!(causal_steps(10, 3), 4);
        assert_eq!(causal_steps(9, 3), 3);
        assert_eq!(causal_steps(0, 3), 0);
        assert_eq!(causal_steps(5, 0), 5);
        let changed: Vec<usize> = (0..=causal_steps(10, 3))
            .map(|i| causal_changed(i, 3, 10))
            .collect();
        assert_eq!(changed, vec![0, 3, 6, 9, 10]);
    }

    #[test]
    fn causal_input_at_zero_some_and_all_pixels() {
        let s = 2;
        let start: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let finish: Vec<f32> = (0..12).map(|v| -(v as f32) - 100.0).collect();
        let order = causal_order(&[0.2, 0.7, 0.1, 0.9]); // [3, 1, 0, 2]
        assert_eq!(order, vec![3, 1, 0, 2]);
        let mut out = vec![f32::NAN; 12];
        causal_input(&start, &finish, &order, 0, s, &mut out);
        assert_eq!(out, start);
        causal_input(&start, &finish, &order, 2, s, &mut out);
        // Pixels 3 and 1 of every channel come from finish.
        let want = [
            0.0, -101.0, 2.0, -103.0, 4.0, -105.0, 6.0, -107.0, 8.0, -109.0, 10.0, -111.0,
        ];
        assert_eq!(out, want);
        causal_input(&start, &finish, &order, 4, s, &mut out);
        assert_eq!(out, finish);
        causal_input(&start, &finish, &order, 99, s, &mut out);
        assert_eq!(out, finish);

        // Advancing step by step gives the same inputs.
        let mut cur = start.clone();
        let mut direct = vec![0.0; 12];
        for i in 0..=causal_steps(4, 3) {
            let (from, to) = (
                causal_changed(i.saturating_sub(1), 3, 4),
                causal_changed(i, 3, 4),
            );
            causal_advance(&mut cur, &finish, &order, from, to, s);
            causal_input(&start, &finish, &order, to, s, &mut direct);
            assert_eq!(cur, direct, "step {i}");
        }
    }

    #[test]
    fn auc_is_rises_trapezoid() {
        assert_eq!(auc(&[1.0, 1.0, 1.0]), 1.0);
        assert_eq!(auc(&[1.0, 0.0]), 0.5);
        assert_eq!(auc(&[0.0, 1.0, 0.0]), 0.5);
        // (0 + 0.5 + 1 − 0 − 0.5) / 2
        assert_eq!(auc(&[0.0, 0.5, 1.0]), 0.5);
        // (1 + 0.5 + 0.25 + 0 − 0.5 − 0) / 3
        assert!(close(auc(&[1.0, 0.5, 0.25, 0.0]), 1.25 / 3.0, 1e-12));
        assert!(auc(&[0.7]).is_nan());
        assert!(auc(&[]).is_nan());
        assert!(auc(&[0.1, f32::NAN, 0.2]).is_nan());
    }

    /// scipy 1.17: `gaussian_filter(delta(11×11), 5).astype('float32')[:6, :6]`.
    const GKERN_11_5_QUADRANT: [[f32; 6]; 6] = [
        [
            0.0077366354,
            0.007819138,
            0.007957943,
            0.0081089595,
            0.008223154,
            0.008266488,
        ],
        [
            0.007819138,
            0.00790252,
            0.008042805,
            0.008195433,
            0.008310844,
            0.008354641,
        ],
        [
            0.007957943,
            0.008042805,
            0.00818558,
            0.0083409175,
            0.008458377,
            0.008502952,
        ],
        [
            0.0081089595,
            0.008195433,
            0.0083409175,
            0.008499202,
            0.008618891,
            0.008664312,
        ],
        [
            0.008223154,
            0.008310844,
            0.008458377,
            0.008618891,
            0.008740266,
            0.008786325,
        ],
        [
            0.008266488,
            0.008354641,
            0.008502952,
            0.008664312,
            0.008786325,
            0.008832628,
        ],
    ];

    #[test]
    fn gkern_matches_scipy_bit_for_bit() {
        let k = gkern(11, 5.0);
        assert_eq!(k.len(), 121);
        for y in 0..11 {
            for x in 0..11 {
                // The kernel is symmetric in both axes: fold into the quadrant.
                let (qy, qx) = (y.min(10 - y), x.min(10 - x));
                assert_eq!(
                    k[y * 11 + x].to_bits(),
                    GKERN_11_5_QUADRANT[qy][qx].to_bits(),
                    "k[{y}][{x}]"
                );
            }
        }
        let sum: f64 = k.iter().map(|&v| f64::from(v)).sum();
        assert!(close(sum, 1.0, 1e-6), "sum {sum}");
    }

    #[test]
    fn gkern_small_cases_match_scipy() {
        // scipy: gaussian_filter(delta(3×3), 1) (float64), and the centre row for (5, 2).
        let k3 = gkern(3, 1.0);
        let want3 = [0.0876730802852103, 0.12075024313149925, 0.16630670633316177];
        for (i, &v) in k3.iter().enumerate() {
            let (y, x) = (i / 3, i % 3);
            let w = match (y == 1) as u8 + (x == 1) as u8 {
                0 => want3[0],
                1 => want3[1],
                _ => want3[2],
            };
            assert!(close(f64::from(v), w, 1e-8), "k3[{i}] = {v}, want {w}");
        }
        let k5 = gkern(5, 2.0);
        let want5 = [0.04041700663679285, 0.0445394149729641, 0.04709041337080284];
        for x in 0..5 {
            assert!(close(f64::from(k5[2 * 5 + x]), want5[x.min(4 - x)], 1e-8));
        }
        assert!(gkern(0, 5.0).is_empty());
        assert_eq!(gkern(3, 0.0), vec![0., 0., 0., 0., 1., 0., 0., 0., 0.]);
    }

    #[test]
    fn blur_of_a_constant_is_the_constant_away_from_the_border() {
        let s = 16;
        let input = vec![2.0f32; 3 * s * s];
        let out = blur(&input, s);
        let ksum: f64 = gkern(11, 5.0).iter().map(|&v| f64::from(v)).sum();
        for c in 0..3 {
            for y in 5..s - 5 {
                for x in 5..s - 5 {
                    let v = f64::from(out[c * s * s + y * s + x]);
                    assert!(close(v, 2.0 * ksum, 1e-6), "({c},{y},{x}) = {v}");
                }
            }
        }
        // The corner sees only the kernel's lower-right 6×6 quadrant: zero padding.
        let k = gkern(11, 5.0);
        let corner: f64 = (5..11)
            .flat_map(|y| (5..11).map(move |x| (y, x)))
            .map(|(y, x)| 2.0 * f64::from(k[y * 11 + x]))
            .sum();
        assert!(close(f64::from(out[0]), corner, 1e-6));
        assert!(out[0] < 1.0);
    }

    #[test]
    fn blur_matches_a_zero_padded_convolution_reference() {
        // numpy: img = ((arange(3·13·13)·37 % 101)/100 − 0.5) as f32 → [3,13,13]; out =
        // Σ pad(img, 5)[c, y:y+11, x:x+11] · gkern (f32 kernel, f64 sums).
        let s = 13;
        let img: Vec<f32> = (0..3 * s * s)
            .map(|i| ((i * 37) % 101) as f32 / 100.0 - 0.5)
            .collect();
        let out = blur(&img, s);
        let cases = [
            ((0, 0, 0), -0.0024819950914383663),
            ((0, 6, 6), 0.004176122616451859),
            ((1, 3, 10), -0.0022987527974927206),
            ((2, 12, 12), -0.002015265703668844),
            ((2, 7, 0), 0.001672624673528536),
        ];
        for ((c, y, x), want) in cases {
            let got = f64::from(out[c * s * s + y * s + x]);
            assert!(close(got, want, 1e-8), "({c},{y},{x}) = {got}, want {want}");
        }
        let sum: f64 = out.iter().map(|&v| f64::from(v)).sum();
        assert!(close(sum, -0.14961138528419804, 1e-6), "sum {sum}");
        assert!(blur(&[], 0).is_empty());
    }

    #[test]
    fn energy_in_boxes_counts_the_union_once() {
        let s = 4;
        let mut map = vec![0.0f32; 16];
        map[0] = 1.0; // (0,0)
        map[5] = 2.0; // (1,1)
        map[15] = 1.0; // (3,3)
        let b = |x0, y0, x1, y1| BoxPx { x0, y0, x1, y1 };
        // Box over the 2×2 top-left block: 3 of 4.
        assert_eq!(energy_in_boxes(&map, s, &[b(0, 0, 2, 2)]), Some(0.75));
        // Overlapping boxes count (1,1) once.
        assert_eq!(
            energy_in_boxes(&map, s, &[b(0, 0, 2, 2), b(1, 1, 4, 4)]),
            Some(1.0)
        );
        assert_eq!(energy_in_boxes(&map, s, &[b(1, 1, 2, 2)]), Some(0.5));
        assert_eq!(energy_in_boxes(&map, s, &[]), Some(0.0));
        assert_eq!(energy_in_boxes(&map, s, &[BoxPx::EMPTY]), Some(0.0));
        // Out-of-range and inverted bounds are clamped, not a panic.
        assert_eq!(energy_in_boxes(&map, s, &[b(3, 3, 99, 99)]), Some(0.25));
        assert_eq!(energy_in_boxes(&map, s, &[b(3, 3, 1, 1)]), Some(0.0));
        assert_eq!(energy_in_boxes(&[0.0; 16], s, &[b(0, 0, 4, 4)]), None);
        assert_eq!(energy_in_boxes(&[f32::NAN; 16], s, &[b(0, 0, 4, 4)]), None);
    }

    #[test]
    fn spearman_matches_scipy_with_ties() {
        // scipy.stats.spearmanr values.
        let r = spearman(&[1.0, 2.0, 2.0, 3.0], &[1.0, 3.0, 2.0, 4.0]);
        assert!(close(r, 0.9486832980505139, 1e-12), "{r}");
        let r = spearman(&[1.0, 2.0, 3.0, 4.0, 5.0], &[5.0, 6.0, 7.0, 8.0, 7.0]);
        assert!(close(r, 0.8207826816681233, 1e-12), "{r}");
        let r = spearman(&[3.0, 1.0, 2.0], &[1.0, 2.0, 3.0]);
        assert!(close(r, -0.5, 1e-12), "{r}");
        assert!(close(
            spearman(&[1.0, 5.0, 9.0], &[-3.0, 0.0, 100.0]),
            1.0,
            1e-12
        ));
        assert!(close(
            spearman(&[1.0, 5.0, 9.0], &[3.0, 2.0, 1.0]),
            -1.0,
            1e-12
        ));
        assert_eq!(
            average_ranks(&[10.0, 20.0, 10.0, 30.0, 10.0]),
            [2.0, 4.0, 2.0, 5.0, 2.0]
        );
    }

    #[test]
    fn spearman_edge_cases_are_nan() {
        assert!(spearman(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]).is_nan());
        assert!(spearman(&[0.0; 4], &[0.0; 4]).is_nan());
        assert!(spearman(&[1.0], &[2.0]).is_nan());
        assert!(spearman(&[], &[]).is_nan());
        assert!(spearman(&[1.0, 2.0], &[1.0]).is_nan());
        assert!(spearman(&[1.0, f32::NAN, 3.0], &[1.0, 2.0, 3.0]).is_nan());
    }
}
