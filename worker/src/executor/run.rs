//! One attempt at one task: a fresh store and instance, the call, and a
//! report that names whatever went wrong.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::{Engine, Store, Trap, UpdateDeadline, WasmBacktrace};

use wasmgrid_protocol::{CacheSource, Failure, FailureKind, TaskLimits, TaskReport, TaskTimings};

use super::bindings::TaskError;
use super::cache::PreparedTask;
use super::engine::EpochClock;
use super::naps;
use super::preempt::Stopped;
use super::sandbox::Sandbox;
use super::{throttle, Stopper};

/// How the module was obtained for this attempt, copied into its report.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub source: CacheSource,
    pub micros: u64,
}

impl Load {
    pub const WARM: Load = Load {
        source: CacheSource::Memory,
        micros: 0,
    };
}

/// Set from another thread to stop a task: it ends as `Cancelled` within
/// a watchdog poll or an epoch tick.
pub type CancelFlag = Arc<AtomicBool>;

/// The error a cancelled task's instance is stopped with.
#[derive(Debug, thiserror::Error)]
#[error("the task was cancelled")]
struct CancelledMarker;

#[allow(clippy::too_many_arguments)]
pub fn run_task(
    engine: &Engine,
    stopper: &Stopper,
    task: &PreparedTask,
    load: Load,
    args: &str,
    limits: &TaskLimits,
    cancel: Option<CancelFlag>,
    cpu_limit_percent: u32,
) -> TaskReport {
    let capped = cpu_limit_percent < 100;
    if capped {
        throttle::begin(cpu_limit_percent, cancel.as_ref());
    }
    let timeout = Duration::from_millis(limits.timeout_ms);
    let mut sandbox = Sandbox::new(limits.memory_bytes, limits.output_bytes as usize, timeout);
    sandbox.cancel = cancel.clone();
    let mut store = Store::new(engine, sandbox);
    store.limiter(|sandbox| &mut sandbox.memory);
    // Fails only on an engine without fuel metering, where there is nothing to set.
    let _ = store.set_fuel(limits.fuel);
    let started = Instant::now();
    let mut _ticking = None;
    let watching = match stopper {
        Stopper::Signal(watchdog) => Some(watchdog.watch(&task.code, timeout, cancel)),
        Stopper::Epoch(clock) => {
            _ticking = Some(clock.ticking());
            stop_at_epochs(&mut store, started, timeout, cancel, capped);
            None
        }
    };

    let instance = task.pre.instantiate(&mut store);
    let instantiated = Instant::now();
    let result = instance.and_then(|instance| instance.call_run(&mut store, args));
    let finished = Instant::now();
    let stopped = watching.as_ref().and_then(|watching| watching.stopped());
    drop(watching);
    if capped {
        throttle::end();
    }

    let fuel_used = store
        .get_fuel()
        .map_or(0, |left| limits.fuel.saturating_sub(left));
    let nap_cut = store.data().nap_cut.load(Ordering::Acquire);
    let outcome = match result {
        _ if nap_cut == naps::CUT_BY_CANCEL => Err(cancelled()),
        Err(_) if stopped == Some(Stopped::Cancelled) => Err(cancelled()),
        _ if nap_cut == naps::CUT_BY_DEADLINE => Err(timed_out(limits)),
        Ok(Ok(json)) => check_result_size(json, limits),
        Ok(Err(TaskError::BadArgs(message))) => Err(Failure::new(FailureKind::BadArgs, message)),
        Ok(Err(TaskError::Failed(message))) => Err(Failure::new(FailureKind::GuestError, message)),
        Err(_) if stopped == Some(Stopped::TimedOut) => Err(timed_out(limits)),
        Err(error) => Err(classify_trap(&error, store.data(), limits)),
    }
    .map_err(Failure::bounded);
    let sandbox = store.data();
    TaskReport {
        outcome,
        fuel_used,
        cache: load.source,
        timings: TaskTimings {
            load_us: load.micros,
            instantiate_us: micros(instantiated - started),
            run_us: micros(finished - instantiated),
        },
        stdout: sandbox.stdout.captured(),
        stderr: sandbox.stderr.captured(),
    }
}

