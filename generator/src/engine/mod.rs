//! The engine: one batch loop owns the model. Requests join and leave between steps; every
//! sequence carries its own schedule, step index and random stream, so one denoiser forward serves
//! the whole mixed batch.
//!
//! The loop never waits on a guide. At a guided step a sequence's proposal goes to the guidance
//! loop (`guidance::step`) as a task on the runtime, in a cohort with the other sequences that
//! need the same guides, and the sequence sits out the denoiser until its cohort answers; every
//! other sequence keeps stepping. A slow or dead guide delays only the sequences it steers, and an
//! unguided request's latency does not depend on any guide. Final scores are fetched the same way.
//!
//! Admission: a request holds a permit from submission until it is answered; `max_queue` permits
//! bound the requests in the engine (waiting or running). Length and infilling rewrite fixed
//! positions every step (no classifier needed).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use rand::rngs::StdRng;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::diffusion::likelihood::reconstruction_log_prob;
use crate::diffusion::sampler::{normal_row, reverse_step, sequence_rng, SeqStep, WordsUntil};
use crate::diffusion::{NoiseSchedule, SamplerKind};
use crate::guidance::step::{final_scores, guide_rows, GuidedRow};
pub use crate::guidance::Control;
use crate::guidance::GuidanceConfig;
use crate::model::LoadedModel;
use crate::{Error, Result};

#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    /// Sequences in one denoiser batch.
    pub max_batch: usize,
    /// Requests in the engine (waiting or running); past that, RESOURCE_EXHAUSTED.
    pub max_queue: usize,
    /// Rows in one guide call (larger guidance work is split into calls of this size).
    pub guide_max_rows: usize,
}

/// A validated generation request (the server builds it from the wire).
pub struct Job {
    /// The request's id (in logs and in the response).
    pub id: u64,
    pub n: usize,
    /// Candidates per text (≥ 1): the best by model log p + guides' log p is returned.
    pub best_of: usize,
    pub steps: usize,
    pub sampler: SamplerKind,
    pub seed: u64,
    pub clamp: bool,
    /// The joint clamp's price of two neighbours on one word (diffusion/clamp.rs; 0: independent).
    pub repeat_penalty: f32,
    pub controls: Arc<[Control]>,
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
    permit: OwnedSemaphorePermit,
}

/// What wakes the engine: a new request, or a guidance task's answer.
enum Inbox {
    Submit(Submitted),
    /// A cohort's guided means (or the error that ends a row's request), by sequence id.
    Guided {
        rows: Vec<(u64, Result<Vec<f32>>)>,
        ms: f64,
    },
    /// Finished texts with their final scores: (request, slot, text).
    Scored(Vec<Finished>),
}

/// A finished text: (request, slot, text).
type Finished = (u64, usize, GeneratedText);

/// The guides a request's controls call: sequences that need the same ones wait together.
fn guide_set(controls: &[Control]) -> Vec<usize> {
    let mut key: Vec<usize> = controls
        .iter()
        .map(|c| Arc::as_ptr(&c.guide) as usize)
        .collect();
    key.sort_unstable();
    key.dedup();
    key
}

/// Items grouped by the guide set they wait on.
type Groups<T> = Vec<(Vec<usize>, Vec<T>)>;

/// Adds `item` to the group of `key`, groups in first-seen order.
fn push_grouped<K: PartialEq, T>(groups: &mut Vec<(K, Vec<T>)>, key: K, item: T) {
    match groups.iter_mut().find(|g| g.0 == key) {
        Some(g) => g.1.push(item),
        None => groups.push((key, vec![item])),
    }
}

#[derive(Clone)]
pub struct EngineHandle {
    inbox: Sender<Inbox>,
    permits: Arc<Semaphore>,
    max_queue: usize,
    /// The engine stops when the last handle is gone and nothing is running.
    _alive: Arc<()>,
}

