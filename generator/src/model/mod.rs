//! The Diffusion-LM network: word embedding E, the x0-predicting denoiser, and the rounding head
//! (logits x0·Eᵀ + b, tied to E). One directory holds a model: `config.json`, `model.safetensors`,
//! `tokenizer.json`.

pub mod attention;
pub mod config;
pub mod denoiser;
pub mod diffusion_lm;
pub mod init;
pub mod layers;
mod matmul;
pub mod ops;

pub use config::ModelConfig;
pub use diffusion_lm::{DiffusionLm, LoadedModel};
