//! The deployment manifests, checked offline: Kubernetes objects against the schemas that
//! kubernetes-validate bundles (strict: no unknown fields), the KServe InferenceService (whose CRD
//! schema no registry package bundles) against what its generator flags and the guides' Triton
//! configuration rely on.

use std::process::Command;

use dlm_tests::repo_root;

fn interop_bin(name: &str) -> std::path::PathBuf {
    let p = repo_root().join(".venv-interop/bin").join(name);
    assert!(p.exists(), "{} missing: run deploy/setup.sh", p.display());
    p
}

#[test]
fn kubernetes_manifests_match_their_schemas() {
    let out = Command::new(interop_bin("kubernetes-validate"))
        .args([
            "--strict",
            "deploy/k8s/generator.yaml",
            "deploy/k8s/guide.yaml",
        ])
        .current_dir(repo_root())
        .output()
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{log}");
    for resource in [
        "deployment/dlm-generator",
        "service/dlm-generator",
        "networkpolicy/dlm-generator",
        "deployment/dlm-guides",
        "service/dlm-guides",
        "horizontalpodautoscaler/dlm-guides",
        "networkpolicy/dlm-guides",
    ] {
        assert!(
            log.contains(&format!("passed for resource {resource}")),
            "{resource}: {log}"
        );
    }
}

#[test]
fn the_kserve_inference_service_serves_the_guides_with_triton_over_grpc() {
    let check = r#"
import sys, yaml, pathlib
(isvc,) = list(yaml.safe_load_all(open("deploy/kserve/guides.yaml")))
assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
m = isvc["spec"]["predictor"]["model"]
assert m["runtime"] == "kserve-tritonserver" and m["modelFormat"]["name"] == "triton", m
assert m["protocolVersion"] == "grpc-v2", m
assert any(p["name"] == "h2c" and p["containerPort"] == 9000 for p in m["ports"]), m
assert "--grpc-port=9000" in m["args"], m
guides = sorted(p.name for p in pathlib.Path("models/guides").iterdir() if p.is_dir())
assert {"e2e-semantic", "e2e-names", "e2e-pos", "e2e-spans"} <= set(guides), guides
for g in guides:
    cfg = pathlib.Path(f"models/guides/{g}/config.pbtxt").read_text()
    assert f'name: "{g}"' in cfg and 'backend: "onnxruntime"' in cfg and "max_batch_size: 0" in cfg, g
print("ok")
"#;
    let out = Command::new(interop_bin("python"))
        .args(["-c", check])
        .current_dir(repo_root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
