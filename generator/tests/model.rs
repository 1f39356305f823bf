//! The model, loss, training loop and sampler, on tiny real models.

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use dlm_generator::diffusion::{NoiseSchedule, Sampler, SamplerKind, ScheduleKind};
use dlm_generator::model::diffusion_lm::{build, inference_model, save_model_dir, LoadedModel};
use dlm_generator::model::ModelConfig;
use dlm_generator::text::WordTokenizer;
use dlm_generator::train::optim::named_vars;
use dlm_generator::train::step::{step_gradients, StepBatch};
use dlm_generator::train::{loss::diffusion_loss, TrainConfig, Trainer};
use rand::SeedableRng;

const SENTENCES: [&str; 4] = [
    "the eagle is a pub .",
    "the mill serves french food .",
    "a cheap coffee shop in the city centre .",
    "zizzi is near the river .",
];

fn tiny_config(vocab_size: usize) -> ModelConfig {
    ModelConfig {
        vocab_size,
        embed_dim: 8,
        hidden: 32,
        layers: 2,
        heads: 2,
        mlp_ratio: 2,
        seq_len: 12,
        diffusion_steps: 100,
        schedule: ScheduleKind::Sqrt,
        self_condition: true,
    }
}

fn tokenizer() -> WordTokenizer {
    WordTokenizer::train(SENTENCES.iter().copied(), 1).unwrap()
}

fn batch(tok: &WordTokenizer, l: usize) -> Tensor {
    let ids: Vec<u32> = SENTENCES
        .iter()
        .flat_map(|s| tok.encode_padded(s, l).unwrap())
        .collect();
    Tensor::from_vec(ids, (SENTENCES.len(), l), &Device::Cpu).unwrap()
}

#[test]
fn every_trainable_tensor_gets_a_nonzero_gradient() {
    let tok = tokenizer();
    let cfg = tiny_config(tok.vocab_size());
    let (model, varmap) = build(&cfg, &Device::Cpu, 1).unwrap();
    let schedule = NoiseSchedule::new(cfg.schedule, cfg.diffusion_steps).unwrap();
    let mut rngs: Vec<_> = (0..4).map(rand::rngs::StdRng::seed_from_u64).collect();
    // Include t = 0 (the clean-embedding target) and the last step.
    let losses = diffusion_loss(
        &model,
        &schedule,
        &batch(&tok, cfg.seq_len),
        &[0, 10, 50, 99],
        &mut rngs,
        true,
    )
    .unwrap();
    let grads = losses.total.backward().unwrap();
    let vars = named_vars(&varmap);
    assert!(
        vars.len() > 20,
        "expected the whole model, got {} tensors",
        vars.len()
    );
    for (name, var) in &vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient reaches {name}"));
        let norm: f32 = g.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(
            norm > 0.0 && norm.is_finite(),
            "gradient of {name} is {norm}"
        );
    }
}

fn train_tiny(
    out: &std::path::Path,
    steps: usize,
    stop_at: Option<usize>,
    resume: bool,
    shards: usize,
) -> dlm_generator::train::TrainSummary {
    let texts: Vec<String> = SENTENCES.iter().map(|s| s.to_string()).collect();
    let trainer = Trainer {
        config: TrainConfig {
            model: tiny_config(0),
            min_count: 1,
            drop_unk: true,
            drop_long: true,
            steps,
            batch_size: 16,
            lr: 3e-3,
            warmup: 20,
            weight_decay: 0.0,
            ema_decay: 0.99,
            grad_clip: 1.0,
            seed: 7,
            t_power: 1.0,
        },
        out: out.to_path_buf(),
        log_every: 10,
        checkpoint_every: 100,
        show_progress: false,
        stop_at,
        shards,
    };
    trainer.run(&texts, resume, &Device::Cpu).unwrap()
}

