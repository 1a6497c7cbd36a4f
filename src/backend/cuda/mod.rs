//! CUDA backend: cuDNN convolutions, cuBLAS linears, hand-written kernels. Everything is loaded
//! at run time; with no driver, library, device or function, [`CudaBackend::new`] returns
//! `Error::CudaUnavailable` and never panics.
//!
//! The data goes one way through these files:
//! - `device.rs`: opening the device (libraries, `symbols.rs`, context, stream), buffers, copies;
//! - `weights.rs`: the model uploaded in device layouts (`layout.rs`);
//! - `prepare.rs`: the arena, every batch size planned and tuned (`conv.rs` over cuDNN's legacy
//!   API `cudnn.rs`, its graph API `cudnn_graph.rs` and the hand-written `conv_direct.rs`);
//! - `forward_plan.rs`: a forward's feature stages as data (which launch reads and writes which
//!   bytes of which buffer), run on the CPU by `tests/forward_plan.rs`;
//! - `forward.rs`: the forward pass (the plan's steps, average pool, classifier via `blas.rs`),
//!   CUDA graphs of masked-forward batches;
//! - `kernels/`: each hand-written kernel file's launchers (masks, scores, combine, ...);
//! - `profile.rs`: stage and per-layer timing with CUDA events.
//!
//! # Layout and precision
//! Images, masked inputs and activations are FP16 NHWC on the device. Input images are stored
//! with [`CPAD`] channels (3 real, the rest zero) so the first convolution sees an aligned,
//! tensor-core-friendly channel count; its filters are zero-padded to match. Conv filters are
//! KRSC (cuDNN filter format NHWC), biases FP16. Linears run on cuBLAS with FP16 inputs and FP32
//! accumulation; hidden layers write FP16, the last one FP32 logits. The feature map is
//! flattened in H,W,C order (NHWC), so the first Linear's columns are permuted from PyTorch's
//! C,H,W order once at upload.
//!
//! # Plans and memory
//! `prepare` uploads the weights (once per model), allocates the arena — two ping-pong
//! activation buffers sized for the largest stage at `max(max_images, max_masks)` rows, one
//! shared cuDNN workspace, the small buffers — and plans every batch size a run will use (the
//! ladders of `conv.rs`), timing cuDNN's candidates on random data. Nothing is planned or
//! allocated per image or batch in the steady state, and the host waits for the device once per
//! image group (the scores), not once per batch.
//!
//! One stream carries all work; the context's cross-stream event tracking is disabled, so raw
//! device pointers can be handed to cuDNN/cuBLAS without cudarc recording events.

pub mod kernels;

mod blas;
mod conv;
mod conv_direct;
mod cudnn;
mod cudnn_graph;
mod device;
mod forward;
pub mod forward_plan;
mod fp8;
mod layout;
mod plan_cache;
mod prepare;
mod profile;
mod symbols;
mod weights;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaViewMut};
use half::f16;
use serde_json::json;

use crate::backend::{
    not_prepared, Backend, MaskItem, MaskStyle, Plan, Precision, Semantics, Stage,
};
use crate::error::{Error, Result};
use crate::model::{MapShape, Vgg};

use self::conv::{BatchLadder, ConvPlans};
use self::cudnn::{ActDesc, ActMode};
use self::device::{
    count_devices, drv_err, gpu_oom, open_device, panic_message, unavailable, BufData, Dev, Grow,
    UploadRing,
};
use self::forward::{CaptureTo, Graphs, Pass};
use self::forward_plan::{Prefix, StageDims};
use self::kernels::Kernels;
use self::profile::{LayerEvents, Profiler};
use self::weights::DevModel;

pub use self::conv::{GraphUse, PlanChoice};
pub use self::conv_direct::DirectUse;
pub use self::device::CudaBuf;
pub use self::layout::{
    conv_filter_krsc, conv_filter_krsc_e4m3, nchw_to_nhwc_f16, nhwc_f16_to_nchw,
};
use self::plan_cache::PlanCache;

/// Channels of an input image as stored on the device (3 real + zeros). 8 FP16 values = 16
/// bytes per pixel: the channel multiple cuDNN's FP16 tensor-core NHWC kernels are built for,
/// and one 16-byte vector per pixel for the mask/preprocess kernels. Measured on the H100 through
/// cudarc (FP16 NHWC, batch 256, 2026-11): the first conv takes the same time with C = 3 and C = 8
/// (≈ 27 TFLOP/s) — it is bound by writing
/// its 64-channel output — so the padding costs nothing there; the only extra cost is the masked
/// inputs' size (2.7× the bytes of C = 3, ≈ 0.1 ms of HBM traffic per 256 masks).
pub const CPAD: usize = 8;

/// Values of the page-locked upload ring (mask items and score targets, u32): 4 MiB, the items
/// of several groups of 32 images × 512 channels.
const UPLOAD_RING: usize = 1 << 20;

/// cuBLAS's own workspace (NVIDIA's recommendation for Hopper), given to it so it never
/// allocates (which a CUDA graph capture forbids).
const CUBLAS_WORKSPACE: usize = 32 << 20;

/// Per-plan state: the arena, the planned batch sizes and their convolution plans.
/// How a masked forward runs its feature stages under `--precision fp8` (see
/// [`CudaBackend::fp8_route`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Fp8Route {
    /// Convs that run an FP8 plan (their inputs and filters E4M3).
    pub fp8: Vec<usize>,
    /// Stages whose output stays E4M3: convs quantizing for the next conv, pools between.
    pub e4m3_out: Vec<usize>,
    /// FP16 convs that read their input dequantized from E4M3 (E4M3-rounded values).
    pub dequantized_inputs: Vec<usize>,
}

impl Fp8Route {
    fn of(routes: &[forward_plan::StageRoute]) -> Fp8Route {
        let stages = |keep: fn(&forward_plan::StageRoute) -> bool| -> Vec<usize> {
            (0..routes.len()).filter(|&i| keep(&routes[i])).collect()
        };
        Fp8Route {
            fp8: stages(|r| r.conv && r.fp8),
            e4m3_out: stages(|r| r.e4m3_out),
            dequantized_inputs: stages(|r| r.dequantizes()),
        }
    }
}

