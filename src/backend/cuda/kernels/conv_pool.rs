//! Launchers for kernels/conv_pool.cu.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use half::f16;

use super::{
    aligned16, invalid, need, nhwc_args, prod, ConvWgBuild, KernelArg, KernelLaunch, Kernels,
    LaunchLimits, CONV_CIN8_IN,
};
use crate::error::Result;

/// Input and output channels the kernels are written for.
pub const CONV_POOL_C: usize = 64;
/// Dynamic shared memory per block, bytes (the kernel's `CP_SMEM`): the filter, two 18×18-pixel
/// input halos, the staging rows of 64 pooled pixels, the bias.
pub const CONV_POOL_SMEM: usize = 36 * 4 * 32 * 16 + 2 * 18 * 18 * 128 + 64 * 36 * 4 + 64 * 4;
/// The same for the two-warpgroup build (`CP_SMEM_WG2`): one halo and staging rows per group.
pub const CONV_POOL_SMEM_WG2: usize =
    36 * 4 * 32 * 16 + 2 * 18 * 18 * 128 + 2 * 64 * 36 * 4 + 64 * 4;

/// The whole first block (`conv3x3_block1_pool_wg2`, `CB_SMEM`): the fused conv + pool's
/// two-group layout, plus both groups' 20×20-pixel input tiles, conv1_1's B fragments and bias.
pub const CONV_BLOCK1_SMEM: usize =
    CONV_POOL_SMEM_WG2 + 64 * 4 + 3 * 4 * 32 * 16 + 2 * 20 * 20 * 16;
/// Its kernel's `extern "C"` name.
pub const CONV_BLOCK1_KERNEL: &str = "conv3x3_block1_pool_wg2";

/// The builds of a conv fused with the 2×2 max-pool after it. For 64 → 64 channels
/// (`kernels/conv_pool.cu`), by `mma.sync` (sm_80+): 4 warps of 4 conv rows (more work per
/// shared-memory byte) or 8 warps of 2 (more warps to hide latency); and by Hopper's warpgroup
/// `wgmma` (sm_90a only, its A fragments loaded once for three taps): one warpgroup per block
/// (`Wg`), or two on tiles of their own sharing the filter (`Wg2`: one's pool, stores and halo
/// wait overlap the other's MMAs). For the deeper layers, the wgmma conv's pooled kernels
/// (`kernels/conv_wg.cu`, sm_90a, the layer's own build: `WgPoolN128`, `WgPoolN256`). Prepare
/// checks and times each the device runs for the layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ConvPoolVariant {
    W4,
    W8,
    Wg,
    Wg2,
    WgPoolN128,
    WgPoolN256,
    WgPoolN128Pair,
    WgPoolN256Pair,
    WgPoolM256N128,
    WgPoolM256N128Pair,
}

impl ConvPoolVariant {
    pub const ALL: [ConvPoolVariant; 10] = [
        ConvPoolVariant::W4,
        ConvPoolVariant::W8,
        ConvPoolVariant::Wg,
        ConvPoolVariant::Wg2,
        ConvPoolVariant::WgPoolN128,
        ConvPoolVariant::WgPoolN256,
        ConvPoolVariant::WgPoolN128Pair,
        ConvPoolVariant::WgPoolN256Pair,
        ConvPoolVariant::WgPoolM256N128,
        ConvPoolVariant::WgPoolM256N128Pair,
    ];

