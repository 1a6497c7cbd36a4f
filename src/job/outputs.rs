//! The output tree: `OUT/<rel>.npy`, `OUT/<rel>.heatmap.png`, `OUT/<rel>.overlay.png` for an
//! input at `<rel>` below the tree's root (`.class<N>` before the suffix when an image has several
//! targets), `OUT/results.jsonl`, and the tool's own state under `OUT/.scorecam/`:
//! - `root`: the absolute root the tree mirrors, written by the first run; later runs and other
//!   shards mirror against the same root, so equal names from different runs never collide;
//! - `tmp/<run>/`: this run's temporary files, with a `lock` file the run holds locked (flock)
//!   while it lives. At start every run directory whose lock can be taken belongs to a dead run
//!   (killed, crashed) and is removed; a live run's directory is never touched, on this host or
//!   another one sharing the file system.
//!
//! An image's files are written as one transaction: all temporary files first, then renamed into
//! place; if anything fails, the temporaries and the files already renamed are removed, so a
//! failed image leaves no output file. Files are not fsync'ed one by one: durability comes per
//! group of images from [`OutputTree::sync`] before their result lines are committed.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// The tool's state directory inside the output directory.
pub const STATE_DIR: &str = ".scorecam";

/// Errors that mean the output file system is full: the job stops (the user frees space and
/// resumes) instead of failing every remaining image one by one.
pub fn is_out_of_space(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// An I/O failure on an output path: [`Error::DiskFull`] when the disk is full.
pub fn output_error(path: &Path, what: &str, e: std::io::Error) -> Error {
    if is_out_of_space(&e) {
        Error::DiskFull {
            path: path.to_path_buf(),
            msg: format!("{what}: {e}"),
        }
    } else {
        Error::output(path, format!("{what}: {e}"))
    }
}

/// Try to take an exclusive flock on `file`; `Ok(false)` if another process holds it.
pub fn try_lock(file: &File) -> std::io::Result<bool> {
    lock(file, libc::LOCK_EX | libc::LOCK_NB)
}

/// Take an exclusive flock on `file`, waiting for it.
pub fn lock_wait(file: &File) -> std::io::Result<()> {
    lock(file, libc::LOCK_EX).map(|_| ())
}

pub fn unlock(file: &File) {
    let _ = lock(file, libc::LOCK_UN);
}

fn lock(file: &File, op: libc::c_int) -> std::io::Result<bool> {
    use std::os::unix::io::AsRawFd;
    loop {
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => return Ok(false),
            _ => return Err(e),
        }
    }
}

/// Check, without creating anything, that `out` can be the output directory: it is a directory
/// or does not exist yet under a directory, and its `results.jsonl` is not a directory.
pub fn check_out_dir(out: &Path) -> Result<()> {
    match fs::metadata(out) {
        Ok(md) if md.is_dir() => {
            let results = out.join("results.jsonl");
            if let Ok(md) = fs::metadata(&results) {
                if !md.is_file() {
                    return Err(Error::Usage(format!(
                        "output {}: exists and is not a regular file",
                        results.display()
                    )));
                }
            }
            Ok(())
        }
        Ok(_) => Err(Error::Usage(format!(
            "output {}: exists and is not a directory",
            out.display()
        ))),
        Err(_) => {
            // The nearest existing ancestor must be a directory.
            let mut up = out.parent();
            while let Some(p) = up {
                let p = if p.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    p
                };
                match fs::metadata(p) {
                    Ok(md) if md.is_dir() => return Ok(()),
                    Ok(_) => {
                        return Err(Error::Usage(format!(
                            "output {}: cannot create directory: {} is not a directory",
                            out.display(),
                            p.display()
                        )))
                    }
                    Err(_) => up = p.parent(),
                }
            }
            Ok(())
        }
    }
}

