//! The engine: one batch loop owns the model. Requests join and leave between steps; every
//! sequence carries its own schedule, step index and random stream, so one denoiser forward serves
//! the whole mixed batch. At each guided step every guide is called once, for all the sequences it
//! steers. Length and infilling rewrite fixed positions every step (no classifier needed).

use std::collections::VecDeque;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;
use rand::rngs::StdRng;
use tokio::sync::mpsc;

use crate::diffusion::likelihood::reconstruction_log_prob;
use crate::diffusion::sampler::{add_noise, normal_noise, reverse_step, sequence_rng, SeqStep};
use crate::diffusion::{NoiseSchedule, SamplerKind};
use crate::guidance::{self, GuidanceConfig, RegisteredGuide};
use crate::model::LoadedModel;
use crate::{Error, Result};

#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    /// Sequences in one denoiser batch.
    pub max_batch: usize,
    /// Requests waiting to start; past that, RESOURCE_EXHAUSTED.
    pub max_queue: usize,
}

/// Steer towards `targets` (a value id per field of `guide`, −1 = free) with `weight`.
#[derive(Clone)]
pub struct Control {
    pub guide: Arc<RegisteredGuide>,
    pub targets: Vec<i64>,
    pub weight: f32,
}

/// A validated generation request (the server builds it from the wire).
pub struct Job {
    pub n: usize,
    /// Candidates per text (≥ 1): the best by model log p + guides' log p is returned.
    pub best_of: usize,
    pub steps: usize,
    pub sampler: SamplerKind,
    pub seed: u64,
    pub clamp: bool,
    pub controls: Vec<Control>,
    /// Per canvas position: a word id that is fixed there (START/words/END/PAD), or None.
    pub fixed: Vec<Option<u32>>,
    pub guidance: GuidanceConfig,
    pub progress_every: Option<usize>,
    pub deadline: Option<Instant>,
}

pub struct GeneratedText {
    pub ids: Vec<u32>,
    pub text: String,
    pub tokens: Vec<String>,
    /// Final log p(c | x) per control, in control order.
    pub scores: Vec<(String, f32)>,
    /// The model's reconstruction log p of the text (computed when candidates are ranked).
    pub model_log_prob: Option<f32>,
}

impl GeneratedText {
    /// What best-of-k maximises: log p(text) + Σ log p(c | text), in nats.
    fn rank(&self) -> f32 {
        self.model_log_prob.unwrap_or(0.0) + self.scores.iter().map(|(_, s)| s).sum::<f32>()
    }
}

pub struct Generated {
    pub samples: Vec<GeneratedText>,
    pub seed: u64,
    pub queue_ms: f64,
    pub sampling_ms: f64,
    pub guidance_ms: f64,
    pub total_ms: f64,
}

pub enum Event {
    Progress {
        remaining: usize,
        total: usize,
        texts: Vec<String>,
    },
    Done(Result<Generated>),
}

struct Submitted {
    job: Job,
    events: mpsc::UnboundedSender<Event>,
    submitted: Instant,
}

#[derive(Clone)]
pub struct EngineHandle {
    tx: SyncSender<Submitted>,
}

impl EngineHandle {
    /// Queues a job; events arrive on the returned channel. Dropping the receiver cancels the job.
    pub fn submit(&self, job: Job) -> Result<mpsc::UnboundedReceiver<Event>> {
        let (events, rx) = mpsc::unbounded_channel();
        self.tx
            .try_send(Submitted {
                job,
                events,
                submitted: Instant::now(),
            })
            .map_err(|e| match e {
                TrySendError::Full(_) => {
                    Error::ResourceExhausted("the generator's queue is full; retry later".into())
                }
                TrySendError::Disconnected(_) => {
                    Error::Unavailable("the generator is shutting down".into())
                }
            })?;
        metrics::gauge!("dlm_generator_queue_depth").increment(1.0);
        Ok(rx)
    }
}

