//! Join and client tokens end to end: refused with the reason, revoked
//! workers cut off while others finish the job, REST calls without a good
//! token refused, and certificate rotation.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{assert_completes_with, cli_json, submit_slow_primes, wait_for_state};
use serde_json::Value;
use wasmgrid_tests::binary;
use wasmgrid_tests::processes::{start_foreman, Foreman, Running};

/// `foreman token create`, as the foreman's admin: the token string.
fn token_id(token: &str) -> String {
    token.split('_').nth(1).unwrap().to_owned()
}

fn revoke(foreman: &Foreman, token: &str) {
    let out = foreman
        .cli()
        .args([
            "token",
            "revoke",
            &token_id(token),
            "--foreman",
            &foreman.http,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn worker_args<'a>(foreman: &'a Foreman, token: &'a str, name: &'a str) -> Vec<&'a str> {
    vec![
        "--foreman",
        &foreman.quic,
        "--token",
        token,
        "--slots",
        "1",
        "--name",
        name,
        "--no-api",
    ]
}

/// Runs a worker that should be refused: its exit status and stderr.
fn refused_worker(foreman: &Foreman, token: &str, cache: &Path) -> Output {
    let mut child = Command::new(binary("worker"))
        .args(worker_args(foreman, token, "refused"))
        .arg("--cache-dir")
        .arg(cache)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A refusal ends the worker; one that keeps retrying fails the test.
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn assert_refused(out: &Output, reason: &str) {
    assert_eq!(out.status.code(), Some(2), "{}", stderr(out));
    assert!(
        stderr(out).contains(reason),
        "wanted {reason:?} in: {}",
        stderr(out)
    );
}

/// A worker whose stderr goes to `log`, to read after it exits.
fn logged_worker(foreman: &Foreman, token: &str, name: &str, dir: &Path) -> Running {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    Running(
        Command::new(binary("worker"))
            .args(worker_args(foreman, token, name))
            .arg("--cache-dir")
            .arg(dir.join(format!("cache-{name}")))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

fn online(foreman: &Foreman) -> Vec<String> {
    cli_json(&foreman.http, &["workers"])
        .as_array()
        .into_iter()
        .flatten()
        .filter(|w| w["online"] == true)
        .filter_map(|w| w["name"].as_str().map(str::to_owned))
        .collect()
}

fn wait_until(what: &str, secs: u64, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn wrong_expired_revoked_and_client_tokens_cannot_join_and_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let foreman = start_foreman(&dir.path().join("data"), &[]);
    let cache = dir.path().join("cache");
    let fingerprint = foreman.token.split_once(':').unwrap().1.to_owned();

    let expiring = foreman.create_token(&["--name", "short", "--expires", "+1s"]);
    let revoked = foreman.create_token(&["--name", "gone"]);
    revoke(&foreman, &revoked);
    let client = foreman.create_token(&["--kind", "client"]);
    let listed = foreman
        .cli()
        .args(["token", "list", "--foreman", &foreman.http])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&listed.stdout);
    assert!(
        table.contains("short") && table.contains(&fingerprint),
        "{table}"
    );
    for token in [&expiring, &revoked, &client] {
        let secret = token.split(':').next().unwrap();
        let secret = secret.rsplit('_').next().unwrap();
        assert!(!table.contains(secret), "a secret in the list: {table}");
    }

    let (id, secret) = foreman
        .token
        .split_once(':')
        .unwrap()
        .0
        .rsplit_once('_')
        .unwrap();
    let other = if secret.starts_with('0') { '1' } else { '0' };
    let wrong = format!("{id}_{other}{}:{fingerprint}", &secret[1..]);
    assert_refused(
        &refused_worker(&foreman, &wrong, &cache),
        "invalid join token",
    );
    assert_refused(
        &refused_worker(&foreman, &revoked, &cache),
        &format!("join token {} was revoked", token_id(&revoked)),
    );
    assert_refused(
        &refused_worker(&foreman, &format!("{client}:{fingerprint}"), &cache),
        &format!(
            "token {} is a client token, not a join token",
            token_id(&client)
        ),
    );
    std::thread::sleep(Duration::from_millis(1_200));
    assert_refused(
        &refused_worker(&foreman, &expiring, &cache),
        &format!("join token {} expired at 20", token_id(&expiring)),
    );
    assert!(online(&foreman).is_empty());
}

#[test]
fn revoking_a_token_cuts_off_its_worker_while_another_finishes_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let foreman = start_foreman(&dir.path().join("data"), &[]);
    let doomed_token = foreman.create_token(&["--name", "doomed"]);
    let kept_token = foreman.create_token(&["--name", "kept"]);
    let mut doomed = logged_worker(&foreman, &doomed_token, "doomed", dir.path());
    let _kept = logged_worker(&foreman, &kept_token, "kept", dir.path());
    wait_until("both workers online", 60, || online(&foreman).len() == 2);

    let (id, expected) = submit_slow_primes(&foreman, dir.path());
    wait_for_state(&foreman.http, &id, "running", 60);
    revoke(&foreman, &doomed_token);

    assert_eq!(
        exit_code(&mut doomed, 30, "the revoked worker kept running"),
        Some(2)
    );
    let log = std::fs::read_to_string(dir.path().join("doomed.log")).unwrap();
    assert!(
        log.contains(&format!(
            "join token {} was revoked",
            token_id(&doomed_token)
        )),
        "{log}"
    );
    wait_until("the revoked worker shown offline", 30, || {
        online(&foreman) == ["kept".to_owned()]
    });

    assert_completes_with(&foreman.http, &id, &expected, 180);
}

#[test]
fn a_worker_is_cut_off_when_its_token_expires() {
    let dir = tempfile::tempdir().unwrap();
    let foreman = start_foreman(&dir.path().join("data"), &[]);
    // Long enough to join (a worker benchmarks itself first), short enough to wait for.
    let token = foreman.create_token(&["--name", "brief", "--expires", "+10s"]);
    let mut worker = logged_worker(&foreman, &token, "brief", dir.path());
    wait_until("the worker online", 10, || {
        online(&foreman) == ["brief".to_owned()]
    });
    assert_eq!(
        exit_code(&mut worker, 30, "the worker outlived its token"),
        Some(2)
    );
    let log = std::fs::read_to_string(dir.path().join("brief.log")).unwrap();
    assert!(
        log.contains(&format!("join token {} expired at", token_id(&token))),
        "{log}"
    );
    wait_until("the worker shown offline", 30, || {
        online(&foreman).is_empty()
    });
}

#[test]
fn rest_calls_need_a_good_client_token() {
    let dir = tempfile::tempdir().unwrap();
    let foreman = start_foreman(&dir.path().join("data"), &[]);
    let no_token = |args: &[&str]| {
        Command::new(binary("foreman"))
            .args(args)
            .args(["--foreman", &foreman.http])
            .env_remove("WASMGRID_TOKEN")
            // No ./wasmgrid-data/client-token to fall back on here.
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let refused = no_token(&["token", "list"]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        stderr(&refused).contains("HTTP 401"),
        "{}",
        stderr(&refused)
    );
    assert!(stderr(&refused).contains("--token"), "{}", stderr(&refused));
    // Reads on loopback need none.
    assert!(no_token(&["jobs"]).status.success());

    let client = foreman.create_token(&["--kind", "client", "--name", "ci", "--role", "admin"]);
    let with = |token: &str, args: &[&str]| {
        Command::new(binary("foreman"))
            .args(args)
            .args(["--foreman", &foreman.http, "--token", token])
            .output()
            .unwrap()
    };
    let listed = with(&client, &["token", "list"]);
    assert!(listed.status.success(), "{}", stderr(&listed));
    assert!(
        String::from_utf8_lossy(&listed.stdout).contains("admin"),
        "{}",
        String::from_utf8_lossy(&listed.stdout)
    );
    // A read-only token is told what it may not do.
    let reader = foreman.create_token(&["--kind", "client", "--role", "read"]);
    let out = with(&reader, &["cancel", "1"]);
    assert!(
        stderr(&out).contains("has the read role: it may not change anything (HTTP 403"),
        "{}",
        stderr(&out)
    );
    let out = with(&reader, &["token", "list"]);
    assert!(
        stderr(&out).contains("needs an admin token"),
        "{}",
        stderr(&out)
    );
    revoke(&foreman, &client);
    let out = with(&client, &["token", "list"]);
    assert!(
        stderr(&out).contains(&format!(
            "client token {} was revoked (HTTP 401",
            token_id(&client)
        )),
        "{}",
        stderr(&out)
    );
    let out = with(&foreman.token, &["cancel", "1"]);
    assert!(
        stderr(&out).contains("is a worker token, not a client token")
            || stderr(&out).contains("is a join token, not a client token"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn after_a_certificate_rotation_the_old_fingerprint_is_refused_and_the_new_one_joins() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let foreman = start_foreman(&data, &[]);
    let old = foreman.token.clone();
    drop(foreman);

    let rotated = Command::new(binary("foreman"))
        .args(["cert", "rotate", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(rotated.status.success(), "{}", stderr(&rotated));
    let fingerprint = String::from_utf8_lossy(&rotated.stdout).trim().to_owned();
    assert_eq!(fingerprint.len(), 64);

    let foreman = start_foreman(&data, &[]);
    let (secret, old_fingerprint) = old.split_once(':').unwrap();
    assert_ne!(old_fingerprint, fingerprint);
    assert_eq!(foreman.token, format!("{secret}:{fingerprint}"));
    assert_refused(
        &refused_worker(&foreman, &old, &dir.path().join("cache")),
        "fingerprint mismatch",
    );
    let _worker = logged_worker(
        &foreman,
        &format!("{secret}:{fingerprint}"),
        "renewed",
        dir.path(),
    );
    wait_until("the worker with the new fingerprint online", 60, || {
        online(&foreman) == ["renewed".to_owned()]
    });
    let listed: Value = cli_json(&foreman.http, &["token", "list", "--json"]);
    assert_eq!(listed["fingerprint"], fingerprint.as_str());
}

/// The worker's exit code, once it exits; fails with `what` after `secs`.
fn exit_code(worker: &mut Running, secs: u64, what: &str) -> Option<i32> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(status) = worker.0.try_wait().unwrap() {
            return status.code();
        }
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
