//! The job's inputs, streamed: image files and directories given on the command line, or a
//! manifest (a file or stdin), turned one at a time into [`Input`]s with their place in the output
//! tree. Nothing here holds the whole list: a directory is walked entry by entry (each directory's
//! entries sorted by name, so the order is deterministic), a manifest is read line by line.
//!
//! Where an input lands in the output tree is its path relative to the tree's *root*:
//! - `--root DIR` when given;
//! - for paths on the command line, the deepest directory containing all of them (a directory
//!   argument counts as itself, a file as its parent), so `explain photos/` mirrors `photos/`;
//! - for a manifest, `/`: relative entries are read relative to the manifest's directory (stdin:
//!   the current directory) and every input is mirrored by its full absolute path, which can never
//!   collide. `--root` drops a common prefix.
//!
//! Paths are made absolute and `.`/`..` resolved lexically (symlinks are not resolved: a link's
//! outputs sit where the link is).

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Component, Path, PathBuf};

use crate::cam::Targets;
use crate::error::{Error, Result};

/// File extensions taken from directories (case-insensitive). Files named on the command line or
/// in a manifest are read whatever their name.
pub const IMAGE_EXTENSIONS: &[&str] = &[
    "png", "jpg", "jpeg", "jpe", "jfif", "bmp", "gif", "tif", "tiff", "webp",
];

/// One input of the job, as the reader found it.
#[derive(Debug)]
pub struct Input {
    /// The path to open, as given (joined to its directory for walked files).
    pub path: PathBuf,
    /// Its place in the output tree, relative to the root; `None` when the input has no usable
    /// path (an unparsable manifest line).
    pub rel: Option<PathBuf>,
    /// Targets from the manifest line; `None`: the job's (`--class`, `--top-k`).
    pub targets: Option<Targets>,
    /// Set when the input is known bad before it is opened (not a regular file, a symlink loop,
    /// outside the root, a bad manifest line): it becomes an error line without being read.
    pub problem: Option<Error>,
}

impl Input {
    fn bad(path: PathBuf, rel: Option<PathBuf>, problem: Error) -> Input {
        Input {
            path,
            rel,
            targets: None,
            problem: Some(problem),
        }
    }

    /// The bytes the shard partition hashes: the relative path, else the path as given.
    pub fn partition_key(&self) -> Vec<u8> {
        path_bytes(self.rel.as_deref().unwrap_or(&self.path))
    }
}

/// Where the inputs come from.
#[derive(Clone, Debug)]
pub enum Source {
    /// Files and directories (walked recursively) from the command line.
    Paths(Vec<PathBuf>),
    /// One input per line: a path, or a JSON object `{"path": ..., "class": N}` /
    /// `{"path": ..., "classes": [N, ...]}`. `-` reads stdin.
    Manifest(PathBuf),
}

/// `path` made absolute (against the current directory) with `.` and `..` resolved lexically.
pub fn absolute(path: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(path)
        .map_err(|e| Error::io(format!("resolving {}", path.display()), e))?;
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    Ok(out)
}

/// The deepest directory that contains every path in `dirs`.
fn common_ancestor(dirs: &[PathBuf]) -> PathBuf {
    let mut common: Vec<Component> = match dirs.first() {
        Some(d) => d.components().collect(),
        None => return PathBuf::from("/"),
    };
    for d in &dirs[1..] {
        let n = common
            .iter()
            .zip(d.components())
            .take_while(|(a, b)| *a == b)
            .count();
        common.truncate(n);
    }
    common.iter().collect()
}

/// The root the output tree mirrors for `source` (see the module docs), as an absolute path.
/// `--root` must name a directory.
pub fn tree_root(source: &Source, root: Option<&Path>) -> Result<PathBuf> {
    if let Some(r) = root {
        if !r.is_dir() {
            return Err(Error::Usage(format!(
                "--root {}: not a directory",
                r.display()
            )));
        }
        return absolute(r);
    }
    match source {
        Source::Manifest(_) => Ok(PathBuf::from("/")),
        Source::Paths(paths) => {
            let mut dirs = Vec::with_capacity(paths.len());
            for p in paths {
                let abs = absolute(p)?;
                if p.is_dir() {
                    dirs.push(abs);
                } else {
                    dirs.push(abs.parent().map(Path::to_path_buf).unwrap_or(abs));
                }
            }
            Ok(common_ancestor(&dirs))
        }
    }
}

