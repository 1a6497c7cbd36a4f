//! Launchers for kernels/combine.cu: the final map from the channel weights.

use std::sync::Arc;

use cudarc::driver::{CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};
use half::f16;

use super::{dim, grid_stride, invalid, need, prod, KernelArg, KernelLaunch};
use super::{Kernels, LaunchLimits, MAP_BLOCK, SMEM_DEFAULT};
use crate::error::Result;

/// `weighted_channel_sum`: low-resolution weighted channel sum `out[y, x] = Σ_k weights[k] ·
/// acts[y, x, k]` for one image, optionally ReLU'd; one warp per pixel. Buffers: `[acts,
/// weights, out]` (`acts` `[h, w, k]` f16 NHWC, `weights` `[k]` f32, `out` `[h, w]` f32).
pub fn weighted_channel_sum_launch(
    acts_len: usize,
    weights_len: usize,
    out_len: usize,
    h: usize,
    w: usize,
    k: usize,
    relu: bool,
    limits: &LaunchLimits,
) -> Result<KernelLaunch> {
    const OP: &str = "weighted_channel_sum";
    let h_i = dim(OP, "h", h)?;
    let w_i = dim(OP, "w", w)?;
    let k_i = dim(OP, "k", k)?;
    let plane = prod(OP, &[h, w])?;
    need(OP, "acts", acts_len, prod(OP, &[plane, k])?)?;
    need(OP, "weights", weights_len, k)?;
    need(OP, "out", out_len, plane)?;
    use KernelArg::*;
    let args = vec![
        Read(0),
        Read(1),
        I32(h_i),
        I32(w_i),
        I32(k_i),
        I32(relu as i32),
        Write(2),
    ];
    Ok(grid_stride(OP, prod(OP, &[plane, 32])?, limits, args))
}

/// `upsample_relu_normalize`: `out` `[s, s]` = ReLU(bilinear upsample of `low` `[h, w]`)
/// (half-pixel or align-corners), then min-max normalized to [0, 1] in the same launch (one
/// block; all zeros when max == min); `flat` (one u32) is set to 1 when the map was constant,
/// else 0. Buffers: `[low, out, flat]`.
pub fn upsample_relu_normalize_launch(
    low_len: usize,
    out_len: usize,
    flat_len: usize,
    h: usize,
    w: usize,
    s: usize,
    align_corners: bool,
) -> Result<KernelLaunch> {
    const OP: &str = "upsample_relu_normalize";
    let h_i = dim(OP, "h", h)?;
    let w_i = dim(OP, "w", w)?;
    let s_i = dim(OP, "s", s)?;
    let plane = prod(OP, &[h, w])?;
    let pixels = prod(OP, &[s, s])?;
    if pixels > i32::MAX as usize / 2 {
        return Err(invalid(OP, format!("s={s}: the map is too large")));
    }
    need(OP, "low", low_len, plane)?;
    need(OP, "out", out_len, pixels)?;
    need(OP, "flat", flat_len, 1)?;
    // The low-resolution map is staged in shared memory when it fits.
    let in_smem = plane * 4 <= SMEM_DEFAULT;
    use KernelArg::*;
    Ok(KernelLaunch {
        kernel: OP,
        grid: 1,
        block: MAP_BLOCK,
        shared_mem_bytes: if in_smem { (plane * 4) as u32 } else { 0 },
        args: vec![
            Read(0),
            I32(h_i),
            I32(w_i),
            I32(s_i),
            I32(align_corners as i32),
            I32(in_smem as i32),
            Write(1),
            Write(2),
        ],
    })
}

impl Kernels {
    /// [`weighted_channel_sum_launch`].
    pub fn weighted_channel_sum(
        &self,
        stream: &Arc<CudaStream>,
        acts: &CudaView<'_, f16>,
        weights: &CudaView<'_, f32>,
        h: usize,
        w: usize,
        k: usize,
        relu: bool,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let launch = weighted_channel_sum_launch(
            acts.len(),
            weights.len(),
            out.len(),
            h,
            w,
            k,
            relu,
            &self.limits,
        )?;
        let (acts_p, _acts) = acts.device_ptr(stream);
        let (weights_p, _weights) = weights.device_ptr(stream);
        let (out_p, _out) = out.device_ptr_mut(stream);
        self.run(stream, &launch, &[acts_p, weights_p, out_p])
    }

    /// [`upsample_relu_normalize_launch`].
    pub fn upsample_relu_normalize(
        &self,
        stream: &Arc<CudaStream>,
        low: &CudaView<'_, f32>,
        h: usize,
        w: usize,
        s: usize,
        align_corners: bool,
        out: &mut CudaViewMut<'_, f32>,
        flat: &mut CudaViewMut<'_, u32>,
    ) -> Result<()> {
        let launch = upsample_relu_normalize_launch(
            low.len(),
            out.len(),
            flat.len(),
            h,
            w,
            s,
            align_corners,
        )?;
        let (low_p, _low) = low.device_ptr(stream);
        let (out_p, _out) = out.device_ptr_mut(stream);
        let (flat_p, _flat) = flat.device_ptr_mut(stream);
        self.run(stream, &launch, &[low_p, out_p, flat_p])
    }
}
