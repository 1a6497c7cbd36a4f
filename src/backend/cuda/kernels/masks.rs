//! Launcher for kernels/masks.cu: every masked input of a batch in one launch.

use std::sync::Arc;

use cudarc::driver::{CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};
use half::f16;

use super::{cpad_arg, dim, invalid, need, prod, KernelArg, KernelLaunch, Kernels};
use super::{LaunchLimits, BLOCK};
use crate::error::Result;

/// The mask variant of one `masks` launch: min/max over the low-resolution plane (torchcam),
/// a scale on the normalized mask (IS-CAM), Gaussian noise σ·N(0,1) from the counter-based
/// generator keyed by `seed` (SS-CAM; `sigma` 0 adds none).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MaskVariant {
    pub lowres_stats: bool,
    pub scale: f32,
    pub sigma: f32,
    pub seed: u64,
}

impl Default for MaskVariant {
    fn default() -> Self {
        MaskVariant {
            lowres_stats: false,
            scale: 1.0,
            sigma: 0.0,
            seed: 0,
        }
    }
}

/// The sizes of one `masks` launch: `b` items, masked inputs `s`×`s` with `cpad` stored
/// channels, activations `h`×`w` with `k` channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MasksShape {
    pub b: usize,
    pub s: usize,
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub cpad: usize,
}

/// Modes of kernels/masks.cu (how U is evaluated): `masks` runs the separable one,
/// `masks_direct` the other two.
const MASKS_MODE_GLOBAL: i32 = 0;
const MASKS_MODE_SMEM_PLANE: i32 = 1;
const MASKS_MODE_SEPARABLE: i32 = 2;

