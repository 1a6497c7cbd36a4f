//! Finding and downloading weights: a tiny HTTP/1.1 server on 127.0.0.1 plays the Hugging Face
//! hub (redirect to a "CDN", 404, 401, a connection that closes early), `HF_ENDPOINT` points at it
//! and the cache lives in a temporary directory. The CDN is another host, 127.0.0.2 (all of
//! 127.0.0.0/8 is loopback), on the same port where it is free: only the host name tells the two
//! apart, as between huggingface.co and its CDN, so the test sees where the token goes.
//!
//! Environment variables are process-global: every scenario runs inside one test, in order,
//! behind a lock, and the environment is restored afterwards.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use scorecam_gpu::hub::{self, DEFAULT_FILE, DEFAULT_REPO};
use scorecam_gpu::model::Vgg;
use scorecam_gpu::{weights, Error};

static ENV_LOCK: Mutex<()> = Mutex::new(());

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const COMMIT2: &str = "fedcba9876543210fedcba9876543210fedcba98";
const LINKED_ETAG: &str = "6d2c8e6b5c2d7a4f9e8b1a0c3d5e7f9a1b3c5d7e9f0a2b4c6d8e0f1a3b5c7d9e";
const TOKEN: &str = "hf_test_token_123";

const VARS: &[&str] = &[
    "HF_ENDPOINT",
    "HF_HOME",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_HUB_OFFLINE",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_TOKEN_PATH",
    "XDG_CACHE_HOME",
    "SCORECAM_WEIGHTS",
];

/// Restores the variables in [`VARS`] when dropped.
struct EnvGuard(Vec<(&'static str, Option<std::ffi::OsString>)>);

impl EnvGuard {
    fn new() -> Self {
        EnvGuard(VARS.iter().map(|&k| (k, std::env::var_os(k))).collect())
    }
}

impl Drop for EnvGuard {
    fn drop(&mut self) {
        for (k, v) in &self.0 {
            match v {
                Some(v) => std::env::set_var(k, v),
                None => std::env::remove_var(k),
            }
        }
    }
}

const HUB_IP: &str = "127.0.0.1";
const CDN_IP: &str = "127.0.0.2";

/// One request as the server saw it.
#[derive(Clone, Debug, PartialEq)]
struct Request {
    /// The address the connection was made to: [`HUB_IP`] or [`CDN_IP`].
    ip: String,
    path: String,
    /// The `Authorization` header, if any.
    auth: Option<String>,
}

type RequestLog = Mutex<Vec<Request>>;

struct Server {
    /// `http://127.0.0.1:PORT`, the hub.
    base: String,
    conns: Arc<AtomicUsize>,
    requests: Arc<RequestLog>,
}

impl Server {
    fn conns(&self) -> usize {
        self.conns.load(Ordering::SeqCst)
    }
}

fn start_server(body: Vec<u8>) -> Server {
    let hub = TcpListener::bind((HUB_IP, 0)).unwrap();
    let port = hub.local_addr().unwrap().port();
    let cdn = TcpListener::bind((CDN_IP, port))
        .or_else(|_| TcpListener::bind((CDN_IP, 0)))
        .unwrap_or_else(|e| panic!("cannot listen on {CDN_IP} (loopback): {e}"));
    let base = format!("http://{}", hub.local_addr().unwrap());
    let cdn_base = format!("http://{}", cdn.local_addr().unwrap());
    let conns = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(Mutex::new(Vec::new()));
    let body = Arc::new(body);
    for listener in [hub, cdn] {
        let (c, r, body, cdn) = (
            conns.clone(),
            requests.clone(),
            body.clone(),
            cdn_base.clone(),
        );
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                c.fetch_add(1, Ordering::SeqCst);
                let (r, body, cdn) = (r.clone(), body.clone(), cdn.clone());
                std::thread::spawn(move || serve(stream, &r, &body, &cdn));
            }
        });
    }
    Server {
        base,
        conns,
        requests,
    }
}

