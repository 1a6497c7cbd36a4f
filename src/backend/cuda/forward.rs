//! The forward pass on the device: feature stages (cuDNN conv+bias+ReLU, max-pool kernel),
//! the adaptive average pool, the classifier (cuBLAS), in that order, ping-ponging between the
//! two arena buffers. Batches run at a planned size (see `conv.rs`); blocks 1–2 may run in
//! sub-batches (`Prefix`), and a masked-forward batch is replayed from a CUDA graph captured on
//! its first run.

use std::collections::HashMap;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, CudaSlice, CudaView, CudaViewMut};
use half::f16;

use super::blas;
use super::conv::{ConvKey, ConvRun};
use super::cudnn::{self, ActDesc};
use super::device::{blas_err, drv_err, ptr, verbose, Dev};
use super::fp8::{self, StageRoute};
use super::kernels::Kernels;
use super::profile::LayerEvents;
use super::weights::DevModel;
use super::{Prepared, StageDims};
use crate::error::{Error, Result};
use crate::model::{Capture, FeatureStage, Vgg, POOLED};

/// Blocks 1–2 (`end` feature stages) run `rows` rows at a time: their activations (the largest
/// of the network) then stay in L2 between a conv and the next layer. Chosen at `prepare` by
/// timing, only when faster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Prefix {
    pub end: usize,
    pub rows: usize,
}

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

    /// The forward, launch by launch.
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
        let stages = self.dm.model.features.len();
        let mut first = 0;
        // `cur`: the buffer holding the current activations (None: the input x).
        let mut cur: Option<usize> = None;
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
        let route = |stage: usize| routes.as_ref().map(|r| r[stage]).unwrap_or_default();
        if let Some(p) = prefix {
            cur = self.prefix_stages(x, rows, p.end, Some(p.rows), routes.as_deref())?;
            first = p.end;
        }
        for stage in first..stages {
            cur = Some(self.stage(stage, x, cur, rows, 0, capture.as_mut(), route(stage))?);
            if let Some(t) = timer.as_deref_mut() {
                t.mark(self.dev)?;
            }
        }
        let cur = cur.ok_or_else(|| Error::Invalid("a model without feature stages".into()))?;
        if capture.is_some() {
            self.fp8_scales()?;
        }
        self.head(cur, rows, logits, timer)
    }

    /// After a base forward: the FP8 layers' scales from the input amaxes it measured.
    fn fp8_scales(&mut self) -> Result<()> {
        let Some(f) = self.prep.fp8.as_mut() else {
            return Ok(());
        };
        let layers = f.filters.len();
        self.kernels.fp8_scales(
            &self.dev.stream,
            &mut f.amax.slice_mut(..),
            &f.w_scale.slice(..),
            layers,
            crate::backend::fp8::MARGIN,
            &mut f.scales.slice_mut(..),
        )?;
        f.ready = true;
        Ok(())
    }

    /// Feature stages `0..end` on `rows` rows of `x`, in sub-batches of `sub` rows when given
    /// (`rows` a multiple of it), routed by `routes` (None: FP16). Returns the arena buffer
    /// holding the output (None if `end` is 0).
    pub fn prefix_stages(
        &mut self,
        x: &CudaSlice<f16>,
        rows: usize,
        end: usize,
        sub: Option<usize>,
        routes: Option<&[StageRoute]>,
    ) -> Result<Option<usize>> {
        let step = sub.unwrap_or(rows).clamp(1, rows.max(1));
        let mut cur = None;
        for chunk in 0..rows / step {
            let mut c = None;
            for stage in 0..end {
                let route = routes.map(|r| r[stage]).unwrap_or_default();
                c = Some(self.stage(stage, x, c, step, chunk * step, None, route)?);
            }
            cur = c;
        }
        Ok(cur)
    }

    /// Feature stage `stage` on `rows` rows starting at row `row0`, reading `cur` (None: `x`)
    /// and writing the other arena buffer at the same rows, as `route` says (an E4M3 input or
    /// output: one byte per value at the start of the FP16 rows). Returns the buffer written.
    #[allow(clippy::too_many_arguments)]
    fn stage(
        &mut self,
        stage: usize,
        x: &CudaSlice<f16>,
        cur: Option<usize>,
        rows: usize,
        row0: usize,
        capture: Option<&mut CaptureTo<'_>>,
        route: StageRoute,
    ) -> Result<usize> {
        // An FP16 conv after an E4M3 output reads it dequantized, from the other buffer.
        let cur = match route.dequantizes() {
            true => Some(self.dequantize_input(stage, cur, rows, row0)?),
            false => cur,
        };
        let d: StageDims = self.prep.dims[stage];
        let (out_len, in_len) = (d.out_len(), d.in_len());
        let out_elems = rows * out_len;
        let Prepared {
            bufs,
            workspace,
            convs,
            fp8,
            ..
        } = &mut *self.prep;
        let (input, output, next): (&CudaSlice<f16>, &mut CudaSlice<f16>, usize) = match cur {
            None => (x, &mut bufs[0], 0),
            Some(cur) => read_write(bufs, cur),
        };
        let x_view = input.slice(row0 * in_len..(row0 + rows) * in_len);
        let mut y_view = output.slice_mut(row0 * out_len..row0 * out_len + out_elems);
        // A base forward measures the FP8 layers' inputs.
        if let (Some(f), Some(c)) = (fp8.as_mut(), capture.as_deref()) {
            if f.filters[stage].is_some() {
                let real = c.rows * in_len;
                self.kernels.amax_abs_f16(
                    &self.dev.stream,
                    &x_view.slice(..real),
                    real,
                    &mut f.amax.slice_mut(stage..stage + 1),
                )?;
            }
        }
        let fp8_run = fp8.as_mut().filter(|_| route.fp8 || route.e4m3_out);
        let capture = capture.filter(|c| c.at.stage == stage);
        let stream = &self.dev.stream;
        match &self.dm.model.features[stage] {
            FeatureStage::Conv(_) if route.packed_out => {
                return Err(Error::Invalid(format!(
                    "stage {stage}: a sub-batched prefix must end with a pool to pack E4M3 rows"
                )));
            }
            FeatureStage::Conv(_) => {
                let layer = self.dm.convs[stage]
                    .as_ref()
                    .ok_or_else(|| Error::Invalid(format!("stage {stage}: no conv uploaded")))?;
                let pre = capture.as_ref().is_some_and(|c| c.at.pre_relu);
                let mut run = ConvRun {
                    dev: self.dev,
                    dnn: self.dnn,
                    kernels: self.kernels,
                    plans: convs,
                    workspace,
                    act: if pre { self.identity } else { self.relu },
                    fp8: fp8_run,
                };
                let key = ConvKey {
                    stage,
                    rows,
                    identity: pre,
                };
                run.run(layer, key, d, &x_view, &mut y_view, route)?;
                if let Some(c) = capture {
                    copy_rows(self.dev, &y_view.as_view(), c, out_len)?;
                    if pre {
                        self.kernels.relu_f16(stream, &mut y_view, out_elems)?;
                    }
                }
            }
            FeatureStage::MaxPool { .. } if route.e4m3_in => {
                let (n_in, n_out) = (rows * in_len, out_elems);
                let out_of_range =
                    || Error::Invalid(format!("stage {stage}: E4M3 pool views out of range"));
                // SAFETY: E4M3 codes (bytes) in the first bytes of the FP16 rows, which hold
                // twice as many bytes; any byte is a valid u8.
                let xb = unsafe { x_view.transmute::<u8>(n_in) }.ok_or_else(out_of_range)?;
                // The output's first byte: that of its FP16 rows, or, for the last stage of a
                // sub-batched prefix, its rows packed from the buffer's first byte (where the
                // full-batch stage after the prefix reads them).
                let at = if route.packed_out { 1 } else { 2 } * row0 * out_len;
                // SAFETY: the buffer's bytes as u8 (twice its FP16 length).
                let mut bytes = unsafe { output.transmute_mut::<u8>(2 * output.len()) }
                    .ok_or_else(out_of_range)?;
                let mut yb = bytes
                    .try_slice_mut(at..at + n_out)
                    .ok_or_else(out_of_range)?;
                self.kernels
                    .maxpool2_e4m3(stream, &xb, rows, d.in_h, d.in_w, d.in_c, &mut yb)?;
            }
            FeatureStage::MaxPool { .. } => {
                self.kernels.maxpool2(
                    stream,
                    &x_view,
                    rows,
                    d.in_h,
                    d.in_w,
                    d.in_c,
                    &mut y_view,
                )?;
                if let Some(c) = capture {
                    copy_rows(self.dev, &y_view.as_view(), c, out_len)?;
                }
            }
        }
        Ok(next)
    }

    /// The E4M3 codes conv stage `stage` reads (`rows` rows from `row0` in arena buffer `cur`)
    /// as FP16 values, at the stage's multiplier, in the other buffer at the same rows. Returns
    /// that buffer.
    fn dequantize_input(
        &mut self,
        stage: usize,
        cur: Option<usize>,
        rows: usize,
        row0: usize,
    ) -> Result<usize> {
        let in_len = self.prep.dims[stage].in_len();
        let Prepared { bufs, fp8, .. } = &mut *self.prep;
        let (Some(cur), Some(f)) = (cur, fp8.as_ref()) else {
            return Err(Error::Invalid(format!(
                "stage {stage}: an E4M3 input needs an earlier stage and FP8 scales"
            )));
        };
        let (src, dst, other) = read_write(bufs, cur);
        let (at, n) = (row0 * in_len, rows * in_len);
        let x = src.slice(at..at + n);
        // SAFETY: the codes are the first n bytes of these rows' FP16 span; any byte is a u8.
        let codes = unsafe { x.transmute::<u8>(n) }
            .ok_or_else(|| Error::Invalid(format!("stage {stage}: E4M3 input out of range")))?;
        self.kernels.dequantize_e4m3(
            &self.dev.stream,
            &codes,
            n,
            &f.multiplier(stage),
            &mut dst.slice_mut(at..at + n),
        )?;
        Ok(other)
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

/// Copy the first `c.rows` rows (of `row_len` values) of a stage's output into the capture.
fn copy_rows(
    dev: &Dev,
    y: &CudaView<'_, f16>,
    c: &mut CaptureTo<'_>,
    row_len: usize,
) -> Result<()> {
    let n = c.rows * row_len;
    let mut dst: CudaViewMut<'_, f16> = c.acts.slice_mut(..n);
    dev.stream
        .memcpy_dtod(&y.slice(..n), &mut dst)
        .map_err(|e| drv_err("forward: capturing activations", e))
}

impl Prepared {
    /// Blocks 1–2's sub-batching, if it applies to a forward of `rows` rows (a multiple of the
    /// sub-batch, larger than it).
    pub(super) fn prefix_for(&self, rows: usize) -> Option<Prefix> {
        self.prefix
            .filter(|p| rows > p.rows && rows.is_multiple_of(p.rows))
    }

    /// The route of a masked forward of `rows` rows under `--precision fp8` once scales exist
    /// (None: every stage FP16): which convs run FP8 and where activations stay E4M3, from the
    /// FP8 plans of the keys this forward runs (blocks 1–2 at the `prefix` sub-batch size).
    pub(super) fn fp8_routes(
        &self,
        model: &Vgg,
        rows: usize,
        prefix: Option<Prefix>,
    ) -> Option<Vec<StageRoute>> {
        self.fp8.as_ref().filter(|f| f.ready)?;
        let forms: Vec<_> = model
            .features
            .iter()
            .enumerate()
            .map(|(stage, f)| {
                if !matches!(f, FeatureStage::Conv(_)) {
                    return None;
                }
                let rows = match prefix {
                    Some(p) if stage < p.end => p.rows,
                    _ => rows,
                };
                Some(self.convs.fp8_forms(ConvKey {
                    stage,
                    rows,
                    identity: false,
                }))
            })
            .collect();
        let mut routes = fp8::route(&forms);
        // Sub-batched blocks 1–2 write each chunk's activations at its own rows; an E4M3 output
        // of the prefix's last stage (a pool) is packed instead, the layout the full batch after
        // it reads (see `stage`).
        if let Some(r) = prefix.and_then(|p| routes.get_mut(p.end.checked_sub(1)?)) {
            r.packed_out = r.e4m3_out;
        }
        Some(routes)
    }
}
