//! NVRTC: the embedded `kernels/*.cu` sources assembled into one program and compiled for the
//! device's architecture (CUBIN, or PTX when this NVRTC cannot emit that CUBIN), cached per
//! process and on disk (keyed by the sources, options, include paths and NVRTC version).

use std::collections::HashMap;
use std::ffi::{CStr, CString, OsString};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use cudarc::nvrtc::{result as nvrtc_result, sys as nvrtc_sys};

use super::sources;
use crate::error::{Error, Result};

/// Options for every compile (plus `--gpu-architecture` and the include paths). No fast math:
/// the softmax and the mask normalization keep accurate `expf` and divisions.
const NVRTC_OPTIONS: &[&str] = &["-std=c++17", "-default-device", "-lineinfo"];

/// NVRTC must be loadable before any cudarc::nvrtc call (cudarc panics otherwise).
pub(super) fn ensure_nvrtc() -> Result<()> {
    if unsafe { nvrtc_sys::is_culib_present() } {
        Ok(())
    } else {
        Err(Error::CudaUnavailable(
            "NVRTC (libnvrtc.so) could not be loaded: install the CUDA toolkit's NVRTC or the \
             `nvidia-cuda-nvrtc` wheel and put its lib directory on LD_LIBRARY_PATH"
                .into(),
        ))
    }
}

/// Whether NVRTC can be loaded in this process.
pub fn nvrtc_available() -> bool {
    unsafe { nvrtc_sys::is_culib_present() }
}

/// NVRTC's version, e.g. (13, 0), if it can be loaded.
pub fn nvrtc_version() -> Option<(i32, i32)> {
    if !nvrtc_available() {
        return None;
    }
    let (mut major, mut minor) = (0, 0);
    let r = unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) };
    (r == nvrtc_sys::nvrtcResult::NVRTC_SUCCESS).then_some((major, minor))
}

/// The architectures this NVRTC can compile for (e.g. `[75, 80, 86, ..., 120]`).
fn supported_archs() -> Vec<i32> {
    let mut n = 0;
    if unsafe { nvrtc_sys::nvrtcGetNumSupportedArchs(&mut n) }
        != nvrtc_sys::nvrtcResult::NVRTC_SUCCESS
        || n <= 0
    {
        return Vec::new();
    }
    let mut archs = vec![0i32; n as usize];
    if unsafe { nvrtc_sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) }
        != nvrtc_sys::nvrtcResult::NVRTC_SUCCESS
    {
        return Vec::new();
    }
    archs
}

/// An ELF image (CUBIN) rather than PTX text.
pub fn is_cubin(image: &[u8]) -> bool {
    image.starts_with(b"\x7fELF")
}

