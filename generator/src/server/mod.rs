//! The generator's gRPC surface (`dlm.v1.Generator`), health, reflection and metrics. Methods are
//! thin: they validate and convert wire requests into engine jobs, and engine events into replies.
//! [`http`] serves the same methods as HTTP/JSON (and the playground page).

pub mod http;
mod syntax;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dlm_proto::dlm::v1 as pb;
use pb::generator_server::{Generator, GeneratorServer};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::diffusion::SamplerKind;
use crate::engine::{Control, EngineHandle, Event, Generated, Job};
use crate::guidance::{GuidanceConfig, GuidanceSpace, GuidanceUpdate, GuideRegistry, GuideSpec};
use crate::model::LoadedModel;
use crate::{Error, Result};

/// Request limits and defaults.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_n: usize,
    pub default_steps: usize,
    /// Controls in one request (after routing: one per guide a control's targets go to).
    pub max_controls: usize,
    /// Targets in one control.
    pub max_targets: usize,
}

/// Requests are numbered in arrival order; the number keys logs, the engine and the response.
static NEXT_REQUEST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// How long before the client's deadline the server answers DEADLINE_EXCEEDED itself, so that its
/// status reaches the client before the client's own timer (or tonic's) turns it into CANCELLED.
const DEADLINE_MARGIN: Duration = Duration::from_millis(20);

pub struct GeneratorService {
    model: Arc<LoadedModel>,
    engine: EngineHandle,
    guides: Arc<GuideRegistry>,
    limits: Limits,
    /// Set by [`serve`] once the start-up guides are registered.
    ready: Arc<std::sync::atomic::AtomicBool>,
    admin: dlm_proto::security::AdminToken,
}

impl GeneratorService {
    pub fn new(
        model: Arc<LoadedModel>,
        engine: EngineHandle,
        guides: Arc<GuideRegistry>,
        limits: Limits,
    ) -> Self {
        Self {
            model,
            engine,
            guides,
            limits,
            ready: Arc::default(),
            admin: dlm_proto::security::AdminToken::disabled(),
        }
    }

