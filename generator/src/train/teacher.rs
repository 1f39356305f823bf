//! Training the teacher LM ([`crate::model::teacher_lm`]): next-word cross-entropy on the E2E train
//! references, AdamW with warm-up and linear decay, gradients data-parallel over shards as the
//! diffusion trainer computes them. Dev-set perplexity is measured at every checkpoint and logged;
//! the directory always holds the last checkpoint.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::optim::{clip_scale, learning_rate, named_vars, AdamW, AdamWParams};
use super::progress_bar;
use super::step::weighted_sum;
use crate::model::diffusion_lm::{save_weights, TOKENIZER_FILE};
use crate::model::teacher_lm::{build_teacher, LoadedTeacher, TeacherConfig, TEACHER_CONFIG_FILE};
use crate::parallel::{run_sharded, split};
use crate::text::WordTokenizer;
use crate::{Error, Result};

pub const TEACHER_LOG_FILE: &str = "train_log.jsonl";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TeacherTrainConfig {
    pub model: TeacherConfig,
    /// Words seen fewer times than this in the train references become UNK (texts are kept).
    pub min_count: u64,
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub warmup: usize,
    pub weight_decay: f64,
    pub grad_clip: f64,
    pub seed: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TeacherLogRecord {
    pub step: usize,
    /// Mean next-word cross-entropy (nats per token) since the previous record.
    pub loss: f64,
    /// Perplexity of the dev references, at checkpoints.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dev_perplexity: Option<f64>,
    pub lr: f64,
    pub steps_per_s: f64,
    pub elapsed_s: f64,
}

pub struct TeacherTrainer {
    pub config: TeacherTrainConfig,
    pub out: PathBuf,
    pub log_every: usize,
    pub checkpoint_every: usize,
    pub show_progress: bool,
    pub shards: usize,
}

impl TeacherTrainer {
    /// Trains on `train` and reports perplexity on `dev` at each checkpoint; returns the last
    /// dev perplexity.
    pub fn run(&self, train: &[String], dev: &[String], device: &Device) -> Result<f64> {
        let cfg = &self.config;
        if cfg.batch_size == 0 || cfg.steps == 0 {
            return Err(Error::invalid(
                "steps",
                "steps and batch_size must be at least 1",
            ));
        }
        std::fs::create_dir_all(&self.out).map_err(|e| Error::io(&self.out, e))?;
        let tokenizer = WordTokenizer::train(train.iter().map(String::as_str), cfg.min_count)?;
        let mut model_cfg = cfg.model.clone();
        model_cfg.vocab_size = tokenizer.vocab_size();
        let l = model_cfg.seq_len;
        let seqs: Vec<Vec<u32>> = train
            .iter()
            .map(|t| tokenizer.encode_padded(t, l))
            .collect::<Result<_>>()?;
        tracing::info!(
            sequences = seqs.len(),
            vocab = model_cfg.vocab_size,
            "teacher training data ready"
        );
        let (model, varmap) = build_teacher(&model_cfg, device, cfg.seed)?;
        let vars = named_vars(&varmap);
        let mut opt = AdamW::new(
            vars.clone(),
            AdamWParams {
                weight_decay: cfg.weight_decay,
                ..Default::default()
            },
        )?;
        let log_path = self.out.join(TEACHER_LOG_FILE);
        let _ = std::fs::remove_file(&log_path);
        let progress = progress_bar(cfg.steps, self.show_progress);
        let pad = tokenizer.pad_id();
        let started = Instant::now();
        let (mut window_loss, mut window_n, mut window_start) = (0f64, 0usize, Instant::now());
        let mut dev_perplexity = f64::NAN;
        for step in 0..cfg.steps {
            let mut rng =
                StdRng::seed_from_u64(cfg.seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ step as u64);
            let batch: Vec<&Vec<u32>> = (0..cfg.batch_size)
                .map(|_| &seqs[rng.random_range(0..seqs.len())])
                .collect();
            // Predicted tokens in the whole batch: each shard's summed loss is divided by it, so the
            // shard gradients add up to the gradient of the batch's mean token loss.
            let tokens = batch
                .iter()
                .map(|s| s[1..].iter().filter(|&&id| id != pad).count())
                .sum::<usize>()
                .max(1);
            let results = run_sharded(split(cfg.batch_size, self.shards), |(start, len)| {
                let ids: Vec<u32> = batch[start..start + len]
                    .iter()
                    .flat_map(|s| s.iter().copied())
                    .collect();
                let ids = Tensor::from_vec(ids, (len, l), device)?;
                let (losses, _) = model.token_losses(&ids, pad)?;
                let loss = (losses.sum_all()? / tokens as f64)?;
                Ok((loss.to_scalar::<f32>()? as f64, loss.backward()?))
            })?;
            let loss: f64 = results.iter().map(|r| r.0).sum();
            let grads = weighted_sum(&vars, results.into_iter().map(|r| (1.0, r.1)).collect())?;
            let (_, scale) = clip_scale(&vars, &grads, cfg.grad_clip, step)?;
            let lr = learning_rate(step, cfg.steps, cfg.warmup, cfg.lr);
            opt.step(&grads, lr, scale)?;
            window_loss += loss;
            window_n += 1;
            progress.inc(1);
            let done = step + 1;
            let checkpoint = done % self.checkpoint_every.max(1) == 0 || done == cfg.steps;
            if checkpoint {
                self.save(&model_cfg, &tokenizer, &vars)?;
                dev_perplexity = LoadedTeacher::load(&self.out, device)?
                    .perplexity(dev)?
                    .perplexity;
                tracing::info!(step = done, dev_perplexity, "teacher checkpoint saved");
            }
            if done % self.log_every.max(1) == 0 || checkpoint {
                let secs = window_start.elapsed().as_secs_f64();
                let record = TeacherLogRecord {
                    step: done,
                    loss: window_loss / window_n.max(1) as f64,
                    dev_perplexity: checkpoint.then_some(dev_perplexity),
                    lr,
                    steps_per_s: window_n as f64 / secs.max(1e-9),
                    elapsed_s: started.elapsed().as_secs_f64(),
                };
                progress.set_message(format!(
                    "loss {:.3} dev ppl {:.2}",
                    record.loss, dev_perplexity
                ));
                append_record(&log_path, &record)?;
                (window_loss, window_n, window_start) = (0.0, 0, Instant::now());
            }
        }
        progress.finish();
        Ok(dev_perplexity)
    }

    fn save(
        &self,
        config: &TeacherConfig,
        tokenizer: &WordTokenizer,
        vars: &[(String, candle_core::Var)],
    ) -> Result<()> {
        let path = self.out.join(TEACHER_CONFIG_FILE);
        let text = serde_json::to_string_pretty(config).expect("config serializes");
        std::fs::write(&path, text + "\n").map_err(|e| Error::io(&path, e))?;
        tokenizer.save(&self.out.join(TOKENIZER_FILE))?;
        let weights = vars
            .iter()
            .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
            .collect();
        save_weights(&self.out, &weights)
    }
}

fn append_record(path: &Path, record: &TeacherLogRecord) -> Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    writeln!(
        file,
        "{}",
        serde_json::to_string(record).expect("record serializes")
    )
    .map_err(|e| Error::io(path, e))
}
