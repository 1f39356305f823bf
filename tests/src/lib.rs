//! Helpers for the end-to-end tests: where the built binaries, the shipped models and the data are.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The E2E data directory (`DLM_DATA_DIR`, else `../shared/data/e2e` beside the checkout).
pub fn data_dir() -> PathBuf {
    std::env::var_os("DLM_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("../shared/data/e2e"))
}

/// A workspace binary from the same profile as this test (`cargo test` builds them first).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let path = exe.parent().and_then(Path::parent).unwrap().join(name);
    assert!(
        path.exists(),
        "{} not built: run `cargo build --workspace` with this profile first",
        path.display()
    );
    path
}

/// Runs a binary from the repository root with the given arguments.
pub fn run(name: &str, args: &[&str]) -> Output {
    Command::new(binary(name))
        .args(args)
        .current_dir(repo_root())
        .env("DLM_DATA_DIR", data_dir())
        .env_remove("DLM_SEED")
        .output()
        .expect("binary starts")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A port that was free a moment ago on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The Python of the project's virtual environment (`deploy/setup.sh`).
pub fn venv_python() -> PathBuf {
    let p = repo_root().join(".venv/bin/python");
    assert!(p.exists(), "{} missing: run deploy/setup.sh", p.display());
    p
}

/// Runs `start` (which picks fresh ports) up to three times: a port found free by [`free_port`]
/// can be taken by another test before the server binds it. Panics with the last failure.
async fn on_fresh_ports<T, F>(mut start: impl FnMut() -> F) -> T
where
    F: std::future::Future<Output = Result<T, String>>,
{
    let mut last = String::new();
    for _ in 0..3 {
        match start().await {
            Ok(server) => return server,
            Err(e) => last = e,
        }
    }
    panic!("{last}")
}

/// A `dlm-guide serve` process on loopback, killed on drop.
pub struct GuideServer {
    pub port: u16,
    pub metrics_port: u16,
    child: std::process::Child,
}

impl GuideServer {
    /// Starts the guide on `repository` and waits until it reports ready.
    pub async fn start(repository: &Path, extra: &[&str]) -> Self {
        on_fresh_ports(|| Self::try_start_on(free_port(), repository, extra)).await
    }

    /// [`start`](Self::start) with `--admin-token-file` holding [`ADMIN_TOKEN`] (for the
    /// repository admin calls).
    pub async fn start_admin(repository: &Path, extra: &[&str]) -> Self {
        let token = admin_token_file();
        let mut args = extra.to_vec();
        args.extend(["--admin-token-file", token.to_str().unwrap()]);
        Self::start(repository, &args).await
    }

    /// [`start`](Self::start) on a given port.
    pub async fn start_on(port: u16, repository: &Path, extra: &[&str]) -> Self {
        Self::try_start_on(port, repository, extra)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts `dlm-guide serve` on `port` without waiting for it.
    pub fn spawn_on(port: u16, repository: &Path, extra: &[&str]) -> Self {
        let metrics_port = free_port();
        let child = Command::new(binary("dlm-guide"))
            .args(["serve", "--model-repository"])
            .arg(repository)
            .args([
                "--port",
                &port.to_string(),
                "--metrics-port",
                &metrics_port.to_string(),
            ])
            .args(extra)
            .current_dir(repo_root())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("dlm-guide starts");
        Self {
            port,
            metrics_port,
            child,
        }
    }

    async fn try_start_on(port: u16, repository: &Path, extra: &[&str]) -> Result<Self, String> {
        let mut server = Self::spawn_on(port, repository, extra);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            if let Ok(mut c) = server.client().await {
                if let Ok(r) = c
                    .server_ready(dlm_proto::inference::ServerReadyRequest {})
                    .await
                {
                    if r.into_inner().ready {
                        return Ok(server);
                    }
                }
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!("dlm-guide exited at start-up: {status}"));
            }
            if std::time::Instant::now() > deadline {
                return Err("dlm-guide did not become ready".into());
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub async fn client(
        &self,
    ) -> Result<
        dlm_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient<
            tonic::transport::Channel,
        >,
        tonic::transport::Error,
    > {
        Ok(
            dlm_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient::connect(self.url())
                .await?
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
        )
    }

    pub fn metrics(&self) -> String {
        scrape(self.metrics_port)
    }
}

impl Drop for GuideServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `dlm-generator serve` process on loopback, killed on drop.
pub struct GeneratorServer {
    pub port: u16,
    pub metrics_port: u16,
    /// The HTTP/JSON API and playground.
    pub http_port: u16,
    child: std::process::Child,
}

impl GeneratorServer {
    /// Starts the generator with `args` (model, guides, limits) and waits until it is SERVING.
    pub async fn start(args: &[String]) -> Self {
        on_fresh_ports(|| Self::try_start(args)).await
    }

    async fn try_start(args: &[String]) -> Result<Self, String> {
        let mut server = Self::spawn(args);
        server.wait_serving().await.map(|()| server)
    }

    /// Starts the generator process without waiting for it.
    pub fn spawn(args: &[String]) -> Self {
        let (port, metrics_port, http_port) = (free_port(), free_port(), free_port());
        let child = Command::new(binary("dlm-generator"))
            .arg("serve")
            .args(args)
            .args([
                "--port",
                &port.to_string(),
                "--metrics-port",
                &metrics_port.to_string(),
                "--http-port",
                &http_port.to_string(),
            ])
            .current_dir(repo_root())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("dlm-generator starts");
        Self {
            port,
            metrics_port,
            http_port,
            child,
        }
    }

    /// One HTTP/1.0 exchange with the HTTP/JSON API: (status, headers and body as text).
    pub fn http(&self, method: &str, path: &str, headers: &[&str], body: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.http_port)).unwrap();
        let mut req = format!("{method} {path} HTTP/1.0\r\nHost: localhost\r\n");
        for h in headers {
            req.push_str(h);
            req.push_str("\r\n");
        }
        req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let status = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (status, out)
    }

    /// The overall gRPC health status, once the port answers.
    pub async fn health(&self) -> Option<i32> {
        self.health_of("").await
    }

    /// The gRPC health status of `service` (e.g. `guide/<name>`), once the port answers.
    pub async fn health_of(&self, service: &str) -> Option<i32> {
        let ch = tonic::transport::Channel::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .ok()?;
        let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .ok()?;
        Some(r.into_inner().status)
    }

    /// Waits (up to 60 s) until the generator reports SERVING.
    pub async fn wait_serving(&mut self) -> Result<(), String> {
        let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            if self.health().await == Some(serving) {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("dlm-generator exited at start-up: {status}"));
            }
            if std::time::Instant::now() > deadline {
                return Err("dlm-generator did not become healthy".into());
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub async fn client(
        &self,
    ) -> dlm_proto::dlm::v1::generator_client::GeneratorClient<tonic::transport::Channel> {
        dlm_proto::dlm::v1::generator_client::GeneratorClient::connect(self.url())
            .await
            .unwrap()
    }
}

impl Drop for GeneratorServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A request for `n` texts at `steps` sampling steps and `seed`, steered by `guide` towards
/// `targets` ("field=value"; none: unguided).
pub fn request(
    guide: &str,
    n: u32,
    steps: u32,
    seed: u64,
    targets: &[&str],
) -> dlm_proto::dlm::v1::GenerateRequest {
    use dlm_proto::dlm::v1 as pb;
    pb::GenerateRequest {
        n,
        steps: Some(steps),
        seed: Some(seed),
        controls: if targets.is_empty() {
            vec![]
        } else {
            vec![pb::Control {
                guide: guide.into(),
                targets: targets.iter().map(|t| t.to_string()).collect(),
                weight: None,
            }]
        },
        ..Default::default()
    }
}

/// The texts of a generate response, in order.
pub fn texts(r: dlm_proto::dlm::v1::GenerateResponse) -> Vec<String> {
    r.samples.into_iter().map(|s| s.text).collect()
}

/// GET /metrics from a Prometheus listener on loopback.
pub fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

impl GeneratorServer {
    pub fn metrics(&self) -> String {
        scrape(self.metrics_port)
    }
}

impl GuideServer {
    /// Freezes the process (SIGSTOP): it holds its port and answers nothing, as a hung guide does.
    pub fn pause(&self) {
        signal(self.child.id(), "-STOP");
    }

    /// Resumes a paused guide (SIGCONT).
    pub fn resume(&self) {
        signal(self.child.id(), "-CONT");
    }

    /// Stops the guide now (as a crash would).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(pid: u32, which: &str) {
    let ok = Command::new("kill")
        .args([which, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {which} {pid} failed");
}

/// The admin token the tests' servers are started with (`--admin-token-file`, [`admin_token_file`]).
pub const ADMIN_TOKEN: &str = "dlm-test-admin-token-6f1c2a";

/// A file holding [`ADMIN_TOKEN`]: one path for every test process (a name per process left one
/// file behind per test binary), written by rename so that a server never reads it half-written.
pub fn admin_token_file() -> PathBuf {
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        use std::io::Write;
        let dir = std::env::temp_dir();
        let path = dir.join("dlm-test-admin-token");
        let mut file = tempfile::NamedTempFile::new_in(&dir).unwrap();
        writeln!(file, "{ADMIN_TOKEN}").unwrap();
        file.persist(&path).unwrap();
        path
    })
    .clone()
}

/// `msg` as an admin call: metadata `authorization: Bearer <ADMIN_TOKEN>`.
pub fn admin<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {ADMIN_TOKEN}").parse().unwrap(),
    );
    r
}

/// The shipped guide repository on a guide server, and a generator on the shipped model with
/// `guides` of it registered (each model under its own name), admin calls open to
/// [`ADMIN_TOKEN`], and `extra` flags.
pub async fn stack(guides: &[&str], extra: &[&str]) -> (GuideServer, GeneratorServer) {
    let guide = GuideServer::start(&repo_root().join("models/guides"), &["--poll-ms", "0"]).await;
    let mut args: Vec<String> = vec!["--model".into(), "models/e2e-deep".into()];
    for g in guides {
        args.push("--guide".into());
        args.push(format!("{g}=http://127.0.0.1:{}/{g}", guide.port));
    }
    args.push("--admin-token-file".into());
    args.push(admin_token_file().display().to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    let generator = GeneratorServer::start(&args).await;
    (guide, generator)
}
