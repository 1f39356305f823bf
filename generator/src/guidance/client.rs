//! Guide clients: one long-lived gRPC channel per guide (Open Inference Protocol), the guide's card
//! checked against this generator's model at registration, per-call deadlines and retries.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use dlm_proto::dlm::v1::guide_cards_client::GuideCardsClient;
use dlm_proto::dlm::v1::GetCardRequest;
use dlm_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use dlm_proto::inference::{model_infer_request::InferInputTensor, ModelInferRequest};
use tonic::transport::{Channel, Endpoint};

use crate::{Error, Result};

/// What the generator's model requires of a guide.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSignature {
    pub embedding_sha256: String,
    pub diffusion_steps: usize,
    pub schedule: String,
    pub seq_len: usize,
    pub embed_dim: usize,
}

#[derive(Clone)]
pub struct GuideClient {
    pub url: String,
    /// The model name on the OIP server.
    pub model: String,
    channel: Channel,
    timeout: Duration,
    retries: usize,
}

const MAX_MESSAGE: usize = 64 << 20;

impl GuideClient {
    /// A client for `model` over `channel` (see [`balanced_channel`]), with a per-call deadline and
    /// two retries on UNAVAILABLE.
    pub fn new(url: &str, model: &str, channel: Channel, timeout: Duration) -> Self {
        Self {
            url: url.to_string(),
            model: model.to_string(),
            channel,
            timeout,
            retries: 2,
        }
    }

    fn infer_client(&self) -> GrpcInferenceServiceClient<Channel> {
        GrpcInferenceServiceClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    /// log p(c | x) [B] and ∂/∂x [B·L·D] for a batch (row-major), retrying UNAVAILABLE.
    pub async fn gradient(
        &self,
        latents: &[f32],
        dims: (usize, usize, usize),
        timesteps: &[i64],
        targets: &[i64],
        fields: usize,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let (b, l, d) = dims;
        let tensor = |name: &str, datatype: &str, shape: Vec<i64>| InferInputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape,
            ..Default::default()
        };
        let req = ModelInferRequest {
            model_name: self.model.clone(),
            inputs: vec![
                tensor("latents", "FP32", vec![b as i64, l as i64, d as i64]),
                tensor("timesteps", "INT64", vec![b as i64]),
                tensor("targets", "INT64", vec![b as i64, fields as i64]),
            ],
            raw_input_contents: vec![
                latents.iter().flat_map(|v| v.to_le_bytes()).collect(),
                timesteps.iter().flat_map(|v| v.to_le_bytes()).collect(),
                targets.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ],
            ..Default::default()
        };
        let mut attempt = 0;
        loop {
            let mut request = tonic::Request::new(req.clone());
            request.set_timeout(self.timeout);
            match self.infer_client().model_infer(request).await {
                Ok(resp) => {
                    let resp = resp.into_inner();
                    let find = |name: &str| -> Result<Vec<f32>> {
                        let i = resp
                            .outputs
                            .iter()
                            .position(|o| o.name == name)
                            .ok_or_else(|| {
                                Error::Unavailable(format!(
                                    "guide at {} returned no `{name}`",
                                    self.url
                                ))
                            })?;
                        Ok(resp.raw_output_contents[i]
                            .chunks_exact(4)
                            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                            .collect())
                    };
                    let (lp, grad) = (find("log_prob")?, find("grad")?);
                    if lp.len() != b || grad.len() != b * l * d {
                        return Err(Error::Unavailable(format!(
                            "guide at {} returned wrong shapes",
                            self.url
                        )));
                    }
                    return Ok((lp, grad));
                }
                Err(s) if s.code() == tonic::Code::Unavailable && attempt < self.retries => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(50 * attempt as u64)).await;
                }
                Err(s) => {
                    return Err(Error::Unavailable(format!(
                        "guide `{}` at {}: {} ({:?})",
                        self.model,
                        self.url,
                        s.message(),
                        s.code()
                    )))
                }
            }
        }
    }
}

