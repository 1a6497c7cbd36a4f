//! Every hand-written kernel compiles with NVRTC, with no GPU: CUBIN for sm_75, sm_80, sm_90 and
//! sm_90a (the kernel names must be global functions in the ELF symbol table) and PTX for
//! compute_80 (the fallback path; `.entry` names).
//!
//! Without a loadable NVRTC these tests are reported as ignored, unless `SCORECAM_REQUIRE_NVRTC`
//! is truthy, which makes them fail (CI: `eval "$(bash .ci/install-nvrtc.sh)"` first).

mod common;

use scorecam_gpu::backend::cuda::kernels::{
    compile_cached, compile_for_arch, is_cubin, kernel_names, nvrtc_version, ptxas_report,
};
use scorecam_gpu::Error;

fn u16_at(b: &[u8], o: usize) -> usize {
    u16::from_le_bytes(b[o..o + 2].try_into().unwrap()) as usize
}
fn u32_at(b: &[u8], o: usize) -> usize {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) as usize
}
fn u64_at(b: &[u8], o: usize) -> usize {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap()) as usize
}

/// Names of the global function symbols (STB_GLOBAL, STT_FUNC) of a 64-bit little-endian ELF.
fn elf_global_functions(elf: &[u8]) -> Vec<String> {
    assert!(
        elf.len() > 64 && &elf[..4] == b"\x7fELF",
        "not an ELF image"
    );
    assert_eq!(elf[4], 2, "not a 64-bit ELF");
    assert_eq!(elf[5], 1, "not a little-endian ELF");
    let shoff = u64_at(elf, 0x28);
    let shentsize = u16_at(elf, 0x3a);
    let shnum = u16_at(elf, 0x3c);
    let section = |i: usize| {
        let h = shoff + i * shentsize;
        // (type, offset, size, link, entsize)
        (
            u32_at(elf, h + 4),
            u64_at(elf, h + 24),
            u64_at(elf, h + 32),
            u32_at(elf, h + 40),
            u64_at(elf, h + 56),
        )
    };
    let mut names = Vec::new();
    for i in 0..shnum {
        let (ty, off, size, link, entsize) = section(i);
        if ty != 2 {
            continue; // SHT_SYMTAB only
        }
        let (_, str_off, str_size, _, _) = section(link);
        let strtab = &elf[str_off..str_off + str_size];
        let entsize = if entsize == 0 { 24 } else { entsize };
        for s in (off..off + size).step_by(entsize) {
            let info = elf[s + 4];
            if info >> 4 != 1 || info & 0xf != 2 {
                continue;
            }
            let name = &strtab[u32_at(elf, s)..];
            let end = name.iter().position(|&c| c == 0).unwrap();
            names.push(String::from_utf8_lossy(&name[..end]).into_owned());
        }
    }
    names
}

/// `.entry` names of a PTX module.
fn ptx_entries(ptx: &str) -> Vec<String> {
    ptx.lines()
        .filter_map(|l| {
            let i = l.find(".entry ")?;
            let rest = l[i + ".entry ".len()..].trim_start();
            let end = rest
                .find(|c: char| c == '(' || c.is_whitespace())
                .unwrap_or(rest.len());
            Some(rest[..end].to_string())
        })
        .collect()
}

