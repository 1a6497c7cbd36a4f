//! Launchers for the hand-written kernels in `kernels/*.cu` (embedded by build.rs, compiled once
//! per process by NVRTC for the device's own architecture). One launcher per kernel: it owns the
//! grid/block shape and checks its inputs before launching (llm.c style).
//!
//! Layouts: images, masked inputs and activations are FP16 NHWC; `cpad` is the channel count of
//! the input images as stored (3 real channels, the rest zero). Logits and maps are f32.
//!
//! CONTRACT (shared by the kernels author and the CUDA backend author; keep these signatures):
//! every launcher returns `crate::Result<()>` and maps launch errors to `Error::Cuda { op, .. }`.
//!
//! Compilation: all sources are assembled into one NVRTC program (`#include "common.cuh"` is
//! inlined once, `#line` directives keep NVRTC's messages pointing at the real files) and compiled
//! to a CUBIN for the device's `sm_XY`, so the driver never JITs PTX made by a newer NVRTC
//! (CUDA_ERROR_UNSUPPORTED_PTX_VERSION). Only when NVRTC cannot produce that CUBIN does it fall
//! back to PTX. Images are cached per architecture for the whole process. The kernels need no
//! CUDA headers (FP16 is handled with PTX `cvt` in common.cuh); the include paths below are still
//! passed when they exist.

#![allow(clippy::too_many_arguments)]

use std::collections::HashMap;
use std::ffi::{CStr, CString, OsString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaStream, CudaView, CudaViewMut, LaunchConfig,
    PushKernelArg,
};
use cudarc::nvrtc::{result as nvrtc_result, sys as nvrtc_sys, Ptx};
use half::f16;

use crate::error::{Error, Result};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/kernel_sources.rs"));
}

/// Every `extern "C" __global__` function in `kernels/*.cu`.
const KERNEL_NAMES: &[&str] = &[
    "preprocess",
    "masks",
    "masks_direct",
    "scores",
    "weighted_channel_sum",
    "upsample_relu_normalize",
    "maxpool2",
    "adaptive_avgpool",
    "bias_act_f16",
    "bias_f32",
    "relu_f16",
];

/// The names of every kernel the module exports (`extern "C"`, so unmangled).
pub fn kernel_names() -> &'static [&'static str] {
    KERNEL_NAMES
}

/// The embedded kernel sources: (file name, text), headers first.
pub fn sources() -> &'static [(&'static str, &'static str)] {
    embedded::SOURCES
}

/// Threads per block of the grid-stride kernels and of `masks` / `scores` (a multiple of 32: the
/// block reductions in common.cuh rely on whole warps).
const BLOCK: u32 = 256;
/// Threads of the single block of `upsample_relu_normalize`.
const MAP_BLOCK: u32 = 512;
/// Dynamic shared memory a block may always use: 44 KiB, leaving room for the reductions' static
/// shared memory under the 48 KiB default.
const SMEM_DEFAULT: usize = 44 * 1024;
/// Dynamic shared memory `masks` opts into where the device allows (cuFuncSetAttribute), so the
/// separable mode also covers e.g. a 28×28 layer at S = 448 (53 KiB).
const SMEM_OPT_IN: usize = 96 * 1024;

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

/// Modes of kernels/masks.cu (how U is evaluated): `masks` runs the separable one,
/// `masks_direct` the other two.
const MASKS_MODE_GLOBAL: i32 = 0;
const MASKS_MODE_SMEM_PLANE: i32 = 1;
const MASKS_MODE_SEPARABLE: i32 = 2;

/// The compiled kernel module for one context. Build once (`Kernels::load`) and keep.
pub struct Kernels {
    ctx: Arc<CudaContext>,
    _module: Arc<CudaModule>,
    preprocess: CudaFunction,
    masks: CudaFunction,
    masks_direct: CudaFunction,
    scores: CudaFunction,
    weighted_channel_sum: CudaFunction,
    upsample_relu_normalize: CudaFunction,
    maxpool2: CudaFunction,
    adaptive_avgpool: CudaFunction,
    bias_act_f16: CudaFunction,
    bias_f32: CudaFunction,
    relu_f16: CudaFunction,
    /// Streaming multiprocessors of the device (sizes the grids).
    sm_count: u32,
    /// Dynamic shared memory `masks` / `masks_direct` may use per block (bytes).
    masks_smem: usize,
    /// The architecture the module was compiled for, e.g. `sm_90` (or `compute_86` for PTX).
    arch: String,
    /// Resident blocks per SM of the masks kernels, by (separable kernel, shared memory bytes).
    masks_occupancy: Mutex<HashMap<(bool, usize), u32>>,
}

