//! Every kernel of `kernels/*.cu`, run on the CPU (tests/kernel_host), against its CPU
//! reference: the kernels' logic (indexing, vector and scalar paths, grid-stride loops, block
//! reductions, shared memory) and their launchers' shapes and argument lists are checked on
//! every machine, GPU or not. What this cannot see: the GPU's own arithmetic (FMA contraction,
//! its `expf`) and timing (the GPU tests in cuda_parity.rs cover those).
//!
//! Every test runs the launchers' own launches: the pure `*_launch` functions the CUDA path
//! pushes (checks, grid, shared memory, arguments in order) are what runs here, with a device of
//! one SM so the grid-stride loops go round (`LIMITS`). Buffers start 256-byte aligned;
//! `misaligned` ones start a little later, which turns off the 16-byte vector paths.
//!
//! Needs a C++ compiler: without one the tests are reported as ignored, unless
//! `SCORECAM_REQUIRE_CXX` is truthy (CI), which makes that a failure.

mod common;
mod kernel_host;

use half::f16;
use kernel_host::{host, run_into, Arg, HostBuf};
use scorecam_gpu::backend::cpu;
use scorecam_gpu::backend::cuda::kernels::{self as k, LaunchLimits, MaskVariant, MasksShape};
use scorecam_gpu::backend::cuda::kernels::{
    kernel_names, BLOCK, DESCALE_AT, MULTIPLIER_AT, SCALE_STRIDE, SMEM_DEFAULT, SMEM_OPT_IN,
};
use scorecam_gpu::backend::cuda::nhwc_f16_to_nchw;
use scorecam_gpu::backend::fp8::{e4m3_from_f32, e4m3_to_f32, input_scale, max_e4m3};
use scorecam_gpu::backend::{splitmix64, MaskItem, MaskStyle, Noise, Semantics};

/// A device with one SM (grid-stride grids of at most 32 blocks), the default shared memory for
/// the masks kernels and the opt-in of the fused conv + pool.
const LIMITS: LaunchLimits = LaunchLimits {
    sm_count: 1,
    masks_smem: SMEM_DEFAULT,
    conv_smem: 232448,
    wgmma: true,
};

fn f16s(x: &[f32]) -> Vec<f16> {
    x.iter().map(|&v| f16::from_f32(v)).collect()
}

fn to_f32(x: &[f16]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}

/// `n·c·h·w` values from `seed`, each exact in FP16: NCHW as f32 (the CPU reference's input),
/// and NHWC as FP16 with `cs` ≥ `c` stored channels, the extra ones zero (the kernels' input).
fn nchw_and_nhwc([n, c, h, w]: [usize; 4], cs: usize, seed: u64) -> (Vec<f32>, Vec<f16>) {
    let nchw: Vec<f32> = common::values(n * c * h * w, seed)
        .iter()
        .map(|v| f16::from_f32(*v).to_f32())
        .collect();
    let mut nhwc = vec![f16::ZERO; n * h * w * cs];
    for i in 0..n {
        for ch in 0..c {
            for p in 0..h * w {
                nhwc[(i * h * w + p) * cs + ch] = f16::from_f32(nchw[(i * c + ch) * h * w + p]);
            }
        }
    }
    (nchw, nhwc)
}

/// Random conv weights `[cout, cin, 3, 3]` from `seed`, each FP16-exact (values × `scale`), and
/// the same as the kernels' KRSC FP16 filter `[cout, 3, 3, cs]`, stored channels cin.. zero (what
/// the backend uploads).
fn conv_weights([cout, cin, cs]: [usize; 3], scale: f32, seed: u64) -> (Vec<f32>, Vec<f16>) {
    let weight: Vec<f32> = common::values(cout * cin * 9, seed)
        .iter()
        .map(|v| f16::from_f32(v * scale).to_f32())
        .collect();
    let mut filter = vec![f16::ZERO; cout * 9 * cs];
    for o in 0..cout {
        for c in 0..cin {
            for t in 0..9 {
                filter[(o * 9 + t) * cs + c] = f16::from_f32(weight[(o * cin + c) * 9 + t]);
            }
        }
    }
    (weight, filter)
}

/// MaxPool2d(2, 2) (floor) of NCHW `conv` `[n, c, h, w]` rounded to FP16 first: what the unfused
/// path (a conv's FP16 output, then the pool) gives.
fn pool2_of_fp16(conv: &[f32], [n, c, h, w]: [usize; 4]) -> Vec<f32> {
    let (ph, pw) = (h / 2, w / 2);
    let mut pooled = vec![0f32; n * c * ph * pw];
    for (p, out) in pooled.iter_mut().enumerate() {
        let (plane, py, px) = (p / (ph * pw), (p / pw) % ph, p % pw);
        let v = |y: usize, x: usize| f16::from_f32(conv[(plane * h + y) * w + x]).to_f32();
        *out = v(2 * py, 2 * px)
            .max(v(2 * py, 2 * px + 1))
            .max(v(2 * py + 1, 2 * px))
            .max(v(2 * py + 1, 2 * px + 1));
    }
    pooled
}

/// Every 16-bit pattern as an FP16.
fn every_f16() -> Vec<f16> {
    (0..=u16::MAX).map(f16::from_bits).collect()
}

/// `got` equals `want` within `atol + rtol·|want|` everywhere (NaN only where `want` is NaN).
fn assert_close(got: &[f32], want: &[f32], atol: f32, rtol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = if w.is_nan() {
            g.is_nan()
        } else {
            (g - w).abs() <= atol + rtol * w.abs()
        };
        assert!(ok, "{what}: element {i}: got {g}, want {w}");
    }
}

