//! Runs the CUDA kernels of `kernels/*.cu` on the CPU, so every kernel is tested against its
//! CPU reference on machines without a GPU (CI has none).
//!
//! The embedded kernel sources, assembled as for NVRTC, are compiled by the host C++ compiler
//! after `cuda_host.hpp` (fibers for the threads of a block, barriers and warp shuffles that
//! detect deadlocks; see its header) into a shared library, loaded once per test process.
//! Buffers carry 256 guard bytes on both sides, checked after every launch, and inputs passed as
//! read-only are checked unchanged: a kernel writing just outside a buffer (or outside its
//! dynamic shared memory) or into its input fails the launch that did it; of the reads outside,
//! only `cp.async`'s are seen (its source must lie in a buffer argument). Every launch runs in order and then in random schedules of blocks and warps, and must
//! give the same bytes each time: a value read across a missing barrier fails it (races with no
//! barrier at all cannot show, see cuda_host.hpp).
#![allow(dead_code)] // each test crate uses its own subset

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use bytemuck::Pod;
use scorecam_gpu::backend::cuda::kernels::{
    assemble_source, conv_smem_kernels, kernel_names, sources, KernelArg, KernelLaunch,
    SMEM_OPT_IN, SMEM_OPT_IN_KERNELS,
};
use scorecam_gpu::Error;

/// The emulation header, pasted at the top of the generated unit.
const HEADER: &str = include_str!("cuda_host.hpp");
/// Kernels that test the emulation itself (barriers, shuffles, the guards).
const SELFTEST: &str = include_str!("selftest.cu");

/// Flags of the host compile: no strict aliasing (the kernels read FP16 rows as uint4), no
/// floating-point contraction (results do not depend on the compiler's FMA choices).
const CXX_FLAGS: &[&str] = &[
    "-std=c++20",
    "-O2",
    "-fno-strict-aliasing",
    "-ffp-contract=off",
    "-fvisibility=hidden",
    "-fPIC",
    "-shared",
    "-w",
];

// Arguments are passed in 8-byte slots with 4-byte values in their first bytes.
const _: () = assert!(
    cfg!(target_endian = "little"),
    "the kernel host assumes little-endian"
);

type LaunchFn = unsafe extern "C" fn(
    *const c_char,
    *const u32,
    *const u32,
    u64,
    *mut *mut c_void,
    *const u64,
    *const c_char,
    u64,
    *mut c_char,
    u64,
) -> c_int;

/// The kernels compiled for the CPU.
pub struct KernelHost {
    _lib: libloading::Library,
    launch: LaunchFn,
    /// Threads per block each kernel's `__launch_bounds__` allow (a launch beyond them fails on
    /// a GPU, so it fails here).
    bounds: HashMap<String, u32>,
}

/// The process's kernel host, built on first use (a build failure panics with the compiler's
/// output: the kernels or the emulation do not compile).
pub fn host() -> &'static KernelHost {
    static HOST: OnceLock<KernelHost> = OnceLock::new();
    HOST.get_or_init(|| KernelHost::build().unwrap_or_else(|e| panic!("{e}")))
}

