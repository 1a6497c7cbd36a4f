//! Launchers for kernels/conv_wg.cu: a 3×3 conv + bias (+ ReLU) by Hopper's wgmma.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use half::f16;

use super::{invalid, need, nhwc_args, prod, KernelArg, KernelLaunch, Kernels, LaunchLimits};
use crate::error::Result;

/// Input channels per pipeline stage (64 bytes of FP16 per pixel): `cin` must be a multiple.
pub const CONV_WG_CIN_STEP: usize = 32;
/// Output pixels per work item.
const PIXELS_PER_ITEM: usize = 128;
/// Bytes of one stage's A operand (the kernel's `CW_A_BYTES`): 4 planes of 128 pixels × 16
/// bytes, 2080 bytes apart.
const A_BYTES: usize = 4 * 2080;

/// The two builds: N = 128 or 256 output channels per work item (a multiple of it is needed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConvWgBuild {
    N128,
    N256,
}

impl ConvWgBuild {
    pub const ALL: [ConvWgBuild; 2] = [ConvWgBuild::N128, ConvWgBuild::N256];

    /// Its kernel's `extern "C"` name.
    pub fn kernel(self) -> &'static str {
        match self {
            ConvWgBuild::N128 => "conv3x3_wg_n128",
            ConvWgBuild::N256 => "conv3x3_wg_n256",
        }
    }

    /// Output channels per work item.
    pub fn n(self) -> usize {
        match self {
            ConvWgBuild::N128 => 128,
            ConvWgBuild::N256 => 256,
        }
    }

    /// Its dynamic shared memory per block, bytes (the kernel's `CwShape::SMEM`): a ring of 12
    /// or 8 stages.
    pub fn smem(self) -> usize {
        let stages = match self {
            ConvWgBuild::N128 => 12,
            ConvWgBuild::N256 => 8,
        };
        stages * (A_BYTES + 64 * self.n())
    }

    /// The build for a layer: the wider N where `cout` is a multiple of it (each input stage then
    /// feeds twice the MMAs), else N = 128; None when the layer's shape does not fit the kernel.
    pub fn for_layer(cin: usize, cout: usize) -> Option<ConvWgBuild> {
        if cin == 0 || !cin.is_multiple_of(CONV_WG_CIN_STEP) {
            return None;
        }
        [ConvWgBuild::N256, ConvWgBuild::N128]
            .into_iter()
            .find(|b| cout > 0 && cout.is_multiple_of(b.n()))
    }
}