struct Prepared {
    plan: Plan,
    rows_max: usize,
    dims: Vec<StageDims>,
    /// Features' output (stored channels == logical channels).
    feat: (usize, usize, usize),
    capture: MapShape,
    bufs: [CudaSlice<f16>; 2],
    workspace: CudaSlice<u8>,
    convs: ConvPlans,
    /// Batch sizes planned for masked-input forwards and for image (base) forwards.
    masks: BatchLadder,
    images: BatchLadder,
    /// Blocks 1–2 in sub-batches, when timing at prepare found it faster.
    prefix: Option<Prefix>,
    /// The prefix timings behind that choice: (sub-batch rows, 0 = whole batch; ms).
    prefix_ms: Vec<(usize, f32)>,
    /// `--precision fp8`: filters, scales and the quantized-input buffer.
    fp8: Option<fp8::Fp8State>,
    /// Where the set-up's time went: (phase, seconds), in order (the conv tuning's passes
    /// before the tuning as a whole).
    setup_s: Vec<(&'static str, f64)>,
}

impl Prepared {
    /// The planned size a forward of `n` rows runs at, given buffers of `cap` rows.
    fn run_rows(&self, n: usize, cap: usize, capturing: bool) -> Option<usize> {
        planned_rows(
            &self.masks,
            &self.images,
            self.plan.capture.pre_relu,
            n,
            cap,
            capturing,
        )
    }
}

/// Image forwards (capturing activations) run on the image ladder; other forwards on the mask
/// ladder or, when no stage is planned pre-ReLU, the image ladder, whichever size is smaller.
fn planned_rows(
    masks: &BatchLadder,
    images: &BatchLadder,
    pre_relu: bool,
    n: usize,
    cap: usize,
    capturing: bool,
) -> Option<usize> {
    let on_images = images.rows_for(n, cap);
    if capturing {
        return on_images;
    }
    let on_masks = masks.rows_for(n, cap);
    match (on_masks, on_images.filter(|_| !pre_relu)) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Small device buffers, grown on demand and kept across plans.
#[derive(Default)]
struct Scratch {
    staging: Grow<u8>,
    scores: Grow<f32>,
    weights: Grow<f32>,
    low: Grow<f32>,
    map: Grow<f32>,
    flat: Grow<u32>,
    /// Logits of the per-layer timing passes.
    timing_logits: Grow<f32>,
    /// Pushed scores not yet taken: `pending[..pending_len]` on the device.
    pending: Grow<f32>,
    pending_len: usize,
}

impl Scratch {
    /// Download the pending scores and clear them (waits for them). None when there were none
    /// (then nothing was synchronized).
    fn take_pending(&mut self, dev: &Dev) -> Result<Option<Vec<f32>>> {
        if self.pending_len == 0 {
            return Ok(None);
        }
        let held = self.pending.get(dev, self.pending_len, "pending scores")?;
        let got = dev.download(held, self.pending_len, "pending scores")?;
        self.pending_len = 0;
        Ok(Some(got))
    }
}

/// The CUDA backend. Fields drop in order: graphs, plans and buffers first, the context last.
pub struct CudaBackend {
    /// Which convolutions `prepare` also tries through cuDNN's graph API.
    graph_use: GraphUse,
    /// Whether `prepare` also tries the hand-written convs, and their device checks (the first
    /// conv's, the fused conv + pool's).
    direct_use: DirectUse,
    direct_check: conv::DirectChecks,
    pool_check: conv::PoolChecks,
    /// The whole-first-block kernel's device check (once per backend).
    block_check: conv::DirectCheck,
    /// Graph-API plan choices remembered between runs, and why the last save failed, if it did.
    plan_cache: PlanCache,
    plan_cache_error: Option<String>,
    /// The masked forwards' number format, and (tests) FP8 wherever it runs.
    precision: Precision,
    prefer_fp8: bool,
    /// Sub-batch blocks 1–2 at this many rows instead of choosing by timing (tests).
    forced_prefix: Option<usize>,
    /// Feature stages kept FP16 under `--precision fp8` (tests).
    keep_fp16: Vec<usize>,
    /// Compute capability (major, minor).
    capability: (i32, i32),
    graphs: Graphs,
    prep: Option<Prepared>,
    model: Option<DevModel>,
    scratch: Scratch,
    uploads: UploadRing,
    prof: Profiler,
    kernels: Kernels,
    blas: blas::Handle,
    /// cuBLAS's workspace: dropped after the handle that uses it.
    _blas_workspace: CudaSlice<u8>,
    relu: ActDesc,
    identity: ActDesc,
    dnn: cudnn::Handle,
    dev: Dev,
    description: String,
}

// SAFETY: the raw cuDNN/cuBLAS handles, descriptors and the upload ring's page-locked pointer
// are plain host objects used from one thread at a time (`&mut self` on every op); every op
// binds the context to the calling thread first.
unsafe impl Send for CudaBackend {}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        let _ = self.dev.ctx.bind_to_thread();
        let _ = self.dev.stream.synchronize();
    }
}

impl CudaBackend {
    /// Open device `ordinal`. Never panics: a missing driver/library/function/device is an error.
    pub fn new(ordinal: usize) -> Result<Self> {
        match catch_unwind(AssertUnwindSafe(|| Self::open(ordinal))) {
            Ok(r) => r,
            Err(p) => Err(Error::CudaUnavailable(format!(
                "CUDA initialization failed: {}",
                panic_message(p)
            ))),
        }
    }

    /// Is there a usable CUDA device (driver, cuDNN, cuBLAS, NVRTC, device 0)? Returns e.g.
    /// `NVIDIA H100 80GB HBM3 (sm_90, cuDNN 9.14)`. Never panics.
    pub fn probe() -> Result<String> {
        match catch_unwind(AssertUnwindSafe(|| open_device(0))) {
            Ok(r) => r.map(|(_, d)| format!("{d})")),
            Err(p) => Err(Error::CudaUnavailable(format!(
                "CUDA probe failed: {}",
                panic_message(p)
            ))),
        }
    }

    /// How many CUDA devices there are (libraries, driver and at least one device present).
    /// Never panics; opens no context.
    pub fn device_count() -> Result<usize> {
        match catch_unwind(count_devices) {
            Ok(r) => r,
            Err(p) => Err(Error::CudaUnavailable(format!(
                "CUDA probe failed: {}",
                panic_message(p)
            ))),
        }
    }

