//! The per-step guidance loop and the final scoring, over [`Guide`](super::Guide)s: rows in, rows
//! out, every outcome per row. A guide that fails, or answers a row with a non-finite value, fails
//! the rows it steers and no other; a row whose latents go non-finite fails alone.

use std::sync::Arc;

use tokio::task::JoinSet;

use super::guide::{GuideBatch, GuideOutputs, RegisteredGuide};
use super::{GuidanceConfig, GuidanceSpace};
use crate::{Error, Result};

/// Steer towards `targets` (a value id per field of `guide`, −1 = free) with `weight`.
#[derive(Clone)]
pub struct Control {
    pub guide: Arc<RegisteredGuide>,
    pub targets: Vec<i64>,
    pub weight: f32,
}

/// One sequence to guide at one diffusion step.
pub struct GuidedRow {
    /// The sampler's proposal μ for x_{t−1}, flat [L·D]: where guidance starts and what the
    /// fluency term pulls back to.
    pub mean: Vec<f32>,
    /// The x0 estimate of this step, flat [L·D]: what the satisfaction gate reads in latent space
    /// (in estimate space it reads `estimate`).
    pub x0: Vec<f32>,
    /// The x0 estimate `mean` was built from (clamped where the request clamps), flat [L·D]:
    /// what guidance edits, and the gate reads, in [`GuidanceSpace::Estimate`].
    pub estimate: Vec<f32>,
    /// √ᾱ of the level x_{t−1} is at: how much of x0 it carries.
    pub signal: f32,
    pub sigma: f32,
    /// The level x_{t−1} is at, in training-schedule units.
    pub t: i64,
    pub controls: Arc<[Control]>,
    pub config: GuidanceConfig,
}

/// A chunk of one guide's work: which (row, control) pairs, in order.
type Pairs = Vec<(usize, usize)>;

type Call = (usize, Pairs, Result<GuideOutputs>);

/// Calls each guide on its (row, control) pairs with the latents `latent_of(row)` at `t_of(row)`,
/// at most `max_rows` rows per call, all chunks of all guides at once.
fn spawn_calls<'a>(
    calls: &mut JoinSet<Call>,
    by_guide: Vec<(Arc<RegisteredGuide>, Pairs)>,
    rows: &'a [GuidedRow],
    latent_of: impl Fn(usize) -> &'a [f32],
    t_of: impl Fn(usize) -> i64,
    max_rows: usize,
) {
    for (guide, pairs) in by_guide {
        for chunk in pairs.chunks(max_rows.max(1)) {
            let mut batch = GuideBatch {
                rows: chunk.len(),
                ..Default::default()
            };
            for &(r, c) in chunk {
                batch.latents.extend_from_slice(latent_of(r));
                batch.timesteps.push(t_of(r));
                batch
                    .targets
                    .extend_from_slice(&rows[r].controls[c].targets);
            }
            let (guide, chunk, index) = (Arc::clone(&guide), chunk.to_vec(), calls.len());
            calls.spawn(async move { (index, chunk, guide.gradient(batch).await) });
        }
    }
}

/// Every call's pairs and result, in the order the calls were made (so that a row's gradients
/// from several guides add up in the same order every time: same seed, same text).
async fn join_calls(mut calls: JoinSet<Call>) -> Vec<(Pairs, Result<GuideOutputs>)> {
    let mut done = Vec::with_capacity(calls.len());
    while let Some(call) = calls.join_next().await {
        match call {
            Ok(call) => done.push(call),
            Err(e) => tracing::error!(error = %e, "guide call task failed"),
        }
    }
    done.sort_by_key(|c| c.0);
    done.into_iter().map(|(_, p, r)| (p, r)).collect()
}

/// Groups (row, control) pairs by the guide the control names, in first-seen order.
fn group(
    rows: &[GuidedRow],
    pairs: impl Iterator<Item = (usize, usize)>,
) -> Vec<(Arc<RegisteredGuide>, Pairs)> {
    let mut by_guide: Vec<(Arc<RegisteredGuide>, Pairs)> = Vec::new();
    for (r, c) in pairs {
        let g = &rows[r].controls[c].guide;
        match by_guide.iter_mut().find(|(h, _)| Arc::ptr_eq(h, g)) {
            Some((_, p)) => p.push((r, c)),
            None => by_guide.push((Arc::clone(g), vec![(r, c)])),
        }
    }
    by_guide
}

