//! The forward pass on the device: feature stages (cuDNN conv+bias+ReLU, max-pool kernel),
//! the adaptive average pool, the classifier (cuBLAS), in that order, ping-ponging between the
//! two arena buffers. What the feature stages read and write where is `forward_plan.rs`'s plan;
//! here each of its steps becomes a launch. Batches run at a planned size (see `conv.rs`);
//! blocks 1–2 may run in sub-batches (`Prefix`), and a masked-forward batch is replayed from a
//! CUDA graph captured on its first run.

use std::collections::HashMap;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, CudaSlice, CudaView, CudaViewMut};
use half::f16;

use super::blas;
use super::conv::{ConvInput, ConvKey, ConvRun, Fp8Run};
use super::conv_direct;
use super::cudnn::{self, ActDesc};
use super::device::{blas_err, drv_err, ptr, verbose, Dev};
use super::forward_plan::{
    self, Buf, CaptureAt, FeaturePlan, Format, PlanShape, Prefix, Span, StageRoute, Step,
};
use super::kernels::Kernels;
use super::profile::LayerEvents;
use super::weights::{DevConv, DevModel};
use super::Prepared;
use crate::error::{Error, Result};
use crate::model::{Capture, FeatureStage, Vgg, POOLED};

/// Where the activations are copied during a forward: the capture stage's output (pre-ReLU
/// when asked) for the first `rows` rows into `acts`.
pub(super) struct CaptureTo<'a> {
    pub at: Capture,
    pub acts: &'a mut CudaSlice<f16>,
    pub rows: usize,
}

/// Masked-forward batches captured as CUDA graphs, by what a graph bakes in or depends on: rows,
/// the input, logits and cuDNN workspace addresses (a workspace replaced by a batch size planned
/// on first use leaves the older graphs unmatched), FP8 scales ready.
#[derive(Default)]
pub(super) struct Graphs {
    pub enabled: bool,
    cache: HashMap<GraphKey, CudaGraph>,
    pub captured: usize,
    pub replays: usize,
    /// Why graphs were turned off (a capture failed), for the report.
    pub disabled: Option<String>,
}

/// (rows, input, logits, workspace, FP8 scales ready).
type GraphKey = (usize, u64, u64, u64, bool);

/// Graphs kept at most (each holds its launches' parameters; a run uses a handful of keys).
const MAX_GRAPHS: usize = 64;

impl Graphs {
    pub fn new() -> Self {
        Graphs {
            enabled: !std::env::var("SCORECAM_CUDA_GRAPHS").is_ok_and(|v| v == "0"),
            ..Graphs::default()
        }
    }

    pub fn clear(&mut self) {
        self.cache.clear();
    }
}

/// Everything a forward pass borrows from the backend.
pub(super) struct Pass<'a> {
    pub dev: &'a Dev,
    pub dnn: &'a cudnn::Handle,
    pub blas: &'a blas::Handle,
    pub kernels: &'a Kernels,
    pub relu: &'a ActDesc,
    pub identity: &'a ActDesc,
    pub dm: &'a DevModel,
    pub prep: &'a mut Prepared,
}

