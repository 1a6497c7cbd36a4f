//! Launchers for kernels/fp8.cu: the input statistics, scales and quantization of the FP8
//! convolutions of `--precision fp8`.

use std::sync::Arc;

use cudarc::driver::{
    CudaFunction, CudaStream, CudaView, CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg,
};
use half::f16;

use super::{count_arg, dim, invalid, need, Kernels, BLOCK};
use crate::error::Result;

pub use crate::backend::fp8::{e4m3_from_f32, E4M3_MAX};

/// Floats per layer in `fp8_scales`' output: the descale at [`DESCALE_AT`], the multiplier at
/// [`MULTIPLIER_AT`], padding between, so that both start on 16 bytes (the alignment the cuDNN
/// graphs declare for their tensors; the multiplier is also an E4M3-output graph's scale).
pub const SCALE_STRIDE: usize = 8;
/// Offset of a layer's descale (its conv output's scale back) in its [`SCALE_STRIDE`] floats.
pub const DESCALE_AT: usize = 0;
/// Offset of a layer's multiplier (its input's quantization) in its [`SCALE_STRIDE`] floats.
pub const MULTIPLIER_AT: usize = 4;

impl Kernels {
    /// `amax[0] = max(amax[0], max |x[i]|)` over `n` f16 values (`amax` holds a non-negative f32).
    pub fn amax_abs_f16(
        &self,
        stream: &Arc<CudaStream>,
        x: &CudaView<'_, f16>,
        n: usize,
        amax: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        const OP: &str = "amax_abs_f16";
        let n_i = count_arg(OP, n)?;
        need(OP, "x", x.len(), n)?;
        need(OP, "amax", amax.len(), 1)?;
        self.launch(OP, stream, &self.amax_abs_f16, self.grid_stride(n), |lb| {
            lb.arg(x).arg(&n_i).arg(amax);
        })
    }