/// "field=value" → (field, value), or INVALID_ARGUMENT naming the bad target.
fn split_target(spec: &str) -> Result<(&str, &str)> {
    spec.split_once('=').ok_or_else(|| {
        Error::invalid(
            "controls.targets",
            format!("`{spec}` is not of the form field=value"),
        )
    })
}

/// A guide the generator may call, with its label space.
pub struct RegisteredGuide {
    pub name: String,
    pub client: GuideClient,
    pub fields: Vec<(String, Vec<String>)>,
}

impl RegisteredGuide {
    pub fn reads(&self, field: &str) -> bool {
        self.fields
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case(field.trim()))
    }

    /// "field=value" strings → a value id per field (−1 where unconstrained).
    pub fn targets(&self, specs: &[String]) -> Result<Vec<i64>> {
        let mut out = vec![-1i64; self.fields.len()];
        for spec in specs {
            let (field, value) = split_target(spec)?;
            let (fi, (_, values)) = self
                .fields
                .iter()
                .enumerate()
                .find(|(_, (n, _))| n.eq_ignore_ascii_case(field.trim()))
                .ok_or_else(|| {
                    Error::invalid(
                        "controls.targets",
                        format!(
                            "guide `{}` has no field `{}` (fields: {})",
                            self.name,
                            field.trim(),
                            self.fields
                                .iter()
                                .map(|(n, _)| n.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    )
                })?;
            let vi = values
                .iter()
                .position(|v| v.eq_ignore_ascii_case(value.trim()))
                .ok_or_else(|| {
                    Error::invalid(
                        "controls.targets",
                        format!(
                            "field `{}` has no value `{}` (values: {})",
                            field.trim(),
                            value.trim(),
                            values.join(", ")
                        ),
                    )
                })?;
            out[fi] = vi as i64;
        }
        Ok(out)
    }
}

/// How often a guide's host name is resolved again (replicas come and go behind a headless Service).
const RESOLVE_EVERY: Duration = Duration::from_secs(10);

/// One channel balanced over every address the guide's host resolves to, kept in step with DNS.
async fn resolving_channel(name: &str, base: &str, every: Duration) -> Result<Channel> {
    let uri: tonic::codegen::http::Uri = base
        .parse()
        .map_err(|e| Error::invalid("guide", format!("bad URL `{base}`: {e}")))?;
    let host = uri
        .host()
        .ok_or_else(|| Error::invalid("guide", format!("no host in `{base}`")))?
        .trim_matches(['[', ']'])
        .to_string();
    let port = uri.port_u16().unwrap_or(80);
    let resolve = move || {
        let host = host.clone();
        async move {
            tokio::net::lookup_host((host.as_str(), port))
                .await
                .map(|addrs| addrs.collect::<std::collections::BTreeSet<std::net::SocketAddr>>())
                .unwrap_or_default()
        }
    };
    balanced_channel(name, base, every, resolve).await
}

/// One channel balanced over the addresses `resolve` returns, asked again every `every` by a
/// background task (which ends when the channel is dropped): replicas that appear get calls,
/// replicas that go are dropped, and a failed lookup (empty answer) keeps the last known set.
pub async fn balanced_channel<R, F>(
    name: &str,
    base: &str,
    every: Duration,
    resolve: R,
) -> Result<Channel>
where
    R: Fn() -> F + Send + 'static,
    F: std::future::Future<Output = std::collections::BTreeSet<std::net::SocketAddr>> + Send,
{
    let endpoint = |addr: std::net::SocketAddr| {
        Endpoint::from_shared(format!("http://{addr}"))
            .map(|e| e.connect_timeout(Duration::from_secs(5)).tcp_nodelay(true))
            .map_err(|e| Error::Internal(e.to_string()))
    };
    let mut current = resolve().await;
    if current.is_empty() {
        return Err(Error::Unavailable(format!(
            "guide `{name}`: cannot resolve {base}"
        )));
    }
    let (channel, tx) = Channel::balance_channel::<std::net::SocketAddr>(64);
    for &addr in &current {
        let _ = tx
            .send(tonic::transport::channel::Change::Insert(
                addr,
                endpoint(addr)?,
            ))
            .await;
    }
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            if tx.is_closed() {
                break;
            }
            let fresh = resolve().await;
            if fresh.is_empty() {
                continue; // a failed lookup keeps the last known replicas
            }
            for &addr in fresh.difference(&current) {
                if let Ok(e) = endpoint(addr) {
                    let _ = tx
                        .send(tonic::transport::channel::Change::Insert(addr, e))
                        .await;
                }
            }
            for &addr in current.difference(&fresh) {
                let _ = tx
                    .send(tonic::transport::channel::Change::Remove(addr))
                    .await;
            }
            current = fresh;
        }
    });
    Ok(channel)
}

