//! The main job, end to end: builds the guests and the worker, runs every
//! example job in the sandbox, and shows the results.

use std::path::PathBuf;
use std::process::Command;

use anyhow::Context;

use crate::{cargo, guests, mandelbrot_png, run, workspace_root};

pub fn run_demo() -> anyhow::Result<()> {
    guests::build(guests::Toolchain::Auto)?;
    run(cargo().args([
        "build",
        "--quiet",
        "-p",
        "wasmgrid-worker",
        "--bin",
        "worker",
    ]))?;
    let root = workspace_root();
    let worker = root.join("target/debug/worker");
    let out = root.join("target/demo");
    std::fs::create_dir_all(&out)?;

    for (name, dir) in guests::guest_crates()?
        .into_iter()
        .filter(|(_, d)| d.starts_with(root.join("examples")))
    {
        let results = out.join(format!("{name}.json"));
        println!("\n== {name}: worker exec target/wasm/{name}.wasm examples/{name}/args.json");
        run(Command::new(&worker)
            .arg("exec")
            .arg(guests::output_dir().join(format!("{name}.wasm")))
            .arg(dir.join("args.json"))
            .arg("--output")
            .arg(&results))?;
        let text = std::fs::read_to_string(&results)?;
        println!("{}", excerpt(&text, 300));
        println!("(all results: {})", results.display());
    }

    let picture: PathBuf = out.join("mandelbrot.png");
    mandelbrot_png::assemble(&out.join("mandelbrot.json"), &picture)
        .context("assembling the mandelbrot picture")?;
    println!(
        "\nThe Mandelbrot set, rendered by 48 tasks: {}",
        picture.display()
    );
    Ok(())
}

fn excerpt(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.trim_end().to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{} …", &text[..end])
}
