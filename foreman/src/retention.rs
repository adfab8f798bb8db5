//! `foreman serve --retention`: finished jobs older than the retention are
//! deleted, with everything recorded about them, so a foreman that runs for
//! months keeps a bounded database.

use std::time::Duration;

use crate::store::Store;

/// How often the sweep runs: a tenth of the retention, within these bounds.
const SWEEP_EVERY_MIN: Duration = Duration::from_secs(1);
const SWEEP_EVERY_MAX: Duration = Duration::from_secs(3600);

/// Parses `30d`, `12h`, `90m` or `45s` (a whole number and a unit).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{text:?} is not a duration: expected a whole number and a unit, as in 30d, 12h, 90m or 45s")),
    };
    let number: u64 = number.parse().map_err(|_| {
        format!("{text:?} is not a duration: it needs a whole number before the unit, as in 30d")
    })?;
    if number == 0 {
        return Err("the retention must be longer than 0".to_owned());
    }
    number
        .checked_mul(unit_secs)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?} is too long"))
}

/// Deletes finished jobs older than `retention`, and modules no job names,
/// now and then every so often, for ever.
pub async fn sweep(store: Store, retention: Duration) {
    let every = (retention / 10).clamp(SWEEP_EVERY_MIN, SWEEP_EVERY_MAX);
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let cutoff = crate::driver::unix_ms().saturating_sub(retention.as_millis() as u64);
        let cutoff = i64::try_from(cutoff).unwrap_or(i64::MAX);
        let jobs = store.clone();
        match tokio::task::spawn_blocking(move || jobs.delete_finished_before(cutoff)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(deleted)) => tracing::info!(
                jobs = deleted,
                retention = ?retention,
                "deleted finished jobs past the retention"
            ),
            Ok(Err(error)) => tracing::warn!("deleting jobs past the retention: {error}"),
            Err(error) => tracing::warn!("deleting jobs past the retention: {error}"),
        }
        // Modules named too recently when their last job went go now.
        let modules = store.clone();
        let unused = move || modules.delete_unused_modules(crate::store::MODULE_GRACE);
        match tokio::task::spawn_blocking(unused).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::warn!("deleting unused modules: {error}"),
            Err(error) => tracing::warn!("deleting unused modules: {error}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_a_whole_number_and_a_unit() {
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(12 * 3600)));
        assert_eq!(parse_duration("90m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration(" 45s "), Ok(Duration::from_secs(45)));
        for bad in ["30", "d", "1.5d", "-3d", "3 days", "3w", ""] {
            let error = parse_duration(bad).unwrap_err();
            assert!(error.contains("30d"), "{bad:?}: {error}");
        }
        assert!(parse_duration("0d").unwrap_err().contains("longer than 0"));
        assert!(parse_duration("99999999999999999999d").is_err());
    }
}
