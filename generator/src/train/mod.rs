//! Training: data, the end-to-end loss, AdamW with warm-up and decay, EMA weights, gradient
//! clipping, checkpoints with resume, a JSONL log and a loss plot.
//!
//! A checkpoint directory is a complete model directory (EMA weights in `model.safetensors`) plus
//! `train_state.json` / `train_state.safetensors` (raw weights, optimizer moments) for `--resume`.

pub mod data;
pub mod log;
pub mod loss;
pub mod optim;
pub mod step;
pub mod teacher;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::diffusion::sampler::sequence_rng;
use crate::diffusion::NoiseSchedule;
use crate::model::diffusion_lm::{
    build, replace_file, save_model_dir, save_tensors, TOKENIZER_FILE,
};
use crate::model::ModelConfig;
use crate::text::WordTokenizer;
use crate::{Error, Result};
use optim::{learning_rate, named_vars, AdamW, AdamWParams, Ema};

pub const STATE_FILE: &str = "train_state.json";
pub const STATE_TENSORS_FILE: &str = "train_state.safetensors";

/// Everything that defines a run (saved in `train_state.json`, checked on resume).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainConfig {
    pub model: ModelConfig,
    /// Minimum count of a word in the train references to enter the vocabulary.
    pub min_count: u64,
    /// Leave out references that contain a word outside the vocabulary.
    pub drop_unk: bool,
    /// Leave out references that do not fit in the canvas with START and END.
    #[serde(default)]
    pub drop_long: bool,
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub warmup: usize,
    pub weight_decay: f64,
    pub ema_decay: f64,
    /// Clip the global gradient norm to this (0 = off).
    pub grad_clip: f64,
    pub seed: u64,
    /// Timesteps drawn as ⌊T·u^p⌋, u uniform: 1 is uniform over t; p > 1 trains more on low noise.
    #[serde(default = "uniform_t")]
    pub t_power: f64,
}

fn uniform_t() -> f64 {
    1.0
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TrainState {
    config: TrainConfig,
    step: usize,
    elapsed_s: f64,
}

/// What a finished (or stopped) run reports.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub step: usize,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub dropped_unk: usize,
    pub sequences: usize,
}

pub struct Trainer {
    pub config: TrainConfig,
    pub out: PathBuf,
    pub log_every: usize,
    pub checkpoint_every: usize,
    pub show_progress: bool,
    /// Stop (with a checkpoint) once this step is reached, short of `steps`; `--resume` goes on.
    pub stop_at: Option<usize>,
    /// Data-parallel shards per step (one thread each; see [`step`]).
    pub shards: usize,
}

