//! cuDNN through cudarc's `result`/`sys` layers, with our own RAII wrappers.
//!
//! Why not cudarc's safe `cudnn` API: its `ConvBiasActivationForward::launch` borrows `z`
//! immutably and `y` mutably, so `z = y` (the documented in-place use with `alpha2 = 0`) cannot
//! be expressed, and its handle/descriptor fields are private. Here every descriptor is a plain
//! owned wrapper whose `Drop` ignores errors (never panics).
//!
//! Convolution configuration (PyTorch's channels-last FP16 path, "PSEUDO_HALF_CONFIG"): x, w, y,
//! z and bias FP16 NHWC; conv compute type FLOAT; tensor-op math; scaling factors `f32` on the
//! host.

use std::ffi::c_void;

use cudarc::cudnn::result::{self, CudnnError};
use cudarc::cudnn::sys;
use cudarc::driver::CudaStream;

pub use sys::cudnnActivationMode_t as ActMode;
pub use sys::cudnnConvolutionFwdAlgo_t as FwdAlgo;
pub use sys::cudnnMathType_t as MathType;

/// The cuDNN library version, e.g. 91400 for 9.14.0.
pub fn version() -> usize {
    result::get_version()
}

/// `91400` → `"9.14"`.
pub fn version_string(v: usize) -> String {
    format!("{}.{}", v / 10000, (v % 10000) / 100)
}

/// Whether a cuDNN status means an allocation failed (host or device).
pub fn is_alloc_failure(e: &CudnnError) -> bool {
    matches!(
        e.0,
        sys::cudnnStatus_t::CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED
            | sys::cudnnStatus_t::CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED
    )
}

/// A cuDNN handle bound to one stream.
pub struct Handle(sys::cudnnHandle_t);

impl Handle {
    /// The stream's context must be current on this thread.
    pub fn new(stream: &CudaStream) -> Result<Self, CudnnError> {
        let h = Handle(result::create_handle()?);
        // SAFETY: `h.0` is a fresh handle; the stream outlives it (the backend drops the
        // handle before its stream).
        unsafe { result::set_stream(h.0, stream.cu_stream() as sys::cudaStream_t) }?;
        Ok(h)
    }
    pub fn raw(&self) -> sys::cudnnHandle_t {
        self.0
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: created by cudnnCreate, destroyed once.
            let _ = unsafe { result::destroy_handle(self.0) };
        }
    }
}

/// A 4-D tensor descriptor, FP16, NHWC.
pub struct TensorDesc(sys::cudnnTensorDescriptor_t);

impl TensorDesc {
    /// Logical dims `[n, c, h, w]`, memory NHWC.
    pub fn nhwc_f16(n: usize, c: usize, h: usize, w: usize) -> Result<Self, CudnnError> {
        let d = TensorDesc(result::create_tensor_descriptor()?);
        // SAFETY: fresh descriptor.
        unsafe {
            result::set_tensor4d_descriptor(
                d.0,
                sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC,
                sys::cudnnDataType_t::CUDNN_DATA_HALF,
                [n as i32, c as i32, h as i32, w as i32],
            )
        }?;
        Ok(d)
    }
    pub fn raw(&self) -> sys::cudnnTensorDescriptor_t {
        self.0
    }
}

impl Drop for TensorDesc {
    fn drop(&mut self) {
        // SAFETY: created once, destroyed once.
        let _ = unsafe { result::destroy_tensor_descriptor(self.0) };
    }
}

/// A filter descriptor `[k, c, r, s]`, FP16, format NHWC (memory KRSC).
pub struct FilterDesc(sys::cudnnFilterDescriptor_t);

impl FilterDesc {
    pub fn nhwc_f16(k: usize, c: usize, r: usize, s: usize) -> Result<Self, CudnnError> {
        let d = FilterDesc(result::create_filter_descriptor()?);
        // SAFETY: fresh descriptor.
        unsafe {
            result::set_filter4d_descriptor(
                d.0,
                sys::cudnnDataType_t::CUDNN_DATA_HALF,
                sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC,
                [k as i32, c as i32, r as i32, s as i32],
            )
        }?;
        Ok(d)
    }
    pub fn raw(&self) -> sys::cudnnFilterDescriptor_t {
        self.0
    }
}

impl Drop for FilterDesc {
    fn drop(&mut self) {
        // SAFETY: created once, destroyed once.
        let _ = unsafe { result::destroy_filter_descriptor(self.0) };
    }
}

