//! The CUDA forward's feature stages, run on the CPU: the plan `forward.rs` executes
//! (`backend::cuda::forward_plan`) is run step by step on host copies of the device's buffers —
//! the input, the two arena buffers, the FP8 input buffer, the amaxes and scales, the captured
//! activations — with every kernel step through the kernels' CPU emulation (tests/kernel_host)
//! and the convolutions by direct summation in the route's formats. The result must equal, value
//! for value, a reference that runs the same stages on whole tensors with no buffers at all.
//!
//! So the routing of the data is checked on every machine: the ping-pong arena, blocks 1–2 in
//! sub-batches, FP8 activations as E4M3 codes in the first bytes of FP16 rows (and packed after
//! a sub-batched prefix), the quantize and dequantize passes, the amaxes a base forward measures
//! over its real rows only, the FP8 scales it leaves, the pre-ReLU capture. Every arena read must
//! fall on bytes written earlier in the same forward, and spans must lie inside their buffers.
//!
//! What this cannot see: cuDNN's own numerics (the GPU tests compare those with the CPU twin).
//!
//! Needs a C++ compiler (for the kernels), like tests/kernels_host.rs.

mod common;
mod kernel_host;

use half::f16;
use kernel_host::{run_into, HostBuf};
use scorecam_gpu::backend::cuda::forward_plan::{
    self as plan, Buf, CaptureAt, FeaturePlan, Format, Fp8Forms, PlanShape, Prefix, Span,
    StageDims, StageRoute, Step,
};
use scorecam_gpu::backend::cuda::kernels::{
    self as k, LaunchLimits, DESCALE_AT, MULTIPLIER_AT, SCALE_STRIDE, SMEM_DEFAULT,
};
use scorecam_gpu::backend::cuda::{conv_filter_krsc, conv_filter_krsc_e4m3, CPAD};
use scorecam_gpu::backend::fp8::{
    capable_stages, e4m3_from_f32, e4m3_to_f32, input_scale, max_e4m3, weight_scale, MARGIN,
};
use scorecam_gpu::backend::splitmix64;
use scorecam_gpu::model::{FeatureStage, Vgg};

/// A device with one SM: the kernels' grid-stride loops go round.
const LIMITS: LaunchLimits = LaunchLimits {
    sm_count: 1,
    masks_smem: SMEM_DEFAULT,
    conv_smem: 232448,
    wgmma: true,
};

/// Input side, base-forward rows (the last one padding), real images, masked-forward rows.
const S: usize = 16;
const BASE_ROWS: usize = 3;
const IMAGES: usize = 2;
const MASK_ROWS: usize = 8;

/// A conv layer as the device holds it, decoded to f32 for the host convolution.
struct Layer {
    cin_s: usize,
    cout: usize,
    /// KRSC FP16 filter values.
    filter16: Vec<f32>,
    /// KRSC E4M3 filter values (`w / sw` on the E4M3 grid), where the stage may run FP8.
    filter8: Option<Vec<f32>>,
    w_scale: f32,
    bias16: Vec<f32>,
    bias32: Vec<f32>,
}

/// The model under test: stages, geometry, device-layout layers.
struct Net {
    model: Vgg,
    is_conv: Vec<bool>,
    capable: Vec<bool>,
    dims: Vec<StageDims>,
    layers: Vec<Option<Layer>>,
}

impl Net {
    /// conv 8→16 (FP16 only), conv 16→16, pool, conv 16→32, conv 32→32, pool | conv 32→32,
    /// pool, conv 32→16: blocks 1–2 end after the second pool.
    fn new() -> Net {
        let model = Vgg::random_from_config(&[16, 16, 0, 32, 32, 0, 32, 0, 16], &[10], 11, S);
        let capable = capable_stages(&model);
        let dims = plan::stage_dims(&model, S).unwrap();
        let mut cin_s = CPAD;
        let layers = model
            .features
            .iter()
            .zip(&capable)
            .map(|(stage, &fp8)| {
                let FeatureStage::Conv(l) = stage else {
                    return None;
                };
                let w_scale = if fp8 { weight_scale(&l.weight) } else { 1.0 };
                let filter16 = conv_filter_krsc(&l.weight, l.cout, l.cin, cin_s);
                let filter8 = fp8.then(|| {
                    conv_filter_krsc_e4m3(&l.weight, l.cout, l.cin, cin_s, w_scale)
                        .into_iter()
                        .map(e4m3_to_f32)
                        .collect()
                });
                let layer = Layer {
                    cin_s,
                    cout: l.cout,
                    filter16: filter16.iter().map(|v| v.to_f32()).collect(),
                    filter8,
                    w_scale,
                    bias16: l.bias.iter().map(|&b| round16(b)).collect(),
                    bias32: l.bias.clone(),
                };
                cin_s = l.cout;
                Some(layer)
            })
            .collect();
        Net {
            is_conv: model
                .features
                .iter()
                .map(|f| matches!(f, FeatureStage::Conv(_)))
                .collect(),
            capable,
            dims,
            layers,
            model,
        }
    }

    fn shape(&self) -> PlanShape<'_> {
        self.shape_with(&[])
    }

    /// The shape with the conv + pool pairs `fused` says run as one kernel.
    fn shape_with<'a>(&'a self, fused: &'a [bool]) -> PlanShape<'a> {
        self.shape_fused(fused, &[])
    }

    /// The same, and the FP8 convs + pools `fp8_fused` says run as one kernel (per output
    /// format).
    fn shape_fused<'a>(&'a self, fused: &'a [bool], fp8_fused: &'a [[bool; 2]]) -> PlanShape<'a> {
        PlanShape {
            is_conv: &self.is_conv,
            dims: &self.dims,
            fp8_filters: &self.capable,
            fused_pool: fused,
            fp8_fused_pool: fp8_fused,
            fused_block: &[],
        }
    }

    /// Where blocks 1–2 end, by the library's rule: stage 6.
    fn prefix_end(&self) -> usize {
        let end = plan::prefix_end(&self.model, &self.dims).expect("blocks 1–2 may be sub-batched");
        assert_eq!(end, 6);
        end
    }

    /// The scales before any base forward, as `Fp8State` starts them: descale `sw` (1 where
    /// no FP8 filter), multiplier 1.
    fn initial_scales(&self) -> Vec<Scale> {
        self.w_scales()
            .into_iter()
            .map(|sw| Scale {
                descale: sw,
                multiplier: 1.0,
            })
            .collect()
    }

    /// Per stage, the filter's scale `sw` (1 where no FP8 filter): `Fp8State::w_scale`.
    fn w_scales(&self) -> Vec<f32> {
        self.layers
            .iter()
            .map(|l| l.as_ref().map_or(1.0, |l| l.w_scale))
            .collect()
    }

    /// Values of one row of the arena (the largest stage row).
    fn row_len(&self) -> usize {
        self.dims
            .iter()
            .map(|d| d.in_len().max(d.out_len()))
            .max()
            .unwrap()
    }
}

fn round16(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

/// The FP8 scales of one stage: the conv output's descale and the input's multiplier.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Scale {
    descale: f32,
    multiplier: f32,
}

/// A 3×3 conv (pad 1) of NHWC `x` `[n, h, w, cin_s]` with a KRSC filter, each sum times `scale`
/// plus the bias, ReLU unless `identity`; f32 in one fixed order (the run and the reference
/// share it, so they agree exactly when they read the same values).
#[allow(clippy::too_many_arguments)]
fn conv3x3(
    x: &[f32],
    [n, h, w]: [usize; 3],
    layer: &Layer,
    filter: &[f32],
    scale: f32,
    bias: &[f32],
    identity: bool,
) -> Vec<f32> {
    let (cin, cout) = (layer.cin_s, layer.cout);
    assert_eq!(x.len(), n * h * w * cin, "conv input length");
    let mut y = vec![0f32; n * h * w * cout];
    for b in 0..n {
        for i in 0..h {
            for j in 0..w {
                for o in 0..cout {
                    let mut acc = 0f32;
                    for r in 0..3 {
                        for q in 0..3 {
                            let (yy, xx) = (i + r, j + q);
                            if yy < 1 || xx < 1 || yy > h || xx > w {
                                continue;
                            }
                            let px = &x[((b * h + yy - 1) * w + xx - 1) * cin..][..cin];
                            let wt = &filter[((o * 3 + r) * 3 + q) * cin..][..cin];
                            acc += px.iter().zip(wt).map(|(a, b)| a * b).sum::<f32>();
                        }
                    }
                    let v = acc * scale + bias[o];
                    y[((b * h + i) * w + j) * cout + o] = if identity { v } else { v.max(0.0) };
                }
            }
        }
    }
    y
}

