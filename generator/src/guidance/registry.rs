//! The guides this generator calls, by name: registered at start-up or by SetGuide (each checked
//! against this generator's model and probed before it is accepted), hot-swappable while serving,
//! their readiness kept current by a background probe.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use dlm_proto::card::GuideCard;

use super::guide::{split_target, Guide, RegisteredGuide};
use super::oip::OipGuide;
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

/// Where a guide runs.
#[derive(Debug, Clone)]
pub enum GuideSpec {
    /// An OIP server: http://host:port[/model], with the model's `card.json` for servers that do
    /// not serve guide cards.
    Oip {
        url: String,
        card: Option<GuideCard>,
    },
    /// An ONNX model run in this process (`onnx:PATH/model.onnx`; start-up flags only).
    Local { path: PathBuf },
}

impl GuideSpec {
    /// `URL`, `URL#CARD.json` or `onnx:PATH` (a start-up `--guide NAME=…` flag's value).
    pub fn parse_flag(value: &str) -> Result<Self> {
        if let Some(path) = value.strip_prefix("onnx:") {
            return Ok(GuideSpec::Local { path: path.into() });
        }
        let (url, card) = match value.split_once('#') {
            Some((url, path)) => {
                let json = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
                let card = GuideCard::parse(&json).map_err(|e| Error::format(path, e))?;
                (url, Some(card))
            }
            None => (value, None),
        };
        Ok(GuideSpec::Oip {
            url: url.to_string(),
            card,
        })
    }
}

pub struct GuideRegistry {
    signature: ModelSignature,
    guides: RwLock<HashMap<String, Arc<RegisteredGuide>>>,
    /// Guides named at start-up that are not registered yet (see `expect`).
    pending: RwLock<std::collections::HashSet<String>>,
    timeout: Duration,
    /// Most guides registered at once.
    max_guides: usize,
    /// For https:// guides: the CA to trust, and the client certificate when the guide wants one.
    tls: Option<tonic::transport::ClientTlsConfig>,
    /// The hosts (and ports) SetGuide may point at.
    allowed: Vec<AllowedTarget>,
}

/// A host SetGuide may register guides on, with or without a port.
#[derive(Debug, Clone, PartialEq)]
pub struct AllowedTarget {
    pub host: String,
    pub port: Option<u16>,
}

impl AllowedTarget {
    /// `HOST` or `HOST:PORT` (IPv6 as `[::1]:8001`).
    pub fn parse(spec: &str) -> Result<Self> {
        let (host, port) = match spec.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && (!h.contains(':') || h.starts_with('[')) => {
                let port = p
                    .parse()
                    .map_err(|_| Error::invalid("guide-allow", format!("bad port in `{spec}`")))?;
                (h, Some(port))
            }
            _ => (spec, None),
        };
        let host = host.trim_matches(['[', ']']).to_ascii_lowercase();
        if host.is_empty() {
            return Err(Error::invalid(
                "guide-allow",
                format!("no host in `{spec}`"),
            ));
        }
        Ok(Self { host, port })
    }

    fn admits(&self, host: &str, port: u16) -> bool {
        self.host == host.to_ascii_lowercase() && self.port.is_none_or(|p| p == port)
    }
}

/// Loopback, allowed by default beside the start-up guides' hosts.
pub fn loopback() -> Vec<AllowedTarget> {
    ["127.0.0.1", "::1", "localhost"]
        .into_iter()
        .map(|h| AllowedTarget {
            host: h.into(),
            port: None,
        })
        .collect()
}

/// Default cap on registered guides.
pub const MAX_GUIDES: usize = 64;

impl GuideRegistry {
    pub fn new(signature: ModelSignature, timeout: Duration) -> Self {
        Self {
            signature,
            guides: RwLock::new(HashMap::new()),
            pending: RwLock::new(Default::default()),
            timeout,
            max_guides: MAX_GUIDES,
            tls: None,
            allowed: loopback(),
        }
    }

    /// Guide connections to https:// URLs use `tls`.
    pub fn with_tls(mut self, tls: Option<tonic::transport::ClientTlsConfig>) -> Self {
        self.tls = tls;
        self
    }

    /// SetGuide may point only at `allowed` hosts.
    pub fn with_allowed(mut self, allowed: Vec<AllowedTarget>) -> Self {
        self.allowed = allowed;
        self
    }