/// Conv 3×3, pad 1, stride 1, dilation 1, cross-correlation, FLOAT compute.
pub struct ConvDesc(sys::cudnnConvolutionDescriptor_t);

impl ConvDesc {
    pub fn conv3x3_pad1() -> Result<Self, CudnnError> {
        let d = ConvDesc(result::create_convolution_descriptor()?);
        // SAFETY: fresh descriptor.
        unsafe {
            result::set_convolution2d_descriptor(
                d.0,
                1,
                1,
                1,
                1,
                1,
                1,
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
            )?;
            result::set_convolution_math_type(d.0, MathType::CUDNN_TENSOR_OP_MATH)?;
        }
        Ok(d)
    }
    pub fn set_math(&self, m: MathType) -> Result<(), CudnnError> {
        // SAFETY: live descriptor.
        unsafe { result::set_convolution_math_type(self.0, m) }
    }
    pub fn raw(&self) -> sys::cudnnConvolutionDescriptor_t {
        self.0
    }
}

impl Drop for ConvDesc {
    fn drop(&mut self) {
        // SAFETY: created once, destroyed once.
        let _ = unsafe { result::destroy_convolution_descriptor(self.0) };
    }
}

/// An activation descriptor (RELU or IDENTITY for the fused convolution).
pub struct ActDesc(sys::cudnnActivationDescriptor_t);

impl ActDesc {
    pub fn new(mode: ActMode) -> Result<Self, CudnnError> {
        let d = ActDesc(result::create_activation_descriptor()?);
        // PyTorch's ActivationDescriptor settings: NaNs not propagated, coef = DBL_MAX. Some cuDNN
        // documentation reads `coef` as an upper bound for RELU, so 0 could clip every value.
        // SAFETY: fresh descriptor.
        unsafe {
            result::set_activation_descriptor(
                d.0,
                mode,
                sys::cudnnNanPropagation_t::CUDNN_NOT_PROPAGATE_NAN,
                f64::MAX,
            )
        }?;
        Ok(d)
    }
    pub fn raw(&self) -> sys::cudnnActivationDescriptor_t {
        self.0
    }
}

impl Drop for ActDesc {
    fn drop(&mut self) {
        // SAFETY: created once, destroyed once.
        let _ = unsafe { sys::cudnnDestroyActivationDescriptor(self.0) };
    }
}

/// One way to run a convolution: algorithm, math type, workspace bytes, and whether bias and
/// activation are fused (`cudnnConvolutionBiasActivationForward`) or left to a kernel after a
/// plain `cudnnConvolutionForward` (the fallback when no fused configuration is accepted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub algo: FwdAlgo,
    pub math: MathType,
    pub ws: usize,
    pub fused: bool,
}

/// The descriptors of one convolution at one batch size, plus the chosen candidate.
pub struct ConvPlan {
    pub x: TensorDesc,
    pub y: TensorDesc,
    pub conv: ConvDesc,
    pub choice: Candidate,
}

/// Descriptors of a conv at batch `n`: input `[n, cin_s, h, w]`, output `[n, cout, h, w]`.
pub fn descriptors(
    n: usize,
    cin_s: usize,
    cout: usize,
    h: usize,
    w: usize,
) -> Result<(TensorDesc, TensorDesc, ConvDesc), CudnnError> {
    Ok((
        TensorDesc::nhwc_f16(n, cin_s, h, w)?,
        TensorDesc::nhwc_f16(n, cout, h, w)?,
        ConvDesc::conv3x3_pad1()?,
    ))
}

