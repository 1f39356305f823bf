//! The engine with the shipped model and the shipped guide run in-process (ONNX Runtime, no
//! network): admission, cancellation, mixed schedules, and a failure confined to its own rows.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;
use dlm_generator::diffusion::SamplerKind;
use dlm_generator::engine::{self, Control, EngineHandle, EngineOptions, Event, Job};
use dlm_generator::guidance::guide::{Dims, GuideBatch, GuideOutputs};
use dlm_generator::guidance::local::LocalGuide;
use dlm_generator::guidance::{
    GuidanceConfig, Guide, GuideRegistry, ModelSignature, RegisteredGuide,
};
use dlm_generator::model::LoadedModel;
use dlm_generator::Error;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn model() -> Arc<LoadedModel> {
    Arc::new(LoadedModel::load(&root().join("models/e2e-deep"), &Device::Cpu).unwrap())
}

fn registry(model: &LoadedModel) -> GuideRegistry {
    let cfg = &model.model.config;
    GuideRegistry::new(
        ModelSignature {
            embedding_sha256: model.model.embedding_sha256().unwrap(),
            diffusion_steps: cfg.diffusion_steps,
            schedule: format!("{:?}", cfg.schedule).to_lowercase(),
            seq_len: cfg.seq_len,
            embed_dim: cfg.embed_dim,
        },
        Duration::from_secs(5),
    )
}

fn shipped_guide() -> LocalGuide {
    LocalGuide::load(&root().join("models/guides/e2e-semantic/1/model.onnx")).unwrap()
}

/// The real guide, except that rows steered towards `food` value `poisoned` get a NaN gradient
/// (what a sick guide returns): the fault under test, injected around the real thing.
struct PoisonedRows {
    inner: LocalGuide,
    field: usize,
    poisoned: i64,
}

#[tonic::async_trait]
impl Guide for PoisonedRows {
    async fn gradient(&self, dims: Dims, batch: GuideBatch) -> dlm_generator::Result<GuideOutputs> {
        let f = dims.fields;
        let per = dims.per_row();
        let bad: Vec<usize> = (0..batch.rows)
            .filter(|r| batch.targets[r * f + self.field] == self.poisoned)
            .collect();
        let mut out = self.inner.gradient(dims, batch).await?;
        for r in bad {
            out.grad[r * per] = f32::NAN;
        }
        Ok(out)
    }
    async fn card(&self) -> dlm_generator::Result<dlm_proto::card::GuideCard> {
        self.inner.card().await
    }
    async fn probe(&self) -> dlm_generator::Result<()> {
        Ok(())
    }
    fn endpoint(&self) -> String {
        "poisoned".into()
    }
}

fn job(id: u64, n: usize, steps: usize, controls: Vec<Control>) -> Job {
    Job {
        id,
        n,
        best_of: 1,
        steps,
        sampler: SamplerKind::Ddpm,
        seed: id,
        clamp: true,
        repeat_penalty: dlm_generator::diffusion::clamp::DEFAULT_REPEAT_PENALTY,
        controls: controls.into(),
        fixed: vec![None; 64],
        guidance: GuidanceConfig::default(),
        progress_every: None,
        deadline: None,
    }
}

async fn outcome(engine: &EngineHandle, job: Job) -> dlm_generator::Result<Vec<String>> {
    let mut events = engine.submit(job)?;
    while let Some(e) = events.recv().await {
        if let Event::Done(r) = e {
            return r.map(|g| g.samples.into_iter().map(|s| s.text).collect());
        }
    }
    panic!("the engine stopped before answering")
}

fn start(model: Arc<LoadedModel>, max_batch: usize, max_queue: usize) -> EngineHandle {
    engine::start(
        model,
        tokio::runtime::Handle::current(),
        EngineOptions {
            max_batch,
            max_queue,
            guide_max_rows: 64,
        },
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_holds_a_permit_until_the_answer_and_cancellation_returns_it() {
    let model = model();
    let engine = start(Arc::clone(&model), 2, 2);
    let a = engine.submit(job(1, 1, 2000, vec![])).unwrap();
    let b = engine.submit(job(2, 1, 2000, vec![])).unwrap();
    match engine.submit(job(3, 1, 10, vec![])) {
        Err(Error::ResourceExhausted(m)) => assert!(m.contains("max-queue"), "{m}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a third request got past --max-queue 2"),
    }
    drop((a, b)); // both callers go away
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match outcome(&engine, job(4, 1, 10, vec![])).await {
            Ok(texts) => {
                assert_eq!(texts.len(), 1);
                break;
            }
            Err(Error::ResourceExhausted(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("cancelled requests kept their permits: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sick_row_fails_its_own_request_and_no_other() {
    let model = model();
    let registry = registry(&model);
    let inner = shipped_guide();
    let card = inner.card().await.unwrap();
    let food = card.fields.iter().position(|f| f.name == "food").unwrap();
    let italian = card.fields[food]
        .values
        .iter()
        .position(|v| v == "Italian")
        .unwrap() as i64;
    let guide: Arc<RegisteredGuide> = registry
        .register(
            "sick",
            Arc::new(PoisonedRows {
                inner,
                field: food,
                poisoned: italian,
            }),
        )
        .await
        .unwrap();
    let control = |t: &str| Control {
        targets: guide.targets(&[t.to_string()]).unwrap(),
        guide: Arc::clone(&guide),
        weight: 1.0,
    };
    let engine = start(model, 64, 16);
    // Three requests share every guide call and every denoiser batch, on three schedules, one
    // of them DDIM.
    let poisoned = outcome(&engine, job(1, 2, 40, vec![control("food=Italian")]));
    let healthy = outcome(&engine, job(2, 3, 60, vec![control("area=riverside")]));
    let mut ddim = job(3, 2, 25, vec![]);
    ddim.sampler = SamplerKind::Ddim;
    let unguided = outcome(&engine, ddim);
    let (poisoned, healthy, unguided) = tokio::join!(poisoned, healthy, unguided);
    match poisoned {
        Err(Error::Unavailable(m)) => assert!(m.contains("non-finite"), "{m}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a request whose guide returned NaN succeeded"),
    }
    assert_eq!(healthy.expect("the healthy guided request").len(), 3);
    assert_eq!(unguided.expect("the unguided request").len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_process_guide_steers_towards_its_targets() {
    let model = model();
    let registry = registry(&model);
    let guide = registry
        .register("local", Arc::new(shipped_guide()))
        .await
        .unwrap();
    let engine = start(model, 64, 16);
    let steer = |seed| {
        let mut j = job(
            seed,
            8,
            100,
            vec![Control {
                targets: guide.targets(&["food=Italian".into()]).unwrap(),
                guide: Arc::clone(&guide),
                weight: 1.0,
            }],
        );
        j.seed = seed;
        j
    };
    let guided = outcome(&engine, steer(7)).await.unwrap();
    let plain = outcome(&engine, job(7, 8, 100, vec![])).await.unwrap();
    let italian = |t: &[String]| t.iter().filter(|s| s.contains("italian")).count();
    assert!(
        italian(&guided) >= italian(&plain) + 3,
        "guided {guided:?} vs plain {plain:?}"
    );
}
