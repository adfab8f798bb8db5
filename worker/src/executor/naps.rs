//! A guest's sleeps end by its task's deadline. Waiting on a clock happens
//! in host code, where neither a signal nor an epoch check can stop a task,
//! so a guest that slept past its wall-clock limit would hold its slot for
//! as long as it asked. Its sleep is cut at the deadline instead (or soon
//! after its job is cancelled), and the task ends as `Timeout` (or
//! `Cancelled`) even if it goes on to finish: it slept less than it asked.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::{Linker, Resource};
use wasmtime::StoreContextMut;
use wasmtime_wasi::p2::{subscribe, DynPollable, Pollable};
use wasmtime_wasi::HostMonotonicClock;

use super::sandbox::Sandbox;
use super::CancelFlag;

/// The monotonic clock interface as wasmtime-wasi defines it; guests that
/// import an older 0.2 version are linked to it too.
const MONOTONIC_CLOCK: &str = "wasi:clocks/monotonic-clock@0.2.12";

/// The guest's monotonic clock: nanoseconds since its sandbox was made, so
/// the host can turn an instant the guest names back into real time.
#[derive(Debug, Clone, Copy)]
pub struct TaskClock {
    pub started: Instant,
}

impl HostMonotonicClock for TaskClock {
    fn resolution(&self) -> u64 {
        1
    }

    fn now(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// How often a sleeping task looks at its cancel flag.
const CANCEL_POLL: Duration = Duration::from_millis(5);

/// Why a sleep ended early (in the sandbox's `nap_cut`; 0 while none has),
/// which is how the task then ends.
pub const CUT_BY_DEADLINE: u8 = 1;
pub const CUT_BY_CANCEL: u8 = 2;

/// Ready at the earlier of what the guest asked for and its task's
/// deadline, or soon after its task is cancelled.
struct Nap {
    until: tokio::time::Instant,
    /// Whether the deadline cut this nap short.
    capped: bool,
    /// Told why the nap ended early, if it did.
    cut: Arc<AtomicU8>,
    cancel: Option<CancelFlag>,
}

#[wasmtime_wasi::async_trait]
impl Pollable for Nap {
    async fn ready(&mut self) {
        let Some(cancel) = &self.cancel else {
            tokio::time::sleep_until(self.until).await;
            self.mark_cut();
            return;
        };
        loop {
            let step = self.until.min(tokio::time::Instant::now() + CANCEL_POLL);
            tokio::time::sleep_until(step).await;
            if step >= self.until {
                self.mark_cut();
                return;
            }
            if cancel.load(Ordering::Relaxed) {
                self.cut.store(CUT_BY_CANCEL, Ordering::Release);
                return;
            }
        }
    }
}

impl Nap {
    fn mark_cut(&self) {
        if self.capped {
            self.cut.store(CUT_BY_DEADLINE, Ordering::Release);
        }
    }
}

/// Replaces the clock's two ways to sleep in `linker` (after WASI is added).
pub fn add_to_linker(linker: &mut Linker<Sandbox>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut clock = linker.instance(MONOTONIC_CLOCK)?;
    clock.func_wrap(
        "subscribe-duration",
        |mut store: StoreContextMut<'_, Sandbox>, (nanos,): (u64,)| {
            let wanted = Instant::now().checked_add(Duration::from_nanos(nanos));
            Ok((nap(store.data_mut(), wanted)?,))
        },
    )?;
    clock.func_wrap(
        "subscribe-instant",
        |mut store: StoreContextMut<'_, Sandbox>, (when,): (u64,)| {
            let sandbox = store.data_mut();
            let wanted = sandbox
                .clock
                .started
                .checked_add(Duration::from_nanos(when));
            Ok((nap(sandbox, wanted)?,))
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// `wanted`: `None` when it is too far off to represent.
fn nap(sandbox: &mut Sandbox, wanted: Option<Instant>) -> wasmtime::Result<Resource<DynPollable>> {
    let deadline = sandbox.deadline;
    let (until, capped) = match wanted {
        Some(wanted) if wanted <= deadline => (wanted, false),
        _ => (deadline, true),
    };
    let nap = sandbox.table.push(Nap {
        until: tokio::time::Instant::from_std(until),
        capped,
        cut: sandbox.nap_cut.clone(),
        cancel: sandbox.cancel.clone(),
    })?;
    subscribe(&mut sandbox.table, nap)
}
