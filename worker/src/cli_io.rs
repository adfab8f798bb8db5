//! What both command-line programs (`worker`, `foreman`) do at their edges:
//! logging to stderr and writing a job's results.

use std::io::Write;
use std::path::Path;

use anyhow::Context;

/// Human-readable logs on stderr; `RUST_LOG` overrides `default_level`.
pub fn init_logging(default_level: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// Writes a results array (JSON text) to `output`, or to stdout when `None`.
pub fn write_results(results: String, output: Option<&Path>) -> anyhow::Result<()> {
    match output {
        Some(path) => std::fs::write(path, results + "\n")
            .with_context(|| format!("cannot write {}", path.display())),
        None => {
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(results.as_bytes())?;
            stdout.write_all(b"\n")?;
            stdout.flush()?;
            Ok(())
        }
    }
}
