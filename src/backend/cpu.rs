//! CPU backend: the f32 reference every CUDA op is tested against. Readable first, fast second:
//! conv3×3 is im2col + the `gemm` crate, images of a batch run in parallel with rayon.
//! Layout: NCHW f32 throughout (PyTorch's), so intermediate values can be compared with it.

use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;

use crate::backend::fp8::Fp8Emulation;
use crate::backend::{
    median_per_layer, normal_noise, not_prepared, Backend, MaskItem, MaskStyle, Plan, Semantics,
    Stage,
};
use crate::error::{Error, Result};
use crate::model::{Capture, FeatureStage, Vgg, POOLED};

/// A host tensor: logical shape and NCHW f32 data.
#[derive(Clone, Debug, Default)]
pub struct CpuBuf {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl CpuBuf {
    /// Elements per row (everything after the first dimension).
    fn row_len(&self) -> usize {
        self.shape[1..].iter().product()
    }
}

/// The CPU backend. Holds the prepared model (weights stay host f32).
#[derive(Default)]
pub struct CpuBackend {
    model: Option<Arc<Vgg>>,
    plan: Option<Plan>,
    profiling: bool,
    current: Option<(Stage, Instant)>,
    times: Vec<(Stage, f64)>,
    /// Scores pushed and not yet taken (see [`Backend::push_scores`]).
    pending_scores: Vec<f32>,
    /// Emulate `--precision fp8` (see [`CpuBackend::emulate_fp8`]); built at prepare.
    emulate_fp8: bool,
    /// The route to emulate: stages in FP8, stages on E4M3-rounded inputs only (None: every
    /// capable one in FP8).
    fp8_route: Option<(Vec<usize>, Vec<usize>)>,
    fp8: Option<Fp8Emulation>,
    /// Emulate the FP16 CUDA path's storage (see [`CpuBackend::emulate_fp16_storage`]).
    emulate_fp16: bool,
}

impl CpuBackend {
    pub fn new() -> Self {
        Self::default()
    }

    /// Round what the FP16 CUDA path stores in FP16: the input, the conv and Linear weights and
    /// the conv biases (at prepare), every feature stage's output, the pooled features and the
    /// hidden Linear outputs; sums stay f32, the logits f32. The CPU twin of the FP16 path: what
    /// FP16 storage alone does to a result, measured without a GPU (the tolerances of the GPU
    /// tests against the goldens come from it). Takes effect at the next prepare.
    pub fn emulate_fp16_storage(&mut self, on: bool) {
        self.emulate_fp16 = on;
    }

    /// Compute the forwards as `--precision fp8` on CUDA is designed to (every FP8-capable conv
    /// quantized, scales from each base forward; [`crate::backend::fp8`]): the CPU twin the FP8
    /// path is tested against, and a way to measure its fidelity without a GPU. Takes effect at
    /// the next prepare. The command line still refuses FP8 on the CPU: emulated, it is slower
    /// than f32, not faster.
    pub fn emulate_fp8(&mut self, on: bool) {
        self.emulate_fp8 = on;
        self.fp8_route = None;
    }

    /// [`CpuBackend::emulate_fp8`] along a GPU's route (to test it): the capable stages among
    /// `fp8` in FP8, those among `inputs_only` on E4M3-rounded inputs (see
    /// [`Fp8Emulation::route`]).
    pub fn emulate_fp8_route(&mut self, fp8: &[usize], inputs_only: &[usize]) {
        self.emulate_fp8 = true;
        self.fp8_route = Some((fp8.to_vec(), inputs_only.to_vec()));
    }

    fn prepared(&self) -> Result<(&Vgg, Plan)> {
        match (&self.model, self.plan) {
            (Some(m), Some(p)) => Ok((m, p)),
            _ => Err(not_prepared("CPU")),
        }
    }

    /// [`CpuBackend::prepared`] and the FP8 emulation, if on.
    fn prepared_fp8(&mut self) -> Result<(&Vgg, Plan, Option<&mut Fp8Emulation>)> {
        match (&self.model, self.plan) {
            (Some(m), Some(p)) => Ok((m, p, self.fp8.as_mut())),
            _ => Err(not_prepared("CPU")),
        }
    }
}

impl Backend for CpuBackend {
    type Buf = CpuBuf;

