//! Guides on Open Inference Protocol servers (dlm-guide, Triton, MLServer, KServe): one long-lived
//! gRPC channel per guide, balanced over the addresses its host resolves to; per-call deadlines and
//! retries; the tensor contract from `dlm_proto::guide_contract`.

use std::time::Duration;

use dlm_proto::card::GuideCard;
use dlm_proto::dlm::v1::guide_cards_client::GuideCardsClient;
use dlm_proto::dlm::v1::GetCardRequest;
use dlm_proto::guide_contract::{self as contract, Dims, GuideBatch, GuideOutputs};
use dlm_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use dlm_proto::inference::ModelReadyRequest;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use super::guide::Guide;
use crate::{Error, Result};

const MAX_MESSAGE: usize = 64 << 20;

/// A guide model on an OIP server.
#[derive(Clone)]
pub struct OipGuide {
    pub url: String,
    /// The model name on the OIP server.
    pub model: String,
    channel: Channel,
    timeout: Duration,
    retries: usize,
    /// The card from a `card.json`, for servers that do not serve `dlm.v1.GuideCards`.
    card_file: Option<GuideCard>,
}

impl OipGuide {
    /// A client for `model` over `channel` (see [`balanced_channel`]), with a per-call deadline and
    /// two retries on UNAVAILABLE.
    pub fn new(url: &str, model: &str, channel: Channel, timeout: Duration) -> Self {
        Self {
            url: url.to_string(),
            model: model.to_string(),
            channel,
            timeout,
            retries: 2,
            card_file: None,
        }
    }

    /// Connects to `url` (http://host:port[/model], the model defaulting to `name`).
    pub async fn connect(
        name: &str,
        url: &str,
        card_file: Option<GuideCard>,
        timeout: Duration,
        tls: Option<&ClientTlsConfig>,
    ) -> Result<Self> {
        let (base, model) = match url.trim_end_matches('/').rsplit_once('/') {
            Some((base, model)) if base.contains("://") && !model.contains(':') => {
                (base.to_string(), model.to_string())
            }
            _ => (url.to_string(), name.to_string()),
        };
        let channel = resolving_channel(name, &base, RESOLVE_EVERY, tls).await?;
        Ok(Self {
            card_file,
            ..Self::new(&base, &model, channel, timeout)
        })
    }

    fn infer_client(&self) -> GrpcInferenceServiceClient<Channel> {
        GrpcInferenceServiceClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    fn unavailable(&self, what: impl std::fmt::Display) -> Error {
        Error::Unavailable(format!("guide `{}` at {}: {what}", self.model, self.url))
    }
}

#[tonic::async_trait]
impl Guide for OipGuide {
    async fn gradient(&self, dims: Dims, batch: GuideBatch) -> Result<GuideOutputs> {
        let rows = batch.rows;
        let req = contract::encode_request(&self.model, dims, &batch);
        let mut attempt = 0;
        loop {
            let mut request = tonic::Request::new(req.clone());
            request.set_timeout(self.timeout);
            match self.infer_client().model_infer(request).await {
                Ok(resp) => {
                    return contract::decode_response(resp.get_ref(), rows, dims)
                        .map_err(|e| self.unavailable(e));
                }
                Err(s) if s.code() == tonic::Code::Unavailable && attempt < self.retries => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(50 * attempt as u64)).await;
                }
                Err(s) => {
                    return Err(self.unavailable(format_args!(
                        "{} ({:?})",
                        contract::clip(s.message(), 256),
                        s.code()
                    )))
                }
            }
        }
    }

    async fn card(&self) -> Result<GuideCard> {
        if let Some(card) = &self.card_file {
            return Ok(card.clone());
        }
        let mut request = tonic::Request::new(GetCardRequest {
            model_name: self.model.clone(),
            model_version: String::new(),
        });
        request.set_timeout(self.timeout);
        let card = match GuideCardsClient::new(self.channel.clone())
            .get_card(request)
            .await
        {
            Ok(card) => card.into_inner(),
            // A server that does not serve cards will not start serving them: final at once.
            Err(s) if s.code() == tonic::Code::Unimplemented => {
                return Err(Error::FailedPrecondition(format!(
                    "guide `{}` at {} serves no guide cards: give its card.json (NAME=URL#card.json)",
                    self.model, self.url
                )))
            }
            Err(s) => {
                return Err(self.unavailable(format_args!(
                    "no card ({}); give its card.json",
                    contract::clip(s.message(), 256)
                )))
            }
        };
        Ok(GuideCard {
            fields: card
                .fields
                .into_iter()
                .map(|f| dlm_proto::card::Field {
                    name: f.name,
                    values: f.values,
                })
                .collect(),
            embedding_sha256: card.embedding_sha256,
            diffusion_steps: card.diffusion_steps as usize,
            schedule: card.schedule,
            seq_len: card.seq_len as usize,
            embed_dim: card.embed_dim as usize,
        })
    }

    async fn probe(&self) -> Result<()> {
        let mut request = tonic::Request::new(ModelReadyRequest {
            name: self.model.clone(),
            version: String::new(),
        });
        request.set_timeout(self.timeout.min(Duration::from_secs(2)));
        match self.infer_client().model_ready(request).await {
            Ok(r) if r.get_ref().ready => Ok(()),
            Ok(_) => Err(self.unavailable("the model is not ready")),
            Err(s) => Err(self.unavailable(format_args!(
                "{} ({:?})",
                contract::clip(s.message(), 256),
                s.code()
            ))),
        }
    }

    fn endpoint(&self) -> String {
        format!("{}/{}", self.url, self.model)
    }
}