/// The filter as the kernel reads it: KRSC `filter` `[cout, 3, 3, cin]` rearranged into blocks
/// of one stage, `[cout / N][9·cin / 32 stages: slice s of 32 channels, then tap][4 chunks of 8
/// channels][N output channels][8]`, so that a stage's B operand is one contiguous copy in the
/// kernel's shared-memory layout. None when the lengths or shapes do not fit `build`. (Generic
/// over the element so that tests can follow indices through it.)
pub fn conv3x3_wg_pack_filter<T: Copy>(
    build: ConvWgBuild,
    filter: &[T],
    [cin, cout]: [usize; 2],
) -> Option<Vec<T>> {
    let bn = build.n();
    if ConvWgBuild::for_layer(cin, cout).is_none() || cout % bn != 0 {
        return None;
    }
    if filter.len() != cout * 9 * cin {
        return None;
    }
    let stages = 9 * cin / CONV_WG_CIN_STEP;
    let mut packed = Vec::with_capacity(filter.len());
    for nt in 0..cout / bn {
        for stage in 0..stages {
            let (slice, tap) = (stage / 9, stage % 9);
            for chunk in 0..4 {
                let c0 = slice * CONV_WG_CIN_STEP + 8 * chunk;
                for o in nt * bn..(nt + 1) * bn {
                    let at = (o * 9 + tap) * cin + c0;
                    packed.extend_from_slice(&filter[at..at + 8]);
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
    [n, h, w]: [usize; 3],
    [cin, cout]: [usize; 2],
    relu: bool,
    limits: &LaunchLimits,
) -> Result<KernelLaunch> {
    let op = build.kernel();
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
    if cin % CONV_WG_CIN_STEP != 0 || cout % build.n() != 0 {
        return Err(invalid(
            op,
            format!(
                "{cin} → {cout} channels; the kernel takes multiples of {CONV_WG_CIN_STEP} → {}",
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
    need(op, "y", y_len, prod(op, &[pixels, cout])?)?;
    let items = pixels.div_ceil(PIXELS_PER_ITEM) * (cout / build.n());
    let grid = items.clamp(1, limits.sm_count.max(1) as usize) as u32;
    use KernelArg::*;
    Ok(KernelLaunch {
        kernel: op,
        grid,
        block: 256,
        shared_mem_bytes: build.smem() as u32,
        args: vec![
            Read(0),
            Read(1),
            Read(2),
            I32(n_i),
            I32(h_i),
            I32(w_i),
            I32(cin_i),
            I32(cout_i),
            I32(relu as i32),
            Write(3),
        ],
    })
}

impl Kernels {
    /// Whether this device runs `build` of the wgmma conv: sm_90a kernels and the shared memory.
    pub fn runs_conv_wg(&self, build: ConvWgBuild) -> bool {
        self.has_wgmma() && build.smem() <= self.limits.conv_smem
    }

    /// The builds of the wgmma conv this device runs.
    pub fn conv_wg_builds(&self) -> Vec<ConvWgBuild> {
        ConvWgBuild::ALL
            .into_iter()
            .filter(|&b| self.runs_conv_wg(b))
            .collect()
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
        let op = build.kernel();
        let lens = [x.len(), wpack.len(), bias.len(), y.len()];
        let limits = LaunchLimits {
            sm_count: max_blocks.map_or(self.limits.sm_count, |b| b.min(self.limits.sm_count)),
            ..self.limits
        };
        let launch = conv3x3_wg_launch(build, lens, nhw, [cin, cout], relu, &limits)?;
        let (x_p, _x) = x.device_ptr(stream);
        let (f_p, _f) = wpack.device_ptr(stream);
        for (what, p) in [("x", x_p), ("the packed filter", f_p)] {
            if p % 16 != 0 {
                return Err(invalid(
                    op,
                    format!("{what} at {p:#x} is not 16-byte aligned"),
                ));
            }
        }
        let (b_p, _b) = bias.device_ptr(stream);
        let (y_p, _y) = y.device_ptr(stream);
        self.run(stream, &launch, &[x_p, f_p, b_p, y_p])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_fit_vgg_layers_and_the_shared_memory_of_a_hopper_block() {
        use ConvWgBuild::*;
        assert_eq!(ConvWgBuild::for_layer(64, 128), Some(N128));
        assert_eq!(ConvWgBuild::for_layer(128, 256), Some(N256));
        assert_eq!(ConvWgBuild::for_layer(512, 512), Some(N256));
        assert_eq!(ConvWgBuild::for_layer(8, 64), None);
        assert_eq!(ConvWgBuild::for_layer(64, 64), None);
        assert_eq!(ConvWgBuild::for_layer(48, 128), None);
        assert_eq!((N128.smem(), N256.smem()), (198_144, 197_632));
        assert!(ConvWgBuild::ALL.iter().all(|b| b.smem() <= 232_448));
    }

    /// Stage s of item block nt holds, at chunk c, row o, element e: filter row nt·N + o, tap
    /// s % 9, channel 32·(s / 9) + 8c + e.
    #[test]
    fn the_packed_filter_is_one_block_per_stage() {
        let (cin, cout) = (64usize, 256usize);
        let filter: Vec<usize> = (0..cout * 9 * cin).collect();
        let packed = conv3x3_wg_pack_filter(ConvWgBuild::N128, &filter, [cin, cout]).unwrap();
        let mut sorted = packed.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, filter, "a permutation");
        let stages = 9 * cin / 32;
        for (nt, s, c, o, e) in [(0, 0, 0, 0, 0), (1, 10, 3, 127, 7), (0, 17, 2, 5, 1)] {
            let at = (((nt * stages + s) * 4 + c) * 128 + o) * 8 + e;
            let want = ((nt * 128 + o) * 9 + s % 9) * cin + 32 * (s / 9) + 8 * c + e;
            assert_eq!(packed[at], want, "{nt} {s} {c} {o} {e}");
        }
        assert!(conv3x3_wg_pack_filter(ConvWgBuild::N256, &filter[1..], [cin, cout]).is_none());
        assert!(conv3x3_wg_pack_filter(ConvWgBuild::N256, &filter, [cin, 128]).is_none());
    }
}
