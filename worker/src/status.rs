//! What a joined worker is doing, for its status API: the connection, the
//! attempts on a slot, and counters since start. Fed by the join loop and
//! the slot threads; every change bumps a `watch` so `/events` can push it.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::{watch, Notify};
use wasmgrid_protocol::wire::AttemptId;
use wasmgrid_protocol::{CacheSource, TaskReport};

/// Where the worker stands with its foreman.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Connection {
    Connecting,
    Connected,
    Draining,
    Disconnected,
}

/// What does not change while the worker runs.
#[derive(Debug, Clone)]
pub struct StaticInfo {
    pub name: String,
    pub foreman: SocketAddr,
    pub slots: u32,
    pub cpu_limit_percent: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunningAttempt {
    pub attempt: AttemptId,
    /// Unix time in milliseconds.
    pub started_ms: u64,
    pub elapsed_ms: u64,
}

/// `GET /`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatusView {
    pub worker_id: Option<u64>,
    pub name: String,
    pub foreman: String,
    pub connection: Connection,
    /// One word for people: starting, idle, running, draining or offline.
    pub status: &'static str,
    pub slots: u32,
    pub running: Vec<RunningAttempt>,
    pub cpu_limit_percent: u32,
}

/// `GET /stats`: counts since this process started.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Stats {
    pub tasks_completed: u64,
    pub tasks_failed: u64,
    pub failures_by_kind: BTreeMap<&'static str, u64>,
    /// Sum of the reports' `run_us`.
    pub total_execution_us: u64,
    pub fuel_used: u64,
    /// Modules found loaded in memory or on disk.
    pub cache_hits: u64,
    /// Modules compiled from their bytes.
    pub cache_misses: u64,
    pub modules_fetched: u64,
    pub uptime_secs: u64,
}

struct Started {
    at: Instant,
    unix_ms: u64,
}

struct State {
    worker_id: Option<u64>,
    connection: Connection,
    /// Until the first join: the start-up benchmark runs.
    joined_once: bool,
    running: HashMap<AttemptId, Started>,
    stats: Stats,
}

/// Shared by the join loop, the slot threads' replies and the API.
pub struct Status {
    info: StaticInfo,
    started: Instant,
    state: Mutex<State>,
    /// Bumped on every change `/events` should push.
    changes: watch::Sender<u64>,
    restart: Notify,
}

