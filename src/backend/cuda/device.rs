//! The device: opening it (libraries, symbols, context, stream), typed buffers, allocation and
//! copies with out-of-memory errors that name what was being allocated, and the error mapping
//! of the driver, cuDNN and cuBLAS.

use std::sync::Arc;

use cudarc::cublas::result::CublasError;
use cudarc::driver::result::DriverError;
use cudarc::driver::{
    CudaContext, CudaSlice, CudaStream, CudaView, DevicePtr, DeviceRepr, PinnedHostSlice,
    ValidAsZeroBits,
};
use half::f16;

use super::{blas, cudnn, symbols};
use crate::error::{Error, Result};

/// A device tensor. 4-D shapes `[n, c, h, w]` are FP16 NHWC (stored channels `CPAD` for
/// 3-channel images, `c` otherwise); 2-D shapes `[n, c]` (logits) are f32 row-major.
pub struct CudaBuf {
    pub(super) shape: Vec<usize>,
    /// Stored channels (4-D) or columns (2-D).
    pub(super) cs: usize,
    pub(super) data: BufData,
}

pub(super) enum BufData {
    F16(CudaSlice<f16>),
    F32(CudaSlice<f32>),
}

impl CudaBuf {
    /// The logical shape (NCHW or `[N, C]`).
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Stored elements per row.
    pub(super) fn row_len(&self) -> usize {
        match self.shape.len() {
            4 => self.shape[2] * self.shape[3] * self.cs,
            _ => self.cs,
        }
    }

    pub(super) fn f16(&self, what: &str) -> Result<&CudaSlice<f16>> {
        match &self.data {
            BufData::F16(s) if self.shape.len() == 4 => Ok(s),
            _ => Err(Error::Invalid(format!(
                "{what}: expected a 4-D image/activation buffer, got shape {:?}",
                self.shape
            ))),
        }
    }

    pub(super) fn f16_mut(&mut self, what: &str) -> Result<&mut CudaSlice<f16>> {
        match &mut self.data {
            BufData::F16(s) if self.shape.len() == 4 => Ok(s),
            _ => Err(Error::Invalid(format!(
                "{what}: expected a 4-D image/activation buffer, got shape {:?}",
                self.shape
            ))),
        }
    }

    pub(super) fn f32(&self, what: &str) -> Result<&CudaSlice<f32>> {
        match &self.data {
            BufData::F32(s) => Ok(s),
            _ => Err(Error::Invalid(format!(
                "{what}: expected a 2-D logits buffer, got shape {:?}",
                self.shape
            ))),
        }
    }

    pub(super) fn f32_mut(&mut self, what: &str) -> Result<&mut CudaSlice<f32>> {
        match &mut self.data {
            BufData::F32(s) => Ok(s),
            _ => Err(Error::Invalid(format!(
                "{what}: expected a 2-D logits buffer, got shape {:?}",
                self.shape
            ))),
        }
    }

