//! cuDNN's graph (backend) API through cudarc's sys layer: a 3×3 convolution, its bias and its
//! ReLU as one operation graph (conv → add bias → ReLU, the intermediates virtual f32; for FP8
//! inputs conv → × descale → add bias → ReLU, and with an E4M3 output then × output scale, the
//! shape of cudnn-frontend's FP8 convolution sample), and the
//! execution plans cuDNN's heuristics (mode A) and fallback list offer for it. The autotuner in
//! `conv.rs` times these plans beside the legacy `cudnnConvolutionBiasActivationForward`
//! configurations and keeps the fastest per (layer, batch size).
//!
//! Tensors are FP16 NHWC (dims in N,C,H,W order with NHWC strides), filters KRSC, the bias
//! `[1, C, 1, 1]` (FP16, or f32 in the second form of an FP8 graph); compute in f32; an FP8
//! graph's output FP16 or E4M3. Every descriptor is an owned wrapper whose `Drop` never
//! panics.

use std::ffi::c_void;

use cudarc::cudnn::result::CudnnError;
use cudarc::cudnn::sys::{
    self, cudnnBackendAttributeName_t as Attr, cudnnBackendAttributeType_t as Ty,
    cudnnBackendDescriptorType_t as Kind,
};

use super::cudnn::Handle;

/// Unique ids of the variant pack's tensors.
const UID_X: i64 = 1;
const UID_W: i64 = 2;
const UID_B: i64 = 3;
const UID_Y: i64 = 4;
const UID_CONV_OUT: i64 = 5;
const UID_BIAS_OUT: i64 = 6;
const UID_DESCALE: i64 = 7;
const UID_DESCALED: i64 = 8;
const UID_SCALE_Y: i64 = 9;
const UID_RELU_OUT: i64 = 10;

/// What a graph computes in which types (see [`ConvGraph::conv_bias_relu`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GraphForm {
    /// E4M3 input and filter, the convolution descaled (else FP16).
    pub fp8: bool,
    /// An f32 bias (else FP16).
    pub bias_f32: bool,
    /// The output E4M3 at an output scale: the next FP8 layer's input, quantized here instead of
    /// by a kernel pass of its own (else FP16).
    pub e4m3_out: bool,
}

impl GraphForm {
    /// FP16 input, filter, bias and output.
    pub const FP16: GraphForm = GraphForm {
        fp8: false,
        bias_f32: false,
        e4m3_out: false,
    };

    /// An FP8 convolution.
    pub fn fp8(bias_f32: bool, e4m3_out: bool) -> GraphForm {
        GraphForm {
            fp8: true,
            bias_f32,
            e4m3_out,
        }
    }

    /// An FP16 convolution with an E4M3 output (the first conv before an FP8 one).
    pub const FP16_E4M3_OUT: GraphForm = GraphForm {
        fp8: false,
        bias_f32: false,
        e4m3_out: true,
    };
}

/// A hash of this file's text: the plan cache's choices are positions in the lists of the graphs
/// built here, so a change to how they are built or searched starts the cache afresh.
pub fn source_hash() -> u64 {
    twox_hash::XxHash64::oneshot(0, include_str!("cudnn_graph.rs").as_bytes())
}

/// Plans built per graph: the first that finalize from cuDNN's heuristic ranking, then from its
/// fallback list. Configurations that fail to finalize (common for fused and FP8 graphs) are
/// passed over for the next ones, as cudnn-frontend's samples and PyTorch walk the whole list.
/// An FP16 graph goes to the fallback list only when the ranking gives no plan: on the H200 the
/// ranking's configuration #0 or #2 won on every layer searched, never a fallback one, and each
/// plan's finalization costs about a second of the time budget.
const HEURISTIC_PLANS: usize = 3;
const FALLBACK_PLANS: usize = 2;
/// The same for FP8 and E4M3-output graphs: their finalization compiles fused kernels, and one
/// time budget must reach every FP8 layer of the full mask batch (and blocks 1–2's sub-batch)
/// before it runs out, so fewer plans per graph.
const FP8_HEURISTIC_PLANS: usize = 2;
const FP8_FALLBACK_PLANS: usize = 1;

/// An owned backend descriptor.
pub struct Desc(sys::cudnnBackendDescriptor_t);

