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

use crate::card::GuideCard;
use crate::repository::Repository;
use crate::runtime::{GuideBatch, GuideOutputs, GRAD, LATENTS, LOG_PROB, TARGETS, TIMESTEPS};
use crate::{GuideError, Result};

/// Largest gRPC message either way (a [256, 128, 128] f32 tensor is 16 MiB).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

pub struct InferenceService {
    repo: Arc<Repository>,
}

impl InferenceService {
    pub fn new(repo: Arc<Repository>) -> Self {
        Self { repo }
    }
}

fn shape_str(shape: &[i64]) -> String {
    format!("{shape:?}")
}

/// Checks one input's datatype and shape against the contract and returns its bytes.
fn input_bytes<'a>(
    req: &'a ModelInferRequest,
    name: &str,
    datatype: &str,
    expected: &[Option<i64>],
) -> Result<(std::borrow::Cow<'a, [u8]>, Vec<i64>)> {
    let (index, input) = req
        .inputs
        .iter()
        .enumerate()
        .find(|(_, i)| i.name == name)
        .ok_or_else(|| GuideError::invalid(format!("missing input `{name}`")))?;
    if input.datatype != datatype {
        return Err(GuideError::invalid(format!(
            "input `{name}`: datatype {}, expected {datatype}",
            input.datatype
        )));
    }
    let shape_ok = input.shape.len() == expected.len()
        && input
            .shape
            .iter()
            .zip(expected)
            .all(|(g, w)| *g >= 0 && w.is_none_or(|w| w == *g));
    if !shape_ok {
        let want: Vec<String> = expected
            .iter()
            .map(|d| d.map(|v| v.to_string()).unwrap_or_else(|| "B".into()))
            .collect();
        return Err(GuideError::invalid(format!(
            "input `{name}`: shape {}, expected [{}]",
            shape_str(&input.shape),
            want.join(", ")
        )));
    }
    let elems: i64 = input.shape.iter().product();
    let width = if datatype == "FP32" { 4 } else { 8 };
    let bytes: std::borrow::Cow<[u8]> = if !req.raw_input_contents.is_empty() {
        std::borrow::Cow::Borrowed(&req.raw_input_contents[index])
    } else {
        let c = input.contents.as_ref();
        std::borrow::Cow::Owned(match datatype {
            "FP32" => c
                .map(|c| {
                    c.fp32_contents
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .collect()
                })
                .unwrap_or_default(),
            _ => c
                .map(|c| {
                    c.int64_contents
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .collect()
                })
                .unwrap_or_default(),
        })
    };
    if bytes.len() as i64 != elems * width {
        return Err(GuideError::invalid(format!(
            "input `{name}`: {} bytes of data for shape {} ({} expected)",
            bytes.len(),
            shape_str(&input.shape),
            elems * width
        )));
    }
    Ok((bytes, input.shape.clone()))
}

/// Wire → domain: every tensor checked for name, datatype, shape, byte length and values.
pub fn parse_infer_request(req: &ModelInferRequest, card: &GuideCard) -> Result<GuideBatch> {
    for input in &req.inputs {
        if ![LATENTS, TIMESTEPS, TARGETS].contains(&input.name.as_str()) {
            return Err(GuideError::invalid(format!(
                "unknown input `{}` (a guide takes {LATENTS}, {TIMESTEPS}, {TARGETS})",
                input.name
            )));
        }
    }
    if !req.raw_input_contents.is_empty() && req.raw_input_contents.len() != req.inputs.len() {
        return Err(GuideError::invalid(format!(
            "raw_input_contents has {} entries for {} inputs",
            req.raw_input_contents.len(),
            req.inputs.len()
        )));
    }
    let (l, d, f) = (
        card.seq_len as i64,
        card.embed_dim as i64,
        card.fields.len() as i64,
    );
    let (lat, lat_shape) = input_bytes(req, LATENTS, "FP32", &[None, Some(l), Some(d)])?;
    let b = lat_shape[0];
    if b == 0 {
        return Err(GuideError::invalid(format!(
            "input `{LATENTS}`: empty batch"
        )));
    }
    let (ts, _) = input_bytes(req, TIMESTEPS, "INT64", &[Some(b)])?;
    let (tg, _) = input_bytes(req, TARGETS, "INT64", &[Some(b), Some(f)])?;
    let latents: Vec<f32> = lat
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    if let Some(i) = latents.iter().position(|v| !v.is_finite()) {
        return Err(GuideError::invalid(format!(
            "input `{LATENTS}`: non-finite value at flat index {i}"
        )));
    }
    let timesteps: Vec<i64> = ts
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let t_max = card.diffusion_steps as i64;
    if let Some((row, t)) = timesteps
        .iter()
        .enumerate()
        .find(|(_, t)| !(0..t_max).contains(*t))
    {
        return Err(GuideError::invalid(format!(
            "input `{TIMESTEPS}`: {t} at row {row} is outside [0, {t_max})"
        )));
    }
    let targets: Vec<i64> = tg
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    for (i, &v) in targets.iter().enumerate() {
        let field = &card.fields[i % f as usize];
        if v < -1 || v >= field.values.len() as i64 {
            return Err(GuideError::invalid(format!(
                "input `{TARGETS}`: {v} for field `{}` at row {} is outside [-1, {})",
                field.name,
                i / f as usize,
                field.values.len()
            )));
        }
    }
    Ok(GuideBatch {
        batch: b as usize,
        latents,
        timesteps,
        targets,
    })
}

