//! NVTX ranges, so an Nsight Systems (or Nsight Compute) timeline reads as the pipeline: decode,
//! explain with its stages (preprocess, base forward, masks, each masked-forward batch, scores,
//! combine), write and commit, each on the thread that does it.
//!
//! Profilers attach to NVTX by setting `NVTX_INJECTION64_PATH` to their injection library before
//! the process starts (NVTX v3's mechanism). Without it nothing is called at all: a range costs
//! one load of a cached flag, no allocation, no library.

use std::sync::OnceLock;

/// Is a profiler's NVTX injection library configured for this process?
fn attached() -> bool {
    static ATTACHED: OnceLock<bool> = OnceLock::new();
    *ATTACHED
        .get_or_init(|| std::env::var_os("NVTX_INJECTION64_PATH").is_some_and(|v| !v.is_empty()))
}

/// A thread range, open until dropped.
#[must_use = "the range closes when this guard is dropped"]
pub struct Range {
    open: bool,
}

impl Drop for Range {
    fn drop(&mut self) {
        if self.open {
            nvtx::range_pop!();
        }
    }
}

/// Open a range named `name` on this thread.
pub fn range(name: &str) -> Range {
    let open = attached();
    if open {
        nvtx::range_push!("{name}");
    }
    Range { open }
}

/// Name the current thread in the profiler's timeline.
pub fn name_thread(name: &str) {
    if attached() {
        nvtx::name_thread!("{name}");
    }
}
