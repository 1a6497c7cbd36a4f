//! Finding the weights file: `--weights`, `$SCORECAM_WEIGHTS`, `weights/vgg16.safetensors`, or the
//! Hugging Face hub cache (downloading `timm/vgg16.tv_in1k` when allowed).
//!
//! The cache follows `huggingface_hub`'s layout and environment variables, so a file downloaded by
//! Python (`huggingface-cli download timm/vgg16.tv_in1k model.safetensors`) is found here, and one
//! downloaded here is found by Python:
//!
//! ```text
//! $HF_HUB_CACHE/models--timm--vgg16.tv_in1k/
//!     refs/main                                  commit hash
//!     blobs/<etag>                               the file
//!     snapshots/<commit>/model.safetensors   ->  ../../blobs/<etag>
//! ```

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};

/// The default weights: torchvision's VGG16 ImageNet weights as published by timm.
pub const DEFAULT_REPO: &str = "timm/vgg16.tv_in1k";
pub const DEFAULT_FILE: &str = "model.safetensors";
/// Looked up relative to the current directory.
pub const DEFAULT_LOCAL: &str = "weights/vgg16.safetensors";
/// Environment variable naming a weights file.
pub const ENV_WEIGHTS: &str = "SCORECAM_WEIGHTS";
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// How to get weights when none could be found or fetched.
pub const ADVICE: &str = "To use real weights, do one of:\n  \
    - pass --weights PATH (a torchvision- or timm-named VGG .safetensors file);\n  \
    - set SCORECAM_WEIGHTS=PATH;\n  \
    - put the file at weights/vgg16.safetensors (relative to the current directory);\n  \
    - fetch it into the Hugging Face cache with `huggingface-cli download timm/vgg16.tv_in1k model.safetensors` \
    (or run once with network access and without HF_HUB_OFFLINE=1).\n\
    Or pass --random-weights SEED to run on a random VGG16.";

/// Resolve which weights file to use: `explicit` (`--weights PATH`) if given, else
/// `$SCORECAM_WEIGHTS`, else `weights/vgg16.safetensors` in the current directory if it exists,
/// else the Hugging Face cache entry for `timm/vgg16.tv_in1k` `model.safetensors`, downloaded
/// if missing and allowed (`HF_HUB_OFFLINE` unset).
pub fn resolve_weights(explicit: Option<&Path>, show_progress: bool) -> Result<PathBuf> {
    resolve_weights_in(Path::new(""), explicit, show_progress)
}

/// [`resolve_weights`] with the default local file looked up under `base_dir` instead of the
/// current directory (`base_dir/weights/vgg16.safetensors`).
pub fn resolve_weights_in(
    base_dir: &Path,
    explicit: Option<&Path>,
    show_progress: bool,
) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return existing_file(p, "given with --weights");
    }
    if let Some(p) = env_nonempty(ENV_WEIGHTS) {
        return existing_file(Path::new(&p), "named by $SCORECAM_WEIGHTS");
    }
    let local = base_dir.join(DEFAULT_LOCAL);
    if local.is_file() {
        return Ok(local);
    }
    hub_download(DEFAULT_REPO, DEFAULT_FILE, show_progress)
}

fn existing_file(p: &Path, origin: &str) -> Result<PathBuf> {
    match fs::metadata(p) {
        Ok(m) if m.is_file() => Ok(p.to_path_buf()),
        Ok(_) => Err(Error::weights(
            p.display().to_string(),
            None,
            format!("not a regular file ({origin})"),
        )),
        Err(e) => Err(Error::weights(
            p.display().to_string(),
            None,
            format!("cannot use this weights file ({origin}): {e}"),
        )),
    }
}

/// Fetch `repo`/`file` (revision `main`) from the hub into the cache and return the snapshot
/// path. A file already in the cache is returned without any network access.
pub fn hub_download(repo: &str, file: &str, show_progress: bool) -> Result<PathBuf> {
    let cache = hub_cache_dir().ok_or_else(|| {
        Error::WeightsUnavailable(format!(
            "cannot locate the Hugging Face cache for {repo}/{file}: none of HF_HUB_CACHE, HF_HOME, \
             XDG_CACHE_HOME or HOME is set.\n{ADVICE}"
        ))
    })?;
    let repo_dir = cache.join(repo_folder_name(repo));
    if let Some(p) = cached_file(&repo_dir, file) {
        return Ok(p);
    }
    if offline() {
        return Err(Error::WeightsUnavailable(format!(
            "{repo}/{file} is not in the Hugging Face cache ({}) and HF_HUB_OFFLINE is set, so it \
             was not downloaded.\n{ADVICE}",
            repo_dir.display()
        )));
    }
    let url = format!("{}/{repo}/resolve/main/{file}", endpoint());
    fetch(&url, &repo_dir, file, show_progress).map_err(|reason| {
        Error::WeightsUnavailable(format!(
            "cannot download the weights from {url}: {reason}\n{ADVICE}"
        ))
    })
}

