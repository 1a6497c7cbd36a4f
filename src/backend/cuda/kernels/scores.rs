//! Launcher for kernels/scores.cu.

use std::sync::Arc;

use cudarc::driver::{CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};

use super::{dim, need, prod, KernelArg, KernelLaunch, Kernels, BLOCK};
use crate::error::Result;

/// `scores`: per row r of `logits` `[b, c]` and each of its `t` targets, the softmax probability
/// (`probability`) or the raw logit; one block per row. Buffers: `[logits, targets, out]`
/// (`targets` `[b, t]` u32, `out` `[b, t]` f32), lengths in elements.
pub fn scores_launch(
    logits_len: usize,
    targets_len: usize,
    out_len: usize,
    b: usize,
    c: usize,
    t: usize,
    probability: bool,
) -> Result<KernelLaunch> {
    const OP: &str = "scores";
    let b_i = dim(OP, "b", b)?;
    let c_i = dim(OP, "c", c)?;
    let t_i = dim(OP, "t", t)?;
    need(OP, "logits", logits_len, prod(OP, &[b, c])?)?;
    need(OP, "targets", targets_len, prod(OP, &[b, t])?)?;
    need(OP, "out", out_len, prod(OP, &[b, t])?)?;
    use KernelArg::*;
    Ok(KernelLaunch {
        kernel: OP,
        grid: b_i as u32,
        block: BLOCK,
        shared_mem_bytes: 0,
        args: vec![
            Read(0),
            Read(1),
            I32(b_i),
            I32(c_i),
            I32(t_i),
            I32(probability as i32),
            Write(2),
        ],
    })
}

impl Kernels {
    /// [`scores_launch`].
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
        let launch = scores_launch(logits.len(), targets.len(), out.len(), b, c, t, probability)?;
        let (logits_p, _logits) = logits.device_ptr(stream);
        let (targets_p, _targets) = targets.device_ptr(stream);
        let (out_p, _out) = out.device_ptr_mut(stream);
        self.run(stream, &launch, &[logits_p, targets_p, out_p])
    }
}