impl EngineHandle {
    /// Queues a job; events arrive on the returned channel. Dropping the receiver cancels the job.
    pub fn submit(&self, job: Job) -> Result<mpsc::UnboundedReceiver<Event>> {
        let permit = Arc::clone(&self.permits).try_acquire_owned().map_err(|_| {
            Error::ResourceExhausted(format!(
                "the generator holds {} requests, its --max-queue; retry later",
                self.max_queue
            ))
        })?;
        let (events, rx) = mpsc::unbounded_channel();
        self.inbox
            .send(Inbox::Submit(Submitted {
                job,
                events,
                submitted: Instant::now(),
                permit,
            }))
            .map_err(|_| Error::Unavailable("the generator is shutting down".into()))?;
        Ok(rx)
    }
}

/// A request in progress.
struct Running {
    job: Job,
    schedule: NoiseSchedule,
    events: mpsc::UnboundedSender<Event>,
    submitted: Instant,
    /// When its first sequence entered the batch.
    started: Option<Instant>,
    next_slot: usize,
    results: Vec<Option<GeneratedText>>,
    guidance_ms: f64,
    last_progress: Option<usize>,
    _permit: OwnedSemaphorePermit,
}

/// Mixed into a request's seed for the noise that scores its candidates (not the sampling noise).
const CANDIDATE_SCORE_STREAM: u64 = 0x5C0E_5C0E_5C0E_5C0E;

/// A guided step's proposal, kept while the sequence's cohort is with the guides.
struct Pending {
    x0: Vec<f32>,
    sigma: f32,
}

struct Seq {
    id: u64,
    run: u64,
    slot: usize,
    /// Latents x_t and the last x0 estimate (self-conditioning), flat [L·D].
    x: Vec<f32>,
    prev: Vec<f32>,
    index: usize,
    rng: StdRng,
    pending: Option<Pending>,
}

/// A sequence ready to take its noise: (id, mean, x0, sigma).
type Proposed = (u64, Vec<f32>, Vec<f32>, f32);

/// Starts the batch loop on its own thread; guidance tasks run on `rt`.
pub fn start(
    model: Arc<LoadedModel>,
    rt: tokio::runtime::Handle,
    options: EngineOptions,
) -> Result<EngineHandle> {
    let (tx, rx) = channel();
    let alive = Arc::new(());
    let cfg = &model.model.config;
    let train_schedule = NoiseSchedule::new(cfg.schedule, cfg.diffusion_steps)?;
    let embedding = model.model.embedding().to_vec2::<f32>()?;
    let words_table = model
        .model
        .embedding_without(&model.tokenizer.special_ids())?;
    let mut engine = Engine {
        train_schedule,
        embedding,
        words_table,
        model,
        rt,
        options,
        inbox: tx.clone(),
        running: HashMap::new(),
        seqs: Vec::new(),
        waiting: VecDeque::new(),
        next_seq: 0,
        tasks: 0,
    };
    let weak = Arc::downgrade(&alive);
    std::thread::Builder::new()
        .name("dlm-engine".into())
        .spawn(move || engine.run(rx, weak))
        .map_err(|e| Error::Internal(format!("cannot start the engine thread: {e}")))?;
    Ok(EngineHandle {
        inbox: tx,
        permits: Arc::new(Semaphore::new(options.max_queue.max(1))),
        max_queue: options.max_queue.max(1),
        _alive: alive,
    })
}

/// A sequence's fixed positions (length, infilling) after a step: in x_t [L·D] the known word's
/// embedding noised to the level ᾱ that x_t is now at, with x_t's own `noise`. A fixed word that is
/// a word (not one of the `special` START/END/PAD) also goes, clean, into the x0 estimate the next
/// step is self-conditioned on, so that the denoiser plans around it rather than its own blurred
/// guess at it (with the guess, a fixed "the vaults" was read as the start of the model's
/// favourite "the rice boat": "the vaults boat serves …"). An exact length's END and PAD keep the
/// denoiser's estimate: written clean too, whole-MR control fell 4–5 points on two draws (README).
fn write_fixed(
    fixed: &[Option<u32>],
    embedding: &[Vec<f32>],
    special: &[u32],
    abar: f64,
    noise: &[f32],
    x: &mut [f32],
    x0: &mut [f32],
) {
    let (a, c) = (abar.sqrt() as f32, (1.0 - abar).sqrt() as f32);
    let d = embedding.first().map_or(0, Vec::len);
    for (pos, &word) in fixed.iter().enumerate() {
        let Some(word) = word else { continue };
        let is_word = !special.contains(&word);
        for (j, &e) in embedding[word as usize].iter().enumerate() {
            let k = pos * d + j;
            if k < x.len() {
                x[k] = a * e + c * noise[k];
                if is_word {
                    x0[k] = e;
                }
            }
        }
    }
}