fn finite(v: &[f32]) -> bool {
    v.iter().all(|x| x.is_finite())
}

/// The guided x_{t−1} means of `rows`, each Ok or the error that ends its request. For each
/// gradient step, one call per guide (chunked to `max_rows`) for all rows it steers.
pub async fn guide_rows(rows: &[GuidedRow], max_rows: usize) -> Vec<Result<Vec<f32>>> {
    let n = rows.len();
    let mut failed: Vec<Option<Error>> = (0..n).map(|_| None).collect();
    for (r, row) in rows.iter().enumerate() {
        if !finite(&row.mean) {
            failed[r] = Some(Error::invalid(
                "guidance",
                "the latents of this text became non-finite before guidance",
            ));
        }
    }
    let mut pairs: Vec<(usize, usize)> = (0..n)
        .filter(|&r| failed[r].is_none())
        .flat_map(|r| (0..rows[r].controls.len()).map(move |c| (r, c)))
        .collect();

    // What each row's gradient steps move, at which level the guides read it, and what the
    // fluency term pulls it back to: the proposal at its own level, or the x0 estimate at t = 0.
    let on_estimate = |r: usize| rows[r].config.space == GuidanceSpace::Estimate;

    // The satisfaction gate: a guide that already reads its targets in x̂0 leaves the row alone.
    // In estimate space the first gradient call reads the very text the gate would (the estimate,
    // at t = 0), so its log p is the gate and no call of its own is made (below).
    let gated: Vec<(usize, usize)> = pairs
        .iter()
        .copied()
        .filter(|&(r, _)| rows[r].config.satisfied_prob < 1.0 && !on_estimate(r))
        .collect();
    if !gated.is_empty() {
        let mut calls = JoinSet::new();
        spawn_calls(
            &mut calls,
            group(rows, gated.into_iter()),
            rows,
            |r| &rows[r].x0,
            |_| 0,
            max_rows,
        );
        let mut satisfied = Vec::new();
        for (chunk, result) in join_calls(calls).await {
            // A guide that fails here keeps its rows: the gradient calls will tell.
            let Ok(out) = result else { continue };
            for (&(r, c), lp) in chunk.iter().zip(&out.log_prob) {
                if rows[r].config.satisfied(*lp) {
                    satisfied.push((r, c));
                }
            }
        }
        pairs.retain(|p| !satisfied.contains(p));
    }

    let anchor = |r: usize| {
        if on_estimate(r) {
            &rows[r].estimate
        } else {
            &rows[r].mean
        }
    };
    let mut y: Vec<Vec<f32>> = (0..n).map(|r| anchor(r).clone()).collect();
    let mut state: Vec<Vec<f32>> = rows.iter().map(|r| vec![0f32; r.mean.len()]).collect();
    let rows_of = |pairs: &[(usize, usize)]| {
        let mut g: Vec<usize> = pairs.iter().map(|p| p.0).collect();
        g.dedup();
        g
    };
    let mut guided = rows_of(&pairs);
    let k_max = guided
        .iter()
        .map(|&r| rows[r].config.steps_per_diffusion_step)
        .max()
        .unwrap_or(0);
    for k in 0..k_max {
        let active = |r: usize, failed: &[Option<Error>]| {
            failed[r].is_none() && k < rows[r].config.steps_per_diffusion_step
        };
        let mut grad: Vec<Vec<f32>> = rows.iter().map(|r| vec![0f32; r.mean.len()]).collect();
        let mut calls = JoinSet::new();
        let mut satisfied = Vec::new();
        let step_pairs = pairs.iter().copied().filter(|&(r, _)| active(r, &failed));
        spawn_calls(
            &mut calls,
            group(rows, step_pairs),
            rows,
            |r| &y[r],
            |r| if on_estimate(r) { 0 } else { rows[r].t },
            max_rows,
        );
        for (chunk, result) in join_calls(calls).await {
            match result {
                Ok(out) => {
                    let per = out.grad.len() / chunk.len().max(1);
                    for (j, &(r, c)) in chunk.iter().enumerate() {
                        let g = &out.grad[j * per..(j + 1) * per];
                        if !out.log_prob[j].is_finite() || !finite(g) {
                            failed[r].get_or_insert_with(|| {
                                Error::Unavailable(format!(
                                    "guide `{}` returned a non-finite log p or gradient for this text",
                                    rows[r].controls[c].guide.name
                                ))
                            });
                            continue;
                        }
                        if k == 0 && on_estimate(r) && rows[r].config.satisfied(out.log_prob[j]) {
                            satisfied.push((r, c));
                            continue;
                        }
                        let w = rows[r].controls[c].weight;
                        for (acc, gi) in grad[r].iter_mut().zip(g) {
                            *acc += w * gi;
                        }
                    }
                }
                Err(e) => {
                    for &(r, _) in &chunk {
                        failed[r].get_or_insert_with(|| Error::Unavailable(e.to_string()));
                    }
                }
            }
        }
        if !satisfied.is_empty() {
            pairs.retain(|p| !satisfied.contains(p));
            guided = rows_of(&pairs);
        }
        for &r in &guided {
            if !active(r, &failed) {
                continue;
            }
            let row = &rows[r];
            super::update(
                &row.config,
                &mut y[r],
                &grad[r],
                anchor(r),
                row.sigma,
                &mut state[r],
            );
            if !finite(&y[r]) {
                failed[r] = Some(Error::invalid(
                    "guidance.step_size",
                    "the guided latents became non-finite: lower guidance.step_size or controls.weight",
                ));
            }
        }
    }
    y.into_iter()
        .zip(failed)
        .enumerate()
        .map(|(r, (y, f))| match f {
            Some(e) => Err(e),
            // x_{t−1} carries √ᾱ of x0: the edited estimate moves it by that much.
            None if on_estimate(r) => Ok(rows[r]
                .mean
                .iter()
                .zip(y.iter().zip(&rows[r].estimate))
                .map(|(m, (yi, e))| m + rows[r].signal * (yi - e))
                .collect()),
            None => Ok(y),
        })
        .collect()
}

