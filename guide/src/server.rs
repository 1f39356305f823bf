//! The gRPC surface: Open Inference Protocol (`inference.GRPCInferenceService`), guide cards
//! (`dlm.v1.GuideCards`), grpc.health.v1 and reflection. Service methods are thin: they convert
//! wire messages to domain batches (validating every tensor) and hand them to the repository.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dlm_proto::dlm::v1 as dlm;
use dlm_proto::inference::grpc_inference_service_server::{
    GrpcInferenceService, GrpcInferenceServiceServer,
};
use dlm_proto::inference::*;
use tonic::{Request, Response, Status};

use dlm_proto::guide_contract::{self as contract, Dims};
use dlm_proto::security::AdminToken;

use crate::repository::Repository;
use crate::runtime::{GRAD, LATENTS, LOG_PROB, TARGETS, TIMESTEPS};
use crate::{GuideError, Result};

/// Largest gRPC message either way (a [256, 128, 128] f32 tensor is 16 MiB).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

pub struct InferenceService {
    repo: Arc<Repository>,
    /// Most rows one ModelInfer may carry (bounds the memory one call can take).
    max_rows: usize,
    admin: AdminToken,
}

impl InferenceService {
    pub fn new(repo: Arc<Repository>, max_rows: usize, admin: AdminToken) -> Self {
        Self {
            repo,
            max_rows,
            admin,
        }
    }
}

/// How the guide serves: repository polling, per-call limits, admin token, TLS.
pub struct ServeOptions {
    pub poll_interval: Option<Duration>,
    pub max_rows: usize,
    pub admin: AdminToken,
    pub tls: Option<tonic::transport::ServerTlsConfig>,
}

