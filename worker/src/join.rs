//! Joining a foreman: QUIC with the foreman's certificate pinned by its
//! fingerprint, the version handshake, then tasks in and reports out, until
//! the foreman goes away for good or the worker drains and leaves.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use sha2::{Digest, Sha256};
use wasmgrid_protocol::stream::read_message;
use wasmgrid_protocol::wire::{
    encode_frame, Assignment, AttemptId, FetchModule, Finished, FrameDecoder, ModuleReply,
    Preamble, ToForeman, ToWorker, WorkerInfo, PROTOCOL_VERSION,
};
use wasmgrid_protocol::TaskReport;

use crate::attempts::Attempts;
use crate::credit::CreditWindow;
use crate::drain::{Drain, Expired, Terminate};
use crate::executor::{Executor, ExecutorOptions, ModuleId, SlotPool, SlotPriority, Tracking};
use crate::outgoing::{self, Outgoing};
use crate::status::{Connection, StaticInfo, Status};
pub use crate::tls::client_config;
use crate::tls::pinned_client_config;

/// The name in the foreman's certificate.
pub const SERVER_NAME: &str = "wasmgrid-foreman";
/// How long a silent foreman is given before the worker reconnects.
pub(crate) const FOREMAN_SILENCE: Duration = Duration::from_secs(5);
/// How long a closed connection may take to tell the foreman.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// The wasmtime this worker embeds (pinned in the workspace manifest).
const WASMTIME_VERSION: &str = "48.0.8";

pub struct JoinOptions {
    pub foreman: SocketAddr,
    /// `<secret>:<certificate sha256>` as printed by `foreman serve`.
    pub token: String,
    pub slots: u32,
    pub name: String,
    pub cache_dir: Option<std::path::PathBuf>,
    /// What the compiled modules in `cache_dir` may take.
    pub cache_max_bytes: u64,
    /// Cap on each slot's CPU time, in percent (100: none).
    pub cpu_limit_percent: u32,
    /// On SIGTERM, how long running tasks get to finish before they are cancelled.
    pub drain_grace: Duration,
    /// Where the status API listens (`None`: no API).
    pub api: Option<SocketAddr>,
    /// The scheduling priority tasks run at on this machine.
    pub priority: SlotPriority,
}

