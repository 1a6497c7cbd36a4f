//! scorecam-gpu: Score-CAM explanations for VGG-family classifiers, on CUDA or the CPU.
//!
//! Data flows one way, one file per stage:
//! `image` (decode, resize) → `backend::preprocess` → `backend::forward` (base: logits +
//! activations) → `backend::masked_inputs` → `backend::forward` (masked, batched) →
//! `backend::scores` → weights → `backend::combine` → `image` (PNG/NPY files). `cam` drives it.
//!
//! ```
//! use std::sync::Arc;
//! use scorecam_gpu::backend::cpu::CpuBackend;
//! use scorecam_gpu::cam::{CamOptions, Explainer};
//! use scorecam_gpu::Vgg;
//!
//! // A tiny random VGG at 32×32 (use `weights::load` for a real one, `CudaBackend` on a GPU).
//! let model = Arc::new(Vgg::random_from_config(&[8, 0, 16, 0], &[10], 1, 32));
//! let image: Vec<u8> = (0..32 * 32 * 3).map(|i| (i * 7 % 251) as u8).collect(); // S×S RGB
//! let mut explainer = Explainer::new(CpuBackend::new(), model, CamOptions::default())?;
//! let explanation = explainer.explain(&[image])?.remove(0);
//! let map = &explanation.maps[0]; // the top-1 class's map, [32 × 32] in [0, 1]
//! assert_eq!(map.class, explanation.top1);
//! assert!(map.map.iter().all(|v| (0.0..=1.0).contains(v)));
//! # Ok::<(), scorecam_gpu::Error>(())
//! ```

pub mod backend;
pub mod bench;
pub mod cam;
pub mod engine;
pub mod error;
pub mod eval;
pub mod hub;
pub mod image;
pub mod job;
pub mod methods;
pub mod model;
pub mod trace;
pub mod weights;

pub use error::{Error, Result};
pub use model::Vgg;