impl Trainer {
    /// Trains on `texts` (one reference per sequence). With `resume`, continues from the state in `out`.
    pub fn run(&self, texts: &[String], resume: bool, device: &Device) -> Result<TrainSummary> {
        let cfg = &self.config;
        if cfg.batch_size == 0 {
            return Err(Error::invalid("batch_size", "must be at least 1"));
        }
        if cfg.steps == 0 {
            return Err(Error::invalid("steps", "must be at least 1"));
        }
        std::fs::create_dir_all(&self.out).map_err(|e| Error::io(&self.out, e))?;
        let state_path = self.out.join(STATE_FILE);
        let resumed: Option<TrainState> = if resume && state_path.exists() {
            let text =
                std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
            let state: TrainState = serde_json::from_str(&text)
                .map_err(|e| Error::format(&state_path, e.to_string()))?;
            let mut expected = state.config.clone();
            expected.steps = cfg.steps; // a resumed run may be extended
            if expected != *cfg {
                return Err(Error::Checkpoint(format!(
                    "{} was written by a run with other settings: {:?}; this run: {:?}",
                    state_path.display(),
                    state.config,
                    cfg
                )));
            }
            Some(state)
        } else {
            None
        };

        let tokenizer = if resumed.is_some() {
            WordTokenizer::from_file(&self.out.join(TOKENIZER_FILE))?
        } else {
            WordTokenizer::train(texts.iter().map(|s| s.as_str()), cfg.min_count)?
        };
        let mut model_cfg = cfg.model.clone();
        model_cfg.vocab_size = tokenizer.vocab_size();
        let seqs = data::encode_all(
            &tokenizer,
            texts,
            model_cfg.seq_len,
            cfg.drop_unk,
            cfg.drop_long,
        )?;
        if seqs.ids.is_empty() {
            return Err(Error::invalid(
                "min_count",
                format!(
                    "no training sequences left: all {} references contain a word seen fewer than {} times",
                    texts.len(),
                    cfg.min_count
                ),
            ));
        }
        tracing::info!(
            sequences = seqs.ids.len(),
            dropped_unk = seqs.dropped_unk,
            dropped_long = seqs.dropped_long,
            vocab = model_cfg.vocab_size,
            "training data ready"
        );

        let (model, varmap) = build(&model_cfg, device, cfg.seed)?;
        let vars = named_vars(&varmap);
        let params = AdamWParams {
            weight_decay: cfg.weight_decay,
            ..Default::default()
        };
        let mut opt = AdamW::new(vars.clone(), params)?;
        let mut ema = Ema::new(&vars, cfg.ema_decay)?;
        let (mut step, mut elapsed_before) = (0usize, 0f64);
        if let Some(state) = &resumed {
            let path = self.out.join(STATE_TENSORS_FILE);
            let tensors = candle_core::safetensors::load(&path, device)
                .map_err(|e| Error::format(&path, e.to_string()))?;
            for (name, var) in &vars {
                let get = |key: String| {
                    tensors.get(&key).ok_or_else(|| {
                        Error::Checkpoint(format!("{} lacks `{key}`", path.display()))
                    })
                };
                var.set(get(format!("param.{name}"))?)?;
                ema.weights
                    .insert(name.clone(), get(format!("ema.{name}"))?.clone());
            }
            opt.load_state(&tensors, state.step)?;
            step = state.step;
            elapsed_before = state.elapsed_s;
            log::truncate_after(&self.out.join(log::LOG_FILE), step)?;
            tracing::info!(step, "resumed");
        } else {
            let _ = std::fs::remove_file(self.out.join(log::LOG_FILE));
        }

        let schedule = NoiseSchedule::new(model_cfg.schedule, model_cfg.diffusion_steps)?;
        let progress = progress_bar(cfg.steps, self.show_progress);
        progress.set_position(step as u64);

        let started = Instant::now();
        let mut window = Window::default();
        let mut summary = TrainSummary {
            step,
            first_loss: None,
            last_loss: None,
            dropped_unk: seqs.dropped_unk,
            sequences: seqs.ids.len(),
        };
        let l = model_cfg.seq_len;
        let stop = self.stop_at.unwrap_or(cfg.steps).min(cfg.steps);
        while step < stop {
            // Streams keyed by (seed, step, sequence): a resumed run draws exactly what an
            // uninterrupted one would, and the shard count does not change the draws.
            let step_seed = cfg.seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ step as u64;
            let mut rng = StdRng::seed_from_u64(step_seed);
            let mut batch = Vec::with_capacity(cfg.batch_size * l);
            for _ in 0..cfg.batch_size {
                batch.extend_from_slice(&seqs.ids[rng.random_range(0..seqs.ids.len())]);
            }
            let ids = Tensor::from_vec(batch, (cfg.batch_size, l), device)?;
            let t: Vec<usize> = (0..cfg.batch_size)
                .map(|_| draw_timestep(&mut rng, schedule.len(), cfg.t_power))
                .collect();
            // Half the steps train the self-conditioned pass (when the model has one).
            let self_condition = rng.random_bool(0.5);
            let mut rngs: Vec<StdRng> = (0..cfg.batch_size)
                .map(|i| sequence_rng(step_seed, i))
                .collect();
            let batch = step::StepBatch {
                ids: &ids,
                t: &t,
                rngs: &mut rngs,
                self_condition,
            };
            let out = step::step_gradients(&model, &schedule, &vars, batch, self.shards)?;
            let grads = out.grads;
            let (grad_norm, scale) = optim::clip_scale(&vars, &grads, cfg.grad_clip, step)?;
            let lr = learning_rate(step, cfg.steps, cfg.warmup, cfg.lr);
            opt.step(&grads, lr, scale)?;
            ema.update(&vars, step)?;
            step += 1;
            window.add(out.mse, out.prior, out.rounding, grad_norm);
            progress.inc(1);

            let last = step == stop;
            if step % self.log_every.max(1) == 0 || last {
                let elapsed_s = elapsed_before + started.elapsed().as_secs_f64();
                let record = window.record(step, lr, elapsed_s);
                progress.set_message(format!("loss {:.4}", record.loss));
                summary.first_loss.get_or_insert(record.loss);
                summary.last_loss = Some(record.loss);
                log::append(&self.out.join(log::LOG_FILE), &record)?;
                tracing::debug!(
                    step,
                    loss = record.loss,
                    mse = record.mse,
                    rounding = record.rounding,
                    "train"
                );
            }
            if step % self.checkpoint_every.max(1) == 0 || last {
                let elapsed_s = elapsed_before + started.elapsed().as_secs_f64();
                self.checkpoint(&model_cfg, &tokenizer, &vars, &opt, &ema, step, elapsed_s)?;
            }
        }
        progress.finish();
        summary.step = step;
        Ok(summary)
    }

