//! CUDA backend: cuDNN convolutions, cuBLAS linears, hand-written kernels (see `kernels.rs`).
//! Everything is loaded at run time; with no driver, library or device, [`CudaBackend::new`]
//! returns `Error::CudaUnavailable` and never panics.
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
//! shared cuDNN workspace, the small staging buffers — and chooses the convolution algorithm of
//! every layer for the plan's batch sizes (cuDNN's heuristic ranking, the top candidates timed
//! with the real fused launch). Any other batch size (a remainder batch) is planned on first use
//! and cached. Nothing is allocated per image or batch in the steady state.
//!
//! One stream carries all work; the context's cross-stream event tracking is disabled, so raw
//! device pointers can be handed to cuDNN/cuBLAS without cudarc recording events.

pub mod kernels;

mod blas;
mod cudnn;
mod layout;

use std::collections::{BTreeMap, HashMap};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use cudarc::cublas::result::CublasError;
use cudarc::driver::result::DriverError;
use cudarc::driver::{
    CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr, DeviceRepr, ValidAsZeroBits,
};
use half::f16;

use crate::backend::{Backend, MaskItem, MaskStyle, Plan, Semantics, Stage};
use crate::error::{Error, Result};
use crate::model::{FeatureStage, MapShape, Vgg, POOLED};

use self::cudnn::{ActDesc, ActMode, Candidate, ConvPlan, ConvPtrs, FilterDesc, TensorDesc};
use self::kernels::Kernels;

/// Channels of an input image as stored on the device (3 real + zeros). 8 FP16 values = 16
/// bytes per pixel: the channel multiple cuDNN's FP16 tensor-core NHWC kernels are built for,
/// and one 16-byte vector per pixel for the mask/preprocess kernels. Measured on the H100 through
/// cudarc (FP16 NHWC, batch 256, 2026-11): the first conv takes the same time with C = 3 and C = 8
/// (≈ 27 TFLOP/s) — it is bound by writing
/// its 64-channel output — so the padding costs nothing there; the only extra cost is the masked
/// inputs' size (2.7× the bytes of C = 3, ≈ 0.1 ms of HBM traffic per 256 masks).
pub const CPAD: usize = 8;

/// Largest workspace a single convolution candidate may ask for.
const WS_CAP: usize = 1 << 30;

/// Heuristic candidates timed per (layer, batch size) at `prepare`.
const TIMED_CANDIDATES: usize = 3;

/// cuDNN's legacy descriptors address tensors with 32-bit element counts.
const CUDNN_MAX_ELEMS: usize = i32::MAX as usize;

/// A device tensor. 4-D shapes `[n, c, h, w]` are FP16 NHWC (stored channels `CPAD` for
/// 3-channel images, `c` otherwise); 2-D shapes `[n, c]` (logits) are f32 row-major.
pub struct CudaBuf {
    shape: Vec<usize>,
    /// Stored channels (4-D) or columns (2-D).
    cs: usize,
    data: BufData,
}

enum BufData {
    F16(CudaSlice<f16>),
    F32(CudaSlice<f32>),
}

impl CudaBuf {
    /// The logical shape (NCHW or `[N, C]`).
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Stored elements per row.
    fn row_len(&self) -> usize {
        match self.shape.len() {
            4 => self.shape[2] * self.shape[3] * self.cs,
            _ => self.cs,
        }
    }

    fn f16(&self, what: &str) -> Result<&CudaSlice<f16>> {
        match &self.data {
            BufData::F16(s) if self.shape.len() == 4 => Ok(s),
            _ => Err(Error::Invalid(format!(
                "{what}: expected a 4-D image/activation buffer, got shape {:?}",
                self.shape
            ))),
        }
    }

    fn f16_mut(&mut self, what: &str) -> Result<&mut CudaSlice<f16>> {
        match &mut self.data {
            BufData::F16(s) if self.shape.len() == 4 => Ok(s),
            _ => Err(Error::Invalid(format!(
                "{what}: expected a 4-D image/activation buffer, got shape {:?}",
                self.shape
            ))),
        }
    }

    fn f32(&self, what: &str) -> Result<&CudaSlice<f32>> {
        match &self.data {
            BufData::F32(s) => Ok(s),
            _ => Err(Error::Invalid(format!(
                "{what}: expected a 2-D logits buffer, got shape {:?}",
                self.shape
            ))),
        }
    }

    fn f32_mut(&mut self, what: &str) -> Result<&mut CudaSlice<f32>> {
        match &mut self.data {
            BufData::F32(s) => Ok(s),
            _ => Err(Error::Invalid(format!(
                "{what}: expected a 2-D logits buffer, got shape {:?}",
                self.shape
            ))),
        }
    }

    /// Check a 4-D buffer: at least `n` rows, logical `[_, c, h, w]`.
    fn check4(&self, what: &str, n: usize, c: usize, h: usize, w: usize) -> Result<()> {
        let ok = self.shape.len() == 4
            && self.shape[0] >= n
            && self.shape[1..] == [c, h, w]
            && matches!(self.data, BufData::F16(_));
        if ok {
            Ok(())
        } else {
            Err(Error::Invalid(format!(
                "{what}: buffer of shape {:?}, expected [≥{n}, {c}, {h}, {w}]",
                self.shape
            )))
        }
    }
}

/// Input/output geometry of one feature stage (stored channels).
#[derive(Clone, Copy, Debug)]
struct StageDims {
    in_h: usize,
    in_w: usize,
    in_c: usize,
    out_h: usize,
    out_w: usize,
    out_c: usize,
}

