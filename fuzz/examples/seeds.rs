//! Writes the seed corpora from real inputs: encoded messages of each kind
//! and submissions built from the examples' args.json.
//! Run from `fuzz/`: `cargo run --example seeds`.

use std::path::Path;

use serde_json::json;
use wasmgrid_protocol::wire::{
    encode_frame, Assignment, FetchModule, Finished, Load, ModuleReply, Preamble, ToForeman,
    ToWorker, WorkerInfo,
};
use wasmgrid_protocol::{CacheSource, Failure, FailureKind, TaskLimits, TaskReport};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let wire = Path::new("corpus/wire_frames");
    let submission = Path::new("corpus/submission");
    std::fs::create_dir_all(wire)?;
    std::fs::create_dir_all(submission)?;

    let info = WorkerInfo {
        name: "pc-1".into(),
        hostname: "pc-1".into(),
        os: "linux".into(),
        arch: "x86_64".into(),
        cores: 8,
        memory_bytes: 16 << 30,
        slots: 8,
        wasmtime_version: "48.0.8".into(),
        engine_hash: "3f2a".into(),
        cpu_model: "AMD Ryzen 7".into(),
        benchmark_fuel_per_sec: 2_000_000_000,
        cpu_limit_percent: 100,
        priority: Default::default(),
    };
    let report = |outcome| TaskReport {
        outcome,
        fuel_used: 123_456,
        cache: CacheSource::Memory,
        timings: Default::default(),
        stdout: Default::default(),
        stderr: Default::default(),
    };
    let to_foreman = [
        ToForeman::Hello {
            token: "join-token".into(),
            info,
        },
        ToForeman::Credit(16),
        ToForeman::Finished(vec![
            Finished {
                attempt: 7,
                report: report(Ok("[2,3,5,7]".into())),
            },
            Finished {
                attempt: 8,
                report: report(Err(Failure::new(
                    FailureKind::OutOfFuel,
                    "all fuel consumed",
                ))),
            },
        ]),
        ToForeman::Heartbeat(Load {
            cpu_permille: 420,
            memory_used_bytes: 3 << 30,
            worker_rss_bytes: 80 << 20,
            running: 3,
        }),
        ToForeman::Draining,
        ToForeman::Returned(vec![9, 10]),
    ];
    let to_worker = [
        ToWorker::Welcome {
            worker_id: 1,
            heartbeat_ms: 5000,
        },
        ToWorker::Run(vec![Assignment {
            attempt: 7,
            module: [0xab; 32],
            args: "[0, 1000]".into(),
            limits: TaskLimits::default(),
        }]),
        ToWorker::Cancel(vec![7]),
        ToWorker::Drain { grace_ms: 30_000 },
        ToWorker::GiveBack {
            attempts: vec![7],
            believed_unstarted: 1,
        },
        ToWorker::Backlog(false),
    ];
    // One file per message, one with a whole conversation, one with the preamble first.
    let mut conversation = Vec::new();
    for (i, message) in to_foreman.iter().enumerate() {
        let frame = encode_frame(message)?;
        conversation.extend_from_slice(&frame);
        std::fs::write(wire.join(format!("to_foreman_{i}")), with_sizes(&frame))?;
    }
    std::fs::write(wire.join("to_foreman_all"), with_sizes(&conversation))?;
    for (i, message) in to_worker.iter().enumerate() {
        std::fs::write(
            wire.join(format!("to_worker_{i}")),
            with_sizes(&encode_frame(message)?),
        )?;
    }
    let mut fetch = Preamble::ours().encode().to_vec();
    fetch.extend(encode_frame(&FetchModule([0xab; 32]))?);
    std::fs::write(wire.join("preamble_fetch"), with_sizes(&fetch))?;
    let reply = encode_frame(&ModuleReply::Found(b"\0asm\x0d\0\x01\0".to_vec()))?;
    std::fs::write(wire.join("module_reply"), with_sizes(&reply))?;

    for example in ["add", "hashsearch", "mandelbrot", "pi", "primes"] {
        let args: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(format!(
            "../examples/{example}/args.json"
        ))?)?;
        let body = json!({
            "module_sha256": "ab".repeat(32),
            "args": args,
            "options": { "fuel": 1000, "memory_mib": 16, "timeout_secs": 2.5, "scheduler": "fifo" },
        });
        std::fs::write(submission.join(example), body.to_string())?;
    }
    let inline = json!({
        // The smallest component header: "\0asm", version 0x0d, layer 1.
        "module_base64": "AGFzbQ0AAQA=",
        "args": [[1, 2], {"x": "y"}, 3],
        "options": { "retries": 1, "priority": -2, "not_before_ms": 1_900_000_000_000u64,
            "retry_deterministic": true, "scheduler": "least-loaded" },
    });
    std::fs::write(submission.join("inline_module"), inline.to_string())?;
    Ok(())
}

/// The target's first four bytes choose its read sizes.
fn with_sizes(stream: &[u8]) -> Vec<u8> {
    let mut input = vec![3, 17, 1, 64];
    input.extend_from_slice(stream);
    input
}