    /// Its kernel's `extern "C"` name.
    pub fn kernel(self) -> &'static str {
        match self {
            ConvPoolVariant::W4 => "conv3x3_c64_pool_w4",
            ConvPoolVariant::W8 => "conv3x3_c64_pool_w8",
            ConvPoolVariant::Wg => "conv3x3_c64_pool_wg",
            ConvPoolVariant::Wg2 => "conv3x3_c64_pool_wg2",
            ConvPoolVariant::WgPoolN128 => ConvWgBuild::N128.pool_kernel(),
            ConvPoolVariant::WgPoolN256 => ConvWgBuild::N256.pool_kernel(),
            ConvPoolVariant::WgPoolN128Pair => ConvWgBuild::N128Pair.pool_kernel(),
            ConvPoolVariant::WgPoolN256Pair => ConvWgBuild::N256Pair.pool_kernel(),
            ConvPoolVariant::WgPoolM256N128 => ConvWgBuild::M256N128.pool_kernel(),
            ConvPoolVariant::WgPoolM256N128Pair => ConvWgBuild::M256N128Pair.pool_kernel(),
        }
    }

    /// The wgmma conv's build of a pooled kernel of `kernels/conv_wg.cu` (None: a 64 → 64 one).
    pub fn wg_build(self) -> Option<ConvWgBuild> {
        match self {
            ConvPoolVariant::WgPoolN128 => Some(ConvWgBuild::N128),
            ConvPoolVariant::WgPoolN256 => Some(ConvWgBuild::N256),
            ConvPoolVariant::WgPoolN128Pair => Some(ConvWgBuild::N128Pair),
            ConvPoolVariant::WgPoolN256Pair => Some(ConvWgBuild::N256Pair),
            ConvPoolVariant::WgPoolM256N128 => Some(ConvWgBuild::M256N128),
            ConvPoolVariant::WgPoolM256N128Pair => Some(ConvWgBuild::M256N128Pair),
            _ => None,
        }
    }

    /// The pooled build of the wgmma conv's `build`.
    pub fn of_wg(build: ConvWgBuild) -> ConvPoolVariant {
        match build {
            ConvWgBuild::N128 => ConvPoolVariant::WgPoolN128,
            ConvWgBuild::N256 => ConvPoolVariant::WgPoolN256,
            ConvWgBuild::N128Pair => ConvPoolVariant::WgPoolN128Pair,
            ConvWgBuild::N256Pair => ConvPoolVariant::WgPoolN256Pair,
            ConvWgBuild::M256N128 => ConvPoolVariant::WgPoolM256N128,
            ConvWgBuild::M256N128Pair => ConvPoolVariant::WgPoolM256N128Pair,
        }
    }

    /// Whether it needs `wgmma` (a module built for sm_90a).
    pub fn wgmma(self) -> bool {
        !matches!(self, ConvPoolVariant::W4 | ConvPoolVariant::W8)
    }

    /// Its dynamic shared memory per block, bytes.
    pub fn smem(self) -> usize {
        match (self, self.wg_build()) {
            (_, Some(build)) => build.smem(),
            (ConvPoolVariant::Wg2, _) => CONV_POOL_SMEM_WG2,
            _ => CONV_POOL_SMEM,
        }
    }

    fn warps(self) -> u32 {
        match self {
            ConvPoolVariant::W4 | ConvPoolVariant::Wg => 4,
            _ => 8,
        }
    }
}

/// `conv3x3_c64_pool_*`: `y` `[n, h/2, w/2, 64]` = MaxPool2d(2, 2)(ReLU(conv 3×3, stride 1,
/// pad 1 of `x` `[n, h, w, 64]` with `filter` KRSC `[64, 3, 3, 64]` + `bias` `[64]` f32)), FP16
/// NHWC. Persistent blocks, one per SM, over tiles of 8×8 pooled pixels. Buffers: `[x, filter,
/// bias, y]`, lengths in elements; `x` must be 16-byte aligned (checked where its address is
/// known, [`Kernels::conv3x3_c64_pool`]).
pub fn conv3x3_c64_pool_launch(
    variant: ConvPoolVariant,
    [x_len, filter_len, bias_len, y_len]: [usize; 4],
    [n, h, w]: [usize; 3],
    limits: &LaunchLimits,
) -> Result<KernelLaunch> {
    let op = variant.kernel();
    if variant.wg_build().is_some() {
        return Err(invalid(
            op,
            "a wgmma conv's pooled build, not conv3x3_c64_pool's: see conv3x3_wg_pool_launch"
                .into(),
        ));
    }
    pooled_conv_fits(op, (variant.smem(), variant.wgmma()), [h, w], limits)?;
    let c = CONV_POOL_C;
    let [n_i, h_i, w_i, _] = nhwc_args(op, n, h, w, c)?;
    need(op, "x", x_len, prod(op, &[n, h, w, c])?)?;
    need(op, "filter", filter_len, c * 9 * c)?;
    need(op, "bias", bias_len, c)?;
    need(op, "y", y_len, prod(op, &[n, h / 2, w / 2, c])?)?;
    let tiles = prod(op, &[n, (h / 2).div_ceil(8), (w / 2).div_ceil(8)])?;
    // Persistent: one block per SM at most (a block of two groups takes two tiles at a time).
    let per_block = if variant == ConvPoolVariant::Wg2 {
        2
    } else {
        1
    };
    let grid = tiles
        .div_ceil(per_block)
        .clamp(1, limits.sm_count.max(1) as usize) as u32;
    use KernelArg::*;
    Ok(KernelLaunch {
        kernel: op,
        grid,
        block: 32 * variant.warps(),
        shared_mem_bytes: variant.smem() as u32,
        args: vec![
            Read(0),
            Read(1),
            Read(2),
            I32(n_i),
            I32(h_i),
            I32(w_i),
            Write(3),
        ],
    })
}

