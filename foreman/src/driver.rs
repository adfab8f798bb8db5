//! Drives the sans-IO core: feeds it what the network and the API report,
//! and carries out what it decides (messages to workers, records to the store).

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use wasmgrid_protocol::wire::{AttemptId, Finished, ToWorker};

use crate::core::{Command, Core, WorkerSpec};
use crate::model::{JobId, JobSpec, Record, WorkerId};
use crate::store::Store;

/// Most inputs applied before the core dispatches, so bursts are batched.
const MAX_INPUTS_PER_ROUND: usize = 4096;
/// Messages waiting for one worker's writer; a worker that stops reading
/// fills this and is cut off, so its queue cannot grow without bound.
pub const OUTBOX_CAPACITY: usize = 1024;
/// The longest the core goes untold of the time: it is told when its next
/// deadline comes (a delayed job, a lease, a cooldown), so an idle foreman
/// sleeps, and this bounds how late one is seen if the wall clock steps.
const MAX_SLEEP: std::time::Duration = std::time::Duration::from_secs(30);

pub enum Input {
    Submit {
        spec: JobSpec,
        args: Vec<Arc<str>>,
    },
    WorkerJoined {
        worker: WorkerId,
        spec: WorkerSpec,
        link: WorkerLink,
    },
    /// The worker broke the protocol (seen by its session): cut it off.
    Violation {
        worker: WorkerId,
        message: String,
    },
    /// The worker is leaving and takes no more tasks.
    Draining {
        worker: WorkerId,
    },
    /// Attempts the worker hands back unstarted.
    Returned {
        worker: WorkerId,
        attempts: Vec<AttemptId>,
    },
    Credit {
        worker: WorkerId,
        n: u32,
    },
    Finished {
        worker: WorkerId,
        reports: Vec<Finished>,
    },
    WorkerLeft {
        worker: WorkerId,
    },
    Cancel {
        job: JobId,
        reply: oneshot::Sender<bool>,
    },
    /// Each connected worker's busy slots, as the core counts them.
    BusySlots {
        reply: oneshot::Sender<HashMap<WorkerId, u32>>,
    },
    /// Ask a connected worker to leave gracefully.
    Drain {
        worker: WorkerId,
        grace_ms: u64,
        reply: oneshot::Sender<bool>,
    },
}

/// How the driver reaches one connected worker.
pub struct WorkerLink {
    /// Bounded by [`OUTBOX_CAPACITY`].
    pub outbox: mpsc::Sender<ToWorker>,
    /// Closes the worker's connection, telling it why.
    pub cut_off: Box<dyn Fn(&str) + Send>,
}

impl WorkerLink {
    /// A link with a fresh outbox; its receiving end is returned too.
    pub fn new(cut_off: Box<dyn Fn(&str) + Send>) -> (WorkerLink, mpsc::Receiver<ToWorker>) {
        let (outbox, receiver) = mpsc::channel(OUTBOX_CAPACITY);
        (WorkerLink { outbox, cut_off }, receiver)
    }
}

/// Where everything that changes the grid's state is sent.
#[derive(Clone)]
pub struct Driver {
    inputs: mpsc::UnboundedSender<Input>,
}

impl Driver {
    pub fn spawn(core: Core, store: Store) -> Driver {
        let (inputs, receiver) = mpsc::unbounded_channel();
        tokio::spawn(run(core, store, receiver));
        Driver { inputs }
    }

    pub fn send(&self, input: Input) {
        // The driver runs as long as the process does.
        let _ = self.inputs.send(input);
    }

    pub async fn cancel(&self, job: JobId) -> bool {
        let (reply, answer) = oneshot::channel();
        self.send(Input::Cancel { job, reply });
        answer.await.unwrap_or(false)
    }

    /// Each connected worker's busy slots now (see [`Core::busy_slots`]);
    /// empty if the driver has stopped.
    pub async fn busy_slots(&self) -> HashMap<WorkerId, u32> {
        let (reply, answer) = oneshot::channel();
        self.send(Input::BusySlots { reply });
        answer.await.unwrap_or_default()
    }

    /// Asks a worker to finish its running tasks within `grace_ms`, hand
    /// back the rest and leave. False when no such worker is connected.
    pub async fn drain(&self, worker: WorkerId, grace_ms: u64) -> bool {
        let (reply, answer) = oneshot::channel();
        self.send(Input::Drain {
            worker,
            grace_ms,
            reply,
        });
        answer.await.unwrap_or(false)
    }
}

