//! Helpers for the end-to-end tests: where the built guests and binaries are.

pub mod host;
pub mod hostile;
pub mod processes;
pub mod webdriver;

use std::path::{Path, PathBuf};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// A guest built by `cargo xtask guests`, as bytes.
pub fn guest_wasm(name: &str) -> Vec<u8> {
    let path = guest_path(name);
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {} ({e}): build the guests first with `cargo xtask guests` (or run `cargo xtask test`)",
            path.display()
        )
    })
}

pub fn guest_path(name: &str) -> PathBuf {
    let dir = std::env::var_os("WASMGRID_GUESTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/wasm"));
    dir.join(format!("{name}.wasm"))
}

/// The `args.json` of an example.
pub fn example_args_path(name: &str) -> PathBuf {
    workspace_root()
        .join("examples")
        .join(name)
        .join("args.json")
}

/// One of the workspace's binaries, built next to the test executables.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its own path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executables live in target/<profile>/deps");
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build --workspace --all-targets` (or run `cargo xtask test`)",
        path.display()
    );
    path
}

/// The elements of a JSON array file, each as JSON text.
pub fn json_elements(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let values: Vec<serde_json::Value> = serde_json::from_str(&text).expect("a JSON array");
    values.iter().map(|v| v.to_string()).collect()
}