/// A request in progress.
struct Running {
    job: Job,
    schedule: NoiseSchedule,
    events: mpsc::UnboundedSender<Event>,
    submitted: Instant,
    started: Instant,
    next_slot: usize,
    results: Vec<Option<GeneratedText>>,
    guidance_ms: f64,
}

impl Running {
    fn done(&self) -> bool {
        self.results.iter().all(Option::is_some)
    }
}

/// Mixed into a request's seed for the noise that scores its candidates (not the sampling noise).
const CANDIDATE_SCORE_STREAM: u64 = 0x5C0E_5C0E_5C0E_5C0E;

/// A sequence a guide steers this step: (batch row, targets, weight).
type GuidedRow = (usize, Vec<i64>, f32);

struct Seq {
    run: usize, // index into `running`
    slot: usize,
    x: Tensor,
    prev: Tensor,
    index: usize,
    rng: StdRng,
}

/// Starts the batch loop on its own thread; guide calls run on `rt`.
pub fn start(
    model: Arc<LoadedModel>,
    rt: tokio::runtime::Handle,
    options: EngineOptions,
) -> EngineHandle {
    let (tx, rx) = sync_channel(options.max_queue.max(1));
    std::thread::Builder::new()
        .name("dlm-engine".into())
        .spawn(move || {
            let cfg = &model.model.config;
            let train_schedule = NoiseSchedule::new(cfg.schedule, cfg.diffusion_steps)
                .expect("a loaded model's schedule is valid");
            let mut engine = Engine {
                train_schedule,
                model,
                rt,
                options,
                running: Vec::new(),
                seqs: Vec::new(),
                waiting: VecDeque::new(),
            };
            engine.run(rx)
        })
        .expect("spawn engine thread");
    EngineHandle { tx }
}

struct Engine {
    model: Arc<LoadedModel>,
    rt: tokio::runtime::Handle,
    options: EngineOptions,
    running: Vec<Option<Running>>,
    seqs: Vec<Seq>,
    waiting: VecDeque<usize>,
    /// The model's training schedule (candidates are scored at its noise levels).
    train_schedule: NoiseSchedule,
}

impl Engine {
    fn run(&mut self, rx: Receiver<Submitted>) {
        loop {
            if self.seqs.is_empty() && self.waiting.is_empty() {
                match rx.recv() {
                    Ok(s) => self.accept(s),
                    Err(_) => break,
                }
            }
            while let Ok(s) = rx.try_recv() {
                self.accept(s);
            }
            self.reap();
            self.admit();
            if self.seqs.is_empty() {
                continue;
            }
            let started = Instant::now();
            if let Err(e) = self.step() {
                tracing::error!(error = %e, "engine step failed");
                let runs: Vec<usize> = self.seqs.iter().map(|s| s.run).collect();
                for r in runs {
                    self.fail(r, Error::Internal(e.to_string()));
                }
            }
            metrics::histogram!("dlm_generator_step_seconds")
                .record(started.elapsed().as_secs_f64());
        }
        tracing::info!("engine stopped");
    }

    fn accept(&mut self, s: Submitted) {
        metrics::gauge!("dlm_generator_queue_depth").decrement(1.0);
        let cfg = &self.model.model.config;
        let schedule = match NoiseSchedule::new(cfg.schedule, cfg.diffusion_steps)
            .and_then(|full| full.respace(s.job.steps))
        {
            Ok(sch) => sch,
            Err(e) => {
                let _ = s.events.send(Event::Done(Err(e)));
                return;
            }
        };
        let n = s.job.n * s.job.best_of;
        self.running.push(Some(Running {
            job: s.job,
            schedule,
            events: s.events,
            submitted: s.submitted,
            started: Instant::now(),
            next_slot: 0,
            results: (0..n).map(|_| None).collect(),
            guidance_ms: 0.0,
        }));
        self.waiting.push_back(self.running.len() - 1);
    }

