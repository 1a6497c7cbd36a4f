//! Launchers for the hand-written kernels in `kernels/*.cu` (embedded by build.rs, compiled once
//! per process by NVRTC for the device's own architecture). One launcher per kernel (llm.c
//! style), in two halves: a pure `*_launch` function checks the inputs, owns the grid/block shape
//! and lists the arguments (a [`KernelLaunch`]), with no device involved, so the CPU tests run
//! exactly that launch on an emulation of the kernel (tests/kernels_host.rs); the method of the
//! same name on [`Kernels`] takes the device views and pushes it.
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

//!
//! Each `kernels/X.cu` has its launchers in `kernels/X.rs` here; `nvrtc.rs` compiles them all.

#![allow(clippy::too_many_arguments)]

mod combine;
mod conv_cin8;
mod conv_pool;
mod conv_wg;
mod elementwise;
mod fp8;
mod masks;
mod nvrtc;
mod pool;
mod preprocess;
mod scores;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaStream, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;

use crate::error::{Error, Result};

pub use self::combine::{upsample_relu_normalize_launch, weighted_channel_sum_launch};
pub use self::conv_cin8::{
    conv3x3_cin8_e4m3_launch, conv3x3_cin8_launch, CONV_CIN8_IN, CONV_CIN8_OUT,
};
pub use self::conv_pool::{
    conv3x3_block1_pool_launch, conv3x3_c64_pool_launch, ConvPoolVariant, CONV_BLOCK1_KERNEL,
    CONV_BLOCK1_SMEM, CONV_POOL_C, CONV_POOL_SMEM, CONV_POOL_SMEM_WG2,
};
pub use self::conv_wg::{
    conv3x3_wg_e4m3_launch, conv3x3_wg_launch, conv3x3_wg_pack_filter, conv3x3_wg_pool_launch,
    ConvWgBuild, CONV_WG_STAGE_BYTES,
};
pub use self::elementwise::{
    bias_act_f16_launch, bias_f32_launch, fill_uniform_f16_launch, relu_f16_launch,
};
pub use self::fp8::{
    amax_abs_f16_launch, dequantize_e4m3_launch, e4m3_from_f32, fp8_scales_launch,
    quantize_e4m3_launch, DESCALE_AT, E4M3_MAX, MULTIPLIER_AT, SCALE_STRIDE,
};
pub use self::masks::{masks_launch, MaskVariant, MasksShape};
pub use self::nvrtc::{
    assemble_source, compile_cached, compile_for_arch, disk_cache_dir, is_cubin, nvrtc_available,
    nvrtc_version, ptxas_report, user_cache_dir,
};
pub use self::pool::{adaptive_avgpool_launch, maxpool2_e4m3_launch, maxpool2_launch};
pub use self::preprocess::preprocess_launch;
pub use self::scores::scores_launch;

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
    "maxpool2_e4m3",
    "adaptive_avgpool",
    "bias_act_f16",
    "bias_f32",
    "relu_f16",
    "fill_uniform_f16",
    "conv3x3_cin8",
    "conv3x3_cin8_e4m3",
    "conv3x3_c64_pool_w4",
    "conv3x3_c64_pool_w8",
    "conv3x3_c64_pool_wg",
    "conv3x3_c64_pool_wg2",
    "conv3x3_block1_pool_wg2",
    "conv3x3_wg_n128",
    "conv3x3_wg_n256",
    "conv3x3_wg_e4m3_n128",
    "conv3x3_wg_e4m3_n128_pair",
    "conv3x3_wg_e4m3_pool_n128",
    "conv3x3_wg_e4m3_pool_n128_pair",
    "conv3x3_wg_pool_n128",
    "conv3x3_wg_pool_n256",
    "conv3x3_wg_n128_pair",
    "conv3x3_wg_n256_pair",
    "conv3x3_wg_pool_n128_pair",
    "conv3x3_wg_pool_n256_pair",
    "conv3x3_wg_m256n128",
    "conv3x3_wg_m256n128_pair",
    "conv3x3_wg_pool_m256n128",
    "conv3x3_wg_pool_m256n128_pair",
    "amax_abs_f16",
    "fp8_scales",
    "quantize_e4m3",
    "dequantize_e4m3",
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
pub const BLOCK: u32 = 256;
/// Threads of the single block of `upsample_relu_normalize`.
pub const MAP_BLOCK: u32 = 512;
/// Dynamic shared memory a block may always use: 44 KiB, leaving room for the reductions' static
/// shared memory under the 48 KiB default.
pub const SMEM_DEFAULT: usize = 44 * 1024;
/// Dynamic shared memory `masks` opts into where the device allows (cuFuncSetAttribute), so the
/// separable mode also covers e.g. a 28×28 layer at S = 448 (53 KiB).
pub const SMEM_OPT_IN: usize = 96 * 1024;
/// The kernels that opt into [`SMEM_OPT_IN`]; every other kernel has the 48 KiB default.
pub const SMEM_OPT_IN_KERNELS: &[&str] = &["masks", "masks_direct"];

