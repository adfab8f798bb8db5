//! Builds every guest (the examples and the test fixtures) to a wasm
//! component in `target/wasm/`.
//!
//! The normal way is rustup's `wasm32-wasip2` target. Where rustup cannot
//! provide it, Debian's own Rust (packages rustc-web, cargo-web,
//! rust-web-src, lld-22, wasi-libc) builds std for the target itself; those
//! packages are installed when missing.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

use crate::{run, workspace_root};

pub const TARGET: &str = "wasm32-wasip2";

const DEBIAN_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    "lld-22",
    "wasi-libc",
];
const DEBIAN_CARGO: &str = "/usr/bin/cargo";
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const DEBIAN_WASI_LIBC: &str = "/usr/lib/wasm32-wasi";
const DEBIAN_RUST_SRC: &str = "/usr/lib/rustlib/src/rust/library";
const DEBIAN_COMPONENT_LD: &str = "/usr/lib/rustlib/x86_64-unknown-linux-gnu/bin/wasm-component-ld";

/// Where the built components land, one `<crate>.wasm` each.
pub fn output_dir() -> PathBuf {
    workspace_root().join("target").join("wasm")
}

/// The crates built to wasm: every example, and the misbehaving test fixture.
pub fn guest_crates() -> anyhow::Result<Vec<(String, PathBuf)>> {
    let root = workspace_root();
    let mut crates = Vec::new();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root.join("examples"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("Cargo.toml").exists())
        .collect();
    dirs.sort();
    dirs.push(root.join("tests/fixtures/misbehave"));
    for dir in dirs {
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .context("guest crate folder name is not UTF-8")?
            .to_owned();
        crates.push((name, dir));
    }
    Ok(crates)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Toolchain {
    /// rustup's wasm32-wasip2 target, falling back to Debian's toolchain.
    Auto,
    Rustup,
    Debian,
}

pub fn build(toolchain: Toolchain) -> anyhow::Result<()> {
    let crates = guest_crates()?;
    let build_dir = workspace_root().join("target").join("wasm-build");
    let use_rustup = match toolchain {
        Toolchain::Rustup => {
            ensure_rustup_target()?;
            true
        }
        Toolchain::Debian => false,
        Toolchain::Auto => match ensure_rustup_target() {
            Ok(()) => true,
            Err(error) => {
                eprintln!("xtask: {error:#}; using Debian's Rust toolchain for wasm instead");
                false
            }
        },
    };
    let mut cargo = if use_rustup {
        rustup_cargo()
    } else {
        ensure_debian_toolchain()?;
        debian_cargo()
    };
    cargo
        .current_dir(workspace_root())
        .args([
            "build",
            "--release",
            "--lib",
            "--target",
            TARGET,
            "--target-dir",
        ])
        .arg(&build_dir);
    for (name, _) in &crates {
        cargo.args(["-p", name]);
    }
    eprintln!(
        "xtask: building {} guests for {TARGET} ({})",
        crates.len(),
        if use_rustup {
            "rustup"
        } else {
            "Debian toolchain"
        }
    );
    run(&mut cargo).context("building the guests failed")?;

    let out = output_dir();
    std::fs::create_dir_all(&out)?;
    for (name, _) in &crates {
        let artifact = name.replace('-', "_") + ".wasm";
        let built = build_dir.join(TARGET).join("release").join(&artifact);
        std::fs::copy(&built, out.join(&artifact))
            .with_context(|| format!("copying {}", built.display()))?;
    }
    eprintln!("xtask: guests are in {}", out.display());
    Ok(())
}

fn ensure_rustup_target() -> anyhow::Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("rustup is not available")?;
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.trim() == TARGET)
    {
        return Ok(());
    }
    eprintln!("xtask: rustup target add {TARGET}");
    let status = Command::new("timeout")
        .args(["300", "rustup", "target", "add", TARGET])
        .status()
        .context("running rustup target add")?;
    if !status.success() {
        bail!("rustup could not add the {TARGET} target");
    }
    Ok(())
}

/// wasm SIMD lets LLVM vectorize guest loops (wasmtime runs it on any
/// x86-64 with SSE4.1 and on aarch64); without it a byte-counting loop that
/// is vectorized natively runs scalar in wasm.
/// 4 MiB of initial memory (rustc's default is the 1 MiB stack plus data):
/// a task whose heap fits never grows its memory, and each growth costs the
/// worker two `mprotect`s per task (wasmtime makes the grown pages
/// inaccessible again for the next instance), which slow tasks on the
/// other cores too. Unused pages cost nothing.
const GUEST_RUSTFLAGS: &str = "-C target-feature=+simd128 -C link-arg=--initial-memory=4194304";

fn rustup_cargo() -> Command {
    let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    // Guests need no build-std and no Debian flags on this path.
    cargo
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env("RUSTFLAGS", GUEST_RUSTFLAGS);
    cargo
}

fn debian_toolchain_present() -> bool {
    [
        DEBIAN_CARGO,
        DEBIAN_RUSTC,
        DEBIAN_WASI_LIBC,
        DEBIAN_RUST_SRC,
        DEBIAN_COMPONENT_LD,
    ]
    .iter()
    .all(|p| Path::new(p).exists())
}

fn ensure_debian_toolchain() -> anyhow::Result<()> {
    if debian_toolchain_present() {
        return Ok(());
    }
    eprintln!(
        "xtask: installing Debian's Rust toolchain for wasm: {}",
        DEBIAN_PACKAGES.join(" ")
    );
    run(&mut apt_get(&["update", "-q"])).context("apt-get update failed")?;
    let mut install = apt_get(&["install", "-y", "-q", "--no-install-recommends"]);
    install.args(DEBIAN_PACKAGES);
    run(&mut install).context("apt-get install failed")?;
    if !debian_toolchain_present() {
        bail!(
            "Debian's wasm toolchain is still incomplete after installing {}",
            DEBIAN_PACKAGES.join(" ")
        );
    }
    Ok(())
}

/// apt-get, through sudo unless we are root already.
fn apt_get(args: &[&str]) -> Command {
    let mut command = if is_root() {
        Command::new("apt-get")
    } else {
        let mut sudo = Command::new("sudo");
        sudo.arg("apt-get");
        sudo
    };
    command.env("DEBIAN_FRONTEND", "noninteractive").args(args);
    command
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn debian_cargo() -> Command {
    let mut cargo = Command::new(DEBIAN_CARGO);
    // Drop what rustup's proxies and the outer cargo put in the environment.
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTUP_HOME_OVERRIDE",
        "CARGO",
        "RUSTDOC",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_MAKEFLAGS",
    ] {
        cargo.env_remove(var);
    }
    cargo
        .env("RUSTC", DEBIAN_RUSTC)
        .env("RUSTC_BOOTSTRAP", "1")
        .env(
            "RUSTFLAGS",
            format!("{GUEST_RUSTFLAGS} -L {DEBIAN_WASI_LIBC} -C link-self-contained=no"),
        )
        .arg("-Zbuild-std=std,panic_abort");
    cargo
}
