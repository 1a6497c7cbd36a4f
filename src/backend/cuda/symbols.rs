//! Every C symbol the CUDA backend can reach, resolved once when a device is opened.
//!
//! # Why
//! cudarc is built with `dynamic-loading`: each `cudarc::*::sys` function looks its symbol up
//! with `dlsym` on its first call and **panics** (`Missing symbol cuX: …`) when the loaded
//! library lacks it — an older driver, an older cuDNN, a stripped or foreign library. Such a
//! panic would fire mid-run, deep inside a launch or a `Drop`. [`check`] resolves the same
//! names, the same way (`culib().get(name)`), up front, so a missing symbol is an ordinary
//! error naming it ([`describe`]) before any work starts.
//!
//! # What the lists hold
//! Exactly the symbols reachable from the cudarc calls the backend makes (safe, `result` and
//! `sys` layers, including the `Drop` impls of cudarc's types), as the versioned names cudarc's
//! `load::<_F>("…")` strings use with the `cuda-13000` and `cudnn-09021` features (e.g.
//! `cuEventElapsedTime_v2`, not `cuEventElapsedTime`). Traced against cudarc 0.19.10 with the
//! context's event tracking disabled (the backend disables it before creating its one stream):
//! with tracking on, `CudaContext::new_stream` would also call `cuCtxSynchronize`.
//!
//! Where cudarc picks between symbols at run time (device allocations: stream-ordered when the
//! device reports memory pools, else synchronous) the choices are an [`EitherOr`] group: one of
//! its options must resolve in full.
//!
//! A new cudarc call in the backend must add its symbols here; a cudarc upgrade must re-check
//! the names (the `_vN` suffixes change with the bindings).

use std::ffi::c_void;

/// `MissingSymbol::library` of the CUDA driver's symbols.
pub(crate) const LIB_DRIVER: &str = "the CUDA driver library (libcuda.so)";
/// `MissingSymbol::library` of cuDNN's symbols (legacy and graph API).
pub(crate) const LIB_CUDNN: &str = "cuDNN (libcudnn.so)";
/// `MissingSymbol::library` of cuBLAS's symbols.
pub(crate) const LIB_CUBLAS: &str = "cuBLAS (libcublas.so)";
/// `MissingSymbol::library` of NVRTC's symbols.
pub(crate) const LIB_NVRTC: &str = "NVRTC (libnvrtc.so)";

/// The oldest CUDA version whose driver exports every symbol in [`DRIVER_SYMBOLS`]: the newest
/// one there is `cuEventElapsedTime_v2` (first in cudarc's `cuda-12080` bindings); everything
/// else is in the oldest bindings cudarc has (CUDA 11.4).
pub(crate) const MIN_DRIVER_CUDA: &str = "12.8";

/// libcuda symbols, by the cudarc call that reaches them.
pub(crate) const DRIVER_SYMBOLS: &[&str] = &[
    // CudaContext::device_count / CudaContext::new: result::init, device::get_count,
    // device::get, device::get_attribute (memory pools; also `attribute`,
    // `compute_capability`), CudaContext::name, CudaContext::total_mem.
    "cuInit",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDeviceGetAttribute",
    "cuDeviceGetName",
    "cuDeviceTotalMem_v2",
    // CudaContext::new (primary context retain) and its Drop (release); bind_to_thread, which
    // nearly every safe call and Drop makes first.
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2",
    "cuCtxGetCurrent",
    "cuCtxSetCurrent",
    // DriverError's Display/Debug (every driver error the backend formats).
    "cuGetErrorString",
    // CudaContext::new_stream, CudaStream's Drop, CudaStream::synchronize (also in
    // CudaSlice's Drop on the synchronous-free path).
    "cuStreamCreate",
    "cuStreamDestroy_v2",
    "cuStreamSynchronize",
    // CUDA graphs: CudaStream::begin_capture / end_capture (instantiate; destroy on failure),
    // CudaGraph::launch and CudaGraph's Drop.
    "cuStreamBeginCapture_v2",
    "cuStreamEndCapture",
    "cuGraphInstantiateWithFlags",
    "cuGraphLaunch",
    "cuGraphExecDestroy",
    "cuGraphDestroy",
    // CudaContext::new_event (also inside alloc_pinned_with_flags), CudaEvent::record,
    // synchronize, elapsed_ms (synchronizes both events first), CudaEvent's Drop.
    "cuEventCreate",
    "cuEventRecord",
    "cuEventSynchronize",
    // CudaEvent::try_is_complete (Dev::finish_within: the hand-written kernels' device checks).
    "cuEventQuery",
    "cuEventElapsedTime_v2",
    "cuEventDestroy_v2",
    // CudaStream::alloc_zeros (memset_zeros), memcpy_htod, memcpy_dtoh, memcpy_dtod (same
    // context), CudaContext::mem_get_info, alloc_pinned_with_flags and PinnedHostSlice's Drop.
    // The device allocation itself is in DRIVER_ALTERNATIVES. Passing a PinnedHostSlice itself
    // (not a `&[T]` over it) to memcpy_htod/memcpy_dtoh would add cuStreamWaitEvent.
    "cuMemsetD8Async",
    "cuMemcpyHtoDAsync_v2",
    "cuMemcpyDtoHAsync_v2",
    "cuMemcpyDtoDAsync_v2",
    "cuMemGetInfo_v2",
    "cuMemHostAlloc",
    "cuMemFreeHost",
    // CudaContext::load_module (CUBIN or PTX image), CudaModule::load_function, CudaModule's
    // Drop, CudaFunction::set_attribute, occupancy_max_active_blocks_per_multiprocessor,
    // LaunchArgs::launch.
    "cuModuleLoadData",
    "cuModuleGetFunction",
    "cuModuleUnload",
    "cuFuncSetAttribute",
    "cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags",
    "cuLaunchKernel",
];