    /// Drops requests whose caller went away or whose deadline passed (their slots free up now).
    fn reap(&mut self) {
        let now = Instant::now();
        for i in 0..self.running.len() {
            let Some(r) = &self.running[i] else { continue };
            if r.events.is_closed() {
                tracing::debug!(run = i, "cancelled by the client");
                metrics::counter!("dlm_generator_requests_total", "status" => "cancelled")
                    .increment(1);
                self.drop_run(i);
            } else if r.job.deadline.is_some_and(|d| now >= d) {
                self.fail(
                    i,
                    Error::DeadlineExceeded("deadline exceeded before the texts were done".into()),
                );
            }
        }
        // Compact the request table when nothing refers to the tail.
        while matches!(self.running.last(), Some(None)) {
            self.running.pop();
        }
    }

    fn drop_run(&mut self, i: usize) {
        self.running[i] = None;
        self.seqs.retain(|s| s.run != i);
        self.waiting.retain(|&w| w != i);
    }

    fn fail(&mut self, i: usize, e: Error) {
        if let Some(r) = &self.running[i] {
            metrics::counter!("dlm_generator_requests_total", "status" => status_label(&e))
                .increment(1);
            let _ = r.events.send(Event::Done(Err(e)));
        }
        self.drop_run(i);
    }

    fn admit(&mut self) {
        let cfg = &self.model.model.config;
        let (l, d) = (cfg.seq_len, cfg.embed_dim);
        let device = self.model.model.device().clone();
        while self.seqs.len() < self.options.max_batch {
            let Some(&i) = self.waiting.front() else {
                break;
            };
            let Some(r) = self.running[i].as_mut() else {
                self.waiting.pop_front();
                continue;
            };
            let slot = r.next_slot;
            r.next_slot += 1;
            if r.next_slot >= r.results.len() {
                self.waiting.pop_front();
            }
            let mut rng = sequence_rng(r.job.seed, slot);
            let x = match normal_noise(std::slice::from_mut(&mut rng), l, d, &device) {
                Ok(x) => x,
                Err(e) => {
                    self.fail(i, e);
                    continue;
                }
            };
            let prev = x.zeros_like().expect("zeros");
            let index = r.schedule.len() - 1;
            self.seqs.push(Seq {
                run: i,
                slot,
                x,
                prev,
                index,
                rng,
            });
        }
    }

    fn step(&mut self) -> Result<()> {
        let model = Arc::clone(&self.model);
        let lm = &model.model;
        let cfg = &lm.config;
        let (l, d) = (cfg.seq_len, cfg.embed_dim);
        let device = lm.device().clone();
        metrics::histogram!("dlm_generator_batch_size").record(self.seqs.len() as f64);
        let x = Tensor::cat(&self.seqs.iter().map(|s| &s.x).collect::<Vec<_>>(), 0)?;
        let prev = Tensor::cat(&self.seqs.iter().map(|s| &s.prev).collect::<Vec<_>>(), 0)?;
        let proposal = {
            let steps: Vec<SeqStep> = self
                .seqs
                .iter()
                .map(|s| {
                    let r = self.running[s.run].as_ref().expect("live run");
                    SeqStep {
                        schedule: &r.schedule,
                        index: s.index,
                        kind: r.job.sampler,
                        clamp: r.job.clamp,
                    }
                })
                .collect();
            reverse_step(lm, &x, &steps, Some(&prev))?
        };
        let mut mean = proposal.mean.flatten_all()?.to_vec1::<f32>()?;
        let per = l * d;

        // Guidance: for each guide, one batched call per gradient step for all sequences it steers.
        let failed = self.guide(&mut mean, &proposal.x0, &proposal.sigma, per)?;

        let mean = Tensor::from_vec(mean, (self.seqs.len(), l, d), &device)?;
        let mut noise_rows = Vec::with_capacity(self.seqs.len());
        for s in self.seqs.iter_mut() {
            noise_rows.push(normal_noise(
                std::slice::from_mut(&mut s.rng),
                l,
                d,
                &device,
            )?);
        }
        let noise = Tensor::cat(&noise_rows, 0)?;
        let x_next = add_noise(&mean, &proposal.sigma, &noise)?;
        let x_next = self.rewrite_fixed(&x_next, &noise)?;

        // Advance every sequence; collect the finished ones.
        let mut finished = Vec::new();
        for (b, s) in self.seqs.iter_mut().enumerate() {
            s.x = x_next.narrow(0, b, 1)?;
            s.prev = proposal.x0.narrow(0, b, 1)?;
            if s.index == 0 {
                finished.push(b);
            } else {
                s.index -= 1;
            }
        }
        self.progress(&proposal.x0)?;
        if !finished.is_empty() {
            self.finish(&finished, &x_next)?;
        }
        // Requests whose guide failed end now, after the batch has moved as one.
        for (run, e) in failed {
            self.fail(run, e);
        }
        Ok(())
    }

