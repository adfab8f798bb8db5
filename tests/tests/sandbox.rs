//! The executor against hostile and broken guests: each misdeed ends in a
//! precise, named failure and nothing leaks to the host.

use std::sync::Arc;

use wasmgrid_protocol::{FailureKind, TaskLimits, TaskReport};
use wasmgrid_tests::guest_wasm;
use wasmgrid_worker::executor::{Executor, Load};

fn executor() -> Executor {
    Executor::new(None).expect("engine starts")
}

fn limits() -> TaskLimits {
    TaskLimits {
        fuel: 2_000_000_000,
        memory_bytes: 64 << 20,
        timeout_ms: 20_000,
        output_bytes: 64 * 1024,
    }
}

fn misbehave(action: &str, amount: u64, limits: TaskLimits) -> TaskReport {
    let executor = executor();
    let (task, load) = executor
        .load(&guest_wasm("misbehave"))
        .expect("fixture loads");
    executor.run(&task, load, &format!("[\"{action}\", {amount}]"), &limits)
}

fn failure(report: &TaskReport) -> (FailureKind, &str) {
    match &report.outcome {
        Err(f) => (f.kind, f.message.as_str()),
        Ok(json) => panic!("expected a failure, got result {json}"),
    }
}

#[test]
fn a_well_behaved_call_reports_result_fuel_and_timings() {
    let report = misbehave("echo", 41, limits());
    assert_eq!(report.outcome, Ok("\"41\"".to_owned()));
    assert!(report.fuel_used > 0);
    assert!(report.timings.run_us > 0 || report.timings.instantiate_us > 0);
}

#[test]
fn an_endless_loop_runs_out_of_fuel() {
    let report = misbehave(
        "loop",
        0,
        TaskLimits {
            fuel: 50_000_000,
            ..limits()
        },
    );
    let (kind, message) = failure(&report);
    assert_eq!(kind, FailureKind::OutOfFuel, "{message}");
    assert!(message.contains("50000000 units of fuel"), "{message}");
    assert_eq!(report.fuel_used, 50_000_000);
}

#[test]
fn an_endless_loop_with_plenty_of_fuel_times_out() {
    let report = misbehave(
        "loop",
        0,
        TaskLimits {
            fuel: u64::MAX,
            timeout_ms: 300,
            ..limits()
        },
    );
    let (kind, message) = failure(&report);
    assert_eq!(kind, FailureKind::Timeout, "{message}");
    assert!(message.contains("0.300 s"), "{message}");
}

#[test]
fn unbounded_allocation_hits_the_memory_limit_not_a_panic() {
    let report = misbehave("alloc", 4, limits());
    let (kind, message) = failure(&report);
    assert_eq!(kind, FailureKind::MemoryLimit, "{message}");
    assert!(message.contains("limit of 64.0 MiB"), "{message}");
}

#[test]
fn unbounded_recursion_is_a_stack_overflow_trap() {
    // Small frames exhaust the wasm call stack; big ones the guest's stack in linear memory.
    for action in ["recurse", "recurse-big-frames"] {
        let report = misbehave(action, 0, limits());
        let (kind, message) = failure(&report);
        assert_eq!(kind, FailureKind::Trap, "{action}: {message}");
        assert!(
            message.starts_with("stack overflow: "),
            "{action}: {message}"
        );
        assert!(
            message.contains("misbehave::recurse"),
            "{action}: {message}"
        );
    }
}

#[test]
fn a_panic_keeps_its_message_and_location() {
    let report = misbehave("panic", 7, limits());
    let (kind, message) = failure(&report);
    assert_eq!(kind, FailureKind::Trap, "{message}");
    assert!(message.contains("deliberate panic 7"), "{message}");
    assert!(message.contains("src/lib.rs"), "{message}");
    assert!(message.contains("wasm backtrace"), "{message}");
}

