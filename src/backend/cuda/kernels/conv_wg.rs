//! Launchers for kernels/conv_wg.cu: a 3×3 conv + bias (+ ReLU) by Hopper's wgmma.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use half::f16;

use super::{
    aligned16, invalid, need, nhwc_args, prod, KernelArg, KernelLaunch, Kernels, LaunchLimits,
};
use crate::error::Result;

/// Bytes of input channels per pixel and pipeline stage: `cin` × the element's bytes must be a
/// multiple (32 FP16 or 64 E4M3 channels).
pub const CONV_WG_STAGE_BYTES: usize = 64;
/// The builds: work items of 128 pixels × N = 128 or 256 output channels (a multiple of N is
/// needed), or (`M256N128`, FP16 only: the tall build) 256 pixels × 128 channels, half the
/// filter bytes per operation of 128 × 256 for twice the input bytes; one stage per step or
/// (`…Pair`) two: the wait, the proxy fence and the block barrier once per 4 MMAs instead of 2,
/// the copies 2 stages less far ahead (FP16: input channels a multiple of 64; E4M3: each
/// slice's 9 stages as 4 pairs and one). All are timed; the layer's one packed filter (that of
/// [`Self::for_layer`]'s build) serves them all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ConvWgBuild {
    N128,
    N256,
    N128Pair,
    N256Pair,
    M256N128,
    M256N128Pair,
}

impl ConvWgBuild {
    pub const ALL: [ConvWgBuild; 6] = [
        ConvWgBuild::N128,
        ConvWgBuild::N256,
        ConvWgBuild::N128Pair,
        ConvWgBuild::N256Pair,
        ConvWgBuild::M256N128,
        ConvWgBuild::M256N128Pair,
    ];

    /// Whether it takes stages two at a time.
    pub fn pair(self) -> bool {
        matches!(
            self,
            ConvWgBuild::N128Pair | ConvWgBuild::N256Pair | ConvWgBuild::M256N128Pair
        )
    }

    /// Whether it is a tall build (items of 256 pixels).
    pub fn tall(self) -> bool {
        matches!(self, ConvWgBuild::M256N128 | ConvWgBuild::M256N128Pair)
    }

    /// Output pixels per work item.
    pub fn pixels(self) -> usize {
        if self.tall() {
            256
        } else {
            128
        }
    }

    /// Whether it reads a filter of a `[cin, cout]` layer packed for `packed_for` (blocks of that
    /// build's N): its own N; for the tall build the layer's own packing, that of
    /// [`Self::for_layer`]'s build (its launcher gives the kernel that N; it reads blocks of 256
    /// by halves).
    pub fn reads_packing(self, packed_for: ConvWgBuild, [cin, cout]: [usize; 2]) -> bool {
        match self.tall() {
            true => ConvWgBuild::for_layer(cin, cout, false) == Some(packed_for),
            false => packed_for.n() == self.n(),
        }
    }

    /// The FP16 builds the tuning times for a layer of `cin` input channels that `self` (a build
    /// of [`Self::for_layer`]) fits: [`Self::with_pair`]'s, then the tall build and its pair
    /// (where `cin` allows it) on the same packed filter.
    pub fn candidates(self, cin: usize) -> Vec<ConvWgBuild> {
        let mut all = self.with_pair(cin);
        if !self.tall() {
            all.extend(ConvWgBuild::M256N128.with_pair(cin));
        }
        all
    }

    /// The builds that may run a layer of `cin` FP16 input channels that `self` (a build of
    /// [`Self::for_layer`]) fits: itself, and its paired twin where each item's stages are even
    /// in number (`cin` a multiple of 64).
    pub fn with_pair(self, cin: usize) -> Vec<ConvWgBuild> {
        let twin = match self {
            ConvWgBuild::N128 => ConvWgBuild::N128Pair,
            ConvWgBuild::N256 => ConvWgBuild::N256Pair,
            ConvWgBuild::M256N128 => ConvWgBuild::M256N128Pair,
            paired => paired,
        };
        let even = (2 * cin).is_multiple_of(2 * CONV_WG_STAGE_BYTES);
        if twin != self && even {
            vec![self, twin]
        } else {
            vec![self]
        }
    }