/// Conv stage `stage` as `route` runs it on values `x` (decoded from the format it reads),
/// returning the output in the format it writes.
fn conv_stage(
    net: &Net,
    stage: usize,
    rows: usize,
    route: StageRoute,
    identity: bool,
    x: &[f32],
    scales: &[Scale],
) -> Activations {
    let layer = net.layers[stage].as_ref().unwrap();
    let d = net.dims[stage];
    let (filter, scale, bias) = if route.fp8 {
        let f = layer.filter8.as_ref().expect("FP8 on a capable stage");
        (f, scales[stage].descale, &layer.bias32)
    } else {
        (&layer.filter16, 1.0, &layer.bias16)
    };
    let v = conv3x3(
        x,
        [rows, d.in_h, d.in_w],
        layer,
        filter,
        scale,
        bias,
        identity,
    );
    if route.e4m3_out {
        let m = scales[route.next.expect("an E4M3 output has a reader")].multiplier;
        Activations::E4m3(v.iter().map(|&v| e4m3_from_f32(v * m)).collect())
    } else {
        Activations::F16(v.iter().map(|&v| f16::from_f32(v)).collect())
    }
}

/// A stage's activations in the format they are stored in.
#[derive(Clone, Debug)]
enum Activations {
    F16(Vec<f16>),
    E4m3(Vec<u8>),
}

impl Activations {
    /// The values, E4M3 codes as FP16 at `multiplier` (what a dequantize pass gives).
    fn dequantized(&self, multiplier: f32) -> Vec<f32> {
        match self {
            Activations::F16(v) => v.iter().map(|v| v.to_f32()).collect(),
            Activations::E4m3(c) => c
                .iter()
                .map(|&b| round16(e4m3_to_f32(b) / multiplier))
                .collect(),
        }
    }

    /// The codes an FP8 conv reads: its own, or FP16 quantized at `multiplier`.
    fn codes(&self, multiplier: f32) -> Vec<u8> {
        match self {
            Activations::F16(v) => v
                .iter()
                .map(|v| e4m3_from_f32(v.to_f32() * multiplier))
                .collect(),
            Activations::E4m3(c) => c.clone(),
        }
    }
}

/// What a reference forward gives: every stage's output (the last one the features'), the
/// captured activations, the amaxes of the FP8 stages' inputs over the real rows.
struct Reference {
    stages: Vec<Activations>,
    captured: Option<Vec<f16>>,
    amax: Vec<f32>,
}

impl Reference {
    fn out(&self) -> &Activations {
        self.stages.last().expect("a stage")
    }
}

/// The forward on whole tensors, stage after stage: no buffers, no sub-batches.
fn reference(
    net: &Net,
    x: &[f16],
    rows: usize,
    routes: Option<&[StageRoute]>,
    capture: Option<CaptureAt>,
    scales: &[Scale],
) -> Reference {
    let mut act = Activations::F16(x.to_vec());
    let mut stages = Vec::with_capacity(net.dims.len());
    let mut captured = None;
    let mut amax = vec![0f32; net.dims.len()];
    for (stage, d) in net.dims.iter().enumerate() {
        let route = routes.map_or_else(StageRoute::default, |r| r[stage]);
        let cap = capture.filter(|c| c.stage == stage);
        if let (Some(c), Activations::F16(v)) = (capture, &act) {
            if net.capable[stage] {
                let real = &v[..c.rows * d.in_len()];
                amax[stage] = real.iter().fold(0f32, |m, v| m.max(v.to_f32().abs()));
            }
        }
        act = if net.is_conv[stage] {
            let pre = cap.is_some_and(|c| c.pre_relu);
            let x: Vec<f32> = if route.fp8 {
                let codes = act.codes(scales[stage].multiplier);
                codes.into_iter().map(e4m3_to_f32).collect()
            } else {
                act.dequantized(scales[stage].multiplier)
            };
            let y = conv_stage(net, stage, rows, route, pre, &x, scales);
            if let (Some(c), Activations::F16(v)) = (cap, &y) {
                captured = Some(v[..c.rows * d.out_len()].to_vec());
            }
            match y {
                Activations::F16(v) if pre => {
                    Activations::F16(v.iter().map(|&v| v.max(f16::ZERO)).collect())
                }
                y => y,
            }
        } else {
            let pooled = match &act {
                Activations::F16(v) => {
                    Activations::F16(pool(v, rows, d, |a, b| if b > a { b } else { a }))
                }
                Activations::E4m3(c) => Activations::E4m3(pool(c, rows, d, max_e4m3)),
            };
            if let (Some(c), Activations::F16(v)) = (cap, &pooled) {
                captured = Some(v[..c.rows * d.out_len()].to_vec());
            }
            pooled
        };
        stages.push(act.clone());
    }
    Reference {
        stages,
        captured,
        amax,
    }
}

/// 2×2 max-pool of NHWC rows by `max`.
fn pool<T: Copy>(x: &[T], rows: usize, d: &StageDims, max: impl Fn(T, T) -> T) -> Vec<T> {
    let (h, w, c) = (d.in_h, d.in_w, d.in_c);
    let mut y = Vec::with_capacity(rows * d.out_len());
    for n in 0..rows {
        for i in 0..h / 2 {
            for j in 0..w / 2 {
                for ch in 0..c {
                    let at = |r: usize, q: usize| x[((n * h + 2 * i + r) * w + 2 * j + q) * c + ch];
                    y.push(max(max(at(0, 0), at(0, 1)), max(at(1, 0), at(1, 1))));
                }
            }
        }
    }
    y
}

/// The scales a base forward's amaxes give (kernels/fp8.cu's `fp8_scales`, in Rust).
fn scales_from(net: &Net, amax: &[f32]) -> Vec<Scale> {
    amax.iter()
        .zip(net.w_scales())
        .map(|(&a, sw)| {
            let sx = input_scale(a);
            Scale {
                descale: sx * sw,
                multiplier: 1.0 / sx,
            }
        })
        .collect()
}

/// What a byte of a device buffer holds, for the checks: nothing this forward may read (never
/// written, or already read by the step it was written for), an FP16 value's byte, or an E4M3
/// code at stage `s`'s multiplier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Held {
    Nothing,
    F16,
    E4m3At(usize),
}

/// The device's buffers, on the host, with what each byte holds.
struct Device<'n> {
    net: &'n Net,
    input: Vec<u8>,
    arena: [Vec<u8>; 2],
    x8: Vec<u8>,
    /// What each byte of `arena[0]`, `arena[1]` and `x8` holds.
    held: [Vec<Held>; 3],
    amax: Vec<f32>,
    w_scale: Vec<f32>,
    /// `SCALE_STRIDE` floats per stage, as `Fp8State` starts them.
    scales: Vec<f32>,
    acts: Vec<f16>,
    /// The span the last conv or pool wrote, and each full-batch stage's output at its
    /// `StageDone`: (stage, bytes, format).
    last_out: Option<Span>,
    done: Vec<(usize, Vec<u8>, Format)>,
    /// Conv stages that ran with their pool (or a fused block's two): their own outputs never
    /// existed (no `done` entry).
    fused_conv: Vec<usize>,
}