/// Does `name` end in one of [`IMAGE_EXTENSIONS`]?
pub fn has_image_extension(name: &Path) -> bool {
    name.extension()
        .and_then(OsStr::to_str)
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// Streams the inputs of a [`Source`]. `skip_dir` (the output directory, by device and inode) is
/// never walked, so a job writing inside its own input tree does not read its outputs back.
pub struct Inputs {
    root: PathBuf,
    skip_dir: Option<(u64, u64)>,
    state: State,
}

enum State {
    Paths {
        args: std::vec::IntoIter<PathBuf>,
        walk: Option<walkdir::IntoIter>,
    },
    Manifest {
        name: String,
        base: PathBuf,
        lines: Box<dyn BufRead + Send>,
        number: u64,
    },
}

/// Device and inode of a path, to recognise a directory whatever it is called.
fn identity(path: &Path) -> Option<(u64, u64)> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

impl Inputs {
    /// Start reading `source`. A manifest file that cannot be opened is an error here (nothing
    /// has run yet); everything wrong with a single input becomes that input's `problem`.
    pub fn open(source: &Source, root: PathBuf) -> Result<Inputs> {
        let state = match source {
            Source::Paths(paths) => State::Paths {
                args: paths.clone().into_iter(),
                walk: None,
            },
            Source::Manifest(m) if m.as_os_str() == "-" => State::Manifest {
                name: "stdin".into(),
                base: absolute(Path::new("."))?,
                lines: Box::new(BufReader::new(std::io::stdin())),
                number: 0,
            },
            Source::Manifest(m) => {
                let file = File::open(m).map_err(|e| {
                    Error::Usage(format!("--manifest {}: cannot open: {e}", m.display()))
                })?;
                if file.metadata().is_ok_and(|md| md.is_dir()) {
                    return Err(Error::Usage(format!(
                        "--manifest {}: is a directory",
                        m.display()
                    )));
                }
                let abs = absolute(m)?;
                State::Manifest {
                    name: m.display().to_string(),
                    base: abs.parent().map(Path::to_path_buf).unwrap_or(abs),
                    lines: Box::new(BufReader::with_capacity(1 << 16, file)),
                    number: 0,
                }
            }
        };
        Ok(Inputs {
            root,
            skip_dir: None,
            state,
        })
    }

    /// Never walk into `dir` (the output directory, once it exists).
    pub fn skip_dir(&mut self, dir: &Path) {
        self.skip_dir = identity(dir);
    }

    /// The path relative to the root, or the problem that it is outside it.
    fn relative(&self, path: &Path) -> std::result::Result<PathBuf, Error> {
        let abs = absolute(path)?;
        match abs.strip_prefix(&self.root) {
            Ok(rel) if !rel.as_os_str().is_empty() => Ok(rel.to_path_buf()),
            _ => Err(Error::image(
                path,
                format!(
                    "outside the output tree's root {} (pass --root with a directory that \
                     contains every input)",
                    self.root.display()
                ),
            )),
        }
    }

    /// An input for a file found at `path`, checked without opening it.
    fn file_input(&self, path: PathBuf, targets: Option<Targets>) -> Input {
        let rel = match self.relative(&path) {
            Ok(rel) => rel,
            Err(e) => return Input::bad(path, None, e),
        };
        let problem = match std::fs::metadata(&path) {
            Ok(md) if md.is_file() => None,
            Ok(md) => Some(Error::image(
                &path,
                crate::image::not_a_regular_file(&md.file_type()),
            )),
            Err(e) => Some(Error::image(&path, format!("cannot open: {e}"))),
        };
        Input {
            path,
            rel: Some(rel),
            targets,
            problem,
        }
    }

    fn next_from_walk(&mut self) -> Option<Input> {
        let State::Paths { walk, .. } = &mut self.state else {
            return None;
        };
        let it = walk.as_mut()?;
        loop {
            let entry = match it.next() {
                None => {
                    *walk = None;
                    return None;
                }
                Some(Ok(e)) => e,
                Some(Err(e)) => {
                    let path = e.path().map(Path::to_path_buf).unwrap_or_default();
                    let is_loop = e.loop_ancestor().is_some();
                    // Unreadable entries count only where an image was expected; a loop always.
                    if is_loop || has_image_extension(&path) {
                        let msg = if let Some(anc) = e.loop_ancestor() {
                            format!(
                                "symbolic link loop (leads back to {}): not followed",
                                anc.display()
                            )
                        } else {
                            format!(
                                "cannot read: {}",
                                e.io_error().map_or(e.to_string(), |io| io.to_string())
                            )
                        };
                        return Some(Input::bad(path.clone(), None, Error::image(&path, msg)));
                    }
                    continue;
                }
            };
            let ft = entry.file_type();
            if ft.is_dir() {
                if self.skip_dir.is_some() && identity(entry.path()) == self.skip_dir {
                    it.skip_current_dir();
                }
                continue;
            }
            if !has_image_extension(entry.path()) {
                continue;
            }
            let path = entry.into_path();
            return Some(self.file_input(path, None));
        }
    }

    fn next_from_args(&mut self) -> Option<Input> {
        loop {
            if let Some(input) = self.next_from_walk() {
                return Some(input);
            }
            let State::Paths { args, walk } = &mut self.state else {
                return None;
            };
            let path = args.next()?;
            if path.is_dir() {
                *walk = Some(
                    walkdir::WalkDir::new(&path)
                        .follow_links(true)
                        .sort_by_file_name()
                        .min_depth(1)
                        .into_iter(),
                );
                continue;
            }
            return Some(self.file_input(path, None));
        }
    }

    fn next_from_manifest(&mut self) -> Option<Input> {
        loop {
            let State::Manifest {
                name,
                base,
                lines,
                number,
            } = &mut self.state
            else {
                return None;
            };
            let mut raw = Vec::new();
            match lines.read_until(b'\n', &mut raw) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => {
                    *number += 1;
                    let place = format!("{name}:{number}");
                    // A read error ends the manifest: report it once, as an input that failed.
                    self.state = State::Paths {
                        args: Vec::new().into_iter(),
                        walk: None,
                    };
                    return Some(Input::bad(
                        PathBuf::from(&place),
                        None,
                        Error::Usage(format!("manifest {place}: cannot read: {e}")),
                    ));
                }
            }
            *number += 1;
            let place = format!("{name}:{number}");
            let base = base.clone();
            let line = trim_line(&raw);
            if line.is_empty() || line.starts_with(b"#") {
                continue;
            }
            return Some(match parse_manifest_line(line) {
                Ok((path, targets)) => {
                    let path = if path.is_absolute() {
                        path
                    } else {
                        base.join(path)
                    };
                    self.file_input(path, targets)
                }
                Err(msg) => {
                    let shown = PathBuf::from(String::from_utf8_lossy(line).into_owned());
                    Input::bad(
                        shown,
                        None,
                        Error::Usage(format!("manifest {place}: {msg}")),
                    )
                }
            });
        }
    }
}

