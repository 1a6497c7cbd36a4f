//! Launchers for kernels/fp8.cu: the input statistics, scales and quantization of the FP8
//! convolutions of `--precision fp8`.

use std::sync::Arc;

use cudarc::driver::{CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};
use half::f16;

use super::{count_arg, dim, grid_stride, invalid, need, KernelArg, KernelLaunch};
use super::{Kernels, LaunchLimits, BLOCK};
use crate::error::Result;

pub use crate::backend::fp8::{e4m3_from_f32, E4M3_MAX};

/// Floats per layer in `fp8_scales`' output: the descale at [`DESCALE_AT`], the multiplier at
/// [`MULTIPLIER_AT`], padding between, so that both start on 16 bytes (the alignment the cuDNN
/// graphs declare for their tensors; the multiplier is also an E4M3-output graph's scale).
pub const SCALE_STRIDE: usize = 8;
/// Offset of a layer's descale (its conv output's scale back) in its [`SCALE_STRIDE`] floats.
pub const DESCALE_AT: usize = 0;
/// Offset of a layer's multiplier (its input's quantization) in its [`SCALE_STRIDE`] floats.
pub const MULTIPLIER_AT: usize = 4;

/// `amax_abs_f16`: `amax[0] = max(amax[0], max |x[i]|)` over `n` f16 values (`amax` holds a
/// non-negative f32). Buffers: `[x, amax]`.
pub fn amax_abs_f16_launch(
    x_len: usize,
    amax_len: usize,
    n: usize,
    limits: &LaunchLimits,
) -> Result<KernelLaunch> {
    const OP: &str = "amax_abs_f16";
    let n_i = count_arg(OP, n)?;
    need(OP, "x", x_len, n)?;
    need(OP, "amax", amax_len, 1)?;
    use KernelArg::*;
    Ok(grid_stride(
        OP,
        n,
        limits,
        vec![Read(0), I64(n_i), Write(1)],
    ))
}

/// `fp8_scales`: for each of `layers` layers, `scales[8l] = amax[l]·margin / 448 · w_scale[l]`
/// (the descale of its output), `scales[8l+4] = 448 / (amax[l]·margin)` (the quantization
/// multiplier of its input), both 16-byte aligned for cuDNN; then `amax[l] = 0`. See
/// [`SCALE_STRIDE`]. Buffers: `[amax, w_scale, scales]`.
pub fn fp8_scales_launch(
    amax_len: usize,
    w_scale_len: usize,
    scales_len: usize,
    layers: usize,
    margin: f32,
) -> Result<KernelLaunch> {
    const OP: &str = "fp8_scales";
    let layers_i = dim(OP, "layers", layers)?;
    if !(margin.is_finite() && margin >= 1.0) {
        return Err(invalid(
            OP,
            format!("margin {margin} must be finite and ≥ 1"),
        ));
    }
    need(OP, "amax", amax_len, layers)?;
    need(OP, "w_scale", w_scale_len, layers)?;
    need(OP, "scales", scales_len, SCALE_STRIDE * layers)?;
    use KernelArg::*;
    Ok(KernelLaunch {
        kernel: OP,
        grid: layers.div_ceil(BLOCK as usize) as u32,
        block: BLOCK,
        shared_mem_bytes: 0,
        args: vec![
            Write(0),
            Read(1),
            I32(layers_i),
            F32(margin),
            I32(SCALE_STRIDE as i32),
            I32(DESCALE_AT as i32),
            I32(MULTIPLIER_AT as i32),
            Write(2),
        ],
    })
}

/// `quantize_e4m3`: `out[i] = E4M3(x[i] · multiplier[0])` for i < n, saturating at ±448, round
/// to nearest even (bits as cuda_fp8.hpp's `__NV_SATFINITE` conversion; see [`e4m3_from_f32`]).
/// Buffers: `[x (f16), multiplier (f32), out (u8)]`.
pub fn quantize_e4m3_launch(
    x_len: usize,
    multiplier_len: usize,
    out_len: usize,
    n: usize,
    limits: &LaunchLimits,
) -> Result<KernelLaunch> {
    scaled_map("quantize_e4m3", x_len, multiplier_len, out_len, n, limits)
}