fn serve(mut s: TcpStream, log: &RequestLog, body: &[u8], cdn: &str) {
    let ip = s
        .local_addr()
        .map(|a| a.ip().to_string())
        .unwrap_or_default();
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&req).into_owned();
    let mut lines = text.lines();
    let path = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("")
        .to_owned();
    let auth = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("authorization"))
        .map(|(_, v)| v.trim().to_owned());
    log.lock().unwrap().push(Request {
        ip: ip.clone(),
        path: path.clone(),
        auth: auth.clone(),
    });

    let ok = |extra: &str| {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n\
             {extra}Connection: close\r\n\r\n",
            body.len()
        )
    };
    let status =
        |code: &str| format!("HTTP/1.1 {code}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    let redirect = |code: &str, location: &str, extra: &str| {
        format!(
            "HTTP/1.1 {code}\r\nLocation: {location}\r\n{extra}Content-Length: 0\r\n\
             Connection: close\r\n\r\n"
        )
    };
    let (head, payload): (String, &[u8]) = match path.as_str() {
        // the hub answers with a redirect to the CDN, carrying the commit and the file's (LFS)
        // etag
        "/timm/vgg16.tv_in1k/resolve/main/model.safetensors" if ip == HUB_IP => (
            redirect(
                "302 Found",
                &format!("{cdn}/cdn/blob?sig=abc"),
                &format!(
                    "X-Repo-Commit: {COMMIT}\r\nX-Linked-Etag: \"{LINKED_ETAG}\"\r\n\
                     ETag: \"redirect-etag\"\r\n"
                ),
            ),
            b"",
        ),
        // the CDN (only there): its own ETag must not name the blob
        "/cdn/blob?sig=abc" if ip == CDN_IP => (ok("ETag: \"cdn-etag\"\r\n"), body),
        // a renamed repository: a relative redirect on the hub itself, to a gated one
        "/test/moved/resolve/main/model.safetensors" => (
            redirect(
                "307 Temporary Redirect",
                "/test/private/resolve/main/model.safetensors",
                "",
            ),
            b"",
        ),
        "/test/direct/resolve/main/model.safetensors" => (
            ok(&format!(
                "X-Repo-Commit: {COMMIT2}\r\nETag: W/\"weak-etag-1\"\r\n"
            )),
            body,
        ),
        "/test/noheaders/resolve/main/model.safetensors" => (ok(""), body),
        "/test/private/resolve/main/model.safetensors"
            if auth.as_deref() == Some(&format!("Bearer {TOKEN}")) =>
        {
            (
                ok(&format!(
                    "X-Repo-Commit: {COMMIT2}\r\nETag: \"private\"\r\n"
                )),
                body,
            )
        }
        "/test/private/resolve/main/model.safetensors" => (status("401 Unauthorized"), b""),
        // promises the whole body, sends 100 bytes, closes
        "/test/short/resolve/main/model.safetensors" => (
            ok(&format!("X-Repo-Commit: {COMMIT2}\r\nETag: \"short\"\r\n")),
            &body[..100],
        ),
        _ => (status("404 Not Found"), b""),
    };
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(payload);
    let _ = s.flush();
    let _ = s.shutdown(std::net::Shutdown::Both);
}

/// Every file (not directory) under `dir`, recursively; symlinks count as files.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn unavailable(e: Error) -> String {
    let msg = e.to_string();
    println!("{msg}\n");
    assert!(
        matches!(e, Error::WeightsUnavailable(_)),
        "expected WeightsUnavailable, got {e:?}"
    );
    assert_eq!(e.exit_code(), 2);
    msg
}

fn assert_advice(msg: &str) {
    for needle in [
        "--weights PATH",
        "SCORECAM_WEIGHTS",
        "weights/vgg16.safetensors",
        "huggingface-cli download timm/vgg16.tv_in1k model.safetensors",
        "--random-weights SEED",
    ] {
        assert!(
            msg.contains(needle),
            "advice should mention {needle:?}: {msg}"
        );
    }
}

