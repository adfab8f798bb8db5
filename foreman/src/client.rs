//! The command-line client of the REST API: `foreman submit`, `status`,
//! `results`, `jobs`, `workers`, `drain`, `failures`.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use base64::Engine as _;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;
use ureq::Agent;

use crate::api::JobOptions;
use wasmgrid_jobspec::{parse_submission, SubmitLimits};

pub struct Client {
    base: String,
    agent: Agent,
    /// A client token, sent as `Authorization: Bearer`.
    token: Option<String>,
}

/// Where `foreman serve` keeps its data unless told (`--data-dir`).
pub const DEFAULT_DATA_DIR: &str = "wasmgrid-data";

impl Client {
    pub fn new(base: &str) -> Self {
        Self::with_token(base, None)
    }

    pub fn with_token(base: &str, token: Option<String>) -> Self {
        let agent: Agent = Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        Client {
            base: base.trim_end_matches('/').to_owned(),
            agent,
            token: token.map(|t| t.trim().to_owned()).filter(|t| !t.is_empty()),
        }
    }

    /// A client with `token`, or when none is given and the foreman is on
    /// this machine, the one in the default data dir's `client-token` file.
    pub fn for_cli(base: &str, token: Option<String>) -> Self {
        let token = token.or_else(|| {
            is_loopback(base)
                .then(|| {
                    let path = std::path::Path::new(DEFAULT_DATA_DIR)
                        .join(crate::identity::CLIENT_TOKEN_FILE);
                    std::fs::read_to_string(path).ok()
                })
                .flatten()
        });
        Self::with_token(base, token)
    }

    fn authorized<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.token {
            Some(token) => request.header("authorization", format!("Bearer {token}")),
            None => request,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn read(&self, mut response: ureq::http::Response<ureq::Body>) -> anyhow::Result<Value> {
        let status = response.status();
        let body: Value = response
            .body_mut()
            .with_config()
            .limit(u64::MAX)
            .read_json()
            .with_context(|| format!("the foreman answered {status} without JSON"))?;
        if !status.is_success() {
            let message = body["error"]["message"].as_str().unwrap_or("no message");
            if status == ureq::http::StatusCode::UNAUTHORIZED {
                bail!(
                    "{message} (HTTP {status}): pass a client token with --token or the \
                     WASMGRID_TOKEN environment variable (the foreman's data dir has one in \
                     its client-token file; `foreman token create --kind client` makes more)"
                );
            }
            bail!("{message} (HTTP {status})");
        }
        Ok(body)
    }

    pub fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(self.agent.get(&self.url(path)))
    }

    pub fn delete(&self, path: &str) -> anyhow::Result<Value> {
        self.call(self.agent.delete(&self.url(path)))
    }

    /// Sends a request without a body, with the token, and reads its JSON answer.
    fn call(
        &self,
        request: ureq::RequestBuilder<ureq::typestate::WithoutBody>,
    ) -> anyhow::Result<Value> {
        let response = self
            .authorized(request)
            .call()
            .with_context(|| format!("cannot reach the foreman at {}", self.base))?;
        self.read(response)
    }

    pub fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.post_bytes(path, serde_json::to_vec(body)?)
    }

    fn post_bytes(&self, path: &str, body: Vec<u8>) -> anyhow::Result<Value> {
        let response = self
            .authorized(self.agent.post(&self.url(path)))
            .header("content-type", "application/json")
            .send(body)
            .with_context(|| format!("cannot reach the foreman at {}", self.base))?;
        self.read(response)
    }
}

pub struct SubmitOptions {
    pub module: PathBuf,
    pub args: PathBuf,
    pub job: JobOptions,
    pub output: Option<PathBuf>,
    pub detach: bool,
}