/// `dequantize_e4m3`: `out[i] = f16(value(x[i]) / multiplier[0])` for i < n, E4M3 codes back to
/// FP16 (see [`crate::backend::fp8::e4m3_to_f32`]). Buffers: `[x (u8), multiplier (f32), out
/// (f16)]`.
pub fn dequantize_e4m3_launch(
    x_len: usize,
    multiplier_len: usize,
    out_len: usize,
    n: usize,
    limits: &LaunchLimits,
) -> Result<KernelLaunch> {
    scaled_map("dequantize_e4m3", x_len, multiplier_len, out_len, n, limits)
}

/// Either conversion: `n` elements of `x` through one device-side multiplier into `out`.
fn scaled_map(
    op: &'static str,
    x_len: usize,
    multiplier_len: usize,
    out_len: usize,
    n: usize,
    limits: &LaunchLimits,
) -> Result<KernelLaunch> {
    let n_i = count_arg(op, n)?;
    need(op, "x", x_len, n)?;
    need(op, "multiplier", multiplier_len, 1)?;
    need(op, "out", out_len, n)?;
    use KernelArg::*;
    Ok(grid_stride(
        op,
        n,
        limits,
        vec![Read(0), I64(n_i), Read(1), Write(2)],
    ))
}

impl Kernels {
    /// [`amax_abs_f16_launch`].
    pub fn amax_abs_f16(
        &self,
        stream: &Arc<CudaStream>,
        x: &CudaView<'_, f16>,
        n: usize,
        amax: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let launch = amax_abs_f16_launch(x.len(), amax.len(), n, &self.limits)?;
        let (x_p, _x) = x.device_ptr(stream);
        let (amax_p, _amax) = amax.device_ptr_mut(stream);
        self.run(stream, &launch, &[x_p, amax_p])
    }

    /// [`fp8_scales_launch`].
    pub fn fp8_scales(
        &self,
        stream: &Arc<CudaStream>,
        amax: &mut CudaViewMut<'_, f32>,
        w_scale: &CudaView<'_, f32>,
        layers: usize,
        margin: f32,
        scales: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let launch = fp8_scales_launch(amax.len(), w_scale.len(), scales.len(), layers, margin)?;
        let (amax_p, _amax) = amax.device_ptr_mut(stream);
        let (w_scale_p, _w_scale) = w_scale.device_ptr(stream);
        let (scales_p, _scales) = scales.device_ptr_mut(stream);
        self.run(stream, &launch, &[amax_p, w_scale_p, scales_p])
    }

    /// [`quantize_e4m3_launch`].
    pub fn quantize_e4m3(
        &self,
        stream: &Arc<CudaStream>,
        x: &CudaView<'_, f16>,
        n: usize,
        multiplier: &CudaView<'_, f32>,
        out: &mut CudaViewMut<'_, u8>,
    ) -> Result<()> {
        self.scaled_map(stream, quantize_e4m3_launch, x, n, multiplier, out)
    }

    /// [`dequantize_e4m3_launch`].
    pub fn dequantize_e4m3(
        &self,
        stream: &Arc<CudaStream>,
        x: &CudaView<'_, u8>,
        n: usize,
        multiplier: &CudaView<'_, f32>,
        out: &mut CudaViewMut<'_, f16>,
    ) -> Result<()> {
        self.scaled_map(stream, dequantize_e4m3_launch, x, n, multiplier, out)
    }

    /// Either conversion on the device: `launch` is its `*_launch` function.
    fn scaled_map<X, Y>(
        &self,
        stream: &Arc<CudaStream>,
        launch: fn(usize, usize, usize, usize, &LaunchLimits) -> Result<KernelLaunch>,
        x: &CudaView<'_, X>,
        n: usize,
        multiplier: &CudaView<'_, f32>,
        out: &mut CudaViewMut<'_, Y>,
    ) -> Result<()> {
        let launch = launch(x.len(), multiplier.len(), out.len(), n, &self.limits)?;
        let (x_p, _x) = x.device_ptr(stream);
        let (m_p, _m) = multiplier.device_ptr(stream);
        let (out_p, _out) = out.device_ptr_mut(stream);
        self.run(stream, &launch, &[x_p, m_p, out_p])
    }
}
