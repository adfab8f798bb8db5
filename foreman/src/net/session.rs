//! One worker's connection: handshake, registration, then tasks out,
//! reports in, and module fetches on their own streams.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use wasmgrid_protocol::stream::read_message;
use wasmgrid_protocol::wire::{
    encode_frame, FetchModule, FrameDecoder, ModuleReply, Preamble, ToForeman, ToWorker, MAX_SLOTS,
    PROTOCOL_VERSION,
};

use super::budget::MessageBudget;
use super::{close, NetContext};
use crate::core::WorkerSpec;
use crate::driver::{Input, WorkerLink};
use crate::store::{TokenKind, WorkerRow};
use crate::tokens::Refusal;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest frame before the hello is accepted (the hello is small).
const MAX_HELLO_FRAME: usize = 64 * 1024;
/// A module request is one small frame, sent at once.
const MODULE_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn run(incoming: quinn::Incoming, ctx: Arc<NetContext>) -> anyhow::Result<()> {
    let connection = incoming.await.context("QUIC handshake failed")?;
    let result = serve(&connection, ctx).await;
    if let Err(error) = &result {
        // Tell the peer why; a close already sent with a better reason wins.
        let code = if error.downcast_ref::<Violation>().is_some() {
            close::PROTOCOL_VIOLATION
        } else {
            close::PROTOCOL_ERROR
        };
        connection.close(code.into(), format!("{error:#}").as_bytes());
    }
    result
}

async fn serve(connection: &quinn::Connection, ctx: Arc<NetContext>) -> anyhow::Result<()> {
    let (mut send, mut recv) = tokio::time::timeout(HANDSHAKE_TIMEOUT, connection.accept_bi())
        .await
        .context("the worker opened no stream")??;

    let mut preamble = [0u8; Preamble::LEN];
    tokio::time::timeout(HANDSHAKE_TIMEOUT, recv.read_exact(&mut preamble))
        .await
        .context("the worker sent no preamble")??;
    let peer = match Preamble::decode(&preamble) {
        Ok(peer) => peer,
        Err(error) => {
            connection.close(close::NOT_WASMGRID.into(), error.to_string().as_bytes());
            bail!("{error}");
        }
    };
    send.write_all(&Preamble::ours().encode()).await?;
    if peer.version != PROTOCOL_VERSION {
        let reason = format!(
            "incompatible protocol: the foreman speaks version {PROTOCOL_VERSION}, the worker speaks version {}",
            peer.version
        );
        connection.close(close::INCOMPATIBLE_VERSION.into(), reason.as_bytes());
        bail!("{reason}");
    }

    let mut decoder = FrameDecoder::with_limit(MAX_HELLO_FRAME);
    let hello = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_message(&mut recv, &mut decoder))
        .await
        .context("the worker sent no hello")??;
    let Some(ToForeman::Hello { token, info }) = hello else {
        connection.close(close::PROTOCOL_ERROR.into(), b"expected hello");
        bail!("the worker did not start with hello");
    };
    // Held before the check, so a revoke racing with this join still reaches it.
    let _held =
        crate::tokens::parse(&token).map(|(_, id, _)| ctx.tokens.hold(id, connection.clone()));
    let checker = ctx.tokens.clone();
    let checked =
        tokio::task::spawn_blocking(move || checker.check(&token, TokenKind::Worker)).await??;
    let token = match checked {
        Ok(token) => token,
        Err(refusal) => {
            connection.close(close::BAD_TOKEN.into(), refusal.to_string().as_bytes());
            bail!(
                "refused worker {} ({}): {refusal}",
                info.name,
                info.hostname
            );
        }
    };
    let _expiry = token.expires_at_ms.map(|at| {
        let connection = connection.clone();
        let reason = Refusal::Expired {
            what: "join",
            id: token.id,
            at: crate::tokens::rfc3339(at),
        }
        .to_string();
        AbortOnDrop(tokio::spawn(async move {
            let left = at.saturating_sub(crate::tokens::now_ms());
            tokio::time::sleep(Duration::from_millis(left)).await;
            connection.close(close::BAD_TOKEN.into(), reason.as_bytes());
        }))
    });
    if let Err(reason) = check_slots(info.slots) {
        connection.close(close::PROTOCOL_ERROR.into(), reason.as_bytes());
        bail!("refused worker {}: {reason}", info.name);
    }
    decoder.set_limit(ctx.max_worker_frame);
    let store = ctx.store.clone();
    let row = WorkerRow::joining(&info);
    let token_id = token.id;
    let worker =
        tokio::task::spawn_blocking(move || store.register_worker(&row, Some(token_id))).await??;
    // Three heartbeats fit in the timeout, so one lost or late beat is no death.
    let heartbeat_ms = (ctx.heartbeat_timeout.as_millis() / 3).max(1) as u64;
    send.write_all(&encode_frame(&ToWorker::Welcome {
        worker_id: worker,
        heartbeat_ms,
    })?)
    .await?;
    tracing::info!(worker, name = %info.name, slots = info.slots, "worker joined");

    let closer = connection.clone();
    let (link, mut outbox_rx) = WorkerLink::new(Box::new(move |reason: &str| {
        closer.close(close::PROTOCOL_VIOLATION.into(), reason.as_bytes())
    }));
    ctx.driver.send(Input::WorkerJoined {
        worker,
        spec: WorkerSpec {
            slots: info.slots,
            memory_bytes: info.memory_bytes,
            benchmark_fuel_per_sec: info.benchmark_fuel_per_sec,
        },
        link,
    });

    // Messages to the worker, coalesced into one write when several are
    // waiting. A worker that stops reading stalls the write: past the
    // heartbeat timeout it is cut off.
    let write_timeout = ctx.heartbeat_timeout;
    let driver = ctx.driver.clone();
    let writer = tokio::spawn(async move {
        while let Some(first) = outbox_rx.recv().await {
            let mut bytes = encode_frame(&first)?;
            while let Ok(next) = outbox_rx.try_recv() {
                bytes.extend(encode_frame(&next)?);
            }
            if tokio::time::timeout(write_timeout, send.write_all(&bytes))
                .await
                .is_err()
            {
                let message = format!(
                    "stopped reading: a write to it did not complete within {:.1} s",
                    write_timeout.as_secs_f64()
                );
                driver.send(Input::Violation { worker, message });
                bail!("the worker stopped reading");
            }
        }
        anyhow::Ok(())
    });

    let modules = tokio::spawn(serve_modules(connection.clone(), ctx.clone()));

    let result = read_reports(&mut recv, &mut decoder, worker, &ctx).await;
    if let Err(error) = &result {
        // A broken frame or a flood is the worker's fault; silence is not.
        if let Some(violation) = error.downcast_ref::<Violation>() {
            ctx.driver.send(Input::Violation {
                worker,
                message: violation.0.clone(),
            });
        }
    }
    ctx.driver.send(Input::WorkerLeft { worker });
    writer.abort();
    modules.abort();
    let store = ctx.store.clone();
    let _ = tokio::task::spawn_blocking(move || store.set_worker_online(worker, false)).await;
    tracing::info!(worker, "worker left");
    result
}