    /// The E4M3-input kernel's builds, N = 128 only (its partial sums are promoted to f32
    /// registers of their own: at N = 256 that would be 128 more); one packed filter serves
    /// both.
    pub const E4M3: [ConvWgBuild; 2] = [ConvWgBuild::N128, ConvWgBuild::N128Pair];

    /// Its E4M3-input kernel's `extern "C"` name, with the 2×2 max-pool after the conv when
    /// `pool` (None: no such build).
    pub fn e4m3_kernel(self, pool: bool) -> Option<&'static str> {
        match (self, pool) {
            (ConvWgBuild::N128, false) => Some("conv3x3_wg_e4m3_n128"),
            (ConvWgBuild::N128Pair, false) => Some("conv3x3_wg_e4m3_n128_pair"),
            (ConvWgBuild::N128, true) => Some("conv3x3_wg_e4m3_pool_n128"),
            (ConvWgBuild::N128Pair, true) => Some("conv3x3_wg_e4m3_pool_n128_pair"),
            _ => None,
        }
    }

    /// Its kernel's `extern "C"` name (FP16 input).
    pub fn kernel(self) -> &'static str {
        match self {
            ConvWgBuild::N128 => "conv3x3_wg_n128",
            ConvWgBuild::N256 => "conv3x3_wg_n256",
            ConvWgBuild::N128Pair => "conv3x3_wg_n128_pair",
            ConvWgBuild::N256Pair => "conv3x3_wg_n256_pair",
            ConvWgBuild::M256N128 => "conv3x3_wg_m256n128",
            ConvWgBuild::M256N128Pair => "conv3x3_wg_m256n128_pair",
        }
    }

    /// Its kernel with the 2×2 max-pool after the conv (FP16).
    pub fn pool_kernel(self) -> &'static str {
        match self {
            ConvWgBuild::N128 => "conv3x3_wg_pool_n128",
            ConvWgBuild::N256 => "conv3x3_wg_pool_n256",
            ConvWgBuild::N128Pair => "conv3x3_wg_pool_n128_pair",
            ConvWgBuild::N256Pair => "conv3x3_wg_pool_n256_pair",
            ConvWgBuild::M256N128 => "conv3x3_wg_pool_m256n128",
            ConvWgBuild::M256N128Pair => "conv3x3_wg_pool_m256n128_pair",
        }
    }

    /// Every conv kernel of the builds with its dynamic shared memory (the FP16 pooled ones
    /// are [`ConvPoolVariant`]'s; the E4M3 ones, pooled or not, here).
    pub fn kernels() -> impl Iterator<Item = (&'static str, usize)> {
        let e4m3 = Self::E4M3.into_iter().flat_map(|b| [(b, false), (b, true)]);
        Self::ALL
            .into_iter()
            .map(|b| (b.kernel(), b.smem()))
            .chain(e4m3.filter_map(|(b, pool)| Some((b.e4m3_kernel(pool)?, b.smem()))))
    }

    /// Output channels per work item.
    pub fn n(self) -> usize {
        match self {
            ConvWgBuild::N256 | ConvWgBuild::N256Pair => 256,
            _ => 128,
        }
    }

    /// Its dynamic shared memory per block, bytes (the kernel's `CwShape::SMEM`): a ring of 12
    /// stages (128 × 128) or 8 (128 × 256, 256 × 128), each the A operand (4 planes of the
    /// item's pixels × 16 bytes, + 32 bytes of padding each) and the filter block (N × 64 bytes).
    pub fn smem(self) -> usize {
        let (m, n) = (self.pixels(), self.n());
        let stages = if m * n >= 128 * 256 { 8 } else { 12 };
        stages * (4 * (16 * m + 32) + 64 * n)
    }

    /// The build for a layer (input `e4m3` or FP16): for FP16 the wider N where `cout` is a
    /// multiple of it (each input stage then feeds twice the MMAs), else N = 128; for E4M3 the
    /// first of [`Self::E4M3`] (its pair fits wherever it does). None when the layer's shape
    /// does not fit the kernel.
    pub fn for_layer(cin: usize, cout: usize, e4m3: bool) -> Option<ConvWgBuild> {
        if cin == 0 || !(cin * elem_bytes(e4m3)).is_multiple_of(CONV_WG_STAGE_BYTES) {
            return None;
        }
        let builds: &[ConvWgBuild] = match e4m3 {
            true => &Self::E4M3[..1],
            false => &[ConvWgBuild::N256, ConvWgBuild::N128],
        };
        builds
            .iter()
            .copied()
            .find(|b| cout > 0 && cout.is_multiple_of(b.n()))
    }
}

