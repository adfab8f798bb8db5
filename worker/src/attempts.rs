//! The attempts a joined worker holds (queued on a slot or running), with
//! what it needs to cancel them, take back those not started, and know when
//! none is left.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;
use wasmgrid_protocol::wire::AttemptId;

use crate::executor::{CancelFlag, TaskState};

struct Held {
    cancel: CancelFlag,
    state: TaskState,
}

/// Shared between the session (which adds, cancels and takes back) and the
/// slot threads' replies (which remove what finished).
#[derive(Clone, Default)]
pub struct Attempts {
    held: Arc<Mutex<HashMap<AttemptId, Held>>>,
    /// Woken whenever an attempt leaves.
    left: Arc<Notify>,
}

impl Attempts {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<AttemptId, Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds a new attempt; returns the flag that cancels it and the state
    /// that lets it be taken back, both for [`crate::executor::Tracking`].
    pub fn add(&self, attempt: AttemptId) -> (CancelFlag, TaskState) {
        let held = Held {
            cancel: CancelFlag::default(),
            state: TaskState::new(),
        };
        let handles = (held.cancel.clone(), held.state.clone());
        if let Some(earlier) = self.lock().insert(attempt, held) {
            // The foreman reused an attempt id: stop the older one rather than leak it.
            tracing::warn!(attempt, "the foreman assigned an attempt twice");
            earlier.state.try_take_back();
            earlier.cancel.store(true, Ordering::Relaxed);
        }
        handles
    }

    /// An attempt finished (its report is on its way); `state` is the one
    /// [`Attempts::add`] gave it, so a stale reply never removes a newer attempt.
    pub fn finished(&self, attempt: AttemptId, state: &TaskState) {
        let mut held = self.lock();
        if held.get(&attempt).is_some_and(|h| h.state.same_as(state)) {
            held.remove(&attempt);
        }
        drop(held);
        self.left.notify_one();
    }

    /// Stops these attempts (unknown ids are ignored: they already finished).
    pub fn cancel(&self, attempts: &[AttemptId]) {
        let held = self.lock();
        for attempt in attempts {
            if let Some(held) = held.get(attempt) {
                held.cancel.store(true, Ordering::Relaxed);
            }
        }
    }

    /// Takes back every attempt no slot has started: they will never run or
    /// report, and are no longer held. Returns their ids.
    pub fn take_back_unstarted(&self) -> Vec<AttemptId> {
        let all: Vec<AttemptId> = self.lock().keys().copied().collect();
        self.take_back(&all)
    }

    /// Takes back those of `attempts` no slot has started (unknown ids are
    /// ignored: they already finished). Returns their ids, in order.
    pub fn take_back(&self, attempts: &[AttemptId]) -> Vec<AttemptId> {
        self.take_back_at_most(attempts, usize::MAX)
    }

    /// Answers the foreman's `GiveBack`: of `asked` (newest first), takes
    /// back as large a share as it asked of the `believed` unstarted
    /// attempts, counted on those really unstarted here. Its count lags
    /// this worker's held-back reports, and handing back all it asked then
    /// would leave this worker too little and swing the job's end the
    /// other way.
    pub fn give_back(&self, asked: &[AttemptId], believed: u32) -> Vec<AttemptId> {
        let unstarted = self
            .lock()
            .values()
            .filter(|h| !h.state.has_started())
            .count();
        let believed = believed as usize;
        let share = if believed == 0 || unstarted >= believed {
            asked.len()
        } else {
            (asked.len() * unstarted + believed / 2) / believed
        };
        self.take_back_at_most(asked, share)
    }

    fn take_back_at_most(&self, attempts: &[AttemptId], most: usize) -> Vec<AttemptId> {
        let mut held = self.lock();
        let mut taken: Vec<AttemptId> = attempts
            .iter()
            .copied()
            .filter(|attempt| held.get(attempt).is_some_and(|h| h.state.try_take_back()))
            .take(most)
            .collect();
        for attempt in &taken {
            held.remove(attempt);
        }
        drop(held);
        if !taken.is_empty() {
            self.left.notify_one();
        }
        taken.sort_unstable();
        taken.dedup();
        taken
    }

    /// Cancels every attempt held; each still reports (as `Cancelled`).
    pub fn cancel_all(&self) {
        for held in self.lock().values() {
            held.cancel.store(true, Ordering::Relaxed);
        }
    }