    /// One batched ModelInfer on the runtime: log p and its gradient for `lat` [rows, L, D].
    fn call_guide(
        &self,
        g: &Arc<RegisteredGuide>,
        lat: Vec<f32>,
        ts: Vec<i64>,
        tg: Vec<i64>,
    ) -> tokio::task::JoinHandle<Result<(Vec<f32>, Vec<f32>)>> {
        let cfg = &self.model.model.config;
        let (l, d) = (cfg.seq_len, cfg.embed_dim);
        let (client, fields, name) = (g.client.clone(), g.fields.len(), g.name.clone());
        let b = ts.len();
        let call_started = Instant::now();
        self.rt.spawn(async move {
            let out = client.gradient(&lat, (b, l, d), &ts, &tg, fields).await;
            metrics::histogram!("dlm_generator_guide_seconds", "guide" => name)
                .record(call_started.elapsed().as_secs_f64());
            out
        })
    }

    /// Drops from `by_guide` the rows whose request gates on satisfaction and whose current x0
    /// estimate the guide already reads as its targets (p(c | x̂0) at t = 0 at least the
    /// request's `satisfied_prob`): the text says it already, and pulling further only makes
    /// it say it twice. One call per guide; a guide that fails here keeps all its rows.
    fn drop_satisfied(
        &self,
        by_guide: &mut Vec<(Arc<RegisteredGuide>, Vec<GuidedRow>)>,
        x0: &Tensor,
        per: usize,
    ) -> Result<()> {
        let gated = |b: usize| {
            self.running[self.seqs[b].run]
                .as_ref()
                .is_some_and(|r| r.job.guidance.satisfied_prob < 1.0)
        };
        if !by_guide
            .iter()
            .any(|(_, rows)| rows.iter().any(|r| gated(r.0)))
        {
            return Ok(());
        }
        // Read out of the tensor only when some request gates (not on every guided step).
        let x0 = x0.flatten_all()?.to_vec1::<f32>()?;
        let calls: Vec<_> = by_guide
            .iter()
            .map(|(g, rows)| {
                let asked: Vec<&GuidedRow> = rows.iter().filter(|r| gated(r.0)).collect();
                if asked.is_empty() {
                    return None;
                }
                let lat = asked
                    .iter()
                    .flat_map(|r| x0[r.0 * per..(r.0 + 1) * per].iter().copied())
                    .collect();
                let tg = asked.iter().flat_map(|r| r.1.iter().copied()).collect();
                let rows: Vec<usize> = asked.iter().map(|r| r.0).collect();
                Some((rows, self.call_guide(g, lat, vec![0; asked.len()], tg)))
            })
            .collect();
        for ((_, rows), call) in by_guide.iter_mut().zip(calls) {
            let Some((asked, handle)) = call else {
                continue;
            };
            let Ok(Ok((log_p, _))) = self.rt.block_on(handle) else {
                continue;
            };
            let satisfied: Vec<usize> = asked
                .iter()
                .zip(log_p)
                .filter(|(&b, lp)| {
                    let r = self.running[self.seqs[b].run].as_ref().expect("live run");
                    r.job.guidance.satisfied(*lp)
                })
                .map(|(&b, _)| b)
                .collect();
            rows.retain(|r| !satisfied.contains(&r.0));
        }
        by_guide.retain(|(_, rows)| !rows.is_empty());
        Ok(())
    }