impl<'n> Device<'n> {
    /// Buffers for `rows_max` rows, the arena poisoned (0xFF: an FP16 and an E4M3 NaN).
    fn new(net: &'n Net, rows_max: usize) -> Device<'n> {
        let arena = vec![0xFFu8; 2 * rows_max * net.row_len()];
        let x8_len = (0..net.dims.len())
            .filter(|&i| net.capable[i])
            .map(|i| rows_max * net.dims[i].in_len())
            .max()
            .unwrap_or(1);
        let stages = net.dims.len();
        let mut scales = vec![0f32; SCALE_STRIDE * stages];
        for (i, s) in net.initial_scales().iter().enumerate() {
            scales[SCALE_STRIDE * i + DESCALE_AT] = s.descale;
            scales[SCALE_STRIDE * i + MULTIPLIER_AT] = s.multiplier;
        }
        Device {
            net,
            input: Vec::new(),
            held: [
                vec![Held::Nothing; arena.len()],
                vec![Held::Nothing; arena.len()],
                vec![Held::Nothing; x8_len],
            ],
            arena: [arena.clone(), arena],
            x8: vec![0xFF; x8_len],
            amax: vec![0.0; stages],
            w_scale: net.w_scales(),
            scales,
            acts: Vec::new(),
            last_out: None,
            done: Vec::new(),
            fused_conv: Vec::new(),
        }
    }

    fn scale(&self, stage: usize) -> Scale {
        Scale {
            descale: self.scales[SCALE_STRIDE * stage + DESCALE_AT],
            multiplier: self.scales[SCALE_STRIDE * stage + MULTIPLIER_AT],
        }
    }

    /// Every stage's scales now.
    fn scales(&self) -> Vec<Scale> {
        (0..self.net.dims.len()).map(|i| self.scale(i)).collect()
    }

    /// A conv step's input `x` as values, read and consumed: FP16, or E4M3 codes that must be
    /// at stage `stage`'s multiplier (`what` names the step in the error).
    fn take_values(&mut self, x: Span, stage: usize, what: &str) -> Result<Vec<f32>, String> {
        let (bytes, held) = self.read(x)?;
        if x.format == Format::E4m3 && held != Held::E4m3At(stage) {
            return Err(format!("{what} at stage {stage} reading codes of {held:?}"));
        }
        self.consume(x);
        Ok(match x.format {
            Format::E4m3 => bytes.iter().map(|&b| e4m3_to_f32(b)).collect(),
            Format::F16 => f16_values(&bytes),
        })
    }

    /// Runs `plan` on input `x`, with `acts` room for `acts_len` captured values. What an
    /// earlier forward left in the buffers stays there, but may not be read.
    fn forward(&mut self, plan: &FeaturePlan, x: &[f16], acts_len: usize) {
        self.input = bytemuck::cast_slice(x).to_vec();
        self.held.iter_mut().for_each(|h| h.fill(Held::Nothing));
        self.acts = vec![f16::from_f32(-7.0); acts_len];
        self.done.clear();
        self.last_out = None;
        self.fused_conv.clear();
        for (i, step) in plan.steps.iter().enumerate() {
            self.step(step)
                .unwrap_or_else(|e| panic!("step {i} {step:?}: {e}"));
        }
    }

    /// The first `len` values of arena buffer `out` in `format` (what the head, or the full
    /// batch after blocks 1–2, reads), all written by this forward.
    fn output(&self, out: Option<usize>, len: usize, format: Format) -> Vec<u8> {
        let span = Span {
            buf: Buf::Arena(out.expect("an output buffer")),
            at: 0,
            len,
            format,
        };
        self.read(span).expect("the output").0
    }

    /// Which of `held` tracks `buf` (None: the input, FP16 throughout).
    fn slot(buf: Buf) -> Option<usize> {
        match buf {
            Buf::Input => None,
            Buf::Arena(i) if i < 2 => Some(i),
            Buf::Arena(i) => panic!("arena buffer {i}"),
            Buf::Fp8Input => Some(2),
        }
    }

    /// The bytes of `s` and what they hold, all alike: FP16 for an FP16 span, codes at one
    /// stage's multiplier for an E4M3 one. The span must lie in its buffer, start at an even
    /// byte (the executor views spans as FP16 words) and hold what this forward wrote.
    fn read(&self, s: Span) -> Result<(Vec<u8>, Held), String> {
        even(s)?;
        let r = s.bytes();
        let data = match s.buf {
            Buf::Input => &self.input,
            Buf::Arena(i) => &self.arena[i],
            Buf::Fp8Input => &self.x8,
        };
        let bytes = data
            .get(r.clone())
            .ok_or_else(|| format!("{s:?} is outside its {}-byte buffer", data.len()))?;
        let held = match Self::slot(s.buf) {
            None => Held::F16,
            Some(k) => {
                let h = &self.held[k][r.clone()];
                let first = h.first().copied().unwrap_or(Held::Nothing);
                if let Some(at) = h.iter().position(|&b| b != first || b == Held::Nothing) {
                    return Err(format!(
                        "{s:?}: byte {} holds {:?} (this forward left {first:?} at its start)",
                        r.start + at,
                        h[at]
                    ));
                }
                first
            }
        };
        match (s.format, held) {
            (Format::F16, Held::F16) | (Format::E4m3, Held::E4m3At(_)) => {
                Ok((bytes.to_vec(), held))
            }
            _ => Err(format!("{s:?} holds {held:?}")),
        }
    }

    /// A step has read `s` for the one step its writer wrote it for: nothing may read it again.
    fn consume(&mut self, s: Span) {
        if let Some(k) = Self::slot(s.buf) {
            self.held[k][s.bytes()].fill(Held::Nothing);
        }
    }

    fn write(&mut self, s: Span, bytes: &[u8], held: Held) -> Result<(), String> {
        assert_eq!(bytes.len(), s.bytes().len(), "{s:?}: bytes written");
        even(s)?;
        let k = Self::slot(s.buf).ok_or_else(|| format!("{s:?}: the input is read-only"))?;
        let data = match s.buf {
            Buf::Arena(i) => &mut self.arena[i],
            _ => &mut self.x8,
        };
        let r = s.bytes();
        let len = data.len();
        data.get_mut(r.clone())
            .ok_or_else(|| format!("{s:?} is outside its {len}-byte buffer"))?
            .copy_from_slice(bytes);
        self.held[k][r].fill(held);
        Ok(())
    }

    /// What `forward.rs`'s `io` requires of a step reading `x` and writing `y`: `y` in the
    /// arena buffer `x` is not in.
    fn io(x: Span, y: Span) -> Result<(), String> {
        match (x.buf, y.buf) {
            (Buf::Input | Buf::Arena(_), Buf::Arena(_)) if x.buf != y.buf => Ok(()),
            _ => Err(format!("a step reading {x:?} writes {y:?}")),
        }
    }

    fn step(&mut self, step: &Step) -> Result<(), String> {
        let net = self.net;
        let need = |s: Span, f: Format| match s.format == f {
            true => Ok(()),
            false => Err(format!("{s:?} should be {f:?}")),
        };
        let exact = |s: Span, len: usize| match s.len == len {
            true => Ok(()),
            false => Err(format!("{s:?} should hold {len} values")),
        };
        match *step {
            Step::Amax { stage, x } => {
                need(x, Format::F16)?;
                if x.buf == Buf::Fp8Input {
                    return Err("measuring the FP8 input buffer".into());
                }
                let launch = k::amax_abs_f16_launch(x.len, 1, x.len, &LIMITS);
                let input = HostBuf::of(&self.read(x)?.0);
                let got: Vec<f32> = run_into(launch, &[&input], HostBuf::of(&[self.amax[stage]]));
                self.amax[stage] = got[0];
            }
            Step::Fp8Scales => {
                let layers = self.amax.len();
                let launch =
                    k::fp8_scales_launch(layers, layers, self.scales.len(), layers, MARGIN);
                let mut amax = HostBuf::of(&self.amax);
                let mut scales = HostBuf::of(&self.scales);
                let w_scale = HostBuf::of(&self.w_scale);
                let buffers = vec![
                    kernel_host::Arg::Out(&mut amax),
                    kernel_host::Arg::In(&w_scale),
                    kernel_host::Arg::Out(&mut scales),
                ];
                kernel_host::host().run(&launch.unwrap(), buffers)?;
                self.amax = amax.read();
                self.scales = scales.read();
            }
            Step::Quantize { stage, x, y } => {
                need(x, Format::F16)?;
                need(y, Format::E4m3)?;
                // As the executor requires: the FP8 input buffer from its start.
                if (y.buf, y.at, y.len) != (Buf::Fp8Input, 0, x.len) {
                    return Err(format!("quantizing into {y:?}"));
                }
                let launch = k::quantize_e4m3_launch(x.len, 1, y.len, x.len, &LIMITS);
                let m = HostBuf::of(&[self.scale(stage).multiplier]);
                let input = HostBuf::of(&self.read(x)?.0);
                self.consume(x);
                let out = HostBuf::of(&vec![0xEEu8; y.len]);
                let codes: Vec<u8> = run_into(launch, &[&input, &m], out);
                self.write(y, &codes, Held::E4m3At(stage))?;
            }
            Step::Dequantize { stage, x, y } => {
                need(x, Format::E4m3)?;
                need(y, Format::F16)?;
                exact(y, x.len)?;
                Self::io(x, y)?;
                let (codes, held) = self.read(x)?;
                if held != Held::E4m3At(stage) {
                    return Err(format!("dequantizing at stage {stage} codes of {held:?}"));
                }
                self.consume(x);
                let launch = k::dequantize_e4m3_launch(x.len, 1, y.len, x.len, &LIMITS);
                let m = HostBuf::of(&[self.scale(stage).multiplier]);
                let out = HostBuf::of(&vec![f16::from_f32(9.0); y.len]);
                let v: Vec<f16> = run_into(launch, &[&HostBuf::of(&codes), &m], out);
                self.write(y, bytemuck::cast_slice(&v), Held::F16)?;
            }
            Step::Conv {
                stage,
                rows,
                identity,
                route,
                x,
                y,
            } => {
                if !net.is_conv[stage] {
                    return Err("a conv step on a pool".into());
                }
                let d = net.dims[stage];
                need(x, if route.fp8 { Format::E4m3 } else { Format::F16 })?;
                need(
                    y,
                    if route.e4m3_out {
                        Format::E4m3
                    } else {
                        Format::F16
                    },
                )?;
                exact(x, rows * d.in_len())?;
                exact(y, rows * d.out_len())?;
                if x.buf != Buf::Fp8Input {
                    Self::io(x, y)?;
                } else if !matches!(y.buf, Buf::Arena(_)) {
                    return Err(format!("a conv writing {y:?}"));
                }
                // cuDNN's tensor-core engines (FP8 ones above all) want 16-byte aligned tensors;
                // the buffers themselves are 256-byte aligned.
                if let Some(s) = [x, y].into_iter().find(|s| s.at % 16 != 0) {
                    return Err(format!("{s:?}: a conv tensor not 16-byte aligned"));
                }
                let values = self.take_values(x, stage, "an FP8 conv")?;
                let scales = self.scales();
                match conv_stage(net, stage, rows, route, identity, &values, &scales) {
                    Activations::F16(v) => self.write(y, bytemuck::cast_slice(&v), Held::F16)?,
                    Activations::E4m3(c) => {
                        let next = route.next.ok_or("an E4M3 output with no next conv")?;
                        self.write(y, &c, Held::E4m3At(next))?
                    }
                }
                self.last_out = Some(y);
            }
            Step::ConvPool {
                stage,
                rows,
                route,
                x,
                y,
            } => {
                if !net.is_conv[stage] || net.is_conv.get(stage + 1) != Some(&false) {
                    return Err("a fused conv + pool on other stages".into());
                }
                let (d, pooled) = (net.dims[stage], net.dims[stage + 1]);
                // FP16 in and out, or (an FP8 route) E4M3 in, out as the route says.
                let e4m3 = |yes: bool| if yes { Format::E4m3 } else { Format::F16 };
                need(x, e4m3(route.fp8))?;
                need(y, e4m3(route.fp8 && route.e4m3_out))?;
                if !route.fp8 && (route.e4m3_in || route.e4m3_out) {
                    return Err("an FP16 conv + pool on E4M3".into());
                }
                exact(x, rows * d.in_len())?;
                exact(y, rows * pooled.out_len())?;
                if x.buf != Buf::Fp8Input {
                    Self::io(x, y)?;
                }
                // The kernel copies its input in 16-byte chunks.
                if x.at % 16 != 0 {
                    return Err(format!("{x:?}: a fused conv input not 16-byte aligned"));
                }
                // (x is E4M3 exactly when the route runs FP8: `need` above.)
                let values = self.take_values(x, stage, "an FP8 conv + pool")?;
                let scales = self.scales();
                let conv_route = match route.fp8 {
                    true => route,
                    false => StageRoute {
                        conv: true,
                        ..StageRoute::default()
                    },
                };
                // What the kernel computes: the conv's values in its output type, pooled.
                match conv_stage(net, stage, rows, conv_route, false, &values, &scales) {
                    Activations::F16(conv) => {
                        let v = pool(&conv, rows, &pooled, |a, b| if b > a { b } else { a });
                        self.write(y, bytemuck::cast_slice(&v), Held::F16)?;
                    }
                    Activations::E4m3(codes) => {
                        let next = route.next.ok_or("an E4M3 output with no next conv")?;
                        let v = pool(&codes, rows, &pooled, max_e4m3);
                        self.write(y, &v, Held::E4m3At(next))?;
                    }
                }
                self.last_out = Some(y);
                self.fused_conv = vec![stage];
            }
            Step::BlockPool { stage, rows, x, y } => {
                let pattern = [true, true, false].map(Some);
                if (0..3)
                    .map(|i| net.is_conv.get(stage + i).copied())
                    .ne(pattern)
                {
                    return Err("a fused block on other stages".into());
                }
                let (d, pooled) = (net.dims[stage], net.dims[stage + 2]);
                need(x, Format::F16)?;
                need(y, Format::F16)?;
                exact(x, rows * d.in_len())?;
                exact(y, rows * pooled.out_len())?;
                Self::io(x, y)?;
                // The kernel copies its input in 16-byte chunks.
                if x.at % 16 != 0 {
                    return Err(format!("{x:?}: a fused block input not 16-byte aligned"));
                }
                let values = self.take_values(x, stage, "a fused block")?;
                let scales = self.scales();
                let fp16 = StageRoute {
                    conv: true,
                    ..StageRoute::default()
                };
                // What the kernel computes: the two convs' FP16 values (the first one's rounded
                // as stored apart), pooled.
                let run = |stage: usize, v: &[f32]| match conv_stage(
                    net, stage, rows, fp16, false, v, &scales,
                ) {
                    Activations::F16(v) => Ok(v),
                    Activations::E4m3(_) => Err("an FP16 conv wrote E4M3"),
                };
                let first: Vec<f32> = run(stage, &values)?.iter().map(|v| v.to_f32()).collect();
                let second = run(stage + 1, &first)?;
                let v = pool(&second, rows, &pooled, |a, b| if b > a { b } else { a });
                self.write(y, bytemuck::cast_slice(&v), Held::F16)?;
                self.last_out = Some(y);
                self.fused_conv = vec![stage, stage + 1];
            }
            Step::Pool { stage, rows, x, y } => {
                let d = net.dims[stage];
                if x.format != y.format || net.is_conv[stage] {
                    return Err("a pool step: formats or stage".into());
                }
                exact(x, rows * d.in_len())?;
                exact(y, rows * d.out_len())?;
                Self::io(x, y)?;
                let nhwc = [rows, d.in_h, d.in_w, d.in_c];
                let (bytes, held) = self.read(x)?;
                self.consume(x);
                let input = HostBuf::of(&bytes);
                let out: Vec<u8> = match x.format {
                    Format::F16 => {
                        let launch = k::maxpool2_launch(x.len, y.len, nhwc, &LIMITS);
                        let out = HostBuf::of(&vec![f16::from_f32(9.0); y.len]);
                        let v: Vec<f16> = run_into(launch, &[&input], out);
                        bytemuck::cast_slice(&v).to_vec()
                    }
                    Format::E4m3 => {
                        let launch = k::maxpool2_e4m3_launch(x.len, y.len, nhwc, &LIMITS);
                        run_into(launch, &[&input], HostBuf::of(&vec![0xEEu8; y.len]))
                    }
                };
                // Codes keep their multiplier through a pool.
                self.write(y, &out, held)?;
                self.last_out = Some(y);
            }
            Step::Capture { y, .. } => {
                need(y, Format::F16)?;
                let v: Vec<f16> = bytemuck::pod_collect_to_vec(&self.read(y)?.0);
                let room = self.acts.len();
                self.acts
                    .get_mut(..v.len())
                    .ok_or_else(|| format!("{} values to capture, room for {room}", v.len()))?
                    .copy_from_slice(&v);
            }
            Step::Relu { y } => {
                need(y, Format::F16)?;
                if !matches!(y.buf, Buf::Arena(_)) {
                    return Err(format!("ReLU on {y:?}"));
                }
                let launch = k::relu_f16_launch(y.len, y.len, &LIMITS);
                let v: Vec<f16> = run_into(launch, &[], HostBuf::of(&self.read(y)?.0));
                self.write(y, bytemuck::cast_slice(&v), Held::F16)?;
            }
            Step::StageDone { stage } => {
                let out = self.last_out.ok_or("a stage done before any output")?;
                if let Some(at) = self.fused_conv.iter().position(|&s| s == stage) {
                    self.fused_conv.remove(at);
                } else {
                    self.done.push((stage, self.read(out)?.0, out.format));
                }
            }
        }
        Ok(())
    }
}

/// The executor views spans as FP16 words: they start at an even byte.
fn even(s: Span) -> Result<(), String> {
    match s.at % 2 {
        0 => Ok(()),
        _ => Err(format!("{s:?} starts mid-word")),
    }
}

/// `rows` rows of input (3 real channels of CPAD), values in [-2, 2); rows from `big` on hold
/// large values (padding rows a base forward must not measure).
fn input(rows: usize, seed: u64, big: usize) -> Vec<f16> {
    let px = S * S;
    let v = common::values(rows * px * 3, seed);
    let mut x = vec![f16::ZERO; rows * px * CPAD];
    for (p, rgb) in v.chunks(3).enumerate() {
        let scale = if p / px >= big { 400.0 } else { 2.0 };
        for (c, &v) in rgb.iter().enumerate() {
            x[p * CPAD + c] = f16::from_f32(v * scale);
        }
    }
    x
}

/// `bytes`, in `format`, hold `want`'s values: FP16 bit for bit and E4M3 code for code (±0
/// alike in both); the reference holds no NaN, so a read of poison shows.
fn assert_same(bytes: &[u8], format: Format, want: &Activations, what: &str) {
    // (bits, value) of each.
    type Coded = Vec<(u16, f32)>;
    let (got, want): (Coded, Coded) = match (format, want) {
        (Format::F16, Activations::F16(w)) => (
            bytemuck::pod_collect_to_vec::<u8, f16>(bytes)
                .iter()
                .map(|v| (v.to_bits(), v.to_f32()))
                .collect(),
            w.iter().map(|v| (v.to_bits(), v.to_f32())).collect(),
        ),
        (Format::E4m3, Activations::E4m3(w)) => (
            bytes.iter().map(|&b| (b.into(), e4m3_to_f32(b))).collect(),
            w.iter().map(|&b| (b.into(), e4m3_to_f32(b))).collect(),
        ),
        _ => panic!("{what}: {format:?} values where the reference holds {want:?}"),
    };
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(!w.1.is_nan(), "{what}: the reference's value {i} is NaN");
        assert!(
            g.0 == w.0 || (g.1 == 0.0 && w.1 == 0.0),
            "{what}: value {i}: got {} ({:#x}), want {} ({:#x})",
            g.1,
            g.0,
            w.1,
            w.0
        );
    }
}