/// Compiled images per architecture (`sm_90` → CUBIN, `compute_90` → PTX), for the whole process:
/// a second context on the same kind of device does not recompile.
fn cache() -> &'static Mutex<HashMap<String, Vec<u8>>> {
    static CACHE: OnceLock<Mutex<HashMap<String, Vec<u8>>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Compile every kernel for `arch` (`sm_XY`: a CUBIN, or PTX for `compute_XY` if this NVRTC
/// cannot emit that CUBIN; `compute_XY`: PTX), without a device. Cached per process.
/// Errors: `Error::Invalid` for a malformed arch, `Error::CudaUnavailable` when NVRTC is missing
/// or the compile fails (with NVRTC's log).
pub fn compile_for_arch(arch: &str) -> Result<Vec<u8>> {
    parse_arch(arch)?;
    ensure_nvrtc()?;
    // Hold the lock while compiling: concurrent first users wait instead of compiling twice.
    let mut cache = cache().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(image) = cache.get(arch) {
        return Ok(image.clone());
    }
    let (image, _) = compile_cached(arch, disk_cache_dir().as_deref())?;
    cache.insert(arch.to_owned(), image.clone());
    Ok(image)
}

/// Where compiled kernels are kept between runs: `$SCORECAM_KERNEL_CACHE` (`off`: nowhere), else
/// `$XDG_CACHE_HOME/scorecam-gpu/kernels`, else `~/.cache/scorecam-gpu/kernels`.
pub fn disk_cache_dir() -> Option<PathBuf> {
    user_cache_dir("SCORECAM_KERNEL_CACHE", "kernels")
}

/// A cache directory: `$var` (`off` or empty: none), else `$XDG_CACHE_HOME/scorecam-gpu/<sub>`,
/// else `~/.cache/scorecam-gpu/<sub>`.
pub fn user_cache_dir(var: &str, sub: &str) -> Option<PathBuf> {
    match std::env::var_os(var) {
        Some(v) if v == "off" || v.is_empty() => None,
        Some(v) => Some(PathBuf::from(v)),
        None => std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .map(|c| c.join("scorecam-gpu").join(sub)),
    }
}

/// The file a compiled image lives in under `dir`: named by the arch, the NVRTC version and a
/// hash of everything that shapes the output (the assembled sources, the options, the include
/// directories' paths), so a change of any of them compiles anew.
fn cache_file(dir: &Path, arch: &str) -> Result<PathBuf> {
    let source = assemble_source(sources()).map_err(Error::CudaUnavailable)?;
    let (major, minor) = nvrtc_version().unwrap_or((0, 0));
    let mut key = source.into_bytes();
    for o in NVRTC_OPTIONS {
        key.extend_from_slice(o.as_bytes());
        key.push(0);
    }
    for d in include_dirs() {
        key.extend_from_slice(d.to_string_lossy().as_bytes());
        key.push(0);
    }
    let hash = twox_hash::XxHash64::oneshot(0, &key);
    Ok(dir.join(format!("{arch}-nvrtc{major}.{minor}-{hash:016x}.bin")))
}

/// Compile for `arch`, through the on-disk cache in `dir` when there is one: a cached image is
/// used if it is a CUBIN or PTX; a missing, unreadable or damaged one is compiled and written back
/// (atomically); a cache that cannot be written costs only the compile. Returns the image and
/// whether it came from the disk.
pub fn compile_cached(arch: &str, dir: Option<&Path>) -> Result<(Vec<u8>, bool)> {
    let file = match dir {
        Some(d) => Some(cache_file(d, arch)?),
        None => None,
    };
    if let Some(f) = &file {
        if let Ok(bytes) = std::fs::read(f) {
            let ptx = bytes.starts_with(b"//") || bytes.starts_with(b".version");
            if is_cubin(&bytes) || (ptx && std::str::from_utf8(&bytes).is_ok()) {
                return Ok((bytes, true));
            }
        }
    }
    let image = compile_uncached(arch)?;
    if let Some(f) = &file {
        let written = f
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .map_err(|e| Error::io("kernel cache", e))
            .and_then(|()| crate::image::write_atomic(f, &image));
        if let Err(e) = written {
            static WARNED: OnceLock<()> = OnceLock::new();
            if WARNED.set(()).is_ok() && std::env::var_os("SCORECAM_CUDA_VERBOSE").is_some() {
                eprintln!("notice: compiled kernels are not cached: {e}");
            }
        }
    }
    Ok((image, false))
}

/// One compile for `arch`, no caches.
fn compile_uncached(arch: &str) -> Result<Vec<u8>> {
    let (kind, number) = parse_arch(arch)?;
    Ok(match kind {
        ArchKind::Sm => match compile_program(arch, true)? {
            Some(cubin) => cubin,
            // No CUBIN from this NVRTC for sm_XY: PTX for the same virtual arch.
            None => {
                let virt = format!("compute_{number}");
                compile_program(&virt, false)?.ok_or_else(|| {
                    Error::CudaUnavailable(format!(
                        "NVRTC produced neither CUBIN nor PTX for {arch}"
                    ))
                })?
            }
        },
        ArchKind::Compute => compile_program(arch, false)?
            .ok_or_else(|| Error::CudaUnavailable(format!("NVRTC produced no PTX for {arch}")))?,
    })
}

/// Whether `SCORECAM_WGMMA` (unset: on) lets Hopper's kernels be built for `sm_90a`; `off`
/// (or `0`) builds plain `sm_90`, where the `wgmma` builds are not offered.
fn wgmma_allowed() -> bool {
    wgmma_setting(std::env::var("SCORECAM_WGMMA").ok().as_deref())
}

fn wgmma_setting(v: Option<&str>) -> bool {
    !matches!(v.map(str::trim), Some("off" | "0"))
}

/// The image for a device of compute capability `major.minor`: its own `sm_XY` when this NVRTC
/// knows it (`sm_90a` on Hopper, for its `wgmma` kernels, unless [`wgmma_allowed`] says no or
/// this NVRTC refuses it); else PTX for the newest virtual arch below it that NVRTC knows (the
/// driver JITs PTX forward to newer GPUs). Returns (arch compiled, image).
pub(super) fn image_for_device(major: i32, minor: i32) -> Result<(String, Vec<u8>)> {
    let number = major * 10 + minor;
    let archs = supported_archs();
    if archs.is_empty() || archs.contains(&number) {
        if number == 90 && wgmma_allowed() {
            if let Ok(img) = compile_for_arch("sm_90a") {
                return Ok(("sm_90a".to_string(), img));
            }
        }
        let arch = format!("sm_{number}");
        return compile_for_arch(&arch).map(|img| (arch, img));
    }
    let Some(&best) = archs.iter().filter(|&&a| a < number).max() else {
        return Err(Error::CudaUnavailable(format!(
            "NVRTC {} supports none of the architectures up to sm_{number} (it knows {archs:?})",
            nvrtc_version()
                .map(|(a, b)| format!("{a}.{b}"))
                .unwrap_or_default()
        )));
    };
    let arch = format!("compute_{best}");
    compile_for_arch(&arch).map(|img| (arch, img))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ArchKind {
    Sm,
    Compute,
}

/// `sm_90`, `sm_90a`, `compute_86` → (kind, "90" / "90a" / "86").
fn parse_arch(arch: &str) -> Result<(ArchKind, &str)> {
    let (kind, rest) = if let Some(r) = arch.strip_prefix("sm_") {
        (ArchKind::Sm, r)
    } else if let Some(r) = arch.strip_prefix("compute_") {
        (ArchKind::Compute, r)
    } else {
        return Err(Error::Invalid(format!(
            "arch `{arch}`: expected sm_XY or compute_XY"
        )));
    };
    let digits = rest.trim_end_matches(|c: char| c.is_ascii_lowercase());
    let suffix = &rest[digits.len()..];
    if digits.len() < 2 || !digits.bytes().all(|b| b.is_ascii_digit()) || suffix.len() > 1 {
        return Err(Error::Invalid(format!(
            "arch `{arch}`: expected sm_XY or compute_XY"
        )));
    }
    Ok((kind, rest))
}

/// Destroys the NVRTC program on every path.
struct Program(nvrtc_sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        let _ = unsafe { nvrtc_result::destroy_program(self.0) };
    }
}

/// What ptxas says about every kernel compiled for `arch` (a real architecture, e.g. `sm_90a`):
/// NVRTC's log of a compile with `--ptxas-options=-v` (registers, spills, and ptxas's own
/// performance notes such as wgmma serialized, C7510–C7520), for tests that keep the tensor-core
/// kernels free of them; the engine's compiles leave the log unread.
pub fn ptxas_report(arch: &str) -> Result<String> {
    Ok(compile_program_with(arch, true, &["--ptxas-options=-v"])?.1)
}

/// One NVRTC compile of all kernels for `arch`. `Ok(None)` when `cubin` was asked but NVRTC
/// produced none (e.g. a virtual arch). Returns PTX without its trailing NUL.
fn compile_program(arch: &str, cubin: bool) -> Result<Option<Vec<u8>>> {
    Ok(compile_program_with(arch, cubin, &[])?.0)
}

/// [`compile_program`] with `extra` options, and NVRTC's log of the compile.
fn compile_program_with(
    arch: &str,
    cubin: bool,
    extra: &[&str],
) -> Result<(Option<Vec<u8>>, String)> {
    let source = assemble_source(sources()).map_err(Error::CudaUnavailable)?;
    let src = CString::new(source)
        .map_err(|_| Error::CudaUnavailable("kernel sources contain a NUL byte".into()))?;
    let prog = Program(
        nvrtc_result::create_program(&src, Some(c"scorecam_kernels.cu"))
            .map_err(|e| Error::CudaUnavailable(format!("nvrtcCreateProgram: {e}")))?,
    );
    let mut options: Vec<String> = NVRTC_OPTIONS.iter().map(|s| s.to_string()).collect();
    options.push(format!("--gpu-architecture={arch}"));
    for dir in include_dirs() {
        options.push(format!("--include-path={}", dir.display()));
    }
    options.extend(extra.iter().map(|o| o.to_string()));
    if let Err(e) = unsafe { nvrtc_result::compile_program(prog.0, &options) } {
        let log = program_log(&prog);
        return Err(Error::CudaUnavailable(format!(
            "NVRTC {} could not compile the kernels for {arch} ({e}); options {options:?}:\n{log}",
            nvrtc_version()
                .map(|(a, b)| format!("{a}.{b}"))
                .unwrap_or_default()
        )));
    }
    let log = program_log(&prog);
    if cubin {
        let mut size = 0usize;
        let r = unsafe { nvrtc_sys::nvrtcGetCUBINSize(prog.0, &mut size) };
        if r != nvrtc_sys::nvrtcResult::NVRTC_SUCCESS || size == 0 {
            return Ok((None, log));
        }
        let mut buf = vec![0u8; size];
        let r = unsafe { nvrtc_sys::nvrtcGetCUBIN(prog.0, buf.as_mut_ptr().cast()) };
        if r != nvrtc_sys::nvrtcResult::NVRTC_SUCCESS {
            return Ok((None, log));
        }
        return Ok((Some(buf), log));
    }
    let ptx = unsafe { nvrtc_result::get_ptx(prog.0) }
        .map_err(|e| Error::CudaUnavailable(format!("nvrtcGetPTX for {arch}: {e}")))?;
    let mut bytes: Vec<u8> = ptx.into_iter().map(|c| c as u8).collect();
    while bytes.last() == Some(&0) {
        bytes.pop();
    }
    Ok(((!bytes.is_empty()).then_some(bytes), log))
}

fn program_log(prog: &Program) -> String {
    match unsafe { nvrtc_result::get_program_log(prog.0) } {
        Ok(raw) => {
            let bytes: Vec<u8> = raw.into_iter().map(|c| c as u8).collect();
            match CStr::from_bytes_until_nul(&bytes) {
                Ok(s) => s.to_string_lossy().into_owned(),
                Err(_) => String::from_utf8_lossy(&bytes).into_owned(),
            }
        }
        Err(e) => format!("(no log: {e})"),
    }
}

// ---------------------------------------------------------------------------------------------
// Host-side helpers: source assembly and include-path discovery (unit-tested below).

/// One translation unit from the embedded files: every `.cu` in order, each `#include "X"` of an
/// embedded file replaced by that file's text the first time (include-once) and by nothing after,
/// with `#line` directives so NVRTC's messages name the original file and line. Angle-bracket
/// includes are left to NVRTC. An `#include "X"` of a file that is not embedded is an error.
pub fn assemble_source(files: &[(&str, &str)]) -> std::result::Result<String, String> {
    fn emit<'a>(
        name: &'a str,
        text: &'a str,
        files: &[(&'a str, &'a str)],
        done: &mut Vec<&'a str>,
        out: &mut String,
    ) -> std::result::Result<(), String> {
        // Marked done before its body: a file including itself (directly or not) is skipped.
        done.push(name);
        out.push_str(&format!("#line 1 \"{name}\"\n"));
        for (i, line) in text.lines().enumerate() {
            if let Some(inc) = quoted_include(line) {
                let Some(&(inc_name, inc_text)) = files.iter().find(|(n, _)| *n == inc) else {
                    return Err(format!(
                        "kernels/{name}:{}: #include \"{inc}\" is not an embedded kernels/ file",
                        i + 1
                    ));
                };
                if !done.contains(&inc_name) {
                    emit(inc_name, inc_text, files, done, out)?;
                }
                out.push_str(&format!("#line {} \"{name}\"\n", i + 2));
                continue;
            }
            out.push_str(line);
            out.push('\n');
        }
        Ok(())
    }

    let mut out = String::new();
    let mut done = Vec::new();
    let mut units = 0;
    for &(name, text) in files {
        if !name.ends_with(".cu") {
            continue;
        }
        units += 1;
        emit(name, text, files, &mut done, &mut out)?;
    }
    if units == 0 {
        return Err("no .cu kernel sources embedded".into());
    }
    Ok(out)
}

