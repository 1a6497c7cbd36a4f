//! The hand-written convolution engines beside cuDNN's, on tensor cores: `kernels/conv_cin8.cu`,
//! a VGG's first conv (8 stored input channels → 64); `kernels/conv_wg.cu`, the deeper 3×3 convs
//! (input channels a multiple of 32, output channels of 128) by Hopper's wgmma; and
//! `kernels/conv_pool.cu`, a 64 → 64 conv with the 2×2 max-pool after it in the same kernel
//! (VGG16's conv1_2 + pool1). This file says which layers they can run, checks them against the
//! CPU on the device before they may be chosen, and launches them; `conv.rs` times them against
//! cuDNN at prepare and keeps the fastest.

use cudarc::driver::{CudaSlice, CudaView, DevicePtr};
use half::f16;
use rayon::prelude::*;

use super::device::{ptr, Dev};
use super::kernels::{
    e4m3_from_f32, ConvPoolVariant, ConvWgBuild, Kernels, CONV_BLOCK1_KERNEL, CONV_CIN8_IN,
    CONV_CIN8_OUT, CONV_POOL_C,
};
use super::weights::DevConv;
use crate::backend::fp8::e4m3_to_f32;
use crate::backend::splitmix64;
use crate::error::{Error, Result};

/// How long a device check's launch may take before the kernel counts as hung (tiny inputs:
/// milliseconds when it works).
const CHECK_LIMIT: std::time::Duration = std::time::Duration::from_secs(20);

/// How plans and reports name them.
pub(super) const NAME: &str = "hand-written conv3x3_cin8 (tensor cores, conv+bias+ReLU)";
pub(super) const WG_NAME: &str = "hand-written conv3x3_wg (wgmma, conv+bias+ReLU)";
pub(super) const POOL_NAME: &str =
    "hand-written conv3x3_c64_pool (tensor cores, conv+bias+ReLU+2×2 max-pool)";

/// Whether `prepare` offers the hand-written conv (`SCORECAM_CONV_DIRECT`): `off`, `auto`
/// (default: timed with cuDNN's candidates, kept when fastest), or `prefer` (kept wherever it
/// runs and passes its check: for tests of its path).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirectUse {
    Off,
    Auto,
    Prefer,
}

impl DirectUse {
    pub fn from_env() -> DirectUse {
        Self::parse(std::env::var("SCORECAM_CONV_DIRECT").ok().as_deref())
    }

    fn parse(v: Option<&str>) -> DirectUse {
        match v {
            Some("off") | Some("0") => DirectUse::Off,
            Some("prefer") => DirectUse::Prefer,
            _ => DirectUse::Auto,
        }
    }
}

/// The hand-written conv that can run a layer on this device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum DirectKernel {
    /// `conv3x3_cin8`: 8 stored input channels → 64 (sm_80+).
    Cin8,
    /// `conv3x3_wg_n*`: the layer's packed filter's build (sm_90a).
    Wg(ConvWgBuild),
}

impl DirectKernel {
    /// Which one runs `layer` here, if any: its shape, and a device (and for the wgmma conv a
    /// packed filter) it runs on.
    pub fn of(layer: &DevConv, kernels: &Kernels) -> Option<DirectKernel> {
        if layer.cin_s == CONV_CIN8_IN && layer.cout == CONV_CIN8_OUT && kernels.has_mma() {
            return Some(DirectKernel::Cin8);
        }
        let (build, _) = layer.wg_filter.as_ref()?;
        kernels
            .runs_conv_wg(*build)
            .then_some(DirectKernel::Wg(*build))
    }

    /// How plans name it (the wgmma conv with its build).
    pub fn name(self) -> String {
        match self {
            DirectKernel::Cin8 => NAME.to_string(),
            DirectKernel::Wg(build) => format!("{WG_NAME} {build:?}"),
        }
    }

    /// Its wgmma build (None: the first conv's kernel).
    pub fn build(self) -> Option<ConvWgBuild> {
        match self {
            DirectKernel::Cin8 => None,
            DirectKernel::Wg(build) => Some(build),
        }
    }

    /// Whether it can write an E4M3 output (the input of an FP8 conv after it).
    pub fn writes_e4m3(self) -> bool {
        self == DirectKernel::Cin8
    }

    /// The builds the tuning times for `layer` (its kernel from [`Self::of`]): the wgmma conv
    /// also in its paired build where the layer allows, and in the tall builds
    /// ([`ConvWgBuild::candidates`]), those the device runs.
    pub fn candidates(self, layer: &DevConv, kernels: &Kernels) -> Vec<DirectKernel> {
        match self {
            DirectKernel::Wg(build) => build
                .candidates(layer.cin_s)
                .into_iter()
                .filter(|b| kernels.runs_conv_wg(*b))
                .map(DirectKernel::Wg)
                .collect(),
            other => vec![other],
        }
    }
}

/// Whether the fused conv + pool can run `layer` (its output then pooled 2×2) on this device:
/// its shape, and a build the device runs.
pub(super) fn pool_applies(layer: &DevConv, kernels: &Kernels) -> bool {
    !pool_builds(layer, kernels).is_empty()
}

