//! Executor benchmarks, printed as tables (run with `cargo xtask bench`):
//! per-task overhead, wasm vs native, compile and cache-hit load times, and
//! `worker exec` end to end on a 100,000-task job.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use wasmgrid_protocol::TaskLimits;
use wasmgrid_worker::executor::{Executor, ExecutorOptions, Interruption, Load, Metering};

fn guests_dir() -> PathBuf {
    std::env::var_os("WASMGRID_GUESTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/wasm"))
}

fn guest(name: &str) -> Vec<u8> {
    let path = guests_dir().join(format!("{name}.wasm"));
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run `cargo xtask guests`)", path.display()))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn median_of<T>(runs: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut times = Vec::with_capacity(runs);
    let mut last = None;
    for _ in 0..runs {
        let started = Instant::now();
        last = Some(f());
        times.push(started.elapsed());
    }
    times.sort();
    (percentile(&times, 0.5), last.expect("at least one run"))
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn per_task_overhead() {
    // Both ways of stopping a task, interleaved in rounds so drift hits both alike.
    let executors: Vec<(&str, Executor)> = [Interruption::Auto, Interruption::Epoch]
        .into_iter()
        .map(|interruption| {
            let executor = Executor::with_options(ExecutorOptions {
                interruption,
                ..ExecutorOptions::default()
            })
            .expect("engine");
            (executor.interruption(), executor)
        })
        .collect();
    let tasks: Vec<_> = executors
        .iter()
        .map(|(_, executor)| executor.load(&guest("add")).expect("add loads").0)
        .collect();
    let limits = TaskLimits::default();
    let mut times = vec![Vec::new(); executors.len()];
    for round in 0..21 {
        for (((_, executor), task), times) in executors.iter().zip(&tasks).zip(&mut times) {
            for i in 0..1_000 {
                let args = format!("[{i}, 1]");
                let started = Instant::now();
                let report = executor.run(task, Load::WARM, &args, &limits);
                let elapsed = started.elapsed();
                assert!(report.outcome.is_ok());
                // The first round warms up.
                if round > 0 {
                    times.push(elapsed);
                }
            }
        }
    }
    println!("\n## Per-task overhead: trivial task (add), cached module, fresh store + instance + call, one thread, 20,000 calls per way of stopping tasks\n");
    println!("| stopped by | median | p90 | p99 | target |");
    println!("|---|---|---|---|---|");
    for ((label, _), times) in executors.iter().zip(&mut times) {
        times.sort();
        println!(
            "| {label} | {} | {} | {} | ≤ 30 µs median |",
            us(percentile(times, 0.5)),
            us(percentile(times, 0.9)),
            us(percentile(times, 0.99))
        );
    }
}

fn wasm_vs_native() {
    // Each engine adds one kind of interruption check to the compiled code.
    let engines: Vec<(&str, Executor)> = [
        ("no checks", Metering::Unbounded, Interruption::Auto),
        ("signal", Metering::WallClockOnly, Interruption::Auto),
        ("signal + fuel", Metering::Fuel, Interruption::Auto),
        ("epoch", Metering::WallClockOnly, Interruption::Epoch),
        ("epoch + fuel", Metering::Fuel, Interruption::Epoch),
    ]
    .into_iter()
    .map(|(label, metering, interruption)| {
        let options = ExecutorOptions {
            metering,
            interruption,
            ..ExecutorOptions::default()
        };
        (label, Executor::with_options(options).expect("engine"))
    })
    .collect();
    let limits = TaskLimits {
        fuel: u64::MAX / 2,
        ..TaskLimits::default()
    };
    println!("\n## Wasm vs native, same Rust source (one thread; native and each engine interleaved, 9 rounds; best, and ratio of bests to native)\n");
    println!("`no checks`: neither fuel nor a wall clock (nothing could stop a runaway guest; the floor). `signal`: the wall clock by signal, with no checks in the code (the worker's way on Linux x86-64). `epoch`: the wall clock by epoch checks (elsewhere, and under a CPU cap). `+ fuel`: metered too (the worker's default).\n");
    println!("| kernel | native | no checks | signal | signal + fuel | epoch | epoch + fuel |");
    println!("|---|---|---|---|---|---|---|");

    let view = mandelbrot::View {
        width: 640,
        height: 480,
        center_x: -0.75,
        center_y: 0.0,
        scale: 3.0,
        max_iter: 1000,
    };
    let view_json = r#"[{"width":640,"height":480,"center_x":-0.75,"center_y":0.0,"scale":3.0,"max_iter":1000}, 0, 480]"#.to_owned();
    type Native = Box<dyn FnMut() -> String>;
    let kernels: [(&str, &str, String, Native); 3] = [
        (
            "primes [0, 20M)",
            "primes",
            "[0, 20000000]".to_owned(),
            Box::new(|| primes::count_primes_in(0, 20_000_000).to_string()),
        ),
        (
            "mandelbrot 640×480, 1000 iter",
            "mandelbrot",
            view_json,
            Box::new(move || {
                mandelbrot::render(&view, 0, 480)
                    .iterations
                    .len()
                    .to_string()
            }),
        ),
        (
            // Native sha2 uses the CPU's SHA instructions, which wasm lacks:
            // the column to compare here is `no checks`.
            "hashsearch, 65,536 nonces",
            "hashsearch",
            r#"["wasmgrid", 0, 65536, 16]"#.to_owned(),
            Box::new(|| {
                hashsearch::search(b"wasmgrid", 0, 65_536, 16)
                    .len()
                    .to_string()
            }),
        ),
    ];
    for (label, name, args, mut native) in kernels {
        let wasm = guest(name);
        let tasks: Vec<_> = engines
            .iter()
            .map(|(_, executor)| executor.load(&wasm).expect("loads").0)
            .collect();
        let mut best = vec![Duration::MAX; engines.len() + 1];
        // Interleaved, so that drift in the machine hits every variant alike.
        for _ in 0..9 {
            best[0] = best[0].min(median_of(1, &mut native).0);
            for (i, ((_, executor), task)) in engines.iter().zip(&tasks).enumerate() {
                let (took, report) =
                    median_of(1, || executor.run(task, Load::WARM, &args, &limits));
                assert!(report.outcome.is_ok(), "{:?}", report.outcome);
                best[i + 1] = best[i + 1].min(took);
            }
        }
        let cells: Vec<String> = best[1..]
            .iter()
            .map(|t| {
                format!(
                    "{} ({:.2}×)",
                    ms(*t),
                    t.as_secs_f64() / best[0].as_secs_f64()
                )
            })
            .collect();
        println!("| {label} | {} | {} |", ms(best[0]), cells.join(" | "));
    }
}

