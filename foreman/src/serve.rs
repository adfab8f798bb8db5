//! `foreman serve`: one process with the QUIC endpoint for workers, the REST
//! API, the store, and optionally workers of its own on this machine.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::api::{self, ApiState, OutputLimits, Security};
use crate::core::{Core, HealthPolicy};
use crate::driver::Driver;
use crate::identity;
use crate::model::Scheduler;
use crate::net::{self, NetContext};
use crate::store::Store;
use crate::tokens::Tokens;
use wasmgrid_jobspec::SubmitLimits;
use wasmgrid_worker::executor::{Executor, ExecutorOptions, SlotPriority};

pub struct ServeOptions {
    pub data_dir: PathBuf,
    pub quic: SocketAddr,
    pub http: SocketAddr,
    pub local_workers: u32,
    /// How the local workers' tasks share this machine.
    pub local_priority: SlotPriority,
    pub max_upload_bytes: usize,
    /// Caps on each job, whatever it asks.
    pub submit_limits: SubmitLimits,
    pub heartbeat_timeout: Duration,
    /// For jobs that name no scheduler.
    pub default_scheduler: Scheduler,
    /// Leases and cooldowns.
    pub health: HealthPolicy,
    /// Reads need a client token even on loopback (beyond it they always do).
    pub require_token_for_reads: bool,
    /// The one other origin whose pages may call the API (CORS); none by default.
    pub cors_origin: Option<String>,
    pub output_limits: OutputLimits,
    /// Finished jobs older than this are deleted; `None` keeps them all.
    pub retention: Option<Duration>,
}

pub async fn serve(options: ServeOptions) -> anyhow::Result<()> {
    let identity = identity::load_or_create(&options.data_dir)?;
    let db = options.data_dir.join("foreman.db");
    let store = tokio::task::spawn_blocking(move || Store::open(&db)).await??;
    let tokens = Arc::new(Tokens::new(store.clone()));
    let bootstrap = identity::bootstrap(&options.data_dir, &tokens, &identity.fingerprint)?;

    let mut core = Core::with_policy(store.next_attempt_id()?, options.health);
    let unfinished = store.unfinished_jobs()?;
    let resumed = unfinished.len();
    for job in unfinished {
        let args = job.args.iter().map(|a| Arc::from(a.as_str())).collect();
        let done = job
            .tasks
            .iter()
            .enumerate()
            .filter(|(_, (state, _))| state.is_finished())
            .map(|(i, (state, _))| (i as u32, *state))
            .collect();
        let attempts = job.tasks.iter().map(|(_, attempts)| *attempts).collect();
        core.restore_job(job.spec, args, done, attempts);
    }
    let driver = Driver::spawn(core, store.clone());
    if let Some(retention) = options.retention {
        tokio::spawn(crate::retention::sweep(store.clone(), retention));
    }
    if resumed > 0 {
        tracing::info!(jobs = resumed, "resumed unfinished jobs");
    }

    let endpoint = net::endpoint(&identity, options.quic)?;
    let quic_addr = endpoint.local_addr()?;
    tokio::spawn(net::accept(
        endpoint,
        Arc::new(NetContext {
            tokens: tokens.clone(),
            heartbeat_timeout: options.heartbeat_timeout,
            store: store.clone(),
            driver: driver.clone(),
            max_worker_frame: options.output_limits.max_worker_frame(),
        }),
    ));

    // It compiles and links modules but never instantiates one, so it needs
    // no instance pool (each pooled memory reserves gigabytes of address space).
    let validator = Arc::new(Executor::with_options(ExecutorOptions {
        cache_dir: Some(options.data_dir.join("validated-modules")),
        concurrency: 0,
        ..ExecutorOptions::default()
    })?);
    let app = api::router(Arc::new(ApiState {
        store: store.clone(),
        driver: driver.clone(),
        validator,
        max_upload_bytes: options.max_upload_bytes,
        submit_limits: options.submit_limits,
        validated: Default::default(),
        default_scheduler: options.default_scheduler,
        heartbeat_timeout: options.heartbeat_timeout,
        security: Security {
            tokens: tokens.clone(),
            fingerprint: identity.fingerprint.clone(),
            protect_reads: options.require_token_for_reads || !options.http.ip().is_loopback(),
            cors_origin: options
                .cors_origin
                .as_deref()
                .map(axum::http::HeaderValue::from_str)
                .transpose()
                .context("--cors-origin is not a valid header value")?,
        },
        output_limits: options.output_limits,
    }));
    let listener = tokio::net::TcpListener::bind(options.http)
        .await
        .with_context(|| format!("cannot listen on {}", options.http))?;
    let http_addr = listener.local_addr()?;

    let join_host = if quic_addr.ip().is_unspecified() {
        SocketAddr::new([127, 0, 0, 1].into(), quic_addr.port())
    } else {
        quic_addr
    };
    // Scripts read the lines in capitals; TOKEN is left out when the join token is unusable.
    let (join_with, token_line) = match &bootstrap.join {
        Ok(token) => (
            format!("worker --foreman {join_host} --token {token}"),
            format!("TOKEN {token}\n"),
        ),
        Err(why) => (
            format!("(none: {why}; make one with `foreman token create`)"),
            String::new(),
        ),
    };
    // The client token itself stays in its file: stdout often ends up in logs.
    let client = match &bootstrap.client {
        Ok(path) => format!(
            "in {} (give it to the CLI with --token or WASMGRID_TOKEN)",
            path.display()
        ),
        Err(why) => format!("(none: {why}; make one with `foreman token create --kind client`)"),
    };
    let needs = if !options.require_token_for_reads && options.http.ip().is_loopback() {
        "changes need a client token"
    } else {
        "every call needs a client token"
    };
    // The banner must not take the foreman down if nobody reads stdout any more.
    let banner = format!(
        "wasmgrid foreman\n  REST API:  http://{http_addr} ({needs})\n  workers:   {quic_addr}/udp (QUIC, certificate sha256 {})\n  join with: {join_with}\n  client token: {client}\nHTTP {http_addr}\nQUIC {join_host}\n{token_line}",
        identity.fingerprint,
    );
    {
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        let _ = stdout
            .write_all(banner.as_bytes())
            .and_then(|()| stdout.flush());
    }

    if options.local_workers > 0 {
        let token = bootstrap.join.as_ref().map_err(|why| {
            anyhow::anyhow!("--local-workers needs the bootstrap join token, but {why}")
        })?;
        tokio::spawn(supervise_local_workers(
            options.local_workers,
            options.local_priority,
            join_host,
            token.clone(),
            options.data_dir.join("local-worker-cache"),
        ));
    }
    // Replies are small and awaited: never hold one back for an ACK.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY: {error}");
        }
    });
    axum::serve(listener, app)
        .await
        .context("the REST API stopped")?;
    Ok(())
}