fn check(arch: &str, want_cubin: bool) {
    let image = compile_for_arch(arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
    let (kind, found) = if is_cubin(&image) {
        ("CUBIN", elf_global_functions(&image))
    } else {
        (
            "PTX",
            ptx_entries(std::str::from_utf8(&image).expect("PTX is text")),
        )
    };
    if want_cubin {
        assert_eq!(kind, "CUBIN", "{arch}: NVRTC gave PTX, not a CUBIN");
    } else {
        assert_eq!(kind, "PTX", "{arch}: expected PTX");
    }
    for name in kernel_names() {
        assert!(
            found.iter().any(|f| f == name),
            "{arch}: kernel `{name}` missing from the {kind}; found {found:?}"
        );
    }
    println!(
        "{arch}: {kind} of {} bytes from NVRTC {:?}, all {} kernels present: {}",
        image.len(),
        nvrtc_version().unwrap_or((0, 0)),
        kernel_names().len(),
        kernel_names().join(", ")
    );
}

/// Turing has no m16n8k16 FP16 `mma`: the tensor-core kernels compile to a trap there (their
/// launchers refuse such GPUs first), and the rest of the module still builds.
fn compiles_all_kernels_for_sm_75() {
    check("sm_75", true);
}

fn compiles_all_kernels_for_sm_80() {
    check("sm_80", true);
}

fn compiles_all_kernels_for_sm_90() {
    check("sm_90", true);
}

/// Hopper's own target: the wgmma builds are real only there (all 144 of each fused conv + pool
/// build's unrolled warpgroup MMAs per tile; the wgmma conv's two shared-memory MMAs per stage,
/// N = 128 and 256, pooled or not, and the E4M3 builds' at N = 128), and a trap for plain sm_90
/// (whose launcher refuses them).
fn compiles_wgmma_for_sm_90a_only() {
    check("sm_90a", true);
    let wgmma = "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16";
    let ptx = |arch: &str| {
        let image = compile_for_arch(arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
        String::from_utf8(image).expect("PTX is text")
    };
    let a = ptx("compute_90a");
    assert_eq!(
        a.matches(wgmma).count(),
        3 * 144,
        "compute_90a: wg, wg2, block1"
    );
    for n in [128, 256] {
        let ss = format!("wgmma.mma_async.sync.aligned.m64n{n}k16.f32.f16.f16");
        // 2 per stage in conv3x3_wg_n{n} and _pool_n{n}, 4 per step of two in their _pair builds;
        // N = 128 also the tall builds (_m256n128): twice as many, 2 row groups per warpgroup
        let what = format!("compute_90a: conv3x3_wg_n{n}, _pool_n{n}, their pair and tall builds");
        let tall = if n == 128 { 2 * 4 + 2 * 8 } else { 0 };
        assert_eq!(a.matches(&ss).count(), 2 * 2 + 2 * 4 + tall, "{what}");
        let e8 = format!("wgmma.mma_async.sync.aligned.m64n{n}k32.f32.e4m3.e4m3");
        // 2 per stage in conv3x3_wg_e4m3_n128; its pair build's steps of two and of one: 4 + 2;
        // the same again in the pooled builds
        let want = if n == 128 { 2 * (2 + 4 + 2) } else { 0 };
        let what = format!("compute_90a: conv3x3_wg_e4m3_n{n}, _pool_n{n} and their pair builds");
        assert_eq!(a.matches(&e8).count(), want, "{what}");
    }
    assert!(
        a.contains("cp.async.ca.shared.global"),
        "compute_90a: no L1 copies"
    );
    for fence in ["wgmma.fence", "wgmma.commit_group", "fence.proxy.async"] {
        assert!(a.contains(fence), "compute_90a: no {fence}");
    }
    assert!(!ptx("compute_90").contains("wgmma"), "compute_90 has wgmma");
}

/// ptxas's own report for sm_90a: no tensor-core conv spills a register, and ptxas adds no
/// performance note of its own (C75xx: wgmma serialized, or a wait it had to inject), which
/// would leave the results right and the speed halved with nothing else to show it.
fn tensor_core_convs_compile_clean_for_sm_90a() {
    let log = ptxas_report("sm_90a").unwrap_or_else(|e| panic!("{e}"));
    let notes: Vec<&str> = log.lines().filter(|l| l.contains("(C75")).collect();
    assert!(notes.is_empty(), "ptxas notes:\n{}", notes.join("\n"));
    let lines: Vec<&str> = log.lines().collect();
    let mut convs = 0;
    for (i, line) in lines.iter().enumerate() {
        let Some(name) = line.split("Function properties for ").nth(1) else {
            continue;
        };
        let name = name.trim();
        if !name.starts_with("conv3x3_") {
            continue;
        }
        convs += 1;
        let props = lines.get(i + 1).copied().unwrap_or_default();
        let regs = lines.get(i + 2).copied().unwrap_or_default();
        println!("{name}: {} | {}", props.trim(), regs.trim());
        assert!(
            props.contains(" 0 bytes spill stores"),
            "{name} spills: {props}"
        );
    }
    let want = kernel_names()
        .iter()
        .filter(|n| n.starts_with("conv3x3_"))
        .count();
    assert_eq!(convs, want, "tensor-core convs in the report:\n{log}");
}

fn compiles_all_kernels_to_ptx_for_compute_80() {
    check("compute_80", false);
}

fn second_compile_is_cached() {
    let t = std::time::Instant::now();
    let a = compile_for_arch("sm_90").unwrap_or_else(|e| panic!("{e}"));
    let b = compile_for_arch("sm_90").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(a, b);
    let again = std::time::Instant::now();
    compile_for_arch("sm_90").unwrap();
    assert!(again.elapsed() < t.elapsed().max(std::time::Duration::from_millis(50)));
}

fn malformed_arch_is_rejected() {
    // No NVRTC needed: the arch is checked first.
    for bad in ["90", "gfx90a", "sm_x"] {
        match compile_for_arch(bad) {
            Err(Error::Invalid(m)) => assert!(m.contains(bad), "{m}"),
            other => panic!("{bad}: {:?}", other.map(|v| v.len())),
        }
    }
}

/// Compiled kernels are kept on disk between runs, keyed by sources, options and NVRTC version:
/// the second compile reads them; a damaged file is compiled again and replaced; a cache that
/// cannot be written only costs the compile.
fn disk_cache_serves_the_second_compile() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("kernels");
    let (first, hit) = compile_cached("sm_80", Some(&dir)).unwrap();
    assert!(!hit);
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with("sm_80-nvrtc") && name.ends_with(".bin"),
        "{name}"
    );
    let (second, hit) = compile_cached("sm_80", Some(&dir)).unwrap();
    assert!(hit, "the second compile comes from the disk");
    assert_eq!(first, second);
    // Another arch is another file.
    let (ptx, hit) = compile_cached("compute_80", Some(&dir)).unwrap();
    assert!(!hit && !is_cubin(&ptx));
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
    // Damaged: compiled again and replaced.
    std::fs::write(&files[0], b"garbage").unwrap();
    let (again, hit) = compile_cached("sm_80", Some(&dir)).unwrap();
    assert!(!hit);
    assert_eq!(again, first);
    assert_eq!(std::fs::read(&files[0]).unwrap(), first);
    // Unwritable (the directory's parent is a file): still compiles.
    let blocker = d.path().join("file");
    std::fs::write(&blocker, b"x").unwrap();
    let (img, hit) = compile_cached("sm_80", Some(&blocker.join("kernels"))).unwrap();
    assert!(!hit);
    assert_eq!(img, first);
    let (img, hit) = compile_cached("sm_80", None).unwrap();
    assert!(!hit);
    assert_eq!(img, first);
}