/// Every full-batch stage's output, as the plan left it at the stage's `StageDone`, equals the
/// reference's.
fn assert_stages(dev: &Device<'_>, want: &Reference, what: &str) {
    for (stage, bytes, format) in &dev.done {
        let what = format!("{what}: stage {stage}");
        assert_same(bytes, *format, &want.stages[*stage], &what);
    }
}

fn f16_values(bytes: &[u8]) -> Vec<f32> {
    bytemuck::pod_collect_to_vec::<u8, f16>(bytes)
        .iter()
        .map(|v| v.to_f32())
        .collect()
}

/// Values of one row of the features' output.
fn out_len(net: &Net) -> usize {
    net.dims.last().expect("a stage").out_len()
}

/// A base forward of `BASE_ROWS` rows (the last one padding unless the capture takes it)
/// capturing `capture`'s stage: every stage, the activations, the amaxes and the scales it
/// leaves equal the reference's. Returns the device (its scales set) and the reference scales.
fn base_forward(net: &Net, capture: CaptureAt) -> (Device<'_>, Vec<Scale>) {
    let mut dev = Device::new(net, MASK_ROWS.max(BASE_ROWS));
    let x = input(BASE_ROWS, 5, IMAGES);
    let p = plan::features(&net.shape(), BASE_ROWS, None, None, Some(capture)).unwrap();
    dev.forward(&p, &x, capture.rows * net.dims[capture.stage].out_len());
    let want = reference(
        net,
        &x,
        BASE_ROWS,
        None,
        Some(capture),
        &net.initial_scales(),
    );
    let what = format!("base forward capturing {capture:?}");
    let out = dev.output(p.out, BASE_ROWS * out_len(net), Format::F16);
    assert_same(&out, Format::F16, want.out(), &what);
    assert_stages(&dev, &want, &what);
    assert_eq!(dev.done.len(), net.dims.len(), "{what}: every stage done");
    let captured = want.captured.expect("captured");
    let acts = bytemuck::cast_slice(&dev.acts);
    let captured_f16 = Activations::F16(captured.clone());
    assert_same(
        acts,
        Format::F16,
        &captured_f16,
        &format!("{what}: activations"),
    );
    if capture.pre_relu {
        assert!(
            captured.iter().any(|&v| v < f16::ZERO),
            "{what}: a pre-ReLU capture has negative values"
        );
    }
    // The amaxes were turned into scales (and reset); a padding row did not count.
    assert!(dev.amax.iter().all(|&a| a == 0.0), "{what}: amax reset");
    let scales = scales_from(net, &want.amax);
    for (stage, s) in scales.iter().enumerate() {
        assert_eq!(dev.scale(stage), *s, "{what}: stage {stage} scales");
        if net.capable[stage] && capture.rows < BASE_ROWS {
            assert!(
                want.amax[stage] > 0.0 && want.amax[stage] < 200.0,
                "{what}: stage {stage} amax {} (the padding row's values are ≥ 200)",
                want.amax[stage]
            );
        }
    }
    (dev, scales)
}