impl StageDims {
    fn in_len(&self) -> usize {
        self.in_h * self.in_w * self.in_c
    }
    fn out_len(&self) -> usize {
        self.out_h * self.out_w * self.out_c
    }
}

/// A conv layer on the device.
struct DevConv {
    cin_s: usize,
    cout: usize,
    filter: CudaSlice<f16>,
    bias: CudaSlice<f16>,
    wdesc: FilterDesc,
    bdesc: TensorDesc,
}

/// A Linear layer on the device. `weight` `[fout, fin]` f16 (first layer: columns H,W,C).
struct DevLinear {
    fin: usize,
    fout: usize,
    relu: bool,
    weight: CudaSlice<f16>,
    bias16: CudaSlice<f16>,
    bias32: CudaSlice<f32>,
}

/// The uploaded model. `convs[i]` is `Some` for conv stages.
struct DevModel {
    model: Arc<Vgg>,
    convs: Vec<Option<DevConv>>,
    linears: Vec<DevLinear>,
    bytes: usize,
}

/// Per-plan state: the arena and the convolution plans.
struct Prepared {
    plan: Plan,
    rows_max: usize,
    dims: Vec<StageDims>,
    /// Features' output (stored channels == logical channels).
    feat: (usize, usize, usize),
    capture: MapShape,
    bufs: [CudaSlice<f16>; 2],
    workspace: CudaSlice<u8>,
    /// (stage, rows, identity activation) → plan.
    convs: HashMap<(usize, usize, bool), ConvPlan>,
}

/// Small device buffers, grown on demand and kept across plans.
#[derive(Default)]
struct Scratch {
    staging: Grow<u8>,
    items: Grow<u32>,
    targets: Grow<u32>,
    scores: Grow<f32>,
    weights: Grow<f32>,
    low: Grow<f32>,
    map: Grow<f32>,
    flat: Grow<u32>,
}

/// A device buffer that only grows.
struct Grow<T>(Option<CudaSlice<T>>);

impl<T> Default for Grow<T> {
    fn default() -> Self {
        Grow(None)
    }
}

impl<T: DeviceRepr + ValidAsZeroBits> Grow<T> {
    fn get(&mut self, dev: &Dev, len: usize, what: &str) -> Result<&mut CudaSlice<T>> {
        if self.0.as_ref().is_none_or(|s| s.len() < len) {
            self.0 = None;
            self.0 = Some(dev.alloc::<T>(len, what)?);
        }
        Ok(self.0.as_mut().expect("allocated above"))
    }
}

/// Context, stream and memory facts shared by the helpers.
struct Dev {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    total_mem: usize,
}

impl Dev {
    /// `len` zeroed elements (at least one). A size beyond the device's memory or a driver
    /// out-of-memory error is `Error::OutOfMemory` naming `what` and the bytes.
    fn alloc<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        len: usize,
        what: &str,
    ) -> Result<CudaSlice<T>> {
        let len = len.max(1);
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .filter(|&b| b <= self.total_mem)
            .ok_or_else(|| {
                gpu_oom(format!(
                    "{what} ({len} × {} bytes) exceeds the device's {} bytes",
                    std::mem::size_of::<T>(),
                    self.total_mem
                ))
            })?;
        self.stream
            .alloc_zeros::<T>(len)
            .map_err(|e| drv_err(&format!("allocating {what} ({bytes} bytes)"), e))
    }

    /// Upload a host slice into a new device buffer.
    fn upload<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        host: &[T],
        what: &str,
    ) -> Result<CudaSlice<T>> {
        let mut d = self.alloc::<T>(host.len(), what)?;
        if !host.is_empty() {
            self.stream
                .memcpy_htod(host, &mut d)
                .map_err(|e| drv_err(&format!("uploading {what}"), e))?;
        }
        Ok(d)
    }

    /// Copy the first `len` elements of a device buffer to the host (synchronizes).
    fn download<T: DeviceRepr + Default + Clone>(
        &self,
        src: &CudaSlice<T>,
        len: usize,
        what: &str,
    ) -> Result<Vec<T>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let mut host = vec![T::default(); len];
        self.stream
            .memcpy_dtoh(&src.slice(..len), &mut host[..])
            .map_err(|e| drv_err(&format!("downloading {what}"), e))?;
        self.stream
            .synchronize()
            .map_err(|e| drv_err(&format!("downloading {what}"), e))?;
        Ok(host)
    }
}

/// `SCORECAM_CUDA_VERBOSE=1`: report the convolution algorithm choices on stderr.
fn verbose() -> bool {
    std::env::var("SCORECAM_CUDA_VERBOSE").is_ok_and(|v| v == "1")
}

/// Raw device address of a buffer for cuDNN/cuBLAS. Event tracking is disabled on this context,
/// so the returned guard is inert and dropping it at once is correct (single stream).
fn ptr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    let (p, _guard) = s.device_ptr(stream);
    p
}

/// Out of GPU memory (the message says which memory, so the CPU's never reads as a GPU's).
fn gpu_oom(msg: impl std::fmt::Display) -> Error {
    Error::OutOfMemory(format!("GPU memory: {msg}"))
}

fn drv_err(op: &str, e: DriverError) -> Error {
    if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        gpu_oom(op)
    } else {
        Error::cuda(op, e)
    }
}

