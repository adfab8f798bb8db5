//! What a foreman accepts in one job (`foreman serve --max-…`), whatever the
//! submitter asks.

use serde::{Deserialize, Serialize};
use wasmgrid_protocol::TaskLimits;

const MIB: u64 = 1 << 20;

/// A foreman's caps on one submission; `GET /api/limits` lists them.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SubmitLimits {
    /// The module's wasm bytes (after base64 decoding).
    pub max_module_bytes: u64,
    /// The `args` JSON text, all tasks together.
    pub max_args_bytes: u64,
    pub max_tasks_per_job: u64,
    /// Per task: the most fuel, memory and time a job may ask for.
    pub max_fuel: u64,
    pub max_memory_mib: u64,
    pub max_timeout_secs: f64,
    /// Jobs one client token may have queued or running at once.
    #[serde(default = "SubmitLimits::default_max_unfinished_jobs_per_token")]
    pub max_unfinished_jobs_per_token: u64,
}

impl SubmitLimits {
    pub const DEFAULT_MAX_MODULE_MIB: u64 = 64;
    /// Well under the wire's frame limit, which one task's args must fit in.
    pub const DEFAULT_MAX_ARGS_MIB: u64 = 64;
    pub const DEFAULT_MAX_TASKS_PER_JOB: u64 = 1_000_000;
    pub const DEFAULT_MAX_FUEL: u64 = 1_000 * TaskLimits::DEFAULT_FUEL;
    pub const DEFAULT_MAX_MEMORY_MIB: u64 = 4096;
    pub const DEFAULT_MAX_TIMEOUT_SECS: f64 = 3600.0;
    pub const DEFAULT_MAX_UNFINISHED_JOBS_PER_TOKEN: u64 = 1_000;

    fn default_max_unfinished_jobs_per_token() -> u64 {
        Self::DEFAULT_MAX_UNFINISHED_JOBS_PER_TOKEN
    }

    /// What a job that asks for no fuel gets.
    pub fn default_fuel(&self) -> u64 {
        TaskLimits::DEFAULT_FUEL.min(self.max_fuel)
    }

    pub fn default_memory_mib(&self) -> u64 {
        TaskLimits::DEFAULT_MEMORY_MIB.min(self.max_memory_mib)
    }

    pub fn default_timeout_secs(&self) -> f64 {
        (TaskLimits::DEFAULT_TIMEOUT_SECS as f64).min(self.max_timeout_secs)
    }
}

impl Default for SubmitLimits {
    fn default() -> Self {
        SubmitLimits {
            max_module_bytes: Self::DEFAULT_MAX_MODULE_MIB * MIB,
            max_args_bytes: Self::DEFAULT_MAX_ARGS_MIB * MIB,
            max_tasks_per_job: Self::DEFAULT_MAX_TASKS_PER_JOB,
            max_fuel: Self::DEFAULT_MAX_FUEL,
            max_memory_mib: Self::DEFAULT_MAX_MEMORY_MIB,
            max_timeout_secs: Self::DEFAULT_MAX_TIMEOUT_SECS,
            max_unfinished_jobs_per_token: Self::DEFAULT_MAX_UNFINISHED_JOBS_PER_TOKEN,
        }
    }
}

/// One of [`SubmitLimits`]' caps, for errors that name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    ModuleSize,
    ArgsSize,
    TasksPerJob,
    Fuel,
    MemoryMib,
    TimeoutSecs,
    UnfinishedJobsPerToken,
}

impl Limit {
    /// The `foreman serve` flag that sets it.
    pub fn flag(self) -> &'static str {
        match self {
            Limit::ModuleSize => "--max-module-mib",
            Limit::ArgsSize => "--max-args-mib",
            Limit::TasksPerJob => "--max-tasks-per-job",
            Limit::Fuel => "--max-fuel",
            Limit::MemoryMib => "--max-memory-mib",
            Limit::TimeoutSecs => "--max-timeout",
            Limit::UnfinishedJobsPerToken => "--max-queued-jobs-per-token",
        }
    }

    /// Whether it limits how much is sent (HTTP 413) rather than what a task may use (422).
    pub fn is_size(self) -> bool {
        matches!(
            self,
            Limit::ModuleSize | Limit::ArgsSize | Limit::TasksPerJob
        )
    }
}

/// Bytes for people: whole MiB when exact, else MiB with a decimal, else bytes.
pub(crate) fn size(bytes: u64) -> String {
    if bytes >= MIB && bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else if bytes >= MIB {
        format!("{:.1} MiB", bytes as f64 / MIB as f64)
    } else {
        format!("{bytes} bytes")
    }
}