    /// Runs the guidance loop on the flat proposal means of guided sequences (`x0`: the x0
    /// estimates [B, L, D], read by the satisfaction gate). Returns the requests to fail because a
    /// guide they need failed (the others go on).
    fn guide(
        &mut self,
        mean: &mut [f32],
        x0: &Tensor,
        sigma: &[f32],
        per: usize,
    ) -> Result<Vec<(usize, Error)>> {
        let mut by_guide: Vec<(Arc<RegisteredGuide>, Vec<GuidedRow>)> = Vec::new();
        for (b, s) in self.seqs.iter().enumerate() {
            let r = self.running[s.run].as_ref().expect("live run");
            if !r.job.guidance.active(s.index) {
                continue;
            }
            for c in &r.job.controls {
                match by_guide.iter_mut().find(|(g, _)| Arc::ptr_eq(g, &c.guide)) {
                    Some((_, rows)) => rows.push((b, c.targets.clone(), c.weight)),
                    None => by_guide
                        .push((Arc::clone(&c.guide), vec![(b, c.targets.clone(), c.weight)])),
                }
            }
        }
        let started = Instant::now();
        self.drop_satisfied(&mut by_guide, x0, per)?;
        if by_guide.is_empty() {
            return Ok(Vec::new());
        }
        let original = mean.to_vec();
        let mut adagrad = vec![0f32; mean.len()];
        let rows_guided: std::collections::BTreeSet<usize> = by_guide
            .iter()
            .flat_map(|(_, rows)| rows.iter().map(|r| r.0))
            .collect();
        // The guide sees the latents at the level they move to: step index − 1 in training units.
        let t_of = |b: usize| -> i64 {
            let s = &self.seqs[b];
            let r = self.running[s.run].as_ref().expect("live run");
            r.schedule.timesteps[s.index.saturating_sub(1)] as i64
        };
        let config_of = |b: usize| {
            self.running[self.seqs[b].run]
                .as_ref()
                .expect("live run")
                .job
                .guidance
        };
        let k_max = rows_guided
            .iter()
            .map(|&b| config_of(b).steps_per_diffusion_step)
            .max()
            .unwrap_or(0);
        let mut failed_guides: Vec<(Arc<RegisteredGuide>, Error)> = Vec::new();
        for k in 0..k_max {
            let mut grad_sum = vec![0f32; mean.len()];
            let calls: Vec<_> = by_guide
                .iter()
                .filter(|(g, _)| !failed_guides.iter().any(|(f, _)| Arc::ptr_eq(f, g)))
                .map(|(g, rows)| {
                    let mut lat = Vec::with_capacity(rows.len() * per);
                    let mut ts = Vec::with_capacity(rows.len());
                    let mut tg = Vec::new();
                    for (b, targets, _) in rows {
                        lat.extend_from_slice(&mean[b * per..(b + 1) * per]);
                        ts.push(t_of(*b));
                        tg.extend_from_slice(targets);
                    }
                    let handle = self.call_guide(g, lat, ts, tg);
                    (Arc::clone(g), rows.clone(), handle)
                })
                .collect();
            for (g, rows, handle) in calls {
                let result = self
                    .rt
                    .block_on(handle)
                    .map_err(|e| Error::Internal(e.to_string()))
                    .and_then(|r| r);
                match result {
                    Ok((_, grad)) => {
                        for (j, (b, _, w)) in rows.iter().enumerate() {
                            for i in 0..per {
                                grad_sum[b * per + i] += w * grad[j * per + i];
                            }
                        }
                    }
                    Err(e) => failed_guides.push((g, e)),
                }
            }
            for &b in &rows_guided {
                let c = config_of(b);
                if k >= c.steps_per_diffusion_step {
                    continue;
                }
                let range = b * per..(b + 1) * per;
                guidance::update(
                    &c,
                    &mut mean[range.clone()],
                    &grad_sum[range.clone()],
                    &original[range.clone()],
                    sigma[b],
                    &mut adagrad[range],
                );
            }
        }
        let ms = started.elapsed().as_secs_f64() * 1e3;
        let runs: std::collections::BTreeSet<usize> =
            rows_guided.iter().map(|&b| self.seqs[b].run).collect();
        for r in &runs {
            if let Some(r) = self.running[*r].as_mut() {
                r.guidance_ms += ms;
            }
        }
        // Requests that depend on a guide that failed get UNAVAILABLE; the rest go on.
        let mut victims: Vec<(usize, Error)> = Vec::new();
        for (g, e) in failed_guides {
            let runs: std::collections::BTreeSet<usize> = self
                .seqs
                .iter()
                .filter(|s| {
                    self.running[s.run]
                        .as_ref()
                        .is_some_and(|r| r.job.controls.iter().any(|c| Arc::ptr_eq(&c.guide, &g)))
                })
                .map(|s| s.run)
                .collect();
            tracing::warn!(guide = %g.name, error = %e, requests = runs.len(), "guide failed");
            victims.extend(
                runs.into_iter()
                    .map(|r| (r, Error::Unavailable(e.to_string()))),
            );
        }
        Ok(victims)
    }

