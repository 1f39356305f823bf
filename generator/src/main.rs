//! `dlm-generator`: train a Diffusion-LM, sample from it, measure its fluency.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::Context;
use candle_core::Device;
use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};

use dlm_generator::device::DeviceChoice;
use dlm_generator::diffusion::{Sampler, SamplerKind, ScheduleKind};
use dlm_generator::eval::report::FluencyJudge;
use dlm_generator::model::{LoadedModel, ModelConfig};
use dlm_generator::train::{data, TrainConfig, Trainer};

#[derive(Parser)]
#[command(
    name = "dlm-generator",
    version,
    about = "Diffusion-LM: train, sample, evaluate"
)]
struct Cli {
    /// Worker threads (default: all cores); batches are split over them.
    #[arg(long, env = "DLM_THREADS", global = true)]
    threads: Option<usize>,
    /// Log format on stderr.
    #[arg(long, env = "DLM_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    /// Where the model runs: auto (GPU 0 if this binary has CUDA and a GPU answers, else the CPU),
    /// cpu, or cuda:N.
    #[arg(long, env = "DLM_DEVICE", default_value = "auto", global = true)]
    device: DeviceChoice,
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
    /// Train a model on the E2E references (checkpoints and `--resume` in --out).
    Train(TrainArgs),
    /// Train the teacher LM (a causal word-level transformer on the E2E train references) that
    /// `eval-fluency` and `eval-control` score texts with.
    TrainTeacher(TrainTeacherArgs),
    /// Sample sentences from a model: one per line on stdout.
    Sample(SampleArgs),
    /// Perplexity of sentences (one per line) under a 4-gram Kneser-Ney model of the E2E train
    /// references, against the E2E test references.
    EvalFluency(EvalArgs),
    /// The model's own score of texts (one per line): log p of each text's words given noised
    /// copies of it (what best-of-k ranks by); one number per line on stdout.
    Score(ScoreArgs),
    /// Median train-step and sampling-step times (table on stdout).
    /// The cost of guidance: denoiser vs guide time per step and whole requests, guided and not, at
    /// each batch size, with a guide over OIP (a table).
    BenchGuided(BenchGuidedArgs),
    Bench(BenchArgs),
    /// Serve the Generator gRPC API (guided sampling with continuous batching).
    Serve(ServeArgs),
    /// Call a running generator: one text per line on stdout.
    Generate(GenerateArgs),
    /// Measure control through a running generator: (field, value) targets from E2E test MRs,
    /// guided and unguided on the same seeds; success per field and fluency (table on stdout).
    EvalControl(EvalControlArgs),
    /// Measure the syntax controls through a running generator: tag sequences and constituents of
    /// E2E test references, guided and unguided at the same lengths and seeds; success read by the
    /// guides' labeller (guide/train/syntax_labels.py) and fluency (table on stdout).
    EvalSyntax(EvalSyntaxArgs),
    /// Compare this device's denoiser outputs and samples with a CPU reference (`--write` makes
    /// one); exits non-zero past the tolerance. The GPU check (deploy/gpu/check.sh) runs it.
    DeviceParity(DeviceParityArgs),
}

#[derive(Args)]
struct DeviceParityArgs {
    #[arg(long, env = "DLM_MODEL", default_value = "models/e2e-deep")]
    model: PathBuf,
    /// The reference file (JSON).
    #[arg(long, env = "DLM_REFERENCE")]
    reference: PathBuf,
    /// Write the reference from this device instead of comparing against it.
    #[arg(long, env = "DLM_WRITE")]
    write: bool,
    /// Sentences sampled for the text comparison (with --write; a comparison uses the reference's).
    #[arg(long, env = "DLM_N", default_value_t = 16)]
    n: usize,
    /// Sampling steps of those sentences (with --write, likewise).
    #[arg(long, env = "DLM_SAMPLE_STEPS", default_value_t = 200)]
    steps: usize,
}

/// Guidance settings of a request; unset ones take the server's defaults (the paper's).
#[derive(Args, Clone)]
struct GuidanceArgs {
    /// Gradient steps on the latents per diffusion step (default 3).
    #[arg(long, env = "DLM_GUIDANCE_STEPS")]
    guidance_steps: Option<u32>,
    /// Step size of each gradient step (default 0.2).
    #[arg(long, env = "DLM_STEP_SIZE")]
    step_size: Option<f32>,
    /// The update rule: adagrad (the paper's, per coordinate), normalized (one accumulator per
    /// text), proximal (normalized steps capped at the linearised optimum σ/(2λ)·RMS(g)) or sign;
    /// default: the server's.
    #[arg(long, env = "DLM_GUIDANCE_UPDATE", value_parser = ["adagrad", "normalized", "proximal", "sign"])]
    guidance_update: Option<String>,
    /// What the gradient steps edit: latent (the proposal for x_{t−1}, read at its noise level;
    /// the paper's) or estimate (the denoiser's x0 estimate, read at t = 0: more control, less
    /// fluency); default: the server's (latent).
    #[arg(long, env = "DLM_GUIDANCE_SPACE", value_parser = ["latent", "estimate"])]
    guidance_space: Option<String>,
    /// Fluency weight λ: the pull back towards the sampler's proposal (default 0.01).
    #[arg(long, env = "DLM_FLUENCY_WEIGHT")]
    fluency_weight: Option<f32>,
    /// Guide from this sampling step down (counting down; default: from the first).
    #[arg(long, env = "DLM_GUIDE_FROM")]
    guide_from: Option<u32>,
    /// Guide down to this sampling step (default: none in the last 10).
    #[arg(long, env = "DLM_GUIDE_UNTIL")]
    guide_until: Option<u32>,
    /// With --guidance-space estimate: edit the estimate above this sampling step and the latents
    /// from it down (default 0: the estimate throughout; 150 of 200 measured best, README).
    #[arg(long, env = "DLM_ESTIMATE_UNTIL")]
    estimate_until: Option<u32>,
    /// A guide stops pulling a text while it reads its targets in the current x0 estimate with
    /// p(c | x0) at least this (default 1 = always pull).
    #[arg(long, env = "DLM_SATISFIED_PROB")]
    satisfied_prob: Option<f32>,
}

impl GuidanceArgs {
    /// These settings over the defaults, as the engine takes them (for in-process use): the
    /// server's own conversion and checks.
    fn to_config(&self) -> anyhow::Result<dlm_generator::guidance::GuidanceConfig> {
        Ok(dlm_generator::server::guidance_config(
            &self.to_proto().unwrap_or_default(),
        )?)
    }

    fn to_proto(&self) -> Option<dlm_proto::dlm::v1::Guidance> {
        use dlm_proto::dlm::v1::{Guidance, GuidanceSpace, GuidanceUpdate};
        let update = match self.guidance_update.as_deref() {
            Some("sign") => GuidanceUpdate::Sign,
            Some("normalized") => GuidanceUpdate::Normalized,
            Some("proximal") => GuidanceUpdate::Proximal,
            Some(_) => GuidanceUpdate::Adagrad,
            None => GuidanceUpdate::Unspecified,
        };
        let space = match self.guidance_space.as_deref() {
            Some("estimate") => GuidanceSpace::Estimate,
            Some(_) => GuidanceSpace::Latent,
            None => GuidanceSpace::Unspecified,
        };
        let g = Guidance {
            steps_per_diffusion_step: self.guidance_steps,
            step_size: self.step_size,
            update: update as i32,
            fluency_weight: self.fluency_weight,
            start_step: self.guide_from,
            stop_step: self.guide_until,
            estimate_until: self.estimate_until,
            satisfied_prob: self.satisfied_prob,
            space: space as i32,
        };
        (g != Guidance::default()).then_some(g)
    }
}

/// What `eval-control` and `eval-syntax` share: where the generator is, the data, how the texts
/// are sampled and guided, and the fluency judge.
#[derive(Args)]
struct EvalRunArgs {
    #[command(flatten)]
    endpoint: GeneratorEndpoint,
    #[arg(long, env = "DLM_DATA_DIR", default_value = "../shared/data/e2e")]
    data_dir: PathBuf,
    #[arg(long, env = "DLM_SAMPLE_STEPS", default_value_t = 200)]
    steps: u32,
    /// Requests in flight at once (the engine batches them).
    #[arg(long, env = "DLM_CONCURRENCY", default_value_t = 32)]
    concurrency: usize,
    #[arg(long, env = "DLM_SEED", default_value_t = 0)]
    seed: u64,
    /// Candidates per text, ranked by the model's own log p plus the guides' (guided texts only).
    #[arg(long, env = "DLM_BEST_OF")]
    best_of: Option<u32>,
    /// The joint clamp: a position takes its next-nearest word rather than its neighbour's when that
    /// is at most this much farther (squared L2; words lie ~12 apart); 0 = each position on its own.
    /// Unset: the server's default (1000: never two neighbours on one word before the last step).
    #[arg(long, env = "DLM_CLAMP_REPEAT_PENALTY")]
    clamp_repeat_penalty: Option<f32>,
    #[command(flatten)]
    guidance: GuidanceArgs,
    /// The teacher LM directory (made by `train-teacher`).
    #[arg(long, env = "DLM_TEACHER", default_value = "models/teacher-lm")]
    teacher: PathBuf,
}

