//! The model's own judgement of a finished text, for ranking candidates (best-of-k): how surely the
//! denoiser gives the text back from noised copies of it. At each of a few fixed noise levels the
//! text's embedding is noised, denoised once, and rounded; the score is the log-probability the
//! rounding head gives the text's words, summed over the canvas and averaged over the levels — a
//! Monte-Carlo reconstruction term of the model's variational bound, in nats per sequence like the
//! guides' log p(c | x), so that the two add up to a score of p(text) · p(c | text).
//!
//! A word the model did not mean (the second "italian" of "italian italian") is one it does not give
//! back from a noised copy: it costs more here than a word the context supports.

use candle_core::{Tensor, D};

use rand::rngs::StdRng;

use super::sampler::normal_noise;
use super::schedule::NoiseSchedule;
use crate::model::ops::token_cross_entropy;
use crate::model::DiffusionLm;
use crate::Result;

/// Noise levels as fractions of the training schedule: low enough that the text is still there to
/// read, high enough that the denoiser must rely on its own prior for what it cannot see.
const LEVELS: [f64; 4] = [0.1, 0.2, 0.3, 0.4];

/// log p(ids | noised ids) per sequence (higher is more the model's own text), for ids [B, L]
/// (START … END PAD…, the whole canvas) under the training `schedule`. Sequence b draws its noise
/// from `rngs[b]`, so its score does not depend on its batch.
pub fn reconstruction_log_prob(
    model: &DiffusionLm,
    schedule: &NoiseSchedule,
    ids: &Tensor,
    rngs: &mut [StdRng],
) -> Result<Vec<f32>> {
    let (b, l) = ids.dims2()?;
    let d = model.config.embed_dim;
    let device = ids.device();
    let x0 = model.embed(ids)?;
    let mut total = vec![0f32; b];
    let last = schedule.alphas_cumprod.len() - 1;
    for level in LEVELS {
        let t = ((level * last as f64).round() as usize).min(last);
        let abar = schedule.alphas_cumprod[t];
        let noise = normal_noise(rngs, l, d, device)?;
        let x_t = ((&x0 * abar.sqrt())? + (noise * (1.0 - abar).sqrt())?)?;
        let t_in = Tensor::from_vec(vec![t as f32; b], b, device)?;
        let x0_hat = model.predict_x0(&x_t, &t_in, None)?;
        let logits = model.logits(&x0_hat)?;
        let vocab = logits.dim(D::Minus1)?;
        let nll = token_cross_entropy(&logits.reshape((b * l, vocab))?, &ids.flatten_all()?)?
            .reshape((b, l))?
            .sum(1)?
            .to_vec1::<f32>()?;
        for (acc, v) in total.iter_mut().zip(nll) {
            *acc -= v / LEVELS.len() as f32;
        }
    }
    Ok(total)
}