/// The builds of a conv + pool kernel the device runs for `layer`: the 64 → 64 kernel's, or the
/// pooled build of the layer's wgmma conv.
pub(super) fn pool_builds(layer: &DevConv, kernels: &Kernels) -> Vec<ConvPoolVariant> {
    if layer.cin_s == CONV_POOL_C && layer.cout == CONV_POOL_C {
        return kernels.conv_pool_variants();
    }
    match DirectKernel::of(layer, kernels) {
        Some(DirectKernel::Wg(build)) => build
            .candidates(layer.cin_s)
            .into_iter()
            .filter(|b| kernels.runs_conv_wg(*b))
            .map(ConvPoolVariant::of_wg)
            .collect(),
        _ => Vec::new(),
    }
}

/// `y` `[rows, h/2, w/2, cout]` = max-pool 2×2 of ReLU(conv(`x` `[rows, h, w, cin]`) + bias),
/// FP16, by `variant`'s build of a fused kernel (on at most `max_blocks` blocks when given).
///
/// # Safety
/// As [`launch`].
pub(super) unsafe fn launch_pool<X: DevicePtr<f16>, Y: DevicePtr<f16>>(
    dev: &Dev,
    kernels: &Kernels,
    layer: &DevConv,
    variant: ConvPoolVariant,
    dims: [usize; 3],
    (x, y): (&X, &Y),
    max_blocks: Option<u32>,
) -> Result<()> {
    let (f, b, s) = (&layer.filter, &layer.bias32, &dev.stream);
    let Some(build) = variant.wg_build() else {
        // SAFETY: the caller's, passed on.
        return unsafe { kernels.conv3x3_c64_pool(s, variant, x, f, b, dims, y, max_blocks) };
    };
    let packed = layer.wg_packed(build)?;
    let chans = [layer.cin_s, layer.cout];
    // SAFETY: the caller's, passed on.
    unsafe { kernels.conv3x3_wg_pool(s, build, x, (packed, b), dims, chans, y, max_blocks) }
}

/// Images of the fused kernel's device check: two of 37×35, so that the pool drops the conv's
/// last row and column and tiles are partial on both edges; 18 tiles on [`POOL_CHECK_BLOCKS`]
/// blocks, so that each goes round its double-buffered tile loop six times.
const POOL_CHECK_DIMS: [usize; 3] = [2, 37, 35];
const POOL_CHECK_BLOCKS: u32 = 3;
/// The same for the wgmma conv's pooled builds (up to 512 channels: a smaller CPU reference):
/// two of 13×11, 60 pooled pixels, 2 items of 32 per block of output channels on 1 block.
const WG_POOL_CHECK_DIMS: [usize; 3] = [2, 13, 11];
const WG_POOL_CHECK_BLOCKS: u32 = 1;
/// The tall builds' (items of 64 pooled pixels): two of 13×21, 120 pooled pixels, 2 items per
/// block of output channels.
const WG_TALL_POOL_CHECK_DIMS: [usize; 3] = [2, 13, 21];

/// The fused conv + pool's `variant` on random input on the device against [`reference_nhwc`]
/// (ReLU, rounded to FP16, then pooled) on the layer's own filter and bias. `None` when they
/// match; else why not, and that build is not used.
pub(super) fn check_pool_on_device(
    dev: &Dev,
    kernels: &Kernels,
    layer: &DevConv,
    variant: ConvPoolVariant,
) -> Result<Option<String>> {
    let (dims @ [n, h, w], blocks) = match variant.wg_build() {
        Some(b) if b.tall() => (WG_TALL_POOL_CHECK_DIMS, WG_POOL_CHECK_BLOCKS),
        Some(_) => (WG_POOL_CHECK_DIMS, WG_POOL_CHECK_BLOCKS),
        None => (POOL_CHECK_DIMS, POOL_CHECK_BLOCKS),
    };
    let c = layer.cout;
    let (xd, conv) = check_input(dev, layer, dims, 0xC0DE_F00D)?;
    let yd = dev.alloc::<f16>(n * (h / 2) * (w / 2) * c, "the fused conv check's output")?;
    // The unfused path's values: the conv's FP16 output after its ReLU, then the pool.
    let rounded: Vec<f32> = conv
        .iter()
        .map(|v| f16::from_f32(v.max(0.0)).to_f32())
        .collect();
    let want = pool2_max(&rounded, [n, h, w, c]);
    // SAFETY: `yd` is this function's own buffer (zeroed: a build that writes nothing fails),
    // apart from `xd`. A launch the device refuses (resources, configuration) only keeps the
    // build unused.
    let blocks = Some(blocks);
    let what = format!("the fused conv + pool ({variant:?})");
    let launch = || unsafe { launch_pool(dev, kernels, layer, variant, dims, (&xd, &yd), blocks) };
    if let Some(why) = launch_checked(dev, (&what, variant.kernel()), launch)? {
        return Ok(Some(why));
    }
    let got = dev.download(&yd, yd.len(), "the fused conv check's output")?;
    if let Some(why) = first_mismatch(&got, &want) {
        return Ok(Some(format!(
            "the fused conv + pool ({variant:?}) differs from the CPU on this device: {why}"
        )));
    }
    Ok(None)
}