    fn open(ordinal: usize) -> Result<Self> {
        let (ctx, desc) = open_device(ordinal)?;
        // One stream, no cross-stream event bookkeeping (see the module docs).
        // SAFETY: no CudaSlice exists on this context object yet; all work uses one stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| unavailable("creating a CUDA stream", e))?;
        let total_mem = ctx
            .total_mem()
            .map_err(|e| unavailable("querying device memory", e))?;
        let dev = Dev {
            ctx,
            stream,
            total_mem,
        };
        let dnn = cudnn::Handle::new(&dev.stream).map_err(|e| unavailable("cudnnCreate", e))?;
        let blas = blas::Handle::new(&dev.stream).map_err(|e| unavailable("cublasCreate", e))?;
        let blas_workspace = dev.alloc::<u8>(CUBLAS_WORKSPACE, "cuBLAS workspace")?;
        // SAFETY: the workspace is a field of the backend, dropped after the handle.
        unsafe {
            blas.set_workspace(
                device::ptr(&blas_workspace, &dev.stream),
                blas_workspace.len(),
            )
        }
        .map_err(|e| unavailable("cublasSetWorkspace", e))?;
        let relu = ActDesc::new(ActMode::CUDNN_ACTIVATION_RELU)
            .map_err(|e| unavailable("cuDNN activation descriptor", e))?;
        let identity = ActDesc::new(ActMode::CUDNN_ACTIVATION_IDENTITY)
            .map_err(|e| unavailable("cuDNN activation descriptor", e))?;
        let kernels = Kernels::load(&dev.ctx)?;
        let uploads = UploadRing::new(&dev, UPLOAD_RING)?;
        // The graph API is optional: a cuDNN without it leaves the legacy path alone.
        let graph_use = if symbols::check(true).is_ok() {
            GraphUse::from_env()
        } else {
            GraphUse::Off
        };
        let capability = dev
            .ctx
            .compute_capability()
            .map_err(|e| unavailable("reading the compute capability", e))?;
        // What the remembered plan choices hold for: the GPU, the libraries choosing them, this
        // engine's graphs.
        let device_identity = format!(
            "{desc}), {} SMs, cuDNN {}, kernels {}, graph code {:016x}",
            kernels.sm_count(),
            cudnn::version(),
            kernels.arch(),
            cudnn_graph::source_hash(),
        );
        Ok(CudaBackend {
            graph_use,
            direct_use: DirectUse::from_env(),
            direct_check: conv::DirectChecks::default(),
            pool_check: conv::PoolChecks::default(),
            block_check: None,
            plan_cache: PlanCache::open(&device_identity),
            plan_cache_error: None,
            precision: Precision::Fp16,
            prefer_fp8: false,
            forced_prefix: None,
            keep_fp16: Vec::new(),
            capability,
            graphs: Graphs::new(),
            prep: None,
            model: None,
            scratch: Scratch::default(),
            uploads,
            prof: Profiler::default(),
            kernels,
            blas,
            _blas_workspace: blas_workspace,
            relu,
            identity,
            dnn,
            dev,
            description: format!("cuda:{ordinal}: {desc})"),
        })
    }

    fn bind(&self) -> Result<()> {
        self.dev
            .ctx
            .bind_to_thread()
            .map_err(|e| Error::cuda("cuCtxSetCurrent", e))
    }

    /// A buffer of logical shape `shape` filled from host f32 data in the logical order (NCHW
    /// for 4-D, row-major `[N, C]` for 2-D). For tests and tools: puts known values on the device.
    pub fn upload_f32(&mut self, shape: &[usize], data: &[f32]) -> Result<CudaBuf> {
        self.bind()?;
        let len: usize = shape.iter().product();
        if data.len() != len {
            return Err(Error::Invalid(format!(
                "upload_f32: {} values for shape {shape:?}",
                data.len()
            )));
        }
        let mut buf = self.alloc(shape)?;
        match &mut buf.data {
            BufData::F16(_) => self.write_rows(&mut buf, 0, data)?,
            BufData::F32(s) => {
                if !data.is_empty() {
                    self.dev
                        .stream
                        .memcpy_htod(data, s)
                        .map_err(|e| drv_err("upload_f32", e))?;
                }
            }
        }
        Ok(buf)
    }

    /// `(free, total)` bytes of device memory.
    pub fn device_memory(&self) -> Result<(usize, usize)> {
        self.dev
            .ctx
            .mem_get_info()
            .map_err(|e| drv_err("cuMemGetInfo", e))
    }

    /// Bytes of device memory held by the uploaded weights and the current plan's arena.
    pub fn memory_in_use(&self) -> usize {
        let w = self.model.as_ref().map_or(0, |m| m.bytes);
        let a = self.prep.as_ref().map_or(0, |p| {
            p.bufs.iter().map(|b| b.num_bytes()).sum::<usize>()
                + p.workspace.num_bytes()
                + p.fp8.as_ref().map_or(0, |f| f.bytes())
        });
        w + a
    }

    /// Which convolutions the next `prepare` also tries through cuDNN's graph API (default:
    /// `SCORECAM_CONV_GRAPH`, else the full mask batch).
    pub fn set_graph_use(&mut self, g: GraphUse) {
        self.graph_use = g;
    }

    /// Whether the next `prepare` also tries the hand-written convs, the first conv and the
    /// fused conv + pool (default: `SCORECAM_CONV_DIRECT`, else timed against cuDNN).
    pub fn set_direct_conv(&mut self, d: DirectUse) {
        self.direct_use = d;
    }

    /// Keep the graph-API plan choices in `dir` from now on (None: in memory only), instead of
    /// `SCORECAM_PLAN_CACHE` or the user's cache directory (tests).
    pub fn set_plan_cache_dir(&mut self, dir: Option<&std::path::Path>) {
        let identity = self.plan_cache.identity().to_string();
        self.plan_cache = PlanCache::open_in(dir, &identity);
    }

    /// The number format of the masked forwards from the next `prepare` on. FP8 needs compute
    /// capability 8.9 or newer and cuDNN's graph API: elsewhere it is a usage error.
    pub fn set_precision(&mut self, p: Precision) -> Result<()> {
        if p == Precision::Fp8 {
            let (major, minor) = self.capability;
            if (major, minor) < (8, 9) {
                return Err(Error::Usage(format!(
                    "--precision fp8 needs FP8 tensor cores (compute capability 8.9 or newer); \
                     {} is sm_{major}{minor}",
                    self.description
                )));
            }
            if symbols::check(true).is_err() {
                return Err(Error::Usage(
                    "--precision fp8 needs cuDNN's graph API, which this cuDNN lacks".into(),
                ));
            }
        }
        self.precision = p;
        Ok(())
    }

    /// With FP8: run every FP8 plan that runs, not only those faster than FP16 (to test the
    /// FP8 path). From the next `prepare` on.
    pub fn prefer_fp8(&mut self, on: bool) {
        self.prefer_fp8 = on;
    }

