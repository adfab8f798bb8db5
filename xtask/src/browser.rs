//! The browser the dashboard's end-to-end test drives: Debian's `chromium`
//! and `chromium-driver`, installed when `chromedriver` is missing.

use std::process::Command;

use anyhow::{bail, Context};

/// Installs `chromium` and `chromium-driver` with apt-get unless
/// `chromedriver` is on PATH already. Where that cannot be done (no apt-get,
/// not root), says so and goes on: the browser test then skips, except in CI
/// (`CI` set), where a failed install is an error.
pub fn ensure_installed() -> anyhow::Result<()> {
    if on_path("chromedriver") {
        return Ok(());
    }
    let in_ci = std::env::var_os("CI").is_some();
    if !on_path("apt-get") {
        if in_ci {
            bail!("chromedriver is missing and there is no apt-get to install it");
        }
        eprintln!("note: chromedriver is missing (install chromium and its driver): the browser test will skip");
        return Ok(());
    }
    eprintln!("installing chromium and chromium-driver for the dashboard's browser test");
    let installed = apt(&["update", "-qq"])
        .and_then(|()| apt(&["install", "-y", "-qq", "chromium", "chromium-driver"]));
    match installed {
        Ok(()) if on_path("chromedriver") => Ok(()),
        Ok(()) => bail!("apt-get installed chromium-driver, yet chromedriver is not on PATH"),
        Err(error) if in_ci => Err(error),
        Err(error) => {
            eprintln!("note: {error:#}: the browser test will skip");
            Ok(())
        }
    }
}

fn apt(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("cannot run apt-get")?;
    if !status.success() {
        bail!("apt-get {} failed with {status}", args.join(" "));
    }
    Ok(())
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}