async fn run(mut core: Core, store: Store, mut inputs: mpsc::UnboundedReceiver<Input>) {
    let mut outboxes: HashMap<WorkerId, WorkerLink> = HashMap::new();
    // Answers are sent once the round's records are queued at the store, so
    // a caller that flushes the store then sees what it asked for.
    let mut answers: Vec<(oneshot::Sender<bool>, bool)> = Vec::new();
    loop {
        let sleep = core.next_deadline().map_or(MAX_SLEEP, |at| {
            std::time::Duration::from_millis(at.saturating_sub(unix_ms())).min(MAX_SLEEP)
        });
        let first = tokio::select! {
            input = inputs.recv() => match input {
                Some(input) => Some(input),
                None => break,
            },
            () = tokio::time::sleep(sleep) => None,
        };
        core.tick(unix_ms());
        if let Some(first) = first {
            apply(&mut core, &mut outboxes, &mut answers, first);
        }
        for _ in 1..MAX_INPUTS_PER_ROUND {
            match inputs.try_recv() {
                Ok(input) => apply(&mut core, &mut outboxes, &mut answers, input),
                Err(_) => break,
            }
        }
        core.dispatch();
        let mut records = Vec::new();
        while let Some(command) = core.poll_command() {
            match command {
                Command::Send {
                    worker,
                    assignments,
                } => send_to(&mut core, &outboxes, worker, ToWorker::Run(assignments)),
                Command::Cancel { worker, attempts } => {
                    send_to(&mut core, &outboxes, worker, ToWorker::Cancel(attempts))
                }
                Command::Recall {
                    worker,
                    attempts,
                    believed_unstarted,
                } => {
                    tracing::debug!(
                        worker,
                        ?attempts,
                        believed_unstarted,
                        "asked to hand back for an idle worker"
                    );
                    let give_back = ToWorker::GiveBack {
                        attempts,
                        believed_unstarted,
                    };
                    send_to(&mut core, &outboxes, worker, give_back)
                }
                Command::Backlog { worker, waiting } => {
                    send_to(&mut core, &outboxes, worker, ToWorker::Backlog(waiting))
                }
                Command::CutOff { worker, reason } => {
                    if let Some(link) = outboxes.remove(&worker) {
                        (link.cut_off)(&reason);
                    }
                }
                Command::Record(record) => {
                    trace_record(&record);
                    records.push(record)
                }
            }
        }
        if !records.is_empty() {
            store.record_all(records);
        }
        for (reply, answer) in answers.drain(..) {
            let _ = reply.send(answer);
        }
    }
}

fn apply(
    core: &mut Core,
    outboxes: &mut HashMap<WorkerId, WorkerLink>,
    answers: &mut Vec<(oneshot::Sender<bool>, bool)>,
    input: Input,
) {
    match input {
        Input::Submit { spec, args } => core.submit_job(spec, args),
        Input::WorkerJoined { worker, spec, link } => {
            outboxes.insert(worker, link);
            core.worker_joined(worker, spec);
        }
        Input::Violation { worker, message } => core.protocol_violation(worker, message),
        Input::Draining { worker } => core.worker_draining(worker),
        Input::Returned { worker, attempts } => core.attempts_returned(worker, &attempts),
        Input::Credit { worker, n } => core.grant_credit(worker, n),
        Input::Finished { worker, reports } => {
            for finished in reports {
                core.attempt_finished(worker, finished.attempt, finished.report);
            }
        }
        Input::WorkerLeft { worker } => {
            outboxes.remove(&worker);
            core.worker_left(worker);
        }
        Input::Cancel { job, reply } => answers.push((reply, core.cancel_job(job))),
        Input::BusySlots { reply } => {
            let _ = reply.send(core.busy_slots());
        }
        Input::Drain {
            worker,
            grace_ms,
            reply,
        } => {
            let connected = outboxes.contains_key(&worker);
            send_to(core, outboxes, worker, ToWorker::Drain { grace_ms });
            answers.push((reply, connected));
        }
    }
}

/// A worker whose outbox is full has stopped reading: it is cut off (the
/// core's `CutOff` then closes its connection).
fn send_to(
    core: &mut Core,
    outboxes: &HashMap<WorkerId, WorkerLink>,
    worker: WorkerId,
    message: ToWorker,
) {
    let Some(link) = outboxes.get(&worker) else {
        return;
    };
    if let Err(mpsc::error::TrySendError::Full(_)) = link.outbox.try_send(message) {
        core.protocol_violation(
            worker,
            format!("stopped reading: {OUTBOX_CAPACITY} messages to it are waiting to be written"),
        );
    }
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Each attempt's lifecycle in the log, by job, task and attempt (the worker
/// logs the same attempt ids), at debug level so a busy grid pays nothing.
fn trace_record(record: &Record) {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    match record {
        Record::AttemptStarted {
            job,
            task,
            attempt,
            worker,
            ..
        } => tracing::debug!(job, task, attempt, worker, "attempt sent"),
        Record::AttemptEnded {
            job,
            task,
            attempt,
            worker,
            report,
            task_state,
        } => {
            let outcome = match &report.outcome {
                Ok(_) => "ok",
                Err(failure) => failure.kind.as_str(),
            };
            tracing::debug!(
                job,
                task,
                attempt,
                worker,
                outcome,
                run_us = report.timings.run_us,
                fuel = report.fuel_used,
                task_state = task_state.as_str(),
                "attempt ended"
            );
        }
        Record::AttemptAbandoned {
            job,
            task,
            attempt,
            worker,
            failure,
            task_state,
        } => tracing::debug!(
            job,
            task,
            attempt,
            worker,
            kind = failure.kind.as_str(),
            message = %failure.message,
            task_state = task_state.as_str(),
            "attempt abandoned"
        ),
        Record::JobStateChanged { job, state } => {
            tracing::debug!(job, state = state.as_str(), "job state")
        }
        Record::WorkerCooledDown {
            worker,
            until_ms,
            recent_failures,
        } => tracing::info!(worker, until_ms, recent_failures, "worker cooling down"),
        Record::WorkerViolation { worker, message } => {
            tracing::warn!(worker, %message, "worker cut off for a protocol violation")
        }
    }
}