impl Desc {
    fn new(kind: Kind) -> Result<Desc, CudnnError> {
        let mut d: sys::cudnnBackendDescriptor_t = std::ptr::null_mut();
        // SAFETY: valid out-pointer.
        unsafe { sys::cudnnBackendCreateDescriptor(kind, &mut d) }.result()?;
        Ok(Desc(d))
    }

    /// Set attribute `name` to `values` of backend type `ty` (`T` must be that type's C type).
    fn set<T>(&self, name: Attr, ty: Ty, values: &[T]) -> Result<&Self, CudnnError> {
        // SAFETY: `values` holds `len` elements of the C type `ty` names (the callers below
        // pair them: INT64 ↔ i64, FLOAT ↔ f32, DATA_TYPE ↔ cudnnDataType_t, ...).
        unsafe {
            sys::cudnnBackendSetAttribute(
                self.0,
                name,
                ty,
                values.len() as i64,
                values.as_ptr() as *const c_void,
            )
        }
        .result()?;
        Ok(self)
    }

    /// Set a descriptor-valued attribute (a list of other descriptors).
    fn set_descs(&self, name: Attr, descs: &[&Desc]) -> Result<&Self, CudnnError> {
        let raw: Vec<sys::cudnnBackendDescriptor_t> = descs.iter().map(|d| d.0).collect();
        self.set(name, Ty::CUDNN_TYPE_BACKEND_DESCRIPTOR, &raw)
    }

    fn finalize(&self) -> Result<(), CudnnError> {
        // SAFETY: a live descriptor.
        unsafe { sys::cudnnBackendFinalize(self.0) }.result()
    }

    fn get_i64(&self, name: Attr) -> Result<i64, CudnnError> {
        let mut v = 0i64;
        let mut n = 0i64;
        // SAFETY: one i64 out-value.
        unsafe {
            sys::cudnnBackendGetAttribute(
                self.0,
                name,
                Ty::CUDNN_TYPE_INT64,
                1,
                &mut n,
                &mut v as *mut i64 as *mut c_void,
            )
        }
        .result()?;
        Ok(v)
    }
}

impl Drop for Desc {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: created by cudnnBackendCreateDescriptor, destroyed once.
            let _ = unsafe { sys::cudnnBackendDestroyDescriptor(self.0) };
        }
    }
}

// SAFETY: plain host objects, used from one thread at a time (the backend is `&mut` per op).
unsafe impl Send for Desc {}

/// A tensor descriptor: logical dims `[n, c, h, w]`, NHWC strides.
fn tensor(
    uid: i64,
    dtype: sys::cudnnDataType_t,
    [n, c, h, w]: [i64; 4],
    is_virtual: bool,
) -> Result<Desc, CudnnError> {
    let d = Desc::new(Kind::CUDNN_BACKEND_TENSOR_DESCRIPTOR)?;
    d.set(
        Attr::CUDNN_ATTR_TENSOR_DATA_TYPE,
        Ty::CUDNN_TYPE_DATA_TYPE,
        &[dtype],
    )?
    .set(
        Attr::CUDNN_ATTR_TENSOR_DIMENSIONS,
        Ty::CUDNN_TYPE_INT64,
        &[n, c, h, w],
    )?
    .set(
        Attr::CUDNN_ATTR_TENSOR_STRIDES,
        Ty::CUDNN_TYPE_INT64,
        &[h * w * c, 1, w * c, c],
    )?
    .set(
        Attr::CUDNN_ATTR_TENSOR_UNIQUE_ID,
        Ty::CUDNN_TYPE_INT64,
        &[uid],
    )?
    .set(
        Attr::CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT,
        Ty::CUDNN_TYPE_INT64,
        &[16i64],
    )?
    .set(
        Attr::CUDNN_ATTR_TENSOR_IS_VIRTUAL,
        Ty::CUDNN_TYPE_BOOLEAN,
        &[is_virtual],
    )?;
    d.finalize()?;
    Ok(d)
}

