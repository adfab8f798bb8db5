//! The foreman's vocabulary, shared by the core (decisions), the store
//! (durability) and the API (what people see).

use serde::{Deserialize, Serialize};
use wasmgrid_protocol::wire::{AttemptId, ModuleHash};
use wasmgrid_protocol::{TaskLimits, TaskReport};

pub type JobId = u64;
pub type WorkerId = u64;
/// A task's position in its job's `args.json`.
pub type TaskIndex = u32;

/// What a job asks for, fixed when it is accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    pub id: JobId,
    pub module: ModuleHash,
    pub limits: TaskLimits,
    /// Extra attempts a task gets after infrastructure failures (`WorkerLost`, `Timeout`).
    pub max_retries: u32,
    /// Higher runs first (used by the priority scheduler).
    pub priority: i32,
    pub task_count: u32,
    /// Where the job's tasks go.
    pub scheduler: Scheduler,
    /// The job stays queued until this time (unix milliseconds).
    pub not_before_ms: Option<u64>,
    /// Retry deterministic failures too (`OutOfFuel`, `Trap`, ...), within
    /// `max_retries`: for a guest that is not as deterministic as it should be.
    pub retry_deterministic: bool,
}

/// Parsed with job submissions, which name them.
pub use wasmgrid_jobspec::{Scheduler, UnknownScheduler};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Accepted; no task has started yet.
    Queued,
    Running,
    /// Every task succeeded.
    Completed,
    /// Every task ended and at least one failed.
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Failed | JobState::Cancelled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl TaskState {
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            TaskState::Succeeded | TaskState::Failed | TaskState::Cancelled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Queued => "queued",
            TaskState::Running => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
        }
    }
}

/// A change the core made that must be made durable. The store applies
/// these in order, in batches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// An attempt was handed to a worker; the task is now `Running`.
    AttemptStarted {
        job: JobId,
        task: TaskIndex,
        attempt: AttemptId,
        worker: WorkerId,
        /// When it was handed out (unix ms): its start commits a little later.
        at_ms: u64,
    },
    /// An attempt ended with a report (success or a named failure). `task_state`
    /// is the task's state afterwards: `Queued` again when it will be retried.
    AttemptEnded {
        job: JobId,
        task: TaskIndex,
        attempt: AttemptId,
        worker: WorkerId,
        /// Boxed: commands stay small, and most of them are not this one.
        report: Box<TaskReport>,
        task_state: TaskState,
    },
    /// An attempt ended without a report (its worker went away, or it was
    /// cancelled): `kind` is `WorkerLost` or `Cancelled`.
    AttemptAbandoned {
        job: JobId,
        task: TaskIndex,
        attempt: AttemptId,
        worker: WorkerId,
        failure: wasmgrid_protocol::Failure,
        task_state: TaskState,
    },
    JobStateChanged {
        job: JobId,
        state: JobState,
    },
    /// The worker had too many infrastructure failures lately and gets no
    /// tasks until `until_ms` (unix milliseconds).
    WorkerCooledDown {
        worker: WorkerId,
        until_ms: u64,
        recent_failures: u32,
    },
    /// The worker broke the protocol and was cut off; kept in its failure
    /// history as `ProtocolViolation` (an attempt's own violation is an
    /// `AttemptAbandoned` with that kind instead).
    WorkerViolation {
        worker: WorkerId,
        message: String,
    },
}
