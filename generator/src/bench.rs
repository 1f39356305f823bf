//! Speed of the two hot loops — a training step and a sampling step — as medians over repeats.
//! The CLI runs one child process per thread count (the pool size is fixed at start-up) and prints a table.

use std::time::Instant;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::device::{name as device_name, shards, synchronize};
use crate::diffusion::sampler::sequence_rng;
use crate::diffusion::{NoiseSchedule, Sampler, SamplerKind};
use crate::model::diffusion_lm::{build, inference_model};
use crate::model::ModelConfig;
use crate::train::optim::{named_vars, AdamW, AdamWParams};
use crate::train::step::{step_gradients, StepBatch};
use crate::Result;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchRow {
    pub model: String,
    pub device: String,
    pub params: usize,
    pub threads: usize,
    pub batch: usize,
    pub seq_len: usize,
    pub train_step_ms: f64,
    pub sample_step_ms: f64,
}

pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn time_ms(device: &Device, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?; // warm-up
    synchronize(device)?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = Instant::now();
        f()?;
        synchronize(device)?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(&times))
}

/// Median train-step and sampling-step times of `config` at batch size `batch` on `device`
/// (sharded over the worker threads on the CPU).
pub fn bench(
    name: &str,
    config: &ModelConfig,
    batch: usize,
    device: &Device,
    reps: usize,
) -> Result<BenchRow> {
    let threads = crate::runtime::threads();
    let (model, varmap) = build(config, device, 0)?;
    let vars = named_vars(&varmap);
    let params = vars.iter().map(|(_, v)| v.elem_count()).sum();
    let schedule = NoiseSchedule::new(config.schedule, config.diffusion_steps)?;
    let mut opt = AdamW::new(vars.clone(), AdamWParams::default())?;
    let mut rng = StdRng::seed_from_u64(0);
    let l = config.seq_len;
    let ids: Vec<u32> = (0..batch * l)
        .map(|_| rng.random_range(0..config.vocab_size as u32))
        .collect();
    let ids = Tensor::from_vec(ids, (batch, l), device)?;
    let t: Vec<usize> = (0..batch)
        .map(|_| rng.random_range(0..schedule.len()))
        .collect();
    let mut rngs: Vec<StdRng> = (0..batch).map(|i| sequence_rng(1, i)).collect();
    let train_step_ms = time_ms(device, reps, || {
        let batch = StepBatch {
            ids: &ids,
            t: &t,
            rngs: &mut rngs,
            self_condition: config.self_condition,
        };
        let out = step_gradients(&model, &schedule, &vars, batch, shards(device))?;
        opt.step(&out.grads, 1e-4, 1.0)
    })?;

    let model = inference_model(config, &varmap, device)?; // as served
    let sampler = Sampler::new(&model, 200, SamplerKind::Ddpm, true)?;
    let x = Tensor::randn(0f32, 1.0, (batch, l, config.embed_dim), device)?;
    let index = vec![100; batch];
    let sample_step_ms = time_ms(device, reps * 2, || {
        sampler.step(&x, &index, &x, Some(&x)).map(|_| ())
    })?;
    Ok(BenchRow {
        model: name.to_string(),
        device: device_name(device),
        params,
        threads,
        batch,
        seq_len: l,
        train_step_ms,
        sample_step_ms,
    })
}

/// A Markdown table of rows, with sentences/s for a 200-step sampling run.
pub fn table(rows: &[BenchRow]) -> String {
    let mut s = String::from(
        "| model | params | device | threads | B | L | train step (ms) | sampling step (ms) | 200-step sentences/s |\n\
         |---|---:|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {:.2} M | {} | {} | {} | {} | {:.1} | {:.2} | {:.2} |\n",
            r.model,
            r.params as f64 / 1e6,
            r.device,
            r.threads,
            r.batch,
            r.seq_len,
            r.train_step_ms,
            r.sample_step_ms,
            r.batch as f64 / (r.sample_step_ms * 200.0 / 1e3),
        ));
    }
    s
}
