//! Attempts that start and end within one batch: their start is folded into
//! their end, so the attempt costs one insert and one task update instead of
//! a select, two updates and an upsert (most attempts of short tasks).

use std::collections::{HashMap, HashSet};

use super::Change;
use crate::model::{JobState, Record};

/// The attempts of a batch to fold, and when each started once its start
/// record has gone by.
#[derive(Debug, Default)]
pub(in crate::store) struct Folds {
    attempts: HashMap<u64, Option<i64>>,
}

impl Folds {
    /// Every attempt whose start and end are both among `changes`, except
    /// in jobs cancelled in the batch: a cancel updates the job's queued
    /// tasks, and the folded task would still look queued in between.
    pub(super) fn plan(changes: &[Change]) -> Self {
        let mut started = HashSet::new();
        let mut ended = Vec::new();
        let mut cancelled = HashSet::new();
        for change in changes {
            let Change::Record { record, .. } = change else {
                continue;
            };
            match record {
                Record::AttemptStarted { attempt, .. } => {
                    started.insert(*attempt);
                }
                Record::AttemptEnded { attempt, job, .. }
                | Record::AttemptAbandoned { attempt, job, .. } => ended.push((*attempt, *job)),
                Record::JobStateChanged {
                    job,
                    state: JobState::Cancelled,
                } => {
                    cancelled.insert(*job);
                }
                _ => {}
            }
        }
        let attempts = ended
            .into_iter()
            .filter(|(attempt, job)| started.contains(attempt) && !cancelled.contains(job))
            .map(|(attempt, _)| (attempt, None))
            .collect();
        Folds { attempts }
    }

    /// At the attempt's start: whether to skip its writes (then its end
    /// makes them), remembering when it started.
    pub(super) fn defer_start(&mut self, attempt: u64, started_at_ms: i64) -> bool {
        match self.attempts.get_mut(&attempt) {
            Some(slot) => {
                *slot = Some(started_at_ms);
                true
            }
            None => false,
        }
    }

    /// At the attempt's end: when it started, if its start was skipped.
    pub(super) fn take_start(&mut self, attempt: u64) -> Option<i64> {
        self.attempts.remove(&attempt).flatten()
    }
}
