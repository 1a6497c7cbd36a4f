//! Launchers for kernels/elementwise.cu.

use std::sync::Arc;

use cudarc::driver::{CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};
use half::f16;

use super::{count_arg, dim, grid_stride, invalid, need, prod, KernelArg, KernelLaunch};
use super::{Kernels, LaunchLimits};
use crate::error::Result;

/// Work items of a kernel with a vector path of `per_vector` elements per thread, taken when it
/// divides the row length `cols`.
fn vector_units(total: usize, cols: usize, per_vector: usize) -> usize {
    if cols.is_multiple_of(per_vector) {
        total / per_vector
    } else {
        total
    }
}

/// `bias_act_f16`: in place on `y` `[rows, cols]` f16, `y += bias[col]`, then ReLU if `relu`.
/// Buffers: `[y, bias]`.
pub fn bias_act_f16_launch(
    y_len: usize,
    bias_len: usize,
    rows: usize,
    cols: usize,
    relu: bool,
    limits: &LaunchLimits,
) -> Result<KernelLaunch> {
    const OP: &str = "bias_act_f16";
    let rows_i = dim(OP, "rows", rows)?;
    let cols_i = dim(OP, "cols", cols)?;
    let total = prod(OP, &[rows, cols])?;
    need(OP, "y", y_len, total)?;
    need(OP, "bias", bias_len, cols)?;
    use KernelArg::*;
    let args = vec![
        Write(0),
        Read(1),
        I32(rows_i),
        I32(cols_i),
        I32(relu as i32),
    ];
    Ok(grid_stride(OP, vector_units(total, cols, 8), limits, args))
}

/// `bias_f32`: in place on `y` `[rows, cols]` f32, `y += bias[col]` (the logits). Buffers:
/// `[y, bias]`.
pub fn bias_f32_launch(
    y_len: usize,
    bias_len: usize,
    rows: usize,
    cols: usize,
    limits: &LaunchLimits,
) -> Result<KernelLaunch> {
    const OP: &str = "bias_f32";
    let rows_i = dim(OP, "rows", rows)?;
    let cols_i = dim(OP, "cols", cols)?;
    let total = prod(OP, &[rows, cols])?;
    need(OP, "y", y_len, total)?;
    need(OP, "bias", bias_len, cols)?;
    use KernelArg::*;
    let args = vec![Write(0), Read(1), I32(rows_i), I32(cols_i)];
    Ok(grid_stride(OP, vector_units(total, cols, 4), limits, args))
}

/// `relu_f16`: in place ReLU over `n` f16 values. Buffers: `[x]`.
pub fn relu_f16_launch(x_len: usize, n: usize, limits: &LaunchLimits) -> Result<KernelLaunch> {
    const OP: &str = "relu_f16";
    let n_i = count_arg(OP, n)?;
    need(OP, "x", x_len, n)?;
    use KernelArg::*;
    Ok(grid_stride(
        OP,
        n.div_ceil(8),
        limits,
        vec![Write(0), I64(n_i)],
    ))
}

/// `fill_uniform_f16`: `x[i] = lo + (hi − lo)·u_i` for i < n, u_i ∈ [0, 1) a hash of (`seed`,
/// i): deterministic random data for timing convolution algorithms (zero-filled inputs draw
/// less power and time optimistically). Buffers: `[x]`.
pub fn fill_uniform_f16_launch(
    x_len: usize,
    n: usize,
    seed: u64,
    lo: f32,
    hi: f32,
    limits: &LaunchLimits,
) -> Result<KernelLaunch> {
    const OP: &str = "fill_uniform_f16";
    let n_i = count_arg(OP, n)?;
    need(OP, "x", x_len, n)?;
    if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
        return Err(invalid(OP, format!("range [{lo}, {hi}) must be finite")));
    }
    let key = crate::backend::splitmix64(seed);
    use KernelArg::*;
    let args = vec![Write(0), I64(n_i), U64(key), F32(lo), F32(hi)];
    Ok(grid_stride(OP, n, limits, args))
}

impl Kernels {
    /// [`bias_act_f16_launch`].
    pub fn bias_act_f16(
        &self,
        stream: &Arc<CudaStream>,
        y: &mut CudaViewMut<'_, f16>,
        bias: &CudaView<'_, f16>,
        rows: usize,
        cols: usize,
        relu: bool,
    ) -> Result<()> {
        let launch = bias_act_f16_launch(y.len(), bias.len(), rows, cols, relu, &self.limits)?;
        let (y_p, _y) = y.device_ptr_mut(stream);
        let (bias_p, _bias) = bias.device_ptr(stream);
        self.run(stream, &launch, &[y_p, bias_p])
    }

    /// [`bias_f32_launch`].
    pub fn bias_f32(
        &self,
        stream: &Arc<CudaStream>,
        y: &mut CudaViewMut<'_, f32>,
        bias: &CudaView<'_, f32>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let launch = bias_f32_launch(y.len(), bias.len(), rows, cols, &self.limits)?;
        let (y_p, _y) = y.device_ptr_mut(stream);
        let (bias_p, _bias) = bias.device_ptr(stream);
        self.run(stream, &launch, &[y_p, bias_p])
    }

    /// [`relu_f16_launch`].
    pub fn relu_f16(
        &self,
        stream: &Arc<CudaStream>,
        x: &mut CudaViewMut<'_, f16>,
        n: usize,
    ) -> Result<()> {
        let launch = relu_f16_launch(x.len(), n, &self.limits)?;
        let (x_p, _x) = x.device_ptr_mut(stream);
        self.run(stream, &launch, &[x_p])
    }

    /// [`fill_uniform_f16_launch`].
    pub fn fill_uniform_f16(
        &self,
        stream: &Arc<CudaStream>,
        x: &mut CudaViewMut<'_, f16>,
        n: usize,
        seed: u64,
        lo: f32,
        hi: f32,
    ) -> Result<()> {
        let launch = fill_uniform_f16_launch(x.len(), n, seed, lo, hi, &self.limits)?;
        let (x_p, _x) = x.device_ptr_mut(stream);
        self.run(stream, &launch, &[x_p])
    }
}
