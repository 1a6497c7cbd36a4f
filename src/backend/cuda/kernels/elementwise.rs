//! Launchers for kernels/elementwise.cu.

use std::sync::Arc;

use cudarc::driver::{CudaStream, CudaView, CudaViewMut, PushKernelArg};
use half::f16;

use super::{count_arg, dim, invalid, need, prod, Kernels};
use crate::error::Result;

/// Elements per thread of the vectorized paths: 16 bytes of f16 (or of f32, 4).
fn vector_units(total: usize, cols: usize, per_vector: usize) -> usize {
    if cols.is_multiple_of(per_vector) {
        total / per_vector
    } else {
        total
    }
}

impl Kernels {
    /// In place on `y` `[rows, cols]` f16: `y += bias[col]`, then ReLU if `relu`.
    pub fn bias_act_f16(
        &self,
        stream: &Arc<CudaStream>,
        y: &mut CudaViewMut<'_, f16>,
        bias: &CudaView<'_, f16>,
        rows: usize,
        cols: usize,
        relu: bool,
    ) -> Result<()> {
        const OP: &str = "bias_act_f16";
        let rows_i = dim(OP, "rows", rows)?;
        let cols_i = dim(OP, "cols", cols)?;
        let total = prod(OP, &[rows, cols])?;
        need(OP, "y", y.len(), total)?;
        need(OP, "bias", bias.len(), cols)?;
        let cfg = self.grid_stride(vector_units(total, cols, 8));
        let r = relu as i32;
        self.launch(OP, stream, &self.bias_act_f16, cfg, |lb| {
            lb.arg(y).arg(bias).arg(&rows_i).arg(&cols_i).arg(&r);
        })
    }

    /// In place on `y` `[rows, cols]` f32: `y += bias[col]` (f32 bias). For the logits.
    pub fn bias_f32(
        &self,
        stream: &Arc<CudaStream>,
        y: &mut CudaViewMut<'_, f32>,
        bias: &CudaView<'_, f32>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        const OP: &str = "bias_f32";
        let rows_i = dim(OP, "rows", rows)?;
        let cols_i = dim(OP, "cols", cols)?;
        let total = prod(OP, &[rows, cols])?;
        need(OP, "y", y.len(), total)?;
        need(OP, "bias", bias.len(), cols)?;
        let cfg = self.grid_stride(vector_units(total, cols, 4));
        self.launch(OP, stream, &self.bias_f32, cfg, |lb| {
            lb.arg(y).arg(bias).arg(&rows_i).arg(&cols_i);
        })
    }

    /// In place ReLU over `n` f16 values.
    pub fn relu_f16(
        &self,
        stream: &Arc<CudaStream>,
        x: &mut CudaViewMut<'_, f16>,
        n: usize,
    ) -> Result<()> {
        const OP: &str = "relu_f16";
        let n_i = count_arg(OP, n)?;
        need(OP, "x", x.len(), n)?;
        let cfg = self.grid_stride(n.div_ceil(8));
        self.launch(OP, stream, &self.relu_f16, cfg, |lb| {
            lb.arg(x).arg(&n_i);
        })
    }

    /// `x[i] = lo + (hi − lo)·u_i` for i < n, u_i ∈ [0, 1) a hash of (`seed`, i): deterministic
    /// random data for timing convolution algorithms (zero-filled inputs draw less power and
    /// time optimistically).
    pub fn fill_uniform_f16(
        &self,
        stream: &Arc<CudaStream>,
        x: &mut CudaViewMut<'_, f16>,
        n: usize,
        seed: u64,
        lo: f32,
        hi: f32,
    ) -> Result<()> {
        const OP: &str = "fill_uniform_f16";
        let n_i = count_arg(OP, n)?;
        need(OP, "x", x.len(), n)?;
        if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
            return Err(invalid(OP, format!("range [{lo}, {hi}) must be finite")));
        }
        let key = crate::backend::splitmix64(seed);
        self.launch(
            OP,
            stream,
            &self.fill_uniform_f16,
            self.grid_stride(n),
            |lb| {
                lb.arg(x).arg(&n_i).arg(&key).arg(&lo).arg(&hi);
            },
        )
    }
}