/// Serves the foreman until it goes away for good (reconnecting with
/// backoff), or until this worker drains and leaves (`Ok`).
///
/// SIGTERM drains (a second one, or one while not connected, leaves at once);
/// so does a `Drain` from the foreman. A restart asked for through the
/// status API drops the connection and joins again without waiting.
pub async fn run(options: JoinOptions) -> anyhow::Result<()> {
    let (secret, fingerprint) = options
        .token
        .split_once(':')
        .context("the token must look like wgw_ID_SECRET:FINGERPRINT (as printed by `foreman serve` or `foreman token create`)")?;
    let mut terminate = Terminate::install();
    let executor = Arc::new(Executor::with_options(ExecutorOptions {
        cache_dir: options.cache_dir.clone(),
        cache_max_bytes: options.cache_max_bytes,
        concurrency: options.slots,
        cpu_limit_percent: options.cpu_limit_percent,
        ..ExecutorOptions::default()
    })?);
    tracing::info!(
        "overrunning tasks are stopped by {}",
        executor.interruption()
    );
    let pool = Arc::new(SlotPool::with_priority(
        executor.clone(),
        options.slots as usize,
        options.priority,
    )?);
    if options.priority != SlotPriority::Normal {
        tracing::info!("tasks run at {} priority", options.priority);
    }
    let status = Status::new(StaticInfo {
        name: options.name.clone(),
        foreman: options.foreman,
        slots: options.slots,
        cpu_limit_percent: executor.cpu_limit_percent(),
    });
    if let Some(addr) = options.api {
        if let Some(bound) = crate::api::spawn(status.clone(), addr).await {
            announce_api(bound);
        }
    }
    let benchmark = {
        let (executor, priority) = (executor.clone(), options.priority);
        let (measured, benchmark) = tokio::sync::oneshot::channel();
        // On a thread of its own at the slots' priority: it bothers the
        // machine's owner no more than tasks will, and a lowered priority
        // could not be raised again on a shared blocking thread.
        std::thread::Builder::new()
            .name("wasmgrid-bench".into())
            .spawn(move || {
                if let Err(error) = crate::executor::apply_to_this_thread(priority) {
                    tracing::warn!("benchmarking at normal priority, not {priority}: {error}");
                }
                let _ = measured.send(crate::benchmark::fuel_per_sec(&executor));
            })?;
        benchmark
    };
    let benchmark = tokio::select! {
        benchmark = benchmark => benchmark
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the benchmark thread stopped"))),
        _ = terminate.recv() => return left_at_once("before joining"),
    };
    let benchmark_fuel_per_sec = benchmark.unwrap_or_else(|error| {
        tracing::warn!("the benchmark failed: {error:#}");
        0
    });
    tracing::info!(
        fuel_per_sec = benchmark_fuel_per_sec,
        cpu_limit_percent = executor.cpu_limit_percent(),
        "benchmarked one slot"
    );
    let info = worker_info(&options, &executor, benchmark_fuel_per_sec);
    const FIRST_BACKOFF: Duration = Duration::from_millis(200);
    let mut backoff = FIRST_BACKOFF;
    loop {
        let started = std::time::Instant::now();
        status.set_connection(Connection::Connecting);
        let joined = tokio::select! {
            joined = join(&options, &info, secret, fingerprint, &status) => joined,
            _ = terminate.recv() => return left_at_once("while joining"),
            _ = status.restart_requested() => {
                tracing::info!("restarting: joining again");
                backoff = FIRST_BACKOFF;
                continue;
            }
        };
        let session = Session {
            options: &options,
            executor: &executor,
            pool: &pool,
            status: &status,
        };
        let result = match joined {
            Ok(joined) => serve(joined, session, &mut terminate).await,
            Err(error) => Err(error),
        };
        status.set_connection(Connection::Disconnected);
        match &result {
            Ok(Ended::Drained) => {
                tracing::info!("drained: leaving the foreman");
                return Ok(());
            }
            Ok(Ended::Terminated) => return left_at_once("again while draining"),
            Ok(Ended::Restart) => {
                tracing::info!("restarting: dropped the connection, joining again");
                backoff = FIRST_BACKOFF;
                continue;
            }
            Ok(Ended::Lost) => {}
            Err(error) => {
                tracing::warn!("{error:#}");
                if error.downcast_ref::<Refused>().is_some() {
                    return result.map(|_| ());
                }
            }
        }
        // A session that lasted was a success: a new outage starts with a short wait.
        if result.is_ok() || started.elapsed() > Duration::from_secs(10) {
            backoff = FIRST_BACKOFF;
        }
        let jitter = Duration::from_millis(u64::from(rand_jitter()) % 200);
        tokio::select! {
            _ = tokio::time::sleep(backoff + jitter) => {}
            _ = terminate.recv() => return left_at_once("while not connected"),
            _ = status.restart_requested() => {
                tracing::info!("restarting: joining again without waiting");
                backoff = FIRST_BACKOFF;
                continue;
            }
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// Tells scripts (and people) where the API ended up, which matters with port 0.
fn announce_api(bound: SocketAddr) {
    use std::io::Write;
    // Not `println!`: a closed stdout must not take the worker down.
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "API http://{bound}").and_then(|()| stdout.flush());
}

fn left_at_once(when: &str) -> anyhow::Result<()> {
    tracing::info!("SIGTERM {when}: leaving at once");
    Ok(())
}

fn rand_jitter() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
}

/// The foreman said no (token, version): retrying will not help.
#[derive(Debug, thiserror::Error)]
#[error("the foreman refused this worker: {0}")]
struct Refused(String);

/// How a session that did not fail ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// The foreman closed the stream: reconnect.
    Lost,
    /// Drained and closed cleanly: leave.
    Drained,
    /// A second SIGTERM while draining: leave now.
    Terminated,
    /// Asked through the status API: drop the connection and join again.
    Restart,
}

/// What a session works with, beyond its connection.
#[derive(Clone, Copy)]
struct Session<'a> {
    options: &'a JoinOptions,
    executor: &'a Arc<Executor>,
    pool: &'a Arc<SlotPool>,
    status: &'a Arc<Status>,
}

/// A connection past the handshake and the foreman's welcome.
struct Joined {
    endpoint: quinn::Endpoint,
    connection: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
    heartbeat: Duration,
}

