//! Real `foreman` and `worker` processes on 127.0.0.1 for tests and benchmarks.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

use crate::binary;

/// A child process killed when dropped, pass or fail.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running `foreman serve` and the addresses it printed.
pub struct Foreman {
    pub process: Running,
    /// `http://127.0.0.1:PORT`
    pub http: String,
    /// `127.0.0.1:PORT` (UDP)
    pub quic: String,
    /// The bootstrap join token (`wgw_ID_SECRET:FINGERPRINT`).
    pub token: String,
    /// The bootstrap client token (`wgc_ID_SECRET`) from the data dir's `client-token`.
    pub client_token: String,
}

/// Client tokens of the foremen started by this process, by their `http`,
/// so helpers given only a URL can authenticate.
static CLIENT_TOKENS: Mutex<Option<HashMap<String, String>>> = Mutex::new(None);

/// The client token of the foreman this process started at `http`, if any.
pub fn client_token_for(http: &str) -> Option<String> {
    CLIENT_TOKENS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()?
        .get(http)
        .cloned()
}

/// The `foreman` CLI, with the client token of the foreman at `http` in
/// `WASMGRID_TOKEN` (add `--foreman http` yourself).
pub fn foreman_cli(http: &str) -> Command {
    let mut command = Command::new(binary("foreman"));
    if let Some(token) = client_token_for(http) {
        command.env("WASMGRID_TOKEN", token);
    }
    command
}

impl Foreman {
    /// The `foreman` CLI authenticated with this foreman's client token.
    pub fn cli(&self) -> Command {
        let mut command = Command::new(binary("foreman"));
        command.env("WASMGRID_TOKEN", &self.client_token);
        command
    }

    /// `foreman token create` with `extra` flags (`--kind client --role read`);
    /// the new token's string.
    pub fn create_token(&self, extra: &[&str]) -> String {
        let out = self
            .cli()
            .args(["token", "create", "--foreman", &self.http])
            .args(extra)
            .output()
            .expect("foreman token create runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

/// Starts `foreman serve` on free loopback ports; returns once it has printed its addresses.
pub fn start_foreman(data_dir: &Path, extra: &[&str]) -> Foreman {
    start_foreman_at(data_dir, "127.0.0.1:0", extra)
}

/// Starts `foreman serve` with its QUIC endpoint at `quic`, so workers find a restarted foreman.
pub fn start_foreman_at(data_dir: &Path, quic: &str, extra: &[&str]) -> Foreman {
    let mut child = Command::new(binary("foreman"))
        .args([
            "serve",
            "--quic",
            quic,
            "--http",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(data_dir)
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("foreman starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let (mut http, mut quic, mut token) = (None, None, None);
    while http.is_none() || quic.is_none() || token.is_none() {
        let line = lines
            .next()
            .expect("foreman prints its addresses")
            .expect("utf-8");
        if let Some(v) = line.strip_prefix("HTTP ") {
            http = Some(format!("http://{v}"));
        } else if let Some(v) = line.strip_prefix("QUIC ") {
            quic = Some(v.to_owned());
        } else if let Some(v) = line.strip_prefix("TOKEN ") {
            token = Some(v.to_owned());
        }
    }
    // Keep draining stdout so the foreman never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    let http = http.unwrap_or_default();
    // Written before the banner is printed.
    let client_token = std::fs::read_to_string(data_dir.join("client-token"))
        .expect("the foreman wrote its client token")
        .trim()
        .to_owned();
    CLIENT_TOKENS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(HashMap::new)
        .insert(http.clone(), client_token.clone());
    Foreman {
        process: Running(child),
        http,
        quic: quic.unwrap_or_default(),
        token: token.unwrap_or_default(),
        client_token,
    }
}

/// Starts a one-slot worker that joins `foreman`.
pub fn start_worker(foreman: &Foreman, name: &str, cache: &Path) -> Running {
    start_worker_with(foreman, name, cache, &[])
}

/// Like [`start_worker`], with extra flags (`--cpu-limit 25`, `--drain-grace 5`, ...).
pub fn start_worker_with(foreman: &Foreman, name: &str, cache: &Path, extra: &[&str]) -> Running {
    worker_logging_to(foreman, name, cache, extra, Stdio::null())
}

/// Like [`start_worker`], its warnings and errors written to `log`.
pub fn start_worker_logging(foreman: &Foreman, name: &str, cache: &Path, log: &Path) -> Running {
    let file = std::fs::File::create(log).expect("worker log file");
    worker_logging_to(foreman, name, cache, &[], Stdio::from(file))
}

fn worker_logging_to(
    foreman: &Foreman,
    name: &str,
    cache: &Path,
    extra: &[&str],
    log: Stdio,
) -> Running {
    Running(
        Command::new(binary("worker"))
            .args([
                "--foreman",
                &foreman.quic,
                "--token",
                &foreman.token,
                "--slots",
                "1",
                "--name",
                name,
            ])
            .arg("--cache-dir")
            .arg(cache)
            // Tests run many workers at once: no status API unless asked for.
            .args(if extra.contains(&"--api") {
                &[][..]
            } else {
                &["--no-api"][..]
            })
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("worker starts"),
    )
}
