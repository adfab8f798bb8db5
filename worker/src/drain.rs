//! Leaving gracefully, on SIGTERM or when the foreman asks: say so, hand
//! back what has not started, let what runs finish within a grace period,
//! then cancel the rest (they report `Cancelled`, which the foreman retries
//! elsewhere).

use std::time::Duration;

use tokio::time::Instant;
use wasmgrid_protocol::wire::ToForeman;

use crate::attempts::Attempts;
use crate::outgoing::{Outgoing, Sender};

/// The longest grace honoured (a foreman's `grace_ms` may be anything).
const MAX_GRACE: Duration = Duration::from_secs(7 * 24 * 3600);
/// After cancelling, how long cancelled tasks get to report before the
/// worker leaves without them.
const AFTER_CANCEL: Duration = Duration::from_secs(10);

/// A drain under way.
#[derive(Debug)]
pub struct Drain {
    /// When the attempts still running are cancelled.
    cancel_at: Instant,
    cancelled: bool,
}

/// What the session should do when the drain's deadline passes.
#[derive(Debug, PartialEq, Eq)]
pub enum Expired {
    /// The grace ran out: running attempts were cancelled; keep waiting for their reports.
    Cancelled,
    /// Even cancelled attempts did not report in time: leave without them.
    GiveUp,
}

impl Drain {
    /// Sends `Draining`, then hands back every attempt not started.
    pub fn start(grace: Duration, attempts: &Attempts, out: &Sender) -> Self {
        let grace = grace.min(MAX_GRACE);
        out.send(Outgoing::Message(ToForeman::Draining));
        let returned = attempts.take_back_unstarted();
        tracing::info!(
            returned = returned.len(),
            running = attempts.len(),
            grace_secs = grace.as_secs_f64(),
            "draining: handing back unstarted tasks, letting running ones finish"
        );
        if !returned.is_empty() {
            out.send(Outgoing::Message(ToForeman::Returned(returned)));
        }
        Drain {
            cancel_at: Instant::now() + grace,
            cancelled: false,
        }
    }

    /// A second request to drain can only shorten the grace.
    pub fn shorten(&mut self, grace: Duration) {
        if !self.cancelled {
            self.cancel_at = self.cancel_at.min(Instant::now() + grace.min(MAX_GRACE));
        }
    }

    /// When [`Drain::expired`] must be called next.
    pub fn deadline(&self) -> Instant {
        if self.cancelled {
            self.cancel_at + AFTER_CANCEL
        } else {
            self.cancel_at
        }
    }

    pub fn expired(&mut self, attempts: &Attempts) -> Expired {
        if self.cancelled {
            return Expired::GiveUp;
        }
        tracing::info!(
            running = attempts.len(),
            "the drain's grace ran out: cancelling what still runs"
        );
        attempts.cancel_all();
        self.cancelled = true;
        Expired::Cancelled
    }
}

/// SIGTERM as a stream of events; never fires where there are no Unix signals
/// (or the handler could not be installed).
pub struct Terminate {
    #[cfg(unix)]
    signal: Option<tokio::signal::unix::Signal>,
}

impl Terminate {
    /// Installs the handler: from now on SIGTERM no longer kills the process
    /// by itself. Must be called within a tokio runtime.
    pub fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let signal = signal(SignalKind::terminate())
                .inspect_err(|error| tracing::warn!("cannot handle SIGTERM: {error}"))
                .ok();
            Terminate { signal }
        }
        #[cfg(not(unix))]
        Terminate {}
    }

    /// Resolves at the next SIGTERM.
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        if let Some(signal) = &mut self.signal {
            if signal.recv().await.is_some() {
                return;
            }
        }
        std::future::pending::<()>().await
    }
}