/// `models--{owner}--{name}`, huggingface_hub's folder name for a model repository.
pub fn repo_folder_name(repo: &str) -> String {
    format!("models--{}", repo.replace('/', "--"))
}

/// The hub cache: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`
/// (`$XDG_CACHE_HOME/huggingface/hub` when that is set), as huggingface_hub resolves it.
pub fn hub_cache_dir() -> Option<PathBuf> {
    if let Some(p) = env_nonempty("HF_HUB_CACHE").or_else(|| env_nonempty("HUGGINGFACE_HUB_CACHE"))
    {
        return Some(expand_tilde(&p));
    }
    hf_home().map(|h| h.join("hub"))
}

fn hf_home() -> Option<PathBuf> {
    if let Some(p) = env_nonempty("HF_HOME") {
        return Some(expand_tilde(&p));
    }
    if let Some(p) = env_nonempty("XDG_CACHE_HOME") {
        return Some(expand_tilde(&p).join("huggingface"));
    }
    env_nonempty("HOME").map(|h| PathBuf::from(h).join(".cache").join("huggingface"))
}

fn expand_tilde(p: &str) -> PathBuf {
    match (p.strip_prefix("~/"), env_nonempty("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ if p == "~" => env_nonempty("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| p.into()),
        _ => PathBuf::from(p),
    }
}

fn env_nonempty(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.trim().is_empty())
}

/// `HF_HUB_OFFLINE=1` (or true/yes/on): never connect.
pub fn offline() -> bool {
    env_nonempty("HF_HUB_OFFLINE").is_some_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    })
}

fn endpoint() -> String {
    env_nonempty("HF_ENDPOINT")
        .unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned())
        .trim()
        .trim_end_matches('/')
        .to_owned()
}

/// `HF_TOKEN`, else the token `huggingface-cli login` stored (`$HF_TOKEN_PATH`, `$HF_HOME/token`).
fn hf_token() -> Option<String> {
    if let Some(t) = env_nonempty("HF_TOKEN").or_else(|| env_nonempty("HUGGING_FACE_HUB_TOKEN")) {
        return Some(t.trim().to_owned());
    }
    let path = env_nonempty("HF_TOKEN_PATH")
        .map(|p| expand_tilde(&p))
        .or_else(|| hf_home().map(|h| h.join("token")))?;
    let t = fs::read_to_string(path).ok()?;
    let t = t.trim();
    (!t.is_empty()).then(|| t.to_owned())
}

/// The snapshot file for revision `main`, if `refs/main` points at a snapshot that has it.
pub fn cached_file(repo_dir: &Path, file: &str) -> Option<PathBuf> {
    let commit = fs::read_to_string(repo_dir.join("refs").join("main")).ok()?;
    let commit = commit.trim();
    if !safe_component(commit) {
        return None;
    }
    let p = repo_dir.join("snapshots").join(commit).join(file);
    // `is_file` follows the symlink: a dangling link (blob deleted) counts as absent.
    p.is_file().then_some(p)
}

/// A name usable as one path component of the cache.
fn safe_component(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// huggingface_hub's `_normalize_etag`: drop a weak `W/` prefix and the quotes.
pub fn normalize_etag(etag: &str) -> String {
    let e = etag.trim();
    let e = e.strip_prefix("W/").unwrap_or(e);
    e.trim_matches('"').to_owned()
}

/// Resolve a `Location` header against the URL that returned it.
fn join_url(base: &str, loc: &str) -> String {
    if loc.contains("://") {
        return loc.to_owned();
    }
    let (scheme, rest) = base.split_once("://").unwrap_or(("https", base));
    if let Some(r) = loc.strip_prefix("//") {
        return format!("{scheme}://{r}");
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if loc.starts_with('/') {
        return format!("{scheme}://{authority}{loc}");
    }
    let path = path.split(['?', '#']).next().unwrap_or("/");
    let dir = &path[..path.rfind('/').map_or(1, |i| i + 1)];
    format!("{scheme}://{authority}{dir}{loc}")
}

/// Scheme and authority (`https://host:port`): the origin the token is bound to. A redirect to
/// another host, port or scheme (https → http would send it in clear) drops the token.
fn origin_of(url: &str) -> &str {
    let start = url.find("://").map_or(0, |i| i + 3);
    let end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| start + i);
    &url[..end]
}

/// Removes a partial download unless disarmed.
struct TempGuard(Option<PathBuf>);

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_file(p);
        }
    }
}