    /// PERMISSION_DENIED unless `url` names an allowed host and port — decided before any
    /// connection, with one message whatever is (or is not) listening there.
    pub fn check_allowed(&self, url: &str) -> Result<()> {
        let refused = || {
            Error::PermissionDenied(format!(
                "guide URL `{}` is not an allowed target (the generator's --guide-allow)",
                dlm_proto::guide_contract::clip(url, 128)
            ))
        };
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(refused());
        }
        let (host, port) = super::oip::host_port(url).map_err(|_| refused())?;
        if self.allowed.iter().any(|a| a.admits(&host, port)) {
            Ok(())
        } else {
            Err(refused())
        }
    }

    /// Marks a guide as on its way (named at start-up, registration under way): until
    /// [`register_waiting`](Self::register_waiting) for it ends, a request that names it gets
    /// UNAVAILABLE rather than "unknown guide".
    pub fn expect(&self, name: &str) {
        self.pending.write().unwrap().insert(name.to_string());
    }

    /// The guide a spec names, connected (not yet checked).
    pub async fn connect(&self, name: &str, spec: &GuideSpec) -> Result<Arc<dyn Guide>> {
        Ok(match spec {
            GuideSpec::Oip { url, card } => Arc::new(
                OipGuide::connect(name, url, card.clone(), self.timeout, self.tls.as_ref()).await?,
            ),
            GuideSpec::Local { path } => Arc::new(super::local::LocalGuide::load(path)?),
        })
    }

    /// [`register`](Self::register), retried while the guide cannot be reached (in a cluster it may
    /// start after the generator), for up to `wait`. A refusal (another embedding, a bad card, a
    /// server without cards) is final at once.
    pub async fn register_waiting(
        &self,
        name: &str,
        spec: &GuideSpec,
        wait: Duration,
    ) -> Result<Arc<RegisteredGuide>> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut backoff = Duration::from_millis(250);
        let done = loop {
            let attempt = async { self.register(name, self.connect(name, spec).await?).await };
            match attempt.await {
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

    /// Reads the guide's card, refuses it unless it was trained for this generator's model,
    /// probes it (a card file alone proves nothing about the server), and registers it under
    /// `name`, replacing a guide of that name.
    pub async fn register(
        &self,
        name: &str,
        guide: Arc<dyn Guide>,
    ) -> Result<Arc<RegisteredGuide>> {
        let card = guide.card().await?;
        let got = ModelSignature {
            embedding_sha256: card.embedding_sha256.clone(),
            diffusion_steps: card.diffusion_steps,
            schedule: card.schedule.clone(),
            seq_len: card.seq_len,
            embed_dim: card.embed_dim,
        };
        if got != self.signature {
            let short = |s: &str| s.chars().take(12).collect::<String>();
            let what = if got.embedding_sha256 != self.signature.embedding_sha256 {
                format!(
                    "it was trained on embedding {} but this model's is {}",
                    short(&got.embedding_sha256),
                    short(&self.signature.embedding_sha256)
                )
            } else {
                format!(
                    "its schedule/shape (T = {}, {}, L = {}, D = {}) differs from the model's (T = {}, {}, L = {}, D = {})",
                    got.diffusion_steps,
                    short(&got.schedule),
                    got.seq_len,
                    got.embed_dim,
                    self.signature.diffusion_steps,
                    self.signature.schedule,
                    self.signature.seq_len,
                    self.signature.embed_dim
                )
            };
            return Err(Error::FailedPrecondition(format!(
                "guide `{name}` refused: {what}"
            )));
        }
        guide.probe().await?;
        let registered = Arc::new(RegisteredGuide::new(name, guide, &card));
        {
            let mut guides = self.guides.write().unwrap();
            if !guides.contains_key(name) && guides.len() >= self.max_guides {
                return Err(Error::ResourceExhausted(format!(
                    "{} guides are registered, the most this generator takes; remove one first",
                    guides.len()
                )));
            }
            guides.insert(name.to_string(), Arc::clone(&registered));
        }
        tracing::info!(guide = name, endpoint = %registered.guide.endpoint(), "guide registered");
        Ok(registered)
    }

    /// Probes every registered guide every `every` (each probe on its own task, so a hung guide
    /// delays no other's), keeping `RegisteredGuide::ready` current for Describe and health.
    pub fn spawn_probes(self: &Arc<Self>, every: Duration) {
        let registry = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(registry) = registry.upgrade() else {
                    break;
                };
                for g in registry.list() {
                    tokio::spawn(async move {
                        let ok = g.guide.probe().await.is_ok();
                        g.set_ready(ok);
                    });
                }
            }
        });
    }

    pub fn remove(&self, name: &str) -> Result<()> {
        self.guides
            .write()
            .unwrap()
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "no guide `{}`",
                    dlm_proto::guide_contract::clip(name, 64)
                ))
            })
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
                format!(
                    "unknown guide `{}` (registered: {names:?})",
                    dlm_proto::guide_contract::clip(name, 64)
                ),
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
