//! Launcher for kernels/conv_cin8.cu.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use half::f16;

use super::{invalid, need, nhwc_args, prod, KernelArg, KernelLaunch, Kernels, LaunchLimits};
use crate::error::Result;

/// Input channels as stored (3 real, the rest zero: the backend's `CPAD`) and output channels
/// the kernel is written for.
pub const CONV_CIN8_IN: usize = 8;
pub const CONV_CIN8_OUT: usize = 64;
/// Warps per block (the kernel's `CONV8_WARPS`) and blocks per SM (its `__launch_bounds__`).
const WARPS: usize = 4;
const BLOCKS_PER_SM: u32 = 3;

/// `conv3x3_cin8`: conv 3×3, stride 1, pad 1 of `x` `[n, h, w, 8]` with `filter` KRSC
/// `[64, 3, 3, 8]` FP16, + `bias` `[64]` f32, + ReLU when `relu`, into `y` `[n, h, w, 64]` FP16.
/// One warp per tile of 16 output pixels (grid-stride), as many blocks as stay resident.
/// Buffers: `[x, filter, bias, y]`, lengths in elements.
pub fn conv3x3_cin8_launch(
    x_len: usize,
    filter_len: usize,
    bias_len: usize,
    y_len: usize,
    nhw: [usize; 3],
    channels: [usize; 2],
    relu: bool,
    limits: &LaunchLimits,
) -> Result<KernelLaunch> {
    let lens = [x_len, filter_len, bias_len, y_len];
    conv_cin8_any("conv3x3_cin8", lens, None, (nhw, channels, relu), limits)
}

/// `conv3x3_cin8_e4m3`: the same with an E4M3 output, `y` `[n, h, w, 64]` bytes: each value
/// times `multiplier[0]` (the next FP8 conv's input multiplier), saturating. Buffers: `[x,
/// filter, bias, multiplier, y]`.
pub fn conv3x3_cin8_e4m3_launch(
    x_len: usize,
    filter_len: usize,
    bias_len: usize,
    multiplier_len: usize,
    y_len: usize,
    nhw: [usize; 3],
    channels: [usize; 2],
    relu: bool,
    limits: &LaunchLimits,
) -> Result<KernelLaunch> {
    let lens = [x_len, filter_len, bias_len, y_len];
    let shape = (nhw, channels, relu);
    conv_cin8_any(
        "conv3x3_cin8_e4m3",
        lens,
        Some(multiplier_len),
        shape,
        limits,
    )
}

/// Either kernel's launch: the checks, the grid, and the arguments `x, filter, bias, n, h, w,
/// relu, [multiplier,] y` (the multiplier buffer, when there is one, before `y`).
fn conv_cin8_any(
    op: &'static str,
    lens: [usize; 4],
    multiplier_len: Option<usize>,
    (nhw, channels, relu): ([usize; 3], [usize; 2], bool),
    limits: &LaunchLimits,
) -> Result<KernelLaunch> {
    if let Some(len) = multiplier_len {
        need(op, "multiplier", len, 1)?;
    }
    let (grid, [n, h, w]) = conv_cin8_shape(op, lens, nhw, channels, limits)?;
    use KernelArg::*;
    let mut args = vec![
        Read(0),
        Read(1),
        Read(2),
        I32(n),
        I32(h),
        I32(w),
        I32(relu as i32),
    ];
    args.extend(match multiplier_len {
        Some(_) => [Read(3), Write(4)].as_slice(),
        None => [Write(3)].as_slice(),
    });
    Ok(KernelLaunch {
        kernel: op,
        grid,
        block: (32 * WARPS) as u32,
        shared_mem_bytes: 0,
        args,
    })
}