fn compile_and_cache() {
    println!("\n## Compile and load per example (median of 5)\n");
    println!("| module | size | compile | load from disk cache | load from memory |");
    println!("|---|---|---|---|---|");
    let mut names: Vec<String> = std::fs::read_dir(guests_dir())
        .expect("guests built")
        .filter_map(|e| e.ok()?.path().file_stem()?.to_str().map(str::to_owned))
        .collect();
    names.sort();
    for name in names {
        let wasm = guest(&name);
        let (compile, _) = median_of(5, || {
            Executor::new(None)
                .expect("engine")
                .load(&wasm)
                .expect("loads")
                .1
        });
        let dir = tempfile::tempdir().expect("temp dir");
        Executor::new(Some(dir.path().into()))
            .expect("engine")
            .load(&wasm)
            .expect("loads");
        let mut disk = Vec::new();
        for _ in 0..5 {
            let executor = Executor::new(Some(dir.path().into())).expect("engine");
            let (_, load) = executor.load(&wasm).expect("loads");
            assert_eq!(load.source, wasmgrid_protocol::CacheSource::Disk);
            disk.push(Duration::from_micros(load.micros));
        }
        disk.sort();
        let executor = Executor::new(None).expect("engine");
        executor.load(&wasm).expect("loads");
        let (memory, _) = median_of(5, || executor.load(&wasm).expect("loads"));
        println!(
            "| {name} | {} KB | {} | {} | {} |",
            wasm.len() / 1000,
            ms(compile),
            us(percentile(&disk, 0.5)),
            us(memory)
        );
    }
}

fn worker_exec_throughput() {
    let dir = tempfile::tempdir().expect("temp dir");
    let tasks = 100_000;
    let args: Vec<String> = (0..tasks).map(|i| format!("[{i},{}]", i * 3)).collect();
    let args_path = dir.path().join("args.json");
    std::fs::write(&args_path, format!("[{}]", args.join(","))).expect("write args");
    let out = dir.path().join("results.json");
    let module = guests_dir().join("add.wasm");
    let run = || {
        let started = Instant::now();
        let status = Command::new(env!("CARGO_BIN_EXE_worker"))
            .args(["exec", "--slots", "2", "--no-cache", "--output"])
            .arg(&out)
            .arg(&module)
            .arg(&args_path)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("worker runs");
        assert!(status.success());
        started.elapsed()
    };
    run();
    let (wall, _) = median_of(3, run);
    let results: Vec<i64> =
        serde_json::from_slice(&std::fs::read(&out).expect("results")).expect("JSON");
    assert_eq!(results.len(), tasks);
    assert_eq!(results[tasks - 1], 4 * (tasks as i64 - 1));
    println!("\n## `worker exec`, 100,000 tasks of `add`, 2 slots, end to end (process start, args parsed, results written; median of 3)\n");
    println!("| wall | tasks/s | target |");
    println!("|---|---|---|");
    println!(
        "| {} | {:.0} | ≥ 40,000 tasks/s |",
        ms(wall),
        tasks as f64 / wall.as_secs_f64()
    );
}

fn main() {
    // `cargo bench -- NAME` runs only the sections whose name contains NAME.
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wanted = |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()));
    println!("# wasmgrid executor benchmarks");
    if wanted("overhead") {
        per_task_overhead();
    }
    if wanted("native") {
        wasm_vs_native();
    }
    if wanted("compile") {
        compile_and_cache();
    }
    if wanted("exec") {
        worker_exec_throughput();
    }
}