/// How plans and reports name the whole-first-block kernel.
pub(super) const BLOCK1_NAME: &str =
    "hand-written conv3x3_block1_pool_wg2 (wgmma, conv+ReLU → conv+ReLU → 2×2 max-pool)";

/// Whether the whole-first-block kernel can run `first` (8 stored input channels of which at
/// most 4 real, since it reads only those → 64), `second` (64 → 64) and the 2×2 max-pool after
/// them as one launch on this device.
pub(super) fn block1_applies(first: &DevConv, second: &DevConv, kernels: &Kernels) -> bool {
    first.cin_s == CONV_CIN8_IN
        && first.cin <= 4
        && first.cout == CONV_POOL_C
        && second.cin_s == CONV_POOL_C
        && second.cout == CONV_POOL_C
        && kernels.runs_block1()
}

/// `y` `[rows, h/2, w/2, 64]` = max-pool 2×2 of ReLU(`second`(ReLU(`first`(`x` `[rows, h, w,
/// 8]`)))), FP16, by the whole-first-block kernel (on at most `max_blocks` blocks when given).
///
/// # Safety
/// As [`launch`].
pub(super) unsafe fn launch_block1<X: DevicePtr<f16>, Y: DevicePtr<f16>>(
    dev: &Dev,
    kernels: &Kernels,
    [first, second]: [&DevConv; 2],
    dims: [usize; 3],
    (x, y): (&X, &Y),
    max_blocks: Option<u32>,
) -> Result<()> {
    let convs = [
        (&first.filter, &first.bias32),
        (&second.filter, &second.bias32),
    ];
    // SAFETY: the caller's, passed on.
    unsafe { kernels.conv3x3_block1_pool(&dev.stream, x, convs, dims, y, max_blocks) }
}

/// The whole-first-block kernel on random input on the device (the fused conv + pool's check
/// images: partial tiles on both edges, each block round its tile loop several times) against
/// the CPU: [`reference_nhwc`] of `first`, ReLU, rounded to FP16 (what the convs apart store),
/// then of `second`, ReLU, rounded, pooled. `None` when they match; else why not, and the
/// kernel is not used.
pub(super) fn check_block1_on_device(
    dev: &Dev,
    kernels: &Kernels,
    [first, second]: [&DevConv; 2],
) -> Result<Option<String>> {
    let dims @ [n, h, w] = POOL_CHECK_DIMS;
    let c = second.cout;
    let (xd, conv1) = check_input(dev, first, dims, 0xB10C_F00D)?;
    let mid: Vec<f16> = conv1.iter().map(|v| f16::from_f32(v.max(0.0))).collect();
    let filter = dev.download(&second.filter, second.filter.len(), "the conv filter")?;
    let bias = dev.download(&second.bias32, c, "the conv bias")?;
    let conv2 = reference_nhwc(&mid, &filter, &bias, dims, [second.cin_s, c], true);
    let rounded: Vec<f32> = conv2.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
    let want = pool2_max(&rounded, [n, h, w, c]);
    let yd = dev.alloc::<f16>(n * (h / 2) * (w / 2) * c, "the first block check's output")?;
    // SAFETY: `yd` is this function's own buffer (zeroed: a kernel that writes nothing fails),
    // apart from `xd`. A launch the device refuses only keeps the kernel unused.
    let blocks = Some(POOL_CHECK_BLOCKS);
    let layers = [first, second];
    let launch = || unsafe { launch_block1(dev, kernels, layers, dims, (&xd, &yd), blocks) };
    let what = ("the whole-first-block kernel", CONV_BLOCK1_KERNEL);
    if let Some(why) = launch_checked(dev, what, launch)? {
        return Ok(Some(why));
    }
    let got = dev.download(&yd, yd.len(), "the first block check's output")?;
    if let Some(why) = first_mismatch_by(&got, &want, |i| 2e-3 * want[i].abs()) {
        return Ok(Some(format!(
            "the whole-first-block kernel differs from the CPU on this device: {why}"
        )));
    }
    Ok(None)
}

/// A device check's launch of `kernel` (`what` names the build), then the wait for it:
/// `Some(why)` where the device refused the launch (resources, configuration: that build is
/// then not used); an error where it hung or faulted, the CUDA context then lost, naming the
/// kernel so that `SCORECAM_SKIP_KERNELS` can leave it out (`gpu_check.sh` reads it there).
fn launch_checked(
    dev: &Dev,
    (what, kernel): (&str, &str),
    launch: impl FnOnce() -> Result<()>,
) -> Result<Option<String>> {
    if let Err(e) = launch() {
        return Ok(Some(format!("{what} did not launch on this device: {e}")));
    }
    dev.finish_within(&format!("{what}, device check ({kernel})"), CHECK_LIMIT)?;
    Ok(None)
}

/// The 2×2 max-pool (floor) of NHWC `v` `[n, h, w, c]`.
fn pool2_max(v: &[f32], [n, h, w, c]: [usize; 4]) -> Vec<f32> {
    let (ph, pw) = (h / 2, w / 2);
    let mut out = vec![0f32; n * ph * pw * c];
    for (p, px_out) in out.chunks_mut(c).enumerate() {
        let (i, py, px) = (p / (ph * pw), (p / pw) % ph, p % pw);
        for (o, y) in px_out.iter_mut().enumerate() {
            *y = [(0, 0), (0, 1), (1, 0), (1, 1)]
                .iter()
                .map(|&(dy, dx)| v[((i * h + 2 * py + dy) * w + 2 * px + dx) * c + o])
                .fold(f32::NEG_INFINITY, f32::max);
        }
    }
    out
}

