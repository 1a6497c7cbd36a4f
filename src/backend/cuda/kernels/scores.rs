//! Launcher for kernels/scores.cu.

use std::sync::Arc;

use cudarc::driver::{CudaStream, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use super::{dim, need, prod, Kernels, BLOCK};
use crate::error::Result;

impl Kernels {
    /// Batched scoring in one launch: for each row r < b of `logits` `[b, c]` and each of its `t`
    /// targets `targets[r, j]` (`[b, t]` u32): `out[r, j]` = softmax(logits[r])[target]
    /// (`probability`) or logits[r, target]. `out` `[b, t]` f32. Softmax is max-subtracted, f32.
    /// A target ≥ c (which the host must not pass) yields NaN rather than an out-of-bounds read.
    pub fn scores(
        &self,
        stream: &Arc<CudaStream>,
        logits: &CudaView<'_, f32>,
        targets: &CudaView<'_, u32>,
        b: usize,
        c: usize,
        t: usize,
        probability: bool,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        const OP: &str = "scores";
        let b_i = dim(OP, "b", b)?;
        let c_i = dim(OP, "c", c)?;
        let t_i = dim(OP, "t", t)?;
        need(OP, "logits", logits.len(), prod(OP, &[b, c])?)?;
        need(OP, "targets", targets.len(), prod(OP, &[b, t])?)?;
        need(OP, "out", out.len(), prod(OP, &[b, t])?)?;
        let cfg = LaunchConfig {
            grid_dim: (b_i as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let p = probability as i32;
        self.launch(OP, stream, &self.scores, cfg, |lb| {
            lb.arg(logits).arg(targets).arg(&b_i).arg(&c_i);
            lb.arg(&t_i).arg(&p).arg(out);
        })
    }
}
