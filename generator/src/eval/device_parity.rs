//! Does a device compute what the CPU computes? A reference made on the CPU (`device-parity
//! --write`) holds denoiser outputs on fixed inputs and a few sampled texts; on another device the
//! same inputs are run again and compared. The x0 predictions must agree to float tolerance; sampled
//! texts may drift apart after many steps of round-off (clamping snaps to the nearest word, so one
//! flip changes the rest), so they are reported, not required.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::diffusion::sampler::{normal_noise, sequence_rng};
use crate::diffusion::{Sampler, SamplerKind};
use crate::model::LoadedModel;
use crate::{Error, Result};

/// Sequences in the denoiser probe and timesteps it is run at (fractions of T).
const PROBE_BATCH: usize = 8;
const PROBE_T: [f64; 5] = [0.0, 0.1, 0.4, 0.7, 0.999];
const SEED: u64 = 20_221_227;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reference {
    pub device: String,
    pub embedding_sha256: String,
    /// One x0 prediction [B, L, D] (flattened) per probe timestep, without and with self-conditioning input.
    pub x0: Vec<Vec<f32>>,
    pub sample_steps: usize,
    pub texts: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ParityReport {
    pub device: String,
    /// Largest |x0 − x0_ref| over all probes.
    pub max_abs_diff: f32,
    /// ‖x0 − x0_ref‖ / ‖x0_ref‖ over all probes.
    pub rel_l2: f32,
    pub texts_identical: usize,
    pub texts: usize,
    /// Share of word positions that agree between the sampled texts.
    pub word_agreement: f64,
}

/// Relative L2 difference the x0 probes may show (float32 round-off through 4 layers, with
/// different reduction orders on a GPU, is around 1e-6–1e-5).
pub const TOLERANCE: f32 = 1e-3;

impl ParityReport {
    pub fn passed(&self) -> bool {
        self.rel_l2 <= TOLERANCE
    }

    pub fn table(&self) -> String {
        format!(
            "| check | {} vs CPU reference |\n|---|---:|\n\
             | denoiser x0, max abs diff | {:.2e} |\n\
             | denoiser x0, relative L2 (≤ {TOLERANCE:.0e}) | {:.2e} |\n\
             | sampled texts identical | {}/{} |\n\
             | words agreeing | {:.1}% |\n",
            self.device,
            self.max_abs_diff,
            self.rel_l2,
            self.texts_identical,
            self.texts,
            100.0 * self.word_agreement
        )
    }
}

impl Reference {
    /// Runs the probes and samples `texts` sentences at `sample_steps` steps on the model's device.
    pub fn compute(loaded: &LoadedModel, texts: usize, sample_steps: usize) -> Result<Self> {
        let model = &loaded.model;
        let cfg = &model.config;
        let device = model.device();
        let mut rngs: Vec<_> = (0..PROBE_BATCH).map(|i| sequence_rng(SEED, i)).collect();
        let x_t = normal_noise(&mut rngs, cfg.seq_len, cfg.embed_dim, device)?;
        let previous = normal_noise(&mut rngs, cfg.seq_len, cfg.embed_dim, device)?;
        let mut x0 = Vec::new();
        for frac in PROBE_T {
            let t = Tensor::full(
                (frac * cfg.diffusion_steps as f64) as f32,
                PROBE_BATCH,
                device,
            )?;
            for prev in [None, Some(&previous)] {
                let out = model.predict_x0(&x_t, &t, prev)?;
                x0.push(out.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
            }
        }
        let sampler = Sampler::new(model, sample_steps, SamplerKind::Ddpm, true)?;
        let samples = sampler.sample(texts, SEED, texts)?;
        Ok(Self {
            device: crate::device::name(device),
            embedding_sha256: model.embedding_sha256()?,
            x0,
            sample_steps,
            texts: samples
                .ids
                .iter()
                .map(|ids| loaded.tokenizer.decode(ids))
                .collect(),
        })
    }

    /// Compares `self` (this device) against `reference` (the CPU).
    pub fn compare(&self, reference: &Reference) -> Result<ParityReport> {
        if self.embedding_sha256 != reference.embedding_sha256 {
            return Err(Error::invalid(
                "reference",
                format!(
                    "made for another model (embedding {} ≠ {}): write a new one with --write",
                    &reference.embedding_sha256[..12.min(reference.embedding_sha256.len())],
                    &self.embedding_sha256[..12.min(self.embedding_sha256.len())]
                ),
            ));
        }
        let same_shapes = self.x0.len() == reference.x0.len()
            && self.texts.len() == reference.texts.len()
            && self
                .x0
                .iter()
                .zip(&reference.x0)
                .all(|(a, b)| a.len() == b.len());
        if !same_shapes {
            return Err(Error::invalid(
                "reference",
                "probe shapes differ: write a new one with --write",
            ));
        }
        let (mut max_abs, mut diff_sq, mut ref_sq) = (0f32, 0f64, 0f64);
        for (a, b) in self.x0.iter().zip(&reference.x0) {
            for (&x, &y) in a.iter().zip(b) {
                max_abs = max_abs.max((x - y).abs());
                diff_sq += ((x - y) as f64).powi(2);
                ref_sq += (y as f64).powi(2);
            }
        }
        let (mut same_words, mut words) = (0usize, 0usize);
        for (a, b) in self.texts.iter().zip(&reference.texts) {
            let (a, b): (Vec<&str>, Vec<&str>) = (
                a.split_whitespace().collect(),
                b.split_whitespace().collect(),
            );
            words += a.len().max(b.len());
            same_words += a.iter().zip(&b).filter(|(x, y)| x == y).count();
        }
        Ok(ParityReport {
            device: self.device.clone(),
            max_abs_diff: max_abs,
            rel_l2: (diff_sq / ref_sq.max(f64::MIN_POSITIVE)).sqrt() as f32,
            texts_identical: self
                .texts
                .iter()
                .zip(&reference.texts)
                .filter(|(a, b)| a == b)
                .count(),
            texts: self.texts.len(),
            word_agreement: same_words as f64 / words.max(1) as f64,
        })
    }
}