impl Kernels {
    /// Compile every kernel in `kernels/*.cu` with NVRTC for `ctx`'s device (CUBIN for its own
    /// `sm_XY`, so a newer NVRTC than the driver does not matter), load the module, look up the
    /// functions. Errors: `Error::CudaUnavailable` with NVRTC's log on a compile failure.
    pub fn load(ctx: &Arc<CudaContext>) -> Result<Self> {
        ensure_nvrtc()?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| Error::CudaUnavailable(format!("reading the compute capability: {e}")))?;
        let (arch, image) = image_for_device(major, minor)?;
        let ptx = if is_cubin(&image) {
            Ptx::from_binary(image)
        } else {
            let text = String::from_utf8(image).map_err(|_| {
                Error::CudaUnavailable(format!("NVRTC returned non-UTF-8 PTX for {arch}"))
            })?;
            Ptx::from_src(text)
        };
        let module = ctx.load_module(ptx).map_err(|e| {
            Error::CudaUnavailable(format!("loading the kernel module ({arch}): {e}"))
        })?;
        let f = |name: &str| {
            module.load_function(name).map_err(|e| {
                Error::CudaUnavailable(format!("kernel `{name}` missing from the module: {e}"))
            })
        };
        let sm_count = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| Error::CudaUnavailable(format!("reading the SM count: {e}")))?
            .max(1) as u32;
        let masks = f("masks")?;
        let masks_direct = f("masks_direct")?;
        // Opt the masks kernels into more shared memory where the device has it; else 44 KiB.
        let opt_in = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map(|v| v.max(0) as usize)
            .unwrap_or(0);
        let want = SMEM_OPT_IN.min(opt_in.saturating_sub(4 * 1024));
        let attr = CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
        let masks_smem = if want > SMEM_DEFAULT
            && masks.set_attribute(attr, want as i32).is_ok()
            && masks_direct.set_attribute(attr, want as i32).is_ok()
        {
            want
        } else {
            SMEM_DEFAULT
        };
        Ok(Kernels {
            preprocess: f("preprocess")?,
            masks,
            masks_direct,
            scores: f("scores")?,
            weighted_channel_sum: f("weighted_channel_sum")?,
            upsample_relu_normalize: f("upsample_relu_normalize")?,
            maxpool2: f("maxpool2")?,
            adaptive_avgpool: f("adaptive_avgpool")?,
            bias_act_f16: f("bias_act_f16")?,
            bias_f32: f("bias_f32")?,
            relu_f16: f("relu_f16")?,
            ctx: ctx.clone(),
            _module: module,
            sm_count,
            masks_smem,
            arch,
            masks_occupancy: Mutex::new(HashMap::new()),
        })
    }

    /// The architecture the kernels were compiled for (`sm_90`; `compute_XY` if PTX).
    pub fn arch(&self) -> &str {
        &self.arch
    }

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
        self.check_stream(OP, stream)?;
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
        let cfg = self.grid_stride(pixels);
        let mut b = stream.launch_builder(&self.preprocess);
        b.arg(rgb).arg(&s_i);
        b.arg(&mean[0]).arg(&mean[1]).arg(&mean[2]);
        b.arg(&std[0]).arg(&std[1]).arg(&std[2]);
        b.arg(&cpad_i).arg(&mut *out);
        unsafe { b.launch(cfg) }.map_err(|e| Error::cuda(OP, e))?;
        Ok(())
    }

    /// All masked inputs of a batch in one launch. `items` is `[b, 2]` u32 (image slot, channel).
    /// For item i: `U` = bilinear upsample to S×S of `acts[image, :, :, channel]`
    /// (`acts` `[N, h, w, k]` NHWC), half-pixel centres (PyTorch `align_corners=False`, source
    /// coordinate clamped at 0) or `align_corners=True`; `M = (U − min U)/(max U − min U + eps)`;
    /// `out[i, y, x, c] = images[image, y, x, c] · M[y, x]` for c < 3, 0 for padding channels.
    /// `images` `[N, S, S, cpad]`, `out` `[≥b, S, S, cpad]`. A channel with max == min writes
    /// zeros when eps == 0 (the caller never asks for such channels in official mode).
    ///
    /// `variant` adds torchcam's low-resolution statistics, a scale and Gaussian noise (see
    /// [`MaskVariant`]); `items` is `[b, 3]`: image slot, channel, noise stream.
    ///
    /// N is taken from the lengths of `images` and `acts`; an item whose image slot or channel
    /// is out of range (the kernel checks, the host cannot see `items`) gets an all-zero output.
    pub fn masks(
        &self,
        stream: &Arc<CudaStream>,
        images: &CudaView<'_, f16>,
        acts: &CudaView<'_, f16>,
        items: &CudaView<'_, u32>,
        b: usize,
        s: usize,
        h: usize,
        w: usize,
        k: usize,
        cpad: usize,
        align_corners: bool,
        eps: f32,
        variant: MaskVariant,
        out: &mut CudaViewMut<'_, f16>,
    ) -> Result<()> {
        const OP: &str = "masks";
        self.check_stream(OP, stream)?;
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
        need(OP, "items", items.len(), prod(OP, &[b, 3])?)?;
        need(OP, "images", images.len(), per_item)?;
        need(OP, "acts", acts.len(), per_image_acts)?;
        need(OP, "out", out.len(), prod(OP, &[b, per_item])?)?;
        let n_img = (images.len() / per_item).min(acts.len() / per_image_acts);
        let n_img_i = n_img.min(i32::MAX as usize) as i32;

        let (mode, smem) = masks_mode(h, w, s, self.masks_smem);
        let separable = mode == MASKS_MODE_SEPARABLE;
        let func = if separable {
            &self.masks
        } else {
            &self.masks_direct
        };
        // Queried once per kernel and shared-memory size, not per launch.
        let per_sm = *self
            .masks_occupancy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((separable, smem))
            .or_insert_with(|| {
                func.occupancy_max_active_blocks_per_multiprocessor(BLOCK, smem, None)
                    .unwrap_or(4)
                    .max(1)
            });
        let resident = self.sm_count.saturating_mul(per_sm);
        let parts = masks_blocks_per_item(b, s, resident, separable);
        let grid = (b as u64 * parts as u64).min(i32::MAX as u64) as u32;
        let cfg = LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let ac = align_corners as i32;
        let parts_i = parts as i32;
        let in_smem = (mode == MASKS_MODE_SMEM_PLANE) as i32;
        let mut lb = stream.launch_builder(func);
        lb.arg(images).arg(acts).arg(items);
        lb.arg(&b_i)
            .arg(&n_img_i)
            .arg(&s_i)
            .arg(&h_i)
            .arg(&w_i)
            .arg(&k_i)
            .arg(&cpad_i);
        let lowres = variant.lowres_stats as i32;
        let seed_key = crate::backend::splitmix64(variant.seed);
        lb.arg(&ac).arg(&eps);
        lb.arg(&lowres)
            .arg(&variant.scale)
            .arg(&variant.sigma)
            .arg(&seed_key);
        lb.arg(&parts_i);
        if !separable {
            lb.arg(&in_smem);
        }
        lb.arg(&mut *out);
        unsafe { lb.launch(cfg) }.map_err(|e| Error::cuda(OP, e))?;
        Ok(())
    }

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
        self.check_stream(OP, stream)?;
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
        let mut lb = stream.launch_builder(&self.scores);
        lb.arg(logits)
            .arg(targets)
            .arg(&b_i)
            .arg(&c_i)
            .arg(&t_i)
            .arg(&p)
            .arg(&mut *out);
        unsafe { lb.launch(cfg) }.map_err(|e| Error::cuda(OP, e))?;
        Ok(())
    }

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
        self.check_stream(OP, stream)?;
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
        let mut lb = stream.launch_builder(&self.weighted_channel_sum);
        lb.arg(acts)
            .arg(weights)
            .arg(&h_i)
            .arg(&w_i)
            .arg(&k_i)
            .arg(&r)
            .arg(&mut *out);
        unsafe { lb.launch(cfg) }.map_err(|e| Error::cuda(OP, e))?;
        Ok(())
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
        self.check_stream(OP, stream)?;
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
        let mut lb = stream.launch_builder(&self.upsample_relu_normalize);
        lb.arg(low)
            .arg(&h_i)
            .arg(&w_i)
            .arg(&s_i)
            .arg(&ac)
            .arg(&in_smem_i);
        lb.arg(&mut *out).arg(&mut *flat);
        unsafe { lb.launch(cfg) }.map_err(|e| Error::cuda(OP, e))?;
        Ok(())
    }

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
        self.check_stream(OP, stream)?;
        let n_i = dim(OP, "n", n)?;
        let h_i = dim(OP, "h", h)?;
        let w_i = dim(OP, "w", w)?;
        let c_i = dim(OP, "c", c)?;
        if h < 2 || w < 2 {
            return Err(invalid(
                OP,
                format!("{h}×{w} input is smaller than the 2×2 window"),
            ));
        }
        need(OP, "x", x.len(), prod(OP, &[n, h, w, c])?)?;
        let total = prod(OP, &[n, h / 2, w / 2, c])?;
        need(OP, "y", y.len(), total)?;
        let units = if c.is_multiple_of(8) {
            total / 8
        } else {
            total
        };
        let cfg = self.grid_stride(units);
        let mut lb = stream.launch_builder(&self.maxpool2);
        lb.arg(x)
            .arg(&n_i)
            .arg(&h_i)
            .arg(&w_i)
            .arg(&c_i)
            .arg(&mut *y);
        unsafe { lb.launch(cfg) }.map_err(|e| Error::cuda(OP, e))?;
        Ok(())
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
        self.check_stream(OP, stream)?;
        let n_i = dim(OP, "n", n)?;
        let h_i = dim(OP, "h", h)?;
        let w_i = dim(OP, "w", w)?;
        let c_i = dim(OP, "c", c)?;
        let oh_i = dim(OP, "oh", oh)?;
        let ow_i = dim(OP, "ow", ow)?;
        need(OP, "x", x.len(), prod(OP, &[n, h, w, c])?)?;
        let total = prod(OP, &[n, oh, ow, c])?;
        need(OP, "y", y.len(), total)?;
        let cfg = self.grid_stride(total);
        let mut lb = stream.launch_builder(&self.adaptive_avgpool);
        lb.arg(x)
            .arg(&n_i)
            .arg(&h_i)
            .arg(&w_i)
            .arg(&c_i)
            .arg(&oh_i)
            .arg(&ow_i);
        lb.arg(&mut *y);
        unsafe { lb.launch(cfg) }.map_err(|e| Error::cuda(OP, e))?;
        Ok(())
    }

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
        self.check_stream(OP, stream)?;
        let rows_i = dim(OP, "rows", rows)?;
        let cols_i = dim(OP, "cols", cols)?;
        let total = prod(OP, &[rows, cols])?;
        need(OP, "y", y.len(), total)?;
        need(OP, "bias", bias.len(), cols)?;
        let units = if cols.is_multiple_of(8) {
            total / 8
        } else {
            total
        };
        let cfg = self.grid_stride(units);
        let r = relu as i32;
        let mut lb = stream.launch_builder(&self.bias_act_f16);
        lb.arg(&mut *y).arg(bias).arg(&rows_i).arg(&cols_i).arg(&r);
        unsafe { lb.launch(cfg) }.map_err(|e| Error::cuda(OP, e))?;
        Ok(())
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
        self.check_stream(OP, stream)?;
        let rows_i = dim(OP, "rows", rows)?;
        let cols_i = dim(OP, "cols", cols)?;
        let total = prod(OP, &[rows, cols])?;
        need(OP, "y", y.len(), total)?;
        need(OP, "bias", bias.len(), cols)?;
        let units = if cols.is_multiple_of(4) {
            total / 4
        } else {
            total
        };
        let cfg = self.grid_stride(units);
        let mut lb = stream.launch_builder(&self.bias_f32);
        lb.arg(&mut *y).arg(bias).arg(&rows_i).arg(&cols_i);
        unsafe { lb.launch(cfg) }.map_err(|e| Error::cuda(OP, e))?;
        Ok(())
    }

    /// In place ReLU over `n` f16 values.
    pub fn relu_f16(
        &self,
        stream: &Arc<CudaStream>,
        x: &mut CudaViewMut<'_, f16>,
        n: usize,
    ) -> Result<()> {
        const OP: &str = "relu_f16";
        self.check_stream(OP, stream)?;
        if n == 0 {
            return Err(invalid(OP, "n must be > 0".into()));
        }
        need(OP, "x", x.len(), n)?;
        let n_i = i64::try_from(n).map_err(|_| invalid(OP, format!("n={n} is too large")))?;
        let cfg = self.grid_stride(n.div_ceil(8));
        let mut lb = stream.launch_builder(&self.relu_f16);
        lb.arg(&mut *x).arg(&n_i);
        unsafe { lb.launch(cfg) }.map_err(|e| Error::cuda(OP, e))?;
        Ok(())
    }

    /// A 1-D grid for a grid-stride kernel over `units` work items (one per thread): enough
    /// blocks for every unit, at most 32 blocks of 256 threads per SM (4 full waves; the loops
    /// inside cover the rest).
    fn grid_stride(&self, units: usize) -> LaunchConfig {
        let cap = (self.sm_count as usize).saturating_mul(32).max(1);
        let blocks = units.div_ceil(BLOCK as usize).clamp(1, cap);
        LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// The stream must belong to the context the module was loaded in.
    fn check_stream(&self, op: &str, stream: &Arc<CudaStream>) -> Result<()> {
        if Arc::ptr_eq(stream.context(), &self.ctx) {
            Ok(())
        } else {
            Err(invalid(
                op,
                "the stream belongs to another CUDA context than the kernels".into(),
            ))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Argument checks (host side, never panic).

fn invalid(op: &str, msg: String) -> Error {
    Error::Invalid(format!("{op}: {msg}"))
}

/// A size argument: > 0 and representable as the kernels' `int`.
fn dim(op: &str, name: &str, v: usize) -> Result<i32> {
    if v == 0 {
        return Err(invalid(op, format!("{name} must be > 0")));
    }
    i32::try_from(v).map_err(|_| invalid(op, format!("{name}={v} exceeds {}", i32::MAX)))
}

fn cpad_arg(op: &str, cpad: usize) -> Result<i32> {
    if (3..=8).contains(&cpad) {
        Ok(cpad as i32)
    } else {
        Err(invalid(op, format!("cpad={cpad} must be in 3..=8")))
    }
}

/// Product of `dims`, an error on overflow.
fn prod(op: &str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| invalid(op, format!("size {dims:?} overflows")))
}

/// `what` (a view of `len` elements) must hold at least `needed` elements.
fn need(op: &str, what: &str, len: usize, needed: usize) -> Result<()> {
    if len >= needed {
        Ok(())
    } else {
        Err(invalid(
            op,
            format!("`{what}` has {len} elements, the shapes need {needed}"),
        ))
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

// ---------------------------------------------------------------------------------------------
// NVRTC.

/// Options for every compile (plus `--gpu-architecture` and the include paths). No fast math:
/// the softmax and the mask normalization keep accurate `expf` and divisions.
const NVRTC_OPTIONS: &[&str] = &["-std=c++17", "-default-device", "-lineinfo"];

/// NVRTC must be loadable before any cudarc::nvrtc call (cudarc panics otherwise).
fn ensure_nvrtc() -> Result<()> {
    if unsafe { nvrtc_sys::is_culib_present() } {
        Ok(())
    } else {
        Err(Error::CudaUnavailable(
            "NVRTC (libnvrtc.so) could not be loaded: install the CUDA toolkit's NVRTC or the \
             `nvidia-cuda-nvrtc` wheel and put its lib directory on LD_LIBRARY_PATH"
                .into(),
        ))
    }
}

/// Whether NVRTC can be loaded in this process.
pub fn nvrtc_available() -> bool {
    unsafe { nvrtc_sys::is_culib_present() }
}

/// NVRTC's version, e.g. (13, 0), if it can be loaded.
pub fn nvrtc_version() -> Option<(i32, i32)> {
    if !nvrtc_available() {
        return None;
    }
    let (mut major, mut minor) = (0, 0);
    let r = unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) };
    (r == nvrtc_sys::nvrtcResult::NVRTC_SUCCESS).then_some((major, minor))
}

/// The architectures this NVRTC can compile for (e.g. `[75, 80, 86, ..., 120]`).
fn supported_archs() -> Vec<i32> {
    let mut n = 0;
    if unsafe { nvrtc_sys::nvrtcGetNumSupportedArchs(&mut n) }
        != nvrtc_sys::nvrtcResult::NVRTC_SUCCESS
        || n <= 0
    {
        return Vec::new();
    }
    let mut archs = vec![0i32; n as usize];
    if unsafe { nvrtc_sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) }
        != nvrtc_sys::nvrtcResult::NVRTC_SUCCESS
    {
        return Vec::new();
    }
    archs
}

/// An ELF image (CUBIN) rather than PTX text.
pub fn is_cubin(image: &[u8]) -> bool {
    image.starts_with(b"\x7fELF")
}

/// Compiled images per architecture (`sm_90` → CUBIN, `compute_90` → PTX), for the whole process:
/// a second context on the same kind of device does not recompile.
fn cache() -> &'static Mutex<HashMap<String, Vec<u8>>> {
    static CACHE: OnceLock<Mutex<HashMap<String, Vec<u8>>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Compile every kernel for `arch` (`sm_XY`: a CUBIN, or PTX for `compute_XY` if this NVRTC
/// cannot emit that CUBIN; `compute_XY`: PTX), without a device. Cached per process.
/// Errors: `Error::Invalid` for a malformed arch, `Error::CudaUnavailable` when NVRTC is missing
/// or the compile fails (with NVRTC's log).
pub fn compile_for_arch(arch: &str) -> Result<Vec<u8>> {
    parse_arch(arch)?;
    ensure_nvrtc()?;
    // Hold the lock while compiling: concurrent first users wait instead of compiling twice.
    let mut cache = cache().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(image) = cache.get(arch) {
        return Ok(image.clone());
    }
    let (image, _) = compile_cached(arch, disk_cache_dir().as_deref())?;
    cache.insert(arch.to_owned(), image.clone());
    Ok(image)
}

/// Where compiled kernels are kept between runs: `$SCORECAM_KERNEL_CACHE` (`off`: nowhere), else
/// `$XDG_CACHE_HOME/scorecam-gpu/kernels`, else `~/.cache/scorecam-gpu/kernels`.
pub fn disk_cache_dir() -> Option<PathBuf> {
    match std::env::var_os("SCORECAM_KERNEL_CACHE") {
        Some(v) if v == "off" || v.is_empty() => None,
        Some(v) => Some(PathBuf::from(v)),
        None => std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .map(|c| c.join("scorecam-gpu").join("kernels")),
    }
}

/// The file a compiled image lives in under `dir`: named by the arch, the NVRTC version and a
/// hash of everything that shapes the output (the assembled sources, the options, the include
/// directories' paths), so a change of any of them compiles anew.
fn cache_file(dir: &Path, arch: &str) -> Result<PathBuf> {
    let source = assemble_source(sources()).map_err(Error::CudaUnavailable)?;
    let (major, minor) = nvrtc_version().unwrap_or((0, 0));
    let mut key = source.into_bytes();
    for o in NVRTC_OPTIONS {
        key.extend_from_slice(o.as_bytes());
        key.push(0);
    }
    for d in include_dirs() {
        key.extend_from_slice(d.to_string_lossy().as_bytes());
        key.push(0);
    }
    let hash = twox_hash::XxHash64::oneshot(0, &key);
    Ok(dir.join(format!("{arch}-nvrtc{major}.{minor}-{hash:016x}.bin")))
}

/// Compile for `arch`, through the on-disk cache in `dir` when there is one: a cached image is
/// used if it is a CUBIN or PTX; a missing, unreadable or damaged one is compiled and written back
/// (atomically); a cache that cannot be written costs only the compile. Returns the image and
/// whether it came from the disk.
pub fn compile_cached(arch: &str, dir: Option<&Path>) -> Result<(Vec<u8>, bool)> {
    let file = match dir {
        Some(d) => Some(cache_file(d, arch)?),
        None => None,
    };
    if let Some(f) = &file {
        if let Ok(bytes) = std::fs::read(f) {
            let ptx = bytes.starts_with(b"//") || bytes.starts_with(b".version");
            if is_cubin(&bytes) || (ptx && std::str::from_utf8(&bytes).is_ok()) {
                return Ok((bytes, true));
            }
        }
    }
    let image = compile_uncached(arch)?;
    if let Some(f) = &file {
        let written = f
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .map_err(|e| Error::io("kernel cache", e))
            .and_then(|()| crate::image::write_atomic(f, &image));
        if let Err(e) = written {
            static WARNED: OnceLock<()> = OnceLock::new();
            if WARNED.set(()).is_ok() && std::env::var_os("SCORECAM_CUDA_VERBOSE").is_some() {
                eprintln!("notice: compiled kernels are not cached: {e}");
            }
        }
    }
    Ok((image, false))
}

/// One compile for `arch`, no caches.
fn compile_uncached(arch: &str) -> Result<Vec<u8>> {
    let (kind, number) = parse_arch(arch)?;
    Ok(match kind {
        ArchKind::Sm => match compile_program(arch, true)? {
            Some(cubin) => cubin,
            // No CUBIN from this NVRTC for sm_XY: PTX for the same virtual arch.
            None => {
                let virt = format!("compute_{number}");
                compile_program(&virt, false)?.ok_or_else(|| {
                    Error::CudaUnavailable(format!(
                        "NVRTC produced neither CUBIN nor PTX for {arch}"
                    ))
                })?
            }
        },
        ArchKind::Compute => compile_program(arch, false)?
            .ok_or_else(|| Error::CudaUnavailable(format!("NVRTC produced no PTX for {arch}")))?,
    })
}

/// The image for a device of compute capability `major.minor`: its own `sm_XY` when this NVRTC
/// knows it; else PTX for the newest virtual arch below it that NVRTC knows (the driver JITs
/// PTX forward to newer GPUs). Returns (arch compiled, image).
fn image_for_device(major: i32, minor: i32) -> Result<(String, Vec<u8>)> {
    let number = major * 10 + minor;
    let archs = supported_archs();
    if archs.is_empty() || archs.contains(&number) {
        let arch = format!("sm_{number}");
        return compile_for_arch(&arch).map(|img| (arch, img));
    }
    let Some(&best) = archs.iter().filter(|&&a| a < number).max() else {
        return Err(Error::CudaUnavailable(format!(
            "NVRTC {} supports none of the architectures up to sm_{number} (it knows {archs:?})",
            nvrtc_version()
                .map(|(a, b)| format!("{a}.{b}"))
                .unwrap_or_default()
        )));
    };
    let arch = format!("compute_{best}");
    compile_for_arch(&arch).map(|img| (arch, img))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ArchKind {
    Sm,
    Compute,
}

/// `sm_90`, `sm_90a`, `compute_86` → (kind, "90" / "90a" / "86").
fn parse_arch(arch: &str) -> Result<(ArchKind, &str)> {
    let (kind, rest) = if let Some(r) = arch.strip_prefix("sm_") {
        (ArchKind::Sm, r)
    } else if let Some(r) = arch.strip_prefix("compute_") {
        (ArchKind::Compute, r)
    } else {
        return Err(Error::Invalid(format!(
            "arch `{arch}`: expected sm_XY or compute_XY"
        )));
    };
    let digits = rest.trim_end_matches(|c: char| c.is_ascii_lowercase());
    let suffix = &rest[digits.len()..];
    if digits.len() < 2 || !digits.bytes().all(|b| b.is_ascii_digit()) || suffix.len() > 1 {
        return Err(Error::Invalid(format!(
            "arch `{arch}`: expected sm_XY or compute_XY"
        )));
    }
    Ok((kind, rest))
}

/// Destroys the NVRTC program on every path.
struct Program(nvrtc_sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        let _ = unsafe { nvrtc_result::destroy_program(self.0) };
    }
}

/// One NVRTC compile of all kernels for `arch`. `Ok(None)` when `cubin` was asked but NVRTC
/// produced none (e.g. a virtual arch). Returns PTX without its trailing NUL.
fn compile_program(arch: &str, cubin: bool) -> Result<Option<Vec<u8>>> {
    let source = assemble_source(sources()).map_err(Error::CudaUnavailable)?;
    let src = CString::new(source)
        .map_err(|_| Error::CudaUnavailable("kernel sources contain a NUL byte".into()))?;
    let prog = Program(
        nvrtc_result::create_program(&src, Some(c"scorecam_kernels.cu"))
            .map_err(|e| Error::CudaUnavailable(format!("nvrtcCreateProgram: {e}")))?,
    );
    let mut options: Vec<String> = NVRTC_OPTIONS.iter().map(|s| s.to_string()).collect();
    options.push(format!("--gpu-architecture={arch}"));
    for dir in include_dirs() {
        options.push(format!("--include-path={}", dir.display()));
    }
    if let Err(e) = unsafe { nvrtc_result::compile_program(prog.0, &options) } {
        let log = program_log(&prog);
        return Err(Error::CudaUnavailable(format!(
            "NVRTC {} could not compile the kernels for {arch} ({e}); options {options:?}:\n{log}",
            nvrtc_version()
                .map(|(a, b)| format!("{a}.{b}"))
                .unwrap_or_default()
        )));
    }
    if cubin {
        let mut size = 0usize;
        let r = unsafe { nvrtc_sys::nvrtcGetCUBINSize(prog.0, &mut size) };
        if r != nvrtc_sys::nvrtcResult::NVRTC_SUCCESS || size == 0 {
            return Ok(None);
        }
        let mut buf = vec![0u8; size];
        let r = unsafe { nvrtc_sys::nvrtcGetCUBIN(prog.0, buf.as_mut_ptr().cast()) };
        if r != nvrtc_sys::nvrtcResult::NVRTC_SUCCESS {
            return Ok(None);
        }
        return Ok(Some(buf));
    }
    let ptx = unsafe { nvrtc_result::get_ptx(prog.0) }
        .map_err(|e| Error::CudaUnavailable(format!("nvrtcGetPTX for {arch}: {e}")))?;
    let mut bytes: Vec<u8> = ptx.into_iter().map(|c| c as u8).collect();
    while bytes.last() == Some(&0) {
        bytes.pop();
    }
    Ok((!bytes.is_empty()).then_some(bytes))
}

fn program_log(prog: &Program) -> String {
    match unsafe { nvrtc_result::get_program_log(prog.0) } {
        Ok(raw) => {
            let bytes: Vec<u8> = raw.into_iter().map(|c| c as u8).collect();
            match CStr::from_bytes_until_nul(&bytes) {
                Ok(s) => s.to_string_lossy().into_owned(),
                Err(_) => String::from_utf8_lossy(&bytes).into_owned(),
            }
        }
        Err(e) => format!("(no log: {e})"),
    }
}

// ---------------------------------------------------------------------------------------------
// Host-side helpers: source assembly and include-path discovery (unit-tested below).

/// One translation unit from the embedded files: every `.cu` in order, each `#include "X"` of an
/// embedded file replaced by that file's text the first time (include-once) and by nothing after,
/// with `#line` directives so NVRTC's messages name the original file and line. Angle-bracket
/// includes are left to NVRTC. An `#include "X"` of a file that is not embedded is an error.
pub fn assemble_source(files: &[(&str, &str)]) -> std::result::Result<String, String> {
    fn emit<'a>(
        name: &'a str,
        text: &'a str,
        files: &[(&'a str, &'a str)],
        done: &mut Vec<&'a str>,
        out: &mut String,
    ) -> std::result::Result<(), String> {
        // Marked done before its body: a file including itself (directly or not) is skipped.
        done.push(name);
        out.push_str(&format!("#line 1 \"{name}\"\n"));
        for (i, line) in text.lines().enumerate() {
            if let Some(inc) = quoted_include(line) {
                let Some(&(inc_name, inc_text)) = files.iter().find(|(n, _)| *n == inc) else {
                    return Err(format!(
                        "kernels/{name}:{}: #include \"{inc}\" is not an embedded kernels/ file",
                        i + 1
                    ));
                };
                if !done.contains(&inc_name) {
                    emit(inc_name, inc_text, files, done, out)?;
                }
                out.push_str(&format!("#line {} \"{name}\"\n", i + 2));
                continue;
            }
            out.push_str(line);
            out.push('\n');
        }
        Ok(())
    }

    let mut out = String::new();
    let mut done = Vec::new();
    let mut units = 0;
    for &(name, text) in files {
        if !name.ends_with(".cu") {
            continue;
        }
        units += 1;
        emit(name, text, files, &mut done, &mut out)?;
    }
    if units == 0 {
        return Err("no .cu kernel sources embedded".into());
    }
    Ok(out)
}

/// `#include "name"` (spaces allowed around `#` and `include`) → `name`.
fn quoted_include(line: &str) -> Option<&str> {
    let rest = line.trim_start().strip_prefix('#')?.trim_start();
    let rest = rest.strip_prefix("include")?.trim_start();
    let rest = rest.strip_prefix('"')?;
    let end = rest.find('"')?;
    Some(&rest[..end])
}

/// Include directories passed to NVRTC, in order, those that exist.
fn include_dirs() -> Vec<PathBuf> {
    include_dirs_from(&|k| std::env::var_os(k), &|p| p.exists())
}

/// Candidates, in order: `$SCORECAM_CUDA_INCLUDE` (a path list), `$CUDA_HOME/include`,
/// `$CUDA_PATH/include`, `/usr/local/cuda/include`, then for each `LD_LIBRARY_PATH` entry: the
/// pip-wheel layout `.../nvidia/cuXX/lib` → `.../nvidia/cuXX/include`, and any other `.../lib`
/// or `.../lib64` whose sibling `include` holds `cuda_fp16.h` (a toolkit next to its libnvrtc).
/// Only existing directories are kept, each once.
fn include_dirs_from(
    env: &dyn Fn(&str) -> Option<OsString>,
    exists: &dyn Fn(&Path) -> bool,
) -> Vec<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(v) = env("SCORECAM_CUDA_INCLUDE") {
        candidates.extend(std::env::split_paths(&v).filter(|p| !p.as_os_str().is_empty()));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(v) = env(var).filter(|v| !v.is_empty()) {
            candidates.push(PathBuf::from(v).join("include"));
        }
    }
    candidates.push(PathBuf::from("/usr/local/cuda/include"));
    if let Some(v) = env("LD_LIBRARY_PATH") {
        for lib in std::env::split_paths(&v) {
            let last = lib.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if last != "lib" && last != "lib64" {
                continue;
            }
            let Some(parent) = lib.parent() else { continue };
            let include = parent.join("include");
            let is_wheel = parent
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("cu"))
                && parent
                    .parent()
                    .and_then(|p| p.file_name())
                    .is_some_and(|n| n == "nvidia");
            if is_wheel || exists(&include.join("cuda_fp16.h")) {
                candidates.push(include);
            }
        }
    }
    let mut out: Vec<PathBuf> = Vec::new();
    for c in candidates {
        if !out.contains(&c) && exists(&c) {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assembles_every_unit_with_common_inlined_once() {
        let src = assemble_source(sources()).unwrap();
        let units: Vec<&str> = sources()
            .iter()
            .map(|(n, _)| *n)
            .filter(|n| n.ends_with(".cu"))
            .collect();
        assert!(units.len() >= 6, "{units:?}");
        for unit in &units {
            assert!(
                src.contains(&format!("#line 1 \"{unit}\"\n")),
                "{unit} missing"
            );
        }
        assert_eq!(src.matches("#line 1 \"common.cuh\"").count(), 1);
        assert_eq!(src.matches("#define SCORECAM_COMMON_CUH").count(), 1);
        assert!(
            !src.lines().any(|l| quoted_include(l).is_some()),
            "unresolved #include"
        );
        // common.cuh comes before its first user.
        let common = src.find("#line 1 \"common.cuh\"").unwrap();
        let first_unit = units
            .iter()
            .map(|u| src.find(&format!("#line 1 \"{u}\"")).unwrap());
        assert!(first_unit.clone().min().unwrap() < common);
        assert!(src.find("SCORECAM_COMMON_CUH").unwrap() > common);
    }

    #[test]
    fn assembly_keeps_line_numbers_and_rejects_unknown_includes() {
        let files = [
            ("a.cuh", "int a;\n"),
            ("x.cu", "// one\n#include \"a.cuh\"\nint x;\n"),
            (
                "y.cu",
                "  #  include \"a.cuh\"\nint y;\n#include <cuda_fp16.h>\n",
            ),
        ];
        let src = assemble_source(&files).unwrap();
        assert_eq!(
            src,
            "#line 1 \"x.cu\"\n// one\n#line 1 \"a.cuh\"\nint a;\n#line 3 \"x.cu\"\nint x;\n\
             #line 1 \"y.cu\"\n#line 2 \"y.cu\"\nint y;\n#include <cuda_fp16.h>\n"
        );
        let err = assemble_source(&[("z.cu", "#include \"nope.cuh\"\n")]).unwrap_err();
        assert!(err.contains("z.cu:1") && err.contains("nope.cuh"), "{err}");
        // Include-once: a self-including header is inlined once, without looping.
        let src = assemble_source(&[
            ("r.cuh", "#include \"r.cuh\"\nint r;\n"),
            ("z.cu", "#include \"r.cuh\"\n"),
        ])
        .unwrap();
        assert_eq!(src.matches("int r;").count(), 1);
        assert!(assemble_source(&[("a.cuh", "")]).is_err());
    }

    #[test]
    fn kernel_names_match_the_sources() {
        // Every `extern "C" __global__ void [__launch_bounds__(..)] NAME(` in the sources.
        const DECL: &str = "extern \"C\" __global__ void";
        let mut found = Vec::new();
        for (_, text) in sources() {
            let mut rest = *text;
            while let Some(i) = rest.find(DECL) {
                rest = rest[i + DECL.len()..].trim_start();
                if let Some(r) = rest.strip_prefix("__launch_bounds__") {
                    rest = r[r.find(')').unwrap() + 1..].trim_start();
                }
                let end = rest.find('(').unwrap();
                found.push(rest[..end].trim().to_string());
            }
        }
        let mut expected: Vec<String> = kernel_names().iter().map(|s| s.to_string()).collect();
        found.sort();
        expected.sort();
        assert_eq!(found, expected);
    }

    #[test]
    fn include_dirs_order_filter_and_dedup() {
        let env = |k: &str| -> Option<OsString> {
            match k {
                "SCORECAM_CUDA_INCLUDE" => Some("/x/inc:/missing:".into()),
                "CUDA_HOME" => Some("/opt/cuda".into()),
                "CUDA_PATH" => Some("/opt/cuda".into()),
                "LD_LIBRARY_PATH" => Some(
                    "/venv/site-packages/nvidia/cu13/lib:/usr/lib:/tk/lib64:/y/nvidia/cu13/lib:/z/lib"
                        .into(),
                ),
                _ => None,
            }
        };
        let existing = [
            "/x/inc",
            "/opt/cuda/include",
            "/usr/local/cuda/include",
            "/venv/site-packages/nvidia/cu13/include",
            "/usr/include",
            "/tk/include",
            "/tk/include/cuda_fp16.h",
            "/z/include",
        ];
        let exists = |p: &Path| existing.iter().any(|e| Path::new(e) == p);
        let dirs = include_dirs_from(&env, &exists);
        let dirs: Vec<&str> = dirs.iter().map(|p| p.to_str().unwrap()).collect();
        assert_eq!(
            dirs,
            [
                "/x/inc",
                "/opt/cuda/include",
                "/usr/local/cuda/include",
                "/venv/site-packages/nvidia/cu13/include",
                "/tk/include",
            ]
        );
        // Nothing set, nothing on disk: no include paths (the kernels need none).
        assert!(include_dirs_from(&|_| None, &|_| false).is_empty());
    }

    #[test]
    fn arch_parsing() {
        assert_eq!(parse_arch("sm_90").unwrap(), (ArchKind::Sm, "90"));
        assert_eq!(parse_arch("sm_90a").unwrap(), (ArchKind::Sm, "90a"));
        assert_eq!(parse_arch("compute_86").unwrap(), (ArchKind::Compute, "86"));
        assert_eq!(parse_arch("sm_120").unwrap(), (ArchKind::Sm, "120"));
        for bad in [
            "90", "sm_", "sm_9", "sm_x0", "gfx90a", "sm_90ab", "compute_",
        ] {
            assert!(matches!(parse_arch(bad), Err(Error::Invalid(_))), "{bad}");
        }
    }

    #[test]
    fn cubin_detection() {
        assert!(is_cubin(b"\x7fELF\x02\x01"));
        assert!(!is_cubin(
            b"//\n// Generated by NVIDIA NVVM Compiler\n.version 9.0"
        ));
    }

    #[test]
    fn argument_checks() {
        assert!(matches!(dim("op", "s", 0), Err(Error::Invalid(m)) if m.contains("s must be > 0")));
        assert_eq!(dim("op", "s", 224).unwrap(), 224);
        assert!(dim("op", "s", i32::MAX as usize + 1).is_err());
        assert!(cpad_arg("op", 2).is_err() && cpad_arg("op", 9).is_err());
        assert_eq!(cpad_arg("op", 3).unwrap(), 3);
        assert_eq!(cpad_arg("op", 8).unwrap(), 8);
        assert!(prod("op", &[usize::MAX, 2]).is_err());
        assert_eq!(prod("op", &[2, 3, 4]).unwrap(), 24);
        let e = need("masks", "out", 10, 11).unwrap_err().to_string();
        assert!(
            e.contains("masks") && e.contains("`out` has 10") && e.contains("need 11"),
            "{e}"
        );
        assert!(need("op", "x", 11, 11).is_ok());
    }

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
