//! `results.jsonl`: one JSON line per explained (image, class) and per failed input, shared by
//! every run and shard writing into the output directory.
//!
//! Appends are whole groups of lines under an exclusive flock, so shards on one file system never
//! interleave. Before appending, a last line left without its newline (a crash, a full disk, an
//! older tool) is cut off; a failed append is rolled back (truncated to where it started). So the
//! file is always valid JSON lines, and a line only ever refers to files that were made durable
//! before it was written.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};
use twox_hash::XxHash64;

use super::inputs::{path_from_os_bytes, path_to_json};
use super::outputs::{lock_wait, output_error, unlock};
use super::Save;
use crate::cam::Explanation;
use crate::error::{one_line, Error, Result};

/// The file name at the output root.
pub const RESULTS_FILE: &str = "results.jsonl";

/// What every line of this run carries besides its image's own fields.
#[derive(Clone, Debug)]
pub struct LineContext {
    /// Unique per invocation: UTC start time, host, process id.
    pub run: String,
    /// `I/N` when the job is sharded.
    pub shard: Option<String>,
    pub method: &'static str,
    pub mode: &'static str,
    pub layer: String,
    pub precision: &'static str,
    pub labels: Option<Vec<String>>,
}

/// The output files of one map, relative to the output directory.
#[derive(Clone, Debug, Default)]
pub struct MapFiles {
    pub files: Vec<(Save, PathBuf)>,
}

/// Put a path into a line as `key` (escaped when it is not UTF-8; see [`path_to_json`]).
fn put_path(line: &mut Map<String, Value>, key: &str, p: &Path) {
    let (s, escaped) = path_to_json(p);
    line.insert(key.into(), s.into());
    if escaped {
        line.insert("escaped".into(), true.into());
    }
}

impl LineContext {
    fn base(&self, path: &Path, rel: Option<&Path>) -> Map<String, Value> {
        let mut line = Map::new();
        put_path(&mut line, "image", path);
        if let Some(rel) = rel {
            put_path(&mut line, "rel", rel);
        }
        line
    }

    fn finish(&self, mut line: Map<String, Value>) -> String {
        line.insert("run".into(), self.run.clone().into());
        if let Some(s) = &self.shard {
            line.insert("shard".into(), s.clone().into());
        }
        Value::Object(line).to_string()
    }

    /// The line of an input that failed. The error is one line of text.
    pub fn error_line(&self, path: &Path, rel: Option<&Path>, e: &Error) -> String {
        let mut line = self.base(path, rel);
        line.insert("error".into(), one_line(&e.to_string()).into());
        self.finish(line)
    }

    /// The lines of an explained image, one per map (`files[j]` belongs to `ex.maps[j]`).
    pub fn success_lines(
        &self,
        path: &Path,
        rel: &Path,
        ex: &Explanation,
        files: &[MapFiles],
        ms: f64,
        device: &str,
    ) -> Vec<String> {
        ex.maps
            .iter()
            .zip(files)
            .map(|(m, f)| {
                let mut line = self.base(path, Some(rel));
                let label = self.labels.as_ref().and_then(|l| l.get(m.class));
                let fields = json!({
                    "class": m.class,
                    "label": label,
                    "rank": m.rank,
                    "score": m.score,
                    "method": self.method,
                    "mode": self.mode,
                    "layer": self.layer,
                    "precision": self.precision,
                    "flat_channels": ex.flat_channels,
                    "flat_map": m.flat,
                    "masked_passes": ex.masked_passes,
                    "masked_passes_saved": ex.masked_passes_saved,
                });
                if let Value::Object(fields) = fields {
                    line.extend(fields);
                }
                for (save, p) in &f.files {
                    put_path(&mut line, save.field(), p);
                }
                line.insert("ms".into(), ((ms * 1000.0).round() / 1000.0).into());
                line.insert("device".into(), device.into());
                self.finish(line)
            })
            .collect()
    }
}

/// `results.jsonl`, opened for appending.
pub struct ResultsLog {
    path: PathBuf,
    file: File,
}