    /// Whether the start-up guides are registered (gRPC health SERVING, HTTP /readyz 200).
    pub fn is_ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::Acquire)
    }

    /// SetGuide and RemoveGuide need this token (without it they are disabled).
    pub fn with_admin(mut self, admin: dlm_proto::security::AdminToken) -> Self {
        self.admin = admin;
        self
    }

    /// Wire → engine job, every field checked.
    pub fn job(&self, id: u64, r: &pb::GenerateRequest, deadline: Option<Instant>) -> Result<Job> {
        let cfg = &self.model.model.config;
        let tok = &self.model.tokenizer;
        let n = r.n as usize;
        if n == 0 || n > self.limits.max_n {
            return Err(Error::invalid(
                "n",
                format!("must be between 1 and {}, got {n}", self.limits.max_n),
            ));
        }
        let best_of = r.best_of.unwrap_or(1) as usize;
        if best_of == 0 || n * best_of > self.limits.max_n {
            return Err(Error::invalid(
                "best_of",
                format!(
                    "must be at least 1 with n × best_of at most {}, got {n} × {best_of}",
                    self.limits.max_n
                ),
            ));
        }
        let steps = r
            .steps
            .map(|s| s as usize)
            .unwrap_or(self.limits.default_steps);
        if steps == 0 || steps > cfg.diffusion_steps {
            return Err(Error::invalid(
                "steps",
                format!(
                    "must be between 1 and T = {}, got {steps}",
                    cfg.diffusion_steps
                ),
            ));
        }
        let sampler = match pb::Sampler::try_from(r.sampler) {
            Ok(pb::Sampler::Ddim) => SamplerKind::Ddim,
            Ok(pb::Sampler::Ddpm | pb::Sampler::Unspecified) => SamplerKind::Ddpm,
            Err(_) => {
                return Err(Error::invalid(
                    "sampler",
                    format!(
                        "unknown value {} (SAMPLER_DDPM = 1, SAMPLER_DDIM = 2)",
                        r.sampler
                    ),
                ))
            }
        };
        let lim = &self.limits;
        if r.controls.len() > lim.max_controls {
            return Err(Error::invalid(
                "controls",
                format!(
                    "{} controls; at most {}",
                    r.controls.len(),
                    lim.max_controls
                ),
            ));
        }
        let mut controls = Vec::new();
        for (i, c) in r.controls.iter().enumerate() {
            if c.targets.is_empty() {
                return Err(Error::invalid(
                    "controls.targets",
                    format!(
                        "controls[{i}] (guide `{}`) has no targets",
                        dlm_proto::guide_contract::clip(&c.guide, 64)
                    ),
                ));
            }
            if c.targets.len() > lim.max_targets {
                return Err(Error::invalid(
                    "controls.targets",
                    format!(
                        "controls[{i}] has {} targets; at most {}",
                        c.targets.len(),
                        lim.max_targets
                    ),
                ));
            }
            let weight = control_weight("controls.weight", c.weight)?;
            let routed = if c.guide.is_empty() {
                self.guides.route(&c.targets)?
            } else {
                vec![(self.guides.get(&c.guide)?, c.targets.clone())]
            };
            for (guide, targets) in routed {
                controls.push(Control {
                    targets: guide.targets(&targets)?,
                    guide,
                    weight,
                });
            }
            if controls.len() > lim.max_controls {
                return Err(Error::invalid(
                    "controls",
                    format!(
                        "the targets go to {} guides; at most {} controls",
                        controls.len(),
                        lim.max_controls
                    ),
                ));
            }
        }
        let l = cfg.seq_len;
        let mut length = r.length.map(|k| k as usize);
        if let Some(s) = &r.syntax {
            let (more, fixed_length) = syntax::syntax_controls(&self.guides, s, length, l - 2)?;
            controls.extend(more);
            length = fixed_length;
            if controls.len() > lim.max_controls {
                return Err(Error::invalid(
                    "syntax.spans",
                    format!(
                        "the request has {} controls with its spans; at most {}",
                        controls.len(),
                        lim.max_controls
                    ),
                ));
            }
        }
        // Canvas: START w1..wK END PAD…; length and infilling fix positions.
        let mut fixed: Vec<Option<u32>> = vec![None; l];
        let template = r
            .infill
            .as_ref()
            .map(|i| i.template.as_slice())
            .unwrap_or(&[]);
        if let Some(k) = length {
            if k == 0 || k + 2 > l {
                return Err(Error::invalid(
                    "length",
                    format!("must be between 1 and {} words, got {k}", l - 2),
                ));
            }
            if !template.is_empty() && template.len() != k {
                return Err(Error::invalid(
                    "infill.template",
                    format!("has {} positions but length is {k}", template.len()),
                ));
            }
            fixed[0] = Some(tok.start_id());
            fixed[k + 1] = Some(tok.end_id());
            for slot in fixed.iter_mut().skip(k + 2) {
                *slot = Some(tok.pad_id());
            }
        }
        if !template.is_empty() {
            if template.len() + 2 > l {
                return Err(Error::invalid(
                    "infill.template",
                    format!("has {} positions; at most {} fit", template.len(), l - 2),
                ));
            }
            fixed[0] = Some(tok.start_id());
            for (i, word) in template.iter().enumerate() {
                let w = word.trim();
                if w.is_empty() || w == "_" {
                    continue;
                }
                let ids = tok.encode(w)?;
                if ids.len() != 1 || ids[0] == tok.unk_id() {
                    return Err(Error::invalid(
                        "infill.template",
                        format!("`{w}` (position {i}) is not one word of the vocabulary"),
                    ));
                }
                fixed[i + 1] = Some(ids[0]);
            }
        }
        let guidance = guidance_config(&r.guidance.unwrap_or_default())?;
        guidance.check_steps(steps)?;
        let repeat_penalty = crate::diffusion::clamp::repeat_penalty(
            "clamp_repeat_penalty",
            r.clamp_repeat_penalty,
        )?;
        Ok(Job {
            id,
            n,
            best_of,
            steps,
            sampler,
            seed: r.seed.unwrap_or_else(rand::random),
            clamp: r.clamp.unwrap_or(true),
            repeat_penalty,
            controls: controls.into(),
            fixed,
            guidance,
            progress_every: r.progress_every.map(|v| v as usize),
            deadline,
        })
    }
}

