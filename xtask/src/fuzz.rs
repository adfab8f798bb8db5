//! `cargo xtask fuzz`: the cargo-fuzz targets in `fuzz/`, each for a bounded
//! time; fails on any crash, panic, leak or oversized allocation.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};

use crate::{cargo, run, workspace_root};

/// Each target and the longest input it is given.
const TARGETS: [(&str, usize); 2] = [("wire_frames", 16 << 10), ("submission", 32 << 10)];

pub fn run_fuzz(seconds: u64, only: Option<&str>) -> anyhow::Result<()> {
    let targets: Vec<(&str, usize)> = TARGETS
        .into_iter()
        .filter(|(name, _)| only.is_none_or(|t| t == *name))
        .collect();
    if targets.is_empty() {
        let names: Vec<&str> = TARGETS.iter().map(|(name, _)| *name).collect();
        bail!("no fuzz target {:?}; there are {}", only, names.join(", "));
    }
    let started = Instant::now();
    ensure_cargo_fuzz()?;
    let installed = started.elapsed();
    run(fuzz_command().args(["build"]))?;
    let built = started.elapsed() - installed;
    for (name, max_len) in &targets {
        // New inputs go to a scratch corpus in target/, so the seeds in fuzz/corpus stay as checked in.
        let scratch = target_dir().join("fuzz-corpus").join(name);
        std::fs::create_dir_all(&scratch)
            .with_context(|| format!("cannot create {}", scratch.display()))?;
        let seeds = workspace_root().join("fuzz").join("corpus").join(name);
        run(fuzz_command()
            .args(["run", name])
            .arg(&scratch)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-max_len={max_len}"))
            // ASan's shadow memory counts towards RSS; a single allocation this big is a bug.
            .arg("-rss_limit_mb=2048")
            .arg("-malloc_limit_mb=256")
            .arg("-timeout=10"))
        .with_context(|| {
            format!(
                "fuzz target {name} failed: the input that broke it is in fuzz/artifacts/{name}/"
            )
        })?;
    }
    println!(
        "fuzzing passed: cargo-fuzz ready in {:.0} s, targets built in {:.0} s, {} target(s) run {seconds} s each; {:.0} s in all",
        installed.as_secs_f64(),
        built.as_secs_f64(),
        targets.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `cargo fuzz` on stable: `RUSTC_BOOTSTRAP` lets it pass the sanitizer flags
/// (`-Zsanitizer=address`) that otherwise need nightly.
fn fuzz_command() -> Command {
    let mut command = cargo();
    command.arg("fuzz").env("RUSTC_BOOTSTRAP", "1");
    command
}

fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    let present = cargo()
        .args(["fuzz", "--version"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !present {
        println!("installing cargo-fuzz");
        run(cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    }
    Ok(())
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}
