//! Launchers for kernels/combine.cu.

use std::sync::Arc;

use cudarc::driver::{CudaStream, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
use half::f16;

use super::{dim, invalid, need, prod, Kernels, MAP_BLOCK, SMEM_DEFAULT};
use crate::error::Result;

impl Kernels {
    /// Low-resolution weighted channel sum: `out[y, x] = Σ_k weights[k] · acts[y, x, k]` for one
    /// image (`acts` `[h, w, k]` NHWC, `weights` `[k]` f32, `out` `[h, w]` f32), optionally ReLU'd.
    pub fn weighted_channel_sum(
        &self,
        stream: &Arc<CudaStream>,
        acts: &CudaView<'_, f16>,
        weights: &CudaView<'_, f32>,
        h: usize,
        w: usize,
        k: usize,
        relu: bool,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        const OP: &str = "weighted_channel_sum";
        let h_i = dim(OP, "h", h)?;
        let w_i = dim(OP, "w", w)?;
        let k_i = dim(OP, "k", k)?;
        let plane = prod(OP, &[h, w])?;
        need(OP, "acts", acts.len(), prod(OP, &[plane, k])?)?;
        need(OP, "weights", weights.len(), k)?;
        need(OP, "out", out.len(), plane)?;
        // One warp per pixel.
        let cfg = self.grid_stride(prod(OP, &[plane, 32])?);
        let r = relu as i32;
        self.launch(OP, stream, &self.weighted_channel_sum, cfg, |lb| {
            lb.arg(acts).arg(weights).arg(&h_i).arg(&w_i);
            lb.arg(&k_i).arg(&r).arg(out);
        })
    }

    /// `out` `[s, s]` = ReLU(bilinear upsample of `low` `[h, w]`) (half-pixel or align-corners),
    /// then min-max normalized to [0, 1] in the same launch (one block; all zeros when
    /// max == min). `flat` (one u32) is set to 1 when the map was constant, else 0.
    pub fn upsample_relu_normalize(
        &self,
        stream: &Arc<CudaStream>,
        low: &CudaView<'_, f32>,
        h: usize,
        w: usize,
        s: usize,
        align_corners: bool,
        out: &mut CudaViewMut<'_, f32>,
        flat: &mut CudaViewMut<'_, u32>,
    ) -> Result<()> {
        const OP: &str = "upsample_relu_normalize";
        let h_i = dim(OP, "h", h)?;
        let w_i = dim(OP, "w", w)?;
        let s_i = dim(OP, "s", s)?;
        let plane = prod(OP, &[h, w])?;
        let pixels = prod(OP, &[s, s])?;
        if pixels > i32::MAX as usize / 2 {
            return Err(invalid(OP, format!("s={s}: the map is too large")));
        }
        need(OP, "low", low.len(), plane)?;
        need(OP, "out", out.len(), pixels)?;
        need(OP, "flat", flat.len(), 1)?;
        let in_smem = plane * 4 <= SMEM_DEFAULT;
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (MAP_BLOCK, 1, 1),
            shared_mem_bytes: if in_smem { (plane * 4) as u32 } else { 0 },
        };
        let ac = align_corners as i32;
        let in_smem_i = in_smem as i32;
        self.launch(OP, stream, &self.upsample_relu_normalize, cfg, |lb| {
            lb.arg(low).arg(&h_i).arg(&w_i).arg(&s_i);
            lb.arg(&ac).arg(&in_smem_i).arg(out).arg(flat);
        })
    }
}