#[derive(Args)]
struct EvalControlArgs {
    #[command(flatten)]
    run: EvalRunArgs,
    /// The guide that steers every target (default: each target's field decides, as in `generate`).
    #[arg(long, env = "DLM_GUIDE", default_value = "")]
    guide: String,
    /// Number of targets.
    #[arg(long, env = "DLM_TARGETS", default_value_t = 200)]
    targets: usize,
    /// Fields per target, drawn from one E2E test MR: K (1–8; 1 never draws `name`), or `all`
    /// (the whole MR). Success per text: every field of its target realised.
    #[arg(long, env = "DLM_FIELDS", default_value = "1")]
    fields: dlm_generator::eval::control::FieldCount,
    /// Texts per target.
    #[arg(long, env = "DLM_N", default_value_t = 1)]
    n: u32,
    #[arg(long, env = "DLM_WEIGHT")]
    weight: Option<f32>,
    /// A field's own weight, FIELD=W (repeatable, or comma-separated): its target goes in a
    /// control of its own with that weight; the other fields keep `--weight`.
    #[arg(long, env = "DLM_FIELD_WEIGHT", value_delimiter = ',', value_parser = parse_field_weight)]
    field_weight: Vec<(String, f32)>,
    /// Also write every text, as JSON lines {field, value, guided, text, realised}, to this file.
    #[arg(long, env = "DLM_TEXTS")]
    texts: Option<PathBuf>,
    /// Each text's length, guided and unguided alike: free (the model decides), a number of
    /// words, or auto (the median length of the train references with as many fields as the
    /// target, at most what the generator's canvas holds).
    #[arg(long, env = "DLM_LENGTH", default_value = "free")]
    length: dlm_generator::eval::control::TextLength,
    /// Fix the target's name as the text's first words (infilling; guided and unguided alike), as
    /// 60% of E2E's references begin; the guides steer the rest.
    #[arg(long, env = "DLM_NAME_FIRST")]
    name_first: bool,
}

#[derive(Args)]
struct EvalSyntaxArgs {
    #[command(flatten)]
    run: EvalRunArgs,
    /// Number of targets (test references; each gives a tag sequence and one constituent).
    #[arg(long, env = "DLM_TARGETS", default_value_t = 200)]
    targets: usize,
    /// The controls to measure (pos+field: the tags and one semantic field the reference says, in
    /// one request; span@length: the span at its reference's length, as tags have it); unguided
    /// texts of the same lengths always.
    #[arg(long, env = "DLM_SYNTAX_CONTROLS", value_delimiter = ',', default_value = "pos,span,span@length,pos+field",
          value_parser = ["pos", "span", "span@length", "pos+field"])]
    controls: Vec<String>,
    /// Weight of the syntax guides' gradients.
    #[arg(long, env = "DLM_WEIGHT")]
    weight: Option<f32>,
    /// The labeller (needs Debian's python3-link-grammar and liblingua-en-tagger-perl).
    #[arg(
        long,
        env = "DLM_LABELLER",
        default_value = "guide/train/syntax_labels.py"
    )]
    labeller: PathBuf,
    /// The Python that runs it (the system one: it has the link grammar bindings).
    #[arg(long, env = "DLM_LABELLER_PYTHON", default_value = "/usr/bin/python3")]
    labeller_python: PathBuf,
    /// Also write every text with its target and labels, as JSON lines, to this file.
    #[arg(long, env = "DLM_TEXTS")]
    texts: Option<PathBuf>,
}

#[derive(Args)]
struct ServeArgs {
    /// Model directory.
    #[arg(long, env = "DLM_MODEL", default_value = "models/e2e-deep")]
    model: PathBuf,
    /// A guide as NAME=URL (http://host:port[/model]), NAME=URL#CARD.json for a model on another
    /// OIP server, or NAME=onnx:PATH/model.onnx to run it in this process; repeat for more.
    #[arg(long = "guide", env = "DLM_GUIDES", value_delimiter = ',')]
    guides: Vec<String>,
    #[arg(long, env = "DLM_HOST", default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    #[arg(long, env = "DLM_PORT", default_value_t = 8000)]
    port: u16,
    /// HTTP/JSON API and playground port, on --host (0 = off): POST /v1/generate, GET /v1/describe,
    /// /healthz, /readyz, /openapi.json, the playground at /.
    #[arg(long, env = "DLM_HTTP_PORT", default_value_t = 8080)]
    http_port: u16,
    /// Prometheus metrics listen address (its own flag: metrics need not face the gRPC network).
    #[arg(long, env = "DLM_METRICS_HOST", default_value = "127.0.0.1")]
    metrics_host: std::net::IpAddr,
    /// Prometheus metrics port (0 = off).
    #[arg(long, env = "DLM_METRICS_PORT", default_value_t = 9090)]
    metrics_port: u16,
    /// Hosts SetGuide may register guides on, as HOST or HOST:PORT (repeat, or comma-separate);
    /// anything else is PERMISSION_DENIED before any connection. Default: the hosts of the
    /// --guide flags, and loopback.
    #[arg(long = "guide-allow", env = "DLM_GUIDE_ALLOW", value_delimiter = ',')]
    guide_allow: Vec<String>,
    /// CA certificate (PEM) that https:// guides' certificates must chain to.
    #[arg(long, env = "DLM_GUIDE_TLS_CA")]
    guide_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) shown to guides that require one (mutual TLS); needs --guide-tls-key.
    #[arg(long, env = "DLM_GUIDE_TLS_CERT", requires = "guide_tls_key")]
    guide_tls_cert: Option<PathBuf>,
    /// The private key of --guide-tls-cert (PEM).
    #[arg(long, env = "DLM_GUIDE_TLS_KEY", requires = "guide_tls_cert")]
    guide_tls_key: Option<PathBuf>,
    #[command(flatten)]
    security: dlm_proto::security::ServerSecurity,
    /// Sequences in one denoiser batch.
    #[arg(long, env = "DLM_MAX_BATCH", default_value_t = 64)]
    max_batch: usize,
    /// Requests the generator holds at once, waiting or running (each holds a permit until it is
    /// answered); past that, RESOURCE_EXHAUSTED.
    #[arg(long, env = "DLM_MAX_QUEUE", default_value_t = 256)]
    max_queue: usize,
    /// Controls in one request (after routing targets to guides).
    #[arg(long, env = "DLM_MAX_CONTROLS", default_value_t = 8)]
    max_controls: usize,
    /// Targets in one control.
    #[arg(long, env = "DLM_MAX_TARGETS", default_value_t = 16)]
    max_targets: usize,
    /// Rows (latent sequences) in one guide call; guidance work beyond it is split into calls of
    /// this size (dlm-guide's own --max-rows defaults to the same 64).
    #[arg(long, env = "DLM_GUIDE_MAX_ROWS", default_value_t = 64)]
    guide_max_rows: usize,
    /// How often each registered guide is probed (OIP ModelReady) for Describe and health, in ms.
    #[arg(long, env = "DLM_GUIDE_PROBE_MS", default_value_t = 2000)]
    guide_probe_ms: u64,
    /// Largest `n` of one request.
    #[arg(long, env = "DLM_MAX_N", default_value_t = 64)]
    max_n: usize,
    /// Sampling steps when a request does not say.
    #[arg(long, env = "DLM_DEFAULT_STEPS", default_value_t = 200)]
    default_steps: usize,
    /// Deadline of one guide call, in ms.
    #[arg(long, env = "DLM_GUIDE_TIMEOUT_MS", default_value_t = 5000)]
    guide_timeout_ms: u64,
    /// At start-up, how long to keep trying a guide that cannot be reached yet, in s (the port is
    /// open meanwhile, health NOT_SERVING; the server exits with an error if a guide never comes).
    #[arg(long, env = "DLM_GUIDE_WAIT_S", default_value_t = 60)]
    guide_wait_s: u64,
}

/// Where a client command finds the generator, and how it talks TLS to it.
#[derive(Args)]
struct GeneratorEndpoint {
    /// The generator's gRPC endpoint (https:// for a generator serving TLS).
    #[arg(
        long = "endpoint",
        env = "DLM_ENDPOINT",
        default_value = "http://127.0.0.1:8000"
    )]
    url: String,
    /// CA certificate (PEM) the generator's certificate must chain to (https:// endpoints).
    #[arg(long, env = "DLM_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for a generator that requires one; needs --tls-client-key.
    #[arg(long, env = "DLM_TLS_CLIENT_CERT", requires = "tls_client_key")]
    tls_client_cert: Option<PathBuf>,
    /// The private key of --tls-client-cert (PEM).
    #[arg(long, env = "DLM_TLS_CLIENT_KEY", requires = "tls_client_cert")]
    tls_client_key: Option<PathBuf>,
}

impl GeneratorEndpoint {
    fn endpoint(&self) -> anyhow::Result<tonic::transport::Endpoint> {
        let e = tonic::transport::Endpoint::from_shared(self.url.clone())
            .with_context(|| format!("invalid argument `endpoint`: {}", self.url))?;
        Ok(match &self.tls_ca {
            Some(ca) => e.tls_config(
                dlm_proto::security::client_tls(
                    ca,
                    self.tls_client_cert
                        .as_deref()
                        .zip(self.tls_client_key.as_deref()),
                )
                .map_err(anyhow::Error::msg)?,
            )?,
            None => e,
        })
    }