/// A guide gradient's weight (default 1), within [0, MAX_CONTROL_WEIGHT]; `field` names it in the error.
fn control_weight(field: &'static str, weight: Option<f32>) -> Result<f32> {
    let weight = weight.unwrap_or(1.0);
    let max_weight = crate::guidance::MAX_CONTROL_WEIGHT;
    if !(weight.is_finite() && (0.0..=max_weight).contains(&weight)) {
        return Err(Error::invalid(
            field,
            format!("must be in [0, {max_weight}], got {weight}"),
        ));
    }
    Ok(weight)
}

/// Wire guidance settings → the engine's, over the defaults; unknown enum values and values out of
/// their documented ranges are INVALID_ARGUMENT naming the field.
pub fn guidance_config(g: &pb::Guidance) -> Result<GuidanceConfig> {
    let d = GuidanceConfig::default();
    let guidance = GuidanceConfig {
        steps_per_diffusion_step: g
            .steps_per_diffusion_step
            .map(|v| v as usize)
            .unwrap_or(d.steps_per_diffusion_step),
        step_size: g.step_size.unwrap_or(d.step_size),
        update: match pb::GuidanceUpdate::try_from(g.update) {
            Ok(pb::GuidanceUpdate::Sign) => GuidanceUpdate::Sign,
            Ok(pb::GuidanceUpdate::Adagrad) => GuidanceUpdate::Adagrad,
            Ok(pb::GuidanceUpdate::Normalized) => GuidanceUpdate::Normalized,
            Ok(pb::GuidanceUpdate::Proximal) => GuidanceUpdate::Proximal,
            Ok(pb::GuidanceUpdate::Unspecified) => d.update,
            Err(_) => {
                return Err(Error::invalid(
                    "guidance.update",
                    format!(
                        "unknown value {} (ADAGRAD = 1, SIGN = 2, NORMALIZED = 3, PROXIMAL = 4)",
                        g.update
                    ),
                ))
            }
        },
        space: match pb::GuidanceSpace::try_from(g.space) {
            Ok(pb::GuidanceSpace::Latent) => GuidanceSpace::Latent,
            Ok(pb::GuidanceSpace::Estimate) => GuidanceSpace::Estimate,
            Ok(pb::GuidanceSpace::Unspecified) => d.space,
            Err(_) => {
                return Err(Error::invalid(
                    "guidance.space",
                    format!("unknown value {} (LATENT = 1, ESTIMATE = 2)", g.space),
                ))
            }
        },
        fluency_weight: g.fluency_weight.unwrap_or(d.fluency_weight),
        start_step: g.start_step.map(|v| v as usize),
        stop_step: g.stop_step.map(|v| v as usize).unwrap_or(d.stop_step),
        estimate_until: g.estimate_until.map_or(d.estimate_until, |v| v as usize),
        satisfied_prob: g.satisfied_prob.unwrap_or(d.satisfied_prob),
    };
    guidance.validate()?;
    Ok(guidance)
}

/// When a gRPC call reached the server, stamped before its body is read. tonic starts its own
/// `grpc-timeout` timer (which answers CANCELLED) at that moment; a deadline counted from the
/// handler's start instead loses the race whenever the body arrives late on a busy machine.
#[derive(Clone, Copy)]
struct Arrival(Instant);

