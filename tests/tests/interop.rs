//! Our guide on a third-party Open Inference Protocol server: Seldon MLServer 1.7.1 (installed by
//! deploy/setup.sh into .venv-interop) serves the shipped `e2e-semantic/1/model.onnx` unmodified
//! through deploy/oip/mlserver/runtime.py, and the generator steers with it exactly as with dlm-guide.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dlm_proto::dlm::v1 as pb;
use dlm_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use dlm_proto::inference::ServerReadyRequest;
use dlm_tests::{binary, free_port, repo_root, GeneratorServer, GuideServer};

const GUIDE: &str = "e2e-semantic";

struct MlServer {
    port: u16,
    child: Child,
}

impl MlServer {
    async fn start() -> Self {
        let mlserver = repo_root().join(".venv-interop/bin/mlserver");
        assert!(
            mlserver.exists(),
            "{} missing: run deploy/setup.sh",
            mlserver.display()
        );
        let (port, http) = (free_port(), free_port());
        let child = Command::new(repo_root().join("deploy/oip/mlserver/serve.sh"))
            .arg(repo_root().join("models/guides/e2e-semantic/1/model.onnx"))
            .args([GUIDE, &port.to_string(), &http.to_string()])
            .env("MLSERVER", &mlserver)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("MLServer starts");
        let server = Self { port, child };
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Ok(mut c) =
                GrpcInferenceServiceClient::connect(format!("http://127.0.0.1:{port}")).await
            {
                if c.server_ready(ServerReadyRequest {})
                    .await
                    .is_ok_and(|r| r.into_inner().ready)
                {
                    return server;
                }
            }
            assert!(Instant::now() < deadline, "MLServer never became ready");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for MlServer {
    fn drop(&mut self) {
        // TERM lets serve.sh stop MLServer and remove its model folder; if it is not gone in
        // 20 s, end its children (MLServer) and it.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("pkill")
            .args(["-TERM", "-P", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn guided(seed: u64) -> pb::GenerateRequest {
    dlm_tests::request(GUIDE, 3, 60, seed, &["food=Italian", "area=riverside"])
}

fn card_file() -> String {
    repo_root()
        .join("models/guides/e2e-semantic/1/card.json")
        .display()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guided_request_through_mlserver_gives_dlm_guide_s_texts() {
    let mlserver = MlServer::start().await;
    let ours = GuideServer::start(&repo_root().join("models/guides"), &["--poll-ms", "0"]).await;
    let via = |url: String| {
        vec![
            "--model".to_string(),
            "models/e2e-deep".into(),
            "--guide".into(),
            format!("{GUIDE}={url}"),
        ]
    };
    let theirs = GeneratorServer::start(&via(format!(
        "http://127.0.0.1:{}#{}",
        mlserver.port,
        card_file()
    )))
    .await;
    let reference = GeneratorServer::start(&via(ours.url())).await;
    for seed in [1, 2] {
        let a = theirs
            .client()
            .await
            .generate(guided(seed))
            .await
            .unwrap()
            .into_inner();
        let b = reference
            .client()
            .await
            .generate(guided(seed))
            .await
            .unwrap()
            .into_inner();
        let texts =
            |r: &pb::GenerateResponse| r.samples.iter().map(|s| s.text.clone()).collect::<Vec<_>>();
        assert_eq!(
            texts(&a),
            texts(&b),
            "seed {seed}: MLServer and dlm-guide steer differently"
        );
        for (x, y) in a.samples.iter().zip(&b.samples) {
            let (lx, ly) = (x.scores[0].log_prob, y.scores[0].log_prob);
            assert!((lx - ly).abs() < 1e-3, "final log p {lx} vs {ly}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_cards_or_without_the_model_is_refused_at_once() {
    let mlserver = MlServer::start().await;
    let start = |guide: String| {
        let started = Instant::now();
        let out = Command::new(binary("dlm-generator"))
            .args([
                "serve",
                "--model",
                "models/e2e-deep",
                "--metrics-port",
                "0",
                "--http-port",
                "0",
            ])
            .args(["--guide-wait-s", "8"])
            .args(["--port", &free_port().to_string(), "--guide", &guide])
            .current_dir(repo_root())
            .output()
            .unwrap();
        (out, started.elapsed())
    };
    // No card file: MLServer answers GetCard with UNIMPLEMENTED; that is final, not retried for
    // --guide-wait-s.
    let (out, took) = start(format!("{GUIDE}=http://127.0.0.1:{}", mlserver.port));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("serves no guide cards") && stderr.contains("card.json"),
        "{stderr}"
    );
    assert!(took < Duration::from_secs(6), "retried for {took:?}");
    // A card file for a model the server does not have: ModelReady says so at registration.
    let (out, took) = start(format!(
        "{GUIDE}=http://127.0.0.1:{}/no-such-model#{}",
        mlserver.port,
        card_file()
    ));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("no-such-model"), "{stderr}");
    assert!(took < Duration::from_secs(30), "took {took:?}");
}