    async fn client(
        &self,
    ) -> anyhow::Result<
        dlm_proto::dlm::v1::generator_client::GeneratorClient<tonic::transport::Channel>,
    > {
        let channel = self
            .endpoint()?
            .connect()
            .await
            .with_context(|| format!("connecting to {}", self.url))?;
        Ok(dlm_proto::dlm::v1::generator_client::GeneratorClient::new(
            channel,
        ))
    }

    /// The most words a text can have on this generator's canvas (Describe's seq_len less START
    /// and END).
    async fn max_words(&self) -> anyhow::Result<usize> {
        let d = self
            .client()
            .await?
            .describe(dlm_proto::dlm::v1::DescribeRequest {})
            .await?
            .into_inner();
        Ok(d.model.map(|m| m.seq_len as usize).unwrap_or(40) - 2)
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    endpoint: GeneratorEndpoint,
    /// Wanted attribute value, field=value (repeat for more).
    #[arg(long = "control", env = "DLM_CONTROLS", value_delimiter = ',')]
    controls: Vec<String>,
    /// The guide that steers the controls (default: for each control, the registered guide that
    /// reads its field, the one reading the fewest fields where several do).
    #[arg(long, env = "DLM_GUIDE", default_value = "")]
    guide: String,
    /// Weight of the guide's gradient.
    #[arg(long, env = "DLM_WEIGHT")]
    weight: Option<f32>,
    /// Parts of speech: a Penn Treebank tag per word, space-separated ("DT NN VBZ …"; `_` = any);
    /// sets the length. Needs a guide reading `pos.K` fields (e2e-pos).
    #[arg(long, env = "DLM_POS")]
    pos: Option<String>,
    /// A constituent: START,END,LABEL over word indices from 0, END inclusive (e.g. 3,5,NP; repeat for
    /// more). Needs a guide reading `span.*` fields (e2e-spans).
    #[arg(long = "span", env = "DLM_SPANS", value_delimiter = ';', value_parser = parse_span)]
    spans: Vec<dlm_proto::dlm::v1::Span>,
    #[command(flatten)]
    guidance: GuidanceArgs,
    #[arg(long, env = "DLM_N", default_value_t = 3)]
    n: u32,
    #[arg(long, env = "DLM_SEED")]
    seed: Option<u64>,
    /// Exact number of words.
    #[arg(long, env = "DLM_LENGTH")]
    length: Option<u32>,
    /// Fixed words at fixed positions, space-separated, `_` for a word to generate ("the eagle _ _
    /// _"); positions past the template are generated too, unless --length ends the text there.
    #[arg(long, env = "DLM_INFILL")]
    infill: Option<String>,
    /// Candidates sampled per text; the best by the model's own log p plus the guides' is returned.
    #[arg(long, env = "DLM_BEST_OF")]
    best_of: Option<u32>,
    /// The joint clamp: a position takes its next-nearest word rather than its neighbour's when that
    /// is at most this much farther (squared L2; words lie ~12 apart); 0 = each position on its own.
    /// Unset: the server's default (1000: never two neighbours on one word before the last step).
    #[arg(long, env = "DLM_CLAMP_REPEAT_PENALTY")]
    clamp_repeat_penalty: Option<f32>,
    #[arg(long, env = "DLM_SAMPLE_STEPS")]
    steps: Option<u32>,
    /// Print the whole response as JSON.
    #[arg(long, env = "DLM_JSON")]
    json: bool,
    /// First wait up to this many seconds for the generator to report SERVING (it is NOT_SERVING
    /// while its start-up guides register); 0 sends at once.
    #[arg(long, env = "DLM_WAIT_S", default_value_t = 0)]
    wait_s: u64,
}

#[derive(Args)]
struct BenchGuidedArgs {
    #[arg(long, env = "DLM_MODEL", default_value = "models/e2e-deep")]
    model: PathBuf,
    /// The guide, NAME=URL as for `serve --guide` (e.g. a dlm-guide on loopback).
    #[arg(
        long,
        env = "DLM_GUIDE",
        default_value = "e2e-semantic=http://127.0.0.1:8001"
    )]
    guide: String,
    /// The one control every guided text gets.
    #[arg(long, env = "DLM_TARGET", default_value = "food=Italian")]
    target: String,
    #[arg(
        long,
        env = "DLM_BENCH_BATCHES",
        value_delimiter = ',',
        default_value = "1,16,64"
    )]
    batches: Vec<usize>,
    #[arg(long, env = "DLM_SAMPLE_STEPS", default_value_t = 200)]
    steps: usize,
    /// Timed repeats per step measurement (requests: half as many; medians are reported).
    #[arg(long, env = "DLM_BENCH_REPS", default_value_t = 5)]
    reps: usize,
    #[command(flatten)]
    guidance: GuidanceArgs,
}

#[derive(Args)]
struct BenchArgs {
    /// The shipped model whose configuration is measured (besides H = 128 / 4 layers).
    #[arg(long, env = "DLM_MODEL", default_value = "models/e2e-deep")]
    model: PathBuf,
    /// Batch sizes.
    #[arg(
        long,
        env = "DLM_BENCH_BATCHES",
        value_delimiter = ',',
        default_value = "1,16,64"
    )]
    batches: Vec<usize>,
    /// Thread counts; each runs in its own child process.
    #[arg(
        long,
        env = "DLM_BENCH_THREADS",
        value_delimiter = ',',
        default_value = "1,2"
    )]
    thread_counts: Vec<usize>,
    /// Timed repeats per measurement (the median is reported).
    #[arg(long, env = "DLM_BENCH_REPS", default_value_t = 5)]
    reps: usize,
    /// Internal: measure in this process and print JSON rows.
    #[arg(long, hide = true)]
    child: bool,
}

#[derive(Args)]
struct TrainArgs {
    /// Directory with the E2E CSV files.
    #[arg(long, env = "DLM_DATA_DIR", default_value = "../shared/data/e2e")]
    data_dir: PathBuf,
    /// Output model directory (checkpoints are written here).
    #[arg(long, env = "DLM_OUT")]
    out: PathBuf,
    /// Continue from the checkpoint in --out (it must have been made with the same settings).
    #[arg(long, env = "DLM_RESUME")]
    resume: bool,
    #[arg(long, env = "DLM_STEPS", default_value_t = 10_000)]
    steps: usize,
    #[arg(long, env = "DLM_BATCH_SIZE", default_value_t = 64)]
    batch_size: usize,
    /// Peak learning rate (the paper's 1e-4 is for 200k steps; short CPU runs learn faster at 1e-3).
    #[arg(long, env = "DLM_LR", default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, env = "DLM_WARMUP", default_value_t = 500)]
    warmup: usize,
    #[arg(long, env = "DLM_WEIGHT_DECAY", default_value_t = 0.0)]
    weight_decay: f64,
    /// EMA decay (warmed up as min(decay, (1+n)/(10+n))).
    #[arg(long, env = "DLM_EMA_DECAY", default_value_t = 0.9999)]
    ema_decay: f64,
    /// Clip the global gradient norm (0 = off).
    #[arg(long, env = "DLM_GRAD_CLIP", default_value_t = 1.0)]
    grad_clip: f64,
    #[arg(long, env = "DLM_SEED", default_value_t = 0)]
    seed: u64,
    /// Draw training timesteps as ⌊T·u^p⌋ (u uniform): 1 = uniform over t (the paper); p > 1 puts
    /// more of the batch at low noise.
    #[arg(long, env = "DLM_T_POWER", default_value_t = 1.0)]
    t_power: f64,
    /// Minimum count of a word in the train references to enter the vocabulary (the paper's 10).
    #[arg(long, env = "DLM_MIN_COUNT", default_value_t = 10)]
    min_count: u64,
    /// Also train on references that contain out-of-vocabulary words (as UNK).
    #[arg(long, env = "DLM_KEEP_UNK")]
    keep_unk: bool,
    /// Train on references longer than the canvas too, cut to fit (by default they are left out,
    /// so that END always follows a complete text).
    #[arg(long, env = "DLM_KEEP_LONG")]
    keep_long: bool,
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, env = "DLM_LOG_EVERY", default_value_t = 50)]
    log_every: usize,
    #[arg(long, env = "DLM_CHECKPOINT_EVERY", default_value_t = 500)]
    checkpoint_every: usize,
    /// Stop at this step (with a checkpoint) without changing the schedule; `--resume` continues.
    #[arg(long, env = "DLM_STOP_AT")]
    stop_at: Option<usize>,
    /// Hide the progress bar.
    #[arg(long, env = "DLM_NO_PROGRESS")]
    no_progress: bool,
}