/// Both kernels' checks (channels, lengths of `[x, filter, bias, y]` in elements) and grid.
fn conv_cin8_shape(
    op: &str,
    [x_len, filter_len, bias_len, y_len]: [usize; 4],
    [n, h, w]: [usize; 3],
    [cin_s, cout]: [usize; 2],
    limits: &LaunchLimits,
) -> Result<(u32, [i32; 3])> {
    if cin_s != CONV_CIN8_IN || cout != CONV_CIN8_OUT {
        return Err(invalid(
            op,
            format!("{cin_s} → {cout} channels; the kernel takes {CONV_CIN8_IN} → {CONV_CIN8_OUT}"),
        ));
    }
    let [n_i, h_i, w_i, _] = nhwc_args(op, n, h, w, cin_s)?;
    need(op, "x", x_len, prod(op, &[n, h, w, cin_s])?)?;
    need(op, "filter", filter_len, cout * 9 * cin_s)?;
    need(op, "bias", bias_len, cout)?;
    need(op, "y", y_len, prod(op, &[n, h, w, cout])?)?;
    let tiles = prod(op, &[n, h, w])?.div_ceil(16);
    let cap = limits.sm_count.saturating_mul(BLOCKS_PER_SM).max(1) as usize;
    Ok((tiles.div_ceil(WARPS).clamp(1, cap) as u32, [n_i, h_i, w_i]))
}

impl Kernels {
    /// Whether the device runs the tensor-core kernels (`mma.sync` m16n8k16: sm_80 and later).
    pub fn has_mma(&self) -> bool {
        self.mma
    }

    /// [`conv3x3_cin8_launch`]; an error on a GPU older than sm_80.
    ///
    /// # Safety
    /// `y` is written through a read pointer (so that the conv tuning can launch on the arena it
    /// shares, as cuDNN's launches do): nothing else may use it until the launch is done, and it
    /// must not overlap `x`.
    pub unsafe fn conv3x3_cin8<X: DevicePtr<f16>, Y: DevicePtr<f16>>(
        &self,
        stream: &Arc<CudaStream>,
        x: &X,
        filter: &CudaSlice<f16>,
        bias: &CudaSlice<f32>,
        [n, h, w]: [usize; 3],
        relu: bool,
        y: &Y,
    ) -> Result<()> {
        self.need_mma("conv3x3_cin8")?;
        let launch = conv3x3_cin8_launch(
            x.len(),
            filter.len(),
            bias.len(),
            y.len(),
            [n, h, w],
            [CONV_CIN8_IN, CONV_CIN8_OUT],
            relu,
            &self.limits,
        )?;
        let (x_p, _x) = x.device_ptr(stream);
        let (f_p, _f) = filter.device_ptr(stream);
        let (b_p, _b) = bias.device_ptr(stream);
        let (y_p, _y) = y.device_ptr(stream);
        self.run(stream, &launch, &[x_p, f_p, b_p, y_p])
    }

    /// [`conv3x3_cin8_e4m3_launch`]: the output at device address `y`, `y_len` bytes (an E4M3
    /// output takes the first bytes of an FP16 buffer, so it comes as an address).
    ///
    /// # Safety
    /// As [`Kernels::conv3x3_cin8`]; `y` must be a live device allocation of ≥ `y_len` bytes.
    pub unsafe fn conv3x3_cin8_e4m3<X: DevicePtr<f16>, M: DevicePtr<f32>>(
        &self,
        stream: &Arc<CudaStream>,
        x: &X,
        filter: &CudaSlice<f16>,
        bias: &CudaSlice<f32>,
        multiplier: &M,
        [n, h, w]: [usize; 3],
        relu: bool,
        (y, y_len): (u64, usize),
    ) -> Result<()> {
        self.need_mma("conv3x3_cin8_e4m3")?;
        let launch = conv3x3_cin8_e4m3_launch(
            x.len(),
            filter.len(),
            bias.len(),
            multiplier.len(),
            y_len,
            [n, h, w],
            [CONV_CIN8_IN, CONV_CIN8_OUT],
            relu,
            &self.limits,
        )?;
        let (x_p, _x) = x.device_ptr(stream);
        let (f_p, _f) = filter.device_ptr(stream);
        let (b_p, _b) = bias.device_ptr(stream);
        let (m_p, _m) = multiplier.device_ptr(stream);
        self.run(stream, &launch, &[x_p, f_p, b_p, m_p, y])
    }

    /// An error naming `op` on a GPU without the tensor-core `mma` the kernel uses.
    pub(super) fn need_mma(&self, op: &str) -> Result<()> {
        if self.has_mma() {
            Ok(())
        } else {
            Err(invalid(
                op,
                format!(
                    "needs sm_80 or later, the kernels are built for {}",
                    self.arch
                ),
            ))
        }
    }
}
