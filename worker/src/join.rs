//! Joining a foreman: QUIC with the foreman's certificate pinned by its
//! fingerprint, the version handshake, then tasks in and reports out.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use wasmgrid_protocol::stream::read_message;
use wasmgrid_protocol::wire::{
    encode_frame, Assignment, AttemptId, FetchModule, Finished, FrameDecoder, ModuleReply,
    Preamble, ToForeman, ToWorker, WorkerInfo, ALPN_ANY_VERSION, ALPN_VERSIONED, PROTOCOL_VERSION,
};

use crate::executor::{CancelFlag, Executor, ExecutorOptions, ModuleId, SlotPool};

/// Attempts queued or running here, with the flag that stops each.
type Cancels = Arc<std::sync::Mutex<std::collections::HashMap<AttemptId, CancelFlag>>>;

/// The name in the foreman's certificate.
pub const SERVER_NAME: &str = "wasmgrid-foreman";
/// Queued work to hold per slot, measured in time: enough that tiny tasks are
/// not bound by round trips, little enough that long ones are not hoarded.
const PIPE_TARGET_US: f64 = 2_000.0;
const MIN_PREFETCH_PER_SLOT: u32 = 2;
const MAX_PREFETCH_PER_SLOT: u32 = 512;
/// How long a silent foreman is given before the worker reconnects.
const FOREMAN_SILENCE: Duration = Duration::from_secs(5);
/// The wasmtime this worker embeds (pinned in the workspace manifest).
const WASMTIME_VERSION: &str = "48.0.8";

pub struct JoinOptions {
    pub foreman: SocketAddr,
    /// `<secret>:<certificate sha256>` as printed by `foreman serve`.
    pub token: String,
    pub slots: u32,
    pub name: String,
    pub cache_dir: Option<std::path::PathBuf>,
    /// Cap on each slot's CPU time, in percent (100: none).
    pub cpu_limit_percent: u32,
}