/// A device check's input and CPU reference: `n·h·w` pixels of FP16 in [0, 1) from `seed` in
/// every stored channel (the zero filter taps of padded channels must cancel them), uploaded,
/// and [`reference_nhwc`] of them with the layer's own (downloaded) filter and bias, before the
/// ReLU (the ReLU's is its max with 0, the same as ReLU on the f64 sum).
fn check_input(
    dev: &Dev,
    layer: &DevConv,
    dims @ [n, h, w]: [usize; 3],
    seed: u64,
) -> Result<(CudaSlice<f16>, Vec<f32>)> {
    let (cs, cout) = (layer.cin_s, layer.cout);
    let x: Vec<f16> = (0..n * h * w * cs)
        .map(|i| f16::from_f32((splitmix64(seed + i as u64) >> 40) as f32 / (1u64 << 24) as f32))
        .collect();
    let xd = dev.upload(&x, "a hand-written conv check's input")?;
    let filter = dev.download(&layer.filter, layer.filter.len(), "the conv filter")?;
    let bias = dev.download(&layer.bias32, cout, "the conv bias")?;
    Ok((
        xd,
        reference_nhwc(&x, &filter, &bias, dims, [cs, cout], false),
    ))
}

/// What the hand-written conv writes.
#[derive(Clone, Copy)]
pub(super) enum DirectOut<'m, 'v> {
    /// FP16, ReLU unless `identity` (a pre-ReLU capture).
    Half { identity: bool },
    /// E4M3 codes of the post-ReLU value × `multiplier[0]` (the next FP8 conv's input
    /// multiplier), in the first bytes of the output buffer.
    E4m3(&'m CudaView<'v, f32>),
}

/// `y` `[rows, h, w, cout]` (FP16, or E4M3 in its first bytes) = conv(`x` `[rows, h, w, cin]`) +
/// bias, as `out` says, by the hand-written conv `kind` (one of [`DirectKernel::candidates`] of
/// the layer's); the wgmma conv on at most `max_blocks` blocks when given (the first conv's
/// kernel sizes its own grid).
///
/// # Safety
/// `y` is written through a read pointer (as cuDNN's outputs are): nothing else may use it
/// until the launch is done, and it must not overlap `x`.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn launch<X: DevicePtr<f16>, Y: DevicePtr<f16>>(
    dev: &Dev,
    kernels: &Kernels,
    layer: &DevConv,
    kind: DirectKernel,
    dims: [usize; 3],
    out: DirectOut<'_, '_>,
    (x, y): (&X, &Y),
    max_blocks: Option<u32>,
) -> Result<()> {
    let (s, f, b) = (&dev.stream, &layer.filter, &layer.bias32);
    // SAFETY: the caller's, passed on; an E4M3 output takes the first of y's 2·len bytes.
    unsafe {
        match (kind, out) {
            (DirectKernel::Cin8, DirectOut::Half { identity }) => {
                kernels.conv3x3_cin8(s, x, f, b, dims, !identity, y)
            }
            (DirectKernel::Cin8, DirectOut::E4m3(m)) => {
                let y = (ptr(y, s), 2 * y.len());
                kernels.conv3x3_cin8_e4m3(s, x, f, b, m, dims, true, y)
            }
            (DirectKernel::Wg(build), DirectOut::Half { identity }) => {
                let packed = layer.wg_packed(build)?;
                let chans = [layer.cin_s, layer.cout];
                let relu = !identity;
                kernels.conv3x3_wg(s, build, x, (packed, b), dims, chans, relu, y, max_blocks)
            }
            (DirectKernel::Wg(_), DirectOut::E4m3(_)) => Err(Error::Invalid(format!(
                "no hand-written conv with an E4M3 output for {} → {} channels on this device",
                layer.cin_s, layer.cout
            ))),
        }
    }
}

/// The first conv's kernels, FP16 and E4M3 out (checked, and skipped, together).
const CIN8_KERNELS: [&str; 2] = ["conv3x3_cin8", "conv3x3_cin8_e4m3"];

/// Images of the device check: two of 223×227, so that a partial last tile of 16 pixels and
/// every border are met, and every warp of the launch's grid (at most 3 blocks of 4 warps per
/// SM) runs more than one tile on GPUs of up to 260 SMs.
const CHECK_DIMS: [usize; 3] = [2, 223, 227];

/// Run `kind` (one of the layer's [`DirectKernel::candidates`]) on random input on the device
/// and compare with [`reference_nhwc`] on the layer's own (downloaded) filter and bias. `None`
/// when it matches; else why not, and that build is not used for layers of this shape (a device
/// whose tensor cores disagree with the CPU must not change a map).
pub(super) fn check_on_device(
    dev: &Dev,
    kernels: &Kernels,
    layer: &DevConv,
    kind: DirectKernel,
) -> Result<Option<String>> {
    match kind {
        DirectKernel::Cin8 => check_cin8_on_device(dev, kernels, layer),
        DirectKernel::Wg(build) => check_wg_on_device(dev, kernels, layer, build),
    }
}