#[test]
fn hub_download_and_resolution() {
    let _lock = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _env = EnvGuard::new();
    for k in VARS {
        std::env::remove_var(k);
    }
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub-cache");
    std::env::set_var("HF_HOME", tmp.path().join("hf-home"));
    std::env::set_var("HF_HUB_CACHE", &cache);

    // the served file is a real (tiny) model, so what lands in the cache must load
    let model_file = tmp.path().join("tiny.safetensors");
    weights::save(
        &Vgg::random_from_config(&[4, 0, 8, 0], &[6, 5], 1, 32),
        &model_file,
        "F16",
    )
    .unwrap();
    let body = std::fs::read(&model_file).unwrap();
    let server = start_server(body.clone());
    std::env::set_var("HF_ENDPOINT", format!("{}/", server.base)); // trailing slash tolerated

    download_scenarios(&server, &cache, &body);
    failure_scenarios(&server, &cache, &body);
    resolution_order(&server, tmp.path(), &cache);
}

fn download_scenarios(server: &Server, cache: &Path, body: &[u8]) {
    let repo_dir = cache.join("models--timm--vgg16.tv_in1k");

    // offline with an empty cache: no connection, an error that says how to get the file
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let msg = unavailable(hub::hub_download(DEFAULT_REPO, DEFAULT_FILE, false).unwrap_err());
    assert!(
        msg.contains("HF_HUB_OFFLINE") && msg.contains("timm/vgg16.tv_in1k"),
        "{msg}"
    );
    assert_advice(&msg);
    for v in ["true", "YES"] {
        std::env::set_var("HF_HUB_OFFLINE", v);
        unavailable(hub::hub_download(DEFAULT_REPO, DEFAULT_FILE, false).unwrap_err());
    }
    assert_eq!(server.conns(), 0, "offline mode must not connect");

    // download: hub redirect → CDN; the blob is named by the hub's X-Linked-Etag
    std::env::set_var("HF_HUB_OFFLINE", "0");
    std::env::set_var("HF_TOKEN", TOKEN);
    let p = hub::hub_download(DEFAULT_REPO, DEFAULT_FILE, true).unwrap();
    std::env::remove_var("HF_TOKEN");
    assert_eq!(
        p,
        repo_dir
            .join("snapshots")
            .join(COMMIT)
            .join("model.safetensors")
    );
    assert_eq!(server.conns(), 2, "one request to the hub, one to the CDN");
    // The token goes to the hub and not to the CDN, a different host.
    assert_eq!(
        requests_since(server, 0),
        [
            Request {
                ip: HUB_IP.into(),
                path: "/timm/vgg16.tv_in1k/resolve/main/model.safetensors".into(),
                auth: Some(format!("Bearer {TOKEN}")),
            },
            Request {
                ip: CDN_IP.into(),
                path: "/cdn/blob?sig=abc".into(),
                auth: None,
            },
        ],
        "the token goes to the hub, not to the CDN"
    );
    let blob = repo_dir.join("blobs").join(LINKED_ETAG);
    assert_eq!(std::fs::read(&blob).unwrap(), body);
    assert_eq!(std::fs::read(&p).unwrap(), body);
    #[cfg(unix)]
    assert_eq!(
        std::fs::read_link(&p).unwrap(),
        Path::new("../../blobs").join(LINKED_ETAG),
        "relative symlink, as huggingface_hub makes it"
    );
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main"))
            .unwrap()
            .trim(),
        COMMIT
    );
    let mut files = files_under(&repo_dir);
    files.sort();
    assert_eq!(
        files.len(),
        3,
        "blob, snapshot link, ref; no temp file left: {files:?}"
    );
    let m = weights::load(&p).unwrap();
    assert_eq!(m.num_classes(), 5);

    // cached: no connection, online or offline
    assert_eq!(
        hub::hub_download(DEFAULT_REPO, DEFAULT_FILE, false).unwrap(),
        p
    );
    std::env::set_var("HF_HUB_OFFLINE", "1");
    assert_eq!(
        hub::hub_download(DEFAULT_REPO, DEFAULT_FILE, false).unwrap(),
        p
    );
    std::env::remove_var("HF_HUB_OFFLINE");
    assert_eq!(
        server.conns(),
        2,
        "a cached file must not touch the network"
    );

    // a blob deleted behind the cache's back (dangling link) is fetched again
    std::fs::remove_file(&blob).unwrap();
    assert_eq!(
        hub::hub_download(DEFAULT_REPO, DEFAULT_FILE, false).unwrap(),
        p
    );
    assert_eq!(std::fs::read(&p).unwrap(), body);
    assert_eq!(server.conns(), 4);

    // no redirect, weak ETag: quotes and W/ stripped
    let p = hub::hub_download("test/direct", "model.safetensors", false).unwrap();
    let dir = cache.join("models--test--direct");
    assert_eq!(
        p,
        dir.join("snapshots")
            .join(COMMIT2)
            .join("model.safetensors")
    );
    assert_eq!(std::fs::read(dir.join("blobs/weak-etag-1")).unwrap(), body);
    assert_eq!(
        std::fs::read_to_string(dir.join("refs/main")).unwrap(),
        COMMIT2
    );

    // neither X-Repo-Commit nor ETag: a fallback that still round-trips through refs/main
    let p = hub::hub_download("test/noheaders", "model.safetensors", false).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), body);
    let before = server.conns();
    assert_eq!(
        hub::hub_download("test/noheaders", "model.safetensors", false).unwrap(),
        p
    );
    assert_eq!(server.conns(), before);

    // gated repository: 401 without a token, fine with HF_TOKEN
    let url = format!(
        "{}/test/private/resolve/main/model.safetensors",
        server.base
    );
    let msg =
        unavailable(hub::hub_download("test/private", "model.safetensors", false).unwrap_err());
    assert!(
        msg.contains(&url) && msg.contains("401") && msg.contains("HF_TOKEN"),
        "{msg}"
    );
    std::env::set_var("HF_TOKEN", TOKEN);
    let p = hub::hub_download("test/private", "model.safetensors", false).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), body);

    // a redirect within the hub (a renamed repository) keeps the token: same host
    let before = server.requests.lock().unwrap().len();
    let p = hub::hub_download("test/moved", "model.safetensors", false).unwrap();
    std::env::remove_var("HF_TOKEN");
    assert_eq!(std::fs::read(&p).unwrap(), body);
    let bearer = Some(format!("Bearer {TOKEN}"));
    assert_eq!(
        requests_since(server, before),
        [
            Request {
                ip: HUB_IP.into(),
                path: "/test/moved/resolve/main/model.safetensors".into(),
                auth: bearer.clone(),
            },
            Request {
                ip: HUB_IP.into(),
                path: "/test/private/resolve/main/model.safetensors".into(),
                auth: bearer,
            },
        ],
        "a redirect within the hub keeps the token"
    );
    // No request of this test sent the token to the CDN.
    let reqs = requests_since(server, 0);
    assert!(reqs.iter().any(|r| r.ip == CDN_IP));
    assert!(
        reqs.iter().all(|r| r.ip != CDN_IP || r.auth.is_none()),
        "{reqs:?}"
    );
}

