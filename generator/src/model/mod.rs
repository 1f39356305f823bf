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
pub mod teacher_lm;
pub mod transformer;

pub use config::ModelConfig;
pub use diffusion_lm::{DiffusionLm, LoadedModel};

/// Helpers for the fused kernels' tests.
#[cfg(test)]
mod testing {
    use candle_core::Tensor;

    /// max |a − b| over all elements.
    pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }
}