async fn join(
    options: &JoinOptions,
    info: &WorkerInfo,
    secret: &str,
    fingerprint: &str,
    status: &Status,
) -> anyhow::Result<Joined> {
    let endpoint = quinn::Endpoint::client(SocketAddr::new([0, 0, 0, 0].into(), 0))?;
    let (config, mismatch) = pinned_client_config(fingerprint)?;
    let connecting = endpoint.connect_with(config, options.foreman, SERVER_NAME)?;
    let connected = tokio::time::timeout(FOREMAN_SILENCE, connecting)
        .await
        .map_err(|_| anyhow::anyhow!("the foreman at {} did not answer", options.foreman))?;
    let seen = mismatch.lock().ok().and_then(|mut seen| seen.take());
    if let Some(seen) = seen {
        // Another certificate will not turn into the pinned one by retrying.
        return Err(Refused(format!(
            "the certificate of the foreman at {} has sha256 {seen}, but the token pins {fingerprint} \
             (fingerprint mismatch: if the foreman's certificate was rotated, use the token's \
             secret with the new fingerprint, or a new token)",
            options.foreman
        ))
        .into());
    }
    let connection = connected
        .with_context(|| format!("cannot connect to the foreman at {}", options.foreman))?;
    let (mut send, mut recv) = connection.open_bi().await?;
    send.write_all(&Preamble::ours().encode()).await?;
    let mut preamble = [0u8; Preamble::LEN];
    if let Err(error) = recv.read_exact(&mut preamble).await {
        return Err(
            refusal(&connection).unwrap_or_else(|| anyhow::anyhow!("handshake failed: {error}"))
        );
    }
    let theirs = Preamble::decode(&preamble)?;
    if theirs.version != PROTOCOL_VERSION {
        return Err(Refused(format!(
            "incompatible protocol: the foreman speaks version {}, this worker speaks version {PROTOCOL_VERSION}",
            theirs.version
        ))
        .into());
    }
    send.write_all(&encode_frame(&ToForeman::Hello {
        token: secret.to_owned(),
        info: info.clone(),
    })?)
    .await?;
    let mut decoder = FrameDecoder::new();
    let (worker_id, heartbeat) = match read_message(&mut recv, &mut decoder).await {
        Ok(Some(ToWorker::Welcome {
            worker_id,
            heartbeat_ms,
        })) => (worker_id, Duration::from_millis(heartbeat_ms.max(10))),
        Ok(_) => bail!("the foreman did not welcome this worker"),
        Err(error) => return Err(refusal(&connection).unwrap_or(error)),
    };
    tracing::info!(worker_id, foreman = %options.foreman, "joined");
    status.joined(worker_id);
    Ok(Joined {
        endpoint,
        connection,
        send,
        recv,
        decoder,
        heartbeat,
    })
}