/// Stage `stage`'s output (before its ReLU when `pre_relu`) for the real images.
fn capture(stage: usize, pre_relu: bool) -> CaptureAt {
    CaptureAt {
        stage,
        pre_relu,
        rows: IMAGES,
    }
}

/// A masked forward of `MASK_ROWS` rows routed by `forms`, blocks 1–2 in sub-batches of `sub`
/// rows when given: the plan has the shape asked for, and every full-batch stage and the
/// features equal the reference's, value for value.
fn masked_forward(
    net: &Net,
    dev: &mut Device<'_>,
    scales: &[Scale],
    forms: &[Option<Fp8Forms>],
    sub: Option<usize>,
) {
    let routes = plan::route_preferring(forms, &net.capable);
    let end = net.prefix_end();
    let prefix = sub.map(|rows| Prefix { end, rows });
    let p = plan::features(&net.shape(), MASK_ROWS, prefix, Some(&routes), None).unwrap();
    let what = format!("forms {forms:?}, sub-batch {sub:?}");
    // Blocks 1–2 in MASK_ROWS / sub chunks of sub rows, the rest whole; marks after each
    // full-batch stage only.
    let stages = net.dims.len();
    let first = if sub.is_some() { end } else { 0 };
    assert_eq!(
        marked_stages(&p),
        (first..stages).collect::<Vec<_>>(),
        "{what}: marks"
    );
    for stage in 0..stages {
        let runs: Vec<usize> = p
            .steps
            .iter()
            .filter_map(|s| match *s {
                Step::Conv { stage: t, rows, .. } | Step::Pool { stage: t, rows, .. }
                    if t == stage =>
                {
                    Some(rows)
                }
                _ => None,
            })
            .collect();
        let want = match sub {
            Some(r) if stage < end => vec![r; MASK_ROWS / r],
            _ => vec![MASK_ROWS],
        };
        assert_eq!(runs, want, "{what}: stage {stage}'s launches");
    }
    let x = input(MASK_ROWS, 99, MASK_ROWS);
    dev.forward(&p, &x, 0);
    let want = reference(net, &x, MASK_ROWS, Some(&routes), None, scales);
    let out = dev.output(p.out, MASK_ROWS * out_len(net), Format::F16);
    assert_same(&out, Format::F16, want.out(), &what);
    assert_stages(dev, &want, &what);
    // The route matters: FP16 all the way gives other values wherever a conv ran FP8.
    if routes.iter().any(|r| r.fp8) {
        let fp16 = reference(net, &x, MASK_ROWS, None, None, scales);
        assert_ne!(
            f16_values(&out),
            f16_values(bytemuck::cast_slice(match fp16.out() {
                Activations::F16(v) => v,
                Activations::E4m3(_) => unreachable!("the features end FP16"),
            })),
            "{what}: FP8 changed nothing"
        );
    }
}