/// Images of the wgmma conv's device check: two of 11×13, 286 pixels, so that each block of
/// output channels has 3 items of 128 pixels, the last partial, and the first of
/// [`WG_CHECK_BLOCKS`] blocks goes on from one item to the next in its ring of stages.
const WG_CHECK_DIMS: [usize; 3] = [2, 11, 13];
const WG_CHECK_BLOCKS: u32 = 2;

/// The wgmma conv (`build`, the layer's packed filter) against the CPU: FP16 out without ReLU
/// (on a zeroed output: a build that writes nothing fails), then with it.
fn check_wg_on_device(
    dev: &Dev,
    kernels: &Kernels,
    layer: &DevConv,
    build: ConvWgBuild,
) -> Result<Option<String>> {
    let [n, h, w] = WG_CHECK_DIMS;
    let (xd, pre_relu) = check_input(dev, layer, WG_CHECK_DIMS, 0xC0DE_0096)?;
    let relu: Vec<f32> = pre_relu.iter().map(|v| v.max(0.0)).collect();
    let packed = match layer.wg_packed(build) {
        Ok(packed) => packed,
        Err(e) => return Ok(Some(e.to_string())),
    };
    // (A tall build has 2 items per block of output channels here: one block takes them all,
    // so that its ring goes on from one item into the next.)
    let blocks = if build.tall() { 1 } else { WG_CHECK_BLOCKS };
    let (chans, b, blocks) = ([layer.cin_s, layer.cout], &layer.bias32, Some(blocks));
    // On a zeroed output: a build that writes nothing fails.
    let yd = dev.alloc::<f16>(n * h * w * layer.cout, "the wgmma conv check's output")?;
    let what = format!("the wgmma conv ({build:?})");
    for (identity, want) in [(true, &pre_relu), (false, &relu)] {
        let relu = !identity;
        // SAFETY: `yd` is this function's own buffer, apart from `xd`.
        let launch = || unsafe {
            let s = &dev.stream;
            let io = (packed, b);
            kernels.conv3x3_wg(s, build, &xd, io, WG_CHECK_DIMS, chans, relu, &yd, blocks)
        };
        if let Some(why) = launch_checked(dev, (&what, build.kernel()), launch)? {
            return Ok(Some(why));
        }
        let got = dev.download(&yd, yd.len(), "the wgmma conv check's output")?;
        if let Some(why) = first_mismatch(&got, want) {
            return Ok(Some(format!(
                "the wgmma conv ({build:?}, {} → {} channels) differs from the CPU on this \
                 device ({}): {why}",
                layer.cin_s,
                layer.cout,
                if identity { "no ReLU" } else { "ReLU" }
            )));
        }
    }
    Ok(None)
}

/// `y` = ReLU(conv(`x`) · `descale[0]` + bias) by the wgmma conv's E4M3 `build` (one of
/// [`ConvWgBuild::E4M3`]) on the layer's E4M3 filter packed for it (`wpack`): `x` E4M3 codes
/// `[rows, h, w, cin]` at a device address, `y` FP16 or (`e4m3_out`) E4M3 codes of the output
/// times `mult[0]`, `[rows, h, w, cout]`, or with `pool` its 2×2 max-pool `[rows, h/2, w/2,
/// cout]`, at a device address.
///
/// # Safety
/// `x` and `y` must be live device allocations holding the layer's input and output (pooled
/// with `pool`) at `dims`, apart; nothing else may use `y` until the launch is done.
pub(super) unsafe fn launch_fp8(
    dev: &Dev,
    kernels: &Kernels,
    layer: &DevConv,
    (build, wpack): (ConvWgBuild, &CudaSlice<u8>),
    dims @ [rows, h, w]: [usize; 3],
    (descale, mult): (&CudaView<'_, f32>, &CudaView<'_, f32>),
    (x, (e4m3_out, pool), y): (u64, (bool, bool), u64),
) -> Result<()> {
    let pixels = rows * h * w;
    let outputs = if pool {
        rows * (h / 2) * (w / 2)
    } else {
        pixels
    };
    let (x, y) = ((x, pixels * layer.cin_s), (y, outputs * layer.cout));
    let chans = [layer.cin_s, layer.cout];
    let (s, b) = (&dev.stream, &layer.bias32);
    let how = (true, e4m3_out, pool);
    // SAFETY: the caller's, passed on.
    unsafe {
        let scales = (descale, mult);
        kernels.conv3x3_wg_e4m3(s, build, x, (wpack, b), scales, dims, chans, how, y, None)
    }
}

/// The FP8 accumulation the device check allows beyond FP16 rounding, as a fraction of the sum
/// of |x·w| of an output: Hopper's FP8 MMAs keep about 14 bits of their running sum, and the
/// kernel adds its partial sums in f32 after every 18 MMAs, so up to 18·2⁻¹⁴ of a partial sum
/// goes; 2⁻¹⁰ covers that with room.
const FP8_ACCUMULATION: f32 = 1.0 / 1024.0;

