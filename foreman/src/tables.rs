//! How `foreman jobs`, `workers` and `status` print: aligned text for a
//! person at a terminal, the API's JSON for scripts.

use std::io::IsTerminal as _;
use std::process::ExitCode;

use serde_json::Value;

use crate::client::print_json;

/// How `jobs`, `workers` and `status` print.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ListFormat {
    /// Text on a terminal, JSON otherwise (for scripts).
    Auto,
    /// Text, even when piped.
    Table,
    /// The API's JSON, as is.
    Json,
}

impl ListFormat {
    /// Prints `listed` as `table` renders it, or as JSON.
    pub fn print(
        self,
        listed: &Value,
        table: fn(&Value, u64) -> String,
    ) -> anyhow::Result<ExitCode> {
        match self {
            ListFormat::Json => print_json(listed),
            ListFormat::Auto if !std::io::stdout().is_terminal() => print_json(listed),
            ListFormat::Auto | ListFormat::Table => {
                print!("{}", table(listed, crate::driver::unix_ms()));
                Ok(ExitCode::SUCCESS)
            }
        }
    }
}

/// Jobs as the API lists them, newest first, one line each.
pub fn jobs(jobs: &Value, now_ms: u64) -> String {
    let rows = jobs.as_array().map_or(&[][..], Vec::as_slice);
    let mut table = Table::new(&[
        "ID",
        "STATE",
        "DONE",
        "FAILED",
        "RUNNING",
        "QUEUED",
        "SUBMITTED",
        "TOOK",
        "MODULE",
    ]);
    for job in rows {
        let number = |key: &str| job[key].as_u64().unwrap_or(0);
        let started = job["started_at_ms"].as_u64();
        let took = started.map(|started| {
            let end = job["finished_at_ms"].as_u64().unwrap_or(now_ms);
            duration(end.saturating_sub(started))
        });
        table.row(vec![
            number("id").to_string(),
            text(&job["state"]),
            format!("{}/{}", number("succeeded"), number("total")),
            number("failed").to_string(),
            number("running").to_string(),
            number("queued").to_string(),
            job["created_at_ms"]
                .as_u64()
                .map_or_else(|| "-".into(), |at| ago(now_ms, at)),
            took.unwrap_or_else(|| "-".into()),
            text(&job["module"]).chars().take(12).collect(),
        ]);
    }
    table.render()
}

/// One job as the API shows it, a line per aspect.
pub fn job(job: &Value, now_ms: u64) -> String {
    let number = |key: &str| job[key].as_u64().unwrap_or(0);
    let limits = &job["limits"];
    let limit = |key: &str| limits[key].as_u64().unwrap_or(0);
    let took = job["started_at_ms"].as_u64().map(|started| {
        let end = job["finished_at_ms"].as_u64();
        let took = duration(end.unwrap_or(now_ms).saturating_sub(started));
        if end.is_some() {
            took
        } else {
            format!("{took} so far")
        }
    });
    let mut table = Table::new(&["job", &number("id").to_string()]);
    let mut line = |what: &str, text: String| table.row(vec![what.to_owned(), text]);
    line("state", text(&job["state"]));
    line(
        "tasks",
        format!(
            "{} in all: {} succeeded, {} failed, {} cancelled, {} running, {} queued",
            number("total"),
            number("succeeded"),
            number("failed"),
            number("cancelled"),
            number("running"),
            number("queued")
        ),
    );
    line(
        "submitted",
        job["created_at_ms"]
            .as_u64()
            .map_or_else(|| "-".into(), |at| ago(now_ms, at)),
    );
    line("took", took.unwrap_or_else(|| "not started".into()));
    line("module", text(&job["module"]));
    line(
        "limits",
        format!(
            "fuel {}, memory {} MiB, timeout {}, {} retries",
            limit("fuel"),
            limit("memory_bytes") >> 20,
            duration(limit("timeout_ms")),
            number("max_retries")
        ),
    );
    line(
        "scheduling",
        format!(
            "{}, priority {}",
            text(&job["scheduler"]),
            job["priority"].as_i64().unwrap_or(0)
        ),
    );
    table.render()
}

/// Workers as the API lists them, one line each.
pub fn workers(workers: &Value, now_ms: u64) -> String {
    let rows = workers.as_array().map_or(&[][..], Vec::as_slice);
    let mut table = Table::new(&[
        "ID",
        "NAME",
        "STATUS",
        "SLOTS",
        "DONE",
        "FAILED",
        "SPEED",
        "PRIORITY",
        "MACHINE",
        "LAST SEEN",
    ]);
    for worker in rows {
        let number = |key: &str| worker[key].as_u64().unwrap_or(0);
        let speed = worker["benchmark_fuel_per_sec"]
            .as_f64()
            .map_or_else(|| "-".into(), |f| format!("{:.1} Gfuel/s", f / 1e9));
        table.row(vec![
            number("id").to_string(),
            text(&worker["name"]),
            text(&worker["status"]).replace('-', " "),
            format!("{}/{}", number("slots_used"), number("slots")),
            number("tasks_succeeded").to_string(),
            number("tasks_failed").to_string(),
            speed,
            text(&worker["priority"]),
            format!(
                "{} {}/{}, {} cores",
                text(&worker["hostname"]),
                text(&worker["os"]),
                text(&worker["arch"]),
                number("cores")
            ),
            worker["last_seen_ms"]
                .as_u64()
                .map_or_else(|| "-".into(), |at| ago(now_ms, at)),
        ]);
    }
    table.render()
}

