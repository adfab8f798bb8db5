//! `cargo xtask`: the project's build steps in one place.
//!
//! - `guests`: every example and test fixture to wasm, in `target/wasm/`;
//! - `demo`: the main job, end to end, with its results;
//! - `test`: the whole test suite (what CI runs; installs Chromium for the
//!   dashboard's browser test when missing);
//! - `fuzz`: the cargo-fuzz targets in `fuzz/`, each for a bounded time;
//! - `bench`: the benchmarks, printed as tables;
//! - `mandelbrot-png`: assembles Mandelbrot results into a picture.

mod browser;
mod demo;
mod fuzz;
mod guests;
mod mandelbrot_png;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Builds every guest crate to a wasm component in target/wasm/.
    Guests {
        #[arg(long, value_enum, default_value = "auto")]
        toolchain: guests::Toolchain,
    },
    /// Builds everything and runs the example jobs, showing their results.
    Demo,
    /// Builds the guests and runs formatting, lints and every test.
    Test {
        /// Skip `cargo fmt --check` and clippy.
        #[arg(long)]
        no_lint: bool,
        /// How long each fuzz target runs after the tests (0: not at all).
        #[arg(long, value_name = "SECS", default_value_t = 20)]
        fuzz_seconds: u64,
    },
    /// Runs each cargo-fuzz target (installing cargo-fuzz when missing);
    /// fails on a crash, leaving the input in fuzz/artifacts/.
    Fuzz {
        /// How long each target runs.
        #[arg(long, value_name = "SECS", default_value_t = 30)]
        seconds: u64,
        /// Only this target (wire_frames or submission).
        #[arg(long)]
        target: Option<String>,
    },
    /// Builds in release mode and prints the benchmark tables.
    Bench,
    /// Assembles `worker exec` results of the mandelbrot example into a PNG.
    MandelbrotPng {
        /// The results: a JSON array of bands.
        results: PathBuf,
        /// The picture to write.
        output: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Guests { toolchain } => guests::build(toolchain),
        Task::Demo => demo::run_demo(),
        Task::Test {
            no_lint,
            fuzz_seconds,
        } => test(no_lint, fuzz_seconds),
        Task::Fuzz { seconds, target } => fuzz::run_fuzz(seconds, target.as_deref()),
        Task::Bench => bench(),
        Task::MandelbrotPng { results, output } => mandelbrot_png::assemble(&results, &output),
    }
}

fn test(no_lint: bool, fuzz_seconds: u64) -> anyhow::Result<()> {
    guests::build(guests::Toolchain::Auto)?;
    if !no_lint {
        run(cargo().args(["fmt", "--all", "--", "--check"]))
            .context("formatting differs: run `cargo fmt --all`")?;
        run(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    // The end-to-end tests start the real binaries, so build them first,
    // with the tests: then they share one build of the dependencies (built
    // alone, the binaries leave out dev-dependencies' features, and every
    // dependency from wasmtime down would be compiled twice).
    run(cargo().args(["build", "--workspace", "--all-targets"]))?;
    // The dashboard's test drives a headless Chromium.
    browser::ensure_installed()?;
    run_tests(cargo().args(["test", "--workspace", "--no-fail-fast"]))?;
    if fuzz_seconds > 0 {
        fuzz::run_fuzz(fuzz_seconds, None)?;
    }
    Ok(())
}

/// Runs `cargo test`, echoing its output, and ends with one line that sums
/// every test binary's results (cargo's own last line is a doc-test run).
fn run_tests(command: &mut Command) -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader};
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("cannot start cargo test")?;
    let stdout = child.stdout.take().context("no stdout from cargo test")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(counts) = line.strip_prefix("test result: ") {
            for part in counts.split([';', '.']) {
                let mut words = part.split_whitespace();
                if let (Some(n), Some(what)) = (words.next(), words.next()) {
                    let n: u64 = n.parse().unwrap_or(0);
                    match what {
                        "passed" => passed += n,
                        "failed" => failed += n,
                        "ignored" => ignored += n,
                        _ => {}
                    }
                }
            }
        }
    }
    let status = child.wait()?;
    println!("tests: {passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() {
        bail!("cargo test failed with {status}");
    }
    Ok(())
}

fn bench() -> anyhow::Result<()> {
    guests::build(guests::Toolchain::Auto)?;
    // The grid bench starts the release binaries.
    run(cargo().args(["build", "--release", "--workspace", "--bins"]))?;
    run(cargo().args(["bench", "-p", "wasmgrid-worker", "--bench", "executor"]))?;
    run(cargo().args(["bench", "-p", "wasmgrid-foreman", "--bench", "scheduling"]))?;
    run(cargo().args(["bench", "-p", "wasmgrid-tests", "--bench", "grid"]))?;
    run(cargo().args(["bench", "-p", "wasmgrid-tests", "--bench", "schedulers"]))
}

/// The cargo that runs us, in the workspace root.
pub fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(workspace_root());
    command
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Runs a command to completion; fails unless it exits 0.
pub fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("cannot start {:?}", command.get_program()))?;
    if !status.success() {
        bail!("{command:?} failed with {status}");
    }
    Ok(())
}
