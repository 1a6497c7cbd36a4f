//! Launchers for kernels/pool.cu.

use std::sync::Arc;

use cudarc::driver::{CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};
use half::f16;

use super::{dim, grid_stride, invalid, need, nhwc_args, prod, KernelArg, KernelLaunch};
use super::{Kernels, LaunchLimits};
use crate::error::Result;

/// `maxpool2`: MaxPool2d(2, 2) (floor) of FP16 NHWC. Buffers: `[x, y]`, lengths in elements;
/// `x` `[n, h, w, c]` → `y` `[n, h/2, w/2, c]`.
pub fn maxpool2_launch(
    x_len: usize,
    y_len: usize,
    nhwc: [usize; 4],
    limits: &LaunchLimits,
) -> Result<KernelLaunch> {
    maxpool2_any("maxpool2", 2, x_len, y_len, nhwc, limits)
}

/// `maxpool2_e4m3`: the same on E4M3 codes of post-ReLU values, one byte each (a code with the
/// sign bit counts as 0; see [`crate::backend::fp8::max_e4m3`]). Buffers: `[x, y]`.
pub fn maxpool2_e4m3_launch(
    x_len: usize,
    y_len: usize,
    nhwc: [usize; 4],
    limits: &LaunchLimits,
) -> Result<KernelLaunch> {
    maxpool2_any("maxpool2_e4m3", 1, x_len, y_len, nhwc, limits)
}

/// Either max-pool kernel (pool.cu's `maxpool2_body` for elements of `elem_bytes`): the checks,
/// and one thread per 16 bytes of channels where they divide `c` (the kernel's vector path).
fn maxpool2_any(
    op: &'static str,
    elem_bytes: usize,
    x_len: usize,
    y_len: usize,
    [n, h, w, c]: [usize; 4],
    limits: &LaunchLimits,
) -> Result<KernelLaunch> {
    let [n_i, h_i, w_i, c_i] = nhwc_args(op, n, h, w, c)?;
    if h < 2 || w < 2 {
        return Err(invalid(
            op,
            format!("{h}×{w} input is smaller than the 2×2 window"),
        ));
    }
    need(op, "x", x_len, prod(op, &[n, h, w, c])?)?;
    let total = prod(op, &[n, h / 2, w / 2, c])?;
    need(op, "y", y_len, total)?;
    let lanes = 16 / elem_bytes;
    let units = if c.is_multiple_of(lanes) {
        total / lanes
    } else {
        total
    };
    use KernelArg::*;
    let args = vec![Read(0), I32(n_i), I32(h_i), I32(w_i), I32(c_i), Write(1)];
    Ok(grid_stride(op, units, limits, args))
}

/// `adaptive_avgpool`: AdaptiveAvgPool2d((oh, ow)) with PyTorch's bins (start = floor(i·H/oh),
/// end = ceil((i+1)·H/oh)), FP16 NHWC, f32 sums. Buffers: `[x, y]`; `x` `[n, h, w, c]` → `y`
/// `[n, oh, ow, c]`.
pub fn adaptive_avgpool_launch(
    x_len: usize,
    y_len: usize,
    [n, h, w, c]: [usize; 4],
    [oh, ow]: [usize; 2],
    limits: &LaunchLimits,
) -> Result<KernelLaunch> {
    const OP: &str = "adaptive_avgpool";
    let [n_i, h_i, w_i, c_i] = nhwc_args(OP, n, h, w, c)?;
    let oh_i = dim(OP, "oh", oh)?;
    let ow_i = dim(OP, "ow", ow)?;
    need(OP, "x", x_len, prod(OP, &[n, h, w, c])?)?;
    let total = prod(OP, &[n, oh, ow, c])?;
    need(OP, "y", y_len, total)?;
    use KernelArg::*;
    let args = vec![
        Read(0),
        I32(n_i),
        I32(h_i),
        I32(w_i),
        I32(c_i),
        I32(oh_i),
        I32(ow_i),
        Write(1),
    ];
    Ok(grid_stride(OP, total, limits, args))
}

impl Kernels {
    /// [`maxpool2_launch`]: `x` `[n, h, w, c]` → `y` `[n, h/2, w/2, c]`, f16 NHWC.
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
        let launch = maxpool2_launch(x.len(), y.len(), [n, h, w, c], &self.limits)?;
        let (x_p, _x) = x.device_ptr(stream);
        let (y_p, _y) = y.device_ptr_mut(stream);
        self.run(stream, &launch, &[x_p, y_p])
    }

    /// [`maxpool2_e4m3_launch`]: `x` `[n, h, w, c]` → `y` `[n, h/2, w/2, c]`, E4M3 codes.
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
        let launch = maxpool2_e4m3_launch(x.len(), y.len(), [n, h, w, c], &self.limits)?;
        let (x_p, _x) = x.device_ptr(stream);
        let (y_p, _y) = y.device_ptr_mut(stream);
        self.run(stream, &launch, &[x_p, y_p])
    }

    /// [`adaptive_avgpool_launch`]: `x` `[n, h, w, c]` → `y` `[n, oh, ow, c]`, f16 NHWC.
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
        let launch =
            adaptive_avgpool_launch(x.len(), y.len(), [n, h, w, c], [oh, ow], &self.limits)?;
        let (x_p, _x) = x.device_ptr(stream);
        let (y_p, _y) = y.device_ptr_mut(stream);
        self.run(stream, &launch, &[x_p, y_p])
    }
}
