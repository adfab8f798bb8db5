//! The dashboard in a real headless Chromium, driven over WebDriver, against
//! a real foreman and worker: the worker is listed, a job's progress moves
//! without a reload, its page lists its tasks, a Mandelbrot job's page
//! draws the picture, and a job is cancelled, then deleted, with its buttons. Screenshots
//! go to `target/artifacts/`.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{submit_detached, wait_for_state};
use serde_json::json;
use wasmgrid_tests::processes::{start_foreman, start_worker_with};
use wasmgrid_tests::webdriver::{find_chromedriver, Browser};
use wasmgrid_tests::{example_args_path, guest_path, workspace_root};

/// Every wait in this test is bounded by this.
const WAIT: Duration = Duration::from_secs(60);

fn artifacts() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
        .join("artifacts")
}

/// "3 / 40" → (3, 40).
fn progress(text: &str) -> Option<(u64, u64)> {
    let (done, total) = text.split_once('/')?;
    Some((done.trim().parse().ok()?, total.trim().parse().ok()?))
}

/// Forty `primes` tasks of ~0.1–0.4 s each on one slot: long enough to watch.
fn submit_watchable_primes(
    foreman: &wasmgrid_tests::processes::Foreman,
    dir: &std::path::Path,
) -> String {
    let step = 60_000_000u64;
    let ranges: Vec<String> = (0..40)
        .map(|i| format!("[{},{}]", i * step, (i + 1) * step))
        .collect();
    let args = dir.join("watchable-primes.json");
    std::fs::write(&args, format!("[{}]", ranges.join(","))).unwrap();
    submit_detached(foreman, &guest_path("primes"), &args)
}