/// The requests the server got from the `from`-th on.
fn requests_since(server: &Server, from: usize) -> Vec<Request> {
    server.requests.lock().unwrap()[from..].to_vec()
}

fn failure_scenarios(server: &Server, cache: &Path, body: &[u8]) {
    // 404: the URL and the status in the message, nothing written
    let url = format!(
        "{}/test/missing/resolve/main/model.safetensors",
        server.base
    );
    let msg =
        unavailable(hub::hub_download("test/missing", "model.safetensors", false).unwrap_err());
    assert!(msg.contains(&url) && msg.contains("404"), "{msg}");
    assert_advice(&msg);
    assert_eq!(
        files_under(&cache.join("models--test--missing")),
        Vec::<PathBuf>::new()
    );

    // the connection closes after 100 of the promised bytes: an error, no partial file
    let url = format!("{}/test/short/resolve/main/model.safetensors", server.base);
    let msg = unavailable(hub::hub_download("test/short", "model.safetensors", true).unwrap_err());
    assert!(msg.contains(&url), "{msg}");
    assert!(
        msg.contains(&body.len().to_string()),
        "the message gives the expected size: {msg}"
    );
    assert_eq!(
        files_under(&cache.join("models--test--short")),
        Vec::<PathBuf>::new()
    );

    // connection refused
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    std::env::set_var("HF_ENDPOINT", format!("http://{addr}"));
    let msg =
        unavailable(hub::hub_download("test/refused", "model.safetensors", false).unwrap_err());
    assert!(
        msg.contains(&format!(
            "http://{addr}/test/refused/resolve/main/model.safetensors"
        )),
        "{msg}"
    );
    assert_advice(&msg);
    assert_eq!(
        files_under(&cache.join("models--test--refused")),
        Vec::<PathBuf>::new()
    );
    std::env::set_var("HF_ENDPOINT", &server.base);
}

