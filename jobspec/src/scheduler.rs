//! The names of the foreman's schedulers.

use serde::{Deserialize, Serialize};

/// How a job's tasks are placed on workers (`foreman submit --scheduler`).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scheduler {
    /// Tasks in submission order to any free slot.
    #[default]
    Fifo,
    /// One task per worker in turn.
    RoundRobin,
    /// The worker with the lowest running/slots.
    LeastLoaded,
    /// Learns each worker's speed; keeps a job's last tasks off slow workers.
    Performance,
    /// Like fifo, but the job's priority orders it among all jobs.
    Priority,
}

impl Scheduler {
    pub const ALL: [Scheduler; 5] = [
        Scheduler::Fifo,
        Scheduler::RoundRobin,
        Scheduler::LeastLoaded,
        Scheduler::Performance,
        Scheduler::Priority,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scheduler::Fifo => "fifo",
            Scheduler::RoundRobin => "round-robin",
            Scheduler::LeastLoaded => "least-loaded",
            Scheduler::Performance => "performance",
            Scheduler::Priority => "priority",
        }
    }
}

impl std::fmt::Display for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error(
    "unknown scheduler `{0}` (expected fifo, round-robin, least-loaded, performance or priority)"
)]
pub struct UnknownScheduler(String);

impl std::str::FromStr for Scheduler {
    type Err = UnknownScheduler;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scheduler::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownScheduler(s.to_owned()))
    }
}