pub fn submit(client: &Client, options: SubmitOptions) -> anyhow::Result<ExitCode> {
    let wasm = std::fs::read(&options.module)
        .with_context(|| format!("cannot read the module {}", options.module.display()))?;
    let args_text = std::fs::read_to_string(&options.args)
        .with_context(|| format!("cannot read the arguments {}", options.args.display()))?;
    let args: Value = serde_json::from_str(&args_text)
        .with_context(|| format!("{}: args.json is not valid JSON", options.args.display()))?;
    let body = serde_json::json!({
        "module_base64": base64::engine::general_purpose::STANDARD.encode(&wasm),
        "args": args,
        "options": options.job,
    });
    let body = serde_json::to_vec(&body)?;
    // Refuse here what the foreman would refuse, while the message can still reach us.
    if let Ok(limits) = client.get("/api/limits") {
        check_against_limits(&body, &limits)?;
    }
    let submitted = client.post_bytes("/api/jobs", body)?;
    let id = submitted["id"]
        .as_u64()
        .context("the foreman returned no job id")?;
    if options.detach {
        println!("{id}");
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("job {id}: {} tasks", submitted["tasks"]);
    let job = wait(client, id)?;
    print_results(client, id, &job, options.output.as_ref())
}

/// Refuses, before uploading, a body the foreman's `/api/limits` rules out:
/// the upload size, then the same parser and caps the foreman applies.
fn check_against_limits(body: &[u8], limits: &Value) -> anyhow::Result<()> {
    if let Some(limit) = limits["max_upload_bytes"].as_u64() {
        if body.len() as u64 > limit {
            bail!(
                "the upload ({:.1} MiB) is larger than the foreman's limit of {} MiB \
                 (foreman serve --max-upload-mib; the API answers 413)",
                body.len() as f64 / (1024.0 * 1024.0),
                limit >> 20
            );
        }
    }
    // A foreman from before the per-job caps lists none: it checks what it has.
    let Ok(caps) = serde_json::from_value::<SubmitLimits>(limits.clone()) else {
        return Ok(());
    };
    if let Err(error) = parse_submission(body, &caps) {
        bail!("the foreman would refuse this job: {error}");
    }
    Ok(())
}

/// Polls the job until it ends, with a progress bar on a terminal.
fn wait(client: &Client, id: u64) -> anyhow::Result<Value> {
    let bar = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr_with_hz(10));
        if let Ok(style) = ProgressStyle::with_template(
            "{bar:40.cyan/blue} {pos}/{len} tasks  {msg}  {per_sec}  ETA {eta}",
        ) {
            bar.set_style(style);
        }
        bar
    } else {
        ProgressBar::hidden()
    };
    let started = Instant::now();
    loop {
        // Returns at once when the job ends, else after a moment with its progress.
        let job = client.get(&format!("/api/jobs/{id}/wait?timeout_ms=250"))?;
        let total = job["total"].as_u64().unwrap_or(0);
        let done = ["succeeded", "failed", "cancelled"]
            .iter()
            .map(|k| job[*k].as_u64().unwrap_or(0))
            .sum();
        bar.set_length(total);
        bar.set_position(done);
        bar.set_message(format!("{} failed", job["failed"].as_u64().unwrap_or(0)));
        let state = job["state"].as_str().unwrap_or("");
        if matches!(state, "completed" | "failed" | "cancelled") {
            bar.finish_and_clear();
            eprintln!(
                "job {id} {state} in {:.2} s",
                started.elapsed().as_secs_f64()
            );
            return Ok(job);
        }
    }
}

