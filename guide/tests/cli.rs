//! The `dlm-guide` binary's start-up errors. (Being an integration test of this package also makes
//! `cargo test --workspace` build the binary that the workspace tests start.)

use std::process::Command;

fn guide(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dlm-guide"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_lists_flags_with_their_env_vars() {
    let (code, out, _) = guide(&["serve", "--help"], &[]);
    assert_eq!(code, Some(0));
    for flag in [
        "--model-repository",
        "--batch-window-us",
        "--keep-versions",
        "[env: DLM_PORT=",
    ] {
        assert!(out.contains(flag), "help lacks {flag}:\n{out}");
    }
}

#[test]
fn missing_onnx_runtime_or_repository_is_a_clear_error() {
    let (code, _, err) = guide(
        &["serve", "--metrics-port", "0"],
        &[("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("/nonexistent/libonnxruntime.so") && err.contains("does not exist"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}