/// Serves the foreman until it goes away for good; reconnects with backoff.
pub async fn run(options: JoinOptions) -> anyhow::Result<()> {
    let (secret, fingerprint) = options
        .token
        .split_once(':')
        .context("the token must look like SECRET:FINGERPRINT (as printed by `foreman serve`)")?;
    let executor = Arc::new(Executor::with_options(ExecutorOptions {
        cache_dir: options.cache_dir.clone(),
        concurrency: options.slots,
        cpu_limit_percent: options.cpu_limit_percent,
        ..ExecutorOptions::default()
    })?);
    let pool = Arc::new(SlotPool::new(executor.clone(), options.slots as usize)?);
    let benchmark = {
        let executor = executor.clone();
        tokio::task::spawn_blocking(move || crate::benchmark::fuel_per_sec(&executor)).await?
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
        let result = session(&options, &info, secret, fingerprint, &executor, &pool).await;
        if let Err(error) = result.as_ref() {
            tracing::warn!("{error:#}");
            if error.downcast_ref::<Refused>().is_some() {
                return result;
            }
        }
        // A session that lasted was a success: a new outage starts with a short wait.
        if result.is_ok() || started.elapsed() > Duration::from_secs(10) {
            backoff = FIRST_BACKOFF;
        }
        let jitter = Duration::from_millis(u64::from(rand_jitter()) % 200);
        tokio::time::sleep(backoff + jitter).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
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

async fn session(
    options: &JoinOptions,
    info: &WorkerInfo,
    secret: &str,
    fingerprint: &str,
    executor: &Arc<Executor>,
    pool: &Arc<SlotPool>,
) -> anyhow::Result<()> {
    let endpoint = quinn::Endpoint::client(SocketAddr::new([0, 0, 0, 0].into(), 0))?;
    let connecting =
        endpoint.connect_with(client_config(fingerprint)?, options.foreman, SERVER_NAME)?;
    let connection = tokio::time::timeout(FOREMAN_SILENCE, connecting)
        .await
        .map_err(|_| anyhow::anyhow!("the foreman at {} did not answer", options.foreman))?
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
    let mut window = CreditWindow::new(options.slots);
    send.write_all(&encode_frame(&ToForeman::Credit(window.granted))?)
        .await?;

    let (reports_tx, mut reports_rx) = mpsc::unbounded_channel::<Finished>();
    // Reports, batched: whatever finished while the last batch was being sent goes in the next.
    let writer = tokio::spawn(async move {
        let mut heartbeat = tokio::time::interval(heartbeat);
        loop {
            let message = tokio::select! {
                first = reports_rx.recv() => {
                    let Some(first) = first else { break };
                    let mut batch = vec![first];
                    while let Ok(next) = reports_rx.try_recv() {
                        batch.push(next);
                    }
                    for finished in &batch {
                        let timings = finished.report.timings;
                        window.observe(timings.instantiate_us + timings.run_us);
                    }
                    ToForeman::Finished(batch)
                }
                _ = heartbeat.tick() => ToForeman::Heartbeat(Default::default()),
            };
            let mut bytes = encode_frame(&message)?;
            if let Some(extra) = window.grow() {
                bytes.extend(encode_frame(&ToForeman::Credit(extra))?);
            }
            send.write_all(&bytes).await?;
        }
        anyhow::Ok(())
    });

    let cancels = Cancels::default();
    let result = async {
        loop {
            match read_message(&mut recv, &mut decoder).await? {
                None => return Ok(()),
                Some(ToWorker::Run(assignments)) => {
                    run_batch(
                        &connection,
                        executor,
                        pool,
                        assignments,
                        &reports_tx,
                        &cancels,
                    )
                    .await?
                }
                Some(ToWorker::Cancel(attempts)) => {
                    let cancels = cancels.lock().unwrap_or_else(|p| p.into_inner());
                    for attempt in attempts {
                        if let Some(flag) = cancels.get(&attempt) {
                            flag.store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                }
                Some(ToWorker::Welcome { .. }) => bail!("a second welcome"),
                Some(ToWorker::Drain { .. }) => {}
            }
        }
    }
    .await;
    writer.abort();
    result.map_err(|error: anyhow::Error| refusal(&connection).unwrap_or(error))
}

/// The credit this worker has granted, grown as it learns how long tasks take.
struct CreditWindow {
    slots: u32,
    granted: u32,
    /// Moving average of a task's instantiate + run time.
    task_us: f64,
}

impl CreditWindow {
    fn new(slots: u32) -> Self {
        CreditWindow {
            slots,
            granted: slots * (1 + MIN_PREFETCH_PER_SLOT),
            task_us: PIPE_TARGET_US / f64::from(MIN_PREFETCH_PER_SLOT),
        }
    }

    fn observe(&mut self, micros: u64) {
        self.task_us = 0.9 * self.task_us + 0.1 * (micros.max(1) as f64);
    }

    /// More credit to grant, when tasks turned out shorter than assumed.
    /// Credit is never taken back: each report returns its own.
    fn grow(&mut self) -> Option<u32> {
        let per_slot = (PIPE_TARGET_US / self.task_us).ceil() as u32;
        let per_slot = per_slot.clamp(MIN_PREFETCH_PER_SLOT, MAX_PREFETCH_PER_SLOT);
        let wanted = self.slots * (1 + per_slot);
        (wanted > self.granted).then(|| {
            let extra = wanted - self.granted;
            self.granted = wanted;
            extra
        })
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
    executor: &Arc<Executor>,
    pool: &Arc<SlotPool>,
    assignments: Vec<Assignment>,
    reports: &mpsc::UnboundedSender<Finished>,
    cancels: &Cancels,
) -> anyhow::Result<()> {
    for assignment in assignments {
        let id = ModuleId(assignment.module);
        let (task, load) = match executor.load_cached(id) {
            Some(cached) => cached,
            None => {
                let wasm = fetch_module(connection, assignment.module).await?;
                let executor = executor.clone();
                match tokio::task::spawn_blocking(move || executor.load(&wasm)).await? {
                    Ok(loaded) => loaded,
                    Err(failure) => {
                        let _ = reports.send(Finished {
                            attempt: assignment.attempt,
                            report: crate::exec::failed_report(failure),
                        });
                        continue;
                    }
                }
            }
        };
        let reports = reports.clone();
        let attempt = assignment.attempt;
        let flag = CancelFlag::default();
        cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(attempt, flag.clone());
        let cancels = cancels.clone();
        let limits = assignment.limits;
        pool.submit_cancellable(
            task,
            load,
            assignment.args,
            limits,
            Some(flag),
            move |report| {
                cancels
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&attempt);
                let _ = reports.send(Finished { attempt, report });
            },
        );
    }
    Ok(())
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credit_grows_for_tiny_tasks_and_stays_small_for_long_ones() {
        let mut long = CreditWindow::new(2);
        for _ in 0..100 {
            long.observe(2_000_000);
        }
        assert_eq!(long.grow(), None);
        assert_eq!(long.granted, 6);

        let mut tiny = CreditWindow::new(2);
        for _ in 0..200 {
            tiny.observe(1);
        }
        assert_eq!(tiny.grow(), Some(2 * (1 + MAX_PREFETCH_PER_SLOT) - 6));
        assert_eq!(tiny.grow(), None);
    }
}

/// QUIC client settings that trust only the certificate with this sha256 (hex).
pub fn client_config(fingerprint: &str) -> anyhow::Result<quinn::ClientConfig> {
    let pinned = hex::decode(fingerprint)
        .ok()
        .filter(|b| b.len() == 32)
        .context("the token's fingerprint is not 64 hex digits")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCertificate { pinned, provider }))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN_VERSIONED.to_vec(), ALPN_ANY_VERSION.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    // Notice a foreman that vanished without closing (killed, unplugged)
    // within seconds, so the reconnect loop can find its successor.
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(FOREMAN_SILENCE.try_into()?))
        .keep_alive_interval(Some(FOREMAN_SILENCE / 5));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Trusts exactly one certificate, by its sha256: no CA, no trust on first use.
#[derive(Debug)]
struct PinnedCertificate {
    pinned: Vec<u8>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for PinnedCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if Sha256::digest(end_entity.as_ref()).as_slice() == self.pinned.as_slice() {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the foreman's certificate does not match the fingerprint in the token".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