/// Starts `n` worker processes next to this binary, sharing this machine's
/// cores as their slots, and restarts any that exits.
async fn supervise_local_workers(
    n: u32,
    priority: SlotPriority,
    foreman: SocketAddr,
    token: String,
    cache_dir: PathBuf,
) {
    let Some(worker_bin) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("worker")))
    else {
        tracing::error!("cannot locate the worker binary next to the foreman");
        return;
    };
    // The machine's cores shared out, not each worker taking them all.
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get() as u32);
    let slots = (cores / n).max(1);
    for index in 0..n {
        let worker_bin = worker_bin.clone();
        let token = token.clone();
        let cache_dir = cache_dir.clone();
        tokio::spawn(async move {
            loop {
                let status = tokio::process::Command::new(&worker_bin)
                    .arg("--foreman")
                    .arg(foreman.to_string())
                    .arg("--token")
                    .arg(&token)
                    .arg("--name")
                    .arg(format!("local-{index}"))
                    .arg("--slots")
                    .arg(slots.to_string())
                    .arg("--cache-dir")
                    .arg(&cache_dir)
                    .arg("--priority")
                    .arg(priority.to_string())
                    .arg("--exit-with-parent")
                    // Several on one machine: port 8001 could serve only one of them.
                    .arg("--no-api")
                    .kill_on_drop(true)
                    .status()
                    .await;
                match status {
                    Ok(status) => tracing::warn!(index, %status, "local worker exited; restarting"),
                    Err(error) => {
                        tracing::error!(index, "cannot start {}: {error}", worker_bin.display())
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
}