/// A pointwise operation `y = mode(x[, b])` in f32.
fn pointwise(
    mode: sys::cudnnPointwiseMode_t,
    x: &Desc,
    b: Option<&Desc>,
    y: &Desc,
) -> Result<(Desc, Desc), CudnnError> {
    let pw = Desc::new(Kind::CUDNN_BACKEND_POINTWISE_DESCRIPTOR)?;
    pw.set(
        Attr::CUDNN_ATTR_POINTWISE_MODE,
        Ty::CUDNN_TYPE_POINTWISE_MODE,
        &[mode],
    )?
    .set(
        Attr::CUDNN_ATTR_POINTWISE_MATH_PREC,
        Ty::CUDNN_TYPE_DATA_TYPE,
        &[sys::cudnnDataType_t::CUDNN_DATA_FLOAT],
    )?;
    if mode == sys::cudnnPointwiseMode_t::CUDNN_POINTWISE_RELU_FWD {
        // ReLU spelled out as cudnn-frontend does: max(x, 0), no upper clip (the f32 maximum),
        // NaN propagation off as in PyTorch's cuDNN activation descriptor and our legacy path.
        pw.set(
            Attr::CUDNN_ATTR_POINTWISE_NAN_PROPAGATION,
            Ty::CUDNN_TYPE_NAN_PROPOGATION,
            &[sys::cudnnNanPropagation_t::CUDNN_NOT_PROPAGATE_NAN],
        )?
        .set(
            Attr::CUDNN_ATTR_POINTWISE_RELU_LOWER_CLIP,
            Ty::CUDNN_TYPE_DOUBLE,
            &[0.0f64],
        )?
        .set(
            Attr::CUDNN_ATTR_POINTWISE_RELU_UPPER_CLIP,
            Ty::CUDNN_TYPE_DOUBLE,
            &[f64::from(f32::MAX)],
        )?
        .set(
            Attr::CUDNN_ATTR_POINTWISE_RELU_LOWER_CLIP_SLOPE,
            Ty::CUDNN_TYPE_DOUBLE,
            &[0.0f64],
        )?;
    }
    pw.finalize()?;
    let op = Desc::new(Kind::CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR)?;
    op.set_descs(Attr::CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, &[&pw])?
        .set_descs(Attr::CUDNN_ATTR_OPERATION_POINTWISE_XDESC, &[x])?;
    if let Some(b) = b {
        op.set_descs(Attr::CUDNN_ATTR_OPERATION_POINTWISE_BDESC, &[b])?;
    }
    op.set_descs(Attr::CUDNN_ATTR_OPERATION_POINTWISE_YDESC, &[y])?
        .set(
            Attr::CUDNN_ATTR_OPERATION_POINTWISE_ALPHA1,
            Ty::CUDNN_TYPE_FLOAT,
            &[1.0f32],
        )?;
    if b.is_some() {
        op.set(
            Attr::CUDNN_ATTR_OPERATION_POINTWISE_ALPHA2,
            Ty::CUDNN_TYPE_FLOAT,
            &[1.0f32],
        )?;
    }
    op.finalize()?;
    Ok((pw, op))
}

/// The operation graph of one conv layer at one batch size: `y = ReLU(conv3x3(x, w) + b)`,
/// pad 1, stride 1. Keeps every descriptor the graph refers to alive.
pub struct ConvGraph {
    graph: Desc,
    /// Its types (an FP8 variant pack carries the descale, an E4M3 output's its scale).
    form: GraphForm,
    _parts: Vec<Desc>,
}