/// Where a request that fixed its length put END (the positions before it must be words).
fn fixed_end(fixed: &[Option<u32>], end_id: u32) -> Option<usize> {
    fixed.iter().position(|f| *f == Some(end_id))
}

struct Engine {
    model: Arc<LoadedModel>,
    rt: tokio::runtime::Handle,
    options: EngineOptions,
    inbox: Sender<Inbox>,
    running: HashMap<u64, Running>,
    seqs: Vec<Seq>,
    waiting: VecDeque<u64>,
    next_seq: u64,
    /// Guidance and scoring tasks in flight.
    tasks: usize,
    /// The model's training schedule (candidates are scored at its noise levels).
    train_schedule: NoiseSchedule,
    /// The word embeddings, for rewriting fixed positions.
    embedding: Vec<Vec<f32>>,
    /// The embedding without PAD/UNK/START/END: what positions before a fixed END clamp to.
    words_table: Tensor,
}

impl Engine {
    fn run(&mut self, rx: Receiver<Inbox>, alive: Weak<()>) {
        loop {
            let runnable = self.seqs.iter().any(|s| s.pending.is_none())
                || (self.seqs.len() < self.options.max_batch && !self.waiting.is_empty());
            let first = if runnable {
                rx.try_recv().ok()
            } else {
                // Idle or waiting on guides: wake often enough to keep deadlines.
                let wait = if self.running.is_empty() {
                    Duration::from_millis(100)
                } else {
                    Duration::from_millis(5)
                };
                match rx.recv_timeout(wait) {
                    Ok(m) => Some(m),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            };
            if let Some(m) = first {
                self.handle(m);
                while let Ok(m) = rx.try_recv() {
                    self.handle(m);
                }
            }
            if self.running.is_empty() && self.tasks == 0 && alive.strong_count() == 0 {
                break;
            }
            self.reap();
            self.admit();
            if self.seqs.iter().any(|s| s.pending.is_none()) {
                self.step_guarded();
            }
            metrics::gauge!("dlm_generator_queue_depth").set(self.waiting.len() as f64);
            metrics::gauge!("dlm_generator_requests_in_flight").set(self.running.len() as f64);
        }
        tracing::info!("engine stopped");
    }

    fn handle(&mut self, m: Inbox) {
        match m {
            Inbox::Submit(s) => self.accept(s),
            Inbox::Guided { rows, ms } => {
                self.tasks -= 1;
                let mut ready = Vec::new();
                let mut runs = BTreeSet::new();
                for (id, result) in rows {
                    let Some(s) = self.seqs.iter_mut().find(|s| s.id == id) else {
                        continue; // its request ended meanwhile
                    };
                    let (run, pending) = (s.run, s.pending.take());
                    runs.insert(run);
                    match (result, pending) {
                        (Ok(mean), Some(p)) => ready.push((id, mean, p.x0, p.sigma)),
                        (Err(e), _) => self.fail(run, e),
                        (Ok(_), None) => tracing::error!(seq = id, "guided row was not pending"),
                    }
                }
                for run in runs {
                    if let Some(r) = self.running.get_mut(&run) {
                        r.guidance_ms += ms;
                    }
                }
                if let Err(e) = self.advance(ready) {
                    tracing::error!(error = %e, "advancing guided rows failed");
                }
            }
            Inbox::Scored(texts) => {
                self.tasks -= 1;
                for (run, slot, text) in texts {
                    if let Some(r) = self.running.get_mut(&run) {
                        r.results[slot] = Some(text);
                    }
                }
                self.answer_complete();
            }
        }
    }

    fn accept(&mut self, s: Submitted) {
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
        let id = s.job.id;
        let n = s.job.n * s.job.best_of;
        tracing::debug!(request = id, texts = n, "accepted");
        self.running.insert(
            id,
            Running {
                job: s.job,
                schedule,
                events: s.events,
                submitted: s.submitted,
                started: None,
                next_slot: 0,
                results: (0..n).map(|_| None).collect(),
                guidance_ms: 0.0,
                last_progress: None,
                _permit: s.permit,
            },
        );
        self.waiting.push_back(id);
    }

    /// Drops requests whose caller went away or whose deadline passed (their slots free up now).
    fn reap(&mut self) {
        let now = Instant::now();
        let ids: Vec<u64> = self.running.keys().copied().collect();
        for id in ids {
            let r = &self.running[&id];
            if r.events.is_closed() {
                tracing::debug!(request = id, "cancelled by the client");
                metrics::counter!("dlm_generator_requests_total", "status" => "cancelled")
                    .increment(1);
                self.drop_run(id);
            } else if r.job.deadline.is_some_and(|d| now >= d) {
                self.fail(
                    id,
                    Error::DeadlineExceeded("deadline exceeded before the texts were done".into()),
                );
            }
        }
    }

    fn drop_run(&mut self, id: u64) {
        self.running.remove(&id);
        self.seqs.retain(|s| s.run != id);
        self.waiting.retain(|&w| w != id);
    }

    fn fail(&mut self, id: u64, e: Error) {
        if let Some(r) = self.running.get(&id) {
            tracing::debug!(request = id, error = %e, "failed");
            let _ = r.events.send(Event::Done(Err(e)));
        }
        self.drop_run(id);
    }

    fn admit(&mut self) {
        let cfg = &self.model.model.config;
        let per = cfg.seq_len * cfg.embed_dim;
        while self.seqs.len() < self.options.max_batch {
            let Some(&id) = self.waiting.front() else {
                break;
            };
            let Some(r) = self.running.get_mut(&id) else {
                self.waiting.pop_front();
                continue;
            };
            let slot = r.next_slot;
            r.next_slot += 1;
            r.started.get_or_insert_with(Instant::now);
            if r.next_slot >= r.results.len() {
                self.waiting.pop_front();
            }
            let mut rng = sequence_rng(r.job.seed, slot);
            let x = normal_row(&mut rng, per);
            self.next_seq += 1;
            self.seqs.push(Seq {
                id: self.next_seq,
                run: id,
                slot,
                x,
                prev: vec![0.0; per],
                index: r.schedule.len() - 1,
                rng,
                pending: None,
            });
        }
    }

    /// [`step`](Self::step), with a failure or a panic ending only the requests in that step.
    fn step_guarded(&mut self) {
        let in_step: BTreeSet<u64> = self
            .seqs
            .iter()
            .filter(|s| s.pending.is_none())
            .map(|s| s.run)
            .collect();
        let started = Instant::now();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step()));
        let error = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(panic) => Some(
                panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "panic".into()),
            ),
        };
        if let Some(e) = error {
            tracing::error!(error = %e, requests = in_step.len(), "engine step failed");
            for run in in_step {
                self.fail(run, Error::Internal(format!("the step failed: {e}")));
            }
        }
        metrics::histogram!("dlm_generator_step_seconds").record(started.elapsed().as_secs_f64());
    }

    /// One denoiser forward for every sequence not with the guides; guided proposals go to their
    /// cohorts' tasks, the rest take their noise now.
    fn step(&mut self) -> Result<()> {
        let model = Arc::clone(&self.model);
        let lm = &model.model;
        let cfg = &lm.config;
        let (l, d) = (cfg.seq_len, cfg.embed_dim);
        let per = l * d;
        let device = lm.device().clone();
        let ready: Vec<usize> = (0..self.seqs.len())
            .filter(|&i| self.seqs[i].pending.is_none())
            .collect();
        let b = ready.len();
        metrics::histogram!("dlm_generator_batch_size").record(b as f64);
        let gather = |f: fn(&Seq) -> &Vec<f32>| -> Result<Tensor> {
            let data: Vec<f32> = ready
                .iter()
                .flat_map(|&i| f(&self.seqs[i]).iter().copied())
                .collect();
            Ok(Tensor::from_vec(data, (b, l, d), &device)?)
        };
        let (x, prev) = (gather(|s| &s.x)?, gather(|s| &s.prev)?);
        let end = self.model.tokenizer.end_id();
        let steps: Vec<SeqStep> = ready
            .iter()
            .map(|&i| {
                let r = &self.running[&self.seqs[i].run];
                SeqStep {
                    schedule: &r.schedule,
                    index: self.seqs[i].index,
                    kind: r.job.sampler,
                    clamp: r.job.clamp,
                    repeat_penalty: r.job.repeat_penalty,
                    words: fixed_end(&r.job.fixed, end).map(|until| WordsUntil {
                        until,
                        table: &self.words_table,
                    }),
                }
            })
            .collect();
        let proposal = reverse_step(lm, &x, &steps, Some(&prev))?;
        let mean = proposal.mean.flatten_all()?.to_vec1::<f32>()?;
        let x0 = proposal.x0.flatten_all()?.to_vec1::<f32>()?;
        let estimate = proposal.estimate.flatten_all()?.to_vec1::<f32>()?;

        let mut now: Vec<Proposed> = Vec::new();
        // Cohorts: the sequences guided by the same set of guides wait together.
        let mut cohorts: Groups<(u64, GuidedRow)> = Vec::new();
        for (j, &i) in ready.iter().enumerate() {
            let s = &self.seqs[i];
            let r = &self.running[&s.run];
            let (m, x0) = (
                mean[j * per..(j + 1) * per].to_vec(),
                x0[j * per..(j + 1) * per].to_vec(),
            );
            let sigma = proposal.sigma[j];
            if r.job.controls.is_empty() || !r.job.guidance.active(s.index) {
                now.push((s.id, m, x0, sigma));
                continue;
            }
            let key = guide_set(&r.job.controls);
            let row = GuidedRow {
                mean: m,
                x0: x0.clone(),
                estimate: estimate[j * per..(j + 1) * per].to_vec(),
                signal: r.schedule.alphas_cumprod_prev[s.index].sqrt() as f32,
                sigma,
                // The guide sees the latents at the level they move to: step index − 1.
                t: r.schedule.timesteps[s.index.saturating_sub(1)] as i64,
                controls: Arc::clone(&r.job.controls),
                config: GuidanceConfig {
                    space: r.job.guidance.space_at(s.index),
                    ..r.job.guidance
                },
            };
            let id = s.id;
            self.seqs[i].pending = Some(Pending { x0, sigma });
            push_grouped(&mut cohorts, key, (id, row));
        }
        for (_, members) in cohorts {
            let (ids, rows): (Vec<u64>, Vec<GuidedRow>) = members.into_iter().unzip();
            self.tasks += 1;
            let (inbox, max_rows) = (self.inbox.clone(), self.options.guide_max_rows);
            self.rt.spawn(async move {
                let started = Instant::now();
                let results = guide_rows(&rows, max_rows).await;
                let ms = started.elapsed().as_secs_f64() * 1e3;
                let _ = inbox.send(Inbox::Guided {
                    rows: ids.into_iter().zip(results).collect(),
                    ms,
                });
            });
        }
        self.advance(now)
    }

    /// Adds each proposal's noise (x_{t−1} = mean + σ·ε from the sequence's own stream), rewrites
    /// fixed positions, and moves the sequences one step on; finished ones are rounded.
    fn advance(&mut self, proposed: Vec<Proposed>) -> Result<()> {
        let cfg = &self.model.model.config;
        let (l, d) = (cfg.seq_len, cfg.embed_dim);
        let mut finished = Vec::new();
        let mut runs = BTreeSet::new();
        let special = self.model.tokenizer.special_ids();
        for (id, mean, mut x0, sigma) in proposed {
            let Some(i) = self.seqs.iter().position(|s| s.id == id) else {
                continue;
            };
            let s = &mut self.seqs[i];
            let Some(r) = self.running.get(&s.run) else {
                continue;
            };
            let noise = normal_row(&mut s.rng, l * d);
            let mut x: Vec<f32> = mean
                .iter()
                .zip(&noise)
                .map(|(m, e)| m + e * sigma)
                .collect();
            let abar = r.schedule.alphas_cumprod_prev[s.index];
            write_fixed(
                &r.job.fixed,
                &self.embedding,
                &special,
                abar,
                &noise,
                &mut x,
                &mut x0,
            );
            s.x = x;
            s.prev = x0;
            runs.insert(s.run);
            if s.index == 0 {
                finished.push(s.id);
            } else {
                s.index -= 1;
            }
        }
        self.progress(&runs)?;
        if !finished.is_empty() {
            self.finish(&finished)?;
        }
        Ok(())
    }

    fn progress(&mut self, runs: &BTreeSet<u64>) -> Result<()> {
        for &id in runs {
            let Some(r) = self.running.get(&id) else {
                continue;
            };
            let Some(k) = r.job.progress_every.filter(|&k| k > 0) else {
                continue;
            };
            let rows: Vec<&Seq> = self.seqs.iter().filter(|s| s.run == id).collect();
            if rows.is_empty() || rows.iter().any(|s| s.pending.is_some()) {
                continue;
            }
            let index = rows[0].index;
            let done = r.schedule.len() - index;
            if !done.is_multiple_of(k) || index == 0 || r.last_progress == Some(index) {
                continue;
            }
            let cfg = &self.model.model.config;
            let mut texts = Vec::new();
            for s in &rows {
                let x0 = Tensor::from_vec(
                    s.prev.clone(),
                    (1, cfg.seq_len, cfg.embed_dim),
                    self.model.model.device(),
                )?;
                let ids = self.model.model.round(&x0)?;
                texts.push(self.model.tokenizer.decode(&ids[0]));
            }
            let _ = r.events.send(Event::Progress {
                remaining: index,
                total: r.schedule.len(),
                texts,
            });
            if let Some(r) = self.running.get_mut(&id) {
                r.last_progress = Some(index);
            }
        }
        Ok(())
    }

    /// Rounds final latents [L·D] to words. Fixed positions keep their word; when the request
    /// fixed the length (an END somewhere), the positions before it take the best real word, so that
    /// an exact-length request always gets exactly that many words.
    fn round(&self, x: &[f32], fixed: &[Option<u32>]) -> Result<Vec<u32>> {
        let tok = &self.model.tokenizer;
        let cfg = &self.model.model.config;
        let row = Tensor::from_vec(
            x.to_vec(),
            (1, cfg.seq_len, cfg.embed_dim),
            self.model.model.device(),
        )?;
        let logits = self
            .model
            .model
            .logits(&row)?
            .squeeze(0)?
            .to_vec2::<f32>()?;
        let end = fixed_end(fixed, tok.end_id());
        let special = tok.special_ids();
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
    fn score_candidates(&self, finished: &mut [Finished]) -> Result<()> {
        let lm = &self.model.model;
        let l = lm.config.seq_len;
        let ranked: Vec<usize> = (0..finished.len())
            .filter(|&i| {
                self.running
                    .get(&finished[i].0)
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
                let seed = self.running[run].job.seed;
                sequence_rng(seed ^ CANDIDATE_SCORE_STREAM, *slot)
            })
            .collect();
        let log_p = reconstruction_log_prob(lm, &self.train_schedule, &ids, &mut rngs)?;
        for (&i, lp) in ranked.iter().zip(log_p) {
            finished[i].2.model_log_prob = Some(lp);
        }
        Ok(())
    }

    /// Rounds the sequences that reached step 0 and ranks candidates; texts whose request has
    /// controls get their final scores from a task (grouped by guides, like guidance), the
    /// others are done now.
    fn finish(&mut self, ids: &[u64]) -> Result<()> {
        let tok = &self.model.tokenizer;
        let mut finished = Vec::with_capacity(ids.len());
        let mut latents = Vec::with_capacity(ids.len());
        for id in ids {
            let Some(i) = self.seqs.iter().position(|s| s.id == *id) else {
                continue;
            };
            let s = self.seqs.remove(i);
            let Some(r) = self.running.get(&s.run) else {
                continue;
            };
            let ids = self.round(&s.x, &r.job.fixed)?;
            let tokens: Vec<String> = tok
                .visible(&ids)
                .map(|id| tok.id_to_token(id).unwrap_or_default())
                .collect();
            let text = tok.decode(&ids);
            finished.push((
                s.run,
                s.slot,
                GeneratedText {
                    ids,
                    text,
                    tokens,
                    scores: Vec::new(),
                    model_log_prob: None,
                },
            ));
            latents.push(s.x);
        }
        self.score_candidates(&mut finished)?;
        let mut cohorts: Groups<(Finished, Vec<f32>)> = Vec::new();
        for ((run, slot, text), x) in finished.into_iter().zip(latents) {
            let r = self
                .running
                .get_mut(&run)
                .expect("a finished row's request");
            if r.job.controls.is_empty() {
                r.results[slot] = Some(text);
                continue;
            }
            push_grouped(
                &mut cohorts,
                guide_set(&r.job.controls),
                ((run, slot, text), x),
            );
        }
        for (_, members) in cohorts {
            let (mut texts, latents): (Vec<Finished>, Vec<Vec<f32>>) = members.into_iter().unzip();
            let controls: Vec<Arc<[Control]>> = texts
                .iter()
                .map(|(run, _, _)| Arc::clone(&self.running[run].job.controls))
                .collect();
            self.tasks += 1;
            let (inbox, max_rows) = (self.inbox.clone(), self.options.guide_max_rows);
            self.rt.spawn(async move {
                let scores = final_scores(&latents, &controls, max_rows).await;
                for ((_, _, text), scores) in texts.iter_mut().zip(scores) {
                    text.scores = scores.into_iter().flatten().collect();
                }
                let _ = inbox.send(Inbox::Scored(texts));
            });
        }
        self.answer_complete();
        Ok(())
    }

    /// Answers the requests whose every text is done.
    fn answer_complete(&mut self) {
        let complete: Vec<u64> = self
            .running
            .iter()
            .filter(|(_, r)| r.results.iter().all(Option::is_some))
            .map(|(id, _)| *id)
            .collect();
        for id in complete {
            let r = self.running.remove(&id).expect("complete run");
            let now = Instant::now();
            let started = r.started.unwrap_or(r.submitted);
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
                queue_ms: started.duration_since(r.submitted).as_secs_f64() * 1e3,
                sampling_ms: (now.duration_since(started).as_secs_f64() * 1e3 - r.guidance_ms)
                    .max(0.0),
                guidance_ms: r.guidance_ms,
                total_ms: now.duration_since(r.submitted).as_secs_f64() * 1e3,
            };
            tracing::debug!(request = id, "done");
            let _ = r.events.send(Event::Done(Ok(generated)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::write_fixed;

    #[test]
    fn a_fixed_word_is_noised_in_the_latents_and_clean_in_the_estimate() {
        let embedding = vec![vec![1.0, 2.0], vec![-3.0, 4.0]];
        // Three positions of D = 2: position 1 fixed to word 1, position 2 to id 0, a special
        // one (an exact length's PAD) that keeps the denoiser's estimate.
        let fixed = [None, Some(1), Some(0)];
        let noise = [0.5; 6];
        let (mut x, mut x0) = ([9.0; 6], [7.0; 6]);
        write_fixed(&fixed, &embedding, &[0], 0.64, &noise, &mut x, &mut x0);
        // √0.64 · e + √0.36 · 0.5
        let want = [9.0, 9.0, -2.1, 3.5, 1.1, 1.9];
        assert!(
            x.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6),
            "{x:?}"
        );
        assert_eq!(x0, [7.0, 7.0, -3.0, 4.0, 7.0, 7.0]);
    }
}