/// A run-time choice inside cudarc: every symbol of at least one option must resolve.
#[derive(Clone, Copy, Debug)]
pub(crate) struct EitherOr {
    /// How a missing group is named: `either A+B or C+D` (checked against `options` by a test).
    pub label: &'static str,
    /// The alternatives, in cudarc's order of preference.
    pub options: &'static [&'static [&'static str]],
}

/// libcuda either-or groups. `CudaStream::alloc` (under `alloc_zeros`) and `CudaSlice`'s Drop
/// use the stream-ordered pair when the device reports `CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED`
/// (`CudaContext::has_async_alloc`), else the synchronous pair — the same pair for both.
pub(crate) const DRIVER_ALTERNATIVES: &[EitherOr] = &[EitherOr {
    label: "either cuMemAllocAsync+cuMemFreeAsync or cuMemAlloc_v2+cuMemFree_v2",
    options: &[
        &["cuMemAllocAsync", "cuMemFreeAsync"],
        &["cuMemAlloc_v2", "cuMemFree_v2"],
    ],
}];

/// cuDNN legacy-API symbols (the backend's own wrappers in `cudnn.rs`, through cudarc's
/// `cudnn::result` and `cudnn::sys`).
pub(crate) const CUDNN_SYMBOLS: &[&str] = &[
    // cudnn::version.
    "cudnnGetVersion",
    // Handle::new and its Drop.
    "cudnnCreate",
    "cudnnSetStream",
    "cudnnDestroy",
    // TensorDesc, FilterDesc, ConvDesc, ActDesc: create, set, destroy (Drop).
    "cudnnCreateTensorDescriptor",
    "cudnnSetTensor4dDescriptor",
    "cudnnDestroyTensorDescriptor",
    "cudnnCreateFilterDescriptor",
    "cudnnSetFilter4dDescriptor",
    "cudnnDestroyFilterDescriptor",
    "cudnnCreateConvolutionDescriptor",
    "cudnnSetConvolution2dDescriptor",
    "cudnnSetConvolutionMathType",
    "cudnnDestroyConvolutionDescriptor",
    "cudnnCreateActivationDescriptor",
    "cudnnSetActivationDescriptor",
    "cudnnDestroyActivationDescriptor",
    // candidates: heuristic ranking and workspace sizes; launch: fused or plain forward.
    "cudnnGetConvolutionForwardAlgorithmMaxCount",
    "cudnnGetConvolutionForwardAlgorithm_v7",
    "cudnnGetConvolutionForwardWorkspaceSize",
    "cudnnConvolutionBiasActivationForward",
    "cudnnConvolutionForward",
];

/// cuDNN backend (graph) API symbols. Checked only when asked (`check(true)`): without them the
/// backend falls back to the legacy path of [`CUDNN_SYMBOLS`].
pub(crate) const CUDNN_GRAPH_SYMBOLS: &[&str] = &[
    "cudnnBackendCreateDescriptor",
    "cudnnBackendDestroyDescriptor",
    "cudnnBackendSetAttribute",
    "cudnnBackendGetAttribute",
    "cudnnBackendFinalize",
    "cudnnBackendExecute",
];

/// cuBLAS symbols: `blas::Handle::new` and its Drop (`result::create_handle`, `set_stream`,
/// `destroy_handle`), `blas::gemm_tn` (`result::gemm_ex`), and `cublasSetWorkspace_v2` through
/// `cublas::sys`.
pub(crate) const CUBLAS_SYMBOLS: &[&str] = &[
    "cublasCreate_v2",
    "cublasSetStream_v2",
    "cublasSetWorkspace_v2",
    "cublasGemmEx",
    "cublasDestroy_v2",
];

/// NVRTC symbols (`kernels.rs`): version and supported architectures (`nvrtc::sys`, also used
/// to name the on-disk kernel cache), one compile (`nvrtc::result::create_program`,
/// `compile_program`, `get_ptx`, `get_program_log`, `destroy_program`) and its CUBIN
/// (`nvrtc::sys`).
pub(crate) const NVRTC_SYMBOLS: &[&str] = &[
    "nvrtcVersion",
    "nvrtcGetNumSupportedArchs",
    "nvrtcGetSupportedArchs",
    "nvrtcCreateProgram",
    "nvrtcCompileProgram",
    "nvrtcDestroyProgram",
    "nvrtcGetCUBINSize",
    "nvrtcGetCUBIN",
    "nvrtcGetPTXSize",
    "nvrtcGetPTX",
    "nvrtcGetProgramLogSize",
    "nvrtcGetProgramLog",
];

/// A symbol that did not resolve: the library (one of the `LIB_*` constants) and the symbol's
/// name, or an [`EitherOr`] group's label when none of its options resolved in full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MissingSymbol {
    pub library: &'static str,
    pub symbol: &'static str,
}