impl ResultsLog {
    /// Open (create) the file; it must be a regular file.
    pub fn open(path: &Path) -> Result<ResultsLog> {
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(|e| output_error(path, "cannot open for appending", e))?;
        let md = file
            .metadata()
            .map_err(|e| output_error(path, "cannot read", e))?;
        if !md.is_file() {
            return Err(Error::output(path, "not a regular file"));
        }
        Ok(ResultsLog {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append `lines` (each without a newline) as one write, durably (fdatasync), under the
    /// file's lock. Returns whether a partial last line had to be cut off first. On failure the
    /// file is truncated back to where the append started.
    pub fn append(&mut self, lines: &[String]) -> Result<bool> {
        if lines.is_empty() {
            return Ok(false);
        }
        let mut buf = Vec::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
        for l in lines {
            if l.contains('\n') {
                return Err(Error::Invalid(format!(
                    "{}: refusing to append a line that contains a newline",
                    self.path.display()
                )));
            }
            buf.extend_from_slice(l.as_bytes());
            buf.push(b'\n');
        }
        let _range = crate::trace::range("commit");
        lock_wait(&self.file).map_err(|e| output_error(&self.path, "cannot lock", e))?;
        let result = self.append_locked(&buf);
        unlock(&self.file);
        result
    }

    fn append_locked(&mut self, buf: &[u8]) -> Result<bool> {
        let path = self.path.clone();
        let mut len = self
            .file
            .metadata()
            .map_err(|e| output_error(&path, "cannot read", e))?
            .len();
        let mut repaired = false;
        if len > 0 && self.byte_at(len - 1)? != b'\n' {
            let keep = self.after_last_newline(len)?;
            self.file
                .set_len(keep)
                .map_err(|e| output_error(&path, "cannot cut off a partial last line", e))?;
            len = keep;
            repaired = true;
        }
        let written = self
            .file
            .write_all(buf)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            let err = output_error(&path, "cannot append", e);
            return match self.file.set_len(len) {
                Ok(()) => Err(err),
                Err(e2) => Err(Error::output(
                    &path,
                    format!("{err}; rolling the append back failed too: {e2}"),
                )),
            };
        }
        Ok(repaired)
    }

    fn byte_at(&self, pos: u64) -> Result<u8> {
        let mut b = [0u8];
        self.file
            .read_exact_at(&mut b, pos)
            .map_err(|e| output_error(&self.path, "cannot read", e))?;
        Ok(b[0])
    }

    /// Length of the file up to and including its last newline before `len` (0 if none).
    fn after_last_newline(&self, len: u64) -> Result<u64> {
        let mut end = len;
        let mut chunk = vec![0u8; 1 << 16];
        while end > 0 {
            let start = end.saturating_sub(chunk.len() as u64);
            let part = &mut chunk[..(end - start) as usize];
            self.file
                .read_exact_at(part, start)
                .map_err(|e| output_error(&self.path, "cannot read", e))?;
            if let Some(i) = part.iter().rposition(|&b| b == b'\n') {
                return Ok(start + i as u64 + 1);
            }
            end = start;
        }
        Ok(0)
    }
}

/// The key `--resume` matches inputs by: a hash of the relative path's bytes.
pub fn resume_key(rel: &Path) -> u64 {
    XxHash64::oneshot(1, &super::inputs::path_bytes(rel))
}

/// A path from a line's field (undoing the escape of non-UTF-8 names).
fn path_from_json(s: &str, escaped: bool) -> PathBuf {
    if !escaped {
        return PathBuf::from(s);
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 3 <= b.len() {
            if let (Some(hi), Some(lo)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((hi * 16 + lo) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    path_from_os_bytes(&out)
}

/// Inputs already explained: a sorted set of [`resume_key`]s.
#[derive(Debug, Default)]
pub struct DoneSet {
    keys: Vec<u64>,
}

impl DoneSet {
    pub fn contains(&self, rel: &Path) -> bool {
        self.keys.binary_search(&resume_key(rel)).is_ok()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Read `results.jsonl` in `out`: an input is done when it has success lines and every file
    /// those lines name (at least one per kind in `saves`) exists. Error lines, unparsable lines
    /// and lines whose files are gone do not count (the input is explained again).
    pub fn load(out: &Path, saves: &[Save]) -> Result<DoneSet> {
        let path = out.join(RESULTS_FILE);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(DoneSet::default()),
            Err(e) => return Err(output_error(&path, "cannot read", e)),
        };
        // Per key: are all of its lines' files present?
        let mut state: HashMap<u64, bool> = HashMap::new();
        let mut reader = BufReader::with_capacity(1 << 16, file);
        let mut raw = Vec::new();
        loop {
            raw.clear();
            let n = reader
                .read_until(b'\n', &mut raw)
                .map_err(|e| output_error(&path, "cannot read", e))?;
            if n == 0 {
                break;
            }
            let Ok(Value::Object(line)) = serde_json::from_slice::<Value>(&raw) else {
                continue;
            };
            if line.contains_key("error") {
                continue;
            }
            let escaped = line.get("escaped").and_then(Value::as_bool) == Some(true);
            let Some(rel) = line.get("rel").and_then(Value::as_str) else {
                continue;
            };
            let key = resume_key(&path_from_json(rel, escaped));
            let complete = saves.iter().all(|s| {
                line.get(s.field())
                    .and_then(Value::as_str)
                    .is_some_and(|f| out.join(path_from_json(f, escaped)).is_file())
            });
            let entry = state.entry(key).or_insert(true);
            *entry &= complete;
        }
        let mut keys: Vec<u64> = state
            .into_iter()
            .filter_map(|(k, complete)| complete.then_some(k))
            .collect();
        keys.sort_unstable();
        Ok(DoneSet { keys })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_repair_a_partial_line_and_stay_valid() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(RESULTS_FILE);
        std::fs::write(&p, b"{\"a\":1}\n{\"clas").unwrap();
        let mut log = ResultsLog::open(&p).unwrap();
        assert!(log
            .append(&["{\"b\":2}".into(), "{\"c\":3}".into()])
            .unwrap());
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "{\"a\":1}\n{\"b\":2}\n{\"c\":3}\n"
        );
        assert!(!log.append(&["{\"d\":4}".into()]).unwrap());
        assert!(log.append(&["x\ny".into()]).is_err());
        // A file that is only a partial line is emptied first.
        std::fs::write(&p, b"{\"clas").unwrap();
        let mut log = ResultsLog::open(&p).unwrap();
        assert!(log.append(&["{}".into()]).unwrap());
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "{}\n");
    }

    #[test]
    fn done_set_needs_the_line_and_its_files() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path();
        std::fs::create_dir_all(out.join("a")).unwrap();
        for f in ["a/x.png.npy", "a/x.png.heatmap.png", "a/y.png.npy"] {
            std::fs::write(out.join(f), b"").unwrap();
        }
        let lines = [
            r#"{"image":"/d/a/x.png","rel":"a/x.png","map":"a/x.png.npy","heatmap":"a/x.png.heatmap.png"}"#,
            r#"{"image":"/d/a/y.png","rel":"a/y.png","map":"a/y.png.npy"}"#,
            r#"{"image":"/d/a/z.png","rel":"a/z.png","map":"a/z.png.npy"}"#,
            r#"{"image":"/d/a/w.png","rel":"a/w.png","error":"bad"}"#,
            r#"{"image":"/d/a/v.png","rel":"a/v"#,
        ];
        std::fs::write(out.join(RESULTS_FILE), lines.join("\n")).unwrap();
        let done = DoneSet::load(out, &[Save::Npy]).unwrap();
        assert!(done.contains(Path::new("a/x.png")));
        assert!(done.contains(Path::new("a/y.png")));
        assert!(!done.contains(Path::new("a/z.png")), "its map is missing");
        assert!(!done.contains(Path::new("a/w.png")), "it failed");
        let done = DoneSet::load(out, &[Save::Npy, Save::Heatmap]).unwrap();
        assert!(done.contains(Path::new("a/x.png")));
        assert!(
            !done.contains(Path::new("a/y.png")),
            "no heatmap was saved for it"
        );
    }

    #[test]
    fn escaped_paths_round_trip() {
        use std::os::unix::ffi::OsStrExt;
        let p = Path::new(std::ffi::OsStr::from_bytes(b"d/caf\xe9 100%.png"));
        let (s, esc) = path_to_json(p);
        assert!(esc);
        assert_eq!(path_from_json(&s, esc), p);
        assert_eq!(path_from_json("a%41", false), Path::new("a%41"));
    }
}