/// `#include "name"` (spaces allowed around `#` and `include`) → `name`.
fn quoted_include(line: &str) -> Option<&str> {
    let rest = line.trim_start().strip_prefix('#')?.trim_start();
    let rest = rest.strip_prefix("include")?.trim_start();
    let rest = rest.strip_prefix('"')?;
    let end = rest.find('"')?;
    Some(&rest[..end])
}

/// Include directories passed to NVRTC, in order, those that exist.
fn include_dirs() -> Vec<PathBuf> {
    include_dirs_from(&|k| std::env::var_os(k), &|p| p.exists())
}

/// Candidates, in order: `$SCORECAM_CUDA_INCLUDE` (a path list), `$CUDA_HOME/include`,
/// `$CUDA_PATH/include`, `/usr/local/cuda/include`, then for each `LD_LIBRARY_PATH` entry: the
/// pip-wheel layout `.../nvidia/cuXX/lib` → `.../nvidia/cuXX/include`, and any other `.../lib`
/// or `.../lib64` whose sibling `include` holds `cuda_fp16.h` (a toolkit next to its libnvrtc).
/// Only existing directories are kept, each once.
fn include_dirs_from(
    env: &dyn Fn(&str) -> Option<OsString>,
    exists: &dyn Fn(&Path) -> bool,
) -> Vec<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(v) = env("SCORECAM_CUDA_INCLUDE") {
        candidates.extend(std::env::split_paths(&v).filter(|p| !p.as_os_str().is_empty()));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(v) = env(var).filter(|v| !v.is_empty()) {
            candidates.push(PathBuf::from(v).join("include"));
        }
    }
    candidates.push(PathBuf::from("/usr/local/cuda/include"));
    if let Some(v) = env("LD_LIBRARY_PATH") {
        for lib in std::env::split_paths(&v) {
            let last = lib.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if last != "lib" && last != "lib64" {
                continue;
            }
            let Some(parent) = lib.parent() else { continue };
            let include = parent.join("include");
            let is_wheel = parent
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("cu"))
                && parent
                    .parent()
                    .and_then(|p| p.file_name())
                    .is_some_and(|n| n == "nvidia");
            if is_wheel || exists(&include.join("cuda_fp16.h")) {
                candidates.push(include);
            }
        }
    }
    let mut out: Vec<PathBuf> = Vec::new();
    for c in candidates {
        if !out.contains(&c) && exists(&c) {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::kernels::kernel_names;

    #[test]
    fn assembles_every_unit_with_common_inlined_once() {
        let src = assemble_source(sources()).unwrap();
        let units: Vec<&str> = sources()
            .iter()
            .map(|(n, _)| *n)
            .filter(|n| n.ends_with(".cu"))
            .collect();
        assert!(units.len() >= 6, "{units:?}");
        for unit in &units {
            assert!(
                src.contains(&format!("#line 1 \"{unit}\"\n")),
                "{unit} missing"
            );
        }
        assert_eq!(src.matches("#line 1 \"common.cuh\"").count(), 1);
        assert_eq!(src.matches("#define SCORECAM_COMMON_CUH").count(), 1);
        assert!(
            !src.lines().any(|l| quoted_include(l).is_some()),
            "unresolved #include"
        );
        // common.cuh comes before its first user.
        let common = src.find("#line 1 \"common.cuh\"").unwrap();
        let first_unit = units
            .iter()
            .map(|u| src.find(&format!("#line 1 \"{u}\"")).unwrap());
        assert!(first_unit.clone().min().unwrap() < common);
        assert!(src.find("SCORECAM_COMMON_CUH").unwrap() > common);
    }

    #[test]
    fn assembly_keeps_line_numbers_and_rejects_unknown_includes() {
        let files = [
            ("a.cuh", "int a;\n"),
            ("x.cu", "// one\n#include \"a.cuh\"\nint x;\n"),
            (
                "y.cu",
                "  #  include \"a.cuh\"\nint y;\n#include <cuda_fp16.h>\n",
            ),
        ];
        let src = assemble_source(&files).unwrap();
        assert_eq!(
            src,
            "#line 1 \"x.cu\"\n// one\n#line 1 \"a.cuh\"\nint a;\n#line 3 \"x.cu\"\nint x;\n\
             #line 1 \"y.cu\"\n#line 2 \"y.cu\"\nint y;\n#include <cuda_fp16.h>\n"
        );
        let err = assemble_source(&[("z.cu", "#include \"nope.cuh\"\n")]).unwrap_err();
        assert!(err.contains("z.cu:1") && err.contains("nope.cuh"), "{err}");
        // Include-once: a self-including header is inlined once, without looping.
        let src = assemble_source(&[
            ("r.cuh", "#include \"r.cuh\"\nint r;\n"),
            ("z.cu", "#include \"r.cuh\"\n"),
        ])
        .unwrap();
        assert_eq!(src.matches("int r;").count(), 1);
        assert!(assemble_source(&[("a.cuh", "")]).is_err());
    }

    #[test]
    fn kernel_names_match_the_sources() {
        // Every `extern "C" __global__ void [__launch_bounds__(..)] NAME(` in the sources.
        const DECL: &str = "extern \"C\" __global__ void";
        let mut found = Vec::new();
        for (_, text) in sources() {
            let mut rest = *text;
            while let Some(i) = rest.find(DECL) {
                rest = rest[i + DECL.len()..].trim_start();
                if let Some(r) = rest.strip_prefix("__launch_bounds__") {
                    rest = r[r.find(')').unwrap() + 1..].trim_start();
                }
                let end = rest.find('(').unwrap();
                found.push(rest[..end].trim().to_string());
            }
        }
        let mut expected: Vec<String> = kernel_names().iter().map(|s| s.to_string()).collect();
        found.sort();
        expected.sort();
        assert_eq!(found, expected);
    }

    #[test]
    fn wgmma_is_on_unless_turned_off() {
        for (v, on) in [
            (None, true),
            (Some("on"), true),
            (Some(""), true),
            (Some("off"), false),
            (Some(" off "), false),
            (Some("0"), false),
        ] {
            assert_eq!(wgmma_setting(v), on, "{v:?}");
        }
    }

    #[test]
    fn include_dirs_order_filter_and_dedup() {
        let env = |k: &str| -> Option<OsString> {
            match k {
                "SCORECAM_CUDA_INCLUDE" => Some("/x/inc:/missing:".into()),
                "CUDA_HOME" => Some("/opt/cuda".into()),
                "CUDA_PATH" => Some("/opt/cuda".into()),
                "LD_LIBRARY_PATH" => Some(
                    "/venv/site-packages/nvidia/cu13/lib:/usr/lib:/tk/lib64:/y/nvidia/cu13/lib:/z/lib"
                        .into(),
                ),
                _ => None,
            }
        };
        let existing = [
            "/x/inc",
            "/opt/cuda/include",
            "/usr/local/cuda/include",
            "/venv/site-packages/nvidia/cu13/include",
            "/usr/include",
            "/tk/include",
            "/tk/include/cuda_fp16.h",
            "/z/include",
        ];
        let exists = |p: &Path| existing.iter().any(|e| Path::new(e) == p);
        let dirs = include_dirs_from(&env, &exists);
        let dirs: Vec<&str> = dirs.iter().map(|p| p.to_str().unwrap()).collect();
        assert_eq!(
            dirs,
            [
                "/x/inc",
                "/opt/cuda/include",
                "/usr/local/cuda/include",
                "/venv/site-packages/nvidia/cu13/include",
                "/tk/include",
            ]
        );
        // Nothing set, nothing on disk: no include paths (the kernels need none).
        assert!(include_dirs_from(&|_| None, &|_| false).is_empty());
    }

    #[test]
    fn arch_parsing() {
        assert_eq!(parse_arch("sm_90").unwrap(), (ArchKind::Sm, "90"));
        assert_eq!(parse_arch("sm_90a").unwrap(), (ArchKind::Sm, "90a"));
        assert_eq!(parse_arch("compute_86").unwrap(), (ArchKind::Compute, "86"));
        assert_eq!(parse_arch("sm_120").unwrap(), (ArchKind::Sm, "120"));
        for bad in [
            "90", "sm_", "sm_9", "sm_x0", "gfx90a", "sm_90ab", "compute_",
        ] {
            assert!(matches!(parse_arch(bad), Err(Error::Invalid(_))), "{bad}");
        }
    }

    #[test]
    fn cubin_detection() {
        assert!(is_cubin(b"\x7fELF\x02\x01"));
        assert!(!is_cubin(
            b"//\n// Generated by NVIDIA NVVM Compiler\n.version 9.0"
        ));
    }
}