impl Status {
    pub fn new(info: StaticInfo) -> Arc<Self> {
        Arc::new(Status {
            info,
            started: Instant::now(),
            state: Mutex::new(State {
                worker_id: None,
                connection: Connection::Connecting,
                joined_once: false,
                running: HashMap::new(),
                stats: Stats::default(),
            }),
            changes: watch::channel(0).0,
            restart: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Resolves-on-change receiver for `/events`.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    pub fn set_connection(&self, connection: Connection) {
        let mut state = self.lock();
        if state.connection == connection {
            return;
        }
        state.connection = connection;
        drop(state);
        self.changed();
    }

    /// The foreman welcomed this worker.
    pub fn joined(&self, worker_id: u64) {
        let mut state = self.lock();
        state.worker_id = Some(worker_id);
        state.connection = Connection::Connected;
        state.joined_once = true;
        drop(state);
        self.changed();
    }

    pub fn module_fetched(&self) {
        self.lock().stats.modules_fetched += 1;
    }

    /// A slot started the attempt.
    pub fn started(&self, attempt: AttemptId) {
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let started = Started {
            at: Instant::now(),
            unix_ms,
        };
        self.lock().running.insert(attempt, started);
        self.changed();
    }

    /// The attempt's report is on its way (it may never have started: a
    /// module that failed to load reports at once).
    pub fn finished(&self, attempt: AttemptId, report: &TaskReport) {
        let mut state = self.lock();
        state.running.remove(&attempt);
        let stats = &mut state.stats;
        match &report.outcome {
            Ok(_) => stats.tasks_completed += 1,
            Err(failure) => {
                stats.tasks_failed += 1;
                *stats
                    .failures_by_kind
                    .entry(failure.kind.as_str())
                    .or_default() += 1;
            }
        }
        stats.total_execution_us = stats
            .total_execution_us
            .saturating_add(report.timings.run_us);
        stats.fuel_used = stats.fuel_used.saturating_add(report.fuel_used);
        match report.cache {
            CacheSource::Memory | CacheSource::Disk => stats.cache_hits += 1,
            CacheSource::Compiled => stats.cache_misses += 1,
        }
        drop(state);
        self.changed();
    }

    pub fn view(&self) -> StatusView {
        let state = self.lock();
        let now = Instant::now();
        let mut running: Vec<RunningAttempt> = state
            .running
            .iter()
            .map(|(&attempt, started)| RunningAttempt {
                attempt,
                started_ms: started.unix_ms,
                elapsed_ms: u64::try_from(now.duration_since(started.at).as_millis())
                    .unwrap_or(u64::MAX),
            })
            .collect();
        running.sort_unstable_by_key(|r| r.attempt);
        let status = match state.connection {
            Connection::Draining => "draining",
            Connection::Connecting if !state.joined_once => "starting",
            Connection::Connecting | Connection::Disconnected => "offline",
            Connection::Connected if running.is_empty() => "idle",
            Connection::Connected => "running",
        };
        StatusView {
            worker_id: state.worker_id,
            name: self.info.name.clone(),
            foreman: self.info.foreman.to_string(),
            connection: state.connection,
            status,
            slots: self.info.slots,
            running,
            cpu_limit_percent: self.info.cpu_limit_percent,
        }
    }

    pub fn stats(&self) -> Stats {
        let mut stats = self.lock().stats.clone();
        stats.uptime_secs = self.started.elapsed().as_secs();
        stats
    }

    /// Asks the join loop to drop its connection and join again at once.
    pub fn request_restart(&self) {
        // `notify_one` keeps a permit, so a request made while the loop is
        // between waits (say, mid-handshake) is not lost.
        self.restart.notify_one();
    }

    /// Resolves when a restart was asked for.
    pub async fn restart_requested(&self) {
        self.restart.notified().await;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use wasmgrid_protocol::{Failure, FailureKind, TaskTimings};

    use super::*;

    pub(crate) fn status() -> Arc<Status> {
        Status::new(StaticInfo {
            name: "test".into(),
            foreman: SocketAddr::from(([127, 0, 0, 1], 9000)),
            slots: 2,
            cpu_limit_percent: 50,
        })
    }

    pub(crate) fn report(outcome: Result<&str, FailureKind>, cache: CacheSource) -> TaskReport {
        TaskReport {
            outcome: outcome
                .map(str::to_owned)
                .map_err(|kind| Failure::new(kind, "test")),
            fuel_used: 100,
            cache,
            timings: TaskTimings {
                load_us: 1,
                instantiate_us: 2,
                run_us: 30,
            },
            stdout: Default::default(),
            stderr: Default::default(),
        }
    }

    #[test]
    fn reports_are_counted() {
        let status = status();
        status.module_fetched();
        status.finished(1, &report(Ok("1"), CacheSource::Compiled));
        status.finished(2, &report(Ok("2"), CacheSource::Memory));
        status.finished(3, &report(Err(FailureKind::Trap), CacheSource::Disk));
        status.finished(4, &report(Err(FailureKind::Trap), CacheSource::Memory));
        let stats = status.stats();
        assert_eq!(stats.tasks_completed, 2);
        assert_eq!(stats.tasks_failed, 2);
        assert_eq!(stats.failures_by_kind.get("Trap"), Some(&2));
        assert_eq!(stats.total_execution_us, 120);
        assert_eq!(stats.fuel_used, 400);
        assert_eq!((stats.cache_hits, stats.cache_misses), (3, 1));
        assert_eq!(stats.modules_fetched, 1);
    }

    #[test]
    fn running_attempts_come_and_go_and_the_summary_follows() {
        let status = status();
        assert_eq!(status.view().status, "starting");
        status.joined(7);
        assert_eq!(status.view().status, "idle");
        status.started(5);
        status.started(3);
        let view = status.view();
        assert_eq!(view.worker_id, Some(7));
        assert_eq!(view.status, "running");
        let ids: Vec<_> = view.running.iter().map(|r| r.attempt).collect();
        assert_eq!(ids, [3, 5]);
        status.finished(3, &report(Ok("1"), CacheSource::Memory));
        status.finished(5, &report(Err(FailureKind::Cancelled), CacheSource::Memory));
        assert!(status.view().running.is_empty());
        status.set_connection(Connection::Disconnected);
        assert_eq!(status.view().status, "offline");
    }

    #[tokio::test]
    async fn changes_wake_subscribers() {
        let status = status();
        let mut changes = status.subscribe();
        status.started(1);
        tokio::time::timeout(std::time::Duration::from_secs(5), changes.changed())
            .await
            .expect("a change was announced")
            .expect("the sender lives");
    }
}