/// The big-tile conv kernels and the dynamic shared memory each opts into where the device has
/// it ([`LaunchLimits::conv_smem`]): every build of the fused conv + pool and of the wgmma conv.
pub fn conv_smem_kernels() -> impl Iterator<Item = (&'static str, usize)> {
    ConvPoolVariant::ALL
        .into_iter()
        .map(|v| (v.kernel(), v.smem()))
        .chain([(CONV_BLOCK1_KERNEL, CONV_BLOCK1_SMEM)])
        .chain(ConvWgBuild::kernels())
}

// ---------------------------------------------------------------------------------------------
// Launches as data

/// One kernel launch as a launcher computes it, before any device is involved: the kernel, the
/// launch shape and the arguments in the kernel's parameter order. Every launcher is a pure
/// `*_launch` function returning this (checks, shape and arguments), which the CUDA path pushes
/// as is ([`Kernels`]) and the CPU tests run on an emulation of the same kernel source
/// (tests/kernel_host): the launch a test checks is the launch the GPU gets.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelLaunch {
    /// The kernel's `extern "C"` name in kernels/*.cu.
    pub kernel: &'static str,
    /// Blocks (x only: every kernel is 1-D).
    pub grid: u32,
    /// Threads per block.
    pub block: u32,
    /// Dynamic shared memory per block, bytes.
    pub shared_mem_bytes: u32,
    pub args: Vec<KernelArg>,
}

/// One kernel argument. A buffer is named by its position in the launcher's buffer list (each
/// `*_launch` function documents its list), marked read-only or written.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KernelArg {
    Read(usize),
    Write(usize),
    I32(i32),
    I64(i64),
    U64(u64),
    F32(f32),
}

/// What the launch shapes depend on besides the arguments.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LaunchLimits {
    /// Streaming multiprocessors (sizes the grid-stride grids).
    pub sm_count: u32,
    /// Dynamic shared memory `masks` / `masks_direct` may use per block, bytes.
    pub masks_smem: usize,
    /// Dynamic shared memory the big-tile conv kernels were opted into, bytes (the device's
    /// opt-in limit; each build needs its own: [`ConvPoolVariant::smem`], [`ConvWgBuild::smem`]).
    pub conv_smem: usize,
    /// The module was built for `sm_90a`, so its `wgmma` kernels run (Hopper only).
    pub wgmma: bool,
}

/// A grid-stride launch over `units` work items: blocks of [`BLOCK`] threads, at most 32 per SM
/// (the loop inside covers the rest).
fn grid_stride(
    kernel: &'static str,
    units: usize,
    limits: &LaunchLimits,
    args: Vec<KernelArg>,
) -> KernelLaunch {
    let cap = (limits.sm_count as usize).saturating_mul(32).max(1);
    let blocks = units.div_ceil(BLOCK as usize).clamp(1, cap);
    KernelLaunch {
        kernel,
        grid: blocks as u32,
        block: BLOCK,
        shared_mem_bytes: 0,
        args,
    }
}