fn print_results(
    client: &Client,
    id: u64,
    job: &Value,
    output: Option<&PathBuf>,
) -> anyhow::Result<ExitCode> {
    let body = client.get(&format!("/api/jobs/{id}/results"))?;
    let results = serde_json::to_string(&body["results"])?;
    wasmgrid_worker::cli_io::write_results(results, output.map(PathBuf::as_path))?;
    let failures = body["failures"].as_array().cloned().unwrap_or_default();
    let total = job["total"].as_u64().unwrap_or(0);
    eprintln!(
        "{total} tasks: {} succeeded, {} failed",
        job["succeeded"], job["failed"]
    );
    if !failures.is_empty() {
        let mut by_kind: BTreeMap<String, usize> = BTreeMap::new();
        for failure in &failures {
            *by_kind
                .entry(failure["kind"].as_str().unwrap_or("?").to_owned())
                .or_insert(0) += 1;
        }
        let kinds: Vec<String> = by_kind.iter().map(|(k, n)| format!("{k}: {n}")).collect();
        eprintln!("failures by kind: {}", kinds.join(", "));
        for failure in failures.iter().take(10) {
            let first_line = failure["message"]
                .as_str()
                .unwrap_or("")
                .lines()
                .next()
                .unwrap_or("");
            eprintln!(
                "task {} failed: {}: {first_line}",
                failure["index"],
                failure["kind"].as_str().unwrap_or("?")
            );
        }
    }
    Ok(if job["state"] == "completed" {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `--not-before`: an RFC 3339 UTC time, or `+` and a duration from now
/// (`+90s`, `+5m`, `+1h30m`); unix milliseconds.
pub fn parse_not_before(text: &str) -> Result<u64, String> {
    not_before_at(text, SystemTime::now())
}

fn not_before_at(text: &str, now: SystemTime) -> Result<u64, String> {
    let text = text.trim();
    let time = match text.strip_prefix('+') {
        Some(relative) => {
            let delay = humantime::parse_duration(relative.trim()).map_err(|e| {
                format!("{text:?} is not a duration from now such as +90s, +5m or +1h30m: {e}")
            })?;
            now.checked_add(delay)
                .ok_or_else(|| format!("{text:?} is too far in the future"))?
        }
        None => humantime::parse_rfc3339_weak(text).map_err(|e| {
            format!(
                "{text:?} is not a time such as 2026-11-22T20:30:00Z (RFC 3339, UTC) \
                 or +90s / +5m / +1h30m from now: {e}"
            )
        })?,
    };
    let ms = time
        .duration_since(UNIX_EPOCH)
        .map_err(|_| format!("{text:?} is before 1970"))?
        .as_millis();
    u64::try_from(ms).map_err(|_| format!("{text:?} is too far in the future"))
}

/// Whether a `http://HOST:PORT` URL names this machine.
fn is_loopback(base: &str) -> bool {
    let rest = base
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    let host = rest.split('/').next().unwrap_or("");
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

pub fn print_json(value: &Value) -> anyhow::Result<ExitCode> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(ExitCode::SUCCESS)
}

/// Deletes each job, saying what became of it; exit 1 if any was not deleted.
pub fn delete(client: &Client, jobs: &[u64]) -> anyhow::Result<ExitCode> {
    let mut all = true;
    for job in jobs {
        match client.delete(&format!("/api/jobs/{job}")) {
            Ok(answer) => println!(
                "deleted job {job} ({} tasks)",
                answer["tasks"].as_u64().unwrap_or(0)
            ),
            Err(error) => {
                eprintln!("job {job} not deleted: {error:#}");
                all = false;
            }
        }
    }
    Ok(if all {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The workers; with `wait`, once that many are online (`None`, said on
/// stderr, when they are not within the timeout).
pub fn workers(
    client: &Client,
    wait: Option<usize>,
    timeout_secs: f64,
) -> anyhow::Result<Option<Value>> {
    let deadline =
        Instant::now() + std::time::Duration::from_secs_f64(timeout_secs.clamp(0.0, 86_400.0));
    loop {
        let workers = client.get("/api/workers")?;
        let online = workers
            .as_array()
            .map_or(0, |all| all.iter().filter(|w| w["online"] == true).count());
        match wait {
            Some(wanted) if online < wanted => {
                if Instant::now() >= deadline {
                    eprintln!("{online} of {wanted} workers online after {timeout_secs} s");
                    return Ok(None);
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            _ => return Ok(Some(workers)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn loopback_foremen_are_recognised() {
        for yes in [
            "http://127.0.0.1:8000",
            "http://localhost:8000/",
            "http://[::1]:80",
            "127.0.0.2",
        ] {
            assert!(is_loopback(yes), "{yes}");
        }
        for no in [
            "http://10.0.0.1:8000",
            "http://example.org",
            "http://[2001:db8::1]:80",
        ] {
            assert!(!is_loopback(no), "{no}");
        }
    }

    #[test]
    fn not_before_takes_rfc3339_or_a_delay_from_now() {
        let now = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let at = |text: &str| not_before_at(text, now);
        assert_eq!(at("2026-11-22T20:30:00Z"), Ok(1_795_379_400_000));
        assert_eq!(at("2026-11-22T20:30:00.250Z"), Ok(1_795_379_400_250));
        assert_eq!(at(" 2026-11-22 20:30:00 "), Ok(1_795_379_400_000));
        assert_eq!(at("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(at("+90s"), Ok(1_700_000_090_123));
        assert_eq!(at("+5m"), Ok(1_700_000_300_123));
        assert_eq!(at("+1h30m"), Ok(1_700_005_400_123));
        assert_eq!(at("+ 2h 1s"), Ok(1_700_007_201_123));
        assert_eq!(at("+0s"), Ok(1_700_000_000_123));
        for bad in [
            "",
            "+",
            "+soon",
            "+-5m",
            "90s",
            "tomorrow",
            "2026-13-01T00:00:00Z",
            "2026-11-22T20:30:00+02:00",
        ] {
            let error = at(bad).expect_err(bad);
            assert!(
                error.contains(&format!("{:?}", bad.trim())),
                "{bad}: {error}"
            );
        }
        assert!(at("+5x").unwrap_err().contains("+90s"));
        assert!(at("tomorrow").unwrap_err().contains("2026-11-22T20:30:00Z"));
    }
}