    /// Rewrites the fixed positions (length, infilling) of the new latents: the known word's
    /// embedding, noised to the level the latents are now at.
    fn rewrite_fixed(&self, x_next: &Tensor, noise: &Tensor) -> Result<Tensor> {
        if self.seqs.iter().all(|s| {
            self.running[s.run]
                .as_ref()
                .is_none_or(|r| r.job.fixed.iter().all(Option::is_none))
        }) {
            return Ok(x_next.clone());
        }
        let cfg = &self.model.model.config;
        let (l, d) = (cfg.seq_len, cfg.embed_dim);
        let emb = self.model.model.embedding().to_vec2::<f32>()?;
        let mut data = x_next.flatten_all()?.to_vec1::<f32>()?;
        let noise = noise.flatten_all()?.to_vec1::<f32>()?;
        for (b, s) in self.seqs.iter().enumerate() {
            let Some(r) = self.running[s.run].as_ref() else {
                continue;
            };
            let abar = r.schedule.alphas_cumprod_prev[s.index];
            let (a, c) = (abar.sqrt() as f32, (1.0 - abar).sqrt() as f32);
            for (pos, fixed) in r.job.fixed.iter().enumerate().take(l) {
                if let Some(id) = fixed {
                    let off = (b * l + pos) * d;
                    for j in 0..d {
                        data[off + j] = a * emb[*id as usize][j] + c * noise[off + j];
                    }
                }
            }
        }
        Ok(Tensor::from_vec(
            data,
            (self.seqs.len(), l, d),
            x_next.device(),
        )?)
    }

    fn progress(&self, x0: &Tensor) -> Result<()> {
        for (i, r) in self.running.iter().enumerate() {
            let Some(r) = r else { continue };
            let Some(k) = r.job.progress_every.filter(|&k| k > 0) else {
                continue;
            };
            let rows: Vec<(usize, usize)> = self
                .seqs
                .iter()
                .enumerate()
                .filter(|(_, s)| s.run == i)
                .map(|(b, s)| (b, s.index))
                .collect();
            let Some(&(_, index)) = rows.first() else {
                continue;
            };
            let done = r.schedule.len() - index;
            if done % k != 0 || index == 0 {
                continue;
            }
            let mut texts = Vec::new();
            for (b, _) in &rows {
                let ids = self.model.model.round(&x0.narrow(0, *b, 1)?)?;
                texts.push(self.model.tokenizer.decode(&ids[0]));
            }
            let _ = r.events.send(Event::Progress {
                remaining: index,
                total: r.schedule.len(),
                texts,
            });
        }
        Ok(())
    }