#[test]
fn tiny_model_overfits_and_samples_its_training_sentences() {
    let dir = tempfile::tempdir().unwrap();
    let summary = train_tiny(dir.path(), 1500, None, false, 2);
    let (first, last) = (summary.first_loss.unwrap(), summary.last_loss.unwrap());
    let log = std::fs::read_to_string(dir.path().join("train_log.jsonl")).unwrap();
    assert!(
        last * 10.0 < first,
        "loss fell only from {first} to {last}:\n{log}"
    );

    let loaded = LoadedModel::load(dir.path(), &Device::Cpu).unwrap();
    let sampler = Sampler::new(&loaded.model, 50, SamplerKind::Ddpm, true).unwrap();
    let samples = sampler.sample(8, 11, 8).unwrap();
    let texts: Vec<String> = samples
        .ids
        .iter()
        .map(|ids| loaded.tokenizer.decode(ids))
        .collect();
    let memorised = texts
        .iter()
        .filter(|t| SENTENCES.contains(&t.as_str()))
        .count();
    assert!(
        memorised >= 6,
        "only {memorised}/8 samples are training sentences: {texts:?}"
    );
    for file in [
        "train_log.jsonl",
        "loss.png",
        "config.json",
        "tokenizer.json",
    ] {
        assert!(dir.path().join(file).exists(), "{file} missing");
    }
}

#[test]
fn resumed_training_continues_where_it_stopped() {
    let straight = tempfile::tempdir().unwrap();
    train_tiny(straight.path(), 40, None, false, 2);
    let resumed = tempfile::tempdir().unwrap();
    let first = train_tiny(resumed.path(), 40, Some(20), false, 2);
    assert_eq!(first.step, 20);
    let summary = train_tiny(resumed.path(), 40, None, true, 2);
    assert_eq!(summary.step, 40);
    let a = std::fs::read(straight.path().join("model.safetensors")).unwrap();
    let b = std::fs::read(resumed.path().join("model.safetensors")).unwrap();
    assert!(a == b, "resumed run differs from an uninterrupted one");
    let log = std::fs::read_to_string(resumed.path().join("train_log.jsonl")).unwrap();
    assert_eq!(
        log.lines().count(),
        4,
        "log rows 10, 20, 30, 40 expected:\n{log}"
    );
}

#[test]
fn sharded_gradients_match_one_shard() {
    let tok = tokenizer();
    let cfg = tiny_config(tok.vocab_size());
    let (model, varmap) = build(&cfg, &Device::Cpu, 1).unwrap();
    let vars = named_vars(&varmap);
    let schedule = NoiseSchedule::new(cfg.schedule, cfg.diffusion_steps).unwrap();
    let ids = batch(&tok, cfg.seq_len);
    let grads = |shards: usize| {
        let mut rngs: Vec<_> = (0..4).map(rand::rngs::StdRng::seed_from_u64).collect();
        let batch = StepBatch {
            ids: &ids,
            t: &[0, 10, 50, 99],
            rngs: &mut rngs,
            self_condition: true,
        };
        step_gradients(&model, &schedule, &vars, batch, shards).unwrap()
    };
    let (one, three) = (grads(1), grads(3));
    assert!((one.mse - three.mse).abs() < 1e-5 && (one.rounding - three.rounding).abs() < 1e-5);
    for (name, var) in &vars {
        let a = one.grads.get(var.as_tensor()).unwrap();
        let b = three.grads.get(var.as_tensor()).unwrap();
        let diff: f32 = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        let scale: f32 = a.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(
            diff <= 1e-4 * scale.max(1e-3),
            "{name}: sharded gradient differs by {diff} (scale {scale})"
        );
    }
}

#[test]
fn checkpoint_round_trip_gives_identical_outputs() {
    let tok = tokenizer();
    let cfg = tiny_config(tok.vocab_size());
    let (_, varmap) = build(&cfg, &Device::Cpu, 1).unwrap();
    // Loading gives the inference model: compare with the same kernels on the saved weights
    // (the training forward is compared with it, to tolerance, below).
    let model = inference_model(&cfg, &varmap, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let weights = weights_of(&varmap);
    save_model_dir(dir.path(), &cfg, &tok, &weights).unwrap();
    let loaded = LoadedModel::load(dir.path(), &Device::Cpu).unwrap();
    let x = Tensor::randn(0f32, 1.0, (3, cfg.seq_len, cfg.embed_dim), &Device::Cpu).unwrap();
    let t = Tensor::new(&[0f32, 40.0, 99.0], &Device::Cpu).unwrap();
    let a = model
        .predict_x0(&x, &t, Some(&x))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let b = loaded
        .model
        .predict_x0(&x, &t, Some(&x))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(a, b);
    assert_eq!(loaded.tokenizer.vocab_size(), tok.vocab_size());
}

fn weights_of(varmap: &VarMap) -> std::collections::HashMap<String, Tensor> {
    named_vars(varmap)
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().clone()))
        .collect()
}