    /// Gives up on everything held (the connection is gone): takes back what
    /// has not started and cancels the rest, so no slot works for nobody.
    pub fn abandon(&self) {
        let taken = self.take_back_unstarted();
        self.cancel_all();
        if !taken.is_empty() {
            tracing::debug!(count = taken.len(), "dropped unstarted attempts");
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Resolves after an attempt leaves (or at once if one left since the last call).
    pub async fn one_left(&self) {
        self.left.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use wasmgrid_protocol::{FailureKind, TaskReport};

    use super::*;
    use crate::executor::test_support::{executor, patient_limits, test_task, SPIN};
    use crate::executor::{SlotPool, Tracking};

    const PATIENCE: Duration = Duration::from_secs(60);

    const SPINNER: AttemptId = 10;

    /// Attempts on a one-slot pool: SPINNER spins (running once this
    /// returns), `queued` answer at once but wait behind it. Reports arrive
    /// on the receiver as (attempt, report).
    fn behind_a_spinner(
        attempts: &Attempts,
        queued: &[AttemptId],
    ) -> (SlotPool, mpsc::Receiver<(AttemptId, TaskReport)>) {
        let executor = executor(1);
        let (task, load) = test_task(&executor);
        let pool = SlotPool::new(executor.clone(), 1).unwrap();
        let (tx, rx) = mpsc::channel();
        let spinner = std::iter::once((SPINNER, SPIN));
        for (attempt, args) in spinner.chain(queued.iter().map(|&a| (a, "[]"))) {
            let (cancel, state) = attempts.add(attempt);
            let tx = tx.clone();
            let held = attempts.clone();
            let mine = state.clone();
            pool.submit_tracked(
                task.clone(),
                load,
                args.into(),
                patient_limits(),
                Tracking::new(cancel, state),
                move |report| {
                    let _ = tx.send((attempt, report));
                    held.finished(attempt, &mine);
                },
            );
        }
        let waiting = Instant::now();
        while pool.running() == 0 {
            assert!(waiting.elapsed() < PATIENCE, "the spinner never started");
            std::thread::sleep(Duration::from_millis(1));
        }
        (pool, rx)
    }

    #[test]
    fn draining_hands_back_the_queued_and_cancels_the_running() {
        let attempts = Attempts::new();
        let (pool, rx) = behind_a_spinner(&attempts, &[11, 12]);
        assert_eq!(attempts.take_back_unstarted(), vec![11, 12]);
        assert_eq!(attempts.len(), 1, "the running attempt is still held");
        assert!(attempts.take_back_unstarted().is_empty());

        attempts.cancel_all();
        let (attempt, report) = rx.recv_timeout(PATIENCE).unwrap();
        assert_eq!(attempt, SPINNER);
        assert_eq!(report.outcome.unwrap_err().kind, FailureKind::Cancelled);
        drop(pool);
        assert_eq!(rx.iter().count(), 0, "a handed-back attempt ran");
        assert!(attempts.is_empty());
    }

    #[test]
    fn giving_back_hands_over_only_the_asked_for_attempts_not_started() {
        let attempts = Attempts::new();
        let (pool, rx) = behind_a_spinner(&attempts, &[11, 12, 13]);
        // The spinner runs, 99 is unknown, 11 was not asked for.
        assert_eq!(attempts.take_back(&[13, SPINNER, 99, 12, 13]), vec![12, 13]);
        assert_eq!(attempts.len(), 2);

        attempts.cancel(&[SPINNER]);
        let mut reports: Vec<_> = (0..2).map(|_| rx.recv_timeout(PATIENCE).unwrap()).collect();
        reports.sort_by_key(|(attempt, _)| *attempt);
        assert_eq!(reports[0].0, SPINNER);
        assert_eq!(
            reports[0].1.outcome.as_ref().unwrap_err().kind,
            FailureKind::Cancelled
        );
        assert_eq!(reports[1].0, 11);
        assert!(reports[1].1.outcome.is_ok(), "{:?}", reports[1].1.outcome);
        drop(pool);
        assert_eq!(rx.iter().count(), 0, "a handed-back attempt ran");
        assert!(attempts.is_empty());
    }

    #[test]
    fn giving_back_scales_the_share_asked_to_the_real_queue() {
        let attempts = Attempts::new();
        for attempt in 1..=6 {
            attempts.add(attempt);
        }
        // Asked 4 of the 12 believed unstarted: a third of the 6 there are.
        assert_eq!(attempts.give_back(&[6, 5, 4, 3], 12), vec![5, 6]);
        // Believed no more than there are: all that was asked.
        assert_eq!(attempts.give_back(&[4, 3, 99], 4), vec![3, 4]);
        assert_eq!(attempts.give_back(&[2], 0), vec![2]);
        assert_eq!(attempts.len(), 1);
    }

    #[test]
    fn cancelling_an_unknown_attempt_is_harmless() {
        let attempts = Attempts::new();
        let (cancel, state) = attempts.add(1);
        attempts.cancel(&[2, 3]);
        assert!(!cancel.load(Ordering::Relaxed));
        attempts.cancel(&[1]);
        assert!(cancel.load(Ordering::Relaxed));
        attempts.finished(1, &state);
        attempts.finished(1, &state);
        assert!(attempts.is_empty());
    }

    #[test]
    fn a_reused_attempt_id_stops_the_older_one() {
        let attempts = Attempts::new();
        let (old_cancel, old_state) = attempts.add(7);
        let (new_cancel, new_state) = attempts.add(7);
        assert!(old_cancel.load(Ordering::Relaxed));
        assert!(!old_state.try_take_back(), "already taken back");
        assert!(!new_cancel.load(Ordering::Relaxed));
        // The older one's late reply does not remove the newer one.
        attempts.finished(7, &old_state);
        assert_eq!(attempts.len(), 1);
        attempts.finished(7, &new_state);
        assert!(attempts.is_empty());
    }

    #[tokio::test]
    async fn a_leaving_attempt_wakes_the_waiter_even_if_it_left_first() {
        let attempts = Attempts::new();
        let (_, state) = attempts.add(1);
        attempts.finished(1, &state);
        tokio::time::timeout(PATIENCE, attempts.one_left())
            .await
            .expect("the permit is kept");
    }
}