#[test]
fn a_returned_error_is_a_guest_error() {
    let report = misbehave("fail", 3, limits());
    assert_eq!(
        failure(&report),
        (FailureKind::GuestError, "deliberate failure 3")
    );
}

#[test]
fn megabytes_of_output_are_truncated_and_the_task_still_succeeds() {
    let report = misbehave("print", 8 << 20, limits());
    assert_eq!(
        report.outcome,
        Ok(format!("\"printed {} bytes\"", 8u64 << 20))
    );
    for stream in [&report.stdout, &report.stderr] {
        assert!(stream.truncated);
        assert_eq!(stream.text.len(), 64 * 1024);
    }
}

#[test]
fn host_files_are_out_of_reach() {
    for action in ["read-file", "list-root"] {
        let report = misbehave(action, 0, limits());
        let (kind, message) = failure(&report);
        assert_eq!(kind, FailureKind::GuestError, "{action}: {message}");
        assert!(message.starts_with("cannot "), "{action}: {message}");
    }
}

#[test]
fn the_environment_and_arguments_are_empty() {
    std::env::set_var("WASMGRID_SECRET_FOR_TEST", "leak");
    let report = misbehave("env", 0, limits());
    assert_eq!(report.outcome, Ok("\"env: []; args: []\"".to_owned()));
}

#[test]
fn arguments_that_do_not_fit_are_bad_args() {
    let executor = executor();
    let (task, load) = executor.load(&guest_wasm("misbehave")).unwrap();
    let report = executor.run(&task, load, "[\"echo\", \"many\"]", &limits());
    let (kind, message) = failure(&report);
    assert_eq!(kind, FailureKind::BadArgs);
    assert!(
        message.starts_with("argument `amount` (#2 of 2): invalid type: string"),
        "{message}"
    );
}

#[test]
fn one_runaway_task_does_not_stop_the_others() {
    let executor = Arc::new(executor());
    let (task, _) = executor.load(&guest_wasm("misbehave")).unwrap();
    let limits = TaskLimits {
        fuel: u64::MAX,
        timeout_ms: 1_000,
        ..limits()
    };
    let pool = wasmgrid_worker::executor::SlotPool::new(executor.clone(), 2).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let jobs = [
        ("loop", 0),
        ("echo", 1),
        ("echo", 2),
        ("echo", 3),
        ("echo", 4),
    ];
    for (i, (action, amount)) in jobs.into_iter().enumerate() {
        let tx = tx.clone();
        pool.submit(
            task.clone(),
            Load::WARM,
            format!("[\"{action}\", {amount}]"),
            limits,
            move |r| {
                let _ = tx.send((i, r));
            },
        );
    }
    drop(tx);
    let mut reports: Vec<_> = rx.iter().collect();
    reports.sort_by_key(|(i, _)| *i);
    assert_eq!(failure(&reports[0].1).0, FailureKind::Timeout);
    // The echoes finished while the runaway was still spinning on the other slot.
    let finished_before_timeout = reports[1..].iter().all(|(_, r)| r.outcome.is_ok());
    assert!(finished_before_timeout);
}

#[test]
fn not_wasm_is_an_invalid_module() {
    let err = executor().load(b"this is not wasm at all").unwrap_err();
    assert_eq!(err.kind, FailureKind::InvalidModule);
    assert!(err.message.contains("magic bytes"), "{}", err.message);
}

#[test]
fn corrupt_component_is_an_invalid_module() {
    let mut wasm = guest_wasm("add");
    let middle = wasm.len() / 2;
    wasm.truncate(middle);
    let err = executor().load(&wasm).unwrap_err();
    assert_eq!(err.kind, FailureKind::InvalidModule, "{}", err.message);
}

#[test]
fn a_core_module_is_the_wrong_world() {
    let core = wat::parse_str("(module (func (export \"run\")))").unwrap();
    let err = executor().load(&core).unwrap_err();
    assert_eq!(err.kind, FailureKind::WrongWorld);
    assert!(
        err.message.contains("core wasm module, not a component"),
        "{}",
        err.message
    );
}