fn dnn_err(op: &str, e: cudarc::cudnn::CudnnError) -> Error {
    if cudnn::is_alloc_failure(&e) {
        gpu_oom(format!("{op}: {e}"))
    } else {
        Error::cuda(op, e)
    }
}

fn blas_err(op: &str, e: CublasError) -> Error {
    if blas::is_alloc_failure(&e) {
        gpu_oom(format!("{op}: {e}"))
    } else {
        Error::cuda(op, e)
    }
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> Error {
    Error::CudaUnavailable(format!("{what}: {e}"))
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".into()
    }
}

/// Stage timing with CUDA events (see [`Backend::mark`]).
#[derive(Default)]
struct Profiler {
    on: bool,
    /// Events in record order; the work between event i and i+1 belongs to `events[i].0`.
    events: Vec<(Option<Stage>, CudaEvent)>,
    spare: Vec<CudaEvent>,
}

impl Profiler {
    fn record(&mut self, dev: &Dev, stage: Option<Stage>) -> Result<()> {
        let ev = match self.spare.pop() {
            Some(e) => e,
            None => dev
                .ctx
                .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| Error::cuda("cuEventCreate", e))?,
        };
        ev.record(&dev.stream)
            .map_err(|e| Error::cuda("cuEventRecord", e))?;
        self.events.push((stage, ev));
        Ok(())
    }

    fn take(&mut self, dev: &Dev) -> Result<Vec<(Stage, f64)>> {
        let Some(&(open, _)) = self.events.last() else {
            return Ok(Vec::new());
        };
        if open.is_some() {
            // Close the running segment now; it continues after this call.
            self.record(dev, open)?;
        }
        let mut acc: BTreeMap<Stage, f64> = BTreeMap::new();
        for pair in self.events.windows(2) {
            if let Some(stage) = pair[0].0 {
                let ms = pair[0]
                    .1
                    .elapsed_ms(&pair[1].1)
                    .map_err(|e| Error::cuda("cuEventElapsedTime", e))?;
                *acc.entry(stage).or_insert(0.0) += ms as f64;
            }
        }
        let last = self.events.pop().expect("non-empty");
        self.spare.extend(self.events.drain(..).map(|(_, e)| e));
        if last.0.is_some() {
            self.events.push(last);
        } else {
            self.spare.push(last.1);
        }
        Ok(Stage::ALL
            .iter()
            .filter_map(|s| acc.get(s).map(|&ms| (*s, ms)))
            .collect())
    }

    fn clear(&mut self) {
        self.spare.extend(self.events.drain(..).map(|(_, e)| e));
    }
}

/// The CUDA backend. Fields drop in order: plans and buffers first, the context last.
pub struct CudaBackend {
    prep: Option<Prepared>,
    model: Option<DevModel>,
    scratch: Scratch,
    prof: Profiler,
    kernels: Kernels,
    blas: blas::Handle,
    relu: ActDesc,
    identity: ActDesc,
    dnn: cudnn::Handle,
    dev: Dev,
    description: String,
}

// SAFETY: the raw cuDNN handle and descriptors are plain host objects used from one thread at a
// time (`&mut self` on every op); every op binds the context to the calling thread first.
unsafe impl Send for CudaBackend {}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        let _ = self.dev.ctx.bind_to_thread();
        let _ = self.dev.stream.synchronize();
    }
}

/// A CUDA library the dynamic loader cannot find, with how to make it visible (libraries are
/// dlopen'ed by name, so only the loader's search path counts).
fn missing_library(what: &str) -> Error {
    Error::CudaUnavailable(format!(
        "{what} was not found on the library path; add its directory to LD_LIBRARY_PATH \
         (CUDA toolkit: /usr/local/cuda/lib64; pip wheels: site-packages/nvidia/cu13/lib and \
         site-packages/nvidia/cudnn/lib)"
    ))
}

/// Check that the shared libraries load; cudarc panics on a missing one, so this comes first.
fn check_libraries() -> Result<()> {
    // SAFETY: these only try to dlopen the libraries.
    unsafe {
        if !cudarc::driver::sys::is_culib_present() {
            return Err(Error::CudaUnavailable(
                "the CUDA driver library (libcuda.so) was not found: no NVIDIA driver installed"
                    .into(),
            ));
        }
        if !cudarc::cudnn::sys::is_culib_present() {
            return Err(missing_library("cuDNN (libcudnn.so.9)"));
        }
        if !cudarc::cublas::sys::is_culib_present() {
            return Err(missing_library("cuBLAS (libcublas.so)"));
        }
        if !cudarc::nvrtc::sys::is_culib_present() {
            return Err(missing_library("NVRTC (libnvrtc.so)"));
        }
    }
    Ok(())
}

/// Number of CUDA devices, after checking the libraries (an error when there are none).
fn count_devices() -> Result<usize> {
    check_libraries()?;
    let count = CudaContext::device_count().map_err(|e| unavailable("no usable CUDA device", e))?;
    if count <= 0 {
        return Err(Error::CudaUnavailable("no CUDA device found".into()));
    }
    Ok(count as usize)
}