/// `conv3x3_block1_pool_wg2`: a VGG's first block as one kernel, `y` `[n, h/2, w/2, 64]` =
/// MaxPool2d(2, 2)(ReLU(conv2(ReLU(conv1(`x`))))), FP16 NHWC: `x` `[n, h, w, 8]` (3 real
/// channels, channel 3 zero), `filter1` KRSC `[64, 3, 3, 8]` of which channels 0–3 are read
/// (the caller runs it only for a first conv of at most 4 real channels), `filter2` KRSC
/// `[64, 3, 3, 64]`, biases `[64]` f32; conv1's output is rounded to FP16 after its ReLU, as the
/// two convs apart store it. sm_90a only (wgmma). Persistent blocks of two warpgroups, one per
/// SM, over tiles of 8×8 pooled pixels. Buffers: `[x, filter1, bias1, filter2, bias2, y]`,
/// lengths in elements; `x` must be 16-byte aligned (checked where its address is known,
/// [`Kernels::conv3x3_block1_pool`]).
pub fn conv3x3_block1_pool_launch(
    [x_len, f1_len, b1_len, f2_len, b2_len, y_len]: [usize; 6],
    [n, h, w]: [usize; 3],
    limits: &LaunchLimits,
) -> Result<KernelLaunch> {
    let op = CONV_BLOCK1_KERNEL;
    pooled_conv_fits(op, (CONV_BLOCK1_SMEM, true), [h, w], limits)?;
    let (cin, c) = (CONV_CIN8_IN, CONV_POOL_C);
    let [n_i, h_i, w_i, _] = nhwc_args(op, n, h, w, c)?;
    need(op, "x", x_len, prod(op, &[n, h, w, cin])?)?;
    need(op, "filter1", f1_len, c * 9 * cin)?;
    need(op, "bias1", b1_len, c)?;
    need(op, "filter2", f2_len, c * 9 * c)?;
    need(op, "bias2", b2_len, c)?;
    need(op, "y", y_len, prod(op, &[n, h / 2, w / 2, c])?)?;
    // Persistent, two tiles at a time per block (one per group).
    let tiles = prod(op, &[n, (h / 2).div_ceil(8), (w / 2).div_ceil(8)])?;
    let grid = tiles.div_ceil(2).clamp(1, limits.sm_count.max(1) as usize) as u32;
    use KernelArg::*;
    Ok(KernelLaunch {
        kernel: op,
        grid,
        block: 256,
        shared_mem_bytes: CONV_BLOCK1_SMEM as u32,
        args: vec![
            Read(0),
            Read(1),
            Read(2),
            Read(3),
            Read(4),
            I32(n_i),
            I32(h_i),
            I32(w_i),
            Write(5),
        ],
    })
}

/// The fused kernels' device and shape checks: the `smem` bytes of shared memory per block, the
/// sm_90a module where it needs `wgmma`, a 2×2 pooling window in an `h × w` input.
fn pooled_conv_fits(
    op: &str,
    (smem, wgmma): (usize, bool),
    [h, w]: [usize; 2],
    limits: &LaunchLimits,
) -> Result<()> {
    if smem > limits.conv_smem {
        return Err(invalid(
            op,
            format!("the device cannot give a block {smem} bytes of shared memory"),
        ));
    }
    if wgmma && !limits.wgmma {
        return Err(invalid(
            op,
            "wgmma needs the kernels built for sm_90a (a Hopper GPU)".into(),
        ));
    }
    if h < 2 || w < 2 {
        return Err(invalid(
            op,
            format!("a {h}×{w} input has no 2×2 pooling window"),
        ));
    }
    Ok(())
}