/// The root an earlier run recorded for `out`, if any.
pub fn recorded_root(out: &Path) -> Result<Option<PathBuf>> {
    let file = out.join(STATE_DIR).join("root");
    match fs::read(&file) {
        Ok(bytes) => {
            let bytes = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
            Ok(Some(super::inputs::path_from_os_bytes(bytes)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Usage(format!(
            "output {}: cannot read: {e}",
            file.display()
        ))),
    }
}

/// The root this run mirrors against: `wanted` for a new tree; the tree's recorded root when it
/// contains `wanted` (a later run over a part of the same tree); otherwise an error, because the
/// same relative names from two different roots would overwrite each other.
pub fn choose_root(out: &Path, wanted: &Path) -> Result<PathBuf> {
    match recorded_root(out)? {
        None => Ok(wanted.to_path_buf()),
        Some(rec) if wanted.starts_with(&rec) => Ok(rec),
        Some(rec) => Err(Error::Usage(format!(
            "output {} mirrors the tree at {} (recorded by an earlier run) but these inputs are \
             under {}: use another --out, or --root {} if every input is inside it",
            out.display(),
            rec.display(),
            wanted.display(),
            rec.display()
        ))),
    }
}

/// The output directory of a running job.
pub struct OutputTree {
    dir: PathBuf,
    tmp: PathBuf,
    /// Held (flock) for the life of the run: marks `tmp` as in use.
    _lock: File,
    counter: AtomicU64,
    /// Stale temporary directories removed at start.
    pub stale_removed: usize,
}

impl OutputTree {
    /// Create `dir` and the state directory, record `root` if the tree is new (a different
    /// recorded root is an error: see [`choose_root`]), remove dead runs' temporary files and
    /// claim a temporary directory for run `run`.
    pub fn create(dir: &Path, root: &Path, run: &str) -> Result<OutputTree> {
        let state = dir.join(STATE_DIR);
        fs::create_dir_all(state.join("tmp"))
            .map_err(|e| output_error(dir, "cannot create directory", e))?;
        record_root(&state.join("root"), root)?;
        let stale_removed = remove_stale(&state.join("tmp"));
        // The directory is made under a hidden name, its lock taken, and only then renamed to
        // the run's name: another run never sees it without its lock held (it would take it
        // for a dead run's and remove it).
        let tmp = state.join("tmp").join(run);
        let staging = state.join("tmp").join(format!(".{run}"));
        fs::create_dir_all(&staging)
            .map_err(|e| output_error(&staging, "cannot create directory", e))?;
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(staging.join("lock"))
            .map_err(|e| output_error(&staging, "cannot create its lock", e))?;
        if !try_lock(&lock_file).map_err(|e| output_error(&staging, "cannot lock", e))? {
            return Err(Error::output(&staging, "locked by another process"));
        }
        fs::rename(&staging, &tmp).map_err(|e| output_error(&tmp, "cannot create directory", e))?;
        Ok(OutputTree {
            dir: dir.to_path_buf(),
            tmp,
            _lock: lock_file,
            counter: AtomicU64::new(0),
            stale_removed,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Write the files of one image: `files` are (path relative to the output directory,
    /// contents). All or nothing: on error no file of the image is left (see the module docs).
    /// Returns the paths written.
    pub fn write_image(&self, files: &[(PathBuf, Vec<u8>)]) -> Result<Vec<PathBuf>> {
        let _range = crate::trace::range("write");
        let mut temps: Vec<PathBuf> = Vec::with_capacity(files.len());
        let cleanup = |temps: &[PathBuf], placed: &[PathBuf]| {
            for t in temps.iter().chain(placed) {
                let _ = fs::remove_file(t);
            }
        };
        for (rel, bytes) in files {
            let n = self.counter.fetch_add(1, Ordering::Relaxed);
            let tmp = self.tmp.join(format!("{n}.tmp"));
            let written = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .and_then(|mut f| f.write_all(bytes));
            if let Err(e) = written {
                let _ = fs::remove_file(&tmp);
                cleanup(&temps, &[]);
                return Err(output_error(&self.dir.join(rel), "cannot write", e));
            }
            temps.push(tmp);
        }
        let mut placed = Vec::with_capacity(files.len());
        for (i, ((rel, _), tmp)) in files.iter().zip(&temps).enumerate() {
            let dest = self.dir.join(rel);
            let moved = match dest.parent() {
                Some(parent) => fs::create_dir_all(parent),
                None => Ok(()),
            }
            .and_then(|()| fs::rename(tmp, &dest));
            if let Err(e) = moved {
                let what = if e.raw_os_error() == Some(libc::EXDEV) {
                    "cannot move into place (the directory is on another file system than the \
                     output directory)"
                } else {
                    "cannot move into place"
                };
                cleanup(&temps[i..], &placed);
                return Err(output_error(&dest, what, e));
            }
            placed.push(dest);
        }
        Ok(placed)
    }

    /// Make every file written so far durable (one `syncfs` of the output file system, instead
    /// of an fsync per file). Elsewhere than Linux each of `files` is fsync'ed.
    pub fn sync(&self, files: &[PathBuf]) -> Result<()> {
        let _range = crate::trace::range("sync");
        #[cfg(target_os = "linux")]
        {
            let _ = files;
            use std::os::unix::io::AsRawFd;
            let d = File::open(&self.dir)
                .map_err(|e| output_error(&self.dir, "cannot open for syncing", e))?;
            // SAFETY: syncfs on a descriptor we own.
            if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
                let e = std::io::Error::last_os_error();
                return Err(output_error(&self.dir, "cannot sync", e));
            }
            Ok(())
        }
        #[cfg(not(target_os = "linux"))]
        {
            for f in files {
                File::open(f)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| output_error(f, "cannot sync", e))?;
            }
            Ok(())
        }
    }
}

impl Drop for OutputTree {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.tmp);
    }
}

/// Write the root record unless one exists. The record appears whole or not at all (written to
/// a temporary file, then hard-linked into place, which fails if the name exists), so a shard
/// starting at the same moment never reads it half written; when it exists, it must agree.
fn record_root(file: &Path, root: &Path) -> Result<()> {
    let mut bytes = super::inputs::path_bytes(root);
    bytes.push(b'\n');
    let dir = file.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".root.{}.{}.tmp",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .and_then(|mut f| f.write_all(&bytes).and_then(|()| f.sync_all()));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(output_error(file, "cannot write", e));
    }
    let linked = fs::hard_link(&tmp, file);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let out = dir.parent().unwrap_or(dir);
            match recorded_root(out)? {
                Some(r) if r == root => Ok(()),
                Some(r) => Err(Error::Usage(format!(
                    "output {} mirrors {} but this run mirrors {}",
                    out.display(),
                    r.display(),
                    root.display()
                ))),
                None => Ok(()),
            }
        }
        Err(e) => Err(output_error(file, "cannot create", e)),
    }
}