fn resolution_order(server: &Server, tmp: &Path, cache: &Path) {
    let cached = cache
        .join("models--timm--vgg16.tv_in1k/snapshots")
        .join(COMMIT)
        .join("model.safetensors");
    let explicit = tmp.join("explicit.safetensors");
    let from_env = tmp.join("from-env.safetensors");
    let base = tmp.join("project");
    let local = base.join("weights/vgg16.safetensors");
    for p in [&explicit, &from_env, &local] {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"x").unwrap();
    }
    let conns = server.conns();
    std::env::set_var("SCORECAM_WEIGHTS", &from_env);

    // explicit > $SCORECAM_WEIGHTS > base/weights/vgg16.safetensors > cache
    assert_eq!(
        hub::resolve_weights_in(&base, Some(&explicit), false).unwrap(),
        explicit
    );
    assert_eq!(
        hub::resolve_weights_in(&base, None, false).unwrap(),
        from_env
    );
    std::env::set_var("SCORECAM_WEIGHTS", "");
    assert_eq!(hub::resolve_weights_in(&base, None, false).unwrap(), local);
    std::env::remove_var("SCORECAM_WEIGHTS");
    assert_eq!(hub::resolve_weights_in(&base, None, false).unwrap(), local);
    let empty = tmp.join("empty-project");
    assert_eq!(
        hub::resolve_weights_in(&empty, None, false).unwrap(),
        cached
    );
    assert_eq!(server.conns(), conns, "the cached default needs no network");

    // a given path must exist: no silent fallback to the next source
    let missing = tmp.join("nope.safetensors");
    let e = hub::resolve_weights_in(&base, Some(&missing), false).unwrap_err();
    assert!(matches!(e, Error::Weights { .. }), "{e:?}");
    assert!(
        e.to_string().contains("nope.safetensors") && e.to_string().contains("--weights"),
        "{e}"
    );
    let e = hub::resolve_weights_in(&base, Some(tmp), false).unwrap_err();
    assert!(e.to_string().contains("not a regular file"), "{e}");
    std::env::set_var("SCORECAM_WEIGHTS", &missing);
    let e = hub::resolve_weights_in(&base, None, false).unwrap_err();
    assert!(
        e.to_string().contains("nope.safetensors") && e.to_string().contains("SCORECAM_WEIGHTS"),
        "{e}"
    );
    std::env::remove_var("SCORECAM_WEIGHTS");

    // nothing local, nothing cached, offline: the advice
    std::env::set_var("HF_HUB_CACHE", tmp.join("empty-cache"));
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let msg = unavailable(hub::resolve_weights_in(&empty, None, false).unwrap_err());
    assert_advice(&msg);
    std::env::remove_var("HF_HUB_OFFLINE");

    // cache location: HF_HUB_CACHE, else HF_HOME/hub, else XDG_CACHE_HOME, else ~/.cache
    std::env::set_var("HF_HUB_CACHE", cache);
    assert_eq!(hub::hub_cache_dir().unwrap(), cache);
    std::env::remove_var("HF_HUB_CACHE");
    std::env::set_var("HF_HOME", tmp.join("hh"));
    assert_eq!(hub::hub_cache_dir().unwrap(), tmp.join("hh/hub"));
    std::env::remove_var("HF_HOME");
    std::env::set_var("XDG_CACHE_HOME", tmp.join("xdg"));
    assert_eq!(
        hub::hub_cache_dir().unwrap(),
        tmp.join("xdg/huggingface/hub")
    );
    std::env::remove_var("XDG_CACHE_HOME");
    if let Some(home) = std::env::var_os("HOME") {
        assert_eq!(
            hub::hub_cache_dir().unwrap(),
            Path::new(&home).join(".cache/huggingface/hub")
        );
    }
    assert_eq!(server.conns(), conns);
}