/// How often a guide's host name is resolved again (replicas come and go behind a headless Service).
const RESOLVE_EVERY: Duration = Duration::from_secs(10);

/// One channel balanced over every address the guide's host resolves to, kept in step with DNS.
async fn resolving_channel(
    name: &str,
    base: &str,
    every: Duration,
    tls: Option<&ClientTlsConfig>,
) -> Result<Channel> {
    let (host, port) = host_port(base)?;
    let tls = match (base.starts_with("https://"), tls) {
        (false, _) => None,
        (true, Some(tls)) => Some(tls.clone().domain_name(host.clone())),
        (true, None) => {
            return Err(Error::FailedPrecondition(format!(
                "guide `{name}`: an https:// guide needs --guide-tls-ca"
            )))
        }
    };
    let resolve = move || {
        let host = host.clone();
        async move {
            tokio::net::lookup_host((host.as_str(), port))
                .await
                .map(|addrs| addrs.collect::<std::collections::BTreeSet<std::net::SocketAddr>>())
                .unwrap_or_default()
        }
    };
    balanced_channel(name, base, every, resolve, tls).await
}

/// The host (brackets trimmed) and port of a guide URL (default 80, 443 for https).
pub fn host_port(url: &str) -> Result<(String, u16)> {
    let uri: tonic::codegen::http::Uri = url.parse().map_err(|e| {
        Error::invalid(
            "url",
            format!("bad URL `{}`: {e}", contract::clip(url, 128)),
        )
    })?;
    let host = uri
        .host()
        .ok_or_else(|| Error::invalid("url", format!("no host in `{}`", contract::clip(url, 128))))?
        .trim_matches(['[', ']'])
        .to_string();
    let default = if uri.scheme_str() == Some("https") {
        443
    } else {
        80
    };
    Ok((host, uri.port_u16().unwrap_or(default)))
}

/// One channel balanced over the addresses `resolve` returns, asked again every `every` by a
/// background task (which ends when the channel is dropped): replicas that appear get calls,
/// replicas that go are dropped, and a failed lookup (empty answer) keeps the last known set.
pub async fn balanced_channel<R, F>(
    name: &str,
    base: &str,
    every: Duration,
    resolve: R,
    tls: Option<ClientTlsConfig>,
) -> Result<Channel>
where
    R: Fn() -> F + Send + 'static,
    F: std::future::Future<Output = std::collections::BTreeSet<std::net::SocketAddr>> + Send,
{
    let endpoint = move |addr: std::net::SocketAddr| -> Result<Endpoint> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let e = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|e| Error::Internal(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        match &tls {
            Some(tls) => e
                .tls_config(tls.clone())
                .map_err(|e| Error::FailedPrecondition(format!("guide TLS: {e}"))),
            None => Ok(e),
        }
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
