//! The end-to-end Diffusion-LM objective (Li et al. 2022, eq. 2, as in their code):
//!
//!   x0 ~ N(E(w), (1−ᾱ_0) I),   x_t ~ q(x_t | x0),   x̂0 = f(x_t, t)
//!   L = ‖x̂0 − x0‖² (t > 0)  or  ‖x̂0 − E(w)‖² (t = 0)     — the denoising term
//!     + ‖√ᾱ_{T−1} x0‖²                                    — the prior term at T
//!     − log p(w | x0),  logits x0·Eᵀ + b                  — the rounding term
//!
//! Squared errors are averaged over positions and embedding dimensions, the rounding term over positions.

use candle_core::{Tensor, D};
use rand::rngs::StdRng;

use crate::diffusion::sampler::normal_noise;
use crate::diffusion::NoiseSchedule;
use crate::model::ops::cross_entropy;
use crate::model::DiffusionLm;
use crate::Result;

pub struct Losses {
    /// The differentiable total.
    pub total: Tensor,
    pub mse: f32,
    pub prior: f32,
    pub rounding: f32,
}

/// Loss of a batch of word ids [B, L] at per-sequence timesteps `t` (training-schedule units).
/// Sequence b draws its noise from `rngs[b]`, so how a batch is split never changes the draws.
pub fn diffusion_loss(
    model: &DiffusionLm,
    schedule: &NoiseSchedule,
    ids: &Tensor,
    t: &[usize],
    rngs: &mut [StdRng],
    self_condition: bool,
) -> Result<Losses> {
    let device = ids.device();
    let (b, l) = ids.dims2()?;
    let d = model.config.embed_dim;
    let column = |v: Vec<f32>| Tensor::from_vec(v, (b, 1, 1), device);
    let ac = &schedule.alphas_cumprod;

    let x0_mean = model.embed(ids)?;
    let start_noise = normal_noise(rngs, l, d, device)?;
    let step_noise = normal_noise(rngs, l, d, device)?;

    let std0 = (1.0 - ac[0]).sqrt() as f32;
    let x_start = (&x0_mean + (&start_noise * std0 as f64)?)?;
    let sqrt_ac = column(t.iter().map(|&i| ac[i].sqrt() as f32).collect())?;
    let sqrt_1m_ac = column(t.iter().map(|&i| (1.0 - ac[i]).sqrt() as f32).collect())?;
    let x_t = (x_start.broadcast_mul(&sqrt_ac)? + step_noise.broadcast_mul(&sqrt_1m_ac)?)?;

    let t_in = Tensor::from_vec(t.iter().map(|&i| i as f32).collect::<Vec<_>>(), b, device)?;
    // Self-conditioning: on the steps that use it, a first, gradient-free pass provides the estimate
    // the second pass is conditioned on (at sampling time it is the previous step's estimate).
    let previous = if self_condition && model.config.self_condition {
        Some(model.predict_x0(&x_t, &t_in, None)?.detach())
    } else {
        None
    };
    let x0_hat = model.predict_x0(&x_t, &t_in, previous.as_ref())?;
    // At t = 0 the target is the clean embedding itself; elsewhere the slightly noised x0.
    let target_noise = column(t.iter().map(|&i| if i == 0 { 0.0 } else { std0 }).collect())?;
    let target = (&x0_mean + start_noise.broadcast_mul(&target_noise)?)?;
    let mse = (x0_hat - target)?.sqr()?.mean_all()?;

    let last = ac[ac.len() - 1].sqrt();
    let prior = (&x_start * last)?.sqr()?.mean_all()?;

    let logits = model.logits(&x_start)?;
    let vocab = logits.dim(D::Minus1)?;
    let rounding = cross_entropy(&logits.reshape((b * l, vocab))?, &ids.flatten_all()?)?;

    let total = ((&mse + &prior)? + &rounding)?;
    Ok(Losses {
        mse: mse.to_scalar()?,
        prior: prior.to_scalar()?,
        rounding: rounding.to_scalar()?,
        total,
    })
}