fn header<B>(resp: &ureq::http::Response<B>, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// Download `url` into `repo_dir`'s blobs and link it from the snapshot. Errors are reasons
/// (the caller adds the URL and advice).
fn fetch(
    url: &str,
    repo_dir: &Path,
    file: &str,
    show_progress: bool,
) -> std::result::Result<PathBuf, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        // Redirects are followed by hand: the hub's own response carries X-Repo-Commit and the
        // file's ETag; the CDN's final response does not.
        .max_redirects(0)
        .max_redirects_will_error(false)
        .http_status_as_error(false)
        // Content-Length must be the file's size (and the blob must be the file's bytes).
        .accept_encoding("identity")
        .user_agent(concat!("scorecam-gpu/", env!("CARGO_PKG_VERSION")))
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .timeout_per_read(Some(Duration::from_secs(120)))
        .build()
        .into();
    let token = hf_token();
    let origin = origin_of(url).to_owned();

    let mut current = url.to_owned();
    let mut commit: Option<String> = None;
    let mut etag: Option<String> = None;
    let mut resp = None;
    for _ in 0..=10 {
        let mut req = agent.get(&current);
        // The token goes to the hub's origin only: never to the CDN it redirects to, nor over a
        // redirect to plain http.
        if let Some(t) = token.as_ref().filter(|_| origin_of(&current) == origin) {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let r = req.call().map_err(|e| format!("request failed: {e}"))?;
        if commit.is_none() {
            if let Some(c) = header(&r, "x-repo-commit") {
                commit = Some(c);
                etag = header(&r, "x-linked-etag").or_else(|| header(&r, "etag"));
            }
        }
        let status = r.status().as_u16();
        match status {
            200 => {
                resp = Some(r);
                break;
            }
            301 | 302 | 303 | 307 | 308 => {
                let loc = header(&r, "location")
                    .ok_or_else(|| format!("HTTP {status} redirect without a Location header"))?;
                current = join_url(&current, &loc);
            }
            401 | 403 => {
                return Err(format!(
                    "HTTP {status} {} (the repository may be gated or private: set HF_TOKEN)",
                    r.status().canonical_reason().unwrap_or("")
                ))
            }
            404 => return Err("HTTP 404 Not Found (wrong repository or file name?)".into()),
            _ => {
                return Err(format!(
                    "HTTP {status} {}",
                    r.status().canonical_reason().unwrap_or("")
                ))
            }
        }
    }
    let mut resp = resp.ok_or("too many redirects")?;
    if etag.is_none() {
        etag = header(&resp, "x-linked-etag").or_else(|| header(&resp, "etag"));
    }
    let commit = commit
        .filter(|c| safe_component(c))
        .unwrap_or_else(|| "main".into());
    let etag = etag
        .map(|e| normalize_etag(&e))
        .filter(|e| safe_component(e))
        .unwrap_or_else(|| {
            let f: String = file
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            format!("noetag-{commit}-{f}")
        });
    let total = resp.body().content_length();

    let cache_err = |what: &str, p: &Path, e: std::io::Error| {
        format!(
            "cannot {what} {} in the Hugging Face cache: {e} (set HF_HUB_CACHE to a writable directory)",
            p.display()
        )
    };
    let blobs = repo_dir.join("blobs");
    fs::create_dir_all(&blobs).map_err(|e| cache_err("create", &blobs, e))?;
    let blob = blobs.join(&etag);

    let have_blob = fs::metadata(&blob)
        .map(|m| m.is_file() && total.is_none_or(|n| m.len() == n))
        .unwrap_or(false);
    if !have_blob {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let tmp = blobs.join(format!(
            "{etag}.{}.{nanos}.scorecam.incomplete",
            std::process::id()
        ));
        let mut guard = TempGuard(Some(tmp.clone()));
        let out = fs::File::create(&tmp).map_err(|e| cache_err("create", &tmp, e))?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, out);

        let bar = match (show_progress, total) {
            (true, Some(n)) => {
                let bar = indicatif::ProgressBar::new(n);
                if let Ok(style) = indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                ) {
                    bar.set_style(style.progress_chars("=> "));
                }
                bar.set_message(format!("downloading {file}"));
                Some(bar)
            }
            _ => None,
        };
        let mut reader = resp.body_mut().as_reader();
        let mut buf = vec![0u8; 1 << 20];
        let mut got: u64 = 0;
        let res: std::result::Result<(), String> = loop {
            match reader.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    if let Err(e) = out.write_all(&buf[..n]) {
                        break Err(cache_err("write", &tmp, e));
                    }
                    got += n as u64;
                    if let Some(b) = &bar {
                        b.inc(n as u64);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    break Err(format!(
                        "connection lost after {got} of {} bytes: {e}",
                        total.map_or("?".into(), |n| n.to_string())
                    ))
                }
            }
        };
        if let Some(b) = &bar {
            b.finish_and_clear();
        }
        res?;
        if let Some(n) = total.filter(|&n| n != got) {
            return Err(format!(
                "short read: got {got} of {n} bytes (Content-Length)"
            ));
        }
        out.flush().map_err(|e| cache_err("write", &tmp, e))?;
        drop(out);
        fs::rename(&tmp, &blob).map_err(|e| cache_err("rename", &tmp, e))?;
        guard.0 = None;
    }

    let pointer = repo_dir.join("snapshots").join(&commit).join(file);
    let parent = pointer.parent().unwrap_or(repo_dir);
    fs::create_dir_all(parent).map_err(|e| cache_err("create", parent, e))?;
    if fs::symlink_metadata(&pointer).is_ok() {
        fs::remove_file(&pointer).map_err(|e| cache_err("replace", &pointer, e))?;
    }
    link_blob(&blob, &etag, &pointer, file).map_err(|e| cache_err("link", &pointer, e))?;
    let refs = repo_dir.join("refs");
    fs::create_dir_all(&refs).map_err(|e| cache_err("create", &refs, e))?;
    fs::write(refs.join("main"), &commit).map_err(|e| cache_err("write", &refs.join("main"), e))?;
    Ok(pointer)
}