/// Epoch checks stop the task: each tick checks the CPU cap's rest, the
/// cancel flag, then the wall clock (which counts the rest: it is real time).
fn stop_at_epochs(
    store: &mut Store<Sandbox>,
    started: Instant,
    timeout: Duration,
    cancel: Option<CancelFlag>,
    capped: bool,
) {
    match cancel {
        Some(cancel) => {
            store.set_epoch_deadline(1);
            store.epoch_deadline_callback(move |_| {
                if capped {
                    throttle::tick(Some(&cancel));
                }
                if cancel.load(Ordering::Relaxed) {
                    Err(wasmtime::Error::new(CancelledMarker))
                } else if started.elapsed() >= timeout {
                    Ok(UpdateDeadline::Interrupt)
                } else {
                    Ok(UpdateDeadline::Continue(1))
                }
            });
        }
        None if capped => {
            store.set_epoch_deadline(1);
            store.epoch_deadline_callback(move |_| {
                throttle::tick(None);
                if started.elapsed() >= timeout {
                    Ok(UpdateDeadline::Interrupt)
                } else {
                    Ok(UpdateDeadline::Continue(1))
                }
            });
        }
        None => {
            store.set_epoch_deadline(EpochClock::ticks_for(timeout));
            store.epoch_deadline_trap();
        }
    }
}

fn cancelled() -> Failure {
    Failure::new(
        FailureKind::Cancelled,
        "the job was cancelled while the task ran",
    )
}

fn timed_out(limits: &TaskLimits) -> Failure {
    Failure::new(
        FailureKind::Timeout,
        format!(
            "the task ran past its wall-clock limit of {:.3} s",
            limits.timeout_ms as f64 / 1000.0
        ),
    )
}

/// A result over the limit is dropped here, so it never leaves the worker.
fn check_result_size(json: String, limits: &TaskLimits) -> Result<String, Failure> {
    if json.len() > limits.result_bytes as usize {
        return Err(Failure::new(
            FailureKind::ResultTooLarge,
            format!(
                "the result is {} bytes; this job's limit is {} bytes",
                json.len(),
                limits.result_bytes
            ),
        ));
    }
    Ok(json)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Names an abnormal stop. A refused memory growth wins over the trap it
/// causes, because guests' allocators turn it into a plain `unreachable`.
fn classify_trap(error: &wasmtime::Error, sandbox: &Sandbox, limits: &TaskLimits) -> Failure {
    if error.downcast_ref::<CancelledMarker>().is_some() {
        return cancelled();
    }
    if let Some(wanted) = sandbox.memory.refused {
        return Failure::new(
            FailureKind::MemoryLimit,
            format!(
                "the task tried to grow its memory to {} past its limit of {}",
                mib(wanted),
                mib(sandbox.memory.limit())
            ),
        );
    }
    match error.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => Failure::new(
            FailureKind::OutOfFuel,
            format!("the task used all of its {} units of fuel", limits.fuel),
        ),
        Some(Trap::Interrupt) => timed_out(limits),
        trap => {
            let backtrace = error.downcast_ref::<WasmBacktrace>();
            let mut message = String::new();
            if let Some(panic) = &sandbox.panic_message {
                message.push_str(panic);
                message.push('\n');
            } else if trap == Some(&Trap::StackOverflow) {
                message.push_str(
                    "stack overflow: the wasm call stack ran out (unbounded recursion?)\n",
                );
            } else if trap == Some(&Trap::MemoryOutOfBounds)
                && backtrace.is_some_and(is_runaway_recursion)
            {
                message.push_str(
                    "stack overflow: the guest's stack in linear memory ran out (unbounded recursion?)\n",
                );
            }
            match trap {
                Some(trap) => message.push_str(&trap.to_string()),
                None => message.push_str(&format!("{error:#}")),
            }
            if let Some(backtrace) = backtrace {
                message.push('\n');
                message.push_str(&backtrace.to_string());
            }
            Failure::new(FailureKind::Trap, message)
        }
    }
}

/// Rust guests keep their stack in linear memory, so running out of it shows
/// up as an out-of-bounds access deep inside one repeating function.
fn is_runaway_recursion(backtrace: &WasmBacktrace) -> bool {
    const MIN_FRAMES: usize = 16;
    let frames = backtrace.frames();
    frames.len() >= MIN_FRAMES
        && frames[..MIN_FRAMES]
            .windows(2)
            .all(|pair| pair[0].func_index() == pair[1].func_index())
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}
