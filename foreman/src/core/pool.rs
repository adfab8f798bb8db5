//! The connected workers as the core accounts for them (credit, held
//! attempts, reserved memory, learned speed, cooldown, drain), and three
//! indexes over those ready for work: a rotation, by load and by speed.
//! Each index answers "who next" in O(log n); the rotation's stale entries
//! are skipped when they reach the front, never searched for.

use std::cmp::Reverse;
use std::collections::{BTreeSet, VecDeque};

use rustc_hash::FxHashMap as HashMap;

use wasmgrid_protocol::wire::AttemptId;

use crate::model::WorkerId;

/// What a worker announced about itself when it joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerSpec {
    pub slots: u32,
    /// 0 when unknown: every task fits.
    pub memory_bytes: u64,
    /// Fuel per second per slot on the worker's own benchmark; 0 when unknown.
    pub benchmark_fuel_per_sec: u64,
}

impl WorkerSpec {
    pub fn with_slots(slots: u32) -> Self {
        WorkerSpec {
            slots,
            memory_bytes: 0,
            benchmark_fuel_per_sec: 0,
        }
    }
}

/// Weight of the newest observation in a worker's speed.
const SPEED_EWMA_ALPHA: f64 = 0.3;
/// Fixed-point scale of a worker's load (held attempts per slot) in the index.
const LOAD_SCALE: u64 = 1 << 20;

#[derive(Debug)]
pub(super) struct Worker {
    pub(super) slots: u32,
    pub(super) memory_bytes: u64,
    /// Credit granted and not yet used: how many more attempts it may be sent.
    pub(super) free: u32,
    /// Attempts it holds now (sent, not yet reported, cancelled or lost),
    /// with the memory each reserves.
    pub(super) held: HashMap<AttemptId, u64>,
    pub(super) reserved_bytes: u64,
    /// Fuel per second per slot: reports' EWMA, seeded by the benchmark; 0 unknown.
    pub(super) speed: f64,
    /// Leaving: takes no more work.
    pub(super) draining: bool,
    /// Takes no work until this time (unix ms).
    pub(super) cooling_until: Option<u64>,
    /// Tells this incarnation's rotation entries from those of an earlier
    /// worker with the same id.
    epoch: u64,
    in_ring: bool,
    /// Its keys in the load and speed indexes, while it is in them.
    indexed_load: Option<u64>,
    indexed_speed: Option<u64>,
}

impl Worker {
    /// Takes work now: has credit and is neither leaving nor cooling down.
    pub(super) fn ready(&self) -> bool {
        self.free > 0 && self.eligible()
    }

    /// May take work once it has credit.
    pub(super) fn eligible(&self) -> bool {
        !self.draining && self.cooling_until.is_none()
    }

    /// A task with this memory limit may be sent here: every slot can run
    /// one at once, or what the worker holds plus this still fits its memory.
    pub(super) fn fits(&self, limit_bytes: u64) -> bool {
        self.memory_bytes == 0
            || limit_bytes <= self.memory_bytes / u64::from(self.slots.max(1))
            || self.reserved_bytes.saturating_add(limit_bytes) <= self.memory_bytes
    }

    /// Attempts it holds beyond one per slot: those queued behind busy slots.
    pub(super) fn queued_behind(&self) -> usize {
        self.held.len().saturating_sub(self.slots as usize)
    }

    fn load_key(&self) -> u64 {
        self.held.len() as u64 * LOAD_SCALE / u64::from(self.slots.max(1))
    }
}

/// The connected workers and the indexes over those ready for work.
#[derive(Debug, Default)]
pub(super) struct Pool {
    workers: HashMap<WorkerId, Worker>,
    ring: VecDeque<(WorkerId, u64)>,
    by_load: BTreeSet<(u64, WorkerId)>,
    by_speed: BTreeSet<(Reverse<u64>, WorkerId)>,
    /// Whether `by_load` is kept: only while a job needs it, since it moves
    /// on every task taken or returned.
    track_load: bool,
    next_epoch: u64,
    /// Sum of every worker's [`Worker::queued_behind`].
    queued_behind: usize,
}

impl Pool {
    pub(super) fn get(&self, id: WorkerId) -> Option<&Worker> {
        self.workers.get(&id)
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (WorkerId, &Worker)> {
        self.workers.iter().map(|(id, w)| (*id, w))
    }

    /// Attempts queued behind busy slots, over all workers.
    pub(super) fn queued_behind(&self) -> usize {
        self.queued_behind
    }

    pub(super) fn any_ready(&self) -> bool {
        !self.by_speed.is_empty()
    }

    /// Ready workers, least loaded first (see [`Pool::track_load`]).
    pub(super) fn by_load(&self) -> impl Iterator<Item = WorkerId> + '_ {
        self.by_load.iter().map(|(_, id)| *id)
    }

    /// Keeps the load index from now on (building it), or drops it.
    pub(super) fn track_load(&mut self, on: bool) {
        if on == self.track_load {
            return;
        }
        self.track_load = on;
        self.by_load.clear();
        for (id, w) in &mut self.workers {
            w.indexed_load = (on && w.ready()).then(|| w.load_key());
            if let Some(load) = w.indexed_load {
                self.by_load.insert((load, *id));
            }
        }
    }