/// `snapshots/<commit>/<file>` → `../../blobs/<etag>` (relative, like huggingface_hub); a hard
/// link or a copy where symlinks are not available.
fn link_blob(blob: &Path, etag: &str, pointer: &Path, file: &str) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let ups = 2 + file.matches('/').count();
        let mut target = PathBuf::new();
        for _ in 0..ups {
            target.push("..");
        }
        target.push("blobs");
        target.push(etag);
        if std::os::unix::fs::symlink(&target, pointer).is_ok() {
            return Ok(());
        }
    }
    #[cfg(not(unix))]
    let _ = (etag, file);
    fs::hard_link(blob, pointer).or_else(|_| fs::copy(blob, pointer).map(|_| ()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_and_urls() {
        assert_eq!(normalize_etag("\"abc123\""), "abc123");
        assert_eq!(normalize_etag("W/\"abc\""), "abc");
        assert_eq!(normalize_etag("plain"), "plain");
        assert_eq!(
            repo_folder_name("timm/vgg16.tv_in1k"),
            "models--timm--vgg16.tv_in1k"
        );
        assert_eq!(
            join_url("https://h.co/a/b/c", "https://cdn.x/y"),
            "https://cdn.x/y"
        );
        assert_eq!(join_url("https://h.co/a/b/c", "/z"), "https://h.co/z");
        assert_eq!(
            join_url("http://h.co:8/a/b/c?q=1", "d"),
            "http://h.co:8/a/b/d"
        );
        assert_eq!(join_url("https://h.co/a", "//cdn/z"), "https://cdn/z");
        assert_eq!(origin_of("http://127.0.0.1:80/x/y"), "http://127.0.0.1:80");
        assert_eq!(origin_of("https://h.co?q"), "https://h.co");
        assert_ne!(origin_of("https://h.co/a"), origin_of("http://h.co/a"));
        assert!(safe_component("0123abc"));
        assert!(!safe_component("../x"));
        assert!(!safe_component(""));
        assert!(!safe_component(".."));
    }
}