#[derive(Args)]
struct TrainTeacherArgs {
    /// Directory with the E2E CSV files.
    #[arg(long, env = "DLM_DATA_DIR", default_value = "../shared/data/e2e")]
    data_dir: PathBuf,
    /// Output directory (teacher.json, model.safetensors, tokenizer.json, train_log.jsonl).
    #[arg(long, env = "DLM_OUT", default_value = "models/teacher-lm")]
    out: PathBuf,
    #[arg(long, env = "DLM_STEPS", default_value_t = 4000)]
    steps: usize,
    #[arg(long, env = "DLM_BATCH_SIZE", default_value_t = 64)]
    batch_size: usize,
    #[arg(long, env = "DLM_LR", default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, env = "DLM_WARMUP", default_value_t = 300)]
    warmup: usize,
    #[arg(long, env = "DLM_WEIGHT_DECAY", default_value_t = 0.01)]
    weight_decay: f64,
    /// Clip the global gradient norm (0 = off).
    #[arg(long, env = "DLM_GRAD_CLIP", default_value_t = 1.0)]
    grad_clip: f64,
    #[arg(long, env = "DLM_SEED", default_value_t = 0)]
    seed: u64,
    /// Words seen fewer times in the train references become UNK.
    #[arg(long, env = "DLM_MIN_COUNT", default_value_t = 2)]
    min_count: u64,
    /// Transformer width H.
    #[arg(long, env = "DLM_HIDDEN", default_value_t = 128)]
    hidden: usize,
    #[arg(long, env = "DLM_LAYERS", default_value_t = 3)]
    layers: usize,
    #[arg(long, env = "DLM_HEADS", default_value_t = 4)]
    heads: usize,
    /// Longest sequence (START, words, END); longer texts are cut.
    #[arg(long, env = "DLM_SEQ_LEN", default_value_t = 64)]
    seq_len: usize,
    #[arg(long, env = "DLM_LOG_EVERY", default_value_t = 50)]
    log_every: usize,
    /// Save and measure dev perplexity every this many steps.
    #[arg(long, env = "DLM_CHECKPOINT_EVERY", default_value_t = 1000)]
    checkpoint_every: usize,
    /// Hide the progress bar.
    #[arg(long, env = "DLM_NO_PROGRESS")]
    no_progress: bool,
}

#[derive(Args)]
struct ModelArgs {
    /// Embedding width D.
    #[arg(long, env = "DLM_EMBED_DIM", default_value_t = 16)]
    embed_dim: usize,
    /// Transformer width H.
    #[arg(long, env = "DLM_HIDDEN", default_value_t = 128)]
    hidden: usize,
    #[arg(long, env = "DLM_LAYERS", default_value_t = 4)]
    layers: usize,
    #[arg(long, env = "DLM_HEADS", default_value_t = 4)]
    heads: usize,
    /// Sequence length L (START, words, END, PAD).
    #[arg(long, env = "DLM_SEQ_LEN", default_value_t = 64)]
    seq_len: usize,
    /// Diffusion steps T.
    #[arg(long, env = "DLM_DIFFUSION_STEPS", default_value_t = 2000)]
    diffusion_steps: usize,
    #[arg(long, env = "DLM_SCHEDULE", value_enum, default_value_t = ScheduleKind::Sqrt)]
    schedule: ScheduleKind,
    /// Self-conditioning: the denoiser also sees its previous x0 estimate.
    #[arg(long, env = "DLM_SELF_CONDITION")]
    self_condition: bool,
}

#[derive(Args)]
struct SampleArgs {
    /// Model directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long, env = "DLM_MODEL", default_value = "models/e2e-deep")]
    model: PathBuf,
    /// Number of sentences.
    #[arg(long, env = "DLM_N", default_value_t = 16)]
    n: usize,
    /// Sampling steps (≤ T; the schedule is respaced).
    #[arg(long, env = "DLM_SAMPLE_STEPS", default_value_t = 200)]
    steps: usize,
    /// Random seed (default: a fresh one, reported on stderr).
    #[arg(long, env = "DLM_SEED")]
    seed: Option<u64>,
    #[arg(long, env = "DLM_SAMPLER", value_enum, default_value_t = SamplerKind::Ddpm)]
    sampler: SamplerKind,
    /// Snap each x0 prediction to the nearest word embedding (`--clamp=false` to turn off).
    #[arg(long, env = "DLM_CLAMP", default_value_t = true, action = ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true")]
    clamp: bool,
    /// The joint clamp: a position takes its next-nearest word rather than its neighbour's when that
    /// is at most this much farther (squared L2; words lie ~12 apart); 0 = each position on its own.
    #[arg(long, env = "DLM_CLAMP_REPEAT_PENALTY",
          default_value_t = dlm_generator::diffusion::clamp::DEFAULT_REPEAT_PENALTY)]
    clamp_repeat_penalty: f32,
    /// Sequences per denoiser call.
    #[arg(long, env = "DLM_BATCH_SIZE", default_value_t = 64)]
    batch_size: usize,
    /// JSON lines (text, tokens, seed, timings) instead of plain text.
    #[arg(long, env = "DLM_JSON")]
    json: bool,
}

#[derive(Args)]
struct ScoreArgs {
    /// Model directory.
    #[arg(long, env = "DLM_MODEL", default_value = "models/e2e-deep")]
    model: PathBuf,
    /// Texts, one per line (`-` = stdin).
    #[arg(long, env = "DLM_INPUT", default_value = "-")]
    input: PathBuf,
    #[arg(long, env = "DLM_SEED", default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct EvalArgs {
    /// Directory with the E2E CSV files.
    #[arg(long, env = "DLM_DATA_DIR", default_value = "../shared/data/e2e")]
    data_dir: PathBuf,
    /// Sentences to score, one per line (`-` = stdin).
    #[arg(long, env = "DLM_INPUT", default_value = "-")]
    input: PathBuf,
    /// n-gram order.
    #[arg(long, env = "DLM_ORDER", default_value_t = 4)]
    order: usize,
    /// The teacher LM directory (made by `train-teacher`).
    #[arg(long, env = "DLM_TEACHER", default_value = "models/teacher-lm")]
    teacher: PathBuf,
    /// Print the report as JSON.
    #[arg(long, env = "DLM_JSON")]
    json: bool,
}