    /// Each finished row's final log p(c | x0) per control (in control order; None where its guide
    /// failed, which does not fail the request): one call per guide for all rows, at t = 0.
    fn final_scores(
        &self,
        rows: &[usize],
        x_final: &Tensor,
    ) -> Result<Vec<Vec<Option<(String, f32)>>>> {
        let cfg = &self.model.model.config;
        let per = cfg.seq_len * cfg.embed_dim;
        let mut scores: Vec<Vec<Option<(String, f32)>>> = Vec::with_capacity(rows.len());
        // (guide, [(row position, control index, targets)])
        let mut by_guide: Vec<(Arc<RegisteredGuide>, Vec<(usize, usize, &[i64])>)> = Vec::new();
        for (j, &b) in rows.iter().enumerate() {
            let controls = self.running[self.seqs[b].run]
                .as_ref()
                .map_or(&[][..], |r| &r.job.controls[..]);
            scores.push(vec![None; controls.len()]);
            for (k, c) in controls.iter().enumerate() {
                let entry = (j, k, &c.targets[..]);
                match by_guide.iter_mut().find(|(g, _)| Arc::ptr_eq(g, &c.guide)) {
                    Some((_, entries)) => entries.push(entry),
                    None => by_guide.push((Arc::clone(&c.guide), vec![entry])),
                }
            }
        }
        if by_guide.is_empty() {
            return Ok(scores);
        }
        let latents = x_final.flatten_all()?.to_vec1::<f32>()?;
        let calls: Vec<_> = by_guide
            .iter()
            .map(|(g, entries)| {
                let mut lat = Vec::with_capacity(entries.len() * per);
                let mut targets = Vec::new();
                for &(j, _, tg) in entries {
                    let b = rows[j];
                    lat.extend_from_slice(&latents[b * per..(b + 1) * per]);
                    targets.extend_from_slice(tg);
                }
                let (client, fields, n) = (g.client.clone(), g.fields.len(), entries.len());
                let dims = (n, cfg.seq_len, cfg.embed_dim);
                self.rt.spawn(async move {
                    client
                        .gradient(&lat, dims, &vec![0; n], &targets, fields)
                        .await
                })
            })
            .collect();
        for ((g, entries), call) in by_guide.iter().zip(calls) {
            match self.rt.block_on(call) {
                Ok(Ok((log_p, _))) => {
                    for (&(j, k, _), lp) in entries.iter().zip(log_p) {
                        scores[j][k] = Some((g.name.clone(), lp));
                    }
                }
                Ok(Err(e)) => tracing::warn!(guide = %g.name, error = %e, "final scoring failed"),
                Err(e) => tracing::warn!(guide = %g.name, error = %e, "final scoring task failed"),
            }
        }
        Ok(scores)
    }

    /// Rounds final latents [1, L, D] to words. Fixed positions keep their word; when the request
    /// fixed the length (an END somewhere), the positions before it take the best real word, so that
    /// an exact-length request always gets exactly that many words.
    fn round(&self, row: &Tensor, fixed: &[Option<u32>]) -> Result<Vec<u32>> {
        let tok = &self.model.tokenizer;
        let logits = self.model.model.logits(row)?.squeeze(0)?.to_vec2::<f32>()?;
        let end = fixed.iter().position(|f| *f == Some(tok.end_id()));
        let special = [tok.pad_id(), tok.unk_id(), tok.start_id(), tok.end_id()];
        Ok(logits
            .iter()
            .enumerate()
            .map(|(pos, lg)| {
                if let Some(Some(id)) = fixed.get(pos) {
                    return *id;
                }
                let free_word = end.is_some_and(|e| pos > 0 && pos < e);
                lg.iter()
                    .enumerate()
                    .filter(|(id, _)| !free_word || !special.contains(&(*id as u32)))
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map(|(id, _)| id as u32)
                    .unwrap_or(tok.unk_id())
            })
            .collect())
    }