impl Iterator for Inputs {
    type Item = Input;

    fn next(&mut self) -> Option<Input> {
        match self.state {
            State::Paths { .. } => self.next_from_args(),
            State::Manifest { .. } => self.next_from_manifest(),
        }
    }
}

/// A line without its line ending and surrounding blanks.
fn trim_line(raw: &[u8]) -> &[u8] {
    let start = raw
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(raw.len());
    let end = raw
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &raw[start..end]
}

/// A manifest line: a JSON object with `path` and optional `class`/`classes`, or a bare path
/// (any bytes: file names need not be UTF-8).
fn parse_manifest_line(line: &[u8]) -> std::result::Result<(PathBuf, Option<Targets>), String> {
    if line.first() != Some(&b'{') {
        return Ok((path_from_os_bytes(line), None));
    }
    let v: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| format!("not a JSON object: {e}"))?;
    let path = v
        .get("path")
        .and_then(|p| p.as_str())
        .filter(|p| !p.is_empty())
        .ok_or("no \"path\" string")?;
    let class = |x: &serde_json::Value| {
        x.as_u64()
            .map(|c| c as usize)
            .ok_or_else(|| format!("class {x} is not a non-negative integer"))
    };
    let targets = match (v.get("class"), v.get("classes")) {
        (Some(_), Some(_)) => return Err("both \"class\" and \"classes\" given".into()),
        (Some(c), None) => Some(Targets::classes([class(c)?])),
        (None, Some(list)) => {
            let list = list.as_array().ok_or("\"classes\" is not an array")?;
            if list.is_empty() {
                return Err("\"classes\" is empty".into());
            }
            Some(Targets::classes(
                list.iter()
                    .map(class)
                    .collect::<std::result::Result<Vec<_>, _>>()?,
            ))
        }
        (None, None) => None,
    };
    Ok((PathBuf::from(path), targets))
}

/// A path from raw bytes (on Unix, exactly those bytes).
pub fn path_from_os_bytes(b: &[u8]) -> PathBuf {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        PathBuf::from(OsStr::from_bytes(b))
    }
    #[cfg(not(unix))]
    {
        PathBuf::from(String::from_utf8_lossy(b).into_owned())
    }
}