/// The slots a worker may announce.
fn check_slots(slots: u32) -> Result<(), String> {
    if slots == 0 || slots > MAX_SLOTS {
        return Err(format!(
            "the worker announced {slots} slots; a worker has 1 to {MAX_SLOTS}"
        ));
    }
    Ok(())
}

/// A session error that is the worker's fault: recorded in its failure history.
#[derive(Debug, thiserror::Error)]
#[error("protocol violation: {0}")]
struct Violation(String);

async fn read_reports(
    recv: &mut quinn::RecvStream,
    decoder: &mut FrameDecoder,
    worker: u64,
    ctx: &NetContext,
) -> anyhow::Result<()> {
    let mut budget = MessageBudget::new(tokio::time::Instant::now());
    loop {
        let message = tokio::time::timeout(ctx.heartbeat_timeout, read_message(recv, decoder))
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "no heartbeat for {:.1} s: the worker is considered offline",
                    ctx.heartbeat_timeout.as_secs_f64()
                )
            })?
            .map_err(
                |error| match error.downcast::<wasmgrid_protocol::wire::WireError>() {
                    Ok(wire) => anyhow::Error::new(Violation(format!("sent a bad frame: {wire}"))),
                    Err(other) => other,
                },
            )?;
        if let Some(message) = &message {
            if let Err(excess) = budget.spend(message, tokio::time::Instant::now()) {
                return Err(Violation(excess).into());
            }
        }
        match message {
            None => return Ok(()),
            Some(ToForeman::Credit(n)) => ctx.driver.send(Input::Credit { worker, n }),
            Some(ToForeman::Finished(reports)) => {
                ctx.driver.send(Input::Finished { worker, reports })
            }
            Some(ToForeman::Heartbeat(load)) => {
                ctx.store
                    .worker_heartbeat(worker, load, crate::driver::unix_ms())
            }
            Some(ToForeman::Draining) => {
                tracing::info!(worker, "worker is draining");
                ctx.driver.send(Input::Draining { worker });
            }
            Some(ToForeman::Returned(attempts)) => {
                ctx.driver.send(Input::Returned { worker, attempts })
            }
            Some(ToForeman::Hello { .. }) => {
                return Err(Violation("sent a second hello".into()).into())
            }
        }
    }
}

/// Module fetches: at most `max_concurrent_bidi_streams` at once (see the
/// endpoint), each request read within a timeout.
async fn serve_modules(connection: quinn::Connection, ctx: Arc<NetContext>) {
    while let Ok((mut send, mut recv)) = connection.accept_bi().await {
        let store = ctx.store.clone();
        tokio::spawn(async move {
            let request = tokio::time::timeout(MODULE_REQUEST_TIMEOUT, recv.read_to_end(1024))
                .await
                .context("a module request stalled")??;
            let mut decoder = FrameDecoder::new();
            decoder.push(&request);
            let Some(FetchModule(hash)) = decoder.next_message()? else {
                bail!("empty module request");
            };
            let wasm = tokio::task::spawn_blocking(move || store.module(&hash)).await??;
            let reply = match wasm {
                Some(bytes) => ModuleReply::Found(bytes),
                None => ModuleReply::Unknown,
            };
            send.write_all(&encode_frame(&reply)?).await?;
            send.finish()?;
            anyhow::Ok(())
        });
    }
}

/// Aborts a task when dropped (a session's side jobs end with it).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