impl Pass<'_> {
    /// Forward `rows` rows of `x` into `logits` `[rows, classes]` f32: from the graph of this
    /// batch when there is one (captured now on first use) unless activations are captured or
    /// layers timed, else launch by launch.
    pub fn run(
        &mut self,
        x: &CudaSlice<f16>,
        rows: usize,
        logits: &mut CudaSlice<f32>,
        capture: Option<CaptureTo<'_>>,
        timer: Option<&mut LayerEvents>,
        graphs: &mut Graphs,
    ) -> Result<()> {
        if capture.is_some() || timer.is_some() || !graphs.enabled {
            return self.eager(x, rows, logits, capture, timer);
        }
        if let Some(graph) = graphs.cache.get(&self.graph_key(x, rows, logits)) {
            graph
                .launch()
                .map_err(|e| drv_err(&format!("replaying the forward graph (batch {rows})"), e))?;
            graphs.replays += 1;
            return Ok(());
        }
        // First sight of this batch: run it launch by launch (this call's result), so that
        // whatever happens only once (a size planned on first use, a workspace grown, a
        // library's lazy start-up) happens outside the capture; then record it for next time.
        self.eager(x, rows, logits, None, None)?;
        if graphs.cache.len() >= MAX_GRAPHS {
            // Buffers replaced over a long run leave graphs no key will match again.
            graphs.cache.clear();
        }
        // The key after the run: it may have grown the workspace.
        let key = self.graph_key(x, rows, logits);
        match self.capture(x, rows, logits) {
            Ok(g) => {
                graphs.captured += 1;
                graphs.cache.insert(key, g);
            }
            Err(e) => {
                // Launch by launch from now on; the result is the same, only slower.
                if verbose() {
                    eprintln!("cuda: CUDA graphs off, capture failed: {e}");
                }
                graphs.enabled = false;
                graphs.disabled = Some(e.to_string());
            }
        }
        Ok(())
    }

    fn graph_key(&self, x: &CudaSlice<f16>, rows: usize, logits: &CudaSlice<f32>) -> GraphKey {
        let s = &self.dev.stream;
        // FP8 plans run once scales exist: a graph captured before then is an FP16 one.
        let fp8 = self.prep.fp8.as_ref().is_some_and(|f| f.ready);
        (
            rows,
            ptr(x, s),
            ptr(logits, s),
            ptr(&self.prep.workspace, s),
            fp8,
        )
    }

    /// Record one forward of `rows` rows as a graph (nothing runs during the capture).
    fn capture(
        &mut self,
        x: &CudaSlice<f16>,
        rows: usize,
        logits: &mut CudaSlice<f32>,
    ) -> Result<CudaGraph> {
        let stream = &self.dev.stream;
        let op = format!("capturing the forward graph (batch {rows})");
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| Error::cuda(&op, e))?;
        let recorded = self.eager(x, rows, logits, None, None);
        // End the capture whatever happened, so the stream is usable again.
        let ended = stream.end_capture(CUgraphInstantiate_flags(0));
        recorded?;
        ended
            .map_err(|e| Error::cuda(&op, e))?
            .ok_or_else(|| Error::cuda(&op, "the capture recorded nothing"))
    }

    /// The forward, launch by launch: its feature stages' plan (see `forward_plan.rs`), then
    /// the head.
    pub fn eager(
        &mut self,
        x: &CudaSlice<f16>,
        rows: usize,
        logits: &mut CudaSlice<f32>,
        mut capture: Option<CaptureTo<'_>>,
        mut timer: Option<&mut LayerEvents>,
    ) -> Result<()> {
        if let Some(t) = timer.as_deref_mut() {
            t.mark(self.dev)?;
        }
        let prefix = self
            .prep
            .prefix_for(rows)
            .filter(|_| capture.is_none() && timer.is_none());
        // A base forward (it captures activations) runs FP16 and measures the FP8 layers'
        // inputs; the other forwards run the FP8 plans once scales exist.
        let routes = match capture {
            None => self.prep.fp8_routes(&self.dm.model, rows, prefix),
            Some(_) => None,
        };
        let at = capture.as_ref().map(|c| CaptureAt {
            stage: c.at.stage,
            pre_relu: c.at.pre_relu,
            rows: c.rows,
        });
        let plan =
            self.plan(|shape| forward_plan::features(shape, rows, prefix, routes.as_deref(), at))?;
        for step in &plan.steps {
            self.step(step, x, capture.as_mut(), timer.as_deref_mut())?;
        }
        let out = plan
            .out
            .ok_or_else(|| Error::Invalid("a model without feature stages".into()))?;
        self.head(out, rows, logits, timer)
    }

    /// Feature stages `0..end` on `rows` rows of `x`, in sub-batches of `sub` rows when given
    /// (`rows` a multiple of it), in FP16: blocks 1–2 alone, as `prepare` times them.
    pub fn prefix_stages(
        &mut self,
        x: &CudaSlice<f16>,
        rows: usize,
        end: usize,
        sub: Option<usize>,
    ) -> Result<()> {
        let plan = self.plan(|shape| forward_plan::prefix(shape, rows, end, sub, None))?;
        for step in &plan.steps {
            self.step(step, x, None, None)?;
        }
        Ok(())
    }

    /// `build`'s plan for this model and arena.
    fn plan(
        &self,
        build: impl FnOnce(&PlanShape<'_>) -> Result<FeaturePlan>,
    ) -> Result<FeaturePlan> {
        let features = &self.dm.model.features;
        let is_conv: Vec<bool> = features
            .iter()
            .map(|f| matches!(f, FeatureStage::Conv(_)))
            .collect();
        let fp8_filters: Vec<bool> = self.prep.fp8.as_ref().map_or_else(Vec::new, |f| {
            f.filters.iter().map(Option::is_some).collect()
        });
        let fused_pool: Vec<bool> = (0..features.len())
            .map(|i| self.prep.convs.pool_fused(i).is_some())
            .collect();
        let fp8_fused_pool: Vec<[bool; 2]> = (0..features.len())
            .map(|i| self.prep.convs.fp8_pool_fused(i).map(|b| b.is_some()))
            .collect();
        let fused_block: Vec<bool> = (0..features.len())
            .map(|i| self.prep.convs.block_fused(i))
            .collect();
        build(&PlanShape {
            is_conv: &is_conv,
            dims: &self.prep.dims,
            fp8_filters: &fp8_filters,
            fused_pool: &fused_pool,
            fp8_fused_pool: &fp8_fused_pool,
            fused_block: &fused_block,
        })
    }

    /// One step of a forward plan on input `x` (the capture's and timer's steps need them).
    fn step(
        &mut self,
        step: &Step,
        x: &CudaSlice<f16>,
        capture: Option<&mut CaptureTo<'_>>,
        timer: Option<&mut LayerEvents>,
    ) -> Result<()> {
        let stream = &self.dev.stream;
        let kernels = self.kernels;
        let Prepared {
            bufs,
            workspace,
            convs,
            fp8,
            dims,
            ..
        } = &mut *self.prep;
        let no_fp8 =
            |stage: usize| Error::Invalid(format!("stage {stage}: an FP8 step without FP8 state"));
        match *step {
            Step::StageDone { .. } => {
                if let Some(t) = timer {
                    t.mark(self.dev)?;
                }
            }
            // A base forward is done: the FP8 layers' scales from the amaxes it measured (no FP8
            // state: nothing to scale).
            Step::Fp8Scales => {
                if let Some(f) = fp8.as_mut() {
                    f.scales_from_amax(kernels, stream)?;
                }
            }
            Step::Amax { stage, x: xs } => {
                let f = fp8.as_mut().ok_or_else(|| no_fp8(stage))?;
                let v = view(x, bufs, xs)?;
                kernels.amax_abs_f16(
                    stream,
                    &v,
                    xs.len,
                    &mut f.amax.slice_mut(stage..stage + 1),
                )?;
            }
            Step::Quantize {
                stage,
                x: xs,
                y: ys,
            } => {
                let f = fp8.as_mut().ok_or_else(|| no_fp8(stage))?;
                // The FP8 input buffer is written from its start, one code per value.
                if (ys.buf, ys.at, ys.len) != (Buf::Fp8Input, 0, xs.len) {
                    return Err(Error::Invalid(format!(
                        "stage {stage}: quantizing {xs:?} into {ys:?}"
                    )));
                }
                f.quantize_input(kernels, stream, stage, &view(x, bufs, xs)?)?;
            }
            Step::Dequantize {
                stage,
                x: xs,
                y: ys,
            } => {
                let f = fp8.as_ref().ok_or_else(|| no_fp8(stage))?;
                let (xv, mut yv) = io(x, bufs, xs, ys)?;
                kernels.dequantize_e4m3(
                    stream,
                    &codes(&xv, xs)?,
                    xs.len,
                    &f.multiplier(stage),
                    &mut yv,
                )?;
            }
            Step::Conv {
                stage,
                rows,
                identity,
                route,
                x: xs,
                y: ys,
            } => {
                let layer = conv_layer(self.dm, stage)?;
                // An FP8 plan's codes in the FP8 input buffer: their address.
                let x8 = match xs.buf {
                    Buf::Fp8Input => {
                        let f = fp8.as_ref().ok_or_else(|| no_fp8(stage))?;
                        let v = f.x8.try_slice(xs.bytes()).ok_or_else(|| out_of_range(xs))?;
                        Some(ptr(&v, stream))
                    }
                    _ => None,
                };
                let (xv, mut yv) = match x8 {
                    Some(_) => (None, view_mut(bufs, ys)?),
                    None => {
                        let (xv, yv) = io(x, bufs, xs, ys)?;
                        (Some(xv), yv)
                    }
                };
                let input = match (xs.format, &xv, x8) {
                    (Format::E4m3, None, Some(p)) => ConvInput::E4m3(p),
                    (Format::E4m3, Some(v), None) => ConvInput::E4m3(ptr(v, stream)),
                    (Format::F16, Some(v), None) => ConvInput::Half(v),
                    _ => {
                        return Err(Error::Invalid(format!(
                            "stage {stage}: a conv reading {xs:?}"
                        )))
                    }
                };
                let mut run = ConvRun {
                    dev: self.dev,
                    dnn: self.dnn,
                    kernels,
                    plans: convs,
                    workspace,
                    act: if identity { self.identity } else { self.relu },
                    fp8: fp8.as_mut().filter(|_| route.fp8 || route.e4m3_out),
                };
                let key = ConvKey {
                    stage,
                    rows,
                    identity,
                };
                run.run(layer, key, dims[stage], input, &mut yv, route)?;
            }
            Step::ConvPool {
                stage,
                rows,
                route,
                x: xs,
                y: ys,
            } if route.fp8 => {
                let layer = conv_layer(self.dm, stage)?;
                let build = convs.fp8_pool_fused(stage)[route.e4m3_out as usize];
                let (Some(build), Some(f)) = (build, fp8.as_mut()) else {
                    return Err(Error::Invalid(format!(
                        "stage {stage}: no FP8 conv + pool planned"
                    )));
                };
                // E4M3 codes: the FP8 input buffer's, or the previous stage's in the arena.
                let x = match xs.buf {
                    Buf::Fp8Input => ptr(
                        &f.x8.try_slice(xs.bytes()).ok_or_else(|| out_of_range(xs))?,
                        stream,
                    ),
                    _ => ptr(&io(x, bufs, xs, ys)?.0, stream),
                };
                let y = ptr(&view_mut(bufs, ys)?, stream);
                let d = dims[stage];
                let dims = [rows, d.in_h, d.in_w];
                let mut run = Fp8Run {
                    kernels,
                    state: f,
                    stage,
                    next: route.next,
                };
                let (input, out) = (ConvInput::E4m3(x), (route.e4m3_out, true));
                // SAFETY: the plan's spans: `x` the stage's E4M3 input, `y` its pooled output in
                // the other buffer (io checked them apart), nothing else using `y` until the
                // launch is done.
                unsafe { run.execute_wg(self.dev, (build, layer), input, y, dims, out) }?;
            }
            Step::ConvPool {
                stage,
                rows,
                x: xs,
                y: ys,
                ..
            } => {
                let layer = conv_layer(self.dm, stage)?;
                let variant = convs.pool_fused(stage).ok_or_else(|| {
                    Error::Invalid(format!("stage {stage}: no fused conv + pool planned"))
                })?;
                let d = dims[stage];
                let (xv, yv) = io(x, bufs, xs, ys)?;
                let dims = [rows, d.in_h, d.in_w];
                // SAFETY: the plan's spans: `x` and `y` in different buffers (io checked them),
                // nothing else using `y` until the launch is done.
                unsafe {
                    conv_direct::launch_pool(
                        self.dev,
                        kernels,
                        layer,
                        variant,
                        dims,
                        (&xv, &yv),
                        None,
                    )
                }?;
            }
            Step::BlockPool {
                stage,
                rows,
                x: xs,
                y: ys,
            } => {
                if !convs.block_fused(stage) {
                    return Err(Error::Invalid(format!(
                        "stage {stage}: no fused first block planned"
                    )));
                }
                let layers = [conv_layer(self.dm, stage)?, conv_layer(self.dm, stage + 1)?];
                let d = dims[stage];
                let (xv, yv) = io(x, bufs, xs, ys)?;
                let dims = [rows, d.in_h, d.in_w];
                // SAFETY: as for the fused conv + pool.
                unsafe {
                    conv_direct::launch_block1(self.dev, kernels, layers, dims, (&xv, &yv), None)
                }?;
            }
            Step::Pool {
                stage,
                rows,
                x: xs,
                y: ys,
            } => {
                let d = dims[stage];
                let (xv, mut yv) = io(x, bufs, xs, ys)?;
                match (xs.format, ys.format) {
                    (Format::F16, Format::F16) => {
                        kernels.maxpool2(stream, &xv, rows, d.in_h, d.in_w, d.in_c, &mut yv)?
                    }
                    (Format::E4m3, Format::E4m3) => {
                        // SAFETY: the output span's bytes (any byte is a valid u8), within the
                        // view that covers them.
                        let mut yb = unsafe { yv.transmute_mut::<u8>(ys.len) }
                            .ok_or_else(|| out_of_range(ys))?;
                        let xb = codes(&xv, xs)?;
                        kernels.maxpool2_e4m3(stream, &xb, rows, d.in_h, d.in_w, d.in_c, &mut yb)?
                    }
                    _ => {
                        return Err(Error::Invalid(format!(
                            "stage {stage}: pooling {xs:?} into {ys:?}"
                        )))
                    }
                }
            }
            Step::Capture { stage, y: ys } => {
                let c = capture.ok_or_else(|| {
                    Error::Invalid(format!("stage {stage}: a capture step with no capture"))
                })?;
                let have = c.acts.len();
                let mut dst = c.acts.try_slice_mut(..ys.len).ok_or_else(|| {
                    Error::Invalid(format!(
                        "stage {stage}: {} activations to capture, room for {have}",
                        ys.len
                    ))
                })?;
                stream
                    .memcpy_dtod(&view(x, bufs, ys)?, &mut dst)
                    .map_err(|e| drv_err("forward: capturing activations", e))?;
            }
            Step::Relu { y: ys } => {
                kernels.relu_f16(stream, &mut view_mut(bufs, ys)?, ys.len)?;
            }
        }
        Ok(())
    }

    /// Adaptive average pool (skipped when the map is already 7×7) and the classifier, from
    /// arena buffer `cur`.
    fn head(
        &mut self,
        mut cur: usize,
        rows: usize,
        logits: &mut CudaSlice<f32>,
        mut timer: Option<&mut LayerEvents>,
    ) -> Result<()> {
        let stream = &self.dev.stream;
        let (fh, fw, fc) = self.prep.feat;
        if (fh, fw) != (POOLED, POOLED) {
            let (input, output, _) = read_write(&mut self.prep.bufs, cur);
            self.kernels.adaptive_avgpool(
                stream,
                &input.slice(..rows * fh * fw * fc),
                rows,
                fh,
                fw,
                fc,
                POOLED,
                POOLED,
                &mut output.slice_mut(..rows * POOLED * POOLED * fc),
            )?;
            cur = 1 - cur;
            if let Some(t) = timer.as_deref_mut() {
                t.mark(self.dev)?;
            }
        }

        // Row-major Y[n, out] = X[n, in] · Wᵀ (+ b) with W [out, in] row-major. cuBLAS is
        // column-major: a row-major [r, c] matrix is a column-major [c, r] one with leading
        // dimension c. So compute Yᵀ[out, n] = W[out, in] · Xᵀ[in, n] column-major:
        //   A = W   stored col-major [in, out] (ld = in) → op(A) = Aᵀ = W   (transa = T)
        //   B = Xᵀ  stored col-major [in, n]   (ld = in) → op(B) = B        (transb = N)
        //   C = Yᵀ  stored col-major [out, n]  (ld = out); m = out, n = rows, k = in.
        let last = self.dm.linears.len() - 1;
        for (j, l) in self.dm.linears.iter().enumerate() {
            let (input, output, _) = read_write(&mut self.prep.bufs, cur);
            let xp = ptr(input, stream);
            let wp = ptr(&l.weight, stream);
            let (yp, out_f32) = if j == last {
                (ptr(&*logits, stream), true)
            } else {
                (ptr(&*output, stream), false)
            };
            // SAFETY: input holds ≥ rows·fin f16 values, weight fout·fin, output rows·fout of its
            // type (arena rows ≥ rows, per-row size ≥ every fout; logits checked by the caller).
            unsafe { blas::gemm_tn(self.blas, l.fout, rows, l.fin, wp, xp, yp, out_f32) }
                .map_err(|e| blas_err(&format!("linear classifier layer {j} (batch {rows})"), e))?;
            if j == last {
                self.kernels.bias_f32(
                    stream,
                    &mut logits.slice_mut(..rows * l.fout),
                    &l.bias32.as_view(),
                    rows,
                    l.fout,
                )?;
            } else {
                self.kernels.bias_act_f16(
                    stream,
                    &mut output.slice_mut(..rows * l.fout),
                    &l.bias16.as_view(),
                    rows,
                    l.fout,
                    l.relu,
                )?;
                cur = 1 - cur;
            }
            if let Some(t) = timer.as_deref_mut() {
                t.mark(self.dev)?;
            }
        }
        Ok(())
    }
}

