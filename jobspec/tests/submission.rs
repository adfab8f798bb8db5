//! Properties of the submission parser: whatever a client sends, it answers
//! without panicking, and whatever it accepts stays within every cap.

use base64::Engine as _;
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use serde_json::{json, Value};
use wasmgrid_jobspec::{parse_submission, Limit, ModuleRef, SubmitError, SubmitLimits};

fn caps() -> impl Strategy<Value = SubmitLimits> {
    (
        0u64..4096,
        0u64..4096,
        0u64..20,
        any::<u64>(),
        prop_oneof![0u64..2048, Just(u64::MAX)],
        prop_oneof![0.001f64..100_000.0, Just(f64::MAX)],
    )
        .prop_map(
            |(module, args, tasks, fuel, memory, timeout)| SubmitLimits {
                max_module_bytes: module,
                max_args_bytes: args,
                max_tasks_per_job: tasks,
                max_fuel: fuel,
                max_memory_mib: memory,
                max_timeout_secs: timeout,
                max_unfinished_jobs_per_token: 1,
            },
        )
}

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..8).prop_map(Value::Array),
            btree_map(".{0,8}", inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Bodies shaped like submissions, with any values where the fields go.
fn submission_like() -> impl Strategy<Value = Value> {
    let module = prop_oneof![
        vec(any::<u8>(), 0..3000)
            .prop_map(|wasm| json!(base64::engine::general_purpose::STANDARD.encode(wasm))),
        any::<[u8; 32]>().prop_map(|h| json!(hex::encode(h))),
        any_json(),
    ];
    let option_value = prop_oneof![
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        (0u64..5000).prop_map(Value::from),
        any_json(),
    ];
    let options = btree_map(
        prop_oneof![
            Just("fuel"),
            Just("memory_mib"),
            Just("timeout_secs"),
            Just("retries"),
            Just("priority"),
            Just("scheduler"),
            Just("not_before_ms"),
            Just("retry_deterministic"),
        ],
        option_value,
        0..6,
    );
    (
        proptest::option::of(module.clone()),
        proptest::option::of(module),
        prop_oneof![vec(any_json(), 0..24).prop_map(Value::Array), any_json()],
        proptest::option::of(options),
    )
        .prop_map(|(base64, sha256, args, options)| {
            let mut body = serde_json::Map::new();
            if let Some(v) = base64 {
                body.insert("module_base64".into(), v);
            }
            if let Some(v) = sha256 {
                body.insert("module_sha256".into(), v);
            }
            body.insert("args".into(), args);
            if let Some(options) = options {
                let options = options.into_iter().map(|(k, v)| (k.to_owned(), v));
                body.insert("options".into(), Value::Object(options.collect()));
            }
            Value::Object(body)
        })
}

/// Accepted means within every cap; refused means an error the API can name.
fn check(body: &[u8], caps: &SubmitLimits) -> Result<(), TestCaseError> {
    match parse_submission(body, caps) {
        Ok(submission) => {
            prop_assert!(!submission.args.is_empty());
            prop_assert!(submission.args.len() as u64 <= caps.max_tasks_per_job);
            let args_bytes: usize = submission.args.iter().map(|a| a.get().len()).sum();
            prop_assert!(args_bytes as u64 <= caps.max_args_bytes);
            if let ModuleRef::Inline { wasm, .. } = &submission.module {
                prop_assert!(wasm.len() as u64 <= caps.max_module_bytes);
            }
            let limits = submission.task_limits;
            prop_assert!(limits.fuel <= caps.max_fuel);
            prop_assert!(limits.memory_bytes >> 20 <= caps.max_memory_mib);
            prop_assert!(limits.timeout_ms > 0);
            prop_assert!(limits.timeout_ms as f64 <= (caps.max_timeout_secs * 1000.0).ceil());
        }
        Err(error) => {
            prop_assert!(!error.to_string().is_empty());
            if let SubmitError::LimitExceeded { limit, .. } = &error {
                prop_assert!(error.to_string().contains(limit.flag()), "{}", error);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_bytes_are_answered(body in vec(any::<u8>(), 0..512), caps in caps()) {
        check(&body, &caps)?;
    }

    #[test]
    fn any_json_is_answered(body in any_json(), caps in caps()) {
        check(body.to_string().as_bytes(), &caps)?;
    }

    #[test]
    fn submission_shaped_json_is_answered_within_the_caps(body in submission_like(), caps in caps()) {
        check(body.to_string().as_bytes(), &caps)?;
    }
}

#[test]
fn a_job_asking_nothing_gets_the_defaults_lowered_to_the_caps() {
    let body = json!({ "module_sha256": "00".repeat(32), "args": [1] }).to_string();
    let roomy = parse_submission(body.as_bytes(), &SubmitLimits::default()).unwrap();
    assert_eq!(roomy.task_limits, wasmgrid_protocol::TaskLimits::default());
    let tight = SubmitLimits {
        max_fuel: 5,
        max_memory_mib: 3,
        max_timeout_secs: 0.25,
        ..SubmitLimits::default()
    };
    let limits = parse_submission(body.as_bytes(), &tight)
        .unwrap()
        .task_limits;
    assert_eq!(
        (limits.fuel, limits.memory_bytes, limits.timeout_ms),
        (5, 3 << 20, 250)
    );
}

#[test]
fn a_module_too_big_is_refused_before_it_is_decoded() {
    let caps = SubmitLimits {
        max_module_bytes: 3,
        ..SubmitLimits::default()
    };
    // Not base64 at all, but too long to be a module within the cap either way.
    let body = json!({ "module_base64": "!!!!!!!!", "args": [1] }).to_string();
    match parse_submission(body.as_bytes(), &caps) {
        Err(SubmitError::LimitExceeded { limit, .. }) => assert_eq!(limit, Limit::ModuleSize),
        other => panic!("{other:?}"),
    }
    let body = json!({ "module_base64": "AAAA", "args": [1] }).to_string();
    assert!(parse_submission(body.as_bytes(), &caps).is_ok());
}
