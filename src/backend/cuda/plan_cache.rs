//! cuDNN graph-API plan choices remembered between runs, per device and cuDNN version: the plan
//! search (finalizing a configuration can compile kernels, about a second each on the H200; the
//! FP16 search took 26 s of a 41 s set-up) runs once, and a later run finalizes only the
//! configuration that won. Kept as JSON under `$SCORECAM_PLAN_CACHE` (`off`: nowhere), else
//! `$XDG_CACHE_HOME/scorecam-gpu/plans`, else `~/.cache/scorecam-gpu/plans`, one file per device
//! identity. A missing, unreadable or damaged file is an empty cache; one that cannot be written
//! costs the next run its search, nothing else. Only winners of complete, unconstrained searches
//! are remembered (not a search cut short by the time budget, nor one where a plan was passed
//! over for workspace), and never "no plan": a failure may not happen next time. Processes
//! sharing the file (the tasks of a job array on one node) merge their changes into what is on
//! disk when they save.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The fastest plan a complete search found: its configuration's place in cuDNN's lists
/// (`fallback`: in the fallback list, else in heuristics mode A's ranking) and its time then.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    pub fallback: bool,
    pub pos: usize,
    pub ms: f32,
}

#[derive(Default, Serialize, Deserialize)]
struct File {
    /// The device identity the choices hold for (checked on load).
    device: String,
    choices: BTreeMap<String, Choice>,
}

/// The cache of one device identity.
pub struct PlanCache {
    path: Option<PathBuf>,
    file: File,
    /// What this process changed since it opened or last saved (None: forgotten), merged into
    /// the file on disk at the next save.
    changes: BTreeMap<String, Option<Choice>>,
    /// Lookups that found a choice, and that did not.
    pub hits: usize,
    pub misses: usize,
}

impl PlanCache {
    /// The cache for `device` (GPU name, compute capability, SM count, cuDNN version, this
    /// engine's graph code: whatever changes the heuristics' lists or the timings) in the
    /// default place.
    pub fn open(device: &str) -> PlanCache {
        Self::open_in(cache_dir().as_deref(), device)
    }

    /// The cache for `device` in `dir` (None: in memory only).
    pub fn open_in(dir: Option<&Path>, device: &str) -> PlanCache {
        let path = dir.map(|d| d.join(file_name(device)));
        let file = read(path.as_deref(), device);
        PlanCache {
            path,
            file,
            changes: BTreeMap::new(),
            hits: 0,
            misses: 0,
        }
    }

    /// The remembered choice for `key` (counted as a hit or a miss).
    pub fn get(&mut self, key: &str) -> Option<Choice> {
        let found = self.file.choices.get(key).copied();
        match found {
            Some(_) => self.hits += 1,
            None => self.misses += 1,
        }
        found
    }

    /// Remember `choice` for `key`.
    pub fn put(&mut self, key: String, choice: Choice) {
        if self.file.choices.get(&key) != Some(&choice) {
            self.file.choices.insert(key.clone(), choice);
            self.changes.insert(key, Some(choice));
        }
    }

    /// Forget `key` (its remembered plan no longer runs).
    pub fn forget(&mut self, key: &str) {
        if self.file.choices.remove(key).is_some() {
            self.changes.insert(key.to_string(), None);
        }
    }

