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
    /// The same step with the plain, independent clamp (`clamp_repeat_penalty` 0).
    pub sample_step_plain_clamp_ms: f64,
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
    let plain = Sampler::new(&model, 200, SamplerKind::Ddpm, true)?.with_repeat_penalty(0.0);
    let sample_step_plain_clamp_ms = time_ms(device, reps * 2, || {
        plain.step(&x, &index, &x, Some(&x)).map(|_| ())
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
        sample_step_plain_clamp_ms,
    })
}

/// A Markdown table of rows, with sentences/s for a 200-step sampling run.
pub fn table(rows: &[BenchRow]) -> String {
    let mut s = String::from(
        "| model | params | device | threads | B | L | train step (ms) | sampling step (ms) | independent clamp (ms) | 200-step sentences/s |\n\
         |---|---:|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {:.2} M | {} | {} | {} | {} | {:.1} | {:.2} | {:.2} | {:.2} |\n",
            r.model,
            r.params as f64 / 1e6,
            r.device,
            r.threads,
            r.batch,
            r.seq_len,
            r.train_step_ms,
            r.sample_step_ms,
            r.sample_step_plain_clamp_ms,
            r.batch as f64 / (r.sample_step_ms * 200.0 / 1e3),
        ));
    }
    s
}

/// One row of the guided-cost table: per diffusion step at batch `batch`, the denoiser's time and
/// the guidance loop's (its gradient calls to the guide), and end to end a whole request of
/// `batch` texts, guided and not.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GuidedRow {
    pub batch: usize,
    pub denoiser_step_ms: f64,
    pub guidance_step_ms: f64,
    pub steps: usize,
    pub unguided_request_ms: f64,
    pub guided_request_ms: f64,
}

/// Measures guided sampling with `guide` (one control, `target`), medians over `reps`.
pub async fn guided(
    model: std::sync::Arc<crate::model::LoadedModel>,
    guide: std::sync::Arc<crate::guidance::RegisteredGuide>,
    target: &str,
    batches: &[usize],
    steps: usize,
    reps: usize,
    guidance: crate::guidance::GuidanceConfig,
) -> Result<Vec<GuidedRow>> {
    use crate::diffusion::sampler::{reverse_step, SeqStep};
    use crate::engine::{self, Control, EngineOptions, Event, Job};
    use crate::guidance::step::{guide_rows, GuidedRow as Row};
    let lm = &model.model;
    let cfg = &lm.config;
    let (l, d) = (cfg.seq_len, cfg.embed_dim);
    let device = lm.device().clone();
    let schedule = NoiseSchedule::new(cfg.schedule, cfg.diffusion_steps)?.respace(steps)?;
    let controls: std::sync::Arc<[Control]> = vec![Control {
        targets: guide.targets(&[target.to_string()])?,
        guide: std::sync::Arc::clone(&guide),
        weight: 1.0,
    }]
    .into();
    let engine = engine::start(
        std::sync::Arc::clone(&model),
        tokio::runtime::Handle::current(),
        EngineOptions {
            max_batch: batches.iter().copied().max().unwrap_or(1),
            max_queue: 16,
            guide_max_rows: 64,
        },
    )?;
    let request = |n: usize, controls: Vec<Control>, seed: u64| Job {
        id: seed,
        n,
        best_of: 1,
        steps,
        sampler: SamplerKind::Ddpm,
        seed,
        clamp: true,
        repeat_penalty: crate::diffusion::clamp::DEFAULT_REPEAT_PENALTY,
        controls: controls.into(),
        fixed: vec![None; l],
        guidance,
        progress_every: None,
        deadline: None,
    };
    let mut out = Vec::new();
    for &b in batches {
        let x = Tensor::randn(0f32, 1.0, (b, l, d), &device)?;
        let index = schedule.len() / 2;
        let seqs: Vec<SeqStep> = (0..b)
            .map(|_| SeqStep {
                schedule: &schedule,
                index,
                kind: SamplerKind::Ddpm,
                clamp: true,
                repeat_penalty: crate::diffusion::clamp::DEFAULT_REPEAT_PENALTY,
                words: None,
            })
            .collect();
        let mut denoiser = Vec::new();
        let mut guidance_ms = Vec::new();
        for rep in 0..=reps {
            let started = Instant::now();
            let p = reverse_step(lm, &x, &seqs, Some(&x))?;
            let mean = p.mean.flatten_all()?.to_vec1::<f32>()?;
            let x0 = p.x0.flatten_all()?.to_vec1::<f32>()?;
            let estimate = p.estimate.flatten_all()?.to_vec1::<f32>()?;
            let ms = started.elapsed().as_secs_f64() * 1e3;
            let rows: Vec<Row> = (0..b)
                .map(|j| Row {
                    mean: mean[j * l * d..(j + 1) * l * d].to_vec(),
                    x0: x0[j * l * d..(j + 1) * l * d].to_vec(),
                    estimate: estimate[j * l * d..(j + 1) * l * d].to_vec(),
                    signal: schedule.alphas_cumprod_prev[index].sqrt() as f32,
                    sigma: p.sigma[j],
                    t: schedule.timesteps[index - 1] as i64,
                    controls: std::sync::Arc::clone(&controls),
                    config: guidance,
                })
                .collect();
            let started = Instant::now();
            for r in guide_rows(&rows, 64).await {
                r?;
            }
            if rep > 0 {
                denoiser.push(ms);
                guidance_ms.push(started.elapsed().as_secs_f64() * 1e3);
            }
        }
        let whole = |controls: Vec<Control>| {
            let engine = engine.clone();
            let mut times = Vec::new();
            async move {
                for rep in 0..reps.div_ceil(2).max(1) {
                    let started = Instant::now();
                    let mut events = engine.submit(request(b, controls.clone(), rep as u64))?;
                    while let Some(e) = events.recv().await {
                        if let Event::Done(r) = e {
                            r?;
                            break;
                        }
                    }
                    times.push(started.elapsed().as_secs_f64() * 1e3);
                }
                Ok::<f64, crate::Error>(median(&times))
            }
        };
        let unguided_request_ms = whole(vec![]).await?;
        let guided_request_ms = whole(controls.to_vec()).await?;
        out.push(GuidedRow {
            batch: b,
            denoiser_step_ms: median(&denoiser),
            guidance_step_ms: median(&guidance_ms),
            steps,
            unguided_request_ms,
            guided_request_ms,
        });
    }
    Ok(out)
}

/// The guided-cost table, with the two ratios: throughput guided ÷ unguided (texts/s at the
/// batch) and latency guided ÷ unguided.
pub fn guided_table(rows: &[GuidedRow]) -> String {
    let mut s = String::from(
        "| B | denoiser step (ms) | guidance per step (ms) | unguided request (ms) | guided request (ms) | unguided texts/s | guided texts/s | guided ÷ unguided throughput |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let (u, g) = (
            r.batch as f64 / (r.unguided_request_ms / 1e3),
            r.batch as f64 / (r.guided_request_ms / 1e3),
        );
        s.push_str(&format!(
            "| {} | {:.2} | {:.2} | {:.0} | {:.0} | {:.1} | {:.1} | {:.2} |\n",
            r.batch,
            r.denoiser_step_ms,
            r.guidance_step_ms,
            r.unguided_request_ms,
            r.guided_request_ms,
            u,
            g,
            g / u
        ));
    }
    s
}