    fn set_profiling(&mut self, on: bool) {
        self.profiling = on;
    }

    fn mark(&mut self, stage: Option<Stage>) -> Result<()> {
        if !self.profiling {
            return Ok(());
        }
        let now = Instant::now();
        if let Some((prev, start)) = self.current.take() {
            self.times
                .push((prev, now.duration_since(start).as_secs_f64() * 1e3));
        }
        self.current = stage.map(|s| (s, now));
        Ok(())
    }

    fn take_stage_times(&mut self) -> Result<Vec<(Stage, f64)>> {
        self.mark(None)?;
        Ok(std::mem::take(&mut self.times))
    }

    fn describe(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn prepare(&mut self, model: &Arc<Vgg>, plan: Plan) -> Result<()> {
        if plan.capture.stage >= model.features.len() {
            return Err(Error::Invalid(format!(
                "capture stage {} out of range",
                plan.capture.stage
            )));
        }
        check_host_memory(model, plan)?;
        // Weights are host f32 already: nothing to upload, just share them (or, emulating FP16
        // storage, a copy rounded to FP16).
        self.model = Some(if self.emulate_fp16 {
            Arc::new(weights_rounded_to_f16(model))
        } else {
            Arc::clone(model)
        });
        self.plan = Some(plan);
        self.fp8 = self.emulate_fp8.then(|| {
            let mut emu = Fp8Emulation::new(model);
            if let Some((fp8, inputs_only)) = &self.fp8_route {
                emu.route(fp8, inputs_only);
            }
            emu
        });
        Ok(())
    }

    fn alloc(&mut self, shape: &[usize]) -> Result<CpuBuf> {
        let len: usize = shape.iter().product();
        let mut data = Vec::new();
        data.try_reserve_exact(len).map_err(|_| {
            Error::OutOfMemory(format!("host memory: buffer of {} MiB", (len * 4) >> 20))
        })?;
        data.resize(len, 0.0);
        Ok(CpuBuf {
            shape: shape.to_vec(),
            data,
        })
    }

    fn write_rows(&mut self, buf: &mut CpuBuf, first: usize, data: &[f32]) -> Result<()> {
        let row = buf.row_len();
        let end = first * row + data.len();
        if buf.shape.len() != 4
            || row == 0
            || !data.len().is_multiple_of(row)
            || end > buf.data.len()
        {
            return Err(Error::Invalid(format!(
                "write_rows: {} values at row {first} of {:?}",
                data.len(),
                buf.shape
            )));
        }
        buf.data[first * row..end].copy_from_slice(data);
        Ok(())
    }

    fn download(&mut self, buf: &CpuBuf, rows: usize) -> Result<Vec<f32>> {
        let n = rows * buf.row_len();
        buf.data
            .get(..n)
            .map(<[f32]>::to_vec)
            .ok_or_else(|| Error::Invalid(format!("download of {rows} rows from {:?}", buf.shape)))
    }

    fn preprocess(
        &mut self,
        rgb: &[u8],
        mean: [f32; 3],
        std: [f32; 3],
        images: &mut CpuBuf,
        slot: usize,
    ) -> Result<()> {
        let s = images.shape[2];
        let row = images.row_len();
        if rgb.len() != s * s * 3 || slot >= images.shape[0] {
            return Err(Error::Invalid(format!(
                "preprocess: {} bytes for slot {slot} of {:?}",
                rgb.len(),
                images.shape
            )));
        }
        let x = crate::image::normalize(rgb, s, mean, std);
        images.data[slot * row..(slot + 1) * row].copy_from_slice(&x);
        Ok(())
    }

    fn forward(
        &mut self,
        x: &CpuBuf,
        n: usize,
        logits: &mut CpuBuf,
        acts: Option<&mut CpuBuf>,
    ) -> Result<()> {
        let f16_storage = self.emulate_fp16;
        let (model, plan, fp8) = self.prepared_fp8()?;
        let s = x.shape[2];
        let input = &x.data[..n * x.row_len()];
        let capture = acts.is_some().then_some(plan.capture);
        let (out, captured) = match fp8 {
            Some(emu) => forward_emulating_fp8(model, input, n, s, capture, emu),
            None if f16_storage => {
                forward_with(model, input, n, s, capture, &mut || {}, None, true)
            }
            None => forward(model, input, n, s, capture),
        };
        logits.data[..out.len()].copy_from_slice(&out);
        if let (Some(acts), Some(captured)) = (acts, captured) {
            acts.data[..captured.len()].copy_from_slice(&captured);
        }
        Ok(())
    }

    fn masked_inputs(
        &mut self,
        images: &CpuBuf,
        acts: &CpuBuf,
        items: &[MaskItem],
        style: MaskStyle,
        out: &mut CpuBuf,
    ) -> Result<()> {
        let s = images.shape[2];
        let [_, k, h, w] = acts.shape[..] else {
            return Err(Error::Invalid("masked_inputs: acts must be 4-D".into()));
        };
        if items.len() > out.shape[0] {
            return Err(Error::Invalid(format!(
                "masked_inputs: {} items for a buffer of {} rows",
                items.len(),
                out.shape[0]
            )));
        }
        let img_len = 3 * s * s;
        out.data[..items.len() * img_len]
            .par_chunks_mut(img_len)
            .zip(items.par_iter())
            .for_each(|(dst, item)| {
                let (i, c) = (item.image as usize, item.channel as usize);
                let a = &acts.data[(i * k + c) * h * w..][..h * w];
                let mask = styled_mask(a, h, w, s, style, item);
                let img = &images.data[i * img_len..][..img_len];
                for ch in 0..3 {
                    for p in 0..s * s {
                        dst[ch * s * s + p] = img[ch * s * s + p] * mask[p];
                    }
                }
            });
        Ok(())
    }

    fn scores(
        &mut self,
        logits: &CpuBuf,
        n: usize,
        targets: &[u32],
        probability: bool,
    ) -> Result<Vec<f32>> {
        let c = logits.shape[1];
        Ok(score_rows(&logits.data[..n * c], c, targets, probability))
    }

    fn push_scores(
        &mut self,
        logits: &CpuBuf,
        n: usize,
        targets: &[u32],
        probability: bool,
    ) -> Result<()> {
        let got = self.scores(logits, n, targets, probability)?;
        self.pending_scores.extend(got);
        Ok(())
    }

    fn take_scores(&mut self) -> Result<Vec<f32>> {
        Ok(std::mem::take(&mut self.pending_scores))
    }

    fn layer_times(&mut self, x: &CpuBuf, rows: usize, reps: usize) -> Result<Vec<f64>> {
        let (model, _) = self.prepared()?;
        if rows == 0 || rows > x.shape[0] {
            return Err(Error::Invalid(format!(
                "layer_times: {rows} rows of a buffer of shape {:?}",
                x.shape
            )));
        }
        let s = x.shape[2];
        let input = &x.data[..rows * x.row_len()];
        let mut runs: Vec<Vec<f64>> = Vec::with_capacity(reps.max(1));
        for _ in 0..reps.max(1) {
            let mut times = Vec::new();
            let mut last = Instant::now();
            forward_timed(model, input, rows, s, None, &mut || {
                let now = Instant::now();
                times.push(now.duration_since(last).as_secs_f64() * 1e3);
                last = now;
            });
            runs.push(times);
        }
        Ok(median_per_layer(&runs))
    }

    fn combine(
        &mut self,
        acts: &CpuBuf,
        image: usize,
        weights: &[f32],
        sem: Semantics,
    ) -> Result<(Vec<f32>, bool)> {
        let s = self.prepared()?.1.input_size;
        let [_, k, h, w] = acts.shape[..] else {
            return Err(Error::Invalid("combine: acts must be 4-D".into()));
        };
        if weights.len() != k {
            return Err(Error::Invalid(format!(
                "combine: {} weights for {k} channels",
                weights.len()
            )));
        }
        let a = &acts.data[image * k * h * w..][..k * h * w];
        Ok(combine_maps(a, k, h, w, s, weights, sem))
    }
}

/// Refuse a plan whose working set would not fit in the host memory available now, as
/// [`Error::OutOfMemory`] so the caller halves the mask batch. Without this, an absurd batch
/// would be allocated lazily by the kernel (overcommit) and the process killed by the OOM killer
/// mid-run instead of getting an error. The estimate: the forward's two ping-pong buffers at the
/// largest stage, the caller's image/mask buffers, one im2col buffer per thread.
fn check_host_memory(model: &Vgg, plan: Plan) -> Result<()> {
    let Some(available) = host_memory_available() else {
        return Ok(());
    };
    let s = plan.input_size;
    let shapes = model.stage_shapes(s);
    let widest = shapes
        .iter()
        .map(|m| m.c * m.h * m.w)
        .chain([3 * s * s])
        .max()
        .unwrap_or(0) as u128;
    let rows = plan.max_images.max(plan.max_masks) as u128;
    // A conv's input side is the previous stage's output side.
    let im2col = model
        .features
        .iter()
        .zip(std::iter::once(s).chain(shapes.iter().map(|m| m.h)))
        .filter_map(|(stage, h)| match stage {
            FeatureStage::Conv(l) => Some((l.cin * 9 * h * h) as u128),
            FeatureStage::MaxPool { .. } => None,
        })
        .max()
        .unwrap_or(0);
    let threads = rayon::current_num_threads() as u128;
    let need = 4 * (rows * (2 * widest + 2 * 3 * (s * s) as u128) + threads * im2col);
    if need > available as u128 * 9 / 10 {
        return Err(Error::OutOfMemory(format!(
            "host memory: a batch of {rows} inputs at {s}×{s} needs about {} MiB, {} MiB available",
            need >> 20,
            available >> 20
        )));
    }
    Ok(())
}

/// `MemAvailable` from /proc/meminfo in bytes (None where it cannot be read).
fn host_memory_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

// ---------------------------------------------------------------------------------------------
// The reference ops, as free functions so tests can call them against naive loops.

/// Forward `n` images `[n, 3, s, s]`. Returns logits `[n, classes]` and, if asked, the activations
/// at `capture` `[n, K, h, w]`.
pub fn forward(
    model: &Vgg,
    input: &[f32],
    n: usize,
    s: usize,
    capture: Option<Capture>,
) -> (Vec<f32>, Option<Vec<f32>>) {
    forward_timed(model, input, n, s, capture, &mut || {})
}

/// [`forward`], calling `after_layer` after each layer of
/// [`Vgg::layer_costs`](crate::model::Vgg::layer_costs) (per-layer timing).
pub fn forward_timed(
    model: &Vgg,
    input: &[f32],
    n: usize,
    s: usize,
    capture: Option<Capture>,
    after_layer: &mut dyn FnMut(),
) -> (Vec<f32>, Option<Vec<f32>>) {
    forward_with(model, input, n, s, capture, after_layer, None, false)
}

/// [`forward`] as `--precision fp8` computes it ([`Fp8Emulation`]): a forward with a capture is
/// a base forward, unquantized, that measures the FP8 layers' inputs and sets the scales; the
/// others quantize once scales exist.
pub fn forward_emulating_fp8(
    model: &Vgg,
    input: &[f32],
    n: usize,
    s: usize,
    capture: Option<Capture>,
    fp8: &mut Fp8Emulation,
) -> (Vec<f32>, Option<Vec<f32>>) {
    forward_with(model, input, n, s, capture, &mut || {}, Some(fp8), false)
}

/// The forward of [`forward`], [`forward_emulating_fp8`] and (`f16_storage`: each stage's output,
/// the pooled features and the hidden Linear outputs rounded to FP16, the input too) the FP16
/// storage twin ([`CpuBackend::emulate_fp16_storage`]).
#[allow(clippy::too_many_arguments)]
fn forward_with(
    model: &Vgg,
    input: &[f32],
    n: usize,
    s: usize,
    capture: Option<Capture>,
    after_layer: &mut dyn FnMut(),
    mut fp8: Option<&mut Fp8Emulation>,
    f16_storage: bool,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let round = |x: &mut [f32]| {
        if f16_storage {
            round_to_f16(x)
        }
    };
    let base = capture.is_some();
    // Two ping-pong activation buffers kept per thread: VGG16's first layers produce ~100 MB at
    // batch 8, and fresh allocations that size cost more in page faults than the copy they hold.
    let (mut xa, mut ya) = ACTS.with(|cell| cell.take());
    let result = {
        let (x, y) = (&mut xa, &mut ya);
        x.clear();
        x.extend_from_slice(&input[..n * 3 * s * s]);
        round(x);
        let (mut c, mut h, mut w) = (3, s, s);
        let mut captured = None;
        for (i, stage) in model.features.iter().enumerate() {
            // A pool has one output: its capture matches whatever `pre_relu` says (as on CUDA).
            let is_pool = matches!(stage, FeatureStage::MaxPool { .. });
            let here = |pre_relu: bool| {
                capture.is_some_and(|c| c.stage == i && (c.pre_relu == pre_relu || is_pool))
            };
            match stage {
                FeatureStage::Conv(l) => {
                    y.resize(n * l.cout * h * w, 0.0);
                    let quantized = match fp8.as_deref_mut() {
                        Some(emu) if base => {
                            emu.measure(i, x);
                            None
                        }
                        Some(emu) => emu.quantized(i, x),
                        None => None,
                    };
                    let (xin, weight) = match &quantized {
                        Some((xq, wq)) => (&xq[..], wq.unwrap_or(&l.weight[..])),
                        None => (&x[..], &l.weight[..]),
                    };
                    conv3x3_into(xin, n, c, h, w, weight, &l.bias, l.cout, !here(true), y);
                    round(y);
                    c = l.cout;
                    if here(true) {
                        captured = Some(y.clone());
                        relu(y);
                    }
                }
                FeatureStage::MaxPool { .. } => {
                    y.resize(n * c * (h / 2) * (w / 2), 0.0);
                    maxpool2_into(x, n * c, h, w, y);
                    (h, w) = (h / 2, w / 2);
                }
            }
            std::mem::swap(x, y);
            if here(false) {
                captured = Some(x.clone());
            }
            after_layer();
        }
        if let Some(emu) = fp8.filter(|_| base) {
            emu.finish_base();
        }
        let mut feats = adaptive_avgpool(x, n * c, h, w, POOLED, POOLED);
        round(&mut feats);
        if (h, w) != (POOLED, POOLED) {
            after_layer();
        }
        let last = model.classifier.len().saturating_sub(1);
        for (j, l) in model.classifier.iter().enumerate() {
            feats = linear(&feats, n, l.fin, &l.weight, &l.bias, l.fout);
            if l.relu {
                relu(&mut feats);
            }
            if j < last {
                round(&mut feats);
            }
            after_layer();
        }
        (feats, captured)
    };
    ACTS.with(|cell| cell.replace((xa, ya)));
    result
}

thread_local! {
    static ACTS: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
    static COLS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Conv 3×3, stride 1, pad 1 (no activation). `x` `[n, cin, h, w]`, `weight` `[cout, cin, 3, 3]`.
#[allow(clippy::too_many_arguments)]
pub fn conv3x3(
    x: &[f32],
    n: usize,
    cin: usize,
    h: usize,
    w: usize,
    weight: &[f32],
    bias: &[f32],
    cout: usize,
) -> Vec<f32> {
    let mut y = vec![0f32; n * cout * h * w];
    conv3x3_into(x, n, cin, h, w, weight, bias, cout, false, &mut y);
    y
}

/// Conv 3×3 (+ ReLU when `relu`) into `y` `[n, cout, h, w]`: im2col per image, then one gemm
/// `[cout, cin·9] × [cin·9, h·w]`. Images of a batch run in parallel, each with a per-thread
/// im2col buffer that is reused from call to call.
#[allow(clippy::too_many_arguments)]
pub fn conv3x3_into(
    x: &[f32],
    n: usize,
    cin: usize,
    h: usize,
    w: usize,
    weight: &[f32],
    bias: &[f32],
    cout: usize,
    relu: bool,
    y: &mut [f32],
) {
    let hw = h * w;
    // One image gets all threads inside gemm; a batch splits its images across threads.
    let inner = if n == 1 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    y[..n * cout * hw]
        .par_chunks_mut(cout * hw)
        .zip(x.par_chunks(cin * hw))
        .for_each(|(yi, xi)| {
            // Take the buffer out of the thread-local rather than borrowing it across the work:
            // rayon may run another image's closure on this thread while we wait inside im2col.
            let mut cols = COLS.with(|c| c.take());
            im2col3x3(xi, cin, h, w, &mut cols);
            for (o, row) in yi.chunks_mut(hw).enumerate() {
                row.fill(bias[o]);
            }
            matmul_acc(cout, hw, cin * 9, weight, &cols, yi, inner);
            COLS.with(|c| c.replace(cols));
            if relu {
                yi.iter_mut().for_each(|v| *v = v.max(0.0));
            }
        });
}

/// `[cin, h, w]` → `[cin·9, h·w]` patches into `cols`, zero padded.
fn im2col3x3(x: &[f32], cin: usize, h: usize, w: usize, cols: &mut Vec<f32>) {
    let hw = h * w;
    cols.clear();
    cols.resize(cin * 9 * hw, 0.0);
    // Parallel over channels: with one image this is the only parallelism outside gemm.
    cols.par_chunks_mut(9 * hw)
        .enumerate()
        .for_each(|(c, dst)| {
            let src = &x[c * hw..][..hw];
            for ky in 0..3 {
                for kx in 0..3 {
                    let row = &mut dst[(ky * 3 + kx) * hw..][..hw];
                    for oy in 0..h {
                        let iy = oy as isize + ky as isize - 1;
                        if iy < 0 || iy >= h as isize {
                            continue;
                        }
                        let srow = &src[iy as usize * w..][..w];
                        let drow = &mut row[oy * w..][..w];
                        // ox range where ix = ox + kx - 1 is inside [0, w)
                        let lo = (1 - kx as isize).max(0) as usize;
                        let hi = (w as isize + 1 - kx as isize).min(w as isize) as usize;
                        if lo < hi {
                            drow[lo..hi].copy_from_slice(&srow[lo + kx - 1..hi + kx - 1]);
                        }
                    }
                }
            }
        });
}

/// `c[m, n] += a[m, k] · b[k, n]`, all row-major.
pub(crate) fn matmul_acc(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    par: gemm::Parallelism,
) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    // SAFETY: the asserts above bound every index gemm touches with these strides.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            true,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// `y[n, fout] = x[n, fin] · Wᵀ + b` with `W` `[fout, fin]` (PyTorch Linear).
pub fn linear(
    x: &[f32],
    n: usize,
    fin: usize,
    weight: &[f32],
    bias: &[f32],
    fout: usize,
) -> Vec<f32> {
    let mut y: Vec<f32> = (0..n).flat_map(|_| bias.iter().copied()).collect();
    assert!(x.len() >= n * fin && weight.len() >= fout * fin);
    // SAFETY: W is read transposed: element (k, j) of Wᵀ is weight[j*fin + k] → col stride fin.
    unsafe {
        gemm::gemm(
            n,
            fout,
            fin,
            y.as_mut_ptr(),
            1,
            fout as isize,
            true,
            x.as_ptr(),
            1,
            fin as isize,
            weight.as_ptr(),
            fin as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        );
    }
    y
}

pub fn relu(x: &mut [f32]) {
    x.par_iter_mut().for_each(|v| *v = v.max(0.0));
}

/// MaxPool2d(2, 2), floor mode, over `planes` planes of `h × w`.
pub fn maxpool2(x: &[f32], planes: usize, h: usize, w: usize) -> Vec<f32> {
    let mut y = vec![0f32; planes * (h / 2) * (w / 2)];
    maxpool2_into(x, planes, h, w, &mut y);
    y
}

fn maxpool2_into(x: &[f32], planes: usize, h: usize, w: usize, y: &mut [f32]) {
    let (oh, ow) = (h / 2, w / 2);
    y[..planes * oh * ow]
        .par_chunks_mut(oh * ow)
        .enumerate()
        .for_each(|(p, dst)| {
            let src = &x[p * h * w..][..h * w];
            for oy in 0..oh {
                for ox in 0..ow {
                    let i = 2 * oy * w + 2 * ox;
                    dst[oy * ow + ox] = src[i].max(src[i + 1]).max(src[i + w]).max(src[i + w + 1]);
                }
            }
        });
}

/// Bin `i` of `out` over an input of `n`: PyTorch's adaptive pooling `[⌊i·n/out⌋, ⌈(i+1)·n/out⌉)`.
pub fn adaptive_bin(i: usize, n: usize, out: usize) -> (usize, usize) {
    (i * n / out, ((i + 1) * n).div_ceil(out))
}

/// The bins of AdaptiveAvgPool2d((oh, ow)) over an `h`×`w` plane, one per output in row-major
/// order: its rows and its columns ([`adaptive_bin`]). Shared by the pool and its gradient.
pub fn adaptive_bins(
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
) -> impl Iterator<Item = (Range<usize>, Range<usize>)> {
    (0..oh).flat_map(move |oy| {
        let (y0, y1) = adaptive_bin(oy, h, oh);
        (0..ow).map(move |ox| {
            let (x0, x1) = adaptive_bin(ox, w, ow);
            (y0..y1, x0..x1)
        })
    })
}

/// AdaptiveAvgPool2d((oh, ow)) with PyTorch's bins: `[start, end)` = `[⌊i·H/oh⌋, ⌈(i+1)·H/oh⌉)`.
pub fn adaptive_avgpool(
    x: &[f32],
    planes: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
) -> Vec<f32> {
    if (h, w) == (oh, ow) {
        return x[..planes * h * w].to_vec();
    }
    let mut y = vec![0f32; planes * oh * ow];
    y.par_chunks_mut(oh * ow).enumerate().for_each(|(p, dst)| {
        let src = &x[p * h * w..][..h * w];
        for (out, (ys, xs)) in dst.iter_mut().zip(adaptive_bins(h, w, oh, ow)) {
            let area = (ys.len() * xs.len()) as f32;
            let mut sum = 0f32;
            for yy in ys {
                sum += src[yy * w..][xs.clone()].iter().sum::<f32>();
            }
            *out = sum / area;
        }
    });
    y
}

/// Source index pair and weight of output coordinate `dst` for bilinear resampling `inp → out`:
/// half-pixel centres (PyTorch `align_corners=False`, clamped at 0) or `align_corners=True`.
#[inline]
pub fn bilinear_coord(
    dst: usize,
    inp: usize,
    out: usize,
    align_corners: bool,
) -> (usize, usize, f32) {
    let src = if align_corners {
        if out > 1 {
            dst as f32 * (inp - 1) as f32 / (out - 1) as f32
        } else {
            0.0
        }
    } else {
        ((dst as f32 + 0.5) * (inp as f32 / out as f32) - 0.5).max(0.0)
    };
    let i0 = (src as usize).min(inp - 1);
    let i1 = (i0 + 1).min(inp - 1);
    (i0, i1, src - i0 as f32)
}

/// Bilinear upsample of one `[h, w]` plane to `[s, s]`.
pub fn upsample_bilinear(a: &[f32], h: usize, w: usize, s: usize, align_corners: bool) -> Vec<f32> {
    let xs: Vec<_> = (0..s)
        .map(|x| bilinear_coord(x, w, s, align_corners))
        .collect();
    let mut u = vec![0f32; s * s];
    for (y, row) in u.chunks_mut(s).enumerate() {
        let (y0, y1, ly) = bilinear_coord(y, h, s, align_corners);
        for (x, v) in row.iter_mut().enumerate() {
            let (x0, x1, lx) = xs[x];
            let top = (1.0 - lx) * a[y0 * w + x0] + lx * a[y0 * w + x1];
            let bot = (1.0 - lx) * a[y1 * w + x0] + lx * a[y1 * w + x1];
            *v = (1.0 - ly) * top + ly * bot;
        }
    }
    u
}

/// The mask of one channel: `(U − min)/(max − min + eps)` of its upsample (zeros if degenerate);
/// with low-resolution statistics (torchcam) the channel is normalized first, then upsampled.
pub fn channel_mask(a: &[f32], h: usize, w: usize, s: usize, sem: Semantics) -> Vec<f32> {
    let normalize = |x: &mut [f32]| {
        let (lo, _) = min_max(x);
        // (x − min) / (max(x − min) + eps): torchcam's order of operations.
        x.iter_mut().for_each(|v| *v -= lo);
        let (_, hi) = min_max(x);
        let den = hi + sem.mask_eps();
        if den > 0.0 {
            x.iter_mut().for_each(|v| *v /= den);
        } else {
            x.fill(0.0);
        }
    };
    if sem.lowres_stats() {
        let mut low = a.to_vec();
        normalize(&mut low);
        return upsample_bilinear(&low, h, w, s, sem.align_corners());
    }
    let mut u = upsample_bilinear(a, h, w, s, sem.align_corners());
    normalize(&mut u);
    u
}

/// [`channel_mask`] scaled and with the item's noise added (see [`Backend::masked_inputs`]).
pub fn styled_mask(
    a: &[f32],
    h: usize,
    w: usize,
    s: usize,
    style: MaskStyle,
    item: &MaskItem,
) -> Vec<f32> {
    let mut m = channel_mask(a, h, w, s, style.sem);
    if style.scale != 1.0 {
        m.iter_mut().for_each(|v| *v *= style.scale);
    }
    if let Some(n) = style.noise {
        let base = u64::from(item.channel) * (s * s) as u64;
        for (p, v) in m.iter_mut().enumerate() {
            *v += normal_noise(n.seed, u64::from(item.sample), base + p as u64, n.sigma);
        }
    }
    m
}

pub fn min_max(x: &[f32]) -> (f32, f32) {
    x.iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        })
}

/// Per row of `logits` `[rows, c]`: the targets' softmax probabilities or raw logits.
pub fn score_rows(logits: &[f32], c: usize, targets: &[u32], probability: bool) -> Vec<f32> {
    let rows = logits.len() / c;
    let t = targets.len() / rows.max(1);
    let mut out = Vec::with_capacity(rows * t);
    for (r, row) in logits.chunks(c).enumerate() {
        let probs = probability.then(|| softmax(row));
        for &target in &targets[r * t..(r + 1) * t] {
            let j = target as usize;
            out.push(probs.as_ref().map_or(row[j], |p| p[j]));
        }
    }
    out
}

/// Numerically stable softmax.
pub fn softmax(x: &[f32]) -> Vec<f32> {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = x.iter().map(|v| (v - m).exp()).collect();
    let sum: f32 = e.iter().sum();
    e.into_iter().map(|v| v / sum).collect()
}

/// The combine op on one image's activations `a` `[k, h, w]` (see [`Backend::combine`]).
pub fn combine_maps(
    a: &[f32],
    k: usize,
    h: usize,
    w: usize,
    s: usize,
    weights: &[f32],
    sem: Semantics,
) -> (Vec<f32>, bool) {
    match sem {
        Semantics::Official => {
            // Σ_k w_k U_k exactly as the official code: upsample each channel, then sum.
            let mut sum = vec![0f32; s * s];
            for (kk, &wk) in weights.iter().enumerate().take(k) {
                if wk == 0.0 {
                    continue;
                }
                let u = upsample_bilinear(&a[kk * h * w..][..h * w], h, w, s, false);
                sum.iter_mut().zip(&u).for_each(|(acc, v)| *acc += wk * v);
            }
            relu(&mut sum);
            let flat = normalize_min_max(&mut sum);
            (sum, flat)
        }
        Semantics::ChannelSoftmax | Semantics::Torchcam => {
            let mut low = vec![0f32; h * w];
            for (kk, &wk) in weights.iter().enumerate().take(k) {
                let ak = &a[kk * h * w..][..h * w];
                low.iter_mut().zip(ak).for_each(|(acc, v)| *acc += wk * v);
            }
            relu(&mut low);
            (low, false)
        }
    }
}

/// Each value rounded to FP16 (round to nearest even) and back.
fn round_to_f16(x: &mut [f32]) {
    x.par_chunks_mut(1 << 16).for_each(|c| {
        c.iter_mut()
            .for_each(|v| *v = half::f16::from_f32(*v).to_f32())
    });
}

/// `model` with its conv weights and biases and its Linear weights rounded to FP16, as the FP16
/// CUDA path uploads them (Linear biases stay f32).
fn weights_rounded_to_f16(model: &Vgg) -> Vgg {
    let mut m = model.clone();
    for stage in &mut m.features {
        if let FeatureStage::Conv(l) = stage {
            round_to_f16(&mut l.weight);
            round_to_f16(&mut l.bias);
        }
    }
    for l in &mut m.classifier {
        round_to_f16(&mut l.weight);
    }
    m
}

/// Min-max normalize to [0, 1] in place; a constant map becomes zeros. Returns whether it was flat.
pub fn normalize_min_max(x: &mut [f32]) -> bool {
    let (lo, hi) = min_max(x);
    if hi > lo {
        x.iter_mut().for_each(|v| *v = (*v - lo) / (hi - lo));
        false
    } else {
        x.fill(0.0);
        true
    }
}
