//! `worker exec` as a user runs it: the real binary on the real example
//! guests, answers checked against the same Rust compiled natively.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;
use wasmgrid_tests::{binary, example_args_path, guest_path, json_elements};

fn worker_exec(module: &Path, args: &Path, extra: &[&str]) -> Output {
    Command::new(binary("worker"))
        .arg("exec")
        .arg(module)
        .arg(args)
        .args(["--slots", "2", "--no-cache"])
        .args(extra)
        .output()
        .expect("worker runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs an example's job in wasm and checks every result equals the native one.
fn run_example<E: std::fmt::Display>(
    name: &str,
    native: impl Fn(&str) -> Result<String, E>,
) -> Vec<Value> {
    let args_path = example_args_path(name);
    let output = worker_exec(&guest_path(name), &args_path, &[]);
    assert!(output.status.success(), "{name}: {}", stderr(&output));
    let results: Vec<Value> =
        serde_json::from_slice(&output.stdout).expect("stdout is a JSON array");
    let elements = json_elements(&args_path);
    assert_eq!(results.len(), elements.len());
    for (i, (arg, result)) in elements.iter().zip(&results).enumerate() {
        let native_json = native(arg).unwrap_or_else(|e| panic!("{name} args[{i}]: {e}"));
        let expected: Value = serde_json::from_str(&native_json).expect("native result is JSON");
        assert_eq!(result, &expected, "{name} args[{i}] differs from native");
    }
    let summary = stderr(&output);
    let n = results.len();
    assert!(
        summary.contains(&format!("{n} tasks: {n} succeeded, 0 failed")),
        "{summary}"
    );
    results
}

#[test]
fn primes_match_native_and_the_known_count() {
    let results = run_example("primes", primes::task_entry);
    let total: u64 = results.iter().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(total, 1_270_607, "π(2·10^7)");
}

#[test]
fn without_fuel_primes_still_match_and_report_no_fuel() {
    let dir = tempfile::tempdir().unwrap();
    let reports = dir.path().join("reports.json");
    let output = worker_exec(
        &guest_path("primes"),
        &example_args_path("primes"),
        &["--fuel", "0", "--reports", reports.to_str().unwrap()],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let results: Vec<u64> = serde_json::from_slice(&output.stdout).expect("JSON array");
    assert_eq!(results.iter().sum::<u64>(), 1_270_607, "π(2·10^7)");
    let reports: Vec<Value> = serde_json::from_slice(&std::fs::read(reports).unwrap()).unwrap();
    assert!(reports.iter().all(|r| r["fuel_used"] == 0), "{reports:?}");
}

#[test]
fn mandelbrot_bands_match_native_rendering() {
    let results = run_example("mandelbrot", mandelbrot::task_entry);
    let rows: u64 = results.iter().map(|b| b["rows"].as_u64().unwrap()).sum();
    assert_eq!(rows, 480);
}

#[test]
fn pi_hits_match_native_and_estimate_pi() {
    let results = run_example("pi", pi::task_entry);
    let hits: Vec<pi::Hits> = results
        .into_iter()
        .map(|v| serde_json::from_value(v).unwrap())
        .collect();
    assert!((pi::estimate(&hits) - std::f64::consts::PI).abs() < 1e-3);
}

#[test]
fn hashsearch_finds_the_native_nonces() {
    let results = run_example("hashsearch", hashsearch::task_entry);
    let found: usize = results.iter().map(|v| v.as_array().unwrap().len()).sum();
    assert!(found > 0, "2^22 nonces at 16 zero bits should find some");
}

#[test]
fn wordcount_chunks_merge_to_the_whole_text() {
    let results = run_example("wordcount", wordcount::task_entry);
    let mut merged = wordcount::WordCounts::default();
    for value in results {
        merged.merge(&serde_json::from_value(value).unwrap());
    }
    let texts: Vec<String> = json_elements(&example_args_path("wordcount"))
        .iter()
        .map(|e| serde_json::from_str::<Vec<String>>(e).unwrap().remove(0))
        .collect();
    assert_eq!(merged, wordcount::count(&texts.join("\n")));
}

#[test]
fn add_matches_native() {
    run_example("add", add::task_entry);
}

fn write(dir: &Path, name: &str, contents: &[u8]) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

#[test]
fn bad_args_files_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &str); 4] = [
        ("[1, 2", "is not valid JSON"),
        (
            "{\"lo\": 1}",
            "must be a JSON array with one element per task, but it is an object",
        ),
        ("[]", "is an empty array"),
        ("", "is not valid JSON"),
    ];
    for (text, expected) in cases {
        let args = write(dir.path(), "args.json", text.as_bytes());
        let output = worker_exec(&guest_path("add"), &args, &[]);
        assert_eq!(output.status.code(), Some(2), "{text:?}");
        assert!(
            stderr(&output).contains(expected),
            "{text:?}: {}",
            stderr(&output)
        );
        assert!(output.stdout.is_empty());
    }
}