fn infer_response(
    req: &ModelInferRequest,
    version: u64,
    card: &GuideCard,
    out: GuideOutputs,
    b: usize,
) -> Result<ModelInferResponse> {
    let wanted: Vec<&str> = req.outputs.iter().map(|o| o.name.as_str()).collect();
    for name in &wanted {
        if *name != LOG_PROB && *name != GRAD {
            return Err(GuideError::invalid(format!(
                "unknown output `{name}` (a guide returns {LOG_PROB}, {GRAD})"
            )));
        }
    }
    let mut resp = ModelInferResponse {
        model_name: req.model_name.clone(),
        model_version: version.to_string(),
        id: req.id.clone(),
        ..Default::default()
    };
    let tensors: [(&str, Vec<i64>, &Vec<f32>); 2] = [
        (LOG_PROB, vec![b as i64], &out.log_prob),
        (
            GRAD,
            vec![b as i64, card.seq_len as i64, card.embed_dim as i64],
            &out.grad,
        ),
    ];
    for (name, shape, data) in tensors {
        if !wanted.is_empty() && !wanted.contains(&name) {
            continue;
        }
        resp.outputs.push(model_infer_response::InferOutputTensor {
            name: name.into(),
            datatype: "FP32".into(),
            shape,
            ..Default::default()
        });
        resp.raw_output_contents
            .push(data.iter().flat_map(|v| v.to_le_bytes()).collect());
    }
    Ok(resp)
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
        let result: Result<ModelInferResponse> = async {
            let version = self.repo.get(&req.model_name, &req.model_version)?;
            let batch = parse_infer_request(&req, &version.card)?;
            let b = batch.batch;
            let out = version.batcher.infer(batch).await?;
            infer_response(&req, version.version, &version.card, out, b)
        }
        .await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(GuideError::InvalidArgument(_)) => "invalid_argument",
            Err(GuideError::NotFound(_)) => "not_found",
            Err(GuideError::Unavailable(_)) => "unavailable",
            Err(_) => "error",
        };
        metrics::counter!("dlm_guide_requests_total", "model" => req.model_name.clone(), "outcome" => outcome).increment(1);
        metrics::histogram!("dlm_guide_request_seconds", "model" => req.model_name.clone())
            .record(started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            tracing::debug!(model = %req.model_name, error = %e, "infer failed");
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
        let name = req.into_inner().model_name;
        if name.is_empty() {
            return Err(GuideError::invalid("model_name is empty").into());
        }
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
    poll_interval: Option<Duration>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(dlm_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let inference = GrpcInferenceServiceServer::new(InferenceService::new(Arc::clone(&repo)))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let cards = dlm::guide_cards_server::GuideCardsServer::new(CardService {
        repo: Arc::clone(&repo),
    });

    if let Some(interval) = poll_interval {
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
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(inference)
        .add_service(cards)
        .serve_with_shutdown(addr, shutdown)
        .await?;
    tracing::info!("dlm-guide stopped");
    Ok(())
}