/// Equal FP16 bit patterns, ±0 counted equal.
fn assert_same_f16(got: &[f16], want: &[f16], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let same = g.to_bits() == w.to_bits() || (g.to_f32() == 0.0 && w.to_f32() == 0.0);
        assert!(
            same,
            "{what}: element {i}: got {g} ({:#06x}), want {w} ({:#06x})",
            g.to_bits(),
            w.to_bits()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The emulation itself

fn emulation_runs_block_reductions() {
    let (blocks, threads) = (5usize, 64usize);
    let x = common::values(blocks * threads, 1);
    let xb = HostBuf::of(&x);
    let mut out = HostBuf::zeroed::<f32>(2 * blocks * threads);
    let mut args = [Arg::In(&xb), Arg::Out(&mut out)];
    host()
        .launch1(
            "host_selftest_block_sum",
            blocks as u32,
            threads as u32,
            0,
            &mut args,
        )
        .unwrap();
    let got = out.read::<f32>();
    for b in 0..blocks {
        let want: f32 = x[b * threads..][..threads].iter().sum();
        for t in 0..threads {
            let i = 2 * (b * threads + t);
            let what = format!("block {b} thread {t}");
            assert_close(&got[i..i + 2], &[want, 2.0 * want], 1e-5, 1e-5, &what);
        }
    }
}

fn emulation_shares_dynamic_memory_within_a_block() {
    let threads = 96usize;
    let mut out = HostBuf::zeroed::<f32>(threads);
    let smem = threads * 4;
    let mut args = [Arg::Out(&mut out)];
    host()
        .launch1(
            "host_selftest_dynamic_shared",
            2,
            threads as u32,
            smem,
            &mut args,
        )
        .unwrap();
    for (t, v) in out.read::<f32>().iter().enumerate() {
        assert_eq!(*v, (threads - 1 - t) as f32, "thread {t}");
    }
}

/// Shared memory is poisoned before every block, differently per schedule: a read of what no
/// thread wrote shows; a write past the dynamic part fails.
fn emulation_catches_unwritten_and_overflowing_shared_memory() {
    for dynamic in [1, 0] {
        let mut out = HostBuf::zeroed::<f32>(64);
        let e = host()
            .launch1(
                "host_selftest_unwritten_shared",
                1,
                64,
                64 * 4,
                &mut [Arg::Out(&mut out), Arg::I32(dynamic)],
            )
            .unwrap_err();
        assert!(e.contains("a missing barrier or a race"), "{e}");
    }
    let mut out = HostBuf::zeroed::<f32>(64);
    let e = host()
        .launch1(
            "host_selftest_shared_overflow",
            1,
            64,
            64 * 4,
            &mut [Arg::Out(&mut out)],
        )
        .unwrap_err();
    assert!(
        e.contains("wrote past its 256 bytes of dynamic shared memory"),
        "{e}"
    );
    let e = host()
        .launch1(
            "host_selftest_shared_overflow",
            1,
            64,
            49 * 1024,
            &mut [Arg::Out(&mut out)],
        )
        .unwrap_err();
    assert!(
        e.contains("50176 bytes of dynamic shared memory, the kernel may use 49152"),
        "{e}"
    );
}

/// Lanes that have exited do not block a shuffle; reading one gives NaN.
fn emulation_lets_exited_lanes_go() {
    let mut out = HostBuf::of(&[7.0f32; 128]);
    host()
        .launch1(
            "host_selftest_exited_lanes",
            1,
            64,
            0,
            &mut [Arg::Out(&mut out)],
        )
        .unwrap();
    let got = out.read::<f32>();
    for t in 0..64 {
        let (a, b) = (got[2 * t], got[2 * t + 1]);
        if t % 32 < 20 {
            assert_eq!(a, (t / 32 * 32) as f32, "thread {t} reads lane 0");
            assert!(b.is_nan(), "thread {t} reads an exited lane: {b}");
        } else {
            assert_eq!((a, b), (7.0, 7.0), "thread {t} exited");
        }
    }
}

fn emulation_reports_a_race() {
    let threads = 64u32;
    let mut out = HostBuf::zeroed::<f32>(threads as usize);
    let e = host()
        .launch1(
            "host_selftest_missing_barrier",
            1,
            threads,
            threads as usize * 4,
            &mut [Arg::Out(&mut out)],
        )
        .unwrap_err();
    assert!(e.contains("a missing barrier or a race"), "{e}");
}

/// cp.async writes through the generic proxy and wgmma reads through the async proxy: a wgmma
/// reading copies that no fence.proxy.async made visible fails; with the fence it computes.
fn emulation_requires_the_proxy_fence_before_wgmma() {
    // Small integers: every product and sum exact in f32.
    let a: Vec<f16> = (0..64 * 16)
        .map(|i| f16::from_f32((i % 5) as f32 - 2.0))
        .collect();
    let b: Vec<f16> = (0..128 * 16)
        .map(|i| f16::from_f32((i % 7) as f32 - 3.0))
        .collect();
    let (ab, bb) = (HostBuf::of(&a), HostBuf::of(&b));
    let smem = 2048 + 4096;
    let mut out = HostBuf::zeroed::<f32>(128 * 64);
    let mut args = [Arg::In(&ab), Arg::In(&bb), Arg::I32(1), Arg::Out(&mut out)];
    host()
        .launch1("host_selftest_wgmma_fence", 1, 128, smem, &mut args)
        .unwrap();
    // The 128 threads' accumulators cover D = A·Bᵀ once: their sum is Σ_k (Σ_m A)(Σ_n B).
    let col = |v: &[f16], rows: usize, k: usize| -> f32 {
        (0..rows).map(|r| v[16 * r + k].to_f32()).sum()
    };
    let want: f32 = (0..16).map(|k| col(&a, 64, k) * col(&b, 128, k)).sum();
    let got: f32 = out.read::<f32>().iter().sum();
    assert_eq!(got, want);
    let mut out = HostBuf::zeroed::<f32>(128 * 64);
    let mut args = [Arg::In(&ab), Arg::In(&bb), Arg::I32(0), Arg::Out(&mut out)];
    let e = host()
        .launch1("host_selftest_wgmma_fence", 1, 128, smem, &mut args)
        .unwrap_err();
    assert!(e.contains("no fence.proxy.async"), "{e}");
}

fn emulation_reports_a_deadlock() {
    let mut out = HostBuf::zeroed::<f32>(64);
    let e = host()
        .launch1(
            "host_selftest_divergent_barrier",
            1,
            64,
            0,
            &mut [Arg::Out(&mut out)],
        )
        .unwrap_err();
    assert!(
        e.contains("deadlock") && e.contains("__syncthreads") && e.contains("warp shuffle"),
        "{e}"
    );
}

fn emulation_catches_writes_outside_buffers() {
    let mut out = HostBuf::zeroed::<f32>(100);
    let e = host()
        .launch1(
            "host_selftest_write_past_end",
            1,
            128,
            0,
            &mut [Arg::Out(&mut out), Arg::I32(100)],
        )
        .unwrap_err();
    assert!(e.contains("past the end of a 400-byte buffer"), "{e}");
    let mut fine = HostBuf::zeroed::<f32>(101);
    host()
        .launch1(
            "host_selftest_write_past_end",
            1,
            128,
            0,
            &mut [Arg::Out(&mut fine), Arg::I32(100)],
        )
        .unwrap();
    let x = HostBuf::of(&[1.0f32; 4]);
    let e = host()
        .launch1("host_selftest_write_input", 1, 32, 0, &mut [Arg::In(&x)])
        .unwrap_err();
    assert!(e.contains("read-only input"), "{e}");
}

fn emulation_checks_names_and_argument_kinds() {
    let x = HostBuf::zeroed::<f16>(16);
    let e = host()
        .launch1("relu_f16", 1, BLOCK, 0, &mut [Arg::In(&x), Arg::I32(16)])
        .unwrap_err();
    assert!(
        e.contains("\"pi\" passed") && e.contains("takes \"pl\""),
        "{e}"
    );
    let mut out = HostBuf::zeroed::<f32>(128);
    let e = host()
        .launch1(
            "host_selftest_bounded",
            1,
            128,
            0,
            &mut [Arg::Out(&mut out)],
        )
        .unwrap_err();
    assert!(
        e.contains("128 threads per block, its __launch_bounds__ allow 64"),
        "{e}"
    );
    host()
        .launch1("host_selftest_bounded", 1, 64, 0, &mut [Arg::Out(&mut out)])
        .unwrap();
    // The masks kernels declare theirs (256).
    for name in ["masks", "masks_direct"] {
        let e = host().launch1(name, 1, 512, 0, &mut []).unwrap_err();
        assert!(e.contains("allow 256"), "{e}");
    }
    let e = host()
        .launch1("no_such_kernel", 1, BLOCK, 0, &mut [])
        .unwrap_err();
    assert!(e.contains("no kernel named `no_such_kernel`"), "{e}");
    let mut x = HostBuf::zeroed::<f16>(16);
    let e = host()
        .launch1(
            "relu_f16",
            1,
            2048,
            0,
            &mut [Arg::Out(&mut x), Arg::I64(16)],
        )
        .unwrap_err();
    assert!(e.contains("2048 threads per block"), "{e}");
    // Every kernel the CUDA module exports is in the CPU build.
    for name in kernel_names() {
        let e = host().launch1(name, 1, 32, 0, &mut []).unwrap_err();
        assert!(e.contains("passed, the kernel takes"), "{name}: {e}");
    }
}

// ---------------------------------------------------------------------------------------------
// preprocess.cu

fn preprocess_matches_host() {
    let s = 13usize;
    let rgb: Vec<u8> = (0..s * s * 3)
        .map(|i| (splitmix64(i as u64) >> 56) as u8)
        .collect();
    let mean = [0.485f32, 0.456, 0.406];
    let std = [0.229f32, 0.224, 0.225];
    let rgb_buf = HostBuf::of(&rgb);
    for cpad in [3usize, 4, 8] {
        for misalign in [0usize, 2] {
            let n_out = s * s * cpad;
            let out = HostBuf::misaligned(&vec![f16::from_f32(9.0); n_out], misalign);
            let launch = k::preprocess_launch(rgb.len(), n_out, s, mean, std, cpad, &LIMITS);
            let got: Vec<f16> = run_into(launch, &[&rgb_buf], out);
            let want: Vec<f16> = (0..n_out)
                .map(|i| {
                    let (p, c) = (i / cpad, i % cpad);
                    if c < 3 {
                        f16::from_f32((rgb[3 * p + c] as f32 / 255.0 - mean[c]) / std[c])
                    } else {
                        f16::ZERO
                    }
                })
                .collect();
            let what = format!("preprocess cpad {cpad} +{misalign}");
            assert_same_f16(&got, &want, &what);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// elementwise.cu

fn bias_act_f16_matches_host() {
    let rows = 37usize;
    for (cols, misalign) in [(16usize, 0usize), (16, 2), (5, 0)] {
        let y0: Vec<f16> = f16s(&common::values(rows * cols, 3))
            .iter()
            .map(|v| *v * f16::from_f32(4.0))
            .collect();
        let bias = f16s(&common::values(cols, 4));
        let bias_buf = HostBuf::misaligned(&bias, misalign);
        for relu in [false, true] {
            let mut y = HostBuf::misaligned(&y0, misalign);
            let launch = k::bias_act_f16_launch(y0.len(), cols, rows, cols, relu, &LIMITS);
            host()
                .run(&launch.unwrap(), vec![Arg::Out(&mut y), Arg::In(&bias_buf)])
                .unwrap();
            let want: Vec<f16> = y0
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    let s = v.to_f32() + bias[i % cols].to_f32();
                    f16::from_f32(if relu { s.max(0.0) } else { s })
                })
                .collect();
            let what = format!("bias_act_f16 cols {cols} +{misalign} relu {relu}");
            assert_same_f16(&y.read::<f16>(), &want, &what);
        }
    }
}

fn bias_f32_matches_host() {
    let rows = 29usize;
    for (cols, misalign) in [(8usize, 0usize), (8, 4), (3, 0)] {
        let y0 = common::values(rows * cols, 5);
        let bias = common::values(cols, 6);
        let bias_buf = HostBuf::misaligned(&bias, misalign);
        let mut y = HostBuf::misaligned(&y0, misalign);
        let launch = k::bias_f32_launch(y0.len(), cols, rows, cols, &LIMITS).unwrap();
        host()
            .run(&launch, vec![Arg::Out(&mut y), Arg::In(&bias_buf)])
            .unwrap();
        let want: Vec<f32> = y0
            .iter()
            .enumerate()
            .map(|(i, v)| v + bias[i % cols])
            .collect();
        assert_eq!(y.read::<f32>(), want, "bias_f32 cols {cols} +{misalign}");
    }
}

fn relu_f16_matches_host_on_every_value() {
    // Every FP16 value, plus a scalar tail of 3 (n % 8 != 0): more than one grid of 32 blocks.
    let mut x0 = every_f16();
    x0.extend(f16s(&[-1.0, 2.5, -0.0]));
    for misalign in [0usize, 2] {
        let mut x = HostBuf::misaligned(&x0, misalign);
        let launch = k::relu_f16_launch(x0.len(), x0.len(), &LIMITS).unwrap();
        host().run(&launch, vec![Arg::Out(&mut x)]).unwrap();
        let want: Vec<f16> = x0
            .iter()
            .map(|v| f16::from_f32(v.to_f32().max(0.0)))
            .collect();
        assert_same_f16(&x.read::<f16>(), &want, &format!("relu_f16 +{misalign}"));
    }
}

fn fill_uniform_f16_matches_host() {
    let n = 3001usize;
    let seed = 42u64;
    let (lo, hi) = (-1.5f32, 3.0f32);
    let mut x = HostBuf::zeroed::<f16>(n);
    let launch = k::fill_uniform_f16_launch(n, n, seed, lo, hi, &LIMITS).unwrap();
    host().run(&launch, vec![Arg::Out(&mut x)]).unwrap();
    let key = splitmix64(seed);
    let want: Vec<f16> = (0..n as u64)
        .map(|i| {
            let u = (splitmix64(key ^ i) >> 40) as f32 * (1.0 / 16_777_216.0);
            f16::from_f32(lo + (hi - lo) * u)
        })
        .collect();
    let got = x.read::<f16>();
    assert_same_f16(&got, &want, "fill_uniform_f16");
    assert!(got.iter().all(|v| (lo..=hi).contains(&v.to_f32())));
}

// ---------------------------------------------------------------------------------------------
// conv_cin8.cu

/// `conv3x3_cin8` against the CPU conv: partial last tiles (pixel counts not a multiple of 16),
/// rows and columns of one pixel (every tap but the centre outside), with and without ReLU, and
/// buffers off alignment (the 16-bit loads and the element-wise stores).
fn conv3x3_cin8_matches_host() {
    let (cin, cout, cs) = (3usize, k::CONV_CIN8_OUT, k::CONV_CIN8_IN);
    let (weight, filter) = conv_weights([cout, cin, cs], 0.5, 31);
    let bias = common::values(cout, 32);
    let mut saturated = 0;
    for (n, h, w, relu, misalign) in [
        (2usize, 5usize, 7usize, true, 0usize),
        (1, 9, 13, false, 0),
        (1, 4, 6, true, 2),
        (3, 1, 20, true, 0),
        (2, 20, 1, false, 2),
        // More tiles than the launch's 12 warps (one SM): each warp loops, reusing its staging.
        (2, 19, 23, true, 2),
        (1, 17, 30, false, 0),
    ] {
        let (x_nchw, x) = nchw_and_nhwc([n, cin, h, w], cs, 33 + n as u64);
        let y_len = n * h * w * cout;
        // The E4M3 output's multiplier: 150, so that the largest values saturate.
        let multiplier = 150.0f32;
        let bufs = [
            HostBuf::misaligned(&x, misalign),
            HostBuf::misaligned(&filter, misalign),
            HostBuf::misaligned(&bias, 0),
            HostBuf::misaligned(&[multiplier], 0),
        ];
        let inputs = |k: usize| bufs[..k].iter().collect::<Vec<_>>();
        let launch = k::conv3x3_cin8_launch(
            x.len(),
            filter.len(),
            bias.len(),
            y_len,
            [n, h, w],
            [cs, cout],
            relu,
            &LIMITS,
        );
        let out = HostBuf::misaligned(&vec![f16::NAN; y_len], misalign);
        let got: Vec<f16> = run_into(launch, &inputs(3), out);
        let got = nhwc_f16_to_nchw(&got, n, cout, h, w, cout);
        let mut want = vec![0f32; y_len];
        cpu::conv3x3_into(&x_nchw, n, cin, h, w, &weight, &bias, cout, relu, &mut want);
        let what = format!("conv3x3_cin8 {n}×{h}×{w} relu {relu} +{misalign}");
        assert_close(&got, &want, 2e-3, 2e-3, &what);

        // The E4M3 output: codes of value × multiplier.
        let launch = k::conv3x3_cin8_e4m3_launch(
            x.len(),
            filter.len(),
            bias.len(),
            1,
            y_len,
            [n, h, w],
            [cs, cout],
            relu,
            &LIMITS,
        );
        let out = HostBuf::misaligned(&vec![0xEEu8; y_len], misalign);
        let codes: Vec<u8> = run_into(launch, &inputs(4), out);
        let mut exact = 0;
        for i in 0..n {
            for o in 0..cout {
                for p in 0..h * w {
                    let got = codes[(i * h * w + p) * cout + o];
                    let want = e4m3_from_f32(want[(i * cout + o) * h * w + p] * multiplier);
                    // ±0 alike; else the same code, or (a sum rounded differently at a rounding
                    // boundary) the next one.
                    let (g, w) = (got & 0x7F, want & 0x7F);
                    let same = got == want || (g == 0 && w == 0);
                    let next = got & 0x80 == want & 0x80 && g.abs_diff(w) == 1;
                    assert!(
                        same || next,
                        "{what} E4M3 ({i}, {o}, {p}): {got:#04x} vs {want:#04x}"
                    );
                    exact += same as usize;
                    saturated += (w == 0x7E) as usize;
                }
            }
        }
        assert!(
            exact * 100 >= 99 * y_len,
            "{what} E4M3: {exact} of {y_len} exact"
        );
    }
    assert!(saturated > 0, "conv3x3_cin8_e4m3: no case saturates");
}

// ---------------------------------------------------------------------------------------------
// conv_pool.cu

/// Every build of the fused conv + ReLU + 2×2 max-pool (the wgmma ones too: the emulation reads
/// their B operand through the descriptor as PTX defines it) against the CPU conv, rounded to
/// FP16, then pooled: one whole tile (the second warpgroup of `Wg2` has none); odd sizes whose
/// last conv row and column the pool drops, with partial tiles on both edges, more tiles than
/// blocks (each block's halos go round several times; `Wg2`'s groups get 3 and 3, then 2 and 1);
/// the smallest input; an unaligned filter and output.
fn conv3x3_c64_pool_matches_host() {
    let c = k::CONV_POOL_C;
    let (weight, filter) = conv_weights([c, c, c], 1.0 / 8.0, 41);
    let bias = common::values(c, 42);
    // (The wgmma conv's pooled builds are conv3x3_wg_pool_matches_host's.)
    let builds = k::ConvPoolVariant::ALL
        .into_iter()
        .filter(|v| v.wg_build().is_none());
    for variant in builds {
        for (n, h, w, misalign) in [
            (1usize, 16usize, 16usize, 0usize),
            (1, 19, 35, 2),
            (1, 40, 16, 0),
            (2, 2, 3, 0),
        ] {
            let (x_nchw, x) = nchw_and_nhwc([n, c, h, w], c, 43 + h as u64);
            let mut conv = vec![0f32; n * c * h * w];
            cpu::conv3x3_into(&x_nchw, n, c, h, w, &weight, &bias, c, true, &mut conv);
            let (ph, pw) = (h / 2, w / 2);
            let want = pool2_of_fp16(&conv, [n, c, h, w]);
            let y_len = n * ph * pw * c;
            let launch = k::conv3x3_c64_pool_launch(
                variant,
                [x.len(), filter.len(), bias.len(), y_len],
                [n, h, w],
                &LIMITS,
            );
            let bufs = [
                HostBuf::misaligned(&x, 0),
                HostBuf::misaligned(&filter, misalign),
                HostBuf::misaligned(&bias, 0),
            ];
            let out = HostBuf::misaligned(&vec![f16::NAN; y_len], misalign);
            let got: Vec<f16> = run_into(launch, &bufs.iter().collect::<Vec<_>>(), out);
            let got = nhwc_f16_to_nchw(&got, n, c, ph, pw, c);
            let what = format!("{variant:?} {n}×{h}×{w} +{misalign}");
            assert_close(&got, &want, 2e-3, 2e-3, &what);
        }
    }
    // Refused: no 2×2 window, a short output, a device without the shared memory.
    let v = k::ConvPoolVariant::W4;
    let launch = |v, y: usize, nhw, limits: &LaunchLimits| {
        k::conv3x3_c64_pool_launch(v, [64 * 64, 9 * 64 * 64, 64, y], nhw, limits)
    };
    let refused =
        |v, y, nhw, limits: &LaunchLimits| launch(v, y, nhw, limits).unwrap_err().to_string();
    let e = refused(v, 64, [1, 1, 64], &LIMITS);
    assert!(e.contains("1×64"), "{e}");
    let e = refused(v, 15 * 64, [1, 8, 8], &LIMITS);
    assert!(e.contains("`y` has 960"), "{e}");
    let small = LaunchLimits {
        conv_smem: 0,
        ..LIMITS
    };
    let e = refused(v, 16 * 64, [1, 8, 8], &small);
    assert!(e.contains("shared memory"), "{e}");
    // The wgmma build without an sm_90a module; the mma builds still launch there.
    let no_wgmma = LaunchLimits {
        wgmma: false,
        ..LIMITS
    };
    let e = refused(k::ConvPoolVariant::Wg, 16 * 64, [1, 8, 8], &no_wgmma);
    assert!(e.contains("sm_90a"), "{e}");
    assert!(launch(v, 16 * 64, [1, 8, 8], &no_wgmma).is_ok());
    // A wgmma conv's pooled build is not this launcher's.
    let e = refused(k::ConvPoolVariant::WgPoolN128, 16 * 64, [1, 8, 8], &LIMITS);
    assert!(e.contains("conv3x3_wg_pool_launch"), "{e}");
}

/// The whole first block as one kernel (conv1_1 → ReLU → FP16 → conv1_2 → ReLU → 2×2 max-pool)
/// against the CPU's two convs, conv1_1's output rounded to FP16 as the unfused path stores it:
/// one whole tile; odd sizes with partial tiles on both edges (the halo's pixels outside the image
/// must be conv1_2's zero padding, not conv1_1 of zeros: relu(bias1) > 0 here) and more tiles
/// than groups on one and on two blocks; the smallest input; unaligned filters and output (the
/// 2-byte filter loads, the byte-wise stores).
fn conv3x3_block1_pool_matches_host() {
    let (cs, c) = (k::CONV_CIN8_IN, k::CONV_POOL_C);
    let (weight1, filter1) = conv_weights([c, 3, cs], 1.0 / 2.0, 61);
    let (weight2, filter2) = conv_weights([c, c, c], 1.0 / 8.0, 62);
    // Biases mostly positive, so that a halo pixel outside the image computed as conv1_1 of the
    // zero padding (relu(bias1)) instead of zero would show.
    let bias1: Vec<f32> = common::values(c, 63).iter().map(|v| v + 0.5).collect();
    let bias2 = common::values(c, 64);
    for (n, h, w, blocks, misalign) in [
        (1usize, 16usize, 16usize, 1u32, 0usize),
        (2, 37, 35, 1, 2),
        (1, 19, 50, 2, 0),
        (1, 2, 3, 1, 0),
    ] {
        let (x_nchw, x) = nchw_and_nhwc([n, 3, h, w], cs, 65 + h as u64);
        let mut conv1 = vec![0f32; n * c * h * w];
        cpu::conv3x3_into(&x_nchw, n, 3, h, w, &weight1, &bias1, c, true, &mut conv1);
        let conv1: Vec<f32> = conv1.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
        let mut conv2 = vec![0f32; n * c * h * w];
        cpu::conv3x3_into(&conv1, n, c, h, w, &weight2, &bias2, c, true, &mut conv2);
        let want = pool2_of_fp16(&conv2, [n, c, h, w]);
        let (ph, pw) = (h / 2, w / 2);
        let y_len = n * ph * pw * c;
        let limits = LaunchLimits {
            sm_count: blocks,
            ..LIMITS
        };
        let lens = [x.len(), filter1.len(), c, filter2.len(), c, y_len];
        let launch = k::conv3x3_block1_pool_launch(lens, [n, h, w], &limits);
        let bufs = [
            HostBuf::misaligned(&x, 0),
            HostBuf::misaligned(&filter1, misalign),
            HostBuf::misaligned(&bias1, 0),
            HostBuf::misaligned(&filter2, misalign),
            HostBuf::misaligned(&bias2, 0),
        ];
        let out = HostBuf::misaligned(&vec![f16::NAN; y_len], misalign);
        let got: Vec<f16> = run_into(launch, &bufs.iter().collect::<Vec<_>>(), out);
        let got = nhwc_f16_to_nchw(&got, n, c, ph, pw, c);
        let what = format!("block1 {n}×{h}×{w} on {blocks} +{misalign}");
        assert_close(&got, &want, 4e-3, 4e-3, &what);
    }
    // Refused: no 2×2 window, a short input or output, no sm_90a kernels, a device without the
    // shared memory.
    let launch = |x: usize, y: usize, nhw, limits: &LaunchLimits| {
        k::conv3x3_block1_pool_launch([x, 9 * 64 * 8, 64, 9 * 64 * 64, 64, y], nhw, limits)
    };
    let refused =
        |x, y, nhw, limits: &LaunchLimits| launch(x, y, nhw, limits).unwrap_err().to_string();
    let e = refused(64 * 8, 64, [1, 1, 64], &LIMITS);
    assert!(e.contains("1×64"), "{e}");
    let e = refused(64 * 8 - 1, 16 * 64, [1, 8, 8], &LIMITS);
    assert!(e.contains("`x` has 511"), "{e}");
    let e = refused(64 * 8, 15 * 64, [1, 8, 8], &LIMITS);
    assert!(e.contains("`y` has 960"), "{e}");
    let no_wgmma = LaunchLimits {
        wgmma: false,
        ..LIMITS
    };
    let e = refused(64 * 8, 16 * 64, [1, 8, 8], &no_wgmma);
    assert!(e.contains("sm_90a"), "{e}");
    let small = LaunchLimits {
        conv_smem: k::CONV_BLOCK1_SMEM - 1,
        ..LIMITS
    };
    let e = refused(64 * 8, 16 * 64, [1, 8, 8], &small);
    assert!(e.contains("shared memory"), "{e}");
    assert!(launch(64 * 8, 16 * 64, [1, 8, 8], &LIMITS).is_ok());
}

// ---------------------------------------------------------------------------------------------
// conv_wg.cu

/// Both builds of the wgmma conv (the emulation reads both operands through their descriptors
/// as PTX defines them) against the CPU conv: a partial item; several items per block on one
/// and on three blocks, so that the ring of stages runs on from one item into the next (items
/// spanning two images, two blocks of output channels); rows and columns of one pixel; without
/// ReLU; an output off 4-byte alignment (the element-wise stores).
fn conv3x3_wg_matches_host() {
    for (build, [cin, cout], [n, h, w], blocks, relu, misalign) in [
        (
            k::ConvWgBuild::N128,
            [64usize, 128usize],
            [1usize, 9usize, 13usize],
            1u32,
            true,
            0usize,
        ),
        (k::ConvWgBuild::N128, [32, 256], [2, 7, 10], 1, true, 0),
        (k::ConvWgBuild::N256, [32, 256], [3, 9, 11], 2, false, 2),
        (k::ConvWgBuild::N256, [64, 256], [3, 1, 20], 2, true, 0),
        (k::ConvWgBuild::N128, [32, 128], [2, 20, 1], 1, false, 2),
        // The tall builds (items of 256 pixels; the layer's own packing, N = 256 read by
        // halves): a partial item, several items on one block and on two, without ReLU.
        (k::ConvWgBuild::M256N128, [64, 128], [1, 9, 13], 1, true, 0),
        (
            k::ConvWgBuild::M256N128,
            [32, 256],
            [2, 13, 23],
            1,
            false,
            2,
        ),
        (
            k::ConvWgBuild::M256N128Pair,
            [64, 256],
            [3, 9, 11],
            2,
            true,
            0,
        ),
        (
            k::ConvWgBuild::M256N128Pair,
            [128, 128],
            [3, 9, 21],
            1,
            false,
            0,
        ),
        // The paired builds (64·k input channels): stages two at a time.
        (k::ConvWgBuild::N128Pair, [64, 128], [2, 7, 10], 1, true, 0),
        (
            k::ConvWgBuild::N256Pair,
            [128, 256],
            [3, 9, 11],
            2,
            false,
            2,
        ),
        (k::ConvWgBuild::N128Pair, [64, 256], [3, 1, 20], 3, true, 0),
    ] {
        let (weight, filter) = conv_weights([cout, cin, cin], 1.0 / 8.0, 51 + cin as u64);
        let bias = common::values(cout, 52);
        let packed = k::conv3x3_wg_pack_filter(build, &filter, [cin, cout], false).unwrap();
        let (x_nchw, x) = nchw_and_nhwc([n, cin, h, w], cin, 53 + h as u64);
        let mut want = vec![0f32; n * cout * h * w];
        cpu::conv3x3_into(&x_nchw, n, cin, h, w, &weight, &bias, cout, relu, &mut want);
        let y_len = n * h * w * cout;
        let limits = LaunchLimits {
            sm_count: blocks,
            ..LIMITS
        };
        let lens = [x.len(), packed.len(), bias.len(), y_len];
        let launch = k::conv3x3_wg_launch(build, lens, [n, h, w], [cin, cout], relu, &limits);
        let bufs = [HostBuf::of(&x), HostBuf::of(&packed), HostBuf::of(&bias)];
        let out = HostBuf::misaligned(&vec![f16::NAN; y_len], misalign);
        let got: Vec<f16> = run_into(launch, &bufs.iter().collect::<Vec<_>>(), out);
        let got = nhwc_f16_to_nchw(&got, n, cout, h, w, cout);
        let what =
            format!("{build:?} {cin}→{cout} {n}×{h}×{w} on {blocks} relu {relu} +{misalign}");
        assert_close(&got, &want, 2e-3, 2e-3, &what);
    }
    // Refused: channels that do not fit the build, a short output, no sm_90a kernels, a device
    // without the shared memory.
    let b = k::ConvWgBuild::N256;
    let launch = |c: [usize; 2], y: usize, limits: &LaunchLimits| {
        let x = 4 * 4 * c[0];
        k::conv3x3_wg_launch(b, [x, 9 * c[0] * c[1], c[1], y], [1, 4, 4], c, true, limits)
    };
    let refused = |c, y, limits: &LaunchLimits| launch(c, y, limits).unwrap_err().to_string();
    let e = refused([64, 128], 16 * 128, &LIMITS);
    assert!(e.contains("64 → 128"), "{e}");
    let e = refused([48, 256], 16 * 256, &LIMITS);
    assert!(e.contains("48 → 256"), "{e}");
    // A paired build with an odd number of stages per item (32 input channels: 9).
    let pair = |c: [usize; 2]| {
        let lens = [16 * c[0], 9 * c[0] * c[1], c[1], 16 * c[1]];
        k::conv3x3_wg_launch(k::ConvWgBuild::N256Pair, lens, [1, 4, 4], c, true, &LIMITS)
    };
    let e = pair([32, 256]).unwrap_err().to_string();
    assert!(e.contains("multiples of 64"), "{e}");
    assert!(pair([64, 256]).is_ok());
    let e = refused([64, 256], 15 * 256, &LIMITS);
    assert!(e.contains("`y` has 3840"), "{e}");
    let no_wgmma = LaunchLimits {
        wgmma: false,
        ..LIMITS
    };
    assert!(refused([64, 256], 16 * 256, &no_wgmma).contains("sm_90a"));
    let small = LaunchLimits {
        conv_smem: 100_000,
        ..LIMITS
    };
    assert!(refused([64, 256], 16 * 256, &small).contains("shared memory"));
    assert!(launch([64, 256], 16 * 256, &LIMITS).is_ok());
}

/// Both builds of the wgmma conv with the 2×2 max-pool against the CPU conv, rounded to FP16,
/// then pooled: odd sizes whose last conv row and column the pool drops, items of 32 pooled
/// pixels spanning images and running on in a block's ring, two blocks of output channels, the
/// smallest input, an output off 4-byte alignment.
fn conv3x3_wg_pool_matches_host() {
    for (build, [cin, cout], [n, h, w], blocks, misalign) in [
        (
            k::ConvWgBuild::N128,
            [64usize, 128usize],
            [2usize, 9usize, 13usize],
            1u32,
            0usize,
        ),
        (k::ConvWgBuild::N256, [32, 256], [3, 10, 7], 2, 2),
        (k::ConvWgBuild::N128, [32, 256], [2, 2, 3], 1, 0),
        (k::ConvWgBuild::N256Pair, [64, 256], [3, 10, 7], 2, 2),
        (k::ConvWgBuild::N128Pair, [128, 128], [2, 9, 13], 1, 0),
        // The tall builds (items of 64 pooled pixels): 128 outputs (one block of its own
        // packing), 256 (the N = 256 packing read by halves); several items on one block.
        (k::ConvWgBuild::M256N128, [64, 128], [2, 9, 13], 1, 0),
        (k::ConvWgBuild::M256N128, [32, 256], [3, 10, 23], 1, 2),
        (k::ConvWgBuild::M256N128Pair, [64, 256], [3, 10, 7], 2, 0),
    ] {
        let (weight, filter) = conv_weights([cout, cin, cin], 1.0 / 8.0, 71 + cin as u64);
        let bias = common::values(cout, 72);
        let packed = k::conv3x3_wg_pack_filter(build, &filter, [cin, cout], false).unwrap();
        let (x_nchw, x) = nchw_and_nhwc([n, cin, h, w], cin, 73 + h as u64);
        let mut conv = vec![0f32; n * cout * h * w];
        cpu::conv3x3_into(&x_nchw, n, cin, h, w, &weight, &bias, cout, true, &mut conv);
        let (ph, pw) = (h / 2, w / 2);
        let want = pool2_of_fp16(&conv, [n, cout, h, w]);
        let limits = LaunchLimits {
            sm_count: blocks,
            ..LIMITS
        };
        let y_len = n * ph * pw * cout;
        let lens = [x.len(), packed.len(), bias.len(), y_len];
        let launch = k::conv3x3_wg_pool_launch(build, lens, [n, h, w], [cin, cout], &limits);
        let bufs = [HostBuf::of(&x), HostBuf::of(&packed), HostBuf::of(&bias)];
        let out = HostBuf::misaligned(&vec![f16::NAN; y_len], misalign);
        let got: Vec<f16> = run_into(launch, &bufs.iter().collect::<Vec<_>>(), out);
        let got = nhwc_f16_to_nchw(&got, n, cout, ph, pw, cout);
        let what = format!("{build:?} pool {cin}→{cout} {n}×{h}×{w} on {blocks} +{misalign}");
        assert_close(&got, &want, 2e-3, 2e-3, &what);
    }
    // Refused: no 2×2 window, a short output.
    let b = k::ConvWgBuild::N128;
    let launch = |nhw: [usize; 3], y: usize| {
        let x = nhw.iter().product::<usize>() * 64;
        k::conv3x3_wg_pool_launch(b, [x, 9 * 64 * 128, 128, y], nhw, [64, 128], &LIMITS)
    };
    let e = launch([1, 1, 8], 8 * 128).unwrap_err().to_string();
    assert!(e.contains("1×8"), "{e}");
    let e = launch([1, 4, 4], 3 * 128).unwrap_err().to_string();
    assert!(e.contains("`y` has 384"), "{e}");
    assert!(launch([1, 4, 4], 4 * 128).is_ok());
}

/// The E4M3-input build against an f64 conv of the decoded codes: times the descale, + bias,
/// ReLU or not, out FP16 (within its rounding and the FP8 accumulation the device check allows,
/// 2⁻¹⁰ of Σ|x·w|: the emulation keeps 14 bits of each MMA's running sum, as Hopper does) or
/// E4M3 codes of the output times the multiplier (the same code, or the next one for a sum at a
/// rounding boundary, or within that slack; ≥ 98 % the same, some saturated): a partial item,
/// items running on in one block's ring, two blocks of output channels, rows and columns of one
/// pixel, 8 promotions of the partial sums per item; each case in both E4M3 builds, and pooled
/// (ReLU) where it has a 2×2 window. Besides, the
/// output must equal, bit for bit, the emulation's own accumulation model followed in the
/// kernel's order (promotion after every 64 channels): the device's slack, made for sums that
/// cancel, would let a kernel that never promotes pass.
fn conv3x3_wg_e4m3_matches_host() {
    let (descale, multiplier) = (0.02f32, 40.0f32);
    let fp8_accumulation = 1.0 / 1024.0; // conv_direct.rs's FP8_ACCUMULATION
    let mut saturated = 0;
    let cases = [
        (
            [64usize, 128usize],
            [1usize, 9usize, 13usize],
            1u32,
            true,
            false,
        ),
        ([64, 256], [3, 9, 11], 2, false, true),
        ([128, 128], [2, 1, 20], 1, true, true),
        ([64, 256], [2, 20, 1], 3, true, false),
        ([512, 128], [1, 4, 5], 1, false, false),
    ];
    // Each case in each build: one stage per step, and the pair (4 pairs and a single stage
    // per slice of 64 channels).
    let builds = cases
        .into_iter()
        .flat_map(|case| k::ConvWgBuild::E4M3.map(|build| (build, case)));
    for (build, ([cin, cout], [n, h, w], blocks, relu, e4m3_out)) in builds {
        let codes = |len: usize, seed: u64, scale: f32| -> Vec<u8> {
            common::values(len, seed)
                .iter()
                .map(|v| e4m3_from_f32(v * scale))
                .collect()
        };
        let x = codes(n * h * w * cin, 61 + cin as u64, 8.0);
        let filter = codes(cout * 9 * cin, 62 + cout as u64, 4.0); // KRSC
        let bias = common::values(cout, 63);
        let packed = k::conv3x3_wg_pack_filter(build, &filter, [cin, cout], true).unwrap();
        let pixels = n * h * w;
        let (mut want, mut slack) = (vec![0f32; pixels * cout], vec![0f32; pixels * cout]);
        // The emulation's own FP8 accumulation in the kernel's order: per slice of 64 channels,
        // its 9 taps, each 2 MMAs of 32 channels (exact dot products), the running sum cut to
        // 14 bits after each MMA (cuda_host.hpp's fp8_accumulate), the slice's sum then added
        // in f32. The kernel must give exactly this (a promotion missed or moved shows).
        let modelled = |p: usize, o: usize| -> f32 {
            let (img, yy, xx) = (p / (h * w), (p / w) % h, p % w);
            let mut total = 0f32;
            for slice in 0..cin / 64 {
                let mut acc = 0f32;
                for t in 0..9 {
                    let (iy, ix) = (yy + t / 3, xx + t % 3);
                    let inside = iy >= 1 && iy <= h && ix >= 1 && ix <= w;
                    for half in 0..2 {
                        let mut dot = 0f64;
                        for c in (64 * slice + 32 * half..).take(32).filter(|_| inside) {
                            let src = ((img * h + iy - 1) * w + ix - 1) * cin;
                            dot += e4m3_to_f32(x[src + c]) as f64
                                * e4m3_to_f32(filter[(o * 9 + t) * cin + c]) as f64;
                        }
                        let s = (acc as f64 + dot) as f32;
                        acc = f32::from_bits(s.to_bits() & !((1u32 << 10) - 1));
                    }
                }
                total += acc;
            }
            total * descale + bias[o]
        };
        let relu_if = |v: f32, relu: bool| if relu { v.max(0.0) } else { v };
        for p in 0..pixels {
            let (img, yy, xx) = (p / (h * w), (p / w) % h, p % w);
            for o in 0..cout {
                let (mut sum, mut magnitude) = (0f64, 0f64);
                for t in 0..9 {
                    let (iy, ix) = (yy + t / 3, xx + t % 3);
                    if iy < 1 || iy > h || ix < 1 || ix > w {
                        continue;
                    }
                    let src = ((img * h + iy - 1) * w + ix - 1) * cin;
                    for c in 0..cin {
                        let xw = e4m3_to_f32(x[src + c]) as f64
                            * e4m3_to_f32(filter[(o * 9 + t) * cin + c]) as f64;
                        sum += xw;
                        magnitude += xw.abs();
                    }
                }
                let v = (sum * descale as f64) as f32 + bias[o];
                want[p * cout + o] = if relu { v.max(0.0) } else { v };
                slack[p * cout + o] = (magnitude * (descale * fp8_accumulation) as f64) as f32;
            }
        }
        let limits = LaunchLimits {
            sm_count: blocks,
            ..LIMITS
        };
        let y_len = pixels * cout;
        let lens = [x.len(), packed.len(), bias.len(), 1, 1, y_len];
        let how = (relu, e4m3_out, false);
        let launch = k::conv3x3_wg_e4m3_launch(build, lens, [n, h, w], [cin, cout], how, &limits);
        let bufs = [
            HostBuf::of(&x),
            HostBuf::of(&packed),
            HostBuf::of(&bias),
            HostBuf::of(&[descale]),
            HostBuf::of(&[multiplier]),
        ];
        let inputs = bufs.iter().collect::<Vec<_>>();
        let what = format!("E4M3 {build:?} {cin}→{cout} {n}×{h}×{w} on {blocks} relu {relu}");
        if e4m3_out {
            let got: Vec<u8> = run_into(launch, &inputs, HostBuf::of(&vec![0xEEu8; y_len]));
            let mut exact = 0;
            for (i, (&g, &r)) in got.iter().zip(&want).enumerate() {
                let m = e4m3_from_f32(relu_if(modelled(i / cout, i % cout), relu) * multiplier);
                assert_eq!(g, m, "{what}: element {i}: {g:#04x}, modelled {m:#04x}");
                let w = e4m3_from_f32(r * multiplier);
                let (gm, wm) = (g & 0x7F, w & 0x7F);
                let same = g == w || (gm == 0 && wm == 0);
                let next = g & 0x80 == w & 0x80 && gm.abs_diff(wm) == 1;
                // A sum that cancels to near zero: its code within the accumulation's slack.
                let near = (e4m3_to_f32(g) / multiplier - r).abs() <= slack[i];
                assert!(
                    same || next || near,
                    "{what}: element {i}: {g:#04x} vs {w:#04x} (slack {})",
                    slack[i]
                );
                exact += same as usize;
                saturated += (wm == 0x7E) as usize;
            }
            assert!(
                exact * 100 >= 98 * y_len,
                "{what}: {exact} of {y_len} exact"
            );
        } else {
            let got: Vec<f16> = run_into(launch, &inputs, HostBuf::of(&vec![f16::NAN; y_len]));
            for (i, ((g, &r), &s)) in got.iter().zip(&want).zip(&slack).enumerate() {
                let m = f16::from_f32(relu_if(modelled(i / cout, i % cout), relu));
                assert_eq!(
                    g.to_bits(),
                    m.to_bits(),
                    "{what}: element {i}: got {g}, modelled {m}"
                );
                let g = g.to_f32();
                let ok = (g - r).abs() <= 2e-3 + 2e-3 * r.abs() + s;
                assert!(ok, "{what}: element {i}: got {g}, want {r} (slack {s})");
            }
        }
        // The pooled build (ReLU): the modelled outputs' 2×2 max, in the case's output type
        // (max commutes with the rounding, so it equals pooling the rounded values).
        if h < 2 || w < 2 {
            continue;
        }
        let (ph, pw) = (h / 2, w / 2);
        let pooled: Vec<f32> = (0..n * ph * pw * cout)
            .map(|i| {
                let (q, o) = (i / cout, i % cout);
                let (img, py, px) = (q / (ph * pw), (q / pw) % ph, q % pw);
                [(0, 0), (0, 1), (1, 0), (1, 1)]
                    .iter()
                    .map(|&(dy, dx)| {
                        let p = (img * h + 2 * py + dy) * w + 2 * px + dx;
                        relu_if(modelled(p, o), true)
                    })
                    .fold(f32::NEG_INFINITY, f32::max)
            })
            .collect();
        let lens = [x.len(), packed.len(), bias.len(), 1, 1, pooled.len()];
        let how = (true, e4m3_out, true);
        let launch = k::conv3x3_wg_e4m3_launch(build, lens, [n, h, w], [cin, cout], how, &limits);
        let what = format!("{what}, pooled");
        if e4m3_out {
            let got: Vec<u8> = run_into(launch, &inputs, HostBuf::of(&vec![0xEEu8; pooled.len()]));
            for (i, (&g, &v)) in got.iter().zip(&pooled).enumerate() {
                let m = e4m3_from_f32(v * multiplier);
                assert_eq!(g, m, "{what}: element {i}: {g:#04x}, modelled {m:#04x}");
            }
        } else {
            let out = HostBuf::of(&vec![f16::NAN; pooled.len()]);
            let got: Vec<f16> = run_into(launch, &inputs, out);
            for (i, (g, &v)) in got.iter().zip(&pooled).enumerate() {
                let m = f16::from_f32(v);
                assert_eq!(
                    g.to_bits(),
                    m.to_bits(),
                    "{what}: element {i}: got {g}, modelled {m}"
                );
            }
        }
    }
    assert!(saturated > 0, "no case saturates the E4M3 output");
    // Refused: input channels not a multiple of 64, missing scales, outputs not of 128, a
    // build with no E4M3 kernel; the pooled one without ReLU or a 2×2 window.
    let launch = |build, [cin, cout]: [usize; 2], [n, h, w]: [usize; 3], scales, how| {
        let (_, _, pool) = how;
        let outputs = if pool {
            n * (h / 2) * (w / 2)
        } else {
            n * h * w
        };
        let lens = [
            n * h * w * cin,
            9 * cin * cout,
            cout,
            scales,
            scales,
            outputs * cout,
        ];
        k::conv3x3_wg_e4m3_launch(build, lens, [n, h, w], [cin, cout], how, &LIMITS)
    };
    let refused = |build, chans, nhw, scales, how| {
        launch(build, chans, nhw, scales, how)
            .unwrap_err()
            .to_string()
    };
    let (n128, plain) = (k::ConvWgBuild::N128, (true, false, false));
    let e = refused(n128, [32, 256], [1, 4, 4], 1, plain);
    assert!(
        e.contains("32 → 256") && e.contains("multiples of 64"),
        "{e}"
    );
    let e = refused(n128, [64, 64], [1, 4, 4], 1, plain);
    assert!(e.contains("64 → 64"), "{e}");
    let e = refused(n128, [64, 256], [1, 4, 4], 0, plain);
    assert!(e.contains("`descale` has 0"), "{e}");
    assert!(launch(n128, [64, 256], [1, 4, 4], 1, plain).is_ok());
    let e = refused(k::ConvWgBuild::N256, [64, 256], [1, 4, 4], 1, plain);
    assert!(e.contains("no E4M3 build N256"), "{e}");
    let e = refused(n128, [64, 256], [1, 4, 4], 1, (false, false, true));
    assert!(e.contains("applies ReLU"), "{e}");
    let e = refused(n128, [64, 256], [1, 1, 8], 1, (true, false, true));
    assert!(e.contains("no 2×2 pooling window"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// pool.cu

/// `maxpool2` of FP16 NHWC `x` `[n, h, w, c]`, buffers `misalign` bytes off alignment.
fn maxpool2_on_host(x: &[f16], [n, h, w, c]: [usize; 4], misalign: usize) -> Vec<f16> {
    let n_out = n * (h / 2) * (w / 2) * c;
    let out = HostBuf::misaligned(&vec![f16::NAN; n_out], misalign);
    let launch = k::maxpool2_launch(x.len(), n_out, [n, h, w, c], &LIMITS);
    run_into(launch, &[&HostBuf::misaligned(x, misalign)], out)
}

/// `maxpool2_e4m3` of E4M3 NHWC `x` `[n, h, w, c]`, buffers `misalign` bytes off alignment.
fn maxpool2_e4m3_on_host(x: &[u8], [n, h, w, c]: [usize; 4], misalign: usize) -> Vec<u8> {
    let n_out = n * (h / 2) * (w / 2) * c;
    let out = HostBuf::misaligned(&vec![0xEEu8; n_out], misalign);
    let launch = k::maxpool2_e4m3_launch(x.len(), n_out, [n, h, w, c], &LIMITS);
    run_into(launch, &[&HostBuf::misaligned(x, misalign)], out)
}

fn maxpool2_matches_host() {
    let (n, h, w) = (2usize, 7usize, 6usize);
    for (c, misalign) in [(16usize, 0usize), (16, 2), (3, 0)] {
        let x = f16s(&common::values(n * h * w * c, 7));
        let got = maxpool2_on_host(&x, [n, h, w, c], misalign);
        let want = cpu::maxpool2(&nhwc_f16_to_nchw(&x, n, c, h, w, c), n * c, h, w);
        let got = nhwc_f16_to_nchw(&got, n, c, h / 2, w / 2, c);
        assert_eq!(got, want, "maxpool2 c {c} +{misalign}");
    }
}

fn maxpool2_e4m3_matches_host() {
    let (n, h, w) = (3usize, 6usize, 5usize);
    for (c, misalign) in [(32usize, 0usize), (16, 1), (5, 0)] {
        // Every code appears, the sign-bit ones (counted as 0) included.
        let x: Vec<u8> = (0..n * h * w * c)
            .map(|i| (splitmix64(i as u64 + 99) >> 56) as u8)
            .collect();
        let got = maxpool2_e4m3_on_host(&x, [n, h, w, c], misalign);
        let (oh, ow) = (h / 2, w / 2);
        let at = |i: usize, yy: usize, xx: usize, ch: usize| x[((i * h + yy) * w + xx) * c + ch];
        let mut want = Vec::with_capacity(got.len());
        for i in 0..n {
            for oy in 0..oh {
                for ox in 0..ow {
                    for ch in 0..c {
                        let (y0, x0) = (2 * oy, 2 * ox);
                        want.push(max_e4m3(
                            max_e4m3(at(i, y0, x0, ch), at(i, y0, x0 + 1, ch)),
                            max_e4m3(at(i, y0 + 1, x0, ch), at(i, y0 + 1, x0 + 1, ch)),
                        ));
                    }
                }
            }
        }
        assert_eq!(got, want, "maxpool2_e4m3 c {c} +{misalign}");
    }
}

fn adaptive_avgpool_matches_host() {
    let (n, c) = (2usize, 5usize);
    for (h, w, oh, ow) in [
        (9usize, 7usize, 4usize, 3usize),
        (7, 7, 7, 7),
        (2, 3, 5, 4),
        (14, 14, 7, 7),
    ] {
        let x = f16s(&common::values(n * h * w * c, 8));
        let n_out = n * oh * ow * c;
        let launch = k::adaptive_avgpool_launch(x.len(), n_out, [n, h, w, c], [oh, ow], &LIMITS);
        let got: Vec<f16> = run_into(launch, &[&HostBuf::of(&x)], HostBuf::zeroed::<f16>(n_out));
        let planes = nhwc_f16_to_nchw(&x, n, c, h, w, c);
        let want = to_f32(&f16s(&cpu::adaptive_avgpool(&planes, n * c, h, w, oh, ow)));
        let got = nhwc_f16_to_nchw(&got, n, c, oh, ow, c);
        // f32 sums in another order, then one FP16 rounding: at most an FP16 ulp apart.
        let what = format!("adaptive_avgpool {h}×{w} → {oh}×{ow}");
        assert_close(&got, &want, 1e-3, 1e-3, &what);
    }
}

// ---------------------------------------------------------------------------------------------
// fp8.cu

fn amax_abs_f16_matches_host() {
    let n = 10_000usize; // more than one grid of 32 blocks
    let mut x = common::values(n, 9);
    x[9321] = -7.25; // the largest magnitude is negative, in the grid-stride loop's second round
    let xb = HostBuf::of(&f16s(&x));
    for start in [0.5f32, 100.0] {
        let mut amax = HostBuf::of(&[start]);
        let launch = k::amax_abs_f16_launch(n, 1, n, &LIMITS).unwrap();
        host()
            .run(&launch, vec![Arg::In(&xb), Arg::Out(&mut amax)])
            .unwrap();
        assert_eq!(
            amax.read::<f32>(),
            vec![start.max(7.25)],
            "amax from {start}"
        );
    }
}

fn fp8_scales_match_host() {
    let layers = 300usize; // two blocks
    let mut amax: Vec<f32> = (0..layers).map(|l| 0.01 * l as f32).collect();
    amax[1] = 1e6; // beyond FP16: capped
    let w_scale: Vec<f32> = (0..layers).map(|l| 0.001 + 0.0001 * l as f32).collect();
    let mut amax_buf = HostBuf::of(&amax);
    let ws = HostBuf::of(&w_scale);
    let mut scales = HostBuf::of(&vec![-1.0f32; SCALE_STRIDE * layers]);
    let launch = k::fp8_scales_launch(layers, layers, SCALE_STRIDE * layers, layers, 2.0).unwrap();
    let buffers = vec![Arg::Out(&mut amax_buf), Arg::In(&ws), Arg::Out(&mut scales)];
    host().run(&launch, buffers).unwrap();
    assert!(
        amax_buf.read::<f32>().iter().all(|&a| a == 0.0),
        "amax is reset"
    );
    let got = scales.read::<f32>();
    for l in 0..layers {
        let sx = input_scale(amax[l]);
        let row = &got[SCALE_STRIDE * l..][..SCALE_STRIDE];
        assert_eq!(row[DESCALE_AT], sx * w_scale[l], "layer {l} descale");
        assert_eq!(row[MULTIPLIER_AT], 1.0 / sx, "layer {l} multiplier");
        for (j, v) in row.iter().enumerate() {
            if j != DESCALE_AT && j != MULTIPLIER_AT {
                assert_eq!(*v, -1.0, "layer {l} slot {j} untouched");
            }
        }
        assert!(row[MULTIPLIER_AT].is_finite() && row[MULTIPLIER_AT] > 0.0);
    }
}

/// `quantize_e4m3` of `x` at `multiplier`, on the CPU emulation.
fn quantize_on_host(x: &[f16], multiplier: f32) -> Vec<u8> {
    let launch = k::quantize_e4m3_launch(x.len(), 1, x.len(), x.len(), &LIMITS);
    let inputs = [&HostBuf::of(x), &HostBuf::of(&[multiplier])];
    run_into(launch, &inputs, HostBuf::zeroed::<u8>(x.len()))
}

/// `dequantize_e4m3` of `codes` at `multiplier`, the codes `misalign` bytes off alignment.
fn dequantize_on_host(codes: &[u8], multiplier: f32, misalign: usize) -> Vec<f16> {
    let n = codes.len();
    let launch = k::dequantize_e4m3_launch(n, 1, n, n, &LIMITS);
    let inputs = [
        &HostBuf::misaligned(codes, misalign),
        &HostBuf::of(&[multiplier]),
    ];
    run_into(launch, &inputs, HostBuf::of(&vec![f16::from_f32(9.0); n]))
}

fn same_e4m3(a: u8, b: u8) -> bool {
    a == b || (e4m3_to_f32(a).is_nan() && e4m3_to_f32(b).is_nan())
}

fn quantize_e4m3_matches_host_on_every_fp16() {
    let x = every_f16();
    for multiplier in [1.0f32, 37.5, 0.013] {
        for (i, (&got, v)) in quantize_on_host(&x, multiplier).iter().zip(&x).enumerate() {
            let want = e4m3_from_f32(v.to_f32() * multiplier);
            assert!(
                same_e4m3(got, want),
                "×{multiplier}: element {i} ({v}): got {got:#04x}, want {want:#04x}"
            );
        }
    }
}

/// The conversion at every rounding boundary of the E4M3 grid and its f32 neighbours, and at
/// the saturation: an input of 1 times a multiplier of x is exactly x.
fn quantize_e4m3_rounds_like_cuda_fp8() {
    let mut xs = Vec::new();
    for bits in 0u8..=0x7E {
        let v = e4m3_to_f32(bits);
        let mid = if bits < 0x7E {
            (v + e4m3_to_f32(bits + 1)) / 2.0
        } else {
            464.0
        };
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
    let one = [f16::ONE];
    for x in xs {
        let got = quantize_on_host(&one, x)[0];
        let want = e4m3_from_f32(x);
        assert!(
            same_e4m3(got, want),
            "{x:e}: kernel {got:#04x}, cuda_fp8 {want:#04x}"
        );
    }
    // Saturation, never NaN for finite values.
    assert_eq!(quantize_on_host(&one, 1e9)[0], 0x7E);
    assert_eq!(quantize_on_host(&one, -1e9)[0], 0xFE);
    assert_eq!(quantize_on_host(&[f16::NAN], 1.0)[0], 0x7F);
    // An FP16 NaN of either sign reads as the canonical (positive) f32 NaN, as the GPU's
    // FP16 conversion gives it: 0x7F.
    assert_eq!(quantize_on_host(&[-f16::NAN], 1.0)[0], 0x7F);
}

fn dequantize_e4m3_matches_host_on_every_code() {
    let codes: Vec<u8> = (0..=255).collect();
    for (multiplier, misalign) in [(1.0f32, 0usize), (2.5, 1), (1.0 / 448.0, 0)] {
        let want: Vec<f16> = codes
            .iter()
            .map(|&b| f16::from_f32(e4m3_to_f32(b) / multiplier))
            .collect();
        let got = dequantize_on_host(&codes, multiplier, misalign);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let same = g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan());
            assert!(same, "×{multiplier}: code {i:#04x}: got {g}, want {w}");
        }
    }
}

/// The FP8 forward keeps activations E4M3 through a max-pool: with the real kernels, quantize →
/// E4M3 pool → dequantize equals FP16 pool → quantize → dequantize (post-ReLU values, −0 and
/// the saturation included).
fn e4m3_pooling_commutes_with_quantization() {
    let (n, h, w, c) = (2usize, 8usize, 6usize, 32usize);
    let mut x: Vec<f32> = common::values(n * h * w * c, 16)
        .iter()
        .map(|v| (v * 3.0).max(0.0))
        .collect();
    x[5] = -0.0;
    x[77] = 1e4; // saturates at 448 / multiplier
    let x = f16s(&x);
    let multiplier = 37.0f32;
    let shape = [n, h, w, c];
    // E4M3 all the way.
    let codes = maxpool2_e4m3_on_host(&quantize_on_host(&x, multiplier), shape, 0);
    let chained = dequantize_on_host(&codes, multiplier, 0);
    // FP16 pool first.
    let codes = quantize_on_host(&maxpool2_on_host(&x, shape, 0), multiplier);
    let direct = dequantize_on_host(&codes, multiplier, 0);
    assert_same_f16(&chained, &direct, "E4M3 pool vs FP16 pool");
    let saturated = f16::from_f32(448.0 / multiplier);
    assert!(
        chained.contains(&saturated),
        "the saturated value is pooled"
    );
}

// ---------------------------------------------------------------------------------------------
// scores.cu

fn scores_match_host() {
    let (b, c, t) = (11usize, 1000usize, 3usize);
    let logits: Vec<f32> = common::values(b * c, 10).iter().map(|v| v * 8.0).collect();
    let mut targets: Vec<u32> = (0..b * t)
        .map(|i| (splitmix64(i as u64) % c as u64) as u32)
        .collect();
    targets[4] = c as u32; // out of range: NaN
    let lb = HostBuf::of(&logits);
    let tb = HostBuf::of(&targets);
    for probability in [true, false] {
        let launch = k::scores_launch(b * c, b * t, b * t, b, c, t, probability);
        let got: Vec<f32> = run_into(launch, &[&lb, &tb], HostBuf::zeroed::<f32>(b * t));
        let mut want = Vec::with_capacity(b * t);
        for r in 0..b {
            let row = &logits[r * c..][..c];
            for &tg in &targets[r * t..][..t] {
                want.push(if tg as usize >= c {
                    f32::NAN
                } else {
                    cpu::score_rows(row, c, &[tg], probability)[0]
                });
            }
        }
        let what = format!("scores probability {probability}");
        assert_close(&got, &want, 1e-9, 1e-5, &what);
    }
}

// ---------------------------------------------------------------------------------------------
// combine.cu

fn weighted_channel_sum_matches_host() {
    let (h, w) = (17usize, 19usize); // 323 pixels, a warp each: more than 32 blocks of 8 warps
    for (kk, misalign) in [(64usize, 0usize), (64, 2), (37, 0)] {
        let acts = f16s(&common::values(h * w * kk, 11));
        let weights = common::values(kk, 12);
        let ab = HostBuf::misaligned(&acts, misalign);
        let wb = HostBuf::of(&weights);
        for relu in [false, true] {
            let launch =
                k::weighted_channel_sum_launch(acts.len(), kk, h * w, h, w, kk, relu, &LIMITS);
            let got: Vec<f32> = run_into(launch, &[&ab, &wb], HostBuf::zeroed::<f32>(h * w));
            let want: Vec<f32> = (0..h * w)
                .map(|p| {
                    let s: f64 = (0..kk)
                        .map(|i| weights[i] as f64 * acts[p * kk + i].to_f32() as f64)
                        .sum();
                    if relu {
                        s.max(0.0) as f32
                    } else {
                        s as f32
                    }
                })
                .collect();
            let what = format!("weighted_channel_sum k {kk} +{misalign} relu {relu}");
            assert_close(&got, &want, 1e-5, 1e-5, &what);
        }
    }
}

/// `upsample_relu_normalize` of `low` on the emulation: (map, flat).
fn map_on_host(low: &[f32], h: usize, w: usize, s: usize, ac: bool) -> (Vec<f32>, u32) {
    let lb = HostBuf::of(low);
    let mut out = HostBuf::of(&vec![5.0f32; s * s]);
    let mut flat = HostBuf::of(&[7u32]);
    let launch = k::upsample_relu_normalize_launch(low.len(), s * s, 1, h, w, s, ac).unwrap();
    host()
        .run(
            &launch,
            vec![Arg::In(&lb), Arg::Out(&mut out), Arg::Out(&mut flat)],
        )
        .unwrap();
    (out.read::<f32>(), flat.read::<u32>()[0])
}

fn upsample_relu_normalize_matches_host() {
    // The last plane does not fit in shared memory: read from global memory.
    for (h, w, s, ac) in [
        (7usize, 7usize, 224usize, false),
        (5, 9, 40, true),
        (120, 100, 33, false),
    ] {
        let low: Vec<f32> = common::values(h * w, 13);
        let (got, flat) = map_on_host(&low, h, w, s, ac);
        let mut want = cpu::upsample_bilinear(&low, h, w, s, ac);
        cpu::relu(&mut want);
        let want_flat = cpu::normalize_min_max(&mut want);
        assert_close(&got, &want, 1e-5, 1e-4, &format!("map {h}×{w} → {s}"));
        assert_eq!(flat, want_flat as u32);
    }
    // All negative: ReLU makes it flat, the map is zeros.
    let (got, flat) = map_on_host(&[-1.0f32; 16], 4, 4, 8, false);
    assert_eq!(got, vec![0.0; 64]);
    assert_eq!(flat, 1);
}

// ---------------------------------------------------------------------------------------------
// masks.cu

#[derive(Clone, Copy, Debug)]
struct MasksCase {
    h: usize,
    w: usize,
    s: usize,
    cpad: usize,
    style: MaskStyle,
    /// The device the launch is shaped for: its SMs set the blocks per item, its shared memory
    /// budget the kernel (separable when plane and rows fit, else the plane alone, else none).
    limits: LaunchLimits,
    misalign: usize,
    /// The kernel the launcher must pick.
    want_kernel: &'static str,
    /// Fewer blocks than the launcher's (items × blocks per item): the kernel's grid-stride loop
    /// over items, which must give the same masks with any grid.
    grid: Option<u32>,
}

fn run_masks_case(case: MasksCase) {
    let MasksCase {
        h,
        w,
        s,
        cpad,
        style,
        ..
    } = case;
    let (n_img, kk) = (2usize, 6usize);
    let mut acts = common::values(n_img * h * w * kk, 14);
    for p in 0..h * w {
        acts[p * kk + 1] = 0.3; // image 0, channel 1: constant (a degenerate mask)
        acts[(h * w + p) * kk + 2] = 0.0; // image 1, channel 2: all zero
    }
    let acts = f16s(&acts);
    let mut images = f16s(&common::values(n_img * s * s * cpad, 15));
    for (i, v) in images.iter_mut().enumerate() {
        if i % cpad >= 3 {
            *v = f16::ZERO;
        }
    }
    // Out of range: image 2, channel 6.
    let items: Vec<MaskItem> = [
        (0, 0, 0),
        (1, 5, 1),
        (0, 1, 2),
        (1, 2, 0),
        (1, 3, 3),
        (2, 0, 0),
        (0, 6, 0),
    ]
    .iter()
    .map(|&(image, channel, sample)| MaskItem {
        image,
        channel,
        sample,
    })
    .collect();
    let b = items.len();
    let item_words: Vec<u32> = items
        .iter()
        .flat_map(|m| [m.image, m.channel, m.sample])
        .collect();
    let ib = HostBuf::misaligned(&images, case.misalign);
    let ab = HostBuf::of(&acts);
    let itb = HostBuf::of(&item_words);
    let per_item = s * s * cpad;
    let mut out = HostBuf::misaligned(&vec![f16::NAN; b * per_item], case.misalign);
    let variant = MaskVariant {
        lowres_stats: style.sem.lowres_stats(),
        scale: style.scale,
        sigma: style.noise.map_or(0.0, |n| n.sigma),
        seed: style.noise.map_or(0, |n| n.seed),
    };
    let launch = k::masks_launch(
        images.len(),
        acts.len(),
        item_words.len(),
        b * per_item,
        MasksShape {
            b,
            s,
            h,
            w,
            k: kk,
            cpad,
        },
        style.sem.align_corners(),
        style.sem.mask_eps(),
        variant,
        &case.limits,
        &|_, _| 2,
    )
    .unwrap();
    assert_eq!(launch.kernel, case.want_kernel, "{case:?}");
    let mut launch = launch;
    if let Some(grid) = case.grid {
        assert!(
            grid < launch.grid,
            "{case:?}: the launcher's grid is {}",
            launch.grid
        );
        launch.grid = grid;
    }
    let buffers = vec![
        Arg::In(&ib),
        Arg::In(&ab),
        Arg::In(&itb),
        Arg::Out(&mut out),
    ];
    host()
        .run(&launch, buffers)
        .unwrap_or_else(|e| panic!("{case:?}: {e}"));
    let got = to_f32(&out.read::<f16>());

    let acts = to_f32(&acts);
    let images = to_f32(&images);
    for (i, item) in items.iter().enumerate() {
        let (img, ch) = (item.image as usize, item.channel as usize);
        let mut want = vec![0f32; per_item];
        if img < n_img && ch < kk {
            let plane: Vec<f32> = (0..h * w)
                .map(|p| acts[(img * h * w + p) * kk + ch])
                .collect();
            let m = cpu::styled_mask(&plane, h, w, s, style, item);
            for p in 0..s * s {
                for c in 0..3 {
                    let v = images[img * per_item + p * cpad + c] * m[p];
                    want[p * cpad + c] = f16::from_f32(v).to_f32();
                }
            }
        }
        let what = format!("{case:?} ({} blocks), item {i} {item:?}", launch.grid);
        // f32 mask arithmetic in another order, then one FP16 rounding.
        assert_close(&got[i * per_item..][..per_item], &want, 2e-3, 2e-3, &what);
    }
}

/// A device with `sm_count` SMs and `smem` bytes of shared memory for the masks kernels.
fn device(sm_count: u32, smem: usize) -> LaunchLimits {
    LaunchLimits {
        sm_count,
        masks_smem: smem,
        conv_smem: 232448,
        wgmma: true,
    }
}

fn masks_match_host() {
    let official = MaskStyle::from(Semantics::Official);
    let cases = [
        // VGG16's own shape (14×14 → 224) on an H100/H200-sized device (132 SMs, the opt-in
        // shared memory): few items, so 28 blocks share each (the launch the GPU gets).
        (
            14,
            14,
            224,
            8,
            official,
            device(132, SMEM_OPT_IN),
            0,
            "masks",
        ),
        // Scaled down, on a device with room for one block per item.
        (14, 14, 56, 8, official, device(8, SMEM_DEFAULT), 0, "masks"),
        // Few items for the device: several blocks per item.
        (5, 7, 40, 8, official, device(16, SMEM_DEFAULT), 0, "masks"),
        (7, 7, 33, 4, official, device(16, SMEM_DEFAULT), 0, "masks"),
        (7, 7, 33, 3, official, device(1, SMEM_DEFAULT), 0, "masks"),
        // Unaligned rows: the half-by-half writes.
        (7, 7, 24, 8, official, device(1, SMEM_DEFAULT), 2, "masks"),
        // Too little shared memory for the rows, then for the plane.
        (
            6,
            5,
            29,
            8,
            official,
            device(16, 6 * 5 * 4),
            0,
            "masks_direct",
        ),
        (6, 5, 29, 4, official, device(1, 64), 0, "masks_direct"),
    ];
    for (h, w, s, cpad, style, limits, misalign, want_kernel) in cases {
        run_masks_case(MasksCase {
            h,
            w,
            s,
            cpad,
            style,
            limits,
            misalign,
            want_kernel,
            grid: None,
        });
    }
}

fn masks_variants_match_host() {
    let styles = [
        MaskStyle::from(Semantics::ChannelSoftmax),
        MaskStyle::from(Semantics::Torchcam),
        // IS-CAM's scale, SS-CAM's noise.
        MaskStyle {
            sem: Semantics::Torchcam,
            scale: 0.4,
            noise: None,
        },
        MaskStyle {
            sem: Semantics::Torchcam,
            scale: 1.0,
            noise: Some(Noise {
                seed: 7,
                sigma: 0.3,
            }),
        },
        MaskStyle {
            sem: Semantics::Official,
            scale: 1.0,
            noise: Some(Noise {
                seed: 8,
                sigma: 0.1,
            }),
        },
    ];
    let (h, w, s) = (7usize, 6usize, 35usize);
    let modes = [
        (SMEM_DEFAULT, "masks"),
        (h * w * 4, "masks_direct"),
        (0, "masks_direct"),
    ];
    for style in styles {
        for (smem, want_kernel) in modes {
            // The launcher's grid, then five blocks for all the items (each loops over several).
            for grid in [None, Some(5)] {
                run_masks_case(MasksCase {
                    h,
                    w,
                    s,
                    cpad: 8,
                    style,
                    limits: device(4, smem),
                    misalign: 0,
                    want_kernel,
                    grid,
                });
            }
        }
    }
}

/// The tests, each named after its function, each needing a C++ compiler.
macro_rules! trials {
    ($($test:ident),* $(,)?) => {
        vec![$(common::trial(stringify!($test), &[common::Need::Cxx], $test)),*]
    };
}

fn main() -> std::process::ExitCode {
    common::run_tests(trials![
        emulation_runs_block_reductions,
        emulation_shares_dynamic_memory_within_a_block,
        emulation_catches_unwritten_and_overflowing_shared_memory,
        emulation_lets_exited_lanes_go,
        emulation_reports_a_race,
        emulation_requires_the_proxy_fence_before_wgmma,
        emulation_reports_a_deadlock,
        emulation_catches_writes_outside_buffers,
        emulation_checks_names_and_argument_kinds,
        preprocess_matches_host,
        bias_act_f16_matches_host,
        bias_f32_matches_host,
        relu_f16_matches_host_on_every_value,
        fill_uniform_f16_matches_host,
        conv3x3_cin8_matches_host,
        conv3x3_c64_pool_matches_host,
        conv3x3_block1_pool_matches_host,
        conv3x3_wg_matches_host,
        conv3x3_wg_e4m3_matches_host,
        conv3x3_wg_pool_matches_host,
        maxpool2_matches_host,
        maxpool2_e4m3_matches_host,
        adaptive_avgpool_matches_host,
        amax_abs_f16_matches_host,
        fp8_scales_match_host,
        quantize_e4m3_matches_host_on_every_fp16,
        quantize_e4m3_rounds_like_cuda_fp8,
        dequantize_e4m3_matches_host_on_every_code,
        e4m3_pooling_commutes_with_quantization,
        scores_match_host,
        weighted_channel_sum_matches_host,
        upsample_relu_normalize_matches_host,
        masks_match_host,
        masks_variants_match_host,
    ])
}