/// Check the shared libraries, count devices, open device `ordinal`. Returns the context and
/// `"<name> (sm_XY"` (unclosed: callers append).
fn open_device(ordinal: usize) -> Result<(Arc<CudaContext>, String)> {
    let count = count_devices()?;
    if ordinal >= count {
        return Err(Error::CudaUnavailable(format!(
            "CUDA device {ordinal} requested but only {count} found"
        )));
    }
    let ctx = CudaContext::new(ordinal).map_err(|e| unavailable("creating a CUDA context", e))?;
    let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
    let (major, minor) = ctx
        .compute_capability()
        .map_err(|e| unavailable("reading the compute capability", e))?;
    let v = cudnn::version();
    if v < 90000 {
        return Err(Error::CudaUnavailable(format!(
            "cuDNN {} found, version 9 required",
            cudnn::version_string(v)
        )));
    }
    Ok((
        ctx,
        format!(
            "{name} (sm_{major}{minor}, cuDNN {}",
            cudnn::version_string(v)
        ),
    ))
}

impl CudaBackend {
    /// Open device `ordinal`. Never panics: a missing driver/library/device is an error.
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
        let dnn = cudnn::Handle::new(&stream).map_err(|e| unavailable("cudnnCreate", e))?;
        let blas = blas::Handle::new(&stream).map_err(|e| unavailable("cublasCreate", e))?;
        let relu = ActDesc::new(ActMode::CUDNN_ACTIVATION_RELU)
            .map_err(|e| unavailable("cuDNN activation descriptor", e))?;
        let identity = ActDesc::new(ActMode::CUDNN_ACTIVATION_IDENTITY)
            .map_err(|e| unavailable("cuDNN activation descriptor", e))?;
        let kernels = Kernels::load(&ctx)?;
        Ok(CudaBackend {
            prep: None,
            model: None,
            scratch: Scratch::default(),
            prof: Profiler::default(),
            kernels,
            blas,
            relu,
            identity,
            dnn,
            dev: Dev {
                ctx,
                stream,
                total_mem,
            },
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
            p.bufs.iter().map(|b| b.num_bytes()).sum::<usize>() + p.workspace.num_bytes()
        });
        w + a
    }

    /// Upload `model`'s weights in the device layouts.
    fn upload_model(&self, model: &Arc<Vgg>) -> Result<DevModel> {
        let dev = &self.dev;
        let mut convs = Vec::with_capacity(model.features.len());
        let mut bytes = 0;
        let mut cs = CPAD;
        for stage in &model.features {
            match stage {
                FeatureStage::Conv(l) => {
                    let name = format!("features.{}", l.conv_index);
                    let host = layout::conv_filter_krsc(&l.weight, l.cout, l.cin, cs);
                    let filter = dev.upload(&host, &format!("{name}.weight"))?;
                    let bias = dev.upload(&layout::to_f16(&l.bias), &format!("{name}.bias"))?;
                    bytes += filter.num_bytes() + bias.num_bytes();
                    let wdesc = FilterDesc::nhwc_f16(l.cout, cs, 3, 3)
                        .map_err(|e| dnn_err(&format!("{name}: filter descriptor"), e))?;
                    let bdesc = TensorDesc::nhwc_f16(1, l.cout, 1, 1)
                        .map_err(|e| dnn_err(&format!("{name}: bias descriptor"), e))?;
                    convs.push(Some(DevConv {
                        cin_s: cs,
                        cout: l.cout,
                        filter,
                        bias,
                        wdesc,
                        bdesc,
                    }));
                    cs = l.cout;
                }
                FeatureStage::MaxPool { .. } => convs.push(None),
            }
        }
        let c_feat = model.features_shape(model.input_size()).c;
        let mut linears = Vec::with_capacity(model.classifier.len());
        for (j, l) in model.classifier.iter().enumerate() {
            let name = format!("classifier.{}", l.index);
            let host = if j == 0 {
                if l.fin != c_feat * POOLED * POOLED {
                    return Err(Error::Invalid(format!(
                        "{name}: takes {} inputs, the features give {c_feat}×{POOLED}×{POOLED}",
                        l.fin
                    )));
                }
                layout::linear_chw_to_hwc(&l.weight, l.fout, c_feat, POOLED, POOLED)
            } else {
                layout::to_f16(&l.weight)
            };
            let weight = dev.upload(&host, &format!("{name}.weight"))?;
            let bias16 = dev.upload(&layout::to_f16(&l.bias), &format!("{name}.bias"))?;
            let bias32 = dev.upload(&l.bias, &format!("{name}.bias"))?;
            bytes += weight.num_bytes() + bias16.num_bytes() + bias32.num_bytes();
            linears.push(DevLinear {
                fin: l.fin,
                fout: l.fout,
                relu: l.relu,
                weight,
                bias16,
                bias32,
            });
        }
        Ok(DevModel {
            model: Arc::clone(model),
            convs,
            linears,
            bytes,
        })
    }
}

