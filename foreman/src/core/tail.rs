//! The end of a job: once nothing is queued, a worker with nothing queued
//! behind its running tasks takes over part of what another holds
//! unstarted, so a job's last tasks do not wait in one worker's prefetch
//! window while another worker idles.
//!
//! The core asks the holder ([`Command::Recall`]) as soon as the taker has
//! started its last queued task (it reports then), so the handed-over tasks
//! arrive about when its slots free up. The holder hands back those it has
//! not started, scaled to its real queue (the core's count lags the reports
//! it holds back), and they go to the taker first. The share asked balances
//! when both finish, by their speeds.

use std::collections::BinaryHeap;

use rustc_hash::FxHashMap as HashMap;
use wasmgrid_protocol::wire::AttemptId;

use super::dispatch::Batches;
use super::pool::Worker;
use super::{Command, Core};
use crate::model::{JobId, TaskIndex, WorkerId};

/// How long a recalled task takes to start on the idle worker: the recall,
/// the hand-back and the send, each a message between machines whose cores
/// are busy (measured on loopback: 0.4–0.8 ms). Tasks much shorter than
/// this are not worth recalling.
const RECALL_LATENCY_US: f64 = 1_000.0;

/// Attempts asked back from their worker, each with the idle worker it is for.
#[derive(Debug, Default)]
pub(super) struct Recalls {
    meant_for: HashMap<AttemptId, WorkerId>,
}

/// A worker with idle slots, and how much more it may be sent.
struct Idle {
    id: WorkerId,
    /// Slots idle now or once their running tasks end.
    idle_slots: usize,
    /// Whether some of them still run a task.
    running: bool,
    room: usize,
}

impl Core {
    /// When no task is queued, asks the workers that hold the most unstarted
    /// attempts to hand a share to workers with idle slots. O(1) unless some
    /// worker both idles and could take work while another queues some.
    pub(super) fn even_out_tail(&mut self) {
        if self.queued > 0 || self.pool.queued_behind() == 0 || !self.pool.any_ready() {
            return;
        }
        let live = &self.live;
        self.recalls
            .meant_for
            .retain(|attempt, _| live.contains_key(attempt));
        // Attempts already asked of each worker, and already coming to each.
        let mut asked: HashMap<WorkerId, usize> = HashMap::default();
        let mut coming: HashMap<WorkerId, usize> = HashMap::default();
        for (attempt, idle) in &self.recalls.meant_for {
            if let Some(held) = self.live.get(attempt) {
                *asked.entry(held.worker).or_default() += 1;
            }
            *coming.entry(*idle).or_default() += 1;
        }
        let idle: Vec<Idle> = self
            .pool
            .by_speed()
            .filter_map(|id| {
                let w = self.pool.get(id)?;
                let coming = coming.get(&id).copied().unwrap_or(0);
                let slots = w.slots as usize;
                // Nothing queued behind its running tasks: its slots idle
                // as those end, so work asked back now starts sooner.
                (coming < slots && w.held.len() + coming <= slots).then(|| Idle {
                    id,
                    idle_slots: slots - coming,
                    running: !w.held.is_empty(),
                    room: (w.free as usize).saturating_sub(coming),
                })
            })
            .collect();
        if idle.is_empty() {
            return;
        }
        let mut holders: BinaryHeap<(usize, WorkerId)> = self
            .pool
            .iter()
            .filter(|(_, w)| !w.draining)
            .filter_map(|(id, w)| {
                let spare = w
                    .queued_behind()
                    .saturating_sub(asked.get(&id).copied().unwrap_or(0));
                (spare > 0).then_some((spare, id))
            })
            .collect();
        // Per holder: the attempts asked, and how many it had unstarted then.
        let mut recalls: Vec<(WorkerId, Vec<AttemptId>, usize)> = Vec::new();
        for idle in idle {
            let Some((spare, holder)) = holders.pop() else {
                break;
            };
            let (Some(thief), Some(victim)) = (self.pool.get(idle.id), self.pool.get(holder))
            else {
                continue;
            };
            // A running task has half of its time left, on average.
            let latency = self.recall_latency_in_tasks(victim);
            let start = if idle.running {
                latency.max(0.5)
            } else {
                latency
            };
            let share = fair_share(thief, idle.idle_slots, victim, spare, start).min(idle.room);
            let picked = self.pick_unstarted(holder, idle.id, share);
            for &attempt in &picked {
                self.recalls.meant_for.insert(attempt, idle.id);
            }
            let left = spare - picked.len();
            if !picked.is_empty() {
                match recalls.iter_mut().find(|(w, _, _)| *w == holder) {
                    Some((_, attempts, _)) => attempts.extend(picked),
                    None => recalls.push((holder, picked, spare)),
                }
            }
            if left > 0 {
                holders.push((left, holder));
            }
        }
        for (worker, attempts, believed) in recalls {
            self.commands.push_back(Command::Recall {
                worker,
                attempts,
                believed_unstarted: u32::try_from(believed).unwrap_or(u32::MAX),
            });
        }
    }