    #[allow(clippy::too_many_arguments)]
    fn checkpoint(
        &self,
        model_cfg: &ModelConfig,
        tokenizer: &WordTokenizer,
        vars: &[(String, candle_core::Var)],
        opt: &AdamW,
        ema: &Ema,
        step: usize,
        elapsed_s: f64,
    ) -> Result<()> {
        save_model_dir(&self.out, model_cfg, tokenizer, &ema.weights)?;
        let mut tensors: HashMap<String, Tensor> = opt.state();
        for (name, var) in vars {
            tensors.insert(format!("param.{name}"), var.as_tensor().clone());
            tensors.insert(format!("ema.{name}"), ema.weights[name].clone());
        }
        save_tensors(&tensors, &self.out.join(STATE_TENSORS_FILE))?;
        let state = TrainState {
            config: self.config.clone(),
            step,
            elapsed_s,
        };
        let path = self.out.join(STATE_FILE);
        // Written last, so that the step it names is never ahead of the tensors.
        replace_file(&path, |tmp| {
            std::fs::write(
                tmp,
                serde_json::to_string_pretty(&state).expect("state serializes"),
            )
            .map_err(|e| Error::io(&path, e))
        })?;
        let records = log::read(&self.out.join(log::LOG_FILE))?;
        log::plot(&records, &self.out.join(log::PLOT_FILE))?;
        tracing::info!(step, dir = %self.out.display(), "checkpoint saved");
        Ok(())
    }
}

/// The training progress bar (steps, rate, ETA, a message for the loss), or a hidden one.
pub fn progress_bar(steps: usize, show: bool) -> ProgressBar {
    let progress = if show {
        ProgressBar::new(steps as u64)
    } else {
        ProgressBar::hidden()
    };
    progress.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}<{eta_precise}] {wide_bar} {pos}/{len} {per_sec} {msg}",
        )
        .expect("static template"),
    );
    progress
}

/// Running means of the loss terms between two log records.
#[derive(Default)]
struct Window {
    n: usize,
    loss: f64,
    mse: f64,
    prior: f64,
    rounding: f64,
    grad_norm: f64,
    started: Option<Instant>,
}

impl Window {
    fn add(&mut self, mse: f64, prior: f64, rounding: f64, grad_norm: f64) {
        self.started.get_or_insert_with(Instant::now);
        self.n += 1;
        self.mse += mse;
        self.prior += prior;
        self.rounding += rounding;
        self.loss += mse + prior + rounding;
        self.grad_norm += grad_norm;
    }

    fn record(&mut self, step: usize, lr: f64, elapsed_s: f64) -> log::LogRecord {
        let n = self.n.max(1) as f64;
        let secs = self
            .started
            .map(|s| s.elapsed().as_secs_f64())
            .unwrap_or(0.0);
        let r = log::LogRecord {
            step,
            loss: self.loss / n,
            mse: self.mse / n,
            prior: self.prior / n,
            rounding: self.rounding / n,
            grad_norm: self.grad_norm / n,
            lr,
            steps_per_s: if secs > 0.0 { n / secs } else { 0.0 },
            elapsed_s,
        };
        *self = Window::default();
        r
    }
}

/// A training timestep in 0..steps: uniform for `power` = 1 (drawn exactly as before the option
/// existed, so runs made then resume bit-identically), else ⌊steps·u^power⌋.
fn draw_timestep(rng: &mut StdRng, steps: usize, power: f64) -> usize {
    if power == 1.0 {
        rng.random_range(0..steps)
    } else {
        ((steps as f64 * rng.random::<f64>().powf(power)) as usize).min(steps - 1)
    }
}