#[test]
fn seeded_sampling_is_deterministic_and_batch_independent() {
    let tok = tokenizer();
    let cfg = tiny_config(tok.vocab_size());
    let (model, _) = build(&cfg, &Device::Cpu, 1).unwrap();
    for kind in [SamplerKind::Ddpm, SamplerKind::Ddim] {
        let sampler = Sampler::new(&model, 20, kind, true).unwrap();
        let a = sampler.sample(5, 42, 5).unwrap().ids;
        let b = sampler.sample(5, 42, 5).unwrap().ids;
        assert_eq!(a, b, "{kind:?}: same seed, different samples");
        let c = sampler.sample(5, 43, 5).unwrap().ids;
        assert_ne!(a, c, "{kind:?}: a different seed gave the same samples");
        // Sequence i has its own random stream: splitting the batch does not change it.
        let split = sampler.sample(5, 42, 2).unwrap().ids;
        assert_eq!(a, split, "{kind:?}");
    }
}

#[test]
fn bad_sampling_arguments_are_clear_errors() {
    let tok = tokenizer();
    let cfg = tiny_config(tok.vocab_size());
    let (model, _) = build(&cfg, &Device::Cpu, 1).unwrap();
    let err = Sampler::new(&model, 101, SamplerKind::Ddpm, false)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("`steps`") && err.contains("T = 100"), "{err}");
    let sampler = Sampler::new(&model, 10, SamplerKind::Ddpm, false).unwrap();
    let err = sampler.sample(0, 1, 4).unwrap_err().to_string();
    assert!(err.contains("`n`"), "{err}");
}

#[test]
fn loading_reports_missing_and_mismatched_files() {
    let dir = tempfile::tempdir().unwrap();
    let err = LoadedModel::load(&dir.path().join("nope"), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("nope") && err.contains("not found"), "{err}");

    let tok = tokenizer();
    let cfg = tiny_config(tok.vocab_size());
    let (_, varmap) = build(&cfg, &Device::Cpu, 1).unwrap();
    save_model_dir(dir.path(), &cfg, &tok, &weights_of(&varmap)).unwrap();
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let err = LoadedModel::load(dir.path(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("model.safetensors"), "{err}");

    let mut wrong = cfg.clone();
    wrong.vocab_size += 1;
    wrong.save(&dir.path().join("config.json")).unwrap();
    let err = LoadedModel::load(dir.path(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("vocab_size"), "{err}");

    std::fs::write(dir.path().join("config.json"), "{ not json").unwrap();
    let err = LoadedModel::load(dir.path(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("config.json"), "{err}");
}

/// The inference kernels (plain-tensor weights: packed q/k/v attention, residual-folded
/// projections, the blocked MLP) give the training path's x0 predictions.
#[test]
fn inference_kernels_match_the_training_forward() {
    let cfg = tiny_config(20);
    let (trained, varmap) = build(&cfg, &Device::Cpu, 3).unwrap();
    let served = inference_model(&cfg, &varmap, &Device::Cpu).unwrap();
    let x = Tensor::randn(0f32, 1.0, (5, cfg.seq_len, cfg.embed_dim), &Device::Cpu).unwrap();
    let t = Tensor::new(&[0f32, 3.0, 20.0, 50.0, 99.0], &Device::Cpu).unwrap();
    let previous = Tensor::randn(0f32, 1.0, x.shape(), &Device::Cpu).unwrap();
    let a = trained.predict_x0(&x, &t, Some(&previous)).unwrap();
    let b = served.predict_x0(&x, &t, Some(&previous)).unwrap();
    assert!(
        a.track_op() && !b.track_op(),
        "the served model records no graph"
    );
    let diff = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-4, "inference forward differs by {diff}");
}