/// The compiled kernel module for one context. Build once (`Kernels::load`) and keep.
pub struct Kernels {
    ctx: Arc<CudaContext>,
    _module: Arc<CudaModule>,
    /// Every kernel of [`KERNEL_NAMES`], by name.
    functions: HashMap<&'static str, CudaFunction>,
    limits: LaunchLimits,
    /// The architecture the module was compiled for, e.g. `sm_90` (or `compute_86` for PTX).
    arch: String,
    /// Whether the device has the tensor-core `mma.sync` m16n8k16 the hand-written conv uses
    /// (sm_80 and later).
    mma: bool,
    /// Resident blocks per SM of the masks kernels, by (kernel, shared memory bytes).
    masks_occupancy: Mutex<HashMap<(&'static str, usize), u32>>,
    /// Hand-written conv kernels this process must not launch ([`skipped_kernels`]).
    skipped: Vec<&'static str>,
}

/// `SCORECAM_SKIP_KERNELS`: hand-written conv kernels (their `extern "C"` names, comma- or
/// space-separated) this process must not launch: their device checks then refuse them, and
/// cuDNN or another build runs those layers. For a kernel that hangs or faults on some device
/// (that error names it): the rest keep running, instead of every wgmma build going with
/// `SCORECAM_WGMMA=off`. A name that is no conv kernel of this build is an error, not a no-op.
pub fn skipped_kernels(value: Option<&str>) -> Result<Vec<&'static str>> {
    let convs = || {
        KERNEL_NAMES
            .iter()
            .copied()
            .filter(|k| k.starts_with("conv3x3_"))
    };
    let names = value
        .unwrap_or("")
        .split([',', ' '])
        .filter(|n| !n.is_empty());
    names
        .map(|name| {
            convs().find(|k| *k == name).ok_or_else(|| {
                Error::Usage(format!(
                    "SCORECAM_SKIP_KERNELS names `{name}`, which is no hand-written conv kernel \
                     of this build (they are: {})",
                    convs().collect::<Vec<_>>().join(", ")
                ))
            })
        })
        .collect()
}

