//! scorecam-gpu: Score-CAM explanations for VGG-family classifiers, on CUDA or the CPU.
//!
//! Data flows one way, one file per stage:
//! `image` (decode, resize) → `backend::preprocess` → `backend::forward` (base: logits +
//! activations) → `backend::masked_inputs` → `backend::forward` (masked, batched) →
//! `backend::scores` → weights → `backend::combine` → `image` (PNG/NPY files). `cam` drives it.

pub mod backend;
pub mod bench;
pub mod cam;
pub mod engine;
pub mod error;
pub mod hub;
pub mod image;
pub mod job;
pub mod model;
pub mod weights;

pub use error::{Error, Result};
pub use model::Vgg;