fn stamp_arrival(mut req: Request<()>) -> std::result::Result<Request<()>, Status> {
    req.extensions_mut().insert(Arrival(Instant::now()));
    Ok(req)
}

/// The client's deadline (`grpc-timeout`) counted from the call's [`Arrival`] (now, for HTTP
/// calls), less [`DEADLINE_MARGIN`]; None when absent, malformed or beyond what the clock can
/// represent (no deadline then).
fn deadline_of<T>(req: &Request<T>) -> Option<Instant> {
    let header = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (value, unit) = header.split_at(header.len().checked_sub(1)?);
    let v: u64 = value.parse().ok()?;
    let d = match unit {
        "H" => Duration::from_secs(v.checked_mul(3600)?),
        "M" => Duration::from_secs(v.checked_mul(60)?),
        "S" => Duration::from_secs(v),
        "m" => Duration::from_millis(v),
        "u" => Duration::from_micros(v),
        "n" => Duration::from_nanos(v),
        _ => return None,
    };
    let arrival = req
        .extensions()
        .get::<Arrival>()
        .map_or_else(Instant::now, |a| a.0);
    arrival
        .checked_add(d)
        .map(|t| t.checked_sub(DEADLINE_MARGIN).unwrap_or(t))
}

/// Counts a finished call under its outcome: `ok`, or its error's label in the one error table.
fn count(error: Option<&Error>) {
    let status = error.map_or("ok", |e| e.code_and_label().1);
    metrics::counter!("dlm_generator_requests_total", "status" => status).increment(1);
}

/// Waits for the job's answer, or answers DEADLINE_EXCEEDED at the deadline itself.
async fn answer(
    events: &mut tokio::sync::mpsc::UnboundedReceiver<Event>,
    deadline: Option<Instant>,
) -> Option<Event> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d.into(), events.recv())
            .await
            .unwrap_or_else(|_| {
                Some(Event::Done(Err(Error::DeadlineExceeded(
                    "deadline exceeded before the texts were done".into(),
                ))))
            }),
        None => events.recv().await,
    }
}

fn to_wire(id: u64, g: Generated) -> pb::GenerateResponse {
    pb::GenerateResponse {
        request_id: id,
        samples: g
            .samples
            .into_iter()
            .map(|s| pb::Sample {
                text: s.text,
                tokens: s.tokens,
                scores: s
                    .scores
                    .into_iter()
                    .map(|(guide, log_prob)| pb::GuideScore { guide, log_prob })
                    .collect(),
                model_log_prob: s.model_log_prob,
            })
            .collect(),
        seed: g.seed,
        timings: Some(pb::Timings {
            queue_ms: g.queue_ms,
            sampling_ms: g.sampling_ms,
            guidance_ms: g.guidance_ms,
            total_ms: g.total_ms,
        }),
    }
}