/// `masks` / `masks_direct`: all masked inputs of a batch in one launch. Buffers: `[images,
/// acts, items, out]`. `items` is `[b, 3]` u32: image slot, channel, noise stream. For item i:
/// `U` = bilinear upsample to S×S of `acts[image, :, :, channel]` (`acts` `[N, h, w, k]` NHWC),
/// half-pixel centres (PyTorch `align_corners=False`, source coordinate clamped at 0) or
/// `align_corners=True`; `M = (U − min U)/(max U − min U + eps)`;
/// `out[i, y, x, c] = images[image, y, x, c] · M[y, x]` for c < 3, 0 for padding channels.
/// `images` `[N, S, S, cpad]`, `out` `[≥b, S, S, cpad]`. A channel with max == min writes
/// zeros when eps == 0 (the caller never asks for such channels in official mode).
///
/// `variant` adds torchcam's low-resolution statistics, a scale and Gaussian noise (see
/// [`MaskVariant`]).
///
/// N is taken from the lengths of `images` and `acts`; an item whose image slot or channel
/// is out of range (the kernel checks, the host cannot see `items`) gets an all-zero output.
///
/// The kernel and its shared memory follow from the plane and `limits.masks_smem`
/// (`masks_mode`); the blocks per item from the blocks resident on the device,
/// `resident_per_sm(kernel, shared memory bytes)` per SM.
pub fn masks_launch(
    images_len: usize,
    acts_len: usize,
    items_len: usize,
    out_len: usize,
    shape: MasksShape,
    align_corners: bool,
    eps: f32,
    variant: MaskVariant,
    limits: &LaunchLimits,
    resident_per_sm: &dyn Fn(&'static str, usize) -> u32,
) -> Result<KernelLaunch> {
    const OP: &str = "masks";
    let MasksShape {
        b,
        s,
        h,
        w,
        k,
        cpad,
    } = shape;
    let b_i = dim(OP, "b", b)?;
    let s_i = dim(OP, "s", s)?;
    let h_i = dim(OP, "h", h)?;
    let w_i = dim(OP, "w", w)?;
    let k_i = dim(OP, "k", k)?;
    let cpad_i = cpad_arg(OP, cpad)?;
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(invalid(OP, format!("eps {eps} must be finite and ≥ 0")));
    }
    if !(variant.scale.is_finite() && variant.sigma.is_finite() && variant.sigma >= 0.0) {
        return Err(invalid(
            OP,
            format!(
                "scale {} and sigma {} must be finite, sigma ≥ 0",
                variant.scale, variant.sigma
            ),
        ));
    }
    let per_item = prod(OP, &[s, s, cpad])?;
    if per_item > i32::MAX as usize / 2 {
        return Err(invalid(
            OP,
            format!("s={s}, cpad={cpad}: one masked input is too large"),
        ));
    }
    let plane = prod(OP, &[h, w])?;
    let per_image_acts = prod(OP, &[plane, k])?;
    need(OP, "items", items_len, prod(OP, &[b, 3])?)?;
    need(OP, "images", images_len, per_item)?;
    need(OP, "acts", acts_len, per_image_acts)?;
    need(OP, "out", out_len, prod(OP, &[b, per_item])?)?;
    let n_img = (images_len / per_item).min(acts_len / per_image_acts);
    let n_img_i = n_img.min(i32::MAX as usize) as i32;

    let (mode, smem) = masks_mode(h, w, s, limits.masks_smem);
    let separable = mode == MASKS_MODE_SEPARABLE;
    let kernel = if separable { "masks" } else { "masks_direct" };
    let resident = limits
        .sm_count
        .saturating_mul(resident_per_sm(kernel, smem).max(1));
    let parts = masks_blocks_per_item(b, s, resident, separable);
    let grid = (b as u64 * parts as u64).min(i32::MAX as u64) as u32;
    use KernelArg::*;
    let mut args = vec![
        Read(0),
        Read(1),
        Read(2),
        I32(b_i),
        I32(n_img_i),
        I32(s_i),
        I32(h_i),
        I32(w_i),
        I32(k_i),
        I32(cpad_i),
        I32(align_corners as i32),
        F32(eps),
        I32(variant.lowres_stats as i32),
        F32(variant.scale),
        F32(variant.sigma),
        U64(crate::backend::splitmix64(variant.seed)),
        I32(parts as i32),
    ];
    if !separable {
        args.push(I32((mode == MASKS_MODE_SMEM_PLANE) as i32));
    }
    args.push(Write(3));
    Ok(KernelLaunch {
        kernel,
        grid,
        block: BLOCK,
        shared_mem_bytes: smem as u32,
        args,
    })
}

impl Kernels {
    /// [`masks_launch`], the blocks resident per SM queried once per kernel and shared memory
    /// size (not per launch).
    pub fn masks(
        &self,
        stream: &Arc<CudaStream>,
        images: &CudaView<'_, f16>,
        acts: &CudaView<'_, f16>,
        items: &CudaView<'_, u32>,
        shape: MasksShape,
        align_corners: bool,
        eps: f32,
        variant: MaskVariant,
        out: &mut CudaViewMut<'_, f16>,
    ) -> Result<()> {
        let occupancy = |kernel: &'static str, smem: usize| {
            *self
                .masks_occupancy
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry((kernel, smem))
                .or_insert_with(|| {
                    self.functions[kernel]
                        .occupancy_max_active_blocks_per_multiprocessor(BLOCK, smem, None)
                        .unwrap_or(4)
                        .max(1)
                })
        };
        let launch = masks_launch(
            images.len(),
            acts.len(),
            items.len(),
            out.len(),
            shape,
            align_corners,
            eps,
            variant,
            &self.limits,
            &occupancy,
        )?;
        let (images_p, _images) = images.device_ptr(stream);
        let (acts_p, _acts) = acts.device_ptr(stream);
        let (items_p, _items) = items.device_ptr(stream);
        let (out_p, _out) = out.device_ptr_mut(stream);
        self.run(stream, &launch, &[images_p, acts_p, items_p, out_p])
    }
}