const BOTH: Fp8Forms = Fp8Forms {
    half_out: true,
    e4m3_out: true,
    fp16_e4m3_out: false,
};

/// Per stage, the forms of the net's six convs, in order (pools None).
fn net_forms(net: &Net, convs: [Fp8Forms; 6]) -> Vec<Option<Fp8Forms>> {
    let mut convs = convs.into_iter();
    net.is_conv
        .iter()
        .map(|&conv| if conv { convs.next() } else { None })
        .collect()
}

/// Random forms a prepared plan could have: FP8 forms on capable convs, an E4M3 output only
/// where the next conv may run FP8.
fn random_forms(net: &Net, seed: u64) -> Vec<Option<Fp8Forms>> {
    let mut s = seed;
    let n = net.dims.len();
    (0..n)
        .map(|i| {
            if !net.is_conv[i] {
                return None;
            }
            let next_capable = (i + 1..n)
                .find(|&j| net.is_conv[j])
                .is_some_and(|j| net.capable[j]);
            let mut bit = || {
                s = splitmix64(s);
                s & 1 == 1
            };
            let fp8 = net.capable[i];
            Some(Fp8Forms {
                half_out: fp8 && bit(),
                e4m3_out: fp8 && next_capable && bit(),
                fp16_e4m3_out: next_capable && bit(),
            })
        })
        .collect()
}

/// FP16 everywhere (a masked forward before any scales), whole and in sub-batches; base
/// forwards capturing a conv before and after its ReLU and a pool.
fn fp16_forwards_match_the_reference() {
    let net = Net::new();
    // Convs before and after their ReLU (stage 3's ReLU before stage 4's amax), pools, the
    // first stage and the last, and a capture of every row.
    let all_rows = CaptureAt {
        rows: BASE_ROWS,
        ..capture(4, false)
    };
    for capture in [
        capture(4, false),
        capture(4, true),
        capture(3, true),
        capture(0, false),
        capture(2, false),
        capture(8, true),
        all_rows,
    ] {
        base_forward(&net, capture);
    }
    let (mut dev, scales) = base_forward(&net, capture(6, false));
    let fp16 = net_forms(&net, [Fp8Forms::default(); 6]);
    for sub in [None, Some(1), Some(2), Some(4)] {
        masked_forward(&net, &mut dev, &scales, &fp16, sub);
    }
}

/// Activations E4M3 from the first FP8 conv through both pools to the last conv: across the
/// end of sub-batched blocks 1–2 (packed there), whole and in sub-batches.
fn e4m3_activations_cross_blocks_1_2() {
    let net = Net::new();
    let (mut dev, scales) = base_forward(&net, capture(8, false));
    let fp16_e4m3 = Fp8Forms {
        fp16_e4m3_out: true,
        ..Fp8Forms::default()
    };
    let forms = net_forms(&net, [fp16_e4m3, BOTH, BOTH, BOTH, BOTH, BOTH]);
    let routes = plan::route_preferring(&forms, &net.capable);
    assert!(routes[..8].iter().all(|r| r.e4m3_out), "{routes:?}");
    for sub in [None, Some(1), Some(2), Some(4)] {
        masked_forward(&net, &mut dev, &scales, &forms, sub);
    }
}

/// An FP8 conv with an E4M3 output only, before an FP16 conv: the codes are dequantized into
/// the other buffer first (inside blocks 1–2 and after them).
fn fp16_convs_read_e4m3_dequantized() {
    let net = Net::new();
    let (mut dev, scales) = base_forward(&net, capture(8, false));
    let e4m3_only = Fp8Forms {
        e4m3_out: true,
        ..Fp8Forms::default()
    };
    let fp16 = Fp8Forms::default();
    let forms = net_forms(&net, [fp16, e4m3_only, fp16, e4m3_only, fp16, BOTH]);
    let routes = plan::route_preferring(&forms, &net.capable);
    assert!(
        routes[3].dequantizes() && routes[6].dequantizes(),
        "{routes:?}"
    );
    for sub in [None, Some(2)] {
        masked_forward(&net, &mut dev, &scales, &forms, sub);
    }
}

/// Blocks 1–2 alone (what prepare times, and the part of a forward a sub-batch size changes):
/// their output, E4M3 (packed) or FP16, equals the reference's at their last stage.
fn prefix_plans_match_the_reference() {
    let net = Net::new();
    let (mut dev, scales) = base_forward(&net, capture(8, false));
    let end = net.prefix_end();
    let fp16_e4m3 = Fp8Forms {
        fp16_e4m3_out: true,
        ..Fp8Forms::default()
    };
    let e4m3 = net_forms(&net, [fp16_e4m3, BOTH, BOTH, BOTH, BOTH, BOTH]);
    for routes in [None, Some(plan::route_preferring(&e4m3, &net.capable))] {
        for sub in [None, Some(1), Some(2), Some(4)] {
            let p = plan::prefix(&net.shape(), MASK_ROWS, end, sub, routes.as_deref()).unwrap();
            let x = input(MASK_ROWS, 7, MASK_ROWS);
            dev.forward(&p, &x, 0);
            let want = reference(&net, &x, MASK_ROWS, routes.as_deref(), None, &scales);
            let last = routes.as_ref().is_some_and(|r| r[end - 1].e4m3_out);
            let format = if last { Format::E4m3 } else { Format::F16 };
            let len = MASK_ROWS * net.dims[end - 1].out_len();
            let what = format!("blocks 1–2, routes {routes:?}, sub-batch {sub:?}");
            assert_same(
                &dev.output(p.out, len, format),
                format,
                &want.stages[end - 1],
                &what,
            );
        }
    }
}