    /// Run blocks 1–2 in sub-batches of `rows` rows wherever that applies, instead of only when
    /// timing at prepare finds it faster (for tests of that path; `None` restores the timing).
    /// Takes effect at the next prepare, which fails if the model or the mask batch does not
    /// allow that sub-batch size.
    pub fn force_prefix(&mut self, rows: Option<usize>) {
        self.forced_prefix = rows;
    }

    /// Under `--precision fp8`, keep these feature stages FP16 (no FP8 or E4M3-output plan):
    /// for tests of the routes around an FP16 layer, e.g. a conv reading E4M3 dequantized.
    /// Takes effect at the next prepare.
    pub fn keep_fp16(&mut self, stages: &[usize]) {
        self.keep_fp16 = stages.to_vec();
    }

    /// E4M3 bits of `x[i] · multiplier` computed on the device by the FP8 quantize kernel
    /// (checks the kernel against [`kernels::e4m3_from_f32`]).
    pub fn quantize_e4m3_on_device(&mut self, x: &[f32], multiplier: f32) -> Result<Vec<u8>> {
        self.bind()?;
        if x.is_empty() {
            return Ok(Vec::new());
        }
        let dev = &self.dev;
        let xs = dev.upload(&layout::to_f16(x), "quantize input")?;
        let m = dev.upload(&[multiplier], "quantize multiplier")?;
        let mut out = dev.alloc::<u8>(x.len(), "quantize output")?;
        self.kernels.quantize_e4m3(
            &dev.stream,
            &xs.slice(..),
            x.len(),
            &m.slice(..),
            &mut out.slice_mut(..),
        )?;
        dev.download(&out, x.len(), "quantized values")
    }

    /// FP16 values of E4M3 `codes` divided by `multiplier`, computed on the device by the
    /// dequantize kernel.
    pub fn dequantize_e4m3_on_device(&mut self, codes: &[u8], multiplier: f32) -> Result<Vec<f32>> {
        self.bind()?;
        if codes.is_empty() {
            return Ok(Vec::new());
        }
        let dev = &self.dev;
        let xs = dev.upload(codes, "dequantize input")?;
        let m = dev.upload(&[multiplier], "dequantize multiplier")?;
        let mut out = dev.alloc::<f16>(codes.len(), "dequantize output")?;
        self.kernels.dequantize_e4m3(
            &dev.stream,
            &xs.slice(..),
            codes.len(),
            &m.slice(..),
            &mut out.slice_mut(..),
        )?;
        let got = dev.download(&out, codes.len(), "dequantized values")?;
        Ok(got.iter().map(|v| v.to_f32()).collect())
    }

    /// MaxPool2d(2, 2) of E4M3 codes `x` `[n, h, w, c]` (NHWC) computed on the device by the
    /// E4M3 max-pool kernel; `offset` bytes into the device buffer (a misaligned start takes the
    /// kernel's one-channel path).
    pub fn maxpool2_e4m3_on_device(
        &mut self,
        x: &[u8],
        [n, h, w, c]: [usize; 4],
        offset: usize,
    ) -> Result<Vec<u8>> {
        self.bind()?;
        let dev = &self.dev;
        let mut padded = vec![0u8; offset];
        padded.extend_from_slice(x);
        let xs = dev.upload(&padded, "E4M3 pool input")?;
        let out_len = n * (h / 2) * (w / 2) * c;
        let mut out = dev.alloc::<u8>(out_len + offset, "E4M3 pool output")?;
        self.kernels.maxpool2_e4m3(
            &dev.stream,
            &xs.slice(offset..),
            n,
            h,
            w,
            c,
            &mut out.slice_mut(offset..),
        )?;
        let got = dev.download(&out, out_len + offset, "pooled codes")?;
        Ok(got[offset..].to_vec())
    }

    /// `max |x|` of f16-rounded `x` computed on the device by the FP8 amax kernel.
    pub fn amax_on_device(&mut self, x: &[f32]) -> Result<f32> {
        self.bind()?;
        if x.is_empty() {
            return Ok(0.0);
        }
        let dev = &self.dev;
        let xs = dev.upload(&layout::to_f16(x), "amax input")?;
        let mut amax = dev.alloc::<f32>(1, "amax")?;
        self.kernels
            .amax_abs_f16(&dev.stream, &xs.slice(..), x.len(), &mut amax.slice_mut(..))?;
        Ok(dev.download(&amax, 1, "amax")?[0])
    }

    /// Replay masked-forward batches from CUDA graphs (default: on unless
    /// `SCORECAM_CUDA_GRAPHS=0`). Turning them off drops the captured ones.
    pub fn set_cuda_graphs(&mut self, on: bool) {
        self.graphs.clear();
        self.graphs.enabled = on;
        self.graphs.disabled = None;
    }

    /// Convolution plans made on first use since `prepare` (0 when every batch was planned).
    pub fn plans_built_on_first_use(&self) -> usize {
        self.prep.as_ref().map_or(0, |p| p.convs.built_on_first_use)
    }

    /// The configurations chosen for every (conv layer, batch size).
    pub fn plan_choices(&self) -> Vec<PlanChoice> {
        self.prep
            .as_ref()
            .map_or_else(Vec::new, |p| p.convs.choices().to_vec())
    }

    /// Under `--precision fp8`, once a base forward has set the scales: how a masked forward of
    /// `rows` rows runs each feature stage (None before, or without FP8).
    pub fn fp8_route(&self, rows: usize) -> Option<Fp8Route> {
        self.masked_routes(rows).as_deref().map(Fp8Route::of)
    }

    /// The stage routes of a masked forward of `rows` rows (None: every stage FP16).
    fn masked_routes(&self, rows: usize) -> Option<Vec<forward_plan::StageRoute>> {
        let p = self.prep.as_ref()?;
        let model = &self.model.as_ref()?.model;
        p.fp8_routes(model, rows, p.prefix_for(rows))
    }

    /// The forward pass's borrows of the prepared backend.
    fn pass(&mut self) -> Result<(Pass<'_>, &mut Graphs)> {
        let CudaBackend {
            prep,
            model,
            kernels,
            blas,
            relu,
            identity,
            dnn,
            dev,
            graphs,
            ..
        } = self;
        let prep = prep.as_mut().ok_or_else(|| not_prepared("CUDA"))?;
        let dm = model.as_ref().ok_or_else(|| not_prepared("CUDA"))?;
        Ok((
            Pass {
                dev,
                dnn,
                blas,
                kernels,
                relu,
                identity,
                dm,
                prep,
            },
            graphs,
        ))
    }
}