/// Conv stage `stage`'s uploaded layer.
fn conv_layer(dm: &DevModel, stage: usize) -> Result<&DevConv> {
    dm.convs
        .get(stage)
        .and_then(Option::as_ref)
        .ok_or_else(|| Error::Invalid(format!("stage {stage}: no conv uploaded")))
}

/// The ping-pong arena: buffer `cur` to read, the other one to write, and the other one's index.
fn read_write(
    bufs: &mut [CudaSlice<f16>; 2],
    cur: usize,
) -> (&CudaSlice<f16>, &mut CudaSlice<f16>, usize) {
    let [b0, b1] = bufs;
    if cur == 0 {
        (&*b0, b1, 1)
    } else {
        (&*b1, b0, 0)
    }
}

/// A span's bytes as FP16 words (its last word whole).
fn words(s: Span) -> Result<std::ops::Range<usize>> {
    if !s.at.is_multiple_of(2) {
        return Err(Error::Invalid(format!(
            "forward plan: {s:?} starts mid-word"
        )));
    }
    let b = s.bytes();
    Ok(b.start / 2..b.end.div_ceil(2))
}

fn out_of_range(s: Span) -> Error {
    Error::Invalid(format!("forward plan: {s:?} is outside its buffer"))
}

/// The words of a span of the input or an arena buffer, to read.
fn view<'b>(
    x: &'b CudaSlice<f16>,
    bufs: &'b [CudaSlice<f16>; 2],
    s: Span,
) -> Result<CudaView<'b, f16>> {
    let whole = match s.buf {
        Buf::Input => x,
        Buf::Arena(i) if i < 2 => &bufs[i],
        _ => return Err(out_of_range(s)),
    };
    whole.try_slice(words(s)?).ok_or_else(|| out_of_range(s))
}