fn main() {
    let cli = Cli::parse();
    dlm_generator::runtime::set_threads(cli.threads);
    dlm_generator::runtime::tune_allocator();
    init_logging(cli.log_format);
    if let Err(err) = run(cli.command, cli.device) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn run(command: Command, device: DeviceChoice) -> anyhow::Result<()> {
    let open = || -> anyhow::Result<Device> {
        let opened = device.open()?;
        tracing::info!(device = %dlm_generator::device::name(&opened), "model device");
        Ok(opened)
    };
    match command {
        Command::Train(args) => train(args, &open()?),
        Command::TrainTeacher(args) => train_teacher(args, &open()?),
        Command::Sample(args) => sample(args, &open()?),
        Command::EvalFluency(args) => eval_fluency(args),
        Command::Score(args) => score(args, &open()?),
        Command::Bench(args) => bench(args, device),
        Command::BenchGuided(args) => bench_guided(args, device),
        Command::Serve(args) => serve(args, &open()?),
        Command::Generate(args) => generate(args),
        Command::EvalControl(args) => eval_control(args),
        Command::EvalSyntax(args) => eval_syntax(args),
        Command::DeviceParity(args) => device_parity(args, &open()?),
    }
}

fn train(args: TrainArgs, device: &Device) -> anyhow::Result<()> {
    let m = args.model;
    let config = TrainConfig {
        model: ModelConfig {
            vocab_size: 0, // set from the tokenizer
            embed_dim: m.embed_dim,
            hidden: m.hidden,
            layers: m.layers,
            heads: m.heads,
            mlp_ratio: 4,
            seq_len: m.seq_len,
            diffusion_steps: m.diffusion_steps,
            schedule: m.schedule,
            self_condition: m.self_condition,
        },
        min_count: args.min_count,
        drop_unk: !args.keep_unk,
        drop_long: !args.keep_long,
        steps: args.steps,
        batch_size: args.batch_size,
        lr: args.lr,
        warmup: args.warmup,
        weight_decay: args.weight_decay,
        ema_decay: args.ema_decay,
        grad_clip: args.grad_clip,
        seed: args.seed,
        t_power: args.t_power,
    };
    let texts = data::references(&args.data_dir, data::TRAIN_FILE)?;
    let trainer = Trainer {
        config,
        out: args.out.clone(),
        log_every: args.log_every,
        checkpoint_every: args.checkpoint_every,
        show_progress: !args.no_progress,
        stop_at: args.stop_at,
        shards: dlm_generator::device::shards(device),
    };
    let summary = trainer.run(&texts, args.resume, device)?;
    tracing::info!(
        step = summary.step,
        first_loss = summary.first_loss,
        last_loss = summary.last_loss,
        sequences = summary.sequences,
        dropped_unk = summary.dropped_unk,
        out = %args.out.display(),
        "training finished"
    );
    Ok(())
}

fn train_teacher(args: TrainTeacherArgs, device: &Device) -> anyhow::Result<()> {
    use dlm_generator::model::teacher_lm::TeacherConfig;
    use dlm_generator::train::teacher::{TeacherTrainConfig, TeacherTrainer};
    let trainer = TeacherTrainer {
        config: TeacherTrainConfig {
            model: TeacherConfig {
                vocab_size: 0, // set from the tokenizer
                hidden: args.hidden,
                layers: args.layers,
                heads: args.heads,
                mlp_ratio: 4,
                seq_len: args.seq_len,
            },
            min_count: args.min_count,
            steps: args.steps,
            batch_size: args.batch_size,
            lr: args.lr,
            warmup: args.warmup,
            weight_decay: args.weight_decay,
            grad_clip: args.grad_clip,
            seed: args.seed,
        },
        out: args.out.clone(),
        log_every: args.log_every,
        checkpoint_every: args.checkpoint_every,
        show_progress: !args.no_progress,
        shards: dlm_generator::device::shards(device),
    };
    let train = data::references(&args.data_dir, data::TRAIN_FILE)?;
    let dev = data::references(&args.data_dir, data::DEV_FILE)?;
    let dev_perplexity = trainer.run(&train, &dev, device)?;
    tracing::info!(dev_perplexity, out = %args.out.display(), "teacher training finished");
    Ok(())
}

fn sample(args: SampleArgs, device: &Device) -> anyhow::Result<()> {
    let loaded = LoadedModel::load(&args.model, device)
        .with_context(|| format!("loading model from {}", args.model.display()))?;
    let seed = args.seed.unwrap_or_else(rand::random);
    tracing::info!(seed, n = args.n, steps = args.steps, "sampling");
    let repeat_penalty = dlm_generator::diffusion::clamp::repeat_penalty(
        "--clamp-repeat-penalty",
        Some(args.clamp_repeat_penalty),
    )?;
    let sampler = Sampler::new(&loaded.model, args.steps, args.sampler, args.clamp)?
        .with_repeat_penalty(repeat_penalty);
    let samples = sampler.sample(args.n, seed, args.batch_size)?;
    let mut out = std::io::stdout().lock();
    for (index, ids) in samples.ids.iter().enumerate() {
        let text = loaded.tokenizer.decode(ids);
        if args.json {
            let tokens: Vec<String> = loaded
                .tokenizer
                .visible(ids)
                .map(|id| loaded.tokenizer.id_to_token(id).unwrap_or_default())
                .collect();
            let line = serde_json::json!({
                "index": index,
                "text": text,
                "tokens": tokens,
                "seed": seed,
                "steps": args.steps,
                "sampler": args.sampler,
                "clamp": args.clamp,
                "clamp_repeat_penalty": args.clamp_repeat_penalty,
                "total_ms": samples.total_ms,
                "median_step_ms": dlm_generator::bench::median(&samples.step_ms),
            });
            writeln!(out, "{line}")?;
        } else {
            writeln!(out, "{text}")?;
        }
    }
    Ok(())
}

fn bench_guided(args: BenchGuidedArgs, device: DeviceChoice) -> anyhow::Result<()> {
    use dlm_generator::guidance::{GuideRegistry, GuideSpec, ModelSignature};
    use std::sync::Arc;
    let device = device.open()?;
    let loaded = Arc::new(LoadedModel::load(&args.model, &device)?);
    let cfg = loaded.model.config.clone();
    let signature = ModelSignature {
        embedding_sha256: loaded.model.embedding_sha256()?,
        diffusion_steps: cfg.diffusion_steps,
        schedule: format!("{:?}", cfg.schedule).to_lowercase(),
        seq_len: cfg.seq_len,
        embed_dim: cfg.embed_dim,
    };
    let (name, value) = args
        .guide
        .split_once('=')
        .ok_or_else(|| anyhow::anyhow!("invalid argument `guide`: not NAME=URL"))?;
    let spec = GuideSpec::parse_flag(value)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let registry = GuideRegistry::new(signature, std::time::Duration::from_secs(30));
        let guide = registry.register(name, registry.connect(name, &spec).await?).await?;
        let rows = dlm_generator::bench::guided(
            loaded,
            guide,
            &args.target,
            &args.batches,
            args.steps,
            args.reps,
            args.guidance.to_config()?,
        )
        .await?;
        print!("{}", dlm_generator::bench::guided_table(&rows));
        println!(
            "\n{} threads, {} sampling steps, one control ({}), guidance {:?}; guidance per step = its gradient calls at one step.",
            dlm_generator::runtime::threads(),
            args.steps,
            args.target,
            args.guidance.to_config()?
        );
        anyhow::Ok(())
    })
}