fn tensor_meta(
    name: &str,
    datatype: &str,
    shape: Vec<i64>,
) -> model_metadata_response::TensorMetadata {
    model_metadata_response::TensorMetadata {
        name: name.into(),
        datatype: datatype.into(),
        shape,
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for InferenceService {
    async fn server_live(
        &self,
        _: Request<ServerLiveRequest>,
    ) -> std::result::Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> std::result::Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse {
            ready: self.repo.ready(),
        }))
    }

    async fn model_ready(
        &self,
        req: Request<ModelReadyRequest>,
    ) -> std::result::Result<Response<ModelReadyResponse>, Status> {
        let r = req.into_inner();
        Ok(Response::new(ModelReadyResponse {
            ready: self.repo.get(&r.name, &r.version).is_ok(),
        }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> std::result::Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: "dlm-guide".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: vec!["model_repository".into()],
        }))
    }

    async fn model_metadata(
        &self,
        req: Request<ModelMetadataRequest>,
    ) -> std::result::Result<Response<ModelMetadataResponse>, Status> {
        let r = req.into_inner();
        let v = self.repo.get(&r.name, &r.version)?;
        let versions = self
            .repo
            .index(true)
            .into_iter()
            .filter(|e| e.name == r.name)
            .map(|e| e.version)
            .collect();
        let (l, d, f) = (
            v.card.seq_len as i64,
            v.card.embed_dim as i64,
            v.card.fields.len() as i64,
        );
        Ok(Response::new(ModelMetadataResponse {
            name: r.name,
            versions,
            platform: "onnxruntime_onnx".into(),
            inputs: vec![
                tensor_meta(LATENTS, "FP32", vec![-1, l, d]),
                tensor_meta(TIMESTEPS, "INT64", vec![-1]),
                tensor_meta(TARGETS, "INT64", vec![-1, f]),
            ],
            outputs: vec![
                tensor_meta(LOG_PROB, "FP32", vec![-1]),
                tensor_meta(GRAD, "FP32", vec![-1, l, d]),
            ],
        }))
    }

    async fn model_infer(
        &self,
        req: Request<ModelInferRequest>,
    ) -> std::result::Result<Response<ModelInferResponse>, Status> {
        let started = Instant::now();
        let req = req.into_inner();
        // Metric labels name served models only: a client-chosen name must not grow /metrics.
        let mut label = "unknown".to_string();
        let result: Result<ModelInferResponse> = async {
            let version = self.repo.get(&req.model_name, &req.model_version)?;
            label = version.name.clone();
            let batch = contract::decode_request(&req, &version.card, self.max_rows)
                .map_err(|e| GuideError::invalid(e.0))?;
            let out = version.batcher.infer(batch).await?;
            contract::encode_response(&req, version.version, Dims::of(&version.card), &out)
                .map_err(|e| GuideError::invalid(e.0))
        }
        .await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => e.label(),
        };
        metrics::counter!("dlm_guide_requests_total", "model" => label.clone(), "outcome" => outcome).increment(1);
        metrics::histogram!("dlm_guide_request_seconds", "model" => label)
            .record(started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            tracing::debug!(model = %contract::clip(&req.model_name, 64), error = %e, "infer failed");
        }
        Ok(Response::new(result?))
    }

    async fn repository_index(
        &self,
        req: Request<RepositoryIndexRequest>,
    ) -> std::result::Result<Response<RepositoryIndexResponse>, Status> {
        let models = self
            .repo
            .index(req.into_inner().ready)
            .into_iter()
            .map(|e| repository_index_response::ModelIndex {
                name: e.name,
                version: e.version,
                state: e.state.into(),
                reason: e.reason,
            })
            .collect();
        Ok(Response::new(RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        req: Request<RepositoryModelLoadRequest>,
    ) -> std::result::Result<Response<RepositoryModelLoadResponse>, Status> {
        self.admin.authorize(&req, "RepositoryModelLoad")?;
        let name = req.into_inner().model_name;
        let repo = Arc::clone(&self.repo);
        tokio::task::spawn_blocking(move || repo.sync_model(&name, true))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        req: Request<RepositoryModelUnloadRequest>,
    ) -> std::result::Result<Response<RepositoryModelUnloadResponse>, Status> {
        self.admin.authorize(&req, "RepositoryModelUnload")?;
        self.repo.unload(&req.into_inner().model_name)?;
        Ok(Response::new(RepositoryModelUnloadResponse {}))
    }
}

pub struct CardService {
    repo: Arc<Repository>,
}

#[tonic::async_trait]
impl dlm::guide_cards_server::GuideCards for CardService {
    async fn get_card(
        &self,
        req: Request<dlm::GetCardRequest>,
    ) -> std::result::Result<Response<dlm::GuideCard>, Status> {
        let r = req.into_inner();
        let v = self.repo.get(&r.model_name, &r.model_version)?;
        Ok(Response::new(v.card.to_wire(&v.name, v.version)))
    }
}

/// Serves until `shutdown` resolves, then drains in-flight requests.
pub async fn serve(
    repo: Arc<Repository>,
    addr: SocketAddr,
    options: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(dlm_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let inference = GrpcInferenceServiceServer::new(InferenceService::new(
        Arc::clone(&repo),
        options.max_rows,
        options.admin,
    ))
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let cards = dlm::guide_cards_server::GuideCardsServer::new(CardService {
        repo: Arc::clone(&repo),
    });

    if let Some(interval) = options.poll_interval {
        repo.spawn_poller(interval);
    }
    // Health follows readiness: SERVING once some model is loaded.
    let health_repo = Arc::clone(&repo);
    tokio::spawn(async move {
        loop {
            if health_repo.ready() {
                health
                    .set_serving::<GrpcInferenceServiceServer<InferenceService>>()
                    .await;
                health
                    .set_service_status("", tonic_health::ServingStatus::Serving)
                    .await;
            } else {
                health
                    .set_not_serving::<GrpcInferenceServiceServer<InferenceService>>()
                    .await;
                health
                    .set_service_status("", tonic_health::ServingStatus::NotServing)
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    tracing::info!(%addr, "dlm-guide serving");
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = options.tls {
        server = server.tls_config(tls)?;
    }
    server
        .add_service(health_service)
        .add_service(reflection)
        .add_service(inference)
        .add_service(cards)
        .serve_with_shutdown(addr, shutdown)
        .await?;
    tracing::info!("dlm-guide stopped");
    Ok(())
}
