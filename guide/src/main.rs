//! `dlm-guide`: serve guide models (classifier gradients) over the Open Inference Protocol.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use dlm_guide::batcher::BatchOptions;
use dlm_guide::repository::{Repository, RepositoryOptions};
use dlm_guide::runtime::{self, SessionOptions};

#[derive(Parser)]
#[command(
    name = "dlm-guide",
    version,
    about = "Guide service: classifier gradients for dlm, over the Open Inference Protocol"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, env = "DLM_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the models of a repository (DIR/<model>/<version>/model.onnx).
    Serve(ServeArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    #[arg(long, env = "DLM_MODEL_REPOSITORY", default_value = "models/guides")]
    model_repository: PathBuf,
    #[arg(long, env = "DLM_HOST", default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    /// gRPC port (Open Inference Protocol, guide cards, health, reflection).
    #[arg(long, env = "DLM_PORT", default_value_t = 8001)]
    port: u16,
    /// Prometheus metrics listen address (its own flag: metrics need not face the gRPC network).
    #[arg(long, env = "DLM_METRICS_HOST", default_value = "127.0.0.1")]
    metrics_host: std::net::IpAddr,
    /// Prometheus metrics port (0 = off).
    #[arg(long, env = "DLM_METRICS_PORT", default_value_t = 9091)]
    metrics_port: u16,
    /// How often to re-scan the repository for new versions, in ms (0 = only on RepositoryModelLoad).
    #[arg(long, env = "DLM_POLL_MS", default_value_t = 2000)]
    poll_ms: u64,
    /// Version policy: keep the newest N versions of each model loaded.
    #[arg(long, env = "DLM_KEEP_VERSIONS", default_value_t = 1)]
    keep_versions: usize,
    /// How long a call waits for batch-mates, in microseconds. 0 (the default): not at all — the
    /// calls that queue while a batch runs form the next one, so a lone caller never waits and a
    /// busy guide still batches.
    #[arg(long, env = "DLM_BATCH_WINDOW_US", default_value_t = 0)]
    batch_window_us: u64,
    /// Largest batch one ONNX Runtime run takes.
    #[arg(long, env = "DLM_MAX_BATCH", default_value_t = 64)]
    max_batch: usize,
    /// Most rows (latent sequences) one ModelInfer may carry; larger calls are INVALID_ARGUMENT.
    /// Bounds the memory one call takes (about 1 MB per row in ONNX Runtime's arena).
    #[arg(long, env = "DLM_MAX_ROWS", default_value_t = 64)]
    max_rows: usize,
    /// Requests that may wait per model version before UNAVAILABLE.
    #[arg(long, env = "DLM_QUEUE", default_value_t = 1024)]
    queue: usize,
    /// ONNX Runtime intra-op threads per session.
    #[arg(long, env = "DLM_INTRA_THREADS", default_value_t = 1)]
    intra_threads: usize,
    /// ONNX Runtime inter-op threads per session.
    #[arg(long, env = "DLM_INTER_THREADS", default_value_t = 1)]
    inter_threads: usize,
    /// The ONNX Runtime shared library (else ORT_DYLIB_PATH, else the `deploy/setup.sh` location).
    #[arg(long, env = "DLM_ORT_LIBRARY")]
    ort_library: Option<PathBuf>,
    #[command(flatten)]
    security: dlm_proto::security::ServerSecurity,
}

fn main() {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    let Command::Serve(args) = cli.command;
    if let Err(e) = serve(args) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    runtime::init(args.ort_library.as_deref())?;
    let admin = args.security.admin_token().map_err(anyhow::Error::msg)?;
    let tls = args.security.server_tls().map_err(anyhow::Error::msg)?;
    let options = RepositoryOptions {
        keep_versions: args.keep_versions,
        session: SessionOptions {
            intra_threads: args.intra_threads,
            inter_threads: args.inter_threads,
        },
        batch: BatchOptions {
            window: Duration::from_micros(args.batch_window_us),
            max_batch: args.max_batch,
            queue: args.queue,
        },
    };
    let repo = Repository::new(&args.model_repository, options)?;
    repo.sync_all();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        if args.metrics_port != 0 {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .with_http_listener(SocketAddr::new(args.metrics_host, args.metrics_port))
                .install()?;
        }
        let poll = (args.poll_ms > 0).then(|| Duration::from_millis(args.poll_ms));
        dlm_guide::server::serve(
            repo,
            SocketAddr::new(args.host, args.port),
            dlm_guide::server::ServeOptions {
                poll_interval: poll,
                max_rows: args.max_rows,
                admin,
                tls,
            },
            shutdown_signal(),
        )
        .await
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {},
        _ = term.recv() => {},
    }
    tracing::info!("shutting down: draining in-flight requests");
}
