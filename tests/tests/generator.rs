//! The generator service with a real guide, over real processes on loopback.

use std::time::Duration;

use dlm_generator::eval::repetition::repetition_rate;
use dlm_proto::dlm::v1 as pb;
use dlm_tests::{admin, admin_token_file, repo_root, run, texts, GeneratorServer, GuideServer};
use tonic::Code;

const GUIDE: &str = "e2e-semantic";

/// The shipped guide and the shipped generator wired to it; `limit` is one more (flag, value).
async fn stack_with(limit: (&str, &str)) -> (GuideServer, GeneratorServer) {
    dlm_tests::stack(&[GUIDE], &[limit.0, limit.1]).await
}

async fn stack() -> (GuideServer, GeneratorServer) {
    stack_with(("--max-n", "16")).await
}

fn request(n: u32, steps: u32, seed: u64, targets: &[&str]) -> pb::GenerateRequest {
    dlm_tests::request(GUIDE, n, steps, seed, targets)
}

fn mentions(texts: &[String], word: &str) -> usize {
    texts
        .iter()
        .filter(|t| t.split(' ').any(|w| w == word))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guided_beats_unguided_and_same_seed_same_text() {
    let (_guide, generator) = stack().await;
    let mut client = generator.client().await;
    let unguided = texts(
        client
            .generate(request(8, 40, 7, &[]))
            .await
            .unwrap()
            .into_inner(),
    );
    let guided_resp = client
        .generate(request(8, 40, 7, &["food=Italian"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(guided_resp.seed, 7);
    assert!(guided_resp
        .samples
        .iter()
        .all(|s| s.scores.len() == 1 && s.scores[0].guide == GUIDE));
    let guided = texts(guided_resp);
    let (g, u) = (mentions(&guided, "italian"), mentions(&unguided, "italian"));
    assert!(
        g > u,
        "guided texts mention italian {g}/8 times, unguided {u}/8:\n{guided:#?}\n{unguided:#?}"
    );

    let again = texts(
        client
            .generate(request(8, 40, 7, &["food=Italian"]))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(again, guided, "same seed and request, different text");
}

/// Issue 13's stutter regression: the README's first demo request under the default guidance, one
/// candidate, on the seeds where each position clamped on its own (`clamp_repeat_penalty` 0, the
/// sampler before the joint clamp) writes "the mill is an italian italian eatery". Under the joint
/// clamp, the default, every text says the food it asks for and none doubles a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_joint_clamp_keeps_the_demo_request_from_stuttering_under_the_default_guidance() {
    let (_guide, generator) = stack().await;
    let mut client = generator.client().await;
    let demo = request(3, 200, 1, &["food=Italian", "area=riverside"]);
    let independent = pb::GenerateRequest {
        clamp_repeat_penalty: Some(0.0),
        ..demo.clone()
    };
    let before = texts(client.generate(independent).await.unwrap().into_inner());
    assert!(
        repetition_rate(&before) > 0.0,
        "the regression's seeds no longer stutter under the independent clamp: {before:#?}"
    );
    let texts = texts(client.generate(demo).await.unwrap().into_inner());
    assert_eq!(mentions(&texts, "italian"), 3, "{texts:#?}");
    assert_eq!(repetition_rate(&texts), 0.0, "{texts:#?}");
}

/// The README's first demo request as the demo sends it, under the control preset (estimate space,
/// the satisfaction gate, best of 4): every text says both fields and none doubles a word — where,
/// with the independent clamp, the default (latent) update on these seeds says "an italian italian
/// eatery", and so does the preset with one candidate ("an italian italian restaurant", step 60,000;
/// at step 31,500 one candidate was enough).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_request_under_the_control_preset_says_both_fields_without_stutter() {
    let (_guide, generator) = stack().await;
    let mut client = generator.client().await;
    let mut demo = request(3, 200, 1, &["food=Italian", "area=riverside"]);
    demo.best_of = Some(4);
    demo.guidance = Some(pb::Guidance {
        space: pb::GuidanceSpace::Estimate as i32,
        satisfied_prob: Some(0.9),
        ..Default::default()
    });
    let texts = texts(client.generate(demo).await.unwrap().into_inner());
    assert_eq!(mentions(&texts, "italian"), 3, "{texts:#?}");
    assert_eq!(mentions(&texts, "riverside"), 3, "{texts:#?}");
    assert_eq!(repetition_rate(&texts), 0.0, "{texts:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_length_and_infilling_hold_every_time() {
    let (_guide, generator) = stack().await;
    let mut client = generator.client().await;
    let mut r = request(6, 30, 3, &[]);
    r.length = Some(9);
    let resp = client.generate(r).await.unwrap().into_inner();
    for s in &resp.samples {
        assert_eq!(s.tokens.len(), 9, "{:?}", s.text);
    }
    let mut r = request(3, 30, 4, &[]);
    r.infill = Some(pb::Infill {
        template: ["the", "_", "_", "is", "a", "_", "_", "."]
            .iter()
            .map(|s| s.to_string())
            .collect(),
    });
    let resp = client.generate(r).await.unwrap().into_inner();
    for s in &resp.samples {
        assert_eq!(s.tokens[0], "the", "{:?}", s.text);
        assert_eq!(&s.tokens[3..5], ["is", "a"], "{:?}", s.text);
    }
    // The CLI sends the same template.
    let out = run(
        "dlm-generator",
        &[
            "generate",
            "--endpoint",
            &generator.url(),
            "--infill",
            "the _ _ is a _ _ .",
            "--n",
            "2",
            "--steps",
            "30",
            "--seed",
            "4",
        ],
    );
    assert!(out.status.success(), "{}", dlm_tests::stderr(&out));
    let printed = dlm_tests::stdout(&out);
    assert_eq!(printed.lines().count(), 2, "{printed}");
    for line in printed.lines() {
        let words: Vec<&str> = line.split(' ').collect();
        assert_eq!(
            (words[0], &words[3..5]),
            ("the", &["is", "a"][..]),
            "{line}"
        );
    }
}

/// An exact length at E2E's own (30 words): the words before the fixed END are a sentence, not the
/// model's shorter one padded out with "." (before the clamp kept those positions to real words,
/// 54% of these words were "."; E2E's references have about 8%).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exact_length_at_e2e_lengths_is_written_in_words_not_dots() {
    let (_guide, generator) = stack().await;
    let mut client = generator.client().await;
    let mut r = request(8, 200, 2, &[]);
    r.length = Some(30);
    let texts = texts(client.generate(r).await.unwrap().into_inner());
    let words: Vec<&str> = texts.iter().flat_map(|t| t.split(' ')).collect();
    assert_eq!(words.len(), 8 * 30, "{texts:#?}");
    let dots = words.iter().filter(|w| **w == ".").count();
    assert!(
        dots * 100 < words.len() * 15,
        "{dots} of {} words are \".\": {texts:#?}",
        words.len()
    );
}

/// best_of k: each text is the best of k candidates by the model's reconstruction log p plus the
/// guides' log p, so the returned text is one of the k texts the same seed samples as n × k plain
/// texts would be (candidate j of text i is slot i·k + j), with the model's log p beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn best_of_returns_the_highest_ranked_of_its_candidates() {
    let (_guide, generator) = stack().await;
    let mut client = generator.client().await;
    let (n, k) = (2usize, 3usize);
    let mut all = request((n * k) as u32, 30, 11, &["food=Italian"]);
    all.best_of = Some(1);
    let candidates = client.generate(all).await.unwrap().into_inner().samples;
    assert!(candidates.iter().all(|s| s.model_log_prob.is_none()));
    let mut ranked = request(n as u32, 30, 11, &["food=Italian"]);
    ranked.best_of = Some(k as u32);
    let best = client.generate(ranked).await.unwrap().into_inner().samples;
    assert_eq!(best.len(), n);
    for (i, b) in best.iter().enumerate() {
        let group: Vec<&str> = candidates[i * k..(i + 1) * k]
            .iter()
            .map(|s| s.text.as_str())
            .collect();
        assert!(
            group.contains(&b.text.as_str()),
            "{:?} not in {group:?}",
            b.text
        );
        let lp = b
            .model_log_prob
            .expect("ranked texts carry the model's log p");
        assert!(lp.is_finite() && lp < 0.0, "{lp}");
        assert_eq!(b.scores.len(), 1);
    }
}

/// The satisfaction gate reads the guide on the x0 estimate: at a threshold every text meets from
/// the first step, no text is ever pulled, so the guided texts are the unguided ones (same seed) —
/// still scored by the guide. In estimate space the gate is the first gradient call's log p, whose
/// gradient is then dropped: the same holds there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_satisfied_guide_leaves_the_text_alone() {
    let (_guide, generator) = stack().await;
    let mut client = generator.client().await;
    let unguided = texts(
        client
            .generate(request(3, 30, 5, &[]))
            .await
            .unwrap()
            .into_inner(),
    );
    for space in [pb::GuidanceSpace::Latent, pb::GuidanceSpace::Estimate] {
        let mut gated = request(3, 30, 5, &["food=Italian"]);
        gated.guidance = Some(pb::Guidance {
            space: space as i32,
            satisfied_prob: Some(1e-12),
            ..Default::default()
        });
        let resp = client.generate(gated.clone()).await.unwrap().into_inner();
        assert!(resp.samples.iter().all(|s| s.scores.len() == 1));
        assert_eq!(texts(resp), unguided, "{space:?}");
        gated.guidance = Some(pb::Guidance {
            space: space as i32,
            ..Default::default()
        });
        let pulled = texts(client.generate(gated).await.unwrap().into_inner());
        assert_ne!(
            pulled, unguided,
            "without the gate the guide steers ({space:?})"
        );
    }
}

/// `guidance.estimate_until` hands estimate-space guidance over to latent space from that step
/// down: with guidance from step 20 (of 30) and the hand-over at 20, every guided step is in
/// latent space, so the texts are latent space's (same seed), while the estimate throughout (0)
/// steers them elsewhere. (A hand-over at or past `steps` is INVALID_ARGUMENT: isolation.rs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn estimate_space_hands_over_to_latent_space_at_estimate_until() {
    let (_guide, generator) = stack().await;
    let mut client = generator.client().await;
    let mut got = Vec::new();
    for (space, estimate_until) in [
        (pb::GuidanceSpace::Latent, None),
        (pb::GuidanceSpace::Estimate, Some(20)),
        (pb::GuidanceSpace::Estimate, Some(0)),
    ] {
        let mut r = request(3, 30, 5, &["food=Italian"]);
        r.guidance = Some(pb::Guidance {
            space: space as i32,
            estimate_until,
            start_step: Some(20),
            ..Default::default()
        });
        got.push(texts(client.generate(r).await.unwrap().into_inner()));
    }
    let [latent, handed_over, throughout] = <[_; 3]>::try_from(got).unwrap();
    assert_eq!(handed_over, latent);
    assert_ne!(throughout, latent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_invalid_argument_naming_the_problem() {
    let (_guide, generator) = stack().await;
    let mut client = generator.client().await;
    let mut cases: Vec<(pb::GenerateRequest, &str)> = vec![
        (request(0, 10, 1, &[]), "`n`"),
        (request(17, 10, 1, &[]), "`n`"),
        (request(1, 2001, 1, &[]), "`steps`"),
        (request(1, 10, 1, &["food=Martian"]), "Martian"),
        (request(1, 10, 1, &["colour=red"]), "colour"),
        (request(1, 10, 1, &["food"]), "field=value"),
    ];
    let mut r = request(1, 10, 1, &["food=Italian"]);
    r.controls[0].guide = "no-such-guide".into();
    cases.push((r, "no-such-guide"));
    let mut r = request(1, 10, 1, &[]);
    r.infill = Some(pb::Infill {
        template: vec!["_".into(); 80],
    });
    cases.push((r, "infill.template"));
    let mut r = request(1, 10, 1, &[]);
    r.infill = Some(pb::Infill {
        template: vec!["zzzqqq".into()],
    });
    cases.push((r, "zzzqqq"));
    let mut r = request(1, 10, 1, &[]);
    r.length = Some(500);
    cases.push((r, "`length`"));
    for best_of in [0, 5] {
        // 4 × 5 candidates exceed --max-n 16.
        let mut r = request(4, 10, 1, &[]);
        r.best_of = Some(best_of);
        cases.push((r, "`best_of`"));
    }
    for p in [0.0, 1.5, f32::NAN] {
        let mut r = request(1, 10, 1, &["food=Italian"]);
        r.guidance = Some(pb::Guidance {
            satisfied_prob: Some(p),
            ..Default::default()
        });
        cases.push((r, "`guidance.satisfied_prob`"));
    }
    let mut r = request(1, 10, 1, &["food=Italian"]);
    r.guidance = Some(pb::Guidance {
        space: 7,
        ..Default::default()
    });
    cases.push((r, "`guidance.space`"));
    for (req, needle) in cases {
        let err = client.generate(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        assert!(
            err.message().contains(needle),
            "{:?} lacks {needle:?}",
            err.message()
        );
    }
    client.generate(request(1, 5, 1, &[])).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controls_without_a_guide_go_to_the_guide_that_reads_the_field() {
    let (guide, generator) = stack().await;
    let mut client = generator.client().await;
    let register = |name: &str, model: &str| pb::SetGuideRequest {
        name: name.into(),
        url: format!("http://127.0.0.1:{}/{model}", guide.port),
        ..Default::default()
    };
    client
        .set_guide(admin(register("e2e-names", "e2e-names")))
        .await
        .unwrap();
    let routed = |targets: &[&str]| {
        let mut r = request(2, 5, 1, targets);
        r.controls[0].guide.clear();
        r
    };
    let guides_scored = |r: pb::GenerateResponse| {
        let mut g: Vec<String> = r.samples[0]
            .scores
            .iter()
            .map(|s| s.guide.clone())
            .collect();
        g.sort();
        g
    };
    // near: both guides read it, the two-field one wins; food: only the general guide reads it.
    let resp = client
        .generate(routed(&["near=The Sorrento", "food=Italian"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(guides_scored(resp), ["e2e-names", GUIDE]);
    let resp = client
        .generate(routed(&["food=Italian"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(guides_scored(resp), [GUIDE]);

    // Two guides reading the same fields: the request must say which.
    client
        .set_guide(admin(register("twin", GUIDE)))
        .await
        .unwrap();
    let err = client
        .generate(routed(&["food=Italian"]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().contains("name one"), "{}", err.message());
    let resp = client
        .generate(routed(&["near=The Sorrento"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(guides_scored(resp), ["e2e-names"]);
    let err = client.generate(routed(&["colour=red"])).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(
        err.message()
            .contains("no registered guide reads field `colour`"),
        "{}",
        err.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eval_control_prints_the_table_and_writes_every_text_with_its_verdict() {
    let (_guide, generator) = stack().await;
    let dir = tempfile::tempdir().unwrap();
    let texts = dir.path().join("texts.jsonl");
    let args = [
        "eval-control".to_string(),
        "--endpoint".into(),
        generator.url(),
        "--targets".into(),
        "12".into(),
        "--steps".into(),
        "10".into(),
        "--texts".into(),
        texts.to_str().unwrap().into(),
        // An area target goes in a control of its own.
        "--field-weight".into(),
        "area=2".into(),
    ];
    let out = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run("dlm-generator", &args)
    })
    .await
    .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(table.contains("| **mean of "), "{table}");
    assert!(table.contains("perplexity ratio"), "{table}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&texts)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines.len(),
        24,
        "one guided and one unguided text per target"
    );
    for l in &lines {
        let (text, field, value) = (
            l["text"].as_str().unwrap(),
            l["field"].as_str().unwrap(),
            l["value"].as_str().unwrap(),
        );
        assert_eq!(
            l["realised"].as_bool().unwrap(),
            dlm_generator::eval::control::realises(text, field, value),
            "{l}"
        );
    }
    assert_eq!(lines.iter().filter(|l| l["guided"] == true).count(), 12);
}

#[test]
fn eval_control_names_a_field_weight_without_its_weight() {
    let out = run("dlm-generator", &["eval-control", "--field-weight", "near"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--field-weight") && err.contains("FIELD=WEIGHT"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_guide_gives_unavailable_and_the_generator_stays_healthy() {
    let (mut guide, generator) = stack().await;
    let mut client = generator.client().await;
    client
        .generate(request(1, 20, 1, &["area=riverside"]))
        .await
        .unwrap();
    guide.kill();
    // An unguided request shares the batch with the one whose guide is gone: it must not suffer.
    let mut other = client.clone();
    let bystander = tokio::spawn(async move { other.generate(request(2, 60, 3, &[])).await });
    let err = client
        .generate(request(2, 20, 1, &["area=riverside"]))
        .await
        .unwrap_err();
    bystander
        .await
        .unwrap()
        .expect("an unguided request failed because another's guide died");
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert!(err.message().contains(GUIDE), "{}", err.message());
    // Unguided work goes on.
    let resp = client
        .generate(request(2, 20, 1, &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.samples.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_frees_the_slot() {
    let (_guide, generator) = stack_with(("--max-batch", "2")).await;
    let mut client = generator.client().await;
    // A long request fills the batch, then its caller goes away.
    let long = tokio::time::timeout(
        Duration::from_millis(500),
        client.generate(request(2, 2000, 1, &[])),
    )
    .await;
    assert!(long.is_err(), "the long request should still be running");
    let started = std::time::Instant::now();
    let resp = tokio::time::timeout(
        Duration::from_secs(30),
        client.generate(request(2, 10, 2, &[])),
    )
    .await
    .expect("the slot was never freed")
    .unwrap();
    assert_eq!(resp.into_inner().samples.len(), 2);
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guides_swap_under_load_and_a_foreign_guide_is_refused() {
    let (guide, generator) = stack().await;
    let mut client = generator.client().await;
    let load: Vec<_> = (0..3)
        .map(|i| {
            let mut c = client.clone();
            tokio::spawn(async move {
                c.generate(request(2, 30, i, &["eatType=pub"]))
                    .await
                    .map(|_| ())
            })
        })
        .collect();
    // Replace the guide (same name, same server) while those run.
    for _ in 0..3 {
        client
            .set_guide(admin(pb::SetGuideRequest {
                name: GUIDE.into(),
                url: format!("http://127.0.0.1:{}", guide.port),
                ..Default::default()
            }))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for t in load {
        t.await
            .unwrap()
            .expect("a request failed during the guide swap");
    }
    // A guide described by its card file (as for a model on another OIP server).
    let card = std::fs::read_to_string(repo_root().join("models/guides/e2e-semantic/1/card.json"))
        .unwrap();
    let url = format!("http://127.0.0.1:{}/{GUIDE}", guide.port);
    client
        .set_guide(admin(pb::SetGuideRequest {
            name: GUIDE.into(),
            url: url.clone(),
            card_json: card.clone(),
        }))
        .await
        .unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&card).unwrap();
    v["embedding_sha256"] = serde_json::json!("0".repeat(64));
    let err = client
        .set_guide(admin(pb::SetGuideRequest {
            name: "other".into(),
            url,
            card_json: v.to_string(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("embedding"), "{}", err.message());
    let described = client
        .describe(pb::DescribeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(described.guides.len(), 1);
    assert!(described.guides[0].fields.iter().any(|f| f.name == "food"));

    // A generator whose embedding differs refuses the same guide, at start-up and at SetGuide.
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("other-model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(repo_root().join("models/e2e-deep").join(f), model.join(f)).unwrap();
    }
    let mut tensors = candle_core::safetensors::load(
        repo_root().join("models/e2e-deep/model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let e = tensors["embedding.weight"].clone();
    tensors.insert("embedding.weight".into(), (e * 1.01).unwrap());
    candle_core::safetensors::save(&tensors, model.join("model.safetensors")).unwrap();
    let out = run(
        "dlm-generator",
        &[
            "serve",
            "--model",
            model.to_str().unwrap(),
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--guide",
            &format!("{GUIDE}=http://127.0.0.1:{}", guide.port),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("refused") && stderr.contains("embedding"),
        "{stderr}"
    );
    let other = GeneratorServer::start(&[
        "--model".into(),
        model.to_str().unwrap().into(),
        "--admin-token-file".into(),
        admin_token_file().display().to_string(),
    ])
    .await;
    let err = other
        .client()
        .await
        .set_guide(admin(pb::SetGuideRequest {
            name: GUIDE.into(),
            url: format!("http://127.0.0.1:{}", guide.port),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_reports_progress_then_the_result() {
    let (_guide, generator) = stack().await;
    let mut client = generator.client().await;
    let mut r = request(2, 30, 5, &["area=riverside"]);
    r.progress_every = Some(10);
    let mut stream = client.generate_stream(r).await.unwrap().into_inner();
    let (mut progress, mut result) = (0, None);
    while let Some(ev) = stream.message().await.unwrap() {
        match ev.event.unwrap() {
            pb::generate_event::Event::Progress(p) => {
                assert_eq!(p.total_steps, 30);
                assert_eq!(p.texts.len(), 2);
                progress += 1;
            }
            pb::generate_event::Event::Result(r) => result = Some(r),
        }
    }
    assert!(progress >= 2, "{progress} progress events");
    assert_eq!(result.expect("a result").samples.len(), 2);
}

/// In a cluster the generator may start before its guide: it keeps trying for --guide-wait-s with its
/// port open but NOT_SERVING, then serves guided requests; with nobody answering in that time it
/// stops with an error naming the guide.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_generator_waits_for_a_guide_that_starts_later() {
    let port = dlm_tests::free_port();
    let url = format!("{GUIDE}=http://127.0.0.1:{port}");
    let out = run(
        "dlm-generator",
        &[
            "serve",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--guide",
            &url,
            "--guide-wait-s",
            "1",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("guide `{GUIDE}`")), "{stderr}");
    assert!(
        stderr.contains("not reachable yet"),
        "no retry was logged: {stderr}"
    );

    // Meanwhile the port is open and says NOT_SERVING; unguided requests are served, and one
    // that names the awaited guide gets UNAVAILABLE (not "unknown guide").
    let args = ["--guide".into(), url, "--guide-wait-s".into(), "60".into()];
    let mut generator = GeneratorServer::spawn(&args);
    let not_serving = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;
    let mut status = None;
    for _ in 0..300 {
        status = generator.health().await;
        if status.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, Some(not_serving), "health before the guide exists");
    let mut client = generator.client().await;
    let describe = client
        .describe(pb::DescribeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        !describe.ready,
        "Describe says ready before the guide exists"
    );
    let err = client
        .generate(request(1, 20, 1, &["area=riverside"]))
        .await
        .expect_err("a guided request before the guide exists");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains(GUIDE), "{}", err.message());
    client
        .generate(request(1, 5, 1, &[]))
        .await
        .expect("an unguided request while waiting for the guide");

    let _guide = GuideServer::start_on(
        port,
        &repo_root().join("models/guides"),
        &["--poll-ms", "0"],
    )
    .await;
    generator
        .wait_serving()
        .await
        .expect("SERVING once the guide is up");
    assert!(
        client
            .describe(pb::DescribeRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let resp = client
        .generate(request(1, 20, 1, &["area=riverside"]))
        .await
        .expect("a guided request once the guide is up")
        .into_inner();
    assert_eq!(resp.samples[0].scores.len(), 1);
}

/// Successful ModelInfer calls a guide has answered, from its Prometheus metrics.
fn answered(guide: &GuideServer) -> f64 {
    guide
        .metrics()
        .lines()
        .filter(|l| l.starts_with("dlm_guide_requests_total{") && l.contains("outcome=\"ok\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Replicas behind one name (a headless Service): the guide channel spreads calls over every address
/// the name resolves to, takes in a replica that appears and lets go of one that leaves. The
/// resolver is the one stand-in (loopback has one address per name); the guides are real.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guide_calls_follow_the_replicas_a_name_resolves_to() {
    use dlm_generator::guidance::oip::{balanced_channel, OipGuide};
    use dlm_generator::guidance::{guide::Dims, guide::GuideBatch, Guide};
    use std::collections::BTreeSet;
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};
    let repository = repo_root().join("models/guides");
    let a = GuideServer::start(&repository, &["--poll-ms", "0"]).await;
    let b = GuideServer::start(&repository, &["--poll-ms", "0"]).await;
    let addr = |g: &GuideServer| SocketAddr::from(([127, 0, 0, 1], g.port));
    let replicas = Arc::new(Mutex::new(BTreeSet::from([addr(&a)])));
    let answer = Arc::clone(&replicas);
    let resolve = move || {
        let set = answer.lock().unwrap().clone();
        async move { set }
    };
    let every = Duration::from_millis(100);
    let channel = balanced_channel(GUIDE, "http://guides.example:8001", every, resolve, None)
        .await
        .unwrap();
    let client = OipGuide::new(
        "http://guides.example:8001",
        GUIDE,
        channel,
        Duration::from_secs(5),
    );
    let card: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repository.join(GUIDE).join("1/card.json")).unwrap(),
    )
    .unwrap();
    let fields = card["fields"].as_array().unwrap().len();
    let (l, d) = (
        card["seq_len"].as_u64().unwrap() as usize,
        card["embed_dim"].as_u64().unwrap() as usize,
    );
    let calls = |n: usize| {
        let client = client.clone();
        async move {
            for _ in 0..n {
                let batch = GuideBatch {
                    rows: 1,
                    latents: vec![0.0; l * d],
                    timesteps: vec![0],
                    targets: vec![-1; fields],
                };
                let dims = Dims {
                    seq_len: l,
                    embed_dim: d,
                    fields,
                };
                client.gradient(dims, batch).await.unwrap();
            }
        }
    };
    calls(10).await;
    assert_eq!((answered(&a), answered(&b)), (10.0, 0.0));

    replicas.lock().unwrap().insert(addr(&b));
    tokio::time::sleep(4 * every).await;
    calls(40).await;
    let (on_a, on_b) = (answered(&a), answered(&b));
    assert_eq!(on_a + on_b, 50.0);
    assert!(on_b >= 5.0, "a new replica got {on_b} of 40 calls");

    replicas.lock().unwrap().remove(&addr(&a));
    tokio::time::sleep(4 * every).await;
    calls(10).await;
    assert_eq!(answered(&a), on_a, "a replica that left still got calls");
    assert_eq!(answered(&b), on_b + 10.0);
}
