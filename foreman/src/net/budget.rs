//! How many messages a worker may send: two token buckets per connection.
//! Control messages (heartbeats, credit, drain notices) come a few a second
//! from an honest worker; reports and hand-backs come batched, and the
//! budget leaves room for 100k tiny tasks a second even unbatched. A worker
//! past either budget is flooding and is cut off.

use tokio::time::Instant;
use wasmgrid_protocol::wire::ToForeman;

/// (burst, per second) for control messages.
const CONTROL: (f64, f64) = (1_000.0, 100.0);
/// (burst, per second) for messages carrying reports or hand-backs.
const DATA: (f64, f64) = (200_000.0, 100_000.0);

struct Bucket {
    tokens: f64,
    burst: f64,
    per_sec: f64,
}

impl Bucket {
    fn new((burst, per_sec): (f64, f64)) -> Self {
        Bucket {
            tokens: burst,
            burst,
            per_sec,
        }
    }

    fn refill(&mut self, elapsed_secs: f64) {
        self.tokens = (self.tokens + elapsed_secs * self.per_sec).min(self.burst);
    }

    fn take(&mut self, elapsed_secs: f64) -> bool {
        self.refill(elapsed_secs);
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

pub(super) struct MessageBudget {
    control: Bucket,
    data: Bucket,
    last: Instant,
}

impl MessageBudget {
    pub(super) fn new(now: Instant) -> Self {
        MessageBudget {
            control: Bucket::new(CONTROL),
            data: Bucket::new(DATA),
            last: now,
        }
    }

    /// Counts one message; the error names the budget it went past.
    pub(super) fn spend(&mut self, message: &ToForeman, now: Instant) -> Result<(), String> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        let carries_work = match message {
            ToForeman::Finished(reports) => !reports.is_empty(),
            ToForeman::Returned(attempts) => !attempts.is_empty(),
            _ => false,
        };
        // Both refill, so a long quiet spell counts for both.
        let (bucket, other, kind, (burst, per_sec)) = if carries_work {
            (&mut self.data, &mut self.control, "report", DATA)
        } else {
            (&mut self.control, &mut self.data, "control", CONTROL)
        };
        other.refill(elapsed);
        if bucket.take(elapsed) {
            Ok(())
        } else {
            Err(format!(
                "flooded the foreman: more than {burst} {kind} messages at once or {per_sec} a second"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use wasmgrid_protocol::wire::Load;

    #[test]
    fn a_burst_past_the_budget_is_refused_and_time_refills_it() {
        let start = Instant::now();
        let mut budget = MessageBudget::new(start);
        let beat = ToForeman::Heartbeat(Load::default());
        for _ in 0..CONTROL.0 as usize {
            budget.spend(&beat, start).unwrap();
        }
        let error = budget.spend(&beat, start).unwrap_err();
        assert!(error.contains("control"), "{error}");
        // Reports have their own budget.
        budget.spend(&ToForeman::Returned(vec![1]), start).unwrap();
        budget.spend(&beat, start + Duration::from_secs(1)).unwrap();
    }
}