/// The wgmma conv's E4M3 `build` against the CPU on the layer's own FP8 filter (`codes`, KRSC,
/// and packed, `wpack`) and bias, on random E4M3 input, at a descale and multiplier of its own:
/// FP16 out (within FP16 rounding and [`FP8_ACCUMULATION`]), then E4M3 out (codes of the output
/// times the multiplier, some saturated: the same code or, at a rounding boundary, the next);
/// with `pool`, its pooled kernel against the 2×2 max of that. `None` when it matches; else why
/// not.
pub(super) fn check_fp8_on_device(
    dev: &Dev,
    kernels: &Kernels,
    layer: &DevConv,
    ((build, wpack), pool): ((ConvWgBuild, &CudaSlice<u8>), bool),
    codes: &CudaSlice<u8>,
) -> Result<Option<String>> {
    let [n, h, w] = WG_CHECK_DIMS;
    let (cs, cout, pixels) = (layer.cin_s, layer.cout, n * h * w);
    let x: Vec<u8> = (0..pixels * cs)
        .map(|i| e4m3_from_f32((splitmix64(0xF8 + i as u64) >> 40) as f32 / (1u64 << 21) as f32))
        .collect();
    let xd = dev.upload(&x, "the FP8 wgmma conv check's input")?;
    let filter = dev.download(codes, codes.len(), "the FP8 conv filter")?;
    let bias = dev.download(&layer.bias32, cout, "the conv bias")?;
    let (descale, multiplier) = (1.0f32 / 64.0, 16.0f32);
    let sd = dev.upload(&[descale, multiplier], "the FP8 wgmma conv check's scales")?;
    // E4M3 values are exact in FP16: the f64 reference of the codes, and of their magnitudes.
    let decoded = |v: &[u8], abs: bool| {
        v.iter()
            .map(|&c| {
                f16::from_f32(if abs {
                    e4m3_to_f32(c).abs()
                } else {
                    e4m3_to_f32(c)
                })
            })
            .collect::<Vec<_>>()
    };
    let conv = |abs: bool| {
        let zero = vec![0.0; cout];
        let (x, f) = (decoded(&x, abs), decoded(&filter, abs));
        reference_nhwc(&x, &f, &zero, [n, h, w], [cs, cout], false)
    };
    let (sums, magnitudes) = (conv(false), conv(true));
    let want: Vec<f32> = sums
        .iter()
        .enumerate()
        .map(|(i, &s)| (s * descale + bias[i % cout]).max(0.0))
        .collect();
    let slacks: Vec<f32> = magnitudes
        .iter()
        .map(|m| FP8_ACCUMULATION * descale * m)
        .collect();
    // Pooled: the window's max; off by at most the largest slack of the window.
    let nhwc = [n, h, w, cout];
    let (want, slacks) = match pool {
        true => (pool2_max(&want, nhwc), pool2_max(&slacks, nhwc)),
        false => (want, slacks),
    };
    let slack = |i: usize| slacks[i];
    for e4m3_out in [false, true] {
        // A zeroed output of its own each time: a build that writes nothing fails.
        let yd = dev.alloc::<f16>(want.len(), "the FP8 wgmma conv check's output")?;
        let (d, m) = (sd.slice(0..1), sd.slice(1..2));
        let (xp, yp) = (ptr(&xd, &dev.stream), ptr(&yd, &dev.stream));
        // SAFETY: `xd` and `yd` are this function's own buffers, apart, of the check's sizes
        // (the E4M3 output takes the first half of `yd`'s bytes). A launch the device refuses
        // only keeps the kernel unused.
        let launch = || unsafe {
            let io = (xp, (e4m3_out, pool), yp);
            let scales = (&d, &m);
            launch_fp8(
                dev,
                kernels,
                layer,
                (build, wpack),
                WG_CHECK_DIMS,
                scales,
                io,
            )
        };
        let what = format!("the FP8 wgmma conv ({build:?})");
        let kernel = build.e4m3_kernel(pool).unwrap_or("conv3x3_wg_e4m3");
        if let Some(why) = launch_checked(dev, (&what, kernel), launch)? {
            return Ok(Some(why));
        }
        let why = if e4m3_out {
            let half = dev.download(&yd, yd.len() / 2, "the FP8 wgmma conv check's output")?;
            first_code_mismatch_by(bytemuck::cast_slice(&half), &want, multiplier, (slack, 98))
        } else {
            let got = dev.download(&yd, yd.len(), "the FP8 wgmma conv check's output")?;
            first_mismatch_by(&got, &want, slack)
        };
        if let Some(why) = why {
            return Ok(Some(format!(
                "the FP8 wgmma conv ({build:?}, {cs} → {cout} channels, {} out{}) differs from \
                 the CPU on this device: {why}",
                if e4m3_out { "E4M3" } else { "FP16" },
                if pool { ", pooled" } else { "" }
            )));
        }
    }
    Ok(None)
}

