//! What both command-line programs (`worker`, `foreman`) do at their edges:
//! logging to stderr and writing a job's results.

use std::io::{IsTerminal, Write};
use std::path::Path;

use anyhow::Context;

/// How log lines look.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// For people reading a terminal.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Logs on stderr in `format`; `RUST_LOG` overrides `default_level`.
pub fn init_logging(default_level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    // Colours only for a terminal: escape codes make a log file hard to read.
    let ansi = std::io::stderr().is_terminal();
    let subscriber = subscriber(filter, format, ansi, std::io::stderr);
    // Only fails if a subscriber is already set (say, twice in one test binary).
    let _ = tracing::subscriber::set_global_default(subscriber);
}

/// The subscriber [`init_logging`] installs, writing to `writer` (tests capture it).
pub fn subscriber<W>(
    filter: tracing_subscriber::EnvFilter,
    format: LogFormat,
    ansi: bool,
    writer: W,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    match format {
        LogFormat::Text => Box::new(builder.finish()),
        // Fields at the top level, so collectors can filter on `attempt` directly.
        LogFormat::Json => Box::new(builder.json().flatten_event(true).finish()),
    }
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn log_with(format: LogFormat) -> String {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = subscriber(
            tracing_subscriber::EnvFilter::new("debug"),
            format,
            false,
            move || writer.clone(),
        );
        tracing::subscriber::with_default(subscriber, || {
            tracing::debug!(attempt = 42u64, run_us = 7u64, "finished");
            tracing::info!(attempt = 43u64, kind = "Trap", "failed");
        });
        let bytes = captured.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn json_logs_are_one_object_per_line() {
        let text = log_with(LogFormat::Json);
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["attempt"], 42);
        assert_eq!(lines[0]["run_us"], 7);
        assert_eq!(lines[0]["message"], "finished");
        assert_eq!(lines[0]["level"], "DEBUG");
        assert_eq!(lines[1]["kind"], "Trap");
    }

    #[test]
    fn text_logs_are_not_json() {
        let text = log_with(LogFormat::Text);
        assert!(text.contains("finished attempt=42"), "{text}");
        assert!(serde_json::from_str::<serde_json::Value>(text.lines().next().unwrap()).is_err());
    }
}
