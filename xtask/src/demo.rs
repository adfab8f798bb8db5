//! The main job, end to end: builds everything, starts a foreman with two
//! workers on loopback, submits every example job and shows the results.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context};

use crate::{cargo, guests, mandelbrot_png, run, workspace_root};

/// Stops the foreman (and with it its workers) however the demo ends.
struct Foreman(Child);

impl Drop for Foreman {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run_demo() -> anyhow::Result<()> {
    guests::build(guests::Toolchain::Auto)?;
    run(cargo().args(["build", "--quiet", "--workspace", "--bins"]))?;
    let root = workspace_root();
    let bin = root.join("target/debug");
    let out = root.join("target/demo");
    let data = out.join("foreman-data");
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&out)?;

    println!("== foreman serve --local-workers 2 (on 127.0.0.1)");
    let mut child = Command::new(bin.join("foreman"))
        .args([
            "serve",
            "--quic",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--local-workers",
            "2",
            "--data-dir",
        ])
        .arg(&data)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start the foreman")?;
    let stdout = child.stdout.take().context("no foreman stdout")?;
    let foreman = Foreman(child);
    let mut http = None;
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let line = line?;
        if let Some(address) = line.strip_prefix("HTTP ") {
            http = Some(format!("http://{address}"));
            break;
        }
        println!("{line}");
    }
    // Keep reading, so the foreman never writes into a closed pipe.
    std::thread::spawn(move || for _ in lines {});
    let Some(http) = http else {
        bail!("the foreman exited before it was ready");
    };
    // Submitting needs a client token; the foreman made one in its data dir.
    let token = std::fs::read_to_string(data.join("client-token"))
        .context("the foreman wrote no client-token")?;
    println!("(client token: foreman-data/client-token, passed as WASMGRID_TOKEN)");

    for (name, dir) in guests::guest_crates()?
        .into_iter()
        .filter(|(_, d)| d.starts_with(root.join("examples")))
    {
        let results = out.join(format!("{name}.json"));
        println!("\n== foreman submit target/wasm/{name}.wasm examples/{name}/args.json");
        run(Command::new(bin.join("foreman"))
            .env("WASMGRID_TOKEN", token.trim())
            .arg("submit")
            .arg(guests::output_dir().join(format!("{name}.wasm")))
            .arg(dir.join("args.json"))
            .args(["--foreman", &http, "--output"])
            .arg(&results))?;
        let text = std::fs::read_to_string(&results)?;
        println!("{}", excerpt(&text, 300));
        println!("(all results: {})", results.display());
    }
    for list in ["jobs", "workers"] {
        println!("\n== foreman {list}");
        run(Command::new(bin.join("foreman")).args([
            list,
            "--format",
            "table",
            "--foreman",
            &http,
        ]))?;
    }
    drop(foreman);

    let picture: PathBuf = out.join("mandelbrot.png");
    mandelbrot_png::assemble(&out.join("mandelbrot.json"), &picture)
        .context("assembling the mandelbrot picture")?;
    println!(
        "\nThe Mandelbrot set, rendered by 48 tasks on the grid: {}",
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