fn bench(args: BenchArgs, device: DeviceChoice) -> anyhow::Result<()> {
    use dlm_generator::bench::{bench, table, BenchRow};
    let shipped = ModelConfig::load(&args.model.join("config.json"))?;
    // The model FINDINGS times PyTorch on: H = 128, 4 layers, no self-conditioning.
    let reference = ModelConfig {
        hidden: 128,
        layers: 4,
        heads: 4,
        self_condition: false,
        ..shipped.clone()
    };
    let mut configs = vec![("shipped".to_string(), shipped.clone())];
    if reference != shipped {
        configs.push(("H128-L4".to_string(), reference));
    }
    if args.child {
        let device = device.open()?;
        for (name, cfg) in &configs {
            for &b in &args.batches {
                let row = bench(
                    name,
                    &ModelConfig {
                        seq_len: 64,
                        ..cfg.clone()
                    },
                    b,
                    &device,
                    args.reps,
                )?;
                println!("{}", serde_json::to_string(&row)?);
            }
        }
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    let mut rows: Vec<BenchRow> = Vec::new();
    let progress = indicatif::ProgressBar::new(args.thread_counts.len() as u64);
    for &threads in &args.thread_counts {
        progress.set_message(format!("{threads} thread(s)"));
        let batches = args
            .batches
            .iter()
            .map(|b| b.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let out = std::process::Command::new(&exe)
            .args([
                "--threads",
                &threads.to_string(),
                "--device",
                &device.to_string(),
                "bench",
                "--child",
                "--batches",
                &batches,
            ])
            .args(["--reps", &args.reps.to_string(), "--model"])
            .arg(&args.model)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "bench child failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            rows.push(serde_json::from_str(line)?);
        }
        progress.inc(1);
    }
    progress.finish_and_clear();
    print!("{}", table(&rows));
    Ok(())
}

fn device_parity(args: DeviceParityArgs, device: &Device) -> anyhow::Result<()> {
    use dlm_generator::eval::device_parity::Reference;
    let loaded = LoadedModel::load(&args.model, device)
        .with_context(|| format!("loading model from {}", args.model.display()))?;
    if args.write {
        let reference = Reference::compute(&loaded, args.n, args.steps)?;
        std::fs::write(&args.reference, serde_json::to_vec(&reference)?)
            .with_context(|| format!("writing {}", args.reference.display()))?;
        tracing::info!(path = %args.reference.display(), device = %reference.device, "reference written");
        return Ok(());
    }
    let reference: Reference = serde_json::from_slice(
        &std::fs::read(&args.reference)
            .with_context(|| format!("reading {}", args.reference.display()))?,
    )
    .with_context(|| format!("parsing {}", args.reference.display()))?;
    let here = Reference::compute(&loaded, reference.texts.len(), reference.sample_steps)?;
    let report = here.compare(&reference)?;
    print!("{}", report.table());
    anyhow::ensure!(
        report.passed(),
        "{} differs from the CPU reference: relative L2 {:.2e} > {:.0e}",
        report.device,
        report.rel_l2,
        dlm_generator::eval::device_parity::TOLERANCE
    );
    Ok(())
}

fn load_teacher(
    dir: &std::path::Path,
) -> anyhow::Result<dlm_generator::model::teacher_lm::LoadedTeacher> {
    dlm_generator::model::teacher_lm::LoadedTeacher::load(dir, &Device::Cpu).with_context(|| {
        format!(
            "loading the teacher LM from {} (`--teacher`)",
            dir.display()
        )
    })
}

/// The non-empty lines of a file (`-` = stdin).
fn read_lines(input: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let lines: Vec<String> = if input.as_os_str() == "-" {
        std::io::stdin().lock().lines().collect::<Result<_, _>>()?
    } else {
        std::fs::read_to_string(input)
            .with_context(|| format!("reading {}", input.display()))?
            .lines()
            .map(str::to_string)
            .collect()
    };
    let lines: Vec<String> = lines.into_iter().filter(|s| !s.trim().is_empty()).collect();
    if lines.is_empty() {
        anyhow::bail!("invalid argument `input`: no sentences to score");
    }
    Ok(lines)
}

fn score(args: ScoreArgs, device: &Device) -> anyhow::Result<()> {
    use dlm_generator::diffusion::likelihood::reconstruction_log_prob;
    use dlm_generator::diffusion::NoiseSchedule;
    let texts = read_lines(&args.input)?;
    let loaded = LoadedModel::load(&args.model, device)
        .with_context(|| format!("loading model from {}", args.model.display()))?;
    let cfg = &loaded.model.config;
    let schedule = NoiseSchedule::new(cfg.schedule, cfg.diffusion_steps)?;
    let mut out = std::io::stdout().lock();
    for (c, chunk) in texts.chunks(64).enumerate() {
        let mut rngs: Vec<_> = (0..chunk.len())
            .map(|i| dlm_generator::diffusion::sampler::sequence_rng(args.seed, c * 64 + i))
            .collect();
        let ids: Vec<u32> = chunk
            .iter()
            .map(|t| loaded.tokenizer.encode_padded(t, cfg.seq_len))
            .collect::<Result<Vec<_>, _>>()?
            .concat();
        let ids = candle_core::Tensor::from_vec(ids, (chunk.len(), cfg.seq_len), device)?;
        for s in reconstruction_log_prob(&loaded.model, &schedule, &ids, &mut rngs)? {
            writeln!(out, "{s:.3}")?;
        }
    }
    Ok(())
}

fn eval_fluency(args: EvalArgs) -> anyhow::Result<()> {
    let sentences = read_lines(&args.input)?;
    let teacher = load_teacher(&args.teacher)?;
    let report = FluencyJudge::new(&args.data_dir, args.order, &teacher)?.report(&sentences)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

fn serve(args: ServeArgs, device: &Device) -> anyhow::Result<()> {
    use dlm_generator::guidance::registry::AllowedTarget;
    use dlm_generator::guidance::{GuideRegistry, ModelSignature};
    use std::sync::Arc;
    let loaded = Arc::new(
        LoadedModel::load(&args.model, device)
            .with_context(|| format!("loading model from {}", args.model.display()))?,
    );
    let cfg = loaded.model.config.clone();
    let signature = ModelSignature {
        embedding_sha256: loaded.model.embedding_sha256()?,
        diffusion_steps: cfg.diffusion_steps,
        schedule: format!("{:?}", cfg.schedule).to_lowercase(),
        seq_len: cfg.seq_len,
        embed_dim: cfg.embed_dim,
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let guide_tls = match &args.guide_tls_ca {
            Some(ca) => Some(
                dlm_proto::security::client_tls(
                    ca,
                    args.guide_tls_cert
                        .as_deref()
                        .zip(args.guide_tls_key.as_deref()),
                )
                .map_err(anyhow::Error::msg)?,
            ),
            None => None,
        };
        let mut allowed = Vec::new();
        for spec in &args.guide_allow {
            allowed.push(AllowedTarget::parse(spec)?);
        }
        if args.guide_allow.is_empty() {
            allowed = dlm_generator::guidance::registry::loopback();
            for spec in &args.guides {
                let url = spec.split_once('=').map_or("", |(_, u)| u);
                if let Ok((host, _)) = dlm_generator::guidance::oip::host_port(url) {
                    allowed.push(AllowedTarget { host, port: None });
                }
            }
        }
        let registry = Arc::new(
            GuideRegistry::new(
                signature,
                std::time::Duration::from_millis(args.guide_timeout_ms),
            )
            .with_tls(guide_tls)
            .with_allowed(allowed),
        );
        let admin = args.security.admin_token().map_err(anyhow::Error::msg)?;
        let server_tls = args.security.server_tls().map_err(anyhow::Error::msg)?;
        // Guides are parsed now (a bad flag fails at once) and registered while the port is
        // already open but NOT_SERVING: in a cluster a guide may start after the generator.
        let mut specs = Vec::new();
        for spec in &args.guides {
            let (name, value) = spec.split_once('=').ok_or_else(|| {
                anyhow::anyhow!("invalid argument `guide`: `{spec}` is not NAME=URL")
            })?;
            let parsed = dlm_generator::guidance::GuideSpec::parse_flag(value)
                .with_context(|| format!("invalid argument `guide`: `{spec}`"))?;
            registry.expect(name);
            specs.push((name.to_string(), parsed));
        }
        registry.spawn_probes(std::time::Duration::from_millis(
            args.guide_probe_ms.max(100),
        ));
        let wait = std::time::Duration::from_secs(args.guide_wait_s);
        let startup = {
            let registry = Arc::clone(&registry);
            async move {
                let mut pending = tokio::task::JoinSet::new();
                for (name, spec) in specs {
                    let registry = Arc::clone(&registry);
                    pending
                        .spawn(async move { registry.register_waiting(&name, &spec, wait).await });
                }
                while let Some(done) = pending.join_next().await {
                    done??;
                }
                anyhow::Ok(())
            }
        };
        if args.metrics_port != 0 {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .with_http_listener(std::net::SocketAddr::new(
                    args.metrics_host,
                    args.metrics_port,
                ))
                .install()?;
        }
        let engine = dlm_generator::engine::start(
            Arc::clone(&loaded),
            tokio::runtime::Handle::current(),
            dlm_generator::engine::EngineOptions {
                max_batch: args.max_batch,
                max_queue: args.max_queue,
                guide_max_rows: args.guide_max_rows,
            },
        )?;
        let service = dlm_generator::server::GeneratorService::new(
            loaded,
            engine,
            registry,
            dlm_generator::server::Limits {
                max_n: args.max_n,
                default_steps: args.default_steps,
                max_controls: args.max_controls,
                max_targets: args.max_targets,
            },
        )
        .with_admin(admin);
        dlm_generator::server::serve(
            service,
            std::net::SocketAddr::new(args.host, args.port),
            (args.http_port != 0).then(|| std::net::SocketAddr::new(args.host, args.http_port)),
            server_tls,
            startup,
            shutdown_signal(),
        )
        .await
    })
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    tracing::info!("shutting down: finishing in-flight requests");
}

/// Polls the standard gRPC health check at `endpoint` until it reports SERVING.
async fn wait_serving(
    endpoint: &GeneratorEndpoint,
    wait: std::time::Duration,
) -> anyhow::Result<()> {
    use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient};
    let deadline = tokio::time::Instant::now() + wait;
    let mut last;
    loop {
        let channel = endpoint.endpoint()?.connect().await;
        match channel {
            Ok(channel) => {
                let check = HealthClient::new(channel)
                    .check(tonic_health::pb::HealthCheckRequest::default())
                    .await;
                match check {
                    Ok(r) if r.get_ref().status == ServingStatus::Serving as i32 => return Ok(()),
                    Ok(r) => last = format!("{:?}", r.get_ref().status()),
                    Err(s) => last = format!("{:?}: {}", s.code(), s.message()),
                }
            }
            Err(e) => last = e.to_string(),
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{} did not report SERVING within {} s (last: {last})",
            endpoint.url,
            wait.as_secs()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// `--span 3,5,NP` → a span (word indices from 0, end inclusive).
fn parse_span(s: &str) -> Result<dlm_proto::dlm::v1::Span, String> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    let [start, end, label] = parts[..] else {
        return Err(format!("`{s}`: expected START,END,LABEL (e.g. 3,5,NP)"));
    };
    let index = |v: &str| {
        v.parse::<u32>()
            .map_err(|_| format!("`{v}` in `{s}` is not a word index"))
    };
    Ok(dlm_proto::dlm::v1::Span {
        start: index(start)?,
        end: index(end)?,
        label: label.to_string(),
    })
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    use dlm_proto::dlm::v1 as pb;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        if args.wait_s > 0 {
            wait_serving(&args.endpoint, std::time::Duration::from_secs(args.wait_s)).await?;
        }
        let mut client = args.endpoint.client().await?;
        let controls = if args.controls.is_empty() {
            vec![]
        } else {
            vec![pb::Control { guide: args.guide.clone(), targets: args.controls.clone(), weight: args.weight }]
        };
        let syntax = (args.pos.is_some() || !args.spans.is_empty()).then(|| pb::Syntax {
            pos: args.pos.iter().flat_map(|p| p.split_whitespace().map(String::from)).collect(),
            spans: args.spans.clone(),
            weight: None,
        });
        let req = pb::GenerateRequest {
            n: args.n,
            steps: args.steps,
            seed: args.seed,
            controls,
            syntax,
            length: args.length,
            infill: args.infill.as_ref().map(|t| pb::Infill {
                template: t.split_whitespace().map(String::from).collect(),
            }),
            guidance: args.guidance.to_proto(),
            best_of: args.best_of,
            clamp_repeat_penalty: args.clamp_repeat_penalty,
            ..Default::default()
        };
        let resp = client.generate(req).await.map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?.into_inner();
        if args.json {
            let samples: Vec<serde_json::Value> = resp
                .samples
                .iter()
                .map(|s| serde_json::json!({"text": s.text, "tokens": s.tokens, "model_log_prob": s.model_log_prob,
                    "scores": s.scores.iter().map(|g| serde_json::json!({"guide": g.guide, "log_prob": g.log_prob})).collect::<Vec<_>>()}))
                .collect();
            let t = resp.timings.unwrap_or_default();
            println!("{}", serde_json::json!({"samples": samples, "seed": resp.seed,
                "timings": {"queue_ms": t.queue_ms, "sampling_ms": t.sampling_ms, "guidance_ms": t.guidance_ms, "total_ms": t.total_ms}}));
        } else {
            for s in &resp.samples {
                println!("{}", s.text);
            }
            tracing::info!(seed = resp.seed, "generated");
        }
        Ok(())
    })
}