fn text(value: &Value) -> String {
    value.as_str().unwrap_or("-").to_owned()
}

/// How long ago `at_ms` was, coarsely ("now", "40 s ago", "3 h ago").
fn ago(now_ms: u64, at_ms: u64) -> String {
    let secs = now_ms.saturating_sub(at_ms) / 1000;
    match secs {
        0..=1 => "now".into(),
        2..=119 => format!("{secs} s ago"),
        120..=7_199 => format!("{} min ago", secs / 60),
        7_200..=172_799 => format!("{} h ago", secs / 3600),
        _ => format!("{} d ago", secs / 86_400),
    }
}

/// A run time to a precision that suits it ("0.39 s", "12 s", "4 min 5 s").
fn duration(ms: u64) -> String {
    match ms {
        0..=9_999 => format!("{:.2} s", ms as f64 / 1000.0),
        10_000..=119_999 => format!("{} s", ms / 1000),
        120_000..=7_199_999 => format!("{} min {} s", ms / 60_000, ms / 1000 % 60),
        _ => format!("{} h {} min", ms / 3_600_000, ms / 60_000 % 60),
    }
}

struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(header: &[&str]) -> Self {
        Table {
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Columns two spaces apart, each as wide as its widest cell; lines end
    /// without trailing spaces.
    fn render(&self) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for line in std::iter::once(&self.header).chain(&self.rows) {
            let mut text = String::new();
            for (cell, width) in line.iter().zip(&widths) {
                text.push_str(&format!("{cell:<width$}  "));
            }
            out.push_str(text.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn jobs_line_up_with_their_progress_age_and_run_time() {
        let now = 1_000_000_000;
        let listed = json!([
            {"id": 12, "state": "running", "succeeded": 40, "total": 64, "failed": 1,
             "running": 2, "queued": 21, "created_at_ms": now - 90_000,
             "started_at_ms": now - 80_000, "finished_at_ms": null,
             "module": "e18a4861e5d5175a6beb7cbef5dfb79f67e3da9c5c0c43696254da13ac1ee059"},
            {"id": 3, "state": "queued", "succeeded": 0, "total": 100000, "failed": 0,
             "running": 0, "queued": 100000, "created_at_ms": now - 3 * 86_400_000,
             "started_at_ms": null, "finished_at_ms": null, "module": "00ff"},
        ]);
        assert_eq!(
            jobs(&listed, now),
            "\
ID  STATE    DONE      FAILED  RUNNING  QUEUED  SUBMITTED  TOOK  MODULE
12  running  40/64     1       2        21      90 s ago   80 s  e18a4861e5d5
3   queued   0/100000  0       0        100000  3 d ago    -     00ff
"
        );
        assert_eq!(
            jobs(&json!([]), now),
            "ID  STATE  DONE  FAILED  RUNNING  QUEUED  SUBMITTED  TOOK  MODULE\n"
        );
    }

    #[test]
    fn workers_show_status_slots_and_speed() {
        let now = 1_000_000_000;
        let listed = json!([{
            "id": 1, "name": "local-0", "status": "cooling-down", "slots_used": 1, "slots": 2,
            "tasks_succeeded": 33, "tasks_failed": 4, "benchmark_fuel_per_sec": 12_600_182_467u64,
            "priority": "idle", "hostname": "vm", "os": "linux", "arch": "x86_64", "cores": 2,
            "last_seen_ms": now - 500,
        }]);
        assert_eq!(
            workers(&listed, now),
            "\
ID  NAME     STATUS        SLOTS  DONE  FAILED  SPEED         PRIORITY  MACHINE                   LAST SEEN
1   local-0  cooling down  1/2    33    4       12.6 Gfuel/s  idle      vm linux/x86_64, 2 cores  now
"
        );
    }

    #[test]
    fn a_job_reads_a_line_per_aspect() {
        let now = 1_000_000_000;
        let shown = json!({
            "id": 7, "state": "running", "total": 64, "succeeded": 40, "failed": 1,
            "cancelled": 0, "running": 2, "queued": 21, "created_at_ms": now - 90_000,
            "started_at_ms": now - 80_000, "finished_at_ms": null, "module": "e18a",
            "limits": {"fuel": 10_000_000_000u64, "memory_bytes": 268_435_456, "timeout_ms": 60_000},
            "max_retries": 3, "scheduler": "fifo", "priority": -2,
        });
        assert_eq!(
            job(&shown, now),
            "\
job         7
state       running
tasks       64 in all: 40 succeeded, 1 failed, 0 cancelled, 2 running, 21 queued
submitted   90 s ago
took        80 s so far
module      e18a
limits      fuel 10000000000, memory 256 MiB, timeout 60 s, 3 retries
scheduling  fifo, priority -2
"
        );
    }

    #[test]
    fn durations_and_ages_read_at_a_glance() {
        assert_eq!(duration(390), "0.39 s");
        assert_eq!(duration(45_000), "45 s");
        assert_eq!(duration(245_000), "4 min 5 s");
        assert_eq!(duration(3 * 3_600_000 + 60_000), "3 h 1 min");
        assert_eq!(ago(10_000, 9_500), "now");
        assert_eq!(ago(10_000_000, 10_000_000 - 7_199_999), "119 min ago");
    }
}
