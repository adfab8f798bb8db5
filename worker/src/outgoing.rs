//! Everything a joined worker sends on its control stream after the
//! handshake, from one task: reports (batched: whatever finished while the
//! last batch was being written goes in the next), control messages in the
//! order they were queued, heartbeats with the machine's load, and credit
//! grown as tasks turn out short (never while draining).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use wasmgrid_protocol::wire::{encode_frame, Finished, ToForeman, FINISHED_BATCH_BYTES};

use crate::credit::CreditWindow;
use crate::executor::SlotPool;
use crate::sysinfo::LoadSampler;

/// How long a finished stream may wait for the foreman's acknowledgement.
const FINISH_ACK: Duration = Duration::from_secs(5);
/// Longest a report waits for company while this worker's queued tasks keep
/// it busy (so the foreman loses nothing by hearing of it later). The
/// prefetch windows (`credit`, the foreman's dispatch) hold about twice this.
const REPORT_HOLD: Duration = Duration::from_millis(2);
/// Reports wait only while the queue lasts this much longer than they do:
/// new tasks must arrive before it runs dry.
const HOLD_MARGIN: Duration = Duration::from_millis(1);

pub enum Outgoing {
    /// A report; consecutive ones go out in one message.
    Finished(Finished),
    /// Any other message, sent as is.
    Message(ToForeman),
    /// Write everything queued before this, finish the stream, wait until the
    /// foreman has it all, and stop.
    Finish,
}

pub type Sender = mpsc::UnboundedSender<Outgoing>;

/// Starts the writer; it ends on [`Outgoing::Finish`], when every sender is
/// gone, or on the first write error (which it returns).
pub fn spawn(
    mut send: quinn::SendStream,
    mut window: CreditWindow,
    heartbeat: Duration,
    pool: Arc<SlotPool>,
) -> (Sender, JoinHandle<anyhow::Result<()>>) {
    let (sender, mut queue) = mpsc::unbounded_channel::<Outgoing>();
    let writer = tokio::spawn(async move {
        let mut heartbeat = tokio::time::interval(heartbeat);
        let mut sampler = LoadSampler::new();
        let mut pending: Option<Outgoing> = None;
        let mut draining = false;
        loop {
            let item = match pending.take() {
                Some(item) => item,
                None => tokio::select! {
                    item = queue.recv() => match item {
                        Some(item) => item,
                        None => break,
                    },
                    _ = heartbeat.tick() => {
                        let running = u32::try_from(pool.running()).unwrap_or(u32::MAX);
                        Outgoing::Message(ToForeman::Heartbeat(sampler.sample(running)))
                    }
                },
            };
            let message = match item {
                Outgoing::Finished(first) => {
                    let mut bytes = report_bytes(&first);
                    let mut batch = vec![first];
                    let held_since = tokio::time::Instant::now();
                    // Past the byte budget the rest waits, so no frame nears the foreman's limit.
                    while bytes < FINISHED_BATCH_BYTES {
                        let next = match queue.try_recv() {
                            Ok(next) => next,
                            // Tasks of a millisecond or so would cost the
                            // foreman a wakeup each: reports gather for up to
                            // REPORT_HOLD while queued tasks keep this worker busy.
                            // A slot that finds its queue empty (what was left
                            // may have been handed back) ends the wait.
                            Err(_)
                                if window.queue_lasts(pool.queued())
                                    > REPORT_HOLD + HOLD_MARGIN =>
                            {
                                tokio::select! {
                                    next = queue.recv() => match next {
                                        Some(next) => next,
                                        None => break,
                                    },
                                    _ = pool.slot_idle() => break,
                                    _ = tokio::time::sleep_until(held_since + REPORT_HOLD) => break,
                                }
                            }
                            Err(_) => break,
                        };
                        match next {
                            Outgoing::Finished(finished) => {
                                bytes += report_bytes(&finished);
                                batch.push(finished);
                            }
                            other => {
                                pending = Some(other);
                                break;
                            }
                        }
                    }
                    for finished in &batch {
                        let timings = finished.report.timings;
                        window.observe(timings.instantiate_us + timings.run_us);
                    }
                    ToForeman::Finished(batch)
                }
                Outgoing::Message(message) => {
                    draining |= matches!(message, ToForeman::Draining);
                    message
                }
                Outgoing::Finish => {
                    send.finish()?;
                    if tokio::time::timeout(FINISH_ACK, send.stopped())
                        .await
                        .is_err()
                    {
                        tracing::warn!("the foreman did not acknowledge the last reports");
                    }
                    break;
                }
            };
            let mut bytes = encode_frame(&message)?;
            if !draining {
                if let Some(extra) = window.grow() {
                    bytes.extend(encode_frame(&ToForeman::Credit(extra))?);
                }
            }
            send.write_all(&bytes).await?;
        }
        anyhow::Ok(())
    });
    (sender, writer)
}

/// Roughly what a report adds to a frame: its texts and a fixed part.
fn report_bytes(finished: &Finished) -> usize {
    let report = &finished.report;
    let outcome = match &report.outcome {
        Ok(json) => json.len(),
        Err(failure) => failure.message.len(),
    };
    64 + outcome + report.stdout.text.len() + report.stderr.text.len()
}
