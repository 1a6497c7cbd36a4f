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

    /// The requested backend cannot be used (no driver, library or device; NVRTC failure, ...).
    #[error("CUDA backend unavailable: {0}")]
    CudaUnavailable(String),

    /// A CUDA call failed while running.
    #[error("CUDA error in {op}: {msg}")]
    Cuda { op: String, msg: String },

    /// The device ran out of memory even at the smallest batch.
    #[error("out of GPU memory: {0}")]
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
            msg: msg.to_string(),
        }
    }

    pub fn output(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Error::Output {
            path: path.into(),
            msg: msg.to_string(),
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