/// Runs tasks for the foreman until it goes away, or this worker drains.
async fn serve(
    joined: Joined,
    session: Session<'_>,
    terminate: &mut Terminate,
) -> anyhow::Result<Ended> {
    let Session {
        options,
        pool,
        status,
        ..
    } = session;
    let Joined {
        endpoint,
        connection,
        mut send,
        mut recv,
        mut decoder,
        heartbeat,
    } = joined;
    let window = CreditWindow::new(options.slots);
    send.write_all(&encode_frame(&ToForeman::Credit(window.granted()))?)
        .await?;
    let (out, writer) = outgoing::spawn(send, window, heartbeat, pool.clone());
    let attempts = Attempts::new();
    let mut drain: Option<Drain> = None;

    let result = async {
        loop {
            if drain.is_some() && attempts.is_empty() {
                return Ok(Ended::Drained);
            }
            // Far enough to never fire, near enough to be a valid instant.
            let deadline = drain.as_ref().map_or_else(
                || tokio::time::Instant::now() + Duration::from_secs(3600),
                Drain::deadline,
            );
            tokio::select! {
                message = read_message(&mut recv, &mut decoder) => match message? {
                    None => return Ok(Ended::Lost),
                    Some(ToWorker::Run(assignments)) if drain.is_some() => {
                        // Sent before the foreman heard that this worker drains.
                        let ids = assignments.iter().map(|a| a.attempt).collect();
                        out.send(Outgoing::Message(ToForeman::Returned(ids)));
                    }
                    Some(ToWorker::Run(assignments)) => {
                        run_batch(&connection, session, assignments, &out, &attempts).await?
                    }
                    Some(ToWorker::Cancel(ids)) => attempts.cancel(&ids),
                    Some(ToWorker::Backlog(waiting)) => out.set_backlog(waiting),
                    Some(ToWorker::GiveBack {
                        attempts: asked,
                        believed_unstarted,
                    }) => {
                        let ids = attempts.give_back(&asked, believed_unstarted);
                        tracing::debug!(
                            ?asked,
                            believed_unstarted,
                            handed_back = ?ids,
                            "the foreman asked for tasks back"
                        );
                        if !ids.is_empty() {
                            out.send(Outgoing::Message(ToForeman::Returned(ids)));
                        }
                    }
                    Some(ToWorker::Drain { grace_ms }) => {
                        let grace = Duration::from_millis(grace_ms);
                        match &mut drain {
                            Some(drain) => drain.shorten(grace),
                            None => {
                                status.set_connection(Connection::Draining);
                                drain = Some(Drain::start(grace, &attempts, &out));
                            }
                        }
                    }
                    Some(ToWorker::Welcome { .. }) => bail!("a second welcome"),
                },
                _ = terminate.recv() => match drain {
                    Some(_) => return Ok(Ended::Terminated),
                    None => {
                        tracing::info!("SIGTERM: draining (a second SIGTERM leaves at once)");
                        status.set_connection(Connection::Draining);
                        drain = Some(Drain::start(options.drain_grace, &attempts, &out));
                    }
                },
                _ = tokio::time::sleep_until(deadline), if drain.is_some() => {
                    if let Some(drain) = &mut drain {
                        if drain.expired(&attempts) == Expired::GiveUp {
                            tracing::warn!(
                                running = attempts.len(),
                                "cancelled tasks did not stop in time: leaving without their reports"
                            );
                            return Ok(Ended::Drained);
                        }
                    }
                }
                _ = attempts.one_left(), if drain.is_some() => {}
                // A drain under way is finished rather than dropped.
                _ = status.restart_requested(), if drain.is_none() => return Ok(Ended::Restart),
            }
        }
    }
    .await;

    match result {
        Ok(Ended::Drained) => {
            // Every report is queued before its attempt leaves `attempts`:
            // flush them, finish the stream, then close.
            out.send(Outgoing::Finish);
            match tokio::time::timeout(FOREMAN_SILENCE, writer).await {
                Ok(Ok(Err(error))) => tracing::warn!("sending the last reports: {error:#}"),
                Ok(_) => {}
                Err(_) => tracing::warn!("the last reports were not sent in time"),
            }
            attempts.abandon();
            connection.close(0u32.into(), b"drained");
            let _ = tokio::time::timeout(CLOSE_WAIT, endpoint.wait_idle()).await;
            Ok(Ended::Drained)
        }
        other => {
            // Nobody will take these reports: stop the work rather than finish it.
            attempts.abandon();
            writer.abort();
            let reason: Option<&[u8]> = match &other {
                Ok(Ended::Terminated) => Some(b"terminated"),
                Ok(Ended::Restart) => Some(b"restarting"),
                _ => None,
            };
            if let Some(reason) = reason {
                // Tell the foreman now rather than let it wait for a timeout.
                connection.close(0u32.into(), reason);
                let _ = tokio::time::timeout(CLOSE_WAIT, endpoint.wait_idle()).await;
            }
            other.map_err(|error: anyhow::Error| refusal(&connection).unwrap_or(error))
        }
    }
}

fn refusal(connection: &quinn::Connection) -> Option<anyhow::Error> {
    match connection.close_reason()? {
        quinn::ConnectionError::ApplicationClosed(close) => {
            Some(Refused(String::from_utf8_lossy(&close.reason).into_owned()).into())
        }
        other => Some(anyhow::anyhow!("connection lost: {other}")),
    }
}

