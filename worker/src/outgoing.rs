//! Everything a joined worker sends on its control stream after the
//! handshake, from one task: reports (batched: whatever finished while the
//! last batch was being written goes in the next), control messages in the
//! order they were queued, heartbeats with the machine's load, and credit
//! grown as tasks turn out short (never while draining).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
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
const REPORT_HOLD: Duration = Duration::from_millis(8);
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

/// Queues what the writer sends. A report does not wake a writer holding a
/// batch (each wakeup would take a core from a running task); anything else does.
#[derive(Clone)]
pub struct Sender {
    queue: mpsc::UnboundedSender<Outgoing>,
    urgent: Arc<Notify>,
    /// Whether tasks wait at the foreman for this worker's credit.
    backlog: Arc<AtomicBool>,
}

/// The writer's end of a [`Sender`].
struct Inbox {
    queue: mpsc::UnboundedReceiver<Outgoing>,
    urgent: Arc<Notify>,
    backlog: Arc<AtomicBool>,
}

fn channel() -> (Sender, Inbox) {
    let (queue, receiver) = mpsc::unbounded_channel();
    let urgent = Arc::new(Notify::new());
    let backlog = Arc::new(AtomicBool::new(true));
    let sender = Sender {
        queue,
        urgent: urgent.clone(),
        backlog: backlog.clone(),
    };
    (
        sender,
        Inbox {
            queue: receiver,
            urgent,
            backlog,
        },
    )
}

impl Sender {
    /// What the foreman said of its backlog. Tasks waiting again end a hold
    /// taken while none did: their credit is wanted now.
    pub fn set_backlog(&self, waiting: bool) {
        let was_waiting = self.backlog.swap(waiting, Ordering::Relaxed);
        if waiting && !was_waiting {
            self.urgent.notify_waiters();
        }
    }

    /// Dropped when the writer has stopped: the session is ending anyway.
    pub fn send(&self, item: Outgoing) {
        let urgent = !matches!(item, Outgoing::Finished(_));
        if self.queue.send(item).is_ok() && urgent {
            self.urgent.notify_waiters();
        }
    }
}

