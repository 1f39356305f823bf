//! The Python client (clients/python, installed into .venv by deploy/setup.sh) against the real
//! servers: its example prints steered texts, and its texts are the gRPC API's for the same seed.

use std::process::Command;

use dlm_proto::dlm::v1 as pb;
use dlm_tests::{repo_root, venv_python};

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
    let grpc = generator
        .client()
        .await
        .generate(pb::GenerateRequest {
            n: 2,
            seed: Some(4),
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
    let texts: Vec<&str> = grpc.samples.iter().map(|s| s.text.as_str()).collect();
    assert_eq!(
        &lines[1..],
        &texts[..],
        "the Python client's texts differ from gRPC's"
    );
    assert!(texts.iter().any(|t| t.contains("italian")), "{texts:?}");
    let streamed = run(&["--stream"]);
    assert!(streamed.contains("to go]"), "{streamed}");
    assert!(streamed.ends_with(&format!("{}\n", texts[1])), "{streamed}");
}