/// The guides this generator calls, by name; hot-swappable while serving.
pub struct GuideRegistry {
    signature: ModelSignature,
    guides: RwLock<HashMap<String, Arc<RegisteredGuide>>>,
    /// Guides named at start-up that are not registered yet (see `expect`).
    pending: RwLock<std::collections::HashSet<String>>,
    timeout: Duration,
}

impl GuideRegistry {
    pub fn new(signature: ModelSignature, timeout: Duration) -> Self {
        Self {
            signature,
            guides: RwLock::new(HashMap::new()),
            pending: RwLock::new(Default::default()),
            timeout,
        }
    }

    /// Marks a guide as on its way (named at start-up, registration under way): until
    /// [`register_waiting`](Self::register_waiting) for it ends, a request that names it gets
    /// UNAVAILABLE rather than "unknown guide".
    pub fn expect(&self, name: &str) {
        self.pending.write().unwrap().insert(name.to_string());
    }

    /// [`register`](Self::register), retried while the guide cannot be reached (in a cluster it may
    /// start after the generator), for up to `wait`. A refusal (another embedding, a bad card) is
    /// final at once.
    pub async fn register_waiting(
        &self,
        name: &str,
        url: &str,
        card_json: Option<&str>,
        wait: Duration,
    ) -> Result<Arc<RegisteredGuide>> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut backoff = Duration::from_millis(250);
        let done = loop {
            match self.register(name, url, card_json).await {
                Err(Error::Unavailable(message))
                    if tokio::time::Instant::now() + backoff < deadline =>
                {
                    tracing::info!(guide = name, %message, retry_in_ms = backoff.as_millis() as u64,
                        "guide not reachable yet");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                done => break done,
            }
        };
        self.pending.write().unwrap().remove(name);
        done
    }

    /// Connects to a guide (`url` = http://host:port[/model], model defaulting to `name`), reads its
    /// card — from the guide's `dlm.v1.GuideCards` service, or from `card_json` (the `card.json`
    /// written beside the model) for a model hosted on another OIP server — and refuses it unless it
    /// was trained for this generator's model. Replaces a guide of the same name.
    pub async fn register(
        &self,
        name: &str,
        url: &str,
        card_json: Option<&str>,
    ) -> Result<Arc<RegisteredGuide>> {
        let (base, model) = match url.trim_end_matches('/').rsplit_once('/') {
            Some((base, model)) if base.contains("://") && !model.contains(':') => {
                (base.to_string(), model.to_string())
            }
            _ => (url.to_string(), name.to_string()),
        };
        let channel = resolving_channel(name, &base, RESOLVE_EVERY).await?;
        let card = match card_json {
            Some(json) => dlm_proto::card::GuideCard::parse(json)
                .map_err(|e| Error::invalid("card", format!("guide `{name}`: {e}")))?
                .to_wire(&model, 0),
            None => {
                let mut request = tonic::Request::new(GetCardRequest {
                    model_name: model.clone(),
                    model_version: String::new(),
                });
                request.set_timeout(self.timeout);
                GuideCardsClient::new(channel.clone())
                    .get_card(request)
                    .await
                    .map_err(|s| {
                        Error::Unavailable(format!(
                            "guide `{name}` at {base}: no card for model `{model}` ({}); give its card.json",
                            s.message()
                        ))
                    })?
                    .into_inner()
            }
        };
        let got = ModelSignature {
            embedding_sha256: card.embedding_sha256.clone(),
            diffusion_steps: card.diffusion_steps as usize,
            schedule: card.schedule.clone(),
            seq_len: card.seq_len as usize,
            embed_dim: card.embed_dim as usize,
        };
        if got != self.signature {
            let what = if got.embedding_sha256 != self.signature.embedding_sha256 {
                format!(
                    "it was trained on embedding {} but this model's is {}",
                    &got.embedding_sha256[..got.embedding_sha256.len().min(12)],
                    &self.signature.embedding_sha256[..12]
                )
            } else {
                format!(
                    "its schedule/shape {got:?} differs from the model's {:?}",
                    self.signature
                )
            };
            return Err(Error::FailedPrecondition(format!(
                "guide `{name}` refused: {what}"
            )));
        }
        let guide = Arc::new(RegisteredGuide {
            name: name.to_string(),
            client: GuideClient::new(&base, &model, channel, self.timeout),
            fields: card
                .fields
                .into_iter()
                .map(|f| (f.name, f.values))
                .collect(),
        });
        self.guides
            .write()
            .unwrap()
            .insert(name.to_string(), Arc::clone(&guide));
        tracing::info!(guide = name, url, "guide registered");
        Ok(guide)
    }

