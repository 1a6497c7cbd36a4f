//! One error type for the whole crate. The binary maps each variant to a message and an exit code
//! (see [`Error::exit_code`]); every message names the thing that was wrong (file, tensor, option).

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad command-line usage that clap could not catch (conflicting or out-of-range options).
    #[error("{0}")]
    Usage(String),

    /// The weights file is unusable. `tensor` names the tensor at fault when there is one.
    #[error("weights {path}: {}{msg}", tensor.as_ref().map(|t| format!("tensor `{t}`: ")).unwrap_or_default())]
    Weights {
        path: String,
        tensor: Option<String>,
        msg: String,
    },

    /// No weights could be found or fetched.
    #[error("{0}")]
    WeightsUnavailable(String),

    /// An input image could not be read or decoded.
    #[error("image {path}: {msg}")]
    Image { path: PathBuf, msg: String },

    /// An output file or directory could not be written.
    #[error("output {path}: {msg}")]
    Output { path: PathBuf, msg: String },

    /// The output file system is full (ENOSPC, EDQUOT). The job stops; `--resume` continues it
    /// once there is space.
    #[error("output {path}: {msg}: the output disk is full; the job stopped (free space, then rerun with --resume)")]
    DiskFull { path: PathBuf, msg: String },

    /// The requested backend cannot be used (no driver, library or device; NVRTC failure, ...).
    #[error("CUDA backend unavailable: {0}")]
    CudaUnavailable(String),

    /// A CUDA call failed while running.
    #[error("CUDA error in {op}: {msg}")]
    Cuda { op: String, msg: String },

    /// The backend's memory (GPU memory on CUDA, host memory on the CPU) cannot hold the plan,
    /// even at the smallest batch. The message says which memory.
    #[error("out of memory: {0}")]
    OutOfMemory(String),

    /// A shape or argument that an op cannot accept: a bug or an unsupported model/layer.
    #[error("{0}")]
    Invalid(String),

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Exit codes: 2 for usage, weights and backend-selection errors (nothing could run),
    /// 1 for failures while running.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Usage(_)
            | Error::Weights { .. }
            | Error::WeightsUnavailable(_)
            | Error::CudaUnavailable(_) => 2,
            _ => 1,
        }
    }

    pub fn weights(path: impl Into<String>, tensor: Option<&str>, msg: impl Into<String>) -> Self {
        Error::Weights {
            path: path.into(),
            tensor: tensor.map(str::to_owned),
            msg: msg.into(),
        }
    }

    pub fn image(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Error::Image {
            path: path.into(),
            msg: one_line(&msg.to_string()),
        }
    }

    pub fn output(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Error::Output {
            path: path.into(),
            msg: one_line(&msg.to_string()),
        }
    }

    pub fn cuda(op: impl Into<String>, msg: impl std::fmt::Display) -> Self {
        Error::Cuda {
            op: op.into(),
            msg: msg.to_string(),
        }
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// A message on one line: decoders' and the OS's messages may span lines (or end in a newline),
/// which would break a line-oriented log or a one-line JSON error. Lines are trimmed and joined
/// with "; ".
pub fn one_line(msg: &str) -> String {
    if !msg.contains(['\n', '\r']) {
        return msg.trim().to_owned();
    }
    msg.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}