/// A device check's outcome for the report: null before it ran, "passed", or why it failed.
fn check_json(check: &conv::DirectCheck) -> serde_json::Value {
    match check {
        None => serde_json::Value::Null,
        Some(Ok(())) => json!("passed"),
        Some(Err(why)) => json!(why),
    }
}

/// Check a scoring request against the logits buffer; returns the targets per row.
fn check_scores(logits: &CudaBuf, n: usize, targets: &[u32]) -> Result<usize> {
    logits.f32("scores")?;
    let c = logits.cs;
    if n > logits.shape[0] || targets.is_empty() || !targets.len().is_multiple_of(n) {
        return Err(Error::Invalid(format!(
            "scores: {} targets for {n} rows of a buffer of shape {:?}",
            targets.len(),
            logits.shape
        )));
    }
    if let Some(bad) = targets.iter().find(|&&t| t as usize >= c) {
        return Err(Error::Invalid(format!(
            "scores: target {bad} ≥ {c} classes"
        )));
    }
    Ok(targets.len() / n)
}

/// Upload the targets and launch the scoring kernel into `out` (`[n, t]`), asynchronously.
#[allow(clippy::too_many_arguments)]
fn enqueue_scores(
    dev: &Dev,
    kernels: &Kernels,
    uploads: &mut UploadRing,
    logits: &CudaBuf,
    n: usize,
    targets: &[u32],
    probability: bool,
    out: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let src = logits.f32("scores")?;
    let c = logits.cs;
    let t = targets.len() / n;
    let tg = uploads.push(dev, targets, "score targets")?;
    kernels.scores(
        &dev.stream,
        &src.slice(..n * c),
        &tg,
        n,
        c,
        t,
        probability,
        out,
    )
}

impl Backend for CudaBackend {
    type Buf = CudaBuf;

    fn set_profiling(&mut self, on: bool) {
        self.prof.on = on;
        self.prof.clear();
    }

    fn mark(&mut self, stage: Option<Stage>) -> Result<()> {
        if !self.prof.on {
            return Ok(());
        }
        self.bind()?;
        self.prof.record(&self.dev, stage)
    }

    fn take_stage_times(&mut self) -> Result<Vec<(Stage, f64)>> {
        self.bind()?;
        self.prof.take(&self.dev)
    }

    fn describe(&self) -> String {
        self.description.clone()
    }

    fn prepare(&mut self, model: &Arc<Vgg>, plan: Plan) -> Result<()> {
        self.bind()?;
        self.prepare_plan(model, plan)
    }