/// Resolve every listed symbol (the cuDNN graph API's only with `include_graph_api`) in the
/// libraries cudarc has loaded or will load. `Err` lists every missing one, in list order,
/// not just the first; [`describe`] turns them into one message.
///
/// The caller must first have checked that all four libraries load
/// (`cudarc::{driver,cudnn,cublas,nvrtc}::sys::is_culib_present()`): `culib()` panics otherwise.
/// Nothing is called through the symbols; looking them up has no effect on the device.
pub(crate) fn check(include_graph_api: bool) -> Result<(), Vec<MissingSymbol>> {
    // SAFETY: `culib()` dlopens the library (once per process, as cudarc's own calls would); the
    // caller has checked that each one loads. `get` only looks the name up: the pointer type is
    // irrelevant because the symbol is never read or called here.
    let (driver, cudnn, cublas, nvrtc) = unsafe {
        (
            cudarc::driver::sys::culib(),
            cudarc::cudnn::sys::culib(),
            cudarc::cublas::sys::culib(),
            cudarc::nvrtc::sys::culib(),
        )
    };
    let missing = collect(include_graph_api, |library, name| {
        let lib = match library {
            LIB_DRIVER => driver,
            LIB_CUDNN => cudnn,
            LIB_CUBLAS => cublas,
            _ => nvrtc,
        };
        // SAFETY: see above.
        unsafe { lib.get::<*const c_void>(name.as_bytes()) }.is_ok()
    });
    if missing.is_empty() {
        Ok(())
    } else {
        Err(missing)
    }
}

/// The symbols `resolves(library, name)` rejects, every list in order (libcuda's either-or
/// groups right after its plain list).
fn collect(
    include_graph_api: bool,
    mut resolves: impl FnMut(&'static str, &'static str) -> bool,
) -> Vec<MissingSymbol> {
    let mut missing = Vec::new();
    let mut need = |library: &'static str, names: &[&'static str], groups: &[EitherOr]| {
        for &symbol in names {
            if !resolves(library, symbol) {
                missing.push(MissingSymbol { library, symbol });
            }
        }
        for group in groups {
            let ok = group
                .options
                .iter()
                .any(|option| option.iter().all(|&name| resolves(library, name)));
            if !ok {
                missing.push(MissingSymbol {
                    library,
                    symbol: group.label,
                });
            }
        }
    };
    need(LIB_DRIVER, DRIVER_SYMBOLS, DRIVER_ALTERNATIVES);
    need(LIB_CUDNN, CUDNN_SYMBOLS, &[]);
    if include_graph_api {
        need(LIB_CUDNN, CUDNN_GRAPH_SYMBOLS, &[]);
    }
    need(LIB_CUBLAS, CUBLAS_SYMBOLS, &[]);
    need(LIB_NVRTC, NVRTC_SYMBOLS, &[]);
    missing
}

/// What to do about a library that lacks symbols.
fn remedy(library: &str) -> Option<String> {
    match library {
        LIB_DRIVER => Some(format!(
            "the NVIDIA driver is too old: one for CUDA {MIN_DRIVER_CUDA} or newer is needed"
        )),
        LIB_CUDNN => Some("cuDNN 9 or newer is needed".into()),
        LIB_CUBLAS => Some("the cuBLAS of CUDA 12 or newer is needed".into()),
        LIB_NVRTC => Some("the NVRTC of CUDA 12 or newer is needed".into()),
        _ => None,
    }
}

