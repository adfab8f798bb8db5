//! Any body a client posts to `/api/jobs`: the parser never panics, and what
//! it accepts respects every cap.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wasmgrid_jobspec::{parse_submission, split_args, ModuleRef, SubmitLimits};

fuzz_target!(|data: &[u8]| {
    let tight = SubmitLimits {
        max_module_bytes: 64,
        max_args_bytes: 256,
        max_tasks_per_job: 4,
        max_fuel: 1000,
        max_memory_mib: 16,
        max_timeout_secs: 2.5,
        max_unfinished_jobs_per_token: 1,
    };
    for caps in [SubmitLimits::default(), tight] {
        let Ok(submission) = parse_submission(data, &caps) else {
            continue;
        };
        assert!(!submission.args.is_empty());
        assert!(submission.args.len() as u64 <= caps.max_tasks_per_job);
        let args_bytes: usize = submission.args.iter().map(|a| a.get().len()).sum();
        assert!(args_bytes as u64 <= caps.max_args_bytes);
        if let ModuleRef::Inline { wasm, .. } = &submission.module {
            assert!(wasm.len() as u64 <= caps.max_module_bytes);
        }
        let limits = submission.task_limits;
        assert!(limits.fuel <= caps.max_fuel);
        assert!(limits.memory_bytes >> 20 <= caps.max_memory_mib);
        assert!(limits.timeout_ms > 0);
        assert!(limits.timeout_ms as f64 <= (caps.max_timeout_secs * 1000.0).ceil());
    }
    // `worker exec` reads args.json with the same splitter.
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(args) = split_args(text) {
            assert!(!args.is_empty());
        }
    }
});