/// Run conv stage `stage` on `n` rows: the cached plan for `(stage, n, identity)`, or — on first
/// use of that key — the candidates in order until one launches (then cached). Returns whether
/// bias and activation were fused; if not, adds them with `bias_act_f16`.
#[allow(clippy::too_many_arguments)]
fn run_conv(
    dev: &Dev,
    dnn: &cudnn::Handle,
    kernels: &Kernels,
    plans: &mut HashMap<(usize, usize, bool), ConvPlan>,
    workspace: &mut CudaSlice<u8>,
    act: &ActDesc,
    layer: &DevConv,
    stage: usize,
    d: StageDims,
    n: usize,
    identity: bool,
    x: &CudaSlice<f16>,
    y: &mut CudaSlice<f16>,
) -> Result<()> {
    let key = (stage, n, identity);
    let op = format!("conv (features stage {stage}, batch {n})");
    if !plans.contains_key(&key) {
        let (xd, yd, cd) = cudnn::descriptors(n, layer.cin_s, layer.cout, d.in_h, d.in_w)
            .map_err(|e| dnn_err(&op, e))?;
        let cands = cudnn::candidates(dnn, &xd, &layer.wdesc, &cd, &yd, identity, WS_CAP)
            .map_err(|e| dnn_err(&op, e))?;
        if cands.is_empty() {
            return Err(Error::cuda(
                &op,
                "cuDNN offers no forward algorithm for this convolution",
            ));
        }
        let mut last_err = None;
        // cuDNN's ranking, as at prepare. The workspace grows when the preferred algorithm needs
        // more (once per new batch size): falling back to a smaller-workspace algorithm can cost
        // 30× (non-tensor-core IMPLICIT_GEMM) on a remainder batch.
        for c in cands {
            if c.ws > workspace.len() {
                *workspace = dev.alloc::<u8>(c.ws, "cuDNN workspace")?;
            }
            let p = conv_ptrs(dev, layer, x, y, workspace);
            // SAFETY: x holds ≥ n·in_len, y ≥ n·out_len elements (checked by the caller);
            // workspace ≥ c.ws bytes.
            let r =
                unsafe { cudnn::launch(dnn, &xd, &layer.wdesc, &cd, &yd, &layer.bdesc, act, c, p) };
            match r {
                Ok(()) => {
                    if verbose() {
                        eprintln!(
                            "cuda: conv stage {stage} batch {n} (planned on first use): {c:?}"
                        );
                    }
                    plans.insert(
                        key,
                        ConvPlan {
                            x: xd,
                            y: yd,
                            conv: cd,
                            choice: c,
                        },
                    );
                    if !c.fused {
                        add_bias_act(dev, kernels, layer, d, n, identity, y)?;
                    }
                    return Ok(());
                }
                Err(e) => last_err = Some(e),
            }
        }
        return Err(match last_err {
            Some(e) => dnn_err(&op, e),
            None => Error::cuda(&op, "no cuDNN algorithm fits the workspace"),
        });
    }
    let plan = &plans[&key];
    let p = conv_ptrs(dev, layer, x, y, workspace);
    // SAFETY: as above; the plan's candidate was chosen with ws ≤ the workspace, which only grows.
    unsafe {
        cudnn::launch(
            dnn,
            &plan.x,
            &layer.wdesc,
            &plan.conv,
            &plan.y,
            &layer.bdesc,
            act,
            plan.choice,
            p,
        )
    }
    .map_err(|e| dnn_err(&op, e))?;
    if !plan.choice.fused {
        add_bias_act(dev, kernels, layer, d, n, identity, y)?;
    }
    Ok(())
}

fn conv_ptrs(
    dev: &Dev,
    layer: &DevConv,
    x: &CudaSlice<f16>,
    y: &CudaSlice<f16>,
    ws: &CudaSlice<u8>,
) -> ConvPtrs {
    let s = &dev.stream;
    ConvPtrs {
        x: ptr(x, s),
        w: ptr(&layer.filter, s),
        bias: ptr(&layer.bias, s),
        y: ptr(y, s),
        ws: ptr(ws, s),
        ws_len: ws.len(),
    }
}

/// The unfused path's epilogue: `y += bias` per channel, then ReLU unless `identity`.
fn add_bias_act(
    dev: &Dev,
    kernels: &Kernels,
    layer: &DevConv,
    d: StageDims,
    n: usize,
    identity: bool,
    y: &mut CudaSlice<f16>,
) -> Result<()> {
    let rows = n * d.out_h * d.out_w;
    kernels.bias_act_f16(
        &dev.stream,
        &mut y.slice_mut(..rows * layer.cout),
        &layer.bias.as_view(),
        rows,
        layer.cout,
        !identity,
    )
}