/// Remove the temporary directories of runs that are no longer alive; returns how many.
fn remove_stale(tmp_root: &Path) -> usize {
    let Ok(entries) = fs::read_dir(tmp_root) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let dir = entry.path();
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let old = || {
            entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age.as_secs() > 60)
        };
        // A hidden (staging) directory is a run being created: left alone for a minute, after
        // which it is a run that died before it started.
        if entry.file_name().to_string_lossy().starts_with('.') && !old() {
            continue;
        }
        let dead = match File::open(dir.join("lock")) {
            // The lock is free: its run is gone.
            Ok(f) => try_lock(&f).unwrap_or(false),
            // No lock file: a run that died while creating its directory.
            Err(_) => old(),
        };
        if dead && fs::remove_dir_all(&dir).is_ok() {
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_image_leaves_no_file_and_dead_runs_are_cleaned() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out");
        let tree = OutputTree::create(&out, Path::new("/data"), "run-a").unwrap();
        // The second file's directory is blocked by a regular file: nothing of the image stays.
        fs::write(out.join("blocked"), b"x").unwrap();
        let files = vec![
            (PathBuf::from("a/x.png.npy"), b"npy".to_vec()),
            (PathBuf::from("blocked/x.png.heatmap.png"), b"png".to_vec()),
        ];
        assert!(tree.write_image(&files).is_err());
        assert!(!out.join("a/x.png.npy").exists());
        assert_eq!(
            fs::read_dir(&tree.tmp).unwrap().count(),
            1,
            "only the lock file"
        );
        let ok = tree
            .write_image(&[(PathBuf::from("a/y.png.npy"), b"npy".to_vec())])
            .unwrap();
        assert_eq!(ok, [out.join("a/y.png.npy")]);
        tree.sync(&ok).unwrap();

        // A live run's directory survives another run's start; a dead run's does not.
        let dead = out.join(STATE_DIR).join("tmp/run-dead");
        fs::create_dir_all(&dead).unwrap();
        fs::write(dead.join("lock"), b"").unwrap();
        fs::write(dead.join("7.tmp"), b"partial").unwrap();
        let other = OutputTree::create(&out, Path::new("/data"), "run-b").unwrap();
        assert_eq!(other.stale_removed, 1);
        assert!(!dead.exists());
        assert!(tree.tmp.exists());
        drop(tree);
        drop(other);
        assert_eq!(
            fs::read_dir(out.join(STATE_DIR).join("tmp"))
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn the_recorded_root_decides() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out");
        assert_eq!(
            choose_root(&out, Path::new("/a/b")).unwrap(),
            Path::new("/a/b")
        );
        drop(OutputTree::create(&out, Path::new("/a/b"), "r1").unwrap());
        assert_eq!(
            choose_root(&out, Path::new("/a/b/c")).unwrap(),
            Path::new("/a/b")
        );
        assert!(choose_root(&out, Path::new("/a")).is_err());
        assert!(choose_root(&out, Path::new("/x")).is_err());
        assert!(OutputTree::create(&out, Path::new("/x"), "r2").is_err());
    }
}