/// Bytes of one input channel: FP16 or E4M3.
fn elem_bytes(e4m3: bool) -> usize {
    if e4m3 {
        1
    } else {
        2
    }
}

/// The filter as the kernel reads it: KRSC `filter` `[cout, 3, 3, cin]` (FP16, or E4M3 codes
/// with `e4m3`) rearranged into blocks of one stage, `[cout / N][stages: slice s of 64 bytes of
/// channels, then tap][4 chunks of 16 bytes][N output channels][16 bytes]`, so that a stage's B
/// operand is one contiguous copy in the kernel's shared-memory layout. None when the lengths or
/// shapes do not fit `build`. (Generic over the element so that tests can follow indices
/// through it; `e4m3` says how many bytes the kernel's elements have.)
pub fn conv3x3_wg_pack_filter<T: Copy>(
    build: ConvWgBuild,
    filter: &[T],
    [cin, cout]: [usize; 2],
    e4m3: bool,
) -> Option<Vec<T>> {
    let own = ConvWgBuild::for_layer(cin, cout, e4m3)?;
    // The tall build reads the layer's own packing.
    let bn = if build.tall() { own.n() } else { build.n() };
    if cout % bn != 0 {
        return None;
    }
    if (e4m3 && build.e4m3_kernel(false).is_none()) || filter.len() != cout * 9 * cin {
        return None;
    }
    let (per_chunk, per_slice) = (
        16 / elem_bytes(e4m3),
        CONV_WG_STAGE_BYTES / elem_bytes(e4m3),
    );
    let stages = 9 * cin / per_slice;
    let mut packed = Vec::with_capacity(filter.len());
    for nt in 0..cout / bn {
        for stage in 0..stages {
            let (slice, tap) = (stage / 9, stage % 9);
            for chunk in 0..4 {
                let c0 = slice * per_slice + per_chunk * chunk;
                for o in nt * bn..(nt + 1) * bn {
                    let at = (o * 9 + tap) * cin + c0;
                    packed.extend_from_slice(&filter[at..at + per_chunk]);
                }
            }
        }
    }
    Some(packed)
}

/// `conv3x3_wg_n*`: `y` `[n, h, w, cout]` = conv 3×3, stride 1, pad 1 of `x` `[n, h, w, cin]` with
/// the filter packed by [`conv3x3_wg_pack_filter`] + `bias` `[cout]` f32, ReLU when `relu`; FP16
/// NHWC. Persistent blocks of two warpgroups, one per SM, over items of 128 pixels × N channels.
/// Buffers `[x, packed filter, bias, y]`, lengths in elements; `x` and the packed filter must be
/// 16-byte aligned (checked where the addresses are known, [`Kernels::conv3x3_wg`]).
pub fn conv3x3_wg_launch(
    build: ConvWgBuild,
    [x_len, wpack_len, bias_len, y_len]: [usize; 4],
    nhw: [usize; 3],
    chans: [usize; 2],
    relu: bool,
    limits: &LaunchLimits,
) -> Result<KernelLaunch> {
    let lens = [x_len, wpack_len, bias_len, y_len];
    wg_launch(build, lens, Kind::Half, nhw, chans, relu, limits)
}