type EventStream =
    Pin<Box<dyn Stream<Item = std::result::Result<pb::GenerateEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Generator for GeneratorService {
    async fn generate(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> std::result::Result<Response<pb::GenerateResponse>, Status> {
        use tracing::Instrument;
        let id = NEXT_REQUEST.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let deadline = deadline_of(&req);
        async move {
            let result = async {
                let job = self.job(id, req.get_ref(), deadline)?;
                let mut events = self.engine.submit(job)?;
                loop {
                    match answer(&mut events, deadline).await {
                        Some(Event::Done(result)) => return result,
                        Some(Event::Progress { .. }) => continue,
                        None => {
                            return Err(Error::Internal(
                                "the engine stopped before answering".into(),
                            ))
                        }
                    }
                }
            }
            .await;
            count(result.as_ref().err());
            if let Err(e) = &result {
                tracing::info!(error = %e, "request failed");
            }
            Ok(Response::new(to_wire(id, result?)))
        }
        .instrument(tracing::info_span!("request", id))
        .await
    }

    type GenerateStreamStream = EventStream;

    async fn generate_stream(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> std::result::Result<Response<EventStream>, Status> {
        use tracing::Instrument;
        let id = NEXT_REQUEST.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let span = tracing::info_span!("request", id);
        let deadline = deadline_of(&req);
        let mut r = req.into_inner();
        r.progress_every.get_or_insert(10);
        let submitted = self
            .job(id, &r, deadline)
            .and_then(|job| self.engine.submit(job));
        let mut events = match submitted {
            Ok(events) => events,
            Err(e) => {
                count(Some(&e));
                return Err(e.into());
            }
        };
        let stream = async_stream(move |tx| {
            async move {
                while let Some(event) = answer(&mut events, deadline).await {
                    let msg = match event {
                        Event::Progress {
                            remaining,
                            total,
                            texts,
                        } => Ok(pb::GenerateEvent {
                            event: Some(pb::generate_event::Event::Progress(pb::Progress {
                                step: remaining as u32,
                                total_steps: total as u32,
                                texts,
                            })),
                        }),
                        Event::Done(result) => {
                            count(result.as_ref().err());
                            match result {
                                Ok(g) => Ok(pb::GenerateEvent {
                                    event: Some(pb::generate_event::Event::Result(to_wire(id, g))),
                                }),
                                Err(e) => Err(Status::from(e)),
                            }
                        }
                    };
                    let last = !matches!(
                        msg,
                        Ok(pb::GenerateEvent {
                            event: Some(pb::generate_event::Event::Progress(_))
                        })
                    );
                    if tx.send(msg).await.is_err() || last {
                        break;
                    }
                }
            }
            .instrument(span)
        });
        Ok(Response::new(stream))
    }

    async fn describe(
        &self,
        _: Request<pb::DescribeRequest>,
    ) -> std::result::Result<Response<pb::DescribeResponse>, Status> {
        let cfg = &self.model.model.config;
        let model = pb::ModelInfo {
            // The directory's name, not its path: no filesystem layout in public answers.
            name: self
                .model
                .dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            vocab_size: cfg.vocab_size as u32,
            embed_dim: cfg.embed_dim as u32,
            seq_len: cfg.seq_len as u32,
            diffusion_steps: cfg.diffusion_steps as u32,
            schedule: format!("{:?}", cfg.schedule).to_lowercase(),
            embedding_sha256: self
                .model
                .model
                .embedding_sha256()
                .map_err(|e| Status::internal(e.to_string()))?,
            device: crate::device::name(self.model.model.device()),
        };
        let guides = self
            .guides
            .list()
            .into_iter()
            .map(|g| guide_info(&g))
            .collect();
        Ok(Response::new(pb::DescribeResponse {
            model: Some(model),
            guides,
            ready: self.ready.load(std::sync::atomic::Ordering::Acquire),
        }))
    }

    async fn set_guide(
        &self,
        req: Request<pb::SetGuideRequest>,
    ) -> std::result::Result<Response<pb::GuideInfo>, Status> {
        self.admin.authorize(&req, "SetGuide")?;
        let r = req.into_inner();
        if r.name.is_empty() {
            return Err(Error::invalid("name", "is empty").into());
        }
        self.guides.check_allowed(&r.url)?;
        let card = if r.card_json.is_empty() {
            None
        } else {
            Some(
                dlm_proto::card::GuideCard::parse(&r.card_json)
                    .map_err(|e| Error::invalid("card_json", e))?,
            )
        };
        let spec = GuideSpec::Oip { url: r.url, card };
        let guide = self.guides.connect(&r.name, &spec).await?;
        let g = self.guides.register(&r.name, guide).await?;
        Ok(Response::new(guide_info(&g)))
    }

    async fn remove_guide(
        &self,
        req: Request<pb::RemoveGuideRequest>,
    ) -> std::result::Result<Response<pb::RemoveGuideResponse>, Status> {
        self.admin.authorize(&req, "RemoveGuide")?;
        self.guides.remove(&req.into_inner().name)?;
        Ok(Response::new(pb::RemoveGuideResponse {}))
    }
}

fn guide_info(g: &crate::guidance::RegisteredGuide) -> pb::GuideInfo {
    pb::GuideInfo {
        name: g.name.clone(),
        endpoints: vec![g.guide.endpoint()],
        fields: g
            .fields
            .iter()
            .map(|(n, v)| pb::GuideField {
                name: n.clone(),
                values: v.clone(),
            })
            .collect(),
        ready: g.ready(),
    }
}

/// A stream fed by a task (keeps the event loop out of the service method).
fn async_stream<F, Fut>(f: F) -> EventStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<std::result::Result<pb::GenerateEvent, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// Serves until `shutdown` resolves, then finishes in-flight requests. The port opens at once,
/// NOT_SERVING (health, and `Describe.ready` false) until `startup` — the start-up guides'
/// registration — succeeds; if it fails, the server stops with its error.
pub async fn serve(
    service: GeneratorService,
    addr: SocketAddr,
    http: Option<SocketAddr>,
    tls: Option<tonic::transport::ServerTlsConfig>,
    startup: impl std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    use tonic_health::ServingStatus;
    let (health, health_service) = tonic_health::server::health_reporter();
    let generator_name = <GeneratorServer<GeneratorService> as tonic::server::NamedService>::NAME;
    for name in ["", generator_name] {
        health
            .set_service_status(name, ServingStatus::NotServing)
            .await;
    }
    let ready = Arc::clone(&service.ready);
    // Each registered guide's readiness as its own health service, `guide/<name>`.
    {
        let (mut health, guides) = (health.clone(), Arc::clone(&service.guides));
        tokio::spawn(async move {
            let mut known = std::collections::HashSet::new();
            loop {
                let now: std::collections::HashSet<String> =
                    guides.list().iter().map(|g| g.name.clone()).collect();
                for g in guides.list() {
                    let status = if g.ready() {
                        ServingStatus::Serving
                    } else {
                        ServingStatus::NotServing
                    };
                    health
                        .set_service_status(format!("guide/{}", g.name), status)
                        .await;
                }
                for gone in known.difference(&now) {
                    health.clear_service_status(&format!("guide/{gone}")).await;
                }
                known = now;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
    }
    let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<anyhow::Error>();
    tokio::spawn(async move {
        match startup.await {
            Ok(()) => {
                ready.store(true, std::sync::atomic::Ordering::Release);
                for name in ["", generator_name] {
                    health
                        .set_service_status(name, ServingStatus::Serving)
                        .await;
                }
                tracing::info!("ready: SERVING");
            }
            Err(e) => {
                let _ = failed_tx.send(e);
            }
        }
    });
    let failure = Arc::new(std::sync::Mutex::new(None));
    // One stop signal for both listeners.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    {
        let failure = Arc::clone(&failure);
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown => {}
                Ok(e) = failed_rx => {
                    *failure.lock().unwrap() = Some(e);
                }
            }
            let _ = stop_tx.send(true);
        });
    }
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let service = Arc::new(service);
    let http_server = match http {
        Some(http_addr) => {
            let listener = tokio::net::TcpListener::bind(http_addr).await?;
            tracing::info!(addr = %http_addr, "HTTP/JSON API and playground serving");
            let app = http::router(Arc::clone(&service));
            let stop = stopped(stop_rx.clone());
            Some(tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(stop)
                    .await
            }))
        }
        None => None,
    };
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(dlm_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    tracing::info!(%addr, "dlm-generator serving");
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls)?;
    }
    server
        .add_service(health_service)
        .add_service(reflection)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            GeneratorServer::from_arc(service),
            stamp_arrival,
        ))
        .serve_with_shutdown(addr, stopped(stop_rx))
        .await?;
    if let Some(h) = http_server {
        h.await??;
    }
    if let Some(e) = failure.lock().unwrap().take() {
        return Err(e);
    }
    tracing::info!("dlm-generator stopped");
    Ok(())
}
