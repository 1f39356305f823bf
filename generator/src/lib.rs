//! dlm-generator: Diffusion-LM (Li et al. 2022) in candle.
//!
//! - [`model`]: config, denoiser transformer, embedding and rounding head.
//! - [`diffusion`]: noise schedules, respacing and the samplers (DDPM, DDIM, clamping).
//! - [`text`]: word-level tokenizer (Hugging Face `tokenizer.json`) and the E2E corpus reader.
//! - [`train`]: end-to-end loss, optimizer, EMA, checkpoints, progress, loss plot.
//! - [`eval`]: fluency measure (word 4-gram Kneser-Ney language model).
//! - [`device`]: `--device auto|cpu|cuda:N` (CUDA only with the `cuda` feature).

pub mod bench;
pub mod device;
pub mod diffusion;
pub mod engine;
pub mod error;
pub mod eval;
pub mod guidance;
pub mod model;
pub mod parallel;
pub mod runtime;
pub mod server;
pub mod text;
pub mod train;

pub use error::{Error, Result};
