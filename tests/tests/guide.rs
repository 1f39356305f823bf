//! The guide service over real processes on loopback: real ONNX Runtime, the shipped guide model.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dlm_proto::guide_contract::{decode_response, encode_request, Dims, GuideBatch};
use dlm_proto::inference::*;
use dlm_tests::{admin, repo_root, venv_python, GuideServer};
use tonic::Code;

const MODEL: &str = "e2e-semantic";

struct Card {
    l: usize,
    d: usize,
    f: usize,
    t: i64,
    field_names: Vec<String>,
}

fn shipped_repository() -> PathBuf {
    repo_root().join("models/guides")
}

fn card() -> Card {
    let text =
        std::fs::read_to_string(shipped_repository().join(MODEL).join("1/card.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let fields = v["fields"].as_array().unwrap();
    Card {
        l: v["seq_len"].as_u64().unwrap() as usize,
        d: v["embed_dim"].as_u64().unwrap() as usize,
        f: fields.len(),
        t: v["diffusion_steps"].as_i64().unwrap(),
        field_names: fields
            .iter()
            .map(|f| f["name"].as_str().unwrap().to_string())
            .collect(),
    }
}

/// A repository the test may change: a copy of the shipped one.
fn scratch_repository() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(
        &shipped_repository().join(MODEL).join("1"),
        &dir.path().join(MODEL).join("1"),
    );
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Deterministic pseudo-normal numbers (no RNG crate needed for test inputs).
fn normals(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| ((-2.0 * next().ln()).sqrt() * (std::f64::consts::TAU * next()).cos()) as f32)
        .collect()
}

fn dims(c: &Card) -> Dims {
    Dims {
        seq_len: c.l,
        embed_dim: c.d,
        fields: c.f,
    }
}

/// A ModelInfer for the shipped guide, encoded by the one codec of the contract.
fn request(c: &Card, latents: &[f32], timesteps: &[i64], targets: &[i64]) -> ModelInferRequest {
    let batch = GuideBatch {
        rows: timesteps.len(),
        latents: latents.to_vec(),
        timesteps: timesteps.to_vec(),
        targets: targets.to_vec(),
    };
    encode_request(MODEL, dims(c), &batch)
}

/// (log_prob, grad) of a response, decoded by the codec.
fn outputs(r: &ModelInferResponse) -> (Vec<f32>, Vec<f32>) {
    let rows = r
        .outputs
        .iter()
        .find(|o| o.name == "log_prob")
        .unwrap()
        .shape[0] as usize;
    let c = card();
    let out = decode_response(r, rows, dims(&c)).unwrap();
    (out.log_prob, out.grad)
}

fn sample_inputs(c: &Card, b: usize, seed: u64) -> (Vec<f32>, Vec<i64>, Vec<i64>) {
    let latents = normals(b * c.l * c.d, seed);
    let timesteps: Vec<i64> = (0..b as i64)
        .map(|i| (i * 397 + seed as i64 * 13) % c.t)
        .collect();
    let mut targets = vec![-1i64; b * c.f];
    for row in 0..b {
        targets[row * c.f + 2] = (row % 3) as i64; // food
        targets[row * c.f + 5] = (row % 2) as i64; // area
    }
    (latents, timesteps, targets)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gradient_matches_central_differences() {
    let c = card();
    let server = GuideServer::start(&shipped_repository(), &["--poll-ms", "0"]).await;
    let mut client = server.client().await.unwrap();
    let (latents, timesteps, targets) = sample_inputs(&c, 2, 1);
    let resp = client
        .model_infer(request(&c, &latents, &timesteps, &targets))
        .await
        .unwrap()
        .into_inner();
    let (lp, grad) = outputs(&resp);
    assert_eq!(lp.len(), 2);
    assert_eq!(grad.len(), latents.len());
    assert!(grad.iter().any(|g| g.abs() > 1e-4), "gradient is all zero");
    // The largest few gradient coordinates, checked by central differences through the service.
    let mut order: Vec<usize> = (0..grad.len()).collect();
    order.sort_by(|a, b| grad[*b].abs().total_cmp(&grad[*a].abs()));
    let h = 1e-2f32;
    for &i in order.iter().take(6) {
        let row = i / (c.l * c.d);
        let mut plus = latents.clone();
        plus[i] += h;
        let mut minus = latents.clone();
        minus[i] -= h;
        let lp_plus = outputs(
            &client
                .model_infer(request(&c, &plus, &timesteps, &targets))
                .await
                .unwrap()
                .into_inner(),
        )
        .0;
        let lp_minus = outputs(
            &client
                .model_infer(request(&c, &minus, &timesteps, &targets))
                .await
                .unwrap()
                .into_inner(),
        )
        .0;
        let fd = (lp_plus[row] - lp_minus[row]) / (2.0 * h);
        assert!(
            (fd - grad[i]).abs() <= 0.05 * grad[i].abs() + 2e-3,
            "coordinate {i}: finite difference {fd}, gradient {}",
            grad[i]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_are_batched_and_equal_unbatched() {
    let c = card();
    let server = GuideServer::start(
        &shipped_repository(),
        &["--poll-ms", "0", "--batch-window-us", "50000"],
    )
    .await;
    let mut client = server.client().await.unwrap();
    let n = 6;
    let inputs: Vec<_> = (0..n)
        .map(|i| sample_inputs(&c, 1, 10 + i as u64))
        .collect();
    let mut alone = Vec::new();
    for (lat, ts, tg) in &inputs {
        alone.push(outputs(
            &client
                .model_infer(request(&c, lat, ts, tg))
                .await
                .unwrap()
                .into_inner(),
        ));
    }
    let tasks: Vec<_> = inputs
        .iter()
        .map(|(lat, ts, tg)| {
            let mut client = client.clone();
            let req = request(&c, lat, ts, tg);
            tokio::spawn(
                async move { outputs(&client.model_infer(req).await.unwrap().into_inner()) },
            )
        })
        .collect();
    for (task, (lp, grad)) in tasks.into_iter().zip(&alone) {
        let (blp, bgrad) = task.await.unwrap();
        assert!(
            (blp[0] - lp[0]).abs() < 1e-4,
            "batched log p {} vs alone {}",
            blp[0],
            lp[0]
        );
        let worst = bgrad
            .iter()
            .zip(grad)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-4, "batched gradient differs by {worst}");
    }
    let metrics = server.metrics();
    let largest: f64 = metrics
        .lines()
        .find(|l| l.starts_with("dlm_guide_batch_size{") && l.contains("quantile=\"1\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(
        largest > 1.0,
        "no request was batched with another:\n{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_swap_under_load_loses_nothing_and_a_broken_model_keeps_the_old_one() {
    let c = card();
    let repo = scratch_repository();
    let server = GuideServer::start_admin(repo.path(), &["--poll-ms", "200"]).await;
    let client = server.client().await.unwrap();
    let failures = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..3)
        .map(|w| {
            let (mut client, failures, done, stop) =
                (client.clone(), failures.clone(), done.clone(), stop.clone());
            let (lat, ts, tg) = sample_inputs(&c, 2, 100 + w);
            let req = request(&c, &lat, &ts, &tg);
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match client.model_infer(req.clone()).await {
                        Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            eprintln!("request failed during swap: {e}");
                            failures.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect();

    // A new version appears: copied beside, then renamed into place (what a deploy does).
    let staging = repo.path().join(".staging");
    copy_dir(&repo.path().join(MODEL).join("1"), &staging);
    std::fs::rename(&staging, repo.path().join(MODEL).join("2")).unwrap();
    let mut meta_client = client.clone();
    let swapped = async {
        loop {
            let r = meta_client
                .model_infer(request(&c, &normals(c.l * c.d, 5), &[3], &vec![-1; c.f]))
                .await
                .unwrap()
                .into_inner();
            if r.model_version == "2" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), swapped)
        .await
        .expect("version 2 was never served");

    // A broken version 3: refused with a clear reason, version 2 keeps serving.
    std::fs::create_dir_all(repo.path().join(MODEL).join("3")).unwrap();
    std::fs::write(
        repo.path().join(MODEL).join("3/model.onnx"),
        b"not an onnx model",
    )
    .unwrap();
    let err = meta_client
        .repository_model_load(admin(RepositoryModelLoadRequest {
            model_name: MODEL.into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("3/model.onnx"), "{}", err.message());
    let index = meta_client
        .repository_index(RepositoryIndexRequest::default())
        .await
        .unwrap()
        .into_inner();
    let v3 = index
        .models
        .iter()
        .find(|m| m.version == "3")
        .expect("version 3 in the index");
    assert_eq!(v3.state, "UNAVAILABLE");
    assert!(!v3.reason.is_empty());
    tokio::time::sleep(Duration::from_millis(600)).await; // a few polls: still no retry, still serving
    let r = meta_client
        .model_infer(request(&c, &normals(c.l * c.d, 6), &[3], &vec![-1; c.f]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.model_version, "2");

    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "requests failed during the swap"
    );
    assert!(
        done.load(Ordering::Relaxed) > 10,
        "too little load to mean anything"
    );

    // Unload, then load again.
    meta_client
        .repository_model_unload(admin(RepositoryModelUnloadRequest {
            model_name: MODEL.into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    let ready = meta_client
        .model_ready(ModelReadyRequest {
            name: MODEL.into(),
            version: String::new(),
        })
        .await
        .unwrap();
    assert!(!ready.into_inner().ready);
    std::fs::remove_dir_all(repo.path().join(MODEL).join("3")).unwrap();
    meta_client
        .repository_model_load(admin(RepositoryModelLoadRequest {
            model_name: MODEL.into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    let ready = meta_client
        .model_ready(ModelReadyRequest {
            name: MODEL.into(),
            version: "2".into(),
        })
        .await
        .unwrap();
    assert!(ready.into_inner().ready);
}

/// The ONNX model with its weights' middle turned to NaN: it loads, and computes garbage.
fn with_nan_weights(model: &[u8]) -> Vec<u8> {
    let mut bytes = model.to_vec();
    let mid = bytes.len() / 2 / 4 * 4;
    for chunk in bytes[mid..mid + 4096].chunks_exact_mut(4) {
        chunk.copy_from_slice(&f32::NAN.to_le_bytes());
    }
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_with_a_foreign_card_or_nan_outputs_is_refused_while_the_old_one_serves() {
    let c = card();
    let repo = scratch_repository();
    let server = GuideServer::start_admin(repo.path(), &["--poll-ms", "0"]).await;
    let mut client = server.client().await.unwrap();
    let dir = |v: &str| repo.path().join(MODEL).join(v);
    let load = |client: &mut dlm_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient<tonic::transport::Channel>| {
        let mut client = client.clone();
        async move {
            client
                .repository_model_load(admin(RepositoryModelLoadRequest {
                    model_name: MODEL.into(),
                    ..Default::default()
                }))
                .await
        }
    };
    // Version 2 is another guide's model (other fields): same name, another card.
    std::fs::create_dir_all(dir("2")).unwrap();
    std::fs::copy(
        shipped_repository().join("e2e-names/1/model.onnx"),
        dir("2").join("model.onnx"),
    )
    .unwrap();
    let err = load(&mut client).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(
        err.message().contains("card differs from version 1"),
        "{}",
        err.message()
    );
    std::fs::remove_dir_all(dir("2")).unwrap();

    // Version 3 has corrupted weights: it loads in ONNX Runtime, the canary sees NaN.
    std::fs::create_dir_all(dir("3")).unwrap();
    let model = std::fs::read(dir("1").join("model.onnx")).unwrap();
    std::fs::write(dir("3").join("model.onnx"), with_nan_weights(&model)).unwrap();
    let err = load(&mut client).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("non-finite"), "{}", err.message());

    // Version 1 served throughout.
    let (lat, ts, tg) = sample_inputs(&c, 2, 8);
    let r = client
        .model_infer(request(&c, &lat, &ts, &tg))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.model_version, "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tensors_and_unknown_models_are_clear_errors() {
    let c = card();
    let server = GuideServer::start(&shipped_repository(), &["--poll-ms", "0"]).await;
    let mut client = server.client().await.unwrap();
    let (lat, ts, tg) = sample_inputs(&c, 2, 3);
    let good = request(&c, &lat, &ts, &tg);
    let mut cases: Vec<(ModelInferRequest, Code, Vec<String>)> = Vec::new();

    let mut r = good.clone();
    r.model_name = "no-such-guide".into();
    cases.push((r, Code::NotFound, vec!["no-such-guide".into()]));
    let mut r = good.clone();
    r.inputs[0].datatype = "FP16".into();
    cases.push((
        r,
        Code::InvalidArgument,
        vec!["latents".into(), "FP16".into()],
    ));
    let mut r = good.clone();
    r.inputs[0].shape = vec![2, c.l as i64, c.d as i64 + 1];
    cases.push((
        r,
        Code::InvalidArgument,
        vec!["latents".into(), "shape".into()],
    ));
    let mut r = good.clone();
    r.raw_input_contents[0].truncate(10);
    cases.push((
        r,
        Code::InvalidArgument,
        vec!["latents".into(), "bytes".into()],
    ));
    let mut r = good.clone();
    r.inputs[0].shape = vec![1 << 61, c.l as i64, c.d as i64];
    r.inputs[1].shape = vec![1 << 61];
    r.inputs[2].shape = vec![1 << 61, c.f as i64];
    cases.push((
        r,
        Code::InvalidArgument,
        vec!["latents".into(), "at most 64".into()],
    ));
    let (lat65, ts65, tg65) = sample_inputs(&c, 65, 4);
    cases.push((
        request(&c, &lat65, &ts65, &tg65),
        Code::InvalidArgument,
        vec!["65 rows".into(), "at most 64".into()],
    ));
    cases.push((
        request(&c, &lat, &[0, c.t], &tg),
        Code::InvalidArgument,
        vec!["timesteps".into(), c.t.to_string()],
    ));
    let mut bad_tg = tg.clone();
    bad_tg[3] = 999;
    cases.push((
        request(&c, &lat, &ts, &bad_tg),
        Code::InvalidArgument,
        vec!["targets".into(), c.field_names[3].clone()],
    ));
    let mut r = good.clone();
    r.inputs[2].name = "labels".into();
    cases.push((r, Code::InvalidArgument, vec!["labels".into()]));
    let mut r = good.clone();
    r.inputs[1].shape = vec![3];
    cases.push((r, Code::InvalidArgument, vec!["timesteps".into()]));
    let mut r = good.clone();
    r.outputs
        .push(model_infer_request::InferRequestedOutputTensor {
            name: "logits".into(),
            ..Default::default()
        });
    cases.push((r, Code::InvalidArgument, vec!["logits".into()]));

    for (req, code, needles) in cases {
        let err = client.model_infer(req).await.unwrap_err();
        assert_eq!(err.code(), code, "{err}");
        for n in needles {
            assert!(
                err.message().contains(&n),
                "{:?} lacks {n:?}",
                err.message()
            );
        }
    }
    // Nothing above hurt the server.
    let (good_lp, good_grad) = outputs(&client.model_infer(good).await.unwrap().into_inner());

    // A row with a NaN is answered as NaN with a zero gradient; its batch-mate as if alone.
    let mut nan = lat.clone();
    nan[5] = f32::NAN;
    let (lp, grad) = outputs(
        &client
            .model_infer(request(&c, &nan, &ts, &tg))
            .await
            .unwrap()
            .into_inner(),
    );
    let per = c.l * c.d;
    assert!(lp[0].is_nan(), "{lp:?}");
    assert!(grad[..per].iter().all(|g| *g == 0.0));
    assert!((lp[1] - good_lp[1]).abs() < 1e-5, "{lp:?} vs {good_lp:?}");
    let worst = grad[per..]
        .iter()
        .zip(&good_grad[per..])
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-5, "{worst}");

    // Client-chosen model names do not become metric labels.
    for i in 0..50 {
        let mut r = request(&c, &lat, &ts, &tg);
        r.model_name = format!("made-up-{i}");
        assert_eq!(
            client.model_infer(r).await.unwrap_err().code(),
            Code::NotFound
        );
    }
    let metrics = server.metrics();
    assert!(
        !metrics.contains("made-up-"),
        "client names leaked into /metrics"
    );
    assert!(metrics.contains("model=\"unknown\""), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reflection_cards_and_metadata() {
    let c = card();
    let server = GuideServer::start(&shipped_repository(), &["--poll-ms", "0"]).await;
    let channel = tonic::transport::Channel::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "inference.GRPCInferenceService".into(),
            })
            .await
            .map(|r| r.into_inner().status)
            .ok();
        if status == Some(tonic_health::pb::health_check_response::ServingStatus::Serving as i32) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "health never reported SERVING: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut reflection =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(
            channel.clone(),
        );
    let req = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let reply = stream.message().await.unwrap().unwrap();
    let names: Vec<String> = match reply.message_response.unwrap() {
        tonic_reflection::pb::v1::server_reflection_response::MessageResponse::ListServicesResponse(l) => {
            l.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection reply {other:?}"),
    };
    for want in [
        "inference.GRPCInferenceService",
        "dlm.v1.GuideCards",
        "grpc.health.v1.Health",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }

    let mut cards = dlm_proto::dlm::v1::guide_cards_client::GuideCardsClient::new(channel);
    let card = cards
        .get_card(dlm_proto::dlm::v1::GetCardRequest {
            model_name: MODEL.into(),
            model_version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(card.fields.len(), c.f);
    assert_eq!(card.fields[0].name, "name");
    assert!(card
        .fields
        .iter()
        .all(|f| f.values.iter().any(|v| v == "absent")));
    assert_eq!(card.embedding_sha256.len(), 64);
    assert_eq!(card.seq_len as usize, c.l);
    let err = cards
        .get_card(dlm_proto::dlm::v1::GetCardRequest {
            model_name: "nope".into(),
            model_version: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_triton_client_gets_metadata_and_the_same_gradients() {
    let c = card();
    let server = GuideServer::start(&shipped_repository(), &["--poll-ms", "0"]).await;
    let port = server.port;
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(venv_python())
            .arg(repo_root().join("tests/python/triton_client.py"))
            .arg(format!("127.0.0.1:{port}"))
            .arg(MODEL)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["platform"], "onnxruntime_onnx");
    assert_eq!(v["shapes"]["latents"], serde_json::json!([-1, c.l, c.d]));
    assert_eq!(v["shapes"]["grad"], serde_json::json!([-1, c.l, c.d]));
    assert_eq!(v["grad_shape"], serde_json::json!([3, c.l, c.d]));
    let f32s = |k: &str| -> Vec<f32> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    let i64s = |k: &str| -> Vec<i64> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect()
    };
    let mut client = server.client().await.unwrap();
    let (lp, grad) = outputs(
        &client
            .model_infer(request(
                &c,
                &f32s("latents"),
                &i64s("timesteps"),
                &i64s("targets"),
            ))
            .await
            .unwrap()
            .into_inner(),
    );
    for (a, b) in lp.iter().zip(f32s("log_prob")) {
        assert!(
            (a - b).abs() < 1e-5,
            "log p {a} (ours) vs {b} (tritonclient)"
        );
    }
    let worst = grad
        .iter()
        .zip(f32s("grad"))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-5, "gradients differ by {worst}");
}
