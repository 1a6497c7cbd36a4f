//! cuBLAS through cudarc's `result` layer: a handle whose `Drop` never panics, and the one GEMM
//! the classifier needs.

use std::ffi::c_void;

use cudarc::cublas::result::{self, CublasError};
use cudarc::cublas::sys::{
    self, cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t,
};
use cudarc::driver::CudaStream;

/// A cuBLAS handle bound to one stream.
pub struct Handle(sys::cublasHandle_t);

impl Handle {
    /// The stream's context must be current on this thread.
    pub fn new(stream: &CudaStream) -> Result<Self, CublasError> {
        let h = Handle(result::create_handle()?);
        // SAFETY: fresh handle; the stream outlives it (the backend drops the handle first).
        unsafe { result::set_stream(h.0, stream.cu_stream() as sys::cudaStream_t) }?;
        Ok(h)
    }

    /// Give cuBLAS its workspace (`bytes` at device address `ws`), so it never allocates one
    /// itself: an allocation inside a CUDA graph capture would fail it.
    ///
    /// # Safety
    /// The memory must stay allocated for as long as the handle lives.
    pub unsafe fn set_workspace(&self, ws: u64, bytes: usize) -> Result<(), CublasError> {
        sys::cublasSetWorkspace_v2(self.0, ws as *mut c_void, bytes).result()
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: created by cublasCreate, destroyed once.
            let _ = unsafe { result::destroy_handle(self.0) };
        }
    }
}

pub fn is_alloc_failure(e: &CublasError) -> bool {
    e.0 == sys::cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED
}

/// Column-major `C[m, n] = Aᵀ · B` where the stored `A` is `[k, m]` (ld k), `B` is `[k, n]`
/// (ld k) and `C` is `[m, n]` (ld m): `transa = T`, `transb = N`. A and B FP16, C FP16 or FP32,
/// FP32 accumulation and scaling (`CUBLAS_COMPUTE_32F`, tensor cores allowed).
///
/// For a row-major Linear `Y[rows, out] = X[rows, in] · Wᵀ` with `W` `[out, in]` row-major:
/// `m = out`, `n = rows`, `k = in`, `a = W`, `b = X`, `c = Y` (see `CudaBackend::forward`).
///
/// # Safety
/// `a` must hold `m·k`, `b` `k·n` FP16 values and `c` `m·n` values of its type, all used on the
/// handle's stream.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_tn(
    h: &Handle,
    m: usize,
    n: usize,
    k: usize,
    a: u64,
    b: u64,
    c: u64,
    c_f32: bool,
) -> Result<(), CublasError> {
    let alpha = 1.0f32;
    let beta = 0.0f32;
    result::gemm_ex(
        h.0,
        cublasOperation_t::CUBLAS_OP_T,
        cublasOperation_t::CUBLAS_OP_N,
        m as i32,
        n as i32,
        k as i32,
        &alpha as *const f32 as *const c_void,
        a as *const c_void,
        cudaDataType_t::CUDA_R_16F,
        k as i32,
        b as *const c_void,
        cudaDataType_t::CUDA_R_16F,
        k as i32,
        &beta as *const f32 as *const c_void,
        c as *mut c_void,
        if c_f32 {
            cudaDataType_t::CUDA_R_32F
        } else {
            cudaDataType_t::CUDA_R_16F
        },
        m as i32,
        cublasComputeType_t::CUBLAS_COMPUTE_32F,
        cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
    )
}