/// Shared memory declarations for the emulation: `extern __shared__ T name[];` → a pointer to
/// the block's dynamic shared memory; `__shared__ T name[N];` → `SCORECAM_SHARED_ARRAY(T, name,
/// N);` (a thread_local array registered for poisoning before every block).
fn rewrite_shared(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    for line in src.lines() {
        let t = line.trim();
        let dynamic = t
            .strip_prefix("extern __shared__ ")
            .and_then(|r| r.strip_suffix("[];"))
            .and_then(|r| r.rsplit_once(' '));
        let array = t
            .strip_prefix("__shared__ ")
            .and_then(|r| r.strip_suffix("];"))
            .and_then(|r| r.split_once('['))
            .and_then(|(decl, n)| Some((decl.rsplit_once(' ')?, n)));
        match (dynamic, array) {
            (Some((ty, name)), _) => out.push_str(&format!(
                "{ty}* {name} = reinterpret_cast<{ty}*>(scorecam_dynamic_shared());\n"
            )),
            (None, Some(((ty, name), n))) => {
                out.push_str(&format!("SCORECAM_SHARED_ARRAY({ty}, {name}, {n});\n"))
            }
            (None, None) => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// The `__global__` functions of a source: (name, the threads per block its
/// `__launch_bounds__` allow, if it declares them).
pub fn global_functions(src: &str) -> Vec<(String, Option<u32>)> {
    let mut found = Vec::new();
    let mut rest = src;
    while let Some(i) = rest.find("__global__ void") {
        rest = &rest[i + "__global__ void".len()..];
        let mut t = rest.trim_start();
        let mut bound = None;
        if let Some(r) = t.strip_prefix("__launch_bounds__(") {
            let close = r.find(')').unwrap_or(r.len());
            bound = r[..close]
                .split(',')
                .next()
                .and_then(|v| v.trim().parse().ok());
            t = r[(close + 1).min(r.len())..].trim_start();
        }
        let end = t
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(t.len());
        found.push((t[..end].to_string(), bound));
    }
    found
}

/// The generated translation unit: header, `kernels` (the assembled kernel sources), the
/// self-test kernels, the table of `kernels`' kernels and `selftest`'s.
fn unit_source(kernels: &str, selftest: &[(String, Option<u32>)]) -> String {
    let mut unit = String::new();
    unit.push_str(HEADER);
    unit.push_str(&rewrite_shared(kernels));
    unit.push_str("#line 1 \"tests/kernel_host/selftest.cu\"\n");
    unit.push_str(&rewrite_shared(SELFTEST));
    unit.push_str("\nconst scorecam_host::Kernel scorecam_host_kernels[] = {\n");
    for name in kernel_names()
        .iter()
        .copied()
        .chain(selftest.iter().map(|(name, _)| name.as_str()))
    {
        unit.push_str(&format!("    SCORECAM_HOST_KERNEL({name}),\n"));
    }
    unit.push_str("    {},\n};\n");
    unit
}

impl KernelHost {
    fn build() -> Result<KernelHost, String> {
        let cxx = crate::common::cxx_compiler()
            .ok_or("no C++ compiler (c++, g++ or clang++; or set $CXX)")?;
        let kernels = assemble_source(sources())?;
        let selftest = global_functions(SELFTEST);
        let unit = unit_source(&kernels, &selftest);
        let key = twox_hash::XxHash64::oneshot(
            0,
            format!("{cxx}\n{}\n{unit}", CXX_FLAGS.join(" ")).as_bytes(),
        );
        let dir = build_dir();
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let lib_path = dir.join(format!("kernels-{key:016x}.so"));
        if !lib_path.exists() {
            compile(&cxx, &unit, &dir, &lib_path)?;
        }
        remove_stale(&dir, &lib_path);
        // SAFETY: the library is the unit built above; loading runs no initializers beyond
        // the C++ runtime's.
        let lib = unsafe { libloading::Library::new(&lib_path) }
            .map_err(|e| format!("loading {}: {e}", lib_path.display()))?;
        // SAFETY: the symbol is `scorecam_host_launch` of cuda_host.hpp, of type LaunchFn.
        let launch = unsafe { lib.get::<LaunchFn>(b"scorecam_host_launch\0") }
            .map(|f| *f)
            .map_err(|e| format!("{}: {e}", lib_path.display()))?;
        let bounds = global_functions(&kernels)
            .into_iter()
            .chain(selftest)
            .filter_map(|(name, bound)| Some((name, bound?)))
            .collect();
        Ok(KernelHost {
            _lib: lib,
            launch,
            bounds,
        })
    }

    /// Runs kernel `name` over `grid` × `block` threads (x, y, z) with `dynamic_shared` bytes;
    /// `args` in the kernel's parameter order.
    ///
    /// The kernel runs several times from the same inputs: blocks and threads in order, then
    /// [`RANDOM_SCHEDULES`] times with blocks in a random order and warps in a random priority
    /// (the first that can run always runs next, so fast warps get ahead of slow ones by as many
    /// barriers as the kernel allows). All must write the same bytes, as they would in any order
    /// a GPU picks.
    ///
    /// Errors: an unknown kernel, argument kinds that differ from the kernel's parameters, more
    /// threads per block than its `__launch_bounds__` allow, more dynamic shared memory than the
    /// GPU gives it (48 KiB; [`SMEM_OPT_IN`] or [`conv_smem_kernels`]' size for the kernels that
    /// opt in),
    /// a deadlock or a failed barrier in the kernel, a write outside a buffer or into an
    /// [`Arg::In`] buffer, results that depend on the order (a missing barrier, a race).
    pub fn launch(
        &self,
        name: &str,
        grid: [u32; 3],
        block: [u32; 3],
        dynamic_shared: usize,
        args: &mut [Arg<'_>],
    ) -> Result<(), String> {
        let limit = if SMEM_OPT_IN_KERNELS.contains(&name) {
            SMEM_OPT_IN
        } else if let Some((_, smem)) = conv_smem_kernels().find(|&(k, _)| k == name) {
            smem
        } else {
            48 * 1024
        };
        if dynamic_shared > limit {
            return Err(format!(
                "{name}: {dynamic_shared} bytes of dynamic shared memory, the kernel may use \
                 {limit} (static shared memory comes on top)"
            ));
        }
        let threads = block.iter().product::<u32>();
        if let Some(&bound) = self.bounds.get(name).filter(|&&b| threads > b) {
            return Err(format!(
                "{name}: {threads} threads per block, its __launch_bounds__ allow {bound}"
            ));
        }
        // The bytes of every written buffer, in argument order.
        let outputs = |args: &[Arg<'_>]| -> Vec<Vec<u8>> {
            args.iter()
                .filter_map(|a| match a {
                    Arg::Out(b) => Some(b.bytes().to_vec()),
                    _ => None,
                })
                .collect()
        };
        let outputs_before = outputs(args);
        self.launch_once(name, grid, block, dynamic_shared, args, 0)?;
        let in_order = outputs(args);
        for run in 1..=RANDOM_SCHEDULES {
            let mut before = outputs_before.iter();
            for a in args.iter_mut() {
                if let Arg::Out(b) = a {
                    b.bytes_mut().copy_from_slice(before.next().unwrap());
                }
            }
            // Every second schedule performs wgmma at their waits though copies land early
            // (cuda_host.hpp's LATE_WGMMA bit).
            let late = if run % 2 == 0 { 2 } else { 0 };
            let seed = (twox_hash::XxHash64::oneshot(run, name.as_bytes()) & !2) | 1 | late;
            self.launch_once(name, grid, block, dynamic_shared, args, seed)?;
            let mut want = in_order.iter();
            for (i, a) in args.iter().enumerate() {
                if let Arg::Out(b) = a {
                    let first = want.next().unwrap();
                    if let Some(at) = b.bytes().iter().zip(first).position(|(x, y)| x != y) {
                        return Err(format!(
                            "{name}: argument {i} differs at byte {at} between the run in order \
                             and random schedule {run} (seed {seed:#x}): a missing barrier or a \
                             race"
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    fn launch_once(
        &self,
        name: &str,
        grid: [u32; 3],
        block: [u32; 3],
        dynamic_shared: usize,
        args: &mut [Arg<'_>],
        schedule: u64,
    ) -> Result<(), String> {
        let mut slots: Vec<u64> = Vec::with_capacity(args.len());
        // The bytes of each buffer argument (0 for the others): what cp.async may read.
        let mut arg_bytes: Vec<u64> = Vec::with_capacity(args.len());
        let mut kinds = String::new();
        let mut inputs = Vec::new();
        for (i, a) in args.iter_mut().enumerate() {
            let (kind, bits) = match a {
                Arg::In(b) => {
                    inputs.push((i, b.bytes().to_vec()));
                    ('p', b.ptr() as u64)
                }
                Arg::Out(b) => ('p', b.ptr() as u64),
                Arg::I32(v) => ('i', *v as u32 as u64),
                Arg::U32(v) => ('I', *v as u64),
                Arg::I64(v) => ('l', *v as u64),
                Arg::U64(v) => ('u', *v),
                Arg::F32(v) => ('f', v.to_bits() as u64),
            };
            arg_bytes.push(match a {
                Arg::In(b) => b.bytes().len() as u64,
                Arg::Out(b) => b.bytes().len() as u64,
                _ => 0,
            });
            kinds.push(kind);
            slots.push(bits);
        }
        // Each argument pointer points at its 8-byte slot; 4-byte kinds sit in the low bytes,
        // which come first on this (little-endian) host.
        let mut ptrs: Vec<*mut c_void> = slots
            .iter_mut()
            .map(|s| s as *mut u64 as *mut c_void)
            .collect();
        let c_name = CString::new(name).map_err(|e| e.to_string())?;
        let c_kinds = CString::new(kinds).map_err(|e| e.to_string())?;
        let mut err = vec![0u8; 4096];
        // SAFETY: the pointers are valid for the call; the host checks the argument kinds
        // against the kernel's parameters before it runs it, and the buffers' guard bytes are
        // checked after it.
        let rc = unsafe {
            (self.launch)(
                c_name.as_ptr(),
                grid.as_ptr(),
                block.as_ptr(),
                dynamic_shared as u64,
                ptrs.as_mut_ptr(),
                arg_bytes.as_ptr(),
                c_kinds.as_ptr(),
                schedule,
                err.as_mut_ptr() as *mut c_char,
                err.len() as u64,
            )
        };
        if rc != 0 {
            let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
            return Err(String::from_utf8_lossy(&err[..end]).into_owned());
        }
        for (i, a) in args.iter().enumerate() {
            let buf = match a {
                Arg::In(b) => &**b,
                Arg::Out(b) => &**b,
                _ => continue,
            };
            buf.check_guards()
                .map_err(|e| format!("{name}: argument {i}: {e}"))?;
        }
        for (i, before) in inputs {
            if let Arg::In(b) = &args[i] {
                if b.bytes() != before.as_slice() {
                    return Err(format!(
                        "{name}: wrote into argument {i}, a read-only input"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Runs `launch`, a launcher's own launch (its kernel, shape and arguments), with
    /// `buffers[i]` as the launcher's buffer `i`: `Arg::Out` where the kernel writes it,
    /// `Arg::In` or `Arg::Out` where it reads it. Errors as [`Self::launch`], and a buffer the
    /// launch writes passed as `Arg::In`, missing, used twice or not used.
    pub fn run(&self, launch: &KernelLaunch, buffers: Vec<Arg<'_>>) -> Result<(), String> {
        let name = launch.kernel;
        let mut slots: Vec<Option<Arg<'_>>> = buffers.into_iter().map(Some).collect();
        let mut take = |i: usize| {
            slots
                .get_mut(i)
                .and_then(Option::take)
                .ok_or_else(|| format!("{name}: buffer {i} is missing or used twice"))
        };
        let mut args = Vec::with_capacity(launch.args.len());
        for a in &launch.args {
            args.push(match *a {
                KernelArg::Read(i) => match take(i)? {
                    Arg::Out(b) => Arg::In(b),
                    other => other,
                },
                KernelArg::Write(i) => match take(i)? {
                    Arg::In(_) => {
                        return Err(format!("{name}: buffer {i} is written, passed as In"))
                    }
                    other => other,
                },
                KernelArg::I32(v) => Arg::I32(v),
                KernelArg::I64(v) => Arg::I64(v),
                KernelArg::U64(v) => Arg::U64(v),
                KernelArg::F32(v) => Arg::F32(v),
            });
        }
        if let Some(i) = slots.iter().position(Option::is_some) {
            return Err(format!(
                "{name}: buffer {i} is not an argument of the launch"
            ));
        }
        let (grid, block) = ([launch.grid, 1, 1], [launch.block, 1, 1]);
        self.launch(
            name,
            grid,
            block,
            launch.shared_mem_bytes as usize,
            &mut args,
        )
    }

    /// [`Self::launch`] on a 1-D grid and block.
    pub fn launch1(
        &self,
        name: &str,
        grid: u32,
        block: u32,
        dynamic_shared: usize,
        args: &mut [Arg<'_>],
    ) -> Result<(), String> {
        self.launch(name, [grid, 1, 1], [block, 1, 1], dynamic_shared, args)
    }
}

/// Runs `launch` with `inputs` as its first buffers (read-only) and `out` as its last; returns
/// `out`'s data.
pub fn run_into<O: Pod>(
    launch: Result<KernelLaunch, Error>,
    inputs: &[&HostBuf],
    mut out: HostBuf,
) -> Vec<O> {
    let launch = launch.unwrap();
    let mut buffers: Vec<Arg<'_>> = inputs.iter().map(|b| Arg::In(b)).collect();
    buffers.push(Arg::Out(&mut out));
    host()
        .run(&launch, buffers)
        .unwrap_or_else(|e| panic!("{e}"));
    out.read()
}

/// A kernel argument.
pub enum Arg<'a> {
    /// A buffer the kernel only reads (checked unchanged after the launch).
    In(&'a HostBuf),
    /// A buffer the kernel writes.
    Out(&'a mut HostBuf),
    I32(i32),
    U32(u32),
    I64(i64),
    U64(u64),
    F32(f32),
}

/// Random schedules each launch runs in after the one in order.
pub const RANDOM_SCHEDULES: u64 = 2;

/// Guard bytes on each side of a buffer's data.
const GUARD: usize = 256;
const CANARY: u8 = 0xA5;

/// A buffer for a kernel: its data 256-byte aligned (plus `misalign` bytes, to exercise the
/// kernels' unaligned paths) between guard bytes.
pub struct HostBuf {
    /// The allocation, only reached through `base` once made.
    _mem: Vec<u128>,
    /// Its first byte: every pointer handed to a kernel (and every read here) derives from it,
    /// so writes anywhere in the allocation — the guards included — stay within its bounds.
    base: *mut u8,
    total: usize,
    start: usize,
    len: usize,
}

impl HostBuf {
    /// A copy of `data`, `misalign` bytes past a 256-byte boundary.
    pub fn misaligned<T: Pod>(data: &[T], misalign: usize) -> HostBuf {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let mut mem = vec![0u128; (GUARD + misalign + bytes.len() + GUARD).div_ceil(16) + 16];
        let total = mem.len() * 16;
        let base = mem.as_mut_ptr() as *mut u8;
        let start = (base as usize).next_multiple_of(256) - base as usize + GUARD + misalign;
        // SAFETY: start + len + GUARD ≤ total (the 256 bytes of slack cover the alignment).
        unsafe {
            std::ptr::write_bytes(base, CANARY, total);
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), base.add(start), bytes.len());
        }
        HostBuf {
            _mem: mem,
            base,
            total,
            start,
            len: bytes.len(),
        }
    }

    /// A copy of `data`, aligned.
    pub fn of<T: Pod>(data: &[T]) -> HostBuf {
        HostBuf::misaligned(data, 0)
    }

    /// `n` zero elements of `T`, aligned.
    pub fn zeroed<T: Pod>(n: usize) -> HostBuf {
        HostBuf::of(&vec![T::zeroed(); n])
    }

    /// The data as `T`s.
    pub fn read<T: Pod>(&self) -> Vec<T> {
        bytemuck::pod_collect_to_vec(self.bytes())
    }

    /// The whole allocation, guards included.
    fn all(&self) -> &[u8] {
        // SAFETY: `base` points at `total` initialized bytes owned by `_mem`; no kernel runs
        // while this borrow lives (launches take the buffers by reference for their duration).
        unsafe { std::slice::from_raw_parts(self.base, self.total) }
    }

    fn bytes(&self) -> &[u8] {
        &self.all()[self.start..self.start + self.len]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `all`, and `&mut self` makes this the only borrow.
        unsafe { std::slice::from_raw_parts_mut(self.base.add(self.start), self.len) }
    }

    /// The data's first byte, for a kernel.
    fn ptr(&self) -> *mut u8 {
        // SAFETY: start < total.
        unsafe { self.base.add(self.start) }
    }

    fn check_guards(&self) -> Result<(), String> {
        let all = self.all();
        let before = &all[self.start - GUARD..self.start];
        let after = &all[self.start + self.len..self.start + self.len + GUARD];
        if let Some(i) = before.iter().rposition(|&b| b != CANARY) {
            return Err(format!(
                "written {} bytes before the start of a {}-byte buffer",
                GUARD - i,
                self.len
            ));
        }
        if let Some(i) = after.iter().position(|&b| b != CANARY) {
            return Err(format!(
                "written at byte {} past the end of a {}-byte buffer",
                i, self.len
            ));
        }
        Ok(())
    }
}

/// Builds of older sources (another key) untouched for an hour: each edit of a kernel leaves
/// one behind. Younger ones may be in use by another test process.
fn remove_stale(dir: &Path, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let hour = std::time::Duration::from_secs(3600);
    for e in entries.flatten() {
        let path = e.path();
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > hour);
        let ours = path.file_stem() == keep.file_stem();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        if old && !ours && name.is_some_and(|n| n.starts_with("kernels-")) {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Where the generated unit and library are kept (for a look at a failing build).
pub fn build_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("kernel_host")
}

fn compile(cxx: &str, unit: &str, dir: &Path, lib_path: &Path) -> Result<(), String> {
    // Private names, the library renamed into place: concurrent test processes never compile
    // or load a half-written file.
    let private = format!(
        "{}.{}",
        lib_path.file_stem().unwrap().to_string_lossy(),
        std::process::id()
    );
    let cpp = dir.join(format!("{private}.cpp"));
    std::fs::write(&cpp, unit).map_err(|e| format!("{}: {e}", cpp.display()))?;
    let tmp = dir.join(format!("{private}.so.tmp"));
    let out = Command::new(cxx)
        .args(CXX_FLAGS)
        .arg("-o")
        .arg(&tmp)
        .arg(&cpp)
        .output()
        .map_err(|e| format!("running {cxx}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cxx} could not compile the kernels for the CPU ({}):\n{}",
            cpp.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    std::fs::rename(&tmp, lib_path).map_err(|e| format!("{}: {e}", lib_path.display()))?;
    // Kept for a look at what was compiled.
    let _ = std::fs::rename(&cpp, lib_path.with_extension("cpp"));
    Ok(())
}
