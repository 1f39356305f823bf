//! Helpers for the end-to-end tests: where the built binaries, the shipped models and the data are.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The E2E data directory (`DLM_DATA_DIR`, else `../shared/data/e2e` beside the checkout).
pub fn data_dir() -> PathBuf {
    std::env::var_os("DLM_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("../shared/data/e2e"))
}

/// A workspace binary from the same profile as this test (`cargo test` builds them first).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let path = exe.parent().and_then(Path::parent).unwrap().join(name);
    assert!(
        path.exists(),
        "{} not built: run `cargo build --workspace` with this profile first",
        path.display()
    );
    path
}

/// Runs a binary from the repository root with the given arguments.
pub fn run(name: &str, args: &[&str]) -> Output {
    Command::new(binary(name))
        .args(args)
        .current_dir(repo_root())
        .env("DLM_DATA_DIR", data_dir())
        .env_remove("DLM_SEED")
        .output()
        .expect("binary starts")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