impl ConvGraph {
    /// `x` `[n, cin, h, w]`, `w` `[cout, cin, 3, 3]` KRSC, `b` `[1, cout, 1, 1]`, `y`
    /// `[n, cout, h, w]`, all FP16 ([`GraphForm::FP16`]); with `fp8`, `x` and `w` E4M3 and the
    /// convolution's f32 output multiplied by the descale (an f32 `[1, 1, 1, 1]` tensor in device
    /// memory: input scale × weight scale) before the bias and the ReLU; the bias f32 with
    /// `bias_f32` (a second form, should an engine refuse the first); with `e4m3_out` the ReLU's
    /// output multiplied by the output scale (another such tensor) and stored E4M3 (the
    /// hardware's conversion saturates at ±448), else stored FP16.
    pub fn conv_bias_relu(
        handle: &Handle,
        [n, cin, cout, h, w]: [usize; 5],
        form: GraphForm,
    ) -> Result<ConvGraph, CudnnError> {
        let half = sys::cudnnDataType_t::CUDNN_DATA_HALF;
        let float = sys::cudnnDataType_t::CUDNN_DATA_FLOAT;
        let e4m3 = sys::cudnnDataType_t::CUDNN_DATA_FP8_E4M3;
        let (fp8, bias_f32) = (form.fp8, form.bias_f32);
        let input = if fp8 { e4m3 } else { half };
        let (n, cin, cout, h, w) = (n as i64, cin as i64, cout as i64, h as i64, w as i64);
        let x = tensor(UID_X, input, [n, cin, h, w], false)?;
        let wt = tensor(UID_W, input, [cout, cin, 3, 3], false)?;
        let b = tensor(
            UID_B,
            if bias_f32 { float } else { half },
            [1, cout, 1, 1],
            false,
        )?;
        let y = tensor(
            UID_Y,
            if form.e4m3_out { e4m3 } else { half },
            [n, cout, h, w],
            false,
        )?;
        let conv_out = tensor(UID_CONV_OUT, float, [n, cout, h, w], true)?;
        let bias_out = tensor(UID_BIAS_OUT, float, [n, cout, h, w], true)?;

        let conv = Desc::new(Kind::CUDNN_BACKEND_CONVOLUTION_DESCRIPTOR)?;
        conv.set(
            Attr::CUDNN_ATTR_CONVOLUTION_COMP_TYPE,
            Ty::CUDNN_TYPE_DATA_TYPE,
            &[float],
        )?
        .set(
            Attr::CUDNN_ATTR_CONVOLUTION_CONV_MODE,
            Ty::CUDNN_TYPE_CONVOLUTION_MODE,
            &[sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION],
        )?
        .set(
            Attr::CUDNN_ATTR_CONVOLUTION_SPATIAL_DIMS,
            Ty::CUDNN_TYPE_INT64,
            &[2i64],
        )?
        .set(
            Attr::CUDNN_ATTR_CONVOLUTION_DILATIONS,
            Ty::CUDNN_TYPE_INT64,
            &[1i64, 1],
        )?
        .set(
            Attr::CUDNN_ATTR_CONVOLUTION_FILTER_STRIDES,
            Ty::CUDNN_TYPE_INT64,
            &[1i64, 1],
        )?
        .set(
            Attr::CUDNN_ATTR_CONVOLUTION_PRE_PADDINGS,
            Ty::CUDNN_TYPE_INT64,
            &[1i64, 1],
        )?
        .set(
            Attr::CUDNN_ATTR_CONVOLUTION_POST_PADDINGS,
            Ty::CUDNN_TYPE_INT64,
            &[1i64, 1],
        )?;
        conv.finalize()?;

        let conv_op = Desc::new(Kind::CUDNN_BACKEND_OPERATION_CONVOLUTION_FORWARD_DESCRIPTOR)?;
        conv_op
            .set_descs(Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_X, &[&x])?
            .set_descs(Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_W, &[&wt])?
            .set_descs(
                Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_Y,
                &[&conv_out],
            )?
            .set_descs(
                Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_CONV_DESC,
                &[&conv],
            )?
            .set(
                Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_ALPHA,
                Ty::CUDNN_TYPE_FLOAT,
                &[1.0f32],
            )?
            .set(
                Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_BETA,
                Ty::CUDNN_TYPE_FLOAT,
                &[0.0f32],
            )?;
        conv_op.finalize()?;
        // FP8: conv_out · descale → descaled, which the bias is added to.
        let mut scaling = Vec::new();
        if fp8 {
            let descale = tensor(UID_DESCALE, float, [1, 1, 1, 1], false)?;
            let descaled = tensor(UID_DESCALED, float, [n, cout, h, w], true)?;
            let (mul, mul_op) = pointwise(
                sys::cudnnPointwiseMode_t::CUDNN_POINTWISE_MUL,
                &conv_out,
                Some(&descale),
                &descaled,
            )?;
            scaling = vec![descale, descaled, mul, mul_op];
        }
        let (add, add_op) = pointwise(
            sys::cudnnPointwiseMode_t::CUDNN_POINTWISE_ADD,
            scaling.get(1).unwrap_or(&conv_out),
            Some(&b),
            &bias_out,
        )?;
        // An E4M3 output: ReLU → relu_out · scale_y → y; else ReLU → y.
        let mut out_scaling = Vec::new();
        if form.e4m3_out {
            out_scaling = vec![
                tensor(UID_SCALE_Y, float, [1, 1, 1, 1], false)?,
                tensor(UID_RELU_OUT, float, [n, cout, h, w], true)?,
            ];
        }
        let (relu, relu_op) = pointwise(
            sys::cudnnPointwiseMode_t::CUDNN_POINTWISE_RELU_FWD,
            &bias_out,
            None,
            out_scaling.get(1).unwrap_or(&y),
        )?;
        if form.e4m3_out {
            let (mul, mul_op) = pointwise(
                sys::cudnnPointwiseMode_t::CUDNN_POINTWISE_MUL,
                &out_scaling[1],
                Some(&out_scaling[0]),
                &y,
            )?;
            out_scaling.extend([mul, mul_op]);
        }

        let graph = Desc::new(Kind::CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR)?;
        let raw_handle = handle.raw();
        let mut ops = vec![&conv_op];
        ops.extend(scaling.get(3));
        ops.extend([&add_op, &relu_op]);
        ops.extend(out_scaling.get(3));
        graph
            .set_descs(Attr::CUDNN_ATTR_OPERATIONGRAPH_OPS, &ops)?
            .set(
                Attr::CUDNN_ATTR_OPERATIONGRAPH_HANDLE,
                Ty::CUDNN_TYPE_HANDLE,
                &[raw_handle],
            )?;
        graph.finalize()?;
        let mut parts = vec![
            x, wt, b, y, conv_out, bias_out, conv, conv_op, add, add_op, relu, relu_op,
        ];
        parts.extend(scaling);
        parts.extend(out_scaling);
        Ok(ConvGraph {
            graph,
            form,
            _parts: parts,
        })
    }