/// One message for all missing symbols, grouped per library in order of first appearance, e.g.
/// `the CUDA driver library (libcuda.so) lacks cuEventElapsedTime_v2, cuGraphLaunch (the NVIDIA
/// driver is too old: one for CUDA 12.8 or newer is needed); cuDNN (libcudnn.so) lacks
/// cudnnBackendExecute (cuDNN 9 or newer is needed)`. Empty for an empty slice.
pub(crate) fn describe(missing: &[MissingSymbol]) -> String {
    let mut libraries: Vec<(&str, Vec<&str>)> = Vec::new();
    for m in missing {
        match libraries.iter_mut().find(|(lib, _)| *lib == m.library) {
            Some((_, symbols)) => {
                if !symbols.contains(&m.symbol) {
                    symbols.push(m.symbol);
                }
            }
            None => libraries.push((m.library, vec![m.symbol])),
        }
    }
    libraries
        .iter()
        .map(|(library, symbols)| {
            let mut part = format!("{library} lacks {}", symbols.join(", "));
            if let Some(r) = remedy(library) {
                part.push_str(&format!(" ({r})"));
            }
            part
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// Every list with its library and the prefix its names must carry.
    fn lists() -> Vec<(&'static str, &'static str, Vec<&'static str>)> {
        let alternatives: Vec<&str> = DRIVER_ALTERNATIVES
            .iter()
            .flat_map(|g| g.options.iter().flat_map(|o| o.iter().copied()))
            .collect();
        vec![
            (LIB_DRIVER, "cu", DRIVER_SYMBOLS.to_vec()),
            (LIB_DRIVER, "cu", alternatives),
            (LIB_CUDNN, "cudnn", CUDNN_SYMBOLS.to_vec()),
            (LIB_CUDNN, "cudnnBackend", CUDNN_GRAPH_SYMBOLS.to_vec()),
            (LIB_CUBLAS, "cublas", CUBLAS_SYMBOLS.to_vec()),
            (LIB_NVRTC, "nvrtc", NVRTC_SYMBOLS.to_vec()),
        ]
    }

    fn is_c_identifier(s: &str) -> bool {
        let mut chars = s.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    }

    #[test]
    fn names_are_nonempty_c_identifiers_with_their_library_prefix() {
        for (library, prefix, names) in lists() {
            assert!(!names.is_empty(), "{library}: an empty list");
            for name in names {
                assert!(
                    is_c_identifier(name),
                    "{library}: {name:?} is not a C identifier"
                );
                assert!(
                    name.starts_with(prefix),
                    "{library}: {name} lacks `{prefix}`"
                );
                if prefix == "cu" {
                    assert!(
                        !name.starts_with("cudnn") && !name.starts_with("cublas"),
                        "{name} belongs to another library than libcuda"
                    );
                }
            }
        }
    }

    #[test]
    fn no_name_is_listed_twice() {
        let mut seen = HashSet::new();
        for (library, _, names) in lists() {
            for name in names {
                assert!(seen.insert(name), "{library}: {name} listed twice");
            }
        }
    }

    #[test]
    fn either_or_groups_are_well_formed() {
        for group in DRIVER_ALTERNATIVES {
            assert!(group.options.len() >= 2, "{}: a single option", group.label);
            assert!(group.options.iter().all(|o| !o.is_empty()));
            let expected = group
                .options
                .iter()
                .map(|o| o.join("+"))
                .collect::<Vec<_>>()
                .join(" or ");
            assert_eq!(group.label, format!("either {expected}"));
        }
    }

    #[test]
    fn min_driver_version_follows_the_newest_driver_symbol() {
        assert!(DRIVER_SYMBOLS.contains(&"cuEventElapsedTime_v2"));
        assert!(!DRIVER_SYMBOLS.contains(&"cuEventElapsedTime"));
        assert_eq!(MIN_DRIVER_CUDA, "12.8");
    }

    #[test]
    fn collect_finds_nothing_when_everything_resolves() {
        assert!(collect(true, |_, _| true).is_empty());
    }

    #[test]
    fn collect_reports_every_missing_symbol_in_list_order() {
        let gone = [
            "cudnnConvolutionForward",
            "cuLaunchKernel",
            "cuMemFreeAsync",
            "cuEventElapsedTime_v2",
            "cuMemAlloc_v2",
            "cublasSetWorkspace_v2",
        ];
        let missing = collect(false, |_, name| !gone.contains(&name));
        let m = |library, symbol| MissingSymbol { library, symbol };
        assert_eq!(
            missing,
            [
                m(LIB_DRIVER, "cuEventElapsedTime_v2"),
                m(LIB_DRIVER, "cuLaunchKernel"),
                m(LIB_DRIVER, DRIVER_ALTERNATIVES[0].label),
                m(LIB_CUDNN, "cudnnConvolutionForward"),
                m(LIB_CUBLAS, "cublasSetWorkspace_v2"),
            ]
        );
    }

    #[test]
    fn collect_asks_each_library_for_its_own_symbols() {
        // An either-or group stops at the first option that resolves: a second pass where the
        // preferred allocation pair fails reaches the other one.
        let mut asked = Vec::new();
        for preferred in [true, false] {
            collect(true, |library, name| {
                asked.push((library, name));
                preferred || name != "cuMemAllocAsync"
            });
        }
        for (library, _, names) in lists() {
            for name in names {
                assert!(
                    asked.contains(&(library, name)),
                    "{name} not looked up in {library}"
                );
            }
        }
    }

    #[test]
    fn collect_checks_the_graph_api_only_when_asked() {
        let no_graph = |_: &str, name: &str| !name.starts_with("cudnnBackend");
        assert!(collect(false, no_graph).is_empty());
        let missing = collect(true, no_graph);
        let names: Vec<&str> = missing.iter().map(|m| m.symbol).collect();
        assert_eq!(names, CUDNN_GRAPH_SYMBOLS);
        assert!(missing.iter().all(|m| m.library == LIB_CUDNN));
    }

    #[test]
    fn collect_accepts_either_allocation_pair_and_names_the_group_when_both_fail() {
        let only_sync = |_: &str, name: &str| name != "cuMemAllocAsync";
        assert!(collect(true, only_sync).is_empty());
        let only_async = |_: &str, name: &str| name != "cuMemFree_v2";
        assert!(collect(true, only_async).is_empty());
        let neither = |_: &str, name: &str| name != "cuMemFreeAsync" && name != "cuMemAlloc_v2";
        assert_eq!(
            collect(true, neither),
            [MissingSymbol {
                library: LIB_DRIVER,
                symbol: DRIVER_ALTERNATIVES[0].label
            }]
        );
    }

    #[test]
    fn describe_names_each_symbol_and_the_remedy() {
        let msg = describe(&[
            MissingSymbol {
                library: LIB_DRIVER,
                symbol: "cuEventElapsedTime_v2",
            },
            MissingSymbol {
                library: LIB_DRIVER,
                symbol: "cuGraphInstantiateWithFlags",
            },
        ]);
        assert_eq!(
            msg,
            "the CUDA driver library (libcuda.so) lacks cuEventElapsedTime_v2, \
             cuGraphInstantiateWithFlags (the NVIDIA driver is too old: one for CUDA 12.8 or \
             newer is needed)"
        );
    }

    #[test]
    fn describe_groups_per_library_in_order_of_first_appearance() {
        let m = |library, symbol| MissingSymbol { library, symbol };
        let msg = describe(&[
            m(LIB_CUDNN, "cudnnBackendExecute"),
            m(LIB_NVRTC, "nvrtcGetCUBIN"),
            m(LIB_CUDNN, "cudnnBackendFinalize"),
            m(LIB_DRIVER, DRIVER_ALTERNATIVES[0].label),
            m(LIB_CUBLAS, "cublasSetWorkspace_v2"),
            m(LIB_NVRTC, "nvrtcGetCUBIN"),
        ]);
        assert_eq!(
            msg,
            "cuDNN (libcudnn.so) lacks cudnnBackendExecute, cudnnBackendFinalize (cuDNN 9 or \
             newer is needed); NVRTC (libnvrtc.so) lacks nvrtcGetCUBIN (the NVRTC of CUDA 12 or \
             newer is needed); the CUDA driver library (libcuda.so) lacks either \
             cuMemAllocAsync+cuMemFreeAsync or cuMemAlloc_v2+cuMemFree_v2 (the NVIDIA driver is \
             too old: one for CUDA 12.8 or newer is needed); cuBLAS (libcublas.so) lacks \
             cublasSetWorkspace_v2 (the cuBLAS of CUDA 12 or newer is needed)"
        );
    }

    #[test]
    fn describe_handles_no_symbols_and_unknown_libraries() {
        assert_eq!(describe(&[]), "");
        let msg = describe(&[MissingSymbol {
            library: "libfoo.so",
            symbol: "foo",
        }]);
        assert_eq!(msg, "libfoo.so lacks foo");
    }
}