    /// Write this process's changes, merged into the file as it is on disk now, atomically
    /// ([`crate::image::write_atomic`]: a reader never sees half of it).
    /// The error says what failed (the caller may only report it).
    pub fn save(&mut self) -> Result<(), String> {
        let Some(path) = self.path.clone().filter(|_| !self.changes.is_empty()) else {
            return Ok(());
        };
        let mut merged = read(Some(&path), &self.file.device);
        for (key, change) in &self.changes {
            match change {
                Some(c) => merged.choices.insert(key.clone(), *c),
                None => merged.choices.remove(key),
            };
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let text = serde_json::to_vec_pretty(&merged).map_err(|e| e.to_string())?;
        crate::image::write_atomic(&path, &text).map_err(|e| e.to_string())?;
        self.file = merged;
        self.changes.clear();
        Ok(())
    }

    /// Where the file is (None: in memory only).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The device identity the choices hold for.
    pub fn identity(&self) -> &str {
        &self.file.device
    }
}

/// The choices of `device` in the file at `path` (none if it is missing, damaged or another
/// device's).
fn read(path: Option<&Path>, device: &str) -> File {
    path.and_then(|p| std::fs::read(p).ok())
        .and_then(|bytes| serde_json::from_slice::<File>(&bytes).ok())
        .filter(|f| f.device == device)
        .unwrap_or_else(|| File {
            device: device.to_string(),
            choices: BTreeMap::new(),
        })
}

/// The key of one graph: its form (`{form:?}`) and dims (rows, cin, cout, h, w).
pub fn graph_key(form: &str, dims: [usize; 5]) -> String {
    let [rows, cin, cout, h, w] = dims;
    format!("{form} rows={rows} cin={cin} cout={cout} h={h} w={w}")
}

/// `$SCORECAM_PLAN_CACHE` (`off` or empty: none), else the user's cache directory.
fn cache_dir() -> Option<PathBuf> {
    super::kernels::user_cache_dir("SCORECAM_PLAN_CACHE", "plans")
}

/// A file name for `device`: readable start, hash for uniqueness.
fn file_name(device: &str) -> String {
    let readable: String = device
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(48)
        .collect();
    let hash = twox_hash::XxHash64::oneshot(0, device.as_bytes());
    format!("{readable}-{hash:016x}.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("scorecam-plan-cache-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn plan(pos: usize) -> Choice {
        Choice {
            fallback: false,
            pos,
            ms: 1.25,
        }
    }

    #[test]
    fn choices_survive_a_restart_for_the_same_device_only() {
        let dir = temp_dir("restart");
        let key = graph_key("FP16", [256, 64, 64, 224, 224]);
        let mut c = PlanCache::open_in(Some(&dir), "H200 sm_90 cuDNN 91400");
        assert_eq!(c.get(&key), None);
        c.put(key.clone(), plan(2));
        c.put("other".into(), plan(0));
        c.save().unwrap();
        let mut again = PlanCache::open_in(Some(&dir), "H200 sm_90 cuDNN 91400");
        assert_eq!(again.get(&key), Some(plan(2)));
        assert_eq!(again.get("other"), Some(plan(0)));
        assert_eq!((again.hits, again.misses), (2, 0));
        again.forget(&key);
        again.save().unwrap();
        let mut third = PlanCache::open_in(Some(&dir), "H200 sm_90 cuDNN 91400");
        assert_eq!(third.get(&key), None);
        assert_eq!(third.get("other"), Some(plan(0)));
        // Another cuDNN: another file, nothing known.
        let mut other = PlanCache::open_in(Some(&dir), "H200 sm_90 cuDNN 91500");
        assert_eq!(other.get("other"), None);
        assert_ne!(other.path(), again.path());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Two processes (two tasks of a job array) with the cache open at once: each one's saves
    /// merge into what the other wrote, forgets included.
    #[test]
    fn concurrent_users_merge_their_changes() {
        let dir = temp_dir("merge");
        let mut seed = PlanCache::open_in(Some(&dir), "dev");
        seed.put("stale".into(), plan(9));
        seed.save().unwrap();
        let mut a = PlanCache::open_in(Some(&dir), "dev");
        let mut b = PlanCache::open_in(Some(&dir), "dev");
        a.put("fp16".into(), plan(1));
        b.put("fp8".into(), plan(3));
        b.forget("stale");
        a.save().unwrap();
        b.save().unwrap();
        let mut c = PlanCache::open_in(Some(&dir), "dev");
        assert_eq!(c.get("fp16"), Some(plan(1)));
        assert_eq!(c.get("fp8"), Some(plan(3)));
        assert_eq!(c.get("stale"), None);
        // Nothing changed: nothing written, nothing lost.
        a.save().unwrap();
        assert_eq!(
            PlanCache::open_in(Some(&dir), "dev").get("fp8"),
            Some(plan(3))
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_damaged_or_foreign_file_is_an_empty_cache_and_is_replaced() {
        let dir = temp_dir("damaged");
        let device = "A100 sm_80";
        let c = PlanCache::open_in(Some(&dir), device);
        let path = c.path().unwrap().to_path_buf();
        std::fs::create_dir_all(&dir).unwrap();
        for bad in [
            &b"{ not json"[..],
            br#"{"device": "someone else", "choices": {"k": {"fallback": false, "pos": 1, "ms": 2.0}}}"#,
        ] {
            std::fs::write(&path, bad).unwrap();
            let mut c = PlanCache::open_in(Some(&dir), device);
            assert_eq!(c.get("k"), None);
            c.put("k".into(), plan(4));
            c.save().unwrap();
            assert_eq!(PlanCache::open_in(Some(&dir), device).get("k"), Some(plan(4)));
        }
        // No temporary file left behind.
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
        assert_eq!(names.len(), 1, "{names:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_unwritable_place_is_an_error_to_report_not_a_failure() {
        let dir = temp_dir("unwritable");
        std::fs::create_dir_all(&dir).unwrap();
        // A file where the directory should be.
        let blocker = dir.join("plans");
        std::fs::write(&blocker, b"").unwrap();
        let mut c = PlanCache::open_in(Some(&blocker), "dev");
        c.put("k".into(), plan(0));
        let e = c.save().unwrap_err();
        assert!(e.contains("plans"), "{e}");
        // In memory only: nothing to write, never an error.
        let mut mem = PlanCache::open_in(None, "dev");
        mem.put("k".into(), plan(0));
        assert!(mem.save().is_ok() && mem.path().is_none());
        assert_eq!(mem.get("k"), Some(plan(0)));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