    /// Every engine configuration cuDNN offers for this graph from `mode`, best first.
    fn heuristic(&self, mode: sys::cudnnBackendHeurMode_t) -> Result<Vec<Desc>, CudnnError> {
        let heur = Desc::new(Kind::CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR)?;
        heur.set_descs(Attr::CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, &[&self.graph])?
            .set(
                Attr::CUDNN_ATTR_ENGINEHEUR_MODE,
                Ty::CUDNN_TYPE_HEUR_MODE,
                &[mode],
            )?;
        heur.finalize()?;
        let mut available = 0i64;
        // SAFETY: a count query (no output array).
        unsafe {
            sys::cudnnBackendGetAttribute(
                heur.0,
                Attr::CUDNN_ATTR_ENGINEHEUR_RESULTS,
                Ty::CUDNN_TYPE_BACKEND_DESCRIPTOR,
                0,
                &mut available,
                std::ptr::null_mut(),
            )
        }
        .result()?;
        let want = available.max(0) as usize;
        if want == 0 {
            return Ok(Vec::new());
        }
        let cfgs = (0..want)
            .map(|_| Desc::new(Kind::CUDNN_BACKEND_ENGINECFG_DESCRIPTOR))
            .collect::<Result<Vec<_>, _>>()?;
        let mut raw: Vec<sys::cudnnBackendDescriptor_t> = cfgs.iter().map(|d| d.0).collect();
        let mut returned = 0i64;
        // SAFETY: `raw` holds `want` created engine-config descriptors for cuDNN to fill.
        unsafe {
            sys::cudnnBackendGetAttribute(
                heur.0,
                Attr::CUDNN_ATTR_ENGINEHEUR_RESULTS,
                Ty::CUDNN_TYPE_BACKEND_DESCRIPTOR,
                want as i64,
                &mut returned,
                raw.as_mut_ptr() as *mut c_void,
            )
        }
        .result()?;
        let mut cfgs = cfgs;
        cfgs.truncate(returned.clamp(0, want as i64) as usize);
        Ok(cfgs)
    }

