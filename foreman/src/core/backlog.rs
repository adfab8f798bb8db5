//! Telling workers whether tasks wait at the foreman for their credit.
//! While none waits, a worker may hold its reports for company: the credit
//! they return could not be used yet, and at the end of every job each
//! report would otherwise cost a message and a wakeup on both sides.

use rustc_hash::FxHashSet as HashSet;

use super::{Command, Core};
use crate::model::WorkerId;

/// What the connected workers were told. A worker that has not been told
/// assumes tasks wait (as it does on connecting).
#[derive(Debug, Default)]
pub(super) struct BacklogNotices {
    /// Workers told that nothing waits.
    told_none: HashSet<WorkerId>,
    /// The state as last announced: nothing waits.
    none_waiting: bool,
    /// A worker connected since the last announcement.
    joined: bool,
}

impl BacklogNotices {
    pub(super) fn joined(&mut self, worker: WorkerId) {
        self.told_none.remove(&worker);
        self.joined = true;
    }

    pub(super) fn left(&mut self, worker: WorkerId) {
        self.told_none.remove(&worker);
    }
}

impl Core {
    /// Tells each worker whose view is out of date, after a dispatch.
    /// Costs one comparison while nothing changes.
    pub(super) fn announce_backlog(&mut self) {
        let none_waiting = self.queued == 0;
        let notices = &mut self.backlog;
        if none_waiting == notices.none_waiting && !notices.joined {
            return;
        }
        notices.none_waiting = none_waiting;
        notices.joined = false;
        let mut to_tell: Vec<WorkerId> = if none_waiting {
            let pool = &self.pool;
            pool.iter()
                .map(|(worker, _)| worker)
                .filter(|&worker| notices.told_none.insert(worker))
                .collect()
        } else {
            notices.told_none.drain().collect()
        };
        to_tell.sort_unstable();
        self.commands
            .extend(to_tell.into_iter().map(|worker| Command::Backlog {
                worker,
                waiting: !none_waiting,
            }));
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{args, ok, spec, Harness};
    use super::*;

    fn backlog(commands: &[Command]) -> Vec<(WorkerId, bool)> {
        commands
            .iter()
            .filter_map(|c| match c {
                Command::Backlog { worker, waiting } => Some((*worker, *waiting)),
                _ => None,
            })
            .collect()
    }

    fn dispatch(h: &mut Harness) -> Vec<Command> {
        h.core.dispatch();
        h.drain()
    }

    #[test]
    fn workers_hear_once_when_the_queue_empties_and_when_it_fills_again() {
        let mut h = Harness::new();
        h.worker(1, 2);
        h.worker(2, 2);
        h.core.submit_job(spec(1, 6, 0), args(6));
        // Two tasks still wait: the workers assume so already.
        let first = dispatch(&mut h);
        assert_eq!(backlog(&first), []);
        let sent: Vec<_> = super::super::tests::sends(&first);
        let (worker, attempt) = (sent[0].0, sent[0].1[0]);
        // Each report returns its credit: one more is sent; one still waits.
        h.finish(worker, attempt, ok());
        assert_eq!(backlog(&dispatch(&mut h)), []);
        let other = if worker == 1 { 2 } else { 1 };
        h.finish(
            other,
            sent.iter().find(|(w, _)| *w == other).unwrap().1[0],
            ok(),
        );
        // The last one is sent: nothing waits, and both hear it once.
        assert_eq!(backlog(&dispatch(&mut h)), [(1, false), (2, false)]);
        assert_eq!(backlog(&dispatch(&mut h)), []);
        // A new job with more tasks than credit: tasks wait again.
        h.core.submit_job(spec(2, 5, 0), args(5));
        assert_eq!(backlog(&dispatch(&mut h)), [(1, true), (2, true)]);
        assert_eq!(backlog(&dispatch(&mut h)), []);
    }

    #[test]
    fn a_worker_joining_while_nothing_waits_is_told_and_a_gone_one_is_not() {
        let mut h = Harness::new();
        h.worker(1, 4);
        h.core.submit_job(spec(1, 1, 0), args(1));
        assert_eq!(backlog(&dispatch(&mut h)), [(1, false)]);
        h.worker(2, 4);
        assert_eq!(backlog(&dispatch(&mut h)), [(2, false)]);
        // Worker 1 reconnects: its new session assumes tasks wait.
        h.worker(1, 4);
        assert_eq!(backlog(&dispatch(&mut h)), [(1, false)]);
        h.core.worker_left(2);
        h.core.submit_job(spec(2, 9, 0), args(9));
        assert_eq!(backlog(&dispatch(&mut h)), [(1, true)]);
    }
}