/// `conv3x3_wg_e4m3_n128` (`build` one of [`ConvWgBuild::E4M3`]): the same on E4M3 `x` and the
/// filter packed for it (bytes), the sums promoted to f32 after every 64 input channels, times
/// `descale[0]` before the bias; out FP16, or with `e4m3_out` E4M3 codes of the output times
/// `mult[0]` (the next FP8 conv's multiplier) in `y`'s first `len` bytes. With `pool`
/// (`conv3x3_wg_e4m3_pool_n128`, ReLU), `y` is the 2×2 max-pool of that, `[n, h/2, w/2, cout]`.
/// Buffers `[x, packed filter, bias, descale, mult, y]`; `y`'s length in its own elements
/// (bytes when `e4m3_out`, else FP16).
pub fn conv3x3_wg_e4m3_launch(
    build: ConvWgBuild,
    [x_len, wpack_len, bias_len, descale_len, mult_len, y_len]: [usize; 6],
    nhw: [usize; 3],
    chans: [usize; 2],
    (relu, e4m3_out, pool): (bool, bool, bool),
    limits: &LaunchLimits,
) -> Result<KernelLaunch> {
    let op = e4m3_kernel(build, pool)?;
    need(op, "descale", descale_len, 1)?;
    need(op, "mult", mult_len, 1)?;
    if pool && !relu {
        return Err(invalid(op, "the pooled build applies ReLU".into()));
    }
    let lens = [x_len, wpack_len, bias_len, y_len];
    let kind = Kind::E4m3 {
        out_e4m3: e4m3_out,
        pool,
    };
    wg_launch(build, lens, kind, nhw, chans, relu, limits)
}

/// `conv3x3_wg_pool_n*`: `y` `[n, h/2, w/2, cout]` = MaxPool2d(2, 2)(ReLU(conv 3×3 of `x`
/// `[n, h, w, cin]` + bias)), FP16 (floor: an odd last row or column of the conv is never
/// computed); items of 32 pooled pixels. Buffers as [`conv3x3_wg_launch`]'s.
pub fn conv3x3_wg_pool_launch(
    build: ConvWgBuild,
    [x_len, wpack_len, bias_len, y_len]: [usize; 4],
    [n, h, w]: [usize; 3],
    [cin, cout]: [usize; 2],
    limits: &LaunchLimits,
) -> Result<KernelLaunch> {
    let lens = [x_len, wpack_len, bias_len, y_len];
    wg_launch(
        build,
        lens,
        Kind::Pool,
        [n, h, w],
        [cin, cout],
        true,
        limits,
    )
}

/// `build`'s E4M3 kernel (`pool`: the pooled one), or an error naming the build that has none.
fn e4m3_kernel(build: ConvWgBuild, pool: bool) -> Result<&'static str> {
    build.e4m3_kernel(pool).ok_or_else(|| {
        invalid(
            "conv3x3_wg_e4m3",
            format!("no E4M3 build {build:?} (N = 128 only)"),
        )
    })
}

/// Which of the wgmma conv's kernels a launch is.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// FP16 in and out.
    Half,
    /// E4M3 in; out E4M3 when `out_e4m3`, else FP16; the 2×2 max-pool of it when `pool`.
    E4m3 { out_e4m3: bool, pool: bool },
    /// FP16 in, the 2×2 max-pool out.
    Pool,
}