    fn alloc(&mut self, shape: &[usize]) -> Result<CudaBuf> {
        self.bind()?;
        let len = |dims: &[usize]| {
            dims.iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| gpu_oom(format!("buffer of shape {shape:?}")))
        };
        match *shape {
            [n, c, h, w] => {
                let cs = if c == 3 { CPAD } else { c };
                let what = format!("buffer {shape:?}");
                let data = self.dev.alloc::<f16>(len(&[n, h, w, cs])?, &what)?;
                Ok(CudaBuf {
                    shape: shape.to_vec(),
                    cs,
                    data: BufData::F16(data),
                })
            }
            [n, c] => {
                let what = format!("buffer {shape:?}");
                let data = self.dev.alloc::<f32>(len(&[n, c])?, &what)?;
                Ok(CudaBuf {
                    shape: shape.to_vec(),
                    cs: c,
                    data: BufData::F32(data),
                })
            }
            _ => Err(Error::Invalid(format!(
                "CUDA buffers are 4-D [N, C, H, W] or 2-D [N, C], not {shape:?}"
            ))),
        }
    }

    fn write_rows(&mut self, buf: &mut CudaBuf, first: usize, data: &[f32]) -> Result<()> {
        self.bind()?;
        let [n, c, h, w] = buf.shape[..] else {
            return Err(Error::Invalid(format!(
                "write_rows: a 4-D buffer is needed, got {:?}",
                buf.shape
            )));
        };
        let logical = c * h * w;
        let rows = data.len().checked_div(logical).unwrap_or(0);
        if logical == 0 || !data.len().is_multiple_of(logical) || first + rows > n {
            return Err(Error::Invalid(format!(
                "write_rows: {} values at row {first} of {:?}",
                data.len(),
                buf.shape
            )));
        }
        if rows == 0 {
            return Ok(());
        }
        let row = buf.row_len();
        let host = layout::nchw_to_nhwc_f16(data, rows, c, h, w, buf.cs);
        let dst = buf.f16_mut("write_rows")?;
        self.dev
            .stream
            .memcpy_htod(
                &host[..],
                &mut dst.slice_mut(first * row..(first + rows) * row),
            )
            .map_err(|e| drv_err("write_rows", e))
    }

    fn download(&mut self, buf: &CudaBuf, rows: usize) -> Result<Vec<f32>> {
        self.bind()?;
        if rows > buf.shape[0] {
            return Err(Error::Invalid(format!(
                "download of {rows} rows from a buffer of shape {:?}",
                buf.shape
            )));
        }
        let len = rows * buf.row_len();
        match &buf.data {
            BufData::F16(s) => {
                let host = self.dev.download(s, len, "activations")?;
                let [_, c, h, w] = buf.shape[..] else {
                    unreachable!("F16 buffers are 4-D")
                };
                Ok(layout::nhwc_f16_to_nchw(&host, rows, c, h, w, buf.cs))
            }
            BufData::F32(s) => self.dev.download(s, len, "logits"),
        }
    }

    fn preprocess(
        &mut self,
        rgb: &[u8],
        mean: [f32; 3],
        std: [f32; 3],
        images: &mut CudaBuf,
        slot: usize,
    ) -> Result<()> {
        self.bind()?;
        let s = images.shape.get(2).copied().unwrap_or(0);
        images.check4("preprocess", slot + 1, 3, s, s)?;
        if rgb.len() != s * s * 3 {
            return Err(Error::Invalid(format!(
                "preprocess: {} bytes, expected {s}×{s}×3",
                rgb.len()
            )));
        }
        let row = images.row_len();
        let staging = self
            .scratch
            .staging
            .get(&self.dev, rgb.len(), "image staging buffer")?;
        let mut dst = staging.slice_mut(..rgb.len());
        self.dev
            .stream
            .memcpy_htod(rgb, &mut dst)
            .map_err(|e| drv_err("preprocess: uploading the image", e))?;
        let out = images.f16_mut("preprocess")?;
        self.kernels.preprocess(
            &self.dev.stream,
            &staging.slice(..rgb.len()),
            s,
            mean,
            std,
            CPAD,
            &mut out.slice_mut(slot * row..(slot + 1) * row),
        )
    }

    fn forward(
        &mut self,
        x: &CudaBuf,
        n: usize,
        logits: &mut CudaBuf,
        acts: Option<&mut CudaBuf>,
    ) -> Result<()> {
        self.bind()?;
        if n == 0 {
            return Ok(());
        }
        let (pass, graphs) = self.pass()?;
        let prep = &*pass.prep;
        let s = prep.plan.input_size;
        if n > prep.rows_max {
            return Err(Error::Invalid(format!(
                "forward of {n} rows, but the plan allows at most {}",
                prep.rows_max
            )));
        }
        x.check4("forward input", n, 3, s, s)?;
        let classes = pass.dm.model.num_classes();
        if logits.shape.len() != 2 || logits.shape[0] < n || logits.shape[1] != classes {
            return Err(Error::Invalid(format!(
                "forward: logits buffer of shape {:?}, expected [≥{n}, {classes}]",
                logits.shape
            )));
        }
        let mut cap = x.shape[0].min(logits.shape[0]).min(prep.rows_max);
        if let Some(a) = acts.as_deref() {
            let MapShape { c, h, w } = prep.capture;
            a.check4("forward activations", n, c, h, w)?;
            cap = cap.min(a.shape[0]);
        }
        // The planned batch size this runs at (extra rows are computed and ignored); a batch
        // no ladder covers runs at n and is planned on first use.
        let rows = prep.run_rows(n, cap, acts.is_some()).unwrap_or(n);
        let at = prep.plan.capture;
        let capture = match acts {
            Some(a) => Some(CaptureTo {
                at,
                acts: a.f16_mut("forward activations")?,
                rows: n,
            }),
            None => None,
        };
        let xs = x.f16("forward input")?;
        let logits = logits.f32_mut("forward logits")?;
        let mut pass = pass;
        pass.run(xs, rows, logits, capture, None, graphs)
    }

    fn masked_inputs(
        &mut self,
        images: &CudaBuf,
        acts: &CudaBuf,
        items: &[MaskItem],
        style: MaskStyle,
        out: &mut CudaBuf,
    ) -> Result<()> {
        self.bind()?;
        let sem = style.sem;
        let s = images.shape.get(2).copied().unwrap_or(0);
        images.check4("masked_inputs images", 1, 3, s, s)?;
        let [na, k, h, w] = acts.shape[..] else {
            return Err(Error::Invalid(format!(
                "masked_inputs: activations of shape {:?}",
                acts.shape
            )));
        };
        acts.check4("masked_inputs activations", 1, k, h, w)?;
        out.check4("masked_inputs output", items.len(), 3, s, s)?;
        if k == 3 {
            return Err(Error::Invalid(
                "masked_inputs: 3-channel activations".into(),
            ));
        }
        let ni = images.shape[0].min(na);
        if let Some(bad) = items
            .iter()
            .find(|it| it.image as usize >= ni || it.channel as usize >= k)
        {
            return Err(Error::Invalid(format!(
                "masked_inputs: item {bad:?} out of range ({ni} images, {k} channels)"
            )));
        }
        if items.is_empty() {
            return Ok(());
        }
        let b = items.len();
        let flat: Vec<u32> = items
            .iter()
            .flat_map(|it| [it.image, it.channel, it.sample])
            .collect();
        let dev = &self.dev;
        let buf = self.uploads.push(dev, &flat, "mask items")?;
        let row = out.row_len();
        let dst = out.f16_mut("masked_inputs output")?;
        self.kernels.masks(
            &dev.stream,
            &images.f16("masked_inputs images")?.as_view(),
            &acts.f16("masked_inputs activations")?.as_view(),
            &buf,
            kernels::MasksShape {
                b,
                s,
                h,
                w,
                k,
                cpad: CPAD,
            },
            sem.align_corners(),
            sem.mask_eps(),
            kernels::MaskVariant {
                lowres_stats: sem.lowres_stats(),
                scale: style.scale,
                sigma: style.noise.map_or(0.0, |n| n.sigma),
                seed: style.noise.map_or(0, |n| n.seed),
            },
            &mut dst.slice_mut(..b * row),
        )
    }

    fn scores(
        &mut self,
        logits: &CudaBuf,
        n: usize,
        targets: &[u32],
        probability: bool,
    ) -> Result<Vec<f32>> {
        self.bind()?;
        if n == 0 {
            return Ok(Vec::new());
        }
        let t = check_scores(logits, n, targets)?;
        let dev = &self.dev;
        let out = self.scratch.scores.get(dev, n * t, "scores")?;
        enqueue_scores(
            dev,
            &self.kernels,
            &mut self.uploads,
            logits,
            n,
            targets,
            probability,
            &mut out.slice_mut(..n * t),
        )?;
        let got = dev.download(out, n * t, "scores")?;
        self.uploads.synchronized();
        Ok(got)
    }

    fn push_scores(
        &mut self,
        logits: &CudaBuf,
        n: usize,
        targets: &[u32],
        probability: bool,
    ) -> Result<()> {
        self.bind()?;
        if n == 0 {
            return Ok(());
        }
        let t = check_scores(logits, n, targets)?;
        let dev = &self.dev;
        let sc = &mut self.scratch;
        let start = sc.pending_len;
        let end = start + n * t;
        // Growing (doubling) keeps what is pending on the device: the host waits only at
        // take_scores. Prepare sizes it for a whole image group of two targets.
        let pending = sc.pending.grow_keeping(dev, end, start, "pending scores")?;
        enqueue_scores(
            dev,
            &self.kernels,
            &mut self.uploads,
            logits,
            n,
            targets,
            probability,
            &mut pending.slice_mut(start..start + n * t),
        )?;
        sc.pending_len = start + n * t;
        Ok(())
    }

    fn take_scores(&mut self) -> Result<Vec<f32>> {
        self.bind()?;
        match self.scratch.take_pending(&self.dev)? {
            Some(scores) => {
                self.uploads.synchronized();
                Ok(scores)
            }
            None => Ok(Vec::new()),
        }
    }

    fn layer_times(&mut self, x: &CudaBuf, rows: usize, reps: usize) -> Result<Vec<f64>> {
        self.bind()?;
        let dev = &self.dev;
        let dm = self.model.as_ref().ok_or_else(|| not_prepared("CUDA"))?;
        let prep = self.prep.as_ref().ok_or_else(|| not_prepared("CUDA"))?;
        let s = prep.plan.input_size;
        if rows == 0 || rows > prep.rows_max {
            return Err(Error::Invalid(format!(
                "layer_times: {rows} rows; the plan holds 1..={}",
                prep.rows_max
            )));
        }
        x.check4("layer_times input", rows, 3, s, s)?;
        let classes = dm.model.num_classes();
        let layers = dm.model.layer_costs(s, rows, 2).len();
        let mut events = LayerEvents::new(dev, layers)?;
        self.scratch
            .timing_logits
            .get(dev, rows * classes, "timing logits")?;
        // Taken out while the pass borrows the backend; put back after.
        let mut logits = self
            .scratch
            .timing_logits
            .0
            .take()
            .expect("allocated above");
        let xs = x.f16("layer_times input")?;
        let mut runs = Vec::with_capacity(reps.max(1));
        let (mut pass, _) = self.pass()?;
        pass.eager(xs, rows, &mut logits, None, None)?; // warm-up
        for _ in 0..reps.max(1) {
            pass.eager(xs, rows, &mut logits, None, Some(&mut events))?;
            runs.push(events.take()?);
        }
        self.scratch.timing_logits.0 = Some(logits);
        if let Some(bad) = runs.iter().find(|r| r.len() != layers) {
            return Err(Error::Invalid(format!(
                "layer timing: {} layers timed, {layers} expected",
                bad.len()
            )));
        }
        Ok(crate::backend::median_per_layer(&runs))
    }

    fn report(&self) -> serde_json::Value {
        let Some(p) = self.prep.as_ref() else {
            return serde_json::Value::Null;
        };
        let rows = p.plan.max_masks;
        let costed = (self.model.as_ref())
            .and_then(|m| p.fp8_routes_costed(&m.model, rows, p.prefix_for(rows)));
        let routes = costed.as_ref().map(|c| c.0.clone());
        // Where a full mask batch's forward runs the first block as one kernel.
        let block_runs = (p.convs.fused_block)
            .filter(|b| b.kept && forward_plan::block_runs_fp16(routes.as_deref(), b.stage))
            .map(|b| b.stage);
        let plans: Vec<serde_json::Value> = p
            .convs
            .choices()
            .iter()
            .map(|c| {
                json!({
                    "stage": c.stage,
                    "rows": c.rows,
                    "pre_relu": c.identity,
                    "algo": c.algo,
                    "workspace_bytes": c.workspace,
                    "ms": c.ms,
                    "candidates_timed": c.timed,
                    "legacy_ms": c.legacy_ms,
                    "graph_ms": c.graph_ms,
                    "direct_ms": c.direct_ms,
                    // The same on half the SMs (full mask batch, wgmma conv): about twice
                    // `direct_ms` where each SM's own work limits it, much less where L2 or
                    // memory bandwidth does.
                    "direct_half_grid_ms": c.direct_half_grid_ms,
                    "fp8_ms": c.fp8_ms,
                    "e4m3_out_ms": c.e4m3_out_ms,
                    "direct_e4m3_ms": c.direct_e4m3_ms,
                    "fp8": c.fp8,
                    "e4m3_out": c.e4m3_out,
                    "convert_ms": c.convert_ms,
                    "fp8_algo": c.fp8_algo,
                    "fp8_half_algo": c.fp8_half_algo,
                })
            })
            .collect();
        json!({
            "precision": self.precision.name(),
            "kernels_arch": self.kernels.arch(),
            "mask_batch_sizes": p.masks.sizes(),
            "image_batch_sizes": p.images.sizes(),
            "plans_built_on_first_use": p.convs.built_on_first_use,
            // How a full mask batch's forward runs under `--precision fp8` (null before a base
            // forward, or in FP16).
            "fp8_route": routes.as_deref().map(Fp8Route::of),
            // What the tuning's timings sum to for that forward's features: the route's and
            // every stage FP16 (null when FP8 is preferred or a stage went untimed).
            "fp8_route_cost_ms": costed.and_then(|c| c.1).map(|[route, fp16]| json!({
                "route": route,
                "all_fp16": fp16,
            })),
            "graph_api_skipped_over_budget": p.convs.graph_skipped,
            "graph_api_left_to_hand_written_conv": p.convs.graph_left_to_direct,
            // Graph-API plan choices remembered between runs (see plan_cache.rs).
            "plan_cache": {
                "file": self.plan_cache.path().map(|p| p.display().to_string()),
                "hits": self.plan_cache.hits,
                "misses": self.plan_cache.misses,
                "save_error": self.plan_cache_error,
            },
            // The hand-written convs (the first conv's; the wgmma conv's on sm_90a, its E4M3
            // builds' under --precision fp8): the use setting and their checks on this device,
            // once per backend, layer shape and build ("8→64", "cin→cout N256Pair", "E4M3
            // cin→cout N128", "E4M3 pooled cin→cout N128"), and all together (null: no layer
            // they could run yet).
            "direct_conv": {
                "use": format!("{:?}", self.direct_use).to_lowercase(),
                "check": check_json(&self.direct_check.overall()),
                "checks": self.direct_check.outcomes()
                    .map(|((kind, cin, cout, build), c)| {
                        let e4m3 = match kind {
                            conv::CheckedAs::Half => "",
                            conv::CheckedAs::E4m3 => "E4M3 ",
                            conv::CheckedAs::E4m3Pool => "E4M3 pooled ",
                        };
                        let build = build.map(|b| format!(" {b:?}")).unwrap_or_default();
                        (format!("{e4m3}{cin}→{cout}{build}"), check_json(c))
                    })
                    .collect::<serde_json::Map<_, _>>(),
            },
            // 64 → 64 convs tried with their max-pool in the same kernel, at the full mask batch:
            // its time, the conv's and the pool's apart, whether the tuning kept it, and whether
            // a full mask batch's forward runs it (not where its FP8 route runs either stage in
            // FP8 or E4M3).
            "fused_pools": {
                "check": check_json(&self.pool_check.overall()),
                "checks": self.pool_check.outcomes()
                    .map(|(v, c)| (format!("{v:?}"), check_json(c)))
                    .collect::<serde_json::Map<_, _>>(),
                "layers": p.convs.fused_pools.iter().map(|f| json!({
                    "stage": f.stage,
                    "pool_stage": f.stage + 1,
                    "algo": format!("{} {:?}", conv_direct::POOL_NAME, f.variant),
                    "ms": f.ms,
                    "builds_ms": f.builds_ms.iter()
                        .map(|(v, ms)| json!({"build": format!("{v:?}"), "ms": ms}))
                        .collect::<Vec<_>>(),
                    "conv_ms": f.conv_ms,
                    "pool_ms": f.pool_ms,
                    "kept": f.kept,
                    "fused": f.kept
                        && forward_plan::pair_runs_fp16(routes.as_deref(), f.stage)
                        && block_runs.is_none_or(|b| b + 1 != f.stage),
                })).collect::<Vec<_>>(),
            },
            // A VGG's first block (conv, conv, max-pool) tried as one kernel at the full mask
            // batch: its device check, its time, the three apart as planned otherwise (the
            // second conv's fused pool counted where kept), whether the tuning kept it, and
            // whether a full mask batch's forward runs it (its route runs all three FP16).
            "fused_block": {
                "check": check_json(&self.block_check),
                "algo": conv_direct::BLOCK1_NAME,
                "stage": p.convs.fused_block.map(|b| b.stage),
                "rows": p.convs.fused_block.map(|b| b.rows),
                "ms": p.convs.fused_block.map(|b| b.ms),
                "apart_ms": p.convs.fused_block.map(|b| b.apart_ms),
                "half_grid_ms": p.convs.fused_block.and_then(|b| b.half_grid_ms),
                "kept": p.convs.fused_block.map(|b| b.kept),
                "runs": block_runs.is_some(),
            },
            // Under --precision fp8: FP8 convs tried with their max-pool in one kernel (the
            // pooled E4M3 wgmma build), per output format, against the conv's FP8 form and the
            // pool apart, at the full mask batch; `runs`: that batch's route runs it.
            "fp8_fused_pools": p.convs.fp8_fused_pools.iter().map(|f| {
                let route = routes.as_deref().and_then(|r| r.get(f.stage).copied());
                let outs: Vec<_> = f.outs.iter().zip(["fp16", "e4m3"]).enumerate()
                    .filter_map(|(i, (o, format))| o.map(|o| json!({
                        "out": format,
                        "algo": format!("{} E4M3 pooled {:?}", conv_direct::WG_NAME, o.build),
                        "ms": o.ms,
                        "apart_ms": o.apart_ms,
                        "kept": o.kept,
                        "runs": o.kept && route.is_some_and(|r| r.fp8 && r.e4m3_out == (i == 1)),
                    })))
                    .collect();
                json!({"stage": f.stage, "pool_stage": f.stage + 1, "rows": f.rows, "outs": outs})
            }).collect::<Vec<_>>(),
            "graph_api_search": {
                "fp16": p.convs.graph_search.to_json(),
                "fp8": p.convs.fp8_search.to_json(),
            },
            "workspace_bytes": p.workspace.len(),
            "setup_s": p.setup_s.iter().map(|&(phase, s)| json!({"phase": phase, "s": s})).collect::<Vec<_>>(),
            "prefix": {
                "end_stage": p.prefix.map(|x| x.end),
                "sub_batch": p.prefix.map(|x| x.rows),
                "timed_ms": p.prefix_ms.iter().map(|&(r, ms)| json!({"rows": r, "ms": ms})).collect::<Vec<_>>(),
            },
            "graphs": {
                "enabled": self.graphs.enabled,
                "captured": self.graphs.captured,
                "replays": self.graphs.replays,
                "disabled_because": self.graphs.disabled,
            },
            "plans": plans,
        })
    }

    fn combine(
        &mut self,
        acts: &CudaBuf,
        image: usize,
        weights: &[f32],
        sem: Semantics,
    ) -> Result<(Vec<f32>, bool)> {
        self.bind()?;
        let s = self
            .prep
            .as_ref()
            .ok_or_else(|| not_prepared("CUDA"))?
            .plan
            .input_size;
        let [_, k, h, w] = acts.shape[..] else {
            return Err(Error::Invalid(format!(
                "combine: activations of shape {:?}",
                acts.shape
            )));
        };
        acts.check4("combine activations", image + 1, k, h, w)?;
        if weights.len() != k {
            return Err(Error::Invalid(format!(
                "combine: {} weights for {k} channels",
                weights.len()
            )));
        }
        let dev = &self.dev;
        let plane = h * w * k;
        let src = acts.f16("combine activations")?;
        let wb = self.scratch.weights.get(dev, k, "channel weights")?;
        dev.stream
            .memcpy_htod(weights, &mut wb.slice_mut(..k))
            .map_err(|e| drv_err("combine: uploading weights", e))?;
        let low = self.scratch.low.get(dev, h * w, "low-resolution map")?;
        // Official: ReLU after the upsample (Σ w_k U_k = upsample(Σ w_k A_k), linear); the
        // channel-softmax map is ReLU'd at layer resolution.
        let relu_low = sem != Semantics::Official;
        self.kernels.weighted_channel_sum(
            &dev.stream,
            &src.slice(image * plane..(image + 1) * plane),
            &wb.slice(..k),
            h,
            w,
            k,
            relu_low,
            &mut low.slice_mut(..h * w),
        )?;
        match sem {
            Semantics::ChannelSoftmax | Semantics::Torchcam => {
                Ok((dev.download(low, h * w, "map")?, false))
            }
            Semantics::Official => {
                let map = self.scratch.map.get(dev, s * s, "map")?;
                let flat = self.scratch.flat.get(dev, 1, "flat flag")?;
                self.kernels.upsample_relu_normalize(
                    &dev.stream,
                    &low.slice(..h * w),
                    h,
                    w,
                    s,
                    sem.align_corners(),
                    &mut map.slice_mut(..s * s),
                    &mut flat.slice_mut(..1),
                )?;
                let m = dev.download(map, s * s, "map")?;
                let f = dev.download(flat, 1, "flat flag")?;
                Ok((m, f[0] != 0))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_run_at_planned_sizes() {
        let masks = BatchLadder::new(256, conv::LADDER_STEPS);
        let images = BatchLadder::new(8, conv::LADDER_STEPS);
        // A remainder batch of masked inputs: the next mask size.
        assert_eq!(
            planned_rows(&masks, &images, false, 100, 256, false),
            Some(128)
        );
        // One row (the zero input): the image ladder's 1 beats the mask ladder's 32...
        assert_eq!(planned_rows(&masks, &images, false, 1, 256, false), Some(1));
        // ... unless the image plans leave a stage pre-ReLU.
        assert_eq!(planned_rows(&masks, &images, true, 1, 256, false), Some(32));
        // Base forwards stay on the image ladder, within their buffers.
        assert_eq!(planned_rows(&masks, &images, true, 3, 8, true), Some(3));
        assert_eq!(planned_rows(&masks, &images, false, 9, 8, true), None);
        // Buffers smaller than the planned size: unplanned (run at n).
        assert_eq!(planned_rows(&masks, &images, false, 100, 120, false), None);
    }
}