/// The first conv's kernel against the CPU: FP16 out without and with ReLU, E4M3 out.
fn check_cin8_on_device(dev: &Dev, kernels: &Kernels, layer: &DevConv) -> Result<Option<String>> {
    if let Some(k) = CIN8_KERNELS.into_iter().find(|k| kernels.skips(k)) {
        return Ok(Some(format!("{k} is named in SCORECAM_SKIP_KERNELS")));
    }
    let [n, h, w] = CHECK_DIMS;
    let (xd, pre_relu) = check_input(dev, layer, CHECK_DIMS, 0xC0DE)?;
    let yd = dev.alloc::<f16>(n * h * w * layer.cout, "the direct conv check's output")?;
    let relu: Vec<f32> = pre_relu.iter().map(|v| v.max(0.0)).collect();
    let run = |out: DirectOut<'_, '_>, what: &str| {
        // SAFETY: `yd` is this function's own buffer, apart from `xd` (an E4M3 output fills the
        // first half of its bytes).
        unsafe {
            launch(
                dev,
                kernels,
                layer,
                DirectKernel::Cin8,
                CHECK_DIMS,
                out,
                (&xd, &yd),
                None,
            )
        }?;
        dev.finish_within(what, CHECK_LIMIT)
    };
    for (identity, want) in [(true, &pre_relu), (false, &relu)] {
        run(
            DirectOut::Half { identity },
            "the first conv's device check (conv3x3_cin8)",
        )?;
        let got = dev.download(&yd, yd.len(), "the direct conv check's output")?;
        if let Some(why) = first_mismatch(&got, want) {
            return Ok(Some(format!(
                "the hand-written conv differs from the CPU on this device ({}): {why}",
                if identity { "no ReLU" } else { "ReLU" }
            )));
        }
    }
    // E4M3 out, at a multiplier that saturates the largest values.
    let multiplier = 300.0f32;
    let md = dev.upload(&[multiplier], "the direct conv check's multiplier")?;
    let m = md.as_view();
    run(
        DirectOut::E4m3(&m),
        "the first conv's device check (conv3x3_cin8_e4m3)",
    )?;
    let half = dev.download(&yd, yd.len() / 2, "the direct conv check's E4M3 output")?;
    let got: &[u8] = bytemuck::cast_slice(&half);
    Ok(first_code_mismatch(got, &relu, multiplier).map(|why| {
        format!("the hand-written conv's E4M3 output differs from the CPU on this device: {why}")
    }))
}

/// The first element where `got` (FP16 out) and `want` differ by more than FP16 rounding and a
/// differently ordered f32 sum can explain.
fn first_mismatch(got: &[f16], want: &[f32]) -> Option<String> {
    first_mismatch_by(got, want, |_| 0.0)
}

/// The same, element `i` allowed `slack(i)` more.
fn first_mismatch_by(got: &[f16], want: &[f32], slack: impl Fn(usize) -> f32) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!("{} values, want {}", got.len(), want.len()));
    }
    got.iter().zip(want).enumerate().find_map(|(i, (g, &r))| {
        let g = g.to_f32();
        let ok = (g - r).abs() <= 2e-3 + 2e-3 * r.abs() + slack(i);
        (!ok).then(|| format!("element {i}: {g}, want {r}"))
    })
}

/// Where E4M3 codes `got` do not encode `want` × `multiplier`: a code other than its own (±0
/// alike) or, for a sum rounded differently at a rounding boundary, the next one; or fewer
/// than 99 % exactly its own.
fn first_code_mismatch(got: &[u8], want: &[f32], multiplier: f32) -> Option<String> {
    first_code_mismatch_by(got, want, multiplier, (|_| 0.0, 99))
}

/// The same, element `i` also passing within `slack(i)` of its value (a sum that cancels to
/// near zero under FP8 accumulation), and `percent` exactly its own code.
fn first_code_mismatch_by(
    got: &[u8],
    want: &[f32],
    multiplier: f32,
    (slack, percent): (impl Fn(usize) -> f32, usize),
) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!("{} codes, want {}", got.len(), want.len()));
    }
    let mut exact = 0;
    for (i, (&g, &r)) in got.iter().zip(want).enumerate() {
        let w = e4m3_from_f32(r * multiplier);
        let (gm, wm) = (g & 0x7F, w & 0x7F);
        let same = g == w || (gm == 0 && wm == 0);
        let next = g & 0x80 == w & 0x80 && gm.abs_diff(wm) == 1;
        let near = (e4m3_to_f32(g) / multiplier - r).abs() <= slack(i);
        if !same && !next && !near {
            return Some(format!(
                "element {i}: code {g:#04x}, want {w:#04x} ({r} × {multiplier})"
            ));
        }
        exact += same as usize;
    }
    (exact * 100 < percent * got.len())
        .then(|| format!("{exact} of {} codes exactly the CPU's", got.len()))
}

