//! Launchers for kernels/pool.cu.

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaStream, CudaView, CudaViewMut, DeviceRepr, PushKernelArg};
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
        self.maxpool2_of("maxpool2", &self.maxpool2, stream, x, [n, h, w, c], y)
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
        let f = &self.maxpool2_e4m3;
        self.maxpool2_of("maxpool2_e4m3", f, stream, x, [n, h, w, c], y)
    }

    /// Either max-pool kernel (pool.cu's `maxpool2_body` for elements `T`): the checks, and one
    /// thread per 16 bytes of channels where they divide `c` (the kernel's vector path).
    fn maxpool2_of<'a, T: DeviceRepr>(
        &self,
        op: &str,
        func: &'a CudaFunction,
        stream: &'a Arc<CudaStream>,
        x: &'a CudaView<'_, T>,
        [n, h, w, c]: [usize; 4],
        y: &'a mut CudaViewMut<'_, T>,
    ) -> Result<()> {
        let [n_i, h_i, w_i, c_i] = nhwc_args(op, n, h, w, c)?;
        if h < 2 || w < 2 {
            return Err(invalid(
                op,
                format!("{h}×{w} input is smaller than the 2×2 window"),
            ));
        }
        need(op, "x", x.len(), prod(op, &[n, h, w, c])?)?;
        let total = prod(op, &[n, h / 2, w / 2, c])?;
        need(op, "y", y.len(), total)?;
        let lanes = 16 / std::mem::size_of::<T>();
        let units = if c.is_multiple_of(lanes) {
            total / lanes
        } else {
            total
        };
        self.launch(op, stream, func, self.grid_stride(units), |lb| {
            lb.arg(x).arg(&n_i).arg(&h_i).arg(&w_i).arg(&c_i).arg(y);
        })
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
