//! Noise schedules (β_t for t = 0..T) and respacing to fewer sampling steps.
//!
//! Follows improved-diffusion / Diffusion-LM: β_i = min(1 − ᾱ((i+1)/T) / ᾱ(i/T), 0.999) for a
//! continuous ᾱ(s); the default, `sqrt`, is ᾱ(s) = 1 − √(s + 1e-4).

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// ᾱ(s) = 1 − √(s + 1e-4) (Diffusion-LM's default).
    Sqrt,
    /// ᾱ(s) = cos²((s + 0.008)/1.008 · π/2) (Nichol & Dhariwal).
    Cosine,
    /// β linear from 1e-4 to 0.02, scaled by 1000/T (Ho et al.).
    Linear,
}

pub const MAX_BETA: f64 = 0.999;

/// Continuous ᾱ(s), s ∈ [0, 1], of the schedules defined that way.
pub fn alpha_bar(kind: ScheduleKind, s: f64) -> f64 {
    match kind {
        ScheduleKind::Sqrt => 1.0 - (s + 1e-4).sqrt(),
        ScheduleKind::Cosine => ((s + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
            .cos()
            .powi(2),
        ScheduleKind::Linear => unreachable!("the linear schedule is defined by its betas"),
    }
}

/// A discrete schedule with everything the samplers and the loss read off it. Index i is the
/// i-th step of *this* schedule; `timesteps[i]` is the matching step of the training schedule
/// (the identity unless respaced), which is what the denoiser is told.
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    pub betas: Vec<f64>,
    pub alphas_cumprod: Vec<f64>,
    pub alphas_cumprod_prev: Vec<f64>,
    pub timesteps: Vec<usize>,
    pub train_steps: usize,
}

impl NoiseSchedule {
    pub fn new(kind: ScheduleKind, steps: usize) -> Result<Self> {
        if steps == 0 {
            return Err(Error::invalid("diffusion_steps", "must be positive"));
        }
        let betas: Vec<f64> = match kind {
            ScheduleKind::Linear => {
                let scale = 1000.0 / steps as f64;
                let (start, end) = (scale * 1e-4, scale * 0.02);
                (0..steps)
                    .map(|i| {
                        let frac = if steps == 1 {
                            0.0
                        } else {
                            i as f64 / (steps - 1) as f64
                        };
                        (start + frac * (end - start)).min(MAX_BETA)
                    })
                    .collect()
            }
            _ => (0..steps)
                .map(|i| {
                    let a1 = alpha_bar(kind, i as f64 / steps as f64);
                    let a2 = alpha_bar(kind, (i + 1) as f64 / steps as f64);
                    (1.0 - a2 / a1).min(MAX_BETA)
                })
                .collect(),
        };
        Ok(Self::from_betas(betas, (0..steps).collect(), steps))
    }

    fn from_betas(betas: Vec<f64>, timesteps: Vec<usize>, train_steps: usize) -> Self {
        let mut alphas_cumprod = Vec::with_capacity(betas.len());
        let mut acc = 1.0;
        for b in &betas {
            acc *= 1.0 - b;
            alphas_cumprod.push(acc);
        }
        let mut alphas_cumprod_prev = vec![1.0];
        alphas_cumprod_prev.extend_from_slice(&alphas_cumprod[..alphas_cumprod.len() - 1]);
        Self {
            betas,
            alphas_cumprod,
            alphas_cumprod_prev,
            timesteps,
            train_steps,
        }
    }

    pub fn len(&self) -> usize {
        self.betas.len()
    }

    pub fn is_empty(&self) -> bool {
        self.betas.is_empty()
    }

    /// Keeps `steps` evenly spaced steps of this schedule (first and last included) and
    /// recomputes the betas so that ᾱ at every kept step is unchanged.
    pub fn respace(&self, steps: usize) -> Result<Self> {
        let total = self.len();
        if steps == 0 || steps > total {
            return Err(Error::invalid(
                "steps",
                format!("must be between 1 and T = {total}, got {steps}"),
            ));
        }
        let kept: Vec<usize> = if steps == 1 {
            vec![total - 1]
        } else {
            let stride = (total - 1) as f64 / (steps - 1) as f64;
            (0..steps)
                .map(|i| (i as f64 * stride).round() as usize)
                .collect()
        };
        let mut last = 1.0;
        let mut betas = Vec::with_capacity(steps);
        for &i in &kept {
            let ac = self.alphas_cumprod[i];
            betas.push(1.0 - ac / last);
            last = ac;
        }
        let timesteps = kept.iter().map(|&i| self.timesteps[i]).collect();
        Ok(Self::from_betas(betas, timesteps, self.train_steps))
    }

    /// Coefficients of the posterior mean q(x_{i−1} | x_i, x0) = c0·x0 + ct·x_i.
    pub fn posterior_mean_coefs(&self, i: usize) -> (f64, f64) {
        let (b, ac, acp) = (
            self.betas[i],
            self.alphas_cumprod[i],
            self.alphas_cumprod_prev[i],
        );
        let c0 = b * acp.sqrt() / (1.0 - ac);
        let ct = (1.0 - acp) * (1.0 - b).sqrt() / (1.0 - ac);
        (c0, ct)
    }

    /// Posterior variance β̃_i = β_i (1 − ᾱ_{i−1}) / (1 − ᾱ_i).
    pub fn posterior_variance(&self, i: usize) -> f64 {
        self.betas[i] * (1.0 - self.alphas_cumprod_prev[i]) / (1.0 - self.alphas_cumprod[i])
    }

    /// The sampling variance Diffusion-LM uses ("fixed large"): β_i. The last step (i = 0) adds
    /// no noise at all.
    pub fn sampling_variance(&self, i: usize) -> f64 {
        if i == 0 {
            0.0
        } else {
            self.betas[i]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqrt_schedule_matches_closed_form() {
        let t = 2000;
        let s = NoiseSchedule::new(ScheduleKind::Sqrt, t).unwrap();
        // Unclipped, ᾱ_i = ᾱ((i+1)/T) / ᾱ(0) exactly (the product telescopes).
        let a0 = 1.0 - 1e-4f64.sqrt();
        for i in [0usize, 1, 10, 500, 1000, 1500, 1990] {
            let expected = (1.0 - ((i + 1) as f64 / t as f64 + 1e-4).sqrt()) / a0;
            assert!((s.alphas_cumprod[i] - expected).abs() < 1e-9, "i={i}");
        }
        // The last step would make ᾱ negative: β is clipped there.
        assert_eq!(s.betas[t - 1], MAX_BETA);
        assert!(s.betas.iter().all(|&b| b > 0.0 && b <= MAX_BETA));
        assert!(s.alphas_cumprod.windows(2).all(|w| w[1] < w[0]));
    }

    #[test]
    fn cosine_and_linear_match_closed_form() {
        let c = NoiseSchedule::new(ScheduleKind::Cosine, 1000).unwrap();
        let a0 = alpha_bar(ScheduleKind::Cosine, 0.0);
        let expected = alpha_bar(ScheduleKind::Cosine, 0.501) / a0;
        assert!((c.alphas_cumprod[500] - expected).abs() < 1e-9);
        let l = NoiseSchedule::new(ScheduleKind::Linear, 1000).unwrap();
        assert!((l.betas[0] - 1e-4).abs() < 1e-12 && (l.betas[999] - 0.02).abs() < 1e-12);
        let l2 = NoiseSchedule::new(ScheduleKind::Linear, 2000).unwrap();
        assert!((l2.betas[1999] - 0.01).abs() < 1e-12);
    }

    #[test]
    fn respacing_keeps_alpha_bar_at_kept_steps() {
        let full = NoiseSchedule::new(ScheduleKind::Sqrt, 2000).unwrap();
        for steps in [1usize, 2, 7, 200, 1000, 2000] {
            let r = full.respace(steps).unwrap();
            assert_eq!(r.len(), steps);
            assert_eq!(*r.timesteps.last().unwrap(), 1999);
            if steps > 1 {
                assert_eq!(r.timesteps[0], 0);
            }
            for (i, &t) in r.timesteps.iter().enumerate() {
                assert!((r.alphas_cumprod[i] - full.alphas_cumprod[t]).abs() < 1e-12);
            }
            assert!(r.timesteps.windows(2).all(|w| w[0] < w[1]));
        }
        let same = full.respace(2000).unwrap();
        for (a, b) in same.betas.iter().zip(&full.betas) {
            assert!((a - b).abs() < 1e-12);
        }
        // Respacing a respaced schedule still maps to training steps.
        let twice = full.respace(200).unwrap().respace(50).unwrap();
        for (i, &t) in twice.timesteps.iter().enumerate() {
            assert!((twice.alphas_cumprod[i] - full.alphas_cumprod[t]).abs() < 1e-12);
        }
    }

    #[test]
    fn respacing_rejects_bad_step_counts() {
        let full = NoiseSchedule::new(ScheduleKind::Sqrt, 100).unwrap();
        let err = full.respace(101).unwrap_err().to_string();
        assert!(err.contains("steps") && err.contains("T = 100"), "{err}");
        assert!(full.respace(0).is_err());
    }
}
