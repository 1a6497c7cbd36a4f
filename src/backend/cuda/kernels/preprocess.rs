//! Launcher for kernels/preprocess.cu.

use std::sync::Arc;

use cudarc::driver::{CudaStream, CudaView, CudaViewMut, PushKernelArg};
use half::f16;

use super::{cpad_arg, dim, invalid, need, prod, Kernels};
use crate::error::Result;

impl Kernels {
    /// `rgb` u8 `[S, S, 3]` HWC → `out` f16 `[S, S, cpad]` NHWC with `(x/255 − mean[c])/std[c]`
    /// for c < 3 and 0 for 3 ≤ c < cpad.
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
        need(OP, "rgb", rgb.len(), prod(OP, &[pixels, 3])?)?;
        need(OP, "out", out.len(), prod(OP, &[pixels, cpad])?)?;
        self.launch(
            OP,
            stream,
            &self.preprocess,
            self.grid_stride(pixels),
            |b| {
                b.arg(rgb).arg(&s_i);
                b.arg(&mean[0]).arg(&mean[1]).arg(&mean[2]);
                b.arg(&std[0]).arg(&std[1]).arg(&std[2]);
                b.arg(&cpad_i).arg(out);
            },
        )
    }
}