/// The raw bytes of a path (on Unix, exactly the file system's name).
pub fn path_bytes(p: &Path) -> Vec<u8> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        p.as_os_str().as_bytes().to_vec()
    }
    #[cfg(not(unix))]
    {
        p.to_string_lossy().into_owned().into_bytes()
    }
}

/// A path as a JSON string: as is when it is UTF-8; otherwise every byte that is not part of
/// valid UTF-8 is written `%XX` and every `%` as `%25` (the flag says so), so two different
/// names never share one string and the bytes can be recovered.
pub fn path_to_json(p: &Path) -> (String, bool) {
    if let Some(s) = p.to_str() {
        return (s.to_owned(), false);
    }
    let bytes = path_bytes(p);
    let mut out = String::with_capacity(bytes.len() + 16);
    for chunk in bytes.utf8_chunks() {
        for ch in chunk.valid().chars() {
            if ch == '%' {
                out.push_str("%25");
            } else {
                out.push(ch);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    (out, true)
}

/// `name` with `suffix` appended (`a/cat.jpg` + `.npy` → `a/cat.jpg.npy`), bytes preserved.
pub fn with_suffix(name: &Path, suffix: &str) -> PathBuf {
    let mut s: OsString = name.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lexical_absolute_resolves_dots() {
        let a = absolute(Path::new("/a/b/../c/./d")).unwrap();
        assert_eq!(a, PathBuf::from("/a/c/d"));
        assert_eq!(absolute(Path::new("/..")).unwrap(), PathBuf::from("/"));
    }

    #[test]
    fn common_ancestor_of_dirs() {
        let d = |s: &str| PathBuf::from(s);
        assert_eq!(common_ancestor(&[d("/a/b/c"), d("/a/b/d")]), d("/a/b"));
        assert_eq!(common_ancestor(&[d("/a/b"), d("/a/b")]), d("/a/b"));
        assert_eq!(common_ancestor(&[d("/a"), d("/b")]), d("/"));
        assert_eq!(common_ancestor(&[d("/a/bc"), d("/a/b")]), d("/a"));
    }

    #[test]
    fn manifest_lines_parse() {
        let (p, t) = parse_manifest_line(b"a b/c.png").unwrap();
        assert_eq!((p, t), (PathBuf::from("a b/c.png"), None));
        let (p, t) = parse_manifest_line(br#"{"path": "x.jpg", "class": 3}"#).unwrap();
        assert_eq!(
            (p, t),
            (PathBuf::from("x.jpg"), Some(Targets::Classes(vec![3])))
        );
        let (_, t) = parse_manifest_line(br#"{"path": "x.jpg", "classes": [5, 2, 5]}"#).unwrap();
        assert_eq!(t, Some(Targets::Classes(vec![5, 2])));
        for bad in [
            &br#"{"path": 3}"#[..],
            br#"{"class": 3}"#,
            br#"{"path": "x", "class": -1}"#,
            br#"{"path": "x", "class": 1, "classes": [2]}"#,
            br#"{"path": "x", "classes": []}"#,
            br#"{"path": "x""#,
        ] {
            assert!(
                parse_manifest_line(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(trim_line(b"  x.png \r\n"), b"x.png");
    }

    #[cfg(unix)]
    #[test]
    fn non_utf8_paths_escape_injectively() {
        use std::os::unix::ffi::OsStrExt;
        let a = Path::new(OsStr::from_bytes(b"caf\xe9.png"));
        let b = Path::new(OsStr::from_bytes(b"caf\xe8.png"));
        let c = Path::new("caf%E9.png");
        let (ja, ea) = path_to_json(a);
        let (jb, _) = path_to_json(b);
        let (jc, ec) = path_to_json(c);
        assert_eq!((ja.as_str(), ea), ("caf%E9.png", true));
        assert_ne!(ja, jb);
        assert_eq!((jc.as_str(), ec), ("caf%E9.png", false)); // the flag tells them apart
        let (jd, _) = path_to_json(Path::new(OsStr::from_bytes(b"100%\xff")));
        assert_eq!(jd, "100%25%FF");
    }

    #[test]
    fn image_extensions_ignore_case() {
        assert!(has_image_extension(Path::new("a/B.JPG")));
        assert!(has_image_extension(Path::new("x.webp")));
        assert!(!has_image_extension(Path::new("x.txt")));
        assert!(!has_image_extension(Path::new("jpg")));
    }
}
