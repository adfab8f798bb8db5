//! Just enough of the W3C WebDriver protocol to drive a headless Chromium
//! through `chromedriver`: open pages, run scripts, click, take screenshots.
//!
//! `cargo xtask test` installs Debian's `chromium` and `chromium-driver`
//! when `chromedriver` is missing (see `xtask/src/browser.rs`).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use crate::processes::Running;

/// `chromedriver` on PATH, if any.
pub fn find_chromedriver() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("chromedriver"))
        .find(|candidate| candidate.is_file())
}

/// A running `chromedriver` with one headless browser session; both end on drop.
pub struct Browser {
    agent: ureq::Agent,
    /// `http://127.0.0.1:PORT/session/ID`
    session: String,
    _driver: Running,
}

impl Browser {
    /// Starts `chromedriver` on a free port and a headless Chromium session
    /// of `width`×`height`; fails after `timeout`.
    pub fn start(chromedriver: &Path, width: u32, height: u32, timeout: Duration) -> Browser {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let driver = Running(
            Command::new(chromedriver)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("chromedriver starts"),
        );
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + timeout;
        loop {
            let ready = agent
                .get(&format!("{base}/status"))
                .call()
                .ok()
                .and_then(|mut r| r.body_mut().read_json::<Value>().ok())
                .is_some_and(|status| status["value"]["ready"] == true);
            if ready {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut options = json!({
            // As root in a container, without a display or a GPU.
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                format!("--window-size={width},{height}"),
            ],
        });
        if Path::new("/usr/bin/chromium").exists() {
            options["binary"] = json!("/usr/bin/chromium");
        }
        let capabilities = json!({
            "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": options,
            }}
        });
        let created = send(
            &agent,
            "POST",
            &format!("{base}/session"),
            Some(capabilities),
        );
        let id = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no browser session: {created}"))
            .to_owned();
        Browser {
            agent,
            session: format!("{base}/session/{id}"),
            _driver: driver,
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        send(
            &self.agent,
            method,
            &format!("{}{path}", self.session),
            body,
        )
    }

    pub fn goto(&self, url: &str) {
        self.call("POST", "/url", Some(json!({ "url": url })));
    }

    pub fn url(&self) -> String {
        self.call("GET", "/url", None)
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page; its return value.
    pub fn execute(&self, script: &str, args: Value) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
    }

    /// The text of the first element matching `selector`, or `None`.
    pub fn text(&self, selector: &str) -> Option<String> {
        let value = self.execute(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;",
            json!([selector]),
        );
        value.as_str().map(str::to_owned)
    }

    /// How many elements match `selector`.
    pub fn count(&self, selector: &str) -> usize {
        self.execute(
            "return document.querySelectorAll(arguments[0]).length;",
            json!([selector]),
        )
        .as_u64()
        .unwrap_or(0) as usize
    }

    /// Clicks the first element matching `selector`, as a user would.
    /// Live pages re-render rows under the driver's feet, so the element is
    /// looked up again when the one found went stale before the click.
    pub fn click(&self, selector: &str) {
        for _ in 0..20 {
            let found = self.call(
                "POST",
                "/element",
                Some(json!({ "using": "css selector", "value": selector })),
            );
            let element = found
                .as_object()
                .and_then(|o| o.values().next())
                .and_then(Value::as_str)
                .unwrap_or_else(|| panic!("no element {selector}: {found}"))
                .to_owned();
            let url = format!("{}/element/{element}/click", self.session);
            match try_send(&self.agent, "POST", &url, Some(json!({}))) {
                Ok(_) => return,
                Err((_, error)) if error["error"] == "stale element reference" => {}
                Err((status, error)) => panic!("POST {url}: {status}: {error}"),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{selector} kept going stale before it could be clicked");
    }

    /// Polls `probe` every 100 ms until it gives a value; panics naming
    /// `what` after `timeout`.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut probe: impl FnMut(&Browser) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(value) = probe(self) {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Saves a PNG of the window to `path`, making its folder.
    pub fn screenshot(&self, path: &Path) {
        let encoded = self.call("GET", "/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD
            .decode(encoded.as_str().expect("a base64 screenshot"))
            .expect("base64");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("the screenshot's folder");
        }
        std::fs::write(path, png).expect("the screenshot is written");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Closes Chromium; chromedriver is killed after.
        let _ = self.agent.delete(&self.session).call();
    }
}

/// One WebDriver command: the answer's `value`; panics on a WebDriver error.
fn send(agent: &ureq::Agent, method: &str, url: &str, body: Option<Value>) -> Value {
    try_send(agent, method, url, body)
        .unwrap_or_else(|(status, value)| panic!("{method} {url}: {status}: {value}"))
}

/// The command's value, or the status and error value WebDriver answered.
fn try_send(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    body: Option<Value>,
) -> Result<Value, (u16, Value)> {
    let response = match (method, body) {
        ("GET", _) => agent.get(url).call(),
        ("DELETE", _) => agent.delete(url).call(),
        (_, Some(body)) => agent.post(url).send_json(body),
        (_, None) => agent.post(url).send_empty(),
    };
    let mut response = response.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = response.status();
    let answer: Value = response
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_json()
        .unwrap_or_else(|e| panic!("{method} {url}: {status}, not JSON: {e}"));
    if !status.is_success() {
        return Err((status.as_u16(), answer["value"].clone()));
    }
    Ok(answer["value"].clone())
}