    pub fn remove(&self, name: &str) -> Result<()> {
        self.guides
            .write()
            .unwrap()
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| Error::NotFound(format!("no guide `{name}`")))
    }

    pub fn get(&self, name: &str) -> Result<Arc<RegisteredGuide>> {
        let guides = self.guides.read().unwrap();
        guides.get(name).cloned().ok_or_else(|| {
            if self.pending.read().unwrap().contains(name) {
                return Error::Unavailable(format!(
                    "guide `{name}` is not registered yet: the generator is still waiting for it"
                ));
            }
            let mut names: Vec<&String> = guides.keys().collect();
            names.sort();
            Error::invalid(
                "controls.guide",
                format!("unknown guide `{name}` (registered: {names:?})"),
            )
        })
    }

    /// For a control that names no guide: each target goes to the registered guide that reads
    /// its field, and where several do, to the one reading the fewest fields — a guide trained
    /// for a few fields is deployed beside a general one to steer those better. Targets are
    /// grouped per guide, in the order the guides are first needed.
    pub fn route(&self, specs: &[String]) -> Result<Vec<(Arc<RegisteredGuide>, Vec<String>)>> {
        let guides = self.list();
        let mut routed: Vec<(Arc<RegisteredGuide>, Vec<String>)> = Vec::new();
        for spec in specs {
            let (field, _) = split_target(spec)?;
            let readers: Vec<&Arc<RegisteredGuide>> =
                guides.iter().filter(|g| g.reads(field)).collect();
            let Some(fewest) = readers.iter().map(|g| g.fields.len()).min() else {
                let names: Vec<&str> = guides.iter().map(|g| g.name.as_str()).collect();
                return Err(Error::invalid(
                    "controls.targets",
                    format!(
                        "no registered guide reads field `{}` (guides: {names:?})",
                        field.trim()
                    ),
                ));
            };
            let best: Vec<&&Arc<RegisteredGuide>> = readers
                .iter()
                .filter(|g| g.fields.len() == fewest)
                .collect();
            if best.len() > 1 {
                let names: Vec<&str> = best.iter().map(|g| g.name.as_str()).collect();
                return Err(Error::invalid(
                    "controls.guide",
                    format!(
                        "field `{}` is read by guides {names:?} alike: name one",
                        field.trim()
                    ),
                ));
            }
            match routed.iter_mut().find(|(g, _)| Arc::ptr_eq(g, best[0])) {
                Some((_, targets)) => targets.push(spec.clone()),
                None => routed.push((Arc::clone(best[0]), vec![spec.clone()])),
            }
        }
        Ok(routed)
    }

    pub fn list(&self) -> Vec<Arc<RegisteredGuide>> {
        let mut v: Vec<_> = self.guides.read().unwrap().values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}
