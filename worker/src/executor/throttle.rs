//! The volunteer's CPU cap, BOINC style: a thread that runs wasm sleeps
//! often enough that it runs only `percent` of the time.
//!
//! The accounting lives per thread (a slot thread keeps it from task to
//! task), so a stream of tasks shorter than an epoch tick is capped too: their
//! run time adds up to a debt of sleep, paid before the next task starts,
//! while the time a slot spends idle between tasks counts as rest.
//! Long tasks pay at every epoch tick, from the store's deadline callback.

use std::cell::RefCell;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use super::CancelFlag;

/// A debt of sleep smaller than this is carried rather than slept: sleeping
/// for less costs more in wake-ups than it is worth.
const MIN_SLEEP: Duration = Duration::from_millis(1);
/// Longest single sleep, so a cancelled task still stops promptly.
const MAX_NAP: Duration = Duration::from_millis(20);

/// Run time against rest time for a cap of `percent`: after running `r` a
/// thread owes `r × (100 − percent) / percent` of rest, so that
/// run / (run + rest) = percent / 100.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DutyCycle {
    percent: u32,
    /// Rest owed for running not yet balanced.
    owed: Duration,
}

impl DutyCycle {
    /// `percent` is clamped to 1..=100; 100 never asks for rest.
    pub fn new(percent: u32) -> Self {
        DutyCycle {
            percent: percent.clamp(1, 100),
            owed: Duration::ZERO,
        }
    }

    pub fn percent(&self) -> u32 {
        self.percent
    }

    /// Records `ran` of running; returns how long to rest now (zero while
    /// the debt is too small to be worth a sleep).
    pub fn ran(&mut self, ran: Duration) -> Duration {
        let rest = ran.checked_mul(100 - self.percent).unwrap_or(Duration::MAX) / self.percent;
        self.owed = self.owed.saturating_add(rest);
        self.due()
    }

    /// Records rest (a sleep, or idle time between tasks) against the debt.
    /// Rest beyond the debt is not banked: a long idle spell does not buy an
    /// uncapped burst afterwards.
    pub fn rested(&mut self, rest: Duration) {
        self.owed = self.owed.saturating_sub(rest);
    }

    /// The rest to take now.
    pub fn due(&self) -> Duration {
        if self.owed >= MIN_SLEEP {
            self.owed
        } else {
            Duration::ZERO
        }
    }
}

/// One thread's duty cycle and when it last started or stopped running.
struct ThreadCycle {
    duty: DutyCycle,
    since: Instant,
    running: bool,
}

thread_local! {
    static CYCLE: RefCell<Option<ThreadCycle>> = const { RefCell::new(None) };
}

/// Called before a capped task starts on this thread: counts the idle time
/// since the last one as rest, then pays whatever rest is still owed.
pub fn begin(percent: u32, cancel: Option<&CancelFlag>) {
    let due = CYCLE.with_borrow_mut(|cycle| {
        let now = Instant::now();
        let state = match cycle {
            Some(state) if state.duty.percent() == DutyCycle::new(percent).percent() => state,
            _ => cycle.insert(ThreadCycle {
                duty: DutyCycle::new(percent),
                since: now,
                running: false,
            }),
        };
        if !state.running {
            state.duty.rested(now - state.since);
        }
        state.running = true;
        state.since = now;
        state.duty.due()
    });
    rest(due, cancel);
}

/// Called at every epoch tick of a capped task: rests for the run time since
/// the last tick, unless the task is cancelled meanwhile.
pub fn tick(cancel: Option<&CancelFlag>) {
    let due = CYCLE.with_borrow_mut(|cycle| match cycle {
        Some(state) => {
            let now = Instant::now();
            let due = state.duty.ran(now - state.since);
            state.since = now;
            due
        }
        None => Duration::ZERO,
    });
    rest(due, cancel);
}

/// Called when a capped task ends: its last stretch of running is owed, and
/// paid before the next task (or by idling), not before this one's report.
pub fn end() {
    CYCLE.with_borrow_mut(|cycle| {
        if let Some(state) = cycle {
            let now = Instant::now();
            state.duty.ran(now - state.since);
            state.since = now;
            state.running = false;
        }
    });
}

/// Sleeps for `due` in short naps, stopping early on cancellation, and
/// records the rest actually taken.
fn rest(due: Duration, cancel: Option<&CancelFlag>) {
    if due.is_zero() {
        return;
    }
    let started = Instant::now();
    loop {
        let left = due.saturating_sub(started.elapsed());
        if left.is_zero() || cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            break;
        }
        thread::sleep(left.min(MAX_NAP));
    }
    let now = Instant::now();
    CYCLE.with_borrow_mut(|cycle| {
        if let Some(state) = cycle {
            state.duty.rested(now - started);
            state.since = now;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn half_cap_rests_as_long_as_it_ran() {
        let mut duty = DutyCycle::new(50);
        assert_eq!(duty.ran(5 * MS), 5 * MS);
        duty.rested(5 * MS);
        assert_eq!(duty.due(), Duration::ZERO);
    }

    #[test]
    fn the_ratio_follows_the_percentage() {
        let mut duty = DutyCycle::new(20);
        // Run 5 ms, rest 20 ms: 5 / 25 = 20 %.
        assert_eq!(duty.ran(5 * MS), 20 * MS);
        let mut duty = DutyCycle::new(1);
        assert_eq!(duty.ran(5 * MS), 495 * MS);
        let mut duty = DutyCycle::new(75);
        assert_eq!(duty.ran(3 * MS), MS);
    }

    #[test]
    fn no_cap_never_rests() {
        let mut duty = DutyCycle::new(100);
        assert_eq!(duty.ran(Duration::from_secs(3600)), Duration::ZERO);
        assert_eq!(DutyCycle::new(250).percent(), 100);
        assert_eq!(DutyCycle::new(0).percent(), 1);
    }

    #[test]
    fn short_runs_add_up_to_one_rest() {
        let mut duty = DutyCycle::new(50);
        let step = Duration::from_micros(300);
        assert_eq!(duty.ran(step), Duration::ZERO);
        assert_eq!(duty.ran(step), Duration::ZERO);
        assert_eq!(duty.ran(step), Duration::ZERO);
        assert_eq!(duty.ran(step), Duration::from_micros(1200));
    }

    #[test]
    fn a_short_rest_leaves_the_rest_owed_and_idling_is_not_banked() {
        let mut duty = DutyCycle::new(50);
        duty.ran(10 * MS);
        duty.rested(4 * MS);
        assert_eq!(duty.due(), 6 * MS);
        duty.rested(Duration::from_secs(60));
        assert_eq!(duty.due(), Duration::ZERO);
        // The long idle spell bought nothing: the next run owes in full.
        assert_eq!(duty.ran(2 * MS), 2 * MS);
    }

    #[test]
    fn huge_runs_saturate_instead_of_overflowing() {
        let mut duty = DutyCycle::new(1);
        assert_eq!(duty.ran(Duration::MAX), Duration::MAX);
        assert_eq!(duty.ran(Duration::MAX), Duration::MAX);
    }
}
