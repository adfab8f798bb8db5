//! `POST /api/jobs`'s body, parsed and checked against the foreman's limits.

use std::borrow::Cow;

use base64::Engine as _;
use serde::Deserialize;
use serde_json::value::RawValue;
use wasmgrid_protocol::TaskLimits;

use crate::limits::{size, Limit, SubmitLimits};
use crate::{split_args, ArgsError, JobOptions};

/// Why a submission is refused; [`SubmitError::code`] is the API's stable code.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SubmitError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    BadOptions(String),
    #[error(transparent)]
    BadArgs(#[from] ArgsError),
    #[error("{0}")]
    BadModule(String),
    /// More than one of the foreman's caps allows; the message names the cap and its flag.
    #[error("{message}")]
    LimitExceeded { limit: Limit, message: String },
}

impl SubmitError {
    pub fn code(&self) -> &'static str {
        match self {
            SubmitError::BadRequest(_) => "bad_request",
            SubmitError::BadOptions(_) => "bad_options",
            SubmitError::BadArgs(_) => "bad_args",
            SubmitError::BadModule(_) => "bad_module",
            SubmitError::LimitExceeded { .. } => "limit_exceeded",
        }
    }

    pub(crate) fn over(limit: Limit, message: String) -> Self {
        SubmitError::LimitExceeded {
            limit,
            message: format!("{message} (foreman serve {})", limit.flag()),
        }
    }

    /// A module of `bytes` against the cap (also for one named by hash).
    pub fn check_module_size(bytes: u64, caps: &SubmitLimits) -> Result<(), SubmitError> {
        if bytes > caps.max_module_bytes {
            return Err(Self::over(
                Limit::ModuleSize,
                format!(
                    "the module is {}, more than this foreman's cap of {}",
                    size(bytes),
                    size(caps.max_module_bytes)
                ),
            ));
        }
        Ok(())
    }
}

/// Where the job's module comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleRef {
    /// Uploaded with the job; `sha256` is what the submitter says it is, when
    /// given as 64 hex digits (a foreman that has it validated may skip the upload).
    Inline {
        wasm: Vec<u8>,
        sha256: Option<[u8; 32]>,
    },
    /// One the foreman should have stored already.
    Stored([u8; 32]),
}

/// A submission that respects every limit; `args` borrow the body's text.
#[derive(Debug)]
pub struct Submission<'a> {
    pub module: ModuleRef,
    /// One raw JSON text per task, in order.
    pub args: Vec<&'a RawValue>,
    pub options: JobOptions,
    /// Each task's fuel, memory and timeout: asked for, or the defaults within the caps.
    pub task_limits: TaskLimits,
}

#[derive(Deserialize)]
struct Body<'a> {
    #[serde(borrow, default)]
    module_base64: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    module_sha256: Option<Cow<'a, str>>,
    #[serde(borrow)]
    args: &'a RawValue,
    /// Read apart from the rest so a bad option is named as one.
    #[serde(default)]
    options: Option<serde_json::Value>,
}

/// Parses `POST /api/jobs`'s body and checks it against `caps`; nothing here
/// allocates more than the body's size (a module is measured before it is decoded).
pub fn parse_submission<'a>(
    body: &'a [u8],
    caps: &SubmitLimits,
) -> Result<Submission<'a>, SubmitError> {
    let body: Body<'a> = serde_json::from_slice(body)
        .map_err(|e| SubmitError::BadRequest(format!("the body is not a job submission: {e}")))?;
    let options: JobOptions = match body.options {
        None => JobOptions::default(),
        Some(value) => serde_json::from_value(value)
            .map_err(|e| SubmitError::BadOptions(format!("options: {e}")))?,
    };
    let task_limits = options.task_limits(caps)?;
    let args_text = body.args.get();
    if args_text.len() as u64 > caps.max_args_bytes {
        return Err(SubmitError::over(
            Limit::ArgsSize,
            format!(
                "args is {} of JSON, more than this foreman's cap of {}",
                size(args_text.len() as u64),
                size(caps.max_args_bytes)
            ),
        ));
    }
    let args = split_args(args_text)?;
    if args.len() as u64 > caps.max_tasks_per_job {
        return Err(SubmitError::over(
            Limit::TasksPerJob,
            format!(
                "the job has {} tasks, more than this foreman's cap of {}",
                args.len(),
                caps.max_tasks_per_job
            ),
        ));
    }
    let module = module_ref(body.module_base64, body.module_sha256, caps)?;
    Ok(Submission {
        module,
        args,
        options,
        task_limits,
    })
}

fn module_ref(
    base64: Option<Cow<'_, str>>,
    sha256: Option<Cow<'_, str>>,
    caps: &SubmitLimits,
) -> Result<ModuleRef, SubmitError> {
    match (base64, sha256) {
        (Some(encoded), sha256) => {
            SubmitError::check_module_size(decoded_len(&encoded), caps)?;
            let wasm = base64::engine::general_purpose::STANDARD
                .decode(encoded.as_bytes())
                .map_err(|e| SubmitError::BadModule(format!("module_base64 is not base64: {e}")))?;
            SubmitError::check_module_size(wasm.len() as u64, caps)?;
            Ok(ModuleRef::Inline {
                wasm,
                sha256: sha256.as_deref().and_then(parse_hash),
            })
        }
        (None, Some(hash)) => parse_hash(&hash)
            .map(ModuleRef::Stored)
            .ok_or_else(|| SubmitError::BadModule("module_sha256 is not 64 hex digits".into())),
        (None, None) => Err(SubmitError::BadModule(
            "give module_base64 or module_sha256".into(),
        )),
    }
}

/// What padded base64 of this length decodes to (invalid input fails later).
fn decoded_len(encoded: &str) -> u64 {
    let padding = encoded.bytes().rev().take(2).filter(|&b| b == b'=').count() as u64;
    ((encoded.len() as u64).div_ceil(4) * 3).saturating_sub(padding)
}

/// 64 hex digits as a sha256.
pub fn parse_hash(text: &str) -> Option<[u8; 32]> {
    let bytes = hex::decode(text).ok()?;
    bytes.try_into().ok()
}