impl Kernels {
    /// Whether the kernels were built for sm_90a, where the `wgmma` builds run.
    pub fn has_wgmma(&self) -> bool {
        self.limits.wgmma
    }

    /// The builds of the 64 → 64 fused conv + pool this device runs, in
    /// [`ConvPoolVariant::ALL`]'s order: its `mma` (sm_80+), the shared memory it gave each,
    /// `wgmma` for those that need it.
    pub fn conv_pool_variants(&self) -> Vec<ConvPoolVariant> {
        ConvPoolVariant::ALL
            .into_iter()
            .filter(|v| v.wg_build().is_none())
            .filter(|v| self.has_mma() && v.smem() <= self.limits.conv_smem)
            .filter(|v| !v.wgmma() || self.has_wgmma())
            .collect()
    }

    /// [`conv3x3_c64_pool_launch`], on at most `max_blocks` blocks when given (the device check
    /// makes each block go round several tiles); an error on a GPU older than sm_80, one without
    /// the shared memory, or an `x` not 16-byte aligned (the kernel copies it in 16-byte chunks).
    ///
    /// # Safety
    /// `y` is written through a read pointer (as the other conv engines' outputs are): nothing
    /// else may use it until the launch is done, and it must not overlap `x`.
    pub unsafe fn conv3x3_c64_pool<X: DevicePtr<f16>, Y: DevicePtr<f16>>(
        &self,
        stream: &Arc<CudaStream>,
        variant: ConvPoolVariant,
        x: &X,
        filter: &CudaSlice<f16>,
        bias: &CudaSlice<f32>,
        nhw: [usize; 3],
        y: &Y,
        max_blocks: Option<u32>,
    ) -> Result<()> {
        let op = variant.kernel();
        self.need_mma(op)?;
        let lens = [x.len(), filter.len(), bias.len(), y.len()];
        let launch = conv3x3_c64_pool_launch(variant, lens, nhw, &self.limits_on(max_blocks))?;
        let (x_p, _x) = x.device_ptr(stream);
        aligned16(op, &[("`x`", x_p)])?;
        let (f_p, _f) = filter.device_ptr(stream);
        let (b_p, _b) = bias.device_ptr(stream);
        let (y_p, _y) = y.device_ptr(stream);
        self.run(stream, &launch, &[x_p, f_p, b_p, y_p])
    }

    /// Whether this device runs [`conv3x3_block1_pool_launch`]'s kernel (sm_90a, its shared
    /// memory).
    pub fn runs_block1(&self) -> bool {
        self.has_wgmma() && CONV_BLOCK1_SMEM <= self.limits.conv_smem
    }

    /// [`conv3x3_block1_pool_launch`], on at most `max_blocks` blocks when given; an error where
    /// the device does not run it or `x` is not 16-byte aligned. `(filter, bias)` per conv.
    ///
    /// # Safety
    /// As [`Kernels::conv3x3_c64_pool`].
    pub unsafe fn conv3x3_block1_pool<X: DevicePtr<f16>, Y: DevicePtr<f16>>(
        &self,
        stream: &Arc<CudaStream>,
        x: &X,
        [(f1, b1), (f2, b2)]: [(&CudaSlice<f16>, &CudaSlice<f32>); 2],
        nhw: [usize; 3],
        y: &Y,
        max_blocks: Option<u32>,
    ) -> Result<()> {
        let op = CONV_BLOCK1_KERNEL;
        let lens = [x.len(), f1.len(), b1.len(), f2.len(), b2.len(), y.len()];
        let launch = conv3x3_block1_pool_launch(lens, nhw, &self.limits_on(max_blocks))?;
        let (x_p, _x) = x.device_ptr(stream);
        aligned16(op, &[("`x`", x_p)])?;
        let (f1_p, _f1) = f1.device_ptr(stream);
        let (b1_p, _b1) = b1.device_ptr(stream);
        let (f2_p, _f2) = f2.device_ptr(stream);
        let (b2_p, _b2) = b2.device_ptr(stream);
        let (y_p, _y) = y.device_ptr(stream);
        self.run(stream, &launch, &[x_p, f1_p, b1_p, f2_p, b2_p, y_p])
    }
}
