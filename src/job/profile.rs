//! `--profile`: where the job's time went. Host stages are timed by the threads that run them
//! (summed over each pool's threads); device stages come from the backend's timers (CUDA events
//! on a GPU, the wall clock on the CPU). The busy fraction is device time over wall time × the
//! number of devices: how much of the job the devices were working.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::backend::Stage;

/// The job's host-side stages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostStage {
    /// Listing inputs: directory walk or manifest, stat, shard and resume filters.
    Read,
    /// Reading, decoding and resizing image files.
    Decode,
    /// A worker inside the explainer (device work plus its host-side part).
    Explain,
    /// Encoding NPY/PNG and writing the files.
    Write,
    /// Syncing and appending result lines.
    Commit,
}

impl HostStage {
    const ALL: [HostStage; 5] = [
        HostStage::Read,
        HostStage::Decode,
        HostStage::Explain,
        HostStage::Write,
        HostStage::Commit,
    ];

    fn name(self) -> &'static str {
        match self {
            HostStage::Read => "read inputs",
            HostStage::Decode => "decode + resize",
            HostStage::Explain => "explain (worker)",
            HostStage::Write => "encode + write",
            HostStage::Commit => "sync + append lines",
        }
    }
}

/// Shared accumulators; cheap enough to be always on.
#[derive(Default)]
pub struct Profile {
    host_ns: [AtomicU64; 5],
    device_ms: Mutex<BTreeMap<Stage, f64>>,
}

impl Profile {
    /// Time `f` as part of `stage`.
    pub fn time<T>(&self, stage: HostStage, f: impl FnOnce() -> T) -> T {
        let t0 = Instant::now();
        let r = f();
        self.add(stage, t0.elapsed());
        r
    }

    pub fn add(&self, stage: HostStage, d: Duration) {
        self.host_ns[stage as usize].fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }

    pub fn add_device(&self, times: &[(Stage, f64)]) {
        if times.is_empty() {
            return;
        }
        let mut m = self.device_ms.lock().unwrap_or_else(|p| p.into_inner());
        for (s, ms) in times {
            *m.entry(*s).or_insert(0.0) += ms;
        }
    }

    /// The table printed at the end of a `--profile` run.
    pub fn table(&self, wall: Duration, images: u64, devices: &[String], gpu: bool) -> String {
        let per = |ms: f64| {
            if images > 0 {
                format!("{:>12.3}", ms / images as f64)
            } else {
                format!("{:>12}", "-")
            }
        };
        let mut out = String::new();
        out.push_str(&format!(
            "profile: {images} images in {:.3} s on {} ({})\n",
            wall.as_secs_f64(),
            devices.join(", "),
            if gpu {
                "device stages timed with CUDA events"
            } else {
                "device stages timed with the wall clock"
            }
        ));
        out.push_str(&format!(
            "  {:<24} {:>12} {:>12}\n",
            "host stage (all threads)", "total ms", "ms/image"
        ));
        for s in HostStage::ALL {
            let ms = self.host_ns[s as usize].load(Ordering::Relaxed) as f64 / 1e6;
            out.push_str(&format!("  {:<24} {ms:>12.1} {}\n", s.name(), per(ms)));
        }
        let dev = self.device_ms.lock().unwrap_or_else(|p| p.into_inner());
        out.push_str(&format!(
            "  {:<24} {:>12} {:>12}\n",
            "device stage", "total ms", "ms/image"
        ));
        let mut busy = 0.0;
        for s in Stage::ALL {
            let ms = dev.get(&s).copied().unwrap_or(0.0);
            busy += ms;
            out.push_str(&format!("  {:<24} {ms:>12.1} {}\n", s.name(), per(ms)));
        }
        let capacity = wall.as_secs_f64() * 1e3 * devices.len().max(1) as f64;
        out.push_str(&format!(
            "  {} busy: {:.1} % of the wall time ({:.1} of {:.1} device-ms)\n",
            if gpu { "GPU" } else { "device" },
            if capacity > 0.0 {
                100.0 * busy / capacity
            } else {
                0.0
            },
            busy,
            capacity
        ));
        out
    }
}