/// The words of a span of an arena buffer, to write.
fn view_mut(bufs: &mut [CudaSlice<f16>; 2], s: Span) -> Result<CudaViewMut<'_, f16>> {
    let whole = match s.buf {
        Buf::Arena(i) if i < 2 => &mut bufs[i],
        _ => return Err(out_of_range(s)),
    };
    whole
        .try_slice_mut(words(s)?)
        .ok_or_else(|| out_of_range(s))
}

/// A step's input (the forward's input or an arena buffer) and output (the other arena
/// buffer): a step never writes the buffer it reads.
fn io<'b>(
    x: &'b CudaSlice<f16>,
    bufs: &'b mut [CudaSlice<f16>; 2],
    xs: Span,
    ys: Span,
) -> Result<(CudaView<'b, f16>, CudaViewMut<'b, f16>)> {
    let [b0, b1] = bufs;
    let (write, other) = match ys.buf {
        Buf::Arena(0) => (b0, &*b1),
        Buf::Arena(1) => (b1, &*b0),
        _ => return Err(out_of_range(ys)),
    };
    let read = match xs.buf {
        Buf::Input => x,
        Buf::Arena(i) if i < 2 && xs.buf != ys.buf => other,
        _ => {
            return Err(Error::Invalid(format!(
                "forward plan: a step reading {xs:?} writes {ys:?}"
            )))
        }
    };
    let r = read.try_slice(words(xs)?).ok_or_else(|| out_of_range(xs))?;
    let w = write
        .try_slice_mut(words(ys)?)
        .ok_or_else(|| out_of_range(ys))?;
    Ok((r, w))
}