    /// The model's reconstruction log p of finished texts whose request ranks candidates, in one
    /// batch; each text's noise comes from its own stream (request seed, slot), so its score does
    /// not depend on what finished beside it.
    fn score_candidates(&self, finished: &mut [(usize, usize, GeneratedText)]) -> Result<()> {
        let lm = &self.model.model;
        let l = lm.config.seq_len;
        let ranked: Vec<usize> = (0..finished.len())
            .filter(|&i| {
                self.running[finished[i].0]
                    .as_ref()
                    .is_some_and(|r| r.job.best_of > 1)
            })
            .collect();
        if ranked.is_empty() {
            return Ok(());
        }
        let ids: Vec<u32> = ranked
            .iter()
            .flat_map(|&i| finished[i].2.ids.clone())
            .collect();
        let ids = Tensor::from_vec(ids, (ranked.len(), l), lm.device())?;
        let mut rngs: Vec<StdRng> = ranked
            .iter()
            .map(|&i| {
                let (run, slot, _) = &finished[i];
                let seed = self.running[*run].as_ref().expect("ranked run").job.seed;
                sequence_rng(seed ^ CANDIDATE_SCORE_STREAM, *slot)
            })
            .collect();
        let log_p = reconstruction_log_prob(lm, &self.train_schedule, &ids, &mut rngs)?;
        for (&i, lp) in ranked.iter().zip(log_p) {
            finished[i].2.model_log_prob = Some(lp);
        }
        Ok(())
    }

    /// Rounds the rows that reached step 0, scores them, and answers the requests now complete.
    fn finish(&mut self, rows: &[usize], x_final: &Tensor) -> Result<()> {
        let tok = &self.model.tokenizer;
        let scores = self.final_scores(rows, x_final)?;
        let mut finished = Vec::with_capacity(rows.len());
        for (&b, scores) in rows.iter().zip(scores) {
            let s = &self.seqs[b];
            let (run, slot) = (s.run, s.slot);
            let Some(r) = self.running[run].as_ref() else {
                continue;
            };
            let ids = self.round(&x_final.narrow(0, b, 1)?, &r.job.fixed)?;
            let tokens: Vec<String> = tok
                .visible(&ids)
                .map(|id| tok.id_to_token(id).unwrap_or_default())
                .collect();
            let text = tok.decode(&ids);
            finished.push((
                run,
                slot,
                GeneratedText {
                    ids,
                    text,
                    tokens,
                    scores: scores.into_iter().flatten().collect(),
                    model_log_prob: None,
                },
            ));
        }
        self.score_candidates(&mut finished)?;
        for (run, slot, text) in finished {
            if let Some(r) = self.running[run].as_mut() {
                r.results[slot] = Some(text);
            }
        }
        // Answer completed requests and drop their sequences.
        let mut rows_sorted = rows.to_vec();
        rows_sorted.sort_unstable_by(|a, b| b.cmp(a));
        for b in rows_sorted {
            self.seqs.remove(b);
        }
        for i in 0..self.running.len() {
            let complete = self.running[i].as_ref().is_some_and(|r| r.done());
            if !complete {
                continue;
            }
            let r = self.running[i].take().expect("complete run");
            let now = Instant::now();
            let k = r.job.best_of.max(1);
            let mut candidates = r.results.into_iter().map(|x| x.expect("done"));
            let samples = (0..r.job.n)
                .map(|_| {
                    candidates
                        .by_ref()
                        .take(k)
                        .reduce(|best, c| if c.rank() > best.rank() { c } else { best })
                        .expect("k ≥ 1 candidates")
                })
                .collect();
            let generated = Generated {
                samples,
                seed: r.job.seed,
                queue_ms: r.started.duration_since(r.submitted).as_secs_f64() * 1e3,
                sampling_ms: now.duration_since(r.started).as_secs_f64() * 1e3 - r.guidance_ms,
                guidance_ms: r.guidance_ms,
                total_ms: now.duration_since(r.submitted).as_secs_f64() * 1e3,
            };
            metrics::counter!("dlm_generator_requests_total", "status" => "ok").increment(1);
            let _ = r.events.send(Event::Done(Ok(generated)));
        }
        Ok(())
    }
}

fn status_label(e: &Error) -> &'static str {
    match e {
        Error::InvalidArgument { .. } => "invalid_argument",
        Error::Unavailable(_) => "unavailable",
        Error::DeadlineExceeded(_) => "deadline_exceeded",
        Error::ResourceExhausted(_) => "resource_exhausted",
        _ => "error",
    }
}