async fn run_batch(
    connection: &quinn::Connection,
    session: Session<'_>,
    assignments: Vec<Assignment>,
    out: &outgoing::Sender,
    attempts: &Attempts,
) -> anyhow::Result<()> {
    let Session {
        executor,
        pool,
        status,
        ..
    } = session;
    // Idleness before this work is no news to the foreman.
    pool.forget_idle();
    for assignment in assignments {
        let attempt = assignment.attempt;
        let module = assignment.module;
        // The protocol names no job or task here: the attempt id (which the
        // foreman's records map to both) and the module identify the work.
        tracing::debug!(attempt, module = %hex::encode(module), "task received");
        let id = ModuleId(module);
        let (task, load) = match executor.load_cached(id) {
            Some(cached) => cached,
            None => {
                let wasm = fetch_module(connection, module).await?;
                status.module_fetched();
                let executor = executor.clone();
                match tokio::task::spawn_blocking(move || executor.load(&wasm)).await? {
                    Ok(loaded) => loaded,
                    Err(failure) => {
                        let report = crate::exec::failed_report(failure);
                        log_finished(attempt, &module, &report);
                        status.finished(attempt, &report);
                        out.send(Outgoing::Finished(Finished { attempt, report }));
                        continue;
                    }
                }
            }
        };
        let (cancel, state) = attempts.add(attempt);
        let out = out.clone();
        let attempts = attempts.clone();
        let mine = state.clone();
        let on_start = {
            let status = status.clone();
            Box::new(move || {
                tracing::debug!(attempt, module = %hex::encode(module), "task started");
                status.started(attempt);
            })
        };
        let status = status.clone();
        pool.submit_tracked(
            task,
            load,
            assignment.args,
            assignment.limits,
            Tracking {
                cancel,
                state,
                on_start: Some(on_start),
            },
            move |report| {
                log_finished(attempt, &module, &report);
                status.finished(attempt, &report);
                // Queue the report before the attempt leaves: once none is
                // left, a draining session flushes and closes.
                out.send(Outgoing::Finished(Finished { attempt, report }));
                attempts.finished(attempt, &mine);
            },
        );
    }
    Ok(())
}

/// Successes at debug (there may be thousands a second), failures at info.
fn log_finished(attempt: AttemptId, module: &[u8; 32], report: &TaskReport) {
    let run_us = report.timings.run_us;
    let fuel = report.fuel_used;
    match &report.outcome {
        Ok(_) => tracing::debug!(
            attempt,
            module = %hex::encode(module),
            outcome = "ok",
            run_us,
            fuel,
            "task finished"
        ),
        Err(failure) => tracing::info!(
            attempt,
            module = %hex::encode(module),
            outcome = failure.kind.as_str(),
            run_us,
            fuel,
            message = %first_line(&failure.message),
            "task failed"
        ),
    }
}

/// A trap's message carries a whole backtrace; one line is enough for a log.
fn first_line(message: &str) -> &str {
    message.lines().next().unwrap_or("")
}

async fn fetch_module(connection: &quinn::Connection, hash: [u8; 32]) -> anyhow::Result<Vec<u8>> {
    let (mut send, mut recv) = connection.open_bi().await?;
    send.write_all(&encode_frame(&FetchModule(hash))?).await?;
    send.finish()?;
    let bytes = recv
        .read_to_end(wasmgrid_protocol::wire::MAX_FRAME_BYTES + 4)
        .await
        .context("fetching a module")?;
    let mut decoder = FrameDecoder::new();
    decoder.push(&bytes);
    match decoder.next_message()? {
        Some(ModuleReply::Found(wasm)) => {
            if Sha256::digest(&wasm).as_slice() != hash {
                bail!("the foreman sent a module whose sha256 does not match");
            }
            Ok(wasm)
        }
        _ => bail!("the foreman does not have module {}", hex::encode(hash)),
    }
}

fn worker_info(
    options: &JoinOptions,
    executor: &Executor,
    benchmark_fuel_per_sec: u64,
) -> WorkerInfo {
    WorkerInfo {
        name: options.name.clone(),
        hostname: std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into()),
        os: std::env::consts::OS.into(),
        arch: std::env::consts::ARCH.into(),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        memory_bytes: crate::sysinfo::total_memory(),
        slots: options.slots,
        wasmtime_version: WASMTIME_VERSION.into(),
        engine_hash: executor.engine_hash().into(),
        cpu_model: crate::sysinfo::cpu_model(),
        benchmark_fuel_per_sec,
        cpu_limit_percent: executor.cpu_limit_percent(),
        priority: options.priority,
    }
}