/// How the masks kernels evaluate U for an h×w plane upsampled to s×s with `budget` bytes of dynamic
/// shared memory: (mode, dynamic shared memory bytes). Separable (plane + the h×s horizontally
/// interpolated rows in shared memory) when it fits, else the plane alone in shared memory, else
/// straight from global memory.
fn masks_mode(h: usize, w: usize, s: usize, budget: usize) -> (i32, usize) {
    let plane = h.saturating_mul(w).saturating_mul(4);
    let rows = h.saturating_mul(s).saturating_mul(4);
    if plane.saturating_add(rows) <= budget {
        (MASKS_MODE_SEPARABLE, plane + rows)
    } else if plane <= budget {
        (MASKS_MODE_SMEM_PLANE, plane)
    } else {
        (MASKS_MODE_GLOBAL, 0)
    }
}

/// Blocks that share one masked input. Every block of an item recomputes the item's min/max, so
/// several are used only when the batch alone cannot fill the GPU (`resident` = blocks resident
/// at once): enough for about two waves when the min/max is cheap (separable mode: two shared
/// loads and two flops per pixel), one otherwise; at most one per 8 output rows (each warp of
/// the block then gets a row) and at most 32.
fn masks_blocks_per_item(b: usize, s: usize, resident: u32, cheap_minmax: bool) -> u32 {
    let target = resident.max(1) as usize * if cheap_minmax { 2 } else { 1 };
    if b == 0 || b >= target {
        return 1;
    }
    let cap = s.div_ceil((BLOCK / 32) as usize).clamp(1, 32);
    target.div_ceil(b).clamp(1, cap) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::kernels::{SMEM_DEFAULT, SMEM_OPT_IN};

    #[test]
    fn masks_launch_shape() {
        // VGG16 at 224: 14×14 plane + 14×224 rows = 13.3 KB → separable.
        assert_eq!(
            masks_mode(14, 14, 224, SMEM_DEFAULT),
            (MASKS_MODE_SEPARABLE, (196 + 3136) * 4)
        );
        // 28×28 at 448: 53 KB, separable only with the opt-in budget.
        assert_eq!(
            masks_mode(28, 28, 448, SMEM_DEFAULT),
            (MASKS_MODE_SMEM_PLANE, 784 * 4)
        );
        assert_eq!(masks_mode(28, 28, 448, SMEM_OPT_IN).0, MASKS_MODE_SEPARABLE);
        // A 224×224 target layer: straight from global memory.
        assert_eq!(
            masks_mode(224, 224, 224, SMEM_OPT_IN),
            (MASKS_MODE_GLOBAL, 0)
        );
        assert_eq!(
            masks_mode(usize::MAX, 2, 2, SMEM_OPT_IN).0,
            MASKS_MODE_GLOBAL
        );

        // H100: 132 SMs × 6 resident blocks = 792.
        let resident = 132 * 6;
        // 512 items: two waves need 1584 blocks → 4 blocks per item (cheap min/max).
        assert_eq!(masks_blocks_per_item(512, 224, resident, true), 4);
        // Expensive min/max: one wave's worth → 2 per item.
        assert_eq!(masks_blocks_per_item(512, 224, resident, false), 2);
        // A batch that fills the GPU twice on its own: one block per item.
        assert_eq!(masks_blocks_per_item(2000, 224, resident, true), 1);
        // A single item: capped at 28 (224 rows / 8 warps).
        assert_eq!(masks_blocks_per_item(1, 224, resident, true), 28);
        // Tiny maps never get more blocks than rows for their warps.
        assert_eq!(masks_blocks_per_item(1, 16, resident, true), 2);
        assert_eq!(masks_blocks_per_item(1, 1, resident, true), 1);
        assert_eq!(masks_blocks_per_item(0, 224, 0, true), 1);
        assert_eq!(masks_blocks_per_item(3, 224, 0, false), 1);
    }
}