/// The launchers' shared checks and shape: items of 128 pixels, or of 32 pooled pixels (the
/// windows of 128), × N channels.
fn wg_launch(
    build: ConvWgBuild,
    [x_len, wpack_len, bias_len, y_len]: [usize; 4],
    kind: Kind,
    [n, h, w]: [usize; 3],
    [cin, cout]: [usize; 2],
    relu: bool,
    limits: &LaunchLimits,
) -> Result<KernelLaunch> {
    let e4m3 = matches!(kind, Kind::E4m3 { .. });
    let op = match kind {
        Kind::Pool => build.pool_kernel(),
        Kind::E4m3 { pool, .. } => e4m3_kernel(build, pool)?,
        Kind::Half => build.kernel(),
    };
    let pool = matches!(kind, Kind::Pool | Kind::E4m3 { pool: true, .. });
    if pool && (h < 2 || w < 2) {
        return Err(invalid(
            op,
            format!("a {h}×{w} input has no 2×2 pooling window"),
        ));
    }
    if build.smem() > limits.conv_smem {
        return Err(invalid(
            op,
            format!(
                "the device cannot give a block {} bytes of shared memory",
                build.smem()
            ),
        ));
    }
    if !limits.wgmma {
        return Err(invalid(
            op,
            "wgmma needs the kernels built for sm_90a (a Hopper GPU)".into(),
        ));
    }
    // (The E4M3 pair takes a slice's 9 stages as 4 pairs and one: any slice count.)
    let paired = build.pair() && !e4m3;
    let step = CONV_WG_STAGE_BYTES / elem_bytes(e4m3) * if paired { 2 } else { 1 };
    let fits = ConvWgBuild::for_layer(cin, cout, e4m3).is_some() && cin.is_multiple_of(step);
    if !fits || cout % build.n() != 0 {
        return Err(invalid(
            op,
            format!(
                "{cin} → {cout} channels; the kernel takes multiples of {step} → {}",
                build.n()
            ),
        ));
    }
    let [n_i, h_i, w_i, cin_i] = nhwc_args(op, n, h, w, cin)?;
    let [_, _, _, cout_i] = nhwc_args(op, n, h, w, cout)?;
    let pixels = prod(op, &[n, h, w])?;
    need(op, "x", x_len, prod(op, &[pixels, cin])?)?;
    need(op, "filter", wpack_len, cout * 9 * cin)?;
    need(op, "bias", bias_len, cout)?;
    // Output pixels, and per item.
    let (units, per_item) = match pool {
        true => (prod(op, &[n, h / 2, w / 2])?, build.pixels() / 4),
        false => (pixels, build.pixels()),
    };
    need(op, "y", y_len, prod(op, &[units, cout])?)?;
    let items = units.div_ceil(per_item) * (cout / build.n());
    let grid = items.clamp(1, limits.sm_count.max(1) as usize) as u32;
    use KernelArg::*;
    let mut args = vec![Read(0), Read(1), Read(2)];
    if e4m3 {
        args.extend([Read(3), Read(4)]);
    }
    args.extend([I32(n_i), I32(h_i), I32(w_i), I32(cin_i), I32(cout_i)]);
    // The tall build reads the layer's own packing (the `for_layer` build's blocks of N).
    let packing = ConvWgBuild::for_layer(cin, cout, e4m3).map(ConvWgBuild::n);
    let pack_n = build.tall().then_some(I32(packing.unwrap_or(128) as i32));
    match kind {
        Kind::Half => args.extend(
            [I32(relu as i32)]
                .into_iter()
                .chain(pack_n)
                .chain([Write(3)]),
        ),
        Kind::E4m3 {
            out_e4m3,
            pool: false,
        } => args.extend([I32(relu as i32), I32(out_e4m3 as i32), Write(5)]),
        Kind::E4m3 {
            out_e4m3,
            pool: true,
        } => args.extend([I32(out_e4m3 as i32), Write(5)]),
        Kind::Pool => args.extend(pack_n.into_iter().chain([Write(3)])),
    }
    Ok(KernelLaunch {
        kernel: op,
        grid,
        block: 256,
        shared_mem_bytes: build.smem() as u32,
        args,
    })
}

impl Kernels {
    /// Whether this device runs `build` of the wgmma conv: sm_90a kernels and the shared memory.
    pub fn runs_conv_wg(&self, build: ConvWgBuild) -> bool {
        self.has_wgmma() && build.smem() <= self.limits.conv_smem
    }

    /// Whether this device runs any build of the wgmma conv (its filters are then packed).
    pub fn has_conv_wg(&self) -> bool {
        ConvWgBuild::ALL.into_iter().any(|b| self.runs_conv_wg(b))
    }