/// Candidate configurations in preference order: cuDNN's heuristic ranking
/// (`cudnnGetConvolutionForwardAlgorithm_v7`), fused first, then the same algorithms unfused.
/// With an IDENTITY activation only IMPLICIT_PRECOMP_GEMM may be fused (cuDNN's rule), so it is
/// the only fused candidate then. Candidates needing more than `ws_cap` bytes are dropped.
pub fn candidates(
    handle: &Handle,
    x: &TensorDesc,
    w: &FilterDesc,
    conv: &ConvDesc,
    y: &TensorDesc,
    identity: bool,
    ws_cap: usize,
) -> Result<Vec<Candidate>, CudnnError> {
    let mut max = 0i32;
    // SAFETY: live handle, valid out-pointer.
    let status =
        unsafe { sys::cudnnGetConvolutionForwardAlgorithmMaxCount(handle.raw(), &mut max) };
    let max = if status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS && max > 0 {
        max as usize
    } else {
        8
    };
    // SAFETY: all-zero is a valid value of the perf struct (every enum has a 0 variant).
    let mut perf: Vec<sys::cudnnConvolutionFwdAlgoPerf_t> =
        (0..max).map(|_| unsafe { std::mem::zeroed() }).collect();
    let mut returned = 0i32;
    // SAFETY: descriptors are live; `perf` holds `max` entries.
    unsafe {
        result::get_convolution_forward_algorithm(
            handle.raw(),
            x.raw(),
            w.raw(),
            conv.raw(),
            y.raw(),
            max as i32,
            &mut returned,
            perf.as_mut_ptr(),
        )
    }?;
    let mut ranked: Vec<(FwdAlgo, MathType)> = perf
        .iter()
        .take(returned.clamp(0, max as i32) as usize)
        .filter(|p| p.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS)
        .map(|p| (p.algo, p.mathType))
        .collect();
    // Always have the workhorse available as a last resort.
    for m in [MathType::CUDNN_TENSOR_OP_MATH, MathType::CUDNN_DEFAULT_MATH] {
        let c = (FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM, m);
        if !ranked.contains(&c) {
            ranked.push(c);
        }
    }
    let mut sized = Vec::new();
    for (algo, math) in ranked {
        if conv.set_math(math).is_err() {
            continue;
        }
        // SAFETY: live descriptors.
        let ws = unsafe {
            result::get_convolution_forward_workspace_size(
                handle.raw(),
                x.raw(),
                w.raw(),
                conv.raw(),
                y.raw(),
                algo,
            )
        };
        if let Ok(ws) = ws {
            if ws <= ws_cap {
                sized.push((algo, math, ws));
            }
        }
    }
    let precomp = FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM;
    let mut out: Vec<Candidate> = sized
        .iter()
        .filter(|(a, _, _)| !identity || *a == precomp)
        .map(|&(algo, math, ws)| Candidate {
            algo,
            math,
            ws,
            fused: true,
        })
        .collect();
    out.extend(sized.iter().map(|&(algo, math, ws)| Candidate {
        algo,
        math,
        ws,
        fused: false,
    }));
    Ok(out)
}

/// Device pointers of one convolution launch.
#[derive(Clone, Copy, Debug)]
pub struct ConvPtrs {
    pub x: u64,
    pub w: u64,
    pub bias: u64,
    pub y: u64,
    pub ws: u64,
    pub ws_len: usize,
}

/// Launch `plan.conv` with candidate `c` (setting the math type first).
/// Fused: `y = act(conv(x) + 0·z + bias)` with `z = y`. Unfused: `y = conv(x)` (the caller adds
/// bias and activation).
///
/// # Safety
/// The pointers must be live device allocations matching the descriptors (x `[n,h,w,cin_s]`,
/// w KRSC, bias `[cout]`, y `[n,h,w,cout]`, FP16), `ws_len ≥ c.ws`, and the handle's stream
/// must be the stream they are used on.
#[allow(clippy::too_many_arguments)]
pub unsafe fn launch(
    handle: &Handle,
    x: &TensorDesc,
    w: &FilterDesc,
    conv: &ConvDesc,
    y: &TensorDesc,
    bias: &TensorDesc,
    act: &ActDesc,
    c: Candidate,
    p: ConvPtrs,
) -> Result<(), CudnnError> {
    conv.set_math(c.math)?;
    let one = 1.0f32;
    let zero = 0.0f32;
    let ws = if p.ws_len == 0 {
        std::ptr::null_mut()
    } else {
        p.ws as *mut c_void
    };
    if c.fused {
        result::convolution_bias_activation_forward(
            handle.raw(),
            &one as *const f32 as *const c_void,
            x.raw(),
            p.x as *const c_void,
            w.raw(),
            p.w as *const c_void,
            conv.raw(),
            c.algo,
            ws,
            p.ws_len,
            &zero as *const f32 as *const c_void,
            y.raw(),
            p.y as *const c_void,
            bias.raw(),
            p.bias as *const c_void,
            act.raw(),
            y.raw(),
            p.y as *mut c_void,
        )
    } else {
        result::convolution_forward(
            handle.raw(),
            &one as *const f32 as *const c_void,
            x.raw(),
            p.x as *const c_void,
            w.raw(),
            p.w as *const c_void,
            conv.raw(),
            c.algo,
            ws,
            p.ws_len,
            &zero as *const f32 as *const c_void,
            y.raw(),
            p.y as *mut c_void,
        )
    }
}