/// Starts the writer; it ends on [`Outgoing::Finish`], when every sender is
/// gone, or on the first write error (which it returns).
pub fn spawn(
    mut send: quinn::SendStream,
    mut window: CreditWindow,
    heartbeat: Duration,
    pool: Arc<SlotPool>,
) -> (Sender, JoinHandle<anyhow::Result<()>>) {
    let (sender, mut inbox) = channel();
    let writer = tokio::spawn(async move {
        let mut heartbeat = tokio::time::interval(heartbeat);
        let mut sampler = LoadSampler::new();
        let mut pending: Option<Outgoing> = None;
        let mut draining = false;
        loop {
            let item = match pending.take() {
                Some(item) => item,
                None => tokio::select! {
                    item = inbox.queue.recv() => match item {
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
                    // Tasks of a millisecond or so would cost the foreman a
                    // wakeup each: reports gather for up to REPORT_HOLD (see
                    // `may_hold`). A slot taking the last queued task, or
                    // finding none (what was left may have been handed
                    // back), ends it: the foreman then has a task's time to
                    // send more, or to ask another worker to hand some over.
                    let backlog = inbox.backlog.load(Ordering::Relaxed);
                    let hold_until = may_hold(backlog, window.queue_lasts(pool.queued()))
                        .then(|| tokio::time::Instant::now() + REPORT_HOLD);
                    let (batch, next) =
                        gather(first, &mut inbox, hold_until, pool.queue_drained()).await;
                    pending = next;
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

/// Reports may wait for company while the tasks queued here outlast the
/// hold (new ones arrive before the slots run dry), or while no task waits at
/// the foreman (the credit they return could not be used yet): at the end of
/// every job, each report would otherwise go alone.
fn may_hold(foreman_backlog: bool, queue_lasts: Duration) -> bool {
    !foreman_backlog || queue_lasts > REPORT_HOLD + HOLD_MARGIN
}

/// One message's reports: `first`, those already queued and, until
/// `hold_until`, those that come meanwhile, up to the byte budget. The wait
/// ends early when `end_hold` completes or anything but a report is queued;
/// that is returned to go next.
async fn gather(
    first: Finished,
    inbox: &mut Inbox,
    hold_until: Option<tokio::time::Instant>,
    end_hold: impl Future<Output = ()>,
) -> (Vec<Finished>, Option<Outgoing>) {
    let mut bytes = report_bytes(&first);
    let mut batch = vec![first];
    let mut may_wait = hold_until.is_some();
    let mut end_hold = std::pin::pin!(end_hold);
    let urgent = Arc::clone(&inbox.urgent);
    loop {
        // Listening before the queue is read: a message queued after the
        // read wakes the wait below (notify_waiters keeps no permit for a
        // later hold).
        let mut woken = std::pin::pin!(urgent.notified());
        woken.as_mut().enable();
        // Past the byte budget the rest waits, so no frame nears the foreman's limit.
        while bytes < FINISHED_BATCH_BYTES {
            match inbox.queue.try_recv() {
                Ok(Outgoing::Finished(finished)) => {
                    bytes += report_bytes(&finished);
                    batch.push(finished);
                }
                Ok(other) => return (batch, Some(other)),
                Err(_) => break,
            }
        }
        let deadline = match hold_until {
            Some(deadline) if may_wait && bytes < FINISHED_BATCH_BYTES => deadline,
            _ => return (batch, None),
        };
        // Sleeps through the reports that arrive; takes them all once woken.
        tokio::select! {
            () = &mut end_hold => {}
            () = woken => {}
            () = tokio::time::sleep_until(deadline) => {}
        }
        may_wait = false;
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::tests::report;
    use std::future::pending;
    use tokio::time::Instant;
    use wasmgrid_protocol::CacheSource;

    fn finished(attempt: u64) -> Outgoing {
        Outgoing::Finished(Finished {
            attempt,
            report: report(Ok("1"), CacheSource::Memory),
        })
    }

    fn first() -> Finished {
        Finished {
            attempt: 0,
            report: report(Ok("1"), CacheSource::Memory),
        }
    }

    /// Queues `items` after `after`, as slots and the session reader would
    /// during a hold.
    fn send_later(sender: &Sender, after: Duration, items: Vec<Outgoing>) {
        let late = sender.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            for item in items {
                late.send(item);
            }
        });
    }

    fn attempts(batch: &[Finished]) -> Vec<u64> {
        batch.iter().map(|f| f.attempt).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_hold_only_what_is_queued_goes() {
        let (sender, mut inbox) = channel();
        sender.send(finished(1));
        let (batch, next) = gather(first(), &mut inbox, None, pending()).await;
        assert_eq!(attempts(&batch), [0, 1]);
        assert!(next.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_hold_takes_the_reports_that_come_until_its_end() {
        let (sender, mut inbox) = channel();
        let started = Instant::now();
        // Timers tick in whole milliseconds.
        let reports = (1..=3).map(finished).collect();
        send_later(&sender, Duration::from_millis(1), reports);
        let until = Some(started + REPORT_HOLD);
        let (batch, next) = gather(first(), &mut inbox, until, pending()).await;
        assert_eq!(attempts(&batch), [0, 1, 2, 3]);
        assert!(next.is_none());
        assert_eq!(started.elapsed(), REPORT_HOLD);
    }

    #[tokio::test(start_paused = true)]
    async fn another_message_ends_the_hold_and_goes_next() {
        let (sender, mut inbox) = channel();
        let started = Instant::now();
        let returned = Outgoing::Message(ToForeman::Returned(vec![7]));
        let items = vec![finished(1), returned, finished(2)];
        send_later(&sender, Duration::from_micros(300), items);
        let until = Some(started + REPORT_HOLD);
        let (batch, next) = gather(first(), &mut inbox, until, pending()).await;
        assert_eq!(attempts(&batch), [0, 1]);
        assert!(matches!(
            next,
            Some(Outgoing::Message(ToForeman::Returned(ids))) if ids == [7]
        ));
        assert!(started.elapsed() < REPORT_HOLD);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_slot_ends_the_hold() {
        let (_sender, mut inbox) = channel();
        let started = Instant::now();
        let idle = tokio::time::sleep(Duration::from_millis(1));
        let until = Some(started + REPORT_HOLD);
        let (batch, _) = gather(first(), &mut inbox, until, idle).await;
        assert_eq!(attempts(&batch), [0]);
        assert_eq!(started.elapsed(), Duration::from_millis(1));
    }

    #[test]
    fn reports_wait_while_the_queue_lasts_or_nothing_waits_at_the_foreman() {
        let long = REPORT_HOLD + HOLD_MARGIN + Duration::from_millis(1);
        assert!(may_hold(true, long));
        assert!(!may_hold(true, REPORT_HOLD));
        assert!(may_hold(false, Duration::ZERO));
    }

    #[tokio::test(start_paused = true)]
    async fn tasks_waiting_again_end_a_hold() {
        let (sender, mut inbox) = channel();
        sender.set_backlog(false);
        let started = Instant::now();
        let foreman = sender.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            foreman.set_backlog(false);
            foreman.send(finished(1));
            foreman.set_backlog(true);
        });
        let until = Some(started + REPORT_HOLD);
        let (batch, next) = gather(first(), &mut inbox, until, pending()).await;
        assert_eq!(attempts(&batch), [0, 1]);
        assert!(next.is_none());
        assert_eq!(started.elapsed(), Duration::from_millis(1));
        assert!(inbox.backlog.load(Ordering::Relaxed));
    }

    #[tokio::test(start_paused = true)]
    async fn news_from_before_a_hold_does_not_end_it() {
        let (sender, mut inbox) = channel();
        sender.set_backlog(false);
        sender.set_backlog(true);
        let started = Instant::now();
        let until = Some(started + REPORT_HOLD);
        let (batch, _) = gather(first(), &mut inbox, until, pending()).await;
        assert_eq!(attempts(&batch), [0]);
        assert_eq!(started.elapsed(), REPORT_HOLD);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_goes_without_waiting() {
        let (sender, mut inbox) = channel();
        let big = "x".repeat(FINISHED_BATCH_BYTES / 2);
        for attempt in 1..=3 {
            let mut report = report(Ok("1"), CacheSource::Memory);
            report.stdout.text = big.clone();
            sender.send(Outgoing::Finished(Finished { attempt, report }));
        }
        let started = Instant::now();
        let until = Some(started + REPORT_HOLD);
        let (batch, _) = gather(first(), &mut inbox, until, pending()).await;
        assert_eq!(attempts(&batch), [0, 1, 2]);
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert!(matches!(inbox.queue.try_recv(), Ok(Outgoing::Finished(f)) if f.attempt == 3));
    }
}