    /// For each of `layers` layers: `scales[8l] = amax[l]·margin / 448 · w_scale[l]` (the
    /// descale of its output), `scales[8l+4] = 448 / (amax[l]·margin)` (the quantization
    /// multiplier of its input), both 16-byte aligned for cuDNN; then `amax[l] = 0`. See
    /// [`SCALE_STRIDE`].
    pub fn fp8_scales(
        &self,
        stream: &Arc<CudaStream>,
        amax: &mut CudaViewMut<'_, f32>,
        w_scale: &CudaView<'_, f32>,
        layers: usize,
        margin: f32,
        scales: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        const OP: &str = "fp8_scales";
        let layers_i = dim(OP, "layers", layers)?;
        if !(margin.is_finite() && margin >= 1.0) {
            return Err(invalid(
                OP,
                format!("margin {margin} must be finite and ≥ 1"),
            ));
        }
        need(OP, "amax", amax.len(), layers)?;
        need(OP, "w_scale", w_scale.len(), layers)?;
        need(OP, "scales", scales.len(), SCALE_STRIDE * layers)?;
        let cfg = LaunchConfig {
            grid_dim: (layers.div_ceil(BLOCK as usize) as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let layout = [SCALE_STRIDE, DESCALE_AT, MULTIPLIER_AT].map(|v| v as i32);
        self.launch(OP, stream, &self.fp8_scales, cfg, |lb| {
            lb.arg(amax).arg(w_scale).arg(&layers_i).arg(&margin);
            lb.arg(&layout[0])
                .arg(&layout[1])
                .arg(&layout[2])
                .arg(scales);
        })
    }

    /// `out[i] = E4M3(x[i] · multiplier[0])` for i < n: saturating at ±448, round to nearest
    /// even (bits as cuda_fp8.hpp's `__NV_SATFINITE` conversion; see [`e4m3_from_f32`]).
    pub fn quantize_e4m3(
        &self,
        stream: &Arc<CudaStream>,
        x: &CudaView<'_, f16>,
        n: usize,
        multiplier: &CudaView<'_, f32>,
        out: &mut CudaViewMut<'_, u8>,
    ) -> Result<()> {
        let f = &self.quantize_e4m3;
        self.scaled_map("quantize_e4m3", f, stream, x, n, multiplier, out)
    }

    /// `out[i] = f16(value(x[i]) / multiplier[0])` for i < n: E4M3 codes back to FP16 (see
    /// [`crate::backend::fp8::e4m3_to_f32`]).
    pub fn dequantize_e4m3(
        &self,
        stream: &Arc<CudaStream>,
        x: &CudaView<'_, u8>,
        n: usize,
        multiplier: &CudaView<'_, f32>,
        out: &mut CudaViewMut<'_, f16>,
    ) -> Result<()> {
        let f = &self.dequantize_e4m3;
        self.scaled_map("dequantize_e4m3", f, stream, x, n, multiplier, out)
    }

    /// Either conversion kernel, `(x, n, multiplier, out)`: the checks and a grid-stride launch.
    fn scaled_map<'a, X: DeviceRepr, Y: DeviceRepr>(
        &self,
        op: &str,
        func: &'a CudaFunction,
        stream: &'a Arc<CudaStream>,
        x: &'a CudaView<'_, X>,
        n: usize,
        multiplier: &'a CudaView<'_, f32>,
        out: &'a mut CudaViewMut<'_, Y>,
    ) -> Result<()> {
        let n_i = count_arg(op, n)?;
        need(op, "x", x.len(), n)?;
        need(op, "multiplier", multiplier.len(), 1)?;
        need(op, "out", out.len(), n)?;
        self.launch(op, stream, func, self.grid_stride(n), |lb| {
            lb.arg(x).arg(&n_i).arg(multiplier).arg(out);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// kernels/fp8.cu's `e4m3_value`, line for line.
    fn kernel_e4m3_value(bits: u8) -> f32 {
        let bits = u32::from(bits);
        let (e, m) = ((bits >> 3) & 0xF, bits & 0x7);
        let a = if bits & 0x7F == 0x7F {
            f32::from_bits(0x7FC0_0000)
        } else if e == 0 {
            m as f32 * 0.001953125
        } else {
            f32::from_bits(((e + 120) << 23) | (m << 20))
        };
        if bits & 0x80 != 0 {
            -a
        } else {
            a
        }
    }

    #[test]
    fn the_kernel_decoding_matches_the_host() {
        for bits in 0..=u8::MAX {
            let (got, want) = (
                kernel_e4m3_value(bits),
                crate::backend::fp8::e4m3_to_f32(bits),
            );
            if want.is_nan() {
                assert!(got.is_nan(), "{bits:#04x}");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{bits:#04x}: {got} ≠ {want}");
            }
        }
    }

    /// kernels/fp8.cu's `e4m3_bits`, line for line, so its arithmetic is checked here against
    /// the float8 crate (cuda_fp8.hpp's algorithm) without a GPU.
    fn kernel_e4m3_bits(x: f32) -> u8 {
        let sign = (x.to_bits() >> 24) & 0x80;
        let mut a = x.abs();
        if a.is_nan() {
            return (sign | 0x7F) as u8;
        }
        a = a.min(448.0);
        if a < 0.015625 {
            // __float2int_rn: round half to even.
            return (sign | (a * 512.0).round_ties_even() as u32) as u8;
        }
        let bits = a.to_bits();
        let e = ((bits >> 23) & 0xFF) as i32 - 127;
        let m = bits & 0x7F_FFFF;
        let mut r = (((e + 7) as u32) << 3) | (m >> 20);
        let rem = m & 0xF_FFFF;
        if rem > 0x8_0000 || (rem == 0x8_0000 && r & 1 == 1) {
            r += 1;
        }
        (sign | r) as u8
    }

    #[test]
    fn the_kernel_conversion_matches_cuda_fp8() {
        // Every f16 value (the kernel's inputs are f16 times a scale), then a dense f32 sweep
        // with every rounding boundary of the E4M3 grid and its neighbours.
        let mut xs: Vec<f32> = (0..=u16::MAX)
            .map(|b| half::f16::from_bits(b).to_f32())
            .filter(|x| x.is_finite())
            .collect();
        for bits in 0u8..=0x7E {
            let v = float8::F8E4M3::from_bits(bits).to_f32();
            let next = float8::F8E4M3::from_bits(bits + 1).to_f32();
            let mid = if bits < 0x7E { (v + next) / 2.0 } else { 464.0 };
            for y in [
                v,
                mid,
                f32::from_bits(mid.to_bits() - 1),
                f32::from_bits(mid.to_bits() + 1),
            ] {
                xs.extend([y, -y]);
            }
        }
        xs.extend([
            1e-30,
            1e30,
            f32::MAX,
            f32::MIN_POSITIVE,
            0.0,
            -0.0,
            500.0,
            460.0,
            456.0,
        ]);
        for x in xs {
            assert_eq!(
                kernel_e4m3_bits(x),
                e4m3_from_f32(x),
                "{x:e}: kernel {:#04x}, cuda_fp8 {:#04x}",
                kernel_e4m3_bits(x),
                e4m3_from_f32(x)
            );
        }
        // Saturation, never NaN for finite values.
        assert_eq!(e4m3_from_f32(1e9), 0x7E);
        assert_eq!(e4m3_from_f32(-1e9), 0xFE);
        assert_eq!(e4m3_from_f32(f32::NAN) & 0x7F, 0x7F);
        for nan in [f32::NAN, -f32::NAN] {
            assert_eq!(kernel_e4m3_bits(nan), e4m3_from_f32(nan), "NaN sign");
        }
        assert_eq!(
            float8::F8E4M3::from_bits(e4m3_from_f32(0.3)).to_f32(),
            0.3125
        );
    }
}
