//! A closed control plane, tried as an attacker would against the real binaries on loopback:
//! admin calls need the token, SetGuide only reaches allowed hosts, repository names stay inside
//! the repository, no absolute paths leak; and TLS / mutual TLS between client, generator and guide.

use std::time::{Duration, Instant};

use dlm_proto::dlm::v1 as pb;
use dlm_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use dlm_proto::inference::*;
use dlm_tests::{
    admin, admin_token_file, free_port, repo_root, GeneratorServer, GuideServer, ADMIN_TOKEN,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::Code;

const GUIDE: &str = "e2e-semantic";

fn with_token<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

fn set_guide(url: String) -> pb::SetGuideRequest {
    pb::SetGuideRequest {
        name: "extra".into(),
        url,
        card_json: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_need_the_token_and_are_off_without_one() {
    let guide = GuideServer::start(&repo_root().join("models/guides"), &["--poll-ms", "0"]).await;
    let base = vec![
        "--model".to_string(),
        "models/e2e-deep".into(),
        "--guide".into(),
        format!("{GUIDE}=http://127.0.0.1:{}", guide.port),
    ];
    // Without --admin-token-file: admin calls are disabled, even with a token.
    let open = GeneratorServer::start(&base).await;
    let mut client = open.client().await;
    let err = client
        .set_guide(admin(set_guide(guide.url())))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let err = client
        .remove_guide(admin(pb::RemoveGuideRequest { name: GUIDE.into() }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let mut guide_client = guide.client().await.unwrap();
    let err = guide_client
        .repository_model_unload(admin(RepositoryModelUnloadRequest {
            model_name: GUIDE.into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");

    // With it: no header or a wrong token is UNAUTHENTICATED; the right one works.
    let mut args = base.clone();
    args.extend([
        "--admin-token-file".into(),
        admin_token_file().display().to_string(),
    ]);
    let closed = GeneratorServer::start(&args).await;
    let mut client = closed.client().await;
    let err = client.set_guide(set_guide(guide.url())).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    let wrong = format!("{ADMIN_TOKEN}x");
    let err = client
        .set_guide(with_token(set_guide(guide.url()), &wrong))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    let err = client
        .remove_guide(with_token(
            pb::RemoveGuideRequest { name: GUIDE.into() },
            &wrong,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    let info = client
        .set_guide(admin(pb::SetGuideRequest {
            name: "extra".into(),
            url: format!("{}/{GUIDE}", guide.url()),
            card_json: String::new(),
        }))
        .await
        .expect("SetGuide with the token")
        .into_inner();
    assert_eq!(info.name, "extra");
    client
        .remove_guide(admin(pb::RemoveGuideRequest {
            name: "extra".into(),
        }))
        .await
        .expect("RemoveGuide with the token");
    // Generation and Describe stay open.
    let d = client
        .describe(pb::DescribeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        d.model.unwrap().name,
        "e2e-deep",
        "Describe shows the model directory's name, not its path"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_guide_reaches_only_allowed_hosts_and_says_nothing_about_others() {
    let guide = GuideServer::start(&repo_root().join("models/guides"), &["--poll-ms", "0"]).await;
    let closed_port = free_port();
    let generator = GeneratorServer::start(&[
        "--model".into(),
        "models/e2e-deep".into(),
        "--guide".into(),
        format!("{GUIDE}=http://127.0.0.1:{}", guide.port),
        "--guide-allow".into(),
        format!("127.0.0.1:{}", guide.port),
        "--admin-token-file".into(),
        admin_token_file().display().to_string(),
    ])
    .await;
    let mut client = generator.client().await;
    // A closed port, an open non-guide port (the generator's own), an open guide port on another
    // address, a far host: all PERMISSION_DENIED at once, with one message but for the URL.
    let targets = [
        format!("http://127.0.0.1:{closed_port}"),
        format!("http://127.0.0.1:{}", generator.port),
        format!("http://localhost:{}", guide.port),
        "http://10.255.255.1:8001".to_string(),
        "file:///etc/passwd".to_string(),
    ];
    let mut messages = Vec::new();
    for url in &targets {
        let t = Instant::now();
        let err = client
            .set_guide(admin(set_guide(url.clone())))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{url}: {err}");
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{url}: a connection was tried"
        );
        messages.push(err.message().replace(url.as_str(), "URL"));
    }
    assert!(messages.windows(2).all(|w| w[0] == w[1]), "{messages:?}");
    // The allowed one works.
    client
        .set_guide(admin(pb::SetGuideRequest {
            name: "extra".into(),
            url: format!("{}/{GUIDE}", guide.url()),
            card_json: String::new(),
        }))
        .await
        .expect("an allowed guide");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repository_names_cannot_leave_the_repository() {
    let outside = tempfile::tempdir().unwrap();
    let repo = tempfile::tempdir().unwrap();
    // A valid model outside the repository, and a link to it inside.
    let evil = outside.path().join("evil/1");
    std::fs::create_dir_all(&evil).unwrap();
    std::fs::copy(
        repo_root().join("models/guides/e2e-semantic/1/model.onnx"),
        evil.join("model.onnx"),
    )
    .unwrap();
    let good = repo.path().join(GUIDE).join("1");
    std::fs::create_dir_all(&good).unwrap();
    std::fs::copy(
        repo_root().join("models/guides/e2e-semantic/1/model.onnx"),
        good.join("model.onnx"),
    )
    .unwrap();
    std::os::unix::fs::symlink(outside.path().join("evil"), repo.path().join("linked")).unwrap();
    let guide = GuideServer::start_admin(repo.path(), &["--poll-ms", "0"]).await;
    let mut client = guide.client().await.unwrap();
    let repo_path = repo.path().canonicalize().unwrap();
    let evil_relative = format!(
        "../{}/evil",
        outside.path().file_name().unwrap().to_str().unwrap()
    );
    for name in [
        evil_relative.as_str(),
        outside.path().join("evil").to_str().unwrap(),
        "..",
        ".",
        "a/b",
    ] {
        let err = client
            .repository_model_load(admin(RepositoryModelLoadRequest {
                model_name: name.into(),
                ..Default::default()
            }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{name}: {err}");
    }
    // A link that resolves outside: no versions inside the repository.
    let err = client
        .repository_model_load(admin(RepositoryModelLoadRequest {
            model_name: "linked".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");
    assert!(
        !err.message().contains(repo_path.to_str().unwrap()),
        "an absolute path leaked: {}",
        err.message()
    );
    let ready = client
        .model_ready(ModelReadyRequest {
            name: "linked".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        !ready.ready,
        "a model from outside the repository is served"
    );
}

/// A CA, and certificates it signs for 127.0.0.1 (server) and for a client.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let dir = tempfile::tempdir().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        for (name, sans) in [
            ("server", vec!["127.0.0.1".to_string()]),
            ("client", vec!["client".into()]),
        ] {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(sans)
                .unwrap()
                .signed_by(&key, &ca)
                .unwrap();
            std::fs::write(dir.path().join(format!("{name}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.path().join(format!("{name}.key")), key.serialize_pem()).unwrap();
        }
        Self { dir }
    }

    fn path(&self, file: &str) -> String {
        self.dir.path().join(file).display().to_string()
    }

    fn read(&self, file: &str) -> Vec<u8> {
        std::fs::read(self.dir.path().join(file)).unwrap()
    }

    fn client(&self, with_cert: bool) -> ClientTlsConfig {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.read("ca.pem")))
            .domain_name("127.0.0.1");
        if with_cert {
            tls.identity(Identity::from_pem(
                self.read("client.pem"),
                self.read("client.key"),
            ))
        } else {
            tls
        }
    }
}

async fn tls_channel(port: u16, tls: ClientTlsConfig) -> Result<Channel, tonic::transport::Error> {
    Channel::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
}

/// Waits until a TLS server answers `check` (up to 60 s).
async fn wait_tls(port: u16, tls: &ClientTlsConfig, service: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(ch) = tls_channel(port, tls.clone()).await {
            let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
            let r = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: service.into(),
                })
                .await;
            if r.is_ok_and(|r| r.into_inner().status == 1) {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "TLS server on {port} never became healthy"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_generator_and_an_mtls_guide_serve_a_guided_request() {
    let pki = Pki::new();
    let guide_port = free_port();
    let _guide = GuideServer::spawn_on(
        guide_port,
        &repo_root().join("models/guides"),
        &[
            "--poll-ms",
            "0",
            "--tls-cert",
            &pki.path("server.pem"),
            "--tls-key",
            &pki.path("server.key"),
            "--tls-client-ca",
            &pki.path("ca.pem"),
        ],
    );
    wait_tls(guide_port, &pki.client(true), "").await;

    // Under mutual TLS a client without a certificate gets nothing from the guide.
    let refused = match tls_channel(guide_port, pki.client(false)).await {
        Err(_) => true,
        Ok(ch) => GrpcInferenceServiceClient::new(ch)
            .server_live(ServerLiveRequest {})
            .await
            .is_err(),
    };
    assert!(
        refused,
        "the mTLS guide answered a client without a certificate"
    );
    // Nor does a plaintext one.
    let plain = GrpcInferenceServiceClient::connect(format!("http://127.0.0.1:{guide_port}")).await;
    let plain_refused = match plain {
        Err(_) => true,
        Ok(mut c) => c.server_live(ServerLiveRequest {}).await.is_err(),
    };
    assert!(plain_refused, "the TLS guide answered plaintext");

    let generator = GeneratorServer::spawn(&[
        "--model".into(),
        "models/e2e-deep".into(),
        "--guide".into(),
        format!("{GUIDE}=https://127.0.0.1:{guide_port}"),
        "--guide-tls-ca".into(),
        pki.path("ca.pem"),
        "--guide-tls-cert".into(),
        pki.path("client.pem"),
        "--guide-tls-key".into(),
        pki.path("client.key"),
        "--tls-cert".into(),
        pki.path("server.pem"),
        "--tls-key".into(),
        pki.path("server.key"),
    ]);
    wait_tls(generator.port, &pki.client(false), "").await;
    let ch = tls_channel(generator.port, pki.client(false))
        .await
        .unwrap();
    let mut client = pb::generator_client::GeneratorClient::new(ch);
    let resp = client
        .generate(pb::GenerateRequest {
            n: 2,
            steps: Some(30),
            seed: Some(1),
            controls: vec![pb::Control {
                guide: GUIDE.into(),
                targets: vec!["area=riverside".into()],
                weight: None,
            }],
            ..Default::default()
        })
        .await
        .expect("a guided request over TLS, through an mTLS guide")
        .into_inner();
    assert_eq!(resp.samples.len(), 2);
    assert!(
        resp.samples.iter().all(|s| s.scores.len() == 1),
        "final scores came back"
    );

    // The CLI speaks TLS too.
    let out = dlm_tests::run(
        "dlm-generator",
        &[
            "generate",
            "--endpoint",
            &format!("https://127.0.0.1:{}", generator.port),
            "--tls-ca",
            &pki.path("ca.pem"),
            "--n",
            "1",
            "--steps",
            "10",
            "--seed",
            "1",
        ],
    );
    assert!(out.status.success(), "{}", dlm_tests::stderr(&out));
}