impl Kernels {
    /// Compile every kernel in `kernels/*.cu` with NVRTC for `ctx`'s device (CUBIN for its own
    /// `sm_XY`, so a newer NVRTC than the driver does not matter), load the module, look up the
    /// functions. Errors: `Error::CudaUnavailable` with NVRTC's log on a compile failure.
    pub fn load(ctx: &Arc<CudaContext>) -> Result<Self> {
        let skipped = skipped_kernels(std::env::var("SCORECAM_SKIP_KERNELS").ok().as_deref())?;
        nvrtc::ensure_nvrtc()?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| Error::CudaUnavailable(format!("reading the compute capability: {e}")))?;
        let load = |arch: &str, image: Vec<u8>| {
            let ptx = if is_cubin(&image) {
                Ptx::from_binary(image)
            } else {
                let text = String::from_utf8(image).map_err(|_| {
                    Error::CudaUnavailable(format!("NVRTC returned non-UTF-8 PTX for {arch}"))
                })?;
                Ptx::from_src(text)
            };
            ctx.load_module(ptx).map_err(|e| {
                Error::CudaUnavailable(format!("loading the kernel module ({arch}): {e}"))
            })
        };
        let (mut arch, image) = nvrtc::image_for_device(major, minor)?;
        let module = match load(&arch, image) {
            // The sm_90a image refused (a driver that does not take it): plain sm_90 then,
            // without the wgmma builds.
            Err(e) if arch == "sm_90a" => {
                if super::device::verbose() {
                    eprintln!("cuda: {e}; the kernels are built for sm_90 instead");
                }
                arch = "sm_90".to_string();
                load(&arch, nvrtc::compile_for_arch(&arch)?)?
            }
            loaded => loaded?,
        };
        let mut functions = HashMap::new();
        for &name in KERNEL_NAMES {
            let f = module.load_function(name).map_err(|e| {
                Error::CudaUnavailable(format!("kernel `{name}` missing from the module: {e}"))
            })?;
            functions.insert(name, f);
        }
        let sm_count = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| Error::CudaUnavailable(format!("reading the SM count: {e}")))?
            .max(1) as u32;
        // Opt the masks kernels into more shared memory where the device has it; else 44 KiB.
        let opt_in = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map(|v| v.max(0) as usize)
            .unwrap_or(0);
        let want = SMEM_OPT_IN.min(opt_in.saturating_sub(4 * 1024));
        let attr = CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
        let masks_smem = if want > SMEM_DEFAULT
            && SMEM_OPT_IN_KERNELS
                .iter()
                .all(|k| functions[k].set_attribute(attr, want as i32).is_ok())
        {
            want
        } else {
            SMEM_DEFAULT
        };
        // The fused conv + pool and the wgmma conv need more than any GPU's default: only an
        // opt-in enables them, for each build its own size where the device has it.
        let conv_smem = if conv_smem_kernels()
            .filter(|&(_, smem)| smem <= opt_in)
            .all(|(kernel, smem)| functions[kernel].set_attribute(attr, smem as i32).is_ok())
        {
            opt_in
        } else {
            0
        };
        Ok(Kernels {
            ctx: ctx.clone(),
            _module: module,
            functions,
            limits: LaunchLimits {
                sm_count,
                masks_smem,
                conv_smem,
                wgmma: arch == "sm_90a",
            },
            arch,
            mma: major >= 8,
            masks_occupancy: Mutex::new(HashMap::new()),
            skipped,
        })
    }

    /// Whether `kernel` is one this process must not launch ([`skipped_kernels`]).
    pub fn skips(&self, kernel: &str) -> bool {
        self.skipped.contains(&kernel)
    }

    /// The launch limits with the grid kept to `max_blocks` blocks when given (the device checks
    /// of the persistent kernels make each block go round several tiles).
    fn limits_on(&self, max_blocks: Option<u32>) -> LaunchLimits {
        let sm_count = self.limits.sm_count;
        LaunchLimits {
            sm_count: max_blocks.map_or(sm_count, |b| b.min(sm_count)),
            ..self.limits
        }
    }

    /// The architecture the kernels were compiled for (`sm_90`; `compute_XY` if PTX).
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// The device's streaming multiprocessors.
    pub fn sm_count(&self) -> u32 {
        self.limits.sm_count
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

    /// The one launch path: push `launch`'s arguments (buffer `i` is the device address
    /// `buffers[i]`) and launch it on `stream`; errors name the kernel.
    fn run(
        &self,
        stream: &Arc<CudaStream>,
        launch: &KernelLaunch,
        buffers: &[cudarc::driver::sys::CUdeviceptr],
    ) -> Result<()> {
        let op = launch.kernel;
        if self.skips(op) {
            return Err(invalid(
                op,
                "not launched: named in SCORECAM_SKIP_KERNELS".into(),
            ));
        }
        self.check_stream(op, stream)?;
        let func = self
            .functions
            .get(op)
            .ok_or_else(|| invalid(op, "no such kernel in the module".into()))?;
        let mut builder = stream.launch_builder(func);
        for arg in &launch.args {
            match arg {
                KernelArg::Read(i) | KernelArg::Write(i) => {
                    let p = buffers.get(*i).ok_or_else(|| {
                        invalid(op, format!("buffer {i} of {} passed", buffers.len()))
                    })?;
                    builder.arg(p)
                }
                KernelArg::I32(v) => builder.arg(v),
                KernelArg::I64(v) => builder.arg(v),
                KernelArg::U64(v) => builder.arg(v),
                KernelArg::F32(v) => builder.arg(v),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: (launch.grid, 1, 1),
            block_dim: (launch.block, 1, 1),
            shared_mem_bytes: launch.shared_mem_bytes,
        };
        // SAFETY: the `*_launch` function checked every buffer's length against the shapes it
        // passes and built the arguments in the order and types of the kernel's parameters
        // (which the CPU emulation of the kernels checks, tests/kernels_host.rs); the buffers'
        // addresses come from views that outlive the launch's enqueueing.
        unsafe { builder.launch(cfg) }.map_err(|e| Error::cuda(op, e))?;
        Ok(())
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

/// The `n, h, w, c` of an NHWC tensor as the kernels' `int`s (each > 0).
fn nhwc_args(op: &str, n: usize, h: usize, w: usize, c: usize) -> Result<[i32; 4]> {
    Ok([
        dim(op, "n", n)?,
        dim(op, "h", h)?,
        dim(op, "w", w)?,
        dim(op, "c", c)?,
    ])
}

/// An element count for a `long long` parameter: > 0.
fn count_arg(op: &str, n: usize) -> Result<i64> {
    if n == 0 {
        return Err(invalid(op, "n must be > 0".into()));
    }
    i64::try_from(n).map_err(|_| invalid(op, format!("n={n} is too large")))
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

/// Kernels that copy a buffer in 16-byte chunks need its device address 16-byte aligned: an
/// error naming the first of `ptrs` (name, address) that is not.
fn aligned16(op: &str, ptrs: &[(&str, u64)]) -> Result<()> {
    match ptrs.iter().find(|(_, p)| p % 16 != 0) {
        Some((what, p)) => Err(invalid(
            op,
            format!("{what} at {p:#x} is not 16-byte aligned"),
        )),
        None => Ok(()),
    }
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

#[cfg(test)]
mod tests {
    /// `SCORECAM_SKIP_KERNELS`: conv kernel names, comma- or space-separated; anything else
    /// (a typo, a kernel that is no conv) an error naming it.
    #[test]
    fn skipped_kernels_are_conv_kernels_of_this_build() {
        assert_eq!(skipped_kernels(None).unwrap(), Vec::<&str>::new());
        assert_eq!(skipped_kernels(Some(" ,")).unwrap(), Vec::<&str>::new());
        assert_eq!(
            skipped_kernels(Some("conv3x3_block1_pool_wg2, conv3x3_wg_m256n128")).unwrap(),
            ["conv3x3_block1_pool_wg2", "conv3x3_wg_m256n128"]
        );
        for bad in ["conv3x3_wg_m256", "masks"] {
            let e = skipped_kernels(Some(bad)).unwrap_err().to_string();
            assert!(
                e.contains(&format!("`{bad}`")) && e.contains("conv3x3_cin8"),
                "{e}"
            );
        }
    }

    use super::*;

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

    /// The pure launches refuse what the kernels cannot take, naming the kernel and the cause.
    #[test]
    fn launches_reject_bad_arguments() {
        let l = LaunchLimits {
            sm_count: 132,
            masks_smem: SMEM_DEFAULT,
            conv_smem: 232448,
            wgmma: true,
        };
        let fails = |r: Result<KernelLaunch>, words: &[&str]| match r {
            Err(Error::Invalid(m)) => {
                assert!(words.iter().all(|w| m.contains(w)), "{m} lacks {words:?}")
            }
            other => panic!("{words:?}: {other:?}"),
        };
        fails(
            maxpool2_launch(8, 2, [1, 1, 8, 1], &l),
            &["maxpool2", "1×8"],
        );
        fails(
            maxpool2_launch(64, 15, [1, 8, 8, 1], &l),
            &["`y` has 15", "need 16"],
        );
        fails(
            maxpool2_e4m3_launch(63, 16, [1, 8, 8, 1], &l),
            &["maxpool2_e4m3", "`x`"],
        );
        fails(relu_f16_launch(10, 0, &l), &["relu_f16", "n must be > 0"]);
        fails(fill_uniform_f16_launch(4, 4, 0, 2.0, 1.0, &l), &["[2, 1)"]);
        fails(fp8_scales_launch(1, 1, 8, 1, 0.5), &["margin 0.5"]);
        fails(fp8_scales_launch(1, 1, 7, 1, 2.0), &["`scales` has 7"]);
        fails(
            preprocess_launch(12, 16, 2, [0.0; 3], [1.0, 0.0, 1.0], 4, &l),
            &["preprocess", "std"],
        );
        fails(scores_launch(10, 2, 4, 2, 5, 2, true), &["`targets` has 2"]);
        fails(
            upsample_relu_normalize_launch(4, 4, 0, 2, 2, 2, false),
            &["`flat` has 0"],
        );
        let shape = MasksShape {
            b: 1,
            s: 4,
            h: 2,
            w: 2,
            k: 1,
            cpad: 4,
        };
        let masks = |eps: f32, variant: MaskVariant| {
            masks_launch(64, 4, 3, 64, shape, false, eps, variant, &l, &|_, _| 1)
        };
        fails(masks(f32::NAN, MaskVariant::default()), &["eps NaN"]);
        let noisy = MaskVariant {
            sigma: -1.0,
            ..MaskVariant::default()
        };
        fails(masks(0.0, noisy), &["sigma -1"]);
        assert_eq!(masks(0.0, MaskVariant::default()).unwrap().kernel, "masks");
        // A good launch: one grid-stride grid per 256 units, at most 32 blocks per SM.
        let ok = relu_f16_launch(1 << 30, 1 << 30, &l).unwrap();
        assert_eq!((ok.grid, ok.block), (132 * 32, BLOCK));
        assert_eq!(ok.args, vec![KernelArg::Write(0), KernelArg::I64(1 << 30)]);
    }
}