    /// [`RECALL_LATENCY_US`] in tasks of the job of the holder's newest
    /// attempt (0 while the job's task time is unknown).
    fn recall_latency_in_tasks(&self, holder: &Worker) -> f64 {
        let task_us = holder
            .held
            .keys()
            .max()
            .and_then(|attempt| self.live.get(attempt))
            .and_then(|held| self.jobs.get(&held.job))
            .map_or(0.0, |job| job.task_us);
        if task_us > 0.0 {
            RECALL_LATENCY_US / task_us
        } else {
            0.0
        }
    }

    /// Up to `count` of `holder`'s newest attempts (the last it would
    /// start) not yet asked back, whose tasks fit `idle`'s memory.
    fn pick_unstarted(&self, holder: WorkerId, idle: WorkerId, count: usize) -> Vec<AttemptId> {
        let (Some(h), Some(i)) = (self.pool.get(holder), self.pool.get(idle)) else {
            return Vec::new();
        };
        if count == 0 {
            return Vec::new();
        }
        let mut newest: Vec<AttemptId> = h.held.keys().copied().collect();
        newest.sort_unstable_by(|a, b| b.cmp(a));
        newest
            .into_iter()
            .take(h.queued_behind())
            .filter(|a| !self.recalls.meant_for.contains_key(a))
            .filter(|a| {
                self.live
                    .get(a)
                    .is_some_and(|held| i.fits(self.memory_limit(held.job)))
            })
            .take(count)
            .collect()
    }

    /// The idle worker an attempt handed back was asked back for, if any
    /// (forgotten once asked).
    pub(super) fn recalled_for(&mut self, attempt: AttemptId) -> Option<WorkerId> {
        self.recalls.meant_for.remove(&attempt)
    }

    /// Starts tasks just handed back (now at the front of their jobs'
    /// queues) on the idle workers they were asked back for, where those
    /// still have room; the rest wait for the next dispatch.
    pub(super) fn hand_to_idle(&mut self, handed: &[(JobId, TaskIndex, WorkerId)]) {
        let mut out = Batches::default();
        for &(job, _, idle) in handed {
            if self.can_take(job, idle, self.memory_limit(job)) {
                self.give_one(job, idle, &mut out);
            }
        }
        self.send(out);
    }
}

/// How many of `spare` queued attempts the idle worker should take so that
/// the later of the two finishes soonest. Time is counted in tasks on one
/// of the holder's slots: the holder's work left is its queue plus its
/// running tasks (half done, on average); the idle worker starts `latency`
/// late and goes at its speed relative to the holder's (equal unless both
/// are known).
pub(super) fn fair_share(
    thief: &Worker,
    idle_slots: usize,
    victim: &Worker,
    spare: usize,
    latency: f64,
) -> usize {
    let relative_speed = if thief.speed > 0.0 && victim.speed > 0.0 {
        thief.speed / victim.speed
    } else {
        1.0
    };
    let thief_rate = idle_slots as f64 * relative_speed;
    let victim_rate = f64::from(victim.slots);
    let work = spare as f64 + f64::from(victim.slots) / 2.0;
    let finish = |k: usize| {
        let holder = (work - k as f64) / victim_rate;
        if k == 0 {
            holder
        } else {
            holder.max(latency + k as f64 / thief_rate)
        }
    };
    let balanced =
        ((work - latency * victim_rate) * thief_rate / (thief_rate + victim_rate)).max(0.0);
    let (low, high) = (balanced.floor() as usize, balanced.ceil() as usize);
    let mut best = 0;
    for k in [low.min(spare), high.min(spare)] {
        if finish(k) < finish(best) {
            best = k;
        }
    }
    best
}