/// Choose (and cache) the plan for `(stage, n, identity)` at prepare time: time up to
/// [`TIMED_CANDIDATES`] fused candidates with real launches on the arena buffers (garbage in,
/// garbage out), keep the fastest; if no fused one launches, the fastest unfused one. Returns the
/// chosen workspace size.
#[allow(clippy::too_many_arguments)]
fn tune_conv(
    dev: &Dev,
    dnn: &cudnn::Handle,
    plans: &mut HashMap<(usize, usize, bool), ConvPlan>,
    cands: Vec<Candidate>,
    descs: (TensorDesc, TensorDesc, cudnn::ConvDesc),
    workspace: &CudaSlice<u8>,
    act: &ActDesc,
    layer: &DevConv,
    key: (usize, usize, bool),
    bufs: &[CudaSlice<f16>; 2],
) -> Result<usize> {
    let op = format!("tuning conv (features stage {}, batch {})", key.0, key.1);
    let (xd, yd, cd) = descs;
    let [bx, by] = bufs;
    let p = conv_ptrs(dev, layer, bx, by, workspace);
    let start = dev
        .ctx
        .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(|e| Error::cuda(&op, e))?;
    let end = dev
        .ctx
        .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(|e| Error::cuda(&op, e))?;
    let mut best: Option<(f32, Candidate)> = None;
    let mut tried: Vec<String> = Vec::new();
    let mut last_err = None;
    for fused in [true, false] {
        let group = cands
            .iter()
            .copied()
            .filter(|c| c.fused == fused && c.ws <= workspace.len())
            .take(TIMED_CANDIDATES);
        for c in group {
            // SAFETY: the arena buffers hold rows_max ≥ n rows of every stage's input/output.
            let launch = || unsafe {
                cudnn::launch(dnn, &xd, &layer.wdesc, &cd, &yd, &layer.bdesc, act, c, p)
            };
            // Warm-up (and support check), then one timed run.
            if let Err(e) = launch() {
                last_err = Some(e);
                continue;
            }
            start.record(&dev.stream).map_err(|e| Error::cuda(&op, e))?;
            if let Err(e) = launch() {
                last_err = Some(e);
                continue;
            }
            end.record(&dev.stream).map_err(|e| Error::cuda(&op, e))?;
            let ms = start.elapsed_ms(&end).map_err(|e| drv_err(&op, e))?;
            tried.push(format!(
                "{:?}/{:?}/fused={} {ms:.3} ms",
                c.algo, c.math, c.fused
            ));
            if best.is_none_or(|(t, _)| ms < t) {
                best = Some((ms, c));
            }
        }
        if best.is_some() {
            break;
        }
    }
    // A launch error may be asynchronous (e.g. a kernel fault): surface it here.
    dev.stream.synchronize().map_err(|e| drv_err(&op, e))?;
    if verbose() {
        eprintln!(
            "cuda: conv stage {} batch {} {}: chose {:?} (ws {} B) among [{}]",
            key.0,
            key.1,
            if key.2 { "identity" } else { "relu" },
            best.map(|b| b.1),
            best.map_or(0, |b| b.1.ws),
            tried.join(", ")
        );
    }
    let Some((_, choice)) = best else {
        return Err(match last_err {
            Some(e) => dnn_err(&op, e),
            None => Error::cuda(
                &op,
                "cuDNN offers no forward algorithm for this convolution",
            ),
        });
    };
    plans.insert(
        key,
        ConvPlan {
            x: xd,
            y: yd,
            conv: cd,
            choice,
        },
    );
    Ok(choice.ws)
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
        let s = plan.input_size;
        if plan.max_images == 0 || plan.max_masks == 0 || s == 0 {
            return Err(Error::Invalid(format!("prepare: empty plan {plan:?}")));
        }
        model.validate().map_err(Error::Invalid)?;
        if plan.capture.stage >= model.features.len() {
            return Err(Error::Invalid(format!(
                "capture stage {} out of range ({} feature stages)",
                plan.capture.stage,
                model.features.len()
            )));
        }
        // Geometry of every stage (stored channels).
        let mut dims = Vec::with_capacity(model.features.len());
        let (mut h, mut w, mut c) = (s, s, CPAD);
        for stage in &model.features {
            let (oh, ow, oc) = match stage {
                FeatureStage::Conv(l) => (h, w, l.cout),
                FeatureStage::MaxPool { .. } => (h / 2, w / 2, c),
            };
            if oh == 0 || ow == 0 {
                return Err(Error::Invalid(format!(
                    "input size {s} is too small for this model's max-pools"
                )));
            }
            dims.push(StageDims {
                in_h: h,
                in_w: w,
                in_c: c,
                out_h: oh,
                out_w: ow,
                out_c: oc,
            });
            (h, w, c) = (oh, ow, oc);
        }
        let capture = model.capture_shape(plan.capture, s);
        if capture.c != dims[plan.capture.stage].out_c || capture.c == 3 {
            return Err(Error::Invalid(format!(
                "layer {}: capturing a {}-channel map is not supported by the CUDA backend",
                model.capture_name(plan.capture),
                capture.c
            )));
        }
        let rows_max = plan.max_images.max(plan.max_masks);
        let mut per_row = s * s * CPAD;
        for d in &dims {
            per_row = per_row.max(d.out_len());
            if rows_max.saturating_mul(d.in_len().max(d.out_len())) > CUDNN_MAX_ELEMS {
                return Err(gpu_oom(format!(
                    "a batch of {rows_max} × {} elements exceeds cuDNN's 2^31-element tensor limit",
                    d.in_len().max(d.out_len())
                )));
            }
        }
        per_row = per_row.max(c * POOLED * POOLED);
        for l in &model.classifier {
            per_row = per_row.max(l.fout);
        }

        // Free the old plan before allocating the new one (the caller may be retrying smaller).
        self.prep = None;
        self.dev
            .stream
            .synchronize()
            .map_err(|e| drv_err("prepare", e))?;
        if !self
            .model
            .as_ref()
            .is_some_and(|m| Arc::ptr_eq(&m.model, model))
        {
            self.model = None;
            self.model = Some(self.upload_model(model)?);
        }

        let buf_len = rows_max.checked_mul(per_row).ok_or_else(|| {
            gpu_oom(format!(
                "activation buffers of {rows_max} × {per_row} elements"
            ))
        })?;
        let bufs = [
            self.dev.alloc::<f16>(buf_len, "activation buffer A")?,
            self.dev.alloc::<f16>(buf_len, "activation buffer B")?,
        ];

        // Small buffers at their steady-state sizes.
        let sc = &mut self.scratch;
        sc.staging
            .get(&self.dev, s * s * 3, "image staging buffer")?;
        sc.items.get(&self.dev, plan.max_masks * 2, "mask items")?;
        sc.targets.get(&self.dev, rows_max, "score targets")?;
        sc.scores.get(&self.dev, rows_max, "scores")?;
        sc.weights.get(&self.dev, capture.c, "channel weights")?;
        sc.low
            .get(&self.dev, capture.h * capture.w, "low-resolution map")?;
        sc.map.get(&self.dev, s * s, "map")?;
        sc.flat.get(&self.dev, 1, "flat flag")?;

        // Convolution plans for the plan's batch sizes: candidates first (for the workspace
        // size), then timed choices.
        let dm = self.model.as_ref().expect("uploaded above");
        let mut keys = Vec::new();
        for (i, d) in dm.convs.iter().enumerate() {
            if d.is_none() {
                continue;
            }
            keys.push((i, plan.max_masks, false));
            let pre = plan.capture.stage == i && plan.capture.pre_relu;
            let k = (i, plan.max_images, pre);
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
        let (free, _) = self
            .dev
            .ctx
            .mem_get_info()
            .map_err(|e| drv_err("cuMemGetInfo", e))?;
        let ws_cap = WS_CAP.min(free / 4);
        let mut pending = Vec::with_capacity(keys.len());
        let mut ws_need = 0;
        for &(i, n, identity) in &keys {
            let layer = dm.convs[i].as_ref().expect("conv stage");
            let d = dims[i];
            let op = format!("planning conv (features stage {i}, batch {n})");
            let descs = cudnn::descriptors(n, layer.cin_s, layer.cout, d.in_h, d.in_w)
                .map_err(|e| dnn_err(&op, e))?;
            let cands = cudnn::candidates(
                &self.dnn,
                &descs.0,
                &layer.wdesc,
                &descs.2,
                &descs.1,
                identity,
                ws_cap,
            )
            .map_err(|e| dnn_err(&op, e))?;
            ws_need = ws_need.max(
                cands
                    .iter()
                    .filter(|c| c.fused)
                    .take(TIMED_CANDIDATES)
                    .chain(cands.iter().filter(|c| !c.fused).take(TIMED_CANDIDATES))
                    .map(|c| c.ws)
                    .max()
                    .unwrap_or(0),
            );
            pending.push(((i, n, identity), cands, descs));
        }
        let mut workspace = self.dev.alloc::<u8>(ws_need, "cuDNN workspace")?;
        let mut convs = HashMap::new();
        let mut ws_used = 0;
        for (key, cands, descs) in pending {
            let layer = dm.convs[key.0].as_ref().expect("conv stage");
            let act = if key.2 { &self.identity } else { &self.relu };
            let ws = tune_conv(
                &self.dev, &self.dnn, &mut convs, cands, descs, &workspace, act, layer, key, &bufs,
            )?;
            ws_used = ws_used.max(ws);
        }
        if ws_used < workspace.len() / 2 {
            // Give back what the tuning needed but the chosen algorithms do not.
            drop(workspace);
            workspace = self.dev.alloc::<u8>(ws_used, "cuDNN workspace")?;
        }
        self.prep = Some(Prepared {
            plan,
            rows_max,
            feat: (h, w, c),
            dims,
            capture,
            bufs,
            workspace,
            convs,
        });
        Ok(())
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
        mut acts: Option<&mut CudaBuf>,
    ) -> Result<()> {
        self.bind()?;
        let CudaBackend {
            prep,
            model,
            kernels,
            blas,
            relu,
            identity,
            dnn,
            dev,
            ..
        } = self;
        let prep = prep
            .as_mut()
            .ok_or_else(|| Error::Invalid("CUDA backend used before prepare()".into()))?;
        let dm = model.as_ref().expect("a prepared backend has a model");
        let s = prep.plan.input_size;
        if n == 0 {
            return Ok(());
        }
        if n > prep.rows_max {
            return Err(Error::Invalid(format!(
                "forward of {n} rows, but the plan allows at most {}",
                prep.rows_max
            )));
        }
        x.check4("forward input", n, 3, s, s)?;
        let classes = dm.model.num_classes();
        if logits.shape.len() != 2 || logits.shape[0] < n || logits.shape[1] != classes {
            return Err(Error::Invalid(format!(
                "forward: logits buffer of shape {:?}, expected [≥{n}, {classes}]",
                logits.shape
            )));
        }
        let cap = prep.plan.capture;
        if let Some(a) = acts.as_deref() {
            let MapShape { c, h, w } = prep.capture;
            a.check4("forward activations", n, c, h, w)?;
        }
        let xs = x.f16("forward input")?;
        let Prepared {
            dims,
            bufs,
            workspace,
            convs,
            feat,
            ..
        } = prep;
        let stream = &dev.stream;

        // `cur`: which buffer holds the current activations (None: the input x).
        let mut cur: Option<usize> = None;
        for (i, stage) in dm.model.features.iter().enumerate() {
            let d = dims[i];
            let out_elems = n * d.out_len();
            let [b0, b1] = &mut *bufs;
            let (input, output, next): (&CudaSlice<f16>, &mut CudaSlice<f16>, usize) = match cur {
                None => (xs, b0, 0),
                Some(0) => (&*b0, b1, 1),
                Some(_) => (&*b1, b0, 0),
            };
            let capture_here = acts.is_some() && cap.stage == i;
            match stage {
                FeatureStage::Conv(_) => {
                    let layer = dm.convs[i].as_ref().expect("conv stage");
                    let pre = capture_here && cap.pre_relu;
                    let act = if pre { &*identity } else { &*relu };
                    run_conv(
                        dev, dnn, kernels, convs, workspace, act, layer, i, d, n, pre, input,
                        output,
                    )?;
                    if pre {
                        let a = acts
                            .as_deref_mut()
                            .expect("capture_here")
                            .f16_mut("forward activations")?;
                        stream
                            .memcpy_dtod(&output.slice(..out_elems), &mut a.slice_mut(..out_elems))
                            .map_err(|e| drv_err("forward: capturing activations", e))?;
                        kernels.relu_f16(stream, &mut output.slice_mut(..out_elems), out_elems)?;
                    } else if capture_here {
                        let a = acts
                            .as_deref_mut()
                            .expect("capture_here")
                            .f16_mut("forward activations")?;
                        stream
                            .memcpy_dtod(&output.slice(..out_elems), &mut a.slice_mut(..out_elems))
                            .map_err(|e| drv_err("forward: capturing activations", e))?;
                    }
                }
                FeatureStage::MaxPool { .. } => {
                    kernels.maxpool2(
                        stream,
                        &input.slice(..n * d.in_len()),
                        n,
                        d.in_h,
                        d.in_w,
                        d.in_c,
                        &mut output.slice_mut(..out_elems),
                    )?;
                    if capture_here {
                        let a = acts
                            .as_deref_mut()
                            .expect("capture_here")
                            .f16_mut("forward activations")?;
                        stream
                            .memcpy_dtod(&output.slice(..out_elems), &mut a.slice_mut(..out_elems))
                            .map_err(|e| drv_err("forward: capturing activations", e))?;
                    }
                }
            }
            cur = Some(next);
        }
        let mut cur = cur.expect("validated models have feature stages");

        // AdaptiveAvgPool2d(7×7): identity when the map is already 7×7.
        let (fh, fw, fc) = *feat;
        if (fh, fw) != (POOLED, POOLED) {
            let [b0, b1] = &mut *bufs;
            let (input, output) = if cur == 0 { (&*b0, b1) } else { (&*b1, b0) };
            kernels.adaptive_avgpool(
                stream,
                &input.slice(..n * fh * fw * fc),
                n,
                fh,
                fw,
                fc,
                POOLED,
                POOLED,
                &mut output.slice_mut(..n * POOLED * POOLED * fc),
            )?;
            cur = 1 - cur;
        }

        // Classifier. Row-major Y[n, out] = X[n, in] · Wᵀ (+ b) with W [out, in] row-major.
        // cuBLAS is column-major: a row-major [r, c] matrix is a column-major [c, r] one with
        // leading dimension c. So compute Yᵀ[out, n] = W[out, in] · Xᵀ[in, n] column-major:
        //   A = W   stored col-major [in, out] (ld = in) → op(A) = Aᵀ = W   (transa = T, lda = in)
        //   B = Xᵀ  stored col-major [in, n]   (ld = in) → op(B) = B        (transb = N, ldb = in)
        //   C = Yᵀ  stored col-major [out, n]  (ld = out)
        //   m = out, n = rows, k = in.
        let last = dm.linears.len() - 1;
        let logits_dev = logits.f32_mut("forward logits")?;
        for (j, l) in dm.linears.iter().enumerate() {
            let [b0, b1] = &mut *bufs;
            let (input, output) = if cur == 0 { (&*b0, b1) } else { (&*b1, b0) };
            let xp = ptr(input, stream);
            let wp = ptr(&l.weight, stream);
            let op = format!("linear classifier layer {j} (batch {n})");
            let (yp, out_f32) = if j == last {
                (ptr(&*logits_dev, stream), true)
            } else {
                (ptr(&*output, stream), false)
            };
            // SAFETY: input holds ≥ n·fin f16 values, weight fout·fin, output n·fout of its type
            // (arena rows ≥ n, per-row size ≥ every fout; logits checked above).
            unsafe { blas::gemm_tn(blas, l.fout, n, l.fin, wp, xp, yp, out_f32) }
                .map_err(|e| blas_err(&op, e))?;
            if j == last {
                kernels.bias_f32(
                    stream,
                    &mut logits_dev.slice_mut(..n * l.fout),
                    &l.bias32.as_view(),
                    n,
                    l.fout,
                )?;
            } else {
                kernels.bias_act_f16(
                    stream,
                    &mut output.slice_mut(..n * l.fout),
                    &l.bias16.as_view(),
                    n,
                    l.fout,
                    l.relu,
                )?;
                cur = 1 - cur;
            }
        }
        Ok(())
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
        let buf = self.scratch.items.get(dev, flat.len(), "mask items")?;
        dev.stream
            .memcpy_htod(&flat[..], &mut buf.slice_mut(..flat.len()))
            .map_err(|e| drv_err("masked_inputs: uploading items", e))?;
        let row = out.row_len();
        let dst = out.f16_mut("masked_inputs output")?;
        self.kernels.masks(
            &dev.stream,
            &images.f16("masked_inputs images")?.as_view(),
            &acts.f16("masked_inputs activations")?.as_view(),
            &buf.slice(..flat.len()),
            b,
            s,
            h,
            w,
            k,
            CPAD,
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
        let src = logits.f32("scores")?;
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
        let t = targets.len() / n;
        let dev = &self.dev;
        let tg = self
            .scratch
            .targets
            .get(dev, targets.len(), "score targets")?;
        dev.stream
            .memcpy_htod(targets, &mut tg.slice_mut(..targets.len()))
            .map_err(|e| drv_err("scores: uploading targets", e))?;
        let out = self.scratch.scores.get(dev, n * t, "scores")?;
        self.kernels.scores(
            &dev.stream,
            &src.slice(..n * c),
            &tg.slice(..n * t),
            n,
            c,
            t,
            probability,
            &mut out.slice_mut(..n * t),
        )?;
        dev.download(out, n * t, "scores")
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
            .ok_or_else(|| Error::Invalid("CUDA backend used before prepare()".into()))?
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