#[test]
fn the_dashboard_follows_a_job_live_and_shows_its_tasks() {
    let Some(chromedriver) = find_chromedriver() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "chromedriver is not on PATH: CI must have it (`cargo xtask test` installs chromium and chromium-driver)"
        );
        println!("SKIPPED: chromedriver is not on PATH; `cargo xtask test` installs it (apt-get install chromium chromium-driver)");
        return;
    };
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    // Reads need a token too, as beyond loopback: the page must ask for it.
    let foreman = start_foreman(&dir.path().join("data"), &["--require-token-for-reads"]);
    let _worker = start_worker_with(
        &foreman,
        "dash-worker",
        &dir.path().join("cache"),
        &["--priority", "low"],
    );
    let browser = Browser::start(&chromedriver, 1400, 1100, WAIT);

    browser.goto(&format!("{}/", foreman.http));
    browser.wait_for("the page to ask for a client token", WAIT, |b| {
        b.text("#token-reason")
            .filter(|reason| reason.contains("client token"))
    });
    browser.screenshot(&artifacts().join("token-form.png"));
    browser.execute(
        "document.querySelector('#token-input').value = arguments[0];",
        json!([foreman.client_token]),
    );
    browser.click("#token-form button[type=submit]");
    browser.wait_for("the worker in the workers table", WAIT, |b| {
        b.text("#workers tbody")
            .filter(|text| text.contains("dash-worker") && text.contains("low priority"))
    });
    // Marks this page load: a reload or navigation would lose the mark.
    browser.execute("window.__sameLoad = true;", json!([]));

    let id = submit_watchable_primes(&foreman, dir.path());
    let row = format!("#jobs tr[data-job=\"{id}\"]");
    let text = format!("{row} .progress-text");
    let first = browser.wait_for("the job's progress to start", WAIT, |b| {
        b.text(&text)
            .and_then(|t| progress(&t))
            .filter(|&(done, total)| done > 0 && done < total)
    });
    let second = browser.wait_for("the job's progress to advance", WAIT, |b| {
        b.text(&text)
            .and_then(|t| progress(&t))
            .filter(|&(done, _)| done > first.0)
    });
    assert!(second.0 > first.0, "{first:?} then {second:?}");
    assert_eq!(
        browser.execute("return window.__sameLoad === true;", json!([])),
        json!(true),
        "the page reloaded while following the job"
    );
    assert_eq!(browser.count(&format!("{row} button[data-cancel]")), 1);
    // One job, running; the worker's one slot busy (its heartbeat may lag).
    browser.wait_for("the grid's figures", WAIT, |b| {
        let jobs = b.text("#stat-jobs")?;
        let slots = b.text("#stat-slots")?;
        (jobs == "1 / 0" && ["0 / 1", "1 / 1"].contains(&slots.as_str())).then_some(())
    });
    browser.screenshot(&artifacts().join("dashboard.png"));

    assert_eq!(
        browser.execute(
            "return [document.querySelector('#token-form').hidden, document.querySelector('#forget-token').hidden];",
            json!([])
        ),
        json!([true, false]),
        "asked once, and the token can be forgotten"
    );

    browser.click(&format!("{row} a[data-route]"));
    browser.wait_for("the job's tasks", WAIT, |b| {
        (b.count("#tasks tbody tr[data-task]") > 0).then_some(())
    });
    assert!(
        browser.url().ends_with(&format!("/jobs/{id}")),
        "{}",
        browser.url()
    );
    let states = browser.text("#tasks tbody").unwrap_or_default();
    assert!(
        ["succeeded", "running", "queued"]
            .iter()
            .any(|s| states.contains(s)),
        "{states}"
    );
    wait_for_state(&foreman.http, &id, "completed", 120);
    browser.wait_for("the job page to show it completed", WAIT, |b| {
        b.text("#job-state").filter(|s| s == "completed")
    });
    browser.screenshot(&artifacts().join("job.png"));

    // A Mandelbrot job's page assembles the picture from the results.
    let mandelbrot = submit_detached(
        &foreman,
        &guest_path("mandelbrot"),
        &example_args_path("mandelbrot"),
    );
    wait_for_state(&foreman.http, &mandelbrot, "completed", 120);
    // A new page load: the kept token is used, nothing is asked.
    browser.goto(&format!("{}/jobs/{mandelbrot}", foreman.http));
    browser.wait_for("the Mandelbrot picture", WAIT, |b| {
        let shown = b.execute(
            "const p = document.querySelector('#picture-panel'); return p && !p.hidden;",
            json!([]),
        );
        (shown == json!(true)).then_some(())
    });
    let size = browser.execute(
        "const c = document.querySelector('#picture'); return [c.width, c.height];",
        json!([]),
    );
    assert_eq!(size, json!([640, 480]));
    assert_eq!(
        browser.execute(
            "return document.querySelector('#token-form').hidden;",
            json!([])
        ),
        json!(true),
        "asked again after a page load"
    );
    browser.screenshot(&artifacts().join("mandelbrot-job.png"));

    // A 100,000-task job: its page shows one page of tasks, never all of them.
    let big = dir.path().join("big.json");
    let pairs: Vec<String> = (0..100_000).map(|i| format!("[{i},1]")).collect();
    std::fs::write(&big, format!("[{}]", pairs.join(","))).unwrap();
    let big = submit_detached(&foreman, &guest_path("add"), &big);
    let opened = Instant::now();
    browser.goto(&format!("{}/jobs/{big}", foreman.http));
    let rows = browser.wait_for("the big job's first page of tasks", WAIT, |b| {
        let rows = b.count("#tasks tbody tr[data-task]");
        (rows > 0).then_some(rows)
    });
    let shown_after = opened.elapsed();
    assert!(rows <= 100, "{rows} task rows on one page");
    browser.wait_for("the pager to count 100000 tasks", WAIT, |b| {
        b.text("#tasks-pager span")
            .filter(|t| t.contains("of 100000"))
    });
    wait_for_state(&foreman.http, &big, "completed", 120);
    browser.wait_for("the big job page to show it completed", WAIT, |b| {
        b.text("#job-state").filter(|s| s == "completed")
    });
    assert!(browser.count("#tasks tbody tr[data-task]") <= 100);
    browser.screenshot(&artifacts().join("big-job.png"));

    // Cancelling from the jobs table: the job ends cancelled and its row
    // says so, with no cancel button left.
    browser.goto(&format!("{}/", foreman.http));
    let doomed = submit_watchable_primes(&foreman, dir.path());
    let row = format!("#jobs tr[data-job=\"{doomed}\"]");
    let cancel = format!("{row} button[data-cancel]");
    browser.wait_for("the new job's cancel button", WAIT, |b| {
        (b.count(&cancel) == 1).then_some(())
    });
    browser.click(&cancel);
    wait_for_state(&foreman.http, &doomed, "cancelled", 60);
    browser.wait_for("the row to show the job cancelled", WAIT, |b| {
        b.text(&format!("{row} .state"))
            .filter(|s| s == "cancelled" && b.count(&cancel) == 0)
    });
    // Its bar shows what ran, not a full bar.
    let widths = browser.execute(
        "return [...document.querySelectorAll(arguments[0])].map(b => parseFloat(b.style.width));",
        json!([format!("{row} .progress .bar")]),
    );
    let widths: Vec<f64> = serde_json::from_value(widths).unwrap();
    assert!(
        widths.len() == 3 && widths[0] < 100.0 && widths[2] > 0.0,
        "{widths:?}"
    );
    browser.screenshot(&artifacts().join("cancelled-job.png"));
    // A finished job offers delete instead; confirmed, the job and its row go.
    let delete = format!("{row} button[data-delete]");
    browser.wait_for("the cancelled job's delete button", WAIT, |b| {
        (b.count(&delete) == 1).then_some(())
    });
    browser.execute("window.confirm = () => true;", json!([]));
    browser.click(&delete);
    browser.wait_for("the deleted job's row to go", WAIT, |b| {
        (b.count(&row) == 0).then_some(())
    });
    let gone = foreman
        .cli()
        .args(["status", &doomed, "--foreman", &foreman.http])
        .output()
        .unwrap();
    let why = String::from_utf8_lossy(&gone.stderr);
    assert!(why.contains("no job with id"), "{why}");

    // A read-only token is offered no cancel button, even for a running job.
    let reader = foreman.create_token(&["--kind", "client", "--role", "read"]);
    let running = submit_watchable_primes(&foreman, dir.path());
    let row = format!("#jobs tr[data-job=\"{running}\"]");
    let cancel = format!("{row} button[data-cancel]");
    browser.wait_for(
        "the running job's cancel button, for the admin",
        WAIT,
        |b| (b.count(&cancel) == 1).then_some(()),
    );
    browser.execute(
        "localStorage.setItem('wasmgrid-token', arguments[0]);",
        json!([reader]),
    );
    browser.goto(&format!("{}/", foreman.http));
    // Until the page knows who it is, it offers the button: its absence
    // with the row shown means the reader's role was read.
    browser.wait_for(
        "the running job without a cancel button, for the reader",
        WAIT,
        |b| {
            let state = b.text(&format!("{row} .state"))?;
            (state == "running" && b.count(&cancel) == 0).then_some(())
        },
    );
    println!(
        "a 100,000-task job's page showed its first {rows} tasks {:.0} ms after opening",
        shown_after.as_secs_f64() * 1e3
    );
    println!(
        "browser test took {:.1} s; screenshots in {}",
        started.elapsed().as_secs_f64(),
        artifacts().display()
    );
}