    /// Ready workers, fastest first.
    pub(super) fn by_speed(&self) -> impl Iterator<Item = WorkerId> + '_ {
        self.by_speed.iter().map(|(_, id)| *id)
    }

    pub(super) fn join(&mut self, id: WorkerId, spec: WorkerSpec) {
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        self.workers.insert(
            id,
            Worker {
                slots: spec.slots.max(1),
                memory_bytes: spec.memory_bytes,
                free: 0,
                held: HashMap::default(),
                reserved_bytes: 0,
                speed: spec.benchmark_fuel_per_sec as f64,
                draining: false,
                cooling_until: None,
                epoch,
                in_ring: false,
                indexed_load: None,
                indexed_speed: None,
            },
        );
    }

    /// Removes the worker with its credit; its rotation entry goes stale.
    pub(super) fn leave(&mut self, id: WorkerId) -> Option<Worker> {
        let worker = self.workers.remove(&id)?;
        self.queued_behind -= worker.queued_behind();
        if let Some(load) = worker.indexed_load {
            self.by_load.remove(&(load, id));
        }
        if let Some(speed) = worker.indexed_speed {
            self.by_speed.remove(&(Reverse(speed), id));
        }
        Some(worker)
    }

    pub(super) fn grant(&mut self, id: WorkerId, n: u32) {
        if let Some(w) = self.workers.get_mut(&id) {
            w.free = w.free.saturating_add(n);
        }
        self.sync(id);
    }

    /// The worker was handed `attempt`, reserving `memory` bytes: it uses one credit.
    pub(super) fn take(&mut self, id: WorkerId, attempt: AttemptId, memory: u64) {
        if let Some(w) = self.workers.get_mut(&id) {
            w.free = w.free.saturating_sub(1);
            let before = w.queued_behind();
            w.held.insert(attempt, memory);
            self.queued_behind += w.queued_behind() - before;
            w.reserved_bytes = w.reserved_bytes.saturating_add(memory);
        }
        self.sync(id);
    }

    /// The worker no longer holds `attempt` (reported or cancelled): its
    /// credit comes back.
    pub(super) fn release(&mut self, id: WorkerId, attempt: AttemptId) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        let before = w.queued_behind();
        if let Some(memory) = w.held.remove(&attempt) {
            self.queued_behind -= before - w.queued_behind();
            w.reserved_bytes = w.reserved_bytes.saturating_sub(memory);
            w.free = w.free.saturating_add(1);
            self.sync(id);
        }
    }

    /// Folds one report's speed (fuel per second on one slot) into the worker's.
    pub(super) fn observe_speed(&mut self, id: WorkerId, fuel_per_sec: f64) {
        if let Some(w) = self.workers.get_mut(&id) {
            w.speed = if w.speed > 0.0 {
                (1.0 - SPEED_EWMA_ALPHA) * w.speed + SPEED_EWMA_ALPHA * fuel_per_sec
            } else {
                fuel_per_sec
            };
        }
        self.sync(id);
    }

    pub(super) fn set_draining(&mut self, id: WorkerId) {
        if let Some(w) = self.workers.get_mut(&id) {
            w.draining = true;
        }
        self.sync(id);
    }

    pub(super) fn set_cooling(&mut self, id: WorkerId, until: Option<u64>) {
        if let Some(w) = self.workers.get_mut(&id) {
            w.cooling_until = until;
        }
        self.sync(id);
    }

    /// Brings the indexes in line with the worker's state.
    fn sync(&mut self, id: WorkerId) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        let ready = w.ready();
        let speed = ready.then_some(w.speed as u64);
        if speed != w.indexed_speed {
            if let Some(old) = w.indexed_speed {
                self.by_speed.remove(&(Reverse(old), id));
            }
            if let Some(new) = speed {
                self.by_speed.insert((Reverse(new), id));
            }
            w.indexed_speed = speed;
        }
        let load = (ready && self.track_load).then(|| w.load_key());
        if load != w.indexed_load {
            if let Some(old) = w.indexed_load {
                self.by_load.remove(&(old, id));
            }
            if let Some(new) = load {
                self.by_load.insert((new, id));
            }
            w.indexed_load = load;
        }
        if w.ready() && !w.in_ring {
            w.in_ring = true;
            self.ring.push_back((id, w.epoch));
        }
    }

    /// Entries in the rotation, stale ones included (an upper bound on the
    /// number of ready workers).
    pub(super) fn ring_len(&self) -> usize {
        self.ring.len()
    }

    /// Takes the next ready worker out of the rotation; put it back with
    /// [`Pool::enlist`].
    pub(super) fn next_in_ring(&mut self) -> Option<WorkerId> {
        while let Some((id, epoch)) = self.ring.pop_front() {
            let Some(w) = self.workers.get_mut(&id) else {
                continue;
            };
            if w.epoch != epoch || !w.in_ring {
                continue;
            }
            w.in_ring = false;
            if w.ready() {
                return Some(id);
            }
        }
        None
    }

    /// Puts the worker back in the rotation if it is ready and not there
    /// yet: at the front (it is next) or at the back (its turn is over).
    pub(super) fn enlist(&mut self, id: WorkerId, front: bool) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        if w.in_ring || !w.ready() {
            return;
        }
        w.in_ring = true;
        if front {
            self.ring.push_front((id, w.epoch));
        } else {
            self.ring.push_back((id, w.epoch));
        }
    }
}
