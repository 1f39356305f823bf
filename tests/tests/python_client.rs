//! The Python client (clients/python, installed into .venv by deploy/setup.sh) against the real
//! servers: its example prints steered texts, and its texts are the gRPC API's for the same seed.

use std::process::Command;

use dlm_proto::dlm::v1 as pb;
use dlm_tests::{repo_root, venv_python};

/// The texts gRPC gives for the request the client example sends (2 texts, seed 4, food=Italian).
async fn grpc_texts(
    generator: &dlm_tests::GeneratorServer,
    best_of: Option<u32>,
    guidance: Option<pb::Guidance>,
) -> Vec<String> {
    let response = generator
        .client()
        .await
        .generate(pb::GenerateRequest {
            n: 2,
            seed: Some(4),
            best_of,
            guidance,
            controls: vec![pb::Control {
                guide: String::new(),
                targets: vec!["food=Italian".into()],
                weight: None,
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    dlm_tests::texts(response)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_steers_and_streams() {
    let (_guide, generator) = dlm_tests::stack(&["e2e-semantic"], &[]).await;
    let endpoint = format!("127.0.0.1:{}", generator.port);
    let run = |extra: &[&str]| {
        let out = Command::new(venv_python())
            .arg(repo_root().join("clients/python/examples/steer.py"))
            .args([
                "--endpoint",
                &endpoint,
                "--n",
                "2",
                "--seed",
                "4",
                "food=Italian",
            ])
            .args(extra)
            .env("PYTHONPATH", repo_root().join("clients/python"))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    let plain = run(&[]);
    let lines: Vec<&str> = plain.lines().collect();
    assert!(
        lines[0].starts_with("fields:") && lines[0].contains("food"),
        "{plain}"
    );
    let texts = grpc_texts(&generator, None, None).await;
    assert_eq!(
        &lines[1..],
        &texts[..],
        "the Python client's texts differ from gRPC's"
    );
    assert!(texts.iter().any(|t| t.contains("italian")), "{texts:?}");
    let streamed = run(&["--stream"]);
    assert!(streamed.contains("to go]"), "{streamed}");
    assert!(streamed.ends_with(&format!("{}\n", texts[1])), "{streamed}");

    // The control preset with its late hand-over through the client is the same request as
    // through gRPC: estimate space until step 150, the gate, best of 2 (the texts differ from the
    // default's and from the estimate throughout, so a dropped option would show).
    let preset = run(&[
        "--guidance-space",
        "estimate",
        "--satisfied-prob",
        "0.9",
        "--estimate-until",
        "150",
        "--best-of",
        "2",
    ]);
    let guidance = pb::Guidance {
        space: pb::GuidanceSpace::Estimate as i32,
        satisfied_prob: Some(0.9),
        ..Default::default()
    };
    let estimate_throughout = grpc_texts(&generator, Some(2), Some(guidance)).await;
    let late = pb::Guidance {
        estimate_until: Some(150),
        ..guidance
    };
    let preset_texts = grpc_texts(&generator, Some(2), Some(late)).await;
    assert_ne!(preset_texts, texts, "the preset changed nothing");
    assert_ne!(
        preset_texts, estimate_throughout,
        "estimate_until changed nothing"
    );
    assert_eq!(
        &preset.lines().skip(1).collect::<Vec<_>>()[..],
        &preset_texts[..],
        "the Python client's preset texts differ from gRPC's"
    );
}

/// A guidance option outside its values is refused by the client, naming the option.
#[test]
fn the_python_client_names_a_bad_guidance_option() {
    let out = Command::new(venv_python())
        .args([
            "-c",
            "import dlm\ntry:\n    dlm.Client.request(1, guidance_space='sideways')\nexcept ValueError as e:\n    print(e)",
        ])
        .env("PYTHONPATH", repo_root().join("clients/python"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("guidance_space must be one of latent, estimate"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
