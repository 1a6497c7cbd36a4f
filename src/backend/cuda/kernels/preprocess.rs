//! Launcher for kernels/preprocess.cu.

use std::sync::Arc;

use cudarc::driver::{CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};
use half::f16;

use super::{cpad_arg, dim, grid_stride, invalid, need, prod, KernelArg, KernelLaunch};
use super::{Kernels, LaunchLimits};
use crate::error::Result;

/// `preprocess`: u8 RGB `[s, s, 3]` → `(x/255 − mean)/std` as FP16 NHWC `[s, s, cpad]` (padding
/// channels zero). Buffers: `[rgb, out]`, lengths in elements.
pub fn preprocess_launch(
    rgb_len: usize,
    out_len: usize,
    s: usize,
    mean: [f32; 3],
    std: [f32; 3],
    cpad: usize,
    limits: &LaunchLimits,
) -> Result<KernelLaunch> {
    const OP: &str = "preprocess";
    let s_i = dim(OP, "s", s)?;
    let cpad_i = cpad_arg(OP, cpad)?;
    if mean.iter().any(|m| !m.is_finite()) || std.iter().any(|v| !v.is_finite() || *v == 0.0) {
        return Err(invalid(
            OP,
            format!("mean {mean:?} must be finite and std {std:?} finite and non-zero"),
        ));
    }
    let pixels = prod(OP, &[s, s])?;
    need(OP, "rgb", rgb_len, prod(OP, &[pixels, 3])?)?;
    need(OP, "out", out_len, prod(OP, &[pixels, cpad])?)?;
    use KernelArg::*;
    let args = vec![
        Read(0),
        I32(s_i),
        F32(mean[0]),
        F32(mean[1]),
        F32(mean[2]),
        F32(std[0]),
        F32(std[1]),
        F32(std[2]),
        I32(cpad_i),
        Write(1),
    ];
    Ok(grid_stride(OP, pixels, limits, args))
}

impl Kernels {
    /// [`preprocess_launch`]: `rgb` u8 `[s, s, 3]` → `out` f16 `[s, s, cpad]`.
    pub fn preprocess(
        &self,
        stream: &Arc<CudaStream>,
        rgb: &CudaView<'_, u8>,
        s: usize,
        mean: [f32; 3],
        std: [f32; 3],
        cpad: usize,
        out: &mut CudaViewMut<'_, f16>,
    ) -> Result<()> {
        let launch = preprocess_launch(rgb.len(), out.len(), s, mean, std, cpad, &self.limits)?;
        let (rgb_p, _rgb) = rgb.device_ptr(stream);
        let (out_p, _out) = out.device_ptr_mut(stream);
        self.run(stream, &launch, &[rgb_p, out_p])
    }
}