    /// The execution plans to time for this graph, in preference order: the first
    /// [`HEURISTIC_PLANS`] that finalize with workspace ≤ `ws_cap` among heuristics mode A's
    /// configurations, then (FP16: only if those gave none) the first [`FALLBACK_PLANS`] of the
    /// fallback list's (for FP8 and E4M3-output graphs [`FP8_HEURISTIC_PLANS`] and
    /// [`FP8_FALLBACK_PLANS`], the fallback list always; an FP16 mode A plan that finalizes
    /// but then fails to run still keeps the fallback list untried). Each plan's `origin` is its
    /// configuration's list and place in it. `search` counts what happened on the way (for the
    /// report). Past
    /// `deadline` no further configuration is tried: finalizing one may compile kernels, and a
    /// graph whose configurations all fail would otherwise run far past the time budget.
    ///
    /// With `only` = (fallback list, place in it) — a configuration a complete search chose
    /// before ([`super::plan_cache`]) — just that one is finalized (none if it no longer does).
    pub fn plans(
        &self,
        handle: &Handle,
        ws_cap: usize,
        search: &mut PlanSearch,
        deadline: std::time::Instant,
        only: Option<(bool, usize)>,
    ) -> Vec<GraphPlan> {
        let mut out = Vec::new();
        let (heuristic, fallback) = if self.form == GraphForm::FP16 {
            (HEURISTIC_PLANS, FALLBACK_PLANS)
        } else {
            (FP8_HEURISTIC_PLANS, FP8_FALLBACK_PLANS)
        };
        for (mode, cap) in [
            (sys::cudnnBackendHeurMode_t::CUDNN_HEUR_MODE_A, heuristic),
            (
                sys::cudnnBackendHeurMode_t::CUDNN_HEUR_MODE_FALLBACK,
                fallback,
            ),
        ] {
            let fallback = mode == sys::cudnnBackendHeurMode_t::CUDNN_HEUR_MODE_FALLBACK;
            if only.is_some_and(|(f, _)| f != fallback) {
                continue;
            }
            if fallback && self.form == GraphForm::FP16 && !out.is_empty() {
                break;
            }
            let before = out.len();
            let cfgs = match self.heuristic(mode) {
                Ok(cfgs) => cfgs,
                Err(e) => {
                    // This mode offers nothing (e.g. no engine supports the graph).
                    search.error(format!("heuristics {mode:?}: {e}"));
                    continue;
                }
            };
            search.offered += cfgs.len();
            for (pos, cfg) in cfgs.into_iter().enumerate() {
                if only.is_some_and(|(_, p)| p != pos) {
                    continue;
                }
                if out.len() - before == cap {
                    break;
                }
                if std::time::Instant::now() >= deadline {
                    search.skipped += 1;
                    search.error("the time budget ran out during the plan search".into());
                    return out;
                }
                match self.plan(handle, cfg, (fallback, pos), ws_cap) {
                    Ok(Some(plan)) => out.push(plan),
                    Ok(None) => search.over_workspace += 1,
                    Err(e) => {
                        search.finalize_failed += 1;
                        let name = config_name((fallback, pos));
                        search.error(format!("finalizing engine {name}: {e}"));
                    }
                }
            }
        }
        out
    }

    /// The execution plan of one engine configuration; None if it needs more than `ws_cap`
    /// bytes of workspace.
    fn plan(
        &self,
        handle: &Handle,
        cfg: Desc,
        origin: (bool, usize),
        ws_cap: usize,
    ) -> Result<Option<GraphPlan>, CudnnError> {
        let plan = Desc::new(Kind::CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR)?;
        plan.set(
            Attr::CUDNN_ATTR_EXECUTION_PLAN_HANDLE,
            Ty::CUDNN_TYPE_HANDLE,
            &[handle.raw()],
        )?
        .set_descs(Attr::CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, &[&cfg])?
        .finalize()?;
        let ws = plan
            .get_i64(Attr::CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE)?
            .max(0) as usize;
        Ok((ws <= ws_cap).then_some(GraphPlan {
            plan,
            _cfg: cfg,
            ws,
            origin,
            form: self.form,
        }))
    }
}

/// What the plan searches of one kind (FP16 or FP8 graphs) met, for the report: a one-shot GPU
/// run must tell why a kind of plan never ran, not only that it did not.
#[derive(Clone, Debug, Default)]
pub struct PlanSearch {
    /// Operation graphs built, and those cuDNN refused to build.
    pub graphs: usize,
    pub graph_failed: usize,
    /// Engine configurations the heuristics offered.
    pub offered: usize,
    /// Configurations that did not finalize, or needed more workspace than allowed.
    pub finalize_failed: usize,
    pub over_workspace: usize,
    /// Plans that failed to execute when tried, and plans timed.
    pub execute_failed: usize,
    pub timed: usize,
    /// Wall time spent building, finalizing and timing (what the budget limits).
    pub spent: std::time::Duration,
    /// Searches not started, or cut short, because the budget was spent.
    pub skipped: usize,
    /// Searches answered by the plan cache (a remembered plan, or none), with no search.
    pub cached: usize,
    /// The first few distinct errors.
    pub errors: Vec<String>,
}