/// The E4M3 codes of span `s`, read through `v`, its words.
fn codes<'b>(v: &CudaView<'b, f16>, s: Span) -> Result<CudaView<'b, u8>> {
    // SAFETY: the span's bytes, within the words that cover them; any byte is a valid u8.
    unsafe { v.transmute::<u8>(s.len) }.ok_or_else(|| out_of_range(s))
}

impl Prepared {
    /// Blocks 1–2's sub-batching, if it applies to a forward of `rows` rows (a multiple of the
    /// sub-batch, larger than it).
    pub(super) fn prefix_for(&self, rows: usize) -> Option<Prefix> {
        self.prefix
            .filter(|p| rows > p.rows && rows.is_multiple_of(p.rows))
    }

    /// The route of a masked forward of `rows` rows under `--precision fp8` once scales exist
    /// (None: every stage FP16): which convs run FP8 and where activations stay E4M3 — the one
    /// that costs least in all by the tuning's timings ([`forward_plan::route`]), or FP8 wherever
    /// a plan exists when FP8 is preferred — and its cost (ms, with that of every stage run
    /// FP16 beside it; None when preferred or a stage went untimed).
    pub(super) fn fp8_routes_costed(
        &self,
        model: &Vgg,
        rows: usize,
        prefix: Option<Prefix>,
    ) -> Option<(Vec<StageRoute>, Option<[f32; 2]>)> {
        let f = self.fp8.as_ref().filter(|f| f.ready)?;
        let capable: Vec<bool> = f.filters.iter().map(Option::is_some).collect();
        let is_conv = |stage: usize| matches!(model.features[stage], FeatureStage::Conv(_));
        let n = model.features.len();
        if f.prefer {
            let forms: Vec<_> = (0..n)
                .map(|stage| {
                    is_conv(stage).then(|| {
                        let (rows, _) = forward_plan::stage_runs(prefix, stage, rows);
                        self.convs.fp8_forms(ConvKey {
                            stage,
                            rows,
                            identity: false,
                        })
                    })
                })
                .collect();
            return Some((forward_plan::route_preferring(&forms, &capable), None));
        }
        let is_conv: Vec<bool> = (0..n).map(is_conv).collect();
        let (costs, complete) =
            forward_plan::forward_costs(&is_conv, rows, prefix, |stage, rows| {
                self.convs.route_costs(stage, rows, is_conv[stage])
            });
        let (routes, ms) = forward_plan::route(&costs);
        Some((
            routes,
            complete.then(|| [ms, forward_plan::fp16_cost(&costs)]),
        ))
    }

    /// [`Prepared::fp8_routes_costed`]'s routes.
    pub(super) fn fp8_routes(
        &self,
        model: &Vgg,
        rows: usize,
        prefix: Option<Prefix>,
    ) -> Option<Vec<StageRoute>> {
        self.fp8_routes_costed(model, rows, prefix).map(|r| r.0)
    }
}