/// Random plans a prepare could make, each whole and in sub-batches of 2 and 4.
fn random_routes_match_the_reference() {
    let net = Net::new();
    let (mut dev, scales) = base_forward(&net, capture(8, false));
    for seed in 0..12 {
        let forms = random_forms(&net, 0xF0F0 + seed);
        for sub in [None, Some(2), Some(4)] {
            masked_forward(&net, &mut dev, &scales, &forms, sub);
        }
    }
}

/// The stage of each step `pick` takes, in plan order.
fn step_stages(p: &FeaturePlan, pick: impl Fn(&Step) -> Option<usize>) -> Vec<usize> {
    p.steps.iter().filter_map(pick).collect()
}

/// The conv stages whose max-pool runs in the same kernel (`PlanShape::fused_pool`).
fn fused_stages(p: &FeaturePlan) -> Vec<usize> {
    step_stages(p, |s| match *s {
        Step::ConvPool { stage, .. } => Some(stage),
        _ => None,
    })
}

/// The FP8 layers' inputs a plan measures.
fn amax_stages(p: &FeaturePlan) -> Vec<usize> {
    step_stages(p, |s| match *s {
        Step::Amax { stage, .. } => Some(stage),
        _ => None,
    })
}

/// The stages a plan marks done.
fn marked_stages(p: &FeaturePlan) -> Vec<usize> {
    step_stages(p, |s| match *s {
        Step::StageDone { stage } => Some(stage),
        _ => None,
    })
}

/// Per stage: a conv followed by a pool (what a shape may run with its pool in one kernel).
fn pooled_convs(net: &Net) -> Vec<bool> {
    (0..net.dims.len())
        .map(|i| net.is_conv[i] && net.is_conv.get(i + 1) == Some(&false))
        .collect()
}

/// A masked forward of plan `p` on `x`: every stage from `first` is marked done, and the
/// features and every full-batch stage equal the reference's under `routes` and `scales`.
fn forward_matches(
    dev: &mut Device<'_>,
    p: &FeaturePlan,
    (x, first): (&[f16], usize),
    (routes, scales): (Option<&[StageRoute]>, &[Scale]),
    what: &str,
) {
    let net = dev.net;
    let n = net.dims.len();
    assert_eq!(
        marked_stages(p),
        (first..n).collect::<Vec<_>>(),
        "{what}: marks"
    );
    dev.forward(p, x, 0);
    let want = reference(net, x, MASK_ROWS, routes, None, scales);
    let out = dev.output(p.out, MASK_ROWS * out_len(net), Format::F16);
    assert_same(&out, Format::F16, want.out(), what);
    assert_stages(dev, &want, what);
}

/// The first block (stages 0–2: conv, conv, pool) runs as one step where the shape says so and
/// the forward allows (all three FP16, none captured, and a base forward need not measure the
/// second conv's input), before the second conv's own fused pool, and changes no value: masked
/// forwards whole and in sub-batches; not under a route that runs its second conv FP8, nor in
/// base forwards capturing inside it or measuring the second conv's FP8 input.
fn fused_blocks_match_the_reference() {
    let net = Net::new();
    let (mut dev, scales) = base_forward(&net, capture(8, false));
    let n = net.dims.len();
    let fused = pooled_convs(&net);
    let block: Vec<bool> = (0..n).map(|i| i == 0).collect();
    let shape = PlanShape {
        fused_block: &block,
        ..net.shape_with(&fused)
    };
    let blocks = |p: &FeaturePlan| {
        step_stages(p, |s| match *s {
            Step::BlockPool { stage, .. } => Some(stage),
            _ => None,
        })
    };
    let end = net.prefix_end();
    let x = input(MASK_ROWS, 13, MASK_ROWS);
    let mut forms = [Fp8Forms::default(); 6];
    forms[1] = BOTH;
    let fp8_routes = plan::route_preferring(&net_forms(&net, forms), &net.capable);
    assert!(fp8_routes[1].fp8, "stage 1 runs FP8");
    for (routes, sub, want_blocks, want_pools) in [
        (None, None, vec![0], vec![4, 6]),
        (None, Some(2), vec![0; 4], vec![4, 4, 4, 4, 6]),
        // Stage 1 runs FP8: conv, FP8 conv, pool apart.
        (Some(&fp8_routes[..]), None, vec![], vec![4, 6]),
    ] {
        let what = format!("fused block, routes {routes:?}, sub-batch {sub:?}");
        let prefix = sub.map(|rows| Prefix { end, rows });
        let p = plan::features(&shape, MASK_ROWS, prefix, routes, None).unwrap();
        assert_eq!(blocks(&p), want_blocks, "{what}");
        assert_eq!(fused_stages(&p), want_pools, "{what}");
        let first = if sub.is_some() { end } else { 0 };
        forward_matches(&mut dev, &p, (&x, first), (routes, &scales), &what);
    }
    // Base forwards: stage 1 has FP8 filters here (its input is measured), so no block; a
    // net without FP8 filters runs it unless the capture is inside it.
    assert!(net.capable[1]);
    let base = |capable: &[bool], at: usize| {
        let shape = PlanShape {
            fp8_filters: capable,
            ..shape
        };
        let p = plan::features(&shape, BASE_ROWS, None, None, Some(capture(at, false))).unwrap();
        blocks(&p)
    };
    assert_eq!(base(&net.capable, 8), Vec::<usize>::new());
    let none = vec![false; n];
    assert_eq!(base(&none, 8), vec![0]);
    for at in 0..3 {
        assert_eq!(base(&none, at), Vec::<usize>::new(), "capture at {at}");
    }
    assert_eq!(base(&none, 3), vec![0]);
}