/// Each finished row's final log p(c | x0) per control, at t = 0 (None where its guide failed,
/// which does not fail the request): one call per guide (chunked) for all rows.
pub async fn final_scores(
    latents: &[Vec<f32>],
    controls: &[Arc<[Control]>],
    max_rows: usize,
) -> Vec<Vec<Option<(String, f32)>>> {
    let rows: Vec<GuidedRow> = latents
        .iter()
        .zip(controls)
        .map(|(x, c)| GuidedRow {
            mean: x.clone(),
            x0: Vec::new(),
            estimate: Vec::new(),
            signal: 1.0,
            sigma: 0.0,
            t: 0,
            controls: Arc::clone(c),
            config: GuidanceConfig::default(),
        })
        .collect();
    let mut scores: Vec<Vec<Option<(String, f32)>>> =
        controls.iter().map(|c| vec![None; c.len()]).collect();
    let pairs = (0..rows.len()).flat_map(|r| (0..rows[r].controls.len()).map(move |c| (r, c)));
    let mut calls = JoinSet::new();
    spawn_calls(
        &mut calls,
        group(&rows, pairs),
        &rows,
        |r| &rows[r].mean,
        |_| 0,
        max_rows,
    );
    for (chunk, result) in join_calls(calls).await {
        match result {
            Ok(out) => {
                for (&(r, c), lp) in chunk.iter().zip(out.log_prob) {
                    scores[r][c] = Some((rows[r].controls[c].guide.name.clone(), lp));
                }
            }
            Err(e) => {
                let guide = &rows[chunk[0].0].controls[chunk[0].1].guide.name;
                tracing::warn!(guide = %guide, error = %e, "final scoring failed");
            }
        }
    }
    scores
}
