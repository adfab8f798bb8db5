//! Deleting finished jobs: on request, and past the retention.

use std::time::Duration;

use wasmgrid_protocol::wire::ModuleHash;
use wasmgrid_protocol::{Failure, FailureKind};

use super::tests::{args, ended, new_job, open_temp, started, worker, MODULE};
use super::*;
use crate::model::{JobState, Record, TaskState};

fn state(job: JobId, state: JobState) -> Record {
    Record::JobStateChanged { job, state }
}

#[test]
fn a_finished_job_is_deleted_with_everything_recorded_about_it() {
    let (_dir, store) = open_temp();
    store.put_module(&MODULE, b"wasm").unwrap();
    let w = store.upsert_worker(&worker("w1", "pc1")).unwrap();
    let running = store.create_job(new_job(args(2))).unwrap().id;
    let done = store.create_job(new_job(args(3))).unwrap().id;
    let trap = Err(Failure::new(FailureKind::Trap, "boom"));
    store.record_all([
        state(running, JobState::Running),
        started(running, 0, 10, w),
        state(done, JobState::Running),
        started(done, 0, 1, w),
        ended(done, 0, 1, trap, TaskState::Failed),
        started(done, 1, 2, w),
        ended(done, 1, 2, Ok("1".into()), TaskState::Succeeded),
        started(done, 2, 3, w),
        ended(done, 2, 3, Ok("2".into()), TaskState::Succeeded),
        state(done, JobState::Failed),
    ]);
    store.flush().unwrap();
    assert_eq!(store.failures(Some(w), None, 0, 10).unwrap().len(), 1);
    let succeeded_before = store.worker(w).unwrap().unwrap().tasks_succeeded;
    let grid_runs_before = store.run_time_histogram().unwrap().counts;

    assert_eq!(
        store.delete_job(running).unwrap(),
        Deletion::NotFinished(JobState::Running)
    );
    assert_eq!(
        store.delete_job(done).unwrap(),
        Deletion::Deleted { tasks: 3 }
    );
    assert_eq!(store.job(done).unwrap(), None);
    assert_eq!(store.results(done).unwrap(), None);
    assert!(store.job_summary(done).unwrap().is_none());
    assert!(store.tasks(done, 0, 10, None).unwrap().is_none());
    assert!(store.failures(Some(w), None, 0, 10).unwrap().is_empty());
    assert_eq!(store.delete_job(done).unwrap(), Deletion::NotFound);
    // The running job is untouched; grid-wide figures keep the deleted job's share.
    assert_eq!(store.results(running).unwrap().unwrap().len(), 2);
    assert_eq!(store.job(running).unwrap().unwrap().running, 1);
    let w_row = store.worker(w).unwrap().unwrap();
    assert_eq!(w_row.tasks_succeeded, succeeded_before);
    assert_eq!(store.run_time_histogram().unwrap().counts, grid_runs_before);
    // A record for the running job still lands after the other's deletion.
    store.record(ended(running, 0, 10, Ok("7".into()), TaskState::Succeeded));
    store.flush().unwrap();
    assert_eq!(store.job(running).unwrap().unwrap().succeeded, 1);
}

#[test]
fn jobs_finished_before_the_cutoff_are_deleted_and_no_others() {
    let (_dir, store) = open_temp();
    store.put_module(&MODULE, b"wasm").unwrap();
    let ids: Vec<JobId> = (0..3)
        .map(|_| store.create_job(new_job(args(1))).unwrap().id)
        .collect();
    store.record_all([
        state(ids[0], JobState::Cancelled),
        state(ids[1], JobState::Running),
        state(ids[2], JobState::Cancelled),
    ]);
    store.flush().unwrap();
    assert_eq!(store.delete_finished_before(0).unwrap(), 0);
    let after_now = schema::now_ms() + 1_000;
    assert_eq!(store.finished_before(after_now).unwrap(), [ids[0], ids[2]]);
    assert_eq!(store.delete_finished_before(after_now).unwrap(), 2);
    let left: Vec<JobId> = store
        .jobs(0, 10, None)
        .unwrap()
        .iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(left, [ids[1]]);
}

fn naming(module: ModuleHash) -> NewJob {
    NewJob {
        module,
        ..new_job(args(1))
    }
}

#[test]
fn a_module_goes_once_no_job_names_it_and_nothing_has_lately() {
    let (dir, store) = open_temp();
    let other: ModuleHash = [8; 32];
    store.put_module(&MODULE, b"wasm").unwrap();
    store.put_module(&other, b"other").unwrap();
    let ids: Vec<JobId> = [MODULE, MODULE, other]
        .into_iter()
        .map(|module| store.create_job(naming(module)).unwrap().id)
        .collect();
    store.record_all(ids.iter().map(|&id| state(id, JobState::Cancelled)));
    store.flush().unwrap();

    assert!(matches!(
        store.delete_job(ids[0]),
        Ok(Deletion::Deleted { .. })
    ));
    assert!(matches!(
        store.delete_job(ids[1]),
        Ok(Deletion::Deleted { .. })
    ));
    // No job names it, but a job did a moment ago: kept for the grace.
    assert!(store.module(&MODULE).unwrap().is_some());
    assert_eq!(store.delete_unused_modules(MODULE_GRACE).unwrap(), 0);
    // Past its grace it goes; the module a stored job names stays.
    assert_eq!(store.delete_unused_modules(Duration::ZERO).unwrap(), 1);
    assert_eq!(store.module(&MODULE).unwrap(), None);
    assert!(store.module(&other).unwrap().is_some());
    // A job naming it now is refused for that, not by the foreign key.
    assert!(matches!(
        store.create_job(naming(MODULE)),
        Err(StoreError::UnknownModule(_))
    ));
    assert!(!store.name_module_if_known(&MODULE));
    // Uploaded again, it serves again.
    store.put_module(&MODULE, b"wasm").unwrap();
    assert!(store.name_module_if_known(&MODULE));
    let again = store.create_job(naming(MODULE)).unwrap().id;
    assert_eq!(store.delete_unused_modules(Duration::ZERO).unwrap(), 0);

    // After a restart nothing has named a module yet: the last job's
    // deletion takes its module at once.
    store.record(state(again, JobState::Cancelled));
    store.flush().unwrap();
    drop(store);
    let store = Store::open(&dir.path().join("foreman.db")).unwrap();
    assert!(matches!(
        store.delete_job(again),
        Ok(Deletion::Deleted { .. })
    ));
    assert_eq!(store.module(&MODULE).unwrap(), None);
    assert!(store.module(&other).unwrap().is_some());
}
