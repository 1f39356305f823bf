//! No request harms another: bad settings, a hung guide, a full queue, hostile inputs and deadlines,
//! each against the real binaries on loopback, with a bystander request that must not suffer.

use std::time::{Duration, Instant};

use dlm_proto::dlm::v1 as pb;
use dlm_tests::{admin, repo_root, GeneratorServer, GuideServer};
use tonic::Code;

const GUIDE: &str = "e2e-semantic";

/// The shipped guide and generator, with `extra` generator flags.
async fn stack(extra: &[&str]) -> (GuideServer, GeneratorServer) {
    dlm_tests::stack(&[GUIDE], extra).await
}

fn request(n: u32, steps: u32, seed: u64, targets: &[&str]) -> pb::GenerateRequest {
    dlm_tests::request(GUIDE, n, steps, seed, targets)
}

fn with_guidance(mut r: pb::GenerateRequest, g: pb::Guidance) -> pb::GenerateRequest {
    r.guidance = Some(g);
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_finite_settings_fail_only_their_own_request() {
    let (_guide, generator) = stack(&["--max-n", "16"]).await;
    let client = generator.client().await;
    let mut bystander = client.clone();
    let good = tokio::spawn(async move {
        bystander
            .generate(request(4, 60, 1, &["food=Italian"]))
            .await
    });
    let bad: Vec<(pb::GenerateRequest, &str)> = vec![
        (
            with_guidance(
                request(2, 60, 2, &["food=Italian"]),
                pb::Guidance {
                    fluency_weight: Some(f32::NAN),
                    ..Default::default()
                },
            ),
            "guidance.fluency_weight",
        ),
        (
            with_guidance(
                request(2, 60, 2, &["food=Italian"]),
                pb::Guidance {
                    step_size: Some(f32::INFINITY),
                    ..Default::default()
                },
            ),
            "guidance.step_size",
        ),
        (
            with_guidance(
                request(2, 60, 2, &["food=Italian"]),
                pb::Guidance {
                    step_size: Some(1e38),
                    ..Default::default()
                },
            ),
            "guidance.step_size",
        ),
        (
            with_guidance(
                request(2, 60, 2, &["food=Italian"]),
                pb::Guidance {
                    fluency_weight: Some(f32::NEG_INFINITY),
                    ..Default::default()
                },
            ),
            "guidance.fluency_weight",
        ),
        (
            with_guidance(
                request(2, 60, 2, &["food=Italian"]),
                pb::Guidance {
                    space: pb::GuidanceSpace::Estimate as i32,
                    estimate_until: Some(60),
                    ..Default::default()
                },
            ),
            "guidance.estimate_until",
        ),
        (
            {
                let mut r = request(2, 60, 2, &["food=Italian"]);
                r.controls[0].weight = Some(f32::NAN);
                r
            },
            "controls.weight",
        ),
        (
            pb::GenerateRequest {
                clamp_repeat_penalty: Some(f32::NAN),
                ..request(2, 60, 2, &[])
            },
            "clamp_repeat_penalty",
        ),
        (
            pb::GenerateRequest {
                clamp_repeat_penalty: Some(-1.0),
                ..request(2, 60, 2, &[])
            },
            "clamp_repeat_penalty",
        ),
    ];
    for (req, field) in bad {
        let err = client.clone().generate(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        assert!(err.message().contains(field), "{}", err.message());
    }
    let resp = good
        .await
        .unwrap()
        .expect("a good request failed beside bad ones")
        .into_inner();
    assert_eq!(resp.samples.len(), 4);
    let metrics = generator.metrics();
    assert!(
        metrics.contains("dlm_generator_requests_total{status=\"invalid_argument\"} 8"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_guide_delays_only_the_requests_it_steers() {
    let (guide, generator) =
        stack(&["--guide-timeout-ms", "3000", "--guide-probe-ms", "300"]).await;
    let mut client = generator.client().await;
    let unguided = request(2, 50, 3, &[]);
    // Baseline: the median of three unguided requests with the guide healthy.
    let mut base = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        client.generate(unguided.clone()).await.unwrap();
        base.push(t.elapsed());
    }
    base.sort();
    let baseline = base[1];

    guide.pause();
    let mut guided_client = client.clone();
    let guided = tokio::spawn(async move {
        guided_client
            .generate(request(1, 50, 4, &["area=riverside"]))
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    client.generate(unguided.clone()).await.unwrap();
    let during = t.elapsed();
    assert!(
        during < baseline * 3 + Duration::from_millis(1500),
        "an unguided request took {during:?} beside a hung guide (baseline {baseline:?})"
    );
    let err = guided.await.unwrap().unwrap_err();
    assert!(
        matches!(err.code(), Code::Unavailable | Code::DeadlineExceeded),
        "{err}"
    );
    assert!(err.message().contains(GUIDE), "{}", err.message());

    // Describe and health say the guide is not ready...
    let describe = client
        .describe(pb::DescribeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!describe.guides[0].ready, "a hung guide is shown ready");
    assert_eq!(
        generator.health_of(&format!("guide/{GUIDE}")).await,
        Some(2),
        "guide health not NOT_SERVING"
    );
    // ...and ready again once it answers.
    guide.resume();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let d = client
            .describe(pb::DescribeRequest {})
            .await
            .unwrap()
            .into_inner();
        if d.guides[0].ready {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the guide never came back as ready"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    client
        .generate(request(1, 20, 5, &["area=riverside"]))
        .await
        .expect("guided requests work again once the guide answers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_bound_holds_exactly() {
    let (_guide, generator) = stack(&["--max-queue", "2", "--max-batch", "2"]).await;
    let client = generator.client().await;
    // Three long requests at once: two hold the permits, the third is refused at once.
    let calls: Vec<_> = (0..3)
        .map(|i| {
            let mut c = client.clone();
            tokio::spawn(async move { c.generate(request(1, 2000, i, &[])).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let finished: Vec<_> = calls.iter().filter(|c| c.is_finished()).collect();
    assert_eq!(finished.len(), 1, "exactly one of three should be refused");
    let mut refused = None;
    let mut running = Vec::new();
    for c in calls {
        if c.is_finished() {
            refused = Some(c.await.unwrap().unwrap_err());
        } else {
            running.push(c);
        }
    }
    let refused = refused.unwrap();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused}");
    assert!(
        refused.message().contains("max-queue"),
        "{}",
        refused.message()
    );
    let metrics = generator.metrics();
    assert!(
        metrics.contains("dlm_generator_requests_total{status=\"resource_exhausted\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("dlm_generator_requests_in_flight 2"),
        "{metrics}"
    );
    // Cancelling the two gives their permits back.
    for c in running {
        c.abort();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client.clone().generate(request(1, 10, 9, &[])).await {
            Ok(_) => break,
            Err(e) if e.code() == Code::ResourceExhausted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("permits never came back: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_inputs_get_clear_statuses_and_the_server_stays_up() {
    let (guide, generator) = stack(&[]).await;
    let mut client = generator.client().await;

    // A deadline past what the clock holds: served as no deadline, not a crash.
    let mut r = tonic::Request::new(request(1, 10, 1, &[]));
    r.metadata_mut()
        .insert("grpc-timeout", "99999999H".parse().unwrap());
    client.generate(r).await.expect("a huge grpc-timeout");

    // Unknown enum values are refused, not read as the default.
    let mut r = request(1, 10, 1, &[]);
    r.sampler = 7;
    let err = client.generate(r).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("sampler"), "{}", err.message());
    let r = with_guidance(
        request(1, 10, 1, &["food=Italian"]),
        pb::Guidance {
            update: 9,
            ..Default::default()
        },
    );
    let err = client.generate(r).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("guidance.update"),
        "{}",
        err.message()
    );

    // Long user input is not echoed whole.
    let long = format!("food={}", "é".repeat(20_000));
    let err = client
        .generate(request(1, 10, 1, &[long.as_str()]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().chars().count() <= 1100,
        "{} chars",
        err.message().len()
    );

    // Too many controls, too many targets.
    let mut r = request(1, 10, 1, &["food=Italian"]);
    r.controls = vec![r.controls[0].clone(); 9];
    let err = client.generate(r).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("controls"), "{}", err.message());

    // A card whose embedding hash is multi-byte text: refused, not sliced mid-character.
    let card = std::fs::read_to_string(repo_root().join("models/guides/e2e-semantic/1/card.json"))
        .unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&card).unwrap();
    v["embedding_sha256"] = serde_json::Value::String("é".repeat(40));
    let err = client
        .set_guide(admin(pb::SetGuideRequest {
            name: "odd".into(),
            url: guide.url(),
            card_json: v.to_string(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("refused"), "{}", err.message());

    // A card with the right hash for a model the server does not have: the registration
    // contacts the server and is refused.
    let err = client
        .set_guide(admin(pb::SetGuideRequest {
            name: "ghost".into(),
            url: format!("{}/no-such-model", guide.url()),
            card_json: card.clone(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert!(err.message().contains("not ready"), "{}", err.message());

    // Still serving, guided and not.
    client
        .generate(request(1, 20, 2, &["food=Italian"]))
        .await
        .expect("the generator survived");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_deadline_is_always_deadline_exceeded() {
    let (_guide, generator) = stack(&[]).await;
    let client = generator.client().await;
    for (i, ms) in [60u64, 150, 300, 500, 800].into_iter().enumerate() {
        for targets in [&[][..], &["area=riverside"][..]] {
            let mut r = tonic::Request::new(request(2, 2000, i as u64, targets));
            r.set_timeout(Duration::from_millis(ms));
            let err = client.clone().generate(r).await.unwrap_err();
            assert_eq!(
                err.code(),
                Code::DeadlineExceeded,
                "{ms} ms, targets {targets:?}: {err}"
            );
        }
    }
}

/// tonic's own `grpc-timeout` timer starts when the call arrives and answers CANCELLED; the
/// server's deadline counts from that moment too, so a request body that arrives late (a busy
/// client or machine) still gets DEADLINE_EXCEEDED. Sent as a one-message client stream, which
/// is what a unary call is on the wire, to hold the body back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_request_body_still_gets_deadline_exceeded() {
    let (_guide, generator) = stack(&[]).await;
    let channel = tonic::transport::Channel::from_shared(generator.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    for (deadline_ms, late_ms) in [(150u64, 80u64), (300, 200)] {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(late_ms)).await;
            let _ = tx.send(request(2, 2000, 0, &[])).await;
        });
        let mut r = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        r.set_timeout(Duration::from_millis(deadline_ms));
        grpc.ready().await.unwrap();
        let err = grpc
            .client_streaming::<_, pb::GenerateRequest, pb::GenerateResponse, _>(
                r,
                tonic::codegen::http::uri::PathAndQuery::from_static("/dlm.v1.Generator/Generate"),
                tonic_prost::ProstCodec::default(),
            )
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::DeadlineExceeded,
            "body {late_ms} ms late, deadline {deadline_ms} ms: {err}"
        );
    }
}