#[test]
fn a_component_without_run_is_the_wrong_world() {
    let component = wat::parse_str("(component)").unwrap();
    let err = executor().load(&component).unwrap_err();
    assert_eq!(err.kind, FailureKind::WrongWorld);
    assert!(err.message.contains("must export `run"), "{}", err.message);
}

#[test]
fn a_mistyped_run_export_is_the_wrong_world() {
    let component = wat::parse_str(
        r#"(component
            (core module $m (func (export "run") (param i32) (result i32) local.get 0))
            (core instance $i (instantiate $m))
            (func (export "run") (param "x" u32) (result u32) (canon lift (core func $i "run"))))"#,
    )
    .unwrap();
    let err = executor().load(&component).unwrap_err();
    assert_eq!(err.kind, FailureKind::WrongWorld);
    assert!(err.message.contains("must export `run"), "{}", err.message);
}

#[test]
fn an_unknown_import_is_the_wrong_world() {
    let component = wat::parse_str(
        r#"(component (import "evil:host/escape" (instance (export "open" (func)))))"#,
    )
    .unwrap();
    let err = executor().load(&component).unwrap_err();
    assert_eq!(err.kind, FailureKind::WrongWorld);
    assert!(
        err.message
            .contains("imports something the sandbox does not provide"),
        "{}",
        err.message
    );
}

#[test]
fn the_disk_cache_is_reused_and_a_corrupt_entry_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = guest_wasm("add");
    let first = Executor::new(Some(dir.path().into())).unwrap();
    assert_eq!(
        first.load(&wasm).unwrap().1.source,
        wasmgrid_protocol::CacheSource::Compiled
    );
    assert_eq!(
        first.load(&wasm).unwrap().1.source,
        wasmgrid_protocol::CacheSource::Memory
    );

    let second = Executor::new(Some(dir.path().into())).unwrap();
    let (task, load) = second.load(&wasm).unwrap();
    assert_eq!(load.source, wasmgrid_protocol::CacheSource::Disk);
    assert_eq!(
        second.run(&task, load, "[2, 3]", &limits()).outcome,
        Ok("5".into())
    );

    // Artifacts are mapped into memory: drop their users before corrupting them in place.
    drop((first, second, task));
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        std::fs::write(entry.unwrap().path(), b"garbage").unwrap();
    }
    let third = Executor::new(Some(dir.path().into())).unwrap();
    let (task, load) = third.load(&wasm).unwrap();
    assert_eq!(load.source, wasmgrid_protocol::CacheSource::Compiled);
    assert_eq!(
        third.run(&task, load, "[2, 3]", &limits()).outcome,
        Ok("5".into())
    );
}

#[test]
fn a_cancel_flag_stops_a_running_task_and_deadlines_still_hold() {
    let executor = Arc::new(executor());
    let (task, _) = executor.load(&guest_wasm("misbehave")).unwrap();
    let flag = wasmgrid_worker::executor::CancelFlag::default();
    let setter = flag.clone();
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(100));
        setter.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let spin = TaskLimits {
        fuel: u64::MAX,
        timeout_ms: 60_000,
        ..limits()
    };
    let report = executor.run_cancellable(&task, Load::WARM, "[\"loop\", 0]", &spin, flag);
    assert_eq!(failure(&report).0, FailureKind::Cancelled);

    let short = TaskLimits {
        timeout_ms: 200,
        ..spin
    };
    let report = executor.run_cancellable(
        &task,
        Load::WARM,
        "[\"loop\", 0]",
        &short,
        Default::default(),
    );
    assert_eq!(failure(&report).0, FailureKind::Timeout);
    let report = executor.run_cancellable(
        &task,
        Load::WARM,
        "[\"echo\", 5]",
        &short,
        Default::default(),
    );
    assert_eq!(report.outcome, Ok("\"5\"".to_owned()));
}