/// Conv 3×3, stride 1, pad 1 on NHWC: `x` `[n, h, w, cs]`, `filter` KRSC `[cout, 3, 3, cs]`,
/// + `bias`, ReLU when `relu`; f64 sums. Returns `[n, h, w, cout]`.
pub fn reference_nhwc(
    x: &[f16],
    filter: &[f16],
    bias: &[f32],
    [n, h, w]: [usize; 3],
    [cs, cout]: [usize; 2],
    relu: bool,
) -> Vec<f32> {
    let mut y = vec![0f32; n * h * w * cout];
    y.par_chunks_mut(cout).enumerate().for_each(|(p, out)| {
        let (img, yy, xx) = (p / (h * w), (p / w) % h, p % w);
        for (o, v) in out.iter_mut().enumerate() {
            let mut s = bias[o] as f64;
            for r in 0..3 {
                for q in 0..3 {
                    let (iy, ix) = (yy + r, xx + q);
                    if iy < 1 || iy > h || ix < 1 || ix > w {
                        continue;
                    }
                    let src = ((img * h + iy - 1) * w + ix - 1) * cs;
                    let taps = (o * 9 + r * 3 + q) * cs;
                    for c in 0..cs {
                        s += x[src + c].to_f64() * filter[taps + c].to_f64();
                    }
                }
            }
            *v = if relu { s.max(0.0) as f32 } else { s as f32 };
        }
    });
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu;

    /// The device check's reference equals the CPU backend's conv (NCHW, im2col + gemm).
    #[test]
    fn the_reference_is_the_cpu_conv() {
        let ([n, h, w], cin, cs, cout) = ([2usize, 5usize, 7usize], 3usize, 8usize, 16usize);
        let weight: Vec<f32> = (0..cout * cin * 9)
            .map(|i| f16::from_f32(((i * 37 % 23) as f32 - 11.0) / 16.0).to_f32())
            .collect();
        let bias: Vec<f32> = (0..cout).map(|o| o as f32 / 8.0 - 1.0).collect();
        let x_nchw: Vec<f32> = (0..n * cin * h * w)
            .map(|i| f16::from_f32(((i * 13 % 17) as f32 - 8.0) / 8.0).to_f32())
            .collect();
        let mut x = vec![f16::ZERO; n * h * w * cs];
        let mut filter = vec![f16::ZERO; cout * 9 * cs];
        for i in 0..n {
            for c in 0..cin {
                for p in 0..h * w {
                    x[(i * h * w + p) * cs + c] = f16::from_f32(x_nchw[(i * cin + c) * h * w + p]);
                }
            }
        }
        for o in 0..cout {
            for c in 0..cin {
                for t in 0..9 {
                    filter[(o * 9 + t) * cs + c] = f16::from_f32(weight[(o * cin + c) * 9 + t]);
                }
            }
        }
        for relu in [false, true] {
            let got = reference_nhwc(&x, &filter, &bias, [n, h, w], [cs, cout], relu);
            let mut want = vec![0f32; got.len()];
            cpu::conv3x3_into(&x_nchw, n, cin, h, w, &weight, &bias, cout, relu, &mut want);
            for i in 0..n {
                for o in 0..cout {
                    for p in 0..h * w {
                        let (g, r) = (
                            got[(i * h * w + p) * cout + o],
                            want[(i * cout + o) * h * w + p],
                        );
                        assert!(
                            (g - r).abs() < 1e-5,
                            "relu {relu} image {i} channel {o} pixel {p}: {g} vs {r}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn mismatches_are_named_and_rounding_is_not_one() {
        let want = [1.0f32, -2.0, 1000.0];
        let close: Vec<f16> = want.iter().map(|&v| f16::from_f32(v)).collect();
        assert_eq!(first_mismatch(&close, &want), None);
        let mut off = close.clone();
        off[1] = f16::from_f32(-2.1);
        let why = first_mismatch(&off, &want).unwrap();
        assert!(why.contains("element 1"), "{why}");
        off[1] = f16::NAN;
        assert!(first_mismatch(&off, &want).is_some(), "NaN passes");
        assert!(first_mismatch(&close[..2], &want).is_some());
    }

    #[test]
    fn codes_may_be_the_next_one_but_rarely() {
        let want: Vec<f32> = (0..200).map(|i| i as f32 / 50.0).collect();
        let m = 100.0;
        let mut got: Vec<u8> = want.iter().map(|&v| e4m3_from_f32(v * m)).collect();
        assert_eq!(first_code_mismatch(&got, &want, m), None);
        got[7] += 1;
        assert_eq!(first_code_mismatch(&got, &want, m), None, "one next code");
        got[9] += 2;
        let why = first_code_mismatch(&got, &want, m).unwrap();
        assert!(why.contains("element 9"), "{why}");
        got[9] -= 1;
        got[11] |= 0x80;
        assert!(first_code_mismatch(&got, &want, m)
            .unwrap()
            .contains("element 11"));
        got[11] &= 0x7F;
        assert_eq!(first_code_mismatch(&got, &want, m), None);
        got[20] += 1;
        assert!(
            first_code_mismatch(&got, &want, m)
                .unwrap()
                .contains("of 200"),
            "3 % next"
        );
    }

    #[test]
    fn the_setting_reads_off_prefer_and_defaults_to_auto() {
        assert_eq!(DirectUse::parse(Some("off")), DirectUse::Off);
        assert_eq!(DirectUse::parse(Some("0")), DirectUse::Off);
        assert_eq!(DirectUse::parse(Some("prefer")), DirectUse::Prefer);
        assert_eq!(DirectUse::parse(Some("yes")), DirectUse::Auto);
        assert_eq!(DirectUse::parse(None), DirectUse::Auto);
    }
}