/// Convs run with their max-pool as one step wherever the shape says so and the forward
/// allows (both FP16, neither captured), and change no value: masked forwards whole and in
/// sub-batches, under an FP8 route, and base forwards (which still measure every FP8 input).
fn fused_pools_match_the_reference() {
    let net = Net::new();
    let (mut dev, scales) = base_forward(&net, capture(8, false));
    let n = net.dims.len();
    let fused = pooled_convs(&net);
    let shape = net.shape_with(&fused);
    let end = net.prefix_end();
    let x = input(MASK_ROWS, 11, MASK_ROWS);
    let fp8 = net_forms(
        &net,
        [
            Fp8Forms::default(),
            Fp8Forms::default(),
            Fp8Forms::default(),
            BOTH,
            Fp8Forms::default(),
            Fp8Forms::default(),
        ],
    );
    let fp8_routes = plan::route_preferring(&fp8, &net.capable);
    assert!(
        fp8_routes[4].fp8 && !fp8_routes[4].e4m3_out,
        "stage 4 runs FP8"
    );
    for (routes, sub, want) in [
        (None, None, vec![1, 4, 6]),
        (None, Some(2), vec![1, 4, 1, 4, 1, 4, 1, 4, 6]),
        // Stage 4 runs FP8: its pool stays apart.
        (Some(&fp8_routes[..]), None, vec![1, 6]),
        (Some(&fp8_routes[..]), Some(4), vec![1, 1, 6]),
    ] {
        let what = format!("fused pools, routes {routes:?}, sub-batch {sub:?}");
        let prefix = sub.map(|rows| Prefix { end, rows });
        let p = plan::features(&shape, MASK_ROWS, prefix, routes, None).unwrap();
        assert_eq!(fused_stages(&p), want, "{what}");
        let pools = p
            .steps
            .iter()
            .filter(|s| matches!(s, Step::Pool { .. }))
            .count();
        let apart = if routes.is_some() { 1 } else { 0 };
        assert_eq!(
            pools,
            apart * sub.map_or(1, |r| MASK_ROWS / r),
            "{what}: pools apart"
        );
        // Every full-batch stage is marked, a fused pool's with its conv's.
        let first = if sub.is_some() { end } else { 0 };
        forward_matches(&mut dev, &p, (&x, first), (routes, &scales), &what);
    }
    // FP8 convs with their pools in one kernel (the pooled E4M3 build) where the shape has it
    // for the output the route writes: whole and in sub-batches (blocks 1–2's last pool, E4M3,
    // packed by the fused kernel as it would be by the pool). Every conv that may runs FP8,
    // E4M3 between; then stage 4 with an FP16-output plan only (fused, FP16 out), and the same
    // with a shape that has the E4M3-output build only (stage 4 keeps its pool apart).
    let fp8_pools = |p: &FeaturePlan| {
        step_stages(p, |s| match *s {
            Step::ConvPool { stage, route, .. } if route.fp8 => Some(stage),
            _ => None,
        })
    };
    let half_only = Fp8Forms {
        half_out: true,
        ..Fp8Forms::default()
    };
    let both_formats: Vec<[bool; 2]> = fused.iter().map(|&f| [f, f]).collect();
    let e4m3_only: Vec<[bool; 2]> = fused.iter().map(|&f| [false, f]).collect();
    for (forms, fp8_fused) in [
        ([BOTH; 6], &both_formats),
        ([BOTH, BOTH, BOTH, half_only, BOTH, BOTH], &both_formats),
        ([BOTH, BOTH, BOTH, half_only, BOTH, BOTH], &e4m3_only),
    ] {
        let routes = plan::route_preferring(&net_forms(&net, forms), &net.capable);
        let shape8 = net.shape_fused(&fused, fp8_fused);
        let fused8: Vec<usize> = (0..n)
            .filter(|&i| fused[i] && routes[i].fp8 && fp8_fused[i][routes[i].e4m3_out as usize])
            .collect();
        assert!(!fused8.is_empty(), "{routes:?}");
        for sub in [None, Some(2), Some(4)] {
            let what = format!("FP8 fused pools {fp8_fused:?}, routes {routes:?}, sub {sub:?}");
            let prefix = sub.map(|rows| Prefix { end, rows });
            let p = plan::features(&shape8, MASK_ROWS, prefix, Some(&routes), None).unwrap();
            let chunks = sub.map_or(1, |r| MASK_ROWS / r);
            let mut want: Vec<usize> = Vec::new();
            for _ in 0..chunks {
                want.extend(fused8.iter().filter(|&&s| sub.is_some() && s < end));
            }
            want.extend(fused8.iter().filter(|&&s| sub.is_none() || s >= end));
            assert_eq!(fp8_pools(&p), want, "{what}");
            dev.forward(&p, &x, 0);
            let want = reference(&net, &x, MASK_ROWS, Some(&routes), None, &scales);
            let out = dev.output(p.out, MASK_ROWS * out_len(&net), Format::F16);
            assert_same(&out, Format::F16, want.out(), &what);
            assert_stages(&dev, &want, &what);
        }
    }
    // Base forwards: a captured conv or pool keeps its pair apart; every FP8 input is measured.
    for (cap, want) in [
        (capture(2, false), vec![4, 6]),
        (capture(1, true), vec![4, 6]),
        (capture(4, false), vec![1, 6]),
        (capture(8, false), vec![1, 4, 6]),
    ] {
        let what = format!("fused pools, base forward capturing {cap:?}");
        let p = plan::features(&shape, BASE_ROWS, None, None, Some(cap)).unwrap();
        assert_eq!(fused_stages(&p), want, "{what}");
        let apart = plan::features(&net.shape(), BASE_ROWS, None, None, Some(cap)).unwrap();
        assert_eq!(amax_stages(&p), amax_stages(&apart), "{what}: amax");
        let x = input(BASE_ROWS, 5, IMAGES);
        dev.forward(&p, &x, cap.rows * net.dims[cap.stage].out_len());
        let want = reference(&net, &x, BASE_ROWS, None, Some(cap), &net.initial_scales());
        let out = dev.output(p.out, BASE_ROWS * out_len(&net), Format::F16);
        assert_same(&out, Format::F16, want.out(), &what);
        let captured = Activations::F16(want.captured.expect("captured"));
        let acts = bytemuck::cast_slice(&dev.acts);
        assert_same(
            acts,
            Format::F16,
            &captured,
            &format!("{what}: activations"),
        );
    }
    // Flags for another model are refused.
    let e = plan::features(&net.shape_with(&fused[1..]), MASK_ROWS, None, None, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("fused-pool flags"), "{e}");
}

/// The plan refuses what the executor could not run: a conv ending sub-batched blocks 1–2 with
/// an E4M3 output, routes of another model, a batch that is no multiple of the sub-batch.
fn plans_refuse_what_cannot_run() {
    let net = Net::new();
    let shape = net.shape();
    let forms = net_forms(&net, [Fp8Forms::default(), BOTH, BOTH, BOTH, BOTH, BOTH]);
    let routes = plan::route_preferring(&forms, &net.capable);
    // Blocks 1–2 cut after conv stage 4, which writes E4M3 for stage 6.
    let at_conv = Prefix { end: 5, rows: 2 };
    let e = plan::features(&shape, MASK_ROWS, Some(at_conv), Some(&routes), None).unwrap_err();
    assert!(e.to_string().contains("must end with a pool"), "{e}");
    // Whole, the same cut is fine (nothing to pack).
    plan::prefix(&shape, MASK_ROWS, 5, None, Some(&routes)).unwrap();
    let e = plan::features(
        &shape,
        MASK_ROWS,
        Some(Prefix { end: 6, rows: 3 }),
        None,
        None,
    )
    .unwrap_err();
    assert!(e.to_string().contains("not a multiple"), "{e}");
    let e = plan::features(&shape, MASK_ROWS, None, Some(&routes[1..]), None).unwrap_err();
    assert!(e.to_string().contains("routes"), "{e}");
    let e = plan::features(&shape, 2, None, None, Some(capture(4, false)));
    assert!(e.is_ok(), "two rows, two images");
    let e = plan::features(&shape, 1, None, None, Some(capture(4, false))).unwrap_err();
    assert!(e.to_string().contains("capturing"), "{e}");
    let e = plan::features(
        &shape,
        MASK_ROWS,
        Some(Prefix { end: 10, rows: 2 }),
        None,
        None,
    );
    assert!(e.unwrap_err().to_string().contains("end at stage 10"));
    // A base forward runs FP16: no routes beside a capture.
    let e = plan::features(
        &shape,
        MASK_ROWS,
        None,
        Some(&routes),
        Some(capture(4, false)),
    );
    assert!(e.unwrap_err().to_string().contains("FP16"));
    let mut shifted = routes.clone();
    shifted.rotate_left(1);
    assert!(plan::features(&shape, MASK_ROWS, None, Some(&shifted), None).is_err());
    let capture = CaptureAt {
        stage: 4,
        pre_relu: false,
        rows: 1,
    };
    let e = plan::features(
        &shape,
        MASK_ROWS,
        Some(Prefix { end: 6, rows: 2 }),
        None,
        Some(capture),
    )
    .unwrap_err();
    assert!(e.to_string().contains("whole"), "{e}");
}

/// The tests, each named after its function, each needing a C++ compiler.
macro_rules! trials {
    ($($test:ident),* $(,)?) => {
        vec![$(common::trial(stringify!($test), &[common::Need::Cxx], $test)),*]
    };
}

fn main() -> std::process::ExitCode {
    let mut trials = trials![
        fp16_forwards_match_the_reference,
        e4m3_activations_cross_blocks_1_2,
        fp16_convs_read_e4m3_dequantized,
        prefix_plans_match_the_reference,
        random_routes_match_the_reference,
        fused_pools_match_the_reference,
        fused_blocks_match_the_reference,
    ];
    trials.push(common::trial(
        "plans_refuse_what_cannot_run",
        &[],
        plans_refuse_what_cannot_run,
    ));
    common::run_tests(trials)
}