impl PlanSearch {
    /// Keep `what` if it is new and there is room (printed with `SCORECAM_CUDA_VERBOSE=1`).
    pub fn error(&mut self, what: String) {
        if super::device::verbose() {
            eprintln!("cuda: graph API: {what}");
        }
        if self.errors.len() < 8 && !self.errors.contains(&what) {
            self.errors.push(what);
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "graphs_built": self.graphs,
            "graphs_refused": self.graph_failed,
            "configs_offered": self.offered,
            "finalize_failed": self.finalize_failed,
            "over_workspace": self.over_workspace,
            "execute_failed": self.execute_failed,
            "plans_timed": self.timed,
            "skipped_over_budget": self.skipped,
            "from_plan_cache": self.cached,
            "seconds": self.spent.as_secs_f64(),
            "errors": self.errors,
        })
    }
}

/// How reports name the configuration at `origin`: `config #2` (the second after the first of
/// heuristics mode A's ranking), `fallback config #0`.
pub fn config_name((fallback, pos): (bool, usize)) -> String {
    format!("{}config #{pos}", if fallback { "fallback " } else { "" })
}

/// A finalized execution plan of a [`ConvGraph`].
pub struct GraphPlan {
    plan: Desc,
    _cfg: Desc,
    pub ws: usize,
    /// Its configuration's list (the fallback one, or mode A's ranking) and place in it: its
    /// name, and what the plan cache remembers.
    pub origin: (bool, usize),
    /// Its graph's types: the execution passes the f32 bias for `bias_f32`, the output scale
    /// for `e4m3_out`.
    pub form: GraphForm,
}

/// Device addresses of one execution.
#[derive(Clone, Copy, Debug)]
pub struct GraphPtrs {
    pub x: u64,
    pub w: u64,
    pub bias: u64,
    pub y: u64,
    pub ws: u64,
    /// The f32 descale of an FP8 plan (ignored by FP16 plans).
    pub descale: u64,
    /// The f32 output scale of an E4M3-output plan (ignored by the others).
    pub scale_y: u64,
}

impl GraphPlan {
    /// Run the plan on the handle's stream.
    ///
    /// # Safety
    /// The pointers must be live device allocations matching the graph's tensors (x
    /// `[n,h,w,cin]`, w KRSC, bias `[cout]`, y `[n,h,w,cout]` in the form's types, the FP8
    /// descale and output scale f32) and the workspace must hold ≥ `self.ws` bytes. A pointer
    /// not 16-byte aligned is an error.
    pub unsafe fn execute(&self, handle: &Handle, p: GraphPtrs) -> Result<(), CudnnError> {
        let mut ids = vec![UID_X, UID_W, UID_B, UID_Y];
        let mut addrs = vec![p.x, p.w, p.bias, p.y];
        if self.form.fp8 {
            ids.push(UID_DESCALE);
            addrs.push(p.descale);
        }
        if self.form.e4m3_out {
            ids.push(UID_SCALE_Y);
            addrs.push(p.scale_y);
        }
        // Every tensor is declared 16-byte aligned: a pointer that is not would be a misaligned
        // load on the device (a sticky error that ends the context), so refuse it here and let
        // the caller fall back.
        if addrs.iter().any(|a| a % 16 != 0) {
            return Err(CudnnError(
                sys::cudnnStatus_t::CUDNN_STATUS_BAD_PARAM_MISALIGNED_POINTER,
            ));
        }
        let pack = Desc::new(Kind::CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR)?;
        let ptrs: Vec<*mut c_void> = addrs.into_iter().map(|a| a as *mut c_void).collect();
        let ws = if self.ws == 0 {
            std::ptr::null_mut()
        } else {
            p.ws as *mut c_void
        };
        pack.set(
            Attr::CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS,
            Ty::CUDNN_TYPE_INT64,
            &ids,
        )?
        .set(
            Attr::CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS,
            Ty::CUDNN_TYPE_VOID_PTR,
            &ptrs,
        )?
        .set(
            Attr::CUDNN_ATTR_VARIANT_PACK_WORKSPACE,
            Ty::CUDNN_TYPE_VOID_PTR,
            &[ws],
        )?;
        pack.finalize()?;
        sys::cudnnBackendExecute(handle.raw(), self.plan.0, pack.0).result()
    }
}