fn eval_syntax(args: EvalSyntaxArgs) -> anyhow::Result<()> {
    use dlm_generator::eval::control::realises;
    use dlm_generator::eval::syntax::{draw_targets, pos_rates, span_rate, Labeller, SyntaxTarget};
    use dlm_generator::text::read_e2e;
    use dlm_proto::dlm::v1 as pb;
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.run.seed);
    let mut refs: Vec<(String, dlm_generator::text::MeaningRepresentation)> =
        read_e2e(&args.run.data_dir.join(data::TEST_FILE))?
            .into_iter()
            .filter_map(|r| {
                Some((
                    dlm_generator::text::tokenizer::words(&r.text?).join(" "),
                    r.mr,
                ))
            })
            .collect();
    refs.sort_by(|a, b| a.0.cmp(&b.0));
    refs.dedup_by(|a, b| a.0 == b.0);
    refs.shuffle(&mut rng);
    refs.truncate(4 * args.targets + 100); // enough to find `targets` parsed ones
    let texts: Vec<String> = refs.iter().map(|r| r.0.clone()).collect();
    let written_forms = args.run.data_dir.join(data::TRAIN_FILE);
    let labeller = Labeller {
        python: &args.labeller_python,
        script: &args.labeller,
        written_forms: &written_forms,
    };
    let labelled = labeller.label(&texts)?;
    let rt = tokio::runtime::Runtime::new()?;
    let max_words = rt.block_on(args.run.endpoint.max_words())?;
    let mrs: Vec<_> = refs.iter().map(|r| &r.1).collect();
    let targets = draw_targets(&labelled, &mrs, max_words, args.targets, &mut rng);
    // The arms, each a request per target at the reference's length and the same seed.
    // Tags fix the length; a span comes both ways (free: a text longer than the span's end is
    // the model's to write), and so do the unguided texts.
    const ARMS: [&str; 6] = [
        "pos",
        "span",
        "span@length",
        "pos+field",
        "unguided",
        "unguided@length",
    ];
    let wanted = |arm: &str| arm.starts_with("unguided") || args.controls.iter().any(|c| c == arm);
    let arms: Vec<&str> = ARMS.iter().copied().filter(|a| wanted(a)).collect();
    let request = |arm: &str, i: usize, t: &SyntaxTarget| -> Option<pb::GenerateRequest> {
        let mut r = pb::GenerateRequest {
            n: 1,
            steps: Some(args.run.steps),
            seed: Some(args.run.seed * 1_000_003 + i as u64),
            length: arm.ends_with("@length").then_some(t.length as u32),
            guidance: args.run.guidance.to_proto(),
            clamp_repeat_penalty: args.run.clamp_repeat_penalty,
            ..Default::default()
        };
        let tags = || pb::Syntax {
            pos: t.pos.clone(),
            spans: vec![],
            weight: args.weight,
        };
        match arm {
            "pos" => r.syntax = Some(tags()),
            "span" | "span@length" => {
                let s = t.span.as_ref()?;
                r.syntax = Some(pb::Syntax {
                    pos: vec![],
                    spans: vec![pb::Span {
                        start: s.start as u32,
                        end: s.end as u32,
                        label: s.label.clone(),
                    }],
                    weight: args.weight,
                });
            }
            "pos+field" => {
                let (f, v) = t.field.as_ref()?;
                r.syntax = Some(tags());
                r.controls = vec![pb::Control {
                    guide: String::new(),
                    targets: vec![format!("{f}={v}")],
                    weight: None,
                }];
            }
            _ => r.guidance = None,
        }
        if r.syntax.is_some() {
            r.best_of = args.run.best_of;
        }
        Some(r)
    };
    let jobs: Vec<(usize, usize, pb::GenerateRequest)> = targets
        .iter()
        .enumerate()
        .flat_map(|(i, t)| {
            arms.iter()
                .enumerate()
                .filter_map(move |(k, a)| request(a, i, t).map(|r| (k, i, r)))
        })
        .collect();
    let (keys, requests): (Vec<(usize, usize)>, Vec<_>) =
        jobs.into_iter().map(|(k, i, r)| ((k, i), r)).unzip();
    let responses = rt.block_on(generate_all(
        &args.run.endpoint,
        args.run.concurrency,
        requests,
    ))?;
    let answers: Vec<(usize, usize, String)> = keys
        .into_iter()
        .zip(responses)
        .map(|((k, i), r)| {
            let text = r
                .samples
                .into_iter()
                .next()
                .map(|s| s.text)
                .unwrap_or_default();
            (k, i, text)
        })
        .collect();
    let teacher = load_teacher(&args.run.teacher)?;
    let judge = FluencyJudge::new(&args.run.data_dir, 4, &teacher)?;
    let names = [
        "POS: whole tag sequence as asked",
        "POS: words tagged as asked",
        "span: the labelled constituent present",
        "span: texts with a sentence the parser links (its reach)",
        "span: the constituent present, of the texts in reach",
        "field: the semantic target said",
        "teacher perplexity ratio (texts ÷ E2E dev references)",
        "repetition (word or bigram back to back)",
        "4-gram perplexity ratio (texts ÷ E2E test references)",
    ];
    let mut cells: Vec<Vec<String>> = vec![vec!["–".to_string(); arms.len()]; names.len()];
    let mut lines = String::new();
    for (k, arm) in arms.iter().enumerate() {
        let mine: Vec<&(usize, usize, String)> = answers.iter().filter(|a| a.0 == k).collect();
        if mine.is_empty() {
            continue;
        }
        let strings: Vec<String> = mine.iter().map(|a| a.2.clone()).collect();
        let got = labeller.label(&strings)?;
        let pairs: Vec<(&SyntaxTarget, &_)> = mine
            .iter()
            .zip(&got)
            .map(|(a, g)| (&targets[a.1], g))
            .collect();
        let (exact, per_word) = pos_rates(&pairs);
        let said = |(t, text): (&SyntaxTarget, &String)| {
            t.field.as_ref().is_some_and(|(f, v)| realises(text, f, v))
        };
        let field_rate = mine.iter().filter(|a| said((&targets[a.1], &a.2))).count() as f64
            / mine
                .iter()
                .filter(|a| targets[a.1].field.is_some())
                .count()
                .max(1) as f64;
        let f = judge.report(&strings)?;
        let pct = |v: f64| format!("{:.1}%", 100.0 * v);
        let control = arm.split('@').next().unwrap_or(arm);
        let asks = |row: &str| arm.starts_with("unguided") || control.split('+').any(|a| a == row);
        if asks("pos") {
            cells[0][k] = pct(exact);
            cells[1][k] = pct(per_word);
        }
        if asks("span") {
            let in_reach: Vec<_> = pairs
                .iter()
                .filter(|(_, g)| g.spans.is_some())
                .copied()
                .collect();
            cells[2][k] = pct(span_rate(&pairs));
            cells[3][k] = pct(in_reach.len() as f64 / pairs.len().max(1) as f64);
            cells[4][k] = pct(span_rate(&in_reach));
        }
        if asks("field") {
            cells[5][k] = pct(field_rate);
        }
        cells[6][k] = format!("{:.3}", f.teacher.ratio);
        cells[7][k] = pct(f.samples_repetition);
        cells[8][k] = format!("{:.2}", f.ratio);
        for (a, g) in mine.iter().zip(&got) {
            let t = &targets[a.1];
            lines.push_str(&serde_json::json!({
                "arm": arm, "text": a.2, "reference": t.reference,
                "target_pos": t.pos, "target_span": t.span.as_ref().map(|s| (s.start, s.end, &s.label)),
                "target_field": t.field, "pos": g.pos, "spans": g.spans,
                "pos_exact": g.pos == t.pos, "span_present": t.span.as_ref().is_some_and(|s| g.has_span(s)),
            }).to_string());
            lines.push('\n');
        }
    }
    if let Some(path) = &args.texts {
        std::fs::write(path, lines).with_context(|| format!("writing {}", path.display()))?;
    }
    let header: Vec<String> = arms
        .iter()
        .map(|a| match *a {
            "unguided" => "unguided".to_string(),
            "unguided@length" => "unguided, the reference's length".to_string(),
            "span@length" => "span-guided, the reference's length".to_string(),
            _ => format!("{a}-guided"),
        })
        .collect();
    let mut table = format!(
        "| measure | {} |\n|---|{}\n",
        header.join(" | "),
        "---:|".repeat(arms.len())
    );
    for (name, row) in names.iter().zip(&cells) {
        table.push_str(&format!("| {name} | {} |\n", row.join(" | ")));
    }
    table.push_str(&format!(
        "\n{} targets from E2E test references (labels: {}), {} sampling steps, one text each; the \
         field of pos+field is one its reference says (not name or near); tags and the columns \
         \"the reference's length\" set the length, the others leave it to the model. A span is \
         credited only in a sentence the parser links (E2E dev references with such a sentence: 67%).\n",
        targets.len(),
        args.labeller.display(),
        args.run.steps
    ));
    print!("{table}");
    Ok(())
}

/// Sends every request to the generator, at most `concurrency` in flight (the engine batches
/// them), with a progress bar; the responses in request order.
async fn generate_all(
    endpoint: &GeneratorEndpoint,
    concurrency: usize,
    requests: Vec<dlm_proto::dlm::v1::GenerateRequest>,
) -> anyhow::Result<Vec<dlm_proto::dlm::v1::GenerateResponse>> {
    let client = endpoint.client().await?;
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let progress = dlm_generator::train::progress_bar(requests.len(), true);
    let mut tasks = Vec::new();
    for req in requests {
        let (mut client, sem, progress) = (client.clone(), sem.clone(), progress.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await?;
            let resp = client
                .generate(req)
                .await
                .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?;
            progress.inc(1);
            anyhow::Ok(resp.into_inner())
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await??);
    }
    progress.finish_and_clear();
    Ok(out)
}

