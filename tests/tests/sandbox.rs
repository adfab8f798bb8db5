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
        result_bytes: 64 * 1024,
    }
}

/// Only the wall clock stops these: fuel for ever, 300 ms.
fn unmetered_300_ms() -> TaskLimits {
    TaskLimits {
        fuel: u64::MAX,
        timeout_ms: 300,
        ..limits()
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
    let report = misbehave("loop", 0, unmetered_300_ms());
    let (kind, message) = failure(&report);
    assert_eq!(kind, FailureKind::Timeout, "{message}");
    assert!(message.contains("0.300 s"), "{message}");
}

/// Most of this guest's time goes to WASI writes, where a stop cannot land:
/// it must still end at its deadline.
#[test]
fn an_endless_stream_of_host_calls_times_out() {
    let report = misbehave("print", u64::MAX / 2, unmetered_300_ms());
    let (kind, message) = failure(&report);
    assert_eq!(kind, FailureKind::Timeout, "{message}");
    assert!(report.stdout.truncated && report.stdout.text.len() <= 64 << 10);
}

/// Waiting on a clock happens in the host, where no limit can stop a
/// task: the sleep ends at the deadline, and the task with it.
#[test]
fn a_guest_that_sleeps_past_its_limit_times_out_at_it() {
    let started = std::time::Instant::now();
    let report = misbehave("sleep", 20, unmetered_300_ms());
    let (kind, message) = failure(&report);
    assert_eq!(kind, FailureKind::Timeout, "{message}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "the sleep ran its course"
    );
}

/// A sleep within the limit still sleeps as long as asked.
#[test]
fn a_short_sleep_is_kept() {
    let report = misbehave("sleep", 1, limits());
    assert_eq!(report.outcome, Ok("\"slept 1 s\"".into()));
    assert!(report.timings.run_us >= 1_000_000, "{:?}", report.timings);
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
fn a_written_file_never_reaches_the_disk() {
    let marker = std::process::id();
    let report = misbehave("write-file", u64::from(marker), limits());
    let (kind, message) = failure(&report);
    assert_eq!(kind, FailureKind::GuestError, "{message}");
    assert!(message.starts_with("cannot write a file"), "{message}");
    let name = format!("wasmgrid-escape-{marker}.txt");
    for place in [std::env::current_dir().unwrap(), "/tmp".into(), "/".into()] {
        assert!(
            !place.join(&name).exists(),
            "{name} appeared in {}",
            place.display()
        );
    }
}

#[test]
fn tcp_and_udp_reach_nothing_on_the_host() {
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    tcp.set_nonblocking(true).unwrap();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_nonblocking(true).unwrap();
    let cases = [
        (
            "tcp",
            tcp.local_addr().unwrap().port(),
            "cannot connect over TCP",
        ),
        (
            "udp",
            udp.local_addr().unwrap().port(),
            "cannot send over UDP",
        ),
    ];
    for (action, port, expected) in cases {
        let report = misbehave(action, u64::from(port), limits());
        let (kind, message) = failure(&report);
        assert_eq!(kind, FailureKind::GuestError, "{action}: {message}");
        assert!(message.starts_with(expected), "{action}: {message}");
    }
    let accepted = tcp.accept();
    assert!(
        matches!(&accepted, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "something connected: {accepted:?}"
    );
    let mut buffer = [0u8; 64];
    let received = udp.recv_from(&mut buffer);
    assert!(
        matches!(&received, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "something arrived: {received:?}"
    );
}

#[test]
fn spawning_a_thread_is_an_error_inside_the_guest() {
    let report = misbehave("thread", 0, limits());
    let (kind, message) = failure(&report);
    assert_eq!(kind, FailureKind::GuestError, "{message}");
    assert!(message.starts_with("cannot spawn a thread"), "{message}");
}

#[test]
fn a_result_over_the_limit_is_result_too_large() {
    let report = misbehave("big-result", 100_000, limits());
    let (kind, message) = failure(&report);
    assert_eq!(kind, FailureKind::ResultTooLarge, "{message}");
    assert_eq!(
        message,
        "the result is 100002 bytes; this job's limit is 65536 bytes"
    );
    let fits = misbehave("big-result", 1_000, limits());
    assert_eq!(fits.outcome.map(|r| r.len()), Ok(1_002));
}

/// A task component in WAT whose `run` executes `grow` (an expression
/// leaving the old size, or -1 when refused) and returns `"refused"` or
/// `"grown"`: table and memory growth the Rust guest cannot ask for directly.
fn raw_grow_task(grow: &str) -> Vec<u8> {
    let wat = format!(
        r#"(component
          (core module $m
            (memory (export "memory") 1)
            (table $t 1 funcref)
            (global $bump (mut i32) (i32.const 4096))
            (data (i32.const 64) "\22grown\22")
            (data (i32.const 96) "\22refused\22")
            (func (export "realloc") (param i32 i32 i32 i32) (result i32)
              (local $p i32)
              (local.set $p (global.get $bump))
              (global.set $bump (i32.add (global.get $bump) (local.get 3)))
              (local.get $p))
            (func (export "run") (param i32 i32) (result i32)
              (i32.store8 (i32.const 0) (i32.const 0))
              (if (i32.eq (i32.const -1) {grow})
                (then (i32.store (i32.const 4) (i32.const 96))
                      (i32.store (i32.const 8) (i32.const 9)))
                (else (i32.store (i32.const 4) (i32.const 64))
                      (i32.store (i32.const 8) (i32.const 7))))
              (i32.const 0)))
          (core instance $i (instantiate $m))
          (type $task-error (variant (case "bad-args" string) (case "failed" string)))
          (export $te "task-error" (type $task-error))
          (func (export "run") (param "args" string) (result (result string (error $te)))
            (canon lift (core func $i "run") (memory (core memory $i "memory")) (realloc (core func $i "realloc")))))"#
    );
    wat::parse_str(wat).expect("the probe component parses")
}

/// Resident memory of this test process, in bytes.
fn own_rss() -> u64 {
    wasmgrid_tests::hostile::rss_bytes(std::process::id()).expect("/proc/self/status")
}

#[test]
fn huge_table_and_memory_growth_is_refused_inside_the_limits() {
    let executor = executor();
    let before = own_rss();
    let cases = [
        // 100 million table elements, far past the sandbox's million.
        (
            "table",
            "(table.grow $t (ref.null func) (i32.const 100000000))",
        ),
        // 60000 pages (3.7 GiB) of linear memory, far past the 64 MiB limit.
        ("memory", "(memory.grow (i32.const 60000))"),
    ];
    for (what, grow) in cases {
        let (task, load) = executor.load(&raw_grow_task(grow)).expect("probe loads");
        let report = executor.run(&task, load, "[]", &limits());
        assert_eq!(report.outcome, Ok("\"refused\"".to_owned()), "{what}");
    }
    // Modest growth is granted, so the refusals above are the limits at work.
    for grow in [
        "(table.grow $t (ref.null func) (i32.const 1000))",
        "(memory.grow (i32.const 16))",
    ] {
        let (task, load) = executor.load(&raw_grow_task(grow)).unwrap();
        let report = executor.run(&task, load, "[]", &limits());
        assert_eq!(report.outcome, Ok("\"grown\"".to_owned()), "{grow}");
    }
    let after = own_rss();
    assert!(
        after < before + (256 << 20),
        "the host grew from {before} to {after} bytes"
    );
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

/// A cancel flag that another thread sets after `delay`.
fn cancelled_after(delay: std::time::Duration) -> wasmgrid_worker::executor::CancelFlag {
    let flag = wasmgrid_worker::executor::CancelFlag::default();
    let setter = flag.clone();
    std::thread::spawn(move || {
        std::thread::sleep(delay);
        setter.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    flag
}

#[test]
fn a_cancel_flag_stops_a_running_task_and_deadlines_still_hold() {
    let executor = Arc::new(executor());
    let (task, _) = executor.load(&guest_wasm("misbehave")).unwrap();
    let flag = cancelled_after(std::time::Duration::from_millis(100));
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

#[test]
fn a_sleeping_task_is_cancelled_without_waiting_for_its_sleep() {
    let executor = executor();
    let (task, _) = executor.load(&guest_wasm("misbehave")).unwrap();
    let flag = cancelled_after(std::time::Duration::from_millis(100));
    let started = std::time::Instant::now();
    let patient = TaskLimits {
        timeout_ms: 60_000,
        ..limits()
    };
    let report = executor.run_cancellable(&task, Load::WARM, "[\"sleep\", 20]", &patient, flag);
    assert_eq!(failure(&report).0, FailureKind::Cancelled);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "the sleep ran its course"
    );
}

#[test]
fn the_host_environment_and_arguments_never_reach_a_guest() {
    let dir = tempfile::tempdir().unwrap();
    let marker = format!("wasmgrid-marker-{}", std::process::id());
    // In the worker's environment and in its arguments (the args file's name).
    let args = dir.path().join(format!("{marker}.json"));
    std::fs::write(&args, r#"[["env-dump", 0]]"#).unwrap();
    let reports = dir.path().join("reports.json");
    let out = std::process::Command::new(wasmgrid_tests::binary("worker"))
        .arg("exec")
        .arg(wasmgrid_tests::guest_path("misbehave"))
        .arg(&args)
        .arg("--reports")
        .arg(&reports)
        .env("WASMGRID_TEST_MARKER", &marker)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("env: []; args: []"), "{stdout}");
    let reports = std::fs::read_to_string(&reports).unwrap();
    assert!(
        reports.contains("env: []; args: []"),
        "the guest's own output: {reports}"
    );
    for (name, text) in [
        ("results", stdout.as_ref()),
        ("reports", reports.as_str()),
        ("stderr", &String::from_utf8_lossy(&out.stderr)),
    ] {
        assert!(
            !text.contains(&marker),
            "the marker reached the {name}: {text}"
        );
    }
}