#[test]
fn an_element_that_does_not_fit_is_named_and_the_rest_still_run() {
    let dir = tempfile::tempdir().unwrap();
    let args = write(
        dir.path(),
        "args.json",
        br#"[[1, 2], [3, "four"], [5, 6], [7]]"#,
    );
    let output = worker_exec(&guest_path("add"), &args, &[]);
    assert_eq!(output.status.code(), Some(1));
    let results: Vec<Value> = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        results,
        serde_json::json!([3, null, 11, null])
            .as_array()
            .unwrap()
            .clone()
    );
    let err = stderr(&output);
    assert!(
        err.contains("4 tasks: 2 succeeded, 2 failed (BadArgs: 2)"),
        "{err}"
    );
    assert!(err.contains("task 1 failed: BadArgs: args[1]: argument `b` (#2 of 2): invalid type: string \"four\""), "{err}");
    assert!(
        err.contains(
            "task 3 failed: BadArgs: args[3]: expected 2 arguments (a, b), got an array of 1"
        ),
        "{err}"
    );
}

#[test]
fn modules_that_are_not_tasks_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let args = write(dir.path(), "args.json", b"[[1, 2]]");
    let not_wasm = write(dir.path(), "notes.wasm", b"hello, I am text");
    let core = write(
        dir.path(),
        "core.wasm",
        &wat::parse_str("(module)").unwrap(),
    );
    for (module, expected) in [
        (not_wasm, "InvalidModule: not a wasm binary"),
        (core, "WrongWorld: this is a core wasm module"),
    ] {
        let output = worker_exec(&module, &args, &[]);
        assert_eq!(output.status.code(), Some(2));
        assert!(stderr(&output).contains(expected), "{}", stderr(&output));
    }
}

#[test]
fn limits_from_the_command_line_apply() {
    let dir = tempfile::tempdir().unwrap();
    let args = write(
        dir.path(),
        "args.json",
        br#"[["echo", 1], ["loop", 0], ["alloc", 1], ["recurse", 0], ["panic", 2]]"#,
    );
    let reports = dir.path().join("reports.json");
    let output = worker_exec(
        &guest_path("misbehave"),
        &args,
        &[
            "--fuel",
            "100000000",
            "--memory",
            "32",
            "--timeout",
            "5",
            "--reports",
            reports.to_str().unwrap(),
        ],
    );
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert!(
        err.contains("5 tasks: 1 succeeded, 4 failed (OutOfFuel: 1, MemoryLimit: 1, Trap: 2)"),
        "{err}"
    );
    let reports: Vec<Value> = serde_json::from_slice(&std::fs::read(reports).unwrap()).unwrap();
    assert_eq!(reports.len(), 5);
    assert_eq!(reports[0]["outcome"]["Ok"], "\"1\"");
    assert_eq!(reports[1]["outcome"]["Err"]["kind"], "OutOfFuel");
}
