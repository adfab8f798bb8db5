//! A job's options: what each task may use, and how the job is scheduled.

use serde::{Deserialize, Deserializer, Serialize};
use wasmgrid_protocol::TaskLimits;

use crate::limits::{Limit, SubmitLimits};
use crate::submission::SubmitError;
use crate::Scheduler;

/// Fuel, memory and timeout left out take the foreman's defaults, lowered
/// to its caps; asking for more than a cap is refused.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct JobOptions {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fuel: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<f64>,
    pub retries: u32,
    pub priority: i32,
    /// The foreman's default (`foreman serve --scheduler`) when absent.
    #[serde(
        deserialize_with = "scheduler_by_name",
        skip_serializing_if = "Option::is_none"
    )]
    pub scheduler: Option<Scheduler>,
    /// Keep the job queued until this time (unix milliseconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_before_ms: Option<u64>,
    /// Retry deterministic failures too, within `retries`.
    pub retry_deterministic: bool,
    /// Stdout (and stderr) kept per task, in KiB: 64 unless given, at most
    /// the foreman's `--max-output-kib`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_kib: Option<u32>,
    /// Largest result JSON per task, in KiB: the foreman's
    /// `--max-result-kib` unless given, and at most that.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result_kib: Option<u32>,
}

/// Parses with `Scheduler`'s `FromStr`, whose error lists the valid names.
fn scheduler_by_name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Scheduler>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|name| name.parse().map_err(serde::de::Error::custom))
        .transpose()
}

impl Default for JobOptions {
    fn default() -> Self {
        JobOptions {
            fuel: None,
            memory_mib: None,
            timeout_secs: None,
            retries: 3,
            priority: 0,
            scheduler: None,
            not_before_ms: None,
            retry_deterministic: false,
            output_kib: None,
            result_kib: None,
        }
    }
}

impl JobOptions {
    /// Each task's limits: what the job asks, or the defaults within the caps.
    pub fn task_limits(&self, caps: &SubmitLimits) -> Result<TaskLimits, SubmitError> {
        let fuel = self.fuel.unwrap_or_else(|| caps.default_fuel());
        within(fuel, caps.max_fuel, Limit::Fuel, "fuel", "")?;
        let memory_mib = self.memory_mib.unwrap_or_else(|| caps.default_memory_mib());
        within(
            memory_mib,
            caps.max_memory_mib,
            Limit::MemoryMib,
            "memory_mib",
            " MiB",
        )?;
        let memory_bytes = memory_mib
            .checked_mul(1 << 20)
            .ok_or_else(|| SubmitError::BadOptions("memory_mib is too large".into()))?;
        let timeout_secs = self
            .timeout_secs
            .unwrap_or_else(|| caps.default_timeout_secs());
        if !(timeout_secs.is_finite() && timeout_secs > 0.0) {
            return Err(SubmitError::BadOptions(
                "timeout_secs must be a positive number".into(),
            ));
        }
        within(
            timeout_secs,
            caps.max_timeout_secs,
            Limit::TimeoutSecs,
            "timeout_secs",
            " s",
        )?;
        Ok(TaskLimits {
            fuel,
            memory_bytes,
            // Saturates: a cap of years would still be a valid u64 of milliseconds.
            timeout_ms: (timeout_secs * 1000.0).ceil() as u64,
            // The foreman applies its output and result caps (`--max-output-kib`, `--max-result-kib`).
            ..TaskLimits::default()
        })
    }
}

/// `asked` of option `name`, refused when over its cap (`unit` follows the cap in the message).
fn within<T: PartialOrd + std::fmt::Display>(
    asked: T,
    cap: T,
    limit: Limit,
    name: &str,
    unit: &str,
) -> Result<(), SubmitError> {
    if asked > cap {
        return Err(SubmitError::over(
            limit,
            format!("{name} {asked} exceeds this foreman's cap of {cap}{unit}"),
        ));
    }
    Ok(())
}