/// An infill template with the target's name as its first words and every other position blank
/// (`length` of them in all, or just the name's when the length is free); None without a name.
fn name_first(
    target: &dlm_generator::eval::control::Target,
    length: Option<u32>,
) -> Option<dlm_proto::dlm::v1::Infill> {
    let (_, name) = target.iter().find(|(field, _)| field == "name")?;
    let mut template = dlm_generator::text::tokenizer::words(name);
    let blanks = length.map_or(0, |k| (k as usize).saturating_sub(template.len()));
    template.extend(std::iter::repeat_n(String::from("_"), blanks));
    Some(dlm_proto::dlm::v1::Infill { template })
}

/// `FIELD=W` of `eval-control --field-weight`.
fn parse_field_weight(s: &str) -> Result<(String, f32), String> {
    let (field, weight) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: FIELD=WEIGHT"))?;
    let weight: f32 = weight
        .parse()
        .map_err(|_| format!("`{s}`: the weight is not a number"))?;
    Ok((field.trim().to_string(), weight))
}

fn eval_control(args: EvalControlArgs) -> anyhow::Result<()> {
    use dlm_generator::eval::control::{
        draw_targets, median_lengths, rates, SaidText, Target, TextLength,
    };
    use dlm_generator::text::read_e2e;
    use dlm_proto::dlm::v1 as pb;
    use rand::SeedableRng;
    let test = read_e2e(&args.run.data_dir.join(data::TEST_FILE))?;
    let mrs: Vec<_> = test.iter().map(|r| r.mr.clone()).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.run.seed);
    let drawn = draw_targets(&mrs, args.fields, args.targets, &mut rng);
    // E2E's own texts for the drawn MRs: the fluency a writer reaches saying the same facts.
    let references: Vec<String> = drawn
        .iter()
        .flat_map(|(i, _)| {
            let mr = &mrs[*i];
            test.iter().filter(move |r| r.mr == *mr)
        })
        .filter_map(|r| r.text.as_deref())
        .map(|t| dlm_generator::text::tokenizer::words(t).join(" "))
        .collect();
    let targets: Vec<Target> = drawn.into_iter().map(|(_, t)| t).collect();
    let rt = tokio::runtime::Runtime::new()?;
    let (medians, max_words) = match args.length {
        TextLength::Auto => (
            median_lengths(&read_e2e(&args.run.data_dir.join(data::TRAIN_FILE))?),
            rt.block_on(args.run.endpoint.max_words())?,
        ),
        _ => Default::default(),
    };
    let length_of = |target: &Target| match args.length {
        TextLength::Free => None,
        TextLength::Words(k) => Some(k as u32),
        TextLength::Auto => medians.get(&target.len()).map(|&k| k.min(max_words) as u32),
    };
    let control = |targets: Vec<String>, weight: Option<f32>| pb::Control {
        guide: args.guide.clone(),
        targets,
        weight,
    };
    // Per target, a guided request and an unguided one on the same seed.
    let requests: Vec<pb::GenerateRequest> = targets
        .iter()
        .enumerate()
        .flat_map(|(i, target)| {
            let length = length_of(target);
            let base = pb::GenerateRequest {
                n: args.n,
                steps: Some(args.run.steps),
                seed: Some(args.run.seed * 1_000_003 + i as u64),
                length,
                infill: args
                    .name_first
                    .then(|| name_first(target, length))
                    .flatten(),
                clamp_repeat_penalty: args.run.clamp_repeat_penalty,
                ..Default::default()
            };
            let mut guided = base.clone();
            // A field with its own weight gets a control of its own; the rest share one.
            let mut shared = Vec::new();
            for (field, value) in target {
                let target = format!("{field}={value}");
                match args.field_weight.iter().find(|(f, _)| f == field) {
                    Some(&(_, w)) => guided.controls.push(control(vec![target], Some(w))),
                    None => shared.push(target),
                }
            }
            if !shared.is_empty() {
                guided.controls.push(control(shared, args.weight));
            }
            guided.guidance = args.run.guidance.to_proto();
            guided.best_of = args.run.best_of;
            [guided, base]
        })
        .collect();
    let responses = rt.block_on(generate_all(
        &args.run.endpoint,
        args.run.concurrency,
        requests,
    ))?;
    let texts = |r: pb::GenerateResponse| r.samples.into_iter().map(|s| s.text).collect::<Vec<_>>();
    let mut responses = responses.into_iter();
    let results: Vec<(Target, Vec<String>, Vec<String>)> = targets
        .iter()
        .map(|t| {
            let g = texts(responses.next().expect("a guided response per target"));
            let u = texts(responses.next().expect("an unguided response per target"));
            (t.clone(), g, u)
        })
        .collect();
    let guided_rates = rates(
        &results
            .iter()
            .map(|(t, g, _)| (t.clone(), g.clone()))
            .collect::<Vec<_>>(),
    );
    let unguided_rates = rates(
        &results
            .iter()
            .map(|(t, _, u)| (t.clone(), u.clone()))
            .collect::<Vec<_>>(),
    );
    let mut table = String::from(
        "| field | texts asked for it | guided success | unguided success |\n|---|---:|---:|---:|\n",
    );
    let (mut sum_g, mut sum_u, mut fields) = (0.0, 0.0, 0);
    for ((field, asked, ok_g), (_, _, ok_u)) in
        guided_rates.per_field.iter().zip(&unguided_rates.per_field)
    {
        let (g, u) = (*ok_g as f64 / *asked as f64, *ok_u as f64 / *asked as f64);
        sum_g += g;
        sum_u += u;
        fields += 1;
        table.push_str(&format!(
            "| {field} | {asked} | {:.1}% | {:.1}% |\n",
            100.0 * g,
            100.0 * u
        ));
    }
    let sizes: Vec<usize> = results.iter().map(|r| r.0.len()).collect();
    if sizes.iter().any(|&k| k > 1) {
        table.push_str(&format!(
            "| **every field realised** ({}–{} fields per target) | {} | **{:.1}%** | {:.1}% |\n",
            sizes.iter().min().unwrap_or(&0),
            sizes.iter().max().unwrap_or(&0),
            guided_rates.texts,
            100.0 * guided_rates.all_realised as f64 / guided_rates.texts.max(1) as f64,
            100.0 * unguided_rates.all_realised as f64 / unguided_rates.texts.max(1) as f64,
        ));
    }
    if let Some(path) = &args.texts {
        let mut out = String::new();
        for (target, guided, unguided) in &results {
            for (is_guided, texts) in [(true, guided), (false, unguided)] {
                for text in texts {
                    let said = SaidText::new(text);
                    let per_field: serde_json::Map<String, serde_json::Value> = target
                        .iter()
                        .map(|(f, v)| (f.clone(), said.realises(f, v).into()))
                        .collect();
                    let first = &target[0];
                    out.push_str(
                        &serde_json::json!({"field": first.0, "value": first.1,
                        "target": target.iter().map(|(f, v)| format!("{f}={v}")).collect::<Vec<_>>(),
                        "guided": is_guided, "text": text,
                        "realised": said.realises_all(target), "fields": per_field})
                        .to_string(),
                    );
                    out.push('\n');
                }
            }
        }
        std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))?;
    }
    let guided: Vec<String> = results.iter().flat_map(|r| r.1.clone()).collect();
    let unguided: Vec<String> = results.iter().flat_map(|r| r.2.clone()).collect();
    let teacher = load_teacher(&args.run.teacher)?;
    let judge = FluencyJudge::new(&args.run.data_dir, 4, &teacher)?;
    let (fg, fu, fr) = (
        judge.report(&guided)?,
        judge.report(&unguided)?,
        judge.report(&references)?,
    );
    table.push_str(&format!(
        "| **mean of {fields} fields** | {} | **{:.1}%** | {:.1}% |\n\
         | teacher perplexity ratio (texts ÷ E2E dev references) | | {:.3} | {:.3} |\n\
         | repetition (word or bigram back to back; dev references {:.1}%) | | {:.1}% | {:.1}% |\n\
         | 4-gram perplexity ratio (texts ÷ E2E test references) | | {:.2} | {:.2} |\n\n\
         {} sampling steps, {} text(s) per target, best of {}, {}{}. E2E's own references for the \
         targets' MRs ({} texts): teacher perplexity ratio {:.3}, repetition {:.1}%.\n",
        results.len(),
        100.0 * sum_g / fields.max(1) as f64,
        100.0 * sum_u / fields.max(1) as f64,
        fg.teacher.ratio,
        fu.teacher.ratio,
        100.0 * fg.dev_references_repetition,
        100.0 * fg.samples_repetition,
        100.0 * fu.samples_repetition,
        fg.ratio,
        fu.ratio,
        args.run.steps,
        args.n,
        args.run.best_of.unwrap_or(1),
        args.length,
        if args.name_first {
            ", the name first (infilled)"
        } else {
            ""
        },
        references.len(),
        fr.teacher.ratio,
        100.0 * fr.samples_repetition,
    ));
    print!("{table}");
    Ok(())
}