    /// [`conv3x3_wg_launch`], on at most `max_blocks` blocks when given (the device check makes
    /// each block go round several items); an error without sm_90a kernels or the shared memory,
    /// or an `x` or packed filter not 16-byte aligned (the kernel copies them in 16-byte chunks).
    ///
    /// # Safety
    /// `y` is written through a read pointer (as the other conv engines' outputs are): nothing
    /// else may use it until the launch is done, and it must not overlap `x`.
    pub unsafe fn conv3x3_wg<X: DevicePtr<f16>, Y: DevicePtr<f16>>(
        &self,
        stream: &Arc<CudaStream>,
        build: ConvWgBuild,
        x: &X,
        (wpack, bias): (&CudaSlice<f16>, &CudaSlice<f32>),
        nhw: [usize; 3],
        [cin, cout]: [usize; 2],
        relu: bool,
        y: &Y,
        max_blocks: Option<u32>,
    ) -> Result<()> {
        let launch = |lens, limits: &LaunchLimits| {
            conv3x3_wg_launch(build, lens, nhw, [cin, cout], relu, limits)
        };
        // SAFETY: the caller's, passed on.
        unsafe { self.run_wg(stream, launch, x, (wpack, bias), y, max_blocks) }
    }

    /// The FP16 builds' shared half: `launch` from the buffers' lengths and the limits (on at
    /// most `max_blocks` blocks), the alignment checks, the push.
    ///
    /// # Safety
    /// As [`Kernels::conv3x3_wg`].
    unsafe fn run_wg<X: DevicePtr<f16>, Y: DevicePtr<f16>>(
        &self,
        stream: &Arc<CudaStream>,
        launch: impl FnOnce([usize; 4], &LaunchLimits) -> Result<KernelLaunch>,
        x: &X,
        (wpack, bias): (&CudaSlice<f16>, &CudaSlice<f32>),
        y: &Y,
        max_blocks: Option<u32>,
    ) -> Result<()> {
        let lens = [x.len(), wpack.len(), bias.len(), y.len()];
        let launch = launch(lens, &self.limits_on(max_blocks))?;
        let (x_p, _x) = x.device_ptr(stream);
        let (f_p, _f) = wpack.device_ptr(stream);
        aligned16(launch.kernel, &[("`x`", x_p), ("the packed filter", f_p)])?;
        let (b_p, _b) = bias.device_ptr(stream);
        let (y_p, _y) = y.device_ptr(stream);
        self.run(stream, &launch, &[x_p, f_p, b_p, y_p])
    }

    /// [`conv3x3_wg_pool_launch`]; errors as [`Kernels::conv3x3_wg`]'s.
    ///
    /// # Safety
    /// As [`Kernels::conv3x3_wg`].
    pub unsafe fn conv3x3_wg_pool<X: DevicePtr<f16>, Y: DevicePtr<f16>>(
        &self,
        stream: &Arc<CudaStream>,
        build: ConvWgBuild,
        x: &X,
        (wpack, bias): (&CudaSlice<f16>, &CudaSlice<f32>),
        nhw: [usize; 3],
        chans: [usize; 2],
        y: &Y,
        max_blocks: Option<u32>,
    ) -> Result<()> {
        let launch =
            |lens, limits: &LaunchLimits| conv3x3_wg_pool_launch(build, lens, nhw, chans, limits);
        // SAFETY: the caller's, passed on.
        unsafe { self.run_wg(stream, launch, x, (wpack, bias), y, max_blocks) }
    }

