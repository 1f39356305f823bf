//! Dynamic batching: concurrent requests for one model version that arrive within a short window
//! are concatenated along the batch dimension, run as one ONNX Runtime call, and split back.
//! One worker thread owns the session (ONNX Runtime's `run` needs it exclusively).

use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::runtime::{GuideBatch, GuideOutputs, GuideSession};
use crate::{GuideError, Result};

#[derive(Debug, Clone, Copy)]
pub struct BatchOptions {
    /// How long the first request of a batch waits for company.
    pub window: Duration,
    /// Most sequences in one run (a larger single request runs alone).
    pub max_batch: usize,
    /// Requests that may wait; past that, callers get UNAVAILABLE at once.
    pub queue: usize,
}

impl Default for BatchOptions {
    fn default() -> Self {
        Self {
            window: Duration::from_millis(2),
            max_batch: 64,
            queue: 1024,
        }
    }
}

struct Job {
    batch: GuideBatch,
    reply: oneshot::Sender<Result<GuideOutputs>>,
    enqueued: Instant,
}

/// The sending side; the worker stops when the last `Batcher` clone is dropped and its queue is empty.
#[derive(Clone)]
pub struct Batcher {
    tx: SyncSender<Job>,
}

impl Batcher {
    pub fn start(session: GuideSession, options: BatchOptions, label: String) -> Self {
        let (tx, rx) = sync_channel(options.queue.max(1));
        std::thread::Builder::new()
            .name(format!("guide-{label}"))
            .spawn(move || worker(session, rx, options, label))
            .expect("spawn batch worker");
        Self { tx }
    }

    pub async fn infer(&self, batch: GuideBatch) -> Result<GuideOutputs> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            batch,
            reply,
            enqueued: Instant::now(),
        };
        self.tx.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => {
                GuideError::Unavailable("guide queue is full; retry later".into())
            }
            TrySendError::Disconnected(_) => {
                GuideError::Unavailable("model version is shutting down".into())
            }
        })?;
        rx.await
            .map_err(|_| GuideError::Internal("batch worker stopped before answering".into()))?
    }
}

fn worker(mut session: GuideSession, rx: Receiver<Job>, options: BatchOptions, label: String) {
    let mut pending: Option<Job> = None;
    loop {
        let first = match pending.take() {
            Some(job) => job,
            None => match rx.recv() {
                Ok(job) => job,
                Err(_) => break,
            },
        };
        let deadline = Instant::now() + options.window;
        let mut total = first.batch.rows;
        let mut jobs = vec![first];
        while total < options.max_batch {
            let wait = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(job) if total + job.batch.rows <= options.max_batch => {
                    total += job.batch.rows;
                    jobs.push(job);
                }
                Ok(job) => {
                    pending = Some(job);
                    break;
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        run_batch(&mut session, jobs, total, &label);
    }
    tracing::debug!(model = %label, "batch worker stopped");
}

fn run_batch(session: &mut GuideSession, jobs: Vec<Job>, total: usize, label: &str) {
    let started = Instant::now();
    for job in &jobs {
        metrics::histogram!("dlm_guide_queue_seconds", "model" => label.to_string())
            .record(started.duration_since(job.enqueued).as_secs_f64());
    }
    metrics::histogram!("dlm_guide_batch_size", "model" => label.to_string()).record(total as f64);
    let result = if jobs.len() == 1 {
        session.run(&jobs[0].batch)
    } else {
        let mut merged = GuideBatch {
            rows: total,
            ..Default::default()
        };
        for job in &jobs {
            merged.latents.extend_from_slice(&job.batch.latents);
            merged.timesteps.extend_from_slice(&job.batch.timesteps);
            merged.targets.extend_from_slice(&job.batch.targets);
        }
        session.run(&merged)
    };
    metrics::histogram!("dlm_guide_compute_seconds", "model" => label.to_string())
        .record(started.elapsed().as_secs_f64());
    match result {
        Ok(out) => {
            let per_row = out.grad.len() / total.max(1);
            let mut row = 0;
            for job in jobs {
                let n = job.batch.rows;
                let part = GuideOutputs {
                    log_prob: out.log_prob[row..row + n].to_vec(),
                    grad: out.grad[row * per_row..(row + n) * per_row].to_vec(),
                };
                row += n;
                let _ = job.reply.send(Ok(part));
            }
        }
        Err(e) => {
            let message = e.to_string();
            for job in jobs {
                let _ = job.reply.send(Err(GuideError::Internal(message.clone())));
            }
        }
    }
}
