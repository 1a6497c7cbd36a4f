//! Launchers for kernels/pool.cu.

use std::sync::Arc;

use cudarc::driver::{CudaStream, CudaView, CudaViewMut, PushKernelArg};
use half::f16;

use super::{dim, invalid, need, nhwc_args, prod, Kernels};
use crate::error::Result;

impl Kernels {
    /// MaxPool2d(2, 2) (floor): `x` `[n, h, w, c]` → `y` `[n, h/2, w/2, c]`, f16 NHWC.
    pub fn maxpool2(
        &self,
        stream: &Arc<CudaStream>,
        x: &CudaView<'_, f16>,
        n: usize,
        h: usize,
        w: usize,
        c: usize,
        y: &mut CudaViewMut<'_, f16>,
    ) -> Result<()> {
        const OP: &str = "maxpool2";
        let (args, total) = maxpool2_shape(OP, (x.len(), y.len()), n, h, w, c)?;
        let units = if c.is_multiple_of(8) {
            total / 8
        } else {
            total
        };
        self.launch(OP, stream, &self.maxpool2, self.grid_stride(units), |lb| {
            let [n_i, h_i, w_i, c_i] = &args;
            lb.arg(x).arg(n_i).arg(h_i).arg(w_i).arg(c_i).arg(y);
        })
    }

    /// MaxPool2d(2, 2) (floor) on E4M3 codes of post-ReLU values: `x` `[n, h, w, c]` → `y`
    /// `[n, h/2, w/2, c]`, one byte per value (a code with the sign bit counts as 0; see
    /// [`crate::backend::fp8::max_e4m3`]).
    pub fn maxpool2_e4m3(
        &self,
        stream: &Arc<CudaStream>,
        x: &CudaView<'_, u8>,
        n: usize,
        h: usize,
        w: usize,
        c: usize,
        y: &mut CudaViewMut<'_, u8>,
    ) -> Result<()> {
        const OP: &str = "maxpool2_e4m3";
        let (args, total) = maxpool2_shape(OP, (x.len(), y.len()), n, h, w, c)?;
        let units = if c.is_multiple_of(16) {
            total / 16
        } else {
            total
        };
        self.launch(
            OP,
            stream,
            &self.maxpool2_e4m3,
            self.grid_stride(units),
            |lb| {
                let [n_i, h_i, w_i, c_i] = &args;
                lb.arg(x).arg(n_i).arg(h_i).arg(w_i).arg(c_i).arg(y);
            },
        )
    }

    /// AdaptiveAvgPool2d((oh, ow)) with PyTorch's bins (start = floor(i·H/oh),
    /// end = ceil((i+1)·H/oh)): `x` `[n, h, w, c]` → `y` `[n, oh, ow, c]`, f16 NHWC, f32 sums.
    pub fn adaptive_avgpool(
        &self,
        stream: &Arc<CudaStream>,
        x: &CudaView<'_, f16>,
        n: usize,
        h: usize,
        w: usize,
        c: usize,
        oh: usize,
        ow: usize,
        y: &mut CudaViewMut<'_, f16>,
    ) -> Result<()> {
        const OP: &str = "adaptive_avgpool";
        let [n_i, h_i, w_i, c_i] = nhwc_args(OP, n, h, w, c)?;
        let oh_i = dim(OP, "oh", oh)?;
        let ow_i = dim(OP, "ow", ow)?;
        need(OP, "x", x.len(), prod(OP, &[n, h, w, c])?)?;
        let total = prod(OP, &[n, oh, ow, c])?;
        need(OP, "y", y.len(), total)?;
        let cfg = self.grid_stride(total);
        self.launch(OP, stream, &self.adaptive_avgpool, cfg, |lb| {
            lb.arg(x).arg(&n_i).arg(&h_i).arg(&w_i).arg(&c_i);
            lb.arg(&oh_i).arg(&ow_i).arg(y);
        })
    }
}

/// A 2×2 max-pool's checks: the kernel's int arguments `[n, h, w, c]` and the output's length,
/// after checking the window fits and `x` / `y` (their lengths) hold the input and output.
fn maxpool2_shape(
    op: &str,
    (x_len, y_len): (usize, usize),
    n: usize,
    h: usize,
    w: usize,
    c: usize,
) -> Result<([i32; 4], usize)> {
    let args = nhwc_args(op, n, h, w, c)?;
    if h < 2 || w < 2 {
        return Err(invalid(
            op,
            format!("{h}×{w} input is smaller than the 2×2 window"),
        ));
    }
    need(op, "x", x_len, prod(op, &[n, h, w, c])?)?;
    let total = prod(op, &[n, h / 2, w / 2, c])?;
    need(op, "y", y_len, total)?;
    Ok((args, total))
}
