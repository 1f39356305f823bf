//! One training step's gradients, computed data-parallel: the batch is split into shards, each shard
//! runs forward and backward on its own OS thread with single-threaded tensor math, and the shard
//! gradients are averaged. candle runs element-wise ops on one core only, so this keeps every core
//! busy for the whole step instead of for the matrix products alone.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use rand::rngs::StdRng;

use super::loss::diffusion_loss;
use crate::diffusion::NoiseSchedule;
use crate::model::DiffusionLm;
use crate::parallel::{run_sharded, split};
use crate::Result;

/// Loss terms (batch means) and the gradients of the total.
pub struct StepGradients {
    pub mse: f64,
    pub prior: f64,
    pub rounding: f64,
    pub grads: GradStore,
}

/// One training batch.
pub struct StepBatch<'a> {
    /// Token ids [B, L].
    pub ids: &'a Tensor,
    /// A training timestep per sequence.
    pub t: &'a [usize],
    /// A random stream per sequence (noise), so that shards draw what one thread would.
    pub rngs: &'a mut [StdRng],
    /// Train the self-conditioned pass this step (the trainer flips a coin per step).
    pub self_condition: bool,
}

/// Gradients of the mean loss over `batch` for the variables `vars` of `model`, computed over
/// `shards` threads.
pub fn step_gradients(
    model: &DiffusionLm,
    schedule: &NoiseSchedule,
    vars: &[(String, Var)],
    batch: StepBatch,
    shards: usize,
) -> Result<StepGradients> {
    let StepBatch {
        ids,
        t,
        rngs,
        self_condition,
    } = batch;
    let b = t.len();
    let pieces = split(b, shards);
    let mut states = Vec::with_capacity(pieces.len());
    let mut rest = rngs;
    for &piece in &pieces {
        let (head, tail) = rest.split_at_mut(piece.1);
        states.push((piece, head));
        rest = tail;
    }
    let results = run_sharded(states, |((start, len), rngs)| {
        let ids = ids.narrow(0, start, len)?;
        let losses = diffusion_loss(
            model,
            schedule,
            &ids,
            &t[start..start + len],
            rngs,
            self_condition,
        )?;
        let grads = losses.total.backward()?;
        Ok((
            losses.mse as f64,
            losses.prior as f64,
            losses.rounding as f64,
            grads,
        ))
    })?;
    // Each shard's loss is a mean over its own sequences: weight by shard size.
    let mut shard_grads = Vec::with_capacity(pieces.len());
    let (mut mse, mut prior, mut rounding) = (0f64, 0f64, 0f64);
    for ((_, len), (m, p, r, grads)) in pieces.iter().zip(results) {
        let w = *len as f64 / b as f64;
        mse += w * m;
        prior += w * p;
        rounding += w * r;
        shard_grads.push((w, grads));
    }
    let grads = weighted_sum(vars, shard_grads)?;
    Ok(StepGradients {
        mse,
        prior,
        rounding,
        grads,
    })
}

/// Σ w · gradients over the shards' stores, per variable of `vars` (shards weighted by their share
/// of the batch, so that the result is the gradient of the whole batch's mean loss).
pub fn weighted_sum(
    vars: &[(String, Var)],
    mut shard_grads: Vec<(f64, GradStore)>,
) -> Result<GradStore> {
    let mut combined: Vec<(Tensor, Tensor)> = Vec::new();
    if shard_grads.len() > 1 {
        for (_, var) in vars {
            let mut sum: Option<Tensor> = None;
            for (w, grads) in &shard_grads {
                if let Some(g) = grads.get(var.as_tensor()) {
                    let g = (g * *w)?;
                    sum = Some(match sum {
                        Some(s) => (s + g)?,
                        None => g,
                    });
                }
            }
            if let Some(g) = sum {
                combined.push((var.as_tensor().clone(), g));
            }
        }
    }
    // The first shard's store (GradStore has no public constructor) receives the sums.
    let mut grads = shard_grads.swap_remove(0).1;
    for (var, g) in combined {
        grads.insert(&var, g);
    }
    Ok(grads)
}