fn main() -> std::process::ExitCode {
    // The other tests compile through the process cache only: nothing under $HOME.
    std::env::set_var("SCORECAM_KERNEL_CACHE", "off");
    use common::Need::Nvrtc;
    let t = common::trial;
    common::run_tests(vec![
        t(
            "compiles_all_kernels_for_sm_75",
            &[Nvrtc],
            compiles_all_kernels_for_sm_75,
        ),
        t(
            "compiles_all_kernels_for_sm_80",
            &[Nvrtc],
            compiles_all_kernels_for_sm_80,
        ),
        t(
            "compiles_all_kernels_for_sm_90",
            &[Nvrtc],
            compiles_all_kernels_for_sm_90,
        ),
        t(
            "compiles_wgmma_for_sm_90a_only",
            &[Nvrtc],
            compiles_wgmma_for_sm_90a_only,
        ),
        t(
            "tensor_core_convs_compile_clean_for_sm_90a",
            &[Nvrtc],
            tensor_core_convs_compile_clean_for_sm_90a,
        ),
        t(
            "compiles_all_kernels_to_ptx_for_compute_80",
            &[Nvrtc],
            compiles_all_kernels_to_ptx_for_compute_80,
        ),
        t(
            "second_compile_is_cached",
            &[Nvrtc],
            second_compile_is_cached,
        ),
        t(
            "malformed_arch_is_rejected",
            &[],
            malformed_arch_is_rejected,
        ),
        t(
            "disk_cache_serves_the_second_compile",
            &[Nvrtc],
            disk_cache_serves_the_second_compile,
        ),
    ])
}