    /// [`conv3x3_wg_e4m3_launch`] of `build` (one of [`ConvWgBuild::E4M3`], the filter packed
    /// for it; `how` = (relu, e4m3_out, pool)) on device addresses: `x` E4M3 codes (`x.1`
    /// bytes), `y` FP16 or (`e4m3_out`) E4M3 (`y.1` elements of its type), so that the codes
    /// may sit in the first bytes of an FP16 buffer; on at most `max_blocks` blocks when given.
    /// An error without sm_90a kernels or the shared memory, or an `x` or packed filter not
    /// 16-byte aligned.
    ///
    /// # Safety
    /// `x` and `y` must be live device allocations of at least their lengths, apart; `y` is
    /// written, and nothing else may use it until the launch is done.
    pub unsafe fn conv3x3_wg_e4m3<M: DevicePtr<f32>>(
        &self,
        stream: &Arc<CudaStream>,
        build: ConvWgBuild,
        (x, x_len): (u64, usize),
        (wpack, bias): (&CudaSlice<u8>, &CudaSlice<f32>),
        (descale, mult): (&M, &M),
        nhw: [usize; 3],
        chans: [usize; 2],
        how: (bool, bool, bool),
        (y, y_len): (u64, usize),
        max_blocks: Option<u32>,
    ) -> Result<()> {
        let lens = [
            x_len,
            wpack.len(),
            bias.len(),
            descale.len(),
            mult.len(),
            y_len,
        ];
        let limits = self.limits_on(max_blocks);
        let launch = conv3x3_wg_e4m3_launch(build, lens, nhw, chans, how, &limits)?;
        let (f_p, _f) = wpack.device_ptr(stream);
        aligned16(launch.kernel, &[("`x`", x), ("the packed filter", f_p)])?;
        let (b_p, _b) = bias.device_ptr(stream);
        let (d_p, _d) = descale.device_ptr(stream);
        let (m_p, _m) = mult.device_ptr(stream);
        self.run(stream, &launch, &[x, f_p, b_p, d_p, m_p, y])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_fit_vgg_layers_and_the_shared_memory_of_a_hopper_block() {
        use ConvWgBuild::*;
        assert_eq!(ConvWgBuild::for_layer(64, 128, false), Some(N128));
        assert_eq!(ConvWgBuild::for_layer(128, 256, false), Some(N256));
        assert_eq!(ConvWgBuild::for_layer(512, 512, false), Some(N256));
        assert_eq!(ConvWgBuild::for_layer(8, 64, false), None);
        assert_eq!(ConvWgBuild::for_layer(64, 64, false), None);
        assert_eq!(ConvWgBuild::for_layer(48, 128, false), None);
        assert_eq!(ConvWgBuild::for_layer(64, 256, true), Some(N128));
        assert_eq!(ConvWgBuild::E4M3, [N128, N128Pair]);
        assert!(N256.e4m3_kernel(false).is_none() && N256Pair.e4m3_kernel(true).is_none());
        assert_eq!(ConvWgBuild::for_layer(64, 64, true), None);
        assert_eq!(ConvWgBuild::for_layer(32, 256, true), None);
        assert_eq!((N128.smem(), N256.smem()), (198_144, 197_632));
        assert_eq!((N128Pair.smem(), N256Pair.n()), (N128.smem(), 256));
        assert_eq!(N256.with_pair(64), [N256, N256Pair]);
        assert_eq!(N128.with_pair(32), [N128]);
        assert_eq!(N128Pair.with_pair(64), [N128Pair]);
        assert!(ConvWgBuild::ALL.iter().all(|b| b.smem() <= 232_448));
        // The tall builds: 256 pixels × 128, 8 stages of 4 × (256 × 16 + 32) + 8192 bytes, FP16
        // only, timed after the layer's own build and its pair, on the layer's packing.
        assert_eq!(
            (M256N128.smem(), M256N128.n(), M256N128.pixels()),
            (197_632, 128, 256)
        );
        assert!(M256N128.e4m3_kernel(false).is_none() && M256N128Pair.e4m3_kernel(true).is_none());
        assert_eq!(
            N256.candidates(64),
            [N256, N256Pair, M256N128, M256N128Pair]
        );
        assert_eq!(N128.candidates(32), [N128, M256N128]);
        assert!(M256N128.reads_packing(N256, [64, 256]));
        assert!(M256N128Pair.reads_packing(N128, [64, 128]));
        assert!(
            !M256N128.reads_packing(N128, [64, 256]),
            "not the layer's own packing"
        );
        let [a, b] = [64, 256];
        assert!(!N128.reads_packing(N256, [a, b]) && N256Pair.reads_packing(N256, [a, b]));
    }

    /// The tall build packs (and reads) the layer's own packing: blocks of 256 for a layer of
    /// 256·k outputs.
    #[test]
    fn the_tall_build_reads_the_layers_own_packing() {
        let (cin, cout) = (32usize, 256usize);
        let filter: Vec<usize> = (0..cout * 9 * cin).collect();
        let own = conv3x3_wg_pack_filter(ConvWgBuild::N256, &filter, [cin, cout], false);
        let tall = conv3x3_wg_pack_filter(ConvWgBuild::M256N128, &filter, [cin, cout], false);
        assert_eq!(tall, own);
        let limits = LaunchLimits {
            sm_count: 132,
            masks_smem: 0,
            conv_smem: 232_448,
            wgmma: true,
        };
        let lens = [16 * cin, filter.len(), cout, 16 * cout];
        let l = conv3x3_wg_launch(
            ConvWgBuild::M256N128,
            lens,
            [1, 4, 4],
            [cin, cout],
            true,
            &limits,
        )
        .unwrap();
        // relu, then the packing's N, then y; one item per block of 128 output channels.
        assert_eq!(
            l.args[8..],
            [KernelArg::I32(1), KernelArg::I32(256), KernelArg::Write(3)]
        );
        assert_eq!(l.grid, 2);
        let pool = |lens| {
            conv3x3_wg_pool_launch(
                ConvWgBuild::M256N128Pair,
                lens,
                [1, 4, 4],
                [64, 128],
                &limits,
            )
        };
        assert!(
            pool(lens).is_err(),
            "16·cin values are too few for 64 channels"
        );
        let p = pool([16 * 64, 9 * 64 * 128, 128, 4 * 128]).unwrap();
        assert_eq!(p.args[8..], [KernelArg::I32(128), KernelArg::Write(3)]);
    }

    /// Stage s of item block nt holds, at chunk c, row o, element e: filter row nt·N + o, tap
    /// s % 9, channel 32·(s / 9) + 8c + e.
    #[test]
    fn the_packed_filter_is_one_block_per_stage() {
        let (cin, cout) = (64usize, 256usize);
        let filter: Vec<usize> = (0..cout * 9 * cin).collect();
        let packed =
            conv3x3_wg_pack_filter(ConvWgBuild::N128, &filter, [cin, cout], false).unwrap();
        let mut sorted = packed.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, filter, "a permutation");
        let stages = 9 * cin / 32;
        for (nt, s, c, o, e) in [(0, 0, 0, 0, 0), (1, 10, 3, 127, 7), (0, 17, 2, 5, 1)] {
            let at = (((nt * stages + s) * 4 + c) * 128 + o) * 8 + e;
            let want = ((nt * 128 + o) * 9 + s % 9) * cin + 32 * (s / 9) + 8 * c + e;
            assert_eq!(packed[at], want, "{nt} {s} {c} {o} {e}");
        }
        assert!(
            conv3x3_wg_pack_filter(ConvWgBuild::N256, &filter[1..], [cin, cout], false).is_none()
        );
        assert!(conv3x3_wg_pack_filter(ConvWgBuild::N256, &filter, [cin, 128], false).is_none());
        // E4M3: 64 channels per stage, 16 per chunk; N = 128 only.
        let packed = conv3x3_wg_pack_filter(ConvWgBuild::N128, &filter, [cin, cout], true).unwrap();
        let pair =
            conv3x3_wg_pack_filter(ConvWgBuild::N128Pair, &filter, [cin, cout], true).unwrap();
        assert_eq!(pair, packed, "one packed filter for both E4M3 builds");
        let stages = 9 * cin / 64;
        for (nt, s, c, o, e) in [(0, 0, 0, 0, 0), (1, 8, 3, 127, 15), (0, 4, 1, 17, 9)] {
            let at = (((nt * stages + s) * 4 + c) * 128 + o) * 16 + e;
            let want = ((nt * 128 + o) * 9 + s % 9) * cin + 64 * (s / 9) + 16 * c + e;
            assert_eq!(packed[at], want, "E4M3 {nt} {s} {c} {o} {e}");
        }
        assert!(conv3x3_wg_pack_filter(ConvWgBuild::N256, &filter, [cin, cout], true).is_none());
    }
}