    /// Check a 4-D buffer: at least `n` rows, logical `[_, c, h, w]`.
    pub(super) fn check4(&self, what: &str, n: usize, c: usize, h: usize, w: usize) -> Result<()> {
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

/// A device buffer that only grows.
pub(super) struct Grow<T>(pub(super) Option<CudaSlice<T>>);

impl<T> Default for Grow<T> {
    fn default() -> Self {
        Grow(None)
    }
}

impl<T: DeviceRepr + ValidAsZeroBits> Grow<T> {
    pub(super) fn get(&mut self, dev: &Dev, len: usize, what: &str) -> Result<&mut CudaSlice<T>> {
        if self.0.as_ref().is_none_or(|s| s.len() < len) {
            self.0 = None;
            self.0 = Some(dev.alloc::<T>(len, what)?);
        }
        Ok(self.0.as_mut().expect("allocated above"))
    }

    /// Room for `len` elements keeping the first `keep`: a smaller buffer is replaced by one of
    /// at least twice its size, the kept elements copied over on the stream (the host does not
    /// wait; the old buffer is freed in stream order after the copy).
    pub(super) fn grow_keeping(
        &mut self,
        dev: &Dev,
        len: usize,
        keep: usize,
        what: &str,
    ) -> Result<&mut CudaSlice<T>> {
        let have = self.0.as_ref().map_or(0, |s| s.len());
        if have < len {
            let mut bigger = dev.alloc::<T>(len.max(2 * have), what)?;
            if let Some(old) = self.0.as_ref().filter(|_| keep > 0) {
                dev.stream
                    .memcpy_dtod(&old.slice(..keep), &mut bigger.slice_mut(..keep))
                    .map_err(|e| drv_err(&format!("growing the {what}"), e))?;
            }
            self.0 = Some(bigger);
        }
        Ok(self.0.as_mut().expect("allocated above"))
    }
}

/// Context, stream and memory facts shared by the helpers.
pub(super) struct Dev {
    pub(super) ctx: Arc<CudaContext>,
    pub(super) stream: Arc<CudaStream>,
    pub(super) total_mem: usize,
}

impl Dev {
    /// `len` zeroed elements (at least one). A size beyond the device's memory or a driver
    /// out-of-memory error is `Error::OutOfMemory` naming `what` and the bytes.
    pub(super) fn alloc<T: DeviceRepr + ValidAsZeroBits>(
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
    pub(super) fn upload<T: DeviceRepr + ValidAsZeroBits>(
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

    /// Wait until the work queued on the stream is done, but at most `limit`: the device checks
    /// of the hand-written kernels, so that one that hangs on a device (a barrier it never
    /// passes) stops the run with an error naming it, instead of blocking it for good. A hung
    /// kernel keeps running, and the context cannot be used again: the error is final.
    pub(super) fn finish_within(&self, what: &str, limit: std::time::Duration) -> Result<()> {
        let event = self
            .ctx
            .new_event(None)
            .map_err(|e| drv_err(&format!("{what}: cuEventCreate"), e))?;
        event
            .record(&self.stream)
            .map_err(|e| drv_err(&format!("{what}: cuEventRecord"), e))?;
        let started = std::time::Instant::now();
        loop {
            match event.try_is_complete() {
                Ok(true) => return Ok(()),
                Ok(false) if started.elapsed() < limit => {
                    std::thread::sleep(std::time::Duration::from_millis(1))
                }
                Ok(false) => {
                    return Err(Error::Cuda {
                        op: what.to_string(),
                        msg: format!(
                            "not finished after {} s: a hand-written kernel seems hung on this \
                             device, whose CUDA context cannot be used again; run with \
                             SCORECAM_SKIP_KERNELS set to the kernel named here, or \
                             SCORECAM_WGMMA=off (no Hopper wgmma kernels), or \
                             SCORECAM_CONV_DIRECT=off (cuDNN only)",
                            limit.as_secs()
                        ),
                    })
                }
                Err(e) => return Err(drv_err(what, e)),
            }
        }
    }

    /// Copy the first `len` elements of a device buffer to the host (synchronizes).
    pub(super) fn download<T: DeviceRepr + Default + Clone>(
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
pub(super) fn verbose() -> bool {
    std::env::var("SCORECAM_CUDA_VERBOSE").is_ok_and(|v| v == "1")
}

/// Raw device address of a buffer for cuDNN/cuBLAS. Event tracking is disabled on this context,
/// so the returned guard is inert and dropping it at once is correct (single stream).
pub(super) fn ptr<T, P: DevicePtr<T>>(s: &P, stream: &CudaStream) -> u64 {
    let (p, _guard) = s.device_ptr(stream);
    p
}

/// Out of GPU memory (the message says which memory, so the CPU's never reads as a GPU's).
pub(super) fn gpu_oom(msg: impl std::fmt::Display) -> Error {
    Error::OutOfMemory(format!("GPU memory: {msg}"))
}

pub(super) fn drv_err(op: &str, e: DriverError) -> Error {
    if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        gpu_oom(op)
    } else {
        Error::cuda(op, e)
    }
}

pub(super) fn dnn_err(op: &str, e: cudarc::cudnn::CudnnError) -> Error {
    if cudnn::is_alloc_failure(&e) {
        gpu_oom(format!("{op}: {e}"))
    } else {
        Error::cuda(op, e)
    }
}

pub(super) fn blas_err(op: &str, e: CublasError) -> Error {
    if blas::is_alloc_failure(&e) {
        gpu_oom(format!("{op}: {e}"))
    } else {
        Error::cuda(op, e)
    }
}

pub(super) fn unavailable(what: &str, e: impl std::fmt::Display) -> Error {
    Error::CudaUnavailable(format!("{what}: {e}"))
}

pub(super) fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".into()
    }
}

/// A CUDA library the dynamic loader cannot find, with how to make it visible (libraries are
/// dlopen'ed by name, so only the loader's search path counts).
pub(super) fn missing_library(what: &str) -> Error {
    Error::CudaUnavailable(format!(
        "{what} was not found on the library path; add its directory to LD_LIBRARY_PATH \
         (CUDA toolkit: /usr/local/cuda/lib64; pip wheels: site-packages/nvidia/cu13/lib and \
         site-packages/nvidia/cudnn/lib)"
    ))
}

/// Check that the shared libraries load; cudarc panics on a missing one, so this comes first.
pub(super) fn check_libraries() -> Result<()> {
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
pub(super) fn count_devices() -> Result<usize> {
    check_libraries()?;
    let count = CudaContext::device_count().map_err(|e| unavailable("no usable CUDA device", e))?;
    if count <= 0 {
        return Err(Error::CudaUnavailable("no CUDA device found".into()));
    }
    Ok(count as usize)
}

/// Check the shared libraries, count devices, open device `ordinal`. Returns the context and
/// `"<name> (sm_XY"` (unclosed: callers append).
pub(super) fn open_device(ordinal: usize) -> Result<(Arc<CudaContext>, String)> {
    let count = count_devices()?;
    // Every function the engine calls, resolved now: cudarc resolves each on first call and
    // panics on a missing one (an older driver), which must not happen mid-run.
    symbols::check(false).map_err(|missing| Error::CudaUnavailable(symbols::describe(&missing)))?;
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

/// Small host→device uploads (mask items, score targets) through page-locked memory, so each
/// copy is asynchronous and the host never waits for the GPU to reach it. Copies are appended
/// at a cursor; a copy that does not fit waits for the stream (every earlier copy has then
/// been read) and starts again at the front.
pub(super) struct UploadRing {
    /// Page-locked host memory (write-combined: the host only writes it). Owned here; the raw
    /// pointer below is its start, taken once when nothing was in flight.
    host: PinnedHostSlice<u32>,
    host_ptr: *mut u32,
    dev: CudaSlice<u32>,
    cursor: usize,
}

impl UploadRing {
    pub(super) fn new(dev: &Dev, len: usize) -> Result<Self> {
        let len = len.max(1);
        // SAFETY: the memory is written before any copy reads it (push writes, then copies).
        let mut host = unsafe { dev.ctx.alloc_pinned::<u32>(len) }
            .map_err(|e| drv_err("allocating page-locked upload memory", e))?;
        let host_ptr = host
            .as_mut_ptr()
            .map_err(|e| drv_err("page-locked upload memory", e))?;
        let dev_buf = dev.alloc::<u32>(len, "upload ring")?;
        Ok(UploadRing {
            host,
            host_ptr,
            dev: dev_buf,
            cursor: 0,
        })
    }

    /// Copy `data` to the device (asynchronously, in stream order) and return where it lies
    /// there: a view of `data.len()` elements.
    pub(super) fn push(
        &mut self,
        dev: &Dev,
        data: &[u32],
        what: &str,
    ) -> Result<CudaView<'_, u32>> {
        let cap = self.host.len();
        if data.len() > cap {
            return Err(Error::Invalid(format!(
                "{what}: {} values exceed the {cap}-value upload ring",
                data.len()
            )));
        }
        if self.cursor + data.len() > cap {
            // Every copy queued so far must have read its bytes before they are overwritten.
            dev.stream
                .synchronize()
                .map_err(|e| drv_err(&format!("uploading {what}"), e))?;
            self.cursor = 0;
        }
        let start = self.cursor;
        // SAFETY: [start, start + len) lies inside the pinned allocation, and no queued copy
        // reads it: copies read only below the cursor since the last synchronization.
        let staged = unsafe {
            let dst = std::slice::from_raw_parts_mut(self.host_ptr.add(start), data.len());
            dst.copy_from_slice(data);
            std::slice::from_raw_parts(self.host_ptr.add(start), data.len())
        };
        if !data.is_empty() {
            dev.stream
                .memcpy_htod(staged, &mut self.dev.slice_mut(start..start + data.len()))
                .map_err(|e| drv_err(&format!("uploading {what}"), e))?;
        }
        self.cursor += data.len();
        Ok(self.dev.slice(start..start + data.len()))
    }

    /// The stream was synchronized: every queued copy is done, the whole ring is free.
    pub(super) fn synchronized(&mut self) {
        self.cursor = 0;
    }
}
